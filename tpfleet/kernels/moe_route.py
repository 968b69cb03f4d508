"""The MoE router's choice in one launch: softmax, top-k, renormalisation and the routing-replay write.

`tpfleet.kernels.moe.route` is five to seven launches on a GPU (softmax, a top-k and the sort inside
it, a sum, a division, the copy into the replay buffer), about 16 us per layer at one token on an
H100, while its bytes are a few hundred per token: a decode step of a 48-layer model spent more on
choosing experts than on any GEMV but the experts'. Here one program per token reads its logits,
picks the k largest, writes their weights, their ids, and the same ids into the replay buffer.

The choice is made on the logits, not on the probabilities: softmax is monotonic, so it is the same
choice, and it is exact (no rounding of the exponential can reorder two experts). Among equal logits
the lower expert id goes first. Weights are computed in float32 as `route` computes them; they may
differ from torch's softmax in the last bit.

At one row (batch-1 decode) the choice needs no launch of its own: the router's GEMV
(`gemv.norm_linear(..., routing=)`) ends with `route_when_last`, where the last of its programs to
store its logits reads them all back and routes, as the split decode attention merges its splits.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from tpfleet.kernels import pdl
from tpfleet.kernels.arrivals import last_to_arrive


class Routing(NamedTuple):
    """Where one forward's routing goes: weights float32 and ids int32, [T, top_k]; `replay` an int32
    [T, top_k] view with unit stride along k (a layer's column of the routing-replay buffer) or None."""
    weights: torch.Tensor
    ids: torch.Tensor
    replay: torch.Tensor | None
    top_k: int
    renormalize: bool


def routing_for(tokens: int, num_experts: int, top_k: int, renormalize: bool, device: torch.device,
                replay: torch.Tensor | None = None) -> Routing:
    """Empty outputs for the routing of `tokens` rows, after checking top_k and the replay view."""
    if not 0 < top_k <= num_experts:
        raise ValueError(f"top_k ({top_k}) must be in 1..{num_experts} (the experts)")
    if replay is not None and (replay.dtype != torch.int32 or replay.shape != (tokens, top_k) or replay.stride(1) != 1):
        raise ValueError(f"replay must be int32 [{tokens}, {top_k}] with unit stride along k, "
                         f"not {replay.dtype} {list(replay.shape)} strides {replay.stride()}")
    return Routing(torch.empty(tokens, top_k, dtype=torch.float32, device=device),
                   torch.empty(tokens, top_k, dtype=torch.int32, device=device), replay, top_k, renormalize)


@triton.jit
def route_row(logits, num_experts, weights, ids, replay, TOP_K: tl.constexpr, K_P2: tl.constexpr,
              E_P2: tl.constexpr, RENORMALIZE: tl.constexpr, REPLAY: tl.constexpr, CACHED: tl.constexpr):
    """One token's choice: its logits row in, its weights, ids and replay ids out (pointers at the row).
    CACHED=False reads the logits past L1, for logits other programs of this kernel wrote."""
    experts = tl.arange(0, E_P2)
    if CACHED:
        x = tl.load(logits + experts, mask=experts < num_experts, other=float("-inf"))
    else:
        x = tl.load(logits + experts, mask=experts < num_experts, other=float("-inf"), cache_modifier=".cg")
    x = x.to(tl.float32)
    p = tl.exp(x - tl.max(x, axis=0))  # 0 past the last expert
    slots = tl.arange(0, K_P2)
    chosen_w = tl.zeros([K_P2], dtype=tl.float32)
    chosen = tl.zeros([K_P2], dtype=tl.int32)
    left = x
    for j in tl.static_range(TOP_K):
        best = tl.minimum(tl.argmax(left, axis=0, tie_break_left=True), num_experts - 1)  # in range, even on NaN
        chosen_w = tl.where(slots == j, tl.sum(tl.where(experts == best, p, 0.0), axis=0), chosen_w)
        chosen = tl.where(slots == j, best, chosen)
        left = tl.where(experts == best, float("-inf"), left)
    if RENORMALIZE:
        chosen_w = chosen_w / tl.sum(chosen_w, axis=0)
    else:
        chosen_w = chosen_w / tl.sum(p, axis=0)
    keep = slots < TOP_K
    tl.store(weights + slots, chosen_w, mask=keep)
    tl.store(ids + slots, chosen, mask=keep)
    if REPLAY:
        tl.store(replay + slots, chosen, mask=keep)


@triton.jit
def route_when_last(logits, num_experts, arrivals, weights, ids, replay, TOP_K: tl.constexpr, K_P2: tl.constexpr,
                    E_P2: tl.constexpr, RENORMALIZE: tl.constexpr, REPLAY: tl.constexpr):
    """The epilogue of a one-row router GEMV, run by each program once its logits are stored: the last to
    arrive (tpfleet.kernels.arrivals; `arrivals` from `counters("moe_router", ...)`) routes."""
    if last_to_arrive(arrivals, tl.num_programs(0)):
        route_row(logits, num_experts, weights, ids, replay, TOP_K, K_P2, E_P2, RENORMALIZE, REPLAY, False)


@triton.jit
def _route_kernel(logits, weights, ids, replay, num_experts, logits_stride, replay_stride, TOP_K: tl.constexpr,
                  K_P2: tl.constexpr, E_P2: tl.constexpr, RENORMALIZE: tl.constexpr, REPLAY: tl.constexpr,
                  PDL: tl.constexpr):
    pdl.enter(PDL)  # everything it reads is the router's output
    token = tl.program_id(0).to(tl.int64)
    route_row(logits + token * logits_stride, num_experts, weights + token * TOP_K, ids + token * TOP_K,
              replay + token * replay_stride, TOP_K, K_P2, E_P2, RENORMALIZE, REPLAY, True)


def fused_route(router_logits: torch.Tensor, top_k: int, renormalize: bool,
                replay: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`route`'s (weights float32, ids) for router_logits [T, E], heaviest first, with ids int32; each
    token's ids also go to `replay` (an int32 [T, top_k] view with unit stride along k, e.g. one
    layer's column of the routing-replay buffer) when given."""
    tokens, num_experts = router_logits.shape
    logits = router_logits if router_logits.stride(1) == 1 else router_logits.contiguous()
    r = routing_for(tokens, num_experts, top_k, renormalize, logits.device, replay)
    if tokens:
        use_pdl = pdl.enabled(logits.device, tokens)
        _route_kernel[(tokens,)](logits, r.weights, r.ids, r.ids if replay is None else replay, num_experts,
                                 logits.stride(0), top_k if replay is None else replay.stride(0), TOP_K=top_k,
                                 K_P2=triton.next_power_of_2(top_k), E_P2=triton.next_power_of_2(num_experts),
                                 RENORMALIZE=renormalize, REPLAY=replay is not None, PDL=use_pdl,
                                 launch_pdl=use_pdl, num_warps=1)
    return r.weights, r.ids
