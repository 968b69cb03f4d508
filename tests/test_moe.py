"""Qwen3-MoE: on a random checkpoint that transformers wrote, tpfleet computes transformers' logits and
greedy tokens at TP=1, TP=2 and EP=2, and records the experts transformers' router picks."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import HAS_CUDA
from transformers import AutoModelForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from tpfleet.attention.backend import get_backend
from tpfleet.comm.group import TPGroup
from tpfleet.config import EngineConfig
from tpfleet.engine.llm_engine import LLMEngine
from tpfleet.engine.sequence import OutputOptions, SamplingParams
from tpfleet.kernels.moe import moe_reference, route
from tpfleet.model.config import ModelConfig
from tpfleet.model.loader import load_weights
from tpfleet.model.make_model import PRESETS, _weight_shapes, hf_config, make_model, write_tokenizer
from tpfleet.model.registry import build_model

PROMPT = "The river flows from the mountains to the ocean, carrying stones, leaves and stories from one valley."
NEW_TOKENS = 6
MLP_ONLY_LAYERS = [1]


def save_random_moe(root, hidden_size: int, head_dim: int):
    """One random float32 model (layer 1 dense) saved twice by transformers: in the published per-expert
    layout (its default) and in its own stacked layout. Returns ({layout: directory}, the model)."""
    vocab, _ = write_tokenizer(root, 1000, 512)
    config = Qwen3MoeConfig(vocab_size=vocab | 1, hidden_size=hidden_size, intermediate_size=36, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, moe_intermediate_size=22,
                            num_experts=8, num_experts_per_tok=3, norm_topk_prob=True,
                            mlp_only_layers=MLP_ONLY_LAYERS, max_position_embeddings=512,
                            experts_implementation="eager")  # the grouped GEMM needs 16-byte strides
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(config).eval()
    dirs = {"per_expert": root / "per_expert", "stacked": root / "stacked"}
    model.save_pretrained(dirs["per_expert"])
    model.save_pretrained(dirs["stacked"], save_original_format=False)
    for d in dirs.values():
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (d / name).write_bytes((root / name).read_bytes())
    return dirs, model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Odd sizes, which no tile divides."""
    return save_random_moe(tmp_path_factory.mktemp("moe"), hidden_size=40, head_dim=12)


def cpu_group(rank: int = 0, world: int = 1) -> TPGroup:
    """A rank's view of a group that never communicates: enough to build and load a shard."""
    return TPGroup(rank, world, torch.device("cpu"), None)


def build_and_load(path, rank: int = 0, world: int = 1, ep_size: int = 1):
    model = build_model(ModelConfig.from_dir(path), cpu_group(rank, world), get_backend("torch"), ep_size=ep_size,
                        max_num_tokens=64)
    load_weights(model, path, show_progress=False)
    return model


# --- reference MoE and router -----------------------------------------------------------------------


def test_reference_moe_equals_dense_computation():
    torch.manual_seed(0)
    tokens, hidden, inter, experts, top_k = 7, 10, 6, 5, 2
    x = torch.randn(tokens, hidden)
    w_gate_up = torch.randn(experts, 2 * inter, hidden)
    w_down = torch.randn(experts, hidden, inter)
    weights, ids = route(torch.randn(tokens, experts), top_k, renormalize=True)
    torch.testing.assert_close(weights.sum(-1), torch.ones(tokens))

    def expert(e: int, row: torch.Tensor) -> torch.Tensor:
        gate, up = w_gate_up[e, :inter] @ row, w_gate_up[e, inter:] @ row
        return w_down[e] @ (torch.nn.functional.silu(gate) * up)

    dense = torch.stack([sum(weights[t, s] * expert(int(ids[t, s]), x[t]) for s in range(top_k))
                         for t in range(tokens)])
    torch.testing.assert_close(moe_reference(x, w_gate_up, w_down, ids, weights), dense)
    # Expert parallel: two ranks' experts, zeros for the others, sum to the whole.
    halves = [moe_reference(x, w_gate_up[lo:hi], w_down[lo:hi], ids, weights, first_expert=lo)
              for lo, hi in ((0, 3), (3, 5))]
    torch.testing.assert_close(halves[0] + halves[1], dense)
    # Tensor parallel: two slices of every expert's intermediate dimension sum to the whole.
    slices = [moe_reference(x, torch.cat([w_gate_up[:, s], w_gate_up[:, inter:][:, s]], 1), w_down[:, :, s], ids,
                            weights) for s in (slice(0, 4), slice(4, inter))]
    torch.testing.assert_close(slices[0] + slices[1], dense)


def test_route_without_renormalisation_keeps_softmax_weights():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    weights, ids = route(logits, 2, renormalize=False)
    assert ids.tolist() == [[1, 2]]
    torch.testing.assert_close(weights, logits.softmax(-1)[:, [1, 2]])


# --- configuration --------------------------------------------------------------------------------


BASE = {"vocab_size": 11, "hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 4,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4, "moe_intermediate_size": 6,
        "num_experts_per_tok": 2, "norm_topk_prob": True, "model_type": "qwen3_moe"}


