"""
Attention speed: attention_kernel.attention (Triton) against PyTorch SDPA's backends, in TFLOP/s.

    python bench/attention.py                      # GPU: causal bf16, D 64 and 128, T 512 .. 16k
    python bench/attention.py --check              # GPU: bf16 kernel vs float32 reference, errors
    python bench/attention.py --interpret-smoke    # CPU: tiny shapes through Triton's interpreter

The grid is FlashAttention's: 16k tokens per batch (B = tokens / T), hidden size 2048 (H = 2048 / D).
Each SDPA backend is pinned with torch.nn.attention.sdpa_kernel (FLASH_ATTENTION, CUDNN_ATTENTION,
EFFICIENT_ATTENTION), plus SDPA's own choice ("default"). Times are triton.testing.do_bench medians.
FLOPs: forward 4*B*H*T^2*D (two matmuls), halved when causal; backward 2.5x forward (five matmuls,
of which one recomputes S). Prints one table row per (D, T, pass) with TFLOP/s per implementation
and the Triton kernel's ratio to FLASH_ATTENTION and to the default; "n/a" where a backend refuses.
Without a GPU it prints a skip message (use --interpret-smoke to exercise the script logic).
"""
import argparse
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from train import field_help  # noqa: E402


@dataclass
class BenchConfig:
    head_dims: str = "64,128"                          # comma-separated head sizes D
    seq_lens: str = "512,1024,2048,4096,8192,16384"    # comma-separated sequence lengths T
    tokens: int = 16384                                # B * T per measurement
    hidden: int = 2048                                 # H * D
    check: bool = False                                # accuracy check instead of timing
    interpret_smoke: bool = False                      # CPU run of the timing loop, tiny shapes


def parse_config():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    helps = field_help(BenchConfig)  # as train.py does: the field comments are the --help
    for f in fields(BenchConfig):
        flag, text = "--" + f.name.replace("_", "-"), f"{helps[f.name]} (default: {f.default})"
        if f.type is bool:
            parser.add_argument(flag, action="store_true", help=text)
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default, help=text)
    return BenchConfig(**vars(parser.parse_args()))


# ---------------------------------------------------------------------------------------------------
# The contenders. Each takes q, k, v of shape (B, H, T, D) and returns (B, H, T, D).

def sdpa_backends():
    from torch.nn.attention import SDPBackend
    return {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "default": None}


def run_sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def run_triton(q, k, v):
    from attention_kernel import attention
    return attention(q, k, v, causal=True)


def pinned(backend):
    """A context that forces one SDPA backend (or changes nothing for the default)."""
    from contextlib import nullcontext
    from torch.nn.attention import sdpa_kernel
    return nullcontext() if backend is None else sdpa_kernel([backend])


# ---------------------------------------------------------------------------------------------------
# Timing: do_bench medians on the GPU; plain wall-clock medians for the CPU smoke run.

