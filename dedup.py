"""dedup.py: clean, quality-filter and deduplicate raw text before tokenization.

    python dedup.py INPUT... -o OUT.jsonl [--threshold 0.8] [--num-perm 128] [--ngram 5]
        [--workers N] [--no-filters] [--removed REMOVED.jsonl] [--report REPORT.json] [--strict]

INPUT: .txt files (one document each, id = file name), folders (searched recursively for .txt and
.jsonl), .jsonl files with a "text" field (other fields kept as they are; a missing id becomes
"<file>:<line>"), and .gz versions of both. OUT: the kept documents, cleaned, in input order.
REMOVED (default removed.jsonl beside OUT): every removed document with "removed_by" (a filter rule,
"exact_duplicate" or "near_duplicate"), "duplicate_of" (the kept id) and, for near duplicates, its
best verified "jaccard". REPORT (default report.json beside OUT): counts per stage and rule, bytes
in and out, docs/s. Prints a short summary. From Python: run(inputs, DedupConfig(out=...)).

Stages, in the order a document meets them:
  1 clean: Unicode NFC, \\n line endings, control characters dropped, trailing whitespace stripped.
  2 quality filters: Gopher-style rules with the thresholds in QualityThresholds, loosened where
    verse differs from web prose (short lines, speaker names repeated on every other line); they
    drop 0.05% of the bytes of Shakespeare cut into scenes. Off with --no-filters.
  3 exact duplicates: a hash of the normalised text (lower-cased words; punctuation, spacing gone).
  4 near duplicates: datasketch MinHash (2.x, scheme affine32, seed 1) of the set of word n-grams
    and MinHashLSH with bands x rows chosen so that a pair at Jaccard = threshold is a candidate
    with probability >= 0.99 (21 x 6 for 0.8). Each candidate pair is then verified with the exact
    Jaccard of the two n-gram hash sets: the MinHash estimate has a std of ~0.04 at 128 permutations
    and cannot promise that a pair below the threshold is never removed; the exact check can, at the
    price of recomputing the n-grams of candidate documents. Union-find over verified pairs; the
    first document of each cluster (input order) is kept. Documents with fewer words than one n-gram
    have no shingles (their empty sketches would all collide) and meet only the exact stage.

Memory: the input is streamed three times, never held. Pass 1 computes signatures in --workers
processes and queries/inserts them into the LSH in the parent, then drops them; pass 2 recomputes
the n-gram sets of candidate documents, each freed after its last partner; pass 3 writes. What
grows with the corpus is the LSH index, 6.6 KB per document (21 band keys, each a bytes object and
a set in datasketch's dict storage; bench/dedup.py), plus the exact hash and status: RSS grew by
7.6 KB per document on 50k documents, i.e. ~7 GiB per million. A signature alone is 128 x 4 bytes.
"""

import argparse
import codecs
import collections
import functools
import gzip
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import time
import unicodedata
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import datasketch
import numpy as np
from datasketch import MinHash, MinHashLSH

SEED = 1             # datasketch permutation seed; 2.0 changed hash values, so its major is pinned
SCHEME = "affine32"  # datasketch 2.x's default, spelled out so a new default cannot change results


@dataclass
class DedupConfig:
    out: str = ""             # OUT.jsonl (-o)
    threshold: float = 0.8    # word n-gram Jaccard at or above which two documents are duplicates
    num_perm: int = 128       # MinHash permutations
    ngram: int = 5            # words per shingle
    workers: int = 1          # processes for cleaning, filters and signatures
    no_filters: bool = False  # skip the quality filters
    removed: str = ""         # default: removed.jsonl beside OUT
    report: str = ""          # default: report.json beside OUT
    strict: bool = False      # a malformed JSONL line is fatal instead of skipped and reported


