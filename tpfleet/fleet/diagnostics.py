"""Why an engine failed, on the first screen: which engine, GPUs, phase, how long, its URL, every rank's
exit code or signal (with evidence when the kernel's OOM killer is the likely cause), and its log.

The facts come from exit records (tpfleet.exits) and exit statuses; the log's last lines are shown
for people, never read to learn what happened."""

from __future__ import annotations

import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tpfleet.exits import ExitRecord


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code >= 0:
        return f"exit code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    hint = {
        "SIGKILL": " (often the kernel's OOM killer: host memory ran out)",
        "SIGSEGV": " (segmentation fault: a native crash, e.g. in a CUDA or NCCL library)",
        "SIGABRT": " (abort: a failed assertion or an uncaught C++ exception)",
        "SIGBUS": " (bus error: often /dev/shm too small)",
    }.get(name, "")
    return f"killed by {name}{hint}"


def rank_lines(engine_pid: int | None, engine_exitcode: int | None, rank_pids: list[int],
               record: ExitRecord | None) -> list[str]:
    """One line per rank: its exit code or signal and the exception it raised, from the engine's exit
    record (its ranks' records are its causes) and the engine process's own exit status (rank 0)."""
    own: dict[int, ExitRecord] = {}
    for each in [record, *record.causes] if record else []:
        if each.role == "rank" and each.rank is not None:
            own.setdefault(each.rank, each)
    engine_error = record if record is not None and record.role == "engine" and record.exc_type else None
    lines = []
    for rank in range(max(len(rank_pids), max(own, default=0) + 1, 1)):
        mine = own.get(rank)
        if mine is not None:
            pid = mine.pid
        elif rank == 0:
            pid = engine_pid
        else:
            pid = rank_pids[rank] if rank < len(rank_pids) else "?"
        if rank == 0:
            code, error = engine_exitcode, mine if mine is not None and mine.exc_type else engine_error
        elif mine is not None:
            code, error = mine.exitcode, mine if mine.exc_type else None
        else:
            lines.append(f"rank {rank} (pid {pid}): ended with its engine")
            continue
        parts = [describe_exit(code)] if code is not None or error is None else []
        if error is not None:
            message = error.message.splitlines()[0] if error.message else ""
            parts.append(f"raised {error.exc_type}: {message} (phase {error.phase})")
        lines.append(f"rank {rank} (pid {pid}): {'; '.join(parts)}")
    return lines


def oom_evidence(pids: list[int], cgroup_oom_before: int | None) -> list[str]:
    """What the kernel says, where this process may read it."""
    out = []
    now = cgroup_oom_kills()
    if now is not None and cgroup_oom_before is not None and now > cgroup_oom_before:
        out.append(f"cgroup memory.events: oom_kill went from {cgroup_oom_before} to {now} during the launch")
    try:
        dmesg = subprocess.run(["dmesg", "--notime"], capture_output=True, text=True, timeout=5).stdout
        for line in dmesg.splitlines():
            if "Killed process" in line and any(f" {p} " in line or f"process {p} " in line for p in pids):
                out.append(f"dmesg: {line.strip()}")
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def cgroup_oom_kills() -> int | None:
    for path in (Path("/sys/fs/cgroup/memory.events"), Path("/sys/fs/cgroup/memory/memory.oom_control")):
        try:
            for line in path.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            continue
    return None


@dataclass
class EngineFailure(RuntimeError):
    engine: int
    gpus: str
    phase: str
    elapsed_s: float
    url: str | None
    reason: str
    ranks: list[str] = field(default_factory=list)
    evidence: list[str] = field(default_factory=list)
    log_path: str = ""
    log_tail: list[str] = field(default_factory=list)
    exit: ExitRecord | None = None  # the root cause: the earliest failure among the exit records
    exit_record_path: str = ""

    def __str__(self) -> str:
        lines = [f"engine {self.engine} failed: {self.reason}",
                 f"  GPUs {self.gpus}; phase {self.phase}; {self.elapsed_s:.1f}s after start; "
                 f"URL {self.url or 'not yet bound'}"]
        lines += [f"  {r}" for r in self.ranks]
        lines += [f"  evidence: {e}" for e in self.evidence]
        if self.exit_record_path:
            lines.append(f"  exit record: {self.exit_record_path}")
        if self.exit is not None and self.exit.traceback:
            lines.append(f"  traceback of {self.exit.describe().partition(':')[0]}:")
            lines += [f"    | {line}" for line in self.exit.traceback.rstrip().splitlines()]
        if self.log_tail:
            lines.append(f"  last lines of {self.log_path}:")
            lines += [f"    | {line}" for line in self.log_tail]
        return "\n".join(lines)
