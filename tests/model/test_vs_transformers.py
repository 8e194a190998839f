"""Our Transformer against Hugging Face `DeepseekV3ForCausalLM` on random checkpoints (fp32, CPU).

The checkpoint goes through HF's own `save_pretrained`, so the names we load are the on-disk names
(transformers 5 fuses experts in memory as `mlp.experts.gate_up_proj`/`down_proj` [E,...] and writes
them back per expert: `mlp.experts.{e}.{gate,up,down}_proj.weight`, the K2 checkpoint layout).
"""

import pytest
import torch
from safetensors.torch import load_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from raymoe.model.args import K2_QUANT_IGNORE, ModelArgs, QuantArgs, get_preset
from raymoe.model.deepseek import Transformer, reference_generate
from raymoe.model.layers import rope_inv_freq
from raymoe.model.mla import DenseCausalAttention

BASE = dict(
    vocab_size=160, hidden_size=48, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
    first_k_dense_replace=1, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=12, qk_rope_head_dim=8,
    v_head_dim=10, n_group=1, topk_group=1, n_shared_experts=1, routed_scaling_factor=2.5,
    max_position_embeddings=512, num_nextn_predict_layers=0, bos_token_id=0, eos_token_id=None,
    tie_word_embeddings=False,
)
CONFIGS = {
    # group-limited routing (16 experts in 4 groups, 2 groups kept), two shared experts
    "grouped": dict(n_routed_experts=16, num_experts_per_tok=3, n_group=4, topk_group=2, n_shared_experts=2),
    # no query compression (q_proj), raw (unnormalised) routing weights, non-default eps
    "no_q_lora": dict(q_lora_rank=None, norm_topk_prob=False, rms_norm_eps=1e-5, first_k_dense_replace=2),
    # YaRN with a ramp over several dims and cos/sin scale != 1 (mscale != mscale_all_dim)
    "yarn": dict(qk_rope_head_dim=16, max_position_embeddings=2048, rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=8.0, original_max_position_embeddings=256,
        beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=0.707)),
    # YaRN as K2 sets it (beta_fast = beta_slow = 1: hard switch), and mscale_all_dim absent
    "yarn_k2": dict(qk_rope_head_dim=16, n_group=2, topk_group=1, max_position_embeddings=1024, rope_parameters=dict(
        rope_type="yarn", rope_theta=50000.0, factor=4.0, original_max_position_embeddings=256,
        beta_fast=1.0, beta_slow=1.0, mscale=1.0)),
}


@torch.no_grad()
def hf_model(overrides: dict) -> DeepseekV3ForCausalLM:
    """Random HF model whose weights make every part matter (init_range 0.02 would leave logits flat)."""
    cfg = DeepseekV3Config(**{**BASE, **overrides})
    cfg._attn_implementation = "eager"
    model = DeepseekV3ForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if p.dim() == 1:  # norms: not all ones, so a missing or misplaced norm weight shows
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
        else:
            std = 1.0 if "embed_tokens" in name else p.shape[-1] ** -0.5
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):  # selection now differs from weighting
            b.copy_(0.1 * torch.randn(b.shape, generator=gen))
    return model


def ours_from_hf(model: DeepseekV3ForCausalLM, tmp_path, **kwargs) -> Transformer:
    args = ModelArgs.from_hf(model.config.to_dict())
    model.save_pretrained(tmp_path)
    ckpt = load_file(str(tmp_path / "model.safetensors"))
    ours = Transformer(args, dtype=torch.float32, **kwargs).eval()
    assert set(ours.state_dict()) == set(ckpt)
    ours.load_state_dict(ckpt, strict=True)
    return ours


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    torch.manual_seed(0)
    hf = hf_model(CONFIGS[request.param])
    return hf, ours_from_hf(hf, tmp_path_factory.mktemp(request.param))


def test_checkpoint_names_are_per_expert_and_match_ours(pair):
    hf, ours = pair
    names = set(ours.state_dict())
    moe_layer = hf.config.first_k_dense_replace
    e = hf.config.n_routed_experts - 1
    for suffix in ("gate_proj", "up_proj", "down_proj"):
        assert f"model.layers.{moe_layer}.mlp.experts.{e}.{suffix}.weight" in names
        assert f"model.layers.0.mlp.{suffix}.weight" in names
    assert f"model.layers.{moe_layer}.mlp.gate.e_score_correction_bias" in names
    assert ("model.layers.0.self_attn.q_proj.weight" in names) == (hf.config.q_lora_rank is None)
    assert not any("gate_up_proj" in n for n in names)


def test_rope_and_softmax_scale_match_hf(pair):
    hf, ours = pair
    rot = hf.model.rotary_emb
    inv, scale = rope_inv_freq(ours.args.rope, ours.args.qk_rope_head_dim)
    torch.testing.assert_close(inv, rot.inv_freq, atol=0, rtol=0)
    assert scale == pytest.approx(rot.attention_scaling, rel=1e-12)
    assert ours.model.layers[0].self_attn.softmax_scale == pytest.approx(hf.model.layers[0].self_attn.scaling)


