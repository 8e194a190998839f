"""raymoe_kernels.cpu's per-token layers (built here with the machine's C compiler): RMSNorm against the torch
module, greedy argmax against torch's max, and the engine taking both on CPU. Without a C compiler these tests
are skipped with that reason."""

import os
import shutil

import pytest
import torch

from raymoe.model.args import get_preset
from raymoe.model.layers import RMSNorm, RotaryEmbedding
from raymoe_kernels.cpu import argmax_cpu, rms_norm_cpu, rope_cpu

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None, reason="no C compiler on this machine")


@pytest.mark.parametrize("dim", [64, 7168, 37, 3])
def test_rms_norm_matches_the_torch_module(dim):
    gen = torch.Generator().manual_seed(dim)
    ref = RMSNorm(dim, eps=1e-6)
    with torch.no_grad():
        ref.weight.copy_(1 + 0.1 * torch.randn(dim, generator=gen))
    fast = RMSNorm(dim, eps=1e-6)
    fast.load_state_dict(ref.state_dict())
    fast.set_kernel("cpu")
    x = 3 * torch.randn(9, dim, generator=gen)
    out = fast(x)
    assert out.dtype == torch.float32 and out.shape == x.shape and out.is_contiguous()
    torch.testing.assert_close(out, ref(x), rtol=2e-6, atol=1e-6)  # the mean's summation order: an ulp or so
    # strided rows (a slice of a wider projection) are read in place
    wide = torch.randn(5, dim + 11, generator=gen)
    torch.testing.assert_close(fast(wide[:, 4:4 + dim]), ref(wide[:, 4:4 + dim].contiguous()), rtol=2e-6, atol=1e-6)
    # other dtypes and shapes keep the torch path
    bf = x.bfloat16()
    assert torch.equal(fast(bf), ref(bf))
    torch.testing.assert_close(fast(x.view(3, 3, dim)), ref(x.view(3, 3, dim)))


def test_rms_norm_rejects_bad_input():
    with pytest.raises(ValueError, match="float32"):
        rms_norm_cpu(torch.randn(2, 8).double(), torch.ones(8), 1e-6)
    with pytest.raises(ValueError, match="weight"):
        rms_norm_cpu(torch.randn(2, 8), torch.ones(7), 1e-6)
    with pytest.raises(ValueError, match="unit stride"):
        rms_norm_cpu(torch.randn(8, 2).t(), torch.ones(8), 1e-6)


@pytest.mark.parametrize("vocab", [2048, 163840, 13, 1])
def test_argmax_is_torchs_first_maximal_index(vocab):
    gen = torch.Generator().manual_seed(vocab)
    x = torch.randn(6, vocab, generator=gen)
    if vocab > 8:
        x[1, vocab // 3] = x[1, vocab - 2] = 50.0  # a tie: the first one
        x[2] = float("-inf")  # all -inf: index 0
        x[3, 5] = x[3, vocab - 1] = float("nan")  # NaN counts as the maximum: the first NaN
        x[4, vocab - 1] = 60.0  # in the tail past the last full 8 lanes
        x[5] = 0.25  # all equal
    want = x.max(dim=-1).indices
    assert torch.equal(argmax_cpu(x), want)
    assert torch.equal(argmax_cpu(torch.cat([x, x], dim=1)[:, :vocab]), want)  # strided rows


def test_argmax_rejects_bad_input():
    with pytest.raises(ValueError, match="float32"):
        argmax_cpu(torch.randn(2, 8).bfloat16())
    with pytest.raises(ValueError, match="non-empty"):
        argmax_cpu(torch.randn(2, 0))


@pytest.mark.parametrize("preset", ["tiny", "kimi-k2-thinking"])
def test_rope_rotates_in_place_bit_for_bit_as_the_torch_rotation(preset):
    """The queries' and the key's rope parts, strided views of wider projections as MLA.project has them, at
    scattered positions."""
    args = get_preset(preset)
    rotary = RotaryEmbedding(args)
    rotary.prepare(4096, "cpu", torch.float32)
    R, H, T = args.qk_rope_head_dim, 5, 9
    gen = torch.Generator().manual_seed(R)
    q = torch.randn(T, H, 7 + R, generator=gen)
    a = torch.randn(T, 11 + R, generator=gen)
    positions = torch.tensor([0, 1, 2, 17, 100, 1023, 1024, 3000, 4095])
    want = rotary.rotate(torch.cat([q[:, :, 7:], a[:, None, 11:]], dim=1), positions)
    q_before, a_before = q.clone(), a.clone()
    assert not rotary.rotate_(q[:, :, 7:], a[:, 11:], positions)  # no kernel set: nothing done
    assert torch.equal(q, q_before) and torch.equal(a, a_before)
    rotary.set_kernel("cpu")
    assert rotary.rotate_(q[:, :, 7:], a[:, 11:], positions)
    assert torch.equal(q[:, :, 7:], want[:, :H]) and torch.equal(a[:, 11:], want[:, H])
    assert torch.equal(q[:, :, :7], q_before[:, :, :7]) and torch.equal(a[:, :11], a_before[:, :11])  # the rest kept


def test_rope_rejects_bad_input():
    args = get_preset("tiny")
    rotary = RotaryEmbedding(args)
    rotary.prepare(64, "cpu", torch.float32)
    cos2, sin2 = rotary._cache["table"][:2]
    q, k = torch.randn(2, 4, 8), torch.randn(2, 8)
    before = q.clone()
    with pytest.raises(ValueError, match="positions must be in"):
        rope_cpu(q, k, torch.tensor([3, 64]), cos2, sin2)
    assert torch.equal(q, before)  # checked before anything is written
    with pytest.raises(ValueError, match="rope_cpu wants"):
        rope_cpu(q, k, torch.tensor([3, 4], dtype=torch.int32), cos2, sin2)
    with pytest.raises(ValueError, match="k must be"):
        rope_cpu(q, k[:, :6], torch.tensor([3, 4]), cos2, sin2)


def test_the_engine_normalises_and_samples_greedily_through_the_kernels_on_cpu(tiny_ckpt):
    """`kernels.backend: auto` on CPU sets the C norm on every RMSNorm and the C argmax for greedy steps;
    `torch` does not (the greedy tokens of both are compared in test_cpu_mla_decode's engine test)."""
    from raymoe import LLM

    for backend, want in (("auto", True), ("torch", False)):
        llm = LLM(model=str(tiny_ckpt), dtype="float32", kernels_backend=backend, kv_cache_memory=8 << 20)
        runner = llm.engine.runner
        norms = [m for m in runner.model.modules() if isinstance(m, RMSNorm)]
        assert len(norms) == 4 * runner.args.num_hidden_layers + 1
        assert all((n._cpu is not None) == want for n in norms)
        assert (runner._greedy is argmax_cpu) == want
        rotary = [m for m in runner.model.modules() if isinstance(m, RotaryEmbedding)]
        assert rotary and all((r._cpu is not None) == want for r in rotary)
        llm.shutdown()
