"""The HTTP API: SGLang-compatible native endpoints plus the OpenAI routes from openai_api.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from tpfleet import __version__
from tpfleet.engine.sequence import InvalidRequest, SamplingParams
from tpfleet.server.async_engine import AsyncEngine, EngineUnavailable, RequestOutput
from tpfleet.server.http_utils import (
    JSONBodyMiddleware,
    error_response,
    last_output,
    merge,
    sse,
    unless_disconnected,
    validation_error_response,
)
from tpfleet.server.openai_api import openai_router
from tpfleet.server.protocol import (
    AbortRequest,
    GenerateRequest,
    MemoryOccupationRequest,
    UpdateWeightsFromDiskRequest,
    UpdateWeightsFromTensorRequest,
)


def meta_info(out: RequestOutput) -> dict:
    return {
        "id": out.rid,
        "prompt_tokens": out.prompt_tokens,
        "completion_tokens": out.completion_tokens,
        "cached_tokens": out.cached_tokens,
        "finish_reason": out.finish_reason,
        "e2e_latency": round(out.e2e_latency, 6),
    }


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
    engine = aengine.engine
    tokenizer = engine.tokenizer

    @app.exception_handler(RequestValidationError)
    async def _bad_body(request: Request, exc: RequestValidationError):
        return validation_error_response(exc)

    @app.exception_handler(InvalidRequest)
    async def _invalid(request: Request, exc: InvalidRequest):
        return error_response(400, str(exc), exc.field)

    @app.exception_handler(EngineUnavailable)
    async def _unavailable(request: Request, exc: EngineUnavailable):
        return error_response(503, f"engine unavailable: {exc}")

    @app.get("/health")
    async def health():
        return Response(status_code=200 if aengine.alive else 503)

    @app.get("/health_generate")
    async def health_generate():
        params = SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True)
        try:
            stream = aengine.generate([0], params, rid=f"health-{time.monotonic_ns()}")
            await asyncio.wait_for(last_output(stream), timeout=30)
        except (EngineUnavailable, asyncio.TimeoutError) as e:
            return error_response(503, f"generation failed: {e!r}")
        return Response(status_code=200)

    @app.get("/get_model_info")
    async def get_model_info():
        mc = engine.model_config
        return {"model_path": server_args["model"], "tokenizer_path": server_args["model"], "is_generation": True,
                "max_context_length": engine.context_length, "vocab_size": mc.vocab_size,
                "served_model_name": app.state.served_model_name}

    @app.get("/get_server_info")
    async def get_server_info():
        state = engine.snapshot()
        return {**server_args, "version": __version__, "num_running_reqs": state.num_running_reqs,
                "num_waiting_reqs": state.num_waiting_reqs, "kv_cache_usage": state.kv_cache_usage,
                "num_kv_blocks": state.num_kv_blocks, "max_total_num_tokens": state.max_total_num_tokens,
                "num_preemptions": state.num_preemptions, "engine_alive": aengine.alive}

    @app.post("/flush_cache")
    async def flush_cache():
        if await aengine.run_on_engine(engine.flush_cache):
            return PlainTextResponse("Cache flushed.\n")
        return error_response(400, "cannot flush the cache while requests are running")

    @app.post("/abort_request")
    async def abort_request(req: AbortRequest):
        if req.abort_all:
            aengine.abort_all()
        elif req.rid:
            aengine.abort(req.rid)
        else:
            raise InvalidRequest("rid", "give a request id, or abort_all: true")
        return Response(status_code=200)

    # --- colocation with a trainer: give GPU memory back, take it again, load new weights ---------

    @app.post("/release_memory_occupation")
    async def release_memory(req: MemoryOccupationRequest):
        ranks = await aengine.run_on_engine(lambda: engine.release_memory(req.tags))
        return {"success": True, "released": req.tags, "ranks": ranks,
                "released_tensor_bytes": sum(r["released_tensor_bytes"] for r in ranks),
                "freed_bytes": sum(r["device_freed_bytes"] for r in ranks)}

    @app.post("/resume_memory_occupation")
    async def resume_memory(req: MemoryOccupationRequest):
        ranks = await aengine.run_on_engine(lambda: engine.resume_memory(req.tags))
        return {"success": True, "resumed": req.tags, "ranks": ranks}

    @app.post("/update_weights_from_disk")
    async def update_weights_from_disk(req: UpdateWeightsFromDiskRequest):
        try:
            ranks = await aengine.run_on_engine(lambda: engine.update_weights_from_disk(req.model_path))
        except (OSError, ValueError, RuntimeError) as e:
            raise InvalidRequest("model_path", str(e).splitlines()[-1]) from None
        return {"success": True, "message": f"loaded {req.model_path}", "ranks": ranks}

    @app.post("/update_weights_from_tensor")
    async def update_weights_from_tensor(req: UpdateWeightsFromTensorRequest):
        n = len(req.serialized_named_tensors)
        if n not in (1, engine.cfg.tp_size):
            raise InvalidRequest("serialized_named_tensors", f"give 1 or {engine.cfg.tp_size} payloads, not {n}")
        try:
            ranks = await aengine.run_on_engine(
                lambda: engine.update_weights_from_tensor(req.serialized_named_tensors))
        except (ValueError, RuntimeError) as e:
            raise InvalidRequest("serialized_named_tensors", str(e).splitlines()[-1]) from None
        return {"success": True, "message": f"{ranks[0]['tensors']} tensors loaded", "ranks": ranks}

    @app.get("/metrics")
    async def metrics():
        return Response(aengine.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/generate")
    async def generate(req: GenerateRequest, request: Request):
        prompts, field, batched = _prompts(req, tokenizer)
        params = [p.to_params() for p in _per_prompt(req.sampling_params, len(prompts), "sampling_params")]
        rids = _per_prompt(req.rid, len(prompts), "rid") if req.rid is not None else [None] * len(prompts)
        if req.rid is not None and len(set(rids)) != len(rids):
            raise InvalidRequest("rid", "request ids in one batch must be distinct")
        # Every prompt is checked before any starts: a bad one in a batch leaves nothing running.
        for i, (ids, p) in enumerate(zip(prompts, params)):
            engine.validate(ids, p, f"{field}[{i}]" if batched else field)
        streams = [aengine.generate(ids, p, rid) for ids, p, rid in zip(prompts, params, rids)]

        if req.stream:
            async def events():
                async for i, out in merge(streams):
                    chunk = {"text": out.text, "output_ids": out.output_ids, "meta_info": meta_info(out)}
                    yield sse({**chunk, "index": i} if batched else chunk)
                yield sse("[DONE]")

            return StreamingResponse(events(), media_type="text/event-stream")

        outs = await unless_disconnected(request, asyncio.gather(*(last_output(s) for s in streams)))
        results = [{"text": o.text, "output_ids": o.output_ids, "meta_info": meta_info(o)} for o in outs]
        return JSONResponse(results if batched else results[0])

    app.include_router(openai_router())
    app.add_middleware(JSONBodyMiddleware)
    return app


def _prompts(req: GenerateRequest, tokenizer) -> tuple[list[list[int]], str, bool]:
    if (req.text is None) == (req.input_ids is None):
        raise InvalidRequest("text", "give exactly one of text and input_ids")
    if req.text is not None:
        batched = isinstance(req.text, list)
        texts = req.text if batched else [req.text]
        if batched and not texts:
            raise InvalidRequest("text", "the batch is empty")
        return [tokenizer(t).input_ids for t in texts], "text", batched
    batched = bool(req.input_ids) and isinstance(req.input_ids[0], list)
    return (req.input_ids if batched else [req.input_ids]), "input_ids", batched


def _per_prompt(value, n: int, field: str) -> list:
    if isinstance(value, list):
        if len(value) != n:
            raise InvalidRequest(field, f"has {len(value)} entries for {n} prompts")
        return value
    return [value] * n
