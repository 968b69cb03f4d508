"""Triton paged attention against the torch reference: on GPU, and in Triton's interpreter on CPU."""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA, run_in_triton_interpreter

from tpfleet.attention.backend import AttentionMetadata, NewTokens
from tpfleet.attention.torch_ref import TorchReferenceBackend

triton = pytest.importorskip("triton")


def make_batch(query_lens, context_lens, kv_heads, group, head_dim, page, dtype, device, seed=0):
    """Random paged caches and a batch whose block tables are shuffled pages (as after churn)."""
    g = torch.Generator().manual_seed(seed)
    heads = kv_heads * group
    num_blocks = sum(-(-c // page) for c in context_lens) + 3
    k_cache = torch.randn(num_blocks, page, kv_heads, head_dim, generator=g).to(dtype).to(device)
    v_cache = torch.randn(num_blocks, page, kv_heads, head_dim, generator=g).to(dtype).to(device)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, slots = [], []
    for ql, cl in zip(query_lens, context_lens):
        n = -(-cl // page)
        blocks, perm = perm[:n], perm[n:]
        tables.append(blocks)
        slots += [blocks[p // page] * page + p % page for p in range(cl - ql, cl)]
    width = max(len(t) for t in tables)
    total = sum(query_lens)
    q = torch.randn(total, heads, head_dim, generator=g).to(dtype).to(device)
    k = torch.randn(total, kv_heads, head_dim, generator=g).to(dtype).to(device)
    v = torch.randn(total, kv_heads, head_dim, generator=g).to(dtype).to(device)
    starts = [sum(query_lens[:i]) for i in range(len(query_lens))]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, device=device),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=device),
        context_lens=torch.tensor(context_lens, dtype=torch.int32, device=device),
        query_lens=list(query_lens), context_lens_host=list(context_lens),
        num_decodes=sum(1 for x in query_lens if x == 1), block_size=page,
        query_start=torch.tensor(starts, dtype=torch.int32, device=device),
        query_lens_dev=torch.tensor(query_lens, dtype=torch.int32, device=device))
    return q, k, v, k_cache, v_cache, meta


CASES = [
    # query lens (decodes first), context lens, kv heads, group, head_dim
    ([1, 1, 1], [1, 17, 300], 2, 4, 32),  # decode only, GQA 4, a one-token context
    ([1, 5, 40], [64, 5, 100], 2, 2, 32),  # mixed: decode, fresh prefill, extend over a 60-token prefix
    ([70], [70], 1, 8, 64),  # one prefill longer than a tile
]


def run_case(case, dtype, device):
    from tpfleet.attention.triton_backend import TritonBackend

    qls, cls, kvh, group, d = case
    q, k, v, kc, vc, meta = make_batch(qls, cls, kvh, group, d, 16, dtype, device)
    ref_kc, ref_vc = kc.clone(), vc.clone()
    ref = TorchReferenceBackend().forward(q, k, v, ref_kc, ref_vc, meta, d ** -0.5)
    out = TritonBackend().forward(q, k, v, kc, vc, meta, d ** -0.5)
    assert torch.equal(kc, ref_kc) and torch.equal(vc, ref_vc)  # the store wrote exactly the same slots
    return out.float(), ref.float()


def decode_with_splits(splits: int, dtype, device, min_split: int = 16, contexts: tuple[int, ...] = (1, 70, 300),
                       tile: tuple[int, int, int] | None = None):
    """Decode attention forced to `splits` KV splits (1: one program per sequence and kv head, nothing
    to merge) against the reference. With 16-token splits the three default contexts use 1, 5 and up
    to 16 of them."""
    from tpfleet.kernels.attention import decode_attention

    q, k, v, kc, vc, meta = make_batch([1] * len(contexts), list(contexts), 2, 4, 32, 16, dtype, device)
    ref = TorchReferenceBackend().forward(q, k, v, kc, vc, meta, 32 ** -0.5)  # stores k, v too
    out = decode_attention(q, kc, vc, meta.block_tables, meta.context_lens, 32 ** -0.5, splits=splits,
                           min_split=min_split, tile=tile)
    return out.float(), ref.float()


def decode_from_qkv(dtype, device, contexts: tuple[int, ...] = (1, 70, 300), splits: int | None = None) -> None:
    """Decode attention finishing the qkv projection itself (q/k norm, RoPE, the KV store) against
    `ops.qk_norm_rope` with its KV store, then decode attention: the same cache, the same output."""
    from tpfleet.kernels import ops
    from tpfleet.kernels.attention import decode_attention

    kv_heads, group, d = 2, 4, 32
    _, _, _, kc, vc, meta = make_batch([1] * len(contexts), list(contexts), kv_heads, group, d, 16, dtype, device)
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(len(contexts), (group + 2) * kv_heads * d, generator=g).to(dtype).to(device)
    qw, kw = [(1 + 0.2 * torch.randn(d, generator=g)).to(dtype).to(device) for _ in range(2)]
    angles = torch.randn(512, d // 2, generator=g)
    cos, sin = angles.cos().to(device), angles.sin().to(device)
    positions = meta.context_lens.long() - 1
    ref_kc, ref_vc = kc.clone(), vc.clone()
    q, _, _ = ops.qk_norm_rope(qkv, positions, qw, kw, 1e-6, cos, sin, group * kv_heads, kv_heads, d,
                               (ref_kc, ref_vc, meta.slot_mapping))
    ref = decode_attention(q, ref_kc, ref_vc, meta.block_tables, meta.context_lens, d ** -0.5, splits=splits)
    new = NewTokens(positions, meta.slot_mapping, qw, kw, 1e-6, cos, sin)
    out = decode_attention(qkv, kc, vc, meta.block_tables, meta.context_lens, d ** -0.5, splits=splits, new=new)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(vc, ref_vc, atol=0, rtol=0)
    torch.testing.assert_close(kc.float(), ref_kc.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


def interpreter_main() -> None:
    """Run by run_in_triton_interpreter: Triton on the CPU."""
    for case in CASES:
        out, ref = run_case(case, torch.float32, "cpu")
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    from tpfleet.kernels import arrivals

    for splits, min_split in ((1, 16), (4, 16), (16, 16), (16, 256)):
        for _ in range(2):  # the second call finds the counters the first left behind
            out, ref = decode_with_splits(splits, torch.float32, "cpu", min_split)
            torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
        assert all(int(c.abs().sum()) == 0 for c in arrivals.held("decode_attention", torch.device("cpu")))
    # Batch 1 on Hopper takes the PDL path: the first tile is loaded before the wait, the rest in the
    # loop. The interpreter runs that code whole, so it is checked here, around a tile's edges.
    from tpfleet.kernels import pdl

    decode_from_qkv(torch.float32, "cpu")
    enabled, pdl.enabled = pdl.enabled, lambda device, rows: rows == 1
    try:
        for ctx, splits in ((1, 16), (37, 16), (64, 16), (65, 16), (300, 16), (300, 2), (300, 1)):
            out, ref = decode_with_splits(splits, torch.float32, "cpu", contexts=(ctx,))
            torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
            decode_from_qkv(torch.float32, "cpu", contexts=(ctx,), splits=splits)
    finally:
        pdl.enabled = enabled
    print("interpreter: all cases match")


def test_decode_splits_fill_the_gpu_and_stop_at_large_batches():
    from tpfleet.kernels.attention import MAX_DECODE_SPLITS, decode_splits

    cpu = torch.device("cpu")  # stands for a 128-SM GPU
    assert decode_splits(1, 8, cpu) == MAX_DECODE_SPLITS
    assert decode_splits(8, 8, cpu) == 4  # 256 programs wanted: 8 x 8 x 4
    assert decode_splits(256, 8, cpu) == 1  # already 2048 programs: no split, nothing to merge


def test_triton_matches_reference_in_the_interpreter():
    assert "all cases match" in run_in_triton_interpreter("test_attention")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# on GPU also: a 64-sequence batch, and batch 1, whose kernel (on Hopper) loads its first tile before
# waiting for the kernel before it (programmatic dependent launch)
@pytest.mark.parametrize("case", CASES + [([1] * 64, [1 + 37 * i for i in range(64)], 8, 4, 128),
                                          ([1], [300], 8, 4, 128), ([1], [37], 8, 4, 128)])
def test_triton_matches_reference_on_gpu(case, dtype):
    out, ref = run_case(case, dtype, "cuda")
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
@pytest.mark.parametrize("splits,min_split", [(1, 16), (4, 16), (16, 16), (16, 256)])
def test_decode_splits_match_reference_on_gpu(splits, min_split):
    out, ref = decode_with_splits(splits, torch.bfloat16, "cuda", min_split)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
@pytest.mark.parametrize("contexts", [(1, 70, 300), (1,), (64,), (65,), (300,)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_from_qkv_matches_on_gpu(dtype, contexts):
    """Batch 1 included: on Hopper its kernel starts before the projection ends (PDL)."""
    decode_from_qkv(dtype, "cuda", contexts)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
@pytest.mark.parametrize("splits", [1, 4])
def test_every_benchmarked_tile_matches_reference_on_gpu(splits):
    """Any bf16 tile `tpfleet bench attention --tiles` may pick is right over contexts across its edges."""
    from tpfleet.bench.attention import TILES

    for tile in TILES:
        out, ref = decode_with_splits(splits, torch.bfloat16, "cuda", contexts=(1, 33, 128, 129, 300), tile=tile)
        torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2, msg=lambda m, t=tile: f"tile {t}: {m}")


def test_the_triton_backend_refuses_a_head_size_its_tiles_cannot_span():
    """Checked when the engine builds its model, so a checkpoint with head_dim 12 fails at start with
    a message naming the head size, not in a Triton compile at the first prefill."""
    from tpfleet.attention.backend import get_backend

    triton_backend = get_backend("triton")
    for head_dim in (16, 64, 128, 256):
        triton_backend.check_head_dim(head_dim)
    for head_dim in (8, 12, 96):
        with pytest.raises(ValueError, match=f"power of two.*this model's is {head_dim}"):
            triton_backend.check_head_dim(head_dim)
    get_backend("torch").check_head_dim(12)  # the reference takes any size
