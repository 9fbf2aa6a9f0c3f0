"""The kernel backends by name: which implementation of ``base.Backend`` to run.

Each implementation module is imported only when its backend is asked for, so
a CPU-only process never loads the GPU sources, and no implementation imports
this registry (they import ``base``): the imports form no cycle. The
interface names are re-exported here for callers that pick and use a backend.
"""

from __future__ import annotations

import mlx.core as mx

from .base import Backend, BackendUnavailable, QTensor

BACKENDS = ("reference", "cpu", "metal", "cuda", "hip")

__all__ = ["BACKENDS", "Backend", "BackendUnavailable", "QTensor", "backend", "default_backend_name", "select"]


def default_backend_name() -> str:
    """The backend that matches MLX's default device."""
    if mx.default_device() == mx.cpu:
        return "cpu"
    if mx.metal.is_available():
        return "metal"
    if mx.cuda.is_available():
        return "cuda"
    return "cpu"


def backend(name: str = "auto") -> Backend:
    """The implementation called ``name`` (``auto``: the one for MLX's default device)."""
    if name == "auto":
        name = default_backend_name()
    if name == "reference":
        from .reference import ReferenceBackend
        return ReferenceBackend()
    if name == "cpu":
        from .cpu import CpuBackend
        return CpuBackend()
    if name == "metal":
        from .metal import MetalBackend
        return MetalBackend()
    if name in ("cuda", "hip"):
        from .cuda import CudaBackend, HipBackend
        return CudaBackend() if name == "cuda" else HipBackend()
    raise ValueError(f"unknown kernel backend {name!r}; choose auto or one of {', '.join(BACKENDS)}")


def select(name: str = "auto") -> Backend:
    """``backend(name)``, with MLX's default device switched to the one it runs on
    (``auto`` keeps MLX's default device: it is the one it follows)."""
    kernels = backend(name)
    if name != "auto":
        mx.set_default_device(kernels.device)
    return kernels
