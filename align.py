"""align.py: turn a pretrained GPT into a chat model: supervised fine-tuning (SFT), then DPO or RL (GRPO).

    python plays.py --chat-from data/corpus.jsonl --out-dir data/chat    # the demo data: questions on the plays
    python align.py --method sft --init out/pretrain/ckpt.pt --data data/chat/sft.jsonl --out-dir out/sft
    python align.py --method dpo --init out/sft/ckpt.pt --data data/chat/dpo.jsonl --out-dir out/dpo
    python align.py --method grpo --init out/sft/ckpt.pt --data data/chat/rl.jsonl --out-dir out/rl
    python align.py --method grpo --init out/pretrain/ckpt.pt --data data/chat/rl.jsonl --out-dir out/eval \
        --max-steps 0                                                    # only score a model on the questions
    torchrun --standalone --nproc-per-node 2 align.py --method sft ...        # data parallel (gloo/NCCL)

Data, one JSON object per line, in the conventions of the popular trainers:
  SFT  {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]} or
       {"prompt": "...", "response": "..."}
  DPO  {"prompt": ..., "chosen": ..., "rejected": ...}, each a string or a list of messages.
  GRPO {"prompt": ..., "answer": "..."} (a string or a list of messages, ending with the user's turn) or
       {"messages": [...], "answer": "..."}: the prompt and what the reward needs.
Optional extra fields: "group" (the held-out split key), "task" (metrics are also broken down by it),
"options" (SFT: the last assistant message is one of them; scored below).
Held out: --val-data, or else the groups (hash of "group", else of the line) that fall in --eval-fraction.

Held-out figures (log keys): SFT val_loss (per supervised token) and val_answer_accuracy: for each
example with options, the summed log-prob of each option + <|end|> as the answer; right when the true
one scores highest (the same test for any checkpoint, the pretrained one too); val_answer_exact: greedy
decoding writes exactly the true answer's tokens and <|end|> (a model must also learn to stop). DPO val_loss,
val_accuracy (chosen reward > rejected reward, a tie counts half), val_margin, val_chosen_reward,
val_rejected_reward, and val_logp_accuracy (log pi(chosen) > log pi(rejected): no reference involved,
so at step 0 it is the init model's own preference accuracy). GRPO val_accuracy: the greedy answer earns
the reward (per "task" too); val_pass@1 and val_pass@K: of K = --eval-samples answers sampled at
--temperature, the share right and whether any is; val_gained, val_lost, val_change_se: greedy answers that flipped since step 0.

Every method evaluates before the first step and after the last (and every --eval-interval steps, saving
a checkpoint each time). Prints a line every --log-interval steps, the last step's and each eval's; writes
OUT/log.jsonl (every step) and OUT/ckpt.pt (weights, tokenizer, "stage", train_config, the log up to its
step, and sha256 fingerprints of its inputs).

Design choices:
- Chat template (tokenize_data.render_conversation, the tokenizer's chat contract, which sample.py's chat
  calls too): [<|endoftext|>] + per message [<|role|>] + content + [<|end|>]. The loss sees only assistant
  content and its <|end|>: the model learns to answer and to stop, not to write the user's turns.
- A conversation longer than the block loses its oldest context tokens, never a supervised one; one whose
  supervised part alone does not fit is dropped and counted: a cut answer would teach a wrong one.
- One loop for the three methods: a method brings its examples, its step's loss and its evaluation.
  Batches follow from (--seed, step) alone, so a resumed run trains on what the uninterrupted one did.
- DPO: loss = -logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), log-probs summed over response
  tokens. The reference is the --init model, scored once up front on the held-out pairs and on the pairs
  the run will visit (max_steps x batch x ranks, a fixed sample), so no second model is kept.
- GRPO (on-policy RL, as Dr. GRPO and nanochat's chat_rl simplify it): each step samples --group-size
  answers to each of --batch-size prompts (an answer ends at <|end|>, or is cut off after --max-new-tokens
  and earns nothing), scores them with reward() (1 for the exact answer, else 0), and takes advantage =
  reward - its group's mean (not divided by the group's std: see group_advantages). The loss
  (clipped_policy_loss) sums over answers and their tokens advantage * pi(token) / pi_sampler(token), with
  pi = softmax(logits / --temperature) (what the answers were drawn from): it raises the answers that beat
  their group and lowers the rest. --num-iterations N takes N optimizer updates on each batch of samples:
  the first is the plain policy gradient (the ratio is 1), the later ones PPO's clipped ratio, so a token
  that has moved out of [1 - --clip-low, 1 + --clip-high] in its advantage's direction stops pulling. A
  group whose answers all scored alike teaches nothing and is left out of the loss's work. --beta > 0
  adds a per-token KL(pi || init) estimate against a frozen copy of --init.
- GRPO's default temperature is 0.5: what is scored is the greedy answer, and at T=0.5 a group's samples
  are the few answers greedy decoding weighs, so the update settles the contests it decides.
- Each prompt runs once for its G answers, in sampling and in the loss (KV cache, model.PrefixCache), not
  G times. Its samples follow from (--seed, step, prompt): a resumed run, or one on another number of
  ranks, draws exactly what the uninterrupted one did.
- The checkpoint carries the log, so --resume rewrites log.jsonl as that run's (each step once, however
  often it was killed), and fingerprints of --data, --val-data and, where it is the reference, the --init
  weights, so --resume refuses other inputs. --out-dir may not hold an input: it would be overwritten.
- A loss, gradient or weight that becomes nan/inf stops the run before it is saved: the checkpoint on
  disk stays the last good one. Under torchrun, a rank that dies stops the others with one sentence.
"""

import hashlib
import inspect
import json
import math
import os
import random
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Callable, Literal, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from flags import atomic_output, parse_flags, remove_stale_temporaries, same_file
from model import (GPT, PrefixCache, fast_dtype, load_checkpoint, lost_peer, pick_device, read_checkpoint,
                   save_checkpoint)
from tokenize_data import END, ROLES, chat_token_ids, render_conversation, tokenizer_from_dict


