"""`raymoe serve` under load: every metric in SPECS reaches `GET /metrics`, the dashboard's, `raymoe status`.

A Ray cluster (own temp dir, metrics exported every second) is started here; `raymoe serve` joins it
as a subprocess with two AttentionTier replicas sharing two expert shards (per-expert metrics on).
Four clients stream chat requests while the test adds what ordinary traffic does not produce: a
bad request (errors), a Heavy Mode request, a killed expert shard (restart, retried layers) and a
killed tier replica that does not own the shards (resubmissions). `/metrics` is polled throughout and
each series' largest value kept, since gauges like in-flight requests are non-zero only under load.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from raymoe.cli import main
from raymoe.observability.dashboard import CHART_FILE, expressions
from raymoe.observability.metrics import SPECS, scrape_cluster
from tests.helpers import isolated_ray_env, read_lines, wait_for_banner

from .conftest import MaxScraper, base_name

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]
GROUP = "live"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_config(path: Path, ckpt: Path) -> Path:
    config = {
        "model": {"path": str(ckpt), "dtype": "float32"},
        "engine": {"max_num_seqs": 1, "kv_cache_memory": 4 << 20},  # 4 clients, 2 replicas: some wait
        "parallel": {"num_expert_shards": 2, "transport": "ray", "shard_num_cpus": 0.5, "expert_group": GROUP,
                     "per_expert_metrics": True, "recovery_timeout_s": 60},
        "serve": {"ingress": {"num_cpus": 0.5},
                  "attention": {"num_cpus": 0.5, "autoscaling": {"min_replicas": 2, "max_replicas": 2}},
                  "heavy": {"default_trajectories": 2}},
    }
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


class _Load:
    """Clients streaming chat requests in a loop until stopped."""

    def __init__(self, url: str, model: str, num_clients: int = 4) -> None:
        self.url, self.model = url, model
        self.stop = threading.Event()
        self.num_done = 0
        self.lost: list[str] = []  # time, status and body of each request answered with an error
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(num_clients)]

    def _client(self, i: int) -> None:
        n = 0
        with httpx.Client(base_url=self.url, timeout=120) as client:
            while not self.stop.is_set():
                body = {"model": self.model, "max_tokens": 32, "temperature": 0, "ignore_eos": True, "stream": True,
                        "messages": [{"role": "user", "content": f"client {i} request {n % 3}: tell me a story"}]}
                with client.stream("POST", "/v1/chat/completions", json=body) as r:
                    lines = list(r.iter_lines())
                    # an error event after a 200 (the stream failed midway) is a lost request too
                    if r.status_code != 200 or any(line.startswith('data: {"error"') for line in lines):
                        self.lost.append(f"{time.monotonic():.1f} {r.status_code} {' '.join(lines)[-500:]}")
                n += 1
                self.num_done += 1

    def start(self) -> _Load:
        for t in self.threads:
            t.start()
        return self

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)


def _shard(ray, index: int):
    """A shard actor by name, in whichever namespace its creator (a tier replica) runs."""
    name = f"raymoe-expert-{GROUP}-{index}"
    namespace = next(a["namespace"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"] == name)
    return ray.get_actor(name, namespace=namespace)


def _tier_replicas(ray) -> list[str]:
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "#AttentionTier#" in a["name"])


def _owner_of_shards(ray) -> tuple[str, str]:
    """(ip, port) of the worker that created shard 0 (its death takes the shard along; the other replica
    would re-create it, but this test kills a replica for its resubmissions, not for that)."""
    handle = _shard(ray, 0)
    owner = ray._private.state.state.actor_table(handle._actor_id.hex())["OwnerAddress"]
    return owner["IPAddress"], str(owner["Port"])


def _non_owner_tier_replica(ray) -> str:
    owner = _owner_of_shards(ray)
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["namespace"] == "serve" and "#AttentionTier#" in actor["name"]:
            handle = ray.get_actor(actor["name"], namespace="serve")
            address = ray._private.state.state.actor_table(handle._actor_id.hex())["Address"]
            if (address["IPAddress"], str(address["Port"])) != owner:
                return actor["name"]
    raise AssertionError("no AttentionTier replica without the shards")


def _wait_replaced(ray, victim: str, timeout_s: float) -> None:
    """Until Serve runs two live AttentionTier replicas again, none of them the killed one."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = []
        for actor in ray.util.list_named_actors(all_namespaces=True):
            if actor["namespace"] == "serve" and "#AttentionTier#" in actor["name"] and actor["name"] != victim:
                handle = ray.get_actor(actor["name"], namespace="serve")
                if ray._private.state.state.actor_table(handle._actor_id.hex())["State"] == "ALIVE":
                    alive.append(actor["name"])
        app = serve.status().applications["raymoe"]
        if len(alive) == 2 and app.status == "RUNNING" and app.deployments["AttentionTier"].replica_states == {
                "RUNNING": 2}:
            return
        time.sleep(0.5)
    raise AssertionError(f"Serve did not replace {victim} within {timeout_s:g}s")


