"""New weights into running CPU engines: from a trainer process over a gloo group, from shared-memory
buckets, from disk; and refused updates, which must leave outputs and weight_version as they were.
transformers on the perturbed tiny checkpoint is the source of truth for the expected outputs."""

from __future__ import annotations

import json
import multiprocessing as mp
import shutil
import socket
import threading
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world, rendezvous
from transformers import AutoModelForCausalLM

from tpfleet.config import EngineConfig
from tpfleet.engine.llm_engine import LLMEngine
from tpfleet.engine.sequence import InvalidRequest, SamplingParams
from tpfleet.model.loader import checkpoint_files
from tpfleet.weight_sync import (
    FlattenedBucketSender,
    broadcast_weights,
    init_weights_update_group,
    trainer_store,
    update_weights_from_distributed_request,
)

PROMPTS = ["Hello, world! How are you today?", "def add(a, b):", "The river flows from the mountains"]
NEW_TOKENS = 8
GROUP = "trainer-push"
SGLANG_GROUP = "sglang-style-push"


def perturbed_model(model_dir: str) -> torch.nn.Module:
    """The tiny checkpoint in transformers, every parameter moved by seeded noise of half its spread."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for _, param in model.named_parameters():
            param.add_(torch.randn(param.shape, generator=generator) * param.std().clamp(min=1e-3) * 0.5)
    return model


def hf_greedy(model: torch.nn.Module, prompts: list[list[int]]) -> list[list[int]]:
    outs = []
    for ids in prompts:
        out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
        outs.append(out[0, len(ids):].tolist())
    return outs


def greedy(engine: LLMEngine, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    seqs = [engine.add_request(ids, params) for ids in prompts]
    while engine.has_work():
        engine.step()
    return [seq.completion_ids for seq in seqs]


@pytest.fixture(scope="module")
def engine(tiny_model):
    engine = LLMEngine(EngineConfig(model=str(tiny_model), tp_size=2, kv_cache_tokens=4096))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def prompts(engine):
    return [engine.tokenizer(text).input_ids for text in PROMPTS]


@pytest.fixture(scope="module")
def trained(tiny_model, prompts):
    """The perturbed model's parameters (checkpoint names) and transformers' greedy outputs of it."""
    model = perturbed_model(str(tiny_model))
    with torch.no_grad():
        expected = hf_greedy(model, prompts)
    return [(name, param.detach().clone()) for name, param in model.named_parameters()], expected


@pytest.fixture
def original(engine, tiny_model, prompts):
    """The engine back on the original checkpoint; its outputs."""
    engine.update_weights_from_disk(str(tiny_model), "original")
    return greedy(engine, prompts)


def test_tensor_update_over_shared_memory_matches_transformers(engine, prompts, trained, original):
    named, expected = trained
    assert original != expected  # the perturbation changes what greedy decoding picks
    with FlattenedBucketSender(named, bucket_bytes=256 << 10) as sender:
        assert len(sender.buckets) > 1
        # one payload per TP rank, the second as base64 of the same JSON
        engine.update_weights_from_tensor([sender.payload(), sender.payload(base64_encoded=True)],
                                          "flattened_bucket", "step-1")
    assert engine.weight_version == "step-1"
    assert greedy(engine, prompts) == expected


def test_an_update_while_a_request_runs_forgets_every_cached_prefix(engine, prompts, trained, original):
    """RL's usual step pushes weights while requests hold KV blocks (paused in place, or still running): no KV
    the old weights computed may serve a later request, whose outputs are the new weights' own."""
    named, _ = trained
    long = [ids * 4 for ids in prompts]  # full blocks of prompt: what the prefix cache holds
    before = greedy(engine, long)  # now cached, computed by the original weights
    running = engine.add_request(long[0] + [7], SamplingParams(max_new_tokens=50, temperature=0.0, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.block_manager.num_free_blocks < engine.block_manager.num_blocks
    with FlattenedBucketSender(named) as sender:
        engine.update_weights_from_tensor([sender.payload(), sender.payload()], "flattened_bucket", "step-1")
    engine.abort(running.rid)
    after = greedy(engine, long)
    assert engine.flush_cache()
    assert after == greedy(engine, long) != before  # what the new weights compute from nothing cached


def test_partial_tensor_update_of_fused_projections(engine, prompts, trained, original):
    """q/k/v and gate/up land in fused parameters shard by shard: a bucket per tensor (load_format null)
    of one layer's tensors changes exactly that layer."""
    named, _ = trained
    layer0 = [(name, tensor) for name, tensor in named if ".layers.0." in name]
    with FlattenedBucketSender(layer0, bucket_bytes=1) as sender:
        assert len(sender.buckets) == len(layer0)
        engine.update_weights_from_tensor([sender.payload()], None, None)
    assert engine.weight_version == "original"  # no version given: unchanged
    attention = engine.runner.model.layers[0].self_attn
    rows = attention.num_heads * attention.head_dim  # rank 0's q heads lead its fused qkv weight
    full_q = dict(layer0)["model.layers.0.self_attn.q_proj.weight"]
    torch.testing.assert_close(attention.qkv_proj.weight[:rows], full_q[:rows])
    assert greedy(engine, prompts) != original


def test_disk_update_roundtrip(engine, prompts, trained, original, tiny_model, tmp_path):
    named, expected = trained
    checkpoint = write_checkpoint(tiny_model, tmp_path / "step-2", dict(named))
    engine.update_weights_from_disk(str(checkpoint), "step-2")
    assert (engine.weight_version, greedy(engine, prompts)) == ("step-2", expected)


def write_checkpoint(model_dir: Path, dst: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """`model_dir`'s config and tokenizer with `tensors` as one model.safetensors."""
    dst.mkdir()
    for path in model_dir.iterdir():
        if not path.name.startswith("model"):
            shutil.copy(path, dst / path.name)
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, dst / "model.safetensors")
    return dst


def checkpoint_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    return {name: tensor for path in checkpoint_files(model_dir) for name, tensor in load_file(path).items()}


@pytest.fixture
def make_payload():
    """Real shared-memory payloads, optionally edited as JSON documents; their buffers live until the test ends."""
    senders = []

    def make(named, edit=None) -> str:
        senders.append(FlattenedBucketSender(named, bucket_bytes=64 << 10))
        doc = json.loads(senders[-1].payload())
        if edit is not None:
            edit(doc)
        return json.dumps(doc)

    yield make
    for sender in senders:
        sender.close()


def set_entry(key, value, bucket=0, tensor=0):
    def edit(doc):
        doc["buckets"][bucket]["tensors"][tensor][key] = value
    return edit


def missing_segment(doc):
    doc["buckets"][-1]["shm_name"] = "tpfleet-test-no-such-segment"  # every other bucket opens fine


def bad_checkpoint(kind: str, tiny_model: Path, tmp_path: Path) -> str:
    tensors = checkpoint_tensors(tiny_model)
    if kind == "symlink-outside-root":
        link = tmp_path / "link"
        link.symlink_to("/usr")
        return str(link)
    if kind == "missing-tensor":
        del tensors["model.layers.1.mlp.down_proj.weight"]
    elif kind == "wrong-shape":
        tensors["model.norm.weight"] = torch.ones(3)
    checkpoint = write_checkpoint(tiny_model, tmp_path / kind, tensors)
    if kind == "index-escape":
        save_file({"model.norm.weight": tensors["model.norm.weight"]}, tmp_path / "outside.safetensors")
        weight_map = {name: "model.safetensors" for name in tensors}
        weight_map["model.norm.weight"] = "../outside.safetensors"
        (checkpoint / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return str(checkpoint)


REFUSED_TENSOR_UPDATES = [
    ("missing tensor bytes", set_entry("offset", 1 << 30), "offset"),
    ("wrong shape", set_entry("shape", [7, 7]), "shape"),
    ("bad dtype", set_entry("dtype", "int64"), "dtype"),
    ("unknown tensor", set_entry("name", "model.layers.9.secret.weight"), "name"),
    ("a bucket that does not open", missing_segment, "shm_name"),
]


@pytest.mark.parametrize("case, edit, field", REFUSED_TENSOR_UPDATES, ids=[c[0] for c in REFUSED_TENSOR_UPDATES])
def test_refused_tensor_update_changes_nothing(engine, prompts, trained, original, make_payload, case, edit, field):
    named, _ = trained
    with pytest.raises(InvalidRequest) as refused:
        engine.update_weights_from_tensor([make_payload(named, edit)], "flattened_bucket", "bad")
    assert refused.value.field.startswith("serialized_named_tensors[0]") and refused.value.field.endswith(field)
    assert (engine.weight_version, greedy(engine, prompts)) == ("original", original)


def test_ranks_given_different_tensors_change_nothing(engine, prompts, trained, original):
    named, _ = trained
    with FlattenedBucketSender(named) as full, FlattenedBucketSender(named[:-1]) as partial:
        with pytest.raises(InvalidRequest, match="different tensors"):
            engine.update_weights_from_tensor([full.payload(), partial.payload()], "flattened_bucket", "bad")
    assert (engine.weight_version, greedy(engine, prompts)) == ("original", original)


@pytest.mark.parametrize("kind, reason", [("missing-tensor", "lacks 1 tensors"), ("wrong-shape", "has shape"),
                                          ("index-escape", "leaves the checkpoint directory"),
                                          ("symlink-outside-root", "outside the allowed weight roots")])
def test_refused_disk_update_changes_nothing(engine, prompts, original, tiny_model, tmp_path, kind, reason):
    with pytest.raises(InvalidRequest, match=reason) as refused:
        engine.update_weights_from_disk(bad_checkpoint(kind, tiny_model, tmp_path), "bad")
    assert refused.value.field == "model_path"
    assert (engine.weight_version, greedy(engine, prompts)) == ("original", original)


@pytest.mark.parametrize("kind, error", [("missing-tensor", "lacks 1 tensors"),
                                         ("wrong-shape", "'model.norm.weight' of shape \\[3\\] does not fit")])
def test_an_engine_whose_checkpoint_is_wrong_refuses_to_start(tiny_model, tmp_path, kind, error):
    """A tensor missing or of a shape its parameter cannot take from is named, not a bare torch error."""
    with pytest.raises(ValueError, match=error):
        LLMEngine(EngineConfig(model=bad_checkpoint(kind, tiny_model, tmp_path), device="cpu", kv_cache_tokens=4096))


def test_disk_update_outside_the_allowed_root_is_refused(engine, original):
    with pytest.raises(InvalidRequest, match="outside the allowed weight roots"):
        engine.update_weights_from_disk("/usr", "bad")
    assert engine.weight_version == "original"


@pytest.mark.parametrize("change, field", [
    ({"dtypes": ["int8"]}, "dtypes[0]"),
    ({"shapes": [[3, 3]]}, "shapes[0]"),
    ({"names": ["model.nothing"]}, "names[0]"),
    ({"group_name": "never-made"}, "group_name"),
])
def test_refused_distributed_update_is_refused_before_receiving(engine, change, field):
    request = {"names": ["model.norm.weight"], "dtypes": ["float32"],
               "shapes": [[engine.model_config.hidden_size]], "group_name": GROUP, **change}
    with pytest.raises(InvalidRequest) as refused:
        engine.update_weights_from_distributed(**request, weight_version="bad")
    assert refused.value.field == field


# --- a trainer process pushing over a gloo group ----------------------------------------------------------

def trainer_main(model_dir: str, world_size: int, prompts: list[list[int]], queue: mp.Queue) -> None:
    """Rank 0: serve the rendezvous, join the group, tell the engines what comes, broadcast it (half one
    tensor at a time, half as one flattened bucket), and report transformers' greedy outputs. Then the
    same once more with a group made the way SGLang's `init_custom_process_group` (and Miles' copy)
    makes one, to show such a trainer joins a tpfleet engine."""
    model = perturbed_model(model_dir)
    store = trainer_store("127.0.0.1", 0, world_size)
    queue.put(("port", store.port))
    group = init_weights_update_group("127.0.0.1", store.port, world_size, GROUP, "gloo", store=store)
    named = [(name, param.detach()) for name, param in model.named_parameters()]
    half = len(named) // 2
    for part, load_format in ((named[:half], None), (named[half:], "flattened_bucket")):
        queue.put(("request", update_weights_from_distributed_request(part, GROUP, "pushed", load_format)))
        broadcast_weights(group, part, load_format)
    with torch.no_grad():
        queue.put(("expected", hf_greedy(model, prompts)))
    group.destroy()

    port = free_port()
    queue.put(("port", port))
    sglang_group = sglang_style_group(port, world_size, SGLANG_GROUP)
    norm = model.model.norm.weight.detach() * 2
    queue.put(("request", update_weights_from_distributed_request([("model.norm.weight", norm)], SGLANG_GROUP,
                                                                  "sglang-style")))
    dist.broadcast(norm, 0, group=sglang_group)
    queue.put(("norm", norm.tolist()))  # plain data: a tensor would travel as a handle into this exiting process


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sglang_style_group(port: int, world_size: int, group_name: str) -> dist.ProcessGroup:
    """Rank 0 of a group built as SGLang's init_custom_process_group builds it: a tcp:// rendezvous, a
    PrefixStore named after the group, then torch's own group constructor."""
    timeout = timedelta(minutes=2)
    store, _, _ = next(rendezvous(f"tcp://127.0.0.1:{port}", 0, world_size, timeout=timeout))
    group, _ = _new_process_group_helper(world_size, 0, [], Backend("gloo"), PrefixStore(group_name, store),
                                         group_name=group_name, timeout=timeout)
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


def receive(engine: LLMEngine, request: dict) -> list[dict]:
    """The HTTP body's fields, as the engine method takes them (it always resets the prefix cache)."""
    return engine.update_weights_from_distributed(**{k: v for k, v in request.items() if k != "flush_cache"})


def on_each(engines: list[LLMEngine], call) -> list:
    """`call(engine, i)` on every engine at once (each blocks in collectives until all are in)."""
    results, errors = [None] * len(engines), []

    def run(i):
        try:
            results[i] = call(engines[i], i)
        except BaseException as error:  # noqa: BLE001 - re-raised below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(engines))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    if errors:
        raise errors[0]
    return results


def test_distributed_update_from_a_trainer_process(engine, prompts, tiny_model, original):
    """Two engines (TP=2 as ranks 1-2, TP=1 as rank 3) receive one trainer's broadcast."""
    second = LLMEngine(EngineConfig(model=str(tiny_model), tp_size=1, kv_cache_tokens=4096))
    engines, offsets, world_size = [engine, second], [1, 3], 4
    context = mp.get_context("spawn")
    queue = context.Queue()
    trainer = context.Process(target=trainer_main, args=(str(tiny_model), world_size, prompts, queue))
    trainer.start()
    try:
        kind, port = queue.get(timeout=120)
        assert kind == "port"
        joined = on_each(engines, lambda e, i: e.init_weights_update_group("127.0.0.1", port, offsets[i],
                                                                           world_size, GROUP, "gloo"))
        assert [[r["group_rank"] for r in reports] for reports in joined] == [[1, 2], [3]]
        for _ in range(2):
            kind, request = queue.get(timeout=120)
            assert kind == "request"
            on_each(engines, lambda e, i: receive(e, request))
        kind, expected = queue.get(timeout=120)
        assert expected != original
        for each in engines:
            assert each.weight_version == "pushed"
            assert greedy(each, prompts) == expected
        on_each(engines, lambda e, i: e.destroy_weights_update_group(GROUP))

        kind, port = queue.get(timeout=120)
        on_each(engines, lambda e, i: e.init_weights_update_group("127.0.0.1", port, offsets[i], world_size,
                                                                  SGLANG_GROUP, "gloo"))
        kind, request = queue.get(timeout=120)
        on_each(engines, lambda e, i: receive(e, request))
        kind, norm = queue.get(timeout=120)
        for each in engines:
            assert each.weight_version == "sglang-style"
            assert each.runner.model.norm.weight.tolist() == norm
        on_each(engines, lambda e, i: e.destroy_weights_update_group(SGLANG_GROUP))
    finally:
        trainer.join(timeout=60)
        if trainer.is_alive():
            trainer.kill()
        second.shutdown()
    assert trainer.exitcode == 0


def test_tied_embeddings_take_an_lm_head_or_none(tied_model):
    """A tied checkpoint has no lm_head.weight: a disk update is complete without it, and a trainer that
    sends one anyway (its embedding under the head's name) is accepted."""
    engine = LLMEngine(EngineConfig(model=str(tied_model), kv_cache_tokens=2048))
    try:
        engine.update_weights_from_disk(str(tied_model), "disk")
        embed = engine.runner.model.embed_tokens.weight.detach().clone()
        with FlattenedBucketSender([("model.embed_tokens.weight", embed * 2), ("lm_head.weight", embed * 2)]) as sender:
            engine.update_weights_from_tensor([sender.payload()], "flattened_bucket", "tensor")
        assert engine.weight_version == "tensor"
        assert torch.equal(engine.runner.model.embed_tokens.weight, embed * 2)
    finally:
        engine.shutdown()
