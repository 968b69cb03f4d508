"""A fleet of TP engines: placed by one plan, started K at a time, watched, restarted, torn down.

    with Fleet(FleetConfig(model="m", engines=4, tp_size=2, device="cuda")) as fleet:
        print(fleet.urls)

Engines run as local processes by default, or inside Ray actors (backend="ray"). A backend makes
the placement plan, claims its GPUs and hands out engine handles (tpfleet.fleet.handle); this
module schedules, supervises and diagnoses through those interfaces alone, whichever backend it is.
"""

from __future__ import annotations

import importlib
import logging
import shutil
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tpfleet.config import PLACEMENT_FIELDS, EngineConfig
from tpfleet.fleet.diagnostics import EngineFailure
from tpfleet.fleet.handle import EngineHandle, EventSink, FleetBackend, State, TeardownReport
from tpfleet.fleet.placement import PlacementPlan
from tpfleet.fleet.workers import WorkerRegistry

log = logging.getLogger("tpfleet.fleet")

BACKENDS = {"local": "tpfleet.fleet.local_backend:LocalBackend", "ray": "tpfleet.fleet.ray_backend:RayBackend"}
FLEET_FIELDS = ("model", "tp_size", "device")  # EngineConfig fields that FleetConfig holds itself


@dataclass
class FleetConfig:
    model: str
    engines: int = 1
    tp_size: int = 1
    device: str = "cpu"
    engine: dict = field(default_factory=dict)  # every other EngineConfig field to set, e.g. {"kv_cache_tokens": 4096}
    gpus: list[str] | None = None  # indices into this process's visible GPUs, or UUIDs
    backend: str = "local"  # "local" or "ray"
    max_concurrent_starts: int = 1
    startup_timeout_s: float = 600.0
    log_dir: str | None = None  # None: a fresh temporary directory, removed by a stop that found nothing wrong
    reap_stale: bool = False
    restart_budget: int = 3
    restart_backoff_s: float = 1.0
    host: str = "127.0.0.1"  # where engines listen; "node": the node's IP (Ray across machines)
    engine_port: int = 0  # where engines listen; 0: each takes a free port the kernel picks
    ray_address: str | None = None
    ray_logical_gpus: bool = False  # CPU engines that still claim GPUs from Ray (tests, dry runs)
    # Ray, into resources the caller owns (a trainer's placement group): engine e's rank r runs on bundle
    # bundle_indices[e * tp_size + r] of `placement_group` (the group, its name or id), asking that bundle for
    # num_gpus_per_actor GPUs (a fraction beside a trainer's actor, e.g. 0.2 beside 0.8).
    placement_group: object | None = None
    bundle_indices: list[int] | None = None
    num_gpus_per_actor: float = 1.0
    colocated_pids: list[int] = field(default_factory=list)  # processes sharing the GPUs on purpose (trainers)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {self.backend!r}")
        if self.engines < 1:
            raise ValueError(f"engines must be at least 1, got {self.engines}")
        if self.max_concurrent_starts < 1:
            raise ValueError("max_concurrent_starts must be at least 1")
        for name in FLEET_FIELDS:
            if name in self.engine:
                raise ValueError(f"engine field {name!r} is FleetConfig.{name}: set it there")
        for name in PLACEMENT_FIELDS:
            if name in self.engine:
                raise ValueError(f"engine field {name!r} comes from the placement plan")
        if self.placement_group is not None:
            if self.backend != "ray":
                raise ValueError("placement_group needs backend='ray'")
            wanted = self.engines * self.tp_size
            if self.bundle_indices is None or len(self.bundle_indices) != wanted:
                raise ValueError(f"bundle_indices: give one bundle per rank of each engine ({self.engines} engines "
                                 f"x TP {self.tp_size} = {wanted}), not {self.bundle_indices!r}")
            if len(set(self.bundle_indices)) != wanted:
                raise ValueError(f"bundle_indices: {self.bundle_indices} names a bundle twice")
        elif self.bundle_indices is not None:
            raise ValueError("bundle_indices needs placement_group")
        if not 0 < self.num_gpus_per_actor <= 1:
            raise ValueError(f"num_gpus_per_actor must be in (0, 1], not {self.num_gpus_per_actor}")
        self.engine_config([])  # a field that is not an EngineConfig field, or a bad value, fails here

    def engine_config(self, gpu_uuids: list[str], index: int = 0) -> EngineConfig:
        """The whole configuration of engine `index`, whose ranks run on `gpu_uuids` (empty on CPUs). Engine i
        seeds its generators with seed + i: with one seed, every engine would draw the same noise, and the
        samples of a group spread over the fleet would repeat one another."""
        return EngineConfig.from_dict({**self.engine, "model": str(self.model), "tp_size": self.tp_size,
                                       "device": self.device, "gpu_uuids": list(gpu_uuids),
                                       "seed": self.engine.get("seed", EngineConfig.seed) + index})


