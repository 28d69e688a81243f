"""Data-parallel training (torchrun) and stopping on a signal: the process group, the one
all-reduce of the adapter gradients per step, and SIGTERM / Ctrl-C handling that every rank
agrees on."""
from __future__ import annotations

import contextlib
import datetime
import os
import signal

import torch
import torch.distributed as dist

from engine.build import resolve_device

# Rank 0 evaluates alone while the others wait in a barrier: allow for a long validation pass.
DIST_TIMEOUT = datetime.timedelta(hours=2)


def setup_distributed(device_arg: str):
    """(rank, world size, device). torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, resolve_device(device_arg)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    if device_arg in ("auto", "cuda") and torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=DIST_TIMEOUT)
    else:
        device = resolve_device("cpu" if device_arg == "auto" else device_arg)
        dist.init_process_group("gloo", timeout=DIST_TIMEOUT)
    return rank, world, device


def all_reduce_grads(params: list, loss_sum: float, device) -> float:
    """Sum the adapter gradients (and the loss) over ranks in one flat all-reduce.

    Explicit rather than DistributedDataParallel: only A and B have gradients, the sync must
    happen once per accumulation window, and the loss is already normalised by the global
    target count, so a plain sum is the exact gradient of the global batch.
    """
    flat = torch.cat([p.grad.reshape(-1) for p in params] + [torch.tensor([loss_sum], device=device)])
    dist.all_reduce(flat)
    off = 0
    for p in params:
        p.grad.copy_(flat[off:off + p.numel()].view_as(p))
        off += p.numel()
    return flat[-1].item()


def say(text: str) -> None:
    """Write to stderr from a signal handler: one unbuffered write, so a handler that runs while
    tqdm or print is writing to sys.stderr cannot collide with it in the same buffer."""
    try:
        os.write(2, text.encode())
    except OSError:  # no stderr to write to: stopping matters more than saying so
        pass


class StopSignal:
    """SIGTERM / SIGINT during a run: the first asks the loop to stop after the step in flight, or
    at the next batch of an evaluation in flight (`stop.signal` is what score's should_stop asks),
    with a checkpoint; a second one stops at once (KeyboardInterrupt), except inside `deferred()`
    (a checkpoint being written), which it must not tear. Each is acknowledged when it arrives."""

    FIRST = ("\nstopping ({name}): an evaluation in flight is abandoned at its next batch, a training step in "
             "flight is finished; then a checkpoint is written and the run ends (--resume continues it). A "
             "second Ctrl-C quits at once, without that checkpoint (earlier ones stay intact).\n")
    SECOND = "\nstopping at once ({name}): no new checkpoint; earlier ones are intact.\n"
    SAVING = "\n{name}: a checkpoint is being written; the run ends once it is whole.\n"

    def __init__(self):
        self.signal: int | None = None
        self._saving = False
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum, _frame):
        first, saving = self.signal is None, self._saving
        say(((self.FIRST if first else self.SAVING if saving else self.SECOND)
             .format(name=signal.Signals(signum).name)))
        if not first and not saving:
            raise KeyboardInterrupt
        self.signal = self.signal or signum

    @contextlib.contextmanager
    def deferred(self):
        self._saving = True
        try:
            yield
        finally:
            self._saving = False

    def agree(self, device) -> None:
        """Data-parallel: every rank takes the signal any rank got, so all stop after one step."""
        flag_t = torch.tensor([float(self.signal or 0)], device=device)
        dist.all_reduce(flag_t, op=dist.ReduceOp.MAX)
        self.signal = int(flag_t.item()) or None
