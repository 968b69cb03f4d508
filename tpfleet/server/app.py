"""The HTTP API: SGLang's native routes (those RL frameworks drive, see rl-rollout-api.md) plus the
OpenAI routes from openai_api.py. Every POST answers JSON, `{"success", "message"}` unless it says more."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response

from tpfleet import __version__
from tpfleet.engine.sequence import InvalidRequest, SamplingParams
from tpfleet.server.async_engine import AsyncEngine, EngineUnavailable
from tpfleet.server.generate_api import generate_router
from tpfleet.server.guard import install_guards
from tpfleet.server.http_utils import (JSONBodyMiddleware, error_response, install_error_handlers, last_output,
                                       validation_error_response)
from tpfleet.server.openai_api import openai_router
from tpfleet.server.protocol import (
    AbortRequest,
    ContinueRequest,
    MemoryOccupationRequest,
    PauseRequest,
    WeightVersionRequest,
)
from tpfleet.server.weights_api import weights_router


def create_app(aengine: AsyncEngine, server_args: dict, on_ready: Callable[[], None] | None = None) -> FastAPI:
    """The app owns the engine: its shutdown stops every rank, whatever stopped the server.
    `on_ready` runs once the server accepts requests."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if on_ready is not None:
            on_ready()
        yield
        await asyncio.to_thread(aengine.shutdown)

    app = FastAPI(title="tpfleet", version=__version__, lifespan=lifespan)
    app.state.aengine = aengine
    app.state.served_model_name = server_args.get("served_model_name") or server_args["model"]
    app.state.created = int(time.time())  # /v1/models' "created": when this server started
    engine = aengine.engine

    @app.exception_handler(RequestValidationError)
    async def _bad_body(request: Request, exc: RequestValidationError):
        return validation_error_response(exc)

    @app.exception_handler(InvalidRequest)
    async def _invalid(request: Request, exc: InvalidRequest):
        return error_response(400, str(exc), exc.field)

    @app.exception_handler(EngineUnavailable)
    async def _unavailable(request: Request, exc: EngineUnavailable):
        return error_response(503, f"engine unavailable: {exc}")

    install_error_handlers(app)

    @app.get("/health")
    async def health():
        return Response(status_code=200 if aengine.alive else 503)

    @app.get("/health_generate")
    async def health_generate():
        params = SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True)
        try:
            stream = aengine.generate([0], params, rid=f"health-{time.monotonic_ns()}", stream=False, probe=True)
            await asyncio.wait_for(last_output(stream), timeout=30)
        except (EngineUnavailable, asyncio.TimeoutError) as e:
            return error_response(503, f"generation failed: {e!r}")
        return Response(status_code=200)

    @app.get("/model_info")
    @app.get("/get_model_info")
    async def model_info():
        config = engine.model_config
        return {"model_path": engine.model_path, "tokenizer_path": server_args["model"], "is_generation": True,
                "weight_version": engine.weight_version, "has_image_understanding": False,
                "has_audio_understanding": False, "preferred_sampling_params": None,
                "max_context_length": engine.context_length, "vocab_size": config.vocab_size,
                "served_model_name": app.state.served_model_name}

    @app.get("/server_info")
    @app.get("/get_server_info")
    async def server_info():
        state = aengine.snapshot()
        on_gpu = server_args.get("device") == "cuda"
        device_ids = server_args.get("device_ids") or [0]
        public = {key: value for key, value in server_args.items() if "api_key" not in key}  # never the keys
        return {**public, "version": __version__, **_sglang_server_args(server_args, engine, on_gpu, device_ids),
                "num_running_reqs": state.num_running_reqs, "num_waiting_reqs": state.num_waiting_reqs,
                "weight_version": state.weight_version, "paused": state.paused,
                "kv_cache_usage": state.kv_cache_usage, "num_kv_blocks": state.num_kv_blocks,
                "max_total_num_tokens": state.max_total_num_tokens, "num_preemptions": state.num_preemptions,
                "engine_alive": aengine.alive}

    @app.get("/v1/loads")
    async def loads():
        return {"loads": [await aengine.run_on_engine(aengine.loads)]}

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache():
        if await aengine.run_on_engine(engine.flush_cache):
            return {"success": True, "message": "Cache flushed."}
        return error_response(400, "cannot flush the cache while requests are running")

    @app.post("/abort_request")
    async def abort_request(req: AbortRequest):
        if req.abort_all:
            aengine.abort_all()
            return {"success": True, "message": "aborted every request"}
        if not req.rid:
            raise InvalidRequest("rid", "give a request id, or abort_all: true")
        # As in SGLang an unknown id is no error (it may just have finished), but the body says so.
        if aengine.abort(req.rid):
            return {"success": True, "message": f"aborted request {req.rid!r}"}
        return {"success": False, "message": f"no request {req.rid!r} is running"}

    @app.post("/pause_generation")
    async def pause_generation(req: PauseRequest | None = None):
        mode = (req.mode if req is not None else None) or "abort"
        await aengine.pause_generation(mode)
        return {"status": "ok", "success": True, "message": f"Generation paused (mode {mode})."}

    @app.post("/continue_generation")
    async def continue_generation(req: ContinueRequest | None = None):
        await aengine.continue_generation()
        return {"status": "ok", "success": True, "message": "Generation continued."}

    @app.post("/update_weight_version")
    async def update_weight_version(req: WeightVersionRequest):
        if req.abort_all_requests:
            aengine.abort_all()
        await aengine.run_on_engine(lambda: engine.set_weight_version(req.new_version), update="label")
        return {"success": True, "message": f"weight version set to {req.new_version!r}",
                "new_version": req.new_version}

    @app.get("/get_weight_version")
    async def get_weight_version():
        return {"weight_version": engine.weight_version}

    # --- colocation with a trainer: give device memory back and take it again ---------------------

    @app.post("/release_memory_occupation")
    async def release_memory(req: MemoryOccupationRequest | None = None):
        tags = (req or MemoryOccupationRequest()).selected
        ranks = await aengine.run_on_engine(lambda: engine.release_memory(tags))
        return {"success": True, "message": f"released {', '.join(tags)}", "released": tags, "ranks": ranks,
                "released_tensor_bytes": sum(r["released_tensor_bytes"] for r in ranks),
                "freed_bytes": sum(r["device_freed_bytes"] for r in ranks)}

    @app.post("/resume_memory_occupation")
    async def resume_memory(req: MemoryOccupationRequest | None = None):
        tags = (req or MemoryOccupationRequest()).selected
        ranks = await aengine.run_on_engine(lambda: engine.resume_memory(tags))
        return {"success": True, "message": f"resumed {', '.join(tags)}", "resumed": tags, "ranks": ranks}

    @app.get("/metrics")
    async def metrics():
        # the engine's gauges as they are now: requests also end between steps (aborts, a pause)
        aengine.metrics.set_engine_state(aengine.snapshot())
        return Response(aengine.metrics.render(), media_type="text/plain; version=0.0.4")

    app.include_router(generate_router(aengine))
    app.include_router(weights_router(aengine))
    app.include_router(openai_router())
    app.add_middleware(JSONBodyMiddleware)
    install_guards(app, server_args)
    return app


def _sglang_server_args(server_args: dict, engine, on_gpu: bool, device_ids: list[int]) -> dict:
    """The engine's settings under SGLang's names, which external-engine mode compares with its own."""
    return {"model_path": engine.model_path, "tp_size": server_args["tp_size"], "dp_size": 1, "pp_size": 1,
            "ep_size": server_args.get("ep_size", 1), "num_gpus": server_args["tp_size"] if on_gpu else 0,
            "enable_memory_saver": bool(server_args.get("enable_memory_saver", False)),
            "enable_return_routed_experts": bool(server_args.get("enable_return_routed_experts", False)),
            "disaggregation_mode": "null", "host": server_args.get("host"), "port": server_args.get("port"),
            "nnodes": 1, "node_rank": 0, "base_gpu_id": device_ids[0],
            "mem_fraction_static": server_args.get("mem_fraction_static"), "context_length": engine.context_length}
