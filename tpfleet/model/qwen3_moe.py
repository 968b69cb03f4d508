"""Qwen3-MoE: Qwen3's attention and decoder layers, with a sparse mixture-of-experts block in place of
the dense MLP in every layer that transformers' rule makes sparse (`ModelConfig.is_moe_layer`).

Parallelism. Every rank routes every token (the router is replicated), computes its own experts'
share of each token's output, and one all-reduce sums the shares, as after the dense down projection:
- ep_size 1 (tensor parallel): a rank holds a slice of every expert's intermediate dimension;
- ep_size == tp_size (expert parallel): a rank holds whole experts, a contiguous range of them, and
  contributes zeros for tokens routed elsewhere.

Routing replay: each forward writes every token's top-k experts of every layer into a buffer the model
owns (-1 for dense layers), in place, so a CUDA graph replays the writes; `routed_experts` views the
rows of the last forward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from tpfleet.attention.backend import AttentionBackend, AttentionMetadata
from tpfleet.comm.group import TPGroup
from tpfleet.kernels.moe import moe_reference, route
from tpfleet.model.config import ModelConfig
from tpfleet.model.layers import RMSNorm, _param, divide, gemv
from tpfleet.model.qwen3 import Qwen3DecoderLayer, Qwen3ForCausalLM

try:  # the fused GPU path; CPU-only installs may lack Triton and use the reference
    from tpfleet.kernels import moe_triton
    from tpfleet.kernels.moe_route import fused_route, routing_for
except ImportError:
    moe_triton = fused_route = routing_for = None

if TYPE_CHECKING:
    from tpfleet.kernels.fused_ar import Exchange


class Router(nn.Module):
    """`mlp.gate`: one logit per expert, the same full weight on every rank."""

    def __init__(self, num_experts: int, hidden: int):
        super().__init__()
        self.weight = _param(num_experts, hidden, loader=lambda param, loaded: param.data.copy_(loaded))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class StackedExperts(nn.Module):
    """This rank's share of the experts as two stacked parameters, named as transformers 5 stores them:
    gate_up_proj [experts, 2 * inter, hidden] (gate rows, then up rows) and down_proj [experts, hidden,
    inter]. Checkpoints give them whole (transformers 5) or one expert's projection at a time (the
    published layout); each loader keeps this rank's experts and intermediate slice."""

    def __init__(self, num_experts: int, hidden: int, inter: int, tp: TPGroup, expert_parallel: bool):
        super().__init__()
        self.tp = tp
        self.site = 0  # its all-reduce's site, numbered like a dense down_proj's (MoE models do not fuse it)
        if expert_parallel:
            self.num_local = divide(num_experts, tp.world_size, "num_experts")
            self.first_expert = tp.rank * self.num_local
            self.inter, self.inter_start = inter, 0
        else:
            self.num_local, self.first_expert = num_experts, 0
            self.inter = divide(inter, tp.world_size, "moe_intermediate_size")
            self.inter_start = tp.rank * self.inter
        self.gate_up_proj = _param(self.num_local, 2 * self.inter, hidden, loader=self.load_gate_up)
        self.down_proj = _param(self.num_local, hidden, self.inter, loader=self.load_down)
        mine = range(self.first_expert, self.first_expert + self.num_local)
        self.gate_up_proj.shard_ids = [(expert, part) for expert in mine for part in (0, 1)]
        self.down_proj.shard_ids = [(expert, None) for expert in mine]

    def _local(self, expert: int) -> int | None:
        local = expert - self.first_expert
        return local if 0 <= local < self.num_local else None

    def load_gate_up(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: tuple | None = None) -> None:
        """Whole: [experts, 2 * inter, hidden]. Shard (expert, 0 or 1): that expert's gate or up [inter, hidden]."""
        if shard_id is None:
            full_inter = loaded.shape[1] // 2
            mine = loaded.narrow(0, self.first_expert, self.num_local)
            for part in (0, 1):
                param.data.narrow(1, part * self.inter, self.inter).copy_(
                    mine.narrow(1, part * full_inter + self.inter_start, self.inter))
            return
        expert, part = shard_id
        local = self._local(expert)
        if local is not None:
            param.data[local].narrow(0, part * self.inter, self.inter).copy_(
                loaded.narrow(0, self.inter_start, self.inter))

    def load_down(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: tuple | None = None) -> None:
        """Whole: [experts, hidden, inter]. Shard (expert, None): that expert's down [hidden, inter]."""
        if shard_id is None:
            mine = loaded.narrow(0, self.first_expert, self.num_local)
            param.data.copy_(mine.narrow(2, self.inter_start, self.inter))
            return
        local = self._local(shard_id[0])
        if local is not None:
            param.data[local].copy_(loaded.narrow(1, self.inter_start, self.inter))

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        if moe_triton is not None and moe_triton.supports(x, self.gate_up_proj, self.down_proj):
            out = moe_triton.fused_moe(x, self.gate_up_proj, self.down_proj, topk_ids, topk_weights,
                                       self.first_expert)
        else:  # the CPU path, and the oracle the fused kernel is tested against
            out = moe_reference(x, self.gate_up_proj, self.down_proj, topk_ids, topk_weights, self.first_expert)
        return self.tp.all_reduce(out)


