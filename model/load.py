"""Hugging Face Llama folder → our `Llama`, quantizing each block projection as it is read.

Reads config.json plus model.safetensors, or the shards named by model.safetensors.index.json.
The model is built on the meta device (no memory), then tensors are streamed one at a time
with `safetensors.safe_open`: the seven projections of every block become Int8Linear /
NF4Linear (or a float nn.Linear) the moment their weight arrives; embeddings, norms and the
head are stored in `dtype` (bf16 beside int8 / nf4 projections; a float precision's own dtype),
and the activations computed in `compute_dtype` (model/precision.py decides both). Host memory therefore holds the growing (quantized) model
plus about one tensor, never the whole checkpoint in 16-bit.

Every key is checked before any weight is read (safetensors headers are cheap): each expected
key exactly once, no unexpected key, every shape right. Pickle checkpoints are refused.
"""
from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from common.errors import UserError
from model.config import LlamaConfig
from model.llama import PROJECTIONS, Llama
from model.precision import FLOAT_DTYPES, PRECISIONS, float_linear, storage_dtype


class LoadError(UserError, ValueError):
    """A checkpoint folder we cannot (or must not) load."""


# Checkpoint keys known and deliberately not loaded (nor merged: lora/merge.py). Checkpoints
# written by transformers < 4.31 carry RoPE's inverse frequencies as a buffer: derived from
# rope_theta / rope_scaling (our model recomputes them every forward, in fp32), not learned, and
# sometimes saved in 16-bit.
SKIPPED_KEY = re.compile(r"model\.(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq")

# Weights (and adapters: lora/io.py) in these formats are refused: unpickling can run code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def hf_to_ours(key: str, cfg: LlamaConfig) -> str | None:
    """Our name for an HF checkpoint key, or None to skip it. Our module names are HF's, so the
    map is the identity; _check_keys refuses any key our model does not have."""
    if key == "lm_head.weight" and cfg.tie_word_embeddings:
        return None  # tied: the head IS embed_tokens; some exporters still write a copy
    return None if SKIPPED_KEY.fullmatch(key) else key


@contextlib.contextmanager
def _open(f: Path):
    """safe_open, with a cut or corrupt file (a partial download) as a LoadError naming it."""
    try:
        with safe_open(f, framework="pt", device="cpu") as sf:
            yield sf
    except (SafetensorError, OSError) as e:
        raise LoadError(f"{f}: unreadable safetensors file ({e}); a partial download?") from None


def _refuse_pickle(f: Path):
    raise LoadError(f"refusing to load {f}: pickle checkpoints can run code; convert to safetensors")


