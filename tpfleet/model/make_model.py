"""`tpfleet make-model`: write a randomly initialised Qwen3 or Qwen3-MoE checkpoint in Hugging Face format.

Nothing is downloaded: the tokenizer is a byte-level BPE trained on a small corpus shipped with
the package, and the weights are seeded random normals. `tiny` is the default for tests and demos;
`8b-shape` has Qwen3-8B's shapes so that GPU benchmarks move realistic bytes. `tiny-moe` and
`30b-a3b-shape` (Qwen3-30B-A3B's shapes) are their Qwen3-MoE counterparts, written one tensor per
expert projection as the published MoE checkpoints are.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML, the format Qwen3 uses: every turn framed by <|im_start|>role ... <|im_end|>.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{% endif %}"
)  # ChatML, with Qwen3's switch for its empty thinking block


@dataclass(frozen=True)
class Preset:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    dtype: str
    bpe_vocab: int  # merges requested from the tokenizer trainer
    vocab_size: int | None  # None: the tokenizer's size, made odd so no TP size divides it
    shard_bytes: int
    # Qwen3-MoE; no experts: dense Qwen3 (intermediate_size is then every layer's MLP, else the dense layers')
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    mlp_only_layers: tuple[int, ...] = ()


PRESETS = {
    # head_dim * heads != hidden_size on purpose: Qwen3's head_dim is its own parameter.
    "tiny": Preset(64, 160, 2, 4, 2, 32, 4096, False, "float32", 1000, None, 200_000),
    "small": Preset(512, 1536, 8, 8, 4, 64, 32768, True, "bfloat16", 1000, 32003, 64 << 20),
    "8b-shape": Preset(4096, 12288, 36, 32, 8, 128, 40960, False, "bfloat16", 1000, 151936, 4 << 30),
    # The middle layer dense: a mixed model, as mlp_only_layers makes one.
    "tiny-moe": Preset(64, 160, 3, 4, 2, 32, 4096, False, "float32", 1000, None, 200_000,
                       num_experts=8, num_experts_per_tok=3, moe_intermediate_size=48, mlp_only_layers=(1,)),
    "30b-a3b-shape": Preset(2048, 6144, 48, 32, 4, 128, 40960, False, "bfloat16", 1000, 151936, 4 << 30,
                            num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768),
}


def build_tokenizer(bpe_vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = (Path(__file__).parent / "corpus.txt").read_text().splitlines()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return tok


def write_tokenizer(out: Path, bpe_vocab: int, max_position: int) -> tuple[int, dict[str, int]]:
    """tokenizer.json and tokenizer_config.json in `out`; returns the vocabulary size and the special
    tokens' ids."""
    tok = build_tokenizer(bpe_vocab)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_position,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
    }, indent=2))
    return tok.get_vocab_size(), {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}


def _moe_config(p: Preset) -> dict:
    """config.json's Qwen3-MoE entries, named as Qwen3-30B-A3B's are."""
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "num_experts": p.num_experts,
        "num_experts_per_tok": p.num_experts_per_tok,
        "moe_intermediate_size": p.moe_intermediate_size,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": list(p.mlp_only_layers),
        "output_router_logits": False,
        "router_aux_loss_coef": 0.001,
    }


def _mlp_shapes(cfg: dict, layer: int) -> list[tuple[str, tuple[int, ...]]]:
    """One layer's feed-forward tensors: the dense MLP's, or the router's and every expert's."""
    p, h = f"model.layers.{layer}.mlp.", cfg["hidden_size"]
    if cfg.get("num_experts") and layer not in cfg["mlp_only_layers"]:
        inter = cfg["moe_intermediate_size"]
        shapes = [(p + "gate.weight", (cfg["num_experts"], h))]
        for expert in range(cfg["num_experts"]):
            e = f"{p}experts.{expert}."
            shapes += [(e + "gate_proj.weight", (inter, h)), (e + "up_proj.weight", (inter, h)),
                       (e + "down_proj.weight", (h, inter))]
        return shapes
    inter = cfg["intermediate_size"]
    return [(p + "gate_proj.weight", (inter, h)), (p + "up_proj.weight", (inter, h)),
            (p + "down_proj.weight", (h, inter))]


