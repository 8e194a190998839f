"""Absorbed-MLA decode attention over the paged latent KV cache (K2_FACTS §2.2, DeepSeek-V3 `attn_impl="absorb"`).

[q_a/q_b proj, W_UK absorbed into q_lat] -> **[mla_decode]** -> [W_UV, o_proj]

Every head attends to the same per-token latent (MQA-like): kv_cache[block, slot] = c_kv [C] (normalised) | k_pe [R]
(post-RoPE). scores = (q_lat . c_kv + q_pe . k_pe) * scale, softmax in fp32, out = softmax . c_kv, so values are the
keys' first C channels and one KV tile serves BLOCK_H heads at once (a [BLOCK_H, C] x [C, BLOCK_N] tensor-core dot).

Split-KV (flash-decoding): each (sequence, head block, split) program runs an online softmax over a contiguous
token range and writes a normalised partial output + log-sum-exp; a second kernel merges the splits. Splits keep
the GPU busy at batch 1 with 32k tokens. Useful traffic is sum(seq_lens) * (C+R) * 2 bytes (bf16); each head block
re-reads it (2x at H=64), and the blocks of one split run side by side, so the re-read should mostly hit L2 (not yet
measured: raymoe_kernels/bench/bench_mla_decode.py).

Shapes: B batch, H heads, C kv_lora_rank (512), R rope dim (64), S splits, N kv tokens.
"""

from __future__ import annotations

import functools
import math

import torch

from raymoe_kernels._triton import dot_acc, is_available, jit, next_pow2, require_triton, tl, triton

__all__ = ["is_available", "mla_decode", "mla_decode_ref"]

_LOG2E = 1.4426950408889634


@jit
def _mla_decode_kernel(
    q_lat_ptr,
    q_pe_ptr,
    kv_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    o_part_ptr,
    lse_part_ptr,
    num_heads,
    lat_size,
    rope_size,
    block_size,
    num_splits,
    scale_log2,
    stride_qlb,
    stride_qlh,
    stride_qpb,
    stride_qph,
    stride_kvb,
    stride_kvt,
    stride_btb,
    DOT_IEEE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    C_PAD: tl.constexpr,
    R_PAD: tl.constexpr,
):
    b = tl.program_id(0)
    pid_h = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    # Split boundaries are BLOCK_N-aligned so only a split's last tile is partial.
    chunk = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, seq_len)

    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_c = tl.arange(0, C_PAD)
    offs_r = tl.arange(0, R_PAD)
    hmask = offs_h < num_heads
    cmask = offs_c < lat_size  # C need not be a power of two: pad with masks
    rmask = offs_r < rope_size
    q_lat = tl.load(
        q_lat_ptr + b * stride_qlb + offs_h[:, None] * stride_qlh + offs_c[None, :],
        mask=hmask[:, None] & cmask[None, :],
        other=0.0,
    )  # [BH, C]
    q_pe = tl.load(
        q_pe_ptr + b * stride_qpb + offs_h[:, None] * stride_qph + offs_r[None, :],
        mask=hmask[:, None] & rmask[None, :],
        other=0.0,
    )  # [BH, R]

    m = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    denom = tl.zeros([BLOCK_H], dtype=tl.float32)  # running softmax denominator
    acc = tl.zeros([BLOCK_H, C_PAD], dtype=tl.float32)
    for t0 in range(start, end, BLOCK_N):
        offs_t = t0 + tl.arange(0, BLOCK_N)
        tmask = offs_t < end
        page = tl.load(block_tables_ptr + b * stride_btb + offs_t // block_size, mask=tmask, other=0)
        rows = page.to(tl.int64) * stride_kvb + (offs_t % block_size) * stride_kvt  # [BN] (int64: caches > 2^31 elems)
        c_kv = tl.load(
            kv_ptr + rows[:, None] + offs_c[None, :], mask=tmask[:, None] & cmask[None, :], other=0.0
        )  # [BN, C]; read BN*C
        k_pe = tl.load(
            kv_ptr + rows[:, None] + lat_size + offs_r[None, :], mask=tmask[:, None] & rmask[None, :], other=0.0
        )  # [BN, R]; read BN*R
        s = dot_acc(q_lat, tl.trans(c_kv), tl.zeros([BLOCK_H, BLOCK_N], dtype=tl.float32), DOT_IEEE)
        s = dot_acc(q_pe, tl.trans(k_pe), s, DOT_IEEE) * scale_log2  # [BH, BN], log2 domain
        s = tl.where(tmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))  # finite: every tile has >= 1 valid token
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        denom = denom * alpha + tl.sum(p, 1)
        acc = dot_acc(p.to(c_kv.dtype), c_kv, acc * alpha[:, None], DOT_IEEE)
        m = m_new

    # Empty split (short sequence): denom == 0, lse = -inf, which the merge weighs as zero.
    denom_safe = tl.where(denom > 0, denom, 1.0)
    part = (b * num_heads + offs_h) * num_splits + split  # [BH] index into [B, H, S]
    tl.store(lse_part_ptr + part, tl.where(denom > 0, m + tl.log2(denom_safe), float("-inf")), mask=hmask)
    tl.store(
        o_part_ptr + part[:, None] * lat_size + offs_c[None, :],
        acc / denom_safe[:, None],
        mask=hmask[:, None] & cmask[None, :],
    )  # write BH*C fp32