@dataclass
class AlignConfig:
    method: Literal["sft", "dpo", "grpo"] = "sft"  # sft: learn answers; dpo: prefer chosen; grpo: RL on exact answers
    init: str = ""                 # checkpoint to start from (and DPO's and GRPO's KL reference): out/sft/ckpt.pt, an HF folder
    data: str = ""                 # JSONL training data (conventions above)
    val_data: str = ""             # held-out JSONL; empty: hold out --eval-fraction of --data's groups
    out_dir: str = ""              # where ckpt.pt and log.jsonl are written
    eval_fraction: float = 0.1     # share of groups held out when there is no --val-data
    eval_max: int = 200            # held-out examples scored per eval (keeps evals cheap)
    eval_interval: int = 0         # evaluate and checkpoint every this many steps; 0: only at the start and the end
    log_interval: int = 10         # print every this many steps (and the last); evals always print; log.jsonl has all
    max_steps: int = -1            # steps; -1: 300 sft, 100 dpo, 40 grpo; 0: only evaluate --init
    batch_size: int = 0            # examples (DPO: pairs, GRPO: prompts) per step per rank; 0: 16 sft, 8 dpo, 64 grpo
    lr: float = 0.0                # peak learning rate; 0: 1e-3 for sft, 3e-4 for dpo, 3e-4 for grpo
    min_lr_ratio: float = 0.1      # the schedule ends at lr * min_lr_ratio
    schedule: Literal["cosine", "linear"] = "cosine"  # how the learning rate decays after warmup
    warmup_steps: int = 5          # steps of linear warmup up to --lr
    weight_decay: float = 0.0      # AdamW weight decay on matrices (none on norms and biases)
    grad_clip: float = 1.0         # clip the gradient norm to this; 0 disables clipping
    beta: float = -1.0             # DPO: pull towards the reference (-1: 0.1); GRPO: KL penalty to --init (-1: 0, none)
    group_size: int = 16           # GRPO: answers sampled per prompt (G); advantages are relative to the group
    max_new_tokens: int = 16       # GRPO: an answer ends at <|end|> or after this many tokens (then it earns nothing)
    temperature: float = 0.5       # GRPO: sampling temperature of the answers (and of the held-out pass@k); see below
    num_iterations: int = 2        # GRPO: optimizer updates on each step's samples; after the first, PPO's clipped ratio
    clip_low: float = 0.2          # GRPO, --num-iterations > 1: a token's ratio pi/pi_sampler is clipped at 1 - this ...
    clip_high: float = 0.28        # ... and at 1 + this (DAPO's clip-higher: a rare right answer has room to rise)
    eval_samples: int = 4          # GRPO: answers sampled per held-out question for val_pass@1 and val_pass@k
    seed: int = 1337               # batches, held-out sample, DPO's visited pairs, GRPO's samples follow from it
    device: str = "auto"           # auto (cuda when a GPU is visible, else cpu) | cpu | cuda | cuda:N
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # autocast; auto: model.py's fast_dtype (bf16 where native)
    resume: bool = False           # continue from OUT/ckpt.pt when it exists (same method)


def check_config(cfg):
    """Refuse bad flags with one sentence each; fill in the method's defaults (-1 or 0) -> cfg."""
    for flag, value in (("--init", cfg.init), ("--data", cfg.data), ("--out-dir", cfg.out_dir)):
        if not value:
            raise SystemExit(f"{flag} is required (see `python align.py --help`).")
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        raise SystemExit(f"--out-dir {cfg.out_dir} is a file; pass a folder for ckpt.pt and log.jsonl.")
    for flag, path in (("--init", cfg.init), ("--data", cfg.data), ("--val-data", cfg.val_data)):
        for name in ("ckpt.pt", "log.jsonl"):  # an input is never overwritten, however it is spelled
            if path and same_file(path, os.path.join(cfg.out_dir, name)):
                raise SystemExit(f"{flag} {path} is the {name} that --out-dir {cfg.out_dir} would overwrite; "
                                 "pass another --out-dir.")
    if not 0 <= cfg.eval_fraction < 1:
        raise SystemExit(f"--eval-fraction {cfg.eval_fraction}: must be in [0, 1).")
    if not 0 <= cfg.min_lr_ratio <= 1:
        raise SystemExit(f"--min-lr-ratio {cfg.min_lr_ratio}: must be in [0, 1].")
    for flag in ("eval_max", "log_interval"):
        if getattr(cfg, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} {getattr(cfg, flag)}: must be at least 1.")
    if cfg.method == "grpo" and (cfg.group_size < 2 or cfg.max_new_tokens < 1 or cfg.temperature <= 0):
        raise SystemExit("--group-size must be at least 2 (advantages are relative to the group), --max-new-tokens "
                         "at least 1 and --temperature positive (equal samples teach nothing).")
    if not (cfg.num_iterations >= 1 and cfg.eval_samples >= 1 and 0 <= cfg.clip_low < 1 and cfg.clip_high >= 0):
        raise SystemExit(f"--num-iterations {cfg.num_iterations} and --eval-samples {cfg.eval_samples} must be at "
                         f"least 1, --clip-low {cfg.clip_low} in [0, 1) and --clip-high {cfg.clip_high} not negative.")
    for flag in ("batch_size", "lr", "eval_interval", "warmup_steps", "weight_decay", "grad_clip"):
        if getattr(cfg, flag) < 0:
            raise SystemExit(f"--{flag.replace('_', '-')} {getattr(cfg, flag)}: must not be negative.")
    # Defaults (-1 / 0), measured on the demo data with the pipeline's CPU model.
    defaults = {"sft": (300, 16, 1e-3, 0.1), "dpo": (100, 8, 3e-4, 0.1), "grpo": (40, 64, 3e-4, 0.0)}[cfg.method]
    if cfg.max_steps < -1 or (cfg.beta < 0 and cfg.beta != -1):
        raise SystemExit("--max-steps and --beta take -1 (the method's default) or a value >= 0.")
    cfg.max_steps = defaults[0] if cfg.max_steps == -1 else cfg.max_steps
    cfg.batch_size, cfg.lr = cfg.batch_size or defaults[1], cfg.lr or defaults[2]
    cfg.beta = defaults[3] if cfg.beta == -1 else cfg.beta
    if cfg.method == "dpo" and cfg.beta == 0:
        raise SystemExit("--beta 0: DPO needs a positive beta (its loss is flat without one).")
    return cfg


# ===================================================================================================
# Part 1: what the three methods share: records, tokens, batches, evaluation, checkpoints, the loop.
# ===================================================================================================

# ---------------------------------------------------------------------------------------------------
# Where this process runs, what it starts from, and what a method brings to the loop

@dataclass
class Run:
    """What every piece of the loop shares: the flags, this process's place, its files and the log so far."""
    cfg: AlignConfig
    device: str
    distributed: bool              # launched by torchrun: data parallel over all ranks
    rank: int                      # this process among `world` ranks (0 of 1 without torchrun)
    world: int
    ctx: object                    # bfloat16 autocast, or nothing
    ckpt_path: str
    log_path: str
    rows: list = field(default_factory=list)  # the log so far: the checkpoint carries it

    def say(self, text):
        """Print once (on rank 0)."""
        if self.rank == 0:
            print(text)


def start_run(cfg):
    """Pick the device, join the torchrun ranks (data parallel) when launched by torchrun, seed -> Run."""
    device = pick_device(cfg.device)
    distributed = "RANK" in os.environ
    if distributed:
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    bf16 = fast_dtype(device.split(":")[0], cfg.dtype) == "bfloat16"
    # Weights and optimizer stay float32; autocast runs the matmuls in bf16 (log-probs are summed in fp32).
    ctx = torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if bf16 else nullcontext()
    torch.manual_seed(cfg.seed + rank)
    return Run(cfg, device, distributed, rank, world, ctx, os.path.join(cfg.out_dir, "ckpt.pt"),
               os.path.join(cfg.out_dir, "log.jsonl"))


class Init(NamedTuple):
    """The --init checkpoint, its tokenizer, the model built from it, and the id of <|end|>."""
    ckpt: dict
    enc: object
    model: GPT
    end_id: int


def load_init(cfg, device):
    """-> Init. The init checkpoint carries the tokenizer; the chat tokens must be in it."""
    init = read_checkpoint(cfg.init, "--init")
    if not init.get("tokenizer"):
        raise SystemExit(f"--init {cfg.init}: the checkpoint carries no tokenizer; pretrain with train.py on a "
                         "data dir from tokenize_data.py so that it does.")
    enc = tokenizer_from_dict(init["tokenizer"])
    model = GPT.from_checkpoint(init, device)
    return Init(init, enc, model, chat_token_ids(enc, model.config.vocab_size, f"--init {cfg.init}")[END])


