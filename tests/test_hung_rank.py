"""Hung ranks (tpfleet.engine.hang_watch): a rank that is alive but makes no progress ends the engine
with an exit record naming it. The end-to-end test stops rank 1 of a TP=2 CPU engine with SIGSTOP
while it is generating; the engine runs in a child process because a hang ends it with os._exit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tpfleet import env, exits
from tpfleet.engine.hang_watch import (
    CALLS_BEGUN,
    HEARTBEAT,
    PHASE,
    STEPS_BEGUN,
    STEPS_DONE,
    HangTimeouts,
    HangWatch,
    ProgressTable,
    RankBeacon,
)
from tpfleet.engine.rank_group import EXIT_GRACE_S, RANK_HUNG_EXIT_CODE
from tpfleet.phases import PHASES, parse_phase

HANG_TIMEOUT = 3.0

# `python engine_main.py MODEL TIMEOUT`: a TP=2 engine that generates without end, printing "hung: ..."
# as soon as its ranks say so.
ENGINE_MAIN = """
import sys
import threading
import time

import pytest

from tpfleet.config import EngineConfig
from tpfleet.engine.llm_engine import LLMEngine
from tpfleet.engine.sequence import SamplingParams

if __name__ == "__main__":
    cfg = EngineConfig(model=sys.argv[1], tp_size=2, kv_cache_tokens=4096)
    cfg.hang_timeout = float(sys.argv[2])
    engine = LLMEngine(cfg)

    def report():
        while engine.ranks.hung is None:
            time.sleep(0.05)
        print("hung:", engine.ranks.hung, flush=True)

    threading.Thread(target=report, daemon=True).start()
    print("engine ready", flush=True)
    while True:
        if not engine.has_work():
            engine.add_request([1, 2, 3, 4], SamplingParams(max_new_tokens=64, ignore_eos=True))
        engine.step()
