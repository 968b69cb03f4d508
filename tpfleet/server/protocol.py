"""Request bodies. Every field SGLang's /generate knows is accepted, any optional one as JSON null; a key
SGLang does not know either is a 400 (`extra="forbid"`), so a typo never silently does nothing."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, create_model, model_validator

from tpfleet.engine.sequence import InvalidRequest, OutputOptions, SamplingParams
from tpfleet.memory.tags import TAGS

# Routes that change the engine's state or weights: the admin API key guards them (tpfleet.server.guard).
ADMIN_ROUTES: tuple[str, ...] = (
    "/abort_request",
    "/pause_generation",
    "/continue_generation",
    "/flush_cache",
    "/update_weight_version",
    "/release_memory_occupation",
    "/resume_memory_occupation",
    "/update_weights_from_disk",
    "/update_weights_from_tensor",
    "/init_weights_update_group",
    "/update_weights_from_distributed",
    "/destroy_weights_update_group",
)

PAUSE_MODES = ("abort", "retract", "in_place")
TOP_K_ALL = 1 << 30  # SGLang's spelling of "the whole vocabulary"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ControlBody(Strict):
    """The body of a control or weight route. It also takes the keys a proxy adds to every request
    (ignored), and JSON null for any key that has a default, which then applies."""

    model: Any = None
    log_metrics: Any = None
    return_text_in_logprobs: Any = None
    custom_params: Any = None

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {key: value for key, value in data.items()
                if value is not None or key not in fields or fields[key].is_required()}


def _is_unset(value: object, default: object) -> bool:
    return value is None or value == default or (isinstance(value, (list, dict, str)) and not value)


def _strict_with_unsupported(name: str, base: type[Strict], unsupported: dict[str, object]) -> type[Strict]:
    """`base` plus an API's fields tpfleet does not implement, each accepted while it holds its default (see
    `check_unsupported`)."""
    return create_model(name, __base__=base, **{field: (Any, None) for field in unsupported})


def check_unsupported(body: BaseModel, unsupported: dict[str, object], prefix: str = "", api: str = "SGLang") -> None:
    for field, default in unsupported.items():
        if not _is_unset(getattr(body, field), default):
            raise InvalidRequest(prefix + field, f"tpfleet does not support this {api} field; leave it unset or null")


# SGLang sampling fields with no tpfleet implementation, and the value that means "off".
UNSUPPORTED_SAMPLING: dict[str, object] = {
    "stop_regex": None, "json_schema": None, "regex": None, "ebnf": None, "structural_tag": None, "beam_width": 1,
}


class _SamplingFields(Strict):
    max_new_tokens: int | None = 128  # null: as many as the context leaves
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    min_new_tokens: int | None = None
    n: int | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    no_stop_trim: bool | None = None
    logit_bias: dict[str, float] | None = None
    sampling_seed: int | None = None
    seed: int | None = None  # tpfleet's own name for sampling_seed
    custom_params: dict[str, Any] | None = None  # read only by custom logit processors, which tpfleet lacks
    stream_interval: int | None = None  # tpfleet streams every token

    def to_params(self, prompt_len: int, context_length: int, vocab_size: int, prefix: str) -> SamplingParams:
        check_unsupported(self, UNSUPPORTED_SAMPLING, prefix + ".")
        if self.seed is not None and self.sampling_seed is not None and self.seed != self.sampling_seed:
            raise InvalidRequest(f"{prefix}.sampling_seed", "differs from seed; give one of them")
        top_k = -1 if self.top_k is None or self.top_k >= min(TOP_K_ALL, vocab_size) else self.top_k
        max_new = self.max_new_tokens if self.max_new_tokens is not None else max(0, context_length - prompt_len)
        seed = self.sampling_seed if self.sampling_seed is not None else self.seed
        return _engine_params(self, max_new, top_k, seed, _or(self.min_new_tokens, 0), f"{prefix}.logit_bias",
                              no_stop_trim=_or(self.no_stop_trim, False))


def _or(value, default):
    return default if value is None else value


def _engine_params(body, max_new_tokens: int, top_k: int, seed: int | None, min_new_tokens: int, bias_field: str,
                   no_stop_trim: bool = False) -> SamplingParams:
    """The engine's parameters from either API's body: the fields they share by name, nulls as defaults;
    the caller gives those the two APIs name or bound differently."""
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=_or(body.temperature, 1.0),
        top_p=_or(body.top_p, 1.0),
        top_k=top_k,
        min_p=_or(body.min_p, 0.0),
        seed=seed,
        stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or []),
        stop_token_ids=list(body.stop_token_ids or []),
        ignore_eos=_or(body.ignore_eos, False),
        repetition_penalty=_or(body.repetition_penalty, 1.0),
        frequency_penalty=_or(body.frequency_penalty, 0.0),
        presence_penalty=_or(body.presence_penalty, 0.0),
        min_new_tokens=min_new_tokens,
        skip_special_tokens=_or(body.skip_special_tokens, True),
        spaces_between_special_tokens=_or(body.spaces_between_special_tokens, True),
        no_stop_trim=no_stop_trim,
        logit_bias=_token_bias(body.logit_bias, bias_field),
    )


def _token_bias(bias: dict[str, float] | None, field: str) -> dict[int, float] | None:
    if not bias:
        return None
    bad = next((token for token in bias if not (token.isascii() and token.isdigit())), None)
    if bad is not None:  # int() would also take "1_0", " 10" or "+10"
        raise InvalidRequest(field, f"keys must be token ids written in decimal digits, got {bad!r}")
    return {int(token): value for token, value in bias.items()}


SamplingParamsBody = _strict_with_unsupported("SamplingParamsBody", _SamplingFields, UNSUPPORTED_SAMPLING)

# SGLang /generate fields with no tpfleet implementation, and the value that means "off".
UNSUPPORTED_GENERATE: dict[str, object] = {
    "input_embeds": None, "image_data": None, "video_data": None, "audio_data": None, "mm_hashes": None,
    "mm_content_hashes": None, "use_audio_in_video": False, "video_config": None, "modalities": None,
    "token_ids_logprob": None, "return_sampling_mask": False, "return_flat_raw_top_logprobs": False,
    "return_flat_raw_top_logprobs_b64": False, "return_hidden_states": False, "return_indexer_topk": False,
    "session_params": None, "lora_path": None, "lora_id": None, "custom_logit_processor": None,
    "positional_embed_overrides": None, "bootstrap_host": None, "bootstrap_port": None, "bootstrap_room": None,
    "bootstrap_pair_key": None, "decode_tp_size": None, "disagg_prefill_dp_rank": None, "background": False,
    "require_reasoning": False, "max_thinking_tokens": None, "priority": None, "extra_key": None,
    "cache_salt": None, "return_bytes": False, "return_entropy": False, "return_prompt_token_ids": False,
    "need_wait_for_mm_inputs": None, "num_items_assigned": None, "encoder_urls": None,
    "max_dynamic_patch": None, "min_dynamic_patch": None, "image_max_dynamic_patch": None,
    "video_max_dynamic_patch": None, "images_config": None, "multi_item_delimiter_indices": None,
    "routed_dp_rank": 0, "data_parallel_rank": 0,  # one data-parallel rank: 0 is the only one there is
}


class _GenerateFields(Strict):
    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: SamplingParamsBody | list[SamplingParamsBody] | None = None
    rid: str | list[str] | None = None
    stream: bool | None = False
    return_logprob: bool | list[bool] | None = None
    logprob_start_len: int | list[int] | None = None
    top_logprobs_num: int | list[int] | None = None
    return_text_in_logprobs: bool | None = None
    return_routed_experts: bool | None = None
    routed_experts_start_len: int | None = None
    # Labels for logs, metrics and routers in front: they change nothing about the answer.
    log_metrics: bool | None = None
    session_id: str | None = None
    conversation_id: str | None = None
    routing_key: str | None = None
    kv_router_hint: dict | None = None
    custom_labels: dict[str, str] | None = None
    no_logs: bool | None = None
    external_trace_header: dict | None = None
    received_time: float | None = None
    http_worker_ipc: str | None = None
    model: str | None = None  # added by OpenAI-style proxies
    custom_params: dict[str, Any] | None = None  # some proxies lift it out of sampling_params


GenerateRequest = _strict_with_unsupported("GenerateRequest", _GenerateFields, UNSUPPORTED_GENERATE)


def output_options(req: BaseModel, index: int, num_prompts: int) -> OutputOptions:
    """The `index`-th prompt's logprob and routing options; each may be one value or one per prompt."""
    def pick(field: str, default):
        value = getattr(req, field)
        if isinstance(value, list):
            if len(value) != num_prompts:
                raise InvalidRequest(field, f"has {len(value)} entries for {num_prompts} prompts")
            value = value[index]
        return default if value is None else value

    return OutputOptions(return_logprob=pick("return_logprob", False), logprob_start_len=pick("logprob_start_len", -1),
                         top_logprobs_num=pick("top_logprobs_num", 0),
                         return_routed_experts=bool(req.return_routed_experts))