@jit
def _mla_decode_merge_kernel(
    o_part_ptr,
    lse_part_ptr,
    out_ptr,
    num_heads,
    lat_size,
    num_splits,
    stride_ob,
    stride_oh,
    C_PAD: tl.constexpr,
    S_PAD: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    base = (b * num_heads + h) * num_splits
    offs_s = tl.arange(0, S_PAD)
    offs_c = tl.arange(0, C_PAD)
    cmask = offs_c < lat_size
    lse = tl.load(lse_part_ptr + base + offs_s, mask=offs_s < num_splits, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # seq_len 0: all splits empty, output 0
    denom = tl.sum(tl.exp2(lse - lse_max), 0)
    acc = tl.zeros([C_PAD], dtype=tl.float32)
    for split in range(num_splits):
        w = tl.exp2(tl.load(lse_part_ptr + base + split) - lse_max)
        acc += w * tl.load(o_part_ptr + (base + split) * lat_size + offs_c, mask=cmask, other=0.0)
    out = acc / tl.where(denom > 0, denom, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_c, out.to(out_ptr.dtype.element_ty), mask=cmask)


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _default_num_splits(batch: int, num_head_blocks: int, max_seq_len: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    # Aim for two waves of programs; below ~256 tokens a split's fixed cost outweighs the parallelism.
    num_sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    wanted = triton.cdiv(2 * num_sms, max(1, batch * num_head_blocks))
    return max(1, min(wanted, triton.cdiv(max_seq_len, 256), 64))


def mla_decode(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    softmax_scale: float,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Absorbed-MLA decode attention for one query token per sequence over a paged latent cache.

    Args:
        q_lat: [B, H, C] queries with W_UK absorbed.  q_pe: [B, H, R] roped query part.
        kv_cache: [num_blocks, block_size, C+R] latent c_kv | roped k_pe, same dtype as the queries.
        block_tables: [B, max_blocks] int, page ids of each sequence in order (covering seq_lens: not checked,
            that would need a host sync).
        seq_lens: [B] int, tokens per sequence (0 gives a zero output row).
        softmax_scale: multiplies the scores before the softmax.
        num_splits: KV splits per sequence; None picks one from the device's SM count.

    Returns:
        [B, H, C] in q_lat.dtype.
    """
    assert q_lat.dim() == 3 and q_pe.dim() == 3 and kv_cache.dim() == 3, (
        "expected q_lat/q_pe [B, H, *], kv [N, bs, C+R]"
    )
    batch, num_heads, lat_size = q_lat.shape
    rope_size = q_pe.shape[2]
    _, block_size, kv_size = kv_cache.shape
    assert q_pe.shape[:2] == (batch, num_heads), f"q_pe {tuple(q_pe.shape)} does not match q_lat {tuple(q_lat.shape)}"
    assert kv_size == lat_size + rope_size, f"kv_cache last dim ({kv_size}) must be C + R ({lat_size} + {rope_size})"
    assert q_lat.dtype == q_pe.dtype == kv_cache.dtype, "q_lat, q_pe and kv_cache must share a dtype"
    assert block_tables.dim() == 2 and block_tables.shape[0] == batch, f"block_tables must be [B={batch}, max_blocks]"
    assert seq_lens.shape == (batch,), f"seq_lens must be [B={batch}], got {tuple(seq_lens.shape)}"
    assert not block_tables.dtype.is_floating_point and not seq_lens.dtype.is_floating_point, "int tables expected"
    for name, t in (("q_lat", q_lat), ("q_pe", q_pe), ("kv_cache", kv_cache), ("block_tables", block_tables)):
        assert t.stride(-1) == 1, f"{name} must be contiguous in its last dim"
    require_triton("mla_decode", q_lat, q_pe, kv_cache, block_tables, seq_lens)
    out = torch.empty(batch, num_heads, lat_size, dtype=q_lat.dtype, device=q_lat.device)
    if batch == 0 or num_heads == 0:
        return out

    block_h = 16 if num_heads <= 16 else 32  # tl.dot needs >= 16 rows; 32 x 512 fp32 acc = 64 regs/thread at 8 warps
    c_pad, r_pad = max(16, next_pow2(lat_size)), max(16, next_pow2(rope_size))
    num_head_blocks = triton.cdiv(num_heads, block_h)
    if num_splits is None:
        num_splits = _default_num_splits(batch, num_head_blocks, block_tables.shape[1] * block_size, q_lat.device)
    assert num_splits >= 1, f"num_splits must be >= 1, got {num_splits}"
    o_part = torch.empty(batch, num_heads, num_splits, lat_size, dtype=torch.float32, device=q_lat.device)
    lse_part = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q_lat.device)
    big = block_h * c_pad > 8192
    _mla_decode_kernel[(batch, num_head_blocks, num_splits)](
        q_lat,
        q_pe,
        kv_cache,
        block_tables,
        seq_lens,
        o_part,
        lse_part,
        num_heads,
        lat_size,
        rope_size,
        block_size,
        num_splits,
        softmax_scale * _LOG2E,
        q_lat.stride(0),
        q_lat.stride(1),
        q_pe.stride(0),
        q_pe.stride(1),
        kv_cache.stride(0),
        kv_cache.stride(1),
        block_tables.stride(0),
        DOT_IEEE=q_lat.dtype == torch.float32,
        BLOCK_H=block_h,
        BLOCK_N=32 if big else 64,
        C_PAD=c_pad,
        R_PAD=r_pad,
        num_warps=8 if big else 4,
        num_stages=2,
    )
    _mla_decode_merge_kernel[(batch, num_heads)](
        o_part,
        lse_part,
        out,
        num_heads,
        lat_size,
        num_splits,
        out.stride(0),
        out.stride(1),
        C_PAD=c_pad,
        S_PAD=next_pow2(num_splits),
        num_warps=4,
    )
    return out


def mla_decode_ref(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    softmax_scale: float,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Torch reference for `mla_decode`: gather each sequence's pages, plain fp32 softmax attention.

    `num_splits` is accepted for signature parity and ignored.
    """
    batch, num_heads, lat_size = q_lat.shape
    block_size = kv_cache.shape[1]
    out = torch.zeros(batch, num_heads, lat_size, dtype=torch.float32, device=q_lat.device)
    for b, seq_len in enumerate(seq_lens.tolist()):
        if seq_len == 0:
            continue
        pages = block_tables[b, : math.ceil(seq_len / block_size)].long()
        kv = kv_cache[pages].reshape(-1, kv_cache.shape[-1])[:seq_len].float()  # [N, C+R]
        c_kv, k_pe = kv[:, :lat_size], kv[:, lat_size:]
        scores = torch.einsum("hc,nc->hn", q_lat[b].float(), c_kv) + torch.einsum("hr,nr->hn", q_pe[b].float(), k_pe)
        out[b] = torch.softmax(scores * softmax_scale, dim=-1) @ c_kv  # [H, C]
    return out.to(q_lat.dtype)
