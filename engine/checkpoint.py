"""Checkpoints from which `--resume` continues exactly: adapter, optimizer, GradScaler, every
rank's RNG state and the sampler's position, in safetensors (no pickles: loading runs no code),
written as a whole folder at once (common/files.py: a crash leaves the old or the new one).

    checkpoint/adapter_model.safetensors, adapter_config.json   the adapter, PEFT's format
    checkpoint/state.safetensors                                 optimizer, RNG, scaler tensors
    checkpoint/trainer.json                                      step, sampler, the tensors' layout, the run's args
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from common.errors import UserError
from common.files import atomic_write_dir
from lora.io import load_adapter, save_adapter


def checkpoint_problem(path: Path) -> str | None:
    """None if `path` holds a complete, readable checkpoint, else what is wrong (naming the file)."""
    meta = path / "trainer.json"
    if not meta.is_file():
        return f"{meta}: missing"
    try:
        m = json.loads(meta.read_text())
        int(m["step"]), m["sampler"], m["state"], m["args"]
    except (ValueError, KeyError, TypeError) as e:
        return f"{meta}: torn or not a checkpoint's ({type(e).__name__}: {e})"
    for name in ("state.safetensors", "adapter_model.safetensors"):
        try:
            with safe_open(str(path / name), "pt") as f:
                for k in f.keys():  # reading every tensor's bytes finds a cut-off body too
                    f.get_slice(k)[...]
        except (SafetensorError, OSError) as e:
            return f"{path / name}: unreadable ({e})"
    return None


def find_checkpoint(path: Path) -> Path:
    """The newest complete checkpoint among `path` and what a crash in atomic_write_dir's two
    renames leaves (`path.tmp` complete, or `path.old`); `path` itself if none is complete. A run
    folder (one holding checkpoint/) stands for its checkpoint: `--resume runs/run-002` works."""
    if not (path / "trainer.json").exists() and (path / "checkpoint").is_dir():
        path = path / "checkpoint"
    cands = [c for c in (path, path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old"))
             if checkpoint_problem(c) is None]
    return max(cands, key=lambda c: json.loads((c / "trainer.json").read_text())["step"], default=path)


def fingerprint(path: str | Path) -> dict:
    """Size and BLAKE2b hash of a data file: --resume refuses a file that changed."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return {"size": os.path.getsize(path), "blake2b": h.hexdigest()}


class RunLock:
    """An exclusive lock on a run folder for the life of a run: `OUT/.lock`, holding the pid.

    flock() locks die with their process (a kill -9 included), so a lock left by a dead run is
    never stale: the next run simply takes it. A live holder is refused, naming its pid."""

    def __init__(self, out: Path):
        self.path = out / ".lock"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            raise UserError(f"--out {out} is in use by another train.py run (pid {holder}); "
                            f"wait for it or pick another --out") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None


@contextlib.contextmanager
def disk_errors(out: Path):
    """A write that fails (a full disk, a read-only folder) ends the run with one line that says
    which checkpoint is intact; atomic writes leave the previous files as they were."""
    try:
        yield
    except OSError as e:
        intact = find_checkpoint(out / "checkpoint")
        keep = (f"the last complete checkpoint is {intact} (step {saved_meta(intact)['step']}): --resume continues "
                f"from it once there is room" if checkpoint_problem(intact) is None else "no checkpoint was written yet")
        raise UserError(f"cannot write in {out} ({e.strerror or e}); {keep}") from None


def flatten_state(obj, prefix="") -> tuple[dict, object]:
    """Split a nested state (optimizer, RNG) into safetensors-able tensors and a JSON skeleton."""
    tensors = {}
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().to("cpu", copy=True).contiguous()  # own memory: bnb shares qmaps
        return tensors, {"__tensor__": prefix}
    if isinstance(obj, dict):
        skel = {}
        for k, v in obj.items():
            t, skel[str(k)] = flatten_state(v, f"{prefix}.{k}" if prefix else str(k))
            tensors.update(t)
        return tensors, {"__dict__": skel, "__int_keys__": all(isinstance(k, int) for k in obj)}
    if isinstance(obj, (list, tuple)):
        items = [flatten_state(v, f"{prefix}.{i}") for i, v in enumerate(obj)]
        for t, _ in items:
            tensors.update(t)
        return tensors, {"__list__": [s for _, s in items]}
    return tensors, obj


def unflatten_state(skel, tensors: dict):
    """The inverse of flatten_state."""
    if isinstance(skel, dict) and "__tensor__" in skel:
        return tensors[skel["__tensor__"]]
    if isinstance(skel, dict) and "__dict__" in skel:
        conv = int if skel["__int_keys__"] and skel["__dict__"] else str
        return {conv(k): unflatten_state(v, tensors) for k, v in skel["__dict__"].items()}
    if isinstance(skel, dict) and "__list__" in skel:
        return [unflatten_state(v, tensors) for v in skel["__list__"]]
    return skel


def rng_state(device: torch.device) -> dict:
    """This process's torch RNG state (the dropout masks' source): CPU, and CUDA when used."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Put back what rng_state returned: the next dropout masks are the ones drawn after it."""
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(path: Path, model, opt, scaler, sampler, step: int, args: dict, record: dict,
                    rngs: list[dict]) -> None:
    """Write the checkpoint folder `path` atomically. record: engine/setup.py's training_record (in the
    adapter's header); rngs: every rank's rng_state, by rank."""
    def write(tmp: Path):
        save_adapter(model, tmp, base_model_name_or_path=record["model_dir"], record=record)
        state = {"optimizer": opt.state_dict(), "rng": rngs,
                 "scaler": scaler.state_dict() if scaler is not None else None}
        tensors, skel = flatten_state(state)
        save_file(tensors, str(tmp / "state.safetensors"))
        meta = {"step": step, "sampler": sampler.state_dict(), "state": skel, "args": args, "data": record.get("data")}
        (tmp / "trainer.json").write_text(json.dumps(meta, indent=1))  # last: marks the folder complete

    atomic_write_dir(path, write)


def saved_meta(path: Path) -> dict:
    """A checkpoint's trainer.json: step, sampler, args, data fingerprints."""
    return json.loads((path / "trainer.json").read_text())


def saved_args(path: Path) -> dict:
    """The run arguments a checkpoint was written with."""
    return saved_meta(path)["args"]


def load_checkpoint(path: Path, model, opt, scaler, sampler, device, rank: int, world: int) -> int:
    """Restore everything save_checkpoint wrote into the live objects; returns the step."""
    load_adapter(model, path)
    meta = json.loads((path / "trainer.json").read_text())
    state = unflatten_state(meta["state"], load_file(str(path / "state.safetensors")))
    opt.load_state_dict(state["optimizer"])
    if scaler is not None and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    if len(state["rng"]) != world:
        raise UserError(f"--resume: the checkpoint was written by {len(state['rng'])} rank(s), this run has {world}")
    set_rng_state(state["rng"][rank], device)
    sampler.load_state_dict(meta["sampler"])
    return meta["step"]
