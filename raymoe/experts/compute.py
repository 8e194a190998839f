"""Expert compute of one shard: the routed experts it hosts for every MoE layer, and Σ w·expert(x).

[Dispatch] → **ExpertsCompute.forward(layer, rows, ids, weights)** → fp32 partial sums → [Combine]

`LoopExperts` is the reference: one `RoutedExperts` per layer under the checkpoint's own names
(`model.layers.{L}.mlp.experts.{e}.*`), so `load_weights` reads exactly this shard's tensors and
nothing else (INT4 stays packed in `Int4Linear`, or is dequantized when `int4_mode="dequant"`).
The sum is `RoutedExperts.partial_sum` (a padded grouped GEMM over stacked weights, or one GEMM per
expert present in the rows: INT4). Ids < 0 (pairs computed by another shard) are skipped. The sum stays fp32: the engine adds the shards' partials and rounds once.
A fused kernel can replace it behind the same interface.

Tensor letters: M rows (dispatched tokens), K experts per token, D model dim.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from raymoe.model.args import ModelArgs
from raymoe.model.loader import Checkpoint, load_weights
from raymoe.model.moe import RoutedExperts


class ExpertsCompute(ABC):
    """Σ over the (row, k) pairs routed to hosted experts of w · expert(x)."""

    @abstractmethod
    def forward(self, layer_id: int, x: torch.Tensor, topk_ids: torch.Tensor,
                topk_weights: torch.Tensor) -> torch.Tensor:
        """x [M,D], topk_ids [M,K] (-1 = not hosted here), topk_weights [M,K] -> [M,D] fp32."""

    @abstractmethod
    def expert_ids(self) -> dict[int, list[int]]:
        """{layer_id: hosted expert ids}."""


def _layer(args: ModelArgs, layer_id: int, expert_ids: Sequence[int], *, int4: bool,
           dtype: torch.dtype, kernel: str = "torch") -> RoutedExperts:
    q = args.quantization
    quantized = int4 and q is not None and q.is_quantized(f"model.layers.{layer_id}.mlp.experts.0.gate_proj")
    layer = RoutedExperts(args, expert_ids, quantized=quantized, dtype=dtype)
    layer.set_kernel(kernel)
    return layer


class LoopExperts(nn.Module, ExpertsCompute):
    """A shard's experts: module tree `model.layers.{L}.mlp.experts` = RoutedExperts (checkpoint names)."""

    def __init__(self, args: ModelArgs, experts: Mapping[int, Sequence[int]], *, int4: bool = False,
                 dtype: torch.dtype = torch.float32, kernel: str = "torch") -> None:
        super().__init__()
        self.args, self.int4, self.dtype, self.kernel = args, int4, dtype, kernel
        bad = [layer_id for layer_id in experts if not args.is_moe_layer(layer_id)]
        if bad:
            raise ValueError(f"layers {bad} are not MoE layers of this model")
        self.model = nn.Module()
        self.model.layers = nn.ModuleDict({
            str(layer_id): nn.ModuleDict({"mlp": nn.ModuleDict({"experts": _layer(args, layer_id, ids, int4=int4,
                                                                                  dtype=dtype, kernel=kernel)})})
            for layer_id, ids in experts.items()
        })

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, experts: Mapping[int, Sequence[int]], *, int4: bool,
                        dtype: torch.dtype, device: str | torch.device = "cpu", kernel: str = "torch") -> LoopExperts:
        """Build on `meta`, then read only these experts' tensors from `ckpt` onto `device`."""
        with torch.device("meta"):
            module = cls(ckpt.args, experts, int4=int4, dtype=dtype, kernel=kernel)
        module.to_empty(device=device)
        with torch.device(device):
            load_weights(module, ckpt)
        module.fuse()
        return module.eval()

    def fuse(self) -> None:
        """Stack each layer's unquantized expert weights for the grouped GEMM (see RoutedExperts.fuse)."""
        for key in self.model.layers:
            self.layer(int(key)).fuse()

    def layer(self, layer_id: int) -> RoutedExperts:
        return self.model.layers[str(layer_id)]["mlp"]["experts"]  # type: ignore[index,return-value]

    def expert_ids(self) -> dict[int, list[int]]:
        return {int(k): list(self.layer(int(k)).expert_ids) for k in self.model.layers}

    @torch.no_grad()
    def add_experts(self, ckpt: Checkpoint, experts: Mapping[int, Sequence[int]]) -> list[str]:
        """Host these experts too (EPLB replicas); existing ones are kept. Returns the tensor names read."""
        device = next(iter([*self.parameters(), *self.buffers()])).device
        loaded: list[str] = []
        for layer_id, ids in experts.items():
            have = set(self.layer(layer_id).expert_ids) if str(layer_id) in self.model.layers else set()
            new = sorted(set(ids) - have)
            if not new:
                continue
            with torch.device("meta"):
                fresh = _layer(self.args, layer_id, new, int4=self.int4, dtype=self.dtype, kernel=self.kernel)
            fresh.to_empty(device=device)
            holder = nn.Module()  # gives `fresh` its checkpoint names for load_weights
            holder.model = nn.Module()
            holder.model.layers = nn.ModuleDict({str(layer_id): nn.ModuleDict({"mlp": nn.ModuleDict(
                {"experts": fresh})})})
            with torch.device(device):
                loaded += load_weights(holder, ckpt)
            merged = _layer(self.args, layer_id, [], int4=self.int4, dtype=self.dtype, kernel=self.kernel)
            old = self.layer(layer_id) if have else None
            for e in sorted(have | set(new)):
                merged[str(e)] = (old if e in have else fresh)[str(e)]  # type: ignore[index]
            merged.expert_ids = sorted(have | set(new))
            merged.fuse()
            if str(layer_id) in self.model.layers:
                self.model.layers[str(layer_id)]["mlp"]["experts"] = merged  # type: ignore[index]
            else:
                self.model.layers[str(layer_id)] = nn.ModuleDict({"mlp": nn.ModuleDict({"experts": merged})})
        return loaded

    @torch.no_grad()
    def forward(self, layer_id: int, x: torch.Tensor, topk_ids: torch.Tensor,
                topk_weights: torch.Tensor) -> torch.Tensor:
        num_rows, k = topk_ids.shape
        if num_rows == 0:
            return torch.zeros(0, x.shape[1], dtype=torch.float32, device=x.device)
        return self.layer(layer_id).partial_sum(x, topk_ids, topk_weights)  # ids < 0 are skipped
