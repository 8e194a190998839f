"""Model hyperparameters: `ModelArgs`, built once from a checkpoint's config.json.

Field names copy Hugging Face `config.json` names exactly (DeepseekV3Config), so `from_hf` is a
field-for-field copy plus validation. Only model code (and planning tools) see this object; the
serving config tree lives in `raymoe.config`. Presets hold tiny test shapes next to the real ones
(the real value is noted in a comment where a tiny preset shrinks it).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("kimi_k2", "deepseek_v3")


@dataclass(frozen=True)
class RopeArgs:
    """RoPE parameters, normalised from the legacy `rope_scaling` block or `rope_parameters`."""

    rope_theta: float = 10000.0
    rope_type: str = "default"  # "default" | "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0


@dataclass(frozen=True)
class QuantArgs:
    """compressed-tensors `pack-quantized` INT4 weight-only scheme (K2 Thinking's routed experts)."""

    num_bits: int = 4
    group_size: int = 32
    symmetric: bool = True
    ignore: tuple[str, ...] = ()

    def is_quantized(self, module_name: str) -> bool:
        """True when the Linear `module_name` (e.g. `model.layers.1.mlp.experts.0.up_proj`) is packed."""
        for pat in self.ignore:
            if pat.startswith("re:"):
                if re.match(pat[3:], module_name):
                    return False
            elif module_name == pat or module_name.endswith("." + pat):
                return False
        return True

    def to_hf(self) -> dict[str, Any]:
        """The `quantization_config` block K2 Thinking ships (K2_FACTS §1.3)."""
        return {
            "config_groups": {
                "group_0": {
                    "input_activations": None,
                    "output_activations": None,
                    "targets": ["Linear"],
                    "weights": {
                        "actorder": None,
                        "block_structure": None,
                        "dynamic": False,
                        "group_size": self.group_size,
                        "num_bits": self.num_bits,
                        "observer": "minmax",
                        "observer_kwargs": {},
                        "strategy": "group",
                        "symmetric": self.symmetric,
                        "type": "int",
                    },
                }
            },
            "format": "pack-quantized",
            "ignore": list(self.ignore),
            "kv_cache_scheme": None,
            "quant_method": "compressed-tensors",
            "quantization_status": "compressed",
        }


K2_QUANT_IGNORE = (
    "lm_head",
    "re:.*self_attn.*",
    "re:.*shared_experts.*",
    r"re:.*mlp\.(gate|up|gate_up|down)_proj.*",
)


def _parse_quant(qc: dict[str, Any]) -> QuantArgs:
    method = qc.get("quant_method")
    if method != "compressed-tensors":
        raise ValueError(f"quantization_config.quant_method={method!r} is not supported "
                         "(supported: 'compressed-tensors')")
    fmt = qc.get("format")
    if fmt != "pack-quantized":
        raise ValueError(f"quantization_config.format={fmt!r} is not supported "
                         "(supported: 'pack-quantized')")
    groups = qc.get("config_groups") or {}
    if len(groups) != 1:
        raise ValueError(f"quantization_config.config_groups must hold exactly one group, got {len(groups)}")
    w = next(iter(groups.values())).get("weights") or {}
    checks = {"num_bits": 4, "strategy": "group", "type": "int", "symmetric": True}
    for key, want in checks.items():
        if w.get(key) != want:
            raise ValueError(f"quantization_config weights.{key}={w.get(key)!r} is not supported (need {want!r})")
    gs = w.get("group_size")
    if not isinstance(gs, int) or gs <= 0 or gs % 8:
        raise ValueError(f"quantization_config weights.group_size={gs!r} must be a positive multiple of 8")
    return QuantArgs(num_bits=4, group_size=gs, symmetric=True, ignore=tuple(qc.get("ignore") or ()))


def _get(block: dict[str, Any], key: str, default: float) -> float:
    value = block.get(key)
    return default if value is None else value


def _parse_rope(cfg: dict[str, Any]) -> RopeArgs:
    block = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(block, dict):
        raise ValueError(f"config.json: rope_scaling/rope_parameters must be an object, got {block!r}")
    theta = block.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rtype = block.get("rope_type", block.get("type", "default"))
    if rtype not in ("default", "yarn"):
        raise ValueError(f"config.json: rope type {rtype!r} is not supported (supported: 'default', 'yarn')")
    if rtype == "default":
        return RopeArgs(rope_theta=float(theta))
    for key in ("factor", "original_max_position_embeddings"):
        if key not in block:
            raise ValueError(f"config.json: yarn rope scaling is missing field {key!r}")
    return RopeArgs(
        rope_theta=float(theta),
        rope_type="yarn",
        factor=float(block["factor"]),
        original_max_position_embeddings=int(block["original_max_position_embeddings"]),
        beta_fast=float(_get(block, "beta_fast", 32.0)),
        beta_slow=float(_get(block, "beta_slow", 1.0)),
        mscale=float(_get(block, "mscale", 1.0)),
        mscale_all_dim=float(_get(block, "mscale_all_dim", 0.0)),
    )


_REQUIRED = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_attention_heads", "n_routed_experts", "num_experts_per_tok", "kv_lora_rank",
    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
)


