"""The router: both worker APIs, generation to one worker, control to all, health checks, failures."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from fake_engine import Behaviour, ServedApp, create_fake_engine

from tpfleet.fleet.router import RouterConfig, create_router_app
from tpfleet.fleet.workers import WorkerRegistry

FAST = RouterConfig(health_interval_s=0.2, health_timeout_s=1.0)
GEN = {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 2}}


@pytest.fixture
def served():
    """serve(app) -> ServedApp; everything served is stopped after the test."""
    apps = []

    def serve(app) -> ServedApp:
        apps.append(ServedApp(app))
        return apps[-1]

    yield serve
    for app in reversed(apps):
        app.stop()


def fake(served, name: str, **kw) -> tuple[str, Behaviour]:
    behaviour = Behaviour(**kw)
    return served(create_fake_engine(name, behaviour)).url, behaviour


def router(served, *urls: str, config: RouterConfig = FAST) -> tuple[str, WorkerRegistry]:
    registry = WorkerRegistry()
    for url in urls:
        registry.add(url, healthy=True)
    return served(create_router_app(registry, config)).url, registry


def events(text: str) -> list:
    return [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]


def wait_for(cond, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_both_worker_apis_edit_one_registry(served):
    a, _ = fake(served, "a")
    b, _ = fake(served, "b")
    url, registry = router(served)
    assert httpx.post(f"{url}/generate", json=GEN).status_code == 503  # nobody registered yet
    assert httpx.get(f"{url}/health").status_code == 503

    r = httpx.post(f"{url}/workers", json={"url": a, "worker_type": "regular"})
    assert r.status_code == 200 and r.json()["is_healthy"] is True
    a_id = r.json()["worker_id"]
    assert httpx.post(f"{url}/add_worker", params={"url": b}).status_code == 200
    assert httpx.post(f"{url}/add_worker", params={"url": b}).status_code == 200  # idempotent
    assert httpx.get(f"{url}/list_workers").json() == {"urls": [a, b]}
    listed = httpx.get(f"{url}/workers").json()["workers"]
    assert [(w["id"], w["url"]) for w in listed][0] == (a_id, a) and [w["url"] for w in listed] == [a, b]
    assert httpx.get(f"{url}/health").status_code == 200
    assert {httpx.post(f"{url}/generate", json=GEN).json()["worker"] for _ in range(4)} == {"a", "b"}

    for bad, param in [({"url": "not a url"}, "url"), ({"url": a, "worker_type": "prefill"}, "worker_type"),
                       ({}, "url"), ({"url": "http://xn--a:8000"}, "url")]:  # no IDNA host: no request could go
        r = httpx.post(f"{url}/workers", json=bad)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert httpx.post(f"{url}/add_worker").status_code == 400

    assert httpx.delete(f"{url}/workers/{a_id}").status_code == 200
    assert httpx.delete(f"{url}/workers/{a_id}").status_code == 404
    assert httpx.get(f"{url}/list_workers").json() == {"urls": [b]}
    assert httpx.post(f"{url}/remove_worker", params={"url": b}).status_code == 200
    assert registry.all() == [] and httpx.get(f"{url}/workers").json()["workers"] == []
    assert httpx.post(f"{url}/generate", json=GEN).status_code == 503


def test_with_an_admin_key_only_its_holder_changes_the_workers(served):
    a, _ = fake(served, "a")
    url, registry = router(served, config=RouterConfig(health_interval_s=0.2, admin_api_key="k"))
    for call in (lambda h: httpx.post(f"{url}/workers", json={"url": a}, headers=h),
                 lambda h: httpx.post(f"{url}/add_worker", params={"url": a}, headers=h)):
        r = call({"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["param"] == "authorization"
        assert registry.all() == []
        assert call({"Authorization": "bearer k"}).status_code == 200 and len(registry.all()) == 1  # any case
        assert httpx.post(f"{url}/remove_worker", params={"url": a}).status_code == 401
        assert httpx.delete(f"{url}/workers/{registry.all()[0].id}").status_code == 401
        assert httpx.post(f"{url}/remove_worker", params={"url": a},
                          headers={"Authorization": "Bearer k"}).status_code == 200
    assert httpx.get(f"{url}/list_workers").json() == {"urls": []}  # reading needs no key


def test_a_registered_worker_that_fails_its_health_check_serves_once_it_passes(served):
    behaviour = Behaviour(hang=True)
    app = served(create_fake_engine("late", behaviour))
    url, registry = router(served)
    r = httpx.post(f"{url}/add_worker", params={"url": app.url}, timeout=10)
    assert r.status_code == 200 and r.json()["is_healthy"] is False
    assert httpx.post(f"{url}/generate", json=GEN).status_code == 503
    behaviour.hang = False
    assert wait_for(lambda: registry.healthy(), 5)
    assert httpx.post(f"{url}/generate", json=GEN).json()["worker"] == "late"


def test_generation_goes_to_the_least_busy_worker_with_the_clients_key(served):
    a, behaviour_a = fake(served, "a", generate_delay_s=1.0)  # all six arrive before any is answered
    b, behaviour_b = fake(served, "b", generate_delay_s=1.0)
    url, registry = router(served, a, b)
    results = []
    headers = {"Authorization": "Bearer secret"}
    threads = [threading.Thread(target=lambda: results.append(
        httpx.post(f"{url}/generate", json=GEN, headers=headers, timeout=10))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status_code for r in results] == [200] * 6
    assert sorted(r.json()["worker"] for r in results) == ["a"] * 3 + ["b"] * 3
    assert {auth for _, _, auth in behaviour_a.calls + behaviour_b.calls} == {"Bearer secret"}
    with httpx.stream("POST", f"{url}/generate", json={**GEN, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        got = events(r.read().decode())
    assert got[-1] == "[DONE]" and [json.loads(e)["text"] for e in got[:-1]] == ["x", "xx", "xxx"]
    metrics = httpx.get(f"{url}/metrics").text
    assert f'tpfleet_router_worker_served_total{{worker="{a}"}} ' in metrics
    assert sum(w.served for w in registry.all()) == 7 and all(w.outstanding == 0 for w in registry.all())


def test_control_routes_go_to_every_worker_and_merge_the_answers(served):
    a, behaviour_a = fake(served, "a")
    b, behaviour_b = fake(served, "b", fail={"/flush_cache"})
    url, _ = router(served, a, b)
    r = httpx.post(f"{url}/pause_generation", json={"mode": "retract"}, headers={"Authorization": "Bearer admin"})
    assert r.status_code == 200 and r.json()["success"] is True and r.json()["status"] == "ok"
    assert sorted(w["url"] for w in r.json()["workers"]) == sorted([a, b])
    assert httpx.post(f"{url}/continue_generation", json={}).json()["status"] == "ok"  # what both engines said
    for behaviour in (behaviour_a, behaviour_b):
        assert ("/pause_generation", {"mode": "retract"}, "Bearer admin") in behaviour.calls

    r = httpx.post(f"{url}/flush_cache")
    assert r.status_code == 400 and r.json()["success"] is False and "b refused" in r.json()["message"]
    assert r.json()["error"]["code"] == 400  # the OpenAI-shaped error an engine's refusal carries too
    assert [w["success"] for w in sorted(r.json()["workers"], key=lambda w: w["url"] != a)] == [True, False]

    assert httpx.post(f"{url}/abort_request", json={"rid": "a"}).json()["success"] is True  # one engine knew it
    r = httpx.post(f"{url}/abort_request", json={"rid": "zzz"})  # answered as an engine answers it: no error
    assert r.status_code == 200 and r.json()["success"] is False
    assert httpx.post(f"{url}/abort_request", json={"abort_all": True}).json()["success"] is True
    payload = {"serialized_named_tensors": ["p0"], "weight_version": "3"}
    assert httpx.post(f"{url}/update_weights_from_tensor", json=payload).json()["success"] is True
    assert ("/update_weights_from_tensor", payload, None) in behaviour_b.calls

    sent = len(behaviour_a.calls)
    r = httpx.post(f"{url}/init_weights_update_group", json={"rank_offset": 1})
    assert r.status_code == 400 and "rank_offset" in r.json()["message"] and len(behaviour_a.calls) == sent

    assert httpx.get(f"{url}/get_weight_version").json()["weight_version"] == "default"
    behaviour_b.weight_version = "7"
    versions = httpx.get(f"{url}/get_weight_version").json()
    assert versions["weight_version"] is None and {w["weight_version"] for w in versions["workers"]} == {"default", "7"}
    loads = httpx.get(f"{url}/v1/loads").json()["loads"]
    assert sorted(entry["url"] for entry in loads) == sorted([a, b]) and all("num_reqs" in e for e in loads)
    assert httpx.get(f"{url}/server_info").json()["tp_size"] == 1
    assert httpx.post(f"{url}/health_generate", json={}).json()["success"] is True  # any other route: one engine


def test_an_abort_for_every_request_ignores_a_worker_that_is_down(served):
    a, _ = fake(served, "a")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    url, _ = router(served, a, dead, config=RouterConfig(health_interval_s=60))
    r = httpx.post(f"{url}/abort_request", json={"abort_all": True})
    assert r.status_code == 200 and r.json()["success"] is True and r.json()["message"] == "1 of 1 workers succeeded"
    assert httpx.post(f"{url}/flush_cache").status_code == 502  # other control routes must reach every worker


def test_requests_the_engine_refuses_are_refused_through_the_router_too(served):
    keyed, behaviour = fake(served, "keyed", api_key="k")
    url, _ = router(served, keyed, config=RouterConfig(health_interval_s=0.2, max_body_bytes=1000))
    for path in ("/v1/loads", "/get_weight_version"):
        assert httpx.get(f"{url}{path}").status_code == 401  # not an empty answer, not a 503 to retry
        assert httpx.get(f"{url}{path}", headers={"Authorization": "Bearer k"}).status_code == 200
    r = httpx.post(f"{url}/generate", content=b'{"input_ids": [' + b"1," * 600 + b"1]}")
    assert r.status_code == 413 and "--max-body-bytes" in r.json()["message"]
    assert not any(path == "/generate" for path, _, _ in behaviour.calls)


def test_a_request_that_fails_before_its_first_byte_is_retried_elsewhere(served):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"  # closed on exit: connections are refused
    breaks, _ = fake(served, "breaks", break_stream_after=0)
    good, _ = fake(served, "good")
    url, registry = router(served, breaks, dead, good, config=RouterConfig(health_interval_s=60))
    with httpx.stream("POST", f"{url}/generate", json={**GEN, "stream": True}) as r:
        got = events(r.read().decode())
    assert got[-1] == "[DONE]" and json.loads(got[0])["worker"] == "good"
    assert [r.json()["worker"] for r in (httpx.post(f"{url}/generate", json=GEN) for _ in range(3))] == ["good"] * 3
    by_url = {w.url: w for w in registry.all()}
    assert by_url[breaks].retries == 1 and by_url[dead].retries == 1 and by_url[good].retries == 0
    assert not by_url[dead].is_healthy
    registry.remove(good)
    registry.remove(breaks)
    r = httpx.post(f"{url}/generate", json=GEN)
    assert r.status_code == 503 and "no healthy worker" in r.json()["message"]


def test_a_stream_that_breaks_after_it_started_ends_with_an_error_event(served):
    a, _ = fake(served, "a", break_stream_after=2, break_mid_event=True)  # the half event is dropped
    url, registry = router(served, a)
    with httpx.stream("POST", f"{url}/generate", json={**GEN, "stream": True}) as r:
        assert r.status_code == 200
        got = events(r.read().decode())
    assert [json.loads(e)["text"] for e in got[:2]] == ["x", "xx"]
    assert "broke" in json.loads(got[2])["error"]["message"] and got[3:] == ["[DONE]"]
    assert registry.all()[0].failures == 1 and registry.all()[0].outstanding == 0


def test_upstream_read_timeout_is_a_clear_error(served):
    slow, _ = fake(served, "slow", generate_delay_s=5)
    stalls, _ = fake(served, "stalls", stall_stream_after=1)
    url, registry = router(served, slow, config=RouterConfig(read_timeout_s=1.0, health_interval_s=0.2))
    t = time.monotonic()
    r = httpx.post(f"{url}/generate", json=GEN, timeout=10)
    assert r.status_code == 504 and "read_timeout_s" in r.json()["message"] and time.monotonic() - t < 3
    registry.remove(slow)
    registry.add(stalls, healthy=True)
    with httpx.stream("POST", f"{url}/generate", json={**GEN, "stream": True}, timeout=10) as r:
        got = events(r.read().decode())
    assert json.loads(got[0])["text"] == "x" and "read_timeout_s" in got[1] and got[2:] == ["[DONE]"]


def test_a_stopped_engine_leaves_the_rotation_within_10s_and_comes_back(served):
    """Default health-check settings; a real process stopped with SIGSTOP."""
    proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "fake_engine.py"), "stopped"],
                            stdout=subprocess.PIPE, text=True)
    try:
        stopped = proc.stdout.readline().strip()
        assert wait_for(lambda: _answers(stopped), 20)
        url, registry = router(served, stopped, config=RouterConfig())
        os.kill(proc.pid, signal.SIGSTOP)
        t = time.monotonic()
        answers = {}
        plain = threading.Thread(target=lambda: answers.update(plain=httpx.post(f"{url}/generate", json=GEN,
                                                                                timeout=30)))
        plain.start()
        with httpx.stream("POST", f"{url}/generate", json={**GEN, "stream": True}, timeout=30) as r:
            streamed = events(r.read().decode())
        plain.join()
        assert time.monotonic() - t < 10
        assert not registry.get(stopped).is_healthy
        assert answers["plain"].status_code == 503 and "health checks" in answers["plain"].json()["message"]
        assert "health checks" in json.loads(streamed[0])["error"]["message"] and streamed[1:] == ["[DONE]"]
        good, _ = fake(served, "good")
        httpx.post(f"{url}/add_worker", params={"url": good})
        assert httpx.post(f"{url}/generate", json=GEN, timeout=5).json()["worker"] == "good"
        os.kill(proc.pid, signal.SIGCONT)
        assert wait_for(lambda: registry.get(stopped).is_healthy, 5)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.terminate()
        proc.wait(timeout=10)


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_router_in_front_of_a_real_engine(served, server):
    url, _ = router(served)
    assert httpx.post(f"{url}/workers", json={"url": server}).json()["is_healthy"] is True
    body = {"input_ids": [1, 2, 3, 4], "sampling_params": {"max_new_tokens": 3, "temperature": 0},
            "return_logprob": True}
    direct = httpx.post(f"{server}/generate", json=body, timeout=60).json()
    routed = httpx.post(f"{url}/generate", json=body, timeout=60).json()
    assert routed["output_ids"] == direct["output_ids"] and len(routed["meta_info"]["output_token_logprobs"]) == 3
    with httpx.stream("POST", f"{url}/generate", json={**body, "stream": True}, timeout=60) as r:
        got = events(r.read().decode())
    assert got[-1] == "[DONE]" and json.loads(got[-2])["output_ids"] == direct["output_ids"]
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "Hello", "max_tokens": 2}, timeout=60)
    assert r.json()["usage"]["completion_tokens"] == 2
    assert httpx.post(f"{url}/flush_cache").json()["success"] is True
    version = httpx.get(f"{server}/get_weight_version").json()["weight_version"]
    assert httpx.get(f"{url}/get_weight_version").json()["weight_version"] == version
    assert set(httpx.get(f"{url}/v1/loads").json()["loads"][0]) >= {"num_running_reqs", "num_waiting_reqs"}
    assert httpx.get(f"{url}/server_info").json()["tp_size"] == 2
    assert httpx.get(f"{url}/v1/models").status_code == 200
    assert httpx.post(f"{url}/generate", json={"text": ""}).status_code == 400  # the engine's error passes through
    r = httpx.post(f"{url}/generate", content=b'{"input_ids": ' + b"[" * 5000 + b"]" * 5000 + b"}")
    assert r.status_code == 400 and r.json()["error"]["param"] == "body"  # too deep: the engine says so
    r = httpx.post(f"{url}/generate", json=body, headers={"Authorization": b"Bearer k\xe9"})  # not ASCII
    assert r.status_code == 200  # the engine wants no key; the router forwards the header's bytes as sent


def test_a_client_that_gives_up_closes_its_request_upstream(served, server):
    """The engine aborts a request whose client left: through the router too, before any answer came back
    (here the engine is paused, so nothing can come back)."""
    url, registry = router(served, server)

    def waiting() -> int:
        return sum(load["num_waiting_reqs"] for load in httpx.get(f"{server}/v1/loads").json()["loads"])

    assert httpx.post(f"{server}/pause_generation", json={"mode": "in_place"}).json()["success"] is True
    try:
        for stream in (False, True):
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{url}/generate", json={**GEN, "stream": stream}, timeout=1.0)
            assert wait_for(lambda: waiting() == 0 and registry.all()[0].outstanding == 0, 10), stream
    finally:
        httpx.post(f"{server}/continue_generation", json={})


def test_router_without_a_fleet_serves_until_sigterm(served):
    a, _ = fake(served, "a")
    code = f"from tpfleet.fleet.launch import serve_router; raise SystemExit(serve_router([{a!r}]))"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("tpfleet router ready:"), line
        url = line.split()[3]
        assert httpx.get(f"{url}/list_workers").json() == {"urls": [a]}
        assert wait_for(lambda: httpx.post(f"{url}/generate", json=GEN).status_code == 200, 5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        proc.kill()


def test_a_worker_added_late_takes_its_turn_not_every_request(served):
    a, _ = fake(served, "a")
    b, _ = fake(served, "b")
    url, registry = router(served, a)
    for _ in range(6):
        assert httpx.post(f"{url}/generate", json=GEN).json()["worker"] == "a"
    registry.add(b, healthy=True)
    picked = [httpx.post(f"{url}/generate", json=GEN).json()["worker"] for _ in range(6)]
    assert picked == ["b", "a"] * 3  # one after another, though b has served six fewer
