"""Offline API, vLLM-style: `LLM(model=PATH, **engine_settings).generate(prompts, sampling_params)`.

All prompts are added to one engine and generated together (continuous batching); outputs come
back in prompt order. Keyword arguments are validated through the same `RayMoEConfig` tree the
server uses, so a typo is an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from raymoe.config import RayMoEConfig
from raymoe.engine.request import RequestOutput, SamplingParams, merge_outputs

_MODEL_KEYS = {"dtype", "int4_mode", "seed", "served_model_name"}
_PARALLEL_KEYS = {"num_expert_shards", "transport", "num_redundant_experts", "expert_group", "address", "shard_num_gpus",
                  "recovery_timeout_s", "max_restarts", "expert_resource", "shard_num_cpus",
                  "per_expert_metrics"}


def config_from_kwargs(model: str | None, preset: str | None, kwargs: dict[str, Any]) -> RayMoEConfig:
    tree: dict[str, Any] = {"model": {"path": model, "preset": preset}, "engine": {}, "parallel": {}}
    for key, value in kwargs.items():
        if key in _MODEL_KEYS:
            tree["model"][key] = value
        elif key in _PARALLEL_KEYS:
            tree["parallel"][key] = value
        elif key == "kernels_backend":
            tree["kernels"] = {"backend": value}
        else:
            tree["engine"][key] = value  # unknown keys are rejected by EngineConfig (extra="forbid")
    if tree["parallel"].get("num_expert_shards") and "transport" not in tree["parallel"]:
        tree["parallel"]["transport"] = "ray"
    return RayMoEConfig.model_validate(tree)


class LLM:
    """Examples:
        >>> llm = LLM(model="/tmp/tiny", dtype="float32", max_num_seqs=16)
        >>> outs = llm.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=8))
    """

    def __init__(self, model: str | None = None, *, preset: str | None = None, **kwargs: Any):
        from raymoe.engine.executor import build_engine

        if model is None and preset is None:
            preset = "tiny"
        self.config = config_from_kwargs(model, preset, kwargs)
        self.engine = build_engine(self.config)
        self.tokenizer = self.engine.tokenizer

    def generate(
        self,
        prompts: str | Sequence[str] | None = None,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
    ) -> list[RequestOutput]:
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("give exactly one of prompts or prompt_token_ids")
        if prompts is not None:
            prompts = [prompts] if isinstance(prompts, str) else list(prompts)
            token_lists = [self.engine.encode(p) for p in prompts]
        else:
            token_lists = [list(t) for t in prompt_token_ids]  # type: ignore[union-attr]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(token_lists)
        else:
            params = list(sampling_params)
            if len(params) != len(token_lists):
                raise ValueError(f"{len(params)} sampling_params for {len(token_lists)} prompts")
        ids = [self.engine.add_request(toks, p, final_only=True) for toks, p in zip(token_lists, params)]
        acc: dict[str, RequestOutput] = {}
        try:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    prev = acc.get(out.request_id)
                    acc[out.request_id] = out if prev is None else merge_outputs(prev, out)
        except BaseException:
            for rid in ids:
                self.engine.abort(rid)
            raise
        return [acc[rid] for rid in ids]

    def shutdown(self) -> None:
        close = getattr(self.engine, "close", None)
        if callable(close):
            close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
