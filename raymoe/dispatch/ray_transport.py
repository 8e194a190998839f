"""Ray transport: one actor call per shard per layer, carrying the shard's packed rows.

[Gate] → [route] → **ExpertWorker.forward_packed.remote(layer, rows of s) for every s, then ray.get** → [combine]

All shards are called before waiting on any, so they compute concurrently. Small tensors travel
inline with the call, larger ones through the object store (across nodes). Shards are named actors
that any number of engines may call at once, so one pool can serve several engines. A dead or
restarting shard surfaces as RayActorError (or a timeout) and becomes a ShardFailure, which the
Dispatcher answers by waiting for the restart and re-running the layer.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import ray
import torch
from ray.exceptions import GetTimeoutError

from raymoe.dispatch.interface import Dispatcher, as_shard_failure
from raymoe.dispatch.routing import RoutingMetadata, dispatch_rows, pack_rows
from raymoe.experts.placement import ExpertPlacement

if TYPE_CHECKING:
    from raymoe.experts.worker import ExpertPool


class RayDispatcher(Dispatcher):
    def __init__(self, pool: ExpertPool, placement: ExpertPlacement, *, recovery_timeout_s: float = 60.0) -> None:
        super().__init__(placement, recovery_timeout_s=recovery_timeout_s)
        self.pool = pool

    def exchange(self, layer_id: int, x: torch.Tensor, routing: RoutingMetadata) -> torch.Tensor:
        packed = pack_rows(dispatch_rows(x, routing), routing.slots, routing.topk_weights).cpu()
        start = time.perf_counter()
        refs, shard_of = [], {}
        for s in range(self.placement.num_shards):
            lo, hi = routing.offsets[s], routing.offsets[s + 1]
            if hi > lo:
                # clone: pickling a view would ship the whole packed buffer to every shard
                refs.append(self.pool.handles[s].forward_packed.remote(layer_id, packed[lo:hi].clone()))
                shard_of[refs[-1]] = s
        with as_shard_failure():  # a lost shard: recover; the shard's own exception: the step fails
            if self.time_shards:  # sampled by the metrics: note when each shard's rows come back
                self._time_each(shard_of, start)
            parts = ray.get(refs, timeout=self.recovery_timeout_s)
        return torch.cat(parts).to(x.device)

    def _time_each(self, shard_of: dict, start: float) -> None:
        pending, deadline = list(shard_of), start + self.recovery_timeout_s
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(deadline - time.perf_counter(), 0.0))
            if not ready:
                raise GetTimeoutError(f"no answer from shard(s) {sorted(shard_of[r] for r in pending)} "
                                      f"within {self.recovery_timeout_s} s")
            for ref in ready:
                self.shard_seconds[shard_of[ref]] = time.perf_counter() - start

    def wait_recovered(self, timeout_s: float) -> None:
        self.pool.wait_recovered(timeout_s)

    def reform(self) -> None:
        # A restarted shard re-ran __init__ with its original experts: add the EPLB replicas back.
        self.pool.sync_experts({s: self.placement.shard_experts(s) for s in range(self.placement.num_shards)})

    def set_placement(self, placement: ExpertPlacement) -> None:
        super().set_placement(placement)
        self.reform()
