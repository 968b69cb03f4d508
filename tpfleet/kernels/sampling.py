"""Sampling and its logprob in one pass over each row of logits, on the GPU.

torch's way (tpfleet.engine.sampler) reads a batch's logits about ten times: a float copy, the
temperature division, softmax, the filter mask, exponential noise, the race, and log_softmax for
the logprobs. At batch 256 and Qwen3's 151936 tokens that is over a gigabyte per step. Here one
program per row streams its logits once and keeps, across tiles:

- the running maximum and sum of exponentials of x = logit / temperature (an online log-sum-exp),
  so the sampled token's logprob is x[token] - lse, the log_softmax the sampler defines;
- the race winner: argmax(x - log E) with E ~ Exp(1) drawn per (row, token), which picks token i
  with probability softmax(x)_i exactly (the exponential race the torch path runs, in log space).
  A greedy row (temperature 0) races without noise: the plain argmax, ties to the lowest token.

The noise is Philox keyed by the row's seed and the token's index, so a seeded request draws the
same numbers whatever else shares the batch. Top-k, top-p and min-p need the sorted or normalised
row and stay on the torch path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096  # logits per tile: 38 tiles for Qwen3's vocabulary


@triton.jit
def _sample_kernel(logits, stride, n, temps, seeds, tokens, logprobs, lse_out, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    temp = tl.load(temps + row)  # negative: a greedy row, whose logprobs are scaled by -temp
    greedy = temp < 0
    inv_t = 1.0 / tl.abs(temp)
    seed = tl.load(seeds + row)
    offs = tl.arange(0, BLOCK)
    m = tl.full([BLOCK], float("-inf"), tl.float32)  # per lane: running max and sum of exp(x - max)
    s = tl.zeros([BLOCK], tl.float32)
    best = tl.full([BLOCK], float("-inf"), tl.float32)  # per lane: the race's best score, its x and token
    best_x = tl.full([BLOCK], float("-inf"), tl.float32)
    best_tok = tl.full([BLOCK], 0, tl.int32)
    for start in range(0, n, BLOCK):
        idx = start + offs
        ok = idx < n
        x = tl.load(logits + row * stride + idx, mask=ok, other=float("-inf")).to(tl.float32) * inv_t
        m_new = tl.maximum(m, x)
        # -inf logits (masked tokens, the tail past n) add nothing, and a lane of them only keeps s at 0
        s = s * tl.exp(tl.where(m_new == float("-inf"), 0.0, m - m_new)) + tl.where(x > float("-inf"),
                                                                                     tl.exp(x - m_new), 0.0)
        m = m_new
        if greedy:
            score = x
        else:
            u = tl.rand(seed, idx)  # uniform in [0, 1)
            score = x - tl.log(-tl.log(1.0 - u))  # x - log E with E = -log(1 - u) ~ Exp(1)
        score = tl.where(ok, score, float("-inf"))
        take = score > best  # a lane keeps its first best: its indices only grow
        best = tl.where(take, score, best)
        best_x = tl.where(take, x, best_x)
        best_tok = tl.where(take, idx, best_tok)
    top = tl.max(best, 0)
    token = tl.min(tl.where(best == top, best_tok, n), 0)  # ties to the lowest token
    token = tl.minimum(token, n - 1)  # a row of NaNs matches nothing: stay inside the vocabulary
    x_tok = tl.max(tl.where(best_tok == token, best_x, float("-inf")), 0)
    row_max = tl.max(m, 0)
    total = tl.sum(tl.where(m == float("-inf"), 0.0, s * tl.exp(m - row_max)), 0)
    lse = row_max + tl.log(total)
    tl.store(tokens + row, token.to(tl.int64))
    tl.store(logprobs + row, x_tok - lse)
    tl.store(lse_out + row, lse)


def fused_sample(logits: torch.Tensor, temperatures: torch.Tensor,
                 seeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of `logits` [rows, vocab]: the sampled token (int64), its logprob and the row's
    log-sum-exp of logits / |temperature| (float32). A negative temperature marks a greedy row: the
    argmax, its logprob scaled by -temperature. `seeds` (int64, one per row) key the row's noise."""
    rows, n = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    tokens = torch.empty(rows, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        _sample_kernel[(rows,)](logits, logits.stride(0), n, temperatures, seeds, tokens, logprobs, lse,
                                BLOCK=BLOCK, num_warps=8)
    return tokens, logprobs, lse
