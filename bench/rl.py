"""
bench/rl.py: does RL (align.py --method grpo) beat its SFT start on every run, and on tasks it was not tuned on?

    python pipeline.py --seed 2 --out-dir out_seed2                     # independent runs (seeds 2, 3, ...)
    python bench/rl.py --runs "out out_seed2 out_seed3"                 # the spread of RL's gain over them
    python bench/rl.py --task count --init out/pretrain/ckpt.pt        # a second task: SFT, then GRPO on it

--runs reads each pipeline run's out/rl/log.jsonl and pipeline.json (nothing is trained) and prints, per run,
the held-out exact answers (greedy) at RL's step 0 (the SFT start) and after its last step, the paired
change in standard errors (align.paired_change: only questions that flipped carry noise), pass@1 of
sampled answers, and the RL stage's wall time.

--task builds a checkable task of its own from the plays (dedup.py's corpus), teaches its answer format by
SFT from --init, runs GRPO with align.py's defaults (plus --grpo-flags) and prints the same row, and the
on-policy reward of its first and last steps. The tasks, each answer computed from the prompt, not
recalled from the plays (unlike the pipeline's multiple-choice questions):
  count     "How many words? <a line of verse>" -> the number, in digits
  lastword  "Last word? <a line of verse>" -> its last word without punctuation
Held out by scene, as align.py splits (--eval-fraction of the "group"s).
"""

import json
import os
import random
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from flags import parse_flags  # noqa: E402
from pipeline import read_rows  # noqa: E402  (a stage's log.jsonl -> its rows)
from plays import parse_speeches, read_scenes, write_jsonl  # noqa: E402

HERE = Path(__file__).resolve().parent.parent


@dataclass
class RLBenchConfig:
    runs: str = ""                 # pipeline --out-dir folders whose RL stages to compare, space-separated
    task: Literal["", "count", "lastword"] = ""  # build this task, SFT and GRPO on it (needs --init)
    init: str = "out/pretrain/ckpt.pt"  # --task: the pretrained checkpoint SFT starts from
    corpus: str = "data/corpus.jsonl"  # --task: dedup.py's corpus of the plays, where the lines come from
    out_dir: str = ""              # --task: data, SFT and RL runs go here; empty: out/task_TASK
    grpo_flags: str = ""           # --task: more align.py flags for the GRPO run, as typed after it
    seed: int = 1337               # --task: which lines become questions


# ---------------------------------------------------------------------------------------------
# The spread over pipeline runs

