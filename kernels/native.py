"""A native C library for the CPU expert step, compiled at first use.

``native/experts.c`` holds f32 kernels on raw GGUF blocks (spec
quant-kernels.md §1-2.1): ``dequantize``, ``matmul`` (``x @ W.T``) and
``moe`` (the routed-expert step of ``backend.py``); ``native/q8k.c`` the
opt-in 8-bit activations of ``moe`` (``activations="q8k"``). This module builds them
with the system C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang``) as
``-O3 -march=native`` with OpenMP when the compiler has it, caches the
shared library under ``$MAGNETAR_HOME/cache/kernels`` (else
``$XDG_CACHE_HOME/magnetar/kernels``, else ``~/.cache/magnetar/kernels``),
named by a digest of the source, flags, compiler version and CPU, and loads
it with ctypes. Nothing here raises at import: without a compiler
``available()`` is False and ``unavailable_reason()`` says why.

The functions take and return numpy arrays (C-contiguous inputs, memmaps
included, are passed without a copy). Threads follow OpenMP's own settings
(``OMP_NUM_THREADS``); ctypes releases the GIL during a call.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Iterator

import numpy as np

from .formats import BLOCK, GGMLType, row_blocks

NATIVE_DIR = Path(__file__).resolve().parent / "native"
SOURCES = (NATIVE_DIR / "experts.c", NATIVE_DIR / "q2_tiles.c", NATIVE_DIR / "q8k.c")
HEADERS = (NATIVE_DIR / "blocks.h",)  # part of the build key: the sources include them
BASE_FLAGS = ("-std=c11", "-O3", "-ffp-contract=fast", "-fPIC", "-shared")
# Tried in order: the first that compiles is used (and its library cached).
FLAG_SETS = (("-march=native", "-fopenmp"), ("-march=native",), ())
SUPPORTED = (GGMLType.F32, GGMLType.F16, GGMLType.Q8_0, GGMLType.Q2_K, GGMLType.Q4_K, GGMLType.IQ2_XXS)
_ERRORS = {-1: "bad type or row size", -2: "bad shape", -3: "expert id out of range",
           -4: "out of memory", -5: "IQ2_XXS tables not initialised"}


class NativeBuildError(RuntimeError):
    """The C library could not be compiled or loaded (the message is one line)."""


def cache_dir() -> Path:
    """Where built libraries live (see the module doc)."""
    if os.environ.get("MAGNETAR_HOME"):
        return Path(os.environ["MAGNETAR_HOME"]).expanduser() / "cache" / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "magnetar" / "kernels"


def _compiler() -> str:
    if os.environ.get("CC"):
        return os.environ["CC"]
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return name
    raise NativeBuildError("no C compiler found (set CC, or install cc/gcc/clang)")


def _compiler_version(cc: str) -> str:
    try:
        run = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise NativeBuildError(f"C compiler {cc!r} cannot run: {exc}") from None
    if run.returncode:
        raise NativeBuildError(f"C compiler {cc!r} --version failed")
    return run.stdout


def cpu_id() -> str:
    """-march=native code only runs on a like CPU: key the cache on its model and flags."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features"))]
        return "".join(dict.fromkeys(lines))  # one copy per distinct line
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if "error" in ln.lower()] or [ln.strip() for ln in text.splitlines()]
    return (lines[0] if lines else "no output")[:300]


