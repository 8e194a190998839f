"""The DeepSeek-V3 / Kimi K2 decoder in pure torch, with HF `DeepseekV3ForCausalLM` parameter names.

`Transformer.state_dict()` keys equal the checkpoint's tensor names (K2_FACTS §1.4), so a loader
copies tensors by name. The model works on a flat batch of tokens [T] with explicit positions; the
attention backend decides which tokens see which (default: one causal sequence, no cache).
`reference_generate` is the full-recompute greedy decoder every engine test compares against.

Tensor letters: T tokens, D model dim, V vocab.
"""

from __future__ import annotations

import torch
from torch import nn

from raymoe.model.args import ModelArgs
from raymoe.model.layers import MLP, RMSNorm, set_gemm_layout
from raymoe.model.mla import MLA, AttentionBackend, DenseCausalAttention
from raymoe.model.moe import Gate, MoE, RoutedExperts


def _is_int4(module: nn.Module) -> bool:
    return hasattr(module, "weight_packed")


class DecoderLayer(nn.Module):
    """norm -> MLA -> residual -> norm -> dense MLP (first_k_dense_replace layers) or MoE -> residual."""

    def __init__(self, args: ModelArgs, layer_id: int, *, dtype: torch.dtype | None = None,
                 local_experts: bool = True, int4: bool = False) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.self_attn = MLA(args, layer_id, dtype)
        if args.is_moe_layer(layer_id):
            q = args.quantization
            quantized = int4 and q is not None and q.is_quantized(f"model.layers.{layer_id}.mlp.experts.0.gate_proj")
            self.mlp: nn.Module = MoE(args, layer_id, expert_ids=None if local_experts else [],
                                      quantized=quantized, dtype=dtype)
        else:
            self.mlp = MLP(args.hidden_size, args.intermediate_size, dtype=dtype)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, dtype=dtype)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend | None = None) -> torch.Tensor:
        """x [T,D], positions [T] -> [T,D]."""
        h = x + self.self_attn(self.input_layernorm.forward(x), positions, attn)  # norms: see MLA.project
        return h + self.mlp(self.post_attention_layernorm.forward(h))


class DeepseekModel(nn.Module):
    """The `model.` part of the checkpoint: embeddings, decoder layers, final norm."""

    def __init__(self, args: ModelArgs, *, dtype: torch.dtype | None, local_experts: bool, int4: bool) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(
            DecoderLayer(args, i, dtype=dtype, local_experts=local_experts, int4=int4)
            for i in range(args.num_hidden_layers)
        )
        for layer in self.layers[1:]:  # one RoPE table for all layers: cos/sin computed once per forward
            layer.self_attn.rotary = self.layers[0].self_attn.rotary
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, dtype=dtype)


class Transformer(nn.Module):
    """DeepseekV3ForCausalLM: `model.{embed_tokens,layers,norm}` + `lm_head`.

    `int4=True` builds routed-expert linears as packed `Int4Linear` where `args.quantization` says they
    are quantized; `local_experts=False` builds MoE layers without routed experts (the engine then sets
    each `MoE.routed_fn` to reach remote expert shards).
    """

    def __init__(self, args: ModelArgs, *, dtype: torch.dtype = torch.float32, local_experts: bool = True,
                 int4: bool = False) -> None:
        super().__init__()
        self.args = args
        self.dtype = dtype
        self.model = DeepseekModel(args, dtype=dtype, local_experts=local_experts, int4=int4)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False, dtype=dtype)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn: AttentionBackend | None = None) -> torch.Tensor:
        """input_ids [T], positions [T] -> final-norm hidden states [T,D]."""
        if input_ids.dim() != 1 or positions.shape != input_ids.shape:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and positions {tuple(positions.shape)} "
                             "must be flat [T] tensors of the same length")
        attn = attn if attn is not None else DenseCausalAttention()
        h = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            h = layer(h, positions, attn)
        return self.model.norm.forward(h)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [T,D] -> logits [T,V] fp32."""
        return self.lm_head(hidden).float()

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Deterministic random weights for tiny checkpoints; activations stay O(1).

        Linears ~ N(0, 1/fan_in), embeddings ~ N(0, 1), norms = 1, router bias ~ N(0, 0.05²).
        Values are drawn on the CPU from one seeded generator in module order, so they do not depend
        on the device. Packed INT4 modules are skipped (their buffers come from a quantizer).
        """
        gen = torch.Generator().manual_seed(seed)

        def normal_(t: torch.Tensor, std: float) -> None:
            t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float32) * std)

        for module in self.modules():
            if _is_int4(module):
                continue
            if isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, nn.Embedding):
                normal_(module.weight, 1.0)
            elif isinstance(module, nn.Linear):
                normal_(module.weight, module.in_features**-0.5)
            elif isinstance(module, Gate):
                normal_(module.weight, module.weight.shape[1] ** -0.5)
                normal_(module.e_score_correction_bias, 0.05)

    @torch.no_grad()
    def fuse(self) -> None:
        """After loading: stack the weights that read the same input into one GEMM each (MLA's two
        down-projections, gate/up of dense and shared MLPs, the routed experts); parameters keep their
        names and become views of the stacks. Routed experts' own MLPs are stacked by RoutedExperts.
        Dense linears also get the device's GEMM layout (`layers.gemm_layout`): same values."""
        for module in self.modules():
            if isinstance(module, (MLA, RoutedExperts)) or type(module) is MLP:
                module.fuse()
            elif isinstance(module, Gate) and not module.weight.is_meta:
                set_gemm_layout(module)
        if self.lm_head.weight is not self.model.embed_tokens.weight:  # a tied head keeps the table's layout
            set_gemm_layout(self.lm_head)

    def post_load(self) -> None:
        """Call `finalize()` on every submodule that has one (e.g. Int4Linear repacking) after loading."""
        for module in self.modules():
            if module is not self and callable(getattr(module, "finalize", None)):
                module.finalize()


@torch.inference_mode()
def reference_generate(model: Transformer, prompt_ids: list[int], max_new_tokens: int,
                       eos_id: int | None = None) -> list[int]:
    """Greedy decoding by full recompute (no cache); returns the new tokens only (eos included if hit)."""
    if not prompt_ids:
        raise ValueError("prompt_ids must not be empty")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) must be >= 0")
    device = model.lm_head.weight.device
    ids = list(prompt_ids)
    new: list[int] = []
    for _ in range(max_new_tokens):
        tokens = torch.tensor(ids, dtype=torch.long, device=device)
        positions = torch.arange(len(ids), device=device)
        hidden = model(tokens, positions)
        token = int(model.compute_logits(hidden[-1:]).argmax(dim=-1))
        new.append(token)
        ids.append(token)
        if eos_id is not None and token == eos_id:
            break
    return new
