"""MLA (naive vs absorbed, packed batches), RoPE, router and routed-expert unit tests (fp32, CPU)."""

import math
import os
import shutil

import pytest
import torch
from torch import nn

from raymoe.model.args import RopeArgs, get_preset
from raymoe.model.layers import RotaryEmbedding, apply_rope, rope_inv_freq
from raymoe.model.mla import MLA, DenseCausalAttention, causal_mask
from raymoe.model.moe import Gate, MoE, RoutedExperts, moe_ref

TINY = get_preset("tiny")
# the router's and routed experts' C kernels (raymoe_kernels.cpu), where a C compiler can build them
KERNELS = ["torch", pytest.param("cpu", marks=pytest.mark.skipif(
    shutil.which(os.environ.get("CC", "cc")) is None, reason="no C compiler on this machine"))]


@torch.no_grad()
def randomize(module: nn.Module) -> nn.Module:
    """Weights ~ N(0, 1/fan_in), 1-D weights ~ 1 + N(0, 0.1²) (norms not all ones), buffers ~ N(0, 0.1²)."""
    for p in module.parameters():
        if p.dim() >= 2:
            p.normal_(0.0, p.shape[-1] ** -0.5)
        else:
            p.copy_(1 + 0.1 * torch.randn_like(p))
    for b in module.buffers():
        b.normal_(0.0, 0.1)
    return module


def split_positions(seq_lens):
    return torch.cat([torch.arange(n) for n in seq_lens])


# -- MLA ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("q_lora_rank", [TINY.q_lora_rank, None])
def test_absorbed_equals_naive_on_packed_sequences(q_lora_rank):
    mla = randomize(MLA(TINY.replace(q_lora_rank=q_lora_rank), layer_id=0))
    seq_lens = [5, 1, 9, 3]
    x = torch.randn(sum(seq_lens), TINY.hidden_size)
    pos = split_positions(seq_lens)
    naive = mla(x, pos, DenseCausalAttention(seq_lens, "naive"))
    absorbed = mla(x, pos, DenseCausalAttention(seq_lens, "absorb"))
    assert naive.shape == (sum(seq_lens), TINY.hidden_size)
    torch.testing.assert_close(absorbed, naive, atol=1e-5, rtol=0)


def test_attend_latent_equals_naive_with_cache_prefix_mask():
    # Decode/chunked-prefill shape: T new queries over S >= T cached keys, arbitrary visible sets.
    mla = randomize(MLA(TINY, layer_id=3))
    t, s = 4, 11
    q_nope, q_pe = mla.project_q(torch.randn(t, TINY.hidden_size), torch.arange(7, 7 + t))
    c_kv, k_pe = mla.project_kv(torch.randn(s, TINY.hidden_size), torch.arange(s))
    mask = torch.rand(t, s) < 0.6
    mask[:, 0] = True
    naive = mla.attend_naive(q_nope, q_pe, c_kv, k_pe, mask)
    absorbed = mla.unabsorb(mla.attend_latent(mla.absorb_q(q_nope), q_pe, c_kv, k_pe, mask))
    assert naive.shape == (t, TINY.num_attention_heads, TINY.v_head_dim)
    torch.testing.assert_close(absorbed, naive, atol=1e-5, rtol=0)
    # masked keys do not matter: changing them leaves the output unchanged
    c_kv2 = torch.where(mask.any(0)[:, None], c_kv, torch.randn_like(c_kv))
    torch.testing.assert_close(mla.attend_naive(q_nope, q_pe, c_kv2, k_pe, mask), naive)


@pytest.mark.parametrize("mode", ["naive", "absorb"])
def test_packed_batch_equals_each_sequence_alone(mode):
    mla = randomize(MLA(TINY, layer_id=1))
    seq_lens = [3, 7, 1, 6]
    x = torch.randn(sum(seq_lens), TINY.hidden_size)
    packed = mla(x, split_positions(seq_lens), DenseCausalAttention(seq_lens, mode))
    alone = [mla(xs, torch.arange(len(xs)), DenseCausalAttention(None, mode)) for xs in x.split(seq_lens)]
    torch.testing.assert_close(packed, torch.cat(alone), atol=1e-5, rtol=0)