class AbortRequest(ControlBody):
    rid: str | None = None
    abort_all: bool | None = False
    abort_message: str | None = None
    finished_reason: dict | None = None
    http_worker_ipc: str | None = None


class PauseRequest(ControlBody):
    mode: Literal["abort", "retract", "in_place"] | None = "abort"
    rid: str | list[str] | None = None  # SGLang's id of this control request itself
    http_worker_ipc: str | None = None


class ContinueRequest(ControlBody):
    torch_empty_cache: bool | None = None  # tpfleet's allocator keeps nothing worth returning here
    rid: str | list[str] | None = None
    http_worker_ipc: str | None = None


class WeightVersionRequest(ControlBody):
    new_version: str
    abort_all_requests: bool | None = False
    rid: str | None = None


class MemoryOccupationRequest(ControlBody):
    tags: list[Literal[TAGS]] | None = None  # null: every tag

    @property
    def selected(self) -> list[str]:
        return list(TAGS) if self.tags is None else [t for t in TAGS if t in self.tags]


class OpenAISampling(Strict):
    """Fields common to /v1/completions and /v1/chat/completions."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    top_k: int | None = -1
    min_p: float | None = 0.0
    n: int | None = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = False
    stream: bool | None = False
    stream_options: dict | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    repetition_penalty: float | None = 1.0
    min_tokens: int | None = 0
    skip_special_tokens: bool | None = True
    spaces_between_special_tokens: bool | None = True
    logit_bias: dict[str, float] | None = None
    include_stop_str_in_output: bool | None = False  # vLLM's name for SGLang's no_stop_trim
    return_tokens_as_token_ids: bool | None = False  # vLLM's: logprobs name each token "token_id:<id>"
    # OpenAI's bookkeeping fields: accepted, as its API takes them, and they change nothing here
    user: str | None = None
    metadata: dict | None = None
    store: bool | None = None
    service_tier: str | None = None

    def to_params(self, default_max_tokens: int) -> SamplingParams:
        max_new = self.max_tokens if self.max_tokens is not None else default_max_tokens
        seed = None if self.seed is None else self.seed % 2**63  # OpenAI and vLLM take any 64-bit seed
        return _engine_params(self, max_new, _or(self.top_k, -1), seed, _or(self.min_tokens, 0), "logit_bias",
                              no_stop_trim=bool(self.include_stop_str_in_output))


# OpenAI fields with no tpfleet implementation (structured output, tools, ...), and the value that means "off".
UNSUPPORTED_OPENAI: dict[str, object] = {
    "response_format": {"type": "text"}, "tools": None, "tool_choice": "none", "parallel_tool_calls": None,
    "functions": None, "function_call": "none", "suffix": None, "best_of": 1, "modalities": None, "audio": None,
    "prediction": None, "reasoning_effort": None,
}


class _CompletionFields(OpenAISampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    logprobs: int | None = None


class ContentPart(BaseModel):
    """One part of a message's content given as a list; this engine serves text, so only text parts are taken."""
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None  # None: an assistant turn that only called tools
    name: str | None = None
    tool_calls: list[dict] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    def for_template(self, field: str) -> dict:
        """The message as chat templates take it: content as one string (text parts joined by newlines, as
        vLLM joins them for string-content templates), a developer message as the system message it replaces."""
        message = self.model_dump(exclude_none=True)
        if self.role == "developer":
            message["role"] = "system"
        if isinstance(self.content, list):
            other = next((part.type for part in self.content if part.type != "text" or part.text is None), None)
            if other is not None:
                raise InvalidRequest(f"{field}.content", f"this engine serves a text-only model; a {other!r} part "
                                                         "(or a text part without text) cannot be taken")
            message["content"] = "\n".join(part.text for part in self.content)
        elif self.content is None:
            message["content"] = ""
        return message


class _ChatCompletionFields(OpenAISampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    add_generation_prompt: bool | None = True
    continue_final_message: bool | None = False
    chat_template_kwargs: dict[str, Any] | None = None  # e.g. {"enable_thinking": false} for Qwen3


CompletionRequest = _strict_with_unsupported("CompletionRequest", _CompletionFields, UNSUPPORTED_OPENAI)
ChatCompletionRequest = _strict_with_unsupported("ChatCompletionRequest", _ChatCompletionFields, UNSUPPORTED_OPENAI)
