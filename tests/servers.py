"""A `tpfleet serve` process for a test module, as users run it, that must stop cleanly."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tpfleet.demo import start_server


@contextmanager
def serving(model: Path, tp_size: int, *extra_args: str) -> Iterator[str]:
    """The server's URL while the block runs; SIGTERM after, which it must answer with exit code 0."""
    proc, url = start_server(model, tp_size=tp_size, extra_args=list(extra_args))
    try:
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
