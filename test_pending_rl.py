"""Pending tests for align.py --method grpo and the RL questions of plays.py (issue 15), to be folded into
test_all.py. They read only the repository and the temporary folders they create.

    python -m pytest -q test_pending_rl.py
"""
import json
import math
import sys
from pathlib import Path

import pytest
import tiktoken
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import align  # noqa: E402
import plays  # noqa: E402
import sample  # noqa: E402
from model import GPT, GPTConfig, load_checkpoint, save_checkpoint  # noqa: E402
from tokenize_data import SPECIAL_TOKENS, tokenizer_to_dict  # noqa: E402

# A byte-level tokenizer with the reserved special tokens after the 256 bytes: ids 256..260.
ENC = tiktoken.Encoding("bytes", pat_str=r"\S+|\s+", mergeable_ranks={bytes([i]): i for i in range(256)},
                        special_tokens={name: 256 + i for i, name in enumerate(SPECIAL_TOKENS)})
END = 260


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=261, block_size=32, n_layer=1, n_head=2, n_embd=32))


def tiny_ckpt(path, seed=0):
    save_checkpoint(str(path), tiny_model(seed), tokenizer=tokenizer_to_dict(ENC), stage="pretrain")
    return str(path)


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def log_rows(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------
# The reward, the advantages, the loss

def test_reward_is_exact_up_to_whitespace_and_case_and_never_pays_a_cut_off_answer():
    assert align.reward("  Hamlet \n", "Hamlet") == 1.0
    assert align.reward("king  henry\nv", "King Henry V") == 1.0
    assert align.reward("Hamlet.", "Hamlet") == 0.0          # punctuation is not whitespace
    assert align.reward("Hamlet Hamlet", "Hamlet") == 0.0
    assert align.reward("", "Hamlet") == 0.0
    assert align.reward("Hamlet", "Hamlet", finished=False) == 0.0
    # the decoded completion loses its <|end|>; one cut off at the limit earns nothing even when right
    right, cut = ENC.encode_ordinary("Hamlet") + [END], ENC.encode_ordinary("Hamlet")
    assert align.rewards_of(ENC, [right, cut, [END]], [True, False, True], ["hamlet"] * 3) == [1.0, 0.0, 0.0]


def test_group_advantages_are_reward_minus_group_mean_and_zero_when_all_score_the_same():
    rewards = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    adv = align.group_advantages(rewards)
    assert torch.equal(adv[:2], torch.zeros(2, 4))
    assert torch.allclose(adv[2], torch.tensor([0.75, -0.25, -0.25, -0.25]))


def test_policy_gradient_loss_by_hand_on_numbers():
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.25, -4.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [False, True, True]])
    adv = torch.tensor([0.5, -1.5])
    loss = align.policy_gradient_loss(logp, mask, adv)
    want = -(0.5 * (-1.0 - 2.0) + -1.5 * (-0.25 - 4.0)) / 2
    assert abs(loss.item() - want) < 1e-6
    loss.backward()
    assert torch.allclose(logp.grad, -adv[:, None] * mask / 2)  # masked tokens get no gradient
    # with the KL term: k3 = e^(ref - logp) - (ref - logp) - 1 per unmasked token
    ref = torch.tensor([[-1.5, -2.0, 3.0], [9.0, -0.75, -3.0]])
    k3 = lambda r, p: math.exp(r - p) - (r - p) - 1  # noqa: E731
    loss = align.policy_gradient_loss(logp, mask, adv, ref, beta=0.1)
    want_kl = want + 0.1 * (k3(-1.5, -1.0) + k3(-2.0, -2.0) + k3(-0.75, -0.25) + k3(-3.0, -4.0)) / 2
    assert abs(loss.item() - want_kl) < 1e-6


def test_grpo_loss_on_a_padded_batch_equals_each_sequence_scored_alone():
    """Prompts of different lengths; one answer finished right, one right but cut off at M = 3 (no
    reward), one that ended at once: padded together, only completion tokens may count."""
    model, ref = tiny_model(0), tiny_model(1)
    prompts = [[1, 2, 3, 4], [5, 6], [5, 6]]
    completions = [[72, 105, END], [72, 105, 33], [END]]
    finished = [c[-1] == END for c in completions]
    rewards = torch.tensor([align.rewards_of(ENC, completions, finished, ["Hi"] * 3)])        # one group
    assert rewards.tolist() == [[1.0, 0.0, 0.0]]
    adv = align.group_advantages(rewards).flatten()
    x, y = align.completion_batch(prompts, completions, "cpu")
    assert (y >= 0).sum(dim=1).tolist() == [3, 3, 1]
    logp, ref_logp = align.token_logprobs(model, x, y), align.token_logprobs(ref, x, y).detach()
    for beta in (0.0, 0.2):
        loss = align.policy_gradient_loss(logp, y >= 0, adv, ref_logp, beta)
        want = 0.0
        for p, c, a in zip(prompts, completions, adv.tolist()):  # each sequence alone, no padding
            seq = torch.tensor([p + c])
            lp = F.log_softmax(model(seq)[0][0], dim=-1)
            lr = F.log_softmax(ref(seq)[0][0], dim=-1)
            for t, tok in enumerate(c):  # completion token t is predicted at position len(p) - 1 + t
                pos = len(p) - 1 + t
                d = (lr[pos, tok] - lp[pos, tok]).item()
                want -= a * lp[pos, tok].item() - beta * (math.exp(d) - d - 1)
        assert abs(loss.item() - want / 3) < 1e-5


