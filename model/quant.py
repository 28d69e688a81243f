"""Frozen quantized linear layers on bitsandbytes storage: 8-bit (the default base) and NF4.

Int8Linear stores what LLM.int8() stores (Dettmers et al. 2022, bitsandbytes' `Int8Params`):
an int8 weight (out, in) and one absmax scale per output row, `SCB` (out,) float32, with
W ≈ W_int8 * SCB[:, None] / 127. Two ways to compute y = x Wᵀ, picked by `INT8_MATMUL`:

  "dequant" (default): dequantize W to x's dtype in one pass, then one plain GEMM: far cheaper
            than LLM.int8's int8 GEMM with fp16 outliers on a GPU (the README's benchmarks).
            On CUDA `dequantize_int8` runs as one fused Triton pass (kernels/).
  "bnb":    bitsandbytes' own LLM.int8 matmul (int8 x int8 with fp16 outlier columns), kept as
            the reference path.

Either way only the input gets a gradient: the base is frozen, LoRA trains beside it.
NF4Linear stores bitsandbytes' Linear4bit weights (QLoRA's NF4, double-quantized scales) and
computes the same way: dequantize to the activation's dtype, then one GEMM.
"""
from __future__ import annotations

import logging

# bitsandbytes' CPU backend tries, at import, to fetch an optional 4-bit kernel from the Hugging
# Face hub through a `kernels` package, and logs a warning when it cannot (always, offline; and
# our own kernels/ package shadows that name). NF4Linear does not use that kernel: drop the line.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda r: "kernels-community" not in r.getMessage())

import bitsandbytes as bnb  # noqa: E402
import bitsandbytes.functional as bnbF
import torch
import torch.nn.functional as F
from bitsandbytes.nn import Int8Params, Linear4bit, Params4bit
from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module
from torch import nn

import kernels
from model.precision import FLOAT_DTYPES, PRECISIONS, float_linear

INT8_MATMUL = "dequant"  # "dequant" (fast default) | "bnb" (bitsandbytes' LLM.int8 reference)
# Outlier threshold of the "bnb" path: activation columns holding a value >= 6 stay in fp16.
# 6.0 is LLM.int8()'s published value and transformers' `llm_int8_threshold` default, so the
# reference is what `load_in_8bit` users actually get; 0.0 would also quantize the outlier
# features, which is where LLM.int8 loses accuracy on large models.
BNB_THRESHOLD = 6.0


# bnb logs "inputs will be cast from ... to float16" on every LLM.int8 call that is not fp16 —
# once per layer per step. The cast is part of the algorithm, not news: drop that one message.
logging.getLogger("bitsandbytes.autograd._functions").addFilter(
    lambda r: "during quantization" not in r.getMessage())


# ---------------------------------------------------------------------------------- int8 math

def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row absmax quantization: (out, in) float → int8 (out, in), SCB (out,) float32.

    The formula of bitsandbytes' `int8_vectorwise_quant` (scb = max|w| per row,
    q = round(w * 127 / scb)), bit-identical to it on CPU (tests/test_quant.py). Written out
    rather than called because bnb's CUDA kernel takes fp16 only (a bf16 checkpoint would be
    cast first) and divides an all-zero row by zero; here it runs in fp32 on w's device and a
    zero row stays zero.
    """
    wf = w.to(torch.float32, copy=True)  # the one temporary: scaled and rounded in place
    scb = torch.linalg.vector_norm(wf, ord=float("inf"), dim=1)  # (out,) max |w| per row
    q = wf.mul_((127.0 / scb.clamp(min=1e-30)).unsqueeze(1)).round_().to(torch.int8)
    return q, scb


@kernels.accelerated("int8_dequant_triton")
def dequantize_int8(w_int8: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 (out, in) + SCB (out,) → W = w_int8 · SCB / 127, (out, in) in `dtype`.

    The `dtype` copy of the int8 weight is multiplied in place by fp32 scales: the product is
    computed in fp32 and rounded once, with no fp32 copy of the weight.
    """
    return w_int8.to(dtype).mul_((scb.float() * (1.0 / 127.0)).unsqueeze(1))  # (out, in)


