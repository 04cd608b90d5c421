"""
Fused attention in Triton (FlashAttention-2 style): forward and backward kernels behind one
differentiable function, `attention(q, k, v, causal=True, sm_scale=None)`.

    from attention_kernel import attention
    y = attention(q, k, v, causal=True)    # q (B, H, T, D); k, v (B, H_kv, T, D) -> y (B, H, T, D)

model.py calls it for `attn_impl="triton"` (training and prefill); tests compare it with float64
PyTorch attention (`python -m pytest -q test_all.py -k attention_kernel`), `python bench/gpu.py` checks
it in bf16/fp16 and times it against every SDPA backend on a GPU.
Runs on a CUDA GPU, or on the CPU under Triton's interpreter (set TRITON_INTERPRET=1; slow, tiny
shapes only, float32/float16). It prints nothing.

Design choices:
- Forward: one program per (block of BLOCK_M queries, batch*head); it streams over key blocks with
  the online softmax, so the (T, T) score matrix never exists. It saves O and the row log-sum-exp.
- Backward: a Delta = rowsum(dO * O) pre-pass, then two kernels that each own what they write:
  dK/dV per key block, dQ per query block. No atomics, so gradients are bit-for-bit repeatable.
- Grouped-query attention: query head h reads key/value head h // (H / H_kv) (the same grouping
  as repeat_interleave and sdpa's enable_gqa). The dK/dV program of a key/value head loops over the
  H / H_kv query heads of its group and sums in registers: deterministic, no (B, H, T, D) buffers
  for per-query-head dK/dV and no extra reduction pass afterwards.
- Causal means query i sees keys 0..i with T_q == T_k (training, prefill); cached decode uses
  model.py's plain path. Key blocks past the diagonal are skipped; the mask is applied only on
  blocks that straddle the diagonal or the ragged end (T need not be a multiple of the block).
- Scores are kept in base 2: exp(x) = exp2(x * log2(e)), and log2(e) is folded into the scale.
- The backward recomputes P = exp2(s - lse) from scores it computes again, with other tiles and
  operand order than the forward that summed them into lse. Nothing promises bit-identical dot
  products across those (numpy's matmul under the interpreter rounds them differently), so a
  recomputed P is off by the scores' rounding error, which a one-pass softmax cancels when it
  normalises its own scores. In float32 that leaves dK and dV up to ~3x further from exact than
  PyTorch's autograd in peaked rows (a few parts in a million of the largest entry); the tests
  allow for it by a first-order bound (test_all.attn_recompute_slack).
- Head size D in {16, 32, 64, 128}. Inputs may be non-contiguous (strides are passed).
- Triton is imported on the first call, not at import, so model.py imports this module cheaply.
  triton.jit reads TRITON_INTERPRET when it wraps a function, not when the kernel launches, so the
  kernels are wrapped on first use (once per mode): setting TRITON_INTERPRET=1 any time before the
  first call works, even if triton itself was imported earlier (see _kernels()).
"""
from __future__ import annotations  # annotations stay strings: `tl.constexpr` needs no triton at import

import math

import torch

LOG2E = 1.4426950408889634  # log2(e): exp(x) == exp2(x * LOG2E)
HEAD_DIMS = (16, 32, 64, 128)

# ---------------------------------------------------------------------------------------------------
# Kernels. Plain functions here; _kernels() wraps them with triton.jit on first use. `tl` is the
# module global bound there. Every kernel gets explicit strides, so any layout of q/k/v/dO works.
# In each loop `phase` is unrolled at compile time: phase 0 walks the key (or query) blocks that need
# no mask at all, phase 1 the few that straddle the causal diagonal or the end of the sequence.


