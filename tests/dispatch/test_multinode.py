"""Expert parallelism on a 3-node Ray cluster: remote transports give local's greedy tokens, shards spread.

Matrix (one shared cluster; each row runs BOTH remote transports, the collective engine joining the
pool the ray engine created, which also proves one pool serves several engines):

    preset     experts  dtype      shards
    tiny       BF16     bfloat16   1
    tiny       INT4     float32    2
    tiny       BF16     bfloat16   4
    tiny-384e  INT4     float32    4
    tiny-384e  BF16     bfloat16   2

Every axis (1/2/4 shards, ray/collective, tiny/tiny-384e, BF16/INT4) is covered at least once; the
full 24-way product would spend ~4 minutes starting actors on a 2-core machine.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from raymoe.llm import LLM

from .conftest import SHARD_KW, actor_nodes, generate_ids, local_greedy

pytestmark = pytest.mark.ray

MATRIX = [
    ("tiny", None, "bfloat16", 1),
    ("tiny", "int4", "auto", 2),
    ("tiny", None, "bfloat16", 4),
    ("tiny-384e", "int4", "auto", 4),
    ("tiny-384e", None, "bfloat16", 2),
]


@pytest.mark.parametrize("preset,quant,dtype,num_shards", MATRIX)
def test_remote_transports_match_local_and_shards_land_on_worker_nodes(ray_cluster, make_ckpt, preset, quant, dtype,
                                                                       num_shards):
    _, workers = ray_cluster
    path = make_ckpt(preset, quant)
    want = local_greedy(path, dtype)
    group = f"mn-{preset}-{quant or 'bf16'}-{num_shards}"
    with LLM(path, dtype=dtype, num_expert_shards=num_shards, transport="ray", expert_group=group, **SHARD_KW) as a:
        assert generate_ids(a) == want
        nodes = actor_nodes(f"raymoe-expert-{group}-")
        assert sorted(nodes) == [f"raymoe-expert-{group}-{s}" for s in range(num_shards)]
        assert set(nodes.values()) <= {w.node_id for w in workers}  # only nodes with the `expert` resource
        assert len(set(nodes.values())) == min(num_shards, 2)  # SPREAD over both worker nodes
        assert a.engine.pool.node_ids() == [nodes[n] for n in a.engine.pool.names]
        with LLM(path, dtype=dtype, num_expert_shards=num_shards, transport="collective", expert_group=group,
                 **SHARD_KW) as b:
            assert not any(b.engine.pool.owned)  # joined the pool, created nothing
            assert generate_ids(b) == want
        stats = a.engine.pool.load_stats()
        assert all(s["calls"] > 0 for s in stats)  # both engines' tokens reached every shard
    assert not actor_nodes(f"raymoe-expert-{group}-")  # the creator's close() killed its shards


def _skewed_copy(src: str, dst: Path, hot: list[int], bias: float) -> str:
    """Copy a checkpoint with e_score_correction_bias raised on `hot` experts: most tokens pick them."""
    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        state = load_file(f)
        names = [n for n in state if n.endswith("e_score_correction_bias")]
        for n in names:
            state[n] = state[n].clone()
            state[n][hot] += bias
        if names:
            save_file(state, f, metadata={"format": "pt"})
    return str(dst)


def test_redundant_replicas_cut_the_most_loaded_shard_and_keep_outputs(ray_cluster, make_ckpt, tmp_path):
    path = _skewed_copy(make_ckpt("tiny"), tmp_path / "skewed", hot=[0, 1], bias=1.0)
    want = local_greedy(path)
    kw = dict(num_expert_shards=2, **SHARD_KW)
    with LLM(path, transport="ray", expert_group="eplb-plain", **kw) as plain:
        assert generate_ids(plain) == want
        before = plain.engine.dispatcher.shard_tokens
    with LLM(path, transport="collective", num_redundant_experts=2, expert_group="eplb-replicas", **kw) as balanced:
        placement = balanced.engine.placement
        assert all(len(placement.replicas[layer_id][e]) == 2 for layer_id in placement.layer_ids for e in (0, 1))
        assert generate_ids(balanced) == want
        after = balanced.engine.dispatcher.shard_tokens
        replica_load = balanced.engine.pool.load_stats()[1]["tokens"]  # shard 1 now serves experts 0 and 1 too
        assert all(counts[0] > 0 and counts[1] > 0 for counts in replica_load.values())
    ratio = float(after.max()) / float(before.max())
    print(f"\nEPLB: tokens per shard {before.tolist()} -> {after.tolist()}; most loaded shard x{ratio:.2f}")
    assert ratio < 0.8
    assert torch.equal(before.sum() >= after.max(), torch.tensor(True))
