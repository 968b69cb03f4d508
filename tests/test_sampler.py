from __future__ import annotations

import torch

from tpfleet.engine.sampler import sample
from tpfleet.engine.sequence import SamplingParams, Sequence


def seqs(*params):
    return [Sequence(str(i), [1], p, (), 100, torch.device("cpu")) for i, p in enumerate(params)]


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
