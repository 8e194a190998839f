"""Shared helpers for the kernel benchmarks: CUDA-event timing, the device's HBM peak, a plain-text table.

Benchmarks are scripts (`python -m raymoe_kernels.bench.bench_<op>`), CUDA only, never collected by pytest.
Decode kernels are bandwidth bound, so each reports achieved bytes/s as a fraction of the device's HBM peak,
next to the time of the op's torch reference.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable, Sequence

import torch

# Datasheet HBM bandwidth, bytes/s, matched as substrings of torch.cuda.get_device_name(); first match wins,
# so the more specific names come first ("H100 NVL" before "H100", "H200" before "H20").
PEAK_BYTES_PER_S: list[tuple[str, float]] = [
    ("B200", 8.0e12),
    ("H200", 4.8e12),
    ("H100 NVL", 3.9e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),  # SXM5, reported as "NVIDIA H100 80GB HBM3"
    ("H20", 4.0e12),
    ("A100-SXM4-80GB", 2.039e12),
    ("A100", 1.555e12),
]
PEAK_ENV = "RAYMOE_BENCH_PEAK_TBPS"  # override, in TB/s, for devices missing from the table


def require_cuda() -> torch.device:
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA device")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: the interpreter would time Python, not the kernel")
    return torch.device("cuda")


def peak_bytes_per_s(device: torch.device) -> tuple[str, float | None]:
    """(device name, HBM peak in bytes/s, or None when unknown and not overridden)."""
    name = torch.cuda.get_device_name(device)
    if os.environ.get(PEAK_ENV):
        return name, float(os.environ[PEAK_ENV]) * 1e12
    return name, next((peak for key, peak in PEAK_BYTES_PER_S if key in name), None)


def time_ms(fn: Callable[[], object], warmup: int = 3, iters: int = 10, flush_bytes: int = 256 << 20) -> float:
    """Median milliseconds per call, each call timed alone with CUDA events after flushing L2.

    Flushing matters at decode sizes: a batch-1 1k-token MLA cache (1.2 MB) would otherwise be served from
    the 50-60 MB L2 and report more than the HBM peak.
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    scratch = torch.empty(flush_bytes, dtype=torch.uint8, device="cuda")
    events = []
    for _ in range(iters):
        scratch.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def bandwidth_cells(num_bytes: float, ms: float, peak: float | None) -> list[str]:
    """[achieved GB/s, % of peak] for `num_bytes` moved in `ms`."""
    achieved = num_bytes / (ms * 1e-3)
    return [f"{achieved / 1e9:.0f}", f"{100 * achieved / peak:.1f}" if peak else "n/a"]


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
