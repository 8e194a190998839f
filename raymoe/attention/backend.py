"""Paged MLA attention over the latent KV cache (the attention tier's hot path).

[embed] → per layer: [MLA q / latent kv] → **[write latent cache] → [attend via block tables]** → [o_proj]

The cache of one layer is `[num_blocks, block_size, C + R]`: the normalised latent `c_kv` (C) and the
roped key `k_pe` (R), shared by all heads (576 values per token for K2). Decode queries use the
absorbed form (`kv_b_proj` folded into the query and output), which reads only the latents; long
prefill chunks expand their cached context into per-head keys/values (naive MLA) for fused attention,
short ones over a long context (a prefix-cache hit's last block) take the absorbed form too
(`absorb_prefill`: whichever does fewer multiply-adds).
`AttentionMetadata` is built once per step (slot indices, block tables, masks) so the per-layer
work is a few tensor ops.

Shapes: T new tokens, B sequences, Bd decode sequences, L padded context, H heads, C latent, R rope.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from raymoe.model.mla import MLA


@dataclass(slots=True)
class PrefillBatch:
    """The multi-token (prefill / chunked-prefill) sequences of a step, padded into one batch."""

    token_idx: torch.Tensor  # [Bp, Q] positions in the flat batch (padding: 0)
    token_valid: torch.Tensor  # [Bp, Q] bool
    context_slots: torch.Tensor  # [Bp, S] cache slots of each sequence's whole context (padding: 0)
    mask: torch.Tensor  # [Bp, Q, S] bool: causal within the sequence, False on padding
    bias: torch.Tensor  # [Bp, 1, Q, S] fp32: 0 where mask, -inf elsewhere (the attention's additive mask)


@dataclass(slots=True)
class AttentionMetadata:
    """Per-step slot bookkeeping; built by `build_metadata`, read by every layer."""

    slot_mapping: torch.Tensor  # [T] where each new token's latent is written
    decode_token_idx: torch.Tensor  # [Bd] positions in the flat batch of decode tokens
    decode_block_tables: torch.Tensor  # [Bd, max_blocks] int32, padded with block 0
    decode_seq_lens: torch.Tensor  # [Bd] int32
    # [Bd, 1, max_blocks * block_size] fp32: 0 on real context, -inf past the end; built on first use
    # (`decode_bias()`): only the torch decode path reads it, the kernels take `decode_seq_lens`
    decode_bias: torch.Tensor | None
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
    if query_lens and len(query_lens) == sum(query_lens):  # one new token each (query lengths are >= 1)
        return decode_metadata(context_lens, block_tables, block_size, device)
    return _mixed_metadata(query_lens, context_lens, block_tables, block_size, device)


def _mixed_metadata(query_lens: list[int], context_lens: list[int], block_tables: list[list[int]], block_size: int,
                    device: torch.device | str) -> AttentionMetadata:
    """`build_metadata` for any batch (prefill chunks and decodes)."""
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
        flat: list[int] = []  # one flat list converts ~2x faster than a nested one
        for t in dec_tables:
            flat += t[:max_blocks]
            if len(t) < max_blocks:
                flat += [0] * (max_blocks - len(t))
        tables = torch.tensor(flat, dtype=torch.int32).view(len(dec_tables), max_blocks)
        seq_lens = torch.tensor(dec_lens, dtype=torch.int32)
    else:
        tables = torch.zeros(0, 0, dtype=torch.int32)
        seq_lens = torch.zeros(0, dtype=torch.int32)
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
        pre_bias = torch.zeros(mask.shape, dtype=torch.float32).masked_fill_(~mask, float("-inf")).unsqueeze(1)
        prefill = PrefillBatch(token_idx.to(device), token_valid.to(device), ctx_slots.to(device), mask.to(device),
                               pre_bias.to(device))
    return AttentionMetadata(
        slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=device),
        decode_token_idx=torch.tensor(dec_idx, dtype=torch.long, device=device),
        decode_block_tables=tables.to(device),
        decode_seq_lens=seq_lens.to(device),
        decode_bias=None,
        prefill=prefill,
        num_tokens=start,
        all_decode=not pre,
    )


def _int_tensor(values: array, dtype: torch.dtype) -> torch.Tensor:
    """A tensor over an int array's buffer (no copy; the tensor keeps the array alive): ~3x faster than
    `torch.tensor` of a list, which converts element by element."""
    return torch.frombuffer(values, dtype=dtype) if len(values) else torch.zeros(0, dtype=dtype)


def decode_metadata(context_lens: list[int], block_tables: list[list[int]], block_size: int,
                    device: torch.device | str = "cpu") -> AttentionMetadata:
    """`build_metadata` for a decode-only step (one new token per sequence, at position `context_lens[i]`; the
    common case under load): the same tensors from one pass over the sequences, gathered in int arrays that
    the tensors then view (64 sequences: ~80 vs ~160 us with lists, measured 2026-11)."""
    num = len(context_lens)
    max_blocks = max(context_lens) // block_size + 1  # blocks of the longest sequence, new token included
    slots = array("q")
    lens = array("i")
    flat = array("i")
    for ctx, table in zip(context_lens, block_tables):
        assert len(table) * block_size > ctx, "block table too short for the sequence"
        slots.append(table[ctx // block_size] * block_size + ctx % block_size)
        lens.append(ctx + 1)
        if len(table) >= max_blocks:
            flat.extend(table[:max_blocks])
        else:
            flat.extend(table)
            flat.frombytes(bytes(flat.itemsize * (max_blocks - len(table))))  # zero padding
    tables = _int_tensor(flat, torch.int32).view(num, max_blocks)
    return AttentionMetadata(
        slot_mapping=_int_tensor(slots, torch.long).to(device),
        decode_token_idx=torch.arange(num, device=device),
        decode_block_tables=tables.to(device),
        decode_seq_lens=_int_tensor(lens, torch.int32).to(device),
        decode_bias=None,
        prefill=None,
        num_tokens=num,
        all_decode=True,
    )


def decode_bias(md: AttentionMetadata, block_size: int) -> torch.Tensor:
    """`md.decode_bias`, built on first use: [Bd, 1, max_blocks * block_size] fp32, 0 up to each decode
    sequence's length and -inf past it (the additive mask of the torch decode path)."""
    if md.decode_bias is None:
        lens = md.decode_seq_lens
        past_end = torch.arange(md.decode_block_tables.shape[1] * block_size, device=lens.device) >= lens[:, None]
        md.decode_bias = torch.zeros(past_end.shape, dtype=torch.float32, device=lens.device).masked_fill_(
            past_end, float("-inf")).unsqueeze(1)
    return md.decode_bias


