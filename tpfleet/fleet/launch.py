"""`tpfleet launch`: start a fleet with progress per engine, serve its router, tear down on exit."""

from __future__ import annotations

import json

import uvicorn

from tpfleet.fleet.diagnostics import EngineFailure
from tpfleet.fleet.fleet import Fleet, FleetConfig
from tpfleet.fleet.gpu_state import StaleGPUProcesses
from tpfleet.fleet.router import create_router_app
from tpfleet.lifecycle import sigterm_as_interrupt
from tpfleet.server.launch import bind_socket, url_of

ROUTER_READY_PREFIX = "tpfleet router ready:"


def _progress(engine: int, event: str, info: dict) -> None:
    detail = {k: v for k, v in info.items() if k not in ("t", "log")}
    print(f"[engine {engine}] {event} {json.dumps(detail) if detail else ''}".rstrip(), flush=True)


def launch(cfg: FleetConfig, router_host: str = "127.0.0.1", router_port: int = 0) -> int:
    fleet = Fleet(cfg, on_event=_progress)
    sigterm_as_interrupt()
    try:
        try:
            infos = fleet.start()
        except (EngineFailure, StaleGPUProcesses) as e:
            print(f"\nlaunch failed:\n{e}", flush=True)
            return 1
        print(f"\nplacement:\n{fleet.plan.table() if any(e.ranks for e in fleet.plan.engines) else '(cpu engines)'}")
        print(f"\n{'engine':>6}  {'GPUs':<10}  {'URL':<28}  startup s")
        for i in infos:
            print(f"{i.engine:>6}  {i.gpus:<10}  {i.url or '-':<28}  {i.startup_s or 0:9.1f}")
        print(f"logs: {fleet.log_dir}", flush=True)
        sock = bind_socket(router_host, router_port)
        print(f"{ROUTER_READY_PREFIX} {url_of(sock)}", flush=True)
        uvicorn.Server(uvicorn.Config(create_router_app(fleet), log_level="warning")).run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        reports = fleet.stop()
        for r in reports:
            mem = "; ".join(f"{u[:12]} {b / 2**20:.0f}->{a / 2**20:.0f} MiB" for u, (b, a) in r.gpu_memory.items())
            print(f"[engine {r.engine}] stopped in {r.seconds:.1f}s; processes left: {r.leftover or 'none'}"
                  + (f"; GPU memory {mem}" if mem else ""), flush=True)
    return 0
