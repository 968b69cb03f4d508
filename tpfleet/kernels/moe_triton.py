"""The mixture-of-experts layer on the GPU: routed tokens through their experts, in a few launches.

`fused_moe` computes what `tpfleet.kernels.moe.moe_reference` computes, with the same arguments: for
each token, the sum over its top-k experts held by this rank of weight * down(silu(gate(x)) * up(x)).
Nothing in it waits for the host: every size comes from the tensors' shapes, never from their values,
so a CUDA graph can capture it and replay it with new routings.

Two paths, picked per token count by the tuning table (or `default_config`):

- `gemv`, for decode: a token touches k of E experts (8 of 128 for Qwen3-30B-A3B), so at a few
  tokens the layer is a stream over the chosen experts' weights. One program per (token-expert pair,
  output tile) streams that expert's gate and up rows; one per (token, output tile) streams the down
  rows of all the token's experts together and sums the k contributions in registers.
- `grouped`, for prefill and large batches: token-expert pairs are sorted by expert on the device
  (`align_by_expert`), each expert's run padded to a multiple of BLOCK_M, so every BLOCK_M block
  of sorted pairs belongs to one expert. A grouped GEMM then multiplies each block by its expert's
  gate and up tiles with SiLU-and-mul in the epilogue; a second multiplies by the expert's down tiles.

The grouped path writes each pair's expert output to a [tokens * k, hidden] buffer and a last
kernel sums a token's k rows in a fixed order, times their routing weights. Atomic adds into an fp32
output would spare that buffer's round trip (at 8192 tokens of Qwen3-30B-A3B, 0.27 GB written and
read again, against a layer that multiplies for a millisecond or more), yet still need a zeroed fp32
output and a cast back; and the order of the additions would change from run to run, and so would
the last bit of a logit: an RL trainer comparing the engine's log-probabilities with its own wants
one answer per input. The weight is applied in that last sum, in fp32, as the reference applies
it, so both round alike: expert outputs to the model dtype, the weighted sum once.

Tile configs come from `tune_moe` (run by `tpfleet bench moe --sweep`), cached per GPU and shape
under tpfleet's cache root like the other tuning tables.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from pathlib import Path
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from tpfleet import env
from tpfleet.jit import STATS, write_atomic
from tpfleet.kernels import ops, pdl

log = logging.getLogger("tpfleet.kernels.moe")

ALIGN_CHUNK = 1024  # pairs per program of the sort
ALIGN_SUB = 32  # pairs compared with every expert at once
FILL = 256  # sentinel slots written per step
BLOCK_TABLE_SUB = 64  # blocks assigned an expert per step
GROUP_M = 8  # grouped GEMM: M blocks that walk the N tiles together, for L2 reuse of their weight tiles


@triton.jit
def _local_onehot(ids, pairs, num_pairs, first, num_local, experts):
    """[len(pairs), len(experts)] int32: 1 where the pair's expert is that local expert; a row of
    zeros for a pair past the end or routed to another rank's expert."""
    inside = pairs < num_pairs
    local = tl.load(ids + pairs, mask=inside, other=-1).to(tl.int32) - first
    keep = inside & (local >= 0) & (local < num_local)
    return ((local[:, None] == experts[None, :]) & keep[:, None]).to(tl.int32)


@triton.jit
def _count_kernel(ids, counts, sorted_ids, num_pairs, first, num_local, num_rows, fill_per_program,
                  CHUNK: tl.constexpr, SUB: tl.constexpr, E_P2: tl.constexpr, FILL_BLOCK: tl.constexpr):
    """Per chunk of pairs, how many go to each local expert; and the sentinel (num_pairs) in every
    slot of the sorted list, which the scatter then overwrites where a pair lands."""
    pid = tl.program_id(0)
    experts = tl.arange(0, E_P2)
    hist = tl.zeros([E_P2], dtype=tl.int32)
    begin = pid * CHUNK
    for s in range(begin, tl.minimum(begin + CHUNK, num_pairs), SUB):
        hist += tl.sum(_local_onehot(ids, s + tl.arange(0, SUB), num_pairs, first, num_local, experts), axis=0)
    tl.store(counts + pid * E_P2 + experts, hist)
    fill_begin = pid * fill_per_program
    fill_end = tl.minimum(fill_begin + fill_per_program, num_rows)
    sentinel = tl.full([FILL_BLOCK], 0, tl.int32) + num_pairs
    for f in range(fill_begin, fill_end, FILL_BLOCK):
        r = f + tl.arange(0, FILL_BLOCK)
        tl.store(sorted_ids + r, sentinel, mask=r < fill_end)


