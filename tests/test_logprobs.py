"""Logprobs, penalties, prompt scoring, shared group prompts and routing replay, against transformers'
float32 forward on the same tiny checkpoint."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tpfleet.config import EngineConfig
from tpfleet.engine.llm_engine import LLMEngine
from tpfleet.engine.sequence import InvalidRequest, OutputOptions, SamplingParams, Sequence

TEXT = ("The river flows from the mountains to the ocean, carrying stones, leaves and stories from one "
        "valley to the next.")
ATOL = 1e-4
LOGPROBS = OutputOptions(return_logprob=True, top_logprobs_num=3)


@pytest.fixture(scope="module")
def engine(tiny_model):
    # A small token budget: prompts are prefilled in several chunks.
    e = LLMEngine(EngineConfig(model=str(tiny_model), kv_cache_tokens=4096, max_num_batched_tokens=24))
    yield e
    e.shutdown()


@pytest.fixture(scope="module")
def hf(tiny_model):
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


def run(engine: LLMEngine, requests: list[tuple[list[int], SamplingParams, OutputOptions | None]]) -> list[Sequence]:
    seqs = [engine.add_request(ids, params, options=options) for ids, params, options in requests]
    while engine.has_work():
        engine.step()
    return seqs


def hf_logits(hf, tokens: list[int]) -> torch.Tensor:
    """Row i: the float32 logits after tokens[:i + 1]."""
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0].float()


def expected_output_logprobs(hf, seq: Sequence, temperature: float) -> torch.Tensor:
    logits = hf_logits(hf, seq.token_ids[:-1])[seq.num_prompt_tokens - 1:]
    logprobs = (logits / (temperature or 1.0)).log_softmax(-1)
    return logprobs.gather(1, torch.tensor(seq.completion_ids)[:, None]).squeeze(1)


def assert_true_top_k(top: list[list[tuple[float, int]]], logprobs: torch.Tensor, k: int) -> None:
    """Each position's k entries are the k largest of `logprobs` (rows), most likely first."""
    assert len(top) == logprobs.shape[0]
    for entries, row in zip(top, logprobs):
        values, ids = row.topk(k)
        assert [i for _, i in entries] == ids.tolist()
        torch.testing.assert_close(torch.tensor([v for v, _ in entries]), values, atol=ATOL, rtol=0)


@pytest.mark.parametrize("temperature", [0.7, 0.0])
def test_output_logprobs_equal_transformers_with_and_without_prefix_cache(engine, hf, temperature):
    ids = engine.tokenizer(TEXT).input_ids
    params = SamplingParams(max_new_tokens=8, temperature=temperature, seed=11, ignore_eos=True)
    assert engine.flush_cache()
    [miss] = run(engine, [(ids, params, LOGPROBS)])
    [hit] = run(engine, [(ids, params, LOGPROBS)])
    assert miss.num_cached_tokens == 0 and hit.num_cached_tokens > 0
    assert hit.completion_ids == miss.completion_ids  # the seed reproduces
    for seq in (miss, hit):
        assert len(seq.output_logprobs) == seq.num_completion_tokens == 8
        expected = expected_output_logprobs(hf, seq, temperature)
        torch.testing.assert_close(torch.tensor(seq.output_logprobs), expected, atol=ATOL, rtol=0)
        logits = hf_logits(hf, seq.token_ids[:-1])[seq.num_prompt_tokens - 1:]
        assert_true_top_k(seq.output_top_logprobs, (logits / (temperature or 1.0)).log_softmax(-1), 3)
    assert miss.input_logprobs == [] and miss.weight_version == "default"


