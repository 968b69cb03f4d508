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

MODEL_TYPES = ("qwen3", "qwen3_moe")
DTYPES = ("float32", "float16", "bfloat16")  # torch's names, without importing torch: the CLI checks with this


def check_dtype(name: str) -> str:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {list(DTYPES)}")
    return name


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
    dtype: str  # one of DTYPES
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

    def check_parallelism(self, tp_size: int, ep_size: int = 1) -> None:
        """A ValueError naming the first size that tp_size (or ep_size) does not divide: checked before any
        rank starts, rather than by every rank as it builds its shard."""
        def divisible(n: int, what: str) -> None:
            if n % tp_size:
                raise ValueError(f"{what} ({n}) is not divisible by the tensor-parallel size ({tp_size})")

        divisible(self.num_attention_heads, "num_attention_heads")
        kv = self.num_key_value_heads
        if kv >= tp_size:
            divisible(kv, "num_key_value_heads")
        elif tp_size % kv:
            raise ValueError(f"the tensor-parallel size ({tp_size}) must be a multiple of num_key_value_heads "
                             f"({kv}), whose heads are then replicated")
        if not all(self.is_moe_layer(i) for i in range(self.num_hidden_layers)):
            divisible(self.intermediate_size, "intermediate_size")
        if not self.is_moe:
            if ep_size != 1:
                raise ValueError(f"ep_size ({ep_size}) divides experts, and this {self.model_type!r} model has "
                                 "none: use ep_size 1")
            return
        if ep_size not in (1, tp_size):
            raise ValueError(f"ep_size ({ep_size}) must be 1 (each rank holds a slice of every expert) or equal "
                             f"tp_size ({tp_size}) (each rank holds whole experts)")
        if ep_size > 1 and self.num_experts % ep_size:
            raise ValueError(f"num_experts ({self.num_experts}) is not divisible by ep_size ({ep_size})")
        if ep_size == 1 and self.moe_intermediate_size % tp_size:
            hint = f"; ep_size={tp_size} divides the experts instead" if self.num_experts % tp_size == 0 else ""
            raise ValueError(f"moe_intermediate_size ({self.moe_intermediate_size}) is not divisible by the "
                             f"tensor-parallel size ({tp_size}){hint}")

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: --model must be a Hugging Face checkpoint directory")
        raw = json.loads(path.read_text())
        try:
            return cls._from_raw(Path(model_dir), path, raw)
        except KeyError as missing:
            raise ValueError(f"{path}: no {missing.args[0]!r}, which a {raw.get('model_type')} config needs") from None

    @classmethod
    def _from_raw(cls, model_dir: Path, path: Path, raw: dict) -> ModelConfig:
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
            dtype=check_dtype(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"),
            eos_token_ids=_eos_ids(model_dir, raw),
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
