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
same way, by its lookup kernel (`tpfleet.kernels.ops.embedding_all_reduce`), and so is the choice of
the greedy token, each rank sending its vocabulary shard's best (`tpfleet.kernels.greedy`).

A block waits only for the same block of its peers, one NVLink hop behind, and nothing waits for a
release or a count. (Designs that did cost more, docs/benchmarks.md: every block releasing at system
scope, 2.3 us a site, 0.17 ms a step; one last block per rank summing the whole row, as much in
serial work.) Blocks on different GPUs that wait on each other do not deadlock because a GPU starts
a grid's blocks in index order: the blocks waiting on any GPU then have every partner they wait for
started or done. That order is what GPUs do, not a documented promise; were it ever broken, the
waits would time out into an error, not hang.

The flag is the low 16 bits of the epoch, a device counter bumped at the start of every forward that
uses the fused path (`Exchange.begin_step`), so a captured graph holds no host state. Every fused
step writes every slot, so a slot holds this step's words or the last step's, whose flag differs. A
slot is never overwritten too early: a peer pushes into site s again only after its site s + 1 has
seen our words, which we pushed after our site s had finished.

Each all-reduce of a step has its own site: one slot per source rank in every rank's region
(`region_bytes`). Which exchange is which site is the model's business; here a site is a number.

Waits are bounded: after `timeout_ns` a waiting block records the site and how many ranks' values it
had in the error record (`RECORD` int64s: timed out, site, ranks complete, ranks awaited), marks the
table failed and goes on; later sites then do not wait at all, so a dead peer costs one timeout, not
one per site (74 a step for Qwen3-8B). The owner of the record (tpfleet.comm.fused_ar) reads it on
the host and raises.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

try:  # the kernels' half; CPU-only installs may lack Triton
    import triton
    import triton.language as tl

    from tpfleet.kernels.pdl import INTERPRETED
except ImportError:
    triton = None

WORD_BYTES = 4  # a 16-bit value and its 16-bit flag
RECORD = 4  # int64s of the error record: timed out, site, ranks complete, ranks awaited


def supports(dtype: torch.dtype) -> bool:
    """A word carries a 16-bit value: bf16 and fp16 models only."""
    return dtype.itemsize == 2 and dtype.is_floating_point


def region_bytes(sites: int, width: int, world: int) -> int:
    """The bytes of one rank's region: per site, one slot of `width` words per source rank."""
    return sites * world * width * WORD_BYTES


@dataclass(frozen=True)
class Exchange:
    """One rank's end of the fused all-reduce, as its kernels take it."""

    # Every rank's region as addressed from here, the error record's device address, failed (0/1),
    # then the epoch: the kernels read this table, so a captured graph holds no host state.
    table: torch.Tensor
    rank: int
    world: int
    width: int  # values a slot holds: the hidden size
    timeout_ns: int

    @classmethod
    def over(cls, regions: list[int], record_address: int, rank: int, width: int, device: torch.device,
             timeout_s: float) -> Exchange:
        """`regions`: each rank's region (`region_bytes` long, zeroed); `record_address`: RECORD zeroed
        int64s the kernels can write."""
        table = torch.tensor(regions + [record_address, 0, 0], dtype=torch.int64, device=device)
        return cls(table, rank, len(regions), width, int(timeout_s * 1e9))

    def begin_step(self) -> None:
        """Bump the epoch: once at the start of every forward that fuses, on every rank."""
        self.table[-1:].add_(1)


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
