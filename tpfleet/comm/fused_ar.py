"""The all-reduce of a batch-1 row-parallel projection, done by each block of that projection's GEMV.

In batch-1 decode each layer has two all-reduces of one hidden row (8 KB for Qwen3-8B), after
o_proj and after down. As kernels of their own they cost about 4 us each at TP=2 (docs/benchmarks.md):
a launch, a wait for the GEMV before, a push to the peers, a flag round trip. Here the row-parallel
GEMV (the producer) all-reduces its own output, block by block. A block owns whole output features
(no split-K), so its slice of the row needs only the peers' same slice:

- the block stores its slice into every peer's slot for this rank as 32-bit words that also carry
  the step's flag (16 bits of value, 16 of flag, one store: a reader sees both or neither, as in
  NCCL's low-latency protocol). No fence waits for the remote stores: the flags say when they landed;
- it then waits until its slice of every peer's slot carries this step's flag, sums the ranks' values
  in rank order, in fp32, as the custom all-reduce does, and writes the sum: the same bits as the
  unfused path. The next kernel reads one plain row.

The embedding's all-reduce (the rank holding the token's row gives it, the others zeros) is done the
same way, by its lookup kernel (`tpfleet.model.triton_ops.embedding_all_reduce`), and so is the
choice of the greedy token, each rank sending its vocabulary shard's best (`tpfleet.model.greedy`).

A block waits only for the same block of its peers, one NVLink hop behind, and nothing waits for a
release or a count. (Earlier versions, docs/benchmarks.md, seventh session: every block releasing at
system scope cost 2.3 us a site, 0.17 ms a step; one last block per rank summing the whole row cost
as much in serial work.) Blocks on different GPUs that wait on each other do not deadlock because a
GPU starts a grid's blocks in index order: the blocks waiting on any GPU then have every partner
they wait for started or done. That order is what GPUs do, not a documented promise; were it ever
broken, the waits would time out into an error, not hang.

The flag is the low 16 bits of the epoch, a device counter bumped at the start of every forward that
uses the fused path, so a captured graph holds no host state. Every fused step writes every slot, so
a slot holds this step's words or the last step's, whose flag differs. A slot is never overwritten
too early: a peer pushes into site s again only after its site s + 1 has seen our words, which we
pushed after our site s had finished.

Each all-reduce of a step has its own site (`site_name`): one slot per source rank in every rank's
region (cudaMalloc'd and shared over CUDA IPC by the custom all-reduce).

Waits are bounded: after `timeout_s` a waiting block records the site and how many ranks' values it
had in host-mapped memory, marks the table failed and goes on; later sites then do not wait at all,
so a dead peer costs one timeout, not one per site (74 a step for Qwen3-8B). `check` raises on the
host, as the custom all-reduce does.
"""

from __future__ import annotations

import ctypes
import os
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

WORD_BYTES = 4  # a 16-bit value and its 16-bit flag
RECORD = 4  # int64s of the error record: timed out, site, ranks complete, ranks awaited


def enabled() -> bool:
    """Whether batch-1 decode fuses its all-reduces: yes unless TPFLEET_FUSED_AR=0. Measured faster than
    the custom all-reduce kernels at TP=2 and TP=4 (docs/benchmarks.md, eighth session)."""
    return os.environ.get("TPFLEET_FUSED_AR", "1") != "0"


def supports(dtype: torch.dtype) -> bool:
    """A word carries a 16-bit value: bf16 and fp16 models only."""
    return dtype.itemsize == 2 and dtype.is_floating_point


# A Qwen3 model's sites, one per exchange of a step: the embedding's row, the greedy token, then each
# layer's o_proj and down outputs. The model numbers them with these, and `check` names them with
# `site_name`.
EMBEDDING_SITE, GREEDY_SITE = 0, 1


def layer_sites(layer: int) -> tuple[int, int]:
    """The sites of a layer's o_proj and down all-reduces."""
    return 2 * layer + 2, 2 * layer + 3


def site_count(layers: int) -> int:
    return 2 + 2 * layers


def site_name(site: int) -> str:
    named = {EMBEDDING_SITE: "embedding", GREEDY_SITE: "greedy token"}
    return named.get(site) or f"layer {(site - 2) // 2}, {'o_proj' if site % 2 == 0 else 'down'}"


