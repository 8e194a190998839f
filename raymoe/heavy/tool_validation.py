"""Checks generated tool calls against the request's tool declarations, and says what to do with bad ones.

    parse_output -> tool_calls -> [ToolValidator: declared? JSON object? schema?] -> apply_policy ->
        accept | resample (generate the choice again) | content (bad calls become text + `tool_call_errors`)

K2-Vendor-Verifier counts a call as an error when its tool was not declared in the current request or its
arguments break the tool's JSON schema (K2_FACTS §4.3: 316 such errors remained on vLLM; Moonshot's API
enforces schemas in decoding). Without constrained decoding, the server can at least never hand a client a
call it cannot execute. Pure functions: the ingress calls `apply_policy` once per choice and attempt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError, best_match
from jsonschema.validators import validator_for

from raymoe.heavy.config import ToolValidationConfig
from raymoe.serve.parsers import ParsedOutput, ToolCall

IssueKind = Literal["undeclared_tool", "invalid_json", "schema_violation"]
_MAX_DETAIL_CHARS = 300  # jsonschema messages repr the offending value, which can be the whole argument string


@dataclass(frozen=True, slots=True)
class ToolCallIssue:
    """Why one generated call cannot be executed; `index` is the call's position in the choice."""

    kind: IssueKind
    name: str
    message: str
    index: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The `tool_call_errors` item: `{index, name, kind, message}`."""
        return {"index": self.index, "name": self.name, "kind": self.kind, "message": self.message}


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_DETAIL_CHARS else text[:_MAX_DETAIL_CHARS] + "…"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")  # NaN/Infinity: Python accepts them, JSON.parse does not


class ToolValidator:
    """The request's tools compiled once (one schema validator per function), checking calls by name.

    Declarations are OpenAI-style `{"type": "function", "function": {"name", "parameters"}}`; a bare
    `{"name", "parameters"}` is accepted too. `parameters` is checked with the draft named by its `$schema`,
    else Draft 2020-12; no `parameters` means any JSON object. With duplicate names the first wins.

    Args:
        tools: the request's `tools` (None or empty: every call is undeclared).

    Raises:
        ValueError: a declaration without a name, or a `parameters` that is not a valid JSON schema, naming
            `tools[i]` (build this at request time so that is an HTTP 400, not a failed response).
    """

    def __init__(self, tools: list[dict] | None) -> None:
        self._validators: dict[str, Any] = {}
        for i, tool in enumerate(tools or []):
            fn = tool.get("function", tool) if isinstance(tool, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
                raise ValueError(f"tools[{i}].function.name must be a non-empty string")
            schema = fn.get("parameters")
            if schema is None:
                schema = {"type": "object"}
            try:
                cls = validator_for(schema, default=Draft202012Validator)
                cls.check_schema(schema)
            except SchemaError as e:
                raise ValueError(f"tools[{i}].function.parameters of {fn['name']!r} is not a valid JSON schema: "
                                 f"{_clip(e.message)}") from e
            self._validators.setdefault(fn["name"], cls(schema))

    @property
    def names(self) -> list[str]:
        return list(self._validators)

    def validate(self, call_name: str, arguments_json: str) -> ToolCallIssue | None:
        """The first problem with one call, or None when it is executable."""
        validator = self._validators.get(call_name)
        if validator is None:
            declared = ", ".join(self.names) if self.names else "none"
            return ToolCallIssue("undeclared_tool", call_name,
                                 _clip(f"tool {call_name!r} is not declared in this request (declared: {declared})"))
        try:
            arguments = json.loads(arguments_json, parse_constant=_reject_constant)
        except ValueError as e:  # JSONDecodeError is a ValueError
            return ToolCallIssue("invalid_json", call_name, f"arguments of {call_name!r} are not valid JSON: {e}")
        if not isinstance(arguments, dict):
            kind = "array" if isinstance(arguments, list) else type(arguments).__name__
            return ToolCallIssue("schema_violation", call_name,
                                 f"arguments of {call_name!r} must be a JSON object, got {kind}")
        error = best_match(validator.iter_errors(arguments))
        if error is None:
            return None
        return ToolCallIssue("schema_violation", call_name, _clip(
            f"arguments of {call_name!r} do not match its parameters schema at {error.json_path}: {error.message}"))


def check_tools(tools: list[dict] | None) -> None:
    """Request-time check of the tool declarations (ValueError naming `tools[i]`)."""
    ToolValidator(tools)


def validate_tool_call(call_name: str, arguments_json: str, tools: list[dict] | None) -> ToolCallIssue | None:
    """One call against the request's tools; see `ToolValidator` (reuse one for many calls)."""
    return ToolValidator(tools).validate(call_name, arguments_json)


