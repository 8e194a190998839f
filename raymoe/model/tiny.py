"""Writing checkpoints in the Hugging Face layout, and `make_tiny`: random K2-architecture models.

A tiny checkpoint is complete: config.json (`model_type: kimi_k2`, K2's quantization_config when
INT4), sharded safetensors with `model.safetensors.index.json`, generation_config.json and a
tokenizer with K2's special tokens and chat template. Nothing is downloaded: weights come from a
seeded random init, the tokenizer is trained on a built-in corpus.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from raymoe.model.args import K2_QUANT_IGNORE, ModelArgs, QuantArgs, get_preset
from raymoe.model.inspect import model_stats
from raymoe.model.loader import INDEX_FILE

# Bump when make_tiny output changes, so cached checkpoints are rebuilt.
TINY_FORMAT_VERSION = 1
# Random init happens in fp32 on the host: 1 G parameters is 4 GiB. The planning presets are 671 B / 1.03 T.
MAX_RANDOM_PARAMS = 1 << 30


def save_checkpoint(state: dict[str, torch.Tensor], args: ModelArgs, out_dir: str | Path,
                    *, max_shard_bytes: int = 2 << 30) -> Path:
    """Write `state` as sharded safetensors + index + config.json + generation_config.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(state, key=_tensor_order):
        t = state[name].detach().contiguous()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        for name, t in shard.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                             indent=2, sort_keys=True))
    (out / "config.json").write_text(json.dumps(args.to_hf(), indent=2))
    gen = {"bos_token_id": args.bos_token_id, "eos_token_id": args.eos_token_id, "do_sample": True,
           "temperature": 1.0}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return out


def _tensor_order(name: str) -> tuple:
    parts = name.split(".")
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts)


def quantize_experts(state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Replace each routed-expert `...weight` by its compressed-tensors INT4 triple."""
    from raymoe.quant.int4 import quantize_int4

    assert args.quantization is not None
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        if module and ".mlp.experts." in module and args.quantization.is_quantized(module):
            packed, scale, shape = quantize_int4(t.float(), group_size=args.quantization.group_size)
            out[module + ".weight_packed"] = packed
            out[module + ".weight_scale"] = scale
            out[module + ".weight_shape"] = shape
        else:
            out[name] = t
    return out


def make_tiny(out_dir: str | Path, *, preset: str = "tiny", seed: int = 0, quant: str | None = None,
              max_shard_bytes: int = 512 << 10) -> Path:
    """Create a random checkpoint of `preset`'s shapes (BF16/FP32 or INT4 routed experts) with tokenizer."""
    from raymoe.model.deepseek import Transformer
    from raymoe.tokenizer.tiny import write_tiny_tokenizer

    if quant not in (None, "none", "int4"):
        raise ValueError(f"quant {quant!r} is not supported (supported: none, int4)")
    args = get_preset(preset)
    num_params = model_stats(args).total_params
    if num_params > MAX_RANDOM_PARAMS:  # not vocab size: K2's 163840 passed that test and exhausted host RAM
        raise ValueError(f"preset {preset!r} is a planning preset ({num_params / 1e9:.0f} B parameters); "
                         "use a tiny preset for weights")
    if quant == "int4":
        args = args.replace(quantization=QuantArgs(ignore=K2_QUANT_IGNORE))
    model = Transformer(args.replace(quantization=None), dtype=torch.float32)
    model.init_weights(seed)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.torch_dtype]
    state = {k: (v if k.endswith("e_score_correction_bias") else v.to(dtype)) for k, v in model.state_dict().items()}
    if quant == "int4":
        state = quantize_experts(state, args)
    out = Path(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=out.parent if out.parent.exists() else None))
    try:
        save_checkpoint(state, args, tmp, max_shard_bytes=max_shard_bytes)
        write_tiny_tokenizer(tmp, num_base_tokens=args.bos_token_id or 1792,
                             num_reserved=args.vocab_size - (args.bos_token_id or 1792))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def cached_tiny(preset: str = "tiny", *, seed: int = 0, quant: str | None = None,
                cache_dir: str | Path | None = None) -> Path:
    """A tiny checkpoint in the cache folder, created once (RAYMOE_CACHE or ~/.cache/raymoe)."""
    root = Path(cache_dir or os.environ.get("RAYMOE_CACHE") or Path.home() / ".cache" / "raymoe")
    root.mkdir(parents=True, exist_ok=True)
    out = root / f"{preset}-seed{seed}{'-int4' if quant == 'int4' else ''}-v{TINY_FORMAT_VERSION}"
    if not (out / "config.json").is_file() or not (out / "tokenizer_config.json").is_file():
        make_tiny(out, preset=preset, seed=seed, quant=quant)
    return out
