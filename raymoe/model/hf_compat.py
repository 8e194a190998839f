"""Teach an installed `transformers` that `model_type: kimi_k2` is DeepSeek-V3 (K2_FACTS §1.2).

K2 Thinking ships `model_type: "kimi_k2"` with remote code; its deploy guide tells frameworks
without support to treat it as `deepseek_v3`. Registering the alias in-process lets
`AutoTokenizer`/`AutoConfig`/`AutoModelForCausalLM` open our checkpoints (and the real one without
`trust_remote_code`), which the tokenizer path and the reference comparisons rely on.
"""

from __future__ import annotations

_done = False


def register_kimi_k2() -> None:
    global _done
    if _done:
        return
    from transformers import AutoConfig, AutoModelForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

    class KimiK2Config(DeepseekV3Config):
        model_type = "kimi_k2"

    class KimiK2ForCausalLM(DeepseekV3ForCausalLM):
        config_class = KimiK2Config

    try:
        AutoConfig.register("kimi_k2", KimiK2Config)
        AutoModelForCausalLM.register(KimiK2Config, KimiK2ForCausalLM)
    except ValueError:
        pass  # already registered (by a newer transformers or another library)
    try:  # transformers 5 fuses per-expert checkpoint tensors on load, keyed by model_type
        from transformers.conversion_mapping import (
            get_checkpoint_conversion_mapping,
            register_checkpoint_conversion_mapping,
        )
    except ImportError:  # transformers 4: per-expert modules, no conversion needed
        pass
    else:
        mapping = get_checkpoint_conversion_mapping("deepseek_v3")
        if mapping is not None and get_checkpoint_conversion_mapping("kimi_k2") is None:
            register_checkpoint_conversion_mapping("kimi_k2", mapping)
    _done = True
