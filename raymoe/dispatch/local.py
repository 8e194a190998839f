"""LocalDispatcher: the reference transport, every shard's `ExpertsCompute` in this process.

[Gate] → [route] → [dispatch rows] → **shard s: compute(rows of s)** → [combine]

It runs the same routing, row split and combine as the remote transports, only without moving
bytes, so `LocalDispatcher == moe_ref` pins the dispatch math and `remote == local` pins a transport.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from raymoe.dispatch.interface import Dispatcher
from raymoe.dispatch.routing import RoutingMetadata, dispatch_rows, local_expert_ids
from raymoe.experts.compute import ExpertsCompute
from raymoe.experts.placement import ExpertPlacement


class LocalDispatcher(Dispatcher):
    def __init__(self, placement: ExpertPlacement, shards: Sequence[ExpertsCompute]) -> None:
        if len(shards) != placement.num_shards:
            raise ValueError(f"{len(shards)} shards for a placement of {placement.num_shards}")
        super().__init__(placement)
        self.shards = list(shards)

    def exchange(self, layer_id: int, x: torch.Tensor, routing: RoutingMetadata) -> torch.Tensor:
        rows = dispatch_rows(x, routing)  # [M,D]
        out = torch.empty(routing.num_rows, x.shape[1], dtype=torch.float32, device=x.device)
        for s, shard in enumerate(self.shards):
            sl = routing.shard_rows(s)
            if sl.stop > sl.start:
                ids = local_expert_ids(routing.slots[sl], s, routing.num_experts)
                out[sl] = shard.forward(layer_id, rows[sl], ids, routing.topk_weights[sl])
        return out
