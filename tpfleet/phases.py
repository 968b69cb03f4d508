"""Start-up phases, printed as one parseable line each, so a launcher can show progress and say
which phase an engine died in. Format: `tpfleet phase: NAME {json}`."""

from __future__ import annotations

import json
import sys
import time

PHASE_PREFIX = "tpfleet phase:"
PHASES = ("starting", "ranks_started", "weights_loaded", "kv_cache_allocated", "graphs_captured", "jit_caches",
          "ready")


_current = "starting"


def current_phase() -> str:
    """The last phase this process reported: what an exit record says it died in."""
    return _current


def report_phase(name: str, **info) -> None:
    global _current
    _current = name
    info["t"] = round(time.time(), 3)
    print(f"{PHASE_PREFIX} {name} {json.dumps(info)}", file=sys.stdout, flush=True)


def parse_phase(line: str) -> tuple[str, dict] | None:
    if not line.startswith(PHASE_PREFIX):
        return None
    name, _, payload = line[len(PHASE_PREFIX):].strip().partition(" ")
    try:
        return name, json.loads(payload) if payload else {}
    except json.JSONDecodeError:
        return name, {}
