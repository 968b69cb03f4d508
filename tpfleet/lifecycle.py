"""Process lifetime helpers shared by engines, workers and launchers."""

from __future__ import annotations

import ctypes
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send `sig` when the parent dies, even by SIGKILL. Note: "parent" means the
    thread that spawned this process, so spawn from a thread that lives as long as the child should."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, sig)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def sigterm_as_interrupt() -> None:
    """Handle SIGTERM like Ctrl-C, so the same clean shutdown path runs and the exit code is 0."""
    signal.signal(signal.SIGTERM, _interrupt)


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Within: SIGINT and SIGTERM are noted, not raised; on leaving, a noted one is raised as
    KeyboardInterrupt. For heavy imports: an interrupt raised inside a library's import can come out as
    another error (pydantic-core's schema builder reports it as a SchemaError) or abort the interpreter
    (seen inside triton's), where Ctrl-C should stop a starting engine cleanly."""
    noted: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: noted.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if noted:
        raise KeyboardInterrupt
