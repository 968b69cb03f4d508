"""Paged KV-cache bookkeeping with prefix caching.

The cache is a pool of fixed-size blocks. A sequence's `block_table` lists the blocks that hold
its tokens in order. Every full block is registered under a hash chained over all tokens before
it, so a later request with the same prefix reuses those blocks instead of recomputing them.
Freed blocks keep their contents and hash until the pool hands them out again (least recently
freed first), which is what makes the cache outlive the requests that filled it.

Blocks that a running sequence is computing, but has not registered yet, are claimed under their
hash: a waiting request with the same prefix (the other samples of a group) waits for them rather
than computing them a second time.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from tpfleet.engine.sequence import Sequence


class Block:
    __slots__ = ("id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.id = block_id
        self.ref_count = 0
        self.hash: bytes | None = None
        self.token_ids: tuple[int, ...] = ()


def chain_hash(prev: bytes | None, token_ids: tuple[int, ...]) -> bytes:
    """128 bits over the block's tokens and the digest of those before it. Python's 64-bit `hash` would do
    for chance alone, but its collisions can be built, and a collision hands one prompt another's KV."""
    digest = hashlib.blake2b(prev or b"", digest_size=16)
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[bytes, int] = {}  # chain hash -> block id
        self.computing: dict[bytes, Sequence] = {}  # chain hash -> the running sequence computing that block
        self.generation = 0  # bumped when every cached prefix is forgotten (new weights)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_hash(self, seq: Sequence, index: int) -> bytes:
        """The chain hash of `seq`'s full block `index`, remembered on the sequence (its tokens only grow)."""
        hashes, bs = seq.block_hashes, self.block_size
        while len(hashes) <= index:
            i = len(hashes)
            hashes.append(chain_hash(hashes[-1] if hashes else None, tuple(seq.token_ids[i * bs:(i + 1) * bs])))
        return hashes[index]

    def matchable_blocks(self, seq: Sequence) -> int:
        """How many leading blocks may come from the cache. The last token is always left to compute,
        because sampling needs its logits; so is every prompt position whose logprob was asked for."""
        limit = (seq.num_tokens - 1) // self.block_size
        if seq.scores_prompt:
            limit = min(limit, seq.next_scored_position // self.block_size)
        return limit

    def match_prefix(self, seq: Sequence) -> int:
        """Take every cached full block of `seq`'s leading tokens; returns the number of tokens reused."""
        assert not seq.block_table
        seq.cache_generation = self.generation
        if not self.enable_prefix_caching:
            return 0
        for i in range(self.matchable_blocks(seq)):
            tokens = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            block_id = self.cached.get(self.block_hash(seq, i))
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_ids[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
        seq.num_hashed_blocks = len(seq.block_table)
        seq.num_computed_tokens = len(seq.block_table) * self.block_size
        if seq.num_tokens == seq.num_prompt_tokens:  # re-admitted after its first token, it finds its own output
            seq.num_cached_tokens = seq.num_computed_tokens
        return seq.num_computed_tokens

    def prefix_in_progress(self, seq: Sequence) -> bool:
        """Whether the first block `seq` would compute is being computed by another running sequence
        (call after match_prefix): then waiting for it costs less than computing it twice."""
        index = len(seq.block_table)
        if not self.enable_prefix_caching or index >= self.matchable_blocks(seq):
            return False
        owner = self.computing.get(self.block_hash(seq, index))
        return owner is not None and owner is not seq

    def claim_blocks(self, seq: Sequence) -> None:
        """Announce the full blocks of known tokens that `seq`, just admitted, will compute."""
        if not self.enable_prefix_caching:
            return
        for i in range(seq.num_hashed_blocks, len(seq.token_ids) // self.block_size):
            self.computing.setdefault(self.block_hash(seq, i), seq)

    def _unclaim(self, seq: Sequence, hashes) -> None:
        for h in hashes:
            if self.computing.get(h) is seq:
                del self.computing[h]

    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Make room for `num_new_tokens` more tokens of `seq`; all or nothing."""
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if need > self.num_free_blocks:
            return False
        for _ in range(need):
            block_id, _ = self.free_ids.popitem(last=False)
            block = self.blocks[block_id]
            if block.hash is not None and self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
            block.hash, block.token_ids, block.ref_count = None, (), 1
            seq.block_table.append(block_id)
        return True

    def commit_full_blocks(self, seq: Sequence) -> None:
        """Register blocks that became full of computed tokens, so later requests can share them; not those
        of a sequence admitted before the cache was last forgotten, whose KV rests on what was forgotten."""
        if not self.enable_prefix_caching or seq.cache_generation != self.generation:
            return
        bs = self.block_size
        for i in range(seq.num_hashed_blocks, seq.num_computed_tokens // bs):
            block = self.blocks[seq.block_table[i]]
            block.token_ids = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            block.hash = self.block_hash(seq, i)
            self.cached.setdefault(block.hash, block.id)
            self._unclaim(seq, [block.hash])
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, seq.num_computed_tokens // bs)

    def free(self, seq: Sequence) -> None:
        if self.computing:
            self._unclaim(seq, seq.block_hashes)
        # Tail blocks go to the front of the eviction order: a shared prefix outlives its suffixes.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_ids[block_id] = None
        seq.block_table = []
        seq.num_computed_tokens = seq.num_hashed_blocks = 0

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix, only while no block is in use (/flush_cache's rule)."""
        if self.num_free_blocks != self.num_blocks:
            return False
        self.forget_prefixes()
        return True

    def forget_prefixes(self) -> None:
        """Forget every cached prefix, also while sequences hold blocks: after a weight update, no KV the
        old weights computed may be matched again. Sequences running now register nothing later."""
        self.generation += 1
        self.cached.clear()
        self.computing.clear()
        for block in self.blocks:
            block.hash, block.token_ids = None, ()
