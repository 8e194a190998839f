"""Weight quantization: checkpoint formats, their pack/dequant math, and the modules that run them.

``int4``: compressed-tensors ``pack-quantized`` INT4 weight-only (K2 routed experts, group 32, symmetric).
"""

from raymoe.quant.int4 import (
    Int4Linear,
    dequantize_int4,
    int4_backend,
    memory_ratio,
    pack_int4,
    quantize_int4,
    unpack_int4,
)

__all__ = [
    "Int4Linear",
    "dequantize_int4",
    "int4_backend",
    "memory_ratio",
    "pack_int4",
    "quantize_int4",
    "unpack_int4",
]
