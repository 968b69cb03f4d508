"""Load a Hugging Face safetensors checkpoint into a tensor-parallel model, shard by shard."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from tpfleet.model.make_model import random_weight
from tpfleet.model.pinned_reader import pinned_tensors

# One expert's projection in the published per-expert layout: model.layers.{l}.mlp.experts.{e}.{proj}.weight
_EXPERT = re.compile(r"(.+\.experts)\.(\d+)\.(\w+)\.weight")


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        for name in names:  # an entry is a file of this checkpoint, not a path to anywhere else
            if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts:
                raise ValueError(f"{index}: weight_map entry {name!r} leaves the checkpoint directory")
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
        name, shard_id = _target(model, name)
        param = params.get(name)
        if param is None:
            raise ValueError(f"{where}: tensor {ckpt_name!r} has no place in the model")
        try:
            with torch.no_grad():
                if shard_id is None:
                    param.weight_loader(param, tensor)
                else:
                    param.weight_loader(param, tensor, shard_id)
        except (torch.OutOfMemoryError, torch.AcceleratorError):  # the device's fault, not the tensor's
            raise
        except (RuntimeError, IndexError) as exc:  # a shape the parameter's shard cannot come from
            raise ValueError(f"{where}: tensor {ckpt_name!r} of shape {list(tensor.shape)} does not fit {name} "
                             f"(this rank's shard {list(param.shape)}): {exc}") from exc
        loaded.add(name if shard_id is None else f"{name}:{shard_id}")
    return loaded


def _target(model: nn.Module, name: str) -> tuple[str, object]:
    """Our parameter and shard id for a checkpoint name (without 'model.'). One expert's projection goes
    into its layer's stacked experts parameter as shard (expert, part) (`model.expert_modules`); a part
    of a packed module into the merged parameter (`model.packed_modules`); anything else whole."""
    expert = _EXPERT.fullmatch(name)
    expert_modules = getattr(model, "expert_modules", {})
    if expert and expert[3] in expert_modules:
        ours, part = expert_modules[expert[3]]
        return f"{expert[1]}.{ours}", (int(expert[2]), part)
    for hf, (ours, sid) in model.packed_modules.items():
        if f".{hf}." in name:
            return name.replace(f".{hf}.", f".{ours}."), sid
    return name, None


def _checkpoint_tensors(files: list[Path], bar, pinned: bool):
    """Through pinned buffers for a GPU model (tpfleet.model.pinned_reader), else safetensors' memory map."""
    named = pinned_tensors(files) if pinned else _mapped_tensors(files)
    for item in named:
        bar.update(1)
        yield item


def _mapped_tensors(files: list[Path]):
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def load_weights(model: nn.Module, model_dir: str | Path, show_progress: bool) -> None:
    """Every parameter must be filled; a missing or unknown tensor is an error, not a warning."""
    model_dir = Path(model_dir)
    files = checkpoint_files(model_dir)
    total = sum(len(safe_open(str(f), "pt").keys()) for f in files)
    with tqdm(total=total, desc="Loading weights", unit="tensor", disable=not show_progress) as bar:
        pinned = next(model.parameters()).device.type == "cuda"
        loaded = load_named_tensors(model, _checkpoint_tensors(files, bar, pinned), str(model_dir))
    tied = getattr(model.cfg, "tie_word_embeddings", False)
    expected = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if (tied and name == "lm_head.weight") or name in loaded:
            continue
        shards = {sid for (ours, sid) in model.packed_modules.values() if f".{ours}." in name}
        shards |= set(getattr(param, "shard_ids", ()))  # stacked experts come whole or one expert at a time
        expected |= {f"{name}:{s}" for s in shards} if shards else {name}
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(f"checkpoint {model_dir} lacks {len(missing)} tensors, e.g. {missing[:3]}")


@torch.no_grad()
def init_random_weights(model: nn.Module, seed: int) -> None:
    """load_format 'dummy': every parameter drawn as make-model draws a checkpoint's tensors
    (`random_weight`) on its own device from `seed`, so a model's shapes run without reading a
    checkpoint. Each rank draws its own shards (the caller gives each rank its own seed): outputs mean
    nothing, timings and memory do."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, param in model.named_parameters():
        param.copy_(random_weight(name, param.shape, gen))
