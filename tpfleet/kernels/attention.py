"""Paged attention in Triton: KV store, split-KV decode with GQA, and prefill/extend over a cached prefix.

Everything a kernel needs about lengths it reads from device memory, and grids depend only on the
batch shape, so the decode path can be captured in a CUDA graph and replayed for any contexts.
Keys and values live in pages of `block_size` tokens; token j of sequence b sits in page
block_tables[b, j // block_size] at offset j % block_size.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from tpfleet.kernels import pdl
from tpfleet.kernels.arrivals import counters, last_to_arrive

if TYPE_CHECKING:  # kernels import nothing above them at run time; the caller builds it
    from tpfleet.attention.backend import NewTokens

MAX_DECODE_SPLITS = 16  # KV splits per (sequence, kv head): parallelism for small batches and long contexts
# Fewest tokens per split: one tile. More splits than a context has tiles only add partial results
# to merge (`tpfleet bench attention`: batch 8, 144 tokens, 6.5 us against 9.6 with every split used);
# longer splits run their tiles one after another (512 tokens in one split: 12.5 us against 6.4).
MIN_SPLIT_TOKENS = 64


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """fp32 operands stay fp32 (no silent TF32): the fp32 engine must match its reference exactly."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _kv_tile(k_cache, v_cache, table, tok, valid, kvh, d, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
             PAGE: tl.constexpr):
    """Keys and values of tokens `tok` of one sequence (its block table row `table`), one kv head."""
    page = tl.load(table + tok // PAGE, mask=valid, other=0)
    row = (page * PAGE + tok % PAGE) * KV_HEADS + kvh
    kt = tl.load(k_cache + row[:, None] * HEAD_DIM + d[None, :], mask=valid[:, None], other=0.0)
    vt = tl.load(v_cache + row[:, None] * HEAD_DIM + d[None, :], mask=valid[:, None], other=0.0)
    return kt, vt


@triton.jit
def _decode_tile(qv, kt, vt, valid, m_i, l_i, acc, scale, IEEE: tl.constexpr):
    """Fold one tile of keys and values (its `valid` rows) into a query group's softmax state."""
    qk = _dot(qv, tl.trans(kt), IEEE).to(tl.float32) * scale
    qk = tl.where(valid[None, :], qk, float("-inf"))
    return _softmax_update(qk, vt, m_i, l_i, acc, IEEE)


@triton.jit
def _softmax_update(qk, vt, m_i, l_i, acc, IEEE: tl.constexpr):
    """One step of online softmax: fold a tile of (masked) scores and its values into the running state."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(vt.dtype), vt, IEEE).to(tl.float32)
    return m_new, l_i, acc


@triton.jit
def _store_kv_kernel(k, v, k_cache, v_cache, slot_mapping, ROW: tl.constexpr, ROW_PAD: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_mapping + t)
    if slot >= 0:  # padded tokens of a graph bucket have slot -1: nothing to store
        offs = tl.arange(0, ROW_PAD)
        m = offs < ROW
        tl.store(k_cache + slot * ROW + offs, tl.load(k + t * ROW + offs, mask=m), mask=m)
        tl.store(v_cache + slot * ROW + offs, tl.load(v + t * ROW + offs, mask=m), mask=m)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    row = k.shape[1] * k.shape[2]
    _store_kv_kernel[(k.shape[0],)](k.contiguous(), v.contiguous(), k_cache, v_cache, slot_mapping,
                                    ROW=row, ROW_PAD=triton.next_power_of_2(row))


@triton.jit
def _norm_rope(x, xp, norm_w, d, partner, c, s, sign, eps, HEAD_DIM: tl.constexpr):
    """Rows of heads [R, HEAD_DIM] RMS-normed and rotated (neox halves) as `ops.qk_norm_rope` does, each
    element given with its partner in the other half (xp: element `partner`) and that half's sign;
    rounded alike."""
    w = tl.load(norm_w + d).to(tl.float32)[None, :]
    wp = tl.load(norm_w + partner).to(tl.float32)[None, :]
    f, fp = x.to(tl.float32), xp.to(tl.float32)
    r = tl.rsqrt(tl.sum(f * f, axis=1) / HEAD_DIM + eps)[:, None]
    y = ((f * r).to(x.dtype).to(tl.float32) * w).to(x.dtype).to(tl.float32)
    yp = ((fp * r).to(x.dtype).to(tl.float32) * wp).to(x.dtype).to(tl.float32)
    return (y * c + sign * yp * s).to(x.dtype)


@triton.jit
def _decode_kernel(q, k_cache, v_cache, block_tables, context_lens, part_out, part_lse, arrivals, out, scale,
                   stride_bt, positions, slots, q_norm, k_norm, cos, sin, eps,
                   GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, KV_HEADS: tl.constexpr,
                   HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr,
                   MIN_SPLIT: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr, FROM_QKV: tl.constexpr):
    """FROM_QKV: `q` is the qkv projection's rows; each program norms and rotates its query heads, and the
    one whose split holds the newest token does so for that token's key, and stores it and its value in
    the cache (`ops.qk_norm_rope`'s work, without its launch)."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(context_lens + b)
    # The splits this context uses: each gets at least MIN_SPLIT tokens. A context that short is one
    # program, which writes the result directly; the other programs have nothing to do.
    active = tl.minimum(tl.maximum(tl.cdiv(ctx, MIN_SPLIT), 1), SPLITS)
    if split >= active:
        return
    per_split = tl.cdiv(tl.cdiv(ctx, active), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, ctx)
    table = block_tables + b * stride_bt
    n = tl.arange(0, BLOCK_N)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    heads = kvh * GROUP + g
    rows = (b * KV_HEADS * GROUP + heads)[:, None] * HEAD_DIM + d[None, :]
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    first = start
    if FROM_QKV:  # what the qkv projection does not write is read before any wait
        half = HEAD_DIM // 2
        partner = (d + half) % HEAD_DIM
        sign = tl.where(d < half, -1.0, 1.0)[None, :]
        pos = tl.load(positions + b)
        c = tl.load(cos + pos * half + d % half)[None, :]
        s_ = tl.load(sin + pos * half + d % half)[None, :]
        slot = tl.load(slots + b)
    if PDL:
        # The kernel before this one may still be running. It writes q and the newest token's key and
        # value (q/k norm with the KV store; with FROM_QKV, the qkv projection), nothing else read here:
        # the first tile is loaded before waiting for it, and its newest row is replaced after. Its loads
        # then run ahead of the dependents' weight prefetches, which, issued first, slowed attention
        # (docs/benchmarks.md).
        tok = start + n
        valid = tok < end
        kt, vt = _kv_tile(k_cache, v_cache, table, tok, valid, kvh, d, KV_HEADS, HEAD_DIM, PAGE)
        pdl.enter(PDL)
    if FROM_QKV:
        row = q + b.to(tl.int64) * (KV_HEADS * (GROUP + 2) * HEAD_DIM)
        q_ok = (g < GROUP)[:, None]
        qv = _norm_rope(tl.load(row + heads[:, None] * HEAD_DIM + d[None, :], mask=q_ok, other=0.0),
                        tl.load(row + heads[:, None] * HEAD_DIM + partner[None, :], mask=q_ok, other=0.0),
                        q_norm, d, partner, c, s_, sign, eps, HEAD_DIM)
        k_row = row + (KV_HEADS * GROUP + kvh) * HEAD_DIM
        k_new = _norm_rope(tl.load(k_row + d)[None, :], tl.load(k_row + partner)[None, :], k_norm, d, partner,
                           c, s_, sign, eps, HEAD_DIM).to(k_cache.dtype.element_ty)
        v_new = tl.load(k_row + KV_HEADS * HEAD_DIM + d)[None, :].to(v_cache.dtype.element_ty)
        cache_row = (slot * KV_HEADS + kvh) * HEAD_DIM + d[None, :]
        newest_col = tl.zeros([1, HEAD_DIM], tl.int32) + ctx - 1
        # the split holding the newest token stores it; padded rows (slot -1) store nothing
        store = (newest_col >= start) & (newest_col < end) & (tl.zeros([1, HEAD_DIM], tl.int64) + slot >= 0)
        tl.store(k_cache + cache_row, k_new, mask=store)
        tl.store(v_cache + cache_row, v_new, mask=store)
        tl.debug_barrier()  # the tiles below read the newest row back: every thread's store is before them
    else:
        qv = tl.load(q + rows, mask=(g < GROUP)[:, None], other=0.0)
    if PDL:
        newest = valid & (tok == ctx - 1)
        if not FROM_QKV:
            k_new, v_new = _kv_tile(k_cache, v_cache, table, tok, newest, kvh, d, KV_HEADS, HEAD_DIM, PAGE)
        if start < end:  # a split past the context's end has an empty tile, which the softmax must not see
            m_i, l_i, acc = _decode_tile(qv, tl.where(newest[:, None], k_new, kt),
                                         tl.where(newest[:, None], v_new, vt), valid, m_i, l_i, acc, scale, IEEE)
        first = start + BLOCK_N
    for s in range(first, end, BLOCK_N):  # names of its own: only the softmax state is carried
        toks = s + n
        ok = toks < end
        k_tile, v_tile = _kv_tile(k_cache, v_cache, table, toks, ok, kvh, d, KV_HEADS, HEAD_DIM, PAGE)
        m_i, l_i, acc = _decode_tile(qv, k_tile, v_tile, ok, m_i, l_i, acc, scale, IEEE)
    has = l_i > 0
    res = acc / tl.where(has, l_i, 1.0)[:, None]
    final = active == 1  # one program had the whole context: no partials to merge
    if SPLITS > 1:
        if active > 1:
            part_rows = (b * KV_HEADS * GROUP + heads) * SPLITS
            tl.store(part_out + (part_rows + split)[:, None] * HEAD_DIM + d[None, :], res, mask=(g < GROUP)[:, None])
            tl.store(part_lse + part_rows + split,
                     tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf")), mask=g < GROUP)
            # The last split of this (sequence, kv head) to finish merges them all (tpfleet.kernels.arrivals)
            final = last_to_arrive(arrivals + b * KV_HEADS + kvh, active)
            if final:
                sp = tl.arange(0, SPLITS)
                lse = tl.load(part_lse + part_rows[:, None] + sp[None, :],
                              mask=(g < GROUP)[:, None] & (sp < active)[None, :], other=float("-inf"),
                              cache_modifier=".cg")  # written by other SMs: skip L1
                m = tl.max(lse, 1)
                w = tl.where(lse > float("-inf"), tl.exp(lse - tl.where(m > float("-inf"), m, 0.0)[:, None]), 0.0)
                res = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
                for i in tl.static_range(SPLITS):
                    live = (g < GROUP) & (tl.full([GROUP_PAD], i, tl.int32) < active)  # unused splits hold garbage
                    part = tl.load(part_out + (part_rows + i)[:, None] * HEAD_DIM + d[None, :], mask=live[:, None],
                                   other=0.0, cache_modifier=".cg")
                    res += part * tl.sum(tl.where(sp[None, :] == i, w, 0.0), 1)[:, None]
                total = tl.sum(w, 1)
                res = res / tl.where(total > 0, total, 1.0)[:, None]
    if final:
        tl.store(out + rows, res.to(out.dtype.element_ty), mask=(g < GROUP)[:, None])


@functools.cache
def _sm_count(device: torch.device) -> int:
    # Triton's interpreter runs on the CPU: pretend to be a mid-size GPU so small batches still split
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 128


def decode_splits(batch: int, kv_heads: int, device: torch.device) -> int:
    """Enough (sequence, kv head, split) programs to fill the GPU twice, and no more: every extra split
    writes a partial result in fp32 that the last one reads back. Large batches need no split, and
    skip the merge. Depends on the batch shape only, so a captured graph stays valid."""
    want = -(-2 * _sm_count(device) // (batch * kv_heads))
    return 1 if want <= 1 else min(MAX_DECODE_SPLITS, triton.next_power_of_2(want))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, scale: float, out: torch.Tensor | None = None,
                     splits: int | None = None, min_split: int = MIN_SPLIT_TOKENS,
                     tile: tuple[int, int, int] | None = None, new: NewTokens | None = None) -> torch.Tensor:
    """q: [batch, heads, head_dim], one query per sequence. A sequence of context 0 gets zeros.
    `splits` programs per (sequence, kv head) are launched; a context of n tokens uses
    min(splits, ceil(n / min_split)) of them, decided on the device, so graphs stay valid.
    `tile` (tokens per tile, warps, pipeline stages) overrides the default for `tpfleet bench attention`.
    With `new`, q is instead the qkv projection [batch, (heads + 2 * kv_heads) * head_dim], whose q and k
    are normed and rotated and whose k and v are stored here, as `ops.qk_norm_rope` would before."""
    kv_heads, page, head_dim = k_cache.shape[2], k_cache.shape[1], k_cache.shape[3]
    batch = q.shape[0]
    heads = q.shape[1] // head_dim - 2 * kv_heads if new is not None else q.shape[1]
    group = heads // kv_heads
    splits = splits or decode_splits(batch, kv_heads, q.device)
    out = q.new_empty(batch, heads, head_dim) if out is None else out
    # partial results per split, merged by the last split to finish; with one split none are needed
    part_out = torch.empty(batch, heads, splits, head_dim, dtype=torch.float32, device=q.device) if splits > 1 else out
    part_lse = torch.empty(batch, heads, splits, dtype=torch.float32, device=q.device) if splits > 1 else out
    arrivals = counters("decode_attention", q.device, batch * kv_heads) if splits > 1 else out
    use_pdl = pdl.enabled(q.device, batch)
    # Batch 1 (PDL) runs 8 warps a program: a little faster in the engine's step (docs/benchmarks.md).
    block_n, warps, stages = tile or (64, 8 if use_pdl else 4, None)
    # without `new` (FROM_QKV off) the kernel reads none of these
    positions, slots, q_norm, k_norm, eps, cos, sin = new or (out, out, out, out, 0.0, out, out)
    _decode_kernel[(batch, kv_heads, splits)](
        q.contiguous(), k_cache, v_cache, block_tables, context_lens, part_out, part_lse, arrivals, out, scale,
        block_tables.stride(0), positions, slots, q_norm, k_norm, cos, sin, eps,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), KV_HEADS=kv_heads,
        HEAD_DIM=head_dim, PAGE=page, BLOCK_N=block_n, SPLITS=splits, MIN_SPLIT=min_split,
        IEEE=q.dtype == torch.float32, PDL=use_pdl, FROM_QKV=new is not None, launch_pdl=use_pdl, num_warps=warps,
        **({"num_stages": stages} if stages else {}))
    return out


@triton.jit
def _extend_kernel(q, k_cache, v_cache, out, block_tables, context_lens, query_start, query_lens, scale, stride_bt,
                   HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    seq = tl.program_id(0)
    h = tl.program_id(1)
    tile = tl.program_id(2)
    q_len = tl.load(query_lens + seq)
    if tile * BLOCK_M >= q_len:
        return
    ctx = tl.load(context_lens + seq)
    q0 = tl.load(query_start + seq) - tl.load(query_start)  # rows of q counted from this call's first query
    kvh = h // (HEADS // KV_HEADS)
    m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, HEAD_DIM)
    q_ok = m < q_len
    q_pos = ctx - q_len + m  # absolute positions of these queries
    qv = tl.load(q + ((q0 + m) * HEADS + h)[:, None] * HEAD_DIM + d[None, :], mask=q_ok[:, None], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    n = tl.arange(0, BLOCK_N)
    kv_end = tl.minimum(ctx, ctx - q_len + (tile + 1) * BLOCK_M)  # causal: nothing past the tile's last query
    for s in range(0, kv_end, BLOCK_N):
        tok = s + n
        valid = tok < kv_end
        kt, vt = _kv_tile(k_cache, v_cache, block_tables + seq * stride_bt, tok, valid, kvh, d, KV_HEADS, HEAD_DIM,
                          PAGE)
        qk = _dot(qv, tl.trans(kt), IEEE).to(tl.float32) * scale
        qk = tl.where(valid[None, :] & (tok[None, :] <= q_pos[:, None]), qk, float("-inf"))
        m_i, l_i, acc = _softmax_update(qk, vt, m_i, l_i, acc, IEEE)
    res = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out + ((q0 + m) * HEADS + h)[:, None] * HEAD_DIM + d[None, :], res.to(out.dtype.element_ty),
             mask=q_ok[:, None])


def extend_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                     block_tables: torch.Tensor, context_lens: torch.Tensor, query_start: torch.Tensor,
                     query_lens: torch.Tensor, max_query_len: int, scale: float) -> None:
    """Causal attention of each sequence's new tokens (rows query_start[i] - query_start[0] .. of q)
    over its whole context, prefix included. Keys and values of the new tokens must already be in
    the cache."""
    num_seqs = query_lens.shape[0]
    heads, head_dim = q.shape[1], q.shape[2]
    block_m = 64 if max_query_len > 32 else 16
    grid = (num_seqs, heads, triton.cdiv(max_query_len, block_m))
    _extend_kernel[grid](q, k_cache, v_cache, out, block_tables, context_lens, query_start, query_lens, scale,
                         block_tables.stride(0), HEADS=heads, KV_HEADS=k_cache.shape[2], HEAD_DIM=head_dim,
                         PAGE=k_cache.shape[1], BLOCK_M=block_m, BLOCK_N=64, IEEE=q.dtype == torch.float32)
