"""
model.py: the GPT that every stage of this project shares.

    from model import GPT, GPTConfig
    model = GPT(GPTConfig(vocab_size=8192, block_size=256))
    logits, loss = model(idx, targets)          # idx, targets: (B, T) token ids; -1 targets ignored
    out = model.generate(idx, 100, temperature=0.8, top_k=50)

A decoder-only transformer in the GPT-2 mould, with the options a reader meets in the literature
switchable from `GPTConfig`. How the defaults differ from GPT-2, and why:
- rotary position embeddings (RoPE) instead of a learned table: relative positions for free and no
  parameters; "learned" (GPT-2) and "sinusoidal" (Attention Is All You Need) are kept as options.
- grouped-query attention: `n_kv_head` key/value heads shared by `n_head` query heads, which shrinks
  the KV cache by n_head / n_kv_head (equal by default, which is plain multi-head attention).
- no biases by default (they cost time and buy nothing at this scale), embeddings tied to the head.
- attention goes through `F.scaled_dot_product_attention` ("sdpa"); "naive" is the textbook
  reference it is tested against; "triton" is our own kernel in attention_kernel.py.
- generation keeps a KV cache, so each new token costs one position of work, not the whole prefix.
- switches from the speedrun literature (modded-nanogpt): QK-norm, ReLU^2, zero-initialised output
  projections, logit soft-capping, an untied head; off unless the README's measurements keep them.
The optimizer is the model's too: `model.configure_optimizers(...)` groups the parameters for AdamW, or
for Muon (the blocks' matrices) with AdamW for the rest, as train.py's --optimizer muon trains.
Checkpoints are self-contained dicts (config, weights, and whatever the stage adds: optimizer, step,
tokenizer), written atomically; `GPT.from_checkpoint(path)` rebuilds the model from the file alone.
Hugging Face folders (Llama, GPT-2, GPT-NeoX) map onto GPTConfig and these weights exactly, both ways:
`read_checkpoint(folder)` reads one as a checkpoint dict, export.py writes one.
"""

import base64
import json
import math
import os
import re
from dataclasses import asdict, dataclass, fields
from typing import Literal, get_args

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import attention_kernel  # imports only torch; triton is loaded on the first triton call
import flags  # the one rule for writing outputs (temporary name, rename) that every stage follows

CHECKPOINT_FORMAT = "gpt-from-scratch/2"  # 2: GPTConfig gained norm_eps, mlp_width, gelu_approx
DAMAGED = "the file is damaged or not one that train.py or align.py wrote; pass another, or retrain"
MAX_BLOCK_SIZE = 2**20  # positions; a checkpoint's block_size above it is damage (its tables would fill memory)


@dataclass
class GPTConfig:
    vocab_size: int = 8192
    block_size: int = 256          # longest sequence the model sees (positions 0 .. block_size-1)
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 0             # key/value heads for grouped-query attention; 0 means n_head
    n_embd: int = 256
    dropout: float = 0.0
    bias: bool = False             # biases in Linear layers and LayerNorm
    pos_encoding: Literal["rope", "learned", "sinusoidal"] = "rope"
    rope_theta: float = 10000.0
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5         # added to the variance in every norm (Llama checkpoints use 1e-6 or 1e-5)
    prenorm: bool = True           # False: the original post-norm block, norm(x + sublayer(x))
    mlp: Literal["gelu", "swiglu", "relu2"] = "gelu"  # gelu, relu2: 4x wide; swiglu: 8/3 x wide, as many parameters
    mlp_width: int = 0             # the MLP's hidden width; 0: the rule of `mlp` above (imported models set it)
    gelu_approx: Literal["none", "tanh"] = "none"  # tanh: GPT-2's approximation of GELU, kept for its weights
    tie_weights: bool = True       # the output head reuses the token embedding matrix
    # Switches from the speedrun literature (modded-nanogpt), off by default: each is measured in README.
    qk_norm: bool = False          # RMS-normalise each head's q and k: attention logits stay bounded at high lr
    zero_init_proj: bool = False   # residual branches' output projections start at 0: every block starts as identity
    logit_softcap: float = 0.0     # > 0: logits = cap * tanh(logits / cap), so no token's score runs away
    attn_impl: Literal["sdpa", "naive", "triton"] = "sdpa"

    def __post_init__(self):
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        for f in fields(self):
            allowed = list(get_args(f.type))
            if allowed and getattr(self, f.name) not in allowed:
                raise ValueError(f"{f.name}={getattr(self, f.name)!r} is not one of {allowed}.")
        if self.logit_softcap < 0:
            raise ValueError(f"logit_softcap must be >= 0 (0 turns it off), got {self.logit_softcap}.")
        if min(self.vocab_size, self.block_size, self.n_layer, self.n_head, self.n_embd) < 1:
            raise ValueError("vocab_size, block_size, n_layer, n_head and n_embd must all be positive.")
        if self.mlp_width < 0 or self.norm_eps <= 0:
            raise ValueError(f"mlp_width must be >= 0 (0: the rule) and norm_eps > 0; got {self.mlp_width}, "
                             f"{self.norm_eps}.")
        if self.n_kv_head < 0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"n_kv_head must be >= 0 and dropout in [0, 1); got {self.n_kv_head}, {self.dropout}.")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}.")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} must be divisible by n_kv_head={self.n_kv_head}.")
        head_dim = self.n_embd // self.n_head
        if self.pos_encoding == "rope" and head_dim % 2:
            raise ValueError(f"rope needs an even head size; n_embd/n_head = {head_dim}.")
        if self.attn_impl == "triton" and (head_dim not in (16, 32, 64, 128) or self.dropout > 0):
            raise ValueError(f"attn_impl='triton' needs a head size of 16, 32, 64 or 128 (got {head_dim}) "
                             f"and dropout=0 (got {self.dropout}).")
        if self.pos_encoding == "sinusoidal" and self.n_embd % 2:
            raise ValueError(f"sinusoidal positions need an even n_embd, got {self.n_embd}.")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @property
    def mlp_hidden(self):
        if self.mlp_width:
            return self.mlp_width
        if self.mlp in ("gelu", "relu2"):
            return 4 * self.n_embd
        # SwiGLU has three matrices instead of two: 2/3 of 4x keeps the parameter count; round to 64.
        return 64 * math.ceil(8 * self.n_embd / 3 / 64)


# ---------------------------------------------------------------------------------------------------
# Positions

def sinusoidal_table(n_pos, dim):
    """(n_pos, dim) table: sin on even features, cos on odd, wavelengths from 2*pi to 10000*2*pi."""
    pos = torch.arange(n_pos, dtype=torch.float32)[:, None]             # (n_pos, 1)
    inv_freq = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    table = torch.zeros(n_pos, dim)
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq)
    return table


