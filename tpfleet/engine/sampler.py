"""Per-request sampling over a batch of logits: greedy, temperature, top-k, top-p, min-p and seeds.

Sampling uses the exponential-race form (argmax of p / E with E ~ Exp(1)), which draws exactly
from p. A request with a seed draws its noise from its own generator, so its output does not
depend on what else shares the batch.
"""

from __future__ import annotations

import torch

from tpfleet.engine.sequence import Sequence


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """One token per row, left on the logits' device: reading it back is the caller's choice."""
    logits = logits.float()
    greedy_ids = logits.argmax(dim=-1)
    if all(s.params.greedy for s in seqs):
        return greedy_ids

    dev = logits.device
    temps = torch.tensor([s.params.temperature or 1.0 for s in seqs], device=dev)
    sorted_logits, order = (logits / temps[:, None]).sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)

    vocab = logits.shape[-1]
    top_k = torch.tensor([s.params.top_k if s.params.top_k > 0 else vocab for s in seqs], device=dev)
    top_p = torch.tensor([s.params.top_p for s in seqs], device=dev)
    min_p = torch.tensor([s.params.min_p for s in seqs], device=dev)
    rank = torch.arange(vocab, device=dev)[None, :]
    drop = rank >= top_k[:, None]
    drop |= (probs.cumsum(dim=-1) - probs) > top_p[:, None]  # keeps the token that crosses top_p
    drop |= probs < min_p[:, None] * probs[:, :1]
    probs = probs.masked_fill(drop, 0.0)

    noise = torch.empty_like(probs).exponential_()
    for i, s in enumerate(seqs):
        if s.generator is not None:
            noise[i].exponential_(generator=s.generator)
    choice = (probs / noise).argmax(dim=-1)
    sampled = order.gather(1, choice[:, None]).squeeze(1)
    is_greedy = torch.tensor([s.params.greedy for s in seqs], device=dev)
    return torch.where(is_greedy, greedy_ids, sampled)
