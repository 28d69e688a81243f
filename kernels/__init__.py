"""Fused kernels (Triton) with a same-signature PyTorch reference each, behind one switch.

`KERNELS=auto|triton|torch` or `kernels.set_backend(...)`: see kernels/switch.py.
"""
from kernels.cross_entropy import chunked_cross_entropy, cross_entropy_torch
from kernels.fused_lora import lora_group, lora_multi, lora_multi_cat, lora_multi_torch
from kernels.ops import int8_dequant, rms_norm, rope, swiglu
from kernels.reference import int8_dequant_torch, rms_norm_torch, rope_torch, swiglu_torch
from kernels.switch import BACKENDS, backend, get_backend, have_triton, set_backend, use_triton

__all__ = [
    "BACKENDS", "backend", "get_backend", "set_backend", "use_triton", "have_triton",
    "int8_dequant", "rms_norm", "rope", "swiglu", "chunked_cross_entropy", "lora_multi", "lora_group",
    "int8_dequant_torch", "rms_norm_torch", "rope_torch", "swiglu_torch", "cross_entropy_torch",
    "lora_multi_torch", "lora_multi_cat",
]
