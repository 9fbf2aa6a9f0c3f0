"""Routed experts streamed from the GGUF through per-layer slot banks: RAM as a dial.

Flash's routed experts are ~72 GiB of the 81 GB file, but a token uses 6 of 256
per layer. With a cache budget the non-expert weights stay resident and each
layer owns a bank of ``n_slots`` slots; one slot holds one expert's gate, up
and down blocks as raw GGUF bytes (three page-aligned banks, one per matrix,
so the expert kernel reads them exactly as it reads the full stacks). The
kernel takes a slot map as data (expert -> bank row, -1 = absent): a bank is
filled in place and never rebuilt, and the decode graph does not change with
residency (docs/spec/streaming-distributed.md §3, §10.1).

Misses are read with positional reads from a thread pool (three per expert,
straight into the slot), never through mmap page faults, and the pages are
dropped from the OS cache afterwards (``POSIX_FADV_DONTNEED``; ``F_NOCACHE``
on macOS) so the cache budget is the RAM experts take. A slot becomes valid
only after all three reads completed in full; a short read, an I/O error or a
file whose size or mtime changed since load raises ``ExpertReadError`` and
leaves the slot empty.

Eviction follows ds4: each (layer, expert) has a route hotness, +1 whenever
the router picks it (hits and misses alike), halved every ``DECAY_TOKENS``
decoded tokens; the victim is the coldest valid slot, least recently used
first among equals. The experts of the selection being computed and slots with
reads in flight are never victims. A selection larger than the bank runs in
rounds of ascending expert ids, each adding onto the same output, which the
kernel makes bit-identical to one call over the whole stack.

On a GPU backend (``device_banks``: Metal, CUDA) the banks are MLX arrays and
the kernels are the resident path's own, given slot rows as expert ids. A read
still lands in a host slot; the slot is then copied into its device bank row in
place (MLX reuses the bank's buffer) and the host pages are handed back, so
RAM holds the banks once. Every layer there keeps at least the K experts a
token picks, so a decode step is one kernel call with the resident bits; a
prefill chunk needing rounds adds their sums (the resident GPU prefill itself
adds with atomics, in no fixed order).
"""

from __future__ import annotations

import mmap
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from magnetar.kernels.backend import Backend, QTensor

from .errors import ExpertReadError, MagnetarError, UsageError
from .gguf_read import ModelFile, TensorInfo

DECAY_TOKENS = 16  # ds4's HOTNESS_DECAY_TOKENS
READ_THREADS = 8
WHOLE_LAYER_PIECE = 8 << 20  # a whole-layer read goes out in pieces of this size, several in flight
DEFAULT_READ_BW = 1e9  # bytes/s assumed before anything was measured
STAGING_SHARE = 4  # the two whole layers are set aside only from a budget at least 4x their size


ROUTED = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
AUTO_MARGIN = 1 << 30  # left free for the OS, activations and MLX's buffers


def routed_tensors(mf: ModelFile, layers) -> dict[int, tuple[TensorInfo, TensorInfo, TensorInfo]]:
    return {il: tuple(mf.tensors[f"blk.{il}.{n}.weight"] for n in ROUTED) for il in layers}


