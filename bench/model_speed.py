"""
bench/model_speed.py: model.py's speed against plain baselines, measured side by side in one run.

    python bench/model_speed.py [--threads 2] [--repeats 5]

1. Training step (forward + backward + optimizer step, 4 layers, 256 wide, 8 x 256 tokens): model.py
   against a straightforward nanoGPT-style GPT written below (learned positions, fused qkv, GELU,
   LayerNorm with bias, sdpa), both with AdamW. Compared at the same configuration, and model.py's
   defaults (RoPE) shown too, with AdamW and with train.py's Muon (--optimizer muon: the price of its
   Newton-Schulz iterations per step), and with bf16 autocast (train.py's --dtype auto on a CPU with
   native bf16, Newton-Schulz in bf16 too; on other CPUs bf16 is emulated and the row is slower).
2. Generation of 256 new tokens after a 1- and a 128-token prompt: with the KV cache against
   recomputing the whole visible sequence each step.
3. A GRPO step's work (align.py --method grpo): G = 8 answers of 4-8 tokens to each of 8 prompts of
   ~100 tokens, sampled, then scored forward + backward. Each prompt run once for its G answers
   (generate's num_samples, model.PrefixCache) against the prompt repeated G times, as a batch of
   full sequences (the straightforward way, and TRL's).
4. Two pieces of the alignment stages: drawing a token for 16 rows of the vocabulary (model.sample_next's
   inverse-CDF draw against torch.multinomial), and SFT's loss on 16 sequences of a ~200-token prompt and
   a 6-token answer (the head at the supervised positions only, forward targets_only, against everywhere).
Prints tokens/s and the ratio to the baseline; medians over --repeats. On a busy machine pass --threads 1:
with 2 threads on 2 shared cores, torch's threads wait on each other at every small matmul, which slowed
Newton-Schulz's 256-wide products 12x here (1.5 s -> 18 s a step) and the large forward ones far less.
"""

import argparse
import os
import statistics
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from align import completion_logprobs, pad_batch, token_logprobs  # noqa: E402
from model import GPT, GPTConfig, fast_dtype, sample_next  # noqa: E402
from train import TrainConfig, make_optimizer  # noqa: E402


