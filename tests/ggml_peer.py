"""ggml's own quantizer and CPU kernels, from the shared libraries llama-cpp-python ships (an
optional dev peer).

``ggml_quantize_chunk`` is the C code behind llama.cpp's quantize tool. Calling it needs
llama-cpp-python; without it the caller's test skips with that reason.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from pathlib import Path

import numpy as np
import pytest

from magnetar.kernels import GGMLType, row_bytes


def _load(stem: str) -> ctypes.CDLL | None:
    """llama-cpp-python's library ``stem`` (libggml-base, libggml-cpu), or None."""
    try:
        import llama_cpp
    except ImportError:
        return None
    suffix = ".dylib" if sys.platform == "darwin" else ".so"
    found = sorted((Path(llama_cpp.__file__).parent / "lib").glob(f"{stem}*{suffix}*"))
    return ctypes.CDLL(str(found[0])) if found else None


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = _load("libggml-base")
    if lib is None:
        return None
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    return lib


@functools.cache
def _cpu_library() -> ctypes.CDLL | None:
    lib = _load("libggml-cpu")
    if lib is not None:
        lib.ggml_cpu_init()  # its lookup tables
    return lib


def ggml_cpu() -> ctypes.CDLL:
    """llama.cpp's CPU library (its ``ggml_vec_dot_*`` and ``quantize_row_*`` kernels), tables
    ready; the calling test skips without it."""
    lib = _cpu_library()
    if lib is None:
        pytest.skip("llama-cpp-python (and its libggml-cpu) is not installed (optional peer)")
    return lib


def require_ggml() -> None:
    """Skip the calling test unless ggml's library can be loaded."""
    if _library() is None:
        pytest.skip("llama-cpp-python (and its libggml-base) is not installed (optional peer)")


def ggml_quantize(x: np.ndarray, qtype: GGMLType, importance: np.ndarray | None) -> np.ndarray:
    """ggml's blocks for float32 rows ``x``: uint8 [rows, row_bytes]. ggml's IQ2_XXS asserts
    (aborting the process) without importance, so that combination is refused here."""
    require_ggml()
    if importance is None and qtype == GGMLType.IQ2_XXS:
        raise ValueError("ggml's IQ2_XXS needs importance")
    lib = _library()
    x = np.ascontiguousarray(x, np.float32)
    out = np.zeros((x.shape[0], row_bytes(qtype, x.shape[1])), np.uint8)
    imp = None if importance is None else np.ascontiguousarray(importance, np.float32)
    lib.ggml_quantize_init(int(qtype))  # builds the IQ2 grid tables once
    written = lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1],
                                      None if imp is None else imp.ctypes.data)
    assert written == out.size
    return out
