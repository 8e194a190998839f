"""fused_moe_w4a16 at K2 decode shapes vs its torch reference: `python -m raymoe_kernels.bench.bench_moe_w4a16`.

384 experts, top-8, D=7168, I=2048, INT4 group 32 with bf16 scales (~9.5 GB of expert weights on the device).
Bytes counted: packed weights + scales of every expert that got a row, plus activations in/out and the [M, I]
intermediate; decode is weight-read bound, so bytes/s against the HBM peak is the figure of merit.
Takes ~1 minute on an H200, most of it the reference at 256 tokens.
"""

from __future__ import annotations

import torch

from raymoe_kernels.bench import bandwidth_cells, peak_bytes_per_s, print_table, require_cuda, time_ms
from raymoe_kernels.moe_w4a16 import fused_moe_w4a16, fused_moe_w4a16_ref
from raymoe_kernels.permute import moe_permute

NUM_EXPERTS, TOP_K, HIDDEN_SIZE, INTER_SIZE, GROUP = 384, 8, 7168, 2048, 32
TOKENS = (1, 16, 256)


def _random_experts(device: torch.device):
    """Random INT4 weights; scales ~1/(std(q) sqrt(fan_in)) keep activations O(1) so the error check means something."""

    def packed(rows, cols):
        return torch.randint(-(2**31), 2**31 - 1, (NUM_EXPERTS, rows, cols // 8), dtype=torch.int32, device=device)

    def scales(rows, cols):
        scale = 1.0 / (4.6 * cols**0.5)
        return torch.empty(NUM_EXPERTS, rows, cols // GROUP, dtype=torch.bfloat16, device=device).uniform_(
            0.5 * scale, 1.5 * scale
        )

    return (
        packed(2 * INTER_SIZE, HIDDEN_SIZE),
        scales(2 * INTER_SIZE, HIDDEN_SIZE),
        packed(HIDDEN_SIZE, INTER_SIZE),
        scales(HIDDEN_SIZE, INTER_SIZE),
    )


def main() -> None:
    device = require_cuda()
    name, peak = peak_bytes_per_s(device)
    weights = _random_experts(device)
    bytes_per_expert = sum(w[0].numel() * w.element_size() for w in weights)
    rows = []
    for num_tokens in TOKENS:
        topk_ids = torch.rand(num_tokens, NUM_EXPERTS, device=device).topk(TOP_K, dim=1).indices
        sorted_ids, counts, offsets, _ = moe_permute(topk_ids, NUM_EXPERTS)
        x = torch.randn(num_tokens, HIDDEN_SIZE, device=device, dtype=torch.bfloat16)
        x_sorted = x[sorted_ids.long() // TOP_K]  # [M, D]
        num_rows, num_active = x_sorted.shape[0], int((counts > 0).sum())
        num_bytes = num_active * bytes_per_expert + num_rows * (2 * HIDDEN_SIZE + 3 * INTER_SIZE) * 2

        inputs = (x_sorted, offsets, *weights)
        kernel_ms = time_ms(lambda inputs=inputs: fused_moe_w4a16(*inputs), warmup=5, iters=20)
        ref_ms = time_ms(lambda inputs=inputs: fused_moe_w4a16_ref(*inputs), warmup=1, iters=3)
        out, ref = fused_moe_w4a16(*inputs).float(), fused_moe_w4a16_ref(*inputs).float()
        rel_err = ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
        rows.append(
            [
                num_tokens,
                num_rows,
                num_active,
                f"{num_bytes / 1e6:.0f}",
                f"{kernel_ms * 1e3:.1f}",
                *bandwidth_cells(num_bytes, kernel_ms, peak),
                f"{ref_ms * 1e3:.0f}",
                f"{ref_ms / kernel_ms:.1f}x",
                f"{rel_err:.1e}",
            ]
        )
    print_table(
        f"fused_moe_w4a16 bf16, E={NUM_EXPERTS} K={TOP_K} D={HIDDEN_SIZE} I={INTER_SIZE} on {name} "
        f"(peak {peak / 1e12:.2f} TB/s)"
        if peak
        else f"fused_moe_w4a16 on {name} (peak unknown: set RAYMOE_BENCH_PEAK_TBPS)",
        ["tokens", "rows", "experts", "MB", "triton us", "GB/s", "% peak", "torch ref us", "ref/triton", "max rel err"],
        rows,
    )


if __name__ == "__main__":
    main()
