"""LlamaConfig: the one description of a model's shape, read from a Hugging Face config.json.

Covers Llama 2 / 3 / 3.1 / 3.2 (incl. the "llama3" RoPE frequency scaling), SmolLM2 and
TinyLlama-style folders. Field names follow HF's so config.json maps across by name.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common.errors import UserError


class ConfigError(UserError, ValueError):
    """A config.json we cannot (or must not) turn into a model."""


SUPPORTED_MODEL_TYPES = ("llama",)
SUPPORTED_ROPE_TYPES = ("default", "llama3", None)


@dataclass
class LlamaConfig:
    vocab_size: int = 128256
    hidden_size: int = 4096  # d_model
    intermediate_size: int = 14336  # SwiGLU inner width
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8  # < num_attention_heads means grouped-query attention
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor", "low_freq_factor", ...}
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False  # lm_head shares the embedding matrix (Llama 3.2, SmolLM2)
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = 128000
    eos_token_id: int | list[int] | None = 128001
    pad_token_id: int | None = None
    torch_dtype: str = "bfloat16"  # dtype the checkpoint was saved in
    extra: dict = field(default_factory=dict, repr=False)  # unread config.json keys, kept for export

    def __post_init__(self):
        if not self.head_dim:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}")
        rope_type = (self.rope_scaling or {}).get("rope_type", (self.rope_scaling or {}).get("type"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(f"unsupported rope_scaling type {rope_type!r} "
                              f"(supported: default, llama3)")

    @property
    def rope_type(self) -> str:
        rs = self.rope_scaling or {}
        return rs.get("rope_type", rs.get("type")) or "default"

    @classmethod
    def from_hf_config(cls, path: str | Path) -> "LlamaConfig":
        """Read `config.json` (or a folder holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: no config.json")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> "LlamaConfig":
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"{source}: model_type {model_type!r} is not supported "
                              f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        names = {f for f in cls.__dataclass_fields__ if f != "extra"}
        raw = dict(raw)
        rp = raw.pop("rope_parameters", None)
        if rp:  # transformers >= 5 writes {"rope_theta", "rope_type", "factor", ...} under one key
            rp = dict(rp)
            raw.setdefault("rope_theta", rp.pop("rope_theta", 10000.0))
            if rp.get("rope_type", "default") != "default":
                raw["rope_scaling"] = rp
        kw = {k: v for k, v in raw.items() if k in names}
        if "dtype" in raw and "torch_dtype" not in raw:  # transformers >= 4.56 writes "dtype"
            kw["torch_dtype"] = raw["dtype"]
        if kw.get("head_dim") is None:
            kw.pop("head_dim", None)
        kw["extra"] = {k: v for k, v in raw.items() if k not in names}
        missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                               "intermediate_size", "vocab_size") if k not in raw]
        if missing:
            raise ConfigError(f"{source}: missing {', '.join(missing)}")
        kw.setdefault("num_key_value_heads", raw["num_attention_heads"])
        try:
            return cls(**kw)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_hf_dict(self) -> dict:
        """The config.json a transformers LlamaForCausalLM reads back to the same model."""
        d = {k: v for k, v in asdict(self).items() if k != "extra"}
        out = dict(self.extra)
        out.update(d)
        out.update(model_type="llama", architectures=["LlamaForCausalLM"])
        return out

    @classmethod
    def tiny(cls, **kw) -> "LlamaConfig":
        """A few-thousand-parameter Llama for tests: GQA, llama3 RoPE scaling, untied head."""
        base = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                    max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                    torch_dtype="float32")
        base.update(kw)
        return cls(**base)
