"""mla_decode (absorbed MLA over the paged latent cache) against the gather + torch softmax reference."""

import math

import pytest
import torch

from raymoe_kernels.mla_decode import mla_decode, mla_decode_ref


def _paged_cache(seq_lens, block_size, kv_size, dtype, device):
    """A cache with shuffled, non-contiguous pages per sequence (plus unused pages), and its block table."""
    blocks_per_seq = max([math.ceil(n / block_size) for n in seq_lens] + [1])
    num_blocks = len(seq_lens) * blocks_per_seq + 3
    kv_cache = torch.randn(num_blocks, block_size, kv_size, device=device).to(dtype)
    block_tables = torch.randperm(num_blocks, device=device)[: len(seq_lens) * blocks_per_seq]
    block_tables = block_tables.view(len(seq_lens), blocks_per_seq).int()
    return kv_cache, block_tables, torch.tensor(seq_lens, dtype=torch.int32, device=device)


def _queries(batch, num_heads, lat_size, rope_size, dtype, device):
    # One projection split into views, as the model produces them: strided, not contiguous.
    q = torch.randn(batch, num_heads, lat_size + rope_size, device=device).to(dtype)
    return q[..., :lat_size], q[..., lat_size:]


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mla_decode_matches_ref_with_variable_lengths_and_padded_latent(num_splits, dtype, device, assert_close_ref):
    lat_size, rope_size, num_heads = 48, 16, 5  # C not a power of two; H not a multiple of the head block
    seq_lens = [1, 17, 40, 0, 16]  # single token, partial last page, several pages, empty, exactly one page
    kv_cache, block_tables, seq_lens = _paged_cache(seq_lens, 16, lat_size + rope_size, dtype, device)
    q_lat, q_pe = _queries(len(seq_lens), num_heads, lat_size, rope_size, dtype, device)
    out = assert_close_ref(
        mla_decode,
        mla_decode_ref,
        q_lat,
        q_pe,
        kv_cache,
        block_tables,
        seq_lens,
        (lat_size + rope_size) ** -0.5,
        num_splits=num_splits,
        dtype=dtype,
    )
    assert not out[3].any()  # seq_len 0 -> zeros, not NaN


@pytest.mark.parametrize("num_heads,num_splits", [(16, None), (40, 4)])  # one head block of 16; blocks of 32
def test_mla_decode_matches_ref_with_k2_latent_sizes(num_heads, num_splits, device, assert_close_ref):
    lat_size, rope_size = 512, 64  # K2 kv_lora_rank / qk_rope_head_dim; fewer than K2's 64 heads to stay fast
    kv_cache, block_tables, seq_lens = _paged_cache([1, 65, 130], 64, lat_size + rope_size, torch.bfloat16, device)
    q_lat, q_pe = _queries(3, num_heads, lat_size, rope_size, torch.bfloat16, device)
    assert_close_ref(
        mla_decode,
        mla_decode_ref,
        q_lat,
        q_pe,
        kv_cache,
        block_tables,
        seq_lens,
        0.144680,
        num_splits=num_splits,
        dtype=torch.bfloat16,
    )


def test_mla_decode_when_splits_outnumber_tokens(device, assert_close_ref):
    kv_cache, block_tables, seq_lens = _paged_cache([1, 3], 16, 32 + 16, torch.float32, device)
    q_lat, q_pe = _queries(2, 17, 32, 16, torch.float32, device)
    assert_close_ref(
        mla_decode,
        mla_decode_ref,
        q_lat,
        q_pe,
        kv_cache,
        block_tables,
        seq_lens,
        0.2,
        num_splits=8,
        dtype=torch.float32,
    )


def test_mla_decode_with_empty_batch(device):
    kv_cache, _, _ = _paged_cache([4], 16, 64, torch.float32, device)
    q_lat, q_pe = _queries(0, 4, 48, 16, torch.float32, device)
    empty_tables = torch.zeros(0, 1, dtype=torch.int32, device=device)
    empty_lens = torch.zeros(0, dtype=torch.int32, device=device)
    assert mla_decode(q_lat, q_pe, kv_cache, empty_tables, empty_lens, 0.1).shape == (0, 4, 48)


def test_mla_decode_rejects_cache_width_other_than_c_plus_r(device):
    kv_cache, block_tables, seq_lens = _paged_cache([4], 16, 60, torch.float32, device)
    q_lat, q_pe = _queries(1, 4, 48, 16, torch.float32, device)
    with pytest.raises(AssertionError, match="C \\+ R"):
        mla_decode(q_lat, q_pe, kv_cache, block_tables, seq_lens, 0.1)
