"""PyTorch references for the Triton kernels in kernels/triton_ops.py: same signatures, same
numerics as model/llama.py and HF's Llama (which they are tested against), autograd for free.

These are what runs on CPU, and what every kernel is compared with in tests/test_kernels.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def int8_dequant_torch(w_int8: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """LLM.int8 row-wise dequantization: w (out, in) int8, scb (out,) absmax -> w * scb / 127.

    Bit-identical to model/quant.py's dequantize_int8: the scale is scb * fp32(1/127), and the
    in-place multiply of the `dtype` copy computes in fp32 and rounds once, with no fp32 copy.
    """
    return w_int8.to(dtype).mul_((scb.float() * (1.0 / 127.0)).unsqueeze(1))  # (out, in)


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF LlamaRMSNorm: normalise in fp32, cast back to x's dtype, then multiply by the weight."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def rope_torch(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE. q (B, Hq, T, hd), k (B, Hk, T, hd), cos/sin (B, T, hd) or (T, hd)."""
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hd): broadcast over heads
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def swiglu_torch(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, elementwise."""
    return F.silu(gate) * up
