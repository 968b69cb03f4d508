"""Fused Triton kernels for the model's small ops, one launch each where eager PyTorch needs many.

A batch-1 decode step is a few hundred kernels; every one costs microseconds even inside a CUDA
graph. Written out in torch ops, an RMSNorm is about nine kernels and RoPE on q and k about twenty,
so a Qwen3 layer was some sixty launches around its four GEMMs. Here each of them is one.

Each kernel rounds where its torch reference in `tpfleet.model.layers` rounds (to the model dtype
after the normalisation, after the weight, after SiLU), so both paths agree to the last bit or close
to it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tpfleet.kernels import fused_ar, pdl
from tpfleet.kernels.fused_ar import Exchange


@triton.jit
def _rms_norm_kernel(x, res, w, out, res_out, n, eps, HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    m = offs < n
    v = tl.load(x + row * n + offs, mask=m, other=0.0)
    if HAS_RES:
        v = (v.to(tl.float32) + tl.load(res + row * n + offs, mask=m, other=0.0).to(tl.float32)).to(v.dtype)
        tl.store(res_out + row * n + offs, v, mask=m)
    vf = v.to(tl.float32)
    r = tl.rsqrt(tl.sum(vf * vf, axis=0) / n + eps)
    y = (vf * r).to(v.dtype).to(tl.float32) * tl.load(w + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(out + row * n + offs, y.to(v.dtype), mask=m)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """RMSNorm over the last dim; with `residual`, adds it first and also returns the sum."""
    n = x.shape[-1]
    x = x.contiguous()
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else out
    res = residual.contiguous() if residual is not None else x
    block = triton.next_power_of_2(n)
    _rms_norm_kernel[(x.numel() // n,)](x, res, weight, out, res_out, n, eps, HAS_RES=residual is not None,
                                        BLOCK=block, num_warps=min(16, max(1, block // 256)))
    return out if residual is None else (out, res_out)


@triton.jit
def _qk_norm_rope_kernel(qkv, positions, qw, kw, cos, sin, q_out, k_out, v_out, slots, eps, row_stride,
                         H: tl.constexpr, KV: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
                         TO_CACHE: tl.constexpr, PDL: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs = tl.arange(0, HALF_PAD)
    m = offs < HALF
    # Only qkv comes from the kernel before (the projection): under PDL the position's rotation, the
    # norm weight and the slot are read while that kernel drains (tpfleet.kernels.pdl).
    pos = tl.load(positions + t)
    c = tl.load(cos + pos * HALF + offs, mask=m)
    s = tl.load(sin + pos * HALF + offs, mask=m)
    w = qw if h < H else kw  # for a v head: loaded, not used
    w1 = tl.load(w + offs, mask=m).to(tl.float32)
    w2 = tl.load(w + HALF + offs, mask=m).to(tl.float32)
    if TO_CACHE:  # k and v go straight to their cache slot; padded rows (slot -1) store nothing
        slot = tl.load(slots + t)
        kv_row = slot * KV + h - H
        keep = m & (tl.full([HALF_PAD], 0, tl.int64) + slot >= 0)
    else:
        kv_row = t * KV + h - H
        keep = m
    pdl.enter(PDL)
    src = qkv + t * row_stride + h * (2 * HALF)
    x1 = tl.load(src + offs, mask=m, other=0.0)
    x2 = tl.load(src + HALF + offs, mask=m, other=0.0)
    if h < H + KV:  # a q or k head: per-head RMSNorm, then neox RoPE (rotate halves)
        if h < H:
            dst = q_out + (t * H + h) * (2 * HALF)
            keep = m
        else:
            dst = k_out + kv_row * (2 * HALF)
        f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
        r = tl.rsqrt((tl.sum(f1 * f1, axis=0) + tl.sum(f2 * f2, axis=0)) / (2 * HALF) + eps)
        y1 = ((f1 * r).to(x1.dtype).to(tl.float32) * w1).to(x1.dtype).to(tl.float32)
        y2 = ((f2 * r).to(x1.dtype).to(tl.float32) * w2).to(x1.dtype).to(tl.float32)
        tl.store(dst + offs, (y1 * c - y2 * s).to(dst.dtype.element_ty), mask=keep)
        tl.store(dst + HALF + offs, (y2 * c + y1 * s).to(dst.dtype.element_ty), mask=keep)
    else:  # a v head: copied out contiguous (or into the cache)
        dst = v_out + (kv_row - KV) * (2 * HALF)
        tl.store(dst + offs, x1, mask=keep)
        tl.store(dst + HALF + offs, x2, mask=keep)


def qk_norm_rope(qkv: torch.Tensor, positions: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                 eps: float, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, num_kv_heads: int,
                 head_dim: int, kv_cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Split the qkv projection into q, k, v [tokens, heads, head_dim]; q and k normed and rotated.
    With `kv_cache` = (k_cache, v_cache, slot_mapping), k and v are written to their cache slots
    instead, saving the KV store's launch, and None is returned for them."""
    tokens = qkv.shape[0]
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    q = qkv.new_empty(tokens, num_heads, head_dim)
    if kv_cache is None:
        k = qkv.new_empty(tokens, num_kv_heads, head_dim)
        v = qkv.new_empty(tokens, num_kv_heads, head_dim)
        slots = positions  # unread
    else:
        k, v, slots = kv_cache
    half = head_dim // 2
    use_pdl = pdl.enabled(qkv.device, tokens)
    _qk_norm_rope_kernel[(tokens, num_heads + 2 * num_kv_heads)](
        qkv, positions, q_weight, k_weight, cos, sin, q, k, v, slots, eps, qkv.stride(0),
        H=num_heads, KV=num_kv_heads, HALF=half, HALF_PAD=triton.next_power_of_2(half), TO_CACHE=kv_cache is not None,
        PDL=use_pdl, launch_pdl=use_pdl, num_warps=1)
    return (q, k, v) if kv_cache is None else (q, None, None)


