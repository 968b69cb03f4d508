"""Conformance with the RL rollout contract (shared/contracts/rl-rollout-api.md), written from that
document: the requests Miles and slime send, and every field they read back, checked for type and shape.

A TP=1 CPU server of the tiny model serves most checks (fast); the session's TP=2 server one more.
"""

from __future__ import annotations

import base64
import json
import shutil
import threading
import time

import httpx
import pytest
import torch
from servers import serving

PROMPT = [11, 42, 7, 99, 300, 12, 5, 801]
GREEDY = {"max_new_tokens": 8, "temperature": 0}
LONG = {"max_new_tokens": 3000, "temperature": 0, "ignore_eos": True}

# Every field of SGLang's GenerateReqInput and SamplingParams (io_struct.py, sampling_params.py).
SGLANG_GENERATE_FIELDS = [
    "rid", "session_id", "text", "input_ids", "input_embeds", "image_data", "video_data", "audio_data", "mm_hashes",
    "mm_content_hashes", "use_audio_in_video", "video_config", "sampling_params", "return_logprob",
    "logprob_start_len", "top_logprobs_num", "token_ids_logprob", "return_sampling_mask", "return_text_in_logprobs",
    "return_flat_raw_top_logprobs", "return_flat_raw_top_logprobs_b64", "stream", "log_metrics",
    "return_hidden_states", "return_routed_experts", "routed_experts_start_len", "return_indexer_topk", "modalities",
    "session_params", "lora_path", "lora_id", "custom_logit_processor", "positional_embed_overrides",
    "bootstrap_host", "bootstrap_port", "bootstrap_room", "bootstrap_pair_key", "decode_tp_size", "routed_dp_rank",
    "data_parallel_rank", "disagg_prefill_dp_rank", "kv_router_hint", "routing_key", "conversation_id",
    "http_worker_ipc", "background", "require_reasoning", "max_thinking_tokens", "priority", "extra_key", "no_logs",
    "custom_labels", "return_bytes", "return_entropy", "return_prompt_token_ids", "external_trace_header",
    "received_time", "need_wait_for_mm_inputs", "num_items_assigned", "encoder_urls", "max_dynamic_patch",
    "min_dynamic_patch", "image_max_dynamic_patch", "video_max_dynamic_patch", "images_config",
    "multi_item_delimiter_indices", "cache_salt",
]
SGLANG_SAMPLING_FIELDS = [
    "max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k", "min_p",
    "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "n", "json_schema", "regex",
    "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim",
    "custom_params", "stream_interval", "logit_bias", "sampling_seed",
]


@pytest.fixture(scope="module")
def url(tiny_model):
    with serving(tiny_model, 1, "--kv-cache-tokens", "16384") as address:
        yield address


def generate(url, body, timeout=120):
    r = httpx.post(f"{url}/generate", json=body, timeout=timeout)
    assert r.status_code == 200, r.text
    return r.json()


def loads(url):
    r = httpx.get(f"{url}/v1/loads")
    assert r.status_code == 200
    return r.json()["loads"][0]


def wait_for(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def wait_idle(url):
    wait_for(lambda: loads(url)["num_reqs"] == 0)


def in_background(fn, *args):
    """Run fn(*args) on a thread; returns a function that joins it and gives its result."""
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("result", fn(*args)), daemon=True)
    thread.start()

    def join():
        thread.join(timeout=120)
        return box["result"]
    return join


def check_post_json(r):
    body = r.json()
    assert isinstance(body["success"], bool) and isinstance(body["message"], str), body
    return body


def check_finish_reason(reason):
    assert isinstance(reason, dict)
    if reason["type"] == "stop":
        assert isinstance(reason["matched"], (int, str))
    elif reason["type"] == "length":
        assert isinstance(reason["length"], int)
    else:
        assert reason["type"] == "abort" and isinstance(reason["message"], str)


def check_entries(entries, token_ids, with_text=False):
    """[logprob, token_id, text_or_null] per token, in order."""
    assert [e[1] for e in entries] == list(token_ids)
    for logprob, token_id, text in entries:
        assert isinstance(logprob, float) and logprob <= 0.0 and isinstance(token_id, int)
        assert isinstance(text, str) if with_text else text is None


def check_answer(a, prompt_len, logprobs=True):
    assert isinstance(a["text"], str) and all(isinstance(t, int) for t in a["output_ids"])
    m = a["meta_info"]
    assert isinstance(m["id"], str)
    assert m["prompt_tokens"] == prompt_len and m["completion_tokens"] == len(a["output_ids"])
    assert isinstance(m["cached_tokens"], int) and 0 <= m["cached_tokens"] <= prompt_len
    assert isinstance(m["weight_version"], str) and isinstance(m["e2e_latency"], float) and m["e2e_latency"] > 0
    check_finish_reason(m["finish_reason"])
    if logprobs:
        check_entries(m["output_token_logprobs"], a["output_ids"])