def parse(tmp_path, **raw) -> ModelConfig:
    (tmp_path / "config.json").write_text(json.dumps({**BASE, **raw}))
    return ModelConfig.from_dir(tmp_path)


def test_config_reads_both_layouts(tmp_path):
    v4 = parse(tmp_path, num_experts=8, rope_theta=1e6, torch_dtype="bfloat16", mlp_only_layers=[2])
    v5 = parse(tmp_path, num_local_experts=8, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
               dtype="bfloat16", mlp_only_layers=[2])
    assert v4 == v5
    assert (v4.num_experts, v4.rope_theta, v4.dtype, v4.mlp_only_layers) == (8, 1e6, "bfloat16", (2,))
    assert v4.is_moe and [v4.is_moe_layer(i) for i in range(4)] == [True, True, False, True]
    stepped = parse(tmp_path, num_experts=8, decoder_sparse_step=2)
    assert [stepped.is_moe_layer(i) for i in range(4)] == [False, True, False, True]


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="qwen3_moe"):
        parse(tmp_path, model_type="mixtral", num_experts=8)
    with pytest.raises(ValueError, match="num_experts"):
        parse(tmp_path)
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        parse(tmp_path, num_experts=8, num_experts_per_tok=9)


def test_parallelism_errors(checkpoints, tiny_model):
    dirs, _ = checkpoints
    cfg = ModelConfig.from_dir(dirs["per_expert"])
    with pytest.raises(ValueError, match="must be 1 .* or equal tp_size"):
        build_model(cfg, cpu_group(0, 4), None, ep_size=3)
    with pytest.raises(ValueError, match=r"num_experts \(6\).*ep_size \(4\)"):
        build_model(dataclasses.replace(cfg, num_experts=6), cpu_group(0, 4), None, ep_size=4)
    with pytest.raises(ValueError, match=r"moe_intermediate_size \(22\).*\(4\); ep_size=4"):
        build_model(cfg, cpu_group(0, 4), None)
    dense = ModelConfig.from_dir(tiny_model)
    with pytest.raises(ValueError, match="ep_size"):
        build_model(dense, cpu_group(0, 2), None, ep_size=2)
    with pytest.raises(ValueError, match=r"num_attention_heads \(4\) is not divisible by the tensor-parallel "
                                         r"size \(8\)"):
        dense.check_parallelism(8)
    with pytest.raises(ValueError, match=r"tensor-parallel size \(4\) must be a multiple of num_key_value_heads \(3\)"):
        dataclasses.replace(dense, num_attention_heads=12, num_key_value_heads=3).check_parallelism(4)
    with pytest.raises(ValueError, match=r"intermediate_size \(30\)"):
        dataclasses.replace(dense, intermediate_size=30).check_parallelism(4)
    dense.check_parallelism(2)
    dataclasses.replace(dense, num_key_value_heads=1).check_parallelism(4)  # one kv head, replicated


# --- weights --------------------------------------------------------------------------------------


@pytest.mark.parametrize("ep_size", [1, 2])
def test_both_checkpoint_layouts_load_each_ranks_shard(checkpoints, ep_size):
    dirs, hf = checkpoints
    experts = hf.model.layers[0].mlp.experts
    for rank in range(2):
        shards = [build_and_load(dirs[layout], rank, 2, ep_size).layers[0].mlp.experts for layout in dirs]
        for name in ("gate_up_proj", "down_proj"):
            torch.testing.assert_close(getattr(shards[0], name), getattr(shards[1], name), rtol=0, atol=0)
        ours = shards[0]
        if ep_size == 2:  # whole experts 4r..4r+3
            expected_down = experts.down_proj[4 * rank:4 * rank + 4]
            expected_gate_up = experts.gate_up_proj[4 * rank:4 * rank + 4]
        else:  # intermediate rows 11r..11r+10 of every expert, gate then up
            rows = slice(11 * rank, 11 * rank + 11)
            expected_down = experts.down_proj[:, :, rows]
            gate, up = experts.gate_up_proj[:, :22], experts.gate_up_proj[:, 22:]
            expected_gate_up = torch.cat([gate[:, rows], up[:, rows]], 1)
        torch.testing.assert_close(ours.down_proj.data, expected_down.data, rtol=0, atol=0)
        torch.testing.assert_close(ours.gate_up_proj.data, expected_gate_up.data, rtol=0, atol=0)


def test_presets(tmp_path):
    model = make_model("tiny-moe", tmp_path / "tiny-moe")
    ours = build_and_load(model)
    assert ours.cfg.is_moe and not ours.cfg.is_moe_layer(1) and ours.cfg.num_experts >= 8
    _, info = AutoModelForCausalLM.from_pretrained(model, output_loading_info=True)
    assert not any(info.values()), info
    shape = PRESETS["30b-a3b-shape"]
    cfg = hf_config(shape, 151936, {"<|endoftext|>": 0, "<|im_end|>": 1})
    params = sum(torch.Size(s).numel() for _, s in _weight_shapes(cfg))
    assert 30.4e9 < params < 30.6e9  # Qwen3-30B-A3B: 30.5B