def make_backend(cfg: FleetConfig, log_dir: Path, on_event: EventSink) -> FleetBackend:
    module, _, name = BACKENDS[cfg.backend].partition(":")
    return getattr(importlib.import_module(module), name)(cfg, log_dir, on_event)


@dataclass
class EngineInfo:
    engine: int
    gpus: str
    url: str | None
    startup_s: float | None
    state: str  # "failed": down after its last restart failed or its budget was spent
    restarts: int = 0
    failure: str | None = None  # why it last went down, if it ever did


class Fleet:
    def __init__(self, cfg: FleetConfig, on_event: EventSink | None = None):
        self.cfg = cfg
        self.on_event = on_event or (lambda engine, event, info: None)
        self.log_dir = Path(cfg.log_dir or tempfile.mkdtemp(prefix="tpfleet-logs-"))
        self.backend = make_backend(cfg, self.log_dir, self._event)
        self.plan: PlacementPlan | None = None
        self.engines: list[EngineHandle] = []
        self.workers = WorkerRegistry()  # what a router in front of this fleet sends traffic to
        self.restarts: dict[int, int] = {}
        self.failures: list[EngineFailure] = []  # every death while serving and every failed restart, in order
        self.gpu_baseline: dict[str, int] = {}
        self.timeline: list[tuple[float, int, str]] = []  # (time, engine, event): start-up order, for audits
        self.max_starting_seen = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None
        # Parent-death signals follow the thread that spawned a process: spawn from one that lives as
        # long as the fleet, whichever thread of the caller's calls start().
        self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tpfleet-spawner")

    # --- start ------------------------------------------------------------------------------------

    def _event(self, engine: int, event: str, info: dict) -> None:
        with self._lock:
            self.timeline.append((time.monotonic(), engine, event))
        self.on_event(engine, event, info)

    def start(self) -> list[EngineInfo]:
        cfg = self.cfg
        starting: dict[Future, EngineHandle] = {}
        waiters = ThreadPoolExecutor(max_workers=cfg.max_concurrent_starts, thread_name_prefix="tpfleet-wait")
        try:
            self.plan = self.backend.plan()
            self.gpu_baseline = self.backend.claim_gpus(cfg.reap_stale, set(cfg.colocated_pids))
            self.engines = [self.backend.engine(index, 0) for index in range(cfg.engines)]
            pending = list(self.engines)
            while pending or starting:
                while pending and len(starting) < cfg.max_concurrent_starts:
                    handle = pending.pop(0)
                    self._spawner.submit(handle.start).result()
                    starting[waiters.submit(handle.wait_ready, cfg.startup_timeout_s)] = handle
                    self.max_starting_seen = max(self.max_starting_seen, len(starting))
                done, _ = wait(starting, return_when=FIRST_COMPLETED)
                for future in done:
                    handle = starting.pop(future)
                    future.result()  # raises EngineFailure
                    self.workers.add(handle.url, engine=handle.engine, healthy=True)
        except BaseException:
            for future in starting:
                future.cancel()
            self.stop()
            raise
        finally:
            waiters.shutdown(wait=False, cancel_futures=True)
        self._monitor = threading.Thread(target=self._watch, name="tpfleet-monitor", daemon=True)
        self._monitor.start()
        return self.info()

    # --- running ----------------------------------------------------------------------------------

    def info(self) -> list[EngineInfo]:
        last = {failure.engine: failure.reason for failure in self.failures}
        left_down = {e.engine for e in self.engines if e.state is State.STOPPED and e.engine in last}
        return [EngineInfo(e.engine, e.placement.describe(), e.url, e.ready_s,
                           State.FAILED.value if e.engine in left_down and not self._stop.is_set() else e.state.value,
                           self.restarts.get(e.engine, 0), last.get(e.engine)) for e in self.engines]

    @property
    def urls(self) -> list[str]:
        return [e.url for e in self.engines if e.state is State.READY]

    def healthy(self) -> list[EngineHandle]:
        return [e for e in self.engines if e.state is State.READY]

    def _watch(self) -> None:
        """Take dead engines out of rotation, diagnose them, restart within budget with backoff."""
        while not self._stop.wait(0.5):
            for position, handle in enumerate(list(self.engines)):
                if handle.state is not State.READY or handle.poll() is not State.FAILED:
                    continue
                failure = handle.failure("the engine died while serving")
                self.failures.append(failure)
                log.error("%s", failure)
                self._event(handle.engine, "died", {"reason": failure.reason})
                self.workers.remove(handle.url)
                handle.stop(gpu_baseline=self._baseline_of(handle))
                self._restart(position, handle.engine)

    def _restart(self, position: int, engine: int) -> None:
        """New engines for a dead one, with exponential backoff, until one is ready or the budget is spent."""
        while self.restarts.get(engine, 0) < self.cfg.restart_budget:
            done = self.restarts.get(engine, 0)
            if self._stop.wait(self.cfg.restart_backoff_s * 2 ** done):
                return
            self.restarts[engine] = done + 1
            fresh = self.backend.engine(engine, done + 1)
            self.engines[position] = fresh
            self._spawner.submit(fresh.start).result()
            try:
                fresh.wait_ready(self.cfg.startup_timeout_s)
                self.workers.add(fresh.url, engine=engine, healthy=True)
                return
            except EngineFailure as failure:
                self.failures.append(failure)
                log.error("restart %d of engine %d failed:\n%s", done + 1, engine, failure)
                fresh.stop(gpu_baseline=self._baseline_of(fresh))
        log.error("engine %d is out of restarts (%d); leaving it down", engine, self.cfg.restart_budget)

    def _baseline_of(self, handle: EngineHandle) -> dict[str, int]:
        return {u: self.gpu_baseline[u] for u in handle.placement.uuids if u in self.gpu_baseline}

    def broadcast(self, path: str, body: dict | None = None, timeout: float = 300) -> list[dict]:
        """POST to every serving engine; returns each engine's JSON answer with its `http_status`, or the
        `error` that kept it from answering (an engine that died meanwhile): one engine's failure never
        keeps the others from being posted to."""
        out = []
        for handle in self.healthy():
            try:
                response = httpx.post(f"{handle.url}{path}", json=body or {}, timeout=timeout)
            except httpx.HTTPError as error:
                out.append({"engine": handle.engine, "error": f"{type(error).__name__}: {error}"})
                continue
            is_json = response.headers.get("content-type", "").startswith("application/json")
            out.append({"engine": handle.engine, **(response.json() if is_json else {}),
                        "http_status": response.status_code})
        return out

    # --- stop -------------------------------------------------------------------------------------

    def stop(self) -> list[TeardownReport]:
        self._stop.set()
        for worker in self.workers.all():
            if worker.engine is not None:
                self.workers.remove(worker.url)
        if self._monitor is not None and self._monitor is not threading.current_thread():
            self._monitor.join(timeout=30)
        with ThreadPoolExecutor(max_workers=max(1, len(self.engines))) as pool:
            futures = [pool.submit(e.stop, 10.0, self._baseline_of(e)) for e in self.engines if e.proc_started]
            reports = [f.result() for f in futures]
        self.backend.close()
        self._spawner.shutdown(wait=False)
        if self.cfg.log_dir is None and not self.failures and not any(r.leftover for r in reports):
            shutil.rmtree(self.log_dir, ignore_errors=True)
        return reports

    def __enter__(self) -> Fleet:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
