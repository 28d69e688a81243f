"""LoRALinear: a frozen base linear plus a trainable low-rank update (Hu et al., 2021).

    y = base(x) + dropout(x) @ Aᵀ @ Bᵀ · s,   s = alpha / r   (alpha / √r: rsLoRA, Kalajdzievski 2023)

A wrapper module, not a parametrization: the base can be any linear of model/ -- an fp32 or bf16
nn.Linear, or the frozen 8-bit / 4-bit layers of model/quant.py -- and its weight is never rebuilt
on the forward pass (a parametrization would compute W + BA every step and cannot sit on int8).
Names follow PEFT (`base_layer`, `lora_A.weight` (r, in), `lora_B.weight` (out, r)) and so does the
arithmetic (Kaiming-uniform A with a=√5, zero B, dropout on the adapter input only), so an adapter
saved here loads in PEFT with the same logits. A and B are fp32; beside bf16 activations their
matmuls run in bf16, as torch.autocast would run them (PEFT casts the input up to fp32 instead:
on a CPU that costs ~15% of a training step of the default model for a 2^-8 rounding of the update).
"""
from __future__ import annotations

import contextlib
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F



def is_float_linear(layer: nn.Module) -> bool:
    """True for a base whose weight is a plain float matrix we can add a delta to in place."""
    w = getattr(layer, "weight", None)
    # bitsandbytes' Int8Params / Params4bit are Parameter subclasses holding int8 / packed uint8.
    return isinstance(w, torch.Tensor) and w.dtype.is_floating_point and w.dim() == 2 \
        and type(w) in (nn.Parameter, torch.Tensor)


# ---------------------------------------------------------------------------------- dropout

_LEVELS = 1 << 16  # dropout_bits draws 16-bit uniforms


