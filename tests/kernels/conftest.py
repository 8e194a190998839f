"""Kernel tests run on every machine: on CUDA when present, else on CPU under the Triton interpreter.

triton.jit picks the interpreter when a function is *decorated*, Triton's own tl.* helpers included, so
TRITON_INTERPRET must be set before `triton` is first imported. This conftest sets it when it is first; if some
test collected earlier (e.g. of a tier that uses the kernels) already imported triton, it stops the run with the fix
rather than letting every kernel test fail obscurely.
"""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    if "triton" in sys.modules:
        raise pytest.UsageError(
            "triton was imported before tests/kernels/conftest.py could set TRITON_INTERPRET=1 (no CUDA device): "
            "set it in tests/conftest.py before anything imports triton, or export TRITON_INTERPRET=1"
        )
    os.environ["TRITON_INTERPRET"] = "1"

# Reference outputs are fp32 math; kernels run in the input dtype. Never loosen these per test.
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """allclose under TOL[dtype] (exact for integer tensors), naming the first mismatching indices."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual, expected = actual.cpu(), expected.cpu()
    if not actual.dtype.is_floating_point:
        bad = actual != expected
        atol = rtol = 0.0
    else:
        atol, rtol = TOL[dtype]
        bad = ~torch.isclose(actual.float(), expected.float(), atol=atol, rtol=rtol)
    if bad.any():
        first = [(tuple(i), actual[tuple(i)].item(), expected[tuple(i)].item()) for i in bad.nonzero()[:5].tolist()]
        raise AssertionError(
            f"{int(bad.sum())}/{bad.numel()} mismatched (atol={atol}, rtol={rtol}); "
            f"first (index, actual, expected): {first}"
        )


def _assert_close_ref(impl, ref, *inputs, dtype: torch.dtype, **kwargs):
    """Run `impl` and `ref` on the same inputs and compare every output; returns impl's output."""
    out, expected = impl(*inputs, **kwargs), ref(*inputs, **kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    expecteds = expected if isinstance(expected, tuple) else (expected,)
    assert len(outs) == len(expecteds)
    for o, e in zip(outs, expecteds):
        assert o.dtype == e.dtype, f"dtype {o.dtype} != reference {e.dtype}"
        assert_close(o, e, dtype)
    return out


@pytest.fixture
def assert_close_ref():
    return _assert_close_ref


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