def rope_tables(n_pos, head_dim, theta):
    """cos and sin of the rotation angles, each (n_pos, head_dim/2): pair i turns at theta^(-2i/d)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(n_pos, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate feature pairs (i, i + d/2) of x (B, H, T, d) by the angle of their position.

    The dot product of two rotated vectors depends only on the difference of their positions,
    which is what makes the encoding relative. Halves rather than interleaved pairs: same math,
    cheaper slicing.
    """
    x1, x2 = x.chunk(2, dim=-1)                                          # (B, H, T, d/2) each
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)                          # (T, d/2) broadcast
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


# ---------------------------------------------------------------------------------------------------
# Attention

def naive_attention(q, k, v, causal=True, dropout_p=0.0, training=False):
    """The textbook reference: softmax(q k^T / sqrt(d) + mask) v, with the future set to -inf.

    q: (B, H, Tq, d); k, v: (B, H, Tk, d) with Tk >= Tq. Query i sits at absolute position
    Tk - Tq + i (the cache holds the first Tk - Tq positions), so it may see keys 0 .. Tk - Tq + i.
    """
    Tq, Tk = q.size(-2), k.size(-2)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))          # (B, H, Tq, Tk)
    if causal:
        allowed = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
        scores = scores.masked_fill(~allowed, float("-inf"))
    weights = F.dropout(F.softmax(scores, dim=-1), dropout_p, training)
    return weights @ v                                                   # (B, H, Tq, d)


class KVCache:
    """Keys and values of every layer for the tokens seen so far, preallocated to `max_len`."""

    def __init__(self, config, batch_size, max_len, device, dtype):
        shape = (config.n_layer, batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k, self.v = (torch.zeros(shape, device=device, dtype=dtype) for _ in range(2))
        self.pos = 0  # positions filled; GPT.forward advances it once all layers have appended

    def append(self, layer, k, v):
        """Store k, v (B, H_kv, T, d) after the cached ones; return all of them (B, H_kv, pos+T, d)."""
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def repeat_interleave(self, n):
        """Each sequence's cache becomes n copies (rows b*n .. b*n+n-1): one prompt, n continuations."""
        self.k, self.v = self.k.repeat_interleave(n, dim=1), self.v.repeat_interleave(n, dim=1)


class PrefixCache:
    """One prompt's keys and values, shared by many continuations, with gradients (RL's G answers).

    A forward of the prompt (1, L) records each layer's keys and values; a forward of B continuations
    then attends to them broadcast to B rows. That costs L + B*T positions instead of B*(L+T), and the
    numbers are those of B full copies. It concatenates where KVCache writes in place (which autograd
    cannot differentiate through), so the continuations' gradients flow back into the prompt's forward.
    """

    def __init__(self):
        self.k, self.v, self.pos = {}, {}, 0

    def append(self, layer, k, v):
        if layer not in self.k:  # the prompt's forward: keep (1, H_kv, L, d)
            self.k[layer], self.v[layer] = k, v
            return k, v
        B = k.size(0)
        return (torch.cat([self.k[layer].expand(B, -1, -1, -1), k], dim=2),
                torch.cat([self.v[layer].expand(B, -1, -1, -1), v], dim=2))


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        # Head counts live on the module (not read from config) so tensor parallelism can shard them.
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        # One matmul for q, k and v; its output is [q heads | k heads | v heads].
        qkv_width = (config.n_head + 2 * config.n_kv_head) * config.head_dim
        self.qkv = nn.Linear(config.n_embd, qkv_width, bias=config.bias)
        self.proj = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=config.bias)
        self.attn_impl = config.attn_impl
        self.dropout = config.dropout
        self.qk_norm = config.qk_norm

    def forward(self, x, rope=None, kv_cache=None, layer=0):
        B, T, _ = x.shape
        hd = self.head_dim
        q, k, v = self.qkv(x).split([self.n_head * hd, self.n_kv_head * hd, self.n_kv_head * hd], dim=-1)
        q = q.view(B, T, self.n_head, hd).transpose(1, 2)                # (B, H, T, hd)
        k = k.view(B, T, self.n_kv_head, hd).transpose(1, 2)             # (B, H_kv, T, hd)
        v = v.view(B, T, self.n_kv_head, hd).transpose(1, 2)             # (B, H_kv, T, hd)
        if self.qk_norm:  # no learned scale: then tensor-parallel shards have nothing to keep in sync
            q, k = F.rms_norm(q, (hd,), eps=1e-6), F.rms_norm(k, (hd,), eps=1e-6)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_cache is not None:
            k, v = kv_cache.append(layer, k, v)                          # (B, H_kv, pos+T, hd)
        y = self.attend(q, k, v)                                         # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * hd)
        return F.dropout(self.proj(y), self.dropout, self.training)

    def attend(self, q, k, v):
        dropout_p = self.dropout if self.training else 0.0
        square = q.size(2) == k.size(2)
        if self.attn_impl == "triton" and square:  # cached decode (q shorter than k) takes sdpa below
            return attention_kernel.attention(q, k, v, causal=True)
        n_rep = self.n_head // self.n_kv_head
        if self.attn_impl == "naive":
            # Every query head reads the key/value head of its group.
            k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
            return naive_attention(q, k, v, True, dropout_p, self.training)
        if square:  # training and prefill: the usual causal mask
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True,
                                                  enable_gqa=n_rep > 1)
        if q.size(2) == 1:  # one new token attends to everything cached: no mask at all
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=n_rep > 1)
        # Several new tokens after a cache (GRPO's answers after their shared prompt): sdpa's is_causal
        # aligns the mask top-left, we need bottom-right (query i sits at position Tk - Tq + i), so pass it.
        Tq, Tk = q.size(2), k.size(2)
        allowed = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
        if q.device.type != "cpu":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=n_rep > 1)
        # A few queries against a long cache: the CPU's bf16 kernel takes 3x its fp32 one here (forward and
        # backward), so the CPU runs this case in fp32 even under autocast.
        with torch.autocast("cpu", enabled=False):
            y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=allowed,
                                               enable_gqa=n_rep > 1)
        return y.to(q.dtype)


# ---------------------------------------------------------------------------------------------------
# Feed-forward, norm, block

class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.swiglu, self.relu2 = config.mlp == "swiglu", config.mlp == "relu2"
        self.gelu_approx = config.gelu_approx
        hidden = config.mlp_hidden
        # For SwiGLU, fc's output is [gate | up], each `hidden` wide, in one matmul.
        self.fc = nn.Linear(config.n_embd, 2 * hidden if self.swiglu else hidden, bias=config.bias)
        self.proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x):
        h = self.fc(x)                                                   # (B, T, hidden or 2*hidden)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.relu2:  # ReLU squared (So et al. 2021, "Primer"): sparse like ReLU, smooth at 0
            h = F.relu(h).square()
        else:
            h = F.gelu(h, approximate=self.gelu_approx)
        return F.dropout(self.proj(h), self.dropout, self.training)


