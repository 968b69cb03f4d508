"""The all-reduce fused into the batch-1 GEMVs (tpfleet.comm.fused_ar) against the unfused path.

On the CPU, Triton's interpreter runs the kernels of several simulated ranks in one process: their
regions are host memory, and each rank's producer runs before any consumer. On GPUs the real ranks
exchange over CUDA IPC (tests/test_comm_gpu.py and the engine parity tests)."""

from __future__ import annotations

import pytest
import torch
from conftest import run_in_triton_interpreter

pytest.importorskip("triton")

HIDDEN, INTER, QKV = 64, 160, 96  # the tiny preset's odd sizes


class Ranks:
    """`world` ranks' FusedAllReduce over regions in this process's memory."""

    def __init__(self, world: int, sites: int, dtype: torch.dtype):
        from tpfleet.comm.fused_ar import FusedAllReduce

        nbytes = FusedAllReduce.region_bytes(sites, HIDDEN, world, dtype)
        self.memory = [torch.zeros(nbytes, dtype=torch.uint8) for _ in range(world)]
        self.records = [torch.zeros(4, dtype=torch.int64) for _ in range(world)]
        regions = [m.data_ptr() for m in self.memory]
        self.fused = [FusedAllReduce(regions, (rec.data_ptr(), rec.data_ptr()), r, world, sites, HIDDEN,
                                     torch.device("cpu")) for r, rec in enumerate(self.records)]

    def counters(self, site: int) -> list[int]:
        return [int(m[site * 8:site * 8 + 8].view(torch.int64)) for m in self.memory]


def rank_sum(parts: list[torch.Tensor]) -> torch.Tensor:
    """What the custom all-reduce returns: the sum in rank order, in fp32, rounded once."""
    acc = torch.zeros_like(parts[0], dtype=torch.float32)
    for p in parts:
        acc += p.float()
    return acc.to(parts[0].dtype)


def check_steps(world: int, dtype: torch.dtype, steps: int = 2) -> None:
    """Per step, per rank: o_proj pushes (site 0), gate_up pulls; down pushes (site 1), qkv pulls.
    Every output must be bitwise the unfused path's: GEMV, all-reduce, norm-GEMV."""
    from tpfleet.model import gemv

    g = torch.Generator().manual_seed(world)

    def rnd(*s, scale=0.1):
        return (scale * torch.randn(*s, generator=g)).to(dtype)

    ranks = Ranks(world, sites=2, dtype=dtype)
    nw = 1 + rnd(HIDDEN)
    w_o = [rnd(HIDDEN, 32) for _ in range(world)]  # each rank's shard of the input features
    w_gate_up = [rnd(2 * INTER, HIDDEN) for _ in range(world)]
    w_down = [rnd(HIDDEN, INTER) for _ in range(world)]
    w_qkv = [rnd(QKV, HIDDEN) for _ in range(world)]
    for step in range(1, steps + 1):
        o = [rnd(1, 32, scale=1.0) for _ in range(world)]
        residual = rnd(1, HIDDEN, scale=1.0)
        for f in ranks.fused:
            f.begin_step()
        pending = [gemv.linear(o[r], w_o[r], push=(ranks.fused[r], 0)) for r in range(world)]
        attn_out = rank_sum([gemv.linear(o[r], w_o[r]) for r in range(world)])
        got = [gemv.norm_linear(pending[r], residual, nw, 1e-6, w_gate_up[r]) for r in range(world)]
        for r in range(world):
            ref, ref_res = gemv.norm_linear(attn_out, residual, nw, 1e-6, w_gate_up[r])
            assert torch.equal(got[r][0], ref) and torch.equal(got[r][1], ref_res), (world, step, "gate_up", r)

        # down pushes to site 1 from every rank's own gate_up output; the next qkv pulls it
        pending = [gemv.silu_mul_linear(got[r][0], w_down[r], push=(ranks.fused[r], 1)) for r in range(world)]
        mlp_out = rank_sum([gemv.silu_mul_linear(got[r][0], w_down[r]) for r in range(world)])
        res = got[0][1]
        for r in range(world):
            y, new_res = gemv.norm_linear(pending[r], res, nw, 1e-6, w_qkv[r])
            ref, ref_res = gemv.norm_linear(mlp_out, res, nw, 1e-6, w_qkv[r])
            assert torch.equal(y, ref) and torch.equal(new_res, ref_res), (world, step, "qkv", r)
        assert pending[0].pushes == HIDDEN // gemv.launch_config(HIDDEN, INTER)["BLOCK_N"]
        expected = step * pending[0].pushes * (world - 1)
        assert ranks.counters(1) == [expected] * world, (ranks.counters(1), expected)
    for f in ranks.fused:
        f.check()  # nothing timed out


def check_missing_peer_is_reported() -> None:
    """A step in which rank 1 pushes to the wrong site: rank 0's consumer records the site and the
    counts, and `check` raises naming them, instead of the step hanging. A later site that is short
    too leaves the first report as it is."""
    from tpfleet.comm.custom_ar import CommTimeout
    from tpfleet.model import gemv

    ranks = Ranks(2, sites=4, dtype=torch.float32)
    x, res = torch.randn(1, 32), torch.randn(1, HIDDEN)
    w_o, w_qkv = torch.randn(HIDDEN, 32), torch.randn(QKV, HIDDEN)
    for f in ranks.fused:
        f.begin_step()
    for site in (3, 0):
        gemv.linear(x, w_o, push=(ranks.fused[0], site))
        pending = gemv.linear(x, w_o, push=(ranks.fused[1], 2))  # the wrong site
        wrong = type(pending)(ranks.fused[0], site, pending.pushes)
        gemv.norm_linear(wrong, res, torch.ones(HIDDEN), 1e-6, w_qkv)
    ranks.fused[1].check()  # rank 1 waited for nothing
    with pytest.raises(CommTimeout, match=rf"site 3 \(layer 1, down\): 0 of {pending.pushes} peer pushes"):
        ranks.fused[0].check()


def interpreter_main() -> None:
    for world in (2, 4):
        check_steps(world, torch.float32)
    check_missing_peer_is_reported()
    print("interpreter: fused all-reduce matches the unfused path")


def test_fused_all_reduce_matches_unfused_path_in_the_interpreter():
    assert "fused all-reduce matches the unfused path" in run_in_triton_interpreter("test_fused_ar")


def test_region_layout_keeps_slots_aligned():
    from tpfleet.comm.fused_ar import FusedAllReduce

    for sites in (1, 33, 72):
        assert FusedAllReduce.counter_bytes(sites) % 256 == 0 and FusedAllReduce.counter_bytes(sites) >= 8 * sites
    assert FusedAllReduce.region_bytes(72, 4096, 2, torch.bfloat16) == 768 + 72 * 2 * 4096 * 2


def test_fused_by_default_at_tp2_only(monkeypatch):
    """TP=2 measured faster fused, TP=4 slower (docs/benchmarks.md); the variable overrides either way."""
    from tpfleet.comm.fused_ar import enabled

    monkeypatch.delenv("TPFLEET_FUSED_AR", raising=False)
    assert enabled(2) and not enabled(4) and not enabled(8)
    monkeypatch.setenv("TPFLEET_FUSED_AR", "1")
    assert enabled(4)
    monkeypatch.setenv("TPFLEET_FUSED_AR", "0")
    assert not enabled(2)
