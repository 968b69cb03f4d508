from __future__ import annotations

import torch

from tpfleet.engine.block_manager import BlockManager
from tpfleet.engine.sequence import SamplingParams, Sequence


def seq(tokens, rid="r"):
    return Sequence(rid, list(tokens), SamplingParams(), (), 10_000, torch.device("cpu"))


def computed(bm: BlockManager, s: Sequence, n: int) -> None:
    """Pretend the model ran over the next n tokens: allocate, advance, register full blocks."""
    assert bm.allocate_slots(s, n)
    s.num_computed_tokens += n
    bm.commit_full_blocks(s)


def test_allocation_is_all_or_nothing():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = seq(range(10))
    assert bm.allocate_slots(a, 10)  # 3 blocks
    assert len(a.block_table) == 3 and bm.num_free_blocks == 1
    b = seq(range(100, 108))
    assert not bm.allocate_slots(b, 8)  # needs 2, 1 free
    assert b.block_table == [] and bm.num_free_blocks == 1
    bm.free(a)
    assert bm.num_free_blocks == 4 and a.block_table == []


def test_prefix_hit_shares_blocks_and_keeps_last_token_to_compute():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = seq(range(12))
    computed(bm, a, 12)
    b = seq(list(range(12)) + [99])  # same 12-token prefix
    assert bm.match_prefix(b) == 12
    assert b.block_table == a.block_table
    assert all(bm.blocks[i].ref_count == 2 for i in a.block_table)
    c = seq(range(12))  # identical prompt: the last block is recomputed so the last token has logits
    assert bm.match_prefix(c) == 8


def test_prefix_miss_on_different_earlier_token():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = seq(range(12))
    computed(bm, a, 12)
    b = seq([7] + list(range(1, 13)))  # first block differs, so the chain differs everywhere after
    assert bm.match_prefix(b) == 0


def test_freed_blocks_stay_cached_until_reused():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = seq(range(8))
    computed(bm, a, 8)
    bm.free(a)
    assert bm.num_free_blocks == 4
    b = seq(list(range(8)) + [5])
    assert bm.match_prefix(b) == 8
    assert bm.num_free_blocks == 2  # the two cached blocks were revived
    bm.free(b)
    # Fill the pool with unrelated tokens: the cached blocks get evicted.
    c = seq(range(50, 66))
    computed(bm, c, 16)
    bm.free(c)
    assert bm.match_prefix(seq(list(range(8)) + [5])) == 0


def test_eviction_takes_suffix_blocks_before_shared_prefix():
    bm = BlockManager(num_blocks=5, block_size=2)
    a = seq(range(8))
    computed(bm, a, 8)  # 4 blocks
    bm.free(a)
    # One fresh block is needed: it must come from the free list's oldest end, the never-used block,
    # then the tail of a (freed in reverse), never a's first block.
    d = seq([90, 91])
    computed(bm, d, 2)
    e = seq([92, 93])
    computed(bm, e, 2)
    assert bm.match_prefix(seq(list(range(6)) + [1])) == 6


def test_reset_prefix_cache_only_when_idle():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq(range(8))
    computed(bm, a, 8)
    assert not bm.reset_prefix_cache()
    bm.free(a)
    assert bm.reset_prefix_cache()
    assert bm.match_prefix(seq(list(range(8)) + [1])) == 0


def test_forgetting_prefixes_while_blocks_are_in_use():
    """New weights: no block the old ones filled is matched again, and a sequence running across the change
    registers none of its later blocks (their KV rests on the old); sequences admitted after it do."""
    bm = BlockManager(num_blocks=16, block_size=4)
    a = seq(range(12), "a")
    bm.match_prefix(a)
    computed(bm, a, 8)
    bm.forget_prefixes()
    assert bm.match_prefix(seq(list(range(8)) + [1], "b")) == 0
    d = seq(list(range(8)) + [50], "d")  # admitted after the change: computes blocks 0 and 1 again
    bm.match_prefix(d)
    computed(bm, d, 8)
    computed(bm, a, 4)  # a's third block fills after the change
    assert bm.match_prefix(seq(list(range(12)) + [1], "e")) == 8  # d's two blocks, not a's third


def test_prefix_caching_can_be_disabled():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = seq(range(8))
    computed(bm, a, 8)
    assert bm.match_prefix(seq(list(range(8)) + [1])) == 0
