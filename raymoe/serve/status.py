"""`raymoe status [--address]`: what a running raymoe cluster serves, where, and how loaded its experts are.

    ray.init(address) -> Serve status (apps, deployments, replicas + nodes)
                      -> named actors `raymoe-expert-*` in every namespace -> load_stats(), node_id()
                      -> expert-load imbalance: since shard start (shard stats) and current (metrics)
    -> a plain-text report

Read-only: it calls only the shards' introspection methods, each bounded by `timeout_s`, so a
restarting shard shows as "no answer" instead of hanging the command. Gathering (`collect_status`)
and printing (`format_status`) are separate so the report can be tested without a cluster.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from raymoe.observability.dispatch_metrics import load_imbalance

SHARD_PREFIX = "raymoe-expert-"
TIMEOUT_S = 5.0
IMBALANCE_WAIT_S = 5.0  # how long to re-scrape for an imbalance gauge that is missing (see below)


@dataclass
class ShardStatus:
    name: str
    namespace: str
    group: str
    shard_id: int
    node: str = "?"
    tokens: int | None = None  # rows received (tokens), since the shard (re)started
    pairs: int | None = None  # (token, expert) pairs computed
    calls: int | None = None
    compute_s: float | None = None
    error: str | None = None


@dataclass
class ClusterStatus:
    address: str
    nodes: list[dict[str, Any]]
    serve_running: bool
    applications: dict[str, dict[str, Any]] = field(default_factory=dict)
    shards: list[ShardStatus] = field(default_factory=list)
    current_imbalance: dict[str, float] = field(default_factory=dict)  # engine -> last exported value
    metrics_problem: str | None = None  # why current_imbalance may be incomplete


def status_main(ns: argparse.Namespace) -> int:
    """Print the status of the cluster at `ns.address` (default "auto"); 1 when no cluster is reachable."""
    import ray

    address = getattr(ns, "address", None) or "auto"
    connected_here = False
    if not ray.is_initialized():
        problem = _unreachable(address)
        if problem is None:
            try:
                ray.init(address=address, logging_level="ERROR", log_to_driver=False)
                connected_here = True
            except (ConnectionError, RuntimeError, ValueError) as e:
                problem = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        if problem is not None:
            print(f"raymoe status: no Ray cluster reachable at {address!r} ({problem}).\n"
                  "Start one with `raymoe serve` (or `ray start --head`), or pass --address HOST:PORT "
                  "(the GCS address, e.g. 127.0.0.1:6379).", file=sys.stderr)
            return 1
    try:
        print(format_status(collect_status()))
    finally:
        if connected_here:
            ray.shutdown()
    return 0


def _unreachable(address: str) -> str | None:
    """A quick TCP check of a HOST:PORT address (ray.init would retry for a minute); None if it answers."""
    if address == "auto" or "://" in address or ":" not in address:
        return None
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=3.0):
            return None
    except (OSError, ValueError) as e:
        return f"{type(e).__name__}: {e}"


# -- gathering ----------------------------------------------------------------------------------------
def collect_status(timeout_s: float = TIMEOUT_S) -> ClusterStatus:
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    node_names = {n["NodeID"]: _node_label(n) for n in nodes}
    named = ray.util.list_named_actors(all_namespaces=True)
    report = ClusterStatus(address=ray.get_runtime_context().gcs_address, nodes=nodes, serve_running=False)
    _collect_serve(report, named, node_names)
    report.shards = _collect_shards(named, node_names, timeout_s)
    live = {rid for app in report.applications.values() for d in app["deployments"].values()
            for rid, _ in d["replicas"]}
    report.current_imbalance, report.metrics_problem = _current_imbalance(
        live, timeout_s, wait_s=IMBALANCE_WAIT_S if report.shards else 0.0)
    return report


def _node_label(node: dict[str, Any]) -> str:
    return f"{node.get('NodeManagerAddress', '?')} ({node['NodeID'][:8]})"


def _actor_where(actor_id: str, node_names: dict[str, str]) -> tuple[str, str]:
    """(node, state) of an actor from Ray's GCS actor table (private API, so best effort)."""
    import ray

    try:
        info = ray._private.state.state.actor_table(actor_id) or {}
    except Exception:  # the private API moved
        return "?", "?"
    node_id = info.get("Address", {}).get("NodeID", "")
    return node_names.get(node_id, node_id[:8] or "?"), str(info.get("State", "?"))


