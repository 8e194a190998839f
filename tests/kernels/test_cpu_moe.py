"""raymoe_kernels.cpu's MoE kernels (built here with the machine's C compiler): the router's selection against
Gate's torch ops, the routed experts against the per-pair reference, their batch and thread invariance, input
checks, and the engine taking them on CPU. Without a C compiler these tests are skipped with that reason."""

import os
import shutil

import pytest
import torch

from raymoe.model.args import get_preset
from raymoe.model.moe import Gate, RoutedExperts, moe_ref
from raymoe_kernels.cpu import moe_experts_cpu, moe_route_cpu

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None, reason="no C compiler on this machine")

TINY = get_preset("tiny")


def _gates(args, seed):
    torch.manual_seed(seed)
    ref = Gate(args)
    torch.nn.init.normal_(ref.weight, 0.0, args.hidden_size ** -0.5)
    ref.e_score_correction_bias.normal_(0.0, 0.1)
    fast = Gate(args)
    fast.load_state_dict(ref.state_dict())
    fast.set_kernel("cpu")
    return ref, fast


@pytest.mark.parametrize("experts,top_k,n_group,topk_group,norm", [
    (8, 2, 4, 2, True),  # the tiny preset
    (384, 8, 1, 1, True),  # Kimi K2
    (256, 8, 8, 4, True),  # DeepSeek-V3
    (16, 3, 8, 3, False),  # groups of 2 (their score is the sum of both), raw weights
    (12, 1, 3, 2, True),  # top-1
])
def test_route_selects_and_weights_as_the_torch_router(experts, top_k, n_group, topk_group, norm):
    args = TINY.replace(n_routed_experts=experts, num_experts_per_tok=top_k, n_group=n_group, topk_group=topk_group,
                        norm_topk_prob=norm)
    ref, fast = _gates(args, experts)
    x = torch.randn(70, args.hidden_size)
    want_ids, want_w = ref(x)
    ids, w = fast(x)
    assert ids.dtype == torch.int64 and w.dtype == torch.float32 and ids.shape == w.shape == (70, top_k)
    # the same experts per token; the kernel lists them by descending score + bias
    assert [sorted(r) for r in ids.tolist()] == [sorted(r) for r in want_ids.tolist()]
    choice = (x @ ref.weight.T).sigmoid() + ref.e_score_correction_bias
    assert (choice.gather(1, ids).diff(dim=1) <= 0).all()
    # each expert's weight, matched by id: its score (over the sum of the chosen ones) times the scaling factor
    torch.testing.assert_close(w.gather(1, ids.argsort(1)), want_w.gather(1, want_ids.argsort(1)), rtol=1e-6, atol=0)


def test_route_ties_take_the_lower_expert_id():
    scores = torch.full((3, 8), 0.5)
    ids, w = moe_route_cpu(scores, torch.zeros(8), n_group=4, topk_group=2, top_k=2, norm_topk_prob=True,
                           routed_scaling_factor=2.0)
    assert ids.tolist() == [[0, 1]] * 3  # groups 0 and 1 tie with groups 2, 3: the lower groups, then ids
    torch.testing.assert_close(w, torch.ones(3, 2))


def test_route_rejects_bad_shapes():
    scores = torch.rand(4, 8)
    with pytest.raises(ValueError, match="n_group=3"):
        moe_route_cpu(scores, torch.zeros(8), n_group=3, topk_group=1, top_k=2, norm_topk_prob=True,
                      routed_scaling_factor=1.0)
    with pytest.raises(ValueError, match="top_k=5"):  # 2 groups of 2 cannot give 5 experts
        moe_route_cpu(scores, torch.zeros(8), n_group=4, topk_group=2, top_k=5, norm_topk_prob=True,
                      routed_scaling_factor=1.0)
    with pytest.raises(ValueError, match="bias"):
        moe_route_cpu(scores, torch.zeros(7), n_group=1, topk_group=1, top_k=2, norm_topk_prob=True,
                      routed_scaling_factor=1.0)
    with pytest.raises(ValueError, match="scores"):
        moe_route_cpu(scores.double(), torch.zeros(8), n_group=1, topk_group=1, top_k=2, norm_topk_prob=True,
                      routed_scaling_factor=1.0)


def _experts(args, hosted, seed=0):
    torch.manual_seed(seed)
    layer = RoutedExperts(args, hosted)
    for p in layer.parameters():
        torch.nn.init.normal_(p, 0.0, p.shape[-1] ** -0.5)
    assert layer.fuse()
    layer.set_kernel("cpu")
    return layer


