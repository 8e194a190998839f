"""Checkpoint loading (raymoe/model/loader.py): single-file and sharded HF layouts give the same model; each
component reads only the tensors it owns (`Checkpoint.read_names`); INT4 experts load packed or dequantized to the
same greedy tokens; a bad checkpoint is a one-line ValueError naming the tensor or file at fault."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from raymoe.model.args import ModelArgs
from raymoe.model.deepseek import reference_generate
from raymoe.model.loader import INDEX_FILE, Checkpoint, build_model, expected_names, expert_names, load_weights
from raymoe.model.moe import RoutedExperts
from raymoe.quant.int4 import Int4Linear, dequantize_int4

PROMPTS = [[1792, 40, 41, 42], [300, 301], [7, 8, 9, 10, 11, 12, 13]]


@pytest.fixture(scope="module")
def tiny(tiny_ckpt) -> Path:
    return tiny_ckpt  # session-wide (tests/conftest.py); tests that damage a checkpoint copy it first


@pytest.fixture(scope="module")
def tiny_int4(tiny_int4_ckpt) -> Path:
    return tiny_int4_ckpt


@pytest.fixture(scope="module")
def ckpts(tiny, tiny_int4) -> dict[str, Path]:
    return {"plain": tiny, "int4": tiny_int4}


def _routed(names) -> set[str]:
    return {n for n in names if ".mlp.experts." in n}


def _moe_layers(args: ModelArgs) -> list[int]:
    return [i for i in range(args.num_hidden_layers) if args.is_moe_layer(i)]


# -- layouts ------------------------------------------------------------------------------------------------------

def test_sharded_checkpoint_has_an_index_over_several_shards(tiny):
    wm = json.loads((tiny / INDEX_FILE).read_text())["weight_map"]
    shards = sorted(set(wm.values()))
    assert len(shards) >= 2 and all((tiny / s).is_file() for s in shards)
    ckpt = Checkpoint(tiny)
    assert ckpt.names() == set(wm) == expected_names(ckpt.args, int4=False)


def test_single_file_and_sharded_load_the_same_tensors(tiny, tmp_path):
    merged: dict[str, torch.Tensor] = {}
    for shard in sorted(tiny.glob("model-*.safetensors")):
        merged.update(load_file(str(shard)))
    single = tmp_path / "single"
    single.mkdir()
    save_file(merged, str(single / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(tiny / "config.json", single / "config.json")

    a = build_model(Checkpoint(tiny)).state_dict()
    b = build_model(Checkpoint(single)).state_dict()
    assert set(a) == set(b) == set(merged)
    for name, t in merged.items():
        assert torch.equal(a[name], t) and torch.equal(b[name], t), name


# -- reading only what a component asks for ------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["plain", "int4"])
def test_dense_part_reads_no_routed_expert_tensor(ckpts, kind):
    ckpt = Checkpoint(ckpts[kind])
    model = build_model(ckpt, local_experts=False)
    routed = _routed(ckpt.names())
    assert routed and ckpt.read_names.isdisjoint(routed)
    assert ckpt.read_names == ckpt.names() - routed  # and everything else was read
    assert not _routed(model.state_dict())


class _ExpertShard(nn.Module):
    """A module tree holding experts `expert_ids` of every MoE layer under the checkpoint's names."""

    def __init__(self, args: ModelArgs, expert_ids: list[int], *, quantized: bool):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleDict()
        for i in _moe_layers(args):
            layer = nn.Module()
            layer.mlp = nn.Module()
            layer.mlp.experts = RoutedExperts(args, expert_ids, quantized=quantized, dtype=torch.float32)
            self.model.layers[str(i)] = layer


@pytest.mark.parametrize("kind", ["plain", "int4"])
def test_expert_shard_reads_only_its_experts(ckpts, kind):
    ckpt = Checkpoint(ckpts[kind])
    int4 = ckpt.args.quantization is not None
    shard = _ExpertShard(ckpt.args, [0, 1], quantized=int4)
    loaded = load_weights(shard, ckpt)
    want = {n for i in _moe_layers(ckpt.args) for e in (0, 1) for n in expert_names(ckpt.args, i, e, int4=int4)}
    assert ckpt.read_names == set(loaded) == want

    full = build_model(Checkpoint(ckpts[kind]))
    x = torch.randn(5, ckpt.args.hidden_size)
    for i in _moe_layers(ckpt.args):
        for e in ("0", "1"):
            ours = shard.model.layers[str(i)].mlp.experts[e]
            assert torch.equal(ours(x), full.model.layers[i].mlp.experts[e](x)), (i, e)


# -- INT4: packed vs dequantized -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def int4_models(tiny_int4):
    return {mode: build_model(Checkpoint(tiny_int4), int4_mode=mode) for mode in ("packed", "dequant")}


def test_int4_modes_build_packed_and_dense_expert_linears(tiny_int4, int4_models):
    packed = int4_models["packed"].model.layers[1].mlp
    dense = int4_models["dequant"].model.layers[1].mlp
    assert isinstance(packed.experts["3"].up_proj, Int4Linear)
    assert isinstance(dense.experts["3"].up_proj, nn.Linear)
    assert isinstance(packed.shared_experts.up_proj, nn.Linear)  # shared experts stay BF16 in K2
    ckpt = Checkpoint(tiny_int4)
    base = "model.layers.1.mlp.experts.3.up_proj."
    want = dequantize_int4(ckpt.get(base + "weight_packed"), ckpt.get(base + "weight_scale"),
                           ckpt.get(base + "weight_shape"), group_size=32, dtype=torch.float32)
    assert torch.equal(dense.experts["3"].up_proj.weight, want)


