"""EngineMetrics without Ray: per-step histograms, throttled gauges, counter deltas, decay to idle."""

from __future__ import annotations

import time
from types import SimpleNamespace

from raymoe.observability.engine_metrics import EngineMetrics, replica_tag


def _core(flushed: list):
    return SimpleNamespace(
        stats=SimpleNamespace(num_steps=0, num_generated_tokens=0, batch_sizes=[]),
        kv=SimpleNamespace(num_hit_tokens=0, num_queried_tokens=0, usage=0.0, hit_rate=0.0),
        scheduler=SimpleNamespace(num_running=0, num_waiting=0),
        flush_metrics=lambda: flushed.append(True))


def _step(core, batch: int, hit: int = 0, queried: int = 0) -> None:
    core.stats.num_steps += 1
    core.stats.batch_sizes.append(batch)
    core.stats.num_generated_tokens += batch
    core.kv.num_hit_tokens += hit
    core.kv.num_queried_tokens += queried


def test_steps_are_observed_and_gauges_follow_the_engine(recorder):
    flushed: list = []
    core = _core(flushed)
    m = EngineMetrics(core, replica="r1", interval_s=0.0, rate_window_s=10)
    core.scheduler.num_running, core.scheduler.num_waiting, core.kv.usage = 3, 2, 0.25
    _step(core, 3, hit=16, queried=64)
    m.on_step(0.01)
    m.on_step(0.02)  # an empty schedule (no new step): not observed
    key = recorder.key
    assert recorder.observed[key("raymoe_engine_step_seconds", {"replica": "r1"})] == [0.01]
    assert recorder.observed[key("raymoe_batch_size", {"replica": "r1"})] == [3]
    assert recorder.gauge("raymoe_num_requests_running", replica="r1") == 3
    assert recorder.gauge("raymoe_num_requests_waiting", replica="r1") == 2
    assert recorder.gauge("raymoe_kv_cache_usage_ratio", replica="r1") == 0.25
    assert recorder.gauge("raymoe_tokens_per_second", replica="r1") > 0
    assert recorder.counter("raymoe_prefix_cache_hit_tokens_total", replica="r1") == 16
    assert recorder.counter("raymoe_prefix_cache_queried_tokens_total", replica="r1") == 64


def test_gauges_are_throttled(recorder):
    core = _core([])
    m = EngineMetrics(core, replica="r1", interval_s=3600)
    for _ in range(10):
        _step(core, 1)
        m.on_step(0.001)
    assert recorder.gauge("raymoe_num_requests_running", replica="r1") is None
    assert len(recorder.observed[recorder.key("raymoe_engine_step_seconds", {"replica": "r1"})]) == 10


def test_idle_engine_publishes_until_tokens_per_second_decays_to_zero_then_keeps_gauges_alive(recorder):
    flushed: list = []
    core = _core(flushed)
    m = EngineMetrics(core, replica="r1", interval_s=0.0, rate_window_s=0.05, keepalive_s=0.2)
    core.kv.usage = 0.5
    _step(core, 4)
    m.on_step(0.01)
    m.on_idle()
    assert flushed == [True]  # the expert-parallel engine's counters are pushed once on going idle
    time.sleep(0.1)
    m.on_idle()
    assert recorder.gauge("raymoe_tokens_per_second", replica="r1") == 0.0
    recorder.gauges.clear()
    m.on_idle()  # quiet: nothing more until the keepalive is due
    assert recorder.gauges == {} and flushed == [True]
    time.sleep(0.25)
    m.on_idle()  # keepalive: the same values again (Ray's agent drops series not reported lately)
    assert recorder.gauge("raymoe_tokens_per_second", replica="r1") == 0.0
    assert recorder.gauge("raymoe_kv_cache_usage_ratio", replica="r1") == 0.5
    assert flushed == [True, True]  # and the expert tier's gauges with them
    recorder.gauges.clear()
    m.on_idle()
    assert recorder.gauges == {}  # not again before the next keepalive


def test_a_broken_core_never_raises_into_the_engine_loop(recorder):
    m = EngineMetrics(_core([]), replica="r1", interval_s=0.0)
    m.core = SimpleNamespace()  # every attribute missing
    m.on_step(0.01)
    m.on_idle()


def test_replica_tag_outside_ray_is_the_process():
    import os

    assert replica_tag() in (f"pid{os.getpid()}",) or replica_tag().startswith("actor-")
