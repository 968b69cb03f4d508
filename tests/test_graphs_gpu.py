"""CUDA graphs produce what eager execution produces, token for token (greedy), at TP 1 and 2."""

from __future__ import annotations

import pytest
from conftest import NUM_GPUS

from tpfleet.config import EngineConfig
from tpfleet.engine.cuda_graphs import DECODE_BUCKETS, TOKEN_BUCKETS
from tpfleet.engine.llm_engine import LLMEngine
from tpfleet.engine.sequence import OutputOptions, SamplingParams

pytestmark = pytest.mark.gpu
TPS = [1] + ([2] if NUM_GPUS >= 2 else [])
PROMPTS = ["Once upon a time", "The river flows from the mountains", "def add(a, b):", "Red, orange, yellow, green",
           "Hello, world! " * 20, "Questions and answers: why is the sky blue?", "0 1 2 3 4 5", "She wrote a letter"]


def generate(model, tp, mode, dtype, prompts, n=24, max_num_batched_tokens=2048, capture_all=False, captured=None):
    """Greedy completions of `prompts` (strings, or token ids), `n` new tokens each (or one count per prompt).
    `captured` (a dict) receives the graph buckets captured at start and at the end."""
    engine = LLMEngine(EngineConfig(model=str(model), tp_size=tp, device="cuda", dtype=dtype, graph_mode=mode,
                                    attention_backend="triton", kv_cache_tokens=32768, max_num_seqs=64,
                                    max_num_batched_tokens=max_num_batched_tokens, capture_all_graphs=capture_all))
    runner = engine.runner

    def buckets():
        return {kind: sorted(graphs.graphs) for kind, graphs in
                (("decode", runner.decode_graphs), ("piecewise", runner.piecewise_graphs)) if graphs is not None}

    try:
        if captured is not None:
            captured["start"] = buckets()
        counts = n if isinstance(n, list) else [n] * len(prompts)
        seqs = [engine.add_request(engine.tokenizer(p).input_ids if isinstance(p, str) else p,
                                   SamplingParams(max_new_tokens=k, temperature=0.0, ignore_eos=True))
                for p, k in zip(prompts, counts)]
        while engine.has_work():
            engine.step()
        if captured is not None:
            captured["end"] = buckets()
        return [s.completion_ids for s in seqs]
    finally:
        engine.shutdown()


@pytest.mark.parametrize("tp", TPS)
def test_full_graphs_equal_eager_bf16(tiny_model, tp):
    # 8 prompts: a batch-size bucket, so graph and eager run the very same GEMM shapes.
    graphs = generate(tiny_model, tp, "full", "bfloat16", PROMPTS)
    assert graphs == generate(tiny_model, tp, "eager", "bfloat16", PROMPTS)


@pytest.mark.parametrize("tp", TPS)
def test_full_graphs_pad_shrinking_batches_fp32(tiny_model, tp):
    # Sequences end one by one, so the decode batch shrinks from 7 to 1 through padded buckets (7 runs in
    # the 8-graph, 3 in the 4-graph). fp32: padding changes GEMM shapes, whose rounding must stay far
    # below any logit gap.
    n = [3, 5, 7, 9, 11, 13, 15]
    graphs = generate(tiny_model, tp, "full", "float32", PROMPTS[:7], n)
    assert [len(c) for c in graphs] == n
    assert graphs == generate(tiny_model, tp, "eager", "float32", PROMPTS[:7], n)


@pytest.mark.parametrize("tp", TPS)
def test_full_graphs_take_one_token_prefill_chunks_fp32(tiny_model, tp):
    # A 2-token budget splits the 3-token prompt into 1-token chunks beside the other sequence's decodes:
    # steps of single tokens only, which run in a decode graph although one row samples nothing yet.
    prompts = [[5], [7, 8, 9]]
    graphs = generate(tiny_model, tp, "full", "float32", prompts, 6, max_num_batched_tokens=2)
    assert graphs == generate(tiny_model, tp, "eager", "float32", prompts, 6, max_num_batched_tokens=2)


@pytest.mark.parametrize("tp", TPS)
def test_piecewise_graphs_equal_eager_fp32(tiny_model, tp):
    # Piecewise pads prefill token counts to a bucket; fp32 keeps shape-dependent rounding far below any logit gap.
    graphs = generate(tiny_model, tp, "piecewise", "float32", PROMPTS)
    assert graphs == generate(tiny_model, tp, "eager", "float32", PROMPTS)


def test_buckets_are_captured_on_first_use_or_all_at_start(tiny_model):
    # Sequences end one by one: the decode batch shrinks from 7 to 1 through the 8-, 4-, 2- and 1-graphs, each
    # captured on the step that first needs it (the 64-graph at start), mid-run, under the overlap schedule.
    n = [3, 5, 7, 9, 11, 13, 15]
    lazy, every = {}, {}
    lazily = generate(tiny_model, 1, "piecewise", "float32", PROMPTS[:7], n, captured=lazy)
    assert lazy["start"] == {"decode": [64], "piecewise": [TOKEN_BUCKETS[-1]]}
    assert set(lazy["end"]["decode"]) == {1, 2, 4, 8, 64}
    assert lazy["end"]["piecewise"][-1] == TOKEN_BUCKETS[-1] and len(lazy["end"]["piecewise"]) >= 2
    at_start = generate(tiny_model, 1, "piecewise", "float32", PROMPTS[:7], n, capture_all=True, captured=every)
    assert every["start"] == every["end"] == {"decode": DECODE_BUCKETS[:DECODE_BUCKETS.index(64) + 1],
                                              "piecewise": TOKEN_BUCKETS}
    assert lazily == at_start


def test_graph_capture_is_reported(tiny_model, capfd):
    generate(tiny_model, 1, "piecewise", "bfloat16", PROMPTS[:1], n=2)
    out = capfd.readouterr().out
    assert "tpfleet phase: graphs_captured" in out and "memory_bytes" in out


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    from tpfleet.model.make_model import make_model
    return make_model("tiny-moe", tmp_path_factory.mktemp("tiny-moe"))


def generate_moe(model, mode):
    """Greedy tokens, their logprobs and the routed experts of a MoE model through the fused kernels."""
    engine = LLMEngine(EngineConfig(model=str(model), device="cuda", dtype="float32", graph_mode=mode,
                                    kv_cache_tokens=8192, max_num_seqs=16, enable_return_routed_experts=True))
    try:
        options = OutputOptions(return_logprob=True, return_routed_experts=True)
        seqs = [engine.add_request(engine.tokenizer(p).input_ids, SamplingParams(max_new_tokens=12, temperature=0.0,
                                   ignore_eos=True), options=options) for p in PROMPTS]
        while engine.has_work():
            engine.step()
        return [(s.completion_ids, s.output_logprobs, s.routed_experts) for s in seqs]
    finally:
        engine.shutdown()


@pytest.mark.parametrize("mode", ["full", "piecewise"])
def test_moe_graphs_equal_eager(tiny_moe, mode):
    """MoE layers (device-side routing and alignment) inside CUDA graphs: the same tokens, the same
    experts at every position and layer, and logprobs within fp32 rounding."""
    graphs, eager = generate_moe(tiny_moe, mode), generate_moe(tiny_moe, "eager")
    assert [g[0] for g in graphs] == [e[0] for e in eager]
    assert [g[2] for g in graphs] == [e[2] for e in eager] and all(g[2] for g in graphs)
    for g, e in zip(graphs, eager):
        assert max(abs(a - b) for a, b in zip(g[1], e[1])) < 1e-4
