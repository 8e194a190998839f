"""Heavy Mode, thinking budgets, tool-call validation and context management over HTTP, on the tiny model.

The `heavy` app has two AttentionTier replicas (Heavy Mode on, tool-call policy 'content', context strategy
'error'); the shared `main` app has one (Heavy Mode off, policy 'resample', strategy 'truncate'). Both run the
scripted engine, so tool-call scripts (`conftest.SCRIPTS`) stand in for a model that calls tools.
"""

from __future__ import annotations

import json
import re
import uuid
from collections import Counter

import httpx
import pytest

from tests.serve.conftest import API_KEY, SCRIPTED, poll_metrics, tiny_config
from tests.serve.test_app import CHAT, assert_openai_error, msg, post, sse_events

pytestmark = pytest.mark.ray

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}}, "required": ["city"]}}}]
BLOCK = 16  # engine.block_size


@pytest.fixture(scope="module")
def heavy_app(cluster):
    config = tiny_config(attention={"autoscaling": {"min_replicas": 2, "max_replicas": 2}},
                         heavy={"default_trajectories": 2, "max_trajectories": 8, "default_aggregate": "vote"},
                         tool_validation={"policy": "content"}, context={"strategy": "error"},
                         limits={"max_prompt_tokens": 1024})
    url = cluster.deploy("heavy", "/heavy", config, engine_factory=SCRIPTED)
    yield url
    cluster.delete("heavy")


@pytest.fixture(scope="module")
def served(heavy_app) -> str:
    return httpx.get(f"{heavy_app}/v1/models", timeout=30).json()["data"][0]["id"]


def engine_counters(url: str, headers: dict | None = None) -> dict[str, dict[str, float]]:
    """Live per-replica engine counters from /metrics: {series: {replica: value}}."""
    text = httpx.get(f"{url}/metrics", headers=headers or {}, timeout=30).text
    out: dict[str, dict[str, float]] = {}
    for m in re.finditer(r'raymoe_engine_(\w+)_total\{replica="([^"]+)"\} ([0-9.e+]+)', text):
        out.setdefault(m.group(1), {})[m.group(2)] = float(m.group(3))
    return out


