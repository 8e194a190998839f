"""ModelArgs.from_hf reads the config.json variants K2 Thinking and DeepSeek-V3 ship, rejects what it cannot serve
with a one-line ValueError naming the field, and presets survive to_hf -> from_hf (raymoe/model/args.py)."""

from __future__ import annotations

import copy
import json

import pytest
from transformers import DeepseekV3Config

from raymoe.model.args import PRESETS, ModelArgs

# K2 Thinking's config.json fields (K2_FACTS §1.2) and quantization_config (§1.3), written out here rather than
# taken from the code under test.
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
K2_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "kimi_k2",
    "vocab_size": 163840, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "num_hidden_layers": 61, "first_k_dense_replace": 1, "moe_layer_freq": 1,
    "num_attention_heads": 64, "num_key_value_heads": 64,
    "n_routed_experts": 384, "num_experts_per_tok": 8, "n_shared_experts": 1, "n_group": 1, "topk_group": 1,
    "routed_scaling_factor": 2.827, "scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": True,
    "seq_aux": True, "aux_loss_alpha": 0.001,
    "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "num_nextn_predict_layers": 0, "rope_theta": 50000.0,
    "rope_scaling": {"type": "yarn", "factor": 64.0, "original_max_position_embeddings": 4096, "beta_fast": 1.0,
                     "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
    "max_position_embeddings": 262144, "rms_norm_eps": 1e-5, "bos_token_id": 163584, "eos_token_id": 163586,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "hidden_act": "silu",
    "quantization_config": K2_QUANT,
}


_DROP = object()  # k2(field=_DROP) removes the field


def k2(**changes) -> dict:
    cfg = copy.deepcopy(K2_CONFIG)
    for key, value in changes.items():
        if value is _DROP:
            cfg.pop(key)
        else:
            cfg[key] = value
    return cfg



def _raises_naming(cfg: dict, *needles: str) -> str:
    with pytest.raises(ValueError) as e:
        ModelArgs.from_hf(cfg)
    msg = str(e.value)
    assert "\n" not in msg, f"not one line: {msg!r}"
    for needle in needles:
        assert needle in msg, f"{needle!r} not named in {msg!r}"
    return msg


# -- what K2 Thinking's config.json means ------------------------------------------------------------------------

def test_k2_thinking_config_reads_into_the_preset():
    args = ModelArgs.from_hf(k2())
    assert args == PRESETS["kimi-k2-thinking"]
    assert (args.n_routed_experts, args.num_experts_per_tok, args.num_moe_layers) == (384, 8, 60)
    assert args.kv_cache_size == 576
    # YaRN factor 64 with mscale_all_dim 1: softmax scale 192^-0.5 * mscale(64)^2 (K2_FACTS §2.2).
    assert args.softmax_scale == pytest.approx(0.144680, abs=1e-6)


def test_k2_quantization_config_marks_only_routed_experts():
    q = ModelArgs.from_hf(k2()).quantization
    assert q is not None and (q.num_bits, q.group_size, q.symmetric) == (4, 32, True)
    for proj in ("gate_proj", "up_proj", "down_proj"):
        assert q.is_quantized(f"model.layers.1.mlp.experts.383.{proj}")
        assert not q.is_quantized(f"model.layers.1.mlp.shared_experts.{proj}")
        assert not q.is_quantized(f"model.layers.0.mlp.{proj}")  # the dense layer
    for name in ("lm_head", "model.layers.5.self_attn.q_a_proj", "model.layers.5.self_attn.kv_b_proj"):
        assert not q.is_quantized(name)


def test_deepseek_v3_model_type_and_group_limited_routing():
    args = ModelArgs.from_hf(k2(model_type="deepseek_v3", n_routed_experts=256, n_group=8, topk_group=4,
                                quantization_config=_DROP))
    assert (args.model_type, args.n_group, args.topk_group, args.quantization) == ("deepseek_v3", 8, 4, None)


def test_transformers5_rope_parameters_equal_the_legacy_rope_scaling_block():
    legacy = ModelArgs.from_hf(k2())
    block = dict(K2_CONFIG["rope_scaling"])
    block["rope_type"] = block.pop("type")
    modern = ModelArgs.from_hf(k2(rope_scaling=_DROP, rope_theta=_DROP,
                                  rope_parameters={**block, "rope_theta": 50000.0}))
    assert modern == legacy
    assert (modern.rope.rope_type, modern.rope.factor, modern.rope.beta_fast, modern.rope.rope_theta) == (
        "yarn", 64.0, 1.0, 50000.0)


