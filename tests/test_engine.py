"""Engine behaviour end to end on CPU: prefix cache, preemption, seeds, stop conditions."""

from __future__ import annotations

import json

import pytest

from tpfleet.config import EngineConfig
from tpfleet.engine.llm_engine import LLMEngine
from tpfleet.engine.sequence import InvalidRequest, SamplingParams

LONG = ("Each block of the cache holds the keys and values of sixteen tokens, and a table maps every "
        "sequence to its blocks. ") * 3


@pytest.fixture
def engine(tiny_model):
    e = LLMEngine(EngineConfig(model=str(tiny_model), kv_cache_tokens=4096))
    yield e
    e.shutdown()


def run(engine, prompts, params):
    seqs = [engine.add_request(p, params) for p in prompts]
    while engine.has_work():
        engine.step()
    return seqs


GREEDY = SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True)


def test_prefix_cache_hit_gives_identical_output(engine):
    ids = engine.tokenizer(LONG).input_ids
    [miss] = run(engine, [ids], GREEDY)
    [hit] = run(engine, [ids], GREEDY)
    assert miss.num_cached_tokens == 0
    assert hit.num_cached_tokens >= len(ids) - engine.cfg.block_size
    assert hit.completion_ids == miss.completion_ids
    # A prompt that shares only a prefix reuses exactly the shared full blocks.
    other = ids[:40] + engine.tokenizer(" something else entirely").input_ids
    [partial] = run(engine, [other], GREEDY)
    assert partial.num_cached_tokens == 40 // engine.cfg.block_size * engine.cfg.block_size


def test_preemption_recomputes_to_the_same_tokens(tiny_model):
    prompts_text = [LONG[:150], LONG[40:200], LONG[10:120], LONG[70:230]]
    params = SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True)
    roomy = LLMEngine(EngineConfig(model=str(tiny_model), kv_cache_tokens=8192))
    try:
        prompts = [roomy.tokenizer(t).input_ids for t in prompts_text]
        expected = [s.completion_ids for s in run(roomy, prompts, params)]
    finally:
        roomy.shutdown()
    # Room for about two of the four sequences at full length: the scheduler must preempt.
    tight = LLMEngine(EngineConfig(model=str(tiny_model), kv_cache_tokens=192, block_size=16,
                                   enable_prefix_caching=False))
    try:
        seqs = run(tight, prompts, params)
        assert tight.scheduler.num_preemptions > 0
        assert [s.completion_ids for s in seqs] == expected
        assert tight.block_manager.num_free_blocks == tight.block_manager.num_blocks
    finally:
        tight.shutdown()


def test_same_seed_same_output_and_other_seed_differs(engine):
    ids = engine.tokenizer("Once upon a time").input_ids
    p = dict(max_new_tokens=24, temperature=1.0, top_p=0.95, ignore_eos=True)
    [a] = run(engine, [ids], SamplingParams(seed=123, **p))
    [b] = run(engine, [ids], SamplingParams(seed=123, **p))
    [c] = run(engine, [ids], SamplingParams(seed=124, **p))
    assert a.completion_ids == b.completion_ids
    assert a.completion_ids != c.completion_ids


def test_seeded_output_does_not_depend_on_batch_neighbours(engine):
    ids = engine.tokenizer("Once upon a time").input_ids
    p = SamplingParams(max_new_tokens=16, temperature=1.0, seed=5, ignore_eos=True)
    [alone] = run(engine, [ids], p)
    together = run(engine, [ids, engine.tokenizer("Red, orange").input_ids], p)
    assert together[0].completion_ids == alone.completion_ids
    beside = [engine.add_request(ids, p), engine.add_request([9, 10, 11], SamplingParams(
        max_new_tokens=16, temperature=1.0, top_k=50, ignore_eos=True))]  # a neighbour that filters
    while engine.has_work():
        engine.step()
    assert beside[0].completion_ids == alone.completion_ids


def test_a_preempted_request_reports_only_its_prompt_as_cached(tiny_model):
    """Re-admitted after a preemption, a sequence finds its own output in the prefix cache: that is not
    the prompt's cached part (reported as meta_info.cached_tokens)."""
    e = LLMEngine(EngineConfig(model=str(tiny_model), kv_cache_tokens=48, block_size=4))
    try:
        seqs = run(e, [[5, 6, 7, 8], [9, 10, 11, 12]], SamplingParams(max_new_tokens=30, temperature=0.0,
                                                                       ignore_eos=True))
        assert e.scheduler.num_preemptions > 0
        assert all(s.num_cached_tokens <= s.num_prompt_tokens for s in seqs), [s.num_cached_tokens for s in seqs]
    finally:
        e.shutdown()


