"""Tool-call validation in choice assembly (no Ray): held calls, rewinds for re-sampling, content fallback;
plus the routing hints and thinking-budget accounting the ingress relies on."""

from __future__ import annotations

import asyncio
import json

import pytest

from raymoe.config import ModelConfig
from raymoe.engine.loading import load_tokenizer, resolve_model_path
from raymoe.engine.request import SamplingParams
from raymoe.heavy.config import ToolValidationConfig
from raymoe.heavy.tool_validation import ToolValidator
from raymoe.serve.choices import ChatChoiceState, TokenText, ToolCheck, call_begin_id
from raymoe.serve.routing import rank_by_hint, replica_hint, spread_hint
from raymoe.serve.tier import ReasoningTokens, TierClient
from tests.serve.test_resilience import FakeTier, Letters

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
THINK = "<think>need weather</think>"


def call(name: str, args: str, i: int = 0) -> str:
    return f"<|tool_call_begin|>functions.{name}:{i}<|tool_call_argument_begin|>{args}<|tool_call_end|>"


def section(*calls: str) -> str:
    return f"<|tool_calls_section_begin|>{''.join(calls)}<|tool_calls_section_end|>"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(resolve_model_path(ModelConfig(preset="tiny")))


def make(tok, policy: str = "resample", max_attempts: int = 2, max_tokens: int = 200) -> ChatChoiceState:
    check = ToolCheck(ToolValidator(TOOLS), ToolValidationConfig(policy=policy, max_attempts=max_attempts),
                      call_begin_id(tok), max_tokens)
    return ChatChoiceState(0, True, None, TokenText(tok), check=check)


def feed(state: ChatChoiceState, tok, text: str, per_token: bool = True) -> list[dict]:
    """Feed `text` as engine deltas (one token each, or all at once); return the non-empty chunks."""
    ids = tok.encode(text, add_special_tokens=False)
    groups = [[t] for t in ids] if per_token else [ids]
    chunks, sent = [], 0
    for k, group in enumerate(groups):
        upto = sum(len(g) for g in groups[: k + 1])
        full = tok.decode(ids[:upto], skip_special_tokens=True)
        last = k == len(groups) - 1
        chunk = state.update(group, full[sent:], None, last, "stop" if last else None)
        sent = len(full)
        if chunk is not None:
            chunks.append(chunk)
        if state.rewind_to is not None:
            break
    return chunks


def calls_in(chunks: list[dict]) -> list[dict]:
    return [tc for c in chunks for tc in c["delta"].get("tool_calls", [])]


