"""MoE token permutation: group the T*K (token, slot) pairs by expert, and the weighted combine back.

[Gate] -> **[moe_permute]** -> gather x -> [fused_moe_w4a16] -> **[moe_unpermute]** -> residual

A "pair" p = t*K + k is token t's k-th routed expert. `moe_permute` sorts pairs by expert, stable in p, so the
grouped order (and every result downstream) is deterministic run to run; the caller gathers
`x_sorted = x[sorted_token_ids // K]`. `moe_unpermute` sums each token's K expert rows, weighted, in fp32.

Three launches for the permute, none needing a host sync (CUDA-graph safe):
  hist    per block of BLOCK pairs, a histogram over experts          # read T*K ids; write num_blocks*E
  scan    one program: exclusive prefix over (expert, block)          # read/write num_blocks*E
  scatter per block, rank of each pair among earlier same-expert pairs in its block, plus its base slot

Shapes: T tokens, K top-k, E experts, D hidden.
"""

from __future__ import annotations

import torch

from raymoe_kernels._triton import is_available, jit, next_pow2, require_triton, tl, triton

__all__ = ["is_available", "moe_permute", "moe_permute_ref", "moe_unpermute", "moe_unpermute_ref"]

# 128 keeps the scatter's BLOCK x BLOCK rank matrix at 64 int32 registers a thread with 8 warps.
_PERMUTE_BLOCK = 128


@jit
def _moe_permute_hist_kernel(
    topk_ids_ptr, block_counts_ptr, num_pairs, num_experts, BLOCK: tl.constexpr, E_PAD: tl.constexpr
):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    # Out-of-range pairs go to bin `num_experts` (E_PAD > E), which is never stored: no `mask=` needed on histogram.
    ids = tl.load(topk_ids_ptr + offs, mask=offs < num_pairs, other=num_experts).to(tl.int32)
    counts = tl.histogram(ids, E_PAD)  # [E_PAD]
    experts = tl.arange(0, E_PAD)
    tl.store(block_counts_ptr + pid * num_experts + experts, counts, mask=experts < num_experts)


@jit
def _moe_permute_scan_kernel(
    block_counts_ptr,
    block_base_ptr,
    expert_counts_ptr,
    expert_offsets_ptr,
    num_blocks,
    num_experts,
    E_PAD: tl.constexpr,
):
    experts = tl.arange(0, E_PAD)
    emask = experts < num_experts
    # Pass 1: per-expert totals.
    totals = tl.zeros([E_PAD], dtype=tl.int32)
    for b in range(num_blocks):
        totals += tl.load(block_counts_ptr + b * num_experts + experts, mask=emask, other=0)
    offsets = tl.cumsum(totals, 0) - totals  # exclusive
    tl.store(expert_counts_ptr + experts, totals, mask=emask)
    tl.store(expert_offsets_ptr + experts, offsets, mask=emask)
    tl.store(expert_offsets_ptr + num_experts, tl.sum(totals, 0))
    # Pass 2: where each block's pairs of expert e start.
    running = offsets
    for b in range(num_blocks):
        counts = tl.load(block_counts_ptr + b * num_experts + experts, mask=emask, other=0)
        tl.store(block_base_ptr + b * num_experts + experts, running, mask=emask)
        running += counts


@jit
def _moe_permute_scatter_kernel(
    topk_ids_ptr, block_base_ptr, sorted_ids_ptr, inverse_ptr, num_pairs, num_experts, BLOCK: tl.constexpr
):
    pid = tl.program_id(0)
    local = tl.arange(0, BLOCK)
    offs = pid * BLOCK + local
    mask = offs < num_pairs
    ids = tl.load(topk_ids_ptr + offs, mask=mask, other=num_experts).to(tl.int32)
    # rank[i] = #{j < i in this block : ids[j] == ids[i]}: the stable position within the block's expert run.
    same = (ids[:, None] == ids[None, :]) & (local[None, :] < local[:, None])  # [BLOCK, BLOCK]
    rank = tl.sum(same.to(tl.int32), axis=1)
    base = tl.load(block_base_ptr + pid * num_experts + ids, mask=mask, other=0)
    slot = base + rank
    tl.store(sorted_ids_ptr + slot, offs, mask=mask)
    tl.store(inverse_ptr + offs, slot, mask=mask)