def test_output_logprobs_at_tp2(tiny_model, hf):
    e = LLMEngine(EngineConfig(model=str(tiny_model), tp_size=2, kv_cache_tokens=2048))
    try:
        ids = e.tokenizer(TEXT).input_ids
        [seq] = run(e, [(ids, SamplingParams(max_new_tokens=6, temperature=0.7, seed=3, ignore_eos=True),
                         OutputOptions(return_logprob=True))])
    finally:
        e.shutdown()
    expected = expected_output_logprobs(hf, seq, 0.7)
    torch.testing.assert_close(torch.tensor(seq.output_logprobs), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("start", [0, 3])
def test_input_logprobs_equal_transformers_across_chunks_and_despite_the_cache(engine, hf, start):
    ids = engine.tokenizer(TEXT).input_ids
    assert len(ids) > engine.cfg.max_num_batched_tokens  # the prompt takes several prefill chunks
    run(engine, [(ids, SamplingParams(max_new_tokens=1), None)])  # the whole prompt is now cached
    options = OutputOptions(return_logprob=True, logprob_start_len=start, top_logprobs_num=2)
    [seq] = run(engine, [(ids, SamplingParams(max_new_tokens=2, temperature=0.0), options)])
    assert seq.num_cached_tokens <= start  # positions with a logprob are computed, not cached
    logprobs = hf_logits(hf, ids).log_softmax(-1)[start:len(ids) - 1]
    expected = logprobs.gather(1, torch.tensor(ids[start + 1:])[:, None]).squeeze(1)
    assert len(seq.input_logprobs) == len(ids) - start and seq.input_logprobs[0] is None
    torch.testing.assert_close(torch.tensor(seq.input_logprobs[1:]), expected, atol=ATOL, rtol=0)
    assert seq.input_top_logprobs[0] == []
    assert_true_top_k(seq.input_top_logprobs[1:], logprobs, 2)


def test_scoring_call_returns_prompt_logprobs_and_generates_nothing(engine, hf):
    ids = engine.tokenizer(TEXT).input_ids[:30]
    options = OutputOptions(return_logprob=True, logprob_start_len=0)
    [seq] = run(engine, [(ids, SamplingParams(max_new_tokens=0), options)])
    assert seq.completion_ids == [] and seq.output_logprobs == [] and seq.output_text == ""
    assert seq.finish_reason == {"type": "length", "length": 0}
    expected = hf_logits(hf, ids).log_softmax(-1)[:-1].gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
    torch.testing.assert_close(torch.tensor(seq.input_logprobs[1:]), expected, atol=ATOL, rtol=0)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_a_prefill_only_call_scores_from_any_position_or_just_fills_the_cache(engine, hf):
    ids = engine.tokenizer(TEXT).input_ids[:30]
    [suffix] = run(engine, [(ids, SamplingParams(max_new_tokens=0),
                             OutputOptions(return_logprob=True, logprob_start_len=20))])
    assert suffix.completion_ids == [] and suffix.finish_reason == {"type": "length", "length": 0}
    expected = hf_logits(hf, ids).log_softmax(-1)[19:-1].gather(1, torch.tensor(ids[20:])[:, None]).squeeze(1)
    assert len(suffix.input_logprobs) == 10 and suffix.input_logprobs[0] is None
    torch.testing.assert_close(torch.tensor(suffix.input_logprobs[1:]), expected[1:], atol=ATOL, rtol=0)
    engine.flush_cache()
    [fill] = run(engine, [(ids, SamplingParams(max_new_tokens=0), OutputOptions())])
    assert fill.completion_ids == [] and fill.input_logprobs == [] and fill.finish_reason["type"] == "length"
    [after] = run(engine, [(ids, SamplingParams(max_new_tokens=2, temperature=0.0), OutputOptions())])
    assert after.num_cached_tokens >= 16  # the prefill-only call left its full blocks in the prefix cache
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


@pytest.mark.parametrize("options,field", [
    (OutputOptions(return_logprob=True, logprob_start_len=5), "logprob_start_len"),
    (OutputOptions(return_logprob=True, top_logprobs_num=10**6), "top_logprobs_num"),
    (OutputOptions(return_routed_experts=True), "return_routed_experts"),
])
def test_bad_options_name_the_field(engine, options, field):
    params = SamplingParams(max_new_tokens=4)
    with pytest.raises(InvalidRequest) as e:
        engine.add_request([5, 6, 7, 8, 9], params, options=options)
    assert e.value.field == field


def test_penalties_change_logprobs_exactly_as_the_formulas_say(engine, hf):
    ids = engine.tokenizer("one two one two one two").input_ids
    params = SamplingParams(max_new_tokens=6, temperature=0.8, seed=5, ignore_eos=True, repetition_penalty=1.3,
                            frequency_penalty=0.5, presence_penalty=0.25)
    [seq] = run(engine, [(ids, params, OutputOptions(return_logprob=True))])
    [plain] = run(engine, [(ids, SamplingParams(max_new_tokens=6, temperature=0.8, seed=5, ignore_eos=True),
                            OutputOptions(return_logprob=True))])
    logits = hf_logits(hf, seq.token_ids[:-1])
    expected = []
    for step, token in enumerate(seq.completion_ids):
        row = logits[len(ids) - 1 + step].clone()
        seen = torch.tensor(sorted(set(seq.token_ids[:len(ids) + step])))
        row[seen] = torch.where(row[seen] > 0, row[seen] / 1.3, row[seen] * 1.3)
        counts = torch.bincount(torch.tensor(seq.completion_ids[:step], dtype=torch.long), minlength=row.numel())
        row -= 0.5 * counts + 0.25 * (counts > 0)
        expected.append((row / 0.8).log_softmax(-1)[token])
    torch.testing.assert_close(torch.tensor(seq.output_logprobs), torch.stack(expected), atol=ATOL, rtol=0)
    assert seq.output_logprobs != plain.output_logprobs


def test_logit_bias_and_min_new_tokens(engine):
    ids = [5, 6, 7]
    [biased] = run(engine, [(ids, SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True,
                                                 logit_bias={42: 100.0}), None)])
    assert biased.completion_ids == [42] * 4
    [free] = run(engine, [(ids, SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True), None)])
    stop = free.completion_ids[0]
    [stopped] = run(engine, [(ids, SamplingParams(max_new_tokens=10, temperature=0.0, stop_token_ids=[stop]), None)])
    assert stopped.completion_ids == [stop]
    [held] = run(engine, [(ids, SamplingParams(max_new_tokens=10, temperature=0.0, stop_token_ids=[stop],
                                               min_new_tokens=5), None)])
    assert held.num_completion_tokens >= 5 and stop not in held.completion_ids[:5]


