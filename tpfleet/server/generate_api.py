"""SGLang's native POST /generate.

A request becomes engine requests (one per prompt of a batch, `n` per prompt for parallel sampling,
prompt-major as SGLang orders them), and every engine output becomes SGLang's answer: `text`,
`output_ids` and a `meta_info` with the finish reason, logprobs, weight version and routed experts.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import uuid
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from tpfleet.engine.sequence import InvalidRequest, OutputOptions, SamplingParams
from tpfleet.server.async_engine import AsyncEngine, RequestOutput
from tpfleet.server.guard import RequestLimits, decode_text_field, tokenize_off_loop
from tpfleet.server.http_utils import last_output, merge, sse, stream_error, unless_disconnected
from tpfleet.server.protocol import (
    UNSUPPORTED_GENERATE,
    GenerateRequest,
    SamplingParamsBody,
    check_unsupported,
    output_options,
)


@dataclass
class Job:
    """One engine request of a /generate call."""
    prompt_ids: list[int]
    params: SamplingParams
    options: OutputOptions
    rid: str
    field: str  # where its prompt sits in the request, for error messages


class TokenTexts:
    """Each token's own text, for `return_text_in_logprobs`; decoded once per token id."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self.cache.get(token_id)
        if text is None:
            text = self.cache[token_id] = self.tokenizer.decode([token_id])
        return text


async def plan(req: GenerateRequest, engine, limits: RequestLimits) -> tuple[list[Job], bool]:
    """The engine requests, and whether the answer is a list (a batch, or n > 1 as in SGLang)."""
    check_unsupported(req, UNSUPPORTED_GENERATE)
    prompts, field, batched = await _prompts(req, engine.tokenizer)
    num_prompts = len(prompts)
    sampling = req.sampling_params
    per_prompt = isinstance(sampling, list)
    if per_prompt and len(sampling) != num_prompts:
        raise InvalidRequest("sampling_params", f"has {len(sampling)} entries for {num_prompts} prompts")
    bodies = sampling if per_prompt else [sampling or SamplingParamsBody()] * num_prompts
    num_samples = {body.n if body.n is not None else 1 for body in bodies}
    if len(num_samples) != 1:
        raise InvalidRequest("sampling_params.n", "must be the same for every prompt of a batch")
    n = num_samples.pop()
    if n < 1:
        raise InvalidRequest("sampling_params.n", f"must be >= 1, got {n}")
    limits.check_batch(num_prompts * n, field if n == 1 else "sampling_params.n")
    as_list = batched or n > 1
    rids = _rids(req.rid, num_prompts, n, as_list)
    if req.return_routed_experts and req.routed_experts_start_len is not None:
        for ids in prompts:
            if not 0 <= req.routed_experts_start_len <= len(ids):
                raise InvalidRequest("routed_experts_start_len", f"must be in [0, {len(ids)}] (the prompt length), "
                                                                 f"got {req.routed_experts_start_len}")
    jobs = []
    for index, (ids, body) in enumerate(zip(prompts, bodies)):
        prefix = f"sampling_params[{index}]" if per_prompt else "sampling_params"
        params = body.to_params(len(ids), engine.context_length, engine.model_config.vocab_size, prefix)
        limits.check_stop(params.stop, f"{prefix}.stop")
        options = output_options(req, index, num_prompts)
        where = f"{field}[{index}]" if batched else field
        jobs += [Job(ids, seeded(params, sample), options, rids[index * n + sample], where) for sample in range(n)]
    return jobs, as_list


def seeded(params: SamplingParams, sample: int) -> SamplingParams:
    """The `sample`-th of n samples: a seeded request's samples must differ from each other, yet each
    stays reproducible, so sample i draws with seed + i."""
    if params.seed is None or sample == 0:
        return params
    return dataclasses.replace(params, seed=(params.seed + sample) % 2**63)


async def _prompts(req: GenerateRequest, tokenizer) -> tuple[list[list[int]], str, bool]:
    if (req.text is None) == (req.input_ids is None):
        raise InvalidRequest("text", "give exactly one of text and input_ids")
    if req.text is not None:
        batched = isinstance(req.text, list)
        texts = req.text if batched else [req.text]
        if batched and not texts:
            raise InvalidRequest("text", "the batch is empty")
        decode_text_field(req.text, "text")
        return await tokenize_off_loop(tokenizer, texts), "text", batched
    batched = bool(req.input_ids) and isinstance(req.input_ids[0], list)
    return (req.input_ids if batched else [req.input_ids]), "input_ids", batched