def partition_tool_calls(calls: list[ToolCall], tools: list[dict] | ToolValidator | None,
                         ) -> tuple[list[ToolCall], list[tuple[ToolCall, ToolCallIssue]]]:
    """Splits calls into (executable, [(call, issue with the call's index)]), each in the original order."""
    validator = tools if isinstance(tools, ToolValidator) else ToolValidator(tools)
    valid: list[ToolCall] = []
    invalid: list[tuple[ToolCall, ToolCallIssue]] = []
    for call in calls:
        issue = validator.validate(call.name, call.arguments)
        if issue is None:
            valid.append(call)
        else:
            invalid.append((call, ToolCallIssue(issue.kind, issue.name, issue.message, call.index)))
    return valid, invalid


@dataclass(slots=True)
class ToolCallDecision:
    """What the ingress does with one choice.

    - "accept": every call is valid (or there are none); send `content` and `tool_calls` as parsed.
    - "resample": some call is invalid and attempts remain; generate this choice again and call
      `apply_policy` with `attempt + 1`. `content`/`tool_calls` hold the 'content' fallback meanwhile.
    - "content": send `content` (with the invalid calls rendered as text), the valid `tool_calls`
      (re-indexed 0..k-1, ids kept) and the extension field `tool_call_errors`. finish_reason is
      "tool_calls" only if `has_tool_calls`, else "stop".
    """

    action: Literal["accept", "resample", "content"]
    content: str | None
    tool_calls: list[ToolCall]
    tool_call_errors: list[dict[str, Any]] = field(default_factory=list)

    @property
    def has_tool_calls(self) -> bool:
        return bool(self.tool_calls)


def render_invalid_call(call: ToolCall, issue: ToolCallIssue) -> str:
    """A readable rendering of a rejected call for `content`.

    Readable text rather than K2's raw markup: a client shows it to a person as-is, and when the turn comes
    back as history the model reads plain text instead of strings that imitate its own control tokens.
    """
    return f"[tool call not executed: {issue.message}]\n{call.name}({call.arguments})"


def apply_policy(parsed: ParsedOutput, tools: list[dict] | ToolValidator | None, config: ToolValidationConfig,
                 attempt: int = 1) -> ToolCallDecision:
    """Applies `serve.tool_validation` to one parsed choice.

    Args:
        parsed: the choice's `parse_output` result.
        tools: the request's tools, or a `ToolValidator` built from them once per request.
        config: policy and max_attempts.
        attempt: 1 for the first generation of this choice, 2 for the first re-sample, ...

    Returns:
        The decision; see `ToolCallDecision`.
    """
    if not config.enabled or not parsed.tool_calls:
        return ToolCallDecision("accept", parsed.content, list(parsed.tool_calls))
    valid, invalid = partition_tool_calls(parsed.tool_calls, tools)
    if not invalid:
        return ToolCallDecision("accept", parsed.content, list(parsed.tool_calls))
    rendered = "\n\n".join(render_invalid_call(call, issue) for call, issue in invalid)
    content = f"{parsed.content}\n\n{rendered}" if parsed.content else rendered
    kept = [ToolCall(c.id, c.name, c.arguments, i) for i, c in enumerate(valid)]
    errors = [issue.to_dict() for _, issue in invalid]
    action = "resample" if config.policy == "resample" and attempt < config.max_attempts else "content"
    return ToolCallDecision(action, content, kept, errors)
