"""bench/dedup.py: dedup.py against a straightforward datasketch loop, and its recall per Jaccard bin.

    OMP_NUM_THREADS=1 python bench/dedup.py [--cache data/cache] [--pairs 600] [--workers 2] [--repeats 2]

Input: the Shakespeare corpus cut into scenes (pipeline.cut_scenes) plus, for --pairs random scenes,
one labelled variant each (word edits at several rates, truncation, boilerplate added, case and
spacing changed, exact copies). Prints
  1. speed: (a) a single-process loop -- per document a datasketch MinHash updated once per shingle,
     then MinHashLSH query + insert (same bands/rows), no cleaning, no filters, no verification --
     against (b) the whole of `dedup.py --workers N` (clean, filters, exact, LSH, exact-Jaccard
     verification, output writing) and dedup.py with 1 worker, all on the same file in the same run,
     interleaved, best wall time of --repeats (cpu s: this process plus dedup.py's workers);
  2. recall per true-Jaccard bin (word 5-gram sets computed here with Python sets) next to the LSH
     candidate curve 1-(1-s^r)^b at the bin's mean, plus the measured candidate rate;
  3. memory of the MinHashLSH index per document (tracemalloc), scaled to a million documents.
"""

import argparse
import json
import os
import random
import re
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from datasketch import MinHash, MinHashLSH

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import dedup  # noqa: E402
import pipeline  # noqa: E402

BOILERPLATE = ["Copyright (c) 2024 Example Press. All rights reserved.",
               "This text is provided for educational use; see our website for terms.",
               "Scanned and proofread by volunteers of the digital library project."]


def make_variant(text, kind, rate, rng, vocab):
    """One labelled edit of a scene's text; `rate` is the edit rate or kept fraction."""
    lines = text.split("\n")
    if kind == "edit":  # per word: substitute, delete or insert with probability `rate`
        out = []
        for line in lines:
            words = []
            for w in line.split(" "):
                r = rng.random()
                if r < rate / 3:
                    words.append(rng.choice(vocab))
                elif r < 2 * rate / 3:
                    continue
                elif r < rate:
                    words += [w, rng.choice(vocab)]
                else:
                    words.append(w)
            out.append(" ".join(words))
        return "\n".join(out)
    if kind == "truncate":
        return "\n".join(lines[:max(1, int(len(lines) * rate))])
    if kind == "boilerplate":
        return "\n".join(BOILERPLATE[:2] + lines + BOILERPLATE[2:])
    if kind == "case_space":
        return "\n".join(("  ".join(line.split(" "))).upper() if i % 3 == 0 else line.lower() + "   "
                         for i, line in enumerate(lines))
    return text  # "exact"


KINDS = ([("edit", r) for r in (0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.06, 0.1, 0.2)]
         + [("truncate", f) for f in (0.95, 0.85, 0.75, 0.6)] + [("boilerplate", 0), ("case_space", 0),
                                                               ("exact", 0)])


def labelled_docs(scenes, n_pairs, seed=0):
    """-> (variant docs, [(scene id, variant id, kind)]). One variant per chosen scene."""
    rng = random.Random(seed)
    vocab = sorted({w for d in scenes[:50] for w in d["text"].split()})
    chosen = rng.sample(range(len(scenes)), min(n_pairs, len(scenes)))
    variants, pairs = [], []
    for k, i in enumerate(chosen):
        kind, rate = KINDS[k % len(KINDS)]
        vid = f"variant/{k}/{kind}/{rate}"
        variants.append({"id": vid, "text": make_variant(scenes[i]["text"], kind, rate, rng, vocab)})
        pairs.append((scenes[i]["id"], vid, kind))
    return variants, pairs


def true_jaccard(a, b, n=5):
    """Reference: Jaccard of the sets of word n-gram tuples (same normalisation as dedup.py)."""
    def grams(t):
        w = re.findall(r"\w+", dedup.clean_text(t).lower())
        return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}
    ga, gb = grams(a), grams(b)
    return len(ga & gb) / len(ga | gb) if ga | gb else 1.0


def baseline(docs, bands, rows, num_perm=128, n=5):
    """The straightforward loop: MinHash.update per shingle, then LSH query + insert."""
    lsh = MinHashLSH(num_perm=num_perm, params=(bands, rows))
    n_candidates = 0
    for i, doc in enumerate(docs):
        words = re.findall(r"\w+", doc["text"].lower())
        m = MinHash(num_perm=num_perm, seed=dedup.SEED)
        for shingle in {" ".join(words[j:j + n]) for j in range(len(words) - n + 1)}:
            m.update(shingle.encode("utf-8"))
        n_candidates += len(lsh.query(m))
        lsh.insert(i, m)
    return n_candidates


