"""
bench/parallel.py: step time, pipeline bubble and bytes on the wire for each dp x tp x pp layout (CPU, gloo).

    OMP_NUM_THREADS=1 python bench/parallel.py [--steps 5] [--micro 8] [--layouts 1x1x1 1x1x2 ...]

Every layout trains the same model (4 layers, 128 wide, vocab 512, micro-batches of 4 x 64 tokens,
--micro of them per step and per dp rank, fp32) for a few steps under torchrun; the first step is warm-up.
1x1x1 and dp-only layouts take train.py's plain path (train_step, DDP); the others its parallel path.
Prints per layout and schedule: median step time and its ratio to 1x1x1 measured in the same run, the
bubble fraction (pp-1)/(m+pp-1) computed and measured (1 - forward/backward seconds / step seconds,
averaged over ranks), and the bytes each rank sends per step (mean over ranks: tp all-reduces, dp
gradient all-reduce, pp activations/gradients and the tied-embedding all-reduce). train.py keeps no
counters: the worker measures from outside, wrapping the dist calls and the stage forward/backward that
train.py's parallel path makes (measure_from_outside). With more processes
than cores, time-slicing shows up as extra "bubble": read the measured column on a machine with a core
per rank. On a GPU node run the same layouts with train.py itself (its docstring has the command).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

CONFIG = dict(vocab_size=512, block_size=64, n_layer=4, n_head=4, n_embd=128)
LAYOUTS = ["1x1x1", "2x1x1", "1x2x1", "1x1x2", "1x1x4", "2x2x2"]


def measure_from_outside():
    """Wrap what train.py's parallel path calls, looked up at call time: dist.all_reduce and
    dist.batch_isend_irecv count the bytes this rank sends, train.stage_forward and torch.autograd.backward
    the seconds it computes. -> {"bytes": [n], "busy": [seconds]}, running totals the caller resets."""
    totals = {"bytes": [0], "busy": [0.0]}
    all_reduce, batch_isend_irecv = dist.all_reduce, dist.batch_isend_irecv

    def counted_all_reduce(tensor, *args, **kwargs):
        totals["bytes"][0] += tensor.numel() * tensor.element_size()
        return all_reduce(tensor, *args, **kwargs)

    def counted_p2p(ops):
        totals["bytes"][0] += sum(op.tensor.numel() * op.tensor.element_size() for op in ops if op.op is dist.isend)
        return batch_isend_irecv(ops)

    def timed(fn):
        def run(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals["busy"][0] += time.perf_counter() - t0
        return run

    dist.all_reduce, dist.batch_isend_irecv = counted_all_reduce, counted_p2p
    train.stage_forward, torch.autograd.backward = timed(train.stage_forward), timed(torch.autograd.backward)
    return totals


def worker(layout, schedule, micro, steps, out_path):
    """Runs inside torchrun: `steps` optimizer steps of this layout; rank 0 writes the numbers."""
    dp, tp, pp = map(int, layout.split("x"))
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = GPT(GPTConfig(**CONFIG))
    cfg = train.TrainConfig(schedule=schedule, grad_clip=1.0)
    g = torch.Generator().manual_seed(rank // tp % dp)  # the dp rank: tp and pp peers share a batch
    batches = [(torch.randint(0, 512, (4, 64), generator=g), torch.randint(0, 512, (4, 64), generator=g))
               for _ in range(micro)]
    autocast = torch.autocast("cpu", enabled=False)
    grid = train.Grid(tp, pp) if tp * pp > 1 else None
    if grid is not None:
        train.shard_model(model, grid)
    optimizer = model.configure_optimizers(0.1, 1e-3, device_type="cpu")
    if grid is None and dp > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    totals = measure_from_outside()
    times, busy, sent = [], [], []
    for step in range(steps + 1):
        dist.barrier()
        totals["bytes"][0], totals["busy"][0] = 0, 0.0
        t0 = time.perf_counter()
        if grid is None:
            train.train_step(model, optimizer, scaler, batches, 1e-3, cfg, autocast)
        else:
            train.parallel_train_step(model, grid, optimizer, batches, 1e-3, cfg, autocast)
        if step > 0:  # step 0 is warm-up
            times.append(time.perf_counter() - t0)
            busy.append(totals["busy"][0])
            sent.append(totals["bytes"][0])
    step_s = statistics.median(times)
    # plain path: forward/backward are not timed separately, the step is all compute plus DDP's all-reduce
    bubble = 1 - statistics.median(busy) / step_s if grid is not None else 0.0
    if grid is None and dp > 1:  # DDP's bucketed all-reduce: every gradient once per step
        sent = [sum(p.numel() * p.element_size() for p in model.parameters())] * len(sent)
    stats = torch.tensor([step_s, bubble, statistics.median(sent)], dtype=torch.float64)
    dist.all_reduce(stats)
    stats /= dist.get_world_size()
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"step_s": stats[0].item(), "bubble": stats[1].item(), "bytes": stats[2].item()}, f)
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=5, help="timed steps per layout, after one warm-up (default: 5)")
    p.add_argument("--micro", type=int, default=8, help="micro-batches per step (train.py's --grad-accum) (default: 8)")
    p.add_argument("--layouts", nargs="+", default=LAYOUTS, help=f"dp x tp x pp each (default: {' '.join(LAYOUTS)})")
    p.add_argument("--worker", nargs=2, metavar=("LAYOUT", "SCHEDULE"), help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(*args.worker, args.micro, args.steps, args.out)
    runs = [(lay, s) for lay in args.layouts for s in (("gpipe", "1f1b") if lay.split("x")[2] != "1" else ("-",))]
    print(f"{'layout':>7} {'schedule':>8} {'step ms':>8} {'vs 1x1x1':>8} {'bubble calc':>11} {'bubble meas':>11} "
          f"{'KiB sent/rank':>13}")
    base = None
    with tempfile.TemporaryDirectory() as tmp:
        for layout, schedule in runs:
            dp, tp, pp = map(int, layout.split("x"))
            out = os.path.join(tmp, "out.json")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={dp * tp * pp}",
                   __file__, "--worker", layout, schedule if schedule != "-" else "1f1b", "--out", out,
                   "--steps", str(args.steps), "--micro", str(args.micro)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            if proc.returncode != 0:
                print(f"{layout} {schedule} failed:\n{proc.stderr[-2000:]}")
                continue
            r = json.load(open(out))
            base = base or r["step_s"]
            calc = (pp - 1) / (args.micro + pp - 1)
            print(f"{layout:>7} {schedule:>8} {1000 * r['step_s']:8.1f} {r['step_s'] / base:8.2f} {calc:11.2f} "
                  f"{r['bubble']:11.2f} {r['bytes'] / 1024:13.1f}", flush=True)


if __name__ == "__main__":
    main()
