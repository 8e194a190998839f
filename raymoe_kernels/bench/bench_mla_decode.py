"""mla_decode at K2 shapes vs its torch reference: `python -m raymoe_kernels.bench.bench_mla_decode`.

C=512, R=64, H=64 heads, bf16 paged cache with 64-token pages scattered at random, sequence lengths 1k-32k.
Bytes counted: each sequence's cache once (seq_len * (C+R) * 2) plus queries and outputs; the kernel re-reads a
KV tile once per head block, and those re-reads hit L2, so this is the useful-bytes rate. Takes well under a minute.
"""

from __future__ import annotations

import torch

from raymoe_kernels.bench import bandwidth_cells, peak_bytes_per_s, print_table, require_cuda, time_ms
from raymoe_kernels.mla_decode import mla_decode, mla_decode_ref

LAT_SIZE, ROPE_SIZE, NUM_HEADS, BLOCK_SIZE = 512, 64, 64, 64
SOFTMAX_SCALE = 0.144680  # K2-Thinking, K2_FACTS §2.2
# (label, per-sequence lengths)
CASES = [
    *((f"B=1 L={n}", [n]) for n in (1024, 4096, 16384, 32768)),
    *((f"B=32 L={n}", [n] * 32) for n in (1024, 8192, 32768)),
    ("B=16 L=1k..32k", torch.linspace(1024, 32768, 16).long().tolist()),
]


def _case_inputs(seq_lens: list[int], device: torch.device):
    blocks_per_seq = -(-max(seq_lens) // BLOCK_SIZE)
    num_blocks = len(seq_lens) * blocks_per_seq
    kv_cache = torch.randn(num_blocks, BLOCK_SIZE, LAT_SIZE + ROPE_SIZE, device=device, dtype=torch.bfloat16)
    block_tables = torch.randperm(num_blocks, device=device).view(len(seq_lens), blocks_per_seq).int()
    q_lat = torch.randn(len(seq_lens), NUM_HEADS, LAT_SIZE, device=device, dtype=torch.bfloat16)
    q_pe = torch.randn(len(seq_lens), NUM_HEADS, ROPE_SIZE, device=device, dtype=torch.bfloat16)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    return q_lat, q_pe, kv_cache, block_tables, seq_lens_t, SOFTMAX_SCALE


def main() -> None:
    device = require_cuda()
    name, peak = peak_bytes_per_s(device)
    rows = []
    for label, seq_lens in CASES:
        inputs = _case_inputs(seq_lens, device)
        num_bytes = (
            sum(seq_lens) * (LAT_SIZE + ROPE_SIZE) + len(seq_lens) * NUM_HEADS * (2 * LAT_SIZE + ROPE_SIZE)
        ) * 2
        kernel_ms = time_ms(lambda inputs=inputs: mla_decode(*inputs), warmup=5, iters=20)
        ref_ms = time_ms(lambda inputs=inputs: mla_decode_ref(*inputs), warmup=1, iters=5)
        out, ref = mla_decode(*inputs).float(), mla_decode_ref(*inputs).float()
        rel_err = ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
        rows.append(
            [
                label,
                f"{num_bytes / 1e6:.1f}",
                f"{kernel_ms * 1e3:.1f}",
                *bandwidth_cells(num_bytes, kernel_ms, peak),
                f"{ref_ms * 1e3:.0f}",
                f"{ref_ms / kernel_ms:.1f}x",
                f"{rel_err:.1e}",
            ]
        )
        del inputs
    print_table(
        f"mla_decode bf16, C={LAT_SIZE} R={ROPE_SIZE} H={NUM_HEADS} page={BLOCK_SIZE} on {name} "
        f"(peak {peak / 1e12:.2f} TB/s)"
        if peak
        else f"mla_decode on {name} (peak unknown: set RAYMOE_BENCH_PEAK_TBPS)",
        ["case", "MB", "triton us", "GB/s", "% peak", "torch ref us", "ref/triton", "max rel err"],
        rows,
    )


if __name__ == "__main__":
    main()
