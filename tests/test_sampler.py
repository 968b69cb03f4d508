from __future__ import annotations

import pytest
import torch
from conftest import DEVICES

from tpfleet.engine.sampler import sample
from tpfleet.engine.sequence import SamplingParams, Sequence


def seqs(*params, device="cpu"):
    return [Sequence(str(i), [1], p, (), 100, torch.device(device)) for i, p in enumerate(params)]


def draw(x, batch):
    """The sampled tokens, read back: `sample` leaves them on the device."""
    return sample(x, batch).tokens.tolist()


def logits(rows=1, vocab=50, seed=0):
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_forms_pick_the_argmax():
    x = logits(4)
    out = draw(x, seqs(SamplingParams(temperature=0.0), SamplingParams(top_k=1),
                         SamplingParams(temperature=1.0, top_p=1e-6, seed=1),
                         SamplingParams(temperature=1.0, min_p=1.0, seed=2)))
    assert out == x.argmax(-1).tolist()


def test_top_k_restricts_to_the_k_best():
    x = logits(1)
    top3 = set(x[0].topk(3).indices.tolist())
    s = seqs(SamplingParams(temperature=5.0, top_k=3, seed=0))[0]
    drawn = {draw(x, [s])[0] for _ in range(200)}
    assert drawn <= top3 and len(drawn) > 1


def test_sampling_follows_the_softmax():
    x = torch.tensor([[0.0, 1.0, 2.0, -1.0]])
    s = seqs(SamplingParams(temperature=1.0, seed=42))[0]
    counts = torch.bincount(torch.tensor([draw(x, [s])[0] for _ in range(4000)]), minlength=4).float()
    assert torch.allclose(counts / 4000, x.softmax(-1)[0], atol=0.03)


def test_top_p_keeps_the_smallest_set_reaching_p():
    x = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    s = seqs(SamplingParams(temperature=1.0, top_p=0.7, seed=3))[0]
    drawn = {draw(x, [s])[0] for _ in range(300)}
    assert drawn == {0, 1}


def test_seeded_rows_are_reproducible_and_independent_of_the_batch():
    x = logits(3, seed=5)
    p = SamplingParams(temperature=1.0, seed=99)
    alone = [draw(x[1:2], seqs(p))[0] for _ in range(1)]
    batch_seqs = seqs(SamplingParams(temperature=1.0), p, SamplingParams(temperature=0.7))
    together = draw(x, batch_seqs)[1]
    assert together == alone[0]


@pytest.mark.parametrize("device", DEVICES)
def test_a_seeded_row_samples_alike_whatever_its_neighbours_filter(device):
    """Eight steps of a seeded request, alone and in batches whose other rows filter or not: the same tokens
    (a neighbour's top-k once changed the order the seeded row's noise met the vocabulary in, and on a GPU
    moved the row off the one-pass kernel)."""
    x = logits(3, vocab=1000, seed=5).to(device)
    for p in (SamplingParams(temperature=1.0, seed=99), SamplingParams(temperature=1.0, top_k=40, seed=7),
              SamplingParams(temperature=0.8, top_p=0.9, seed=11)):
        def steps(neighbours: list[SamplingParams]) -> list[int]:
            batch = seqs(*neighbours[:1], p, *neighbours[1:], device=device)
            row = len(neighbours[:1])
            rows = x[1 - row: 1 - row + len(batch)]
            return [draw(rows, batch)[row] for _ in range(8)]

        alone = steps([])
        for neighbours in ([SamplingParams(temperature=1.0)], [SamplingParams(top_k=5), SamplingParams(top_p=0.5)],
                           [SamplingParams(min_p=0.2)], [SamplingParams(temperature=0.0)]):
            assert steps(neighbours) == alone, (p, neighbours)
