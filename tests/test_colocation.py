"""Colocation with a trainer: memory tags released and resumed, weights updated between, outputs unchanged.

The CPU tests run the saver-off path (tpfleet.memory.NullSaver) through the HTTP server and the driver's
bookkeeping for weights that come back without values; the GPU tests run the memory saver itself.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch
from conftest import NUM_GPUS
from safetensors import safe_open
from servers import serving

from tpfleet.bench.colocate import trainer_payload
from tpfleet.config import EngineConfig
from tpfleet.memory import TAGS, NullSaver
from tpfleet.model.loader import checkpoint_files
from tpfleet.weight_sync import FlattenedBucketSender, update_weights_from_tensor_request

PROMPT = [5, 6, 7, 8, 9, 10]
GREEDY = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}


def checkpoint_tensors(model_dir: Path) -> list[tuple[str, torch.Tensor]]:
    named = []
    for path in checkpoint_files(Path(model_dir)):
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            named += [(name, handle.get_tensor(name)) for name in handle.keys()]
    return named


# --- through the HTTP server, the saver off (CPU) ---------------------------------------------------------

@pytest.fixture(scope="module")
def colocated(tiny_model):
    with serving(tiny_model, 1, "--kv-cache-tokens", "4096") as url:
        yield url


def generate(url: str) -> httpx.Response:
    return httpx.post(f"{url}/generate", json={"input_ids": PROMPT, "sampling_params": GREEDY}, timeout=60)


def post(url: str, route: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}{route}", json=body, timeout=60)


def test_each_tag_releases_and_resumes_and_generation_waits_for_it(colocated):
    before = generate(colocated).json()["output_ids"]
    for tags in (["weights"], ["kv_cache"], ["cuda_graph"], None):
        released = post(colocated, "/release_memory_occupation", {"tags": tags})
        assert released.status_code == 200, released.text
        body = released.json()
        assert body["released"] == (tags or list(TAGS))
        per_tag = body["ranks"][0]["bytes_per_tag"]
        assert set(per_tag) == set(TAGS)
        if tags is None or "kv_cache" in tags:
            assert per_tag["kv_cache"] > 0 and body["released_tensor_bytes"] >= per_tag["kv_cache"]
        again = post(colocated, "/release_memory_occupation", {"tags": tags}).json()
        assert again["released_tensor_bytes"] == 0  # already released: nothing more to give
        refused = generate(colocated)
        assert refused.status_code == 503 and "resume" in refused.json()["error"]["message"]
        assert post(colocated, "/resume_memory_occupation", {"tags": tags}).status_code == 200
        assert generate(colocated).json()["output_ids"] == before


def test_release_resume_update_cycle_keeps_outputs(colocated, tiny_model):
    before = generate(colocated).json()["output_ids"]
    assert post(colocated, "/release_memory_occupation", {}).status_code == 200
    with FlattenedBucketSender(checkpoint_tensors(tiny_model)) as sender:
        request = update_weights_from_tensor_request([sender.payload()], weight_version="cycle-1")
        early = post(colocated, "/update_weights_from_tensor", request)
        assert early.status_code == 400 and "resume" in early.json()["message"]  # the weights are away
        assert post(colocated, "/resume_memory_occupation", {}).status_code == 200
        updated = post(colocated, "/update_weights_from_tensor", request)
        assert updated.status_code == 200 and updated.json()["success"], updated.text
    after = generate(colocated).json()
    assert after["output_ids"] == before and after["meta_info"]["weight_version"] == "cycle-1"


def test_release_while_running_is_refused_and_allowed_after_a_retract(colocated):
    body = {"input_ids": PROMPT, "rid": "long-1", "stream": True,
            "sampling_params": {"max_new_tokens": 3000, "ignore_eos": True}}
    with httpx.stream("POST", f"{colocated}/generate", json=body, timeout=60) as stream:
        lines = stream.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        busy = post(colocated, "/release_memory_occupation", {"tags": ["kv_cache"]})
        assert busy.status_code == 400 and "in flight" in busy.json()["error"]["message"]
        assert post(colocated, "/pause_generation", {"mode": "retract"}).status_code == 200
        released = post(colocated, "/release_memory_occupation", {"tags": ["kv_cache"]})
        assert released.status_code == 200, released.text
        assert post(colocated, "/resume_memory_occupation", {"tags": ["kv_cache"]}).status_code == 200
        assert post(colocated, "/continue_generation", {}).status_code == 200
        post(colocated, "/abort_request", {"rid": "long-1"})
        assert any('"finish_reason"' in line for line in lines)


# --- the driver's bookkeeping of weights that come back without values --------------------------------------

class ForgetfulSaver(NullSaver):
    """A saver that says it is on and keeps no backup: what the engine sees of the memory saver on a GPU."""

    enabled = True
    cpu_backup = frozenset()


def test_weights_released_without_backup_refuse_generation_until_fully_updated(tiny_model):
    from tpfleet.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(model=str(tiny_model), kv_cache_tokens=1024))
    try:
        engine.runner.saver = ForgetfulSaver()
        assert engine.unavailable_reason() is None
        engine.release_memory(["weights"])
        assert "resume" in engine.unavailable_reason()
        reports = engine.resume_memory(["weights"])
        assert reports[0]["weights_defined"] is False
        assert "update the weights" in engine.unavailable_reason()
        named = checkpoint_tensors(tiny_model)
        with FlattenedBucketSender(named[:3]) as sender:
            engine.update_weights_from_tensor([sender.payload()])
        assert engine.stale_weights is not None and len(engine.stale_weights) == len(named) - 3
        with FlattenedBucketSender(named[3:]) as sender:
            engine.update_weights_from_tensor([sender.payload()], weight_version="whole")
        assert engine.unavailable_reason() is None and engine.weight_version == "whole"
    finally:
        engine.shutdown()


def test_bench_colocate_on_cpu(tiny_model, tmp_path):
    from tpfleet.bench.colocate import bench_colocate

    result = bench_colocate(EngineConfig(model=str(tiny_model), kv_cache_tokens=1024), str(tmp_path), cycles=2)
    assert result["outputs_equal"] is True and result["graphs_recaptured"] is False
    assert len(result["per_cycle"]) == 2 and all(r["released_bytes_per_tag"]["kv_cache"] > 0
                                                   for r in result["per_cycle"])
    for phase in ("release", "resume", "update"):
        assert result[phase]["min_ms"] <= result[phase]["median_ms"] <= result[phase]["max_ms"]
    assert result["update"]["floor_ms"] > 0 and result["update"]["vs_floor"] > 0
    # the update is timed end to end: the trainer's refill is a part of it
    assert all(0 < r["refill_s"] < r["update_s"] and 0 < r["stage_s"] + r["commit_s"] < r["update_s"]
               for r in result["per_cycle"])
    assert Path(result["json"]).is_file()


# --- the memory saver on a GPU ------------------------------------------------------------------------------

def saver_config(model: Path, tp_size: int = 1, **extra) -> EngineConfig:
    return EngineConfig(**{"model": str(model), "tp_size": tp_size, "device": "cuda", "enable_memory_saver": True,
                           "mem_fraction_static": 0.3, "graph_mode": "full", **extra})


def greedy(engine, prompts=(PROMPT, [11, 12, 13], [3] * 20)) -> list[list[int]]:
    from tpfleet.engine.sequence import SamplingParams

    params = SamplingParams(temperature=0.0, max_new_tokens=16, ignore_eos=True)
    seqs = [engine.add_request(prompt, params) for prompt in prompts]
    while engine.has_work():
        engine.step()
    return [seq.completion_ids for seq in seqs]


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    from tpfleet.model.make_model import make_model

    return make_model("small", tmp_path_factory.mktemp("small"))


@pytest.mark.gpu
def test_saver_frees_memory_keeps_addresses_and_graphs(small_model):
    from tpfleet.engine.llm_engine import LLMEngine

    engine = LLMEngine(saver_config(small_model, graph_mode="piecewise"))
    try:
        runner = engine.runner
        device = runner.device
        before = greedy(engine)
        pointers = [param.data_ptr() for param in runner.model.parameters()]
        graphs = dict(runner.decode_graphs.graphs)
        captures = runner.num_graph_captures
        held = sum(runner.saver.bytes().values())
        free_before = torch.cuda.mem_get_info(device)[0]
        report = engine.release_memory(list(TAGS))[0]
        freed = torch.cuda.mem_get_info(device)[0] - free_before
        assert freed >= 0.95 * held and report["device_freed_bytes"] >= 0.95 * held
        assert set(runner.saver.released) == set(TAGS)
        engine.resume_memory(list(TAGS))
        assert [param.data_ptr() for param in runner.model.parameters()] == pointers
        assert runner.decode_graphs.graphs == graphs and runner.num_graph_captures == captures
        assert engine.unavailable_reason() is not None  # no backup: the weights hold nothing yet
        dtype = str(runner.dtype).removeprefix("torch.")
        with trainer_payload(str(small_model), str(device), dtype) as (payload, _):  # CUDA IPC from another process
            engine.update_weights_from_tensor([payload], "flattened_bucket")
            assert engine.unavailable_reason() is None and greedy(engine) == before
            free_first = None
            for _ in range(20):
                engine.release_memory(list(TAGS))
                engine.resume_memory(list(TAGS))
                engine.update_weights_from_tensor([payload], "flattened_bucket")
                torch.cuda.synchronize(device)
                free = torch.cuda.mem_get_info(device)[0]
                free_first = free_first or free
        assert abs(free - free_first) <= 0.01 * free_first
        assert greedy(engine) == before and runner.num_graph_captures == captures
        # A batch and a prefill of sizes not run before: their graphs are captured now, after twenty cycles,
        # into resumed memory, and decode what a fresh engine's do.
        lazily = {"decode": set(runner.decode_graphs.graphs), "piecewise": set(runner.piecewise_graphs.graphs)}
        alone = greedy(engine, [PROMPT])
        assert 1 in set(runner.decode_graphs.graphs) - lazily["decode"]
        assert set(runner.piecewise_graphs.graphs) - lazily["piecewise"]
    finally:
        engine.shutdown()
    fresh = LLMEngine(saver_config(small_model, graph_mode="piecewise", enable_memory_saver=False))
    try:
        assert greedy(fresh, [PROMPT]) == alone
    finally:
        fresh.shutdown()


@pytest.mark.gpu
def test_cpu_backup_restores_weights_without_an_update(small_model):
    from tpfleet.engine.llm_engine import LLMEngine

    engine = LLMEngine(saver_config(small_model, weights_cpu_backup=True))
    try:
        before = greedy(engine)
        engine.release_memory(list(TAGS))
        engine.resume_memory(list(TAGS))
        assert engine.unavailable_reason() is None and greedy(engine) == before
    finally:
        engine.shutdown()


@pytest.mark.gpu
def test_saver_memory_is_not_ipc_exportable_but_comm_memory_is(small_model):
    import ctypes

    from tpfleet.comm.custom_ar import load_library
    from tpfleet.engine.llm_engine import LLMEngine
    from tpfleet.memory import ipc_exportable

    engine = LLMEngine(saver_config(small_model))
    try:
        runner = engine.runner
        assert not ipc_exportable(next(runner.model.parameters()))
        assert not ipc_exportable(runner.kv_cache)
        assert not ipc_exportable(runner.decode_graphs.longs)
        comm = load_library(runner.device)  # how the custom all-reduce allocates every region it shares
        region = ctypes.c_void_p()
        assert comm.tpf_malloc_zeroed(runner.device.index, 1 << 20, ctypes.byref(region)) == 0
        try:
            assert ipc_exportable(region.value, runner.device)
        finally:
            comm.tpf_free(region.value)
    finally:
        engine.shutdown()


@pytest.mark.gpu
@pytest.mark.skipif(NUM_GPUS < 2, reason="needs 2 GPUs")
def test_custom_all_reduce_in_graphs_with_the_saver_at_tp2(small_model):
    from tpfleet.engine.llm_engine import LLMEngine
    from tpfleet.memory import ipc_exportable

    engine = LLMEngine(saver_config(small_model, tp_size=2, weights_cpu_backup=True))
    try:
        before = greedy(engine)
        for _ in range(3):
            reports = engine.release_memory(list(TAGS))
            assert all(report["device_freed_bytes"] > 0 for report in reports)
            resumed = engine.resume_memory(list(TAGS))
            assert all(report["weights_defined"] for report in resumed)
        assert greedy(engine) == before
        assert [report["graph_captures"] for report in engine.resume_memory([])] == [1, 1]
        custom = engine.runner.tp.comm.custom  # its regions were made outside the saver: still shareable
        assert custom is not None and ipc_exportable(custom._region, engine.runner.device)
    finally:
        engine.shutdown()
