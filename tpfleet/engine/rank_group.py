"""The tensor-parallel ranks of one engine: rank 0 (the driver) in this process, ranks 1..N-1 each in
a process of its own (tpfleet.engine.worker).

The group starts the ranks and the rendezvous store they meet at, sends them each step and every
other call, and watches them. A dead rank would leave the others blocked in a collective forever,
so its death ends the engine, after `on_failure` has failed the requests in flight and EXIT_GRACE_S
has let their answers reach the clients (an error, not a cut connection). It leaves
exit records (tpfleet.exits) that say which rank died and how: the rank's own, written by the rank
when it failed with an exception or else here from its exit status, and the engine's, with the
ranks' records as its causes. A rank that is alive but makes no progress (tpfleet.engine.hang_watch)
ends the engine the same way; `hung` says so meanwhile, so that /health answers 503 before the process
goes.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

from tpfleet import env, exits
from tpfleet.comm.group import create_store
from tpfleet.config import EngineConfig
from tpfleet.engine.hang_watch import Hang, HangWatch, ProgressTable, hang_timeouts
from tpfleet.engine.model_runner import ModelRunner
from tpfleet.engine.step_input import ModelInput
from tpfleet.engine.worker import SERVING, call_method, record_rank_failure, worker_main
from tpfleet.exits import ExitRecord
from tpfleet.phases import current_phase, report_phase

log = logging.getLogger("tpfleet.engine")

RANK_DIED_EXIT_CODE = 70  # EX_SOFTWARE: the engine ended itself because one of its ranks died
RANK_HUNG_EXIT_CODE = 75  # EX_TEMPFAIL: the engine ended itself because one of its ranks hung; restart it
EXIT_GRACE_S = 1.0  # time for the failed requests' answers to reach their clients


@contextmanager
def _sigint_ignored_by_children() -> Iterator[None]:
    """Ranks are born ignoring SIGINT: a Ctrl-C in the terminal reaches every process of its group, and a
    rank still importing would die of it before it could ignore it; the driver stops the ranks. A spawned
    child keeps an ignored disposition (Python leaves an ignored SIGINT alone), not a blocked mask. Only
    the main thread may set it; a Ctrl-C in these milliseconds is lost."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@dataclass
class RankProcess:
    rank: int
    process: mp.Process
    conn: Connection  # the driver's end of the pipe