@triton.jit
def _scatter_kernel(ids, counts, sorted_ids, block_expert, num_rows_used, num_pairs, first, num_local,
                    num_chunks, max_blocks, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, SUB: tl.constexpr,
                    E_P2: tl.constexpr, TABLE_SUB: tl.constexpr):
    """Each pair's slot: its expert's padded start, plus the pairs of that expert in earlier chunks,
    plus those before it in its own chunk. Every program sums the (small) count table itself rather
    than waiting on a third launch; program 0 also writes each block's expert and the rows in use."""
    pid = tl.program_id(0)
    experts = tl.arange(0, E_P2)
    total = tl.zeros([E_P2], dtype=tl.int32)
    before = tl.zeros([E_P2], dtype=tl.int32)
    for c in range(0, num_chunks):
        hist = tl.load(counts + c * E_P2 + experts)
        total += hist
        before += tl.where(c < pid, hist, 0)
    padded = (total + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    end = tl.cumsum(padded, axis=0)
    running = end - padded + before
    begin = pid * CHUNK
    for s in range(begin, tl.minimum(begin + CHUNK, num_pairs), SUB):
        pairs = s + tl.arange(0, SUB)
        hit = _local_onehot(ids, pairs, num_pairs, first, num_local, experts)
        rank = tl.sum((tl.cumsum(hit, axis=0) - hit) * hit, axis=1)  # same-expert pairs before it in this step
        dest = tl.sum(hit * running[None, :], axis=1) + rank
        tl.store(sorted_ids + dest, pairs, mask=tl.sum(hit, axis=1) > 0)
        running += tl.sum(hit, axis=0)
    if pid == 0:
        used = tl.sum(padded, axis=0)
        tl.store(num_rows_used, used)
        for b0 in range(0, max_blocks, TABLE_SUB):
            blocks = b0 + tl.arange(0, TABLE_SUB)
            row = blocks * BLOCK_M
            # the block's expert: the number of experts whose padded run ends at or before its first row
            owner = tl.sum((end[None, :] <= row[:, None]).to(tl.int32), axis=1)
            tl.store(block_expert + blocks, tl.where(row < used, owner, -1), mask=blocks < max_blocks)


class Alignment(NamedTuple):
    """Token-expert pairs grouped by local expert. A pair is token * top_k + slot."""

    sorted_ids: torch.Tensor  # [max rows] int32; each expert's run padded to block_m with num_pairs
    block_expert: torch.Tensor  # [max rows / block_m] int32: the local expert of each block, -1 past the end
    rows_used: torch.Tensor  # [1] int32: the padded length actually filled
    block_m: int


def max_aligned_rows(num_pairs: int, num_local: int, block_m: int) -> int:
    """The longest the aligned list can be, from shapes alone: each non-empty expert pads by at most
    block_m - 1 slots, and at most min(experts, pairs) experts are non-empty."""
    blocks = triton.cdiv(num_pairs + min(num_local, num_pairs) * (block_m - 1), block_m)
    return blocks * block_m


def align_by_expert(topk_ids: torch.Tensor, num_local: int, first_expert: int, block_m: int) -> Alignment:
    """Sort pairs by local expert (stable: by pair within an expert) in two launches, on the device.
    Pairs routed to experts outside [first_expert, first_expert + num_local) are dropped."""
    ids = topk_ids.contiguous()
    num_pairs = ids.numel()
    rows = max_aligned_rows(num_pairs, num_local, block_m)
    chunks = triton.cdiv(num_pairs, ALIGN_CHUNK)
    e_p2 = triton.next_power_of_2(num_local)
    counts = torch.empty(chunks, e_p2, dtype=torch.int32, device=ids.device)
    sorted_ids = torch.empty(rows, dtype=torch.int32, device=ids.device)
    block_expert = torch.empty(rows // block_m, dtype=torch.int32, device=ids.device)
    rows_used = torch.empty(1, dtype=torch.int32, device=ids.device)
    _count_kernel[(chunks,)](ids, counts, sorted_ids, num_pairs, first_expert, num_local, rows,
                             triton.cdiv(rows, chunks), CHUNK=ALIGN_CHUNK, SUB=ALIGN_SUB, E_P2=e_p2,
                             FILL_BLOCK=FILL)
    _scatter_kernel[(chunks,)](ids, counts, sorted_ids, block_expert, rows_used, num_pairs, first_expert,
                               num_local, chunks, rows // block_m, BLOCK_M=block_m, CHUNK=ALIGN_CHUNK,
                               SUB=ALIGN_SUB, E_P2=e_p2, TABLE_SUB=BLOCK_TABLE_SUB)
    return Alignment(sorted_ids, block_expert, rows_used, block_m)


@triton.jit
def _block_of(pid, num_blocks_m, num_blocks_n, GROUP: tl.constexpr):
    """(M block, N tile) of a program: GROUP M blocks at a time sweep the N tiles, so the weight tiles
    an expert's consecutive blocks share are read while still in L2."""
    per_group = GROUP * num_blocks_n
    first_m = (pid // per_group) * GROUP
    size = tl.minimum(num_blocks_m - first_m, GROUP)
    return first_m + (pid % per_group) % size, (pid % per_group) // size


@triton.jit
def _grouped_gate_up_kernel(hidden, w, act, sorted_ids, block_expert, rows_used, num_pairs, HIDDEN, INTER, top_k,
                            max_blocks, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            GROUP: tl.constexpr, PRECISION: tl.constexpr):
    """act[slot] = silu(x @ gate.T) * (x @ up.T) for the BLOCK_M sorted slots of one expert."""
    pid_m, pid_n = _block_of(tl.program_id(0), max_blocks, tl.cdiv(INTER, BLOCK_N), GROUP)
    if pid_m * BLOCK_M >= tl.load(rows_used):
        return
    expert = tl.load(block_expert + pid_m).to(tl.int64)
    slots = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_ids + slots)
    valid = pairs < num_pairs
    tokens = (pairs // top_k).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    n_ok = rn < INTER
    x_ptr = hidden + tokens[:, None] * HIDDEN + rk[None, :]
    gate_ptr = w + expert * 2 * INTER * HIDDEN + rn[None, :].to(tl.int64) * HIDDEN + rk[:, None]  # [BLOCK_K, BLOCK_N]
    up_ptr = gate_ptr + INTER * HIDDEN
    acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, HIDDEN, BLOCK_K):
        k_ok = rk < HIDDEN - k0
        x = tl.load(x_ptr, mask=valid[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & n_ok[None, :]
        acc_gate = tl.dot(x, tl.load(gate_ptr, mask=w_mask, other=0.0), acc_gate, input_precision=PRECISION)
        acc_up = tl.dot(x, tl.load(up_ptr, mask=w_mask, other=0.0), acc_up, input_precision=PRECISION)
        x_ptr += BLOCK_K
        gate_ptr += BLOCK_K
        up_ptr += BLOCK_K
    y = ops.silu_mul(acc_gate, acc_up, act.dtype.element_ty)
    tl.store(act + slots[:, None].to(tl.int64) * INTER + rn[None, :], y, mask=valid[:, None] & n_ok[None, :])


@triton.jit
def _grouped_down_kernel(act, w, expert_out, sorted_ids, block_expert, rows_used, num_pairs, HIDDEN, INTER, max_blocks,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUP: tl.constexpr, PRECISION: tl.constexpr):
    """expert_out[pair] = act[slot] @ down.T for the BLOCK_M sorted slots of one expert."""
    pid_m, pid_n = _block_of(tl.program_id(0), max_blocks, tl.cdiv(HIDDEN, BLOCK_N), GROUP)
    if pid_m * BLOCK_M >= tl.load(rows_used):
        return
    expert = tl.load(block_expert + pid_m).to(tl.int64)
    slots = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_ids + slots)
    valid = pairs < num_pairs
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    n_ok = rn < HIDDEN
    a_ptr = act + slots[:, None].to(tl.int64) * INTER + rk[None, :]
    w_ptr = w + expert * HIDDEN * INTER + rn[None, :].to(tl.int64) * INTER + rk[:, None]  # [BLOCK_K, BLOCK_N]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, INTER, BLOCK_K):
        k_ok = rk < INTER - k0
        a = tl.load(a_ptr, mask=valid[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(a, tl.load(w_ptr, mask=k_ok[:, None] & n_ok[None, :], other=0.0), acc,
                     input_precision=PRECISION)
        a_ptr += BLOCK_K
        w_ptr += BLOCK_K
    out_ptr = expert_out + pairs[:, None].to(tl.int64) * HIDDEN + rn[None, :]
    tl.store(out_ptr, acc.to(expert_out.dtype.element_ty), mask=valid[:, None] & n_ok[None, :])


@triton.jit
def _combine_kernel(expert_out, ids, weights, out, first, num_local, HIDDEN, top_k, BLOCK: tl.constexpr):
    """out[token] = sum over its local experts, in slot order, of weight * expert output, in fp32."""
    token = tl.program_id(0).to(tl.int64)
    rh = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    h_ok = rh < HIDDEN
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(0, top_k):
        pair = token * top_k + j
        local = tl.load(ids + pair).to(tl.int32) - first
        if (local >= 0) & (local < num_local):
            y = tl.load(expert_out + pair * HIDDEN + rh, mask=h_ok, other=0.0).to(tl.float32)
            acc += tl.load(weights + pair).to(tl.float32) * y
    tl.store(out + token * HIDDEN + rh, acc.to(out.dtype.element_ty), mask=h_ok)


@triton.jit
def _gemv_gate_up_kernel(hidden, w, ids, act, first, num_local, HIDDEN, INTER, top_k,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """act[pair] = silu(x @ gate.T) * (x @ up.T) for BLOCK_N features of one pair's expert. Under PDL
    nothing is read before the wait: which expert's weights to stream is the router's answer."""
    pdl.enter(PDL)
    pair = tl.program_id(0).to(tl.int64)
    local = tl.load(ids + pair).to(tl.int32) - first
    if (local >= 0) & (local < num_local):
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        n_ok = rn < INTER
        x_row = hidden + (pair // top_k) * HIDDEN
        gate_rows = w + local.to(tl.int64) * 2 * INTER * HIDDEN + rn[:, None].to(tl.int64) * HIDDEN
        up_rows = gate_rows + INTER * HIDDEN
        acc_gate = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, HIDDEN, BLOCK_K):
            k_ok = k0 + rk < HIDDEN
            x = tl.load(x_row + k0 + rk, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            w_mask = n_ok[:, None] & k_ok[None, :]
            acc_gate += tl.load(gate_rows + k0 + rk[None, :], mask=w_mask, other=0.0).to(tl.float32) * x
            acc_up += tl.load(up_rows + k0 + rk[None, :], mask=w_mask, other=0.0).to(tl.float32) * x
        y = ops.silu_mul(tl.sum(acc_gate, axis=1), tl.sum(acc_up, axis=1), act.dtype.element_ty)
        tl.store(act + pair * INTER + rn, y, mask=n_ok)


@triton.jit
def _gemv_down_kernel(act, w, ids, weights, out, first, num_local, HIDDEN, INTER, TOP_K: tl.constexpr,
                      K_P2: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """out[token] for BLOCK_N features: each K step loads the down rows of all the token's experts at
    once, [K_P2, BLOCK_N, BLOCK_K], so a program keeps k experts' bytes in flight, not one expert's
    after another's; each expert's output is rounded to the model dtype, then weighted and summed in fp32.
    Under PDL the routing (written by the router, two kernels back) and the first weight tile are read
    while gate_up drains; its activations only after the wait."""
    token = tl.program_id(0).to(tl.int64)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    slots = tl.arange(0, K_P2)
    pairs = token * TOP_K + slots
    local = tl.load(ids + pairs, mask=slots < TOP_K, other=-1).to(tl.int32) - first
    mine = (slots < TOP_K) & (local >= 0) & (local < num_local)  # other ranks' experts load nothing
    scale = tl.load(weights + pairs, mask=mine, other=0.0).to(tl.float32)
    rows = (w + tl.where(mine, local, 0).to(tl.int64)[:, None, None] * HIDDEN * INTER
            + rn[None, :, None].to(tl.int64) * INTER + rk[None, None, :])
    a_rows = act + pairs[:, None] * INTER + rk[None, :]
    row_ok = mine[:, None, None] & (rn < HIDDEN)[None, :, None]
    w_tile = tl.load(rows, mask=row_ok & (rk < INTER)[None, None, :], other=0.0)
    pdl.enter(PDL)
    a = tl.load(a_rows, mask=mine[:, None] & (rk < INTER)[None, :], other=0.0).to(tl.float32)
    acc = w_tile.to(tl.float32) * a[:, None, :]
    for k0 in range(BLOCK_K, INTER, BLOCK_K):
        k_ok = k0 + rk < INTER
        a = tl.load(a_rows + k0, mask=mine[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        w_tile = tl.load(rows + k0, mask=row_ok & k_ok[None, None, :], other=0.0)
        acc += w_tile.to(tl.float32) * a[:, None, :]
    y = tl.sum(acc, axis=2).to(out.dtype.element_ty).to(tl.float32)  # [K_P2, BLOCK_N]
    total = tl.sum(tl.where(mine[:, None], scale[:, None] * y, 0.0), axis=0)
    tl.store(out + token * HIDDEN + rn, total.to(out.dtype.element_ty), mask=rn < HIDDEN)


def _precision(dtype: torch.dtype) -> str:
    """fp32 models multiply in full fp32, as torch does by default; TF32 would miss the reference."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _launch_args(tile: dict) -> dict:
    return {"BLOCK_N": tile["BLOCK_N"], "BLOCK_K": tile["BLOCK_K"], "num_warps": tile["num_warps"],
            "num_stages": tile["num_stages"]}


def grouped_gate_up(hidden: torch.Tensor, w_gate_up: torch.Tensor, aligned: Alignment, top_k: int,
                    tile: dict) -> torch.Tensor:
    """[max rows, I] activations, one row per aligned slot (padding slots left unwritten)."""
    inter, hidden_size = w_gate_up.shape[1] // 2, w_gate_up.shape[2]
    rows = aligned.sorted_ids.numel()
    act = hidden.new_empty(rows, inter)
    blocks = rows // aligned.block_m
    _grouped_gate_up_kernel[(blocks * triton.cdiv(inter, tile["BLOCK_N"]),)](
        hidden, w_gate_up, act, aligned.sorted_ids, aligned.block_expert, aligned.rows_used, hidden.shape[0] * top_k,
        hidden_size, inter, top_k, blocks, BLOCK_M=aligned.block_m, GROUP=GROUP_M,
        PRECISION=_precision(hidden.dtype), **_launch_args(tile))
    return act


def grouped_down(act: torch.Tensor, w_down: torch.Tensor, aligned: Alignment, num_pairs: int,
                 tile: dict) -> torch.Tensor:
    """[num_pairs, H] expert outputs, unweighted; rows of pairs this rank does not hold left unwritten."""
    hidden_size, inter = w_down.shape[1], w_down.shape[2]
    expert_out = act.new_empty(num_pairs, hidden_size)
    blocks = aligned.sorted_ids.numel() // aligned.block_m
    _grouped_down_kernel[(blocks * triton.cdiv(hidden_size, tile["BLOCK_N"]),)](
        act, w_down, expert_out, aligned.sorted_ids, aligned.block_expert, aligned.rows_used, num_pairs,
        hidden_size, inter, blocks, BLOCK_M=aligned.block_m, GROUP=GROUP_M, PRECISION=_precision(act.dtype),
        **_launch_args(tile))
    return expert_out


def combine(expert_out: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, first_expert: int,
            num_local: int) -> torch.Tensor:
    tokens, top_k = topk_ids.shape
    hidden_size = expert_out.shape[1]
    out = expert_out.new_empty(tokens, hidden_size)
    block = min(1024, triton.next_power_of_2(hidden_size))
    _combine_kernel[(tokens, triton.cdiv(hidden_size, block))](
        expert_out, topk_ids, topk_weights, out, first_expert, num_local, hidden_size, top_k, BLOCK=block,
        num_warps=4)
    return out


def gemv_gate_up(hidden: torch.Tensor, w_gate_up: torch.Tensor, topk_ids: torch.Tensor, first_expert: int,
                 tile: dict) -> torch.Tensor:
    """[tokens * k, I] activations, one row per pair (rows of other ranks' experts left unwritten)."""
    num_local, two_inter, hidden_size = w_gate_up.shape
    inter = two_inter // 2
    top_k = topk_ids.shape[1]
    act = hidden.new_empty(topk_ids.numel(), inter)
    use_pdl = pdl.enabled(hidden.device, hidden.shape[0])
    _gemv_gate_up_kernel[(topk_ids.numel(), triton.cdiv(inter, tile["BLOCK_N"]))](
        hidden, w_gate_up, topk_ids, act, first_expert, num_local, hidden_size, inter, top_k, PDL=use_pdl,
        launch_pdl=use_pdl, **_launch_args(tile))
    return act


def gemv_down(act: torch.Tensor, w_down: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
              first_expert: int, tile: dict) -> torch.Tensor:
    num_local, hidden_size, inter = w_down.shape
    tokens, top_k = topk_ids.shape
    out = act.new_empty(tokens, hidden_size)
    use_pdl = pdl.enabled(act.device, tokens)
    _gemv_down_kernel[(tokens, triton.cdiv(hidden_size, tile["BLOCK_N"]))](
        act, w_down, topk_ids, topk_weights, out, first_expert, num_local, hidden_size, inter, TOP_K=top_k,
        K_P2=triton.next_power_of_2(top_k), PDL=use_pdl, launch_pdl=use_pdl, **_launch_args(tile))
    return out


def supports(hidden: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> bool:
    """Whether the fused path applies: CUDA tensors, weights stored contiguously (as loaded)."""
    return hidden.is_cuda and hidden.dim() == 2 and w_gate_up.is_contiguous() and w_down.is_contiguous()


def fused_moe(hidden: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, topk_ids: torch.Tensor,
              topk_weights: torch.Tensor, first_expert: int = 0, config: dict | None = None) -> torch.Tensor:
    """`moe_reference` with the same arguments: hidden [T, H], w_gate_up [E_local, 2I, H] (gate rows,
    then up), w_down [E_local, H, I], topk_ids [T, k] global expert ids (those outside [first_expert,
    first_expert + E_local) belong to other ranks and add nothing), topk_weights [T, k]. Returns
    [T, H] in hidden's dtype. `config` overrides the tuning table's choice."""
    tokens, hidden_size = hidden.shape
    num_local, two_inter, _ = w_gate_up.shape
    top_k = topk_ids.shape[1]
    if tokens == 0:
        return hidden.new_zeros(0, hidden_size)
    cfg = config or launch_config(tokens, num_local, hidden_size, two_inter // 2, top_k, hidden.dtype, hidden.device)
    hidden, topk_ids, topk_weights = hidden.contiguous(), topk_ids.contiguous(), topk_weights.contiguous()
    if cfg["path"] == "gemv":
        act = gemv_gate_up(hidden, w_gate_up, topk_ids, first_expert, cfg["gate_up"])
        return gemv_down(act, w_down, topk_ids, topk_weights, first_expert, cfg["down"])
    aligned = align_by_expert(topk_ids, num_local, first_expert, cfg["BLOCK_M"])
    act = grouped_gate_up(hidden, w_gate_up, aligned, top_k, cfg["gate_up"])
    expert_out = grouped_down(act, w_down, aligned, topk_ids.numel(), cfg["down"])
    return combine(expert_out, topk_ids, topk_weights, first_expert, num_local)


def _tile(block_n: int, block_k: int, warps: int, stages: int) -> dict:
    return {"BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": warps, "num_stages": stages}


GEMV_MAX_PAIRS = 16  # default: the gemv path up to 2 tokens at k = 8, where pairs rarely share an expert


def default_config(tokens: int, num_local: int, top_k: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Tiles for a GPU or shape without a tuning table: by the pairs each expert gets on average. The
    tiles are sized for 16-bit operands; 32-bit ones take twice the shared memory per stage (the largest
    gate_up tile, 80 KB a stage in fp32, would need 320 KB at four), so they get two stages."""
    config = _default_tiles(tokens * top_k, num_local)
    if dtype.itemsize == 4:
        for part in ("gate_up", "down"):
            config[part] = {**config[part], "num_stages": 2}
    return config


def _default_tiles(pairs: int, num_local: int) -> dict:
    if pairs <= GEMV_MAX_PAIRS:
        return {"path": "gemv", "gate_up": _tile(16, 256, 4, 3), "down": _tile(4, 128, 4, 3)}
    per_expert = pairs / num_local
    if per_expert <= 8:
        return {"path": "grouped", "BLOCK_M": 16, "gate_up": _tile(64, 128, 4, 3), "down": _tile(64, 128, 4, 3)}
    if per_expert <= 48:
        return {"path": "grouped", "BLOCK_M": 32, "gate_up": _tile(64, 128, 4, 3), "down": _tile(64, 128, 4, 3)}
    return {"path": "grouped", "BLOCK_M": 64, "gate_up": _tile(128, 64, 8, 4), "down": _tile(128, 64, 4, 4)}


def table_path(gpu_name: str, num_local: int, hidden_size: int, inter: int, top_k: int, dtype: torch.dtype) -> Path:
    key = (f"{gpu_name.replace(' ', '_')}-E{num_local}-H{hidden_size}-I{inter}-k{top_k}-"
           f"{str(dtype).removeprefix('torch.')}")
    return env.cache_root() / "tuning" / f"moe-{key}.json"


@functools.cache
def load_table(path: str) -> dict[int, dict] | None:
    """{token count: config} from a tuning table file, or None without one. Read once per process."""
    t0 = time.perf_counter()
    try:
        body = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    STATS.record("tuning", True, time.perf_counter() - t0)
    return {int(tokens): cfg for tokens, cfg in body["configs"].items()}


def pick(table: dict[int, dict], tokens: int) -> dict:
    """The config measured at the smallest token count at or above `tokens` (the largest beyond it):
    tiles fitted to more tokens are safe at fewer, the reverse can leave the GPU idle."""
    at_or_above = [count for count in table if count >= tokens]
    return table[min(at_or_above) if at_or_above else max(table)]


def launch_config(tokens: int, num_local: int, hidden_size: int, inter: int, top_k: int, dtype: torch.dtype,
                  device: torch.device) -> dict:
    if device.type == "cuda":
        path = table_path(torch.cuda.get_device_name(device), num_local, hidden_size, inter, top_k, dtype)
        table = load_table(str(path))
        if table:
            return pick(table, tokens)
    return default_config(tokens, num_local, top_k, dtype)


GEMV_TILES = [_tile(*t) for t in [(4, 512, 4, 3), (8, 256, 4, 3), (8, 512, 4, 3), (16, 256, 4, 3), (16, 512, 8, 3),
                                  (32, 128, 4, 3), (32, 256, 8, 3), (16, 128, 4, 4)]]
# the down GEMV's tile holds every expert of a token, [next_power_of_2(top_k), BLOCK_N, BLOCK_K]
GEMV_DOWN_TILES = [_tile(*t) for t in [(1, 256, 4, 3), (2, 128, 4, 3), (2, 256, 4, 3), (4, 64, 4, 3), (4, 128, 4, 3),
                                       (4, 128, 8, 3), (8, 64, 4, 3), (8, 128, 8, 2)]]
GROUPED_TILES = [_tile(*t) for t in [(32, 128, 4, 3), (64, 64, 4, 4), (64, 128, 4, 3), (64, 128, 8, 3),
                                     (128, 64, 4, 4), (128, 64, 8, 4), (128, 128, 8, 3), (256, 64, 8, 3)]]
BLOCK_MS = (16, 32, 64, 128)
GEMV_SWEEP_MAX_PAIRS = 64


def _block_ms(pairs: int, num_local: int) -> list[int]:
    """BLOCK_M candidates: up to twice the pairs an expert gets on average (more is mostly padding)."""
    return [bm for bm in BLOCK_MS if bm <= max(16, 2 * pairs / num_local)]


def _fastest(time_us, candidates: list[dict]) -> tuple[float, dict]:
    """The fastest candidate (a tile, or a whole config) by `time_us(candidate)`; those that do not compile
    (too much shared memory) are skipped."""
    timed = []
    for candidate in candidates:
        try:
            timed.append((time_us(candidate), candidate))
        except triton.runtime.errors.OutOfResources:
            continue
    return min(timed, key=lambda entry: entry[0])


def tune_moe(num_local: int, hidden_size: int, inter: int, top_k: int, token_counts: list[int],
             dtype: torch.dtype = torch.bfloat16, device: torch.device | None = None) -> dict[int, dict]:
    """Time the candidate tiles of both paths at each token count on this GPU and cache the fastest
    as the tuning table `launch_config` reads. Returns {token count: config}. Each GEMM's tiles are timed
    on their own, then each path with its best tiles as a whole layer, all inside CUDA graphs, over 8
    routings so the experts' weights come from memory, not L2; uniform random routing, which is what
    a sweep can know of the model's."""
    from tpfleet.bench.gemv import graph_time_us

    device = device or torch.device("cuda")
    gen = torch.Generator(device).manual_seed(0)
    w_gate_up = torch.randn(num_local, 2 * inter, hidden_size, device=device, dtype=dtype, generator=gen) * 0.02
    w_down = torch.randn(num_local, hidden_size, inter, device=device, dtype=dtype, generator=gen) * 0.02
    table: dict[int, dict] = {}
    for tokens in token_counts:
        hidden = torch.randn(tokens, hidden_size, device=device, dtype=dtype, generator=gen)
        routings = [random_routing(tokens, num_local, top_k, gen) for _ in range(8)]
        pairs = tokens * top_k
        options: list[dict] = []
        if pairs <= GEMV_SWEEP_MAX_PAIRS:
            _, up = _fastest(lambda tile: graph_time_us(
                lambda i=0: gemv_gate_up(hidden, w_gate_up, routings[i % 8][1], 0, tile), 16), GEMV_TILES)
            acts = [gemv_gate_up(hidden, w_gate_up, ids, 0, up) for _, ids in routings]
            _, down = _fastest(lambda tile: graph_time_us(
                lambda i=0: gemv_down(acts[i % 8], w_down, routings[i % 8][1], routings[i % 8][0], 0, tile), 16),
                GEMV_DOWN_TILES)
            options.append({"path": "gemv", "gate_up": up, "down": down})
        for bm in _block_ms(pairs, num_local):
            aligned = [align_by_expert(ids, num_local, 0, bm) for _, ids in routings]
            _, up = _fastest(lambda tile: graph_time_us(
                lambda i=0: grouped_gate_up(hidden, w_gate_up, aligned[i % 8], top_k, tile), 16), GROUPED_TILES)
            acts = [grouped_gate_up(hidden, w_gate_up, al, top_k, up) for al in aligned]
            _, down = _fastest(lambda tile: graph_time_us(
                lambda i=0: grouped_down(acts[i % 8], w_down, aligned[i % 8], pairs, tile), 16), GROUPED_TILES)
            options.append({"path": "grouped", "BLOCK_M": bm, "gate_up": up, "down": down})
        # Paths compete on the whole layer: the grouped path also sorts and combines, which the sum of its two
        # GEMMs' times leaves out.
        best_us, table[tokens] = _fastest(lambda cfg: graph_time_us(lambda i=0: fused_moe(
            hidden, w_gate_up, w_down, routings[i % 8][1], routings[i % 8][0], 0, cfg), 16), options)
        log.info("moe tokens=%d: %.1f us with %s", tokens, best_us, table[tokens])
    path = table_path(torch.cuda.get_device_name(device), num_local, hidden_size, inter, top_k, dtype)
    write_atomic(path, json.dumps({"device": torch.cuda.get_device_name(device), "configs": table}, indent=1))
    load_table.cache_clear()
    return table


def random_routing(tokens: int, num_experts: int, top_k: int,
                   gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights float32, ids int64), [tokens, top_k]: k distinct experts per token, uniformly, with
    softmax-normalised weights, as `moe.route` returns them."""
    scores = torch.rand(tokens, num_experts, device=gen.device, generator=gen)
    ids = scores.topk(top_k, dim=-1).indices
    weights = torch.softmax(torch.randn(tokens, top_k, device=gen.device, generator=gen), dim=-1)
    return weights, ids
