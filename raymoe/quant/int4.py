"""INT4 weight-only quantization for routed experts (compressed-tensors ``pack-quantized``, symmetric, group 32).

Owns the checkpoint format of K2's routed-expert linears (K2_FACTS §1.3-§1.5): the ``weight_packed`` /
``weight_scale`` / ``weight_shape`` triple, its pack/unpack/dequant math, and ``Int4Linear``, which loads
that triple as buffers and, after ``finalize()``, runs it through PyTorch's CPU int4 kernel
(``aten._weight_int4pack_mm_for_cpu``) or a dequantize-then-matmul fallback.
Sits under ``experts/`` (expert compute) and beside the checkpoint loader: loader -> Int4Linear -> ExpertsCompute.

Shape legend: O out_features, I in_features, G = I / group_size scale groups, P = ceil(I / 8) packed int32
words per row, M activation rows.
"""

from __future__ import annotations

import math
import sys
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Int4Linear",
    "dequantize_int4",
    "int4_backend",
    "memory_ratio",
    "pack_int4",
    "quantize_int4",
    "unpack_int4",
]

PACK_FACTOR = 8  # int4 codes per int32 word
QMIN, QMAX = -8, 7  # signed int4 range; stored nibble = q + 8 (offset binary, compressed-tensors)
# K2's QAT uses only -7..7 (scale = absmax / 7; K2_FACTS §1.3). compressed-tensors' own minmax math divides by
# (qmax - qmin) / 2 = 7.5 instead, which can emit -8; we follow the checkpoint we serve, not the library.
QAT_QMAX = 7
# Limits of aten._weight_int4pack_mm_for_cpu (torch 2.13, probed on this CPU): qGroupSize in {32, 64, 128, 256},
# K % qGroupSize == 0, N % 16 == 0 (we pad N), A 2-D and contiguous, scales_and_zeros dtype == A dtype.
KERNEL_GROUP_SIZES = (32, 64, 128, 256)
KERNEL_N_ALIGN = 16
_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

Backend = Literal["cpu_int4pack", "dequant"]


def _has_cpu_kernel() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"
    )


def int4_backend(device: str | torch.device = "cpu", group_size: int = 32) -> Backend:
    """Which matmul path ``Int4Linear.finalize()`` picks for weights on ``device`` with ``group_size``.

    ``"cpu_int4pack"``: PyTorch's fused CPU int4 GEMM (AVX512/AVX2). ``"dequant"``: unpack + scale to the
    compute dtype on every call, then a dense matmul (any device; about 80x slower on CPU at M=1).
    """
    if torch.device(device).type == "cpu" and group_size in KERNEL_GROUP_SIZES and _has_cpu_kernel():
        return "cpu_int4pack"
    return "dequant"


