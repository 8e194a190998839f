"""Paged MLA attention: the absorbed (latent) form of prefill chunks against the naive form, and the rule
that picks between them, on a random cache with block tables that are not contiguous."""

import pytest
import torch

from raymoe.attention.backend import PagedMLAAttention, build_metadata
from raymoe.model.args import get_preset
from raymoe.model.mla import MLA

TINY = get_preset("tiny")


def _mla(dtype: torch.dtype) -> MLA:
    mla = MLA(TINY, layer_id=0, dtype=dtype)
    with torch.no_grad():
        for p in mla.parameters():
            p.copy_(torch.randn_like(p, dtype=torch.float32) * (p.shape[-1] ** -0.5 if p.dim() > 1 else 1.0))
    return mla


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_absorbed_prefill_equals_naive_prefill(dtype, tol):
    """Chunks of 1, 5 and 16 new tokens after 0, 40 and 203 cached ones (plus a decode token), through
    block tables taken out of order from the pool."""
    block_size, num_blocks = 16, 64
    C, R = TINY.kv_lora_rank, TINY.qk_rope_head_dim
    kv_cache = torch.randn(1, num_blocks, block_size, C + R).to(dtype)
    query_lens, context_lens = [5, 1, 16, 1], [0, 40, 203, 77]
    order = torch.randperm(num_blocks).tolist()
    tables, used = [], 0
    for q, c in zip(query_lens, context_lens):
        n = -(-(q + c) // block_size)
        tables.append(order[used:used + n])
        used += n
    T = sum(query_lens)
    mla = _mla(dtype)
    q_nope = torch.randn(T, TINY.num_attention_heads, TINY.qk_nope_head_dim).to(dtype)
    q_pe = torch.randn(T, TINY.num_attention_heads, R).to(dtype)
    c_kv, k_pe = torch.randn(T, C).to(dtype), torch.randn(T, R).to(dtype)

    outs = {}
    for absorbed in (False, True):
        attn = PagedMLAAttention(kv_cache.clone(), C)
        attn.absorb_prefill = lambda _mla, _q, absorbed=absorbed: absorbed
        attn.metadata = build_metadata(query_lens, context_lens, tables, block_size)
        outs[absorbed] = attn(mla, q_nope, q_pe, c_kv, k_pe)
    assert outs[True].dtype == dtype and outs[True].shape == (T, TINY.num_attention_heads, TINY.v_head_dim)
    assert torch.isfinite(outs[True]).all()
    torch.testing.assert_close(outs[True].float(), outs[False].float(), atol=tol, rtol=tol)


def test_short_chunks_over_long_contexts_take_the_absorbed_form():
    attn = PagedMLAAttention(torch.zeros(1, 2, 16, TINY.kv_cache_size), TINY.kv_lora_rank)
    mla = MLA(TINY, layer_id=0)
    # tiny (C 32, R 8, Dn = Dv = 16): absorbed while 40·Q < 32·32
    assert attn.absorb_prefill(mla, 1) and attn.absorb_prefill(mla, 25)
    assert not attn.absorb_prefill(mla, 26)
    k2 = get_preset("kimi-k2-thinking")
    with torch.device("meta"):
        k2_mla = MLA(k2, layer_id=0)
    k2_attn = PagedMLAAttention(torch.zeros(1, 2, 16, k2.kv_cache_size, device="meta"), k2.kv_lora_rank)
    # K2 (C 512, R 64, Dn = Dv = 128): absorbed while 832·Q < 512·256, i.e. up to 157 new tokens
    assert k2_attn.absorb_prefill(k2_mla, 157) and not k2_attn.absorb_prefill(k2_mla, 158)


def test_decode_only_metadata_equals_the_general_construction():
    """A decode-only step takes `decode_metadata`; it must build the tensors the general path builds,
    including sequences whose new token opens a block and tables longer than the step needs."""
    from raymoe.attention import backend

    gen = torch.Generator().manual_seed(0)
    block_size = 4
    for _ in range(20):
        num = int(torch.randint(1, 9, (1,), generator=gen))
        ctx = torch.randint(0, 30, (num,), generator=gen).tolist()
        tables = [torch.randperm(60, generator=gen)[: c // block_size + 1 + int(torch.randint(0, 3, (1,), generator=gen))]
                  .add(1).tolist() for c in ctx]
        fast = build_metadata([1] * num, ctx, tables, block_size)
        general = backend._mixed_metadata([1] * num, ctx, tables, block_size, "cpu")
        assert fast.all_decode and general.all_decode and fast.prefill is None and general.prefill is None
        assert fast.num_tokens == general.num_tokens == num
        for name in ("slot_mapping", "decode_token_idx", "decode_block_tables", "decode_seq_lens"):
            a, b = getattr(fast, name), getattr(general, name)
            assert a.dtype == b.dtype and torch.equal(a, b), name
        bias = backend.decode_bias(fast, block_size)  # built on first use, then kept
        assert backend.decode_bias(fast, block_size) is bias and bias.shape == (num, 1, fast.decode_block_tables.shape[1] * block_size)
        for i, c in enumerate(ctx):  # 0 up to and including the new token's position, -inf past it
            assert torch.equal(bias[i, 0, : c + 1], torch.zeros(c + 1))
            assert torch.isneginf(bias[i, 0, c + 1:]).all()
