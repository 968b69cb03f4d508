"""OpenAI-compatible routes: /v1/models, /v1/completions and /v1/chat/completions (logprobs and `n` included)."""

from __future__ import annotations

import asyncio
import codecs
import functools
import time
import uuid
from collections.abc import Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from tpfleet.engine.sequence import InvalidRequest, OutputOptions
from tpfleet.server.async_engine import AsyncEngine, RequestOutput
from tpfleet.server.generate_api import seeded
from tpfleet.server.guard import tokenize_off_loop
from tpfleet.server.http_utils import error_response, last_output, merge, sse, stream_error, unless_disconnected
from tpfleet.server.protocol import (UNSUPPORTED_OPENAI, ChatCompletionRequest, CompletionRequest, OpenAISampling,
                                     check_unsupported)

DEFAULT_COMPLETION_TOKENS = 16
MAX_TOP_LOGPROBS = 20


def _finish_reason(out: RequestOutput) -> str | None:
    return out.finish_reason["type"] if out.finish_reason else None


def _usage(outs: dict[int, RequestOutput], n: int) -> dict:
    """Token counts of choices by index (prompt i's j-th sample is choice i*n + j): each prompt counted once."""
    firsts = [o for i, o in outs.items() if i % n == 0]
    prompt = sum(o.prompt_tokens for o in firsts)
    completion = sum(o.completion_tokens for o in outs.values())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(o.cached_tokens for o in firsts)}}


def _openai_field(e: InvalidRequest) -> InvalidRequest:
    """Engine validation speaks in SGLang's names; translate to the OpenAI request's, in the field and the
    message."""
    def openai(text: str) -> str:
        return text.replace("max_new_tokens", "max_tokens").replace("min_new_tokens", "min_tokens")

    return InvalidRequest(openai(e.field.removeprefix("sampling_params.")), openai(e.message))


def _top_logprobs_num(value: int | None, field: str) -> int:
    if value is not None and not 0 <= value <= MAX_TOP_LOGPROBS:
        raise InvalidRequest(field, f"must be in [0, {MAX_TOP_LOGPROBS}], got {value}")
    return value or 0


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE (GPT-2's, Qwen3's) spells each byte as one printable character: the printable Latin-1
    bytes as themselves, the others as the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


BYTE_OF_CHAR = _byte_level_alphabet()


