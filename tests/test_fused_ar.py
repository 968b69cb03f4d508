"""The all-reduce fused into the batch-1 row-parallel GEMVs (tpfleet.kernels.fused_ar, its host side
tpfleet.comm.fused_ar) against the
unfused path.

On the CPU, Triton's interpreter runs the kernels of several simulated ranks in one process: their
regions are host memory. It runs one kernel at a time, so a rank's blocks find their peers' values
only if the peers' kernels ran before: each rank's kernel is run after its peers' (see `fused_run`).
On GPUs the real ranks exchange over CUDA IPC (tests/test_comm_gpu.py and the engine parity tests)."""

from __future__ import annotations

import pytest
import torch
from conftest import run_in_triton_interpreter

pytest.importorskip("triton")

HIDDEN, INTER = 64, 160  # the tiny preset's odd sizes
DTYPE = torch.float16  # the interpreter rounds to bf16 by truncation, so bf16 sums would differ


class Ranks:
    """`world` ranks' FusedAllReduce over regions in this process's memory."""

    def __init__(self, world: int, sites: int):
        from tpfleet.comm.fused_ar import FusedAllReduce
        from tpfleet.kernels.fused_ar import region_bytes
        from tpfleet.model.ar_sites import site_name

        self.world = world
        nbytes = region_bytes(sites, HIDDEN, world)
        self.memory = [torch.zeros(nbytes, dtype=torch.uint8) for _ in range(world)]
        self.records = [torch.zeros(4, dtype=torch.int64) for _ in range(world)]
        regions = [m.data_ptr() for m in self.memory]
        self.fused = [FusedAllReduce(regions, (rec.data_ptr(), rec.data_ptr()), r, world, HIDDEN, torch.device("cpu"),
                                     site_name=site_name)
                      for r, rec in enumerate(self.records)]
        self.exchanges = [f.exchange for f in self.fused]

    def fused_run(self, launch) -> list[torch.Tensor]:
        """`launch(rank)` runs one rank's fused GEMV. Each rank's output comes from a run after every
        peer's; the earlier runs, which found values missing, reported it, and those reports are cleared."""
        outs = []
        for r in range(self.world):
            for q in [q for q in range(self.world) if q != r]:
                launch(q)
            outs.append(launch(r))
        for exchange, rec in zip(self.exchanges, self.records):
            rec.zero_()
            exchange.table[-2] = 0  # not failed
        return outs

    def slots(self, site: int) -> list[torch.Tensor]:
        """Each rank's words of `site`: [source rank, HIDDEN]."""
        return [m.view(torch.int32).view(-1, self.world, HIDDEN)[site] for m in self.memory]

    def flags(self, site: int, words: int = HIDDEN) -> set[int]:
        """The flags on the first `words` words of every rank's slots of `site` from its peers (its own
        slot is unused)."""
        return {int(f) for r, w in enumerate(self.slots(site)) for q in range(self.world) if q != r
                for f in ((w[q, :words] >> 16) & 0xFFFF)}

    def own_slots_untouched(self, site: int) -> bool:
        return all(not w[r].any() for r, w in enumerate(self.slots(site)))


def rank_sum(parts: list[torch.Tensor]) -> torch.Tensor:
    """What the custom all-reduce returns: the sum in rank order, in fp32, rounded once."""
    acc = torch.zeros_like(parts[0], dtype=torch.float32)
    for p in parts:
        acc += p.float()
    return acc.to(parts[0].dtype)


def check_steps(world: int, steps: int = 2) -> None:
    """Per step, per rank: o_proj all-reduces in its kernel (site 0), then down (site 1). Every output
    must be bitwise the unfused path's: GEMV, then the custom all-reduce's sum."""
    from tpfleet.kernels import gemv

    g = torch.Generator().manual_seed(world)

    def rnd(*s, scale=0.1):
        return (scale * torch.randn(*s, generator=g)).to(DTYPE)

    ranks = Ranks(world, sites=2)
    w_o = [rnd(HIDDEN, 32) for _ in range(world)]  # each rank's shard of the input features
    w_down = [rnd(HIDDEN, INTER) for _ in range(world)]
    for step in range(1, steps + 1):
        o = [rnd(1, 32, scale=1.0) for _ in range(world)]
        gate_up = [rnd(1, 2 * INTER, scale=1.0) for _ in range(world)]
        for f in ranks.fused:
            f.begin_step()
        for site, launch, x, w in ((0, gemv.linear, o, w_o), (1, gemv.silu_mul_linear, gate_up, w_down)):
            got = ranks.fused_run(lambda r: launch(x[r], w[r], all_reduce=(ranks.exchanges[r], site)))
            expected = rank_sum([launch(x[r], w[r]) for r in range(world)])
            for r in range(world):
                assert torch.equal(got[r], expected), (world, step, site, r)
            assert ranks.flags(site) == {step}, ranks.flags(site)  # every word pushed, flagged with this step
            assert ranks.own_slots_untouched(site)
    for f in ranks.fused:
        f.check()  # nothing timed out


