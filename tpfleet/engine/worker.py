"""Ranks 1..N-1: each runs in its own process and executes what the driver sends over a pipe.

A pipe is anonymous, so nothing here has a name that another engine could collide with. The
worker dies with its parent (PR_SET_PDEATHSIG), ignores Ctrl-C (the driver decides when to stop),
and exits when the pipe closes, so it can never outlive the engine that started it.
"""

from __future__ import annotations

import signal
import traceback
from multiprocessing.connection import Connection

from tpfleet.config import EngineConfig
from tpfleet.lifecycle import die_with_parent


def worker_main(cfg: EngineConfig, rank: int, store_port: int, conn: Connection) -> None:
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from tpfleet.engine.model_runner import ModelRunner

    try:
        runner = ModelRunner(cfg, rank, store_port)
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        raise
    conn.send(("ready", runner.num_blocks))
    while True:
        try:
            method, args = conn.recv()
        except EOFError:
            break
        if method == "exit":
            break
        if method == "run":  # the hot path: no reply, the collectives keep ranks in step
            runner.run(*args)
            continue
        try:
            conn.send(("ok", getattr(runner, method)(*args)))
        except Exception:  # noqa: BLE001 - reported to the driver, which decides
            conn.send(("error", traceback.format_exc()))
    runner.shutdown()
