"""Transports against the local reference: ray and collective dispatchers == LocalDispatcher.

Also: gloo collective between plain processes (no Ray) with its failure detection and recovery
loop, one shard pool serving two engines at the same time, and the guard against joining a pool that
serves another model.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time

import pytest
import torch

from raymoe.config import ParallelConfig
from raymoe.dispatch.collective import CollectiveDispatcher, serve_shard
from raymoe.dispatch.local import LocalDispatcher
from raymoe.dispatch.routing import local_expert_ids, unpack_rows
from raymoe.experts.compute import LoopExperts
from raymoe.experts.placement import ExpertPlacement
from raymoe.llm import LLM
from raymoe.model.loader import Checkpoint
from raymoe.observability.dispatch_metrics import DispatchMetrics

from .conftest import SHARD_KW, TOL, generate_ids, local_greedy

NUM_TOKENS = [1, 33, 200]


def _inputs(args, num_tokens: int, dtype: torch.dtype):
    x = torch.randn(num_tokens, args.hidden_size).to(dtype)
    ids = torch.rand(num_tokens, args.n_routed_experts).topk(args.num_experts_per_tok, dim=1).indices
    return x, ids, torch.rand(num_tokens, args.num_experts_per_tok)


def _local(path: str, placement: ExpertPlacement, dtype: torch.dtype) -> LocalDispatcher:
    return LocalDispatcher(placement, [LoopExperts.from_checkpoint(Checkpoint(path), placement.shard_experts(s),
                                                                   int4=False, dtype=dtype)
                                       for s in range(placement.num_shards)])


def _assert_same(dispatcher, reference, args, dtype):
    for layer_id in reference.placement.layer_ids:
        for num_tokens in NUM_TOKENS:
            x, ids, w = _inputs(args, num_tokens, dtype)
            rtol, atol = TOL[dtype]
            torch.testing.assert_close(dispatcher(layer_id, x, ids, w).float(), reference(layer_id, x, ids, w).float(),
                                       rtol=rtol, atol=atol)


# -- collective over gloo between plain processes (no Ray) -------------------------------------------
def _shard_process(path: str, experts: dict, host: str, port: int, world_size: int, rank: int) -> None:
    compute = LoopExperts.from_checkpoint(Checkpoint(path), experts, int4=False, dtype=torch.float32)
    args = compute.args

    def forward(layer_id: int, packed: torch.Tensor) -> torch.Tensor:
        x, slots, w = unpack_rows(packed, args.hidden_size, args.num_experts_per_tok, torch.float32)
        return compute.forward(layer_id, x, local_expert_ids(slots, rank - 1, args.n_routed_experts), w)

    try:
        serve_shard(host, port, world_size, rank, "gloo", forward, torch.device("cpu"), "127.0.0.1",
                    threading.Event())
    except RuntimeError:
        pass  # the engine dropped the group


class ProcessPool:
    """What CollectiveDispatcher needs from an ExpertPool, with spawned processes instead of actors."""

    def __init__(self, path: str, placement: ExpertPlacement) -> None:
        self.path, self.placement = path, placement
        self.num_shards = placement.num_shards
        self.procs: list[mp.Process] = []

    def engine_ip(self) -> str:
        return "127.0.0.1"

    def start_collective(self, key: str, host: str, port: int, backend: str) -> None:
        ctx = mp.get_context("spawn")
        self.procs = [ctx.Process(target=_shard_process, daemon=True,
                                  args=(self.path, self.placement.shard_experts(s), host, port, self.num_shards + 1,
                                        s + 1)) for s in range(self.num_shards)]
        for p in self.procs:
            p.start()

    def stop_collective(self, key: str) -> None:
        pass

    def wait_recovered(self, timeout_s: float) -> None:
        for p in self.procs:  # the survivors exit once the engine drops the group
            p.join(timeout_s)

    def sync_experts(self, experts: dict) -> None:
        pass

    def close(self) -> None:
        for p in self.procs:
            p.kill()
            p.join()


def test_gloo_collective_between_processes_matches_local_and_recovers_from_a_killed_rank(make_ckpt):
    path = make_ckpt("tiny")
    args = Checkpoint(path).args
    placement = ExpertPlacement.contiguous(args.n_routed_experts, 2, [1, 2])
    pool = ProcessPool(path, placement)
    dispatcher = CollectiveDispatcher(pool, placement, recovery_timeout_s=60)
    try:
        reference = _local(path, placement, torch.float32)
        _assert_same(dispatcher, reference, args, torch.float32)
        x, ids, w = _inputs(args, 6000, torch.float32)  # > INLINE_BYTES per shard: header, then rows
        torch.testing.assert_close(dispatcher(1, x, ids, w), reference(1, x, ids, w))
        pool.procs[1].kill()
        x, ids, w = _inputs(args, 33, torch.float32)
        torch.testing.assert_close(dispatcher(1, x, ids, w), reference(1, x, ids, w))
        assert len(dispatcher.recovery_times) == 1
    finally:
        dispatcher.close()
        pool.close()


# -- on Ray -------------------------------------------------------------------------------------------
@pytest.mark.ray
@pytest.mark.parametrize("dtype", [torch.bfloat16])  # fp32 runs in test_multinode (INT4 rows)
def test_ray_and_collective_dispatchers_match_local(ray_cluster, make_ckpt, dtype):
    from raymoe.dispatch.ray_transport import RayDispatcher
    from raymoe.experts.worker import ExpertPool

    path = make_ckpt("tiny-384e")
    args = Checkpoint(path).args
    placement = ExpertPlacement.contiguous(args.n_routed_experts, 3, [1, 2])
    pcfg = ParallelConfig(num_expert_shards=3, transport="ray", expert_group=f"tr-{dtype}".replace(".", ""),
                          **SHARD_KW)
    pool = ExpertPool.create_or_join(pcfg, model_path=path, dtype=str(dtype).removeprefix("torch."),
                                     int4_mode="packed", placement=placement)
    collective = None
    try:
        reference = _local(path, placement, dtype)
        _assert_same(RayDispatcher(pool, placement), reference, args, dtype)
        # with latency sampling on, the ray transport times each shard's answer; results are unchanged
        timed = RayDispatcher(pool, placement)
        timed.metrics = DispatchMetrics(3, args.n_routed_experts, engine="t", latency_interval_s=0)
        x, ids, w = _inputs(args, 33, dtype)
        torch.testing.assert_close(timed(1, x, ids, w), reference(1, x, ids, w))
        used = {s for s in range(3) if int(timed.shard_tokens[s]) > 0}
        assert used and set(timed.shard_seconds) == used and all(v > 0 for v in timed.shard_seconds.values())
        collective = CollectiveDispatcher(pool, placement)
        _assert_same(collective, reference, args, dtype)
        stats = pool.load_stats()
        assert sum(s["rows"] for s in stats) > 0
    finally:
        if collective is not None:
            collective.close()
        pool.close()


@pytest.mark.ray
def test_one_pool_serves_two_engines_at_once(ray_cluster, make_ckpt):
    path = make_ckpt("tiny", "int4")
    want = local_greedy(path)
    kw = dict(num_expert_shards=2, expert_group="shared", **SHARD_KW)
    with LLM(path, transport="ray", **kw) as a, LLM(path, transport="collective", **kw) as b:
        assert all(a.engine.pool.owned) and not any(b.engine.pool.owned)
        results: dict[str, list[list[int]]] = {}
        threads = [threading.Thread(target=lambda n=n, llm=llm: results.__setitem__(n, generate_ids(llm)))
                   for n, llm in (("a", a), ("b", b))]
        start = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert results == {"a": want, "b": want}, f"after {time.monotonic() - start:.1f}s"
        assert b.engine.pool.node_ids() == a.engine.pool.node_ids()


@pytest.mark.ray
def test_an_engine_that_loses_the_race_for_the_shard_names_adopts_them_without_owning_them(
        ray_cluster, make_ckpt, monkeypatch):
    """Engines of one group start together (Serve replicas): both find no shards and both create them.
    The loser must adopt the winner's shards without owning them (Ray ties a shard to its creator)."""
    import ray
    from ray.util import placement_group_table

    from raymoe.experts.worker import ExpertPool

    def live_groups() -> set[str]:
        return {k for k, v in placement_group_table().items() if v["state"] != "REMOVED"}

    path = make_ckpt("tiny")
    want = local_greedy(path)
    kw = dict(num_expert_shards=2, transport="ray", expert_group="race", **SHARD_KW)
    with LLM(path, **kw) as a:
        groups = live_groups()
        real_lookup = ExpertPool._lookup
        looks = {"n": 0}

        def late_lookup(self, i):  # the first look at each name finds nothing: the other engine is mid-create
            looks["n"] += 1
            return None if looks["n"] <= 2 else real_lookup(self, i)

        monkeypatch.setattr(ExpertPool, "_lookup", late_lookup)
        with LLM(path, **kw) as b:
            assert all(a.engine.pool.owned) and not any(b.engine.pool.owned)
            assert [h._actor_id for h in b.engine.pool.handles] == [h._actor_id for h in a.engine.pool.handles]
            assert b.engine.pool.pg is None and live_groups() == groups  # it released the group it made in vain
            assert generate_ids(b) == want
        assert all(ray.get([h.ping.remote() for h in a.engine.pool.handles]))  # b's shutdown left them alone
        assert generate_ids(a) == want


