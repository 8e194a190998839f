"""Engine and expert-tier metrics through Ray's metrics agent, checked against the router's own decisions.

One expert-parallel engine (2 shards, ray transport, per-expert metrics on) runs in this driver under
`AsyncEngine`, as in an AttentionTier replica. Every Gate output is captured with a forward hook, so
the test can count, independently of the dispatcher, which tokens each shard and expert should have
received. A batch runs, then the same prompts again (prefix-cache hits) while shard 1 is killed
(Ray restarts it: one restart, retried layers). The metrics agent is scraped throughout.
"""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request
from collections import defaultdict

import pytest
import torch

from raymoe.engine.request import SamplingParams
from raymoe.observability.dispatch_metrics import LAYER_GROUP_SIZE, layer_group_label
from raymoe.observability.metrics import SPECS, scrape_cluster

from .conftest import MaxScraper, local_ray, parse_samples, totals

pytestmark = pytest.mark.ray

ENGINE_METRICS = ["raymoe_num_requests_running", "raymoe_num_requests_waiting", "raymoe_batch_size",
                  "raymoe_kv_cache_usage_ratio", "raymoe_prefix_cache_hit_rate", "raymoe_prefix_cache_hit_tokens_total",
                  "raymoe_prefix_cache_queried_tokens_total", "raymoe_tokens_per_second", "raymoe_engine_step_seconds"]
DISPATCH_METRICS = ["raymoe_dispatch_latency_seconds", "raymoe_shard_tokens_total", "raymoe_expert_load_imbalance",
                    "raymoe_expert_tokens_total", "raymoe_shard_restarts_total", "raymoe_step_retries_total"]
# 6 prompts sharing a 32-token prefix (2 KV blocks): the second pass hits the prefix cache
PROMPTS = [[7 + j for j in range(32)] + [100 + 9 * i + j for j in range(4 + 3 * i)] for i in range(6)]
# 96 tokens with 2 sequences at a time: the last two prompts wait ~192 steps, longer than the 0.5 s gauge
# refresh plus the 1 s export interval, so a scrape sees them waiting however fast a step is
PARAMS = SamplingParams(temperature=0.0, max_tokens=96, ignore_eos=True)


def _run(engine, tag: str) -> None:
    async def one(i: int, prompt: list[int]) -> None:
        async for _ in engine.generate(f"{tag}-{i}", prompt, PARAMS):
            pass

    async def run_all() -> None:
        await asyncio.gather(*(one(i, p) for i, p in enumerate(PROMPTS)))

    asyncio.run(run_all())


def _expected(captured: list[tuple[int, torch.Tensor]], placement, num_experts: int):
    """Tokens per (layer group, shard) and pairs per (layer, expert), counted from the Gate outputs."""
    shards: dict[tuple[str, str], int] = defaultdict(int)
    experts: dict[tuple[str, str], int] = defaultdict(int)
    for layer_id, topk_ids in captured:
        shard_ids = placement.route(layer_id, topk_ids)  # [T,K]
        hit = torch.zeros(topk_ids.shape[0], placement.num_shards, dtype=torch.bool)
        hit.scatter_(1, shard_ids, True)  # a token goes once to each shard it visits
        for s, n in enumerate(hit.sum(0).tolist()):
            shards[(str(s), layer_group_label(layer_id, LAYER_GROUP_SIZE))] += n
        for e, n in enumerate(torch.bincount(topk_ids.reshape(-1), minlength=num_experts).tolist()):
            experts[(str(layer_id), str(e))] += n
    return {k: v for k, v in shards.items() if v}, {k: v for k, v in experts.items() if v}


