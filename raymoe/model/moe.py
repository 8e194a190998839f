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
        self._route_cpu: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None

    def set_kernel(self, kernel: str) -> None:
        """"cpu": after the GEMM and sigmoid, the selection runs as one C call (raymoe_kernels.cpu.moe_route_cpu,
        on CPU tensors); anything else: the torch ops below."""
        if kernel == "cpu":
            from raymoe_kernels.cpu import moe_route_cpu

            self._route_cpu = moe_route_cpu
        else:
            self._route_cpu = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.weight
        logits = F.linear(x if x.dtype == torch.float32 else x.float(),
                          w if w.dtype == torch.float32 else w.float())  # [T,E] fp32
        scores = logits.sigmoid()
        if self._route_cpu is not None and scores.device.type == "cpu":
            return self._route_cpu(scores, self.e_score_correction_bias, n_group=self.n_group,
                                   topk_group=self.topk_group, top_k=self.top_k, norm_topk_prob=self.norm_topk_prob,
                                   routed_scaling_factor=self.routed_scaling_factor)
        choice = scores + self.e_score_correction_bias  # bias: selection only
        if self.n_group > 1:
            grouped = choice.view(x.shape[0], self.n_group, -1)  # [T,G,E/G]
            # [T,G]: sum of the top 2 per group (the whole group when it has at most 2 experts)
            group_scores = (grouped.topk(2, dim=-1)[0] if grouped.shape[-1] > 2 else grouped).sum(dim=-1)
            group_ids = group_scores.topk(self.topk_group, dim=-1, sorted=False)[1]
            drop = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, group_ids, False)  # [T,G]
            choice = grouped.masked_fill(drop.unsqueeze(-1), float("-inf")).view_as(choice)
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
    not host (or < 0) are ignored. Accumulation is fp32, cast to x.dtype at the end.

    Four ways to compute, same result: a loop with one GEMM per expert present; after `fuse()`
    stacked the (unquantized) weights into `[E, D, 2I]` / `[E, I, D]` tensors that the experts' own
    parameters then view (no extra memory), one padded grouped GEMM (`bmm`) per projection: a few
    tensor ops whatever the number of experts, which is what decode batches need on CPU (used while
    padding stays below GROUPED_MAX_PADDING × the real pairs); for models with few experts per routed
    slot (n_routed ≤ GROUPED_MAX_PADDING × top_k), every hosted expert on every token weighted by a
    dense routing matrix, one unpadded bmm per projection and no sorting; and with
    `set_kernel("triton")` on INT4 experts, raymoe_kernels' permute → fused W4A16 grouped GEMM (SwiGLU fused) → unpermute over the
    stacked compressed-tensors buffers (`kernels.backend`: CUDA, or CPU under TRITON_INTERPRET=1); with
    `set_kernel("cpu")` on fp32 stacks, one C call (raymoe_kernels.cpu.moe_experts_cpu: grouped by expert,
    4-row GEMM tiles, a token's bits independent of its batch).
    """

    GROUPED_MAX_PADDING = 4

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
        self.num_routed_experts = args.n_routed_experts
        self.top_k = args.num_experts_per_tok
        self._dense = False  # after fuse(): compute every hosted expert on every token (few experts per slot)
        self._fused: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (w13, w2, local index)
        self.kernel = "torch"
        self._experts_cpu: Callable[..., torch.Tensor] | None = None  # set_kernel("cpu")
        self._int4: tuple[torch.Tensor, ...] | None = None  # (w13_packed, w13_scale, w2_packed, w2_scale, local)

    def set_kernel(self, kernel: str) -> None:
        """"torch", "cpu" or "triton" (a resolved `kernels.backend`); before loading: triton keeps INT4 as loaded."""
        if kernel not in ("torch", "cpu", "triton"):
            raise ValueError(f"kernel {kernel!r} is not supported (supported: torch, cpu, triton)")
        self.kernel = kernel
        self._experts_cpu = None
        if kernel == "cpu":
            from raymoe_kernels.cpu import moe_experts_cpu

            self._experts_cpu = moe_experts_cpu
        for ex in self._modules.values():
            for lin in (ex.gate_proj, ex.up_proj, ex.down_proj):
                if hasattr(lin, "keep_checkpoint_layout"):
                    lin.keep_checkpoint_layout = kernel == "triton"

    @torch.no_grad()
    def fuse(self) -> bool:
        """After loading: stack the weights for the grouped bmm (unquantized experts) or for the fused
        W4A16 kernel (INT4 experts under `set_kernel("triton")`); False (the loop is used) otherwise."""
        experts = [self._modules[str(e)] for e in self.expert_ids]
        linears = [m for ex in experts for m in (ex.gate_proj, ex.up_proj, ex.down_proj)]
        self._fused = self._int4 = None
        self._dense = False
        if experts and self.kernel == "triton" and all(getattr(m, "keep_checkpoint_layout", False) for m in linears):
            return self._fuse_int4(experts)
        if not experts or not all(type(m) is nn.Linear for m in linears) or linears[0].weight.is_meta:
            return False
        inter = experts[0].gate_proj.out_features
        # Stacked input-dim-major ([E, D, 2I] / [E, I, D]: each expert's weight column-major, as
        # layers.gemm_layout lays out dense linears), so the bmm multiplies without a transposed operand:
        # ~2x faster on CPU at decode sizes (64 tokens x 8 experts: 39 vs 90 us, measured 2026-11).
        w13 = torch.stack([torch.cat([ex.gate_proj.weight, ex.up_proj.weight]).t() for ex in experts])  # [E, D, 2I]
        w2 = torch.stack([ex.down_proj.weight.t() for ex in experts])  # [E, I, D]
        for i, ex in enumerate(experts):  # the parameters become views of the stacks: one copy in memory
            ex.gate_proj.weight = nn.Parameter(w13[i, :, :inter].t(), requires_grad=False)
            ex.up_proj.weight = nn.Parameter(w13[i, :, inter:].t(), requires_grad=False)
            ex.down_proj.weight = nn.Parameter(w2[i].t(), requires_grad=False)
        self._fused = (w13, w2, self._local_index(w13.device))
        # every hosted expert on every token costs at most the padding the grouped GEMM may add (E·T rows
        # for T·K·E/n_routed routed pairs, on average) and needs no sorting: small models
        self._dense = self.num_routed_experts <= self.GROUPED_MAX_PADDING * self.top_k
        return True

    def _local_index(self, device: torch.device) -> torch.Tensor:
        """[n_routed + 1]: global expert id -> stack index; not hosted (and -1, the last entry) -> E."""
        local = torch.full((self.num_routed_experts + 1,), len(self.expert_ids), dtype=torch.long, device=device)
        local[torch.tensor(self.expert_ids, dtype=torch.long, device=device)] = torch.arange(
            len(self.expert_ids), device=device)
        return local

    def _fuse_int4(self, experts: list[nn.Module]) -> bool:
        """Stack the INT4 buffers as fused_moe_w4a16 wants them; each Int4Linear then views its slice."""
        first = experts[0].gate_proj
        if first.weight_packed is None or first.weight_packed.is_meta:
            return False
        inter = first.out_features
        stacks = []
        for names in (("gate_proj", "up_proj"), ("down_proj",)):
            for buf in ("weight_packed", "weight_scale"):
                stacks.append(torch.stack([torch.cat([getattr(getattr(ex, n), buf) for n in names]) for ex in experts]))
        w13p, w13s, w2p, w2s = stacks  # [E, 2I, D/8], [E, 2I, D/gs], [E, D, I/8], [E, D, I/gs]
        for i, ex in enumerate(experts):
            ex.gate_proj.weight_packed, ex.gate_proj.weight_scale = w13p[i, :inter], w13s[i, :inter]
            ex.up_proj.weight_packed, ex.up_proj.weight_scale = w13p[i, inter:], w13s[i, inter:]
            ex.down_proj.weight_packed, ex.down_proj.weight_scale = w2p[i], w2s[i]
        self._int4 = (w13p, w13s, w2p, w2s, self._local_index(w13p.device))
        return True

    def _triton_sum(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """permute → fused W4A16 (gate/up + SwiGLU, down) → weighted unpermute; fp32 [T, D]."""
        from raymoe_kernels import fused_moe_w4a16, moe_permute, moe_unpermute

        w13p, w13s, w2p, w2s, local = self._int4  # type: ignore[misc]
        E, k = w13p.shape[0], topk_ids.shape[1]
        slot = local[topk_ids.clamp(min=-1)]  # [T, K]: bin E collects pairs hosted elsewhere
        sorted_ids, _counts, offsets, inverse = moe_permute(slot, E + 1)
        x_sorted = x.index_select(0, sorted_ids.long() // k).contiguous()  # [T*K, D] grouped by expert
        gs = self._modules[str(self.expert_ids[0])].gate_proj.group_size
        out = fused_moe_w4a16(x_sorted.to(w13s.dtype), offsets[:E + 1], w13p, w13s, w2p, w2s, gs)  # bin E rows: 0
        return moe_unpermute(out.float(), inverse, topk_weights.float())

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """x [T,D], topk_ids [T,K], topk_weights [T,K] -> [T,D] in x.dtype."""
        return self.partial_sum(x, topk_ids, topk_weights).to(x.dtype)

    def partial_sum(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """The same sum in fp32 (expert shards return this; the engine adds the shards' partials)."""
        T, k = topk_ids.shape
        if len(self) == 0 or T == 0:
            return torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device)
        if self._int4 is not None:
            return self._triton_sum(x, topk_ids, topk_weights)
        fused = self._fused is not None and self._fused[0].device == x.device and self._fused[0].dtype == x.dtype
        if fused and self._experts_cpu is not None and x.dtype == torch.float32 and x.device.type == "cpu":
            w13, w2, local = self._fused
            return self._experts_cpu(x, topk_ids, topk_weights, local, w13, w2)
        if fused and self._dense:
            return self._dense_sum(x, topk_ids, topk_weights)
        flat_ids = topk_ids.reshape(-1)  # [T*K]
        flat_w = topk_weights.reshape(-1).float()
        # One row per (token, k) pair, each written once: a plain scatter then a sum over K. On CPU this
        # is ~10x faster than index_add_ into [T, D] at prefill sizes (8k pairs, measured 2026-11).
        pair_out = torch.zeros(T * k, x.shape[1], dtype=torch.float32, device=x.device)
        if fused and self._grouped(x, flat_ids, flat_w, k, pair_out):
            return pair_out.view(T, k, -1).sum(dim=1)
        order = torch.argsort(flat_ids, stable=True)
        present, counts = torch.unique_consecutive(flat_ids[order], return_counts=True)
        start = 0
        for e, n in zip(present.tolist(), counts.tolist()):
            pairs = order[start:start + n]  # (token, k) pairs routed to expert e
            start += n
            expert = self._modules.get(str(e)) if e >= 0 else None
            if expert is None:
                continue
            pair_out[pairs] = expert(x[pairs // k]).float() * flat_w[pairs, None]
        return pair_out.view(T, k, -1).sum(dim=1)

    def _dense_sum(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """Every hosted expert on every token ([E, T] rows through two bmm), then the fp32 sum weighted by a
        dense [E, T] routing matrix (0 where not routed). Each expert's output is the same GEMM whatever
        else this shard hosts, and adding the exact zeros of unrouted experts changes nothing, so with
        top-2 routing the partial sums of shards add up, bit for bit, to what one process hosting all
        experts computes (tested). fp32 [T, D]."""
        w13, w2, local = self._fused  # type: ignore[misc]
        (T, D), E = x.shape, w13.shape[0]
        slot = local[topk_ids.clamp(min=-1)]  # [T, K] stack index; E collects pairs hosted elsewhere
        routing = x.new_zeros(E + 1, T, dtype=torch.float32)
        routing.scatter_add_(0, slot.t(), topk_weights.t().to(torch.float32))  # [E+1, T]
        h = torch.bmm(x.expand(E, T, D), w13)  # [E, T, 2I]
        gate, up = h.chunk(2, dim=-1)
        y = torch.bmm(F.silu(gate) * up, w2)  # [E, T, D]
        return (y.float() * routing[:E, :, None]).sum(dim=0)

    def _grouped(self, x: torch.Tensor, flat_ids: torch.Tensor, flat_w: torch.Tensor, k: int,
                 pair_out: torch.Tensor) -> bool:
        """Padded grouped GEMM into `pair_out`; False (nothing written) when padding would cost too much."""
        w13, w2, local = self._fused  # type: ignore[misc]
        E, inter = w13.shape[0], w2.shape[1]
        slot = local[flat_ids.clamp(min=-1)]  # [P] stack index, E = not hosted (-1 wraps to the last: E)
        order = torch.argsort(slot, stable=True)
        counts = torch.bincount(slot, minlength=E + 1)[:E]
        num_pairs = int(counts.sum())
        if num_pairs == 0:
            return True
        cap = int(counts.max())
        if E * cap > self.GROUPED_MAX_PADDING * num_pairs:
            return False
        pairs = order[:num_pairs]  # hosted pairs, grouped by expert
        group = slot[pairs]
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(num_pairs, device=x.device) - starts[group]  # position within its expert
        xg = x.new_zeros(E, cap, x.shape[1])
        xg[group, rank] = x[pairs // k]
        h = torch.bmm(xg, w13)  # [E, cap, 2I]
        y = torch.bmm(F.silu(h[..., :inter]) * h[..., inter:], w2)  # [E, cap, D]
        pair_out[pairs] = y[group, rank].float() * flat_w[pairs, None]
        return True


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
            routed = self.experts.forward(x, topk_ids, topk_weights)  # .forward: see MLA.project
        return routed + self.shared_experts.forward(x)