# --- /generate -------------------------------------------------------------------------------------

def test_the_frameworks_request_as_sent(url):
    body = {"input_ids": PROMPT,
            "sampling_params": {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "max_new_tokens": 12, "stop": None,
                                "stop_token_ids": [1000], "skip_special_tokens": False, "no_stop_trim": True,
                                "spaces_between_special_tokens": False, "sampling_seed": 1234, "min_new_tokens": 0,
                                "repetition_penalty": 1.0},
            "return_logprob": True, "return_routed_experts": False, "logprob_start_len": -1,
            "top_logprobs_num": 0, "rid": "contract-1", "stream": False,
            "model": None, "log_metrics": True, "return_text_in_logprobs": False, "custom_params": None}
    a = generate(url, body)
    check_answer(a, len(PROMPT))
    assert a["meta_info"]["id"] == "contract-1"
    assert a["meta_info"]["input_token_logprobs"] == []  # logprob_start_len -1
    assert generate(url, body)["output_ids"] == a["output_ids"]  # sampling_seed makes it repeatable


def test_every_sglang_field_may_be_null(url):
    body = {name: None for name in SGLANG_GENERATE_FIELDS}
    body["input_ids"] = PROMPT
    body["sampling_params"] = {name: None for name in SGLANG_SAMPLING_FIELDS} | {"max_new_tokens": 4}
    a = generate(url, body)
    assert a["meta_info"]["completion_tokens"] == 4
    assert a["meta_info"]["finish_reason"] == {"type": "length", "length": 4}


@pytest.mark.parametrize("field,value", [
    ("image_data", "https://example.com/cat.png"), ("lora_path", "adapter"), ("return_hidden_states", True),
    ("sampling_params.regex", "[ab]+"), ("sampling_params.json_schema", "{}"),
])
def test_unimplemented_sglang_fields_are_a_400_naming_them(url, field, value):
    body = {"input_ids": PROMPT, "sampling_params": dict(GREEDY)}
    if field.startswith("sampling_params."):
        body["sampling_params"][field.split(".")[1]] = value
    else:
        body[field] = value
    r = httpx.post(f"{url}/generate", json=body)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == field and "not support" in r.json()["message"]


