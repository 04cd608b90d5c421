"""
bench/train_overhead.py: what train.py's step machinery costs over a plain training loop, side by side.

    python bench/train_overhead.py [--threads 2] [--rounds 5] [--steps 5]     # CPU: small model
    python bench/train_overhead.py --device cuda [--attn sdpa triton]          # GPU: the gpt2-124m preset

CPU: the same model and the same batches (4 layers, 128 wide, 8 x 128 tokens, fp32) trained by
  1. a plain loop: fixed x, y tensors; forward, backward, AdamW step, zero_grad;
  2. train.py's machinery: micro_batches (memmap -> tensors, seeded by the step), learning_rate_at, train_step
     (autocast context, GradScaler, gradient clipping, loss / grad_accum), the loss .item() it logs;
  3. the same with --grad-clip 0, to show what clipping (one more pass over the gradients) costs.
Rounds alternate between the rows, in a rotating order, so load on the machine hits all alike; prints
the median tokens/s over rounds and the ratio (plain = 1.00).
GPU: the gpt2-124m preset (12 x 768, seq 1024, bf16, torch.compile) through train.py's machinery, with
SDPA and Triton attention: tokens/s and MFU against the device's bf16 peak (train.PEAK_FLOPS).
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
from model import GPTConfig  # noqa: E402


def make_tokens(folder, n_tokens, vocab):
    """A memory-mapped uint16 shard of random tokens, as train.load_data would hand it over."""
    path = os.path.join(folder, "train.bin")
    np.random.default_rng(0).integers(0, vocab, n_tokens, dtype=np.uint16).tofile(path)
    return np.memmap(path, dtype=np.uint16, mode="r")


def setup(cfg, vocab, device):
    model_config = GPTConfig(vocab_size=vocab, block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                             n_embd=cfg.n_embd, attn_impl=cfg.attn_impl)
    model = train.build_model(model_config, cfg.seed).to(device)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.lr, device_type=device.type)
    return model, optimizer


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def machinery_steps(model, optimizer, data, cfg, device, steps, first_step=0):
    """`steps` optimizer steps exactly as train.main runs them (minus eval, logging and checkpoints)."""
    _, autocast, scaler = train.precision(cfg, device, None)  # --dtype as train.py reads it
    for step in range(first_step, first_step + steps):
        batches = train.micro_batches(data, cfg, step, 0, 1, device)
        train.train_step(model, optimizer, scaler, batches, train.learning_rate_at(step, cfg), cfg, autocast).item()


def plain_steps(model, optimizer, x, y, steps):
    for _ in range(steps):
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()


def bench_cpu(args):
    torch.set_num_threads(args.threads)
    device, vocab = torch.device("cpu"), 256
    cfg = train.TrainConfig(n_layer=4, n_head=4, n_embd=128, block_size=128, batch_size=8, dtype="float32")
    tokens_per_step = cfg.batch_size * cfg.block_size
    with tempfile.TemporaryDirectory() as folder:
        data = make_tokens(folder, 1_000_000, vocab)
        rows = {"plain loop (forward, backward, AdamW)": (cfg,),
                "train.py step machinery": (cfg,),
                "train.py step machinery, --grad-clip 0": (replace(cfg, grad_clip=0.0),)}
        x, y = train.micro_batches(data, cfg, 0, 0, 1, device)[0]
        models = {name: setup(row[0], vocab, device) for name, row in rows.items()}
        speeds = {name: [] for name in rows}
        for r in range(args.rounds + 1):  # round 0 is warm-up
            names = list(rows)
            for name in names[r % 3:] + names[:r % 3]:  # rotate the order: no row always runs first
                row_cfg, model, optimizer = rows[name][0], *models[name]
                t0 = time.perf_counter()
                if name.startswith("plain"):
                    plain_steps(model, optimizer, x, y, args.steps)
                else:
                    machinery_steps(model, optimizer, data, row_cfg, device, args.steps, first_step=r * args.steps)
                if r:
                    speeds[name].append(args.steps * tokens_per_step / (time.perf_counter() - t0))
    print(f"CPU, {args.threads} threads: {cfg.n_layer} layers x {cfg.n_embd} wide, {cfg.batch_size} x "
          f"{cfg.block_size} tokens per step, fp32; median of {args.rounds} rounds x {args.steps} steps")
    base = statistics.median(speeds["plain loop (forward, backward, AdamW)"])
    for name, values in speeds.items():
        print(f"  {name:44s} {statistics.median(values):10,.0f} tok/s   x{statistics.median(values) / base:.2f}")


def bench_gpu(args):
    device = torch.device("cuda")
    vocab = 50304  # GPT-2's 50257 rounded up to a multiple of 64
    preset = train.TrainConfig(**train.PRESETS["gpt2-124m"])
    peak = train.peak_flops(device)
    print(f"GPU {torch.cuda.get_device_name(device)}: gpt2-124m preset, {args.batch_size} x {preset.block_size} tokens "
          f"per step, bf16, torch.compile; median of {args.steps} steps after {args.warmup} warm-up")
    with tempfile.TemporaryDirectory() as folder:
        data = make_tokens(folder, 20_000_000, vocab)
        for attn in args.attn:
            cfg = replace(preset, attn_impl=attn, batch_size=args.batch_size, grad_accum=1)
            model, optimizer = setup(cfg, vocab, device)
            compiled = torch.compile(model)
            machinery_steps(compiled, optimizer, data, cfg, device, args.warmup)
            times = []
            for step in range(args.steps):
                sync(device)
                t0 = time.perf_counter()
                machinery_steps(compiled, optimizer, data, cfg, device, 1, first_step=args.warmup + step)
                sync(device)
                times.append(time.perf_counter() - t0)
            tps = cfg.batch_size * cfg.block_size / statistics.median(times)
            mfu = f"{100 * model.flops_per_token(cfg.block_size) * tps / peak:.1f}%" if peak else "n/a (unknown GPU)"
            print(f"  attention {attn:8s} {tps:12,.0f} tok/s   MFU {mfu}")
            del model, compiled, optimizer
            torch.cuda.empty_cache()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cpu: the small model against a plain loop; cuda: the gpt2-124m preset (default: cpu)")
    parser.add_argument("--threads", type=int, default=2, help="CPU: torch threads (default: 2)")
    parser.add_argument("--rounds", type=int, default=5, help="CPU: timed rounds over all rows (default: 5)")
    parser.add_argument("--steps", type=int, default=5, help="steps per round (CPU) / timed steps (GPU) (default: 5)")
    parser.add_argument("--warmup", type=int, default=5, help="GPU: untimed steps (compilation) first (default: 5)")
    parser.add_argument("--batch-size", type=int, default=16, help="GPU: sequences of 1024 per step (default: 16)")
    parser.add_argument("--attn", nargs="+", default=["sdpa", "triton"], choices=["sdpa", "naive", "triton"],
                        help="GPU: attention implementations, one row each (default: sdpa triton)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU is visible; run on a GPU node or drop the flag.")
    bench_gpu(args) if args.device == "cuda" else bench_cpu(args)


if __name__ == "__main__":
    main()
