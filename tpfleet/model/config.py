"""The Qwen3 and Qwen3-MoE hyper-parameters tpfleet needs, read straight from a checkpoint's config.json.

We parse the JSON ourselves rather than going through transformers so that both the v4 layout
(`rope_theta`, `torch_dtype`, `num_experts` at the top level, as published checkpoints have it) and the
v5 layout (`rope_parameters`, `dtype`, `num_local_experts`) load, and so that an unsupported option
fails with a clear message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

MODEL_TYPES = ("qwen3", "qwen3_moe")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}") from None


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    attention_bias: bool
    dtype: torch.dtype
    eos_token_ids: tuple[int, ...]
    model_type: str = "qwen3"
    # Qwen3-MoE only; a dense model has no experts
    num_experts: int = 0
    num_experts_per_tok: int = 0
    norm_topk_prob: bool = False
    moe_intermediate_size: int = 0
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()

    @property
    def is_moe(self) -> bool:
        return self.model_type == "qwen3_moe"

    def is_moe_layer(self, index: int) -> bool:
        """transformers' rule: sparse unless listed in mlp_only_layers, every decoder_sparse_step-th layer."""
        return (index not in self.mlp_only_layers and self.num_experts > 0
                and (index + 1) % self.decoder_sparse_step == 0)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: --model must be a Hugging Face checkpoint directory")
        raw = json.loads(path.read_text())
        model_type = raw.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"{path}: model_type is {model_type!r}; tpfleet serves Qwen3 ('qwen3') "
                             "and Qwen3-MoE ('qwen3_moe')")
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"{path}: rope type {rope_type!r} is not supported yet (only 'default')")
        rope_theta = raw.get("rope_theta", rope.get("rope_theta", 10000.0))
        heads = raw["num_attention_heads"]
        return cls(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads", heads),
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            max_position_embeddings=raw.get("max_position_embeddings", 4096),
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            attention_bias=raw.get("attention_bias", False),
            dtype=parse_dtype(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"),
            eos_token_ids=_eos_ids(Path(model_dir), raw),
            model_type=model_type,
            **(_moe_fields(path, raw) if model_type == "qwen3_moe" else {}),
        )


def _moe_fields(path: Path, raw: dict) -> dict:
    """The expert settings; transformers 5 writes the expert count as `num_local_experts`."""
    num_experts = raw.get("num_experts", raw.get("num_local_experts"))
    if not num_experts:
        raise ValueError(f"{path}: a qwen3_moe config needs num_experts (or num_local_experts)")
    top_k = raw["num_experts_per_tok"]
    if not 0 < top_k <= num_experts:
        raise ValueError(f"{path}: num_experts_per_tok ({top_k}) must be between 1 and num_experts ({num_experts})")
    step = raw.get("decoder_sparse_step", 1)
    if step < 1:
        raise ValueError(f"{path}: decoder_sparse_step must be at least 1, got {step}")
    return {
        "num_experts": num_experts,
        "num_experts_per_tok": top_k,
        "norm_topk_prob": raw.get("norm_topk_prob", False),
        "moe_intermediate_size": raw["moe_intermediate_size"],
        "decoder_sparse_step": step,
        "mlp_only_layers": tuple(raw.get("mlp_only_layers") or ()),
    }


def _eos_ids(model_dir: Path, raw: dict) -> tuple[int, ...]:
    """generation_config.json's eos ids win over config.json's, as in transformers' generate."""
    ids = raw.get("eos_token_id")
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        ids = json.loads(gen.read_text()).get("eos_token_id", ids)
    if ids is None:
        return ()
    return tuple(ids) if isinstance(ids, list) else (ids,)
