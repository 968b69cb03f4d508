"""The sites of a Qwen3 model's fused all-reduces (tpfleet.kernels.fused_ar), one per exchange of a
batch-1 decode step: the embedding's row, the greedy token, then each layer's o_proj and down
outputs. The model numbers its exchanges with these and names them in errors with `site_name`."""

from __future__ import annotations

EMBEDDING_SITE, GREEDY_SITE = 0, 1


def layer_sites(layer: int) -> tuple[int, int]:
    """The sites of a layer's o_proj and down all-reduces."""
    return 2 * layer + 2, 2 * layer + 3


def site_count(layers: int) -> int:
    return 2 + 2 * layers


def site_name(site: int) -> str:
    named = {EMBEDDING_SITE: "embedding", GREEDY_SITE: "greedy token"}
    return named.get(site) or f"layer {(site - 2) // 2}, {'o_proj' if site % 2 == 0 else 'down'}"
