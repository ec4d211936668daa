"""Wire types of the OpenAI-compatible API (msgspec Structs), with their bounds.

Requests forbid unknown fields: a parameter we do not know is a 400 that names it, never silently
ignored. Parameters we know but do not implement yet (tools, json response formats, ...) are
declared so that `unsupported.py` can reject them with a message that says so.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from app.engine.request import MAX_LOGPROBS, MAX_N

MAX_STOP = 16  # stop strings per request
MAX_STOP_TOKEN_IDS = 64
MAX_LOGIT_BIAS = 300  # OpenAI's own bound on logit_bias entries
MAX_PROMPTS = 64  # prompts in one /v1/completions request

N = Annotated[int, Meta(ge=1, le=MAX_N, description=f"How many choices to generate (1..{MAX_N}).")]
Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, Meta(gt=0.0, le=1.0)]
TopK = Annotated[int, Meta(ge=-1, le=1_000_000, description="-1 or 0: off.")]
MinP = Annotated[float, Meta(ge=0.0, le=1.0)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
RepetitionPenalty = Annotated[float, Meta(gt=0.0, le=2.0)]
MaxTokens = Annotated[int, Meta(ge=1, le=1 << 24)]
MinTokens = Annotated[int, Meta(ge=0, le=1 << 24)]
Seed = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]
TokenId = Annotated[int, Meta(ge=0, le=2**31 - 1)]
LogitBias = Annotated[
    dict[str, Annotated[float, Meta(ge=-100.0, le=100.0)]],
    Meta(max_length=MAX_LOGIT_BIAS, description="Token id (as a string) -> bias in [-100, 100]."),
]
Stop = str | Annotated[list[str], Meta(max_length=MAX_STOP)]
StopTokenIds = Annotated[list[TokenId], Meta(max_length=MAX_STOP_TOKEN_IDS)]


class _Request(Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of request bodies: unknown fields are an error."""


class StreamOptions(_Request, kw_only=True):
    include_usage: bool = False


class ResponseFormat(_Request, kw_only=True):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Any = None


class _SamplingFields(_Request, kw_only=True):
    """Fields shared by /v1/completions and /v1/chat/completions (OpenAI's and vLLM's extras)."""

    model: str | None = None
    n: N = 1
    temperature: Temperature | None = None
    top_p: TopP | None = None
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    logit_bias: LogitBias | None = None
    seed: Seed | None = None
    stop: Stop | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    # vLLM's extras
    top_k: TopK | None = None
    min_p: MinP | None = None
    repetition_penalty: RepetitionPenalty | None = None
    min_tokens: MinTokens = 0
    ignore_eos: bool = False
    stop_token_ids: StopTokenIds | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False


PromptItem = str | TokenId | Annotated[list[TokenId], Meta(min_length=1)]
Prompt = Annotated[str, Meta(max_length=8 << 20)] | Annotated[list[PromptItem], Meta(min_length=1, max_length=1 << 20)]


class CompletionRequest(_SamplingFields, kw_only=True):
    prompt: Prompt
    max_tokens: MaxTokens | None = 16
    echo: bool = False
    logprobs: Annotated[int, Meta(ge=0, le=MAX_LOGPROBS)] | None = None
    best_of: Annotated[int, Meta(ge=1, le=MAX_N)] | None = None
    suffix: str | None = None
    add_special_tokens: bool = True


class TextPart(Struct, forbid_unknown_fields=True, kw_only=True):
    """One part of a message's content. Only `text` parts are served; others get a 400."""

    type: Literal["text", "image_url", "input_audio", "file", "refusal"]
    text: str | None = None
    image_url: Any = None
    input_audio: Any = None
    file: Any = None
    refusal: str | None = None


class ChatMessage(Struct, forbid_unknown_fields=True, kw_only=True):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    # What clients send back when they append an assistant message they received; only
    # meaningful values are rejected (we serve no tools).
    refusal: str | None = None
    annotations: list[Any] | None = None
    audio: Any = None
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None
    function_call: Any = None
    reasoning_content: str | None = None


class ChatCompletionRequest(_SamplingFields, kw_only=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1, max_length=100_000)]
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Meta(ge=0, le=MAX_LOGPROBS)] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    # vLLM's chat extras
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template_kwargs: dict[str, Any] | None = None


class TokenizeRequest(_Request, kw_only=True):
    """Either `prompt` (a completion prompt) or `messages` (a chat, rendered by the template)."""

    model: str | None = None
    prompt: Annotated[str, Meta(max_length=8 << 20)] | None = None
    messages: Annotated[list[ChatMessage], Meta(min_length=1)] | None = None
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(_Request, kw_only=True):
    model: str | None = None
    tokens: Annotated[list[TokenId], Meta(max_length=1 << 20)]


# Checked by the route, whose 400 says the rule (a regex in msgspec's message would not).
AdapterName = Annotated[str, Meta(min_length=1, max_length=256, description="The adapter's name in `model`.")]


class LoadLoRAAdapterRequest(_Request, kw_only=True):
    """vLLM's body. Loading a name that is loaded replaces it (a new version); `load_inplace` is accepted."""

    lora_name: AdapterName
    lora_path: Annotated[str, Meta(min_length=1, max_length=4096)]
    load_inplace: bool = False


class UnloadLoRAAdapterRequest(_Request, kw_only=True):
    lora_name: AdapterName
    lora_int_id: int | None = None  # vLLM's; ignored


# ---- responses ------------------------------------------------------------------------------


class PromptTokensDetails(Struct):
    cached_tokens: int = 0


class Usage(Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(Struct):
    text_offset: list[int] = msgspec.field(default_factory=list)
    token_logprobs: list[float | None] = msgspec.field(default_factory=list)
    tokens: list[str] = msgspec.field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = msgspec.field(default_factory=list)


class CompletionChoice(Struct):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | UnsetType | None = UNSET
    object: str = "text_completion"
    system_fingerprint: str | None = None


class TopLogprob(Struct):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprobToken(Struct):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = msgspec.field(default_factory=list)


class ChatLogprobs(Struct):
    content: list[ChatLogprobToken] | None = None
    refusal: list[ChatLogprobToken] | None = None


class AssistantMessage(Struct):
    content: str | None
    role: str = "assistant"
    refusal: str | None = None
    tool_calls: list[Any] = msgspec.field(default_factory=list)


class ChatChoice(Struct):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    object: str = "chat.completion"
    system_fingerprint: str | None = None


class Delta(Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None


class ChatChunkChoice(Struct):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | UnsetType | None = UNSET


class ChatCompletionChunk(Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | UnsetType | None = UNSET
    object: str = "chat.completion.chunk"
    system_fingerprint: str | None = None


class ModelCard(Struct):
    id: str
    created: int
    owned_by: str = "vllm-mxext"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    object: str = "model"


class ModelList(Struct):
    data: list[ModelCard]
    object: str = "list"


class LoRAAdapterCard(Struct):
    name: str
    path: str
    format: str
    rank: int
    target_modules: list[str]
    version: int
    tier: str  # "gpu": resident on the device; "cpu": in the host cache
    loaded_at: float
    requests_served: int
    object: str = "lora_adapter"


class LoRAAdapterList(Struct):
    data: list[LoRAAdapterCard]
    object: str = "list"


class TokenizeResponse(Struct):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | UnsetType = UNSET


class DetokenizeResponse(Struct):
    prompt: str


class ErrorInfo(Struct):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(Struct):
    error: ErrorInfo


class HealthResponse(Struct):
    message: str
    object: str = "health.response"


class VersionResponse(Struct):
    version: str