def make_norm(config):
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.prenorm = config.prenorm
        self.norm1, self.attn = make_norm(config), CausalSelfAttention(config)
        self.norm2, self.mlp = make_norm(config), MLP(config)

    def forward(self, x, rope=None, kv_cache=None, layer=0):
        if self.prenorm:  # GPT-2 and later: the residual stream is never normalised in place
            x = x + self.attn(self.norm1(x), rope, kv_cache, layer)
            return x + self.mlp(self.norm2(x))
        # Vaswani et al. 2017: normalise after each residual sum
        x = self.norm1(x + self.attn(x, rope, kv_cache, layer))
        return self.norm2(x + self.mlp(x))


# ---------------------------------------------------------------------------------------------------
# The model

class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        if config.pos_encoding == "learned":
            self.wpe = nn.Embedding(config.block_size, config.n_embd)
        if config.pos_encoding == "sinusoidal":
            self.register_buffer("sin_table", sinusoidal_table(config.block_size, config.n_embd), persistent=False)
        if config.pos_encoding == "rope":
            cos, sin = rope_tables(config.block_size, config.head_dim, config.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        # A pre-norm stack ends un-normalised, so it needs a final norm; a post-norm one does not.
        self.norm_f = make_norm(config) if config.prenorm else nn.Identity()
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        # Each residual branch ends in a `proj`; scaling them by 1/sqrt(2 * n_layer) keeps the
        # residual stream's variance from growing with depth (GPT-2).
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") and config.zero_init_proj:
                nn.init.zeros_(p)  # the gradient still reaches them: d loss / d W = grad_out x input
            elif name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if config.tie_weights and not config.prenorm:
            # Post-norm hands the head unit-size vectors that are mostly the current token's own
            # embedding; a tied head would score that token at n_embd * std. Keep it near 1.
            nn.init.normal_(self.wte.weight, mean=0.0, std=1.0 / config.n_embd)

    def _init_weights(self, module):
        # std 0.02 keeps the initial logits near zero, so the loss starts at about ln(vocab_size).
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    # The forward pass in pieces, so pipeline stages (train.py) can run a slice of it.
    def embed(self, idx, start=0):
        """Token ids (B, T) at positions start .. start+T-1 -> residual stream (B, T, C)."""
        x = self.wte(idx)
        if self.config.pos_encoding == "learned":
            x = x + self.wpe(torch.arange(start, start + idx.size(1), device=idx.device))
        if self.config.pos_encoding == "sinusoidal":
            x = x + self.sin_table[start:start + idx.size(1)]
        return F.dropout(x, self.config.dropout, self.training)

    def rope(self, start, T):
        if self.config.pos_encoding != "rope":
            return None
        return self.rope_cos[start:start + T], self.rope_sin[start:start + T]

    def head(self, x):
        """Residual stream (B, T, C) -> logits (B, T, vocab), soft-capped when logit_softcap > 0."""
        logits = self.lm_head(self.norm_f(x))
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits / cap) if cap else logits

    def forward(self, idx, targets=None, kv_cache=None, last_only=False, targets_only=False):
        """idx (B, T) -> logits (B, T, vocab); with targets (B, T), also the mean cross-entropy.

        targets[b, t] is the token that should follow idx[b, t] (the caller shifts); -1 is ignored
        (a batch whose targets are all -1 has no loss to average: NaN, as in F.cross_entropy).
        With a kv_cache, idx holds only the new tokens and the cache supplies the rest. last_only: the
        logits of the last position alone (B, 1, vocab), all a prompt's prefill needs (the head is
        a third of a small model's work per position). targets_only: the logits (n, vocab) of the n
        positions whose target is not -1, all a loss needs when only answers are supervised (SFT, DPO).
        A pipeline stage (train.py's shard_model) runs its slice: without the embedding, idx is the
        residual stream (B, T, C) from the stage before; without the head, it returns that stream.
        """
        T = idx.size(1)
        start = kv_cache.pos if kv_cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size={self.config.block_size}.")
        x = self.embed(idx, start) if self.wte is not None else idx
        rope = self.rope(start, T)
        for layer, block in enumerate(self.blocks):
            x = block(x, rope, kv_cache, layer)
        if kv_cache is not None:
            kv_cache.pos += T
        if self.lm_head is None:  # a stage before the last: the stream (B, T, C) for the next one
            return x, None
        if targets_only:
            supervised = targets >= 0                                    # (B, T)
            logits = self.head(x[supervised])                            # (n, vocab)
            return logits, F.cross_entropy(logits.float(), targets[supervised])
        logits = self.head(x[:, -1:] if last_only else x)                # (B, T or 1, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)
        return logits, loss

    # --- generation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_token=None,
               use_cache=True, generator=None, num_samples=1):
        """Yield the next token (B * num_samples, 1) of each sequence, one step at a time.

        With the cache, the prompt is run once (prefill) and each later step runs only the newest
        token. Without it, every step recomputes the whole visible sequence: the reference.
        Both see the same window (window_start): all tokens while they fit in block_size, then a
        window that jumps forward by half a block, so the cache is rebuilt once every block_size/2
        steps rather than every step. Sequences that produced eos_token keep producing it; the
        stream ends when all of them have. With num_samples > 1 each prompt is continued that many
        times (rows b*n .. b*n+n-1): the prompt runs once, then its cache is copied.
        """
        was_training = self.training
        self.eval()
        B, bs = idx.size(0) * num_samples, self.config.block_size
        finished = torch.zeros(B, 1, dtype=torch.bool, device=idx.device)
        cache, cache_start, context = None, None, idx
        try:
            for _ in range(max_new_tokens):
                start = window_start(context.size(1), bs)
                if not use_cache:
                    logits, _ = self(context[:, start:], last_only=True)
                elif start != cache_start:  # prefill, or the window jumped: positions changed
                    # room for this window's tokens and the rest to come, never more than the block: an
                    # imported model's context may be 100k positions
                    room = min(bs, context.size(1) - start + max_new_tokens)
                    cache = KVCache(self.config, context.size(0), room, idx.device, self.lm_head.weight.dtype)
                    cache_start = start
                    logits, _ = self(context[:, start:], kv_cache=cache, last_only=True)
                else:
                    logits, _ = self(context[:, -1:], kv_cache=cache)
                if context.size(0) < B:  # the prompts ran once; now each becomes num_samples rows
                    logits = logits[:, -1:].repeat_interleave(num_samples, 0)
                    context = context.repeat_interleave(num_samples, 0)
                    if cache is not None:
                        cache.repeat_interleave(num_samples)
                next_token = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)
                if eos_token is not None:
                    next_token = next_token.masked_fill(finished, eos_token)
                    finished |= next_token == eos_token
                context = torch.cat([context, next_token], dim=1)
                yield next_token
                if eos_token is not None and bool(finished.all()):
                    break
        finally:
            self.train(was_training)

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_token=None,
                 use_cache=True, generator=None, num_samples=1):
        """The prompt idx (B, T) followed by up to max_new_tokens new tokens: (B * num_samples, T + new),
        each prompt's continuations in consecutive rows. temperature=0 is greedy."""
        new = list(self.stream(idx, max_new_tokens, temperature, top_k, top_p, eos_token, use_cache, generator,
                               num_samples))
        return torch.cat([idx.repeat_interleave(num_samples, 0)] + new, dim=1)

    # --- training helpers ---------------------------------------------------------------------------
    def num_params(self, non_embedding=False):
        """Parameters counted once each (tied weights are one tensor); optionally without embeddings."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wte.weight.numel() + (self.wpe.weight.numel() if hasattr(self, "wpe") else 0)
        return n

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per token (forward + backward): 6 per matmul weight, plus attention scores.

        Every Linear weight, the head included (it is a matmul even when tied), costs 2 FLOPs per
        token forward and 4 backward. Attention's q.k and weights.v add 12 * layers * heads * head_dim
        * T, counted for the full T x T square as PaLM does (causal work is about half of that).
        """
        c = self.config
        T = seq_len or c.block_size
        matmul_weights = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return 6 * matmul_weights + 12 * c.n_layer * c.n_head * c.head_dim * T

    def configure_optimizers(self, weight_decay, learning_rate, betas=(0.9, 0.95), device_type="cpu", muon_lr=0.0,
                             muon_momentum=0.95, sharded_update=None, ns_dtype=torch.float32):
        """The optimizer (see the Optimizers section below). Weight decay on matrices (weights, embeddings),
        none on vectors (norms, biases). muon_lr 0: AdamW for all. muon_lr > 0: Muon at muon_lr for the blocks'
        matrices (the maps between hidden states), AdamW at learning_rate for the rest, in one Muon optimizer;
        sharded_update: Muon's step for a tensor-parallel shard (train.py passes it under --tp); ns_dtype: the
        precision of Muon's Newton-Schulz products (train.py passes bfloat16 when the run's matmuls are)."""
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        vectors = [p for _, p in named if p.dim() < 2]
        if not muon_lr:
            groups = [{"params": [p for _, p in named if p.dim() >= 2], "weight_decay": weight_decay},
                      {"params": vectors, "weight_decay": 0.0}]
            return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == "cuda")
        c = self.config
        for block in self.blocks:  # whole-model sizes of the maps fused in one matrix (also a tp shard's sections)
            block.attn.qkv.weight.muon_sections = [c.n_head * c.head_dim] + [c.n_kv_head * c.head_dim] * 2
            if c.mlp == "swiglu":
                block.mlp.fc.weight.muon_sections = [c.mlp_hidden, c.mlp_hidden]
        hidden = [n.startswith("blocks.") and p.dim() == 2 for n, p in named]
        groups = [dict(params=[p for (_, p), h in zip(named, hidden) if h], muon=True, lr=muon_lr),
                  dict(params=[p for (_, p), h in zip(named, hidden) if not h and p.dim() >= 2],
                       weight_decay=weight_decay),
                  dict(params=vectors)]
        return Muon(groups, learning_rate, muon_momentum, betas, sharded_update=sharded_update, ns_dtype=ns_dtype)

    # --- checkpoints --------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path_or_ckpt, device="cpu", **overrides):
        """Rebuild the model from a checkpoint file (or its loaded dict); overrides set config fields."""
        ckpt = load_checkpoint(path_or_ckpt) if isinstance(path_or_ckpt, (str, os.PathLike)) else path_or_ckpt
        known = {f.name for f in fields(GPTConfig)}
        unknown = sorted(set(ckpt.get("model_config", {})) - known) + sorted(set(overrides) - known)
        if unknown or "model_config" not in ckpt:
            raise SystemExit(f"checkpoint config fields {unknown or ['model_config missing']} are not "
                             "GPTConfig fields; was it written by another version of model.py?")
        model = cls(GPTConfig(**{**ckpt["model_config"], **overrides}))
        model.load_state_dict(ckpt["model"])  # saved unwrapped (save_checkpoint), so the names match
        return model.to(device)


