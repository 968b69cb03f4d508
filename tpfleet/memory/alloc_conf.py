"""Expandable segments switched off while the memory saver's pools allocate.

PyTorch's caching allocator refuses to grow a MemPool that has its own allocator while expandable
segments are on ("MemPool doesn't currently support expandable_segments"). The setting is read at
every new segment, so the saver turns it off around its own allocations and puts the process's
settings back afterwards: everything allocated outside the saver keeps expandable segments.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_KEY = "expandable_segments"


def current_settings() -> str:
    """The allocator settings in force: PyTorch's record of the last ones parsed, or (for a PyTorch
    without that record) the environment it read them from."""
    getter = getattr(torch._C, "_accelerator_getAllocatorSettings", None)
    if getter is not None:
        return getter()
    return os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")


def apply_settings(settings: str) -> None:
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    if setter is None:
        setter = torch.cuda.memory._set_allocator_settings
    setter(settings)


def expandable(settings: str) -> bool:
    """Whether `settings` turns expandable segments on (the last mention wins, as in PyTorch's parser)."""
    value = "False"
    for token in settings.split(","):
        key, _, v = token.partition(":")
        if key.strip() == _KEY:
            value = v.strip()
    return value == "True"


def without_expandable(settings: str) -> str:
    """`settings` with expandable segments off and every other option as it was. Options are passed
    back whole because some PyTorch versions reset unnamed options to their defaults on every parse."""
    tokens = [f"{_KEY}:False" if t.partition(":")[0].strip() == _KEY else t for t in settings.split(",")]
    return ",".join(tokens)


@contextmanager
def expandable_segments_off() -> Iterator[None]:
    settings = current_settings()
    if not expandable(settings):
        yield
        return
    apply_settings(without_expandable(settings))
    try:
        yield
    finally:
        apply_settings(settings)
