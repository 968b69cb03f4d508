"""Pausing and resuming generation, aborts that keep partial output, loads, flushes and weight versions:
on the engine, and through AsyncEngine as the server drives it."""

from __future__ import annotations

import asyncio

import pytest

from tpfleet.config import EngineConfig
from tpfleet.engine.llm_engine import LLMEngine
from tpfleet.engine.sequence import InvalidRequest, OutputOptions, SamplingParams
from tpfleet.server.async_engine import AsyncEngine

PROMPTS = [[5, 6, 7], list(range(10, 50)), [8, 9]]
GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_model):
    e = LLMEngine(EngineConfig(model=str(tiny_model), kv_cache_tokens=2048))
    yield e
    e.shutdown()


def finish(engine: LLMEngine) -> None:
    while engine.has_work():
        engine.step()


@pytest.fixture(scope="module")
def uninterrupted(engine):
    seqs = [engine.add_request(p, GREEDY) for p in PROMPTS]
    finish(engine)
    return [s.completion_ids for s in seqs]


def started(engine: LLMEngine, steps: int = 4):
    seqs = [engine.add_request(p, GREEDY, options=OutputOptions(return_logprob=True)) for p in PROMPTS]
    for _ in range(steps):
        engine.step()
    return seqs


@pytest.mark.parametrize("mode", ["retract", "in_place"])
def test_pause_then_continue_gives_the_uninterrupted_output(engine, uninterrupted, mode):
    seqs = started(engine)
    assert engine.pause(mode) == []
    assert engine.paused and engine.in_flight is None  # quiet: the step in flight was read back
    known = [list(s.completion_ids) for s in seqs]
    blocks = engine.block_manager
    if mode == "retract":
        assert not engine.scheduler.running and blocks.num_free_blocks == blocks.num_blocks
        assert engine.loads() == {"num_running_reqs": 0, "num_waiting_reqs": 3, "num_reqs": 3}
    else:
        assert len(engine.scheduler.running) == 3 and blocks.num_free_blocks < blocks.num_blocks
    for _ in range(3):
        engine.step()  # hands out what the pause read back, schedules nothing
    assert [s.completion_ids for s in seqs] == known and not engine.has_work()
    assert engine.snapshot().paused
    engine.continue_generation()
    finish(engine)
    assert [s.completion_ids for s in seqs] == uninterrupted
    assert all(len(s.output_logprobs) == s.num_completion_tokens for s in seqs)
    assert blocks.num_free_blocks == blocks.num_blocks


def test_pause_abort_ends_everything_with_partial_output(engine):
    seqs = started(engine)
    aborted = engine.pause("abort")
    assert sorted(o.seq.rid for o in aborted) == sorted(s.rid for s in seqs)
    for s in seqs:
        assert s.finish_reason["type"] == "abort" and s.is_finished
        assert 0 < s.num_completion_tokens < GREEDY.max_new_tokens
        assert len(s.output_logprobs) == s.num_completion_tokens
    assert engine.loads() == {"num_running_reqs": 0, "num_waiting_reqs": 0, "num_reqs": 0}
    engine.continue_generation()
    finish(engine)
    with pytest.raises(InvalidRequest) as e:
        engine.pause("sideways")
    assert e.value.field == "mode" and not engine.paused


def test_flush_cache_refuses_while_requests_run(engine):
    seq = engine.add_request(PROMPTS[1], GREEDY)
    engine.step()
    assert engine.flush_cache() is False
    finish(engine)
    assert engine.flush_cache() is True
    again = engine.add_request(PROMPTS[1], GREEDY)
    finish(engine)
    assert again.num_cached_tokens == 0 and seq.is_finished


def test_weight_version_is_that_of_the_weights_that_made_the_last_tokens(engine):
    engine.set_weight_version("7")
    try:
        done = engine.add_request([5, 6], SamplingParams(max_new_tokens=2))
        finish(engine)
        seq = engine.add_request([5, 6], SamplingParams(max_new_tokens=2))
        assert engine.snapshot().weight_version == "7"
        engine.set_weight_version("8")  # before seq's tokens: they all come from the new weights
        finish(engine)
        assert (done.weight_version, seq.weight_version) == ("7", "8")
    finally:
        engine.set_weight_version("default")


def test_async_engine_pause_abort_and_continue(tiny_model):
    engine = LLMEngine(EngineConfig(model=str(tiny_model), kv_cache_tokens=4096))
    aengine = AsyncEngine(engine)

    async def scenario():
        long = SamplingParams(max_new_tokens=2000, temperature=0.0, ignore_eos=True)
        stream = aengine.generate([5, 6, 7], long, rid="a", options=OutputOptions(return_logprob=True))
        first = await stream.__anext__()
        assert not first.finished
        assert aengine.abort("nobody") is False
        await aengine.pause_generation("abort")
        outputs = [first] + [out async for out in stream]
        last = outputs[-1]
        assert last.finished and last.finish_reason["type"] == "abort"
        assert len(last.output_logprobs) == len(last.output_ids) >= 1
        assert engine.in_flight is None

        queued = aengine.generate([5, 6, 7], SamplingParams(max_new_tokens=3, temperature=0.0, ignore_eos=True))
        await asyncio.sleep(0.3)
        assert engine.loads()["num_waiting_reqs"] == 1  # paused: admitted but not scheduled
        await aengine.continue_generation()
        done = [out async for out in queued][-1]
        assert done.finish_reason == {"type": "length", "length": 3}

        stream = aengine.generate([5, 6, 7], long, rid="b")
        await stream.__anext__()
        assert aengine.abort("b") is True
        last = [out async for out in stream][-1]
        assert last.finish_reason["type"] == "abort" and last.output_ids

    try:
        asyncio.run(scenario())
    finally:
        aengine.shutdown()


def test_calls_waiting_on_the_engine_fail_with_it_and_a_new_version_name_waits_its_turn(tiny_model):
    from tpfleet.server.async_engine import EngineDead

    engine = LLMEngine(EngineConfig(model=str(tiny_model), kv_cache_tokens=4096))
    aengine = AsyncEngine(engine)

    async def scenario():
        long = SamplingParams(max_new_tokens=3000, temperature=0.0, ignore_eos=True)
        stream = aengine.generate([5, 6, 7], long, rid="long")
        await stream.__anext__()
        update = asyncio.ensure_future(aengine.run_on_engine(lambda: "updated", update="quiet"))
        label = asyncio.ensure_future(aengine.run_on_engine(lambda: engine.set_weight_version("v9"), update="label"))
        await asyncio.sleep(0.3)
        assert not update.done() and not label.done() and engine.weight_version != "v9"  # both behind the request
        aengine.abort("long")
        assert await update == "updated"
        await label
        assert engine.weight_version == "v9"
        assert [out async for out in stream][-1].weight_version != "v9"  # made by the weights before

        stream = aengine.generate([5, 6, 7], long, rid="long-again")
        await stream.__anext__()
        waiting = asyncio.ensure_future(aengine.run_on_engine(lambda: "never", update="quiet"))
        await asyncio.sleep(0.3)
        aengine._fail_all("rank 1 died")  # as the watchdog does when a rank dies
        with pytest.raises(EngineDead):
            await asyncio.wait_for(waiting, 5)  # a 503 for the caller, not a connection cut by the exit

    try:
        asyncio.run(scenario())
    finally:
        aengine.shutdown()
