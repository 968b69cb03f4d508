"""Load a Hugging Face safetensors checkpoint into a tensor-parallel model, shard by shard."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    return files


def load_named_tensors(model: nn.Module, named, where: str = "update") -> set[str]:
    """Give each checkpoint-named tensor to the parameter (and shard) it belongs to. Returns what
    was filled, as 'param' or 'param:shard'. Full tensors go in; each rank keeps its own shard."""
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = getattr(model.cfg, "tie_word_embeddings", False)
    loaded: set[str] = set()
    for ckpt_name, tensor in named:
        name = ckpt_name.removeprefix("model.")
        if tied and name == "lm_head.weight":
            continue
        shard_id = None
        for hf, (ours, sid) in model.packed_modules.items():
            if f".{hf}." in name:
                name, shard_id = name.replace(f".{hf}.", f".{ours}."), sid
                break
        param = params.get(name)
        if param is None:
            raise ValueError(f"{where}: tensor {ckpt_name!r} has no place in the model")
        with torch.no_grad():
            if shard_id is None:
                param.weight_loader(param, tensor)
            else:
                param.weight_loader(param, tensor, shard_id)
        loaded.add(name if shard_id is None else f"{name}:{shard_id}")
    return loaded


def _checkpoint_tensors(files: list[Path], bar):
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                bar.update(1)
                yield name, f.get_tensor(name)


def load_weights(model: nn.Module, model_dir: str | Path, show_progress: bool) -> None:
    """Every parameter must be filled; a missing or unknown tensor is an error, not a warning."""
    model_dir = Path(model_dir)
    files = checkpoint_files(model_dir)
    total = sum(len(safe_open(str(f), "pt").keys()) for f in files)
    with tqdm(total=total, desc="Loading weights", unit="tensor", disable=not show_progress) as bar:
        loaded = load_named_tensors(model, _checkpoint_tensors(files, bar), str(model_dir))
    tied = getattr(model.cfg, "tie_word_embeddings", False)
    expected = set()
    for name, _ in model.named_parameters(remove_duplicate=False):
        if tied and name == "lm_head.weight":
            continue
        shards = {sid for (ours, sid) in model.packed_modules.values() if f".{ours}." in name}
        expected |= {f"{name}:{s}" for s in shards} if shards else {name}
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(f"checkpoint {model_dir} lacks {len(missing)} tensors, e.g. {missing[:3]}")