def test_rollout_batches_by_prompt_length_and_cuts_at_end_or_the_limit():
    model = tiny_model(0).eval()
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8], [9]]
    completions, finished = align.rollout(model, prompts, 1, 5, 0.0, END)
    for p, c, done in zip(prompts, completions, finished):  # greedy: the same as one prompt at a time
        alone = model.generate(torch.tensor([p]), 5, temperature=0)[0, len(p):].tolist()
        want = alone[:alone.index(END) + 1] if END in alone else alone
        assert c == want and done == (END in alone)
    # sampled: G per prompt, prompt-major; the same generator state gives the same samples
    one = align.rollout(model, prompts, 3, 4, 1.0, END, torch.Generator().manual_seed(5))
    two = align.rollout(model, prompts, 3, 4, 1.0, END, torch.Generator().manual_seed(5))
    assert one == two and len(one[0]) == 12 and all(len(c) <= 4 for c in one[0])


# ------------------------------------------------------------------------------------------------
# align.py --method grpo as a user runs it

def sft_then_questions(tmp_path):
    """A tiny model taught by SFT to answer "A", "B", "C" or "D" (and stop), a quarter each; the reward
    pays "C" only, so only RL can lift it above a quarter."""
    init = tiny_ckpt(tmp_path / "init.pt")
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": p, "response": a} for p in ("pick one", "choose")
                                               for a in "ABCD"])
    align.main(["--method", "sft", "--init", init, "--data", sft, "--eval-fraction", "0", "--max-steps", "60",
                "--batch-size", "8", "--lr", "1e-2", "--out-dir", str(tmp_path / "sft")])
    rl = write_jsonl(tmp_path / "rl.jsonl", [{"prompt": "pick one", "answer": "c", "task": "pick"},
                                             {"messages": [{"role": "user", "content": "choose"}], "answer": "C",
                                              "task": "choose"}])
    return str(tmp_path / "sft" / "ckpt.pt"), rl


def test_grpo_raises_the_reward_on_a_tiny_learnable_task(tmp_path, capsys):
    init, rl = sft_then_questions(tmp_path)
    align.main(["--method", "grpo", "--init", init, "--data", rl, "--val-data", rl, "--max-steps", "20",
                "--batch-size", "2", "--group-size", "8", "--max-new-tokens", "4", "--lr", "1e-2",
                "--warmup-steps", "0", "--out-dir", str(tmp_path / "rl")])
    rows = log_rows(tmp_path / "rl")
    steps, evals = [r for r in rows if "reward" in r], [r for r in rows if "val_accuracy" in r]
    assert [r["step"] for r in steps] == list(range(1, 21)) and [r["step"] for r in evals] == [0, 20]
    first, last = sum(r["reward"] for r in steps[:3]) / 3, sum(r["reward"] for r in steps[-3:]) / 3
    assert 0.05 < first < 0.5 and last > 0.85, (first, last)
    assert 0.1 < evals[0]["val_pass@1"] < 0.4 and evals[-1]["val_pass@1"] > 0.9
    assert evals[-1]["val_accuracy"] == evals[-1]["val_pass@8"] == 1.0
    assert evals[-1]["val_accuracy_pick"] == evals[-1]["val_accuracy_choose"] == 1.0
    assert {"completion_len", "truncated", "no_signal", "loss", "lr"} <= set(steps[0])
    assert load_checkpoint(str(tmp_path / "rl" / "ckpt.pt"))["stage"] == "grpo"
    capsys.readouterr()  # sample.py chats with the RL checkpoint through the same template
    sample.main(["--ckpt", str(tmp_path / "rl" / "ckpt.pt"), "--chat", "--prompt", "choose", "--temperature", "0"])
    assert capsys.readouterr().out == "C\n"


def test_grpo_max_steps_0_only_evaluates_the_init_model(tmp_path):
    init, rl = sft_then_questions(tmp_path)
    align.main(["--method", "grpo", "--init", init, "--data", rl, "--val-data", rl, "--max-steps", "0",
                "--out-dir", str(tmp_path / "eval")])
    rows = log_rows(tmp_path / "eval")
    assert len(rows) == 1 and rows[0]["step"] == 0 and 0 <= rows[0]["val_accuracy"] <= 1
    assert not (tmp_path / "eval" / "ckpt.pt").exists()


