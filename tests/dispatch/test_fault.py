"""Fault recovery: a shard killed mid-generation, shards gone with the engine that created them, a worker
node removed, a shard that never comes back.

A dead shard fails the current MoE layer; the dispatcher waits for Ray to restart it (bounded by
recovery_timeout_s), re-forms the transport and re-runs that layer, so every request finishes with
exactly the tokens of a fault-free run. A shard that cannot return fails the step with a clear
error, fast, instead of hanging.
"""

from __future__ import annotations

import threading
import time

import pytest
import ray

from raymoe.llm import LLM

from .conftest import LONG_GREEDY, SHARD_KW, WORKER_NODE, actor_nodes, generate_ids, local_greedy

pytestmark = pytest.mark.ray


def _after_steps(llm: LLM, num_steps: int, action) -> threading.Thread:
    """Run `action()` from another thread once the engine has done `num_steps` steps (mid-generation)."""

    def run() -> None:
        deadline = time.monotonic() + 60
        while llm.engine.stats.num_steps < num_steps and time.monotonic() < deadline:
            time.sleep(0.002)
        action()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_killed_shard_recovers_with_identical_tokens_on_both_transports(ray_cluster, make_ckpt):
    path = make_ckpt("tiny")
    want = local_greedy(path, params=LONG_GREEDY)
    kw = dict(num_expert_shards=2, expert_group="fault-kill", **SHARD_KW)
    with LLM(path, transport="ray", **kw) as a:
        for llm in (a, None):
            if llm is None:  # the collective engine joins the same pool (its shard restarted once already)
                llm = LLM(path, transport="collective", **kw)
            try:
                killer = _after_steps(llm, 3, lambda e=llm.engine: ray.kill(e.pool.handles[1], no_restart=False))
                assert generate_ids(llm, LONG_GREEDY) == want
                killer.join()
                times = llm.engine.dispatcher.recovery_times
                print(f"\n{llm.config.parallel.transport}: recovered in {', '.join(f'{t:.2f}s' for t in times)}")
                assert len(times) >= 1
            finally:
                if llm is not a:
                    llm.shutdown()


@ray.remote(num_cpus=0)
class _EngineProcess:
    """An engine in a process of its own, like a Serve replica: Ray ties the shards it creates to it."""

    def __init__(self, path: str, kw: dict) -> None:
        self.llm = LLM(path, transport="ray", **kw)

    def owned(self) -> list[bool]:
        return list(self.llm.engine.pool.owned)

    def shutdown(self) -> None:
        self.llm.shutdown()  # kills the shards it created, as a replica does when Serve scales it down


@pytest.mark.parametrize("how", ["killed", "shut down"])
def test_shards_that_go_away_with_their_creator_are_recreated_by_the_engine_still_using_them(
        ray_cluster, make_ckpt, how):
    path = make_ckpt("tiny")
    want = local_greedy(path, params=LONG_GREEDY)
    kw = dict(num_expert_shards=2, expert_group=f"fault-owner-{how.replace(' ', '')}", **SHARD_KW)
    creator = _EngineProcess.remote(path, kw)
    assert ray.get(creator.owned.remote()) == [True, True]
    groups = _live_placement_groups()
    with LLM(path, transport="ray", **kw) as survivor:
        assert not any(survivor.engine.pool.owned)  # joined: the creator's shards
        assert _live_placement_groups() == groups  # in the creator's placement group
        if how == "killed":  # a replica killed: its shards die with its process (and Ray does not restart them)
            killer = _after_steps(survivor, 3, lambda: ray.kill(creator, no_restart=True))
        else:
            killer = _after_steps(survivor, 3, lambda: ray.get(creator.shutdown.remote()))
        assert generate_ids(survivor, LONG_GREEDY) == want
        killer.join()
        assert all(survivor.engine.pool.owned)  # it re-created both (and will kill them on shutdown)
        assert len(survivor.engine.dispatcher.recovery_times) >= 1
        # the creator's placement group is gone: removed on shutdown, or (killed: groups outlive their
        # creator) by the survivor when it re-created the shards
        assert len(_live_placement_groups()) == len(groups) - 1
    ray.kill(creator)


def _live_placement_groups() -> list[str]:
    from ray.util import placement_group_table

    return sorted(k for k, v in placement_group_table().items() if v["state"] != "REMOVED")


def test_shard_that_never_returns_fails_fast_with_a_clear_error(ray_cluster, make_ckpt):
    path = make_ckpt("tiny")
    kw = dict(SHARD_KW, recovery_timeout_s=30.0)
    for transport in ("ray", "collective"):
        with LLM(path, num_expert_shards=2, transport=transport, max_restarts=0, expert_group=f"fault-dead-{transport}",
                 **kw) as llm:
            killer = _after_steps(llm, 2, lambda e=llm.engine: ray.kill(e.pool.handles[0], no_restart=False))
            start = time.monotonic()
            with pytest.raises(RuntimeError, match=rf"expert shard raymoe-expert-fault-dead-{transport}-0 did not "
                                                   r"recover within 30s"):
                generate_ids(llm, LONG_GREEDY)
            killer.join()
            assert time.monotonic() - start < 30  # no waiting out the timeout once Ray reports the shard DEAD
            assert not llm.engine.has_unfinished()  # its requests were aborted, not left hanging


def test_removed_worker_node_replaces_shards_on_the_remaining_node(ray_cluster, make_ckpt):
    cluster, workers = ray_cluster
    path = make_ckpt("tiny")
    want = local_greedy(path, params=LONG_GREEDY)
    group = "fault-node"
    with LLM(path, num_expert_shards=4, transport="collective", expert_group=group, **SHARD_KW) as llm:
        before = actor_nodes(f"raymoe-expert-{group}-")
        assert len(set(before.values())) == 2
        victim = next(w for w in workers if w.node_id == before[f"raymoe-expert-{group}-1"])
        execute, steps = llm.engine.runner.execute, {"n": 0}

        def remove_before_third_step(out):
            # Removed inside the step, and only once Ray has marked the node dead: a shard process on a
            # killed node can keep answering for a moment, long enough for a short generation to end
            # without ever meeting the fault.
            steps["n"] += 1
            if steps["n"] == 3:
                cluster.remove_node(victim, allow_graceful=False)
                deadline = time.monotonic() + 60
                while any(n["NodeID"] == victim.node_id and n["Alive"] for n in ray.nodes()):
                    assert time.monotonic() < deadline, "Ray did not mark the removed node dead"
                    time.sleep(0.1)
            return execute(out)

        llm.engine.runner.execute = remove_before_third_step
        try:
            assert generate_ids(llm, LONG_GREEDY) == want
            assert steps["n"] > 3 and llm.engine.dispatcher.recovery_times  # the fault was met mid-generation
            survivor = next(w.node_id for w in workers if w is not victim)
            assert set(llm.engine.pool.node_ids()) == {survivor}
            assert set(actor_nodes(f"raymoe-expert-{group}-").values()) == {survivor}
            print(f"\nnode removed: recovered in {llm.engine.dispatcher.recovery_times}")
        finally:
            workers[workers.index(victim)] = cluster.add_node(**WORKER_NODE)  # restore 3 nodes for later tests
            cluster.wait_for_nodes()