def test_a_sequence_whose_last_token_is_unread_preempts_nobody(tiny_model):
    """Under the overlap schedule, A's stop token (position 8, a block boundary) is unread when the next step
    is scheduled; the row it would get needs a new block from a full pool, and must not cost B its KV."""
    first, second = [5, 6, 7], [9, 10, 11, 12, 13]
    e = LLMEngine(EngineConfig(model=str(tiny_model), kv_cache_tokens=4096))
    try:
        [free] = run(e, [first], SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True))
    finally:
        e.shutdown()
    stop = SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True, stop_token_ids=[free.completion_ids[5]])
    for overlap in (False, True):
        e = LLMEngine(EngineConfig(model=str(tiny_model), kv_cache_tokens=20, block_size=4, overlap_schedule=overlap))
        try:
            a = e.add_request(first, stop)
            b = e.add_request(second, SamplingParams(max_new_tokens=30, temperature=0.0, ignore_eos=True))
            while e.has_work():
                e.step()
            assert a.finish_reason["type"] == "stop" and len(a.completion_ids) == 6
            assert b.num_preemptions == 0, overlap
        finally:
            e.shutdown()


def test_max_new_tokens_and_finish_reason(engine):
    [s] = run(engine, [[5, 6, 7]], SamplingParams(max_new_tokens=3, temperature=0.0, ignore_eos=True))
    assert s.num_completion_tokens == 3
    assert s.finish_reason == {"type": "length", "length": 3}


def test_stop_token_id_ends_generation(engine):
    [free] = run(engine, [[5, 6, 7]], GREEDY)
    stop_at = free.completion_ids[3]
    [s] = run(engine, [[5, 6, 7]], SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True,
                                                     stop_token_ids=[stop_at]))
    first = free.completion_ids.index(stop_at)
    assert s.completion_ids == free.completion_ids[:first + 1]
    assert s.finish_reason == {"type": "stop", "matched": stop_at}


def test_eos_from_generation_config_stops_unless_ignored(engine, tiny_model, tmp_path):
    [free] = run(engine, [[5, 6, 7]], GREEDY)
    eos = free.completion_ids[2]
    # The same checkpoint, but its generation_config names the 3rd greedy token as EOS.
    for f in tiny_model.iterdir():
        (tmp_path / f.name).symlink_to(f)
    (tmp_path / "generation_config.json").unlink()
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos]}))
    e = LLMEngine(EngineConfig(model=str(tmp_path)))
    try:
        [stopped] = run(e, [[5, 6, 7]], SamplingParams(max_new_tokens=10, temperature=0.0))
        [ignored] = run(e, [[5, 6, 7]], GREEDY)
    finally:
        e.shutdown()
    first = free.completion_ids.index(eos)
    assert stopped.completion_ids == free.completion_ids[:first + 1]
    assert stopped.finish_reason == {"type": "stop", "matched": eos}
    assert ignored.completion_ids == free.completion_ids


def test_stop_string_truncates_text(engine):
    [free] = run(engine, [engine.tokenizer("Hello there").input_ids], GREEDY)
    text = free.output_text
    stop = text[5:8]
    assert stop and stop in text
    [s] = run(engine, [engine.tokenizer("Hello there").input_ids],
              SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True, stop=[stop]))
    assert s.output_text == text[:text.index(stop)]
    assert s.finish_reason == {"type": "stop", "matched": stop}


def test_abort_frees_blocks(engine):
    s = engine.add_request(engine.tokenizer(LONG).input_ids, GREEDY)
    engine.step()
    assert engine.block_manager.num_free_blocks < engine.block_manager.num_blocks
    assert engine.abort(s.rid).seq is s
    assert s.finish_reason["type"] == "abort"
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.has_work()


@pytest.mark.parametrize("prompt,params,field", [
    ([], GREEDY, "input_ids"),
    ([1, 2, 100000], GREEDY, "input_ids"),
    ([1, -1], GREEDY, "input_ids"),
    (list(range(1, 4097)), GREEDY, "input_ids"),
    ([1], SamplingParams(max_new_tokens=-1), "sampling_params.max_new_tokens"),
    ([1], SamplingParams(max_new_tokens=10**9), "sampling_params.max_new_tokens"),
    ([1], SamplingParams(temperature=-0.5), "sampling_params.temperature"),
    ([1], SamplingParams(top_p=1.5), "sampling_params.top_p"),
    ([1], SamplingParams(top_k=0), "sampling_params.top_k"),
    ([1], SamplingParams(min_p=2.0), "sampling_params.min_p"),
    ([1], SamplingParams(seed=-1), "sampling_params.seed"),
    ([1], SamplingParams(stop_token_ids=[10**7]), "sampling_params.stop_token_ids"),
    ([1], SamplingParams(stop=[""]), "sampling_params.stop"),
])
def test_bad_requests_name_the_field(engine, prompt, params, field):
    with pytest.raises(InvalidRequest) as e:
        engine.add_request(prompt, params)
    assert e.value.field == field
    assert not engine.has_work()


