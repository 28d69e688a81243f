"""Checkpoints from which `--resume` continues exactly: adapter, optimizer, GradScaler, every
rank's RNG state and the sampler's position, in safetensors (no pickles: loading runs no code),
written as a whole folder at once (engine/files.py: a crash leaves the old or the new one).

    checkpoint/adapter_model.safetensors, adapter_config.json   the adapter, PEFT's format
    checkpoint/state.safetensors                                 optimizer, RNG, scaler tensors
    checkpoint/trainer.json                                      step, sampler, the tensors' layout, the run's args
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from engine.cli import UserError
from engine.files import atomic_write_dir
from lora.io import load_adapter, save_adapter


def find_checkpoint(path: Path) -> Path:
    """`path`, or what a crash in atomic_write_dir's two renames left: a complete .tmp or the .old."""
    for cand in (path, path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")):
        if (cand / "trainer.json").is_file():  # trainer.json is written last
            return cand
    return path


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


def save_checkpoint(path: Path, model, opt, scaler, sampler, step: int, args: dict, run: dict,
                    rngs: list[dict]) -> None:
    """Write the checkpoint folder `path` atomically. run: engine.trainer.run_record (in the
    adapter's header); rngs: every rank's rng_state, by rank."""
    def write(tmp: Path):
        save_adapter(model, tmp, base_model_name_or_path=run["model_dir"], run=run)
        state = {"optimizer": opt.state_dict(), "rng": rngs,
                 "scaler": scaler.state_dict() if scaler is not None else None}
        tensors, skel = flatten_state(state)
        save_file(tensors, str(tmp / "state.safetensors"))
        meta = {"step": step, "sampler": sampler.state_dict(), "state": skel, "args": args}
        (tmp / "trainer.json").write_text(json.dumps(meta, indent=1))  # last: marks the folder complete

    atomic_write_dir(path, write)


def saved_args(path: Path) -> dict:
    """The run arguments a checkpoint was written with."""
    return json.loads((path / "trainer.json").read_text())["args"]


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
    rng = state["rng"][rank]
    torch.set_rng_state(rng["cpu"])
    if device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], device)
    sampler.load_state_dict(meta["sampler"])
    return meta["step"]
