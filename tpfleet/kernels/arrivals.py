"""The last program to arrive finishes the work: a kernel's programs each store their share, count
themselves in, and the last one reads every share back, so no second kernel is launched for it (the
split decode attention merges its splits this way, a one-row MoE router GEMV routes, the greedy kernel
picks its token, the skinny GEMM sums its K slices).

Each counter starts at zero and the last arrival sets it back to zero, so a CUDA graph replays the
kernel with the same counter. Counters are grown, never freed: a graph may hold the address of any.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_held: dict[tuple[str, torch.device], list[torch.Tensor]] = {}


def counters(owner: str, device: torch.device, n: int) -> torch.Tensor:
    """At least `n` zeroed int32 counters on `device` for `owner`'s kernel alone: two kernels that may
    overlap (under PDL) never share one."""
    held = _held.setdefault((owner, device), [])
    if not held or held[-1].numel() < n:
        held.append(torch.zeros(max(n, 1024), dtype=torch.int32, device=device))
    return held[-1]


def held(owner: str, device: torch.device) -> list[torch.Tensor]:
    """Every counter `owner` was given on `device` (for tests: all of them should read zero)."""
    return _held.get((owner, device), [])


@triton.jit
def last_to_arrive(counter, expected):
    """Count this program in at `counter`; True in the last of `expected` programs, which resets it. Every
    thread's stores are ordered before the arrival (a barrier, then a release); the last arrival's
    acquire makes the others' stores visible to it (read them with cache_modifier=".cg")."""
    tl.debug_barrier()
    arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
    last = arrived == expected - 1
    if last:
        tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")
    return last