@dataclass(frozen=True)
class ModelArgs:
    """DeepSeek-V3 / Kimi K2 hyperparameters (HF config.json names)."""

    vocab_size: int = 163840
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 64
    n_shared_experts: int = 1
    n_routed_experts: int = 384
    num_experts_per_tok: int = 8
    routed_scaling_factor: float = 2.827
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    max_position_embeddings: int = 262144
    rms_norm_eps: float = 1e-5
    rope: RopeArgs = field(default_factory=RopeArgs)
    bos_token_id: int | None = 163584
    eos_token_id: int | None = 163586
    tie_word_embeddings: bool = False
    torch_dtype: str = "bfloat16"
    model_type: str = "kimi_k2"
    quantization: QuantArgs | None = None

    # -- derived -----------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))

    def is_moe_layer(self, layer_id: int) -> bool:
        return layer_id >= self.first_k_dense_replace and layer_id % self.moe_layer_freq == 0

    @property
    def kv_cache_size(self) -> int:
        """Values cached per token per layer: normalised latent + roped key (576 for K2)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim**-0.5
        r = self.rope
        if r.rope_type == "yarn" and r.mscale_all_dim:
            m = yarn_get_mscale(r.factor, r.mscale_all_dim)
            scale = scale * m * m
        return scale

    # -- construction ------------------------------------------------------------------------
    def __post_init__(self) -> None:
        checks = [
            ("num_experts_per_tok", self.num_experts_per_tok <= self.n_routed_experts,
             f"num_experts_per_tok ({self.num_experts_per_tok}) must be <= n_routed_experts ({self.n_routed_experts})"),
            ("n_group", self.n_group >= 1 and self.n_routed_experts % self.n_group == 0,
             f"n_group ({self.n_group}) must divide n_routed_experts ({self.n_routed_experts})"),
            ("topk_group", 1 <= self.topk_group <= self.n_group,
             f"topk_group ({self.topk_group}) must be in [1, n_group ({self.n_group})]"),
            ("first_k_dense_replace", 0 <= self.first_k_dense_replace <= self.num_hidden_layers,
             f"first_k_dense_replace ({self.first_k_dense_replace}) must be in [0, num_hidden_layers]"),
        ]
        for _, ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        if self.n_group > 1 and self.topk_group * (self.n_routed_experts // self.n_group) < self.num_experts_per_tok:
            raise ValueError(f"topk_group ({self.topk_group}) groups of {self.n_routed_experts // self.n_group} "
                             f"experts cannot hold num_experts_per_tok ({self.num_experts_per_tok})")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "n_routed_experts", "kv_lora_rank", "qk_rope_head_dim", "v_head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} ({getattr(self, name)}) must be >= 1")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim ({self.qk_rope_head_dim}) must be even")

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelArgs:
        """Build from a parsed config.json; a missing or unsupported field raises ValueError naming it."""
        mt = cfg.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"config.json: model_type {mt!r} is not supported "
                             f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        for key in _REQUIRED:
            if key not in cfg:
                raise ValueError(f"config.json: missing field {key!r}")
        if "q_lora_rank" not in cfg:
            raise ValueError("config.json: missing field 'q_lora_rank' (use null for no query compression)")
        scoring = cfg.get("scoring_func", "sigmoid")
        if scoring != "sigmoid":
            raise ValueError(f"config.json: scoring_func {scoring!r} is not supported (supported: 'sigmoid')")
        topk_method = cfg.get("topk_method", "noaux_tc")
        if topk_method != "noaux_tc":
            raise ValueError(f"config.json: topk_method {topk_method!r} is not supported (supported: 'noaux_tc')")
        if cfg.get("rope_interleave", True) is not True:
            raise ValueError("config.json: rope_interleave=false is not supported")
        if cfg.get("num_nextn_predict_layers", 0) not in (0, None):
            pass  # MTP layers are not loaded (speculative decoding is not implemented); they are skipped.
        names = {f.name for f in dataclasses.fields(cls)} - {"rope", "quantization", "torch_dtype"}
        # null is a value for these (no query compression, no BOS/EOS id), not "use the K2 default".
        nullable = {"q_lora_rank", "bos_token_id", "eos_token_id"}
        kwargs: dict[str, Any] = {k: cfg[k] for k in names if k in cfg and (cfg[k] is not None or k in nullable)}
        eos = cfg.get("eos_token_id")
        if isinstance(eos, list):
            kwargs["eos_token_id"] = eos[0] if eos else None
        kwargs["rope"] = _parse_rope(cfg)
        dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"
        if dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"config.json: torch_dtype {dtype!r} is not supported")
        kwargs["torch_dtype"] = dtype
        if cfg.get("quantization_config"):
            kwargs["quantization"] = _parse_quant(cfg["quantization_config"])
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "n_routed_experts"):
            if not isinstance(kwargs[key], int):
                raise ValueError(f"config.json: {key} must be an integer, got {kwargs[key]!r}")
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelArgs:
        p = Path(path) / "config.json"
        if not p.is_file():
            raise ValueError(f"{path}: no config.json (not a Hugging Face checkpoint folder)")
        try:
            cfg = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: invalid JSON ({e})") from e
        return cls.from_hf(cfg)

    def to_hf(self) -> dict[str, Any]:
        """config.json content (K2 layout: DeepseekV3ForCausalLM architecture, legacy rope_scaling block)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name not in ("rope", "quantization")}
        r = self.rope
        d.update(
            architectures=["DeepseekV3ForCausalLM"], scoring_func="sigmoid", topk_method="noaux_tc",
            num_key_value_heads=self.num_attention_heads, hidden_act="silu", rope_theta=r.rope_theta,
            rope_interleave=True, num_nextn_predict_layers=0, attention_bias=False, attention_dropout=0.0,
            initializer_range=0.02, use_cache=True, aux_loss_alpha=0.001, seq_aux=True,
        )
        if r.rope_type == "yarn":
            d["rope_scaling"] = {
                "type": "yarn", "factor": r.factor,
                "original_max_position_embeddings": r.original_max_position_embeddings,
                "beta_fast": r.beta_fast, "beta_slow": r.beta_slow,
                "mscale": r.mscale, "mscale_all_dim": r.mscale_all_dim,
            }
        else:
            d["rope_scaling"] = None
        if self.quantization is not None:
            d["quantization_config"] = self.quantization.to_hf()
        return d

    def replace(self, **changes: Any) -> ModelArgs:
        return dataclasses.replace(self, **changes)


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