def window_start(n_tokens, block_size):
    """First visible token of a sequence of n_tokens: 0 while it fits, then in jumps of block_size/2."""
    if n_tokens <= block_size:
        return 0
    half = max(1, block_size // 2)
    return -(-(n_tokens - block_size) // half) * half  # ceil to a multiple of half


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Pick the next token (B, 1) from logits (B, vocab). temperature=0 means greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    # Inverse-CDF sampling: one uniform number per row, located in the running sum of the probabilities
    # (the first token whose cumulative mass exceeds it). torch.multinomial draws one random number per
    # vocabulary entry instead, 30x the time on a CPU for 16 rows of 8192. float64 keeps u below the total.
    cdf = F.softmax(logits, dim=-1).double().cumsum(dim=-1)                         # (B, vocab)
    u = torch.rand(cdf.size(0), 1, generator=generator, device=cdf.device, dtype=torch.float64) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.size(-1) - 1)      # (B, 1)


def filter_logits(logits, top_k=None, top_p=None):
    """Set to -inf all but the top_k logits, then all but the smallest set holding top_p of the mass."""
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]   # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p; the first always stays.
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop_sorted[..., 0] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


# ---------------------------------------------------------------------------------------------------
# Optimizers: AdamW (torch's), and Muon for the blocks' matrices (GPT.configure_optimizers groups them)
#
# Muon (Keller Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks",
# kellerjordan.github.io/posts/muon): for a weight matrix that maps hidden states to hidden states, take
# SGD's Nesterov momentum M = U S V^T and step along U V^T instead, every singular value set to ~1, so the
# rare directions of the update move as far as the dominant ones. U V^T comes from a few matrix products
# (Newton-Schulz), not an SVD. Embeddings, the head and vectors are not such maps and keep AdamW.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # the blog's quintic: steep at 0, so small singular values grow fast


def orthogonalize(G, steps=5, dtype=None):
    """G (m, n) -> about U V^T, where G = U S V^T: the same singular vectors, singular values in ~[0.7, 1.2].

    Dividing by the Frobenius norm puts every singular value in [0, 1]; each step maps X = U S V^T to
    a X + b (X X^T) X + c (X X^T)^2 X = U p(S) V^T, p(s) = a s + b s^3 + c s^5, which pushes every s
    that is not tiny into the band around 1 (it trades exactness at 1 for speed). X X^T is taken on
    the short side, so a step costs 2 m^2 n + m^3 multiply-adds with m <= n. dtype: the products' precision
    (default G's); bfloat16, as the blog runs it, is enough: the result only has to land in the band.
    """
    a, b, c = NS_COEFFICIENTS
    X = G.mT if G.size(0) > G.size(1) else G                            # (m, n), m <= n
    X = (X / (X.norm() + 1e-7)).to(dtype or G.dtype)
    for _ in range(steps):
        A = X @ X.mT                                                    # (m, m)
        X = a * X + (b * A + c * A @ A) @ X
    X = X.to(G.dtype)
    return X.mT if G.size(0) > G.size(1) else X