class FusedAllReduce:
    """One rank's view of the sites: every rank's region, the epoch, and the timeout record."""

    def __init__(self, regions: list[int], record: tuple[int, int], rank: int, world: int, hidden: int,
                 device: torch.device, timeout_s: float = 30.0):
        """`regions`: each rank's region (`region_bytes` long, zeroed) as addressed from here; `record`:
        (host, device) addresses of RECORD zeroed int64s that the host reads without synchronising."""
        self.rank, self.world, self.hidden = rank, world, hidden
        self.timeout_ns = int(timeout_s * 1e9)
        # The table the kernels read: slot bases, the record's address, failed (0/1), then the epoch.
        self.table = torch.tensor(regions + [record[1], 0, 0], dtype=torch.int64, device=device)
        self._record = (ctypes.c_int64 * RECORD).from_address(record[0])

    @staticmethod
    def region_bytes(sites: int, hidden: int, world: int) -> int:
        return sites * world * hidden * WORD_BYTES

    @classmethod
    def over_ipc(cls, car: CustomAllReduce, sites: int, hidden: int, timeout_s: float = 30.0) -> FusedAllReduce:
        """Regions shared by the custom all-reduce, which frees them when it closes. Collective."""
        regions = car.share_region(cls.region_bytes(sites, hidden, car.world))
        record = car.host_mapped(RECORD * 8)
        return cls(regions, record, car.rank, car.world, hidden, car.device, timeout_s)

    def begin_step(self) -> None:
        """Bump the epoch: called once at the start of every forward that fuses, on every rank."""
        self.table[-1:].add_(1)

    def check(self) -> None:
        """Raise if a wait timed out. Reads host memory only: no synchronisation."""
        code, site, complete, awaited = self._record
        if code:
            raise CommTimeout(
                f"fused all-reduce: rank {self.rank} waited more than {self.timeout_ns / 1e9:.1f}s at site {site} "
                f"({site_name(site)}): {complete} of {awaited} ranks' values "
                f"arrived; a peer is dead, hung, or running a different sequence of steps")


if triton is not None:

    @triton.jit
    def _slots(table, site, rank, N, WORLD: tl.constexpr):
        """`rank`'s slots of `site`, one per source rank, N words each."""
        base = tl.load(table + rank).to(tl.pointer_type(tl.int32))
        return tl.multiple_of(base + site * WORLD * N, 16)

    @triton.jit
    def _flagged(words, flag):
        return (((words >> 16) & 0xFFFF) == flag).to(tl.int32)

    @triton.jit
    def _now(after):
        """The GPU's nanosecond clock. `after` only orders the read (older Triton needs an operand)."""
        return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,l", [after], dtype=tl.int64,
                                         is_pure=False, pack=1)

    @triton.jit
    def _words(slot, offs, mask, flag, limit):
        """The words at `offs` once every one carries `flag` (volatile reads: L2, never hoisted out of
        the loop), or as they are after `limit` ns; and 1 if they were complete. Masked words count as
        complete."""
        words = tl.load(slot + offs, mask=mask, other=flag << 16, volatile=True)
        done = tl.min(_flagged(words, flag), axis=0)
        if not INTERPRETED:  # the interpreter runs one kernel at a time: a word not here now never will be
            start = _now(done)
            waited = start - start
            while (done == 0) & (waited < limit):
                words = tl.load(slot + offs, mask=mask, other=flag << 16, volatile=True)
                done = tl.min(_flagged(words, flag), axis=0)
                waited = _now(done) - start
        return words, done

    @triton.jit
    def send(table, site, rank, offs, y, N, WORLD: tl.constexpr):
        """Store 16-bit values `y` at `offs` into every peer's slot of `site` for this rank, each in a
        word with this step's flag; no fence. Returns the flag, and whether an earlier wait has timed
        out (then nothing waits)."""
        flag = (tl.load(table + WORLD + 2) & 0xFFFF).to(tl.int32)
        word = (y.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) | (flag << 16)
        for r in tl.static_range(WORLD):
            if r != rank:
                tl.store(_slots(table, site, r, N, WORLD) + rank * N + offs, word)
        return flag, tl.load(table + WORLD + 1, volatile=True)  # failed: set by a block of this grid, maybe

    @triton.jit
    def receive(table, site, rank, r, offs, y, N, flag, failed, timeout_ns, WORLD: tl.constexpr):
        """Rank r's values at `offs` once they carry `flag` (`y` itself for this rank, whose slot is
        never written or read), and 1 if they arrived in time."""
        mine = rank == r
        words, done = _words(_slots(table, site, rank, N, WORLD) + r * N, offs, offs < tl.where(mine, 0, N), flag,
                             tl.where(failed == 0, timeout_ns, 0))
        return tl.where(mine, y, (words & 0xFFFF).to(tl.int16).to(y.dtype, bitcast=True)), done

    @triton.jit
    def report(table, site, complete, failed, WORLD: tl.constexpr):
        """Record a site where fewer than WORLD ranks' values arrived, unless an earlier one was."""
        if (complete < WORLD) & (failed == 0):  # the first timeout is the one to report
            tl.store(table + WORLD + 1, 1)
            record = tl.load(table + WORLD).to(tl.pointer_type(tl.int64))
            tl.store(record + 1, site)
            tl.store(record + 2, complete)
            tl.store(record + 3, WORLD)
            tl.store(record, 1)

    @triton.jit
    def all_reduce_block(table, site, rank, rows, y, out, N, timeout_ns, WORLD: tl.constexpr):
        """Called by each block of a row-parallel GEMV with its output `y` at `rows`: `out[rows]` gets
        the sum over ranks, in rank order, in fp32, rounded once (see the module docstring)."""
        flag, failed = send(table, site, rank, rows, y, N, WORLD)
        acc = tl.zeros(y.shape, tl.float32)
        complete = 0
        for r in tl.static_range(WORLD):
            value, done = receive(table, site, rank, r, rows, y, N, flag, failed, timeout_ns, WORLD)
            acc += value.to(tl.float32)
            complete += done
        tl.store(out + rows, acc.to(out.dtype.element_ty))
        report(table, site, complete, failed, WORLD)
