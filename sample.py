"""
sample.py: generate text or chat with any checkpoint this project writes.

    python sample.py --ckpt out/pretrain/ckpt.pt --prompt "ROMEO." --max-new-tokens 200
    python sample.py --ckpt out/dpo/ckpt.pt --chat                  # multi-turn, type at the prompt
    python sample.py --ckpt out/dpo/ckpt.pt --chat --prompt "Who speaks this line? ..."  # one turn

Text streams to stdout as it is produced. `--prompt FILE:path` reads the prompt from a file.
The tokenizer travels inside the checkpoint; one without a tokenizer (a bare model.py model) falls
back to raw UTF-8 bytes as tokens. A plain prompt starts with the document separator, as every
pretraining document did; a chat renders the template in CONTRACTS of align.py: <|role|> text <|end|>.
"""

import argparse
import codecs
import sys
from dataclasses import dataclass, fields

import torch

from model import GPT, load_checkpoint


@dataclass
class SampleConfig:
    ckpt: str = "out/pretrain/ckpt.pt"
    prompt: str = ""               # text, or FILE:path
    max_new_tokens: int = 200
    temperature: float = 0.8       # 0 = greedy
    top_k: int = 0                 # 0 = off
    top_p: float = 1.0             # 1.0 = off
    seed: int = 1337
    num_samples: int = 1
    chat: bool = False
    device: str = "auto"


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255: the fallback for checkpoints that carry no tokenizer."""
    n_vocab = 256
    special_tokens = {}

    def encode_ordinary(self, text):
        return list(text.encode("utf-8"))

    def decode_bytes(self, ids):
        return bytes(ids)


def load_tokenizer_from(ckpt):
    if ckpt.get("tokenizer") is None:
        return ByteTokenizer()
    from tokenize_data import tokenizer_from_dict
    return tokenizer_from_dict(ckpt["tokenizer"])


def special_ids(enc):
    """{name: id} of the reserved tokens this tokenizer has (a tiktoken Encoding or ByteTokenizer)."""
    names = getattr(enc, "special_tokens_set", set()) or set(enc.special_tokens)
    return {name: enc.encode_single_token(name) for name in names}


def stream_print(model, ids, enc, cfg, stop_token, device, generator):
    """Generate after ids, printing each token's text as soon as it forms whole characters."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    prompt = torch.tensor([ids], dtype=torch.long, device=device)
    new_ids = []
    for token in model.stream(prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_k or None,
                              cfg.top_p, stop_token, generator=generator):
        t = token.item()
        if t == stop_token:
            break
        new_ids.append(t)
        sys.stdout.write(decoder.decode(enc.decode_bytes([t])))  # a special token shows as its name
        sys.stdout.flush()
    sys.stdout.write(decoder.decode(b"", final=True) + "\n")
    return new_ids


def crop_prompt(ids, block_size):
    if len(ids) >= block_size:
        print(f"note: prompt of {len(ids)} tokens cropped to its last {block_size - 1} "
              f"(block_size={block_size}).", file=sys.stderr)
        ids = ids[-(block_size - 1):]
    return ids


def chat(model, enc, cfg, device, generator):
    """Multi-turn chat: the whole conversation is re-rendered each turn and cropped to fit."""
    sp = special_ids(enc)
    needed = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"]
    if any(name not in sp for name in needed):
        raise SystemExit(f"{cfg.ckpt}'s tokenizer lacks the chat tokens {needed}; chat needs a checkpoint "
                         "trained on data from tokenize_data.py (and ideally aligned with align.py).")
    history = []  # list of (role, text)
    one_turn = bool(cfg.prompt)
    while True:
        if one_turn:
            user = read_prompt(cfg.prompt)
        else:
            try:
                user = input("you> ")
            except EOFError:
                break
            if not user.strip():
                continue
        history.append(("user", user))
        ids = [sp["<|endoftext|>"]]
        for role, text in history:
            ids += [sp[f"<|{role}|>"]] + enc.encode_ordinary(text) + [sp["<|end|>"]]
        ids = crop_prompt(ids + [sp["<|assistant|>"]], model.config.block_size)
        if not one_turn:
            sys.stdout.write("model> ")
        reply = stream_print(model, ids, enc, cfg, sp["<|end|>"], device, generator)
        history.append(("assistant", enc.decode_bytes(reply).decode("utf-8", errors="replace")))
        if one_turn:
            break


def read_prompt(prompt):
    if prompt.startswith("FILE:"):
        try:
            with open(prompt[5:], encoding="utf-8") as f:
                return f.read()
        except OSError as e:
            raise SystemExit(f"--prompt {prompt}: cannot read that file ({e.strerror}).")
    return prompt


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(SampleConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            parser.add_argument(flag, action="store_true", default=f.default)
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default)
    return SampleConfig(**vars(parser.parse_args(argv)))


def main(argv=None):
    cfg = parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    ckpt = load_checkpoint(cfg.ckpt)
    model = GPT.from_checkpoint(ckpt, device=device, dropout=0.0)
    enc = load_tokenizer_from(ckpt)
    del ckpt
    if device == "cuda":
        model = model.to(torch.bfloat16)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if cfg.chat:
        return chat(model, enc, cfg, device, generator)
    sp = special_ids(enc)
    separator = sp.get("<|endoftext|>")
    ids = ([separator] if separator is not None else []) + enc.encode_ordinary(read_prompt(cfg.prompt))
    if not ids:
        raise SystemExit("--prompt is empty and this tokenizer has no document separator to start from; "
                         "pass some text.")
    ids = crop_prompt(ids, model.config.block_size)
    text_prompt = read_prompt(cfg.prompt)
    for i in range(cfg.num_samples):
        if cfg.num_samples > 1:
            print(f"--- sample {i + 1}/{cfg.num_samples}")
        sys.stdout.write(text_prompt)
        stream_print(model, ids, enc, cfg, separator, device, generator)


if __name__ == "__main__":
    main()
