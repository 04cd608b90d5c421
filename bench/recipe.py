"""
bench/recipe.py: train.py's pretraining recipe against its previous defaults and nanoGPT's, side by side.

    python bench/recipe.py --data-dir data/tokens            # the pipeline's shape and 1000 steps, 3 seeds (hours on 2 cores)
    python bench/recipe.py --data-dir data/tokens --quick    # 2 x 64, 60 steps, 2 seeds: a couple of minutes
    python bench/recipe.py --data-dir data/tokens --switches # "train.py now" with each GPTConfig/schedule switch

The recipes (RECIPES): "nanoGPT" is nanoGPT's GPT-2 model (learned positions, biases, LayerNorm, GELU,
tied head) with its AdamW recipe (lr 6e-4 cosine to 6e-5, betas 0.9/0.95, weight decay 0.1, clip 1);
"train.py before" is the pipeline's pretraining before Muon (RoPE, no biases, AdamW lr 2e-3 to 2e-4);
"train.py now" is Muon for the blocks' matrices with a cosine (the pipeline's stage adds --lr-schedule wsd,
which --switches measures, and runs 900 steps). All share the shape,
the warmup, the batches of each step (train.py's batch_starts) and the validation windows, and run
through train.py's own train_step and evaluate. The recipes train interleaved, one step each in turn, so
a busy moment of the machine slows them alike. --switches trains "train.py now" against itself with
each of SWITCHES turned on (one at a time), and times them against it. Prints, as the mean (and range) over seeds:
  - validation bits per byte at equal tokens (after the last step);
  - seconds per step, as a ratio to "train.py before";
  - validation bits per byte at equal wall time: each recipe's curve (evaluated every --eval-every steps,
    linear in between) read where its training time reaches the total of "train.py before". A recipe's
    schedule is not shortened to fit, which favours the faster ones; one that finished in less time
    shows its final value, marked "<".
"""

import argparse
import math
import os
import statistics
import sys
import time
from contextlib import nullcontext

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
from model import GPTConfig  # noqa: E402

# name: (GPTConfig fields, TrainConfig fields) on top of the shared shape and schedule
RECIPES = {
    "nanoGPT": (dict(pos_encoding="learned", bias=True), dict(optimizer="adamw", lr=6e-4, min_lr=6e-5)),
    "train.py before": (dict(), dict(optimizer="adamw", lr=2e-3, min_lr=2e-4)),
    "train.py now": (dict(), dict(optimizer="muon", lr=1e-2, min_lr=1e-3, muon_lr=0.02)),
}
BASELINE = "train.py before"
# --switches: one literature option at a time on top of "train.py now" (its one-line why is in model.py)
SWITCHES = {
    "+ qk_norm": (dict(qk_norm=True), dict()),
    "+ untied head": (dict(tie_weights=False), dict()),
    "+ zero-init proj": (dict(zero_init_proj=True), dict()),
    "+ relu2": (dict(mlp="relu2"), dict()),
    "+ softcap 15": (dict(logit_softcap=15.0), dict()),
    "+ wsd": (dict(), dict(lr_schedule="wsd")),
}
EVAL_SEED = 1337  # the validation windows: the same for every recipe and seed


def train_recipes(args, seed, train_data, val_data, meta):
    """Every recipe from `seed`, interleaved step by step -> {name: [(step, train seconds, val bpb), ...]}."""
    shape = dict(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=args.block_size)
    device, autocast = torch.device("cpu"), torch.autocast("cpu", enabled=False)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    eval_cfg = train.TrainConfig(seed=EVAL_SEED, batch_size=args.batch_size, eval_steps=args.eval_steps, **shape)
    bits_per_token = meta["val_tokens"] / meta["val_bytes"] / math.log(2)  # nats/token -> bits/byte
    runs = []
    for name in args.recipes:
        model_fields, train_fields = RECIPES.get(name) or SWITCHES[name]
        if name in SWITCHES:
            model_fields = {**RECIPES["train.py now"][0], **model_fields}
            train_fields = {**RECIPES["train.py now"][1], **train_fields}
        cfg = train.TrainConfig(seed=seed, batch_size=args.batch_size, max_steps=args.steps,  # a cosine, but "+ wsd"
                                warmup_steps=args.warmup_steps, **shape, **{"lr_schedule": "cosine", **train_fields})
        model = train.build_model(GPTConfig(vocab_size=meta["vocab_size"], **shape, **model_fields), seed)
        runs.append(dict(name=name, cfg=cfg, model=model, optimizer=train.make_optimizer(model, cfg),
                         seconds=0.0, curve=[]))
    for step in range(args.steps):
        for run in runs:
            cfg = run["cfg"]
            batches = train.micro_batches(train_data, cfg, step, 0, 1, device)
            t0 = time.perf_counter()
            train.train_step(run["model"], run["optimizer"], scaler, batches, train.learning_rate_at(step, cfg),
                             cfg, autocast)
            run["seconds"] += time.perf_counter() - t0
            if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
                loss = train.evaluate(run["model"], val_data, eval_cfg, 0, 1, device, nullcontext())
                run["curve"].append((step + 1, run["seconds"], loss * bits_per_token))
                print(f"  seed {seed} {run['name']:16s} step {step + 1:5d} {run['seconds']:7.0f} s  "
                      f"val {run['curve'][-1][2]:.3f} bits/byte", flush=True)
    return {run["name"]: run["curve"] for run in runs}