def available_memory() -> int:
    """Bytes the OS could give us now: MemAvailable on Linux, else 80% of physical memory
    (ds4's auto budget share on macOS, where free memory is mostly reclaimable cache)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(0.8 * os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def auto_budget(mf: ModelFile, ctx: int, resident: int) -> tuple[int, str]:
    """``--expert-cache auto``: what is free now, less the weights still to load, the KV state
    for ``ctx`` tokens and a margin. Returns the bytes and the line that explains them."""
    free = available_memory()
    kv = mf.config.kv_bytes(ctx)
    budget = max(free - resident - kv - AUTO_MARGIN, 0)
    return budget, (f"expert cache auto: {free / 2**30:.1f} GiB free - {resident / 2**30:.1f} GiB weights - "
                    f"{kv / 2**30:.1f} GiB KV ({ctx} tokens) - {AUTO_MARGIN / 2**30:.0f} GiB margin "
                    f"= {budget / 2**30:.1f} GiB")


def expert_budget(mf: ModelFile, ctx: int, request: int | str | None,
                  span: tuple[int, int] | None = None) -> tuple[int | None, str]:
    """``--expert-cache`` as bytes for the layers ``span`` (default all) and a line saying how
    ``auto`` chose it: the weights of those layers that stay resident (the embedding with layer
    0, the head with the last) come off what is free."""
    if request != "auto":
        return request, ""
    a, b = span or (0, mf.config.n_layer)
    routed = {i.name for infos in routed_tensors(mf, range(mf.config.n_layer)).values() for i in infos}

    def mine(name: str) -> bool:
        if name.startswith("blk."):
            return a <= int(name.split(".")[1]) < b
        return a == 0 if name.startswith("token_embd") else b == mf.config.n_layer

    resident = sum(i.nbytes for name, i in mf.tensors.items() if name not in routed and mine(name))
    return auto_budget(mf, ctx, resident)


HOTLIST_HEADER = "# ds4 expert hotlist v1"


def read_hotlist(path: str | os.PathLike) -> list[tuple[int, int, float]]:
    """``(layer, expert, hits)`` rows of a hotlist in ds4's text format: ``#`` lines, then
    ``layer expert hits [weight]`` per line, hottest first."""
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                fields = line.split()
                try:
                    layer, expert, hits = int(fields[0]), int(fields[1]), float(fields[2])
                except (IndexError, ValueError):
                    raise UsageError(f"hotlist {path} line {n}: expected 'layer expert hits [weight]'") from None
                rows.append((layer, expert, hits))
    except OSError as exc:
        raise UsageError(f"cannot read hotlist {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"hotlist {path} is not text") from None
    return rows


def format_hotlist(model: str, hits: dict[int, np.ndarray], weights: dict[int, np.ndarray]) -> str:
    """A hotlist in ds4's format: one row per (layer, expert) ever picked, sorted by hits, then
    route weight, descending, then layer and expert."""
    rows = sorted(((-int(hits[il][e]), -float(weights[il][e]), il, int(e))
                   for il in sorted(hits) for e in np.flatnonzero(hits[il] > 0)))
    n_experts = max((len(h) for h in hits.values()), default=0)
    head = [HOTLIST_HEADER, f"# model {model}", f"# layers {len(hits)}", f"# experts {n_experts}",
            f"# layer_records {len(rows)}", f"# selections {int(sum(h.sum() for h in hits.values()))}",
            "# columns: layer expert hits weight"]
    return "\n".join(head + [f"{il} {e} {-h} {-w:.6f}" for h, w, il, e in rows]) + "\n"


@dataclass(frozen=True)
class ExpertStack:
    """One routed-expert tensor in the file: expert ``e`` is bytes ``[offset + e*expert_bytes, +expert_bytes)``."""

    ggml_type: int
    offset: int
    n_experts: int
    rows: int
    row_bytes: int

    @classmethod
    def of(cls, info: TensorInfo) -> "ExpertStack":
        n_experts, rows = info.shape[2], info.shape[1]
        return cls(int(info.ggml_type), info.offset, n_experts, rows, info.nbytes // (n_experts * rows))

    @property
    def expert_bytes(self) -> int:
        return self.rows * self.row_bytes


@dataclass(frozen=True)
class BankPlan:
    """How a budget becomes memory, before any is allocated (``inspect`` shows it): two whole
    layers for long prefills when they are a small part of the budget (ds4's headroom) and the
    rest does not hold every expert anyway, then the
    same number of slots in every layer (a slot fits the widest layer's expert), at least one,
    at most all of a layer's experts."""

    stacks: dict[int, tuple[ExpertStack, ExpertStack, ExpertStack]]  # gate, up, down of each layer
    slots: dict[int, int]
    slot_bytes: int
    layer_bytes: int  # the widest layer's routed experts
    staged: bool  # two whole-layer buffers set aside
    raised: bool  # the budget was below ``min_slots`` per layer: raised to that minimum
    min_slots: int = 1

    @classmethod
    def of(cls, layers: dict[int, tuple[TensorInfo, TensorInfo, TensorInfo]], budget: int,
           min_slots: int = 1) -> "BankPlan":
        stacks = {il: tuple(ExpertStack.of(i) for i in infos) for il, infos in layers.items()}
        slot_bytes = max(sum(s.expert_bytes for s in st) for st in stacks.values())
        layer_bytes = max(sum(s.n_experts * s.expert_bytes for s in st) for st in stacks.values())
        n_layers, most = max(len(stacks), 1), max(st[0].n_experts for st in stacks.values())
        staged = 2 * layer_bytes * STAGING_SHARE <= budget \
            and (budget - 2 * layer_bytes) // slot_bytes // n_layers < most  # not when every expert fits
        want = (budget - (2 * layer_bytes if staged else 0)) // slot_bytes // n_layers
        slots = {il: min(max(want, min_slots), st[0].n_experts) for il, st in stacks.items()}
        return cls(stacks, slots, slot_bytes, layer_bytes, staged, want < min_slots, min_slots)

    @property
    def bank_bytes(self) -> int:
        """Each layer's slots x its expert size."""
        return sum(n * sum(s.expert_bytes for s in self.stacks[il]) for il, n in self.slots.items())

    @property
    def staging_bytes(self) -> int:
        return 2 * self.layer_bytes if self.staged else 0

    @property
    def nbytes(self) -> int:
        """What the cache allocates."""
        return self.bank_bytes + self.staging_bytes


class ExpertFile:
    """Positional reads from the model file; the identity at open tells later changes apart."""

    preadv = staticmethod(os.preadv)  # a test may wrap it to inject short reads and I/O errors

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        if sys.platform == "darwin":
            import fcntl
            fcntl.fcntl(self.fd, getattr(fcntl, "F_NOCACHE", 48), 1)  # reads bypass the unified buffer cache
        self.identity = self._identity()

    def _identity(self) -> tuple[int, int]:
        st = os.fstat(self.fd)
        return st.st_size, st.st_mtime_ns

    def check_unchanged(self) -> None:
        if self._identity() != self.identity:
            size, _ = self._identity()
            raise ExpertReadError(f"{self.path} changed while the model was loaded (size {self.identity[0]} -> "
                                  f"{size}, or its mtime)", "restore the file, or restart to load the new one")

    def read_into(self, view: memoryview, offset: int) -> None:
        """Fill ``view`` from ``offset``; a short file or an OSError raises ExpertReadError."""
        done, want = 0, len(view)
        try:
            while done < want:
                n = self.preadv(self.fd, [view[done:]], offset + done)
                if n <= 0:
                    raise ExpertReadError(f"short read from {self.path}: {done} of {want} bytes at offset {offset}",
                                          "the model file is truncated; restore it")
                done += n
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(self.fd, offset, want, os.POSIX_FADV_DONTNEED)  # the slot is the only copy we keep
        except OSError as exc:
            raise ExpertReadError(f"cannot read experts from {self.path}: {exc.strerror or exc}") from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _timed(read_into, view: memoryview, offset: int) -> float:
    """Run a read on a pool thread; returns when it finished, for wall-time bandwidth."""
    read_into(view, offset)
    return time.perf_counter()


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _page_aligned(shape: tuple[int, ...]) -> np.ndarray:
    """Zeroed uint8 memory from an anonymous mapping: starts on a page, and pages only
    become resident as slots fill."""
    n = int(np.prod(shape))
    private = mmap.mmap(-1, max(n, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # shared would keep released pages
    return np.frombuffer(private, np.uint8, n).reshape(shape)


# Pages handed back stay mapped and read as zeros until written again (Linux frees them
# at once; macOS's MADV_FREE when memory is wanted).
_RELEASE = getattr(mmap, "MADV_FREE", None) if sys.platform == "darwin" else getattr(mmap, "MADV_DONTNEED", None)


def _release_rows(bank: np.ndarray, row: int) -> None:
    """Give the OS back the whole pages of ``bank[row]`` (a ``_page_aligned`` array)."""
    mapping = bank.base
    while mapping is not None and not isinstance(mapping, mmap.mmap):
        mapping = getattr(mapping, "obj", None) or getattr(mapping, "base", None)
    if _RELEASE is None or mapping is None:
        return
    size = bank[row].nbytes
    start = -(-row * size // mmap.PAGESIZE) * mmap.PAGESIZE
    end = (row + 1) * size // mmap.PAGESIZE * mmap.PAGESIZE
    if end > start:
        mapping.madvise(_RELEASE, start, end - start)


@dataclass
class StreamStats:
    uses: int = 0  # experts needed by a selection
    hits: int = 0  # ... of which were resident when needed
    read_ahead: int = 0  # ... of which were being read ahead (hash layers)
    layers_streamed: int = 0  # whole layers read for long prefills
    experts_read: int = 0
    bytes_read: int = 0
    read_seconds: float = 0.0  # wall time with reads in flight (the union of their spans)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.uses if self.uses else 0.0

    @property
    def read_gb_s(self) -> float:
        return self.bytes_read / self.read_seconds / 1e9 if self.read_seconds else 0.0


@dataclass
class LayerBank:
    """One layer's slots. Bookkeeping changes on the engine thread only; reader threads
    write slot bytes and nothing else."""

    layer: int
    stacks: tuple[ExpertStack, ExpertStack, ExpertStack]  # gate, up, down
    n_slots: int
    device: bool = False  # device banks (MLX arrays) beside host slots that only land reads
    banks: tuple[np.ndarray, ...] = ()
    on_device: tuple[mx.array, ...] = ()
    slot_of: np.ndarray = field(default=None)  # [E] bank row of each valid expert, -1 if absent
    expert_in: np.ndarray = field(default=None)  # [S] expert held or being read, -1 if free
    last_used: np.ndarray = field(default=None)  # [S] tick of the last use
    hot: np.ndarray = field(default=None)  # [E] route hotness
    pending: dict = field(default_factory=dict)  # slot -> Future of its reads

    def __post_init__(self):
        self.banks = tuple(_page_aligned((self.n_slots, s.rows, s.row_bytes)) for s in self.stacks)
        if self.device:
            self.on_device = tuple(mx.zeros(b.shape, mx.uint8) for b in self.banks)
            mx.eval(*self.on_device)
        n_experts = self.stacks[0].n_experts
        self.slot_of = np.full(n_experts, -1, np.int32)
        self.expert_in = np.full(self.n_slots, -1, np.int64)
        self.last_used = np.zeros(self.n_slots, np.int64)
        self.hot = np.zeros(n_experts, np.float64)

    @property
    def resident(self) -> int:
        return int(np.count_nonzero(self.slot_of >= 0))

    def tensors(self) -> tuple[QTensor, ...]:
        """The banks as the kernels take them."""
        return tuple(QTensor(b, s.ggml_type) for b, s in zip(self.on_device or self.banks, self.stacks))

    def upload(self, slots: list[int]) -> None:
        """Device banks: copy landed host slots into their rows, in place, then hand the
        host pages back."""
        if not self.device or not slots:
            return
        for dev, host in zip(self.on_device, self.banks):
            for slot in slots:
                dev[slot] = mx.array(host[slot])
        mx.eval(*self.on_device)
        for host in self.banks:
            for slot in slots:
                _release_rows(host, slot)

    def copy_in(self, slot: int, stacks: tuple, expert: int) -> None:
        """Fill ``slot`` with ``expert`` from a whole layer already in memory (host or device)."""
        for dst, src in zip(self.on_device or self.banks, stacks):
            dst[slot] = src[expert]


class StagedLayers:
    """Two buffers of one whole routed layer each (ds4's prefill headroom): the next layer is
    read in large pieces from the pool while this one computes. Bookkeeping on the engine
    thread; the pool only writes bytes."""

    def __init__(self, layer_bytes: int):
        self.buffers = [mmap.mmap(-1, layer_bytes) for _ in range(2)]
        self.owner: list[int | None] = [None, None]  # layer each buffer holds or is being read for
        self.reads: dict[int, tuple[int, float, list]] = {}  # layer -> (buffer, start, futures)
        self.views: dict[int, tuple[np.ndarray, ...]] = {}
        self.seconds, self.nbytes = 0.0, 0  # whole-layer reads so far: their bandwidth
        self.compute_seconds = 0.0  # from one layer's expert step to the next one's: what a read can hide
        self._last_exit = None

    def holds(self, layer: int) -> bool:
        return layer in self.reads

    def free_buffer(self) -> int | None:
        return next((i for i, owner in enumerate(self.owner) if owner is None), None)

    def bandwidth(self) -> float | None:
        return self.nbytes / self.seconds if self.seconds else None

    def start(self, bank: LayerBank, pool: ThreadPoolExecutor, read_into, now: float) -> None:
        index = self.free_buffer()
        self.owner[index] = bank.layer
        views, futures, at = [], [], 0
        for stack in bank.stacks:
            size = stack.n_experts * stack.expert_bytes
            view = np.frombuffer(self.buffers[index], np.uint8, size, at).reshape(
                stack.n_experts, stack.rows, stack.row_bytes)
            raw = memoryview(self.buffers[index])[at:at + size]
            for p0 in range(0, size, WHOLE_LAYER_PIECE):
                futures.append(pool.submit(_timed, read_into, raw[p0:p0 + WHOLE_LAYER_PIECE], stack.offset + p0))
            views.append(view)
            at += size
        self.views[bank.layer] = tuple(views)
        self.reads[bank.layer] = (index, time.perf_counter(), futures)

    def wait(self, layer: int) -> tuple[tuple[np.ndarray, ...], int, float, float]:
        """The layer's stacks once read in full (ExpertReadError if a piece failed), their bytes
        and when the read started and ended."""
        index, start, futures = self.reads[layer]
        failed = next((f.exception() for f in futures if f.exception() is not None), None)
        if failed is not None:
            self.release(layer)
            raise failed if isinstance(failed, MagnetarError) else ExpertReadError(f"expert read failed: {failed}")
        nbytes = sum(v.nbytes for v in self.views[layer])
        end = max(f.result() for f in futures)
        self.seconds += end - start
        self.nbytes += nbytes
        return self.views[layer], nbytes, start, end

    def release(self, layer: int) -> None:
        index, _, futures = self.reads.pop(layer)
        for f in futures:
            f.exception()  # no read may still write into a buffer handed to the next layer
        self.owner[index] = None
        del self.views[layer]

    def layer_done(self, entered: float) -> None:
        now = time.perf_counter()
        if self._last_exit is not None and entered - self._last_exit < 60:
            self.compute_seconds = now - self._last_exit  # attention, routing and this expert step
        self._last_exit = now

    def drain(self) -> None:
        for layer in list(self.reads):
            self.release(layer)


class ExpertCache:
    """The slot banks of every routed layer, their reader and their statistics."""

    def __init__(self, path: str | os.PathLike, layers: dict[int, tuple[TensorInfo, TensorInfo, TensorInfo]],
                 budget: int, threads: int = READ_THREADS, device: bool = False, min_slots: int = 1):
        """``device``: banks in MLX arrays for a ``device_banks`` backend; ``min_slots``: the
        fewest slots a layer may have."""
        plan = BankPlan.of(layers, budget, min_slots)
        self.slot_bytes, self.layer_bytes, self.raised = plan.slot_bytes, plan.layer_bytes, plan.raised
        self.min_slots, self.device = min_slots, device
        self.staging = StagedLayers(plan.layer_bytes) if plan.staged else None
        self.banks = {il: LayerBank(il, st, plan.slots[il], device) for il, st in plan.stacks.items()}
        self.file = ExpertFile(path)
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="expert-read")
        self.stats = StreamStats()
        self.bank_read = [0, 0.0]  # bytes and wall seconds of expert-by-expert reads: their bandwidth
        self._read_until = 0.0  # the end of the read time counted so far
        self.tick = 0
        self.decoded = 0
        self.route_hook = None  # benchmarks only: (layer, ids) -> the ids to run instead (forced routing)

    # -- sizes ---------------------------------------------------------------------------------

    @property
    def n_slots(self) -> int:
        return sum(b.n_slots for b in self.banks.values())

    @property
    def nbytes(self) -> int:
        banks = sum(sum(a.nbytes for a in b.banks) for b in self.banks.values())
        return banks + (2 * self.layer_bytes if self.staging else 0)

    @property
    def total_experts(self) -> int:
        return sum(b.stacks[0].n_experts for b in self.banks.values())

    def describe(self) -> str:
        least = "one slot" if self.min_slots == 1 else f"{self.min_slots} slots, a token's experts,"
        note = f" (raised to the minimum of {least} per layer)" if self.raised else ""
        staging = f", 2 layers ({_size(2 * self.layer_bytes)}) for long prefills" if self.staging else ""
        return (f"expert cache: {_size(self.nbytes)}, {self.n_slots} of {self.total_experts} routed experts "
                f"({self.n_slots // max(len(self.banks), 1)} slots per layer){staging}{note}")

    # -- the expert step -----------------------------------------------------------------------

    def moe(self, layer: int, kernels: Backend, x: mx.array, ids: np.ndarray, weights: mx.array,
            limit: float) -> mx.array:
        """Layer ``layer``'s routed experts for ``x [T, D]`` through the kernels' ``moe_slots``;
        in rounds when the selection is larger than the bank. In a prefill chunk the next
        layer may be read whole meanwhile, when that costs less than reading its misses."""
        t_enter = time.perf_counter()
        if not self.device:  # host kernels: numpy in and out
            x, weights = np.asarray(x, np.float32), np.asarray(weights, np.float32)
        if self.route_hook:
            ids = self.route_hook(layer, ids)
        bank = self.banks[layer]
        bank.hot += np.bincount(ids.ravel(), minlength=len(bank.hot))
        used = np.unique(ids)  # ascending: the kernel's own summation order
        if self.staging and len(ids) > 1:
            self._maybe_stage_next(layer, len(used), t_enter)
        if self.staging and self.staging.holds(layer):
            out = self._moe_staged(bank, kernels, x, ids, weights, limit, used)
        else:
            out = self._moe_banked(bank, kernels, x, ids, weights, limit, used)
        if self.staging:
            self.staging.layer_done(t_enter)
        return out if self.device else mx.array(out)

    def _moe_banked(self, bank: LayerBank, kernels: Backend, x, ids: np.ndarray, weights, limit: float,
                    used: np.ndarray):
        out = None if self.device else np.zeros(x.shape, np.float32)
        for r0 in range(0, len(used), bank.n_slots):
            group = used[r0:r0 + bank.n_slots]
            self._ensure(bank, group)
            slot_of = np.full_like(bank.slot_of, -1)
            slot_of[group] = bank.slot_of[group]  # only this round's experts add
            out = kernels.moe_slots(x, ids, weights, *bank.tensors(), limit, slot_of, out)
        return out

    # -- long prefills: whole layers, double-buffered ----------------------------------------------

    def _maybe_stage_next(self, layer: int, n_used: int, now: float) -> None:
        """Start reading the next layer whole if the measured costs say it pays: its expected
        misses (this layer's count of picked experts, less what the next bank holds) read
        one by one, against one whole-layer read of which the compute until then hides part."""
        order = list(self.banks)
        at = order.index(layer)
        if at + 1 == len(order) or self.staging.holds(order[at + 1]) or self.staging.free_buffer() is None:
            return
        nxt = self.banks[order[at + 1]]
        misses = n_used * (1 - nxt.resident / len(nxt.hot))
        bank_bw = self.bank_read[0] / self.bank_read[1] if self.bank_read[1] else None
        bw = bank_bw or self.staging.bandwidth() or DEFAULT_READ_BW
        by_expert = misses * self.slot_bytes / bw
        whole = self.layer_bytes / (self.staging.bandwidth() or bw) - self.staging.compute_seconds
        if whole < by_expert:
            self.file.check_unchanged()
            self.staging.start(nxt, self.pool, self.file.read_into, now)

    def _moe_staged(self, bank: LayerBank, kernels: Backend, x, ids: np.ndarray, weights, limit: float,
                    used: np.ndarray):
        """The layer from its whole-layer buffer; its hottest picked experts then fill the bank
        from memory, so decode starts warm."""
        for slot in list(bank.pending):  # reads ahead (a hash layer's): land them before slots move
            self._settle_quietly(bank, [slot])
        self.stats.uses += len(used)
        stacks, nbytes, start, end = self.staging.wait(bank.layer)
        self.stats.bytes_read += nbytes
        self.stats.read_seconds += self._reading(start, end)
        self.stats.layers_streamed += 1
        if self.device:  # the whole layer goes up once; the bank then fills from it on the device
            stacks = tuple(mx.array(a) for a in stacks)
        identity = np.arange(len(bank.hot), dtype=np.int32)
        out = kernels.moe_slots(x, ids, weights, *(QTensor(a, s.ggml_type) for a, s in zip(stacks, bank.stacks)),
                                limit, identity, None if self.device else np.zeros(x.shape, np.float32))
        self.tick += 1
        keep = sorted(used.tolist(), key=lambda e: -bank.hot[e])[:bank.n_slots]
        for e in keep:
            if bank.slot_of[e] < 0:
                slot = self._victim(bank, set(keep))
                if bank.expert_in[slot] >= 0:
                    bank.slot_of[bank.expert_in[slot]] = -1
                bank.copy_in(slot, stacks, e)
                bank.expert_in[slot], bank.slot_of[e] = e, slot
            bank.last_used[bank.slot_of[e]] = self.tick
        if self.device:
            mx.eval(out, *bank.on_device)  # before the staging buffer is handed to the next layer
        self.staging.release(bank.layer)
        return out

    def _ensure(self, bank: LayerBank, experts: np.ndarray) -> None:
        """Make ``experts`` (at most ``n_slots``) resident; reads what is missing, in parallel."""
        self.tick += 1
        self.stats.uses += len(experts)
        absent = [int(e) for e in experts if bank.slot_of[e] < 0]
        self.stats.hits += len(experts) - len(absent)
        ahead = [s for s in (self._pending_slot(bank, e) for e in absent) if s >= 0]
        if ahead:  # read ahead by ``prefetch`` (maybe in a call that failed): a failed one is read again
            self._settle_quietly(bank, ahead)
        missing = [e for e in absent if bank.slot_of[e] < 0]
        self.stats.read_ahead += len(absent) - len(missing)
        if missing:
            self.file.check_unchanged()
            pinned = set(int(e) for e in experts)
            self._settle(bank, [self._start_read(bank, e, pinned) for e in missing])
        bank.last_used[bank.slot_of[experts]] = self.tick

    def _pending_slot(self, bank: LayerBank, expert: int) -> int:
        """The slot whose reads in flight are for ``expert``, or -1."""
        for slot in bank.pending:
            if bank.expert_in[slot] == expert:
                return slot
        return -1

    def _victim(self, bank: LayerBank, pinned: set[int]) -> int:
        """A free slot, else the coldest unpinned one (least recently used among equals)."""
        free = np.flatnonzero(bank.expert_in < 0)
        if len(free):
            return int(free[0])
        candidates = [s for s in range(bank.n_slots) if s not in bank.pending and int(bank.expert_in[s]) not in pinned]
        if not candidates:  # the rest are reads ahead of other experts: let them land, then choose again
            ahead = [slot for slot in bank.pending if int(bank.expert_in[slot]) not in pinned]
            if not ahead:
                raise RuntimeError("expert cache: every slot is pinned")  # rounds never exceed the bank
            for slot in ahead:
                self._settle_quietly(bank, [slot])
            return self._victim(bank, pinned)
        return min(candidates, key=lambda s: (bank.hot[bank.expert_in[s]], bank.last_used[s]))

    def _start_read(self, bank: LayerBank, expert: int, pinned: set[int]) -> int:
        """Claim a slot for ``expert`` and queue its three reads; the slot is valid once settled."""
        slot = self._victim(bank, pinned)
        old = int(bank.expert_in[slot])
        if old >= 0:
            bank.slot_of[old] = -1
        bank.expert_in[slot] = expert
        pieces = [(memoryview(b[slot]).cast("B"), s.offset + expert * s.expert_bytes)
                  for b, s in zip(bank.banks, bank.stacks)]
        bank.pending[slot] = (time.perf_counter(), [self.pool.submit(self._read, view, off) for view, off in pieces])
        return slot

    def _read(self, view: memoryview, offset: int) -> float:
        return _timed(self.file.read_into, view, offset)

    def _settle(self, bank: LayerBank, slots: list[int]) -> None:
        """Wait for ``slots``' reads: each slot is valid once its three reads completed in
        full, else freed; the first failure is raised after the whole batch landed."""
        starts, ends, error, landed = [], [], None, []
        for slot in slots:
            start, futures = bank.pending.pop(slot)
            failed = next((f.exception() for f in futures if f.exception() is not None), None)
            if failed is None:
                landed.append(slot)
                bank.slot_of[bank.expert_in[slot]] = slot
                self.stats.experts_read += 1
                self.stats.bytes_read += sum(s.expert_bytes for s in bank.stacks)
                starts.append(start)
                ends.extend(f.result() for f in futures)
            else:
                bank.expert_in[slot] = -1
                error = error or failed
        bank.upload(landed)
        if ends:
            seconds = self._reading(min(starts), max(ends))
            self.stats.read_seconds += seconds
            self.bank_read[0] += len(starts) * self.slot_bytes
            self.bank_read[1] += seconds
        if error is not None:
            raise error if isinstance(error, MagnetarError) else ExpertReadError(f"expert read failed: {error}")

    def _reading(self, start: float, end: float) -> float:
        """Wall seconds of reading in ``[start, end]`` not counted yet: batches overlap (a token's
        hash layers are read ahead together), and read time is the union of their spans."""
        seconds = max(0.0, end - max(start, self._read_until))
        self._read_until = max(self._read_until, end)
        return seconds

    def _settle_quietly(self, bank: LayerBank, slots: list[int]) -> None:
        """Land reads ahead, which are guesses: a failure just leaves the slot free."""
        try:
            self._settle(bank, slots)
        except MagnetarError:
            pass

    # -- ahead of use --------------------------------------------------------------------------

    def prefetch(self, layer: int, experts) -> None:
        """Start reading ``experts`` of ``layer`` now (hash layers: known from the token ids
        before the layer runs); the expert step waits for them. At most a bank's worth, the
        lowest ids first (the first round)."""
        if self.route_hook:  # routing is forced: the model's picks are not what will run
            return
        bank = self.banks[layer]
        want = [int(e) for e in np.unique(np.asarray(experts))[:bank.n_slots]]
        todo = [e for e in want if bank.slot_of[e] < 0 and self._pending_slot(bank, e) < 0]
        if not todo:
            return
        self.file.check_unchanged()
        pinned = set(want) | {int(bank.expert_in[s]) for s in bank.pending}
        for e in todo:
            self._start_read(bank, e, pinned)

    def token_done(self) -> None:
        """One decoded token: hotness halves every ``DECAY_TOKENS``."""
        self.decoded += 1
        if self.decoded % DECAY_TOKENS == 0:
            for bank in self.banks.values():
                bank.hot *= 0.5

    def drain(self) -> None:
        """Land every read in flight (before a bank is inspected or the cache closed)."""
        for bank in self.banks.values():
            for slot in list(bank.pending):
                self._settle_quietly(bank, [slot])
        if self.staging:
            self.staging.drain()

    @contextmanager
    def set_aside(self):
        """Work inside leaves the hotness, the decoded-token count and the stats as they were
        (what it read stays resident: those bytes are right whoever asked for them)."""
        hot = {il: b.hot.copy() for il, b in self.banks.items()}
        stats, decoded = dict(vars(self.stats)), self.decoded
        try:
            yield
        finally:
            for il, b in self.banks.items():
                b.hot[:] = hot[il]
            vars(self.stats).update(stats)
            self.decoded = decoded

    # -- hotness tables (hotlists and sessions) --------------------------------------------------

    def hotness(self) -> dict[int, np.ndarray]:
        return {il: b.hot.copy() for il, b in self.banks.items()}

    def warm(self, table: dict[int, np.ndarray] | list[tuple[int, int, float]]) -> int:
        """Take a hotness table (per layer, or ``(layer, expert, hits)`` rows) as the current
        hotness and read the hottest experts of each layer into its free slots. Returns how
        many experts it read."""
        rows = table if isinstance(table, list) else [
            (il, int(e), float(h[e])) for il, h in table.items() for e in np.flatnonzero(h > 0)]
        by_layer: dict[int, list[tuple[float, int]]] = {}
        for il, e, hits in rows:
            bank = self.banks.get(int(il))
            if bank is None or not 0 <= int(e) < len(bank.hot) or not hits > 0:
                continue
            bank.hot[int(e)] = max(bank.hot[int(e)], float(hits))
            by_layer.setdefault(int(il), []).append((-float(hits), int(e)))
        read = 0
        for il, ranked in by_layer.items():
            bank = self.banks[il]
            room = int(np.count_nonzero(bank.expert_in < 0))
            chosen = sorted(set(e for _, e in sorted(ranked)[:room]))
            missing = [e for e in chosen if bank.slot_of[e] < 0]
            if missing:
                self._settle(bank, [self._start_read(bank, e, set(chosen)) for e in missing])
                read += len(missing)
        return read

    def close(self) -> None:
        self.drain()
        self.pool.shutdown(wait=True)
        self.file.close()
