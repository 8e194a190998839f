"""OpenAI wire format of the ingress: request/response models, `ErrorResponse`, and choice assembly.

    HTTP JSON -> ChatCompletionRequest / CompletionRequest (validated here) -> ingress -> tier
    tier/ingress -> ErrorResponse value -> ingress maps it to a status code and OpenAI error JSON
    engine deltas -> ChatChoiceState / TextChoiceState (K2 parsing, logprobs) -> OpenAI choice dicts

Requests are strict (a string where a number belongs is a 400, never coerced) and ignore unknown
top-level fields, as OpenAI does with vendor extensions. Bounds that protect the engine (seed range,
top_k, logprobs) are enforced here, before anything reaches a sampler. Response models document the
API in /openapi.json and type the tests; the ingress writes plain dicts on the hot path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from raymoe.serve.parsers import DeltaMessage, K2StreamParser

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
    skip_special_tokens: bool = Field(True, description="Vendor extension: drop special tokens from text.")
    return_token_ids: bool = Field(
        False, description="Vendor extension: add prompt_token_ids and per-choice token_ids to the response.")
    user: str | None = None


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


class ChatChoice(BaseModel):
    index: int
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None
    token_ids: list[int] | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_token_ids: list[int] | None = None


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


class ChatCompletionChunk(BaseModel):
    """One SSE `data:` event of a streamed chat completion; the stream ends with `data: [DONE]`."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


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


# -- engine deltas -> OpenAI choices ---------------------------------------------------------------
_MIN_LOGPROB = -9999.0  # JSON has no -inf; vLLM clamps the same way


class TokenText:
    """Token id -> its text and bytes for logprobs, cached (at most one entry per vocabulary id)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text


def _lp(value: float) -> float:
    return max(float(value), _MIN_LOGPROB)


def _top(logprobs: dict[int, float], num: int) -> list[tuple[int, float]]:
    return sorted(logprobs.items(), key=lambda kv: -kv[1])[:num]


class ReasoningOnlyParser:
    """Splits reasoning from content without parsing tool calls (requests without tools, or tool_choice none).

    Same reasoning rules as `K2StreamParser(expect_reasoning=True)`: an optional leading `<think>`,
    reasoning until `</think>` or a tool-call section; then everything is content, verbatim,
    tool-call markup included (what vLLM returns when no tool parser runs).
    """

    _ENDS = ("</think>", "<|tool_calls_section_begin|>", "<|tool_call_section_begin|>", "<|tool_call_begin|>")
    has_tool_calls = False

    def __init__(self) -> None:
        self._buf = ""
        self._state = "start"

    def feed(self, text: str) -> DeltaMessage | None:
        self._buf += text
        return self._drain(final=False)

    def finish(self) -> DeltaMessage | None:
        return self._drain(final=True)

    def _drain(self, final: bool) -> DeltaMessage | None:
        reasoning, content = "", ""
        if self._state == "start":
            rest = self._buf.lstrip()
            if rest.startswith("<think>"):
                self._buf, self._state = rest[len("<think>"):], "reasoning"
            elif not final and "<think>".startswith(rest):
                return None
            else:
                self._state = "reasoning"
        if self._state == "reasoning":
            hits = [(i, m) for m in self._ENDS if (i := self._buf.find(m)) >= 0]
            if hits:
                i, marker = min(hits)
                reasoning = self._buf[:i]
                self._buf = self._buf[i + len(marker):] if marker == "</think>" else self._buf[i:]
                self._state = "content"
            else:
                keep = 0 if final else _partial_suffix(self._buf, self._ENDS)
                reasoning, self._buf = self._buf[: len(self._buf) - keep], self._buf[len(self._buf) - keep:]
        if self._state == "content":
            content, self._buf = self._buf, ""
        if not (reasoning or content):
            return None
        return DeltaMessage(reasoning or None, content or None, [])


def _partial_suffix(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that starts one of `markers` (held back until decided)."""
    for i in range(max(0, len(text) - max(map(len, markers)) + 1), len(text)):
        if text[i] == "<" and any(m.startswith(text[i:]) for m in markers):
            return len(text) - i
    return 0


def finish_reason(engine_reason: str | None, has_tool_calls: bool = False) -> str:
    """Engine finish reason -> OpenAI's ("abort" only reaches a client that has gone)."""
    if engine_reason == "length":
        return "length"
    return "tool_calls" if has_tool_calls else "stop"


