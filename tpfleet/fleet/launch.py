"""`tpfleet launch`: start a fleet with progress per engine, serve its router, tear down on exit; and
`tpfleet router`: a router with no fleet, whose engines register over HTTP."""

from __future__ import annotations

import json

import uvicorn

from tpfleet.fleet.diagnostics import EngineFailure
from tpfleet.fleet.fleet import Fleet, FleetConfig
from tpfleet.fleet.gpu_state import StaleGPUProcesses
from tpfleet.fleet.router import RouterConfig, create_router_app
from tpfleet.fleet.workers import WorkerRegistry
from tpfleet.lifecycle import sigterm_as_interrupt
from tpfleet.phases import ROUTER_READY_PREFIX
from tpfleet.server.launch import bind_socket, url_of


def _progress(engine: int, event: str, info: dict) -> None:
    detail = {k: v for k, v in info.items() if k not in ("t", "log")}
    print(f"[engine {engine}] {event} {json.dumps(detail) if detail else ''}".rstrip(), flush=True)


def launch(cfg: FleetConfig, router_host: str = "127.0.0.1", router_port: int = 0,
           router_config: RouterConfig | None = None) -> int:
    sock = bind_socket(router_host, router_port)  # a taken port fails here, before any engine starts
    fleet = Fleet(cfg, on_event=_progress)
    sigterm_as_interrupt()
    try:
        try:
            infos = fleet.start()
        except (EngineFailure, StaleGPUProcesses) as error:
            print(f"\nlaunch failed:\n{error}", flush=True)
            return 1
        print(f"\nplacement:\n{fleet.plan.table() if any(e.ranks for e in fleet.plan.engines) else '(cpu engines)'}")
        print(f"\n{'engine':>6}  {'GPUs':<10}  {'URL':<28}  startup s")
        for info in infos:
            print(f"{info.engine:>6}  {info.gpus:<10}  {info.url or '-':<28}  {info.startup_s or 0:9.1f}")
        print(f"logs: {fleet.log_dir}", flush=True)
        print(f"{ROUTER_READY_PREFIX} {url_of(sock)}", flush=True)
        uvicorn.Server(uvicorn.Config(create_router_app(fleet, router_config), log_level="warning")).run(
            sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        reports = fleet.stop()
        for report in reports:
            memory = "; ".join(f"{gpu_uuid[:12]} {before / 2**20:.0f}->{after / 2**20:.0f} MiB"
                               for gpu_uuid, (before, after) in report.gpu_memory.items())
            print(f"[engine {report.engine}] stopped in {report.seconds:.1f}s; processes left: "
                  f"{report.leftover or 'none'}" + (f"; GPU memory {memory}" if memory else ""), flush=True)
    return 0


def serve_router(worker_urls: list[str], host: str = "127.0.0.1", port: int = 0,
                 config: RouterConfig | None = None) -> int:
    """Serve a router in front of `worker_urls` and whatever registers later, until SIGINT or SIGTERM."""
    registry = WorkerRegistry()
    for url in worker_urls:
        registry.add(url)
    sock = bind_socket(host, port)
    print(f"{ROUTER_READY_PREFIX} {url_of(sock)}", flush=True)
    sigterm_as_interrupt()
    try:
        uvicorn.Server(uvicorn.Config(create_router_app(registry, config), log_level="warning")).run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    return 0
