"""The driver: owns the scheduler and the ranks (tpfleet.engine.rank_group), and turns logits into text.

`step()` is synchronous and single-threaded; `AsyncEngine` runs it on a thread for the server.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import torch
from transformers import AutoTokenizer

from tpfleet.config import EngineConfig
from tpfleet.engine.block_manager import BlockManager
from tpfleet.engine.detokenizer import IncrementalDetokenizer
from tpfleet.engine.rank_group import RankGroup
from tpfleet.engine.sampler import sample
from tpfleet.engine.scheduler import ScheduledSeq, Scheduler
from tpfleet.engine.sequence import InvalidRequest, SamplingParams, Sequence
from tpfleet.engine.step_input import ModelInput
from tpfleet.jit import default_triton_cache


@dataclass
class StepOutput:
    seq: Sequence
    new_text: str


@dataclass(frozen=True)
class EngineSnapshot:
    """The engine's state at one moment, as the server reports it (/get_server_info, /metrics)."""
    num_running_reqs: int
    num_waiting_reqs: int
    kv_cache_usage: float  # fraction of KV-cache blocks in use
    num_kv_blocks: int
    max_total_num_tokens: int  # KV-cache capacity in tokens
    num_preemptions: int  # since start
    released: tuple[str, ...]  # memory tags given to a colocated trainer and not resumed yet, sorted


@dataclass
class InFlightStep:
    """A launched step whose sampled tokens may not have reached the host yet."""
    batch: list[ScheduledSeq]
    sampled: list[Sequence]  # in the order of `tokens`
    tokens: torch.Tensor | None  # host memory, valid once `copied` has fired
    copied: torch.cuda.Event | None = None

    def token_ids(self) -> list[int]:
        if self.copied is not None:
            self.copied.synchronize()  # this step's copy only, not the work queued after it
        return self.tokens.tolist() if self.sampled else []


