"""User paths no other test walks: quantized training, --loss full, --val-rows, the split by
question, predict.py's adapter errors and its base taken from the run, merging from a sharded
base, and load / tokenizer errors. All on tiny models, CPU, a few steps each."""
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import predict
import train
from data.batches import LengthGroupedSampler
from data.prompt import IGNORE
from engine.build import build_model
from common.errors import UserError
from engine.config import TrainConfig
from engine.setup import build_for_training, load_data
from lora.inject import apply_lora, lora_modules, lora_state_dict
from lora.io import PREFIX, load_adapter, save_adapter
from model.config import LlamaConfig
from model.llama import Llama
from model.load import LoadError, load_model
from model.tokenizer import Tokenizer, TokenizerError
from tiny import synthetic_rows, make_workdir, train_args

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
FAST = ("--batch-size", "2", "--grad-accum", "1", "--lr", "5e-3")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """model/ (tiny), train.csv (70 rows), val.csv (30 rows), prompt.txt."""
    return make_workdir(tmp_path_factory.mktemp("paths"), n_rows=100, n_val=30, seed=1)


def records(out):
    return [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def losses(out):
    return {r["step"]: r["loss"] for r in records(out) if "loss" in r}


def evals(out):
    return [r for r in records(out) if "eval" in r]


def adapter_tensors(out):
    return load_file(str(Path(out) / "adapter_model.safetensors"))


def without_val_file(args):
    i = args.index("--val-file")
    return args[:i] + args[i + 2:]


def cfg_for(work, **kw):
    """The TrainConfig train.py builds from train_args(work, ...) (the fields load_data reads)."""
    base = dict(model=str(work / "model"), data=str(work / "train.csv"), val_file=str(work / "val.csv"),
                prompt_file=str(work / "prompt.txt"), max_seq_len=128, r=4, alpha=8, device="cpu",
                batch_size=2, grad_accum=1, lr=5e-3, eval_every=0)
    return TrainConfig(**{**base, **kw})


def predict_probs(tmp_path, name, *args):
    out = tmp_path / f"{name}.csv"
    assert predict.main(["--device", "cpu", "--out", str(out), "--probs", *args]) == 0
    return pd.read_csv(out)["p_true"].to_numpy()


def run_script(script, *args, env=None):
    """Start a CLI as a user runs it (no LLAMA3_LORA_DEBUG); the Popen."""
    env = {k: v for k, v in (env or os.environ).items() if k != "LLAMA3_LORA_DEBUG"}
    p = subprocess.Popen([sys.executable, str(REPO / script), *map(str, args)], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return p


def one_line_error(proc):
    _, err = proc.communicate(timeout=120)
    assert "Traceback" not in err, err[-3000:]
    lines = [l for l in err.splitlines() if l.strip()]
    assert proc.returncode == 2, err[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ----------------------------------------------------------------------------- 1. int8 / nf4 / bf16

@pytest.mark.parametrize("precision", ["int8", "nf4", "bf16"])
def test_quantized_training_and_scoring(work, tmp_path, precision):
    """Train at the precision: finite losses, a saved adapter that loads into a base at that
    precision with B != 0; predict.py at that precision reproduces training's final evaluation and
    scores differently from the bare base."""
    out = tmp_path / "run"
    assert train.main(train_args(work, out, "--precision", precision, "--steps", "2", *FAST)) == 0
    assert sorted(losses(out)) == [1, 2] and all(math.isfinite(v) for v in losses(out).values())
    assert json.loads((out / "args.json").read_text())["precision"] == precision

    saved = adapter_tensors(out)
    assert saved and any(k.endswith("lora_B.weight") for k in saved)
    model = load_adapter(build_model(work / "model", precision, CPU), out)
    params = dict(model.named_parameters())
    for key, t in saved.items():
        p = params[key[len(PREFIX):]]
        torch.testing.assert_close(p.detach().float(), t.to(p.dtype).float(), rtol=0, atol=0)
    b_norm = sum(float(t.float().norm()) for k, t in saved.items() if k.endswith("lora_B.weight"))
    assert b_norm > 0  # it trained (B starts at zero)

    m_file = tmp_path / "m.json"
    data = ["--data", str(work / "val.csv"), "--precision", precision]
    with_adapter = predict_probs(tmp_path, "a", "--adapter", str(out), *data, "--metrics", str(m_file))
    final = json.loads((out / "summary.json").read_text())["final"]
    got = json.loads(m_file.read_text())
    assert got.pop("confusion") == final.pop("confusion")
    assert got == pytest.approx(final, rel=1e-9)
    zero_shot = predict_probs(tmp_path, "z", "--model", str(work / "model"), *data)
    assert np.abs(with_adapter - zero_shot).max() > 1e-6  # the adapter was applied


# ----------------------------------------------------------------------------- 2. --loss full

def test_full_loss_end_to_end(work, tmp_path):
    """--loss full: 3 finite step losses logged; step 1's loss is the base model's mean
    cross-entropy over EVERY next token of the first batch (B = 0 at init, so the adapter adds
    nothing yet), not the label alone; the final adapter moved off its initialisation."""
    out = tmp_path / "full"
    assert train.main(train_args(work, out, "--loss", "full", "--steps", "3", "--precision", "fp32", *FAST)) == 0
    got = losses(out)
    assert sorted(got) == [1, 2, 3] and all(math.isfinite(v) for v in got.values())
    assert json.loads((out / "summary.json").read_text())["final_loss"] == got[3]

    cfg = cfg_for(work, loss="full", steps=3, precision="fp32")
    tok = Tokenizer.from_dir(work / "model")
    train_ds, _, _ = load_data(cfg, tok)
    first = train_ds.batch(LengthGroupedSampler(train_ds.lengths, cfg.batch_size, seed=cfg.seed).next_batch())
    targets = first["targets"]
    assert int((targets != IGNORE).sum()) > 10 * targets.shape[0]  # many targets per row, not one
    base = load_model(work / "model", "fp32")
    with torch.no_grad():
        logits = base(first["input_ids"], first["attention_mask"])
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE)
    assert got[1] == pytest.approx(ce.item(), rel=1e-4)

    init_model, _ = build_for_training(cfg, work / "model", CPU)
    init = {PREFIX + k: v for k, v in lora_state_dict(init_model).items()}
    final = adapter_tensors(out)
    assert init.keys() == final.keys()
    for k, t in final.items():
        if k.endswith("lora_B.weight"):
            assert not init[k].any() and t.any(), k  # B: zero at init, trained since
        assert not torch.equal(t, init[k].to(t.dtype)), f"{k} did not move"


# ----------------------------------------------------------------------------- 3. --val-rows

@pytest.fixture(scope="module")
def val_rows_runs(work, tmp_path_factory):
    """Two identical runs with --val-rows 7 --seed 5."""
    root = tmp_path_factory.mktemp("valrows")
    outs = [root / "a", root / "b"]
    for out in outs:
        assert train.main(train_args(work, out, "--val-rows", "7", "--seed", "5", "--steps", "2", *FAST)) == 0
    return outs


def test_val_rows_evaluates_exactly_n_seeded_rows(work, val_rows_runs, tmp_path):
    a, b = val_rows_runs
    assert [r["step"] for r in evals(a)] == [0, 2]
    assert all(r["eval"]["n"] == 7 for r in evals(a))
    summary = json.loads((a / "summary.json").read_text())
    assert summary["step0"]["n"] == summary["final"]["n"] == 7
    strip = lambda rs: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rs]
    assert strip(records(a)) == strip(records(b))  # same seed: same sample, same metrics

    # The sample is seeded: the same seed draws the same rows, another seed others; not a prefix.
    tok = Tokenizer.from_dir(work / "model")
    ids = lambda seed: load_data(cfg_for(work, val_rows=7, seed=seed), tok)[1].df["id"].tolist()
    assert ids(5) == ids(5) and len(ids(5)) == 7
    assert set(ids(5)) != set(ids(6))
    val_ids = pd.read_csv(work / "val.csv")["id"].tolist()
    assert set(ids(5)) <= set(val_ids) and ids(5) != val_ids[:7]

    # And those are the rows training evaluated: predict.py on them gives the final metrics.
    rows = pd.read_csv(work / "val.csv").set_index("id").loc[ids(5)].reset_index()
    rows.to_csv(tmp_path / "sample.csv", index=False)
    m_file = tmp_path / "m.json"
    predict_probs(tmp_path, "s", "--adapter", str(a), "--data", str(tmp_path / "sample.csv"), "--metrics", str(m_file))
    got, final = json.loads(m_file.read_text()), dict(summary["final"])
    assert got.pop("confusion") == final.pop("confusion")
    assert got == pytest.approx(final, rel=1e-9)


# ----------------------------------------------------------------------------- 4. split by question

def repeated_questions_file(path: Path) -> Path:
    """60 rows, 20 questions of 3 rows each, the repeats spelled with stray whitespace."""
    df = synthetic_rows(60, seed=7)
    qs = df["question"].tolist()
    df["question"] = [[qs[i // 3], " " + qs[i // 3], qs[i // 3] + "  "][i % 3] for i in range(60)]
    df.to_csv(path, index=False)
    return path


def test_split_by_question_keeps_questions_on_one_side(work, tmp_path):
    data = repeated_questions_file(tmp_path / "rep.csv")
    tok = Tokenizer.from_dir(work / "model")
    splits = {}
    for seed in (0, 1, 2, 42):
        cfg = cfg_for(work, data=str(data), val_file=None, val_fraction=0.2, seed=seed)
        tr, va, _ = load_data(cfg, tok)
        q_tr = set(tr.df["question"].str.strip())
        q_va = set(va.df["question"].str.strip())
        assert q_tr and q_va and not q_tr & q_va, seed
        assert len(tr) + len(va) == 60
        assert len(q_tr) + len(q_va) == 20
        assert 12 <= len(va) <= 15  # ~20% of rows, whole questions of 3
        splits[seed] = sorted(va.df["id"])
        again = load_data(cfg, tok)[1]
        assert sorted(again.df["id"]) == splits[seed]  # same seed, same split
    assert len({tuple(v) for v in splits.values()}) > 1  # the seed shuffles the questions


def test_run_without_val_file_evaluates_on_held_out_rows(work, tmp_path, capsys):
    out = tmp_path / "split"
    args = without_val_file(train_args(work, out, "--val-fraction", "0.25", "--steps", "1", *FAST))
    assert train.main(args) == 0
    n_file = len(pd.read_csv(work / "train.csv"))
    n_val = {r["eval"]["n"] for r in evals(out)}
    assert len(n_val) == 1
    n_val = n_val.pop()
    n_train = int(re.search(r"data: (\d+) train rows", capsys.readouterr().err)[1])
    assert 0 < n_val < n_file and n_train + n_val == n_file
    assert n_val == pytest.approx(0.25 * n_file, abs=3)
    _, va, _ = load_data(cfg_for(work, val_file=None, val_fraction=0.25), Tokenizer.from_dir(work / "model"))
    assert n_val == len(va)


# ----------------------------------------------------------------------------- 5. predict: bad adapters

def test_predict_adapter_errors_are_one_line(work, tmp_path):
    # An adapter for a model of another shape (hidden 32, not 64), and a folder without weights.
    other = Llama(LlamaConfig.tiny(vocab_size=300, hidden_size=32))
    apply_lora(other, r=4, alpha=8, dropout=0.0)
    wrong = tmp_path / "wrong_shape"
    save_adapter(other, wrong)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no weights here")
    cases = {"missing": (tmp_path / "nope" / "adapter_model.safetensors", "no such file or folder"),
             "shape": (wrong, "shape mismatch"),
             "empty": (tmp_path / "empty", "no adapter_model.safetensors")}
    procs = {name: run_script("predict.py", "--model", work / "model", "--device", "cpu", "--adapter", path,
                              "--data", work / "val.csv", "--out", tmp_path / f"{name}.csv")
             for name, (path, _) in cases.items()}
    for name, proc in procs.items():
        line = one_line_error(proc)
        path, msg = cases[name]
        assert msg in line, line
        assert str(path if name != "shape" else path / "adapter_model.safetensors") in line, line
        assert not (tmp_path / f"{name}.csv").exists()


# ----------------------------------------------------------------------------- 6. base model from the run

def test_predict_takes_the_base_model_from_the_run(work, val_rows_runs, tmp_path, monkeypatch):
    run = val_rows_runs[0]
    assert json.loads((run / "args.json").read_text())["model_dir"] == str(work / "model")
    data = ["--adapter", str(run), "--data", str(work / "val.csv")]
    explicit = predict_probs(tmp_path, "explicit", "--model", str(work / "model"), *data)

    empty_cache = tmp_path / "cache"
    empty_cache.mkdir()
    monkeypatch.setenv("LLAMA3_LORA_CACHE", str(empty_cache))

    def no_fetch(*a, **k):
        raise AssertionError("predict.py reached for the default model")
    monkeypatch.setattr(predict, "default_model_dir", no_fetch)
    implicit = predict_probs(tmp_path, "implicit", *data)
    np.testing.assert_array_equal(implicit, explicit)
    assert list(empty_cache.iterdir()) == []


def test_predict_finds_a_relative_base_from_another_folder(work, tmp_path, monkeypatch):
    monkeypatch.chdir(work)
    out = tmp_path / "rel"
    args = ["--model", "model", "--data", "train.csv", "--val-file", "val.csv", "--prompt-file", "prompt.txt",
            "--out", str(out), "--r", "4", "--alpha", "8", "--max-seq-len", "128", "--eval-every", "0",
            "--device", "cpu", "--steps", "1", *FAST]
    assert train.main(args) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    explicit = predict_probs(tmp_path, "explicit", "--model", str(work / "model"), "--adapter", str(out),
                             "--prompt-file", str(work / "prompt.txt"), "--data", str(work / "val.csv"))
    implicit = predict_probs(tmp_path, "implicit", "--adapter", str(out), "--data", str(work / "val.csv"))
    np.testing.assert_array_equal(implicit, explicit)


# ----------------------------------------------------------------------------- 7. merge from shards

@pytest.fixture(scope="module")
def sharded(work, tmp_path_factory):
    """work/model written as 4 safetensors shards + model.safetensors.index.json (an 8B's layout)."""
    d = tmp_path_factory.mktemp("sharded")
    src = work / "model"
    sd = load_file(str(src / "model.safetensors"))
    keys = sorted(sd)
    n = 4
    weight_map = {}
    for i, chunk in enumerate(np.array_split(np.array(keys), n)):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file({k: sd[k] for k in chunk}, str(d / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in chunk})
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in sd.values())},
         "weight_map": weight_map}))
    for f in ("config.json", *TOKENIZER_FILES):
        shutil.copy(src / f, d / f)
    return d