def weight_files(path: Path) -> tuple[list[Path], dict[str, str], Path | None]:
    """A model folder's weight shards: (safetensors files, key → file name per the index (empty
    without one), index path)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise LoadError(f"{index}: not a safetensors index with a weight_map ({e!r})") from None
        files = [path / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise LoadError(f"{index} names {f.name}, which is not in {path}")
        return files, weight_map, index
    single = path / "model.safetensors"
    if single.is_file():
        return [single], {}, None
    found = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if found:
        _refuse_pickle(found[0])
    raise LoadError(f"{path}: no model.safetensors or model.safetensors.index.json")


def load_model(path: str | Path, precision: str = "int8", device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None, compute_dtype: torch.dtype | None = None) -> Llama:
    """Load an HF Llama folder, frozen (requires_grad False) and in eval mode.

    Args:
        path: folder with config.json and model.safetensors (or shards + index).
        precision: storage of the seven block projections: int8 | nf4 | bf16 | fp16 | fp32.
        device: where the model lives; quantization runs there, one tensor at a time.
        dtype: int8 / nf4 only: the dtype embeddings, norms and lm_head are stored in (default
            bf16; float precisions use their own dtype throughout).
        compute_dtype: the activations' dtype, when it differs from `dtype` (e.g. bf16 storage,
            fp32 activations; model/precision.py: compute_dtype gives the CLIs' choice).
    """
    if precision not in PRECISIONS:
        raise LoadError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    path, device = Path(path), torch.device(device)
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            _refuse_pickle(path)
        raise LoadError(f"{path}: pass the checkpoint folder (config.json + *.safetensors), not a file")
    if not path.is_dir():
        raise LoadError(f"{path}: no such folder")
    if precision in FLOAT_DTYPES and dtype not in (None, FLOAT_DTYPES[precision]):
        raise LoadError(f"dtype {dtype} conflicts with precision {precision!r}: a float precision "
                        f"computes in its own dtype (dtype applies to int8 / nf4)")
    dtype = dtype or storage_dtype(precision)
    cfg = LlamaConfig.from_hf_config(path)
    files, weight_map, index = weight_files(path)

    with torch.device("meta"):
        model = Llama(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    plan = _check_keys(files, weight_map, index, expected, cfg)

    projs = [f"model.layers.{i}.{p}" for i in range(cfg.num_hidden_layers) for p in PROJECTIONS]
    proj_weights = {p + ".weight" for p in projs}
    for f in files:
        with _open(f) as sf:
            for key in sf.keys():
                ours = plan.get((f, key))
                if ours is None:
                    continue  # skipped key (inv_freq, tied head copy)
                t = sf.get_tensor(key)  # (on CPU it may alias the file's mmap)
                mod_name, attr = ours.rsplit(".", 1)
                if ours in proj_weights:
                    parent_name, child = mod_name.rsplit(".", 1)
                    parent, old = model.get_submodule(parent_name), model.get_submodule(mod_name)
                    # copy=True for float precisions: a weight aliasing the mmap would keep the
                    # whole file mapped (and counted in RSS) for good. int8 / nf4 make new tensors.
                    if precision in FLOAT_DTYPES:
                        new = float_linear(t.to(device, dtype, copy=True), dtype)
                    else:
                        from model.quant import quantize_linear  # bitsandbytes: int8 / nf4 only
                        new = quantize_linear(t.to(device), precision)
                    if old.bias is not None:
                        new.bias = old.bias  # meta until (or already) loaded: keys are sorted, bias first
                    setattr(parent, child, new)
                else:  # embeddings, norms, lm_head, projection biases: the storage dtype
                    setattr(model.get_submodule(mod_name), attr,
                            nn.Parameter(t.to(device, dtype, copy=True), requires_grad=False))
                del t

    left = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if left:  # cannot happen after _check_keys; guards against a model change slipping through
        raise LoadError(f"{path}: {left[0]} was never loaded (still on the meta device)")
    model.requires_grad_(False)
    model.compute_dtype = None if compute_dtype in (None, dtype) else compute_dtype
    return model.eval()


def _check_keys(files: list[Path], weight_map: dict[str, str], index: Path | None,
                expected: dict[str, tuple], cfg: LlamaConfig) -> dict[tuple[Path, str], str | None]:
    """Read every header; raise on unexpected / duplicate / missing keys and wrong shapes.

    Returns (file, checkpoint key) → our key (None: skip).
    """
    plan: dict[tuple[Path, str], str | None] = {}
    seen: dict[str, Path] = {}
    for f in files:
        with _open(f) as sf:
            for key in sf.keys():
                ours = hf_to_ours(key, cfg)
                if ours is not None and ours not in expected:
                    raise LoadError(f"{f}: unexpected key {key}")
                plan[(f, key)] = ours
                if ours is None:
                    continue
                if ours in seen:
                    raise LoadError(f"key {key} appears twice: in {seen[ours]} and {f}")
                seen[ours] = f
                shape = tuple(sf.get_slice(key).get_shape())
                if shape != expected[ours]:
                    raise LoadError(f"{f}: {key} has shape {shape}, expected {expected[ours]}")
    for key in expected:
        if key not in seen:
            where = (f"{index.parent / weight_map[key]} (per {index.name})" if key in weight_map
                     else f"{index} (not listed in its weight_map)" if index else str(files[0]))
            raise LoadError(f"missing key {key}: expected in {where}")
    return plan