class Muon(torch.optim.Optimizer):
    """Muon for the groups with muon=True; AdamW (torch.optim.AdamW's step and state names) for the
    others, so one optimizer, one state_dict and one GradScaler serve both.

    Muon's step for a matrix W (out x in): momentum buffer B = mu B + G; update O = orthogonalize(G + mu B)
    (Nesterov) times sqrt(max(1, out/in)), so a tall matrix changes its outputs' RMS as much as a square
    one; W -= lr O. A matrix may carry `muon_sections` (row counts of the maps fused in it: [q | k | v],
    SwiGLU's [gate | up]), each orthogonalised on its own. A tensor-parallel shard (a parameter with tp_dim)
    is stepped by sharded_update(p, G, direction): direction of the whole matrix, this shard's part of it.
    ns_dtype: the precision of orthogonalize's products (its input and output stay float32).
    """

    def __init__(self, param_groups, lr, momentum=0.95, betas=(0.9, 0.95), eps=1e-8, ns_steps=5,
                 sharded_update=None, ns_dtype=torch.float32):
        super().__init__(param_groups, dict(lr=lr, momentum=momentum, betas=betas, eps=eps, weight_decay=0.0,
                                            ns_steps=ns_steps, muon=False))
        self.sharded_update, self.ns_dtype = sharded_update, ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in (p for p in group["params"] if p.grad is not None):
                p.mul_(1 - group["lr"] * group["weight_decay"])        # decoupled weight decay
                if group["muon"]:
                    p.add_(self.muon_update(p, group), alpha=-group["lr"])
                else:
                    self.adamw_step(p, group)

    def muon_update(self, p, group):
        momentum, buf = group["momentum"], self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
        buf.mul_(momentum).add_(p.grad)
        G = p.grad.add(buf, alpha=momentum)                             # Nesterov: a step ahead

        def direction(M):  # the whole matrix's update: each fused map orthogonalised, scaled for its shape
            return torch.cat([orthogonalize(S.float(), group["ns_steps"], self.ns_dtype)
                              * max(1, S.size(0) / S.size(1)) ** 0.5
                              for S in M.split(getattr(p, "muon_sections", [M.size(0)]))])
        update = self.sharded_update(p, G, direction) if hasattr(p, "tp_dim") else direction(G)
        return update.to(p.dtype)

    def adamw_step(self, p, group):
        """torch.optim.AdamW's update (weight decay already applied)."""
        state, (beta1, beta2) = self.state[p], group["betas"]
        if not state:
            state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        state["step"] += 1
        step = state["step"].item()
        state["exp_avg"].lerp_(p.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2 ** step)).add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1 ** step))


# ---------------------------------------------------------------------------------------------------
# Checkpoint files

def save_checkpoint(path, model, **extra):
    """Write {format, model_config, model weights, **extra} to path atomically (temp file + rename).

    A crash mid-write leaves the previous checkpoint intact: os.replace is atomic on one filesystem; a
    write that fails (a full disk) removes its temporary and says so in one sentence.
    """
    raw = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    raw = getattr(raw, "module", raw)         # unwrap DDP
    ckpt = {"format": CHECKPOINT_FORMAT, "model_config": asdict(raw.config),
            "model": {k: v.detach().cpu() for k, v in raw.state_dict().items()}, **extra}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        with flags.atomic_output(path) as f:
            torch.save(ckpt, f)
    except OSError as e:  # the disk is full, a quota, a folder gone: the user can fix it
        kept = f"the previous {path} is kept" if os.path.isfile(path) else "nothing was saved"
        raise SystemExit(f"cannot write {path} ({e.strerror or e}); {kept}: free some space (or pick another "
                         "--out-dir) and run again with --resume.") from None


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint dict; a missing file or one this project did not write is one clear sentence."""
    if not os.path.isfile(path):
        raise SystemExit(f"checkpoint {path} does not exist; pass the ckpt.pt that train.py or align.py wrote.")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise SystemExit(f"{path} is not a checkpoint this project can read ({type(e).__name__}); "
                         "pass the ckpt.pt that train.py or align.py wrote.") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("format"), str):
        raise SystemExit(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint; pass the ckpt.pt that "
                         "train.py or align.py wrote.")
    if ckpt["format"] != CHECKPOINT_FORMAT:
        raise SystemExit(f"{path} is a {ckpt['format']} checkpoint, written by an older version of this project "
                         f"(this one reads {CHECKPOINT_FORMAT}); retrain or convert it.")
    problem = checkpoint_problem(ckpt)
    if problem:
        raise SystemExit(f"{path}: {problem}.")
    return ckpt


def checkpoint_problem(ckpt):
    """What keeps a checkpoint dict from building its model and tokenizer, and the fix, in words; or None.
    Shapes only, before anything is built: a wrong shape or a huge config value is a sentence here rather
    than a deep error, or an allocation that never ends, in whichever stage loads it."""
    config, weights = ckpt.get("model_config"), ckpt.get("model")
    if not isinstance(config, dict) or not isinstance(weights, dict):
        return f"it holds no model_config or no weights; {DAMAGED}"
    names = [f.name for f in fields(GPTConfig)]
    missing, unknown = [k for k in names if k not in config], sorted(set(config) - set(names))
    if missing:
        return f"its model_config lacks {', '.join(missing)}: written by an older version; retrain or convert it"
    if unknown:
        return f"its model_config has fields GPTConfig does not know ({', '.join(unknown)}); {DAMAGED}"
    for f in fields(GPTConfig):
        value, kind = config[f.name], type(f.default)
        finite_number = type(value) in (int, float) and math.isfinite(value)
        if not (finite_number if kind is float else type(value) is kind):
            return f"its model_config {f.name}={value!r} is not a finite {kind.__name__}; {DAMAGED}"
    if config["n_layer"] > len(weights):  # bounds the model built below, as the shapes bound the rest
        return f"its model_config n_layer={config['n_layer']} is more blocks than it has weights; {DAMAGED}"
    if config["block_size"] > MAX_BLOCK_SIZE:
        return f"its model_config block_size={config['block_size']} is above {MAX_BLOCK_SIZE:,} positions; {DAMAGED}"
    try:
        want = weight_shapes(GPTConfig(**config))  # every other size is checked against the weights' shapes below
    except (ValueError, RuntimeError) as e:
        return f"its model_config cannot build a model ({str(e).rstrip('.')}); {DAMAGED}"
    if set(weights) != set(want):
        odd = sorted(set(weights) ^ set(want))
        return f"its weights do not match its model_config ({', '.join(odd[:3])} differ); {DAMAGED}"
    for name, shape in want.items():
        t = weights[name]
        if not isinstance(t, torch.Tensor) or t.shape != shape or not t.is_floating_point():
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            return f"its weight {name} is {got}, not a float tensor of shape {tuple(shape)}; {DAMAGED}"
    return tokenizer_problem(ckpt.get("tokenizer"), config["vocab_size"])


def weight_shapes(config):
    """{name: shape} of GPT(config).state_dict(), from one block and the final norm built on the meta device
    (all blocks are alike; the whole GPT is not built there: its normal_ init would import torch._dynamo, seconds)."""
    with torch.device("meta"):
        block = Block(config).state_dict()
        norm_f = make_norm(config).state_dict() if config.prenorm else {}
    table = {"wte.weight": (config.vocab_size, config.n_embd)}
    table.update({"wpe.weight": (config.block_size, config.n_embd)} if config.pos_encoding == "learned" else {})
    table.update({f"blocks.{i}.{k}": v.shape for i in range(config.n_layer) for k, v in block.items()})
    table.update({f"norm_f.{k}": v.shape for k, v in norm_f.items()})
    table["lm_head.weight"] = (config.vocab_size, config.n_embd)
    return {k: torch.Size(v) for k, v in table.items()}


def tokenizer_problem(tok, vocab_size):
    """A tokenizer dict (tokenize_data.tokenizer_to_dict: name, pat_str, mergeable_ranks {base64: id},
    special_tokens {name: id}) that cannot be rebuilt, or whose ids miss the embedding, in words; or None."""
    if tok is None:
        return None
    if not (isinstance(tok, dict) and isinstance(tok.get("name"), str) and isinstance(tok.get("pat_str"), str)
            and isinstance(tok.get("mergeable_ranks"), dict) and isinstance(tok.get("special_tokens"), dict)):
        return f"its tokenizer is not the dict tokenize_data.py writes (name, pat_str, ranks, specials); {DAMAGED}"
    ids = [*tok["mergeable_ranks"].values(), *tok["special_tokens"].values()]
    if not all(type(i) is int and 0 <= i < vocab_size for i in ids) or len(set(ids)) != len(ids):
        return f"its tokenizer's ids are not distinct integers below its vocab_size={vocab_size}; {DAMAGED}"
    try:
        for token in tok["mergeable_ranks"]:
            base64.b64decode(token, validate=True)
    except (ValueError, TypeError):
        return f"its tokenizer's token {token!r} is not base64; {DAMAGED}"
    return None


def lost_peer(error):
    """A collective that failed because another rank is gone (gloo's reset or closed connection: a plain
    RuntimeError naming gloo's transport; NCCL's DistError) -> the sentence that says so; else None. Under
    torchrun a rank that stopped (killed, out of memory) fails its peers' next collective: that is the news,
    not the collective's traceback."""
    if not (dist.is_initialized() and (isinstance(error, dist.DistError) or "gloo/transport" in str(error))):
        return None
    rank, world = dist.get_rank(), dist.get_world_size()
    other = f"rank {1 - rank}" if world == 2 else "another rank"
    return (f"rank {rank} of {world}: {other} stopped mid-run (killed, out of memory, or see its own message), "
            "so this one stops too")


