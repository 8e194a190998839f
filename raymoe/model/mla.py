"""Multi-head Latent Attention (MLA), naive and absorbed, split into the pieces a KV-cache backend needs.

The latent KV cache stores, per token, `c_kv` (after `kv_a_layernorm`, C values) and `k_pe` (after
RoPE, R values), shared by all heads (K2_FACTS §2.2). An `AttentionBackend` receives the projected
queries and the new tokens' latents and returns the per-head attention output; `DenseCausalAttention`
is the cache-less reference over a flat batch of independent sequences. A paged backend (engine)
implements the same protocol, reading the layer id from `mla.layer_id`.

Tensor letters: T query tokens, S key tokens, H heads, D model dim, C kv_lora_rank, R rope dim,
Dn qk_nope_head_dim, Dv v_head_dim.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from raymoe.model.args import ModelArgs
from raymoe.model.layers import RMSNorm, RotaryEmbedding, set_gemm_layout, stack_linears

# HF builds q_a_layernorm / kv_a_layernorm with the RMSNorm default eps (1e-6), not rms_norm_eps,
# and so does DeepSeek-V3's inference/model.py.
LATENT_NORM_EPS = 1e-6


class AttentionBackend(ABC):
    """Turns MLA queries and the current tokens' latents into the attention output o [T, H, Dv]."""

    @abstractmethod
    def __call__(self, mla: MLA, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor,
                 k_pe: torch.Tensor) -> torch.Tensor:
        """q_nope [T,H,Dn], q_pe [T,H,R], c_kv [T,C], k_pe [T,R] -> o [T,H,Dv]."""


def causal_mask(seq_lens: list[int], device: torch.device | None = None) -> torch.Tensor:
    """Block-diagonal causal mask [T, T] (True = may attend) for sequences packed back to back."""
    lens = torch.tensor(seq_lens, dtype=torch.long, device=device)
    seq_id = torch.repeat_interleave(torch.arange(len(seq_lens), device=device), lens)  # [T]
    idx = torch.arange(int(lens.sum()), device=device)
    return (seq_id[:, None] == seq_id[None, :]) & (idx[None, :] <= idx[:, None])


class DenseCausalAttention(AttentionBackend):
    """No cache: each of the packed sequences attends causally to itself only.

    `seq_lens` lists the lengths of the sequences laid out back to back in the flat batch
    (None = one sequence covering all tokens). `mode` picks the naive (expand kv_b_proj) or
    absorbed (attend in latent space) math; both give the same result.
    """

    def __init__(self, seq_lens: list[int] | None = None, mode: Literal["naive", "absorb"] = "naive") -> None:
        if mode not in ("naive", "absorb"):
            raise ValueError(f"mode {mode!r} is not supported (supported: 'naive', 'absorb')")
        if seq_lens is not None and any(n < 1 for n in seq_lens):
            raise ValueError(f"seq_lens ({seq_lens}) must all be >= 1")
        self.seq_lens = list(seq_lens) if seq_lens is not None else None
        self.mode = mode

    def __call__(self, mla: MLA, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor,
                 k_pe: torch.Tensor) -> torch.Tensor:
        num_tokens = q_nope.shape[0]
        lens = self.seq_lens if self.seq_lens is not None else [num_tokens]
        if sum(lens) != num_tokens:
            raise ValueError(f"seq_lens ({lens}) sum to {sum(lens)}, but the batch has {num_tokens} tokens")
        mask = causal_mask(lens, q_nope.device)
        if self.mode == "naive":
            return mla.attend_naive(q_nope, q_pe, c_kv, k_pe, mask)
        return mla.unabsorb(mla.attend_latent(mla.absorb_q(q_nope), q_pe, c_kv, k_pe, mask))


def _softmax(scores: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """scores [T,H,S] (already scaled), mask [T,S] -> probabilities in fp32, cast to `dtype` (as HF)."""
    scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)


