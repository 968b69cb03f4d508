"""tpfleet.server.guard: API keys, the body-size limit, request limits and the count of refusals, on a
small app served by uvicorn on 127.0.0.1 (the guard is the same middleware the engine's app installs)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from types import SimpleNamespace

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from tpfleet.engine.sequence import InvalidRequest
from tpfleet.server.guard import (
    RequestLimits,
    UnsafeBind,
    check_bind,
    decode_text_field,
    install_guards,
    tokenize_off_loop,
)
from tpfleet.server.launch import bind_socket, url_of
from tpfleet.server.metrics import Metrics
from tpfleet.server.protocol import ADMIN_ROUTES

API_KEY = "gen-key"
ADMIN_KEY = "admin-key"
LIMIT = 1 << 20


def _app(settings: dict) -> FastAPI:
    app = FastAPI()
    app.state.aengine = SimpleNamespace(metrics=Metrics())

    @app.get("/health")
    async def health():
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics():
        return Response(app.state.aengine.metrics.render(), media_type="text/plain")

    @app.post("/generate")
    async def generate(request: Request):
        body = await request.body()
        return {"bytes": len(body)}

    @app.post("/stream")
    async def stream():
        async def chunks():
            for i in range(3):
                yield f"data: {i}\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream")

    @app.post("/flush_cache")
    async def flush_cache():
        return {"success": True}

    install_guards(app, settings)
    return app


class Served:
    def __init__(self, settings: dict):
        import uvicorn

        self.app = _app(settings)
        sock = bind_socket("127.0.0.1", 0)
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        self.url = url_of(sock)
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "the test server did not start"
            time.sleep(0.02)

    def rejected(self, reason: str) -> float:
        value = self.app.state.aengine.metrics.registry.get_sample_value(
            "tpfleet_rejected_requests_total", {"reason": reason})
        return value or 0.0

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def keyed():
    served = Served({"api_key": API_KEY, "admin_api_key": ADMIN_KEY, "max_body_bytes": LIMIT})
    yield served
    served.stop()


def _auth(key: str | None) -> dict:
    return {} if key is None else {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize("key, status", [(None, 401), ("wrong", 401), (API_KEY, 200), (ADMIN_KEY, 200)])
def test_generation_routes_need_the_api_key(keyed, key, status):
    r = httpx.post(f"{keyed.url}/generate", content=b"{}", headers=_auth(key))
    assert r.status_code == status, r.text
    if status == 401:
        body = r.json()
        assert body["success"] is False and "/generate needs the API key" in body["message"]
        assert body["error"]["code"] == 401 and r.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("key, status", [(None, 401), ("wrong", 401), (API_KEY, 401), (ADMIN_KEY, 200)])
def test_admin_routes_need_the_admin_key(keyed, key, status):
    for path in ("/flush_cache", "/flush_cache/"):  # one route, however the path is spelled
        r = httpx.post(f"{keyed.url}{path}", headers=_auth(key), follow_redirects=True)
        assert r.status_code == status, (path, r.text)
        if status == 401:
            assert "needs the admin API key" in r.json()["message"]


def test_health_and_metrics_stay_open_and_refusals_are_counted(keyed):
    assert httpx.get(f"{keyed.url}/health").status_code == 200
    before = keyed.rejected("unauthorized")
    for _ in range(3):
        assert httpx.post(f"{keyed.url}/generate", content=b"{}").status_code == 401
    text = httpx.get(f"{keyed.url}/metrics").text
    assert keyed.rejected("unauthorized") == before + 3
    assert f'tpfleet_rejected_requests_total{{reason="unauthorized"}} {before + 3}' in text


def test_the_api_key_alone_guards_admin_routes_too():
    served = Served({"api_key": API_KEY})
    try:
        assert httpx.post(f"{served.url}/flush_cache").status_code == 401
        assert httpx.post(f"{served.url}/flush_cache", headers=_auth(API_KEY)).status_code == 200
    finally:
        served.stop()


def test_an_admin_key_alone_leaves_generation_open():
    served = Served({"admin_api_key": ADMIN_KEY})
    try:
        assert httpx.post(f"{served.url}/generate", content=b"{}").status_code == 200
        assert httpx.post(f"{served.url}/flush_cache").status_code == 401
        assert httpx.post(f"{served.url}/flush_cache", headers=_auth(ADMIN_KEY)).status_code == 200
    finally:
        served.stop()


def test_the_admin_route_list_covers_the_contract():
    for route in ("/update_weights_from_tensor", "/update_weights_from_distributed", "/init_weights_update_group",
                  "/release_memory_occupation", "/pause_generation", "/abort_request", "/update_weight_version"):
        assert route in ADMIN_ROUTES


def test_bodies_under_the_limit_pass_and_streams_are_untouched(keyed):
    r = httpx.post(f"{keyed.url}/generate", content=b"x" * (LIMIT - 1), headers=_auth(API_KEY))
    assert r.status_code == 200 and r.json() == {"bytes": LIMIT - 1}
    r = httpx.post(f"{keyed.url}/stream", headers=_auth(API_KEY))
    assert r.status_code == 200 and r.text == "data: 0\n\ndata: 1\n\ndata: 2\n\n"


def test_an_oversize_body_is_refused_by_its_content_length(keyed):
    r = httpx.post(f"{keyed.url}/generate", content=b"x" * (LIMIT + 1), headers=_auth(API_KEY))
    assert r.status_code == 413, r.text
    assert f"over the limit of {LIMIT} bytes" in r.json()["message"]
    assert keyed.rejected("body_too_large") == 1
    # The connection stays usable: the rest of the body was discarded, not parsed as a next request.
    with httpx.Client(headers=_auth(API_KEY)) as client:
        assert client.post(f"{keyed.url}/generate", content=b"x" * (LIMIT + 1)).status_code == 413
        assert client.post(f"{keyed.url}/generate", content=b"{}").status_code == 200


def test_an_oversize_streamed_body_is_refused_as_it_arrives(keyed):
    def chunks():
        for _ in range(200):  # 200 MiB if it were all kept
            yield b"x" * (1 << 20)

    # No Content-Length (chunked): the count of bytes read so far trips the limit.
    r = httpx.post(f"{keyed.url}/generate", content=chunks(), headers=_auth(API_KEY), timeout=30)
    assert r.status_code == 413, r.text
    assert "over the limit" in r.json()["message"]
    assert keyed.rejected("body_too_large") == 1


def test_health_answers_while_a_50_mb_body_is_refused(keyed):
    """The 413 comes before the body is read; the body then streams in (slowly, as from a slow client)
    and is discarded while /health keeps answering."""
    latencies: list[float] = []
    uploading = threading.Event()
    uploading.set()

    def poll_health():
        with httpx.Client() as client:
            while uploading.is_set():
                started = time.perf_counter()
                assert client.get(f"{keyed.url}/health").status_code == 200
                latencies.append(time.perf_counter() - started)

    host, port = keyed.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port))) as sock:
        sock.settimeout(5)
        size = 50 << 20
        sock.sendall((f"POST /generate HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {API_KEY}\r\n"
                      f"Content-Length: {size}\r\n\r\n").encode())
        answer = sock.recv(4096)
        poller = threading.Thread(target=poll_health)
        poller.start()
        chunk = b"x" * (1 << 20)
        for _ in range(size // len(chunk)):
            sock.sendall(chunk)
            time.sleep(0.01)
        uploading.clear()
        poller.join()
    assert answer.startswith(b"HTTP/1.1 413 "), answer  # received before a byte of the body was sent
    assert len(latencies) > 10, latencies  # /health kept answering 200 while the body streamed in


def test_a_lone_surrogate_anywhere_in_a_body_is_a_400_naming_its_field(keyed):
    bad = b'{"input_ids": [1], "sampling_params": {"stop": ["ok", "x\\ud83d"]}}'
    r = httpx.post(f"{keyed.url}/generate", content=bad, headers=_auth(API_KEY))
    assert r.status_code == 400, r.text
    assert r.json()["message"] == "sampling_params.stop[1]: is not valid Unicode (a lone surrogate)"
    assert keyed.rejected("invalid_request") == 1
    r = httpx.post(f"{keyed.url}/generate", content=b'{"\\udc00": 1}', headers=_auth(API_KEY))
    assert r.status_code == 400 and r.json()["message"].startswith("\\udc00")
    # A surrogate pair (an emoji as Python's json writes it) and an escaped backslash are fine.
    for fine in (b'{"text": "smile \\ud83d\\ude00"}', b'{"text": "\\\\ud800 is text"}', b"not json \\ud800"):
        r = httpx.post(f"{keyed.url}/generate", content=fine, headers=_auth(API_KEY))
        assert r.status_code == 200 and r.json() == {"bytes": len(fine)}, (fine, r.text)


def test_a_non_loopback_bind_needs_an_admin_key():
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        check_bind(host, None, False)
    with pytest.raises(UnsafeBind, match="refusing to listen on 0.0.0.0 without --admin-api-key"):
        check_bind("0.0.0.0", None, False)
    with pytest.raises(UnsafeBind, match="--allow-unauthenticated-admin"):
        check_bind("::", None, False)
    check_bind("0.0.0.0", ADMIN_KEY, False)
    check_bind("0.0.0.0", None, True)


def test_request_limits_name_the_field():
    limits = RequestLimits(max_stop_strings=2, max_batch_size=8)
    limits.check_batch(8, "input_ids")
    limits.check_stop(["a", "b"], "sampling_params.stop")
    with pytest.raises(InvalidRequest) as e:
        limits.check_batch(9, "sampling_params.n")
    assert e.value.field == "sampling_params.n" and "at most 8" in e.value.message
    with pytest.raises(InvalidRequest) as e:
        limits.check_stop(["a", "b", "c"], "stop")
    assert e.value.field == "stop" and "3 stop strings; at most 2" in e.value.message


def test_install_guards_puts_the_configured_limits_on_the_app():
    app = _app({"max_stop_strings": 3, "max_batch_size": 5})
    assert app.state.request_limits == RequestLimits(max_stop_strings=3, max_batch_size=5)
    assert _app({}).state.request_limits == RequestLimits()


def test_lone_surrogates_are_named_errors():
    assert decode_text_field("héllo ✓", "text") == "héllo ✓"
    with pytest.raises(InvalidRequest) as e:
        decode_text_field("ok\ud800", "prompt")
    assert e.value.field == "prompt" and "lone surrogate at character 2" in e.value.message
    with pytest.raises(InvalidRequest) as e:
        decode_text_field(["fine", "bad \udfff"], "text")
    assert e.value.field == "text[1]"


def test_tokenization_runs_off_the_event_loop():
    seen = []

    def tokenizer(text):
        seen.append(threading.get_ident())
        return SimpleNamespace(input_ids=[len(text)])

    async def tokenize(texts, field):
        return threading.get_ident(), await tokenize_off_loop(tokenizer, texts, field)

    loop_thread, ids = asyncio.run(tokenize(["ab", "abc"], "text"))
    assert ids == [[2], [3]] and seen and loop_thread not in seen
    assert asyncio.run(tokenize("abcd", "prompt"))[1] == [4]
    with pytest.raises(InvalidRequest) as e:
        asyncio.run(tokenize("\ud800", "messages[0].content"))
    assert e.value.field == "messages[0].content"
    with pytest.raises(InvalidRequest) as e:
        asyncio.run(tokenize(["ok", "\ud800"], "text"))
    assert e.value.field == "text[1]"


def _non_loopback_addresses() -> list[str]:
    import ipaddress

    import psutil

    found = []
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family in (socket.AF_INET, socket.AF_INET6):
                ip = address.address.split("%")[0]
                if not ipaddress.ip_address(ip).is_loopback and not ipaddress.ip_address(ip).is_link_local:
                    found.append(ip)
    return found


def test_the_rendezvous_store_listens_on_loopback_only():
    from datetime import timedelta

    import torch.distributed as dist

    from tpfleet.comm.group import create_store

    store = create_store(2)
    client = dist.TCPStore("127.0.0.1", store.port, 2, is_master=False, timeout=timedelta(seconds=10))
    client.set("probe", "1")
    assert store.get("probe") == b"1"  # it works where it should
    outside = _non_loopback_addresses()
    if not outside:
        pytest.skip("this host has no non-loopback address to try")
    for address in outside:
        with pytest.raises(OSError):
            socket.create_connection((address, store.port), timeout=2).close()
