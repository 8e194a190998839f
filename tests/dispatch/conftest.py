"""Fixtures for the expert-parallel tests: tiny checkpoints, one 3-node Ray cluster, greedy references.

The cluster (head + two worker nodes, each with 4 units of the custom `expert` resource) is started
once for this test package and shared by every Ray test here: starting it costs ~15-25 s on a
2-core machine.
Ray gets its own temp dir and token auth is switched off (Ray 2.60 enables it by default and would
otherwise write ~/.ray/auth_token); both env changes are undone at the end.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

from raymoe.engine.request import SamplingParams
from tests.helpers import isolated_ray_env

# 6 prompts of different lengths (a mixed prefill/decode batch).
PROMPTS = [[5 + i * 7 + j for j in range(n)] for i, n in enumerate([1, 3, 7, 12, 20, 33])]
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
LONG_GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)  # room for a fault mid-run
# Shards ask for half a CPU: 4 of them fit on one 2-CPU worker node after the other one is removed.
SHARD_KW = dict(shard_num_cpus=0.5, recovery_timeout_s=60.0)
WORKER_NODE = dict(num_cpus=2, resources={"expert": 4})


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ckpts")


@pytest.fixture(scope="session")
def make_ckpt(ckpt_dir):
    """make_ckpt(preset, quant) -> path, created once per session."""
    from raymoe.model.tiny import make_tiny

    made: dict[tuple[str, str | None], str] = {}

    def get(preset: str = "tiny", quant: str | None = None) -> str:
        key = (preset, quant)
        if key not in made:
            made[key] = str(make_tiny(ckpt_dir / f"{preset}-{quant or 'bf16'}", preset=preset, seed=0, quant=quant))
        return made[key]

    return get


def local_greedy(path: str, dtype: str = "auto", params: SamplingParams = GREEDY) -> list[list[int]]:
    """Reference: the same generate() with experts in-process."""
    from raymoe.llm import LLM

    with LLM(path, dtype=dtype) as llm:
        return generate_ids(llm, params)


def generate_ids(llm, params: SamplingParams = GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=params)]


@pytest.fixture(scope="package")  # torn down before other test packages start their own Ray
def ray_cluster():
    """A head node (no expert resource) and two worker nodes with {"expert": 4}; the driver is connected."""
    import ray
    from ray.cluster_utils import Cluster

    # Fast node-death detection, so removing a node is noticed in ~2 s instead of ~30 s.
    system_config = {"health_check_period_ms": 500, "health_check_failure_threshold": 3,
                     "health_check_initial_delay_ms": 0}
    with isolated_ray_env("rm"):
        cluster = None
        try:
            # The dashboard serves Ray's state API (list_actors); other Ray instances here may hold 8265.
            cluster = Cluster(initialize_head=True, head_node_args={
                "num_cpus": 1, "_system_config": system_config, "include_dashboard": True,
                "dashboard_port": _free_port()})
            workers = [cluster.add_node(**WORKER_NODE) for _ in range(2)]
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, log_to_driver=False)
            yield cluster, workers
        finally:
            ray.shutdown()
            if cluster is not None:
                cluster.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def actor_nodes(prefix: str) -> dict[str, str]:
    """{actor name: node id} of ALIVE actors whose name starts with prefix (Ray's state API)."""
    import ray
    from ray.util.state import list_actors

    # An explicit address: "auto" would pick any other Ray instance running on this machine.
    alive = list_actors(address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")])
    return {a.name: a.node_id for a in alive if a.name.startswith(prefix)}


TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)}
