"""Engine metrics: what one attention-tier engine exports per step, tagged with its replica.

[AsyncEngine loop] → core.step() → **EngineMetrics.on_step(step_s)** → ray.util.metrics → Ray's metrics agent

Histograms (step time, batch size) are observed every step: two calls, ~30 µs on a loaded 2-core box
(2026-11), against steps of milliseconds. Gauges (running/waiting, KV usage, prefix hit rate, tokens/s)
and the prefix-cache counters are read from the engine at most every `interval_s`, since Ray exports
every few seconds anyway. While idle the engine keeps publishing until its tokens/s (a trailing
window) has decayed to 0, so a quiet replica does not keep showing its last busy numbers; after
that it re-publishes the unchanged gauges (its own and the expert tier's) every `keepalive_s`, since
Ray's metrics agent drops a series its process has not reported lately (seen in Ray 2.60: an idle
replica's imbalance gauge vanished from the agent while the replica lived). Every call is a no-op
outside Ray; a metrics failure is logged once and never reaches the engine loop.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import deque
from typing import Any

from raymoe.observability import metrics

log = logging.getLogger(__name__)

GAUGE_INTERVAL_S = 0.5
RATE_WINDOW_S = 2.0
KEEPALIVE_S = 1.0


def replica_tag() -> str:
    """The Serve replica id inside a Serve replica, else the Ray actor id, else `pid<N>`.

    The Serve id is the one `AttentionTier` reports in its stats and its first stream item, so
    `/metrics`, logs and these series name a replica the same way.
    """
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            if "ray.serve" in sys.modules:  # never import Serve into a process that does not run it
                from ray import serve

                try:
                    return serve.get_replica_context().replica_id.unique_id
                except Exception:  # RayServeException: not a Serve replica
                    pass
            actor_id = ray.get_runtime_context().get_actor_id()
            if actor_id:
                return f"actor-{actor_id}"
    return f"pid{os.getpid()}"


class EngineMetrics:
    """Per-step recorder for one `EngineCore` (scheduler, kv, stats), owned by its engine thread.

    Args:
        core: the engine; read, never changed. If it has `flush_metrics()` (the expert-parallel
            engine), that is called when the engine goes idle, so expert-load counters are exported
            without waiting for more traffic, and again with each keepalive.
        replica: the `replica` tag (default: `replica_tag()`).
        interval_s: how often gauges and counters are refreshed.
        rate_window_s: tokens/s is measured over this trailing window (so a burst shorter than
            `interval_s` still shows, and an idle engine decays to 0 within the window).
        keepalive_s: how often an idle engine re-publishes its unchanged gauges.
    """

    def __init__(self, core: Any, *, replica: str | None = None, interval_s: float = GAUGE_INTERVAL_S,
                 rate_window_s: float = RATE_WINDOW_S, keepalive_s: float = KEEPALIVE_S) -> None:
        self.core = core
        self.replica = replica or replica_tag()
        self.interval_s = interval_s
        self.rate_window_s = rate_window_s
        self.keepalive_s = keepalive_s
        now = time.monotonic()
        self._last_flush = now
        self._last_steps = core.stats.num_steps
        self._samples: deque[tuple[float, int]] = deque([(now, core.stats.num_generated_tokens)])
        self._last_hit = core.kv.num_hit_tokens
        self._last_queried = core.kv.num_queried_tokens
        self._quiet = True  # nothing changed since the last published state
        self._core_flushed = True
        self._failed = False

    def on_step(self, step_s: float) -> None:
        """After `core.step()` returned; `step_s` is its wall time."""
        try:
            stats = self.core.stats
            if stats.num_steps != self._last_steps:  # an empty schedule is not a step
                self._last_steps = stats.num_steps
                metrics.observe("raymoe_engine_step_seconds", step_s, replica=self.replica)
                metrics.observe("raymoe_batch_size", stats.batch_sizes[-1], replica=self.replica)
            self._quiet = self._core_flushed = False
            if time.monotonic() - self._last_flush >= self.interval_s:
                self.flush()
        except Exception as e:  # metrics must never stop the engine
            self._fail(e)

    def on_idle(self) -> None:
        """Called on each idle wait: publish the draining state until tokens/s has decayed to 0, then
        re-publish the unchanged gauges every `keepalive_s`."""
        try:
            if not self._core_flushed:
                self._core_flushed = True
                self._flush_core()
            if time.monotonic() - self._last_flush < (self.keepalive_s if self._quiet else self.interval_s):
                return
            if self._quiet:
                self._flush_core()  # the expert tier's gauges need the keepalive as much
            if self.flush() == 0.0:
                self._quiet = True
        except Exception as e:
            self._fail(e)

    def _flush_core(self) -> None:
        flush_more = getattr(self.core, "flush_metrics", None)
        if callable(flush_more):
            flush_more()

    def flush(self) -> float:
        """Publish the gauges and counter deltas now; returns the tokens/s it published."""
        now = time.monotonic()
        core, tag = self.core, self.replica
        self._last_flush = now
        generated = core.stats.num_generated_tokens
        samples = self._samples
        samples.append((now, generated))
        while len(samples) > 2 and samples[1][0] <= now - self.rate_window_s:
            samples.popleft()
        t0, g0 = samples[0]
        tokens_per_s = (generated - g0) / (now - t0) if now > t0 else 0.0
        hit, queried = core.kv.num_hit_tokens, core.kv.num_queried_tokens
        metrics.inc("raymoe_prefix_cache_hit_tokens_total", hit - self._last_hit, replica=tag)
        metrics.inc("raymoe_prefix_cache_queried_tokens_total", queried - self._last_queried, replica=tag)
        self._last_hit, self._last_queried = hit, queried
        metrics.set_gauge("raymoe_num_requests_running", core.scheduler.num_running, replica=tag)
        metrics.set_gauge("raymoe_num_requests_waiting", core.scheduler.num_waiting, replica=tag)
        metrics.set_gauge("raymoe_kv_cache_usage_ratio", core.kv.usage, replica=tag)
        metrics.set_gauge("raymoe_prefix_cache_hit_rate", core.kv.hit_rate, replica=tag)
        metrics.set_gauge("raymoe_tokens_per_second", tokens_per_s, replica=tag)
        return tokens_per_s

    def _fail(self, e: Exception) -> None:
        if not self._failed:
            self._failed = True
            log.warning("engine metrics of replica %s failed (later failures are not logged): %s: %s",
                        self.replica, type(e).__name__, e)
