"""`tpfleet bench gemv`: the batch-1 GEMV kernels against cuBLAS and the bandwidth floor, per projection;
with `--rows`, the same projections at batch sizes above 1 (cuBLAS, which the engine runs there) against
the larger of their bytes over the copy bandwidth and their operations over the matmul rate.

Each op is timed inside a CUDA graph (as the engine runs it), over enough copies of the weight that
no launch finds it in L2. The peer is what the engine would run otherwise: the fused RMSNorm or
SiLU-and-mul kernel, then torch.matmul (cuBLAS). With `--sweep`, every launch config in a grid is
timed too, and the fastest per shape goes to this GPU's table, which `gemv.launch_config` then reads.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import torch

from tpfleet.bench.engine import bound, copy_bandwidth, matmul_rate
from tpfleet.kernels import gemm, gemv, ops, tuning

# each make-model preset's batch-1 projections per TP size: name, output features, input features, fused
# prologue (Qwen3-8B's; Qwen3-30B-A3B's attention and router, its experts being `bench moe`'s)
SHAPES = {"8b-shape": {1: [("qkv", 6144, 4096, "norm"), ("o_proj", 4096, 4096, "plain"),
                           ("gate_up", 24576, 4096, "norm"), ("down", 4096, 12288, "silu")],
                       2: [("qkv", 3072, 4096, "norm"), ("o_proj", 4096, 2048, "plain"),
                           ("gate_up", 12288, 4096, "norm"), ("down", 4096, 6144, "silu")]},
          "30b-a3b-shape": {1: [("qkv", 5120, 2048, "norm"), ("o_proj", 2048, 4096, "plain"),
                                ("router", 128, 2048, "norm")],
                            2: [("qkv", 2560, 2048, "norm"), ("o_proj", 2048, 2048, "plain"),
                                ("router", 128, 2048, "norm")]}}
EPS = 1e-6


def graph_time_us(fn, reps: int) -> float:
    """Per-call time of `fn` run `reps` times back to back in one CUDA graph (median of 5 replays)."""
    fn()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(reps):
            fn(i)
    g.replay()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / reps)
    return sorted(times)[2]


def _ops(kind: str, xs: dict, weights: list[torch.Tensor], config: dict | None):
    """(tpfleet's op, the torch peer), each taking a call index that picks the weight copy."""
    x, res, nw, gate_up = xs["x"], xs["res"], xs["nw"], xs["gate_up"]

    def ours(i=0):
        w = weights[i % len(weights)]
        if kind == "plain":
            return gemv.linear(x, w, config=config)
        if kind == "norm":
            return gemv.norm_linear(x, res, nw, EPS, w, config=config)
        return gemv.silu_mul_linear(gate_up, w, config=config)

    def peer(i=0):
        w = weights[i % len(weights)]
        if kind == "plain":
            return torch.matmul(x, w.t())
        if kind == "norm":
            return torch.matmul(ops.rms_norm(x, nw, EPS, res)[0], w.t())
        return torch.matmul(ops.silu_and_mul(gate_up), w.t())

    return ours, peer


def weight_copies(n: int, k: int, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """Enough copies of an [n, k] weight (256 MiB in all) that calls cycling through them miss L2."""
    copies = -(-(256 << 20) // (n * k * dtype.itemsize))
    return [torch.randn(n, k, device=device, dtype=dtype) * 0.02 for _ in range(copies)]


def sweep_configs() -> list[dict]:
    return [{"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps, "num_stages": stages}
            for bn, bk, warps, stages in itertools.product((2, 4, 8, 16, 32), (256, 512, 1024), (4, 8), (2, 3))
            if bn * bk <= 16384]


def bench_gemv(out_dir: str, tp_sizes: list[int], sweep: bool, preset: str = "8b-shape",
               dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    device = torch.device("cuda")
    gpu = gemv.gpu_name(device)
    bw = copy_bandwidth(device)
    results = []
    print(f"GEMV, {preset}, {gpu}, {dtype}; copy bandwidth {bw / 1e12:.2f} TB/s; "
          "us per call")
    print(f"{'tp':>3} {'proj':>8} {'floor':>7} {'cuBLAS':>7} {'tpfleet':>7} {'TB/s':>5} {'x floor':>7}"
          + ("   best swept config" if sweep else ""))
    for tp in tp_sizes:
        for name, n, k, kind in SHAPES[preset][tp]:
            nbytes = n * k * dtype.itemsize
            weights = weight_copies(n, k, dtype, device)
            xs = {"x": torch.randn(1, k, device=device, dtype=dtype),
                  "res": torch.randn(1, k, device=device, dtype=dtype),
                  "nw": torch.ones(k, device=device, dtype=dtype),
                  "gate_up": torch.randn(1, 2 * k, device=device, dtype=dtype)}
            ours, peer = _ops(kind, xs, weights, None)
            reps = 4 * len(weights)
            row = {"tp": tp, "proj": name, "n": n, "k": k, "prologue": kind, "floor_us": nbytes / bw * 1e6,
                   "cublas_us": graph_time_us(peer, reps), "tpfleet_us": graph_time_us(ours, reps),
                   "config": gemv.launch_config(n, k, gpu)}
            if sweep:
                timed = [(graph_time_us(_ops(kind, xs, weights, c)[0], reps), c) for c in sweep_configs()]
                row["best_us"], row["best_config"] = min(timed, key=lambda t: t[0])
                row["sweep"] = [{"us": us, **c} for us, c in timed]
                tuning.add(gemv.TABLE, gpu, {(n, k): row["best_config"]})
            results.append(row)
            best = (f"   {row['best_us']:.1f} {row['best_config']}" if sweep else "")
            print(f"{tp:>3} {name:>8} {row['floor_us']:>7.1f} {row['cublas_us']:>7.1f} {row['tpfleet_us']:>7.1f} "
                  f"{nbytes / row['tpfleet_us'] / 1e6:>5.2f} {row['tpfleet_us'] / row['floor_us']:>7.2f}{best}",
                  flush=True)
            del weights
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"device": gpu, "preset": preset, "copy_bandwidth": bw, "rows": results}
    (out / f"gemv-{preset}.json").write_text(json.dumps(summary, indent=1))
    return results


def bench_rows(out_dir: str, tp_sizes: list[int], rows: list[int], preset: str = "8b-shape", sweep: bool = False,
               dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """Each projection at `rows` tokens, the norm before it apart (gate_up with its activation after it):
    where a decode step at batch 2-512 loses time in its GEMMs. With `sweep`, tpfleet's skinny GEMM
    (tpfleet.kernels.gemm, up to 64 rows) in every config of its grid too, and this GPU's table records per
    shape and row count the fastest config where it beats cuBLAS, or cuBLAS, which is what the engine then
    runs."""
    device = torch.device("cuda")
    gpu = gemv.gpu_name(device)
    bw, rate = copy_bandwidth(device), matmul_rate(device, dtype)
    print(f"projections at M rows, {preset}, {gpu}, {dtype}; copy bandwidth {bw / 1e12:.2f} TB/s, matmul "
          f"{rate / 1e12:.0f} TFLOP/s; us per call")
    print(f"{'tp':>3} {'proj':>12} {'rows':>5} {'floor':>8} {'bound':>7} {'cuBLAS':>8} {'x floor':>7}"
          + (f" {'tpfleet':>8} {'x floor':>7}  config" if sweep else ""))
    results, tables = [], {False: {}, True: {}}
    for tp in tp_sizes:
        for name, n, k, _ in SHAPES[preset][tp]:
            # gate_up runs with its activation at these rows: the skinny GEMM's epilogue against cuBLAS
            # then ops.silu_and_mul
            silu_mul = name == "gate_up"
            weights = weight_copies(n, k, dtype, device)
            reps = 4 * len(weights)
            for m in rows:
                x = torch.randn(m, k, device=device, dtype=dtype)
                floor = bound((n * k + m * k + m * n) * dtype.itemsize, 2 * m * n * k, bw, rate)

                def peer(i=0):
                    y = torch.matmul(x, weights[i % len(weights)].t())
                    return ops.silu_and_mul(y) if silu_mul else y

                row = {"tp": tp, "proj": name, "n": n, "k": k, "rows": m, "silu_mul": silu_mul,
                       "memory_us": 1e3 * floor["memory_ms"], "compute_us": 1e3 * floor["compute_ms"],
                       "floor_us": 1e3 * floor["floor_ms"], "cublas_us": graph_time_us(peer, reps)}
                line = (f"{tp:>3} {name + ('+act' if silu_mul else ''):>12} {m:>5} {row['floor_us']:>8.1f} "
                        f"{floor['bound']:>7} {row['cublas_us']:>8.1f} {row['cublas_us'] / row['floor_us']:>7.2f}")
                if sweep and m <= gemm.MAX_ROWS:
                    timed = [(graph_time_us(lambda i=0, c=c: gemm.linear(x, weights[i % len(weights)], c,
                                                                          silu_mul=silu_mul), reps), c)
                             for c in gemm.sweep_configs(n, k, m, silu_mul)]
                    row["best_us"], row["best_config"] = min(timed, key=lambda t: t[0])
                    row["sweep"] = [{"us": us, **c} for us, c in timed]
                    tables[silu_mul][(n, k, m)] = row["best_config"] if row["best_us"] < row["cublas_us"] else None
                    line += f" {row['best_us']:>8.1f} {row['best_us'] / row['floor_us']:>7.2f}  {row['best_config']}"
                results.append(row)
                print(line, flush=True)
    for silu_mul, table in tables.items():
        if table:
            gemm.save_table(gpu, table, silu_mul)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"device": gpu, "preset": preset, "copy_bandwidth": bw, "matmul_rate": rate, "rows": results}
    (out / f"gemm-rows-{preset}.json").write_text(json.dumps(summary, indent=1))
    return results
