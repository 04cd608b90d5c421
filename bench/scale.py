"""bench/scale.py: the data stages (dedup.py, tokenize_data.py) on synthetic corpora of a given size.

    python bench/scale.py --sizes 40 160 1000 --workers 2 --work-dir DIR [--baseline]

Makes, offline, a JSONL corpus of each size in MB from the cached plays (plays.fetch_corpus; make_corpus:
the modern editions' lines shuffled into documents of --doc-words words, each word replaced with
probability 0.15 by another word of the plays or, one time in five, a made-up variant of one, so that
documents differ and the vocabulary keeps growing with the corpus), with planted duplicates: 3% of the
documents copy one of the last 200 originals with 1-4% of the words replaced (word 5-gram Jaccard about
0.7-0.95), 1% copy one verbatim. Corpora stay in --work-dir (corpus-<MB>mb-<min>-<max>.jsonl), reused.

Then runs each stage on each size as a user would, one subprocess each: `dedup.py CORPUS -o ...` and
`tokenize_data.py DEDUPED --out-dir ...`, and prints per stage and size: wall seconds and MB/s of the
stage's input (also per worker), CPU seconds of the process and its workers and MB per CPU second (what a
free core does; wall times on a shared machine are not that), the peak RSS of the largest process (wait4)
and the peak proportional set size of all its processes (PSS from /proc every 0.2 s: shared pages counted
once), and the machine's load average. --baseline also times the plain datasketch loop of bench/dedup.py
on each corpus. The table goes to --work-dir/scale.md and scale.json too. Linux only (/proc, wait4).
"""
import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import plays  # noqa: E402


def play_lines(cache):
    """Non-blank lines of the modern editions of the plays, each as a list of words."""
    texts = plays.fetch_corpus(cache)
    lines = []
    for path in sorted(texts.glob("*_gut.txt")):
        lines += [line.split() for line in path.read_text(encoding="utf-8", errors="replace").split("\n")
                  if line.strip()]
    return lines


def variant(word, rng):
    """A made-up word near `word`: the kind of spelling variety a large corpus keeps adding."""
    k = rng.randrange(len(word) + 1)
    return word[:k] + rng.choice(["e", "s", "th", "ly", "ing", "'d", "o", "er", "a", "y"]) + word[k:]


def make_corpus(path, n_bytes, cache, doc_words=(300, 3000), perturb=0.15, near_dups=0.03, exact_dups=0.01,
                seed=0):
    """Write ~n_bytes of JSONL {"id", "text", "planted"} to path (atomically) -> number of documents."""
    rng = random.Random(seed)
    lines = play_lines(cache)
    vocab = [w for line in lines for w in line]  # frequency-weighted: a random pick follows the plays
    docs, written, recent = 0, 0, []
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        while written < n_bytes:
            r = rng.random()
            if recent and r < exact_dups:
                planted, text = "exact", rng.choice(recent)
            elif recent and r < exact_dups + near_dups:
                words, rate = rng.choice(recent).split(" "), rng.uniform(0.01, 0.04)
                for i in rng.sample(range(len(words)), int(rate * len(words))):
                    words[i] = rng.choice(vocab) if words[i] != "\n" else "\n"
                planted, text = f"near {rate:.3f}", " ".join(words)
            else:
                target, words = rng.randint(*doc_words), []
                while len(words) < target:
                    line = [w if rng.random() > perturb else
                            (rng.choice(vocab) if rng.random() < 0.8 else variant(rng.choice(vocab), rng))
                            for w in rng.choice(lines)]
                    words += line + ["\n"]
                planted, text = "", " ".join(words).replace(" \n ", "\n").strip()
                recent = (recent + [text])[-200:]  # duplicates copy one of the last 200 originals
            line = json.dumps({"id": f"doc{docs}", "text": text, "planted": planted}) + "\n"
            f.write(line)
            written += len(line.encode())
            docs += 1
    os.replace(tmp, path)
    return docs


