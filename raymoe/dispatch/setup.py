"""build_expert_parallel_engine: the dense model in this process, routed experts on expert-shard actors.

config.parallel → [Ray: join or start] → [ExpertPool: N ExpertWorker actors] → [Dispatcher: ray | collective]
→ every `MoE.routed_fn` = the dispatcher → `ExpertParallelEngine` (an EngineCore with `close()`).

With `num_redundant_experts` > 0 the engine measures per-expert load on a short seeded calibration
forward, then adds that many replicas per layer (EPLB); `rebalance()` redoes it later from live load.
The dispatcher exports expert load, latency and faults to Prometheus (observability/dispatch_metrics.py),
calibration excluded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from raymoe.config import RayMoEConfig
from raymoe.dispatch.interface import Dispatcher
from raymoe.engine.core import EngineCore
from raymoe.experts.placement import ExpertPlacement
from raymoe.model.args import ModelArgs
from raymoe.model.moe import MoE

if TYPE_CHECKING:
    from raymoe.observability.dispatch_metrics import DispatchMetrics

CALIBRATION_TOKENS = 256  # one dense forward; enough to see a skewed router, cheap even for K2
CALIBRATION_SEED = 0


class ExpertParallelEngine(EngineCore):
    """EngineCore whose routed experts live on an `ExpertPool`; `close()` releases what it created."""

    def __init__(self, model: torch.nn.Module, args: ModelArgs, config: RayMoEConfig, tokenizer: Any, *,
                 device: str | torch.device, model_path: str, dispatcher: Dispatcher, pool: Any,
                 base_placement: ExpertPlacement, owns_ray: bool) -> None:
        super().__init__(model, args, config, tokenizer, device=device, model_path=model_path)
        self.dispatcher = dispatcher
        self.pool = pool
        self.base_placement = base_placement
        self._owns_ray = owns_ray
        self._closed = False

    @property
    def placement(self) -> ExpertPlacement:
        return self.dispatcher.placement

    def rebalance(self, num_redundant: int | None = None) -> ExpertPlacement:
        """Re-plan replicas from the load measured since the last rebalance, install them, reset the counters."""
        num_redundant = self.config.parallel.num_redundant_experts if num_redundant is None else num_redundant
        placement = self.base_placement.with_replicas(self.dispatcher.expert_load, num_redundant)
        self.dispatcher.set_placement(placement)
        self.dispatcher.reset_stats()
        return placement

    @torch.inference_mode()
    def calibrate(self, num_tokens: int = CALIBRATION_TOKENS, seed: int = CALIBRATION_SEED) -> None:
        """Route one seeded random sequence through the model so the dispatcher has load to plan from."""
        device = self.runner.device
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, self.args.vocab_size, (num_tokens,), generator=gen).to(device)
        self.runner.model(ids, torch.arange(num_tokens, device=device))

    def flush_metrics(self) -> None:
        """Export the expert-load counts accumulated so far (AsyncEngine calls this when it goes idle)."""
        if self.dispatcher.metrics is not None:
            self.dispatcher.metrics.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.flush_metrics()
            self.dispatcher.close()
        finally:
            self.pool.close()
            if self._owns_ray:
                from raymoe.experts.worker import shutdown_ray

                shutdown_ray()


def build_expert_parallel_engine(config: RayMoEConfig, *, device: str | torch.device = "cpu") -> ExpertParallelEngine:
    """Load the dense part here, start (or join) the expert shards, and wire every MoE layer to them.

    Raises:
        ValueError: more shards than experts, or a pool of that `expert_group` serving another model.
        RuntimeError: the shards cannot be placed or started.
    """
    from raymoe.engine.loading import load_engine_parts
    from raymoe.experts.worker import ExpertPool, ensure_ray

    pcfg = config.parallel
    model, args, tokenizer, path = load_engine_parts(config, device=device, local_experts=False)
    moe_layers = [i for i in range(args.num_hidden_layers) if args.is_moe_layer(i)]
    placement = ExpertPlacement.contiguous(args.n_routed_experts, pcfg.num_expert_shards, moe_layers)
    owns_ray = ensure_ray(pcfg.address, num_cpus_needed=pcfg.num_expert_shards * pcfg.shard_num_cpus)
    pool = None
    try:
        shard_device = "cuda" if pcfg.shard_num_gpus > 0 else "cpu"
        pool = ExpertPool.create_or_join(pcfg, model_path=path, dtype=config.model.dtype,
                                         int4_mode=config.model.int4_mode, placement=placement, device=shard_device,
                                         kernels=config.kernels.backend)
        dispatcher = _make_dispatcher(config, pool, placement, torch.device(device), shard_device)
        for module in model.modules():
            if isinstance(module, MoE):
                module.routed_fn = dispatcher
        engine = ExpertParallelEngine(model, args, config, tokenizer, device=device, model_path=path,
                                      dispatcher=dispatcher, pool=pool, base_placement=placement, owns_ray=owns_ray)
    except BaseException:
        if pool is not None:
            pool.close()
        if owns_ray:
            from raymoe.experts.worker import shutdown_ray

            shutdown_ray()
        raise
    if pcfg.num_redundant_experts > 0:
        try:
            engine.calibrate()
            engine.rebalance()
        except BaseException:
            engine.close()
            raise
    dispatcher.metrics = _dispatch_metrics(config, args, placement, pool)  # after calibration: served load only
    return engine


def _dispatch_metrics(config: RayMoEConfig, args: ModelArgs, placement: ExpertPlacement, pool: Any) -> DispatchMetrics:
    from raymoe.observability.dispatch_metrics import DispatchMetrics, shard_incarnations
    from raymoe.observability.engine_metrics import replica_tag

    return DispatchMetrics(placement.num_shards, args.n_routed_experts, engine=replica_tag(),
                           per_expert=config.parallel.per_expert_metrics,
                           incarnations_fn=lambda: shard_incarnations(pool.handles))


def _make_dispatcher(config: RayMoEConfig, pool: Any, placement: ExpertPlacement, device: torch.device,
                     shard_device: str) -> Dispatcher:
    pcfg = config.parallel
    if pcfg.transport == "ray":
        from raymoe.dispatch.ray_transport import RayDispatcher

        return RayDispatcher(pool, placement, recovery_timeout_s=pcfg.recovery_timeout_s)
    if pcfg.transport == "collective":
        from raymoe.dispatch.collective import CollectiveDispatcher

        backend = "nccl" if device.type == "cuda" and shard_device == "cuda" else "gloo"
        return CollectiveDispatcher(pool, placement, device=device, backend=backend,
                                    recovery_timeout_s=pcfg.recovery_timeout_s)
    raise ValueError(f"transport {pcfg.transport!r} does not use expert shards (num_expert_shards="
                     f"{pcfg.num_expert_shards})")
