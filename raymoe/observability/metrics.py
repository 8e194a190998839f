"""raymoe's Prometheus metrics, exported through Ray's metrics agent.

We use `ray.util.metrics` rather than prometheus-client: every process (ingress replicas, attention
replicas, expert-shard actors) records into Ray's per-node metrics agent, so the series appear in the
Ray dashboard and in any Prometheus scraping Ray's port 8080 (PodMonitors in the Helm chart), named
`ray_raymoe_*`. The ingress's `/metrics` gathers the same series from every node (`scrape_cluster`) so
a single-machine user scrapes one URL. Outside Ray (offline `LLM` with local experts) every call is a
no-op. Cardinality is bounded: no per-request labels; per-expert series only when enabled in config.
"""

from __future__ import annotations

import threading
import urllib.request
from typing import Any

# Buckets sized for LLM serving: TTFT spans 10 ms … 80 s (long prefills, queueing), inter-token
# latency 1 ms … 2.5 s (decode steps under load), end-to-end up to ~5 minutes (long reasoning).
TTFT_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0]
ITL_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.5]
E2E_BUCKETS = [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0]
STEP_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]
DISPATCH_BUCKETS = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0]
AGG_BUCKETS = [0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]

# name -> (kind, description, tag keys, buckets)
SPECS: dict[str, tuple[str, str, tuple[str, ...], list[float] | None]] = {
    # ingress
    "raymoe_requests_total": ("counter", "HTTP requests by route and status code", ("route", "status"), None),
    "raymoe_request_errors_total": ("counter", "Failed requests by error type", ("type",), None),
    "raymoe_requests_in_flight": ("gauge", "Requests being served by this ingress replica", ("replica",), None),
    "raymoe_time_to_first_token_seconds": ("histogram", "Time to first token", (), TTFT_BUCKETS),
    "raymoe_inter_token_latency_seconds": ("histogram", "Time between output tokens", (), ITL_BUCKETS),
    "raymoe_e2e_request_latency_seconds": ("histogram", "End-to-end request latency", (), E2E_BUCKETS),
    "raymoe_prompt_tokens_total": ("counter", "Prompt tokens processed", (), None),
    "raymoe_generation_tokens_total": ("counter", "Output tokens generated", (), None),
    "raymoe_heavy_requests_total": ("counter", "Heavy Mode requests by aggregator", ("aggregate",), None),
    "raymoe_heavy_trajectories_total": ("counter", "Heavy Mode trajectories by replica", ("replica",), None),
    "raymoe_heavy_aggregation_seconds": ("histogram", "Heavy Mode aggregation time", ("aggregate",),
                                         AGG_BUCKETS),
    "raymoe_resubmissions_total": ("counter", "Requests re-submitted after their AttentionTier replica died", (),
                                   None),
    # attention tier (one engine per replica)
    "raymoe_num_requests_running": ("gauge", "Sequences in the running batch", ("replica",), None),
    "raymoe_num_requests_waiting": ("gauge", "Sequences waiting for admission", ("replica",), None),
    "raymoe_batch_size": ("histogram", "Sequences per engine step", ("replica",),
                          [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]),
    "raymoe_kv_cache_usage_ratio": ("gauge", "Fraction of KV-cache blocks in use", ("replica",), None),
    "raymoe_prefix_cache_hit_rate": ("gauge", "Prefix-cache hit rate (tokens)", ("replica",), None),
    "raymoe_prefix_cache_hit_tokens_total": ("counter", "Prompt tokens served from the prefix cache",
                                             ("replica",), None),
    "raymoe_prefix_cache_queried_tokens_total": ("counter", "Prompt tokens looked up in the prefix cache",
                                                 ("replica",), None),
    "raymoe_tokens_per_second": ("gauge", "Generated tokens per second (engine)", ("replica",), None),
    "raymoe_engine_step_seconds": ("histogram", "Engine step duration", ("replica",), STEP_BUCKETS),
    # expert tier
    "raymoe_dispatch_latency_seconds": ("histogram", "Dispatch+combine latency of sampled MoE layers, per shard "
                                        "that took part", ("shard",), DISPATCH_BUCKETS),
    "raymoe_shard_tokens_total": ("counter", "Tokens received per shard per layer group",
                                  ("shard", "layer_group"), None),
    "raymoe_expert_load_imbalance": ("gauge", "Max/mean tokens over shards (1.0 = balanced)", ("engine",), None),
    "raymoe_expert_tokens_total": ("counter", "Tokens per expert (only when per-expert metrics are enabled)",
                                   ("layer", "expert"), None),
    "raymoe_shard_restarts_total": ("counter", "Expert-shard restarts observed by an engine", ("shard",), None),
    "raymoe_step_retries_total": ("counter", "MoE layers re-run within a step after a shard failure", (), None),
}

_lock = threading.Lock()
_metrics: dict[str, Any] = {}


def _ray_ready() -> bool:
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a dependency
        return False
    return ray.is_initialized()


def get(name: str) -> Any | None:
    """The metric object for `name`, created on first use; None outside a Ray process."""
    m = _metrics.get(name)
    if m is not None:
        return m
    if not _ray_ready():
        return None
    from ray.util import metrics as rm

    kind, desc, tags, buckets = SPECS[name]
    with _lock:
        m = _metrics.get(name)
        if m is None:
            if kind == "counter":
                m = rm.Counter(name, description=desc, tag_keys=tags)
            elif kind == "gauge":
                m = rm.Gauge(name, description=desc, tag_keys=tags)
            else:
                m = rm.Histogram(name, description=desc, boundaries=buckets, tag_keys=tags)
            _metrics[name] = m
    return m


def inc(name: str, value: float = 1.0, **tags: str) -> None:
    m = get(name)
    if m is not None and value:
        m.inc(value, tags={k: str(v) for k, v in tags.items()} or None)


def set_gauge(name: str, value: float, **tags: str) -> None:
    m = get(name)
    if m is not None:
        m.set(value, tags={k: str(v) for k, v in tags.items()} or None)


def observe(name: str, value: float, **tags: str) -> None:
    m = get(name)
    if m is not None:
        m.observe(value, tags={k: str(v) for k, v in tags.items()} or None)


def scrape_cluster(timeout_s: float = 2.0, prefixes: tuple[str, ...] = ("ray_raymoe_", "ray_serve_")) -> str:
    """Prometheus text of raymoe's (and Serve's) series from every alive Ray node's metrics agent.

    The local node is reached on 127.0.0.1; other nodes on their Ray address (pod IPs in Kubernetes).
    Nodes that don't answer in `timeout_s` are skipped (a comment line says so).
    """
    import ray

    local = ray.util.get_node_ip_address()
    seen_meta: set[str] = set()
    out: list[str] = []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        port = node.get("MetricsExportPort")
        addr = node.get("NodeManagerAddress")
        if not port or not addr:
            continue
        host = "127.0.0.1" if addr == local else addr
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout_s) as resp:
                text = resp.read().decode("utf-8", "replace")
        except OSError as e:
            out.append(f"# raymoe: node {addr}:{port} did not answer ({type(e).__name__})")
            continue
        for line in text.splitlines():
            body = line[7:] if line.startswith("# HELP ") or line.startswith("# TYPE ") else line
            if not body.startswith(prefixes):
                continue
            if line.startswith("#"):
                if line in seen_meta:
                    continue
                seen_meta.add(line)
            out.append(line)
    return "\n".join(out) + "\n"
