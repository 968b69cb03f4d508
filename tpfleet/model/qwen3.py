"""Qwen3 dense: GQA attention with per-head RMSNorm on q and k, RoPE, and a SwiGLU MLP."""

from __future__ import annotations

import torch
from torch import nn

from tpfleet.attention.backend import AttentionBackend, AttentionMetadata, DecodeQKV, NewTokens
from tpfleet.comm.group import TPGroup
from tpfleet.kernels.fused_ar import Exchange
from tpfleet.model.ar_sites import EMBEDDING_SITE, GREEDY_SITE, layer_sites, site_count, site_name
from tpfleet.model.config import ModelConfig
from tpfleet.model.layers import (
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
    divide,
    gemv,
    greedy,
    ops,
)


class Qwen3Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup, backend: AttentionBackend):
        super().__init__()
        d = cfg.head_dim
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, d, cfg.num_attention_heads, cfg.num_key_value_heads,
                                          tp, cfg.attention_bias)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim = d
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * d, cfg.hidden_size, tp, cfg.attention_bias)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(d, cfg.max_position_embeddings, cfg.rope_theta)
        self.backend = backend
        self.scale = d ** -0.5
        self.k_cache = self.v_cache = torch.empty(0)  # bound by the model runner once the KV pool exists

    def split_qkv(self, positions: torch.Tensor, qkv: torch.Tensor, meta: AttentionMetadata | None = None):
        """q, k, v for the new tokens from their qkv projection: [tokens, heads, head_dim], q and k
        normed per head and rotated. On GPU, given `meta`, k and v go straight into the KV cache
        and come back as None; for a batch of decodes only, the attention kernel does all of it, and
        q is the projection itself (a DecodeQKV)."""
        if qkv.is_cuda and meta is not None and self.backend.finishes_qkv and meta.num_decodes == qkv.shape[0]:
            new = NewTokens(positions, meta.slot_mapping, self.q_norm.weight, self.k_norm.weight, self.q_norm.eps,
                            self.rotary.cos, self.rotary.sin)
            return DecodeQKV(qkv, new), None, None
        if qkv.is_cuda:  # one fused kernel; the torch code below is its reference
            kv_cache = (self.k_cache, self.v_cache, meta.slot_mapping) if meta is not None else None
            return ops.qk_norm_rope(qkv, positions, self.q_norm.weight, self.k_norm.weight, self.q_norm.eps,
                                    self.rotary.cos, self.rotary.sin, self.num_heads, self.num_kv_heads,
                                    self.head_dim, kv_cache)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = self.q_norm(q.reshape(-1, self.num_heads, self.head_dim))
        k = self.k_norm(k.reshape(-1, self.num_kv_heads, self.head_dim))
        q, k = self.rotary(positions, q, k)
        return q, k, v.reshape(-1, self.num_kv_heads, self.head_dim)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
               out: torch.Tensor | None = None) -> torch.Tensor:
        return self.backend.forward(q, k, v, self.k_cache, self.v_cache, meta, self.scale, out)


