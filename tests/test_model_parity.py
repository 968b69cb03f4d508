"""The engine computes what transformers computes, on the same random Qwen3 checkpoint."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, NUM_GPUS
from transformers import AutoModelForCausalLM

from tpfleet.config import EngineConfig
from tpfleet.engine.llm_engine import LLMEngine
from tpfleet.engine.sequence import SamplingParams

PROMPTS = [
    "Hello, world! How are you today?",
    "The river flows from the mountains to the ocean, carrying stones, leaves and stories from one valley "
    "to the next. Once upon a time there was a small village by the sea.",
    "def add(a, b):",
]


def hf_model(path, device="cpu", dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    dev = next(model.parameters()).device
    out = model.generate(torch.tensor([ids], device=dev), max_new_tokens=n, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    return out[0, len(ids):].tolist()


def run_greedy(engine: LLMEngine, prompts: list[list[int]], n: int) -> list[list[int]]:
    params = SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)
    seqs = [engine.add_request(p, params) for p in prompts]
    while engine.has_work():
        engine.step()
    return [s.completion_ids for s in seqs]


def record_logits(engine: LLMEngine) -> list[torch.Tensor]:
    """Keep every batch of logits the driver samples from (the real forward, just observed). Every step
    samples from logits, so a greedy batch-1 step on GPU does not pick its token in its own kernel."""
    seen: list[torch.Tensor] = []
    run = engine.runner.run
    engine.runner.model.picks_greedy = lambda num_tokens: False

    def observed(inp, sampler=None):
        def keep_then_sample(logits):
            seen.append(logits.float().cpu())
            return sampler(logits)

        return run(inp, keep_then_sample if sampler else None)

    engine.runner.run = observed
    return seen


def engine_and_reference_logits(model, device: str, dtype: str):
    """Logits the engine sampled from (prefill's last token, then each decode step), and transformers'
    float32 logits at the same positions of the same token sequence."""
    engine = LLMEngine(EngineConfig(model=str(model), device=device, dtype=dtype))
    try:
        seen = record_logits(engine)
        ids = engine.tokenizer(PROMPTS[1]).input_ids
        [gen] = run_greedy(engine, [ids], 6)
    finally:
        engine.shutdown()
    with torch.no_grad():
        full = hf_model(model, device)(torch.tensor([ids + gen], device=device)).logits[0].float().cpu()
    return torch.cat(seen), full[len(ids) - 1: len(ids) - 1 + len(gen)]


@pytest.mark.parametrize("device", DEVICES)
def test_logits_match_transformers_prefill_and_decode(tiny_model, device):
    ours, expected = engine_and_reference_logits(tiny_model, device, "float32")
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tp", [1, 2])
def test_greedy_tokens_match_transformers_generate(tiny_model, tp):
    # A 24-token budget splits the long prompt into chunks: chunked prefill is on the path.
    engine = LLMEngine(EngineConfig(model=str(tiny_model), tp_size=tp, max_num_batched_tokens=24))
    try:
        prompts = [engine.tokenizer(p).input_ids for p in PROMPTS]
        ours = run_greedy(engine, prompts, 16)
    finally:
        engine.shutdown()
    ref = hf_model(tiny_model)
    assert ours == [hf_greedy(ref, p, 16) for p in prompts]


def test_tied_embeddings_match_transformers(tied_model):
    engine = LLMEngine(EngineConfig(model=str(tied_model), tp_size=2))
    try:
        ids = engine.tokenizer(PROMPTS[0]).input_ids
        [ours] = run_greedy(engine, [ids], 12)
    finally:
        engine.shutdown()
    assert ours == hf_greedy(hf_model(tied_model), ids, 12)


@pytest.mark.gpu
def test_bf16_on_gpu_stays_close_to_float32_reference(tiny_model):
    """bf16 rounds differently from any reference, so compare logits within bf16's error, not tokens."""
    ours, expected = engine_and_reference_logits(tiny_model, "cuda", "bfloat16")
    rel = (ours - expected).norm() / expected.norm()
    assert rel < 3e-2, f"relative error {rel:.3g}"


@pytest.mark.gpu
@pytest.mark.skipif(NUM_GPUS < 2, reason="needs 2 GPUs")
def test_tp2_on_gpu_matches_tp1(tiny_model):
    outs = []
    for tp in (1, 2):
        engine = LLMEngine(EngineConfig(model=str(tiny_model), tp_size=tp, device="cuda", dtype="float32"))
        try:
            prompts = [engine.tokenizer(p).input_ids for p in PROMPTS]
            outs.append(run_greedy(engine, prompts, 12))
        finally:
            engine.shutdown()
    assert outs[0] == outs[1]


@pytest.mark.gpu
@pytest.mark.skipif(NUM_GPUS < 2, reason="needs 2 GPUs")
def test_fused_all_reduce_decodes_the_same_tokens_at_tp2(tmp_path, monkeypatch):
    """Batch-1 decode with the all-reduces fused into the GEMVs (tpfleet.kernels.fused_ar), from full
    graphs and eagerly: the tokens of the unfused path. The small preset, whose shards the GEMV
    kernel takes (the tiny one's are too narrow, so it never fuses)."""
    from tpfleet.model.make_model import make_model

    model = make_model("small", tmp_path / "small", device="cuda")
    outs = {}
    for fused in ("1", "0"):
        monkeypatch.setenv("TPFLEET_FUSED_AR", fused)
        for mode in ("full", "eager"):
            engine = LLMEngine(EngineConfig(model=str(model), tp_size=2, device="cuda", graph_mode=mode,
                                            kv_cache_tokens=16384))
            try:
                assert (engine.runner.model.fused is not None) == (fused == "1")
                outs[fused, mode] = [run_greedy(engine, [engine.tokenizer(p).input_ids], 16)[0] for p in PROMPTS]
            finally:
                engine.shutdown()
    assert outs["1", "full"] == outs["0", "full"] == outs["1", "eager"] == outs["0", "eager"]


@pytest.mark.gpu
def test_skinny_gemms_decode_what_transformers_decodes_on_gpu(tiny_model, tmp_path, monkeypatch):
    """With a table sending every projection at 2-64 rows to the skinny GEMM (gate_up with SiLU-and-mul
    in its epilogue, split over K), a batch of prompts decodes transformers' greedy tokens, graphs included."""
    from tpfleet.kernels import gemm, gemv, tuning

    monkeypatch.setenv("TPFLEET_CACHE_DIR", str(tmp_path))
    tuning.read.cache_clear()
    gemm.config_for.cache_clear()
    plain = {"BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 1, "num_warps": 4, "num_stages": 2}
    split = {"BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 2, "num_warps": 4, "num_stages": 2}
    gpu = gemv.gpu_name(torch.device("cuda"))
    # the tiny preset's qkv, o_proj and down (plain), and gate_up with its activation
    gemm.save_table(gpu, {(256, 64, 64): plain, (64, 128, 64): plain, (64, 160, 64): plain})
    gemm.save_table(gpu, {(320, 64, 64): split}, silu_mul=True)
    launched = []
    real = gemm.linear
    monkeypatch.setattr(gemm, "linear", lambda x, w, config, out=None, silu_mul=False:
                        launched.append(silu_mul) or real(x, w, config, out, silu_mul))
    try:
        engine = LLMEngine(EngineConfig(model=str(tiny_model), device="cuda", dtype="float32"))
        try:
            prompts = [engine.tokenizer(p).input_ids for p in PROMPTS]
            ours = run_greedy(engine, prompts, 16)
        finally:
            engine.shutdown()
    finally:
        tuning.read.cache_clear()
        gemm.config_for.cache_clear()
    assert True in launched and False in launched, "the table's kernels must have run"
    ref = hf_model(tiny_model)
    assert ours == [hf_greedy(ref, p, 16) for p in prompts]
