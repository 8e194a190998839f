"""`Transformer.fuse()`: the load-time weight stacking and CPU GEMM layout the engine runs with.

A fused model must compute what the unfused one does (same parameters, same names, same values),
stay in step with later `load_state_dict` copies (the parameters are views of the stacks), and fall
back to the unfused path when its parameters are replaced (e.g. by a dtype cast).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raymoe.engine.sampler import greedy
from raymoe.model.args import get_preset
from raymoe.model.deepseek import Transformer
from raymoe.model.layers import MLP, RMSNorm, gemm_layout
from raymoe.model.mla import MLA, DenseCausalAttention

TINY = get_preset("tiny")


def _model(seed: int = 0) -> Transformer:
    model = Transformer(TINY)
    model.init_weights(seed)
    with torch.no_grad():  # norms away from 1 and a non-zero router bias: every weight matters
        for module in model.modules():
            if isinstance(module, RMSNorm):
                module.weight.copy_(1 + 0.1 * torch.randn_like(module.weight))
    return model.eval()


def _forward(model: Transformer, tokens: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
    positions = torch.cat([torch.arange(n) for n in seq_lens])
    with torch.inference_mode():
        return model.compute_logits(model(tokens, positions, attn=DenseCausalAttention(seq_lens)))


@pytest.mark.parametrize("mode", ["naive", "absorb"])
def test_fused_model_computes_what_the_unfused_one_does(mode):
    model = _model()
    seq_lens = [5, 1, 12]
    tokens = torch.randint(0, TINY.vocab_size, (sum(seq_lens),))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    positions = torch.cat([torch.arange(n) for n in seq_lens])
    with torch.inference_mode():
        want = model.compute_logits(model(tokens, positions, attn=DenseCausalAttention(seq_lens, mode)))
    model.fuse()
    after = model.state_dict()
    assert list(after) == list(before)  # checkpoint names unchanged
    assert all(torch.equal(after[k], before[k]) for k in before)  # values unchanged, whatever the layout
    with torch.inference_mode():
        got = model.compute_logits(model(tokens, positions, attn=DenseCausalAttention(seq_lens, mode)))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    assert torch.equal(greedy(got), greedy(want))


def test_fused_parameters_are_views_of_the_stacks_and_follow_load_state_dict():
    model = _model(0)
    model.fuse()
    mla: MLA = model.model.layers[1].self_attn
    assert mla.q_a_proj.weight.data_ptr() == mla._w_a.data_ptr()  # q_a rows first, then kv_a rows
    assert mla.kv_a_proj_with_mqa.weight.data_ptr() == mla._w_a[TINY.q_lora_rank:].data_ptr()
    dense: MLP = model.model.layers[0].mlp
    shared: MLP = model.model.layers[1].mlp.shared_experts
    for mlp in (dense, shared):
        assert mlp.gate_proj.weight.data_ptr() == mlp._w13.data_ptr()
        assert mlp.up_proj.weight.data_ptr() == mlp._w13[mlp.gate_proj.out_features:].data_ptr()
    # CPU GEMM layout: the same [N, K] matrices stored column-major
    for linear in (model.lm_head, mla.q_b_proj, mla.o_proj, dense.down_proj):
        assert linear.weight.stride() == (1, linear.weight.shape[0])
    assert model.model.layers[1].mlp.experts._dense  # tiny: 8 experts, top-2

    other = _model(1)
    model.load_state_dict(other.state_dict())  # copies into the views: the stacks follow
    seq_lens = [7, 3]
    tokens = torch.randint(0, TINY.vocab_size, (10,))
    torch.testing.assert_close(_forward(model, tokens, seq_lens), _forward(other, tokens, seq_lens),
                               atol=2e-5, rtol=1e-5)


def test_replaced_parameters_fall_back_to_the_unfused_path():
    model = _model()
    reference = _model()
    reference.load_state_dict(model.state_dict())
    reference.double()
    model.fuse()
    model.double()  # new parameter tensors: the stacks are stale and must not be used
    seq_lens = [9]
    tokens = torch.randint(0, TINY.vocab_size, (9,))
    with torch.inference_mode():
        assert model(tokens, torch.arange(9)).dtype == torch.float64  # (fp32 stacks would not even run)
    torch.testing.assert_close(_forward(model, tokens, seq_lens), _forward(reference, tokens, seq_lens))


def test_mla_without_q_lora_fuses_only_the_layout():
    args = TINY.replace(q_lora_rank=None)
    mla = MLA(args, 0)
    for p in mla.parameters():
        nn.init.normal_(p, 0.0, p.shape[-1] ** -0.5) if p.dim() > 1 else nn.init.ones_(p)
    x, pos = torch.randn(6, args.hidden_size), torch.arange(6)
    with torch.inference_mode():
        want = mla(x, pos)
        assert mla.fuse() is False and mla._w_a is None
        assert mla.q_proj.weight.stride(0) == 1
        torch.testing.assert_close(mla(x, pos), want, atol=1e-5, rtol=1e-5)


def test_gemm_layout_keeps_values_and_is_idempotent():
    w = torch.randn(48, 16)
    cm = gemm_layout(w)
    assert torch.equal(cm, w) and cm.stride() == (1, 48)
    assert gemm_layout(cm) is cm
    x = torch.randn(5, 16)
    torch.testing.assert_close(F.linear(x, cm), F.linear(x, w))
    assert gemm_layout(torch.randn(3)).dim() == 1  # not a matrix: unchanged


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_the_hf_formula(dtype):
    norm = RMSNorm(64, 1e-6, dtype=dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(64))
    x = (3 * torch.randn(4, 7, 64)).to(dtype)
    h = x.float()
    want = norm.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)  # HF DeepseekV3RMSNorm
    got = norm(x)
    assert got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got, want, atol=1e-6 if dtype == torch.float32 else 1e-2, rtol=1e-5)


def test_greedy_is_argmax_with_first_index_on_ties():
    logits = torch.randn(6, 50)
    logits[1, [3, 9]] = 10.0  # a tie: the lower id wins, as argmax
    logits[4] = 0.0
    assert torch.equal(greedy(logits), logits.argmax(dim=-1))
    assert greedy(logits)[1] == 3 and greedy(logits)[4] == 0
