"""The HTTP API against a real TP=2 CPU server in its own process (see the `server` fixture)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from types import SimpleNamespace

import httpx
import pytest

from tpfleet.server.async_engine import AsyncEngine, RequestOutput
from tpfleet.server.http_utils import merge

GREEDY = {"max_new_tokens": 8, "temperature": 0}


def info(url):
    return httpx.get(f"{url}/get_server_info").json()


def wait_idle(url, timeout=10.0):
    """Until nothing runs and every KV block is free; returns the last server info."""
    deadline = time.monotonic() + timeout
    while True:
        i = info(url)
        if (i["num_running_reqs"] == 0 and i["num_waiting_reqs"] == 0 and i["kv_cache_usage"] == 0) \
                or time.monotonic() > deadline:
            return i
        time.sleep(0.1)


def metric(url, name):
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def sse_events(response):
    return [line[6:] for line in response.iter_lines() if line.startswith("data: ")]


def test_generate_text_and_ids_agree(server):
    a = httpx.post(f"{server}/generate", json={"text": "Hello, world!", "sampling_params": GREEDY}).json()
    m = a["meta_info"]
    assert m["completion_tokens"] == 8 == len(a["output_ids"])
    assert m["finish_reason"] == {"type": "length", "length": 8}
    assert m["prompt_tokens"] > 0 and m["e2e_latency"] > 0
    ids = httpx.post(f"{server}/generate", json={"text": "Hello, world!", "sampling_params": GREEDY}).json()
    b = httpx.post(f"{server}/generate", json={"input_ids": [int(t) for t in _tokenize(server, "Hello, world!")],
                                                "sampling_params": GREEDY}).json()
    assert a["output_ids"] == ids["output_ids"] == b["output_ids"]
    assert a["text"] == b["text"]


def _tokenize(server, text):
    from transformers import AutoTokenizer

    model = httpx.get(f"{server}/get_model_info").json()["model_path"]
    return AutoTokenizer.from_pretrained(model)(text).input_ids


def test_batched_generate_matches_single(server):
    prompts = ["The river flows", "Red, orange, yellow", "def add(a, b):"]
    batch = httpx.post(f"{server}/generate", json={"text": prompts, "sampling_params": GREEDY}).json()
    assert isinstance(batch, list) and len(batch) == 3
    singles = [httpx.post(f"{server}/generate", json={"text": p, "sampling_params": GREEDY}).json() for p in prompts]
    assert [x["output_ids"] for x in batch] == [x["output_ids"] for x in singles]


def test_streaming_sends_growing_text_then_done(server):
    body = {"text": "Once upon a time", "stream": True, "sampling_params": {**GREEDY, "max_new_tokens": 6}}
    with httpx.stream("POST", f"{server}/generate", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    lengths = [len(c["output_ids"]) for c in chunks]  # outputs queued behind a busy reader come as one
    assert lengths == sorted(set(lengths)) and lengths[-1] == 6
    assert all(c["output_ids"] == chunks[-1]["output_ids"][:len(c["output_ids"])] for c in chunks)
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])
    full = httpx.post(f"{server}/generate", json={**body, "stream": False}).json()
    assert chunks[-1]["text"] == full["text"] and chunks[-1]["output_ids"] == full["output_ids"]


def test_batched_streaming_tags_each_chunk_with_its_index(server):
    body = {"text": ["a b c", "x y z"], "stream": True, "sampling_params": {**GREEDY, "max_new_tokens": 3}}
    with httpx.stream("POST", f"{server}/generate", json=body) as r:
        chunks = [json.loads(e) for e in sse_events(r)[:-1]]
    for index in (0, 1):  # each choice's chunks grow to its whole answer, however many came as one
        lengths = [len(c["output_ids"]) for c in chunks if c["index"] == index]
        assert lengths == sorted(set(lengths)) and lengths[-1] == 3


BAD = [
    ('{"text": "hi"', "body"),  # malformed JSON
    ('[1, 2]', "body"),
    ('{"text": "hi", "bogus": 1}', "bogus"),
    ('{"text": "hi", "sampling_params": {"temprature": 0.5}}', "sampling_params.temprature"),
    ('{"text": ""}', "text"),
    ('{}', "text"),
    ('{"text": "hi", "input_ids": [1]}', "text"),
    ('{"input_ids": [1, 2, 1001]}', "input_ids"),
    ('{"input_ids": [-4]}', "input_ids"),
    ('{"input_ids": [[1, 2], [3, 999999]]}', "input_ids[1]"),
    (f'{{"input_ids": {list(range(1, 5000))}}}', "input_ids"),  # longer than the 4096 context
    ('{"text": "hi", "sampling_params": {"max_new_tokens": -1}}', "sampling_params.max_new_tokens"),
    ('{"text": "hi", "sampling_params": {"max_new_tokens": 100000000}}', "sampling_params.max_new_tokens"),
    ('{"text": "hi", "sampling_params": {"max_new_tokens": "many"}}', "sampling_params.max_new_tokens"),
    ('{"text": "hi", "sampling_params": {"temperature": -1}}', "sampling_params.temperature"),
    ('{"text": "hi", "sampling_params": {"top_p": 0}}', "sampling_params.top_p"),
    ('{"text": "hi", "sampling_params": {"top_k": -5}}', "sampling_params.top_k"),
    ('{"text": "hi", "sampling_params": {"min_p": 1.5}}', "sampling_params.min_p"),
    ('{"text": "hi", "sampling_params": {"stop_token_ids": [5000]}}', "sampling_params.stop_token_ids"),
    ('{"text": ["a", "b"], "sampling_params": [{}, {}, {}]}', "sampling_params"),
    ('{"text": "hi", "stream": "yes please"}', "stream"),
]


@pytest.mark.parametrize("body,param", BAD)
def test_bad_input_gets_400_naming_the_field(server, body, param):
    r = httpx.post(f"{server}/generate", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param
    assert param.split(".")[-1].split("[")[0] in err["message"]


def test_bad_input_leaves_other_requests_unaffected(server):
    body = {"text": "Once upon a time", "sampling_params": {**GREEDY, "max_new_tokens": 24}}
    expected = httpx.post(f"{server}/generate", json=body).json()["output_ids"]
    result = {}

    def good():
        result["r"] = httpx.post(f"{server}/generate", json=body, timeout=60).json()

    t = threading.Thread(target=good)
    t.start()
    for b, _ in BAD:
        httpx.post(f"{server}/generate", content=b)
    t.join()
    assert result["r"]["output_ids"] == expected
    assert httpx.get(f"{server}/health_generate").status_code == 200


def test_client_disconnect_mid_stream_aborts_and_frees_blocks(server):
    aborted = metric(server, "tpfleet_requests_total{reason=\"abort\"}")
    body = {"text": "A very long story", "stream": True,
            "sampling_params": {"max_new_tokens": 3000, "temperature": 0, "ignore_eos": True}}
    with httpx.stream("POST", f"{server}/generate", json=body) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        assert info(server)["num_running_reqs"] == 1
    # 3000 tokens take far longer than this wait: only an abort makes the server idle this soon.
    i = wait_idle(server, timeout=5)
    assert i["num_running_reqs"] == 0 and i["kv_cache_usage"] == 0
    assert metric(server, "tpfleet_requests_total{reason=\"abort\"}") == aborted + 1


def test_client_disconnect_while_waiting_for_a_plain_response_aborts(server):
    body = {"text": "Another long story", "sampling_params": {"max_new_tokens": 3000, "ignore_eos": True}}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server}/generate", json=body, timeout=1.0)
    i = wait_idle(server, timeout=5)
    assert i["num_running_reqs"] == 0 and i["kv_cache_usage"] == 0


def test_abort_request_by_rid_ends_the_stream(server):
    body = {"text": "Abort me", "rid": "abort-me", "stream": True,
            "sampling_params": {"max_new_tokens": 3000, "ignore_eos": True}}
    with httpx.stream("POST", f"{server}/generate", json=body, timeout=30) as r:
        events = r.iter_lines()
        next(line for line in events if line.startswith("data: "))
        assert httpx.post(f"{server}/abort_request", json={"rid": "abort-me"}).status_code == 200
        rest = [line[6:] for line in events if line.startswith("data: ")]
    assert rest[-1] == "[DONE]"
    last = json.loads(rest[-2])
    assert last["meta_info"]["finish_reason"]["type"] == "abort"
    assert len(last["output_ids"]) < 3000


def test_health_endpoints_and_info(server):
    assert httpx.get(f"{server}/health").status_code == 200
    assert httpx.get(f"{server}/health_generate").status_code == 200
    m = httpx.get(f"{server}/get_model_info").json()
    assert m["is_generation"] is True and m["vocab_size"] == 1001 and m["max_context_length"] == 4096
    i = info(server)
    assert i["tp_size"] == 2 and i["max_total_num_tokens"] == 8192 and i["engine_alive"] is True


def test_flush_cache_forgets_prefixes(server):
    body = {"text": "The library opens at eight o'clock, and the reading room is quiet until the students "
                    "arrive after lunch, every single day of the week.", "sampling_params": GREEDY}
    httpx.post(f"{server}/generate", json=body)
    assert httpx.post(f"{server}/generate", json=body).json()["meta_info"]["cached_tokens"] > 0
    wait_idle(server)
    assert httpx.post(f"{server}/flush_cache").status_code == 200
    assert httpx.post(f"{server}/generate", json=body).json()["meta_info"]["cached_tokens"] == 0


def test_metrics_count_tokens_and_latencies(server):
    before = metric(server, "tpfleet_generation_tokens_total")
    ttft = metric(server, "tpfleet_time_to_first_token_seconds_count")
    httpx.post(f"{server}/generate", json={"text": "count me", "sampling_params": GREEDY})
    assert metric(server, "tpfleet_generation_tokens_total") == before + 8
    assert metric(server, "tpfleet_time_to_first_token_seconds_count") == ttft + 1
    text = httpx.get(f"{server}/metrics").text
    for name in ("tpfleet_prompt_tokens_total", "tpfleet_num_running_reqs", "tpfleet_num_queue_reqs",
                 "tpfleet_kv_cache_usage", "tpfleet_time_per_output_token_seconds_bucket"):
        assert name in text


def test_colocation_endpoints_refuse_while_busy_release_and_resume(server):
    body = {"text": "Busy", "rid": "busy-1", "stream": True,
            "sampling_params": {"max_new_tokens": 3000, "ignore_eos": True}}
    with httpx.stream("POST", f"{server}/generate", json=body, timeout=30) as r:
        lines = r.iter_lines()  # keep it referenced: a discarded iterator closes the stream
        next(line for line in lines if line.startswith("data: "))
        busy = httpx.post(f"{server}/release_memory_occupation", json={}, timeout=30)
        assert busy.status_code == 400 and "in flight" in busy.json()["error"]["message"], busy.text
        httpx.post(f"{server}/abort_request", json={"rid": "busy-1"})
    wait_idle(server)
    rel = httpx.post(f"{server}/release_memory_occupation", json={"tags": ["kv_cache"]}, timeout=30).json()
    assert rel["success"] and rel["released_tensor_bytes"] > 0 and len(rel["ranks"]) == 2
    during = httpx.post(f"{server}/generate", json={"text": "hi"})
    assert during.status_code == 503 and "resume" in during.json()["error"]["message"]
    assert httpx.post(f"{server}/resume_memory_occupation", json={"tags": ["kv_cache"]}, timeout=30).status_code == 200
    assert httpx.post(f"{server}/generate", json={"text": "hi", "sampling_params": GREEDY}).status_code == 200
    bad = httpx.post(f"{server}/update_weights_from_disk", json={"model_path": "/nonexistent/model"}, timeout=30)
    assert bad.status_code == 400 and bad.json()["success"] is False and "model_path" in bad.json()["message"]


def test_n_samples_with_a_seed_differ_yet_reproduce(server):
    body = {"input_ids": [5, 6, 7, 8], "sampling_params": {"n": 3, "sampling_seed": 11, "temperature": 1.0,
                                                             "max_new_tokens": 12, "ignore_eos": True}}
    first = httpx.post(f"{server}/generate", json=body, timeout=60).json()
    again = httpx.post(f"{server}/generate", json=body, timeout=60).json()
    outputs = [tuple(answer["output_ids"]) for answer in first]
    assert len(set(outputs)) == 3
    assert outputs == [tuple(answer["output_ids"]) for answer in again]


def _output(n: int) -> RequestOutput:
    """The n-th cumulative output of a request whose every token is one letter."""
    text = "abcdefgh"[:n]
    return RequestOutput("r", list(range(n)), text, text[-1:], n == 5, None, 1, 0, 0.0)


def test_a_reader_that_falls_behind_gets_one_output_not_a_backlog():
    """Outputs that queued while the reader was busy come as the newest one, its delta the sum of theirs: a
    stalled stream once held a cumulative copy per token, and serialized them all, the event loop held,
    when its client left."""
    async def request():
        for n in range(1, 6):
            yield _output(n)

    async def read() -> tuple[list, list]:
        merged = [(i, out.delta, out.output_ids, out.finished) async for i, out in merge([request(), request()])]
        q: asyncio.Queue = asyncio.Queue()
        for n in range(1, 6):
            q.put_nowait(_output(n))
        alone = [(out.delta, out.finished) async for out in AsyncEngine._stream(SimpleNamespace(), "r", q)]
        return merged, alone

    merged, alone = asyncio.run(read())
    assert merged == [(0, "abcde", [0, 1, 2, 3, 4], True), (1, "abcde", [0, 1, 2, 3, 4], True)]
    assert alone == [("abcde", True)]
