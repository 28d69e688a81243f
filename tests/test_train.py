"""train.py on a tiny real model folder: learning, accumulation, exact resume, signals, NaN."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
import engine.loss as loss_mod
from engine.checkpoint import find_checkpoint
from common.errors import UserError
from engine.optim import get_lr
from data.batches import RowDataset
from data.prompt import Encoder
from data.read import read_table
from lora.inject import apply_lora
from model.load import load_model
from model.tokenizer import Tokenizer
from tiny import make_workdir, train_args

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_workdir(tmp_path_factory.mktemp("tiny"), n_rows=240, n_val=40, seed=1)


def base_args(tiny, out, *extra):
    return train_args(tiny, out, "--batch-size", "2", "--grad-accum", "2", *extra)


def records(out):
    return [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def adapter(out):
    return load_file(str(Path(out) / "adapter_model.safetensors"))


def test_get_lr_schedule():
    kw = dict(lr=1.0, steps=110, warmup=10)
    assert get_lr(0, scheduler="cosine", **kw) == pytest.approx(0.1)
    assert get_lr(9, scheduler="cosine", **kw) == pytest.approx(1.0)
    assert get_lr(10, scheduler="cosine", **kw) == pytest.approx(1.0)
    assert get_lr(60, scheduler="cosine", **kw) == pytest.approx(0.5)
    assert get_lr(110, scheduler="cosine", **kw) == pytest.approx(0.0, abs=1e-12)
    assert get_lr(60, scheduler="linear", **kw) == pytest.approx(0.5)
    assert get_lr(100, scheduler="constant", **kw) == 1.0


def test_loss_falls_and_outputs_written(tiny, tmp_path):
    out = tmp_path / "run"
    assert train.main(base_args(tiny, out, "--steps", "16", "--lr", "5e-3", "--dropout", "0",
                                "--eval-every", "8")) == 0
    losses = [r["loss"] for r in records(out) if "loss" in r]
    assert len(losses) == 16
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:3]) / 3  # from ~ln(vocab) towards the label entropy
    evals = [r["step"] for r in records(out) if "eval" in r]
    assert evals == [0, 8, 16]
    for f in ("adapter_model.safetensors", "adapter_config.json", "best/adapter_model.safetensors",
              "args.json", "summary.json", "loss.png", "checkpoint/trainer.json"):
        assert (out / f).is_file(), f
    keys = adapter(out).keys()
    assert keys and all(".lora_A.weight" in k or ".lora_B.weight" in k for k in keys)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step0"]["n"] == 40 and summary["final"]["n"] == 40


@pytest.mark.parametrize("mode", ["answer", "full"])
def test_accumulation_matches_one_big_batch(tiny, mode):
    """2 micro-batches of 2 give the gradient of 1 batch of 4, with the window's target count as
    the loop counts it (answer: one target per row; full: rows differ in length)."""
    tok = Tokenizer.from_dir(tiny / "model")
    df, _ = read_table(tiny / "train.csv")
    ds = RowDataset(df, Encoder(tok, (tiny / "prompt.txt").read_text(), 128, mode))
    model = load_model(tiny / "model", "fp32")
    apply_lora(model, r=4, alpha=8, dropout=0.0)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    params = [p for p in model.parameters() if p.requires_grad]
    rows = [0, 7, 33, 120]
    grads = []
    for batches in ([ds.batch(rows)], [ds.batch(rows[:2]), ds.batch(rows[2:])]):
        model.zero_grad()
        n = torch.tensor(float(loss_mod.count_targets(batches)))
        assert int(n) == (4 if mode == "answer" else sum(len(ds[i]["input_ids"]) for i in rows))
        loss = 0.0
        for b in batches:  # as train.py's loop: each micro-batch over the whole window's count
            part = loss_mod.compute_loss(model, b, mode, "cpu") / n
            part.backward()
            loss += part.item()
        grads.append(([p.grad.clone() for p in params], loss))
    assert grads[0][1] == pytest.approx(grads[1][1], rel=1e-6)
    for a, b in zip(grads[0][0], grads[1][0]):  # (padding differs: float rounding only)
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def cli_entry(args, **kw):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def wait_for(pred, proc, timeout=120):
    t0 = time.time()
    while not pred():
        if proc.poll() is not None:
            raise AssertionError(f"train.py exited early: {proc.communicate()[1][-2000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.05)


def checkpoint_step(out):
    f = Path(out) / "checkpoint" / "trainer.json"
    try:
        return json.loads(f.read_text())["step"]
    except (OSError, ValueError):
        return 0


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(tiny, tmp_path):
    common = ["--steps", "8", "--save-every", "2", "--lr", "3e-3"]  # dropout 0.1 on: RNG must resume too
    ref = tmp_path / "ref"
    assert train.main(base_args(tiny, ref, *common)) == 0

    out = tmp_path / "killed"
    proc = cli_entry(base_args(tiny, out, *common))
    wait_for(lambda: checkpoint_step(out) >= 4, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    resumed_from = checkpoint_step(out)
    assert 4 <= resumed_from < 8
    assert train.main(base_args(tiny, out, *common, "--resume")) == 0

    ref_losses = [r["loss"] for r in records(ref) if "loss" in r]
    got_losses = [r["loss"] for r in records(out) if "loss" in r]
    assert got_losses == pytest.approx(ref_losses, rel=1e-6, abs=1e-7)
    a, b = adapter(ref), adapter(out)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_sigterm_writes_checkpoint(tiny, tmp_path):
    out = tmp_path / "term"
    proc = cli_entry(base_args(tiny, out, "--steps", "100000", "--save-every", "100000"))
    wait_for(lambda: (out / "metrics.jsonl").is_file() and "loss" in (out / "metrics.jsonl").read_text(), proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "checkpoint written" in err
    assert checkpoint_step(out) >= 1


def test_nan_loss_stops_and_keeps_last_checkpoint(tiny, tmp_path, monkeypatch):
    real = train.compute_loss
    calls = {"n": 0}

    def poisoned(model, batch, mode, device):
        calls["n"] += 1
        loss = real(model, batch, mode, device)
        return loss * float("nan") if calls["n"] > 4 else loss  # steps 1-2 fine (2 micro-batches each)

    monkeypatch.setattr(train, "compute_loss", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(UserError, match=r"non-finite loss \(nan\) at step 2.*Last good checkpoint"):
        train.main(base_args(tiny, out, "--steps", "5", "--save-every", "1"))
    assert checkpoint_step(out) == 2
    assert (out / "checkpoint" / "adapter_model.safetensors").is_file()


def test_user_errors_are_one_line(tiny, tmp_path):
    def err(*args):
        p = subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, capture_output=True, text=True)
        assert p.returncode == 2, p.stderr[-2000:]
        lines = [l for l in p.stderr.splitlines() if l.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
        return lines[0]

    assert "--r must be at least 1" in err(*base_args(tiny, tmp_path / "x", "--r", "0"))
    assert "nope.csv" in err(*base_args(tiny, tmp_path / "x", "--data", str(tmp_path / "nope.csv")))
    # The rest in-process (each subprocess pays the imports): cli_entry turns these into one line.
    for extra, msg in ((["--model", str(tmp_path)], "not a model folder"),
                       (["--resume"], "no checkpoint"),
                       (["--targets", "qproj"], "qproj"),
                       (["--precision", "fp16"], "fp16 needs CUDA")):
        with pytest.raises(UserError, match=msg):
            train.main(base_args(tiny, tmp_path / "fresh", *extra))


def test_resume_refuses_a_different_run(tiny, tmp_path):
    out = tmp_path / "run"
    assert train.main(base_args(tiny, out, "--steps", "2", "--save-every", "2")) == 0
    with pytest.raises(UserError, match=r"--r\b.*differ"):
        train.main(base_args(tiny, out, "--steps", "4", "--resume", "--r", "8"))


def test_adamw8bit_checkpoint_resumes_exactly(tiny, tmp_path, monkeypatch):
    # bitsandbytes shares one quantization map across parameters: the checkpoint must still save,
    # and its 8-bit optimizer state must come back exactly.
    common = ["--steps", "4", "--save-every", "100", "--optim", "adamw8bit", "--r", "64", "--lr", "3e-3"]
    ref, out = tmp_path / "ref", tmp_path / "a8"
    assert train.main(base_args(tiny, ref, *common)) == 0
    real, calls = train.compute_loss, []

    def sigterm_in_step_2(*a, **k):
        calls.append(1)
        if len(calls) == 3:  # step 2's first micro-batch (--grad-accum 2)
            os.kill(os.getpid(), signal.SIGTERM)  # the loop finishes this step, checkpoints, returns
        return real(*a, **k)
    monkeypatch.setattr(train, "compute_loss", sigterm_in_step_2)
    assert train.main(base_args(tiny, out, *common)) == 128 + signal.SIGTERM
    monkeypatch.setattr(train, "compute_loss", real)
    assert checkpoint_step(out) == 2
    assert train.main(base_args(tiny, out, *common, "--resume")) == 0
    assert [r["loss"] for r in records(out) if "loss" in r] == [r["loss"] for r in records(ref) if "loss" in r]
    a, b = adapter(ref), adapter(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_existing_run_is_not_clobbered_and_half_swapped_checkpoint_resumes(tiny, tmp_path):
    out = tmp_path / "run"
    assert train.main(base_args(tiny, out, "--steps", "2", "--save-every", "1")) == 0
    with pytest.raises(UserError, match="--resume .* or --overwrite"):
        train.main(base_args(tiny, out, "--steps", "2"))
    # A kill between atomic_write_dir's two renames leaves checkpoint.old only.
    (out / "checkpoint").rename(out / "checkpoint.old")
    assert find_checkpoint(out / "checkpoint") == out / "checkpoint.old"
    assert train.main(base_args(tiny, out, "--steps", "2", "--save-every", "1", "--resume")) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 2  # resumed at step 2: nothing left to do


def test_non_finite_gradient_stops_before_the_update(tiny, tmp_path, monkeypatch):
    real = train.compute_loss

    class InfGrad(torch.autograd.Function):  # the loss as it is; its gradient infinite
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * float("inf")

    monkeypatch.setattr(train, "compute_loss", lambda *a, **k: InfGrad.apply(real(*a, **k)))
    with pytest.raises(UserError, match="non-finite gradient norm at step 0"):
        train.main(base_args(tiny, tmp_path / "g", "--steps", "2"))
