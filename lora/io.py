"""LoRA adapters on disk in PEFT's format: `adapter_model.safetensors` + `adapter_config.json`.

Keys are PEFT's: `base_model.model.<module path>.lora_A.weight` (r, in) and `.lora_B.weight`
(out, r), so `peft.PeftModel.from_pretrained` reads what we write and we read what PEFT writes.
Only safetensors: a pickled `adapter_model.bin` can run code when loaded, so it is refused.

The safetensors header carries the adapter's config too, so the file alone is enough to use it
(`predict.py --adapter ckpt.safetensors`). Metadata keys, each a JSON string:
    "adapter_config"  the adapter_config.json (r, lora_alpha, use_rslora, target_modules, ...)
    "run"             the training record, how it was trained (engine/setup.py: training_record):
                      model_dir, prompt (the template's text), prompt_file, max_seq_len,
                      precision, loss, data (each file's path, size and BLAKE2b hash), and after
                      an evaluation threshold and threshold_rows (the tuned p_true cut and the
                      number of validation rows it was tuned on). train.py writes it; absent in
                      a PEFT-made file.
PEFT ignores the metadata; a side adapter_config.json, when present, must agree with it.
Every file is written atomically (temp file in the same folder, fsync, os.replace), so a crash
mid-save leaves the previous adapter intact.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from common.errors import UserError
from common.files import atomic_write, atomic_write_text
from model.load import PICKLE_SUFFIXES
from lora.inject import (ALL_PROJECTIONS, apply_lora, is_linear_like, lora_modules, lora_state_dict,
                         name_matches, remove_lora)

WEIGHTS_NAME = "adapter_model.safetensors"
META_CONFIG, META_RECORD = "adapter_config", "run"  # safetensors header keys (JSON strings)
CONFIG_NAME = "adapter_config.json"
PREFIX = "base_model.model."  # PEFT's prefix: PeftModel.base_model (LoraModel).model (the LM)


class AdapterError(UserError, ValueError):
    """An adapter file or config that does not fit (format, keys, rank, shapes)."""


# ---- save ----

def adapter_config(model: nn.Module, base_model_name_or_path: str | None = None) -> dict:
    """The adapter_config.json for the LoRA in `model` (one r / alpha / dropout / rslora for all)."""
    mods = lora_modules(model)
    if not mods:
        raise ValueError("save_adapter: the model has no LoRA layers")
    settings = {(m.r, m.alpha, m.dropout, m.rslora) for m in mods.values()}
    if len(settings) > 1:
        raise ValueError(f"save_adapter: LoRA layers differ in (r, alpha, dropout, rslora): "
                         f"{sorted(settings)}")
    r, alpha, dropout, rslora = settings.pop()
    # Short names ("q_proj") when they select exactly the wrapped layers; otherwise the full
    # module paths, so PEFT (and load_adapter) wrap the same layers and no others.
    short = sorted({n.rsplit(".", 1)[-1] for n in mods})
    others = [n for n, m in model.named_modules()
              if n not in mods and is_linear_like(m) and n.rsplit(".", 1)[-1] in short
              and not any(n.startswith(w + ".") for w in mods)]
    targets = short if not others else list(mods)
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path, "revision": None,
        "inference_mode": True, "r": r, "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": dropout,
        "use_rslora": rslora, "target_modules": targets, "exclude_modules": None,
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False, "lora_bias": False,
    }


def save_adapter(model: nn.Module, out_dir: str | Path, base_model_name_or_path: str | None = None,
                 record: dict | None = None) -> Path:
    """Write `adapter_model.safetensors` and `adapter_config.json` into `out_dir` (created).

    Args:
        model: a model with LoRALinear layers (lora.inject.apply_lora).
        out_dir: folder to write into.
        base_model_name_or_path: recorded in the config (PEFT ignores it when given a model).
        record: how the adapter was trained (JSON-able), stored in the file's header as "run".
    Returns:
        the path of the safetensors file.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = adapter_config(model, base_model_name_or_path)
    if any(m.merged for m in lora_modules(model).values()):
        raise ValueError("save_adapter: LoRA is merged into the base weights; unmerge() first")
    tensors = {PREFIX + k: v.detach().to("cpu").contiguous() for k, v in lora_state_dict(model).items()}
    weights = out_dir / WEIGHTS_NAME
    meta = {"format": "pt", META_CONFIG: json.dumps(config)}
    if record is not None:
        meta[META_RECORD] = json.dumps(record)
    atomic_write(weights, lambda tmp: save_file(tensors, tmp, metadata=meta))
    atomic_write_text(out_dir / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    return weights


# ---- load ----

def _resolve(path: str | Path) -> tuple[Path, Path]:
    """(weights file, config file) for a folder, its safetensors file or its config file."""
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        raise AdapterError(f"{path}: pickle adapter files are not loaded (they can run code); "
                           f"convert it to {WEIGHTS_NAME}")
    if path.is_dir():
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
            hint = f" (found {pickles[0]}: pickles are refused, convert to safetensors)" if pickles else ""
            raise AdapterError(f"{path}: no {WEIGHTS_NAME}{hint}")
    elif path.name == CONFIG_NAME:
        weights = path.parent / WEIGHTS_NAME
    else:
        weights = path
    if not weights.is_file():
        raise AdapterError(f"{weights}: no such file")
    if weights.suffix != ".safetensors":
        raise AdapterError(f"{weights}: not a .safetensors file")
    return weights, weights.parent / CONFIG_NAME


# PEFT options that change what the adapter computes and that we do not implement.
_UNSUPPORTED = {"use_dora": False, "lora_bias": False, "fan_in_fan_out": False, "bias": "none",
                "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {},
                "alpha_pattern": {}, "exclude_modules": None, "layer_replication": None,
                "trainable_token_indices": None, "target_parameters": None, "use_qalora": False}


def read_header(weights: Path) -> dict:
    """The safetensors header metadata of an adapter file ({} when it has none)."""
    try:
        with safe_open(str(weights), "pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"{weights}: unreadable safetensors file ({e})") from None


def _json(text: str, where: str) -> dict:
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise AdapterError(f"{where}: not a JSON object")
    return obj


# Keys that decide what the adapter computes: a side file and the header must agree on these.
_DECISIVE = ("r", "lora_alpha", "use_rslora", "target_modules")


def read_adapter_config(path: str | Path) -> dict:
    """Read and check the adapter config (path: the folder, the json, or the safetensors file):
    adapter_config.json beside the weights, else the weights file's header."""
    path = Path(path)
    if path.name == CONFIG_NAME:
        weights, cfg_path = path.parent / WEIGHTS_NAME, path
    else:
        weights, cfg_path = _resolve(path)
    header = read_header(weights) if weights.is_file() else {}
    in_header = _json(header[META_CONFIG], f"{weights} (header {META_CONFIG})") if META_CONFIG in header else None
    if cfg_path.is_file():
        cfg = _json(cfg_path.read_text(encoding="utf-8"), str(cfg_path))
        if in_header is not None:
            differ = [k for k in _DECISIVE if cfg.get(k) != in_header.get(k)]
            if differ:
                raise AdapterError(f"{cfg_path} and the header of {weights} disagree on {', '.join(differ)} "
                                   f"({cfg_path.name}: {cfg.get(differ[0])!r}, header: {in_header.get(differ[0])!r})")
    elif in_header is not None:
        cfg, cfg_path = in_header, weights
    else:
        raise AdapterError(f"{cfg_path}: no adapter config next to the adapter weights, and none in the "
                           f"header of {weights}")
    if cfg.get("peft_type") != "LORA":
        raise AdapterError(f"{cfg_path}: peft_type is {cfg.get('peft_type')!r}, not 'LORA'")
    for key in ("r", "lora_alpha", "target_modules"):
        if cfg.get(key) in (None, "", []):
            raise AdapterError(f"{cfg_path}: missing {key}")
    if not isinstance(cfg["r"], int) or cfg["r"] <= 0:
        raise AdapterError(f"{cfg_path}: r must be a positive integer, got {cfg['r']!r}")
    targets = cfg["target_modules"]
    if isinstance(targets, str) and targets != "all-linear":  # PEFT: a regex over module names
        try:
            re.compile(targets)
        except re.error as e:
            raise AdapterError(f"{cfg_path}: target_modules {targets!r} is not a valid regular expression "
                               f"({e})") from None
    elif not isinstance(targets, str) and not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise AdapterError(f"{cfg_path}: target_modules must be a list of module names or a regex, got {targets!r}")
    for key, ok in _UNSUPPORTED.items():
        if cfg.get(key) not in (ok, None, False, {}, []):
            raise AdapterError(f"{cfg_path}: {key}={cfg[key]!r} is not supported (expected {ok!r})")
    return cfg


def read_record(path: str | Path) -> dict:
    """How the adapter was trained, from its file's header ({} for a file without it, e.g. PEFT's)."""
    weights, _ = _resolve(path)
    header = read_header(weights)
    return _json(header[META_RECORD], f"{weights} (header {META_RECORD})") if META_RECORD in header else {}


def _filter_for(targets: str | list[str]):
    """PEFT's target_modules semantics: a list of (suffix) names, "all-linear", or a regex."""
    if isinstance(targets, str):
        if targets == "all-linear":  # PEFT: every linear except the output head
            return lambda m, n: is_linear_like(m) and n != "lm_head"
        rx = re.compile(targets)
        return lambda m, n: is_linear_like(m) and rx.fullmatch(n) is not None
    return lambda m, n: is_linear_like(m) and any(name_matches(n, t) for t in targets)


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a PEFT-format LoRA adapter into `model` (adding LoRA layers first if it has none).

    Args:
        model: a model.llama.Llama (any precision), with or without LoRA layers.
        path: the adapter folder, its adapter_model.safetensors, or its adapter_config.json.
    Returns:
        the same model with the adapter loaded (LoRA it adds is the only trainable part).
    Raises:
        AdapterError: pickles, bad config, missing / extra keys, rank or shape mismatch.
    """
    weights, _ = _resolve(path)
    cfg = read_adapter_config(path)
    r, alpha, rslora = cfg["r"], cfg["lora_alpha"], bool(cfg.get("use_rslora", False))
    added = not lora_modules(model)
    if added:
        targets = cfg["target_modules"]
        try:
            apply_lora(model, targets if isinstance(targets, list) else ALL_PROJECTIONS, r=r, alpha=alpha,
                       dropout=float(cfg.get("lora_dropout") or 0.0), rslora=rslora,
                       filter_fn=None if isinstance(targets, list) else _filter_for(targets))
        except ValueError as e:
            raise AdapterError(f"{weights}: {e}") from None
    try:
        _load_checked(model, weights, r, alpha, rslora)
    except AdapterError:
        if added:  # leave the model as it came, not half-adapted
            remove_lora(model)
        raise
    return model


def _load_checked(model: nn.Module, weights: Path, r: int, alpha: float, rslora: bool) -> None:
    for name, m in lora_modules(model).items():
        if m.merged:
            raise AdapterError(f"{name}: LoRA is merged into the base weights; unmerge() first")
        if m.r != r:
            raise AdapterError(f"{weights}: rank mismatch: adapter r={r}, model's {name} has r={m.r}")
        if (m.alpha, m.rslora) != (float(alpha), rslora):
            raise AdapterError(f"{weights}: adapter lora_alpha={alpha}, use_rslora={rslora} but model's "
                               f"{name} has alpha={m.alpha:g}, rslora={m.rslora}")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"{weights}: unreadable safetensors file ({e})") from None
    ours = dict(model.named_parameters())
    expected = {PREFIX + k for k in lora_state_dict(model)}
    extra = sorted(k for k in tensors if k not in expected)
    if extra:
        raise AdapterError(f"{weights}: unexpected key {extra[0]} ({len(extra)} not in the model)")
    missing = sorted(k for k in expected if k not in tensors)
    if missing:
        raise AdapterError(f"{weights}: missing key {missing[0]} ({len(missing)} missing)")
    for key, t in tensors.items():
        p = ours[key[len(PREFIX):]]
        if t.shape != p.shape:
            is_a = key.endswith("lora_A.weight")
            rank = t.shape[0 if is_a else 1] if t.dim() == 2 else None
            if t.dim() == 2 and rank != r and t.shape[1 if is_a else 0] == p.shape[1 if is_a else 0]:
                raise AdapterError(f"{weights}: rank mismatch at {key}: {tuple(t.shape)} has rank {rank}, "
                                   f"config/model r={r}")
            raise AdapterError(f"{weights}: shape mismatch at {key}: file {tuple(t.shape)}, model "
                               f"{tuple(p.shape)} (an adapter for another model?)")
        if not t.dtype.is_floating_point:
            raise AdapterError(f"{weights}: {key} has dtype {t.dtype}, expected a float tensor")
    with torch.no_grad():
        for key, t in tensors.items():
            ours[key[len(PREFIX):]].copy_(t)
