"""The router's registry of workers (engine URLs), and the health checks that keep it honest.

Anyone may register a worker: a `Fleet` registers its engines as they come up and removes them when
they die, and a framework registers engines over HTTP. The registry needs no Fleet and no event loop:
it is a thread-safe table, read by the router's event loop and written by the fleet's monitor thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

import httpx


def normalize_url(url: str) -> str:
    """`http://host:port` without a trailing slash; a bare `host:port` gets `http://`."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = f"http://{url}"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.port is None:
        raise ValueError(f"worker url {url!r} must look like http://host:port")
    try:
        httpx.Request("GET", url)
    except Exception as error:  # noqa: BLE001 - httpx raises several kinds (InvalidURL, IDNA's codepoint errors)
        raise ValueError(f"worker url {url!r} cannot be requested: {error}") from None
    return url


@dataclass
class Worker:
    id: str
    url: str
    worker_type: str = "regular"
    engine: int | None = None  # the fleet's engine index, when a fleet registered it
    is_healthy: bool = False
    outstanding: int = 0  # requests sent and not yet answered
    served: int = 0  # requests sent to it
    failures: int = 0  # requests that failed on it (transport errors and timeouts)
    retries: int = 0  # requests that failed on it before their first byte and went to another worker
    failed_checks: int = 0  # consecutive failed health checks
    last_turn: int = field(default=0, repr=False)  # the registry's count of acquisitions when it was last picked

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "last_turn"}


def worker_id(url: str) -> str:
    """Stable across re-registration of the same URL, so a client may keep the id it was given."""
    return hashlib.sha1(url.encode()).hexdigest()[:12]


class WorkerRegistry:
    def __init__(self):
        self._workers: dict[str, Worker] = {}
        self._lock = threading.Lock()
        self._turns = 0

    def add(self, url: str, worker_type: str = "regular", engine: int | None = None,
            healthy: bool = False) -> Worker:
        """Register `url` (idempotent). A worker nobody vouched for serves once a health check passes."""
        url = normalize_url(url)
        with self._lock:
            worker = self._workers.get(url)
            if worker is None:
                worker = self._workers[url] = Worker(worker_id(url), url, worker_type, engine, healthy)
            elif healthy:
                worker.is_healthy, worker.failed_checks = True, 0
            return worker

    def remove(self, key: str) -> Worker | None:
        """Remove by id or URL; returns what was removed."""
        with self._lock:
            worker = self._find(key)
            if worker is not None:
                del self._workers[worker.url]
            return worker

    def get(self, key: str) -> Worker | None:
        with self._lock:
            return self._find(key)

    def _find(self, key: str) -> Worker | None:
        if key in self._workers:
            return self._workers[key]
        try:
            return self._workers.get(normalize_url(key)) or next(
                (w for w in self._workers.values() if w.id == key), None)
        except ValueError:
            return next((w for w in self._workers.values() if w.id == key), None)

    def all(self) -> list[Worker]:
        with self._lock:
            return list(self._workers.values())

    def healthy(self) -> list[Worker]:
        with self._lock:
            return [w for w in self._workers.values() if w.is_healthy]

    def acquire(self, exclude: set[str]) -> Worker | None:
        """The healthy worker with the fewest outstanding requests, now counted busy; among equals the one picked
        longest ago (not the one that served fewest: a worker added late would take every request until it
        caught up)."""
        with self._lock:
            candidates = [w for w in self._workers.values() if w.is_healthy and w.url not in exclude]
            if not candidates:
                return None
            worker = min(candidates, key=lambda w: (w.outstanding, w.last_turn))
            self._turns += 1
            worker.last_turn = self._turns
            worker.outstanding += 1
            worker.served += 1
            return worker

    def release(self, worker: Worker) -> None:
        with self._lock:
            worker.outstanding -= 1

    def record_failure(self, worker: Worker, retried: bool, unreachable: bool) -> None:
        """A request failed on `worker`; when it could not even connect, it leaves the rotation at once."""
        with self._lock:
            worker.failures += 1
            worker.retries += int(retried)
            if unreachable:
                worker.is_healthy = False

    def record_check(self, worker: Worker, ok: bool, failures_to_evict: int) -> bool:
        """Returns whether this check took the worker out of the rotation."""
        with self._lock:
            if ok:
                worker.is_healthy, worker.failed_checks = True, 0
                return False
            worker.failed_checks += 1
            evicted = worker.is_healthy and worker.failed_checks >= failures_to_evict
            if evicted:
                worker.is_healthy = False
            return evicted


class HealthChecker:
    """GET /health on every worker every `interval_s`, each with its own `timeout_s`: a worker that
    fails `failures_to_evict` checks in a row (dead, or hung: SIGSTOP, a stuck event loop) leaves the
    rotation; one good answer brings it back."""

    def __init__(self, registry: WorkerRegistry, interval_s: float = 1.0, timeout_s: float = 2.0,
                 failures_to_evict: int = 2, on_evict: Callable[[Worker], None] = lambda worker: None):
        self.registry, self.interval_s, self.failures_to_evict = registry, interval_s, failures_to_evict
        self.on_evict = on_evict
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s))

    async def check(self, worker: Worker) -> bool:
        try:
            ok = (await self.client.get(f"{worker.url}/health")).status_code == 200
        except Exception:  # noqa: BLE001 - whatever fails one worker's check must not end the checks of all
            ok = False
        if self.registry.record_check(worker, ok, self.failures_to_evict):
            self.on_evict(worker)
        return ok

    async def run(self) -> None:
        while True:
            await asyncio.gather(*(self.check(w) for w in self.registry.all()))
            await asyncio.sleep(self.interval_s)

    async def aclose(self) -> None:
        await self.client.aclose()
