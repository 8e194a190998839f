"""DispatchMetrics without Ray: layer groups, imbalance, per-expert switch, sampling, restarts and retries."""

from __future__ import annotations

import torch

from raymoe.dispatch.interface import Dispatcher, ShardFailure
from raymoe.experts.placement import ExpertPlacement
from raymoe.observability.dispatch_metrics import DispatchMetrics, layer_group_label, load_imbalance


def test_tokens_are_summed_per_shard_and_group_of_eight_layers(recorder):
    m = DispatchMetrics(2, 4, engine="e0", interval_s=3600)
    m.add_tokens(1, torch.tensor([3, 1]), torch.tensor([2, 2, 1, 1]))
    m.add_tokens(7, torch.tensor([2, 0]), torch.tensor([1, 1, 0, 0]))
    m.add_tokens(9, torch.tensor([0, 5]), torch.tensor([0, 0, 5, 5]))
    assert recorder.counters == {}  # nothing exported before the interval
    m.flush()
    assert recorder.counter("raymoe_shard_tokens_total", shard="0", layer_group="0-7") == 5
    assert recorder.counter("raymoe_shard_tokens_total", shard="1", layer_group="0-7") == 1
    assert recorder.counter("raymoe_shard_tokens_total", shard="1", layer_group="8-15") == 5
    assert recorder.gauge("raymoe_expert_load_imbalance", engine="e0") == load_imbalance([5, 6])
    assert "raymoe_expert_tokens_total" not in recorder.names()  # per-expert series are opt-in


def test_per_expert_series_only_when_enabled(recorder):
    m = DispatchMetrics(2, 4, engine="e0", per_expert=True, interval_s=3600)
    m.add_tokens(3, torch.tensor([2, 1]), torch.tensor([2, 0, 1, 1]))
    m.add_tokens(3, torch.tensor([1, 1]), torch.tensor([1, 0, 0, 1]))
    m.flush()
    assert [recorder.counter("raymoe_expert_tokens_total", layer="3", expert=str(e)) for e in range(4)] == [3, 0, 1, 2]


def test_a_flush_exports_only_what_came_since_the_last_one(recorder):
    m = DispatchMetrics(2, 4, engine="e0", interval_s=3600)
    m.flush()  # nothing ran yet: no imbalance to report
    assert recorder.gauge("raymoe_expert_load_imbalance", engine="e0") is None
    m.add_tokens(0, torch.tensor([4, 4]), torch.zeros(4, dtype=torch.long))
    m.flush()
    m.add_tokens(0, torch.tensor([6, 0]), torch.zeros(4, dtype=torch.long))
    m.flush()
    recorder.gauges.clear()
    m.flush()  # empty window: the last value is set again (keeps the series alive in Ray's agent)
    assert recorder.counter("raymoe_shard_tokens_total", shard="0", layer_group="0-7") == 10
    assert recorder.gauge("raymoe_expert_load_imbalance", engine="e0") == 2.0  # 6 vs 0 in the last window


def test_imbalance_is_max_over_mean():
    assert load_imbalance([1, 1, 1, 1]) == 1.0
    assert load_imbalance([4, 0, 0, 0]) == 4.0
    assert load_imbalance([0, 0]) == 0.0
    assert layer_group_label(60) == "56-63"


def test_restarts_are_counted_per_shard_from_actor_incarnations(recorder):
    state = [("a0", 0), ("a1", 0)]
    m = DispatchMetrics(2, 4, engine="e0", incarnations_fn=lambda: list(state))
    state[1] = ("a1", 1)  # Ray restarted shard 1 in place
    m.record_recovered()
    state[0] = ("b0", 0)  # shard 0 replaced by a new actor under its name
    m.record_recovered()
    assert recorder.counter("raymoe_shard_restarts_total", shard="0") == 1
    assert recorder.counter("raymoe_shard_restarts_total", shard="1") == 1


def test_restarts_without_ray_state_count_as_unknown(recorder):
    def broken() -> list[tuple[str, int]]:
        raise RuntimeError("GCS unreachable")

    DispatchMetrics(2, 4, engine="e0", incarnations_fn=broken).record_recovered()
    assert recorder.counter("raymoe_shard_restarts_total", shard="unknown") == 1


class _FlakyDispatcher(Dispatcher):
    """Shards that fail `failures` times, then answer zeros; recovery is instant."""

    def __init__(self, placement: ExpertPlacement, failures: int) -> None:
        super().__init__(placement, recovery_timeout_s=10)
        self.failures = failures

    def exchange(self, layer_id, x, routing):
        if self.failures:
            self.failures -= 1
            raise ShardFailure("shard 1 died")
        return torch.zeros(routing.num_rows, x.shape[1])

    def wait_recovered(self, timeout_s: float) -> None:
        return None


def test_the_dispatcher_records_load_latency_retries_and_restarts(recorder):
    placement = ExpertPlacement.contiguous(4, 2, [0, 1])
    d = _FlakyDispatcher(placement, failures=2)
    incarnations = [("a0", 0), ("a1", 0)]
    d.metrics = DispatchMetrics(2, 4, engine="e0", interval_s=3600, latency_interval_s=0,
                                incarnations_fn=lambda: list(incarnations))
    topk = torch.tensor([[0, 1], [2, 3], [0, 2]])  # shard 0 hosts experts 0-1, shard 1 experts 2-3
    weights = torch.ones(3, 2)
    incarnations[1] = ("a1", 1)
    d(0, torch.ones(3, 8), topk, weights)  # fails twice, recovers
    d(1, torch.ones(3, 8), topk[:1], weights[:1])  # only shard 0
    d.metrics.flush()
    assert recorder.counter("raymoe_step_retries_total") == 2
    assert recorder.counter("raymoe_shard_restarts_total", shard="1") == 1
    assert recorder.counter("raymoe_shard_tokens_total", shard="0", layer_group="0-7") == 2 + 1
    assert recorder.counter("raymoe_shard_tokens_total", shard="1", layer_group="0-7") == 2
    # latency: the recovered layer is not timed; the second layer only under the shard it used
    assert len(recorder.observed[recorder.key("raymoe_dispatch_latency_seconds", {"shard": "0"})]) == 1
    assert recorder.key("raymoe_dispatch_latency_seconds", {"shard": "1"}) not in recorder.observed


def test_latency_is_sampled_at_most_once_per_interval(recorder):
    d = _FlakyDispatcher(ExpertPlacement.contiguous(4, 2, [0]), failures=0)
    d.metrics = DispatchMetrics(2, 4, engine="e0", latency_interval_s=3600)
    for _ in range(5):
        d(0, torch.ones(2, 8), torch.tensor([[0, 3], [1, 2]]), torch.ones(2, 2))
    assert [len(v) for v in recorder.observed.values()] == [1, 1]
