"""Run the CUDA kernel bodies of ``kernels/cuda`` on the CPU, one emulated
thread per CUDA thread, so their semantics can be tested without a GPU.

How: for each (kernel, template values) the backend launches, ``Emulator``
compiles with g++ the text ``fibers.h`` (the fiber runtime this emulator
shares with tests/metal_emulator) + ``prelude.h`` + ``kernels.cuda.header()``
+ the body wrapped by ``kernels.cuda.wrapped_kernel`` (the ``__global__``
signature and ``constexpr`` templates MLX generates, inside ``namespace
mlx::core::cu``) into a shared library, and runs it over the launch grid.
``emulated_backend`` swaps ``kernels.cuda._run`` (the one place the backend
calls ``mx.fast.cuda_kernel``) for the emulator, so the real ``CudaBackend``
methods run unchanged: their input preparation, path choice (matvec or tiles,
decode or grouped MoE), launch geometry and the device-side expert tile map
(MLX ops, evaluated here on the CPU).

What is emulated (details in fibers.h and prelude.h):

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
  thread of the block or warp reaches, a shuffle after lanes returned, or
  threads meeting at barriers or shuffles on different lines or with
  different offsets is an error, not a hang or silent garbage; misaligned
  loads and stores are caught (g++ ``-fsanitize=alignment``, with ``float4``
  16-byte aligned); bytes just before and after every buffer are guards that
  reads see as 0xff (NaN) and that writes must leave untouched, and beyond
  them lie inaccessible pages: an access further out is reported as a memory
  fault.

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
  starts, as MLX's CUDA allocator gives for all but tiny arrays); an access
  outside a buffer that lands in another buffer or object of this process
  (beyond an inaccessible page) rather than a guard;
* freedom from data races: threads of a block only interleave at barriers and
  shuffles, so a missing ``__syncthreads()`` or a racy shared-memory pattern
  shows up only if this scheduler's order happens to expose it, and
  ``atomicAdd`` is atomic by construction.

Compiled libraries are cached by a digest of their source and compiler flags
in ``build_dir`` (the tests use pytest's cache directory).
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from magnetar.kernels import cuda
from gpu_emulator.harness import (CXX, FIBERS, OUTPUT_GUARD_BYTE, Buffer, EmulatorError, build, call,
                                   compiler_flags, host_has_fma)

__all__ = ["CXX", "Emulator", "EmulatorError", "Launch", "emulated_backend", "host_has_fma"]  # what tests import

PRELUDE = Path(__file__).with_name("prelude.h")
ALIGN = 256  # buffer starts (cudaMalloc/cudaMallocManaged give at least this)
_DTYPES = {"uint8_t": np.dtype(np.uint8), "int32_t": np.dtype(np.int32), "float": np.dtype(np.float32)}


@dataclass(frozen=True)
class Launch:
    kernel: str
    template: dict
    geometry: cuda.Geometry


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
        self.flags = compiler_flags(contract)
        self._stubs = self.build_dir / "hip_stubs"  # portable.cuh's HIP #includes
        (self._stubs / "hip").mkdir(parents=True, exist_ok=True)
        for header in ("hip_runtime.h", "hip_fp16.h"):
            (self._stubs / "hip" / header).write_text("// empty: tests/cuda_emulator/prelude.h provides what is used\n")
        self.kernels = dict(cuda.KERNELS)  # name -> KernelSpec; a test may add its own
        self.launches: list[Launch] = []

    # -- building -------------------------------------------------------------

    def source(self, name: str, template: dict[str, int]) -> str:
        """The C++ translation unit of one kernel instance."""
        spec = self.kernels[name]
        fn = cuda.kernel_function_name(spec, template)
        casts = [f"(const {ctype}*)a[{i}]" for i, (_, ctype) in enumerate(spec.inputs)]
        casts += [f"(float*)a[{len(spec.inputs) + i}]" for i in range(len(spec.outputs))]
        return "".join([
            f"#define EMU_WARP {self.warp}\n#define EMU_HIP {int(self.platform == 'hip')}\n",
            '#define EMU_GROUP "block"\n#define EMU_BARRIER "__syncthreads()"\n#define EMU_WARP_NAME "warp"\n',
            FIBERS.read_text(), "\n", PRELUDE.read_text(), "\n", cuda.header(), "\n",
            'static_assert(MG_WARP == EMU_WARP, "portable.cuh picked another warp width");\n\n',
            "namespace mlx::core::cu {\n\n", cuda.wrapped_kernel(spec, template), "\n}  // namespace mlx::core::cu\n\n",
            "static void emu_body(void** a) {\n",
            f"  mlx::core::cu::{fn}(\n      " + ",\n      ".join(casts) + ");\n}\n\n",
            'extern "C" EMU_EXPORT int emu_launch(const unsigned* grid, const unsigned* block, unsigned long long seed, void** a) {\n',
            "  return emu::cuda_launch(grid, block, seed, emu_body, a);\n}\n",
            'extern "C" EMU_EXPORT const char* emu_error() { return emu::error.c_str(); }\n',
        ])

    def library(self, name: str, template: dict[str, int]):
        """The compiled instance (a ctypes library) and its C++ source (cached)."""
        return build(self.build_dir, cuda.kernel_function_name(self.kernels[name], template),
                     self.source(name, template), self.flags, include_dirs=(self._stubs,))

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
            buffers.append((param, Buffer(a, ALIGN)))
        fill = np.nan if init_value is None else init_value
        outputs = [(param, Buffer(np.full(shape, fill, np.float32), ALIGN, OUTPUT_GUARD_BYTE))
                   for param, shape in zip(spec.outputs, output_shapes)]
        (gx, gy, gz), block = geometry
        blocks = [-(-g // t) for g, t in zip((gx, gy, gz), block)]
        lib, cpp = self.library(name, template)
        self.launches.append(Launch(name, template, geometry))
        call(lib, cpp, f"{name} {template}", blocks, block, self.seed, buffers + outputs)
        return [o.array.copy() for _, o in outputs]

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
