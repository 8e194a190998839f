"""Hugging Face checkpoint reading: config.json + safetensors (single file or sharded with an index).

Tensors are memory-mapped and read one by one, only when a component asks for them: the attention
tier loads the dense part, an expert shard loads its experts, and neither touches the other's bytes
(`Checkpoint.read_names` records what was read, so tests can prove it). Errors name the tensor or
file at fault. INT4 routed experts arrive as compressed-tensors triples (`weight_packed`,
`weight_scale`, `weight_shape`); they load into `Int4Linear` buffers as they are, or are dequantized
into a plain weight when the model was built with `int4=False`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from raymoe.model.args import ModelArgs

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_INT4_SUFFIXES = ("weight_packed", "weight_scale", "weight_shape")


class Checkpoint:
    """A Hugging Face checkpoint folder: `args`, tensor names, and lazy tensor reads."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise ValueError(f"checkpoint folder {str(path)!r} does not exist")
        self.args = ModelArgs.from_pretrained(self.path)
        self.read_names: set[str] = set()
        self._handles: dict[str, object] = {}  # before _weight_map: without an index it opens the files
        self.weight_map = self._weight_map()

    def _weight_map(self) -> dict[str, str]:
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                wm = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{index}: invalid index file ({e})") from e
            for fname in sorted(set(wm.values())):
                if not (self.path / fname).is_file():
                    raise ValueError(f"{index}: shard {fname!r} is listed but missing")
            return dict(wm)
        files = [self.path / SINGLE_FILE] if (self.path / SINGLE_FILE).is_file() else sorted(
            self.path.glob("*.safetensors"))
        if not files:
            raise ValueError(f"{self.path}: no safetensors files and no {INDEX_FILE}")
        wm: dict[str, str] = {}
        for f in files:
            for name in self._open(f.name).keys():  # type: ignore[attr-defined]
                wm[name] = f.name
        return wm

    def _open(self, fname: str):
        h = self._handles.get(fname)
        if h is None:
            try:
                h = safe_open(str(self.path / fname), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own SafetensorError for corrupt headers
                raise ValueError(f"{self.path / fname}: corrupt or unreadable safetensors file ({e})") from e
            self._handles[fname] = h
        return h

    def names(self) -> set[str]:
        return set(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> torch.Tensor:
        fname = self.weight_map.get(name)
        if fname is None:
            raise ValueError(f"{self.path}: checkpoint is missing tensor {name!r}")
        try:
            t = self._open(fname).get_tensor(name)  # type: ignore[attr-defined]
        except ValueError:
            raise
        except Exception as e:
            raise ValueError(f"{self.path / fname}: cannot read tensor {name!r} ({e})") from e
        self.read_names.add(name)
        return t

    def check_names(self, int4: bool | None = None) -> None:
        """Every tensor in the checkpoint must be one the architecture knows (MTP layers are skipped)."""
        known = expected_names(self.args, int4=self.args.quantization is not None if int4 is None else int4)
        unknown = sorted(n for n in self.weight_map if n not in known and not _is_extra_layer(n, self.args))
        if unknown:
            more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
            raise ValueError(f"{self.path}: unknown tensor {unknown[0]!r}{more}")


def _is_extra_layer(name: str, args: ModelArgs) -> bool:
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return bool(m) and int(m.group(1)) >= args.num_hidden_layers  # MTP (nextn) layers: not used


def expert_names(args: ModelArgs, layer_id: int, expert_id: int, *, int4: bool) -> list[str]:
    base = f"model.layers.{layer_id}.mlp.experts.{expert_id}"
    out = []
    for proj in ("gate_proj", "up_proj", "down_proj"):
        quantized = int4 and args.quantization is not None and args.quantization.is_quantized(f"{base}.{proj}")
        suffixes = _INT4_SUFFIXES if quantized else ("weight",)
        out += [f"{base}.{proj}.{s}" for s in suffixes]
    return out


def expected_names(args: ModelArgs, *, int4: bool) -> set[str]:
    """All tensor names of a checkpoint of this architecture."""
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not args.tie_word_embeddings:
        names.add("lm_head.weight")
    for i in range(args.num_hidden_layers):
        p = f"model.layers.{i}."
        names |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        a = p + "self_attn."
        if args.q_lora_rank is None:
            names.add(a + "q_proj.weight")
        else:
            names |= {a + "q_a_proj.weight", a + "q_a_layernorm.weight", a + "q_b_proj.weight"}
        names |= {a + n + ".weight" for n in ("kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj")}
        if args.is_moe_layer(i):
            names |= {p + "mlp.gate.weight", p + "mlp.gate.e_score_correction_bias"}
            names |= {p + f"mlp.shared_experts.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")}
            for e in range(args.n_routed_experts):
                names |= set(expert_names(args, i, e, int4=int4))
        else:
            names |= {p + f"mlp.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")}
    return names


