"""Tests for train.py and model.py written on branch h-train (issues 12 and 13), to be folded into test_all.py.

    OMP_NUM_THREADS=1 python -m pytest -q test_pending_train.py

Every run trains a tiny model on a byte-level data dir (vocab 256) cut from testdata/hamlet.txt, so nothing
depends on tokenize_data.py. Each test reproduces a fault that train.py had, and checks the behaviour that
replaces it against an independent reference (the first run's own log and checkpoint, the bytes on disk).
"""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import train  # noqa: E402
from model import load_checkpoint  # noqa: E402

HAMLET = ROOT / "testdata" / "hamlet.txt"
TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "4",
        "--eval-steps", "2", "--warmup-steps", "2", "--lr", "3e-3", "--device", "cpu"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def make_data(path, n_bytes=40_000, val_fraction=0.1):
    """Byte-level data dir as tokenize_data.py lays it out: uint16 train.bin / val.bin, meta.json."""
    if not HAMLET.is_file():
        pytest.fail(f"{HAMLET} is missing: the tests read their text from the repository's testdata/.")
    ids = np.frombuffer(HAMLET.read_bytes()[:n_bytes], dtype=np.uint8).astype(np.uint16)
    n_train = int(len(ids) * (1 - val_fraction))
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    ids[:n_train].tofile(path / "train.bin")
    ids[n_train:].tofile(path / "val.bin")
    meta = {"vocab_size": 256, "dtype": "uint16", "train_tokens": n_train, "val_tokens": len(ids) - n_train,
            "train_bytes": n_train, "val_bytes": len(ids) - n_train}
    (path / "meta.json").write_text(json.dumps(meta))
    return path


def run(data, out, *flags):
    train.main(["--data-dir", str(data), "--out-dir", str(out), *TINY, *map(str, flags)])
    return read_log(out)


def read_log(out):
    return [json.loads(line) for line in open(Path(out) / "log.jsonl")]


def exit_message(argv):
    """train.main(argv) must stop with one sentence (SystemExit with a one-line message)."""
    with pytest.raises(SystemExit) as e:
        train.main([str(a) for a in argv])
    message = str(e.value.code)
    assert message and "\n" not in message and message != "None", message
    return message


def command_message(argv):
    """train.py run as a command: exit status 1, one line on stderr, no traceback."""
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, argv)], env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().count("\n") == 0, result.stderr
    return result.stderr.strip()


# --- issue 12.2: a shard that disagrees with meta.json, a corrupted meta.json, an odd-sized shard -----------

