"""INT4 end to end against compressed-tensors itself: a random transformers `DeepseekV3ForCausalLM` gets its routed
experts quantized and packed by compressed-tensors (K2's scheme: group 32, symmetric int4, `pack-quantized`, K2's
ignore list) and saved in its format; raymoe loads that checkpoint and decodes the same 32 greedy tokens as
transformers does on the weights compressed-tensors decompresses. Also measures expert memory INT4 vs BF16."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from raymoe.model.deepseek import reference_generate
from raymoe.model.loader import Checkpoint, build_model
from raymoe.quant.int4 import Int4Linear

ct_quant = pytest.importorskip("compressed_tensors.quantization")
ModelCompressor = pytest.importorskip("compressed_tensors.compressors").ModelCompressor
calculate_qparams = pytest.importorskip("compressed_tensors.quantization.utils.helpers").calculate_qparams

NUM_NEW_TOKENS = 32
PROMPTS = [[1, 17, 42, 99, 3], [200, 201, 5]]
HF_CONFIG = dict(
    vocab_size=256, hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, first_k_dense_replace=1,
    q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_group=2, topk_group=1,
    routed_scaling_factor=2.5, max_position_embeddings=512, bos_token_id=0, eos_token_id=None,
    tie_word_embeddings=False, num_nextn_predict_layers=0,
)
K2_IGNORE = ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", r"re:.*mlp\.(gate|up|gate_up|down)_proj.*"]


@torch.no_grad()
def _random_hf_model() -> DeepseekV3ForCausalLM:
    """Weights scaled so every layer matters and greedy margins are wide (HF's 0.02 init leaves logits flat)."""
    cfg = DeepseekV3Config(**HF_CONFIG)
    cfg._attn_implementation = "eager"
    model = DeepseekV3ForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(7)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
        else:
            std = 1.0 if "embed_tokens" in name else p.shape[-1] ** -0.5
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.1 * torch.randn(b.shape, generator=gen))
    return model


