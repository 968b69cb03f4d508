"""The memory saver: weights, KV cache and CUDA-graph memory that an engine gives back to the driver
while the trainer runs, and takes again, at the same addresses, for the next rollout.

Each tag's tensors come from a PyTorch MemPool whose segments the native allocator maps itself with
the CUDA virtual-memory API (csrc/vmm_allocator.cpp). Release unmaps and frees every segment of a tag,
cached free blocks included, and keeps the address ranges; resume maps new memory there. Pointers
never change, so CUDA graphs captured before a release replay after the resume without re-capture.

Memory that must stay exportable over IPC (the custom all-reduce's buffers, NCCL's, symmetric memory)
is allocated outside every region and never enters a saver pool. The saver's own memory cannot be
exported at all (its allocations request no shareable handle), so no peer can hold on to its pages.
"""

from __future__ import annotations

import logging
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch

from tpfleet.memory import alloc_conf, native
from tpfleet.memory.tags import CUDA_GRAPH, TAGS, MemorySaverError, check_tag, select_tags

log = logging.getLogger("tpfleet.memory")

PoolId = tuple[int, int]


class Saver(ABC):
    """The interface the engine calls whether the saver is on or off, so that it has one code path.

    - `region(tag)`: tensors allocated inside, by this thread, on the saver's device, belong to `tag`.
    - `graph(cuda_graph, tag)`: `torch.cuda.graph` whose memory belongs to `tag` (default cuda_graph).
    - `release(tags)` / `resume(tags)`: None means every tag. Both are idempotent per tag: releasing a
      released tag, or resuming one that is resident, does nothing and reports 0 bytes for it.

    Regions and captures do not nest, and nothing is released or resumed from inside one. A released
    tag cannot be allocated in or captured into until it is resumed.
    """

    enabled: bool

    def __init__(self) -> None:
        self._released: set[str] = set()
        self._active: str | None = None  # the region or capture open now, for error messages

    @property
    def released(self) -> frozenset[str]:
        return frozenset(self._released)

    def _outside(self, doing: str) -> None:
        if self._active is not None:
            raise MemorySaverError(f"{doing} inside {self._active}: saver regions and captures do not nest")

    def _resident(self, tag: str, doing: str) -> str:
        check_tag(tag)
        self._outside(doing)
        if tag in self._released:
            raise MemorySaverError(f"{doing}: the {tag!r} memory is released; resume it first")
        return tag

    @contextmanager
    def region(self, tag: str) -> Iterator[None]:
        self._resident(tag, f"region({tag!r})")
        self._active = f"region({tag!r})"
        try:
            with self._allocate_in(tag):
                yield
        finally:
            self._active = None

    def graph_pool(self, tag: str = CUDA_GRAPH) -> PoolId | None:
        """The memory pool id to pass to `torch.cuda.graph(g, pool=...)`. `graph()` does that and also
        the rest a capture into the saver needs; prefer it."""
        self._resident(tag, "graph_pool()")
        return self._capture_pool(tag)

    @contextmanager
    def graph(self, cuda_graph: torch.cuda.CUDAGraph, tag: str = CUDA_GRAPH, stream: torch.cuda.Stream | None = None,
              capture_error_mode: str = "global") -> Iterator[None]:
        """Capture into `tag`'s graph pool: every graph captured here shares that pool, as graphs
        captured with one `torch.cuda.graph_pool_handle()` do."""
        pool = self.graph_pool(tag)
        self._active = f"graph({tag!r})"
        try:
            with self._allocating(), torch.cuda.graph(cuda_graph, pool=pool, stream=stream,
                                                      capture_error_mode=capture_error_mode):
                yield
        finally:
            self._active = None

    def release(self, tags: str | Iterable[str] | None = None) -> dict[str, int]:
        """Give the tags' device memory back to the driver. Returns the bytes freed per tag, once the
        driver shows them free."""
        selected = select_tags(tags)
        self._outside("release()")
        report = dict.fromkeys(selected, 0)
        todo = [t for t in selected if t not in self._released]
        if todo:
            before = self._before_release()
            for tag in todo:
                report[tag] = self._release_tag(tag)
                self._released.add(tag)
            self._after_release(before, sum(report.values()))
        return report

    def resume(self, tags: str | Iterable[str] | None = None) -> dict[str, int]:
        """Map the tags' memory again at the same addresses (restoring CPU backups). Returns the bytes
        mapped per tag."""
        selected = select_tags(tags)
        self._outside("resume()")
        report = dict.fromkeys(selected, 0)
        for tag in [t for t in selected if t in self._released]:
            report[tag] = self._resume_tag(tag)
            self._released.discard(tag)
        return report

    def bytes(self) -> dict[str, int]:
        """The device bytes each tag holds now: 0 while it is released."""
        return {tag: self._tag_bytes(tag) for tag in TAGS}

    @abstractmethod
    def _allocate_in(self, tag: str) -> AbstractContextManager[None]: ...

    @abstractmethod
    def _allocating(self) -> AbstractContextManager[None]: ...

    @abstractmethod
    def _capture_pool(self, tag: str) -> PoolId | None: ...

    @abstractmethod
    def _before_release(self) -> int: ...

    @abstractmethod
    def _release_tag(self, tag: str) -> int: ...

    @abstractmethod
    def _after_release(self, before: int, freed: int) -> None: ...

    @abstractmethod
    def _resume_tag(self, tag: str) -> int: ...

    @abstractmethod
    def _tag_bytes(self, tag: str) -> int: ...