class Method(NamedTuple):
    """One method's part of the shared loop (built by sft_method, dpo_method, grpo_method)."""
    train: list                    # the examples the steps draw from
    val: list                      # the held-out examples (none: no evaluation)
    step_loss: Callable            # (net, idx, step, update) -> (loss, {figure: sum over this rank's examples idx})
    evaluate: Callable             # (rows: the log so far) -> {held-out figure: value}
    init_is_reference: bool        # the --init weights stay part of the run (--resume checks them)
    updates: int = 1               # optimizer updates on each step's batch (GRPO's --num-iterations)


# ---------------------------------------------------------------------------------------------------
# Reading JSONL: every record becomes messages; bad lines are reported by number and skipped.

def as_messages(value, role):
    """A string (one message of `role`) or a list of {"role", "content"} -> list of messages, or None."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) and m.get("role") in ROLES
                                                  and isinstance(m.get("content"), str) for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    return None


def held_out(key, fraction):
    """Deterministic split: the same group lands on the same side in every run and every file."""
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16) / 2**32 < fraction


def read_records(path, method, flag, digest=None):
    """-> [(record, group)]; prints the skipped lines (numbered); exits when nothing is usable.
    The method's reader (sft_record, dpo_record, grpo_record) turns a line's object into a record.
    digest (a hashlib object), when given, takes the file's bytes as they are read: its fingerprint."""
    if not os.path.isfile(path):
        what = "a folder" if os.path.isdir(path) else "no such file"
        raise SystemExit(f"{flag} {path}: {what}; pass a JSONL file (see align.py's docstring).")
    parse = {"sft": sft_record, "dpo": dpo_record, "grpo": grpo_record}[method]
    records, bad, n_lines = [], [], 0
    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is one bad line, not the end of the file
        for line_no, raw in enumerate(f, 1):
            if digest is not None:
                digest.update(raw)
            if not raw.strip():
                continue
            n_lines += 1
            try:
                line = raw.decode("utf-8")
                obj = json.loads(line)
            except UnicodeDecodeError:
                bad.append(f"line {line_no}: not UTF-8 text")
                continue
            except json.JSONDecodeError:
                bad.append(f"line {line_no}: not valid JSON")
                continue
            record, why = parse(obj) if isinstance(obj, dict) else (None, "not a JSON object")
            if why:
                bad.append(f"line {line_no}: {why}")
                continue
            group = obj.get("group")
            records.append((record, str(group) if group is not None else line.strip()))
    if bad:
        print(f"{path}: skipped {len(bad)} of {n_lines} lines ({'; '.join(bad[:5])}{'; ...' if len(bad) > 5 else ''})")
    if not records:
        want = {"dpo": '{"prompt", "chosen", "rejected"}', "grpo": '{"prompt", "answer"} or {"messages", "answer"}',
                "sft": '{"messages": [...]} or {"prompt", "response"}'}[method]
        raise SystemExit(f"{flag} {path}: no usable {method.upper()} examples; each line needs {want}.")
    return records


def read_split(cfg):
    """-> (train, held-out) [(record, group)], and {"data", "val_data": sha256 of the file's bytes} (what
    the checkpoint records it was made from, taken as the files are read): --val-data, or the groups of
    --data in --eval-fraction; the held-out ones in a fixed shuffle, capped at --eval-max (so not just the
    first lines are scored)."""
    digests = {"data": hashlib.sha256(), "val_data": hashlib.sha256()}  # no --val-data: the hash of no bytes
    records = read_records(cfg.data, cfg.method, "--data", digests["data"])
    if cfg.val_data:
        train_records = records
        val_records = read_records(cfg.val_data, cfg.method, "--val-data", digests["val_data"])
    else:
        train_records = [r for r in records if not held_out(r[1], cfg.eval_fraction)]
        val_records = [r for r in records if held_out(r[1], cfg.eval_fraction)]
        if not train_records:
            raise SystemExit(f"--eval-fraction {cfg.eval_fraction} held out every group of {cfg.data}; lower it.")
    random.Random(cfg.seed).shuffle(val_records)
    return train_records, val_records[:cfg.eval_max], {k: d.hexdigest() for k, d in digests.items()}


# ---------------------------------------------------------------------------------------------------
# The chat template (tokenize_data.render_conversation) -> token ids and which of them the loss sees.

def fit_and_shift(ids, supervised, block_size):
    """-> (inputs, targets, how) with len <= block_size; targets[t] = ids[t+1] if supervised else -1.

    Too long: the oldest tokens after the leading <|endoftext|> go, as long as none of them is
    supervised and the <|assistant|> before the first supervised token stays; else how = "drop"."""
    how, excess = "fit", len(ids) - (block_size + 1)
    if excess > 0:
        first = supervised.index(True)
        if 1 + excess > first - 1:
            return None, None, "drop"
        ids, supervised, how = ids[:1] + ids[1 + excess:], supervised[:1] + supervised[1 + excess:], "cut"
    targets = [tok if sup else -1 for tok, sup in zip(ids[1:], supervised[1:])]
    return ids[:-1], targets, how


def tokenize_records(records, enc, block_size, where):
    """[(record, group)] -> examples: {"seqs": [(inputs, targets)] (SFT one, DPO chosen and rejected),
    "group"; with options also "choices": [(inputs, targets)] per option and "answer", "task"}."""
    examples, n_cut, n_drop = [], 0, 0
    for record, group in records:
        seqs, hows = [], []
        for answer in record["answers"]:
            ids, sup = render_conversation(enc, record["context"] + answer, len(record["context"]))
            inputs, targets, how = fit_and_shift(ids, sup, block_size)
            seqs.append((inputs, targets))
            hows.append(how)
        example = {"seqs": seqs, "group": group, "task": record.get("task")}
        if "options" in record:  # each option scored as the answer to the same conversation
            context = record["answers"][0][:-1]
            choices = [fit_and_shift(*render_conversation(enc, context + [{"role": "assistant", "content": o}],
                                                          len(context)), block_size) for o in record["options"]]
            hows += [c[2] for c in choices]
            answer = record["options"].index(record["answers"][0][-1]["content"])
            inputs, targets = choices[answer][:2]
            start = next(t for t, y in enumerate(targets) if y >= 0)  # inputs[start] is <|assistant|>
            example.update(choices=[c[:2] for c in choices], task=record["task"], answer=answer,
                           prompt=inputs[:start + 1], reply=[y for y in targets if y >= 0])
        if "drop" in hows:
            n_drop += 1
            continue
        n_cut += "cut" in hows
        examples.append(example)
    if n_cut or n_drop:
        print(f"{where}: {n_cut} examples longer than block_size={block_size} lost their oldest context tokens; "
              f"{n_drop} dropped because their answer alone does not fit (shorten them)")
    if not examples:
        raise SystemExit(f"{where}: no example fits in block_size={block_size} tokens; shorten the data.")
    return examples


# ---------------------------------------------------------------------------------------------------
# Batches and log-probs; data parallel: every rank takes a strided share, sums are added across ranks.

