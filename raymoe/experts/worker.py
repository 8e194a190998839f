"""The expert tier on Ray: `ExpertWorker` actors (one per shard) and the `ExpertPool` that owns them.

[Dispatch] ──rows──> **ExpertWorker (shard s, any node)**: Σ w·expert(x) ──fp32 partials──> [Combine]

A worker loads only its experts of every MoE layer from the checkpoint (lazy mmap reads) and answers
`forward_packed` calls (ray transport) and/or runs a collective receive loop in a background thread
(collective transport; one thread per engine process group). Workers keep no per-request state, so
Ray may restart them (`max_restarts`) and the engine simply re-runs the layer.

`ExpertPool` creates the named actors `raymoe-expert-<group>-<shard>` (in the driver's Ray namespace)
in a SPREAD placement group, or joins an existing pool of that name, so several engines can share one
pool; it only kills actors it created (engines that start together race for the names: the loser
adopts the winner's shard and does not own it). It also implements recovery: wait for Ray to restart
a shard, adopt a replacement another engine created under the same name, re-create a shard that went
away with the engine that created it (Ray ties an actor to its creator's process and does not restart
it then; a creator that shuts down kills its shards), and, when a restart stays pending
(placement-group bundle stuck on a dead node), recreate the shard without the placement group.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import ray
import torch
from ray.exceptions import (
    ActorAlreadyExistsError,
    ActorUnavailableError,
    GetTimeoutError,
    RayActorError,
)
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from raymoe.config import ParallelConfig
from raymoe.dispatch.interface import as_shard_failure
from raymoe.experts.compute import LoopExperts
from raymoe.experts.placement import ExpertPlacement

log = logging.getLogger(__name__)

# Loading a real shard (532 GiB INT4 / N over a network volume) takes minutes; a pool that cannot
# start in this long is misconfigured, and a clear error beats a hang.
STARTUP_TIMEOUT_S = 900.0
_PING_SLICE_S = 2.0  # how long one health ping may wait while a shard restarts


_thread_state = threading.local()


def _renice(thread_ids: list[int]) -> None:
    """Run these threads at nice 0 (Linux keeps a nice value per thread), best effort.

    Ray starts worker processes at nice 15 (`worker_niceness`) so tasks yield to drivers, but a shard
    sits on the critical path of every decode step, and so do its socket threads (Ray's, gloo's).
    Threads inherit their creator's value, so the actor renices the threads it has at start and the
    collective thread before it creates its process group. Raising priority needs CAP_SYS_NICE;
    without it the threads stay where Ray put them (set RAY_worker_niceness=0 on the nodes instead).
    """
    for tid in thread_ids:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, 0)
        except OSError as e:
            log.info("expert shard thread %s keeps nice %s: %s", tid, os.getpriority(os.PRIO_PROCESS, tid), e)
            return


def _renice_current_thread() -> None:
    _thread_state.reniced = True
    _renice([threading.get_native_id()])


def _renice_process() -> None:
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:  # not Linux
        tids = [threading.get_native_id()]
    _renice(tids)


def _death(handle: Any) -> tuple[str, int] | None:
    """None while the actor lives or restarts; once GCS says it is DEAD for good, (why, restarts):
    why is "OWNER_DIED" (the engine process that created it is gone) or "" (killed for good, or its
    max_restarts used up); restarts is how often Ray restarted it.

    Ray's public state API needs the dashboard; the GCS actor table does not. Calls to a restarting
    actor just queue, so this is the only signal that lets a step fail (or re-create the shard) at
    once instead of waiting out recovery_timeout_s.
    """
    try:
        table = ray._private.state.state.actor_table(handle._actor_id.hex())
    except Exception:  # private API moved: fall back to waiting for the deadline
        return None
    if not table or table.get("State") != "DEAD":
        return None
    return ("OWNER_DIED" if "OWNER_DIED" in str(table.get("DeathCause", "")) else ""), int(table.get("NumRestarts", 0))


def shard_name(group: str, shard_id: int) -> str:
    return f"raymoe-expert-{group}-{shard_id}"


@dataclass(frozen=True)
class ShardSpec:
    """Everything a worker needs to (re)build its shard; Ray re-runs __init__ with it on restart."""

    model_path: str
    dtype: str  # "float32" | "bfloat16" | "float16" | "auto"
    int4_mode: str  # "packed" | "dequant"
    group: str
    shard_id: int
    num_shards: int
    experts: dict[int, list[int]] = field(default_factory=dict)
    device: str = "cpu"
    num_threads: int = 1  # torch intra-op threads: the CPUs the shard reserved (at least 1)
    kernels: str = "auto"  # kernels.backend, resolved by the worker for its own device

    def identity(self) -> dict[str, Any]:
        """What a joining engine must agree on (the expert set may grow with EPLB replicas)."""
        d = asdict(self)
        del d["experts"], d["num_threads"], d["kernels"]
        return d


class ExpertWorker:
    """Ray actor hosting one shard of routed experts for every MoE layer."""

    def __init__(self, spec: ShardSpec) -> None:
        from raymoe.model.loader import Checkpoint, resolve_dtype

        # More threads than reserved CPUs make OpenMP workers spin against the other shards and the
        # engine: 2x slower layers with 2 threads on a 2-core machine (measured 2026-11).
        torch.set_num_threads(spec.num_threads)
        _renice_process()
        self.spec = spec
        self.ckpt = Checkpoint(spec.model_path)
        args = self.ckpt.args
        self.dtype = resolve_dtype(spec.dtype, args)
        int4 = args.quantization is not None and spec.int4_mode == "packed"
        self.device = torch.device(spec.device)
        from raymoe.engine.model_runner import resolve_kernels_backend

        self.compute = LoopExperts.from_checkpoint(self.ckpt, spec.experts, int4=int4, dtype=self.dtype,
                                                   device=self.device,
                                                   kernel=resolve_kernels_backend(spec.kernels, self.device))
        self.hidden_size, self.top_k, self.num_experts = args.hidden_size, args.num_experts_per_tok, \
            args.n_routed_experts
        self._lock = threading.Lock()
        self._tokens: dict[int, torch.Tensor] = {}
        self._rows = self._calls = 0
        self._compute_s = 0.0
        self._groups: dict[str, threading.Event] = {}

    # -- health and introspection ---------------------------------------------------------------
    def ping(self) -> bool:
        return True

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def placement_group_id(self) -> str | None:
        return ray.get_runtime_context().get_placement_group_id()

    def describe(self) -> dict[str, Any]:
        return self.spec.identity()

    def expert_ids(self) -> dict[int, list[int]]:
        return self.compute.expert_ids()

    def read_names(self) -> list[str]:
        """Checkpoint tensors this shard read (proves it loaded only its own experts)."""
        return sorted(self.ckpt.read_names)

    def load_stats(self) -> dict[str, Any]:
        with self._lock:
            return {"tokens": {k: v.tolist() for k, v in self._tokens.items()}, "rows": self._rows,
                    "calls": self._calls, "compute_s": self._compute_s}

    def add_experts(self, experts: dict[int, list[int]]) -> list[str]:
        """Host these experts too (EPLB replicas); returns the tensor names read."""
        return self.compute.add_experts(self.ckpt, experts)

    # -- compute --------------------------------------------------------------------------------
    def forward_packed(self, layer_id: int, packed: torch.Tensor) -> torch.Tensor:
        """Packed rows (routing.pack_rows) -> partial sums [M,D] fp32 (on CPU for the ray transport)."""
        return self._forward(layer_id, packed).cpu()

    @torch.inference_mode()
    def _forward(self, layer_id: int, packed: torch.Tensor) -> torch.Tensor:
        if not getattr(_thread_state, "reniced", False):
            _renice_current_thread()
        from raymoe.dispatch.routing import local_expert_ids, unpack_rows

        t0 = time.perf_counter()
        x, slots, weights = unpack_rows(packed.to(self.device), self.hidden_size, self.top_k, self.dtype)
        ids = local_expert_ids(slots, self.spec.shard_id, self.num_experts)
        out = self.compute.forward(layer_id, x, ids, weights)
        counts = torch.bincount(ids[ids >= 0], minlength=self.num_experts).cpu()
        with self._lock:
            prev = self._tokens.get(layer_id)
            self._tokens[layer_id] = counts if prev is None else prev + counts
            self._rows += x.shape[0]
            self._calls += 1
            self._compute_s += time.perf_counter() - t0
        return out

    # -- collective transport -------------------------------------------------------------------
    def start_collective(self, key: str, host: str, port: int, world_size: int, rank: int, backend: str) -> None:
        """Join process group `key` (rendezvous at host:port) in a background thread and serve layers."""
        from raymoe.dispatch.collective import serve_shard

        stop = self._groups[key] = threading.Event()

        def run() -> None:
            _renice_current_thread()  # before the process group starts its socket threads
            try:
                serve_shard(host, port, world_size, rank, backend, self._forward, self.device,
                            ray.util.get_node_ip_address(), stop)
            except Exception as e:  # the engine sees the closed group and recovers; keep the reason
                log.warning("expert shard %s: collective group %s ended: %s", self.spec.shard_id, key, e)
            finally:
                self._groups.pop(key, None)

        threading.Thread(target=run, name=f"raymoe-collective-{key}", daemon=True).start()

    def stop_collective(self, key: str) -> None:
        ev = self._groups.get(key)
        if ev is not None:
            ev.set()

    def num_collective_groups(self) -> int:
        return len(self._groups)


def ensure_ray(address: str | None, *, num_cpus_needed: float = 0.0) -> bool:
    """Connect to Ray (`address`, else RAY_ADDRESS, else start a local instance); True if we called init.

    A local instance declares at least `num_cpus_needed` + 1 logical CPUs so every shard can be placed
    on a small machine (logical CPUs are a scheduling budget, not a pin).
    """
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(num_cpus_needed) + 1), include_dashboard=False)
    return True


def shutdown_ray() -> None:
    ray.shutdown()


class ExpertPool:
    """The shard actors of one expert group: create or join, health, recovery, teardown."""

    def __init__(self, pcfg: ParallelConfig, specs: list[ShardSpec]) -> None:
        self.pcfg = pcfg
        self.specs = specs
        self.namespace = ray.get_runtime_context().namespace
        self.names = [shard_name(s.group, s.shard_id) for s in specs]
        self.handles: list[Any] = [None] * len(specs)
        self.owned = [False] * len(specs)
        self.pg: PlacementGroup | None = None
        self._creator_pgs: dict[int, str | None] = {}  # shard -> id of the placement group it runs in
        self._resource = pcfg.expert_resource if (
            pcfg.expert_resource and ray.cluster_resources().get(pcfg.expert_resource, 0) >= 1) else None
        self._start()

    @classmethod
    def create_or_join(cls, pcfg: ParallelConfig, *, model_path: str, dtype: str, int4_mode: str,
                       placement: ExpertPlacement, device: str = "cpu", kernels: str = "auto") -> ExpertPool:
        threads = max(1, math.floor(pcfg.shard_num_cpus))
        specs = [ShardSpec(model_path, dtype, int4_mode, pcfg.expert_group, s, placement.num_shards,
                           placement.shard_experts(s), device, threads, kernels) for s in range(placement.num_shards)]
        return cls(pcfg, specs)

    @property
    def num_shards(self) -> int:
        return len(self.specs)

    def _lookup(self, i: int) -> Any | None:
        try:
            return ray.get_actor(self.names[i], namespace=self.namespace)
        except ValueError:
            return None

    def _bundle(self) -> dict[str, float]:
        b = {"CPU": self.pcfg.shard_num_cpus, "GPU": self.pcfg.shard_num_gpus}
        if self._resource:
            b[self._resource] = 1.0
        return {k: v for k, v in b.items() if v > 0}

    def _start(self) -> None:
        for i in range(self.num_shards):
            self.handles[i] = self._lookup(i)
        missing = [i for i, h in enumerate(self.handles) if h is None]
        if len(missing) == self.num_shards and self._bundle():
            self.pg = placement_group([self._bundle()] * self.num_shards, strategy="SPREAD")
            try:
                ray.get(self.pg.ready(), timeout=self.pcfg.recovery_timeout_s)
            except GetTimeoutError:
                remove_placement_group(self.pg)
                self.pg = None
                raise RuntimeError(f"cannot place {self.num_shards} expert shards (bundle {self._bundle()}, "
                                   f"SPREAD) within {self.pcfg.recovery_timeout_s:g}s; available: "
                                   f"{ray.available_resources()}") from None
        for i in missing:
            self.handles[i], self.owned[i] = self._create_or_adopt(i, use_pg=self.pg is not None)
        if self.pg is not None and not any(self.owned):  # another engine won every race: its shards, its group
            remove_placement_group(self.pg)
            self.pg = None
        try:
            infos = ray.get([h.describe.remote() for h in self.handles], timeout=STARTUP_TIMEOUT_S)
        except (RayActorError, GetTimeoutError) as e:
            self.close()
            raise RuntimeError(f"expert shards {self.names} failed to start: {e}") from e
        # The placement group a joined shard runs in belongs to the engine that created it; if that engine
        # dies, the group outlives it (groups live as long as their job), so whoever re-creates the shard
        # removes it (see wait_recovered).
        self._creator_pgs = dict(enumerate(ray.get([h.placement_group_id.remote() for h in self.handles],
                                                   timeout=STARTUP_TIMEOUT_S)))
        for name, spec, info in zip(self.names, self.specs, infos):
            if info != spec.identity():
                self.close()
                raise ValueError(f"expert shard {name} already exists and serves {info}, not {spec.identity()}: "
                                 "use another parallel.expert_group")
        self.sync_experts({i: s.experts for i, s in enumerate(self.specs)})

    def _create_or_adopt(self, i: int, *, use_pg: bool) -> tuple[Any, bool]:
        """(handle, created): shard i created here, or the one another engine registered under its name
        first (engines of one group start together, e.g. Serve replicas). Only a creator owns a shard:
        Ray ties it to the creator's process, and only the creator kills it on close."""
        for _ in range(100):
            try:
                return self._create(i, use_pg=use_pg), True
            except ActorAlreadyExistsError:
                handle = self._lookup(i)
                if handle is not None:
                    return handle, False
                time.sleep(0.05)  # the other one died between our create and lookup: try again
        raise RuntimeError(f"expert shard {self.names[i]}: neither created nor found")

    def _create(self, i: int, *, use_pg: bool) -> Any:
        opts: dict[str, Any] = dict(name=self.names[i], namespace=self.namespace,
                                    max_restarts=self.pcfg.max_restarts, max_task_retries=0,
                                    num_cpus=self.pcfg.shard_num_cpus, num_gpus=self.pcfg.shard_num_gpus,
                                    max_concurrency=4)  # ping and several engines' calls alongside a forward
        if self._resource:
            opts["resources"] = {self._resource: 1.0}
        if use_pg:
            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i)
        return ray.remote(ExpertWorker).options(**opts).remote(self.specs[i])

    # -- used by transports ---------------------------------------------------------------------
    def sync_experts(self, experts: dict[int, dict[int, list[int]]]) -> None:
        """Make shard i host at least experts[i] (replicas are lost when Ray restarts a shard)."""
        with as_shard_failure():
            ray.get([self.handles[i].add_experts.remote(e) for i, e in experts.items()],
                    timeout=STARTUP_TIMEOUT_S)

    def node_ids(self) -> list[str]:
        return self._ask_all("node_id")

    def load_stats(self) -> list[dict[str, Any]]:
        return self._ask_all("load_stats")

    def _ask_all(self, method: str, timeout_s: float = 30.0) -> list[Any]:
        """Call an introspection method on every shard; a shard Ray reports as *temporarily* unavailable
        (just restarted or re-placed, its connection not yet re-established) is asked again until
        `timeout_s`. A dead shard's error is raised as is."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return ray.get([getattr(h, method).remote() for h in self.handles])
            except ActorUnavailableError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.2)

    def engine_ip(self) -> str:
        return ray.util.get_node_ip_address()

    def start_collective(self, key: str, host: str, port: int, backend: str) -> None:
        world = self.num_shards + 1
        with as_shard_failure():
            ray.get([h.start_collective.remote(key, host, port, world, i + 1, backend)
                     for i, h in enumerate(self.handles)], timeout=self.pcfg.recovery_timeout_s)

    def stop_collective(self, key: str) -> None:
        for h in self.handles:
            h.stop_collective.remote(key)

    def wait_recovered(self, timeout_s: float) -> None:
        """Block until every shard answers a ping; see the module docstring for the fallbacks.

        Raises:
            RuntimeError: "expert shard <name> did not recover within <N>s" (dead for good, or too slow).
        """
        start = time.monotonic()
        deadline = start + timeout_s
        limit = self.pcfg.recovery_timeout_s  # what the user configured (timeout_s is what is left of it)
        for i in range(self.num_shards):
            recreated = False
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RuntimeError(f"expert shard {self.names[i]} did not recover within {limit:g}s")
                try:
                    ray.get(self.handles[i].ping.remote(), timeout=min(remaining, _PING_SLICE_S))
                    break
                except GetTimeoutError:  # restart pending: maybe its bundle sits on a dead node
                    if (self.owned[i] and self.pg is not None and not recreated
                            and time.monotonic() - start > timeout_s / 2):
                        self._recreate_without_pg(i)
                        recreated = True
                except RayActorError as e:
                    current = self._lookup(i)
                    if current is not None and current._actor_id != self.handles[i]._actor_id:
                        self.handles[i] = current  # re-created under its name by an engine sharing the pool
                        self.owned[i] = False
                        continue
                    death = _death(self.handles[i])
                    if death is not None and current is None and (
                            death[0] == "OWNER_DIED" or not 0 <= self.pcfg.max_restarts <= death[1]):
                        # Gone with the engine that created it (a replica killed), or killed for good
                        # with restarts left (its creator shut down: a replica scaled down). Ray does not
                        # restart it then, so whichever engine still uses the pool re-creates it.
                        log.warning("expert shard %s went away with the engine that created it; re-creating it",
                                    self.names[i])
                        if death[0] == "OWNER_DIED":  # a closing creator removes its group itself
                            self._remove_creator_pg(i)
                        self.handles[i], self.owned[i] = self._create_or_adopt(i, use_pg=False)
                        continue
                    if death is not None:
                        raise RuntimeError(f"expert shard {self.names[i]} did not recover within {limit:g}s: "
                                           f"it is dead (max_restarts={self.pcfg.max_restarts} used up)") from e
                    time.sleep(0.05)

    def _remove_creator_pg(self, i: int) -> None:
        """Release the placement group shard i ran in, when another (now dead) engine created it: its
        bundles would stay reserved; every shard in it died with that engine too."""
        from ray._raylet import PlacementGroupID

        pg_id = self._creator_pgs.pop(i, None)
        if pg_id is None or (self.pg is not None and self.pg.id.hex() == pg_id):
            return
        for j, other in list(self._creator_pgs.items()):  # the group's other shards: same creator, same fate
            if other == pg_id:
                del self._creator_pgs[j]
        try:
            remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(pg_id)))
        except Exception as e:  # already removed (its job ended) or never created: nothing held
            log.info("placement group %s of a dead engine: %s", pg_id, e)

    def _recreate_without_pg(self, i: int) -> None:
        log.warning("expert shard %s: restart still pending; recreating it outside the placement group",
                    self.names[i])
        ray.kill(self.handles[i], no_restart=True)
        for _ in range(100):
            if self._lookup(i) is None:
                break
            time.sleep(0.05)
        self.handles[i], self.owned[i] = self._create_or_adopt(i, use_pg=False)

    def close(self) -> None:
        """Kill the shards this pool created and its placement group; joined shards are left running."""
        for h, owned in zip(self.handles, self.owned):
            if h is not None and owned:
                try:
                    ray.kill(h, no_restart=True)
                except Exception as e:  # already gone: nothing to release
                    log.debug("kill %s: %s", h, e)
        self.owned = [False] * self.num_shards
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None

