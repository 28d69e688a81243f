"""The one switch of kernels/: Triton kernels on CUDA tensors, the PyTorch reference elsewhere.

    KERNELS=auto    (default) Triton when triton imports and every tensor is on CUDA, else PyTorch
    KERNELS=triton  always the fast path (on CPU tensors only under TRITON_INTERPRET=1: tests)
    KERNELS=torch   always the PyTorch reference (to compare, or to rule the kernels out)

`set_backend(name)` overrides the environment variable; `set_backend(None)` goes back to it;
`with backend(name):` does so for a block.
triton is optional: it is imported only when a Triton path is actually taken, so CPU-only
installs (requirements.txt has no triton) import kernels/ fine.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch

BACKENDS = ("auto", "triton", "torch")
_backend: str | None = None  # None: read KERNELS from the environment


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
        raise ValueError(f"environment variable KERNELS={name!r} is not one of {', '.join(BACKENDS)}")
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
    """Whether a call on these tensors takes the fast (Triton / fused) path."""
    backend = get_backend()
    if backend == "torch":
        return False
    if backend == "triton":
        if not have_triton():
            raise RuntimeError("KERNELS=triton but triton cannot be imported (pip install triton)")
        return True
    return all(t.is_cuda for t in tensors) and have_triton()