class Qwen3MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [cfg.intermediate_size] * 2, tp)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, tp)

    def forward_normed(self, norm: RMSNorm, x: torch.Tensor, residual: torch.Tensor,
                       fused: Exchange | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The MLP over norm(x + residual), and the new residual. SiLU-and-mul rides in a projection's
        kernel: for one row on a GPU the down GEMV's prologue (the norm being gate_up's); for more, the
        gate_up skinny GEMM's epilogue where its table chose it, else a kernel after cuBLAS."""
        if self.gate_up_proj.one_gemv(x):
            gate_up, residual = self.gate_up_proj.forward_normed(norm, x, residual)
            return self.down_proj(gate_up, silu_mul=True, fused=fused), residual
        h, residual = norm(x, residual)
        return self.down_proj(self.gate_up_proj(h, silu_mul=True), fused=fused), residual


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup, backend: AttentionBackend, mlp: nn.Module | None = None):
        """`mlp`: another feed-forward block in place of the dense one (Qwen3-MoE's experts)."""
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Qwen3Attention(cfg, tp, backend)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = mlp if mlp is not None else Qwen3MLP(cfg, tp)

    # A layer is pre -> attention -> post. Piecewise CUDA graphs capture post(i-1)+pre(i) as one
    # segment and run attention, whose shapes vary with the batch, eagerly in between. Each norm
    # goes with the projection after it, which fuses the two for batch-1 decode on GPU.

    def pre(self, positions, x: torch.Tensor, residual, meta: AttentionMetadata | None = None):
        """Given `meta` (not in piecewise graphs, whose slots change every step), k and v are
        stored in the KV cache here, by the same kernel that norms and rotates them."""
        qkv, residual = self.self_attn.qkv_proj.forward_normed(self.input_layernorm, x, residual)
        q, k, v = self.self_attn.split_qkv(positions, qkv, meta)
        return q, k, v, residual

    def post(self, o, residual, fused: Exchange | None = None):
        """With `fused`, o_proj and down all-reduce their outputs in their own kernels."""
        x = self.self_attn.o_proj(o.flatten(1), fused=fused)
        return self.mlp.forward_normed(self.post_attention_layernorm, x, residual, fused)


class Qwen3ForCausalLM(nn.Module):
    # checkpoint name -> (our merged parameter, shard id)
    packed_modules = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg: ModelConfig, tp: TPGroup, backend: AttentionBackend):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.layers = nn.ModuleList(self.decoder_layer(cfg, tp, backend, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.embed_tokens.site, self.lm_head.site = EMBEDDING_SITE, GREEDY_SITE
        for i, layer in enumerate(self.layers):
            layer.self_attn.o_proj.site, layer.mlp.down_proj.site = layer_sites(i)
        self.fused = tp.fused_all_reduce(site_count(len(self.layers)), cfg.hidden_size, torch.get_default_dtype(),
                                         self._fusable(), site_name)

    def decoder_layer(self, cfg: ModelConfig, tp: TPGroup, backend: AttentionBackend, index: int) -> nn.Module:
        """Layer `index`; a model whose layers differ (Qwen3-MoE) overrides this."""
        return Qwen3DecoderLayer(cfg, tp, backend)

    def _fusable(self) -> bool:
        """Whether every batch-1 all-reduce can be fused: bias-free projections the GEMV kernel takes."""
        layer = self.layers[0]
        projections = (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)
        return gemv is not None and all(p.bias is None and gemv.supports_shape(p.weight) for p in projections)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Final hidden states for every token; `compute_logits` picks the rows that are sampled.
        Batch-1 decode on GPUs fuses the all-reduces into the GEMVs (tpfleet.kernels.fused_ar)."""
        fused = self.fused.exchange if self.fuses(input_ids.shape[0]) else None
        if fused is not None:
            fused.begin_step()
        x, residual = self.embed_tokens(input_ids, fused), None
        for layer in self.layers:
            q, k, v, residual = layer.pre(positions, x, residual, meta)
            x, residual = layer.post(layer.self_attn.attend(q, k, v, meta), residual, fused)
        x, _ = self.norm(x, residual)
        return x

    def fuses(self, num_tokens: int) -> bool:
        """Whether a forward over this many tokens fuses its all-reduces: batch-1 decode at TP > 1 on GPU."""
        return self.fused is not None and num_tokens == 1

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        return self.lm_head(hidden)

    def picks_greedy(self, num_tokens: int) -> bool:
        """Whether `greedy_token` can pick the token after a forward over this many tokens: one row on a
        GPU, whose ranks (if several) exchange through the fused all-reduce's slots."""
        if num_tokens != 1 or greedy is None or not self.lm_head.weight.is_cuda:
            return False
        return self.lm_head.tp.world_size == 1 or self.fuses(num_tokens)

    def greedy_token(self, hidden: torch.Tensor) -> torch.Tensor:
        """The greedy token of that forward's one row, on every rank, without gathering logits."""
        return self.lm_head.greedy(hidden, self.fused.exchange if self.fused is not None else None)
