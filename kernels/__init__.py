"""Triton accelerators for functions of model/, and the one switch that puts them in place.

The PyTorch math is written out where a reader looks for it -- `rms_norm`, `apply_rope`,
`swiglu` in model/llama.py, `dequantize_int8` in model/quant.py -- each decorated with
`@kernels.accelerated("<name in kernels/triton_ops.py>")`. The decorated function runs:

    KERNELS=auto    (default) the Triton twin when triton imports and the first tensor argument
                    is on CUDA, else the PyTorch definition
    KERNELS=triton  always the Triton twin (on CPU tensors only under TRITON_INTERPRET=1: tests)
    KERNELS=torch   always the PyTorch definition (to compare, or to rule the kernels out)

`set_backend(name)` overrides the environment variable, `set_backend(None)` goes back to it,
`with backend(name):` does so for a block. `fn.reference` is the PyTorch definition itself.
If a Triton twin fails (no compiler for this card, a Triton / driver mismatch), that function
falls back to its definition for the rest of the process, with one warning naming it.
triton is imported only when a Triton path is taken, so CPU-only installs import this fine.
"""
from __future__ import annotations

import contextlib
import functools
import os
import warnings

import torch

from common.errors import UserError

BACKENDS = ("auto", "triton", "torch")
_backend: str | None = None  # None: read KERNELS from the environment
_failed: set[str] = set()  # Triton twins that raised once: their definition runs from then on


class KernelsError(UserError, ValueError):
    """$KERNELS names no backend."""


def set_backend(name: str | None) -> None:
    """Pick "auto", "triton" or "torch" for every kernel; None reverts to $KERNELS (or auto)."""
    global _backend
    if name is not None and name not in BACKENDS:
        raise ValueError(f"kernels.set_backend: unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
    _backend = name


@contextlib.contextmanager
def backend(name: str | None):
    """`with kernels.backend("torch"): ...` -- set_backend(name) inside the block, then back to
    whatever was set before."""
    global _backend
    saved = _backend
    set_backend(name)
    try:
        yield
    finally:
        _backend = saved


def get_backend() -> str:
    if _backend is not None:
        return _backend
    name = os.environ.get("KERNELS", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise KernelsError(f"environment variable KERNELS={name!r} is not one of {', '.join(BACKENDS)}")
    return name


@functools.cache
def have_triton() -> bool:
    """True when `import triton` works (cached; a broken install counts as absent)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # noqa: BLE001 -- ImportError, or a triton whose driver lookup fails
        return False
    return True


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether a call on these tensors takes the Triton path."""
    backend = get_backend()
    if backend == "torch":
        return False
    if backend == "triton":
        if not have_triton():
            raise RuntimeError("KERNELS=triton but triton cannot be imported (pip install triton)")
        return True
    return all(t.is_cuda for t in tensors) and have_triton()


def accelerated(triton_name: str):
    """Decorator: run `kernels.triton_ops.<triton_name>` (same signature) in place of the
    decorated PyTorch function when use_triton(first argument) says so."""
    def wrap(reference):
        @functools.wraps(reference)
        def dispatch(*args, **kwargs):
            if triton_name not in _failed and use_triton(args[0]):
                from kernels import triton_ops  # lazy: triton is optional
                try:
                    return getattr(triton_ops, triton_name)(*args, **kwargs)
                except Exception as e:  # noqa: BLE001 -- any compile or launch failure
                    if get_backend() == "triton":  # asked for explicitly: no silent fallback
                        raise
                    _failed.add(triton_name)
                    warnings.warn(f"kernels: Triton {triton_name} failed ({type(e).__name__}: {e}); "
                                  f"using the PyTorch {reference.__name__} from now on", stacklevel=2)
            return reference(*args, **kwargs)
        dispatch.reference = reference
        return dispatch
    return wrap
