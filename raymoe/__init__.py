"""raymoe: Ray-native serving of Kimi K2 Thinking / DeepSeek-V3 MoE models.

Public façade only; everything else lives in subpackages.
"""

from raymoe.config import RayMoEConfig
from raymoe.engine.request import RequestOutput, SamplingParams

__all__ = ["LLM", "RayMoEConfig", "RequestOutput", "SamplingParams", "build_app"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "LLM":
        from raymoe.llm import LLM

        return LLM
    if name == "build_app":
        from raymoe.serve.builders import build_app

        return build_app
    raise AttributeError(f"module 'raymoe' has no attribute {name!r}")
