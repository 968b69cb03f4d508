"""Process lifetime helpers shared by engines, workers and launchers."""

from __future__ import annotations

import ctypes
import signal
import sys

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