def _pss_kb(pid):
    """Sum of Pss (kB) of pid and all its descendants, from /proc; 0 for processes already gone."""
    children = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                ppid = int(open(f"/proc/{entry.name}/stat").read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in open(f"/proc/{p}/smaps_rollup"):
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def measure(cmd, log):
    """Run cmd -> (wall s, CPU s of it and its workers, peak RSS MB of its largest process, peak PSS MB of all)."""
    t0 = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        peak, done = [0], threading.Event()

        def sample():
            while not done.wait(0.2):
                peak[0] = max(peak[0], _pss_kb(proc.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        done.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed; see {log}")
    return time.time() - t0, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, peak[0] / 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[40, 160], help="corpus sizes in MB")
    parser.add_argument("--workers", type=int, default=2, help="--workers of both stages")
    parser.add_argument("--work-dir", default=None, help="corpora and outputs (default: a folder in the temp dir)")
    parser.add_argument("--cache", default=str(ROOT / "data" / "cache"), help="plays.fetch_corpus cache")
    parser.add_argument("--stages", nargs="+", default=["dedup", "tokenize"], choices=["dedup", "tokenize"])
    parser.add_argument("--doc-words", type=int, nargs=2, default=[300, 3000], help="words per document, min max")
    parser.add_argument("--baseline", action="store_true", help="also time the plain datasketch loop")
    parser.add_argument("--tokenize-flags", nargs=argparse.REMAINDER, default=[],
                        help="extra tokenize_data.py flags (last on the line)")
    args = parser.parse_args()
    import tempfile
    work = Path(args.work_dir or Path(tempfile.gettempdir()) / "gpt-from-scratch-scale")
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.sizes:
        corpus = work / f"corpus-{size:g}mb-{args.doc_words[0]}-{args.doc_words[1]}.jsonl"
        if not corpus.exists():
            t0 = time.time()
            n = make_corpus(corpus, int(size * 1e6), args.cache, tuple(args.doc_words))
            print(f"made {corpus} ({n} documents) in {time.time() - t0:.0f} s", flush=True)
        n_docs = sum(1 for _ in open(corpus, "rb"))
        out = work / f"out-{size:g}mb"
        deduped = out / "corpus.jsonl"
        runs = []
        if "dedup" in args.stages:
            runs.append(("dedup", corpus, [sys.executable, "dedup.py", str(corpus), "-o", str(deduped),
                                           "--workers", str(args.workers)], args.workers))
            if args.baseline:
                runs.append(("plain datasketch loop", corpus, [sys.executable, "bench/dedup.py", "--plain-loop",
                                                               str(corpus)], 1))
        if "tokenize" in args.stages:
            runs.append(("tokenize", deduped, [sys.executable, "tokenize_data.py", str(deduped), "--out-dir",
                                               str(out / "tokens"), "--workers", str(args.workers),
                                               *args.tokenize_flags], args.workers))
        for stage, src, cmd, workers in runs:
            if stage == "tokenize":
                for name in ("meta.json",):  # a fresh run each time: no stale shards to refuse
                    (out / "tokens" / name).unlink(missing_ok=True)
            mb = src.stat().st_size / 1e6
            wall, cpu, rss, pss = measure(cmd, out.with_name(out.name + f"-{stage.split()[0]}.log"))
            row = {"stage": stage, "corpus_mb": size, "input_mb": round(mb, 1), "docs": n_docs, "workers": workers,
                   "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "mb_per_s": round(mb / wall, 2),
                   "mb_per_s_per_worker": round(mb / wall / workers, 2), "mb_per_cpu_s": round(mb / cpu, 2),
                   "peak_rss_mb": round(rss), "peak_pss_mb": round(pss),
                   "load": round(os.getloadavg()[0], 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    header = ["stage", "corpus_mb", "input_mb", "docs", "workers", "wall_s", "cpu_s", "mb_per_s",
              "mb_per_s_per_worker", "mb_per_cpu_s", "peak_rss_mb", "peak_pss_mb", "load"]
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table += ["| " + " | ".join(str(r[h]) for h in header) + " |" for r in rows]
    print("\n".join(table))
    print(f"machine: {os.cpu_count()} cores; load = 1-minute load average at the end of the run")
    (work / "scale.md").write_text("\n".join(table) + "\n")
    (work / "scale.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
