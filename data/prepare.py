"""Turn the raw public math-verification sets into the contest schema: id,question,answer,solution,is_correct.

Sources (see ../shared/data/SOURCES.md and data/README.md for repos, paths and commits):
  gsm8k_openai  openai/grade-school-math example_model_solutions.jsonl (MIT): 1,319 GSM8K test
                questions × 4 model solutions (6B/175B, finetuning/verification), graded.
  realcritic    tangzhy/RealCritic data/mix_data/{gsm8k,math,minerva_math}/test.jsonl (MIT).
  nemo_skills   NVIDIA NeMo-Skills test fixtures, de-duplicated (Apache-2.0).

Writes gsm8k_train.csv / gsm8k_val.csv (split by question: all four solutions of a question
stay on one side), realcritic.csv and nemo_skills.csv (evaluation sets), licenses/<set>.LICENSE,
and prepare_counts.json (rows, labels, dropped rows by reason) for tests/test_prepare.py.
Rows that cannot be mapped are counted and reported, never dropped silently or filled in.
Output is deterministic: re-running it reproduces the committed files byte for byte.

    python -m data.prepare [--raw ../shared/data/raw] [--out data/]
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

COLUMNS = ["id", "question", "answer", "solution", "is_correct"]
GSM8K_MODELS = ["6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification"]
REALCRITIC_SETS = ["gsm8k", "math", "minerva_math"]
VAL_FRACTION = 0.1
SPLIT_SEED = "gsm8k-split-v1"  # changing it moves questions between train and val
REPO_ROOT = Path(__file__).resolve().parent.parent


class PrepareError(ValueError):
    """A raw file that does not look the way SOURCES.md says."""


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise PrepareError(f"{path}: not found (pass --raw)")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise PrepareError(f"{path}:{n}: not JSON ({e})") from None
    return rows


def as_bool(value, where: str) -> bool:
    """A label: a bool, "True"/"False", or a one-element list of either (RealCritic's "[True]")."""
    if isinstance(value, str) and value.strip().startswith("["):
        value = json.loads(value.strip().lower())
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, str) and value.strip() in ("True", "False", "true", "false"):
        value = value.strip().lower() == "true"
    if not isinstance(value, bool):
        raise PrepareError(f"{where}: label {value!r} is not True/False")
    return value


def final_answer(solution: str) -> str | None:
    """The text after the last line starting with "A:" (GSM8K's answer line), or None."""
    lines = [ln for ln in solution.split("\n") if ln.startswith("A:")]
    return lines[-1][2:].strip() if lines else None


def gsm8k(raw: Path, dropped: Counter) -> tuple[list[dict], list[dict], Counter]:
    src = raw / "gsm8k_openai" / "example_model_solutions.jsonl"
    records = read_jsonl(src)
    # Split by question: order questions by a seeded hash and send the first 10% to validation.
    # A hash, not an RNG, so the split is the same on every Python/numpy version.
    key = lambda i: hashlib.sha256(f"{SPLIT_SEED}:{records[i]['question']}".encode()).hexdigest()  # noqa: E731
    val_q = set(sorted(range(len(records)), key=key)[:round(VAL_FRACTION * len(records))])
    train, val, notes = [], [], Counter()
    for qi, rec in enumerate(records):
        for model in GSM8K_MODELS:
            sol = rec[model]["solution"]
            answer = final_answer(sol)
            if answer is None:  # cut off mid-generation: there is no model answer to judge
                dropped["gsm8k_openai: solution has no 'A:' answer line"] += 1
                continue
            if not answer.replace(",", "").replace(".", "", 1).lstrip("-").isdigit():
                notes["gsm8k_openai: answer is not a plain number (kept verbatim)"] += 1
            row = dict(id=f"gsm8k-{qi:04d}-{model}", question=rec["question"], answer=answer,
                       solution=sol, is_correct=as_bool(rec[model]["is_correct"], f"{src}:{qi + 1}"))
            (val if qi in val_q else train).append(row)
    return train, val, notes


