"""Mixture of Experts: the noaux_tc router, routed experts (any subset of them), shared experts.

Routing is identical to HF `DeepseekV3TopkRouter` (K2_FACTS §2.1): fp32 logits, sigmoid scores,
`e_score_correction_bias` used only to choose experts, group-limited top-k when n_group > 1, weights =
unbiased scores of the chosen experts, renormalised, times routed_scaling_factor.
`RoutedExperts` hosts any subset of a layer's experts (an expert shard hosts its own subset) and
returns the partial sum over the experts it hosts, so partial sums of disjoint subsets add up to the
full MoE output.

Tensor letters: T tokens, D model dim, E experts, K experts per token, G expert groups, I moe inter dim.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from raymoe.model.args import ModelArgs
from raymoe.model.layers import MLP

# routed_fn(layer_id, x [T,D], topk_ids [T,K], topk_weights [T,K]) -> [T,D]
RoutedFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Gate(nn.Module):
    """Router: x [T,D] -> (topk_ids [T,K] int64, topk_weights [T,K] fp32)."""

    def __init__(self, args: ModelArgs, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.num_experts = args.n_routed_experts
        self.top_k = args.num_experts_per_tok
        self.n_group = args.n_group
        self.topk_group = args.topk_group
        self.norm_topk_prob = args.norm_topk_prob
        self.routed_scaling_factor = args.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.num_experts, args.hidden_size, dtype=dtype))  # [E,D]
        # Always fp32, as in the checkpoint (HF keeps it fp32 too).
        self.register_buffer("e_score_correction_bias", torch.zeros(self.num_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x.float(), self.weight.float())  # [T,E]
        scores = logits.sigmoid()
        choice = scores + self.e_score_correction_bias  # bias: selection only
        if self.n_group > 1:
            grouped = choice.view(x.shape[0], self.n_group, -1)  # [T,G,E/G]
            group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)  # [T,G]: sum of the top 2 per group
            group_ids = group_scores.topk(self.topk_group, dim=-1, sorted=False)[1]
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_ids, True)  # [T,G]
            choice = choice.masked_fill(~keep[:, :, None].expand_as(grouped).reshape_as(choice), float("-inf"))
        topk_ids = choice.topk(self.top_k, dim=-1, sorted=False)[1]  # [T,K], same order as HF
        topk_weights = scores.gather(1, topk_ids)
        if self.norm_topk_prob:
            topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
        return topk_ids, topk_weights * self.routed_scaling_factor


def _quant_group_size(args: ModelArgs) -> int:
    return args.quantization.group_size if args.quantization is not None else 32


class Expert(MLP):
    """One routed expert: SwiGLU of width moe_intermediate_size (packed INT4 when `quantized`)."""

    def __init__(self, args: ModelArgs, quantized: bool = False, dtype: torch.dtype | None = None) -> None:
        super().__init__(args.hidden_size, args.moe_intermediate_size, quantized=quantized,
                         group_size=_quant_group_size(args), dtype=dtype)


class RoutedExperts(nn.ModuleDict):
    """The experts `expert_ids` of one layer, keyed `str(global id)` (names `experts.{e}.gate_proj...`).

    forward returns Σ w·expert(x) over the (token, k) pairs routed to an expert hosted here; ids it does
    not host are ignored. Tokens are batched per expert; accumulation is fp32, cast to x.dtype at the end.
    """

    def __init__(self, args: ModelArgs, expert_ids: Sequence[int], *, quantized: bool = False,
                 dtype: torch.dtype | None = None) -> None:
        ids = [int(e) for e in expert_ids]
        bad = [e for e in ids if not 0 <= e < args.n_routed_experts]
        if bad:
            raise ValueError(f"expert_ids {bad} are outside [0, n_routed_experts={args.n_routed_experts})")
        if len(set(ids)) != len(ids):
            raise ValueError(f"expert_ids ({ids}) contain duplicates")
        super().__init__({str(e): Expert(args, quantized, dtype) for e in ids})
        self.expert_ids = ids

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """x [T,D], topk_ids [T,K], topk_weights [T,K] -> [T,D]."""
        T, k = topk_ids.shape
        if len(self) == 0 or x.shape[0] == 0:
            return torch.zeros_like(x)
        flat_ids = topk_ids.reshape(-1)  # [T*K]
        flat_w = topk_weights.reshape(-1).float()
        order = torch.argsort(flat_ids, stable=True)
        present, counts = torch.unique_consecutive(flat_ids[order], return_counts=True)
        # One row per (token, k) pair, each written once: a plain scatter then a sum over K. On CPU this
        # is ~10x faster than index_add_ into [T, D] at prefill sizes (8k pairs, measured 2026-11).
        pair_out = torch.zeros(T * k, x.shape[1], dtype=torch.float32, device=x.device)
        start = 0
        for e, n in zip(present.tolist(), counts.tolist()):
            pairs = order[start:start + n]  # (token, k) pairs routed to expert e
            start += n
            expert = self._modules.get(str(e))
            if expert is None:
                continue
            pair_out[pairs] = expert(x[pairs // k]).float() * flat_w[pairs, None]
        return pair_out.view(T, k, -1).sum(dim=1).to(x.dtype)


@torch.no_grad()
def moe_ref(experts: RoutedExperts, x: torch.Tensor, topk_ids: torch.Tensor,
            topk_weights: torch.Tensor) -> torch.Tensor:
    """Slow reference for `RoutedExperts.forward`: one (token, k) pair at a time."""
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    for t in range(x.shape[0]):
        for j in range(topk_ids.shape[1]):
            key = str(int(topk_ids[t, j]))
            if key in experts:
                out[t] += float(topk_weights[t, j]) * experts[key](x[t:t + 1])[0].float()
    return out.to(x.dtype)


class MoE(nn.Module):
    """Router + routed experts (local, or remote through `routed_fn`) + always-on shared experts."""

    def __init__(self, args: ModelArgs, layer_id: int, *, expert_ids: Sequence[int] | None = None,
                 quantized: bool = False, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.gate = Gate(args, dtype)
        ids = range(args.n_routed_experts) if expert_ids is None else expert_ids
        self.experts = RoutedExperts(args, ids, quantized=quantized, dtype=dtype)
        self.shared_experts = MLP(args.hidden_size, args.n_shared_experts * args.moe_intermediate_size, dtype=dtype)
        self.routed_fn: RoutedFn | None = None  # set by the engine to send tokens to remote experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T,D] -> [T,D]."""
        topk_ids, topk_weights = self.gate(x)
        if self.routed_fn is not None:
            routed = self.routed_fn(self.layer_id, x, topk_ids, topk_weights)
        else:
            routed = self.experts(x, topk_ids, topk_weights)
        return routed + self.shared_experts(x)
