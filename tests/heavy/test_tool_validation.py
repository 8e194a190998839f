"""Tool-call validation: undeclared tools, invalid JSON and schema violations are caught with a message naming
the problem; the policy re-samples within max_attempts, then returns bad calls as content plus tool_call_errors."""

from __future__ import annotations

import json

import pytest

from raymoe.heavy import (
    ToolValidationConfig,
    ToolValidator,
    apply_policy,
    check_tools,
    partition_tool_calls,
    validate_tool_call,
)
from raymoe.serve.parsers import ParsedOutput, ToolCall, parse_output

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"], "additionalProperties": False}}}
PING = {"type": "function", "function": {"name": "ping"}}  # no parameters: any object
TOOLS = [WEATHER, PING]


def test_valid_call_passes():
    assert validate_tool_call("get_weather", '{"city": "Paris", "days": 2}', TOOLS) is None
    assert validate_tool_call("ping", '{"anything": [1, 2]}', TOOLS) is None
    assert validate_tool_call("ping", "{}", TOOLS) is None


def test_undeclared_tool_names_the_tool_and_what_is_declared():
    issue = validate_tool_call("search", '{"q": "x"}', TOOLS)
    assert issue.kind == "undeclared_tool" and issue.name == "search"
    assert "'search'" in issue.message and "get_weather, ping" in issue.message
    assert validate_tool_call("search", "{}", None).kind == "undeclared_tool"


@pytest.mark.parametrize("arguments", ['{"city": "Paris"', "", "city=Paris", '{"city": NaN}'])
def test_invalid_json(arguments):
    issue = validate_tool_call("get_weather", arguments, TOOLS)
    assert issue.kind == "invalid_json" and "not valid JSON" in issue.message


@pytest.mark.parametrize("arguments,fragment", [
    ('{"city": 5}', "$.city"),  # wrong type, at its path
    ('{"days": 3}', "'city' is a required property"),  # missing required
    ('{"city": "Oslo", "unit": "C"}', "unit"),  # additionalProperties: false
    ('["Paris"]', "must be a JSON object, got array"),
])
def test_schema_violation_names_the_problem(arguments, fragment):
    issue = validate_tool_call("get_weather", arguments, TOOLS)
    assert issue.kind == "schema_violation" and fragment in issue.message


def test_non_object_arguments_violate_even_without_parameters():
    assert validate_tool_call("ping", "3", TOOLS).kind == "schema_violation"


def test_schema_draft_follows_dollar_schema():
    draft7 = {"type": "function", "function": {"name": "f", "parameters": {
        "$schema": "http://json-schema.org/draft-07/schema#", "type": "object",
        "properties": {"xs": {"type": "array", "items": [{"type": "integer"}]}}}}}
    assert validate_tool_call("f", '{"xs": [1]}', [draft7]) is None
    assert validate_tool_call("f", '{"xs": ["a"]}', [draft7]).kind == "schema_violation"  # draft-7 tuple items


@pytest.mark.parametrize("tools,fragment", [
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}], "tools[0]"),
    ([WEATHER, {"type": "function", "function": {"description": "no name"}}], "tools[1].function.name"),
])
def test_bad_declarations_fail_at_request_time(tools, fragment):
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[").replace(".", r"\.")):
        check_tools(tools)


def test_long_violation_messages_are_clipped():
    issue = validate_tool_call("get_weather", json.dumps({"city": ["x" * 5000]}), TOOLS)
    assert issue.kind == "schema_violation" and len(issue.message) < 400


def calls(*pairs):
    return [ToolCall(f"functions.{name}:{i}", name, args, i) for i, (name, args) in enumerate(pairs)]


def test_partition_keeps_order_and_indexes_issues():
    mixed = calls(("get_weather", '{"city": "Rome"}'), ("search", "{}"), ("ping", "{}"), ("get_weather", "{"))
    valid, invalid = partition_tool_calls(mixed, ToolValidator(TOOLS))
    assert [c.index for c in valid] == [0, 2]
    assert [(c.index, i.index, i.kind) for c, i in invalid] == [(1, 1, "undeclared_tool"), (3, 3, "invalid_json")]


# policy


def parsed(content, *pairs):
    return ParsedOutput("reasoning", content, calls(*pairs))


def test_all_valid_is_accepted_unchanged():
    out = parsed("Let me check.", ("get_weather", '{"city": "Rome"}'))
    decision = apply_policy(out, TOOLS, ToolValidationConfig())
    assert decision.action == "accept" and decision.tool_calls == out.tool_calls and decision.content == out.content
    assert decision.tool_call_errors == [] and decision.has_tool_calls


def test_no_calls_is_accepted():
    assert apply_policy(parse_output("<think>r</think>Hi"), TOOLS, ToolValidationConfig()).action == "accept"


def test_resample_until_attempts_run_out_then_content():
    bad = parsed(None, ("search", '{"q": "x"}'))
    config = ToolValidationConfig(policy="resample", max_attempts=3)
    assert [apply_policy(bad, TOOLS, config, attempt=a).action for a in (1, 2, 3)] == ["resample", "resample", "content"]


def test_content_policy_renders_bad_calls_as_text_and_reports_errors():
    out = parsed("Checking.", ("get_weather", '{"city": "Rome"}'), ("search", '{"q": "x"}'), ("get_weather", '{"city": 1}'))
    decision = apply_policy(out, TOOLS, ToolValidationConfig(policy="content"), attempt=1)
    assert decision.action == "content"
    assert [(c.index, c.id, c.name) for c in decision.tool_calls] == [(0, "functions.get_weather:0", "get_weather")]
    assert decision.content.startswith("Checking.\n\n[tool call not executed: tool 'search' is not declared")
    assert 'search({"q": "x"})' in decision.content and 'get_weather({"city": 1})' in decision.content
    assert "<|tool_call" not in decision.content  # readable text, not K2 markup
    assert [(e["index"], e["name"], e["kind"]) for e in decision.tool_call_errors] == [
        (1, "search", "undeclared_tool"), (2, "get_weather", "schema_violation")]
    assert set(decision.tool_call_errors[0]) == {"index", "name", "kind", "message"}


def test_only_bad_calls_leave_no_tool_calls():
    decision = apply_policy(parsed(None, ("search", "{}")), [], ToolValidationConfig(policy="content"))
    assert not decision.has_tool_calls and decision.content.startswith("[tool call not executed")


def test_disabled_validation_accepts_anything():
    out = parsed(None, ("search", "not json"))
    assert apply_policy(out, TOOLS, ToolValidationConfig(enabled=False)).action == "accept"


def test_end_to_end_from_model_text():
    text = ("<think>need weather</think>On it.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
            '<|tool_call_argument_begin|>{"town": "Rome"}<|tool_call_end|><|tool_calls_section_end|>')
    decision = apply_policy(parse_output(text), TOOLS, ToolValidationConfig(max_attempts=1))
    assert decision.action == "content" and decision.tool_call_errors[0]["kind"] == "schema_violation"
