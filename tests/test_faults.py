"""Faults an outside battery found: lost work, silent wrong results, tracebacks for mistakes.
Each test reproduces one case (the issue's numbering in brackets) on the tiny model."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

import engine.checkpoint
import engine.loss
import predict
import train
from common.errors import UserError
from engine.score import metrics
from tiny import make_workdir, synthetic_rows, train_args

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_workdir(tmp_path_factory.mktemp("faults"), n_rows=120, n_val=20, seed=2)


def args(tiny, out, *extra):
    return train_args(tiny, out, "--batch-size", "2", "--grad-accum", "1", *extra)


def steps_of(out):
    return [r["step"] for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


# ---------------------------------------------------------------------------- lost or corrupted work

def test_1_a_second_run_on_the_same_out_is_refused_naming_the_holder(tiny, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args(tiny, out, "--steps", "200")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while not (out / "metrics.jsonl").is_file():
            assert proc.poll() is None and time.time() - t0 < 120, proc.stderr.read() if proc.poll() else "timeout"
            time.sleep(0.1)
        with pytest.raises(UserError, match=rf"in use by another train.py run \(pid {proc.pid}\)"):
            train.main(args(tiny, out, "--steps", "2", "--resume"))
    finally:
        proc.kill()
        proc.wait()
    # The killed run's lock died with it: the folder is usable again.
    assert train.main(args(tiny, out, "--steps", "1", "--overwrite")) == 0


def test_4_a_full_disk_is_one_line_naming_the_intact_checkpoint(tiny, tmp_path, monkeypatch):
    out = tmp_path / "full"
    real, n = engine.checkpoint.save_file, []

    def save_file_until_full(tensors, path, *a, **k):
        n.append(1)
        if len(n) > 1:  # the second checkpoint finds the disk full
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *a, **k)
    monkeypatch.setattr(engine.checkpoint, "save_file", save_file_until_full)
    with pytest.raises(UserError, match=r"No space left on device\); the last complete checkpoint is "
                                        r".*checkpoint \(step 1\)"):
        train.main(args(tiny, out, "--steps", "3", "--save-every", "1"))
    assert not (out / "checkpoint.tmp").exists()
    monkeypatch.setattr(engine.checkpoint, "save_file", real)  # space freed
    assert train.main(args(tiny, out, "--steps", "3", "--save-every", "1", "--resume")) == 0
    assert steps_of(out) == [1, 2, 3]


def test_5_resume_picks_the_newest_complete_checkpoint_or_names_the_broken_file(tiny, tmp_path, capsys):
    out = tmp_path / "torn"
    assert train.main(args(tiny, out, "--steps", "2", "--save-every", "1")) == 0
    ck = out / "checkpoint"
    # A kill mid-save: checkpoint.old complete (step 2), checkpoint.tmp with a torn trainer.json.
    shutil.copytree(ck, out / "checkpoint.tmp")
    ck.rename(out / "checkpoint.old")
    meta = (out / "checkpoint.tmp" / "trainer.json").read_text()
    (out / "checkpoint.tmp" / "trainer.json").write_text(meta[:len(meta) // 2])
    assert engine.checkpoint.find_checkpoint(ck) == out / "checkpoint.old"
    assert train.main(args(tiny, out, "--steps", "2", "--save-every", "1", "--resume")) == 0
    assert f"resuming from {out / 'checkpoint.old'} (step 2)" in capsys.readouterr().err
    # A truncated state.safetensors in the only checkpoint: the error names that file.
    shutil.rmtree(out / "checkpoint.tmp")
    (out / "checkpoint.old").rename(ck)
    state = ck / "state.safetensors"
    state.write_bytes(state.read_bytes()[:-100])
    with pytest.raises(UserError, match=r"no checkpoint in .* is complete \(.*state.safetensors: unreadable"):
        train.main(args(tiny, out, "--steps", "2", "--save-every", "1", "--resume"))


def test_6_a_second_sigterm_during_the_save_does_not_tear_it(tiny, tmp_path, monkeypatch):
    out = tmp_path / "twice"
    real = engine.checkpoint.save_file

    def save_under_fire(tensors, path, *a, **k):
        os.kill(os.getpid(), signal.SIGTERM)  # as `timeout` sends it, twice, while the save runs
        os.kill(os.getpid(), signal.SIGTERM)
        return real(tensors, path, *a, **k)
    monkeypatch.setattr(engine.checkpoint, "save_file", save_under_fire)
    assert train.main(args(tiny, out, "--steps", "5", "--save-every", "2")) == 128 + signal.SIGTERM
    monkeypatch.setattr(engine.checkpoint, "save_file", real)
    assert engine.checkpoint.checkpoint_problem(out / "checkpoint") is None
    assert json.loads((out / "checkpoint" / "trainer.json").read_text())["step"] == 2


# ---------------------------------------------------------------------------- silent wrong results

def test_7_an_empty_validation_side_is_refused_and_metrics_json_is_valid(tiny, tmp_path):
    one = tmp_path / "one.csv"
    synthetic_rows(1, seed=3).to_csv(one, index=False)
    a = [x for x in args(tiny, tmp_path / "o") if x not in ("--val-file", str(tiny / "val.csv"))]
    with pytest.raises(UserError, match="no validation rows left"):
        train.main(a[:a.index("--data") + 1] + [str(one)] + a[a.index("--data") + 2:] + ["--steps", "1"])
    m = metrics(np.array([1, 1, 1]), np.array([0.9, 0.2, 0.7]))  # one class only: AUC undefined
    assert m["auc"] is None and json.loads(json.dumps(m, allow_nan=False)) == m


def test_8_nan_weights_are_an_error_not_a_submission_of_false(tiny, tmp_path):
    bad = tmp_path / "nanmodel"
    shutil.copytree(tiny / "model", bad)
    sd = load_file(str(bad / "model.safetensors"))
    sd["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"non-finite logits for 20 of 20 rows \(first: ID 'r100'\)"):
        predict.main(["--model", str(bad), "--device", "cpu", "--data", str(tiny / "val.csv"),
                      "--out", str(tmp_path / "s.csv")])
    assert not (tmp_path / "s.csv").exists()


@pytest.mark.parametrize("flags, msg", [(["--alpha", "0"], "--alpha must be greater than 0"),
                                        (["--lr", "-1"], "--lr must be greater than 0"),
                                        (["--weight-decay", "-1"], "--weight-decay must not be negative"),
                                        (["--val-rows", "-5"], "--val-rows must be at least 1"),
                                        (["--device", "tpu"], "--device tpu: use auto, cpu, cuda")])
def test_9_17_15_bad_flags_name_the_flag(tiny, tmp_path, flags, msg):
    with pytest.raises(UserError, match=msg):
        train.main(args(tiny, tmp_path / "x", "--steps", "1", *flags))


def test_11_resume_refuses_changed_data_and_accepts_the_same_file_by_another_path(tiny, tmp_path, monkeypatch):
    data = tmp_path / "train.csv"
    shutil.copy(tiny / "train.csv", data)
    out = tmp_path / "fp"
    a = args(tiny, out, "--steps", "3", "--save-every", "1")
    a[a.index("--data") + 1] = str(data)
    real, calls = train.compute_loss, []

    def stop_in_step_2(*x, **k):  # (one micro-batch per step)
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*x, **k)
    monkeypatch.setattr(train, "compute_loss", stop_in_step_2)
    assert train.main(a) == 128 + signal.SIGTERM
    monkeypatch.setattr(train, "compute_loss", real)
    df = pd.read_csv(data)
    df["is_correct"] = ~df["is_correct"]  # labels flipped after the stop
    df.to_csv(data, index=False)
    with pytest.raises(UserError, match=r"train.csv changed since the checkpoint"):
        train.main(a + ["--resume"])
    shutil.copy(tiny / "train.csv", data)
    monkeypatch.chdir(tmp_path)  # the same file named relatively is the same file
    a[a.index("--data") + 1] = "./train.csv"
    assert train.main(a + ["--resume"]) == 0 and steps_of(out) == [1, 2, 3]


# ---------------------------------------------------------------------------- one line, not a traceback

def test_13_a_truncated_model_file_names_the_file(tiny, tmp_path):
    from model.load import LoadError, load_model
    cut = tmp_path / "cut"
    shutil.copytree(tiny / "model", cut)
    f = cut / "model.safetensors"
    f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])
    with pytest.raises(LoadError, match=rf"{f}: unreadable safetensors file"):
        load_model(cut, "fp32")


def test_14_a_vocabulary_smaller_than_the_tokenizer_is_one_line(tiny, tmp_path):
    small = tmp_path / "small"
    shutil.copytree(tiny / "model", small)
    cfg = json.loads((small / "config.json").read_text())
    cfg["vocab_size"] = 100
    (small / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"config.json: vocab_size 100 is smaller than the tokenizer's"):
        predict.main(["--model", str(small), "--device", "cpu", "--data", str(tiny / "val.csv"),
                      "--out", str(tmp_path / "s.csv")])


def test_15_an_unusable_cache_dir_or_out_is_one_line(tiny, tmp_path):
    from model.default import DefaultModelError, default_model_dir
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(DefaultModelError, match=rf"--cache-dir {afile}: cannot keep the default model there"):
        default_model_dir(afile)
    with pytest.raises(UserError, match="--out .*cannot write there"):
        train.main(args(tiny, afile / "sub", "--steps", "1"))


def test_16_parquet_list_columns_are_a_data_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data.read import DataError, read_table
    t = pa.table({"question": [["a", "b"]], "answer": ["1"], "solution": ["s"], "is_correct": [True]})
    pq.write_table(t, tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"t.parquet: column question holds list<"):
        read_table(tmp_path / "t.parquet")


def test_12_a_broken_record_with_a_readable_id_keeps_its_line(tiny, tmp_path):
    df = synthetic_rows(5, seed=8).drop(columns=["is_correct"]).rename(columns={"id": "ID"})
    df = df[["ID", "question", "answer", "solution"]]
    lines = df.to_csv(index=False).splitlines()
    lines.insert(3, "r_bad,only two")  # between the 2nd and 3rd rows: two fields where four belong
    lines.insert(5, ",,")  # a broken record without an ID: no line can be written for it
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "s.csv"
    assert predict.main(["--model", str(tiny / "model"), "--device", "cpu", "--data", str(tmp_path / "t.csv"),
                         "--out", str(out), "--skip-bad-rows", "--probs"]) == 0
    sub = pd.read_csv(out, dtype={"ID": str, "is_correct": str})
    want = df["ID"].tolist()
    want.insert(2, "r_bad")
    assert sub["ID"].tolist() == want
    assert sub.loc[2, "is_correct"] == "False"  # the stated fallback
    assert sub.loc[[0, 1, 3, 4, 5], "p_true"].ne(0).all()


# ============================================================================ round 3 (issue 25)
# test_r3_N: case N of the third outside battery.

def predict_args(tiny, out, *extra):
    return ["--model", str(tiny / "model"), "--device", "cpu", "--data", str(tiny / "val.csv"), "--out", str(out),
            *extra]


def test_r3_1_the_metrics_file_may_not_be_the_submission(tiny, tmp_path, monkeypatch):
    import engine.build
    monkeypatch.setattr(engine.build, "load_model", lambda *a, **k: pytest.fail("loaded the model first"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"--metrics \./result.csv is the --out file"):
        predict.main(predict_args(tiny, "result.csv", "--metrics", "./result.csv"))
    assert not (tmp_path / "result.csv").exists()


def test_r3_2_the_tuned_threshold_survives_every_resume(tiny, tmp_path, monkeypatch):
    import engine.score
    from lora.io import read_record
    monkeypatch.setattr(engine.score, "MIN_TUNE_ROWS", 1)  # tune on the tiny validation set
    out = tmp_path / "th"
    a = args(tiny, out, "--steps", "2")
    assert train.main(a) == 0
    tuned = {k: read_record(out)[k] for k in ("threshold", "threshold_rows")}
    assert tuned["threshold"] is not None
    assert train.main(a + ["--resume"]) == 0  # a finished run resumed: the final adapter is written again
    assert {k: read_record(out).get(k) for k in tuned} == tuned
    for f in ("adapter_model.safetensors", "adapter_config.json", "summary.json"):
        (out / f).unlink()  # killed after the last checkpoint, before the final adapter
    assert train.main(a + ["--resume"]) == 0
    assert {k: read_record(out).get(k) for k in tuned} == tuned


def test_r3_3_overwrite_leaves_nothing_of_the_old_run(tiny, tmp_path, monkeypatch):
    out = tmp_path / "over"
    assert train.main(args(tiny, out, "--steps", "2", "--save-every", "1")) == 0
    (out / "notes.txt").write_text("mine")  # not the run's: stays

    def killed(*a, **k):
        raise KeyboardInterrupt  # the new run dies at its first step, after its step-0 evaluation
    monkeypatch.setattr(train, "compute_loss", killed)
    with pytest.raises(KeyboardInterrupt):
        train.main(args(tiny, out, "--steps", "2", "--overwrite"))
    left = sorted(p.name for p in out.iterdir())
    assert left == [".lock", "args.json", "best", "loss.png", "metrics.jsonl", "notes.txt"], left  # (the new run's)
    assert [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [0]
    with pytest.raises(UserError, match="no adapter_model.safetensors"):  # not the old run's adapter
        predict.main(predict_args(tiny, tmp_path / "s.csv", "--adapter", str(out)))


@pytest.fixture(scope="module")
def adapter(tiny, tmp_path_factory):
    """A random adapter for the tiny model (B != 0, so a merge changes the weights)."""
    from lora.inject import apply_lora, lora_modules
    from lora.io import save_adapter
    from model.load import load_model
    torch.manual_seed(0)
    model = apply_lora(load_model(tiny / "model", "fp32"), r=4, alpha=8, dropout=0.0)
    for m in lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.05)
    return save_adapter(model, tmp_path_factory.mktemp("adapter")).parent


def merge(tiny, adapter, out, *extra):
    from lora.merge import main
    return main(["--model", str(tiny / "model"), "--adapter", str(adapter), "--out", str(out), *extra])


def test_r3_4_a_merge_goes_into_a_new_or_empty_folder_only(tiny, adapter, tmp_path):
    from model.load import load_model
    out = tmp_path / "merged"
    assert merge(tiny, adapter, out, "--max-shard-size", "100KB") == 0
    for f in out.glob("*.safetensors"):  # the shards removed, the old index left behind
        f.unlink()
    with pytest.raises(UserError, match=r"merged is not empty \(it holds config.json, model.safetensors.index.json"):
        merge(tiny, adapter, out)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"mine": true}')
    with pytest.raises(UserError, match=r"mine is not empty \(it holds config.json\)"):
        merge(tiny, adapter, mine)
    assert (mine / "config.json").read_text() == '{"mine": true}'
    shutil.rmtree(out)
    out.mkdir()  # an empty folder is fine
    assert merge(tiny, adapter, out) == 0 and load_model(out, "fp32") is not None


def test_r3_12_a_merge_out_that_is_or_is_under_a_file_is_one_line(tiny, adapter, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(UserError, match=r"--out .*afile: exists and is not a folder"):
        merge(tiny, adapter, afile)
    with pytest.raises(UserError, match=r"--out .*afile/sub: cannot create it \(Not a directory\)"):
        merge(tiny, adapter, afile / "sub")


def test_r3_5_non_finite_scores_or_adapter_stop_the_run_naming_the_step(tiny, tmp_path, monkeypatch):
    out = tmp_path / "huge"
    # A finite adapter so large that the logits overflow: the evaluation at step 1 sees NaN.
    with pytest.raises(UserError, match=r"step 1: the model gave non-finite p_true for 20 of 20 validation rows "
                                        r"\(lower --lr or --alpha\); stopping. No checkpoint was written yet"):
        train.main(args(tiny, out, "--steps", "1", "--lr", "1e30"))
    evals = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval" in r]
    assert evals == [0] and not (out / "summary.json").exists()
    # An update that makes the adapter itself non-finite is never checkpointed: the error names the last one.
    real = train.get_lr
    monkeypatch.setattr(train, "get_lr", lambda step, **k: float("inf") if step == 1 else real(step, **k))
    with pytest.raises(UserError, match=r"adapter is no longer finite at step 2 .* Last good checkpoint: "
                                        r".*checkpoint \(step 1\)"):
        train.main(args(tiny, out, "--steps", "3", "--save-every", "1", "--overwrite"))
    assert json.loads((out / "checkpoint" / "trainer.json").read_text())["step"] == 1


@pytest.mark.parametrize("key, value, msg", [
    ("bos_token_id", 128000, r"bos_token_id 128000 is outside the vocabulary of .*tokenizer.json \(302 tokens\)"),
    ("eos_token_id", [2, 128009], r"eos_token_id 128009 is outside the vocabulary of .*tokenizer.json \(302 tokens\)"),
    ("bos_token_id", 5, r"bos_token_id 5, but .*tokenizer.json \(with its tokenizer_config.json\) has BOS 1"),
    ("eos_token_id", 7, r"eos_token_id 7, but .*tokenizer.json \(with its tokenizer_config.json\) has EOS 2")])
def test_r3_6_special_ids_that_disagree_with_the_tokenizer_are_refused(tiny, tmp_path, key, value, msg):
    other = tmp_path / "other"
    shutil.copytree(tiny / "model", other)
    cfg = json.loads((other / "config.json").read_text())
    cfg[key] = value
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=rf"{other / 'config.json'}: {msg}: a tokenizer from another model\?"):
        predict.main(predict_args(tiny, tmp_path / "s.csv", "--model", str(other)))


def test_r3_7_validation_rows_that_occur_in_training_are_warned_about(tiny, tmp_path, capsys):
    a = args(tiny, tmp_path / "same", "--steps", "1")
    a[a.index("--val-file") + 1] = str(tiny / "train.csv")  # validation = training
    assert train.main(a) == 0
    n = len(pd.read_csv(tiny / "train.csv"))
    q = pd.read_csv(tiny / "train.csv")["question"].nunique()
    assert (f"warning: {n} of {n} validation rows of {tiny / 'train.csv'} also occur in the training data "
            f"{tiny / 'train.csv'}, and {q} of {q} of their questions") in capsys.readouterr().err
    mixed = tmp_path / "mixed.csv"  # two training rows among the validation rows
    pd.concat([pd.read_csv(tiny / "val.csv"), pd.read_csv(tiny / "train.csv").iloc[:2]]).to_csv(mixed, index=False)
    a = args(tiny, tmp_path / "mixed", "--steps", "1")
    a[a.index("--val-file") + 1] = str(mixed)
    assert train.main(a) == 0
    assert "warning: 2 of 22 validation rows" in capsys.readouterr().err
    assert train.main(args(tiny, tmp_path / "apart", "--steps", "1")) == 0
    assert "also occur in the training data" not in capsys.readouterr().err


@pytest.mark.parametrize("flags, msg", [
    (["--clip", "nan"], "--clip must not be negative or non-finite, got nan"),
    (["--alpha", "inf"], "--alpha must be greater than 0 and finite, got inf"),
    (["--lr", "inf"], "--lr must be greater than 0 and finite, got inf"),
    (["--dropout", "nan"], r"--dropout must be in \[0, 1\), got nan")])
def test_r3_8_non_finite_float_flags_are_refused_by_name(tiny, tmp_path, flags, msg):
    with pytest.raises(UserError, match=msg):
        train.main(args(tiny, tmp_path / "x", "--steps", "1", *flags))
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("flags, msg", [(["--max-seq-len", "0"], "--max-seq-len must be at least 1, got 0"),
                                        (["--threshold", "nan"], "--threshold nan: expected auto or a number")])
def test_r3_8_predict_refuses_a_zero_length_and_a_nan_threshold(tiny, tmp_path, flags, msg):
    with pytest.raises(UserError, match=msg):
        predict.main(predict_args(tiny, tmp_path / "s.csv", *flags))
    assert not (tmp_path / "s.csv").exists()


@pytest.mark.parametrize("flags, msg", [
    (["--seed=-1"], r"--seed must be in \[0, 4294967295\] \(what numpy's and torch's generators take\), got -1"),
    (["--seed", "100000000000000000000"], r"--seed must be in \[0, 4294967295\].*got 100000000000000000000"),
    (["--warmup", "nan"], "--warmup must not be negative or non-finite, got nan"),
    (["--warmup", "inf"], "--warmup must not be negative or non-finite, got inf"),
    (["--weight-decay", "nan"], "--weight-decay must not be negative or non-finite, got nan")])
def test_r3_11_seeds_and_non_finite_schedule_flags_are_one_line(tiny, tmp_path, flags, msg):
    with pytest.raises(UserError, match=msg):
        train.main(args(tiny, tmp_path / "x", "--steps", "1", *flags))


def test_r3_8_metrics_jsonl_stays_strict_json(tmp_path):
    from engine.log import MetricsLog
    log = MetricsLog(tmp_path / "metrics.jsonl", 0, write=True)
    log({"step": 1, "loss": 0.5, "grad_norm": float("inf"), "eval": {"auc": float("nan"), "n": 3}})
    log.close()
    line = (tmp_path / "metrics.jsonl").read_text()
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} is not JSON")) == \
        {"step": 1, "loss": 0.5, "grad_norm": None, "eval": {"auc": None, "n": 3}}


@pytest.mark.parametrize("change, msg", [
    ({"num_key_value_heads": 0}, "num_key_value_heads must be a positive integer, got 0"),
    ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer, got 0"),
    ({"hidden_size": "256"}, "hidden_size must be a positive integer, got '256'"),
    ({"tie_word_embeddings": "no"}, "tie_word_embeddings must be true or false, got 'no'"),
    ({"rope_scaling": "llama3"}, r"rope_scaling must be an object such as .* or null, got 'llama3'"),
    ({"rope_scaling": {"rope_type": "llama3"}}, r"rope_scaling of type 'llama3' needs factor, low_freq_factor, "
                                                r"high_freq_factor, original_max_position_embeddings; missing factor"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 64}},
     r"rope_scaling high_freq_factor \(4.0\) must be greater than"),
    ({"eos_token_id": ["2"]}, "eos_token_id must be an integer, a list of integers or null")])
def test_r3_9_config_json_fields_are_checked_before_anything_is_written(tiny, tmp_path, change, msg):
    bad = tmp_path / "bad"
    shutil.copytree(tiny / "model", bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, **change}))
    out = tmp_path / "run"
    a = args(tiny, out, "--steps", "1")
    a[a.index("--model") + 1] = str(bad)
    with pytest.raises(UserError, match=rf"{bad / 'config.json'}: {msg}"):
        train.main(a)
    assert not out.exists()


@pytest.mark.parametrize("targets, msg", [("q_proj(", r"target_modules 'q_proj\(' is not a valid regular expression"),
                                          (7, "target_modules must be a list of module names or a regex, got 7")])
def test_r3_10_a_malformed_target_modules_is_one_line(tiny, adapter, tmp_path, targets, msg):
    bad = tmp_path / "bad"
    shutil.copytree(adapter, bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": targets}))
    from safetensors import safe_open  # the header carries the config too: make it agree
    with safe_open(str(bad / "adapter_model.safetensors"), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(bad / "adapter_model.safetensors"),
              metadata={**meta, "adapter_config": json.dumps({**cfg, "target_modules": targets})})
    with pytest.raises(UserError, match=rf"{bad / 'adapter_config.json'}: {msg}"):
        predict.main(predict_args(tiny, tmp_path / "s.csv", "--adapter", str(bad)))


@pytest.mark.parametrize("where", ["scoring", "writing"])
def test_r3_13_ctrl_c_during_predict_is_one_line_exit_130_and_keeps_the_old_submission(tiny, tmp_path, monkeypatch,
                                                                                      capsys, where):
    from common.errors import cli_entry
    out = tmp_path / "s.csv"
    out.write_text("ID,is_correct\nold,True\n")
    real_score, real_to_csv = predict.score_adapters, pd.DataFrame.to_csv

    def ctrl_c(*a, **k):
        os.kill(os.getpid(), signal.SIGINT)  # as the terminal sends it
        time.sleep(1)  # (the KeyboardInterrupt arrives here)

    def ctrl_c_mid_write(self, path, *a, **k):
        Path(path).write_text("ID,is_cor")  # half the file, then the signal
        ctrl_c()
    if where == "scoring":
        monkeypatch.setattr(predict, "score_adapters", lambda *a, **k: ctrl_c() or real_score(*a, **k))
    else:
        monkeypatch.setattr(pd.DataFrame, "to_csv", ctrl_c_mid_write)
    try:
        cli_entry(lambda: predict.main(predict_args(tiny, out)))
    except SystemExit as e:
        assert e.code == 130
    except KeyboardInterrupt:
        pytest.fail("the Ctrl-C got out of cli_entry: a traceback")
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "interrupted (Ctrl-C): the files this command was writing are left as they were"
    assert "Traceback" not in "\n".join(err)
    assert out.read_text() == "ID,is_correct\nold,True\n" and sorted(p.name for p in tmp_path.iterdir()) == ["s.csv"]


def test_r3_14_an_out_that_resolves_into_the_base_model_folder_is_refused(tiny, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(tiny / "model")
    before = sorted(p.name for p in (tiny / "model").iterdir())
    for out in (link, link / "run"):
        with pytest.raises(UserError, match=rf"--out {out} is inside the base model folder"):
            train.main(args(tiny, out, "--steps", "1"))
    assert sorted(p.name for p in (tiny / "model").iterdir()) == before


def test_r3_15_a_file_without_ids_is_said_to_get_row_numbers(tiny, tmp_path, capsys):
    out = tmp_path / "s.csv"
    assert predict.main(predict_args(tiny, out, "--data", str(tiny / "train.csv"))) == 0  # labels, "id" column
    assert "row numbers" not in capsys.readouterr().err
    no_id = tmp_path / "no_id.csv"
    pd.read_csv(tiny / "val.csv").drop(columns=["id"]).to_csv(no_id, index=False)
    assert predict.main(predict_args(tiny, out, "--data", str(no_id))) == 0
    assert f"note: {no_id} has no ID column: the submission's IDs are row numbers, 0 to 19" in capsys.readouterr().err
    assert pd.read_csv(out)["ID"].tolist() == list(range(20))


def test_r3_16_zero_shot_says_what_it_scores_and_the_cache_variable_is_named(tiny, tmp_path, capsys, monkeypatch):
    assert predict.main(predict_args(tiny, tmp_path / "s.csv")) == 0
    err = capsys.readouterr().err
    assert f"scoring 20 rows of {tiny / 'val.csv'} with model (int8, activations " in err
    assert " (no adapter: zero-shot); True when p_true > 0.5 (the default)" in err
    from model.default import DefaultModelError, default_model_dir
    afile = tmp_path / "afile"
    afile.write_text("x")
    monkeypatch.setenv("LLAMA3_LORA_CACHE", str(afile))
    with pytest.raises(DefaultModelError, match=rf"^LLAMA3_LORA_CACHE={afile}: cannot keep the default model there"):
        default_model_dir()
    for script in (train, predict):  # (already true: pinned) the CPU default is int8, as everywhere
        with pytest.raises(SystemExit):
            script.main(["--help"])
        help_ = " ".join(capsys.readouterr().out.split())
        assert "(default: int8, on every device)" in help_ or "(default: the adapter's, else int8)" in help_
        assert "fp32 on" not in help_


def oom_at(calls: set, real):
    """compute_loss that runs out of memory at these calls (1-based), as CUDA does in a forward."""
    n = []

    def forward(*a, **k):
        n.append(1)
        if len(n) in calls:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*a, **k)
    return forward


@pytest.mark.slow
def test_r3_17_out_of_memory_turns_auto_checkpointing_on_and_retries_the_same_step(tiny, tmp_path, monkeypatch,
                                                                                   capsys):
    a = lambda out: args(tiny, out, "--steps", "2", "--grad-accum", "2", "--dropout", "0.3")
    assert train.main(a(tmp_path / "clean")) == 0
    # Step 0's second micro-batch runs out of memory: its first one has already added its gradients.
    monkeypatch.setattr(train, "compute_loss", oom_at({2}, engine.loss.compute_loss))
    assert train.main(a(tmp_path / "retried")) == 0
    assert "step 0: out of memory for micro-batches of 2 x up to" in capsys.readouterr().err
    losses = lambda out: [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text()
                                                                .splitlines()) if "loss" in r]
    assert losses(tmp_path / "retried") == losses(tmp_path / "clean")
    clean, retried = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("clean", "retried"))
    for k in clean:
        torch.testing.assert_close(retried[k], clean[k], rtol=0, atol=0, msg=k)


def test_r3_17_out_of_memory_that_cannot_be_helped_is_one_line_keeping_the_checkpoint(tiny, tmp_path, monkeypatch):
    out = tmp_path / "oom"
    # auto: on at the first out-of-memory, and the retry runs out of memory too
    monkeypatch.setattr(train, "compute_loss", oom_at({3, 4}, engine.loss.compute_loss))
    with pytest.raises(UserError, match=r"out of memory at step 2: micro-batches of 2 x up to \d+ tokens do not fit "
                                        r"in the [\d.]+ GiB of cpu with gradient checkpointing on; use a smaller "
                                        r"--batch-size with a larger --grad-accum for the same 2 rows per step "
                                        r"\(--batch-size 1 --grad-accum 2\), a lower --max-seq-len or --precision "
                                        r"nf4. Last good checkpoint: .*checkpoint \(step 2\)"):
        train.main(args(tiny, out, "--steps", "4", "--save-every", "1"))
    assert engine.checkpoint.checkpoint_problem(out / "checkpoint") is None
    monkeypatch.setattr(train, "compute_loss", oom_at({1}, engine.loss.compute_loss))  # off: no retry
    with pytest.raises(UserError, match=r"out of memory at step 0: .* with gradient checkpointing off; use "
                                        r"--grad-checkpointing on, a smaller --batch-size"):
        train.main(args(tiny, tmp_path / "off", "--steps", "1", "--grad-checkpointing", "off"))