def _routing(args, tokens, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, args.hidden_size, generator=gen)
    ids = torch.stack([torch.randperm(args.n_routed_experts, generator=gen)[: args.num_experts_per_tok]
                       for _ in range(tokens)]) if tokens else torch.zeros(0, args.num_experts_per_tok, dtype=torch.long)
    return x, ids, torch.rand(tokens, args.num_experts_per_tok, generator=gen)


@pytest.mark.parametrize("args", [
    TINY,
    TINY.replace(hidden_size=72, moe_intermediate_size=20, n_routed_experts=12, num_experts_per_tok=3),  # remainders
    TINY.replace(hidden_size=5, moe_intermediate_size=3, n_routed_experts=4, num_experts_per_tok=4, n_group=1,
                 topk_group=1),  # all scalar
])
@pytest.mark.parametrize("tokens", [0, 1, 7, 130])
def test_experts_match_the_per_pair_reference(args, tokens):
    """All experts hosted, and a shard hosting some of them (ids of others and -1 are skipped), against moe_ref;
    a token routed twice to one expert counts twice."""
    x, ids, w = _routing(args, tokens)
    if tokens > 2:
        ids[0, 0] = -1
        ids[-1] = ids[-1, 0]
    for hosted in (list(range(args.n_routed_experts)), [3, 1]):
        layer = _experts(args, hosted)
        out = layer.partial_sum(x, ids, w)
        assert out.dtype == torch.float32 and out.shape == x.shape
        torch.testing.assert_close(out, moe_ref(layer, x, ids, w).float(), rtol=1e-5, atol=1e-5)


def test_a_tokens_output_does_not_depend_on_its_batch_or_the_thread_count():
    args = TINY
    layer = _experts(args, range(args.n_routed_experts))
    x, ids, w = _routing(args, 61)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = layer.partial_sum(x, ids, w)
        torch.set_num_threads(3)
        three = layer.partial_sum(x, ids, w)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, three)
    for t in (0, 17, 60):
        assert torch.equal(layer.partial_sum(x[t:t + 1], ids[t:t + 1], w[t:t + 1])[0], one[t])
    assert torch.equal(layer.partial_sum(x[5:40], ids[5:40], w[5:40]), one[5:40])


def test_experts_reject_bad_input():
    args = TINY
    layer = _experts(args, range(args.n_routed_experts))
    w13, w2, local = layer._fused
    x, ids, w = _routing(args, 4)
    bad = ids.clone()
    bad[2, 1] = args.n_routed_experts + 1
    with pytest.raises(ValueError, match="topk_ids must be in"):
        moe_experts_cpu(x, bad, w, local, w13, w2)
    with pytest.raises(ValueError, match="float32"):
        moe_experts_cpu(x.double(), ids, w, local, w13, w2)
    with pytest.raises(ValueError, match="shapes do not match"):
        moe_experts_cpu(x, ids[:3], w, local, w13, w2)
    with pytest.raises(ValueError, match="expert stacks"):
        moe_experts_cpu(x, ids, w, local, w13, w2[:, :5])
    # a bf16 layer keeps the torch path (the kernel is fp32)
    bf = RoutedExperts(args, range(args.n_routed_experts), dtype=torch.bfloat16)
    bf.load_state_dict(layer.state_dict())
    assert bf.fuse()
    bf.set_kernel("cpu")
    torch.testing.assert_close(bf.partial_sum(x.bfloat16(), ids, w), layer.partial_sum(x, ids, w), atol=0.05, rtol=0.02)


def test_the_engine_routes_and_computes_experts_through_the_kernels_on_cpu(tiny_ckpt):
    """`kernels.backend: auto` on CPU sets the C router and experts on every MoE layer; `torch` does not (the
    greedy tokens of both are compared in test_cpu_mla_decode's engine test)."""
    from raymoe import LLM

    for backend, want in (("auto", True), ("torch", False)):
        llm = LLM(model=str(tiny_ckpt), dtype="float32", kernels_backend=backend, kv_cache_memory=8 << 20)
        model = llm.engine.runner.model
        gates = [m for m in model.modules() if isinstance(m, Gate)]
        experts = [m for m in model.modules() if isinstance(m, RoutedExperts)]
        assert gates and experts
        assert all((g._route_cpu is not None) == want for g in gates)
        assert all((e.kernel == "cpu") == want and (e._experts_cpu is not None) == want for e in experts)
        llm.shutdown()
