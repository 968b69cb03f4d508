"""New weights for a running engine, from disk, from a colocated trainer's shared buffers, or by
broadcast over a collective group (the trainer's side is tpfleet.weight_sync).

Every update is atomic: it is checked in full on the driver (names and shapes against the model's own
checkpoint, dtypes among those it converts from, a checkpoint directory's completeness, paths; buckets and
broadcasts may carry any subset of the tensors), then every rank stages it (checks it again, opens its
buffers or receives its tensors, without touching a parameter), and only when every rank staged
it does any rank commit, writing in place through the parameters' weight loaders (each keeps its
shard; fused qkv and gate_up included). A rejected update leaves the old weights serving and the
old weight_version. `EngineWeights` is the driver's part, reached through LLMEngine's methods;
`RankWeights` is each rank's, reached as "colocation.weights.<method>" through RankGroup.call_all.

Parameters are written in place (`param.data[...].copy_`, never a new `.data`): with the memory saver
their addresses are what the CUDA graphs replay. From a colocated trainer's CUDA IPC buckets the copies
go device to device straight into the live (fused, sharded) parameters, queued back to back with one
synchronisation at the end and no staging copy; every bucket is opened and checked at staging, before
any rank copies anything, which is what keeps an update all-or-nothing across ranks.
"""

from __future__ import annotations

import json
import math
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from safetensors import safe_open

from tpfleet.config import EngineConfig
from tpfleet.engine.sequence import InvalidRequest
from tpfleet.engine.weight_sync import OpenBucket, TensorEntry, parse_dtype_name, parse_payload, parse_shape
from tpfleet.model.loader import checkpoint_files, load_named_tensors, load_weights
from tpfleet.weight_sync import DEFAULT_GROUP_TIMEOUT, WeightUpdateGroup

if TYPE_CHECKING:
    from tpfleet.engine.llm_engine import LLMEngine
    from tpfleet.engine.model_runner import ModelRunner

SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
GROUP_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
HOST = re.compile(r"[A-Za-z0-9_.:\[\]-]{1,255}")
INDEX_FILE = "model.safetensors.index.json"
# How long joining a group may wait for the trainer and the other members: the engine serves nothing meanwhile
JOIN_TIMEOUT = timedelta(minutes=5)


# --- what the model takes ---------------------------------------------------------------------------

@dataclass
class Manifest:
    """The full (unsharded) tensors this model's checkpoint holds, by checkpoint name: their shapes
    and dtypes, read from the safetensors headers. An update must fit it."""
    shapes: dict[str, tuple[int, ...]]
    optional: set[str] = field(default_factory=set)  # accepted, not required (a tied model's lm_head)

    @classmethod
    def of_checkpoint(cls, model_dir: Path, tie_word_embeddings: bool) -> Manifest:
        shapes = {name: shape for name, (shape, _) in read_headers(checkpoint_files(model_dir)).items()}
        optional = set()
        embed = "model.embed_tokens.weight"
        if tie_word_embeddings and "lm_head.weight" not in shapes and embed in shapes:
            shapes["lm_head.weight"], optional = shapes[embed], {"lm_head.weight"}
        return cls(shapes, optional)

    def check(self, name: object, shape: tuple[int, ...], name_field: str, shape_field: str) -> None:
        if not isinstance(name, str) or name not in self.shapes:
            raise InvalidRequest(name_field, f"{str(name)[:200]!r} is not a tensor of this model")
        if tuple(shape) != self.shapes[name]:
            raise InvalidRequest(shape_field, f"{name} has shape {list(self.shapes[name])}, not {list(shape)}")

    def check_complete(self, names: set[str], field_name: str) -> None:
        missing = sorted(set(self.shapes) - self.optional - names)
        if missing:
            raise InvalidRequest(field_name, f"the checkpoint lacks {len(missing)} tensors of this model, "
                                             f"e.g. {missing[:3]}")