@pytest.mark.parametrize("per_token", [True, False])
def test_a_valid_call_is_sent_whole_once_complete(tok, per_token):
    state = make(tok)
    chunks = feed(state, tok, THINK + "Let me check." + section(call("get_weather", '{"city": "Paris"}')), per_token)
    (only,) = calls_in(chunks)
    assert only == {"index": 0, "id": "functions.get_weather:0", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    assert chunks[-1]["finish_reason"] == "tool_calls" and state.rewind_to is None
    message = state.message()["message"]
    assert message["content"] == "Let me check." and message["reasoning_content"] == "need weather"


@pytest.mark.parametrize("bad", [call("get_stock", '{"t": 1}'), call("get_weather", '{"city": "Paris"'),
                                 call("get_weather", '{"town": "Paris"}')])
def test_a_bad_call_asks_for_a_rewind_to_its_begin_marker_and_sends_nothing_of_it(tok, bad):
    state = make(tok)
    chunks = feed(state, tok, THINK + section(bad))
    assert calls_in(chunks) == []
    begin = tok.convert_tokens_to_ids("<|tool_call_begin|>")
    assert state.token_ids[state.rewind_to] == begin
    assert all(c["finish_reason"] is None for c in chunks)


def test_rewind_continues_from_the_kept_prefix_with_a_fixed_call(tok):
    state = make(tok)
    (first,) = feed(state, tok, THINK + "Text before." + section(call("get_weather", "{bad")), per_token=False)
    assert first["delta"] == {"reasoning_content": "need weather", "content": "Text before."}  # one delta, split
    cut = state.rewind_to
    assert state.rewind(lambda ids: tok.decode(ids, skip_special_tokens=True)) is None  # nothing held before cut
    assert len(state.token_ids) == cut and state.attempt == 2
    chunks = feed(state, tok, call("get_weather", '{"city": "Oslo"}') + "<|tool_calls_section_end|>")
    assert [c["function"]["arguments"] for c in calls_in(chunks)] == ['{"city": "Oslo"}']
    assert state.message()["finish_reason"] == "tool_calls" and "tool_call_errors" not in state.message()


def test_out_of_attempts_the_bad_call_becomes_content_with_errors(tok):
    state = make(tok, max_attempts=1)
    chunks = feed(state, tok, THINK + "Checking." + section(call("get_weather", '{"city": "Oslo"}'),
                                                           call("get_stock", '{"t": 1}', 1)))
    assert [c["index"] for c in calls_in(chunks)] == [0]
    final = state.message()
    assert final["finish_reason"] == "tool_calls" and len(final["message"]["tool_calls"]) == 1
    assert final["message"]["content"].startswith("Checking.\n\n[tool call not executed:")
    assert final["tool_call_errors"] == [{"index": 1, "name": "get_stock", "kind": "undeclared_tool",
                                          "message": final["tool_call_errors"][0]["message"]}]
    assert chunks[-1]["tool_call_errors"] == final["tool_call_errors"]


def test_content_policy_never_rewinds(tok):
    state = make(tok, policy="content", max_attempts=5)
    feed(state, tok, THINK + section(call("get_weather", '{"town": "x"}')))
    assert state.rewind_to is None and state.message()["finish_reason"] == "stop"
    assert state.message()["tool_call_errors"][0]["kind"] == "schema_violation"


def test_no_room_left_means_no_rewind(tok):
    state = make(tok, max_tokens=5)  # the call starts past the budget: re-sampling could not finish it
    feed(state, tok, THINK + section(call("get_stock", "{}")))
    assert state.rewind_to is None and state.message()["tool_call_errors"]


def test_routing_hints_spread_a_group_and_pin_a_replica():
    replicas = ["r-b", "r-a", "r-c"]
    spread = {rank_by_hint(spread_hint("req-1", i), replicas) for i in range(3)}
    assert spread == set(replicas)
    assert rank_by_hint(spread_hint("req-1", 4), replicas) == rank_by_hint(spread_hint("req-1", 1), replicas)
    assert rank_by_hint(replica_hint("r-c"), replicas) == "r-c"
    assert rank_by_hint(replica_hint("gone"), replicas) is None and rank_by_hint("x", replicas) is None


def test_reasoning_tokens_count_as_the_engine_does():
    marks = ReasoningTokens(think_start=1, enders=frozenset({2}))
    assert marks.remaining_budget(10, [1, 5, 5, 5]) == 7  # a leading <think> is not reasoning
    assert marks.remaining_budget(2, [5, 5, 5]) == 0
    assert marks.remaining_budget(10, [5, 2, 5]) is None  # reasoning ended: no budget on the rest
    assert marks.remaining_budget(None, [5]) is None


def test_resubmission_passes_on_the_thinking_budget_left():
    tier = FakeTier(die_after=4)
    client = TierClient(tier, resubmit_delay_s=0, reasoning_tokens=ReasoningTokens(None, frozenset({99})))

    async def run() -> list:
        return [o async for o in client.stream("r", [1, 2], SamplingParams(max_tokens=10, thinking_budget=6),
                                               Letters())]

    out = asyncio.run(run())
    assert out[-1].finished and [r.params.thinking_budget for r in tier.requests] == [6, 2]


def test_tool_call_error_fields_are_json_safe(tok):
    state = make(tok, max_attempts=1)
    feed(state, tok, THINK + section(call("get_weather", '{"city": NaN}')))
    json.dumps(state.message(), allow_nan=False)
    assert state.message()["tool_call_errors"][0]["kind"] == "invalid_json"
