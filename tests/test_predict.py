"""predict.py: the submission file, IDs and order, p_true, metrics, and agreement with training."""
import itertools
import json
import os
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
from lora.io import load_adapter
from tiny import make_workdir, synthetic_rows, train_args

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model folder and an adapter trained on it for a few steps."""
    root = make_workdir(tmp_path_factory.mktemp("pred"), n_rows=160, n_val=40, seed=3)
    assert train.main(train_args(root, root / "run", "--steps", "4", "--batch-size", "2", "--grad-accum", "1",
                                 "--lr", "5e-3", "--activations", "fp32")) == 0  # exact: batching changes no bit
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
    model = load_adapter(build_model(trained / "model", "fp32", cpu), trained / "run")
    shapes = []
    hook = model.model.embed_tokens.register_forward_pre_hook(lambda m, a: shapes.append(tuple(a[0].shape)))
    ref = score(model, ds, 1, cpu, tok.label_ids(), progress=False)  # no padding at all (and no sharing)
    shapes.clear()
    got = score(model, ds, 4, cpu, tok.label_ids(), progress=False, chunk_rows=8, share=False)  # 3 chunks
    hook.remove()
    np.testing.assert_allclose(got, ref, atol=1e-5)  # written back in row order across chunks
    n_tok = np.array([len(ds[i]["input_ids"]) for i in range(len(ds))])
    chunks = [n_tok[c] for c in np.array_split(np.argsort(ds.lengths, kind="stable"), 3)]  # 8 rows each

    def slots(chunks):  # padded positions computed, batches of 4 cut from each chunk in order
        return sum(4 * max(ch[k:k + 4]) for ch in chunks for k in (0, 4))
    assert sum(b * t for b, t in shapes) == slots([np.sort(ch) for ch in chunks])  # batches by token count
    assert slots([np.sort(ch) for ch in chunks]) < slots(chunks)  # which beats batches by character count
    shared = score(model, ds, 4, cpu, tok.label_ids(), progress=False, chunk_rows=8)  # the default: shared prefixes
    np.testing.assert_allclose(shared, ref, atol=1e-5)

    from engine.score import score_adapters  # predict.py's path: one adapter folded into fp32 weights
    from lora.lora import LoRALinear
    base = build_model(trained / "model", "fp32", cpu)
    got = score_adapters(base, [trained / "run"], ds, 4, cpu, tok.label_ids(), merge=True)
    assert all(m.merged for m in base.modules() if isinstance(m, LoRALinear))
    np.testing.assert_allclose(got, ref, atol=1e-5)


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


# ---------------------------------------------------------------------------- the file alone

def test_a_lone_copy_of_the_adapter_file_scores_as_its_folder(trained, tmp_path):
    # The card's command: the adapter file copied somewhere under another name, nothing beside it.
    lone = tmp_path / "somewhere" / "ckpt.safetensors"
    lone.parent.mkdir()
    lone.write_bytes((trained / "run" / "adapter_model.safetensors").read_bytes())
    outs = {}
    for name, adapter in (("folder", trained / "run"), ("lone", lone)):
        outs[name] = tmp_path / f"{name}.csv"
        assert predict.main(["--adapter", str(adapter), "--data", str(trained / "val.csv"), "--device", "cpu",
                             "--out", str(outs[name]), "--probs"]) == 0  # no --model: the run's base
    a, b = pd.read_csv(outs["folder"]), pd.read_csv(outs["lone"])
    assert a.equals(b)
    from lora.merge import main as merge_main
    assert merge_main(["--model", str(trained / "model"), "--adapter", str(lone), "--out", str(tmp_path / "m"),
                       "--dtype", "fp32"]) == 0


def test_the_adapter_file_carries_its_run(trained):
    from lora.io import read_adapter_config, read_record
    f = trained / "run" / "adapter_model.safetensors"
    run = read_record(f)
    assert run["max_seq_len"] == 128 and run["precision"] == "int8"  # the default
    assert run["prompt"] == (trained / "prompt.txt").read_text() and Path(run["model_dir"]).is_absolute()
    assert read_adapter_config(f)["r"] == 4
    for sub in ("best", "checkpoint"):
        assert read_record(trained / "run" / sub) == run


# ---------------------------------------------------------------------------- outputs and faults

def test_outputs_that_would_overwrite_an_input_or_cannot_be_written_are_refused_first(trained, tmp_path, monkeypatch):
    data = tmp_path / "test.csv"
    data.write_bytes((trained / "val.csv").read_bytes())
    import engine.build
    monkeypatch.setattr(engine.build, "load_model", lambda *a, **k: pytest.fail("loaded the model first"))
    for flag, target, msg in (("--out", data, "would overwrite an input"),
                              ("--metrics", trained / "run" / "adapter_model.safetensors", "would overwrite an input"),
                              ("--out", trained / "model" / "sub.csv", "would overwrite an input")):
        extra = ["--out", str(tmp_path / "s.csv")] if flag == "--metrics" else []
        with pytest.raises(predict.UserError, match=msg):
            run(trained, "--adapter", str(trained / "run"), "--data", str(data), flag, str(target), *extra)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if not os.access(ro, os.W_OK):  # (root may write anyway)
            with pytest.raises(predict.UserError, match="not writable"):
                run(trained, "--data", str(data), "--out", str(ro / "s.csv"))
    finally:
        ro.chmod(0o700)
    assert data.read_bytes() == (trained / "val.csv").read_bytes()


def test_a_full_disk_at_the_end_is_one_line_and_keeps_the_scores(trained, tmp_path, monkeypatch):
    import common.files
    real = common.files.atomic_write

    def full(path, write):
        if str(path).endswith("s.csv"):
            raise OSError(28, "No space left on device")
        return real(path, write)
    monkeypatch.setattr(predict, "atomic_write", full)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    with pytest.raises(predict.UserError, match=r"s.csv: cannot write it \(No space left on device\); the scores are "
                                                r"saved in (\S+)") as e:
        run(trained, "--data", str(trained / "val.csv"), "--out", str(tmp_path / "s.csv"))
    kept = Path(str(e.value).rsplit(" ", 1)[1])
    assert kept.is_file() and len(pd.read_csv(kept)) == 40
    assert not list(tmp_path.glob(".s.csv*")) and not (tmp_path / "s.csv").exists()


def test_non_finite_logits_are_an_error_naming_the_rows(trained, tmp_path, monkeypatch):
    import engine.score
    real = engine.score.score

    def nan_rows(model, ds, *a, **k):
        p = real(model, ds, *a, **k)
        p[[3, 7]] = np.nan
        return p
    monkeypatch.setattr(engine.score, "score", nan_rows)
    with pytest.raises(predict.UserError, match=r"non-finite logits for 2 of 40 rows \(first: ID 'r123'\)"):
        run(trained, "--data", str(trained / "val.csv"), "--out", str(tmp_path / "s.csv"))
    assert not (tmp_path / "s.csv").exists()


def test_duplicate_ids_are_warned_about(trained, tmp_path, capsys):
    df = synthetic_rows(6, seed=2).drop(columns=["is_correct"]).rename(columns={"id": "ID"})
    df.loc[4, "ID"] = df.loc[1, "ID"]
    df.to_csv(tmp_path / "t.csv", index=False)
    assert run(trained, "--data", str(tmp_path / "t.csv"), "--out", str(tmp_path / "s.csv")) == 0
    assert "repeats 1 ID(s) (first: 'r1')" in capsys.readouterr().err
    assert len(pd.read_csv(tmp_path / "s.csv")) == 6


# ---------------------------------------------------------------------------- threshold, ensembles

def test_threshold_flag_decides(trained, tmp_path):
    for t in ("0.0", "1.0"):
        assert run(trained, "--adapter", str(trained / "run"), "--data", str(trained / "val.csv"),
                   "--out", str(tmp_path / "s.csv"), "--threshold", t) == 0
        assert set(pd.read_csv(tmp_path / "s.csv", dtype=str)["is_correct"]) == {"True" if t == "0.0" else "False"}
    with pytest.raises(predict.UserError, match="--threshold 2"):
        run(trained, "--data", str(trained / "val.csv"), "--out", str(tmp_path / "s.csv"), "--threshold", "2")


def test_ensembles_average_probabilities_and_load_the_base_once(trained, tmp_path, monkeypatch):
    second = tmp_path / "second"
    assert train.main(train_args(trained, second, "--steps", "3", "--batch-size", "2", "--grad-accum", "1",
                                 "--lr", "5e-3", "--seed", "7", "--activations", "fp32")) == 0
    import engine.build
    loads = []
    real = engine.build.load_model
    monkeypatch.setattr(engine.build, "load_model", lambda *a, **k: loads.append(1) or real(*a, **k))

    def p_true(*adapters):
        loads.clear()
        out = tmp_path / "p.csv"
        assert run(trained, "--adapter", *map(str, adapters), "--data", str(trained / "val.csv"), "--out", str(out),
                   "--probs") == 0
        assert len(loads) == 1  # the base is loaded once, whatever the number of adapters
        return pd.read_csv(out)["p_true"].to_numpy()
    a, b = p_true(trained / "run"), p_true(second)
    np.testing.assert_allclose(p_true(trained / "run", trained / "run"), a, atol=1e-6)  # one adapter twice = it
    np.testing.assert_allclose(p_true(trained / "run", second), (a + b) / 2, atol=1e-6)
    assert np.abs(a - b).max() > 1e-3  # two different adapters, so the mean is a real check


def test_best_threshold_finds_the_known_cut_and_prefers_the_one_nearest_half():
    from engine.score import best_threshold
    y = np.array([0, 0, 0, 1, 0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.35, 0.4, 0.6, 0.7, 0.8])
    t, acc = best_threshold(y, p)  # cutting between 0.4 and 0.6 misses only row 3: 7/8
    assert acc == 7 / 8 and 0.4 < t < 0.6 and t == 0.5  # 0.5 itself is among the best cuts
    t, acc = best_threshold(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.3, 0.9]))  # best: 0.2 < t < 0.3
    assert acc == 1.0 and t == pytest.approx(0.25)
    # Two equally good cuts (0.15 and 0.75): the one nearer 0.5 wins.
    t, acc = best_threshold(np.array([0, 1, 0, 1]), np.array([0.1, 0.2, 0.7, 0.8]))
    assert acc == 0.75 and t == pytest.approx(0.75)


def test_predict_uses_the_adapters_tuned_threshold_unless_told(trained, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file
    src = trained / "run" / "adapter_model.safetensors"
    with safe_open(str(src), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    run_meta = json.loads(meta["run"])
    lone = tmp_path / "tuned.safetensors"
    save_file(tensors, str(lone), metadata={**meta, "run": json.dumps({**run_meta, "threshold": 0.999,
                                                                         "threshold_rows": 500})})
    assert run(trained, "--adapter", str(lone), "--data", str(trained / "val.csv"), "--out", str(tmp_path / "a.csv"),
               "--probs") == 0
    assert "True when p_true > 0.999 (tuned on 500 validation rows)" in capsys.readouterr().err
    a = pd.read_csv(tmp_path / "a.csv", dtype={"is_correct": str})
    assert ((a["p_true"] > 0.999) == (a["is_correct"] == "True")).all()
    assert run(trained, "--adapter", str(lone), "--data", str(trained / "val.csv"), "--out", str(tmp_path / "b.csv"),
               "--probs", "--threshold", "0.5") == 0
    b = pd.read_csv(tmp_path / "b.csv", dtype={"is_correct": str})
    assert ((b["p_true"] > 0.5) == (b["is_correct"] == "True")).all()
    assert (a["is_correct"] != b["is_correct"]).any()


def test_training_reports_and_records_the_threshold(trained):
    recs = [json.loads(l) for l in (trained / "run" / "metrics.jsonl").read_text().splitlines()]
    th = [r["threshold"] for r in recs if "eval" in r]
    assert th and all(t["rows"] == 40 and t["threshold"] is None for t in th)  # 40 < MIN_TUNE_ROWS: not used
    from lora.io import read_record
    assert read_record(trained / "run")["threshold"] is None and read_record(trained / "run")["threshold_rows"] == 40
