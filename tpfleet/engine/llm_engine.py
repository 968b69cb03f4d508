"""The driver: owns the scheduler and rank 0, starts ranks 1..N-1, and turns logits into text.

`step()` is synchronous and single-threaded; `AsyncEngine` runs it on a thread for the server.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import signal
import threading
import traceback
import uuid
from dataclasses import dataclass
from multiprocessing.connection import wait

import torch
from transformers import AutoTokenizer

from tpfleet.comm.group import create_store
from tpfleet.config import EngineConfig
from tpfleet.engine.block_manager import BlockManager
from tpfleet.engine.detokenizer import IncrementalDetokenizer
from tpfleet.engine.model_runner import ModelInput, ModelRunner
from tpfleet.engine.sampler import sample
from tpfleet.engine.scheduler import ScheduledSeq, Scheduler
from tpfleet.engine.sequence import InvalidRequest, SamplingParams, Sequence
from tpfleet.engine.worker import worker_main
from tpfleet.jit import default_triton_cache
from tpfleet.phases import report_phase

log = logging.getLogger("tpfleet.engine")
RANK_EXIT_PREFIX = "tpfleet rank-exit:"  # parsed by the fleet's diagnostics


@dataclass
class StepOutput:
    seq: Sequence
    new_text: str


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
        self._stopping = False
        self.workers: list[tuple[mp.Process, mp.connection.Connection]] = []
        # The rendezvous store's server runs in this process: held here until every worker, its client,
        # has exited (see `shutdown`).
        self._store = store = create_store(cfg.tp_size) if cfg.tp_size > 1 else None
        ctx = mp.get_context("spawn")
        for rank in range(1, cfg.tp_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(cfg, rank, store.port, child),
                               name=f"tpfleet-rank{rank}", daemon=True)
            proc.start()
            child.close()
            self.workers.append((proc, parent))
        report_phase("ranks_started", pids=[os.getpid()] + [p.pid for p, _ in self.workers])
        if self.workers:
            threading.Thread(target=self._watch_workers, name="tpfleet-watchdog", daemon=True).start()

        try:
            self.runner = ModelRunner(cfg, 0, store.port if store else 0, store)
            for rank, (proc, conn) in enumerate(self.workers, start=1):
                status, info = conn.recv()
                if status != "ready":
                    raise RuntimeError(f"rank {rank} failed to start:\n{info}")
        except BaseException:
            self._stop_workers()  # rank 0's own error is the story: no watchdog report of the others
            raise
        self.model_config = self.runner.model_config
        self.context_length = self.runner.context_length
        self.block_manager = BlockManager(self.runner.num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.max_seq_len = min(self.context_length, self.runner.num_blocks * cfg.block_size)
        self.scheduler = Scheduler(self.block_manager, cfg.max_num_seqs, cfg.max_num_batched_tokens)
        self.seqs: dict[str, Sequence] = {}
        self.detoks: dict[str, IncrementalDetokenizer] = {}
        self.released: set[str] = set()  # memory given back to a colocated trainer
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

    # --- every rank at once: memory and weights, for colocation with a trainer -------------------

    def call_all(self, method: str, *args) -> list:
        """Run a ModelRunner method on every rank; results in rank order. Every rank's answer is
        collected before any failure is raised, so the pipes never hold a stale reply."""
        for _, conn in self.workers:
            conn.send((method, args))
        try:
            replies = [("ok", getattr(self.runner, method)(*args))]
        except Exception:  # noqa: BLE001 - reported with the others below
            replies = [("error", traceback.format_exc())]
        replies += [conn.recv() for _, conn in self.workers]
        errors = [f"rank {r}: {value.strip().splitlines()[-1]}" for r, (status, value) in enumerate(replies)
                  if status != "ok"]
        if errors:
            raise RuntimeError(f"{method} failed: " + "; ".join(errors))
        return [value for _, value in replies]

    def release_memory(self, tags: list[str]) -> list[dict]:
        if self.has_work():
            raise InvalidRequest("tags", "requests are in flight: finish or abort them before releasing memory")
        self.drain()  # a step of aborted requests may still be on the GPU
        out = self.call_all("release_memory", tags)
        self.released |= set(tags)
        return out

    def resume_memory(self, tags: list[str]) -> list[dict]:
        out = self.call_all("resume_memory", tags)
        self.released -= set(tags)
        self.block_manager.reset_prefix_cache()  # the KV contents did not survive
        return out

    def update_weights(self, method: str, arg) -> list[dict]:
        out = self.call_all(method, arg)
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
        for _, conn in self.workers:
            conn.send(("run", (inp,)))
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

    def _watch_workers(self) -> None:
        """A dead rank would leave the others blocked in a collective forever: end the engine at once."""
        sentinels = {proc.sentinel: (rank, proc) for rank, (proc, _) in enumerate(self.workers, start=1)}
        ready = wait(list(sentinels))
        if self._stopping:
            return
        rank, proc = sentinels[ready[0]]
        proc.join(timeout=1)
        code = proc.exitcode
        how = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
        print(f"{RANK_EXIT_PREFIX} {json.dumps({'rank': rank, 'pid': proc.pid, 'exitcode': code})}", flush=True)
        log.critical("rank %d (pid %d) died with %s; stopping the engine", rank, proc.pid, how)
        for p, _ in self.workers:
            if p.is_alive():
                p.kill()
        os._exit(70)

    def _stop_workers(self) -> None:
        self._stopping = True
        for proc, _ in self.workers:
            proc.kill()
            proc.join(timeout=10)

    def shutdown(self) -> None:
        self._stopping = True
        for proc, conn in self.workers:
            try:
                conn.send(("exit", ()))
            except (BrokenPipeError, OSError):
                pass
        self.runner.shutdown()
        for proc, conn in self.workers:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
            conn.close()
        self.workers = []
        # Now that no client is left, stop the store's server thread here, not at interpreter exit.
        self._store = None
