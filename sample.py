"""
sample.py: generate text or chat with any checkpoint this project writes.

    python sample.py --ckpt out/pretrain/ckpt.pt --prompt "ROMEO." --max-new-tokens 200 --num-samples 3
    python sample.py --ckpt out/rl/ckpt.pt --chat                   # multi-turn: type at the prompt
    python sample.py --ckpt out/rl/ckpt.pt --chat --prompt "Which play is this from? Macbeth; Hamlet; ..."  # one turn

Text streams to stdout as it is produced. `--prompt FILE:path` reads the prompt from a file.
The tokenizer travels inside the checkpoint; a checkpoint without one (a bare model.py model of
vocabulary 256) falls back to raw UTF-8 bytes as tokens. A plain prompt starts with the document
separator, as every pretraining document did, and a prompt longer than the block keeps its last
block_size - 1 tokens (with a note on stderr). A chat renders the conversation with
tokenize_data.render_conversation, the template align.py trains on, then asks for the assistant's turn; the
reply ends at the first special token, and the oldest turns are dropped when the conversation outgrows
the block. --num-samples N prints N samples of one --prompt (with --chat: N replies to that message).
--chat on a checkpoint that align.py did not write says so on stderr (a pretrained model continues text,
it was not taught to answer). A reader that closes the pipe (`| head -c 10`) ends the run quietly.
"""

import codecs
import contextlib
import os
import sys
from dataclasses import dataclass

import torch

from flags import parse_flags
from model import GPT, pick_device, read_checkpoint
from tokenize_data import DOC_START, chat_token_ids, render_conversation, stop_token_ids


@dataclass
class SampleConfig:
    ckpt: str = "out/pretrain/ckpt.pt"  # a ckpt.pt that train.py or align.py wrote, or a Hugging Face folder
    prompt: str = ""               # the text to continue (with --chat: the one user message), or FILE:path
    max_new_tokens: int = 200      # tokens generated per sample (at most)
    temperature: float = 0.8       # 0 = greedy; higher = more varied
    top_k: int = 0                 # sample among the k most likely tokens only; 0 = off
    top_p: float = 1.0             # sample among the most likely tokens that hold this much probability; 1.0 = off
    seed: int = 1337               # the sampling's random seed
    num_samples: int = 1           # samples of one --prompt (with --chat: replies to it)
    chat: bool = False             # talk to an aligned checkpoint through the chat template
    system: str = ""               # chat only: a system message placed before the first turn
    device: str = "auto"           # auto (cuda when a GPU is visible, else cpu) | cpu | cuda | cuda:N


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255: the fallback for checkpoints that carry no tokenizer."""
    special_tokens_set = set()

    def encode_ordinary(self, text):
        return list(text.encode("utf-8"))

    def decode_bytes(self, ids):
        return bytes(ids)


def load_tokenizer_from(ckpt, path):
    if ckpt.get("tokenizer") is None:
        vocab = ckpt["model_config"]["vocab_size"]
        if vocab != 256:
            raise SystemExit(f"{path} carries no tokenizer and its vocab_size={vocab} is not 256 (raw bytes); "
                             "pass a checkpoint that train.py or align.py wrote from tokenize_data.py output.")
        return ByteTokenizer()
    from tokenize_data import tokenizer_from_dict
    return tokenizer_from_dict(ckpt["tokenizer"])


def read_prompt(prompt):
    if prompt.startswith("FILE:"):
        try:
            with open(prompt[5:], encoding="utf-8") as f:
                return f.read()
        except OSError as e:
            raise SystemExit(f"--prompt {prompt}: cannot read that file ({e.strerror}).")
        except UnicodeDecodeError as e:
            raise SystemExit(f"--prompt {prompt}: the file is not UTF-8 text (byte {e.start:,} is not); "
                             "pass a text file.") from None
    return prompt


def stream_print(model, ids, enc, cfg, stop_ids, generator):
    """Generate after ids, printing text as soon as it forms whole UTF-8 characters; return new ids."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    prompt = torch.tensor([ids], dtype=torch.long, device=model.lm_head.weight.device)
    new_ids = []
    for token in model.stream(prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_k or None, cfg.top_p,
                              generator=generator):
        t = token.item()
        if t in stop_ids:
            break
        new_ids.append(t)
        sys.stdout.write(decoder.decode(enc.decode_bytes([t])))  # a special token shows as its name
        sys.stdout.flush()
    sys.stdout.write(decoder.decode(b"", final=True) + "\n")
    return new_ids


