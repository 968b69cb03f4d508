"""The memory saver's tags: what each region holds, and how callers name a selection of them."""

from __future__ import annotations

from collections.abc import Iterable

WEIGHTS = "weights"
KV_CACHE = "kv_cache"
CUDA_GRAPH = "cuda_graph"
TAGS = (WEIGHTS, KV_CACHE, CUDA_GRAPH)


class MemorySaverError(RuntimeError):
    pass


def check_tag(tag: str) -> str:
    if tag not in TAGS:
        raise ValueError(f"unknown memory tag {tag!r}: the tags are {', '.join(TAGS)}")
    return tag


def select_tags(tags: str | Iterable[str] | None) -> tuple[str, ...]:
    """The tags a release or resume acts on, in TAGS order: None means all of them, a string one tag.
    Every name is checked before anything is done, so a typo changes nothing."""
    if tags is None:
        return TAGS
    names = [tags] if isinstance(tags, str) else list(tags)
    for name in names:
        check_tag(name)
    return tuple(t for t in TAGS if t in names)
