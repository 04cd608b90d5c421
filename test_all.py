import math
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, REPO)

from model import (GPT, GPTConfig, KVCache, filter_logits, load_checkpoint, naive_attention,  # noqa: E402
                   save_checkpoint)


def _model_tiny(**overrides):
    torch.manual_seed(0)
    cfg = dict(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
    cfg.update(overrides)
    return GPT(GPTConfig(**cfg))


OPTIONS = [dict(pos_encoding="rope"), dict(pos_encoding="learned"), dict(pos_encoding="sinusoidal"),
           dict(norm="rmsnorm"), dict(prenorm=False), dict(mlp="swiglu"), dict(tie_weights=False),
           dict(bias=True), dict(n_kv_head=1), dict(n_kv_head=4)]


@pytest.mark.parametrize("attn_impl", ["sdpa", "naive"])
@pytest.mark.parametrize("options", OPTIONS[:4], ids=str)
def test_model_causality(attn_impl, options):
    """Changing token t+1 leaves every logit at positions <= t unchanged."""
    model = _model_tiny(attn_impl=attn_impl, **options).eval()
    idx = torch.randint(0, 64, (2, 20))
    changed = idx.clone()
    changed[:, 11] = (changed[:, 11] + 1) % 64
    a, _ = model(idx)
    b, _ = model(changed)
    assert torch.equal(a[:, :11], b[:, :11])
    assert not torch.allclose(a[:, 11:], b[:, 11:])


@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_model_naive_equals_sdpa(options):
    sdpa = _model_tiny(**options).eval()
    naive = GPT(GPTConfig(**{**vars(sdpa.config), "attn_impl": "naive"})).eval()
    naive.load_state_dict(sdpa.state_dict())
    idx = torch.randint(0, 64, (3, 25))
    torch.testing.assert_close(naive(idx)[0], sdpa(idx)[0], rtol=1e-5, atol=1e-5)


def test_model_naive_attention_matches_formula():
    """The reference itself against an explicit per-query loop over the positions it may see."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)
    out = naive_attention(q, k, v)  # 5 new queries after 2 cached positions
    for i in range(5):
        seen = 2 + i + 1
        w = torch.softmax(q[:, :, i:i + 1] @ k[:, :, :seen].transpose(-1, -2) / math.sqrt(8), dim=-1)
        torch.testing.assert_close(out[:, :, i:i + 1], w @ v[:, :, :seen])


@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_model_every_option_trains(options):
    """A few AdamW steps on one fixed batch lower the loss, for every architectural option."""
    model = _model_tiny(**options)
    idx = torch.randint(0, 64, (4, 17))
    opt = model.configure_optimizers(0.1, 3e-3)
    losses = []
    for _ in range(8):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses


def test_model_init_loss_near_ln_vocab():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=2048, block_size=64, n_layer=2, n_head=4, n_embd=64))
    idx = torch.randint(0, 2048, (8, 65))
    _, loss = model(idx[:, :-1], idx[:, 1:])
    assert abs(loss.item() - math.log(2048)) < 0.1


def test_model_ignores_minus_one_targets():
    model = _model_tiny()
    idx = torch.randint(0, 64, (2, 10))
    targets = idx.clone()
    targets[:, :6] = -1
    logits, loss = model(idx, targets)
    expected = torch.nn.functional.cross_entropy(logits[:, 6:].reshape(-1, 64), targets[:, 6:].reshape(-1))
    torch.testing.assert_close(loss, expected)


def test_model_gqa_shapes():
    model = _model_tiny(n_head=4, n_kv_head=2, n_embd=32)
    attn = model.blocks[0].attn
    assert attn.qkv.weight.shape == ((4 + 2 * 2) * 8, 32)
    cache = KVCache(model.config, 3, 32, "cpu", torch.float32)
    assert cache.k.shape == (2, 3, 2, 32, 8)
    model(torch.randint(0, 64, (3, 5)), kv_cache=cache)
    assert cache.pos == 5


@pytest.mark.parametrize("options", [dict(), dict(pos_encoding="learned", n_kv_head=1),
                                     dict(pos_encoding="sinusoidal", prenorm=False)], ids=str)
def test_model_kv_cache_matches_recompute(options):
    """Cached logits equal full-sequence logits; cached tokens equal uncached, across block_size too."""
    model = _model_tiny(**options).eval()
    idx = torch.randint(0, 64, (2, 24))
    cache = KVCache(model.config, 2, 32, "cpu", torch.float32)
    pieces = [model(idx[:, :9], kv_cache=cache)[0], model(idx[:, 9:14], kv_cache=cache)[0]]
    pieces += [model(idx[:, t:t + 1], kv_cache=cache)[0] for t in range(14, 24)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), model(idx)[0], rtol=1e-5, atol=1e-5)
    for temperature in (0.0, 1.0):
        runs = [model.generate(idx[:, :4], 45, temperature=temperature, top_k=20, use_cache=use_cache,
                               generator=torch.Generator().manual_seed(7)) for use_cache in (True, False)]
        assert runs[0].shape == (2, 49)
        assert torch.equal(runs[0], runs[1])


def test_model_generate_stops_at_eos_and_keeps_prompt():
    model = _model_tiny().eval()
    prompt = torch.randint(0, 64, (1, 5))
    first = model.generate(prompt, 1, temperature=0)[0, -1].item()
    out = model.generate(prompt, 20, temperature=0, eos_token=first)
    assert torch.equal(out[:, :5], prompt) and out.shape == (1, 6) and out[0, -1].item() == first


def test_model_prompt_longer_than_block_is_refused_by_forward():
    model = _model_tiny()
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_model_filter_logits_against_reference():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    k_out = filter_logits(logits, top_k=5)
    for row, out in zip(logits, k_out):
        keep = set(row.argsort(descending=True)[:5].tolist())
        assert {i for i in range(50) if out[i] > float("-inf")} == keep
    p_out = filter_logits(logits, top_p=0.6)
    for row, out in zip(logits, p_out):
        probs = torch.softmax(row, -1).tolist()
        order = sorted(range(50), key=lambda i: -probs[i])
        keep, mass = set(), 0.0
        for i in order:  # the smallest prefix of the ranking whose mass reaches 0.6
            keep.add(i)
            mass += probs[i]
            if mass >= 0.6:
                break
        assert {i for i in range(50) if out[i] > float("-inf")} == keep
    assert torch.equal(filter_logits(logits, top_k=0, top_p=1.0), logits)


def test_model_config_refuses_bad_shapes():
    with pytest.raises(ValueError, match="divisible by n_head"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="divisible by n_kv_head"):
        GPTConfig(n_head=4, n_kv_head=3)
    with pytest.raises(ValueError, match="pos_encoding"):
        GPTConfig(pos_encoding="alibi")


def test_model_optimizer_decays_only_matrices():
    model = _model_tiny(bias=True)
    opt = model.configure_optimizers(0.1, 1e-3)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_model_flops_per_token_counts_matmuls():
    model = _model_tiny(n_head=4, n_kv_head=4, tie_weights=False)
    c = model.config
    per_layer = 3 * c.n_embd * c.n_embd + c.n_embd * c.n_embd + 2 * 4 * c.n_embd * c.n_embd
    expected = 6 * (c.n_layer * per_layer + c.n_embd * c.vocab_size) + 12 * c.n_layer * c.n_embd * 16
    assert model.flops_per_token(16) == expected


def test_model_checkpoint_round_trip(tmp_path):
    model = _model_tiny(pos_encoding="learned", mlp="swiglu").eval()
    path = tmp_path / "ckpt.pt"
    save_checkpoint(str(path), model, step=3, tokenizer=None)
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left behind
    loaded = GPT.from_checkpoint(str(path)).eval()
    idx = torch.randint(0, 64, (2, 10))
    assert torch.equal(loaded(idx)[0], model(idx)[0])
    assert load_checkpoint(str(path))["step"] == 3


def test_model_bad_checkpoints_are_one_sentence(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        load_checkpoint(str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="not a checkpoint"):
        load_checkpoint(str(tmp_path / "junk.pt"))
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match="is not a"):
        load_checkpoint(str(tmp_path / "other.pt"))


def _model_run_sample(args):
    return subprocess.run([sys.executable, os.path.join(REPO, "sample.py"), *args],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_model_sample_script_end_to_end(tmp_path):
    """sample.py on a byte-level model: the prompt comes back, then exactly the greedy continuation."""
    model = _model_tiny(vocab_size=256, block_size=64).eval()
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, model, tokenizer=None)
    prompt = "Hi there"
    run = _model_run_sample(["--ckpt", path, "--prompt", prompt, "--max-new-tokens", "12", "--temperature", "0"])
    assert run.returncode == 0, run.stderr
    ids = torch.tensor([list(prompt.encode())])
    expected = bytes(model.generate(ids, 12, temperature=0)[0, len(prompt):].tolist())
    assert run.stdout == prompt + expected.decode("utf-8", errors="replace") + "\n"
    sampled = _model_run_sample(["--ckpt", path, "--prompt", "x", "--max-new-tokens", "5",
                                 "--num-samples", "2", "--top-k", "5", "--top-p", "0.9"])
    assert sampled.returncode == 0 and sampled.stdout.count("--- sample") == 2
    long_file = tmp_path / "long.txt"
    long_file.write_text("a" * 100)
    cropped = _model_run_sample(["--ckpt", path, "--prompt", f"FILE:{long_file}", "--max-new-tokens", "3"])
    assert cropped.returncode == 0 and "cropped" in cropped.stderr
    missing = _model_run_sample(["--ckpt", str(tmp_path / "nope.pt")])
    assert missing.returncode != 0 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr
