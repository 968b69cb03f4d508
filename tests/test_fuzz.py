"""A property-based fuzzer over every route of a served engine: bodies drawn from the route's own JSON
schema (read from /openapi.json), bodies that break it, and raw junk bytes. The property: no answer is
a 5xx, and the server still serves afterwards.

Bounded for CI: TPFLEET_FUZZ_REQUESTS (default 400) requests or TPFLEET_FUZZ_SECONDS (default 30)
seconds, whichever ends first. The reliability bar (docs/reliability.md) runs it with 10,000 requests:
    TPFLEET_FUZZ_REQUESTS=10000 TPFLEET_FUZZ_SECONDS=3600 python3 -m pytest -q tests/test_fuzz.py
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from servers import serving

FUZZ_REQUESTS = int(os.environ.get("TPFLEET_FUZZ_REQUESTS", "400"))
FUZZ_SECONDS = float(os.environ.get("TPFLEET_FUZZ_SECONDS", "30"))

# Valid bodies would wait for a trainer that is not there: fuzzed with broken bodies only.
NEEDS_A_PEER = {"/init_weights_update_group", "/update_weights_from_distributed"}
# After a call that stops the engine serving, put it back: (route, its undo, the undo's body).
RESTORE = {"/pause_generation": ("/continue_generation", {}),
           "/release_memory_occupation": ("/resume_memory_occupation", {})}
# Token budgets are cut to at most 8 so that valid requests stay cheap; values past this stay as drawn
# (the server must refuse them).
BUDGET_FIELDS = {"max_new_tokens", "max_tokens", "max_completion_tokens", "min_new_tokens"}
HUGE = 10**6

JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
# Text with the odd lone surrogate, which JSON can carry as an escape ("\ud800").
TEXT = st.text(alphabet=st.characters(exclude_categories=("Cs",)) | st.characters(categories=("Cs",)),
               max_size=24)


def from_schema(schema: dict, defs: dict) -> st.SearchStrategy:
    """Values that a JSON schema (OpenAPI 3.1, as pydantic writes it) allows."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[1]
        return st.deferred(lambda: from_schema(defs[name], defs))
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return st.one_of([from_schema(option, defs) for option in schema[key]])
    if "allOf" in schema:
        return from_schema(schema["allOf"][0], defs)
    kind = schema.get("type")
    if isinstance(kind, list):
        return st.one_of([from_schema({**schema, "type": k}, defs) for k in kind])
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        low, high = schema.get("minimum"), schema.get("maximum")
        if low is not None or high is not None:
            return st.integers(low, high)
        return st.integers(-3, 64) | st.integers()
    if kind == "number":
        return st.floats(-4, 4) | st.floats()  # NaN and infinities too: Python's JSON carries them
    if kind == "string":
        return TEXT
    if kind == "array":
        items = from_schema(schema.get("items", {}), defs)
        return st.lists(items, min_size=schema.get("minItems", 0), max_size=min(schema.get("maxItems", 4), 4))
    if kind == "object" or "properties" in schema:
        properties = schema.get("properties", {})
        required = set(schema.get("required", ()))
        return st.fixed_dictionaries(
            {name: from_schema(sub, defs) for name, sub in properties.items() if name in required},
            optional={name: from_schema(sub, defs) for name, sub in properties.items() if name not in required})
    return JSON_VALUES


def cheap(value):
    """`value` with token budgets under HUGE cut to at most 8."""
    if isinstance(value, dict):
        return {key: (sub % 9 if key in BUDGET_FIELDS and isinstance(sub, int) and 8 < sub < HUGE else cheap(sub))
                for key, sub in value.items()}
    if isinstance(value, list):
        return [cheap(sub) for sub in value]
    return value


def _object_schema(schema: dict, defs: dict) -> dict:
    """The object a body schema describes, also when the body is optional (`anyOf: [object, null]`)."""
    if "$ref" in schema:
        return _object_schema(defs[schema["$ref"].rsplit("/", 1)[1]], defs)
    for option in schema.get("anyOf", ()):
        if "$ref" in option or option.get("type") == "object":
            return _object_schema(option, defs)
    return schema