def stream(url: str, body: dict) -> list:
    with httpx.stream("POST", url + CHAT, json={**body, "stream": True}, timeout=120,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        assert r.status_code == 200, r.read()
        return sse_events(r.iter_lines())


def tool_call_deltas(events: list) -> list[dict]:
    return [tc for e in events[:-1] for c in e.get("choices", []) for tc in c["delta"].get("tool_calls", [])]


# -- Heavy Mode -------------------------------------------------------------------------------------
def test_eight_trajectories_use_both_replicas_and_prefill_the_prompt_once_per_replica(heavy_app):
    before = engine_counters(heavy_app)
    question = f"[{uuid.uuid4().hex}] " + "please think about this shared and rather long question " * 12
    body = {"messages": msg(question), "max_tokens": 6, "seed": 11, "ignore_eos": True,
            "heavy": {"trajectories": 8, "aggregate": "vote", "extractor": "last_line"}}
    r = post(heavy_app, CHAT, body)
    assert r.status_code == 200, r.text
    data = r.json()
    heavy = data["heavy"]
    assert [t["index"] for t in heavy["trajectories"]] == list(range(8))
    per_replica = Counter(t["replica"] for t in heavy["trajectories"])
    assert len(per_replica) == 2 and sorted(per_replica.values()) == [4, 4], per_replica
    assert heavy["aggregate"] == "vote" and 0 <= heavy["winner"] < 8 and "tally" in heavy
    assert data["usage"]["completion_tokens"] == sum(t["num_tokens"] for t in heavy["trajectories"]) == 48

    after = engine_counters(heavy_app)
    prompt_len = data["usage"]["prompt_tokens"] // 8
    prefilled = sum(after["num_prompt_tokens"].values()) - sum(before["num_prompt_tokens"].values())
    hits = (sum(after["prefix_cache_hit_tokens"].values()) - sum(before["prefix_cache_hit_tokens"].values()))
    # once per replica (2 x prompt), then each of the 6 followers prefills at most its last partial block
    assert prompt_len > 8 * BLOCK and prefilled <= 2 * prompt_len + 6 * BLOCK, (prefilled, prompt_len)
    assert hits >= 6 * (prompt_len - BLOCK), (hits, prompt_len)
    assert data["usage"]["prompt_tokens_details"]["cached_tokens"] >= 6 * (prompt_len - BLOCK)

    text = poll_metrics(heavy_app, r'ray_raymoe_heavy_trajectories_total\{[^}]*replica="(?:[^"]+)"[^}]*\} 4')
    replicas = set(re.findall(r'ray_raymoe_heavy_trajectories_total\{[^}]*replica="([^"]+)"', text))
    assert replicas == set(per_replica), text[-2000:]


def test_reflect_aggregates_with_one_more_generation(heavy_app):
    body = {"messages": msg("What is 2+2?"), "max_tokens": 5, "seed": 3,
            "heavy": {"trajectories": 3, "aggregate": "reflect"}}
    data = post(heavy_app, CHAT, body).json()
    heavy, choice = data["heavy"], data["choices"][0]
    assert heavy["aggregate"] == "reflect" and heavy["winner"] is None and len(heavy["trajectories"]) == 3
    assert choice["index"] == 0 and choice["finish_reason"] in ("stop", "length")
    trajectory_tokens = sum(t["num_tokens"] for t in heavy["trajectories"])
    assert trajectory_tokens < data["usage"]["completion_tokens"] <= trajectory_tokens + 5  # + the reflect pass
    single = post(heavy_app, CHAT, {"messages": msg("What is 2+2?"), "max_tokens": 1}).json()["usage"]
    assert data["usage"]["prompt_tokens"] > 3 * single["prompt_tokens"]  # 3 trajectories + the reflect prompt


def test_best_logprob_streams_progress_then_the_answer(heavy_app):
    body = {"messages": msg("Name a colour."), "max_tokens": 5, "seed": 5, "stream_options": {"include_usage": True},
            "heavy": {"trajectories": 4, "aggregate": "best_logprob"}}
    events = stream(heavy_app, body)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    progress = [c["heavy_progress"] for c in chunks if "heavy_progress" in c]
    assert all(c["choices"] == [] for c in chunks if "heavy_progress" in c)
    kinds = Counter(p["event"] for p in progress)
    assert kinds == {"trajectory_started": 4, "trajectory_finished": 4, "aggregating": 1}
    answer = [c for c in chunks[1:] if c["choices"]]
    assert answer and all(c["choices"][0]["index"] == 0 for c in answer)
    last = answer[-1]
    assert last["choices"][0]["finish_reason"] in ("stop", "length") and last["heavy"]["aggregate"] == "best_logprob"
    finished = {p["index"]: p for p in progress if p["event"] == "trajectory_finished"}
    best = max(finished.values(), key=lambda p: (p["mean_logprob"], -p["index"]))
    assert last["heavy"]["winner"] == best["index"]
    assert chunks[-1]["usage"]["completion_tokens"] == sum(p["num_tokens"] for p in finished.values())


def test_the_model_alias_turns_heavy_mode_on(heavy_app, served):
    ids = [m["id"] for m in httpx.get(f"{heavy_app}/v1/models", timeout=30).json()["data"]]
    assert ids == [served, served + "-heavy"]
    data = post(heavy_app, CHAT, {"model": served + "-heavy", "messages": msg("hi"), "max_tokens": 3}).json()
    assert data["model"] == served and len(data["heavy"]["trajectories"]) == 2  # serve.heavy defaults


@pytest.mark.parametrize("extra, param", [
    ({"heavy": {"trajectories": 0}}, "heavy.trajectories"),
    ({"heavy": {"trajectories": 9}}, "heavy.trajectories"),
    ({"heavy": {"aggregate": "median"}}, "heavy.aggregate"),
    ({"heavy": {"extractor": "regex", "extractor_regex": "(unclosed"}}, "heavy.extractor_regex"),
    ({"heavy": "yes"}, "heavy"),
    ({"heavy": True, "n": 2}, "n"),
    ({"heavy": True, "tools": TOOLS}, "tools"),
])
def test_bad_heavy_requests_are_400_naming_the_param(heavy_app, extra, param):
    assert_openai_error(post(heavy_app, CHAT, {"messages": msg("x"), **extra}), 400, param)


def test_heavy_mode_disabled_is_400(main_app, model_name):
    assert "heavy" in assert_openai_error(post(main_app, CHAT, {"messages": msg("x"), "heavy": True}), 400,
                                          "heavy")["message"]
    assert_openai_error(post(main_app, CHAT, {"messages": msg("x"), "model": model_name + "-heavy"}), 400, "model")


# -- thinking budget --------------------------------------------------------------------------------
def _think_end(main_app) -> int:
    from raymoe.config import ModelConfig
    from raymoe.engine.loading import load_tokenizer, resolve_model_path

    return load_tokenizer(resolve_model_path(ModelConfig(preset="tiny"))).convert_tokens_to_ids("</think>")


@pytest.mark.parametrize("budget_field, budget", [({"thinking_budget": 4}, 4), ({"reasoning_effort": "low"}, 3)])
def test_thinking_budget_closes_the_reasoning_and_the_answer_follows(main_app, budget_field, budget):
    body = {"messages": msg("think about it"), "max_tokens": 16, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, **budget_field}
    choice = post(main_app, CHAT, body).json()["choices"][0]
    ids, end = choice["token_ids"], _think_end(main_app)
    assert end in ids, ids  # the random tiny model never closes its reasoning: the engine did
    assert ids.index(end) <= budget + 1  # + a leading <think>
    assert choice["message"]["content"] and choice["finish_reason"] == "length"
    events = stream(main_app, {**body, "return_token_ids": False})
    reasoning = "".join(c["choices"][0]["delta"].get("reasoning_content") or "" for c in events[:-1])
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in events[:-1])
    assert reasoning == (choice["message"]["reasoning_content"] or "") and content == choice["message"]["content"]