def _weight_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, d = cfg["hidden_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    shapes = [("model.embed_tokens.weight", (cfg["vocab_size"], h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (q, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, q)),
            (p + "self_attn.q_norm.weight", (d,)),
            (p + "self_attn.k_norm.weight", (d,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
        shapes += _mlp_shapes(cfg, i)
    shapes.append(("model.norm.weight", (h,)))
    if not cfg["tie_word_embeddings"]:
        shapes.append(("lm_head.weight", (cfg["vocab_size"], h)))
    return shapes


def hf_config(p: Preset, vocab_size: int, special_ids: dict[str, int]) -> dict:
    """config.json of a preset, in the layout published Qwen3 checkpoints have."""
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": vocab_size,
        "hidden_size": p.hidden_size,
        "intermediate_size": p.intermediate_size,
        "num_hidden_layers": p.num_hidden_layers,
        "num_attention_heads": p.num_attention_heads,
        "num_key_value_heads": p.num_key_value_heads,
        "head_dim": p.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": p.max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": p.tie_word_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "torch_dtype": p.dtype,
        "bos_token_id": special_ids["<|endoftext|>"],
        "eos_token_id": special_ids["<|im_end|>"],
        "use_cache": True,
        "use_sliding_window": False,
        **(_moe_config(p) if p.num_experts else {}),
    }


def make_model(preset: str, out: str | Path, seed: int = 0, device: str = "cpu",
               tie_word_embeddings: bool | None = None, weights: bool = True) -> Path:
    """A checkpoint of the preset's shapes with random weights; `weights` False writes its config and
    tokenizer only, which an engine loads with load_format 'dummy'."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    p = PRESETS[preset]
    if tie_word_embeddings is not None:
        p = dataclasses.replace(p, tie_word_embeddings=tie_word_embeddings)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    n_tok, ids = write_tokenizer(out, p.bpe_vocab, p.max_position_embeddings)
    vocab_size = p.vocab_size or (n_tok | 1)
    if vocab_size < n_tok:
        raise ValueError(f"preset vocab_size {vocab_size} is smaller than the tokenizer ({n_tok})")

    cfg = hf_config(p, vocab_size, ids)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]]}, indent=2))

    if weights:
        _write_weights(cfg, p, out, seed, device)
    return out


def random_weight(name: str, shape, gen: torch.Generator) -> torch.Tensor:
    """One tensor of a random checkpoint, in float32 on the generator's device: norm weights 1, the rest
    normal with std 0.02 (also what `load_format` 'dummy' draws in place of a checkpoint)."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, device=gen.device)
    return torch.randn(shape, generator=gen, device=gen.device).mul_(0.02)


def _write_weights(cfg: dict, p: Preset, out: Path, seed: int, device: str) -> None:
    """Stream tensors into shards of at most `shard_bytes`, so an 8B checkpoint never sits in RAM whole."""
    for old in out.glob("model*.safetensors"):
        old.unlink()
    dtype = getattr(torch, p.dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    written: list[list[str]] = []  # tensor names of each shard, in order
    shard: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        save_file(shard, str(out / f"_part{len(written)}.safetensors"), metadata={"format": "pt"})
        written.append(list(shard))
        shard.clear()

    for name, shape in tqdm(_weight_shapes(cfg), desc="make-model", unit="tensor", leave=False):
        t = random_weight(name, shape, gen).to(dtype).cpu()
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > p.shard_bytes:
            flush()
            size = 0
        shard[name] = t
        size += nbytes
    flush()

    weight_map, total = {}, 0
    for i, names in enumerate(written):
        final = out / f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        (out / f"_part{i}.safetensors").rename(final)
        total += final.stat().st_size
        weight_map.update(dict.fromkeys(names, final.name))
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
