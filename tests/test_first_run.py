"""What a newcomer meets first: runs without --out never clobber each other and runs/latest names
the newest; Ctrl-C during an evaluation is acknowledged and abandons it, with a checkpoint;
loss.png and the memory figures are there whenever metrics are; predict.py says which file it
scored."""
import hashlib
import json
import os
import signal
from pathlib import Path

import pandas as pd
import pytest

import predict
import train
from common.errors import UserError, cli_entry
from engine.log import plot
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
    capsys.readouterr()

    # Without --data, predict.py says what it scored and how to score your own.
    assert predict.main(["--adapter", "runs/latest", "--out", "val.csv", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "no --data given: scoring data/gsm8k_val.csv, the embedded validation set (--data FILE scores your own)" in err
    assert len(pd.read_csv(tmp_path / "val.csv")) == len(pd.read_csv(predict.DEFAULT_DATA))


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


def records(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def signal_in_evaluation(monkeypatch, at_batch: int, signals: int, log: dict):
    """train.py's model, its passes counted while it scores (eval mode: engine/score.py's batches);
    in the `at_batch`-th such batch it sends itself SIGINT `signals` times, then records what
    stderr showed by the time that batch's forward returned."""
    real = train.build_for_training

    def build(*a, **k):
        model, summary = real(*a, **k)
        forward = model.hidden  # (what scoring calls, once per batch)

        def counted(*fa, **fk):
            if not model.training:
                log["batches"] += 1
                if log["batches"] == at_batch:
                    for _ in range(signals):
                        os.kill(os.getpid(), signal.SIGINT)
                    log["err_by_then"] = log["capfd"].readouterr().err
            return forward(*fa, **fk)
        model.hidden = counted
        return model, summary
    monkeypatch.setattr(train, "build_for_training", build)


@pytest.mark.parametrize("evaluation, step", [(1, 0), (2, 2)])  # the step-0 one, one inside the loop
def test_ctrl_c_during_an_evaluation_is_acknowledged_and_abandons_it_with_a_checkpoint(
        tiny, tmp_path, monkeypatch, capfd, evaluation, step):
    per_eval = 16 // 2  # validation rows / --eval-batch-size
    log = {"batches": 0, "capfd": capfd}
    signal_in_evaluation(monkeypatch, at_batch=(evaluation - 1) * per_eval + 1, signals=1, log=log)
    out = tmp_path / "run"
    args = train_args(tiny, out, "--batch-size", "2", "--grad-accum", "1", "--steps", "6", "--eval-every", "2",
                      "--eval-batch-size", "2")
    assert train.main(args) == 128 + signal.SIGINT
    # Acknowledged while the first batch was still being scored, before any next batch ...
    assert "stopping (SIGINT): an evaluation in flight is abandoned at its next batch" in log["err_by_then"]
    assert "second Ctrl-C quits at once" in log["err_by_then"]
    # ... and no further batch was scored: the evaluation was abandoned, not finished.
    assert log["batches"] == (evaluation - 1) * per_eval + 1
    err = capfd.readouterr().err
    assert f"step {step:>5} validation: abandoned" in err
    assert f"checkpoint written to {out / 'checkpoint'} at step {step}" in err
    assert json.loads((out / "checkpoint" / "trainer.json").read_text())["step"] == step
    assert [r["step"] for r in records(out) if "eval" in r] == list(range(0, step, 2))  # none for the abandoned
    assert (out / "loss.png").is_file()
    # The checkpoint continues: the abandoned evaluation is done first, then the run completes.
    monkeypatch.undo()
    assert train.main(args + ["--resume"]) == 0
    assert [r["step"] for r in records(out) if "eval" in r] == [0, 2, 4, 6]


def test_a_second_ctrl_c_quits_at_once_with_one_line(tiny, tmp_path, monkeypatch, capfd):
    log = {"batches": 0, "capfd": capfd}
    signal_in_evaluation(monkeypatch, at_batch=1, signals=2, log=log)
    with pytest.raises(KeyboardInterrupt):  # raised by the second signal, in the batch it arrived in
        train.main(train_args(tiny, tmp_path / "run", "--steps", "2", "--eval-batch-size", "2"))
    assert log["batches"] == 1 and "err_by_then" not in log
    assert "stopping at once (SIGINT): no new checkpoint" in capfd.readouterr().err
    assert not (tmp_path / "run" / "checkpoint").exists()

    def interrupted():
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as exited:  # as the command line ends: one line, the shell's code
        cli_entry(interrupted)
    assert exited.value.code == 130 and capfd.readouterr().err.startswith("\ninterrupted (Ctrl-C)")


def test_a_run_stopped_before_any_evaluation_in_the_loop_has_its_plot_and_host_memory(tiny, tmp_path, monkeypatch):
    real, calls = train.compute_loss, []

    def sigterm_in_step_2(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # the step finishes, a checkpoint is written
        return real(*a, **k)
    monkeypatch.setattr(train, "compute_loss", sigterm_in_step_2)
    out = tmp_path / "run"
    assert train.main(train_args(tiny, out, "--batch-size", "2", "--grad-accum", "1", "--steps", "50")) == \
        128 + signal.SIGTERM
    assert (out / "loss.png").is_file()  # drawn at the stop's checkpoint, not only after an evaluation
    steps = [r for r in records(out) if "loss" in r]
    assert len(steps) == 2 and all(r["peak_rss_gib"] > 0.1 for r in steps)  # a CPU run: host memory
    assert all("peak_gib" not in r for r in steps)  # (that name is CUDA's allocator peak)


def test_loss_png_marks_evaluations_as_points_and_smooths_the_step_losses(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    figs, real_save = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (figs.append(self), real_save(self, *a, **k)))
    recs = [{"step": 0, "eval": {"accuracy": 0.44, "auc": 0.47}, "threshold": {"accuracy_at_threshold": 0.55}}]
    recs += [{"step": s, "loss": 1.0 + (s % 2)} for s in range(1, 31)]  # alternating 1, 2, 1, 2 ...
    recs += [{"step": 30, "eval": {"accuracy": 0.57, "auc": 0.61}, "threshold": {"accuracy_at_threshold": 0.61}}]
    plot(tmp_path, recs)
    assert (tmp_path / "loss.png").is_file()
    loss_ax, eval_ax = figs[0].axes
    raw, smooth = loss_ax.get_lines()
    assert raw.get_alpha() < 0.5 and list(raw.get_ydata()) == [1.0 + (s % 2) for s in range(1, 31)]
    assert max(smooth.get_ydata()[3:]) - min(smooth.get_ydata()[3:]) < 0.5  # the mean of 3 steps: flatter
    series = {line.get_label(): line for line in eval_ax.get_lines()}
    assert set(series) == {"val accuracy (cut 0.5)", "val accuracy, tuned threshold", "val ROC-AUC"}
    assert all(line.get_linestyle() == "None" for line in series.values())  # points, no line between them
    assert list(series["val accuracy, tuned threshold"].get_ydata()) == [0.55, 0.61]