def fast_dtype(device_type, flag="auto"):
    """--dtype FLAG on a device -> the autocast dtype: FLAG itself unless it is auto, else the one the
    device runs fastest. bfloat16 on GPUs that have it (float16 on older ones), and on CPUs whose vector
    units multiply bf16 natively (AVX512-BF16 or AMX; a training step of the CPU recipe took 0.74x the
    float32 time on one); float32 on other CPUs, where bf16 is emulated.
    Weights, gradients and optimizer state stay float32 either way; only the matmuls drop to bf16."""
    if flag != "auto":
        return flag
    if device_type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    native = [getattr(torch.cpu, probe, lambda: False)() for probe in
              ("_is_avx512_bf16_supported", "_is_amx_tile_supported")] if device_type == "cpu" else []
    return "bfloat16" if any(native) else "float32"


def pick_device(flag):
    """--device auto|cpu|cuda|cuda:N -> a device string; a GPU asked for and missing is one sentence."""
    if flag == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(flag)
    except RuntimeError:
        raise SystemExit(f"--device {flag}: not a device; use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {flag}: PyTorch sees no GPU on this machine; use --device cpu (or auto).")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise SystemExit(f"--device {flag}: only {torch.cuda.device_count()} GPU(s) visible; use cuda:0 or auto.")
    return flag


def read_checkpoint(path, flag):
    """load_checkpoint, or read_hf_folder for a Hugging Face folder; any other folder, or a hub name, is
    answered by what the user most likely meant."""
    path = str(path)
    if os.path.isfile(os.path.join(path, "config.json")):
        return read_hf_folder(path)
    if os.path.isdir(path):
        raise SystemExit(f"{flag} {path} is a folder; pass the checkpoint file in it, e.g. "
                         f"{flag} {os.path.join(path, 'ckpt.pt')}, or a Hugging Face folder with config.json.")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", path) and not path.endswith((".pt", ".pth", ".bin", ".safetensors")):
        raise SystemExit(f"{flag} {path} is neither a file nor a folder here, and nothing is downloaded: fetch "
                         f"the hub model yourself (huggingface-cli download {path} --local-dir DIR) and pass DIR.")
    return load_checkpoint(path)


# ---------------------------------------------------------------------------------------------------
# Hugging Face folders: config.json + model.safetensors in transformers' own layout, both ways.
# Three architectures cover every switch combination that has an exact counterpart (Qwen2, a Llama with
# q, k, v biases, is read too); our RoPE rotates halves (i, i + d/2) as theirs does, so q and k rows
# need no permutation.

LLAMA_NAMES = {"wte": "model.embed_tokens", "norm_f": "model.norm", "lm_head": "lm_head",
               "norm1": "input_layernorm", "norm2": "post_attention_layernorm",
               "attn.qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], "attn.proj": "self_attn.o_proj",
               "mlp.fc": ["mlp.gate_proj", "mlp.up_proj"], "mlp.proj": "mlp.down_proj"}
