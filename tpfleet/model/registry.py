"""The model class a checkpoint's config asks for: dense Qwen3 or Qwen3-MoE."""

from __future__ import annotations

from tpfleet.attention.backend import AttentionBackend
from tpfleet.comm.group import TPGroup
from tpfleet.model.config import ModelConfig
from tpfleet.model.qwen3 import Qwen3ForCausalLM
from tpfleet.model.qwen3_moe import Qwen3MoeForCausalLM


def build_model(model_config: ModelConfig, tp: TPGroup, backend: AttentionBackend, *, ep_size: int = 1,
                max_num_tokens: int = 8192) -> Qwen3ForCausalLM:
    """This rank's shard of the model, parameters allocated but not loaded. `ep_size` and
    `max_num_tokens` (the most tokens one forward takes: rows of the routing-replay buffer) concern MoE
    models only."""
    model_config.check_parallelism(tp.world_size, ep_size)
    if model_config.is_moe:
        return Qwen3MoeForCausalLM(model_config, tp, backend, ep_size=ep_size, max_num_tokens=max_num_tokens)
    return Qwen3ForCausalLM(model_config, tp, backend)
