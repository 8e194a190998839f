"""ExpertPlacement: contiguous shards, EPLB replicas from measured load, deterministic replica choice."""

import math

import pytest
import torch

from raymoe.experts.placement import ExpertPlacement

LAYERS = [1, 2]


@pytest.mark.parametrize("num_experts,num_shards", [(8, 1), (8, 3), (8, 8), (384, 4), (384, 7)])
def test_contiguous_gives_every_expert_exactly_one_shard_with_balanced_sizes(num_experts, num_shards):
    p = ExpertPlacement.contiguous(num_experts, num_shards, LAYERS)
    for layer_id in LAYERS:
        hosted = [p.shard_experts(s)[layer_id] for s in range(num_shards)]
        assert sorted(e for ids in hosted for e in ids) == list(range(num_experts))
        sizes = [len(ids) for ids in hosted]
        assert max(sizes) - min(sizes) <= 1
        assert all(ids == list(range(ids[0], ids[0] + len(ids))) for ids in hosted)  # contiguous runs


def test_more_shards_than_experts_is_rejected():
    with pytest.raises(ValueError, match=r"num_shards \(9\) must be <= n_routed_experts \(8\)"):
        ExpertPlacement.contiguous(8, 9, LAYERS)


def test_route_without_replicas_is_the_owner():
    p = ExpertPlacement.contiguous(8, 4, LAYERS)
    ids = torch.tensor([[0, 7], [3, 4], [1, 2]])
    assert p.route(1, ids).tolist() == [[0, 3], [1, 2], [0, 1]]


def _skewed_load(num_experts: int, hot: list[int]) -> torch.Tensor:
    load = torch.ones(num_experts, dtype=torch.long)
    load[hot] = 100
    return load


@pytest.mark.parametrize("num_experts,num_shards,num_redundant", [(8, 2, 2), (8, 4, 3), (384, 4, 16), (384, 3, 5)])
def test_replicas_cut_the_most_loaded_shard_and_respect_memory_caps(num_experts, num_shards, num_redundant):
    base = ExpertPlacement.contiguous(num_experts, num_shards, LAYERS)
    load = {layer_id: _skewed_load(num_experts, [0, 1, 2]) for layer_id in LAYERS}
    p = base.with_replicas(load, num_redundant)
    before, after = base.shard_loads(load).max().item(), p.shard_loads(load).max().item()
    print(f"\nE={num_experts} N={num_shards} R={num_redundant}: most loaded shard {before:.0f} -> {after:.0f} "
          f"pairs ({after / before:.2f}x)")
    assert after < before
    for layer_id in LAYERS:
        reps = p.replicas[layer_id]
        assert sum(len(h) - 1 for h in reps) <= num_redundant
        assert all(len(set(h)) == len(h) and h[0] == base.replicas[layer_id][e][0] for e, h in enumerate(reps))
        extra = [sum(1 for h in reps if s in h[1:]) for s in range(num_shards)]
        assert max(extra) <= math.ceil(num_redundant / (num_shards - 1))


def test_replicas_go_to_the_hot_experts_and_layers_without_load_stay_contiguous():
    base = ExpertPlacement.contiguous(8, 2, LAYERS)
    p = base.with_replicas({1: _skewed_load(8, [0, 1])}, 2)
    assert p.replicas[1][0] == (0, 1) and p.replicas[1][1] == (0, 1)
    assert p.replicas[2] == base.replicas[2]


def test_replica_choice_alternates_by_token_index_and_is_deterministic():
    p = ExpertPlacement.contiguous(8, 2, LAYERS).with_replicas({1: _skewed_load(8, [0])}, 1)
    ids = torch.zeros(10, 1, dtype=torch.long)  # every token picks the replicated expert 0
    shards = p.route(1, ids)
    assert shards[:, 0].tolist() == [0, 1] * 5
    assert torch.equal(shards, p.route(1, ids))


def test_equal_placements_compare_equal_and_repr_counts_replicas():
    a = ExpertPlacement.contiguous(8, 2, LAYERS)
    assert a == ExpertPlacement.contiguous(8, 2, LAYERS)
    b = a.with_replicas({1: _skewed_load(8, [0])}, 1)
    assert a != b and "redundant=1" in repr(b)
