"""A bounded load test on the served TP=2 engine: 32 clients for TPFLEET_LOAD_SECONDS (default 15; the
reliability bar uses 30) sending a mix of valid, invalid, streaming and disconnecting requests. Every
request must get its answer (none lost, none a 5xx), and the server's metrics must agree with what
was sent."""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections import Counter

import httpx
from prometheus_client.parser import text_string_to_metric_families

CLIENTS = 32
LOAD_SECONDS = float(os.environ.get("TPFLEET_LOAD_SECONDS", "15"))
NEW_TOKENS = 8
KINDS = ("valid", "invalid", "stream", "disconnect")


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _delta(before: dict, after: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def _prompt(rng: random.Random) -> list[int]:
    return [rng.randrange(1, 1000) for _ in range(rng.randrange(1, 24))]


async def _valid(client: httpx.AsyncClient, rng: random.Random) -> None:
    r = await client.post("/generate", json={"input_ids": _prompt(rng), "sampling_params": {
        "max_new_tokens": NEW_TOKENS, "ignore_eos": True}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["output_ids"]) == NEW_TOKENS and body["meta_info"]["finish_reason"]["type"] == "length"


async def _invalid(client: httpx.AsyncClient, rng: random.Random) -> None:
    bad, field = rng.choice([
        ({"input_ids": _prompt(rng), "sampling_params": {"max_new_tokens": 4, "no_such_knob": 1}}, "no_such_knob"),
        ({"input_ids": [1, 10**9], "sampling_params": {"max_new_tokens": 4}}, "input_ids"),
        ({"input_ids": _prompt(rng), "sampling_params": {"max_new_tokens": -1}}, "max_new_tokens"),
    ])
    r = await client.post("/generate", json=bad)
    assert r.status_code == 400, r.text
    assert field in r.json()["error"]["param"], r.text


async def _stream(client: httpx.AsyncClient, rng: random.Random) -> None:
    body = {"input_ids": _prompt(rng), "stream": True, "sampling_params": {"max_new_tokens": NEW_TOKENS,
                                                                           "ignore_eos": True}}
    chunks = []
    async with client.stream("POST", "/generate", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                chunks.append(line[6:])
    assert chunks[-1] == "[DONE]", chunks[-3:]
    last = json.loads(chunks[-2])
    assert len(last["output_ids"]) == NEW_TOKENS and last["meta_info"]["finish_reason"]["type"] == "length"


async def _disconnect(client: httpx.AsyncClient, rng: random.Random) -> None:
    """Read the first chunk of a long stream, then hang up: the server must abort the request."""
    body = {"input_ids": _prompt(rng), "stream": True, "sampling_params": {"max_new_tokens": 512,
                                                                           "ignore_eos": True}}
    async with client.stream("POST", "/generate", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                break


SENDERS = {"valid": _valid, "invalid": _invalid, "stream": _stream, "disconnect": _disconnect}


async def _run(url: str) -> tuple[Counter, list[str]]:
    sent: Counter[str] = Counter()
    lost: list[str] = []
    deadline = time.monotonic() + LOAD_SECONDS

    async def client_loop(index: int) -> None:
        rng = random.Random(index)
        limits = httpx.Limits(max_connections=2, max_keepalive_connections=2)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
            turn = index
            while time.monotonic() < deadline:
                kind = KINDS[turn % len(KINDS)]
                turn += 1
                try:
                    await SENDERS[kind](client, rng)
                except (httpx.HTTPError, AssertionError, IndexError, KeyError, ValueError) as e:
                    lost.append(f"{kind}: {e!r}")
                sent[kind] += 1

    await asyncio.gather(*(client_loop(i) for i in range(CLIENTS)))
    return sent, lost


def _quiet(client: httpx.Client, timeout: float = 60) -> dict:
    """The metrics once no request is running or queued (aborts land a step after the hang-up)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = _samples(client.get("/metrics").text)
        busy = samples.get(("tpfleet_num_running_reqs", ()), 0) + samples.get(("tpfleet_num_queue_reqs", ()), 0)
        if busy == 0 or time.monotonic() > deadline:
            return samples
        time.sleep(0.2)


def test_mixed_load_loses_nothing_and_metrics_add_up(server):
    with httpx.Client(base_url=server, timeout=30) as client:
        before = _quiet(client)
        sent, lost = asyncio.run(_run(server))
        time.sleep(0.5)
        after = _quiet(client)
        assert client.get("/health").status_code == 200
    assert not lost, f"{len(lost)} of {sum(sent.values())} requests lost, e.g. {lost[:5]}"
    assert all(sent[kind] > 0 for kind in KINDS), sent
    finished = _delta(before, after, "tpfleet_requests_total", reason="length")
    aborted = _delta(before, after, "tpfleet_requests_total", reason="abort")
    # A hang-up may come after its request already finished: it then counts as "length".
    assert finished + aborted == sent["valid"] + sent["stream"] + sent["disconnect"], (sent, finished, aborted)
    assert finished >= sent["valid"] + sent["stream"]
    assert aborted >= 1  # at 512 tokens, most hang-ups come first
    assert _delta(before, after, "tpfleet_rejected_requests_total", reason="invalid_request") == sent["invalid"]
    generated = _delta(before, after, "tpfleet_generation_tokens_total")
    assert generated >= NEW_TOKENS * (sent["valid"] + sent["stream"])
    print(f"load: {dict(sent)} in {LOAD_SECONDS:g}s; {finished:g} finished, {aborted:g} aborted")
