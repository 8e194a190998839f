"""A lost AttentionTier replica costs its KV cache, not its requests: the ingress re-submits them.

Unit level: `TierClient` against a fake handle whose first replica dies mid-stream. App level: two
tier replicas, one killed (`ray.kill`) while it streams; every client stream completes with the
same greedy tokens as an uninterrupted run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re

import httpx
import pytest
from ray.exceptions import ActorDiedError

from raymoe.engine.request import SamplingParams
from raymoe.serve.protocol import ErrorResponse, unavailable
from raymoe.serve.tier import ENGINE_DEAD, TierClient, TierOutput, TierRequest
from tests.serve.conftest import poll_metrics, tiny_config


def next_token(ids: list[int]) -> int:
    """A deterministic toy 'model': the same history always gives the same next token."""
    return (sum(ids) * 31 + len(ids)) % 26


class Letters:
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(97 + i) for i in ids)


class FakeStream:
    def __init__(self, items):
        self.items = items
        self.cancelled = False

    def __aiter__(self):
        return self._gen()

    async def _gen(self):
        for item in self.items:
            await asyncio.sleep(0)
            if isinstance(item, BaseException):
                raise item
            yield item

    def cancel(self) -> None:
        self.cancelled = True


class FakeTier:
    """`handle.options(stream=True).generate.remote(req)`; the first `die_after` tokens, then ActorDiedError."""

    def __init__(self, die_after: int | None, die_times: int = 1, dead_engine_times: int = 0):
        self.die_after = die_after
        self.die_times = die_times
        self.dead_engine_times = dead_engine_times  # first answers: the replica's engine is dead
        self.requests: list[TierRequest] = []
        self.streams: list[FakeStream] = []
        self.generate = self
        self.is_healthy = self

    def options(self, **_):
        return self

    def remote(self, request: TierRequest) -> FakeStream:
        """Outputs with the engine's text contract: stop-string prefixes held back, stop strings cut."""
        self.requests.append(request)
        if len(self.requests) <= self.dead_engine_times:
            err = unavailable("the engine failed; retry: boom")
            self.streams.append(FakeStream([dataclasses.replace(err, code=ENGINE_DEAD)]))
            return self.streams[-1]
        params = request.params
        ids, out, items, sent = list(request.prompt_token_ids), [], [], 0
        hold = max((len(s) for s in params.stop), default=1) - 1
        dies = self.die_after is not None and len(self.requests) <= self.die_times
        for i in range(params.max_tokens):
            if dies and i == self.die_after:
                items.append(ActorDiedError())
                break
            tok = next_token(ids)
            ids.append(tok)
            out.append(tok)
            text = Letters().decode(out)
            hits = [text.find(s) for s in params.stop if s in text]
            last = bool(hits) or i + 1 == params.max_tokens
            end = min(hits) if hits else (len(text) if last else max(sent, len(text) - hold))
            reason = ("stop" if hits else "length") if last else None
            items.append(TierOutput([tok], text[sent:end], None, reason, last))
            sent = end
            if last:
                break
        self.streams.append(FakeStream(items))
        return self.streams[-1]


def collect(client: TierClient, prompt: list[int], params: SamplingParams) -> list:
    async def run():
        return [item async for item in client.stream("req", prompt, params, Letters())]

    return asyncio.run(run())


def test_resubmission_continues_with_prompt_plus_produced_tokens():
    params = SamplingParams(temperature=0, max_tokens=12)
    reference = collect(TierClient(FakeTier(None)), [1, 2, 3], params)
    tier = FakeTier(die_after=5)
    resumed = collect(TierClient(tier, resubmit_delay_s=0), [1, 2, 3], params)
    assert [t for o in resumed for t in o.token_ids] == [t for o in reference for t in o.token_ids]
    assert "".join(o.text for o in resumed) == "".join(o.text for o in reference)
    assert resumed[-1].finished and resumed[-1].finish_reason == "length"
    second = tier.requests[1]
    assert second.prompt_token_ids == [1, 2, 3] + [t for o in reference[:5] for t in o.token_ids]
    assert second.params.max_tokens == 7 and second.request_id == "req.r1"


def test_stop_string_across_the_seam_ends_the_stream_and_cancels_the_replica():
    params = SamplingParams(temperature=0, max_tokens=12)
    text = "".join(o.text for o in collect(TierClient(FakeTier(None)), [1, 2, 3], params))
    stop = text[4:7]  # spans the tokens produced before (4, 5) and after (6) the replica dies
    tier = FakeTier(die_after=5)
    out = collect(TierClient(tier, resubmit_delay_s=0), [1, 2, 3],
                  SamplingParams(temperature=0, max_tokens=12, stop=[stop]))
    assert "".join(o.text for o in out) == text[: text.index(stop)]
    assert out[-1].finish_reason == "stop" and tier.streams[-1].cancelled


def test_replicas_that_keep_dying_give_a_503_value():
    out = collect(TierClient(FakeTier(die_after=2, die_times=99), max_resubmits=2, resubmit_delay_s=0), [1],
                  SamplingParams(max_tokens=10))
    assert isinstance(out[-1], ErrorResponse) and out[-1].status_code == 503


