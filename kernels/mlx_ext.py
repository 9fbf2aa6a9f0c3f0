"""MLX primitives with CPU kernels (``native/mlx_ops.cpp``), compiled at first use.

On the CPU every MLX graph node costs ~3 µs of dispatch (docs/spec/peer-overhead.md),
and the hyper-connection input step is ~100 nodes of MLX ops (the output step 5),
twice per layer; one token's attention after its projections is 105-255 more
(``native/mlx_attention.cpp``). As primitives of their own (C++ ``mlx::core::Primitive`` with
``eval_cpu``) each is one node, and they stay inside the compiled decode graph, so
the graph is not cut for them.

MLX has no Python API for CPU kernels, so this builds a small Python extension the
way MLX's extension docs do, without CMake: the system C++ compiler (``$CXX``, else
``c++``, ``g++`` or ``clang++``), C++20 (MLX's headers need it), the MLX wheel's
headers and ``libmlx`` (``mlx/include``, ``mlx/lib``), and nanobind's sources compiled
in (``nb_combined.cpp``). The extension takes and returns ``mx.array`` only because it
joins MLX's own nanobind registry: the same nanobind ABI (internals version, compiler
family, C++ library) and MLX's domain (``NB_DOMAIN=mlx``). The library is cached like
``native``'s (``native.cache_dir()``), named by a digest of the sources and their shared
header (``native/mlx_common.h``), the flags, the compiler, the CPU and the MLX, nanobind
and Python versions, and probed once after loading: if MLX's arrays do not pass (an
MLX built with another nanobind ABI), ``available()`` is False and
``unavailable_reason()`` says so; the CPU backend then keeps the MLX ops. Nothing here
raises at import.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path
from types import ModuleType

import mlx.core as mx

from . import native
from .attention_decode import DecodeShape, DecodeStep
from .base import QTensor
from .formats import GGMLType
from .hyper import HcParams
from .native import cache_dir, cpu_id

NATIVE_DIR = Path(__file__).resolve().parent / "native"
_STORED = {GGMLType.Q8_0: "q8_0", GGMLType.F16: "f16"}  # the encodings the codes products read as stored
# mlx_ops.cpp holds the module; each other file adds its primitives through a
# register_* function that mlx_ops.cpp declares and calls.
SOURCES = (NATIVE_DIR / "mlx_ops.cpp", NATIVE_DIR / "mlx_q8.cpp", NATIVE_DIR / "mlx_attention.cpp",
           NATIVE_DIR / "mlx_moe.cpp")
# What every source includes (found beside it by #include "..."): part of the build key like the sources.
HEADERS = (NATIVE_DIR / "mlx_common.h",)
MODULE = "_magnetar_mlx_ops"  # the name NB_MODULE gives the extension
NB_DOMAIN = "mlx"  # the nanobind domain MLX registers its types in
BASE_FLAGS = ("-std=c++20", "-O2", "-fPIC", "-shared", "-fvisibility=hidden", "-fno-strict-aliasing",
              "-ffp-contract=fast", "-DNDEBUG", "-DNB_COMPACT_ASSERTIONS", f"-DNB_DOMAIN={NB_DOMAIN}")
FLAG_SETS = (("-march=native",), ())  # tried in order; the first that compiles is cached


class MlxExtBuildError(RuntimeError):
    """The extension could not be built, loaded or used with this MLX (one-line message)."""


def _compiler() -> str:
    if os.environ.get("CXX"):
        return os.environ["CXX"]
    for name in ("c++", "g++", "clang++"):
        if shutil.which(name):
            return name
    raise MlxExtBuildError("no C++ compiler found (set CXX, or install g++/clang++)")


def _run(cmd: list[str], what: str, timeout: int = 600) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as exc:
        raise MlxExtBuildError(f"{what}: {exc}") from None


def _nanobind() -> ModuleType:
    try:
        import nanobind
    except ImportError:
        raise MlxExtBuildError("nanobind is not installed (pip install nanobind)") from None
    return nanobind


def _paths() -> dict[str, Path]:
    """Headers and libraries the build needs, checked to exist."""
    nanobind = _nanobind()
    mlx_dir = Path(mx.__file__).resolve().parent
    nb_dir = Path(nanobind.include_dir()).parent
    paths = {"python": Path(sysconfig.get_paths()["include"]), "nanobind": nb_dir / "include",
             "robin_map": nb_dir / "ext" / "robin_map" / "include", "nb_source": nb_dir / "src" / "nb_combined.cpp",
             "mlx_include": mlx_dir / "include", "mlx_lib": mlx_dir / "lib"}
    if not (paths["python"] / "Python.h").exists():
        raise MlxExtBuildError(f"Python headers not found in {paths['python']} (install python3-dev)")
    for name, path in paths.items():
        if not path.exists():
            raise MlxExtBuildError(f"{path} is missing ({name}): an MLX wheel without headers, or a partial nanobind")
    return paths


def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if "error" in ln.lower()] or [ln.strip() for ln in text.splitlines()]
    return (lines[0] if lines else "no output")[:300]


def build(directory: Path | str | None = None) -> Path:
    """The compiled extension in ``directory`` (default ``native.cache_dir()``), built if
    missing; written to a temporary file and renamed into place. Raises MlxExtBuildError."""
    directory = Path(directory) if directory is not None else cache_dir()
    cxx, paths = _compiler(), _paths()
    version = _run([cxx, "--version"], f"C++ compiler {cxx!r} cannot run")
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    key = "\0".join([*(source.read_text() for source in (*SOURCES, *HEADERS)), cxx, version.stdout, cpu_id(),
                     mx.__version__, _nanobind().__version__, sys.version, suffix])
    includes = [f"-I{paths[k]}" for k in ("python", "nanobind", "robin_map", "mlx_include")]
    link = [f"-L{paths['mlx_lib']}", "-lmlx", f"-Wl,-rpath,{paths['mlx_lib']}"]
    if sys.platform == "darwin":
        link += ["-undefined", "dynamic_lookup"]  # Python's symbols come from the interpreter
    candidates = []
    for extra in FLAG_SETS:
        flags = [*BASE_FLAGS, *extra]
        digest = hashlib.sha256((key + " ".join(flags)).encode()).hexdigest()[:16]
        candidates.append((flags, directory / f"mlx_ops-{digest}{suffix}"))
    for _, path in candidates:
        if path.exists():
            return path
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MlxExtBuildError(f"cannot create cache dir {directory}: {exc}") from None
    errors = []
    for flags, path in candidates:
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=directory)
        os.close(fd)
        try:
            run = _run([cxx, *flags, *includes, "-o", tmp, *map(str, SOURCES), str(paths["nb_source"]), *link],
                       f"{cxx} could not run")
            if run.returncode == 0:
                os.replace(tmp, path)
                return path
            errors.append(f"{' '.join(flags)}: {_one_line(run.stderr)}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise MlxExtBuildError(f"{cxx} could not build {', '.join(source.name for source in SOURCES)}: {errors[-1]}")


def _load(path: Path) -> ModuleType:
    """Import the extension and check that MLX's arrays pass through it."""
    spec = importlib.util.spec_from_file_location(MODULE, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as exc:
        raise MlxExtBuildError(f"cannot load {path.name}: {exc}") from None
    with mx.stream(mx.cpu):
        probe = (mx.ones((1, 1, 32)), mx.ones((3, 32)), mx.ones((3,)), mx.zeros((3,)))
        try:
            out = module.hc_pre(*probe, 1e-6, 1e-6, 2)
        except TypeError:
            raise MlxExtBuildError(f"nanobind {_nanobind().__version__} does not share MLX {mx.__version__}'s array "
                                   "type (MLX was built with another nanobind ABI)") from None
        mx.eval(out)
    return module


_lock = threading.Lock()
_state: dict = {}  # "module" and "path", or "reason"; set once


def _module() -> ModuleType | None:
    with _lock:
        if not _state:
            try:
                path = build()
                _state["module"], _state["path"] = _load(path), path
            except (MlxExtBuildError, OSError) as exc:
                _state["reason"] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return _state.get("module")


def available() -> bool:
    """Whether the extension is built (building it now if needed), loaded and usable."""
    return _module() is not None


def unavailable_reason() -> str:
    """Why ``available()`` is False, in one line ("" when it is True)."""
    return "" if _module() is not None else _state["reason"]


def library_path() -> Path | None:
    return _state.get("path") if _module() is not None else None


def _need() -> ModuleType:
    module = _module()
    if module is None:
        raise MlxExtBuildError(f"MLX CPU extension unavailable: {_state['reason']}")
    return module


def hc_pre(X: mx.array, fn: mx.array, scale: mx.array, base: mx.array, params: HcParams,
           norm: mx.array | None = None) -> tuple[mx.array, mx.array, mx.array]:
    """``hyper.hc_pre`` as one CPU node; ``fn`` is the mix matrix as stored (f32, f16 or bf16).
    With ``norm`` (float32 [D]) x_in leaves as ``rowops.rmsnorm(x_in, norm, params.rms_eps)``."""
    return _need().hc_pre(X, fn, scale, base, params.rms_eps, params.hc_eps, params.sinkhorn_iters, norm)


def hc_post(y: mx.array, X: mx.array, post: mx.array, comb: mx.array) -> mx.array:
    """``hyper.hc_post`` as one CPU node (float32 inputs)."""
    return _need().hc_post(y, X, post, comb)


def route(logits: mx.array, k: int, bias: mx.array | None, chosen: mx.array | None, norm: bool, scale: float,
          floor: float) -> tuple[mx.array, mx.array]:
    """``Backend.route`` as one CPU node: float32 logits [T, E] and a float32 ``bias`` [E]
    (the ids chosen here, larger score first) or int32 ``chosen`` ids [T, k]."""
    return _need().route(logits, k, bias, chosen, norm, scale, floor)


def codes_matmuls(x: mx.array, ws: list[QTensor], activations: str = "f32") -> list[mx.array]:
    """``[x @ W.T for W in ws]`` as one CPU node, each matrix Q8_0 or F16 as stored: each output
    is ``q8_matmul`` / ``f16_matmul``'s (``activations`` as ``q8_matmul`` takes them)."""
    return _need().codes_matmuls(x.astype(mx.float32), [w.data for w in ws], [_STORED[w.ggml_type] for w in ws],
                                 activations)


def swiglu_ffn(x: mx.array, gate: QTensor, up: QTensor, down: QTensor, limit: float,
               plus: mx.array | None = None, activations: str = "f32") -> mx.array:
    """``Backend.swiglu_ffn`` as one CPU node on float32 ``x [T, D]``, each matrix Q8_0 or F16 as
    stored (``native/mlx_q8.cpp``): the products' bits are ``q8_matmul`` / ``f16_matmul``'s with
    the same ``activations`` (the mids go into ``down`` as they go into a ``q8_matmul``);
    ``plus`` [T, D] is added to the output."""
    args = [arg for m in (gate, up, down) for arg in (m.data, _STORED[m.ggml_type])]
    return _need().swiglu_ffn(x.astype(mx.float32), *args, float(limit),
                              None if plus is None else plus.astype(mx.float32), activations)


def rms_norm(x: mx.array, w: mx.array, eps: float) -> mx.array:
    """``rowops.rmsnorm`` of float32 rows ``x [T, D]`` with ``w [D]`` as one CPU node."""
    return _need().rms_norm(x, w, eps)


def norm_rope(x: mx.array, cos: mx.array, sin: mx.array, eps: float | None = None, weight: mx.array | None = None,
              sign: float = 1.0) -> mx.array:
    """``rowops.rope(rms(x) or rmsnorm(x, weight) or x, cos, sign * sin)`` over rows of x [T, heads, n]
    or [T, n] with cos, sin [T, half], as one node (the same bits)."""
    return _need().norm_rope(x, cos, sin, eps, weight, sign)


def pool_windows(kv: mx.array, sc: mx.array, n: int, ratio: int, dim: int) -> mx.array:
    """``attention_decode.pool_windows`` as one CPU node, with the MLX ops' bits."""
    if n == 0:
        return mx.zeros((0, dim), mx.float32)
    return _need().pool_windows(kv.astype(mx.float32), sc.astype(mx.float32), n, ratio, dim)


def attention_decode(step: DecodeStep, shape: DecodeShape) -> tuple[mx.array, list[mx.array]]:
    """``attention_decode.attention_decode`` as one CPU node (``native/mlx_attention.cpp``)."""
    f32 = [a.astype(mx.float32) for a in (step.q, step.kv, step.kv_norm, step.sinks, step.inv_freq, step.raw)]
    ins = [step.p.astype(mx.int32), *f32]
    for c in (step.comp, step.index):
        if c is not None:
            ins += [a.astype(mx.float32) for a in (c.kv, c.gate, c.ape, c.norm, c.rows, c.f_kv, c.f_sc)]
    if step.index_q is not None:
        ins += [step.index_q.astype(mx.float32), step.index_w.astype(mx.float32)]
    r = shape.rounding
    o, *states = _need().attention_decode(ins, shape.n_head, shape.head_dim, shape.window, shape.ratio, shape.eps,
                                          r.official, r.nope, shape.indexer_heads, shape.indexer_dim, shape.top_k)
    return o, states


def q8_matmul(x: mx.array, blocks: mx.array, groups: int = 1, activations: str = "f32") -> mx.array:
    """``x @ W.T`` for a Q8_0 matrix ``W`` as stored (uint8 ``[rows, cols / 32 * 34]``), as one CPU
    node that reads the codes (``native/mlx_q8.cpp``). With ``groups`` G, ``x`` is ``[T, G * cols]``
    and group g's ``rows / G`` rows multiply its g-th slice. ``activations``: ``f32`` keeps ``x``
    in float32; ``q8_0`` rounds it to Q8_0 first (``reference.quantize_q8_0``) and sums each
    block's code pairs in integers, llama.cpp's CPU arithmetic (``reference.matmul_q8_0``)."""
    return _need().q8_matmul(x.astype(mx.float32), blocks, groups, activations)


def f16_matmul(x: mx.array, w: mx.array, groups: int = 1) -> mx.array:
    """``q8_matmul`` for an F16 matrix ``W`` as stored: float16 ``[rows, cols]``, or its bytes
    as uint8 ``[rows, 2 * cols]``; the values are widened in registers as they are read."""
    return _need().f16_matmul(x.astype(mx.float32), w, groups)


def routed_experts(x: mx.array, ids: mx.array, weights: mx.array, gate: QTensor, up: QTensor, down: QTensor,
                   limit: float, activations: str = "f32") -> mx.array:
    """The routed-expert step (``Backend.moe``) as one CPU node that runs the native expert
    library's own kernel (``native/mlx_moe.cpp``): the same bits as ``native.moe`` with the
    same ``activations``."""
    mode = native.activation_mode(activations)
    module = _need()
    with _lock:
        if "experts" not in _state:
            module.bind_experts(str(native.library_path()))
            _state["experts"] = True
    stacks = [arg for m in (gate, up, down) for arg in (m.data, int(m.ggml_type))]
    return module.routed_experts(x.astype(mx.float32), ids.astype(mx.int32), weights.astype(mx.float32), *stacks,
                                 float(limit), mode)


__all__ = ["MlxExtBuildError", "attention_decode", "available", "build", "f16_matmul", "hc_post", "hc_pre",
           "library_path", "q8_matmul", "routed_experts", "unavailable_reason"]
