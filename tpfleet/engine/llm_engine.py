"""The driver: owns the scheduler and the ranks (tpfleet.engine.rank_group), and turns logits into text.

`step()` is synchronous and single-threaded; `AsyncEngine` runs it on a thread for the server.
Tokens, logprobs and prompt scores of a step come home in one copy (see InFlightStep). `pause`
stops scheduling in one of three ways (PAUSE_MODES) and returns once no step is in flight.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tpfleet.config import EngineConfig
from tpfleet.engine.block_manager import BlockManager
from tpfleet.engine.detokenizer import IncrementalDetokenizer
from tpfleet.engine.rank_group import RankGroup
from tpfleet.engine.sampler import SamplerOutput, sample, score_prompt
from tpfleet.engine.scheduler import ScheduledSeq, Scheduler
from tpfleet.engine.sequence import InvalidRequest, OutputOptions, SamplingParams, Sequence
from tpfleet.engine.step_input import ModelInput, to_device
from tpfleet.engine.tokenizer import load_tokenizer
from tpfleet.jit import default_triton_cache

if TYPE_CHECKING:
    from tpfleet.engine.weight_updates import EngineWeights

# abort: end every request with what it has; retract: free every running request's KV and queue it to
# resume from its prefix; in_place: keep everything where it is
PAUSE_MODES = ("abort", "retract", "in_place")
MAX_TOP_LOGPROBS = 100


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
    paused: bool = False
    weight_version: str = "default"


@dataclass
class InFlightStep:
    """A launched step whose sampled tokens (and logprobs) may not have reached the host yet."""
    batch: list[ScheduledSeq]
    sampled: list[Sequence]  # in the order of the results' rows
    scored: list[tuple[Sequence, range]]  # prompt positions scored, in the order of the prompt rows
    results: dict[str, torch.Tensor]  # SamplerOutput's fields; host memory once `copied` has fired
    copied: torch.cuda.Event | None = None

    def host_results(self) -> dict[str, list]:
        if self.copied is not None:
            self.copied.synchronize()  # this step's copy only, not the work queued after it
        return {name: values.tolist() for name, values in self.results.items()}


class LLMEngine:
    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        default_triton_cache()
        self.tokenizer = load_tokenizer(cfg.model)
        self.ranks = RankGroup(cfg)
        self.runner = self.ranks.driver
        self.model_config = self.runner.model_config
        self.context_length = self.runner.context_length
        self.block_manager = BlockManager(self.runner.num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.max_seq_len = min(self.context_length, self.runner.num_blocks * cfg.block_size)
        self.scheduler = Scheduler(self.block_manager, cfg.max_num_seqs, cfg.max_num_batched_tokens,
                                   on_evict=self._keep_routing if self.runner.records_routing else None)
        self.seqs: dict[str, Sequence] = {}
        self.detoks: dict[str, IncrementalDetokenizer] = {}
        # Memory tags given back to a colocated trainer; replaced, never changed in place, so that another
        # thread's snapshot reads a consistent set.
        self.released: frozenset[str] = frozenset()
        # Checkpoint tensors no update has written since the weights were released without a host copy
        # (memory saver): the engine refuses to generate until this is None again.
        self.stale_weights: frozenset[str] | None = None
        self.in_flight: InFlightStep | None = None
        self.paused = False
        self.weight_version = "default"
        self.model_path = cfg.model  # where the weights came from: then the last update_weights_from_disk's
        self.held_outputs: list[StepOutput] = []  # read back by pause, handed out by the next step

    # --- requests -----------------------------------------------------------------------------

    def validate(self, prompt_ids: list[int], params: SamplingParams, field: str = "input_ids",
                 options: OutputOptions | None = None) -> None:
        """Raise InvalidRequest naming the field at fault. Reads only constants: safe from any thread."""
        options = options or OutputOptions()
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
        self._validate_options(options, len(prompt_ids))

    def _validate_options(self, options: OutputOptions, prompt_len: int) -> None:
        start = options.logprob_start_len
        if not isinstance(start, int) or not -1 <= start < prompt_len:
            raise InvalidRequest("logprob_start_len", f"must be -1 (no prompt logprobs) or a prompt position in "
                                                      f"[0, {prompt_len}), got {start!r}")
        k = options.top_logprobs_num
        if not isinstance(k, int) or not 0 <= k <= MAX_TOP_LOGPROBS:
            raise InvalidRequest("top_logprobs_num", f"must be an integer in [0, {MAX_TOP_LOGPROBS}], got {k!r}")
        if options.return_routed_experts and not self.runner.records_routing:
            why = ("the model is dense" if not self.model_config.is_moe
                   else "the engine was started without enable_return_routed_experts")
            raise InvalidRequest("return_routed_experts", f"routing replay is unavailable: {why}")

    def add_request(self, prompt_ids: list[int], params: SamplingParams, rid: str | None = None,
                    options: OutputOptions | None = None) -> Sequence:
        self.validate(prompt_ids, params, options=options)
        rid = rid or uuid.uuid4().hex
        if rid in self.seqs:
            raise InvalidRequest("rid", f"request id {rid!r} is already in use")
        seq = Sequence(rid, prompt_ids, params, self.model_config.eos_token_ids, self.max_seq_len,
                       self.runner.device, options)
        seq.weight_version = self.weight_version
        self.seqs[rid] = seq
        self.detoks[rid] = IncrementalDetokenizer(self.tokenizer, params.stop, params.skip_special_tokens,
                                                  params.no_stop_trim)
        self.scheduler.add(seq)
        return seq

    def abort(self, rid: str, message: str = "aborted") -> StepOutput | None:
        """End the request, keeping what it produced (tokens, text, logprobs) but dropping a step in flight;
        its last output carries the text held back until now."""
        seq = self.seqs.get(rid)
        return None if seq is None else StepOutput(seq, self._end(seq, {"type": "abort", "message": message}))

    def _keep_routing(self, seq: Sequence) -> None:
        """A sequence leaving the device (preempted, retracted) keeps the experts of the positions it
        computed: aborted before it runs again, it still reports them. A copy from an earlier eviction that
        covers more positions is kept."""
        kept = len(seq.routed_experts or b"") // self.runner.routing_row_bytes
        if seq.options.return_routed_experts and seq.num_computed_tokens > kept:
            seq.routed_experts = self.runner.routed_experts(seq.block_table, seq.num_computed_tokens)

    def _end(self, seq: Sequence, reason: dict) -> str:
        """Finish `seq`: collect its routing if asked (before its blocks go back), then free it. Routing
        covers every position or is left out: a request aborted before its prompt ran has none. Returns the
        text its detokenizer held back, now added to its output text."""
        if seq.options.return_routed_experts:
            num_positions = len(seq.token_ids) - 1  # every token a forward took
            size = num_positions * self.runner.routing_row_bytes
            if seq.num_computed_tokens >= num_positions:
                seq.routed_experts = self.runner.routed_experts(seq.block_table, num_positions)
            elif seq.routed_experts is not None and len(seq.routed_experts) >= size:
                seq.routed_experts = seq.routed_experts[:size]
            else:
                seq.routed_experts = None
        self.scheduler.finish(seq, reason)
        del self.seqs[seq.rid]
        tail = self.detoks.pop(seq.rid).take(final=True)
        seq.output_text += tail
        return tail

    def has_work(self) -> bool:
        """Requests to schedule (unless paused), outputs to hand out, or a step in flight whose tokens
        someone still waits for."""
        return ((not self.paused and self.scheduler.has_work()) or bool(self.held_outputs) or
                (self.in_flight is not None and any(not seq.is_finished for seq in self.in_flight.sampled)))

    def loads(self) -> dict:
        scheduler = self.scheduler
        return {"num_running_reqs": len(scheduler.running), "num_waiting_reqs": len(scheduler.waiting),
                "num_reqs": len(scheduler.running) + len(scheduler.waiting)}

    def snapshot(self) -> EngineSnapshot:
        """Counts and sizes only: safe to take from another thread than the engine's."""
        blocks, scheduler = self.block_manager, self.scheduler
        return EngineSnapshot(num_running_reqs=len(scheduler.running), num_waiting_reqs=len(scheduler.waiting),
                              kv_cache_usage=blocks.usage, num_kv_blocks=blocks.num_blocks,
                              max_total_num_tokens=blocks.num_blocks * self.cfg.block_size,
                              num_preemptions=scheduler.num_preemptions, released=tuple(sorted(self.released)),
                              paused=self.paused, weight_version=self.weight_version)

    def set_weight_version(self, version: str) -> None:
        """Name the weights now loaded. Requests in flight report it too: their next tokens come from them."""
        self.weight_version = version
        for seq in self.seqs.values():
            seq.weight_version = version

    # --- pausing --------------------------------------------------------------------------------

    def pause(self, mode: str = "abort") -> list[StepOutput]:
        """Stop scheduling until continue_generation(); returns the requests aborted (mode abort). The
        step in flight is read back first (its outputs come with the next step()), so the engine is
        quiet when this returns."""
        if mode not in PAUSE_MODES:
            raise InvalidRequest("mode", f"must be one of {list(PAUSE_MODES)}, got {mode!r}")
        self.held_outputs += self.drain()
        self.paused = True
        if mode == "retract":
            self.scheduler.retract_all()
        if mode != "abort":
            return []
        return [StepOutput(seq, self._end(seq, {"type": "abort", "message": "generation paused (mode abort)"}))
                for seq in list(self.seqs.values())]

    def continue_generation(self) -> None:
        self.paused = False

    # --- every rank at once: memory and weights, for colocation with a trainer -------------------

    def release_memory(self, tags: list[str]) -> list[dict]:
        """Allowed while requests only wait (retracted by a pause): they hold no KV. Each rank reports
        the bytes it released per tag and what the driver shows freed (tpfleet.engine.colocation)."""
        if self.scheduler.running or (self.scheduler.waiting and not self.paused):
            raise InvalidRequest("tags", "requests are in flight: finish, abort or retract them (pause_generation "
                                         "mode retract) before releasing memory")
        self.drain()  # a step of aborted requests may still be on the GPU
        if "kv_cache" in tags:
            self.block_manager.reset_prefix_cache()  # no block is in use: every one is free and forgotten
        out = self.ranks.call_all("colocation.release_memory", tags)
        self.released = self.released | set(tags)
        if "weights" in tags and self.runner.saver.enabled and not self.cfg.weights_cpu_backup:
            self.stale_weights = frozenset(self.weights.required_names())
        return out

    def resume_memory(self, tags: list[str]) -> list[dict]:
        """With the memory saver the tags come back at their old addresses and the graphs replay as
        captured; weights released without a host copy hold no values until a weight update."""
        out = self.ranks.call_all("colocation.resume_memory", tags)
        self.released = self.released - set(tags)
        self.block_manager.reset_prefix_cache()  # the KV contents did not survive
        return out

    def unavailable_reason(self) -> str | None:
        """Why generation is refused now (a 503 for the caller), or None: memory given to a trainer, or
        weights that came back without values."""
        if self.released:
            return f"memory released ({sorted(self.released)}): POST /resume_memory_occupation first"
        if self.stale_weights:
            return (f"the weights were released without a host copy and {len(self.stale_weights)} checkpoint "
                    "tensors have not been loaded since: update the weights (/update_weights_from_tensor, "
                    "_from_disk or _from_distributed) first")
        return None

    def flush_cache(self) -> bool:
        """Forget every cached prefix; False (nothing done) while requests are running or waiting."""
        if self.seqs:
            return False
        self.drain()  # a step of aborted requests may still hold blocks' contents in use
        return self.block_manager.reset_prefix_cache()

    # --- one engine step ------------------------------------------------------------------------

    def step(self) -> list[StepOutput]:
        """Launch the next step, then read back the one before it. Under the overlap schedule the
        GPU runs step N+1 while the host turns step N's tokens into text: a sequence that stops at
        N has one discarded row in N+1. Without it each step is read back at once, and so is a step
        that sampled for a request with penalties, which read its every token on the host."""
        outputs, self.held_outputs = self.held_outputs, []
        if self.in_flight is not None and any(seq.params.has_penalties and not seq.is_finished
                                              for seq in self.in_flight.sampled):
            outputs += self.drain()
        batch = [] if self.paused else self.scheduler.schedule()
        launched = self._launch(batch) if batch else None  # reads self.in_flight for pending tokens
        done, self.in_flight = self.in_flight, launched
        outputs += self._read_back(done) if done else []
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
        scored = [(s.seq, positions) for s in batch if (positions := s.scored_positions())]
        out = self.runner.run(inp, lambda logits: self._sample(logits, inp, sampled, scored))
        for seq, positions in scored:
            seq.next_scored_position = positions.stop
        for s in batch:
            s.seq.num_computed_tokens += s.num_tokens
        for seq in sampled:
            seq.num_pending += 1
        step = InFlightStep(batch, sampled, scored, out.tensors() if out is not None else {})
        if any(values.is_cuda for values in step.results.values()):
            # Queue the copies home now, behind this step only, under one event: a .tolist() at
            # read-back time would sit behind the next step too, and wait for it.
            for name, values in step.results.items():
                step.results[name] = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
                step.results[name].copy_(values, non_blocking=True)
            step.copied = torch.cuda.Event()
            step.copied.record()
        return step

    @staticmethod
    def _sample(logits: torch.Tensor, inp: ModelInput, sampled: list[Sequence],
                scored: list[tuple[Sequence, range]]) -> SamplerOutput:
        """Sample the sampled rows; score the prompt rows (input logprobs) with the next prompt token."""
        if not inp.scored:
            return sample(logits, sampled)
        scored_rows = set(inp.scored)
        sample_rows = to_device([row for row in range(logits.shape[0]) if row not in scored_rows], torch.int64,
                                logits.device)
        if sampled:
            out = sample(logits[sample_rows], sampled)
        else:
            out = SamplerOutput(torch.empty(0, dtype=torch.int64, device=logits.device))
        seqs = [seq for seq, positions in scored for _ in positions]
        targets = [seq.token_ids[pos + 1] for seq, positions in scored for pos in positions]
        score_prompt(logits[to_device(inp.scored, torch.int64, logits.device)], seqs, targets, out)
        return out

    def _read_back(self, step: InFlightStep) -> list[StepOutput]:
        results = step.host_results()
        row = 0
        for seq, positions in step.scored:
            if not seq.is_finished:
                seq.input_logprobs += results["prompt_logprobs"][row:row + len(positions)]
                k = seq.options.top_logprobs_num
                if k:
                    values = results["prompt_top_logprobs"][row:row + len(positions)]
                    ids = results["prompt_top_ids"][row:row + len(positions)]
                    seq.input_top_logprobs += [list(zip(v[:k], i[:k])) for v, i in zip(values, ids)]
            row += len(positions)
        live = [(i, seq) for i, seq in enumerate(step.sampled) if not seq.is_finished]
        for i, seq in live:
            seq.num_pending -= 1
            if seq.params.max_new_tokens == 0:  # a scoring request: its sample is not an output
                continue
            seq.token_ids.append(results["tokens"][i])
            if seq.options.return_logprob:
                seq.output_logprobs.append(results["logprobs"][i])
                k = seq.options.top_logprobs_num
                if k:
                    seq.output_top_logprobs.append(list(zip(results["top_logprobs"][i][:k],
                                                            results["top_ids"][i][:k])))
        for s in step.batch:  # every token it computed is known now
            if not s.seq.is_finished:
                self.block_manager.commit_full_blocks(s.seq)
        return [self._finish_token(seq) for _, seq in live]

    def _finish_token(self, seq: Sequence) -> StepOutput:
        """Detokenize the newly read-back token and end the sequence if it stops here. Before
        min_new_tokens are out no stop string counts (stop tokens were never sampled)."""
        if seq.params.max_new_tokens == 0:
            return StepOutput(seq, self._end(seq, {"type": "length", "length": 0}))
        token_id = seq.token_ids[-1]
        detok = self.detoks[seq.rid]
        stops = seq.num_completion_tokens >= seq.params.min_new_tokens
        reason = None
        if stops and token_id in seq.stop_ids:
            reason = {"type": "stop", "matched": token_id}
            if seq.params.no_stop_trim:
                detok.add(token_id, check_stop=False)
        else:
            detok.add(token_id, check_stop=stops)
            if detok.matched_stop is not None:
                reason = {"type": "stop", "matched": detok.matched_stop}
            elif seq.reaches_length(len(seq.token_ids)):  # the known tokens; one more may be pending
                reason = {"type": "length", "length": seq.num_completion_tokens}
        if reason is not None:
            return StepOutput(seq, self._end(seq, reason))
        new_text = detok.take(final=False)
        seq.output_text += new_text
        return StepOutput(seq, new_text)

    # --- lifecycle --------------------------------------------------------------------------------

    def shutdown(self) -> None:
        self.ranks.shutdown()

    # --- new weights (tpfleet.engine.weight_updates): each checked in full on every rank, then applied
    # on all of them or on none; InvalidRequest names the field at fault ------------------------------

    @functools.cached_property
    def weights(self) -> EngineWeights:
        """The driver's side of weight updates, made on first use (its import pulls in safetensors and
        the collective-group code, which most engines never need)."""
        from tpfleet.engine.weight_updates import EngineWeights

        return EngineWeights(self)

    def update_weights_from_disk(self, model_path: str, weight_version: str | None = None,
                                 before_commit: Callable[[], None] | None = None) -> list[dict]:
        """`before_commit` (each update takes one) runs once the update is checked and staged, just before
        the weights change: where a caller aborts the requests in flight."""
        return self.weights.update_from_disk(model_path, weight_version, before_commit)

    def update_weights_from_tensor(self, serialized_named_tensors: list[str], load_format: str | None = None,
                                   weight_version: str | None = None,
                                   before_commit: Callable[[], None] | None = None) -> list[dict]:
        """One payload (tpfleet.weight_sync's format) for every TP rank, or one per rank."""
        return self.weights.update_from_tensor(serialized_named_tensors, load_format, weight_version, before_commit)

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                  group_name: str, backend: str) -> list[dict]:
        """Join a trainer's group as ranks rank_offset + r; blocks until every member has joined."""
        return self.weights.init_group(master_address, master_port, rank_offset, world_size, group_name, backend)

    def update_weights_from_distributed(self, names: list[str], dtypes: list[str], shapes: list[list[int]],
                                        group_name: str, weight_version: str | None = None,
                                        load_format: str | None = None,
                                        before_commit: Callable[[], None] | None = None) -> list[dict]:
        """Receive each named full tensor by broadcast from the group's rank 0, in order."""
        return self.weights.update_from_distributed(names, dtypes, shapes, group_name, weight_version, load_format,
                                                    before_commit)

    def destroy_weights_update_group(self, group_name: str) -> list[dict]:
        return self.weights.destroy_group(group_name)
