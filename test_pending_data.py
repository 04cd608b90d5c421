"""Pending tests of the data stages (dedup.py, tokenize_data.py), to be folded into test_all.py.

    python -m pytest -q test_pending_data.py

They read only the repository (testdata/hamlet.txt) and the temporary folders they make.
"""
import json
import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
import dedup  # noqa: E402
import tokenize_data  # noqa: E402

PROSE = ("the king of denmark walks on the platform at night and speaks with the guard about the ghost "
         "that was seen there before the cock crew and the morning came over the hill ")


def _docs(n, words=60, seed=0):
    """n distinct documents of ordinary English words (they pass dedup's quality filters)."""
    rng = np.random.default_rng(seed)
    vocab = PROSE.split()
    return [{"id": f"d{i}", "text": " ".join(rng.choice(vocab, words)) + "."} for i in range(n)]


def _write_jsonl(path, docs):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


def _one_sentence(call):
    """Run call(), expect SystemExit with a one-line message -> the message."""
    with pytest.raises(SystemExit) as e:
        call()
    assert isinstance(e.value.code, str) and "\n" not in e.value.code.strip(), e.value.code
    return e.value.code


def _cli(script, *args, cwd):
    r = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, capture_output=True,
                       text=True, timeout=120)
    return r


# ------------------------------------------------------------------------------------------------ dedup
def test_dedup_never_writes_over_an_input(tmp_path, monkeypatch):
    folder = tmp_path / "texts"
    corpus = _write_jsonl(folder / "corpus.jsonl", _docs(6))
    _write_jsonl(folder / "more.jsonl", _docs(4, seed=1))
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
        message = _one_sentence(lambda: dedup.main(inputs + outputs))
        assert "input" in message and ("corpus.jsonl" in message or "more.jsonl" in message), message
    assert corpus.read_bytes() == before and (folder / "more.jsonl").exists()
    assert not (tmp_path / "out").exists()
    r = _cli("dedup.py", "texts", "-o", "texts/corpus.jsonl", cwd=tmp_path)  # as the user saw it: exit 0
    assert r.returncode != 0 and "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert corpus.read_bytes() == before


