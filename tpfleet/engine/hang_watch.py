"""Hung-rank detection: a rank that stops making progress ends the engine, naming the rank.

A dead rank is caught by its process sentinel (tpfleet.engine.rank_group); a hung one is alive, so
each rank reports progress through a small table in shared memory that the driver reads:

- a heartbeat, written every HEARTBEAT_INTERVAL_S by a thread of the rank's own. The thread needs
  the GIL, which torch releases in kernels and collectives, so a stale heartbeat means the process is
  frozen (stopped, or stuck holding the GIL), never merely waiting for a peer;
- counters of the steps and calls it has begun and finished: two increments per step, nothing per
  token. A rank inside a step whose counters have not moved for the timeout is stuck in it (a
  collective that never completes, a kernel that never returns).

Start-up phases and calls (weight loading, memory resume) legitimately take long, so they get the
longer `startup` timeout; a step in serving gets `step`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.sharedctypes import RawArray

from tpfleet.config import EngineConfig
from tpfleet.phases import PHASES

HEARTBEAT_INTERVAL_S = 0.5
MISSED_BEATS = 4  # a rank this many heartbeats late is not merely slow to be scheduled
SERVING = "serving"  # the phase of a rank that finished starting
_PHASE_NAMES = (*PHASES, SERVING)

# One row per rank: its columns.
HEARTBEAT, PHASE, STEPS_BEGUN, STEPS_DONE, CALLS_BEGUN, CALLS_DONE = range(6)
_COLUMNS = 6


@dataclass(frozen=True)
class HangTimeouts:
    step: float  # a step while serving, and a serving rank's heartbeat
    startup: float  # start-up phases and calls (weight loads, memory resume)


def hang_timeouts(cfg: EngineConfig) -> HangTimeouts:
    return HangTimeouts(cfg.hang_timeout, cfg.startup_hang_timeout)


class ProgressTable:
    """The shared table: every rank writes its own row only, the driver reads them all. Plain doubles
    without a lock: each is written by one process, and a torn read is impossible for aligned 8 bytes."""

    def __init__(self, tp_size: int):
        self.tp_size = tp_size
        self.values = RawArray("d", tp_size * _COLUMNS)
        now = time.time()
        for rank in range(tp_size):
            self.values[rank * _COLUMNS + HEARTBEAT] = now

    def get(self, rank: int, column: int) -> float:
        return self.values[rank * _COLUMNS + column]


class RankBeacon:
    """A rank's side of the table: its heartbeat thread and its counters."""

    def __init__(self, table: ProgressTable, rank: int):
        self.values = table.values
        self.row = rank * _COLUMNS

    def start_heartbeat(self) -> None:
        def beat() -> None:
            while True:
                self.values[self.row + HEARTBEAT] = time.time()
                time.sleep(HEARTBEAT_INTERVAL_S)

        threading.Thread(target=beat, name="tpfleet-heartbeat", daemon=True).start()

    def reach(self, phase: str) -> None:
        if phase in _PHASE_NAMES:
            self.values[self.row + PHASE] = _PHASE_NAMES.index(phase)

    def bump(self, column: int) -> None:
        self.values[self.row + column] += 1


@dataclass
class Hang:
    rank: int
    phase: str
    message: str


class HangWatch:
    """The driver's thread that reads the table of ranks 1..N-1 and calls `on_hang` once, with the first
    rank found stuck. `stopped()` says when the group is going away and nothing should be reported."""

    def __init__(self, table: ProgressTable, timeouts: HangTimeouts, on_hang: Callable[[Hang], None],
                 stopped: Callable[[], bool]):
        self.table = table
        self.timeouts = timeouts
        self.on_hang = on_hang
        self.stopped = stopped
        started = time.time()
        # Per rank: its counters when last seen, and since when they have not moved.
        self._seen: dict[int, tuple[tuple[float, ...], float]] = {
            rank: (self._counters(rank), started) for rank in range(1, table.tp_size)}
        self.interval = min(1.0, timeouts.step / 4)

    def start(self) -> None:
        threading.Thread(target=self._run, name="tpfleet-hang-watch", daemon=True).start()

    def _run(self) -> None:
        while not self.stopped():
            hang = self.check(time.time())
            if hang is not None:
                self.on_hang(hang)
                return
            time.sleep(self.interval)

    def _counters(self, rank: int) -> tuple[float, ...]:
        return tuple(self.table.get(rank, c) for c in (STEPS_BEGUN, STEPS_DONE, CALLS_BEGUN, CALLS_DONE))

    def phase(self, rank: int) -> str:
        return _PHASE_NAMES[int(self.table.get(rank, PHASE))]

    def silent_rank(self, now: float) -> Hang | None:
        """The rank whose heartbeat is the stalest, if it has missed a few beats: when rank 0 is stuck in a
        step, a stopped peer is the likelier cause than rank 0 itself. Reads the table only."""
        silent = {rank: now - self.table.get(rank, HEARTBEAT) for rank in range(1, self.table.tp_size)}
        rank = max(silent, key=silent.get, default=None)
        if rank is None or silent[rank] <= MISSED_BEATS * HEARTBEAT_INTERVAL_S:
            return None
        return Hang(rank, self.phase(rank), f"rank {rank} sent no heartbeat for {silent[rank]:.1f}s while rank 0 "
                                            f"waited in a step past the hang timeout: its process is stopped or "
                                            f"stuck holding the GIL")

    def check(self, now: float) -> Hang | None:
        """The first stuck rank at time `now`, or None."""
        for rank in range(1, self.table.tp_size):
            counters = self._counters(rank)
            previous, since = self._seen[rank]
            if counters != previous:
                self._seen[rank] = (counters, now)
                since = now
            steps_begun, steps_done, calls_begun, calls_done = counters
            phase = self.phase(rank)
            in_call = calls_begun > calls_done
            limit = self.timeouts.step if phase == SERVING and not in_call else self.timeouts.startup
            doing = (f"step {int(steps_begun)}" if steps_begun > steps_done
                     else f"call {int(calls_begun)}" if in_call else "no step")
            silent = now - self.table.get(rank, HEARTBEAT)
            if silent > limit:
                return Hang(rank, phase, f"rank {rank} sent no heartbeat for {silent:.1f}s (limit {limit:g}s) "
                                         f"in {doing}: its process is stopped or stuck holding the GIL")
            if (steps_begun > steps_done or in_call) and now - since > limit:
                return Hang(rank, phase, f"rank {rank} made no progress in {doing} for {now - since:.1f}s "
                                         f"(limit {limit:g}s): a collective or a kernel that never completes")
        return None
