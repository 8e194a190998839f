"""Expert-tier metrics, recorded by an engine's `Dispatcher`: per-shard tokens and latency, imbalance, faults.

[Gate] → [route] → **DispatchMetrics.add_tokens** → [Dispatch] → [Experts] → [Combine] → **observe_latency**

Cardinality and cost are bounded for K2 (61 layers, 384 experts, tens of shards):
- tokens per shard are summed into layer groups of `LAYER_GROUP_SIZE` layers on the device (no host
  sync per layer) and exported as counter deltas at most every `interval_s`: groups x shards series.
- imbalance (max/mean of tokens over shards, per engine) is measured over each export window; a
  flush with nothing new re-sets the last value (the idle engine's keepalive, engine_metrics.py).
- per-expert counters (layers x experts = 23k series for K2) exist only with
  `parallel.per_expert_metrics` and are exported every `expert_interval_s` and when the engine goes
  idle (23k `inc` calls take ~170 ms at 7.5 µs each, measured 2026-11 on the dev box).
- latency: a histogram observation costs ~15 µs, so at most one MoE layer per `latency_interval_s`
  is observed, under every shard that took part in it. The ray transport then times each shard's own
  round trip (dispatch, its experts, the reply); the collective transport finishes all shards at
  once, so there each shard gets the layer's dispatch+combine time. A hot shard also shows in its
  token series.
A restart is counted per shard from the actor's incarnation (`incarnations_fn`: actor id and Ray's
restart count) after each recovery; a retry is each re-run of a layer after a `ShardFailure`.

Tensor letters: N shards, G layer groups, E experts.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from raymoe.observability import metrics

LAYER_GROUP_SIZE = 8
FLUSH_INTERVAL_S = 0.5
EXPERT_FLUSH_INTERVAL_S = 10.0
LATENCY_INTERVAL_S = 0.05

# -> one (actor id, restarts) per shard, as Ray's GCS knows them now
IncarnationsFn = Callable[[], list[tuple[str, int]]]


def layer_group_label(layer_id: int, size: int = LAYER_GROUP_SIZE) -> str:
    lo = layer_id // size * size
    return f"{lo}-{lo + size - 1}"


class DispatchMetrics:
    """Accumulates one dispatcher's load and exports it; used only from the engine's thread.

    Args:
        num_shards: N.
        num_experts: routed experts per layer.
        engine: the `engine` tag of the imbalance gauge (the replica tag of the engine's process).
        per_expert: also export tokens per (layer, expert).
        incarnations_fn: reads each shard's (actor id, restart count) from Ray; None counts every
            recovery as one restart of shard "unknown".
    """

    def __init__(self, num_shards: int, num_experts: int, *, engine: str, per_expert: bool = False,
                 incarnations_fn: IncarnationsFn | None = None, interval_s: float = FLUSH_INTERVAL_S,
                 expert_interval_s: float = EXPERT_FLUSH_INTERVAL_S,
                 latency_interval_s: float = LATENCY_INTERVAL_S) -> None:
        self.num_shards = num_shards
        self.num_experts = num_experts
        self.engine = engine
        self.per_expert = per_expert
        self.interval_s = interval_s
        self.expert_interval_s = expert_interval_s
        self.latency_interval_s = latency_interval_s
        self.incarnations_fn = incarnations_fn
        self._incarnations = self._read_incarnations()
        self._groups: dict[int, torch.Tensor] = {}  # group -> [N] tokens since the last flush (engine device)
        self._experts: dict[int, torch.Tensor] = {}  # layer -> [E] (token, expert) pairs since the last flush
        now = time.monotonic()
        self._last_flush = self._last_expert_flush = now
        self._last_latency = float("-inf")
        self.imbalance: float | None = None  # the last exported value (tests, `raymoe status`)

    # -- hot path (per MoE layer) -----------------------------------------------------------------
    def add_tokens(self, layer_id: int, shard_counts: torch.Tensor, expert_counts: torch.Tensor) -> None:
        """shard_counts [N]: tokens sent to each shard; expert_counts [E]: (token, expert) pairs."""
        g = layer_id // LAYER_GROUP_SIZE
        prev = self._groups.get(g)
        self._groups[g] = shard_counts.clone() if prev is None else prev + shard_counts
        if self.per_expert:
            prev = self._experts.get(layer_id)
            self._experts[layer_id] = expert_counts.clone() if prev is None else prev + expert_counts
        self.maybe_flush()

    def want_latency(self) -> bool:
        """Whether the layer about to run should be timed (sampled: see the module docstring)."""
        return time.monotonic() - self._last_latency >= self.latency_interval_s

    def observe_latency(self, seconds: float, offsets: list[int], per_shard: dict[int, float] | None = None) -> None:
        """One layer's dispatch+combine time under each shard that received rows (host offsets, no sync).

        `per_shard` (shard -> seconds until that shard's rows came back) replaces the layer time for the
        shards it names: the ray transport sees each shard answer; a collective finishes all at once.
        """
        self._last_latency = time.monotonic()
        per_shard = per_shard or {}
        for s in range(self.num_shards):
            if offsets[s + 1] > offsets[s]:
                metrics.observe("raymoe_dispatch_latency_seconds", per_shard.get(s, seconds), shard=str(s))

    # -- faults -----------------------------------------------------------------------------------
    def record_retry(self) -> None:
        metrics.inc("raymoe_step_retries_total")

    def record_recovered(self) -> None:
        """After a layer succeeded again: count the shards Ray restarted (or replaced) since last time."""
        current = self._read_incarnations()
        if current is None or self._incarnations is None or len(current) != len(self._incarnations):
            metrics.inc("raymoe_shard_restarts_total", shard="unknown")
        else:
            for s, ((old_id, old_n), (new_id, new_n)) in enumerate(zip(self._incarnations, current)):
                restarts = new_n - old_n if new_id == old_id else 1 + new_n  # a replacement actor
                metrics.inc("raymoe_shard_restarts_total", max(restarts, 0), shard=str(s))
        self._incarnations = current

    def _read_incarnations(self) -> list[tuple[str, int]] | None:
        if self.incarnations_fn is None:
            return None
        try:
            return self.incarnations_fn()
        except Exception:  # GCS unreachable or its private API moved: count restarts as "unknown"
            return None

    # -- export -----------------------------------------------------------------------------------
    def maybe_flush(self) -> None:
        now = time.monotonic()
        if now - self._last_flush >= self.interval_s:
            self.flush(experts=now - self._last_expert_flush >= self.expert_interval_s)

    def flush(self, experts: bool = True) -> None:
        """Export what accumulated (one host copy per group); `experts` also exports per-expert counts."""
        now = time.monotonic()
        self._last_flush = now
        if self._groups:
            groups, self._groups = self._groups, {}
            window = torch.zeros(self.num_shards, dtype=torch.long)
            for g, counts in groups.items():
                counts = counts.cpu().long()
                window += counts
                label = layer_group_label(g * LAYER_GROUP_SIZE)
                for s, n in enumerate(counts.tolist()):
                    metrics.inc("raymoe_shard_tokens_total", n, shard=str(s), layer_group=label)
            self._set_imbalance(window)
        elif self.imbalance is not None:  # nothing ran since: keep the last value alive in Ray's agent
            metrics.set_gauge("raymoe_expert_load_imbalance", self.imbalance, engine=self.engine)
        if experts and self._experts:
            self._last_expert_flush = now
            layers, self._experts = self._experts, {}
            for layer_id, counts in layers.items():
                for e, n in enumerate(counts.cpu().tolist()):
                    metrics.inc("raymoe_expert_tokens_total", n, layer=str(layer_id), expert=str(e))

    def _set_imbalance(self, tokens: torch.Tensor) -> None:
        total = int(tokens.sum())
        if total == 0:
            return
        self.imbalance = load_imbalance(tokens.tolist())
        metrics.set_gauge("raymoe_expert_load_imbalance", self.imbalance, engine=self.engine)


def load_imbalance(per_shard: list[float]) -> float:
    """max / mean over shards (1.0 = balanced, N = everything on one shard); 0.0 when nothing ran."""
    total = sum(per_shard)
    return max(per_shard) * len(per_shard) / total if total else 0.0


def shard_incarnations(handles: list) -> list[tuple[str, int]]:
    """(actor id, restart count) of each shard actor handle, from Ray's GCS actor table.

    The GCS table needs no dashboard (Ray's state API does); it is private API, so callers treat
    any error as "unknown" (see `DispatchMetrics.record_recovered`).
    """
    import ray

    out = []
    for h in handles:
        actor_id = h._actor_id.hex()
        info = ray._private.state.state.actor_table(actor_id) or {}
        out.append((actor_id, int(info.get("NumRestarts", 0))))
    return out
