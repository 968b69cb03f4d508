"""The router's HTTP routes: both worker-registration APIs, the engine routes, health and metrics.

Workers are registered sglang-router style (`POST /workers`, `GET /workers`, `DELETE /workers/{id}`)
or Miles style (`POST /add_worker?url=`, `GET /list_workers`, `POST /remove_worker?url=`); both
edit the same registry.
"""

from __future__ import annotations

import hmac
import json

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from tpfleet.fleet.router import BROADCAST_ROUTES, GENERATION_ROUTES, ONE_WORKER_GETS, PER_ENGINE_ROUTES, Router
from tpfleet.fleet.workers import Worker
from tpfleet.server.guard import bearer_token
from tpfleet.server.http_utils import error_response


def add_routes(app: FastAPI, router: Router) -> None:
    registry = router.registry
    admin_key = router.config.admin_api_key

    def refused(request: Request) -> JSONResponse | None:
        """Changing the registry decides where prompts and weights go: with a key set, only its holder may."""
        if admin_key is None:
            return None
        given = bearer_token(request.headers.raw)
        if given is not None and hmac.compare_digest(given.encode("latin-1"), admin_key.encode()):
            return None
        return error_response(401, "registering or removing workers needs the router's admin key "
                                   "(Authorization: Bearer ...)", "authorization")

    async def register(url: str | None, worker_type: str | None) -> JSONResponse:
        if not isinstance(url, str) or not url:
            return error_response(400, "url: give the worker's URL, e.g. http://10.0.0.2:30000", "url")
        if worker_type not in (None, "regular"):
            return error_response(400, f"worker_type: only 'regular' workers are supported, not {worker_type!r} "
                                       "(no prefill/decode disaggregation)", "worker_type")
        try:
            worker = registry.add(url)
        except ValueError as error:
            return error_response(400, f"url: {error}", "url")
        healthy = await router.checker.check(worker)
        return JSONResponse({"success": True, "status": "accepted", "worker_id": worker.id, "id": worker.id,
                             "url": worker.url, "location": f"/workers/{worker.id}", "is_healthy": healthy,
                             "message": f"registered {worker.url}" + ("" if healthy else
                                                                      "; it serves once a health check passes")})

    def unregister(worker: Worker) -> JSONResponse:
        return JSONResponse({"success": True, "id": worker.id, "url": worker.url,
                             "message": f"removed {worker.url}"})

    @app.post("/workers")
    async def add_worker_json(request: Request):
        if (denied := refused(request)) is not None:
            return denied
        try:
            body = json.loads(await request.body() or b"{}")
        except (ValueError, RecursionError) as error:
            return error_response(400, f"malformed JSON body: {error!r}"[:300], "body")
        if not isinstance(body, dict):
            return error_response(400, "body: a JSON object {\"url\": ...} is required", "body")
        return await register(body.get("url"), body.get("worker_type"))

    @app.get("/workers")
    async def list_workers_json():
        workers = registry.all()
        return {"workers": [w.to_dict() for w in workers], "total": len(workers),
                "healthy": sum(w.is_healthy for w in workers)}

    @app.get("/workers/{key:path}")
    async def get_worker(key: str):
        worker = registry.get(key)
        return worker.to_dict() if worker else error_response(404, f"no worker {key!r}", "id")

    @app.delete("/workers/{key:path}")
    async def delete_worker(request: Request, key: str):
        if (denied := refused(request)) is not None:
            return denied
        worker = registry.remove(key)
        return unregister(worker) if worker else error_response(404, f"no worker {key!r}", "id")

    @app.post("/add_worker")
    async def add_worker(request: Request, url: str | None = None):
        if (denied := refused(request)) is not None:
            return denied
        return await register(url, None)

    @app.get("/list_workers")
    async def list_workers():
        return {"urls": [w.url for w in registry.all()]}

    @app.post("/remove_worker")
    async def remove_worker(request: Request, url: str | None = None):
        if (denied := refused(request)) is not None:
            return denied
        if not url:
            return error_response(400, "url: give the worker's URL as ?url=", "url")
        worker = registry.remove(url)
        # Idempotent, so that clients that retry on any non-2xx do not retry a removal that happened.
        return unregister(worker) if worker else {"success": True, "message": f"{url} was not registered"}

    @app.get("/health")
    async def health():
        healthy = len(registry.healthy())
        return Response(status_code=200 if healthy else 503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(router.metrics(), media_type="text/plain; version=0.0.4")

    @app.get("/get_weight_version")
    async def weight_version(request: Request):
        answers = await router.gather_get("/get_weight_version", request)
        if isinstance(answers, Response):
            return answers
        if not answers:
            return error_response(503, "no healthy worker answered")
        versions = {a.get("weight_version") for _, a in answers}
        return {"weight_version": versions.pop() if len(versions) == 1 else None,
                "workers": [{"url": w.url, "weight_version": a.get("weight_version")} for w, a in answers]}

    @app.get("/v1/loads")
    async def loads(request: Request):
        answers = await router.gather_get("/v1/loads", request)
        if isinstance(answers, Response):
            return answers
        return {"loads": [{**load, "url": w.url} for w, a in answers for load in a.get("loads", [])]}

    if router.fleet is not None:
        fleet = router.fleet

        @app.get("/fleet")
        async def fleet_info():
            served: dict[str, int] = {}
            for w in registry.all():
                if w.engine is not None:
                    served[str(w.engine)] = served.get(str(w.engine), 0) + w.served
            return {"engines": [vars(i) for i in fleet.info()], "served": served,
                    "workers": [w.to_dict() for w in registry.all()]}

    for path in PER_ENGINE_ROUTES:
        app.add_api_route(path, _refuse_per_engine(path), methods=["POST"])
    for path in BROADCAST_ROUTES:
        app.add_api_route(path, _to_every_worker(router, path),
                          methods=["GET", "POST"] if path == "/flush_cache" else ["POST"])
    for path in GENERATION_ROUTES:
        app.add_api_route(path, _to_one_worker(router, path), methods=["POST"])
    for path in ONE_WORKER_GETS:
        app.add_api_route(path, _to_one_worker(router, path), methods=["GET"])

    @app.api_route("/{path:path}", methods=["GET", "POST"])
    async def other_engine_route(request: Request, path: str):
        """Any other engine route (/health_generate, /tokenize, ...) goes to one healthy worker."""
        return await router.forward(request, f"/{path}")


def _refuse_per_engine(path: str):
    async def refuse():
        return error_response(400, f"{path} cannot go through the router: every engine needs its own "
                                   "rank_offset in the trainer's group; send it to each engine's own URL "
                                   "(GET /workers lists them)", "path")
    return refuse


def _to_every_worker(router: Router, path: str):
    async def handler(request: Request):
        return await router.broadcast(request, path)
    return handler


def _to_one_worker(router: Router, path: str):
    async def handler(request: Request):
        return await router.forward(request, path)
    return handler