def lsh_bytes_per_doc(bands, rows, num_perm=128, n_docs=20000):
    rng = np.random.default_rng(0)
    template = MinHash(num_perm=num_perm, seed=dedup.SEED)
    tracemalloc.start()
    lsh = MinHashLSH(num_perm=num_perm, params=(bands, rows))
    for i in range(n_docs):
        sig = rng.integers(0, 2**32, num_perm, dtype=np.uint64).astype(np.uint32)
        lsh.insert(i, MinHash(seed=dedup.SEED, hashvalues=sig, permutations=template.permutations,
                              scheme=dedup.SCHEME), check_duplication=False)
    current, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return current / n_docs


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cache", default=os.environ.get("CORPUS_CACHE", "data/cache"))
    parser.add_argument("--pairs", type=int, default=600)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    scenes = pipeline.cut_scenes(pipeline.fetch_corpus(args.cache))
    variants, pairs = labelled_docs(scenes, args.pairs)
    docs = scenes + variants
    bands, rows = dedup.lsh_params(0.8, 128)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in.jsonl"
        src.write_text("".join(json.dumps(d) + "\n" for d in docs))
        n_bytes = src.stat().st_size
        print(f"input: {len(scenes)} scenes + {len(variants)} variants = {len(docs)} docs, {n_bytes/1e6:.1f} MB")

        def cpu():  # this process + reaped children (dedup.py's pool workers)
            me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
            return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime

        paths = ["(a) datasketch loop, 1 process"] + [f"(b) dedup.py --workers {w}" for w in (1, args.workers)]
        best = {name: (float("inf"), 0.0) for name in paths}  # min wall over repeats, its cpu seconds
        for _ in range(args.repeats):  # interleaved, so a burst of load on the machine hits all paths
            for name, workers in zip(paths, (0, 1, args.workers)):
                t0, c0 = time.time(), cpu()
                if workers == 0:
                    baseline(docs, bands, rows)
                else:
                    cfg = dedup.DedupConfig(out=str(Path(tmp) / f"out{workers}.jsonl"), workers=workers,
                                            removed=str(Path(tmp) / f"removed{workers}.jsonl"),
                                            report=str(Path(tmp) / f"report{workers}.json"))
                    report = dedup.run([str(src)], cfg)
                wall, cpu_s = time.time() - t0, cpu() - c0
                best[name] = min(best[name], (wall, cpu_s))
        t_base = best[paths[0]][0]
        print(f"\n{'path (best of ' + str(args.repeats) + ')':<34}{'wall s':>8}{'cpu s':>8}{'docs/s':>8}{'x (a)':>8}")
        for name, (secs, cpu_s) in best.items():
            print(f"{name:<34}{secs:>8.2f}{cpu_s:>8.2f}{len(docs) / secs:>8.0f}{t_base / secs:>8.2f}")
        print(f"machine load average while running: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        print(f"dedup.py filters removed {report['bytes']['filtered'] / report['bytes']['after_cleaning']:.3%} of "
              f"bytes; {report['stages']['near']['candidate_pairs']} candidate pairs, "
              f"{report['stages']['near']['verified_pairs']} verified")

        removed = {}
        for line in open(Path(tmp) / f"removed{args.workers}.jsonl"):
            rec = json.loads(line)
            removed[rec["id"]] = rec.get("duplicate_of")

    # Recall per bin; candidate = some band of the two signatures agrees (what the LSH tests).
    text_of = {d["id"]: d["text"] for d in docs}
    cfg = dedup.DedupConfig(out="-", no_filters=True)
    bins = [0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 1.0, 1.01]
    rows_out = {b: [] for b in bins[:-1]}
    for scene_id, variant_id, kind in pairs:
        j = true_jaccard(text_of[scene_id], text_of[variant_id])
        s1, s2 = (dedup.analyse(text_of[x], cfg, dedup.QualityThresholds())[4] for x in (scene_id, variant_id))
        cand = s1 is not None and s2 is not None and bool(
            (s1[:bands * rows].reshape(bands, rows) == s2[:bands * rows].reshape(bands, rows)).all(1).any())
        found = removed.get(variant_id) == scene_id or removed.get(scene_id) == variant_id
        lo = max(b for b in bins[:-1] if j >= b)
        rows_out[lo].append((j, cand, found))
    print(f"\nLSH {bands} bands x {rows} rows; exact Jaccard verification at 0.8")
    print(f"{'true J bin':<12}{'pairs':>6}{'mean J':>8}{'theory P(cand)':>16}{'candidates':>12}{'removed':>9}")
    for lo, hi in zip(bins[:-1], bins[1:]):
        got = rows_out[lo]
        if not got:
            continue
        mean_j = sum(g[0] for g in got) / len(got)
        theory = 1 - (1 - mean_j ** rows) ** bands
        label = "1.0" if lo == 1.0 else f"[{lo:.1f},{hi:.1f})"
        print(f"{label:<12}{len(got):>6}{mean_j:>8.3f}{theory:>16.3f}"
              f"{sum(g[1] for g in got) / len(got):>12.3f}{sum(g[2] for g in got) / len(got):>9.3f}")
    hi_pairs = [g for lo in bins[:-1] if lo >= 0.8 for g in rows_out[lo]]
    print(f"recall at J>=0.8: {sum(g[2] for g in hi_pairs)}/{len(hi_pairs)}; removed below 0.5: "
          f"{sum(g[2] for lo in (0.0, 0.3) for g in rows_out[lo])}")

    per_doc = lsh_bytes_per_doc(bands, rows)
    print(f"\nmemory: MinHashLSH index {per_doc:.0f} bytes/doc -> {per_doc * 1e6 / 2**30:.1f} GiB per million "
          f"documents (signature alone: 128 x 4 bytes = 0.48 GiB per million; not kept after insertion)")


if __name__ == "__main__":
    main()
