"""Dispatch/combine math in pure torch: group a layer's tokens by expert shard, then add the shards' sums.

[Gate] → [ExpertPlacement.route] → **build_routing → dispatch rows** → [Experts] → **combine**

A token goes ONCE to each shard that hosts at least one of its top-k experts (the replica chosen by
the placement), so bytes on the wire scale with distinct (token, shard) pairs, not T·K. Each row
carries the token's K "slots" (expert id + E·shard of the replica it uses) and K weights; the
receiving shard keeps the pairs whose slot names it (`local_expert_ids`), so the engine gathers one
[M,K] tensor instead of masking per shard (the engine is the serial part; shards work in parallel).
Rows are ordered by shard, then token; shard s owns rows [offsets[s], offsets[s+1]). Combine adds
each row's fp32 partial sum back into its token with one `index_add_`, in shard order: deterministic.
`pack_rows`/`unpack_rows` are the wire format both remote transports use (one uint8 tensor per shard).

Tensor letters: T tokens, K experts per token, D model dim, N shards, M dispatched rows (Σ counts).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class RoutingMetadata:
    """One layer's dispatch plan (rows sorted by shard, then token)."""

    num_tokens: int
    num_experts: int
    counts: torch.Tensor  # [N] int64: rows sent to each shard
    offsets: list[int]  # N+1 row offsets (host ints: transports slice with them)
    token_index: torch.Tensor  # [M] int64: source token of each row
    slots: torch.Tensor  # [M,K] int64: expert id + E·(shard of the replica) of the token's K pairs
    topk_weights: torch.Tensor  # [M,K] fp32: the token's K weights

    @property
    def num_rows(self) -> int:
        return self.offsets[-1]

    def shard_rows(self, shard_id: int) -> slice:
        return slice(self.offsets[shard_id], self.offsets[shard_id + 1])


def build_routing(shard_ids: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                  num_shards: int, num_experts: int) -> RoutingMetadata:
    """shard_ids [T,K] (replica shard of each pair), topk_ids [T,K], topk_weights [T,K] -> RoutingMetadata."""
    num_tokens = topk_ids.shape[0]
    hit = torch.zeros(num_tokens, num_shards, dtype=torch.bool, device=topk_ids.device)
    hit.scatter_(1, shard_ids, True)  # [T,N]: token t has a pair on shard s
    _, token_index = hit.T.nonzero(as_tuple=True)  # [M], ordered by shard then token
    counts = hit.sum(dim=0)  # [N]
    slots = (topk_ids + shard_ids * num_experts).index_select(0, token_index)  # [M,K]
    weights = topk_weights.float().index_select(0, token_index)
    offsets = [0] + torch.cumsum(counts, 0).tolist()
    return RoutingMetadata(num_tokens, num_experts, counts, offsets, token_index, slots, weights)


def local_expert_ids(slots: torch.Tensor, shard_id: int, num_experts: int) -> torch.Tensor:
    """slots [M,K] -> expert ids [M,K] of the pairs shard `shard_id` computes, -1 for the others."""
    rel = slots - shard_id * num_experts
    return torch.where((rel >= 0) & (rel < num_experts), rel, -1)


def dispatch_rows(x: torch.Tensor, routing: RoutingMetadata) -> torch.Tensor:
    """x [T,D] -> rows [M,D] in routing order (a token appears once per shard it visits)."""
    return x.index_select(0, routing.token_index)


def combine(partial: torch.Tensor, routing: RoutingMetadata, dtype: torch.dtype) -> torch.Tensor:
    """partial [M,D] fp32 per-row sums -> [T,D] in `dtype`: Σ over the shards each token visited.

    Summed in fp32 and rounded once, like the local path (bf16 partials would round N times).
    """
    out = torch.zeros(routing.num_tokens, partial.shape[1], dtype=torch.float32, device=partial.device)
    out.index_add_(0, routing.token_index, partial.float())
    return out.to(dtype)


def pack_rows(rows: torch.Tensor, slots: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """rows [M,D] (any float dtype), slots [M,K], weights [M,K] -> uint8 [M, D·bytes + 8K]: one wire message."""
    return torch.cat([rows.contiguous().view(torch.uint8), slots.to(torch.int32).view(torch.uint8),
                      topk_weights.to(torch.float32).view(torch.uint8)], dim=1)


def unpack_rows(packed: torch.Tensor, hidden_size: int, top_k: int,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `pack_rows` -> (rows [M,D] dtype, slots [M,K] int64, topk_weights [M,K] fp32)."""
    x_bytes = hidden_size * torch.empty((), dtype=dtype).element_size()
    assert packed.dtype == torch.uint8 and packed.shape[1] == x_bytes + 8 * top_k, \
        f"packed rows {tuple(packed.shape)} do not match D={hidden_size}, K={top_k}, {dtype}"
    rows = packed[:, :x_bytes].contiguous().view(dtype)
    slots = packed[:, x_bytes:x_bytes + 4 * top_k].contiguous().view(torch.int32).long()
    weights = packed[:, x_bytes + 4 * top_k:].contiguous().view(torch.float32)
    return rows, slots, weights


def packed_row_bytes(hidden_size: int, top_k: int, dtype: torch.dtype) -> int:
    return hidden_size * torch.empty((), dtype=dtype).element_size() + 8 * top_k
