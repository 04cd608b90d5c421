"""dedup.py: clean, quality-filter and deduplicate raw text before tokenization.

    python dedup.py data/scenes.jsonl -o data/corpus.jsonl --workers 2       # what pipeline.py runs
    python dedup.py my_texts/ -o data/mine/corpus.jsonl [--threshold 0.8] [--num-perm 128] [--ngram 5]
        [--workers N] [--no-filters] [--removed REMOVED.jsonl] [--report REPORT.json] [--strict]
        [--max-document-mb MB]

INPUT: .txt files (one document each, id = file name), folders (searched recursively for .txt and
.jsonl, symlinked subfolders too), .jsonl files with a "text" field (other fields kept as they are; a missing id becomes
"<file>:<line>"), and .gz versions of both. OUT: the kept documents, cleaned, in input order.
REMOVED (default removed.jsonl beside OUT): every removed document with "removed_by" (a filter rule,
"exact_duplicate" or "near_duplicate"), "duplicate_of" (the kept id) and, for near duplicates, its
best verified "jaccard". REPORT (default report.json beside OUT): counts per stage and rule, bytes
in and out, docs/s. Prints a short summary. From Python: run(inputs, DedupConfig(out=...)).
No output ever replaces an input, however the paths are spelled; a default REMOVED or REPORT replaces
an existing file only if the report.json there (or at --report) is from an earlier dedup.py run for an
OUT of the same name: anything else is refused, and --removed/--report put the file elsewhere. OUT and
REMOVED inside an input folder are refused (the next run would read them as input).

Stages, in the order a document meets them:
  1 clean: Unicode NFC, \\n line endings, control characters dropped, trailing whitespace stripped.
  2 quality filters: Gopher's rules with the thresholds in QualityThresholds, loosened where
    verse differs from web prose (short lines, speaker names repeated on every other line); they
    drop 0.05% of the bytes of Shakespeare cut into scenes. Off with --no-filters, which a warning
    names when they remove more than half of a corpus's bytes.
  3 exact duplicates: a hash of the normalised text (lower-cased words; punctuation, spacing gone).
  4 near duplicates: MinHash of the set of word n-grams with datasketch's hash family (its fmix32 and
    affine32 permutations, seed 1, taken from datasketch and applied here to a whole batch of documents at
    once in numpy: its per-document MinHash objects cost 4x more, measured), and LSH
    with bands x rows chosen so that a pair at Jaccard = threshold is a candidate with probability
    >= 0.99 (21 x 6 for 0.8). Each candidate pair is then verified with the exact Jaccard of the
    two n-gram hash sets: the MinHash estimate has a std of ~0.04 at 128 permutations and cannot
    promise that a pair below the threshold is never removed; the exact check can, at the price of
    recomputing the n-grams of candidate documents. Union-find over verified pairs; the first
    document of each cluster (input order) is kept, and every removed member (and its exact copies)
    names it in duplicate_of. Documents with fewer words than one n-gram have
    no shingles (their empty sketches would all collide) and meet only the exact stage.

Passes and memory: the input is read once and never held. Pass 1: the parent reads raw records, the
--workers processes decode, clean, filter and sketch a batch at a time, and the parent appends each
cleaned document to a work file beside OUT (OUT.work.tmp<pid>, about the size of the input) and keeps per
document a status byte, a 16-byte exact key and one 8-byte hash per LSH band (21 for 0.8). Then exact
duplicates and LSH candidates come from sorting those arrays, one band at a time: about 300 bytes per
document in all, measured (datasketch's MinHashLSH dict needs ~6.6 KB). Pass 2 recomputes the n-gram sets of
candidate documents from the work file, each freed after its last partner; pass 3 copies the work
file into OUT and REMOVED. One document costs about 30x its size at the peak (its words, hashes and
n-grams), so a document over --max-document-mb is removed as read, before those steps. Outputs follow
flags.py's rule: temporary names, renamed into place once all three are complete.
"""

import collections
import errno
import functools
import gzip
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import re
import sys
import time
import unicodedata
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from datasketch import MinHash
from datasketch.minhash import _fmix as fmix  # datasketch's MurmurHash3 finalizer: fmix(uint32|uint64 array, bits)

from flags import (config_parser, files_under, remove_stale_temporaries, same_file, stale_temporaries,
                   temporary_path)

SEED = 1             # datasketch's default permutation seed
SCHEME = "affine32"  # datasketch 2.x's default scheme: fmix32, then h -> a h + b mod 2^32 per permutation


