"""Resolving a `ModelConfig` to weights and tokenizer: a checkpoint folder, or a cached tiny preset."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from raymoe.config import ModelConfig, RayMoEConfig
from raymoe.model.args import ModelArgs
from raymoe.model.loader import Checkpoint, build_model


def resolve_model_path(cfg: ModelConfig) -> str:
    if cfg.path:
        return cfg.path
    from raymoe.model.tiny import cached_tiny

    return str(cached_tiny(cfg.preset or "tiny", seed=cfg.seed))


def load_tokenizer(path: str | Path) -> Any | None:
    """The checkpoint's own tokenizer (None when the folder ships none)."""
    if not (Path(path) / "tokenizer_config.json").is_file():
        return None
    from transformers import AutoTokenizer

    from raymoe.model.hf_compat import register_kimi_k2

    register_kimi_k2()
    return AutoTokenizer.from_pretrained(str(path))


def load_engine_parts(config: RayMoEConfig, *, device: str | torch.device = "cpu",
                      local_experts: bool | None = None) -> tuple[torch.nn.Module, ModelArgs, Any, str]:
    path = resolve_model_path(config.model)
    ckpt = Checkpoint(path)
    if local_experts is None:
        local_experts = config.parallel.num_expert_shards == 0
    from raymoe.engine.model_runner import resolve_kernels_backend

    model = build_model(ckpt, dtype=config.model.dtype, int4_mode=config.model.int4_mode,
                        local_experts=local_experts, device=device,
                        kernels=resolve_kernels_backend(config.kernels.backend, torch.device(device)))
    return model, ckpt.args, load_tokenizer(path), path
