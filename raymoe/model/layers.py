"""Small building blocks shared by MLA, MoE and the decoder: RMSNorm, YaRN RoPE, SwiGLU MLP, linears.

Every formula matches Hugging Face transformers 5 (`modeling_deepseek_v3.py`, `modeling_rope_utils.py`)
operation for operation, so a checkpoint gives the same numbers here and there (K2_FACTS §2.2).

Tensor letters: T tokens, H heads, R rope dim (qk_rope_head_dim), D model dim.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from raymoe.model.args import ModelArgs, RopeArgs, yarn_get_mscale


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back before the weight, exactly as HF's DeepseekV3RMSNorm."""

    def __init__(self, dim: int, eps: float = 1e-6, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))
        # per device (not state): ([dim, 1] of 1/dim, [1] of eps)
        self._mean: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._cpu: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] | None = None

    def set_kernel(self, kernel: str) -> None:
        """"cpu": fp32 rows on CPU are normalised by one C call (raymoe_kernels.cpu.rms_norm_cpu, the same
        operations) instead of five torch kernels; anything else: torch."""
        if kernel == "cpu":
            from raymoe_kernels.cpu import rms_norm_cpu

            self._cpu = rms_norm_cpu
        else:
            self._cpu = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self._cpu is not None and x.dim() == 2 and x.dtype == torch.float32 and x.device.type == "cpu"
                and self.weight.dtype == torch.float32):
            return self._cpu(x, self.weight, self.eps)
        # x·rsqrt(mean(x²)+eps) with mean+eps as one GEMV (addmm): 5 kernels where F.rms_norm (a composite on
        # CPU) runs 8, ~40% faster at decode sizes (measured 2026-11); the hot path runs 4 per layer. The
        # mean's summation order differs from HF's pow(2).mean(): equal to ~1 ulp, not bit for bit.
        h = x if x.dtype == torch.float32 else x.float()
        consts = self._mean.get(h.device)
        if consts is None:
            consts = self._mean[h.device] = (torch.full((h.shape[-1], 1), 1.0 / h.shape[-1], device=h.device),
                                             torch.full((1,), self.eps, device=h.device))
        mean, eps = consts
        inv = (torch.addmm(eps, h * h, mean) if h.dim() == 2 else torch.matmul(h * h, mean).add_(self.eps)).rsqrt_()
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return inv.mul(h).mul_(self.weight)
        return self.weight * (h * inv).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