def at_time(curve, budget):
    """(bpb where the curve's training time reaches budget, whether the run ended before it)."""
    for (_, t0, b0), (_, t1, b1) in zip([(0, 0.0, curve[0][2])] + curve, curve):
        if t1 >= budget:
            return b0 + (b1 - b0) * (budget - t0) / (t1 - t0), False
    return curve[-1][2], True


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="data/tokens", help="tokenize_data.py's output (default: data/tokens)")
    parser.add_argument("--quick", action="store_true", help="2 layers x 64, block 64, 60 steps, 2 seeds")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per recipe (default: 3)")
    parser.add_argument("--seed", type=int, default=1337, help="the first seed; then seed+1, ... (default: 1337)")
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps (default: 1000)")
    parser.add_argument("--warmup-steps", type=int, default=50, help="linear warmup of every recipe (default: 50)")
    parser.add_argument("--eval-every", type=int, default=100, help="steps between evaluations (default: 100)")
    parser.add_argument("--eval-steps", type=int, default=8, help="validation batches per evaluation (default: 8)")
    parser.add_argument("--n-layer", type=int, default=4, help="default: 4 (the pipeline's)")
    parser.add_argument("--n-head", type=int, default=4, help="default: 4")
    parser.add_argument("--n-embd", type=int, default=256, help="default: 256")
    parser.add_argument("--block-size", type=int, default=256, help="default: 256")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step (default: 8)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--recipes", nargs="+", choices=list(RECIPES) + list(SWITCHES), default=list(RECIPES),
                        help=f"which recipes (default: the three; {BASELINE!r} is always run, the time baseline)")
    parser.add_argument("--switches", action="store_true",
                        help="'train.py now' and each of SWITCHES on top of it; 'train.py now' is the time baseline")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.steps, args.warmup_steps, args.eval_every, args.eval_steps = 2, 60, 10, 20, 4
        args.n_layer, args.n_head, args.n_embd, args.block_size = 2, 2, 64, 64
    args.baseline = "train.py now" if args.switches else BASELINE
    if args.switches:
        args.recipes = ["train.py now"] + list(SWITCHES)
    args.recipes = [name for name in {**RECIPES, **SWITCHES} if name in args.recipes or name == args.baseline]
    torch.set_num_threads(args.threads)
    train_data, val_data, meta = train.load_data(args.data_dir, args.block_size)
    if not meta.get("val_bytes"):
        raise SystemExit(f"{args.data_dir}/meta.json has no val_bytes, so no bits per byte; rerun tokenize_data.py.")
    print(f"{args.n_layer} layers x {args.n_embd}, {args.batch_size} x {args.block_size} tokens per step, "
          f"{args.steps} steps, {args.seeds} seed(s), {args.threads} threads, vocab {meta['vocab_size']}", flush=True)
    curves = [train_recipes(args, args.seed + s, train_data, val_data, meta) for s in range(args.seeds)]
    print(f"\n{'recipe':18s} {'bpb, equal tokens':>22s} {'s/step':>8s} {'bpb, equal time':>22s}")
    for name in args.recipes:
        end = [c[name][-1][2] for c in curves]
        ratio = statistics.mean(c[name][-1][1] / c[args.baseline][-1][1] for c in curves)
        timed = [at_time(c[name], c[args.baseline][-1][1]) for c in curves]
        same_time = [b for b, _ in timed]
        mark = "<" if any(early for _, early in timed) else " "
        print(f"{name:18s} {statistics.mean(end):8.3f} [{min(end):.3f}, {max(end):.3f}] {ratio:7.2f}x "
              f"{mark}{statistics.mean(same_time):7.3f} [{min(same_time):.3f}, {max(same_time):.3f}]")


if __name__ == "__main__":
    main()