class RankGroup:
    """Start every rank: ranks 1..N-1 first, then rank 0's own `ModelRunner` (`self.driver`), which
    they all rendezvous with. A rank that fails to start makes this raise, with every rank stopped."""

    def __init__(self, cfg: EngineConfig):
        self.tp_size = cfg.tp_size
        self.workers: list[RankProcess] = []
        self._hang_watch: HangWatch | None = None  # ranks 1..N-1's, with TP > 1
        self._stopping = False
        self._serving = False
        self.hung: str | None = None  # why the engine is unhealthy: a rank stopped making progress
        # Called on the watchdog thread with why a rank died, before the engine exits.
        self.on_failure: Callable[[str], None] | None = None  # fails every request in flight, with a reason
        self._progress = ProgressTable(cfg.tp_size)
        # The rendezvous store's server runs in this process: held here until every worker, its client,
        # has exited (see `shutdown`).
        self._store = create_store(cfg.tp_size) if cfg.tp_size > 1 else None
        store_port = self._store.port if self._store else 0
        try:  # from the first spawn on, anything raised here (a Ctrl-C included) stops every rank it started
            self._start_workers(cfg, store_port)
            try:
                self.driver = ModelRunner(cfg, 0, store_port, self._store)
            except Exception as exc:
                record_rank_failure(exc, 0, current_phase())  # rank 0's own error is the story
                raise
            self._wait_ready()
        except BaseException:
            self.stop()  # before the kills: no watchdog report of the others
            raise
        self._serving = True

    def _start_workers(self, cfg: EngineConfig, store_port: int) -> None:
        context = mp.get_context("spawn")
        for rank in range(1, cfg.tp_size):
            parent_end, child_end = context.Pipe()
            process = context.Process(target=worker_main, args=(cfg, rank, store_port, child_end, self._progress),
                                      name=f"tpfleet-rank{rank}", daemon=True)
            with _sigint_ignored_by_children():
                process.start()
            child_end.close()
            self.workers.append(RankProcess(rank, process, parent_end))
        report_phase("ranks_started", pids=self.pids)
        if self.workers:
            threading.Thread(target=self._watch, name="tpfleet-watchdog", daemon=True).start()
            self._hang_watch = HangWatch(self._progress, hang_timeouts(cfg), self._on_hang, lambda: self._stopping)
            self._hang_watch.start()

    @property
    def pids(self) -> list[int]:
        """Process ids in rank order: this process is rank 0."""
        return [os.getpid()] + [worker.process.pid for worker in self.workers]

    @property
    def phase(self) -> str:
        """What an exit record says the engine was doing."""
        return SERVING if self._serving else current_phase()

    def _wait_ready(self) -> None:
        for worker in self.workers:
            status, info = worker.conn.recv()
            if status != "ready":
                raise RuntimeError(f"rank {worker.rank} failed to start:\n{info}")

    # --- every rank at once -------------------------------------------------------------------------

    def send_step(self, inp: ModelInput) -> None:
        """Hand a step to ranks 1..N-1; the caller runs it on the driver. No reply: the collectives
        inside the forward pass keep the ranks in step."""
        for worker in self.workers:
            worker.conn.send(("run", (inp,)))

    def call_all(self, method: str, *args) -> list:
        """Call `method` (a ModelRunner method, or a dotted path such as "colocation.release_memory")
        on every rank; results in rank order. Every rank's answer is collected before any failure is
        raised, so the pipes never hold a stale reply."""
        for worker in self.workers:
            worker.conn.send((method, args))
        try:
            replies = [("ok", call_method(self.driver, method, *args))]
        except Exception:  # noqa: BLE001 - reported with the others below
            replies = [("error", traceback.format_exc())]
        replies += [worker.conn.recv() for worker in self.workers]
        errors = [f"rank {rank}: {value.strip().splitlines()[-1]}"
                  for rank, (status, value) in enumerate(replies) if status != "ok"]
        if errors:
            raise RuntimeError(f"{method} failed: " + "; ".join(errors))
        return [value for _, value in replies]

    # --- a rank's death -------------------------------------------------------------------------------

    def _watch(self) -> None:
        """Wait for any worker to die; unless the group is stopping, record why and end the engine."""
        by_sentinel = {worker.process.sentinel: worker for worker in self.workers}
        ready = wait(list(by_sentinel))
        died_at = time.time()
        if self._stopping or not threading.main_thread().is_alive():  # stopped, or the interpreter is exiting
            return
        dead = by_sentinel[ready[0]]
        dead.process.join(timeout=1)
        phase = self.phase
        record = ExitRecord.from_exit("rank", dead.rank, dead.process.pid, dead.process.exitcode, phase)
        record.time = died_at
        path = env.exit_record_path()
        if path is not None:
            rank_file = exits.rank_path(path, dead.rank)
            if rank_file.exists():
                record = exits.read(rank_file) or record  # its own account: the exception it raised
            else:
                exits.write(rank_file, record)
        log.critical("%s; stopping the engine", record.describe())
        for worker in self.workers:
            if worker.process.is_alive():
                worker.process.kill()
        exits.write_engine_record(path, self.tp_size, ExitRecord.from_exit(
            "engine", 0, os.getpid(), RANK_DIED_EXIT_CODE, phase, message=record.describe()))
        self._fail_requests(record.describe())
        os._exit(RANK_DIED_EXIT_CODE)

    def _on_hang(self, hang: Hang) -> None:
        """Say the engine is unhealthy, record the stuck rank, and end the engine: its fleet restarts it."""
        if self._stopping:
            return
        stuck = next(worker for worker in self.workers if worker.rank == hang.rank)
        self._end_hung(ExitRecord("rank", hang.rank, stuck.process.pid, hang.phase, "RankHung", hang.message))

    def driver_hung(self, message: str) -> None:
        """Rank 0's own step or call has run past its limit (a kernel or a collective that never returns
        blocks it, while this process's other threads still run): end the engine as for
        any hung rank, unless a peer has gone silent, which is then the one named. Called by the server's
        step watch."""
        if self._stopping:
            return
        silent = self._hang_watch.silent_rank(time.time()) if self._hang_watch is not None else None
        if silent is not None:
            self._on_hang(silent)
        else:
            self._end_hung(ExitRecord("rank", 0, os.getpid(), self.phase, "RankHung", message))

    def _end_hung(self, record: ExitRecord) -> None:
        self.hung = record.message
        log.critical("%s; stopping the engine in %gs", record.message, EXIT_GRACE_S)
        path = env.exit_record_path()
        if path is not None:
            exits.write(exits.rank_path(path, record.rank), record)
        self._fail_requests(record.message)
        self._stopping = True  # the kills below are not deaths to report
        for worker in self.workers:
            worker.process.kill()
        exits.write_engine_record(path, self.tp_size, ExitRecord.from_exit(
            "engine", 0, os.getpid(), RANK_HUNG_EXIT_CODE, self.phase, message=record.describe()))
        os._exit(RANK_HUNG_EXIT_CODE)

    def _fail_requests(self, reason: str) -> None:
        """Before the engine ends itself: fail every request in flight and let the answers go out."""
        if self.on_failure is not None:
            try:
                self.on_failure(reason)
            except Exception:  # noqa: BLE001 - the engine exits all the same
                log.exception("failing the requests in flight failed")
        time.sleep(EXIT_GRACE_S)

    # --- stopping ---------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Kill ranks 1..N-1 at once (a failed start)."""
        self._stopping = True
        for worker in self.workers:
            worker.process.kill()
            worker.process.join(timeout=10)

    def shutdown(self) -> None:
        """Stop every rank in order: ask the workers to exit, shut the driver down, then wait for them."""
        self._stopping = True
        for worker in self.workers:
            try:
                worker.conn.send(("exit", ()))
            except (BrokenPipeError, OSError):
                pass
        self.driver.shutdown()
        for worker in self.workers:
            worker.process.join(timeout=10)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.conn.close()
        self.workers = []
        # Now that no client is left, stop the store's server thread here, not at interpreter exit.
        self._store = None
