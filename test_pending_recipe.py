"""Tests for train.py's --optimizer muon (issue 16), to be folded into test_all.py.

    OMP_NUM_THREADS=1 python -m pytest -q test_pending_recipe.py

The Newton-Schulz iteration is checked against exact linear algebra (an SVD in float64), a Muon step
against a hand-written reference, and train.py's promises under Muon (exact resume, data, tensor and
pipeline parallelism equal to one process) against a single uninterrupted process. Training runs use a
byte-level data dir (vocab 256) cut from testdata/hamlet.txt.
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import train  # noqa: E402
from model import GPT, GPTConfig, load_checkpoint  # noqa: E402

HAMLET = ROOT / "testdata" / "hamlet.txt"
TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "4",
        "--eval-steps", "2", "--warmup-steps", "2", "--device", "cpu", "--optimizer", "muon", "--lr", "3e-3"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def byte_data(tmp_path_factory):
    """Byte-level data dir as tokenize_data.py lays it out: uint16 train.bin / val.bin, meta.json."""
    if not HAMLET.is_file():
        pytest.fail(f"{HAMLET} is missing: the tests read their text from the repository's testdata/.")
    ids = np.frombuffer(HAMLET.read_bytes()[:40_000], dtype=np.uint8).astype(np.uint16)
    n_train, path = int(len(ids) * 0.9), tmp_path_factory.mktemp("byte_data")
    ids[:n_train].tofile(path / "train.bin")
    ids[n_train:].tofile(path / "val.bin")
    meta = {"vocab_size": 256, "dtype": "uint16", "train_tokens": n_train, "val_tokens": len(ids) - n_train,
            "train_bytes": n_train, "val_bytes": len(ids) - n_train}
    (path / "meta.json").write_text(json.dumps(meta))
    return path


def read_log(out):
    return [json.loads(line) for line in open(Path(out) / "log.jsonl")]


def checkpoint(out):
    return load_checkpoint(str(Path(out) / "ckpt.pt"))


def torchrun(nproc, *args, timeout=600):
    """train.py under torchrun with nproc CPU ranks (gloo); it must succeed. A hang fails the test."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "train.py"), *map(str, args)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun train.py did not finish in {timeout} s: {stderr[-3000:]}")
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return stdout


def assert_close_state(got, want, what, rtol=1e-5, atol=1e-6):
    """Two state dicts (nested: an optimizer's state too) with the same keys and close tensors."""
    if isinstance(want, dict):
        assert set(got) == set(want), f"{what}: keys differ: {set(got) ^ set(want)}"
        for k in want:
            assert_close_state(got[k], want[k], f"{what}.{k}", rtol, atol)
    elif isinstance(want, torch.Tensor):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


# --- Newton-Schulz against the SVD ------------------------------------------------------------------

