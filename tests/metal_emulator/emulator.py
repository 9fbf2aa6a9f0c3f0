"""Run the Metal kernels of ``kernels/metal`` on the CPU, one emulated thread
per Metal thread, so their semantics can be tested without an Apple GPU.
The Metal twin of tests/cuda_emulator; both use the fiber runtime and build
harness in tests/gpu_emulator (``fibers.h``, ``harness.py``).

How: for each kernel launch the backend makes, ``Emulator`` takes the
program MLX would hand to the Metal compiler, ``kernels.metal.generated_source``
for the launch's template values and its inputs' dtypes, ranks and sizes
(the header; the body inside the signature MLX generates, with ``constant``
or ``device`` pointers, 0-d inputs as references and the position
attributes the body mentions; the explicit instantiation), rewrites each
``threadgroup`` declaration (see prelude.h), and compiles it with g++ after
``fibers.h`` + ``prelude.h`` (MSL's types, built-ins and address spaces in
C++) into a shared library that runs it over the launch grid.
``emulated_backend`` swaps ``kernels.metal._run`` (the one place the backend
calls ``mx.fast.metal_kernel``) for the emulator, so the real ``MetalBackend``
methods run unchanged: their input preparation, path choice (matvec or tiles,
decode or grouped MoE), launch geometry and the device-side expert grouping
(MLX ops, evaluated here on the CPU).

What is emulated (details in fibers.h and prelude.h):

* every Metal thread as its own fiber, threadgroups one after another,
  threads of a threadgroup interleaved only at synchronisation points, in a
  seeded random order; simdgroups of 32;
* the kernel's position attributes (``thread_position_in_grid``,
  ``simdgroup_index_in_threadgroup``, ...) as per-thread parameters;
* ``threadgroup_barrier`` as a real barrier of the whole threadgroup;
  ``simd_sum`` and ``simd_max`` over the simdgroup's lanes;
* ``threadgroup`` memory, one copy per threadgroup, poisoned (0xff bytes:
  NaN) for each threadgroup; ``constant`` tables;
* MSL's vector types with their sizes and alignments, ``half`` as IEEE
  binary16, ``as_type``, ``select``, ``dot``, ``min``/``max``/``clamp``, ``fma``,
  ``rint``, ``fabs``, ``copysign``, ``precise::exp``, ``precise::sqrt``,
  ``precise::cos``, ``precise::sin``; address spaces as far as C++ can tell
  them apart (a ``constant`` pointer does not convert to a ``device`` one);
* MLX's launch contract: the threadgroup clipped to the grid per axis
  (``min(threadgroup, grid)``, as MLX does), the grid counted in threads
  with partial threadgroups at its edges (``dispatchThreads``), outputs
  uninitialised (NaN here, so a missed write shows), inputs made
  row-contiguous, inputs of fewer than 8 elements in the ``constant`` address
  space;
* strictness a GPU does not give for free: a barrier or ``simd_sum`` that not
  every thread of the threadgroup or simdgroup reaches, or that they reach on
  different lines, is an error, not a hang, garbage or (``simd_sum``: Metal
  sums the active threads) a partial sum; more than 32 KiB of threadgroup
  memory (Apple GPUs' limit) is refused; misaligned loads and stores are
  caught (g++ ``-fsanitize=alignment``); buffers start only 16-byte aligned
  (all the kernels may assume), bytes just before and after every buffer are
  guards that reads see as 0xff (NaN) and that writes must leave untouched,
  and beyond them lie inaccessible pages: an access further out is reported
  as a memory fault.

What this does NOT prove:

* anything about timing, occupancy, register pressure (which can lower a
  pipeline's thread limit below the 1024 checked here), memory coalescing or
  bank conflicts;
* that Apple's Metal compiler accepts the source: g++ compiles it with MSL
  approximated in C++ (prelude.h), and accepts things MSL refuses (a
  ``device`` pointer passed as ``constant``, a ``threadgroup`` pointer as
  ``device``, any cast between address spaces, vector conversions MSL may
  not allow) and refuses MSL it has not been taught: only the built-ins the
  kernels use exist (no ``simd_shuffle*``, ``simd_broadcast``, ``fast::``
  or plain ``exp``, atomics, the ``grid_origin`` / ``grid_size``
  attributes...), a compile error that names what is missing. Nor that MLX
  generates exactly ``generated_source``'s text;
* device arithmetic: CPU ``expf`` is not Apple's ``precise::exp`` (both
  within a few ulp); ``dot`` and ``simd_sum`` add in an order of this
  emulator's choosing; MLX builds Metal libraries with fast math off, but
  the Metal compiler may still contract ``a * b + c`` into FMA where this
  build does not, unless ``contract=True`` (``-ffp-contract=fast``, not
  necessarily where Metal would);
* the memory flags of ``threadgroup_barrier`` (one fiber runs at a time, so
  a barrier that orders too little still works here), and freedom from data
  races: threads only interleave at barriers and ``simd_sum``, so a missing
  barrier shows up only if this scheduler's order happens to expose it;
* alignment faults for buffers laid out otherwise than here; an access
  outside a buffer that lands in another buffer or object of this process
  (beyond an inaccessible page) rather than a guard.

Compiled libraries are cached by a digest of their source and compiler flags
in ``build_dir`` (the tests use pytest's cache directory).
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from magnetar.kernels import metal
from gpu_emulator.harness import (CXX, FIBERS, OUTPUT_GUARD_BYTE, Buffer, EmulatorError, build, call,
                                   compiler_flags)

PRELUDE = Path(__file__).with_name("prelude.h")
SIMD = 32
ALIGN = 16  # buffer starts: the alignment kernels/metal may assume (float4), and no more

# `threadgroup T name[N]...;` (MSL allows such declarations only at kernel scope).
_THREADGROUP_DECL = re.compile(r"\bthreadgroup\s+([\w:]+)\s+(\w+)((?:\s*\[[^\];]*\])*)\s*;")
# Any `threadgroup T name` that is no pointer or reference: a declaration the rewrite missed.
_THREADGROUP_OTHER = re.compile(r"\bthreadgroup\s+[\w:]+\s+\w+")


@dataclass(frozen=True)
class Launch:
    kernel: str
    template: dict
    geometry: metal.Geometry


class Emulator:
    """Compiles and runs ``kernels/metal`` programs on the CPU (see the module doc).

    ``contract``: let g++ fuse multiply-adds, as the Metal compiler may.
    ``seed``: the scheduler's interleaving.
    """

    def __init__(self, build_dir: Path, contract: bool = False, seed: int = 0):
        if CXX is None:
            raise EmulatorError("no C++ compiler (g++) found")
        self.build_dir = Path(build_dir)
        self.build_dir.mkdir(parents=True, exist_ok=True)
        self.seed = seed
        self.flags = [*compiler_flags(contract), "-Wno-attributes"]  # [[kernel]], [[buffer(i)]], ...
        self.kernels = dict(metal.KERNELS)  # name -> KernelSpec; a test may add its own
        self.launches: list[Launch] = []

    # -- building -------------------------------------------------------------

    def source(self, name: str, template: dict[str, int], inputs: list[tuple[mx.Dtype, int, int]]) -> str:
        """The C++ translation unit of one kernel instance; ``inputs`` as for
        ``generated_source``: each input's (dtype, ndim, size)."""
        spec = self.kernels[name]
        program = _rewrite_threadgroup_declarations(metal.generated_source(spec, template, inputs))
        callee = re.search(r"decltype\((\w+<[^>]*>)\)", program).group(1)  # the instantiation's name<values>
        args = []
        for i, (dtype, ndim, _) in enumerate(inputs):
            ctype = metal._MSL_TYPES[dtype]
            args.append(f"*(const {ctype}*)emu_args[{i}]" if ndim == 0 else f"(const {ctype}*)emu_args[{i}]")
        args += [f"(float*)emu_args[{len(inputs) + i}]" for i in range(len(spec.outputs))]
        args += [f"p.{a}" for a in metal.THREAD_ATTRIBUTES if a in spec.body]  # generated_source's rule
        return "".join([
            f'#define EMU_WARP {SIMD}\n#define EMU_GROUP "threadgroup"\n',
            '#define EMU_BARRIER "threadgroup_barrier()"\n#define EMU_WARP_NAME "simdgroup"\n',
            FIBERS.read_text(), "\n", PRELUDE.read_text(), "\n// ---- the program MLX would compile\n\n",
            program, "\n// ---- entry points\n\n",
            "static void** emu_args;\n\n",
            "static void emu_body() {\n  const EmuPosition p = emu_position();\n",
            f"  {callee}(\n      " + ",\n      ".join(args) + ");\n}\n\n",
            'extern "C" EMU_EXPORT int emu_launch(const unsigned* grid, const unsigned* group, unsigned long long seed, void** a) {\n',
            "  emu_args = a;\n  return emu::metal_launch(grid, group, seed, emu_body);\n}\n",
            'extern "C" EMU_EXPORT const char* emu_error() { return emu::error.c_str(); }\n',
        ])

    # -- running --------------------------------------------------------------

    def launch(self, name: str, inputs: list, output_shapes: list, geometry: metal.Geometry,
               template: dict[str, int]) -> list[np.ndarray]:
        """One kernel launch with ``mx.fast.metal_kernel``'s arguments; numpy outputs."""
        spec = self.kernels[name]
        template = {t: int(template[t]) for t in spec.templates}
        if len(inputs) != len(spec.inputs) or len(output_shapes) != len(spec.outputs):
            raise EmulatorError(f"{name}: {len(inputs)} inputs, {len(output_shapes)} outputs for {spec}")
        arrays = [x if isinstance(x, mx.array) else mx.array(x) for x in inputs]
        for param, a in zip(spec.inputs, arrays):
            if a.dtype not in metal._MSL_TYPES:
                raise EmulatorError(f"{name}: input {param} is {a.dtype}, which generated_source cannot declare")
        info = [(a.dtype, a.ndim, a.size) for a in arrays]
        buffers = [(param, Buffer(np.ascontiguousarray(np.asarray(a)), ALIGN))  # ensure_row_contiguous
                   for param, a in zip(spec.inputs, arrays)]
        outputs = [(param, Buffer(np.full(shape, np.nan, np.float32), ALIGN, OUTPUT_GUARD_BYTE))
                   for param, shape in zip(spec.outputs, output_shapes)]
        grid, group = geometry
        group = [min(t, g) for t, g in zip(group, grid)]  # as MLX dispatches it
        stem = f"{name}_" + "_".join(str(template[t]) for t in spec.templates)
        lib, cpp = build(self.build_dir, stem, self.source(name, template, info), self.flags)
        self.launches.append(Launch(name, template, geometry))
        call(lib, cpp, f"{name} {template}", grid, group, self.seed, buffers + outputs)
        return [o.array.copy() for _, o in outputs]

    def run(self, name, inputs, shapes, geometry, template) -> list[mx.array]:
        """Drop-in for ``kernels.metal._run``."""
        return [mx.array(o) for o in self.launch(name, inputs, shapes, geometry, template)]


def _rewrite_threadgroup_declarations(program: str) -> str:
    """``threadgroup T name[N];`` -> a static array (one copy: threadgroups run
    one at a time) poisoned once per threadgroup by emu::threadgroup_memory."""
    program = _THREADGROUP_DECL.sub(r"static \1 \2\3; ::emu::threadgroup_memory(&\2, sizeof(\2));", program)
    missed = _THREADGROUP_OTHER.search("\n".join(line.split("//")[0] for line in program.splitlines()))
    if missed:
        raise EmulatorError(f"a threadgroup declaration the emulator cannot rewrite: {missed.group(0)!r}")
    return program


@contextmanager
def emulated_backend(emulator: Emulator):
    """A ``MetalBackend`` whose kernel launches run in ``emulator``.

    Its constructor runs, with only its availability check answered yes
    (``mx.metal.is_available`` returns True while it runs).
    """
    saved_run, saved_available = metal._run, mx.metal.is_available
    metal._run = emulator.run
    try:
        mx.metal.is_available = lambda: True
        try:
            backend = metal.MetalBackend()
        finally:
            mx.metal.is_available = saved_available
        yield backend
    finally:
        metal._run = saved_run