def test_config_refuses_impossible_combinations():
    from tpfleet.config import EngineConfig

    with pytest.raises(ValueError, match="triton"):
        EngineConfig(model="m", device="cuda", attention_backend="torch")  # default graphs on GPU
    with pytest.raises(ValueError, match="cuda"):
        EngineConfig(model="m", device="cpu", graph_mode="full")
    with pytest.raises(ValueError, match="tp_size"):
        EngineConfig(model="m", tp_size=3)
    assert EngineConfig(model="m", device="cuda", attention_backend="torch", graph_mode="eager").resolved_graph_mode \
        == "eager"


def _mixed_workload(e: LLMEngine) -> list[tuple]:
    """Sequences that end every way there is, at different steps, sharing batches, with a stop token
    and a stop string taken from a free run so they really occur. The results are compared across modes."""
    ids = e.tokenizer(LONG).input_ids
    [free] = run(e, [[5, 6, 7]], GREEDY)
    stop_at, stop_text = free.completion_ids[4], free.output_text[3:6]
    assert stop_text
    seqs = run(e, [ids[:50], [5, 6, 7], ids[30:90], ids[:50]], GREEDY)  # the last hits the prefix cache
    seqs += [e.add_request([5, 6, 7], SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True,
                                                      stop_token_ids=[stop_at])),
             e.add_request([5, 6, 7], SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True,
                                                      stop=[stop_text])),
             e.add_request(ids[:70], SamplingParams(max_new_tokens=3, temperature=0.0, ignore_eos=True)),
             e.add_request(ids[10:40], SamplingParams(max_new_tokens=12, temperature=1.0, seed=7, ignore_eos=True))]
    while e.has_work():
        e.step()
    return [(s.completion_ids, s.output_text, s.finish_reason) for s in seqs]


@pytest.mark.parametrize("tp", [1, 2])
def test_overlap_schedule_gives_what_step_by_step_gives(tiny_model, tp):
    """The overlapped engine launches each step before reading the last one back, so sequences that
    stop run one discarded row and inputs come from the device: none of that may show in outputs."""
    results, leftovers = {}, {}
    for overlap in (False, True):
        e = LLMEngine(EngineConfig(model=str(tiny_model), tp_size=tp, kv_cache_tokens=4096, overlap_schedule=overlap))
        try:
            results[overlap] = _mixed_workload(e)
            leftovers[overlap] = (e.in_flight, e.block_manager.num_free_blocks == e.block_manager.num_blocks)
        finally:
            e.shutdown()
    assert results[True] == results[False]
    assert [r[2]["type"] for r in results[True]] == ["length"] * 4 + ["stop", "stop", "length", "length"]
    assert leftovers[False] == (None, True)
    assert leftovers[True][1]  # every block back in the pool even though a step may remain unread


def test_overlap_step_returns_each_token_once_and_stops_exactly(engine):
    assert engine.cfg.overlap_schedule
    s = engine.add_request([5, 6, 7], SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True))
    streamed, steps = [], 0
    while engine.has_work():
        streamed += [o for o in engine.step() if o.seq is s]
        steps += 1
    assert len(streamed) == 4 and s.num_completion_tokens == 4 and s.num_pending == 0
    assert steps == 5  # four launches, then one step that only reads the last back
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_abort_with_a_step_in_flight_drops_its_token(engine):
    s = engine.add_request([5, 6, 7], GREEDY)
    engine.step()
    engine.step()
    assert engine.in_flight is not None and s in engine.in_flight.sampled
    known = list(s.completion_ids)
    engine.abort(s.rid)
    assert not engine.has_work()
    assert engine.step() == []  # reads the in-flight step back and discards the aborted row
    assert s.completion_ids == known and s.num_pending == 0


def test_an_aborted_request_keeps_the_text_it_held_back(engine):
    """Text held back as the possible start of a stop string comes out with the abort's last output: the
    request's text is still the decode of its tokens."""
    ids = engine.tokenizer("The river flows").input_ids
    [free] = run(engine, [ids], GREEDY)
    first = free.completion_ids[:6]
    held = engine.tokenizer.decode(first[3:])
    seq = engine.add_request(ids, SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True,
                                                 stop=[held + "\x00 never"]))
    shown = ""
    while seq.num_completion_tokens < 6:
        shown += "".join(out.new_text for out in engine.step() if out.seq is seq)
    assert seq.completion_ids == first and not shown.endswith(held)
    last = engine.abort(seq.rid)
    assert last.new_text.endswith(held) and seq.finish_reason["type"] == "abort"
    assert shown + last.new_text == seq.output_text == engine.tokenizer.decode(first)