# --- engine against transformers -------------------------------------------------------------------


def generate_and_observe(path, tp: int, ep: int, device: str = "cpu"):
    """Greedy tokens for PROMPT, the logits each step sampled from, and the experts each step's forward
    routed to (rank 0's record), concatenated over the steps. On a GPU: float32, eager (the routing
    record of a graph replay is sliced by its caller), through the fused router and experts. Logprobs are
    asked for, so every step's logits reach the sampler: plain greedy decoding on a GPU takes its argmax
    in a kernel of its own, without them."""
    gpu = {"device": "cuda", "dtype": "float32", "graph_mode": "eager"} if device == "cuda" else {}
    engine = LLMEngine(EngineConfig(model=str(path), tp_size=tp, ep_size=ep, kv_cache_tokens=1024, **gpu))
    logits, routed = [], []
    run = engine.runner.run

    def observed(inp, sampler=None):
        def keep_then_sample(step_logits):
            logits.append(step_logits.float().cpu())
            return sampler(step_logits)

        tokens = run(inp, keep_then_sample if sampler else None)
        routed.append(engine.runner.model.routed_experts.to("cpu", copy=True))
        return tokens

    engine.runner.run = observed
    try:
        ids = engine.tokenizer(PROMPT).input_ids
        seq = engine.add_request(ids, SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True),
                                 options=OutputOptions(return_logprob=True))
        while engine.has_work():
            engine.step()
    finally:
        engine.shutdown()
    return ids, seq.completion_ids, torch.cat(logits), torch.cat(routed)


@pytest.mark.parametrize("tp,ep,layout", [(1, 1, "per_expert"), (2, 1, "stacked"), (2, 2, "per_expert")])
def test_engine_matches_transformers(checkpoints, tp, ep, layout):
    dirs, hf = checkpoints
    check_against_transformers(dirs[layout], hf, tp, ep, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
def test_gpu_engine_matches_transformers(tmp_path):
    """Through the fused router, the batch-1 norm-and-router GEMV, the fused experts and the Triton
    attention, whose kernels need a power-of-two head size (12 is refused)."""
    dirs, hf = save_random_moe(tmp_path, hidden_size=64, head_dim=16)
    check_against_transformers(dirs["per_expert"], hf, 1, 1, "cuda")


def check_against_transformers(path, hf, tp: int, ep: int, device: str) -> None:
    ids, gen, logits, routed = generate_and_observe(path, tp, ep, device)
    tokens = ids + gen[:-1]  # every token a forward took
    with torch.no_grad():
        out = hf(torch.tensor([tokens]), output_router_logits=True)
    expected = out.logits[0, len(ids) - 1:]
    assert gen == expected.argmax(-1).tolist()  # transformers' greedy continuation
    tol = 1e-4 if device == "cpu" else 1e-3  # the GPU's kernels sum in other orders
    torch.testing.assert_close(logits, expected, atol=tol, rtol=tol)

    layers, top_k = hf.config.num_hidden_layers, hf.config.num_experts_per_tok
    assert routed.shape == (len(tokens), layers, top_k) and routed.dtype == torch.int32
    router_logits = iter(out.router_logits)
    for layer in range(layers):
        if layer in MLP_ONLY_LAYERS:
            assert (routed[:, layer] == -1).all()
        else:
            picked = torch.topk(next(router_logits).float().softmax(-1), top_k).indices
            assert torch.equal(routed[:, layer].long(), picked), f"layer {layer}"


# --- routing replay of requests that leave the device ---------------------------------------------------


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_request_aborted_off_the_device_reports_its_routing(tmp_path, device):
    """Retracted, a request's KV (and the routing filed with it) leaves the device; aborted then, it still
    reports every position, the same experts a request that runs the same tokens to its end reports.
    A request aborted before it ran reports no routing at all."""
    model = make_model("tiny-moe", tmp_path / "m")
    gpu = {"device": "cuda", "dtype": "float32"} if device == "cuda" else {}
    engine = LLMEngine(EngineConfig(model=str(model), kv_cache_tokens=1024, enable_return_routed_experts=True,
                                    **gpu))
    options = OutputOptions(return_routed_experts=True)
    try:
        ids = engine.tokenizer(PROMPT).input_ids
        greedy = SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True)
        seq = engine.add_request(ids, greedy, options=options)
        for _ in range(6):
            engine.step()
        engine.pause("retract")
        never_ran = engine.add_request(ids[::-1], greedy, options=options)
        engine.abort(seq.rid)
        engine.abort(never_ran.rid)
        engine.continue_generation()
        done = len(seq.completion_ids)
        assert 0 < done < 40 and never_ran.routed_experts is None
        row = engine.runner.routing_row_bytes
        assert len(seq.routed_experts) == (len(ids) + done - 1) * row
        again = engine.add_request(ids, dataclasses.replace(greedy, max_new_tokens=done), options=options)
        while engine.has_work():
            engine.step()
        assert again.completion_ids == seq.completion_ids
        assert again.routed_experts == seq.routed_experts
    finally:
        engine.shutdown()
