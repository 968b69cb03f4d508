"""What stands between the network and the engine: API keys, a body-size limit, request limits, and the
count of every refusal.

`install_guards(app, settings)` adds one ASGI middleware (pure ASGI, so streamed answers pass through
untouched) that, in this order:
- counts every 4xx answer in `tpfleet_rejected_requests_total{reason}`, whichever layer refused;
- checks `Authorization: Bearer KEY`, OpenAI's scheme: admin routes (protocol.ADMIN_ROUTES) need
  `admin_api_key` when one is set, else `api_key`; every other route but the open ones (health,
  metrics) needs `api_key` when one is set, and the admin key is accepted there too;
- refuses a body over `max_body_bytes` with a 413 before reading it when Content-Length says so, or
  as soon as the bytes streamed in pass the limit: a 50 MB body is never held in memory;
- refuses a JSON body with a lone surrogate (`"\\ud800"`, which JSON can carry and UTF-8 cannot) in any
  string with a 400 naming the field, before any handler stores it, tokenizes it or echoes it back.

The rest are helpers the request handlers call: `check_bind` for the serve path, text validation and
tokenization off the event loop, and `RequestLimits` (on `app.state.request_limits`).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import re
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from tpfleet.engine.sequence import InvalidRequest
from tpfleet.server.protocol import ADMIN_ROUTES

# 64 MiB: a batch of long RL prompts sent as token ids costs about 7 bytes a token in JSON, so this
# holds some 9 million tokens (256 prompts of 32k tokens), well past what a rollout batch sends in one
# request, while a body far beyond it is refused before it costs memory.
DEFAULT_MAX_BODY_BYTES = 64 << 20
DEFAULT_MAX_STOP_STRINGS = 64  # each is matched against the text after every token
DEFAULT_MAX_BATCH_SIZE = 4096  # prompts times n in one request

# Routes a load balancer or a metrics scraper reads without a key, as SGLang leaves them open.
OPEN_ROUTES = frozenset({"/health", "/health_generate", "/metrics"})

REJECT_REASONS = {400: "invalid_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                  405: "method_not_allowed", 413: "body_too_large", 422: "invalid_request"}

Send = Callable[[dict], Awaitable[None]]
Receive = Callable[[], Awaitable[dict]]


# --- the serve path ---------------------------------------------------------------------------------

class UnsafeBind(ValueError):
    """Listening beyond this machine without an admin key."""


def is_loopback(host: str) -> bool:
    """Whether every address `host` names is a loopback address."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def check_bind(host: str, admin_api_key: str | None, allow_unauthenticated_admin: bool = False) -> None:
    """Refuse to serve on a non-loopback address without an admin key: anyone who reaches the port could
    otherwise replace the weights, release the GPU memory or abort every request."""
    if is_loopback(host) or admin_api_key or allow_unauthenticated_admin:
        return
    raise UnsafeBind(
        f"refusing to listen on {host} without --admin-api-key: anyone who can reach it could load weights, "
        "release memory or abort requests. Set --admin-api-key (and --api-key for generation), listen on "
        "127.0.0.1, or pass --allow-unauthenticated-admin on a network you trust.")


# --- request contents the handlers check ----------------------------------------------------------------

@dataclass(frozen=True)
class RequestLimits:
    max_stop_strings: int = DEFAULT_MAX_STOP_STRINGS
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE

    def check_batch(self, size: int, field: str) -> None:
        if size > self.max_batch_size:
            raise InvalidRequest(field, f"{size} sequences in one request; at most {self.max_batch_size}")

    def check_stop(self, stop: list[str], field: str) -> None:
        if len(stop) > self.max_stop_strings:
            raise InvalidRequest(field, f"{len(stop)} stop strings; at most {self.max_stop_strings}")


def decode_text_field(value: str | list[str], field: str) -> str | list[str]:
    """`value` if it is valid Unicode. JSON can carry lone surrogates (`"\\ud800"`), which no tokenizer
    can encode; they are the client's error, named here, not a failure deep in the tokenizer."""
    texts = value if isinstance(value, list) else [value]
    for index, text in enumerate(texts):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            where = f"{field}[{index}]" if isinstance(value, list) else field
            raise InvalidRequest(where, f"is not valid Unicode: a lone surrogate at character {e.start}") from None
    return value


async def tokenize_off_loop(tokenizer, texts: str | list[str], field: str = "text") -> list[int] | list[list[int]]:
    """Token ids of `texts` (one list per text when it is a list), computed on a worker thread: a long
    prompt takes the tokenizer milliseconds to seconds, while the event loop must keep answering health
    checks and streams. Invalid text is an InvalidRequest naming `field` (`field[i]` in a list)."""
    decode_text_field(texts, field)
    if isinstance(texts, str):
        return await asyncio.to_thread(lambda: tokenizer(texts).input_ids)
    return await asyncio.to_thread(lambda: [tokenizer(text).input_ids for text in texts])


# --- the middleware ------------------------------------------------------------------------------------

