"""A Llama-3 decoder written out in full: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Module and parameter names are Hugging Face's (`model.layers.0.self_attn.q_proj.weight`, ...)
so a checkpoint's keys map across unchanged and LoRA adapter keys line up with PEFT's.

RoPE layout: HF's "rotate-half" (the first and second halves of each head are the pairs).
HF checkpoints are stored for that layout, so no Q/K permutation is needed here; a checkpoint
in Meta's or llama.cpp's interleaved layout must be permuted by its converter (model/default.py).

Positions come from the attention mask, so a left- or right-padded row gets the same outputs
as the unpadded row. A key/value cache (`prefill`, then `hidden(..., cache=)`) lets rows that
start with the same tokens -- the prompt's instruction, a question with several solutions --
compute that prefix once (data/prefixes.py decides which rows share what). Nothing is a buffer: the model can be built on `meta` and loaded with
`load_state_dict(assign=True)` (model/load.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as recompute_in_backward  # "gradient checkpointing"

import kernels
from model.config import LlamaConfig


# The seven projections of a block, by their path inside it. Their names are HF's, so these are
# also the LoRA targets (PEFT's target_modules) and the layers model/load.py quantizes.
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


# ---------------------------------------------------------------------------------- the math
# Each function below is the PyTorch definition; @kernels.accelerated runs its fused Triton twin
# instead on CUDA tensors (kernels/triton_ops.py; KERNELS=torch keeps these everywhere).

@kernels.accelerated("rms_norm_triton")
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x²) + eps) · weight over the last dim, normalised in fp32 and cast back to x's
    dtype before the weight: the same rounding as HF's LlamaRMSNorm."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


@kernels.accelerated("rope_triton")
def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE, x·cos + rotate_half(x)·sin, on q (B, Hq, T, hd) and k (B, Hk, T, hd);
    cos/sin (B, T, hd) or (T, hd)."""
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hd): broadcast over heads
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


@kernels.accelerated("swiglu_triton")
def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up, elementwise: the gated MLP activation."""
    return F.silu(gate) * up


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rope_inv_freq(cfg: LlamaConfig, device=None) -> torch.Tensor:
    """Per-pair rotation frequencies (hd/2,), with Llama 3.1's "llama3" long-context scaling."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, device=device).float() / hd))
    if cfg.rope_type == "llama3":
        # Low frequencies (long wavelengths) are slowed by `factor`, high ones kept, and the band
        # between is interpolated smoothly (Meta's apply_scaling in llama3/model.py).
        rs = cfg.rope_scaling
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old_ctx = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / lo, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(cfg: LlamaConfig, positions: torch.Tensor, dtype: torch.dtype):
    """cos, sin of shape (B, T, hd) for integer positions (B, T), computed in fp32."""
    inv_freq = rope_inv_freq(cfg, positions.device)
    freqs = positions.float()[..., None] * inv_freq  # (B, T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # rotate-half layout: both halves share a frequency
    return emb.cos().to(dtype), emb.sin().to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(d, self.n_heads * self.hd, bias=bias)
        self.k_proj = nn.Linear(d, self.n_kv * self.hd, bias=bias)
        self.v_proj = nn.Linear(d, self.n_kv * self.hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.hd, d, bias=bias)

    def forward(self, x, cos, sin, mask, past_k=None, past_v=None):
        """(output, this call's keys, values). past_k / past_v (B, n_kv, P, hd): a cached prefix
        of each row (KVCache), attended to before the row's own tokens; `mask` then covers both."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.hd).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, n_kv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, k, cos, sin)
        new_k, new_v = k, v  # what a prefix pass keeps as its cache (after RoPE)
        if past_k is not None:  # the prefix's keys and values come first: keys [prefix | own]
            k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)  # (B, n_kv, P + T, hd)
        # GQA: each group of n_heads / n_kv query heads reads one K/V head (no repeat copy).
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd)), new_k, new_v


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        d, f, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(d, f, bias=bias)
        self.up_proj = nn.Linear(d, f, bias=bias)
        self.down_proj = nn.Linear(f, d, bias=bias)

    def forward(self, x):
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, past_k=None, past_v=None):
        """(output, this block's keys, values): see Attention.forward."""
        a, k, v = self.self_attn(self.input_layernorm(x), cos, sin, mask, past_k, past_v)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), k, v


@dataclass
class KVCache:
    """Prefixes computed once (Llama.prefill): each layer's keys and values after RoPE, (G, n_kv,
    P, hd) each, and the number of real tokens of each prefix (G,); the rest of P is padding."""
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    lengths: torch.Tensor