@dataclass
class DedupConfig:
    out: str = ""             # OUT.jsonl: the kept documents, cleaned, in input order (required)
    threshold: float = 0.8    # word n-gram Jaccard at or above which two documents are duplicates, in (0, 1]
    num_perm: int = 128       # MinHash permutations, at least 2
    ngram: int = 5            # words per shingle, at least 1
    workers: int = 1          # processes that decode, clean, filter and sketch documents
    no_filters: bool = False  # skip the quality filters: only clean and deduplicate
    removed: str = ""         # removed documents with the reason; default removed.jsonl beside OUT
    report: str = ""          # counts per stage and rule, bytes, docs/s; default report.json beside OUT
    strict: bool = False      # a malformed JSONL line is fatal instead of skipped and reported
    max_document_mb: float = 16.0  # larger documents are removed as read ("too_large"): each costs ~30x its size


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
BOILERPLATE_RE = re.compile("|".join(map(re.escape, BOILERPLATE)))
CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\ufeff\ud800-\udfff]")  # + lone surrogates
WORD_RE = re.compile(r"\w+")
NON_WORD_ASCII = str.maketrans({chr(c): " " for c in range(128) if not (chr(c).isalnum() or chr(c) == "_")})
NO_LETTER_WORD_RE = re.compile(r"(?<!\S)(?:[^\s\w]|[\d_])+(?!\S)")  # whitespace-separated, no letter
NO_ASCII_LETTER_WORD_RE = re.compile(r"\s[^\sa-zA-Z]+(?!\S)")  # the same, with no ASCII letter (after a space)
BULLETS = "-*\u2022\u25cf\u25aa\u2013"
BULLET_LINE_RE = re.compile(rf"^[^\S\n]*[{BULLETS}]", re.M)
ELLIPSIS_LINE_RE = re.compile(r"(?:\.\.\.|\u2026)[^\S\n]*$", re.M)
KEPT, EXACT, NEAR, FILTERED = 0, 1, 2, 3  # status of a document; FILTERED + k: removed by the k-th rule seen


# ---------------------------------------------------------------------------------------------
# Reading: the parent yields raw records in input order; the workers decode and parse them.

def expand_inputs(inputs):
    """Files and folders -> [(path, id for a .txt)]; folders are searched for .txt/.jsonl (.gz too), symlinked
    subfolders included."""
    found = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            found += [(p, str(p.relative_to(path))) for p in files_under(path)
                      if re.search(r"\.(txt|jsonl)(\.gz)?$", p.name)]
        elif path.is_file():
            found.append((path, path.name))
        else:
            raise SystemExit(f"input {name} {'is not a file' if path.exists() else 'does not exist'}; pass "
                             f".txt/.jsonl files (or .gz) or folders")
    return found


def _written_by_dedup(report_path, out):
    """True when report_path holds a dedup.py report of an earlier run whose OUT had the name of `out`."""
    try:
        config = json.loads(report_path.read_text()).get("config", {})
        return isinstance(config, dict) and Path(str(config.get("out", ""))).name == out.name
    except (OSError, ValueError, AttributeError):
        return False


def check_outputs(files, folders, cfg, paths, temps):
    """Refuse, before any work, to write over an input (however its path is spelled: also the temporaries
    that are deleted before writing), into a folder that is a file, or over a default removed.jsonl /
    report.json that an earlier dedup.py run did not write, or a .jsonl into an input folder.
    paths: OUT, REMOVED, REPORT, the work file."""
    flags = ["OUT (-o)", "--removed", "--report", "OUT's work file"]
    walked = {f.resolve().parent for folder in folders for f in files_under(folder)}  # linked-in folders too
    for p, tmp, flag in zip(paths, temps, flags):
        if p.is_dir():
            raise SystemExit(f"{flag} {p} is a folder; give a file name such as {p / 'corpus.jsonl'}")
        folder = next(q for q in p.absolute().parents if q.exists())
        if not folder.is_dir():
            raise SystemExit(f"{flag} {p} cannot be written: {folder} is a file, not a folder; choose another path")
        ours = [p, tmp, *map(Path, stale_temporaries(p))]  # listed once, not once per input file
        for f, _ in files:
            if any(same_file(f, q) for q in ours):
                raise SystemExit(f"{flag} {p} is also an input ({f}); write the outputs outside the input "
                                 f"files and folders")
        for folder in folders:  # a .jsonl written there would be read back as input by the next run
            if p.name.endswith(".jsonl") and (p.parent.resolve().is_relative_to(folder.resolve())
                                              or p.parent.resolve() in walked):
                raise SystemExit(f"{flag} {p} is inside the input folder {folder}, so the next run would read it "
                                 f"as input; write the outputs outside the input folders")
    reports = {paths[2], paths[0].parent / "report.json"}  # where an earlier run's report would be
    for p, flag, given in zip(paths[1:], flags[1:], (cfg.removed, cfg.report)):
        if not given and p.exists() and not any(_written_by_dedup(r, paths[0]) for r in reports):
            raise SystemExit(f"{p} exists and was not written by dedup.py for {paths[0].name}; pass {flag} PATH "
                             f"to put it elsewhere (or delete the file)")


