"""A fleet of TP engines: placed by one plan, started K at a time, watched, restarted, torn down.

    with Fleet(FleetConfig(model="m", engines=4, tp=2, device="cuda")) as fleet:
        print(fleet.urls)

Engines run as local processes by default, or inside Ray actors (backend="ray"); both share the
placement plan, the start-up supervision and the diagnostics.
"""

from __future__ import annotations

import logging
import socket
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tpfleet.fleet.diagnostics import EngineFailure
from tpfleet.fleet.engine_process import EngineProcess, State, TeardownReport
from tpfleet.fleet.gpu_state import claim_gpus
from tpfleet.fleet.placement import PlacementPlan, cpu_plan, plan_placement, select_gpus

log = logging.getLogger("tpfleet.fleet")


@dataclass
class FleetConfig:
    model: str
    engines: int = 1
    tp: int = 1
    device: str = "cpu"
    gpus: list[str] | None = None  # indices into this process's visible GPUs, or UUIDs
    backend: str = "local"  # "local" or "ray"
    max_concurrent_starts: int = 1
    startup_timeout_s: float = 600.0
    engine_args: list[str] = field(default_factory=list)  # extra `tpfleet serve` arguments
    log_dir: str | None = None
    reap_stale: bool = False
    restart_budget: int = 3
    restart_backoff_s: float = 1.0
    host: str = "127.0.0.1"  # where engines listen; "node": the node's IP (Ray across machines)
    ray_address: str | None = None
    ray_logical_gpus: bool = False  # CPU engines that still claim GPUs from Ray (tests, dry runs)
    colocated_pids: list[int] = field(default_factory=list)  # processes sharing the GPUs on purpose (trainers)

    def serve_args(self) -> list[str]:
        return ["--model", self.model, "--tp", str(self.tp), "--device", self.device, *self.engine_args]


@dataclass
class EngineInfo:
    engine: int
    gpus: str
    url: str | None
    startup_s: float | None
    state: str
    restarts: int = 0