@pytest.mark.parametrize("mode", ["naive", "absorb"])
def test_logits_match_hf(pair, mode):
    hf, ours = pair
    ids = torch.randint(0, hf.config.vocab_size, (29,))
    with torch.no_grad():
        want = hf(ids[None]).logits[0]
        got = ours.compute_logits(ours(ids, torch.arange(29), DenseCausalAttention(None, mode)))
    assert want.abs().max() > 1.0  # a real signal, not near-zero logits
    assert (got - want).abs().max().item() <= 1e-4


def test_packed_sequences_match_hf_one_by_one(pair):
    hf, ours = pair
    lens = [7, 12, 3]
    seqs = [torch.randint(0, hf.config.vocab_size, (n,)) for n in lens]
    with torch.no_grad():
        want = torch.cat([hf(s[None]).logits[0] for s in seqs])
        pos = torch.cat([torch.arange(n) for n in lens])
        got = ours.compute_logits(ours(torch.cat(seqs), pos, DenseCausalAttention(lens, "absorb")))
    assert (got - want).abs().max().item() <= 1e-4


def test_greedy_generation_matches_hf(pair):
    hf, ours = pair
    prompt = torch.randint(0, hf.config.vocab_size, (6,)).tolist()
    with torch.no_grad():
        ids = torch.tensor([prompt])  # explicit mask: a prompt token equal to pad_token_id is not padding
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=32,
                          pad_token_id=0)
    want = out[0, len(prompt):].tolist()
    got = reference_generate(ours, prompt, 32)
    assert len(want) == 32
    assert got == want
    assert len(set(got)) > 3  # not a degenerate repeat of one token


def test_meta_built_model_and_remote_experts_match(pair):
    hf, ours = pair
    with torch.device("meta"):
        shell = Transformer(ours.args, local_experts=False)
    shell = shell.to_empty(device="cpu").eval()
    sd = {k: v for k, v in ours.state_dict().items() if ".mlp.experts." not in k}
    assert set(shell.state_dict()) == set(sd)
    shell.load_state_dict(sd, strict=True)
    for layer in shell.model.layers:
        if hasattr(layer.mlp, "routed_fn"):  # route to the full model's experts, as a remote shard would
            layer.mlp.routed_fn = lambda lid, x, i, w: ours.model.layers[lid].mlp.experts(x, i, w)
    ids = torch.randint(0, hf.config.vocab_size, (9,))
    with torch.no_grad():
        torch.testing.assert_close(shell(ids, torch.arange(9)), ours(ids, torch.arange(9)), atol=0, rtol=0)


def test_init_weights_is_deterministic_and_post_load_finalizes():
    args = ModelArgs.from_hf(DeepseekV3Config(**BASE).to_dict())
    a, b = Transformer(args), Transformer(args)
    a.init_weights(3)
    b.init_weights(3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    b.init_weights(4)
    assert not torch.equal(a.lm_head.weight, b.lm_head.weight)
    assert torch.equal(a.model.norm.weight, torch.ones_like(a.model.norm.weight))
    hidden = a(torch.arange(10), torch.arange(10))
    assert 0.1 < hidden.std().item() < 10
    seen = []
    a.model.layers[1].mlp.experts["0"].finalize = lambda: seen.append(1)
    a.post_load()
    assert seen == [1]


def test_int4_experts_equal_float_model_with_dequantized_experts():
    int4 = pytest.importorskip("raymoe.quant.int4")
    args = get_preset("tiny").replace(quantization=QuantArgs(ignore=K2_QUANT_IGNORE))
    ref = Transformer(args)
    ref.init_weights(7)
    packed = Transformer(args, int4=True).eval()
    sd, quant_names = {}, set()
    for name, t in ref.state_dict().items():
        if ".mlp.experts." in name:
            p, s, shape = int4.quantize_int4(t, args.quantization.group_size, scale_dtype=torch.float32)
            base = name.removesuffix(".weight")
            sd.update({f"{base}.weight_packed": p, f"{base}.weight_scale": s, f"{base}.weight_shape": shape})
            ref.state_dict()[name].copy_(int4.dequantize_int4(p, s, shape, args.quantization.group_size, dtype=torch.float32))
            quant_names.add(base)
        else:
            sd[name] = t
    assert set(packed.state_dict()) == set(sd)  # routed experts (only) are packed triples
    assert all(".mlp.experts." in n for n in quant_names) and len(quant_names) == 3 * 8 * args.num_moe_layers
    packed.load_state_dict(sd, strict=True)
    packed.post_load()
    ids = torch.randint(0, args.vocab_size, (11,))
    with torch.no_grad():
        want = ref.compute_logits(ref(ids, torch.arange(11)))
        got = packed.compute_logits(packed(ids, torch.arange(11)))
    assert (got - want).abs().max().item() <= 1e-3
