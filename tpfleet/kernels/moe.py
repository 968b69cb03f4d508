"""Mixture-of-experts routing and expert computation in plain torch: the CPU path, and the oracle a
fused GPU kernel is checked against.

Experts are stacked as the model stores them: `w_gate_up` [experts, 2 * inter, hidden] (gate rows,
then up rows) and `w_down` [experts, hidden, inter]. A rank may hold a slice of every expert's
intermediate dimension (tensor parallel) or a contiguous range of whole experts (expert parallel);
either way its output is a partial sum that one all-reduce completes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's top-k experts and their weights, as Qwen3-MoE picks them: softmax over all
    experts in float32 (so bf16 logits rank the same on every rank and engine), then the k largest,
    rescaled to sum to one when `renormalize` (norm_topk_prob). Returns (weights float32, ids int64),
    both [tokens, top_k], heaviest first."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def moe_reference(hidden: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, topk_ids: torch.Tensor,
                  topk_weights: torch.Tensor, first_expert: int = 0) -> torch.Tensor:
    """sum over a token's chosen experts of weight * down(silu(gate(x)) * up(x)), for the experts this
    rank holds: global ids [first_expert, first_expert + len(w_gate_up)). Tokens routed elsewhere get
    zeros. One expert at a time, only over the tokens routed to it; the index lookups wait for the
    host, so this is no CUDA-graph path. Accumulates in float32, returns hidden's dtype."""
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    for local in range(w_gate_up.shape[0]):
        tokens, slots = torch.nonzero(topk_ids == first_expert + local, as_tuple=True)
        if tokens.numel() == 0:
            continue
        gate, up = F.linear(hidden[tokens], w_gate_up[local]).chunk(2, dim=-1)
        expert_out = F.linear(F.silu(gate) * up, w_down[local])
        out.index_add_(0, tokens, expert_out.float() * topk_weights[tokens, slots, None])
    return out.to(hidden.dtype)
