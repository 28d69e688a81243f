"""An experiment, not used by training: LoRA adapters of several projections that read the same
input, computed together. tests/test_kernels.py checks it against its reference; no benchmark
runs it inside the model (that would mean replacing model/llama.py's Attention and MLP forward,
and the benchmarks call the library, never patch it).

q, k and v read the same normed x; gate and up read the same x. Run one by one (lora/lora.py),
each adapter casts x to fp32, draws its own dropout mask over it (a (T, D) fp32 tensor kept for
backward) and runs its own thin `x @ Aᵀ` GEMM. Here the input is cast and dropped out ONCE and
the A matrices are concatenated, so one (T, D) x (D, r1 + r2 + ...) GEMM feeds every adapter.

SEMANTICS CHANGE (training only): PEFT and LoRALinear draw an independent dropout mask per
adapter; here every adapter of the group sees the same mask. That is a different but equally
valid regulariser (each adapter still sees x with dropout p, in expectation the same update);
it is not bit-compatible with PEFT's random stream. In eval mode, or with dropout 0, the result
is identical to running the adapters one by one.

`lora_multi_torch` (a loop over adapters, one shared mask) is the reference; `lora_multi_cat`
the concatenated-A version; `lora_multi` picks by device (cat on CUDA). `lora_group` applies the
whole thing to LoRALinear modules (base output + adapter), for model code to call as
`q, k, v = lora_group(x, [attn.q_proj, attn.k_proj, attn.v_proj])`.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lora.lora import apply_dropout as lora_dropout


def _dropped(x: torch.Tensor, dtype: torch.dtype, dropout: float, training: bool) -> torch.Tensor:
    x = x.to(dtype)  # the adapters run in A's dtype (fp32 by default), as LoRALinear does
    return lora_dropout(x, dropout, training)  # as LoRALinear's LoRADropout


def lora_multi_torch(x: torch.Tensor, a_weights: Sequence[torch.Tensor], b_weights: Sequence[torch.Tensor],
                     scalings: Sequence[float], dropout: float = 0.0, training: bool = False
                     ) -> list[torch.Tensor]:
    """Reference: one dropout mask over x, then each adapter's s * B(A(x)) on its own.

    Args:
        x: (..., in) shared input.
        a_weights: per adapter A (r_i, in); b_weights: per adapter B (out_i, r_i).
        scalings: per adapter alpha / r (or alpha / sqrt(r)).
        dropout, training: dropout probability and whether it applies (module.training).
    Returns:
        per adapter the update (..., out_i) in x's dtype.
    """
    xd = _dropped(x, a_weights[0].dtype, dropout, training)
    return [(F.linear(F.linear(xd, a), b) * s).to(x.dtype)
            for a, b, s in zip(a_weights, b_weights, scalings)]


def lora_multi_cat(x: torch.Tensor, a_weights: Sequence[torch.Tensor], b_weights: Sequence[torch.Tensor],
                   scalings: Sequence[float], dropout: float = 0.0, training: bool = False
                   ) -> list[torch.Tensor]:
    """Same as lora_multi_torch with one GEMM against the concatenated A's (sum r_i, in)."""
    xd = _dropped(x, a_weights[0].dtype, dropout, training)
    h = F.linear(xd, torch.cat(list(a_weights)))  # (..., r1 + r2 + ...)
    hs = h.split([a.shape[0] for a in a_weights], dim=-1)
    return [(F.linear(hi, b) * s).to(x.dtype) for hi, b, s in zip(hs, b_weights, scalings)]


def lora_multi(x: torch.Tensor, a_weights: Sequence[torch.Tensor], b_weights: Sequence[torch.Tensor],
               scalings: Sequence[float], dropout: float = 0.0, training: bool = False
               ) -> list[torch.Tensor]:
    """lora_multi_cat on CUDA tensors, lora_multi_torch otherwise."""
    if len({a.dtype for a in a_weights}) != 1:
        raise ValueError("lora_multi: all A matrices must share one dtype")
    fn = lora_multi_cat if x.is_cuda else lora_multi_torch
    return fn(x, a_weights, b_weights, scalings, dropout, training)


def lora_group(x: torch.Tensor, layers: Sequence[torch.nn.Module]) -> list[torch.Tensor]:
    """Outputs of several LoRALinear layers on the same x: base(x) + shared-mask adapters.

    Plain or merged layers (no live adapter) fall back to their own forward. All live
    adapters must share one dropout probability and train/eval mode.
    """
    live = [m for m in layers if hasattr(m, "lora_A") and not getattr(m, "merged", False)]
    if len(live) < 2:
        return [m(x) for m in layers]
    if len({(m.dropout, m.training) for m in live}) != 1:
        raise ValueError("lora_group: the adapters differ in dropout or train/eval mode")
    deltas = lora_multi(x, [m.lora_A.weight for m in live], [m.lora_B.weight for m in live],
                        [m.scaling for m in live], live[0].dropout, live[0].training)
    by_id = {id(m): d for m, d in zip(live, deltas)}
    out = []
    for m in layers:
        if id(m) in by_id:
            y = m.base_layer(x)
            out.append(y + by_id[id(m)].to(y.dtype))
        else:
            out.append(m(x))
    return out