HF_ARCHITECTURES = {  # model_type -> the class, the layer prefix, {our module: theirs (a list: concatenated)}
    "llama": ("LlamaForCausalLM", "model.layers.", LLAMA_NAMES),
    "qwen2": ("Qwen2ForCausalLM", "model.layers.", LLAMA_NAMES),  # read only: a Llama with q, k, v biases
    "gpt2": ("GPT2LMHeadModel", "transformer.h.", {  # Conv1D layers: weights stored (in, out)
        "wte": "transformer.wte", "wpe": "transformer.wpe", "norm_f": "transformer.ln_f", "lm_head": "lm_head",
        "norm1": "ln_1", "norm2": "ln_2", "attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj",
        "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}),
    "gpt_neox": ("GPTNeoXForCausalLM", "gpt_neox.layers.", {  # qkv rows per head: [q_h | k_h | v_h]
        "wte": "gpt_neox.embed_in", "norm_f": "gpt_neox.final_layer_norm", "lm_head": "embed_out",
        "norm1": "input_layernorm", "norm2": "post_attention_layernorm",
        "attn.qkv": "attention.query_key_value", "attn.proj": "attention.dense",
        "mlp.fc": "mlp.dense_h_to_4h", "mlp.proj": "mlp.dense_4h_to_h"}),
}
HF_SIZES = {  # model_type -> their names of (n_embd, n_layer, n_head, mlp_width, block_size, norm_eps), and
    # their defaults for the last two when config.json leaves them out
    "llama": (("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
               "max_position_embeddings", "rms_norm_eps"), 2048, 1e-6),
    "qwen2": (("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
               "max_position_embeddings", "rms_norm_eps"), 32768, 1e-6),
    "gpt2": (("n_embd", "n_layer", "n_head", "n_inner", "n_positions", "layer_norm_epsilon"), 1024, 1e-5),
    "gpt_neox": (("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "max_position_embeddings", "layer_norm_eps"), 2048, 1e-5),
}
HF_ACTIVATIONS = {"gelu": ("gelu", "none"), "gelu_new": ("gelu", "tanh"), "gelu_pytorch_tanh": ("gelu", "tanh"),
                  "relu2": ("relu2", "none")}  # their hidden_act -> our (mlp, gelu_approx)
HF_BUFFERS = re.compile(r".*(attn\.bias|attn\.masked_bias|attention\.bias|attention\.masked_bias|rotary_emb\.inv_freq)")


def hf_architecture(config):
    """The model_type that computes exactly what config does; a switch none of them has is one sentence."""
    unsupported = [("logit_softcap > 0", "logit soft-capping", config.logit_softcap > 0),
                   ("qk_norm", "QK-norm without a learned scale", config.qk_norm),
                   ("pos_encoding=sinusoidal", "sinusoidal positions", config.pos_encoding == "sinusoidal"),
                   ("prenorm=False", "post-norm blocks", not config.prenorm)]
    for switch, what, on in unsupported:
        if on:
            raise SystemExit(f"this checkpoint uses {switch} ({what}), which no Hugging Face architecture "
                             "computes; only a model trained without it can be exported.")
    shape = (config.pos_encoding, config.norm, config.mlp)
    if shape == ("rope", "rmsnorm", "swiglu"):
        return "llama"
    if config.n_kv_head != config.n_head:
        raise SystemExit(f"this checkpoint's grouped-query attention (n_kv_head={config.n_kv_head}) exists in "
                         "Hugging Face's Llama only, which needs rope + rmsnorm + swiglu; it has "
                         f"{' + '.join(shape)}.")
    if config.pos_encoding == "learned" and config.norm == "layernorm" and config.mlp != "swiglu":
        return "gpt2"
    if config.pos_encoding == "rope" and config.norm == "layernorm" and config.mlp != "swiglu":
        return "gpt_neox"
    raise SystemExit(f"no Hugging Face architecture computes pos_encoding={config.pos_encoding}, norm={config.norm} "
                     f"and mlp={config.mlp} together; exportable are rope + rmsnorm + swiglu (Llama), "
                     "learned + layernorm + gelu/relu2 (GPT-2) and rope + layernorm + gelu/relu2 (GPT-NeoX).")


def hf_config(config, arch):
    """Our GPTConfig -> the config.json of arch (each architecture spells the sizes its own way)."""
    sizes = dict(zip(HF_SIZES[arch][0], (config.n_embd, config.n_layer, config.n_head, config.mlp_hidden,
                                         config.block_size, config.norm_eps)))
    act = "silu" if config.mlp == "swiglu" else "gelu_pytorch_tanh" if (config.mlp, config.gelu_approx) == (
        "gelu", "tanh") else config.mlp
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    hf = {"architectures": [HF_ARCHITECTURES[arch][0]], "model_type": arch, "vocab_size": config.vocab_size,
          **sizes, "tie_word_embeddings": config.tie_weights, "bos_token_id": None, "eos_token_id": None,
          "dtype": "float32"}
    if arch == "llama":
        return {**hf, "num_key_value_heads": config.n_kv_head, "head_dim": config.head_dim, "hidden_act": act,
                "rope_theta": config.rope_theta, "rope_scaling": None, "rope_parameters": rope,
                "attention_bias": config.bias, "mlp_bias": config.bias}
    if arch == "gpt2":  # GPT-2 always has biases: ours, or zeros
        return {**hf, "activation_function": act, "scale_attn_weights": True,
                "scale_attn_by_inverse_layer_idx": False, "attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0}
    return {**hf, "hidden_act": act, "use_parallel_residual": False, "rotary_pct": 1.0,  # gpt_neox
            "rotary_emb_base": config.rope_theta, "rope_parameters": {**rope, "partial_rotary_factor": 1.0},
            "attention_bias": True}


def config_from_hf(hf, where):
    """A config.json's dict -> (GPTConfig, model_type), or one sentence for what we cannot compute exactly."""
    arch, get = hf.get("model_type"), hf.get
    if arch not in HF_ARCHITECTURES:
        raise SystemExit(f"{where}: model_type {arch!r} is not one this project reads; it reads "
                         f"{', '.join(HF_ARCHITECTURES)}.")
    rope = get("rope_parameters") or get("rope_scaling") or {}
    theta = rope.get("rope_theta", get("rope_theta", get("rotary_emb_base", 10000.0)))
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise SystemExit(f"{where}: RoPE scaling {rope.get('rope_type', rope.get('type'))!r} is not computed "
                         "here; only plain RoPE (rope_type default) is read.")
    llama = arch in ("llama", "qwen2")
    act = get("hidden_act", get("activation_function", "silu" if llama else "gelu_new" if arch == "gpt2" else "gelu"))
    if act not in (["silu"] if llama else HF_ACTIVATIONS):
        raise SystemExit(f"{where}: activation {act!r} is not computed here in a {arch} model.")
    mlp, approx = ("swiglu", "none") if llama else HF_ACTIVATIONS[act]
    names, block_size, norm_eps = HF_SIZES[arch]
    partial = rope.get("partial_rotary_factor", get("rotary_pct", 0.25))
    refused, what = {  # the variants of each architecture that our blocks do not compute
        "llama": (get("head_dim") not in (None, get("hidden_size", 0) // get("num_attention_heads", 1)),
                  "a head_dim other than hidden_size / num_attention_heads"),
        "qwen2": (get("use_sliding_window") or "sliding_attention" in (get("layer_types") or []),
                  "sliding-window attention"),
        "gpt2": (not get("scale_attn_weights", True) or get("scale_attn_by_inverse_layer_idx", False),
                 "attention scaled other than by 1/sqrt(head_dim)"),
        "gpt_neox": (get("use_parallel_residual", True) or partial != 1,
                     "parallel residual blocks (use_parallel_residual) or rotary_pct below 1")}[arch]
    if refused:
        raise SystemExit(f"{where}: {what} is not computed here; only the plain {arch} block is.")
    try:
        n_embd, n_layer, n_head = (hf[k] for k in names[:3])
        mlp_width = get("n_inner") or 0 if arch == "gpt2" else hf[names[3]]  # GPT-2's default: 4 x n_embd
        config = GPTConfig(vocab_size=hf["vocab_size"], block_size=get(names[4], block_size), n_layer=n_layer,
                           n_head=n_head, n_kv_head=get("num_key_value_heads") or n_head, n_embd=n_embd,
                           pos_encoding="learned" if arch == "gpt2" else "rope", rope_theta=theta,
                           norm="rmsnorm" if llama else "layernorm", norm_eps=get(names[5], norm_eps),
                           mlp=mlp, gelu_approx=approx, mlp_width=mlp_width,
                           tie_weights=get("tie_word_embeddings", arch == "gpt2"))
    except KeyError as e:
        raise SystemExit(f"{where} has no {e.args[0]}; it is not a complete {arch} config.json.") from None
    except ValueError as e:  # GPTConfig's own checks
        raise SystemExit(f"{where}: {e}") from None
    rule = GPTConfig(**{**asdict(config), "mlp_width": 0}).mlp_hidden
    return GPTConfig(**{**asdict(config), "mlp_width": 0 if config.mlp_width == rule else config.mlp_width}), arch


def hf_names(arch, ours):
    """Our tensor name -> the HF names it is made of (several: concatenated along the output rows)."""
    _, layers, modules = HF_ARCHITECTURES[arch]
    block = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", ours)
    module, kind = (block[2], block[3]) if block else ours.rsplit(".", 1)
    theirs = modules[module]
    prefix = f"{layers}{block[1]}." if block else ""
    return [f"{prefix}{t}.{kind}" for t in ([theirs] if isinstance(theirs, str) else theirs)]


def neox_qkv(t, n_head, to_hf):
    """Rows [q heads | k heads | v heads] <-> GPT-NeoX's [q_0 k_0 v_0 | q_1 k_1 v_1 | ...]."""
    rest = t.shape[1:]
    if to_hf:
        return t.reshape(3, n_head, -1, *rest).transpose(0, 1).reshape(t.shape)
    return t.reshape(n_head, 3, -1, *rest).transpose(0, 1).reshape(t.shape)


def hf_state_dict(config, state, arch):
    """Our state dict -> {HF tensor name: tensor}; a tied head is the embedding, stored once."""
    out = {}
    for name, t in state.items():
        if name == "lm_head.weight" and config.tie_weights:
            continue
        if arch != "llama" and not config.bias and name.endswith(".weight") and name.startswith(("blocks.", "norm_f")):
            out.update(dict.fromkeys(hf_names(arch, name[:-6] + "bias"), torch.zeros(t.shape[0], dtype=t.dtype)))
        if arch == "gpt2" and name.startswith("blocks.") and t.dim() == 2:
            t = t.t()
        if arch == "gpt_neox" and ".attn.qkv." in name:
            t = neox_qkv(t, config.n_head, to_hf=True)
        names = hf_names(arch, name)
        q, kv = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
        rows = {1: [t.shape[0]], 2: [t.shape[0] // 2] * 2, 3: [q, kv, kv]}[len(names)]  # whole, [gate|up], [q|k|v]
        out.update({n: part.contiguous().clone() for n, part in zip(names, t.split(rows))})
    return out



def state_from_hf(config, arch, tensors, where):
    """{HF tensor name: tensor} -> our state dict for config; a missing tensor or a wrong shape is one sentence.
    A bias their layer lacks (Llama without attention_bias, ...) is zero, which is what their layer computes."""
    state, used = {}, set()
    expected = weight_shapes(config)
    for name, shape in expected.items():
        if name == "lm_head.weight" and config.tie_weights:
            continue
        names = hf_names(arch, name)
        if name == "lm_head.weight" and names[0] not in tensors:
            names = ["lm_head.weight"]  # GPT-NeoX saved by transformers 5 names its head so
        missing = [n for n in names if n not in tensors]
        if missing and name.endswith(".bias"):
            state[name] = torch.zeros(shape)
            continue
        if missing:
            raise SystemExit(f"{where} has no tensor {missing[0]}; the weights are incomplete or not this "
                             "config.json's.")
        used.update(names)
        t = torch.cat([tensors[n] for n in names]).float()
        if arch == "gpt2" and name.startswith("blocks.") and t.dim() == 2:
            t = t.t()
        if t.shape != shape:
            raise SystemExit(f"{where}: tensor {names[0]} has shape {tuple(tensors[names[0]].shape)}, which "
                             "config.json's sizes do not give; the config and the weights disagree.")
        if arch == "gpt_neox" and ".attn.qkv." in name:
            t = neox_qkv(t, config.n_head, to_hf=False)
        state[name] = t.contiguous()
    if config.tie_weights:  # a head stored beside tied embeddings is ignored, as transformers ignores it
        used.update(["lm_head.weight", hf_names(arch, "lm_head.weight")[0]])
    unused = sorted(n for n in set(tensors) - used  # zero biases are what bias=False computes
                    if not HF_BUFFERS.fullmatch(n) and not (n.endswith(".bias") and not tensors[n].any()))
    if unused:
        raise SystemExit(f"{where} holds tensors this architecture does not use (e.g. {unused[0]}); "
                         "it is not the model config.json describes.")
    if config.tie_weights:
        state["lm_head.weight"] = state["wte.weight"]
    return state


def read_hf_folder(folder):
    """A Hugging Face folder (config.json, model.safetensors, tokenizer.json) -> a checkpoint dict as ours."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    config_path = os.path.join(folder, "config.json")
    try:
        hf = json.load(open(config_path, encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SystemExit(f"{config_path} cannot be read as JSON ({e}); pass a folder that save_pretrained wrote.")
    index_path = os.path.join(folder, "model.safetensors.index.json")
    files = ["model.safetensors"]
    if os.path.isfile(index_path):  # sharded: the index names each tensor's file
        files = sorted(set(json.load(open(index_path, encoding="utf-8"))["weight_map"].values()))
    elif not os.path.isfile(os.path.join(folder, files[0])):
        raise SystemExit(f"{folder} holds no model.safetensors; only safetensors weights are read (re-save "
                         "the model with save_pretrained(folder, safe_serialization=True)).")
    tensors = {}
    for name in files:
        try:
            tensors.update(load_file(os.path.join(folder, name)))
        except (SafetensorError, OSError) as e:
            raise SystemExit(f"{os.path.join(folder, name)} cannot be read ({e}): the file is cut short or "
                             "damaged; copy or save it again.") from None
    config, arch = config_from_hf(hf, config_path)
    if arch == "gpt2" and not any(k.startswith("transformer.") for k in tensors):  # the original GPT-2 files
        tensors = {(k if k.startswith("lm_head") else "transformer." + k): v for k, v in tensors.items()}
    if any(k.endswith(".bias") and v.dim() == 1 and v.any() for k, v in tensors.items()):
        config = GPTConfig(**{**asdict(config), "bias": True})
    tokenizer = None
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        import tokenize_data  # the tokenizer's owner: byte-level BPE into a tiktoken Encoding, or a sentence
        tokenizer = tokenize_data.tokenizer_to_dict(tokenize_data.encoding_from_hf(folder))
    ckpt = {"format": CHECKPOINT_FORMAT, "model_config": asdict(config), "tokenizer": tokenizer,
            "model": state_from_hf(config, arch, tensors, folder), "hf_folder": os.path.abspath(folder)}
    problem = checkpoint_problem(ckpt)  # the checks every checkpoint passes (a tokenizer beyond the vocabulary)
    if problem:
        raise SystemExit(f"{folder}: {problem.replace('train.py or align.py wrote', 'this project reads')}.")
    return ckpt
