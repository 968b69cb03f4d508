"""The `tpfleet` command."""

from __future__ import annotations

import argparse
import os
import sys

from tpfleet.jit import default_triton_cache

# Multicast (NVLS) must stay off on shared multi-GPU hosts; children inherit these.
for _k, _v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ.setdefault(_k, _v)


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Hugging Face Qwen3 checkpoint directory")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (1, 2, 4 or 8)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--device-ids", default="", help="comma-separated local CUDA indices, one per rank")
    p.add_argument("--gpu-uuids", default="", help="the UUID each rank's device must have (set by the fleet)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--context-length", type=int, default=None)
    p.add_argument("--kv-cache-tokens", type=int, default=None, help="KV pool size in tokens")
    p.add_argument("--mem-fraction-static", type=float, default=0.85)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="per-step budget = prefill chunk")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--disable-prefix-caching", action="store_true")
    p.add_argument("--graph-mode", choices=["auto", "eager", "full", "piecewise"], default="auto",
                   help="CUDA graphs: none, full decode graphs, or full plus piecewise (auto: full on GPU)")
    p.add_argument("--attention-backend", choices=["auto", "torch", "triton"], default="auto")
    p.add_argument("--disable-overlap-schedule", action="store_true",
                   help="read each step's tokens back before launching the next (the GPU idles meanwhile)")
    p.add_argument("--disable-custom-all-reduce", action="store_true", help="use NCCL / symmetric memory only")
    p.add_argument("--disable-symm-mem", action="store_true", help="never use PyTorch symmetric memory")


