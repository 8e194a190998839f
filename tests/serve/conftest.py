"""Serve test harness: one Ray + Serve for the whole session, apps deployed on it per need.

Ray takes seconds to start and Serve more, so every serve test shares one cluster (own short temp
dir under /tmp) and one proxy port; each test module deploys the apps it needs under its own route
prefix and deletes the ones it does not share. The main app runs the real tiny engine wrapped in
`ScriptedEngine`, which replays canned K2 outputs (reasoning, tool calls) for prompts carrying a
`SCRIPT:<name>` tag: a random tiny model never emits tool-call markup on its own.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from raymoe.engine.async_engine import EngineDeadError
from raymoe.engine.request import CompletionOutput, RequestMetrics, RequestOutput, SamplingParams

REPO = Path(__file__).resolve().parents[2]
API_KEY = "sk-raymoe-test"


def _call(name: str, arguments: str, index: int = 0) -> str:
    return (f"<|tool_call_begin|>functions.{name}:{index}<|tool_call_argument_begin|>{arguments}"
            "<|tool_call_end|>")


def _calls(*calls: str) -> str:
    return f"<|tool_calls_section_begin|>{''.join(calls)}<|tool_calls_section_end|><|im_end|>"


_THINK = "<think>The user wants the weather, I should call the tool.</think>"
SCRIPTS = {
    "weather": _THINK + _calls(_call("get_weather", '{"city": "Paris", "unit": "celsius"}')),
    "answer": "<think>Two plus two is four.</think>The answer is 4.<|im_end|>",
    # tool-call validation (tests declare get_weather(city: string, required))
    "undeclared": _THINK + "Checking." + _calls(_call("get_stock", '{"ticker": "ACME"}')),
    "badjson": _THINK + _calls(_call("get_weather", '{"city": "Paris"')),
    "schema": _THINK + _calls(_call("get_weather", '{"town": "Paris"}')),
    "badjson_fixed": _THINK + _calls(_call("get_weather", '{"city": "Paris"')),
    "valid_then_undeclared": "<think>Two calls.</think>" + _calls(_call("get_weather", '{"city": "Oslo"}'),
                                             _call("get_stock", '{"ticker": "ACME"}', 1)),
}
# What a re-sampled attempt writes after the kept prefix (from the bad call's begin marker on); scripts not
# listed repeat their bad call, so re-sampling runs out of attempts.
RESAMPLED = {"badjson_fixed": _call("get_weather", '{"city": "Paris"}') + "<|tool_calls_section_end|><|im_end|>"}


def _metrics(arrival: float) -> RequestMetrics:
    now = time.monotonic()
    return RequestMetrics(arrival, now, now, now, None, 0.0, now - arrival, [], 0, 0)


class ScriptedEngine:
    """The real tiny `AsyncEngine`, except prompts tagged `SCRIPT:<name>` replay `SCRIPTS[name]`.

    A prompt that already ends with the script's output up to one of its tool-call begin markers is a
    re-sampled attempt (the ingress rewinds to a rejected call): the replay continues from there with
    `RESAMPLED[name]`, or the script's own rest. `SCRIPT:die` marks the engine dead (as after a failed
    step): that request and later ones get `EngineDeadError` and `is_healthy` turns False.
    """

    def __init__(self, inner: Any):
        self.inner = inner
        self.core = inner.core
        self.tokenizer = inner.tokenizer
        self.dead = False

    @property
    def is_healthy(self) -> bool:
        return not self.dead and self.inner.is_healthy

    def stats(self) -> dict[str, float]:
        return self.inner.stats()

    async def abort(self, request_id: str) -> None:
        await self.inner.abort(request_id)

    def shutdown(self) -> None:
        self.inner.shutdown()

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        if self.dead:
            raise EngineDeadError("engine is dead: scripted", safe_elsewhere=True)
        prompt = self.tokenizer.decode(prompt_token_ids)
        if "SCRIPT:die" in prompt:
            self.dead = True
            raise EngineDeadError("engine step failed: scripted death")
        name = max((n for n in SCRIPTS if f"SCRIPT:{n}" in prompt), key=len, default=None)  # badjson_fixed wins
        if name is None:
            async for out in self.inner.generate(request_id, prompt_token_ids, params):
                yield out
            return
        ids = self.tokenizer.encode(SCRIPTS[name], add_special_tokens=False)
        begin = self.tokenizer.convert_tokens_to_ids("<|tool_call_begin|>")
        for cut in (i for i, t in enumerate(ids) if t == begin):
            if prompt_token_ids[-cut:] == ids[:cut]:
                rest = RESAMPLED.get(name)
                ids = self.tokenizer.encode(rest, add_special_tokens=False) if rest else ids[cut:]
                break
        arrival = time.monotonic()
        for i, tid in enumerate(ids[: params.max_tokens]):
            await asyncio.sleep(0.002)
            text = self.tokenizer.decode(ids[: i + 1], skip_special_tokens=True)
            prev = self.tokenizer.decode(ids[:i], skip_special_tokens=True)
            stop = tid in params.stop_token_ids
            last = stop or i + 1 == min(len(ids), params.max_tokens)
            reason = ("stop" if stop else "length") if last else None
            logprobs = [{tid: -0.5}] if params.logprobs is not None else None
            yield RequestOutput(request_id, prompt_token_ids,
                                [CompletionOutput(0, text[len(prev):], [tid], logprobs, reason)], last,
                                _metrics(arrival))
            if last:
                return


def scripted_engine(config: Any) -> ScriptedEngine:
    """engine_factory for the tests (import path `tests.serve.conftest:scripted_engine`)."""
    from raymoe.serve.tier import default_engine_factory

    return ScriptedEngine(default_engine_factory(config))


SCRIPTED = "tests.serve.conftest:scripted_engine"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_config(**serve: Any) -> dict[str, Any]:
    """A config dict for the cached tiny model with CPU-free replicas (2-core machines)."""
    deployment = {"num_cpus": 0, "max_ongoing_requests": 128}
    tree: dict[str, Any] = {
        "model": {"preset": "tiny"},
        "engine": {"max_num_seqs": 64},
        "serve": {"ingress": dict(deployment), "attention": dict(deployment),
                  "limits": {"max_tokens": 64, "default_max_tokens": 16, "max_n": 4}},
    }
    for key, value in serve.items():
        if isinstance(value, dict) and isinstance(tree["serve"].get(key), dict):
            tree["serve"][key] = {**tree["serve"][key], **value}
        else:
            tree["serve"][key] = value
    return tree


class Cluster:
    def __init__(self, port: int):
        self.port = port

    def url(self, prefix: str = "") -> str:
        return f"http://127.0.0.1:{self.port}{prefix.rstrip('/')}"

    def deploy(self, name: str, prefix: str, config: dict[str, Any], **kwargs: Any) -> str:
        from ray import serve

        from raymoe.serve.builders import build_app

        serve.run(build_app(config, **kwargs), name=name, route_prefix=prefix)
        return self.url(prefix)

    def delete(self, name: str) -> None:
        from ray import serve

        serve.delete(name)


@pytest.fixture(scope="session")
def cluster() -> Any:
    """Ray + Serve on 127.0.0.1 for the session (Ray 2.60's default token auth left on)."""
    import ray
    from ray import serve

    from raymoe.model.tiny import cached_tiny

    cache = os.environ.setdefault("RAYMOE_CACHE", str(Path(tempfile.gettempdir()) / "raymoe-test-cache"))
    cached_tiny("tiny")  # once, before replicas race to create it
    # Replicas import the scripted engine from this repo and must not oversubscribe 2 cores.
    env = {"RAYMOE_CACHE": cache, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    temp = tempfile.mkdtemp(prefix="rms", dir="/tmp")
    # Metrics reach the agent every second (default 10 s), so /metrics tests poll briefly.
    ray.init(num_cpus=4, _temp_dir=temp, include_dashboard=False, log_to_driver=bool(os.environ.get("RAYMOE_LOGS")),
             runtime_env={"env_vars": env}, _system_config={"metrics_report_interval_ms": 1000})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield Cluster(port)
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="session")
def main_app(cluster: Cluster) -> str:
    """Base URL of the shared app: scripted tiny engine, API key required."""
    limits = {"max_body_bytes": 256 << 10, "max_prompt_tokens": 1024}
    # Heavy Mode off here (tested on its own app; it keeps the fuzzer's requests cheap); small effort budgets.
    config = tiny_config(api_keys=[API_KEY], limits=limits, heavy={"enabled": False},
                         reasoning={"low": 3, "medium": 6, "high": 12, "max_budget": 64})
    return cluster.deploy("main", "/", config, engine_factory=SCRIPTED)


@pytest.fixture(scope="session")
def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="session")
def model_name(main_app: str, auth: dict[str, str]) -> str:
    import httpx

    return httpx.get(f"{main_app}/v1/models", headers=auth).json()["data"][0]["id"]


def poll_metrics(url: str, pattern: str, headers: dict[str, str] | None = None, timeout_s: float = 30.0) -> str:
    """/metrics text once `pattern` (a regex) matches it: Ray exports recorded metrics with a delay."""
    import re

    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        text = httpx.get(f"{url}/metrics", headers=headers or {}, timeout=30).text
        if re.search(pattern, text) or time.monotonic() > deadline:
            return text
        time.sleep(0.5)
