"""RankGroup on the CPU at TP=2: the exit records (tpfleet.exits) a dead rank leaves.

A rank's death ends the whole engine with os._exit, so each engine runs in a child process of its own,
with TPFLEET_EXIT_RECORD pointing into the test's tmp_path."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

from tpfleet import env, exits
from tpfleet.engine.rank_group import RANK_DIED_EXIT_CODE
from tpfleet.phases import parse_phase

ENGINE_READY = "engine ready"

# Run as the engine process: `python engine_main.py MODEL [raise]`. With "raise", ranks 1..N-1 run
# failing_rank.raising_worker in place of worker_main.
ENGINE_MAIN = """
import sys
import time

from tpfleet.config import EngineConfig
from tpfleet.engine import rank_group
from tpfleet.engine.llm_engine import LLMEngine

if __name__ == "__main__":  # not when a spawned rank imports this file
    if sys.argv[2:] == ["raise"]:
        import failing_rank

        rank_group.worker_main = failing_rank.raising_worker
    engine = LLMEngine(EngineConfig(model=sys.argv[1], tp_size=2, kv_cache_tokens=4096))
    print("engine ready", flush=True)
    time.sleep(300)
"""

# Imported by the rank process (spawned children keep the parent's sys.path): the real worker_main,
# with a ModelRunner that fails as it starts.
FAILING_RANK = """
from tpfleet.engine import model_runner, worker


class RankStartFailed(RuntimeError):
    pass


def raising_worker(cfg, rank, store_port, conn, table):
    def fail(self, *args, **kwargs):
        raise RankStartFailed(f"rank {rank} cannot start")

    model_runner.ModelRunner.__init__ = fail
    worker.worker_main(cfg, rank, store_port, conn, table)
"""


class EngineProcess:
    def __init__(self, tmp_path: Path, model: Path, *args: str):
        (tmp_path / "engine_main.py").write_text(textwrap.dedent(ENGINE_MAIN))
        (tmp_path / "failing_rank.py").write_text(textwrap.dedent(FAILING_RANK))
        self.record_path = tmp_path / "records" / "engine.json"
        self.proc = subprocess.Popen(
            [sys.executable, str(tmp_path / "engine_main.py"), str(model), *args], cwd=tmp_path,
            env={**os.environ, env.EXIT_RECORD: str(self.record_path)},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_for(self, prefix: str, timeout: float = 180) -> str:
        while True:
            line = self.lines.get(timeout=timeout)
            assert line is not None, "the engine exited before printing " + repr(prefix) + ":\n" + self.log
            self.output.append(line)
            if line.startswith(prefix):
                return line

    def wait(self, timeout: float = 180) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()

    @property
    def log(self) -> str:
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.output.append(line)
        return "\n".join(self.output[-60:])

    def rank_record(self, rank: int) -> exits.ExitRecord | None:
        return exits.read(exits.rank_path(self.record_path, rank))

    def engine_record(self) -> exits.ExitRecord | None:
        return exits.read(self.record_path)


def test_a_rank_that_raises_at_start_writes_its_exception(tmp_path, tiny_model):
    engine = EngineProcess(tmp_path, tiny_model, "raise")
    code = engine.wait()
    # Rank 0 waits for rank 1 at the rendezvous, so the watchdog, not the driver, ends the engine.
    assert code == RANK_DIED_EXIT_CODE, engine.log
    rank = engine.rank_record(1)
    assert rank is not None, engine.log
    assert (rank.role, rank.rank, rank.exc_type) == ("rank", 1, "RankStartFailed")
    assert "rank 1 cannot start" in rank.message and "RankStartFailed" in rank.traceback
    assert rank.phase == "ranks_started"
    record = engine.engine_record()
    assert record is not None and record.exitcode == RANK_DIED_EXIT_CODE
    assert exits.root_cause([record]).exc_type == "RankStartFailed"


def test_a_rank_killed_while_idle_is_the_root_cause_of_the_engine_exit(tmp_path, tiny_model):
    engine = EngineProcess(tmp_path, tiny_model)
    _, info = parse_phase(engine.wait_for("tpfleet phase: ranks_started"))
    driver_pid, rank1_pid = info["pids"]
    engine.wait_for(ENGINE_READY)
    assert driver_pid == engine.proc.pid
    os.kill(rank1_pid, signal.SIGKILL)
    assert engine.wait() == RANK_DIED_EXIT_CODE, engine.log
    assert "rank 1" in engine.log and "SIGKILL" in engine.log  # the human-readable line stays

    rank = engine.rank_record(1)
    assert rank is not None, engine.log
    assert (rank.role, rank.rank, rank.pid, rank.signal, rank.phase) == ("rank", 1, rank1_pid, "SIGKILL", "serving")
    assert engine.rank_record(0) is None
    record = engine.engine_record()
    assert record is not None, engine.log
    assert (record.role, record.pid, record.exitcode) == ("engine", driver_pid, RANK_DIED_EXIT_CODE)
    cause = exits.root_cause([record])
    assert (cause.role, cause.rank, cause.signal) == ("rank", 1, "SIGKILL")