def rope_inv_freq(rope: RopeArgs, dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] (fp32, CPU) and the cos/sin scale, as HF computes them.

    Default RoPE: `1/θ^(2i/dim)`, scale 1. YaRN (`_compute_yarn_parameters`): a linear ramp between the
    correction dims of `beta_fast` and `beta_slow` (floored/ceiled: HF's default `truncate=True`) blends
    extrapolated (original) and interpolated (/factor) frequencies; the cos/sin scale ("attention_factor")
    is mscale(factor, mscale)/mscale(factor, mscale_all_dim) when both are set, else mscale(factor).
    """
    base = rope.rope_theta
    exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim
    if rope.rope_type == "default":
        return 1.0 / (base**exponents), 1.0
    if rope.rope_type != "yarn":
        raise ValueError(f"rope_type {rope.rope_type!r} is not supported (supported: 'default', 'yarn')")
    factor = rope.factor
    if rope.mscale and rope.mscale_all_dim:
        attention_factor = float(yarn_get_mscale(factor, rope.mscale) / yarn_get_mscale(factor, rope.mscale_all_dim))
    else:
        attention_factor = yarn_get_mscale(factor)
    beta_fast = rope.beta_fast or 32.0  # HF: `get("beta_fast") or 32`
    beta_slow = rope.beta_slow or 1.0

    def correction_dim(num_rotations: float) -> float:
        orig = rope.original_max_position_embeddings
        return (dim * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # HF: prevent a division by zero (a hard switch between the two regimes)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base**exponents
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # share of the original (extrapolated) frequency
    return interpolation * (1 - keep) + extrapolation * keep, attention_factor


class RotaryEmbedding(nn.Module):
    """cos/sin [T, R/2] for given positions; the table is computed lazily (no buffers).

    No state is stored in the module's state_dict, so a model built on the `meta` device and
    `to_empty()`'d works: the inverse frequencies are computed on first use for each device.
    """

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.rope = args.rope
        self.dim = args.qk_rope_head_dim
        self._inv_freq: dict[torch.device, torch.Tensor] = {}
        self._scale: float | None = None
        # per-forward state in a plain dict (nn.Module attribute writes cost µs): "last" (positions, cos, sin),
        # "rows" (positions, cos2, sin2, evens|odds, odds|evens), "table" (cos2 [P,R], sin2 [P,R], ids, ids)
        self._cache: dict[str, tuple[torch.Tensor, ...]] = {}
        self._cpu: Callable[..., None] | None = None  # set_kernel("cpu")

    def set_kernel(self, kernel: str) -> None:
        """"cpu": `rotate_` runs as one C call (raymoe_kernels.cpu.rope_cpu, the same bits) on fp32 CPU tensors
        once `prepare` made the table; anything else: torch."""
        if kernel == "cpu":
            from raymoe_kernels.cpu import rope_cpu

            self._cpu = rope_cpu
        else:
            self._cpu = None

    def _freqs(self, device: torch.device) -> torch.Tensor:
        inv = self._inv_freq.get(device)
        if inv is None:
            with torch.device("cpu"):  # independent of any default-device context (e.g. meta)
                cpu_inv, self._scale = rope_inv_freq(self.rope, self.dim)
            inv = self._inv_freq[device] = cpu_inv.to(device)
        return inv

    @property
    def attention_scaling(self) -> float:
        if self._scale is None:
            self._scale = rope_inv_freq(self.rope, self.dim)[1]
        return self._scale

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] int -> (cos, sin), each [T, R/2] fp32 with the YaRN scale applied.

        The result for the last `positions` tensor is kept: queries and keys of every layer rotate
        by the same positions in one forward pass (the decoder shares one instance across layers).
        """
        last = self._cache.get("last")
        if last is not None and last[0] is positions:
            return last[1], last[2]
        freqs = positions[:, None].float() * self._freqs(positions.device)  # [T, R/2]
        scale = self.attention_scaling
        cos, sin = freqs.cos() * scale, freqs.sin() * scale
        self._cache["last"] = (positions, cos, sin)
        return cos, sin

    def _rotation_rows(self, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """cos/sin [.., R/2] -> ([cos|cos], [-sin|sin], evens|odds ids, odds|evens ids)."""
        idx = torch.arange(2 * cos.shape[-1], device=cos.device)
        return (torch.cat([cos, cos], -1).to(dtype), torch.cat([-sin, sin], -1).to(dtype),
                torch.cat([idx[0::2], idx[1::2]]), torch.cat([idx[1::2], idx[0::2]]))

    def prepare(self, max_positions: int, device: torch.device | str, dtype: torch.dtype) -> None:
        """Precompute the rotation rows of positions [0, max_positions) (the engine: its context limit),
        so a forward gathers its positions' rows (2 ops) instead of computing them (~12). Each row is
        the same elementwise computation, so the values are the same bits. Positions must stay below
        `max_positions` (the engine's scheduler guarantees it)."""
        cos, sin = self(torch.arange(max_positions, device=device))
        self._cache.clear()
        self._cache["table"] = self._rotation_rows(cos, sin, dtype)

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """`apply_rope(x, *self(positions))` in 5 ops instead of ~13 (the decode hot path calls it once
        per layer): out = x[evens|odds]·[cos|cos] + x[odds|evens]·[-sin|sin], HF's own
        `q·cos + rotate_half(q)·sin` on the de-interleaved layout, so the values are the same bits."""
        rows = self._cache.get("rows")
        if rows is None or rows[0] is not positions or rows[1].dtype != x.dtype:
            table = self._cache.get("table")
            if table is not None and table[0].dtype == x.dtype and table[0].device == x.device:
                rows = (positions, table[0].index_select(0, positions), table[1].index_select(0, positions),
                        table[2], table[3])
            else:
                rows = (positions, *self._rotation_rows(*self(positions), x.dtype))
            self._cache["rows"] = rows
        _, cos2, sin2, deint, swapped = rows
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (cos2.shape[-1],)
        return x.index_select(-1, deint) * cos2.view(shape) + x.index_select(-1, swapped) * sin2.view(shape)


    def rotate_(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> bool:
        """Rotate q [T, H, R] and k [T, R] in place, as `rotate` would (same bits), with the C kernel: True, or
        False (nothing changed) where it does not apply (not set, no fp32 CPU table, other dtypes)."""
        table = self._cache.get("table")
        if (self._cpu is None or table is None or q.dtype is not torch.float32 or k.dtype is not torch.float32
                or not q.is_cpu or table[0].dtype is not torch.float32 or not table[0].is_cpu
                or positions.dtype is not torch.long):
            return False
        self._cpu(q, k, positions, table[0], table[1])
        return True


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0,x1),(x2,x3),... of x [T, ..., R] by cos/sin [T, R/2].

    Like HF's `apply_rotary_pos_emb_interleave`, the result is laid out de-interleaved:
    [rotated evens | rotated odds]. That is a fixed permutation of DeepSeek's complex-pair layout,
    applied to queries and keys alike, so every q·k dot product is unchanged (and the cache stores
    k_pe in this layout).
    """
    shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[-1],)
    cos = cos.to(x.dtype).view(shape)
    sin = sin.to(x.dtype).view(shape)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def gemm_layout(w: torch.Tensor) -> torch.Tensor:
    """A linear weight [N, K] laid out for `F.linear` on this device: on CPU the same matrix stored
    column-major (a transposed view of a contiguous [K, N]), which F.linear runs as a plain GEMM; a
    row-major weight takes a ~3x slower path at 2-32 rows (16x64 by 512x64: 30 vs 9 µs, torch 2.13,
    measured 2026-11). Unchanged on other devices, and where the values already have that layout."""
    if w.device.type != "cpu" or w.dim() != 2 or w.stride(0) == 1:
        return w
    return w.t().contiguous().t()


def set_gemm_layout(module: nn.Module) -> None:
    """Re-lay `module.weight` (a linear's [N, K]) with `gemm_layout`: same values, same parameter name."""
    w = gemm_layout(module.weight.data)
    if w is not module.weight.data:
        module.weight = nn.Parameter(w, requires_grad=False)


def stack_linears(*linears: nn.Linear) -> torch.Tensor:
    """One weight for linears that read the same input: their [N_i, K] weights stacked along N (in the
    GEMM layout), each linear's parameter becoming its rows' view, so one F.linear computes them all
    and `load_state_dict` still writes through the parameters into the stack."""
    stacked = gemm_layout(torch.cat([lin.weight for lin in linears]))
    start = 0
    for lin in linears:
        lin.weight = nn.Parameter(stacked[start:start + lin.out_features], requires_grad=False)
        start += lin.out_features
    return stacked


def make_linear(in_features: int, out_features: int, *, quantized: bool, group_size: int,
                dtype: torch.dtype | None) -> nn.Module:
    """`nn.Linear(bias=False)`, or the packed INT4 `Int4Linear` when `quantized`."""
    if quantized:
        from raymoe.quant.int4 import Int4Linear  # lazy: only INT4 checkpoints need it

        return Int4Linear(in_features, out_features, group_size=group_size,
                          dtype=dtype if dtype is not None else torch.bfloat16)
    return nn.Linear(in_features, out_features, bias=False, dtype=dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Dense layers, shared experts and routed experts."""

    def __init__(self, dim: int, inter: int, *, quantized: bool = False, group_size: int = 32,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.gate_proj = make_linear(dim, inter, quantized=quantized, group_size=group_size, dtype=dtype)
        self.up_proj = make_linear(dim, inter, quantized=quantized, group_size=group_size, dtype=dtype)
        self.down_proj = make_linear(inter, dim, quantized=quantized, group_size=group_size, dtype=dtype)
        self._w13: torch.Tensor | None = None  # after fuse(): [gate; up] weights, one GEMM for both

    @torch.no_grad()
    def fuse(self) -> bool:
        """After loading: stack gate/up into one `[2I, D]` weight the two parameters then view (no extra
        memory), so the forward runs one GEMM instead of two. False (unchanged) for INT4 or meta weights."""
        self._w13 = None
        gate, up = self.gate_proj, self.up_proj
        if type(gate) is not nn.Linear or type(up) is not nn.Linear or gate.weight.is_meta:
            return False
        self._w13 = stack_linears(gate, up)
        set_gemm_layout(self.down_proj)
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w13 = self._w13
        if w13 is not None and self.gate_proj.weight.data_ptr() == w13.data_ptr():  # still fused (not moved)
            gate, up = F.linear(x, w13).chunk(2, dim=-1)
            return self.down_proj.forward(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
