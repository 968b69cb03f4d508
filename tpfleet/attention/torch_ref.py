"""Paged attention in plain torch ops: correct on any device, and the oracle for faster kernels."""

from __future__ import annotations

import torch

from tpfleet.attention.backend import AttentionBackend, AttentionMetadata


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    kv_heads, head_dim = k.shape[-2:]
    k_cache.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, v)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """[length, kv_heads, head_dim]: one sequence's keys (or values) in token order."""
    block_size = cache.shape[1]
    n_blocks = -(-length // block_size)
    return cache[block_table[:n_blocks].long()].flatten(0, 1)[:length]


class TorchReferenceBackend(AttentionBackend):
    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float,
                out: torch.Tensor | None = None) -> torch.Tensor:
        if k is not None:
            store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty_like(q) if out is None else out
        nd = meta.num_decodes
        if nd:
            out[:nd] = self._decode(q[:nd], k_cache, v_cache, meta, scale)
        start = nd
        for i in range(nd, len(meta.query_lens)):
            n = meta.query_lens[i]
            out[start:start + n] = self._extend(q[start:start + n], k_cache, v_cache, meta.block_tables[i],
                                                meta.context_lens_host[i], scale)
            start += n
        return out

    @staticmethod
    def _decode(q, k_cache, v_cache, meta, scale):
        """All decode sequences at once, keys padded to the longest context and masked."""
        nd = q.shape[0]
        kv_heads = k_cache.shape[2]
        max_len = max(meta.context_lens_host[:nd])
        n_blocks = -(-max_len // meta.block_size)
        tables = meta.block_tables[:nd, :n_blocks].long()
        keys = k_cache[tables].flatten(1, 2)  # [nd, n_blocks*block_size, kv_heads, d]
        values = v_cache[tables].flatten(1, 2)
        qg = q.view(nd, kv_heads, -1, q.shape[-1]).float()  # [nd, kv_heads, group, d]
        scores = torch.einsum("bhgd,bshd->bhgs", qg, keys.float()) * scale
        pos = torch.arange(keys.shape[1], device=q.device)
        mask = pos[None, :] >= meta.context_lens[:nd, None]
        scores.masked_fill_(mask[:, None, None, :], float("-inf"))
        out = torch.einsum("bhgs,bshd->bhgd", scores.softmax(-1), values.float())
        return out.reshape(nd, -1, q.shape[-1]).to(q.dtype)

    @staticmethod
    def _extend(q, k_cache, v_cache, block_table, context_len, scale):
        """One prefill chunk: its queries are the last len(q) positions of a context_len-token context."""
        n, heads, d = q.shape
        keys = gather_kv(k_cache, block_table, context_len)
        values = gather_kv(v_cache, block_table, context_len)
        kv_heads = keys.shape[1]
        qg = q.view(n, kv_heads, heads // kv_heads, d).float()
        scores = torch.einsum("qhgd,shd->hgqs", qg, keys.float()) * scale
        q_pos = torch.arange(context_len - n, context_len, device=q.device)
        k_pos = torch.arange(context_len, device=q.device)
        scores.masked_fill_(k_pos[None, :] > q_pos[:, None], float("-inf"))
        out = torch.einsum("hgqs,shd->qhgd", scores.softmax(-1), values.float())
        return out.reshape(n, heads, d).to(q.dtype)
