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
from typing import NamedTuple

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


# What attention costs beside a token's projections (one unit: a token through a block's seven
# projections), measured on the default model on this project's CPU in bf16 (SDPA's flash kernel,
# which computes every (query, key) pair it is given, masked or not): a pair 1/PAIRS_PER_TOKEN,
# each padded query QUERY_COST more, each SDPA call (with its scatter and gather) CALL_COST.
# data/prefixes.py decides with these whether sharing pays, pack() how to cut the rests.
PAIRS_PER_TOKEN = 1400
QUERY_COST = 0.05
CALL_COST = 8


def attention_cost(rows: int, queries: int, keys: int) -> float:
    """One SDPA call over `rows` rows of `queries` padded queries, each against `keys` keys."""
    return rows * queries * (QUERY_COST + keys / PAIRS_PER_TOKEN) + CALL_COST


def like_lengths(lengths: list[int], past: list[int]) -> list[list[int]]:
    """Rows (indices into `lengths`) cut into buckets of like length, the cut that costs least
    (attention_cost; a row of length lengths[i] reads past[i] prefix keys before its own): every
    row of a bucket is padded to the bucket's longest, so one long row no longer pads them all.
    Exact, by dynamic programming over the rows sorted by length."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    best, cut = [0.0], [0]  # best[j]: the cheapest cut of order[:j]; cut[j]: where its last bucket starts
    for j in range(1, len(order) + 1):
        P, options = 0, []
        for i in range(j - 1, -1, -1):  # last bucket order[i:j], padded to lengths[order[j - 1]]
            P = max(P, past[order[i]])
            T = lengths[order[j - 1]]
            options.append((best[i] + attention_cost(j - i, T, P + T), i))
        cost, i = min(options)
        best.append(cost)
        cut.append(i)
    buckets, j = [], len(order)
    while j:
        buckets.append(order[cut[j]:j])
        j = cut[j]
    return buckets[::-1]


class Part(NamedTuple):
    """Rows padded together for one SDPA call."""
    real: torch.Tensor                # (rows, T) bool: their real tokens (right-padded)
    where: torch.Tensor               # (n,) the real tokens' places r * T + t among these rows, in packed order
    rope: tuple                       # cos, sin (rows, T, hd) at their positions
    prefix_row: torch.Tensor | None   # (rows,) which first row each continues; None: the first rows
    slots: int                        # P: the longest prefix these rows read
    mask: torch.Tensor | None         # (rows, 1, T, P + T) bool: what their queries see, [prefix | own]


class Packed(NamedTuple):
    """A batch with shared prefixes, laid out so that nothing is computed twice or on padding.

    The rows are of two kinds: *first* rows attend to themselves only (each prefix, and any row
    that continues nothing), *rests* continue a first row: they sit at the positions after it and
    attend to its keys and values -- a key/value cache computed in the same pass. Between the
    blocks' attentions the residual stream is packed, (N, D) with one line per real token, part
    by part: parts[0] the first rows, then the rests in buckets of like length (like_lengths).
    Only attention needs rows, so each block scatters its q, k, v into each part's padded layout
    and gathers the outputs back."""
    src: torch.Tensor    # (N,) each packed token's place r * T + t in the (R, T) batch
    parts: list          # [Part]: the first rows, then the rests' buckets
    sizes: list          # real tokens of each part, in the packed stream's order


def pack(cfg: LlamaConfig, attention_mask: torch.Tensor, prefix_of: torch.Tensor, dtype: torch.dtype) -> Packed:
    """The layout (Packed) of right-padded rows (attention_mask (R, T), True on real tokens) of
    which row r continues row prefix_of[r] (-1: none)."""
    real = attention_mask.bool()
    R, T = real.shape
    device = real.device
    lengths = real.sum(-1)  # (R,)
    if not bool((real == (torch.arange(T, device=device) < lengths[:, None])).all()):
        raise ValueError("hidden(..., prefix_of=) takes right-padded rows")
    grid, steps = torch.arange(R * T, device=device).view(R, T), torch.arange(T, device=device)
    first = torch.nonzero(prefix_of < 0).flatten()  # (S,)
    Ts = int(lengths[first].max())
    parts = [Part(real[first, :Ts], torch.nonzero(real[first, :Ts].flatten()).flatten(),
                  rope_cos_sin(cfg, steps[:Ts].expand(len(first), Ts), dtype), None, 0, None)]
    src = [grid[first, :Ts].flatten()[parts[0].where]]
    slot_of = torch.full((R,), -1, dtype=torch.long, device=device)
    slot_of[first] = torch.arange(len(first), device=device)
    rest = torch.nonzero(prefix_of >= 0).flatten()  # (C,)
    n, past = lengths[rest].tolist(), lengths[prefix_of[rest]].tolist()  # own tokens; prefix tokens before them
    for bucket in like_lengths(n, past):
        rows = rest[bucket]
        Tc, P = max(n[i] for i in bucket), max(past[i] for i in bucket)
        before = lengths[prefix_of[rows]]  # (rows,)
        # A rest's query t sees its prefix's real tokens (never the padding after a shorter
        # prefix) and its own tokens up to t (right padding: those are real, for every real query).
        seen = (torch.arange(P, device=device)[None, :] < before[:, None])[:, None, None, :].expand(-1, 1, Tc, P)
        own = torch.ones(Tc, Tc, dtype=torch.bool, device=device).tril().expand(len(rows), 1, Tc, Tc)
        parts.append(Part(real[rows, :Tc], torch.nonzero(real[rows, :Tc].flatten()).flatten(),
                          rope_cos_sin(cfg, steps[:Tc] + before[:, None], dtype), slot_of[prefix_of[rows]], P,
                          torch.cat([seen, own], dim=-1)))
        src.append(grid[rows, :Tc].flatten()[parts[-1].where])
    return Packed(torch.cat(src), parts, [len(s) for s in src])


def padded(y: torch.Tensor, part: Part) -> torch.Tensor:
    """(n, C) values of a part's real tokens -> (rows, T, C), zeros at padding."""
    rows, T = part.real.shape
    return y.new_zeros(rows * T, y.shape[-1]).index_copy(0, part.where, y).view(rows, T, -1)