def test_thinking_budget_over_the_limit_is_400(main_app):
    assert_openai_error(post(main_app, CHAT, {"messages": msg("x"), "thinking_budget": 65}), 400, "thinking_budget")
    assert_openai_error(post(main_app, CHAT, {"messages": msg("x"), "reasoning_effort": "max"}), 400,
                        "reasoning_effort")


# -- tool-call validation -----------------------------------------------------------------------------
def test_resample_replaces_a_bad_call_with_a_valid_one(main_app):
    body = {"messages": msg("SCRIPT:badjson_fixed"), "tools": TOOLS, "max_tokens": 60, "seed": 1,
            "return_token_ids": True}
    data = post(main_app, CHAT, body).json()
    choice = data["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and "tool_call_errors" not in choice
    (call,) = choice["message"]["tool_calls"]
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert data["usage"]["completion_tokens"] > len(choice["token_ids"])  # the rejected attempt counts too
    events = stream(main_app, {**body, "return_token_ids": False})
    (streamed,) = tool_call_deltas(events)
    assert json.loads(streamed["function"]["arguments"]) == {"city": "Paris"} and streamed["index"] == 0


@pytest.mark.parametrize("script, kind", [("undeclared", "undeclared_tool"), ("badjson", "invalid_json"),
                                          ("schema", "schema_violation")])
def test_out_of_attempts_a_bad_call_is_returned_as_content(main_app, script, kind):
    body = {"messages": msg(f"SCRIPT:{script}"), "tools": TOOLS, "max_tokens": 60}
    choice = post(main_app, CHAT, body).json()["choices"][0]
    assert "tool_calls" not in choice["message"] and choice["finish_reason"] == "stop"
    assert "[tool call not executed:" in choice["message"]["content"]
    assert [e["kind"] for e in choice["tool_call_errors"]] == [kind]
    events = stream(main_app, body)
    assert tool_call_deltas(events) == []
    finals = [c["choices"][0] for c in events[:-1] if c["choices"][0]["finish_reason"]]
    assert finals[0]["tool_call_errors"][0]["kind"] == kind


@pytest.mark.parametrize("script, kind", [("badjson", "invalid_json"), ("schema", "schema_violation")])
def test_content_policy_returns_bad_calls_as_content_at_once(heavy_app, script, kind):
    body = {"messages": msg(f"SCRIPT:{script}"), "tools": TOOLS, "max_tokens": 60}
    data = post(heavy_app, CHAT, body).json()
    choice = data["choices"][0]
    assert "tool_calls" not in choice["message"] and choice["tool_call_errors"][0]["kind"] == kind
    assert data["usage"]["completion_tokens"] == len(  # generated once: no re-sampling under 'content'
        post(heavy_app, CHAT, {**body, "return_token_ids": True}).json()["choices"][0]["token_ids"])
    assert tool_call_deltas(stream(heavy_app, body)) == []


def test_valid_calls_pass_and_an_invalid_sibling_is_dropped(heavy_app):
    events = stream(heavy_app, {"messages": msg("SCRIPT:valid_then_undeclared"), "tools": TOOLS, "max_tokens": 64})
    (call,) = tool_call_deltas(events)
    assert call["index"] == 0 and json.loads(call["function"]["arguments"]) == {"city": "Oslo"}
    final = next(c["choices"][0] for c in events[:-1] if c["choices"] and c["choices"][0]["finish_reason"])
    assert final["finish_reason"] == "tool_calls" and final["tool_call_errors"][0]["name"] == "get_stock"


def test_invalid_tool_declarations_are_400(main_app):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}]
    assert_openai_error(post(main_app, CHAT, {"messages": msg("x"), "tools": tools}), 400,
                        "tools[0].function.parameters")


