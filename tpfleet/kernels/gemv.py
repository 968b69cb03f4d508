"""Batch-1 decode projections, y = f(x) @ W.T for one row, with f fused into the kernel.

At batch 1 a projection reads its whole weight matrix to produce one row: the work is a stream
over the weights, and the step is as fast as that stream. Before each projection sits an RMSNorm
or a SiLU-and-mul, each a launch of its own. Here each block of `BLOCK_N` output features is one
program that streams its rows of W once, `BLOCK_K` columns at a time, multiplying into a
[BLOCK_N, BLOCK_K] fp32 accumulator that is summed once at the end; the input's transform runs
on the (tiny, L2-resident) activation row as it is loaded:

- `linear`: y = x @ W.T (o_proj);
- `norm_linear`: y = rmsnorm(x + residual) @ W.T, also returning x + residual (qkv, gate_up, the MoE
  router, which also keeps the normed row for its experts and chooses them);
- `silu_mul_linear`: y = (silu(gate) * up) @ W.T for x = [gate | up] (down_proj).

At TP > 1 the all-reduce after o_proj and down can be fused in too (tpfleet.kernels.fused_ar): the
row-parallel GEMV's blocks exchange their output rows with the same blocks of the other ranks
and write the sum.

Rounding follows the torch reference in `tpfleet.model.layers`: the transformed input is rounded to
the model dtype before the product, which accumulates in fp32. `tpfleet bench gemv` compares each
with cuBLAS (after the separate norm or activation kernel) and with the bandwidth floor.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from tpfleet.kernels import fused_ar, moe_route, ops, pdl, tuning
from tpfleet.kernels.arrivals import counters
from tpfleet.kernels.fused_ar import Exchange

PLAIN, NORM, NORM_RESIDUAL, SILU_MUL = (tl.constexpr(i) for i in range(4))  # the prologue kinds


@triton.jit
def _input_tile(x, res, norm_w, k0, rk, rstd, K, PROLOGUE: tl.constexpr):
    """Columns k0 + rk of the transformed input, rounded to the model dtype as the reference rounds."""
    if PROLOGUE == SILU_MUL:  # x is [gate | up], each K wide
        g = tl.load(x + k0 + rk)
        a = ops.silu_mul(g, tl.load(x + K + k0 + rk), g.dtype)
    else:
        a = tl.load(x + k0 + rk)
        if PROLOGUE == NORM or PROLOGUE == NORM_RESIDUAL:
            if PROLOGUE == NORM_RESIDUAL:
                a = (a.to(tl.float32) + tl.load(res + k0 + rk).to(tl.float32)).to(a.dtype)
            nw = tl.load(norm_w + k0 + rk).to(tl.float32)
            a = ((a.to(tl.float32) * rstd).to(a.dtype).to(tl.float32) * nw).to(a.dtype)
    return a.to(tl.float32)


@triton.jit
def _gemv_kernel(x, res, res_out, norm_w, normed_out, w, out, N, K, eps, xchg, site, rank, timeout_ns,
                 arrivals, route_w, route_ids, replay,
                 PROLOGUE: tl.constexpr, K_POW2: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 PDL: tl.constexpr, WORLD: tl.constexpr, STORE_NORMED: tl.constexpr, TOP_K: tl.constexpr,
                 K_P2: tl.constexpr, N_P2: tl.constexpr, RENORMALIZE: tl.constexpr, REPLAY: tl.constexpr):
    """WORLD > 0: `out` is the sum of WORLD ranks' outputs, each block all-reducing its own rows with the
    same block of the other ranks through `site` (tpfleet.kernels.fused_ar). STORE_NORMED: program 0
    also writes the normed row to `normed_out`. TOP_K > 0 (an MoE router): the last program to store its
    logits routes the row (tpfleet.kernels.moe_route)."""
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    w_rows = w + rn[:, None].to(tl.int64) * K
    # The weights do not depend on the kernel before this one: under PDL the first tile is on its way
    # while that kernel drains.
    b = tl.load(w_rows + rk[None, :])
    pdl.enter(PDL)
    rstd = 1.0
    if PROLOGUE == NORM or PROLOGUE == NORM_RESIDUAL:
        # The norm needs the row's mean square first: one load of the whole row, not a loop of them.
        kk = tl.arange(0, K_POW2)
        row = tl.load(x + kk, mask=kk < K)
        if PROLOGUE == NORM_RESIDUAL:
            row = (row.to(tl.float32) + tl.load(res + kk, mask=kk < K).to(tl.float32)).to(row.dtype)
            if pid == 0:  # one program writes the new residual stream; every program computes it alike
                tl.store(res_out + kk, row, mask=kk < K)
        rf = tl.where(kk < K, row.to(tl.float32), 0.0)
        rstd = tl.rsqrt(tl.sum(rf * rf, axis=0) / K + eps)
        if STORE_NORMED:
            if pid == 0:
                nw = tl.load(norm_w + kk, mask=kk < K).to(tl.float32)
                tl.store(normed_out + kk, ((rf * rstd).to(row.dtype).to(tl.float32) * nw).to(row.dtype), mask=kk < K)
    acc = b.to(tl.float32) * _input_tile(x, res, norm_w, 0, rk, rstd, K, PROLOGUE)[None, :]
    for k0 in range(BLOCK_K, K, BLOCK_K):
        b = tl.load(w_rows + k0 + rk[None, :])
        acc += b.to(tl.float32) * _input_tile(x, res, norm_w, k0, rk, rstd, K, PROLOGUE)[None, :]
    y = tl.sum(acc, axis=1).to(out.dtype.element_ty)
    if WORLD > 0:
        fused_ar.all_reduce_block(xchg, site, rank, rn, y, out, N, timeout_ns, WORLD)
    else:
        tl.store(out + rn, y)
        if TOP_K > 0:
            moe_route.route_when_last(out, N, arrivals, route_w, route_ids, replay, TOP_K, K_P2, N_P2, RENORMALIZE,
                                      REPLAY)


def supports_shape(weight: torch.Tensor) -> bool:
    """Whether the tiles divide an [N, K] weight."""
    return weight.shape[0] % 8 == 0 and weight.shape[1] % 32 == 0 and weight.stride(-1) == 1


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the fused path applies: one row on a CUDA device, and shapes the tiles divide."""
    return x.is_cuda and x.dim() == 2 and x.shape[0] == 1 and supports_shape(weight)


