"""AsyncEngine (the serving face): streaming, abort, and what each request learns when a step fails.

A failing step kills the engine (Serve then replaces the replica). The requests of that step get an
EngineDeadError that must not be retried elsewhere (one of them may be what broke the engine); a
request still waiting in the queue, or arriving later, had no part in it and is marked safe to resubmit.
"""

from __future__ import annotations

import asyncio

import pytest

from raymoe.config import RayMoEConfig
from raymoe.engine.async_engine import AsyncEngine, EngineDeadError
from raymoe.engine.core import EngineCore
from raymoe.engine.request import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.fixture
def engine(tiny_ckpt):
    config = RayMoEConfig.model_validate({"model": {"path": str(tiny_ckpt), "dtype": "float32"},
                                          "engine": {"max_num_seqs": 1, "kv_cache_memory": 4 << 20}})
    eng = AsyncEngine(EngineCore.from_config(config))
    yield eng
    eng.shutdown()


async def _collect(engine: AsyncEngine, rid: str, prompt: list[int], params: SamplingParams = GREEDY):
    tokens: list[int] = []
    try:
        async for out in engine.generate(rid, prompt, params):
            tokens += out.outputs[0].token_ids
    except EngineDeadError as e:
        return tokens, e
    return tokens, None


def test_streams_equal_offline_generation_and_abort_frees_the_slot(engine):
    offline = [o.outputs[0].token_ids for o in _offline(engine, [[5, 6, 7], [9, 10]])]

    async def run():
        return await asyncio.gather(_collect(engine, "a", [5, 6, 7]), _collect(engine, "b", [9, 10]))

    (a, err_a), (b, err_b) = asyncio.run(run())
    assert (err_a, err_b) == (None, None)
    assert [a, b] == offline

    async def abort_midway():
        gen = engine.generate("c", [1, 2, 3], SamplingParams(temperature=0.0, max_tokens=500, ignore_eos=True))
        await gen.__anext__()
        await gen.aclose()  # the caller left: the engine aborts the request
        return await _collect(engine, "d", [5, 6, 7])

    d, err = asyncio.run(abort_midway())
    assert err is None and d == offline[0]  # max_num_seqs=1: "d" ran, so "c" no longer held the slot
    assert engine.core.scheduler.num_running == 0 and engine.core.scheduler.num_waiting == 0


def _offline(engine: AsyncEngine, prompts: list[list[int]]):
    core = engine.core
    config = RayMoEConfig.model_validate({"model": {"path": core.model_path, "dtype": "float32"},
                                          "engine": {"max_num_seqs": 4, "kv_cache_memory": 4 << 20}})
    other = EngineCore.from_config(config)
    ids = [other.add_request(p, GREEDY, final_only=True) for p in prompts]
    done = {}
    while other.has_unfinished():
        for out in other.step():
            done[out.request_id] = out
    return [done[i] for i in ids]


def test_a_failing_step_fails_its_requests_and_marks_waiting_and_later_ones_safe_elsewhere(engine):
    core = engine.core
    execute = core.runner.execute

    def fail_once_a_request_waits(out):  # runs on the engine thread
        if core.scheduler.num_waiting:
            raise RuntimeError("boom")
        return execute(out)

    core.runner.execute = fail_once_a_request_waits
    long = SamplingParams(temperature=0.0, max_tokens=500, ignore_eos=True)

    async def run():
        running = asyncio.ensure_future(_collect(engine, "running", [5, 6, 7], long))
        while core.stats.num_generated_tokens < 2:  # "running" holds the only slot and streams ...
            await asyncio.sleep(0.001)
        waiting = asyncio.ensure_future(_collect(engine, "waiting", [9, 10]))  # ... so this one waits
        results = await asyncio.gather(running, waiting)
        later = await _collect(engine, "later", [1, 2])
        return [*results, later]

    (run_tokens, run_err), (wait_tokens, wait_err), (later_tokens, later_err) = asyncio.run(run())
    assert "boom" in str(run_err) and not run_err.safe_elsewhere  # it was in the failing step
    assert run_tokens  # it had streamed tokens before the failure
    assert wait_tokens == [] and wait_err is not None and wait_err.safe_elsewhere
    assert later_tokens == [] and later_err is not None and later_err.safe_elsewhere
    assert not engine.is_healthy
