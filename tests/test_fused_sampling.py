"""The one-pass sampling kernel: greedy rows take torch's argmax, sampled rows follow the softmax of
logits / temperature, every logprob is log_softmax's, and seeded rows do not depend on the batch.
Run in Triton's interpreter on the CPU and on a GPU."""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA, run_in_triton_interpreter

pytest.importorskip("triton")


def check_logprobs_and_greedy(device: str, dtype: torch.dtype, vocab: int) -> None:
    from tpfleet.kernels.sampling import fused_sample

    g = torch.Generator().manual_seed(vocab)
    x = (torch.randn(6, vocab, generator=g) * 4).to(device=device, dtype=dtype)
    x[2, 5] = x[2, 9] = x[2].max() + 1  # a tie: the lowest token wins, as torch's argmax
    x[3, : vocab // 2] = float("-inf")  # masked tokens add nothing to the normaliser
    temps = torch.tensor([-1.0, 0.7, -1.0, 1.0, -0.5, 2.0], device=device)
    seeds = torch.arange(6, dtype=torch.int64, device=device)
    tokens, logprobs, lse = fused_sample(x, temps, seeds)
    scaled = x.float() / temps.abs()[:, None]
    greedy = temps < 0
    assert torch.equal(tokens[greedy], x.float()[greedy].argmax(-1)) and tokens[2] == 5
    assert bool((tokens[3] >= vocab // 2).all())
    expected = scaled.log_softmax(-1).gather(1, tokens[:, None]).squeeze(1)
    torch.testing.assert_close(logprobs, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, scaled.logsumexp(-1), atol=1e-5, rtol=1e-5)


def check_distribution(device: str, rows: int) -> None:
    """Rows of the same logits with distinct seeds: the tokens' frequencies are the softmax's."""
    from tpfleet.kernels.sampling import fused_sample

    probs = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
    temperature = 0.8
    logits = (probs.log() * temperature).repeat(rows, 1).to(device)
    temps = torch.full((rows,), temperature, device=device)
    tokens, _, _ = fused_sample(logits, temps, torch.arange(rows, dtype=torch.int64, device=device) * 7919)
    freq = torch.bincount(tokens.cpu(), minlength=5).float() / rows
    assert torch.allclose(freq, probs, atol=4 * (0.25 / rows) ** 0.5), freq  # four standard deviations


def check_seeds(device: str) -> None:
    from tpfleet.kernels.sampling import fused_sample

    x = torch.randn(3, 1000, generator=torch.Generator().manual_seed(1)).to(device)
    temps = torch.full((3,), 1.0, device=device)
    a, _, _ = fused_sample(x, temps, torch.tensor([11, 12, 13], device=device))
    b, _, _ = fused_sample(x[[1, 0, 2]], temps, torch.tensor([12, 11, 13], device=device))
    assert a.tolist() == b[[1, 0, 2]].tolist()  # the seed, not the row, decides
    draws = {fused_sample(x[:1], temps[:1], torch.tensor([s], device=device))[0].item() for s in range(40)}
    assert len(draws) > 5  # other seeds, other tokens


def interpreter_main() -> None:
    """Run by run_in_triton_interpreter: Triton on the CPU."""
    check_logprobs_and_greedy("cpu", torch.float32, 5000)
    check_distribution("cpu", 2000)
    check_seeds("cpu")
    print("interpreter: the fused sampler matches")


def test_fused_sampling_in_the_interpreter():
    assert "the fused sampler matches" in run_in_triton_interpreter("test_fused_sampling")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
@pytest.mark.parametrize("vocab", [1000, 4097, 151936])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_sampling_on_gpu(vocab, dtype):
    check_logprobs_and_greedy("cuda", dtype, vocab)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
def test_fused_sampling_distribution_and_seeds_on_gpu():
    check_distribution("cuda", 200_000)
    check_seeds("cuda")