@pytest.fixture(scope="module")
def live(tiny_ckpt, tmp_path_factory):
    import ray
    from ray.cluster_utils import Cluster

    tmp = tmp_path_factory.mktemp("live")
    with isolated_ray_env("rml"):
        cluster = proc = scraper = load = None
        output: list[str] = []
        try:
            cluster = Cluster(initialize_head=True, head_node_args={
                "num_cpus": 8, "include_dashboard": False, "_system_config": {"metrics_report_interval_ms": 1000}})
            ray.init(address=cluster.address, log_to_driver=False)
            port = _free_port()
            config = _write_config(tmp / "raymoe.yaml", tiny_ckpt)
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            proc = subprocess.Popen([sys.executable, "-m", "raymoe.cli", "serve", str(config), "--port", str(port),
                                     "--address", cluster.address], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
            lines = read_lines(proc)
            wait_for_banner(proc, lines, output, timeout_s=240)
            url = f"http://127.0.0.1:{port}"
            model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
            scraper = MaxScraper(lambda: httpx.get(f"{url}/metrics", timeout=10).text).start()
            load = _Load(url, model).start()
            chat = {"model": model, "max_tokens": 16, "temperature": 0,
                    "messages": [{"role": "user", "content": "Is the sky blue? Answer yes or no."}]}
            bad = httpx.post(f"{url}/v1/chat/completions", json={**chat, "max_tokens": -5}, timeout=60)
            heavy = httpx.post(f"{url}/v1/chat/completions",
                               json={**chat, "heavy": {"trajectories": 2, "aggregate": "vote"}}, timeout=120)
            while load.num_done < 4:
                time.sleep(0.1)
            at_start = _tier_replicas(ray)
            events = [f"{time.monotonic():.1f} kill shard 1"]
            ray.kill(_shard(ray, 1), no_restart=False)
            assert scraper.missing(["ray_raymoe_shard_restarts_total"], timeout_s=60) == []
            victim = _non_owner_tier_replica(ray)
            events.append(f"{time.monotonic():.1f} kill replica {victim}")
            ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
            missing = scraper.missing([f"ray_{n}" for n in SPECS], timeout_s=60)
            load.finish()
            _wait_replaced(ray, victim, timeout_s=120)
            while not lines.empty():
                output.append(lines.get())
            errors = [line.rstrip() for line in output if re.search(r"ERROR|Error|WARNING|Traceback", line)]
            text = scrape_cluster(prefixes=("ray_raymoe_expert_load_imbalance", "ray_raymoe_num_requests_running"))
            gauges = "\n".join(re.sub(r'(Session\w*|Version|WorkerId|otel_scope_\w+|NodeAddress|Component)="[^"]*",?', "",
                                      line) for line in text.splitlines() if not line.startswith("#"))
            replicas = _tier_replicas(ray)
            yield dict(address=cluster.address, url=url, missing=missing, max=dict(scraper.max),
                       bad=bad.status_code, heavy=heavy.status_code, heavy_body=heavy.text, lost=load.lost,
                       log="\n".join(events + errors[-60:]),
                       debug=f"\nreplicas {at_start}, victim {victim}, now {replicas}\n{gauges}")
        finally:
            if load is not None:
                load.finish()
            if scraper is not None:
                scraper.stop()
            if proc is not None:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(timeout=60)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
            ray.shutdown()
            if cluster is not None:
                cluster.shutdown()


def test_metrics_endpoint_has_every_spec_metric_with_a_non_zero_value(live):
    assert live["bad"] == 400
    assert live["heavy"] == 200, live["heavy_body"]
    # the killed shard and replica cost no client a request: no error status, no error event mid-stream
    assert live["lost"] == [], "\n".join(live["lost"]) + "\n" + live["log"]
    assert live["missing"] == [], {n: live["max"].get(n) for n in live["missing"]}


def test_every_dashboard_expression_uses_only_metrics_the_live_scrape_has(live):
    board = json.loads(CHART_FILE.read_text())
    scraped = {base_name(n) for n in live["max"]}
    used = set()
    for expr in expressions(board):
        used |= {base_name(n) for n in re.findall(r"\b(ray_[a-zA-Z0-9_]+)\b", expr) if n != "ray_io_cluster"}
    assert used, "no PromQL found"
    assert sorted(used - scraped) == []
    assert {f"ray_{n}" for n in SPECS} <= used  # and the dashboard shows every raymoe metric


def test_raymoe_status_prints_apps_replicas_shards_nodes_and_load(live, capsys):
    import ray

    ray.shutdown()  # status connects on its own, as from another terminal
    assert main(["status", "--address", live["address"]]) == 0
    out = capsys.readouterr().out
    assert re.search(r"raymoe: RUNNING", out), out
    assert re.search(r"AttentionTier: HEALTHY, replicas: RUNNING 2", out), out
    assert re.search(r"OpenAiIngress: HEALTHY, replicas: RUNNING 1", out), out
    assert len(re.findall(r"replica \w+ on \d+\.\d+\.\d+\.\d+ \(\w{8}\)", out)) == 3, out
    shards = re.findall(rf"raymoe-expert-{GROUP}-(\d)\s+(\S+ \(\w{{8}}\))\s+(\d+)\s+(\d+)\s+(\d+)", out)
    assert [s[0] for s in shards] == ["0", "1"], out
    assert int(shards[0][2]) > 0  # shard 0 served tokens since it started (shard 1 restarted mid-run)
    assert re.search(r"imbalance since shard start \(max/mean tokens\): \d+\.\d\d", out), out
    assert re.search(r"engine \w+: \d+\.\d\d", out), out + live["debug"]