"""


def _table(steps_begun: float, steps_done: float, phase: str = "serving") -> ProgressTable:
    table = ProgressTable(2)
    beacon = RankBeacon(table, 1)
    beacon.reach(phase)
    for _ in range(int(steps_begun)):
        beacon.bump(STEPS_BEGUN)
    for _ in range(int(steps_done)):
        beacon.bump(STEPS_DONE)
    return table


def _set_heartbeat(table: ProgressTable, when: float) -> None:
    """Rank 1's last heartbeat, as its thread would have written it."""
    table.values[len(table.values) // 2 + HEARTBEAT] = when


def test_a_step_without_progress_past_the_timeout_is_a_hang():
    table = _table(steps_begun=5, steps_done=4)
    watch = HangWatch(table, HangTimeouts(step=2.0, startup=100.0), lambda hang: None, lambda: False)
    start = time.time()
    _set_heartbeat(table, start + 10)  # rank 1's heartbeat stays fresh: it waits in a collective
    assert watch.check(start + 1.0) is None
    hang = watch.check(start + 2.5)
    assert hang is not None and hang.rank == 1 and hang.phase == "serving"
    assert "no progress in step 5" in hang.message


def test_progress_and_idle_ranks_are_not_hangs():
    table = _table(steps_begun=5, steps_done=5)
    watch = HangWatch(table, HangTimeouts(step=2.0, startup=100.0), lambda hang: None, lambda: False)
    start = time.time()
    _set_heartbeat(table, start + 50)
    assert watch.check(start + 30) is None  # idle: no step begun and not finished
    RankBeacon(table, 1).bump(STEPS_BEGUN)
    assert watch.check(start + 31) is None  # it moved: the clock restarts
    assert watch.check(start + 32.5) is None
    assert watch.check(start + 33.5) is not None


def test_when_rank_0_is_stuck_a_silent_peer_is_named():
    """Rank 0's step watch may fire before the peer's own check does: a peer that missed heartbeats is
    then the cause named, not rank 0, which only waited for it."""
    table = _table(steps_begun=5, steps_done=4)
    watch = HangWatch(table, HangTimeouts(step=2.0, startup=100.0), lambda hang: None, lambda: False)
    now = time.time()
    _set_heartbeat(table, now - 0.6)
    assert watch.silent_rank(now) is None  # a beat late: merely slow to be scheduled
    _set_heartbeat(table, now - 3.0)
    hang = watch.silent_rank(now)
    assert hang is not None and hang.rank == 1 and "no heartbeat for 3.0s" in hang.message


def test_calls_and_start_up_get_the_longer_timeout():
    table = _table(steps_begun=0, steps_done=0, phase="weights_loaded")
    watch = HangWatch(table, HangTimeouts(step=2.0, startup=100.0), lambda hang: None, lambda: False)
    start = table.get(1, HEARTBEAT)
    assert PHASES[int(table.get(1, PHASE))] == "weights_loaded"
    assert watch.check(start + 50) is None  # a silent heartbeat during start-up: not yet
    hang = watch.check(start + 101)
    assert hang is not None and hang.phase == "weights_loaded" and "no heartbeat" in hang.message

    table = _table(steps_begun=3, steps_done=3)
    RankBeacon(table, 1).bump(CALLS_BEGUN)  # e.g. a weight update from disk
    watch = HangWatch(table, HangTimeouts(step=2.0, startup=100.0), lambda hang: None, lambda: False)
    start = time.time()
    _set_heartbeat(table, start + 200)
    assert watch.check(start + 50) is None
    assert "no progress in call 1" in watch.check(start + 101).message


def test_a_stopped_rank_is_detected_and_named_in_the_exit_record(tmp_path, tiny_model):
    (tmp_path / "engine_main.py").write_text(textwrap.dedent(ENGINE_MAIN))
    record_path = tmp_path / "records" / "engine.json"
    proc = subprocess.Popen([sys.executable, str(tmp_path / "engine_main.py"), str(tiny_model), str(HANG_TIMEOUT)],
                            cwd=tmp_path, env={**os.environ, env.EXIT_RECORD: str(record_path)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    rank1_pid = None
    try:
        for line in proc.stdout:
            output.append(line.rstrip())
            phase = parse_phase(line)
            if phase is not None and phase[0] == "ranks_started":
                rank1_pid = phase[1]["pids"][1]
            if line.startswith("engine ready"):
                break
        assert rank1_pid is not None, "\n".join(output)
        time.sleep(0.5)  # generating now
        os.kill(rank1_pid, signal.SIGSTOP)
        stopped_at = time.time()
        code = proc.wait(timeout=HANG_TIMEOUT + 5 + EXIT_GRACE_S + 30)
        output += proc.stdout.read().splitlines()
    finally:
        if proc.poll() is None:
            proc.kill()
        if rank1_pid is not None:
            try:
                os.kill(rank1_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    log = "\n".join(output[-40:])
    assert code == RANK_HUNG_EXIT_CODE, log
    assert any(line.startswith("hung: rank 1 ") for line in output), log

    rank = exits.read(exits.rank_path(record_path, 1))
    assert rank is not None, log
    assert (rank.role, rank.rank, rank.pid, rank.exc_type, rank.phase) == ("rank", 1, rank1_pid, "RankHung", "serving")
    assert rank.time - stopped_at < HANG_TIMEOUT + 5, log
    record = exits.read(record_path)
    assert record is not None and record.exitcode == RANK_HUNG_EXIT_CODE, log
    cause = exits.root_cause([record])
    assert (cause.rank, cause.exc_type) == (1, "RankHung")


# `python stuck_main.py MODEL TIMEOUT step|call`: a TP=1 server engine stuck while a request waits: in its
# fourth forward (a kernel or collective that never completes blocks rank 0), or in a call on the engine
# thread (a trainer gone quiet in the middle of a weight update). The request must fail.
STUCK_MAIN = """
import asyncio
import sys
import threading

from tpfleet.config import EngineConfig
from tpfleet.engine.llm_engine import LLMEngine
from tpfleet.engine.sequence import SamplingParams
from tpfleet.server.async_engine import AsyncEngine, EngineDead

if __name__ == "__main__":
    model, timeout, where = sys.argv[1], float(sys.argv[2]), sys.argv[3]
    limit = {"hang_timeout": timeout} if where == "step" else {"startup_hang_timeout": timeout}
    engine = LLMEngine(EngineConfig(model=model, kv_cache_tokens=4096, **limit))
    forward, calls = engine.runner.run, []

    def run(*args, **kwargs):
        calls.append(1)
        if where == "step" and len(calls) > 3:
            threading.Event().wait()
        return forward(*args, **kwargs)

    engine.runner.run = run
    aengine = AsyncEngine(engine)

    async def request():
        try:
            async for _ in aengine.generate([1, 2, 3, 4], SamplingParams(max_new_tokens=2000, ignore_eos=True)):
                pass
        except EngineDead as error:
            print("request failed:", error, flush=True)

    async def main():
        waiting = asyncio.create_task(request())
        if where == "call":
            await asyncio.sleep(0.5)
            asyncio.ensure_future(aengine.run_on_engine(threading.Event().wait))
        await waiting
        await asyncio.sleep(60)

    asyncio.run(main())
"""


@pytest.mark.parametrize("where,says", [("step", "one step for more than"), ("call", "one call for more than")])
def test_a_stuck_driver_fails_its_requests_and_ends_the_engine(tmp_path, tiny_model, where, says):
    """Past hang_timeout in a step, or startup_hang_timeout in a call on the engine thread, the engine fails
    its requests and exits 75 for its fleet to restart it, with rank 0 named in its exit record."""
    (tmp_path / "stuck_main.py").write_text(textwrap.dedent(STUCK_MAIN))
    record_path = tmp_path / "records" / "engine.json"
    started = time.time()
    run = subprocess.run([sys.executable, str(tmp_path / "stuck_main.py"), str(tiny_model), str(HANG_TIMEOUT), where],
                         cwd=tmp_path, env={**os.environ, env.EXIT_RECORD: str(record_path)},
                         capture_output=True, text=True, timeout=120)
    log = (run.stdout + run.stderr)[-3000:]
    assert run.returncode == RANK_HUNG_EXIT_CODE, log
    assert "request failed: rank 0" in run.stdout and says in run.stdout, log
    rank = exits.read(exits.rank_path(record_path, 0))
    assert rank is not None, log
    assert (rank.role, rank.rank, rank.exc_type, rank.phase) == ("rank", 0, "RankHung", "serving")
    assert rank.time - started < 60, log
    record = exits.read(record_path)
    assert record is not None and record.exitcode == RANK_HUNG_EXIT_CODE, log