def _collect_serve(report: ClusterStatus, named: list[dict[str, str]], node_names: dict[str, str]) -> None:
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client

    if _get_global_client(raise_if_no_controller_running=False) is None:
        return
    report.serve_running = True
    replicas: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for actor in named:
        # SERVE_REPLICA::<app>#<deployment>#<replica id>, in the "serve" namespace
        name = actor["name"]
        if actor["namespace"] == "serve" and name.startswith("SERVE_REPLICA::"):
            app, deployment, replica_id = name[len("SERVE_REPLICA::"):].split("#", 2)
            try:
                handle = ray.get_actor(name, namespace="serve")
            except ValueError:  # gone since the listing
                continue
            node, state = _actor_where(handle._actor_id.hex(), node_names)
            where = node if state == "ALIVE" else f"{node} [{state}]"  # e.g. a replacement still starting
            replicas.setdefault((app, deployment), []).append((replica_id, where))
    for app_name, app in serve.status().applications.items():
        report.applications[app_name] = {
            "status": str(app.status.value if hasattr(app.status, "value") else app.status),
            "message": app.message,
            "deployments": {
                name: {"status": str(d.status.value if hasattr(d.status, "value") else d.status),
                       "replica_states": {str(getattr(k, "value", k)): v for k, v in d.replica_states.items()},
                       "replicas": sorted(replicas.get((app_name, name), [])), "message": d.message}
                for name, d in app.deployments.items()},
        }


def _collect_shards(named: list[dict[str, str]], node_names: dict[str, str], timeout_s: float) -> list[ShardStatus]:
    import ray

    shards: list[ShardStatus] = []
    refs: list[tuple[ShardStatus, Any, Any]] = []
    for actor in named:
        name = actor["name"]
        if not name.startswith(SHARD_PREFIX):
            continue
        group, _, index = name[len(SHARD_PREFIX):].rpartition("-")
        if not index.isdigit():
            continue
        shard = ShardStatus(name, actor["namespace"], group, int(index))
        shards.append(shard)
        try:
            handle = ray.get_actor(name, namespace=actor["namespace"])
        except ValueError:
            shard.error = "gone"
            continue
        shard.node = _actor_where(handle._actor_id.hex(), node_names)[0]
        refs.append((shard, handle.load_stats.remote(), handle.node_id.remote()))
    if refs:
        ray.wait([r for _, a, b in refs for r in (a, b)], num_returns=2 * len(refs), timeout=timeout_s)
    for shard, stats_ref, node_ref in refs:
        try:
            stats = ray.get(stats_ref, timeout=0.01)
            node_id = ray.get(node_ref, timeout=0.01)
        except Exception as e:  # GetTimeoutError (restarting, busy) or RayActorError (dead)
            shard.error = f"no answer within {timeout_s:g}s" if "Timeout" in type(e).__name__ else type(e).__name__
            continue
        shard.node = node_names.get(node_id, node_id[:8])
        shard.tokens = int(stats["rows"])
        shard.pairs = int(sum(sum(v) for v in stats["tokens"].values()))
        shard.calls = int(stats["calls"])
        shard.compute_s = float(stats["compute_s"])
    return sorted(shards, key=lambda s: (s.namespace, s.group, s.shard_id))


def _current_imbalance(live_replicas: set[str], timeout_s: float,
                       wait_s: float = 0.0) -> tuple[dict[str, float], str | None]:
    """The last exported `raymoe_expert_load_imbalance` per engine, and why it is missing, if it is.

    Ray's agent drops a gauge whose process missed two export intervals (20 s at Ray's default
    interval, 2 s at the 1 s one the tests use): a replica starved of CPU for a moment, say while
    another one loads its model, vanishes from one scrape and is back at the next. So while nothing
    is found the scrape is repeated for up to `wait_s`.
    """
    deadline = time.monotonic() + wait_s
    while True:
        found, problem = _scrape_imbalance(live_replicas, timeout_s)
        if found or problem or time.monotonic() >= deadline:
            return found, problem
        time.sleep(0.5)


