"""
bench/hf_answers.py: the exported chat model, reloaded in transformers, answers the held-out questions
exactly as ours does: the same prompt ids and the same greedy answer, token for token.

    python export.py --ckpt out/rl/ckpt.pt --out out/hf
    python bench/hf_answers.py --ckpt out/rl/ckpt.pt --hf out/hf --data data/chat/rl.jsonl

The questions are those align.py's GRPO evaluation asks: align.read_split of --data (or of --val-data,
else the run's --val-data, whole), with the run's seed, --eval-fraction and --max-new-tokens, all read from
the checkpoint's train_config (align.py's defaults where it holds none).
Each prompt is rendered twice: by tokenize_data.render_conversation (add_generation_prompt), as align.py
does, and by the folder's own tokenizer through apply_chat_template. Ours answers greedily through
align.rollout (model.generate, temperature 0, KV cache, stopping at <|end|>) from our ids; transformers'
AutoModelForCausalLM.generate(do_sample=False) from its ids, eos_token_id <|end|>. Both fp32 on CPU, and
both batch together only prompts of one length, so no padding enters either. Prints a table: questions,
prompts identical, answers identical token for token, each side's exact-answer accuracy (align.reward),
and the first --show differences (for an answer: the first token where they part, and both models'
logits there for both choices, which tells a rounding tie from a real difference). Exits with a
sentence (status 1) when any prompt or answer differs.
"""

import os
import sys
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import align  # noqa: E402  (a bench may import stages: the questions and the reward are align.py's)
from flags import parse_flags  # noqa: E402
from model import GPT, read_checkpoint  # noqa: E402
from tokenize_data import END, chat_token_ids, render_conversation, tokenizer_from_dict  # noqa: E402


@dataclass
class HFAnswersConfig:
    ckpt: str = "out/rl/ckpt.pt"   # our chat model: align.py's ckpt.pt (its train_config gives the split)
    hf: str = "out/hf"             # the same model exported: export.py --ckpt CKPT --out HF
    data: str = "data/chat/rl.jsonl"  # GRPO questions in align.py's format; the held-out ones are asked
    val_data: str = ""             # held-out questions (align.py's --val-data); empty: the run's, else --data's split
    eval_max: int = 0              # questions asked, the first of align.py's shuffle; 0: every held-out one
    show: int = 5                  # differences printed, at most


def held_out_questions(cfg, run):
    """-> [(record, group)]: the held-out questions in align.py's order (align.read_split: its split, its
    shuffle), all of them when --eval-max is 0."""
    asked = cfg.eval_max if cfg.eval_max > 0 else sys.maxsize
    split = align.AlignConfig(method="grpo", data=cfg.data, val_data=run["val_data"], seed=run["seed"],
                              eval_fraction=run["eval_fraction"], eval_max=asked)
    _, questions, _ = align.read_split(split)
    if not questions:
        raise SystemExit(f"--data {cfg.data}: no question falls in the held-out {run['eval_fraction']} of its groups; "
                         "pass the file the checkpoint's GRPO run was trained on.")
    return questions


def load_hf(folder):
    """The export, loaded by transformers alone (fp32, local files only) -> (model, tokenizer)."""
    if not os.path.isfile(os.path.join(folder, "config.json")) or not os.path.isfile(
            os.path.join(folder, "tokenizer.json")):
        raise SystemExit(f"--hf {folder}: no config.json and tokenizer.json in it; write the export first "
                         f"(python export.py --ckpt CKPT --out {folder}).")
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    return model.eval(), transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)


@torch.no_grad()
def hf_greedy(model, prompts, max_new_tokens, end_id):
    """prompts [[ids]] -> their greedy answers by transformers, each up to and including <|end|>, or
    max_new_tokens long; prompts of one length go in one batch, as align.rollout batches ours."""
    answers, by_length = [None] * len(prompts), {}
    for i, ids in enumerate(prompts):
        by_length.setdefault(len(ids), []).append(i)
    for length, which in by_length.items():
        rows = torch.tensor([prompts[i] for i in which])                                # (len(which), length)
        out = model.generate(rows, attention_mask=torch.ones_like(rows), do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=end_id, pad_token_id=end_id)
        for i, ids in zip(which, out[:, length:].tolist()):
            answers[i] = ids[:ids.index(end_id) + 1] if end_id in ids else ids
    return answers


@torch.no_grad()
def first_split(ours, theirs, prompt, a, b):
    """Where greedy answers a and b of one prompt part: each model's logits for both tokens there. Two
    near-equal logits in both models mean a tie broken by rounding; far apart in one, a real difference."""
    k = next(k for k, (x, y) in enumerate(zip(a + [None], b + [None])) if x != y)
    if k == min(len(a), len(b)):  # one answer stopped (at max_new_tokens) where the other went on
        return f"one is longer from token {k} on"
    ids = torch.tensor([prompt + a[:k]])                                                   # (1, T)
    logits = [ours(ids)[0][0, -1], theirs(ids).logits[0, -1]]                              # 2 x (vocab,)
    pair = [a[k], b[k]]
    shown = [" and ".join(f"{v:.5f}" for v in l[pair].tolist()) for l in logits]
    return f"from token {k}: logits of our choice and theirs, ours {shown[0]}, transformers' {shown[1]}"


