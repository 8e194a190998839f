"""Config nodes for Heavy Mode, thinking budgets, tool-call validation and context management; per-request plans.

The four `*Config` nodes mount under `serve` in the one config tree (`serve.heavy`, `serve.reasoning`,
`serve.tool_validation`, `serve.context`). A request selects Heavy Mode with the extension field `heavy`
(`true` or `{trajectories, aggregate, extractor, extractor_regex}`) or the model alias `<served-name>-heavy`;
`resolve_heavy` checks that against `HeavyConfig` and returns a frozen `HeavyPlan` (ValueError -> HTTP 400).

    request.heavy / model alias -> [resolve_heavy] -> HeavyPlan -> ingress: N trajectories -> heavy.aggregate
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

import regex
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, model_validator

Aggregate = Literal["vote", "reflect", "best_logprob"]
Extractor = Literal["last_line", "boxed", "regex"]
AGGREGATES: tuple[str, ...] = get_args(Aggregate)
EXTRACTORS: tuple[str, ...] = get_args(Extractor)
MAX_REGEX_CHARS = 256  # request-supplied patterns run on the ingress; a long one is more likely a ReDoS attempt


class _Node(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def compile_answer_regex(pattern: str, field: str) -> regex.Pattern:
    """Compiles an answer-extractor pattern (the `regex` module: it supports a match timeout, `re` does not).

    Raises:
        ValueError: naming `field`, when the pattern is too long or does not compile.
    """
    if len(pattern) > MAX_REGEX_CHARS:
        raise ValueError(f"{field} is {len(pattern)} characters; at most {MAX_REGEX_CHARS} are allowed")
    try:
        return regex.compile(pattern)
    except regex.error as e:
        raise ValueError(f"{field} {pattern!r} is not a valid regular expression: {e}") from e


class HeavyConfig(_Node):
    enabled: bool = Field(True, description="Accept Heavy Mode requests (the `heavy` field or the model alias).")
    default_trajectories: int = Field(
        8, ge=1, le=256, description="Trajectories rolled out when a request does not say (K2 Heavy: 8).")
    max_trajectories: int = Field(16, ge=1, le=256, description="Most trajectories one request may ask for.")
    default_aggregate: Aggregate = Field(
        "reflect", description="How trajectories become one answer: 'vote' (majority over extracted answers), "
        "'reflect' (the model reads the candidates and writes the final answer; K2's reflective aggregation) "
        "or 'best_logprob' (highest mean token logprob).")
    extractor: Extractor = Field(
        "boxed", description="Final-answer extractor for voting, applied to each trajectory's content (never its "
        "reasoning): 'boxed' = the last \\boxed{...}, falling back to the last non-empty line when there is no box; "
        "'last_line' = the last non-empty line; 'regex' = group 1 (else group 0) of the last match of "
        "extractor_regex, no fallback. A trajectory with no answer does not vote; if none has one, the vote falls "
        "back to the best mean logprob.")
    extractor_regex: str | None = Field(None, description="Pattern for extractor 'regex' (Python `regex` syntax).")
    allow_request_regex: bool = Field(
        True, description="Let requests supply `heavy.extractor_regex`. Patterns run on the ingress with a time "
        "limit and at most 256 characters; turn off on untrusted networks to avoid regex CPU burn entirely.")
    reflect_max_tokens: int | None = Field(
        None, ge=1, description="max_tokens of the reflective aggregation pass; default: the request's max_tokens.")
    reflect_candidate_max_chars: int = Field(
        16384, ge=64, description="Each candidate's content is cut to this many characters in the reflect prompt, "
        "so 8-16 long answers cannot overflow the context on their own.")
    model_alias_suffix: str = Field(
        "-heavy", min_length=1, description="`<served-name><suffix>` is an alias that turns Heavy Mode on.")

    @model_validator(mode="after")
    def _check(self) -> HeavyConfig:
        if self.default_trajectories > self.max_trajectories:
            raise ValueError(f"heavy.default_trajectories ({self.default_trajectories}) must be <= "
                             f"heavy.max_trajectories ({self.max_trajectories})")
        if self.extractor == "regex" and not self.extractor_regex:
            raise ValueError("heavy.extractor 'regex' needs heavy.extractor_regex")
        if self.extractor_regex is not None:
            compile_answer_regex(self.extractor_regex, "heavy.extractor_regex")
        return self


class ReasoningConfig(_Node):
    """Thinking-token budgets: when reached, the engine closes `</think>` (DESIGN §4, test-time scaling)."""

    low: int = Field(1024, ge=1, description="Thinking budget in tokens for reasoning_effort 'low'.")
    medium: int = Field(8192, ge=1, description="Thinking budget in tokens for reasoning_effort 'medium'.")
    high: int = Field(32768, ge=1, description="Thinking budget in tokens for reasoning_effort 'high'.")
    default_budget: int | None = Field(
        None, ge=1, description="Budget when a request sets neither reasoning_effort nor a budget (None: unbounded).")
    max_budget: int = Field(
        131072, ge=1, description="Largest explicit budget a request may ask for (K2 evals used up to 128k).")

    @model_validator(mode="after")
    def _check(self) -> ReasoningConfig:
        if not self.low <= self.medium <= self.high <= self.max_budget:
            raise ValueError(f"reasoning budgets must satisfy low ({self.low}) <= medium ({self.medium}) <= "
                             f"high ({self.high}) <= max_budget ({self.max_budget})")
        return self


def resolve_thinking_budget(reasoning_effort: str | None, thinking_budget: int | None,
                            config: ReasoningConfig) -> int | None:
    """The thinking-token budget of one request: an explicit budget wins, then the effort, then the default.

    Raises:
        ValueError: an unknown `reasoning_effort`, or a budget outside [1, max_budget].
    """
    if thinking_budget is not None:
        if isinstance(thinking_budget, bool) or not isinstance(thinking_budget, int) or not (
                1 <= thinking_budget <= config.max_budget):
            raise ValueError(f"thinking_budget ({thinking_budget!r}) must be an integer in [1, {config.max_budget}]")
        return thinking_budget
    if reasoning_effort is not None:
        if reasoning_effort not in ("low", "medium", "high"):
            raise ValueError(f"reasoning_effort {reasoning_effort!r} is not one of low, medium, high")
        return getattr(config, reasoning_effort)
    return config.default_budget


class ToolValidationConfig(_Node):
    enabled: bool = Field(True, description="Check each generated tool call against the request's tools.")
    policy: Literal["resample", "content"] = Field(
        "resample", description="On an invalid call (undeclared tool, bad JSON, schema violation): 'resample' "
        "generates the choice again, up to max_attempts in all, then falls back to 'content'; 'content' returns "
        "the invalid calls as readable text in content plus a `tool_call_errors` field.")
    max_attempts: int = Field(2, ge=1, le=8, description="Generations per choice, the first included, under 'resample'.")


class ContextConfig(_Node):
    strategy: Literal["truncate", "error"] = Field(
        "truncate", description="A prompt over the limit: 'truncate' shrinks old tool results, then drops the "
        "oldest turns; 'error' rejects it with HTTP 400.")
    keep_last_turns: int = Field(
        4, ge=1, description="Most recent turns (a tool-call message with its results counts as one) never shrunk "
        "or dropped; the last user message and system messages are always kept.")
    tool_result_keep_chars: int = Field(
        512, ge=0, description="Characters kept from the start of a shrunk tool result.")
    truncation_marker: str = Field(
        "[… {omitted:,} characters omitted by raymoe context management …]",
        description="Text put after a shrunk tool result; `{omitted}` is the number of characters removed.")

    @model_validator(mode="after")
    def _check(self) -> ContextConfig:
        try:
            self.truncation_marker.format(omitted=12345)
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"context.truncation_marker {self.truncation_marker!r} must format with only "
                             f"{{omitted}}: {e!r}") from e
        return self


class HeavyRequest(_Node):
    """The per-request `heavy` extension field; every key optional (defaults from `HeavyConfig`)."""

    trajectories: StrictInt | None = Field(None, description="Trajectories to roll out.")
    aggregate: str | None = Field(None, description="vote | reflect | best_logprob")
    extractor: str | None = Field(None, description="last_line | boxed | regex")
    extractor_regex: str | None = Field(None, description="Pattern for the regex extractor.")


@dataclass(frozen=True, slots=True)
class HeavyPlan:
    """What the ingress does for one Heavy request; `model` is the served name (alias suffix removed)."""

    trajectories: int
    aggregate: Aggregate
    extractor: Extractor
    extractor_regex: str | None
    reflect_max_tokens: int | None
    reflect_candidate_max_chars: int
    model: str


def _parse_field(request_field: Any) -> HeavyRequest | None:
    if request_field is None or request_field is False:
        return None
    if request_field is True:
        return HeavyRequest()
    if isinstance(request_field, HeavyRequest):
        return request_field
    if not isinstance(request_field, dict):
        raise ValueError(f"heavy must be true, false or an object, got {type(request_field).__name__}")
    try:
        return HeavyRequest.model_validate(request_field)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ValueError(f"heavy.{where}: {err['msg']}") from None


def resolve_heavy(request_field: Any, model_name: str, config: HeavyConfig,
                  served_name: str | None = None) -> HeavyPlan | None:
    """Decides whether a request runs in Heavy Mode, and how.

    Args:
        request_field: the request's `heavy` value: None/absent, a bool, a dict or a `HeavyRequest`.
        model_name: the request's `model`; `<name><model_alias_suffix>` turns Heavy Mode on with the
            request field's values, else the defaults.
        config: `serve.heavy`.
        served_name: the served model name; when given, only `served_name + suffix` is the alias (a served
            name that itself ends in the suffix stays usable). When None, any name ending in the suffix is.

    Returns:
        None for a normal request, else the plan; `plan.model` is the name with the alias suffix removed.

    Raises:
        ValueError: naming the parameter: trajectories outside [1, max_trajectories], an unknown aggregate or
            extractor, a missing/invalid/forbidden extractor_regex, `heavy: false` with the alias, or
            "heavy mode is disabled".
    """
    suffix = config.model_alias_suffix
    if served_name is not None:
        is_alias = model_name == served_name + suffix
    else:
        is_alias = model_name.endswith(suffix) and len(model_name) > len(suffix)
    if request_field is False and is_alias:
        raise ValueError(f"heavy is false but model {model_name!r} is the Heavy Mode alias")
    request = _parse_field(request_field)
    if request is None and not is_alias:
        return None
    if not config.enabled:
        raise ValueError(f"heavy mode is disabled on this server (model {model_name!r})")
    request = request or HeavyRequest()

    trajectories = config.default_trajectories if request.trajectories is None else request.trajectories
    if not 1 <= trajectories <= config.max_trajectories:
        raise ValueError(f"heavy.trajectories ({trajectories}) must be between 1 and {config.max_trajectories}")
    aggregate = request.aggregate or config.default_aggregate
    if aggregate not in AGGREGATES:
        raise ValueError(f"heavy.aggregate {aggregate!r} is not one of {', '.join(AGGREGATES)}")
    if request.extractor is not None and request.extractor not in EXTRACTORS:
        raise ValueError(f"heavy.extractor {request.extractor!r} is not one of {', '.join(EXTRACTORS)}")
    if request.extractor_regex is not None:
        if not config.allow_request_regex:
            raise ValueError("heavy.extractor_regex is not allowed on this server (heavy.allow_request_regex)")
        if request.extractor not in (None, "regex"):
            raise ValueError(f"heavy.extractor_regex needs heavy.extractor 'regex', not {request.extractor!r}")
        compile_answer_regex(request.extractor_regex, "heavy.extractor_regex")
        extractor, pattern = "regex", request.extractor_regex  # a pattern alone implies the regex extractor
    elif request.extractor is not None:
        extractor, pattern = request.extractor, config.extractor_regex
        if extractor == "regex" and not pattern:
            raise ValueError("heavy.extractor 'regex' needs heavy.extractor_regex (none configured)")
    else:
        extractor, pattern = config.extractor, config.extractor_regex
    return HeavyPlan(
        trajectories=trajectories, aggregate=aggregate, extractor=extractor,
        extractor_regex=pattern if extractor == "regex" else None,
        reflect_max_tokens=config.reflect_max_tokens,
        reflect_candidate_max_chars=config.reflect_candidate_max_chars,
        model=model_name[: -len(suffix)] if is_alias else model_name)
