"""CUDA graphs produce what eager execution produces, token for token (greedy), at TP 1 and 2."""

from __future__ import annotations

import pytest
from conftest import NUM_GPUS

from tpfleet.config import EngineConfig
from tpfleet.engine.llm_engine import LLMEngine
from tpfleet.engine.sequence import SamplingParams

pytestmark = pytest.mark.gpu
TPS = [1] + ([2] if NUM_GPUS >= 2 else [])
PROMPTS = ["Once upon a time", "The river flows from the mountains", "def add(a, b):", "Red, orange, yellow, green",
           "Hello, world! " * 20, "Questions and answers: why is the sky blue?", "0 1 2 3 4 5", "She wrote a letter"]


def generate(model, tp, mode, dtype, prompts, n=24):
    engine = LLMEngine(EngineConfig(model=str(model), tp_size=tp, device="cuda", dtype=dtype, graph_mode=mode,
                                    attention_backend="triton", kv_cache_tokens=32768, max_num_seqs=64))
    try:
        params = SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)
        seqs = [engine.add_request(engine.tokenizer(p).input_ids, params) for p in prompts]
        while engine.has_work():
            engine.step()
        return [s.completion_ids for s in seqs]
    finally:
        engine.shutdown()


@pytest.mark.parametrize("tp", TPS)
def test_full_graphs_equal_eager_bf16(tiny_model, tp):
    # 8 prompts: a batch-size bucket, so graph and eager run the very same GEMM shapes.
    graphs = generate(tiny_model, tp, "full", "bfloat16", PROMPTS)
    assert graphs == generate(tiny_model, tp, "eager", "bfloat16", PROMPTS)


@pytest.mark.parametrize("tp", TPS)
def test_piecewise_graphs_equal_eager_fp32(tiny_model, tp):
    # Piecewise pads prefill token counts to a bucket; fp32 keeps shape-dependent rounding far below any logit gap.
    graphs = generate(tiny_model, tp, "piecewise", "float32", PROMPTS)
    assert graphs == generate(tiny_model, tp, "eager", "float32", PROMPTS)


def test_graph_capture_is_reported(tiny_model, capfd):
    generate(tiny_model, 1, "piecewise", "bfloat16", PROMPTS[:1], n=2)
    out = capfd.readouterr().out
    assert "tpfleet phase: graphs_captured" in out and "memory_bytes" in out
