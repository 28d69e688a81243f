"""LlamaConfig: the one description of a model's shape, read from a Hugging Face config.json.

Covers Llama 2 / 3 / 3.1 / 3.2 (incl. the "llama3" RoPE frequency scaling), SmolLM2 and
TinyLlama-style folders. Field names follow HF's so config.json maps across by name.
"""
from __future__ import annotations

import json
import math
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
        self.check_types()
        if not self.head_dim:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.head_dim < 1 or self.head_dim % 2:  # RoPE rotates pairs of dimensions
            raise ConfigError(f"head_dim {self.head_dim} (hidden_size {self.hidden_size} / num_attention_heads "
                              f"{self.num_attention_heads}) must be a positive even number")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            raise ConfigError(f"rope_scaling must be an object such as {{\"rope_type\": \"llama3\", \"factor\": 8.0, "
                              f"...}} or null, got {self.rope_scaling!r}")
        rope_type = (self.rope_scaling or {}).get("rope_type", (self.rope_scaling or {}).get("type"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(f"unsupported rope_scaling type {rope_type!r} "
                              f"(supported: default, llama3)")
        if rope_type == "llama3":
            self.check_llama3_scaling()

    def check_types(self) -> None:
        """Every field the model reads has the type and range it needs (a config.json with
        `"hidden_size": "256"` or `"num_key_value_heads": 0` is refused here, by key)."""
        def fail(key, want):
            raise ConfigError(f"{key} must be {want}, got {getattr(self, key)!r}")
        is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
        is_number = lambda v: (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "max_position_embeddings"):
            if not (is_int(getattr(self, key)) and getattr(self, key) > 0):
                fail(key, "a positive integer")
        if not (is_int(self.head_dim) and self.head_dim >= 0):
            fail("head_dim", "a positive integer (or 0 / absent: hidden_size / num_attention_heads)")
        for key in ("rms_norm_eps", "rope_theta"):
            if not (is_number(getattr(self, key)) and getattr(self, key) > 0):
                fail(key, "a positive number")
        for key in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
            if not isinstance(getattr(self, key), bool):
                fail(key, "true or false")
        for key in ("bos_token_id", "pad_token_id"):
            if getattr(self, key) is not None and not is_int(getattr(self, key)):
                fail(key, "an integer or null")
        eos = self.eos_token_id if isinstance(self.eos_token_id, list) else [self.eos_token_id]
        if not all(i is None or is_int(i) for i in eos):
            fail("eos_token_id", "an integer, a list of integers or null")

    def check_llama3_scaling(self) -> None:
        """The four numbers Llama 3.1's frequency scaling reads (model/llama.py: rope_inv_freq)."""
        rs = self.rope_scaling
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        missing = [k for k in keys if k not in rs]
        if missing:
            raise ConfigError(f"rope_scaling of type 'llama3' needs {', '.join(keys)}; missing {', '.join(missing)}")
        for k in keys:
            v = rs[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
                raise ConfigError(f"rope_scaling {k} must be a positive number, got {v!r}")
        if not rs["high_freq_factor"] > rs["low_freq_factor"]:  # the band between them is interpolated
            raise ConfigError(f"rope_scaling high_freq_factor ({rs['high_freq_factor']}) must be greater than "
                              f"low_freq_factor ({rs['low_freq_factor']})")

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
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: not a JSON object")
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"{source}: model_type {model_type!r} is not supported "
                              f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        names = {f for f in cls.__dataclass_fields__ if f != "extra"}
        raw = dict(raw)
        rp = raw.pop("rope_parameters", None)
        if rp is not None and not isinstance(rp, dict):
            raise ConfigError(f"{source}: rope_parameters must be an object, got {rp!r}")
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
