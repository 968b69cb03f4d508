"""What clients see when an engine fails or stops under them (CPU): an answer, never a cut connection.

A rank's death answers every plain request 503 with a JSON error and ends every stream with an error
event and `data: [DONE]` before the engine exits 70; SIGTERM or Ctrl-C ends every stream with its abort
chunk and `[DONE]`, answers plain requests 200 with their partial output, and exits 0 without a traceback."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tpfleet.engine.rank_group import RANK_DIED_EXIT_CODE
from tpfleet.phases import parse_phase

PROMPT = [1, 2, 3, 4, 5]
LONG = {"max_new_tokens": 3000, "ignore_eos": True, "temperature": 0.0}


class ServeProcess:
    """`tpfleet serve` in a child process, its output kept, its phases read as they come."""

    def __init__(self, model: Path, tp_size: int):
        cmd = [sys.executable, "-m", "tpfleet.cli", "serve", "--model", str(model), "--tp-size", str(tp_size),
               "--device", "cpu", "--kv-cache-tokens", "16384"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.output: list[str] = []
        self.phases: queue.Queue[tuple[str, dict] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line)
            phase = parse_phase(line)
            if phase is not None:
                self.phases.put(phase)
        self.phases.put(None)

    def wait_for(self, name: str, timeout: float = 120) -> dict:
        while True:
            phase = self.phases.get(timeout=timeout)
            assert phase is not None, f"the server exited before {name!r}:\n{self.log}"
            if phase[0] == name:
                return phase[1]

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    @property
    def log(self) -> str:
        return "".join(self.output[-80:])


class Call(threading.Thread):
    """One HTTP request on its own thread: the status and JSON body of a plain one, the `data:` events
    of a stream, or the error that cut its connection."""

    def __init__(self, url: str, path: str, body: dict):
        super().__init__(daemon=True)
        self.url, self.path, self.body = url, path, body
        self.status: int | None = None
        self.json: dict | None = None
        self.events: list[str] = []
        self.failure: Exception | None = None
        self.started_streaming = threading.Event()
        self.start()

    def run(self) -> None:
        try:
            with httpx.Client(base_url=self.url, timeout=60) as client:
                if self.body.get("stream"):
                    with client.stream("POST", self.path, json=self.body) as response:
                        self.status = response.status_code
                        for line in response.iter_lines():
                            if line.startswith("data: "):
                                self.events.append(line[len("data: "):])
                                self.started_streaming.set()
                else:
                    response = client.post(self.path, json=self.body)
                    self.status, self.json = response.status_code, response.json()
        except Exception as exc:  # noqa: BLE001 - what the test asserts on
            self.failure = exc
        finally:
            self.started_streaming.set()

    def last_events(self, count: int) -> list:
        return [event if event == "[DONE]" else json.loads(event) for event in self.events[-count:]]


def start_load(url: str) -> tuple[list[Call], list[Call]]:
    """Two plain and three streamed requests (both APIs), each long enough to be in flight until stopped."""
    plain = [Call(url, "/generate", {"input_ids": PROMPT, "sampling_params": LONG}),
             Call(url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 3000, "ignore_eos": True})]
    streams = [Call(url, "/generate", {"input_ids": PROMPT, "sampling_params": LONG, "stream": True}),
               Call(url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 3000, "ignore_eos": True,
                                             "stream": True}),
               Call(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                  "max_tokens": 3000, "ignore_eos": True, "stream": True})]
    for call in streams:
        assert call.started_streaming.wait(60) and call.failure is None, call.failure
    time.sleep(0.3)  # the plain requests, sent first, are decoding by now too
    return plain, streams


def finish(calls: list[Call]) -> None:
    for call in calls:
        call.join(60)
        assert not call.is_alive(), f"{call.path} got no answer"
        assert call.failure is None, f"{call.path}: {call.failure!r}"


def test_a_dead_rank_answers_every_request_before_the_engine_exits(tiny_model):
    server = ServeProcess(tiny_model, tp_size=2)
    try:
        rank_pids = server.wait_for("ranks_started")["pids"]
        url = server.wait_for("ready")["url"]
        plain, streams = start_load(url)
        os.kill(rank_pids[1], signal.SIGKILL)
        finish(plain + streams)
        try:
            health = httpx.get(f"{url}/health", timeout=5).status_code
        except httpx.TransportError:
            health = None  # the grace is over and the engine has exited
        assert health in (503, None), health
        for call in plain:
            assert call.status == 503, (call.path, call.json)
            assert "engine unavailable" in call.json["message"] and call.json["error"]["code"] == 503
        for call in streams:
            error, done = call.last_events(2)
            assert done == "[DONE]" and error["error"]["code"] == 503, (call.path, call.events[-3:])
        assert server.wait() == RANK_DIED_EXIT_CODE, server.log
    finally:
        server.stop()


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_ends_streams_with_their_abort_chunk_and_exits_cleanly(tiny_model, stop_signal):
    server = ServeProcess(tiny_model, tp_size=1)
    try:
        url = server.wait_for("ready")["url"]
        plain, streams = start_load(url)
        server.proc.send_signal(stop_signal)
        finish(plain + streams)
        generate, completion = plain
        assert generate.status == 200 and generate.json["meta_info"]["finish_reason"]["type"] == "abort"
        assert 0 < generate.json["meta_info"]["completion_tokens"] < 3000
        assert completion.status == 200 and completion.json["choices"][0]["finish_reason"] == "abort"
        chunk, done = streams[0].last_events(2)
        assert done == "[DONE]" and chunk["meta_info"]["finish_reason"]["type"] == "abort", streams[0].events[-3:]
        for call in streams[1:]:
            chunk, done = call.last_events(2)
            assert done == "[DONE]" and chunk["choices"][0]["finish_reason"] == "abort", (call.path, call.events[-3:])
        assert server.wait() == 0, server.log
        assert "Traceback" not in server.log, server.log
    finally:
        server.stop()


def test_a_fleet_loses_no_request_when_one_engine_is_killed(tiny_model, tmp_path):
    """Two TP=1 engines behind the router; engine 0 SIGKILLed under load. Plain requests get nothing back
    before they finish, so the router can retry a cut one on engine 1: every one answers 200 in full. A
    stream already under way on engine 0 ends with an error event and `[DONE]`."""
    import uvicorn

    from tpfleet.fleet import Fleet, FleetConfig
    from tpfleet.fleet.router import create_router_app
    from tpfleet.server.launch import bind_socket, url_of

    cfg = FleetConfig(model=str(tiny_model), log_dir=str(tmp_path / "logs"), engine={"kv_cache_tokens": 16384},
                      engines=2, max_concurrent_starts=2, restart_budget=0)
    fleet = Fleet(cfg)
    fleet.start()
    sock = bind_socket("127.0.0.1", 0)
    router = uvicorn.Server(uvicorn.Config(create_router_app(fleet), log_level="warning"))
    threading.Thread(target=router.run, kwargs={"sockets": [sock]}, daemon=True).start()
    try:
        deadline = time.monotonic() + 10
        while not router.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert router.started
        url = url_of(sock)
        sampling = {"max_new_tokens": 300, "ignore_eos": True, "temperature": 0.0}
        plain = [Call(url, "/generate", {"input_ids": PROMPT, "sampling_params": sampling}) for _ in range(8)]
        # Streams long enough to be still running on engine 0 when it is killed, once all four have begun
        long = {**sampling, "max_new_tokens": 1500}
        streams = [Call(url, "/generate", {"input_ids": PROMPT, "sampling_params": long, "stream": True})
                   for _ in range(4)]
        for call in streams:
            assert call.started_streaming.wait(60) and call.failure is None, call.failure
        os.kill(fleet.engines[0].proc.pid, signal.SIGKILL)
        finish(plain + streams)
        for call in plain:
            assert call.status == 200, call.json
            assert call.json["meta_info"]["completion_tokens"] == 300
        for call in streams:
            last, done = call.last_events(2)
            assert done == "[DONE]", call.events[-3:]
            assert "error" in last or last["meta_info"]["finish_reason"]["type"] == "length", last
        cut = sum("error" in call.last_events(2)[0] for call in streams)
        assert cut > 0, "engine 0 was killed with no stream on it: the test did not test"
    finally:
        router.should_exit = True
        fleet.stop()