def batch_indices(step, n, batch_size, rank, world, seed):
    """This rank's examples for a step: a fresh permutation of all n each epoch, so any step (and a
    resumed run) finds its batch from (seed, step) alone."""
    per_step = batch_size * world
    out = []
    for i in range(step * per_step + rank, (step + 1) * per_step, world):
        epoch, pos = divmod(i, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        out.append(int(perm[pos]))
    return out


def pad_batch(seqs, device):
    """[(inputs, targets)] -> x, y (B, T_max): inputs padded with 0, targets with -1 (ignored)."""
    T = max(len(inputs) for inputs, _ in seqs)
    x = torch.tensor([inputs + [0] * (T - len(inputs)) for inputs, _ in seqs], dtype=torch.long)
    y = torch.tensor([targets + [-1] * (T - len(targets)) for _, targets in seqs], dtype=torch.long)
    return x.to(device), y.to(device)


def token_logprobs(model, x, y):
    """log p(target) at every position (B, T); 0 where the target is -1 (prompt, padding). The head runs
    only where a target is (targets_only): the answers are a few tokens of each sequence."""
    logits, _ = model(x, y, targets_only=True)                           # (n, vocab), n = (y >= 0).sum()
    supervised = y >= 0
    logp = torch.zeros(y.shape, device=logits.device, dtype=torch.float32)
    return logp.masked_scatter(supervised, -F.cross_entropy(logits.float(), y[supervised], reduction="none"))


def sequence_logprobs(model, x, y):
    """Sum over supervised positions of log p(target): (B,). Padding and prompt (-1) add nothing."""
    return token_logprobs(model, x, y).sum(dim=1)


@torch.no_grad()
def logprobs_of(model, seqs, run, batch_size):
    """Summed log-probs of every sequence (N,), each rank computing a strided share."""
    out = torch.zeros(len(seqs), device=run.device)
    mine = list(range(run.rank, len(seqs), run.world))
    for k in range(0, len(mine), batch_size):
        chunk = mine[k:k + batch_size]
        with run.ctx:
            out[chunk] = sequence_logprobs(model, *pad_batch([seqs[i] for i in chunk], run.device)).float()
    if run.world > 1:
        dist.all_reduce(out)
    return out


def all_reduce_sums(sums, world):
    """{name: scalar tensor} summed over ranks -> {name: float}."""
    names = sorted(sums)
    stacked = torch.stack([sums[k].detach().float() for k in names])
    if world > 1:
        dist.all_reduce(stacked)
    return dict(zip(names, stacked.tolist()))


# ---------------------------------------------------------------------------------------------------
# Evaluation plumbing and the log

@contextmanager
def eval_mode(model):
    """model.eval() inside, its former mode after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def evaluate_and_log(run, method, step):
    """The method's held-out figures: printed, checked finite, logged (text values are logged only)."""
    if method.val:
        metrics = method.evaluate(run.rows)
        numbers = {k: v for k, v in metrics.items() if not isinstance(v, str)}
        run.say(f"eval step {step}: " + " | ".join(f"{k} {v:.4g}" for k, v in numbers.items()))
        check_finite(numbers, step, run.ckpt_path)
        log_row(run, {"step": step, **metrics})


def check_finite(figures, step, ckpt_path):
    """Stop on nan/inf before anything is saved, so the checkpoint on disk is the last good one."""
    for name, value in figures.items():
        if not math.isfinite(value):
            kept = f"{ckpt_path} is kept" if os.path.isfile(ckpt_path) else "no checkpoint was written"
            raise SystemExit(f"{name} became {value} at step {step}; stopping ({kept}). Lower --lr.")


def log_row(run, entry):
    """The row joins the log in memory (the checkpoint's copy) and, on rank 0, log.jsonl."""
    run.rows.append(entry)
    if run.rank == 0:
        with open(run.log_path, "a") as f:
            f.write(json.dumps(entry) + "\n")


def write_log(path, rows):
    """log.jsonl := rows, by flags.py's rule for outputs (temporary name, rename)."""
    with atomic_output(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


# ---------------------------------------------------------------------------------------------------
# Checkpoints: what a run is made from, resuming, saving

def fingerprint(tensors):
    """sha256 of {name: tensor}'s values: the --init weights a run was made from, so --resume can tell the
    same weights from others (read_split takes the data files' sha256 as it reads them)."""
    h = hashlib.sha256()
    for name, t in sorted(tensors.items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def check_resume(run, init, made):
    """--resume: read OUT/ckpt.pt and refuse it (one sentence) when it is another method's, another
    shape's or other inputs', before the method's setup (DPO scores every pair with the reference first)
    -> its state, or None to start at step 0. A checkpoint that recorded its --init weights (its
    reference) was made from them: made gets their fingerprint, so that a resume needs the same ones."""
    cfg, ckpt_path = run.cfg, run.ckpt_path
    if not (cfg.resume and os.path.isfile(ckpt_path)):
        return None
    state = load_checkpoint(ckpt_path)
    if state.get("stage") != cfg.method or state["model_config"] != init.ckpt["model_config"]:
        raise SystemExit(f"--resume: {ckpt_path} (a {state.get('stage')} checkpoint) is not a {cfg.method} run "
                         "from a model shaped as --init; pick another --out-dir or drop --resume.")
    if "made_from" not in state:
        raise SystemExit(f"--resume: {ckpt_path} was written by an older version of align.py (it does not record "
                         "its data); drop --resume to start again, or pick another --out-dir.")
    if "init" in state["made_from"]:
        made["init"] = fingerprint(init.ckpt["model"])
    refuse_other_inputs(cfg, ckpt_path, state, made)
    return state


def refuse_other_inputs(cfg, ckpt_path, state, made):
    """One sentence naming the inputs whose fingerprint in made differs from the checkpoint's record."""
    changed = [k for k in made if state["made_from"].get(k) != made[k]]
    if changed:
        now, then = (" and ".join(f"--{k.replace('_', '-')} {c[k] or '(none)'}" for k in changed)
                     for c in (asdict(cfg), state["train_config"]))
        raise SystemExit(f"--resume: {ckpt_path} was made from {then} as it was then, not from {now} as it is "
                         "now; pass the inputs it was made from, or drop --resume to start again.")


def resume_or_start(run, state, made, model, optimizer):
    """state (check_resume's): load it and its log -> its step; None: step 0. Rank 0 then rewrites
    log.jsonl from the log kept so far, so it is always one run's."""
    cfg, ckpt_path, start_step = run.cfg, run.ckpt_path, 0
    if state is not None:
        refuse_other_inputs(cfg, ckpt_path, state, made)  # made may now hold the --init the method keeps
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_step, run.rows = state["step"], state.get("log", [])
        run.say(f"resumed from {ckpt_path} at step {start_step}")
    elif os.path.isfile(ckpt_path):
        run.say(f"note: {ckpt_path} exists and will be replaced at the first checkpoint (log.jsonl starts over "
                "now); pass --resume to continue from it instead.")
    if run.rank == 0:
        os.makedirs(cfg.out_dir, exist_ok=True)
        remove_stale_temporaries(ckpt_path)
        remove_stale_temporaries(run.log_path)
        write_log(run.log_path, run.rows)
    return start_step


def write_checkpoint(run, init, made, model, optimizer, step):
    """OUT/ckpt.pt at `step` (rank 0), after checking that no weight became nan/inf."""
    cfg = run.cfg
    check_finite({"the largest weight": max(p.detach().abs().max().item() for p in model.parameters())},
                 step, run.ckpt_path)
    if run.rank == 0:
        save_checkpoint(run.ckpt_path, model, tokenizer=init.ckpt["tokenizer"], stage=cfg.method,
                        train_config=asdict(cfg), step=step, optimizer=optimizer.state_dict(),
                        data_position=step * cfg.batch_size * run.world, init=cfg.init, log=run.rows,
                        made_from=made)


# ---------------------------------------------------------------------------------------------------
# The loop: a method brings its examples, its step's loss and its evaluation; the rest is shared.

def learning_rate(step, cfg):
    """Linear warmup to cfg.lr, then cosine or linear decay to cfg.lr * min_lr_ratio at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay)


def train_step(run, method, model, net, optimizer, step):
    """method.updates optimizer steps (one but for GRPO's --num-iterations) on this rank's share of the
    step's batch -> its log row: the first update's figures, and those only later updates report."""
    cfg, t0, row = run.cfg, time.time(), {}
    lr = learning_rate(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    idx = batch_indices(step, len(method.train), cfg.batch_size, run.rank, run.world, cfg.seed)
    for update in range(method.updates):
        with run.ctx:
            loss, sums = method.step_loss(net, idx, step, update)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
        stats = {k: v / (len(idx) * run.world) for k, v in all_reduce_sums(sums, run.world).items()}
        check_finite({"the loss": stats["loss"], "the gradient norm": float(grad_norm)}, step + 1, run.ckpt_path)
        if float(grad_norm) > 0:  # no gradient (GRPO: every group scored alike): Adam's momentum alone must not
            optimizer.step()      # move the weights, as it would for ~10 steps, again and again when signal is sparse
        optimizer.zero_grad(set_to_none=True)
        row = {**stats, "grad_norm": float(grad_norm), **row}  # the first update's figures win
    return {"step": step + 1, **row, "lr": lr, "dt_ms": 1000 * (time.time() - t0)}


def train_loop(run, method, model, net, optimizer, start_step, save_at):
    """Evaluate at step 0, then step; evaluate and save_at(step) every --eval-interval steps and after the last."""
    cfg = run.cfg
    if start_step == 0:
        evaluate_and_log(run, method, 0)
    for step in range(start_step, cfg.max_steps):
        entry = train_step(run, method, model, net, optimizer, step)
        if (step + 1) % cfg.log_interval == 0 or step + 1 == cfg.max_steps:
            run.say(f"step {step + 1}/{cfg.max_steps} | "
                    + " | ".join(f"{k} {v:.4g}" for k, v in entry.items() if k != "step"))
        log_row(run, entry)
        if step + 1 == cfg.max_steps or (cfg.eval_interval and (step + 1) % cfg.eval_interval == 0):
            evaluate_and_log(run, method, step + 1)
            save_at(step + 1)


# ===================================================================================================
# Part 2: SFT: learn the assistant's answers (cross-entropy on them and their <|end|>).
# ===================================================================================================

def sft_record(obj):
    """-> (record, None) or (None, why): record = {"context": [], "answers": [messages]}, every assistant
    turn supervised; with "options" holding the last answer, also "options" and "task" (scored)."""
    if "messages" in obj:
        messages = as_messages(obj["messages"], "user")
        if messages is None or isinstance(obj["messages"], str):
            return None, "'messages' must be a list of {'role': system|user|assistant, 'content': string}"
    elif "prompt" in obj and "response" in obj:
        messages = as_messages(obj["prompt"], "user")
        if messages is None or not isinstance(obj["response"], str):
            return None, "'prompt' and 'response' must be strings"
        messages = messages + [{"role": "assistant", "content": obj["response"]}]
    else:
        return None, "needs 'messages', or 'prompt' and 'response'"
    assistant = [m for m in messages if m["role"] == "assistant"]
    if not assistant or not all(m["content"].strip() for m in assistant):
        return None, "no assistant message" if not assistant else "empty response"
    record = {"context": [], "answers": [messages]}
    options = obj.get("options")
    if (isinstance(options, list) and all(isinstance(o, str) for o in options) and len(set(options)) >= 2
            and messages[-1]["role"] == "assistant" and messages[-1]["content"] in options):
        record.update(options=options, task=str(obj.get("task", "answer")))
    return record, None


def sft_step_loss(net, train, idx, device):
    """Mean cross-entropy per supervised token of examples idx, and its sum over them for the log."""
    _, loss = net(*pad_batch([train[i]["seqs"][0] for i in idx], device), targets_only=True)
    return loss, {"loss": loss.detach() * len(idx)}


@torch.no_grad()
def evaluate_sft(model, cfg, val, run):
    """val_loss (per supervised token); where options exist, val_answer_accuracy (overall and per task)
    and val_answer_exact."""
    with eval_mode(model):
        seqs = [ex["seqs"][0] for ex in val]
        logp = logprobs_of(model, seqs, run, 2 * cfg.batch_size)
        n_tokens = sum(sum(t >= 0 for t in targets) for _, targets in seqs)
        metrics = {"val_loss": -logp.sum().item() / n_tokens}
        checkable = [ex for ex in val if "choices" in ex]
        if checkable:
            metrics.update(answer_accuracy(model, cfg, checkable, run))
            metrics["val_answer_exact"] = answer_exact(model, checkable, run)
    return metrics


def answer_accuracy(model, cfg, checkable, run):
    """The option whose summed log-prob (as the answer, with <|end|>) is highest is the model's pick."""
    choices = [c for ex in checkable for c in ex["choices"]]
    scores = logprobs_of(model, choices, run, 2 * cfg.batch_size).tolist()
    right, k = {}, 0
    for ex in checkable:
        n = len(ex["choices"])
        best = max(range(n), key=lambda j: scores[k + j])
        right.setdefault(ex["task"], []).append(best == ex["answer"])
        k += n
    every = [r for rs in right.values() for r in rs]
    metrics = {"val_answer_accuracy": sum(every) / len(every)}
    for task, rs in sorted(right.items()):
        metrics[f"val_answer_accuracy_{task}"] = sum(rs) / len(rs)
    return metrics


def answer_exact(model, checkable, run):
    """Share of examples where greedy decoding writes the true answer's tokens and then <|end|>, nothing else.
    Prompts of one length decode together (the model has no padding mask), as many tokens as the longest
    reply among them; greedy is decided token by token, so each is judged on its own reply's length."""
    exact, by_length = torch.zeros(len(checkable), device=run.device), {}
    for i in range(run.rank, len(checkable), run.world):
        by_length.setdefault(len(checkable[i]["prompt"]), []).append(i)
    for length, which in by_length.items():
        prompts = torch.tensor([checkable[i]["prompt"] for i in which], device=run.device)   # (n, length)
        with run.ctx:
            out = model.generate(prompts, max(len(checkable[i]["reply"]) for i in which), temperature=0)
        for row, i in enumerate(which):
            reply = checkable[i]["reply"]
            exact[i] = float(out[row, length:length + len(reply)].tolist() == reply)
    if run.world > 1:
        dist.all_reduce(exact)
    return exact.mean().item()


def sft_method(cfg, run, init, train_records, val_records):
    """The conversations as token ids and loss masks -> SFT's Method."""
    block_size = init.model.config.block_size
    train = tokenize_records(train_records, init.enc, block_size, cfg.data)
    val = tokenize_records(val_records, init.enc, block_size, "held-out") if val_records else []
    return Method(train, val, lambda net, idx, step, update: sft_step_loss(net, train, idx, run.device),
                  lambda rows: evaluate_sft(init.model, cfg, val, run), init_is_reference=False)


# ===================================================================================================
# Part 3: DPO: prefer the chosen answer to the rejected one, measured against the frozen --init model.
# ===================================================================================================

def dpo_record(obj):
    """-> (record, None) or (None, why): record = {"context": prompt, "answers": [chosen, rejected], "task"}."""
    for key in ("prompt", "chosen", "rejected"):
        if key not in obj:
            return None, f"no '{key}' field"
    prompt, chosen, rejected = (as_messages(obj["prompt"], "user"), as_messages(obj["chosen"], "assistant"),
                                as_messages(obj["rejected"], "assistant"))
    if prompt is None or chosen is None or rejected is None:
        return None, "'prompt', 'chosen' and 'rejected' must be strings or lists of messages"
    for answer in (chosen, rejected):
        if not any(m["role"] == "assistant" and m["content"].strip() for m in answer):
            return None, "empty response"
    if chosen == rejected:
        return None, "chosen equals rejected"
    return {"context": prompt, "answers": [chosen, rejected], "task": str(obj.get("task", "pair"))}, None


def dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta):
    """Sigmoid DPO loss per pair and the implicit rewards beta * log(pi / ref) of both answers."""
    chosen_reward = beta * (pi_chosen - ref_chosen)
    rejected_reward = beta * (pi_rejected - ref_rejected)
    return -F.logsigmoid(chosen_reward - rejected_reward), chosen_reward, rejected_reward


def preference_stats(losses, chosen_reward, rejected_reward):
    """Sums (not means) so ranks can add them: loss, rewards, accuracy (a tie counts half), margin."""
    wins = (chosen_reward > rejected_reward).float() + 0.5 * (chosen_reward == rejected_reward).float()
    return {"loss": losses.sum(), "chosen_reward": chosen_reward.sum(), "rejected_reward": rejected_reward.sum(),
            "accuracy": wins.sum(), "margin": (chosen_reward - rejected_reward).sum()}


def dpo_step_loss(net, cfg, train, ref_train, idx, device):
    """Mean DPO loss of pairs idx against their reference log-probs, and sums of its figures for the log."""
    x, y = pad_batch([s for i in idx for s in train[i]["seqs"]], device)  # chosen, rejected: rows 2k, 2k+1
    logp = sequence_logprobs(net, x, y).view(-1, 2)
    losses, cr, rr = dpo_loss(logp[:, 0], logp[:, 1], ref_train[idx, 0], ref_train[idx, 1], cfg.beta)
    return losses.mean(), preference_stats(losses.detach(), cr.detach(), rr.detach())


@torch.no_grad()
def evaluate_dpo(model, cfg, val, ref_val, run):
    """val_loss, val_accuracy (overall and per task), val_margin, the rewards, val_logp_accuracy (no reference)."""
    with eval_mode(model):
        seqs = [s for ex in val for s in ex["seqs"]]                     # chosen, rejected, chosen, ...
        logp = logprobs_of(model, seqs, run, 2 * cfg.batch_size).view(-1, 2)
        losses, cr, rr = dpo_loss(logp[:, 0], logp[:, 1], ref_val[:, 0], ref_val[:, 1], cfg.beta)
        sums = preference_stats(losses, cr, rr)  # every rank holds all of logp: no reduce needed
        metrics = {f"val_{k}": v.item() / len(val) for k, v in sums.items()}
        metrics["val_logp_accuracy"] = (logp[:, 0] > logp[:, 1]).float().mean().item()
        wins = (cr > rr).float() + 0.5 * (cr == rr).float()
        for task in sorted({ex["task"] for ex in val} - {"pair"}):  # per kind of pair, when the data says
            mine = torch.tensor([ex["task"] == task for ex in val], device=wins.device)
            metrics[f"val_accuracy_{task}"] = wins[mine].mean().item()
    return metrics


def dpo_method(cfg, run, init, train_records, val_records):
    """Tokenize the pairs, keep those the run will visit, score them and the held-out ones with the
    reference (the init model, before any step) once: then only the policy remains."""
    block_size, model = init.model.config.block_size, init.model
    train = tokenize_records(train_records, init.enc, block_size, cfg.data)
    val = tokenize_records(val_records, init.enc, block_size, "held-out") if val_records else []
    n_visited = min(len(train), cfg.max_steps * cfg.batch_size * run.world)  # a fixed sample
    keep = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed))[:n_visited]
    train = [train[i] for i in sorted(keep.tolist())]
    t0, ref_val = time.time(), None
    with eval_mode(model):
        ref_train = logprobs_of(model, [s for ex in train for s in ex["seqs"]], run, 2 * cfg.batch_size).view(-1, 2)
        if val:
            ref_val = logprobs_of(model, [s for ex in val for s in ex["seqs"]], run, 2 * cfg.batch_size).view(-1, 2)
    run.say(f"reference log-probs of {len(train) + len(val)} pairs in {time.time() - t0:.1f}s")
    return Method(train, val, lambda net, idx, step, update: dpo_step_loss(net, cfg, train, ref_train, idx, run.device),
                  lambda rows: evaluate_dpo(model, cfg, val, ref_val, run), init_is_reference=True)


# ===================================================================================================
# Part 4: GRPO: sample G answers per prompt, score each with the reward, move towards those that beat
# their group.
# ===================================================================================================

def grpo_record(obj):
    """-> (record, None) or (None, why): record = {"context": prompt, "answer": what the reward needs, "task"}."""
    if not isinstance(obj.get("answer"), str) or not obj["answer"].strip():
        return None, "no 'answer' string"
    key = "messages" if "messages" in obj else "prompt" if "prompt" in obj else None
    prompt = as_messages(obj[key], "user") if key else None
    if prompt is None or (key == "messages" and isinstance(obj[key], str)):
        return None, "needs 'prompt' (a string or a list of messages) or 'messages' (a list of messages)"
    if prompt[-1]["role"] == "assistant":
        return None, "the prompt ends with an assistant message; end it with the user's question"
    return {"context": prompt, "answer": obj["answer"], "task": str(obj.get("task", "answer"))}, None


def tokenize_questions(records, enc, block_size, max_new_tokens, where):
    """[(record, group)] -> GRPO examples {"prompt": ids ending in <|assistant|>, "answer", "group", "task"};
    a prompt that leaves no room for max_new_tokens of answer in the block is dropped and counted."""
    examples = []
    for record, group in records:
        ids, _ = render_conversation(enc, record["context"], add_generation_prompt=True)
        if len(ids) + max_new_tokens <= block_size:
            examples.append({"prompt": ids, "answer": record["answer"], "group": group, "task": record["task"]})
    if len(examples) < len(records):
        print(f"{where}: {len(records) - len(examples)} prompts dropped: with --max-new-tokens {max_new_tokens} "
              f"they do not fit in block_size={block_size} (shorten them)")
    if not examples:
        raise SystemExit(f"{where}: no prompt leaves room for --max-new-tokens {max_new_tokens} in "
                         f"block_size={block_size} tokens; shorten the prompts or lower --max-new-tokens.")
    return examples


def reward(completion, answer, finished=True):
    """The reward, one place to edit: 1.0 when the answer ended by itself (<|end|>, not cut off at
    --max-new-tokens) and its text, stripped and whitespace-normalised, equals `answer` ignoring case."""
    normal = lambda text: " ".join(text.split()).lower()  # noqa: E731
    return float(finished and normal(completion) == normal(answer))


@torch.no_grad()
def rollout(model, prompts, n_samples, max_new_tokens, temperature, end_id, seeds=None):
    """prompts [[ids]] -> (completions, finished): n_samples answers per prompt, prompt i's at i*n .. i*n+n-1.
    An answer is its tokens up to and including <|end|>, or max_new_tokens of them (finished False). The
    model has no padding mask, so each generate call (KV cache) holds the prompts of one length, each run
    once and its cache copied for its n samples. With seeds (sampling), prompt i is drawn alone from a
    generator seeded seeds[i]: its answers do not depend on the other prompts of the batch, so a
    data-parallel run draws what one process would."""
    device = model.lm_head.weight.device
    completions, batches = [None] * (len(prompts) * n_samples), {}
    for i, ids in enumerate(prompts):
        batches.setdefault(len(ids) if seeds is None else i, []).append(i)
    for which in batches.values():
        length = len(prompts[which[0]])
        generator = None if seeds is None else torch.Generator(device).manual_seed(seeds[which[0]])
        rows = torch.tensor([prompts[i] for i in which], device=device)                      # (len(which), L)
        new = model.generate(rows, max_new_tokens, temperature, eos_token=end_id, generator=generator,
                             num_samples=n_samples)[:, length:]                            # (len(which)*n, new)
        for r, ids in enumerate(new.tolist()):
            cut = ids.index(end_id) + 1 if end_id in ids else len(ids)
            completions[which[r // n_samples] * n_samples + r % n_samples] = ids[:cut]
    return completions, [c[-1:] == [end_id] for c in completions]


def rewards_of(enc, completions, finished, answers):
    """The reward of each completion (its <|end|> not part of the text); answers[i] for completion i."""
    return [reward(enc.decode(c[:-1] if done else c), answer, done)
            for c, done, answer in zip(completions, finished, answers)]


def completion_logprobs(model, prompts, completions, temperature=1.0):
    """P prompts [ids] and their completions (prompt-major, G = len(completions) / P each) -> logp (P*G, T)
    of every completion token (its <|end|> too) under softmax(logits / temperature), and mask (P*G, T),
    False on padding. Each prompt runs once and its G completions attend to its keys and values
    (model.PrefixCache): L + G*T positions of work instead of G*(L+T), the numbers of G full copies."""
    device, G = next(model.parameters()).device, len(completions) // len(prompts)
    T = max(map(len, completions))
    y = torch.tensor([c + [-1] * (T - len(c)) for c in completions], device=device)      # (P*G, T) targets
    rows = []
    for i, prompt in enumerate(prompts):
        T_i = max(map(len, completions[i * G:(i + 1) * G]))  # this group's longest: less padding to run
        cache, targets = PrefixCache(), y[i * G:(i + 1) * G, :T_i]                          # (G, T_i)
        logits, _ = model(torch.tensor([prompt], device=device), kv_cache=cache, last_only=True)  # (1, 1, vocab)
        logits = logits.expand(G, 1, -1)                      # the prompt's last position predicts token 0
        if T_i > 1:  # token t is predicted at completion token t-1 (padding fed as 0: its outputs are masked)
            more, _ = model(targets[:, :-1].clamp(min=0), kv_cache=cache)              # (G, T_i-1, vocab)
            logits = torch.cat([logits, more], dim=1)                                 # (G, T_i, vocab)
        nll = F.cross_entropy(logits.flatten(0, 1).float() / temperature, targets.flatten(), ignore_index=-1,
                              reduction="none")
        rows.append(F.pad(-nll.view(G, T_i), (0, T - T_i)))
    return torch.cat(rows), y >= 0


def group_advantages(rewards):
    """rewards (P, G) -> advantages (P, G): each sample's reward minus its group's mean (the baseline), so a
    group whose samples all scored the same teaches nothing. Not divided by the group's std as GRPO's
    z-score does: that weights a question by how unanimous its group was, so one lucky hit on a question
    nearly always missed (or one slip on one nearly always right) counts ~2.5x a 4-of-8 split (Dr. GRPO)."""
    return rewards - rewards.mean(dim=1, keepdim=True)


def clipped_policy_loss(logp, old_logp, mask, advantages, clip_low=0.2, clip_high=0.28, ref_logp=None, beta=0.0,
                        n=None):
    """-(1/N) sum_i sum_t mask_it * (min(r_it A_i, clip(r_it, 1 - clip_low, 1 + clip_high) A_i) - beta kl_it).

    logp (M, T) the policy's log-probs of the sampled tokens now, old_logp (M, T) those of the policy that
    drew them, r_it = exp(logp_it - old_logp_it); mask (M, T) True on completion tokens only (the <|end|>
    too: stopping is an action; never prompt or padding); A_i (M,) the completion's advantage, shared by
    its tokens; N = n (the step's completions, when flat groups were left out of the M), else M. PPO's
    surrogate, token by token as in GRPO: at a step's first update r = 1 and the gradient is
    A_i grad logp_it, the plain policy gradient; later updates on the same samples (--num-iterations)
    stop pushing a token once its ratio has left the band in its advantage's direction. Summed over a
    completion's tokens, not averaged (1/|o_i| would go easy on long wrong answers: Dr. GRPO).
    kl_it = e^(ref-logp) - (ref-logp) - 1 >= 0 estimates KL(pi || ref) without bias (Schulman's k3); its
    gradient pulls logp towards ref_logp. -> (loss, how many of the masked tokens the clip stops)."""
    ratio = (logp - old_logp).exp()
    bounded = ratio.clamp(1 - clip_low, 1 + clip_high)
    per_token = torch.minimum(ratio * advantages[:, None], bounded * advantages[:, None])
    if beta:
        log_ratio = ref_logp - logp
        per_token = per_token - beta * (log_ratio.exp() - log_ratio - 1)
    clipped = ((bounded * advantages[:, None] < ratio * advantages[:, None]) & mask).sum()
    return -(per_token * mask).sum() / (n or logp.size(0)), clipped.detach()


class Samples(NamedTuple):
    """One step's samples on this rank, drawn at its first update and reused by the others."""
    prompts: list                  # the prompts whose group has signal (every prompt when --beta > 0)
    completions: list              # their G answers each, prompt-major
    advantages: torch.Tensor       # (len(completions),)
    ref_logp: object               # (len(completions), T) under the frozen --init model, or None
    n: int                         # completions drawn in all: the loss's N, so a left-out group still counts
    figures: dict                  # sums over the step's prompts for the log (reward, length, ...)


def draw_samples(model, cfg, train, idx, ref, enc, end_id, step, device):
    """Sample G answers to each of this rank's prompts idx and score them -> Samples. A group whose answers
    all scored alike has advantage 0 throughout: without a KL term it adds nothing to the gradient, so it
    is left out of the loss's forward and backward (it still counts in N: the same gradient, less work).
    The samples follow from (seed, step, prompt) alone: a resumed run, or another number of ranks, draws
    the same."""
    G, prompts = cfg.group_size, [train[i]["prompt"] for i in idx]
    seeds = [cfg.seed + 1_000_003 * (step + 1) + i for i in idx]
    completions, finished = rollout(model, prompts, G, cfg.max_new_tokens, cfg.temperature, end_id, seeds)
    rewards = torch.tensor(rewards_of(enc, completions, finished, [train[i]["answer"] for i in idx for _ in range(G)]),
                           device=device).view(len(idx), G)                                     # (P, G)
    flat = rewards.min(dim=1).values == rewards.max(dim=1).values                            # (P,)
    keep = [p for p in range(len(idx)) if ref is not None or not flat[p]] or [0]  # one at least: DDP's backward
    kept = [c for p in keep for c in completions[p * G:(p + 1) * G]]
    advantages = group_advantages(rewards)[keep].flatten()
    ref_logp = None
    if ref is not None:
        with torch.no_grad():
            ref_logp, _ = completion_logprobs(ref, [prompts[p] for p in keep], kept, cfg.temperature)
    lengths = torch.tensor([len(c) for c in completions], device=device, dtype=torch.float)
    figures = {"reward": rewards.sum() / G, "completion_len": lengths.sum() / G,
               "truncated": torch.tensor(finished).logical_not().sum() / G, "no_signal": flat.sum()}
    return Samples([prompts[p] for p in keep], kept, advantages, ref_logp, len(completions), figures)


def grpo_step_loss(net, cfg, samples, update, old_logp):
    """The clipped policy loss on the step's samples at this update; old_logp holds the sampler's log-probs,
    which are the policy's own at the first update (no second forward for them) -> (loss, sums for the log)."""
    logp, mask = completion_logprobs(net, samples.prompts, samples.completions, cfg.temperature)   # (M, T)
    loss, clipped = clipped_policy_loss(logp, old_logp[0] if update else logp.detach(), mask, samples.advantages,
                                        cfg.clip_low, cfg.clip_high, samples.ref_logp, cfg.beta, samples.n)
    P = samples.n // cfg.group_size  # the sums are over the step's prompts, as the loop expects
    if update:
        return loss, {"loss": loss.detach() * P, "clipped": clipped / cfg.group_size}  # per answer, as completion_len
    old_logp[:] = [logp.detach()]
    kl = torch.zeros((), device=logp.device)
    if samples.ref_logp is not None:  # KL(pi || init) per completion, summed over the group's prompts
        log_ratio = samples.ref_logp - logp.detach()
        kl = ((log_ratio.exp() - log_ratio - 1) * mask).sum() / cfg.group_size
    return loss, {"loss": loss.detach() * P, **samples.figures, "kl": kl}


@torch.no_grad()
def evaluate_grpo(model, cfg, val, enc, end_id, run, rows):
    """val_accuracy (the greedy answer earns the reward), overall and per task; val_pass@1 and val_pass@K
    from K = --eval-samples samples per question at --temperature (pass@K: any of them right); the change
    since step 0 (paired_change); val_right, the greedy verdict per question, which the next evals compare with."""
    n, mine = cfg.eval_samples, list(range(run.rank, len(val), run.world))
    prompts, answers = [val[i]["prompt"] for i in mine], [val[i]["answer"] for i in mine]
    right, hits = torch.zeros(len(val), device=run.device), torch.zeros(len(val), device=run.device)
    with run.ctx:
        if mine:
            greedy = rollout(model, prompts, 1, cfg.max_new_tokens, 0.0, end_id)
            right[mine] = torch.tensor(rewards_of(enc, *greedy, answers), device=run.device)
            seeds = [cfg.seed + i for i in mine]  # the same draws at every eval, whatever the number of ranks
            samples = rollout(model, prompts, n, cfg.max_new_tokens, cfg.temperature, end_id, seeds)
            per_sample = torch.tensor(rewards_of(enc, *samples, [a for a in answers for _ in range(n)]),
                                      device=run.device)
            hits[mine] = per_sample.view(len(mine), n).sum(dim=1)
        if run.world > 1:
            dist.all_reduce(right)
            dist.all_reduce(hits)
        metrics = {"val_accuracy": right.mean().item(), "val_pass@1": (hits / n).mean().item(),
                   f"val_pass@{n}": (hits > 0).float().mean().item()}
        for task in sorted({ex["task"] for ex in val}):
            of_task = torch.tensor([ex["task"] == task for ex in val], device=run.device)
            metrics[f"val_accuracy_{task}"] = right[of_task].mean().item()
    val_right = "".join("1" if r else "0" for r in right.tolist())
    first = next((r["val_right"] for r in rows if "val_right" in r), None)  # step 0's (a resume keeps it)
    if first is not None:
        metrics.update(paired_change(first, val_right))
    return {**metrics, "val_right": val_right}


def paired_change(before, after):
    """Greedy right ("1") or wrong ("0") per held-out question at step 0 and now -> questions gained and
    lost, and the change in accuracy in standard errors of the paired difference. The same questions are
    asked both times, so only those that flipped carry noise: this says whether RL beat its start."""
    gained = sum(b == "0" and a == "1" for b, a in zip(before, after))
    lost = sum(b == "1" and a == "0" for b, a in zip(before, after))
    n, diff = len(before), gained - lost
    se = math.sqrt(gained + lost - diff ** 2 / n) if n else 0.0  # std of the per-question differences * sqrt(n)
    return {"val_gained": gained, "val_lost": lost, "val_change_se": diff / se if se else 0.0}


def grpo_method(cfg, run, init, train_records, val_records):
    """The prompts; with --beta > 0, a frozen copy of the init model for the KL penalty."""
    block_size, model = init.model.config.block_size, init.model
    train = tokenize_questions(train_records, init.enc, block_size, cfg.max_new_tokens, cfg.data)
    val = tokenize_questions(val_records, init.enc, block_size, cfg.max_new_tokens,
                             "held-out") if val_records else []
    ref = GPT.from_checkpoint(init.ckpt, run.device).eval().requires_grad_(False) if cfg.beta > 0 else None
    drawn, old_logp = [], []  # the step's Samples and the sampler's log-probs, kept for its later updates

    def step_loss(net, idx, step, update):
        if update == 0:
            drawn[:] = [draw_samples(model, cfg, train, idx, ref, init.enc, init.end_id, step, run.device)]
        return grpo_step_loss(net, cfg, drawn[0], update, old_logp)

    return Method(train, val, step_loss, lambda rows: evaluate_grpo(model, cfg, val, init.enc, init.end_id, run, rows),
                  init_is_reference=ref is not None, updates=cfg.num_iterations)


# ===================================================================================================
# main: set up, let the method bring its part, run the shared loop.
# ===================================================================================================

def main(argv=None):
    cfg = check_config(parse_flags(AlignConfig, argv, __doc__))
    run = start_run(cfg)
    init = load_init(cfg, run.device)
    model = init.model
    train_records, val_records, made = read_split(cfg)
    state = check_resume(run, init, made)  # a refused --resume costs seconds, not the method's setup
    build = {"sft": sft_method, "dpo": dpo_method, "grpo": grpo_method}[cfg.method]
    method = build(cfg, run, init, train_records, val_records)
    run.say(f"{cfg.method}: {len(method.train)} training and {len(method.val)} held-out examples, block_size "
            f"{model.config.block_size}, {run.world} rank(s), {cfg.max_steps} steps of {cfg.batch_size} per rank")
    model.train()
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.lr, (0.9, 0.95), run.device.split(":")[0])
    if method.init_is_reference and "init" not in made:  # DPO; GRPO's KL: the weights stay part of the run
        made["init"] = fingerprint(init.ckpt["model"])
    start_step = resume_or_start(run, state, made, model, optimizer)
    # No buffer broadcast at each forward: the buffers (RoPE's tables) are constants, and GRPO's ranks run as
    # many forwards as they have prompts with signal (a broadcast waiting for a forward that never comes
    # hangs). The flag's name changed in torch 2.13; the old one still works there, with a warning.
    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else "broadcast_buffers"
    net = DDP(model, device_ids=[run.device] if run.device.startswith("cuda") else None,
              **{no_sync: False}) if run.distributed else model
    t_start = time.time()
    train_loop(run, method, model, net, optimizer, start_step,
               save_at=lambda step: write_checkpoint(run, init, made, model, optimizer, step))
    run.say(f"{cfg.max_steps - start_step} steps in {time.time() - t_start:.1f}s; "
            + (f"checkpoint {run.ckpt_path}" if cfg.max_steps else f"evaluated only (log {run.log_path})"))
    if run.distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except RuntimeError as e:
        news = lost_peer(e)  # another rank stopped: one sentence, not the collective's traceback
        if news is None:
            raise
        raise SystemExit(f"{news}; --resume continues from the last checkpoint.") from None
