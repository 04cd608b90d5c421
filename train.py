"""
train.py: next-token pretraining of the GPT in model.py on the token shards tokenize_data.py wrote.

    python train.py --data-dir data/tokens --out-dir out/pretrain            # the CPU recipe: 4 x 256, Muon, WSD
    python train.py --data-dir data/tokens --out-dir out/pretrain --resume   # continue from its ckpt.pt
    python train.py --data-dir data/tokens --out-dir out/more --init-from out/hf  # from a Hugging Face folder
    python train.py --help                                                   # every flag, default, choices
    python train.py --data-dir data/tokens --preset gpt2-124m --plan --gpus 8 --gpu-memory 80   # the plan, no GPU
    torchrun --standalone --nproc-per-node gpu train.py --data-dir data/tokens --out-dir out/gpt2 --preset gpt2-124m
    torchrun --standalone --nproc-per-node 8 train.py --data-dir data/tokens --out-dir out/gpt2 --preset gpt2-124m --tp 2 --pp 2

`--preset gpt2-124m` is GPT-2 small (12 x 768, 1024 positions, bf16, compiled) at 524,288 tokens per step on
any number of GPUs and nodes (--tokens-per-step: the plan sets the accumulation). Flags given win over a preset.

Prints a line every --log-interval steps and at every evaluation (loss, lr, tokens/s, MFU against the
GPU's bf16 dense peak, time left), ends with
"N steps in T; checkpoint PATH", and writes into --out-dir: log.jsonl (per step: step, loss, lr,
tokens_per_sec, mfu on known GPUs; val_loss, val_bpb when evaluated), ckpt.pt (at every eval and at the end;
self-contained: configs, weights, optimizer, step, RNG states, data position, tokenizer, log) and loss.png.

Design choices:
- before anything big is built, a plan: parameters, layout (dp x tp x pp), micro-batch x accumulation =
  tokens per step, epochs of the data, and memory per GPU estimated tensor by tensor beside the GPU's;
  data parallel unless no micro-batch fits one GPU, then the smallest tp (then pp) that fits;
- step s's batch is drawn by a generator seeded from (seed, s) alone and rank r takes its slice, so any
  number of ranks sees the same tokens, and resuming needs only the step;
- `--resume` with no checkpoint in --out-dir starts fresh (and says so), so a pipeline can always pass it;
  on resume the checkpoint's train config is the default and flags given now win. Without --resume, a
  ckpt.pt in --out-dir is replaced at the new run's first checkpoint (a note says so);
- ckpt.pt carries the log up to its step and --resume rewrites log.jsonl from it, so after any kills and
  resumes the log holds each step once, of one run; a run first deletes the temporaries a killed one left;
- a non-finite loss stops the run before anything is saved, so the last checkpoint stays good; under
  torchrun (Linux) each rank asks the kernel to kill it when the launcher dies, so none trains on alone,
  and a rank that dies stops the others at their next collective with one sentence, not gloo's traceback;
- `--tp N --pp M` (data parallel takes the rest: world = dp x tp x pp; CPU/gloo or GPUs/NCCL) runs
  hand-written Megatron-style tensor parallelism (heads, MLP, vocabulary split over tp) and pipeline
  stages (--schedule gpipe | 1f1b, micro-batches = --grad-accum). Checkpoints are always saved whole, so
  any layout, one process and sample.py load them, and --resume may change the layout;
- `--optimizer muon`: Muon (orthogonalised Nesterov momentum) for the blocks' matrices, AdamW at --lr for
  embeddings, head, norms and biases, in one optimizer; under --tp a matrix's update is gathered whole
  before it is orthogonalised, so every layout takes one process's step.

Two parts: the whole single-process path as a run meets it (config, processes, data, model, step and eval,
checkpoints and logs, the run's pieces, main), then tensor and pipeline parallelism, which part 1 calls under
--tp/--pp (each call marked "part 2"; the optimizer and evaluation take part 2's pieces as hooks that main
passes them).
"""

import ctypes
import json
import math
import os
import re
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from typing import Literal, get_args

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from flags import atomic_output, config_parser, remove_stale_temporaries
from model import (GPT, GPTConfig, Muon, fast_dtype, load_checkpoint, lost_peer, read_checkpoint, save_checkpoint,
                   weight_shapes)


# --preset NAME: named defaults for larger machines, over TrainConfig's (flags given win over both)
PRESETS = {"gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, dtype="bfloat16",
                             compile=True, batch_size=16, tokens_per_step=2**19, max_steps=19073, optimizer="adamw",
                             lr=6e-4, min_lr=6e-5, warmup_steps=700, lr_schedule="cosine", eval_interval=250,
                             eval_steps=20)}


@dataclass
class TrainConfig:
    # Each field is a flag (data_dir: --data-dir); the comment after it is the flag's --help. The defaults
    # are the CPU recipe the README measured (Muon, warmup-stable-decay, GPTConfig's shape); GPUs: --preset.
    data_dir: str = ""             # the folder tokenize_data.py wrote: train.bin, val.bin, meta.json, tokenizer
    out_dir: str = "out"           # where ckpt.pt, log.jsonl and loss.png are written
    resume: bool = False           # continue from OUT_DIR/ckpt.pt if there is one; its config is the default
    preset: Literal[("",) + tuple(PRESETS)] = ""  # a named set of defaults (PRESETS); gpt2-124m: GPT-2 small on GPUs
    init_from: str = ""            # start from these weights (a ckpt.pt or a Hugging Face folder), its shape, context
    # the model (GPTConfig's defaults and allowed values); on resume its shape comes from the checkpoint
    n_layer: int = GPTConfig.n_layer  # number of transformer blocks
    n_head: int = GPTConfig.n_head  # attention (query) heads
    n_kv_head: int = GPTConfig.n_kv_head  # key/value heads, each shared by a group of query heads (GQA); 0: n_head
    n_embd: int = GPTConfig.n_embd  # width of the residual stream
    block_size: int = GPTConfig.block_size  # training sequence length; fresh: also the model's longest context
    pos_encoding: str = GPTConfig.pos_encoding  # positions: rotary (rope), a learned table (GPT-2) or sinusoidal
    norm: str = GPTConfig.norm     # the normalisation layer
    prenorm: bool = GPTConfig.prenorm  # normalise before each sublayer (GPT-2); --no-prenorm: the 2017 post-norm
    mlp: str = GPTConfig.mlp       # feed-forward: gelu (4x wide), swiglu (8/3x wide, as many parameters), relu2 (4x)
    tie_weights: bool = GPTConfig.tie_weights  # the output head shares the token-embedding matrix
    bias: bool = GPTConfig.bias    # biases in the linear layers and LayerNorm
    qk_norm: bool = GPTConfig.qk_norm  # RMS-normalise each head's queries and keys (bounded attention logits)
    zero_init_proj: bool = GPTConfig.zero_init_proj  # the blocks' output projections start at zero (blocks start as identity)
    logit_softcap: float = GPTConfig.logit_softcap  # > 0: the logits squashed into (-cap, cap): cap * tanh(logits / cap)
    dropout: float = GPTConfig.dropout  # dropout probability (may change on resume)
    attn_impl: str = GPTConfig.attn_impl  # attention: sdpa (PyTorch), naive (textbook), triton (our kernel, CUDA)
    # optimisation: Muon and AdamW (or AdamW alone); linear warmup, then warmup-stable-decay (or cosine)
    batch_size: int = 8            # sequences per micro-batch on each data-parallel rank
    grad_accum: int = 1            # micro-batches per optimizer step (under --pp: the pipeline's micro-batches)
    max_steps: int = 900           # optimizer steps to train to (on resume: the step to stop at)
    optimizer: Literal["muon", "adamw"] = "muon"  # muon: Muon for the blocks' matrices, AdamW at --lr for the rest
    lr: float = 1e-2               # peak learning rate, reached at the end of warmup (AdamW's)
    muon_lr: float = 0.02          # --optimizer muon: the matrices' peak learning rate; follows --lr's schedule scaled
    muon_momentum: float = 0.95    # --optimizer muon: the matrices' (Nesterov) momentum
    min_lr: float = 1e-3           # learning rate at the end of the decay, and after it
    warmup_steps: int = 40         # steps of linear warmup, from lr/warmup_steps up to lr
    lr_decay_steps: int = 0        # step where the decay reaches min_lr, flat after it; 0: at max_steps (the end)
    lr_schedule: Literal["wsd", "cosine"] = "wsd"  # after warmup: wsd holds lr, then falls in a line to min_lr; or a cosine
    cooldown_fraction: float = 0.4  # --lr-schedule wsd: the share of the steps (to lr_decay_steps) spent decaying
    weight_decay: float = 0.1      # AdamW weight decay on matrices and embeddings (none on norms and biases)
    grad_clip: float = 1.0         # clip the global gradient norm to this; 0: no clipping
    eval_interval: int = 300       # evaluate on val.bin and save ckpt.pt every this many steps; 0: only at the end
    eval_steps: int = 8            # validation batches per evaluation (the same ones every time)
    log_interval: int = 10         # print every this many steps (and every evaluation, and the last); log.jsonl has all
    # runtime
    device: str = "auto"           # auto (cuda if torch sees a GPU, else cpu), cpu, cuda or cuda:N
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # autocast; auto: model.py's fast_dtype (bf16 where native)
    compile: bool = False          # torch.compile the model (GPUs: faster after a minute); not under --tp/--pp
    seed: int = 1337               # seeds the initial weights and, with the step, every batch
    # parallelism, under torchrun: data parallel takes the ranks that tp x pp leaves
    tp: int = 1                    # tensor-parallel degree: heads, MLP and vocabulary split over this many ranks
    pp: int = 1                    # pipeline-parallel degree: the blocks cut into this many stages
    schedule: Literal["gpipe", "1f1b"] = "1f1b"  # pipeline schedule: gpipe (all forwards, then all backwards) or 1f1b
    # the plan, printed before anything big is built: layout, micro-batch, accumulation, memory per GPU
    tokens_per_step: int = 0       # > 0: --grad-accum (and --batch-size, if memory is short) set for this many tokens/step
    plan: bool = False             # print the plan for --gpus and --gpu-memory and exit (needs no GPU)
    gpus: int = 0                  # --plan: the GPUs (ranks) to plan for; 0, and in a run: this launch's world size
    gpu_memory: float = 0.0        # GiB per GPU the plan must fit in; 0: the GPU's own (on the CPU: not checked)


