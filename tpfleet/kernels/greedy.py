"""The greedy token of a batch-1 decode step, chosen on the GPU in one kernel after the LM head.

The sampler's way is a float copy of the logits and torch's argmax, which reduces one row in one
block (8 us for Qwen3's 151936 tokens on H200); at TP > 1 the driver must first gather every rank's
vocabulary shard with NCCL and then broadcast its token back, because the next step's input lives
on every rank. Here each block of one kernel reduces its slice of this rank's shard to its best
(logit, token) and takes a ticket; the last block to arrive reduces those. At TP > 1 it then sends
this rank's best to its peers through the fused all-reduce's slots (tpfleet.kernels.fused_ar), takes
theirs, and picks the winner. Every rank ends with the token: nothing is gathered or broadcast.

Ties go to the lowest token, as torch's argmax breaks them: within a slice, across slices, and
across ranks (a later rank's shard holds higher tokens, so it wins only with a greater logit).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tpfleet.kernels import fused_ar, pdl
from tpfleet.kernels.arrivals import last_to_arrive
from tpfleet.kernels.fused_ar import Exchange

BLOCK = 2048  # logits per block: 38 blocks for a TP=2 shard of Qwen3's vocabulary, one wave


@triton.jit
def _agree(token, best, xchg, site, rank, N, timeout_ns, WORLD: tl.constexpr):
    """The winning token over the ranks, given this rank's `best` logit at `token`. Each rank's entry
    is three 16-bit lanes at the start of its slot: the logit's bits and the token's two halves."""
    lane = tl.arange(0, 4)
    mine = tl.where(lane == 0, best.to(tl.int16, bitcast=True).to(tl.int32),
                    tl.where(lane == 1, token & 0xFFFF, tl.where(lane == 2, token >> 16, 0))).to(tl.int16)
    flag, failed = fused_ar.send(xchg, site, rank, lane, mine, N, WORLD)
    top = tl.full([], float("-inf"), tl.float32)
    winner = token
    complete = 0
    for r in tl.static_range(WORLD):  # in rank order, so a later rank (higher tokens) wins only when greater
        lanes, done = fused_ar.receive(xchg, site, rank, r, lane, mine, N, flag, failed, timeout_ns, WORLD)
        lanes = lanes.to(tl.int32) & 0xFFFF
        logit = tl.sum(tl.where(lane == 0, lanes, 0)).to(tl.int16).to(best.dtype, bitcast=True).to(tl.float32)
        tok = tl.sum(tl.where(lane == 1, lanes, 0)) | (tl.sum(tl.where(lane == 2, lanes, 0)) << 16)
        winner = tl.where(logit > top, tok, winner)
        top = tl.maximum(top, logit)
        complete += done
    fused_ar.report(xchg, site, complete, failed, WORLD)
    return winner


@triton.jit
def _greedy_kernel(logits, n, start, part_logit, part_token, arrivals, out, xchg, site, rank, N, timeout_ns,
                   BLOCK: tl.constexpr, PARTS: tl.constexpr, WORLD: tl.constexpr, PDL: tl.constexpr):
    pid = tl.program_id(0)
    blocks = tl.num_programs(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    pdl.enter(PDL)
    x = tl.load(logits + offs, mask=offs < n, other=float("-inf"))
    best = tl.max(x.to(tl.float32), axis=0)
    tl.store(part_logit + pid, best)
    tl.store(part_token + pid, tl.min(tl.where(x.to(tl.float32) == best, offs, n), axis=0))
    if last_to_arrive(arrivals, blocks):  # the last block reduces the blocks' partials
        p = tl.arange(0, PARTS)
        logit = tl.load(part_logit + p, mask=p < blocks, other=float("-inf"), cache_modifier=".cg")
        top = tl.max(logit, axis=0)
        token = tl.load(part_token + p, mask=p < blocks, other=n, cache_modifier=".cg")
        # NaN logits match nothing: the token is then clamped into the shard, never out of the vocabulary
        token = tl.minimum(tl.min(tl.where(logit == top, token, n), axis=0), n - 1) + start
        if WORLD > 0:
            token = _agree(token, top.to(x.dtype), xchg, site, rank, N, timeout_ns, WORLD)
        tl.store(out, token.to(tl.int64))


class GreedyScratch:
    """The kernel's partials and its arrival counter, which it leaves zeroed: allocated once, so a
    step allocates nothing but its one-token output."""

    def __init__(self, n: int, device: torch.device):
        self.n, self.blocks = n, triton.cdiv(n, BLOCK)
        self.logits = torch.empty(self.blocks, dtype=torch.float32, device=device)
        self.tokens = torch.empty(self.blocks, dtype=torch.int32, device=device)
        self.arrivals = torch.zeros(1, dtype=torch.int32, device=device)


def greedy_token(logits: torch.Tensor, start: int, scratch: GreedyScratch,
                 exchange: Exchange | None = None, site: int = 0) -> torch.Tensor:
    """The argmax token of one row of logits, [1] int64. `logits` is this rank's shard (column 0 is
    token `start`); with `exchange` (TP > 1) the ranks agree on the whole row's argmax through `site`,
    and every rank returns it."""
    n = logits.shape[-1]
    if logits.shape[0] != 1 or logits.stride(-1) != 1 or n != scratch.n:
        raise ValueError(f"greedy_token takes one contiguous row of {scratch.n} logits, not {tuple(logits.shape)}")
    out = torch.empty(1, dtype=torch.int64, device=logits.device)
    use_pdl = pdl.enabled(logits.device, 1)
    _greedy_kernel[(scratch.blocks,)](
        logits, n, start, scratch.logits, scratch.tokens, scratch.arrivals, out,
        exchange.table if exchange is not None else out, site, exchange.rank if exchange else 0,
        exchange.width if exchange else 0, exchange.timeout_ns if exchange else 0,
        BLOCK=BLOCK, PARTS=triton.next_power_of_2(scratch.blocks), WORLD=exchange.world if exchange else 0,
        PDL=use_pdl, launch_pdl=use_pdl, num_warps=8)
    return out
