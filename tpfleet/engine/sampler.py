"""Per-request sampling over a batch of logits: penalties, greedy, temperature, top-k, top-p, min-p,
seeds, and the logprobs of what was sampled.

Before sampling, a row's logits are adjusted in this order: `logit_bias` added; repetition penalty
(SGLang's rule: over the prompt and output tokens, a positive logit is divided by it, a negative one
multiplied); frequency and presence penalties (over the output tokens); and, until `min_new_tokens`
are out, the stop tokens masked. The row is then divided by its temperature (0 counts as 1).

Sampling uses the exponential-race form (argmax of p / E with E ~ Exp(1)), which draws exactly
from p, every row in vocabulary order; top-k and top-p sort only their own rows, to mask them. On a
GPU, rows without top-k, top-p or min-p run the race and the logprobs in one pass over the logits
(tpfleet.kernels.sampling), their noise keyed per row, and the others the torch path. A request with a
seed draws its noise from its own generator (in the one-pass kernel: from its seed and position), so its
output does not depend on what else shares the batch.

Logprobs are log_softmax(adjusted logits / temperature), in float32: after the adjustments and the
temperature, before top-k, top-p and min-p cut the distribution, as SGLang returns them and as a trainer
recomputes them from its own logits. They stay on the device with
the tokens, so the one copy home that reads the tokens reads them too.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from tpfleet.engine.sequence import Sequence
from tpfleet.engine.step_input import to_device

try:
    from tpfleet.kernels.sampling import fused_sample
except ImportError:  # no Triton: the torch path serves every device
    fused_sample = None


@dataclass
class SamplerOutput:
    """One step's results on the device: a row per sampled sequence, and a row per scored prompt
    position (input logprobs). Fields a step did not ask for are None."""
    tokens: torch.Tensor  # [rows] int64
    logprobs: torch.Tensor | None = None  # [rows] float32: each sampled token's
    top_logprobs: torch.Tensor | None = None  # [rows, k] float32, most likely first
    top_ids: torch.Tensor | None = None  # [rows, k] int64
    prompt_logprobs: torch.Tensor | None = None  # [scored] float32: each next prompt token's
    prompt_top_logprobs: torch.Tensor | None = None  # [scored, k] float32
    prompt_top_ids: torch.Tensor | None = None  # [scored, k] int64

    def tensors(self) -> dict[str, torch.Tensor]:
        """The fields that are set, by name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


def temperatures(seqs: list[Sequence], device: torch.device) -> torch.Tensor:
    return to_device([s.params.temperature or 1.0 for s in seqs], torch.float32, device)


def adjust_logits(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """Apply logit bias, penalties and the min_new_tokens mask in place (see the module doc). Penalties
    read each sequence's tokens on the host: the engine reads back a penalized sequence's every step
    before launching the next."""
    dev = logits.device
    for row, seq in enumerate(seqs):
        params = seq.params
        if not params.adjusts_logits:
            continue
        if params.logit_bias:
            ids = to_device(list(params.logit_bias), torch.int64, dev)
            logits[row].index_add_(0, ids, to_device(list(params.logit_bias.values()), logits.dtype, dev))
        if params.repetition_penalty != 1.0:
            seen = to_device(sorted(set(seq.token_ids)), torch.int64, dev)
            values = logits[row, seen]
            logits[row, seen] = torch.where(values > 0, values / params.repetition_penalty,
                                            values * params.repetition_penalty)
        if params.frequency_penalty or params.presence_penalty:
            counts = torch.bincount(to_device(seq.completion_ids, torch.int64, dev),
                                    minlength=logits.shape[-1]).to(logits.dtype)
            logits[row] -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)
        if seq.num_tokens - seq.num_prompt_tokens < params.min_new_tokens and seq.stop_ids:
            logits[row, to_device(sorted(seq.stop_ids), torch.int64, dev)] = float("-inf")