# -- context management ------------------------------------------------------------------------------
def agent_conversation(num_calls: int) -> list[dict]:
    messages = [{"role": "system", "content": "You are a research agent."},
                {"role": "user", "content": "Collect the weather for every city, then summarise."}]
    for i in range(num_calls):
        call_id = f"functions.get_weather:{i}"
        messages.append({"role": "assistant", "content": "", "reasoning_content": f"city {i} next",
                         "tool_calls": [{"id": call_id, "type": "function", "function": {
                             "name": "get_weather", "arguments": json.dumps({"city": f"city-{i}"})}}]})
        messages.append({"role": "tool", "tool_call_id": call_id,
                         "content": f"city-{i}: " + "sunny, 21 C, light wind from the west. " * 4})
    return messages


def test_a_300_tool_call_conversation_is_fitted_and_reported(main_app):
    body = {"messages": agent_conversation(300), "tools": TOOLS, "max_tokens": 4}
    r = post(main_app, CHAT, body)
    assert r.status_code == 200, r.text
    data = r.json()
    report = data["context_management"]
    assert report["strategy"] == "truncate" and report["original_tokens"] > 10 * 1024
    assert report["dropped_messages"] > 0 and data["usage"]["prompt_tokens"] == report["final_tokens"] <= 1024
    events = stream(main_app, body)
    assert events[0]["context_management"] == report and "context_management" not in events[1]


def test_context_strategy_error_keeps_the_400(heavy_app):
    r = post(heavy_app, CHAT, {"messages": agent_conversation(60), "tools": TOOLS, "max_tokens": 4})
    assert assert_openai_error(r, 400, "messages")["code"] == "context_length_exceeded"