class NullSaver(Saver):
    """The saver switched off (or on the CPU): same tag rules, no memory moves. Graphs share one
    ordinary graph pool, created on first use."""

    enabled = False

    def __init__(self) -> None:
        super().__init__()
        self._pool: PoolId | None = None

    def _allocate_in(self, tag: str) -> AbstractContextManager[None]:
        return nullcontext()

    def _allocating(self) -> AbstractContextManager[None]:
        return nullcontext()

    def _capture_pool(self, tag: str) -> PoolId | None:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return self._pool

    def _before_release(self) -> int:
        return 0

    def _release_tag(self, tag: str) -> int:
        return 0

    def _after_release(self, before: int, freed: int) -> None:
        pass

    def _resume_tag(self, tag: str) -> int:
        return 0

    def _tag_bytes(self, tag: str) -> int:
        return 0


class MemorySaver(Saver):
    """The saver on one CUDA device. `cpu_backup` names the tags whose contents survive a release (a
    pinned host copy, made at the first release and reused); the others come back uninitialised.

    One per device per process: the native allocator files memory by (device, tag), so a second saver
    on the device would release the first one's memory. The saver must outlive the tensors of its
    regions: PyTorch hands a pool's segments back to the pool's allocator only while the pool lives.
    """

    enabled = True
    _instances: dict[int, weakref.ref[MemorySaver]] = {}

    def __init__(self, device: torch.device | int | str | None = None, cpu_backup: str | Iterable[str] = (),
                 free_timeout_s: float = 10.0):
        super().__init__()
        self.device = native.cuda_device(device)
        self.index = self.device.index
        other = MemorySaver._instances.get(self.index)
        if other is not None and other() is not None:
            raise MemorySaverError(f"{self.device} already has a memory saver; use that one")
        backend = torch.cuda.memory.get_allocator_backend()
        if backend != "native":
            raise MemorySaverError(f"the memory saver needs PyTorch's native caching allocator, not {backend!r} "
                                   "(PYTORCH_CUDA_ALLOC_CONF backend)")
        self.cpu_backup = frozenset(select_tags(cpu_backup)) if cpu_backup else frozenset()
        self.free_timeout_s = free_timeout_s
        self._lib = native.load_library(self.device)
        if len(TAGS) > self._lib.max_slots:
            raise MemorySaverError(f"{len(TAGS)} tags, but the allocator has {self._lib.max_slots} slots")
        self._slots = {tag: slot for slot, tag in enumerate(TAGS)}
        self._pools = {tag: self._new_pool(tag) for tag in TAGS}
        # Captures get pools of their own: an eager allocation must never land on memory that a graph
        # used during capture, freed, and will write again at every replay.
        self._capture_pools: dict[str, torch.cuda.MemPool] = {}
        MemorySaver._instances[self.index] = weakref.ref(self)

    def _new_pool(self, tag: str) -> torch.cuda.MemPool:
        with torch.cuda.device(self.device):
            return torch.cuda.memory.MemPool(native.pluggable_allocator(self._lib, self._slots[tag]).allocator())

    def _stream(self) -> int:
        return torch.cuda.current_stream(self.device).cuda_stream

    @contextmanager
    def _allocate_in(self, tag: str) -> Iterator[None]:
        with alloc_conf.expandable_segments_off(), torch.cuda.memory.use_mem_pool(self._pools[tag], self.device):
            try:
                yield
            except torch.cuda.OutOfMemoryError:
                log.error("memory saver: allocation for %r failed; the allocator's last error: %s", tag,
                          self._lib.last_error())
                raise

    def _allocating(self) -> AbstractContextManager[None]:
        return alloc_conf.expandable_segments_off()

    def _capture_pool(self, tag: str) -> PoolId:
        if tag not in self._capture_pools:
            self._capture_pools[tag] = self._new_pool(tag)
        return self._capture_pools[tag].id

    def _before_release(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.mem_get_info(self.device)[0]

    def _release_tag(self, tag: str) -> int:
        return self._lib.release(self.index, self._slots[tag], tag in self.cpu_backup, self._stream())

    def _after_release(self, before: int, freed: int) -> None:
        """Return only once the driver reports the memory free, so that a trainer started next sees it."""
        want = before + freed - min(freed // 100, 64 << 20)
        deadline = time.monotonic() + self.free_timeout_s
        while (free := torch.cuda.mem_get_info(self.device)[0]) < want:
            if time.monotonic() > deadline:
                raise MemorySaverError(
                    f"released {freed} bytes on {self.device}, but after {self.free_timeout_s}s the driver shows "
                    f"only {free - before} more bytes free: is another process allocating on this GPU?")
            time.sleep(0.005)

    def _resume_tag(self, tag: str) -> int:
        return self._lib.resume(self.index, self._slots[tag], self._stream())

    def _tag_bytes(self, tag: str) -> int:
        return self._lib.bytes(self.index, self._slots[tag], mapped_only=True)


def make_saver(device: torch.device | str, enable: bool, cpu_backup: str | Iterable[str] = ()) -> Saver:
    """An engine rank's saver: a MemorySaver on a CUDA device when enabled, a NullSaver otherwise."""
    if enable and torch.device(device).type == "cuda":
        return MemorySaver(device, cpu_backup)
    return NullSaver()
