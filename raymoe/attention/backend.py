"""Paged MLA attention over the latent KV cache (the attention tier's hot path).

[embed] → per layer: [MLA q / latent kv] → **[write latent cache] → [attend via block tables]** → [o_proj]

The cache of one layer is `[num_blocks, block_size, C + R]`: the normalised latent `c_kv` (C) and the
roped key `k_pe` (R), shared by all heads (576 values per token for K2). Decode queries use the
absorbed form (`kv_b_proj` folded into the query and output), which reads only the latents; prefill
chunks use the same absorbed math over their cached context. `AttentionMetadata` is built once per
step (slot indices, padded context gathers, causal masks) so the per-layer work is a few tensor ops.

Shapes: T new tokens, B sequences, Bd decode sequences, L padded context, H heads, C latent, R rope.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raymoe.model.mla import MLA


@dataclass(slots=True)
class PrefillBatch:
    """The multi-token (prefill / chunked-prefill) sequences of a step, padded into one batch."""

    token_idx: torch.Tensor  # [Bp, Q] positions in the flat batch (padding: 0)
    token_valid: torch.Tensor  # [Bp, Q] bool
    context_slots: torch.Tensor  # [Bp, S] cache slots of each sequence's whole context (padding: 0)
    mask: torch.Tensor  # [Bp, Q, S] bool: causal within the sequence, False on padding


@dataclass(slots=True)
class AttentionMetadata:
    """Per-step slot bookkeeping; built by `build_metadata`, read by every layer."""

    slot_mapping: torch.Tensor  # [T] where each new token's latent is written
    decode_token_idx: torch.Tensor  # [Bd] positions in the flat batch of decode tokens
    decode_block_tables: torch.Tensor  # [Bd, max_blocks] int32, padded with block 0
    decode_seq_lens: torch.Tensor  # [Bd] int32
    decode_bias: torch.Tensor  # [Bd, 1, max_blocks * block_size] fp32: 0 on real context, -inf past the end
    prefill: PrefillBatch | None
    num_tokens: int
    all_decode: bool  # every token is a decode token, in flat order (skip the gather/scatter)


def _slots(table: list[int], length: int, block_size: int) -> torch.Tensor:
    blocks = torch.tensor(table, dtype=torch.long)
    pos = torch.arange(length)
    return blocks[pos // block_size] * block_size + pos % block_size


def build_metadata(
    query_lens: list[int],
    context_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    device: torch.device | str = "cpu",
) -> AttentionMetadata:
    """Slots and masks for a flat batch: sequence i contributes `query_lens[i]` new tokens whose
    positions follow `context_lens[i]` tokens already in the cache."""
    slot_mapping: list[int] = []
    dec_idx: list[int] = []
    dec_tables: list[list[int]] = []
    dec_lens: list[int] = []
    pre: list[tuple[int, int, int, list[int]]] = []  # (flat start, query len, context len, table)
    start = 0
    for qlen, ctx, table in zip(query_lens, context_lens, block_tables):
        total = ctx + qlen
        assert len(table) * block_size >= total, "block table too short for the sequence"
        if qlen == 1:
            slot_mapping.append(table[ctx // block_size] * block_size + ctx % block_size)
            dec_idx.append(start)
            dec_tables.append(table)
            dec_lens.append(total)
        else:
            slot_mapping += [table[p // block_size] * block_size + p % block_size for p in range(ctx, total)]
            pre.append((start, qlen, ctx, table))
        start += qlen
    if dec_idx:
        max_blocks = (max(dec_lens) + block_size - 1) // block_size
        tables = torch.tensor([t[:max_blocks] + [0] * (max_blocks - len(t[:max_blocks])) for t in dec_tables],
                              dtype=torch.int32)
        seq_lens = torch.tensor(dec_lens, dtype=torch.int32)
        past_end = torch.arange(max_blocks * block_size).unsqueeze(0) >= seq_lens.unsqueeze(1)  # [Bd, L]
        bias = torch.zeros(past_end.shape, dtype=torch.float32).masked_fill_(past_end, float("-inf")).unsqueeze(1)
    else:
        tables = torch.zeros(0, 0, dtype=torch.int32)
        seq_lens = torch.zeros(0, dtype=torch.int32)
        bias = torch.zeros(0, 1, 0, dtype=torch.float32)
    prefill = None
    if pre:
        q_max = max(q for _, q, _, _ in pre)
        s_max = max(q + c for _, q, c, _ in pre)
        token_idx = torch.zeros(len(pre), q_max, dtype=torch.long)
        token_valid = torch.zeros(len(pre), q_max, dtype=torch.bool)
        ctx_slots = torch.zeros(len(pre), s_max, dtype=torch.long)
        mask = torch.zeros(len(pre), q_max, s_max, dtype=torch.bool)
        s_pos = torch.arange(s_max)
        for b, (st, q, c, table) in enumerate(pre):
            token_idx[b, :q] = torch.arange(st, st + q)
            token_valid[b, :q] = True
            ctx_slots[b, : q + c] = _slots(table, q + c, block_size)
            q_pos = torch.arange(c, c + q).unsqueeze(1)  # [q, 1]
            mask[b, :q] = (s_pos.unsqueeze(0) <= q_pos)  # causal; keys past q+c-1 are excluded too
        prefill = PrefillBatch(token_idx.to(device), token_valid.to(device), ctx_slots.to(device), mask.to(device))
    return AttentionMetadata(
        slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=device),
        decode_token_idx=torch.tensor(dec_idx, dtype=torch.long, device=device),
        decode_block_tables=tables.to(device),
        decode_seq_lens=seq_lens.to(device),
        decode_bias=bias.to(device),
        prefill=prefill,
        num_tokens=start,
        all_decode=not pre,
    )


class PagedMLAAttention:
    """`AttentionBackend` for the engine: writes latents into the paged cache, attends through it.

    `kv_cache` is `[num_layers, num_blocks, block_size, C + R]`; `metadata` is set before each step.
    """

    def __init__(self, kv_cache: torch.Tensor, kv_lora_rank: int, *, use_triton: bool = False):
        self.kv_cache = kv_cache
        self.kv_lora_rank = kv_lora_rank
        self.use_triton = use_triton  # decode through raymoe_kernels.mla_decode (CUDA, or CPU interpreter)
        self.metadata: AttentionMetadata | None = None

    def __call__(self, mla: MLA, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor,
                 k_pe: torch.Tensor) -> torch.Tensor:
        md = self.metadata
        assert md is not None, "attention metadata must be set before the forward pass"
        C = self.kv_lora_rank
        cache = self.kv_cache[mla.layer_id].view(-1, self.kv_cache.shape[-1])  # [slots, C+R]
        cache.index_copy_(0, md.slot_mapping, torch.cat([c_kv, k_pe], dim=-1).to(cache.dtype))
        q_lat = mla.absorb_q(q_nope)  # [T, H, C]
        scale = mla.softmax_scale
        if md.all_decode:  # decode-only step: tokens are already in sequence order
            return mla.unabsorb(self._decode(q_lat, q_pe, mla.layer_id, md, scale))
        o_lat = q_lat.new_zeros(q_lat.shape)
        if md.decode_token_idx.numel():
            idx = md.decode_token_idx
            o_lat[idx] = self._decode(q_lat[idx], q_pe[idx], mla.layer_id, md, scale)
        if md.prefill is not None:
            pb = md.prefill
            kv = cache[pb.context_slots]  # [Bp, S, C+R]
            q_l, q_r = q_lat[pb.token_idx], q_pe[pb.token_idx]  # [Bp, Q, H, C|R]
            scores = torch.einsum("bqhc,bsc->bqhs", q_l, kv[..., :C]) + torch.einsum("bqhr,bsr->bqhs", q_r, kv[..., C:])
            scores = (scores.float() * scale).masked_fill(~pb.mask.unsqueeze(2), float("-inf"))
            p = torch.softmax(scores, dim=-1).nan_to_num_(0.0).to(kv.dtype)  # padded query rows: all -inf
            o = torch.einsum("bqhs,bsc->bqhc", p, kv[..., :C])  # [Bp, Q, H, C]
            o_lat[pb.token_idx[pb.token_valid]] = o[pb.token_valid]
        return mla.unabsorb(o_lat)

    def _decode(self, q_lat: torch.Tensor, q_pe: torch.Tensor, layer_id: int, md: AttentionMetadata,
                scale: float) -> torch.Tensor:
        """One query per sequence against its padded context: [Bd, H, C] -> [Bd, H, C]."""
        if self.use_triton:
            from raymoe_kernels import mla_decode

            return mla_decode(q_lat, q_pe, self.kv_cache[layer_id], md.decode_block_tables, md.decode_seq_lens,
                              scale)
        C = self.kv_lora_rank
        # Whole blocks through the block table (index_select: ~3x faster than per-slot advanced
        # indexing on CPU), then one bmm over latent+rope: q·[c_kv | k_pe] = q_lat·c_kv + q_pe·k_pe.
        pages = self.kv_cache[layer_id]  # [num_blocks, block_size, C+R]
        Bd = q_lat.shape[0]
        kv = pages.index_select(0, md.decode_block_tables.view(-1)).view(Bd, -1, pages.shape[-1])  # [Bd, L, C+R]
        q = torch.cat([q_lat, q_pe], dim=-1)  # [Bd, H, C+R]
        k = kv.transpose(1, 2)
        if kv.dtype != torch.float32:  # scores and softmax in fp32
            q, k = q.float(), k.float()
        scores = torch.baddbmm(md.decode_bias, q, k, alpha=scale)  # [Bd, H, L] fp32, -inf past each end
        p = torch.softmax(scores, dim=-1).to(kv.dtype)
        return torch.bmm(p, kv)[..., :C]  # the rope columns of the product are dropped (R of C+R: cheap)
