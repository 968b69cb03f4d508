"""The fused Triton ops against the torch code they replace: on GPU, and in Triton's interpreter on CPU."""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA, run_in_triton_interpreter

from tpfleet.model.layers import RMSNorm, RotaryEmbedding

triton = pytest.importorskip("triton")

# hidden, heads, kv heads, head_dim: the tiny preset's odd sizes and Qwen3-8B's
SHAPES = [(64, 4, 2, 32), (4096, 32, 8, 128)]


def _norm(dim: int, g: torch.Generator) -> RMSNorm:
    n = RMSNorm(dim, 1e-6)
    n.weight.data = 1 + 0.1 * torch.randn(dim, generator=g)
    return n


def compare(shape, tokens: int, dtype: torch.dtype, device: str) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, fused output, torch reference output) for each op; the reference runs on the CPU."""
    from tpfleet.kernels import ops

    hidden, heads, kv_heads, d = shape
    g = torch.Generator().manual_seed(tokens)

    def rnd(*s):
        return torch.randn(*s, generator=g).to(dtype)

    x, res = rnd(tokens, hidden), rnd(tokens, hidden)
    norm = _norm(hidden, g).to(dtype)
    out = []
    y, r = ops.rms_norm(x.to(device), norm.weight.to(device), norm.eps, res.to(device))
    ref_y, ref_r = norm(x, res)
    out += [("rms_norm+residual", y, ref_y), ("residual", r, ref_r)]
    out.append(("rms_norm", ops.rms_norm(x.to(device), norm.weight.to(device), norm.eps), norm(x)))

    qkv = rnd(tokens, (heads + 2 * kv_heads) * d)
    positions = torch.randint(0, 4096, (tokens,), generator=g)
    q_norm, k_norm = _norm(d, g).to(dtype), _norm(d, g).to(dtype)
    rope = RotaryEmbedding(d, 4096, 1e6)
    q, k, v = ops.qk_norm_rope(qkv.to(device), positions.to(device), q_norm.weight.to(device),
                                      k_norm.weight.to(device), 1e-6, rope.cos.to(device), rope.sin.to(device),
                                      heads, kv_heads, d)
    rq, rk, rv = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    rq, rk = rope(positions, q_norm(rq.reshape(tokens, heads, d)), k_norm(rk.reshape(tokens, kv_heads, d)))
    out += [("q", q, rq), ("k", k, rk), ("v", v, rv.reshape(tokens, kv_heads, d))]

    # Straight into a paged cache: every token to its slot, except the last, a padded row (slot -1).
    page = 8
    blocks = tokens // page + 1
    slots = torch.randperm(blocks * page, generator=g)[:tokens]
    slots[-1] = -1
    caches = [torch.zeros(blocks, page, kv_heads, d, dtype=dtype, device=device) for _ in range(2)]
    q2, none_k, none_v = ops.qk_norm_rope(
        qkv.to(device), positions.to(device), q_norm.weight.to(device), k_norm.weight.to(device), 1e-6,
        rope.cos.to(device), rope.sin.to(device), heads, kv_heads, d, (*caches, slots.to(device)))
    assert none_k is None and none_v is None
    for name, cache, ref in (("k to cache", caches[0], rk), ("v to cache", caches[1], rv.reshape(tokens, kv_heads, d))):
        expect = torch.zeros(blocks * page, kv_heads, d, dtype=dtype)
        expect[slots[:-1]] = ref[:-1]
        out.append((name, cache.view(blocks * page, kv_heads, d), expect))
    out.append(("q beside the cache", q2, rq))

    gate_up = rnd(tokens, 2 * 3 * hidden)
    gate, up = gate_up.chunk(2, dim=-1)
    out.append(("silu_and_mul", ops.silu_and_mul(gate_up.to(device)), torch.nn.functional.silu(gate) * up))
    return out


def check(shape, tokens, dtype, device) -> None:
    tol = 1e-5 if dtype == torch.float32 else 1.6e-2  # bf16: at most one rounding step apart
    for name, got, ref in compare(shape, tokens, dtype, device):
        assert got.shape == ref.shape, name
        torch.testing.assert_close(got.cpu().float(), ref.float(), atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")


def interpreter_main() -> None:
    """Run by run_in_triton_interpreter: Triton on the CPU."""
    for tokens in (1, 5):
        check(SHAPES[0], tokens, torch.float32, "cpu")
    print("interpreter: all ops match")


def test_fused_ops_match_torch_in_the_interpreter():
    assert "all ops match" in run_in_triton_interpreter("test_triton_ops")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tokens", [1, 37, 256])
def test_fused_ops_match_torch_on_gpu(shape, tokens, dtype):
    check(shape, tokens, dtype, "cuda")
