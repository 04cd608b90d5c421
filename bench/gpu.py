"""
bench/gpu.py: the first command to run on a GPU node. Does everything work here, and how fast? One table.

    python bench/gpu.py [--out out/gpu.json] [--minutes 8]   # one node, one or more GPUs: about 8 minutes
    torchrun --standalone --nproc_per_node=8 bench/gpu.py    # the same: rank 0 drives, the other ranks exit
    python bench/gpu.py --only training,multi --minutes 5    # some sections only (a rerun of what ran short)
    python bench/gpu.py --dry-run                            # CPU: every section on tiny shapes

Sections, in order; each row has a status (ok, FAIL, skip, error, info), a result and a note:
1. device: versions; the bf16 peak train.py assumes for MFU (train.PEAK_FLOPS) beside a measured 8192^3
   bf16 matmul rate and device-to-device copy bandwidth.
2. kernel correctness: attention_kernel.attention in bf16 and fp16, output and dq/dk/dv, causal and not,
   GQA, odd lengths, head sizes 64 and 128, against float64 SDPA. FlashAttention's rule: the kernel's max
   error <= 2 x the max error of PyTorch's SDPA in the same dtype + 1e-3.
3. kernel speed: causal bf16, D 128, T 1k..16k at 16k tokens (B = 16k / T, H = 2048 / D): forward,
   backward and both in TFLOP/s (FlashAttention's count: 4BHT^2D / 2 forward, 2.5x that backward),
   do_bench medians, beside each SDPA backend pinned with sdpa_kernel (flash, cudnn, efficient; a refusal
   says why) and SDPA's own choice; then the tiles the autotuner chose.
4. training: first train.py's plan (--plan) of the preset on this node's GPUs and memory, and of the run
   below; then train.py --preset gpt2-124m (bf16, compiled) on random tokens with --attn sdpa and triton:
   tokens/s (median of the last two thirds of the steps), MFU against the assumed peak and the measured
   matmul rate, peak memory (torch.cuda.max_memory_allocated after train.main returns: log.jsonl lacks it)
   beside the plan's estimate.
5. multi-GPU (one node, up to 8 GPUs): all-reduce bus bandwidth (nccl-tests' busbw = algbw x 2(n-1)/n);
   train.py's losses under dp, tp, pp and tp x pp against one GPU, step by step (fp32, TF32 off through
   NVIDIA_TF32_OVERRIDE=0, lr 1e-4, the same global batch): ok when max |difference| <= 1e-3.
The script starts its ranks itself, with the environment torchrun gives (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT). Each section stops at its share of --minutes; whatever cannot run (no GPU, one GPU, no
NCCL, a failed compile, no time left) is a row saying why. Rows print as they come and the JSON file is
rewritten after each, so a run killed midway keeps what it measured; the whole table prints again at the
end. Exit status 1 when a row is FAIL or error.
--dry-run: the same code on the CPU: the kernel under TRITON_INTERPRET=1 in fp32 and fp16 (bf16 tl.dot is
wrong in the interpreter), train.py on a 1-layer model (--attn sdpa compiled by inductor, triton eager),
the plans for 2 GPUs of 80 GiB, gloo with 2 ranks and one parallel layout.
"""
import argparse
import io
import json
import math
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager, nullcontext, redirect_stdout
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@dataclass
class GPUBenchConfig:
    out: str = "out/gpu.json"                      # the table as JSON, rewritten after every row
    minutes: float = 8.0                           # time budget; each section stops at its share
    dry_run: bool = False                          # CPU: every section on tiny shapes (interpreter, gloo)
    only: str = ""                                 # run only these sections (comma list of SECTIONS); device always
    seq_lens: str = "1024,2048,4096,8192,16384"    # kernel speed: sequence lengths T
    tokens: int = 16384                            # kernel speed: B * T of every measurement
    hidden: int = 2048                             # kernel speed: H * D
    head_dim: int = 128                            # kernel speed: D
    train_steps: int = 24                          # training: optimizer steps per attention implementation
    train_grad_accum: int = 8                      # training: micro-batches (16 x 1024 tokens each) per step
    parity_steps: int = 5                          # multi-GPU: steps compared with one GPU
    parity_layouts: str = "dp,tp,pp,tp+pp"         # multi-GPU: layouts compared with one GPU (LAYOUTS)


# The dry run keeps process start-ups (about 3 CPU seconds each) few: one parity layout.
DRY_RUN = dict(seq_lens="64", tokens=64, hidden=256, train_steps=2, train_grad_accum=1,
               parity_steps=3, parity_layouts="tp")