def _linear_tree(state: dict[str, torch.Tensor]) -> nn.Module:
    """Every Linear of the checkpoint as an `nn.Linear` (bf16, K2's dtype) under its checkpoint name.

    transformers 5 fuses experts into 3-D parameters in memory, so compressed-tensors cannot target them there; on
    disk they are per-expert Linears (`mlp.experts.{e}.up_proj.weight`), which is what this tree mirrors. The router
    `mlp.gate` is not a Linear in K2 (DeepseekV3TopkRouter), so it stays out.
    """
    root = nn.Module()
    for name, w in state.items():
        if w.dim() != 2 or name == "model.embed_tokens.weight" or name.endswith("mlp.gate.weight"):
            continue
        *parents, leaf = name.removesuffix(".weight").split(".")
        node = root
        for part in parents:
            if not hasattr(node, part):
                node.add_module(part, nn.Module())
            node = getattr(node, part)
        linear = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=torch.bfloat16)
        linear.weight.data.copy_(w)
        node.add_module(leaf, linear)
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(raymoe checkpoint folder, transformers model on the library-decompressed weights, compressed state)."""
    root = tmp_path_factory.mktemp("ct")
    torch.manual_seed(0)
    hf = _random_hf_model()
    hf.save_pretrained(root / "hf")
    state = load_file(str(root / "hf" / "model.safetensors"))  # per-expert names, fp32

    tree = _linear_tree(state)
    scheme = ct_quant.QuantizationScheme(targets=["Linear"], weights=ct_quant.QuantizationArgs(
        num_bits=4, type="int", symmetric=True, strategy="group", group_size=32))
    config = ct_quant.QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized",
                                         ignore=K2_IGNORE, quantization_status="frozen")
    ct_quant.apply_quantization_config(tree, config)
    for module in tree.modules():
        if hasattr(module, "quantization_scheme"):  # the library's own minmax qparams, per group of 32
            groups = module.weight.float().view(module.weight.shape[0], -1, 32)
            scale, _ = calculate_qparams(groups.amin(-1), groups.amax(-1), module.quantization_scheme.weights)
            module.weight_scale.data.copy_(scale)
    compressor = ModelCompressor.from_pretrained_model(tree, "pack-quantized")
    compressor.compress_model(tree)
    compressed = {k: v.clone() for k, v in tree.state_dict().items()}

    q_dir = root / "int4"
    q_dir.mkdir()
    q_state = {k: v for k, v in state.items() if ".mlp.experts." not in k}
    q_state.update({k: v for k, v in compressed.items() if ".mlp.experts." in k})
    save_file(q_state, str(q_dir / "model.safetensors"), metadata={"format": "pt"})
    (q_dir / "config.json").write_text(json.dumps(hf.config.to_dict()))
    compressor.update_config(str(q_dir))  # writes its quantization_config into config.json

    compressor.decompress_model(tree)
    decompressed = {n: t.clone() for n, t in tree.state_dict().items() if ".mlp.experts." in n and n.endswith(".weight")}
    deq_dir = root / "dequantized"
    deq_dir.mkdir()
    save_file({**state, **{n: t.float() for n, t in decompressed.items()}}, str(deq_dir / "model.safetensors"),
              metadata={"format": "pt"})
    (deq_dir / "config.json").write_text(json.dumps(hf.config.to_dict()))
    hf_deq = DeepseekV3ForCausalLM.from_pretrained(str(deq_dir), dtype=torch.float32).eval()
    return q_dir, hf_deq, compressed, decompressed


def test_compressed_tensors_quantized_only_the_routed_experts(built):
    q_dir, _, compressed, _ = built
    packed = {n.removesuffix(".weight_packed") for n in compressed if n.endswith("weight_packed")}
    assert packed and all(".mlp.experts." in n for n in packed)
    assert len(packed) == 2 * 8 * 3  # MoE layers x experts x {gate, up, down}
    qc = json.loads((q_dir / "config.json").read_text())["quantization_config"]
    assert (qc["format"], qc["quant_method"], qc["quantization_status"]) == (
        "pack-quantized", "compressed-tensors", "compressed")
    # raymoe reads the library's config (its ignore list is expanded to explicit module names).
    args = Checkpoint(q_dir).args
    assert args.quantization is not None and args.quantization.group_size == 32
    assert args.quantization.is_quantized("model.layers.2.mlp.experts.7.down_proj")
    assert not args.quantization.is_quantized("model.layers.2.mlp.shared_experts.down_proj")


def test_raymoe_dequantizes_exactly_what_compressed_tensors_decompresses(built):
    """The library decompresses to the scale dtype (bf16): q * scale rounded once. raymoe's fp32 model keeps the
    exact product, and rounds to the very same bf16 values."""
    q_dir, _, _, decompressed = built
    fp32 = build_model(Checkpoint(q_dir), int4_mode="dequant").state_dict()
    bf16 = build_model(Checkpoint(q_dir), int4_mode="dequant", dtype="bfloat16").state_dict()
    assert len(decompressed) == 2 * 8 * 3
    for name, want in decompressed.items():
        assert want.dtype == torch.bfloat16
        assert torch.equal(bf16[name], want), name
        assert torch.equal(fp32[name].to(torch.bfloat16), want), name


@pytest.mark.parametrize("int4_mode", ["packed", "dequant"])
def test_greedy_tokens_equal_transformers_on_decompressed_weights(built, int4_mode):
    q_dir, hf_deq, _, _ = built
    ckpt = Checkpoint(q_dir)
    model = build_model(ckpt, int4_mode=int4_mode)
    assert isinstance(model.model.layers[1].mlp.experts["0"].gate_proj, Int4Linear) == (int4_mode == "packed")
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            ref = hf_deq.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NUM_NEW_TOKENS,
                                  min_new_tokens=NUM_NEW_TOKENS, do_sample=False, pad_token_id=0)
        want = ref[0, len(prompt):].tolist()
        got = reference_generate(model, prompt, NUM_NEW_TOKENS)
        print(f"\n{int4_mode} {prompt}: {got}")
        assert len(want) == NUM_NEW_TOKENS and got == want


def test_routed_expert_memory_int4_vs_bf16(built):
    """Bytes of the checkpoint-format expert tensors raymoe loads and ships vs a BF16 copy, and after finalize()."""
    q_dir, _, _, _ = built
    ckpt = Checkpoint(q_dir)
    names = sorted(n for n in ckpt.names() if ".mlp.experts." in n)
    tensors = {n: ckpt.get(n) for n in names}
    bf16 = sum(2 * int(t.prod()) for n, t in tensors.items() if n.endswith("weight_shape"))
    packed = sum(t.nbytes for n, t in tensors.items() if not n.endswith("weight_shape"))
    with_shapes = sum(t.nbytes for t in tensors.values())

    model = build_model(ckpt, int4_mode="packed", dtype="bfloat16")  # bf16 scales, as served
    kernel = sum(m.nbytes() for m in model.modules() if isinstance(m, Int4Linear))
    dense = build_model(Checkpoint(q_dir), int4_mode="dequant")
    dense_bf16 = sum(p.numel() * 2 for n, p in dense.named_parameters() if ".mlp.experts." in n)
    assert dense_bf16 == bf16

    print(f"\nrouted experts: bf16 {bf16} B | checkpoint int4 packed+scales {packed} B ({bf16 / packed:.3f}x) | "
          f"incl. weight_shape {with_shapes} B ({bf16 / with_shapes:.3f}x) | "
          f"after finalize (CPU kernel layout, scales+zeros) {kernel} B ({bf16 / kernel:.3f}x)")
    assert bf16 / packed >= 3.5
    assert bf16 / with_shapes >= 3.5
    assert bf16 / kernel >= 3.0  # the kernel keeps a zero per scale: ~3.2x at group 32
