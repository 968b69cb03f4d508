"""Decode projections at a few to a few dozen rows, y = x @ W.T, where cuBLAS may leave bandwidth unused.

At 2-64 rows a projection still reads its whole weight once for very few operations: like the batch-1
GEMV it is a stream over W, and as fast as the stream keeps every SM busy. Here each program takes
`BLOCK_N` output features and one of `SPLIT_K` slices of the input features, and multiplies its rows of
W by all the (zero-padded) rows of x at once on the tensor cores. With SPLIT_K > 1 each program stores
its fp32 partial sums and the last of an output block's programs to arrive adds the slices in a fixed
order (tpfleet.kernels.arrivals), so the result does not depend on which program finished first.

The engine takes this path only where `tpfleet bench gemv --rows --sweep` measured it faster than
cuBLAS on this GPU, for that weight shape and row count (its table); elsewhere it stays on cuBLAS.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from tpfleet.kernels import ops, tuning
from tpfleet.kernels.arrivals import counters, last_to_arrive
from tpfleet.kernels.gemv import gpu_name

MAX_ROWS = 64
# in tpfleet.kernels.tuning: {(N, K, rows): the fastest config, or None: cuBLAS was faster}, of the plain
# product and of gate_up with its activation (against cuBLAS then `ops.silu_and_mul`)
TABLES = {False: "gemm-rows", True: "gemm-rows-silu-mul"}


@triton.jit
def _skinny_kernel(x, w, out, partial, arrivals, M, N, K, stride_x, stride_out,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                   PRECISION: tl.constexpr, SILU_MUL: tl.constexpr):
    """SILU_MUL: W is [gate; up], 2N rows, and each program takes the same BLOCK_N features of both and
    writes silu(gate) * up (an MLP's gate_up with its activation, which then needs no launch)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    span = K // SPLIT_K
    rows = rm[:, None] < M
    x_rows = x + rm[:, None] * stride_x
    w_rows = w + rn[:, None].to(tl.int64) * K
    u_rows = w + (rn[:, None].to(tl.int64) + N) * K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * span, (pid_k + 1) * span, BLOCK_K):
        a = tl.load(x_rows + k0 + rk[None, :], mask=rows, other=0.0)
        acc = tl.dot(a, tl.trans(tl.load(w_rows + k0 + rk[None, :])), acc, input_precision=PRECISION)
        if SILU_MUL:
            acc_up = tl.dot(a, tl.trans(tl.load(u_rows + k0 + rk[None, :])), acc_up, input_precision=PRECISION)
    dest = out + rm[:, None] * stride_out + rn[None, :]
    if SPLIT_K == 1:
        if SILU_MUL:
            tl.store(dest, ops.silu_mul(acc, acc_up, out.dtype.element_ty), mask=rows)
        else:
            tl.store(dest, acc.to(out.dtype.element_ty), mask=rows)
    else:
        tile = rm[:, None] * N + rn[None, :]
        tl.store(partial + pid_k * BLOCK_M * N + tile, acc)
        if SILU_MUL:
            tl.store(partial + (SPLIT_K + pid_k) * BLOCK_M * N + tile, acc_up)
        if last_to_arrive(arrivals + pid_n, SPLIT_K):
            total = _sum_of_slices(partial, tile, BLOCK_M * N, BLOCK_M, BLOCK_N, SPLIT_K)
            if SILU_MUL:
                total_up = _sum_of_slices(partial + SPLIT_K * BLOCK_M * N, tile, BLOCK_M * N, BLOCK_M, BLOCK_N, SPLIT_K)
                tl.store(dest, ops.silu_mul(total, total_up, out.dtype.element_ty), mask=rows)
            else:
                tl.store(dest, total.to(out.dtype.element_ty), mask=rows)


@triton.jit
def _sum_of_slices(partial, tile, slice_size, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr):
    """The SPLIT_K K slices' partial sums of one tile, added in slice order (other SMs wrote them: skip L1)."""
    total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in range(SPLIT_K):
        total += tl.load(partial + s * slice_size + tile, cache_modifier=".cg")
    return total


def block_m(rows: int) -> int:
    """The padded row count of a tile: at least 16, the tensor cores' smallest."""
    return max(16, triton.next_power_of_2(rows))


