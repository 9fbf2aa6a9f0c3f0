"""Run the CUDA kernel bodies of ``kernels/cuda`` on the CPU, one emulated
thread per CUDA thread, so their semantics can be tested without a GPU.

How: for each (kernel, template values) the backend launches, ``Emulator``
compiles with g++ the text ``prelude.h`` + ``kernels.cuda.header()`` + the
body wrapped by ``kernels.cuda.wrapped_kernel`` (the ``__global__`` signature
and ``constexpr`` templates MLX generates, inside ``namespace
mlx::core::cu``) into a shared library, and runs it over the launch grid.
``emulated_backend`` swaps ``kernels.cuda._run`` (the one place the backend
calls ``mx.fast.cuda_kernel``) for the emulator, so the real ``CudaBackend``
methods run unchanged: their input preparation, path choice (matvec or tiles,
decode or grouped MoE), launch geometry and the device-side expert tile map
(MLX ops, evaluated here on the CPU).

What is emulated (details in prelude.h):

* every CUDA thread as its own fiber, blocks one after another, threads of a
  block interleaved only at synchronisation points, in a seeded random order;
* ``__syncthreads()`` as a real barrier of the whole block;
* warp shuffles (``__shfl_down_sync``, HIP's ``__shfl_down``) and so
  ``mg_warp_sum``, with the chosen warp width: 32, or 64 with ``platform="hip"``,
  which compiles ``portable.cuh``'s HIP branch (``MG_WARP`` from
  ``__AMDGCN_WAVEFRONT_SIZE``) as hipcc would for a wave64 GPU;
* ``__shared__`` memory, one copy per block, poisoned (0xff bytes: NaN) before
  each block; ``__constant__`` tables; ``atomicAdd`` on floats;
* MLX's launch contract: grid counted in threads (blocks = ceil(grid /
  threadgroup)), outputs uninitialised (NaN here, so a missed write shows)
  unless ``init_value``, inputs made row-contiguous, each input's dtype equal
  to the C type the kernel declares;
* strictness a GPU does not give for free: a barrier or shuffle that not every
  thread of the block or warp reaches, a shuffle after lanes returned, or lanes
  shuffling with different offsets is an error, not a hang or silent garbage;
  misaligned loads and stores are caught (g++ ``-fsanitize=alignment``, with
  ``float4`` 16-byte aligned); bytes just before and after every buffer are
  guards that reads see as 0xff (NaN) and that writes must leave untouched.

What this does NOT prove:

* anything about timing, occupancy, register or shared-memory limits, memory
  coalescing or bank conflicts;
* that NVRTC, nvcc or hipcc accept the source, or that MLX wraps it exactly as
  ``wrapped_kernel`` imitates (tests/test_kernels_cuda.py compile-checks what it
  can; the emulator uses g++ with GPU keywords defined away);
* device arithmetic: CPU ``expf`` is not CUDA's (both within a few ulp), and
  nvcc contracts ``a * b + c`` into FMA where this build does not, unless
  ``contract=True`` (``-ffp-contract=fast``, the only way to see g++ make
  that choice, and not necessarily where nvcc would);
* alignment faults for buffers laid out otherwise than here (256-byte aligned
  starts, as MLX's CUDA allocator gives for all but tiny arrays), reads far
  outside a buffer (they see whatever the process has there);
* freedom from data races: threads of a block only interleave at barriers and
  shuffles, so a missing ``__syncthreads()`` or a racy shared-memory pattern
  shows up only if this scheduler's order happens to expose it, and
  ``atomicAdd`` is atomic by construction.

Compiled libraries are cached by a digest of their source and compiler flags
in ``build_dir`` (the tests use pytest's cache directory).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from magnetar.kernels import cuda

PRELUDE = Path(__file__).with_name("prelude.h")
CXX = os.environ.get("CXX") or shutil.which("g++")
GUARD = 256  # bytes of guard before and after every buffer
ALIGN = 256  # buffer starts (cudaMalloc/cudaMallocManaged give at least this)
_DTYPES = {"uint8_t": np.dtype(np.uint8), "int32_t": np.dtype(np.int32), "float": np.dtype(np.float32)}
_GUARD_BYTE = 0xFF


class EmulatorError(RuntimeError):
    """A kernel did something the emulator checks for (see the module doc)."""


@dataclass(frozen=True)
class Launch:
    kernel: str
    template: dict
    geometry: cuda.Geometry


def host_has_fma() -> bool:
    try:
        return " fma " in Path("/proc/cpuinfo").read_text().replace("\n", " ")
    except OSError:
        return False


class _Buffer:
    """An array inside guard bytes, its start ALIGN-byte aligned."""

    def __init__(self, array: np.ndarray, guard_byte: int = _GUARD_BYTE):
        nbytes = array.nbytes
        self._raw = np.full(nbytes + 2 * GUARD + ALIGN, guard_byte, np.uint8)
        start = GUARD + (-(self._raw.ctypes.data + GUARD)) % ALIGN
        self._span = (start, start + nbytes)
        self.array = self._raw[start:start + nbytes].view(array.dtype).reshape(array.shape)
        self.array[...] = array
        self.guard_byte = guard_byte

    @property
    def pointer(self) -> int:
        return self.array.ctypes.data

    def guards_intact(self) -> bool:
        start, stop = self._span
        return bool((self._raw[start - GUARD:start] == self.guard_byte).all()
                    and (self._raw[stop:stop + GUARD] == self.guard_byte).all())


class Emulator:
    """Compiles and runs ``kernels/cuda`` bodies on the CPU (see the module doc).

    ``platform``: ``"cuda"`` (warp 32) or ``"hip"`` (portable.cuh's HIP
    branch, ``warp`` 32 or 64). ``contract``: let g++ fuse multiply-adds as
    nvcc does by default. ``seed``: the scheduler's interleaving.
    """

    def __init__(self, build_dir: Path, platform: str = "cuda", warp: int = 32, contract: bool = False,
                 seed: int = 0):
        if platform not in ("cuda", "hip") or (platform == "cuda" and warp != 32) or warp not in (32, 64):
            raise ValueError(f"unsupported platform/warp: {platform}/{warp}")
        if CXX is None:
            raise EmulatorError("no C++ compiler (g++) found")
        self.build_dir = Path(build_dir)
        self.build_dir.mkdir(parents=True, exist_ok=True)
        self.platform, self.warp, self.seed = platform, warp, seed
        # Hidden visibility: each library keeps its own emulator state and
        # inline functions (no process-wide unique symbols shared between
        # libraries built with other warp widths or flags).
        self.flags = ["-std=c++17", "-O2" if contract else "-O1", "-fPIC", "-fvisibility=hidden",
                      "-U_FORTIFY_SOURCE", "-Wno-unknown-pragmas",
                      "-fsanitize=alignment", f"-ffp-contract={'fast' if contract else 'off'}"]
        if host_has_fma():
            self.flags.append("-mfma")  # only speeds up fmaf(); rounding is the same either way
        self.kernels = dict(cuda.KERNELS)  # name -> KernelSpec; a test may add its own
        self.launches: list[Launch] = []
        self._libraries: dict[str, tuple[ctypes.CDLL, Path]] = {}

    # -- building -------------------------------------------------------------

    def source(self, name: str, template: dict[str, int]) -> str:
        """The C++ translation unit of one kernel instance."""
        spec = self.kernels[name]
        fn = cuda.kernel_function_name(spec, template)
        casts = [f"(const {ctype}*)a[{i}]" for i, (_, ctype) in enumerate(spec.inputs)]
        casts += [f"(float*)a[{len(spec.inputs) + i}]" for i in range(len(spec.outputs))]
        return "".join([
            f"#define EMU_WARP {self.warp}\n#define EMU_HIP {int(self.platform == 'hip')}\n",
            PRELUDE.read_text(), "\n", cuda.header(), "\n",
            'static_assert(MG_WARP == EMU_WARP, "portable.cuh picked another warp width");\n\n',
            "namespace mlx::core::cu {\n\n", cuda.wrapped_kernel(spec, template), "\n}  // namespace mlx::core::cu\n\n",
            "static void emu_body(void** a) {\n",
            f"  mlx::core::cu::{fn}(\n      " + ",\n      ".join(casts) + ");\n}\n\n",
            'extern "C" EMU_EXPORT int emu_launch(const unsigned* grid, const unsigned* block, unsigned long long seed, void** a) {\n',
            "  return emu::launch(grid, block, seed, emu_body, a);\n}\n",
            'extern "C" EMU_EXPORT const char* emu_error() { return emu::error.c_str(); }\n',
        ])

    def library(self, name: str, template: dict[str, int]) -> tuple[ctypes.CDLL, Path]:
        """The compiled instance and its C++ source (cached; safe for concurrent test runs)."""
        src = self.source(name, template)
        digest = hashlib.sha256("\0".join([src, CXX, *self.flags]).encode()).hexdigest()[:16]
        if digest in self._libraries:
            return self._libraries[digest]
        stem = self.build_dir / f"{cuda.kernel_function_name(self.kernels[name], template)}_{digest}"
        so, cpp = stem.with_suffix(".so"), stem.with_suffix(".cpp")
        if not so.exists():
            mine = f".{os.getpid()}"
            tmp_cpp, obj, tmp = (stem.with_suffix(mine + ext) for ext in (".cpp", ".o", ".so"))
            tmp_cpp.write_text(src)
            stubs = self.build_dir / "hip_stubs" / "hip"  # portable.cuh's HIP #includes
            stubs.mkdir(parents=True, exist_ok=True)
            for header in ("hip_runtime.h", "hip_fp16.h"):
                (stubs / header).write_text("// empty: tests/cuda_emulator/prelude.h provides what is used\n")
            for cmd in ([CXX, *self.flags, f"-I{stubs.parent}", "-c", str(tmp_cpp), "-o", str(obj)],
                        [CXX, "-shared", str(obj), "-o", str(tmp)]):  # no sanitizer runtime: prelude.h handles it
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode:
                    raise EmulatorError(f"{' '.join(cmd)} failed:\n{done.stderr[-6000:]}")
            obj.unlink()
            os.replace(tmp_cpp, cpp)
            os.replace(tmp, so)
        lib = ctypes.CDLL(str(so))
        lib.emu_launch.argtypes = [ctypes.POINTER(ctypes.c_uint)] * 2 + [ctypes.c_ulonglong,
                                                                          ctypes.POINTER(ctypes.c_void_p)]
        lib.emu_error.restype = ctypes.c_char_p
        self._libraries[digest] = lib, cpp
        return lib, cpp

    # -- running --------------------------------------------------------------

    def launch(self, name: str, inputs: list, output_shapes: list, geometry: cuda.Geometry,
               template: dict[str, int], init_value: float | None = None) -> list[np.ndarray]:
        """One kernel launch with ``mx.fast.cuda_kernel``'s arguments; numpy outputs."""
        spec = self.kernels[name]
        template = {t: int(template[t]) for t in spec.templates}
        if len(inputs) != len(spec.inputs) or len(output_shapes) != len(spec.outputs):
            raise EmulatorError(f"{name}: {len(inputs)} inputs, {len(output_shapes)} outputs for {spec}")
        buffers = []
        for (param, ctype), x in zip(spec.inputs, inputs):
            a = np.ascontiguousarray(np.asarray(x))  # ensure_row_contiguous
            if a.dtype != _DTYPES[ctype]:
                raise EmulatorError(f"{name}: input {param} is {a.dtype}; the kernel reads const {ctype}*")
            buffers.append(_Buffer(a))
        fill = np.nan if init_value is None else init_value
        outputs = [_Buffer(np.full(shape, fill, np.float32), guard_byte=0xA5) for shape in output_shapes]
        (gx, gy, gz), (tx, ty, tz) = geometry
        grid = (ctypes.c_uint * 3)(*(-(-g // t) for g, t in zip((gx, gy, gz), (tx, ty, tz))))
        block = (ctypes.c_uint * 3)(tx, ty, tz)
        pointers = (ctypes.c_void_p * (len(buffers) + len(outputs)))(*[b.pointer for b in buffers + outputs])
        lib, cpp = self.library(name, template)
        self.launches.append(Launch(name, template, geometry))
        if lib.emu_launch(grid, block, self.seed, pointers):
            raise EmulatorError(f"{name} {template}: {lib.emu_error().decode()} [generated source: {cpp}]")
        for (param, _), b in zip([*spec.inputs, *((o, "float") for o in spec.outputs)], buffers + outputs):
            if not b.guards_intact():
                raise EmulatorError(f"{name} {template}: a write outside buffer {param}")
        return [o.array.copy() for o in outputs]

    def run(self, name, inputs, shapes, geometry, template, init_value=None) -> list[mx.array]:
        """Drop-in for ``kernels.cuda._run``."""
        return [mx.array(o) for o in self.launch(name, inputs, shapes, geometry, template, init_value)]


@contextmanager
def emulated_backend(emulator: Emulator):
    """A ``CudaBackend`` whose kernel launches run in ``emulator``.

    The constructor (which wants MLX's CUDA device) is skipped; for a warp
    other than 32 the warp-per-rows launches use
    ``warp_rows_geometry(..., warp=emulator.warp)``, as a HIP wave64 build would
    have to.
    """
    saved = cuda._run, cuda.warp_rows_geometry
    cuda._run = emulator.run
    if emulator.warp != cuda.WARP:
        cuda.warp_rows_geometry = functools.partial(saved[1], warp=emulator.warp)
    try:
        yield object.__new__(cuda.CudaBackend)
    finally:
        cuda._run, cuda.warp_rows_geometry = saved