def rl_row(name, log_path, seconds=None):
    """RL's log -> one table row: the step-0 and last evaluations and the reward of its first and last steps."""
    rows = read_rows(log_path)
    evals = [r for r in rows if "val_accuracy" in r]
    steps = [r["reward"] for r in rows if "reward" in r]
    first, last = evals[0], evals[-1]
    k = max(1, len(steps) // 5)  # the first and last fifth of the steps: the on-policy reward's trend
    return {"run": name, "sft": first["val_accuracy"], "rl": last["val_accuracy"],
            "se": last.get("val_change_se", 0.0), "gained": last.get("val_gained", 0), "lost": last.get("val_lost", 0),
            "pass1_sft": first["val_pass@1"], "pass1_rl": last["val_pass@1"],
            "reward_first": sum(steps[:k]) / k if steps else float("nan"),
            "reward_last": sum(steps[-k:]) / k if steps else float("nan"), "seconds": seconds}


def print_table(rows):
    print("| run | SFT greedy exact | RL greedy exact | change (paired SE) | gained / lost | pass@1 SFT -> RL "
          "| on-policy reward, first -> last fifth | RL wall time |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        wall = f"{r['seconds']:.0f} s" if r["seconds"] is not None else "-"
        print(f"| {r['run']} | {r['sft']:.3f} | {r['rl']:.3f} | {r['se']:+.1f} | {r['gained']} / {r['lost']} "
              f"| {r['pass1_sft']:.3f} -> {r['pass1_rl']:.3f} | {r['reward_first']:.3f} -> {r['reward_last']:.3f} "
              f"| {wall} |")
    if len(rows) > 1:
        mean = sum(r["se"] for r in rows) / len(rows)
        print(f"mean change {mean:+.2f} paired SE over {len(rows)} runs; RL beat its start on "
              f"{sum(r['rl'] > r['sft'] for r in rows)} of {len(rows)}")


def spread(run_dirs):
    rows = []
    for out in run_dirs:
        log = Path(out) / "rl" / "log.jsonl"
        if not log.is_file():
            raise SystemExit(f"--runs {out}: no rl/log.jsonl there; pass a pipeline.py --out-dir whose rl stage ran.")
        record = Path(out) / "pipeline.json"
        seconds = json.loads(record.read_text()).get("seconds", {}).get("rl") if record.is_file() else None
        rows.append(rl_row(out, log, seconds))
    print_table(rows)


# ---------------------------------------------------------------------------------------------
# A task of our own: lines of verse from the plays, a computed answer

def verse_lines(corpus):
    """[(scene id, line)]: every line of every speech with 3 to 12 words."""
    lines = []
    for doc in read_scenes(corpus):
        for _, speech in parse_speeches(doc["text"], max_chars=10_000):
            lines += [(str(doc.get("id")), line) for line in speech.split("\n") if 3 <= len(line.split()) <= 12]
    return lines


def question(task, line):
    """-> (prompt, answer) of the task on one line of verse."""
    if task == "count":
        return f"How many words? {line}", str(len(line.split()))
    return f"Last word? {line}", re.sub(r"^\W+|\W+$", "", line.split()[-1]) or line.split()[-1]  # no punctuation


def write_task(task, corpus, out_dir, seed, per_scene=4):
    """OUT/sft.jsonl (the question and its answer as chat) and OUT/rl.jsonl (align.py's GRPO format), up to
    per_scene lines of each scene, grouped by scene."""
    by_scene = {}
    for scene, line in verse_lines(corpus):
        by_scene.setdefault(scene, []).append(line)
    sft, rl = [], []
    for scene, lines in sorted(by_scene.items()):
        for line in random.Random(f"{seed}/{scene}").sample(lines, min(per_scene, len(lines))):
            prompt, answer = question(task, line)
            sft.append({"prompt": prompt, "response": answer, "group": scene, "task": task})
            rl.append({"prompt": prompt, "answer": answer, "group": scene, "task": task})
    write_jsonl(Path(out_dir) / "sft.jsonl", sft)
    write_jsonl(Path(out_dir) / "rl.jsonl", rl)
    return len(sft)


def run(command):
    print("$ " + " ".join(map(str, command)), flush=True)
    t0 = time.time()
    subprocess.run([sys.executable, *map(str, command)], check=True, cwd=HERE)
    return time.time() - t0


def task_bench(cfg):
    out = Path(cfg.out_dir or f"out/task_{cfg.task}")
    n = write_task(cfg.task, cfg.corpus, out, cfg.seed)
    print(f"{cfg.task}: {n} questions in {out}/sft.jsonl and rl.jsonl")
    # --resume: a finished SFT run of the same data is kept (align.py refuses one made from other data)
    run(["align.py", "--method", "sft", "--init", cfg.init, "--data", out / "sft.jsonl", "--out-dir", out / "sft",
         "--resume"])
    seconds = run(["align.py", "--method", "grpo", "--init", out / "sft" / "ckpt.pt", "--data", out / "rl.jsonl",
                   "--out-dir", out / "rl", "--eval-max", "1000", *cfg.grpo_flags.split()])
    print_table([rl_row(cfg.task, out / "rl" / "log.jsonl", seconds)])


def main(argv=None):
    cfg = parse_flags(RLBenchConfig, argv, __doc__)
    if cfg.runs:
        spread(cfg.runs.split())
    elif cfg.task:
        task_bench(cfg)
    else:
        raise SystemExit('pass --runs "OUT OUT ..." (pipeline runs to compare) or --task count|lastword.')


if __name__ == "__main__":
    main()
