"""CPU benchmark of Int4Linear's matmul paths for one K2 routed-expert weight (run by hand, never in pytest).

Times, per activation row count M: the packed int4 kernel (``Int4Linear`` after ``finalize()``), a dense bf16
matmul against the same weight dequantized once (the memory-hungry baseline), and dequantize-on-every-call
(the ``dequant`` fallback). ``python -m raymoe.quant.bench`` prints a table with ratios to the packed path.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from raymoe.quant.int4 import Int4Linear, dequantize_int4, quantize_int4


def _time_ms(fn: Callable[[], torch.Tensor], min_s: float = 0.2, max_iters: int = 50) -> float:
    """Median wall time of one call in ms: the median shrugs off other processes on a shared 2-core box."""
    fn()  # warm-up (first-call allocations, kernel dispatch)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_iters and (len(times) < 5 or time.perf_counter() - start < min_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


@torch.no_grad()
def bench_int4(
    out_features: int = 2048, in_features: int = 7168, ms: tuple[int, ...] = (1, 8, 64), group_size: int = 32
) -> list[dict[str, float]]:
    """Time packed-kernel vs bf16 matmul vs dequant+matmul; print a table and return its rows (times in ms).

    Defaults are K2's gate/up expert projection ([2048, 7168], moe_intermediate_size x hidden_size).
    """
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(out_features, in_features, generator=gen) * 0.02  # [O, I]
    packed, scale, shape = quantize_int4(w, group_size)
    layer = Int4Linear.from_float(w, group_size)
    w_bf16 = dequantize_int4(packed, scale, shape, group_size, dtype=torch.bfloat16)  # [O, I]
    rows = []
    print(f"Int4Linear [{out_features}x{in_features}] g={group_size} backend={layer.backend} "
          f"threads={torch.get_num_threads()}")
    print(f"{'M':>5} {'int4 ms':>9} {'bf16 ms':>9} {'dequant ms':>11} {'bf16/int4':>10} {'dequant/int4':>13}")
    for m in ms:
        x = torch.randn(m, in_features, generator=gen).to(torch.bfloat16)  # [M, I]
        t_int4 = _time_ms(lambda x=x: layer(x))
        t_bf16 = _time_ms(lambda x=x: F.linear(x, w_bf16))
        t_deq = _time_ms(lambda x=x: F.linear(x, dequantize_int4(packed, scale, shape, group_size, torch.bfloat16)))
        rows.append({"m": m, "int4_ms": t_int4, "bf16_ms": t_bf16, "dequant_ms": t_deq})
        print(f"{m:>5} {t_int4:>9.3f} {t_bf16:>9.3f} {t_deq:>11.3f} {t_bf16 / t_int4:>10.2f} {t_deq / t_int4:>13.1f}")
    return rows


if __name__ == "__main__":
    bench_int4()
