"""The colocated weight payload (tpfleet.weight_sync's format): what the engine accepts and refuses
before it opens anything, and the HTTP weight routes, which never deserialize code from a request."""

from __future__ import annotations

import base64
import json
import pickle
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tpfleet.config import EngineConfig
from tpfleet.engine.llm_engine import LLMEngine
from tpfleet.engine.sequence import InvalidRequest
from tpfleet.engine.weight_sync import OpenBucket, parse_payload
from tpfleet.server.async_engine import AsyncEngine
from tpfleet.server import weights_api
from tpfleet.server.weights_api import weights_router
from tpfleet.weight_sync import FlattenedBucketSender, update_weights_from_tensor_request

NAMED = [("a", torch.arange(6, dtype=torch.float32).view(2, 3)), ("b", torch.ones(5, dtype=torch.bfloat16)),
         ("c", torch.full((4, 1), 2.5, dtype=torch.float16))]


@contextmanager
def opened(payload: str) -> Iterator[dict[str, torch.Tensor]]:
    """The payload's tensors by name, from its buckets opened as the engine opens them; the views are
    dropped before the buckets close."""
    buckets = [OpenBucket(spec) for spec in parse_payload(payload, "p")]
    got = dict(pair for bucket in buckets for pair in bucket.tensors())
    try:
        yield got
    finally:
        got.clear()
        for bucket in buckets:
            bucket.close()


def test_buckets_roundtrip_through_shared_memory():
    with FlattenedBucketSender(NAMED, bucket_bytes=300) as sender:
        for payload in (sender.payload(), sender.payload(base64_encoded=True)):
            buckets = parse_payload(payload, "p")
            # tensors start on 256-byte boundaries: "c" would end past 300 bytes, so it opens a second bucket
            assert [[entry.name for entry in bucket.tensors] for bucket in buckets] == [["a", "b"], ["c"]]
            with opened(payload) as got:
                for name, tensor in NAMED:
                    assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor)


def test_refill_writes_new_values_behind_the_same_payload():
    with FlattenedBucketSender(NAMED, bucket_bytes=300) as sender:
        payload = sender.payload()
        new = [(name, tensor * 3 + 1) for name, tensor in NAMED]
        sender.refill(new)
        assert sender.payload() == payload
        with opened(payload) as got:
            assert all(torch.equal(got[name], tensor) for name, tensor in new)
        with pytest.raises(ValueError, match=r"tensor 1 is b float32 \[5\], the buckets hold b bfloat16 \[5\]"):
            sender.refill([NAMED[0], ("b", torch.ones(5)), NAMED[2]])
        with pytest.raises(ValueError, match="2 tensors given, the buckets hold 3"):
            sender.refill(NAMED[:2])
        # a refused refill wrote nothing: the buckets still hold the last good values
        with opened(payload) as got:
            assert all(torch.equal(got[name], tensor) for name, tensor in new)


def edited(edit) -> str:
    with FlattenedBucketSender(NAMED) as sender:
        doc = json.loads(sender.payload())
    edit(doc)
    return json.dumps(doc)


def put(path: str, value):
    def edit(doc):
        *parents, last = path
        target = doc
        for key in parents:
            target = target[key]
        target[last] = value
    return edit


T0 = ("buckets", 0, "tensors", 0)
BAD_DOCUMENTS = [
    (put(("format",), "sglang"), "p.format"),
    (put(("version",), 2), "p.version"),
    (put(("buckets",), []), "p.buckets"),
    (put(("buckets", 0, "transport"), "tcp"), "p.buckets[0].transport"),
    (put(("buckets", 0, "shm_name"), "../../etc/passwd"), "p.buckets[0].shm_name"),
    (put(("buckets", 0, "nbytes"), -1), "p.buckets[0].nbytes"),
    (put(("buckets", 0, "extra"), 1), "p.buckets[0].extra"),
    (put((*T0, "dtype"), "float64"), "p.buckets[0].tensors[0].dtype"),
    (put((*T0, "dtype"), "int64"), "p.buckets[0].tensors[0].dtype"),
    (put((*T0, "shape"), [2, -3]), "p.buckets[0].tensors[0].shape"),
    (put((*T0, "shape"), [True]), "p.buckets[0].tensors[0].shape"),
    (put((*T0, "offset"), 2), "p.buckets[0].tensors[0].offset"),  # not a multiple of 4
    (put((*T0, "offset"), 1 << 20), "p.buckets[0].tensors[0].offset"),  # past the bucket's end
    (put((*T0, "name"), "b"), "p.buckets[0].tensors[1].name"),  # "b" named twice: the repeat is at fault
]


