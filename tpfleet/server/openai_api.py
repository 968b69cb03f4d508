"""OpenAI-compatible routes: /v1/models, /v1/completions and /v1/chat/completions."""

from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from tpfleet.engine.sequence import InvalidRequest
from tpfleet.server.async_engine import AsyncEngine, RequestOutput
from tpfleet.server.http_utils import last_output, merge, sse, unless_disconnected
from tpfleet.server.protocol import ChatCompletionRequest, CompletionRequest, OpenAISampling

DEFAULT_COMPLETION_TOKENS = 16


def _finish_reason(out: RequestOutput) -> str | None:
    return out.finish_reason["type"] if out.finish_reason else None


def _usage(outs: list[RequestOutput]) -> dict:
    prompt = sum(o.prompt_tokens for o in outs)
    completion = sum(o.completion_tokens for o in outs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(o.cached_tokens for o in outs)}}


def _check_supported(req: OpenAISampling) -> None:
    if req.n != 1:
        raise InvalidRequest("n", "only n=1 is supported")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise InvalidRequest(name, "penalties are not supported; leave at 0")


def _openai_field(e: InvalidRequest) -> InvalidRequest:
    """Engine validation speaks in SGLang's names; translate to the OpenAI request's."""
    field = e.field.removeprefix("sampling_params.").replace("max_new_tokens", "max_tokens")
    return InvalidRequest(field, e.message)


def openai_router() -> APIRouter:
    router = APIRouter(prefix="/v1")

    def start(aengine: AsyncEngine, prompts: list[list[int]], req: OpenAISampling, field: str,
              default_max: int):
        params = req.to_params(default_max)
        try:
            for i, ids in enumerate(prompts):
                aengine.engine.validate(ids, params, field if len(prompts) == 1 else f"{field}[{i}]")
        except InvalidRequest as e:
            raise _openai_field(e) from None
        return [aengine.generate(ids, params) for ids in prompts]

    async def respond(request: Request, streams, req: OpenAISampling, kind: str, model: str,
                      choice, chunk_choice):
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        obj = "chat.completion" if kind == "chat" else "text_completion"
        base = {"id": rid, "created": created, "model": model}
        if not req.stream:
            outs = await unless_disconnected(request, asyncio.gather(*(last_output(s) for s in streams)))
            return JSONResponse({**base, "object": obj, "choices": [choice(i, o) for i, o in enumerate(outs)],
                                 "usage": _usage(outs)})
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        chunk_obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        async def events():
            finals: dict[int, RequestOutput] = {}
            if kind == "chat":
                for i in range(len(streams)):
                    yield sse({**base, "object": chunk_obj, "choices": [
                        {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
            async for i, out in merge(streams):
                if out.finished:
                    finals[i] = out
                yield sse({**base, "object": chunk_obj, "choices": [chunk_choice(i, out)]})
            if include_usage:
                yield sse({**base, "object": chunk_obj, "choices": [], "usage": _usage(list(finals.values()))})
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    @router.get("/models")
    async def models(request: Request):
        app = request.app
        return {"object": "list", "data": [{
            "id": app.state.served_model_name, "object": "model", "created": 0, "owned_by": "tpfleet",
            "max_model_len": app.state.aengine.engine.context_length}]}

    @router.post("/completions")
    async def completions(req: CompletionRequest, request: Request):
        _check_supported(req)
        if req.echo or req.logprobs is not None:
            raise InvalidRequest("echo" if req.echo else "logprobs", "not supported")
        aengine: AsyncEngine = request.app.state.aengine
        tok = aengine.engine.tokenizer
        p = req.prompt
        if isinstance(p, str):
            prompts = [tok(p).input_ids]
        elif p and isinstance(p[0], str):
            prompts = [tok(x).input_ids for x in p]
        elif p and isinstance(p[0], list):
            prompts = list(p)
        else:
            prompts = [p]
        streams = start(aengine, prompts, req, "prompt", DEFAULT_COMPLETION_TOKENS)
        return await respond(
            request, streams, req, "text", req.model or request.app.state.served_model_name,
            lambda i, o: {"index": i, "text": o.text, "logprobs": None, "finish_reason": _finish_reason(o)},
            lambda i, o: {"index": i, "text": o.delta, "logprobs": None, "finish_reason": _finish_reason(o)},
        )

    @router.post("/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        _check_supported(req)
        if req.logprobs:
            raise InvalidRequest("logprobs", "not supported")
        if not req.messages:
            raise InvalidRequest("messages", "must not be empty")
        aengine: AsyncEngine = request.app.state.aengine
        engine = aengine.engine
        tok = engine.tokenizer
        if not getattr(tok, "chat_template", None):
            raise InvalidRequest("messages", "this model's tokenizer has no chat template")
        text = tok.apply_chat_template([m.model_dump(exclude_none=True) for m in req.messages], tokenize=False,
                                       add_generation_prompt=True)
        if req.max_completion_tokens is not None:
            req.max_tokens = req.max_completion_tokens
        prompt = tok(text).input_ids
        # Unset, a chat reply may use whatever context the prompt leaves.
        streams = start(aengine, [prompt], req, "messages", max(1, engine.context_length - 1 - len(prompt)))
        return await respond(
            request, streams, req, "chat", req.model or request.app.state.served_model_name,
            lambda i, o: {"index": i, "message": {"role": "assistant", "content": o.text},
                          "logprobs": None, "finish_reason": _finish_reason(o)},
            lambda i, o: {"index": i, "delta": {"content": o.delta}, "logprobs": None,
                          "finish_reason": _finish_reason(o)},
        )

    return router
