"""What the CUDA and Metal kernel emulators share on the Python side: the
compiler and its flags, guarded buffers, building a kernel instance into a
cached shared library and calling its entry point.

A library's entry points (emitted by each emulator, see fibers.h) are
``int emu_launch(const unsigned* grid, const unsigned* group, unsigned long
long seed, void** buffers)``, 0 on success, and ``const char* emu_error()``.
"""

from __future__ import annotations

import ctypes
import hashlib
import mmap
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

FIBERS = Path(__file__).with_name("fibers.h")
CXX = os.environ.get("CXX") or shutil.which("g++")
GUARD = 256  # bytes of guard (at least) before and after every buffer
GUARD_BYTE = 0xFF  # inputs' guards: reads see NaN floats, -1 ints
OUTPUT_GUARD_BYTE = 0xA5  # outputs' guards: only checked for writes
_PAGE = mmap.PAGESIZE
_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


# The marks of every test file that runs kernels on an emulator.
NEEDS_EMULATOR = [
    pytest.mark.skipif(CXX is None, reason="g++ not found: the GPU emulators compile the kernels with it"),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the GPU emulators' fibers need Linux (glibc)"),
]


def emulator_build_dir(request, tmp_path_factory, name: str) -> Path:
    """Where a test file's kernel libraries are built: pytest's cache (kept between runs), else a temp dir."""
    cache = getattr(request.config, "cache", None)
    return cache.mkdir(name) if cache is not None else tmp_path_factory.mktemp(name)


class EmulatorError(RuntimeError):
    """A kernel did something the emulator checks for (see the emulators' module docs)."""


def host_has_fma() -> bool:
    try:
        return " fma " in Path("/proc/cpuinfo").read_text().replace("\n", " ")
    except OSError:
        return False


def compiler_flags(contract: bool) -> list[str]:
    """g++ flags of every kernel library. Hidden visibility: each library
    keeps its own emulator state and inline functions (no process-wide
    unique symbols shared between libraries built with other flags).
    ``contract``: fuse multiply-adds (``-ffp-contract=fast``), as GPU
    compilers do by default."""
    flags = ["-std=c++17", "-O2" if contract else "-O1", "-fPIC", "-fvisibility=hidden", "-U_FORTIFY_SOURCE",
             "-Wno-unknown-pragmas", "-fsanitize=alignment", f"-ffp-contract={'fast' if contract else 'off'}"]
    if host_has_fma():
        flags.append("-mfma")  # only speeds up fmaf(); rounding is the same either way
    return flags


class Buffer:
    """An array between guard bytes, its start ``align``-byte aligned and its
    end within ``GUARD + align`` bytes of an inaccessible page (another lies
    before the leading guard bytes): an access further out faults, and the
    kernel library reports the fault (fibers.h)."""

    def __init__(self, array: np.ndarray, align: int, guard_byte: int = GUARD_BYTE):
        nbytes = array.nbytes
        inner = -(-(2 * GUARD + align + nbytes) // _PAGE) * _PAGE
        self._map = mmap.mmap(-1, inner + 2 * _PAGE)
        pages = np.frombuffer(self._map, np.uint8)
        for offset in (0, _PAGE + inner):
            if _LIBC.mprotect(pages.ctypes.data + offset, _PAGE, 0):  # PROT_NONE
                raise OSError(ctypes.get_errno(), "mprotect failed")
        self._raw = pages[_PAGE:_PAGE + inner]  # page-aligned, so offsets into it keep their alignment
        self._raw[...] = guard_byte
        start = (inner - GUARD - nbytes) // align * align
        self._span = (start, start + nbytes)
        self.array = self._raw[start:start + nbytes].view(array.dtype).reshape(array.shape)
        self.array[...] = array
        self.guard_byte = guard_byte

    @property
    def pointer(self) -> int:
        return self.array.ctypes.data

    def guards_intact(self) -> bool:
        start, stop = self._span
        return bool((self._raw[:start] == self.guard_byte).all() and (self._raw[stop:] == self.guard_byte).all())


def build(build_dir: Path, stem: str, source: str, flags: list[str],
          include_dirs: tuple[Path, ...] = ()) -> tuple[ctypes.CDLL, Path]:
    """Compile ``source`` into a shared library (cached by a digest of the
    source and flags; safe for concurrent test runs); the library and the
    path of its C++ source."""
    digest = hashlib.sha256("\0".join([source, CXX, *flags]).encode()).hexdigest()[:16]
    base = Path(build_dir) / f"{stem}_{digest}"
    so, cpp = base.with_suffix(".so"), base.with_suffix(".cpp")
    if not so.exists():
        mine = f".{os.getpid()}"
        tmp_cpp, obj, tmp = (base.with_suffix(mine + ext) for ext in (".cpp", ".o", ".so"))
        tmp_cpp.write_text(source)
        for cmd in ([CXX, *flags, *(f"-I{d}" for d in include_dirs), "-c", str(tmp_cpp), "-o", str(obj)],
                    [CXX, "-shared", str(obj), "-o", str(tmp)]):  # no sanitizer runtime: fibers.h handles it
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
    return lib, cpp


def call(lib: ctypes.CDLL, cpp: Path, label: str, grid, group, seed: int,
         buffers: list[tuple[str, Buffer]]) -> None:
    """Run ``lib``'s entry point over ``buffers`` (kernel parameter order),
    then check that no write went past any of them."""
    pointers = (ctypes.c_void_p * len(buffers))(*[b.pointer for _, b in buffers])
    if lib.emu_launch((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*group), seed, pointers):
        raise EmulatorError(f"{label}: {lib.emu_error().decode()} [generated source: {cpp}]")
    for name, b in buffers:
        if not b.guards_intact():
            raise EmulatorError(f"{label}: a write outside buffer {name}")
