"""`tpfleet demo`: the whole path on a laptop. Build the tiny model, serve it with TP=2 on CPU as a
separate process, send a few kinds of request, print replies and timings, then stop the server
and check that no process of it is left. Then what tpfleet is for: a few steps of RL (GRPO) with a
trainer pushing its weights into a fleet of two engines behind the router (tpfleet.rl_loop)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil

from tpfleet.model.make_model import make_model
from tpfleet.phases import parse_phase

RL_ENGINES = 2
RL_STEPS = 5  # the toy reward starts to climb at the fourth step


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def stream(url: str, body: dict):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        for line in r:
            line = line.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                yield json.loads(line[6:])


def process_family(pid: int) -> list[int]:
    return [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait for every process to exit (zombies count as gone); returns those still running."""
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    _, running = psutil.wait_procs(procs, timeout=timeout)
    return [p.pid for p in running if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def start_server(model: Path, tp_size: int, device: str = "cpu",
                 extra_args: list[str] = ()) -> tuple[subprocess.Popen, str]:
    """`tpfleet serve` in a child process; returns it and its URL once it reports its ready phase."""
    cmd = [sys.executable, "-m", "tpfleet.cli", "serve", "--model", str(model), "--tp-size", str(tp_size),
           "--device", device, *extra_args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    found: list[str] = []
    ready = threading.Event()

    def pump():
        for line in proc.stdout:
            phase = parse_phase(line)
            if phase is not None and phase[0] == "ready":
                found.append(phase[1]["url"])
                ready.set()
            print(f"  [server] {line.rstrip()}")
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    ready.wait(timeout=180)
    if not found:
        proc.kill()
        raise RuntimeError(f"server did not become ready (exit code {proc.poll()}); its output is above")
    return proc, found[0]


def run_demo(tp_size: int = 2, workdir: str | None = None) -> int:
    if workdir is not None:
        return _run_demo(tp_size, Path(workdir))
    with tempfile.TemporaryDirectory(prefix="tpfleet-demo-") as root:  # removed when the demo ends
        return _run_demo(tp_size, Path(root))


def _run_demo(tp_size: int, root: Path) -> int:
    t = time.perf_counter()
    model = make_model("tiny", root / "tiny")
    print(f"built the tiny Qwen3 checkpoint in {root / 'tiny'} ({time.perf_counter() - t:.1f}s)")

    t = time.perf_counter()
    proc, url = start_server(model, tp_size)
    print(f"server up at {url} with TP={tp_size} on CPU ({time.perf_counter() - t:.1f}s including process start)\n")
    family = process_family(proc.pid)
    try:
        _requests(url)
    finally:
        t = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        left = wait_gone(family, timeout=5)
        print(f"\nserver stopped with exit code {code} in {time.perf_counter() - t:.1f}s; "
              f"{len(family)} processes started, {len(left)} left{': ' + str(left) if left else ''}")
    rl_left = _rl_steps(model, tp_size)
    return 1 if left or rl_left else 0


def _rl_steps(model: Path, tp_size: int) -> list[str]:
    """RL against a fleet; returns the engine processes it left behind."""
    from transformers.utils import logging as hf_logging

    from tpfleet.rl_loop import RLConfig, train

    print(f"\nRL: a transformers trainer on the same checkpoint, {RL_ENGINES} engines of TP={tp_size} behind the "
          f"router, {RL_STEPS} GRPO steps; before each rollout the trainer pushes its weights into every engine")
    t = time.perf_counter()
    hf_logging.disable_progress_bar()
    result = train(RLConfig(model=str(model), engines=RL_ENGINES, tp_size=tp_size, steps=RL_STEPS),
                   log=lambda line: print(f"  {line}", flush=True))
    left = result["processes_left"]
    print(f"RL: reward {result['rewards'][0]:.3f} -> {result['rewards'][-1]:.3f} in {RL_STEPS} steps; largest "
          f"logprob mismatch {max(result['mismatch_max']):.1e} (float32); fleet stopped, {len(left)} processes "
          f"left{': ' + str(left) if left else ''} ({time.perf_counter() - t:.1f}s in all)")
    return left


def _requests(url: str) -> None:
    t = time.perf_counter()
    r = post(f"{url}/generate", {"text": "Once upon a time", "sampling_params": {"max_new_tokens": 32,
                                                                                   "temperature": 0}})
    dt = time.perf_counter() - t
    n = r["meta_info"]["completion_tokens"]
    print(f"greedy /generate: {r['text']!r}\n  {n} tokens in {dt * 1000:.0f} ms ({n / dt:.0f} tokens/s)")

    prompts = ["The river flows", "Hello, world!", "def add(a, b):", "Red, orange, yellow"]
    t = time.perf_counter()
    rs = post(f"{url}/generate", {"text": prompts, "sampling_params": {"max_new_tokens": 24, "temperature": 0.8,
                                                                        "top_p": 0.95, "seed": 7}})
    dt = time.perf_counter() - t
    total = sum(x["meta_info"]["completion_tokens"] for x in rs)
    print(f"batched /generate, {len(prompts)} prompts sampled with seed 7: {total} tokens in {dt * 1000:.0f} ms "
          f"({total / dt:.0f} tokens/s)")
    for p, x in zip(prompts, rs):
        print(f"  {p!r} -> {x['text']!r}")

    t = time.perf_counter()
    ttft = None
    pieces = 0
    for chunk in stream(f"{url}/generate", {"text": "A graph captures", "stream": True,
                                            "sampling_params": {"max_new_tokens": 24, "temperature": 0}}):
        ttft = ttft or time.perf_counter() - t
        pieces += 1
        text = chunk["text"]
    print(f"streamed /generate: {pieces} chunks, first after {ttft * 1000:.0f} ms, "
          f"total {(time.perf_counter() - t) * 1000:.0f} ms: {text!r}")

    long_prompt = " ".join(["The scheduler admits waiting requests while there is room in the cache."] * 8)
    first = post(f"{url}/generate", {"text": long_prompt, "sampling_params": {"max_new_tokens": 4}})
    again = post(f"{url}/generate", {"text": long_prompt, "sampling_params": {"max_new_tokens": 4}})
    print(f"prefix cache: the same {first['meta_info']['prompt_tokens']}-token prompt twice: "
          f"{first['meta_info']['cached_tokens']} then {again['meta_info']['cached_tokens']} tokens served from "
          f"cache ({first['meta_info']['e2e_latency'] * 1000:.0f} ms, "
          f"then {again['meta_info']['e2e_latency'] * 1000:.0f} ms)")

    t = time.perf_counter()
    c = post(f"{url}/v1/chat/completions", {"messages": [{"role": "user", "content": "Write a short poem."}],
                                            "max_tokens": 24, "temperature": 0})
    print(f"/v1/chat/completions: {c['choices'][0]['message']['content']!r} "
          f"({c['usage']['completion_tokens']} tokens, {(time.perf_counter() - t) * 1000:.0f} ms)")
    print("(the weights are random, so the words are too: the demo shows the machinery, not a language model)")