def load_weights(
    module: nn.Module,
    ckpt: Checkpoint,
    *,
    include: Callable[[str], bool] | None = None,
) -> list[str]:
    """Fill `module`'s parameters and persistent buffers from `ckpt` by name; returns names loaded.

    `module`'s state-dict names must be checkpoint names (the model mirrors HF's module tree). A
    name the checkpoint lacks, or a tensor of the wrong shape, is a ValueError naming it. When the
    module wants a plain `...weight` that the checkpoint stores INT4-packed, it is dequantized.
    """
    loaded: list[str] = []
    targets = dict(module.named_parameters())
    targets.update({n: b for n, b in module.named_buffers() if _is_persistent(module, n)})
    for name, target in targets.items():
        if include is not None and not include(name):
            continue
        tensor = _read(ckpt, name)
        if tuple(tensor.shape) != tuple(target.shape):
            raise ValueError(f"{ckpt.path}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                             f"expected {tuple(target.shape)}")
        with torch.no_grad():
            if target.dtype in (torch.int32, torch.int64, torch.int8, torch.uint8):
                if tensor.dtype != target.dtype and tensor.is_floating_point():
                    raise ValueError(f"{ckpt.path}: tensor {name!r} has dtype {tensor.dtype}, expected integer")
            target.copy_(tensor.to(target.dtype))
        loaded.append(name)
    for m in module.modules():
        fin = getattr(m, "finalize", None)
        if m is not module and callable(fin):
            fin()
    return loaded


def _is_persistent(module: nn.Module, name: str) -> bool:
    owner_name, _, buf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    return buf not in owner._non_persistent_buffers_set


def _read(ckpt: Checkpoint, name: str) -> torch.Tensor:
    if name in ckpt or not name.endswith(".weight"):
        return ckpt.get(name)
    base = name[: -len("weight")]
    if base + "weight_packed" in ckpt:
        from raymoe.quant.int4 import dequantize_int4

        q = ckpt.args.quantization
        gs = q.group_size if q is not None else 32
        return dequantize_int4(ckpt.get(base + "weight_packed"), ckpt.get(base + "weight_scale"),
                               ckpt.get(base + "weight_shape"), group_size=gs, dtype=torch.float32)
    return ckpt.get(name)


def resolve_dtype(name: str, args: ModelArgs) -> torch.dtype:
    if name == "auto":
        name = args.torch_dtype
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise ValueError(f"dtype {name!r} is not supported (supported: auto, {', '.join(table)})")
    return table[name]


def iter_layer_experts(args: ModelArgs, expert_ids: Iterable[int]) -> Iterable[tuple[int, int]]:
    for layer_id in range(args.num_hidden_layers):
        if args.is_moe_layer(layer_id):
            for e in expert_ids:
                yield layer_id, e


def build_model(ckpt: Checkpoint, *, dtype: str = "auto", int4_mode: str = "packed", local_experts: bool = True,
                device: str | torch.device = "cpu", kernels: str = "torch") -> nn.Module:
    """Construct the `Transformer` for `ckpt` without a random init and load its weights.

    With `local_experts=False` the routed experts are neither built nor read (the attention tier of
    an expert-parallel deployment). `kernels` ("torch" | "cpu" | "triton", a resolved `kernels.backend`)
    picks the compute of the norms, the rotary embedding, the router and the routed experts (their `set_kernel`).
    """
    from raymoe.model.deepseek import Transformer
    from raymoe.model.layers import RMSNorm, RotaryEmbedding
    from raymoe.model.moe import Gate, RoutedExperts

    if int4_mode not in ("packed", "dequant"):
        raise ValueError(f"int4_mode {int4_mode!r} is not supported (supported: packed, dequant)")
    ckpt.check_names()
    torch_dtype = resolve_dtype(dtype, ckpt.args)
    int4 = ckpt.args.quantization is not None and int4_mode == "packed"
    with torch.device("meta"):
        model = Transformer(ckpt.args, dtype=torch_dtype, local_experts=local_experts, int4=int4)
    model.to_empty(device=device)
    for module in model.modules():
        if isinstance(module, (RoutedExperts, Gate, RMSNorm, RotaryEmbedding)):
            module.set_kernel(kernels)
    with torch.device(device):
        load_weights(model, ckpt)
    model.fuse()  # stack weights read together: routed experts (grouped GEMM / fused kernel), MLA, MLPs
    model.eval()
    return model
