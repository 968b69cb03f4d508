"""Tuning tables keyed by shape: the launch configs a sweep measured fastest on one GPU, one JSON file per
kernel and GPU under the cache root (`tuning/{kind}-{gpu}.json`, {"device", "configs": {"NxK...": config}}),
read once per process and added to by each sweep, so the next start finds them."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from tpfleet import env
from tpfleet.jit import write_atomic


def path(kind: str, gpu_name: str) -> Path:
    return env.cache_root() / "tuning" / f"{kind}-{gpu_name.replace(' ', '_')}.json"


@functools.cache
def read(kind: str, gpu_name: str) -> dict[tuple[int, ...], dict | None]:
    """{shape: config} of `kind` on this GPU, or {} without a table."""
    try:
        body = json.loads(path(kind, gpu_name).read_text())
    except FileNotFoundError:
        return {}
    return {tuple(int(d) for d in shape.split("x")): cfg for shape, cfg in body["configs"].items()}


def add(kind: str, gpu_name: str, entries: dict[tuple[int, ...], dict | None]) -> None:
    """Add a sweep's entries to the table, keeping those of shapes it did not measure."""
    file = path(kind, gpu_name)
    configs = json.loads(file.read_text())["configs"] if file.exists() else {}
    configs.update({"x".join(map(str, shape)): cfg for shape, cfg in entries.items()})
    write_atomic(file, json.dumps({"device": gpu_name, "configs": configs}, indent=1))
    read.cache_clear()
