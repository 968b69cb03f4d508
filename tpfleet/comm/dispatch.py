"""Pick the fastest all-reduce backend per message size, from measurements.

A tuning table maps size ranges to backends, separately for eager calls and for calls captured in
CUDA graphs (launch overhead differs). Rank 0 measures, every rank receives the same table (they
must all call the same backend), and the table is cached on disk keyed by GPU model, world size,
dtype and the set of available backends (with the custom kernels' source hash and launch grid), so
later starts skip the measurement.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from tpfleet import env
from tpfleet.comm.backends import Backend, SymmMemBackend
from tpfleet.jit import STATS, write_atomic

log = logging.getLogger("tpfleet.comm")

MODES = ("eager", "graph")
TUNE_SIZES = [1 << k for k in range(12, 27)]  # 4 KiB .. 64 MiB


@dataclass
class DispatchTable:
    """For each mode, (upper size bound in bytes, backend name) rows in increasing size; beyond the
    last row, `default` (NCCL) takes over."""

    rows: dict[str, list[tuple[int, str]]] = field(default_factory=lambda: {m: [] for m in MODES})
    default: str = "nccl"

    def pick(self, nbytes: int, mode: str) -> str:
        for bound, name in self.rows[mode]:
            if nbytes <= bound:
                return name
        return self.default

    def to_json(self) -> dict:
        return {"rows": {m: [list(r) for r in rows] for m, rows in self.rows.items()}, "default": self.default}

    @classmethod
    def from_json(cls, d: dict) -> DispatchTable:
        return cls({m: [(int(b), n) for b, n in rows] for m, rows in d["rows"].items()}, d["default"])

    @classmethod
    def from_timings(cls, timings: dict[str, dict[str, dict[int, float]]], default: str = "nccl") -> DispatchTable:
        """timings[mode][backend][size] = seconds. Each size goes to its fastest backend; adjacent
        sizes with the same winner merge into one row."""
        table = cls(default=default)
        for mode in MODES:
            per_backend = timings.get(mode, {})
            sizes = sorted({s for t in per_backend.values() for s in t})
            rows: list[tuple[int, str]] = []
            for size in sizes:
                best = min((t[size], name) for name, t in per_backend.items() if size in t)[1]
                if rows and rows[-1][1] == best:
                    rows[-1] = (size, best)
                else:
                    rows.append((size, best))
            table.rows[mode] = rows
        return table


def table_cache_path(gpu_name: str, world: int, dtype: torch.dtype, backends: list[str]) -> str:
    key = f"{gpu_name.replace(' ', '_')}-w{world}-{str(dtype).removeprefix('torch.')}-{'+'.join(sorted(backends))}"
    return str(env.cache_root() / "tuning" / f"allreduce-{key}.json")


def time_per_call(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, pg: dist.ProcessGroup, graph: bool,
                  calls: int = 10, replays: int = 5, rounds: int = 9) -> float:
    """Median seconds per call. Inputs are refreshed between rounds (in place, so captured graphs
    see them) with small random values, so repeated in-place sums stay finite and are never zeros."""
    scale = 2.0 ** -40

    def refresh():
        x.copy_(torch.randn(x.shape, device=x.device, dtype=torch.float32).mul_(scale).to(x.dtype))

    refresh()
    for _ in range(3):
        fn(x)
    torch.cuda.synchronize()
    g = None
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(calls):
                fn(x)
    samples = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(rounds):
        refresh()
        torch.cuda.synchronize()
        dist.barrier(group=pg)
        start.record()
        for _ in range(replays):
            if g is not None:
                g.replay()
            else:
                for _ in range(calls):
                    fn(x)
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / (replays * calls))
    del g
    return statistics.median(samples)


def input_for(backend: Backend, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The input as the engine provides it: inside the symmetric buffer for symmetric memory
    (Communicator.input_buffer), anywhere for the others."""
    if isinstance(backend, SymmMemBackend) and numel * dtype.itemsize <= backend.shared.max_bytes:
        return backend.shared.view((numel,), dtype)
    return torch.empty(numel, dtype=dtype, device=device)


def tune(backends: dict[str, Backend], pg: dist.ProcessGroup, device: torch.device, dtype: torch.dtype,
         sizes: list[int] = TUNE_SIZES) -> DispatchTable:
    timings: dict[str, dict[str, dict[int, float]]] = {m: {} for m in MODES}
    for mode in MODES:
        for name, backend in backends.items():
            for size in sizes:
                x = input_for(backend, size // dtype.itemsize, dtype, device)
                if not backend.supports(x):
                    continue
                t = time_per_call(backend.all_reduce, x, pg, graph=mode == "graph")
                timings[mode].setdefault(name, {})[size] = t
    # Ranks measure slightly different times; rank 0 decides for all.
    table = [DispatchTable.from_timings(timings).to_json()]
    dist.broadcast_object_list(table, src=0, group=pg)
    return DispatchTable.from_json(table[0])


def load_or_tune(backends: dict[str, Backend], pg: dist.ProcessGroup, device: torch.device,
                 dtype: torch.dtype) -> DispatchTable:
    path = table_cache_path(torch.cuda.get_device_name(device), dist.get_world_size(pg), dtype,
                            [b.tuning_key for b in backends.values()])
    # Every rank must use the same table: rank 0 reads or measures, then broadcasts.
    t0 = time.perf_counter()
    cached = [None]
    if dist.get_rank(pg) == 0 and os.path.isfile(path):
        cached = [json.loads(open(path).read())]
    dist.broadcast_object_list(cached, src=0, group=pg)
    if cached[0] is not None:
        log.info("all-reduce dispatch table from %s", path)
        STATS.record("tuning", True, time.perf_counter() - t0)
        return DispatchTable.from_json(cached[0])
    table = tune(backends, pg, device, dtype)
    if dist.get_rank(pg) == 0:
        write_atomic(path, json.dumps(table.to_json(), indent=1))
        log.info("all-reduce dispatch table measured and cached in %s: %s", path, table.to_json()["rows"])
    STATS.record("tuning", False, time.perf_counter() - t0)
    return table
