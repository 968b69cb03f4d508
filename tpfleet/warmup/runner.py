"""Run warm-up jobs: one child process group each, streamed, bounded, and killed once it has failed.

A job is any command; `tpfleet warmup` makes one per engine config (warmup/child.py), tests use
small fake ones. A job reports its cache statistics on a `tpfleet warmup-result: {json}` line
(tpfleet.phases). It has failed when it exits non-zero or writes an exit record (tpfleet.exits) to
the path the runner gives it in TPFLEET_EXIT_RECORD: a rank that dies can leave the others blocked in
a collective, so a recorded failure ends the job's whole process group without waiting for the
deadline. Its output is shown to people, never read to learn why it failed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from tpfleet import env, exits
from tpfleet.exits import ExitRecord
from tpfleet.phases import parse_warmup_result
from tpfleet.warmup.markers import MarkerStore, snapshot


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
    """Run one job to completion, timeout or recorded failure. Returns its result and its reported stats."""
    with tempfile.TemporaryDirectory(prefix="tpfleet-warmup-") as records:
        return _run_job(job, Path(records) / "exit.json", tail_lines, crash_grace_s, out)


def _run_job(job: Job, record_path: Path, tail_lines: int, crash_grace_s: float, out) -> tuple[JobResult, dict]:
    started = time.monotonic()
    job_env = env.child_env(**{env.EXIT_RECORD: str(record_path), **job.env})
    proc = subprocess.Popen(job.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=job_env, start_new_session=True, text=True, bufsize=1)
    tail: deque[str] = deque(maxlen=tail_lines)
    stats: dict = {}

    def pump():
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            print(f"[{job.name}] {line}", file=out, flush=True)
            result = parse_warmup_result(line)
            if result is not None:
                stats.update(result)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    status, detail = "built", ""
    try:
        while proc.poll() is None:
            if exits.present(record_path):
                try:
                    proc.wait(timeout=crash_grace_s)  # a failing job that exits by itself says more
                except subprocess.TimeoutExpired:
                    _kill_group(proc)
                    status, detail = "crashed", "it recorded a failure and did not exit; process group killed"
                break
            if time.monotonic() - started > job.timeout_s:
                _kill_group(proc)
                status, detail = "timeout", f"no result within {job.timeout_s:.0f}s; process group killed"
                break
            time.sleep(0.05)
    except BaseException:  # Ctrl-C: the job runs in a session of its own, so nothing else would end it
        _kill_group(proc)
        raise
    code = proc.wait()
    _kill_group(proc)  # anything the job left behind in its group
    reader.join(timeout=5)
    record = exits.read(record_path)
    if record is None and exits.present(record_path):
        record = ExitRecord.from_exit("engine", 0, proc.pid, code, "unknown")
        record.causes = exits.rank_records(record_path)
    cause = exits.root_cause([record]) if record is not None else None
    if status == "built" and (code != 0 or cause is not None):
        status, detail = "failed", f"exit code {code}"
    if cause is not None:
        detail = f"{detail}; {cause.describe()}" if detail else cause.describe()
    result = JobResult(job.name, status, time.monotonic() - started, stats.get("hits", 0), stats.get("misses", 0),
                       detail, list(tail))
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
        checked_at = time.monotonic()
        valid, why = store.check(job.key)
        if valid:
            results.append(JobResult(job.name, "cached", time.monotonic() - checked_at, detail="done-marker valid"))
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