def test_replicas_already_gone_do_not_use_up_the_resubmission_budget_but_are_bounded_in_time():
    """A submission that dies before its first token (Serve still routing to a replica it has not yet
    dropped) is retried without counting as a lost stream; an endless run of them ends in a 503 once
    `dead_replica_window_s` has passed."""
    params = SamplingParams(temperature=0, max_tokens=6)
    reference = collect(TierClient(FakeTier(None)), [1, 2], params)
    tier = FakeTier(die_after=0, die_times=5)  # five dead-on-arrival submissions, then a live replica
    out = collect(TierClient(tier, max_resubmits=2, resubmit_delay_s=0), [1, 2], params)
    assert [t for o in out for t in o.token_ids] == [t for o in reference for t in o.token_ids]
    assert len(tier.requests) == 6 and tier.requests[-1].request_id == "req.r5"
    out = collect(TierClient(FakeTier(die_after=0, die_times=99), resubmit_delay_s=0, dead_replica_window_s=0),
                  [1, 2], params)
    assert isinstance(out[-1], ErrorResponse) and out[-1].status_code == 503
    # the window bounds a run of token-less submissions only: losses of streaming replicas, however far
    # apart, are bounded by max_resubmits alone
    tier = FakeTier(die_after=1, die_times=2)
    out = collect(TierClient(tier, max_resubmits=2, resubmit_delay_s=0, dead_replica_window_s=0), [1, 2], params)
    assert [t for o in out for t in o.token_ids] == [t for o in reference for t in o.token_ids]


def test_a_replica_whose_engine_died_is_left_for_another():
    """The tier answers with an engine-dead 503 until Serve replaces that replica: the client resubmits
    (the user sees the tokens, not the 503); only an endless run of them ends in the 503."""
    params = SamplingParams(temperature=0, max_tokens=6)
    reference = collect(TierClient(FakeTier(None)), [1, 2], params)
    tier = FakeTier(None, dead_engine_times=4)
    out = collect(TierClient(tier, max_resubmits=1, resubmit_delay_s=0), [1, 2], params)
    assert [t for o in out for t in o.token_ids] == [t for o in reference for t in o.token_ids]
    assert not any(isinstance(o, ErrorResponse) for o in out) and len(tier.requests) == 5
    out = collect(TierClient(FakeTier(None, dead_engine_times=99), resubmit_delay_s=0, dead_replica_window_s=0),
                  [1, 2], params)
    assert isinstance(out[-1], ErrorResponse) and out[-1].status_code == 503


# -- app level --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ha_app(cluster):
    config = tiny_config(attention={"autoscaling": {"min_replicas": 2, "max_replicas": 2}},
                         limits={"max_tokens": 128})
    url = cluster.deploy("ha", "/ha", config)
    yield url
    cluster.delete("ha")


def _busiest_replica(metrics: str) -> str:
    running = {m.group(1): float(m.group(2))
               for m in re.finditer(r'raymoe_engine_num_running\{replica="([^"]+)"\} ([0-9.]+)', metrics)}
    assert len(running) == 2, metrics
    replica, load = max(running.items(), key=lambda kv: kv[1])
    assert load > 0, running
    return replica


@pytest.mark.ray
def test_killing_a_replica_mid_stream_loses_no_request(ha_app):
    import ray

    prompts = [f"tell me story number {i}" for i in range(6)]
    body = {"max_tokens": 96, "temperature": 0, "ignore_eos": True, "return_token_ids": True}

    def chat(client: httpx.Client, prompt: str) -> list[int]:
        r = client.post("/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": prompt}]})
        return r.json()["choices"][0]["token_ids"]

    with httpx.Client(base_url=ha_app, timeout=120) as client:
        reference = [chat(client, p) for p in prompts]

    async def stream(client: httpx.AsyncClient, prompt: str, started: asyncio.Event, count: list) -> list[int]:
        ids: list[int] = []
        request = {**body, "stream": True, "messages": [{"role": "user", "content": prompt}]}
        async with client.stream("POST", "/v1/chat/completions", json=request) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                for choice in chunk["choices"]:
                    ids += choice.get("token_ids") or []
                if len(ids) >= 4 and not started.is_set():
                    count[0] += 1
                    if count[0] == len(prompts):
                        started.set()
        return ids

    async def run() -> tuple[list, str]:
        started, count = asyncio.Event(), [0]
        async with httpx.AsyncClient(base_url=ha_app, timeout=120) as client:
            tasks = [asyncio.create_task(stream(client, p, started, count)) for p in prompts]
            await asyncio.wait_for(started.wait(), 60)
            victim = _busiest_replica((await client.get("/metrics")).text)
            name = f"SERVE_REPLICA::ha#AttentionTier#{victim}"
            ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
            results = await asyncio.gather(*tasks)
            return results, (await client.get("/metrics")).text

    results, _ = asyncio.run(run())
    assert results == reference
    pattern = r"ray_raymoe_resubmissions_total\{[^}]*\} ([0-9.]+)"
    match = re.search(pattern, poll_metrics(ha_app, pattern))
    assert match and float(match.group(1)) >= 1
