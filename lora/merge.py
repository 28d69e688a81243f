"""Fold a LoRA adapter into its base model and write a plain Hugging Face folder.

    python -m lora.merge --model BASE_DIR --adapter ADAPTER_DIR --out OUT_DIR [--precision int8]

W' = W + s·B@A for every adapted weight, computed in fp32 and stored in bf16 (or --dtype fp32).
The base weights are streamed shard by shard from the original checkpoint in --model, so the
update lands on the checkpoint's own float weights and no int8 rounding enters the export; the
model is never built and host memory holds about one output shard.
`--precision int8|nf4` instead merges into the weights as the quantized base saw them
(quantize → dequantize, the function the adapter was trained against); the result is still
saved in float, never silently re-quantized. The output has config.json, safetensors shards
(≤ --max-shard-size each, with model.safetensors.index.json when there are several), and the
tokenizer / generation files copied over; it loads in transformers and in model.load.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from common.errors import UserError, cli_entry
from common.files import atomic_write, atomic_write_text
from lora.io import PREFIX, _resolve, read_adapter_config
from lora.lora import lora_delta, lora_scaling
from model.config import LlamaConfig
from model.llama import PROJECTIONS
from model.precision import FLOAT_DTYPES, PRECISIONS
from model.load import SKIPPED_KEY, weight_files

COPY_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "generation_config.json", "tokenizer.model", "chat_template.jinja")
HF_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float16: "float16"}
# The weights model/load.py quantizes: the seven projections inside the blocks.
QUANTIZED_KEY = re.compile(r"model\.layers\.\d+\.(" + "|".join(map(re.escape, PROJECTIONS)) + r")\.weight")


class MergeError(UserError, ValueError):
    """Inputs that cannot be merged (missing files, keys or shapes that do not line up)."""


def tensor_files(model_dir: Path) -> dict[str, Path]:
    """tensor name -> safetensors file, for model.safetensors or the shards of the index."""
    files, _, _ = weight_files(model_dir)
    out = {}
    for f in files:
        with safe_open(f, "pt") as sf:
            for k in sf.keys():
                if k in out:
                    raise MergeError(f"key {k} appears twice: in {out[k]} and {f}")
                out[k] = f
    return out


def read_updates(adapter: str | Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict, float]:
    """({"model.layers.0.self_attn.q_proj.weight": (A (r, in), B (out, r)), ...}, config, s)."""
    weights, _ = _resolve(adapter)
    cfg = read_adapter_config(adapter)
    r = cfg["r"]
    scale = lora_scaling(r, cfg["lora_alpha"], bool(cfg.get("use_rslora")))
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise MergeError(f"{weights}: unreadable safetensors file ({e})") from None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = re.fullmatch(re.escape(PREFIX) + r"(.+)\.lora_([AB])\.weight", key)
        if m is None:
            raise MergeError(f"{weights}: unexpected key {key} (only lora_A / lora_B are merged)")
        pairs.setdefault(m[1] + ".weight", {})[m[2]] = t
    updates = {}
    for key, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise MergeError(f"{weights}: {key[:-len('.weight')]} has lora_{next(iter(ab))} but not its pair")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            raise MergeError(f"{weights}: rank mismatch at {key}: A {tuple(a.shape)}, "
                             f"B {tuple(b.shape)}, r={r}")
        updates[key] = (a, b)
    return updates, cfg, scale


def base_weight(w: torch.Tensor, precision: str | None) -> torch.Tensor:
    """The fp32 weight the adapter is added to: as stored, or as a model at `precision` saw it."""
    if precision in (None, "fp32"):
        return w.float()
    if precision in ("bf16", "fp16"):
        return w.to(FLOAT_DTYPES[precision]).float()
    from model.quant import dequantize, quantize_linear  # int8 / nf4 round trip, as load.py does
    return dequantize(quantize_linear(w, precision)).float()


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", text.upper())
    if m is None:
        raise MergeError(f"--max-shard-size {text!r}: expected e.g. 5GB, 500MB or a byte count")
    unit = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9}[m[2]]
    return int(float(m[1]) * unit)


def merge_to_hf(model_dir: str | Path, adapter: str | Path, out_dir: str | Path,
                precision: str | None = None, dtype: torch.dtype = torch.bfloat16,
                max_shard_bytes: int = 5 * 10**9, log=print) -> Path:
    """Write base + adapter as an HF folder at `out_dir`; see the module docstring."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    LlamaConfig.from_hf_config(model_dir)  # a model we support (raises ConfigError otherwise)
    check_out(out_dir, model_dir)
    files = {k: f for k, f in tensor_files(model_dir).items() if not SKIPPED_KEY.fullmatch(k)}  # (inv_freq)
    updates, adapter_cfg, scale = read_updates(adapter)
    handles = {f: safe_open(f, "pt") for f in sorted(set(files.values()))}
    shapes = {k: tuple(handles[f].get_slice(k).get_shape()) for k, f in files.items()}
    for key, (a, b) in updates.items():
        if key not in shapes:
            raise MergeError(f"adapter module {key[:-len('.weight')]} has no weight {key} in {model_dir}")
        if shapes[key] != (b.shape[0], a.shape[1]):
            raise MergeError(f"shape mismatch at {key}: base {shapes[key]}, adapter B@A "
                             f"{(b.shape[0], a.shape[1])} (an adapter for another model?)")

    # Plan the shards from the headers, so file names can say "-of-N" before anything is read.
    shards: list[list[str]] = [[]]
    size = total = 0
    for key in files:
        n = math.prod(shapes[key]) * dtype.itemsize
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += n
        total += n
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])

    weight_map = {}
    for name, keys in zip(names, shards):
        out = {}
        for key in keys:
            t = handles[files[key]].get_tensor(key)
            if key in updates:
                a, b = updates[key]
                w = base_weight(t, precision if QUANTIZED_KEY.fullmatch(key) else None)
                t = w + lora_delta(a.float(), b.float(), scale)  # (out, r) @ (r, in), in fp32
            out[key] = t.to(dtype).contiguous() if t.is_floating_point() else t
            weight_map[key] = name
        atomic_write(out_dir / name, lambda tmp, out=out: save_file(out, tmp, metadata={"format": "pt"}))
        log(f"wrote {out_dir / name} ({len(keys)} tensors)")
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        atomic_write_text(out_dir / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")

    copied = copy_side_files(model_dir, out_dir)
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    config.pop("quantization_config", None)
    for k in ("torch_dtype", "dtype"):
        if k in config or k == "torch_dtype":
            config[k] = HF_DTYPE_NAMES[dtype]
    # Last: a merge cut short leaves no config.json, so nothing takes that folder for a model.
    atomic_write_text(out_dir / "config.json", json.dumps(config, indent=2) + "\n")

    how = ("into the original checkpoint weights" if precision is None else
           f"into the {precision} weights (quantized then dequantized, as the {precision} model computes)"
           if precision in ("int8", "nf4") else f"into the checkpoint weights rounded to {precision}")
    log(f"merged {len(updates)} LoRA weights (r={adapter_cfg['r']}, scale={scale:g}) {how}; "
        f"update added in fp32, saved as {HF_DTYPE_NAMES[dtype]} (not re-quantized) in {len(shards)} "
        f"shard(s) at {out_dir}; copied {', '.join(copied) or 'no tokenizer files'}")
    return out_dir


def check_out(out_dir: Path, model_dir: Path) -> None:
    """--out must be a new or empty folder that can be made: every file in the result is then the
    merge's own (no shard, index or config.json of an earlier merge or of the user's beside it)."""
    if out_dir.resolve() == model_dir.resolve():
        raise MergeError(f"--out {out_dir} is the base model folder; pick another folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise MergeError(f"--out {out_dir}: exists and is not a folder")
    held = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    if held:
        raise MergeError(f"--out {out_dir} is not empty (it holds {', '.join(held[:3])}"
                         f"{', ...' if len(held) > 3 else ''}); pick a new or empty folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)  # fail now, not after reading the base
    except OSError as e:
        raise MergeError(f"--out {out_dir}: cannot create it ({e.strerror})") from None
    if not os.access(out_dir, os.W_OK):
        raise MergeError(f"--out {out_dir}: not writable")


def copy_side_files(model_dir: Path, out_dir: Path) -> list[str]:
    """Tokenizer, generation config, licence files and original/ (minus Meta's unmerged weights)."""
    copied = []
    for p in sorted(model_dir.iterdir()):
        if p.is_file() and (p.name in COPY_FILES or p.name.upper().startswith(("LICENSE", "USE_POLICY"))):
            shutil.copy2(p, out_dir / p.name)
            copied.append(p.name)
    orig = model_dir / "original"
    if orig.is_dir():  # original/consolidated.*.pth are the unmerged base weights: leave them out
        skip = shutil.ignore_patterns("*.pth", "*.pt", "*.bin", "*.safetensors")
        shutil.copytree(orig, out_dir / "original", ignore=skip, dirs_exist_ok=True)
        copied.append("original/")
    return copied


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python merge.py", description=__doc__.split("\n\n")[0])
    # ---- inputs ----
    ap.add_argument("--model", required=True, help="base model HF folder (config.json + *.safetensors)")
    ap.add_argument("--adapter", required=True, help="adapter folder or its adapter_model.safetensors")
    ap.add_argument("--precision", choices=PRECISIONS, default=None,
                    help="merge into the weights as a base loaded at this precision saw them "
                         "(default: the checkpoint's own float weights, the most accurate choice)")
    # ---- output ----
    ap.add_argument("--out", required=True, help="output folder, new or empty")
    ap.add_argument("--dtype", choices=("bf16", "fp32", "fp16"), default="bf16",
                    help="dtype of the written weights (default bf16)")
    ap.add_argument("--max-shard-size", default="5GB", help="largest shard file, e.g. 5GB, 500MB")
    args = ap.parse_args(argv)
    merge_to_hf(args.model, args.adapter, args.out, args.precision, FLOAT_DTYPES[args.dtype],
                parse_size(args.max_shard_size))
    return 0


if __name__ == "__main__":
    cli_entry(main)
