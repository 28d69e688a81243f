"""Storage precisions of the block projections, and float linears: the part of model/quant.py
that needs no bitsandbytes, so that an fp32 or bf16 model loads without importing it (importing
bitsandbytes costs a few seconds of start-up; model/load.py imports model/quant.py only for
int8 and nf4)."""
from __future__ import annotations

import torch
from torch import nn

PRECISIONS = ("int8", "nf4", "bf16", "fp16", "fp32")
FLOAT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def float_linear(weight: torch.Tensor, dtype: torch.dtype, bias: torch.Tensor | None = None) -> nn.Linear:
    """A frozen nn.Linear holding `weight` (out, in) cast to `dtype`, on weight's device."""
    m = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    m.weight = nn.Parameter(weight.detach().to(dtype), requires_grad=False)
    if bias is not None:
        m.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)
    return m
