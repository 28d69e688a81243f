"""Storage precisions of the block projections and the dtype each computes in: the one place
these rules are written. No bitsandbytes here, so a float model loads without importing it
(model/load.py imports model/quant.py only for int8 and nf4)."""
from __future__ import annotations

import torch
from torch import nn

PRECISIONS = ("int8", "nf4", "bf16", "fp16", "fp32")
FLOAT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def default_precision(device: torch.device) -> str:
    """The 8-bit base, on every device: it is the point on a GPU (memory), and on a CPU it costs
    no measurable speed against fp32 (the README's benchmarks)."""
    return "int8"


def storage_dtype(precision: str) -> torch.dtype:
    """The dtype embeddings, norms and the head are stored in: a float precision's own; bf16 beside
    int8 / nf4 projections."""
    return FLOAT_DTYPES.get(precision, torch.bfloat16)


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype of activations for a base at `precision`: a float precision's own; for int8 /
    nf4 bf16 on CUDA, and fp32 on CPU (most CPUs have no fast bf16 matmul), where the bf16-stored
    embeddings and head are upcast as they are used."""
    if precision in FLOAT_DTYPES:
        return FLOAT_DTYPES[precision]
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def float_linear(weight: torch.Tensor, dtype: torch.dtype, bias: torch.Tensor | None = None) -> nn.Linear:
    """A frozen nn.Linear holding `weight` (out, in) cast to `dtype`, on weight's device."""
    m = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    m.weight = nn.Parameter(weight.detach().to(dtype), requires_grad=False)
    if bias is not None:
        m.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)
    return m