class _Int8DequantMatmul(torch.autograd.Function):
    """y = x @ dequant(W)ᵀ. Saves the int8 weight and scales, never the float weight: backward
    dequantizes again (one more cheap pass) instead of holding a 16-bit copy per layer."""

    @staticmethod
    def forward(ctx, x, w_int8, scb):
        ctx.save_for_backward(w_int8, scb)
        return F.linear(x, dequantize_int8(w_int8, scb, x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        w_int8, scb = ctx.saved_tensors
        grad_x = grad_out @ dequantize_int8(w_int8, scb, grad_out.dtype)  # (..., out) @ (out, in)
        return grad_x, None, None


class _NF4DequantMatmul(torch.autograd.Function):
    """y = x @ dequant(W)ᵀ for a packed NF4 weight; like _Int8DequantMatmul, backward dequantizes
    again rather than keep a float copy."""

    @staticmethod
    def forward(ctx, x, packed, quant_state):
        ctx.save_for_backward(packed)
        ctx.quant_state = quant_state
        return F.linear(x, bnbF.dequantize_4bit(packed, quant_state).to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        (packed,) = ctx.saved_tensors
        return grad_out @ bnbF.dequantize_4bit(packed, ctx.quant_state).to(grad_out.dtype), None, None


def _bnb_int8_matmul(x: torch.Tensor, w_int8: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    # A fresh state per call points at this layer's current tensors, so nothing goes stale after
    # .to(device). is_training=False selects MatMul8bitLt (real LLM.int8) on every device: in
    # training mode bnb swaps in plain dequant+matmul on CPU, which would test nothing.
    state = bnb.MatmulLtState()
    state.CB, state.SCB = w_int8, scb
    state.has_fp16_weights = False
    state.is_training = False
    state.threshold = BNB_THRESHOLD
    shape = x.shape
    y = bnb.matmul(x.reshape(-1, shape[-1]), w_int8, state=state, threshold=BNB_THRESHOLD)
    return y.reshape(*shape[:-1], w_int8.shape[0])


class Int8Linear(nn.Module):
    """Frozen 8-bit linear. `weight` is an `Int8Params` (out, in) int8; `SCB` (out,) float32 is a
    buffer (so it follows .to(device) and lands in state_dict beside the weight) and is also
    attached to the weight as `weight.SCB`, as bitsandbytes expects."""

    precision = "int8"

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        w = torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        self.register_buffer("SCB", torch.ones(out_features, dtype=torch.float32, device=device))
        self.weight = Int8Params(w, requires_grad=False, has_fp16_weights=False)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None
        self._sync()

    @classmethod
    def from_int8(cls, w_int8: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None = None) -> "Int8Linear":
        """Wrap already-quantized tensors (no float copy is ever made)."""
        if w_int8.dtype != torch.int8 or w_int8.dim() != 2 or scb.shape != (w_int8.shape[0],):
            raise ValueError(f"from_int8 wants int8 (out, in) and (out,) scales, got {w_int8.dtype} "
                             f"{tuple(w_int8.shape)} and {tuple(scb.shape)}")
        m = cls(w_int8.shape[1], w_int8.shape[0], device="meta")
        m.SCB = scb.to(device=w_int8.device, dtype=torch.float32)
        m.weight = Int8Params(w_int8, requires_grad=False, has_fp16_weights=False)
        if bias is not None:
            m.bias = nn.Parameter(bias.detach(), requires_grad=False)
        m._sync()
        return m

    @classmethod
    def from_float(cls, linear_or_weight: nn.Linear | torch.Tensor, bias: torch.Tensor | None = None) -> "Int8Linear":
        """Quantize a float nn.Linear (or its (out, in) weight) on the weight's device."""
        if isinstance(linear_or_weight, nn.Linear):
            w, bias = linear_or_weight.weight, linear_or_weight.bias
        else:
            w = linear_or_weight
        q, scb = quantize_int8(w.detach())
        return cls.from_int8(q, scb, bias)

    def _sync(self):
        # Keep weight.CB / weight.SCB pointing at the live tensors, as bitsandbytes expects; the
        # buffer is the truth (load_state_dict(assign=True) may replace either tensor).
        w = self.weight
        if not isinstance(w, Int8Params):
            w = self.weight = Int8Params(w.data, requires_grad=False, has_fp16_weights=False)
        w.CB, w.SCB, w.has_fp16_weights = w.data, self.SCB, False

    def _apply(self, fn, recurse=True):
        # Moved by hand, not by Module._apply: that one cannot re-wrap an Int8Params when a move
        # changes the tensor type (to meta raises), and Int8Params.to leaves weight.SCB behind.
        w = fn(self.weight.data)  # fn only casts floating tensors: int8 stays int8
        scb = fn(self.SCB)
        if scb.dtype != torch.float32:  # .half() / .to(bfloat16) cast every float buffer; the
            scb = self.SCB.to(device=scb.device, dtype=torch.float32)  # scales must stay fp32
        self.SCB = scb
        self.weight = Int8Params(w, requires_grad=False, has_fp16_weights=False)
        if self.bias is not None:
            self.bias = nn.Parameter(fn(self.bias.data), requires_grad=False)
        self._sync()
        return self

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._sync()  # load_state_dict(assign=True) replaces the tensors

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.data  # plain int8 tensor: Int8Params overrides .to() in ways that bite
        if INT8_MATMUL == "dequant":
            y = _Int8DequantMatmul.apply(x, w, self.SCB)
        elif INT8_MATMUL == "bnb":
            y = _bnb_int8_matmul(x, w, self.SCB)
        else:
            raise ValueError(f"model.quant.INT8_MATMUL={INT8_MATMUL!r}: use 'dequant' or 'bnb'")
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight (out, in) this layer computes with."""
        return dequantize_int8(self.weight.data, self.SCB, dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, precision=int8")


# ---------------------------------------------------------------------------------------- nf4

class NF4Linear(Linear4bit):
    """Frozen 4-bit NF4 linear (QLoRA): bitsandbytes `Linear4bit` with `Params4bit` storage,
    blocksize 64, double-quantized scales. Computes in the input's dtype."""

    precision = "nf4"

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None,
                 compress_statistics: bool = True):
        super().__init__(in_features, out_features, bias=bias, compress_statistics=compress_statistics,
                         quant_type="nf4", device=device)

    @classmethod
    def from_float(cls, linear_or_weight: nn.Linear | torch.Tensor, bias: torch.Tensor | None = None,
                   compress_statistics: bool = True) -> "NF4Linear":
        """Quantize a float nn.Linear (or its (out, in) weight) on the weight's device."""
        if isinstance(linear_or_weight, nn.Linear):
            w, bias = linear_or_weight.weight, linear_or_weight.bias
        else:
            w = linear_or_weight
        w = w.detach()
        m = cls(w.shape[1], w.shape[0], device="meta", compress_statistics=compress_statistics)
        p = Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=compress_statistics,
                       module=m)
        m.weight = p._quantize(w.device)  # packs to uint8 ((out*in)/2, 1) + QuantState
        m.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # As Int8Linear: dequantize to x's dtype, then one plain GEMM (not bitsandbytes' 4-bit
        # matmul, which on CPU differs from x @ dequantize(W)ᵀ by more than rounding), so a merged
        # export (lora/merge.py --precision nf4) reproduces exactly the function that was trained.
        fix_4bit_weight_quant_state_from_module(self)
        y = _NF4DequantMatmul.apply(x, self.weight.data, self.weight.quant_state)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight (out, in) this layer computes with."""
        return bnbF.dequantize_4bit(self.weight.data, self.weight.quant_state).to(dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", precision=nf4"


# ------------------------------------------------------------------------------ module level

def dequantize(layer: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight (out, in) of an nn.Linear, Int8Linear or NF4Linear."""
    if isinstance(layer, (Int8Linear, NF4Linear)):
        return layer.dequantize(dtype)
    if isinstance(layer, nn.Linear):
        return layer.weight.detach().to(dtype)
    raise TypeError(f"dequantize: {type(layer).__name__} is not a linear layer")


def quantize_linear(weight: torch.Tensor, precision: str, bias: torch.Tensor | None = None) -> nn.Module:
    """A frozen linear layer holding `weight` (out, in) at `precision`, on weight's device.

    int8 → Int8Linear, nf4 → NF4Linear, bf16/fp16/fp32 → nn.Linear cast to that dtype.
    """
    if precision == "int8":
        return Int8Linear.from_float(weight, bias)
    if precision == "nf4":
        return NF4Linear.from_float(weight, bias)
    if precision in FLOAT_DTYPES:
        return float_linear(weight, FLOAT_DTYPES[precision], bias)
    raise ValueError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
