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
    repetition_penalty: float = 1.0  # > 1 discourages every token already in the prompt or the output
    frequency_penalty: float = 0.0  # subtracted once per occurrence in the output
    presence_penalty: float = 0.0  # subtracted once if present in the output
    min_new_tokens: int = 0  # stop tokens are masked, and stop strings ignored, until this many are out
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True  # SGLang's field; fast tokenizers decode without it
    no_stop_trim: bool = False
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        """Penalties read the sequence's earlier tokens, so its pending token must be on the host first."""
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    @property
    def filters(self) -> bool:
        """Whether sampling keeps only part of the vocabulary (top-k above 1, top-p, min-p)."""
        return self.top_k > 1 or self.top_p < 1.0 or self.min_p > 0.0

    @property
    def adjusts_logits(self) -> bool:
        """Whether the logits are changed before sampling (then greedy is not the raw argmax)."""
        return self.has_penalties or self.min_new_tokens > 0 or bool(self.logit_bias)

    def verify(self, vocab_size: int, prefix: str = "sampling_params") -> None:
        """max_new_tokens may be 0, as in SGLang: a prefill only, which scores the prompt from
        logprob_start_len when asked to, and leaves its prefix in the cache."""
        def bad(name: str, msg: str) -> InvalidRequest:
            return InvalidRequest(f"{prefix}.{name}", msg)

        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise bad("max_new_tokens", f"must be an integer >= 0, got {self.max_new_tokens!r}")
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
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise bad("repetition_penalty", f"must be in (0, 2], got {self.repetition_penalty}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise bad("frequency_penalty", f"must be in [-2, 2], got {self.frequency_penalty}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise bad("presence_penalty", f"must be in [-2, 2], got {self.presence_penalty}")
        if not isinstance(self.min_new_tokens, int) or self.min_new_tokens < 0:
            raise bad("min_new_tokens", f"must be a non-negative integer, got {self.min_new_tokens!r}")
        if self.min_new_tokens > self.max_new_tokens:
            raise bad("min_new_tokens", f"{self.min_new_tokens} exceeds max_new_tokens ({self.max_new_tokens})")
        for token, bias in (self.logit_bias or {}).items():
            if not isinstance(token, int) or not 0 <= token < vocab_size:
                raise bad("logit_bias", f"token id {token!r} is outside the vocabulary [0, {vocab_size})")
            if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100.0 <= bias <= 100.0:
                raise bad("logit_bias", f"bias {bias} for token {token} is outside [-100, 100]")


@dataclass
class OutputOptions:
    """What a request wants back besides tokens and text."""
    return_logprob: bool = False
    logprob_start_len: int = -1  # >= 0: also the logprobs of the prompt from this position on
    top_logprobs_num: int = 0  # the k most likely tokens at each position (with return_logprob)
    return_routed_experts: bool = False  # MoE: the experts each layer chose for every position

    @property
    def wants_input_logprobs(self) -> bool:
        return self.return_logprob and self.logprob_start_len >= 0


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, rid: str, prompt_ids: list[int], params: SamplingParams, eos_ids: tuple[int, ...],
                 max_len: int, device: torch.device, options: OutputOptions | None = None):
        self.rid = rid
        self.token_ids = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.params = params
        self.options = options or OutputOptions()
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))
        self.block_hashes: list[bytes] = []  # chain hashes of leading full blocks, extended as needed
        # Logprobs, cumulative and read back with the tokens (see tpfleet.engine.sampler)
        self.output_logprobs: list[float] = []
        self.output_top_logprobs: list[list[tuple[float, int]]] = []
        wants_input = self.options.wants_input_logprobs
        self.input_logprobs: list[float | None] = [None] if wants_input else []
        self.input_top_logprobs: list[list[tuple[float, int]]] = [[]] if wants_input else []
        # The next prompt position whose logits score the token after it: launched steps cover those before
        self.next_scored_position = self.options.logprob_start_len if wants_input else self.num_prompt_tokens
        self.weight_version = "default"
        self.routed_experts: bytes | None = None
        self.max_len = max_len
        self.status = SequenceStatus.WAITING
        self.num_pending = 0  # tokens sampled on the device but not yet read back (overlap schedule)
        self.num_computed_tokens = 0  # tokens whose KV is in the cache
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at its last admission before a token
        self.block_table: list[int] = []
        self.num_hashed_blocks = 0  # leading blocks registered in the prefix cache
        self.cache_generation = 0  # the block manager's generation when this sequence was admitted
        self.num_preemptions = 0
        self.output_text = ""
        self.finish_reason: dict | None = None
        self.arrival_time = time.perf_counter()
        self.first_token_time: float | None = None
        # The batch-wide argmax fast path serves it: greedy, logits untouched, no logprobs wanted
        self.plain_greedy = params.greedy and not params.adjusts_logits and not self.options.return_logprob
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
    def scores_prompt(self) -> bool:
        """Whether prompt positions still need their logits (input logprobs not all launched yet)."""
        return self.next_scored_position < self.num_prompt_tokens - 1

    @property
    def completion_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