def test_shard_cut_short_or_meta_corrupted_is_one_sentence(tmp_path):
    out = ["--out-dir", tmp_path / "out", *TINY, "--max-steps", "1"]
    data = make_data(tmp_path / "half")
    train_bin = data / "train.bin"
    train_bin.write_bytes(train_bin.read_bytes()[:train_bin.stat().st_size // 2])  # cut in half
    message = exit_message(["--data-dir", data, *out])
    assert "train.bin" in message and "meta.json" in message and "36000" in message.replace(",", ""), message

    data = make_data(tmp_path / "odd")
    with open(data / "val.bin", "ab") as f:
        f.write(b"\0")  # 8001 bytes: not a whole number of uint16 tokens
    message = exit_message(["--data-dir", data, *out])
    assert "val.bin" in message and "8001 bytes" in message.replace(",", ""), message

    for name, text in (("not_json", "{vocab_size: 256"), ("a_list", "[1, 2]"),
                       ("wrong_types", json.dumps({"vocab_size": "256", "dtype": "uint16", "train_tokens": 36000,
                                                   "val_tokens": 4000})),
                       ("no_counts", json.dumps({"vocab_size": 256, "dtype": "uint16"})),
                       ("bad_dtype", json.dumps({"vocab_size": 256, "dtype": "int8", "train_tokens": 36000,
                                                 "val_tokens": 4000}))):
        data = make_data(tmp_path / name)
        (data / "meta.json").write_text(text)
        assert "meta.json" in exit_message(["--data-dir", data, *out]), name
    (data / "meta.json").write_bytes(b"\xff\xfe\x00garbage")  # not even UTF-8
    assert "meta.json" in command_message(["--data-dir", data, *out])
    assert not (tmp_path / "out").exists()  # nothing was trained on any of them


# --- issue 12.4: after any kills and resumes, a log holds each step once, in order, of one run -------------

KILL_AT_FIRST_SAVE = """
import os, signal, sys
import train
def killed(*args, **kwargs):  # SIGKILL at the moment the first checkpoint would be written
    os.kill(os.getpid(), signal.SIGKILL)
train.save_checkpoint = killed
train.main(sys.argv[1:])
"""


def test_log_of_fresh_run_killed_then_resumed_is_the_finished_runs(tmp_path):
    data, out = make_data(tmp_path / "data"), tmp_path / "out"
    finished = run(data, out, "--max-steps", 4, "--eval-interval", 2)
    weights = load_checkpoint(str(out / "ckpt.pt"))["model"]
    # a new run on the same folder, without --resume, killed before its first checkpoint
    new_run = ["--max-steps", 6, "--eval-interval", 3, "--seed", 7]
    argv = ["--data-dir", data, "--out-dir", out, *TINY, *new_run]
    result = subprocess.run([sys.executable, "-c", KILL_AT_FIRST_SAVE, *map(str, argv)], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    # --resume continues the checkpoint on disk, the finished run: its log is that run's, whole
    train.main(["--out-dir", str(out), "--resume"])
    assert read_log(out) == finished
    ckpt = load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["step"] == 4 and all(torch.equal(ckpt["model"][k], weights[k]) for k in weights)
    # the new run to its end replaces the pair; resumed further, its log goes on: steps 1..8 once each
    second = run(data, out, *new_run)
    assert [r["step"] for r in second] == [1, 2, 3, 4, 5, 6] and second[0]["loss"] != finished[0]["loss"]
    with open(out / "log.jsonl", "a") as f:  # as if killed after logging step 7, before its checkpoint
        f.write(json.dumps({"step": 7, "loss": 0.0}) + "\n")
    train.main(["--out-dir", str(out), "--resume", "--max-steps", "8"])
    log = read_log(out)
    assert [r["step"] for r in log] == list(range(1, 9)) and log[:6] == second


# --- issue 12.5: the next run removes the temporaries a killed run left (only its own names) ---------------

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


def test_next_run_removes_stale_temporaries_it_wrote(tmp_path):
    data, out = make_data(tmp_path / "data"), tmp_path / "out"
    run(data, out, "--max-steps", 1)
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


# --- issue 12: one sentence instead of a traceback, for every flag value that cannot work -------------------

def test_bad_flag_values_are_one_sentence(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # with it, --attn triton runs on the CPU (slowly)
    data, out = make_data(tmp_path / "data"), tmp_path / "out"
    (tmp_path / "a_file").write_text("not a folder")
    argv = ["--data-dir", data, "--out-dir", out, *TINY, "--max-steps", "2"]
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
        message = exit_message([*argv, *flags])
        assert named in message, (flags, message)
    assert not out.exists()  # nothing was trained
    # as commands, the two the issue names: the sentence alone on stderr
    assert command_message([*argv, "--lr", "-0.001"]).startswith("--lr -0.001")
    assert command_message([*argv, "--n-embd", "32", "--n-head", "3"]) == "n_embd=32 must be divisible by n_head=3."


def set_val_tokens(data, n):
    """Cut val.bin to its first n tokens and say so in meta.json, as tokenize_data.py would have."""
    (data / "val.bin").write_bytes((data / "val.bin").read_bytes()[:2 * n])
    meta = json.loads((data / "meta.json").read_text())
    (data / "meta.json").write_text(json.dumps({**meta, "val_tokens": n, "val_bytes": n}))
    return data


def test_empty_or_short_val_shard_gets_a_hint_that_works(tmp_path):
    out = ["--out-dir", tmp_path / "out", *TINY, "--max-steps", "1"]
    # one document: tokenize_data.py held out nothing, so no --block-size can help; re-tokenizing can
    message = exit_message(["--data-dir", set_val_tokens(make_data(tmp_path / "empty"), 0), *out])
    assert "val.bin is empty" in message and "--val-fraction" in message and "--block-size" not in message
    # 10 tokens: one sequence of 9 and its targets fit, and the hint says so
    short = set_val_tokens(make_data(tmp_path / "short"), 10)
    message = exit_message(["--data-dir", short, *out])
    assert "val.bin" in message and "--block-size 9 or less" in message, message
    log = run(short, tmp_path / "out", "--max-steps", 1, "--block-size", 9)  # following the hint works
    assert math.isfinite(log[-1]["val_loss"])


# --- issue 12: torchrun killed while its ranks run on: the ranks stop, the last checkpoint stays good ------

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
def test_ranks_stop_when_the_launcher_is_killed(tmp_path):
    data, out = make_data(tmp_path / "data"), tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"),
           "--data-dir", str(data), "--out-dir", str(out), *TINY, "--max-steps", "100000", "--eval-interval", "5"]
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


# --- issue 13: every flag explained from one source; the flag and field agree; the closing line -----------

def field_comments():
    """{field: its trailing comment}, read from train.py's source with the tokenizer (not train's regex)."""
    import io
    import tokenize
    source = (ROOT / "train.py").read_text()
    body = source[source.index("class TrainConfig:"):source.index("\n\n\n", source.index("class TrainConfig:"))]
    comments, field = {}, None
    for tok in tokenize.generate_tokens(io.StringIO(body).readline):
        if tok.type == tokenize.NAME and tok.start[1] == 4:
            field = tok.string
        elif tok.type == tokenize.COMMENT and field and tok.start[1] > 4:
            comments[field] = tok.string.lstrip("# ")
        elif tok.type == tokenize.NEWLINE:
            field = None
    return comments


def test_help_explains_every_flag_with_default_and_choices(capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    options = text[text.index("\noptions:"):]
    entries = {}  # flag -> its help, whitespace normalised (argparse wraps lines)
    for chunk in options.split("\n  --")[1:]:
        entries["--" + chunk.split()[0].rstrip(",")] = " ".join(chunk.split())
    comments = field_comments()
    import dataclasses
    for f in dataclasses.fields(train.TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        assert len(comments.get(f.name, "")) > 10, f"{f.name} has no comment to explain it"
        help_text = entries[flag]
        assert " ".join(comments[f.name].split()) in help_text, (flag, help_text)
        assert f"(default: {f.default!r})" in help_text, (flag, help_text)
        if f.name in train.CHOICES:
            assert "{" + ",".join(train.CHOICES[f.name]) + "}" in help_text, (flag, help_text)
    assert "0: at max_steps" in entries["--lr-decay-steps"]
    assert "data/shakespeare" not in text and "--data-dir data/tokens" in text  # folders the pipeline writes


def test_attn_flag_sets_the_attn_impl_field():
    for flags in (["--attn-impl", "naive"], ["--attn", "naive"]):
        assert train.resolve_config(flags)[0].attn_impl == "naive"
    assert train.TrainConfig().attn_impl == "sdpa"


def test_pretraining_ends_with_steps_time_and_checkpoint_line(tmp_path, capsys):
    data, out = make_data(tmp_path / "data"), tmp_path / "out"
    run(data, out, "--max-steps", 3)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("3 steps in ") and last.endswith(f"; checkpoint {out / 'ckpt.pt'}"), last
    train.main(["--out-dir", str(out), "--resume", "--max-steps", "5"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("2 steps in ") and last.endswith(f"; checkpoint {out / 'ckpt.pt'}"), last


# --- issue 13: bench/parallel.py measures bytes from outside train.py (no counters in production code) ----

def test_bench_parallel_counts_the_bytes_of_a_two_stage_pipeline():
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "parallel.py"), "--steps", "1", "--micro", "2",
                             "--layouts", "1x1x2"], env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "failed" not in result.stdout, result.stdout + result.stderr[-2000:]
    rows = [line.split() for line in result.stdout.splitlines() if line.split()[:1] == ["1x1x2"]]
    assert [r[1] for r in rows] == ["gpipe", "1f1b"]
    # per step, stage 0 sends 2 micro-batches of activations (4 x 64 x 128 fp32), stage 1 their gradients
    # back; both all-reduce the tied embedding's gradient (512 x 128 fp32): the mean per rank in KiB
    want = (2 * 4 * 64 * 128 * 4 + 512 * 128 * 4) / 1024
    assert all(float(r[-1]) == want for r in rows), (want, rows)
    assert not hasattr(train, "COMM_BYTES") and not hasattr(train, "BUSY_SECONDS")