def test_merge_from_a_sharded_base(sharded, tmp_path):
    from lora.merge import main as merge_main
    model = load_model(sharded, "fp32")
    torch.manual_seed(0)
    apply_lora(model, r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(std=0.05)
    adapter = tmp_path / "adapter"
    save_adapter(model, adapter)

    ids = torch.randint(3, model.cfg.vocab_size, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = load_model(sharded, "fp32")(ids)
        ref = load_adapter(build_model(sharded, "fp32", CPU), adapter)(ids)
    assert (ref - base).abs().max() > 1e-2  # the adapter changes the logits

    for name, extra in (("one", []), ("shards", ["--max-shard-size", "100KB"])):
        out = tmp_path / name
        assert merge_main(["--model", str(sharded), "--adapter", str(adapter), "--out", str(out),
                           "--dtype", "fp32", *extra]) == 0
        assert (out / "model.safetensors.index.json").is_file() == (name == "shards")
        merged = load_model(out, "fp32")
        assert not lora_modules(merged)
        with torch.no_grad():
            torch.testing.assert_close(merged(ids), ref, atol=1e-5, rtol=1e-5)
        assert Tokenizer.from_dir(out).vocab_size == Tokenizer.from_dir(sharded).vocab_size


# ----------------------------------------------------------------------------- 8. load errors

def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def index_of(d: Path) -> dict:
    return json.loads((d / "model.safetensors.index.json").read_text())


def test_bad_index_json(sharded, tmp_path):
    for name, text in (("bad", '{"weight_map": {'), ("no_map", '{"metadata": {}}'), ("list", "[1, 2]")):
        d = copy_dir(sharded, tmp_path / name)
        (d / "model.safetensors.index.json").write_text(text)
        with pytest.raises(LoadError, match=re.escape(f"{d / 'model.safetensors.index.json'}: not a safetensors "
                                                      f"index with a weight_map")):
            load_model(d, "fp32")


def test_index_names_a_missing_shard(sharded, tmp_path):
    d = copy_dir(sharded, tmp_path / "m")
    gone = sorted(set(index_of(d)["weight_map"].values()))[2]
    (d / gone).unlink()
    msg = f"{d / 'model.safetensors.index.json'} names {gone}, which is not in {d}"
    with pytest.raises(LoadError, match=re.escape(msg)):
        load_model(d, "fp32")
    data = tmp_path / "d.csv"
    synthetic_rows(4, seed=3).to_csv(data, index=False)
    line = one_line_error(run_script("predict.py", "--model", d, "--device", "cpu", "--data", data,
                                     "--out", tmp_path / "s.csv"))
    assert line == f"error: {msg}"


def test_same_key_in_two_shards(sharded, tmp_path):
    d = copy_dir(sharded, tmp_path / "dup")
    wm = index_of(d)["weight_map"]
    key = "model.norm.weight"
    other = next(f for f in sorted(set(wm.values())) if f != wm[key])
    tensors = load_file(str(d / other))
    tensors[key] = load_file(str(d / wm[key]))[key]
    save_file(tensors, str(d / other))
    first, second = sorted([d / wm[key], d / other])
    with pytest.raises(LoadError, match=re.escape(f"key {key} appears twice: in {first} and {second}")):
        load_model(d, "fp32")


# ----------------------------------------------------------------------------- 9. tokenizer files

def tokenizer_dir(work, d: Path) -> Path:
    d.mkdir()
    for f in ("config.json", *TOKENIZER_FILES):
        shutil.copy(work / "model" / f, d / f)
    return d


@pytest.mark.parametrize("case", ["not_json", "not_a_tokenizer", "json_list"])
def test_malformed_tokenizer_json(work, tmp_path, case):
    d = tokenizer_dir(work, tmp_path / "t")
    (d / "tokenizer.json").write_text({"not_json": '{"model": {"type": "BPE",',
                                       "not_a_tokenizer": '{"hello": "world"}',
                                       "json_list": "[1, 2, 3]"}[case])
    with pytest.raises(TokenizerError, match=re.escape(str(d / "tokenizer.json"))):
        Tokenizer.from_dir(d)


def test_eos_token_not_in_vocabulary(work, tmp_path):
    d = tokenizer_dir(work, tmp_path / "t")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "eos_token": "<|no_such_token|>"}))
    with pytest.raises(TokenizerError, match=re.escape(f"{d / 'tokenizer_config.json'}: eos_token "
                                                       f"'<|no_such_token|>' is not in the vocabulary")):
        Tokenizer.from_dir(d)


def test_tokenizer_config_not_json(work, tmp_path):
    d = tokenizer_dir(work, tmp_path / "t")
    (d / "tokenizer_config.json").write_text("{'eos_token': '</s>'}")
    with pytest.raises(TokenizerError, match=re.escape(f"{d / 'tokenizer_config.json'}: not valid JSON")):
        Tokenizer.from_dir(d)


@pytest.mark.parametrize("text", ["[]", "null"])
def test_tokenizer_config_not_an_object(work, tmp_path, text):
    d = tokenizer_dir(work, tmp_path / "t")
    (d / "tokenizer_config.json").write_text(text)
    with pytest.raises(TokenizerError, match=re.escape(str(d / "tokenizer_config.json"))):
        Tokenizer.from_dir(d)


def test_no_tokenizer_file(work, tmp_path):
    d = tokenizer_dir(work, tmp_path / "t")
    (d / "tokenizer.json").unlink()
    with pytest.raises(UserError, match=re.escape(f"{d}: no tokenizer.json")):
        Tokenizer.from_dir(d)
