"""One front door for many engines: generation to one healthy worker, control to every worker.

Generation routes go to the healthy worker with the fewest outstanding requests. A request that fails
before its first byte came back (connection refused or reset: the engine died) is retried on another
worker; after that the client gets a clear error, never a hang or a dropped connection: a JSON 502,
503 or 504 for a plain request, an error event and `data: [DONE]` for a stream. A worker that stops
answering health checks (hung, stopped) leaves the rotation, and the requests it holds are answered
with an error at once rather than left waiting on it.

A client that hangs up before its answer came closes the request upstream too, which the engine takes
as its abort. Bodies over `max_body_bytes` are refused with a 413 before they are read whole, as an
engine refuses them; a stream is relayed event by event, so that an error event after a break is never
glued onto half an event.

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
from tpfleet.server.guard import DEFAULT_MAX_BODY_BYTES, GuardMiddleware, KeyPolicy
from tpfleet.server.http_utils import (JSONBodyMiddleware, error_body, error_response, install_error_handlers, sse,
                                       unless_disconnected)

if TYPE_CHECKING:
    from tpfleet.fleet.fleet import Fleet

GENERATION_ROUTES = ("/generate", "/v1/completions", "/v1/chat/completions")
BROADCAST_ROUTES = ("/abort_request", "/flush_cache", "/pause_generation", "/continue_generation",
                    "/release_memory_occupation", "/resume_memory_occupation", "/update_weights_from_disk",
                    "/update_weights_from_tensor", "/update_weight_version")
PER_ENGINE_ROUTES = ("/init_weights_update_group", "/update_weights_from_distributed",
                     "/destroy_weights_update_group")
ONE_WORKER_GETS = ("/server_info", "/get_server_info", "/model_info", "/get_model_info", "/v1/models")
FORWARDED_HEADERS = (b"authorization",)


@dataclass
class RouterConfig:
    # One upstream read; None waits as long as the engine takes (a long RL generation streams nothing until it
    # ends), health checks catching a dead or hung one.
    read_timeout_s: float | None = None
    connect_timeout_s: float = 5.0
    health_interval_s: float = 1.0
    health_timeout_s: float = 2.0
    failures_to_evict: int = 2  # consecutive failed health checks
    admin_api_key: str | None = None  # when set, registering and removing workers needs `Bearer <key>`
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # an engine's default --max-body-bytes


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
        stream = bool((await _json_object(body)).get("stream"))
        tried: set[str] = set()
        while True:
            worker = self.registry.acquire(tried)
            if worker is None:
                message = "no healthy worker" + (f" left after trying {len(tried)}" if tried else "")
                return _stream_error(503, message) if stream and tried else error_response(503, message)
            tried.add(worker.url)
            try:
                # a client that leaves before its answer came cancels this, closing the request upstream
                return await unless_disconnected(request, self._forward_to(worker, request, path, body, stream))
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
            raise UpstreamError(504, f"worker {worker.url} sent nothing for {self.config.read_timeout_s} s (the "
                                     "router's --read-timeout, RouterConfig.read_timeout_s)", retry=False) from None
        except httpx.TransportError as error:
            raise UpstreamError(502, f"worker {worker.url} failed: {error!r}", retry=True) from None

    async def _relay(self, worker: Worker, upstream: httpx.Response, first: bytes,
                     chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """Pass the stream through, whole events at a time; if it breaks, drop the event it broke in and end
        with an error event and [DONE]."""
        pending = b""
        try:
            chunk = first
            while chunk:
                pending += chunk
                end = _events_end(pending)
                if end:
                    yield pending[:end]
                    pending = pending[end:]
                chunk = await self._upstream(worker, anext(chunks, b""))
            if pending:
                yield pending
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
        headers = _headers(request)
        answers = await asyncio.gather(*(self._send(w, request.method, path, body, headers) for w in workers))
        abort = path == "/abort_request"
        if abort:  # a worker that is down holds nothing left to abort
            answers = [a for a in answers if a["status"]] or answers
        fields = await _json_object(body) if abort else {}
        by_rid = bool(fields.get("rid")) and not fields.get("abort_all")
        ok = [a["success"] for a in answers]
        success = any(ok) if by_rid else all(ok)
        message = f"{sum(ok)} of {len(ok)} workers succeeded"
        failed = [f"{a['url']}: {a['message']}" for a in answers if not a["success"]]
        if failed and not success:
            message += "; " + "; ".join(failed)
        client_errors = [a["status"] for a in answers if a["status"] and 400 <= a["status"] < 500]
        if success or (abort and not client_errors and all(a["status"] for a in answers)):
            # an engine's own answer, plus what every worker's said alike (pause's "status", the new version)
            return JSONResponse({**_said_alike(answers), "success": success, "message": message, "workers": answers})
        status = client_errors[0] if client_errors else 502 if any(a["status"] for a in answers) else 503
        return JSONResponse({**error_body(status, message), "workers": answers}, status)

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

    async def gather_get(self, path: str, request: Request) -> list[tuple[Worker, dict]] | JSONResponse:
        """GET `path` from every healthy worker; the answers that came back, as (worker, JSON), or the first
        refusal of the request itself (a 4xx: a missing API key), passed on as the worker gave it."""
        workers = self.registry.healthy()
        headers = _headers(request)
        answers = await asyncio.gather(*(self._send(w, "GET", path, b"", headers) for w in workers))
        for a in answers:
            if a["status"] and 400 <= a["status"] < 500:
                return JSONResponse(a["response"], a["status"])
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


def _headers(request: Request) -> dict[str, bytes]:
    """The headers an engine reads, as the bytes the client sent (a key need not be ASCII to be refused)."""
    headers = {"content-type": b"application/json"}
    headers.update({k.decode("latin-1"): v for k, v in request.headers.raw if k in FORWARDED_HEADERS})
    return headers


def _said_alike(answers: list[dict]) -> dict:
    """The fields every worker's JSON answer holds with one value, but success and message."""
    responses = [a.get("response") for a in answers]
    if not responses or not all(isinstance(r, dict) for r in responses):
        return {}
    missing = object()
    return {k: v for k, v in responses[0].items()
            if k not in ("success", "message") and all(r.get(k, missing) == v for r in responses[1:])}


PARSED_ON_THREAD = 1 << 20  # bytes: a larger body is parsed off the event loop, which every stream shares


async def _json_object(body: bytes) -> dict:
    """The body's JSON object, parsed once for the fields the router reads; empty where the body is not one
    (the engine says why)."""
    try:
        data = await asyncio.to_thread(json.loads, body) if len(body) > PARSED_ON_THREAD else json.loads(body or b"{}")
    except (ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _events_end(data: bytes) -> int:
    """Where the last whole server-sent event in `data` ends (0: none has)."""
    lf, crlf = data.rfind(b"\n\n"), data.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)


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
    install_error_handlers(app)
    app.add_middleware(JSONBodyMiddleware)
    # No keys here (each engine checks its own), but an engine's body limit, before a body is read whole.
    app.add_middleware(GuardMiddleware, keys=KeyPolicy(None, None), max_body_bytes=router.config.max_body_bytes,
                       count_rejection=lambda reason: None)
    return app
