"""A Llama-3 decoder written out in full: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Module and parameter names are Hugging Face's (`model.layers.0.self_attn.q_proj.weight`, ...)
so a checkpoint's keys map across unchanged and LoRA adapter keys line up with PEFT's.

RoPE layout: HF's "rotate-half" (the first and second halves of each head are the pairs).
HF checkpoints are stored for that layout, so no Q/K permutation is needed here; a checkpoint
in Meta's or llama.cpp's interleaved layout must be permuted by its converter (model/default.py).

Positions come from the attention mask, so a left- or right-padded row gets the same outputs
as the unpadded row. Rows that start with the same tokens -- the prompt's instruction, a question
with several solutions -- compute that prefix once: `hidden(..., prefix_of=)` reads a prefix
row's keys and values, a key/value cache within the batch (data/prefixes.py decides who shares
what). Nothing is a buffer: the model can be built on `meta` and loaded with
`load_state_dict(assign=True)` (model/load.py).
"""
from __future__ import annotations

import math

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


def with_prefix(t: torch.Tensor, prefix_rows: torch.Tensor, slots: int) -> torch.Tensor:
    """Keys (or values) (R, n_kv, T, hd) -> (R, n_kv, slots + T, hd): the first `slots` of each
    row's prefix row's, then its own. The prefix row is read, not copied off the graph: backward
    sums every reader's gradient into it."""
    return torch.cat([t[prefix_rows][:, :, :slots], t], dim=2)


def on_tokens(layer: nn.Module, x: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    """layer(x) for x (R, T, in), computed on the real tokens only (real: (R, T) bool), zeros at
    padding: in a batch of prefixes and the rests after them, rows differ in length, and padding
    would cost as much as tokens."""
    return layer(x) if real is None else padded_back(layer(x[real]), real)


def padded_back(y: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """(N, C) values of the real tokens -> (R, T, C), zeros at padding."""
    out = y.new_zeros(*real.shape, y.shape[-1])
    out[real] = y
    return out


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(d, self.n_heads * self.hd, bias=bias)
        self.k_proj = nn.Linear(d, self.n_kv * self.hd, bias=bias)
        self.v_proj = nn.Linear(d, self.n_kv * self.hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.hd, d, bias=bias)

    def forward(self, x, cos, sin, mask, prefix=None):
        """x (R, T, D) -> (R, T, D). prefix = (prefix_rows (R,), slots, real (R, T)): a key/value
        cache within the batch -- row r continues row prefix_rows[r], so it attends to that row's
        keys and values (after RoPE, this layer's) before its own; `mask` covers both parts."""
        R, T, _ = x.shape
        real = None if prefix is None else prefix[2]
        xr = x if real is None else x[real]  # (N, D): the real tokens, when rows differ in length
        q, k, v = (p(xr) if real is None else padded_back(p(xr), real) for p in (self.q_proj, self.k_proj, self.v_proj))
        q = q.view(R, T, self.n_heads, self.hd).transpose(1, 2)  # (R, H, T, hd)
        k = k.view(R, T, self.n_kv, self.hd).transpose(1, 2)  # (R, n_kv, T, hd)
        v = v.view(R, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, k, cos, sin)
        if prefix is not None:  # keys [prefix | own]: the prefix computed once, read by every row it starts
            rows, slots, _ = prefix
            k, v = with_prefix(k, rows, slots), with_prefix(v, rows, slots)  # (R, n_kv, slots + T, hd)
        # GQA: each group of n_heads / n_kv query heads reads one K/V head (no repeat copy).
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return on_tokens(self.o_proj, y.transpose(1, 2).reshape(R, T, self.n_heads * self.hd), real)


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

    def forward(self, x, cos, sin, mask, prefix=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, prefix)
        return x + on_tokens(self.mlp, self.post_attention_layernorm(x), None if prefix is None else prefix[2])


def positions_and_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                       past: torch.Tensor | None = None, past_slots: int = 0):
    """(positions (B, T), attention mask (B, 1, T, past_slots + T) bool, or None for plain causal).

    Positions come from the attention mask (True on real tokens), so right padding changes nothing.
    With prefixes, `past` (B,) counts each row's real prefix tokens among the `past_slots` keys put
    before its own (its prefix row's, padded; 0 for a row that continues nothing): the row's
    positions continue from there, and query t sees those prefix keys and its own real tokens up
    to t -- never a prefix's padding. (SDPA's is_causal aligns its triangle top-left when query and
    key lengths differ, so prefixes always get an explicit mask.)
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
               prefix_of: torch.Tensor | None = None) -> torch.Tensor:
        """Final-normed hidden states (R, T, D) of right-padded rows (`attention_mask` True on real tokens).

        prefix_of (R,): rows that start with the same tokens compute them once. Row r with
        prefix_of[r] = p >= 0 holds only the tokens that follow row p's: it sits at the positions
        after them and attends to them, so its hidden states are those of the whole row [row p |
        row r]; -1: a row that continues nothing. (A prefix row is a row of the same batch, so its
        keys and values -- the cache -- are computed in the same pass, through the same GEMMs, and
        every row reading them sends its gradient back into them.)
        """
        x = self.model.embed_tokens(input_ids)  # (R, T, D)
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        past = prefix = None
        if prefix_of is not None:
            R, T = input_ids.shape
            real = torch.ones(R, T, dtype=torch.bool, device=input_ids.device) if attention_mask is None \
                else attention_mask.bool()
            rows = torch.where(prefix_of >= 0, prefix_of, torch.arange(R, device=input_ids.device))
            past = torch.where(prefix_of >= 0, real.sum(-1)[rows], 0)  # (R,) prefix tokens before each row's first
            prefix = (rows, int(past.max()), real)
        positions, mask = positions_and_mask(input_ids, attention_mask, past, 0 if prefix is None else prefix[1])
        cos, sin = rope_cos_sin(self.cfg, positions, x.dtype)
        for block in self.model.layers:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = recompute_in_backward(block, x, cos, sin, mask, prefix, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, prefix)
        return self.model.norm(x)

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