@pytest.mark.ray
def test_joining_a_pool_that_serves_another_model_is_rejected(ray_cluster, make_ckpt):
    kw = dict(num_expert_shards=1, transport="ray", expert_group="guard", **SHARD_KW)
    with LLM(make_ckpt("tiny"), **kw):
        with pytest.raises(ValueError, match="raymoe-expert-guard-0 already exists and serves"):
            LLM(make_ckpt("tiny", "int4"), **kw)


@pytest.mark.ray
def test_expert_shards_run_the_fused_int4_kernel_when_configured(ray_cluster, make_ckpt):
    """kernels.backend='triton' reaches the shards: each resolves it for its own device (CPU here, through
    TRITON_INTERPRET=1 inherited from the driver) and runs fused_moe_w4a16; tokens equal the local torch path."""
    pytest.importorskip("triton")
    import ray

    path = make_ckpt("tiny", "int4")
    want = local_greedy(path)
    with LLM(path, num_expert_shards=2, transport="ray", expert_group="w4a16", kernels_backend="triton",
             **SHARD_KW) as llm:
        assert generate_ids(llm) == want
        uses = ray.get([h.__ray_call__.remote(lambda w: [w.compute.layer(i)._int4 is not None
                                                         for i in w.compute.expert_ids()])
                        for h in llm.engine.pool.handles])
        assert uses and all(all(u) for u in uses)