class ChatChoiceState:
    """One chat choice: feeds engine deltas through the K2 parser, builds stream deltas and the final message.

    Args:
        index: the choice index.
        parse_tools: parse K2 tool calls into `tool_calls` (else `ReasoningOnlyParser`).
        top_logprobs: None = no logprobs; N = chosen token plus the N most likely.
        token_text: id -> text for logprobs.
        return_token_ids: add `token_ids` to each delta / the final choice.
    """

    def __init__(self, index: int, parse_tools: bool, top_logprobs: int | None, token_text: TokenText,
                 return_token_ids: bool = False):
        self.index = index
        self.parser: Any = K2StreamParser() if parse_tools else ReasoningOnlyParser()
        self.top_logprobs = top_logprobs
        self.token_text = token_text
        self.return_token_ids = return_token_ids
        self.reasoning: list[str] = []
        self.content: list[str] = []
        self.tool_calls: list[dict[str, Any]] = []
        self.logprobs: list[dict[str, Any]] = []
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None

    def update(self, token_ids: list[int], text: str, logprobs: list[dict[int, float]] | None,
               finished: bool, engine_reason: str | None) -> dict[str, Any] | None:
        """Consume one engine delta; return its stream choice (`{"index", "delta", ...}`) or None."""
        self.token_ids += token_ids
        delta: dict[str, Any] = {}
        if text:
            self._apply(self.parser.feed(text), delta)
        if finished:
            self._apply(self.parser.finish(), delta)
            self.finish_reason = finish_reason(engine_reason, self.parser.has_tool_calls)
        lps = self._logprobs(token_ids, logprobs)
        if not (delta or lps or finished or (self.return_token_ids and token_ids)):
            return None
        choice: dict[str, Any] = {"index": self.index, "delta": delta,
                                  "logprobs": {"content": lps} if lps else None,
                                  "finish_reason": self.finish_reason if finished else None}
        if self.return_token_ids:
            choice["token_ids"] = token_ids
        return choice

    def message(self) -> dict[str, Any]:
        """The non-streamed choice, after the finished delta."""
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.content) or None,
                                   "reasoning_content": "".join(self.reasoning) or None}
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        choice: dict[str, Any] = {"index": self.index, "message": message,
                                  "logprobs": {"content": self.logprobs} if self.top_logprobs is not None else None,
                                  "finish_reason": self.finish_reason}
        if self.return_token_ids:
            choice["token_ids"] = self.token_ids
        return choice

    def _apply(self, parsed: Any, delta: dict[str, Any]) -> None:
        if parsed is None:
            return
        if parsed.reasoning_content:
            self.reasoning.append(parsed.reasoning_content)
            delta["reasoning_content"] = delta.get("reasoning_content", "") + parsed.reasoning_content
        if parsed.content:
            self.content.append(parsed.content)
            delta["content"] = delta.get("content", "") + parsed.content
        for call in parsed.tool_calls:
            calls = delta.setdefault("tool_calls", [])
            if call.id is not None:  # a new call: id and name first, then argument fragments
                self.tool_calls.append({"id": call.id, "type": "function",
                                        "function": {"name": call.name or "", "arguments": call.arguments}})
                calls.append({"index": call.index, "id": call.id, "type": "function",
                              "function": {"name": call.name or "", "arguments": call.arguments}})
                continue
            self.tool_calls[call.index]["function"]["arguments"] += call.arguments
            if calls and calls[-1]["index"] == call.index:
                calls[-1]["function"]["arguments"] += call.arguments
            else:
                calls.append({"index": call.index, "function": {"arguments": call.arguments}})

    def _logprobs(self, token_ids: list[int], logprobs: list[dict[int, float]] | None) -> list[dict[str, Any]]:
        if self.top_logprobs is None or not logprobs:
            return []
        out = []
        for tid, lp in zip(token_ids, logprobs):
            text = self.token_text(tid)
            top = [{"token": (t := self.token_text(k)), "logprob": _lp(v), "bytes": list(t.encode())}
                   for k, v in _top(lp, self.top_logprobs)]
            out.append({"token": text, "logprob": _lp(lp.get(tid, _MIN_LOGPROB)), "bytes": list(text.encode()),
                        "top_logprobs": top})
        self.logprobs += out
        return out


class TextChoiceState:
    """One /v1/completions choice: raw text (no parsing), OpenAI legacy logprobs."""

    def __init__(self, index: int, logprobs: int | None, token_text: TokenText, return_token_ids: bool = False):
        self.index = index
        self.num_logprobs = logprobs
        self.token_text = token_text
        self.return_token_ids = return_token_ids
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.offset = 0
        self.logprobs: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        self.finish_reason: str | None = None

    def update(self, token_ids: list[int], text: str, logprobs: list[dict[int, float]] | None,
               finished: bool, engine_reason: str | None) -> dict[str, Any] | None:
        self.token_ids += token_ids
        self.text.append(text)
        if finished:
            self.finish_reason = finish_reason(engine_reason)
        lps = self._logprobs(token_ids, logprobs)
        if not (text or lps or finished or (self.return_token_ids and token_ids)):
            return None
        choice: dict[str, Any] = {"index": self.index, "text": text, "logprobs": lps,
                                  "finish_reason": self.finish_reason if finished else None}
        if self.return_token_ids:
            choice["token_ids"] = token_ids
        return choice

    def final(self) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": self.index, "text": "".join(self.text),
                                  "logprobs": self.logprobs if self.num_logprobs is not None else None,
                                  "finish_reason": self.finish_reason}
        if self.return_token_ids:
            choice["token_ids"] = self.token_ids
        return choice

    def _logprobs(self, token_ids: list[int], logprobs: list[dict[int, float]] | None) -> dict[str, list] | None:
        if self.num_logprobs is None or not logprobs:
            return None
        part: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for tid, lp in zip(token_ids, logprobs):
            text = self.token_text(tid)
            part["tokens"].append(text)
            part["token_logprobs"].append(_lp(lp.get(tid, _MIN_LOGPROB)))
            part["top_logprobs"].append({self.token_text(k): _lp(v) for k, v in _top(lp, self.num_logprobs)})
            part["text_offset"].append(self.offset)
            self.offset += len(text)
        for key, values in part.items():
            self.logprobs[key] += values
        return part


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}
