"""Engine settings shared by every rank (they travel to worker processes as one picklable object)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class EngineConfig:
    model: str
    tp_size: int = 1
    ep_size: int = 1  # MoE: experts divided among this many of the tp_size ranks (1: every rank holds every expert)
    device: str = "cpu"  # "cpu" or "cuda"
    device_ids: list[int] = field(default_factory=list)  # local CUDA indices, one per rank; default 0..tp-1
    gpu_uuids: list[str] = field(default_factory=list)  # what each rank's device must be (from the placement plan)
    dtype: str = "auto"  # "auto" takes the checkpoint's dtype
    context_length: int | None = None  # default: the model's max_position_embeddings
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048  # per-step token budget, hence also the prefill chunk size
    kv_cache_tokens: int | None = None  # KV pool size; default: 65536 on CPU, mem_fraction_static on GPU
    mem_fraction_static: float = 0.85  # share of GPU memory for weights plus KV cache
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"  # "torch" (reference), "triton", or "auto": triton on GPUs, torch on CPUs
    graph_mode: str = "auto"  # "eager", "full" (decode graphs), "piecewise" (full plus piecewise); auto: full on GPU
    overlap_schedule: bool = True  # launch step N+1 before reading step N's tokens back: no GPU wait on the host
    enable_custom_all_reduce: bool = True
    enable_symm_mem: bool = True
    seed: int = 0
    enable_return_routed_experts: bool = False  # MoE routing replay: requests may ask for the experts chosen

    def __post_init__(self) -> None:
        if self.tp_size not in (1, 2, 4, 8):
            raise ValueError(f"tp_size must be 1, 2, 4 or 8, got {self.tp_size}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        for name in ("device_ids", "gpu_uuids"):
            if getattr(self, name) and len(getattr(self, name)) != self.tp_size:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries for tp_size {self.tp_size}")
        if self.graph_mode not in ("auto", "eager", "full", "piecewise"):
            raise ValueError(f"graph_mode must be auto, eager, full or piecewise, got {self.graph_mode!r}")
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