@pytest.mark.parametrize("edit, field", BAD_DOCUMENTS, ids=[f for _, f in BAD_DOCUMENTS])
def test_bad_documents_are_refused_naming_the_field(edit, field):
    with pytest.raises(InvalidRequest) as refused:
        parse_payload(edited(edit), "p")
    assert refused.value.field == field


# --- HTTP: nothing from a request is ever unpickled ------------------------------------------------------------

class Planted:
    """Unpickling this creates `path`: the proof that something deserialized it."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return exec, (f"open({str(self.path)!r}, 'w').close()",)


@pytest.fixture(scope="module")
def aengine(tiny_model):
    aengine = AsyncEngine(LLMEngine(EngineConfig(model=str(tiny_model), kv_cache_tokens=2048)))
    yield aengine
    aengine.shutdown()


@pytest.fixture(scope="module")
def client(aengine):
    app = FastAPI()
    app.include_router(weights_router(aengine))
    with TestClient(app) as client:
        yield client


def test_a_planted_pickle_never_runs(client, aengine, tiny_model, tmp_path):
    marker = tmp_path / "pwned"
    planted = pickle.dumps(Planted(marker))
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(Planted(proof)))  # this pickle is live: unpickling it does create the file
    assert proof.exists()
    b64 = base64.b64encode(planted).decode()
    raw = planted.decode("latin-1")
    hidden = aengine.engine.model_config.hidden_size
    with FlattenedBucketSender([("model.norm.weight", torch.ones(hidden))]) as sender:
        good = json.loads(sender.payload())
    ipc = {"device_uuid": "GPU-00000000-0000-0000-0000-000000000000", "handle": b64, "storage_size_bytes": 64,
           "storage_offset_bytes": 0, "ref_counter_handle": b64, "ref_counter_offset": 0, "event_handle": b64,
           "event_sync_required": False}

    def doc(edit) -> str:
        copy = json.loads(json.dumps(good))
        edit(copy)
        return json.dumps(copy)

    def as_cuda_ipc(doc: dict) -> None:
        bucket = doc["buckets"][0]
        del bucket["shm_name"]
        bucket.update(transport="cuda_ipc", cuda_ipc=ipc)

    tensor_route = "/update_weights_from_tensor"
    attempts = [
        (tensor_route, {"serialized_named_tensors": [b64]}, "serialized_named_tensors[0]"),  # SGLang's old form
        (tensor_route, {"serialized_named_tensors": [raw]}, "serialized_named_tensors[0]"),
        (tensor_route, {"serialized_named_tensors": [base64.b64encode(b64.encode()).decode()]},
         "serialized_named_tensors[0]"),
        (tensor_route, {"serialized_named_tensors": [doc(put(("format",), b64))]},
         "serialized_named_tensors[0].format"),
        (tensor_route, {"serialized_named_tensors": [doc(put(("buckets", 0), b64))]},
         "serialized_named_tensors[0].buckets[0].transport"),
        (tensor_route, {"serialized_named_tensors": [doc(put(("buckets", 0, "shm_name"), b64))]},
         "serialized_named_tensors[0].buckets[0].shm_name"),
        (tensor_route, {"serialized_named_tensors": [doc(put((*T0, "name"), b64))]},
         "serialized_named_tensors[0].buckets[0].tensors[0].name"),
        (tensor_route, {"serialized_named_tensors": [doc(put((*T0, "dtype"), b64))]},
         "serialized_named_tensors[0].buckets[0].tensors[0].dtype"),
        (tensor_route, {"serialized_named_tensors": [doc(as_cuda_ipc)]},  # the handles hold the pickle
         "serialized_named_tensors[0].buckets[0].cuda_ipc"),
        (tensor_route, {"serialized_named_tensors": [b64], "load_format": b64}, "load_format"),
        ("/update_weights_from_disk", {"model_path": b64}, "model_path"),
        ("/update_weights_from_disk", {"model_path": str(tiny_model), "load_format": b64}, "load_format"),
        ("/update_weights_from_distributed", {"names": [b64], "dtypes": ["float32"], "shapes": [[1]],
                                              "group_name": "g"}, "names[0]"),
        ("/update_weights_from_distributed", {"names": ["model.norm.weight"], "dtypes": [b64], "shapes": [[1]],
                                              "group_name": "g"}, "dtypes[0]"),
        ("/init_weights_update_group", {"master_address": b64, "master_port": 1, "rank_offset": 1,
                                        "world_size": 2, "group_name": "g", "backend": "gloo"}, "master_address"),
        ("/init_weights_update_group", {"master_address": "127.0.0.1", "master_port": 1, "rank_offset": 1,
                                        "world_size": 2, "group_name": b64, "backend": "gloo"}, "group_name"),
        ("/destroy_weights_update_group", {"group_name": b64}, "group_name"),
    ]
    for route, body, field in attempts:
        response = client.post(route, json=body)
        assert response.status_code == 400, (route, field, response.text)
        answer = response.json()
        assert answer["success"] is False and answer["message"].startswith(field), (field, answer)
    assert not marker.exists()
    # and the engine still takes a good update
    response = client.post("/update_weights_from_disk", json={"model_path": str(tiny_model), "weight_version": "ok"})
    assert response.json() == {"success": True, "message": f"loaded {tiny_model} (weight_version ok)"}


def test_http_tensor_update_and_bodies_checked(client, aengine):
    engine = aengine.engine
    norm = torch.full((engine.model_config.hidden_size,), 0.5)
    with FlattenedBucketSender([("model.norm.weight", norm)]) as sender:
        response = client.post("/update_weights_from_tensor",
                               json=update_weights_from_tensor_request([sender.payload()], weight_version="v2"))
    assert response.json() == {"success": True, "message": "loaded 1 tensors (weight_version v2)"}
    assert engine.weight_version == "v2" and torch.equal(engine.runner.model.norm.weight, norm)
    refused = client.post("/init_weights_update_group", json={"master_address": "127.0.0.1", "master_port": "x",
                                                               "rank_offset": 1, "world_size": 2})
    assert refused.status_code == 400 and refused.json()["message"].startswith("master_port")
    # refused before joining, which would retry an unknown host for minutes with the engine serving nothing
    unknown = client.post("/init_weights_update_group", json={"master_address": "no-such-host.invalid",
                                                              "master_port": 29500, "rank_offset": 1, "world_size": 2,
                                                              "backend": "gloo"})
    assert unknown.status_code == 400 and unknown.json()["message"].startswith("master_address: cannot resolve")
    with socket.socket() as closed:  # a port nothing listens on once this block ends
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(weights_api, "REACH_TIMEOUT_S", 1.0)
        nobody = client.post("/init_weights_update_group", json={"master_address": "127.0.0.1", "master_port": port,
                                                                 "rank_offset": 1, "world_size": 2, "backend": "gloo"})
    assert nobody.status_code == 400 and nobody.json()["message"].startswith("master_port: nothing accepted")
    typo = client.post("/destroy_weights_update_group", json={"group": "g"})
    assert typo.status_code == 400 and typo.json()["message"].startswith("group")
    nested = client.post("/update_weights_from_disk", content=b"[" * 2000 + b"]" * 2000)
    assert nested.status_code == 400 and nested.json()["message"].startswith("body")
    surrogate = client.post("/update_weights_from_disk", content=b'{"model_path": "/tmp/\\ud800"}')
    assert surrogate.status_code == 400 and surrogate.json()["message"].startswith("model_path")
    assert engine.weight_version == "v2"


# --- GPU: CUDA IPC buckets from another process ------------------------------------------------------------

def cuda_sender_main(named: list[tuple[str, list]], queue, done) -> None:
    """A trainer process: share the tensors on cuda:0 and keep them alive until the engine is done."""
    tensors = [(name, torch.tensor(values, device="cuda:0")) for name, values in named]
    with FlattenedBucketSender(tensors, device="cuda:0", bucket_bytes=1 << 10) as sender:
        queue.put(sender.payload())
        done.wait(timeout=120)


@pytest.mark.gpu
def test_cuda_ipc_buckets_open_in_the_engine_process(tiny_model):
    import multiprocessing as mp

    engine = LLMEngine(EngineConfig(model=str(tiny_model), device="cuda", dtype="float32", kv_cache_tokens=2048,
                                    graph_mode="eager"))
    hidden = engine.model_config.hidden_size
    norm = [0.25 * (i % 7) for i in range(hidden)]
    q_rows = torch.arange(engine.model_config.num_attention_heads * engine.model_config.head_dim * hidden,
                          dtype=torch.float32).view(-1, hidden) / 1000
    named = [("model.norm.weight", norm), ("model.layers.0.self_attn.q_proj.weight", q_rows.tolist())]
    context = mp.get_context("spawn")
    queue, done = context.Queue(), context.Event()
    sender = context.Process(target=cuda_sender_main, args=(named, queue, done))
    sender.start()
    try:
        payload = queue.get(timeout=120)
        assert json.loads(payload)["buckets"][0]["transport"] == "cuda_ipc"
        engine.update_weights_from_tensor([payload], "flattened_bucket", "ipc")
        model = engine.runner.model
        assert model.norm.weight.tolist() == norm and engine.weight_version == "ipc"
        rows = q_rows.shape[0]
        torch.testing.assert_close(model.layers[0].self_attn.qkv_proj.weight[:rows].cpu(), q_rows, rtol=0, atol=0)
    finally:
        done.set()
        sender.join(timeout=60)
        engine.shutdown()
    assert sender.exitcode == 0