def test_dedup_default_side_outputs_never_replace_a_users_file(tmp_path, monkeypatch):
    src = _write_jsonl(tmp_path / "in.jsonl", _docs(5))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    for name, flag in [("removed.jsonl", "--removed"), ("report.json", "--report")]:
        mine = tmp_path / "out" / name
        mine.write_text("my own notes\n")
        message = _one_sentence(lambda: dedup.main([str(src), "-o", "out/corpus.jsonl"]))
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
    src = _write_jsonl(tmp_path / "in.jsonl", _docs(3))
    (tmp_path / "afile").write_text("x")
    r = _cli("dedup.py", src, "-o", "afile/sub/c.jsonl", cwd=tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert "afile" in r.stderr
    r = _cli("dedup.py", src, "-o", "ok/c.jsonl", "--removed", "afile/r.jsonl", cwd=tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "afile" in r.stderr, r.stderr


def test_dedup_killed_run_leaves_nothing_after_the_next_run(tmp_path):
    src = _write_jsonl(tmp_path / "in.jsonl", _docs(20))
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


@pytest.mark.parametrize("args, expected", [
    (["--workers", "0"], "--workers"), (["--workers", "-3"], "--workers"), (["--num-perm", "1"], "--num-perm"),
    (["--ngram", "0"], "--ngram"), (["--threshold", "nan"], "--threshold"), (["--threshold", "-1"], "--threshold"),
    (["--num-perm", "x"], "--num-perm"),
])
def test_dedup_bad_flags_are_one_sentence(tmp_path, args, expected):
    src = _write_jsonl(tmp_path / "in.jsonl", _docs(3))
    r = _cli("dedup.py", src, "-o", "o/c.jsonl", *args, cwd=tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert expected in r.stderr.strip().split("\n")[-1], r.stderr


def test_dedup_unreadable_and_empty_inputs_are_one_sentence(tmp_path):
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip at all")
    (tmp_path / "empty").mkdir()
    (tmp_path / "blank.jsonl").write_text("\n\n")
    (tmp_path / "list.jsonl").write_text("[1, 2]\n")
    (tmp_path / "folder.jsonl").mkdir()  # a folder named like a file: searched, holds nothing
    for inputs, expected in [(["bad.jsonl.gz"], "bad.jsonl.gz"), (["empty"], "no documents"),
                             (["blank.jsonl"], "no documents"), (["folder.jsonl"], "no documents"),
                             (["list.jsonl", "--strict"], "list.jsonl:1")]:
        r = _cli("dedup.py", *inputs, "-o", "o/c.jsonl", cwd=tmp_path)
        assert r.returncode != 0 and "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
        assert expected in r.stderr, r.stderr


# ------------------------------------------------------------------------------------------------ tokenizer
def _tok(tmp_path, inputs, out="tok", *flags):
    return tokenize_data.main([str(p) for p in inputs] + ["--out-dir", str(tmp_path / out), "--workers", "1",
                                                          "--vocab-size", "300", *flags])


def test_tokenizer_never_writes_over_an_input(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in ["train.bin", "val.bin", "meta.json", "tokenizer.tiktoken", "special_tokens.json"]:
        (data / name).write_text("the king and the ghost, a user's text file\n" * 20)
        message = _one_sentence(lambda: _tok(tmp_path, [data / name], "data"))
        assert name in message and "input" in message, message
        assert (data / name).read_text().startswith("the king")
        (data / name).unlink()
    (tmp_path / "corpus.jsonl").write_text(json.dumps({"text": "to be or not to be"}) + "\n")
    os.symlink(tmp_path / "corpus.jsonl", data / "train.bin")  # a symlink named like an output
    message = _one_sentence(lambda: _tok(tmp_path, [tmp_path / "corpus.jsonl"], "data"))
    assert "corpus.jsonl" in message and "input" in message, message
    assert (tmp_path / "corpus.jsonl").read_text().startswith('{"text"')


def test_tokenizer_removes_its_stale_temporaries(tmp_path):
    corpus = _write_jsonl(tmp_path / "c.jsonl", _docs(8))
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
    _tok(tmp_path, [corpus])
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in others)


def test_tokenizer_single_document_says_val_is_empty(tmp_path, capsys):
    corpus = _write_jsonl(tmp_path / "one.jsonl", _docs(1, words=400))
    meta = _tok(tmp_path, [corpus])
    said = capsys.readouterr()
    assert meta["val_tokens"] == 0 and (tmp_path / "tok" / "val.bin").stat().st_size == 0
    line = [x for x in (said.out + said.err).split("\n") if "val.bin" in x and "empty" in x]
    assert len(line) == 1 and "document" in line[0] and "--val-fraction" in line[0], said
    _tok(tmp_path, [corpus], "tok0", "--val-fraction", "0")  # asked for: no warning
    said = capsys.readouterr()
    assert "empty" not in said.out + said.err


@pytest.mark.parametrize("args, expected", [
    (["--workers", "-2"], "--workers"), (["--vocab-size", "-5"], "--vocab-size"),
    (["--val-fraction", "nan"], "--val-fraction"), (["--val-fraction", "-0.1"], "--val-fraction"),
    (["--vocab-size", "x"], "--vocab-size"), (["--out-dir", ""], "--out-dir"),
])
def test_tokenizer_bad_flags_are_one_sentence(tmp_path, args, expected):
    corpus = _write_jsonl(tmp_path / "c.jsonl", _docs(4))
    r = _cli("tokenize_data.py", corpus, "--out-dir", "o", *args, cwd=tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert expected in r.stderr.strip().split("\n")[-1], r.stderr


def test_tokenizer_unreadable_and_empty_inputs_are_one_sentence(tmp_path):
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip at all")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "afile").write_text("x")
    corpus = _write_jsonl(tmp_path / "c.jsonl", _docs(3))
    for args, expected in [(["bad.jsonl.gz", "--out-dir", "o"], "bad.jsonl.gz"),
                           (["latin1.txt", "--out-dir", "o"], "latin1.txt"),
                           (["empty", "--out-dir", "o"], "no non-empty documents"),
                           ([corpus, "--out-dir", "afile/sub"], "afile")]:
        r = _cli("tokenize_data.py", *args, cwd=tmp_path)
        assert r.returncode != 0 and "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
        assert expected in r.stderr, r.stderr


# ------------------------------------------------------------------------------------------------ dedup at scale
def _hamlet():
    path = ROOT / "testdata" / "hamlet.txt"
    assert path.is_file(), "testdata/hamlet.txt (a public-domain excerpt of Hamlet) is missing from the repository"
    return path.read_text(encoding="utf-8")


def _hamlet_docs_with_variants(seed=0):
    """Speeches of Hamlet (blank-line separated, >= 40 words) plus edited copies of some of them."""
    rng = np.random.default_rng(seed)
    paras = [p for p in _hamlet().split("\n\n") if len(p.split()) >= 40]
    docs = [{"id": f"p{i}", "text": p} for i, p in enumerate(paras)]
    for k, i in enumerate(rng.choice(len(paras), size=min(30, len(paras)), replace=False)):
        words = paras[i].split(" ")
        for j in rng.choice(len(words), size=max(1, int(len(words) * 0.02 * (k % 4))), replace=False):
            words[j] = "zounds"
        docs.append({"id": f"v{k}", "text": " ".join(words)})
    return docs


def test_dedup_minhash_is_datasketchs(tmp_path):
    from datasketch import MinHash
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
    from datasketch import MinHash, MinHashLSH
    docs = _hamlet_docs_with_variants()
    bands, rows = dedup.lsh_params(0.8, 128)
    sigs = [dedup.minhash_signature(dedup.shingle_set(dedup._word_hashes(
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
    import tracemalloc
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


def test_dedup_and_tokenizer_help_explains_every_flag():
    for script, cls in (("dedup.py", dedup.DedupConfig), ("tokenize_data.py", tokenize_data.TokenizeConfig)):
        r = _cli(script, "--help", cwd=ROOT)
        assert r.returncode == 0
        options = r.stdout.split("\noptions:\n")[1]  # after the usage line and the docstring
        entries = [" ".join(e.split()) for e in re.split(r"\n(?=  -)", options)]  # one per option
        for f in fields(cls):
            flag = "--" + f.name.replace("_", "-")
            entry = next(e for e in entries if flag in e.split(" ")[0].split(","))
            words = [w for w in entry.split() if not w.startswith("-") and not w.isupper()]  # the help text
            assert len(words) >= 5, (script, flag, entry)
            assert f.default in ("", False) or "default" in entry, (script, flag, entry)


# ------------------------------------------------------------------------------------------------ tokenizer
def _reference_shards(docs, vocab_size, val_fraction, train_docs=None):
    """The tokenizer stage as it was before streaming, written out here as the reference: every document in
    memory, BPE trained on (the first train_docs of) them, split by sha256 of the key with the both-sides
    fix-up, each document encoded with encode_ordinary after <|endoftext|>."""
    import hashlib
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
    text = _hamlet()
    docs = [(f"h{i}", text[i:i + 1500]) for i in range(0, len(text), 1500)]
    docs += [("u1", "東京は日本の首都です。 émoji 🎉 <|endoftext|> stays text"), ("u2", "tabs\t\tand\r\nCRLF  ")]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"id": k, "text": t}, ensure_ascii=False) + "\n" for k, t in docs))
    meta = tokenize_data.main([str(corpus), "--out-dir", str(tmp_path / "t"), "--vocab-size", "600",
                               "--val-fraction", str(val_fraction), "--workers", str(workers)])
    enc, shards = _reference_shards(docs, 600, val_fraction)
    out = tmp_path / "t"
    assert tokenize_data.read_rank_file(out / "tokenizer.tiktoken") == enc._mergeable_ranks
    for split in ("train", "val"):
        assert (out / f"{split}.bin").read_bytes() == shards[split], split
        assert meta[f"{split}_tokens"] * 2 == len(shards[split])
    assert meta["val_docs"] >= 1 and meta["train_docs"] >= 1 and meta["bpe_train_docs"] == len(docs)
    assert sorted(p.name for p in out.iterdir()) == sorted(tokenize_data.OUTPUT_FILES)


def test_tokenizer_train_chars_takes_whole_leading_documents(tmp_path):
    text = _hamlet()
    docs = [(f"h{i}", text[i:i + 2000]) for i in range(0, len(text), 2000)]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"id": k, "text": t}) + "\n" for k, t in docs))
    limit = 2000 * 5 + 1999  # room for 5 whole documents, not for 6
    meta = tokenize_data.main([str(corpus), "--out-dir", str(tmp_path / "t"), "--vocab-size", "500",
                               "--train-chars", str(limit), "--workers", "1"])
    assert meta["bpe_train_docs"] == 5 and meta["bpe_train_chars"] == 10000
    enc, shards = _reference_shards(docs, 500, 0.05, train_docs=5)
    assert (tmp_path / "t" / "train.bin").read_bytes() == shards["train"]
    assert tokenize_data.read_rank_file(tmp_path / "t" / "tokenizer.tiktoken") == enc._mergeable_ranks
    message = _one_sentence(lambda: tokenize_data.main([str(corpus), "--out-dir", str(tmp_path / "t2"),
                                                        "--train-chars", "100", "--workers", "1"]))
    assert "--train-chars 100" in message and "2,000 characters" in message


def test_tokenizer_reads_a_folder_of_txt_jsonl_and_gzip(tmp_path):
    import gzip
    text = _hamlet()
    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "in" / "a.txt").write_text(text[:3000])
    with gzip.open(tmp_path / "in" / "sub" / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"id": "b1", "text": text[3000:6000]}) + "\n" + json.dumps({"text": text[6000:9000]}) + "\n")
    with gzip.open(tmp_path / "in" / "c.txt.gz", "wt", encoding="utf-8") as f:
        f.write(text[9000:12000])
    assert tokenize_data.read_documents([tmp_path / "in"]) == [
        ("a.txt", text[:3000]), ("c.txt.gz", text[9000:12000]), ("b1", text[3000:6000]),
        ("b.jsonl.gz:2", text[6000:9000])]
