"""Fused MoE grouped GEMM, W4A16: INT4 compressed-tensors expert weights dequantised inside the kernel.

[Gate] -> [moe_permute] -> **[fused_moe_w4a16]** -> [moe_unpermute]

Weight layout (K2_FACTS §1.5, compressed-tensors pack-quantized, symmetric, group 32):
  w13_packed[e] [2I, D/8] int32: rows 0..I-1 gate, I..2I-1 up; input column 8j+k sits in int32 j at bits
  [4k, 4k+4), LSB first, as the unsigned nibble q+8;  w13_scale[e] [2I, D/32];  w2_packed[e] [D, I/8];  w2_scale[e] [D, I/32].
  W[n, c] = (nibble - 8) * scale[n, c // 32].

Two launches of one kernel: gate/up with SwiGLU in the epilogue (h = silu(x Wg^T) * (x Wu^T), [M, I]), then down
(out = h W2^T, [M, D]). Rows arrive grouped by expert (`expert_offsets`); each program finds its (expert, row tile)
from the offsets itself, so the grid is a host-side upper bound and the launch needs no host sync (CUDA-graph safe).
Decode is weight-bandwidth bound: per active expert we read 3*I*D/2 bytes of nibbles + 3*I*D/16 of bf16 scales.

Shapes: M routed rows (T*K), D hidden, I moe inter dim, E experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raymoe_kernels._triton import dot_acc, is_available, jit, next_pow2, require_triton, tl, triton

__all__ = ["dequant_int4", "fused_moe_w4a16", "fused_moe_w4a16_ref", "is_available", "pack_int4"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@jit
def _dequant_tile(packed, scale, shifts, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """[BK/8, BN] int32 words + [BK/8, BN] scales -> fp32 [BK, BN] = (nibble - 8) * scale."""
    # Arithmetic >> then & 0xF is right for the sign-carrying top nibble too (K2_FACTS §1.5 sign note).
    q = (packed[:, None, :] >> shifts[None, :, None]) & 0xF  # [BK/8, 8, BN]
    return tl.reshape((q - 8).to(tl.float32) * scale[:, None, :], [BLOCK_K, BLOCK_N])


@jit
def _fused_moe_w4a16_kernel(
    a_ptr,
    expert_offsets_ptr,
    w_ptr,
    s_ptr,
    c_ptr,
    N,
    K,
    num_experts,
    stride_am,
    stride_we,
    stride_wn,
    stride_se,
    stride_sn,
    stride_cm,
    GROUP_SIZE: tl.constexpr,
    FUSE_SWIGLU: tl.constexpr,
    DOT_IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    E_PAD: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)

    # Which expert owns row tile pid_m: experts contribute cdiv(count_e, BLOCK_M) tiles each, in expert order.
    experts = tl.arange(0, E_PAD)
    emask = experts < num_experts
    lo = tl.load(expert_offsets_ptr + experts, mask=emask, other=0).to(tl.int32)
    hi = tl.load(expert_offsets_ptr + experts + 1, mask=emask, other=0).to(tl.int32)
    num_tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M
    tiles_end = tl.cumsum(num_tiles, 0)  # inclusive
    expert = tl.sum((tiles_end <= pid_m).to(tl.int32), 0)
    if expert >= num_experts:  # the grid is an upper bound on the number of tiles
        return
    tile_in_expert = pid_m - tl.sum(tl.where(experts < expert, num_tiles, 0), 0)
    row_start = tl.load(expert_offsets_ptr + expert).to(tl.int32)
    row_end = tl.load(expert_offsets_ptr + expert + 1).to(tl.int32)
    offs_m = row_start + tile_in_expert * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_p = tl.arange(0, BLOCK_K // 8)  # packed int32 columns of a K tile
    shifts = tl.arange(0, 8) * 4  # nibble i of an int32 is input column 8j + i (LSB first)
    mmask = offs_m < row_end
    nmask = offs_n < N

    a_ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + tl.arange(0, BLOCK_K)[None, :]  # [BM, BK]
    w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + offs_n[None, :] * stride_wn  # [1, BN]
    s_ptrs = s_ptr + expert.to(tl.int64) * stride_se + offs_n[None, :] * stride_sn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kmask = (k0 + tl.arange(0, BLOCK_K)) < K
        a = tl.load(a_ptrs + k0, mask=mmask[:, None] & kmask[None, :], other=0.0)  # read BM*BK activations
        # W^T tile as [BK/8, BN] int32 + one scale per int32 (group_size % 8 == 0): each word is loaded once,
        # unpacked to [BK/8, 8, BN] and reshaped to [BK, BN], whose row 8j + i is nibble i of packed row j.
        packed_cols = k0 // 8 + offs_p
        pmask = (packed_cols < K // 8)[:, None] & nmask[None, :]
        scale_cols = (packed_cols * 8 // GROUP_SIZE)[:, None]
        packed = tl.load(w_ptrs + packed_cols[:, None], mask=pmask, other=0)  # read BN*BK/2 bytes
        scale = tl.load(s_ptrs + scale_cols, mask=pmask, other=0.0).to(tl.float32)
        acc = dot_acc(a, _dequant_tile(packed, scale, shifts, BLOCK_K, BLOCK_N).to(a.dtype), acc, DOT_IEEE)
        if FUSE_SWIGLU:  # up rows sit N rows below the gate rows
            packed = tl.load(w_ptrs + N * stride_wn + packed_cols[:, None], mask=pmask, other=0)
            scale = tl.load(s_ptrs + N * stride_sn + scale_cols, mask=pmask, other=0.0).to(tl.float32)
            w = _dequant_tile(packed, scale, shifts, BLOCK_K, BLOCK_N)
            acc_up = dot_acc(a, w.to(a.dtype), acc_up, DOT_IEEE)
    if FUSE_SWIGLU:
        acc = acc * tl.sigmoid(acc) * acc_up
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])  # write BM*BN


def _launch(a, expert_offsets, w, s, c, n, k, group_size, fuse_swiglu):
    num_rows = a.shape[0]
    num_experts = w.shape[0]
    # Decode rows per expert are ~T*K/E (1-8 on K2), so BLOCK_M stays at tl.dot's minimum of 16 there.
    rows_per_expert = num_rows / max(1, min(num_experts, num_rows))
    block_m = 16 if rows_per_expert <= 16 else 32 if rows_per_expert <= 32 else 64
    block_n = min(64, max(16, next_pow2(n)))
    block_k = max(32, min(128, next_pow2(k)))  # tl.dot needs K >= 16; masks cover k < BLOCK_K
    # sum_e cdiv(count_e, BM) <= (M + nonempty*(BM-1)) // BM with nonempty <= min(E, M): no host sync needed.
    max_tiles = (num_rows + min(num_experts, num_rows) * (block_m - 1)) // block_m
    grid = (max_tiles, triton.cdiv(n, block_n))
    _fused_moe_w4a16_kernel[grid](
        a,
        expert_offsets,
        w,
        s,
        c,
        n,
        k,
        num_experts,
        a.stride(0),
        w.stride(0),
        w.stride(1),
        s.stride(0),
        s.stride(1),
        c.stride(0),
        GROUP_SIZE=group_size,
        FUSE_SWIGLU=fuse_swiglu,
        DOT_IEEE=a.dtype == torch.float32,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        E_PAD=next_pow2(num_experts),
        num_warps=4,
        num_stages=3,
    )


def _check_shapes(x_sorted, expert_offsets, w13_packed, w13_scale, w2_packed, w2_scale, group_size):
    assert x_sorted.dim() == 2 and x_sorted.dtype in _FLOAT_DTYPES, "x_sorted must be [M, D] fp16/bf16/fp32"
    hidden_size = x_sorted.shape[1]
    num_experts, two_inter, _ = w13_packed.shape
    inter_size = two_inter // 2
    assert group_size % 8 == 0, f"group_size ({group_size}) must be a multiple of the 8 nibbles per int32"
    assert hidden_size % group_size == 0, (
        f"hidden size D ({hidden_size}) must be a multiple of group_size ({group_size})"
    )
    assert inter_size % group_size == 0 and two_inter == 2 * inter_size, (
        f"moe inter dim I ({two_inter} / 2) must be a multiple of group_size ({group_size})"
    )
    expected = {
        "w13_packed": (w13_packed, (num_experts, 2 * inter_size, hidden_size // 8)),
        "w13_scale": (w13_scale, (num_experts, 2 * inter_size, hidden_size // group_size)),
        "w2_packed": (w2_packed, (num_experts, hidden_size, inter_size // 8)),
        "w2_scale": (w2_scale, (num_experts, hidden_size, inter_size // group_size)),
        "expert_offsets": (expert_offsets, (num_experts + 1,)),
    }
    for name, (t, shape) in expected.items():
        assert tuple(t.shape) == shape, (
            f"{name} must be {shape} for E={num_experts}, D={hidden_size}, I={inter_size}; got {tuple(t.shape)}"
        )
        assert t.stride(-1) == 1, f"{name} must be contiguous in its last dim"
    assert w13_packed.dtype == w2_packed.dtype == torch.int32, "packed weights must be int32"
    assert w13_scale.dtype in _FLOAT_DTYPES and w2_scale.dtype in _FLOAT_DTYPES, "scales must be float"
    assert x_sorted.stride(1) == 1, "x_sorted must be contiguous in D"
    return hidden_size, inter_size


def fused_moe_w4a16(
    x_sorted: torch.Tensor,
    expert_offsets: torch.Tensor,
    w13_packed: torch.Tensor,
    w13_scale: torch.Tensor,
    w2_packed: torch.Tensor,
    w2_scale: torch.Tensor,
    group_size: int = 32,
) -> torch.Tensor:
    """Per routed row of expert e: down_e(silu(gate_e(x)) * up_e(x)), INT4 weights dequantised in-kernel.

    Args:
        x_sorted: [M, D] rows grouped by expert (e.g. `x[sorted_token_ids // K]` from `moe_permute`).
        expert_offsets: [E+1] int, rows expert_offsets[e]:expert_offsets[e+1] belong to expert e.
        w13_packed: [E, 2I, D/8] int32 gate rows then up rows.  w13_scale: [E, 2I, D/group_size].
        w2_packed: [E, D, I/8] int32.  w2_scale: [E, D, I/group_size].
        group_size: input columns per scale; D and I must be multiples of it.

    Returns:
        [M, D] in x_sorted.dtype; rows outside [expert_offsets[0], expert_offsets[E]) are zero.
    """
    hidden_size, inter_size = _check_shapes(
        x_sorted, expert_offsets, w13_packed, w13_scale, w2_packed, w2_scale, group_size
    )
    require_triton("fused_moe_w4a16", x_sorted, expert_offsets, w13_packed, w13_scale, w2_packed, w2_scale)
    num_rows = x_sorted.shape[0]
    out = torch.zeros(num_rows, hidden_size, dtype=x_sorted.dtype, device=x_sorted.device)
    if num_rows == 0:
        return out
    h = torch.empty(num_rows, inter_size, dtype=x_sorted.dtype, device=x_sorted.device)  # [M, I]
    _launch(x_sorted, expert_offsets, w13_packed, w13_scale, h, inter_size, hidden_size, group_size, True)
    _launch(h, expert_offsets, w2_packed, w2_scale, out, hidden_size, inter_size, group_size, False)
    return out


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int values in [-8, 7], [..., N, K] with K % 8 == 0, into compressed-tensors int32 [..., N, K/8]."""
    assert q.shape[-1] % 8 == 0, f"last dim ({q.shape[-1]}) must be a multiple of 8"
    shifts = torch.arange(0, 32, 4, device=q.device, dtype=torch.int64)
    nibbles = (q.to(torch.int64) + 8).view(*q.shape[:-1], q.shape[-1] // 8, 8)
    packed = (nibbles << shifts).sum(-1)  # [0, 2^32): reinterpret the top bit as the int32 sign
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def dequant_int4(packed: torch.Tensor, scale: torch.Tensor, group_size: int = 32) -> torch.Tensor:
    """Dequantise compressed-tensors INT4 [..., N, K/8] int32 with scales [..., N, K/group_size] to fp32 [..., N, K]."""
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int32)
    q = ((packed[..., None] >> shifts) & 0xF).flatten(-2) - 8
    return q.float() * scale.float().repeat_interleave(group_size, dim=-1)


def fused_moe_w4a16_ref(
    x_sorted: torch.Tensor,
    expert_offsets: torch.Tensor,
    w13_packed: torch.Tensor,
    w13_scale: torch.Tensor,
    w2_packed: torch.Tensor,
    w2_scale: torch.Tensor,
    group_size: int = 32,
) -> torch.Tensor:
    """Torch reference for `fused_moe_w4a16`: dequantise, then one fp32 matmul pair per non-empty expert."""
    out = torch.zeros(x_sorted.shape, dtype=torch.float32, device=x_sorted.device)
    offsets = expert_offsets.tolist()
    for e in range(w13_packed.shape[0]):
        lo, hi = offsets[e], offsets[e + 1]
        if lo == hi:
            continue
        w13 = dequant_int4(w13_packed[e], w13_scale[e], group_size)  # [2I, D]
        w2 = dequant_int4(w2_packed[e], w2_scale[e], group_size)  # [D, I]
        gate, up = (x_sorted[lo:hi].float() @ w13.T).chunk(2, dim=-1)
        out[lo:hi] = (F.silu(gate) * up) @ w2.T
    return out.to(x_sorted.dtype)