@pytest.fixture(scope="module")
def run(tiny_ckpt):
    import ray

    from raymoe.config import RayMoEConfig
    from raymoe.engine.async_engine import AsyncEngine
    from raymoe.engine.executor import build_engine
    from raymoe.model.moe import MoE

    with local_ray(num_cpus=4):
        config = RayMoEConfig.model_validate({
            "model": {"path": str(tiny_ckpt), "dtype": "float32"},
            "engine": {"max_num_seqs": 2, "kv_cache_memory": 4 << 20},  # 6 prompts: 4 wait
            "parallel": {"num_expert_shards": 2, "transport": "ray", "shard_num_cpus": 0.5, "expert_group": "obs",
                         "per_expert_metrics": True, "recovery_timeout_s": 60}})
        core = build_engine(config)
        captured: list[tuple[int, torch.Tensor]] = []
        for m in core.runner.model.modules():
            if isinstance(m, MoE):
                m.gate.register_forward_hook(lambda _m, _i, out, lid=m.layer_id: captured.append((lid, out[0].clone())))
        engine = AsyncEngine(core)
        scraper = MaxScraper(scrape_cluster).start()
        try:
            _run(engine, "a")
            phase1 = _expected(captured, core.placement, core.args.n_routed_experts)
            shard_stats = core.pool.load_stats()

            def kill_mid_run() -> None:
                start = core.stats.num_steps
                while core.stats.num_steps < start + 3:
                    time.sleep(0.002)
                ray.kill(core.pool.handles[1], no_restart=False)

            killer = threading.Thread(target=kill_mid_run, daemon=True)
            killer.start()
            _run(engine, "b")
            killer.join(timeout=60)
            want_shards, want_experts = _expected(captured, core.placement, core.args.n_routed_experts)
            names = [f"ray_{n}" for n in ENGINE_METRICS + DISPATCH_METRICS]
            missing = scraper.missing(names, timeout_s=30)
            # the idle engine has pushed every count; wait until the agent has exported the last of them
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                got = totals(scraper.text, "ray_raymoe_shard_tokens_total", "shard", "layer_group")
                if got == want_shards:
                    break
                time.sleep(0.25)
            node = ray.nodes()[0]
            with urllib.request.urlopen(f"http://127.0.0.1:{node['MetricsExportPort']}/metrics", timeout=5) as r:
                direct = r.read().decode()
            yield dict(missing=missing, max=dict(scraper.max), text=scraper.text, direct=direct, phase1=phase1,
                       shard_stats=shard_stats, want_shards=want_shards, want_experts=want_experts,
                       recoveries=list(core.dispatcher.recovery_times), replica=engine.metrics.replica)
        finally:
            scraper.stop()
            engine.shutdown()


def test_every_engine_and_dispatch_metric_is_exported_with_a_non_zero_value(run):
    assert run["recoveries"], "killing shard 1 mid-run should have forced a recovery"
    assert run["missing"] == [], {n: run["max"].get(n) for n in run["missing"]}
    assert set(ENGINE_METRICS + DISPATCH_METRICS) <= set(SPECS)
    # Ray's own endpoint (what a PodMonitor scrapes) has the same series as scrape_cluster()
    direct = {name for name, _, _ in parse_samples(run["direct"]) if name.startswith("ray_raymoe_")}
    assert {f"ray_{n}" for n in DISPATCH_METRICS if SPECS[n][0] != "histogram"} <= direct
    assert "ray_raymoe_engine_step_seconds_bucket" in direct


def test_engine_series_carry_the_replica_tag_and_no_per_request_labels(run):
    for name, labels, _ in parse_samples(run["text"]):
        if name.startswith("ray_raymoe_"):
            assert not {"request_id", "request", "prompt"} & set(labels), (name, labels)
    running = [labels for name, labels, _ in parse_samples(run["text"]) if name == "ray_raymoe_num_requests_running"]
    assert running and {labels["replica"] for labels in running} == {run["replica"]}


def test_exported_tokens_per_shard_and_expert_equal_the_routers_decisions(run):
    got_shards = totals(run["text"], "ray_raymoe_shard_tokens_total", "shard", "layer_group")
    got_experts = totals(run["text"], "ray_raymoe_expert_tokens_total", "layer", "expert")
    assert got_shards == run["want_shards"]
    assert got_experts == run["want_experts"]


def test_the_shards_computed_exactly_the_pairs_the_router_sent_them(run):
    """Before the kill: each shard's own count of (token, expert) pairs per layer equals the Gate's."""
    _, want_experts = run["phase1"]
    got: dict[tuple[str, str], int] = defaultdict(int)
    for stats in run["shard_stats"]:
        for layer_id, counts in stats["tokens"].items():
            for e, n in enumerate(counts):
                if n:
                    got[(str(layer_id), str(e))] += n
    assert dict(got) == want_experts
