"""Ranks 1..N-1: each runs in its own process and executes what the driver sends over a pipe.

A pipe is anonymous, so nothing here has a name that another engine could collide with. The
worker dies with its parent (PR_SET_PDEATHSIG), ignores Ctrl-C (the driver decides when to stop),
and exits when the pipe closes, so it can never outlive the engine that started it. A rank that
fails with an exception writes its own exit record (tpfleet.exits) before it dies. Its progress
(heartbeat, phase, steps and calls begun and done) goes to the driver's hang watch
(tpfleet.engine.hang_watch) through shared memory.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import traceback
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

from tpfleet import env, exits
from tpfleet.config import EngineConfig
from tpfleet.engine.hang_watch import (
    CALLS_BEGUN,
    CALLS_DONE,
    SERVING,
    STEPS_BEGUN,
    STEPS_DONE,
    ProgressTable,
    RankBeacon,
)
from tpfleet.exits import ExitRecord
from tpfleet.lifecycle import die_with_parent

if TYPE_CHECKING:
    from tpfleet.engine.model_runner import ModelRunner


class RankProgress:
    """The phase a rank has reached: the start-up phases its ModelRunner passes, then "serving" for
    good (a re-capture of graphs after a memory resume is not start-up). Mirrored in its beacon."""

    def __init__(self, beacon: RankBeacon) -> None:
        self.beacon = beacon
        self.phase = "ranks_started"
        beacon.reach(self.phase)

    def reach(self, phase: str) -> None:
        if self.phase != SERVING:
            self.phase = phase
            self.beacon.reach(phase)


def record_rank_failure(exc: BaseException, rank: int, phase: str) -> None:
    """Write rank `rank`'s exit record for `exc`, if this engine's launcher asked for records."""
    path = env.exit_record_path()
    if path is not None:
        exits.write(exits.rank_path(path, rank), ExitRecord.from_exception(exc, "rank", rank, phase))


def call_method(runner: ModelRunner, name: str, *args):
    """Call the method that `name` names on `runner`: "run", or a dotted path such as
    "colocation.release_memory"."""
    target = runner
    for part in name.split("."):
        target = getattr(target, part)
    return target(*args)


def worker_main(cfg: EngineConfig, rank: int, store_port: int, conn: Connection, table: ProgressTable) -> None:
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    beacon = RankBeacon(table, rank)
    beacon.start_heartbeat()
    progress = RankProgress(beacon)
    try:
        _serve(cfg, rank, store_port, conn, progress)
    except Exception as exc:
        record_rank_failure(exc, rank, progress.phase)
        raise


def _serve(cfg: EngineConfig, rank: int, store_port: int, conn: Connection, progress: RankProgress) -> None:
    from tpfleet.engine.model_runner import ModelRunner

    try:
        runner = ModelRunner(cfg, rank, store_port, on_phase=progress.reach)
    except BaseException as exc:
        # The driver raises this traceback as the start's failure, so it is printed once, there; a driver
        # that went away meanwhile (a Ctrl-C while the ranks start) reads nothing, and this rank says
        # nothing either: its exit record and exit code tell.
        record_rank_failure(exc, rank, progress.phase)
        with contextlib.suppress(OSError):
            conn.send(("error", traceback.format_exc()))
        sys.exit(1)
    progress.reach(SERVING)
    conn.send(("ready", runner.num_blocks))
    while True:
        try:
            method, args = conn.recv()
        except EOFError:
            break
        if method == "exit":
            break
        if method == "run":  # the hot path: no reply, the collectives keep ranks in step
            progress.beacon.bump(STEPS_BEGUN)
            runner.run(*args)
            progress.beacon.bump(STEPS_DONE)
            continue
        progress.beacon.bump(CALLS_BEGUN)
        try:
            conn.send(("ok", call_method(runner, method, *args)))
        except Exception:  # noqa: BLE001 - reported to the driver, which decides
            conn.send(("error", traceback.format_exc()))
        progress.beacon.bump(CALLS_DONE)
    runner.shutdown()
