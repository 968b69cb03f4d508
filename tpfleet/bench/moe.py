"""`tpfleet bench moe`: the fused MoE layer against the torch reference, a dense GEMM and the floor.

Per token count, on an MoE shape (Qwen3-30B-A3B's at TP 1 by default):

- fused: `moe_triton.fused_moe`, inside a CUDA graph as the engine runs it, over 8 routings in turn
  so that the experts' weights come from memory, not L2;
- reference: `moe.moe_reference`, the torch loop over experts (eager: it reads indices back to the
  host, so no graph can hold it);
- dense: one cuBLAS GEMM [T, H] x [H, 3 k I], the FLOPs and active weight bytes of the layer (gate,
  up and down of k experts) without any routing: what the layer would cost were it dense;
- floor: the bytes of the experts the routing touches (each read once), plus the hidden states in and
  out, over the copy bandwidth measured in the same run.

With `sweep`, `tune_moe` first times every candidate tile per token count and caches the table the
fused layer then uses.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from tpfleet.bench.engine import copy_bandwidth
from tpfleet.bench.gemv import graph_time_us
from tpfleet.kernels import moe_triton
from tpfleet.kernels.moe import moe_reference

ROUTINGS = 8


@dataclass(frozen=True)
class MoeShape:
    name: str
    num_experts: int
    hidden: int
    inter: int  # per rank
    top_k: int

    def at_tp(self, tp: int) -> MoeShape:
        """Each expert's intermediate dimension split over `tp` ranks, as tensor-parallel MoE shards it."""
        return replace(self, name=f"{self.name}-tp{tp}", inter=self.inter // tp)


QWEN3_30B_A3B = MoeShape("qwen3-30b-a3b", num_experts=128, hidden=2048, inter=768, top_k=8)
TOKEN_COUNTS = [1 << i for i in range(14)]  # 1 .. 8192


def eager_time_us(fn, calls: int = 5) -> float:
    """Median of `calls` timed calls after one untimed one."""
    fn(0)
    times = []
    for i in range(calls):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(i)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def bench_shape(shape: MoeShape, token_counts: list[int], bandwidth: float, dtype: torch.dtype) -> list[dict]:
    device = torch.device("cuda")
    gen = torch.Generator(device).manual_seed(0)
    experts, hidden_size, inter, top_k = shape.num_experts, shape.hidden, shape.inter, shape.top_k
    w_gate_up = torch.randn(experts, 2 * inter, hidden_size, device=device, dtype=dtype, generator=gen) * 0.02
    w_down = torch.randn(experts, hidden_size, inter, device=device, dtype=dtype, generator=gen) * 0.02
    dense = [torch.randn(3 * top_k * inter, hidden_size, device=device, dtype=dtype, generator=gen) * 0.02
             for _ in range(2)]
    expert_bytes = 3 * inter * hidden_size * dtype.itemsize
    rows = []
    for tokens in token_counts:
        hidden = torch.randn(tokens, hidden_size, device=device, dtype=dtype, generator=gen)
        routings = [moe_triton.random_routing(tokens, experts, top_k, gen) for _ in range(ROUTINGS)]
        touched = statistics.mean(ids.unique().numel() for _, ids in routings)
        floor_bytes = touched * expert_bytes + 2 * hidden.numel() * dtype.itemsize

        def fused(i: int = 0) -> torch.Tensor:
            weights, ids = routings[i % ROUTINGS]
            return moe_triton.fused_moe(hidden, w_gate_up, w_down, ids, weights)

        def reference(i: int = 0) -> torch.Tensor:
            weights, ids = routings[i % ROUTINGS]
            return moe_reference(hidden, w_gate_up, w_down, ids, weights)

        cfg = moe_triton.launch_config(tokens, experts, hidden_size, inter, top_k, dtype, device)
        row = {"shape": shape.name, "tokens": tokens, "experts_touched": touched,
               "floor_us": floor_bytes / bandwidth * 1e6,
               "fused_us": graph_time_us(fused, 2 * ROUTINGS),
               "dense_us": graph_time_us(lambda i=0: hidden @ dense[i % 2].t(), 2 * ROUTINGS),
               "reference_us": eager_time_us(reference), "config": cfg}
        row["fused_tflops"] = 6 * tokens * top_k * inter * hidden_size / row["fused_us"] / 1e6
        rows.append(row)
        print(f"{tokens:>6} {touched:>7.1f} {row['floor_us']:>8.1f} {row['fused_us']:>8.1f} "
              f"{row['fused_us'] / row['floor_us']:>7.2f} {row['dense_us']:>8.1f} {row['reference_us']:>9.1f} "
              f"{row['fused_tflops']:>6.1f}  {cfg['path']}{cfg.get('BLOCK_M', '')}", flush=True)
    return rows


def bench_moe(out_dir: str, shapes: list[MoeShape] | None = None, token_counts: list[int] | None = None,
              sweep: bool = False, dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    shapes = shapes or [QWEN3_30B_A3B]
    token_counts = token_counts or TOKEN_COUNTS
    device = torch.device("cuda")
    bandwidth = copy_bandwidth(device)
    name = torch.cuda.get_device_name(device)
    rows, tables = [], {}
    for shape in shapes:
        if sweep:
            print(f"sweeping tiles for {shape.name} ...", flush=True)
            table = moe_triton.tune_moe(shape.num_experts, shape.hidden, shape.inter, shape.top_k, token_counts,
                                        dtype, device)
            tables[shape.name] = {str(tokens): cfg for tokens, cfg in table.items()}
        print(f"MoE {shape.name} (E={shape.num_experts}, H={shape.hidden}, I={shape.inter}, k={shape.top_k}), {name}, "
              f"{dtype}; copy bandwidth {bandwidth / 1e12:.2f} TB/s; us per layer")
        print(f"{'tokens':>6} {'touched':>7} {'floor':>8} {'fused':>8} {'x floor':>7} {'dense':>8} {'reference':>9} "
              f"{'TFLOPs':>6}  path")
        rows += bench_shape(shape, token_counts, bandwidth, dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "moe.json").write_text(json.dumps({"device": name, "copy_bandwidth": bandwidth, "dtype": str(dtype),
                                              "shapes": [asdict(s) for s in shapes], "rows": rows,
                                              "tuned": tables}, indent=1))
    return rows