def _attn_fwd(Q, K, V, O, LSE,
              sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d,
              sv_b, sv_h, sv_t, sv_d, so_b, so_h, so_t, so_d,
              H, T, T_bucket, qk_scale,
              GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
              DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Online softmax for one row i, over key blocks j: keep the running max m, the running sum
    # l = sum exp2(s - m) and the unnormalised output acc = sum exp2(s - m) v. When a block raises the
    # max to m', rescale l and acc by exp2(m - m'). At the end O = acc / l, lse = m + log2(l).
    tl.static_assert(BLOCK_M % BLOCK_N == 0)  # the diagonal starts on a key-block boundary
    # Causal: the last query blocks have the most keys to visit, so launch them first (less tail).
    start_m = tl.num_programs(0) - 1 - tl.program_id(0) if CAUSAL else tl.program_id(0)
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    q_base = Q + b.to(tl.int64) * sq_b + h.to(tl.int64) * sq_h
    k_base = K + b.to(tl.int64) * sk_b + (h // GROUP).to(tl.int64) * sk_h
    v_base = V + b.to(tl.int64) * sv_b + (h // GROUP).to(tl.int64) * sv_h
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_base + offs_m[:, None] * sq_t + offs_d[None, :] * sq_d,
                mask=offs_m[:, None] < T, other=0.0)                          # (BLOCK_M, D)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # Causal: keys below this block's first query are all visible, the next BLOCK_M keys straddle
    # the diagonal and later keys are skipped. Non-causal: only a ragged last key block is masked.
    if CAUSAL:
        free_end, masked_end = start_m * BLOCK_M, tl.minimum((start_m + 1) * BLOCK_M, T)
    else:
        free_end, masked_end = (T // BLOCK_N) * BLOCK_N, T
    for phase in tl.static_range(2):
        lo = 0 if phase == 0 else free_end
        hi = free_end if phase == 0 else masked_end
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k = tl.load(k_base + offs_n[:, None] * sk_t + offs_d[None, :] * sk_d,
                        mask=offs_n[:, None] < T, other=0.0)                  # (BLOCK_N, D)
            v = tl.load(v_base + offs_n[:, None] * sv_t + offs_d[None, :] * sv_d,
                        mask=offs_n[:, None] < T, other=0.0)                  # (BLOCK_N, D)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
            if phase == 1:
                visible = offs_n[None, :] < T
                if CAUSAL:
                    visible = visible & (offs_m[:, None] >= offs_n[None, :])
                s = tl.where(visible, s, float("-inf"))
            # Every row meets a visible key in its first block (key 0 or its own diagonal), so
            # m_new is finite and exp2(-inf - m_new) = 0 never becomes inf - inf.
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.math.exp2(m_i - m_new)                                 # rescales the old sums
            p = tl.math.exp2(s - m_new[:, None])                              # (BLOCK_M, BLOCK_N)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
            m_i = m_new
    o = acc / l_i[:, None]
    tl.store(O + b.to(tl.int64) * so_b + h.to(tl.int64) * so_h
             + offs_m[:, None] * so_t + offs_d[None, :] * so_d,
             o.to(O.dtype.element_ty), mask=offs_m[:, None] < T)
    # LSE is (B, H, T) contiguous float32, in base-2 units of the scaled scores.
    tl.store(LSE + bh.to(tl.int64) * T + offs_m, m_i + tl.math.log2(l_i), mask=offs_m < T)


# Backward. With S = sm_scale * Q K^T, P = softmax(S) by rows, O = P V and the incoming dO:
#   dV = P^T dO,   dP = dO V^T,   dS = P * (dP - Delta)  (the softmax Jacobian, row by row),
#   dQ = sm_scale * dS K,   dK = sm_scale * dS^T Q.
# P is never stored: each block recomputes it as exp2(s - lse) from Q, K and the saved lse.


def _attn_bwd_delta(O, DO, DELTA,
                    so_b, so_h, so_t, so_d, sdo_b, sdo_h, sdo_t, sdo_d,
                    H, T, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    # Delta_i = sum_d dO_id * O_id. It equals sum_j P_ij dP_ij (since O_i = sum_j P_ij V_j and
    # dP_ij = dO_i . V_j), the term the softmax backward subtracts: dS_ij = P_ij (dP_ij - Delta_i).
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m[:, None] < T
    o = tl.load(O + b.to(tl.int64) * so_b + h.to(tl.int64) * so_h
                + offs_m[:, None] * so_t + offs_d[None, :] * so_d, mask=rows, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * sdo_b + h.to(tl.int64) * sdo_h
                 + offs_m[:, None] * sdo_t + offs_d[None, :] * sdo_d, mask=rows, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * T + offs_m, delta, mask=offs_m < T)


def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV,
                   sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d,
                   sv_b, sv_h, sv_t, sv_d, sdo_b, sdo_h, sdo_t, sdo_d,
                   H, T, T_bucket, sm_scale, qk_scale,
                   GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # One program owns BLOCK_N keys of one key/value head and sums over every query that sees them
    # (all query heads of its GROUP): dV_j = sum_i P_ij dO_i, dK_j = sm_scale * sum_i dS_ij Q_i.
    # Work in the transposed layout (keys along rows) so the sums over i are plain matmuls.
    tl.static_assert(BLOCK_N % BLOCK_M == 0)  # diagonal query blocks end on a key-block boundary
    start_n = tl.program_id(0)  # causal: the first key blocks are seen by the most queries, run first
    bh_kv = tl.program_id(1)
    H_kv = H // GROUP
    b, h_kv = bh_kv // H_kv, bh_kv % H_kv
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    keys = offs_n[:, None] < T
    k = tl.load(K + b.to(tl.int64) * sk_b + h_kv.to(tl.int64) * sk_h
                + offs_n[:, None] * sk_t + offs_d[None, :] * sk_d, mask=keys, other=0.0)  # (BLOCK_N, D)
    v = tl.load(V + b.to(tl.int64) * sv_b + h_kv.to(tl.int64) * sv_h
                + offs_n[:, None] * sv_t + offs_d[None, :] * sv_d, mask=keys, other=0.0)  # (BLOCK_N, D)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    # Causal: queries in this key block's own span straddle the diagonal, later queries see every
    # key here, earlier ones none. Query rows past T need no mask: they load q = dO = 0 (and
    # lse = Delta = 0), so P = 1 there and both P dO and dS = P (dP - Delta) are exactly 0.
    if CAUSAL:
        diag_end = start_n * BLOCK_N + BLOCK_N
        free_lo, free_hi = diag_end, T
        masked_lo, masked_hi = start_n * BLOCK_N, tl.minimum(diag_end, T)
    else:
        free_lo, free_hi, masked_lo, masked_hi = 0, T, T, T
    for g in range(GROUP):
        h = h_kv * GROUP + g
        q_base = Q + b.to(tl.int64) * sq_b + h.to(tl.int64) * sq_h
        do_base = DO + b.to(tl.int64) * sdo_b + h.to(tl.int64) * sdo_h
        row_base = (b * H + h).to(tl.int64) * T                                # into LSE and DELTA
        for phase in tl.static_range(2):
            lo = free_lo if phase == 0 else masked_lo
            hi = free_hi if phase == 0 else masked_hi
            for start_m in range(lo, hi, BLOCK_M):
                offs_m = start_m + tl.arange(0, BLOCK_M)
                rows = offs_m[:, None] < T
                q = tl.load(q_base + offs_m[:, None] * sq_t + offs_d[None, :] * sq_d,
                            mask=rows, other=0.0)                             # (BLOCK_M, D)
                do = tl.load(do_base + offs_m[:, None] * sdo_t + offs_d[None, :] * sdo_d,
                             mask=rows, other=0.0)                            # (BLOCK_M, D)
                lse = tl.load(LSE + row_base + offs_m, mask=offs_m < T, other=0.0)
                delta = tl.load(DELTA + row_base + offs_m, mask=offs_m < T, other=0.0)
                # Recompute P^T from the saved lse instead of storing P: (BLOCK_N, BLOCK_M).
                s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
                p_t = tl.math.exp2(s_t - lse[None, :])
                if phase == 1:
                    p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
                dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
                dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # dP^T = V dO^T
                ds_t = p_t * (dp_t - delta[None, :])
                dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    dk = dk * sm_scale  # S = sm_scale * Q K^T, so dK = sm_scale * dS^T Q
    tl.store(DK + bh_kv.to(tl.int64) * T * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=keys)
    tl.store(DV + bh_kv.to(tl.int64) * T * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=keys)


def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ,
                 sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d,
                 sv_b, sv_h, sv_t, sv_d, sdo_b, sdo_h, sdo_t, sdo_d,
                 H, T, T_bucket, sm_scale, qk_scale,
                 GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # One program owns BLOCK_M query rows of one head: dQ_i = sm_scale * sum_j dS_ij K_j, walking
    # the key blocks in the same order and with the same masks as the forward.
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    start_m = tl.num_programs(0) - 1 - tl.program_id(0) if CAUSAL else tl.program_id(0)  # heavy first
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    k_base = K + b.to(tl.int64) * sk_b + (h // GROUP).to(tl.int64) * sk_h
    v_base = V + b.to(tl.int64) * sv_b + (h // GROUP).to(tl.int64) * sv_h
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m[:, None] < T
    q = tl.load(Q + b.to(tl.int64) * sq_b + h.to(tl.int64) * sq_h
                + offs_m[:, None] * sq_t + offs_d[None, :] * sq_d, mask=rows, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * sdo_b + h.to(tl.int64) * sdo_h
                 + offs_m[:, None] * sdo_t + offs_d[None, :] * sdo_d, mask=rows, other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if CAUSAL:
        free_end, masked_end = start_m * BLOCK_M, tl.minimum((start_m + 1) * BLOCK_M, T)
    else:
        free_end, masked_end = (T // BLOCK_N) * BLOCK_N, T
    for phase in tl.static_range(2):
        lo = 0 if phase == 0 else free_end
        hi = free_end if phase == 0 else masked_end
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k = tl.load(k_base + offs_n[:, None] * sk_t + offs_d[None, :] * sk_d,
                        mask=offs_n[:, None] < T, other=0.0)                  # (BLOCK_N, D)
            v = tl.load(v_base + offs_n[:, None] * sv_t + offs_d[None, :] * sv_d,
                        mask=offs_n[:, None] < T, other=0.0)                  # (BLOCK_N, D)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            p = tl.math.exp2(s - lse[:, None])                                # (BLOCK_M, BLOCK_N)
            if phase == 1:  # keys past T must go too: exp2(0 - lse) could overflow to inf
                visible = offs_n[None, :] < T
                if CAUSAL:
                    visible = visible & (offs_m[:, None] >= offs_n[None, :])
                p = tl.where(visible, p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)       # dP = dO V^T
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + bh.to(tl.int64) * T * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=rows)


# ---------------------------------------------------------------------------------------------------
# Wrapping and tuning. On a GPU each kernel is autotuned over a handful of Hopper-friendly tiles,
# keyed by (T rounded up to a power of two, D, causal) so a new length in the same bucket reuses the
# winner. The interpreter gets one small fixed tile: autotuning there would only be slow.

INTERPRET_BLOCKS = {"fwd": (32, 16), "dkdv": (16, 32), "dq": (32, 16)}  # (BLOCK_M, BLOCK_N)
DELTA_BLOCK_M = 64
_built = {}  # interpret flag -> {"fwd": ..., "delta": ..., "dkdv": ..., "dq": ...}


def _configs(tiles):
    import triton
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in tiles]


def _kernels():
    """Import triton, check it can run here, wrap the kernels (once per interpreter mode)."""
    global tl
    try:
        import triton
        import triton.language as tl
    except Exception as e:  # a missing or broken install: one sentence, not a traceback
        raise RuntimeError(f"attn_impl='triton' needs a working triton install ({e}).") from None
    interpret = bool(triton.knobs.runtime.interpret)  # reads TRITON_INTERPRET from the environment now
    if interpret and isinstance(tl.zeros, triton.runtime.JITFunction):
        # triton was imported before TRITON_INTERPRET=1 was set. Its own helpers (tl.zeros, tl.max,
        # tl.sum are @triton.jit functions too) were then wrapped for the compiler, and the
        # interpreter cannot call those: re-run their module so they are wrapped for the interpreter.
        import importlib
        standard = importlib.reload(triton.language.standard)
        for name, value in list(vars(tl).items()):
            if isinstance(value, triton.runtime.JITFunction) and hasattr(standard, name):
                setattr(tl, name, getattr(standard, name))
    if interpret not in _built:
        jit = triton.jit
        if interpret:
            _built[interpret] = {"fwd": jit(_attn_fwd), "delta": jit(_attn_bwd_delta),
                                 "dkdv": jit(_attn_bwd_dkdv), "dq": jit(_attn_bwd_dq)}
        else:
            key = ["T_bucket", "HEAD_DIM", "CAUSAL"]
            # (BLOCK_M, BLOCK_N, num_warps, num_stages). Forward and dQ: long query tiles, short key
            # tiles; dK/dV the reverse (it walks queries). Tiles too big for D=128 fail to compile
            # and the autotuner drops them.
            fwd = [(64, 64, 4, 3), (64, 32, 4, 4), (128, 64, 8, 3), (128, 32, 8, 4), (128, 128, 8, 2),
                   (128, 64, 4, 4)]
            dkdv = [(32, 128, 4, 3), (32, 128, 8, 2), (64, 128, 8, 3), (32, 64, 4, 4), (64, 64, 4, 3)]
            dq = [(128, 32, 4, 3), (128, 32, 8, 2), (128, 64, 8, 3), (64, 32, 4, 4), (64, 64, 4, 3)]
            _built[interpret] = {
                "fwd": triton.autotune(_configs(fwd), key=key)(jit(_attn_fwd)),
                "delta": jit(_attn_bwd_delta),
                "dkdv": triton.autotune(_configs(dkdv), key=key)(jit(_attn_bwd_dkdv)),
                "dq": triton.autotune(_configs(dq), key=key)(jit(_attn_bwd_dq)),
            }
    return _built[interpret], interpret


def _blocks(name, interpret):
    """Tile sizes passed at launch: fixed under the interpreter, chosen by autotune on a GPU."""
    if not interpret:
        return {}
    block_m, block_n = INTERPRET_BLOCKS[name]
    return {"BLOCK_M": block_m, "BLOCK_N": block_n}


def _check_inputs(q, k, v):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"attention: expected q (B, H, T, D) and k, v (B, H_kv, T, D), "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}.")
    (B, H, T, D), (B_kv, H_kv, T_kv, D_kv) = q.shape, k.shape
    if (B, T, D) != (B_kv, T_kv, D_kv) or H % H_kv:
        raise ValueError(f"attention: k, v of shape {tuple(k.shape)} do not fit q of shape "
                         f"{tuple(q.shape)} (same B, T, D; H_kv must divide H; T_q == T_k only).")
    if D not in HEAD_DIMS:
        raise ValueError(f"attention: head size D={D} is not supported; use one of {HEAD_DIMS}.")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"attention: q, k, v must share one dtype of float16/bfloat16/float32, "
                         f"got {q.dtype}, {k.dtype}, {v.dtype}.")
    if B * H > 65535:
        raise ValueError(f"attention: B*H = {B * H} exceeds the CUDA grid limit 65535; split the batch.")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v are on different devices ({q.device}, {k.device}, {v.device}).")


def _forward(q, k, v, causal, sm_scale):
    kernels, interpret = _kernels()
    if not interpret and not q.is_cuda:
        raise RuntimeError("attn_impl='triton' needs a CUDA GPU, or TRITON_INTERPRET=1 in the environment for "
                           "Triton's CPU interpreter; without either use attn_impl='sdpa'.")
    if interpret and q.dtype == torch.bfloat16:
        raise RuntimeError("attention: bfloat16 gives wrong results under TRITON_INTERPRET=1 (its tl.dot "
                           "has no bfloat16); use float32 or float16 on the CPU.")
    B, H, T, D = q.shape
    o = torch.empty((B, H, T, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)  # base-2 log-sum-exp per row
    grid = lambda meta: (math.ceil(T / meta["BLOCK_M"]), B * H)
    kernels["fwd"][grid](q, k, v, o, lse, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
                         H, T, _bucket(T), sm_scale * LOG2E,
                         GROUP=H // k.shape[1], HEAD_DIM=D, CAUSAL=causal,
                         DOT_PRECISION=_precision(q), **_blocks("fwd", interpret))
    return o, lse


def _backward(do, q, k, v, o, lse, causal, sm_scale):
    kernels, interpret = _kernels()
    B, H, T, D = q.shape
    H_kv = k.shape[1]
    delta = torch.empty_like(lse)                                             # (B, H, T) float32
    kernels["delta"][(math.ceil(T / DELTA_BLOCK_M), B * H)](
        o, do, delta, *o.stride(), *do.stride(), H, T, HEAD_DIM=D, BLOCK_M=DELTA_BLOCK_M)
    # Gradients come out contiguous; the kernels index them as (B, H or H_kv, T, D).
    dq = torch.empty((B, H, T, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, H_kv, T, D), dtype=k.dtype, device=k.device)
    dv = torch.empty((B, H_kv, T, D), dtype=v.dtype, device=v.device)
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
    common = dict(GROUP=H // H_kv, HEAD_DIM=D, CAUSAL=causal, DOT_PRECISION=_precision(q))
    scalars = (H, T, _bucket(T), sm_scale, sm_scale * LOG2E)
    kernels["dkdv"][lambda meta: (math.ceil(T / meta["BLOCK_N"]), B * H_kv)](
        q, k, v, do, lse, delta, dk, dv, *strides, *scalars, **common, **_blocks("dkdv", interpret))
    kernels["dq"][lambda meta: (math.ceil(T / meta["BLOCK_M"]), B * H)](
        q, k, v, do, lse, delta, dq, *strides, *scalars, **common, **_blocks("dq", interpret))
    return dq, dk, dv


def _bucket(T):
    return 1 << max(T - 1, 0).bit_length()  # next power of two: the autotune key for the length


def _precision(q):
    # fp32 inputs: exact ("ieee") products, not TF32; fp16/bf16 use the tensor-core default.
    return "ieee" if q.dtype == torch.float32 else "tf32"


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, sm_scale):
        o, lse = _forward(q, k, v, causal, sm_scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.sm_scale = causal, sm_scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _backward(do, q, k, v, o, lse, ctx.causal, ctx.sm_scale)
        return dq, dk, dv, None, None


def attention(q, k, v, causal=True, sm_scale=None):
    """softmax(sm_scale * q k^T [causal mask]) v. q (B, H, T, D); k, v (B, H_kv, T, D) -> (B, H, T, D).

    H_kv must divide H (query head h uses key/value head h // (H / H_kv)); sm_scale defaults to
    1/sqrt(D). Differentiable in q, k and v.
    """
    _check_inputs(q, k, v)
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    return _Attention.apply(q, k, v, bool(causal), sm_scale)
