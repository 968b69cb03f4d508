"""Runs `LLMEngine.step()` on one thread and streams results to asyncio callers.

Every mutation of engine state happens on the engine thread: callers post closures to an inbox,
so the scheduler needs no locks. Outputs travel back with `call_soon_threadsafe`. An aborted
request's stream ends with what it produced and finish_reason {"type": "abort", ...}, never an error;
so does every request in flight when the server shuts down. When the engine dies (its loop fails, or a
rank dies and the engine is about to exit), every stream ends with EngineDead: HTTP 503.

A weight update waits until no request is in flight, and requests that arrive meanwhile wait behind it,
so that every answer comes from the one weight version it reports, as SGLang's update lock makes it;
unless generation is paused (the requests kept then go on with the new weights, and report them) or the
update aborts every request itself.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Literal

from tpfleet.engine.llm_engine import PAUSE_MODES, EngineSnapshot, LLMEngine, StepOutput
from tpfleet.engine.sequence import InvalidRequest, OutputOptions, SamplingParams, Sequence
from tpfleet.server.metrics import Metrics

log = logging.getLogger("tpfleet.engine")


@dataclass
class RequestOutput:
    rid: str
    output_ids: list[int]  # all generated so far
    text: str  # all text so far
    delta: str  # text new in this output
    finished: bool
    finish_reason: dict | None
    prompt_tokens: int
    cached_tokens: int
    e2e_latency: float
    # Cumulative, as on tpfleet.engine.sequence.Sequence; empty unless asked for
    output_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list[list[tuple[float, int]]] = field(default_factory=list)
    input_logprobs: list[float | None] = field(default_factory=list)
    input_top_logprobs: list[list[tuple[float, int]]] = field(default_factory=list)
    weight_version: str = "default"
    routed_experts: bytes | None = None  # only in the final output

    @property
    def completion_tokens(self) -> int:
        return len(self.output_ids)

    def after(self, earlier: RequestOutput) -> RequestOutput:
        """This output standing for `earlier` too: a reader that fell behind gets one output, not a backlog.
        Everything but the delta is cumulative already."""
        return replace(self, delta=earlier.delta + self.delta)


@dataclass
class Stream:
    """Where a request's outputs go: a queue read on `loop`; every token's output, or only the final."""
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    stream: bool

    def send(self, item) -> None:
        """Put `item` on the queue from the engine thread."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


