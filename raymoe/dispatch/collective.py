"""Collective transport: a torch.distributed process group over the engine (rank 0) and its shards.

[Gate] → [route] → **engine ──header, packed rows──> shard s ──fp32 partials──> engine** → [combine]

Ray has no all-to-all (ray.util.collective and Compiled Graphs offer p2p and all-reduce), so the M2N
exchange is built from point-to-point sends: per layer the engine posts, for every shard that gets
rows, one message (a 4-int header: op, layer, rows, row bytes; then the packed rows of
routing.pack_rows) and a receive for the partial sums, then waits for all of them; shards serve
layers in a background thread of their actor (`serve_shard`). Gloo on CPU; NCCL when the engine and the shards sit on GPUs (same code,
tensors on cuda; written against the same interface but untested here: no multi-GPU machine).

Each engine gets its own group object (`ProcessGroupGloo(store, rank, size, opts)`), not the global
default group, so several engines can share one shard pool and a failed group can be replaced without
touching module-global state. Rendezvous: a TCPStore on the engine's node IP and a free port (port 0:
the OS picks). After a failure the engine drops the group (shards' pending receives then fail and
their threads exit), waits for Ray to restart the dead shard and forms a new group on a new port.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from raymoe.dispatch.interface import Dispatcher, ShardFailure
from raymoe.dispatch.routing import RoutingMetadata, dispatch_rows, pack_rows
from raymoe.experts.placement import ExpertPlacement

if TYPE_CHECKING:
    from raymoe.experts.worker import ExpertPool

OP_FORWARD, OP_STOP = 0, 1
TAG_HEADER, TAG_PAYLOAD, TAG_RESULT = 0, 1, 2
HEADER_BYTES = 32  # int64 (op, layer, rows, row bytes)
# Gloo lets a receive buffer be larger than the message, so a shard keeps one buffer of this size
# posted and a layer's rows arrive in the same message as their header: one wake-up per shard and
# direction, like a raw all_to_all. Bigger layers (prefill) send the header alone, then the rows.
# 1 MiB holds 64 decode tokens of K2 (7168 bf16 + ids/weights = 14.4 KB per row). NCCL needs exact
# sizes: it always uses the two-message form.
INLINE_BYTES = 1 << 20
# A shard waits this long for the next layer before its group times out (the engine may idle for
# hours between requests; an expired group is simply re-formed on the next call).
IDLE_TIMEOUT = timedelta(hours=24)
RENDEZVOUS_TIMEOUT = timedelta(seconds=120)


def make_process_group(backend: str, store: dist.Store, rank: int, world_size: int, timeout: timedelta,
                       host: str) -> dist.ProcessGroup:
    """A standalone process group (not the global default one) over `store`."""
    if backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timeout
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
        return dist.ProcessGroupGloo(store, rank, world_size, opts)
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, world_size, opts)
    raise ValueError(f"collective backend {backend!r} is not supported (supported: gloo, nccl)")


def serve_shard(host: str, port: int, world_size: int, rank: int, backend: str,
                forward: Callable[[int, torch.Tensor], torch.Tensor], device: torch.device, my_ip: str,
                stop: threading.Event) -> None:
    """Shard side: join the group, then answer layers until OP_STOP, `stop`, or a broken group."""
    store = dist.TCPStore(host, port, world_size, False, timeout=RENDEZVOUS_TIMEOUT)
    pg = make_process_group(backend, store, rank, world_size, IDLE_TIMEOUT, my_ip)
    wire = device if backend == "nccl" else torch.device("cpu")
    inline = INLINE_BYTES if backend == "gloo" else 0
    buf = torch.empty(max(inline, HEADER_BYTES), dtype=torch.uint8, device=wire)
    try:
        while not stop.is_set():
            pg.recv([buf if inline else buf[:HEADER_BYTES]], 0, TAG_HEADER).wait()
            op, layer_id, num_rows, row_bytes = buf[:HEADER_BYTES].view(torch.int64).tolist()
            if op == OP_STOP:
                return
            size = num_rows * row_bytes
            if HEADER_BYTES + size <= inline:
                packed = buf[HEADER_BYTES:HEADER_BYTES + size].view(num_rows, row_bytes)
            else:
                packed = torch.empty(num_rows, row_bytes, dtype=torch.uint8, device=wire)
                pg.recv([packed], 0, TAG_PAYLOAD).wait()
            out = forward(layer_id, packed).to(wire)  # [rows, D] fp32
            pg.send([out], 0, TAG_RESULT).wait()
    finally:
        del pg, store


class CollectiveDispatcher(Dispatcher):
    """Engine side of the collective transport (rank 0 of a group with the pool's shards)."""

    def __init__(self, pool: ExpertPool, placement: ExpertPlacement, *, device: str | torch.device = "cpu",
                 backend: str = "gloo", recovery_timeout_s: float = 60.0) -> None:
        super().__init__(placement, recovery_timeout_s=recovery_timeout_s)
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"collective backend {backend!r} is not supported (supported: gloo, nccl)")
        self.pool = pool
        self.backend = backend
        self.wire = torch.device(device) if backend == "nccl" else torch.device("cpu")
        self.inline_bytes = INLINE_BYTES if backend == "gloo" else 0
        self.pg: dist.ProcessGroup | None = None
        self.key = ""
        self._form()

    def _form(self) -> None:
        timeout = timedelta(seconds=self.recovery_timeout_s)
        host = self.pool.engine_ip()
        store = dist.TCPStore(host, 0, self.pool.num_shards + 1, True, timeout=timeout, wait_for_workers=False)
        self.key = uuid.uuid4().hex[:12]
        self.pool.start_collective(self.key, host, store.port, self.backend)
        try:
            self.pg = make_process_group(self.backend, store, 0, self.pool.num_shards + 1, timeout, host)
        except RuntimeError as e:  # a shard did not join (died during rendezvous)
            raise ShardFailure(f"process group rendezvous failed: {e}") from e
        self._store = store  # the master must outlive the rendezvous

    def _drop(self) -> None:
        if self.pg is not None:
            self.pool.stop_collective(self.key)
            self.pg = None  # closing our sockets fails the shards' pending receives: their threads exit
        self._store = None

    def exchange(self, layer_id: int, x: torch.Tensor, routing: RoutingMetadata) -> torch.Tensor:
        if self.pg is None:
            raise ShardFailure("no process group (a previous re-form failed)")
        packed = pack_rows(dispatch_rows(x, routing), routing.slots, routing.topk_weights).to(self.wire)
        row_bytes = packed.shape[1]
        out = torch.empty(routing.num_rows, x.shape[1], dtype=torch.float32, device=self.wire)
        messages, works = [], []  # messages stay referenced until their sends complete
        try:
            for s in range(self.placement.num_shards):
                lo, hi = routing.offsets[s], routing.offsets[s + 1]
                if hi == lo:
                    continue
                header = torch.tensor([OP_FORWARD, layer_id, hi - lo, row_bytes], dtype=torch.int64,
                                      device=self.wire).view(torch.uint8)
                if HEADER_BYTES + (hi - lo) * row_bytes <= self.inline_bytes:
                    messages.append(torch.cat([header, packed[lo:hi].reshape(-1)]))
                    works.append(self.pg.send([messages[-1]], s + 1, TAG_HEADER))
                else:
                    messages.append(header)
                    works.append(self.pg.send([header], s + 1, TAG_HEADER))
                    works.append(self.pg.send([packed[lo:hi]], s + 1, TAG_PAYLOAD))
                works.append(self.pg.recv([out[lo:hi]], s + 1, TAG_RESULT))
            for w in works:
                w.wait()
        except RuntimeError as e:  # gloo: "Connection closed by peer", timeouts; DistBackendError
            raise ShardFailure(str(e).splitlines()[0]) from e
        return out.to(x.device)

    def wait_recovered(self, timeout_s: float) -> None:
        self._drop()
        self.pool.wait_recovered(timeout_s)

    def reform(self) -> None:
        self._drop()
        self.pool.sync_experts({s: self.placement.shard_experts(s) for s in range(self.placement.num_shards)})
        self._form()

    def set_placement(self, placement: ExpertPlacement) -> None:
        super().set_placement(placement)
        self.pool.sync_experts({s: placement.shard_experts(s) for s in range(placement.num_shards)})

    def close(self) -> None:
        if self.pg is not None:
            header = torch.tensor([OP_STOP, 0, 0, 0], dtype=torch.int64, device=self.wire).view(torch.uint8)
            try:
                for w in [self.pg.send([header], s + 1, TAG_HEADER) for s in range(self.pool.num_shards)]:
                    w.wait()
            except RuntimeError:
                pass  # a shard is already gone: dropping the group below releases the others
        self._drop()
