"""Start an engine and serve it over HTTP until SIGINT or SIGTERM.

The listening socket is bound before the engine starts, on the requested port or on one the kernel
picks (port 0), and handed to uvicorn as is: no probe-then-bind race with other processes.

An exception that ends the engine is written to the exit record its launcher named in
TPFLEET_EXIT_RECORD (tpfleet.exits), with whatever its ranks recorded attached: the launcher learns
why from that record, not from the log.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from typing import TYPE_CHECKING

from tpfleet import exits
from tpfleet.config import EngineConfig
from tpfleet.lifecycle import interrupts_deferred, sigterm_as_interrupt
from tpfleet.phases import READY_PREFIX, phase_seconds, process_start_time, reached_phases, report_phase

if TYPE_CHECKING:
    import uvicorn

    from tpfleet.server.async_engine import AsyncEngine


class CannotListen(OSError):
    """The address to serve on is taken or not this machine's: said in one line, before anything starts."""

    def __str__(self) -> str:
        return self.strerror


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named explicitly: asyncio sets TCP_NODELAY only on sockets it knows are TCP, and without
    # it every response (headers and body sent apart) waits ~40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise CannotListen(e.errno, f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(False)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(cfg: EngineConfig, host: str = "127.0.0.1", port: int = 0, served_model_name: str | None = None,
          log_level: str = "warning", settings: dict | None = None) -> None:
    """`settings`: the HTTP guard's (tpfleet.server.guard.install_guards): keys and request limits."""
    try:
        _serve(cfg, host, port, served_model_name, log_level, settings or {})
    except BaseException as exc:
        exits.record_engine_failure(exc, cfg.tp_size)
        raise


def closing_server(config: uvicorn.Config, aengine: AsyncEngine) -> uvicorn.Server:
    """A uvicorn server that, as it starts to shut down, aborts every request in flight (tpfleet.server.
    async_engine.AsyncEngine.close): its graceful wait then sees each stream end with its abort chunk and
    `[DONE]`, and each plain request answered with its partial output, instead of cutting them at the timeout."""
    import uvicorn

    class ClosingServer(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            aengine.close()
            await super().shutdown(sockets)

    return ClosingServer(config)


def startup_summary() -> str:
    """'started in 12.3s: starting 0.8s, ranks_started 2.1s, ...': each phase's seconds since the one
    before it (the first since the process was created), as the phase lines report them."""
    seconds = phase_seconds(reached_phases(), process_start_time())
    total = sum(s for _, s in seconds)
    return f"started in {total:.1f}s: " + ", ".join(f"{name} {s:.1f}s" for name, s in seconds)


def _serve(cfg: EngineConfig, host: str, port: int, served_model_name: str | None, log_level: str,
           settings: dict) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    report_phase("starting", pid=os.getpid())
    with interrupts_deferred():
        import uvicorn

        from tpfleet.engine.llm_engine import LLMEngine
        from tpfleet.server.app import create_app
        from tpfleet.server.async_engine import AsyncEngine

    sock = bind_socket(host, port)
    engine = LLMEngine(cfg)
    aengine = AsyncEngine(engine)
    try:
        args = {**cfg.to_dict(), **settings, "host": host, "port": sock.getsockname()[1],
                "served_model_name": served_model_name}

        def ready() -> None:
            report_phase("ready", url=url_of(sock))
            print(f"{READY_PREFIX} {url_of(sock)} (model {cfg.model}, tp {cfg.tp_size}, device {cfg.device}, "
                  f"{engine.block_manager.num_blocks * cfg.block_size} KV tokens, {startup_summary()})", flush=True)

        app = create_app(aengine, args, on_ready=ready)
        # uvicorn re-raises SIGTERM once it has shut down gracefully; make that a clean exit, not a kill.
        sigterm_as_interrupt()
        config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5)
        closing_server(config, aengine).run(sockets=[sock])
    finally:
        aengine.shutdown()  # idempotent: normally the app's lifespan already did it
        sys.stdout.flush()
