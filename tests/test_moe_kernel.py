"""The fused MoE kernels (tpfleet.kernels.moe_triton) against the torch reference they replace."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from conftest import HAS_CUDA, pdl_forced, run_in_triton_interpreter

from tpfleet.kernels.moe import moe_reference, route

triton = pytest.importorskip("triton")

from tpfleet.kernels import moe_triton  # noqa: E402  (needs triton)
from tpfleet.kernels.moe_route import fused_route  # noqa: E402

# (global experts, hidden, intermediate, top_k): Qwen3-30B-A3B at TP 1, and sizes no tile divides
QWEN3_30B = (128, 2048, 768, 8)
ODD = (10, 200, 100, 3)
TOKEN_COUNTS = [1, 2, 7, 64, 257, 1024, 8192]


def check_alignment(aligned: moe_triton.Alignment, topk_ids: torch.Tensor, first: int, num_local: int) -> None:
    """Every local pair exactly once, in its expert's run, runs in expert order, each sorted by pair
    and padded with the sentinel to a multiple of block_m; every block tagged with its run's expert."""
    ids = topk_ids.flatten().cpu().long()
    num_pairs, bm = ids.numel(), aligned.block_m
    sorted_ids = aligned.sorted_ids.cpu().long()
    block_expert = aligned.block_expert.cpu().long()
    used = int(aligned.rows_used.item())
    local = ids - first
    counts = torch.bincount(local[(local >= 0) & (local < num_local)], minlength=num_local)
    assert used == int(((counts + bm - 1) // bm * bm).sum())
    assert used <= sorted_ids.numel() == moe_triton.max_aligned_rows(num_pairs, num_local, bm)
    assert bool((sorted_ids[used:] == num_pairs).all()) and bool((block_expert[used // bm:] == -1).all())
    real = sorted_ids[:used][sorted_ids[:used] < num_pairs]
    expected = torch.nonzero((local >= 0) & (local < num_local)).flatten()
    assert torch.equal(real.sort().values, expected), "not a permutation of the local pairs"
    start = 0
    for expert in range(num_local):
        run = sorted_ids[start:start + int((counts[expert] + bm - 1) // bm * bm)]
        pairs = run[: int(counts[expert])]
        assert bool((local[pairs] == expert).all()) and bool((pairs[1:] > pairs[:-1]).all())
        assert bool((run[int(counts[expert]):] == num_pairs).all())
        assert bool((block_expert[start // bm:(start + run.numel()) // bm] == expert).all())
        start += run.numel()


def make_case(shape, tokens: int, dtype: torch.dtype, device: str, first: int, num_local: int, seed: int = 0):
    num_experts, hidden_size, inter, top_k = shape
    gen = torch.Generator(device).manual_seed(seed)
    w_gate_up, w_down = weights(shape, dtype, device, first, num_local)
    hidden = torch.randn(tokens, hidden_size, device=device, generator=gen).to(dtype)
    topk_weights, topk_ids = moe_triton.random_routing(tokens, num_experts, top_k, gen)
    return hidden, w_gate_up, w_down, topk_ids, topk_weights


@functools.lru_cache(maxsize=1)
def weights(shape, dtype: torch.dtype, device: str, first: int, num_local: int):
    """The experts [first, first + num_local) of one random stack, kept for the next case of the same
    shape (one stack at most: Qwen3-30B-A3B's fp32 experts are 2.4 GB)."""
    num_experts, hidden_size, inter, _ = shape
    gen = torch.Generator(device).manual_seed(1)
    w_gate_up = torch.randn(num_experts, 2 * inter, hidden_size, device=device, generator=gen) * hidden_size ** -0.5
    w_down = torch.randn(num_experts, hidden_size, inter, device=device, generator=gen) * inter ** -0.5
    return (w_gate_up[first:first + num_local].to(dtype).contiguous(),
            w_down[first:first + num_local].to(dtype).contiguous())


def assert_matches(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    tol = 1e-4 if dtype == torch.float32 else 1.6e-2  # bf16: a rounding step of the output's scale
    assert got.shape == ref.shape and got.dtype == ref.dtype, what
    scale = max(ref.float().abs().max().item(), 1e-6)
    torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


def tiny_configs() -> list[dict]:
    """Both paths, tiles smaller than the tiny shape so that every mask is exercised."""
    tile = moe_triton._tile(16, 32, 1, 1)
    return [{"path": "gemv", "gate_up": tile, "down": moe_triton._tile(8, 16, 1, 1)},
            {"path": "grouped", "BLOCK_M": 16, "gate_up": tile, "down": tile},
            {"path": "grouped", "BLOCK_M": 32, "gate_up": moe_triton._tile(32, 16, 1, 1), "down": tile}]


def check_route(device: str) -> None:
    """`fused_route` against `route`: the same experts in the same order, the weights to float32
    rounding, the ids written into one column of a replay buffer and nowhere else; among equal logits
    the lower expert id first."""
    cases = [(1, 128, 8, True, torch.bfloat16), (5, 12, 3, False, torch.float32), (33, 10, 10, True, torch.float32),
             (3, 7, 1, False, torch.bfloat16)]
    for tokens, experts, top_k, renormalize, dtype in cases:
        gen = torch.Generator(device).manual_seed(tokens)
        # distinct logits, exact in bf16: each row a permutation of steps of 1/16
        steps = torch.stack([torch.randperm(experts, generator=gen, device=device) for _ in range(tokens)])
        logits = (steps / 16 - 2).to(dtype)
        replay = torch.full((tokens, 2, top_k), -1, dtype=torch.int32, device=device)
        weights, ids = fused_route(logits, top_k, renormalize, replay[:, 1])
        ref_weights, ref_ids = route(logits, top_k, renormalize)
        what = f"tokens={tokens} experts={experts} top_k={top_k}"
        assert ids.dtype == torch.int32 and torch.equal(ids.long(), ref_ids), what
        torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-7, msg=lambda m: f"{what}: {m}")
        assert torch.equal(replay[:, 1], ids) and bool((replay[:, 0] == -1).all()), what
    weights, ids = fused_route(torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0]], device=device), 2, True)
    assert ids.tolist() == [[1, 2]] and torch.allclose(weights.cpu(), torch.tensor([[0.5, 0.5]]))


def interpreter_main() -> None:
    """Run by run_in_triton_interpreter: the kernels on the CPU, tiny sizes, float32."""
    shape = (12, 40, 24, 3)  # hidden and intermediate not multiples of the tiles
    for tokens, first, num_local in [(1, 0, 12), (5, 4, 5), (33, 0, 12), (20, 9, 3)]:
        hidden, w_gate_up, w_down, topk_ids, topk_weights = make_case(shape, tokens, torch.float32, "cpu",
                                                                      first, num_local, seed=tokens)
        for bm in (16, 32):
            check_alignment(moe_triton.align_by_expert(topk_ids, num_local, first, bm), topk_ids, first, num_local)
        ref = moe_reference(hidden, w_gate_up, w_down, topk_ids, topk_weights, first)
        for cfg in tiny_configs():
            got = moe_triton.fused_moe(hidden, w_gate_up, w_down, topk_ids, topk_weights, first, config=cfg)
            assert_matches(got, ref, torch.float32, f"tokens={tokens} first={first} {cfg['path']}")
    with pdl_forced():  # one token: the PDL path, the routing and first weight tile read before the wait
        hidden, w_gate_up, w_down, topk_ids, topk_weights = make_case(shape, 1, torch.float32, "cpu", 4, 5, seed=1)
        ref = moe_reference(hidden, w_gate_up, w_down, topk_ids, topk_weights, 4)
        for cfg in tiny_configs():
            got = moe_triton.fused_moe(hidden, w_gate_up, w_down, topk_ids, topk_weights, 4, config=cfg)
            assert_matches(got, ref, torch.float32, f"PDL, {cfg['path']}")
    # one sort longer than a chunk: pairs of later chunks land after those of earlier ones
    ids = torch.randint(0, 7, (700, 3))
    check_alignment(moe_triton.align_by_expert(ids, 5, 2, 16), ids, 2, 5)
    check_route("cpu")
    print("interpreter: fused MoE matches the reference")


def test_fused_moe_matches_the_reference_in_the_interpreter():
    assert "fused MoE matches the reference" in run_in_triton_interpreter("test_moe_kernel")


def test_aligned_rows_bound_every_routing():
    """The aligned list is sized from shapes: no routing may need more rows than that bound. The worst
    routing puts one pair on as many experts as it can (each pads by block_m - 1), the rest on one."""
    gen = torch.Generator().manual_seed(0)
    for num_pairs, num_local, bm in [(8, 128, 64), (512, 128, 16), (65536, 128, 128), (3, 2, 16), (100, 7, 32)]:
        bound = moe_triton.max_aligned_rows(num_pairs, num_local, bm)
        spread = min(num_local, num_pairs)
        worst = torch.zeros(num_local, dtype=torch.long)
        worst[:spread] = 1
        worst[0] += num_pairs - spread
        uniform = torch.bincount(torch.randint(0, num_local, (num_pairs,), generator=gen), minlength=num_local)
        for counts in (worst, uniform):
            assert int(((counts + bm - 1) // bm * bm).sum()) <= bound, (num_pairs, num_local, bm)


def test_table_lookup(tmp_path, monkeypatch):
    monkeypatch.setenv("TPFLEET_CACHE_DIR", str(tmp_path))
    path = moe_triton.table_path("NVIDIA H100 80GB HBM3", 128, 2048, 768, 8, torch.bfloat16)
    assert path.parent == tmp_path / "tuning" and " " not in path.name
    configs = {1: moe_triton.default_config(1, 128, 8), 64: moe_triton.default_config(64, 128, 8),
               1024: moe_triton.default_config(1024, 128, 8)}
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"device": "NVIDIA H100 80GB HBM3", "configs": configs}))
    table = moe_triton.load_table(str(path))
    assert table == configs
    assert moe_triton.pick(table, 1) == configs[1] and moe_triton.pick(table, 2) == configs[64]
    assert moe_triton.pick(table, 64) == configs[64] and moe_triton.pick(table, 8192) == configs[1024]
    assert moe_triton.load_table(str(tmp_path / "missing.json")) is None
    assert moe_triton.default_config(1, 128, 8)["path"] == "gemv"
    assert moe_triton.default_config(4096, 128, 8)["path"] == "grouped"


HOPPER_SHARED_MEMORY = 227 << 10


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens", [17, 257, 1024, 8192])
def test_default_grouped_tiles_fit_shared_memory(tokens, dtype):
    """A grouped GEMM stage holds an A tile and one (down) or two (gate and up) B tiles; every stage of
    the default tiles must fit a Hopper block's shared memory, in 32-bit operands as in 16-bit ones."""
    config = moe_triton.default_config(tokens, 128, 8, dtype)
    assert config["path"] == "grouped"
    for part, b_tiles in (("gate_up", 2), ("down", 1)):
        tile = config[part]
        stage = (config["BLOCK_M"] * tile["BLOCK_K"] + b_tiles * tile["BLOCK_K"] * tile["BLOCK_N"]) * dtype.itemsize
        assert tile["num_stages"] * stage <= HOPPER_SHARED_MEMORY, (part, tile)


# (first expert, local experts) as fractions of the global experts: all of them, or an EP rank's slice
PLACEMENTS = {"all": lambda e: (0, e), "ep-slice": lambda e: (e // 2, e // 4 + 1)}


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
@pytest.mark.parametrize("tokens", TOKEN_COUNTS)  # varies fastest: the cases of one expert stack run together
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape", [QWEN3_30B, ODD], ids=["qwen3-30b-a3b", "odd"])
def test_fused_moe_matches_the_reference_on_gpu(tokens, shape, dtype, placement):
    first, num_local = PLACEMENTS[placement](shape[0])
    case = make_case(shape, tokens, dtype, "cuda", first, num_local, seed=tokens)
    got = moe_triton.fused_moe(*case, first_expert=first)
    assert_matches(got, moe_reference(*case, first_expert=first), dtype, "fused_moe")


def forced_configs() -> list[dict]:
    gemv = moe_triton.default_config(1, 128, 8)
    grouped = [{"path": "grouped", "BLOCK_M": bm, "gate_up": t, "down": t}
               for bm, t in [(16, moe_triton._tile(64, 128, 4, 3)), (32, moe_triton._tile(32, 128, 4, 3)),
                             (64, moe_triton._tile(128, 64, 8, 4)), (128, moe_triton._tile(64, 64, 4, 3))]]
    return [gemv, *grouped]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
@pytest.mark.parametrize("tokens", [1, 3, 40, 300])
@pytest.mark.parametrize("config", forced_configs(), ids=lambda c: f"{c['path']}{c.get('BLOCK_M', '')}")
@pytest.mark.parametrize("shape", [QWEN3_30B, ODD], ids=["qwen3-30b-a3b", "odd"])
def test_every_path_and_block_m_matches_on_gpu(config, shape, tokens):
    """The tuning table may pick either path and any BLOCK_M at any token count."""
    first, num_local = PLACEMENTS["ep-slice"](shape[0])
    case = make_case(shape, tokens, torch.bfloat16, "cuda", first, num_local, seed=tokens)
    got = moe_triton.fused_moe(*case, first_expert=first, config=config)
    assert_matches(got, moe_reference(*case, first_expert=first), torch.bfloat16, str(config))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
@pytest.mark.parametrize("block_m", [16, 64, 128])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_alignment_is_a_valid_permutation_on_gpu(block_m, placement):
    num_experts, _, _, top_k = QWEN3_30B
    first, num_local = PLACEMENTS[placement](num_experts)
    gen = torch.Generator("cuda").manual_seed(block_m)
    for tokens in (1, 7, 257, 8192):
        _, ids = moe_triton.random_routing(tokens, num_experts, top_k, gen)
        check_alignment(moe_triton.align_by_expert(ids, num_local, first, block_m), ids, first, num_local)
    skewed = torch.randint(first, first + 2, (4096, top_k), device="cuda", generator=gen)  # two experts take all
    check_alignment(moe_triton.align_by_expert(skewed, num_local, first, block_m), skewed, first, num_local)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
@pytest.mark.parametrize("tokens", [1, 2, 300])
def test_fused_moe_replays_in_a_cuda_graph(tokens):
    """Captured once, replayed with new hidden states and new routings: nothing may have been read
    back to the host at capture (a sync would fail the capture), and every replay must match both
    the reference and an eager call bit for bit."""
    shape = QWEN3_30B
    first, num_local = PLACEMENTS["ep-slice"](shape[0])
    static = list(make_case(shape, tokens, torch.bfloat16, "cuda", first, num_local, seed=0))
    moe_triton.fused_moe(*static, first_expert=first)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe_triton.fused_moe(*static, first_expert=first)
    for seed in range(1, 4):
        fresh = make_case(shape, tokens, torch.bfloat16, "cuda", first, num_local, seed=seed)
        for index in (0, 3, 4):  # hidden, ids, weights: the experts stay
            static[index].copy_(fresh[index])
        graph.replay()
        torch.cuda.synchronize()
        assert_matches(out, moe_reference(*fresh, first_expert=first), torch.bfloat16, f"replay {seed}")
        assert torch.equal(out, moe_triton.fused_moe(*fresh, first_expert=first))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
def test_route_then_experts_replay_in_a_cuda_graph():
    """Batch-1 decode's chain, router to down projection, captured once (on Hopper its kernels overlap
    under PDL, the down GEMV reading the routing before its wait) and replayed with new router logits:
    every replay routes as `route` does and sums as the reference does."""
    num_experts, hidden_size, _, top_k = QWEN3_30B
    hidden, w_gate_up, w_down, _, _ = make_case(QWEN3_30B, 1, torch.bfloat16, "cuda", 0, num_experts)
    logits = torch.randn(1, num_experts, device="cuda", dtype=torch.bfloat16)

    def chain():
        weights, ids = fused_route(logits, top_k, True)
        return moe_triton.fused_moe(hidden, w_gate_up, w_down, ids, weights)

    chain()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain()
    for seed in range(1, 6):
        logits.copy_(torch.randn(1, num_experts, generator=torch.Generator().manual_seed(seed)).to(logits))
        graph.replay()
        torch.cuda.synchronize()
        weights, ids = route(logits, top_k, True)
        assert_matches(out, moe_reference(hidden, w_gate_up, w_down, ids, weights), torch.bfloat16, f"replay {seed}")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
def test_fused_route_matches_route_on_gpu():
    check_route("cuda")


def test_fused_route_refuses_a_replay_view_it_cannot_write():
    logits = torch.zeros(4, 8)
    with pytest.raises(ValueError, match="replay must be int32"):
        fused_route(logits, 2, True, torch.zeros(4, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="top_k"):
        fused_route(logits, 9, True)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
def test_fused_moe_is_deterministic():
    case = make_case(QWEN3_30B, 1024, torch.bfloat16, "cuda", 0, QWEN3_30B[0])
    assert torch.equal(moe_triton.fused_moe(*case), moe_triton.fused_moe(*case))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
def test_the_sweep_writes_a_table_the_layer_then_runs_by(tmp_path, monkeypatch):
    """`tune_moe` times both paths as whole layers, caches the winners, and `fused_moe` then reads them."""
    monkeypatch.setenv("TPFLEET_CACHE_DIR", str(tmp_path))
    num_experts, hidden, inter, top_k = ODD
    table = moe_triton.tune_moe(num_experts, hidden, inter, top_k, [1, 40])
    assert set(table) == {1, 40}
    assert {table[t]["path"] for t in table} <= {"gemv", "grouped"}
    path = moe_triton.table_path(torch.cuda.get_device_name(), num_experts, hidden, inter, top_k, torch.bfloat16)
    assert path.is_file() and moe_triton.load_table(str(path)) == table
    for tokens in (1, 40):
        case = make_case(ODD, tokens, torch.bfloat16, "cuda", 0, num_experts, seed=tokens)
        picked = moe_triton.launch_config(tokens, num_experts, hidden, inter, top_k, torch.bfloat16,
                                          torch.device("cuda"))
        assert picked == table[tokens]
        assert_matches(moe_triton.fused_moe(*case), moe_reference(*case), torch.bfloat16, str(picked))