def read_records(files):
    """Yield (where, default id, is JSONL, raw bytes) in input order: a .txt file whole, a JSONL file per line."""
    for path, doc_id in files:
        try:
            with (gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")) as f:
                if not re.search(r"\.jsonl(\.gz)?$", path.name):
                    yield str(path), doc_id, False, f.read()
                    continue
                for line_no, raw in enumerate(f, 1):
                    if raw.strip():
                        yield f"{path}:{line_no}", f"{path.name}:{line_no}", True, raw
        except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
            raise SystemExit(f"cannot read {path} ({e}); check that it is a readable text or gzip file")


def decode_utf8(raw):
    """bytes -> (text, number of undecodable bytes); each bad run becomes U+FFFD, as errors="replace" does."""
    parts, bad, start, view = [], 0, 0, memoryview(raw)
    while True:
        try:
            parts.append(str(view[start:], "utf-8"))
            return "".join(parts), bad
        except UnicodeDecodeError as e:  # e.start, e.end: the bad run, relative to view[start:]
            parts.append(str(view[start:start + e.start], "utf-8") + "\ufffd")
            bad += e.end - e.start
            start += e.end


def parse_record(where, doc_id, is_jsonl, raw):
    """-> (document dict, undecodable bytes, problem or None); a problem is ("skip" | "fatal", sentence)."""
    text, bad = decode_utf8(raw)
    if not is_jsonl:
        return {"id": doc_id, "text": text}, bad, None
    try:
        doc = json.loads(text)
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:  # json.JSONDecodeError is a ValueError
        return None, bad, ("skip", f"{where}: {getattr(e, 'msg', e)}")
    if not isinstance(doc.get("text"), str):
        return None, bad, ("fatal", f'{where} has no "text" string field; each JSONL line must be an object '
                                    f'with the document in "text"')
    doc.setdefault("id", doc_id)
    return doc, bad, None


# ---------------------------------------------------------------------------------------------
# Stages 1 and 2, one document at a time (in the workers).

def clean_text(text):
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = CONTROL_RE.sub("", text.replace("\t", "    "))
    return "\n".join(map(str.rstrip, text.split("\n"))).strip("\n")  # trailing whitespace; 7x faster than a regex


def _ngram_ids(word_hashes, n, memo=None):
    """(N,) int64 word hashes -> (N-n+1,) uint64 id of each run of n words: polynomial mod 2^64, so the ids
    of n words are those of n - 1 words times the prime plus the next word. memo {n: ids} keeps each n built."""
    memo = {} if memo is None else memo
    memo.setdefault(1, word_hashes.view(np.uint64))
    for k in range(len(memo) + 1, n + 1):  # memo holds 1 .. len(memo)
        memo[k] = memo[k - 1][:-1] * np.uint64(0x100000001B3) + memo[1][k - 1:]
    return memo[n]


def _repeated(ids):
    """(M,) n-gram ids -> (M,) bool: the n-gram at this position occurs more than once (a sort, no hashing)."""
    order = np.argsort(ids)
    same = ids[order[1:]] == ids[order[:-1]]  # sorted neighbours that are equal
    repeated = np.zeros(len(ids), dtype=bool)
    if same.any():
        repeated[order[1:][same]] = True
        repeated[order[:-1][same]] = True
    return repeated


def quality_rule(text, words, word_hashes, th, ngrams=None):
    """Gopher's rules with the thresholds in `th`, in order -> the first rule the cleaned text breaks, or None.
    words: normalised (lower-cased \\w+) with their hashes; ngrams: a memo of _ngram_ids that the caller may
    reuse. The rules that cleared_by_bounds proves kept are not computed."""
    ngrams = {} if ngrams is None else ngrams
    raw_words = text.split()
    n = len(raw_words)
    if n < th.min_words:
        return "too_few_words"
    if n > th.max_words:
        return "too_many_words"
    if not th.min_mean_word_len <= len("".join(raw_words)) / n <= th.max_mean_word_len:  # join: faster than sum
        return "mean_word_length"
    if (text.count("#") + text.count("...") + text.count("\u2026")) / n > th.max_symbol_word_ratio:
        return "symbol_ratio"
    lines = [line for line in map(str.strip, text.split("\n")) if line]
    word_len = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
    total = max(1, int(word_len.sum()))  # characters in words, the measure of the repetition rules
    cleared = cleared_by_bounds(text, n, lines, word_hashes, word_len, th, ngrams)
    if "non_alpha_words" not in cleared and 1 - len(NO_LETTER_WORD_RE.findall(text)) / n < th.min_alpha_word_frac:
        return "non_alpha_words"
    stop_words = (w for w in words if w in STOP_WORDS)  # stops counting at the threshold
    if sum(1 for _ in itertools.islice(stop_words, th.min_stop_words)) < th.min_stop_words:
        return "stop_words"
    if "bullet_lines" not in cleared and len(BULLET_LINE_RE.findall(text)) / len(lines) > th.max_bullet_line_frac:
        return "bullet_lines"
    if "ellipsis_lines" not in cleared and \
            len(ELLIPSIS_LINE_RE.findall(text)) / len(lines) > th.max_ellipsis_line_frac:
        return "ellipsis_lines"
    if "boilerplate_lines" not in cleared and \
            sum(1 for line in lines if BOILERPLATE_RE.search(line.lower())) / len(lines) > th.max_boilerplate_line_frac:
        return "boilerplate_lines"
    long_lines = [line for line in lines if len(line) >= th.min_dup_line_chars]  # plays repeat "Ham." by design
    if (len("".join(long_lines)) - len("".join(set(long_lines)))) / len("".join(lines)) > th.max_dup_line_char_frac:
        return "duplicate_lines"
    # Repetition. A repeated n-gram holds repeated shorter ones, so the share of characters inside repeated
    # n-grams (coverage) falls with n: once a shorter n's is known, it bounds the longer ones.
    coverage = 1.0
    for n_words, limit in th.max_top_ngram_char_frac:  # the characters of the most frequent n-gram's copies
        rule = f"top_{n_words}gram"
        if rule not in cleared and len(words) >= n_words:
            ids = _ngram_ids(word_hashes, n_words, ngrams)
            sorted_ids = np.sort(ids)
            run_starts = np.flatnonzero(np.concatenate(([True], sorted_ids[1:] != sorted_ids[:-1])))
            counts = np.diff(np.append(run_starts, len(ids)))
            top = np.argmax(counts)  # the most frequent, the smallest id among equals
            first = np.argmax(ids == sorted_ids[run_starts[top]])  # its first position
            if counts[top] == 1:  # no n-gram repeats
                coverage = 0.0
            elif counts[top] * word_len[first:first + n_words].sum() / total > limit:
                return rule
    for n_words, limit in th.max_dup_ngram_char_frac:  # the characters inside n-grams that occur twice or more
        rule = f"duplicate_{n_words}gram"
        if rule not in cleared and len(words) >= n_words and coverage > limit:
            starts = np.flatnonzero(_repeated(_ngram_ids(word_hashes, n_words, ngrams)))
            covered = np.zeros(len(words) + 1, dtype=np.int64)  # +1 where a repeated n-gram starts,
            covered[starts] += 1                                 # -1 just after it ends
            covered[starts + n_words] -= 1
            coverage = word_len[np.cumsum(covered[:-1]) > 0].sum() / total
            if coverage > limit:
                return rule
    return None


def cleared_by_bounds(text, n, lines, word_hashes, word_len, th, ngrams):
    """The speed shortcut of quality_rule, apart from the rules: -> the rules that cheap counts prove the text
    keeps, so quality_rule skips their regexes and sorts (test_all.py checks that it decides alike without).
    Each count bounds the rule's own from above: a word with no letter has no ASCII letter; a bullet or an
    ellipsis line holds a bullet or an ellipsis; a boilerplate line holds a phrase. For the n-grams: no n-gram
    with n >= n0 occurs more often than the fullest of >= 4 hash buckets of n0-grams holds, nor spans more
    characters than the longest run of n words; when every n0-gram is distinct, no longer one repeats."""
    cleared = set()
    if 1 - len(NO_ASCII_LETTER_WORD_RE.findall(" " + text)) / n >= th.min_alpha_word_frac:
        cleared.add("non_alpha_words")
    if sum(map(text.count, BULLETS)) / len(lines) <= th.max_bullet_line_frac:
        cleared.add("bullet_lines")
    if (text.count("...") + text.count("\u2026")) / len(lines) <= th.max_ellipsis_line_frac:
        cleared.add("ellipsis_lines")
    low = text.lower()  # substring tests run in C
    if not any(p in low for p in BOILERPLATE):
        cleared.add("boilerplate_lines")
    n0 = min(n_words for n_words, _ in th.max_top_ngram_char_frac + th.max_dup_ngram_char_frac)
    if len(word_hashes) < n0:
        return cleared
    buckets = _ngram_ids(word_hashes, n0, ngrams) & np.uint64((1 << (4 * len(word_hashes)).bit_length()) - 1)
    most = int(np.bincount(buckets.astype(np.intp)).max())
    chars_before = np.concatenate(([0], np.cumsum(word_len)))
    for n_words, limit in th.max_top_ngram_char_frac:
        if most == 1 or len(word_len) < n_words or \
                most * (chars_before[n_words:] - chars_before[:-n_words]).max() <= limit * chars_before[-1]:
            cleared.add(f"top_{n_words}gram")
    if most == 1:
        cleared |= {f"duplicate_{n_words}gram" for n_words, _ in th.max_dup_ngram_char_frac}
    return cleared


# ---------------------------------------------------------------------------------------------
# Inputs of stages 3 and 4: normalised words -> exact key, n-gram hash set, MinHash signature, band keys.

class _WordHashes(dict):
    """word -> 56-bit hash, stable across processes and runs (blake2b; Python's hash() is salted), each word
    hashed once per process: a hit is one dict lookup in C, a miss lands in __missing__."""
    def __missing__(self, word):
        if len(self) > 2_000_000:  # a corpus has ~1e5-1e6 distinct words; this bounds a pathological one
            self.clear()
        value = self[word] = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=7).digest(), "little")
        return value


