"""ExpertPlacement: which expert shard(s) host each (MoE layer, routed expert), and which replica a token uses.

[Gate] → topk_ids → **ExpertPlacement.route** → shard ids → [Dispatch] → [Experts] → [Combine]

Default placement is contiguous: shard s hosts experts [s·E/N, (s+1)·E/N) of every MoE layer. With
redundant experts (EPLB) the hottest experts of a layer get extra replicas on other shards, chosen
greedily from measured per-expert load to shrink the most loaded shard; each token then uses replica
`token_index % num_replicas(e)`, so a hot expert's tokens alternate between its copies and a step's
result does not depend on timing (deterministic). Pure Python/torch: no Ray, no tensors of weights.

Tensor letters: T tokens, K experts per token, E experts per layer, N shards.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch


class ExpertPlacement:
    """Replica lists per layer: `replicas[layer_id][e]` = shard ids hosting expert e, primary first.

    Immutable by convention: `with_replicas` returns a new placement.
    """

    def __init__(self, num_experts: int, num_shards: int, replicas: Mapping[int, Sequence[Sequence[int]]]):
        if num_shards < 1:
            raise ValueError(f"num_shards ({num_shards}) must be >= 1")
        if not 1 <= num_shards <= num_experts:
            raise ValueError(f"num_shards ({num_shards}) must be <= n_routed_experts ({num_experts}): "
                             "every shard hosts at least one expert")
        self.num_experts = num_experts
        self.num_shards = num_shards
        self.replicas: dict[int, tuple[tuple[int, ...], ...]] = {}
        for layer_id, per_expert in replicas.items():
            if len(per_expert) != num_experts:
                raise ValueError(f"layer {layer_id}: {len(per_expert)} replica lists for {num_experts} experts")
            rows = tuple(tuple(int(s) for s in hosts) for hosts in per_expert)
            for e, hosts in enumerate(rows):
                if not hosts or len(set(hosts)) != len(hosts) or not all(0 <= s < num_shards for s in hosts):
                    raise ValueError(f"layer {layer_id} expert {e}: bad shard list {hosts} for {num_shards} shards")
            self.replicas[int(layer_id)] = rows
        self._tables: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def contiguous(cls, num_experts: int, num_shards: int, layer_ids: Iterable[int]) -> ExpertPlacement:
        """Shard s hosts experts [s·E//N, (s+1)·E//N) of every layer (sizes differ by at most one)."""
        if num_shards < 1:
            raise ValueError(f"num_shards ({num_shards}) must be >= 1")
        owner = [min(e * num_shards // num_experts, num_shards - 1) for e in range(num_experts)]
        return cls(num_experts, num_shards, {layer_id: [[s] for s in owner] for layer_id in layer_ids})

    def with_replicas(self, load: Mapping[int, torch.Tensor], num_redundant: int) -> ExpertPlacement:
        """Add `num_redundant` replicas per layer, EPLB-style, from measured load [E] per layer.

        Greedy, per layer: take the most loaded shard (a replica carries load[e] / num_replicas(e)),
        give its heaviest expert one more replica on the least loaded shard that does not host it yet.
        Primaries stay where they are, so a hot shard's experts can only move to the N-1 others: each
        shard accepts at most ceil(num_redundant / (N-1)) replicas, which bounds its memory.
        Layers without load (all zeros or missing) are left as they are.
        """
        if num_redundant < 0:
            raise ValueError(f"num_redundant ({num_redundant}) must be >= 0")
        out: dict[int, list[list[int]]] = {}
        for layer_id, rows in self.replicas.items():
            hosts = [list(h) for h in rows]
            layer_load = load.get(layer_id)
            if layer_load is not None and num_redundant > 0 and float(layer_load.sum()) > 0:
                _add_replicas(hosts, [float(v) for v in layer_load.tolist()], self.num_shards, num_redundant)
            out[layer_id] = hosts
        return ExpertPlacement(self.num_experts, self.num_shards, out)

    # -- queries --------------------------------------------------------------------------------
    @property
    def layer_ids(self) -> list[int]:
        return sorted(self.replicas)

    def num_replicas(self, layer_id: int) -> list[int]:
        return [len(h) for h in self.replicas[layer_id]]

    def shard_experts(self, shard_id: int) -> dict[int, list[int]]:
        """{layer_id: sorted expert ids} hosted by `shard_id` (primaries and replicas)."""
        return {layer_id: [e for e, hosts in enumerate(rows) if shard_id in hosts]
                for layer_id, rows in self.replicas.items()}

    def shard_loads(self, load: Mapping[int, torch.Tensor]) -> torch.Tensor:
        """Expected (token, expert) pairs per shard [N] for per-expert load [E] per layer, summed over layers."""
        total = torch.zeros(self.num_shards, dtype=torch.float64)
        for layer_id, rows in self.replicas.items():
            if layer_id in load:
                for e, hosts in enumerate(rows):
                    for s in hosts:
                        total[s] += float(load[layer_id][e]) / len(hosts)
        return total

    def route(self, layer_id: int, topk_ids: torch.Tensor) -> torch.Tensor:
        """topk_ids [T,K] -> shard id [T,K] of the replica each (token, expert) pair uses."""
        table, num_reps = self._table(layer_id, topk_ids.device)
        if table.shape[1] == 1:  # no replicas: the primary
            return table[topk_ids, 0]
        tokens = torch.arange(topk_ids.shape[0], device=topk_ids.device)[:, None]  # [T,1]
        return table[topk_ids, tokens % num_reps[topk_ids]]  # [T,K]

    def _table(self, layer_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (layer_id, device)
        cached = self._tables.get(key)
        if cached is None:
            rows = self.replicas[layer_id]
            width = max(len(h) for h in rows)
            table = torch.tensor([list(h) + [h[0]] * (width - len(h)) for h in rows], dtype=torch.long)  # [E,R]
            num_reps = torch.tensor([len(h) for h in rows], dtype=torch.long)  # [E]
            cached = self._tables[key] = (table.to(device), num_reps.to(device))
        return cached

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, ExpertPlacement) and self.num_experts == other.num_experts
                and self.num_shards == other.num_shards and self.replicas == other.replicas)

    def __repr__(self) -> str:
        extra = sum(len(h) - 1 for rows in self.replicas.values() for h in rows)
        return (f"ExpertPlacement(num_experts={self.num_experts}, num_shards={self.num_shards}, "
                f"layers={self.layer_ids}, redundant={extra})")


def _add_replicas(hosts: list[list[int]], load: list[float], num_shards: int, num_redundant: int) -> None:
    """In place: the greedy of `with_replicas` for one layer (hosts[e] = shard list, primary first)."""
    if num_shards == 1:
        return
    cap = math.ceil(num_redundant / (num_shards - 1))
    extra = [0] * num_shards

    def shard_load() -> list[float]:
        per = [0.0] * num_shards
        for e, h in enumerate(hosts):
            for s in h:
                per[s] += load[e] / len(h)
        return per

    for _ in range(num_redundant):
        per = shard_load()
        chosen = None
        for s_max in sorted(range(num_shards), key=lambda s: (-per[s], s)):
            candidates = sorted((e for e, h in enumerate(hosts) if s_max in h and load[e] > 0),
                                key=lambda e: (-load[e] / len(hosts[e]), e))
            for e in candidates:
                targets = [s for s in range(num_shards) if s not in hosts[e] and extra[s] < cap]
                if targets:
                    chosen = (e, min(targets, key=lambda s: (per[s], s)))
                    break
            if chosen is not None:
                break
        if chosen is None:  # every hot expert is already everywhere it may go
            return
        e, target = chosen
        hosts[e].append(target)
        extra[target] += 1
