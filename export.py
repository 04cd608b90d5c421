"""
export.py: a checkpoint as a Hugging Face folder, which transformers, vLLM and llama.cpp's converter load
with no custom code.

    python export.py --ckpt out/rl/ckpt.pt --out out/hf
    python -c "from transformers import AutoModelForCausalLM as M; print(M.from_pretrained('out/hf'))"

Writes into --out: config.json and model.safetensors in the one architecture that computes what the
checkpoint's switches compute (rope + rmsnorm + swiglu: Llama, grouped-query heads and an untied head
included; learned positions + layernorm: GPT-2; rope + layernorm: GPT-NeoX with sequential blocks and
full rotary), the tokenizer files tokenize_data.py writes for transformers (tokenizer.json,
tokenizer_config.json with the chat template, special_tokens_map.json) when the checkpoint carries a
tokenizer, and README.md: a model card with what was trained, on what, and the figures the checkpoint
records. A switch no such architecture has (soft-capping, QK-norm without a learned scale, sinusoidal
positions, post-norm) is one sentence, never a different model. --ckpt may be a Hugging Face folder
too (a re-export). The folder is written under a temporary name and renamed into place, so --out is
either the earlier export or the whole new one; the mapping itself lives in model.py, which reads
these folders back (train.py --init-from, align.py --init, sample.py --ckpt).
"""

import json
import os
import shutil
import time
from dataclasses import dataclass

from flags import parse_flags, temporary_path
from model import GPTConfig, HF_ARCHITECTURES, hf_architecture, hf_config, hf_state_dict, read_checkpoint


@dataclass
class ExportConfig:
    ckpt: str = "out/rl/ckpt.pt"   # what to export: a ckpt.pt of train.py or align.py, or a Hugging Face folder
    out: str = "out/hf"            # the folder to write (an earlier export there is replaced)


def model_card(ckpt, config, arch, n_params):
    """README.md for the folder: what the model is, what it was trained on, the figures its checkpoint holds."""
    run = ckpt.get("train_config") or {}
    data = run.get("data") or run.get("data_dir") or "not recorded in the checkpoint"
    origin = (f"Read from the Hugging Face folder {ckpt['hf_folder']}" if ckpt.get("hf_folder") else
              "Trained with the gpt-from-scratch reference implementation")
    rows = [r for r in ckpt.get("log") or [] if any(k.startswith("val") for k in r)]  # the evaluations
    figures = ", ".join(f"{k} {v:.4g}" for k, v in rows[-1].items() if k.startswith("val") and
                        isinstance(v, (int, float))) if rows else "none recorded"
    return "\n".join([
        f"# {HF_ARCHITECTURES[arch][0]}, {n_params / 1e6:.2f}M parameters", "",
        f"{origin} and exported by gpt-from-scratch's export.py.", "",
        f"- stage: {ckpt['stage']}, {ckpt.get('step')} steps" + (f", from {ckpt['init']}" if ckpt.get("init") else "")
        if ckpt.get("stage") else "- stage: not recorded",
        f"- trained on: {data}",
        f"- shape: {config.n_layer} layers x {config.n_embd} wide, {config.n_head} heads "
        f"({config.n_kv_head} key/value), "
        f"context {config.block_size}, vocabulary {config.vocab_size}",
        f"- switches: positions {config.pos_encoding}, norm {config.norm} (eps {config.norm_eps}), mlp {config.mlp}"
        f"{' (tanh approximation)' if config.mlp == 'gelu' and config.gelu_approx == 'tanh' else ''}, "
        f"{'tied' if config.tie_weights else 'untied'} head, {'biases' if config.bias else 'no biases'}",
        f"- figures at the last evaluation{' (step ' + str(rows[-1].get('step')) + ')' if rows else ''}: {figures}",
        "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "DIR = \"path/to/this/folder\"",
        "model, tokenizer = AutoModelForCausalLM.from_pretrained(DIR), AutoTokenizer.from_pretrained(DIR)",
        "```", ""])


def write_folder(out, files):
    """files {name: str | callable(path)} -> the folder out, written beside it and renamed into place."""
    tmp, old = temporary_path(out), f"{out}.old{os.getpid()}"
    os.makedirs(tmp)
    try:
        for name, content in files.items():
            path = os.path.join(tmp, name)
            if callable(content):
                content(path)
            else:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(content)
        if os.path.isdir(out):  # the earlier export steps aside only once the new one is whole
            os.rename(out, old)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def check_out(out):
    """--out may be new, empty, or an earlier export; anything else is kept and refused."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise SystemExit(f"--out {out} is a file; pass a folder to write the export into.")
    if os.path.isdir(out) and os.listdir(out) and not os.path.isfile(os.path.join(out, "config.json")):
        raise SystemExit(f"--out {out} holds files that are not an export; pass a new or empty folder.")


def main(argv=None):
    cfg = parse_flags(ExportConfig, argv, __doc__)
    check_out(cfg.out)
    t0 = time.time()
    ckpt = read_checkpoint(cfg.ckpt, "--ckpt")
    config = GPTConfig(**ckpt["model_config"])
    arch = hf_architecture(config)  # one sentence for a switch no architecture computes
    tensors = hf_state_dict(config, ckpt["model"], arch)
    hf = hf_config(config, arch)
    files = {}
    if ckpt.get("tokenizer"):
        import tokenize_data  # the tokenizer's owner writes its transformers files, chat template included
        enc = tokenize_data.tokenizer_from_dict(ckpt["tokenizer"])
        files = {name: json.dumps(content, indent=2, ensure_ascii=False) + "\n"
                 for name, content in tokenize_data.hf_tokenizer_files(enc).items()}
        hf["eos_token_id"] = tokenize_data.stop_token_ids(enc)  # generation stops where sample.py's chat stops
    from safetensors.torch import save_file
    n_params = sum(v.numel() for k, v in ckpt["model"].items() if not (k == "lm_head.weight" and config.tie_weights))
    files.update({"config.json": json.dumps(hf, indent=2) + "\n",
                  "model.safetensors": lambda path: save_file(tensors, path, metadata={"format": "pt"}),
                  "README.md": model_card(ckpt, config, arch, n_params)})
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    write_folder(cfg.out, files)
    note = "" if ckpt.get("tokenizer") else ", no tokenizer in the checkpoint"
    print(f"wrote {cfg.out} ({HF_ARCHITECTURES[arch][0]}, {n_params:,} parameters{note}) in {time.time() - t0:.1f}s; "
          "load it with")
    print("  from transformers import AutoModelForCausalLM, AutoTokenizer")
    print(f"  model, tokenizer = AutoModelForCausalLM.from_pretrained({cfg.out!r}), "
          f"AutoTokenizer.from_pretrained({cfg.out!r})")


if __name__ == "__main__":
    main()