class PagedMLAAttention:
    """`AttentionBackend` for the engine: writes latents into the paged cache, attends through it.

    `kv_cache` is `[num_layers, num_blocks, block_size, C + R]`; `metadata` is set before each step.
    """

    def __init__(self, kv_cache: torch.Tensor, kv_lora_rank: int, *, use_triton: bool = False,
                 use_cpu_kernel: bool = False):
        if use_triton and use_cpu_kernel:
            raise ValueError("use_triton and use_cpu_kernel are exclusive")
        self.kv_cache = kv_cache
        self.kv_lora_rank = kv_lora_rank
        self.use_triton = use_triton  # decode through raymoe_kernels.mla_decode (CUDA, or CPU interpreter)
        self.use_cpu_kernel = use_cpu_kernel  # decode through raymoe_kernels.cpu.mla_decode_cpu (C, pages in place)
        if use_cpu_kernel:
            from raymoe_kernels.cpu import mla_decode_cpu, mla_decode_step_cpu

            self._mla_decode_cpu = mla_decode_cpu
            self._mla_decode_step_cpu = mla_decode_step_cpu
        self.metadata: AttentionMetadata | None = None
        self._pages = list(kv_cache.unbind(0))  # per layer [num_blocks, block_size, C+R] (views)
        self._slots = [pages.view(-1, kv_cache.shape[-1]) for pages in self._pages]  # per layer [slots, C+R]
        self._gather: torch.Tensor | None = None  # reused destination of the decode context gather

    # The decode gather's destination is kept between steps up to this size (a fresh multi-MB tensor per
    # layer costs ~1.7x the copy itself on CPU, measured 2026-11); larger contexts allocate per call.
    GATHER_BUFFER_BYTES = 64 << 20

    def _gather_blocks(self, pages: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
        """pages[block_ids] ([n, block_size, C+R]) into the reused buffer when it fits."""
        n = block_ids.numel()
        if n * pages[0].numel() * pages.element_size() > self.GATHER_BUFFER_BYTES:
            return pages.index_select(0, block_ids)
        buf = self._gather
        if buf is None or buf.shape[0] < n or buf.dtype != pages.dtype or buf.device != pages.device:
            size = max(n, 2 * buf.shape[0] if buf is not None and buf.dtype == pages.dtype else 0)
            size = min(size, self.GATHER_BUFFER_BYTES // (pages[0].numel() * pages.element_size()))
            buf = self._gather = pages.new_empty((size, *pages.shape[1:]))
        return torch.index_select(pages, 0, block_ids, out=buf[:n])

    def __call__(self, mla: MLA, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor,
                 k_pe: torch.Tensor) -> torch.Tensor:
        md = self.metadata
        assert md is not None, "attention metadata must be set before the forward pass"
        if (md.all_decode and self.use_cpu_kernel and q_nope.dtype is torch.float32 and c_kv.dtype is torch.float32
                and mla.kv_b_proj.weight.dtype is torch.float32 and mla.kv_b_proj.weight.is_contiguous()):
            # the whole layer step in one C call: cache write, absorb, attention, unabsorb
            return self._mla_decode_step_cpu(q_nope, q_pe, c_kv, k_pe, md.slot_mapping, mla.kv_b_proj.weight,
                                             self._pages[mla.layer_id], md.decode_block_tables, md.decode_seq_lens,
                                             mla.softmax_scale)
        cache = self._slots[mla.layer_id]  # [slots, C+R]
        latent = torch.cat([c_kv, k_pe], dim=-1)
        cache.index_copy_(0, md.slot_mapping, latent if latent.dtype == cache.dtype else latent.to(cache.dtype))
        scale = mla.softmax_scale
        if md.all_decode:  # decode-only step: tokens are already in sequence order
            return mla.unabsorb(self._decode(mla.absorb_q(q_nope), q_pe, mla.layer_id, md, scale))
        o = q_nope.new_zeros(q_nope.shape[0], mla.num_heads, mla.v_head_dim)  # [T, H, Dv]
        if md.decode_token_idx.numel():
            idx = md.decode_token_idx
            o[idx] = mla.unabsorb(self._decode(mla.absorb_q(q_nope[idx]), q_pe[idx], mla.layer_id, md, scale))
        if md.prefill is not None:
            pb = md.prefill
            prefill = self._prefill_absorbed if self.absorb_prefill(mla, pb.token_idx.shape[1]) else self._prefill
            out = prefill(mla, q_nope[pb.token_idx], q_pe[pb.token_idx], cache, pb, scale)  # [Bp, Q, H, Dv]
            o[pb.token_idx[pb.token_valid]] = out[pb.token_valid]
        return o

    def absorb_prefill(self, mla: MLA, num_queries: int) -> bool:
        """Whether chunks of `num_queries` tokens attend cheaper in absorbed (latent) form.

        Per context token and head, the naive form expands the latent (C·(Dn+Dv) MACs) and then attends
        over Dn+R / Dv dims per query; the absorbed form attends over C+R dims twice per query and
        expands nothing. Short chunks over long cached contexts (a prefix-cache hit recomputing its
        last block, the tail of a chunked prompt) are cheaper absorbed: up to 25 new tokens for the
        tiny model, 157 for K2 (C 512, R 64, Dn = Dv = 128).
        """
        C, R = self.kv_lora_rank, mla.qk_rope_head_dim
        per_query_extra = 2 * (C + R) - (mla.qk_nope_head_dim + R + mla.v_head_dim)
        return num_queries * per_query_extra < C * (mla.qk_nope_head_dim + mla.v_head_dim)

    def _prefill_absorbed(self, mla: MLA, q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor,
                          pb: PrefillBatch, scale: float) -> torch.Tensor:
        """The decode math for chunks: all Q·H queries of a sequence against its latent context in one bmm
        ([Bp, Q, H, Dn|R] -> [Bp, Q, H, Dv]).

        Scores, softmax and the probability-weighted sum of latents run in fp32 whatever the cache dtype:
        rounding the probabilities to bf16 before that sum cost 0.27 nats of first-token logprob on the
        tiny model, against 0.04 for the naive form (whose fused attention keeps them in fp32) and 0.06
        in fp32. The fp32 copy of the context is made once and read by both bmm."""
        C = self.kv_lora_rank
        Bp, S = pb.context_slots.shape
        Q, H = q_nope.shape[1], mla.num_heads
        kv = cache.index_select(0, pb.context_slots.view(-1)).view(Bp, S, -1)  # [Bp, S, C+R]
        q_lat = mla.absorb_q(q_nope.reshape(Bp * Q, H, -1))  # [Bp·Q, H, C]
        q = torch.cat([q_lat, q_pe.reshape(Bp * Q, H, -1)], dim=-1).view(Bp, Q * H, -1)  # [Bp, Q·H, C+R]
        kv32 = kv.float()
        scores = torch.bmm(q.float(), kv32.transpose(1, 2)).view(Bp, Q, H, S)
        scores = scores.mul_(scale).add_(pb.bias.view(Bp, Q, 1, S))  # causal + padding mask, shared by heads
        p = torch.softmax(scores, dim=-1).view(Bp, Q * H, S)
        o_lat = torch.bmm(p, kv32)[..., :C].to(kv.dtype).reshape(Bp * Q, H, C)
        return mla.unabsorb(o_lat).view(Bp, Q, H, -1)

    def _prefill(self, mla: MLA, q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, pb: PrefillBatch,
                 scale: float) -> torch.Tensor:
        """Naive MLA over each sequence's cached context: [Bp, Q, H, Dn|R] -> [Bp, Q, H, Dv].

        Chunks with many queries per context token expand the latents into per-head keys and values
        (kv_b_proj) and run fused attention: cheaper than the absorbed form, whose scores span C+R
        dims instead of Dn+R (576 vs 192 for K2; the reason real engines prefill in MHA form and decode
        in MQA form); `absorb_prefill` says where that stops holding. Padded query rows have no key
        and come out NaN; the caller drops them.
        """
        C = self.kv_lora_rank
        Bp, S = pb.context_slots.shape
        H, Dn, Dv = mla.num_heads, mla.qk_nope_head_dim, mla.v_head_dim
        kv = cache.index_select(0, pb.context_slots.view(-1)).view(Bp, S, -1)  # [Bp, S, C+R]
        k_nope, v = mla.kv_b_proj(kv[..., :C]).view(Bp, S, H, Dn + Dv).split([Dn, Dv], dim=-1)
        k_pe = kv[..., C:].unsqueeze(2).expand(Bp, S, H, kv.shape[-1] - C)  # shared by all heads
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # [Bp, H, Q, Dn+R]
        k = torch.cat([k_nope, k_pe], dim=-1).transpose(1, 2)  # [Bp, H, S, Dn+R]
        # v padded to the q/k head dim: torch's fused CPU attention wants equal head dims and falls back
        # to a ~2x slower unfused path otherwise (measured 2026-11, 16x128 tokens); the pad columns are dropped.
        pad = q.shape[-1] - Dv
        v = F.pad(v, (0, pad)) if pad > 0 else v
        out = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), attn_mask=pb.bias.to(q.dtype),
                                             scale=scale)  # [Bp, H, Q, Dn+R]
        return out.transpose(1, 2)[..., :Dv]

    def _decode(self, q_lat: torch.Tensor, q_pe: torch.Tensor, layer_id: int, md: AttentionMetadata,
                scale: float) -> torch.Tensor:
        """One query per sequence against its padded context: [Bd, H, C] -> [Bd, H, C]."""
        if self.use_triton:
            from raymoe_kernels import mla_decode

            return mla_decode(q_lat, q_pe, self.kv_cache[layer_id], md.decode_block_tables, md.decode_seq_lens,
                              scale)
        if self.use_cpu_kernel:
            out = self._mla_decode_cpu(q_lat.float(), q_pe.float(), self._pages[layer_id], md.decode_block_tables,
                                       md.decode_seq_lens, scale)
            return out if out.dtype == q_lat.dtype else out.to(q_lat.dtype)
        C = self.kv_lora_rank
        # Whole blocks through the block table (index_select: ~3x faster than per-slot advanced
        # indexing on CPU), then one bmm over latent+rope: q·[c_kv | k_pe] = q_lat·c_kv + q_pe·k_pe.
        pages = self._pages[layer_id]  # [num_blocks, block_size, C+R]
        Bd = q_lat.shape[0]
        kv = self._gather_blocks(pages, md.decode_block_tables.view(-1)).view(Bd, -1, pages.shape[-1])  # [Bd, L, C+R]
        q = torch.cat([q_lat, q_pe], dim=-1)  # [Bd, H, C+R]
        kv32 = kv.float()  # scores, softmax and the weighted sum in fp32 (see _prefill_absorbed)
        scores = torch.baddbmm(decode_bias(md, pages.shape[1]), q.float(), kv32.transpose(1, 2), alpha=scale)  # [Bd, H, L]
        p = torch.softmax(scores, dim=-1)  # -inf past each end
        # the rope columns of the product are dropped (R of C+R: cheap)
        return torch.bmm(p, kv32)[..., :C].to(kv.dtype)
