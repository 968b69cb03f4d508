"""One front door for many engines: generation to one healthy worker, control to every worker.

Generation routes go to the healthy worker with the fewest outstanding requests. A request that fails
before its first byte came back (connection refused or reset: the engine died) is retried on another
worker; after that the client gets a clear error, never a hang or a dropped connection: a JSON 502,
503 or 504 for a plain request, an error event and `data: [DONE]` for a stream. A worker that stops
answering health checks (hung, stopped) leaves the rotation, and the requests it holds are answered
with an error at once rather than after the read timeout.

Control routes go to every registered worker and answer with the merged result. The weight-group
routes are refused: each engine needs its own `rank_offset` in the trainer's group, so they must be
sent to the engines' own URLs, as Miles does. `/update_weights_from_tensor` sends the same body to
every worker, which is right only when every engine receives the same payload.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tpfleet.fleet.workers import HealthChecker, Worker, WorkerRegistry
from tpfleet.server.http_utils import JSONBodyMiddleware, error_response, sse

if TYPE_CHECKING:
    from tpfleet.fleet.fleet import Fleet

GENERATION_ROUTES = ("/generate", "/v1/completions", "/v1/chat/completions")
BROADCAST_ROUTES = ("/abort_request", "/flush_cache", "/pause_generation", "/continue_generation",
                    "/release_memory_occupation", "/resume_memory_occupation", "/update_weights_from_disk",
                    "/update_weights_from_tensor", "/update_weight_version")
PER_ENGINE_ROUTES = ("/init_weights_update_group", "/update_weights_from_distributed",
                     "/destroy_weights_update_group")
ONE_WORKER_GETS = ("/server_info", "/get_server_info", "/model_info", "/get_model_info", "/v1/models")
FORWARDED_HEADERS = ("authorization",)


@dataclass
class RouterConfig:
    read_timeout_s: float = 600.0  # one upstream read; long RL generations stream nothing until they end
    connect_timeout_s: float = 5.0
    health_interval_s: float = 1.0
    health_timeout_s: float = 2.0
    failures_to_evict: int = 2  # consecutive failed health checks
    admin_api_key: str | None = None  # when set, registering and removing workers needs `Bearer <key>`


class WorkerEvicted(Exception):
    pass


class UpstreamError(Exception):
    """A request failed on a worker; `retry` when nothing came back yet and another worker may take it."""

    def __init__(self, status: int, message: str, retry: bool):
        super().__init__(message)
        self.status, self.retry = status, retry


class Router:
    def __init__(self, registry: WorkerRegistry, config: RouterConfig | None = None, fleet: Fleet | None = None):
        self.registry, self.config, self.fleet = registry, config or RouterConfig(), fleet
        cfg = self.config
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(cfg.read_timeout_s, connect=cfg.connect_timeout_s),
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        self.checker = HealthChecker(registry, cfg.health_interval_s, cfg.health_timeout_s, cfg.failures_to_evict,
                                     on_evict=self._evict)
        self._evictions: dict[str, asyncio.Event] = {}

    # --- eviction: in-flight requests of a worker that stopped answering end at once ------------------

    def _eviction(self, worker: Worker) -> asyncio.Event:
        event = self._evictions.get(worker.url)
        if event is None or (event.is_set() and worker.is_healthy):
            event = self._evictions[worker.url] = asyncio.Event()
        return event

    def _evict(self, worker: Worker) -> None:
        self._eviction(worker).set()

    async def _unless_evicted(self, worker: Worker, work: Awaitable):
        event = self._eviction(worker)
        task = asyncio.ensure_future(work)
        waiter = asyncio.ensure_future(event.wait())
        try:
            done, _ = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            if not task.done():
                task.cancel()
        if task in done:
            return task.result()
        raise WorkerEvicted(f"worker {worker.url} stopped answering health checks")

    # --- one worker -----------------------------------------------------------------------------------

    async def forward(self, request: Request, path: str) -> Response:
        """Send the request to one healthy worker, retrying on another while nothing has come back."""
        body = await request.body()
        stream = _wants_stream(body)
        tried: set[str] = set()
        while True:
            worker = self.registry.acquire(tried)
            if worker is None:
                message = "no healthy worker" + (f" left after trying {len(tried)}" if tried else "")
                return _stream_error(503, message) if stream and tried else error_response(503, message)
            tried.add(worker.url)
            try:
                return await self._forward_to(worker, request, path, body, stream)
            except UpstreamError as error:
                self.registry.record_failure(worker, error.retry, unreachable=error.retry)
                if not error.retry:
                    return _stream_error(error.status, str(error)) if stream else error_response(error.status,
                                                                                                 str(error))

    async def _forward_to(self, worker: Worker, request: Request, path: str, body: bytes, stream: bool) -> Response:
        upstream_request = self.client.build_request(request.method, f"{worker.url}{path}",
                                                      params=request.query_params, content=body,
                                                      headers=_headers(request))
        try:
            upstream = await self._upstream(worker, self.client.send(upstream_request, stream=True))
        except BaseException:
            self.registry.release(worker)
            raise
        relayed = False
        try:
            if not (stream and upstream.headers.get("content-type", "").startswith("text/event-stream")):
                content = await self._upstream(worker, upstream.aread())
                return Response(content, upstream.status_code, media_type=upstream.headers.get("content-type"))
            chunks = upstream.aiter_raw()
            first = await self._upstream(worker, anext(chunks, b""))
            relayed = True  # from here on the stream's relay releases the worker and closes the upstream
            return StreamingResponse(self._relay(worker, upstream, first, chunks), upstream.status_code,
                                     media_type="text/event-stream")
        finally:
            if not relayed:
                self.registry.release(worker)
                await upstream.aclose()

    async def _upstream(self, worker: Worker, work: Awaitable):
        """`work` against `worker`, with its failures as UpstreamError."""
        try:
            return await self._unless_evicted(worker, work)
        except WorkerEvicted as error:
            raise UpstreamError(503, str(error), retry=False) from None
        except httpx.ConnectTimeout as error:
            raise UpstreamError(503, f"worker {worker.url} did not accept a connection: {error!r}",
                                retry=True) from None
        except httpx.TimeoutException:
            raise UpstreamError(504, f"worker {worker.url} sent nothing for {self.config.read_timeout_s:g} s "
                                     "(RouterConfig.read_timeout_s)", retry=False) from None
        except httpx.TransportError as error:
            raise UpstreamError(502, f"worker {worker.url} failed: {error!r}", retry=True) from None

    async def _relay(self, worker: Worker, upstream: httpx.Response, first: bytes,
                     chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """Pass the stream through; if it breaks, end it with an error event and [DONE]."""
        try:
            chunk = first
            while chunk:
                yield chunk
                chunk = await self._upstream(worker, anext(chunks, b""))
        except UpstreamError as error:
            self.registry.record_failure(worker, retried=False, unreachable=False)
            yield _error_event(error.status, f"the stream broke after it started: {error}").encode()
        finally:
            self.registry.release(worker)
            await upstream.aclose()

    # --- every worker ---------------------------------------------------------------------------------

    async def broadcast(self, request: Request, path: str) -> JSONResponse:
        """The same request to every registered worker; `success` only when every one succeeded (for an
        abort by rid: when one of them knew the rid)."""
        workers = self.registry.all()
        if not workers:
            return error_response(503, "no worker is registered")
        body = await request.body()
        answers = await asyncio.gather(*(self._send(w, request.method, path, body, _headers(request))
                                         for w in workers))
        by_rid = path == "/abort_request" and _field(body, "rid") and not _field(body, "abort_all")
        ok = [a["success"] for a in answers]
        success = any(ok) if by_rid else all(ok)
        message = f"{sum(ok)} of {len(ok)} workers succeeded"
        failed = [f"{a['url']}: {a['message']}" for a in answers if not a["success"]]
        if failed and not success:
            message += "; " + "; ".join(failed)
        merged = {"success": success, "message": message, "workers": answers}
        if path == "/pause_generation" and success:
            merged["status"] = "ok"
        if success:
            return JSONResponse(merged)
        client_errors = [a["status"] for a in answers if a["status"] and 400 <= a["status"] < 500]
        reached = any(a["status"] for a in answers)
        return JSONResponse(merged, client_errors[0] if client_errors else 502 if reached else 503)

    async def _send(self, worker: Worker, method: str, path: str, body: bytes, headers: dict) -> dict:
        answer = {"id": worker.id, "url": worker.url, "status": None}
        if not worker.is_healthy:
            return {**answer, "success": False, "message": "not sent: the worker is failing health checks"}
        try:
            r = await self._unless_evicted(worker, self.client.request(method, f"{worker.url}{path}", content=body,
                                                                      headers=headers))
        except (httpx.HTTPError, WorkerEvicted) as error:
            return {**answer, "success": False, "message": f"failed: {error!r}"}
        try:
            data = r.json()
        except ValueError:
            data = {"text": r.text[:500]}
        success = r.is_success and not (isinstance(data, dict) and data.get("success") is False)
        message = data.get("message", "") if isinstance(data, dict) else ""
        return {**answer, "status": r.status_code, "success": success, "message": message, "response": data}

    async def gather_get(self, path: str, request: Request) -> list[tuple[Worker, dict]]:
        """GET `path` from every healthy worker; the answers that came back, as (worker, JSON)."""
        workers = self.registry.healthy()
        answers = await asyncio.gather(*(self._send(w, "GET", path, b"", _headers(request)) for w in workers))
        return [(w, a["response"]) for w, a in zip(workers, answers) if a["success"]]

    # --- metrics --------------------------------------------------------------------------------------

    def metrics(self) -> str:
        workers = self.registry.all()
        lines = []
        for name, kind, text, value in (
                ("outstanding", "gauge", "requests sent and not yet answered", lambda w: w.outstanding),
                ("healthy", "gauge", "1 while the worker receives traffic", lambda w: int(w.is_healthy)),
                ("served_total", "counter", "requests sent to the worker", lambda w: w.served),
                ("failures_total", "counter", "requests that failed on the worker", lambda w: w.failures),
                ("retries_total", "counter", "requests retried elsewhere after failing on the worker",
                 lambda w: w.retries)):
            lines += [f"# HELP tpfleet_router_worker_{name} {text}", f"# TYPE tpfleet_router_worker_{name} {kind}"]
            lines += [f'tpfleet_router_worker_{name}{{worker="{w.url}"}} {value(w)}' for w in workers]
        lines += ["# HELP tpfleet_router_workers registered workers", "# TYPE tpfleet_router_workers gauge",
                  f"tpfleet_router_workers {len(workers)}"]
        return "\n".join(lines) + "\n"

    async def aclose(self) -> None:
        await self.client.aclose()
        await self.checker.aclose()


def _headers(request: Request) -> dict[str, str]:
    headers = {"content-type": "application/json"}
    headers.update({k: v for k, v in request.headers.items() if k in FORWARDED_HEADERS})
    return headers


def _field(body: bytes, name: str):
    try:
        data = json.loads(body or b"{}")
    except ValueError:
        return None
    return data.get(name) if isinstance(data, dict) else None


def _wants_stream(body: bytes) -> bool:
    return bool(_field(body, "stream"))


def _error_event(status: int, message: str) -> str:
    kind = "invalid_request_error" if 400 <= status < 500 else "server_error"
    return sse({"error": {"message": message, "type": kind, "code": status}}) + sse("[DONE]")


def _stream_error(status: int, message: str) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        yield _error_event(status, message)

    return StreamingResponse(events(), status, media_type="text/event-stream")


def create_router_app(source: Fleet | WorkerRegistry | None = None, config: RouterConfig | None = None) -> FastAPI:
    """The router's HTTP app over a fleet's registry, a given registry, or (None) an empty one that
    frameworks fill over HTTP."""
    from tpfleet.fleet.router_api import add_routes

    fleet = None if source is None or isinstance(source, WorkerRegistry) else source
    registry = fleet.workers if fleet is not None else source or WorkerRegistry()
    router = Router(registry, config, fleet)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        checks = asyncio.create_task(router.checker.run())
        try:
            yield
        finally:
            checks.cancel()
            await asyncio.gather(checks, return_exceptions=True)
            await router.aclose()

    app = FastAPI(title="tpfleet router", lifespan=lifespan)
    app.state.router = router
    add_routes(app, router)
    app.add_middleware(JSONBodyMiddleware)
    return app