def test_int4_packed_and_dequant_give_the_same_greedy_tokens(int4_models):
    runs = {mode: [reference_generate(m, p, 12) for p in PROMPTS] for mode, m in int4_models.items()}
    print(f"\nint4 packed greedy: {runs['packed']}")
    assert runs["packed"] == runs["dequant"]


def test_unknown_int4_mode_is_rejected(tiny_int4):
    with pytest.raises(ValueError, match="int4_mode 'fp4'"):
        build_model(Checkpoint(tiny_int4), int4_mode="fp4")


# -- bad checkpoints ------------------------------------------------------------------------------------------------

EXPERT = "model.layers.1.mlp.experts.3.up_proj.weight"
KV_B = "model.layers.2.self_attn.kv_b_proj.weight"


def _index(d: Path) -> dict:
    return json.loads((d / INDEX_FILE).read_text())


def _rewrite_shard_of(d: Path, name: str, edit) -> None:
    f = d / _index(d)["weight_map"][name]
    sd = load_file(str(f))
    edit(sd)
    save_file(sd, str(f), metadata={"format": "pt"})


def _drop_tensor(d: Path) -> None:
    _rewrite_shard_of(d, EXPERT, lambda sd: sd.pop(EXPERT))
    ix = _index(d)
    del ix["weight_map"][EXPERT]
    (d / INDEX_FILE).write_text(json.dumps(ix))


def _drop_tensor_keep_index(d: Path) -> None:
    _rewrite_shard_of(d, EXPERT, lambda sd: sd.pop(EXPERT))


def _wrong_shape(d: Path) -> None:
    _rewrite_shard_of(d, KV_B, lambda sd: sd.__setitem__(KV_B, sd[KV_B][:, :-1].contiguous()))


def _unknown_tensor(d: Path) -> None:
    name = "model.layers.1.mlp.experts.99.up_proj.weight"
    _rewrite_shard_of(d, KV_B, lambda sd: sd.__setitem__(name, torch.zeros(2)))
    ix = _index(d)
    ix["weight_map"][name] = ix["weight_map"][KV_B]
    (d / INDEX_FILE).write_text(json.dumps(ix))


def _edit_config(**changes):
    def edit(d: Path) -> None:
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(changes)
        (d / "config.json").write_text(json.dumps(cfg))
    return edit


def _shard(d: Path, i: int) -> Path:
    return sorted(d.glob("model-*.safetensors"))[i]


def _truncate_shard(d: Path) -> None:
    f = _shard(d, 1)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _garbage_shard(d: Path) -> None:
    _shard(d, 2).write_bytes(os.urandom(4096))


def _garbage_header(d: Path) -> None:
    f = _shard(d, 0)
    raw = bytearray(f.read_bytes())
    raw[8:24] = b"\x00garbage-header!"
    f.write_bytes(bytes(raw))


BAD = {
    "missing tensor": (_drop_tensor, ["missing tensor", EXPERT]),
    "tensor listed in the index but not in its shard": (_drop_tensor_keep_index, ["cannot read tensor", EXPERT]),
    "wrong shape": (_wrong_shape, [KV_B, "(128, 31)", "expected (128, 32)"]),
    "unknown tensor": (_unknown_tensor, ["unknown tensor", "experts.99.up_proj"]),
    "unknown model_type": (_edit_config(model_type="llama"), ["model_type", "'llama'"]),
    "truncated shard": (_truncate_shard, ["model-00002-of-00004.safetensors", "corrupt"]),
    "garbage shard": (_garbage_shard, ["model-00003-of-00004.safetensors", "corrupt"]),
    "garbage header": (_garbage_header, ["model-00001-of-00004.safetensors", "corrupt"]),
    "missing shard": (lambda d: _shard(d, 3).unlink(), ["model-00004-of-00004.safetensors", "missing", INDEX_FILE]),
    "missing config.json": (lambda d: (d / "config.json").unlink(), ["no config.json"]),
    "invalid config.json": (lambda d: (d / "config.json").write_text("{"), ["config.json", "invalid JSON"]),
    "invalid index": (lambda d: (d / INDEX_FILE).write_text("{}"), [INDEX_FILE, "invalid index"]),
    "no weights": (lambda d: [f.unlink() for f in d.glob("*.safetensors*")], ["no safetensors files"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoint_is_a_one_line_value_error_naming_the_problem(tiny, tmp_path, case):
    mutate, needles = BAD[case]
    d = tmp_path / "ckpt"
    shutil.copytree(tiny, d)
    assert len(list(d.glob("model-*.safetensors"))) == 4  # the needles above name shards by position
    mutate(d)
    with pytest.raises(ValueError) as e:
        build_model(Checkpoint(d))
    msg = str(e.value)
    assert "\n" not in msg, f"not one line: {msg!r}"
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        Checkpoint(tmp_path / "nope")


def test_loading_into_a_module_with_a_foreign_name_names_it(tiny):
    module = nn.Module()
    module.model = nn.Module()
    module.model.mystery = nn.Linear(2, 2, bias=False)
    with pytest.raises(ValueError, match=r"missing tensor 'model\.mystery\.weight'"):
        load_weights(module, Checkpoint(tiny))