def _rids(rid: str | list[str] | None, num_prompts: int, n: int, as_list: bool) -> list[str]:
    """A request id per engine request. As in SGLang, one string for several becomes a prefix: `<rid>_<i>`."""
    total = num_prompts * n
    if rid is None:
        return [uuid.uuid4().hex for _ in range(total)]
    if isinstance(rid, str):
        return [f"{rid}_{i}" for i in range(total)] if as_list else [rid]
    if len(rid) != num_prompts:
        raise InvalidRequest("rid", f"has {len(rid)} entries for {num_prompts} prompts")
    if len(set(rid)) != len(rid):
        raise InvalidRequest("rid", "request ids in one batch must be distinct")
    return list(rid) if n == 1 else [f"{r}_{sample}" for r in rid for sample in range(n)]


def _entries(logprobs, token_ids, text) -> list[list]:
    return [[lp, tid, text(tid) if text else None] for lp, tid in zip(logprobs, token_ids)]


def _top_entries(tops, text) -> list[list[list] | None]:
    return [[[lp, tid, text(tid) if text else None] for lp, tid in top] if top else None for top in tops]


def answer(out: RequestOutput, job: Job, text: TokenTexts | None, routed_start: int, routed_row_bytes: int) -> dict:
    """SGLang's answer for one engine output (a stream chunk or the final one)."""
    meta = {"id": out.rid, "finish_reason": out.finish_reason, "prompt_tokens": out.prompt_tokens,
            "completion_tokens": out.completion_tokens, "cached_tokens": out.cached_tokens,
            "weight_version": out.weight_version, "e2e_latency": round(out.e2e_latency, 6)}
    options = job.options
    if options.return_logprob:
        start = max(options.logprob_start_len, 0)
        meta["output_token_logprobs"] = _entries(out.output_logprobs, out.output_ids, text)
        meta["input_token_logprobs"] = _entries(out.input_logprobs, job.prompt_ids[start:], text)
        if options.top_logprobs_num > 0:
            meta["output_top_logprobs"] = _top_entries(out.output_top_logprobs, text)
            meta["input_top_logprobs"] = _top_entries(out.input_top_logprobs, text)
    if options.return_routed_experts and out.routed_experts is not None:
        meta["routed_experts"] = base64.b64encode(out.routed_experts[routed_start * routed_row_bytes:]).decode()
    return {"text": out.text, "output_ids": out.output_ids, "meta_info": meta}


def generate_router(aengine: AsyncEngine) -> APIRouter:
    router = APIRouter()
    engine = aengine.engine
    config = engine.model_config
    routed_row_bytes = 4 * config.num_hidden_layers * config.num_experts_per_tok  # int32 per expert choice

    def start(jobs: list[Job], stream: bool):
        streams = []
        try:
            for job in jobs:
                streams.append(aengine.generate(job.prompt_ids, job.params, rid=job.rid, field=job.field,
                                                options=job.options, stream=stream))
        except BaseException:
            for job in jobs[:len(streams)]:
                aengine.abort(job.rid)
            raise
        return streams

    @router.post("/generate")
    async def generate(req: GenerateRequest, request: Request):
        jobs, as_list = await plan(req, engine, request.app.state.request_limits)
        # Every prompt is checked before any starts: a bad one in a batch leaves nothing running.
        for job in jobs:
            engine.validate(job.prompt_ids, job.params, job.field, job.options)
        text = TokenTexts(engine.tokenizer) if req.return_text_in_logprobs else None
        routed_start = req.routed_experts_start_len or 0

        def shape(index: int, out: RequestOutput) -> dict:
            return answer(out, jobs[index], text, routed_start, routed_row_bytes)

        streams = start(jobs, bool(req.stream))
        if req.stream:
            async def events():
                try:
                    async for index, out in merge(streams):
                        chunk = shape(index, out)
                        yield sse({**chunk, "index": index} if as_list else chunk)
                except Exception as exc:  # noqa: BLE001 - the client gets an error event, not a cut connection
                    yield stream_error(exc)
                yield sse("[DONE]")

            return StreamingResponse(events(), media_type="text/event-stream")

        outs = await unless_disconnected(request, asyncio.gather(*(last_output(s) for s in streams)))
        results = [shape(index, out) for index, out in enumerate(outs)]
        return JSONResponse(results if as_list else results[0])

    return router