def broken(schema: dict, defs: dict, peer: bool) -> st.SearchStrategy:
    """Bodies that break an object schema: a required key dropped, an unknown key, a value of any JSON
    type in place of a declared one, or not an object at all."""
    schema = _object_schema(schema, defs)
    valid = from_schema(schema, defs).filter(lambda v: isinstance(v, dict))
    required = sorted(schema.get("required", ()))
    properties = sorted(schema.get("properties", {}))
    options = [JSON_VALUES.filter(lambda v: not isinstance(v, dict))]
    if required:
        options.append(st.tuples(valid, st.sampled_from(required)).map(
            lambda pair: {k: v for k, v in pair[0].items() if k != pair[1]}))
    if not peer:
        options.append(st.tuples(valid, st.text(min_size=1, max_size=10), JSON_VALUES).map(
            lambda t: {**t[0], f"x_{t[1]}": t[2]}))
        if properties:
            options.append(st.tuples(valid, st.sampled_from(properties), JSON_VALUES).map(
                lambda t: {**t[0], t[1]: t[2]}))
    return st.one_of(options)


JUNK = st.one_of(
    st.binary(max_size=64),
    st.binary(max_size=16).map(lambda b: b'{"text": "' + b"\xff\xfe" + b + b'"}'),  # invalid UTF-8
    st.sampled_from([b"{", b"[]", b"null", b'{"a":', b'"\\ud800"', b"1e999999", b"[" * 2000 + b"]" * 2000]),
)


def request_strategy(spec: dict) -> st.SearchStrategy:
    """(method, path, kind, body bytes) for every operation of the spec, plus wrong methods and paths."""
    defs = spec.get("components", {}).get("schemas", {})
    options = []
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            schema = (operation.get("requestBody", {}).get("content", {}).get("application/json", {})
                      .get("schema"))
            method = method.upper()
            if schema is None:
                options.append(st.just((method, path, "no body", b"")))
                continue
            peer = path in NEEDS_A_PEER
            if not peer:
                options.append(from_schema(schema, defs).map(
                    lambda body, m=method, p=path: (m, p, "valid", json.dumps(cheap(body)).encode())))
            options.append(broken(schema, defs, peer).map(
                lambda body, m=method, p=path: (m, p, "broken", json.dumps(body).encode())))
            options.append(JUNK.map(lambda body, m=method, p=path: (m, p, "junk", body)))
    options.append(st.tuples(st.sampled_from(["GET", "POST", "PUT", "DELETE"]), st.sampled_from(sorted(spec["paths"])))
                   .map(lambda t: (t[0], t[1], "any method", b"{}")))
    options.append(st.text(alphabet="abcdefghijklmnopqrstuvwxyz_/.%", max_size=20)
                   .map(lambda p: ("POST", "/" + p, "unknown path", b"{}")))
    return st.one_of(options)


@pytest.fixture(scope="module")
def fuzz_server(tiny_model):
    """A server of its own: the fuzzer pauses, flushes and aborts, which the shared one must not see."""
    with serving(tiny_model, 2, "--kv-cache-tokens", "4096") as url:
        yield url


def _send(client: httpx.Client, method: str, path: str, body: bytes) -> httpx.Response:
    headers = {"content-type": "application/json"}
    request = client.build_request(method, path, content=body if method != "GET" else None, headers=headers)
    response = client.send(request, stream=True)
    try:
        response.read()  # a stream too, to its end
    finally:
        response.close()
    return response


def test_no_request_gets_a_5xx_and_the_server_lives(fuzz_server):
    with httpx.Client(base_url=fuzz_server, timeout=60) as client:
        spec = client.get("/openapi.json").json()
        deadline = time.monotonic() + FUZZ_SECONDS
        sent: Counter[tuple[str, int]] = Counter()

        @settings(max_examples=FUZZ_REQUESTS, deadline=None, database=None, phases=(Phase.generate,),
                  suppress_health_check=list(HealthCheck))
        @given(request_strategy(spec))
        def one_request(request):
            if time.monotonic() > deadline:
                return
            method, path, kind, body = request
            response = _send(client, method, path, body)
            sent[(kind, response.status_code)] += 1
            assert response.status_code < 500, (method, path, kind, body[:300], response.text[:500])
            if path in RESTORE:
                undo, undo_body = RESTORE[path]
                assert client.post(undo, json=undo_body).status_code < 500

        one_request()
        total = sum(sent.values())
        print(f"fuzz: {total} requests in {FUZZ_SECONDS - (deadline - time.monotonic()):.0f}s: "
              + ", ".join(f"{kind} {status}: {n}" for (kind, status), n in sorted(sent.items())))
        assert total >= min(FUZZ_REQUESTS, 50)
        assert client.get("/health").status_code == 200
        answer = client.post("/generate", json={"input_ids": [1, 2, 3], "sampling_params": {
            "max_new_tokens": 4, "ignore_eos": True, "temperature": 0}})
        assert answer.status_code == 200 and len(answer.json()["output_ids"]) == 4, answer.text