def test_project_kv_is_normalised_latent_and_roped_key():
    mla = randomize(MLA(TINY, layer_id=0))
    x, pos = torch.randn(6, TINY.hidden_size), torch.arange(6)
    c_kv, k_pe = mla.project_kv(x, pos)
    assert c_kv.shape == (6, TINY.kv_lora_rank) and k_pe.shape == (6, TINY.qk_rope_head_dim)
    raw_c, raw_pe = mla.kv_a_proj_with_mqa(x).split([TINY.kv_lora_rank, TINY.qk_rope_head_dim], -1)
    torch.testing.assert_close(c_kv, mla.kv_a_layernorm(raw_c))
    torch.testing.assert_close(k_pe[0], torch.cat([raw_pe[0, 0::2], raw_pe[0, 1::2]]))  # position 0: no rotation


def test_dense_causal_attention_rejects_bad_input():
    with pytest.raises(ValueError, match="mode"):
        DenseCausalAttention(None, "flash")
    with pytest.raises(ValueError, match="seq_lens"):
        DenseCausalAttention([2, 0])
    mla = MLA(TINY, layer_id=0)
    with pytest.raises(ValueError, match="sum to 5"):
        mla(torch.randn(4, TINY.hidden_size), torch.arange(4), DenseCausalAttention([2, 3]))


def test_causal_mask_is_block_diagonal_lower_triangular():
    m = causal_mask([2, 3])
    want = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]])
    assert torch.equal(m, want.bool())


