"""Dispatch/combine math in pure torch: routing invariants, wire format, and LocalDispatcher == moe_ref."""

import pytest
import torch

from raymoe.dispatch.local import LocalDispatcher
from raymoe.dispatch.routing import (
    build_routing,
    combine,
    dispatch_rows,
    local_expert_ids,
    pack_rows,
    unpack_rows,
)
from raymoe.experts.compute import LoopExperts
from raymoe.experts.placement import ExpertPlacement
from raymoe.model.loader import Checkpoint, expert_names
from raymoe.model.moe import moe_ref

from .conftest import TOL


def _random_topk(num_tokens: int, num_experts: int, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.rand(num_tokens, num_experts).topk(top_k, dim=1).indices  # distinct experts per token
    return ids, torch.rand(num_tokens, top_k)


def _placements(num_experts: int, num_shards: int) -> list[ExpertPlacement]:
    base = ExpertPlacement.contiguous(num_experts, num_shards, [1])
    hot = torch.arange(num_experts, 0, -1).float() ** 4  # low ids hot
    return [base, base.with_replicas({1: hot}, 3)]


@pytest.mark.parametrize("num_tokens", [0, 1, 33, 257])
@pytest.mark.parametrize("num_experts,top_k,num_shards", [(8, 2, 1), (8, 2, 3), (384, 8, 4), (384, 8, 7)])
def test_routing_sends_each_pair_once_and_each_token_once_per_shard(num_tokens, num_experts, top_k, num_shards):
    ids, weights = _random_topk(num_tokens, num_experts, top_k)
    for placement in _placements(num_experts, num_shards):
        shard_ids = placement.route(1, ids)
        r = build_routing(shard_ids, ids, weights, num_shards, num_experts)
        assert int(r.counts.sum()) == r.num_rows == len(r.token_index)
        assert r.offsets == [0] + torch.cumsum(r.counts, 0).tolist()
        pairs = {(int(t), s) for s in range(num_shards) for t in r.token_index[r.shard_rows(s)]}
        assert len(pairs) == r.num_rows  # a token visits a shard at most once
        assert pairs == {(t, int(s)) for t in range(num_tokens) for s in shard_ids[t]}
        num_computed = 0
        for s in range(num_shards):  # rows of s: ascending tokens; s computes exactly its pairs
            rows = r.shard_rows(s)
            tok = r.token_index[rows]
            assert bool((tok[1:] > tok[:-1]).all())
            local = local_expert_ids(r.slots[rows], s, num_experts)
            assert torch.equal(local >= 0, shard_ids[tok] == s)
            assert torch.equal(local[local >= 0], ids[tok][local >= 0])
            assert torch.equal(r.topk_weights[rows], weights[tok])
            num_computed += int((local >= 0).sum())
        assert num_computed == num_tokens * top_k  # every (token, expert) pair exactly once


def test_inverse_permutation_round_trips():
    ids, weights = _random_topk(50, 8, 1)  # K=1: the dispatch is a permutation of the tokens
    r = build_routing(ExpertPlacement.contiguous(8, 3, [1]).route(1, ids), ids, weights, 3, 8)
    inverse = torch.empty_like(r.token_index)
    inverse[r.token_index] = torch.arange(50)
    x = torch.randn(50, 16)
    assert torch.equal(dispatch_rows(x, r)[inverse], x)
    ids, weights = _random_topk(50, 8, 4)  # K>1: combine of (rows / fan-out) gives x back
    r = build_routing(ExpertPlacement.contiguous(8, 3, [1]).route(1, ids), ids, weights, 3, 8)
    fan_out = torch.zeros(50).index_add_(0, r.token_index, torch.ones(r.num_rows))
    torch.testing.assert_close(combine(dispatch_rows(x, r) / fan_out[r.token_index, None], r, x.dtype), x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_rows", [0, 5])
def test_pack_unpack_round_trips(dtype, num_rows):
    x = torch.randn(num_rows, 64).to(dtype)
    ids = torch.randint(-1, 384, (num_rows, 8))
    w = torch.rand(num_rows, 8)
    packed = pack_rows(x, ids, w)
    assert packed.dtype == torch.uint8 and packed.shape == (num_rows, 64 * x.element_size() + 64)
    x2, ids2, w2 = unpack_rows(packed, 64, 8, dtype)
    assert torch.equal(x2, x) and torch.equal(ids2, ids) and torch.equal(w2, w)


def _shards(path: str, placement: ExpertPlacement, dtype: torch.dtype, int4: bool) -> list[LoopExperts]:
    out = []
    for s in range(placement.num_shards):
        ckpt = Checkpoint(path)
        out.append(LoopExperts.from_checkpoint(ckpt, placement.shard_experts(s), int4=int4, dtype=dtype))
        wanted = {n for layer_id, ids in placement.shard_experts(s).items() for e in ids
                  for n in expert_names(ckpt.args, layer_id, e, int4=ckpt.args.quantization is not None)}
        assert ckpt.read_names == wanted  # a shard reads its own experts' tensors and nothing else
    return out


@pytest.mark.parametrize("preset,quant,dtype,num_shards", [
    ("tiny", None, torch.float32, 1), ("tiny", None, torch.float32, 3), ("tiny", None, torch.bfloat16, 2),
    ("tiny", "int4", torch.float32, 4), ("tiny-384e", None, torch.float32, 4), ("tiny-384e", "int4", torch.bfloat16, 3),
])
def test_local_dispatcher_matches_moe_ref(make_ckpt, preset, quant, dtype, num_shards):
    path = make_ckpt(preset, quant)
    args = Checkpoint(path).args
    int4 = quant == "int4"
    full = LoopExperts.from_checkpoint(Checkpoint(path), {1: list(range(args.n_routed_experts))}, int4=int4,
                                       dtype=dtype).layer(1)
    base = ExpertPlacement.contiguous(args.n_routed_experts, num_shards, [1])
    for placement in (base, base.with_replicas({1: torch.arange(args.n_routed_experts, 0, -1).float()}, 2)):
        dispatcher = LocalDispatcher(placement, _shards(path, placement, dtype, int4))
        for num_tokens in (0, 1, 33):
            x = torch.randn(num_tokens, args.hidden_size).to(dtype)
            ids, weights = _random_topk(num_tokens, args.n_routed_experts, args.num_experts_per_tok)
            got = dispatcher(1, x, ids, weights)
            want = moe_ref(full, x, ids, weights)
            assert got.dtype == dtype and got.shape == x.shape
            rtol, atol = TOL[dtype]
            torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol)


def test_added_replica_experts_compute_like_the_primary(make_ckpt):
    path = make_ckpt("tiny", "int4")
    a = LoopExperts.from_checkpoint(Checkpoint(path), {1: [0, 1], 2: [0]}, int4=True, dtype=torch.float32)
    b = LoopExperts.from_checkpoint(Checkpoint(path), {1: [4]}, int4=True, dtype=torch.float32)
    names = b.add_experts(Checkpoint(path), {1: [0, 1], 2: [0]})
    assert b.expert_ids() == {1: [0, 1, 4], 2: [0]}
    assert names and all(".experts.0." in n or ".experts.1." in n for n in names)
    x = torch.randn(9, 64)
    ids = torch.tensor([[0, 1]] * 9)
    w = torch.rand(9, 2)
    for layer_id in (1, 2):
        torch.testing.assert_close(b.forward(layer_id, x, ids, w), a.forward(layer_id, x, ids, w))
