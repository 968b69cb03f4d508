"""The skinny decode GEMM (tpfleet.kernels.gemm) against torch, and how its sweep table picks it or cuBLAS."""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA, run_in_triton_interpreter

triton = pytest.importorskip("triton")

CONFIGS = [{"BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 1, "num_warps": 4, "num_stages": 2},
           {"BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 2, "num_warps": 4, "num_stages": 2},
           {"BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": 4, "num_warps": 4, "num_stages": 2}]


def check(device: str, dtype: torch.dtype, n: int, k: int, rows: list[int], configs: list[dict], tol: float,
          silu_mul: bool = False) -> None:
    """With `silu_mul` W is [gate; up] (n rows) and the reference is the unfused path: the product
    rounded to dtype, then silu(gate) * up as torch computes it."""
    from tpfleet.kernels import arrivals, gemm

    g = torch.Generator(device).manual_seed(0)
    weight = (0.05 * torch.randn(n, k, generator=g, device=device)).to(dtype)
    for m in rows:
        # x a slice of a wider tensor: its rows are not k apart
        wide = torch.randn(m, k + 32, generator=g, device=device).to(dtype)
        x = wide[:, 16:16 + k]
        want = (x.float() @ weight.float().t()).to(dtype)
        if silu_mul:
            gate, up = want.chunk(2, dim=-1)
            want = torch.nn.functional.silu(gate) * up
        for config in configs:
            out = torch.full(want.shape, float("nan"), dtype=dtype, device=device)
            got = gemm.linear(x, weight, config, out, silu_mul=silu_mul)
            assert got.data_ptr() == out.data_ptr(), "linear must write into `out`"
            # summed in another order than the fp32 reference: within `tol` of it, relative above 1
            err = ((got.float() - want.float()).abs() / want.float().abs().clamp(min=1)).max().item()
            assert err <= tol, f"{m} rows, {config}, silu_mul={silu_mul}: max error {err}"
            # Splits summed in a fixed order: the same inputs give the same bits again.
            assert torch.equal(gemm.linear(x, weight, config, silu_mul=silu_mul), got), \
                f"{m} rows, {config}: not deterministic"
    assert all(int(c.abs().sum()) == 0 for c in arrivals.held("skinny_gemm", torch.device(device))), \
        "every arrival counter must be back at zero for the next launch or graph replay"


def interpreter_main() -> None:
    """Run by run_in_triton_interpreter: Triton on the CPU."""
    check("cpu", torch.float32, 64, 256, [2, 3, 16, 33, 64], CONFIGS, 1e-4)
    check("cpu", torch.float32, 64, 256, [2, 33], CONFIGS, 1e-4, silu_mul=True)
    print("interpreter: the skinny GEMM matches torch")


def test_skinny_gemm_matches_torch_in_the_interpreter():
    assert "the skinny GEMM matches torch" in run_in_triton_interpreter("test_gemm")


def test_shapes_the_tiles_do_not_divide_are_refused():
    from tpfleet.kernels import gemm

    weight = torch.zeros(48, 256)
    with pytest.raises(ValueError, match="tiling"):
        gemm.linear(torch.zeros(4, 256), weight, dict(CONFIGS[1]))  # 48 rows of W in blocks of 32
    with pytest.raises(ValueError, match="tiling"):
        gemm.linear(torch.zeros(65, 256), weight, dict(CONFIGS[0]))  # more rows than a tile takes
    with pytest.raises(ValueError, match="gate and up"):
        gemm.linear(torch.zeros(4, 256), torch.zeros(32, 256), dict(CONFIGS[1]), silu_mul=True)  # 16-wide halves
    with pytest.raises(ValueError, match="tiling"):
        gemm.linear(torch.zeros(4, 128), weight, dict(CONFIGS[0]))  # x narrower than W


def test_every_swept_config_tiles_its_shape_once():
    from tpfleet.kernels import gemm

    for n, k, silu_mul in ((6144, 4096, False), (4096, 12288, False), (24576, 4096, True), (2048, 768, False)):
        for rows in (2, 8, 33, 64):
            configs = gemm.sweep_configs(n, k, rows, silu_mul)
            assert configs, f"no config for {rows} rows of [{n}, {k}]"
            assert len({tuple(c.values()) for c in configs}) == len(configs), "a config is timed twice"
            x, weight = torch.empty(rows, k), torch.empty(n, k)
            for c in configs:
                assert gemm.supports(x, weight, c, silu_mul), f"{c} does not tile {rows} rows of [{n}, {k}]"


def test_the_table_sends_each_row_count_where_its_sweep_measured_faster(tmp_path, monkeypatch):
    from tpfleet.kernels import gemm, tuning

    monkeypatch.setenv("TPFLEET_CACHE_DIR", str(tmp_path))
    tuning.read.cache_clear()
    gemm.config_for.cache_clear()
    gpu = "Test GPU"
    gemm.save_table(gpu, {(4096, 4096, 8): None, (4096, 4096, 32): CONFIGS[1], (4096, 4096, 64): None})
    try:
        # rows take the verdict of the smallest swept count covering them
        assert gemm.config_for(gpu, 4096, 4096, 2) is None and gemm.config_for(gpu, 4096, 4096, 8) is None
        assert gemm.config_for(gpu, 4096, 4096, 9) == CONFIGS[1] == gemm.config_for(gpu, 4096, 4096, 32)
        assert gemm.config_for(gpu, 4096, 4096, 33) is None
        # beyond the sweep, and shapes it never saw: cuBLAS
        assert gemm.config_for(gpu, 4096, 4096, 65) is None and gemm.config_for(gpu, 4096, 2048, 32) is None
        # a second sweep adds to the table and is read at once
        gemm.save_table(gpu, {(4096, 2048, 16): CONFIGS[2]})
        assert gemm.config_for(gpu, 4096, 2048, 16) == CONFIGS[2] and \
            gemm.config_for(gpu, 4096, 4096, 32) == CONFIGS[1]
        # gate_up with its activation has a table of its own: the plain verdicts do not answer for it
        assert gemm.config_for(gpu, 4096, 4096, 32, silu_mul=True) is None
        gemm.save_table(gpu, {(4096, 4096, 32): CONFIGS[0]}, silu_mul=True)
        assert gemm.config_for(gpu, 4096, 4096, 32, silu_mul=True) == CONFIGS[0] and \
            gemm.config_for(gpu, 4096, 4096, 32) == CONFIGS[1]
    finally:
        tuning.read.cache_clear()
        gemm.config_for.cache_clear()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_skinny_gemm_matches_torch_on_gpu(dtype):
    from tpfleet.kernels import gemm

    tol = 0.02 if dtype == torch.bfloat16 else 1e-3
    for m in (2, 8, 24, 64):
        configs = gemm.sweep_configs(4096, 4096, m)[::5] if dtype == torch.bfloat16 else CONFIGS
        check("cuda", dtype, 4096, 4096, [m], configs, tol)
    check("cuda", dtype, 6144, 4096, [16], CONFIGS, tol)
    for m in (2, 24, 64):
        configs = gemm.sweep_configs(8192, 4096, m, silu_mul=True)[::9] if dtype == torch.bfloat16 else CONFIGS
        check("cuda", dtype, 8192, 4096, [m], configs, tol, silu_mul=True)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
def test_skinny_gemm_replays_in_a_cuda_graph():
    from tpfleet.kernels import gemm

    weight = 0.05 * torch.randn(4096, 2048, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(24, 2048, device="cuda", dtype=torch.bfloat16)
    config = {"BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 4, "num_warps": 4, "num_stages": 3}
    gemm.linear(x, weight, config)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gemm.linear(x, weight, config)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.testing.assert_close(out, gemm.linear(x, weight, config), rtol=0, atol=0)
        torch.testing.assert_close(out.float(), x.float() @ weight.float().t(), rtol=0.02, atol=0.02)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
def test_projections_take_the_kernel_only_where_the_table_says(tmp_path, monkeypatch):
    from tpfleet.kernels import gemm, gemv, tuning
    from tpfleet.model.layers import skinny_or_cublas

    monkeypatch.setenv("TPFLEET_CACHE_DIR", str(tmp_path))
    tuning.read.cache_clear()
    gemm.config_for.cache_clear()
    weight = 0.05 * torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
    gemm.save_table(gemv.gpu_name(weight.device), {(256, 512, 8): CONFIGS[1], (256, 512, 16): None})
    launched = []
    real = gemm.linear
    monkeypatch.setattr(gemm, "linear", lambda *args: launched.append(args[2]) or real(*args))
    try:
        for rows, expected in ((8, [CONFIGS[1]]), (5, [CONFIGS[1]]), (12, []), (1, []), (40, [])):
            launched.clear()
            x = torch.randn(rows, 512, device="cuda", dtype=torch.bfloat16)
            y = skinny_or_cublas(x, weight)
            assert launched == expected, rows
            torch.testing.assert_close(y.float(), x.float() @ weight.float().t(), rtol=0.02, atol=0.02)
        # gate_up with its activation reads its own table: the skinny GEMM's epilogue where it says so,
        # cuBLAS and the activation kernel elsewhere, the same values either way
        gemm.save_table(gemv.gpu_name(weight.device), {(256, 512, 16): CONFIGS[0]}, silu_mul=True)
        for rows, expected in ((16, [CONFIGS[0]]), (8, [CONFIGS[0]]), (24, [])):
            launched.clear()
            x = torch.randn(rows, 512, device="cuda", dtype=torch.bfloat16)
            y = skinny_or_cublas(x, weight, silu_mul=True)
            assert launched == expected, rows
            gate, up = (x.float() @ weight.float().t()).chunk(2, dim=-1)
            torch.testing.assert_close(y.float(), torch.nn.functional.silu(gate) * up, rtol=0.03, atol=0.02)
    finally:
        tuning.read.cache_clear()
        gemm.config_for.cache_clear()
