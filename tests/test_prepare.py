"""The committed default data (data/*.csv) and its converter (data/prepare.py)."""
import csv
import json
from pathlib import Path

import pytest

from data.prepare import COLUMNS, prepare

DATA = Path(__file__).resolve().parent.parent / "data"
RAW = DATA.parent.parent / "shared" / "data" / "raw"
FILES = ["gsm8k_train.csv", "gsm8k_val.csv", "realcritic.csv", "nemo_skills.csv"]


def read(name: str) -> list[dict]:
    with open(DATA / name, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS == ["id", "question", "answer", "solution", "is_correct"]
        return list(reader)


@pytest.fixture(scope="module")
def counts() -> dict:
    return json.loads((DATA / "prepare_counts.json").read_text())


@pytest.mark.parametrize("name", FILES)
def test_schema_and_counts(name, counts):
    rows = read(name)
    assert {r["is_correct"] for r in rows} <= {"True", "False"}
    assert len({r["id"] for r in rows}) == len(rows)
    assert all(r["question"].strip() and r["answer"].strip() and r["solution"].strip() for r in rows)
    c = counts["files"][name]
    assert len(rows) == c["rows"]
    assert sum(r["is_correct"] == "True" for r in rows) == c["true"]
    assert sum(r["is_correct"] == "False" for r in rows) == c["false"]


def test_pandas_reads_labels_as_bool():
    pd = pytest.importorskip("pandas")
    for name in FILES:
        df = pd.read_csv(DATA / name)
        assert list(df.columns) == COLUMNS and df["is_correct"].dtype == bool
        assert not df.isna().any().any(), name


def test_gsm8k_split_is_by_question(counts):
    train, val = read("gsm8k_train.csv"), read("gsm8k_val.csv")
    assert not {r["question"] for r in train} & {r["question"] for r in val}
    n_val, n_all = counts["files"]["gsm8k_val.csv"]["questions"], 1319
    assert n_val == round(0.1 * n_all)
    assert counts["files"]["gsm8k_train.csv"]["questions"] + n_val == n_all
    # 1,319 questions × 4 solutions, less the ones without an answer line (not silently lost).
    dropped = counts["dropped"]["gsm8k_openai: solution has no 'A:' answer line"]
    assert len(train) + len(val) + dropped == 4 * n_all


def test_licences_are_kept():
    for name in ("gsm8k_openai", "realcritic", "nemo_skills"):
        assert "License" in (DATA / "licenses" / f"{name}.LICENSE").read_text()[:200]


@pytest.mark.skipif(not RAW.is_dir(), reason=f"raw data not at {RAW}")
def test_rerun_reproduces_committed_files(tmp_path):
    prepare(RAW, tmp_path)
    produced = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert [str(p) for p in produced] == sorted(
        FILES + ["prepare_counts.json"]
        + [f"licenses/{n}.LICENSE" for n in ("gsm8k_openai", "nemo_skills", "realcritic")])
    for rel in produced:
        assert (tmp_path / rel).read_bytes() == (DATA / rel).read_bytes(), rel