@triton.jit
def silu_mul(gate, up, dtype: tl.constexpr):
    """silu(gate) * up in `dtype`, rounded where the torch reference rounds: both inputs, the SiLU, the
    product. Every kernel that applies SwiGLU's activation (here, in the GEMV's prologue, the skinny
    GEMM's and the MoE GEMMs' epilogues) calls this one."""
    g = gate.to(dtype).to(tl.float32)
    u = up.to(dtype).to(tl.float32)
    return ((g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32) * u).to(dtype)


@triton.jit
def _silu_and_mul_kernel(x, out, inter, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < inter
    g = tl.load(x + t * 2 * inter + offs, mask=m, other=0.0)
    u = tl.load(x + t * 2 * inter + inter + offs, mask=m, other=0.0)
    tl.store(out + t * inter + offs, silu_mul(g, u, g.dtype), mask=m)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU's activation: silu(gate) * up, where x = [gate | up] along the last dim."""
    inter = x.shape[-1] // 2
    x = x.contiguous()
    out = x.new_empty(*x.shape[:-1], inter)
    block = min(1024, triton.next_power_of_2(inter))
    _silu_and_mul_kernel[(x.numel() // (2 * inter), triton.cdiv(inter, block))](x, out, inter, BLOCK=block,
                                                                               num_warps=4)
    return out


@triton.jit
def _embedding_kernel(ids, weight, out, start, end, H, xchg, site, rank, timeout_ns, BLOCK: tl.constexpr,
                      WORLD: tl.constexpr):
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tok = tl.load(ids)
    mine = (tok >= start) & (tok < end)
    row = tl.load(weight + (tok - start).to(tl.int64) * H + cols, mask=cols < tl.where(mine, H, 0), other=0.0)
    fused_ar.all_reduce_block(xchg, site, rank, cols, row, out, H, timeout_ns, WORLD)


def embedding_all_reduce(ids: torch.Tensor, weight: torch.Tensor, start: int, end: int, exchange: Exchange,
                         site: int) -> torch.Tensor:
    """One token's row of a vocabulary-parallel embedding (`weight` holds rows start..end): the rank
    holding it gives the row, the others zeros, and the fused all-reduce sums them block by block
    through `site` of `exchange`. One launch where the torch path takes seven small kernels and an
    all-reduce."""
    hidden = weight.shape[1]
    out = weight.new_empty(1, hidden)
    block = min(512, hidden & -hidden)  # a power of two that divides the row: every block is full
    _embedding_kernel[(hidden // block,)](ids, weight, out, start, end, hidden, exchange.table, site, exchange.rank,
                                          exchange.timeout_ns, BLOCK=block, WORLD=exchange.world, num_warps=4)
    return out