def test_transformers_default_config_dict_reads():
    """What `DeepseekV3Config().to_dict()` writes in transformers 5: rope_parameters, `dtype` unset, q_lora 1536."""
    args = ModelArgs.from_hf(DeepseekV3Config().to_dict())
    assert (args.model_type, args.rope.rope_type, args.rope.rope_theta) == ("deepseek_v3", "default", 10000.0)
    assert (args.n_group, args.topk_group, args.bos_token_id, args.eos_token_id) == (8, 4, 0, 1)


@pytest.mark.parametrize("rank", [None, 768])
def test_q_lora_rank_null_or_number(rank):
    assert ModelArgs.from_hf(k2(q_lora_rank=rank)).q_lora_rank == rank


def test_null_token_ids_stay_null():
    """`eos_token_id: null` means no EOS id, not K2's 163586 (which may lie outside another model's vocab)."""
    args = ModelArgs.from_hf(k2(bos_token_id=None, eos_token_id=None))
    assert (args.bos_token_id, args.eos_token_id) == (None, None)


def test_eos_list_takes_the_first_id():
    assert ModelArgs.from_hf(k2(eos_token_id=[163586, 163585])).eos_token_id == 163586


def test_mtp_layers_are_accepted():
    assert ModelArgs.from_hf(k2(num_nextn_predict_layers=1)).num_hidden_layers == 61


# -- what it refuses ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field", ["vocab_size", "hidden_size", "moe_intermediate_size", "num_hidden_layers",
                                   "n_routed_experts", "num_experts_per_tok", "kv_lora_rank", "qk_rope_head_dim",
                                   "v_head_dim", "q_lora_rank"])
def test_missing_field_is_named(field):
    _raises_naming(k2(**{field: _DROP}), "missing", repr(field))


@pytest.mark.parametrize("changes, needles", [
    ({"model_type": "llama"}, ("model_type", "'llama'")),
    ({"model_type": _DROP}, ("model_type",)),
    ({"scoring_func": "softmax"}, ("scoring_func", "'softmax'")),
    ({"topk_method": "greedy"}, ("topk_method", "'greedy'")),
    ({"rope_interleave": False}, ("rope_interleave",)),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, ("rope type", "'linear'")),
    ({"rope_scaling": {"type": "yarn", "original_max_position_embeddings": 4096}}, ("'factor'",)),
    ({"torch_dtype": "float8_e4m3fn"}, ("torch_dtype", "float8_e4m3fn")),
    ({"hidden_size": 7168.0}, ("hidden_size",)),
    ({"n_group": 5}, ("n_group (5)", "n_routed_experts (384)")),
    ({"n_group": 4, "topk_group": 8}, ("topk_group (8)",)),
    ({"num_experts_per_tok": 400}, ("num_experts_per_tok (400)",)),
    ({"qk_rope_head_dim": 63}, ("qk_rope_head_dim (63)",)),
], ids=lambda v: "-".join(v) if isinstance(v, dict) else None)
def test_unsupported_value_is_named(changes, needles):
    _raises_naming(k2(**changes), *needles)


@pytest.mark.parametrize("path, value, needles", [
    (("quant_method",), "fp8", ("quant_method", "'fp8'")),
    (("format",), "int-quantized", ("format", "'int-quantized'")),
    (("config_groups", "group_0", "weights", "num_bits"), 8, ("num_bits",)),
    (("config_groups", "group_0", "weights", "symmetric"), False, ("symmetric",)),
    (("config_groups", "group_0", "weights", "strategy"), "channel", ("strategy", "'channel'")),
    (("config_groups", "group_0", "weights", "group_size"), 12, ("group_size",)),
])
def test_unsupported_quantization_config_is_named(path, value, needles):
    cfg = k2()
    node = cfg["quantization_config"]
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    _raises_naming(cfg, "quantization_config", *needles)


def test_missing_config_json_is_named(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        ModelArgs.from_pretrained(tmp_path)


# -- presets round-trip -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_round_trips_through_config_json(name):
    preset = PRESETS[name]
    assert ModelArgs.from_hf(json.loads(json.dumps(preset.to_hf()))) == preset


@pytest.mark.parametrize("name", list(PRESETS))
def test_transformers_reads_our_config_json_the_same_way(name):
    """Our config.json through transformers' DeepseekV3Config and back gives the same args (it rewrites rope)."""
    preset = PRESETS[name]
    hf = {k: v for k, v in preset.to_hf().items() if k != "model_type"}
    back = DeepseekV3Config(**hf).to_dict()
    assert back["rope_parameters"]["rope_type"] == preset.rope.rope_type
    back["model_type"] = preset.model_type
    assert ModelArgs.from_hf(back) == preset
