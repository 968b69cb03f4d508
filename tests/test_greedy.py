"""The greedy token picked on the GPU after the LM head (tpfleet.kernels.greedy) against torch's argmax,
in Triton's interpreter on the CPU and on a GPU. Several ranks' agreement is tested with the fused
all-reduce (tests/test_fused_ar.py) and in the engine (tests/test_model_parity.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA, run_in_triton_interpreter

pytest.importorskip("triton")


def rows(n: int, dtype: torch.dtype, seed: int) -> list[tuple[str, torch.Tensor]]:
    """Rows whose argmax is hard to get right: in the last, partial block; tied across blocks and
    within one; on the first and last token; a row of one value. Cases a short row cannot hold are left out."""
    from tpfleet.kernels.greedy import BLOCK

    g = torch.Generator().manual_seed(seed)

    def rnd() -> torch.Tensor:
        return torch.randn(1, n, generator=g).to(dtype)

    cases = []
    for name, spots in (("last block", [n - 3]), ("tie across blocks", [BLOCK + 5, 2 * BLOCK + 1]),
                        ("tie in a block", [BLOCK + 9, BLOCK + 7]), ("first token", [0, n - 1]),
                        ("last token", [n - 1])):
        if max(spots) >= n:
            continue
        row = rnd()
        row[0, spots] = 9.0
        cases.append((name, row))
    cases.append(("all equal", torch.full((1, n), -2.5, dtype=dtype)))
    cases.append(("random", rnd()))
    return cases


def check(n: int, dtype: torch.dtype, device: str, start: int = 0) -> int:
    """Every case through one scratch (its counter must reset between steps). Returns the number checked."""
    from tpfleet.kernels.greedy import GreedyScratch, greedy_token

    scratch = GreedyScratch(n, torch.device(device))
    checked = 0
    for name, row in rows(n, dtype, seed=n):
        got = greedy_token(row.to(device), start, scratch)
        assert got.dtype == torch.int64 and got.shape == (1,), name
        assert int(got) == start + int(row.float().argmax()), (name, n, int(got))
        checked += 1
    return checked


def interpreter_main() -> None:
    for n in (5000, 6144):  # a partial last block, and whole blocks
        assert check(n, torch.float16, "cpu", start=1000) == 7
    assert check(300, torch.float32, "cpu") == 5  # one block, fp32 as the CPU engine runs
    print("interpreter: greedy token is the argmax")


def test_greedy_token_is_the_argmax_in_the_interpreter():
    assert "greedy token is the argmax" in run_in_triton_interpreter("test_greedy")


def test_a_row_of_another_length_is_refused():
    from tpfleet.kernels.greedy import GreedyScratch, greedy_token

    with pytest.raises(ValueError, match=r"one contiguous row of 100 logits, not \(1, 99\)"):
        greedy_token(torch.zeros(1, 99), 0, GreedyScratch(100, torch.device("cpu")))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_greedy_token_is_the_argmax_on_gpu(dtype):
    assert check(151936, dtype, "cuda") == 7  # Qwen3's vocabulary
