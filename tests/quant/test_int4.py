"""INT4 pack-quantized: our pack/unpack/dequant against compressed-tensors itself, and Int4Linear's kernel path
against a fp32 dequantized reference (raymoe/quant/int4.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from raymoe.quant.int4 import (
    Int4Linear,
    dequantize_int4,
    int4_backend,
    memory_ratio,
    pack_int4,
    quantize_int4,
    unpack_int4,
)

ct_helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
pack_to_int32, unpack_from_int32 = ct_helpers.pack_to_int32, ct_helpers.unpack_from_int32

U_BF16 = 2.0**-8  # bf16 unit roundoff (8 significant bits)

# K2's own quantization_config group (K2_FACTS §1.3), status "frozen" so compress_model quantizes the weight.
K2_QUANT_CONFIG = {
    "config_groups": {"group_0": {
        "input_activations": None, "output_activations": None, "targets": ["Linear"],
        "weights": {"actorder": None, "block_structure": None, "dynamic": False, "group_size": 32, "num_bits": 4,
                    "observer": "minmax", "observer_kwargs": {}, "strategy": "group", "symmetric": True,
                    "type": "int"}}},
    "format": "pack-quantized", "ignore": [], "kv_cache_scheme": None, "quant_method": "compressed-tensors",
    "quantization_status": "frozen",
}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _codes(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(-8, 8, (rows, cols), generator=_gen(seed), dtype=torch.int8)


def _weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=_gen(seed)) * 0.02


def _assert_within(y: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    """Elementwise |y - ref| <= bound; on failure name the first bad index with both values (Liger style)."""
    err = (y.float() - ref).abs()
    bad = (err > bound).nonzero()
    if bad.numel():
        i = tuple(bad[0].tolist())
        raise AssertionError(f"{what}: {len(bad)} elements out of bound; first {i}: got {y[i].item():.6g}, "
                             f"ref {ref[i].item():.6g}, err {err[i].item():.3g} > bound {bound[i].item():.3g}")


# -- pack / unpack --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 8), (4, 32), (7, 64), (48, 128), (2048, 256)])
def test_pack_is_bit_identical_to_compressed_tensors(shape):
    q = _codes(*shape)
    ours = pack_int4(q)
    assert ours.dtype == torch.int32 and ours.shape == (shape[0], shape[1] // 8)
    assert torch.equal(ours, pack_to_int32(q, 4))


@pytest.mark.parametrize("shape", [(1, 8), (7, 64), (48, 128), (2048, 256)])
def test_unpack_equals_compressed_tensors_and_round_trips(shape):
    q = _codes(*shape, seed=1)
    packed = pack_to_int32(q, 4)
    ours = unpack_int4(packed, shape[1])
    assert ours.dtype == torch.int8
    assert torch.equal(ours, unpack_from_int32(packed, 4, torch.Size(shape)))
    assert torch.equal(ours, q)


@pytest.mark.parametrize("cols", [1, 5, 13, 20, 36])
def test_ragged_columns_pad_like_compressed_tensors(cols):
    q = _codes(3, cols, seed=2)
    ours = pack_int4(q)
    assert ours.shape == (3, -(-cols // 8))
    assert torch.equal(ours, pack_to_int32(q, 4))  # last word padded with nibble 0, as the library does
    assert torch.equal(unpack_int4(ours, cols), q)


def test_pack_layout_is_lsb_first_offset_binary():
    q = torch.tensor([[-8, -7, 0, 1, 2, 3, 6, 7]], dtype=torch.int8)  # nibbles 0, 1, 8, 9, 10, 11, 14, 15
    assert pack_int4(q).item() == int.from_bytes(bytes([0x10, 0x98, 0xBA, 0xFE]), "little", signed=True)


def test_pack_and_unpack_reject_bad_input_with_value_error():
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(torch.tensor([[8] + [0] * 7], dtype=torch.int8))
    with pytest.raises(ValueError, match="int8"):
        pack_int4(torch.zeros(2, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"ceil\(20 / 8\) = 3, got 2"):
        unpack_int4(torch.zeros(2, 2, dtype=torch.int32), 20)


# -- quantize / dequantize ------------------------------------------------------------------------------------------

def test_quantize_uses_k2_qat_codes_and_survives_zero_groups():
    w = _weight(64, 256)
    w[3, 32:64] = 0.0  # one all-zero group
    packed, scale, shape = quantize_int4(w)
    assert (packed.dtype, scale.dtype, shape.dtype) == (torch.int32, torch.bfloat16, torch.int64)
    assert (packed.shape, scale.shape, shape.tolist()) == ((64, 32), (64, 8), [64, 256])
    q = unpack_int4(packed, 256)
    assert q.min() == -7 and q.max() == 7  # 15 codes, -8 unused (K2_FACTS §1.3)
    deq = dequantize_int4(packed, scale, shape)
    assert torch.isfinite(deq).all() and torch.equal(deq[3, 32:64], torch.zeros(32))
    # Round-to-nearest: error at most half a step of each group's stored scale.
    step = scale.float().repeat_interleave(32, dim=1)
    assert ((deq - w).abs() <= step / 2 + 1e-9).all()


def _ct_module_compress(w: torch.Tensor, scale: torch.Tensor | None):
    """Quantize + compress a one-Linear model with compressed-tensors' own config, apply and ModelCompressor APIs.

    scale None: the library's own symmetric minmax scale (calculate_qparams on per-group min/max).
    Returns (state_dict after compress, weight after the library's decompress).
    """
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    cfg = QuantizationConfig.model_validate(K2_QUANT_CONFIG)
    model = nn.Sequential(nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype))
    model[0].weight.data.copy_(w)
    apply_quantization_config(model, cfg)
    lin = model[0]
    if scale is None:
        g = w.float().view(w.shape[0], -1, 32)
        scale, _ = calculate_qparams(g.amin(-1), g.amax(-1), lin.quantization_scheme.weights)
    lin.weight_scale.data.copy_(scale)
    compressor = ModelCompressor(quantization_config=cfg)
    compressor.compress_model(model)
    compressed = {k.removeprefix("0."): v.clone() for k, v in model.state_dict().items()}
    compressor.decompress_model(model)
    return compressed, model[0].weight.detach().clone()


@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float32])
def test_dequantize_reproduces_compressed_tensors_decompress_exactly(wdtype):
    w = _weight(48, 128, seed=3).to(wdtype)
    sd, ct_weight = _ct_module_compress(w, scale=None)
    assert set(sd) == {"weight_packed", "weight_scale", "weight_shape"}
    assert (sd["weight_packed"].dtype, sd["weight_scale"].dtype, sd["weight_shape"].dtype) == (
        torch.int32, wdtype, torch.int64)
    ours = dequantize_int4(sd["weight_packed"], sd["weight_scale"], sd["weight_shape"], dtype=ct_weight.dtype)
    assert torch.equal(ours, ct_weight)
    # The library's minmax divides by 7.5 (it may emit -8); ours by 7 (K2's QAT codes). Document the difference.
    _, our_scale, _ = quantize_int4(w.float(), scale_dtype=torch.float32)
    torch.testing.assert_close(sd["weight_scale"].float() * 7.5 / 7, our_scale, rtol=U_BF16, atol=0)


def test_quantize_codes_match_compressed_tensors_given_the_same_scale():
    w = _weight(48, 128, seed=4)  # fp32: the library then divides in fp32 too, like us
    packed, scale, shape = quantize_int4(w, scale_dtype=torch.float32)
    sd, ct_weight = _ct_module_compress(w, scale=scale)
    assert torch.equal(sd["weight_packed"], packed)
    assert torch.equal(sd["weight_shape"], shape)
    assert torch.equal(dequantize_int4(packed, scale, shape), ct_weight)


# -- Int4Linear -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("out_features", [48, 40])  # 40: not a multiple of 16, the kernel path pads rows
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 8, 33])
def test_kernel_forward_matches_fp32_dequant_reference(out_features, xdtype, m):
    in_features = 256
    w = _weight(out_features, in_features, seed=5)
    layer = Int4Linear.from_float(w)
    assert layer.backend == int4_backend() == "cpu_int4pack"
    deq = dequantize_int4(*quantize_int4(w))  # [O, I] fp32, exact
    x = torch.randn(2, m, in_features, generator=_gen(6)).to(xdtype)  # [B, M, I]
    y = layer(x)
    assert y.shape == (2, m, out_features) and y.dtype == xdtype
    ref = x.float() @ deq.t()
    # bf16 error bound: activation cast (u) + kernel product rounding (u) + output rounding (u), each relative to
    # the absolute sum |x| @ |W|^T. Measured worst case 0.33u (these shapes and 2048x7168, AVX512, torch 2.13).
    _assert_within(y, ref, 3 * U_BF16 * (x.float().abs() @ deq.abs().t()), f"kernel {xdtype} M={m}")


def test_fp32_module_is_exact_and_bf16_module_handles_empty_input():
    w = _weight(32, 64, seed=7)
    exact = Int4Linear.from_float(w, dtype=torch.float32)
    deq = dequantize_int4(*quantize_int4(w, scale_dtype=torch.float32))
    x = torch.randn(5, 64, generator=_gen(8))
    _assert_within(exact(x), x @ deq.t(), 1e-6 * (x.abs() @ deq.abs().t()), "fp32 kernel")
    layer = Int4Linear.from_float(w)
    for xdtype in (torch.float32, torch.bfloat16):
        y = layer(torch.empty(0, 64, dtype=xdtype))
        assert y.shape == (0, 32) and y.dtype == xdtype
        assert layer(torch.empty(2, 0, 64, dtype=xdtype)).shape == (2, 0, 32)


def test_dequant_fallback_for_group_sizes_the_kernel_rejects():
    w = _weight(24, 96, seed=9)
    layer = Int4Linear.from_float(w, group_size=16)  # the op accepts only 32/64/128/256
    assert layer.backend == int4_backend(group_size=16) == "dequant"
    deq = dequantize_int4(*quantize_int4(w, group_size=16), group_size=16)
    x = torch.randn(3, 96, generator=_gen(10))
    _assert_within(layer(x), x @ deq.t(), 3 * U_BF16 * (x.abs() @ deq.abs().t()), "dequant fallback")


def test_meta_construction_then_checkpoint_load_then_finalize():
    w = _weight(64, 128, seed=11)
    packed, scale, shape = quantize_int4(w)
    with torch.device("meta"):
        layer = Int4Linear(128, 64)
    assert {n: (tuple(b.shape), b.dtype) for n, b in layer.named_buffers()} == {
        "weight_packed": ((64, 16), torch.int32), "weight_scale": ((64, 4), torch.bfloat16),
        "weight_shape": ((2,), torch.int64)}
    assert all(b.is_meta for b in layer.buffers())
    with pytest.raises(ValueError, match="meta"):
        layer.finalize()
    layer.to_empty(device="cpu")
    layer.load_state_dict({"weight_packed": packed, "weight_scale": scale, "weight_shape": shape})
    layer.finalize()
    x = torch.randn(4, 128, generator=_gen(12), dtype=torch.bfloat16)
    deq = dequantize_int4(packed, scale, shape)
    _assert_within(layer(x), x.float() @ deq.t(), 3 * U_BF16 * (x.float().abs() @ deq.abs().t()), "after load")


@pytest.mark.parametrize(
    ("name", "bad", "message"),
    [
        ("weight_packed", torch.zeros(64, 15, dtype=torch.int32),
         r"weight_packed expected shape \(64, 16\).*got shape \(64, 15\)"),
        ("weight_packed", torch.zeros(64, 16, dtype=torch.int64),
         r"weight_packed .*got shape \(64, 16\) dtype torch.int64"),
        ("weight_scale", torch.zeros(64, 8, dtype=torch.bfloat16),
         r"weight_scale expected shape \(64, 4\).*got shape \(64, 8\)"),
        ("weight_shape", torch.tensor([64, 256]), r"weight_shape expected values \(64, 128\), got \(64, 256\)"),
    ],
)
def test_finalize_names_the_bad_tensor_and_both_shapes(name, bad, message):
    layer = Int4Linear(128, 64)
    setattr(layer, name, bad)  # what a mismatched checkpoint loaded with assign=True leaves behind
    with pytest.raises(ValueError, match=message):
        layer.finalize()


def test_int4_is_at_least_3_5x_smaller_than_bf16():
    out_features, in_features = 256, 1024  # K2 gate/up are [2048, 7168]: same ratios, 56x the bytes
    w = _weight(out_features, in_features, seed=13)
    bf16_bytes = nn.Linear(in_features, out_features, bias=False, dtype=torch.bfloat16).weight.nbytes
    loaded = Int4Linear.from_float(w, finalize=False)  # checkpoint layout: what is read from disk and loaded
    assert bf16_bytes / loaded.nbytes() == pytest.approx(memory_ratio(out_features, in_features)) == 2 / (0.5 + 2 / 32)
    assert bf16_bytes / loaded.nbytes() >= 3.5
    # Kernel layout: uint8 codes (same 0.5 B/weight) + [G, N, 2] scales_and_zeros whose zeros double the scale bytes.
    resident = loaded.finalize()
    assert resident.backend == "cpu_int4pack"
    assert bf16_bytes / resident.nbytes() == pytest.approx(2 / (0.5 + 4 / 32))  # 3.2x
    assert "weight_packed" not in resident.state_dict() and resident.weight_packed is None


def test_construction_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"in_features \(100\) must be divisible by group_size \(32\)"):
        Int4Linear(100, 64)
    with pytest.raises(ValueError, match="dtype"):
        Int4Linear(128, 64, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="finalize"):
        Int4Linear(128, 64)(torch.zeros(1, 128))
    layer = Int4Linear.from_float(_weight(64, 128))
    with pytest.raises(ValueError, match="expected 128, got 96"):
        layer(torch.zeros(1, 96))
