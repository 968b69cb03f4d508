"""One front door for a fleet: the engines' /generate and /v1 API, spread by least outstanding work.

Only engines the fleet reports healthy receive traffic. A non-streaming request whose engine
drops the connection (it died) is retried once on another engine; a stream cannot be replayed
and ends with an error event instead.
"""

from __future__ import annotations

import json
import threading
from collections import defaultdict

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tpfleet.fleet.fleet import Fleet
from tpfleet.server.http_utils import JSONBodyMiddleware, error_response

FORWARDED = ("/generate", "/v1/completions", "/v1/chat/completions")


class Router:
    def __init__(self, fleet: Fleet):
        self.fleet = fleet
        self.outstanding: dict[int, int] = defaultdict(int)
        self.served: dict[int, int] = defaultdict(int)
        self._lock = threading.Lock()
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10))

    def pick(self, exclude: set[int] = frozenset()):
        with self._lock:
            candidates = [e for e in self.fleet.healthy() if e.engine not in exclude]
            if not candidates:
                return None
            eng = min(candidates, key=lambda e: (self.outstanding[e.engine], self.served[e.engine]))
            self.outstanding[eng.engine] += 1
            self.served[eng.engine] += 1
            return eng

    def done(self, eng) -> None:
        with self._lock:
            self.outstanding[eng.engine] -= 1

    async def forward(self, path: str, body: bytes, stream: bool):
        tried: set[int] = set()
        while True:
            eng = self.pick(tried)
            if eng is None:
                return error_response(503, "no healthy engine" + (" left to retry on" if tried else ""))
            tried.add(eng.engine)
            url = f"{eng.url}{path}"
            if stream:
                return StreamingResponse(self._stream(eng, url, body), media_type="text/event-stream")
            try:
                r = await self.client.post(url, content=body, headers={"content-type": "application/json"})
            except httpx.TransportError:
                continue  # the engine went away mid-request: the monitor will take it out; try another
            finally:
                self.done(eng)
            return Response(r.content, r.status_code, media_type=r.headers.get("content-type"))

    async def _stream(self, eng, url: str, body: bytes):
        try:
            async with self.client.stream("POST", url, content=body,
                                          headers={"content-type": "application/json"}) as r:
                async for chunk in r.aiter_raw():
                    yield chunk
        except httpx.TransportError as e:
            yield f"data: {json.dumps({'error': {'message': f'engine {eng.engine} failed mid-stream: {e}'}})}\n\n"
        finally:
            self.done(eng)


def create_router_app(fleet: Fleet) -> FastAPI:
    router = Router(fleet)
    app = FastAPI(title="tpfleet router")
    app.state.router = router

    @app.get("/health")
    async def health():
        return Response(status_code=200 if fleet.healthy() else 503)

    @app.get("/fleet")
    async def fleet_info():
        return {"engines": [vars(i) for i in fleet.info()], "outstanding": dict(router.outstanding),
                "served": dict(router.served)}

    @app.get("/v1/models")
    async def models():
        eng = next(iter(fleet.healthy()), None)
        if eng is None:
            return error_response(503, "no healthy engine")
        return JSONResponse((await router.client.get(f"{eng.url}/v1/models")).json())

    for path in FORWARDED:
        async def handler(request: Request, path=path):
            body = await request.body()
            try:
                stream = bool(json.loads(body or b"{}").get("stream"))
            except (json.JSONDecodeError, AttributeError):
                stream = False  # let the engine produce the proper 400
            return await router.forward(path, body, stream)

        app.add_api_route(path, handler, methods=["POST"])
    app.add_middleware(JSONBodyMiddleware)
    return app
