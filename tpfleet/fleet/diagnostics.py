"""Why an engine failed, on the first screen: which engine, GPUs, phase, how long, its URL, every rank's
exit code or signal (with evidence when the kernel's OOM killer is the likely cause), and its log."""

from __future__ import annotations

import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

# A line containing one of these means the engine is going down; the launcher fails it at once.
CRASH_MARKERS = (
    "Traceback (most recent call last)",
    "Fatal Python error",
    "Segmentation fault",
    "tpfleet rank-exit:",
    " CRITICAL ",
    "core dumped",
)


def is_crash_line(line: str) -> bool:
    return any(m in line for m in CRASH_MARKERS)


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

    def __str__(self) -> str:
        lines = [f"engine {self.engine} failed: {self.reason}",
                 f"  GPUs {self.gpus}; phase {self.phase}; {self.elapsed_s:.1f}s after start; "
                 f"URL {self.url or 'not yet bound'}"]
        lines += [f"  {r}" for r in self.ranks]
        lines += [f"  evidence: {e}" for e in self.evidence]
        if self.log_tail:
            lines.append(f"  last lines of {self.log_path}:")
            lines += [f"    | {line}" for line in self.log_tail]
        return "\n".join(lines)