# Shares of --minutes, in section order; a section may also use what the ones before it left unused.
# Correctness compiles the kernels (16 autotune tiles per dtype, head size and mask); speed then mostly reuses them.
SHARES = {"device": 0.03, "kernel correctness": 0.2, "kernel speed": 0.15, "training": 0.47, "multi-GPU": 0.15}
# (B, H, H_kv, T, D, causal): GQA and MQA, lengths off the tile grid, a sequence shorter than one tile
CASES = [(2, 8, 8, 1024, 128, True), (2, 8, 2, 1000, 128, True), (2, 4, 4, 777, 64, False),
         (1, 8, 1, 300, 64, True), (1, 2, 2, 17, 64, False)]
DRY_CASES = [(1, 4, 2, 50, 128, True), (1, 2, 2, 37, 64, False), (1, 4, 1, 5, 64, True)]
ATOL, PARITY_TOL = 1e-3, 1e-3
# the 124M preset shrunk for the CPU (head size 64, as in the preset)
DRY_TRAIN = dict(n_layer=1, n_head=2, n_embd=128, block_size=32, batch_size=1)
LAYOUTS = {"dp": (1, 1), "tp": (2, 1), "pp": (1, 2), "tp+pp": (2, 2)}  # (tp, pp); dp takes the other ranks
PARITY_MODEL = dict(n_layer=4, n_head=4, n_embd=256, block_size=256)
DRY_PARITY_MODEL = dict(n_layer=2, n_head=2, n_embd=64, block_size=32)
SECTIONS = {"correctness": "kernel correctness", "speed": "kernel speed", "training": "training", "multi": "multi-GPU"}
TORCHRUN_VARS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                 "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT"}


def parse_config():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(GPUBenchConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action="store_true")
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default, help=f"default {f.default!r}")
    cfg = GPUBenchConfig(**vars(parser.parse_args()))
    for flag, value, known in (("--parity-layouts", cfg.parity_layouts, LAYOUTS), ("--only", cfg.only, SECTIONS)):
        unknown = set(filter(None, value.split(","))) - set(known)
        if unknown:
            raise SystemExit(f"{flag}: unknown {', '.join(sorted(unknown))}; give a comma list of {', '.join(known)}.")
    return cfg


# ---------------------------------------------------------------------------------------------------
# The table, the clock, and the guard that turns any failure into a row

class Table:
    """The rows so far: each printed as it is added, and the JSON file rewritten (temp name, then rename)."""

    def __init__(self, path, meta):
        self.path, self.meta, self.rows = path, meta, []

    def add(self, section, name, status, result="", note="", **data):
        row = dict(section=section, name=name, status=status, result=result, note=note, **data)
        self.rows.append(row)
        print(row_line(row), flush=True)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path + ".tmp", "w") as f:
            json.dump({"meta": self.meta, "rows": self.rows}, f, indent=1)
        os.replace(self.path + ".tmp", self.path)


def row_line(row):
    return (f"{row['section']:<18} {row['name']:<34} {row['status']:<5} {row['result']}"
            + (f"  [{row['note']}]" if row["note"] else ""))


class Clock:
    """Section k ends by start + --minutes x (the shares of sections 1..k): time one leaves goes on."""

    def __init__(self, minutes):
        self.begin, self.total, self.shares = time.time(), 60 * minutes, 0.0
        self.section_end = self.begin + self.total

    def start(self, section):
        self.shares += SHARES[section]
        self.section_end = self.begin + self.total * min(self.shares, 1.0)

    def left(self):
        return self.section_end - time.time()


OUT_OF_TIME = "skipped: this section's share of --minutes is used up"


def one_line(e):
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:240] if lines else ''}"


@contextmanager
def guard(table, section, name):
    """Run one row's work; an exception becomes an error row that names it, never a crash of the table."""
    try:
        yield
    except Exception as e:
        table.add(section, name, "error", note=one_line(e))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def rate(x, unit):
    return f"{x / 1e12:.2f} T{unit}" if x >= 1e12 else f"{x / 1e9:.2f} G{unit}"


def median_ms(fn, on_gpu):
    """Median milliseconds of fn(): triton.testing.do_bench on a GPU (events, warm-up, L2 flushed),
    a plain wall clock over two calls on the CPU."""
    if on_gpu:
        from triton.testing import do_bench
        return do_bench(fn, return_mode="median")
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------------
# 1. Device: what it is, the peak train.py assumes, and the two ceilings measured