@dataclass
class QualityThresholds:
    """Gopher rules (Rae et al. 2021, appendix A), a document is dropped by the first it breaks."""
    min_words: int = 20                    # fewer: not a document
    max_words: int = 2_000_000             # Gopher: 100k, but a novel in one .txt is longer
    min_mean_word_len: float = 2.5         # Gopher: 3; "I", "O", "'tis", Folio "vs" pull verse down
    max_mean_word_len: float = 10.0
    max_symbol_word_ratio: float = 0.1     # '#' and '...' per word
    max_bullet_line_frac: float = 0.9      # lines starting with a bullet
    max_ellipsis_line_frac: float = 0.3    # lines ending with '...'
    min_alpha_word_frac: float = 0.8       # words with at least one letter
    min_stop_words: int = 2                # of "the be to of and that have with"
    max_boilerplate_line_frac: float = 0.3  # lines with cookie / licence / navigation phrases
    max_dup_line_char_frac: float = 0.2    # chars in lines that repeat an earlier line, counting only
    min_dup_line_chars: int = 30           # lines this long: plays repeat "Ham." by design
    max_top_ngram_char_frac: tuple = ((2, 0.2), (3, 0.18), (4, 0.16))  # the most frequent n-gram
    max_dup_ngram_char_frac: tuple = ((5, 0.15), (10, 0.10))          # all repeated n-grams


STOP_WORDS = frozenset("the be to of and that have with".split())
BOILERPLATE = ("cookie", "javascript", "privacy policy", "terms of use", "terms of service", "log in",
               "login", "all rights reserved", "click here", "subscribe", "sign up", "lorem ipsum", "powered by")
CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\ufeff\ud800-\udfff]")  # + lone surrogates
TRAILING_SPACE_RE = re.compile(r"[^\S\n]+(?=\n|\Z)")
WORD_RE = re.compile(r"\w+")
NO_LETTER_WORD_RE = re.compile(r"(?<!\S)(?:[^\s\w]|[\d_])+(?!\S)")  # whitespace-separated, no letter


# ---------------------------------------------------------------------------------------------
# Reading: every input becomes a stream of dicts with "id" and "text". Undecodable bytes are
# replaced and counted; a malformed JSONL line is reported with file and line (fatal if --strict).

_bad_bytes = [0]


def _count_and_replace(err):
    _bad_bytes[0] += err.end - err.start
    return "\ufffd", err.end


codecs.register_error("dedup_count_replace", _count_and_replace)


def expand_inputs(inputs):
    """Files and folders -> [(path, id for a .txt)]; folders are searched for .txt/.jsonl (.gz too)."""
    found = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            found += [(p, str(p.relative_to(path))) for p in sorted(path.rglob("*"))
                      if p.is_file() and re.search(r"\.(txt|jsonl)(\.gz)?$", p.name)]
        elif path.is_file():
            found.append((path, path.name))
        else:
            raise SystemExit(f"input {name} does not exist; pass .txt/.jsonl files (or .gz) or folders")
    return found


def _same_file(a, b):
    """True when two paths name one file: the same real path (symlinks, '..'), or the same inode (hard links)."""
    return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))


def _written_by_dedup(report_path, out):
    """True when report_path holds a dedup.py report of an earlier run whose OUT had the name of `out`."""
    try:
        config = json.loads(report_path.read_text()).get("config", {})
        return isinstance(config, dict) and Path(str(config.get("out", ""))).name == out.name
    except (OSError, ValueError, AttributeError):
        return False


def check_outputs(files, cfg, paths):
    """Refuse, before any work, to write over an input (however its path is spelled), into a folder that is a
    file, or over a default removed.jsonl / report.json that an earlier dedup.py run did not write."""
    flags = ["OUT (-o)", "--removed", "--report"]
    for p, flag in zip(paths, flags):
        if p.is_dir():
            raise SystemExit(f"{flag} {p} is a folder; give a file name such as {p / 'corpus.jsonl'}")
        folder = next(q for q in p.absolute().parents if q.exists())
        if not folder.is_dir():
            raise SystemExit(f"{flag} {p} cannot be written: {folder} is a file, not a folder; choose another path")
        for f, _ in files:
            if _same_file(f, p) or _same_file(f, p.with_name(p.name + ".tmp")):
                raise SystemExit(f"{flag} {p} is also an input ({f}); write the outputs outside the input "
                                 f"files and folders")
    for p, flag, given in zip(paths[1:], flags[1:], (cfg.removed, cfg.report)):
        reports = {paths[2], paths[0].parent / "report.json"}  # where an earlier run's report would be
        if not given and p.exists() and not any(_written_by_dedup(r, paths[0]) for r in reports):
            raise SystemExit(f"{p} exists and was not written by dedup.py for {paths[0].name}; pass {flag} PATH "
                             f"to put it elsewhere (or delete the file)")


