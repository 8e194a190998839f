"""The offline façade `raymoe.LLM` (raymoe/llm.py): text and token-id prompts give one output per prompt in order,
greedy outputs equal the full-recompute reference, logprobs are real log-probabilities of the model, dtype "auto"
follows the checkpoint, and a misspelled engine setting is an error naming it. (Engine-level equivalences under
batching, chunking, preemption and prefix caching live in tests/engine/test_engine.py.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from raymoe import LLM, SamplingParams
from raymoe.model.deepseek import reference_generate
from raymoe.model.loader import Checkpoint, build_model
from raymoe.model.tiny import save_checkpoint

PROMPTS = ["The quick brown fox", "1 2 3", "Hello, world! How are you doing today?", "a"]
SMALL = dict(kv_cache_memory=4 << 20, max_num_seqs=8)  # 4 MiB of latent cache is plenty here, and quick to zero
GREEDY = SamplingParams(temperature=0.0, max_tokens=10)


@pytest.fixture(scope="module")
def llm(tiny_ckpt) -> LLM:
    return LLM(model=str(tiny_ckpt), dtype="float32", **SMALL)


@pytest.fixture(scope="module")
def ref_model(tiny_ckpt):
    return build_model(Checkpoint(tiny_ckpt))


def _params_dtype(llm: LLM) -> torch.dtype:
    return next(llm.engine.runner.model.parameters()).dtype


def test_public_names():
    import raymoe

    assert {"LLM", "SamplingParams", "RayMoEConfig"} <= set(raymoe.__all__)
    assert raymoe.LLM is LLM


def test_text_prompts_give_one_output_each_in_order_equal_to_the_reference(llm, ref_model):
    outs = llm.generate(prompts=PROMPTS, sampling_params=GREEDY)
    assert len(outs) == len(PROMPTS)
    eos = ref_model.args.eos_token_id
    for prompt, out in zip(PROMPTS, outs):
        ids = llm.tokenizer.encode(prompt, add_special_tokens=False)
        assert out.prompt_token_ids == ids
        want = reference_generate(ref_model, ids, GREEDY.max_tokens, eos_id=eos)
        got = out.outputs[0]
        assert got.token_ids == want, prompt
        assert got.text == llm.tokenizer.decode(want, skip_special_tokens=True)
        assert got.finish_reason in ("length", "stop") and out.finished


def test_token_id_prompts_equal_text_prompts(llm):
    by_text = llm.generate(PROMPTS, GREEDY)
    by_ids = llm.generate(prompt_token_ids=[o.prompt_token_ids for o in by_text], sampling_params=GREEDY)
    assert [o.outputs[0].token_ids for o in by_ids] == [o.outputs[0].token_ids for o in by_text]
    assert [o.outputs[0].text for o in by_ids] == [o.outputs[0].text for o in by_text]


def test_a_single_string_prompt(llm):
    (out,) = llm.generate("a", GREEDY)
    assert len(out.outputs[0].token_ids) >= 1


def test_per_prompt_sampling_params(llm):
    lengths = [3, 7]
    outs = llm.generate(PROMPTS[:2], [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
                                      for n in lengths])
    assert [len(o.outputs[0].token_ids) for o in outs] == lengths


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_logprobs_hold_top_n_and_the_chosen_token(llm, ref_model, temperature):
    n = 3
    params = SamplingParams(temperature=temperature, max_tokens=6, logprobs=n, seed=11, ignore_eos=True)
    (out,) = llm.generate(prompt_token_ids=[[5, 6, 7, 8]], sampling_params=params)
    got = out.outputs[0]
    assert len(got.logprobs) == len(got.token_ids) == 6
    ids = [5, 6, 7, 8]
    for token, step in zip(got.token_ids, got.logprobs):
        assert token in step and n <= len(step) <= n + 1  # N best, plus the chosen one when it is not among them
        assert all(v <= 0 for v in step.values())
        with torch.no_grad():
            hidden = ref_model(torch.tensor(ids), torch.arange(len(ids)))
            logp = torch.log_softmax(ref_model.compute_logits(hidden[-1:])[0], -1)
        top = logp.topk(n)
        want = {int(i): float(v) for i, v in zip(top.indices, top.values)} | {token: float(logp[token])}
        assert step.keys() == want.keys()
        for k, v in step.items():
            assert v == pytest.approx(want[k], abs=1e-4)
        if temperature == 0.0:
            assert step[token] == max(step.values())
        ids.append(token)


def test_no_logprobs_unless_asked(llm):
    (out,) = llm.generate(prompt_token_ids=[[5, 6]], sampling_params=GREEDY)
    assert out.outputs[0].logprobs is None


def test_dtype_auto_follows_the_checkpoint(tiny_ckpt, tmp_path, llm):
    assert _params_dtype(LLM(model=str(tiny_ckpt), **SMALL)) == torch.float32  # tiny is stored fp32
    ckpt = Checkpoint(tiny_ckpt)
    state = {k: v if k.endswith("e_score_correction_bias") else v.to(torch.bfloat16)
             for k, v in build_model(ckpt).state_dict().items()}
    bf16_dir = save_checkpoint(state, ckpt.args.replace(torch_dtype="bfloat16"), tmp_path / "bf16")
    for f in Path(tiny_ckpt).glob("*token*"):
        shutil.copy(f, bf16_dir / f.name)
    auto = LLM(model=str(bf16_dir), **SMALL)
    assert _params_dtype(auto) == torch.bfloat16
    (out,) = auto.generate(["1 2 3"], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
    assert len(out.outputs[0].token_ids) == 5


def test_dtype_bfloat16_matches_fp32_to_bf16_precision(tiny_ckpt, llm):
    bf16 = LLM(model=str(tiny_ckpt), dtype="bfloat16", **SMALL)
    assert _params_dtype(bf16) == torch.bfloat16
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=5)
    worst = 0.0
    for a, b in zip(llm.generate(PROMPTS, params), bf16.generate(PROMPTS, params)):
        lp32, lp16 = a.outputs[0].logprobs[0], b.outputs[0].logprobs[0]
        assert a.outputs[0].token_ids == b.outputs[0].token_ids  # top-1 margins here are >= 0.35 nats
        worst = max([worst] + [abs(lp32[k] - lp16[k]) for k in lp32.keys() & lp16.keys()])
    print(f"\nbf16 vs fp32 first-step top-5 logprobs: max |diff| = {worst:.4f} nats")
    assert worst <= 0.1  # measured 0.03: 3 layers of bf16 rounding, logprobs stored in bf16 (step 1/64 near -5)

    # decode steps (absorbed attention over the bf16 latent cache) hold the same precision: the same
    # bf16 model, each step fed the fp32 run's tokens so far as its prompt, against the fp32 logprobs
    steps = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=6, logprobs=5, ignore_eos=True))
    prompts = llm.engine.tokenizer(PROMPTS, add_special_tokens=False)["input_ids"]
    worst = 0.0
    for prompt, out in zip(prompts, steps):
        ids = list(out.outputs[0].token_ids)
        b = bf16.generate(prompt_token_ids=[prompt + ids[:1]],
                          sampling_params=SamplingParams(temperature=0.0, max_tokens=5, logprobs=5, ignore_eos=True))
        for step, lp16 in enumerate(b[0].outputs[0].logprobs):  # step k: after prompt + ids[:k+1]
            if b[0].outputs[0].token_ids[:step] != ids[1:1 + step]:
                break  # a bf16 rounding flipped an earlier choice: later steps see other contexts
            lp32 = out.outputs[0].logprobs[step + 1]
            worst = max([worst] + [abs(lp32[k] - lp16[k]) for k in lp32.keys() & lp16.keys()])
    print(f"bf16 vs fp32 decode-step top-5 logprobs: max |diff| = {worst:.4f} nats")
    assert 0.0 < worst <= 0.1


@pytest.mark.parametrize("kwargs, needle", [
    ({"max_num_seq": 4}, "max_num_seq"),
    ({"dtyp": "float32"}, "dtyp"),
    ({"dtype": "float64"}, "dtype"),
    ({"int4_mode": "fp4"}, "int4_mode"),
])
def test_bad_engine_settings_raise_naming_them(tiny_ckpt, kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        LLM(model=str(tiny_ckpt), **kwargs)


def test_generate_argument_errors(llm):
    with pytest.raises(ValueError, match="exactly one of prompts or prompt_token_ids"):
        llm.generate()
    with pytest.raises(ValueError, match="exactly one of prompts or prompt_token_ids"):
        llm.generate(["a"], prompt_token_ids=[[1]])
    with pytest.raises(ValueError, match="2 sampling_params for 1 prompts"):
        llm.generate(["a"], [GREEDY, GREEDY])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate(prompt_token_ids=[[10**6]])
    assert not llm.engine.has_unfinished()
