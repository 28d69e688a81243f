"""A base model at a precision on a device, plus an adapter: what train.py, predict.py and the
benchmarks all start from."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from engine.cli import UserError
from lora.inject import lora_modules
from lora.io import load_adapter, read_run
from model.config import LlamaConfig
from model.load import load_model
from model.precision import compute_dtype, storage_dtype
from model.tokenizer import Tokenizer


def resolve_device(name: str) -> torch.device:
    """"auto" (CUDA when there is one, else the CPU), "cpu", "cuda" or "cuda:N"."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    try:
        device = torch.device(name)
        if device.type not in ("cpu", "cuda"):
            raise RuntimeError
    except RuntimeError:
        raise UserError(f"--device {name}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # Triton launches on the current device
    return device


def load_tokenizer(model_dir: Path) -> Tokenizer:
    """The model folder's tokenizer, checked against the model: every id it can produce must have
    a row in the embedding (else the first such token would be an IndexError mid-run)."""
    tok = Tokenizer.from_dir(model_dir)
    n = LlamaConfig.from_hf_config(model_dir).vocab_size
    if tok.vocab_size > n:
        raise UserError(f"{Path(model_dir) / 'config.json'}: vocab_size {n} is smaller than the tokenizer's "
                        f"{tok.vocab_size} ({tok.path}): a tokenizer from another model?")
    tok.label_ids()  # " True" / " False" must be single tokens: fail here, not at the first batch
    return tok


def build_model(model_dir, precision: str, device: torch.device, adapter=None, merge: bool = False):
    """The base at `precision` on `device`, plus the adapter if given, in eval mode.

    merge: fold the adapter into the weights (W + s·B@A) so scoring runs the plain base (fp32
    bases only: there the sum is exact to float rounding; a bf16 weight would round most of a
    small update away, and an int8 or nf4 weight cannot take it without re-quantizing).
    """
    model = load_model(model_dir, precision=precision, device=device, dtype=storage_dtype(precision),
                       compute_dtype=compute_dtype(precision, device))
    if adapter:
        load_adapter(model, adapter)
    if merge and adapter:
        if precision != "fp32":
            raise ValueError(f"build_model: merge needs an fp32 base, not {precision}")
        merge_adapters(model)
    return model.to(device).eval()


def merge_adapters(model) -> None:
    """Fold every LoRA layer's update into its float base weight (W + s·B@A)."""
    for m in lora_modules(model).values():
        m.merge()


def adapter_run_args(adapter: str | Path) -> dict:
    """How the adapter was trained: model_dir, prompt (text), prompt_file, max_seq_len, precision.

    From the adapter file's own header (lora/io.py: read_run), so a lone copy of the file is
    enough; for an older adapter, the args.json train.py saved beside it (or one folder above).
    {} for an adapter made elsewhere (PEFT)."""
    run = read_run(adapter)
    if run:
        return run
    p = Path(adapter)
    folder = p if p.is_dir() else p.parent
    for cand in (folder / "args.json", folder.parent / "args.json"):
        if cand.is_file():
            return json.loads(cand.read_text())
    return {}