_word_cache = _WordHashes()
def _word_hashes(words):
    """-> (N,) int64 word hashes."""
    return np.fromiter(map(_word_cache.__getitem__, words), dtype=np.int64, count=len(words))


def shingle_set(word_hashes, n):
    """-> sorted unique uint64 hashes of the word n-grams."""
    if len(word_hashes) < n:
        return np.zeros(0, dtype=np.uint64)
    h = np.sort(fmix(_ngram_ids(word_hashes, n), 64))  # a sort: np.unique is several times slower here
    return h[np.concatenate(([True], h[1:] != h[:-1]))]


@functools.lru_cache(maxsize=None)
def permutations(num_perm):
    """-> (a, b), two (num_perm,) uint32 arrays: datasketch's own affine32 permutations h -> a h + b mod 2^32
    for SEED, the ones every MinHash(seed=SEED, scheme=SCHEME) applies."""
    a, b = MinHash(num_perm=num_perm, seed=SEED, scheme=SCHEME).permutations
    return a, b


def minhash_signatures(shingle_sets, num_perm, block=4096):
    """[(S_d,) uint64, none empty, repeats allowed] -> (D, num_perm) uint32, each row datasketch's MinHash
    (affine32) of the set's low 32 bits: h = fmix32(x), value_k = min over the set of (a_k h + b_k) mod 2^32.
    All sets of a batch go through one (num_perm, block) product at a time, then a minimum over each
    document's segment of columns (along the contiguous axis: 3-4x faster than rows)."""
    a, b = permutations(num_perm)
    h = fmix(np.concatenate(shingle_sets).astype(np.uint32), 32)  # astype keeps the low 32 bits
    doc = np.repeat(np.arange(len(shingle_sets)), [len(s) for s in shingle_sets])
    signatures = np.full((len(shingle_sets), num_perm), np.iinfo(np.uint32).max, dtype=np.uint32)
    for start in range(0, len(h), block):
        values = np.multiply.outer(a, h[start:start + block])  # (num_perm, n), wrapping mod 2^32
        values += b[:, None]
        d = doc[start:start + block]
        seg = np.flatnonzero(np.concatenate(([True], d[1:] != d[:-1])))  # where each document's columns begin
        rows = d[seg]  # distinct within a block, so plain fancy indexing is safe
        signatures[rows] = np.minimum(signatures[rows], np.minimum.reduceat(values, seg, axis=1).T)
    return signatures


