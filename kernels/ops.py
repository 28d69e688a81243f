"""The kernels model code calls: each picks Triton or its PyTorch reference by kernels/switch.py.

    w = int8_dequant(w_int8, scb, torch.bfloat16)   # model/quant.py: the dequantize-then-GEMM path
    y = rms_norm(x, weight, eps)                     # model/llama.py RMSNorm.forward
    q, k = rope(q, k, cos, sin)                      # model/llama.py apply_rope on q and k together
    h = swiglu(gate, up)                             # model/llama.py MLP: silu(gate) * up

The Triton module is imported on first use, never at `import kernels`.
"""
from __future__ import annotations

import torch

from kernels import reference as ref
from kernels.switch import use_triton


def _tri():
    from kernels import triton_ops  # lazy: triton is optional
    return triton_ops


def int8_dequant(w_int8: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """w_int8 (out, in) int8, scb (out,) per-row absmax -> (out, in) `dtype` = w * scb / 127."""
    if use_triton(w_int8):
        return _tri().int8_dequant_triton(w_int8, scb, dtype)
    return ref.int8_dequant_torch(w_int8, scb, dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF LlamaRMSNorm over the last dim of x (..., D); weight (D,). Differentiable in both."""
    if use_triton(x):
        return _tri().rms_norm_triton(x, weight, eps)
    return ref.rms_norm_torch(x, weight, eps)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE on q (B, Hq, T, hd) and k (B, Hk, T, hd) (any strides, e.g. the
    transpose of a (B, T, H, hd) view); cos/sin (B, T, hd) or (T, hd). Differentiable in q, k."""
    if use_triton(q):
        return _tri().rope_triton(q, k, cos, sin)
    return ref.rope_torch(q, k, cos, sin)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for same-shape tensors. Differentiable in both."""
    if use_triton(gate):
        return _tri().swiglu_triton(gate, up)
    return ref.swiglu_torch(gate, up)