class MLA(nn.Module):
    """DeepSeek-V3 MLA with HF parameter names (q_a_proj/q_b_proj or q_proj, kv_a_proj_with_mqa, ...)."""

    def __init__(self, args: ModelArgs, layer_id: int, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.num_heads = args.num_attention_heads
        self.q_lora_rank = args.q_lora_rank
        self.kv_lora_rank = args.kv_lora_rank
        self.qk_nope_head_dim = args.qk_nope_head_dim
        self.qk_rope_head_dim = args.qk_rope_head_dim
        self.v_head_dim = args.v_head_dim
        self.softmax_scale = args.softmax_scale
        dim, heads, qk_dim = args.hidden_size, self.num_heads, args.qk_head_dim

        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(dim, heads * qk_dim, bias=False, dtype=dtype)
        else:
            self.q_a_proj = nn.Linear(dim, self.q_lora_rank, bias=False, dtype=dtype)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, LATENT_NORM_EPS, dtype=dtype)
            self.q_b_proj = nn.Linear(self.q_lora_rank, heads * qk_dim, bias=False, dtype=dtype)
        self.kv_a_proj_with_mqa = nn.Linear(dim, self.kv_lora_rank + self.qk_rope_head_dim, bias=False, dtype=dtype)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, LATENT_NORM_EPS, dtype=dtype)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, heads * (self.qk_nope_head_dim + self.v_head_dim),
                                   bias=False, dtype=dtype)
        self.o_proj = nn.Linear(heads * self.v_head_dim, dim, bias=False, dtype=dtype)
        self.rotary = RotaryEmbedding(args)
        self._w_a: torch.Tensor | None = None  # after fuse(): [q_a_proj; kv_a_proj_with_mqa] weights
        self._absorb: tuple[torch.Tensor, ...] | None = None  # (kv_b weight, W_uk [H,Dn,C], W_uv^T [H,C,Dv])

    @torch.no_grad()
    def fuse(self) -> bool:
        """After loading: stack `q_a_proj` and `kv_a_proj_with_mqa` (both read the layer input) into one
        weight the two parameters then view, so `project` runs one GEMM for both (False without q_lora),
        and give the projections the device's GEMM layout (`gemm_layout`)."""
        self._w_a = None
        if (self.q_proj if self.q_lora_rank is None else self.q_a_proj).weight.is_meta:
            return False
        set_gemm_layout(self.o_proj)  # kv_b_proj stays row-major: absorb/unabsorb view it per head
        if self.q_lora_rank is None:
            set_gemm_layout(self.q_proj)
            return False
        set_gemm_layout(self.q_b_proj)
        self._w_a = stack_linears(self.q_a_proj, self.kv_a_proj_with_mqa)
        return True

    def project(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x [T,D], positions [T] -> (q_nope, q_pe, c_kv, k_pe): `project_q` and `project_kv` in one."""
        w_a = self._w_a
        if w_a is None or self.q_a_proj.weight.data_ptr() != w_a.data_ptr():  # not fused, or moved since
            return (*self.project_q(x, positions), *self.project_kv(x, positions))
        # plain slicing rather than Tensor.split: this runs once per layer and step, and split's Python
        # wrapper costs about as much as the slices' kernels here
        a = F.linear(x, w_a)  # [T, q_lora | C | R]
        ql, dn, heads = self.q_lora_rank, self.qk_nope_head_dim, self.num_heads
        kv_end = ql + self.kv_lora_rank
        # leaf modules called through .forward: this runs once per layer and step, where Module.__call__'s
        # dispatch costs about as much as the small kernels it wraps
        q = self.q_b_proj.forward(self.q_a_layernorm.forward(a[:, :ql])).view(x.shape[0], heads, -1)  # [T,H,Dn+R]
        if self.rotary.rotate_(q[:, :, dn:], a[:, kv_end:], positions):  # in place, one C call (CPU kernels)
            return q[:, :, :dn], q[:, :, dn:], self.kv_a_layernorm.forward(a[:, ql:kv_end]), a[:, kv_end:]
        # one rotation for the queries' and the key's rope parts: [T, H+1, R]
        pe = self.rotary.rotate(torch.cat([q[:, :, dn:], a[:, None, kv_end:]], dim=1), positions)
        return q[:, :, :dn], pe[:, :heads], self.kv_a_layernorm.forward(a[:, ql:kv_end]), pe[:, heads]

    # -- projections -------------------------------------------------------------------------
    def project_q(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T,D], positions [T] -> q_nope [T,H,Dn], q_pe [T,H,R] (RoPE applied)."""
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(x.shape[0], self.num_heads, -1)  # [T,H,Dn+R]
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        return q_nope, self.rotary.rotate(q_pe, positions)

    def project_kv(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T,D], positions [T] -> c_kv [T,C] (normalised), k_pe [T,R] (roped): what the cache stores."""
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        return self.kv_a_layernorm(c_kv), self.rotary.rotate(k_pe, positions)

    def _wkv_b(self) -> torch.Tensor:
        """kv_b_proj weight as [H, Dn+Dv, C]."""
        return self.kv_b_proj.weight.view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)

    def _absorb_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_uk [H, Dn, C], W_uv^T [H, C, Dv]): views of kv_b_proj's weight, rebuilt when it is replaced."""
        w = self.kv_b_proj.weight
        cached = self._absorb
        if cached is None or cached[0] is not w:
            wkv = self._wkv_b()
            cached = self._absorb = (w, wkv[:, : self.qk_nope_head_dim], wkv[:, self.qk_nope_head_dim:].transpose(1, 2))
        return cached[1], cached[2]

    # -- naive: expand the latent into per-head keys and values -------------------------------
    def attend_naive(self, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor:
        """q [T,H,*], c_kv [S,C], k_pe [S,R], mask [T,S] bool (each row needs a True) -> o [T,H,Dv]."""
        kv = self.kv_b_proj(c_kv).view(c_kv.shape[0], self.num_heads, -1)  # [S,H,Dn+Dv]
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        scores = torch.einsum("thd,shd->ths", q_nope, k_nope) + torch.einsum("thr,sr->ths", q_pe, k_pe)
        probs = _softmax(scores * self.softmax_scale, mask, q_nope.dtype)  # [T,H,S]
        return torch.einsum("ths,shd->thd", probs, v)

    # -- absorbed: fold kv_b_proj into the query and the output ------------------------------
    def absorb_q(self, q_nope: torch.Tensor) -> torch.Tensor:
        """q_nope [T,H,Dn] -> q_lat [T,H,C] (q_nope · W_uk per head)."""
        # bmm per head on strided views (einsum's permute+copy path is ~1.5-5x slower at decode sizes)
        return torch.bmm(q_nope.transpose(0, 1), self._absorb_weights()[0]).transpose(0, 1)

    def attend_latent(self, q_lat: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor,
                      mask: torch.Tensor) -> torch.Tensor:
        """q_lat [T,H,C], q_pe [T,H,R], c_kv [S,C], k_pe [S,R], mask [T,S] -> o_lat [T,H,C]."""
        scores = torch.einsum("thc,sc->ths", q_lat, c_kv) + torch.einsum("thr,sr->ths", q_pe, k_pe)
        probs = _softmax(scores * self.softmax_scale, mask, q_lat.dtype)
        return torch.einsum("ths,sc->thc", probs, c_kv)

    def unabsorb(self, o_lat: torch.Tensor) -> torch.Tensor:
        """o_lat [T,H,C] -> o [T,H,Dv] (· W_uv per head)."""
        return torch.bmm(o_lat.transpose(0, 1), self._absorb_weights()[1]).transpose(0, 1)

    def output(self, o: torch.Tensor) -> torch.Tensor:
        """o [T,H,Dv] -> [T,D]."""
        return self.o_proj.forward(o.reshape(o.shape[0], self.num_heads * self.v_head_dim))

    def forward(self, x: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend | None = None) -> torch.Tensor:
        """x [T,D], positions [T] -> [T,D]; `attn` defaults to one causal sequence (naive)."""
        q_nope, q_pe, c_kv, k_pe = self.project(x, positions)
        attn = attn if attn is not None else DenseCausalAttention()
        return self.output(attn(self, q_nope, q_pe, c_kv, k_pe))
