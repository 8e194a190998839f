"""The wire format without Ray: request validation, error shape, choice assembly, config -> Serve options."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from raymoe.config import DeploymentConfig, ServeConfig
from raymoe.serve.builders import deployment_options, validate_config
from raymoe.serve.choices import ChatChoiceState, ReasoningOnlyParser, TextChoiceState, TokenText
from raymoe.serve.errors import resolve_api_keys
from raymoe.serve.protocol import ChatCompletionRequest, CompletionRequest, ErrorResponse, bad_request, unavailable
from raymoe.serve.respond import merge_streams


class CharTokenizer:
    """Token id = code point: enough to check logprob formatting."""

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(map(chr, ids))


def chat(**fields):
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **fields})


def test_unknown_top_level_fields_are_accepted_and_ignored():
    req = chat(vendor_extension={"x": 1}, logit_bias={"1": 2})
    assert not hasattr(req, "vendor_extension")


@pytest.mark.parametrize("field, value", [
    ("temperature", "hot"), ("temperature", 2.5), ("max_tokens", 1.5), ("max_tokens", 0), ("n", True),
    ("stream", "yes"), ("top_logprobs", 21), ("seed", 2**64), ("top_p", 0), ("stop", 3),
])
def test_wrong_types_and_out_of_range_values_are_rejected(field, value):
    with pytest.raises(ValidationError) as e:
        chat(**{field: value})
    assert e.value.errors()[0]["loc"][0] == field


@pytest.mark.parametrize("message", [{"role": "bot", "content": "x"}, {"content": "x"},
                                     {"role": "user", "content": 5}, {"role": "tool", "content": "x"},
                                     {"role": "user", "content": [{"type": "image_url"}]}])
def test_malformed_messages_are_rejected(message):
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"messages": [message]})


def test_messages_accept_list_content_tool_calls_and_reasoning():
    req = ChatCompletionRequest.model_validate({"messages": [
        {"role": "user", "content": [{"type": "text", "text": "weather?"}]},
        {"role": "assistant", "content": "", "reasoning_content": "call it",
         "tool_calls": [{"id": "functions.w:0", "type": "function", "function": {"name": "w", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "functions.w:0", "content": "sunny"}]})
    assert req.messages[1].tool_calls[0].function.name == "w"


def test_completion_prompt_forms():
    for prompt in ("text", ["a", "b"], [1, 2, 3], [[1, 2], [3]]):
        assert CompletionRequest.model_validate({"prompt": prompt}).prompt == prompt
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"prompt": [1, "a"]})


def test_error_values_have_openai_shape():
    assert bad_request("bad n", "n").to_dict() == {
        "error": {"message": "bad n", "type": "invalid_request_error", "param": "n", "code": None}}
    err = unavailable("busy", retry_after_s=2, status_code=429)
    assert (err.status_code, err.retry_after_s, err.type) == (429, 2, "rate_limit_error")
    assert isinstance(err, ErrorResponse)


def test_reasoning_only_parser_keeps_tool_markup_in_content():
    p = ReasoningOnlyParser()
    parts = [p.feed(t) for t in ("<thi", "nk>why</th", "ink>call <|tool_calls_section_begin|>x")] + [p.finish()]
    reasoning = "".join(d.reasoning_content or "" for d in parts if d)
    content = "".join(d.content or "" for d in parts if d)
    assert (reasoning, content) == ("why", "call <|tool_calls_section_begin|>x")


def test_reasoning_only_parser_treats_unclosed_output_as_reasoning():
    p = ReasoningOnlyParser()
    parts = [p.feed("no think tag at all"), p.finish()]
    assert "".join(d.reasoning_content for d in parts if d) == "no think tag at all"


def test_chat_choice_streams_tool_call_deltas_and_ends_with_tool_calls():
    state = ChatChoiceState(0, True, None, TokenText(CharTokenizer()))
    pieces = ["<think>r</think>", "<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0",
              '<|tool_call_argument_begin|>{"a":', " 1}<|tool_call_end|><|tool_calls_section_end|>"]
    chunks = [state.update([1], text, None, False, None) for text in pieces]
    final = state.update([2], "", None, True, "stop")
    deltas = [c["delta"] for c in chunks if c]
    assert deltas[0] == {"reasoning_content": "r"}
    calls = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert {k: calls[0][k] for k in ("index", "id", "type")} == {"index": 0, "id": "functions.f:0", "type": "function"}
    assert calls[0]["function"]["name"] == "f" and all("id" not in tc for tc in calls[1:])
    assert "".join(tc["function"]["arguments"] for tc in calls) == '{"a": 1}'
    assert final["finish_reason"] == "tool_calls"
    message = state.message()["message"]
    assert message["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"a": 1}'}
    assert message["content"] is None and message["reasoning_content"] == "r"


def test_chat_logprobs_list_the_chosen_token_and_the_top_n():
    state = ChatChoiceState(0, False, 1, TokenText(CharTokenizer()))
    choice = state.update([ord("b")], "b", [{ord("a"): -0.1, ord("b"): -2.0}], True, "length")
    entry = choice["logprobs"]["content"][0]
    assert entry["token"] == "b" and entry["logprob"] == -2.0 and entry["bytes"] == [98]
    assert entry["top_logprobs"] == [{"token": "a", "logprob": -0.1, "bytes": [97]}]
    assert choice["finish_reason"] == "length"


def test_text_choice_logprobs_carry_offsets():
    state = TextChoiceState(0, 0, TokenText(CharTokenizer()))
    state.update([ord("h"), ord("i")], "hi", [{ord("h"): -1.0}, {ord("i"): float("-inf")}], True, "stop")
    final = state.final()
    assert final["logprobs"]["text_offset"] == [0, 1]
    assert final["logprobs"]["token_logprobs"] == [-1.0, -9999.0]  # -inf clamped: JSON has no infinity
    assert final["text"] == "hi" and final["finish_reason"] == "stop"


def test_api_keys_come_from_config_and_env():
    cfg = ServeConfig(api_keys=["a"], api_keys_env="KEYS")
    assert resolve_api_keys(cfg, {"KEYS": " b, ,c"}) == {"a", "b", "c"}
    assert resolve_api_keys(ServeConfig(), {}) == frozenset()


def test_merge_streams_interleaves_and_closes_every_stream():
    closed = []

    async def gen(name, n):
        try:
            for i in range(n):
                await asyncio.sleep(0)
                yield f"{name}{i}"
        finally:
            closed.append(name)

    async def run():
        merged = merge_streams([gen("a", 3), gen("b", 100)])
        got = [await anext(merged) for _ in range(4)]
        await merged.aclose()
        return got

    got = asyncio.run(run())
    assert {g[1][0] for g in got} == {"a", "b"} and sorted(closed) == ["a", "b"]


def test_build_config_errors_name_field_and_value():
    with pytest.raises(ValueError, match=r"serve\.port = 70000"):
        validate_config({"serve": {"port": 70000}})
    with pytest.raises(ValueError, match=r"serve\.limits\.typo"):
        validate_config({"serve": {"limits": {"typo": 1}}})
    with pytest.raises(ValueError, match=r"default_max_tokens \(99\) must be <= max_tokens \(10\)"):
        validate_config({"serve": {"limits": {"max_tokens": 10, "default_max_tokens": 99}}})


def test_deployment_options_carry_autoscaling_backpressure_and_resources():
    cfg = DeploymentConfig.model_validate({
        "autoscaling": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 3},
        "num_gpus": 1, "resources": {"attention": 1}, "max_queued_requests": 16,
        "backpressure_status_code": 429, "retry_after_s": 2})
    opts = deployment_options(cfg)
    assert opts["autoscaling_config"]["max_replicas"] == 4
    assert opts["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1.0, "resources": {"attention": 1.0}}
    assert opts["backpressure_config"] == {"status_code": 429, "retry_after_s": 2.0}
    assert opts["max_queued_requests"] == 16


def test_ignore_eos_drops_the_templates_end_of_turn_ids():
    """The ingress stops chats on the template's end-of-turn ids unless the request sets ignore_eos.

    `_params` only reads `self.config.limits`, `self.config.default_temperature` and
    `self.info.max_model_len`, so it runs here on the Serve deployment's class without a replica.
    """
    from types import SimpleNamespace

    from raymoe.serve.ingress import OpenAiIngress

    ingress = SimpleNamespace(config=ServeConfig(), info=SimpleNamespace(max_model_len=4096))
    params = OpenAiIngress.func_or_class._params
    end_of_turn = [7, 9]
    for ignore_eos, want in ((False, end_of_turn), (True, [])):
        body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                     ignore_eos=ignore_eos)
        [p] = params(ingress, body, 3, 8, "max_tokens", "messages", None, end_of_turn, 1)
        assert p.stop_token_ids == want and p.ignore_eos is ignore_eos


def test_min_tokens_reaches_the_engine_and_is_bounded_by_max_tokens():
    from types import SimpleNamespace

    from raymoe.serve.ingress import OpenAiIngress

    ingress = SimpleNamespace(config=ServeConfig(), info=SimpleNamespace(max_model_len=4096))
    params = OpenAiIngress.func_or_class._params
    ok = CompletionRequest(model="m", prompt="hi", max_tokens=8, min_tokens=5)
    [p] = params(ingress, ok, 3, 8, "max_tokens", "prompt", None, [], 1)
    assert p.min_tokens == 5
    too_many = CompletionRequest(model="m", prompt="hi", max_tokens=8, min_tokens=9)
    err = params(ingress, too_many, 3, 8, "max_tokens", "prompt", None, [], 1)
    assert isinstance(err, ErrorResponse) and "min_tokens" in err.message and err.status_code == 400
    with pytest.raises(ValidationError, match="min_tokens"):
        CompletionRequest(model="m", prompt="hi", min_tokens=-1)