def check_embedding(world: int) -> None:
    """The batch-1 embedding lookup with its all-reduce fused: per token, the row of the rank that holds
    it, on every rank, bitwise the unfused path's (masked lookup, then the sum)."""
    from tpfleet.kernels.ops import embedding_all_reduce

    vocab = 10 * world - 3  # the last shard is short, as with a padded vocabulary
    shard = -(-vocab // world)
    table = (torch.randn(world * shard, HIDDEN, generator=torch.Generator().manual_seed(7))).to(DTYPE)
    ranks = Ranks(world, sites=1)
    for step, token in enumerate((0, shard, vocab - 1), start=1):
        ids = torch.tensor([token])
        for f in ranks.fused:
            f.begin_step()
        got = ranks.fused_run(lambda r: embedding_all_reduce(ids, table[r * shard:(r + 1) * shard], r * shard,
                                                             min((r + 1) * shard, vocab), ranks.exchanges[r], 0))
        parts = [table[token:token + 1] if r == token // shard else torch.zeros(1, HIDDEN, dtype=DTYPE)
                 for r in range(world)]
        for r in range(world):
            assert torch.equal(got[r], rank_sum(parts)) and torch.equal(got[r], table[token:token + 1]), (world, token)
        assert ranks.flags(0) == {step}


def check_greedy(world: int) -> None:
    """The greedy token of logits split over the ranks, chosen on every rank without gathering them: the
    argmax of the whole row, the lowest token on a tie (within a shard and across shards), for tokens
    past 65535 too (their index travels in two 16-bit halves). Each shard spans several of the
    kernel's blocks."""
    from tpfleet.kernels.greedy import GreedyScratch, greedy_token

    shard = 40000
    g = torch.Generator().manual_seed(world)
    scratch = [GreedyScratch(shard, torch.device("cpu")) for _ in range(world)]
    cases = [(5, 10.0, None), (world * shard - 1, 11.0, None), (shard + 7, 9.0, 2 * shard - 1), (11, 8.0, shard + 2)]
    ranks = Ranks(world, sites=1)
    for step, (token, top, tie) in enumerate(cases, start=1):
        row = torch.randn(1, world * shard, generator=g).to(DTYPE)
        row[0, token] = top
        if tie is not None:
            row[0, tie] = top  # the same logit at a higher token, in the same shard or the next
        for f in ranks.fused:
            f.begin_step()
        got = ranks.fused_run(lambda r: greedy_token(row[:, r * shard:(r + 1) * shard], r * shard, scratch[r],
                                                     ranks.exchanges[r], 0))
        assert int(row.float().argmax()) == token
        assert [int(t) for t in got] == [token] * world, (world, token, got)
        assert ranks.flags(0, words=4) == {step}


def check_missing_peer_is_reported() -> None:
    """Rank 1 never runs: rank 0's blocks record the site and how many ranks' values arrived, and
    `check` raises naming them, instead of the step hanging. A later site short too leaves the first
    report as it is."""
    from tpfleet.comm.custom_ar import CommTimeout
    from tpfleet.kernels import gemv

    ranks = Ranks(2, sites=4)
    x, w = torch.randn(1, 32, dtype=DTYPE), torch.randn(HIDDEN, 32, dtype=DTYPE)
    for f in ranks.fused:
        f.begin_step()
    for site in (3, 0):
        gemv.linear(x, w, all_reduce=(ranks.exchanges[0], site))
    ranks.fused[1].check()  # rank 1 waited for nothing
    with pytest.raises(CommTimeout, match=r"site 3 \(layer 0, down\): 1 of 2 ranks' values arrived"):
        ranks.fused[0].check()


def interpreter_main() -> None:
    for world in (2, 4):
        check_steps(world)
        check_embedding(world)
        check_greedy(world)
    check_missing_peer_is_reported()
    print("interpreter: fused all-reduce matches the unfused path")


def test_fused_all_reduce_matches_unfused_path_in_the_interpreter():
    assert "fused all-reduce matches the unfused path" in run_in_triton_interpreter("test_fused_ar")


def test_region_holds_one_word_per_value_and_16_bit_models_only():
    from tpfleet.kernels.fused_ar import region_bytes, supports

    assert region_bytes(72, 4096, 2) == 72 * 2 * 4096 * 4
    assert supports(torch.bfloat16) and supports(torch.float16)
    assert not supports(torch.float32) and not supports(torch.int16)


def test_fused_unless_turned_off(monkeypatch):
    from tpfleet.comm.fused_ar import enabled

    monkeypatch.delenv("TPFLEET_FUSED_AR", raising=False)
    assert enabled()
    monkeypatch.setenv("TPFLEET_FUSED_AR", "0")
    assert not enabled()


def test_sites_number_every_exchange_once_and_are_named_back():
    from tpfleet.model.ar_sites import EMBEDDING_SITE, GREEDY_SITE, layer_sites, site_count, site_name

    layers = 36
    sites = [EMBEDDING_SITE, GREEDY_SITE] + [s for i in range(layers) for s in layer_sites(i)]
    assert sorted(sites) == list(range(site_count(layers)))
    assert site_name(EMBEDDING_SITE) == "embedding" and site_name(GREEDY_SITE) == "greedy token"
    assert [site_name(s) for s in layer_sites(5)] == ["layer 5, o_proj", "layer 5, down"]