CHOICES = {f.name: get_args(f.type) for f in fields(GPTConfig) if get_args(f.type)}  # GPTConfig's Literals
ALIASES = {"attn_impl": ["--attn"]}  # other spellings of a flag that users type
PLAN_VOCAB = 50304  # the vocabulary planned for without --data-dir: GPT-2's 50257, rounded up to 64s
SHAPE_FIELDS = ["n_layer", "n_head", "n_kv_head", "n_embd", "pos_encoding", "norm", "prenorm", "mlp",
                "tie_weights", "bias", "qk_norm", "zero_init_proj", "logit_softcap"]
# bf16 dense tensor-core peaks (FLOP/s) by device name; the first match wins, unknown GPUs get no MFU
PEAK_FLOPS = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
              ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10", 125e12), ("4090", 165e12)]


def resolve_config(argv):
    """-> (config, the flags given, the checkpoint to resume or None, its path). Each dataclass field is a
    --kebab-case flag; dataclass defaults < preset < the checkpoint's train config < flags given now."""
    parser = config_parser(TrainConfig, __doc__, choices=CHOICES, aliases=ALIASES, given_only=True)
    given = vars(parser.parse_args(argv))  # only the flags typed: they must win over the checkpoint's
    given["out_dir"] = given.get("out_dir", TrainConfig.out_dir)  # where we looked, not where it was first written
    ckpt_path = os.path.join(given["out_dir"], "ckpt.pt")
    ckpt = load_checkpoint(ckpt_path) if given.get("resume") and os.path.isfile(ckpt_path) else None
    if ckpt is not None and ckpt.get("stage") != "pretrain":
        raise SystemExit(f"--resume: {ckpt_path} is a {ckpt.get('stage')} checkpoint, not one train.py wrote; pick "
                         "another --out-dir or drop --resume.")
    saved = {k: v for k, v in (ckpt or {}).get("train_config", {}).items() if k in TrainConfig.__dataclass_fields__}
    preset = given.get("preset", saved.get("preset", ""))
    return TrainConfig(**{**PRESETS.get(preset, {}), **saved, **given}), given, ckpt, ckpt_path


def wants_cuda(device_flag):
    """Whether --device trains on a GPU: cuda, cuda:N, or auto when torch sees one."""
    return device_flag.startswith("cuda") or (device_flag == "auto" and torch.cuda.is_available())


def check_config(cfg):
    """One sentence for a flag value that cannot work (argparse has checked types and choices; GPTConfig
    checks the model's shape and dropout, and main relays its sentence)."""
    at_least = dict(block_size=1, max_steps=1, batch_size=1, grad_accum=1, eval_steps=1, log_interval=1, tp=1,
                    pp=1, eval_interval=0, warmup_steps=0, lr_decay_steps=0, min_lr=0, weight_decay=0, grad_clip=0)
    for name, least in at_least.items():
        if not getattr(cfg, name) >= least:  # `not >=` also catches nan
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(cfg, name)} must be at least {least}.")
    if not (cfg.lr > 0 and cfg.muon_lr > 0):
        raise SystemExit(f"--lr {cfg.lr} and --muon-lr {cfg.muon_lr} must be positive numbers (peak learning rates).")
    if not 0 < cfg.cooldown_fraction <= 1:
        raise SystemExit(f"--cooldown-fraction {cfg.cooldown_fraction} must be in (0, 1] (the share of steps spent decaying).")
    if not 0 <= cfg.muon_momentum < 1:
        raise SystemExit(f"--muon-momentum {cfg.muon_momentum} must be in [0, 1).")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device):
        raise SystemExit(f"--device {cfg.device} is not one of auto, cpu, cuda, cuda:N.")
    if cfg.device.startswith("cuda") and int(cfg.device[5:] or 0) >= torch.cuda.device_count():
        raise SystemExit(f"--device {cfg.device}: torch sees {torch.cuda.device_count()} CUDA GPU(s) on this machine; "
                         "pass --device cpu, or auto.")
    cuda = wants_cuda(cfg.device)
    if cfg.attn_impl == "triton" and not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--attn-impl triton needs a CUDA GPU (or TRITON_INTERPRET=1 for Triton's slow CPU "
                         "interpreter); use --attn-impl sdpa on the CPU.")
    out_dir = os.path.realpath(cfg.out_dir)
    if cfg.init_from and os.path.commonpath([out_dir, os.path.realpath(cfg.init_from)]) == out_dir:
        raise SystemExit(f"--init-from {cfg.init_from} is inside --out-dir {cfg.out_dir}, whose checkpoint this run "
                         "writes over; pass another --out-dir (or move the weights out of it).")


# ---------------------------------------------------------------------------------------------------
# Processes and devices

def setup_distributed(device_flag):
    """-> (rank, world_size, local_rank, device). Under torchrun (RANK set) joins the process group:
    NCCL on GPUs, gloo on CPU. Alone, rank 0 of 1."""
    cuda = wants_cuda(device_flag)
    if "RANK" not in os.environ:
        return 0, 1, 0, torch.device(("cuda" if cuda else "cpu") if device_flag == "auto" else device_flag)
    rank, world_size, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if sys.platform.startswith("linux"):  # die with the launcher: a killed torchrun leaves no rank training on
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:  # before init: NCCL's communicator and every collective then use this rank's own GPU
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", **({"device_id": device} if cuda else {}))
    return rank, world_size, local_rank, device


def all_reduce(tensor, group=None, op=dist.ReduceOp.SUM):
    """In place over the group (nothing to do in one process); returns the tensor, so it can end an
    expression. A mean is the sum over the group divided by its size: gloo has no AVG."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS if key in name), None)


# ---------------------------------------------------------------------------------------------------
# Data: token shards on disk, batches as a function of (seed, step)

def load_data(data_dir, seq_len):
    """-> (train tokens, val tokens, meta): the shards memory-mapped read-only, checked against meta.json
    (their sizes, and their largest id against vocab_size)."""
    if not data_dir or not os.path.isdir(data_dir):
        raise SystemExit(f"--data-dir {data_dir or '(none given)'} is not a folder; pass the --out-dir of tokenize_data.py.")
    meta_path, rerun = os.path.join(data_dir, "meta.json"), f"run tokenize_data.py --out-dir {data_dir}"
    try:
        meta = json.load(open(meta_path, encoding="utf-8"))
    except (OSError, ValueError):  # missing, not JSON, or not even UTF-8
        meta = None
    counts = ("vocab_size", "train_tokens", "val_tokens")
    if not (isinstance(meta, dict) and meta.get("dtype") in ("uint16", "uint32") and
            all(type(meta.get(k)) is int and meta[k] >= 0 for k in counts)):
        raise SystemExit(f"{meta_path} is missing or not the JSON tokenize_data.py writes (vocab_size, dtype "
                         f"uint16|uint32, train_tokens, val_tokens as numbers); {rerun}.")
    shards, itemsize = [], np.dtype(meta["dtype"]).itemsize
    for split in ("train", "val"):
        path, n_tokens = os.path.join(data_dir, f"{split}.bin"), meta[f"{split}_tokens"]
        size = os.path.getsize(path) if os.path.isfile(path) else 0
        if size != n_tokens * itemsize:  # cut short, grown, half a token, or from another run
            raise SystemExit(f"{path} holds {size:,} bytes, but {meta_path} records {n_tokens:,} {meta['dtype']} "
                             f"tokens ({n_tokens * itemsize:,} bytes): the shard is damaged or not this meta.json's; "
                             f"{rerun}.")
        if n_tokens < 2:  # tokenize_data.py held out no document (one document, or --val-fraction 0)
            raise SystemExit(f"{path} is empty; {rerun} on a corpus of several documents"
                             + (" with --val-fraction above 0." if split == "val" else "."))
        if n_tokens < seq_len + 1:  # one sequence and its shifted targets
            raise SystemExit(f"{path} holds {n_tokens} tokens, fewer than --block-size {seq_len} + 1; pass "
                             f"--block-size {n_tokens - 1} or less, or {rerun} on more text"
                             + (" or with a larger --val-fraction." if split == "val" else "."))
        shard = np.memmap(path, dtype=meta["dtype"], mode="r")
        largest = int(shard.max())  # one pass over the file; an id past the vocabulary would fail hours in
        if largest >= meta["vocab_size"]:
            raise SystemExit(f"{path} holds token id {largest:,}, but {meta_path} gives vocab_size "
                             f"{meta['vocab_size']:,}: the shard and meta.json are not of one tokenizer; {rerun}.")
        shards.append(shard)
    return shards[0], shards[1], meta


def data_tokenizer(data_dir):
    """The data dir's tokenizer as a plain dict, or None when the dir has no tokenizer file."""
    if not os.path.isfile(os.path.join(data_dir, "tokenizer.tiktoken")):
        return None
    import tokenize_data  # only needed when there is a tokenizer to carry
    return tokenize_data.tokenizer_to_dict(tokenize_data.load_tokenizer(data_dir))


def batch_starts(seed, step, n_seqs, n_tokens, seq_len, split=0):
    """(n_seqs,) start offsets of step `step`'s global batch: a function of (seed, step, split) only."""
    g = torch.Generator().manual_seed((seed * 2**32 + 2 * step + split) % 2**63)  # split 0 train, 1 val
    return torch.randint(0, n_tokens - seq_len, (n_seqs,), generator=g)