# -- RoPE --------------------------------------------------------------------------------------
def test_rope_matches_deepseek_complex_form():
    # DeepSeek-V3 inference/model.py rotates pairs as complex numbers; we return [evens | odds].
    args = TINY.replace(rope=RopeArgs(rope_theta=10000.0))
    rot = RotaryEmbedding(args)
    r = args.qk_rope_head_dim
    x, pos = torch.randn(5, 3, r), torch.tensor([0, 1, 7, 100, 4000])
    cos, sin = rot(pos)
    inv = 1.0 / (10000.0 ** (torch.arange(0, r, 2, dtype=torch.float64) / r))
    z = torch.view_as_complex(x.double().view(5, 3, r // 2, 2)) * torch.polar(
        torch.ones(5, r // 2, dtype=torch.float64), pos[:, None].double() * inv)[:, None]
    ref = torch.view_as_real(z)  # [..., R/2, 2]
    got = apply_rope(x, cos, sin)
    torch.testing.assert_close(got.double(), torch.cat([ref[..., 0], ref[..., 1]], -1), atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotate_is_apply_rope_bit_for_bit_and_follows_new_positions(dtype):
    rot = RotaryEmbedding(TINY)
    r = TINY.qk_rope_head_dim
    for pos in (torch.tensor([0, 1, 7, 100, 4000]), torch.tensor([3, 3, 9, 12, 5])):  # a new tensor: new tables
        cos, sin = rot(pos)
        for x in (torch.randn(5, 3, r, dtype=dtype), torch.randn(5, r, dtype=dtype)):  # q_pe [T,H,R], k_pe [T,R]
            assert torch.equal(rot.rotate(x, pos), apply_rope(x, cos, sin))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepared_rotation_rows_give_the_same_bits(dtype):
    """The engine precomputes the rows of every reachable position; gathering them must give what
    computing them per forward gives, for each new positions tensor."""
    fresh, prepared = RotaryEmbedding(TINY), RotaryEmbedding(TINY)
    prepared.prepare(4096, "cpu", dtype)
    r = TINY.qk_rope_head_dim
    for pos in (torch.tensor([0, 1, 7, 100, 4095]), torch.tensor([3, 3, 9, 12, 5])):
        for x in (torch.randn(5, 3, r, dtype=dtype), torch.randn(5, r, dtype=dtype)):
            assert torch.equal(prepared.rotate(x, pos), fresh.rotate(x, pos))
    if dtype != torch.float32:  # another dtype than the prepared one: computed on the fly, same values
        x32 = torch.randn(5, r)
        assert torch.equal(prepared.rotate(x32, pos), fresh.rotate(x32, pos))


def test_rope_scores_depend_only_on_relative_position():
    rot = RotaryEmbedding(TINY)  # YaRN preset, cos/sin scale 1 (mscale == mscale_all_dim)
    q, k = torch.randn(1, TINY.qk_rope_head_dim), torch.randn(1, TINY.qk_rope_head_dim)

    def score(pq, pk):
        cq, sq = rot(torch.tensor([pq]))
        ck, sk = rot(torch.tensor([pk]))
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    torch.testing.assert_close(score(9, 4), score(109, 104), atol=1e-4, rtol=0)
    assert rot.attention_scaling == 1.0


def test_yarn_hard_switch_for_k2_betas():
    # K2-Thinking (K2_FACTS §2.2): beta_fast = beta_slow = 1 -> pairs 0..19 keep θ^-2i/64, pairs 20..31 are /64.
    k2 = get_preset("kimi-k2-thinking")
    inv, scale = rope_inv_freq(k2.rope, k2.qk_rope_head_dim)
    base = 1.0 / (k2.rope.rope_theta ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    torch.testing.assert_close(inv[:20], base[:20])
    torch.testing.assert_close(inv[20:], base[20:] / 64)
    assert scale == 1.0
    assert math.isclose(k2.softmax_scale, 0.144680, rel_tol=1e-5)


def test_unknown_rope_type_is_rejected():
    with pytest.raises(ValueError, match="longrope"):
        rope_inv_freq(RopeArgs(rope_type="longrope"), 8)


# -- router ------------------------------------------------------------------------------------
def route_ref(scores, bias, n_group, topk_group, top_k):
    """Brute force: per token, keep the best topk_group groups (sum of the top-2 biased scores), then top-k."""
    e = scores.shape[1]
    size = e // n_group
    chosen = []
    for row in scores + bias:
        group_score = [sorted(row[g * size:(g + 1) * size].tolist())[-2:] for g in range(n_group)]
        groups = sorted(range(n_group), key=lambda g: -sum(group_score[g]))[:topk_group]
        allowed = [i for g in groups for i in range(g * size, (g + 1) * size)]
        chosen.append(set(sorted(allowed, key=lambda i: -row[i].item())[:top_k]))
    return chosen


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("n_group,topk_group", [(4, 2), (4, 1), (1, 1)])
def test_gate_group_limited_selection_matches_brute_force(n_group, topk_group, kernel):
    args = TINY.replace(n_routed_experts=16, num_experts_per_tok=3, n_group=n_group, topk_group=topk_group)
    gate = randomize(Gate(args))
    gate.set_kernel(kernel)
    x = torch.randn(40, args.hidden_size)
    ids, w = gate(x)
    assert ids.dtype == torch.int64 and w.dtype == torch.float32 and ids.shape == (40, 3)
    scores = (x @ gate.weight.T).sigmoid()
    want = route_ref(scores, gate.e_score_correction_bias, n_group, topk_group, 3)
    assert [set(r.tolist()) for r in ids] == want
    if n_group > 1:  # chosen experts lie in at most topk_group groups
        assert all(len(set((r // (16 // n_group)).tolist())) <= topk_group for r in ids)


@pytest.mark.parametrize("kernel", KERNELS)
def test_gate_bias_selects_but_does_not_weight(kernel):
    args = TINY.replace(n_group=1, topk_group=1)
    gate = Gate(args)
    gate.set_kernel(kernel)
    nn.init.zeros_(gate.weight)  # every score is sigmoid(0) = 0.5
    gate.e_score_correction_bias.copy_(torch.tensor([0.0, 0.3, 0.0, 0.0, 0.0, 0.0, 0.2, 0.0]))
    ids, w = gate(torch.randn(5, args.hidden_size))
    assert all(set(r.tolist()) == {1, 6} for r in ids)
    torch.testing.assert_close(w, torch.full_like(w, args.routed_scaling_factor / 2))


@pytest.mark.parametrize("kernel", KERNELS)
def test_gate_weights_sum_to_scaling_factor_or_are_raw_scores(kernel):
    gate = randomize(Gate(TINY))
    gate.set_kernel(kernel)
    x = torch.randn(12, TINY.hidden_size, dtype=torch.bfloat16)
    ids, w = gate(x)
    assert w.dtype == torch.float32
    torch.testing.assert_close(w.sum(-1), torch.full((12,), TINY.routed_scaling_factor))
    raw = Gate(TINY.replace(norm_topk_prob=False))
    raw.set_kernel(kernel)
    raw.load_state_dict(gate.state_dict())
    ids2, w2 = raw(x)
    scores = (x.float() @ gate.weight.float().T).sigmoid()
    assert torch.equal(ids2, ids)
    torch.testing.assert_close(w2, scores.gather(1, ids) * TINY.routed_scaling_factor)


# -- routed experts ----------------------------------------------------------------------------
def routed_inputs(args, t=10):
    x = torch.randn(t, args.hidden_size)
    ids = torch.stack([torch.randperm(args.n_routed_experts)[: args.num_experts_per_tok] for _ in range(t)]) if t \
        else torch.zeros(0, args.num_experts_per_tok, dtype=torch.long)
    return x, ids, torch.rand(t, args.num_experts_per_tok)


def test_routed_experts_match_reference_and_subsets_add_up():
    args = TINY
    full = randomize(RoutedExperts(args, range(args.n_routed_experts)))
    x, ids, w = routed_inputs(args)
    out = full(x, ids, w)
    torch.testing.assert_close(out, moe_ref(full, x, ids, w), atol=1e-5, rtol=0)

    part_a, part_b = [0, 3, 4, 7], [1, 2, 5, 6]
    shards = []
    for part in (part_a, part_b):
        shard = RoutedExperts(args, part)
        shard.load_state_dict({k: v for k, v in full.state_dict().items() if int(k.split(".")[0]) in part})
        shards.append(shard)
        torch.testing.assert_close(shard(x, ids, w), moe_ref(shard, x, ids, w), atol=1e-5, rtol=0)
    torch.testing.assert_close(shards[0](x, ids, w) + shards[1](x, ids, w), out, atol=1e-5, rtol=0)
    assert sorted(full.state_dict())[:3] == ["0.down_proj.weight", "0.gate_proj.weight", "0.up_proj.weight"]


def _fuse(experts: RoutedExperts, path: str) -> None:
    """fuse(), then keep the computation `path` would pick: TINY (8 experts, top-2) computes densely;
    dropping the dense weights leaves the padded grouped GEMM (what models with many experts use);
    "cpu" is the C kernel over the same stacks (`kernels.backend: auto` on CPU)."""
    assert experts.fuse()
    assert experts._dense  # n_routed (8) <= GROUPED_MAX_PADDING (4) x top_k (2)
    if path == "grouped":
        experts._dense = False
    if path == "cpu":
        experts.set_kernel("cpu")


@pytest.mark.parametrize("path", ["grouped", "dense", pytest.param("cpu", marks=KERNELS[1].marks)])
@pytest.mark.parametrize("tokens", [0, 1, 10, 33, 300])
def test_fused_paths_equal_the_per_expert_loop(tokens, path):
    """After fuse() the experts' weights are views of stacked [E, D, 2I] / [E, I, D] tensors, and both the
    padded bmm path and the dense path (every expert on every token, routing-weighted) give the loop's
    sums, for hosted subsets, ids < 0, skewed routing and a token routed twice to the same expert."""
    args = TINY
    full = randomize(RoutedExperts(args, range(args.n_routed_experts)))
    shard = RoutedExperts(args, [1, 2, 6])
    shard.load_state_dict({k: v for k, v in full.state_dict().items() if int(k.split(".")[0]) in (1, 2, 6)})
    x, ids, w = routed_inputs(args, tokens)
    if tokens > 1:
        ids[: tokens // 2, 0] = -1  # pairs another shard computes
        ids[tokens // 2:, 1] = 6  # a hot expert
        ids[-1] = 6  # both of the last token's pairs on expert 6: their weights add up
    for experts in (full, shard):
        want = experts(x, ids, w)  # loop: not fused yet
        _fuse(experts, path)
        w13, w2, _ = experts._fused
        first = experts[str(experts.expert_ids[0])]
        assert first.gate_proj.weight.data_ptr() == w13.data_ptr()  # a view: no second copy
        assert first.down_proj.weight.data_ptr() == w2.data_ptr()
        torch.testing.assert_close(experts(x, ids, w), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(experts(x, ids, w), moe_ref(experts, x, ids, w), atol=1e-5, rtol=1e-5)
    # a state_dict round trip through the views keeps the stacked weights in step
    again = RoutedExperts(args, range(args.n_routed_experts))
    _fuse(again, path)
    again.load_state_dict(full.state_dict())  # copies into the views
    torch.testing.assert_close(again(x, ids, w), full(x, ids, w))
    torch.testing.assert_close(again(x, ids, w), moe_ref(again, x, ids, w), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype,path", [(torch.float32, "dense"), (torch.bfloat16, "dense"),
                                        pytest.param(torch.float32, "cpu", marks=KERNELS[1].marks)])
def test_dense_partial_sums_of_shards_add_up_to_the_full_sum_bit_for_bit(dtype, path):
    """Local and expert-parallel engines must agree token for token: each expert's output is the same GEMM
    whether its shard hosts 8 experts or 2, and with top-2 routing the fp32 sum of two non-zero partials
    is the same whichever shards they come from."""
    args = TINY
    full = randomize(RoutedExperts(args, range(args.n_routed_experts), dtype=dtype))
    shards = []
    for part in ([0, 1], [2, 3], [4, 5], [6, 7]):
        shard = RoutedExperts(args, part, dtype=dtype)
        shard.load_state_dict({k: v for k, v in full.state_dict().items() if int(k.split(".")[0]) in part})
        _fuse(shard, path)
        shards.append(shard)
    _fuse(full, path)
    x, ids, w = routed_inputs(args, 40)
    x = x.to(dtype)
    total = shards[0].partial_sum(x, ids, w)
    for shard in shards[1:]:
        total = total + shard.partial_sum(x, ids, w)
    assert torch.equal(total, full.partial_sum(x, ids, w))


def test_dense_path_in_bf16_accumulates_in_fp32():
    args = TINY
    experts = randomize(RoutedExperts(args, range(args.n_routed_experts), dtype=torch.bfloat16))
    x, ids, w = routed_inputs(args, 12)
    x = x.bfloat16()
    want = experts.partial_sum(x, ids, w)  # the loop, fp32 sums of bf16 expert outputs
    _fuse(experts, "dense")
    got = experts.partial_sum(x, ids, w)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=0.05, rtol=0.02)  # bf16 rounding of the activations


def test_grouped_gemm_falls_back_to_the_loop_when_padding_would_dominate():
    args = TINY
    experts = randomize(RoutedExperts(args, range(args.n_routed_experts)))
    x, ids, w = routed_inputs(args, 64)
    ids[:] = 3  # expert 3 gets every pair: 8 experts x 128 padded rows for 128 pairs, over the limit
    want = moe_ref(experts, x, ids, w)
    _fuse(experts, "grouped")
    out = torch.zeros(64 * 2, args.hidden_size)
    assert not experts._grouped(x, ids.reshape(-1), w.reshape(-1), 2, out)
    torch.testing.assert_close(experts(x, ids, w), want, atol=1e-5, rtol=1e-5)


def test_routed_experts_empty_and_invalid():
    x, ids, w = routed_inputs(TINY)
    assert torch.equal(RoutedExperts(TINY, [])(x, ids, w), torch.zeros_like(x))
    with pytest.raises(ValueError, match="outside"):
        RoutedExperts(TINY, [0, 8])
    with pytest.raises(ValueError, match="duplicates"):
        RoutedExperts(TINY, [1, 1])


def test_moe_uses_routed_fn_when_set_and_names_match_checkpoint():
    moe = randomize(MoE(TINY, layer_id=2))
    x = torch.randn(6, TINY.hidden_size)
    local = moe(x)
    ids, w = moe.gate(x)
    torch.testing.assert_close(local, moe.experts(x, ids, w) + moe.shared_experts(x))
    calls = []

    def remote(layer_id, xs, topk_ids, topk_weights):
        calls.append(layer_id)
        return moe.experts(xs, topk_ids, topk_weights)

    moe.routed_fn = remote
    torch.testing.assert_close(moe(x), local)
    assert calls == [2]
    keys = set(moe.state_dict())
    assert {"gate.weight", "gate.e_score_correction_bias", "experts.7.up_proj.weight",
            "shared_experts.down_proj.weight"} <= keys
    assert moe.gate.e_score_correction_bias.dtype == torch.float32
