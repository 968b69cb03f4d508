"""Run warm-up jobs: one child process group each, streamed, bounded, and killed on a crash marker.

A job is any command; `tpfleet warmup` makes one per engine config (warmup/child.py), tests use
small fake ones. A job reports its cache statistics on a line `tpfleet warmup-result: {json}`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from tpfleet.fleet.diagnostics import is_crash_line
from tpfleet.warmup.markers import MarkerStore, snapshot

RESULT_PREFIX = "tpfleet warmup-result:"


@dataclass
class Job:
    name: str
    cmd: list[str]
    key: str  # done-marker key
    config: dict
    versions: dict
    timeout_s: float = 900.0
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class JobResult:
    name: str
    status: str  # built, cached, failed, timeout, crashed
    seconds: float
    hits: int = 0
    misses: int = 0
    detail: str = ""
    tail: list[str] = field(default_factory=list)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_job(job: Job, tail_lines: int = 20, crash_grace_s: float = 1.0, out=sys.stdout) -> tuple[JobResult, dict]:
    """Run one job to completion, timeout or crash. Returns its result and its reported stats."""
    t0 = time.monotonic()
    proc = subprocess.Popen(job.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env={**os.environ, **job.env}, start_new_session=True, text=True, bufsize=1)
    tail: deque[str] = deque(maxlen=tail_lines)
    stats: dict = {}
    crash = threading.Event()

    def pump():
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            print(f"[{job.name}] {line}", file=out, flush=True)
            if line.startswith(RESULT_PREFIX):
                stats.update(json.loads(line[len(RESULT_PREFIX):]))
            elif is_crash_line(line):
                crash.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    status, detail = "built", ""
    while proc.poll() is None:
        if crash.wait(0.05):
            time.sleep(crash_grace_s)  # let the traceback finish printing
            _kill_group(proc)
            status, detail = "crashed", "crash marker in its output; process group killed"
            break
        if time.monotonic() - t0 > job.timeout_s:
            _kill_group(proc)
            status, detail = "timeout", f"no result within {job.timeout_s:.0f}s; process group killed"
            break
    code = proc.wait()
    _kill_group(proc)  # anything the job left behind in its group
    reader.join(timeout=5)
    if status == "built" and (code != 0 or crash.is_set()):
        status, detail = "failed", f"exit code {code}"
    result = JobResult(job.name, status, time.monotonic() - t0, stats.get("hits", 0), stats.get("misses", 0), detail,
                       list(tail))
    print(f"[{job.name}] {status} in {result.seconds:.1f}s{': ' + detail if detail else ''}; last lines:", file=out)
    for line in tail:
        print(f"[{job.name}]   | {line}", file=out)
    out.flush()
    return result, stats


def run_warmup(jobs: list[Job], cache_dirs: list[Path], store: MarkerStore | None = None,
               out=sys.stdout) -> list[JobResult]:
    """Skip jobs whose done-marker is still valid; run the rest; mark the ones that succeeded."""
    store = store or MarkerStore()
    results = []
    for job in jobs:
        t0 = time.monotonic()
        valid, why = store.check(job.key)
        if valid:
            results.append(JobResult(job.name, "cached", time.monotonic() - t0, detail="done-marker valid"))
            continue
        print(f"[{job.name}] warming up ({why})", file=out, flush=True)
        before = snapshot(cache_dirs)
        result, stats = run_job(job, out=out)
        if result.status == "built":
            after = snapshot(cache_dirs)
            touched = {Path(p) for p, m in after.items() if before.get(p) != m}
            touched |= {Path(p) for p in stats.get("entries", [])}
            # A config that compiled nothing still gets its marker: its key alone says it is done.
            store.write(job.key, job.config, job.versions, sorted(touched))
        results.append(result)
    return results


def format_table(results: list[JobResult]) -> str:
    lines = [f"{'config':<40} {'status':<8} {'seconds':>8} {'hits':>5} {'misses':>6}"]
    for r in results:
        lines.append(f"{r.name:<40} {r.status:<8} {r.seconds:8.1f} {r.hits:>5} {r.misses:>6}")
    return "\n".join(lines)
