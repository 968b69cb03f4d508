"""Finding and ending every process of an engine, including ones reparented away from it.

An engine runs in its own session, and every process it starts inherits TPFLEET_ENGINE_ID, so
membership is decided by session id or by that marker; a child that called setsid or was
reparented to init is still found.
"""

from __future__ import annotations

import os
import signal
import time

import psutil

from tpfleet import env


def members(sid: int, marker: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter():
        try:
            if p.pid == os.getpid():
                continue
            if os.getsid(p.pid) == sid or p.environ().get(env.ENGINE_ID) == marker:
                if p.status() != psutil.STATUS_ZOMBIE:
                    found.append(p)
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    return found


def signal_all(procs: list[psutil.Process], sig: int) -> None:
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.Error:
            pass


def terminate(sid: int, marker: str, grace_s: float = 10.0) -> list[str]:
    """SIGTERM the engine's driver (the session leader), whose own shutdown stops its ranks, and wait up to
    `grace_s` for every member to go; then SIGTERM the members left, and SIGKILL what outlives that, and
    verify. Signalled together, a rank could die before its driver began to stop, and the engine would
    record a clean stop as a rank's death. Returns descriptions of processes that survived even SIGKILL
    (empty when all went)."""
    procs = members(sid, marker)
    leader = [p for p in procs if p.pid == sid]
    signal_all(leader or procs, signal.SIGTERM)
    signal_all(procs, signal.SIGCONT)  # a stopped process cannot act on SIGTERM until continued
    psutil.wait_procs(procs, timeout=grace_s)
    rest = members(sid, marker)  # may include children started while we waited
    signal_all(rest, signal.SIGTERM)
    psutil.wait_procs(rest, timeout=min(grace_s, 2.0))
    late = members(sid, marker)
    signal_all(late, signal.SIGKILL)
    psutil.wait_procs(late, timeout=5)
    deadline = time.monotonic() + 5
    left = members(sid, marker)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = members(sid, marker)
    return [f"pid {p.pid} ({_name(p)})" for p in left]


def _name(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())[:120] or p.name()
    except psutil.Error:
        return "?"