class Qwen3MoeSparseBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup, expert_parallel: bool):
        super().__init__()
        self.top_k, self.renormalize = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = Router(cfg.num_experts, cfg.hidden_size)
        self.experts = StackedExperts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, tp,
                                      expert_parallel)
        # This layer's column of the model's routing-replay buffer, [rows, top_k]: bound by the model
        self.routed = torch.empty(0, self.top_k, dtype=torch.int32)

    @property
    def down_proj(self) -> StackedExperts:
        """The experts end the block with its all-reduce, as the dense MLP's down_proj does: under this
        name the model numbers both kinds of layer's all-reduce site alike."""
        return self.experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.experts_of(x, self.gate(x))

    def forward_normed(self, norm: RMSNorm, x: torch.Tensor,
                       residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The block over norm(x + residual), and the new residual. One row on a GPU (batch-1 decode)
        takes one kernel for the norm, the router and the choice of experts: the router's GEMV with the
        norm as its prologue and the top-k as its epilogue, writing the normed row for the experts too."""
        if gemv is not None and gemv.supports(x, self.gate.weight):
            h = torch.empty_like(x)
            r = routing_for(1, self.gate.weight.shape[0], self.top_k, self.renormalize, x.device, self.routed[:1])
            _, residual = gemv.norm_linear(x, residual, norm.weight, norm.eps, self.gate.weight, normed_out=h,
                                           routing=r)
            return self.experts(h, r.ids, r.weights), residual
        h, residual = norm(x, residual)
        return self(h), residual

    def experts_of(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """The experts' output for x given its router logits; records the choice for routing replay."""
        replay = self.routed[: x.shape[0]]
        if fused_route is not None and router_logits.is_cuda:
            weights, ids = fused_route(router_logits, self.top_k, self.renormalize, replay)
        else:
            weights, ids = route(router_logits, self.top_k, self.renormalize)
            replay.copy_(ids)
        return self.experts(x, ids, weights)


class Qwen3MoeDecoderLayer(Qwen3DecoderLayer):
    def __init__(self, cfg: ModelConfig, tp: TPGroup, backend: AttentionBackend, expert_parallel: bool):
        super().__init__(cfg, tp, backend, mlp=Qwen3MoeSparseBlock(cfg, tp, expert_parallel))

    def post(self, o: torch.Tensor, residual: torch.Tensor, fused: Exchange | None = None):
        x = self.self_attn.o_proj(o.flatten(1), fused=fused)
        return self.mlp.forward_normed(self.post_attention_layernorm, x, residual)


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    # checkpoint name of one expert's projection, model.layers.{l}.mlp.experts.{e}.{name}.weight ->
    # (our stacked parameter, part): its shard id is (e, part) (tpfleet.model.loader)
    expert_modules = {
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
        "down_proj": ("down_proj", None),
    }

    def __init__(self, cfg: ModelConfig, tp: TPGroup, backend: AttentionBackend, ep_size: int = 1,
                 max_num_tokens: int = 8192):
        """`max_num_tokens`: the most tokens one forward takes (the engine's token budget), the rows of
        the routing-replay buffer."""
        self.expert_parallel = ep_size > 1  # read by decoder_layer, which the base constructor calls
        super().__init__(cfg, tp, backend)
        shape = (max_num_tokens, cfg.num_hidden_layers, cfg.num_experts_per_tok)
        self.routed_experts_buffer = torch.full(shape, -1, dtype=torch.int32)
        for i, layer in enumerate(self.layers):
            if cfg.is_moe_layer(i):
                layer.mlp.routed = self.routed_experts_buffer[:, i]
        self.num_routed_tokens = 0

    def decoder_layer(self, cfg: ModelConfig, tp: TPGroup, backend: AttentionBackend, index: int) -> nn.Module:
        if cfg.is_moe_layer(index):
            return Qwen3MoeDecoderLayer(cfg, tp, backend, self.expert_parallel)
        return super().decoder_layer(cfg, tp, backend, index)

    def _fusable(self) -> bool:
        """The fused batch-1 all-reduces live in the dense GEMVs; the experts' all-reduce is not fused."""
        return False

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        num_tokens = input_ids.shape[0]
        if num_tokens > self.routed_experts_buffer.shape[0]:
            raise ValueError(f"a forward of {num_tokens} tokens exceeds max_num_tokens "
                             f"({self.routed_experts_buffer.shape[0]}) of the routing-replay buffer")
        self.num_routed_tokens = num_tokens
        return super().forward(input_ids, positions, meta)

    @property
    def routed_experts(self) -> torch.Tensor:
        """[tokens, num_hidden_layers, top_k] int32: each token's experts in every layer of the last
        forward called, heaviest first, -1 in dense layers. A view: copy it before the next forward. A
        CUDA graph replay writes the first rows of its captured size; its caller slices the buffer."""
        return self.routed_experts_buffer[: self.num_routed_tokens]