def iter_documents(files, strict, problems):
    """Yield documents in input order; 'file:line: what' goes to problems for each skipped line."""
    for path, doc_id in files:
        try:
            with (gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")) as f:
                if not re.search(r"\.jsonl(\.gz)?$", path.name):
                    yield {"id": doc_id, "text": f.read().decode("utf-8", "dedup_count_replace")}
                    continue
                for line_no, raw in enumerate(f, 1):
                    if not raw.strip():
                        continue
                    try:
                        doc = json.loads(raw.decode("utf-8", "dedup_count_replace"))
                        if not isinstance(doc, dict):
                            raise ValueError("not a JSON object")
                    except ValueError as e:  # json.JSONDecodeError is a ValueError
                        problems.append(f"{path}:{line_no}: {getattr(e, 'msg', e)}")
                        if strict:
                            raise SystemExit(f"{problems[-1]}; fix the line, or drop --strict to skip such lines")
                        continue
                    if not isinstance(doc.get("text"), str):
                        raise SystemExit(f'{path}:{line_no} has no "text" string field; each JSONL line must be '
                                         f'an object with the document in "text"')
                    doc.setdefault("id", f"{path.name}:{line_no}")
                    yield doc
        except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
            raise SystemExit(f"cannot read {path} ({e}); check that it is a readable text or gzip file")


# ---------------------------------------------------------------------------------------------
# Stages 1 and 2, one document at a time (in the workers).

def clean_text(text):
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = CONTROL_RE.sub("", text.replace("\t", "    "))
    return TRAILING_SPACE_RE.sub("", text).strip("\n")


def _ngram_ids(word_hashes, n):
    """(N,) int64 word hashes -> (N-n+1,) uint64 id of each run of n words (polynomial mod 2^64)."""
    word_hashes = word_hashes.view(np.uint64)
    acc = np.zeros(len(word_hashes) - n + 1, dtype=np.uint64)
    for k in range(n):
        acc = acc * np.uint64(0x100000001B3) + word_hashes[k:len(word_hashes) - n + 1 + k]
    return acc


def quality_rule(text, words, word_hashes, th):
    """-> the first rule the cleaned text breaks, or None. words: normalised (lower-cased \\w+)."""
    raw_words = text.split()
    n = len(raw_words)
    if n < th.min_words:
        return "too_few_words"
    if n > th.max_words:
        return "too_many_words"
    if not th.min_mean_word_len <= sum(map(len, raw_words)) / n <= th.max_mean_word_len:
        return "mean_word_length"
    if (text.count("#") + text.count("...") + text.count("\u2026")) / n > th.max_symbol_word_ratio:
        return "symbol_ratio"
    if 1 - len(NO_LETTER_WORD_RE.findall(text)) / n < th.min_alpha_word_frac:
        return "non_alpha_words"
    if sum(1 for w in words if w in STOP_WORDS) < th.min_stop_words:
        return "stop_words"
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    if sum(line[0] in "-*\u2022\u25cf\u25aa\u2013" for line in lines) / len(lines) > th.max_bullet_line_frac:
        return "bullet_lines"
    if sum(line.endswith(("...", "\u2026")) for line in lines) / len(lines) > th.max_ellipsis_line_frac:
        return "ellipsis_lines"
    low = text.lower()  # substring tests run in C; count lines only when some phrase occurs at all
    if any(p in low for p in BOILERPLATE) and sum(any(p in line.lower() for p in BOILERPLATE)
                                                  for line in lines) / len(lines) > th.max_boilerplate_line_frac:
        return "boilerplate_lines"
    seen, dup_chars = set(), 0
    for line in lines:
        if len(line) >= th.min_dup_line_chars:
            dup_chars += len(line) if line in seen else 0
            seen.add(line)
    if dup_chars / sum(map(len, lines)) > th.max_dup_line_char_frac:
        return "duplicate_lines"
    # Characters covered by the most frequent n-gram, and by all n-grams seen more than once.
    word_len = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
    total = max(1, int(word_len.sum()))
    for n_words, limit in th.max_top_ngram_char_frac:
        if len(words) >= n_words:
            _, first, counts = np.unique(_ngram_ids(word_hashes, n_words), return_index=True, return_counts=True)
            top = np.argmax(counts)
            if counts[top] > 1 and counts[top] * word_len[first[top]:first[top] + n_words].sum() / total > limit:
                return f"top_{n_words}gram"
    for n_words, limit in th.max_dup_ngram_char_frac:
        if len(words) >= n_words:
            _, inverse, counts = np.unique(_ngram_ids(word_hashes, n_words), return_inverse=True, return_counts=True)
            starts = np.nonzero(counts[inverse] > 1)[0]
            covered = np.zeros(len(words) + 1, dtype=np.int64)  # +1 where a repeated n-gram starts,
            np.add.at(covered, starts, 1)                        # -1 just after it ends
            np.add.at(covered, starts + n_words, -1)
            if word_len[np.cumsum(covered[:-1]) > 0].sum() / total > limit:
                return f"duplicate_{n_words}gram"
    return None


# ---------------------------------------------------------------------------------------------
# Inputs of stages 3 and 4: normalised words -> exact key, n-gram hash set, MinHash signature.

_word_cache = {}  # word -> hash, per process: a corpus has ~1e5-1e6 distinct words
_permutations = {}  # num_perm -> datasketch's permutation parameters for SEED, drawn once


def _word_hashes(words):
    """-> (N,) int64, stable across processes and runs (blake2b; Python's hash() is salted)."""
    if len(_word_cache) > 2_000_000:
        _word_cache.clear()
    for w in set(words).difference(_word_cache):
        _word_cache[w] = int.from_bytes(hashlib.blake2b(w.encode(), digest_size=7).digest(), "little")
    return np.fromiter(map(_word_cache.__getitem__, words), dtype=np.int64, count=len(words))


def shingle_set(word_hashes, n):
    """-> sorted unique uint64 hashes of the word n-grams (murmur3's fmix64 spreads the bits)."""
    if len(word_hashes) < n:
        return np.zeros(0, dtype=np.uint64)
    h = _ngram_ids(word_hashes, n)
    for shift, mult in ((33, 0xFF51AFD7ED558CCD), (33, 0xC4CEB9FE1A85EC53)):
        h ^= h >> np.uint64(shift)
        h *= np.uint64(mult)
    return np.unique(h ^ (h >> np.uint64(33)))


def minhash_signature(shingles, num_perm):
    """(S,) uint64 shingle hashes -> (num_perm,) uint32 datasketch signature. Their low 32 bits are
    the values (hashfunc=int: hashed once, by us); update_batch in slices bounds the (S, num_perm)
    matrix it builds."""
    if num_perm not in _permutations:
        _permutations[num_perm] = MinHash(num_perm=num_perm, seed=SEED, scheme=SCHEME).permutations
    m = MinHash(num_perm=num_perm, seed=SEED, hashfunc=int, scheme=SCHEME, permutations=_permutations[num_perm])
    low32 = (shingles & np.uint64(0xFFFFFFFF)).tolist()
    for start in range(0, len(low32), 8192):
        m.update_batch(low32[start:start + 8192])
    return m.hashvalues


def analyse(text, cfg, th):
    """One document through stages 1-2 -> (raw bytes, clean bytes, rule or None, exact key, signature
    or None)."""
    raw_bytes = len(text.encode("utf-8", "replace"))  # JSON "\\ud800" decodes to a lone surrogate
    text = clean_text(text)
    words = WORD_RE.findall(text.lower())
    word_hashes = _word_hashes(words)
    rule = None if cfg.no_filters else quality_rule(text, words, word_hashes, th)
    if rule is not None:
        return raw_bytes, len(text.encode()), rule, None, None
    exact_key = hashlib.blake2b((" ".join(words) or " ".join(text.split())).encode(), digest_size=16).digest()
    shingles = shingle_set(word_hashes, cfg.ngram)
    signature = minhash_signature(shingles, cfg.num_perm) if len(shingles) else None
    return raw_bytes, len(text.encode()), None, exact_key, signature


def _analyse_batch(args):
    texts, cfg, th = args
    return [analyse(t, cfg, th) for t in texts]


def _shingles_batch(args):
    docs, n = args  # [(index, raw text)]
    return [(i, shingle_set(_word_hashes(WORD_RE.findall(clean_text(t).lower())), n)) for i, t in docs]


def _batched(items, size=64):
    items = iter(items)
    while batch := list(itertools.islice(items, size)):
        yield batch


def _ordered_map(pool, func, items, in_flight):
    """Like Pool.imap, results in input order, but reading at most in_flight batches ahead (imap's
    feeder thread would read the whole input into memory when the workers are slower than disk),
    and in this thread, so that a SystemExit for bad input reaches the user."""
    if pool is None:
        yield from map(func, items)
        return
    pending = collections.deque()
    for item in items:
        pending.append(pool.apply_async(func, (item,)))
        if len(pending) >= in_flight:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def lsh_params(threshold, num_perm, target=0.99):
    """Most rows per band (fewest false candidates) with 1-(1-s^r)^b >= target at s = threshold;
    at least 2 bands, as datasketch requires."""
    for rows in range(num_perm // 2, 0, -1):
        if 1 - (1 - threshold ** rows) ** (num_perm // rows) >= target:
            return num_perm // rows, rows
    return num_perm, 1


def _find(parent, i):
    while parent.get(i, i) != i:
        parent[i] = parent.get(parent[i], parent[i])  # path halving
        i = parent[i]
    return i


# ---------------------------------------------------------------------------------------------
# The three passes. Held in memory: per-document integers, the LSH index, and the n-gram sets of
# candidate documents that still wait for a partner.

def sketch_pass(files, cfg, th, imap, problems):
    """Pass 1: stages 1-3 and LSH candidates -> (status, removed_by, stats, candidate pairs)."""
    lsh = MinHashLSH(num_perm=cfg.num_perm, params=lsh_params(cfg.threshold, cfg.num_perm))
    permutations = MinHash(num_perm=cfg.num_perm, seed=SEED, scheme=SCHEME).permutations
    status = bytearray()  # per document: 0 kept so far, 1 filtered, 2 exact duplicate
    removed_by, first_copy, pairs = {}, {}, []  # removed_by: index -> rule, or index of the first copy
    stats = {"bytes_in": 0, "bytes_clean": 0, "rule_docs": {}, "rule_bytes": {}}
    batches = ([d["text"] for d in batch] for batch in _batched(iter_documents(files, cfg.strict, problems)))
    for batch in imap(_analyse_batch, ((texts, cfg, th) for texts in batches)):
        for raw_bytes, clean_bytes, rule, exact_key, signature in batch:
            i = len(status)
            stats["bytes_in"] += raw_bytes
            stats["bytes_clean"] += clean_bytes
            if rule is not None:
                status.append(1)
                removed_by[i] = rule
                stats["rule_docs"][rule] = stats["rule_docs"].get(rule, 0) + 1
                stats["rule_bytes"][rule] = stats["rule_bytes"].get(rule, 0) + clean_bytes
            elif exact_key in first_copy:
                status.append(2)
                removed_by[i] = first_copy[exact_key]
            else:
                status.append(0)
                first_copy[exact_key] = i
                if signature is not None:  # query before insert: the candidates are earlier documents
                    m = MinHash(seed=SEED, hashvalues=signature, permutations=permutations, scheme=SCHEME)
                    pairs += [(j, i) for j in lsh.query(m)]
                    lsh.insert(i, m, check_duplication=False)
    return status, removed_by, stats, pairs


def verify_pass(files, cfg, imap, pairs):
    """Pass 2: exact Jaccard of each candidate pair; union-find over those >= threshold.
    -> ({removed index: kept index}, {index: its best verified Jaccard}, number verified)."""
    partners, last_use = {}, {}
    for a, b in pairs:  # a < b
        partners.setdefault(b, []).append(a)
        last_use[a] = max(last_use.get(a, -1), b)
    parent, best_jaccard, sets, n_verified = {}, {}, {}, 0
    need = set(partners) | set(last_use)
    docs = ((i, d["text"]) for i, d in enumerate(iter_documents(files, cfg.strict, [])) if i in need)
    for batch in imap(_shingles_batch, ((batch, cfg.ngram) for batch in _batched(docs))):
        for i, shingles in batch:
            for a in partners.get(i, []):
                inter = len(np.intersect1d(sets[a], shingles, assume_unique=True))
                jaccard = inter / (len(sets[a]) + len(shingles) - inter)
                if jaccard >= cfg.threshold:
                    n_verified += 1
                    ra, ri = _find(parent, a), _find(parent, i)
                    parent[max(ra, ri)] = min(ra, ri)  # the root stays the earliest document
                    for x in (a, i):
                        best_jaccard[x] = max(best_jaccard.get(x, 0.0), jaccard)
                if last_use[a] == i:  # a's last partner: its set is no longer needed
                    del sets[a]
            if i in last_use:
                sets[i] = shingles
    return {i: _find(parent, i) for i in list(parent) if _find(parent, i) != i}, best_jaccard, n_verified


def write_pass(files, cfg, status, removed_by, near_of, best_jaccard, out_file, removed_file):
    """Pass 3: kept documents to OUT, removed ones with their reason to REMOVED, in input order."""
    keepers = set(near_of.values()) | {v for i, v in removed_by.items() if status[i] == 2}
    keeper_ids, counts, bytes_out = {}, {"kept": 0, "filtered": 0, "exact": 0, "near": 0}, 0
    for i, doc in enumerate(iter_documents(files, cfg.strict, [])):
        doc["text"] = clean_text(doc["text"])
        if i in keepers:  # a keeper always comes before the documents it removes
            keeper_ids[i] = doc["id"]
        if status[i] == 1:
            rec, kind = {**doc, "removed_by": removed_by[i]}, "filtered"
        elif status[i] == 2:
            rec, kind = {**doc, "removed_by": "exact_duplicate", "duplicate_of": keeper_ids[removed_by[i]]}, "exact"
        elif i in near_of:
            rec, kind = {**doc, "removed_by": "near_duplicate", "duplicate_of": keeper_ids[near_of[i]],
                         "jaccard": round(best_jaccard[i], 4)}, "near"
        else:
            out_file.write(json.dumps(doc, ensure_ascii=False) + "\n")
            bytes_out += len(doc["text"].encode())
            counts["kept"] += 1
            continue
        removed_file.write(json.dumps(rec, ensure_ascii=False) + "\n")
        counts[kind] += 1
    return counts, bytes_out


def run(inputs, cfg, th=QualityThresholds()):
    """The whole tool -> the report dict. Bad input raises SystemExit with one sentence."""
    t0 = time.time()
    if not datasketch.__version__.startswith("2."):  # 1.x and a future 3.x hash differently
        raise SystemExit(f"dedup.py needs datasketch 2.x, found {datasketch.__version__}; "
                         "pip install 'datasketch>=2,<3'")
    out = Path(cfg.out)
    paths = [out, Path(cfg.removed or out.parent / "removed.jsonl"), Path(cfg.report or out.parent / "report.json")]
    if not (0 < cfg.threshold <= 1 and cfg.num_perm >= 2 and cfg.ngram >= 1 and cfg.workers >= 1):
        raise SystemExit("--threshold must be in (0, 1], --num-perm >= 2, --ngram >= 1 and --workers >= 1")
    if len({p.resolve() for p in paths}) < 3:
        raise SystemExit(f"OUT, --removed and --report must be three different files, got "
                         f"{', '.join(map(str, paths))}")
    files = expand_inputs(inputs)
    check_outputs(files, cfg, paths)
    _bad_bytes[0] = 0
    problems, temps = [], [p.with_name(p.name + ".tmp") for p in paths]
    pool = multiprocessing.Pool(cfg.workers) if cfg.workers > 1 else None
    imap = functools.partial(_ordered_map, pool, in_flight=4 * cfg.workers)  # imap(func, items)
    try:
        status, removed_by, stats, pairs = sketch_pass(files, cfg, th, imap, problems)
        if not status:
            raise SystemExit(f"no documents in {', '.join(inputs)}; pass non-empty .txt/.jsonl files or folders")
        bad_bytes = _bad_bytes[0]  # later passes decode the same bytes again
        near_of, best_jaccard, n_verified = verify_pass(files, cfg, imap, pairs) if pairs else ({}, {}, 0)
        for p in paths:
            p.parent.mkdir(parents=True, exist_ok=True)
        with open(temps[0], "w", encoding="utf-8", errors="replace") as f_out, \
                open(temps[1], "w", encoding="utf-8", errors="replace") as f_rm:
            counts, bytes_out = write_pass(files, cfg, status, removed_by, near_of, best_jaccard, f_out, f_rm)
        seconds = time.time() - t0
        bands, rows = lsh_params(cfg.threshold, cfg.num_perm)
        report = {
            "config": asdict(cfg), "thresholds": asdict(th), "inputs": [str(p) for p, _ in files],
            "documents": {"in": len(status), "out": counts["kept"], "removed": len(status) - counts["kept"]},
            "bytes": {"in": stats["bytes_in"], "after_cleaning": stats["bytes_clean"], "out": bytes_out,
                      "filtered": sum(stats["rule_bytes"].values())},
            "stages": {"filters": {"removed": counts["filtered"],
                                   "rules": {r: {"docs": stats["rule_docs"][r], "bytes": n}
                                             for r, n in sorted(stats["rule_bytes"].items())}},
                       "exact": {"removed": counts["exact"]},
                       "near": {"removed": counts["near"], "lsh_bands": bands, "lsh_rows": rows,
                                "lsh_p_candidate_at_threshold": round(1 - (1 - cfg.threshold ** rows) ** bands, 4),
                                "candidate_pairs": len(pairs), "verified_pairs": n_verified,
                                "rejected_pairs": len(pairs) - n_verified}},
            "bad_input": {"undecodable_bytes_replaced": bad_bytes, "malformed_lines": len(problems),
                          "malformed_examples": problems[:20]},
            "seconds": round(seconds, 3), "docs_per_second": round(len(status) / max(seconds, 1e-9), 1),
        }
        temps[2].write_text(json.dumps(report, indent=2) + "\n")
        for tmp, final in zip(temps, paths):  # all three outputs appear only once all are complete
            os.replace(tmp, final)
        return report
    finally:
        if pool:
            pool.terminate()
        for tmp in temps:  # only left behind by a failed run
            tmp.unlink(missing_ok=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("inputs", nargs="+", metavar="INPUT")
    for f in fields(DedupConfig):  # every config field is a --kebab-case flag
        names = (["-o"] if f.name == "out" else []) + ["--" + f.name.replace("_", "-")]
        if isinstance(f.default, bool):
            parser.add_argument(*names, action="store_true")
        else:
            parser.add_argument(*names, type=type(f.default), default=f.default, required=f.name == "out")
    args = vars(parser.parse_args(argv))
    report = run(args.pop("inputs"), DedupConfig(**args))
    d, st, b, bad = report["documents"], report["stages"], report["bytes"], report["bad_input"]
    print(f"{d['in']} documents in, {d['out']} kept: {st['filters']['removed']} removed by filters "
          f"({100 * b['filtered'] / max(1, b['after_cleaning']):.2f}% of bytes), {st['exact']['removed']} exact and "
          f"{st['near']['removed']} near duplicates ({st['near']['candidate_pairs']} LSH candidate pairs, "
          f"{st['near']['verified_pairs']} at Jaccard >= {report['config']['threshold']})")
    print(f"{b['in']:,} bytes in, {b['out']:,} out; {report['seconds']:.1f} s, {report['docs_per_second']:.0f} docs/s")
    if bad["undecodable_bytes_replaced"] or bad["malformed_lines"]:
        print(f"bad input: {bad['undecodable_bytes_replaced']} undecodable bytes replaced, {bad['malformed_lines']} "
              f"malformed JSONL lines skipped {bad['malformed_examples'][:3]} (--strict makes them fatal)")


if __name__ == "__main__":
    main()
