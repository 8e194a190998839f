"""The `Dispatcher` interface: one MoE layer's routed experts, wherever they live.

[Gate] → **Dispatcher(layer, x, topk_ids, topk_weights)**: route → dispatch → [Experts] → combine → [T,D]

A dispatcher is the plain callable the engine installs as every `MoE.routed_fn`. The routing math is
shared (routing.py); a transport only implements `exchange`: send each shard its rows, return the
rows' fp32 partial sums. Transports: local (reference), ray (actor calls), collective (gloo/NCCL).

Fault recovery lives here, in one place for every transport: `exchange` raises `ShardFailure` when a
shard dies or times out; the dispatcher waits for the shard to come back (`wait_recovered`, bounded by
`recovery_timeout_s`), re-forms the transport (`reform`) and re-runs the same layer. Expert shards keep
no state between calls and the engine still holds x, so the retried layer gives the same result and
the step goes on: no hook in EngineCore is needed. If the shard does not return in time, the
RuntimeError raised here fails the step (and its requests) instead of hanging.

Load and faults are also exported to Prometheus when the builder installs `metrics`
(observability/dispatch_metrics.py): tokens per shard, sampled latency, retries and restarts.

Tensor letters: T tokens, K experts per token, D model dim, E experts, N shards, M dispatched rows.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from raymoe.dispatch.routing import RoutingMetadata, build_routing, combine
from raymoe.experts.placement import ExpertPlacement

if TYPE_CHECKING:
    from raymoe.observability.dispatch_metrics import DispatchMetrics


class ShardFailure(Exception):
    """A shard died or stopped answering during `exchange` (the layer can be retried after recovery)."""


@contextmanager
def as_shard_failure() -> Iterator[None]:
    """Ray errors of a shard call -> ShardFailure, which the dispatcher answers by recovering; an error
    the shard's own code raised (RayTaskError) is not something a restart fixes and passes through."""
    from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError

    try:
        yield
    except (RayActorError, GetTimeoutError) as e:  # died, restarting, unavailable, no answer
        raise ShardFailure(str(e).splitlines()[0] if str(e) else type(e).__name__) from e
    except RayTaskError:
        raise
    except RayError as e:  # e.g. a reply object lost with its node
        raise ShardFailure(str(e).splitlines()[0] if str(e) else type(e).__name__) from e


class Dispatcher(ABC):
    """route → exchange (transport) → combine, with load accounting and bounded fault recovery."""

    def __init__(self, placement: ExpertPlacement, *, recovery_timeout_s: float = 60.0) -> None:
        self.placement = placement
        self.recovery_timeout_s = recovery_timeout_s
        self.recovery_times: list[float] = []  # seconds from first failure to a successful retry
        self._expert_load: dict[int, torch.Tensor] = {}  # layer -> [E] (token, expert) pairs
        self._shard_tokens: dict[int, torch.Tensor] = {}  # layer -> [N] rows (tokens) sent per shard
        self.metrics: DispatchMetrics | None = None  # Prometheus export, installed by the engine builder
        # Per-shard round trips of the last timed exchange (shard -> s), filled by transports that can
        # see each shard answer separately (ray); a collective transport finishes all shards at once.
        self.time_shards = False
        self.shard_seconds: dict[int, float] = {}

    def __call__(self, layer_id: int, x: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor) -> torch.Tensor:
        """x [T,D], topk_ids [T,K], topk_weights [T,K] -> Σ_k w·expert_k(x) [T,D] in x.dtype."""
        routing = build_routing(self.placement.route(layer_id, topk_ids), topk_ids, topk_weights,
                                self.placement.num_shards, self.placement.num_experts)
        self._record(layer_id, topk_ids, routing)
        if routing.num_rows == 0:
            return torch.zeros_like(x)
        metrics = self.metrics
        timed = metrics is not None and metrics.want_latency()
        start = time.perf_counter() if timed else 0.0
        self.time_shards = timed
        if timed:
            self.shard_seconds = {}
        first_failure: float | None = None
        while True:
            try:
                if first_failure is not None:
                    remaining = self.recovery_timeout_s - (time.monotonic() - first_failure)
                    self.wait_recovered(max(remaining, 0.0))  # RuntimeError naming a shard that stays away
                    self.reform()
                    if metrics is not None:
                        metrics.record_retry()
                partial = self.exchange(layer_id, x, routing)  # [M,D] fp32
                break
            except ShardFailure as failure:
                first_failure = time.monotonic() if first_failure is None else first_failure
                if time.monotonic() - first_failure >= self.recovery_timeout_s:
                    raise RuntimeError(f"expert shards did not recover within {self.recovery_timeout_s:g}s "
                                       f"(layer {layer_id}: {failure})") from failure
        if first_failure is not None:
            self.recovery_times.append(time.monotonic() - first_failure)
            if metrics is not None:
                metrics.record_recovered()
        out = combine(partial, routing, x.dtype)
        if metrics is not None and timed and first_failure is None:  # a recovery's wait is not latency
            metrics.observe_latency(time.perf_counter() - start, routing.offsets, self.shard_seconds)
        return out

    # -- the transport --------------------------------------------------------------------------
    @abstractmethod
    def exchange(self, layer_id: int, x: torch.Tensor, routing: RoutingMetadata) -> torch.Tensor:
        """Send shard s rows `routing.shard_rows(s)` of x; return their partial sums [M,D] fp32.

        Raises:
            ShardFailure: a shard died or timed out (the call is retried after recovery).
        """

    def wait_recovered(self, timeout_s: float) -> None:
        """Block until every shard answers again.

        Raises:
            RuntimeError: a shard did not come back within `timeout_s` (names the shard).
        """
        raise RuntimeError(f"{type(self).__name__} cannot recover from a shard failure")

    def reform(self) -> None:
        """Rebuild the transport after a failure or a placement change (new process group, replicas)."""
        return None

    def close(self) -> None:
        """Release the transport (the expert shards themselves belong to their pool)."""
        return None

    # -- placement and load ---------------------------------------------------------------------
    def set_placement(self, placement: ExpertPlacement) -> None:
        if placement.num_shards != self.placement.num_shards:
            raise ValueError(f"placement has {placement.num_shards} shards, the transport {self.placement.num_shards}")
        self.placement = placement

    def _record(self, layer_id: int, topk_ids: torch.Tensor, routing: RoutingMetadata) -> None:
        load = torch.bincount(topk_ids.reshape(-1), minlength=self.placement.num_experts)
        prev = self._expert_load.get(layer_id)
        self._expert_load[layer_id] = load if prev is None else prev + load
        prev = self._shard_tokens.get(layer_id)
        self._shard_tokens[layer_id] = routing.counts if prev is None else prev + routing.counts
        if self.metrics is not None:
            self.metrics.add_tokens(layer_id, routing.counts, load)

    @property
    def expert_load(self) -> dict[int, torch.Tensor]:
        """{layer_id: [E] int64} (token, expert) pairs routed since the last `reset_stats`."""
        return {k: v.cpu() for k, v in self._expert_load.items()}

    @property
    def shard_tokens(self) -> torch.Tensor:
        """[N] int64 tokens sent to each shard, summed over layers, since the last `reset_stats`."""
        total = torch.zeros(self.placement.num_shards, dtype=torch.long)
        for v in self._shard_tokens.values():
            total += v.cpu()
        return total

    def reset_stats(self) -> None:
        self._expert_load.clear()
        self._shard_tokens.clear()
