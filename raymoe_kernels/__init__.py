"""Triton kernels for the decode hot path; imports torch (+ triton when installed), never `raymoe`.

Each op has a launcher `<op>`, a torch reference `<op>_ref` (fp32 math, usable without triton) and its module's
`is_available()`. Launchers raise RuntimeError when triton is missing or tensors are on CPU without
TRITON_INTERPRET=1 (which must be set before this package is imported).

  permute.py     moe_permute / moe_unpermute        [Gate] -> permute -> experts -> unpermute
  moe_w4a16.py   fused_moe_w4a16 (INT4 compressed-tensors experts, SwiGLU fused)
  mla_decode.py  mla_decode (absorbed MLA over the paged latent cache, split-KV)
  cpu.py         mla_decode_cpu: the same op in C for CPU engines (built on first use with the machine's C
                 compiler; import raymoe_kernels.cpu, it is not re-exported here)
  bench/         CUDA-only benchmarks at K2 decode shapes: python -m raymoe_kernels.bench.bench_<op>
"""

from raymoe_kernels._triton import is_available
from raymoe_kernels.mla_decode import mla_decode, mla_decode_ref
from raymoe_kernels.moe_w4a16 import dequant_int4, fused_moe_w4a16, fused_moe_w4a16_ref, pack_int4
from raymoe_kernels.permute import moe_permute, moe_permute_ref, moe_unpermute, moe_unpermute_ref

__all__ = [
    "dequant_int4",
    "fused_moe_w4a16",
    "fused_moe_w4a16_ref",
    "is_available",
    "mla_decode",
    "mla_decode_ref",
    "moe_permute",
    "moe_permute_ref",
    "moe_unpermute",
    "moe_unpermute_ref",
    "pack_int4",
]