def unpadded(y: torch.Tensor, part: Part) -> torch.Tensor:
    """(rows, T, ...) -> (n, C): the values at a part's real tokens, flattened."""
    return y.reshape(part.real.numel(), -1).index_select(0, part.where)


def with_prefix(first: torch.Tensor, rest: torch.Tensor, prefix_row: torch.Tensor, slots: int) -> torch.Tensor:
    """Keys (or values) of the rests (C, n_kv, Tc, hd) -> (C, n_kv, slots + Tc, hd): the first
    `slots` of their prefix row's (first: (S, n_kv, Ts, hd)), then their own. The prefix is read,
    not copied off the graph: backward sums every reader's gradient into it."""
    return torch.cat([first[prefix_row][:, :, :slots], rest], dim=2)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(d, self.n_heads * self.hd, bias=bias)
        self.k_proj = nn.Linear(d, self.n_kv * self.hd, bias=bias)
        self.v_proj = nn.Linear(d, self.n_kv * self.hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.hd, d, bias=bias)

    def forward(self, x, cos, sin, mask, packed: Packed | None = None):
        """x (B, T, D) -> (B, T, D); with `packed`, x is the packed stream (N, D) -> (N, D)."""
        if packed is not None:
            return self.packed_forward(x, packed)
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.hd).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, n_kv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, k, cos, sin)
        # GQA: each group of n_heads / n_kv query heads reads one K/V head (no repeat copy).
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))

    def packed_forward(self, x: torch.Tensor, p: Packed) -> torch.Tensor:
        """Attention with shared prefixes, x (N, D) packed (see Packed): the projections run on
        the real tokens once; the first rows attend causally to themselves, the rests to
        [their prefix row's keys and values | their own] -- the key/value cache."""
        qkv = [proj(x).split(p.sizes) for proj in (self.q_proj, self.k_proj, self.v_proj)]  # by part
        ys = []
        for part, *tokens in zip(p.parts, *qkv):
            rows, T = part.real.shape
            q, k, v = (padded(t, part).view(rows, T, -1, self.hd).transpose(1, 2) for t in tokens)  # (rows, heads, T, hd)
            q, k = apply_rope(q, k, *part.rope)
            if part.prefix_row is None:  # the first rows: right-padded, so the causal triangle hides padding
                first_k, first_v = k, v
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            else:
                k = with_prefix(first_k, k, part.prefix_row, part.slots)  # (rows, n_kv, P + T, hd)
                v = with_prefix(first_v, v, part.prefix_row, part.slots)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=part.mask, enable_gqa=True)
            ys.append(unpadded(y.transpose(1, 2), part))  # (real tokens, H hd)
        return self.o_proj(torch.cat(ys))  # (N, D)


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

    def forward(self, x, cos, sin, mask, packed: Packed | None = None):
        """x (B, T, D), or the packed stream (N, D) with `packed`: every op but attention is per token."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, packed)
        return x + self.mlp(self.post_attention_layernorm(x))


def positions_and_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
    """(positions (B, T), attention mask (B, 1, T, T) bool, or None for plain causal).

    Positions come from the attention mask (True on real tokens), so a left- or right-padded row
    gets the outputs of the unpadded row.
    """
    (B, T), device = input_ids.shape, input_ids.device
    if attention_mask is None or bool(attention_mask.all()):
        return torch.arange(T, device=device).expand(B, T), None  # plain causal: SDPA's fastest kernel
    real = attention_mask.bool()
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
    own = torch.ones(T, T, dtype=torch.bool, device=device).tril() & real[:, None, None, :]  # (B, 1, T, T)
    # A padding query with no visible key would softmax over nothing (NaN); let it see itself.
    # Real tokens never attend to padding either way.
    return positions, own | torch.eye(T, dtype=torch.bool, device=device)


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
        every row reading them sends its gradient back into them.) With prefix_of the rows must be
        right-padded (data/batches.py: collate's), and the blocks run on the packed stream (Packed).
        """
        if prefix_of is not None:
            return self._shared(input_ids, attention_mask, prefix_of)
        x = self.embed(input_ids)  # (B, T, D)
        positions, mask = positions_and_mask(input_ids, attention_mask)
        cos, sin = rope_cos_sin(self.cfg, positions, x.dtype)
        return self.model.norm(self._blocks(x, cos, sin, mask, None))

    def _shared(self, input_ids, attention_mask, prefix_of):
        """hidden() with shared prefixes: the packed stream (Packed) through the blocks, and back
        into the batch's (R, T, D) shape, zeros at padding."""
        R, T = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones(R, T, dtype=torch.bool, device=input_ids.device)
        p = pack(self.cfg, attention_mask, prefix_of, self.activation_dtype)
        x = self._blocks(self.embed(input_ids.flatten()[p.src]), None, None, None, p)  # (N, D)
        out = x.new_zeros(R * T, x.shape[-1])
        out[p.src] = self.model.norm(x)
        return out.view(R, T, -1)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        return x if self.compute_dtype is None else x.to(self.compute_dtype)

    def _blocks(self, x, cos, sin, mask, packed):
        for block in self.model.layers:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = recompute_in_backward(block, x, cos, sin, mask, packed, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, packed)
        return x

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