def supports(x: torch.Tensor, weight: torch.Tensor, config: dict, silu_mul: bool = False) -> bool:
    """Whether `config` tiles this product: 2-64 rows of a contiguous x, K split evenly into BLOCK_K steps
    (with `silu_mul`, W's gate and up halves each into BLOCK_N features)."""
    n, k = weight.shape
    halves = 2 if silu_mul else 1
    return (x.dim() == 2 and 2 <= x.shape[0] <= MAX_ROWS and x.shape[1] == k and x.stride(-1) == 1
            and weight.stride(-1) == 1 and n % (halves * config["BLOCK_N"]) == 0
            and k % (config["SPLIT_K"] * config["BLOCK_K"]) == 0)


def linear(x: torch.Tensor, weight: torch.Tensor, config: dict, out: torch.Tensor | None = None,
           silu_mul: bool = False) -> torch.Tensor:
    """x @ W.T; with `silu_mul` (W = [gate; up]), silu(x @ gate.T) * (x @ up.T), half as wide."""
    m, k = x.shape
    n = weight.shape[0] // 2 if silu_mul else weight.shape[0]
    if not supports(x, weight, config, silu_mul):
        raise ValueError(f"no {config} tiling for {m} rows of a {list(weight.shape)} weight"
                         + (" split into gate and up" if silu_mul else ""))
    if out is None:
        out = x.new_empty(m, n)
    bm, split = block_m(m), config["SPLIT_K"]
    blocks = n // config["BLOCK_N"]
    # fp32 partial sums per K slice (gate's and up's), as decode attention keeps its splits'; with one
    # slice none are needed
    partial = (torch.empty((2 if silu_mul else 1) * split * bm * n, dtype=torch.float32, device=x.device)
               if split > 1 else out)
    arrivals = counters("skinny_gemm", x.device, blocks) if split > 1 else out
    _skinny_kernel[(blocks, split)](
        x, weight, out, partial, arrivals, m, n, k, x.stride(0), out.stride(0), BLOCK_M=bm,
        BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"], SPLIT_K=split,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32", SILU_MUL=silu_mul,
        num_warps=config["num_warps"], num_stages=config["num_stages"])
    return out


def sweep_configs(n: int, k: int, rows: int, silu_mul: bool = False) -> list[dict]:
    """The grid that tiles an [n, k] bf16 weight at `rows` rows and whose stages fit in shared memory."""
    halves = 2 if silu_mul else 1
    return [{"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, "num_warps": 4, "num_stages": stages}
            for bn in (16, 32, 64) for bk in (128, 256) for split in (1, 2, 4) for stages in (3, 4)
            if (n // halves) % bn == 0 and k % (bk * split) == 0
            and stages * (block_m(rows) + halves * bn) * bk * 2 <= 160 << 10]


def save_table(gpu: str, verdicts: dict[tuple[int, int, int], dict | None], silu_mul: bool = False) -> None:
    """Add a sweep's verdicts, {(N, K, rows): config, or None for cuBLAS}, to this GPU's table."""
    tuning.add(TABLES[silu_mul], gpu, verdicts)
    config_for.cache_clear()


@functools.cache
def config_for(gpu: str, n: int, k: int, rows: int, silu_mul: bool = False) -> dict | None:
    """The sweep's verdict at the smallest row count it measured that covers `rows` (a decode graph's
    rows are padded to its bucket anyway); None: cuBLAS, also for shapes or row counts never swept."""
    table = tuning.read(TABLES[silu_mul], gpu)
    covering = sorted(m for (tn, tk, m) in table if (tn, tk) == (n, k) and m >= rows)
    return table[(n, k, covering[0])] if covering else None


def chosen(x: torch.Tensor, weight: torch.Tensor, silu_mul: bool = False) -> dict | None:
    """The config this kernel runs `x @ weight.T` with (and the activation after it), or None where
    cuBLAS runs it."""
    if not x.is_cuda or x.dim() != 2 or not 2 <= x.shape[0] <= MAX_ROWS:
        return None
    n, k = weight.shape
    config = config_for(gpu_name(x.device), n, k, x.shape[0], silu_mul)
    return config if config is not None and supports(x, weight, config, silu_mul) else None
