"""One engine as a child process: start it, follow its progress, decide when it is ready or dead, stop it.

The engine runs `tpfleet serve --config FILE` in a session of its own: FILE is its whole EngineConfig
as one JSON document (its GPUs' UUIDs from the placement plan included), CUDA_VISIBLE_DEVICES is set
from the same plan, its output goes to a log file, and a parent-death signal makes sure it never
outlives the launcher. Its port comes from the engine itself (it binds port 0 and reports the URL in
its `ready` phase line): no port is probed and then raced for.

Failure is the process exiting or an exit record appearing (tpfleet.exits, at the path given to the
engine in TPFLEET_EXIT_RECORD); why it failed is read from that record, or, when the engine died
without writing one (SIGKILL, the OOM killer), from its exit status. The log is followed for phase
lines only, and its last lines are shown to people.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from collections import deque
from pathlib import Path

import httpx

from tpfleet import env, exits
from tpfleet.config import EngineConfig
from tpfleet.exits import ExitRecord
from tpfleet.fleet import processes
from tpfleet.fleet.diagnostics import EngineFailure, cgroup_oom_kills, oom_evidence, rank_lines
from tpfleet.fleet.handle import EventSink, State, TeardownReport
from tpfleet.fleet.placement import EnginePlacement
from tpfleet.lifecycle import die_with_parent
from tpfleet.phases import parse_phase

__all__ = ["EngineProcess", "State", "TeardownReport"]


def _engine_dies_with_launcher() -> None:
    """Popen's preexec_fn: SIGTERM (a clean stop) if the launcher dies, even by SIGKILL."""
    die_with_parent(signal.SIGTERM)


def file_stem(engine: int, attempt: int) -> str:
    """engine3 for the first start of engine 3, engine3.restart2 for its second restart."""
    return f"engine{engine}" if attempt == 0 else f"engine{engine}.restart{attempt}"


class EngineProcess:
    """The local implementation of `EngineHandle` (tpfleet.fleet.handle)."""

    def __init__(self, engine: int, placement: EnginePlacement, config: EngineConfig, log_dir: Path,
                 host: str = "127.0.0.1", port: int = 0, attempt: int = 0, on_event: EventSink | None = None):
        self.engine = engine
        self.placement = placement
        self.config = config
        self.host = host
        self.port = port
        stem = Path(log_dir) / file_stem(engine, attempt)
        self.log_path = stem.with_name(stem.name + ".log")
        self.config_path = stem.with_name(stem.name + ".config.json")
        self.exit_record_path = stem.with_name(stem.name + ".exit.json")
        self.marker = f"{engine}-{uuid.uuid4().hex[:12]}"
        self.on_event = on_event or (lambda engine, event, info: None)
        self.proc: subprocess.Popen | None = None
        self.state = State.STARTING
        self.phase = "not started"
        self.url: str | None = None
        self.rank_pids: list[int] = []
        self.tail: deque[str] = deque(maxlen=40)
        self.started_at = 0.0
        self.ready_s: float | None = None
        self._offset = 0
        self._partial = ""
        self._oom_before: int | None = None

    # --- start and follow -----------------------------------------------------------------------

    def command(self) -> list[str]:
        return [sys.executable, "-m", "tpfleet.cli", "serve", "--config", str(self.config_path),
                "--host", self.host, "--port", str(self.port)]

    def start(self) -> None:
        """Spawn the engine. Call from a thread that lives as long as the fleet: the parent-death
        signal fires when the spawning thread exits."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config.to_json())
        exits.clear(self.exit_record_path)
        child_env = env.child_env(**{env.ENGINE_ID: self.marker, env.EXIT_RECORD: str(self.exit_record_path)})
        if self.placement.ranks:
            child_env["CUDA_VISIBLE_DEVICES"] = self.placement.cuda_visible_devices
        log = open(self.log_path, "wb")
        self._oom_before = cgroup_oom_kills()
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=child_env, start_new_session=True, preexec_fn=_engine_dies_with_launcher)
        log.close()
        self.phase = "starting"
        self.on_event(self.engine, "spawned", {"pid": self.proc.pid, "log": str(self.log_path)})

    @property
    def proc_started(self) -> bool:
        return self.proc is not None

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started_at if self.started_at else 0.0

    def _read_log(self) -> None:
        """Follow the phase lines: progress, the ranks' pids, the URL."""
        try:
            with open(self.log_path, "rb") as log_file:
                log_file.seek(self._offset)
                data = log_file.read()
        except OSError:
            return
        self._offset += len(data)
        lines = (self._partial + data.decode(errors="replace")).split("\n")
        self._partial = lines.pop()
        for line in lines:
            line = line.rstrip("\r")
            self.tail.append(line)
            phase = parse_phase(line)
            if phase is None:
                continue
            name, info = phase
            self.phase = name
            if name == "ranks_started":
                self.rank_pids = info.get("pids", [])
            elif name == "ready":
                self.url = info.get("url")
            self.on_event(self.engine, name, info)

    def poll(self) -> State:
        """Advance what we know from the log, the process and the exit records; never blocks."""
        if self.state in (State.FAILED, State.STOPPED):
            return self.state
        self._read_log()
        if self.proc.poll() is not None or exits.present(self.exit_record_path):
            self._read_log()
            self.state = State.FAILED
        return self.state

    def wait_ready(self, timeout_s: float) -> None:
        """Until /health_generate answers 200. Raises EngineFailure on failure or at the deadline."""
        deadline = self.started_at + timeout_s
        while True:
            if self.poll() is State.FAILED:
                raise self.failure("the engine failed during start-up")
            if self.url is not None and self._healthy(max(0.5, min(30.0, deadline - time.monotonic()))):
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

    def exit_record(self) -> ExitRecord:
        """The engine's own exit record, or one built from its exit status (with whatever its ranks
        wrote as causes) when it died without writing one."""
        record = exits.read(self.exit_record_path)
        if record is not None:
            return record
        exitcode = self.proc.poll() if self.proc else None
        record = ExitRecord.from_exit("engine", 0, self.proc.pid if self.proc else -1, exitcode, self.phase)
        record.causes = exits.rank_records(self.exit_record_path)
        return record

    def failure(self, reason: str) -> EngineFailure:
        """Everything known about why this engine is not serving. Gives a dying engine a moment to
        exit and write its record, so both are part of the report."""
        if self.proc is not None:
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                pass
        self._read_log()
        self.state = State.FAILED
        exitcode = self.proc.poll() if self.proc else None
        record = self.exit_record()
        cause = exits.root_cause([record])
        codes = [exitcode] + [r.exitcode for r in [record, *record.causes]]
        pids = self.rank_pids or ([self.proc.pid] if self.proc else [])
        evidence = oom_evidence(pids, self._oom_before) if -signal.SIGKILL in codes else []
        return EngineFailure(
            self.engine, self.placement.describe(), self.phase, self.elapsed, self.url,
            f"{reason}: {cause.describe()}" if cause else reason,
            rank_lines(self.proc.pid if self.proc else None, exitcode, self.rank_pids, record), evidence,
            str(self.log_path), [line for line in self.tail if line][-25:], cause, str(self.exit_record_path))

    # --- stop -----------------------------------------------------------------------------------

    def stop(self, grace_s: float = 10.0, gpu_baseline: dict[str, int] | None = None) -> TeardownReport:
        """SIGTERM, wait, SIGKILL; then check that no process of the engine is left and, on GPUs,
        that their memory is back to its baseline (within 1%), waiting up to 10 s for the driver."""
        started = time.monotonic()
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
        report.seconds = time.monotonic() - started
        self.state = State.STOPPED
        return report