@jit
def _moe_unpermute_kernel(
    expert_out_ptr,
    inverse_ptr,
    weights_ptr,
    out_ptr,
    hidden_size,
    stride_eo,
    stride_o,
    TOP_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs_d < hidden_size
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for k in range(TOP_K):
        row = tl.load(inverse_ptr + t * TOP_K + k).to(tl.int64)
        w = tl.load(weights_ptr + t * TOP_K + k).to(tl.float32)
        x = tl.load(expert_out_ptr + row * stride_eo + offs_d, mask=dmask, other=0.0)  # read K*D per token
        acc += w * x.to(tl.float32)
    tl.store(out_ptr + t.to(tl.int64) * stride_o + offs_d, acc.to(out_ptr.dtype.element_ty), mask=dmask)


def moe_permute(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, ...]:
    """Group routed (token, slot) pairs by expert, stable in pair index.

    Args:
        topk_ids: [T, K] integer expert ids, each in [0, num_experts) (not checked: that would need a host sync).
        num_experts: E.

    Returns:
        sorted_token_ids: [T*K] int32, pair indices (t*K + k) grouped by expert, ascending within an expert.
        expert_counts: [E] int32, pairs per expert.
        expert_offsets: [E+1] int32, exclusive prefix sum of expert_counts.
        inverse: [T*K] int32, inverse[p] = position of pair p in sorted_token_ids.
    """
    assert topk_ids.dim() == 2, f"topk_ids must be [T, K], got {tuple(topk_ids.shape)}"
    assert not topk_ids.dtype.is_floating_point, f"topk_ids must be integer, got {topk_ids.dtype}"
    assert num_experts >= 1, f"num_experts must be >= 1, got {num_experts}"
    require_triton("moe_permute", topk_ids)
    device = topk_ids.device
    ids = topk_ids.contiguous().view(-1)
    num_pairs = ids.numel()
    sorted_ids = torch.empty(num_pairs, dtype=torch.int32, device=device)
    inverse = torch.empty(num_pairs, dtype=torch.int32, device=device)
    expert_counts = torch.empty(num_experts, dtype=torch.int32, device=device)
    expert_offsets = torch.empty(num_experts + 1, dtype=torch.int32, device=device)
    num_blocks = triton.cdiv(num_pairs, _PERMUTE_BLOCK)
    e_pad = next_pow2(num_experts + 1)  # +1: the bin for masked-out pairs
    block_counts = torch.empty(max(num_blocks, 1), num_experts, dtype=torch.int32, device=device)
    block_base = torch.empty_like(block_counts)
    if num_blocks > 0:
        _moe_permute_hist_kernel[(num_blocks,)](
            ids, block_counts, num_pairs, num_experts, BLOCK=_PERMUTE_BLOCK, E_PAD=e_pad
        )
    _moe_permute_scan_kernel[(1,)](
        block_counts, block_base, expert_counts, expert_offsets, num_blocks, num_experts, E_PAD=e_pad, num_warps=4
    )
    if num_blocks > 0:
        _moe_permute_scatter_kernel[(num_blocks,)](
            ids, block_base, sorted_ids, inverse, num_pairs, num_experts, BLOCK=_PERMUTE_BLOCK, num_warps=8
        )
    return sorted_ids, expert_counts, expert_offsets, inverse


def moe_permute_ref(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, ...]:
    """Torch reference for `moe_permute` (same outputs, same dtypes)."""
    ids = topk_ids.reshape(-1).long()
    sorted_ids = torch.argsort(ids, stable=True)
    expert_counts = torch.bincount(ids, minlength=num_experts)
    expert_offsets = torch.zeros(num_experts + 1, dtype=torch.long, device=ids.device)
    expert_offsets[1:] = torch.cumsum(expert_counts, 0)
    inverse = torch.empty_like(sorted_ids)
    inverse[sorted_ids] = torch.arange(ids.numel(), device=ids.device)
    return sorted_ids.int(), expert_counts.int(), expert_offsets.int(), inverse.int()


def moe_unpermute(expert_out: torch.Tensor, inverse: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum of each token's K expert rows back into token order.

    Args:
        expert_out: [T*K, D] expert outputs in sorted (grouped-by-expert) order.
        inverse: [T*K] from `moe_permute`.
        topk_weights: [T, K] routing weights (any float dtype; accumulated in fp32).

    Returns:
        [T, D] in expert_out.dtype: out[t] = sum_k topk_weights[t, k] * expert_out[inverse[t*K + k]].
    """
    assert topk_weights.dim() == 2 and expert_out.dim() == 2, "expected topk_weights [T, K] and expert_out [T*K, D]"
    num_tokens, top_k = topk_weights.shape
    hidden_size = expert_out.shape[1]
    assert expert_out.shape[0] == num_tokens * top_k == inverse.numel(), (
        f"expert_out rows ({expert_out.shape[0]}) and inverse ({inverse.numel()}) must equal T*K ({num_tokens}*{top_k})"
    )
    assert expert_out.stride(1) == 1, "expert_out must be contiguous in D"
    require_triton("moe_unpermute", expert_out, inverse, topk_weights)
    out = torch.empty(num_tokens, hidden_size, dtype=expert_out.dtype, device=expert_out.device)
    if num_tokens == 0 or hidden_size == 0:
        return out
    block_d = min(1024, next_pow2(hidden_size))
    grid = (num_tokens, triton.cdiv(hidden_size, block_d))
    _moe_unpermute_kernel[grid](
        expert_out,
        inverse.contiguous(),
        topk_weights.contiguous(),
        out,
        hidden_size,
        expert_out.stride(0),
        out.stride(0),
        TOP_K=top_k,
        BLOCK_D=block_d,
        num_warps=4,
    )
    return out


def moe_unpermute_ref(expert_out: torch.Tensor, inverse: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """Torch reference for `moe_unpermute`: fp32 gather + weighted sum, cast back to expert_out.dtype."""
    num_tokens, top_k = topk_weights.shape
    rows = expert_out.float()[inverse.long()].view(num_tokens, top_k, expert_out.shape[1])  # [T, K, D]
    return torch.einsum("tkd,tk->td", rows, topk_weights.float()).to(expert_out.dtype)
