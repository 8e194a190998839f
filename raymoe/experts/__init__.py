"""Expert tier: placement of routed experts on shards, shard compute, and the Ray shard actors.

`placement` and `compute` are pure torch; only `worker` imports Ray.
"""

from raymoe.experts.compute import ExpertsCompute, LoopExperts
from raymoe.experts.placement import ExpertPlacement

__all__ = ["ExpertPlacement", "ExpertsCompute", "LoopExperts"]