def positions_and_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                       past: torch.Tensor | None = None, past_slots: int = 0):
    """(positions (B, T), attention mask (B, 1, T, past_slots + T) bool, or None for plain causal).

    Positions come from the attention mask (True on real tokens), so right padding changes nothing.
    With a prefix, `past` (B,) counts each row's real prefix tokens among the `past_slots` cached
    ones: the row's positions continue from there, and query t sees those prefix keys and its own
    real tokens up to t -- never another prefix's padding. (SDPA's is_causal would align its
    triangle top-left when query and key lengths differ, so a prefix always gets an explicit mask.)
    """
    (B, T), device = input_ids.shape, input_ids.device
    if past is None and (attention_mask is None or bool(attention_mask.all())):
        return torch.arange(T, device=device).expand(B, T), None  # plain causal: SDPA's fastest kernel
    real = torch.ones(B, T, dtype=torch.bool, device=device) if attention_mask is None else attention_mask.bool()
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
    own = torch.ones(T, T, dtype=torch.bool, device=device).tril() & real[:, None, None, :]  # (B, 1, T, T)
    # A padding query with no visible key would softmax over nothing (NaN); let it see itself.
    # Real tokens never attend to padding either way.
    own = own | torch.eye(T, dtype=torch.bool, device=device)
    if past is None:
        return positions, own
    seen = torch.arange(past_slots, device=device)[None, :] < past[:, None]  # (B, P): the row's own prefix
    prefix = seen[:, None, None, :].expand(B, 1, T, past_slots)
    return positions + past[:, None], torch.cat([prefix, own], dim=-1)  # (B, 1, T, P + T)


class Llama(nn.Module):
    """embed → blocks → norm → lm_head. `model.*` holds the body so keys match HF's."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.model.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # Tied models (Llama 3.2, SmolLM2) reuse the embedding matrix as the output head.
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.grad_checkpointing = False  # recompute each block's activations in backward (train.py sets it)
        # Activations' dtype when it differs from the stored embeddings and head (model/load.py,
        # by model/precision.py's rule). None: the stored dtype.
        self.compute_dtype: torch.dtype | None = None

    @property
    def activation_dtype(self) -> torch.dtype:
        """The dtype the blocks compute in."""
        return self.compute_dtype or self.model.embed_tokens.weight.dtype

    @property
    def output_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               cache: KVCache | None = None, cache_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Final-normed hidden states (B, T, D). With `cache` (from `prefill`), each row b continues
        the cached prefix number cache_rows[b]: its tokens sit at the positions after that prefix
        and attend to it, so the result is that of the whole row [prefix | input_ids]."""
        x = self._embed(input_ids)  # (B, T, D)
        past = None if cache is None else cache.lengths[cache_rows]  # (B,) prefix tokens before each row
        positions, mask = positions_and_mask(input_ids, attention_mask, past,
                                             0 if cache is None else cache.keys[0].shape[2])
        cos, sin = rope_cos_sin(self.cfg, positions, x.dtype)
        for i, block in enumerate(self.model.layers):
            past_kv = () if cache is None else (cache.keys[i][cache_rows], cache.values[i][cache_rows])
            x, _, _ = self._block(block, x, cos, sin, mask, *past_kv)
        return self.model.norm(x)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> KVCache:
        """The key/value cache of a batch of prefixes (G, P): a forward pass over them that keeps
        each layer's keys and values (after RoPE) for `hidden(..., cache=)`. Differentiable: in
        training the gradient of every row that reads a prefix flows back into it, summed."""
        x = self._embed(input_ids)
        positions, mask = positions_and_mask(input_ids, attention_mask)
        cos, sin = rope_cos_sin(self.cfg, positions, x.dtype)
        keys, values = [], []
        for block in self.model.layers:
            x, k, v = self._block(block, x, cos, sin, mask)
            keys.append(k)
            values.append(v)
        G, P = input_ids.shape
        lengths = torch.full((G,), P, device=input_ids.device) if attention_mask is None else attention_mask.sum(-1)
        return KVCache(keys, values, lengths)

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)  # (B, T, D)
        return x if self.compute_dtype is None else x.to(self.compute_dtype)

    def _block(self, block: Block, *args):
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return recompute_in_backward(block, *args, use_reentrant=False)
        return block(*args)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        w = self.head_weight()
        return F.linear(h.to(w.dtype), w)

    def head_weight(self) -> torch.Tensor:
        """The output head (V, D) in the compute dtype (a bf16-stored head is upcast on CPU)."""
        w = self.output_weight
        return w if self.compute_dtype is None else w.to(self.compute_dtype)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V); with `logits_at` (B,) only at that position of each row: (B, V).

        The vocabulary head is the largest matmul per token (128k × 4096 on Llama 3), so when a
        loss needs one position per row (the label token) the other positions are skipped.
        """
        h = self.hidden(input_ids, attention_mask)
        if logits_at is not None:
            h = h[torch.arange(h.shape[0], device=h.device), logits_at]  # (B, D)
        return self.logits(h)