def _grids(text: str) -> list[tuple[int, int]]:
    """'64x256,128x256' -> [(64, 256), (128, 256)]; the custom kernel checks the ranges itself."""
    try:
        return [(int(b), int(t)) for b, t in (g.split("x") for g in text.split(",") if g)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected BLOCKSxTHREADS,... e.g. 64x256,128x256") from None


def engine_config(a: argparse.Namespace):
    from tpfleet.config import EngineConfig

    return EngineConfig(
        model=a.model, tp_size=a.tp, device=a.device,
        device_ids=[int(x) for x in a.device_ids.split(",") if x.strip()], dtype=a.dtype,
        gpu_uuids=[x.strip() for x in a.gpu_uuids.split(",") if x.strip()],
        context_length=a.context_length, kv_cache_tokens=a.kv_cache_tokens,
        mem_fraction_static=a.mem_fraction_static, max_num_seqs=a.max_num_seqs,
        max_num_batched_tokens=a.max_num_batched_tokens, block_size=a.block_size,
        enable_prefix_caching=not a.disable_prefix_caching,
        enable_custom_all_reduce=not a.disable_custom_all_reduce, enable_symm_mem=not a.disable_symm_mem,
        graph_mode=a.graph_mode, attention_backend=a.attention_backend,
        overlap_schedule=not a.disable_overlap_schedule,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tpfleet", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)

    mm = sub.add_parser("make-model", help="write a random Qwen3 checkpoint (no network)")
    mm.add_argument("--preset", default="tiny", choices=["tiny", "small", "8b-shape"])
    mm.add_argument("--out", required=True)
    mm.add_argument("--seed", type=int, default=0)
    mm.add_argument("--device", default="cpu", help="where to draw the random weights (cuda is faster)")

    sv = sub.add_parser("serve", help="serve one TP engine over HTTP")
    _engine_args(sv)
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=0, help="0: the kernel picks a free port (printed when ready)")
    sv.add_argument("--served-model-name", default=None)

    ln = sub.add_parser("launch", help="start a fleet of engines and serve a router in front of them")
    ln.add_argument("--model", required=True)
    ln.add_argument("--engines", type=int, default=1)
    ln.add_argument("--tp", type=int, default=1)
    ln.add_argument("--gpus", default="", help="indices (of this process's visible GPUs) or UUIDs")
    ln.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ln.add_argument("--backend", choices=["local", "ray"], default="local")
    ln.add_argument("--max-concurrent-starts", type=int, default=1)
    ln.add_argument("--startup-timeout", type=float, default=600.0)
    ln.add_argument("--restart-budget", type=int, default=3)
    ln.add_argument("--reap-stale", action="store_true", help="kill processes already holding the GPUs")
    ln.add_argument("--log-dir", default=None)
    ln.add_argument("--host", default="127.0.0.1", help="router address")
    ln.add_argument("--engine-host", default="127.0.0.1",
                    help="where engines listen; 'node' for each Ray node's IP when engines span machines")
    ln.add_argument("--port", type=int, default=0, help="router port (0: the kernel picks)")
    ln.add_argument("--engine-arg", action="append", default=[], help="extra `tpfleet serve` argument (repeat)")

    dm = sub.add_parser("demo", help="build the tiny model, serve it with TP=2 on CPU, send requests, stop")
    dm.add_argument("--tp", type=int, default=2)
    dm.add_argument("--workdir", default=None, help="where to build the model (default: a fresh temp dir)")

    bench = sub.add_parser("bench", help="benchmarks (GPU)").add_subparsers(dest="what", required=True)
    bd = bench.add_parser("decode", help="smoke benchmark: decode step time and tokens/s at given batch sizes")
    _engine_args(bd)
    bd.add_argument("--batch-sizes", default="1,64")
    bd.add_argument("--input-len", type=int, default=128)
    be = bench.add_parser("engine", help="decode latency, offline throughput, vs transformers and the floor")
    _engine_args(be)
    be.add_argument("--num-seqs", type=int, default=256)
    be.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    be.add_argument("--out", default="bench-out")
    ba = bench.add_parser("allreduce", help="all-reduce latency of every backend and the dispatcher")
    ba.add_argument("--nproc", type=int, default=2, help="GPUs (one process each)")
    ba.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ba.add_argument("--out", default="bench-out", help="directory for the JSON and PNG")
    ba.add_argument("--grids", type=_grids, default=[], help="other custom-kernel launch grids to time in graph "
                                                             "mode, as BLOCKSxTHREADS,... (e.g. 64x256,128x256)")
    bg = bench.add_parser("gemv", help="batch-1 GEMV kernels vs cuBLAS and the bandwidth floor, per projection")
    bg.add_argument("--tp", default="1,2", help="Qwen3-8B's shards at these TP sizes")
    bg.add_argument("--sweep", action="store_true", help="also time a grid of launch configs per projection")
    bg.add_argument("--out", default="bench-out")
    bt = bench.add_parser("attention", help="decode attention per KV-split policy vs the bandwidth floor")
    bt.add_argument("--out", default="bench-out")

    wu = sub.add_parser("warmup", help="build the JIT caches engine configs need; a no-op when still valid")
    wu.add_argument("--model", required=True)
    wu.add_argument("--tp", default="1", help="comma-separated TP sizes: one config each")
    wu.add_argument("--graph-mode", default="auto", help="comma-separated graph modes: one config each")
    wu.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    wu.add_argument("--kv-cache-tokens", type=int, default=None)
    wu.add_argument("--timeout", type=float, default=900.0, help="seconds per config")

    dr = sub.add_parser("doctor", help="check the launch environment; non-zero exit if a launch would break")
    dr.add_argument("--gpus", default="", help="limit to these GPUs (indices or UUID prefixes)")
    dr.add_argument("--compare-ray", action="store_true", help="diff a plain process's environment with a Ray actor's")
    dr.add_argument("--json", action="store_true")

    a = parser.parse_args(argv)
    default_triton_cache()
    if a.cmd == "make-model":
        from tpfleet.model.make_model import make_model

        out = make_model(a.preset, a.out, a.seed, a.device)
        print(f"wrote {a.preset} Qwen3 checkpoint to {out}")
    elif a.cmd == "serve":
        from tpfleet.server.launch import serve

        try:
            serve(engine_config(a), a.host, a.port, a.served_model_name)
        except KeyboardInterrupt:
            pass
    elif a.cmd == "launch":
        from tpfleet.fleet.fleet import FleetConfig
        from tpfleet.fleet.launch import launch

        return launch(FleetConfig(
            model=a.model, engines=a.engines, tp=a.tp, device=a.device, backend=a.backend,
            gpus=[g for g in a.gpus.split(",") if g.strip()] or None, max_concurrent_starts=a.max_concurrent_starts,
            startup_timeout_s=a.startup_timeout, engine_args=a.engine_arg, log_dir=a.log_dir,
            reap_stale=a.reap_stale, restart_budget=a.restart_budget, host=a.engine_host), a.host, a.port)
    elif a.cmd == "warmup":
        from tpfleet.warmup.cli import warmup_command

        extra = {"kv_cache_tokens": a.kv_cache_tokens} if a.kv_cache_tokens else {}
        return warmup_command(a.model, [int(t) for t in a.tp.split(",")], a.graph_mode.split(","), a.device, extra,
                              a.timeout)
    elif a.cmd == "doctor":
        from tpfleet.doctor.cli import doctor_command

        return doctor_command([g for g in a.gpus.split(",") if g] or None, a.compare_ray, a.json)
    elif a.cmd == "demo":
        from tpfleet.demo import run_demo

        return run_demo(a.tp, a.workdir)
    elif a.cmd == "bench" and a.what == "decode":
        from tpfleet.bench.engine import bench_decode

        bench_decode(engine_config(a), [int(b) for b in a.batch_sizes.split(",")], a.input_len)
    elif a.cmd == "bench" and a.what == "engine":
        from tpfleet.bench.engine import bench_engine

        bench_engine(engine_config(a), a.out, a.num_seqs, with_hf=not a.no_hf)
    elif a.cmd == "bench" and a.what == "allreduce":
        import torch

        from tpfleet.bench.allreduce import bench_allreduce

        bench_allreduce(a.nproc, a.out, getattr(torch, a.dtype), grids=a.grids)
    elif a.cmd == "bench" and a.what == "gemv":
        from tpfleet.bench.gemv import bench_gemv

        bench_gemv(a.out, [int(t) for t in a.tp.split(",")], a.sweep)
    elif a.cmd == "bench" and a.what == "attention":
        from tpfleet.bench.attention import bench_attention

        bench_attention(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