TABLE = "gemv"  # in tpfleet.kernels.tuning: {(N, K): the config `tpfleet bench gemv --sweep` found fastest}

# (N, K) of Qwen3-8B's projections at TP=1 and 2 -> (BLOCK_N, BLOCK_K, warps, stages): the fastest of
# `tpfleet bench gemv --sweep` on H200, launched with PDL, except qkv at TP=1, which a sweep inside the
# engine's batch-1 step moved (docs/benchmarks.md); other shapes take the rule below. A GPU's own sweep
# table, where it has the shape, comes first (a sweep of 8b-shape would put back qkv's op-alone choice).
TUNED = {(6144, 4096): (16, 512, 8, 3), (4096, 4096): (16, 1024, 8, 2), (24576, 4096): (32, 256, 4, 3),
         (4096, 12288): (8, 1024, 4, 2), (3072, 4096): (8, 1024, 8, 2), (4096, 2048): (16, 1024, 8, 2),
         (12288, 4096): (32, 256, 4, 3), (4096, 6144): (8, 1024, 4, 2)}


@functools.cache
def gpu_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


MIN_PROGRAMS = 256  # the rule's grid: about two programs per SM, so every SM keeps its weight stream going


def launch_config(n: int, k: int, gpu: str | None = None) -> dict:
    """Tile sizes and warps for an [n, k] weight: this GPU's swept config where its table has the shape,
    else TUNED, else a rule: tiles of about 8K weights, taller (up to 32 rows) for more output features,
    shorter where fewer would leave SMs idle (a 2048-row o_proj, a 128-row router)."""
    swept = tuning.read(TABLE, gpu) if gpu is not None else {}
    if (n, k) in swept:
        return dict(swept[(n, k)])
    if (n, k) in TUNED:
        bn, bk, warps, stages = TUNED[(n, k)]
    else:
        bn = 32
        while bn > 2 and (n % bn or n // bn < MIN_PROGRAMS):
            bn //= 2
        bk, warps, stages = min(1024, 8192 // bn), 8, 3
    while n % bn:
        bn //= 2
    return {"BLOCK_N": bn, "BLOCK_K": min(bk, k & -k),  # k & -k: the largest power of two dividing K
            "num_warps": warps, "num_stages": stages}


def _launch(x: torch.Tensor, weight: torch.Tensor, prologue: int, out: torch.Tensor | None,
            res: torch.Tensor | None = None, res_out: torch.Tensor | None = None,
            norm_w: torch.Tensor | None = None, eps: float = 0.0, config: dict | None = None,
            all_reduce: tuple[Exchange, int] | None = None, normed_out: torch.Tensor | None = None,
            routing: moe_route.Routing | None = None) -> torch.Tensor:
    """One launch. With `all_reduce` = (exchange, site) the output is summed over the ranks in the kernel;
    with `routing`, the row is routed over its N logits into it."""
    n, k = weight.shape
    cfg = config or launch_config(n, k, gpu_name(x.device) if x.is_cuda else None)
    x = x.contiguous()
    exchange, site = all_reduce if all_reduce is not None else (None, 0)
    if routing is not None and exchange is not None:
        raise ValueError("a router's GEMV is not all-reduced: every rank holds the whole router")
    if exchange is not None and exchange.width != n:
        raise ValueError(f"a fused all-reduce needs {exchange.width} output features, not {n}")
    if out is None:
        out = x.new_empty(1, n)
    use_pdl = pdl.enabled(x.device, x.shape[0])
    r = routing
    _gemv_kernel[(n // cfg["BLOCK_N"],)](
        x, res if res is not None else x, res_out if res_out is not None else x,
        norm_w if norm_w is not None else x, normed_out if normed_out is not None else x, weight, out, n, k, eps,
        exchange.table if exchange is not None else x, site, exchange.rank if exchange else 0,
        exchange.timeout_ns if exchange else 0, counters("moe_router", x.device, 1) if r else x,
        r.weights if r else x, r.ids if r else x, r.replay if r and r.replay is not None else x,
        PROLOGUE=prologue, K_POW2=triton.next_power_of_2(k), PDL=use_pdl, WORLD=exchange.world if exchange else 0,
        STORE_NORMED=normed_out is not None, TOP_K=r.top_k if r else 0,
        K_P2=triton.next_power_of_2(r.top_k) if r else 1, N_P2=triton.next_power_of_2(n) if r else 1,
        RENORMALIZE=bool(r and r.renormalize), REPLAY=bool(r and r.replay is not None), launch_pdl=use_pdl, **cfg)
    return out


def linear(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None, config: dict | None = None,
           all_reduce: tuple[Exchange, int] | None = None) -> torch.Tensor:
    return _launch(x, weight, PLAIN, out, config=config, all_reduce=all_reduce)


def norm_linear(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                weight: torch.Tensor, config: dict | None = None, normed_out: torch.Tensor | None = None,
                routing: moe_route.Routing | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """rmsnorm(x + residual) @ W.T and the new residual x + residual (x itself without one). With
    `normed_out`, rmsnorm(x + residual) itself is written there too, for a block that reads the normed
    row beside this projection (the MoE experts beside their router); with `routing` (W an MoE router),
    the row's experts are chosen from these logits in the same launch."""
    if residual is None:
        return _launch(x, weight, NORM, None, norm_w=norm_weight, eps=eps, config=config, normed_out=normed_out,
                       routing=routing), x
    residual = residual.contiguous()
    res_out = torch.empty_like(residual)
    y = _launch(x, weight, NORM_RESIDUAL, None, res=residual, res_out=res_out, norm_w=norm_weight, eps=eps,
                config=config, normed_out=normed_out, routing=routing)
    return y, res_out


def silu_mul_linear(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None,
                    config: dict | None = None, all_reduce: tuple[Exchange, int] | None = None
                    ) -> torch.Tensor:
    """(silu(gate) * up) @ W.T where x = [gate | up] along its last dim."""
    return _launch(x, weight, SILU_MUL, out, config=config, all_reduce=all_reduce)