def with_spectrum(m, n, condition, seed):
    """(m, n) float64 matrix with random singular vectors and singular values from 1 down to 1/condition."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    k = min(m, n)
    S = torch.logspace(0, -np.log10(condition), k, dtype=torch.float64)
    return (U[:, :k] * S) @ V[:, :k].T


@pytest.mark.parametrize("m,n", [(8, 8), (16, 48), (48, 16), (96, 32)])
def test_newton_schulz_gives_the_svds_directions_with_singular_values_near_one(m, n):
    G = with_spectrum(m, n, condition=100, seed=m * n)
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    O = train.orthogonalize(G.float()).double()                        # what Muon steps along
    # the same singular vectors: U^T O V is diagonal (off-diagonal at float32 rounding)
    inner = U.T @ O @ Vh.T
    off_diagonal = inner - torch.diag(torch.diagonal(inner))
    assert off_diagonal.abs().max() < 1e-4
    # singular values in the band the quintic promises (not exactly 1: it trades that for speed)
    s = torch.linalg.svdvals(O)
    assert 0.6 < s.min() and s.max() < 1.25, (s.min(), s.max())
    exact = U @ Vh                                                      # the exact orthogonalisation
    cosine = (O * exact).sum() / (O.norm() * exact.norm())
    assert cosine > 0.97
    # and in exact arithmetic the iteration is s -> p(p(p(p(p(s / |G|_F))))) on each singular value
    a, b, c = train.NS_COEFFICIENTS
    x = S / (G.norm() + 1e-7)
    for _ in range(5):
        x = a * x + b * x ** 3 + c * x ** 5
    torch.testing.assert_close(train.orthogonalize(G), (U * x) @ Vh, rtol=0, atol=1e-10)


# --- Muon's step against a hand-written one; its AdamW groups against torch.optim.AdamW ---------------

def exact_newton_schulz(M):
    """The float64 reference of orthogonalize(M): p^5 applied to the singular values through an SVD."""
    U, S, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    a, b, c = train.NS_COEFFICIENTS
    x = S / (M.double().norm() + 1e-7)
    for _ in range(5):
        x = a * x + b * x ** 3 + c * x ** 5
    return (U * x) @ Vh


def test_muon_step_matches_a_hand_written_reference():
    torch.manual_seed(0)
    w0, grads = torch.randn(6, 2), [torch.randn(6, 2) for _ in range(4)]
    w = torch.nn.Parameter(w0.clone())
    w.muon_sections = [4, 2]  # two fused maps: 4x2 (tall: scale sqrt(2)) and 2x2 (scale 1)
    lr, mu, wd = 0.02, 0.9, 0.1
    opt = train.Muon([dict(params=[w], muon=True, weight_decay=wd)], lr, momentum=mu)
    ref, buf = w0.double(), torch.zeros(6, 2, dtype=torch.float64)
    for g in grads:
        w.grad = g.clone()
        opt.step()
        buf = mu * buf + g.double()
        look_ahead = g.double() + mu * buf
        update = torch.cat([exact_newton_schulz(look_ahead[:4]) * 2 ** 0.5, exact_newton_schulz(look_ahead[4:])])
        ref = ref * (1 - lr * wd) - lr * update
    torch.testing.assert_close(w.detach().double(), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(opt.state[w]["momentum_buffer"].double(), buf, rtol=0, atol=1e-5)


def test_muons_adamw_groups_step_as_torch_adamw():
    torch.manual_seed(1)
    start = [torch.randn(5, 3), torch.randn(3)]
    ours, theirs = ([torch.nn.Parameter(t.clone()) for t in start] for _ in range(2))
    groups = lambda ps: [dict(params=[ps[0]], weight_decay=0.1), dict(params=[ps[1]], weight_decay=0.0)]
    opt_ours = train.Muon(groups(ours), lr=1e-2)
    opt_theirs = torch.optim.AdamW(groups(theirs), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    for _ in range(5):
        grads = [torch.randn_like(t) for t in start]
        for params, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert set(opt_ours.state[ours[0]]) == set(opt_theirs.state[theirs[0]])  # the same state names


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    config = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, mlp="swiglu",
                       tie_weights=False, pos_encoding="learned", bias=True)
    model = GPT(config)
    opt = train.make_optimizer(model, train.TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.05, weight_decay=0.1))
    names = {p: n for n, p in model.named_parameters()}
    muon, decayed, plain = ({names[p] for p in g["params"]} for g in opt.param_groups)
    assert muon == {f"blocks.{i}.{m}.weight" for i in range(2) for m in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")}
    assert decayed == {"wte.weight", "wpe.weight", "lm_head.weight"}
    assert plain == {n for n, p in model.named_parameters() if p.dim() == 1} and len(plain) == 2 * 8 + 2
    assert [g["muon"] for g in opt.param_groups] == [True, False, False]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.1, 0.0]
    # fused maps are orthogonalised one by one: [q | k | v] rows, SwiGLU's [gate | up]
    assert model.blocks[0].attn.qkv.weight.muon_sections == [32, 16, 16]
    assert model.blocks[0].mlp.fc.weight.muon_sections == [config.mlp_hidden] * 2
    # the schedule's lr reaches Muon's group scaled by --muon-lr / --lr
    train.set_learning_rate(opt, 5e-4, train.TrainConfig(lr=1e-3, muon_lr=0.05))
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(0.025), 5e-4, 5e-4]


# --- train.py's promises under --optimizer muon ----------------------------------------------------------

def test_muon_run_resumed_equals_the_uninterrupted_run(tmp_path, byte_data):
    common = ["--data-dir", byte_data, *TINY, "--eval-interval", 3]
    train.main([*map(str, common), "--out-dir", str(tmp_path / "full"), "--max-steps", "7"])
    train.main([*map(str, common), "--out-dir", str(tmp_path / "part"), "--max-steps", "3"])
    train.main(["--out-dir", str(tmp_path / "part"), "--resume", "--max-steps", "7"])
    full, part = checkpoint(tmp_path / "full"), checkpoint(tmp_path / "part")
    assert [r["loss"] for r in read_log(tmp_path / "part")] == [r["loss"] for r in read_log(tmp_path / "full")]
    for k in full["model"]:
        assert torch.equal(part["model"][k], full["model"][k]), k
    assert_close_state(part["optimizer"]["state"], full["optimizer"]["state"], "optimizer", rtol=0, atol=0)
    assert any("momentum_buffer" in s for s in full["optimizer"]["state"].values())


def test_resume_with_another_optimizer_is_one_sentence(tmp_path, byte_data):
    common = ["--data-dir", str(byte_data), "--out-dir", str(tmp_path), *TINY]
    train.main(common + ["--max-steps", "1"])
    with pytest.raises(SystemExit) as e:
        train.main(common + ["--resume", "--max-steps", "2", "--optimizer", "adamw"])
    assert "--optimizer adamw differs from the checkpoint's muon" in str(e.value.code)
    with pytest.raises(SystemExit, match="--muon-lr"):
        train.main(common + ["--muon-lr", "0"])


def test_muon_ddp_two_ranks_equals_one_process(tmp_path, byte_data):
    flags = ["--data-dir", byte_data, *TINY, "--max-steps", 3, "--eval-interval", 2, "--grad-accum", 2]
    train.main([*map(str, flags), "--out-dir", str(tmp_path / "one"), "--batch-size", "4"])
    torchrun(2, *flags, "--out-dir", tmp_path / "two", "--batch-size", 2)
    one, two = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    for a, b in zip(one, two, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a.get("val_loss", 0) - b.get("val_loss", 0)) < 1e-5
    assert_close_state(checkpoint(tmp_path / "two")["model"], checkpoint(tmp_path / "one")["model"], "weights",
                       atol=1e-5)


def test_muon_tp2_pp2_equals_one_process_and_resumes_in_one(tmp_path, byte_data):
    # tp shards are gathered whole before Newton-Schulz; stages hold whole matrices. A small lr keeps
    # float rounding (the all-reduce order) from growing past atol, as in test_all's layout tests.
    flags = ["--data-dir", byte_data, "--n-layer", 4, "--n-head", 4, "--n-kv-head", 2, "--n-embd", 32,
             "--mlp", "swiglu", "--block-size", 16, "--batch-size", 2, "--grad-accum", 3, "--max-steps", 3,
             "--eval-interval", 2, "--eval-steps", 2, "--warmup-steps", 1, "--lr", 1e-5, "--min-lr", 1e-5,
             "--muon-lr", 1e-4, "--optimizer", "muon", "--device", "cpu"]
    one, par = tmp_path / "one", tmp_path / "tp2pp2"
    train.main([*map(str, flags), "--out-dir", str(one)])
    assert "dp 1 x tp 2 x pp 2" in torchrun(4, *flags, "--out-dir", par, "--tp", 2, "--pp", 2)
    for key in ("loss", "val_loss"):
        want = [e[key] for e in read_log(one) if key in e]
        torch.testing.assert_close([e[key] for e in read_log(par) if key in e], want, rtol=1e-5, atol=1e-6)
    a, b = checkpoint(one), checkpoint(par)
    assert_close_state(b["model"], a["model"], "weights")
    assert_close_state(b["optimizer"]["state"], a["optimizer"]["state"], "optimizer state", atol=1e-5)
    # the parallel run's checkpoint (momentum buffers gathered whole) resumes in one process
    train.main([*map(str, flags), "--out-dir", str(one), "--resume", "--max-steps", "4"])
    train.main([*map(str, flags), "--out-dir", str(par), "--resume", "--max-steps", "4", "--tp", "1", "--pp", "1"])
    assert_close_state(checkpoint(par)["model"], checkpoint(one)["model"], "resumed weights")
