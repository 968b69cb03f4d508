"""`tpfleet warmup`: build every JIT artifact several engine configs need, once."""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

from tpfleet import env
from tpfleet.config import EngineConfig
from tpfleet.warmup.markers import environment_versions, marker_key, sources_hash
from tpfleet.warmup.runner import Job, format_table, run_warmup


def cache_dirs() -> list[Path]:
    return [env.cache_root() / "jit", Path(os.environ[env.TRITON_CACHE_DIR]), env.cache_root() / "tuning"]


def warmup_configs(fields: dict, tp_sizes: list[int], graph_modes: list[str]) -> list[EngineConfig]:
    """One engine config per (tp_size, graph_mode) pair, each made of `fields` and that pair."""
    model = str(Path(fields["model"]).resolve())
    return [EngineConfig.from_dict({**fields, "model": model, "tp_size": tp_size, "graph_mode": mode})
            for tp_size, mode in itertools.product(tp_sizes, graph_modes)]


def warmup_command(configs: list[EngineConfig], timeout_s: float) -> int:
    """One warm-up job per engine config, keyed by its whole document."""
    versions = environment_versions()
    sources = sources_hash()
    jobs = []
    for config in configs:
        document = config.to_dict()
        name = f"tp{config.tp_size}-{config.graph_mode}-{config.device}"
        jobs.append(Job(name, [sys.executable, "-m", "tpfleet.warmup.child", config.to_json()],
                        marker_key(document, versions, sources), document, versions, timeout_s))
    results = run_warmup(jobs, cache_dirs())
    print("\n" + format_table(results))
    return 0 if all(r.status in ("built", "cached") for r in results) else 1