def test_seeded_sampling_reproduces_tokens_and_logprobs(engine):
    ids = engine.tokenizer("Once upon a time").input_ids
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_k=20, seed=77, ignore_eos=True)
    a, b = run(engine, [(ids, params, LOGPROBS), (ids, params, LOGPROBS)])
    assert a.completion_ids == b.completion_ids and a.output_logprobs == b.output_logprobs


def test_abort_keeps_partial_output_and_logprobs(engine):
    seq = engine.add_request([5, 6, 7], SamplingParams(max_new_tokens=50, temperature=0.0, ignore_eos=True),
                             options=LOGPROBS)
    while seq.num_completion_tokens < 3:
        engine.step()
    engine.abort(seq.rid)
    assert seq.finish_reason["type"] == "abort"
    assert len(seq.output_logprobs) == len(seq.output_top_logprobs) == seq.num_completion_tokens >= 3
    while engine.has_work():
        engine.step()
    assert len(seq.output_logprobs) == seq.num_completion_tokens


def test_identical_prompts_arriving_together_compute_the_prompt_once(engine):
    ids = engine.tokenizer(TEXT + " A group of samples shares it.").input_ids
    bs = engine.cfg.block_size
    assert engine.flush_cache()
    computed = []
    run_step = engine.runner.run

    def counted(inp, sampler=None):
        computed.append(len(inp.input_ids))
        return run_step(inp, sampler)

    engine.runner.run = counted
    try:
        seqs = run(engine, [(ids, SamplingParams(max_new_tokens=4, temperature=1.0, seed=i, ignore_eos=True), None)
                            for i in range(4)])
    finally:
        del engine.runner.run
    full_blocks = (len(ids) - 1) // bs * bs
    assert seqs[0].num_cached_tokens == 0
    assert all(s.num_cached_tokens >= full_blocks for s in seqs[1:])
    # The prompt once, each follower its uncached tail, and one token per decode.
    assert sum(computed) == len(ids) + 3 * (len(ids) - full_blocks) + 4 * 3


def test_routed_experts_have_the_contract_shape_and_survive_the_prefix_cache(tmp_path):
    pytest.importorskip("tpfleet.model.qwen3_moe")
    from tpfleet.model.make_model import make_model

    model = make_model("tiny-moe", tmp_path / "tiny-moe")
    e = LLMEngine(EngineConfig(model=str(model), kv_cache_tokens=1024, enable_return_routed_experts=True))
    try:
        ids = e.tokenizer(TEXT).input_ids
        params = SamplingParams(max_new_tokens=5, temperature=0.0, ignore_eos=True)
        options = OutputOptions(return_routed_experts=True)
        [miss] = run(e, [(ids, params, options)])
        [hit] = run(e, [(ids, params, options)])
        [plain] = run(e, [(ids, params, None)])
        cfg = e.model_config
    finally:
        e.shutdown()
    assert hit.num_cached_tokens > 0 and plain.routed_experts is None
    count = (len(ids) + 5 - 1) * cfg.num_hidden_layers * cfg.num_experts_per_tok
    assert miss.routed_experts is not None and len(miss.routed_experts) == 4 * count
    assert hit.routed_experts == miss.routed_experts
    experts = torch.frombuffer(bytearray(miss.routed_experts), dtype=torch.int32).view(
        -1, cfg.num_hidden_layers, cfg.num_experts_per_tok)
    moe_layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    dense_layers = [i for i in range(cfg.num_hidden_layers) if not cfg.is_moe_layer(i)]
    assert ((experts[:, moe_layers] >= 0) & (experts[:, moe_layers] < cfg.num_experts)).all()
    assert (experts[:, dense_layers] == -1).all()