def _deliver(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for q, item in items:
        q.put_nowait(item)


def _made_of(rid: str, parent: str) -> bool:
    """Whether `rid` is `<parent>_<i>`: one of the requests a request id given to a batch or to n > 1 became."""
    index = rid[len(parent) + 1:]
    return rid.startswith(parent) and rid[len(parent):len(parent) + 1] == "_" and index.isdigit()


class EngineUnavailable(RuntimeError):
    """The engine cannot take requests now (HTTP 503)."""


class EngineDead(EngineUnavailable):
    pass


class AsyncEngine:
    def __init__(self, engine: LLMEngine, metrics: Metrics | None = None):
        self.engine = engine
        self.metrics = metrics or Metrics()
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, Stream] = {}
        # Engine thread only: weight updates waiting for no request in flight, and the requests held behind them
        self._quiet_calls: list[Callable[[], None]] = []
        self._held: dict[str, Callable[[], None]] = {}
        self._calls: set[Callable[[BaseException], None]] = set()  # how to fail each run_on_engine caller waiting
        self._last_token_time: dict[str, float] = {}
        self._running = True
        self._stopped = False
        self._closing = False  # the server is shutting down: no new requests
        self.error: str | None = None
        # What the engine thread is in now: (monotonic start, its limit in seconds, what it is), or None.
        self._busy: tuple[float, float, str] | None = None
        cfg = engine.cfg
        self._step = (cfg.hang_timeout, f"one step for more than {cfg.hang_timeout:g}s (hang_timeout): a kernel "
                                        f"or collective that never returns")
        self._call = (cfg.startup_hang_timeout, f"one call for more than {cfg.startup_hang_timeout:g}s "
                                                f"(startup_hang_timeout): a collective whose peers never come, such "
                                                f"as a trainer gone quiet in a weight update")
        self._thread = threading.Thread(target=self._loop, name="tpfleet-engine", daemon=True)
        self._thread.start()
        engine.ranks.on_failure = self._fail_all
        threading.Thread(target=self._watch_steps, name="tpfleet-step-watch", daemon=True).start()

    @property
    def alive(self) -> bool:
        """False once the engine loop failed, a rank stopped making progress (it is about to exit), or
        the driver's own step or call has run past its limit (a kernel that never finishes, a trainer
        that went quiet in the middle of a weight update)."""
        return (self.error is None and self._thread.is_alive() and self.engine.ranks.hung is None
                and self._overran() is None)

    def _overran(self) -> str | None:
        """Why the engine thread's step or call in progress is past its limit, or None."""
        busy = self._busy
        if busy is None or time.monotonic() - busy[0] <= busy[1]:
            return None
        return f"rank 0 (pid {os.getpid()}) has been in {busy[2]}"

    def _watch_steps(self) -> None:
        """The driver's own hang: a step of rank 0 past `hang_timeout`, or a call on the engine thread (a
        weight update, a memory resume) past `startup_hang_timeout`, ends the engine, its requests failed
        first, so that the fleet restarts it rather than leaving it alive and unhealthy (ranks 1..N-1 are
        watched by their progress table)."""
        while not self._stopped:
            why = self._overran()
            if why is not None:
                self.engine.ranks.driver_hung(why)
                return
            time.sleep(min(1.0, self.engine.cfg.hang_timeout / 4))

    # --- engine thread ------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while self._running:
                while True:
                    try:
                        job = self._inbox.get_nowait()
                    except queue.Empty:
                        break
                    self._busy = (time.monotonic(), *self._call)
                    job()
                    self._busy = None
                if self._quiet_calls and (self.engine.paused or not self.engine.seqs):
                    self._run_quiet_calls()
                if self.engine.has_work():
                    self._busy = (time.monotonic(), *self._step)
                    outputs = self.engine.step()
                    self._busy = None
                    self._publish(outputs)
                else:
                    self._wake.wait(0.05)
                    self._wake.clear()
        except Exception:
            error = traceback.format_exc()
            log.critical("engine loop failed; failing every request:\n%s", error)
            self._fail_all(error)
            return
        self.abort_all_now()
        self._fail_all("the server is shutting down")  # requests posted but never added, calls never run

    def _run_quiet_calls(self) -> None:
        """The weight updates that waited, then the requests held behind them."""
        calls, self._quiet_calls = self._quiet_calls, []
        for call in calls:
            self._busy = (time.monotonic(), *self._call)
            call()
            self._busy = None
        held, self._held = self._held, {}
        for add in held.values():
            add()

    def _fail_all(self, error: str) -> None:
        """End every stream, and fail every call waiting on the engine thread, with EngineDead; from any
        thread (the watchdog's too), so each stream is taken with one atomic `pop`. The engine takes no
        request after."""
        if self.error is None:
            self.error = error
        dead = EngineDead(error.strip().splitlines()[-1])
        for rid in list(self._streams):
            target = self._streams.pop(rid, None)
            if target is not None:
                target.send(dead)
        for fail in list(self._calls):
            fail(dead)

    def _publish(self, outputs) -> None:
        """Hand a step's outputs to their streams: one cross-thread call per event loop per step, and
        for a request that does not stream, nothing until its final output (no per-token snapshot)."""
        now = time.perf_counter()
        m = self.metrics
        m.set_engine_state(self.snapshot())
        deliveries: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        tokens = 0
        for out in outputs:
            seq: Sequence = out.seq
            tokens += seq.params.max_new_tokens > 0  # a scoring request's output carries no token
            last = self._last_token_time.get(seq.rid)
            if last is None:
                seq.first_token_time = now
                m.ttft.observe(now - seq.arrival_time)
                m.prompt_tokens.inc(seq.num_prompt_tokens)
                m.cached_tokens.inc(seq.num_cached_tokens)
            else:
                m.tpot.observe(now - last)
            self._last_token_time[seq.rid] = now
            if seq.is_finished:
                self._last_token_time.pop(seq.rid, None)
                m.requests.labels(seq.finish_reason["type"]).inc()
                m.e2e.observe(now - seq.arrival_time)
            target = self._streams.get(seq.rid)
            if target is None or not (target.stream or seq.is_finished):
                continue
            deliveries.setdefault(target.loop, []).append((target.queue, self._output(seq, out.new_text, now)))
            if seq.is_finished:
                self._streams.pop(seq.rid, None)
        m.generation_tokens.inc(tokens)
        for loop, items in deliveries.items():
            loop.call_soon_threadsafe(_deliver, items)

    @staticmethod
    def _output(seq: Sequence, delta: str, now: float) -> RequestOutput:
        """A snapshot of `seq`: lists are copied, since the engine thread keeps appending to them."""
        return RequestOutput(seq.rid, seq.completion_ids, seq.output_text, delta, seq.is_finished,
                             seq.finish_reason, seq.num_prompt_tokens, seq.num_cached_tokens,
                             now - seq.arrival_time, list(seq.output_logprobs), list(seq.output_top_logprobs),
                             list(seq.input_logprobs), list(seq.input_top_logprobs), seq.weight_version,
                             seq.routed_experts if seq.is_finished else None)

    def snapshot(self) -> EngineSnapshot:
        """The engine's, with the requests held behind a waiting weight update counted as waiting."""
        snap = self.engine.snapshot()
        return replace(snap, num_waiting_reqs=snap.num_waiting_reqs + len(self._held))

    def loads(self) -> dict:
        """The /v1/loads entry, from `snapshot`."""
        snap = self.snapshot()
        return {"num_running_reqs": snap.num_running_reqs, "num_waiting_reqs": snap.num_waiting_reqs,
                "num_reqs": snap.num_running_reqs + snap.num_waiting_reqs}

    def _post(self, fn: Callable[[], None]) -> None:
        self._inbox.put(fn)
        self._wake.set()

    # --- caller side --------------------------------------------------------------------------

    async def run_on_engine(self, fn: Callable[[], object],
                            update: Literal["quiet", "aborting", "label"] | None = None) -> object:
        """Run `fn` on the engine thread, between steps, and return its result. An `update` runs after every
        update before it: a "quiet" one (new weights) only once no request is in flight or generation is paused,
        requests arriving meanwhile waiting behind it; an "aborting" one (new weights, every request aborted) or
        a "label" (a new name for the weights loaded) at once when no update waits, else in turn, an aborting
        one aborting the requests in flight at once so that the updates before it can run. If the engine dies
        first, the caller gets EngineDead (a 503), not a cut connection."""
        if not self.alive:
            raise EngineDead(self.error or "engine stopped")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def settle(result=None, error: BaseException | None = None) -> None:
            self._calls.discard(fail)
            if not fut.done():
                fut.set_result(result) if error is None else fut.set_exception(error)

        def fail(error: BaseException) -> None:
            loop.call_soon_threadsafe(settle, None, error)

        def job() -> None:
            try:
                result = fn()
            except Exception as e:  # noqa: BLE001 - handed to the caller
                fail(e)
            else:
                loop.call_soon_threadsafe(settle, result)

        def enqueue() -> None:
            if update != "quiet" and not self._quiet_calls:
                job()
                return
            if update == "aborting":
                self.abort_all_now()
            self._quiet_calls.append(job)

        self._calls.add(fail)
        self._post(job if update is None else enqueue)
        return await fut

    def generate(self, prompt_ids: list[int], params: SamplingParams, rid: str | None = None,
                 field: str = "input_ids", options: OutputOptions | None = None,
                 stream: bool = True, probe: bool = False) -> AsyncIterator[RequestOutput]:
        """Validate now (raising InvalidRequest), then return a stream with an output per new token
        (with `stream` False, only the final one); the last has finished=True. A caller that stops
        reading early aborts the request. A `probe` (a health check, its output thrown away) is not held
        behind a waiting weight update."""
        if not self.alive:
            raise EngineDead(self.error or "engine stopped")
        if self._closing:
            raise EngineUnavailable("the server is shutting down")
        reason = self.engine.unavailable_reason()
        if reason is not None:
            raise EngineUnavailable(reason)
        self.engine.validate(prompt_ids, params, field, options)
        rid = rid or uuid.uuid4().hex
        if rid in self._streams:
            raise InvalidRequest("rid", f"request id {rid!r} is already in use")
        target = Stream(asyncio.get_running_loop(), asyncio.Queue(), stream)
        self._streams[rid] = target

        def add(released: bool = False):
            if self._quiet_calls and not (probe or released):
                self._held[rid] = lambda: add(released=True)
                return
            try:
                self.engine.add_request(prompt_ids, params, rid, options)
            except Exception as e:  # noqa: BLE001 - handed to the caller
                self._streams.pop(rid, None)
                target.send(e)

        self._post(add)
        return self._stream(rid, target.queue)

    async def _stream(self, rid: str, q: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        """The request's outputs; those that queued while the reader was busy come as one (`after`), so a
        slow reader never faces a backlog of cumulative copies, growing with the square of the output."""
        finished = False
        try:
            while not finished:
                item = await q.get()
                while not isinstance(item, Exception) and not q.empty():
                    newer = q.get_nowait()
                    item = newer if isinstance(newer, Exception) else newer.after(item)
                if isinstance(item, Exception):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(rid)

    def abort(self, rid: str) -> bool:
        """Abort `rid` or, when no request has that id, the requests a batch or `n` made of it (`<rid>_<i>`, as
        SGLang names them), on the engine thread soon; returns whether any is in flight now (it may still
        finish on its own first). A request's own id, as a hung-up client's stream gives it, costs one lookup."""
        if rid in self._streams or rid in self.engine.seqs:  # single dict lookups: safe across threads
            family = [rid]
        else:
            family = [r for r in [*self._streams, *self.engine.seqs] if _made_of(r, rid)]
        self._post(lambda: [self._abort_now(r) for r in family or [rid]])
        return bool(family)

    def abort_all(self) -> None:
        self._post(self.abort_all_now)

    def abort_all_now(self) -> None:
        """On the engine thread: abort every request, each caller answered with its partial output."""
        for rid in [*self._held, *self.engine.seqs]:
            self._abort_now(rid)

    def close(self) -> None:
        """The server is shutting down: refuse new requests (503) and abort those in flight, whose
        clients get their partial output."""
        self._closing = True
        self.abort_all()

    def _abort_now(self, rid: str) -> None:
        """On the engine thread: free the request, and tell its caller if it is still listening. One held
        behind a weight update is added first, so that its answer has the shape of any aborted request's."""
        held = self._held.pop(rid, None)
        if held is not None:
            held()
        out = self.engine.abort(rid)
        if out is not None:
            self._aborted(out)

    def _aborted(self, out: StepOutput) -> None:
        """On the engine thread: hand an aborted request's caller its partial output as the last one."""
        seq = out.seq
        self._last_token_time.pop(seq.rid, None)
        self.metrics.requests.labels("abort").inc()
        target = self._streams.pop(seq.rid, None)
        if target is not None:
            target.send(self._output(seq, out.new_text, time.perf_counter()))

    async def pause_generation(self, mode: str = "abort") -> None:
        """Stop scheduling (see LLMEngine.pause); returns once no step is in flight."""
        if mode not in PAUSE_MODES:
            raise InvalidRequest("mode", f"must be one of {list(PAUSE_MODES)}, got {mode!r}")

        def pause() -> None:
            self._publish(self.engine.drain())  # the step in flight reaches its streams first
            for out in self.engine.pause(mode):
                self._aborted(out)

        await self.run_on_engine(pause)

    async def continue_generation(self) -> None:
        await self.run_on_engine(self.engine.continue_generation)

    def shutdown(self) -> None:
        """Stop the loop and every rank. Safe to call more than once."""
        if self._stopped:
            return
        self._stopped = True
        self._running = False
        self._wake.set()
        self._thread.join(timeout=30)
        self.engine.shutdown()
