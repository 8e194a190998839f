"""fused_moe_w4a16 against its dequantise-then-matmul reference, and the INT4 packing it reads (K2_FACTS §1.5)."""

import math

import pytest
import torch
import torch.nn.functional as F

from raymoe_kernels.moe_w4a16 import dequant_int4, fused_moe_w4a16, fused_moe_w4a16_ref, pack_int4
from raymoe_kernels.permute import moe_permute, moe_unpermute

GROUP = 32


def _scales(shape, fan_in, dtype, device):
    # 4 significant bits x a power of two keeps every activation O(1), and makes q * scale (4 x 4 bits) exact in
    # bf16, so a bf16 kernel differs from the fp32 reference only by rounding activations, not the dequant itself.
    mantissa = (8 + torch.randint(0, 8, shape, device=device)) / 8
    return (mantissa * 2.0 ** -round(math.log2(8 * fan_in**0.5))).to(dtype)


def _expert_weights(num_experts, hidden_size, inter_size, scale_dtype, device):
    """Random INT4 experts: (w13_packed, w13_scale, w2_packed, w2_scale)."""
    q13 = torch.randint(-8, 8, (num_experts, 2 * inter_size, hidden_size), device=device)
    q2 = torch.randint(-8, 8, (num_experts, hidden_size, inter_size), device=device)
    return (
        pack_int4(q13),
        _scales((num_experts, 2 * inter_size, hidden_size // GROUP), hidden_size, scale_dtype, device),
        pack_int4(q2),
        _scales((num_experts, hidden_size, inter_size // GROUP), inter_size, scale_dtype, device),
    )


def _grouped_rows(topk_ids, num_experts, hidden_size, dtype, device):
    x = torch.randn(topk_ids.shape[0], hidden_size, device=device).to(dtype)
    sorted_ids, _, offsets, inverse = moe_permute(topk_ids.to(device), num_experts)
    return x, x[sorted_ids.long() // topk_ids.shape[1]], offsets, inverse  # x_sorted [T*K, D]


def test_pack_int4_is_lsb_first_offset_binary():
    q = torch.tensor([[-8, -7, 0, 1, 2, 3, 6, 7]])  # nibbles 0,1,8,9,10,11,14,15
    assert pack_int4(q).item() == 0xFEBA9810 - 2**32  # top nibble 15 sets the int32 sign bit
    torch.testing.assert_close(
        dequant_int4(pack_int4(q.repeat(1, 4)), torch.tensor([[0.5]])), 0.5 * q.repeat(1, 4).float()
    )


@pytest.mark.parametrize("num_tokens", [0, 1, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_moe_matches_ref_when_hidden_is_not_a_power_of_two(num_tokens, dtype, device, assert_close_ref):
    num_experts, top_k, hidden_size, inter_size = 8, 2, 160, 96
    weights = _expert_weights(num_experts, hidden_size, inter_size, dtype, device)
    topk_ids = torch.rand(num_tokens, num_experts).topk(top_k, dim=1).indices
    _, x_sorted, offsets, _ = _grouped_rows(topk_ids, num_experts, hidden_size, dtype, device)
    assert_close_ref(fused_moe_w4a16, fused_moe_w4a16_ref, x_sorted, offsets, *weights, dtype=dtype)


def test_fused_moe_matches_ref_when_first_middle_and_last_experts_are_empty(device, assert_close_ref):
    used = torch.tensor([1, 2, 4, 5, 6])  # experts 0, 3 and 7 get no rows
    topk_ids = used[torch.rand(33, len(used)).topk(2, dim=1).indices]
    weights = _expert_weights(8, 96, 64, torch.float32, device)
    _, x_sorted, offsets, _ = _grouped_rows(topk_ids, 8, 96, torch.float32, device)
    assert offsets.diff()[[0, 3, 7]].tolist() == [0, 0, 0]
    offsets = offsets.long()  # int64 offsets too, as torch.cumsum returns them
    assert_close_ref(fused_moe_w4a16, fused_moe_w4a16_ref, x_sorted, offsets, *weights, dtype=torch.float32)


def test_fused_moe_matches_ref_when_all_tokens_pick_one_expert(device, assert_close_ref):
    topk_ids = torch.full((33, 1), 5)  # 33 rows: several row tiles of one expert
    weights = _expert_weights(8, 96, 64, torch.bfloat16, device)
    _, x_sorted, offsets, _ = _grouped_rows(topk_ids, 8, 96, torch.bfloat16, device)
    assert_close_ref(fused_moe_w4a16, fused_moe_w4a16_ref, x_sorted, offsets, *weights, dtype=torch.bfloat16)


def test_fused_moe_matches_ref_with_k2_expert_count(device, assert_close_ref):
    num_experts, top_k = 384, 8  # K2 routing; widths shrunk (7168 / 2048) so the interpreter stays fast
    weights = _expert_weights(num_experts, 64, 32, torch.bfloat16, device)
    topk_ids = torch.rand(3, num_experts).topk(top_k, dim=1).indices
    _, x_sorted, offsets, _ = _grouped_rows(topk_ids, num_experts, 64, torch.bfloat16, device)
    assert_close_ref(fused_moe_w4a16, fused_moe_w4a16_ref, x_sorted, offsets, *weights, dtype=torch.bfloat16)


def test_permute_experts_unpermute_matches_per_token_expert_loop(device, assert_close_ref):
    num_experts, top_k, hidden_size, inter_size = 8, 2, 96, 64
    weights = _expert_weights(num_experts, hidden_size, inter_size, torch.float32, device)
    topk_ids = torch.rand(17, num_experts).topk(top_k, dim=1).indices.to(device)
    topk_weights = torch.rand(17, top_k, device=device)
    x = torch.randn(17, hidden_size, device=device)

    def pipeline(x, topk_ids, topk_weights):
        sorted_ids, _, offsets, inverse = moe_permute(topk_ids, num_experts)
        expert_out = fused_moe_w4a16(x[sorted_ids.long() // top_k], offsets, *weights)
        return moe_unpermute(expert_out, inverse, topk_weights)

    def per_token_loop(x, topk_ids, topk_weights):
        w13, w2 = dequant_int4(weights[0], weights[1]), dequant_int4(weights[2], weights[3])
        out = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for e, w in zip(topk_ids[t].tolist(), topk_weights[t]):
                gate, up = (w13[e] @ x[t]).chunk(2)
                out[t] += w * (w2[e] @ (F.silu(gate) * up))
        return out

    assert_close_ref(pipeline, per_token_loop, x, topk_ids, topk_weights, dtype=torch.float32)


def test_fused_moe_rejects_hidden_not_a_multiple_of_the_group(device):
    weights = _expert_weights(2, 64, 32, torch.float32, device)
    x_sorted = torch.randn(4, 48, device=device)
    with pytest.raises(AssertionError, match="multiple of group_size"):
        fused_moe_w4a16(x_sorted, torch.tensor([0, 4, 4], device=device), *weights)