def band_keys(signatures, bands, rows):
    """(D, num_perm) uint32 -> (D, bands) uint64: one hash of each band's rows values. Documents agreeing on a
    band's values share its key; different values collide with probability 2^-64 (a spurious candidate that
    the exact Jaccard check then rejects)."""
    values = signatures[:, :bands * rows].reshape(len(signatures), bands, rows).astype(np.uint64)
    key = np.zeros(values.shape[:2], dtype=np.uint64)
    for r in range(rows):
        key = key * np.uint64(0x100000001B3) + values[:, :, r]
    return fmix(key, 64)


def lsh_params(threshold, num_perm, target=0.99):
    """Most rows per band (fewest false candidates) with 1-(1-s^r)^b >= target at s = threshold;
    at least 2 bands, as datasketch requires."""
    for rows in range(num_perm // 2, 0, -1):
        if 1 - (1 - threshold ** rows) ** (num_perm // rows) >= target:
            return num_perm // rows, rows
    return num_perm, 1


def _words(text):
    """-> (normalised words: the lower-cased \\w+ runs, their hashes). ASCII text takes a path twice as fast
    with the same result: every character that is not a word character becomes a space, then split."""
    low = text.lower()
    words = low.translate(NON_WORD_ASCII).split() if low.isascii() else WORD_RE.findall(low)
    return words, _word_hashes(words)


def sketch_batch(args):
    """Pass 1 for a batch of raw records, in a worker: parse, clean, filter, exact key, MinHash, band keys."""
    records, cfg, th = args
    out = {"lines": [], "rules": [], "keys": [], "sketched": [], "problems": [], "bytes_in": 0, "bytes_clean": 0,
           "bad_bytes": 0, "rule_bytes": collections.Counter()}
    shingle_sets = []
    for record in records:
        doc, bad, problem = parse_record(*record)
        out["bad_bytes"] += bad
        if problem:
            out["problems"].append(problem)
            continue
        out["bytes_in"] += len(doc["text"].encode("utf-8", "replace"))  # JSON "\ud800" is a lone surrogate
        too_large = len(record[-1]) > cfg.max_document_mb * 1e6  # the steps below cost ~30x its size in memory
        text = doc["text"] = doc["text"] if too_large else clean_text(doc["text"])
        out["lines"].append(json.dumps(doc, ensure_ascii=False).encode("utf-8", "replace") + b"\n")
        clean_bytes = len(text.encode("utf-8", "replace"))
        out["bytes_clean"] += clean_bytes
        words, word_hashes = _words("" if too_large else text)
        ngrams = {}  # n -> ids of every run of n words, shared by the filters and the shingles
        rule = "too_large" if too_large else None if cfg.no_filters else quality_rule(text, words, word_hashes,
                                                                                      th, ngrams)
        out["rules"].append(rule)
        if rule is not None:
            out["rule_bytes"][rule] += clean_bytes
            out["keys"].append(bytes(16))
            continue
        out["keys"].append(hashlib.blake2b((" ".join(words) or " ".join(text.split())).encode(),
                                           digest_size=16).digest())
        if len(words) >= cfg.ngram:  # the n-gram hashes with repeats: a repeat cannot change a minimum
            out["sketched"].append(len(out["rules"]) - 1)
            shingle_sets.append(fmix(_ngram_ids(word_hashes, cfg.ngram, ngrams), 64))
    out["keys"] = np.frombuffer(b"".join(out["keys"]), dtype=np.uint64).reshape(-1, 2)  # (docs, 2)
    bands, rows = lsh_params(cfg.threshold, cfg.num_perm)
    out["bands"] = (band_keys(minhash_signatures(shingle_sets, cfg.num_perm), bands, rows) if shingle_sets
                    else np.zeros((0, bands), dtype=np.uint64))  # (sketched docs, bands)
    return out


def shingles_batch(args):
    """Pass 2, in a worker: [(index, work file line)] -> [(index, n-gram hash set)]."""
    items, n = args
    return [(i, shingle_set(_words(json.loads(line)["text"])[1], n)) for i, line in items]


def _batched(items, max_items=256, max_bytes=1 << 20):
    """Lists of consecutive items (tuples ending in bytes) of at most max_items and about max_bytes."""
    batch, size = [], 0
    for item in items:
        batch.append(item)
        size += len(item[-1])
        if len(batch) >= max_items or size >= max_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _ordered_map(pool, func, items, in_flight):
    """Like map over the worker processes, results in input order, reading at most in_flight batches ahead
    (Executor.map would read the whole input into memory when the workers are slower than disk)."""
    if pool is None:
        yield from map(func, items)
        return
    pending = collections.deque()
    for item in items:
        pending.append(pool.submit(func, item))
        if len(pending) >= in_flight:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _find(parent, i):
    while parent.get(i, i) != i:
        parent[i] = parent.get(parent[i], parent[i])  # path halving
        i = parent[i]
    return i


# ---------------------------------------------------------------------------------------------
# The three passes. Held in memory: per document a status byte and a keeper index, the exact keys and
# band keys until pass 1 ends, and the n-gram sets of candidate documents that still wait for a partner.

def sketch_pass(files, cfg, th, imap, work):
    """Pass 1: stages 1-3 and the LSH candidates of stage 4; cleaned documents appended to `work`.
    -> (status (N,) uint8, keeper (N,) int64, {status: rule}, candidate pairs (P, 2) earlier first, stats)."""
    status, keys, bands, sketched, rule_codes = [], [], [], [], {}
    stats = {"bytes_in": 0, "bytes_clean": 0, "bad_bytes": 0, "rule_bytes": collections.Counter(), "problems": []}
    n_docs = 0
    for out in imap(sketch_batch, ((batch, cfg, th) for batch in _batched(read_records(files)))):
        for kind, sentence in out["problems"]:
            if kind == "fatal" or cfg.strict:
                raise SystemExit(sentence if kind == "fatal" else
                                 f"{sentence}; fix the line, or drop --strict to skip such lines")
            stats["problems"].append(sentence)
        work.writelines(out["lines"])
        status.append(np.array([KEPT if r is None else rule_codes.setdefault(r, FILTERED + len(rule_codes))
                                for r in out["rules"]], dtype=np.uint8))
        keys.append(out["keys"])
        bands.append(out["bands"])
        sketched.append(np.array(out["sketched"], dtype=np.int64) + n_docs)
        n_docs += len(out["rules"])
        for k in ("bytes_in", "bytes_clean", "bad_bytes", "rule_bytes"):
            stats[k] += out[k]
    status = np.concatenate(status) if status else np.zeros(0, dtype=np.uint8)
    keeper = np.full(len(status), -1, dtype=np.int64)  # the kept document a removed duplicate is a copy of
    if n_docs:
        exact_duplicates(np.concatenate(keys), status, keeper)
    pairs = candidate_pairs(bands, sketched, status)
    return status, keeper, {code: rule for rule, code in rule_codes.items()}, pairs, stats


def exact_duplicates(keys, status, keeper):
    """Stage 3 on (N, 2) uint64 keys: of the documents still kept, the first with each key (input order)
    stays; later ones get status EXACT and its index as keeper."""
    docs = np.flatnonzero(status == KEPT)
    order = np.lexsort((docs, keys[docs, 1], keys[docs, 0]))  # by key, then input order
    docs, sorted_keys = docs[order], keys[docs[order]]
    new_key = np.concatenate(([True], (sorted_keys[1:] != sorted_keys[:-1]).any(axis=1)))
    first = docs[np.maximum.accumulate(np.where(new_key, np.arange(len(docs)), 0))]
    copies = first != docs
    status[docs[copies]] = EXACT
    keeper[docs[copies]] = first[copies]


def candidate_pairs(bands, sketched, status):
    """LSH without an index: per band, sort the band keys of the documents still kept; every two in a run of
    equal keys are a candidate. bands: [(n, bands) uint64], sketched: [(n,) document index] per batch.
    -> (P, 2) int64 unique pairs (earlier, later): the pairs MinHashLSH query-before-insert would return."""
    docs = np.concatenate(sketched) if sketched else np.zeros(0, dtype=np.int64)
    alive = status[docs] == KEPT
    docs, pairs = docs[alive], [np.zeros((0, 2), dtype=np.int64)]
    for band in range(bands[0].shape[1] if bands else 0):
        key = np.concatenate([k[:, band] for k in bands])[alive]
        order = np.argsort(key, kind="stable")  # equal keys stay in input order
        key = key[order]
        pos, step = np.flatnonzero(key[1:] == key[:-1]), 1  # sorted positions p and p + step share a key
        while len(pos):
            pairs.append(np.stack([docs[order[pos]], docs[order[pos + step]]], axis=1))
            step += 1
            pos = pos[pos + step < len(key)]
            pos = pos[key[pos + step] == key[pos]]  # sorted: equal ends mean one run
    return np.unique(np.concatenate(pairs), axis=0)


def verify_pass(work, cfg, imap, pairs):
    """Pass 2: exact Jaccard of each candidate pair; union-find over those >= threshold.
    -> ({removed index: kept index}, {index: its best verified Jaccard}, number verified)."""
    partners, last_use = {}, {}
    for a, b in pairs.tolist():  # a < b
        partners.setdefault(b, []).append(a)
        last_use[a] = max(last_use.get(a, -1), b)
    parent, best_jaccard, sets, n_verified = {}, {}, {}, 0
    need = set(partners) | set(last_use)
    work.seek(0)
    lines = ((i, line) for i, line in enumerate(work) if i in need)
    for batch in imap(shingles_batch, ((batch, cfg.ngram) for batch in _batched(lines))):
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


def write_pass(work, status, keeper, rule_names, best_jaccard, out_file, removed_file):
    """Pass 3: the work file's kept lines to OUT as they are, removed ones with their reason to REMOVED."""
    is_keeper = np.zeros(len(status), dtype=bool)
    is_keeper[keeper[keeper >= 0]] = True
    keeper_ids, counts, bytes_removed = {}, {"kept": 0, "filtered": 0, "exact": 0, "near": 0}, 0
    work.seek(0)
    for i, line in enumerate(work):
        if is_keeper[i]:  # a keeper always comes before the documents it removes (and may itself be removed)
            keeper_ids[i] = json.loads(line)["id"]
        if status[i] == KEPT:
            out_file.write(line)
            counts["kept"] += 1
            continue
        doc = json.loads(line)
        if status[i] == EXACT:
            rec, kind = {**doc, "removed_by": "exact_duplicate", "duplicate_of": keeper_ids[keeper[i]]}, "exact"
        elif status[i] == NEAR:
            rec, kind = {**doc, "removed_by": "near_duplicate", "duplicate_of": keeper_ids[keeper[i]],
                         "jaccard": round(best_jaccard[i], 4)}, "near"
        else:
            rec, kind = {**doc, "removed_by": rule_names[status[i]]}, "filtered"
        removed_file.write(json.dumps(rec, ensure_ascii=False).encode("utf-8", "replace") + b"\n")
        counts[kind] += 1
        bytes_removed += len(doc["text"].encode("utf-8", "replace"))
    return counts, bytes_removed


def filter_warnings(rule_bytes, bytes_clean, most=0.5):
    """-> a warning when the quality rules removed more than `most` of the bytes: the corpus is probably not
    web prose (legal text, code, tables, verse repeat their own phrases), and a model trained on the rest
    would see little of it."""
    removed = sum(n for rule, n in rule_bytes.items() if rule != "too_large")
    if removed <= most * bytes_clean:
        return []
    top = ", ".join(f"{rule} {n / bytes_clean:.0%}" for rule, n in rule_bytes.most_common(3))
    return [f"warning: the quality filters removed {removed / bytes_clean:.0%} of the corpus's bytes ({top}); if "
            f"the corpus is meant to read like this, run again with --no-filters to keep it"]


def run(inputs, cfg, th=QualityThresholds()):
    """The whole tool -> the report dict. Bad input raises SystemExit with one sentence."""
    t0 = time.time()
    if not cfg.out:
        raise SystemExit("no OUT given; pass -o OUT.jsonl, the file for the kept documents")
    if not (0 < cfg.threshold <= 1 and cfg.num_perm >= 2 and cfg.ngram >= 1 and cfg.workers >= 1
            and 0 < cfg.max_document_mb < math.inf):
        raise SystemExit("--threshold must be in (0, 1], --num-perm >= 2, --ngram >= 1, --workers >= 1 and "
                         "--max-document-mb > 0")
    out = Path(cfg.out)
    paths = [out, Path(cfg.removed or out.parent / "removed.jsonl"), Path(cfg.report or out.parent / "report.json")]
    if len({p.resolve() for p in paths}) < 3:
        raise SystemExit(f"OUT, --removed and --report must be three different files, got "
                         f"{', '.join(map(str, paths))}")
    paths.append(out.with_name(out.name + ".work"))  # the work file, a temporary only
    temps = [Path(temporary_path(p)) for p in paths]
    files = expand_inputs(inputs)
    check_outputs(files, [Path(p) for p in inputs if Path(p).is_dir()], cfg, paths, temps)
    for p in paths:
        remove_stale_temporaries(p)
    pool, cpu0 = None, _cpu_seconds()
    try:
        try:
            for p in paths:
                p.parent.mkdir(parents=True, exist_ok=True)
            work = open(temps[3], "w+b")  # never renamed: deleted at the end
        except OSError as e:
            raise SystemExit(f"cannot write beside {e.filename or out} ({e.strerror}); choose a folder you can write to")
        # a process pool that notices a dead worker (BrokenProcessPool); multiprocessing.Pool would wait forever
        pool = ProcessPoolExecutor(cfg.workers, mp_context=multiprocessing.get_context("fork")) \
            if cfg.workers > 1 else None
        imap = functools.partial(_ordered_map, pool, in_flight=2 * cfg.workers)  # imap(func, items)
        with work:
            status, keeper, rule_names, pairs, stats = sketch_pass(files, cfg, th, imap, work)
            t1 = time.time()
            if not len(status):
                raise SystemExit(f"no documents in {', '.join(inputs)}; pass non-empty .txt/.jsonl files or folders")
            near_of, best_jaccard, n_verified = verify_pass(work, cfg, imap, pairs) if len(pairs) else ({}, {}, 0)
            for i, k in near_of.items():
                status[i], keeper[i] = NEAR, k
            # an exact copy of a document removed as a near duplicate is a copy of that one's kept twin
            copies = np.flatnonzero(status == EXACT)
            twin_removed = status[keeper[copies]] == NEAR
            keeper[copies[twin_removed]] = keeper[keeper[copies[twin_removed]]]
            t2 = time.time()
            with open(temps[0], "wb") as f_out, open(temps[1], "wb") as f_rm:
                counts, bytes_removed = write_pass(work, status, keeper, rule_names, best_jaccard, f_out, f_rm)
        if pool:  # joined, so that their CPU time is counted
            pool.shutdown()
        seconds, cpu = time.time() - t0, [b - a for a, b in zip(cpu0, _cpu_seconds())]
        bands, rows = lsh_params(cfg.threshold, cfg.num_perm)
        rule_docs = collections.Counter(rule_names[s] for s in status[status >= FILTERED].tolist())
        report = {
            "config": asdict(cfg), "thresholds": asdict(th), "inputs": [str(p) for p, _ in files],
            "documents": {"in": len(status), "out": counts["kept"], "removed": len(status) - counts["kept"]},
            "bytes": {"in": stats["bytes_in"], "after_cleaning": stats["bytes_clean"],
                      "out": stats["bytes_clean"] - bytes_removed, "filtered": sum(stats["rule_bytes"].values())},
            "stages": {"filters": {"removed": counts["filtered"],
                                   "rules": {r: {"docs": rule_docs[r], "bytes": n}
                                             for r, n in sorted(stats["rule_bytes"].items())}},
                       "exact": {"removed": counts["exact"]},
                       "near": {"removed": counts["near"], "lsh_bands": bands, "lsh_rows": rows,
                                "lsh_p_candidate_at_threshold": round(1 - (1 - cfg.threshold ** rows) ** bands, 4),
                                "candidate_pairs": len(pairs), "verified_pairs": n_verified,
                                "rejected_pairs": len(pairs) - n_verified}},
            "bad_input": {"undecodable_bytes_replaced": stats["bad_bytes"], "malformed_lines": len(stats["problems"]),
                          "malformed_examples": stats["problems"][:20]},
            "seconds": round(seconds, 3), "docs_per_second": round(len(status) / max(seconds, 1e-9), 1),
            "pass_seconds": {"sketch": round(t1 - t0, 3), "verify": round(t2 - t1, 3), "write": round(seconds - t2 + t0, 3)},
            "cpu_seconds": {"main": round(cpu[0], 3), "workers": round(cpu[1], 3)},
            "warnings": filter_warnings(stats["rule_bytes"], stats["bytes_clean"]),
        }
        for warning in report["warnings"]:
            print(warning, file=sys.stderr)
        temps[2].write_text(json.dumps(report, indent=2) + "\n")
        for tmp, final in zip(temps, paths[:3]):  # all three outputs appear only once all are complete
            os.replace(tmp, final)
        return report
    except BrokenProcessPool:  # the kernel's OOM killer sends SIGKILL, which no worker can catch
        raise SystemExit(f"a --workers process died (most likely killed by the system for want of memory); "
                         f"nothing was written: run again with fewer --workers (now {cfg.workers}) or more memory")
    except OSError as e:  # read_records turns read errors into sentences: this is a fork or a write
        if e.errno == errno.EAGAIN and pool:
            raise SystemExit(f"--workers {cfg.workers}: cannot start that many processes ({e.strerror}); lower it")
        raise SystemExit(f"cannot write the outputs beside {out} ({e.strerror}); nothing was written: free space "
                         f"there (they take about twice the input) or choose another folder with -o") from None
    finally:
        if pool:
            pool.shutdown(wait=False, cancel_futures=True)
        for tmp in temps:  # left behind only by a failed run (and a killed run's are replaced by the next)
            tmp.unlink(missing_ok=True)


def _cpu_seconds():
    """-> (this process, its finished child processes): user + system CPU seconds."""
    t = os.times()
    return t.user + t.system, t.children_user + t.children_system


def main(argv=None):
    parser = config_parser(DedupConfig, __doc__, aliases={"out": ["-o"]})
    parser.allow_abbrev = False  # a mistyped flag is an error, not a guess
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help=".txt and .jsonl files (or .gz), folders of them")
    args = vars(parser.parse_args(argv))
    report = run(args.pop("inputs"), DedupConfig(**args))
    d, st, b, bad = report["documents"], report["stages"], report["bytes"], report["bad_input"]
    print(f"{d['in']} documents in, {d['out']} kept: {st['filters']['removed']} removed by filters "
          f"({100 * b['filtered'] / max(1, b['after_cleaning']):.2f}% of bytes), {st['exact']['removed']} exact and "
          f"{st['near']['removed']} near duplicates ({st['near']['candidate_pairs']} LSH candidate pairs, "
          f"{st['near']['verified_pairs']} at Jaccard >= {report['config']['threshold']})")
    print(f"{b['in']:,} bytes in, {b['out']:,} out; {report['seconds']:.1f} s, {report['docs_per_second']:.0f} docs/s; "
          f"CPU s: main process {report['cpu_seconds']['main']:.1f}, workers {report['cpu_seconds']['workers']:.1f}")
    too_large = st["filters"]["rules"].get("too_large")
    if too_large:
        print(f"note: {too_large['docs']} documents over --max-document-mb {report['config']['max_document_mb']} "
              f"were removed as read (removed_by \"too_large\"); raise the flag to process them, at about 30x "
              f"their size in memory")
    if bad["undecodable_bytes_replaced"] or bad["malformed_lines"]:
        print(f"bad input: {bad['undecodable_bytes_replaced']} undecodable bytes replaced, {bad['malformed_lines']} "
              f"malformed JSONL lines skipped {bad['malformed_examples'][:3]} (--strict makes them fatal)")


if __name__ == "__main__":
    try:
        main()
        sys.stdout.flush()  # a closed pipe shows here, while it can still be caught
    except BrokenPipeError:  # dedup.py ... | head -1: the reader left, as Unix tools end quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit would complain