class PlainGPT(nn.Module):
    """The straightforward baseline: GPT-2 as nanoGPT writes it, without our options."""

    def __init__(self, vocab, block, n_layer, n_head, n_embd):
        super().__init__()
        self.n_head = n_head
        self.wte, self.wpe = nn.Embedding(vocab, n_embd), nn.Embedding(block, n_embd)
        self.layers = nn.ModuleList(nn.ModuleDict(dict(
            ln1=nn.LayerNorm(n_embd), c_attn=nn.Linear(n_embd, 3 * n_embd), c_proj=nn.Linear(n_embd, n_embd),
            ln2=nn.LayerNorm(n_embd), fc=nn.Linear(n_embd, 4 * n_embd), proj=nn.Linear(4 * n_embd, n_embd),
        )) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, idx, targets):
        B, T = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(T))
        for L in self.layers:
            q, k, v = L["c_attn"](L["ln1"](x)).split(x.size(-1), dim=2)
            q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, -1)
            x = x + L["c_proj"](y)
            x = x + L["proj"](F.gelu(L["fc"](L["ln2"](x))))
        logits = self.head(self.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def time_train_steps(runs, idx, targets, repeats):
    """Median seconds per training step (forward, backward, optimizer step) of each (model, optimizer,
    autocast); rounds interleave them, so a slow moment of the machine hits all of them alike."""
    def step(model, optimizer, autocast):
        with autocast:
            _, loss = model(idx, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for run in runs:
        step(*run)  # warm-up (and the optimizer's state allocated)
    times = [[] for _ in runs]
    for _ in range(repeats):
        for run, t in zip(runs, times):
            t0 = time.perf_counter()
            step(*run)
            t.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def median_seconds(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_generate(model, prompt, new_tokens, use_cache, repeats):
    return new_tokens / median_seconds(lambda: model.generate(prompt, new_tokens, temperature=0, use_cache=use_cache),
                                       repeats)


def time_grpo_work(model, prompts, G, new_tokens, repeats):
    """Median seconds of sampling G answers per prompt and of scoring them forward + backward, with
    each prompt run once for its answers and with each prompt repeated G times."""
    gen = torch.Generator().manual_seed(0)
    answers = [model.generate(torch.tensor([p]), new_tokens, 1.0, generator=gen, num_samples=G)[:, len(p):].tolist()
               for p in prompts]
    answers = [a[:1 + k % new_tokens] for per_prompt in answers for k, a in enumerate(per_prompt)]  # 1..8 tokens
    repeated = [p for p in prompts for _ in range(G)]

    def sample(shared):
        for p in prompts:
            rows = torch.tensor([p]) if shared else torch.tensor([p] * G)
            model.generate(rows, new_tokens, 1.0, num_samples=G if shared else 1)

    def score(shared):
        if shared:
            logp, mask = completion_logprobs(model, prompts, answers)
        else:
            x, y = pad_batch([((p + a)[:-1], [-1] * (len(p) - 1) + a) for p, a in zip(repeated, answers)], "cpu")
            logp, mask = token_logprobs(model, x, y), y >= 0
        (logp * mask).sum().backward()
        model.zero_grad(set_to_none=True)

    times = {}
    for _ in range(repeats):  # interleaved, so a slow moment of the machine hits both alike
        for name, fn in (("sample", sample), ("score", score)):
            for shared in (False, True):
                t0 = time.perf_counter()
                fn(shared)
                times.setdefault((name, shared), []).append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats; medians are printed (default: 5)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    vocab, block, n_layer, n_head, n_embd, B = 8192, 256, 4, 4, 256, 8
    torch.manual_seed(0)
    idx = torch.randint(0, vocab, (B, block))
    targets = torch.randint(0, vocab, (B, block))

    shape = dict(vocab_size=vocab, block_size=block, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    plain, same, ours = (PlainGPT(vocab, block, n_layer, n_head, n_embd),
                         GPT(GPTConfig(**shape, pos_encoding="learned", bias=True)), GPT(GPTConfig(**shape)))
    fp32, bf16 = nullcontext(), torch.autocast("cpu", dtype=torch.bfloat16)
    muon = TrainConfig(optimizer="muon")
    rows = [("nanoGPT-style baseline, AdamW", plain, torch.optim.AdamW(plain.parameters(), 1e-3), fp32),
            ("model.py, same config (learned pos, bias), AdamW", same, make_optimizer(same, TrainConfig(optimizer="adamw")), fp32),
            ("model.py defaults (RoPE, no bias), AdamW", ours, make_optimizer(ours, TrainConfig(optimizer="adamw")), fp32),
            ("model.py defaults, Muon + AdamW", ours, make_optimizer(ours, muon), fp32),
            (f"the same, bf16 autocast (auto here: {fast_dtype('cpu')})", ours,
             make_optimizer(ours, muon, dtype="bfloat16"), bf16)]
    print(f"train step: forward + backward + optimizer step, {n_layer} layers x {n_embd} wide, {B}x{block} "
          f"tokens, {args.threads} threads, median of {args.repeats}")
    seconds = time_train_steps([run[1:] for run in rows], idx, targets, args.repeats)
    for (name, *_), sec in zip(rows, seconds):
        print(f"  {name:50s} {idx.numel() / sec:10.0f} tok/s   x{seconds[0] / sec:.2f}")

    model = ours.eval()
    for prompt_len in (1, 128):  # 128 + 256 runs past block_size: the window jumps, the cache is rebuilt
        prompt = torch.randint(0, vocab, (1, prompt_len))
        print(f"\ngenerate: 256 new tokens after a {prompt_len}-token prompt, batch 1, median of {args.repeats}")
        no_cache = time_generate(model, prompt, 256, False, max(1, args.repeats // 2))
        cache = time_generate(model, prompt, 256, True, args.repeats)
        print(f"  {'recompute every step (no cache)':45s} {no_cache:10.0f} tok/s   x1.00")
        print(f"  {'KV cache':45s} {cache:10.0f} tok/s   x{cache / no_cache:.2f}")

    G, new_tokens = 8, 8
    prompts = [torch.randint(0, vocab, (90 + 4 * i,)).tolist() for i in range(8)]
    print(f"\nGRPO step's work: {G} answers (1-{new_tokens} tokens) to each of {len(prompts)} prompts of 90-118 "
          "tokens; seconds, median")
    t = time_grpo_work(model.train(), prompts, G, new_tokens, args.repeats)
    for name, what in (("sample", f"sample {new_tokens} tokens"), ("score", "score: forward + backward")):
        print(f"  {what:28s} prompt repeated {t[name, False]:7.2f}   prompt once {t[name, True]:7.2f}   "
              f"x{t[name, False] / t[name, True]:.2f}")

    probs = F.softmax(3 * torch.randn(16, vocab), dim=-1)
    gen = torch.Generator().manual_seed(0)
    multinomial = median_seconds(lambda: torch.multinomial(probs, 1, generator=gen), 20 * args.repeats)
    inverse_cdf = median_seconds(lambda: sample_next(probs.log(), 1.0, generator=gen), 20 * args.repeats)
    print(f"\none token for 16 rows of {vocab}; microseconds, median\n  {'torch.multinomial':28s} "
          f"{1e6 * multinomial:9.0f}   sample_next (inverse CDF) {1e6 * inverse_cdf:9.0f}   x{multinomial / inverse_cdf:.2f}")

    seqs = [(p + a[:-1], [-1] * (len(p) - 1) + a) for p, a in
            ((torch.randint(0, vocab, (190 + i,)).tolist(), torch.randint(0, vocab, (6,)).tolist()) for i in range(16))]
    x, y = pad_batch(seqs, "cpu")

    def sft_loss(targets_only):
        _, loss = model(x, y, targets_only=targets_only)
        loss.backward()
        model.zero_grad(set_to_none=True)
    everywhere, supervised = (median_seconds(lambda: sft_loss(only), args.repeats) for only in (False, True))
    print(f"\nSFT loss, forward + backward, 16 sequences of ~200 prompt + 6 answer tokens; seconds, median\n"
          f"  {'head at every position':28s} {everywhere:7.3f}   at the answers only {supervised:7.3f}   "
          f"x{everywhere / supervised:.2f}")

if __name__ == "__main__":
    main()