def device_section(table, on_gpu):
    """-> (the peak bf16 FLOP/s train.py assumes or None, the measured matmul FLOP/s or None)."""
    S, peak, matmul = "device", None, None
    with guard(table, S, "GPU"):
        try:
            import triton
            versions = f"torch {torch.__version__}, triton {triton.__version__}"
        except Exception as e:  # the rows that need it say so too
            versions = f"torch {torch.__version__}, no triton ({one_line(e)})"
        if not on_gpu:
            table.add(S, "GPU", "skip", "none: dry run on the CPU", versions)
        else:
            p = torch.cuda.get_device_properties(0)
            nccl = torch.cuda.nccl.version() if torch.distributed.is_nccl_available() else "none"
            nccl = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl
            table.add(S, "GPU", "ok", f"{p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
                      f"{p.total_memory / 2**30:.0f} GiB", f"{torch.cuda.device_count()} GPU(s); {versions}, "
                      f"CUDA {torch.version.cuda}, NCCL {nccl}")
    with guard(table, S, "peak assumed for MFU"):
        import train
        if on_gpu:
            name = torch.cuda.get_device_name(0)
            key = next((k for k, _ in train.PEAK_FLOPS if k in name), None)
            peak = train.peak_flops(torch.device("cuda", 0))
        table.add(S, "peak assumed for MFU", "info", f"{peak / 1e12:.0f} TFLOP/s" if peak else "none",
                  (f"train.PEAK_FLOPS entry {key!r} (bf16 dense, datasheet)" if peak else
                   f"no train.PEAK_FLOPS entry matches {name!r}: train.py prints no MFU") if on_gpu
                  else "no GPU: train.py prints no MFU on the CPU", peak_flops=peak)
    n, dtype = (8192, torch.bfloat16) if on_gpu else (256, torch.float32)
    device = "cuda" if on_gpu else "cpu"
    with guard(table, S, "matmul"):
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))  # random: zeros run faster
        matmul = 2 * n**3 / (median_ms(lambda: a @ b, on_gpu) * 1e-3)
        table.add(S, f"{str(dtype)[6:]} matmul {n}^3", "ok", rate(matmul, "FLOP/s"),
                  f"{100 * matmul / peak:.0f}% of the assumed peak" if peak else "", flops_per_sec=matmul)
        del a, b
    with guard(table, S, "device copy"):
        x = torch.randn((2**28 if on_gpu else 2**22) // 4, device=device)  # 256 MiB: several times the L2
        y = torch.empty_like(x)
        seconds = median_ms(lambda: y.copy_(x), on_gpu) * 1e-3
        table.add(S, "device copy", "ok", rate(2 * x.numel() * 4 / seconds, "B/s"),
                  "bytes read + written", bytes_per_sec=2 * x.numel() * 4 / seconds)
        del x, y
    return peak, matmul


# ---------------------------------------------------------------------------------------------------
# 2. Kernel correctness against float64

def sdpa(q, k, v, causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])


def outputs_and_grads(attend, q, k, v, do):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = attend(q, k, v)
    return [out, *torch.autograd.grad(out, (q, k, v), do)]


def correctness_section(table, clock, device, dtypes, cases):
    from attention_kernel import attention
    S = "kernel correctness"
    table.add(S, "rule", "info", "kernel err / SDPA err, max |x - float64 SDPA|",
              f"ok when kernel <= 2 x SDPA (same dtype) + {ATOL:g}: FlashAttention's test rule")
    for dtype in dtypes:
        for B, H, H_kv, T, D, causal in cases:
            name = f"{str(dtype)[6:]} B{B} H{H}/{H_kv} T{T} D{D} {'causal' if causal else 'full'}"
            if clock.left() <= 0:
                table.add(S, name, "skip", note=OUT_OF_TIME)
                continue
            with guard(table, S, name):
                q = torch.randn(B, H, T, D, device=device, dtype=torch.float64)  # fresh inputs each case
                k, v = (torch.randn(B, H_kv, T, D, device=device, dtype=torch.float64) for _ in range(2))
                do = torch.randn(B, H, T, D, device=device, dtype=torch.float64)
                exact = outputs_and_grads(lambda q, k, v: sdpa(q, k, v, causal), q, k, v, do)
                low = [x.to(dtype) for x in (q, k, v, do)]
                ours = outputs_and_grads(lambda q, k, v: attention(q, k, v, causal), *low)
                theirs = outputs_and_grads(lambda q, k, v: sdpa(q, k, v, causal), *low)
                errors = {what: [(a.double() - ref).abs().max().item(), (b.double() - ref).abs().max().item()]
                          for what, a, b, ref in zip(("out", "dq", "dk", "dv"), ours, theirs, exact)}
                ok = all(err <= 2 * base + ATOL for err, base in errors.values())  # NaN never passes
                table.add(S, name, "ok" if ok else "FAIL",
                          "  ".join(f"{w} {e:.1e}/{b:.1e}" for w, (e, b) in errors.items()), errors=errors)


