"""Data-parallel training on 2 CPU processes (gloo): same adapter as one process, exact resume,
and one rank's failure ends the run with that rank's message."""
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

import train
from tiny import make_workdir, train_args

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_workdir(tmp_path_factory.mktemp("ddp"), n_rows=120, n_val=20, seed=5)


def args_for(tiny, out, *extra):
    return train_args(tiny, out, "--lr", "5e-3", *extra)


def adapter(out):
    return load_file(str(Path(out) / "adapter_model.safetensors"))


def losses(out):
    return [r["loss"] for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _worker(rank, world, port, argv, fault):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    calls = {"loss": 0}
    real_loss = train.compute_loss

    def compute_loss(*a, **k):  # the faults' tests run one micro-batch per step (--grad-accum 1)
        calls["loss"] += 1
        if fault == "sigterm" and rank == 1 and calls["loss"] == 3:  # rank 1 gets SIGTERM in step 3
            os.kill(os.getpid(), signal.SIGTERM)
        if fault == "raise" and rank == 1 and calls["loss"] == 2:  # rank 1 fails during step 2
            raise RuntimeError("boom on rank 1")
        return real_loss(*a, **k)

    train.compute_loss = compute_loss  # the name train.py's loop calls
    code = train.main(argv)
    if code:
        sys.exit(code)


def spawn(argv, fault=None):
    mp.spawn(_worker, args=(2, free_port(), argv, fault), nprocs=2, join=True)


def test_two_ranks_equal_one_process_with_the_same_global_batch(tiny, tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    common = ["--steps", "3", "--dropout", "0"]
    assert train.main(args_for(tiny, single, *common, "--batch-size", "2", "--grad-accum", "2")) == 0
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(free_port()), "--", str(REPO / "train.py"),  # "--": else torchrun reads --r as its own
                        *args_for(tiny, multi, *common, "--batch-size", "2", "--grad-accum", "1")],
                       env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "2 rank(s) = 4 rows per step" in p.stderr
    assert losses(multi) == pytest.approx(losses(single), rel=1e-5)
    a, b = adapter(single), adapter(multi)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_resume_under_two_ranks(tiny, tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "out"
    common = ["--steps", "5", "--save-every", "100", "--batch-size", "2", "--grad-accum", "1"]  # dropout on
    spawn(args_for(tiny, ref, *common))
    with pytest.raises(Exception, match="exit code 143|process 1 terminated with exit code|SIGTERM"):
        spawn(args_for(tiny, out, *common), fault="sigterm")  # both ranks stop after step 3 and checkpoint
    assert json.loads((out / "checkpoint" / "trainer.json").read_text())["step"] == 3
    spawn(args_for(tiny, out, *common, "--resume"))
    assert losses(out) == pytest.approx(losses(ref), rel=1e-6)
    a, b = adapter(ref), adapter(out)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def _logged_worker(rank, world, port, argv, fault, log_dir):
    """_worker with this rank's stderr in log_dir/rank<N>.txt and its exit code as the process's."""
    with open(Path(log_dir) / f"rank{rank}.txt", "w") as f:
        os.dup2(f.fileno(), 2)
        sys.stderr = os.fdopen(2, "w", buffering=1)
        try:
            _worker(rank, world, port, argv, fault)
        except SystemExit as e:
            os._exit(e.code if isinstance(e.code, int) else 1)
        except BaseException:
            import traceback
            traceback.print_exc()
            os._exit(1)
        os._exit(0)


def test_one_rank_failing_ends_the_run_with_its_message(tiny, tmp_path):
    # Two independent processes, no launcher to kill the survivor: rank 0 must end by itself.
    ctx = mp.get_context("spawn")
    port = free_port()
    argv = args_for(tiny, tmp_path / "fail", "--steps", "4", "--batch-size", "2", "--grad-accum", "1")
    procs = [ctx.Process(target=_logged_worker, args=(r, 2, port, argv, "raise", str(tmp_path)))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "a rank outlived the failing one (it would hang until the 2-hour timeout)"
    assert [p.exitcode != 0 for p in procs] == [True, True]
    assert "boom on rank 1" in (tmp_path / "rank1.txt").read_text()


def test_two_ranks_without_out_share_one_new_run_folder(tiny, tmp_path, monkeypatch):
    """Rank 0 picks runs/run-NNN and tells the others: one new folder, holding the whole run."""
    monkeypatch.chdir(tmp_path)  # (spawned ranks start in the parent's folder)
    (tmp_path / "runs" / "run-001").mkdir(parents=True)  # an earlier run
    spawn(train_args(tiny, None, "--steps", "2", "--batch-size", "2", "--grad-accum", "1"))
    runs = tmp_path / "runs"
    assert sorted(p.name for p in runs.iterdir()) == ["latest", "run-001", "run-002"]
    assert os.readlink(runs / "latest") == "run-002"
    assert json.loads((runs / "run-002" / "checkpoint" / "trainer.json").read_text())["step"] == 2
    assert len(losses(runs / "run-002")) == 2 and not any((runs / "run-001").iterdir())