def build(directory: Path | str | None = None) -> Path:
    """The compiled library in ``directory`` (default ``cache_dir()``), built if missing.

    Builds go to a temporary file renamed into place, so concurrent builders
    never see a partial library. Raises NativeBuildError.
    """
    directory = Path(directory) if directory is not None else cache_dir()
    cc = _compiler()
    source = b"\0".join(path.read_bytes() for path in (*SOURCES, *HEADERS))
    key = source + b"\0".join(s.encode() for s in (cc, _compiler_version(cc), cpu_id(), platform.machine()))
    candidates = []
    for extra in FLAG_SETS:
        flags = BASE_FLAGS + extra
        digest = hashlib.sha256(key + " ".join(flags).encode()).hexdigest()[:16]
        candidates.append((flags, directory / f"experts-{digest}.so"))
    for _, path in candidates:
        if path.exists():
            return path
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise NativeBuildError(f"cannot create cache dir {directory}: {exc}") from None
    errors = []
    for flags, path in candidates:
        fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp", dir=directory)
        os.close(fd)
        try:
            run = subprocess.run([cc, *flags, "-o", tmp, *map(str, SOURCES), "-lm"], capture_output=True, text=True,
                                 timeout=300)
            if run.returncode == 0:
                os.replace(tmp, path)
                return path
            errors.append(f"{' '.join(flags)}: {_one_line(run.stderr)}")
        except (OSError, subprocess.SubprocessError) as exc:
            errors.append(f"{' '.join(flags)}: {exc}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise NativeBuildError(f"{cc} could not build {', '.join(path.name for path in SOURCES)}: {errors[-1]}")


def _bind(path: Path) -> ctypes.CDLL:
    from .reference import IQ2XXS_GRID, IQ2XXS_SIGNS

    lib = ctypes.CDLL(str(path))
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    signatures = {
        "mg_init": [p, p],
        "mg_dequantize": [p, i32, i64, i64, p],
        "mg_matmul": [p, i64, i64, p, i32, i64, i64, p],
        "mg_moe": [p, i64, i64, p, p, i64, i64, i64, p, i32, i64, p, i32, i64, p, i32, i64, f32, p, p, i64, i32],
        "mg_quantize_q8k": [p, i64, p],
        "mg_q8k_matmul": [p, i64, p, i32, i64, i64, p],
    }
    for name, args in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, ctypes.c_int
    grid = np.ascontiguousarray(IQ2XXS_GRID, np.uint8)
    signs = np.ascontiguousarray(IQ2XXS_SIGNS, np.uint8)
    if lib.mg_init(grid.ctypes.data, signs.ctypes.data):
        raise NativeBuildError("the IQ2_XXS grid does not fit the native table")
    return lib


_lock = threading.Lock()
_state: dict = {}  # "lib" or "reason", set once

# Between our calls OpenMP's idle threads spin (libgomp's default) on the core MLX
# needs next: `small` q2 decode took 180 ms/token vs ~105 with passive waiting (issue 16).
# libgomp reads its settings once, when it loads with our library, so they are set for
# that moment only: the user's own OMP_WAIT_POLICY / GOMP_SPINCOUNT win, and child
# processes (bench peers, shell tools) keep their defaults.
QUIET_OPENMP = {"OMP_WAIT_POLICY": "PASSIVE"}


@contextlib.contextmanager
def _quiet_openmp() -> Iterator[None]:
    if any(name in os.environ for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")):
        yield
        return
    os.environ.update(QUIET_OPENMP)
    try:
        yield
    finally:
        for name in QUIET_OPENMP:
            os.environ.pop(name, None)


def _lib() -> ctypes.CDLL | None:
    with _lock:
        if not _state:
            try:
                path = build()
                with _quiet_openmp():
                    _state["lib"], _state["path"] = _bind(path), path
            except (NativeBuildError, OSError) as exc:
                _state["reason"] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return _state.get("lib")


def available() -> bool:
    """Whether the library is built (building it now if needed) and loaded."""
    return _lib() is not None


def unavailable_reason() -> str:
    """Why ``available()`` is False, in one line ("" when it is True)."""
    return "" if _lib() is not None else _state["reason"]


def library_path() -> Path | None:
    """The loaded library's file, or None."""
    return _state.get("path") if _lib() is not None else None


def _need() -> ctypes.CDLL:
    lib = _lib()
    if lib is None:
        raise NativeBuildError(f"native kernels unavailable: {_state['reason']}")
    return lib


def _check(rc: int, what: str) -> None:
    if rc:
        raise ValueError(f"native {what}: {_ERRORS.get(rc, f'error {rc}')}")


def _qtype(ggml_type) -> GGMLType:
    qtype = GGMLType(int(ggml_type))  # ValueError for an unknown id
    if qtype not in SUPPORTED:
        raise ValueError(f"native kernels do not handle {qtype.name}")
    return qtype


def _c(a: np.ndarray, dtype) -> np.ndarray:
    """``a`` as C-contiguous ``dtype``, copied only when it is not; np.require's flag
    parsing cost more than the decode-sized C call it guards."""
    return a if a.dtype == dtype and a.flags.c_contiguous else np.ascontiguousarray(a, dtype)


def _raw(raw, ggml_type, ndim: int | None, what: str) -> tuple[np.ndarray, GGMLType, int]:
    """Raw rows as C-contiguous uint8 (no copy when already so), their type and column count."""
    raw = np.asarray(raw)
    if raw.dtype != np.uint8:
        raise ValueError(f"{what}: raw weights must be uint8 bytes, got {raw.dtype}")
    if ndim is not None and raw.ndim != ndim:
        raise ValueError(f"{what}: expected {ndim} dims [..., rows, row_bytes], got shape {raw.shape}")
    if raw.ndim == 0:
        raise ValueError(f"{what}: raw weights need a row axis")
    qtype, n_blocks = row_blocks(_qtype(ggml_type), raw.shape[-1])
    return _c(raw, np.uint8), qtype, n_blocks * BLOCK[qtype][0]


def _f32(a, ndim: int, what: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != ndim:
        raise ValueError(f"{what}: expected {ndim} dims, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"{what}: expected floats, got {a.dtype}")
    return _c(a, np.float32)


def dequantize(raw, ggml_type, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 rows ``[..., row_bytes]`` -> float32 ``[..., cols]``, bit-exact with ``reference``;
    written into ``out`` (C-contiguous float32 of that shape) when given."""
    raw, qtype, cols = _raw(raw, ggml_type, None, "dequantize")
    shape = (*raw.shape[:-1], cols)
    if out is None:
        out = np.empty(shape, np.float32)
    elif out.dtype != np.float32 or out.shape != shape or not out.flags.c_contiguous:
        raise ValueError(f"dequantize: out must be C-contiguous float32 {shape}")
    n_rows = int(np.prod(raw.shape[:-1], dtype=np.int64))
    if out.size:
        _check(_need().mg_dequantize(raw.ctypes.data, int(qtype), n_rows, raw.shape[-1], out.ctypes.data),
               "dequantize")
    return out


def matmul(x, raw, ggml_type) -> np.ndarray:
    """``x [T, cols] @ W.T`` for raw rows ``W [rows, row_bytes]``: float32 ``[T, rows]``."""
    raw, qtype, cols = _raw(raw, ggml_type, 2, "matmul")
    x = _f32(x, 2, "matmul x")
    if x.shape[1] != cols:
        raise ValueError(f"matmul: x has {x.shape[1]} columns, the {qtype.name} weight {cols}")
    y = np.empty((x.shape[0], raw.shape[0]), np.float32)
    if y.size:
        _check(_need().mg_matmul(x.ctypes.data, x.shape[0], cols, raw.ctypes.data, int(qtype), raw.shape[0],
                                 raw.shape[1], y.ctypes.data), "matmul")
    return y


PANEL_BYTES = 16 << 20  # f32 weight rows ``panel_matmul`` widens at a time: about the L3 share of a core pair
_panel = threading.local()  # each thread's reused panel buffer


def panel_matmul(x, raw, ggml_type, out: np.ndarray | None = None) -> np.ndarray:
    """``x [T, cols] @ W.T`` for raw rows ``W [rows, row_bytes]`` and many rows T: float32 ``[T, rows]``
    (into ``out``, which may be a column slice, when given).

    W is widened a panel of rows at a time (``mg_dequantize``, threaded) into one reused buffer
    and each panel goes through numpy's BLAS, so the f32 copy is never whole: Flash keeps tens
    of GB of Q8_0 dense weights as stored. ``matmul`` reads the codes instead, fast for a few
    rows but several times slower than BLAS for a prefill chunk."""
    raw, qtype, cols = _raw(raw, ggml_type, 2, "panel_matmul")
    x = _f32(x, 2, "panel_matmul x")
    if x.shape[1] != cols:
        raise ValueError(f"panel_matmul: x has {x.shape[1]} columns, the {qtype.name} weight {cols}")
    rows = raw.shape[0]
    if out is None:
        out = np.empty((x.shape[0], rows), np.float32)
    elif out.dtype != np.float32 or out.shape != (x.shape[0], rows) or out.strides[1] != 4:
        raise ValueError(f"panel_matmul: out must be float32 {(x.shape[0], rows)} with contiguous rows")
    step = max(1, PANEL_BYTES // (4 * cols))
    buf = getattr(_panel, "buf", None)
    if buf is None or buf.size < min(step, rows) * cols:
        buf = _panel.buf = np.empty(max(PANEL_BYTES // 4, cols), np.float32)
    for r0 in range(0, rows, step):
        n = min(step, rows - r0)
        w = dequantize(raw[r0:r0 + n], qtype, out=buf[:n * cols].reshape(n, cols))
        np.matmul(x, w.T, out=out[:, r0:r0 + n])
    return out


# mg_moe's activation modes: f32, or 8-bit (Q8_K) into the IQ2_XXS/Q2_K/Q4_K products, as
# ds4's and llama.cpp's CPU paths do (q8k.c; spec quant-kernels.md §2.1).
ACTIVATIONS = {"f32": 0, "q8k": 1}
Q8K_BLOCK_BYTES = 292  # f32 d, 256 int8 codes, 16 int16 sums


def activation_mode(activations: str) -> int:
    """mg_moe's code for an activation mode name (``f32`` or ``q8k``)."""
    if activations not in ACTIVATIONS:
        raise ValueError(f"expert activations must be one of {', '.join(ACTIVATIONS)}, got {activations!r}")
    return ACTIVATIONS[activations]


def quantize_q8k(x) -> np.ndarray:
    """Rows ``x [T, n]`` (n a multiple of 256) as the Q8_K blocks ``moe(activations="q8k")``
    dots with: uint8 ``[T, n / 256 * 292]``."""
    x = _f32(x, 2, "quantize_q8k x")
    if x.shape[1] % 256:
        raise ValueError(f"quantize_q8k: rows must be a multiple of 256 values, got {x.shape[1]}")
    out = np.empty((x.shape[0], x.shape[1] // 256 * Q8K_BLOCK_BYTES), np.uint8)
    _check(_need().mg_quantize_q8k(x.ctypes.data, x.size, out.ctypes.data), "quantize_q8k")
    return out


def q8k_matmul(x, raw, ggml_type) -> np.ndarray:
    """``y [T, rows] = x [T, cols] @ W.T`` with ``x`` quantized to Q8_K (``quantize_q8k``) and
    dotted in integers: the products of ``moe(activations="q8k")`` alone, for IQ2_XXS, Q2_K or
    Q4_K rows ``raw [rows, row_bytes]``."""
    x = _f32(x, 2, "q8k_matmul x")
    w, qtype, cols = _raw(raw, ggml_type, 2, "q8k_matmul weights")
    if x.shape[1] != cols:
        raise ValueError(f"q8k_matmul: x has {x.shape[1]} columns, the weight rows {cols}")
    blocks = quantize_q8k(x)
    y = np.empty((x.shape[0], w.shape[0]), np.float32)
    _check(_need().mg_q8k_matmul(blocks.ctypes.data, x.shape[0], w.ctypes.data, int(qtype), w.shape[0], w.shape[1],
                                 y.ctypes.data), "q8k_matmul")
    return y


def moe(x, ids, weights, gate, up, down, limit: float, slot_of=None, out=None, activations: str = "f32") -> np.ndarray:
    """The routed-expert step (see backend.py) for ``x [T, D]``, ``ids``/``weights [T, K]``;
    ``gate``/``up``/``down`` are ``(raw expert stack [E, rows, row_bytes], type)`` like ``reference.moe``.

    With ``slot_of`` (int [E]) they are banks ``[S, rows, row_bytes]`` of resident experts
    instead: expert ``e``'s weights are bank row ``slot_of[e]``, and ``-1`` leaves its pairs
    out. The sums then add onto ``out`` (float32 [T, D], zeros when None) and ``out`` is
    returned: a selection split into rounds by ascending expert id, each round's experts
    resident, gives exactly the bits of one call over the whole stack.

    ``activations="q8k"`` quantizes the activations of the IQ2_XXS, Q2_K and Q4_K products
    to 8 bits (``quantize_q8k``) and dots them in integers: ~1e-2 relative per output against
    f32 activations, several times faster at decode."""
    mode = activation_mode(activations)
    x = _f32(x, 2, "moe x")
    n_tokens, d_model = x.shape
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.shape[0] != n_tokens or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"moe: ids must be integers [T={n_tokens}, K], got {ids.dtype} {ids.shape}")
    weights = _f32(weights, 2, "moe weights")
    if weights.shape != ids.shape:
        raise ValueError(f"moe: weights {weights.shape} must match ids {ids.shape}")
    (g, gt, g_cols), (u, ut, u_cols), (d, dt, d_cols) = (
        _raw(m[0], m[1], 3, name) for m, name in ((gate, "moe gate"), (up, "moe up"), (down, "moe down")))
    n_slots, ffn = g.shape[0], g.shape[1]
    n_experts = n_slots if slot_of is None else len(slot_of)
    if g_cols != d_model or u_cols != d_model or u.shape[:2] != g.shape[:2]:
        raise ValueError(f"moe: gate {g.shape[:2]}x{g_cols} and up {u.shape[:2]}x{u_cols} must be "
                         f"[E, F] x D={d_model}")
    if d.shape[:2] != (n_slots, d_model) or d_cols != ffn:
        raise ValueError(f"moe: down must be [E={n_slots}, D={d_model}] x F={ffn}, got {d.shape[:2]}x{d_cols}")
    if ids.dtype != np.int32 and ids.size and (ids.min() < 0 or ids.max() >= n_experts):  # before a cast could wrap
        raise ValueError(f"moe: expert ids must be in [0, {n_experts}), got {ids.min()}..{ids.max()}")
    ids = _c(ids, np.int32)  # int32 ids are range-checked in C (the message is made below)
    slot_ptr = None
    if slot_of is not None:
        slot_of = _c(np.asarray(slot_of), np.int32)
        if slot_of.ndim != 1 or slot_of.size and (slot_of.min() < -1 or slot_of.max() >= n_slots):
            raise ValueError(f"moe: slot_of must be [E] bank rows in [-1, {n_slots}), got shape {slot_of.shape}")
        if out is None:
            out = np.zeros_like(x)
        elif out.dtype != np.float32 or out.shape != x.shape or not out.flags.c_contiguous:
            raise ValueError(f"moe: out must be C-contiguous float32 {x.shape}")
        slot_ptr = slot_of.ctypes.data
    else:
        out = np.empty_like(x)
    if x.size == 0:
        return np.zeros_like(x) if slot_of is None else out
    rc = _need().mg_moe(x.ctypes.data, n_tokens, d_model, ids.ctypes.data, weights.ctypes.data, ids.shape[1],
                        n_experts, ffn, g.ctypes.data, int(gt), g.shape[2], u.ctypes.data, int(ut), u.shape[2],
                        d.ctypes.data, int(dt), d.shape[2], float(limit), out.ctypes.data, slot_ptr, n_slots, mode)
    if rc == -3 and (ids.min() < 0 or ids.max() >= n_experts):
        raise ValueError(f"moe: expert ids must be in [0, {n_experts}), got {ids.min()}..{ids.max()}")
    _check(rc, "moe")
    return out


__all__ = ["ACTIVATIONS", "NativeBuildError", "activation_mode", "available", "build", "cache_dir", "cpu_id",
           "dequantize", "library_path", "matmul", "moe", "panel_matmul", "q8k_matmul", "quantize_q8k",
           "unavailable_reason"]
