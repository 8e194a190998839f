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
class PrefillSeq:
    token_start: int  # first of this sequence's tokens in the flat batch
    token_end: int
    context_slots: torch.Tensor  # [S] flat cache slots of the whole context (cached + new)
    mask: torch.Tensor  # [Tq, S] bool, causal


@dataclass(slots=True)
class AttentionMetadata:
    """Per-step slot bookkeeping; built by `build_metadata`, read by every layer."""

    slot_mapping: torch.Tensor  # [T] where each new token's latent is written
    decode_token_idx: torch.Tensor  # [Bd] positions in the flat batch of decode tokens
    decode_slots: torch.Tensor  # [Bd, L] context slots, padded with 0
    decode_mask: torch.Tensor  # [Bd, L] True where a real context token
    prefills: list[PrefillSeq]
    num_tokens: int


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
    prefills: list[PrefillSeq] = []
    start = 0
    for qlen, ctx, table in zip(query_lens, context_lens, block_tables):
        total = ctx + qlen
        assert len(table) * block_size >= total, "block table too short for the sequence"
        new_slots = [table[p // block_size] * block_size + p % block_size for p in range(ctx, total)]
        slot_mapping += new_slots
        if qlen == 1:
            dec_idx.append(start)
            dec_tables.append(table)
            dec_lens.append(total)
        else:
            blocks = torch.tensor(table, dtype=torch.long)
            pos = torch.arange(total)
            slots = blocks[pos // block_size] * block_size + pos % block_size
            q_pos = torch.arange(ctx, total).unsqueeze(1)
            mask = pos.unsqueeze(0) <= q_pos  # [Tq, S]
            prefills.append(PrefillSeq(start, start + qlen, slots.to(device), mask.to(device)))
        start += qlen
    if dec_idx:
        max_len = max(dec_lens)
        max_blocks = (max_len + block_size - 1) // block_size
        tables = torch.tensor([t[:max_blocks] + [0] * (max_blocks - len(t[:max_blocks])) for t in dec_tables],
                              dtype=torch.long)
        pos = torch.arange(max_len)
        dec_slots = tables[:, pos // block_size] * block_size + pos % block_size  # [Bd, L]
        dec_mask = pos.unsqueeze(0) < torch.tensor(dec_lens).unsqueeze(1)
        dec_slots = torch.where(dec_mask, dec_slots, torch.zeros_like(dec_slots))
    else:
        dec_slots = torch.zeros(0, 0, dtype=torch.long)
        dec_mask = torch.zeros(0, 0, dtype=torch.bool)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=device),
        decode_token_idx=torch.tensor(dec_idx, dtype=torch.long, device=device),
        decode_slots=dec_slots.to(device),
        decode_mask=dec_mask.to(device),
        prefills=prefills,
        num_tokens=start,
    )


class PagedMLAAttention:
    """`AttentionBackend` for the engine: writes latents into the paged cache, attends through it.

    `kv_cache` is `[num_layers, num_blocks, block_size, C + R]`; `metadata` is set before each step.
    """

    def __init__(self, kv_cache: torch.Tensor, kv_lora_rank: int):
        self.kv_cache = kv_cache
        self.kv_lora_rank = kv_lora_rank
        self.metadata: AttentionMetadata | None = None

    def __call__(self, mla: MLA, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor,
                 k_pe: torch.Tensor) -> torch.Tensor:
        md = self.metadata
        assert md is not None, "attention metadata must be set before the forward pass"
        C = self.kv_lora_rank
        cache = self.kv_cache[mla.layer_id].view(-1, self.kv_cache.shape[-1])  # [slots, C+R]
        cache.index_copy_(0, md.slot_mapping, torch.cat([c_kv, k_pe], dim=-1).to(cache.dtype))
        q_lat = mla.absorb_q(q_nope)  # [T, H, C]
        o_lat = q_lat.new_empty(q_lat.shape)
        scale = mla.softmax_scale
        if md.decode_token_idx.numel():
            idx = md.decode_token_idx
            kv = cache[md.decode_slots]  # [Bd, L, C+R]
            kv_c, kv_r = kv[..., :C], kv[..., C:]
            scores = torch.einsum("bhc,blc->bhl", q_lat[idx], kv_c) + torch.einsum("bhr,blr->bhl", q_pe[idx], kv_r)
            scores = (scores.float() * scale).masked_fill(~md.decode_mask.unsqueeze(1), float("-inf"))
            p = torch.softmax(scores, dim=-1).to(kv_c.dtype)
            o_lat[idx] = torch.einsum("bhl,blc->bhc", p, kv_c)
        for ps in md.prefills:
            kv = cache[ps.context_slots]  # [S, C+R]
            sl = slice(ps.token_start, ps.token_end)
            o_lat[sl] = mla.attend_latent(q_lat[sl], q_pe[sl], kv[:, :C], kv[:, C:], ps.mask)
        return mla.unabsorb(o_lat)