def get_batch(data, starts, seq_len, device):
    """starts (B,) -> x, y (B, T) int64 on device; y[b, t] is the token after x[b, t]."""
    rows = torch.stack([torch.from_numpy(data[i:i + seq_len + 1].astype(np.int64)) for i in starts.tolist()])
    if device.type == "cuda":  # from pinned memory the copy does not block the host
        rows = rows.pin_memory().to(device, non_blocking=True)
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def micro_batches(data, cfg, step, dp_rank, dp_size, device):
    """This rank's grad_accum micro-batches [(x, y), ...] of step `step`: the global batch viewed as
    (grad_accum, dp_size, batch_size), so micro-step m of one process with batch_size*dp_size sequences
    holds exactly the sequences the dp ranks hold at micro-step m."""
    n_seqs = cfg.grad_accum * dp_size * cfg.batch_size
    starts = batch_starts(cfg.seed, step, n_seqs, len(data), cfg.block_size)
    starts = starts.view(cfg.grad_accum, dp_size, cfg.batch_size)[:, dp_rank]    # (grad_accum, B)
    return [get_batch(data, s, cfg.block_size, device) for s in starts]


# ---------------------------------------------------------------------------------------------------
# Model, optimizer, schedule

def model_config_for(cfg, given, meta, tokenizer, ckpt, ckpt_path):
    """The GPTConfig to build: from the flags when fresh, from the checkpoint (checked against the
    flags given and the data's tokenizer) when resuming or starting from one (--init-from). meta None
    (--plan without --data-dir): the checkpoint's vocabulary, or PLAN_VOCAB."""
    if meta is None:
        meta = {"vocab_size": ckpt["model_config"]["vocab_size"] if ckpt else PLAN_VOCAB}
    if ckpt is None:
        return GPTConfig(vocab_size=meta["vocab_size"], block_size=cfg.block_size, attn_impl=cfg.attn_impl,
                         **{k: getattr(cfg, k) for k in SHAPE_FIELDS + ["dropout"]})
    saved = ckpt["model_config"]
    for k in SHAPE_FIELDS:
        if k in given and given[k] != saved[k] and not (k == "n_kv_head" and given[k] == 0):
            raise SystemExit(f"--{k.replace('_', '-')} {given[k]} differs from the checkpoint's {saved[k]}; "
                             "drop the flag or train into a new --out-dir.")
    if cfg.block_size > saved["block_size"]:
        raise SystemExit(f"--block-size {cfg.block_size} is above the checkpoint's block_size "
                         f"{saved['block_size']}; pass --block-size {saved['block_size']} or less.")
    unnamed = lambda tok: {k: v for k, v in tok.items() if k != "name"}  # same ranks, another name: a match
    if meta["vocab_size"] != saved["vocab_size"] or (tokenizer is not None and ckpt.get("tokenizer") is not None
                                                     and unnamed(tokenizer) != unnamed(ckpt["tokenizer"])):
        raise SystemExit(f"the tokenizer of {cfg.data_dir} does not match the one in {ckpt_path}; pass a data dir "
                         "tokenized with the checkpoint's tokenizer.")
    return GPTConfig(**{**saved, "attn_impl": cfg.attn_impl, "dropout": cfg.dropout})


def build_model(model_config, seed):
    """The whole model from the seed: every rank builds the same weights, then sharding/wrapping happens."""
    torch.manual_seed(seed)
    return GPT(model_config)


def learning_rate_at(step, cfg):
    """Linear warmup to --lr over warmup_steps, then down to --min-lr at lr_decay_steps, then flat: along a
    cosine, or (wsd) flat at --lr and then a straight line over the last cooldown_fraction of the steps.
    WSD's case (Hu et al. 2024, MiniCPM; the speedruns): the long flat part makes the fastest progress,
    and the loss drops most while the rate falls, so the fall is kept for the end."""
    decay_steps = cfg.lr_decay_steps or cfg.max_steps
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step >= decay_steps:
        return cfg.min_lr
    if cfg.lr_schedule == "wsd":
        cooldown_start = max(cfg.warmup_steps, decay_steps - cfg.cooldown_fraction * decay_steps)
        if step < cooldown_start:
            return cfg.lr
        return cfg.lr + (step - cooldown_start) / (decay_steps - cooldown_start) * (cfg.min_lr - cfg.lr)
    progress = (step - cfg.warmup_steps) / (decay_steps - cfg.warmup_steps)  # here warmup <= step < decay
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def make_optimizer(model, cfg, device_type="cpu", sharded_update=None, dtype="float32"):
    """--optimizer adamw: AdamW for all; muon: Muon for the blocks' matrices, AdamW for the rest (model.py's
    configure_optimizers groups them). sharded_update: part 2's step for a tp shard (tp_muon_update). Muon's
    Newton-Schulz runs in bf16 when the run's matmuls do (dtype), in float32 otherwise."""
    muon_lr = cfg.muon_lr if cfg.optimizer == "muon" else 0.0
    return model.configure_optimizers(cfg.weight_decay, cfg.lr, device_type=device_type, muon_lr=muon_lr,
                                      muon_momentum=cfg.muon_momentum, sharded_update=sharded_update,
                                      ns_dtype=torch.bfloat16 if dtype == "bfloat16" else torch.float32)


def set_learning_rate(optimizer, lr, cfg):
    """The schedule's lr for AdamW's groups; Muon's groups run at --muon-lr / --lr times it."""
    for group in optimizer.param_groups:
        group["lr"] = lr * cfg.muon_lr / cfg.lr if group.get("muon") else lr


# ---------------------------------------------------------------------------------------------------
# The plan: layout, micro-batch, accumulation and memory per GPU, worked out before anything big is built

GIB = 2**30
FIT_FRACTION = 0.9  # of a GPU's memory: the CUDA context, NCCL's buffers and fragmentation take the rest
TOO_MANY_EPOCHS = 100  # a preset says its data is too small above this many passes over it


def activation_bytes(c, tokens, a, cuda, tp=1, n_layer=None, head=True):
    """Bytes that a forward of `tokens` tokens keeps for its backward, at their peak (the start of the
    backward), for GPTConfig c under autocast to a bytes (4: fp32): n_layer blocks, and the head when
    `head`. Tensor by tensor, as autograd saves them (per token; the tp-split ones divided by tp):
    - a block: the residual stream at both norms (fp32) and both norms' outputs (cast to a); qkv's output
      (v is a view of it), q and k after RoPE / QK-norm, attention's output and logsumexp (sdpa, triton)
      or, for naive, q, k, v repeated to every head and the T x T softmax (CUDA's autocast keeps it fp32
      plus an a-wide copy for the matmul); the projection's input; fc's output and the activation's
      (SwiGLU: silu's and the product too); dropout's 1-byte masks;
    - the head: the final norm's input and output, the logits the caller holds, log_softmax's fp32
      output and, at the start of the backward, that output's gradient and log_softmax's (vocab wide).
    """
    f, C, H, T = 4, c.n_embd, c.n_head / tp, c.block_size
    q, kv, h = c.n_head * c.head_dim / tp, c.n_kv_head * c.head_dim / tp, c.mlp_hidden / tp
    if c.attn_impl == "naive":
        attention = a * 3 * q + (4 + a if cuda and a < 4 else a) * H * T
    else:
        rotated = (q + kv) * ((c.pos_encoding == "rope") + c.qk_norm)
        attention = a * (q + 2 * kv) + a * rotated + a * q + 4 * H
    mlp = a * (4 * h if c.mlp == "swiglu" else 2 * h)
    dropout = (2 * C + (H * T if c.attn_impl == "naive" else 0)) if c.dropout > 0 else 0
    block = 2 * f * C + 2 * a * C + attention + a * q + mlp + dropout
    V = c.vocab_size / tp
    head_bytes = f * C + a * C + a * V + 3 * f * V + (a * V if c.logit_softcap else 0)
    return tokens * ((c.n_layer if n_layer is None else n_layer) * block + (head_bytes if head else 0))


def parameter_counts(c):
    """{what: parameters} of the model GPTConfig c builds, from its weights' shapes (nothing built)."""
    shapes = {n: s.numel() for n, s in weight_shapes(c).items() if not (n == "lm_head.weight" and c.tie_weights)}
    block = {n: size for n, size in shapes.items() if n.startswith("blocks.0.")}
    matrices = [n for n, s in weight_shapes(c).items() if n.startswith("blocks.0.") and len(s) == 2]
    return dict(total=sum(shapes.values()), block=sum(block.values()), wte=shapes["wte.weight"],
                block_matrices=sum(block[n] for n in matrices))


def memory_estimate(c, counts, micro_batch, dp, tp, pp, micro_batches, dtype, schedule, cuda):
    """{part: bytes} on the fullest GPU of a dp x tp x pp layout, eager (torch.compile fuses and keeps less):
    fp32 weights and gradients, the optimizer's state (AdamW: 2 moments; Muon: one momentum for the
    blocks' matrices, AdamW's 2 for the rest), DDP's gradient buckets (a copy of the gradients), autocast's
    low-precision copies of the matrices (kept for the backward), and the activations of the micro-batches
    a stage holds at once: 1 without pipeline, up to pp under 1f1b, all of them under gpipe. counts:
    parameter_counts(c)."""
    block, block_matrices = counts["block"], counts["block_matrices"]
    outside = counts["total"] - c.n_layer * block                        # embeddings, final norm, untied head
    head_copy = counts["wte"] if c.tie_weights and pp > 1 else 0        # the last stage's tied head
    lo, hi = stage_layers(c.n_layer, pp, 0)                              # the first stage is the longest
    params = ((hi - lo) * block + outside + head_copy) / tp
    matrices = (hi - lo) * block_matrices / tp
    a = 4 if dtype == "float32" else 2
    in_flight = 1 if pp == 1 else min(micro_batches, pp if schedule == "1f1b" else micro_batches)
    tokens = micro_batch * c.block_size
    return {"weights": 4 * params, "gradients": 4 * params, "adamw": 8 * params,
            "muon": 4 * matrices + 8 * (params - matrices),
            "ddp_buckets": 4 * params if dp > 1 and tp * pp == 1 else 0,
            "weight_copies": a * (matrices + counts["wte"] / tp) if a < 4 else 0,
            "activations": in_flight * activation_bytes(c, tokens, a, cuda, tp, hi - lo, head=pp == 1)
                           + (activation_bytes(c, tokens, a, cuda, tp, 0) if pp > 1 else 0)}


