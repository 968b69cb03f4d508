"""Every line tpfleet prints for another program to read, declared here and nowhere else.

Start-up phases are printed as one parseable line each, so a launcher can show progress and learn
an engine's URL: `tpfleet phase: NAME {json}`. The other machine-read lines: an engine's ready line
(for people and scripts), the router's ready line of `tpfleet launch`, and a warm-up job's result.
Why a process died is never read from its output: that is what exit records are for (tpfleet.exits).
"""

from __future__ import annotations

import json
import os
import sys
import time

PHASE_PREFIX = "tpfleet phase:"
READY_PREFIX = "tpfleet ready:"  # `tpfleet serve`: `tpfleet ready: URL (details)`
ROUTER_READY_PREFIX = "tpfleet router ready:"  # `tpfleet launch`: `tpfleet router ready: URL`
WARMUP_RESULT_PREFIX = "tpfleet warmup-result:"  # a warm-up job's cache statistics: `... {json}`

PHASES = ("starting", "ranks_started", "weights_loaded", "kv_cache_allocated", "graphs_captured", "jit_caches",
          "ready")


_current = "starting"
_reached: list[tuple[str, float]] = []  # (phase, time.time() it was reported), in order


def current_phase() -> str:
    """The last phase this process reported: what an exit record says it died in."""
    return _current


def report_phase(name: str, **info) -> None:
    global _current
    _current = name
    now = time.time()
    _reached.append((name, now))
    info["t"] = round(now, 3)
    print(f"{PHASE_PREFIX} {name} {json.dumps(info)}", file=sys.stdout, flush=True)


def process_start_time() -> float:
    """When this process was created (time.time() scale): the start of its start-up. Read from /proc, as
    psutil reads it, without psutil's import (a tenth of a second) in the start-up it times."""
    with open("/proc/self/stat") as f:
        after_name = f.read().rpartition(")")[2].split()  # the name may hold spaces and parentheses
    with open("/proc/stat") as f:
        boot = next(float(line.split()[1]) for line in f if line.startswith("btime "))
    return boot + int(after_name[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of proc(5): starttime, in ticks


def phase_seconds(reached: list[tuple[str, float]], since: float) -> list[tuple[str, float]]:
    """Each phase's seconds: from the phase before it (the first: from `since`) until it was reached."""
    seconds, before = [], since
    for name, at in reached:
        seconds.append((name, max(0.0, at - before)))
        before = at
    return seconds


def reached_phases() -> list[tuple[str, float]]:
    """The phases this process reported, with when."""
    return list(_reached)


def parse_phase(line: str) -> tuple[str, dict] | None:
    if not line.startswith(PHASE_PREFIX):
        return None
    name, _, payload = line[len(PHASE_PREFIX):].strip().partition(" ")
    try:
        return name, json.loads(payload) if payload else {}
    except json.JSONDecodeError:
        return name, {}


def after_prefix(prefix: str, line: str) -> str | None:
    """The rest of `line` when it starts with `prefix`, stripped; None otherwise."""
    return line[len(prefix):].strip() if line.startswith(prefix) else None


def parse_warmup_result(line: str) -> dict | None:
    payload = after_prefix(WARMUP_RESULT_PREFIX, line)
    if payload is None:
        return None
    try:
        return json.loads(payload)
    except json.JSONDecodeError:
        return None


def format_warmup_result(stats: dict) -> str:
    return f"{WARMUP_RESULT_PREFIX} {json.dumps(stats)}"
