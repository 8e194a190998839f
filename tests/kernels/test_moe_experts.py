"""The fused W4A16 MoE kernel wired into expert compute (`kernels.backend: triton`), against the torch path.

The same INT4 checkpoint's experts are loaded twice, once per backend: the torch side runs each expert
through the CPU int4 GEMM, the triton side stacks the compressed-tensors buffers and runs
permute → fused_moe_w4a16 → unpermute (here through TRITON_INTERPRET=1). Both are what an engine or an
expert shard computes for the same rows, including pairs hosted elsewhere (id -1 or not in the shard).
"""

from __future__ import annotations

import pytest
import torch

from raymoe.experts.compute import LoopExperts
from raymoe.model.loader import Checkpoint
from raymoe.model.tiny import make_tiny

pytest.importorskip("triton")


def _load(ckpt: Checkpoint, experts: dict[int, list[int]], kernel: str) -> LoopExperts:
    return LoopExperts.from_checkpoint(ckpt, experts, int4=True, dtype=torch.float32, kernel=kernel)


def _inputs(args, tokens: int, hosted: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.randn(tokens, args.hidden_size)
    k = args.num_experts_per_tok
    ids = torch.stack([torch.randperm(args.n_routed_experts)[:k] for _ in range(tokens)]) if tokens \
        else torch.zeros(0, k, dtype=torch.long)
    if tokens > 2:
        ids[0, 0] = -1  # computed by another shard
        ids[1:, -1] = hosted[0]  # a hot expert
    return x, ids, torch.rand(tokens, k)


@pytest.mark.parametrize("tokens", [0, 1, 33])
def test_triton_experts_match_torch_experts_of_a_shard(tiny_int4_ckpt, tokens):
    ckpt = Checkpoint(tiny_int4_ckpt)
    args = ckpt.args
    layer = next(i for i in range(args.num_hidden_layers) if args.is_moe_layer(i))
    hosted = [5, 0, 3, 7]  # pairs on experts 1, 2, 4 and 6 belong to other shards
    torch_experts = _load(ckpt, {layer: hosted}, "torch")
    triton_experts = _load(ckpt, {layer: hosted}, "triton")
    routed = triton_experts.layer(layer)
    assert routed._int4 is not None and torch_experts.layer(layer)._int4 is None
    w13p = routed._int4[0]
    assert routed["5"].gate_proj.weight_packed.data_ptr() == w13p.data_ptr()  # views of the stack, one copy
    x, ids, w = _inputs(args, tokens, hosted)
    want = torch_experts.forward(layer, x, ids, w)
    got = triton_experts.forward(layer, x, ids, w)
    assert got.dtype == torch.float32 and got.shape == (tokens, args.hidden_size)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)


def test_triton_experts_all_tokens_on_one_expert_and_an_idle_expert(tiny_int4_ckpt):
    ckpt = Checkpoint(tiny_int4_ckpt)
    args = ckpt.args
    layer = next(i for i in range(args.num_hidden_layers) if args.is_moe_layer(i))
    experts = list(range(args.n_routed_experts))
    torch_experts, triton_experts = _load(ckpt, {layer: experts}, "torch"), _load(ckpt, {layer: experts}, "triton")
    x = torch.randn(17, args.hidden_size)
    ids = torch.full((17, args.num_experts_per_tok), 2)  # every pair on expert 2; the others idle
    w = torch.rand(17, args.num_experts_per_tok)
    torch.testing.assert_close(triton_experts.forward(layer, x, ids, w), torch_experts.forward(layer, x, ids, w),
                               atol=2e-4, rtol=2e-4)


def test_triton_experts_with_384_experts_top8(tmp_path):
    path = make_tiny(tmp_path / "t384", preset="tiny-384e", seed=1, quant="int4")
    ckpt = Checkpoint(path)
    args = ckpt.args
    layer = next(i for i in range(args.num_hidden_layers) if args.is_moe_layer(i))
    hosted = list(range(0, 384, 2))  # one of two shards
    torch_experts, triton_experts = _load(ckpt, {layer: hosted}, "torch"), _load(ckpt, {layer: hosted}, "triton")
    x, ids, w = _inputs(args, 33, hosted)
    torch.testing.assert_close(triton_experts.forward(layer, x, ids, w), torch_experts.forward(layer, x, ids, w),
                               atol=2e-4, rtol=2e-4)


def test_eplb_replicas_added_later_join_the_stack(tiny_int4_ckpt):
    ckpt = Checkpoint(tiny_int4_ckpt)
    args = ckpt.args
    layer = next(i for i in range(args.num_hidden_layers) if args.is_moe_layer(i))
    torch_experts, triton_experts = _load(ckpt, {layer: [0, 1]}, "torch"), _load(ckpt, {layer: [0, 1]}, "triton")
    for e in (torch_experts, triton_experts):
        e.add_experts(ckpt, {layer: [6]})
    assert triton_experts.layer(layer)._int4[0].shape[0] == 3
    x, ids, w = _inputs(args, 9, [6])
    torch.testing.assert_close(triton_experts.forward(layer, x, ids, w), torch_experts.forward(layer, x, ids, w),
                               atol=2e-4, rtol=2e-4)
