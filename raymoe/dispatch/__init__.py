"""Dispatch/combine of routed tokens to expert shards, behind one `Dispatcher` interface.

`routing` (the math), `interface` and `local` are pure torch; `ray_transport` imports Ray,
`collective` torch.distributed; `setup` builds an expert-parallel engine from the config.
"""

from raymoe.dispatch.interface import Dispatcher, ShardFailure
from raymoe.dispatch.local import LocalDispatcher
from raymoe.dispatch.routing import RoutingMetadata, build_routing, combine

__all__ = ["Dispatcher", "LocalDispatcher", "RoutingMetadata", "ShardFailure", "build_routing", "combine"]
