"""The all-reduce of a batch-1 row-parallel projection, done by the two kernels around it.

In batch-1 decode each layer has two all-reduces of one hidden row (8 KB for Qwen3-8B), after
o_proj and after down. As kernels of their own they cost about 4 us each at TP=2 (docs/benchmarks.md):
a launch, a wait for the GEMV before, a push to the peers, a flag round trip, and a wait by the
norm-GEMV after. Here the all-reduce has no kernel:

- the producer, the row-parallel GEMV, stores each block's output rows straight into every rank's
  slot for this rank (`push`), then counts itself done on each peer's counter (a release);
- the consumer, the next norm-GEMV, waits until its counter shows every peer block of this step
  (`wait_for_peers`, an acquire), then reads the rank slots and sums them in rank order, in fp32, as
  the custom all-reduce does: the same bits as the unfused path.

Each (layer, projection) pair has its own site: its own counter, and one slot per source rank in
every rank's region (cudaMalloc'd and shared over CUDA IPC by the custom all-reduce). Counters only
grow; a step waits for `epoch x pushes x (world - 1)`, the epoch being a device counter bumped at the
start of every forward that uses the fused path, so a captured graph holds no host state. A slot is
never overwritten too early: a rank pushes into site s again only after its consumer of site s + 1
has seen the peer's pushes there, which the peer made after its own consumer of site s finished.

By default it is used at TP=2 only (see `enabled`, and docs/benchmarks.md for why).

Waits are bounded: after `timeout_s` a consumer records the site and the counts in host-mapped memory,
marks the table failed and goes on; later sites then do not wait at all, so a dead peer costs one
timeout, not one per site (71 a step for Qwen3-8B). `check` raises on the host, as the custom
all-reduce does.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tpfleet.comm.custom_ar import CommTimeout

if TYPE_CHECKING:
    from tpfleet.comm.custom_ar import CustomAllReduce

try:  # the kernels' half; CPU-only installs may lack Triton
    import triton
    import triton.language as tl

    from tpfleet.pdl import INTERPRETED
except ImportError:
    triton = None

COUNTER_BYTES = 8
RECORD = 4  # int64s of the error record: timed out, site, count seen, count awaited


def enabled(world: int) -> bool:
    """Whether batch-1 decode fuses its all-reduces at this TP size: by default at TP=2 only, where it
    measured faster (2.59 against 2.71 ms a step, 8b-shape on H200). At TP=4 it measured slower (2.52
    against 2.09 ms): every producer block releases at system scope and signals every peer, and at
    TP=2 the releases alone measured 2.3 us a site (docs/benchmarks.md, seventh session).
    TPFLEET_FUSED_AR=1 fuses at any size, =0 at none."""
    choice = os.environ.get("TPFLEET_FUSED_AR", "")
    return choice == "1" or (choice != "0" and world == 2)


class FusedAllReduce:
    """One rank's view of the sites: every rank's region, the epoch, and the timeout record."""

    def __init__(self, regions: list[int], record: tuple[int, int], rank: int, world: int, sites: int, hidden: int,
                 device: torch.device, timeout_s: float = 30.0):
        """`regions`: each rank's region (`region_bytes` long, zeroed) as addressed from here; `record`:
        (host, device) addresses of RECORD zeroed int64s that the host reads without synchronising."""
        self.rank, self.world, self.hidden = rank, world, hidden
        self.timeout_ns = int(timeout_s * 1e9)
        counters = self.counter_bytes(sites)
        # The table the kernels read: slot bases, counter bases, the record's address, failed (0/1),
        # then the epoch itself.
        self.table = torch.tensor([r + counters for r in regions] + regions + [record[1], 0, 0], dtype=torch.int64,
                                  device=device)
        self._record = (ctypes.c_int64 * RECORD).from_address(record[0])

    @staticmethod
    def counter_bytes(sites: int) -> int:
        return -(-sites * COUNTER_BYTES // 256) * 256  # the slots after them stay 256-byte aligned

    @classmethod
    def region_bytes(cls, sites: int, hidden: int, world: int, dtype: torch.dtype) -> int:
        return cls.counter_bytes(sites) + sites * world * hidden * dtype.itemsize

    @classmethod
    def over_ipc(cls, car: CustomAllReduce, sites: int, hidden: int, dtype: torch.dtype,
                 timeout_s: float = 30.0) -> FusedAllReduce:
        """Regions shared by the custom all-reduce, which frees them when it closes. Collective."""
        regions = car.share_region(cls.region_bytes(sites, hidden, car.world, dtype))
        record = car.host_mapped(RECORD * 8)
        return cls(regions, record, car.rank, car.world, sites, hidden, car.device, timeout_s)

    def begin_step(self) -> None:
        """Bump the epoch: called once at the start of every forward that pushes, on every rank."""
        self.table[-1:].add_(1)

    def check(self) -> None:
        """Raise if a consumer gave up waiting. Reads host memory only: no synchronisation."""
        code, site, seen, awaited = self._record
        if code:
            raise CommTimeout(
                f"fused all-reduce: rank {self.rank} waited more than {self.timeout_ns / 1e9:.1f}s at site {site} "
                f"(layer {site // 2}, {'down' if site % 2 else 'o_proj'}): {seen} of {awaited} peer pushes "
                f"arrived; a peer is dead, hung, or running a different sequence of steps")


@dataclass(frozen=True)
class PendingSum:
    """A row-parallel GEMV's output whose all-reduce the next norm-GEMV finishes: every rank's partial
    row sits in the slots of `site`, announced by `pushes` producer blocks per peer."""

    fused: FusedAllReduce
    site: int
    pushes: int


if triton is not None:

    @triton.jit
    def push(table, site, rank, rows, y, N, WORLD: tl.constexpr):
        """Store this block's output `rows` into every rank's slot for this rank, then count the block
        on every peer. The barrier orders all threads' stores before thread 0's release."""
        for r in tl.static_range(WORLD):
            slots = tl.multiple_of(tl.load(table + r).to(tl.pointer_type(y.dtype)), 16)
            tl.store(slots + (site * WORLD + rank) * N + rows, y)
        tl.debug_barrier()
        for r in tl.static_range(WORLD):
            if r != rank:
                counters = tl.load(table + WORLD + r).to(tl.pointer_type(tl.int64))
                tl.atomic_add(counters + site, 1, sem="release", scope="sys")

    @triton.jit
    def _now(after):
        """The GPU's nanosecond clock. `after` only orders the read (older Triton needs an operand)."""
        return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,l", [after], dtype=tl.int64,
                                         is_pure=False, pack=1)

    @triton.jit
    def wait_for_peers(table, site, rank, pushes, timeout_ns, WORLD: tl.constexpr):
        """Wait until every peer block of this step has pushed to `site`; past the timeout (none if an
        earlier wait timed out), record it and go on (the host's `check` raises)."""
        counter = tl.load(table + WORLD + rank).to(tl.pointer_type(tl.int64)) + site
        target = tl.load(table + 2 * WORLD + 2) * pushes * (WORLD - 1)
        failed = tl.load(table + 2 * WORLD + 1)
        limit = tl.where(failed == 0, timeout_ns, 0)
        seen = tl.atomic_add(counter, 0, sem="acquire", scope="sys")
        if not INTERPRETED:  # the interpreter runs one kernel at a time: a count not reached now never will be
            start = _now(seen)
            waited = start - start
            while (seen < target) & (waited < limit):
                seen = tl.atomic_add(counter, 0, sem="acquire", scope="sys")
                waited = _now(seen) - start
        if (seen < target) & (failed == 0):  # the first timeout is the one to report
            tl.store(table + 2 * WORLD + 1, 1)
            record = tl.load(table + 2 * WORLD).to(tl.pointer_type(tl.int64))
            tl.store(record + 1, site)
            tl.store(record + 2, seen)
            tl.store(record + 3, target)
            tl.store(record, 1)

    @triton.jit
    def site_slots(table, site, rank, like, K, WORLD: tl.constexpr):
        """This rank's slots of `site`, slot 0 first, K elements each, typed as `like` points."""
        base = tl.load(table + rank).to(tl.pointer_type(like.dtype.element_ty))
        return tl.multiple_of(base + site * WORLD * K, 16)