# ---------------------------------------------------------------------------------------------------
# 3. Kernel speed against SDPA's backends

def time_passes(attend, q, k, v, on_gpu):
    """Milliseconds of forward, backward alone, and forward + backward (gradients returned, not accumulated)."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = attend(q, k, v)
    do = torch.randn_like(out)
    torch.autograd.grad(out, (q, k, v), do, retain_graph=True)  # compilation and autotuning happen here
    return {"fwd": median_ms(lambda: attend(q, k, v), on_gpu),
            "bwd": median_ms(lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True), on_gpu),
            "fwd+bwd": median_ms(lambda: torch.autograd.grad(attend(q, k, v), (q, k, v), do), on_gpu)}


def chosen_tiles():
    """The tiles each autotuned kernel used in its last launch (attention_kernel keeps the built kernels
    in _built[interpret]; triton's Autotuner records best_config)."""
    import attention_kernel
    try:  # private names: if they move, this row says so and the timings stand
        kernels = attention_kernel._built.get(False)
        if kernels is None:
            return f"no autotuning under the interpreter: fixed tiles {attention_kernel.INTERPRET_BLOCKS}"
        tiles = []
        for name in ("fwd", "dkdv", "dq"):
            c = getattr(kernels[name], "best_config", None)
            tiles.append(f"{name} {c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']} w{c.num_warps} s{c.num_stages}"
                         if c else f"{name} not recorded")
        return " | ".join(tiles)
    except Exception as e:
        return f"not readable: {one_line(e)}"


def speed_section(table, clock, cfg, device, dtype, on_gpu):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from attention_kernel import attention
    S, D, refused = "kernel speed", cfg.head_dim, set()
    backends = {"triton": None, "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION, "default": None}  # default: SDPA's own choice
    table.add(S, "setup", "info", f"causal {str(dtype)[6:]}, D {D}, {cfg.tokens} tokens, H {cfg.hidden // D}",
              "TFLOP/s: 2BHT^2D forward (causal half of 4BHT^2D), 2.5x that backward; do_bench medians")
    for T in [int(t) for t in cfg.seq_lens.split(",")]:
        B, H = max(cfg.tokens // T, 1), cfg.hidden // D
        if clock.left() <= 0:
            table.add(S, f"T {T}", "skip", note=OUT_OF_TIME)
            continue
        with guard(table, S, f"T {T}"):
            q, k, v = (torch.randn(B, H, T, D, device=device, dtype=dtype) for _ in range(3))
            fwd_flops = 4 * B * H * T * T * D / 2
            flops = {"fwd": fwd_flops, "bwd": 2.5 * fwd_flops, "fwd+bwd": 3.5 * fwd_flops}
            tflops, tiles = {}, None
            for name, backend in backends.items():
                attend = (lambda q, k, v: attention(q, k, v, True)) if name == "triton" else \
                    (lambda q, k, v: sdpa(q, k, v, True))
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    try:
                        with sdpa_kernel([backend]) if backend is not None else nullcontext():
                            ms = time_passes(attend, q, k, v, on_gpu)
                        tflops[name] = {p: flops[p] / (ms[p] * 1e-3) / 1e12 for p in ms}
                        tiles = chosen_tiles() if name == "triton" else tiles
                    except Exception as e:  # SDPA's warnings say why ("... not used because:", the reason)
                        why = [str(w.message).strip() for w in caught if not str(w.message).strip().endswith(":")]
                        why = why[0].splitlines()[0][:200] if why and name != "triton" else one_line(e)
                        if name == "triton":
                            table.add(S, f"T {T} triton", "error", note=why)
                        elif name not in refused:
                            table.add(S, f"T {T} {name}", "skip", note="refused: " + why)
                        refused.add(name)
                        if on_gpu:
                            torch.cuda.empty_cache()
            for p in ("fwd", "bwd", "fwd+bwd"):
                cells = " | ".join(f"{n} {t[p]:.0f}" if on_gpu else f"{n} {t[p]:.3g}" for n, t in tflops.items())
                sdpa_best = max((t[p] for n, t in tflops.items() if n != "triton"), default=None)
                ratio = (f"triton / best SDPA {tflops['triton'][p] / sdpa_best:.2f}x"
                         if sdpa_best and "triton" in tflops else "")
                table.add(S, f"{p} T {T} B {B}", "ok" if "triton" in tflops else "error", cells, ratio,
                          tflops={n: t[p] for n, t in tflops.items()})
            if tiles:
                table.add(S, f"tiles T {T}", "info", tiles)
            del q, k, v


# ---------------------------------------------------------------------------------------------------
# Starting processes: one plain process, or `world` ranks with the environment torchrun would give them

def child_env(dry_run):
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS and not k.startswith("TORCHELASTIC")}
    if dry_run:  # inductor compiles in this process: no pool of compile workers on a small CPU
        env.update(TRITON_INTERPRET="1", OMP_NUM_THREADS="1", TORCHINDUCTOR_COMPILE_THREADS="1")
    return env


def launch(argv, world, env, timeout, log_dir):
    """Run `python argv` as one process (world 1) or as `world` ranks; raise with the failing rank's
    last line (for train.py that is its one-sentence error). Each rank is a process group of its own,
    so a timeout also stops what it started (torch.compile's workers)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs, logs = [], [os.path.join(log_dir, f"rank{r}.log") for r in range(world)]
    for rank in range(world):
        rank_env = env if world == 1 else {**env, "RANK": str(rank), "LOCAL_RANK": str(rank),
                                           "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
                                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        with open(logs[rank], "w") as log:
            procs.append(subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=rank_env, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.time() + timeout
    while any(p.poll() is None for p in procs):
        if time.time() > deadline or any(p.returncode not in (None, 0) for p in procs):
            for p in procs:
                if p.poll() is None:
                    try:
                        os.killpg(p.pid, signal.SIGKILL)
                    except ProcessLookupError:  # it ended just now
                        pass
                    p.wait()
            break
        time.sleep(0.1)
    failed = sorted((p.returncode == -signal.SIGKILL, rank) for rank, p in enumerate(procs) if p.returncode)
    if failed:  # a rank that failed by itself first, not one killed above
        rank = failed[0][1]
        lines = [line for line in open(logs[rank]).read().splitlines() if line.strip()]
        why = f"timed out after {timeout:.0f} s" if failed[0][0] else f"exit status {procs[rank].returncode}"
        raise RuntimeError(f"rank {rank} of {world}: {why}: {lines[-1][:240] if lines else 'no output'}")


def write_tokens(folder, vocab, n_train, n_val):
    """Random uint16 token shards and the meta.json train.py reads (synthetic: no text behind the bytes)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, n in (("train.bin", n_train), ("val.bin", n_val)):
        rng.integers(0, vocab, n, dtype=np.uint16).tofile(os.path.join(folder, name))
    meta = dict(vocab_size=vocab, dtype="uint16", train_tokens=n_train, val_tokens=n_val,
                train_bytes=n_train, val_bytes=n_val)
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(meta, f)
    return folder


def losses(out_dir):
    return [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl")) if line.strip()]


# ---------------------------------------------------------------------------------------------------
# 4. Training: the gpt2-124m preset through train.py, one process per attention implementation

def train_worker(stats_path, argv):
    """Runs in a process of its own: train.main(argv), then the peak memory that log.jsonl does not hold."""
    import train
    train.main(argv)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        stats = {"peak_memory": torch.cuda.max_memory_allocated(), "what": "torch.cuda.max_memory_allocated"}
    else:
        stats = {"peak_memory": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "what": "peak RSS"}
    with open(stats_path, "w") as f:
        json.dump(stats, f)


def flops_per_token(train_config, vocab):
    """model.py's count (6 x matmul weights + 12 x layers x heads x head size x T) for the model train.py
    builds from this TrainConfig (every field the two configs share), built on the meta device."""
    from model import GPT, GPTConfig
    shared = {f.name for f in fields(GPTConfig)} & {f.name for f in fields(train_config)}
    with torch.device("meta"):
        model = GPT(GPTConfig(**{k: getattr(train_config, k) for k in shared}, vocab_size=vocab))
    return model.flops_per_token(train_config.block_size)


def plan_of(train_flags):
    """train.py --plan with these flags, in this process -> the plan (the JSON object on its last line)."""
    import train
    printed = io.StringIO()
    with redirect_stdout(printed):
        train.main(["--plan", *train_flags])
    return json.loads(printed.getvalue().strip().splitlines()[-1])


def plan_row(plan):
    return (f"dp {plan['dp']} x tp {plan['tp']} x pp {plan['pp']}, micro-batch {plan['micro_batch']} x "
            f"{plan['grad_accum']} accumulation = {plan['tokens_per_step']:,} tokens/step, estimated peak "
            f"{plan['peak_memory_gb']:.2f} GiB" + (f" of {plan['gpu_memory_gb']:.0f}" if plan["gpu_memory_gb"] else ""))


def training_section(table, clock, cfg, env, tmp, on_gpu, peak, matmul_rate):
    import train
    S, vocab = "training", 50304 if on_gpu else 512  # GPT-2's 50257 rounded up to a multiple of 64
    run = train.TrainConfig(**{**train.PRESETS["gpt2-124m"], **({} if on_gpu else DRY_TRAIN)})
    tokens_per_step = run.batch_size * cfg.train_grad_accum * run.block_size
    data_dir = write_tokens(os.path.join(tmp, "train_data"), vocab, 10_000_000 if on_gpu else 100_000, 100_000)
    flags = ["--preset", "gpt2-124m", "--data-dir", data_dir, "--max-steps", str(cfg.train_steps),
             "--eval-interval", "0", "--eval-steps", "1", "--grad-accum", str(cfg.train_grad_accum)]
    flags += [] if on_gpu else ["--device", "cpu", "--dtype", "float32"] + [
        f"--{k.replace('_', '-')}={v}" for k, v in DRY_TRAIN.items()]
    # the plans: the preset on every GPU of this node (what `torchrun --nproc-per-node gpu train.py --preset
    # gpt2-124m` runs), and the run below on one; the dry run plans for 2 GPUs of 80 GiB
    gpus, memory = (torch.cuda.device_count(), torch.cuda.get_device_properties(0).total_memory / 2**30) \
        if on_gpu else (2, 80.0)
    run_plan = None
    if clock.left() < 5:
        table.add(S, "plan", "skip", note=OUT_OF_TIME)
    else:
        with guard(table, S, "plan"):
            plan = plan_of(["--preset", "gpt2-124m", "--gpus", str(gpus), "--gpu-memory", str(memory)])
            table.add(S, f"plan: gpt2-124m on {gpus} GPU(s)", "ok" if plan["fits"] else "FAIL", plan_row(plan),
                      "train.py --plan" + ("" if on_gpu else "; dry run: 2 GPUs of 80 GiB assumed"), plan=plan)
            run_plan = plan_of([*flags, "--gpus", "1"] + (["--gpu-memory", str(memory)] if on_gpu else []))
            table.add(S, "plan: the run below", "info", plan_row(run_plan), "eager estimate; compiled keeps less",
                      plan=run_plan)
    fpt, speeds = flops_per_token(run, vocab), {}
    for i, attn in enumerate(("sdpa", "triton")):
        # compiled as the preset runs, except the Triton kernel under its CPU interpreter
        compiled = on_gpu or attn == "sdpa"
        name = (f"gpt2-124m --attn {attn}" if on_gpu else f"tiny preset --attn {attn}") + (" compiled" * compiled)
        timeout = clock.left() / (2 - i)  # the first run leaves the second its half
        if timeout < 5:
            table.add(S, name, "skip", note=OUT_OF_TIME)
            continue
        with guard(table, S, name):
            out_dir, stats_path = os.path.join(tmp, f"train_{attn}"), os.path.join(tmp, f"train_{attn}.json")
            os.makedirs(out_dir)
            launch([__file__, "_train", stats_path, *flags, "--out-dir", out_dir, "--attn", attn,
                    "--compile" if compiled else "--no-compile"], 1, env, timeout, out_dir)
            rows, stats = losses(out_dir), json.load(open(stats_path))
            timed = rows[len(rows) // 3:]  # the first third holds compilation and autotuning
            speeds[attn] = statistics.median(r["tokens_per_sec"] for r in timed)
            mfu = [f"MFU {100 * fpt * speeds[attn] / p:.1f}% of {what}" for p, what in
                   ((peak, "assumed peak"), (matmul_rate, "measured matmul")) if p and on_gpu]
            table.add(S, name, "ok", f"{speeds[attn]:,.0f} tok/s | " + " | ".join(mfu or ["MFU n/a on the CPU"])
                      + f" | peak memory {stats['peak_memory'] / 2**30:.2f} GiB"
                      + (f" (plan: {run_plan['peak_memory_gb']:.2f})" if run_plan and on_gpu else ""),
                      f"{stats['what']}; median of steps {timed[0]['step']}-{timed[-1]['step']}, {tokens_per_step:,} "
                      f"tokens/step; step 1 took {tokens_per_step / rows[0]['tokens_per_sec']:.1f} s; "
                      f"loss {rows[0]['loss']:.2f} -> {rows[-1]['loss']:.2f}",
                      tokens_per_sec=speeds[attn], flops_per_token=fpt, peak_memory=stats["peak_memory"],
                      compiled=compiled)
            shutil.rmtree(out_dir)  # the checkpoint (1.5 GB for the preset)
    if len(speeds) == 2:
        table.add(S, "triton / sdpa", "info", f"{speeds['triton'] / speeds['sdpa']:.2f}x tokens/s")


# ---------------------------------------------------------------------------------------------------
# 5. Several GPUs: all-reduce bandwidth, and train.py's layouts against one GPU

def allreduce_worker(out_path, backend, sizes):
    """Runs as every rank: per size, a checked all-reduce (each rank adds rank+1), then the time of 20."""
    import torch.distributed as dist
    dist.init_process_group(backend)
    rank, n = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if backend == "nccl" else torch.device("cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    results = []
    for size in sizes:
        x = torch.full((size // 4,), rank + 1.0, device=device)
        dist.all_reduce(x)
        correct = bool((x == n * (n + 1) / 2).all())
        x.uniform_()  # random data for timing; 20 sums of 8 ranks stay far below fp32's max
        for _ in range(3):
            dist.all_reduce(x)
        sync()
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(20):
            dist.all_reduce(x)
        sync()
        seconds = (time.perf_counter() - t0) / 20
        results.append(dict(bytes=size, seconds=seconds, algbw=size / seconds,
                            busbw=size / seconds * 2 * (n - 1) / n, correct=correct))
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


def multi_gpu_section(table, clock, cfg, env, tmp, on_gpu):
    import torch.distributed as dist
    S = "multi-GPU"
    n, backend = (min(torch.cuda.device_count(), 8), "nccl") if on_gpu else (2, "gloo")
    if n < 2 or not dist.is_available() or not dist.is_backend_available(backend):
        why = "one GPU only" if n < 2 else f"this torch build has no {backend}"
        table.add(S, "all-reduce, dp/tp/pp parity", "skip", note=why)
        return
    sizes = [2**20, 2**24, 2**28] if on_gpu else [2**12, 2**16, 2**20]
    if clock.left() < 5:
        table.add(S, f"all-reduce x{n}", "skip", note=OUT_OF_TIME)
    else:
        with guard(table, S, f"all-reduce x{n}"):
            path = os.path.join(tmp, "allreduce.json")
            launch([__file__, "_allreduce", path, backend, *map(str, sizes)], n, env, clock.left() / 4, tmp)
            for r in json.load(open(path)):
                table.add(S, f"all-reduce {r['bytes'] // 1024:,} KiB x{n}", "ok" if r["correct"] else "FAIL",
                          f"busbw {rate(r['busbw'], 'B/s')} (algbw {rate(r['algbw'], 'B/s')})",
                          f"{backend}, fp32, mean of 20; result " + ("checked" if r["correct"] else "WRONG"), **r)
    # Each layout takes as many of the n ranks as it can (dp fills what tp x pp leave); every one trains
    # on the same global batch (lcm of the dp sizes sequences, 2 micro-batches), dp ranks splitting it.
    layouts = [("1 GPU", 1, 1, 1)]
    for name in filter(None, cfg.parity_layouts.split(",")):
        tp, pp = LAYOUTS[name]
        world = n - n % (tp * pp)
        if world < tp * pp:
            table.add(S, f"{name} vs 1 GPU", "skip", note=f"needs {tp * pp} GPUs")
            continue
        layouts.append((f"dp {world // (tp * pp)} x tp {tp} x pp {pp}", tp, pp, world))
    batch = math.lcm(*(world // (tp * pp) for _, tp, pp, world in layouts))
    vocab, model = (50304, PARITY_MODEL) if on_gpu else (512, DRY_PARITY_MODEL)
    data_dir = write_tokens(os.path.join(tmp, "parity_data"), vocab, 1_000_000, 100_000)
    flags = ["train.py", "--data-dir", data_dir, "--max-steps", str(cfg.parity_steps), "--grad-accum", "2",
             "--eval-interval", "0", "--eval-steps", "1", "--dtype", "float32", "--no-compile", "--lr", "1e-4",
             "--warmup-steps", "1", "--device", "cuda" if on_gpu else "cpu", "--attn", "sdpa"]
    flags += [f"--{k.replace('_', '-')}={v}" for k, v in model.items()]
    env = {**env, "NVIDIA_TF32_OVERRIDE": "0"}  # train.py turns TF32 on; cuBLAS/cuDNN honour this override
    reference = None
    for i, (name, tp, pp, world) in enumerate(layouts):
        row = f"{name} vs 1 GPU" if i else "1 GPU reference"
        if clock.left() < 5 or (i and reference is None):
            table.add(S, row, "skip", note=OUT_OF_TIME if clock.left() < 5 else "no 1-GPU reference")
            continue
        with guard(table, S, row):
            out_dir = os.path.join(tmp, f"parity{i}")
            os.makedirs(out_dir)
            launch([*flags, "--out-dir", out_dir, "--tp", str(tp), "--pp", str(pp), "--batch-size",
                    str(batch * tp * pp // world)], world, env, clock.left() / (len(layouts) - i), out_dir)
            got = [r["loss"] for r in losses(out_dir)]
            if reference is None:
                reference = got
                table.add(S, row, "info", f"losses {' '.join(f'{x:.4f}' for x in got)}",
                          f"fp32, TF32 off, lr 1e-4, {batch} x 2 x {model['block_size']} tokens/step", losses=got)
                continue
            diff = max(abs(a - b) for a, b in zip(got, reference)) if len(got) == len(reference) else float("inf")
            table.add(S, row, "ok" if diff <= PARITY_TOL else "FAIL",
                      f"max |loss - 1 GPU| {diff:.1e} over {len(got)} steps",
                      f"{world} ranks, {backend}; ok when <= {PARITY_TOL:g}", max_diff=diff, losses=got)


# ---------------------------------------------------------------------------------------------------

def main():
    if sys.argv[1:2] == ["_train"]:  # the processes this script starts run these
        return train_worker(sys.argv[2], sys.argv[3:])
    if sys.argv[1:2] == ["_allreduce"]:
        return allreduce_worker(sys.argv[2], sys.argv[3], [int(s) for s in sys.argv[4:]])
    cfg = parse_config()
    if int(os.environ.get("RANK", "0")) > 0:
        return  # under torchrun: rank 0 drives everything and starts its own ranks for the multi-GPU rows
    if cfg.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before attention_kernel's first call wraps its kernels
        cfg = replace(cfg, **DRY_RUN)
    on_gpu = torch.cuda.is_available() and not cfg.dry_run
    device, dtype = ("cuda", torch.bfloat16) if on_gpu else ("cpu", torch.float32)
    commit = subprocess.run("git rev-parse --short HEAD", shell=True, cwd=ROOT, capture_output=True, text=True)
    table = Table(cfg.out, {"config": asdict(cfg), "commit": commit.stdout.strip() or "?",
                            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                            "device": torch.cuda.get_device_name(0) if on_gpu else "cpu" + " (dry run)" * cfg.dry_run})
    if not on_gpu and not cfg.dry_run:
        table.add("device", "GPU", "skip", note="no CUDA GPU is visible; --dry-run runs every section on the CPU")
        return
    clock, env = Clock(cfg.minutes), child_env(cfg.dry_run)
    with tempfile.TemporaryDirectory() as tmp:
        clock.start("device")
        peak, matmul_rate = device_section(table, on_gpu)
        sections = [
            ("correctness", lambda: correctness_section(
                table, clock, device, [torch.bfloat16, torch.float16] if on_gpu else [torch.float32, torch.float16],
                CASES if on_gpu else DRY_CASES)),
            ("speed", lambda: speed_section(table, clock, cfg, device, dtype, on_gpu)),
            ("training", lambda: training_section(table, clock, cfg, env, tmp, on_gpu, peak, matmul_rate)),
            ("multi", lambda: multi_gpu_section(table, clock, cfg, env, tmp, on_gpu))]
        for key, run in sections:
            clock.start(SECTIONS[key])  # a section left out hands its share on to the next one run
            if cfg.only and key not in cfg.only.split(","):
                continue
            with guard(table, SECTIONS[key], "section"):
                run()
            if on_gpu:
                torch.cuda.empty_cache()
    print(f"\n=== bench/gpu.py on {table.meta['device']}, commit {table.meta['commit']}: the whole table "
          f"(also in {cfg.out}) ===")
    for row in table.rows:
        print(row_line(row))
    counts = {s: sum(r["status"] == s for r in table.rows) for s in ("ok", "FAIL", "error", "skip")}
    print(", ".join(f"{n} {s}" for s, n in counts.items()))
    sys.exit(1 if counts["FAIL"] or counts["error"] else 0)


if __name__ == "__main__":
    main()
