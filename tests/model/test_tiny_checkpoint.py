"""`make_tiny` writes a complete Hugging Face K2-layout checkpoint (raymoe/model/tiny.py): config.json, sharded
safetensors with an index, generation_config.json and a tokenizer with K2's control tokens; it is deterministic for
a seed, and transformers loads it (after `register_kimi_k2`) to the same logits as raymoe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from raymoe.model.args import ModelArgs
from raymoe.model.hf_compat import register_kimi_k2
from raymoe.model.loader import INDEX_FILE, Checkpoint, build_model, expected_names
from raymoe.model.tiny import make_tiny

# K2 Thinking's quantization_config (K2_FACTS §1.3), written out independently of raymoe's QuantArgs.to_hf.
K2_QUANT = {
    "config_groups": {"group_0": {
        "input_activations": None, "output_activations": None, "targets": ["Linear"],
        "weights": {"actorder": None, "block_structure": None, "dynamic": False, "group_size": 32, "num_bits": 4,
                    "observer": "minmax", "observer_kwargs": {}, "strategy": "group", "symmetric": True,
                    "type": "int"}}},
    "format": "pack-quantized",
    "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", r"re:.*mlp\.(gate|up|gate_up|down)_proj.*"],
    "kv_cache_scheme": None, "quant_method": "compressed-tensors", "quantization_status": "compressed",
}
# K2's control tokens as offsets from the first reserved id (K2: 163584 + offset; K2_FACTS §3.1).
K2_CONTROL = {0: "[BOS]", 1: "[EOS]", 2: "<|im_end|>", 3: "<|im_user|>", 4: "<|im_assistant|>", 10: "<|im_system|>",
              11: "<|tool_calls_section_begin|>", 13: "<|tool_call_begin|>", 17: "<|im_middle|>", 22: "<think>",
              23: "</think>", 254: "[UNK]", 255: "[PAD]"}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="module")
def tiny(root) -> Path:
    return make_tiny(root / "tiny", preset="tiny", seed=0)


@pytest.fixture(scope="module")
def tiny_int4(root) -> Path:
    return make_tiny(root / "tiny-int4", preset="tiny", seed=0, quant="int4")


def _config(d: Path) -> dict:
    return json.loads((d / "config.json").read_text())


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(d.glob("model-*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


# -- layout ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["tiny", "tiny_int4"])
def test_folder_is_a_complete_hf_checkpoint(request, kind):
    d: Path = request.getfixturevalue(kind)
    cfg = _config(d)
    assert cfg["model_type"] == "kimi_k2" and cfg["architectures"] == ["DeepseekV3ForCausalLM"]
    args = ModelArgs.from_hf(cfg)
    index = json.loads((d / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and shards == sorted(p.name for p in d.glob("model-*.safetensors"))
    assert all(s == f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i, s in enumerate(shards))
    tensors = _tensors(d)
    assert set(index["weight_map"]) == set(tensors) == expected_names(args, int4=kind == "tiny_int4")
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    gen = json.loads((d / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (cfg["bos_token_id"], cfg["eos_token_id"])
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (d / name).is_file(), name


def test_int4_checkpoint_carries_k2_quantization_config_and_triples(tiny_int4):
    assert _config(tiny_int4)["quantization_config"] == K2_QUANT
    tensors = _tensors(tiny_int4)
    base = "model.layers.1.mlp.experts.5.down_proj."
    assert (tensors[base + "weight_packed"].dtype, tensors[base + "weight_scale"].dtype,
            tensors[base + "weight_shape"].dtype) == (torch.int32, torch.bfloat16, torch.int64)
    assert tensors[base + "weight_shape"].tolist() == [64, 32]  # [hidden, moe_inter]: K2's [7168, 2048]
    assert tuple(tensors[base + "weight_packed"].shape) == (64, 4) and tuple(tensors[base + "weight_scale"].shape) == (
        64, 1)
    # Everything but routed experts stays unquantized, as in K2 Thinking.
    assert not any(n.endswith("weight_packed") and ".mlp.experts." not in n for n in tensors)
    assert "model.layers.1.mlp.shared_experts.down_proj.weight" in tensors
    assert tensors["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32


def test_tokenizer_loads_with_k2_control_tokens(tiny):
    # transformers 5 AutoTokenizer opens config.json first, and `model_type: kimi_k2` needs the alias (as K2 itself
    # needs trust_remote_code); the engine registers it the same way before loading a tokenizer.
    register_kimi_k2()
    cfg = _config(tiny)
    tok = AutoTokenizer.from_pretrained(str(tiny))
    assert len(tok) == cfg["vocab_size"]
    base = cfg["bos_token_id"]
    got = {off: tok.convert_ids_to_tokens(base + off) for off in K2_CONTROL}
    assert got == K2_CONTROL
    assert tok.convert_tokens_to_ids("<|im_end|>") == cfg["eos_token_id"]  # K2 stops on <|im_end|>
    assert tok.bos_token == "[BOS]" and tok.eos_token == "<|im_end|>"
    text = "Hello, K2!"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_tiny_384e_keeps_k2_routing_fan_out(root):
    d = make_tiny(root / "tiny-384e", preset="tiny-384e", seed=0)
    args = ModelArgs.from_pretrained(d)
    assert (args.n_routed_experts, args.num_experts_per_tok) == (384, 8)
    names = Checkpoint(d).names()
    for layer in range(args.first_k_dense_replace, args.num_hidden_layers):
        assert f"model.layers.{layer}.mlp.experts.383.down_proj.weight" in names
        assert f"model.layers.{layer}.mlp.experts.384.down_proj.weight" not in names


# -- determinism ----------------------------------------------------------------------------------------------------

def test_same_seed_gives_byte_identical_folders_and_another_seed_other_weights(root, tiny):
    again = make_tiny(root / "tiny-again", preset="tiny", seed=0)
    files = sorted(p.name for p in tiny.iterdir())
    assert files == sorted(p.name for p in again.iterdir())
    for name in files:
        assert (tiny / name).read_bytes() == (again / name).read_bytes(), name
    other = _tensors(make_tiny(root / "tiny-seed1", preset="tiny", seed=1))
    mine = _tensors(tiny)
    assert other.keys() == mine.keys()
    differ = [n for n in mine if not torch.equal(mine[n], other[n])]
    assert "model.embed_tokens.weight" in differ and "model.layers.2.mlp.experts.7.up_proj.weight" in differ


def test_unknown_quant_and_planning_presets_are_refused(root):
    with pytest.raises(ValueError, match="quant 'fp8'"):
        make_tiny(root / "x", quant="fp8")
    for planning in ("kimi-k2-thinking", "deepseek-v3"):  # 1 T / 671 B parameters: refused before any allocation
        with pytest.raises(ValueError, match=f"preset '{planning}' is a planning preset"):
            make_tiny(root / "y", preset=planning)
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        make_tiny(root / "z", preset="nope")


# -- transformers reads it the same way -----------------------------------------------------------------------------

def test_transformers_loads_it_and_logits_match_ours(tiny):
    register_kimi_k2()
    hf = AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32).eval()
    assert hf.config.model_type == "kimi_k2"
    ours = build_model(Checkpoint(tiny), dtype="float32")
    ids = torch.randint(0, 2048, (40,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0].float()
        got = ours.compute_logits(ours(ids, torch.arange(len(ids))))
    err = (got - ref).abs().max().item()
    print(f"\ntiny vs transformers: max |logit diff| = {err:.2e} (logit std {ref.std().item():.2f})")
    assert err <= 1e-4
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
