"""Shared pytest fixtures: a fixed torch RNG state per test, and tiny checkpoints made once per session.

`RAYMOE_CACHE` points at a session temp folder so tests never read or write the user's cache.
"""

import os
from pathlib import Path

import pytest
import torch

# Triton reads TRITON_INTERPRET at import: set it before any test module imports raymoe_kernels, so
# the kernels run on CPU through the interpreter when no GPU is present.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _raymoe_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("raymoe-cache")
    os.environ["RAYMOE_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `tiny` preset (fp32 weights, 8 experts, top-2, group-limited routing), seed 0."""
    from raymoe.model.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("ckpt") / "tiny", preset="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_int4_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny` with INT4 routed experts in compressed-tensors pack-quantized format."""
    from raymoe.model.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("ckpt") / "tiny-int4", preset="tiny", seed=0, quant="int4")
