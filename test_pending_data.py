"""Pending tests of the data stages (dedup.py, tokenize_data.py), to be folded into test_all.py.

    python -m pytest -q test_pending_data.py

They read only the repository (testdata/hamlet.txt) and the temporary folders they make.
"""
import json
import os
import subprocess
import sys
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
