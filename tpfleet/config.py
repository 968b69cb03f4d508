"""Engine settings shared by every rank (they travel to worker processes as one picklable object).

An `EngineConfig` crosses process boundaries as one JSON document (`to_json` / `from_json` /
`from_file`), checked field by field: an unknown key or a value of the wrong type is an error that
names the field. The command-line flags of every command that starts an engine are derived from the
fields here, in one place (`add_engine_arguments` / `engine_config_from_args`), with their help
texts in `FIELD_HELP`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tpfleet.devices import DEVICE_CHOICES, resolve_device

DEVICES = ("cpu", "cuda")
GRAPH_MODES = ("auto", "eager", "full", "piecewise")
LOAD_FORMATS = ("auto", "dummy")
TP_SIZES = (1, 2, 4, 8)


@dataclass
class EngineConfig:
    model: str
    tp_size: int = 1
    ep_size: int = 1
    device: str = "cpu"
    device_ids: list[int] = field(default_factory=list)
    gpu_uuids: list[str] = field(default_factory=list)
    dtype: str = "auto"
    context_length: int | None = None
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    kv_cache_tokens: int | None = None
    mem_fraction_static: float = 0.85
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"
    graph_mode: str = "auto"
    capture_all_graphs: bool = False
    overlap_schedule: bool = True
    enable_custom_all_reduce: bool = True
    enable_symm_mem: bool = True
    seed: int = 0
    enable_return_routed_experts: bool = False
    weights_root: list[str] = field(default_factory=list)
    hang_timeout: float = 60.0
    startup_hang_timeout: float = 600.0
    enable_memory_saver: bool = False
    weights_cpu_backup: bool = False
    load_format: str = "auto"

    def __post_init__(self) -> None:
        if self.tp_size not in TP_SIZES:
            raise ValueError(f"tp_size must be 1, 2, 4 or 8, got {self.tp_size}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        for name in ("device_ids", "gpu_uuids"):
            if getattr(self, name) and len(getattr(self, name)) != self.tp_size:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries for tp_size {self.tp_size}")
        if self.graph_mode not in GRAPH_MODES:
            raise ValueError(f"graph_mode must be auto, eager, full or piecewise, got {self.graph_mode!r}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be 'auto' or 'dummy', got {self.load_format!r}")
        if self.device == "cpu" and self.graph_mode in ("full", "piecewise"):
            raise ValueError("CUDA graphs need device='cuda'")
        if self.resolved_graph_mode != "eager" and self.resolved_attention_backend != "triton":
            raise ValueError("CUDA graphs need the graph-safe 'triton' attention backend (or graph_mode='eager')")
        if self.block_size < 1 or self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("block_size, max_num_batched_tokens and max_num_seqs must be positive")

    @property
    def resolved_attention_backend(self) -> str:
        if self.attention_backend != "auto":
            return self.attention_backend
        return "triton" if self.device == "cuda" else "torch"

    @property
    def resolved_graph_mode(self) -> str:
        if self.graph_mode != "auto":
            return self.graph_mode
        return "full" if self.device == "cuda" else "eager"

    def rank_device(self, rank: int) -> str:
        if self.device == "cpu":
            return "cpu"
        return f"cuda:{self.device_ids[rank] if self.device_ids else rank}"

    def to_dict(self) -> dict:
        return asdict(self)

    # --- the serialized document ------------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, document: dict) -> EngineConfig:
        """Checked: every key must be a field, every value of the field's type, `model` present."""
        if not isinstance(document, dict):
            raise ValueError(f"an engine config document is a JSON object, not {type(document).__name__}")
        hints = field_types()
        for key, value in document.items():
            if key not in hints:
                raise ValueError(f"unknown engine config field {key!r} (known: {', '.join(hints)})")
            if not _has_type(value, hints[key]):
                raise ValueError(f"engine config field {key!r} must be {_type_name(hints[key])}, got {value!r}")
        if "model" not in document:
            raise ValueError("engine config field 'model' is missing")
        return cls(**document)

    @classmethod
    def from_json(cls, text: str) -> EngineConfig:
        try:
            document = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"an engine config document is not valid JSON: {error}") from None
        return cls.from_dict(document)

    @classmethod
    def from_file(cls, path: str | Path) -> EngineConfig:
        return cls.from_json(Path(path).read_text())

    @classmethod
    def from_file_or_json(cls, source: str) -> EngineConfig:
        """What `--config` takes: a JSON document inline, or the path of a file holding one."""
        return cls.from_json(source) if source.lstrip().startswith("{") else cls.from_file(source)


# --- fields: their types, help texts and command-line flags -------------------------------------------