class Fleet:
    def __init__(self, cfg: FleetConfig, on_event=None):
        if cfg.backend not in ("local", "ray"):
            raise ValueError(f"backend must be 'local' or 'ray', not {cfg.backend!r}")
        if cfg.max_concurrent_starts < 1:
            raise ValueError("max_concurrent_starts must be at least 1")
        self.cfg = cfg
        self.on_event = on_event or (lambda engine, event, info: None)
        self.log_dir = Path(cfg.log_dir or tempfile.mkdtemp(prefix="tpfleet-logs-"))
        self.plan: PlacementPlan | None = None
        self.engines: list = []
        self.restarts: dict[int, int] = {}
        self.gpu_baseline: dict[str, int] = {}
        self.timeline: list[tuple[float, int, str]] = []  # (time, engine, event): start-up order, for audits
        self.max_starting_seen = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None
        # Parent-death signals follow the thread that spawned a process: spawn from one that lives as
        # long as the fleet, whichever thread of the caller's calls start().
        self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tpfleet-spawner")
        self._ray = None

    # --- plan -------------------------------------------------------------------------------------

    def _make_plan(self) -> PlacementPlan:
        cfg = self.cfg
        if cfg.backend == "ray":
            from tpfleet.fleet.ray_backend import RayEngines

            self._ray = RayEngines(cfg, self.log_dir, self._event)
            return self._ray.plan
        if cfg.device == "cpu":
            return cpu_plan(cfg.engines, socket.gethostname())
        from tpfleet.devices import visible_gpus

        gpus = select_gpus(cfg.gpus, visible_gpus())
        return plan_placement(gpus, cfg.engines, cfg.tp, socket.gethostname())

    # --- start ------------------------------------------------------------------------------------

    def _event(self, engine: int, event: str, info: dict) -> None:
        with self._lock:
            self.timeline.append((time.monotonic(), engine, event))
        self.on_event(engine, event, info)

    def _new_engine(self, e: int):
        if self._ray is not None:
            return self._ray.engine(e)
        host = socket.gethostbyname(socket.gethostname()) if self.cfg.host == "node" else self.cfg.host
        return EngineProcess(e, self.plan.engines[e], self.cfg.serve_args(), self.log_dir, host, self._event)

    def start(self) -> list[EngineInfo]:
        cfg = self.cfg
        self.plan = self._make_plan()
        uuids = [u for e in self.plan.engines for u in e.uuids if not u.startswith("logical-")]
        if self._ray is not None:
            self.gpu_baseline = self._ray.claim_gpus(cfg.reap_stale, set(cfg.colocated_pids))
        elif uuids:
            self.gpu_baseline = claim_gpus(uuids, cfg.reap_stale, set(cfg.colocated_pids))
        self.engines = [self._new_engine(e) for e in range(cfg.engines)]
        pending = list(self.engines)
        starting: dict[Future, object] = {}
        waiters = ThreadPoolExecutor(max_workers=cfg.max_concurrent_starts, thread_name_prefix="tpfleet-wait")
        try:
            while pending or starting:
                while pending and len(starting) < cfg.max_concurrent_starts:
                    eng = pending.pop(0)
                    self._spawner.submit(eng.start).result()
                    starting[waiters.submit(eng.wait_ready, cfg.startup_timeout_s)] = eng
                    self.max_starting_seen = max(self.max_starting_seen, len(starting))
                done, _ = wait(starting, return_when=FIRST_COMPLETED)
                for fut in done:
                    starting.pop(fut)
                    fut.result()  # raises EngineFailure
        except BaseException:
            for fut in starting:
                fut.cancel()
            self.stop()
            raise
        finally:
            waiters.shutdown(wait=False, cancel_futures=True)
        self._monitor = threading.Thread(target=self._watch, name="tpfleet-monitor", daemon=True)
        self._monitor.start()
        return self.info()

    # --- running ----------------------------------------------------------------------------------

    def info(self) -> list[EngineInfo]:
        return [EngineInfo(e.engine, e.placement.describe(), e.url, e.ready_s, e.state.value,
                           self.restarts.get(e.engine, 0)) for e in self.engines]

    @property
    def urls(self) -> list[str]:
        return [e.url for e in self.engines if e.state is State.READY]

    def healthy(self) -> list:
        return [e for e in self.engines if e.state is State.READY]

    def _watch(self) -> None:
        """Take dead engines out of rotation, diagnose them, restart within budget with backoff."""
        while not self._stop.wait(0.5):
            for i, eng in enumerate(list(self.engines)):
                if eng.state is not State.READY or eng.poll() is not State.FAILED:
                    continue
                failure = eng.failure("the engine died while serving")
                log.error("%s", failure)
                self._event(eng.engine, "died", {"reason": failure.reason})
                eng.stop(gpu_baseline=self._baseline_of(eng))
                self._restart(i, eng.engine)

    def _restart(self, i: int, engine: int) -> None:
        """New engines for a dead one, with exponential backoff, until one is ready or the budget is spent."""
        while self.restarts.get(engine, 0) < self.cfg.restart_budget:
            n = self.restarts.get(engine, 0)
            if self._stop.wait(self.cfg.restart_backoff_s * 2 ** n):
                return
            self.restarts[engine] = n + 1
            fresh = self._new_engine(engine)
            self.engines[i] = fresh
            self._spawner.submit(fresh.start).result()
            try:
                fresh.wait_ready(self.cfg.startup_timeout_s)
                return
            except EngineFailure as f:
                log.error("restart %d of engine %d failed:\n%s", n + 1, engine, f)
                fresh.stop(gpu_baseline=self._baseline_of(fresh))
        log.error("engine %d is out of restarts (%d); leaving it down", engine, self.cfg.restart_budget)

    def _baseline_of(self, eng) -> dict[str, int]:
        return {u: self.gpu_baseline[u] for u in eng.placement.uuids if u in self.gpu_baseline}

    def broadcast(self, path: str, body: dict | None = None, timeout: float = 300) -> list[dict]:
        """POST to every serving engine; returns each engine's JSON answer (or its error)."""
        out = []
        for e in self.healthy():
            r = httpx.post(f"{e.url}{path}", json=body or {}, timeout=timeout)
            out.append({"engine": e.engine, "status": r.status_code,
                        **(r.json() if r.headers.get("content-type", "").startswith("application/json") else {})})
        return out

    # --- stop -------------------------------------------------------------------------------------

    def stop(self) -> list[TeardownReport]:
        self._stop.set()
        if self._monitor is not None and self._monitor is not threading.current_thread():
            self._monitor.join(timeout=30)
        reports = []
        with ThreadPoolExecutor(max_workers=max(1, len(self.engines))) as pool:
            futures = [pool.submit(e.stop, 10.0, self._baseline_of(e)) for e in self.engines if e.proc_started]
            reports = [f.result() for f in futures]
        if self._ray is not None:
            self._ray.close()
        self._spawner.shutdown(wait=False)
        return reports

    def __enter__(self) -> Fleet:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