@pytest.mark.parametrize("body,field", [
    ({"input_ids": PROMPT, "return_logprobs": True}, "return_logprobs"),
    ({"input_ids": PROMPT, "sampling_params": {"max_new_token": 3}}, "sampling_params.max_new_token"),
])
def test_a_typo_is_a_400_naming_the_key(url, body, field):
    r = httpx.post(f"{url}/generate", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == field
    assert r.json()["success"] is False and field.split(".")[-1] in r.json()["message"]


@pytest.mark.parametrize("body,why", [(b'{"text": "caf\xe9"}', "utf-8"),
                                      (b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "recursion"),
                                      (b'{"input_ids": [1' + b"0" * 5000 + b"]}", "digits")])
def test_an_unparsable_body_is_a_400_saying_why(url, body, why):
    for route in ("/generate", "/v1/completions", "/abort_request"):
        r = httpx.post(f"{url}{route}", content=body)
        assert r.status_code == 400 and check_post_json(r)["success"] is False, (route, r.text)
        assert r.json()["error"]["param"] == "body" and why in r.json()["message"], (route, r.text)


@pytest.mark.parametrize("key", ["x", "1_0", " 10", "+10", "-1", "\u0661"])
def test_logit_bias_keys_are_decimal_token_ids(url, key):
    r = httpx.post(f"{url}/generate", json={"input_ids": PROMPT, "sampling_params": GREEDY | {"logit_bias": {key: 5}}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "sampling_params.logit_bias", r.text


def test_batched_input_ids_answer_a_list_in_order(url):
    prompts = [PROMPT, PROMPT[:3], [5, 6, 7, 8, 9]]
    batch = generate(url, {"input_ids": prompts, "sampling_params": GREEDY, "return_logprob": True})
    assert isinstance(batch, list) and len(batch) == 3
    for answer, prompt in zip(batch, prompts):
        check_answer(answer, len(prompt))
        single = generate(url, {"input_ids": prompt, "sampling_params": GREEDY})
        assert answer["output_ids"] == single["output_ids"]


def test_text_prompt(url):
    a = generate(url, {"text": "Hello there", "sampling_params": GREEDY, "return_logprob": True})
    check_answer(a, a["meta_info"]["prompt_tokens"])
    assert a["meta_info"]["prompt_tokens"] > 0 and len(a["output_ids"]) == 8


def test_stream_is_cumulative_and_ends_with_done(url):
    body = {"input_ids": PROMPT, "stream": True, "return_logprob": True, "sampling_params": GREEDY}
    with httpx.stream("POST", f"{url}/generate", json=body, timeout=60) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    lengths = [len(c["output_ids"]) for c in chunks]  # growing; outputs queued behind a busy reader come as one
    assert lengths == sorted(set(lengths)) and lengths[-1] == GREEDY["max_new_tokens"]
    for chunk in chunks[:-1]:
        assert chunk["meta_info"]["finish_reason"] is None
        check_entries(chunk["meta_info"]["output_token_logprobs"], chunk["output_ids"])
    final = chunks[-1]
    check_answer(final, len(PROMPT))
    assert final["output_ids"] == generate(url, {**body, "stream": False})["output_ids"]


def test_n_samples_share_the_prompt_and_answer_a_list(url):
    body = {"input_ids": PROMPT, "return_logprob": True,
            "sampling_params": {"n": 3, "max_new_tokens": 6, "temperature": 1.0}}
    answers = generate(url, body)
    assert isinstance(answers, list) and len(answers) == 3
    for a in answers:
        check_answer(a, len(PROMPT))
    assert len({a["meta_info"]["id"] for a in answers}) == 3
    named = generate(url, {**body, "rid": "group"})
    assert [a["meta_info"]["id"] for a in named] == ["group_0", "group_1", "group_2"]  # SGLang's expansion
    with httpx.stream("POST", f"{url}/generate", json={**body, "stream": True}, timeout=60) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    finals = [c for c in chunks if c["meta_info"]["finish_reason"] is not None]
    assert sorted(c["index"] for c in finals) == [0, 1, 2]


def test_prefill_only_scoring(url):
    body = {"input_ids": PROMPT, "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 2,
            "sampling_params": {"max_new_tokens": 0}}
    a = generate(url, body)
    m = a["meta_info"]
    assert a["output_ids"] == [] and m["completion_tokens"] == 0 and m["output_token_logprobs"] == []
    first, *rest = m["input_token_logprobs"]
    assert first == [None, PROMPT[0], None]
    check_entries(rest, PROMPT[1:])
    assert m["input_top_logprobs"][0] is None
    for top in m["input_top_logprobs"][1:]:
        assert len(top) == 2 and all(isinstance(lp, float) and isinstance(t, int) and s is None for lp, t, s in top)
    check_finish_reason(m["finish_reason"])


def test_top_logprobs_and_text_in_logprobs(url):
    body = {"input_ids": PROMPT, "return_logprob": True, "top_logprobs_num": 3, "return_text_in_logprobs": True,
            "logprob_start_len": 2, "sampling_params": GREEDY}
    m = generate(url, body)["meta_info"]
    output_ids = [e[1] for e in m["output_token_logprobs"]]
    check_entries(m["output_token_logprobs"], output_ids, with_text=True)
    check_entries(m["input_token_logprobs"][1:], PROMPT[3:], with_text=True)
    assert m["input_token_logprobs"][0][:2] == [None, PROMPT[2]]
    assert len(m["output_top_logprobs"]) == len(output_ids)
    for chosen, top in zip(m["output_token_logprobs"], m["output_top_logprobs"]):
        assert len(top) == 3 and all(isinstance(s, str) for _, _, s in top)
        assert top[0][1] == chosen[1] and abs(top[0][0] - chosen[0]) < 1e-5  # greedy: the best is the one chosen


def test_finish_reason_shapes_and_no_stop_trim(url):
    free = generate(url, {"input_ids": PROMPT, "sampling_params": GREEDY})
    assert free["meta_info"]["finish_reason"] == {"type": "length", "length": 8}
    target = free["output_ids"][3]
    stop = generate(url, {"input_ids": PROMPT, "sampling_params": {**GREEDY, "stop_token_ids": [target]}})
    assert stop["meta_info"]["finish_reason"] == {"type": "stop", "matched": target}
    assert stop["output_ids"][-1] == target
    text = free["text"]
    at = next(i for i in range(len(text) // 2, len(text) - 1) if text[i:i + 2].strip() == text[i:i + 2])
    stop = text[at:at + 2]
    trimmed = generate(url, {"input_ids": PROMPT, "sampling_params": {**GREEDY, "stop": [stop]}})
    kept = generate(url, {"input_ids": PROMPT, "sampling_params": {**GREEDY, "stop": [stop], "no_stop_trim": True}})
    assert trimmed["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert kept["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert kept["text"] == trimmed["text"] + stop and text.startswith(kept["text"])


def test_logprobs_match_transformers_float32(url, tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, torch_dtype=torch.float32).eval()
    for sampling, temperature in (({"temperature": 0}, 1.0), ({"temperature": 0.7, "sampling_seed": 3}, 0.7)):
        a = generate(url, {"input_ids": PROMPT, "return_logprob": True, "logprob_start_len": 0,
                           "sampling_params": {"max_new_tokens": 10, "ignore_eos": True, **sampling}})
        ids = PROMPT + a["output_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
        expected = torch.log_softmax(logits / temperature, dim=-1)
        got = [e[0] for e in a["meta_info"]["output_token_logprobs"]]
        want = [expected[len(PROMPT) + i - 1, t].item() for i, t in enumerate(a["output_ids"])]
        assert got == pytest.approx(want, abs=1e-4)
        got_input = [e[0] for e in a["meta_info"]["input_token_logprobs"][1:]]
        want_input = [expected[i - 1, PROMPT[i]].item() for i in range(1, len(PROMPT))]
        assert got_input == pytest.approx(want_input, abs=1e-4)


def test_tp2_gives_the_same_tokens_and_logprobs(url, server):
    body = {"input_ids": PROMPT, "return_logprob": True, "sampling_params": {**GREEDY, "max_new_tokens": 6}}
    one, two = generate(url, body), generate(server, body)
    check_answer(two, len(PROMPT))
    assert one["output_ids"] == two["output_ids"]
    assert [e[0] for e in two["meta_info"]["output_token_logprobs"]] == pytest.approx(
        [e[0] for e in one["meta_info"]["output_token_logprobs"]], abs=1e-4)


# --- aborting, pausing, flushing -------------------------------------------------------------------

def test_abort_by_rid_answers_200_with_partial_output(url):
    join = in_background(lambda: httpx.post(f"{url}/generate", timeout=120, json={
        "input_ids": PROMPT, "rid": "to-abort", "return_logprob": True, "sampling_params": LONG}))
    wait_for(lambda: loads(url)["num_running_reqs"] == 1)
    time.sleep(0.3)
    assert check_post_json(httpx.post(f"{url}/abort_request", json={"rid": "to-abort"}))["success"] is True
    r = join()
    assert r.status_code == 200
    a = r.json()
    assert a["meta_info"]["finish_reason"]["type"] == "abort"
    assert 0 < len(a["output_ids"]) < 3000
    check_answer(a, len(PROMPT))  # the logprobs cover every token produced
    unknown = httpx.post(f"{url}/abort_request", json={"rid": "no-such-request"})
    assert unknown.status_code == 200 and check_post_json(unknown)["success"] is False


def test_abort_all(url):
    joins = [in_background(lambda: httpx.post(f"{url}/generate", timeout=120, json={
        "input_ids": PROMPT, "return_logprob": True, "sampling_params": LONG})) for _ in range(2)]
    wait_for(lambda: loads(url)["num_reqs"] == 2)
    assert check_post_json(httpx.post(f"{url}/abort_request", json={"abort_all": True}))["success"]
    for join in joins:
        r = join()
        assert r.status_code == 200 and r.json()["meta_info"]["finish_reason"]["type"] == "abort"
        check_answer(r.json(), len(PROMPT))
    gauges = {line.split()[0]: float(line.split()[1]) for line in httpx.get(f"{url}/metrics").text.splitlines()
              if line.startswith(("tpfleet_num_running_reqs ", "tpfleet_kv_cache_usage "))}
    assert gauges == {"tpfleet_num_running_reqs": 0.0, "tpfleet_kv_cache_usage": 0.0}  # not as the last step left them


def _pause(url, body):
    r = httpx.post(f"{url}/pause_generation", json=body, timeout=60)
    assert r.status_code == 200
    answer = r.json()
    assert answer["status"] == "ok" and answer["success"] is True
    return answer


def test_pause_abort_ends_requests_and_continue_resumes(url):
    join = in_background(lambda: httpx.post(f"{url}/generate", timeout=120, json={
        "input_ids": PROMPT, "return_logprob": True, "sampling_params": LONG}))
    wait_for(lambda: loads(url)["num_running_reqs"] == 1)
    _pause(url, {})  # the default mode is abort
    r = join()
    assert r.status_code == 200 and r.json()["meta_info"]["finish_reason"]["type"] == "abort"
    check_answer(r.json(), len(PROMPT))
    assert httpx.post(f"{url}/continue_generation", json={}).json()["success"] is True
    assert generate(url, {"input_ids": PROMPT, "sampling_params": GREEDY})["meta_info"]["completion_tokens"] == 8


@pytest.mark.parametrize("mode", ["retract", "in_place"])
def test_pause_keeps_requests_and_continue_finishes_them_unchanged(url, mode):
    body = {"input_ids": PROMPT, "return_logprob": True,
            "sampling_params": {"max_new_tokens": 400, "temperature": 0, "ignore_eos": True}}
    expected = generate(url, body)
    join = in_background(lambda: httpx.post(f"{url}/generate", json=body, timeout=120))
    wait_for(lambda: loads(url)["num_running_reqs"] == 1)
    _pause(url, {"mode": mode})
    held = loads(url)
    assert held["num_reqs"] == 1
    time.sleep(0.5)
    assert loads(url)["num_reqs"] == 1  # paused: nothing finishes
    assert check_post_json(httpx.post(f"{url}/continue_generation", json={}))["success"] is True
    r = join()
    assert r.status_code == 200
    a = r.json()
    assert a["output_ids"] == expected["output_ids"]
    assert a["meta_info"]["finish_reason"] == {"type": "length", "length": 400}
    got = [e[0] for e in a["meta_info"]["output_token_logprobs"]]
    assert got == pytest.approx([e[0] for e in expected["meta_info"]["output_token_logprobs"]], abs=1e-4)


def test_flush_cache_refuses_while_running(url):
    join = in_background(lambda: httpx.post(f"{url}/generate", timeout=120, json={
        "input_ids": PROMPT, "sampling_params": LONG}))
    wait_for(lambda: loads(url)["num_running_reqs"] == 1)
    busy = httpx.post(f"{url}/flush_cache")
    assert busy.status_code == 400 and check_post_json(busy)["success"] is False
    httpx.post(f"{url}/abort_request", json={"abort_all": True})
    assert join().status_code == 200
    wait_idle(url)
    for method in ("POST", "GET"):
        r = httpx.request(method, f"{url}/flush_cache")
        assert r.status_code == 200 and check_post_json(r)["success"] is True


PROXY_KEYS = {"model": None, "log_metrics": True, "return_text_in_logprobs": None, "custom_params": None}


def test_control_and_weight_routes_take_proxy_keys_and_null(url, tiny_model):
    wait_idle(url)
    routes = [
        ("/abort_request", {"abort_all": True, "rid": None}),
        ("/pause_generation", {"mode": None}),  # null: the default mode, abort
        ("/continue_generation", {"torch_empty_cache": None}),
        ("/update_weight_version", {"new_version": "v-proxy", "abort_all_requests": None}),
        ("/release_memory_occupation", {"tags": None}),
        ("/resume_memory_occupation", {"tags": None}),
        ("/update_weights_from_disk", {"model_path": str(tiny_model), "load_format": None, "flush_cache": None,
                                       "abort_all_requests": None, "weight_version": None}),
    ]
    for route, body in routes:
        r = httpx.post(f"{url}{route}", json=body | PROXY_KEYS, timeout=60)
        assert r.status_code == 200 and check_post_json(r)["success"] is True, (route, r.text)
    # null takes the default group name, which names no group here: refused for that, not for the null
    r = httpx.post(f"{url}/destroy_weights_update_group", json={"group_name": None} | PROXY_KEYS)
    assert r.status_code == 400 and "weight_update_group" in check_post_json(r)["message"], r.text
    for route, body, field in [("/abort_request", {"abort_al": True}, "abort_al"),
                               ("/update_weight_version", {"new_version": None}, "new_version"),
                               ("/update_weights_from_disk", {"model_path": None}, "model_path")]:
        r = httpx.post(f"{url}{route}", json=body)
        assert r.status_code == 400 and field in check_post_json(r)["message"], (route, r.text)
    assert generate(url, {"input_ids": PROMPT, "sampling_params": GREEDY})["meta_info"]["weight_version"] == "v-proxy"


def test_loads_shape(url):
    r = httpx.get(f"{url}/v1/loads").json()
    assert list(r) == ["loads"] and len(r["loads"]) == 1
    for key in ("num_running_reqs", "num_waiting_reqs", "num_reqs"):
        assert isinstance(r["loads"][0][key], int)


# --- weights version, memory, discovery ------------------------------------------------------------

def test_weight_version_routes(url):
    version = httpx.get(f"{url}/get_weight_version").json()["weight_version"]
    assert isinstance(version, str)
    r = httpx.post(f"{url}/update_weight_version", json={"new_version": "8", "abort_all_requests": False})
    assert r.status_code == 200 and check_post_json(r)["success"] is True
    assert httpx.get(f"{url}/get_weight_version").json() == {"weight_version": "8"}
    assert generate(url, {"input_ids": PROMPT, "sampling_params": GREEDY})["meta_info"]["weight_version"] == "8"
    assert httpx.get(f"{url}/server_info").json()["weight_version"] == "8"
    assert httpx.get(f"{url}/model_info").json()["weight_version"] == "8"
    bad = httpx.post(f"{url}/update_weight_version", json={"version": "9"})
    assert bad.status_code == 400 and check_post_json(bad)["success"] is False


def test_abort_all_requests_takes_effect_only_with_the_update(url, tiny_model):
    wait_idle(url)
    join = in_background(lambda: httpx.post(f"{url}/generate", timeout=120, json={
        "input_ids": PROMPT, "sampling_params": LONG}))
    wait_for(lambda: loads(url)["num_running_reqs"] == 1)
    refused = httpx.post(f"{url}/update_weights_from_disk", json={"model_path": str(tiny_model / "nowhere"),
                                                                  "abort_all_requests": True})
    assert refused.status_code == 400 and check_post_json(refused)["success"] is False
    assert loads(url)["num_running_reqs"] == 1  # a refused update changes nothing, its abort included
    done = httpx.post(f"{url}/update_weights_from_disk", json={"model_path": str(tiny_model),
                                                               "abort_all_requests": True}, timeout=60)
    assert done.status_code == 200 and check_post_json(done)["success"] is True
    assert join().json()["meta_info"]["finish_reason"]["type"] == "abort"


def test_a_request_spanning_an_update_reports_the_new_version(url):
    wait_idle(url)
    httpx.post(f"{url}/update_weight_version", json={"new_version": "before"})
    join = in_background(lambda: httpx.post(f"{url}/generate", timeout=120, json={
        "input_ids": PROMPT, "rid": "spans", "sampling_params": LONG}))
    wait_for(lambda: loads(url)["num_running_reqs"] == 1)
    _pause(url, {"mode": "in_place"})
    httpx.post(f"{url}/update_weight_version", json={"new_version": "after"})
    httpx.post(f"{url}/continue_generation", json={})
    time.sleep(0.2)
    httpx.post(f"{url}/abort_request", json={"rid": "spans"})
    assert join().json()["meta_info"]["weight_version"] == "after"


def test_an_update_waits_for_the_requests_in_flight_and_new_ones_wait_behind_it(url, tiny_model):
    wait_idle(url)
    copy = tiny_model.parent / "tiny-copy"  # another checkpoint under the allowed root: the parent of the model's
    shutil.copytree(tiny_model, copy, dirs_exist_ok=True)
    httpx.post(f"{url}/update_weight_version", json={"new_version": "A"})
    done = {}

    def timed(name, fn):
        result = fn()
        done[name] = time.monotonic()
        return result

    body = {"input_ids": PROMPT, "sampling_params": {**LONG, "max_new_tokens": 400}}
    first = in_background(timed, "first", lambda: httpx.post(f"{url}/generate", json=body, timeout=120))
    wait_for(lambda: loads(url)["num_running_reqs"] == 1)
    update = in_background(timed, "update", lambda: httpx.post(f"{url}/update_weights_from_disk", timeout=120, json={
        "model_path": str(copy), "weight_version": "B"}))
    time.sleep(0.3)
    second = in_background(timed, "second", lambda: httpx.post(
        f"{url}/generate", json={**body, "sampling_params": GREEDY}, timeout=120))
    a, u, b = first().json(), update(), second().json()
    assert a["meta_info"]["finish_reason"]["type"] == "length" and a["meta_info"]["weight_version"] == "A"
    assert u.status_code == 200 and check_post_json(u)["success"] is True
    assert b["meta_info"]["weight_version"] == "B"
    assert done["first"] <= done["update"] <= done["second"]
    assert httpx.get(f"{url}/server_info").json()["model_path"] == str(copy)
    assert httpx.get(f"{url}/model_info").json()["model_path"] == str(copy)
    back = httpx.post(f"{url}/update_weights_from_disk", json={"model_path": str(tiny_model)}, timeout=60)
    assert back.status_code == 200 and httpx.get(f"{url}/server_info").json()["model_path"] == str(tiny_model)


def test_an_update_while_paused_goes_ahead_and_health_is_not_held_behind_one(url, tiny_model):
    wait_idle(url)
    join = in_background(lambda: httpx.post(f"{url}/generate", timeout=120, json={
        "input_ids": PROMPT, "rid": "kept", "sampling_params": LONG}))
    wait_for(lambda: loads(url)["num_running_reqs"] == 1)
    _pause(url, {"mode": "in_place"})
    update = {"model_path": str(tiny_model), "weight_version": "C"}
    r = httpx.post(f"{url}/update_weights_from_disk", json=update, timeout=30)  # not held: generation is paused
    assert r.status_code == 200 and loads(url)["num_running_reqs"] == 1
    httpx.post(f"{url}/continue_generation", json={})
    held = in_background(lambda: httpx.post(f"{url}/update_weights_from_disk", json={**update, "weight_version": "D"},
                                            timeout=120))
    time.sleep(0.3)
    assert httpx.get(f"{url}/health", timeout=30).status_code == 200  # a probe passes the waiting update
    assert loads(url)["num_running_reqs"] == 1
    httpx.post(f"{url}/abort_request", json={"rid": "kept"})
    kept = join().json()["meta_info"]
    assert kept["finish_reason"]["type"] == "abort" and kept["weight_version"] == "C"  # the weights it ended with
    assert held().status_code == 200
    assert httpx.get(f"{url}/get_weight_version").json() == {"weight_version": "D"}


def test_updates_apply_in_turn_and_held_requests_count_as_waiting(url, tiny_model):
    wait_idle(url)
    join = in_background(lambda: httpx.post(f"{url}/generate", timeout=120, json={
        "input_ids": PROMPT, "sampling_params": LONG}))
    wait_for(lambda: loads(url)["num_running_reqs"] == 1)
    older = in_background(lambda: httpx.post(f"{url}/update_weights_from_disk", timeout=120, json={
        "model_path": str(tiny_model), "weight_version": "older"}))
    time.sleep(0.3)
    held = in_background(lambda: httpx.post(f"{url}/generate", json={"input_ids": PROMPT, "sampling_params": GREEDY},
                                            timeout=120))
    wait_for(lambda: loads(url)["num_waiting_reqs"] == 1)  # held behind the waiting update, and counted
    assert httpx.get(f"{url}/server_info").json()["num_waiting_reqs"] == 1
    newer = httpx.post(f"{url}/update_weights_from_disk", timeout=120, json={
        "model_path": str(tiny_model), "weight_version": "newer", "abort_all_requests": True})
    assert newer.status_code == 200 and older().status_code == 200
    assert httpx.get(f"{url}/get_weight_version").json() == {"weight_version": "newer"}  # applied in turn
    assert join().json()["meta_info"]["finish_reason"]["type"] == "abort"
    assert held().json()["meta_info"]["finish_reason"]["type"] == "abort"  # the aborting update's "every request"


def test_abort_by_rid_reaches_every_sample_of_n(url):
    wait_idle(url)
    join = in_background(lambda: httpx.post(f"{url}/generate", timeout=120, json={
        "input_ids": PROMPT, "rid": "family", "sampling_params": {**LONG, "n": 2}}))
    wait_for(lambda: loads(url)["num_running_reqs"] == 2)
    assert check_post_json(httpx.post(f"{url}/abort_request", json={"rid": "family"}))["success"] is True
    answers = join().json()
    assert [a["meta_info"]["id"] for a in answers] == ["family_0", "family_1"]
    assert all(a["meta_info"]["finish_reason"]["type"] == "abort" for a in answers)


def test_memory_routes_take_every_tag_and_null(url):
    wait_idle(url)
    for tags in (["kv_cache", "cuda_graph"], None):
        release = httpx.post(f"{url}/release_memory_occupation", json={"tags": tags}, timeout=60)
        assert release.status_code == 200 and check_post_json(release)["success"] is True
        resume = httpx.post(f"{url}/resume_memory_occupation", json={"tags": tags}, timeout=60)
        assert resume.status_code == 200 and check_post_json(resume)["success"] is True
    assert generate(url, {"input_ids": PROMPT, "sampling_params": GREEDY})["meta_info"]["completion_tokens"] == 8
    bad = httpx.post(f"{url}/release_memory_occupation", json={"tags": ["gpu"]})
    assert bad.status_code == 400 and "tags" in bad.json()["error"]["param"]


SERVER_INFO_TYPES = {
    "model_path": str, "tp_size": int, "dp_size": int, "pp_size": int, "ep_size": int, "num_gpus": int,
    "enable_memory_saver": bool, "enable_return_routed_experts": bool, "disaggregation_mode": str, "host": str,
    "port": int, "nnodes": int, "node_rank": int, "base_gpu_id": int, "mem_fraction_static": float,
    "context_length": int, "num_running_reqs": int, "num_waiting_reqs": int, "weight_version": str,
}


def test_server_info_and_model_info(url, tiny_model):
    for path in ("/server_info", "/get_server_info"):
        info = httpx.get(f"{url}{path}").json()
        for key, kind in SERVER_INFO_TYPES.items():
            assert isinstance(info[key], kind), (path, key, info.get(key))
        assert (info["tp_size"], info["dp_size"], info["pp_size"], info["nnodes"], info["node_rank"]) == (1, 1, 1, 1, 0)
        assert info["disaggregation_mode"] == "null" and info["model_path"] == str(tiny_model)
        assert info["enable_memory_saver"] is False  # started without --enable-memory-saver
        assert url.endswith(f":{info['port']}")
    for path in ("/model_info", "/get_model_info"):
        model = httpx.get(f"{url}{path}").json()
        assert model["model_path"] == str(tiny_model) and model["is_generation"] is True
        assert isinstance(model["weight_version"], str)


def test_an_engine_failure_is_a_json_500_and_the_server_keeps_serving(tiny_model, monkeypatch):
    from fastapi.testclient import TestClient

    from tpfleet.config import EngineConfig
    from tpfleet.engine.llm_engine import LLMEngine
    from tpfleet.server.app import create_app
    from tpfleet.server.async_engine import AsyncEngine

    aengine = AsyncEngine(LLMEngine(EngineConfig(model=str(tiny_model), kv_cache_tokens=2048)))
    app = create_app(aengine, {"model": str(tiny_model), "tp_size": 1, "enable_memory_saver": True})

    def fails(*args):
        raise RuntimeError("rank 0: CUDA out of memory")

    monkeypatch.setattr(aengine.engine, "resume_memory", fails)
    monkeypatch.setattr(aengine.engine, "update_weights_from_disk", fails)
    with TestClient(app, raise_server_exceptions=False) as client:
        for route, body in [("/resume_memory_occupation", {"tags": ["weights"]}),
                            ("/update_weights_from_disk", {"model_path": str(tiny_model)})]:
            r = client.post(route, json=body)
            assert r.status_code == 500 and r.headers["content-type"] == "application/json", (route, r.text)
            assert r.json()["success"] is False and "CUDA out of memory" in r.json()["message"]
        r = client.post("/generate", json={"input_ids": PROMPT, "sampling_params": GREEDY})
        assert r.status_code == 200 and r.json()["meta_info"]["completion_tokens"] == 8
        assert client.get("/server_info").json()["enable_memory_saver"] is True  # as the server was started


# --- routed experts (R3), on a MoE model -------------------------------------------------------------

@pytest.fixture(scope="module")
def moe_url(tmp_path_factory):
    from tpfleet.model.make_model import make_model

    model = make_model("tiny-moe", tmp_path_factory.mktemp("tiny-moe"))
    with serving(model, 1, "--enable-return-routed-experts") as address:
        yield address, json.loads((model / "config.json").read_text())


def test_routed_experts_cover_every_position_but_the_last(moe_url):
    url, config = moe_url
    a = generate(url, {"input_ids": PROMPT, "return_routed_experts": True, "sampling_params": GREEDY})
    m = a["meta_info"]
    routed = base64.b64decode(m["routed_experts"])
    layers, top_k = config["num_hidden_layers"], config["num_experts_per_tok"]
    assert len(routed) == 4 * (m["prompt_tokens"] + m["completion_tokens"] - 1) * layers * top_k
    experts = torch.frombuffer(bytearray(routed), dtype=torch.int32).view(-1, layers, top_k)
    moe_layers = 0
    for layer in range(layers):
        chosen = experts[:, layer]
        if (chosen == -1).all():
            continue  # a dense layer routes nothing
        moe_layers += 1
        assert 0 <= chosen.min() and chosen.max() < config["num_experts"]
    assert moe_layers > 0
    assert "routed_experts" not in generate(url, {"input_ids": PROMPT, "sampling_params": GREEDY})["meta_info"]


def test_a_retracted_then_aborted_request_reports_its_routing(moe_url):
    url, config = moe_url
    body = {"input_ids": PROMPT, "rid": "retracted", "return_routed_experts": True, "return_logprob": True,
            "sampling_params": LONG}
    join = in_background(lambda: httpx.post(f"{url}/generate", json=body, timeout=120))
    wait_for(lambda: loads(url)["num_running_reqs"] == 1)
    time.sleep(0.2)
    _pause(url, {"mode": "retract"})  # its KV, and the routing filed with it, leave the device
    queued = in_background(lambda: httpx.post(f"{url}/generate", timeout=120, json={
        "input_ids": PROMPT[::-1], "return_routed_experts": True, "sampling_params": GREEDY}))
    wait_for(lambda: loads(url)["num_waiting_reqs"] == 2)
    httpx.post(f"{url}/abort_request", json={"abort_all": True})
    a, never_ran = join().json(), queued().json()
    httpx.post(f"{url}/continue_generation", json={})
    m = a["meta_info"]
    assert m["finish_reason"]["type"] == "abort" and m["completion_tokens"] > 0
    # the same positions computed again, greedily, from a request that runs to its end
    again = generate(url, {"input_ids": PROMPT, "return_routed_experts": True,
                           "sampling_params": LONG | {"max_new_tokens": m["completion_tokens"]}})
    assert again["output_ids"] == a["output_ids"]
    assert base64.b64decode(m["routed_experts"]) == base64.b64decode(again["meta_info"]["routed_experts"])
    # a request aborted before its prompt ran has no routing to report: the key is left out, never short
    assert never_ran["meta_info"]["finish_reason"]["type"] == "abort"
    assert "routed_experts" not in never_ran["meta_info"]