class TokenPieces:
    """Each token as the logprobs show it: its text, or `bytes:\\xNN...` when it holds part of a character, with
    its own bytes (not its text's). One per tokenizer, filled as tokens are first shown."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.backend = tokenizer.backend_tokenizer
        self.added = set(self.backend.get_added_tokens_decoder())
        self.pieces: dict[int, tuple[str, bytes]] = {}

    def __call__(self, token_id: int) -> tuple[str, bytes]:
        if token_id not in self.pieces:
            raw = self._bytes(token_id)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            self.pieces[token_id] = (text, raw)
        return self.pieces[token_id]

    def _bytes(self, token_id: int) -> bytes:
        spelled = self.backend.id_to_token(token_id)
        if spelled is None or token_id in self.added or any(c not in BYTE_OF_CHAR for c in spelled):
            return self.tokenizer.decode([token_id]).encode("utf-8")  # not byte-level: its text is all there is
        return bytes(BYTE_OF_CHAR[c] for c in spelled)


@functools.lru_cache(maxsize=4)
def token_pieces(tokenizer) -> TokenPieces:
    """The engine's tokenizer's pieces, kept across requests."""
    return TokenPieces(tokenizer)


def pieces(tokenizer, req: OpenAISampling) -> TokenPieces | TokenIds:
    return TokenIds(token_pieces(tokenizer)) if req.return_tokens_as_token_ids else token_pieces(tokenizer)


# What a request sets through its own fields, so chat_template_kwargs may not
TEMPLATE_ARGUMENTS = {"messages", "conversation", "tokenize", "add_generation_prompt", "continue_final_message",
                      "tools", "documents", "return_dict"}


class TokenIds:
    """Each token named "token_id:<id>" (vLLM's return_tokens_as_token_ids), its bytes those of its text."""

    def __init__(self, pieces: TokenPieces):
        self.pieces = pieces

    def __call__(self, token_id: int) -> tuple[str, bytes]:
        return f"token_id:{token_id}", self.pieces(token_id)[1]


class LogprobFormat:
    """The logprobs of tokens [start, end) of a request's outputs, in either API's shape."""

    def __init__(self, piece: TokenPieces | TokenIds):
        self.piece = piece
        self.decoders: dict[str, codecs.IncrementalDecoder] = {}  # per output: characters its tokens complete
        self.offsets: dict[str, int] = {}  # per output: characters completed by the tokens shown so far

    def chat(self, out: RequestOutput, start: int, end: int) -> dict:
        def entry(logprob: float, token_id: int) -> dict:
            text, raw = self.piece(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(raw)}

        content = []
        for pos in range(start, end):
            top = out.output_top_logprobs[pos] if pos < len(out.output_top_logprobs) else []
            content.append({**entry(out.output_logprobs[pos], out.output_ids[pos]),
                            "top_logprobs": [entry(lp, tid) for lp, tid in top]})
        return {"content": content}

    def completion(self, out: RequestOutput, start: int, end: int) -> dict:
        """Tokens [start, end) follow those shown before (a stream's earlier chunks, an echoed prompt)."""
        return self._completion(out.rid, out.output_ids[start:end], out.output_logprobs[start:end],
                                out.output_top_logprobs[start:end])

    def prompt(self, out: RequestOutput, prompt_ids: list[int]) -> dict:
        """An echoed prompt's tokens, shown before the output's: the first has no logprob (nothing predicts it)."""
        return self._completion(out.rid, prompt_ids, out.input_logprobs, out.input_top_logprobs)

    def _completion(self, rid: str, ids: list[int], logprobs: list[float | None],
                    tops: list[list[tuple[float, int]]]) -> dict:
        """A token's text_offset counts the characters its predecessors' bytes complete: a character split over
        tokens counts at the token that completes it, and text held back from the stream (a possible stop
        string) counts too. The token itself is always among its top logprobs, as OpenAI's are."""
        decoder = self.decoders.setdefault(rid, codecs.getincrementaldecoder("utf-8")("replace"))
        offset = self.offsets.get(rid, 0)
        padded = [logprobs[i] if i < len(logprobs) else None for i in range(len(ids))]  # a prefill cut short
        tokens, offsets, top_dicts = [], [], []
        for i, token_id in enumerate(ids):
            text, raw = self.piece(token_id)
            tokens.append(text)
            offsets.append(offset)
            offset += len(decoder.decode(raw))
            top = None
            if padded[i] is not None:
                top = {self.piece(tid)[0]: lp for lp, tid in (tops[i] if i < len(tops) else [])}
                top.setdefault(text, padded[i])
            top_dicts.append(top)
        self.offsets[rid] = offset
        return {"tokens": tokens, "token_logprobs": padded, "top_logprobs": top_dicts, "text_offset": offsets}


def openai_router() -> APIRouter:
    router = APIRouter(prefix="/v1")

    def start(request: Request, prompts: list[list[int]], req: OpenAISampling, field: str, default_max: int,
              options: OutputOptions, least_tokens: int = 1):
        """n streams per prompt, prompt-major: choice i*n + j is prompt i's j-th sample."""
        aengine: AsyncEngine = request.app.state.aengine
        limits = request.app.state.request_limits
        n = req.n if req.n is not None else 1
        if n < 1:
            raise InvalidRequest("n", f"must be >= 1, got {n}")
        limits.check_batch(len(prompts) * n, "n" if n > 1 else field)
        try:
            params = req.to_params(default_max)
            if params.max_new_tokens < least_tokens:  # 0 only for an echoed prompt: a prefill-only call
                raise InvalidRequest("max_tokens",
                                     f"must be an integer >= {least_tokens}, got {params.max_new_tokens!r}")
            limits.check_stop(params.stop, "stop")
            for i, ids in enumerate(prompts):
                aengine.engine.validate(ids, params, field if len(prompts) == 1 else f"{field}[{i}]", options)
        except InvalidRequest as e:
            raise _openai_field(e) from None
        return [aengine.generate(ids, seeded(params, sample), options=options, stream=bool(req.stream))
                for ids in prompts for sample in range(n)]

    async def respond(request: Request, streams, req: OpenAISampling, kind: str, model: str,
                      choice: Callable[[int, RequestOutput], dict],
                      chunk_choice: Callable[[int, RequestOutput, int], dict]):
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        obj = "chat.completion" if kind == "chat" else "text_completion"
        base = {"id": rid, "created": created, "model": model}
        n = req.n or 1
        if not req.stream:
            outs = await unless_disconnected(request, asyncio.gather(*(last_output(s) for s in streams)))
            return JSONResponse({**base, "object": obj, "choices": [choice(i, o) for i, o in enumerate(outs)],
                                 "usage": _usage(dict(enumerate(outs)), n)})
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        chunk_obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        async def events():
            finals: dict[int, RequestOutput] = {}
            sent = [0] * len(streams)  # tokens of each choice already streamed
            if kind == "chat":
                for i in range(len(streams)):
                    yield sse({**base, "object": chunk_obj, "choices": [
                        {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
            try:
                async for i, out in merge(streams):
                    if out.finished:
                        finals[i] = out
                    yield sse({**base, "object": chunk_obj, "choices": [chunk_choice(i, out, sent[i])]})
                    sent[i] = len(out.output_ids)
            except Exception as exc:  # noqa: BLE001 - the client gets an error event, not a cut connection
                yield stream_error(exc)
                yield sse("[DONE]")
                return
            if include_usage:
                yield sse({**base, "object": chunk_obj, "choices": [], "usage": _usage(finals, n)})
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    def model_card(app) -> dict:
        return {"id": app.state.served_model_name, "object": "model", "created": app.state.created,
                "owned_by": "tpfleet", "max_model_len": app.state.aengine.engine.context_length}

    @router.get("/models")
    async def models(request: Request):
        return {"object": "list", "data": [model_card(request.app)]}

    @router.get("/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        if model_id != request.app.state.served_model_name:
            return error_response(404, f"The model {model_id!r} does not exist", param="model")
        return model_card(request.app)

    @router.post("/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_unsupported(req, UNSUPPORTED_OPENAI, api="OpenAI")
        aengine: AsyncEngine = request.app.state.aengine
        tok = aengine.engine.tokenizer
        p = req.prompt
        if isinstance(p, str):
            texts = [p]
        elif p and isinstance(p[0], str):
            texts = list(p)
        else:
            texts = None
        if texts is not None:
            prompts = await tokenize_off_loop(tok, texts, "prompt")
        else:
            prompts = list(p) if p and isinstance(p[0], list) else [p]
        echo, wants_logprobs = bool(req.echo), req.logprobs is not None
        options = OutputOptions(return_logprob=wants_logprobs, top_logprobs_num=_top_logprobs_num(req.logprobs,
                                                                                                  "logprobs"),
                                logprob_start_len=0 if echo and wants_logprobs else -1)
        streams = start(request, prompts, req, "prompt", DEFAULT_COMPLETION_TOKENS, options, 0 if echo else 1)
        fmt = LogprobFormat(pieces(tok, req))
        n = req.n or 1
        echoed: set[int] = set()

        def shown(i: int, o: RequestOutput, start: int, text: str) -> dict:
            """Choice i's text and logprobs from token `start` on; with echo, its prompt's before the first."""
            first = echo and i not in echoed
            echoed.add(i)
            if first:
                text = (texts[i // n] if texts is not None else tok.decode(prompts[i // n])) + text
            logprobs = None
            if wants_logprobs:  # the prompt's first: the output's text offsets follow its characters
                head = fmt.prompt(o, prompts[i // n]) if first else None
                logprobs = fmt.completion(o, start, len(o.output_ids))
                if head is not None:
                    logprobs = {key: head[key] + logprobs[key] for key in head}
            return {"index": i, "text": text, "logprobs": logprobs, "finish_reason": _finish_reason(o)}

        return await respond(request, streams, req, "text", req.model or request.app.state.served_model_name,
                             lambda i, o: shown(i, o, 0, o.text), lambda i, o, start: shown(i, o, start, o.delta))

    @router.post("/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        check_unsupported(req, UNSUPPORTED_OPENAI, api="OpenAI")
        if req.top_logprobs is not None and not req.logprobs:
            raise InvalidRequest("top_logprobs", "needs logprobs: true")
        if not req.messages:
            raise InvalidRequest("messages", "must not be empty")
        aengine: AsyncEngine = request.app.state.aengine
        engine = aengine.engine
        tok = engine.tokenizer
        if not getattr(tok, "chat_template", None):
            raise InvalidRequest("messages", "this model's tokenizer has no chat template")
        messages = [m.for_template(f"messages[{i}]") for i, m in enumerate(req.messages)]
        extra = req.chat_template_kwargs or {}
        taken = sorted(set(extra) & TEMPLATE_ARGUMENTS)
        if taken:
            raise InvalidRequest("chat_template_kwargs", f"{taken[0]!r} is set by the request itself, not here")
        continuing = bool(req.continue_final_message)
        adding = req.add_generation_prompt is not False and not continuing
        try:  # rendered on a worker thread, as prompts are tokenized: a long conversation takes a while
            text = await asyncio.to_thread(tok.apply_chat_template, messages, tokenize=False,
                                           add_generation_prompt=adding, continue_final_message=continuing, **extra)
        except (ValueError, TypeError) as error:  # the template's refusal (ChatTemplateError, transformers'
            # ValueError), or chat_template_kwargs the call cannot take
            raise InvalidRequest("messages", f"the model's chat template refused them: {error}") from None
        if req.max_completion_tokens is not None:
            req.max_tokens = req.max_completion_tokens
        [prompt] = await tokenize_off_loop(tok, [text], "messages")
        options = OutputOptions(return_logprob=bool(req.logprobs),
                                top_logprobs_num=_top_logprobs_num(req.top_logprobs, "top_logprobs"))
        # Unset, a chat reply may use whatever context the prompt leaves.
        streams = start(request, [prompt], req, "messages", max(1, engine.context_length - len(prompt)), options)
        fmt = LogprobFormat(pieces(tok, req))

        def logprobs(o: RequestOutput, start: int) -> dict | None:
            return fmt.chat(o, start, len(o.output_ids)) if req.logprobs else None

        return await respond(
            request, streams, req, "chat", req.model or request.app.state.served_model_name,
            lambda i, o: {"index": i, "message": {"role": "assistant", "content": o.text},
                          "logprobs": logprobs(o, 0), "finish_reason": _finish_reason(o)},
            lambda i, o, start: {"index": i, "delta": {"content": o.delta}, "logprobs": logprobs(o, start),
                                 "finish_reason": _finish_reason(o)},
        )

    return router