_K2_ROPE = RopeArgs(rope_theta=50000.0, rope_type="yarn", factor=64.0, original_max_position_embeddings=4096,
                    beta_fast=1.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)
_TINY_ROPE = RopeArgs(rope_theta=50000.0, rope_type="yarn", factor=4.0, original_max_position_embeddings=1024,
                      beta_fast=1.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)

# Tiny tokenizer: 1792 byte-level BPE tokens + 256 reserved specials (K2: 163584 + 256).
TINY_VOCAB = 2048
TINY_NUM_BASE_TOKENS = 1792

PRESETS: dict[str, ModelArgs] = {
    "kimi-k2-thinking": ModelArgs(rope=_K2_ROPE, quantization=QuantArgs(ignore=K2_QUANT_IGNORE)),
    "deepseek-v3": ModelArgs(
        vocab_size=129280, n_routed_experts=256, num_attention_heads=128, max_position_embeddings=163840,
        rms_norm_eps=1e-6,
        model_type="deepseek_v3", first_k_dense_replace=3, n_group=8, topk_group=4, routed_scaling_factor=2.5,
        bos_token_id=0, eos_token_id=1,
        rope=RopeArgs(rope_theta=10000.0, rope_type="yarn", factor=40.0, original_max_position_embeddings=4096,
                      beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
    ),
    "tiny": ModelArgs(
        vocab_size=TINY_VOCAB,  # 163840
        hidden_size=64,  # 7168
        intermediate_size=128,  # 18432
        moe_intermediate_size=32,  # 2048
        num_hidden_layers=3,  # 61
        num_attention_heads=4,  # 64
        n_routed_experts=8,  # 384
        num_experts_per_tok=2,  # 8
        n_group=4, topk_group=2,  # 1 / 1: exercises group-limited routing
        q_lora_rank=32,  # 1536
        kv_lora_rank=32,  # 512
        qk_nope_head_dim=16,  # 128
        qk_rope_head_dim=8,  # 64
        v_head_dim=16,  # 128
        max_position_embeddings=4096,  # 262144
        rope=_TINY_ROPE,
        bos_token_id=TINY_NUM_BASE_TOKENS, eos_token_id=TINY_NUM_BASE_TOKENS + 2,
        torch_dtype="float32",
    ),
    "tiny-384e": ModelArgs(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4,
        n_routed_experts=384, num_experts_per_tok=8,  # K2's real routing fan-out
        q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        max_position_embeddings=4096, rope=_TINY_ROPE,
        bos_token_id=TINY_NUM_BASE_TOKENS, eos_token_id=TINY_NUM_BASE_TOKENS + 2,
        torch_dtype="float32",
    ),
}


def get_preset(name: str) -> ModelArgs:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return PRESETS[name]
