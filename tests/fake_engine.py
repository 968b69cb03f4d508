"""A tiny stand-in for an engine, for router tests: it answers the engine routes the router uses and can
be told to hang, stall a stream, break a stream or fail a control route.

Run as a script (`python tests/fake_engine.py NAME`) it serves in its own process and prints its URL,
so that a test can SIGSTOP it.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from dataclasses import dataclass, field

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse


@dataclass
class Behaviour:
    hang: bool = False  # nothing answers (a stopped process, a stuck event loop)
    generate_delay_s: float = 0.0
    stream_chunks: int = 3
    stall_stream_after: int | None = None  # chunks sent before the stream goes silent
    break_stream_after: int | None = None  # chunks sent before the connection is dropped
    break_mid_event: bool = False  # ... after the first half of the next event
    api_key: str | None = None  # what GET /v1/loads and /get_weight_version need, as an engine's --api-key
    fail: set[str] = field(default_factory=set)  # control routes that answer 400
    weight_version: str = "default"
    calls: list[tuple[str, dict, str | None]] = field(default_factory=list)  # (path, body, authorization)


def create_fake_engine(name: str, behaviour: Behaviour) -> FastAPI:
    app = FastAPI()

    async def hang_if_told() -> None:
        while behaviour.hang:
            await asyncio.sleep(0.05)

    @app.get("/health")
    async def health():
        await hang_if_told()
        return Response(status_code=200)

    @app.post("/generate")
    async def generate(request: Request):
        body = await request.json()
        behaviour.calls.append(("/generate", body, request.headers.get("authorization")))
        await hang_if_told()
        await asyncio.sleep(behaviour.generate_delay_s)
        if not body.get("stream"):
            return {"text": f"from {name}", "worker": name, "meta_info": {"finish_reason": {"type": "length"}}}

        async def chunks():
            for i in range(behaviour.stream_chunks):
                if behaviour.break_stream_after == i:
                    if behaviour.break_mid_event:
                        yield 'data: {"text": "hal'
                    raise ConnectionResetError("the engine died mid-stream")
                if behaviour.stall_stream_after == i:
                    await asyncio.sleep(3600)
                yield f"data: {json.dumps({'text': 'x' * (i + 1), 'worker': name})}\n\n"
                await asyncio.sleep(0.01)
            yield "data: [DONE]\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream")

    def refused(request: Request) -> JSONResponse | None:
        if behaviour.api_key and request.headers.get("authorization") != f"Bearer {behaviour.api_key}":
            return JSONResponse({"success": False, "message": "needs the API key"}, 401)
        return None

    @app.get("/get_weight_version")
    async def get_weight_version(request: Request):
        return refused(request) or {"weight_version": behaviour.weight_version}

    @app.get("/v1/loads")
    async def loads(request: Request):
        return refused(request) or {"loads": [{"num_running_reqs": 1, "num_waiting_reqs": 0, "num_reqs": 1}]}

    @app.get("/server_info")
    async def server_info():
        return {"tp_size": 1, "worker": name}

    @app.api_route("/{path:path}", methods=["GET", "POST"])
    async def control(request: Request, path: str):
        raw = await request.body()
        body = json.loads(raw) if raw else {}
        behaviour.calls.append((f"/{path}", body, request.headers.get("authorization")))
        await hang_if_told()
        if f"/{path}" in behaviour.fail:
            return JSONResponse({"success": False, "message": f"{name} refused"}, 400)
        if path == "abort_request" and body.get("rid") and body["rid"] != name:
            return {"success": False, "message": f"no request {body['rid']!r} on {name}"}
        said = {"status": "ok"} if path in ("pause_generation", "continue_generation") else {}  # as an engine says
        return {"success": True, "message": f"{name} did {path}", **said}

    return app


class ServedApp:
    """An ASGI app served by uvicorn on 127.0.0.1, a port the kernel picks, in a daemon thread."""

    def __init__(self, app):
        from tpfleet.server.launch import bind_socket, url_of

        self.sock = bind_socket("127.0.0.1", 0)
        self.url = url_of(self.sock)
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)


if __name__ == "__main__":
    from tpfleet.server.launch import bind_socket, url_of

    sock = bind_socket("127.0.0.1", 0)
    print(url_of(sock), flush=True)
    uvicorn.Server(uvicorn.Config(create_fake_engine(sys.argv[1], Behaviour()), log_level="warning")).run(
        sockets=[sock])
