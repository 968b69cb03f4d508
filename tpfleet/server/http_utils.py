"""Pieces both APIs share: JSON errors that name the field, SSE framing, and disconnect handling."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from tpfleet.server.async_engine import EngineUnavailable, RequestOutput

log = logging.getLogger("tpfleet.server")


def error_body(status: int, message: str, param: str | None = None) -> dict:
    """One body for both APIs: OpenAI clients read `error`, SGLang's clients `success` and `message`."""
    kind = "invalid_request_error" if 400 <= status < 500 else "server_error"
    return {"success": False, "message": message,
            "error": {"message": message, "type": kind, "param": param, "code": status}}


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status)


def install_error_handlers(app: FastAPI) -> None:
    """FastAPI's own refusals (an unparsable body, 404, 405) and any failure in a handler, answered in
    `error_response`'s shape: clients read a JSON body whatever went wrong."""

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        cause = exc.__cause__  # why FastAPI could not parse the body: bad UTF-8, too deep, a number too long
        if cause is not None:
            return error_response(exc.status_code, f"body: not a JSON document ({str(cause)[:200]})", "body")
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        return error_response(500, f"{type(exc).__name__}: {exc}")


def validation_error_response(exc: RequestValidationError) -> JSONResponse:
    """Pydantic's first complaint, as `param: message`. Union members' type tags are dropped from the path."""
    err = exc.errors()[0]
    if err.get("type") == "json_invalid":
        return error_response(400, f"malformed JSON body: {err.get('msg')}", "body")
    parts = [str(p) for p in err.get("loc", ()) if p != "body"]
    path = []
    for p in parts:
        if p.isdigit():
            path.append(f"[{p}]")
        elif p[:1].isupper() or p in ("str", "int", "float", "bool", "list[int]", "list[str]", "list[list[int]]"):
            continue
        else:
            path.append(("." if path else "") + p)
    param = "".join(path) or "body"
    return error_response(400, f"{param}: {err.get('msg')}", param)


class JSONBodyMiddleware:
    """Treat every POST body as JSON, as SGLang does: `curl -d '{...}'` sends a form content type."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


def sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


async def merge(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several request streams as outputs arrive, tagging each with its batch index; a stream's
    outputs that queued while the reader was busy come as one (RequestOutput.after)."""
    q: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, it: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in it:
                await q.put((i, out))
        except Exception as e:  # noqa: BLE001 - re-raised in the consumer
            await q.put(e)
        finally:
            await q.put(done)

    tasks = [asyncio.create_task(pump(i, it)) for i, it in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            ready = {}  # index -> its newest output, in the order the indices first came
            for item in [await q.get()] + [q.get_nowait() for _ in range(q.qsize())]:
                if item is done:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    i, out = item
                    ready[i] = out.after(ready[i]) if i in ready else out
            for item in ready.items():
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def last_output(it: AsyncIterator[RequestOutput]) -> RequestOutput:
    out = None
    async for out in it:
        pass
    return out


async def unless_disconnected(request: Request, work: Awaitable):
    """Await `work`, but cancel it (which aborts its requests) if the client goes away first. The
    body is read by now, so the server's next message for this request is its disconnect: waited
    for, not polled, so that hundreds of open requests cost the event loop nothing."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise asyncio.CancelledError("client disconnected")
    finally:
        watcher.cancel()


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def stream_error(exc: Exception) -> str:
    """The event that ends a stream whose engine failed, before its `[DONE]`: the body a request
    without streaming would have been answered with (503 when the engine is dead or shutting down)."""
    if isinstance(exc, EngineUnavailable):
        return sse(error_response(503, f"engine unavailable: {exc}").body.decode())
    log.error("a stream failed", exc_info=exc)
    return sse(error_response(500, f"internal error: {exc!r}").body.decode())
