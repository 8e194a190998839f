"""Context management: a 300-tool-call conversation is fitted to a window by shrinking the oldest tool results,
then dropping the oldest turns (a call with its results together), keeping the system prompt, the tools and the
last user message, with few exact counts. Also the thinking-budget and context config nodes."""

from __future__ import annotations

import copy
import math

import pytest
from pydantic import ValidationError
from transformers import AutoTokenizer

from raymoe.heavy import (
    ContextConfig,
    ReasoningConfig,
    chat_token_counter,
    fit_messages,
    resolve_thinking_budget,
)
from raymoe.tokenizer import ChatEncoder, write_tiny_tokenizer

NUM_CALLS = 300
TOOLS = [{"type": "function", "function": {"name": "search", "description": "Search the web",
                                           "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]
SYSTEM = {"role": "system", "content": "You are a research agent."}
CONFIG = ContextConfig(tool_result_keep_chars=64)


def agentic(num_calls: int, final_user: bool = True) -> list[dict]:
    messages = [SYSTEM, {"role": "user", "content": "Find everything about MoE serving."}]
    for i in range(num_calls):
        call_id = f"functions.search:{i}"
        messages.append({"role": "assistant", "content": "", "reasoning_content": f"step {i}", "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": "search", "arguments": f'{{"q": "q{i}"}}'}}]})
        messages.append({"role": "tool", "tool_call_id": call_id,
                         "content": f"result {i}: " + "experts route tokens across devices " * 12})
    if final_user:
        messages.append({"role": "user", "content": "Now summarise what you found."})
    return messages


@pytest.fixture(scope="module")
def count_tokens(tmp_path_factory):
    encoder = ChatEncoder(AutoTokenizer.from_pretrained(str(write_tiny_tokenizer(tmp_path_factory.mktemp("tok")))))
    return chat_token_counter(encoder)


class Counting:
    def __init__(self, count):
        self.count, self.calls = count, 0

    def __call__(self, messages, tools):
        self.calls += 1
        return self.count(messages, tools)


