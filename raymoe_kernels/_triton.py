"""Optional Triton import shared by every kernel module.

Triton is an optional dependency: a CPU-only install must still be able to import `raymoe_kernels` and use
the `*_ref` torch references. Kernel modules write `@jit` instead of `@triton.jit`; without Triton it leaves the
function undecorated (it is never launched, because every launcher calls `require_triton` first).

Kernels annotate constexprs as `tl.constexpr` under `from __future__ import annotations`, so the annotation is
the string "tl.constexpr", which Triton (compiler and interpreter) recognises and Python never evaluates.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: references still work, launchers raise
    triton = None
    tl = None

HAS_TRITON = triton is not None
# triton.jit picks the interpreter at decoration time, so what matters is the env when this package was imported.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on", "y")
# The interpreter's tl.dot returns garbage for bf16 operands (triton 3.9 on CPU: errors ~1e10), so it gets fp32
# operands instead: exact for 16-bit inputs (their products fit in fp32), as the tensor cores compute them.
_UPCAST_DOT = tl.constexpr(INTERPRETED) if HAS_TRITON else INTERPRETED


def jit(fn):
    return triton.jit(fn) if HAS_TRITON else fn


@jit
def dot_acc(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b; IEEE for fp32 inputs, which NVIDIA would otherwise run as TF32 (10-bit mantissa)."""
    if _UPCAST_DOT:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


def is_available() -> bool:
    """Whether the Triton launchers can run here: Triton installed and a CUDA device or the interpreter."""
    return HAS_TRITON and (INTERPRETED or torch.cuda.is_available())


def require_triton(op: str, *tensors: torch.Tensor) -> None:
    """Raise a clear RuntimeError when `op`'s kernel cannot run on these tensors."""
    if not HAS_TRITON:
        raise RuntimeError(f"{op}: triton is not installed; use {op}_ref or `pip install triton`")
    if not INTERPRETED and any(t.device.type != "cuda" for t in tensors):
        raise RuntimeError(
            f"{op}: tensors must be on a CUDA device, or set TRITON_INTERPRET=1 before importing raymoe_kernels "
            f"to run the kernel in the Triton interpreter on CPU"
        )


def next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()
