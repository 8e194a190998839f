"""OpenAI wire format of the ingress: request/response models and `ErrorResponse` values.

    HTTP JSON -> ChatCompletionRequest / CompletionRequest (validated here) -> ingress -> tier
    tier/ingress -> ErrorResponse value -> ingress maps it to a status code and OpenAI error JSON

Requests are strict (a string where a number belongs is a 400, never coerced) and ignore unknown
top-level fields, as OpenAI does with vendor extensions. Bounds that protect the engine (seed range,
top_k, logprobs) are enforced here, before anything reaches a sampler. Response models document the
API in /openapi.json and type the tests; the ingress writes plain dicts on the hot path (choice
assembly from engine deltas is `choices.py`).

Extensions beyond OpenAI's API (all optional): requests take `heavy` (Heavy Mode), `thinking_budget`
and `reasoning_effort`; responses may carry `heavy` (the trajectories and how they were aggregated),
`context_management` (what was cut to fit the prompt) and, per choice, `tool_call_errors`; Heavy Mode
streams interleave `heavy_progress` chunks (with `choices: []`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

_INT64_MAX = 2**63 - 1
_MAX_TOP_LOGPROBS = 20  # OpenAI's limit, and SamplingParams'


# -- errors ---------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ErrorResponse:
    """An error as a value: engine-side code yields it, only the ingress turns it into a status code.

    `type`/`code` follow OpenAI's error JSON (`{"error": {"message", "type", "param", "code"}}`).
    """

    message: str
    type: str = "invalid_request_error"
    status_code: int = 400
    param: str | None = None
    code: str | None = None
    retry_after_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ErrorResponse:
    return ErrorResponse(message, "invalid_request_error", 400, param, code)


def unavailable(message: str, retry_after_s: float | None = None, status_code: int = 503) -> ErrorResponse:
    kind = "rate_limit_error" if status_code == 429 else "service_unavailable_error"
    return ErrorResponse(message, kind, status_code, None, "overloaded" if status_code == 429 else None,
                         retry_after_s)


def internal_error(message: str) -> ErrorResponse:
    return ErrorResponse(message, "server_error", 500)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """Every non-2xx answer of the ingress has this shape."""

    error: ErrorDetail


# -- requests -------------------------------------------------------------------------------------
def _integral(value: Any) -> Any:
    """JSON Schema counts 2.0 as an integer; strict pydantic would not. Other floats still fail."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    return value


