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
# The activation modes: f32; q8k, the routed experts' activations as 8-bit Q8_K, summed in
# integers; q8, q8k and the decode-sized Q8_0 products' activations as Q8_0 too (llama.cpp's CPU
# arithmetic throughout). 8-bit modes run on the CPU backend only (cpu.ACTIVATION_MODES); the
# other backends run f32.
EXPERT_ACTIVATIONS = ("f32", "q8k", "q8")

__all__ = ["BACKENDS", "EXPERT_ACTIVATIONS", "Backend", "BackendUnavailable", "QTensor", "backend",
           "default_backend_name", "select"]


def default_backend_name() -> str:
    """The backend that matches MLX's default device."""
    if mx.default_device() == mx.cpu:
        return "cpu"
    if mx.metal.is_available():
        return "metal"
    if mx.cuda.is_available():
        return "cuda"
    return "cpu"


def backend(name: str = "auto", expert_activations: str | None = None) -> Backend:
    """The implementation called ``name`` (``auto``: the one for MLX's default device).
    ``expert_activations``: the CPU backend's mode (``CpuBackend``; None: its default); another
    backend has f32 only, and asking it for another mode raises rather than runs f32."""
    if name == "auto":
        name = default_backend_name()
    if name == "cpu":
        from .cpu import CpuBackend
        return CpuBackend(expert_activations=expert_activations)
    if expert_activations not in (None, "f32"):
        raise BackendUnavailable(f"{expert_activations} expert activations run on the cpu backend's native kernels; "
                                 f"the {name} backend has f32 only")
    if name == "reference":
        from .reference import ReferenceBackend
        return ReferenceBackend()
    if name == "metal":
        from .metal import MetalBackend
        return MetalBackend()
    if name in ("cuda", "hip"):
        from .cuda import CudaBackend, HipBackend
        return CudaBackend() if name == "cuda" else HipBackend()
    raise ValueError(f"unknown kernel backend {name!r}; choose auto or one of {', '.join(BACKENDS)}")


def select(name: str = "auto", expert_activations: str | None = None) -> Backend:
    """``backend(name, expert_activations)``, with MLX's default device switched to the one it
    runs on (``auto`` keeps MLX's default device: it is the one it follows)."""
    kernels = backend(name, expert_activations)
    if name != "auto":
        mx.set_default_device(kernels.device)
    return kernels
