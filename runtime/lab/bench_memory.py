"""Will the bench's peers fit in memory together?

``magnetar bench decode|prefill`` interleaves its peers call by call, so every
peer's weights stay resident for the whole run. When together they exceed what
the machine has free, the timings measure paging, not the engines: three 9.5 GB
peers on a 24 GiB machine made llama.cpp 5x slower (409 ms/token against 80)
and nothing said so. ``plan`` estimates each peer's weights before the run;
``peak_rss`` is what each process measured afterwards.

The estimates are floors: KV caches, activations and each runtime's own
buffers come on top.
"""

from __future__ import annotations

import math
import resource
import sys
from dataclasses import dataclass
from typing import Sequence

from magnetar.kernels import native
from magnetar.kernels.backend import default_backend_name

from ..errors import UsageError
from ..expert_cache import available_memory, expert_budget, routed_tensors
from ..gguf_read import ModelFile

# Peers that build the model as f32 from our config instead of reading the file: transformers'
# DeepseekV4ForCausalLM and mlx-lm's V4.1 (bench_peers.py), every parameter 4 bytes. Same
# widths, so the file's element count stands in for theirs; V4.1's tensors differ a little
# (no hash tables, shared KV sources), so for mlx-lm it is an approximation.
F32_PEERS = ("transformers", "mlx-lm", "mlx-lm-pipelined")


@dataclass(frozen=True)
class PeerMemory:
    name: str
    bytes: int
    basis: str  # how the estimate was made, for the warning
    shared: int = 0  # of ``bytes``, the model file's pages it reads in place (mapped, in the page cache)


@dataclass(frozen=True)
class MemoryPlan:
    peers: tuple[PeerMemory, ...]
    available: int

    @property
    def total(self) -> int:
        """Each peer's own copies, plus the file's mapped pages once: the page cache holds a
        page once for every process that maps it (the largest share stands in for their union)."""
        return sum(p.bytes - p.shared for p in self.peers) + max((p.shared for p in self.peers), default=0)

    @property
    def over(self) -> bool:
        return self.total > self.available

    def verdict(self) -> str:
        """One line naming the peers, their estimate and the memory there is."""
        each = ", ".join(f"{p.name} {_size(p.bytes)} ({p.basis})" for p in self.peers)
        relation = "exceed" if self.over else "fit in"
        return (f"the peers' weights together ({_size(self.total)}: {each}) {relation} the "
                f"{_size(self.available)} of memory available")


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _reads_experts_in_place(name: str, backend_name: str) -> bool:
    """Whether magnetar peer ``name`` reads the routed experts from the file's mapping: the CPU
    backend with its native kernels does (``Backend.expert_stack``); the GPU backends copy them."""
    if name in ("magnetar-q8k", "magnetar-q8"):  # 8-bit activations run on the CPU's native kernels only
        return True
    return (name == "magnetar" and (default_backend_name() if backend_name == "auto" else backend_name) == "cpu"
            and native.available())


def peer_bytes(name: str, mf: ModelFile, ctx: int = 4096, expert_cache: int | str | None = None,
               backend_name: str = "auto") -> PeerMemory:
    """The weights peer ``name`` keeps resident for the model file ``mf``.

    llama.cpp maps the file; magnetar copies the tensors it keeps into MLX buffers
    (weights.py) except the routed experts on the CPU, read from the mapping: the file's size
    for both, the mapped part ``shared``. Not counted: the up to 1 GiB of matrices magnetar
    widens to f32 on the CPU (which ones fit depends on load order). ``expert_cache``
    (magnetar only): the routed experts stream through a cache of that size instead.
    Peers not known here count as the file's size, the floor.
    """
    if name in F32_PEERS:
        elements = sum(math.prod(info.shape) for info in mf.tensors.values())
        return PeerMemory(name, 4 * elements, "f32 built from the config")
    routed = sum(info.nbytes for infos in routed_tensors(mf, range(mf.config.n_layer)).values() for info in infos)
    if name == "magnetar" and expert_cache is not None:
        budget, _ = expert_budget(mf, ctx, expert_cache)
        return PeerMemory(name, mf.size - routed + min(budget, routed), "file less the streamed experts")
    if name == "llama.cpp":
        return PeerMemory(name, mf.size, "file size, mapped", shared=mf.size)
    if _reads_experts_in_place(name, backend_name):
        return PeerMemory(name, mf.size, "file size, experts mapped", shared=routed)
    return PeerMemory(name, mf.size, "file size")


def plan(names: Sequence[str], mf: ModelFile, *, available: int | None = None, ctx: int = 4096,
         expert_cache: int | str | None = None, backend_name: str = "auto") -> MemoryPlan:
    """Every peer's estimate against ``available`` bytes (None: what the OS has free now)."""
    peers = tuple(peer_bytes(n, mf, ctx, expert_cache, backend_name) for n in names)
    return MemoryPlan(peers, available_memory() if available is None else available)


def check(p: MemoryPlan, strict: bool = False) -> str | None:
    """None when the peers fit; else the warning line, or with ``strict`` a UsageError."""
    if not p.over:
        return None
    if strict:
        raise UsageError(f"{p.verdict()}: the timings would measure paging",
                         "bench fewer or smaller peers, or leave out --strict-memory")
    return f"warning: {p.verdict()}; the results will be marked memory-bound"


def peak_rss() -> int:
    """This process's largest resident set so far, in bytes. Mapped file pages count too
    (llama.cpp's weights, magnetar's reads of the file), so it can exceed the estimate.

    On Linux it is /proc's VmHWM, the high-water mark of this process's own memory:
    ru_maxrss keeps the parent's across fork and exec, so a peer spawned by a bench that
    holds a model reported the bench's figure (a 1 GiB parent: 1.1 GB against 14 MB)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, KiB on Linux


def rss_line(peaks: dict[str, int | None], p: MemoryPlan) -> str:
    """After the run: what each peer's process held at most, beside the estimate."""
    each = ", ".join(f"{name} {'?' if b is None else _size(b)}" for name, b in peaks.items())
    return (f"peak RSS: {each} (magnetar's figure is the bench's own process); estimated "
            f"{_size(p.total)} of weights, {_size(p.available)} available before the run")
