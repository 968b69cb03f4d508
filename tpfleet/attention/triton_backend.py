"""The GPU attention backend: Triton kernels, graph-safe on the decode path."""

from __future__ import annotations

import torch

from tpfleet.attention.backend import AttentionBackend, AttentionMetadata, DecodeQKV
from tpfleet.kernels.attention import decode_attention, extend_attention, store_kv


class TritonBackend(AttentionBackend):
    finishes_qkv = True

    def check_head_dim(self, head_dim: int) -> None:
        if head_dim < 16 or head_dim & (head_dim - 1):
            raise ValueError(f"the triton attention backend needs a head_dim that is a power of two, 16 or more "
                             f"(its tiles span whole heads); this model's is {head_dim}: use "
                             f"attention_backend='torch' with graph_mode='eager'")

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float,
                out: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(q, DecodeQKV):
            return decode_attention(q.qkv, k_cache, v_cache, meta.block_tables, meta.context_lens, scale, out=out,
                                    new=q.new)
        if k is not None:
            store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        nd = meta.num_decodes
        out = torch.empty_like(q) if out is None else out
        if nd:
            decode_attention(q[:nd], k_cache, v_cache, meta.block_tables[:nd], meta.context_lens[:nd], scale,
                             out=out[:nd])
        if nd < len(meta.query_lens):
            extend_attention(q[nd:], k_cache, v_cache, out[nd:], meta.block_tables[nd:], meta.context_lens[nd:],
                             meta.query_start[nd:], meta.query_lens_dev[nd:], max(meta.query_lens[nd:]), scale)
        return out
