"""The Grafana dashboard the Helm chart ships (`helm/raymoe/dashboards/raymoe.json`), written from Python.

    PANELS (rows of (title, unit, kind, [(PromQL, legend)])) -> dashboard() -> JSON
    python -m raymoe.observability.dashboard      # rewrite the chart's file (tests fail on drift)

Metric names are as Ray exports them: `ray_` + the `SPECS` name (metrics.py), histograms as
`_bucket` series for `histogram_quantile`. Every selector carries `ray_io_cluster=~"$cluster"` (the
label the chart's PodMonitors add; "All" also matches series without it, e.g. a plain Prometheus
scraping Ray's port 8080). Panels are listed, not generated from SPECS: each one answers an
operator's question (is it fast, is it full, are the experts balanced, is anything failing).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

CHART_FILE = Path(__file__).resolve().parents[2] / "helm" / "raymoe" / "dashboards" / "raymoe.json"

C = '{ray_io_cluster=~"$cluster"}'
W = "[$__rate_interval]"


def _quantiles(metric: str, by: str = "", qs: tuple[float, ...] = (0.5, 0.9, 0.99)) -> list[tuple[str, str]]:
    """p50/p90/p99 of a Ray histogram, optionally per label `by`."""
    keys = f"le, {by}" if by else "le"
    legend = f"p{{q}} {{{{{by}}}}}" if by else "p{q}"
    return [(f"histogram_quantile({q}, sum by ({keys}) (rate(ray_{metric}_bucket{C}{W})))",
             legend.format(q=f"{q * 100:g}")) for q in qs]


# (row title, [(panel title, unit, kind, [(expr, legend)])]); kind: timeseries | heatmap | stat
PANELS: list[tuple[str, list[tuple[str, str, str, list[tuple[str, str]]]]]] = [
    ("Traffic", [
        ("Requests / s by route and status", "reqps", "timeseries", [
            (f"sum by (route, status) (rate(ray_raymoe_requests_total{C}{W}))", "{{route}} {{status}}")]),
        ("Tokens / s", "short", "timeseries", [
            (f"sum(rate(ray_raymoe_generation_tokens_total{C}{W}))", "output (ingress)"),
            (f"sum(rate(ray_raymoe_prompt_tokens_total{C}{W}))", "prompt (ingress)"),
            (f"sum by (replica) (ray_raymoe_tokens_per_second{C})", "engine {{replica}}")]),
        ("Errors / s by type", "reqps", "timeseries", [
            (f"sum by (type) (rate(ray_raymoe_request_errors_total{C}{W}))", "{{type}}"),
            (f'sum(rate(ray_raymoe_requests_total{{ray_io_cluster=~"$cluster", status=~"5.."}}{W}))', "HTTP 5xx")]),
        ("Requests in flight (ingress)", "short", "timeseries", [
            (f"sum by (replica) (ray_raymoe_requests_in_flight{C})", "{{replica}}")]),
    ]),
    ("Latency", [
        ("Time to first token", "s", "timeseries", _quantiles("raymoe_time_to_first_token_seconds")),
        ("Inter-token latency", "s", "timeseries", _quantiles("raymoe_inter_token_latency_seconds")),
        ("End-to-end request latency", "s", "timeseries", _quantiles("raymoe_e2e_request_latency_seconds")),
        ("Engine step time", "s", "timeseries", _quantiles("raymoe_engine_step_seconds", "replica", (0.5, 0.99))),
    ]),
    ("Engine (attention tier)", [
        ("Running / waiting sequences", "short", "timeseries", [
            (f"sum by (replica) (ray_raymoe_num_requests_running{C})", "running {{replica}}"),
            (f"sum by (replica) (ray_raymoe_num_requests_waiting{C})", "waiting {{replica}}")]),
        ("Batch size", "short", "timeseries", _quantiles("raymoe_batch_size", "replica", (0.5, 0.99))),
        ("KV-cache usage", "percentunit", "timeseries", [
            (f"max by (replica) (ray_raymoe_kv_cache_usage_ratio{C})", "{{replica}}")]),
        ("Prefix-cache hit rate", "percentunit", "timeseries", [
            (f"sum(rate(ray_raymoe_prefix_cache_hit_tokens_total{C}{W})) / "
             f"sum(rate(ray_raymoe_prefix_cache_queried_tokens_total{C}{W}))", "all replicas (window)"),
            (f"max by (replica) (ray_raymoe_prefix_cache_hit_rate{C})", "{{replica}} (since start)")]),
    ]),
    ("Experts (expert tier)", [
        ("Expert-load imbalance (max/mean tokens over shards)", "short", "timeseries", [
            (f"max by (engine) (ray_raymoe_expert_load_imbalance{C})", "{{engine}}")]),
        ("Tokens / s per shard", "short", "heatmap", [
            (f"sum by (shard) (rate(ray_raymoe_shard_tokens_total{C}{W}))", "{{shard}}")]),
        ("Tokens / s per layer group and shard", "short", "heatmap", [
            (f"sum by (layer_group, shard) (rate(ray_raymoe_shard_tokens_total{C}{W}))",
             "{{layer_group}} s{{shard}}")]),
        ("Dispatch+combine latency per shard", "s", "timeseries",
         _quantiles("raymoe_dispatch_latency_seconds", "shard", (0.5, 0.99))),
        ("Tokens / s per expert (layer $layer; needs parallel.per_expert_metrics)", "short", "heatmap", [
            (f'sum by (expert) (rate(ray_raymoe_expert_tokens_total{{ray_io_cluster=~"$cluster", layer=~"$layer"}}{W}))',
             "{{expert}}")]),
        ("Shard restarts and layer retries", "short", "timeseries", [
            (f"sum by (shard) (increase(ray_raymoe_shard_restarts_total{C}[5m]))", "restarts shard {{shard}}"),
            (f"sum(increase(ray_raymoe_step_retries_total{C}[5m]))", "layer retries")]),
    ]),
    ("Heavy Mode and resilience", [
        ("Heavy Mode requests / s", "reqps", "timeseries", [
            (f"sum by (aggregate) (rate(ray_raymoe_heavy_requests_total{C}{W}))", "{{aggregate}}")]),
        ("Heavy Mode trajectories / s by tier replica", "short", "timeseries", [
            (f"sum by (replica) (rate(ray_raymoe_heavy_trajectories_total{C}{W}))", "{{replica}}")]),
        ("Heavy Mode aggregation time", "s", "timeseries",
         _quantiles("raymoe_heavy_aggregation_seconds", "aggregate", (0.5, 0.99))),
        ("Resubmissions (tier replica lost mid-request)", "short", "timeseries", [
            (f"sum(increase(ray_raymoe_resubmissions_total{C}[5m]))", "resubmitted")]),
    ]),
    ("Ray Serve", [
        ("Healthy replicas per deployment", "short", "timeseries", [
            (f"sum by (deployment) (ray_serve_deployment_replica_healthy{C})", "{{deployment}}")]),
        ("Serve HTTP requests / s", "reqps", "timeseries", [
            (f"sum by (route) (rate(ray_serve_num_http_requests_total{C}{W}))", "{{route}}")]),
        ("Serve deployment processing latency p99", "ms", "timeseries", [
            (f"histogram_quantile(0.99, sum by (le, deployment) "
             f"(rate(ray_serve_deployment_processing_latency_ms_bucket{C}{W})))", "{{deployment}}")]),
    ]),
]

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def _panel(panel_id: int, title: str, unit: str, kind: str, targets: list[tuple[str, str]],
           x: int, y: int, w: int) -> dict[str, Any]:
    panel: dict[str, Any] = {
        "id": panel_id, "type": kind, "title": title, "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": w, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [{"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend}
                    for i, (expr, legend) in enumerate(targets)],
    }
    if kind == "heatmap":  # one row per series (shard, expert): no bucketing by Grafana
        panel["options"] = {"calculate": False, "yAxis": {"axisPlacement": "left"}, "rowsFrame": {"layout": "auto"},
                            "color": {"scheme": "Oranges", "mode": "scheme"}, "cellGap": 1}
    else:
        panel["options"] = {"legend": {"displayMode": "list", "placement": "bottom"},
                            "tooltip": {"mode": "multi", "sort": "desc"}}
    return panel


def _variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {"name": name, "label": label, "type": "query", "datasource": DATASOURCE, "query": query,
            "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2,
            "current": {"selected": True, "text": "All", "value": "$__all"}}


def dashboard() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    y, next_id = 0, 1
    for row_title, row in PANELS:
        panels.append({"id": next_id, "type": "row", "title": row_title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        next_id, y = next_id + 1, y + 1
        per_line = 3 if len(row) % 3 == 0 else 2
        w = 24 // per_line
        for i, (title, unit, kind, targets) in enumerate(row):
            panels.append(_panel(next_id, title, unit, kind, targets, (i % per_line) * w, y + (i // per_line) * 8, w))
            next_id += 1
        y += 8 * -(-len(row) // per_line)
    return {
        "title": "raymoe",
        "uid": "raymoe-serve",
        "description": "raymoe serving: traffic, latency (TTFT, inter-token, end-to-end), engine queues and KV "
                       "cache, expert load per shard and its imbalance, dispatch latency, faults, Heavy Mode.",
        "tags": ["raymoe", "ray", "serve"],
        "schemaVersion": 39,
        "version": 2,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Data source"},
            _variable("cluster", "Ray cluster", "label_values(ray_serve_deployment_replica_healthy, ray_io_cluster)"),
            _variable("layer", "MoE layer (per-expert panel)", "label_values(ray_raymoe_expert_tokens_total, layer)"),
        ]},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def expressions(board: dict[str, Any]) -> list[str]:
    """Every PromQL string of a dashboard: panel targets and query variables."""
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    exprs += [v["query"] for v in board["templating"]["list"] if v.get("type") == "query"]
    return exprs


def main(argv: list[str] | None = None) -> int:
    CHART_FILE.write_text(render())
    print(f"wrote {CHART_FILE}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