def rough(messages, tools):
    """A fast stand-in counter: 1 token per 4 characters plus 8 per message."""
    return sum(len(str(m.get("content") or "")) // 4 + 8 for m in messages) + (50 if tools else 0)


def assert_pairs_intact(messages):
    call_ids = [c["id"] for m in messages if m["role"] == "assistant" for c in m.get("tool_calls") or []]
    result_ids = [m["tool_call_id"] for m in messages if m["role"] == "tool"]
    assert call_ids == result_ids


def test_a_conversation_that_fits_is_returned_as_is(count_tokens):
    messages = agentic(3)
    out, report = fit_messages(messages, TOOLS, count_tokens, 100_000, CONFIG)
    assert out is messages
    assert report == {"truncated_tool_results": 0, "dropped_messages": 0,
                      "original_tokens": count_tokens(messages, TOOLS), "final_tokens": count_tokens(messages, TOOLS)}


def test_300_tool_calls_fit_by_shrinking_old_tool_results(count_tokens):
    messages = agentic(NUM_CALLS)
    snapshot = copy.deepcopy(messages)
    original = count_tokens(messages, TOOLS)
    budget = original // 2
    counter = Counting(count_tokens)
    out, report = fit_messages(messages, TOOLS, counter, budget, CONFIG)

    assert messages == snapshot  # input untouched
    assert report["original_tokens"] == original
    assert report["final_tokens"] == count_tokens(out, TOOLS) <= budget
    assert report["dropped_messages"] == 0 and len(out) == len(messages)
    shrunk = [m for m in out if "omitted by raymoe context management" in str(m["content"])]
    assert len(shrunk) == report["truncated_tool_results"] > 0
    assert shrunk == [m for m in out if m["role"] == "tool"][: len(shrunk)]  # the oldest ones
    assert shrunk[0]["content"].startswith("result 0: ") and len(shrunk[0]["content"]) < 150
    assert out[0] == SYSTEM and out[-1] == messages[-1] and out[1] == messages[1]
    assert out[-7:] == messages[-7:]  # the last 4 turns: 3 call+result pairs and the final user
    # least reduction: one result fewer does not fit
    k = report["truncated_tool_results"]
    less = [m if m["role"] != "tool" or m not in shrunk[k - 1:] else messages[i] for i, m in enumerate(out)]
    assert count_tokens(less, TOOLS) > budget
    assert counter.calls <= math.log2(2 * NUM_CALLS) + 6  # not one count per step


def test_300_tool_calls_fit_a_small_window_by_dropping_whole_turns(count_tokens):
    messages = agentic(NUM_CALLS)
    counter = Counting(count_tokens)
    out, report = fit_messages(messages, TOOLS, counter, 4000, CONFIG)

    assert report["final_tokens"] == count_tokens(out, TOOLS) <= 4000
    assert report["dropped_messages"] == len(messages) - len(out) > 0
    assert out[0] == SYSTEM and out[-1] == messages[-1]  # system prompt and last user message intact
    assert out[-7:] == messages[-7:]
    assert_pairs_intact(out)
    assert all(m["role"] != "user" for m in out[1:-1])  # the oldest turn, the first question, went first
    assert report["truncated_tool_results"] == sum("omitted by raymoe" in str(m["content"]) for m in out)
    assert counter.calls <= math.log2(2 * NUM_CALLS) + 6


def test_agentic_loop_keeps_its_only_user_message():
    messages = agentic(40, final_user=False)
    out, report = fit_messages(messages, TOOLS, rough, 600, ContextConfig(keep_last_turns=2))
    assert out[:2] == messages[:2] and out[-4:] == messages[-4:]
    assert report["dropped_messages"] > 0 and rough(out, TOOLS) <= 600
    assert_pairs_intact(out)


def test_error_strategy_raises_with_the_token_counts():
    messages = agentic(20)
    with pytest.raises(ValueError, match=rf"prompt is {rough(messages, TOOLS)} tokens, more than the 100 allowed"):
        fit_messages(messages, TOOLS, rough, 100, ContextConfig(strategy="error"))


def test_raises_when_even_the_protected_minimum_does_not_fit():
    messages = agentic(20)
    with pytest.raises(ValueError, match=r"at least \d+ after context management.*more than the 60 allowed"):
        fit_messages(messages, TOOLS, rough, 60, CONFIG)


def test_parallel_calls_and_list_content_are_handled():
    calls = [{"id": f"functions.search:{i}", "type": "function", "function": {"name": "search", "arguments": "{}"}}
             for i in range(2)]
    messages = [{"role": "user", "content": "go"}, {"role": "assistant", "content": None, "tool_calls": calls},
                {"role": "tool", "tool_call_id": "functions.search:0", "content": [{"type": "text", "text": "a" * 999}]},
                {"role": "tool", "tool_call_id": "functions.search:1", "content": "b" * 999},
                {"role": "assistant", "content": "done"}, {"role": "user", "content": "more?"}]
    config = ContextConfig(keep_last_turns=1, tool_result_keep_chars=10)
    out, report = fit_messages(messages, None, rough, 200, config)
    assert report["truncated_tool_results"] == 2 and report["dropped_messages"] == 0
    assert out[2]["content"] == "a" * 10 + "\n[… 989 characters omitted by raymoe context management …]"
    out, report = fit_messages(messages, None, rough, 30, config)
    assert out == messages[-2:] and report["dropped_messages"] == 4  # the call and both results went together
    out, report = fit_messages(messages, None, rough, 12, config)
    assert out == [messages[-1]] and report["dropped_messages"] == 5


# config nodes


@pytest.mark.parametrize("kwargs", [
    {"truncation_marker": "[{chars} cut]"}, {"truncation_marker": "[{omitted:q}]"}, {"keep_last_turns": 0},
    {"tool_result_keep_chars": -1}, {"strategy": "summarise"},
])
def test_bad_context_config_fails_at_construction(kwargs):
    with pytest.raises(ValidationError):
        ContextConfig(**kwargs)


def test_thinking_budget_resolution():
    config = ReasoningConfig(default_budget=4096)
    assert resolve_thinking_budget(None, None, config) == 4096
    assert [resolve_thinking_budget(e, None, config) for e in ("low", "medium", "high")] == [1024, 8192, 32768]
    assert resolve_thinking_budget("low", 777, config) == 777  # an explicit budget wins
    assert resolve_thinking_budget(None, None, ReasoningConfig()) is None
    for effort, budget, param in (("extreme", None, "reasoning_effort"), (None, 0, "thinking_budget"),
                                  (None, 10**9, "thinking_budget"), (None, True, "thinking_budget")):
        with pytest.raises(ValueError, match=param):
            resolve_thinking_budget(effort, budget, config)


def test_reasoning_budgets_must_be_ordered():
    with pytest.raises(ValidationError, match="low"):
        ReasoningConfig(low=9000, medium=8192)