def _scrape_imbalance(live_replicas: set[str], timeout_s: float) -> tuple[dict[str, float], str | None]:
    """One scrape of the imbalance gauges. A gauge of a replica that is no longer live may linger until
    Ray's agent drops it, so engines tagged with a Serve replica id that is not live are left out
    (engines outside Serve are tagged `pid*`/`actor-*`)."""
    import re

    from raymoe.observability.metrics import scrape_cluster

    try:
        text = scrape_cluster(timeout_s=timeout_s, prefixes=("ray_raymoe_expert_load_imbalance",))
    except Exception as e:  # metrics agents unreachable: the report still has the shard-side numbers
        return {}, f"metrics unavailable: {type(e).__name__}: {e}"
    out = {}
    for m in re.finditer(r'^ray_raymoe_expert_load_imbalance\{([^}]*)\} (\S+)$', text, re.M):
        found = re.search(r'engine="([^"]*)"', m.group(1))
        engine = found.group(1) if found else "?"
        if engine in live_replicas or engine.startswith(("pid", "actor-")) or not live_replicas:
            out[engine] = float(m.group(2))
    silent = [line[len("# raymoe: "):] for line in text.splitlines() if line.startswith("# raymoe: node")]
    return out, "; ".join(silent) or None


# -- printing -----------------------------------------------------------------------------------------
def format_status(report: ClusterStatus) -> str:
    cpus = sum(n.get("Resources", {}).get("CPU", 0) for n in report.nodes)
    gpus = sum(n.get("Resources", {}).get("GPU", 0) for n in report.nodes)
    lines = [f"Ray cluster {report.address}: {len(report.nodes)} node(s), {cpus:g} CPU, {gpus:g} GPU", ""]
    lines.append("Serve applications")
    if not report.serve_running:
        lines.append("  Serve is not running on this cluster")
    elif not report.applications:
        lines.append("  none deployed")
    for app_name, app in report.applications.items():
        lines.append(f"  {app_name}: {app['status']}" + (f" ({app['message']})" if app["message"] else ""))
        for name, d in app["deployments"].items():
            states = ", ".join(f"{k} {v}" for k, v in d["replica_states"].items()) or "no replicas"
            lines.append(f"    {name}: {d['status']}, replicas: {states}")
            lines += [f"      replica {rid} on {node}" for rid, node in d["replicas"]]
    lines += ["", "Expert shards"]
    if not report.shards:
        lines.append("  none (experts run inside the engines, or no expert-parallel engine started)")
    groups: dict[tuple[str, str], list[ShardStatus]] = {}
    for s in report.shards:
        groups.setdefault((s.namespace, s.group), []).append(s)
    for (namespace, group), shards in groups.items():
        lines.append(f"  group {group!r} (namespace {namespace!r}), {len(shards)} shard(s)")
        width = max(len("SHARD"), *(len(s.name) for s in shards))
        node_width = max(len("NODE"), *(len(s.node) for s in shards))
        lines.append(f"    {'SHARD':<{width}}  {'NODE':<{node_width}}  {'TOKENS':>9}  {'PAIRS':>9}  {'CALLS':>7}  "
                     f"{'COMPUTE':>8}")
        for s in shards:
            if s.error is not None:
                lines.append(f"    {s.name:<{width}}  {s.node:<{node_width}}  {s.error}")
            else:
                lines.append(f"    {s.name:<{width}}  {s.node:<{node_width}}  {s.tokens:>9}  {s.pairs:>9}  "
                             f"{s.calls:>7}  {s.compute_s:>7.2f}s")
        answered = [s.tokens for s in shards if s.tokens is not None]
        if len(answered) == len(shards) and sum(answered):
            lines.append(f"    imbalance since shard start (max/mean tokens): {load_imbalance(answered):.2f}")
    if report.current_imbalance or (report.shards and report.metrics_problem):
        lines += ["", "Current expert-load imbalance (last export window, max/mean tokens over shards)"]
        lines += [f"  engine {engine}: {value:.2f}" for engine, value in sorted(report.current_imbalance.items())]
        if report.metrics_problem:
            lines.append(f"  ({report.metrics_problem})")
    return "\n".join(lines)
