"""What train.py, predict.py and the benchmarks all start from: the device, the tokenizer
(checked against the model), the base model at a precision, and how an adapter was trained."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from common.errors import UserError
from lora.io import read_record
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
    a row in the embedding (else the first such token would be an IndexError mid-run), and its
    BOS / EOS must be config.json's."""
    tok = Tokenizer.from_dir(model_dir)
    cfg = LlamaConfig.from_hf_config(model_dir)
    if tok.vocab_size > cfg.vocab_size:
        raise UserError(f"{Path(model_dir) / 'config.json'}: vocab_size {cfg.vocab_size} is smaller than the "
                        f"tokenizer's {tok.vocab_size} ({tok.path}): a tokenizer from another model?")
    check_special_ids(tok, cfg, Path(model_dir))
    tok.label_ids()  # " True" / " False" must be single tokens: fail here, not at the first batch
    return tok


def check_special_ids(tok: Tokenizer, cfg: LlamaConfig, model_dir: Path) -> None:
    """config.json's bos_token_id and eos_token_id(s) are tokens of `tok`, and the ones it uses
    (its EOS may be any of config.json's or generation_config.json's): weights beside another
    model's tokenizer files (Llama-3.1 with SmolLM2's) would otherwise train on the wrong ids."""
    config = model_dir / "config.json"
    as_list = lambda v: [i for i in (v if isinstance(v, list) else [v]) if i is not None]
    bos, eos = as_list(cfg.bos_token_id), as_list(cfg.eos_token_id)
    for key, ids in (("bos_token_id", bos), ("eos_token_id", eos)):
        outside = [i for i in ids if not 0 <= i < tok.vocab_size]
        if outside:
            raise UserError(f"{config}: {key} {outside[0]} is outside the vocabulary of {tok.path} "
                            f"({tok.vocab_size} tokens): a tokenizer from another model?")
    if bos and tok.bos_id is not None and tok.bos_id != bos[0]:
        raise UserError(f"{config}: bos_token_id {bos[0]}, but {tok.path} (with its tokenizer_config.json) "
                        f"has BOS {tok.bos_id}: a tokenizer from another model?")
    generation = model_dir / "generation_config.json"
    also = as_list(json.loads(generation.read_text()).get("eos_token_id")) if generation.is_file() else []
    if eos and tok.eos_id not in eos + also:
        raise UserError(f"{config}: eos_token_id {eos if len(eos) > 1 else eos[0]}, but {tok.path} (with its "
                        f"tokenizer_config.json) has EOS {tok.eos_id}: a tokenizer from another model?")


def build_model(model_dir, precision: str, device: torch.device, activations: str = "auto"):
    """The base at `precision` on `device`, frozen, in eval mode; `activations` is --activations
    (model/precision.py decides the storage and activation dtypes)."""
    model = load_model(model_dir, precision=precision, device=device, dtype=storage_dtype(precision),
                       compute_dtype=compute_dtype(precision, device, activations))
    return model.to(device).eval()


def check_model_dir(model_dir: Path, flag: str = "--model") -> Path:
    """A model folder whose config.json describes a model we can build, or one line saying why
    not (before anything is loaded or written)."""
    if not (Path(model_dir) / "config.json").is_file():
        raise UserError(f"{flag} {model_dir}: not a model folder (no config.json)")
    LlamaConfig.from_hf_config(model_dir)  # (a ConfigError names the file and the key)
    return Path(model_dir)


def check_precision(precision: str, device: torch.device) -> None:
    """fp16 compute needs CUDA (the CPU has no fp16 GEMMs worth the name)."""
    if precision == "fp16" and device.type == "cpu":
        raise UserError("precision fp16 needs CUDA: on a CPU use int8, nf4, bf16 or fp32")


def adapter_record(adapter: str | Path) -> dict:
    """How the adapter was trained (engine/setup.py: training_record): model_dir, prompt (text),
    prompt_file, max_seq_len, precision, threshold, ...

    From the adapter file's own header (lora/io.py: read_record), so a lone copy of the file is
    enough; for an older adapter, the args.json train.py saved beside it (or one folder above).
    {} for an adapter made elsewhere (PEFT)."""
    record = read_record(adapter)
    if record:
        return record
    p = Path(adapter)
    folder = p if p.is_dir() else p.parent
    for cand in (folder / "args.json", folder.parent / "args.json"):
        if cand.is_file():
            return json.loads(cand.read_text())
    return {}