class LLMEngine:
    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        default_triton_cache()
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        self.ranks = RankGroup(cfg)
        self.runner = self.ranks.driver
        self.model_config = self.runner.model_config
        self.context_length = self.runner.context_length
        self.block_manager = BlockManager(self.runner.num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.max_seq_len = min(self.context_length, self.runner.num_blocks * cfg.block_size)
        self.scheduler = Scheduler(self.block_manager, cfg.max_num_seqs, cfg.max_num_batched_tokens)
        self.seqs: dict[str, Sequence] = {}
        self.detoks: dict[str, IncrementalDetokenizer] = {}
        # Memory tags given back to a colocated trainer; replaced, never changed in place, so that another
        # thread's snapshot reads a consistent set.
        self.released: frozenset[str] = frozenset()
        self.in_flight: InFlightStep | None = None

    # --- requests -----------------------------------------------------------------------------

    def validate(self, prompt_ids: list[int], params: SamplingParams, field: str = "input_ids") -> None:
        """Raise InvalidRequest naming the field at fault. Reads only constants: safe from any thread."""
        vocab = self.model_config.vocab_size
        if not prompt_ids:
            raise InvalidRequest(field, "the prompt is empty")
        bad = next((t for t in prompt_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequest(field, f"token id {bad} is outside the vocabulary [0, {vocab})")
        if len(prompt_ids) >= self.max_seq_len:
            raise InvalidRequest(field, f"the prompt has {len(prompt_ids)} tokens; the context holds at most "
                                        f"{self.max_seq_len} including at least one generated token")
        params.verify(vocab)
        if params.max_new_tokens > self.context_length:
            raise InvalidRequest("sampling_params.max_new_tokens",
                                 f"{params.max_new_tokens} exceeds the context length {self.context_length}")

    def add_request(self, prompt_ids: list[int], params: SamplingParams, rid: str | None = None) -> Sequence:
        self.validate(prompt_ids, params)
        rid = rid or uuid.uuid4().hex
        if rid in self.seqs:
            raise InvalidRequest("rid", f"request id {rid!r} is already in use")
        seq = Sequence(rid, prompt_ids, params, self.model_config.eos_token_ids, self.max_seq_len,
                       self.runner.device)
        self.seqs[rid] = seq
        self.detoks[rid] = IncrementalDetokenizer(self.tokenizer, params.stop)
        self.scheduler.add(seq)
        return seq

    def abort(self, rid: str) -> Sequence | None:
        seq = self.seqs.pop(rid, None)
        if seq is not None:
            self.detoks.pop(rid)
            self.scheduler.finish(seq, {"type": "abort", "message": "aborted"})
        return seq

    def has_work(self) -> bool:
        """Requests to schedule, or a step in flight whose tokens someone still waits for."""
        return self.scheduler.has_work() or (self.in_flight is not None and
                                             any(not seq.is_finished for seq in self.in_flight.sampled))

    def snapshot(self) -> EngineSnapshot:
        """Counts and sizes only: safe to take from another thread than the engine's."""
        blocks, scheduler = self.block_manager, self.scheduler
        return EngineSnapshot(num_running_reqs=len(scheduler.running), num_waiting_reqs=len(scheduler.waiting),
                              kv_cache_usage=blocks.usage, num_kv_blocks=blocks.num_blocks,
                              max_total_num_tokens=blocks.num_blocks * self.cfg.block_size,
                              num_preemptions=scheduler.num_preemptions, released=tuple(sorted(self.released)))

    # --- every rank at once: memory and weights, for colocation with a trainer -------------------

    def release_memory(self, tags: list[str]) -> list[dict]:
        if self.has_work():
            raise InvalidRequest("tags", "requests are in flight: finish or abort them before releasing memory")
        self.drain()  # a step of aborted requests may still be on the GPU
        out = self.ranks.call_all("colocation.release_memory", tags)
        self.released = self.released | set(tags)
        return out

    def resume_memory(self, tags: list[str]) -> list[dict]:
        out = self.ranks.call_all("colocation.resume_memory", tags)
        self.released = self.released - set(tags)
        self.block_manager.reset_prefix_cache()  # the KV contents did not survive
        return out

    def update_weights_from_disk(self, model_dir: str) -> list[dict]:
        return self._update_weights("colocation.update_weights_from_disk", model_dir)

    def update_weights_from_tensor(self, payloads: list[str]) -> list[dict]:
        """`payloads`: one serialized payload for every rank, or one per rank."""
        return self._update_weights("colocation.update_weights_from_tensor", payloads)

    def _update_weights(self, method: str, arg) -> list[dict]:
        out = self.ranks.call_all(method, arg)
        self.block_manager.reset_prefix_cache()  # cached prefixes were computed by the old weights
        return out

    def flush_cache(self) -> bool:
        return self.block_manager.reset_prefix_cache()

    # --- one engine step ------------------------------------------------------------------------

    def step(self) -> list[StepOutput]:
        """Launch the next step, then read back the one before it. Under the overlap schedule the
        GPU runs step N+1 while the host turns step N's tokens into text: a sequence that stops at
        N has one discarded row in N+1. Without it each step is read back at once."""
        batch = self.scheduler.schedule()
        launched = self._launch(batch) if batch else None  # reads self.in_flight for pending tokens
        done, self.in_flight = self.in_flight, launched
        outputs = self._read_back(done) if done else []
        if not self.cfg.overlap_schedule:
            outputs += self.drain()
        return outputs

    def drain(self) -> list[StepOutput]:
        """Read back the step in flight, if any: after this the host knows every sampled token."""
        done, self.in_flight = self.in_flight, None
        return self._read_back(done) if done else []

    def _launch(self, batch: list[ScheduledSeq]) -> InFlightStep:
        pending = {seq.rid: i for i, seq in enumerate(self.in_flight.sampled)} if self.in_flight else {}
        inp = ModelInput.build(batch, self.cfg.block_size, pending)
        self.ranks.send_step(inp)
        sampled = [s.seq for s in batch if s.samples]
        tokens = self.runner.run(inp, lambda logits: sample(logits, sampled))
        for s in batch:
            s.seq.num_computed_tokens += s.num_tokens
        for seq in sampled:
            seq.num_pending += 1
        step = InFlightStep(batch, sampled, tokens)
        if tokens is not None and tokens.is_cuda:
            # Queue the copy home now, behind this step only: a .tolist() at read-back time would
            # sit behind the next step too, and wait for it.
            step.tokens = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            step.tokens.copy_(tokens, non_blocking=True)
            step.copied = torch.cuda.Event()
            step.copied.record()
        return step

    def _read_back(self, step: InFlightStep) -> list[StepOutput]:
        token_ids = step.token_ids()
        live = [(seq, t) for seq, t in zip(step.sampled, token_ids) if not seq.is_finished]
        for seq, t in live:
            seq.num_pending -= 1
            seq.token_ids.append(t)
        for s in step.batch:  # every token it computed is known now
            if not s.seq.is_finished:
                self.block_manager.commit_full_blocks(s.seq)
        return [self._finish_token(seq, t) for seq, t in live]

    def _finish_token(self, seq: Sequence, token_id: int) -> StepOutput:
        """Detokenize the newly read-back token and end the sequence if it stops here."""
        detok = self.detoks[seq.rid]
        reason = None
        if token_id in seq.stop_ids:
            reason = {"type": "stop", "matched": token_id}
        else:
            detok.add(token_id)
            if detok.matched_stop is not None:
                reason = {"type": "stop", "matched": detok.matched_stop}
            elif seq.reaches_length(len(seq.token_ids)):  # the known tokens; one more may be pending
                reason = {"type": "length", "length": seq.num_completion_tokens}
        if reason is not None:
            self.scheduler.finish(seq, reason)
            del self.seqs[seq.rid], self.detoks[seq.rid]
        new_text = detok.take(final=reason is not None)
        seq.output_text += new_text
        return StepOutput(seq, new_text)

    # --- lifecycle --------------------------------------------------------------------------------

    def shutdown(self) -> None:
        self.ranks.shutdown()
