"""Builds an engine for a config: experts in-process (`local`) or on expert-shard actors.

The expert-parallel wiring (placement, shard actors, transports) is installed here, so neither the
model nor the scheduler knows where experts live: each MoE layer's `routed_fn` is the only seam.
"""

from __future__ import annotations

import torch

from raymoe.config import RayMoEConfig
from raymoe.engine.core import EngineCore


def build_engine(config: RayMoEConfig, *, device: str | torch.device = "cpu") -> EngineCore:
    if config.parallel.num_expert_shards == 0:
        return EngineCore.from_config(config, device=device)
    from raymoe.dispatch.setup import build_expert_parallel_engine

    return build_expert_parallel_engine(config, device=device)