def test_grpo_resume_after_a_crash_gives_the_same_weights_and_log(tmp_path, monkeypatch):
    init, rl = sft_then_questions(tmp_path)
    common = ["--method", "grpo", "--init", init, "--data", rl, "--val-data", rl, "--max-steps", "4",
              "--eval-interval", "2", "--batch-size", "2", "--group-size", "4", "--max-new-tokens", "3",
              "--lr", "1e-2", "--beta", "0.05"]
    align.main(common + ["--out-dir", str(tmp_path / "a")])

    class Crash(Exception):
        pass

    def save_then_crash(*args, **kwargs):  # the run dies right after its step-2 checkpoint
        save_checkpoint(*args, **kwargs)
        raise Crash
    monkeypatch.setattr(align, "save_checkpoint", save_then_crash)
    with pytest.raises(Crash):
        align.main(common + ["--out-dir", str(tmp_path / "b")])
    monkeypatch.undo()
    assert load_checkpoint(str(tmp_path / "b" / "ckpt.pt"))["step"] == 2
    align.main(common + ["--out-dir", str(tmp_path / "b"), "--resume"])
    a, b = load_checkpoint(str(tmp_path / "a" / "ckpt.pt")), load_checkpoint(str(tmp_path / "b" / "ckpt.pt"))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    drop_time = lambda rows: [{k: v for k, v in r.items() if k != "dt_ms"} for r in rows]  # noqa: E731
    assert drop_time(log_rows(tmp_path / "a")) == drop_time(log_rows(tmp_path / "b"))


def test_grpo_bad_rows_are_skipped_by_number_and_no_usable_row_is_one_sentence(tmp_path, capsys):
    init = tiny_ckpt(tmp_path / "init.pt")
    lines = ['{"prompt": "left", "answer": "L"}', "not json", '{"prompt": "left"}', '{"prompt": "x", "answer": " "}',
             '{"answer": "L"}', '{"messages": "left", "answer": "L"}',
             '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "answer": "b"}']
    records = align.read_records(write_jsonl(tmp_path / "rl.jsonl", lines), "grpo", "--data")
    assert len(records) == 1 and records[0][0]["answer"] == "L"
    said = capsys.readouterr().out
    assert "skipped 6 of 7 lines" in said and "line 2: not valid JSON" in said and "line 3: no 'answer'" in said
    bad = write_jsonl(tmp_path / "bad.jsonl", lines[1:])
    for argv, words in [(["--data", bad], ["--data", "no usable GRPO examples", '"answer"']),
                        (["--data", str(tmp_path)], ["--data", "a folder"]),
                        (["--data", bad, "--group-size", "1"], ["--group-size"]),
                        (["--data", bad, "--temperature", "0"], ["--temperature"]),
                        (["--data", bad, "--beta", "-2"], ["--beta"])]:
        with pytest.raises(SystemExit) as e:
            align.main(["--method", "grpo", "--init", init, "--out-dir", str(tmp_path / "o"), *argv])
        message = str(e.value)
        assert all(w in message for w in words) and message.count(". ") <= 1 and "\n" not in message, message


# ------------------------------------------------------------------------------------------------
# plays.py: the RL questions

def test_demo_data_writes_checkable_rl_questions_held_out_by_scene(tmp_path):
    docs, names = [], ["ALPHA", "BRAVO", "CHARLIE", "DELTA", "ECHO", "FOXTROT"]  # 21 speeches each per play
    for p in range(5):
        for s in range(3):
            text = "\n\n".join(f"{names[k % 6]}.\nLine {k} of scene {s} in play {p}." for k in range(42)) + "\n"
            docs.append({"id": f"p{p}/{s}", "play": f"Play {p}", "work": f"p{p}", "edition": "modern",
                         "scene": f"Scene {s}", "text": text})
    corpus = write_jsonl(tmp_path / "corpus.jsonl", docs)
    plays.make_demo_data(corpus, tmp_path / "chat")
    rows = [json.loads(line) for line in (tmp_path / "chat" / "rl.jsonl").read_text().splitlines()]
    assert {r["task"] for r in rows} == {"play", "answers"}
    for r in rows:  # the answer is one of the 4 options, and the prompt lists them all
        assert len(r["options"]) == 4 == len(set(r["options"])) and r["answer"] in r["options"]
        assert "; ".join(r["options"]) in r["prompt"]
        if r["task"] == "play":
            assert r["answer"] == "Play " + r["group"][1]
    per_scene = {}
    for r in rows:
        per_scene.setdefault((r["group"], r["task"]), []).append(r)
    assert max(len(v) for v in per_scene.values()) == 4
    sft = [json.loads(line) for line in (tmp_path / "chat" / "sft.jsonl").read_text().splitlines()]
    assert [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in sft] == [  # SFT: the same questions
        (r["prompt"], r["answer"]) for r in rows]
    # align.py reads every row, and a scene's questions land on one side of the split
    records = align.read_records(str(tmp_path / "chat" / "rl.jsonl"), "grpo", "--data")
    assert len(records) == len(rows)
    sides = {}
    for _, group in records:
        sides.setdefault(group, set()).add(align.held_out(group, 0.5))
    assert all(len(s) == 1 for s in sides.values())
