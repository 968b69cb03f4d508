"""`tpfleet warmup`: build every JIT artifact several engine configs need, once."""

from __future__ import annotations

import itertools
import json
import os
import sys
from pathlib import Path

from tpfleet.jit import cache_root
from tpfleet.warmup.markers import environment_versions, marker_key, sources_hash
from tpfleet.warmup.runner import Job, format_table, run_warmup


def cache_dirs() -> list[Path]:
    return [cache_root() / "jit", Path(os.environ["TRITON_CACHE_DIR"]), cache_root() / "tuning"]


def warmup_command(model: str, tps: list[int], graph_modes: list[str], device: str, extra: dict,
                   timeout_s: float) -> int:
    versions = environment_versions()
    sources = sources_hash()
    jobs = []
    for tp, mode in itertools.product(tps, graph_modes):
        config = {"model": str(Path(model).resolve()), "tp_size": tp, "device": device, "graph_mode": mode, **extra}
        name = f"tp{tp}-{mode}-{device}"
        jobs.append(Job(name, [sys.executable, "-m", "tpfleet.warmup.child", json.dumps(config)],
                        marker_key(config, versions, sources), config, versions, timeout_s))
    results = run_warmup(jobs, cache_dirs())
    print("\n" + format_table(results))
    return 0 if all(r.status in ("built", "cached") for r in results) else 1