def _draw(scaled: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """One token per row from softmax(scaled), filtered by each row's top-k, top-p and min-p. Every row races
    in vocabulary order, a filter being only a mask over it: a seeded row's noise meets the same tokens
    whatever its neighbours filter."""
    dev = scaled.device
    vocab = scaled.shape[-1]
    probs = scaled.softmax(dim=-1)
    drop = torch.zeros_like(probs, dtype=torch.bool)
    filtered = [i for i, s in enumerate(seqs) if s.params.top_k > 0 or s.params.top_p < 1.0]
    if filtered:
        rows = to_device(filtered, torch.int64, dev)
        ranked, order = probs[rows].sort(dim=-1, descending=True, stable=True)
        params = [seqs[i].params for i in filtered]
        top_k = to_device([p.top_k if p.top_k > 0 else vocab for p in params], torch.int64, dev)
        top_p = to_device([p.top_p if p.top_p < 1.0 else float("inf") for p in params], torch.float32, dev)
        cut = torch.arange(vocab, device=dev)[None, :] >= top_k[:, None]
        cut |= (ranked.cumsum(dim=-1) - ranked) > top_p[:, None]  # keeps the token that crosses top_p
        drop[rows] = cut.scatter(1, order, cut)
    if any(s.params.min_p > 0.0 for s in seqs):
        min_p = to_device([s.params.min_p for s in seqs], torch.float32, dev)
        drop |= probs < min_p[:, None] * probs.amax(dim=-1, keepdim=True)
    probs = probs.masked_fill(drop, 0.0)

    noise = torch.empty_like(probs).exponential_()
    for i, s in enumerate(seqs):
        if s.generator is not None:
            noise[i].exponential_(generator=s.generator)
    return (probs / noise).argmax(dim=-1)


SEED_MIX = 0x9E3779B97F4A7C15  # spreads consecutive seeds apart before the position is added


def _row_seeds(seqs: list[Sequence]) -> list[int]:
    """The fused kernel's noise keys, one per row: a seeded request's from its seed and the position
    it samples (so the batch around it changes nothing), the others' from torch's generator."""
    seeds = torch.randint(1 << 62, (len(seqs),)).tolist()
    for row, seq in enumerate(seqs):
        if seq.params.seed is not None and not seq.params.greedy:
            seeds[row] = (seq.params.seed * SEED_MIX + seq.num_tokens) % (1 << 62)
    return seeds


def _sample_fused(logits: torch.Tensor, seqs: list[Sequence], wants_logprobs: bool, k: int) -> SamplerOutput:
    """The one-pass kernel (tpfleet.kernels.sampling): rows without top-k, top-p or min-p, on a GPU."""
    dev = logits.device
    if any(s.params.adjusts_logits for s in seqs):
        logits = logits.to(torch.float32, copy=True)  # the caller's logits stay as the model gave them
        adjust_logits(logits, seqs)
    temps = to_device([-(s.params.temperature or 1.0) if s.params.greedy else s.params.temperature for s in seqs],
                      torch.float32, dev)
    tokens, logprobs, lse = fused_sample(logits, temps, to_device(_row_seeds(seqs), torch.int64, dev))
    out = SamplerOutput(tokens)
    if wants_logprobs:
        out.logprobs = logprobs
        if k:
            values, out.top_ids = logits.topk(k, dim=-1)  # the same order as logits / temperature
            out.top_logprobs = values.float() / temps.abs()[:, None] - lse[:, None]
    return out


def _sample_torch(logits: torch.Tensor, seqs: list[Sequence], wants_logprobs: bool, k: int) -> SamplerOutput:
    logits = logits.float()
    if any(s.params.adjusts_logits for s in seqs):
        logits = logits.clone()  # the caller's logits stay as the model gave them
        adjust_logits(logits, seqs)
    greedy_ids = logits.argmax(dim=-1)
    if all(s.params.greedy for s in seqs) and not wants_logprobs:
        return SamplerOutput(greedy_ids)

    scaled = logits / temperatures(seqs, logits.device)[:, None]
    tokens = greedy_ids
    if not all(s.params.greedy for s in seqs):
        is_greedy = to_device([s.params.greedy for s in seqs], torch.bool, logits.device)
        tokens = torch.where(is_greedy, greedy_ids, _draw(scaled, seqs))
    out = SamplerOutput(tokens)
    if wants_logprobs:
        logprobs = scaled.log_softmax(dim=-1)
        out.logprobs = logprobs.gather(1, tokens[:, None]).squeeze(1)
        if k:
            out.top_logprobs, out.top_ids = logprobs.topk(k, dim=-1)
    return out


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
    """One token per row, and the logprobs the rows' requests ask for, left on the logits' device:
    reading them back is the caller's choice. On a GPU, rows without filters take the fused kernel and the
    others the torch path, each row the same path whatever shares its batch (their seeded noise differs)."""
    wants_logprobs = any(s.options.return_logprob for s in seqs)
    k = max(s.options.top_logprobs_num for s in seqs) if wants_logprobs else 0
    if fused_sample is None or not logits.is_cuda:
        return _sample_torch(logits, seqs, wants_logprobs, k)
    plain = [i for i, s in enumerate(seqs) if not s.params.filters]
    if len(plain) == len(seqs):
        return _sample_fused(logits, seqs, wants_logprobs, k)
    if not plain:
        return _sample_torch(logits, seqs, wants_logprobs, k)
    rest = [i for i, s in enumerate(seqs) if s.params.filters]
    merged: dict[str, torch.Tensor] = {}
    for rows, path in ((plain, _sample_fused), (rest, _sample_torch)):
        index = to_device(rows, torch.int64, logits.device)
        part = path(logits.index_select(0, index), [seqs[i] for i in rows], wants_logprobs, k)
        for name, tensor in part.tensors().items():
            if name not in merged:
                merged[name] = tensor.new_empty((len(seqs), *tensor.shape[1:]))
            merged[name].index_copy_(0, index, tensor.to(merged[name].dtype))
    return SamplerOutput(**merged)


def score_prompt(logits: torch.Tensor, seqs: list[Sequence], targets: list[int], out: SamplerOutput) -> None:
    """Input logprobs: row i's logits predict prompt token targets[i] of seqs[i]. Scaled by the request's
    temperature as its samples are; no penalties (nothing was sampled there)."""
    dev = logits.device
    logprobs = (logits.float() / temperatures(seqs, dev)[:, None]).log_softmax(dim=-1)
    out.prompt_logprobs = logprobs.gather(1, to_device(targets, torch.int64, dev)[:, None]).squeeze(1)
    k = max(s.options.top_logprobs_num for s in seqs)
    if k:
        out.prompt_top_logprobs, out.prompt_top_ids = logprobs.topk(k, dim=-1)