def dropout_bits(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training-mode dropout of x with probability p (0 <= p < 1), differentiable, from cheaper
    random numbers: one 64-bit word per FOUR elements, read as four 16-bit uniforms u in
    [0, 65536). An element is dropped when u < k, k = round(p · 65536), and a kept one is scaled
    by 65536 / (65536 - k): p at a 1/65536 resolution, and E[output] = x exactly, as F.dropout.
    (torch's CPU dropout draws one random number per element; seven adapters per layer draw a
    mask each, again in the checkpoint recompute.) Same seed, same mask; not F.dropout's mask."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p!r}")
    k = round(p * _LEVELS)
    if k == 0:
        return x
    n = x.numel()
    words = torch.randint(-(1 << 63), (1 << 63) - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
    u = words.view(torch.int16)[:n].view(x.shape)  # uniform over int16: [-32768, 32767]
    drop = u < (k - _LEVELS // 2)  # P = k / 65536
    return x.masked_fill(drop, 0).mul_(_LEVELS / (_LEVELS - k))


# Where a CPU run's dropout masks come from: "auto" (dropout_bits, the cheap 16-bit draws) or
# "torch" (F.dropout: the masks PEFT draws, draw for draw, for a run that must match PEFT step by
# step). Not a kernel, so not the KERNELS switch: the environment variable DROPOUT_MASKS, or
# `with dropout_masks("torch"):` for a block. On CUDA F.dropout is one fused kernel either way.
MASK_SOURCES = ("auto", "torch")
_masks: str | None = None  # None: read DROPOUT_MASKS from the environment


def mask_source() -> str:
    name = _masks or os.environ.get("DROPOUT_MASKS", "auto").strip().lower() or "auto"
    if name not in MASK_SOURCES:
        raise ValueError(f"DROPOUT_MASKS={name!r}: use auto or torch")
    return name


@contextlib.contextmanager
def dropout_masks(name: str):
    """`with dropout_masks("torch"): ...` -- F.dropout's masks inside the block, even on a CPU."""
    global _masks
    if name not in MASK_SOURCES:
        raise ValueError(f"dropout_masks: {name!r} is not one of {', '.join(MASK_SOURCES)}")
    saved, _masks = _masks, name
    try:
        yield
    finally:
        _masks = saved


def apply_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """F.dropout(x, p, training), its mask drawn by dropout_bits on a CPU unless the mask source is
    "torch" (above). Both draw from torch's default generator, so a seed and
    torch.utils.checkpoint's RNG save/restore cover them (the recompute sees the same mask)."""
    if not training or p == 0:
        return x
    if x.device.type == "cpu" and mask_source() != "torch":
        return dropout_bits(x, p)
    return F.dropout(x, p, training)


class LoRADropout(nn.Dropout):
    """nn.Dropout drawing its mask with `apply_dropout` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_dropout(x, self.p, self.training)


# ---------------------------------------------------------------------------------- the layer

def lora_scaling(r: int, alpha: float, rslora: bool = False) -> float:
    """s = alpha / r, or alpha / √r with rsLoRA."""
    return float(alpha) / (math.sqrt(r) if rslora else r)


def lora_delta(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """The update s · B @ A (out, in) of A (r, in) and B (out, r), in fp32 (or A's dtype when wider)."""
    dt = torch.promote_types(a.dtype, torch.float32)
    return (b.to(dt) @ a.to(dt)) * scaling


class LoRALinear(nn.Module):
    """Wraps a frozen linear `base` (in_features -> out_features) with a rank-`r` adapter.

    Args:
        base: nn.Linear, Int8Linear or NF4Linear; anything with in_features, out_features and a
            forward(x). Its parameters are frozen here.
        r: adapter rank (> 0).
        alpha: LoRA alpha; the update is scaled by alpha / r (alpha / √r when `rslora`).
        dropout: dropout probability on the adapter's input (the base sees the undropped x).
        rslora: rank-stabilised scaling alpha / √r.
        dtype: dtype of A and B (fp32 by default, whatever the base computes in).
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False, dtype: torch.dtype = torch.float32):
        super().__init__()
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
        self.in_features, self.out_features = int(base.in_features), int(base.out_features)
        self.r, self.alpha, self.rslora = r, float(alpha), bool(rslora)
        self.scaling = lora_scaling(r, alpha, rslora)
        self.base_layer = base
        for p in base.parameters():
            p.requires_grad_(False)
        device = _device_of(base)
        self.lora_dropout = LoRADropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)  # (r, in)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)  # (out, r)
        self.merged = False
        self.reset_lora_parameters()
        self.train(base.training)  # an adapter added to an eval-mode model must not start dropping

    def reset_lora_parameters(self) -> None:
        # As PEFT: A ~ Kaiming-uniform(a=√5) (nn.Linear's own default), B = 0 so step 0 is the base.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def dropout(self) -> float:
        return self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in) -> (..., out)
        y = self.base_layer(x)  # the frozen W·x (float, int8 or nf4)
        if self.merged:  # W already holds W + s·B@A
            return y
        a, b = self.lora_A.weight, self.lora_B.weight  # (r, in), (out, r): fp32, whatever the activations
        if x.dtype == torch.bfloat16:  # autocast's rule: the matmuls in bf16 (fp32's range), the weights
            a, b = a.to(x.dtype), b.to(x.dtype)  # kept in fp32 -- their gradients come back in fp32
        else:  # fp32 activations, or fp16 (whose narrow range the update would risk): in A's dtype
            x = x.to(a.dtype)
        # With shared prefixes (model/llama.py: hidden(..., prefix_of=)) a prefix's tokens pass
        # through here once (one line each of the packed stream), so they draw ONE dropout mask for every row
        # they start -- unshared, each row would draw its own mask for those tokens.
        h = F.linear(self.lora_dropout(x), a)  # (..., r): A·drop(x)
        if y.dtype != b.dtype or not y.is_contiguous():  # an fp16 base beside fp32 adapters
            return y + (F.linear(h, b) * self.scaling).to(y.dtype)  # y = W·x + s·B·A·drop(x)
        # Speed trick, same sum: y + s·h@Bᵀ as ONE GEMM (addmm: beta=1, alpha=s) instead of a
        # GEMM, then a pass to scale and a pass to add over the (..., out) output.
        y2 = torch.addmm(y.view(-1, self.out_features), h.reshape(-1, self.r), b.t(), alpha=self.scaling)
        return y2.view(y.shape)

    # ---- merging (float bases only) ----

    def delta_weight(self) -> torch.Tensor:
        """s · B @ A, (out, in), in fp32 (or A's dtype when wider)."""
        return lora_delta(self.lora_A.weight, self.lora_B.weight, self.scaling)

    def _check_mergeable(self) -> nn.Parameter:
        if not is_float_linear(self.base_layer):
            raise TypeError(
                f"cannot merge LoRA into a {type(self.base_layer).__name__} base: adding B@A to a "
                f"quantized weight would re-round it; use `python -m lora.merge` to export a "
                f"merged bf16 model instead")
        return self.base_layer.weight

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + s·B@A (computed in fp32, stored in W's dtype); forward then skips the adapter."""
        w = self._check_mergeable()
        if self.merged:
            return
        w.copy_((w.float() + self.delta_weight()).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merge(). Exact up to the rounding of W's dtype (bf16 loses low bits; fp32 ~1 ulp)."""
        w = self._check_mergeable()
        if not self.merged:
            return
        w.copy_((w.float() - self.delta_weight()).to(w.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha:g}, scaling={self.scaling:g}, dropout={self.dropout:g}, "
                f"rslora={self.rslora}, merged={self.merged}")


def _device_of(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")
