"""Accuracy beyond the 0.5 cut, measured on data no tuning saw: the base model, one adapter at 0.5,
the same adapter at its tuned threshold, and an ensemble of adapters trained with other seeds.

    python -m bench.accuracy                                   # the README's table (~40 min on 2 CPU cores)
    python -m bench.accuracy --seeds 42 --steps 2 --rows 20    # smoke test

Everything runs through the real command lines: `python train.py` once per seed (the README's
main command with --seed S; each run tunes its threshold on its 200 validation rows of
data/gsm8k_val.csv), then `python predict.py --probs --threshold 0.5` per adapter and evaluation
set. Evaluation sets: data/realcritic.csv without the rows whose question also occurs in the
GSM8K files (data/README.md: all its GSM8K part), and data/nemo_skills.csv. The ensemble's
p_true is the mean of its members' (what `predict.py --adapter A B C` computes; tested in
tests/test_predict.py), decided at 0.5. Printed: accuracy and ROC-AUC per row and set, beside
each set's majority-class accuracy.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from bench.common import REPO
from engine.score import metrics
from lora.io import read_record

MAIN = ["--steps", "30", "--grad-accum", "1", "--max-seq-len", "384", "--val-rows", "200"]


def eval_sets(work: Path, rows: int | None) -> dict[str, Path]:
    """{name: csv}: RealCritic minus the GSM8K questions, and NeMo-Skills (first `rows` of each)."""
    gsm = pd.concat([pd.read_csv(REPO / "data" / f, dtype=str) for f in ("gsm8k_train.csv", "gsm8k_val.csv")])
    seen = set(gsm["question"].str.strip())
    rc = pd.read_csv(REPO / "data" / "realcritic.csv", dtype=str)
    rc = rc[~rc["question"].str.strip().isin(seen)]
    ns = pd.read_csv(REPO / "data" / "nemo_skills.csv", dtype=str)
    out = {}
    for name, df in (("RealCritic minus GSM8K", rc), ("NeMo-Skills", ns)):
        f = work / (name.split()[0].lower() + ".csv")
        (df.head(rows) if rows else df).to_csv(f, index=False)
        out[name] = f
    return out


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


def probs(adapter: Path | None, data: Path, out: Path) -> np.ndarray:
    if not out.is_file():
        run([sys.executable, "predict.py", "--data", str(data), "--out", str(out), "--probs", "--threshold", "0.5",
             *(["--adapter", str(adapter)] if adapter else ["--precision", "int8"])])
    return pd.read_csv(out)["p_true"].to_numpy()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.accuracy", description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="42,43,44", help="one adapter per seed; the first is 'one adapter'")
    p.add_argument("--work", default="runs/accuracy", help="runs, evaluation files and probabilities")
    p.add_argument("--rows", type=int, help="score only the first N rows of each set (smoke tests)")
    args, train_flags = p.parse_known_args(argv)
    work = (REPO / args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    flags = MAIN + train_flags
    for s in seeds:
        if not (work / f"seed{s}" / "summary.json").is_file():
            t0 = time.perf_counter()
            run([sys.executable, "train.py", *flags, "--seed", str(s), "--out", str(work / f"seed{s}"), "--overwrite"])
            print(f"train.py seed {s}: {time.perf_counter() - t0:.0f} s wall", file=sys.stderr, flush=True)
    sets = eval_sets(work, args.rows)
    first = work / f"seed{seeds[0]}"
    tuned = read_record(first)
    t = tuned.get("threshold")
    rows = []
    for name, data in sets.items():
        y = pd.read_csv(data, dtype=str)["is_correct"].str.lower().eq("true").to_numpy()
        tag = data.stem
        base = probs(None, data, work / f"{tag}.base.csv")
        members = [probs(work / f"seed{s}", data, work / f"{tag}.seed{s}.csv") for s in seeds]
        cases = [("base model (no adapter), 0.5", base, 0.5),
                 (f"one adapter (seed {seeds[0]}), 0.5", members[0], 0.5)]
        if t is not None:
            cases.append((f"same adapter, tuned threshold {t:.3f} ({tuned['threshold_rows']} GSM8K val rows)",
                          members[0], t))
        if len(seeds) > 1:
            cases.append((f"ensemble of {len(seeds)} seeds (mean p_true), 0.5", np.mean(members, axis=0), 0.5))
        for what, pt, cut in cases:
            m = metrics(y, pt, threshold=cut)
            rows.append(dict(set=name, n=len(y), majority=max(y.mean(), 1 - y.mean()), what=what,
                             accuracy=m["accuracy"], auc=m["auc"]))
    (work / "accuracy.json").write_text(json.dumps(rows, indent=1))
    names = list(sets)
    print(f"\n| | {' | '.join(f'{n}: acc | AUC' for n in names)} |")
    print("| --- |" + " --- | --- |" * len(names))
    maj = {r["set"]: (r["majority"], r["n"]) for r in rows}
    print("| majority class (n rows) | " + " | ".join(f"{maj[n][0]:.4f} | ({maj[n][1]} rows)" for n in names) + " |")
    for what in dict.fromkeys(r["what"] for r in rows):
        cells = []
        for n in names:
            r = next(r for r in rows if r["set"] == n and r["what"] == what)
            cells.append(f"{r['accuracy']:.4f} | {r['auc']:.4f}" if r["auc"] is not None else f"{r['accuracy']:.4f} | n/a")
        print(f"| {what} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
