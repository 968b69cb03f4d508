"""A request as the engine sees it: sampling parameters and the growing token sequence."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch


class InvalidRequest(ValueError):
    """Bad client input. `field` names the offending parameter so the server can say which."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def verify(self, vocab_size: int, prefix: str = "sampling_params") -> None:
        def bad(name: str, msg: str) -> InvalidRequest:
            return InvalidRequest(f"{prefix}.{name}", msg)

        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise bad("max_new_tokens", f"must be a positive integer, got {self.max_new_tokens!r}")
        if not 0.0 <= self.temperature <= 100.0:
            raise bad("temperature", f"must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k != -1 and self.top_k < 1:
            raise bad("top_k", f"must be -1 (off) or >= 1, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", f"must be in [0, 1], got {self.min_p}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise bad("seed", f"must be in [0, 2**63), got {self.seed}")
        for t in self.stop_token_ids:
            if not 0 <= t < vocab_size:
                raise bad("stop_token_ids", f"token id {t} is outside the vocabulary [0, {vocab_size})")
        if any(not s for s in self.stop):
            raise bad("stop", "stop strings must be non-empty")


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, rid: str, prompt_ids: list[int], params: SamplingParams, eos_ids: tuple[int, ...],
                 max_len: int, device: torch.device):
        self.rid = rid
        self.token_ids = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.params = params
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))
        self.max_len = max_len
        self.status = SequenceStatus.WAITING
        self.num_pending = 0  # tokens sampled on the device but not yet read back (overlap schedule)
        self.num_computed_tokens = 0  # tokens whose KV is in the cache
        self.num_cached_tokens = 0  # of those, tokens found in the prefix cache at admission
        self.block_table: list[int] = []
        self.num_hashed_blocks = 0  # leading blocks registered in the prefix cache
        self.num_preemptions = 0
        self.output_text = ""
        self.finish_reason: dict | None = None
        self.arrival_time = time.perf_counter()
        self.first_token_time: float | None = None
        self.generator = None
        if params.seed is not None and not params.greedy:
            self.generator = torch.Generator(device=device).manual_seed(params.seed)

    @property
    def num_tokens(self) -> int:
        """Tokens the scheduler plans with: the known ones and those still pending on the device."""
        return len(self.token_ids) + self.num_pending

    def reaches_length(self, num_tokens: int) -> bool:
        """Whether `num_tokens` tokens are all this sequence may have: max_new_tokens or the context."""
        return num_tokens - self.num_prompt_tokens >= self.params.max_new_tokens or num_tokens >= self.max_len

    @property
    def completion_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
