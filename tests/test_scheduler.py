from __future__ import annotations

import torch

from tpfleet.engine.block_manager import BlockManager
from tpfleet.engine.scheduler import Scheduler
from tpfleet.engine.sequence import SamplingParams, Sequence, SequenceStatus


def seq(n, rid):
    """A prompt of n tokens that begins with the request id's own token: no two prompts share a block."""
    return Sequence(rid, [100 + ord(rid)] + list(range(2, n + 1)), SamplingParams(), (), 10_000, torch.device("cpu"))


def advance(batch):
    """What the engine does after a step: count computed tokens, append a token where one was sampled."""
    for s in batch:
        sampled = s.samples
        s.seq.num_computed_tokens += s.num_tokens
        if sampled:
            s.seq.token_ids.append(7)


def test_long_prompt_is_chunked_by_token_budget():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=10)
    a = seq(25, "a")
    sched.add(a)
    sizes = []
    for _ in range(3):
        batch = sched.schedule()
        sizes.append([(s.seq.rid, s.num_tokens, s.samples) for s in batch])
        advance(batch)
    assert sizes == [[("a", 10, False)], [("a", 10, False)], [("a", 5, True)]]


def test_decodes_run_first_and_share_budget_with_new_prefill():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=8)
    a = seq(3, "a")
    sched.add(a)
    advance(sched.schedule())  # a's prefill
    b = seq(20, "b")
    sched.add(b)
    batch = sched.schedule()
    assert [(s.seq.rid, s.num_tokens) for s in batch] == [("a", 1), ("b", 7)]


def test_max_num_seqs_limits_admission():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=100)
    for r in "abc":
        sched.add(seq(3, r))
    batch = sched.schedule()
    assert [s.seq.rid for s in batch] == ["a", "b"]
    assert [s.rid for s in sched.waiting] == ["c"]


def test_newest_sequence_is_preempted_when_blocks_run_out():
    bm = BlockManager(num_blocks=4, block_size=2)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    a, b = seq(3, "a"), seq(3, "b")  # 2 blocks each: the pool is full after prefill
    sched.add(a)
    sched.add(b)
    advance(sched.schedule())
    assert bm.num_free_blocks == 0
    advance(sched.schedule())  # both decode within their second block (positions 3)
    batch = sched.schedule()  # both need a third block; b, the newest, makes room for a
    assert [s.seq.rid for s in batch] == ["a"]
    assert b.status is SequenceStatus.WAITING and b.block_table == [] and b.num_computed_tokens == 0
    assert sched.waiting[0] is b and b.num_preemptions == 1


def test_finish_returns_blocks_and_admits_the_next():
    bm = BlockManager(num_blocks=2, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    a, b = seq(8, "a"), seq(4, "b")
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    assert [s.seq.rid for s in batch] == ["a"]  # b does not fit yet
    advance(batch)
    sched.finish(a, {"type": "length"})
    assert bm.num_free_blocks == 2 and a.status is SequenceStatus.FINISHED
    assert [s.seq.rid for s in sched.schedule()] == ["b"]


def test_a_request_waits_for_prompt_blocks_that_another_is_computing():
    bm = BlockManager(64, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    prompt = list(range(1, 11))  # two full blocks, then a tail
    a, b, c = (Sequence(rid, prompt, SamplingParams(), (), 10_000, torch.device("cpu")) for rid in "abc")
    other = seq(5, "o")
    for s in (a, b, other):
        sched.add(s)
    batch = sched.schedule()
    assert [s.seq.rid for s in batch] == ["a", "o"]  # b waits for a's blocks; o, behind it, does not
    advance(batch)
    bm.commit_full_blocks(a)
    batch = sched.schedule()
    assert [(s.seq.rid, s.num_tokens) for s in batch if s.seq is b] == [("b", 2)]
    assert b.num_cached_tokens == 8
    # A follower is not left waiting on a leader that goes away before its blocks are computed.
    sched.add(c)
    leader = Sequence("d", [9] * 10, SamplingParams(), (), 10_000, torch.device("cpu"))
    follower = Sequence("e", [9] * 10, SamplingParams(), (), 10_000, torch.device("cpu"))
    sched.add(leader)
    sched.add(follower)
    assert [s.seq.rid for s in sched.schedule() if s.seq.rid in "de"] == ["d"]
    sched.finish(leader, {"type": "abort", "message": "gone"})
    assert [s.seq.rid for s in sched.schedule() if s.seq.rid in "de"] == ["e"]
