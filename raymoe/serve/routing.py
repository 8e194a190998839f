"""`ReplicaHintRouter`: Serve's request router for the AttentionTier, honouring a per-request replica hint.

    TierClient --handle.options(session_id=hint)--> [ReplicaHintRouter.choose_replicas] --> AttentionTier replica

Heavy Mode sends N trajectories of one prompt. Serve's default router (power of two choices) would scatter
them, and trajectories that start together on one replica all miss its prefix cache (blocks are published
only once computed), so the prompt is prefilled up to N times. The ingress therefore places them itself
through the request's `session_id`, the one per-request routing field a `DeploymentHandle` carries:

- `raymoe:spread=<group>/<i>`: the i-th request of a group goes to replica `(offset(group) + i) % R` of the
  replicas sorted by id, so requests 0..R-1 of a group land on R different replicas (the group offset spreads
  successive groups' first requests).
- `raymoe:replica=<replica id>`: that replica (the id the tier reports in its first output).
- anything else: power of two choices, as Serve's default router does.

A hint ranks its replica first, not exclusively: a full or vanished hinted replica falls through to the
others (two random ones, the shorter queue wins), so a hint costs cache reuse at worst, never availability.
Limits: the ranking uses the router's current replica set, which Serve updates asynchronously; a replica
added or removed between two requests of a group changes the `spread` mapping (the `replica` form is exact).
"""

from __future__ import annotations

import random
import zlib
from typing import Any

from ray.serve._private.request_router.request_router import RequestRouter

SPREAD = "raymoe:spread="
REPLICA = "raymoe:replica="
ROUTER_PATH = "raymoe.serve.routing:ReplicaHintRouter"


def spread_hint(group: str, index: int) -> str:
    return f"{SPREAD}{group}/{index}"


def replica_hint(replica_id: str) -> str:
    return f"{REPLICA}{replica_id}"


def rank_by_hint(hint: str, replica_ids: list[str]) -> str | None:
    """The replica id a hint names among `replica_ids`, or None (no hint, or its replica is gone)."""
    if not replica_ids:
        return None
    if hint.startswith(REPLICA):
        wanted = hint[len(REPLICA):]
        return wanted if wanted in replica_ids else None
    if hint.startswith(SPREAD):
        group, _, index = hint[len(SPREAD):].rpartition("/")
        if not index.isdigit():
            return None
        ordered = sorted(replica_ids)
        return ordered[(zlib.crc32(group.encode()) + int(index)) % len(ordered)]
    return None


class ReplicaHintRouter(RequestRouter):
    """Power of two choices, except that a `raymoe:` session hint ranks one replica first (see module doc).

    A replica is handed to exactly the request it was chosen for (not, as with Serve's FIFO mixin, to the
    oldest waiting one), so a hinted request never gets a replica chosen for another. Serve's own exact
    match keys requests by `internal_request_id`, which every call the ingress makes while serving one HTTP
    request shares (n choices, Heavy Mode's trajectories): keyed so, all but one of them would never be
    routed. Matching the pending request by its metadata object instead is exact.
    """

    async def choose_replicas(self, candidate_replicas: list[Any], pending_request: Any = None) -> list[list[Any]]:
        if not candidate_replicas:
            return []
        hint = ""
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # all full: back off, don't spin
            hint = pending_request.metadata.session_id
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        chosen = rank_by_hint(hint, list(by_id)) if hint else None
        others = [r for uid, r in by_id.items() if uid != chosen]
        pair = random.sample(others, min(2, len(others)))
        return [[by_id[chosen]], pair] if chosen is not None else [pair]

    def _fulfill_next_pending_request(self, replica: Any, request_metadata: Any = None) -> None:
        for pending in self._pending_requests_to_fulfill:
            if pending.metadata is request_metadata and not pending.future.done():
                self._cancel_routing_task_for_pending_request(pending)
                self._record_queue_wait_time(pending)
                pending.future.set_result(replica)
                self._remove_pending_request_from_indices(pending)
                return
