"""Storage precisions of the block projections and the dtype activations compute in: the one place
these rules are written. No bitsandbytes here, so a float model loads without importing it
(model/load.py imports model/quant.py only for int8 and nf4).

Activations of an int8 / nf4 base are bf16 where bf16 arithmetic is native -- a GPU, and a CPU
with AVX512_BF16 or AMX (x86) or the BF16 extension (arm64) -- and fp32 on any other CPU, where
bf16 is emulated and many times slower than fp32 (PyTorch's issues report 40-500x on AVX2-only
parts). Measured on this project's AMD EPYC (avx512_bf16): a training step 1.5-1.7x and a scoring
pass 2.2-2.7x faster in bf16 than in fp32 (README, "Benchmarks"). A float precision computes in its own dtype:
`--precision fp32` stays the exact fp32 reference.
"""
from __future__ import annotations

import platform
from pathlib import Path

import torch
from torch import nn

from common.errors import UserError

PRECISIONS = ("int8", "nf4", "bf16", "fp16", "fp32")
FLOAT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ACTIVATIONS = ("auto", "bf16", "fp32")  # the choices of --activations


def default_precision(device: torch.device) -> str:
    """The 8-bit base, on every device: it is the point on a GPU (memory), and on a CPU it costs
    no measurable speed against fp32 (the README's benchmarks)."""
    return "int8"


def storage_dtype(precision: str) -> torch.dtype:
    """The dtype embeddings, norms and the head are stored in: a float precision's own; bf16 beside
    int8 / nf4 projections."""
    return FLOAT_DTYPES.get(precision, torch.bfloat16)


# ---------------------------------------------------------------------------- native bf16 on a CPU

def _cpu_flags() -> set[str]:
    """The feature flags the kernel lists in /proc/cpuinfo ("flags" on x86, "Features" on arm64)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return set()
    flags = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags


def _torch_probe(name: str) -> bool | None:
    """torch.cpu's own check of an x86 feature (None where this torch has no such check)."""
    probe = getattr(torch.cpu, name, None)
    if probe is None:
        return None
    try:
        return bool(probe())
    except Exception:  # noqa: BLE001 -- a probe that cannot run says nothing
        return None


def native_bf16_feature() -> str | None:
    """The processor feature that makes bf16 arithmetic native on this CPU ("amx_bf16",
    "avx512_bf16", or "bf16" on arm64), or None when it has none, or when this torch cannot use
    it (no oneDNN) -- the check must never say yes to a CPU that would emulate bf16."""
    if not torch.backends.mkldnn.is_available():  # oneDNN is what runs bf16 GEMMs fast on a CPU
        return None
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "bf16" if "bf16" in _cpu_flags() else None  # FEAT_BF16: BFMMLA / BFDOT
    amx, avx = _torch_probe("_is_amx_tile_supported"), _torch_probe("_is_avx512_bf16_supported")
    if amx is None and avx is None:  # an older torch: the kernel's flags instead
        flags = _cpu_flags()
        amx, avx = "amx_bf16" in flags, "avx512_bf16" in flags
    return "amx_bf16" if amx else "avx512_bf16" if avx else None


def choose_activations(precision: str, device: torch.device, choice: str = "auto") -> tuple[str, str]:
    """(activation dtype name, why) for a base at `precision` on `device`, `choice` being
    --activations: auto | bf16 | fp32. A float precision computes in its own dtype (a different
    explicit choice is refused); an int8 / nf4 base as the module docstring says."""
    if choice not in ACTIVATIONS:
        raise UserError(f"--activations {choice}: use one of {', '.join(ACTIVATIONS)}")
    if precision in FLOAT_DTYPES:
        if choice not in ("auto", precision):
            raise UserError(f"--activations {choice} applies to an int8 or nf4 base; --precision {precision} "
                             f"computes in {precision}")
        return precision, f"--precision {precision}"
    if choice == "bf16" and device.type == "cpu" and not native_bf16_feature():
        return choice, "--activations bf16; this CPU has no native bf16: emulated, many times slower than fp32"
    if choice != "auto":
        return choice, f"--activations {choice}"
    if device.type != "cpu":
        return "bf16", "auto: a GPU"
    feature = native_bf16_feature()
    if feature:
        return "bf16", f"auto: the CPU has {feature}"
    return "fp32", "auto: the CPU has no native bf16 arithmetic (no avx512_bf16, amx or arm64 bf16)"


def compute_dtype(precision: str, device: torch.device, choice: str = "auto") -> torch.dtype:
    """The torch dtype of `choose_activations(precision, device, choice)`."""
    return FLOAT_DTYPES[choose_activations(precision, device, choice)[0]]


def float_linear(weight: torch.Tensor, dtype: torch.dtype, bias: torch.Tensor | None = None) -> nn.Linear:
    """A frozen nn.Linear holding `weight` (out, in) cast to `dtype`, on weight's device."""
    m = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    m.weight = nn.Parameter(weight.detach().to(dtype), requires_grad=False)
    if bias is not None:
        m.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)
    return m