def model_fits_layout(c, tp, pp):
    return all(getattr(c, name) % tp == 0 for name in ("n_head", "n_kv_head", "vocab_size", "mlp_hidden")) \
        and pp <= c.n_layer


def make_plan(cfg, given, c, data):
    """GPTConfig c (model_config_for's), data (load_data's or None) -> (cfg with the layout, micro-batch and accumulation to run, the plan as a dict, its lines for people).

    The layout: --tp/--pp when given, else data parallel, unless no micro-batch fits one GPU: then the
    smallest tp (within a node), then pp, that fits. The micro-batch: --batch-size when given, else the
    largest up to it that fits and, with --tokens-per-step, divides it into whole accumulation steps."""
    for name in ("tokens_per_step", "gpus", "gpu_memory"):
        if not getattr(cfg, name) >= 0:
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(cfg, name)} must be 0 or more.")
    cuda = wants_cuda(cfg.device)
    world = cfg.gpus if cfg.plan and cfg.gpus else int(os.environ.get("WORLD_SIZE", "1"))
    gpus_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", min(world, 8)))
    limit = cfg.gpu_memory * GIB or None
    if limit is None and cuda:
        limit = torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", "0"))).total_memory
    dtype = cfg.dtype if cfg.dtype != "auto" else "bfloat16" if cuda or cfg.plan else fast_dtype("cpu")
    train_tokens = len(data[0]) if data is not None else None
    target = 0 if "grad_accum" in given else cfg.tokens_per_step  # a --grad-accum typed wins over the preset's
    other_optimizer = "muon" if cfg.optimizer == "adamw" else "adamw"
    counts = parameter_counts(c)
    n_params = counts["total"]

    def accumulation(b, dp):
        return max(1, round(target / (b * dp * cfg.block_size))) if target else cfg.grad_accum

    def peak(b, dp, tp, pp):
        parts = memory_estimate(c, counts, b, dp, tp, pp, accumulation(b, dp), dtype, cfg.schedule, cuda)
        return sum(v for k, v in parts.items() if k != other_optimizer), parts

    def fits(b, dp, tp, pp):
        return limit is None or peak(b, dp, tp, pp)[0] <= FIT_FRACTION * limit

    if "tp" in given or "pp" in given or cfg.tp * cfg.pp > 1:
        layouts = [(cfg.tp, cfg.pp)]
    else:  # data parallel first; tp stays inside a node (it all-reduces in every block)
        layouts = sorted(((tp, pp) for tp in (1, 2, 4, 8) for pp in (1, 2, 4, 8, 16)
                          if tp <= gpus_per_node and world % (tp * pp) == 0 and model_fits_layout(c, tp, pp)),
                         key=lambda layout: (layout[0] * layout[1], layout[1])) or [(1, 1)]
    choice = None
    for tp, pp in layouts:
        dp = max(1, world // (tp * pp))
        fitting = [b for b in range(cfg.batch_size, 0, -1) if fits(b, dp, tp, pp)]
        whole = [b for b in fitting if not target or target % (b * dp * cfg.block_size) == 0]
        if fitting:
            choice = cfg.batch_size if "batch_size" in given else (whole or fitting)[0], dp, tp, pp
            break
    nothing_fits = choice is None
    if nothing_fits:
        choice = cfg.batch_size, max(1, world // (cfg.tp * cfg.pp)), cfg.tp, cfg.pp
    b, dp, tp, pp = choice
    cfg = TrainConfig(**{**asdict(cfg), "batch_size": b, "grad_accum": accumulation(b, dp), "tp": tp, "pp": pp,
                         "tokens_per_step": target})
    total, parts = peak(b, dp, tp, pp)
    tokens_per_step = b * cfg.grad_accum * dp * cfg.block_size
    epochs = tokens_per_step * cfg.max_steps / train_tokens if train_tokens else None
    plan = dict(params=n_params, dp=dp, tp=tp, pp=pp, micro_batch=b, grad_accum=cfg.grad_accum,
                tokens_per_step=tokens_per_step, peak_memory_gb=round(total / GIB, 2),
                gpu_memory_gb=round(limit / GIB, 2) if limit else None, fits=not nothing_fits, dtype=dtype,
                epochs=epochs, memory_gb={k: round(v / GIB, 3) for k, v in parts.items()})

    g = lambda n: f"{n / GIB:.3g}"  # noqa: E731
    ranks = f"{dp * tp * pp} GPU(s)" if cuda or cfg.plan else f"{dp * tp * pp} process(es) on the CPU"
    lines = [f"plan: {n_params:,} parameters | {ranks} as dp {dp} x tp {tp} x pp {pp} | "
             f"micro-batch {b} x {cfg.block_size} tokens x {cfg.grad_accum} accumulation x {dp} dp = "
             f"{tokens_per_step:,} tokens per step" + (f" (the nearest to --tokens-per-step {target:,})"
                                                        if target and tokens_per_step != target else "")
             + ("" if train_tokens else f" | vocabulary {c.vocab_size:,} (no --data-dir)")]
    if epochs is not None:
        lines.append(f"plan: {cfg.max_steps:,} steps x {tokens_per_step:,} tokens = {epochs:,.2f} epochs of the "
                     f"{train_tokens:,} training tokens in {cfg.data_dir}")
    extra = "".join(f" + {name} {g(parts[key])}" for key, name in
                    (("ddp_buckets", "DDP buckets"), ("weight_copies", f"{dtype} weight copies")) if parts[key])
    lines.append(f"plan: memory per GPU, estimated (GiB, eager; compiled keeps less): weights {g(parts['weights'])} + "
                 f"gradients {g(parts['gradients'])} + {cfg.optimizer} {g(parts[cfg.optimizer])} "
                 f"({other_optimizer}: {g(parts[other_optimizer])}){extra} + activations {g(parts['activations'])} "
                 f"({b} x {cfg.block_size} tokens, {c.attn_impl}) = {g(total)}"
                 + (f" of the GPU's {g(limit)}" if limit else "; not checked: no --gpu-memory" if cfg.plan else
                    "; not checked on the CPU"))
    if nothing_fits:
        lines.append(f"plan: nothing fits: even a micro-batch of 1 needs about {g(peak(1, dp, tp, pp)[0])} GiB "
                     f"of the {g(FIT_FRACTION * limit)} usable per GPU in any layout of {world} GPU(s); use more "
                     f"or larger GPUs, or a smaller model.")
    elif limit and total > FIT_FRACTION * limit:
        smaller = next((s for s in range(b - 1, 0, -1) if fits(s, dp, tp, pp)), None)
        lines.append(f"plan: the estimate is above {FIT_FRACTION:.0%} of the GPU's memory; " +
                     (f"--batch-size {smaller} would fit ({g(peak(smaller, dp, tp, pp)[0])} GiB)."
                      if smaller else "no --batch-size fits this layout; try --tp or --pp."))
    if cfg.preset and epochs is not None and epochs > TOO_MANY_EPOCHS:
        lines.append(f"plan: --preset {cfg.preset} would read the {train_tokens:,} tokens of {cfg.data_dir} about "
                     f"{epochs:,.0f} times: it needs a corpus of its size; give one with `python pipeline.py "
                     "--corpus DIR` or tokenize_data.py on your own text into --data-dir.")
    return cfg, plan, lines


# ---------------------------------------------------------------------------------------------------
# The step and evaluation

def train_step(model, optimizer, scaler, batches, lr, cfg, autocast):
    """One optimizer step over the micro-batches; returns this rank's mean loss (a 0-dim tensor).

    Each micro loss is divided by grad_accum so the summed gradients are those of the mean over the
    whole batch. DDP all-reduces gradients only on the last micro-step (no_sync on the others)."""
    set_learning_rate(optimizer, lr, cfg)
    loss_sum = torch.zeros((), device=batches[0][0].device)
    for micro, (x, y) in enumerate(batches):
        last = micro == len(batches) - 1
        with model.no_sync() if isinstance(model, DDP) and not last else nullcontext():
            with autocast:
                _, loss = model(x, y)
            loss = loss / len(batches)
            scaler.scale(loss).backward()
        loss_sum += loss.detach()
    if cfg.grad_clip > 0:
        scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum


@torch.no_grad()
def evaluate(model, val_data, cfg, dp_rank, dp_size, device, autocast, dp_group=None, batch_loss=None):
    """Mean loss over eval_steps fixed validation batches (the same every evaluation), over all dp ranks.
    batch_loss(x, y): the loss of a batch under --tp/--pp (part 2's pipeline_loss); else the model's."""
    model.eval()
    total = torch.zeros((), device=device)
    for i in range(cfg.eval_steps):
        starts = batch_starts(cfg.seed, i, dp_size * cfg.batch_size, len(val_data), cfg.block_size, split=1)
        x, y = get_batch(val_data, starts.view(dp_size, cfg.batch_size)[dp_rank], cfg.block_size, device)
        if batch_loss is not None:
            total += batch_loss(x, y)
        else:
            with autocast:
                total += model(x, y)[1].float()
    model.train()
    return (all_reduce(total / cfg.eval_steps, dp_group) / dp_size).item()


# ---------------------------------------------------------------------------------------------------
# Checkpoints and logs

def rng_states(device):
    """This process's torch RNG states (dropout masks), gathered from every rank."""
    state = {"torch_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["torch_cuda"] = torch.cuda.get_rng_state(device)
    if not dist.is_initialized():
        return [state]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, state)
    return gathered


def set_rng_states(states, rank, world_size, device):
    if len(states) != world_size:
        print(f"rank {rank}: checkpoint holds RNG states of {len(states)} ranks, not {world_size}; dropout "
              "masks will differ from the original run (the data does not).")
        return
    state = states[rank]
    torch.set_rng_state(state["torch_cpu"])
    if device.type == "cuda" and "torch_cuda" in state:
        torch.cuda.set_rng_state(state["torch_cuda"], device)


def plot_losses(log_path, png_path):
    """loss.png: train loss per step and val loss per eval; skipped silently without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [json.loads(line) for line in open(log_path) if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train", lw=1)
    evals = [r for r in rows if "val_loss" in r]
    ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val")
    ax.set(xlabel="step", ylabel="loss (nats/token)")
    ax.legend()
    with atomic_output(png_path) as f:  # flags.py's rule for outputs
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def check_finite(loss, what, step, ckpt_path):
    """Stop on nan/inf before anything is saved, so the checkpoint on disk is the last good one."""
    if not math.isfinite(loss):
        kept = f"{ckpt_path} is kept" if os.path.isfile(ckpt_path) else "no checkpoint was written"
        raise SystemExit(f"{what} became {loss} at step {step}; stopping ({kept}). Lower --lr, or use "
                         "--dtype bfloat16 or float32 instead of float16.")


def human_time(seconds):
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# ---------------------------------------------------------------------------------------------------
# The run, in the order it meets its pieces: inputs, processes, model, optimizer, outputs; the loop's
# step, log line and checkpoint; main() last

def read_inputs(cfg, given, ckpt, ckpt_path):
    """-> (data, tokenizer, init, model_config): the data, read and checked once, before any process group
    or GPU memory (--plan may go without it); the checkpoint --init-from names; the model's shape: the
    flags', or that of the checkpoint it resumes or starts from."""
    data = load_data(cfg.data_dir, cfg.block_size) if cfg.data_dir or not cfg.plan else None
    tokenizer = data_tokenizer(cfg.data_dir) if data is not None else None
    init = read_checkpoint(cfg.init_from, "--init-from") if cfg.init_from and ckpt is None else None
    try:
        model_config = model_config_for(cfg, given, data and data[2], tokenizer, ckpt or init,
                                         cfg.init_from if init else ckpt_path)
    except ValueError as e:  # GPTConfig: a shape the model cannot take, e.g. n_embd not divisible by n_head
        raise SystemExit(str(e)) from None
    return data, tokenizer, init, model_config


def start_processes(cfg):
    """-> (rank, world_size, local_rank, device, grid). grid: part 2's Grid under --tp/--pp above 1, else
    None (the plain model, DDP over all ranks)."""
    rank, world_size, local_rank, device = setup_distributed(cfg.device)
    if world_size % (cfg.tp * cfg.pp):
        raise SystemExit(f"--tp {cfg.tp} x --pp {cfg.pp} = {cfg.tp * cfg.pp} does not divide the {world_size} "
                         "processes; launch a multiple of tp x pp ranks.")
    grid = Grid(cfg.tp, cfg.pp) if cfg.tp * cfg.pp > 1 else None  # part 2
    return rank, world_size, local_rank, device, grid


def say_notes(say, cfg, given, ckpt, ckpt_path, ckpt_tokenizer, meta):
    """Notes on what this run replaces or starts from, and on a checkpoint that will carry no tokenizer."""
    if ckpt is None and os.path.isfile(ckpt_path):  # there, but --resume was not given
        say(f"note: {ckpt_path} will be replaced at this run's first checkpoint; until then --resume continues it.")
    elif ckpt is None and given.get("resume"):
        say(f"--resume: no checkpoint at {ckpt_path}; starting fresh.")
    if ckpt_tokenizer is None:
        say(f"note: {cfg.data_dir} has no tokenizer.tiktoken, so align.py will refuse this model and sample.py "
            + ("will read its ids as raw bytes." if meta["vocab_size"] == 256 else "will too (its vocab_size "
               f"is {meta['vocab_size']}, not 256 raw bytes); to use it, run tokenize_data.py on the corpus first."))


def place_model(cfg, model_config, weights, grid, rank, device):
    """-> (model, n_params, flops_per_token): the whole model from the seed (or these weights), counted whole,
    cut to this rank's shard of its stage under --tp/--pp (part 2), on the device, dropout seeded per rank."""
    model = build_model(model_config, cfg.seed)
    if weights is not None:
        model.load_state_dict(weights)
    n_params, flops_per_token = model.num_params(), model.flops_per_token(cfg.block_size)  # whole model
    if grid:  # part 2: load whole, then shard, so every layout starts from the same weights
        shard_model(model, grid)
    model.to(device)
    # Dropout masks differ across ranks, except across tp ranks: their activations outside the split
    # layers are replicated and must stay identical.
    torch.manual_seed(cfg.seed + rank - (grid.tp_rank if grid else 0))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return model, n_params, flops_per_token


def precision(cfg, device, grid):
    """-> (dtype, autocast, scaler): --dtype (auto: model.py's fast_dtype, bf16 where the GPU or CPU has
    it), the autocast context of the forwards, and fp16's loss scaler (off for the others)."""
    dtype = fast_dtype(device.type, cfg.dtype)
    autocast = torch.autocast(device.type, dtype=getattr(torch, dtype), enabled=dtype != "float32")
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "float16")  # fp16 needs loss scaling
    if grid and scaler.is_enabled():
        raise SystemExit("float16 needs one loss scale agreed by all stages, which --tp/--pp do not do; "
                         "pass --dtype bfloat16 or float32.")
    return dtype, autocast, scaler


def resume_state(ckpt, cfg, model, grid, optimizer, scaler, rank, world_size, device):
    """--resume: the checkpoint's optimizer state (this shard's slice of it under --tp/--pp), loss scale and
    RNG states; the weights came with the model."""
    saved_optimizer = ckpt["train_config"]["optimizer"]
    if cfg.optimizer != saved_optimizer:
        raise SystemExit(f"--optimizer {cfg.optimizer} differs from the checkpoint's {saved_optimizer} (its state "
                         "does not carry over); drop the flag or train into a new --out-dir.")
    if grid:  # part 2: this shard's slice of the whole model's optimizer state
        load_sharded_optimizer_state(model, grid, optimizer, ckpt["optimizer"])
    else:
        optimizer.load_state_dict(ckpt["optimizer"])
    if "scaler" in ckpt and scaler.is_enabled():
        scaler.load_state_dict(ckpt["scaler"])
    set_rng_states(ckpt["rng"], rank, world_size, device)


def wrap_model(model, cfg, grid, dp_size, local_rank, device):
    """The model the loop trains: compiled (--compile) and in DDP over dp ranks; under --tp/--pp the shard as
    it is (stages run block by block, nothing to compile, and part 2 averages dp gradients by hand)."""
    if grid:
        return model
    model = torch.compile(model) if cfg.compile else model
    return DDP(model, device_ids=[local_rank] if device.type == "cuda" else None) if dp_size > 1 else model


def open_outputs(cfg, ckpt, master, say):
    """-> (log_path, history): --out-dir made, a killed run's temporaries removed, and log.jsonl rewritten
    from the checkpoint's log. The log travels in ckpt.pt, so the resumed log is the checkpoint's run, each
    step once, whatever a killed run appended after the checkpoint or a fresh run killed before its first
    one wrote over it."""
    log_path = os.path.join(cfg.out_dir, "log.jsonl")
    history = list(ckpt["log"]) if ckpt else []
    if master:
        try:
            os.makedirs(cfg.out_dir, exist_ok=True)
        except OSError as e:
            raise SystemExit(f"--out-dir {cfg.out_dir} cannot be made a folder ({e.strerror}); pick another.") from None
        outputs = [os.path.join(cfg.out_dir, name) for name in ("ckpt.pt", "log.jsonl", "loss.png")]
        stale = [os.path.basename(p) for path in outputs for p in remove_stale_temporaries(path)]
        if stale:
            say(f"removed what a killed run left: {', '.join(stale)}")
        with atomic_output(log_path, "w") as f:
            f.writelines(json.dumps(e) + "\n" for e in history)
    return log_path, history


def run_step(model, grid, optimizer, scaler, train_data, step, lr, cfg, dp_rank, dp_size, dp_group, device,
             autocast):
    """Step `step`: this rank's micro-batches through train_step (part 2's parallel_train_step under
    --tp/--pp) -> the global batch's mean loss, a float, the same on every rank."""
    batches = micro_batches(train_data, cfg, step, dp_rank, dp_size, device)
    if grid:  # part 2: the pipeline schedule over the stages, tp inside each
        loss = parallel_train_step(model, grid, optimizer, batches, lr, cfg, autocast)
    else:
        loss = train_step(model, optimizer, scaler, batches, lr, cfg, autocast)
    return (all_reduce(loss, dp_group) / dp_size).item()


def log_entry(step, loss, lr, dt, seconds_left, val_loss, meta, tokens_per_step, flops_per_step, peak,
              world_size, cfg):
    """-> (entry, line): the step's row of log.jsonl and its printed line (loss, lr, tokens/s, MFU on known
    GPUs, time left; at an evaluation the val loss and bits per byte)."""
    entry = {"step": step, "loss": loss, "lr": lr, "tokens_per_sec": tokens_per_step / dt}
    line = f"step {step}/{cfg.max_steps} | loss {loss:.4f} | lr {lr:.2e} | {entry['tokens_per_sec']:,.0f} tok/s"
    if peak:
        entry["mfu"] = flops_per_step / dt / (peak * world_size)
        line += f" | mfu {100 * entry['mfu']:.1f}%"
    line += f" | {human_time(seconds_left)} left"
    if val_loss is not None:
        entry["val_loss"] = val_loss
        line += f" | val {val_loss:.4f}"
        if meta.get("val_bytes") and meta.get("val_tokens"):
            entry["val_bpb"] = val_loss / math.log(2) * meta["val_tokens"] / meta["val_bytes"]
            line += f" ({entry['val_bpb']:.3f} bits/byte)"
    return entry, line


def record(entry, history, log_path, master):
    """The step's entry joins the history ckpt.pt carries and log.jsonl (rank 0 appends it)."""
    history.append(entry)
    if master:
        with open(log_path, "a") as f:
            f.write(json.dumps(entry) + "\n")


def save_run(step, ckpt_path, raw_model, grid, optimizer, scaler, cfg, tokens_per_step, history, tokenizer, device):
    """ckpt.pt at `step`: a collective, every rank calls it; rank 0 writes the whole model (part 2 gathers the
    shards and stages onto it under --tp/--pp), optimizer, RNG states, data position and log."""
    rng = rng_states(device)
    if grid:  # part 2
        whole, optimizer_state = gather_checkpoint(raw_model, grid, optimizer)
    else:
        whole, optimizer_state = raw_model, optimizer.state_dict()
    if not dist.is_initialized() or dist.get_rank() == 0:
        position = {"step": step, "seed": cfg.seed, "tokens_seen": step * tokens_per_step}
        save_checkpoint(ckpt_path, whole, train_config=asdict(cfg), step=step, optimizer=optimizer_state,
                        log=history, rng=rng, data_position=position, scaler=scaler.state_dict(),
                        stage="pretrain", tokenizer=tokenizer)


def finish(say, rank, step, start_step, t_start, cfg, ckpt_path, log_path, device):
    """The run's last line (steps, time, peak GPU memory, checkpoint), loss.png, and the process group closed."""
    if step == start_step:
        say(f"the checkpoint is already at step {step} >= --max-steps {cfg.max_steps}; nothing to train.")
    else:
        memory = f"; peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else ""
        say(f"{step - start_step} steps in {human_time(time.time() - t_start)}{memory}; checkpoint {ckpt_path}")
    if rank == 0:
        plot_losses(log_path, os.path.join(cfg.out_dir, "loss.png"))
    if dist.is_initialized():
        dist.destroy_process_group()


def main(argv=None):
    cfg, given, ckpt, ckpt_path = resolve_config(argv)
    check_config(cfg)
    data, tokenizer, init, model_config = read_inputs(cfg, given, ckpt, ckpt_path)
    cfg, plan, plan_lines = make_plan(cfg, given, model_config, data)
    if cfg.plan or int(os.environ.get("RANK", "0")) == 0:
        print("\n".join(plan_lines), flush=True)
    if cfg.plan:  # the plan's last line: the plan as one JSON object
        print(json.dumps(plan))
        return
    rank, world_size, local_rank, device, grid = start_processes(cfg)
    dp_rank, dp_size, dp_group = (grid.dp_rank, grid.dp, grid.dp_group) if grid else (rank, world_size, None)
    say = print if rank == 0 else (lambda *a, **k: None)
    train_data, val_data, meta = data
    ckpt_tokenizer = tokenizer if tokenizer is not None else (ckpt or {}).get("tokenizer")  # what ckpt.pt carries
    say_notes(say, cfg, given, ckpt, ckpt_path, ckpt_tokenizer, meta)

    model, n_params, flops_per_token = place_model(cfg, model_config, (ckpt or init or {}).get("model"), grid, rank, device)
    dtype, autocast, scaler = precision(cfg, device, grid)
    # part 2's hooks: Muon's step for a tp shard, and the evaluation forward through the stages
    optimizer = make_optimizer(model, cfg, device.type, tp_muon_update(grid.tp_group) if grid else None, dtype)
    batch_loss = (lambda x, y: pipeline_loss(model, grid, x, y, autocast)) if grid else None
    if ckpt is not None:
        resume_state(ckpt, cfg, model, grid, optimizer, scaler, rank, world_size, device)
    raw_model, model = model, wrap_model(model, cfg, grid, dp_size, local_rank, device)  # checkpoints read raw_model
    tokens_per_step = cfg.batch_size * cfg.grad_accum * dp_size * cfg.block_size
    log_path, history = open_outputs(cfg, ckpt, rank == 0, say)
    say(f"{n_params:,} parameters | {world_size} process(es) on {device.type}, {dtype} | layout dp {dp_size} x "
        f"tp {cfg.tp} x pp {cfg.pp}" + (f", schedule {cfg.schedule}" if cfg.pp > 1 else "") + " | global batch "
        f"{cfg.batch_size} x {cfg.grad_accum} accum x {dp_size} dp x {cfg.block_size} = {tokens_per_step:,} tokens")
    start_step = ckpt["step"] if ckpt is not None else 0
    say(f"steps {start_step} -> {cfg.max_steps}" + (f" (resumed from {ckpt_path})" if ckpt else ""))

    step, step_seconds, t_start, peak = start_step, None, time.time(), peak_flops(device)
    while step < cfg.max_steps:
        t0, lr = time.time(), learning_rate_at(step, cfg)
        loss = run_step(model, grid, optimizer, scaler, train_data, step, lr, cfg, dp_rank, dp_size, dp_group,
                        device, autocast)
        step += 1
        check_finite(loss, "loss", step, ckpt_path)
        dt = time.time() - t0
        step_seconds = dt if step_seconds is None or step == start_step + 2 else 0.9 * step_seconds + 0.1 * dt
        evaluating = step == cfg.max_steps or (cfg.eval_interval > 0 and step % cfg.eval_interval == 0)
        val_loss = None
        if evaluating:
            val_loss = evaluate(model, val_data, cfg, dp_rank, dp_size, device, autocast, dp_group, batch_loss)
            check_finite(val_loss, "validation loss", step, ckpt_path)
        entry, line = log_entry(step, loss, lr, dt, step_seconds * (cfg.max_steps - step), val_loss, meta,
                                tokens_per_step, flops_per_token * tokens_per_step, peak, world_size, cfg)
        if evaluating or step % cfg.log_interval == 0:  # as nanoGPT: every Nth step; log.jsonl keeps them all
            say(line, flush=True)
        record(entry, history, log_path, rank == 0)
        if evaluating:
            save_run(step, ckpt_path, raw_model, grid, optimizer, scaler, cfg, tokens_per_step, history,
                     ckpt_tokenizer, device)

    # DDP's reducer holds the process group: dropped before destroy_process_group (which lets go of the GIL),
    # not freed with it (a wait for gloo's thread while holding the GIL that thread needs: a hang at exit)
    model = None
    finish(say, rank, step, start_step, t_start, cfg, ckpt_path, log_path, device)


# ===================================================================================================
# Part 2: tensor and pipeline parallelism, only under --tp or --pp above 1. Part 1 calls Grid, shard_model
# (the whole model cut to this rank's tp shard of its stage), parallel_train_step and pipeline_loss (the
# schedule), gather_checkpoint and load_sharded_optimizer_state (checkpoints stay whole).
#
# Global rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank: tp ranks are neighbours because they talk
# most (all-reduces inside every block), so on a node they share the fastest links. Each rank keeps
# tp_group (its tp ranks), dp_group (same shard of the same stage in every replica: the gradient
# average), pp_group (its stages: activations, grad norm, checkpoint gather) and embed_group (first and
# last stage: tied embedding/head gradients).

class Grid:
    """This rank's coordinates in the (pp, dp, tp) grid and its process groups."""

    def __init__(self, tp, pp):
        world, rank = dist.get_world_size(), dist.get_rank()
        self.tp, self.pp, self.dp = tp, pp, world // (tp * pp)
        self.pp_rank, self.dp_rank, self.tp_rank = rank // (self.dp * tp), rank // tp % self.dp, rank % tp
        ranks = torch.arange(world).view(pp, self.dp, tp)
        self.embed_group = None
        # new_group is collective: every rank creates every group, in the same order
        for kind, lists in (("tp", ranks.flatten(0, 1)), ("dp", ranks.transpose(1, 2).flatten(0, 1)),
                            ("pp", ranks.permute(1, 2, 0).flatten(0, 1))):
            for members in lists.tolist():
                group = dist.new_group(members)
                if rank in members:
                    setattr(self, f"{kind}_group", group)
                    setattr(self, f"{kind}_ranks", members)
                if kind == "pp" and pp > 1:
                    group = dist.new_group([members[0], members[-1]])
                    self.embed_group = group if rank in (members[0], members[-1]) else self.embed_group
        self.is_first, self.is_last = self.pp_rank == 0, self.pp_rank == pp - 1
        self.prev_rank = None if self.is_first else self.pp_ranks[self.pp_rank - 1]
        self.next_rank = None if self.is_last else self.pp_ranks[self.pp_rank + 1]
        dist.barrier()  # a collective on the world group before the first point-to-point (NCCL wants one)


# ---------------------------------------------------------------------------------------------------
# Tensor-parallel layers, and the whole model cut into this rank's shard of its stage

# The conjugate pair. A column-parallel layer needs its input whole on every tp rank; a row-parallel
# layer leaves each rank a partial sum of its output. f and g are each other's transpose.
class CopyToTP(torch.autograd.Function):
    """f: identity forward; all-reduce backward (each rank's dL/dx covers only its own columns)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad.clone(), ctx.group), None


class ReduceFromTP(torch.autograd.Function):
    """g: all-reduce forward (sum the partial outputs); identity backward (each part counted once)."""

    @staticmethod
    def forward(ctx, x, group):
        return all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def shard_index(sections, tp_rank, tp):
    """Rows (or columns) tp_rank holds of a tensor made of `sections`: piece tp_rank of each section,
    so [q | k | v] gives every rank its own q, k and v heads and [gate | up] matching halves."""
    starts = torch.tensor([0, *sections[:-1]]).cumsum(0).tolist()
    return torch.cat([torch.arange(s + tp_rank * n // tp, s + (tp_rank + 1) * n // tp)
                      for s, n in zip(starts, sections)])


def shard_parameter(full, dim, sections, grid):
    """This rank's slice of a whole tensor, as a Parameter that remembers how it was cut."""
    p = nn.Parameter(full.detach().index_select(dim, shard_index(sections, grid.tp_rank, grid.tp)))
    p.tp_dim, p.tp_sections = dim, sections  # read by the grad norm and the checkpoint gather
    return p


class ColumnParallelLinear(nn.Module):
    """Each tp rank owns some output features (rows of W): (B, T, in) -> (B, T, out/tp)."""

    def __init__(self, full, sections, grid, weight=None):
        super().__init__()
        self.group = grid.tp_group
        self.weight = weight if weight is not None else shard_parameter(full.weight, 0, sections, grid)
        self.bias = None if full.bias is None else shard_parameter(full.bias, 0, sections, grid)

    def forward(self, x):
        return F.linear(CopyToTP.apply(x, self.group), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """Each tp rank owns some input features (columns of W), fed by the column-parallel layer before
    it without any gather: (B, T, in/tp) -> partial sums -> g -> (B, T, out). The bias is replicated."""

    def __init__(self, full, sections, grid):
        super().__init__()
        self.group = grid.tp_group
        self.weight = shard_parameter(full.weight, 1, sections, grid)
        self.bias = None if full.bias is None else nn.Parameter(full.bias.detach().clone())

    def forward(self, x):
        y = ReduceFromTP.apply(F.linear(x, self.weight), self.group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Each tp rank holds vocab rows [start, end) (the tied head the same rows); other tokens look up
    zeros here, and the sum over ranks (g) is the embedding."""

    def __init__(self, full, grid):
        super().__init__()
        vocab = full.weight.size(0)
        self.group, self.start, self.end = grid.tp_group, grid.tp_rank * vocab // grid.tp, (grid.tp_rank + 1) * vocab // grid.tp
        self.weight = shard_parameter(full.weight, 0, [vocab], grid)

    def forward(self, idx):                                              # (B, T) -> (B, T, C)
        outside = (idx < self.start) | (idx >= self.end)
        x = F.embedding((idx - self.start).masked_fill(outside, 0), self.weight)
        return ReduceFromTP.apply(x.masked_fill(outside[..., None], 0.0), self.group)


class VocabParallelCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy over targets != -1 from logits split over the vocab, never gathered.

    loss_i = log sum_v exp(z_iv - m_i) - (z_i,t_i - m_i), m_i the max over all shards: the max, the sum
    of exponentials and the target logit (from the shard that owns t_i) are each an all-reduce of N
    numbers, not N x vocab. The gradient, softmax - onehot(t), is local to each shard.
    """

    @staticmethod
    def forward(ctx, logits, targets, start, group):                     # (N, V/tp), (N,)
        logits_max = all_reduce(logits.max(dim=-1).values, group, dist.ReduceOp.MAX)
        exp = (logits - logits_max[:, None]).exp()
        sum_exp = all_reduce(exp.sum(dim=-1), group)
        local_t = targets - start
        mine = (local_t >= 0) & (local_t < logits.size(1))              # -1 is nobody's
        local_t = local_t.masked_fill(~mine, 0)
        target_logit = (logits.gather(1, local_t[:, None])[:, 0] - logits_max).masked_fill(~mine, 0.0)
        target_logit = all_reduce(target_logit, group)
        valid = targets != -1
        n_valid = valid.sum()
        ctx.save_for_backward(exp / sum_exp[:, None], local_t, mine, valid, n_valid)
        return ((sum_exp.log() - target_logit) * valid).sum() / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_t, mine, valid, n_valid = ctx.saved_tensors
        grad = softmax.clone()
        grad[torch.arange(grad.size(0), device=grad.device), local_t] -= mine.to(grad.dtype)
        return grad * (valid * grad_loss / n_valid)[:, None], None, None, None


def stage_layers(n_layer, pp, pp_rank):
    """Blocks [lo, hi) of stage pp_rank: contiguous, the first n_layer % pp stages one block longer."""
    base, extra = divmod(n_layer, pp)
    lo = pp_rank * base + min(pp_rank, extra)
    return lo, lo + base + (pp_rank < extra)


def check_parallel_config(config, tp, pp):
    for name in ("n_head", "n_kv_head", "vocab_size", "mlp_hidden"):
        if getattr(config, name) % tp:
            raise SystemExit(f"--tp {tp} must divide the model's {name}={getattr(config, name)} (each tp rank "
                             "owns an equal share); pick a --tp that divides it, or change the model.")
    if config.n_layer < pp:
        raise SystemExit(f"--pp {pp} is more stages than the model's {config.n_layer} blocks; use --pp <= n_layer.")


def shard_model(model, grid):
    """Cut the whole model (from the seed, or loaded) down to this rank's tp shard of its stage, in place.

    Linears become their parallel versions; the embedding stays on the first stage, the final norm
    and head on the last (with tied weights, the head's weight is the embedding shard there too).
    """
    config, tp = model.config, grid.tp
    check_parallel_config(config, tp, grid.pp)
    if tp > 1:
        for block in model.blocks:
            attn, mlp, hd, hidden = block.attn, block.mlp, config.head_dim, config.mlp_hidden
            attn.qkv = ColumnParallelLinear(attn.qkv, [attn.n_head * hd, attn.n_kv_head * hd, attn.n_kv_head * hd], grid)
            attn.proj = RowParallelLinear(attn.proj, [attn.n_head * hd], grid)
            attn.n_head, attn.n_kv_head = attn.n_head // tp, attn.n_kv_head // tp   # read at forward time
            mlp.fc = ColumnParallelLinear(mlp.fc, [hidden, hidden] if mlp.swiglu else [hidden], grid)
            mlp.proj = RowParallelLinear(mlp.proj, [hidden], grid)
        model.wte = VocabParallelEmbedding(model.wte, grid)
        tied = model.wte.weight if config.tie_weights else None
        model.lm_head = ColumnParallelLinear(model.lm_head, [config.vocab_size], grid, weight=tied)
    model.stage_lo, hi = stage_layers(config.n_layer, grid.pp, grid.pp_rank)
    model.blocks = nn.ModuleList(list(model.blocks)[model.stage_lo:hi])
    if not grid.is_first:
        model.wte = None
        if config.pos_encoding == "learned":
            model.wpe = None
    if not grid.is_last:
        model.norm_f = model.lm_head = None
    return model


# ---------------------------------------------------------------------------------------------------
# The pipeline schedule: stages pass activations forward and gradients back, micro-batch by micro-batch

def stage_forward(model, grid, x, targets, n_micro):
    """First stage: ids -> residual stream (B, T, C); middle: stream -> stream; last: -> loss / n_micro.
    The stage's own forward (model.py's GPT.forward on the blocks it kept) does the work; under --tp the
    last stage holds a vocabulary shard of the logits, so its loss is the vocab-parallel one."""
    if not grid.is_last:
        return model(x)[0]
    if grid.tp == 1:
        return model(x, targets)[1] / n_micro                           # grads add to the mean
    logits = model(x)[0].flatten(0, 1).float()                          # (B*T, vocab/tp)
    start = grid.tp_rank * model.config.vocab_size // grid.tp
    return VocabParallelCrossEntropy.apply(logits, targets.flatten(), start, grid.tp_group) / n_micro


def p2p(grid, send_next=None, send_prev=None, recv_next=None, recv_prev=None):
    """Post sends/receives to the neighbouring stages as one batch and wait for them. A send and a
    receive posted together is what keeps 1F1B from deadlocking on NCCL, where a lone send may wait for
    its receiver. recv_* are preallocated buffers: shapes are known, no handshake."""
    ops = [dist.P2POp(op, t, peer) for t, peer, op in
           ((send_prev, grid.prev_rank, dist.isend), (recv_prev, grid.prev_rank, dist.irecv),
            (send_next, grid.next_rank, dist.isend), (recv_next, grid.next_rank, dist.irecv)) if t is not None]
    for work in dist.batch_isend_irecv(ops) if ops else []:
        work.wait()


def pipeline_step(model, grid, batches, schedule, autocast):
    """Forward and backward of the micro-batches [(x, y), ...] on this stage -> the loss sum (last stage).

    gpipe: all forwards, then all backwards (m micro-batches of activations held).
    1f1b: stage s runs pp - s - 1 warm-up forwards, then one forward / one backward, then the remaining
    backwards: at most pp - s micro-batches held, the same bubble (pp - 1) / (m + pp - 1).
    """
    m, (B, T) = len(batches), batches[0][0].shape
    device, dtype = batches[0][0].device, next(model.parameters()).dtype  # the residual stream's
    inputs, outputs, losses = [None] * m, [None] * m, []

    def forward(i):
        x = batches[i][0]
        if not grid.is_first:
            x = torch.empty(B, T, model.config.n_embd, device=device, dtype=dtype, requires_grad=True)
            p2p(grid, recv_prev=x.data)
        with autocast:
            inputs[i], outputs[i] = x, stage_forward(model, grid, x, batches[i][1], m)
        if grid.is_last:
            losses.append(outputs[i].detach().float())  # no .item(): no sync per micro-batch

    def backward(i, send_next=None):  # send_next: the newest activation, sent with the receive
        grad = None if grid.is_last else torch.empty(B, T, model.config.n_embd, device=device, dtype=dtype)
        p2p(grid, send_next=send_next, recv_next=grad)
        torch.autograd.backward(outputs[i], grad)
        p2p(grid, send_prev=None if grid.is_first else inputs[i].grad)
        inputs[i] = outputs[i] = None                                   # free micro-batch i

    def activation(i):
        return None if grid.is_last else outputs[i].detach()

    warmup = m if schedule == "gpipe" else min(grid.pp - grid.pp_rank - 1, m)
    for i in range(warmup):
        forward(i)
        p2p(grid, send_next=activation(i))
    for i in range(warmup, m):  # 1f1b's steady state: forward i, backward i - warmup
        forward(i)
        backward(i - warmup, send_next=activation(i))
    for i in range(m - warmup, m):
        backward(i)
    return sum(losses) if losses else 0.0


def finish_gradients(model, grid, loss_sum, grad_clip):
    """After the schedule: tied grads, dp average, global-norm clip -> (this replica's loss, grad norm)."""
    params = [p for p in model.parameters() if p.grad is not None]
    tied_here = grid.pp > 1 and model.config.tie_weights and (grid.is_first or grid.is_last)
    if tied_here:  # the first stage used it as embedding, the last as head: the gradient is the sum
        all_reduce((model.wte if grid.is_first else model.lm_head).weight.grad, grid.embed_group)
    if grid.dp > 1:  # over dp_group only: the world group would also add up other shards and stages
        for p in params:
            all_reduce(p.grad, grid.dp_group).div_(grid.dp)
    # Squared norm: tp shards add up over tp; replicated params (norms, row-parallel biases) have equal
    # grads on all tp ranks, so tp rank 0 counts them; the tied copy counts on the first stage only.
    sq = torch.zeros((), device=params[0].device)
    for name, p in model.named_parameters():
        skip = tied_here and not grid.is_first and name == "lm_head.weight"
        if p.grad is not None and not skip and (hasattr(p, "tp_dim") or grid.tp_rank == 0):
            sq += p.grad.float().pow(2).sum()
    # the loss rides along: known on the last stage, the same on each of its tp ranks
    sq_loss = torch.stack([sq, torch.as_tensor(loss_sum if grid.tp_rank == 0 else 0.0, device=sq.device)])
    if grid.tp > 1:
        all_reduce(sq_loss, grid.tp_group)
    if grid.pp > 1:
        all_reduce(sq_loss, grid.pp_group)
    norm = sq_loss[0].sqrt()
    if grad_clip > 0:
        scale = (grad_clip / (norm + 1e-6)).clamp(max=1.0)  # as torch.nn.utils.clip_grad_norm_
        for p in params:
            p.grad.mul_(scale)
    return sq_loss[1], norm


def parallel_train_step(model, grid, optimizer, batches, lr, cfg, autocast):
    """train_step under --tp/--pp: the schedule, finish_gradients, the optimizer -> this replica's mean loss."""
    set_learning_rate(optimizer, lr, cfg)
    loss_sum = pipeline_step(model, grid, batches, cfg.schedule, autocast)
    loss, _ = finish_gradients(model, grid, loss_sum, cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


@torch.no_grad()
def pipeline_loss(model, grid, x, y, autocast):
    """Forward only (evaluation): the batch's mean loss, on every rank of this replica."""
    if not grid.is_first:
        x = torch.empty(*x.shape, model.config.n_embd, device=x.device, dtype=next(model.parameters()).dtype)
        p2p(grid, recv_prev=x)
    with autocast:
        out = stage_forward(model, grid, x, y, 1)
    if not grid.is_last:
        p2p(grid, send_next=out)
    loss = out.float() if grid.is_last else torch.zeros((), device=x.device)
    return all_reduce(loss, grid.pp_group) if grid.pp > 1 else loss


# ---------------------------------------------------------------------------------------------------
# Checkpoints: shards gathered whole to save, a whole state cut to this shard to resume

def global_name(model, name):
    """This stage's parameter name -> the whole model's (block numbers shift; a tied head is wte)."""
    if name.startswith("blocks."):
        _, i, rest = name.split(".", 2)
        return f"blocks.{int(i) + model.stage_lo}.{rest}"
    return "wte.weight" if name == "lm_head.weight" and model.config.tie_weights else name


def gather_full(model, grid, tensors):
    """{this stage's param name: tensor shaped like it} -> {whole-model name: whole tensor} on rank 0
    (None elsewhere): tp shards all-gathered and put back by the index that cut them, then the stages
    gathered to rank 0."""
    if grid.dp_rank != 0:
        return None
    named, whole = dict(model.named_parameters()), {}
    for name, t in tensors.items():
        if name == "lm_head.weight" and model.config.tie_weights and not grid.is_first:
            continue  # the first stage's wte.weight, the same values
        p, t = named[name], t.detach()
        if hasattr(p, "tp_dim"):  # a tp shard (only when tp > 1)
            t = whole_from_shards(p, t, grid.tp_group)
        whole[global_name(model, name)] = t.cpu()
    if grid.tp_rank != 0:
        return None
    if grid.pp > 1:
        stages = [None] * grid.pp if grid.is_first else None
        dist.gather_object(whole, stages, dst=grid.pp_ranks[0], group=grid.pp_group)
        if not grid.is_first:
            return None
        whole = {k: v for stage in stages for k, v in stage.items()}
    if model.config.tie_weights and "wte.weight" in whole:
        whole["lm_head.weight"] = whole["wte.weight"]
    return whole


def tp_muon_update(group):
    """Muon's step for a tp shard (model.Muon's sharded_update): the shard's momentum gathered whole over the
    tp group, the whole matrix's direction computed (each tp rank repeats it), this rank's rows or columns of
    it kept; so every layout takes the step one process takes."""
    def update(p, G, direction):
        whole = direction(whole_from_shards(p, G, group))
        index = shard_index(p.tp_sections, dist.get_rank(group), dist.get_world_size(group))
        return whole.index_select(p.tp_dim, index.to(whole.device))
    return update


def whole_from_shards(p, shard, group):
    """This rank's tp shard of parameter p (or a tensor shaped like it) -> the whole tensor, on every tp
    rank: all-gathered, then put back in the order shard_index cut it."""
    tp = dist.get_world_size(group)
    pieces = [torch.empty_like(shard) for _ in range(tp)]
    dist.all_gather(pieces, shard.contiguous(), group=group)
    index = torch.cat([shard_index(p.tp_sections, r, tp) for r in range(tp)]).to(shard.device)
    return torch.cat(pieces, p.tp_dim).index_select(p.tp_dim, index.argsort())  # rank-major -> whole layout


def whole_skeleton(model, optimizer):
    """The whole model as a GPT on the meta device (names and shapes, no memory), {its param name: index
    in its optimizer's state_dict} and that state_dict's param_groups (the same kind of optimizer)."""
    with torch.device("meta"):
        whole = GPT(model.config)
    kind = "muon" if isinstance(optimizer, Muon) else "adamw"
    whole_opt = make_optimizer(whole, TrainConfig(optimizer=kind))  # only its grouping is read
    return whole, param_index(whole, whole_opt), whole_opt.state_dict()["param_groups"]


def param_index(model, optimizer):
    """{param name: index in optimizer.state_dict()} (state_dict numbers params group after group)."""
    names = {p: n for n, p in model.named_parameters()}
    return {names[p]: i for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"])}


# per-parameter optimizer state shaped like the parameter (AdamW, Muon); a tuple: every rank gathers in this order
OPTIMIZER_TENSORS = ("exp_avg", "exp_avg_sq", "momentum_buffer")


def gather_checkpoint(model, grid, optimizer):
    """-> (the whole model, its optimizer's state_dict) on rank 0, (None, None) elsewhere; every rank calls it.
    Saved unsharded, so any layout, a single process and sample.py load it."""
    params = gather_full(model, grid, dict(model.named_parameters()))
    local, index = optimizer.state_dict(), param_index(model, optimizer)
    moments = {key: gather_full(model, grid, {n: local["state"][i][key] for n, i in index.items()
                                              if key in local["state"].get(i, {})})
               for key in OPTIMIZER_TENSORS}
    if params is None:
        return None, None
    whole, whole_index, groups = whole_skeleton(model, optimizer)
    state = {}
    for key, tensors in moments.items():
        for n, t in tensors.items():
            if n in whole_index:
                state.setdefault(whole_index[n], {})[key] = t
    step = next((s["step"] for s in local["state"].values() if "step" in s), None)  # AdamW's: one for all
    for entry in state.values():
        if "exp_avg" in entry:
            entry["step"] = step.clone()
    groups = [{**g, "params": w["params"]} for g, w in zip(local["param_groups"], groups)]
    whole.load_state_dict(params, assign=True)  # the gathered tensors put into the skeleton
    return whole, {"state": state, "param_groups": groups}


def load_sharded_optimizer_state(model, grid, optimizer, whole_state):
    """Load a whole model's optimizer state_dict (any layout or a single process wrote it) into this shard."""
    _, whole_index, _ = whole_skeleton(model, optimizer)
    named, state = dict(model.named_parameters()), {}
    for name, i in param_index(model, optimizer).items():
        entry = whole_state["state"].get(whole_index[global_name(model, name)])
        if entry is not None:
            p, state[i] = named[name], dict(entry)
            if hasattr(p, "tp_dim"):  # a tp shard (only when tp > 1)
                for key in (k for k in OPTIMIZER_TENSORS if k in entry):
                    state[i][key] = entry[key].index_select(p.tp_dim, shard_index(p.tp_sections, grid.tp_rank, grid.tp))
    groups = [{**g, **{k: v for k, v in w.items() if k != "params"}}
              for g, w in zip(optimizer.state_dict()["param_groups"], whole_state["param_groups"])]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


if __name__ == "__main__":
    try:
        main()
    except RuntimeError as e:
        news = lost_peer(e)  # another rank stopped: one sentence, not the collective's traceback
        if news is None:
            raise
        raise SystemExit(f"{news}; the last checkpoint in --out-dir is kept, and --resume continues from it.") from None