def read_headers(files: list[Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every tensor's shape and safetensors dtype, from the files' headers only."""
    out = {}
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for name in handle.keys():
                piece = handle.get_slice(name)
                out[name] = (tuple(piece.get_shape()), piece.get_dtype())
    return out


def allowed_roots(cfg: EngineConfig) -> list[Path]:
    """Where checkpoints may be loaded from: the config's `weights_root`, else the directory that holds
    the model's own."""
    return [Path(root).resolve() for root in cfg.weights_root or [str(Path(cfg.model).resolve().parent)]]


def check_checkpoint(model_path: object, roots: list[Path], manifest: Manifest) -> Path:
    """The resolved checkpoint directory, after checking that it and every file it names lie under an
    allowed root and that its tensors are exactly this model's, in shape and dtype. Reads headers only."""
    field_name = "model_path"
    if not isinstance(model_path, str) or not model_path or "\x00" in model_path:
        raise InvalidRequest(field_name, "must be a directory path")
    try:
        model_dir = Path(model_path).resolve(strict=True)
    except (OSError, RuntimeError, ValueError):  # ValueError: a name the file system cannot encode
        raise InvalidRequest(field_name, f"{model_path} does not exist") from None
    if not any(model_dir.is_relative_to(root) for root in roots):
        raise InvalidRequest(field_name, f"{model_path} is outside the allowed weight roots "
                                         f"({', '.join(map(str, roots))})")
    if not model_dir.is_dir():
        raise InvalidRequest(field_name, f"{model_path} is not a directory")
    index = model_dir / INDEX_FILE
    if index.exists():
        _check_index(index)
    try:
        files = checkpoint_files(model_dir)
    except (OSError, ValueError) as error:
        raise InvalidRequest(field_name, str(error)) from None
    for path in files:
        resolved = path.resolve()
        if not resolved.is_file() or not any(resolved.is_relative_to(root) for root in roots):
            raise InvalidRequest(field_name, f"{path.name} is not a file under the allowed weight roots")
    try:
        headers = read_headers(files)
    except Exception as error:  # noqa: BLE001 - safetensors' own complaint about a bad file
        raise InvalidRequest(field_name, f"unreadable safetensors file: {error}") from None
    for name, (shape, dtype) in headers.items():
        manifest.check(name, shape, field_name, field_name)
        if dtype not in SAFETENSORS_DTYPES:
            raise InvalidRequest(field_name, f"{name} is {dtype}; weights load from {', '.join(SAFETENSORS_DTYPES)}")
    manifest.check_complete(set(headers), field_name)
    return model_dir


def _check_index(index: Path) -> None:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError):
        raise InvalidRequest("model_path", f"{INDEX_FILE} is not a safetensors index") from None
    if not isinstance(weight_map, dict):
        raise InvalidRequest("model_path", f"{INDEX_FILE}: weight_map is not an object")
    for name, file in weight_map.items():
        if not isinstance(file, str) or not file or Path(file).is_absolute() or ".." in Path(file).parts:
            raise InvalidRequest("model_path", f"{INDEX_FILE}: the entry of {name!r} ({str(file)[:200]!r}) leaves "
                                               "the checkpoint directory")


# --- one rank -------------------------------------------------------------------------------------------

@dataclass
class Staged:
    """An update ready to commit: full tensors (each rank keeps its shard), or a checkpoint to read."""
    tensors: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    checkpoint: Path | None = None
    buckets: list[OpenBucket] = field(default_factory=list)

    def release(self) -> None:
        self.tensors = []
        for bucket in self.buckets:
            bucket.close()
        self.buckets = []


class RankWeights:
    """One rank's part of every update; each staging method answers a report instead of raising, so
    the driver hears every rank's verdict before it decides."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self.groups: dict[str, WeightUpdateGroup] = {}
        self.staged: Staged | None = None
        self._manifest: Manifest | None = None

    @property
    def manifest(self) -> Manifest:
        if self._manifest is None:
            tied = bool(getattr(self.runner.model.cfg, "tie_word_embeddings", False))
            self._manifest = Manifest.of_checkpoint(Path(self.runner.cfg.model), tied)
        return self._manifest

    def _report(self, field_name: str, stage: Callable[[], Staged]) -> dict:
        self.discard()
        try:
            self.staged = stage()
        except InvalidRequest as error:
            return {"rank": self.runner.rank, "ok": False, "field": error.field, "message": error.message}
        except Exception as error:  # noqa: BLE001 - reported to the driver, which decides
            return {"rank": self.runner.rank, "ok": False, "field": field_name, "message": str(error)}
        names = sorted(name for name, _ in self.staged.tensors)
        return {"rank": self.runner.rank, "ok": True, "tensors": len(names), "names": names}

    def stage_disk(self, model_path: str, roots: list[str]) -> dict:
        def stage() -> Staged:
            return Staged(checkpoint=check_checkpoint(model_path, [Path(r) for r in roots], self.manifest))
        return self._report("model_path", stage)

    def stage_tensor(self, payloads: list[str]) -> dict:
        index = self.runner.rank if len(payloads) > 1 else 0
        field_name = f"serialized_named_tensors[{index}]"

        def stage() -> Staged:
            buckets = parse_payload(payloads[index], field_name)
            check_entries(self.manifest, [entry for bucket in buckets for entry in bucket.tensors])
            staged = Staged()
            try:
                for spec in buckets:
                    staged.buckets.append(OpenBucket(spec))
                    staged.tensors += staged.buckets[-1].tensors()
            except BaseException:
                staged.release()
                raise
            return staged
        return self._report(field_name, stage)

    def check_distributed(self, names: list[str], dtypes: list[str], shapes: list[list[int]], group_name: str,
                          load_format: str | None) -> dict:
        """Before any tensor is received: a rank that would refuse must say so before the broadcast."""
        try:
            check_distributed_request(self.manifest, names, dtypes, shapes, load_format)
            if group_name not in self.groups:
                raise InvalidRequest("group_name", f"no weight update group {group_name!r} on rank {self.runner.rank}")
        except InvalidRequest as error:
            return {"rank": self.runner.rank, "ok": False, "field": error.field, "message": error.message}
        return {"rank": self.runner.rank, "ok": True}

    def stage_distributed(self, names: list[str], dtypes: list[str], shapes: list[list[int]], group_name: str,
                          load_format: str | None) -> dict:
        def stage() -> Staged:
            group, device = self.groups[group_name], self.runner.device
            types = [parse_dtype_name(dtype, "dtypes") for dtype in dtypes]
            if load_format == "flattened_bucket":
                sizes = [math.prod(shape) for shape in shapes]
                flat = torch.empty(sum(sizes), dtype=types[0], device=device)
                group.broadcast(flat).wait()
                tensors = [piece.view(shape) for piece, shape in zip(flat.split(sizes), shapes)]
            else:
                tensors = [torch.empty(shape, dtype=dtype, device=device) for dtype, shape in zip(types, shapes)]
                for work in [group.broadcast(tensor) for tensor in tensors]:
                    work.wait()
            return Staged(tensors=list(zip(names, tensors)))
        return self._report("names", stage)

    def commit(self) -> dict:
        """Write the staged update into the live parameters."""
        staged, self.staged = self.staged, None
        try:
            if staged.checkpoint is not None:
                load_weights(self.runner.model, staged.checkpoint, show_progress=False)
            else:
                load_named_tensors(self.runner.model, staged.tensors)
            if self.runner.device.type == "cuda":
                torch.cuda.synchronize(self.runner.device)  # the sender may free its buffers once we answer
        finally:
            staged.release()
        return {"rank": self.runner.rank}

    def discard(self) -> None:
        if self.staged is not None:
            self.staged.release()
            self.staged = None

    def init_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                   group_name: str, backend: str) -> dict:
        rank = rank_offset + self.runner.rank
        store = dist.TCPStore(master_address, master_port, world_size, is_master=False, timeout=JOIN_TIMEOUT)
        self.groups[group_name] = WeightUpdateGroup(store, rank, world_size, group_name, backend,
                                                    DEFAULT_GROUP_TIMEOUT)
        return {"rank": self.runner.rank, "group_rank": rank}

    def destroy_group(self, group_name: str) -> dict:
        group = self.groups.pop(group_name, None)
        if group is not None:
            group.destroy()
        return {"rank": self.runner.rank, "destroyed": group is not None}


def check_version(weight_version: object) -> None:
    if weight_version is not None and not isinstance(weight_version, str):
        raise InvalidRequest("weight_version", "must be a string")


def check_entries(manifest: Manifest, entries: list[TensorEntry]) -> None:
    for entry in entries:
        manifest.check(entry.name, entry.shape, f"{entry.field}.name", f"{entry.field}.shape")


def check_distributed_request(manifest: Manifest, names: object, dtypes: object, shapes: object,
                              load_format: object) -> None:
    if load_format not in (None, "flattened_bucket"):
        raise InvalidRequest("load_format", f"must be null or 'flattened_bucket', not {str(load_format)[:60]!r}")
    for key, value in (("names", names), ("dtypes", dtypes), ("shapes", shapes)):
        if not isinstance(value, list):
            raise InvalidRequest(key, "must be a list")
    if not names:
        raise InvalidRequest("names", "name at least one tensor")
    if not len(names) == len(dtypes) == len(shapes):
        raise InvalidRequest("names", f"names, dtypes and shapes differ in length ({len(names)}, {len(dtypes)}, "
                                      f"{len(shapes)})")
    if len(set(map(str, names))) != len(names):
        raise InvalidRequest("names", "a tensor is named twice")
    parsed_dtypes = [parse_dtype_name(dtype, f"dtypes[{i}]") for i, dtype in enumerate(dtypes)]
    for i, (name, shape) in enumerate(zip(names, shapes)):
        manifest.check(name, parse_shape(shape, f"shapes[{i}]"), f"names[{i}]", f"shapes[{i}]")
    if load_format == "flattened_bucket" and len(set(parsed_dtypes)) > 1:
        raise InvalidRequest("dtypes", "a flattened bucket holds tensors of one dtype")


# --- the driver --------------------------------------------------------------------------------------------

class EngineWeights:
    """The driver's side: check, have every rank stage, commit only when all staged."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.ranks = engine.ranks
        self.local: RankWeights = engine.runner.colocation.weights  # rank 0, in this process
        self.group_names: set[str] = set()

    def required_names(self) -> set[str]:
        """The checkpoint tensors a complete update writes."""
        manifest = self.local.manifest
        return set(manifest.shapes) - manifest.optional

    def _check_resident(self) -> None:
        if "weights" in self.engine.released:
            raise InvalidRequest("weights", "the weights are released: POST /resume_memory_occupation with tags "
                                            "['weights'] before updating them")

    def update_from_disk(self, model_path: str, weight_version: str | None,
                         before_commit: Callable[[], None] | None = None) -> list[dict]:
        self._check_resident()
        check_version(weight_version)
        roots = allowed_roots(self.engine.cfg)
        check_checkpoint(model_path, roots, self.local.manifest)
        reports = self._apply("stage_disk", weight_version, before_commit, model_path, [str(r) for r in roots])
        self.engine.model_path = model_path
        return reports

    def update_from_tensor(self, payloads: list[str], load_format: str | None, weight_version: str | None,
                           before_commit: Callable[[], None] | None = None) -> list[dict]:
        self._check_resident()
        check_version(weight_version)
        tp_size = self.engine.cfg.tp_size
        if load_format not in (None, "flattened_bucket"):
            raise InvalidRequest("load_format", f"must be null or 'flattened_bucket', not {str(load_format)[:60]!r}")
        if not isinstance(payloads, list) or len(payloads) not in (1, tp_size):
            raise InvalidRequest("serialized_named_tensors", f"give one payload for every rank, or one per TP rank "
                                                             f"({tp_size})")
        names = []
        for i, payload in enumerate(payloads):
            entries = [entry for bucket in parse_payload(payload, f"serialized_named_tensors[{i}]")
                       for entry in bucket.tensors]
            check_entries(self.local.manifest, entries)
            names.append(sorted(entry.name for entry in entries))
        if any(other != names[0] for other in names):
            raise InvalidRequest("serialized_named_tensors", "the ranks' payloads name different tensors")
        return self._apply("stage_tensor", weight_version, before_commit, payloads)

    def update_from_distributed(self, names: list[str], dtypes: list[str], shapes: list[list[int]],
                                group_name: str, weight_version: str | None, load_format: str | None = None,
                                before_commit: Callable[[], None] | None = None) -> list[dict]:
        self._check_resident()
        check_version(weight_version)
        check_distributed_request(self.local.manifest, names, dtypes, shapes, load_format)
        if group_name not in self.group_names:
            raise InvalidRequest("group_name", f"no weight update group {str(group_name)[:128]!r}; "
                                               "call /init_weights_update_group first")
        args = (names, dtypes, shapes, group_name, load_format)
        self._all_ok(self.ranks.call_all("colocation.weights.check_distributed", *args))
        return self._apply("stage_distributed", weight_version, before_commit, *args)

    def check_join(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                   group_name: str, backend: str) -> None:
        """An InvalidRequest naming the field at fault, before anything waits on the trainer. Reads only
        settings: the server calls it off the engine thread too."""
        tp_size = self.engine.cfg.tp_size
        if not isinstance(master_address, str) or not HOST.fullmatch(master_address):
            raise InvalidRequest("master_address", "must be a host name or an IP address")
        for key, value, low, high in (("master_port", master_port, 1, 65535),
                                      ("rank_offset", rank_offset, 1, 1 << 20),
                                      ("world_size", world_size, rank_offset + tp_size, 1 << 20)):
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise InvalidRequest(key, f"must be an integer in [{low}, {high}]")
        if not isinstance(group_name, str) or not GROUP_NAME.fullmatch(group_name):
            raise InvalidRequest("group_name", f"must match {GROUP_NAME.pattern}")
        if group_name in self.group_names:
            raise InvalidRequest("group_name", f"group {group_name!r} exists; destroy it first")
        if backend not in ("nccl", "gloo"):
            raise InvalidRequest("backend", f"must be 'nccl' or 'gloo', not {str(backend)[:60]!r}")
        if backend == "nccl" and self.engine.runner.device.type != "cuda":
            raise InvalidRequest("backend", "nccl needs an engine on GPUs; use gloo on CPU")
        try:
            # a name that does not resolve would keep the join retrying for JOIN_TIMEOUT, serving nothing
            socket.getaddrinfo(master_address.strip("[]"), master_port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as error:
            raise InvalidRequest("master_address", f"cannot resolve {master_address[:60]!r}: {error}") from None

    def init_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                   group_name: str, backend: str) -> list[dict]:
        self.check_join(master_address, master_port, rank_offset, world_size, group_name, backend)
        try:
            reports = self.ranks.call_all("colocation.weights.init_group", master_address, master_port, rank_offset,
                                          world_size, group_name, backend)
        except RuntimeError as error:
            self.ranks.call_all("colocation.weights.destroy_group", group_name)
            raise InvalidRequest("master_address", f"could not join group {group_name!r}: {error}") from None
        self.group_names.add(group_name)
        return reports

    def destroy_group(self, group_name: str) -> list[dict]:
        if group_name not in self.group_names:
            raise InvalidRequest("group_name", f"no weight update group {str(group_name)[:128]!r}")
        self.group_names.discard(group_name)
        return self.ranks.call_all("colocation.weights.destroy_group", group_name)

    def _apply(self, stage: str, weight_version: str | None, before_commit: Callable[[], None] | None,
               *args) -> list[dict]:
        """Stage on every rank (everything checked, buffers opened), then `before_commit` (aborting the
        requests in flight: a refused update must change nothing), then commit on every rank (the copies).
        Each rank's report says how many tensors it took, with the driver's wall seconds of both phases
        (all ranks together)."""
        started = time.perf_counter()
        try:
            reports = self.ranks.call_all(f"colocation.weights.{stage}", *args)
            self._all_ok(reports)
            if any(report["names"] != reports[0]["names"] for report in reports):
                raise InvalidRequest("serialized_named_tensors", "the ranks staged different tensors")
        except BaseException:
            self.ranks.call_all("colocation.weights.discard")
            raise
        staged = time.perf_counter()
        if before_commit is not None:
            before_commit()
        self.ranks.call_all("colocation.weights.commit")
        seconds = {"stage_s": staged - started, "commit_s": time.perf_counter() - staged}
        stale = self.engine.stale_weights
        if stale is not None:  # a checkpoint directory is complete; the other sources name what they wrote
            written = stale if stage == "stage_disk" else set(reports[0]["names"])
            self.engine.stale_weights = (stale - written) or None
        if weight_version is not None:
            self.engine.set_weight_version(weight_version)
        self.engine.block_manager.forget_prefixes()  # cached prefixes were computed by the old weights
        return [{"rank": report["rank"], "tensors": report["tensors"], **seconds} for report in reports]

    @staticmethod
    def _all_ok(reports: list[dict]) -> None:
        failed = next((report for report in reports if not report["ok"]), None)
        if failed is not None:
            raise InvalidRequest(failed["field"], f"rank {failed['rank']}: {failed['message']}")