def realcritic(raw: Path, dropped: Counter) -> list[dict]:
    rows = []
    for name in REALCRITIC_SETS:
        src = raw / "realcritic" / name / "test.jsonl"
        for n, rec in enumerate(read_jsonl(src), 1):
            # `answer`/`gt` are the ground truth; `pred` is what the model answered.
            if not str(rec.get("pred", "")).strip():
                dropped[f"realcritic/{name}: empty pred"] += 1
                continue
            rows.append(dict(id=f"realcritic-{name}-{rec['idx']:04d}", question=rec["question"],
                             answer=str(rec["pred"]), solution=rec["reasoning"],
                             is_correct=as_bool(rec["previous_score"], f"{src}:{n}")))
    return rows


def nemo_skills(raw: Path, dropped: Counter) -> list[dict]:
    src = raw / "nemo_skills" / "labeled.jsonl"
    rows = []
    for n, rec in enumerate(read_jsonl(src)):
        pred = rec.get("predicted_answer")
        if pred is None or not str(pred).strip():  # no \boxed{} / code never ran: nothing to judge
            dropped["nemo_skills: no predicted_answer"] += 1
            continue
        rows.append(dict(id=f"nemo-{n:04d}", question=rec["question"], answer=str(pred),
                         solution=rec["generated_solution"],
                         is_correct=as_bool(rec["is_correct"], f"{src}:{n + 1}")))
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")  # \n: same bytes on every OS
        w.writeheader()
        for r in rows:
            w.writerow({**r, "is_correct": "True" if r["is_correct"] else "False"})


def prepare(raw: str | Path, out: str | Path) -> dict:
    """Convert every set under `raw` into CSVs under `out`; returns (and writes) the counts."""
    raw, out = Path(raw), Path(out)
    dropped: Counter = Counter()
    train, val, notes = gsm8k(raw, dropped)
    tables = {"gsm8k_train": train, "gsm8k_val": val,
              "realcritic": realcritic(raw, dropped), "nemo_skills": nemo_skills(raw, dropped)}
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in tables.items():
        write_csv(out / f"{name}.csv", rows)
    (out / "licenses").mkdir(exist_ok=True)
    for name in ("gsm8k_openai", "realcritic", "nemo_skills"):
        shutil.copyfile(raw / name / "LICENSE", out / "licenses" / f"{name}.LICENSE")

    # GSM8K questions that also appear in an evaluation set: worth knowing before trusting a score.
    q = lambda rows: {r["question"].strip() for r in rows}  # noqa: E731
    rc_gsm8k = q(r for r in tables["realcritic"] if r["id"].startswith("realcritic-gsm8k-"))
    counts = {
        "files": {f"{name}.csv": {"rows": len(rows),
                                  "questions": len(q(rows)),
                                  "true": sum(r["is_correct"] for r in rows),
                                  "false": sum(not r["is_correct"] for r in rows)}
                  for name, rows in tables.items()},
        "dropped": dict(sorted(dropped.items())),
        "notes": dict(sorted(notes.items())),
        "question_overlap": {
            "gsm8k_train & gsm8k_val": len(q(train) & q(val)),
            "realcritic/gsm8k & gsm8k_train": len(rc_gsm8k & q(train)),
            "realcritic/gsm8k & gsm8k_val": len(rc_gsm8k & q(val)),
            "nemo_skills & gsm8k_train+val": len(q(tables["nemo_skills"]) & (q(train) | q(val))),
        },
    }
    (out / "prepare_counts.json").write_text(json.dumps(counts, indent=2) + "\n", encoding="utf-8")
    return counts


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Convert the raw public sets into contest-schema CSVs.")
    p.add_argument("--raw", default=str(REPO_ROOT.parent / "shared" / "data" / "raw"),
                   help="folder holding gsm8k_openai/, realcritic/, nemo_skills/ (default ../shared/data/raw)")
    p.add_argument("--out", default=str(REPO_ROOT / "data"), help="output folder (default data/)")
    args = p.parse_args(argv)
    counts = prepare(args.raw, args.out)
    for name, c in counts["files"].items():
        print(f"{name:18s} {c['rows']:5d} rows  {c['questions']:4d} questions  "
              f"{c['true']:5d} True  {c['false']:5d} False")
    for what in ("dropped", "notes"):
        for reason, n in counts[what].items():
            print(f"{what}: {n:4d}  {reason}")
    for pair, n in counts["question_overlap"].items():
        print(f"shared questions: {n:4d}  {pair}")


if __name__ == "__main__":
    main()
