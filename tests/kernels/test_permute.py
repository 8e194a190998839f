"""moe_permute / moe_unpermute kernels against their torch references, plus the routing invariants."""

import pytest
import torch

from raymoe_kernels.permute import moe_permute, moe_permute_ref, moe_unpermute, moe_unpermute_ref


def _random_topk(num_tokens: int, num_experts: int, top_k: int, device) -> torch.Tensor:
    # Distinct experts per token, as torch.topk over router scores gives.
    return torch.rand(num_tokens, num_experts, device=device).topk(top_k, dim=1).indices  # [T, K] int64


@pytest.mark.parametrize("num_tokens", [0, 1, 33, 1823])
@pytest.mark.parametrize("num_experts,top_k", [(8, 2), (384, 8)])
def test_permute_matches_ref(num_tokens, num_experts, top_k, device, assert_close_ref):
    topk_ids = _random_topk(num_tokens, num_experts, top_k, device)
    assert_close_ref(moe_permute, moe_permute_ref, topk_ids, num_experts, dtype=torch.int32)


def test_permute_is_grouped_stable_and_inverse_round_trips(device):
    topk_ids = _random_topk(33, 16, 4, device).int()
    sorted_ids, counts, offsets, inverse = moe_permute(topk_ids, 16)
    experts_in_order = topk_ids.view(-1)[sorted_ids.long()]
    assert int(counts.sum()) == 33 * 4
    assert torch.equal(offsets[1:] - offsets[:-1], counts)
    assert bool((experts_in_order[1:] >= experts_in_order[:-1]).all())
    for e in range(16):  # stable: within an expert, pair indices ascend
        run = sorted_ids[offsets[e] : offsets[e + 1]]
        assert bool((run[1:] > run[:-1]).all())
    assert torch.equal(sorted_ids[inverse.long()], torch.arange(33 * 4, device=device, dtype=torch.int32))


def test_permute_when_all_pairs_pick_one_expert(device, assert_close_ref):
    topk_ids = torch.full((300, 1), 5, device=device)
    _, counts, offsets, _ = assert_close_ref(moe_permute, moe_permute_ref, topk_ids, 8, dtype=torch.int32)
    assert counts.tolist() == [0, 0, 0, 0, 0, 300, 0, 0]
    assert offsets.tolist() == [0, 0, 0, 0, 0, 0, 300, 300, 300]


@pytest.mark.parametrize("num_tokens", [0, 1, 33])
@pytest.mark.parametrize("hidden_size", [96, 160])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unpermute_matches_ref(num_tokens, hidden_size, dtype, device, assert_close_ref):
    top_k = 8
    _, _, _, inverse = moe_permute_ref(_random_topk(num_tokens, 384, top_k, device), 384)
    expert_out = torch.randn(num_tokens * top_k, hidden_size, device=device).to(dtype)
    topk_weights = torch.rand(num_tokens, top_k, device=device)
    assert_close_ref(moe_unpermute, moe_unpermute_ref, expert_out, inverse, topk_weights, dtype=dtype)


def test_permute_then_unpermute_with_unit_weights_sums_each_token_k_times(device):
    x = torch.randn(33, 96, device=device)
    sorted_ids, _, _, inverse = moe_permute(_random_topk(33, 16, 4, device), 16)
    x_sorted = x[sorted_ids.long() // 4]  # [T*K, D]
    out = moe_unpermute(x_sorted, inverse, torch.ones(33, 4, device=device))
    torch.testing.assert_close(out, 4 * x)
