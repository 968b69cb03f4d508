"""Request bodies. Unknown fields are rejected (`extra="forbid"`) so a typo never silently does nothing."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tpfleet.engine.sequence import SamplingParams


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _sampling_params(body, max_new_tokens: int) -> SamplingParams:
    """The engine's parameters from either API's body; the fields share names but for the token limit."""
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return SamplingParams(max_new_tokens, body.temperature, body.top_p, body.top_k, body.min_p, body.seed, stop,
                          list(body.stop_token_ids or []), body.ignore_eos)


class SamplingParamsBody(Strict):
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False

    def to_params(self) -> SamplingParams:
        return _sampling_params(self, self.max_new_tokens)


class GenerateRequest(Strict):
    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: SamplingParamsBody | list[SamplingParamsBody] = Field(default_factory=SamplingParamsBody)
    stream: bool = False
    rid: str | list[str] | None = None


class AbortRequest(Strict):
    rid: str | None = None
    abort_all: bool = False


class OpenAISampling(Strict):
    """Fields common to /v1/completions and /v1/chat/completions."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    n: int = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: dict | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None

    def to_params(self, default_max_tokens: int) -> SamplingParams:
        return _sampling_params(self, self.max_tokens if self.max_tokens is not None else default_max_tokens)


class CompletionRequest(OpenAISampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: str
    name: str | None = None


class ChatCompletionRequest(OpenAISampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False


class MemoryOccupationRequest(Strict):
    tags: list[Literal["kv_cache", "weights"]] = Field(default_factory=lambda: ["kv_cache", "weights"])


class UpdateWeightsFromDiskRequest(Strict):
    model_path: str
    load_format: str | None = None


class UpdateWeightsFromTensorRequest(Strict):
    serialized_named_tensors: list[str]  # one for every rank, or one per rank
    load_format: str | None = None
    flush_cache: bool = True
