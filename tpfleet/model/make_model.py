"""`tpfleet make-model`: write a randomly initialised Qwen3 checkpoint in Hugging Face format.

Nothing is downloaded: the tokenizer is a byte-level BPE trained on a small corpus shipped with
the package, and the weights are seeded random normals. `tiny` is the default for tests and demos;
`8b-shape` has Qwen3-8B's shapes so that GPU benchmarks move realistic bytes.
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
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


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


PRESETS = {
    # head_dim * heads != hidden_size on purpose: Qwen3's head_dim is its own parameter.
    "tiny": Preset(64, 160, 2, 4, 2, 32, 4096, False, "float32", 1000, None, 200_000),
    "small": Preset(512, 1536, 8, 8, 4, 64, 32768, True, "bfloat16", 1000, 32003, 64 << 20),
    "8b-shape": Preset(4096, 12288, 36, 32, 8, 128, 40960, False, "bfloat16", 1000, 151936, 4 << 30),
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


def _weight_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, inter, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
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
            (p + "mlp.gate_proj.weight", (inter, h)),
            (p + "mlp.up_proj.weight", (inter, h)),
            (p + "mlp.down_proj.weight", (h, inter)),
        ]
    shapes.append(("model.norm.weight", (h,)))
    if not cfg["tie_word_embeddings"]:
        shapes.append(("lm_head.weight", (cfg["vocab_size"], h)))
    return shapes


def make_model(preset: str, out: str | Path, seed: int = 0, device: str = "cpu",
               tie_word_embeddings: bool | None = None) -> Path:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    p = PRESETS[preset]
    if tie_word_embeddings is not None:
        p = dataclasses.replace(p, tie_word_embeddings=tie_word_embeddings)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    tok = build_tokenizer(p.bpe_vocab)
    n_tok = tok.get_vocab_size()
    vocab_size = p.vocab_size or (n_tok | 1)
    if vocab_size < n_tok:
        raise ValueError(f"preset vocab_size {vocab_size} is smaller than the tokenizer ({n_tok})")
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": p.max_position_embeddings,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
    }, indent=2))

    cfg = {
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
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "use_cache": True,
        "use_sliding_window": False,
    }
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]]}, indent=2))

    _write_weights(cfg, p, out, seed, device)
    return out


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
        if name.endswith("norm.weight"):
            t = torch.ones(shape, dtype=dtype)
        else:
            t = torch.randn(shape, generator=gen, device=device).mul_(0.02).to(dtype).cpu()
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