Int = Annotated[int, BeforeValidator(_integral)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    type: Literal["text"] = "text"
    text: str


class FunctionCall(_Strict):
    name: str = Field(min_length=1)
    arguments: str | dict[str, Any] = Field(description="JSON string (OpenAI) or object.")


class ToolCall(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class _Message(_Strict):
    content: str | list[TextPart] | None = None
    name: str | None = None


class SystemMessage(_Message):
    role: Literal["system", "developer"]


class UserMessage(_Message):
    role: Literal["user"]


class AssistantTurn(_Message):
    role: Literal["assistant"]
    tool_calls: list[ToolCall] | None = None
    reasoning_content: str | None = Field(
        None, description="The turn's reasoning; K2 keeps it inside an unfinished tool-call turn.")


class ToolMessage(_Message):
    role: Literal["tool"]
    tool_call_id: str = Field(min_length=1)


ChatMessage = Annotated[SystemMessage | UserMessage | AssistantTurn | ToolMessage, Field(discriminator="role")]


class FunctionDef(_Strict):
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(_Strict):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedToolChoice(_Strict):
    type: Literal["function"] = "function"
    function: dict[str, Any]


class StreamOptions(_Strict):
    include_usage: bool = False


class HeavyOptions(_Strict):
    """The `heavy` extension field as an object; every key optional (server defaults: `serve.heavy`)."""

    trajectories: Int | None = Field(None, ge=1, le=256, description="Trajectories to roll out in parallel.")
    aggregate: Literal["vote", "reflect", "best_logprob"] | None = Field(
        None, description="vote: majority over extracted answers (ties: mean logprob); reflect: one more "
        "generation reads the candidates and answers; best_logprob: highest mean token logprob.")
    extractor: Literal["last_line", "boxed", "regex"] | None = Field(
        None, description="How vote extracts a trajectory's final answer from its content.")
    extractor_regex: str | None = Field(None, max_length=256, description="Pattern for extractor 'regex'.")


def _heavy_flag(value: Any) -> Any:
    """`heavy: true` means the server's defaults, `false` the default (off); objects pass through.

    One type rather than a `bool | object` union, so an error names the bad key (`heavy.trajectories`)
    instead of the boolean branch.
    """
    if value is True:
        return {}
    return None if value is False else value


class _SamplingFields(_Strict):
    model: str | None = Field(None, description="Served model id (see /v1/models); default: the one model.")
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: Int | None = Field(None, ge=-1, le=1 << 30, description="Vendor extension; 0 or -1 = off.")
    min_p: float | None = Field(None, ge=0, le=1, description="Vendor extension.")
    n: Int = Field(1, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: Int | None = Field(None, ge=-(2**63), le=_INT64_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=10, description="Vendor extension.")
    ignore_eos: bool = Field(False, description="Vendor extension: keep generating past end-of-turn tokens.")
    min_tokens: Int = Field(0, ge=0, description="Vendor extension: end-of-turn and stop tokens cannot be sampled "
                            "before this many output tokens (at most max_tokens).")
    skip_special_tokens: bool = Field(True, description="Vendor extension: drop special tokens from text.")
    return_token_ids: bool = Field(
        False, description="Vendor extension: add prompt_token_ids and per-choice token_ids to the response.")
    user: str | None = None
    thinking_budget: Int | None = Field(
        None, ge=1, description="Vendor extension: most reasoning tokens; the engine then closes `</think>` "
        "and the answer follows (within max_tokens).")
    reasoning_effort: Literal["low", "medium", "high"] | None = Field(
        None, description="Thinking budget by name (sizes set by the server); thinking_budget wins.")


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="'auto' (default with tools) or 'none'; 'required' and named choices are not supported.")
    parallel_tool_calls: bool | None = None
    max_tokens: Int | None = Field(None, ge=1, description="Deprecated OpenAI name of max_completion_tokens.")
    max_completion_tokens: Int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Int | None = Field(None, ge=0, le=_MAX_TOP_LOGPROBS)
    heavy: Annotated[HeavyOptions | None, BeforeValidator(_heavy_flag)] = Field(
        None, description="Vendor extension: Heavy Mode (also selected by the model alias `<model>-heavy`): "
        "roll out several trajectories over the model replicas and aggregate them into one answer. "
        "An object, or `true` for the server's defaults. Not with n > 1 or tools.")


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[Int] | list[list[Int]] = Field(
        description="Text, a batch of texts, token ids, or a batch of token-id lists.")
    max_tokens: Int | None = Field(None, ge=1)
    logprobs: Int | None = Field(None, ge=0, le=_MAX_TOP_LOGPROBS)
    echo: bool = Field(False, description="Not supported (needs prompt logprobs).")
    suffix: str | None = Field(None, description="Not supported.")
    best_of: Int | None = Field(None, ge=1, description="Only best_of == n is supported.")


# -- responses ------------------------------------------------------------------------------------
class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class FunctionOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionOut


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class ToolCallError(BaseModel):
    """A generated tool call that was not executable (rendered into `content` instead)."""

    index: int | None
    name: str
    kind: Literal["undeclared_tool", "invalid_json", "schema_violation"]
    message: str


class ChatChoice(BaseModel):
    index: int
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None
    token_ids: list[int] | None = None
    tool_call_errors: list[ToolCallError] | None = None


class HeavyTrajectory(BaseModel):
    index: int
    answer: str | None
    num_tokens: int
    mean_logprob: float | None
    replica: str | None
    finish_reason: str | None


class HeavySummary(BaseModel):
    """How a Heavy Mode answer was made: `winner` is the chosen trajectory (None after reflect)."""

    aggregate: Literal["vote", "reflect", "best_logprob"]
    winner: int | None
    trajectories: list[HeavyTrajectory]
    tally: dict[str, int] | None = None


class ContextManagement(BaseModel):
    """What context management did to fit the prompt (present only when it changed something)."""

    strategy: str
    truncated_tool_results: int
    dropped_messages: int
    original_tokens: int
    final_tokens: int


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_token_ids: list[int] | None = None
    heavy: HeavySummary | None = None
    context_management: ContextManagement | None = None


class ToolCallDeltaOut(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: dict[str, str] | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDeltaOut] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None
    tool_call_errors: list[ToolCallError] | None = None


class ChatCompletionChunk(BaseModel):
    """One SSE `data:` event of a streamed chat completion; the stream ends with `data: [DONE]`."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    heavy_progress: dict[str, Any] | None = Field(
        None, description="Heavy Mode progress event (with `choices: []`): trajectory_started, "
        "trajectory_finished, aggregating.")
    heavy: HeavySummary | None = None
    context_management: ContextManagement | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    token_ids: list[int] | None = None


class CompletionResponse(BaseModel):
    """Also the shape of each streamed chunk (with partial `text`), as in OpenAI's API."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "raymoe"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