# The start of a JSON escape of a UTF-16 surrogate, `\uD800` to `\uDFFF`: only bodies with one are parsed here.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def lone_surrogate_field(body: bytes) -> str | None:
    """Where in a JSON body a string (or a key) holds a lone surrogate, as `a.b[2]`; None if nowhere or if
    the body is not JSON (the handler's parser says so)."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return None

    def find(value, path: str) -> str | None:
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return path or "body"
        elif isinstance(value, list):
            for index, item in enumerate(value):
                if (found := find(item, f"{path}[{index}]")) is not None:
                    return found
        elif isinstance(value, dict):
            for key, item in value.items():
                name = key.encode("utf-8", "backslashreplace").decode()  # printable, even when it is the culprit
                where = f"{path}.{name}" if path else name
                if (found := find(key, where) or find(item, where)) is not None:
                    return found
        return None

    return find(document, "")


def _normalized(path: str) -> str:
    """The route a path reaches: `//flush_cache/` is `/flush_cache`."""
    return "/" + "/".join(part for part in path.split("/") if part)


def bearer_token(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (the scheme in any case), or None."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            return int(value) if value.strip().isdigit() else None
    return None


async def send_error(send: Send, status: int, message: str, kind: str, headers: list[tuple[bytes, bytes]] = ()
                     ) -> None:
    """The JSON error body of tpfleet.server.http_utils.error_response, written at the ASGI level."""
    body = json.dumps({"success": False, "message": message,
                       "error": {"message": message, "type": kind, "param": None, "code": status}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


@dataclass(frozen=True)
class KeyPolicy:
    api_key: str | None = None
    admin_api_key: str | None = None

    def accepted(self, route: str) -> tuple[list[str], str]:
        """The keys that open `route` (none: it is open) and how to call them in an error."""
        if route in OPEN_ROUTES:
            return [], ""
        if route in ADMIN_ROUTES:
            key = self.admin_api_key or self.api_key
            return ([key] if key else []), ("the admin API key" if self.admin_api_key else "the API key")
        if not self.api_key:
            return [], ""
        return [key for key in (self.api_key, self.admin_api_key) if key], "the API key"

    def refusal(self, path: str, token: str | None) -> str | None:
        """Why a request to `path` carrying `token` is refused, or None when it may pass."""
        route = _normalized(path)
        keys, what = self.accepted(route)
        if not keys:
            return None
        if token is None:
            return f"{route} needs {what}: send the header 'Authorization: Bearer <key>'"
        if any(hmac.compare_digest(token.encode("latin-1"), key.encode()) for key in keys):
            return None
        return f"{route} needs {what}; the key sent is not it"


class GuardMiddleware:
    def __init__(self, app, keys: KeyPolicy, max_body_bytes: int, count_rejection: Callable[[str], None]):
        self.app = app
        self.keys = keys
        self.max_body_bytes = max_body_bytes
        self.count_rejection = count_rejection

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        send = self._counting(send)
        headers = scope["headers"]
        refusal = self.keys.refusal(scope["path"], bearer_token(headers))
        if refusal is not None:
            await send_error(send, 401, refusal, "authentication_error", [(b"www-authenticate", b"Bearer")])
            return
        length = _content_length(headers)
        if length is not None and length > self.max_body_bytes:
            await self._too_large(send, f"{length} bytes")
            return
        await self._limited(scope, receive, send)

    def _counting(self, send: Send) -> Send:
        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start" and 400 <= message["status"] < 500:
                status = message["status"]
                self.count_rejection(REJECT_REASONS.get(status, f"http_{status}"))
            await send(message)

        return counting_send

    async def _too_large(self, send: Send, size: str) -> None:
        await send_error(send, 413, f"the request body ({size}) is over the limit of {self.max_body_bytes} bytes "
                                    "(--max-body-bytes)", "invalid_request_error")

    async def _limited(self, scope: dict, receive: Receive, send: Send) -> None:
        """Read the body first, counting its bytes as they stream in: past the limit, answer 413 at once.
        A body with a lone surrogate anywhere is a 400 naming the field. Then run the app on the body read,
        passing later messages (a client's hang-up) through."""
        messages: list[dict] = []
        received = 0
        escapes = False
        tail = b""
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before it finished sending
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > self.max_body_bytes:
                await self._too_large(send, f"over {received} bytes so far")
                return
            escapes = escapes or _SURROGATE_ESCAPE.search(tail + chunk) is not None
            tail = chunk[-5:]
            messages.append(message)
            if not message.get("more_body", False):
                break
        if escapes:
            field = lone_surrogate_field(b"".join(m.get("body", b"") for m in messages))
            if field is not None:
                await send_error(send, 400, f"{field}: is not valid Unicode (a lone surrogate)",
                                 "invalid_request_error")
                return
        replay = iter(messages)

        async def replay_receive() -> dict:
            message = next(replay, None)
            return message if message is not None else await receive()

        await self.app(scope, replay_receive, send)


def install_guards(app, settings: dict) -> None:
    """Add the middleware to `app` (a FastAPI app whose `state.aengine.metrics` counts rejections) and
    put `RequestLimits` on `app.state.request_limits`. `settings` keys, each optional: api_key,
    admin_api_key, max_body_bytes, max_stop_strings, max_batch_size."""
    keys = KeyPolicy(settings.get("api_key") or None, settings.get("admin_api_key") or None)
    app.state.request_limits = RequestLimits(settings.get("max_stop_strings") or DEFAULT_MAX_STOP_STRINGS,
                                             settings.get("max_batch_size") or DEFAULT_MAX_BATCH_SIZE)

    def count_rejection(reason: str) -> None:
        app.state.aengine.metrics.rejected.labels(reason).inc()

    app.add_middleware(GuardMiddleware, keys=keys,
                       max_body_bytes=settings.get("max_body_bytes") or DEFAULT_MAX_BODY_BYTES,
                       count_rejection=count_rejection)
