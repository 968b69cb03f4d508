"""The batch-1 GEMV kernels (with their fused norm and activation) against the torch code they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import HAS_CUDA, pdl_forced, run_in_triton_interpreter

from tpfleet.model.layers import RMSNorm

triton = pytest.importorskip("triton")

# (hidden, qkv features, intermediate): the tiny preset's odd sizes, Qwen3-8B's at TP=1 and TP=2
SHAPES = [(64, 256, 160), (4096, 6144, 12288), (4096, 3072, 6144)]


def compare(shape, dtype: torch.dtype, device: str, seed: int):
    """(name, kernel output, torch reference) per entry point. The reference is the CPU path's torch
    code (norm and activation, on the same device), then an fp32 matmul."""
    from tpfleet.kernels import gemv

    hidden, qkv_out, inter = shape
    g = torch.Generator(device).manual_seed(seed)

    def rnd(*s, scale=1.0):
        return (scale * torch.randn(*s, generator=g, device=device)).to(dtype)

    def ref_mm(a, w):
        return (a.float() @ w.float().t()).to(dtype)

    x, res = rnd(1, hidden), rnd(1, hidden)
    norm = RMSNorm(hidden, 1e-6)
    norm.weight.data = 1 + rnd(hidden, scale=0.1)

    def ref_norm(v, r=None):  # the torch code, which RMSNorm runs for CPU tensors
        return norm.to("cpu")(v.cpu(), None if r is None else r.cpu())

    w_qkv, w_o = rnd(qkv_out, hidden, scale=0.05), rnd(hidden, hidden, scale=0.05)
    w_down = rnd(hidden, inter, scale=0.05)
    gate_up = rnd(1, 2 * inter)
    nw = norm.weight.data.to(device)

    out = [("linear", gemv.linear(x, w_o), ref_mm(x, w_o))]
    y, r = gemv.norm_linear(x, res, nw, norm.eps, w_qkv)
    ref_h, ref_r = ref_norm(x, res)
    out += [("norm_linear+residual", y, ref_mm(ref_h.to(device), w_qkv)), ("residual", r, ref_r)]
    y, r = gemv.norm_linear(x, None, nw, norm.eps, w_qkv)
    out += [("norm_linear", y, ref_mm(ref_norm(x).to(device), w_qkv)), ("residual passed through", r, x)]
    normed = torch.full_like(x, float("nan"))
    y, r = gemv.norm_linear(x, res, nw, norm.eps, w_qkv, normed_out=normed)
    out += [("norm_linear keeping the normed row", y, ref_mm(ref_h.to(device), w_qkv)), ("its residual", r, ref_r),
            ("the normed row", normed, ref_h.to(device))]
    gate, up = gate_up.float().chunk(2, dim=-1)
    act = (F.silu(gate).to(dtype).float() * up).to(dtype)
    into = torch.full((1, hidden), float("nan"), dtype=dtype, device=device)
    got = gemv.silu_mul_linear(gate_up, w_down, out=into)
    assert got.data_ptr() == into.data_ptr(), "silu_mul_linear must write into `out`"
    out.append(("silu_mul_linear", got, ref_mm(act, w_down)))
    return out


def check(shape, dtype, device, seed: int = 0) -> None:
    tol = 1e-4 if dtype == torch.float32 else 1.6e-2  # bf16: one rounding step of the output
    for name, got, ref in compare(shape, dtype, device, seed):
        assert got.shape == ref.shape, name
        scale = ref.float().abs().max().item()
        torch.testing.assert_close(got.cpu().float(), ref.cpu().float(), rtol=tol, atol=tol * scale,
                                   msg=lambda m: f"{name}: {m}")


def test_launch_tiles_divide_the_weight():
    from tpfleet.kernels import gemv

    assert not gemv.supports(torch.empty(1, 64), torch.empty(64, 64))  # a CPU tensor runs the torch code
    for n, k in [(6144, 4096), (4096, 12288), (64, 160), (24, 96)]:
        cfg = gemv.launch_config(n, k)
        assert n % cfg["BLOCK_N"] == 0 and k % cfg["BLOCK_K"] == 0, (n, k, cfg)
    assert gemv.launch_config(64, 160)["BLOCK_K"] == 32  # 160 = 5 x 32


def test_a_swept_table_overrides_the_rule_for_its_shapes(tmp_path, monkeypatch):
    """`bench gemv --sweep` saves each shape's fastest config for its GPU; `launch_config` takes it for
    that GPU and shape only, and a second sweep adds to the table rather than replacing it."""
    from tpfleet.kernels import gemv, tuning

    monkeypatch.setenv("TPFLEET_CACHE_DIR", str(tmp_path))
    tuning.read.cache_clear()
    rule = gemv.launch_config(5120, 2048)
    mine = {"BLOCK_N": 4, "BLOCK_K": 1024, "num_warps": 4, "num_stages": 2}
    tuning.add("gemv", "Test GPU 80GB", {(5120, 2048): mine})
    assert tuning.path("gemv", "Test GPU 80GB").parent == tmp_path / "tuning"
    assert gemv.launch_config(5120, 2048, "Test GPU 80GB") == mine
    assert gemv.launch_config(5120, 2048, "Other GPU") == rule == gemv.launch_config(5120, 2048)
    assert gemv.launch_config(2048, 4096, "Test GPU 80GB") == gemv.launch_config(2048, 4096)
    other = {**mine, "BLOCK_N": 8}
    tuning.add("gemv", "Test GPU 80GB", {(2048, 4096): other})
    assert gemv.launch_config(2048, 4096, "Test GPU 80GB") == other
    assert gemv.launch_config(5120, 2048, "Test GPU 80GB") == mine
    tuning.read.cache_clear()


def check_router(device: str, dtype: torch.dtype) -> None:
    """The router's GEMV choosing the experts in its epilogue: the logits as without a choice, and the
    choice `route` makes from those logits, its ids in the replay column, call after call (the last
    program to arrive routes, then resets the counter), for one program and for several."""
    from tpfleet.kernels import gemv
    from tpfleet.kernels.moe import route
    from tpfleet.kernels.moe_route import routing_for

    hidden, experts, top_k = 64, 32, 5
    g = torch.Generator(device).manual_seed(0)
    nw = (1 + 0.1 * torch.randn(hidden, generator=g, device=device)).to(dtype)
    w = (0.2 * torch.randn(experts, hidden, generator=g, device=device)).to(dtype)
    replay = torch.full((1, 3, top_k), -1, dtype=torch.int32, device=device)
    for call, block_n in enumerate([8, 8, 32, 2]):
        config = {"BLOCK_N": block_n, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2}
        x, res = (torch.randn(2, 1, hidden, generator=g, device=device)).to(dtype)
        plain, _ = gemv.norm_linear(x, res, nw, 1e-6, w, config=config)
        r = routing_for(1, experts, top_k, call % 2 == 0, torch.device(device), replay[:, 1])
        logits, _ = gemv.norm_linear(x, res, nw, 1e-6, w, config=config, routing=r)
        weights, ids = route(logits, top_k, call % 2 == 0)
        what = f"call {call}, BLOCK_N {block_n}"
        assert torch.equal(logits, plain), what
        assert torch.equal(r.ids.long(), ids) and torch.equal(replay[:, 1], r.ids), what
        torch.testing.assert_close(r.weights, weights, rtol=1e-5, atol=1e-7, msg=lambda m: f"{what}: {m}")
    assert bool((replay[:, 0] == -1).all() and (replay[:, 2] == -1).all())


def interpreter_main() -> None:
    """Run by run_in_triton_interpreter: Triton on the CPU."""
    for seed in range(3):
        check(SHAPES[0], torch.float32, "cpu", seed)
    check_router("cpu", torch.float32)
    with pdl_forced():  # the PDL path: the first weight tile loaded before the wait
        check(SHAPES[0], torch.float32, "cpu", 0)
    print("interpreter: all GEMV entry points match")


def test_gemv_matches_torch_in_the_interpreter():
    assert "all GEMV entry points match" in run_in_triton_interpreter("test_gemv")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_gemv_matches_torch_on_gpu(shape, dtype):
    check(shape, dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_router_routes_on_gpu(dtype):
    check_router("cuda", dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or torch.cuda.get_device_capability()[0] < 9, reason="needs a Hopper GPU")
def test_pdl_chain_in_a_graph_matches_serial_launches(monkeypatch):
    """Decoder-layer chains of GEMVs, each reading what the one before wrote, replayed from a CUDA
    graph with programmatic dependent launch: bitwise the result of launches without it. A kernel
    that read its input before its predecessor finished would not match."""
    from tpfleet.kernels import gemv, pdl

    hidden, inter, layers = 4096, 12288, 8
    g = torch.Generator("cuda").manual_seed(0)

    def rnd(*s, scale=0.05):
        return (scale * torch.randn(*s, generator=g, device="cuda")).to(torch.bfloat16)

    nw = 1 + rnd(hidden, scale=0.1)
    ws = [(rnd(hidden, hidden), rnd(hidden, hidden), rnd(2 * inter, hidden), rnd(hidden, inter)) for _ in range(layers)]
    x0 = rnd(1, hidden, scale=1.0)

    def run(x):
        res = torch.zeros_like(x)
        for w_in, w_o, w_gate_up, w_down in ws:
            y, res = gemv.norm_linear(x, res, nw, 1e-6, w_in)
            gate_up, res = gemv.norm_linear(gemv.linear(y, w_o), res, nw, 1e-6, w_gate_up)
            x = gemv.silu_mul_linear(gate_up, w_down)
        return x, res

    monkeypatch.setenv("TPFLEET_PDL", "0")
    serial = run(x0)
    monkeypatch.setenv("TPFLEET_PDL", "1")
    assert pdl.enabled(x0.device, 1)
    x = x0.clone()
    run(x)  # compile the PDL variants outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run(x)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out[0], serial[0]) and torch.equal(out[1], serial[1])
