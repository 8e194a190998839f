"""Planning numbers for a model: parameters, bytes by part and precision, KV-cache bytes per token.

Pure arithmetic over `ModelArgs` (no weights needed), so it works for the real K2 Thinking shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

from raymoe.model.args import ModelArgs

GIB = 1 << 30


@dataclass(frozen=True)
class ModelStats:
    total_params: int
    activated_params: int
    dense_params: int  # everything except routed experts
    routed_params: int
    routed_bytes_bf16: int
    routed_bytes_int4: int
    dense_bytes_bf16: int
    kv_bytes_per_token: int  # MLA latent cache, BF16, all layers
    mha_kv_bytes_per_token: int  # what a plain multi-head K/V cache would need

    @property
    def int4_ratio(self) -> float:
        return self.routed_bytes_bf16 / max(self.routed_bytes_int4, 1)


def _attn_params(a: ModelArgs) -> int:
    h = a.num_attention_heads
    if a.q_lora_rank is None:
        q = a.hidden_size * h * a.qk_head_dim
    else:
        q = a.hidden_size * a.q_lora_rank + a.q_lora_rank + a.q_lora_rank * h * a.qk_head_dim
    kv = a.hidden_size * a.kv_cache_size + a.kv_lora_rank + a.kv_lora_rank * h * (a.qk_nope_head_dim + a.v_head_dim)
    return q + kv + h * a.v_head_dim * a.hidden_size


def model_stats(a: ModelArgs, *, dtype_bytes: int = 2, group_size: int = 32) -> ModelStats:
    d = a.hidden_size
    expert = 3 * d * a.moe_intermediate_size
    dense = a.vocab_size * d * (1 if a.tie_word_embeddings else 2) + d
    routed = activated_routed = 0
    for i in range(a.num_hidden_layers):
        dense += _attn_params(a) + 2 * d
        if a.is_moe_layer(i):
            dense += a.n_routed_experts * d + a.n_routed_experts + a.n_shared_experts * expert
            routed += a.n_routed_experts * expert
            activated_routed += a.num_experts_per_tok * expert
        else:
            dense += 3 * d * a.intermediate_size
    int4 = routed // 2 + (routed // group_size) * 2  # packed nibbles + one bf16 scale per group
    mha = a.num_hidden_layers * a.num_attention_heads * (a.qk_head_dim + a.v_head_dim) * dtype_bytes
    return ModelStats(
        total_params=dense + routed, activated_params=dense + activated_routed, dense_params=dense,
        routed_params=routed, routed_bytes_bf16=routed * 2, routed_bytes_int4=int4, dense_bytes_bf16=dense * 2,
        kv_bytes_per_token=a.num_hidden_layers * a.kv_cache_size * dtype_bytes, mha_kv_bytes_per_token=mha,
    )


def _fmt_params(n: int) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.3f} {unit}"
    return str(n)


def _fmt_bytes(n: int) -> str:
    for unit, div in (("TiB", 1 << 40), ("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def format_stats(name: str, a: ModelArgs) -> str:
    s = model_stats(a)
    rows = [
        ("model", name),
        ("layers (dense + MoE)", f"{a.num_hidden_layers} ({a.num_hidden_layers - a.num_moe_layers} + "
                                 f"{a.num_moe_layers})"),
        ("routed experts / top-k", f"{a.n_routed_experts} / {a.num_experts_per_tok}"),
        ("total parameters", _fmt_params(s.total_params)),
        ("activated parameters", _fmt_params(s.activated_params)),
        ("dense part (BF16)", _fmt_bytes(s.dense_bytes_bf16)),
        ("routed experts (BF16)", _fmt_bytes(s.routed_bytes_bf16)),
        ("routed experts (INT4 g32)", f"{_fmt_bytes(s.routed_bytes_int4)} ({s.int4_ratio:.2f}x smaller)"),
        ("KV cache per token (MLA, BF16)", f"{s.kv_bytes_per_token:,} B ({a.kv_cache_size} values x "
                                           f"{a.num_hidden_layers} layers x 2 B)"),
        ("plain MHA K/V per token", f"{s.mha_kv_bytes_per_token:,} B "
                                    f"({s.mha_kv_bytes_per_token / s.kv_bytes_per_token:.1f}x MLA)"),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)