def chat(model, enc, cfg, generator):
    """One turn (--prompt) or many (typed); the conversation is rendered anew each turn, oldest turns
    dropped until the reply has room in the block."""
    chat_token_ids(enc, model.config.vocab_size, f"--ckpt {cfg.ckpt}")  # one sentence if the tokens are missing
    stop_ids = stop_token_ids(enc)
    system = [{"role": "system", "content": cfg.system}] if cfg.system else []
    history = []  # finished messages, oldest first
    room = model.config.block_size - min(cfg.max_new_tokens, model.config.block_size // 2)
    while True:
        if cfg.prompt:
            user = read_prompt(cfg.prompt)
        else:
            try:
                user = input("you> ")
            except EOFError:
                print()
                break
            if not user.strip():
                continue
        history.append({"role": "user", "content": user})
        while True:  # drop messages, oldest first, until the reply has room
            ids, _ = render_conversation(enc, system + history, add_generation_prompt=True)
            if len(ids) <= room or len(history) == 1:
                break
            history.pop(0)
        if len(ids) > room:
            print(f"note: message cropped to its last {room - 1} tokens to fit block_size.", file=sys.stderr)
            ids = ids[:1] + ids[-(room - 1):]
        if not cfg.prompt:
            sys.stdout.write("model> ")
            reply = stream_print(model, ids, enc, cfg, stop_ids, generator)
            history.append({"role": "assistant", "content": enc.decode(reply, errors="replace")})
            continue
        for i in range(cfg.num_samples):
            if cfg.num_samples > 1:
                print(f"--- sample {i + 1}/{cfg.num_samples}")
            stream_print(model, ids, enc, cfg, stop_ids, generator)
        break


def check_config(cfg):
    if cfg.temperature < 0 or cfg.top_k < 0 or not 0 < cfg.top_p <= 1 or cfg.max_new_tokens < 1:
        raise SystemExit("--temperature and --top-k must be >= 0, --top-p in (0, 1], --max-new-tokens >= 1.")
    if cfg.num_samples < 1:
        raise SystemExit(f"--num-samples {cfg.num_samples}: must be at least 1.")
    if cfg.chat and cfg.num_samples > 1 and not cfg.prompt:
        raise SystemExit("--num-samples with --chat needs --prompt (N replies to one message); a typed "
                         "conversation goes on from one reply.")
    return cfg


def main(argv=None):
    cfg = check_config(parse_flags(SampleConfig, argv, __doc__))
    if sys.stdout is None or sys.stdout.closed:  # e.g. `sample.py >&-`: nowhere to write the text
        raise SystemExit("stdout is closed, so there is nowhere to write the samples; redirect it to a file instead.")
    if cfg.chat and not cfg.prompt and (sys.stdin is None or sys.stdin.closed):  # e.g. `sample.py --chat <&-`
        raise SystemExit("--chat without --prompt reads your messages from stdin, which is closed; run it in a "
                         "terminal, or pass --prompt.")
    device = pick_device(cfg.device)
    ckpt = read_checkpoint(cfg.ckpt, "--ckpt")
    broken = next((k for k, v in ckpt["model"].items() if v.is_floating_point() and not v.isfinite().all()), None)
    if broken:
        raise SystemExit(f"{cfg.ckpt}: its weight {broken} is non-finite (nan/inf): the run that wrote it diverged; "
                         "use an earlier checkpoint or train again with a lower --lr.")
    # sdpa computes what every attn_impl computes, and runs everywhere (triton needs a GPU).
    model = GPT.from_checkpoint(ckpt, device=device, dropout=0.0, attn_impl="sdpa")
    enc = load_tokenizer_from(ckpt, cfg.ckpt)
    if cfg.chat and ckpt.get("stage") not in ("sft", "dpo", "grpo"):
        print(f"note: {cfg.ckpt} was not trained to chat (align.py did not write it), so its replies will not "
              "follow the conversation; align it first (align.py --method sft).", file=sys.stderr)
    del ckpt
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    autocast = torch.autocast("cuda", torch.bfloat16) if device.startswith("cuda") else contextlib.nullcontext()
    with autocast:
        if cfg.chat:
            return chat(model, enc, cfg, generator)
        text = read_prompt(cfg.prompt)
        separator = [enc.encode_single_token(DOC_START)] if DOC_START in enc.special_tokens_set else []
        ids = separator + enc.encode_ordinary(text)
        if not ids:
            raise SystemExit("--prompt is empty and this tokenizer has no document separator to start from; "
                             "pass some text.")
        if len(ids) >= model.config.block_size:
            print(f"note: prompt of {len(ids)} tokens cropped to its last {model.config.block_size - 1} "
                  f"(block_size={model.config.block_size}).", file=sys.stderr)
            ids = ids[-(model.config.block_size - 1):]
        for i in range(cfg.num_samples):
            if cfg.num_samples > 1:
                print(f"--- sample {i + 1}/{cfg.num_samples}")
            sys.stdout.write(text)
            stream_print(model, ids, enc, cfg, set(separator), generator)


if __name__ == "__main__":
    try:
        main()
    except BrokenPipeError:  # the reader went away (`| head -c 10`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so Python's flush at exit cannot fail