FIELD_HELP = {
    "model": "local Hugging Face Qwen3 checkpoint directory (config.json, *.safetensors, tokenizer); never "
             "fetched from a model hub",
    "tp_size": "tensor-parallel size: ranks, one process and one device each (1, 2, 4 or 8)",
    "ep_size": "MoE: experts divided among this many of the tp_size ranks (1: every rank holds every expert)",
    "device": "where the ranks run; 'auto': cuda where this machine sees a GPU, else cpu",
    "device_ids": "comma-separated local CUDA indices, one per rank (empty: 0..tp_size-1)",
    "gpu_uuids": "comma-separated UUIDs each rank's device must have (set by the fleet from its placement plan)",
    "dtype": "weights and activations; 'auto' takes the checkpoint's dtype",
    "context_length": "longest sequence, prompt plus output (None: the model's max_position_embeddings)",
    "block_size": "tokens per KV-cache block",
    "max_num_seqs": "most sequences in one batch",
    "max_num_batched_tokens": "per-step token budget, hence also the prefill chunk size",
    "kv_cache_tokens": "KV pool size in tokens (None: 65536 on CPU, mem_fraction_static of the GPU)",
    "mem_fraction_static": "share of GPU memory for weights plus KV cache",
    "enable_prefix_caching": "prefix caching: requests share the KV blocks of a common prompt prefix",
    "attention_backend": "'torch' (reference), 'triton', or 'auto': triton on GPUs, torch on CPUs",
    "graph_mode": "CUDA graphs: 'eager' (none), 'full' (decode graphs), 'piecewise' (full plus piecewise); "
                  "'auto': full on GPU",
    "capture_all_graphs": "capture every batch-size bucket's CUDA graph at start (a slower start); off: the largest "
                          "of each kind at start and each other on the first step that needs it",
    "overlap_schedule": "the overlap schedule: step N+1 is launched before step N's tokens are read back, "
                        "so the GPU never waits on the host",
    "enable_custom_all_reduce": "the custom all-reduce kernel (without it: NCCL and symmetric memory)",
    "enable_symm_mem": "PyTorch symmetric-memory all-reduce",
    "seed": "seed of torch's random number generators on every rank; engines started with one seed draw the same "
            "noise for requests without a sampling_seed, so give each engine of yours its own (a fleet adds its "
            "engine index)",
    "enable_return_routed_experts": "MoE routing replay: requests may ask for the experts chosen per token",
    "hang_timeout": "seconds a rank may make no progress in a step or collective before the engine reports it "
                    "hung and exits (so the fleet restarts it)",
    "startup_hang_timeout": "the same limit during start-up and long calls (weight loads, graph capture)",
    "enable_memory_saver": "weights, KV cache and CUDA-graph memory in regions tpfleet maps itself: releasing "
                           "memory frees them without copies, resuming maps them back at the same addresses, "
                           "and graphs are not re-captured",
    "weights_cpu_backup": "with the memory saver: keep a pinned host copy of the weights on release and restore "
                          "it on resume (off: weights come back undefined until the next weight update, as "
                          "SGLang's default)",
    "weights_root": "comma-separated directories update_weights_from_disk may load from (empty: the parent of "
                    "the model's directory)",
    "load_format": "'auto': the checkpoint's safetensors; 'dummy': random weights, for benchmarks of a model's "
                   "shapes from its config.json alone (`make-model --no-weights`)",
}

FIELD_CHOICES = {
    "device": DEVICES,
    "dtype": ("auto", "float32", "float16", "bfloat16"),
    "attention_backend": ("auto", "torch", "triton"),
    "graph_mode": GRAPH_MODES,
    "tp_size": TP_SIZES,
    "load_format": LOAD_FORMATS,
}

FLAG_ALIASES = {"tp_size": ("--tp",)}
# Flags that take more than their field: "auto" picks the device of the machine the command runs on, and
# `engine_fields_from_args` resolves it, so a config document always names its device.
FLAG_DEFAULTS = {"device": "auto"}
FLAG_CHOICES = {"device": DEVICE_CHOICES}
PLACEMENT_FIELDS = ("gpu_uuids", "device_ids")  # where the ranks run: a launcher's placement plan decides


def field_types() -> dict[str, object]:
    return typing.get_type_hints(EngineConfig)


