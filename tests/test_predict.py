"""predict.py: the submission file, IDs and order, p_true, metrics, and agreement with training."""
import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import predict
import train
from engine.build import build_model
from engine.score import metrics, roc_auc, score
from tiny import make_workdir, synthetic_rows, train_args

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model folder and an adapter trained on it for a few steps."""
    root = make_workdir(tmp_path_factory.mktemp("pred"), n_rows=160, n_val=40, seed=3)
    assert train.main(train_args(root, root / "run", "--steps", "4", "--batch-size", "2", "--grad-accum", "1",
                                 "--lr", "5e-3")) == 0
    return root


def run(trained, *args):
    return predict.main(["--model", str(trained / "model"), "--device", "cpu", *args])


def test_submission_shape_order_and_ids(trained, tmp_path):
    # Kaggle's test layout: ID first, no is_correct; rows of very different lengths, shuffled.
    df = synthetic_rows(30, seed=9).drop(columns=["is_correct", "id"])
    df["solution"] = [s * (1 + i % 5) for i, s in enumerate(df["solution"])]
    df.insert(0, "ID", [f"x{i}" for i in np.random.default_rng(0).permutation(30)])
    df.to_csv(tmp_path / "test.csv", index=False)
    sub_path = tmp_path / "new" / "dir" / "submission.csv"  # a missing folder is created
    assert run(trained, "--adapter", str(trained / "run"), "--data", str(tmp_path / "test.csv"),
               "--out", str(sub_path), "--probs", "--batch-size", "4") == 0
    sub = pd.read_csv(sub_path, dtype={"ID": str, "is_correct": str})
    assert list(sub.columns) == ["ID", "is_correct", "p_true"]
    assert sub["ID"].tolist() == df["ID"].tolist()
    assert set(sub["is_correct"]) <= {"True", "False"}
    assert sub["p_true"].between(0, 1).all()
    assert ((sub["p_true"] > 0.5) == (sub["is_correct"] == "True")).all()

    # Batch size (and so padding and grouping) does not change a row's score.
    one = tmp_path / "one.csv"
    assert run(trained, "--adapter", str(trained / "run"), "--data", str(tmp_path / "test.csv"),
               "--out", str(one), "--probs", "--batch-size", "1") == 0
    np.testing.assert_allclose(pd.read_csv(one)["p_true"], sub["p_true"], atol=1e-5)


def test_score_batches_by_token_count_and_merge_keeps_scores(trained, tmp_path):
    import torch
    from data.batches import RowDataset
    from data.prompt import DEFAULT_PROMPT, Encoder
    from data.read import read_table
    from model.tokenizer import Tokenizer
    df = synthetic_rows(24, seed=5)
    # Character length misleads: common words are ~1 token per word, a Cyrillic letter 2 tokens.
    df["solution"] = [("We add 3 and 4. " * (2 + i % 7)) if i % 2 else "ж" * (10 + 9 * (i % 5)) for i in range(24)]
    df.to_csv(tmp_path / "d.csv", index=False)
    table, _ = read_table(tmp_path / "d.csv")
    tok = Tokenizer.from_dir(trained / "model")
    ds = RowDataset(table, Encoder(tok, DEFAULT_PROMPT, 2048, "answer"), pad_id=tok.pad_id)
    cpu = torch.device("cpu")
    model = build_model(trained / "model", "fp32", cpu, trained / "run")
    shapes = []
    hook = model.register_forward_pre_hook(lambda m, a: shapes.append(tuple(a[0].shape)))
    ref = score(model, ds, 1, cpu, tok.label_ids(), progress=False)  # no padding at all
    shapes.clear()
    got = score(model, ds, 4, cpu, tok.label_ids(), progress=False, chunk_rows=8)  # 3 chunks
    hook.remove()
    np.testing.assert_allclose(got, ref, atol=1e-5)  # written back in row order across chunks
    n_tok = np.array([len(ds[i]["input_ids"]) for i in range(len(ds))])
    chunks = [n_tok[c] for c in np.array_split(np.argsort(ds.lengths, kind="stable"), 3)]  # 8 rows each

    def slots(chunks):  # padded positions computed, batches of 4 cut from each chunk in order
        return sum(4 * max(ch[k:k + 4]) for ch in chunks for k in (0, 4))
    assert sum(b * t for b, t in shapes) == slots([np.sort(ch) for ch in chunks])  # batches by token count
    assert slots([np.sort(ch) for ch in chunks]) < slots(chunks)  # which beats batches by character count

    merged = build_model(trained / "model", "fp32", cpu, trained / "run", merge=True)
    from lora.lora import LoRALinear
    assert all(m.merged for m in merged.modules() if isinstance(m, LoRALinear))
    np.testing.assert_allclose(score(merged, ds, 4, cpu, tok.label_ids(), progress=False), ref, atol=1e-5)


def test_ids_default_to_row_numbers_and_existing_file_is_overwritten(trained, tmp_path, capsys):
    synthetic_rows(6, seed=2).drop(columns=["id"]).to_csv(tmp_path / "d.csv", index=False)
    out = tmp_path / "s.csv"
    out.write_text("old\n")
    assert run(trained, "--data", str(tmp_path / "d.csv"), "--out", str(out)) == 0  # no adapter: zero-shot
    assert "overwriting" in capsys.readouterr().err
    assert pd.read_csv(out)["ID"].tolist() == list(range(6))


def test_scores_equal_training_evaluation(trained, tmp_path):
    m_file = tmp_path / "m.json"
    assert run(trained, "--adapter", str(trained / "run" / "adapter_model.safetensors"),
               "--data", str(trained / "val.csv"), "--out", str(tmp_path / "s.csv"), "--metrics", str(m_file)) == 0
    got = json.loads(m_file.read_text())
    final = json.loads((trained / "run" / "summary.json").read_text())["final"]
    assert got.pop("confusion") == final.pop("confusion")
    assert got == pytest.approx(final, rel=1e-12)


def test_metrics_match_hand_computation():
    y = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    p = np.array([0.9, 0.6, 0.4, 0.7, 0.2, 0.1, 0.3, 0.55])
    m = metrics(y, p)
    # pred True: rows 0,1,3,7 -> tp=3 (0,1,7), fp=1 (3); fn=1 (2); tn=3
    assert m["confusion"] == {"tp": 3, "fp": 1, "fn": 1, "tn": 3}
    assert m["accuracy"] == 6 / 8 and m["precision"] == 3 / 4 and m["recall"] == 3 / 4
    assert m["f1"] == pytest.approx(0.75)
    pairs = [(a, b) for a, b in itertools.product(p[y == 1], p[y == 0])]
    assert m["auc"] == pytest.approx(sum(a > b for a, b in pairs) / len(pairs))
    assert roc_auc(np.array([1, 0, 1, 0]), np.array([0.5, 0.5, 0.5, 0.5])) == 0.5  # ties count half


def test_bad_rows_error_or_fallback(trained, tmp_path):
    df = synthetic_rows(5, seed=4).drop(columns=["is_correct"])
    df.loc[2, "question"] = ""
    df.to_csv(tmp_path / "bad.csv", index=False)
    cmd = [sys.executable, str(REPO / "predict.py"), "--model", str(trained / "model"), "--device", "cpu",
           "--data", str(tmp_path / "bad.csv"), "--out", str(tmp_path / "s.csv")]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 2
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "bad.csv" in lines[0] and "row 3" in lines[0], p.stderr
    assert run(trained, "--data", str(tmp_path / "bad.csv"), "--out", str(tmp_path / "s.csv"), "--skip-bad-rows") == 0
    sub = pd.read_csv(tmp_path / "s.csv")
    assert len(sub) == 5 and sub["ID"].tolist() == df["id"].tolist()
    assert not sub.loc[2, "is_correct"]  # the stated fallback


def test_warns_when_max_len_differs_from_training(trained, tmp_path, capsys):
    assert run(trained, "--adapter", str(trained / "run"), "--data", str(trained / "val.csv"),
               "--out", str(tmp_path / "s.csv"), "--max-seq-len", "100") == 0
    assert "trained with max_seq_len=128, scoring with 100" in capsys.readouterr().err


def test_blank_labels_in_a_test_file_are_unlabelled(trained, tmp_path):
    df = synthetic_rows(6, seed=6).rename(columns={"id": "ID"})
    df["is_correct"] = df["is_correct"].astype(str)
    df.loc[[1, 4], "is_correct"] = ""
    df.to_csv(tmp_path / "t.csv", index=False)
    m = tmp_path / "m.json"
    assert run(trained, "--data", str(tmp_path / "t.csv"), "--out", str(tmp_path / "s.csv"), "--metrics", str(m)) == 0
    assert len(pd.read_csv(tmp_path / "s.csv")) == 6
    assert json.loads(m.read_text())["n"] == 4  # metrics on the labelled rows only
