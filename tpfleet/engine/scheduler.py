"""Continuous batching with chunked prefill and preemption by recomputation.

Each step has a token budget. Running sequences are served first, oldest first: one token for a
decode, or the next chunk of an unfinished prefill. New requests are then admitted from the
waiting queue while budget, sequence slots and KV blocks last; a long prompt is split into
chunks across steps so it never stalls the decodes behind it. When KV blocks run out, the newest
running sequence is preempted: its blocks are freed and it goes back to the front of the queue,
to be recomputed (cheaply, often from the prefix cache) once memory is available. A sequence whose last
sampled token is not read back yet (the overlap schedule) preempts nobody: that token may have ended it,
so it waits a step instead.

A waiting request whose next prompt block another running sequence is computing right now (the
G samples of a group arrive together) is passed over until that block is in the prefix cache, so a
shared prompt is computed once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from tpfleet.engine.block_manager import BlockManager
from tpfleet.engine.sequence import Sequence, SequenceStatus

NO_POSITIONS = range(0)


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # new tokens computed this step

    @property
    def samples(self) -> bool:
        """Whether this step reaches the end of the sequence, so its last logits are sampled."""
        return self.seq.num_computed_tokens + self.num_tokens == self.seq.num_tokens

    def scored_positions(self) -> range:
        """Prompt positions of this step whose logits give an input logprob, of the token after each."""
        seq = self.seq
        if not seq.scores_prompt:  # the common case, decodes and requests without input logprobs: no work
            return NO_POSITIONS
        start = max(seq.num_computed_tokens, seq.next_scored_position)
        return range(start, max(start, min(seq.num_computed_tokens + self.num_tokens, seq.num_prompt_tokens - 1)))


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 on_evict: Callable[[Sequence], None] | None = None):
        """`on_evict(seq)` runs when a running sequence is about to lose its KV blocks without finishing
        (preempted or retracted), while they still hold what it computed."""
        self.bm = block_manager
        self.on_evict = on_evict
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.max_num_batched_tokens
        batch: list[ScheduledSeq] = []
        preempted = False

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.num_pending and seq.reaches_length(seq.num_tokens):  # the last token: it ends when read back
                i += 1
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            room = self.bm.allocate_slots(seq, n)
            if not room and seq.num_pending:
                i += 1  # its unread token may have ended it: it waits a step rather than evict another
                continue
            while not room:
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
                room = self.bm.allocate_slots(seq, n)
            if room:
                batch.append(ScheduledSeq(seq, n))
                budget -= n
                i += 1

        # After a preemption the pool is short: admitting new work would only thrash.
        i = 0
        while i < len(self.waiting) and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.waiting[i]
            self.bm.match_prefix(seq)
            if self.bm.prefix_in_progress(seq):
                self.bm.free(seq)
                i += 1
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.bm.allocate_slots(seq, n):
                self.bm.free(seq)  # hold nothing while waiting
                break
            del self.waiting[i]
            self.bm.claim_blocks(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.append(ScheduledSeq(seq, n))
            budget -= n

        batch.sort(key=lambda s: s.num_tokens != 1)  # single-token queries first: see AttentionMetadata
        return batch

    def _evict(self, seq: Sequence) -> None:
        if self.on_evict is not None:
            self.on_evict(seq)
        self.bm.free(seq)

    def _preempt(self, seq: Sequence) -> None:
        self._evict(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def retract_all(self) -> None:
        """Take every running sequence off the device, back to the front of the queue in its order: its
        KV is freed and recomputed, mostly from the prefix cache, when it is scheduled again."""
        for seq in reversed(self.running):
            self._evict(seq)
            seq.status = SequenceStatus.WAITING
            self.waiting.appendleft(seq)
        self.running = []

    def finish(self, seq: Sequence, reason: dict) -> None:
        """End `seq` (done, or aborted) wherever it is, and return its blocks to the pool."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.bm.free(seq)
        seq.num_pending = 0  # a step still in flight for it is discarded when read back
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