def median_ms(fn, on_gpu):
    if on_gpu:
        from triton.testing import do_bench
        return do_bench(fn, return_mode="median")
    times = []
    for _ in range(2):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def time_passes(attend, q, k, v, on_gpu):
    """Milliseconds for forward, backward alone, and forward + backward."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = attend(q, k, v)                      # also triggers compilation / autotuning
    do = torch.randn_like(out)
    fwd = median_ms(lambda: attend(q, k, v), on_gpu)
    bwd = median_ms(lambda: out.backward(do, retain_graph=True), on_gpu)
    both = median_ms(lambda: attend(q, k, v).backward(do), on_gpu)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": both}


def attention_flops(B, H, T, D, causal=True):
    fwd = 4 * B * H * T * T * D / (2 if causal else 1)
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}


def benchmark(config, on_gpu, dtype):
    names = ["triton"] + list(sdpa_backends())
    header = f"{'D':>4} {'T':>6} {'B':>4} {'H':>3} {'pass':>8} " + " ".join(f"{n:>9}" for n in names)
    print(f"TFLOP/s, causal, {dtype}, {config.tokens} tokens, hidden {config.hidden}")
    print(header + f" {'vs flash':>8} {'vs default':>10}")
    for D in [int(x) for x in config.head_dims.split(",")]:
        for T in [int(x) for x in config.seq_lens.split(",")]:
            B, H = max(config.tokens // T, 1), config.hidden // D
            device = "cuda" if on_gpu else "cpu"
            q, k, v = (torch.randn(B, H, T, D, device=device, dtype=dtype) for _ in range(3))
            flops = attention_flops(B, H, T, D)
            tflops = {}
            for name in names:
                try:
                    if name == "triton":
                        ms = time_passes(run_triton, q, k, v, on_gpu)
                    else:
                        with pinned(sdpa_backends()[name]):
                            ms = time_passes(run_sdpa, q, k, v, on_gpu)
                    tflops[name] = {p: flops[p] / (ms[p] * 1e-3) / 1e12 for p in ms}
                except RuntimeError:  # the backend does not support this device/dtype/shape
                    tflops[name] = None
            for p in ("fwd", "bwd", "fwd+bwd"):
                cells = [f"{tflops[n][p]:9.4g}" if tflops[n] else f"{'n/a':>9}" for n in names]
                ratios = [f"{tflops['triton'][p] / tflops[base][p]:.2f}x" if tflops[base] and tflops["triton"]
                          else "n/a" for base in ("flash", "default")]
                print(f"{D:>4} {T:>6} {B:>4} {H:>3} {p:>8} " + " ".join(cells)
                      + f" {ratios[0]:>8} {ratios[1]:>10}")


# ---------------------------------------------------------------------------------------------------
# --check: the bf16 kernel against float32 math, next to bf16 SDPA against the same reference.

def reference_attention(q, k, v, causal):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])                  # (B, H, T, T)
    if causal:
        T = q.shape[2]
        scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=q.device).tril(),
                                    float("-inf"))
    return scores.softmax(dim=-1) @ v


def outputs_and_grads(attend, q, k, v, do):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = attend(q, k, v)
    out.backward(do)
    return [out, q.grad, k.grad, v.grad]


def check(dtype=torch.bfloat16):
    from attention_kernel import attention
    print(f"max |error| against float32 math: Triton {dtype} vs SDPA {dtype} (allowed: 2x SDPA + 1e-3)")
    print(f"{'B':>2} {'H':>3} {'H_kv':>4} {'T':>5} {'D':>4} {'causal':>6}  out / dq / dk / dv")
    failures = 0
    for B, H, H_kv, T, D, causal in [(2, 16, 16, 512, 64, True), (1, 16, 4, 1000, 128, True),
                                     (2, 8, 8, 777, 64, False), (1, 8, 2, 2048, 128, False),
                                     (4, 4, 1, 333, 32, True), (1, 4, 4, 1, 16, True)]:
        q = torch.randn(B, H, T, D, device="cuda")
        k, v = (torch.randn(B, H_kv, T, D, device="cuda") for _ in range(2))
        do = torch.randn(B, H, T, D, device="cuda")
        exact = outputs_and_grads(lambda q, k, v: reference_attention(q, k, v, causal), q, k, v, do)
        low = [x.to(dtype) for x in (q, k, v, do)]
        ours = outputs_and_grads(lambda q, k, v: attention(q, k, v, causal=causal), *low)
        theirs = outputs_and_grads(lambda q, k, v: F.scaled_dot_product_attention(
            q, k, v, is_causal=causal, enable_gqa=H != H_kv), *low)
        cells = []
        for a, b, ref in zip(ours, theirs, exact):
            err, base = (a.float() - ref).abs().max().item(), (b.float() - ref).abs().max().item()
            ok = err <= 2 * base + 1e-3
            failures += not ok
            cells.append(f"{err:.1e}/{base:.1e}{'' if ok else ' FAIL'}")
        print(f"{B:>2} {H:>3} {H_kv:>4} {T:>5} {D:>4} {causal!s:>6}  " + "  ".join(cells))
    print("all within tolerance" if failures == 0 else f"{failures} values out of tolerance")
    return failures


def main():
    config = parse_config()
    if config.interpret_smoke:
        # The interpreter is chosen when triton wraps a kernel; attention_kernel wraps on first use.
        os.environ["TRITON_INTERPRET"] = "1"
        smoke = BenchConfig(head_dims="16", seq_lens="32,64", tokens=64, hidden=32)
        benchmark(smoke, on_gpu=False, dtype=torch.float32)  # bf16 tl.dot is wrong in the interpreter
        return
    if not torch.cuda.is_available():
        print("bench/attention.py: no CUDA GPU here, skipping (try --interpret-smoke on the CPU).")
        return
    if config.check:
        sys.exit(1 if check() else 0)
    torch.backends.cuda.matmul.allow_tf32 = True
    print(f"device: {torch.cuda.get_device_name()}")
    benchmark(config, on_gpu=True, dtype=torch.bfloat16)


if __name__ == "__main__":
    main()
