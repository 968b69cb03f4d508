"""`tpfleet bench start`: seconds from launching `tpfleet serve` until it is ready, per start-up phase,
cold (empty JIT and Triton caches in a fresh directory) and warm (the same caches again).

Each phase's seconds run from the phase before it (the first from the launch) to the moment the
server reported it on its phase line. The checkpoint's files are in the OS page cache for the warm
start and maybe for the cold one too: cold here means cold compile caches, not a cold disk.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from tpfleet import env
from tpfleet.bench import report
from tpfleet.config import EngineConfig
from tpfleet.phases import PHASES, READY_PREFIX, ROUTER_READY_PREFIX, after_prefix, parse_phase, phase_seconds


@dataclass
class ServerProcess:
    """A `tpfleet serve` (or router) child: its URL once ready, and the phases it reported."""
    proc: subprocess.Popen
    launched_at: float  # time.time() just before the launch
    url: str | None = None
    ready_line: str | None = None  # `tpfleet serve`'s ready line, for people
    phases: list[tuple[str, float]] = field(default_factory=list)  # (name, time.time() reported)
    phase_info: dict[str, dict] = field(default_factory=dict)  # what each phase line said
    tail: deque = field(default_factory=lambda: deque(maxlen=40))  # its last output lines
    ready: threading.Event = field(default_factory=threading.Event)
    reader: threading.Thread | None = None

    def read_output(self, ready_line: str | None) -> None:
        """Pump the child's output until it ends (so that its pipe never fills): note its phases and
        its URL, from its ready phase or, for a router, `ready_line`."""
        for line in self.proc.stdout:
            self.tail.append(line.rstrip())
            phase = parse_phase(line)
            if phase is not None:
                self.phases.append((phase[0], phase[1].get("t", time.time())))
                self.phase_info[phase[0]] = phase[1]
                if phase[0] == "ready":
                    self.url = phase[1].get("url")
                    self.ready.set()
            elif line.startswith(READY_PREFIX):
                self.ready_line = line.strip()
            elif ready_line is not None and (url := after_prefix(ready_line, line)) is not None:
                self.url = url
                self.ready.set()
        self.ready.set()

    def wait_ready(self, timeout: float) -> str:
        self.ready.wait(timeout)
        if self.url is None:
            self.stop()
            output = "\n".join(self.tail)
            raise RuntimeError(f"{' '.join(self.proc.args[:4])}... did not become ready in {timeout:.0f} s "
                               f"(exit code {self.proc.poll()}); its last output:\n{output}")
        return self.url

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds; its exit code, once
        its output has been read to the end."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        code = self.proc.wait()
        if self.reader is not None:
            self.reader.join(10)
        return code


def launch(cmd: list[str], extra_env: dict[str, str] | None = None, ready_line: str | None = None) -> ServerProcess:
    launched_at = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env={**os.environ, **(extra_env or {})})
    server = ServerProcess(proc, launched_at)
    server.reader = threading.Thread(target=server.read_output, args=(ready_line,), daemon=True)
    server.reader.start()
    return server


def start_serve(cfg: EngineConfig, extra_env: dict[str, str] | None = None, timeout: float = 900.0) -> ServerProcess:
    """`tpfleet serve` with the whole engine config, on a port the kernel picks; returns once ready."""
    cmd = [sys.executable, "-m", "tpfleet.cli", "serve", "--config", json.dumps(cfg.to_dict())]
    server = launch(cmd, extra_env)
    server.wait_ready(timeout)
    return server


def start_router(engine_urls: list[str], timeout: float = 120.0) -> ServerProcess:
    """The router in its own process in front of `engine_urls`, as an RL framework runs it."""
    code = "import sys; from tpfleet.bench.start import serve_router; serve_router(sys.argv[1:])"
    server = launch([sys.executable, "-c", code, *engine_urls], ready_line=ROUTER_READY_PREFIX)
    server.wait_ready(timeout)
    return server


def serve_router(engine_urls: list[str]) -> None:
    """Serve a router over the given engines on a free local port until SIGTERM."""
    import uvicorn

    from tpfleet.fleet.router import create_router_app
    from tpfleet.fleet.workers import WorkerRegistry
    from tpfleet.lifecycle import sigterm_as_interrupt
    from tpfleet.server.launch import bind_socket, url_of

    registry = WorkerRegistry()
    for url in engine_urls:
        registry.add(url, healthy=True)
    sock = bind_socket("127.0.0.1", 0)
    print(f"{ROUTER_READY_PREFIX} {url_of(sock)}", flush=True)
    sigterm_as_interrupt()
    try:
        uvicorn.Server(uvicorn.Config(create_router_app(registry), log_level="warning")).run(sockets=[sock])
    except KeyboardInterrupt:
        pass


def time_start(cfg: EngineConfig, extra_env: dict[str, str], timeout: float) -> dict:
    """One start of `tpfleet serve` to ready: each phase's seconds and the total, then stop it."""
    server = start_serve(cfg, extra_env, timeout)
    exit_code = server.stop()
    seconds = phase_seconds(server.phases, server.launched_at)
    return {"phases": [{"phase": name, "seconds": s} for name, s in seconds],
            "total_s": server.phases[-1][1] - server.launched_at, "exit_code": exit_code,
            "ready_line": server.ready_line}


SERVE_IMPORTS = ("tpfleet.cli", "tpfleet.server.launch", "tpfleet.engine.llm_engine", "tpfleet.server.app", "uvicorn")


def import_seconds(modules: tuple[str, ...] = SERVE_IMPORTS) -> float:
    """Seconds a fresh interpreter takes to import what `tpfleet serve` imports before its engine
    starts (most of the first two phases)."""
    code = ("import time; t = time.perf_counter(); import " + ", ".join(modules) +
            "; print(time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    return float(out.stdout.strip().splitlines()[-1])


def bench_start(cfg: EngineConfig, out_dir: str, timeout: float = 900.0) -> dict:
    with tempfile.TemporaryDirectory(prefix="tpfleet-bench-start-") as caches:
        extra_env = {env.CACHE_DIR: str(Path(caches) / "tpfleet"), env.TRITON_CACHE_DIR: str(Path(caches) / "triton")}
        result = {"config": cfg.to_dict(), "phase_order": list(PHASES), "caches": "fresh temp dir",
                  "cold": time_start(cfg, extra_env, timeout), "warm": time_start(cfg, extra_env, timeout),
                  "serve_imports_s": import_seconds()}
    return report(result, out_dir, f"start_tp{cfg.tp_size}_{cfg.device}", format_start)


def format_start(result: dict) -> str:
    cold, warm = result["cold"], result["warm"]
    lines = [f"`tpfleet serve` start-up, seconds per phase (since the phase before it; the first since the "
             f"launch), device {result['config']['device']}, TP={result['config']['tp_size']}",
             f"{'phase':<20} {'cold s':>8} {'warm s':>8}"]
    warm_by_phase = {p["phase"]: p["seconds"] for p in warm["phases"]}
    for p in cold["phases"]:
        warm_s = warm_by_phase.get(p["phase"])
        lines.append(f"{p['phase']:<20} {p['seconds']:8.2f} {'-' if warm_s is None else f'{warm_s:.2f}':>8}")
    lines.append(f"{'total':<20} {cold['total_s']:8.2f} {warm['total_s']:8.2f}")
    lines.append(f"of which importing the server's modules (a fresh interpreter, measured apart): "
                 f"{result['serve_imports_s']:.2f} s")
    return "\n".join(lines)
