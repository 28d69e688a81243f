"""Defaults a user would choose: an 8-bit base everywhere, checkpointing only when memory needs it,
predict as trained, merge from anywhere, files with the usual permissions."""
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import engine.memory
import predict
import train
from engine.build import build_model
from engine.config import parse_train_args
from model.precision import default_precision
from model.quant import Int8Linear
from tiny import make_workdir, train_args

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_workdir(tmp_path_factory.mktemp("defaults"), n_rows=80, n_val=16, seed=4)


@pytest.mark.parametrize("activations", ["fp32", "bf16"])
def test_the_8bit_base_is_the_default_on_cpu_with_16bit_storage(tiny, activations):
    cpu = torch.device("cpu")
    assert default_precision(cpu) == "int8"
    model = build_model(tiny / "model", default_precision(cpu), cpu, activations)
    assert isinstance(model.model.layers[0].mlp.down_proj, Int8Linear)
    # Embeddings, norms and head stored in bf16; activations (and so logits) in the chosen dtype.
    assert model.model.embed_tokens.weight.dtype == model.model.norm.weight.dtype == torch.bfloat16
    ids = torch.tensor([[1, 5, 9, 14]])
    with torch.no_grad():
        logits = model(ids)
        assert logits.dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[activations]
        ref = build_model(tiny / "model", "fp32", cpu)(ids)
    assert (logits.float() - ref).abs().max() < 0.05 * ref.abs().max()  # int8 of a random model: close


@pytest.mark.parametrize("free_gib, on", [(0.001, True), (1000.0, False)])
def test_checkpointing_auto_decides_by_free_memory(tiny, tmp_path, monkeypatch, capsys, free_gib, on):
    monkeypatch.setattr(engine.memory, "free_memory_bytes", lambda device: int(free_gib * 2**30))
    seen = []
    real = train.build_for_training

    def keep(*a, **k):
        model, summary = real(*a, **k)
        seen.append(model)
        return model, summary
    monkeypatch.setattr(train, "build_for_training", keep)
    assert train.main(train_args(tiny, tmp_path / "run", "--steps", "1", "--batch-size", "2", "--grad-accum", "1")) == 0
    assert seen[0].grad_checkpointing is on
    err = capsys.readouterr().err
    assert f"gradient checkpointing {'on' if on else 'off'} (auto: a step needs ~" in err
    assert f"{free_gib:.1f} GiB free)" in err


def test_checkpointing_flags_still_accepted(tiny):
    cfg = parse_train_args(train_args(tiny, "x", "--no-grad-checkpointing"))
    assert cfg.grad_checkpointing == "off"
    assert parse_train_args(train_args(tiny, "x", "--grad-checkpointing")).grad_checkpointing == "on"
    assert parse_train_args(train_args(tiny, "x")).grad_checkpointing == "auto"


def test_predict_takes_the_precision_the_adapter_was_trained_at(tiny, tmp_path, capsys):
    run = tmp_path / "bf16"
    assert train.main(train_args(tiny, run, "--steps", "1", "--batch-size", "2", "--grad-accum", "1",
                                 "--precision", "bf16")) == 0
    capsys.readouterr()
    assert predict.main(["--adapter", str(run), "--data", str(tiny / "val.csv"), "--out", str(tmp_path / "a.csv"),
                         "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "(bf16, activations bf16" in err and "warning" not in err
    assert predict.main(["--adapter", str(run), "--data", str(tiny / "val.csv"), "--out", str(tmp_path / "b.csv"),
                         "--device", "cpu", "--precision", "fp32"]) == 0
    assert "trained with precision='bf16', scoring with 'fp32'" in capsys.readouterr().err


def test_merge_runs_from_any_folder_and_files_get_the_usual_permissions(tiny, tmp_path):
    run = tmp_path / "run"
    old = os.umask(0o022)
    try:
        assert train.main(train_args(tiny, run, "--steps", "1", "--batch-size", "2", "--grad-accum", "1")) == 0
    finally:
        os.umask(old)
    for f in (run / "adapter_config.json", run / "adapter_model.safetensors", run / "best" / "adapter_config.json",
              run / "checkpoint" / "adapter_config.json"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    p = subprocess.run([sys.executable, str(REPO / "merge.py"), "--model", str(tiny / "model"), "--adapter",
                        str(run / "adapter_model.safetensors"), "--out", "merged", "--dtype", "fp32"],
                       cwd=elsewhere, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
    assert p.returncode == 0, p.stderr
    assert json.loads((elsewhere / "merged" / "config.json").read_text())["torch_dtype"] == "float32"
    assert stat.S_IMODE((elsewhere / "merged" / "config.json").stat().st_mode) & 0o044 == 0o044
