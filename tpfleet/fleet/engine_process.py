"""One engine as a child process: start it, follow its log, decide when it is ready or dead, stop it.

The engine runs `tpfleet serve` in a session of its own, with CUDA_VISIBLE_DEVICES set from the
placement plan, its output in a log file, and a parent-death signal so it never outlives the
launcher. Its port comes from the engine itself (it binds port 0 and prints the URL): no port is
probed and then raced for.
"""

from __future__ import annotations

import enum
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tpfleet.engine.llm_engine import RANK_EXIT_PREFIX
from tpfleet.fleet import processes
from tpfleet.fleet.diagnostics import EngineFailure, cgroup_oom_kills, describe_exit, is_crash_line, oom_evidence
from tpfleet.fleet.placement import EnginePlacement
from tpfleet.lifecycle import die_with_parent
from tpfleet.phases import parse_phase

SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
            "PYTHONUNBUFFERED": "1"}


def _engine_dies_with_launcher() -> None:
    """Popen's preexec_fn: SIGTERM (a clean stop) if the launcher dies, even by SIGKILL."""
    die_with_parent(signal.SIGTERM)


class State(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass
class TeardownReport:
    engine: int
    seconds: float
    leftover: list[str] = field(default_factory=list)
    gpu_memory: dict[str, tuple[int, int]] = field(default_factory=dict)  # uuid -> (baseline, after) bytes


class EngineProcess:
    def __init__(self, engine: int, placement: EnginePlacement, serve_args: list[str], log_dir: Path,
                 host: str = "127.0.0.1", on_event=None):
        self.engine = engine
        self.placement = placement
        self.serve_args = serve_args
        self.host = host
        self.log_path = Path(log_dir) / f"engine{engine}.log"
        self.marker = f"{engine}-{uuid.uuid4().hex[:12]}"
        self.on_event = on_event or (lambda engine, event, info: None)
        self.proc: subprocess.Popen | None = None
        self.state = State.STARTING
        self.phase = "not started"
        self.url: str | None = None
        self.rank_pids: list[int] = []
        self.rank_exits: dict[int, int | None] = {}
        self.crash_line: str | None = None
        self.tail: deque[str] = deque(maxlen=40)
        self.t0 = 0.0
        self.ready_s: float | None = None
        self._offset = 0
        self._partial = ""
        self._oom_before: int | None = None

    # --- start and follow -----------------------------------------------------------------------

    def start(self) -> None:
        """Spawn the engine. Call from a thread that lives as long as the fleet: the parent-death
        signal fires when the spawning thread exits."""
        env = {**os.environ, **SAFE_ENV, processes.MARKER_ENV: self.marker}
        args = [sys.executable, "-m", "tpfleet.cli", "serve", *self.serve_args, "--host", self.host]
        if "--port" not in self.serve_args:
            args += ["--port", "0"]
        if self.placement.ranks:
            env["CUDA_VISIBLE_DEVICES"] = self.placement.cuda_visible_devices
            args += ["--gpu-uuids", self.placement.cuda_visible_devices]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        self._oom_before = cgroup_oom_kills()
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                     start_new_session=True, preexec_fn=_engine_dies_with_launcher)
        log.close()
        self.phase = "starting"
        self.on_event(self.engine, "spawned", {"pid": self.proc.pid, "log": str(self.log_path)})

    @property
    def proc_started(self) -> bool:
        return self.proc is not None

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.t0 if self.t0 else 0.0

    def _read_log(self) -> None:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except OSError:
            return
        self._offset += len(data)
        text = self._partial + data.decode(errors="replace")
        lines = text.split("\n")
        self._partial = lines.pop()
        for line in lines:
            line = line.rstrip("\r")
            self.tail.append(line)
            phase = parse_phase(line)
            if phase is not None:
                name, info = phase
                self.phase = name
                if name == "ranks_started":
                    self.rank_pids = info.get("pids", [])
                elif name == "ready":
                    self.url = info.get("url")
                self.on_event(self.engine, name, info)
            elif line.startswith(RANK_EXIT_PREFIX):
                info = json.loads(line[len(RANK_EXIT_PREFIX):])
                self.rank_exits[info["rank"]] = info["exitcode"]
            if self.crash_line is None and is_crash_line(line):
                self.crash_line = line

    def poll(self) -> State:
        """Advance what we know from the log and the process; never blocks."""
        if self.state in (State.FAILED, State.STOPPED):
            return self.state
        self._read_log()
        if self.proc.poll() is not None:
            self._read_log()
            self.state = State.FAILED
        return self.state

    def wait_ready(self, timeout_s: float, crash_grace_s: float = 2.0) -> None:
        """Until /health_generate answers 200. Raises EngineFailure on death, crash marker or deadline."""
        deadline = self.t0 + timeout_s
        crash_seen_at = None
        while True:
            if self.poll() is State.FAILED:
                raise self.failure("the engine process exited during start-up")
            if self.crash_line is not None:
                crash_seen_at = crash_seen_at or time.monotonic()
                if time.monotonic() - crash_seen_at > crash_grace_s:  # time to exit and say why
                    raise self.failure(f"crash marker in its log: {self.crash_line.strip()[:200]}")
            elif self.url is not None and self._healthy(max(0.5, min(30.0, deadline - time.monotonic()))):
                self.state = State.READY
                self.ready_s = self.elapsed
                self.phase = "ready"
                self.on_event(self.engine, "healthy", {"url": self.url, "seconds": round(self.ready_s, 2)})
                return
            if time.monotonic() > deadline:
                raise self.failure(f"not ready within its {timeout_s:.0f}s deadline")
            time.sleep(0.1)

    def _healthy(self, timeout_s: float) -> bool:
        try:
            return httpx.get(f"{self.url}/health_generate", timeout=timeout_s).status_code == 200
        except httpx.HTTPError:
            return False

    # --- diagnosis ------------------------------------------------------------------------------

    def failure(self, reason: str) -> EngineFailure:
        """Everything known about why this engine is not serving. Gives a dying engine a moment
        to exit so its exit code is part of the report."""
        if self.proc is not None:
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                pass
        self._read_log()
        self.state = State.FAILED
        code = self.proc.poll() if self.proc else None
        ranks = [f"rank 0 (pid {self.proc.pid if self.proc else '?'}): {describe_exit(code)}"]
        for r in range(1, max(len(self.rank_pids), 1)):
            pid = self.rank_pids[r] if r < len(self.rank_pids) else "?"
            if r in self.rank_exits:
                ranks.append(f"rank {r} (pid {pid}): {describe_exit(self.rank_exits[r])}")
            else:
                ranks.append(f"rank {r} (pid {pid}): ended with its engine")
        codes = [code] + list(self.rank_exits.values())
        evidence = oom_evidence(self.rank_pids or [self.proc.pid], self._oom_before) \
            if any(c == -9 for c in codes) else []
        return EngineFailure(self.engine, self.placement.describe(), self.phase, self.elapsed, self.url, reason,
                             ranks, evidence, str(self.log_path), [line for line in self.tail if line][-25:])

    # --- stop -----------------------------------------------------------------------------------

    def stop(self, grace_s: float = 10.0, gpu_baseline: dict[str, int] | None = None) -> TeardownReport:
        """SIGTERM, wait, SIGKILL; then check that no process of the engine is left and, on GPUs,
        that their memory is back to its baseline (within 1%), waiting up to 10 s for the driver."""
        t = time.monotonic()
        leftover = processes.terminate(self.proc.pid, self.marker, grace_s) if self.proc else []
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                leftover.append(f"pid {self.proc.pid} (engine leader)")
        report = TeardownReport(self.engine, 0.0, leftover)
        if gpu_baseline:
            from tpfleet.fleet.gpu_state import memory_info

            deadline = time.monotonic() + 10
            while True:
                now = memory_info(list(gpu_baseline))
                if all(used <= gpu_baseline[u] + 0.01 * total for u, (used, total) in now.items()) \
                        or time.monotonic() > deadline:
                    break
                time.sleep(0.25)
            report.gpu_memory = {u: (gpu_baseline[u], used) for u, (used, _) in now.items()}
        report.seconds = time.monotonic() - t
        self.state = State.STOPPED
        return report