def main(argv=None):
    cfg = parse_flags(HFAnswersConfig, argv, __doc__)
    ckpt = read_checkpoint(cfg.ckpt, "--ckpt")
    if not ckpt.get("tokenizer"):
        raise SystemExit(f"--ckpt {cfg.ckpt}: the checkpoint carries no tokenizer; pass align.py's chat model.")
    enc = tokenizer_from_dict(ckpt["tokenizer"])
    ours = GPT.from_checkpoint(ckpt).eval()  # fp32, as saved
    end_id = chat_token_ids(enc, ours.config.vocab_size, f"--ckpt {cfg.ckpt}")[END]
    theirs, tokenizer = load_hf(cfg.hf)

    # align.py's GRPO split settings as the run had them, its defaults where the checkpoint holds none
    defaults = align.AlignConfig()
    recorded = ckpt.get("train_config") or {}
    run = {k: recorded.get(k, getattr(defaults, k)) for k in ("val_data", "eval_fraction", "seed", "max_new_tokens")}
    run["val_data"] = cfg.val_data or run["val_data"]
    questions, prompts, hf_prompts, n_long = [], [], [], 0
    for record, group in held_out_questions(cfg, run):
        ids, _ = render_conversation(enc, record["context"], add_generation_prompt=True)
        if len(ids) + run["max_new_tokens"] > ours.config.block_size:  # align.tokenize_questions drops it too
            n_long += 1
            continue
        questions.append(record)
        prompts.append(ids)
        hf_prompts.append(tokenizer.apply_chat_template(record["context"], add_generation_prompt=True,
                                                        return_dict=False))
    if not questions:
        raise SystemExit(f"--data {cfg.data}: no held-out prompt leaves room for {run['max_new_tokens']} new tokens "
                         f"in block_size={ours.config.block_size}.")

    our_answers, _ = align.rollout(ours, prompts, 1, run["max_new_tokens"], 0.0, end_id)
    hf_answers = hf_greedy(theirs, hf_prompts, run["max_new_tokens"], end_id)
    truth = [q["answer"] for q in questions]
    ended = [[a[-1:] == [end_id] for a in answers] for answers in (our_answers, hf_answers)]
    accuracy = [sum(align.rewards_of(enc, answers, done, truth)) / len(truth)
                for answers, done in zip((our_answers, hf_answers), ended)]
    same_prompt = [a == b for a, b in zip(prompts, hf_prompts)]
    same_answer = [a == b for a, b in zip(our_answers, hf_answers)]

    n = len(questions)
    source = run["val_data"] or f"{cfg.data}, held-out fraction {run['eval_fraction']}"
    print(f"{cfg.ckpt} against {cfg.hf} in transformers ({type(theirs).__name__}), fp32 on CPU, greedy, "
          f"at most {run['max_new_tokens']} new tokens; questions from {source}, seed {run['seed']}"
          + (f"; {n_long} too long for the block left out" if n_long else ""))
    rows = [("held-out questions", f"{n}", ""), ("prompt ids identical", f"{sum(same_prompt)}/{n}", ""),
            ("answers identical, token for token", f"{sum(same_answer)}/{n}", ""),
            ("answers ended by <|end|>", f"{sum(ended[0])}", f"{sum(ended[1])}"),
            ("exact-answer accuracy", f"{accuracy[0]:.4f}", f"{accuracy[1]:.4f}")]
    print(f"{'':38} {'ours':>8} {'transformers':>13}")
    for name, a, b in rows:
        print(f"{name:38} {a:>8} {b:>13}")
    differ = [i for i in range(n) if not (same_prompt[i] and same_answer[i])]
    for i in differ[:cfg.show]:
        print(f"- {questions[i]['context'][-1]['content'][:80]!r}: ours {enc.decode(our_answers[i])!r} "
              f"(prompt {len(prompts[i])} ids), transformers {enc.decode(hf_answers[i])!r} "
              f"(prompt {len(hf_prompts[i])} ids{', different' if not same_prompt[i] else ''})"
              + (f"; {first_split(ours, theirs, prompts[i], our_answers[i], hf_answers[i])}" if same_prompt[i] else ""))
    if differ:
        raise SystemExit(f"{len(differ)} of {n} held-out questions differ between ours and transformers "
                         "(listed above).")
    return {"questions": n, "same_prompt": sum(same_prompt), "same_answer": sum(same_answer),
            "ended": sum(ended[0]), "accuracy": accuracy[0], "hf_accuracy": accuracy[1]}


if __name__ == "__main__":
    main()