def memory_ratio(out_features: int, in_features: int, group_size: int = 32, scale_bytes: int = 2) -> float:
    """Bytes of a BF16 [O, I] weight over bytes of its packed INT4 + scales form (3.56 at group 32, bf16 scales)."""
    bf16 = 2 * out_features * in_features
    packed = out_features * math.ceil(in_features / PACK_FACTOR) * 4
    int4 = packed + out_features * (in_features // group_size) * scale_bytes
    return bf16 / int4


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int8 codes in [-8, 7] into int32 words, bit-identical to compressed-tensors ``pack_to_int32(q, 4)``.

    Nibble = q + 8; element k of each run of 8 input columns sits at bits [4k, 4k+4), LSB first. When I % 8 != 0
    the last word is padded with nibble 0, as the library does (pads after adding the offset).

    Args:
        q: int8 [O, I].

    Returns:
        int32 [O, ceil(I / 8)].

    Raises:
        ValueError: q is not a 2-D int8 tensor or holds values outside [-8, 7].
    """
    if q.dtype != torch.int8 or q.dim() != 2:
        raise ValueError(f"pack_int4: q must be a 2-D int8 tensor, got {q.dim()}-D {q.dtype}")
    if q.numel() and (int(q.min()) < QMIN or int(q.max()) > QMAX):
        raise ValueError(f"pack_int4: q values must lie in [{QMIN}, {QMAX}], got [{int(q.min())}, {int(q.max())}]")
    rows, cols = q.shape
    num_words = math.ceil(cols / PACK_FACTOR)
    nib = q.to(torch.int64) + 8  # [O, I]
    nib = F.pad(nib, (0, num_words * PACK_FACTOR - cols))  # [O, 8P], pad nibble 0
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=q.device)
    words = (nib.view(rows, num_words, PACK_FACTOR) << shifts).sum(-1)  # [O, P] in [0, 2^32): disjoint bits
    words = torch.where(words >= 2**31, words - 2**32, words)  # reinterpret as two's-complement int32
    return words.to(torch.int32)


def unpack_int4(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of ``pack_int4``; equal to compressed-tensors ``unpack_from_int32(packed, 4, (O, I))``.

    Args:
        packed: int32 [O, ceil(I / 8)].
        in_features: I, the unpadded column count.

    Returns:
        int8 [O, I] in [-8, 7].

    Raises:
        ValueError: packed is not 2-D int32 or its width does not match ceil(in_features / 8).
    """
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise ValueError(f"unpack_int4: packed must be a 2-D int32 tensor, got {packed.dim()}-D {packed.dtype}")
    want = math.ceil(in_features / PACK_FACTOR)
    if in_features < 1 or packed.shape[1] != want:
        raise ValueError(f"unpack_int4: packed width must be ceil({in_features} / 8) = {want}, got {packed.shape[1]}")
    rows = packed.shape[0]
    if sys.byteorder == "little" or packed.device.type != "cpu":
        # Bytes of a little-endian word hold nibbles (0, 1), (2, 3), ... low half first: 10x faster than shifting.
        b = packed.contiguous().view(torch.uint8)  # [O, 4P]
        nib = torch.stack((b & 0xF, b >> 4), -1).view(rows, 8 * packed.shape[1])  # [O, 8P]
        return nib[:, :in_features].view(torch.int8) - 8
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    # Arithmetic >> sign-extends words whose top nibble is >= 8; the & 0xF drops those bits (K2_FACTS §1.5).
    nib = (packed.unsqueeze(-1) >> shifts) & 0xF  # [O, P, 8]
    return (nib.flatten(1)[:, :in_features] - 8).to(torch.int8)


def quantize_int4(
    w: torch.Tensor, group_size: int = 32, scale_dtype: torch.dtype = torch.bfloat16
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric per-group INT4 in K2's QAT convention: scale = absmax / 7, q = round(w / scale) in [-7, 7].

    The scale is rounded to ``scale_dtype`` first and q is computed against that stored scale (in fp32), so
    ``dequantize_int4`` reproduces exactly what was quantized. Given the same scale, the codes equal
    compressed-tensors' ``quantize`` on an fp32 weight (round half to even, clamp to [-8, 7]). All-zero groups get
    scale ``finfo(scale_dtype).eps`` like the library (no 0/0) and codes 0.

    Args:
        w: float [O, I], I divisible by group_size.
        group_size: input columns per scale.
        scale_dtype: dtype of the stored scale (bf16 in K2 checkpoints).

    Returns:
        (weight_packed int32 [O, ceil(I/8)], weight_scale scale_dtype [O, G], weight_shape int64 [2]).

    Raises:
        ValueError: bad rank/dtype, I not divisible by group_size, or non-finite weights.
    """
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"quantize_int4: w must be a 2-D float tensor, got {w.dim()}-D {w.dtype}")
    rows, cols = w.shape
    if group_size < 1 or cols % group_size:
        raise ValueError(f"quantize_int4: in_features ({cols}) must be divisible by group_size ({group_size})")
    wg = w.float().view(rows, cols // group_size, group_size)  # [O, G, gs]
    if not torch.isfinite(wg).all():
        raise ValueError("quantize_int4: w holds NaN or inf")
    scale = (wg.abs().amax(-1) / QAT_QMAX).to(scale_dtype)  # [O, G]
    scale = torch.where(scale == 0, torch.finfo(scale_dtype).eps, scale)
    q = torch.round(wg / scale.float().unsqueeze(-1)).clamp_(QMIN, QMAX).to(torch.int8)  # [O, G, gs]
    shape = torch.tensor([rows, cols], dtype=torch.int64, device=w.device)
    return pack_int4(q.view(rows, cols)), scale, shape


def dequantize_int4(
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_shape: torch.Tensor | tuple[int, int],
    group_size: int = 32,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """W[o, i] = q[o, i] * scale[o, i // group_size], computed exactly in fp32 then rounded once to ``dtype``.

    One rounding of the exact product is what compressed-tensors' decompress produces for bf16 scales, so the
    result is bit-identical to the library's decompressed weight in the scale dtype.

    Returns:
        dtype [O, I].

    Raises:
        ValueError: weight_scale shape is not [O, I / group_size].
    """
    rows, cols = (int(v) for v in weight_shape)
    groups = cols // group_size
    if cols % group_size or tuple(weight_scale.shape) != (rows, groups):
        raise ValueError(f"dequantize_int4: weight_scale must have shape ({rows}, {cols} / {group_size}), "
                         f"got {tuple(weight_scale.shape)}")
    q = unpack_int4(weight_packed, cols).view(rows, groups, group_size)  # [O, G, gs]
    # |q| <= 8 times a scale with <= 24 significant bits is exact in fp32, and torch's CPU/CUDA bf16/fp16 multiply
    # computes in fp32 and rounds once, so the product in the wider of (scale, output) dtype is already the exact
    # product rounded once to dtype. Saves the fp32 temporary (52 -> ~20 ms for 2048x7168 bf16).
    compute = torch.promote_types(weight_scale.dtype, dtype)
    return (q.to(compute) * weight_scale.to(compute).unsqueeze(-1)).view(rows, cols).to(dtype)


class Int4Linear(nn.Module):
    """y = x @ W.T for a pack-quantized INT4 weight (no bias: K2 expert linears have none).

    Construct (possibly on ``meta``), load ``weight_packed`` / ``weight_scale`` / ``weight_shape`` through
    ``load_state_dict``, then call ``finalize()`` once. On the ``cpu_int4pack`` path finalize replaces the checkpoint
    buffers with the kernel's ISA-specific layout (so the state_dict then holds only ``weight_shape``); the
    ``dequant`` path keeps them. ``dtype`` is both the scale dtype and the compute dtype: activations are cast to it
    and the result is cast back to ``x.dtype`` (W4A16 semantics for the bf16 default).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group_size: int = 32,
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"Int4Linear: in_features ({in_features}) and out_features ({out_features}) must be >= 1")
        if group_size < 1 or in_features % group_size:
            raise ValueError(f"Int4Linear: in_features ({in_features}) must be divisible by group_size ({group_size})")
        if dtype not in _KERNEL_DTYPES:
            raise ValueError(f"Int4Linear: dtype {dtype} is not supported (supported: {_KERNEL_DTYPES})")
        self.in_features, self.out_features, self.group_size, self.dtype = in_features, out_features, group_size, dtype
        self.backend: Backend | None = None  # set by finalize()
        # Keep the compressed-tensors buffers as loaded (the `dequant` path): a fused kernel that reads
        # that layout (raymoe_kernels.fused_moe_w4a16) then stacks them; set before loading.
        self.keep_checkpoint_layout = False
        self._num_pad_rows = 0
        packed_cols = math.ceil(in_features / PACK_FACTOR)
        self.register_buffer("weight_packed", torch.zeros(out_features, packed_cols, dtype=torch.int32, device=device))
        self.register_buffer("weight_scale", torch.zeros(out_features, in_features // group_size, dtype=dtype,
                                                         device=device))
        self.register_buffer("weight_shape", torch.tensor([out_features, in_features], dtype=torch.int64,
                                                          device=device))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"dtype={self.dtype}, backend={self.backend}")

    @classmethod
    def from_float(
        cls, weight: torch.Tensor, group_size: int = 32, dtype: torch.dtype = torch.bfloat16, finalize: bool = True
    ) -> Int4Linear:
        """Quantize a float [O, I] weight with ``quantize_int4`` into a (by default finalized) module."""
        packed, scale, shape = quantize_int4(weight, group_size, scale_dtype=dtype)
        mod = cls(weight.shape[1], weight.shape[0], group_size, dtype, device=weight.device)
        mod.load_state_dict({"weight_packed": packed, "weight_scale": scale, "weight_shape": shape})
        return mod.finalize() if finalize else mod

    def _check_loaded(self) -> None:
        out, inp, gs = self.out_features, self.in_features, self.group_size
        checks = (
            ("weight_packed", self.weight_packed, (out, math.ceil(inp / PACK_FACTOR)), (torch.int32,)),
            ("weight_scale", self.weight_scale, (out, inp // gs), _KERNEL_DTYPES),
            ("weight_shape", self.weight_shape, (2,), (torch.int32, torch.int64)),
        )
        for name, t, shape, dtypes in checks:
            if tuple(t.shape) != shape or t.dtype not in dtypes:
                raise ValueError(f"Int4Linear.finalize: {name} expected shape {shape} dtype in {dtypes}, "
                                 f"got shape {tuple(t.shape)} dtype {t.dtype}")
        if self.weight_packed.device.type == "meta":
            raise ValueError("Int4Linear.finalize: weights are on the meta device; load them first")
        got = tuple(int(v) for v in self.weight_shape)
        if got != (out, inp):
            raise ValueError(f"Int4Linear.finalize: weight_shape expected values {(out, inp)}, got {got}")

    @torch.no_grad()
    def finalize(self) -> Int4Linear:
        """Validate the loaded buffers and convert them to the fastest available layout (idempotent).

        Raises:
            ValueError: a buffer has the wrong shape/dtype, weight_shape disagrees with the module, or the
                weights are still on ``meta``.
        """
        if self.backend is not None:
            return self
        self._check_loaded()
        self.weight_scale = self.weight_scale.to(self.dtype)
        backend = "dequant" if self.keep_checkpoint_layout else int4_backend(self.weight_packed.device,
                                                                              self.group_size)
        if backend == "cpu_int4pack":
            # Our nibble (q + 8) is the kernel's unsigned code; its dequant is (code - 8) * scale + zero, so zero = 0
            # gives q * scale exactly (checked in tests/quant against dequantize_int4).
            codes = unpack_int4(self.weight_packed, self.in_features).to(torch.int32) + 8  # [O, I] in [0, 15]
            self._num_pad_rows = -self.out_features % KERNEL_N_ALIGN
            codes = F.pad(codes, (0, 0, 0, self._num_pad_rows), value=8)  # [N, I], pad rows decode to 0
            scales = F.pad(self.weight_scale, (0, 0, 0, self._num_pad_rows)).t()  # [G, N]
            # The zeros double the resident scale bytes (3.2x vs bf16 instead of 3.56x at group 32), but rebuilding
            # this [G, N, 2] tensor per call costs 0.54 ms next to a 0.80 ms kernel (2048x7168, M=1, 2 cores).
            self.register_buffer("kernel_weight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2),
                                 persistent=False)  # uint8 [N, I / 2], layout depends on the CPU ISA
            self.register_buffer("kernel_scales_and_zeros", torch.stack([scales, torch.zeros_like(scales)], -1)
                                 .contiguous(), persistent=False)  # [G, N, 2]
            self.weight_packed = None
            self.weight_scale = None
        self.backend = backend
        return self

    def nbytes(self) -> int:
        """Resident bytes of weight data (packed codes + scales, incl. the kernel's zeros), excluding weight_shape."""
        return sum(b.numel() * b.element_size() for n, b in self.named_buffers(recurse=False) if n != "weight_shape")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., I] -> [..., O] in x.dtype (computed in self.dtype)."""
        if self.backend is None:
            raise RuntimeError("Int4Linear: call finalize() after loading weights and before forward()")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Int4Linear: x last dim expected {self.in_features}, got {x.shape[-1]}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(self.dtype).contiguous()  # [M, I]
        if self.backend == "cpu_int4pack":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2, self.kernel_weight, self.group_size, self.kernel_scales_and_zeros
            )  # [M, N]
            if self._num_pad_rows:
                y = y[:, : self.out_features]
        else:
            w = dequantize_int4(self.weight_packed, self.weight_scale, (self.out_features, self.in_features),
                                self.group_size, dtype=self.dtype)  # [O, I]
            y = F.linear(x2, w)
        return y.reshape(*lead, self.out_features).to(x.dtype)
