"""The official `openai` client against the app, and greedy HTTP output == `LLM.generate` on the same ids."""

from __future__ import annotations

import asyncio
import json

import pytest
from openai import AsyncOpenAI, AuthenticationError, BadRequestError, OpenAI

from tests.serve.conftest import API_KEY

pytestmark = pytest.mark.ray

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def client(main_app) -> OpenAI:
    return OpenAI(base_url=f"{main_app}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def llm():
    from raymoe.llm import LLM

    with LLM(preset="tiny", max_num_seqs=8) as offline:
        yield offline


def test_sync_chat_with_tools_returns_tool_calls(client, model_name):
    r = client.chat.completions.create(model=model_name, max_tokens=60, tools=[WEATHER_TOOL],
                                       messages=[{"role": "user", "content": "SCRIPT:weather in Paris?"}])
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.id == "functions.get_weather:0" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] == "Paris"
    assert choice.message.model_extra["reasoning_content"].startswith("The user wants the weather")
    assert r.usage.prompt_tokens > 0 and r.usage.prompt_tokens_details.cached_tokens >= 0


def test_tool_result_round_trip(client, model_name):
    """The assistant's call and the tool's answer go back in; reasoning_content is accepted on input."""
    messages = [
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": "", "reasoning_content": "call the tool",
         "tool_calls": [{"id": "functions.get_weather:0", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "sunny, 21C"},
        {"role": "user", "content": "SCRIPT:answer"}]
    r = client.chat.completions.create(model=model_name, messages=messages, tools=[WEATHER_TOOL], max_tokens=40)
    assert r.choices[0].message.content == "The answer is 4." and r.choices[0].finish_reason == "stop"


def test_sync_stream_reassembles_tool_call_and_reports_usage(client, model_name):
    stream = client.chat.completions.create(model=model_name, max_tokens=60, tools=[WEATHER_TOOL], stream=True,
                                            stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": "SCRIPT:weather"}])
    reasoning, args, finish, usage = "", "", None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            reasoning += choice.delta.model_extra.get("reasoning_content") or ""
            for tc in choice.delta.tool_calls or []:
                args += tc.function.arguments or ""
            finish = choice.finish_reason or finish
    assert reasoning == "The user wants the weather, I should call the tool."
    assert json.loads(args) == {"city": "Paris", "unit": "celsius"} and finish == "tool_calls"
    assert usage.completion_tokens > 0


def test_async_client_concurrent_streams(main_app, model_name):
    async def run() -> list[str]:
        async with AsyncOpenAI(base_url=f"{main_app}/v1", api_key=API_KEY, max_retries=0) as aclient:
            async def one(i: int) -> str:
                stream = await aclient.chat.completions.create(
                    model=model_name, messages=[{"role": "user", "content": f"SCRIPT:answer {i}"}],
                    max_tokens=40, stream=True)
                text = ""
                async for chunk in stream:
                    for c in chunk.choices:
                        text += c.delta.content or ""
                return text

            non_stream = await aclient.chat.completions.create(
                model=model_name, messages=[{"role": "user", "content": "hello"}], max_tokens=4)
            assert non_stream.choices[0].finish_reason in ("stop", "length")
            return await asyncio.gather(*[one(i) for i in range(8)])

    assert asyncio.run(run()) == ["The answer is 4."] * 8


def test_client_errors_are_typed(main_app, client, model_name):
    with pytest.raises(BadRequestError) as e:
        client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "x"}], n=99)
    assert e.value.body["param"] == "n"
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=f"{main_app}/v1", api_key="wrong", max_retries=0).models.list()


def test_greedy_chat_over_http_equals_llm_generate(client, model_name, llm):
    from raymoe.engine.request import SamplingParams
    from raymoe.tokenizer.chat import ChatEncoder

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about MoE."}]
    r = client.chat.completions.create(model=model_name, messages=messages, max_tokens=24, temperature=0,
                                       extra_body={"return_token_ids": True})
    encoder = ChatEncoder(llm.tokenizer)
    ids = encoder.encode_messages(messages)
    out = llm.generate(prompt_token_ids=[ids], sampling_params=SamplingParams(
        temperature=0, max_tokens=24, stop_token_ids=encoder.stop_token_ids))[0].outputs[0]
    assert r.model_extra["prompt_token_ids"] == ids
    assert r.choices[0].model_extra["token_ids"] == out.token_ids
    message = r.choices[0].message
    assert (message.model_extra.get("reasoning_content") or "") + (message.content or "") == out.text.lstrip()


def test_greedy_completion_over_http_equals_llm_generate(client, model_name, llm):
    from raymoe.engine.request import SamplingParams

    r = client.completions.create(model=model_name, prompt="The experts of a mixture", max_tokens=16, temperature=0)
    out = llm.generate(["The experts of a mixture"], SamplingParams(temperature=0, max_tokens=16))[0].outputs[0]
    assert r.choices[0].text == out.text and r.usage.completion_tokens == len(out.token_ids)