def _optional_inner(hint):
    """`X | None` -> X; anything else -> None."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return inner[0] if len(inner) == 1 else None
    return None


def _has_type(value, hint) -> bool:
    inner = _optional_inner(hint)
    if inner is not None:
        return value is None or _has_type(value, inner)
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_has_type(v, item) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint) -> str:
    inner = _optional_inner(hint)
    if inner is not None:
        return f"{_type_name(inner)} or null"
    if typing.get_origin(hint) is list:
        return f"a list, each {_type_name(typing.get_args(hint)[0])}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def flag_name(name: str) -> str:
    """The flag that sets field `name`. A boolean that is on by default is turned off by
    `--disable-...`, the `enable_` prefix dropped: enable_prefix_caching -> --disable-prefix-caching."""
    dashed = name.replace("_", "-")
    if field_types()[name] is bool and EngineConfig.__dataclass_fields__[name].default is True:
        return "--disable-" + dashed.removeprefix("enable-")
    return "--" + dashed


def _comma_list(item_type):
    def parse(text: str) -> list:
        try:
            return [item_type(part.strip()) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated list of "
                                             f"{item_type.__name__}") from None

    parse.__name__ = f"comma-separated {item_type.__name__} list"
    return parse


def _field_default(name: str):
    spec = EngineConfig.__dataclass_fields__[name]
    if spec.default is not dataclasses.MISSING:
        return spec.default
    if spec.default_factory is not dataclasses.MISSING:
        return spec.default_factory()
    return None


def add_engine_arguments(parser: argparse.ArgumentParser, *, exclude: tuple[str, ...] = (),
                         several: tuple[str, ...] = (), defaults: dict | None = None,
                         model_required: bool = True) -> None:
    """One flag per EngineConfig field (less `exclude`), named by `flag_name`, typed by the field,
    helped by FIELD_HELP, defaulting to the field's default (or `defaults`). A field in `several`
    takes a comma-separated list of values (one engine config each, e.g. `tpfleet warmup --tp 1,2`)."""
    defaults = defaults or {}
    hints = field_types()
    group = parser.add_argument_group("engine", "engine settings (EngineConfig fields)")
    for name, hint in hints.items():
        if name in exclude:
            continue
        flags = (flag_name(name), *FLAG_ALIASES.get(name, ()))
        default = defaults.get(name, FLAG_DEFAULTS.get(name, _field_default(name)))
        text = FIELD_HELP[name]
        choices = FLAG_CHOICES.get(name, FIELD_CHOICES.get(name))
        item = _optional_inner(hint) or hint
        if name in several:
            group.add_argument(*flags, dest=name, type=_comma_list(item),
                               default=list(default) if isinstance(default, (list, tuple)) else [default],
                               help=f"{text}; comma-separated, one engine config each")
        elif hint is bool and _field_default(name) is True:
            group.add_argument(*flags, dest=name, action="store_false", default=default,
                               help=f"{text}; on (%(default)s) unless this flag is given")
        elif hint is bool:
            group.add_argument(*flags, dest=name, action="store_true", default=default, help=text)
        elif typing.get_origin(item) is list:
            group.add_argument(*flags, dest=name, type=_comma_list(typing.get_args(item)[0]), default=default,
                               help=text)
        else:
            required = name == "model" and model_required and default is None
            group.add_argument(*flags, dest=name, type=item, choices=choices, default=default, required=required,
                               help=text)


def engine_fields_from_args(args: argparse.Namespace) -> dict:
    """The EngineConfig fields present on a namespace parsed by `add_engine_arguments`, device resolved."""
    fields = {name: getattr(args, name) for name in field_types() if hasattr(args, name)}
    if fields.get("device") == "auto":
        fields["device"] = resolve_device("auto")
    return fields


def engine_config_from_args(args: argparse.Namespace, **overrides) -> EngineConfig:
    return EngineConfig.from_dict({**engine_fields_from_args(args), **overrides})


def non_default_fields(values: dict) -> dict:
    """The entries of `values` (EngineConfig fields) that differ from the fields' defaults."""
    return {name: value for name, value in values.items() if value != _field_default(name)}


def check_checkpoint_dir(path: str, load_format: str = "auto") -> None:
    """A ValueError naming `path` and what it lacks unless it is a local checkpoint directory an engine can
    load: tpfleet reads checkpoints from disk only, so a wrong path fails here, before any process starts.
    With load_format 'dummy' the weights are not read, so none need be there."""
    where = Path(path)
    if not where.exists():
        raise ValueError(f"--model {path}: no such directory (tpfleet loads local checkpoints only; a hub model "
                         f"must be downloaded first, e.g. `huggingface-cli download ORG/NAME --local-dir DIR`)")
    if not where.is_dir():
        raise ValueError(f"--model {path}: not a directory (give the checkpoint's directory)")
    if not (where / "config.json").is_file():
        raise ValueError(f"--model {path}: no config.json, so not a Hugging Face checkpoint directory")
    if load_format != "dummy":
        _check_weights(where, path)
    if not any((where / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise ValueError(f"--model {path}: no tokenizer (tokenizer.json or tokenizer_config.json)")


def _check_weights(where: Path, path: str) -> None:
    index = where / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, AttributeError) as error:
            raise ValueError(f"--model {path}: unreadable model.safetensors.index.json ({error!r})") from None
        missing = sorted(name for name in shards if not (where / name).is_file())
        if missing:
            raise ValueError(f"--model {path}: model.safetensors.index.json names missing shards: "
                             f"{', '.join(missing)}")
    elif not any(where.glob("*.safetensors")):
        raise ValueError(f"--model {path}: no *.safetensors weights (--load-format dummy runs its shapes with random "
                         "weights)")
