"""`tpfleet bench allreduce`: every backend and the dispatcher, side by side, eager and in CUDA graphs.

One process per GPU. Symmetric memory is timed on data already in its buffer (its best case, and
what the engine's zero-copy path gives it); the dispatcher is timed as the engine calls it, with
its input where `Communicator.input_buffer` puts it.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tpfleet.comm.backends import CustomBackend
from tpfleet.comm.communicator import Communicator
from tpfleet.comm.custom_ar import CustomAllReduce
from tpfleet.comm.dispatch import MODES, input_for, time_per_call
from tpfleet.comm.group import create_store

DEFAULT_SIZES = [1 << k for k in range(12, 27)]  # 4 KiB .. 64 MiB
PEERS = ("nccl", "symm_mem_one_shot", "symm_mem_two_shot")


def bench_allreduce(world: int, out_dir: str, dtype: torch.dtype = torch.bfloat16,
                    sizes: list[int] = DEFAULT_SIZES, grids: list[tuple[int, int]] = ()) -> dict:
    """`grids`: other (blocks, threads) launch grids of the custom kernels to time too, in graph mode,
    next to the default one (the choice `custom_ar.default_grid` makes)."""
    if torch.cuda.device_count() < world:
        raise SystemExit(f"bench allreduce needs {world} GPUs; this process sees {torch.cuda.device_count()}")
    os.makedirs(out_dir, exist_ok=True)
    store = create_store(world)
    mp.spawn(_worker, args=(world, store.port, dtype, sizes, out_dir, list(grids)), nprocs=world, join=True)
    path = Path(out_dir) / f"allreduce_w{world}.json"
    result = json.loads(path.read_text())
    print(format_table(result))
    _plot(result, Path(out_dir) / f"allreduce_w{world}.png")
    return result


def _worker(rank: int, world: int, port: int, dtype: torch.dtype, sizes: list[int], out_dir: str,
            grids: list[tuple[int, int]]) -> None:
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=timedelta(seconds=120))
    dist.init_process_group("nccl", store=store, rank=rank, world_size=world, device_id=device)
    pg = dist.group.WORLD
    comm = Communicator(pg, device, dtype)
    variants = {}
    for blocks, threads in grids:
        car = CustomAllReduce(pg, device, grid=(blocks, threads))
        for two_shot in (False, True):
            variants[f"cust{2 if two_shot else 1}@{blocks}x{threads}"] = CustomBackend(car, two_shot)
    rows = []
    for size in sizes:
        numel = size // dtype.itemsize
        for mode in MODES:
            graph = mode == "graph"
            row = {"bytes": size, "mode": mode, "us": {}}
            for name, backend in comm.backends.items():
                x = input_for(backend, numel, dtype, device)
                if backend.supports(x):
                    row["us"][name] = 1e6 * time_per_call(backend.all_reduce, x, pg, graph)
            x = comm.input_buffer((numel,), dtype, mode)  # where the engine's GEMM would write, in this mode
            x = torch.empty(numel, dtype=dtype, device=device) if x is None else x
            row["us"]["dispatcher"] = 1e6 * time_per_call(comm.all_reduce, x, pg, graph)
            row["dispatcher_picks"] = comm.pick(x).name if not graph else comm.table.pick(size, "graph")
            for name, backend in variants.items() if graph else ():
                x = torch.empty(numel, dtype=dtype, device=device)
                if backend.supports(x):
                    row["us"][name] = 1e6 * time_per_call(backend.all_reduce, x, pg, graph)
            rows.append(row)
    if rank == 0:
        result = {"world": world, "dtype": str(dtype).removeprefix("torch."), "gpu": torch.cuda.get_device_name(device),
                  "torch": torch.__version__, "disabled": comm.disabled, "table": comm.table.to_json(), "rows": rows}
        (Path(out_dir) / f"allreduce_w{world}.json").write_text(json.dumps(result, indent=1))
    dist.barrier()
    for car in {b.car for b in variants.values()}:
        car.close()
    comm.close()
    dist.destroy_process_group()


def bus_bandwidth_gbs(size: int, world: int, us: float) -> float:
    """NCCL's convention: bytes each rank moves, 2(n-1)/n of the message, over the time."""
    return size * 2 * (world - 1) / world / (us * 1e-6) / 1e9


def format_table(result: dict) -> str:
    names = ["nccl", "symm_mem_one_shot", "symm_mem_two_shot", "custom_one_shot", "custom_two_shot", "dispatcher"]
    short = ["nccl", "symm1", "symm2", "cust1", "cust2", "disp"]
    variants = sorted({n for r in result["rows"] for n in r["us"] if "@" in n})
    names, short = names + variants, short + variants
    lines = [f"all-reduce, {result['world']} x {result['gpu']}, {result['dtype']}, latency in us "
             f"(disp/symm: dispatcher over the best of symm one/two-shot; busbw of the dispatcher)"]
    widths = [max(8, len(s)) for s in short]
    lines.append(f"{'size':>8} {'mode':>5} " + " ".join(f"{s:>{w}}" for s, w in zip(short, widths))
                 + f" {'disp/symm':>9} {'disp/nccl':>9} {'busbw GB/s':>10}  picks")
    for r in result["rows"]:
        us = r["us"]
        cells = " ".join(f"{us[n]:{w}.1f}" if n in us else f"{'-':>{w}}" for n, w in zip(names, widths))
        symm = min((us[n] for n in ("symm_mem_one_shot", "symm_mem_two_shot") if n in us), default=None)
        d = us["dispatcher"]
        ratio_symm = f"{d / symm:9.2f}" if symm else f"{'-':>9}"
        lines.append(f"{_size(r['bytes']):>8} {r['mode']:>5} {cells} {ratio_symm} {d / us['nccl']:9.2f} "
                     f"{bus_bandwidth_gbs(r['bytes'], result['world'], d):10.1f}  {r['dispatcher_picks']}")
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit, k in (("MB", 20), ("KB", 10)):
        if n >= 1 << k:
            return f"{n >> k}{unit}"
    return f"{n}B"


def _plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(matplotlib not installed: no plot written to {path})")
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, mode in zip(axes, MODES):
        rows = [r for r in result["rows"] if r["mode"] == mode]
        for name in sorted({n for r in rows for n in r["us"]}):
            pts = [(r["bytes"], r["us"][name]) for r in rows if name in r["us"]]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=name,
                    lw=2.5 if name == "dispatcher" else 1)
        ax.set(xscale="log", yscale="log", xlabel="message bytes", title=f"{mode}, {result['world']} GPUs")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("latency (us)")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"all-reduce {result['dtype']} on {result['gpu']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
