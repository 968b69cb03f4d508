"""The attention interface: what a paged-attention kernel gets for one forward pass.

A batch mixes decode tokens and prefill chunks. The runner orders it decodes first, so a kernel can
treat `[:num_decodes]` as one query per sequence and the rest as variable-length chunks.
Key/value for the new tokens are written at `slot_mapping` (slot = block id * block_size + offset);
each sequence then attends to the `context_lens[i]` tokens its `block_tables[i]` points to.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import NamedTuple

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64, device
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32, device; padding entries are 0
    context_lens: torch.Tensor  # [num_seqs] int32, device: tokens in the cache after this step
    query_lens: list[int]  # host: new tokens per sequence
    context_lens_host: list[int]
    num_decodes: int  # the first num_decodes sequences have exactly one query token
    block_size: int
    query_start: torch.Tensor | None = None  # [num_seqs] int32, device: first row of each sequence's queries
    query_lens_dev: torch.Tensor | None = None  # [num_seqs] int32, device


class NewTokens(NamedTuple):
    """What a decode kernel needs to finish a step's qkv projection itself: q and k RMS-normed per head
    (their norms' weights and eps), rotated (positions, the cos and sin tables), k and v stored at their
    slots."""
    positions: torch.Tensor
    slots: torch.Tensor
    q_norm: torch.Tensor
    k_norm: torch.Tensor
    eps: float
    cos: torch.Tensor
    sin: torch.Tensor


@dataclass
class DecodeQKV:
    """A decode batch's qkv projection, [tokens, (heads + 2 * kv_heads) * head_dim], in place of q, k and v,
    for a backend that `finishes_qkv`."""
    qkv: torch.Tensor
    new: NewTokens


class AttentionBackend(ABC):
    finishes_qkv = False  # whether `forward` takes a decode batch's DecodeQKV (its kernel does q/k norm and RoPE)

    def check_head_dim(self, head_dim: int) -> None:
        """Raise ValueError, naming the model's head size, where this backend cannot run it: at start,
        rather than at the first forward."""

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """q: [tokens, heads, head_dim]; k, v: [tokens, kv_heads, head_dim], stored at
        `meta.slot_mapping` first, or None when already there; caches: [num_blocks, block_size,
        kv_heads, head_dim]. Returns [tokens, heads, head_dim],
        written into `out` when given (a graph's fixed buffer, saving a copy). A backend that
        `finishes_qkv` may get a DecodeQKV as q (k, v None) for a batch of decodes only."""


def get_backend(name: str) -> AttentionBackend:
    if name == "torch":
        from tpfleet.attention.torch_ref import TorchReferenceBackend

        return TorchReferenceBackend()
    if name == "triton":
        from tpfleet.attention.triton_backend import TritonBackend

        return TritonBackend()
    raise ValueError(f"unknown attention backend {name!r}; available: 'torch', 'triton'")
