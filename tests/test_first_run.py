"""What a newcomer meets first: runs without --out never clobber each other and runs/latest names
the newest; predict.py says which file it scored."""
import hashlib
import json
import os
from pathlib import Path

import pytest

import predict
import train
from common.errors import UserError
from tiny import make_workdir, train_args


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_workdir(tmp_path_factory.mktemp("first"), n_rows=80, n_val=16, seed=6)


def no_out(tiny, *extra):
    """train.py's flags for a tiny run with no --out, as the README's and the card's commands run."""
    return train_args(tiny, None, "--batch-size", "2", "--grad-accum", "1", *extra)


def contents(folder: Path) -> dict:
    """Every file under `folder` (its .lock aside) and a hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.blake2b(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_the_cards_commands_after_the_readmes_start_a_new_run_and_leave_the_first_untouched(
        tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert train.main(no_out(tiny, "--steps", "2")) == 0  # the README's command: runs/run-001
    first = tmp_path / "runs" / "run-001"
    before = contents(first)
    assert "adapter_model.safetensors" in before and "checkpoint/trainer.json" in before
    capsys.readouterr()

    assert train.main(no_out(tiny, "--r", "32", "--alpha", "64", "--steps", "2")) == 0  # the card's: no flag needed
    err = capsys.readouterr().err
    assert "run folder runs/run-002 (new" in err
    assert os.readlink(tmp_path / "runs" / "latest") == "run-002"
    assert json.loads((tmp_path / "runs" / "latest" / "adapter_config.json").read_text())["r"] == 32
    assert contents(first) == before  # the earlier run: every file as it was

    # The card's predict example, on the path runs/latest gives.
    assert predict.main(["--adapter", "runs/latest/adapter_model.safetensors", "--data", str(tiny / "val.csv"),
                         "--out", "submission.csv", "--device", "cpu"]) == 0
    assert len((tmp_path / "submission.csv").read_text().splitlines()) == 1 + 16


def test_resume_without_out_continues_the_latest_run(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="--resume without --out continues runs/latest, and there is none"):
        train.main(no_out(tiny, "--steps", "2", "--resume"))
    assert train.main(no_out(tiny, "--steps", "2")) == 0
    capsys.readouterr()
    assert train.main(no_out(tiny, "--steps", "2", "--resume")) == 0
    assert "resuming from runs/run-001/checkpoint (step 2)" in capsys.readouterr().err
    # A run folder given to --resume is continued in place too.
    assert train.main(no_out(tiny, "--steps", "2", "--resume", "runs/run-001")) == 0
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["latest", "run-001"]


def test_a_run_that_fails_its_set_up_does_not_become_latest(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert train.main(no_out(tiny, "--steps", "1")) == 0
    with pytest.raises(UserError, match="nope.csv"):
        train.main(no_out(tiny, "--steps", "1", "--data", str(tmp_path / "nope.csv")))
    assert os.readlink(tmp_path / "runs" / "latest") == "run-001"


def test_latest_is_a_file_naming_the_run_where_symlinks_fail(tmp_path, monkeypatch):
    from engine.setup import latest_run, point_latest

    runs = tmp_path / "runs"
    (runs / "run-004").mkdir(parents=True)

    def no_symlinks(*a, **k):
        raise OSError("symlinks are not supported here")
    monkeypatch.setattr(Path, "symlink_to", no_symlinks)
    point_latest(runs / "run-004", runs)
    assert (runs / "latest").read_text() == "run-004\n" and not (runs / "latest").is_symlink()
    assert latest_run(runs) == runs / "run-004"


def test_an_explicit_out_keeps_its_protection(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "mine"
    assert train.main(train_args(tiny, out, "--steps", "1")) == 0
    with pytest.raises(UserError, match="holds another run: add --resume to continue it or --overwrite"):
        train.main(train_args(tiny, out, "--steps", "1"))
    assert not (tmp_path / "runs").exists()
