"""The engine against the reference: greedy outputs of a mixed batch equal each prompt decoded alone
by full recompute (`reference_generate`), token for token in fp32 — plain, with chunked prefill
forced, with preemption forced, and with prefix-cache hits; seeded sampling is batch-independent."""

import random

import pytest
import torch

from raymoe import LLM, SamplingParams
from raymoe.model.deepseek import reference_generate
from raymoe.model.loader import Checkpoint, build_model

MAX_TOKENS = 12
LENGTHS = [1, 2, 3, 5, 8, 13, 16, 17, 31, 33, 64, 100, 128, 200, 257, 300]


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(1)
    return [[rng.randrange(0, 1792) for _ in range(n)] for n in LENGTHS]


@pytest.fixture(scope="module")
def reference(tiny_ckpt, prompts) -> list[list[int]]:
    model = build_model(Checkpoint(tiny_ckpt))
    return [reference_generate(model, p, MAX_TOKENS) for p in prompts]


def _greedy(llm: LLM, prompts: list[list[int]]):
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return llm.generate(prompt_token_ids=prompts, sampling_params=params)


def _assert_same(outs, reference) -> None:
    for i, (o, ref) in enumerate(zip(outs, reference)):
        assert o.outputs[0].token_ids == ref, f"prompt {i} (length {LENGTHS[i]}) diverged"


def test_batch_equals_reference(tiny_ckpt, prompts, reference):
    llm = LLM(model=str(tiny_ckpt), max_num_seqs=16, max_num_batched_tokens=4096)
    _assert_same(_greedy(llm, prompts), reference)


def test_decode_gathers_beyond_the_reused_buffer_equal_reference(tiny_ckpt, prompts, reference, monkeypatch):
    """The torch decode path's context gather reuses one buffer up to GATHER_BUFFER_BYTES and allocates beyond
    it: with a 24 KiB cap (~16 blocks of 16 fp32 tokens) a batch grows the buffer, then outgrows it. (The
    torch backend: `auto` decodes through the C kernel on CPU, which reads the pages in place.)"""
    from raymoe.attention.backend import PagedMLAAttention

    monkeypatch.setattr(PagedMLAAttention, "GATHER_BUFFER_BYTES", 24 << 10)
    llm = LLM(model=str(tiny_ckpt), max_num_seqs=16, max_num_batched_tokens=4096, kernels_backend="torch")
    _assert_same(_greedy(llm, prompts), reference)
    buf = llm.engine.runner.attn._gather
    assert buf is not None and buf.numel() * buf.element_size() <= 24 << 10


def test_chunked_prefill_equals_reference(tiny_ckpt, prompts, reference):
    llm = LLM(model=str(tiny_ckpt), max_num_seqs=16, max_num_batched_tokens=48)
    outs = _greedy(llm, prompts)
    _assert_same(outs, reference)
    # 300-token prompt at 48 tokens per step needs ≥ 7 prefill steps: chunking really happened.
    assert llm.engine.stats.num_steps >= sum(LENGTHS) // 48


def test_preemption_equals_reference(tiny_ckpt, prompts, reference):
    # fp32 latent cache: 40 values × 3 layers × 4 B = 480 B/token; 26 blocks of 16 hold 416 of the
    # ~1,370 tokens the batch needs, and the longest request alone needs 20 blocks.
    llm = LLM(model=str(tiny_ckpt), max_num_seqs=16, kv_cache_memory=26 * 16 * 480, block_size=16)
    outs = _greedy(llm, prompts)
    _assert_same(outs, reference)
    assert sum(o.metrics.num_preemptions for o in outs) > 0, "the KV budget was meant to force preemption"


def test_prefix_cache_hits_equal_reference(tiny_ckpt, prompts, reference):
    llm = LLM(model=str(tiny_ckpt), max_num_seqs=16, enable_prefix_caching=True)
    _assert_same(_greedy(llm, prompts), reference)
    hits_before = llm.engine.kv.num_hit_tokens
    outs = _greedy(llm, prompts)  # same prompts again: full blocks come from the cache
    _assert_same(outs, reference)
    assert llm.engine.kv.num_hit_tokens - hits_before >= sum(n - 16 for n in LENGTHS if n > 32)
    assert any(o.metrics.num_cached_tokens > 0 for o in outs)


def test_shared_prefix_different_suffixes(tiny_ckpt):
    rng = random.Random(7)
    prefix = [rng.randrange(1792) for _ in range(80)]
    batch = [prefix + [rng.randrange(1792) for _ in range(k)] for k in (1, 5, 16, 40)]
    model = build_model(Checkpoint(tiny_ckpt))
    ref = [reference_generate(model, p, MAX_TOKENS) for p in batch]
    llm = LLM(model=str(tiny_ckpt), enable_prefix_caching=True)
    first = _greedy(llm, batch[:1])
    assert first[0].outputs[0].token_ids == ref[0]
    rest = _greedy(llm, batch[1:])
    for o, r in zip(rest, ref[1:]):
        assert o.outputs[0].token_ids == r
    assert llm.engine.kv.num_hit_tokens >= 3 * 64  # 80-token prefix = 5 full blocks of 16, reused


def test_seeded_sampling_is_batch_independent(tiny_ckpt, prompts):
    llm = LLM(model=str(tiny_ckpt), max_num_seqs=16)
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=MAX_TOKENS, ignore_eos=True)
    alone = llm.generate(prompt_token_ids=[prompts[5]], sampling_params=params)[0].outputs[0].token_ids
    others = SamplingParams(temperature=0.8, max_tokens=MAX_TOKENS, ignore_eos=True)
    mixed = llm.generate(prompt_token_ids=prompts[:8], sampling_params=[others] * 5 + [params] + [others] * 2)
    assert mixed[5].outputs[0].token_ids == alone
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=MAX_TOKENS, ignore_eos=True)
    assert llm.generate(prompt_token_ids=[prompts[5]], sampling_params=other_seed)[0].outputs[0].token_ids != alone


def test_kv_bytes_per_token(tiny_ckpt):
    llm = LLM(model=str(tiny_ckpt), dtype="float32")
    a = llm.engine.args
    assert llm.engine.spec.bytes_per_token == (a.kv_lora_rank + a.qk_rope_head_dim) * a.num_hidden_layers * 4
    cache = llm.engine.runner.kv_cache
    assert cache.shape[1:] == (llm.engine.spec.num_blocks, llm.engine.spec.block_size, a.kv_cache_size)
    per_token = cache.element_size() * cache.shape[-1] * cache.shape[0]
    assert per_token == llm.engine.spec.bytes_per_token


def test_stop_strings_and_eos(tiny_ckpt, prompts, reference):
    llm = LLM(model=str(tiny_ckpt))
    tok = llm.tokenizer
    text = tok.decode(reference[4], skip_special_tokens=True)
    stop = text[len(text) // 2: len(text) // 2 + 2]
    if not stop.strip():
        pytest.skip("reference continuation has no usable stop string")
    out = llm.generate(prompt_token_ids=[prompts[4]],
                       sampling_params=SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop=[stop],
                                                      ignore_eos=True))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert stop not in out.text and text.startswith(out.text)
    eos = reference[4][3]
    out = llm.generate(prompt_token_ids=[prompts[4]],
                       sampling_params=SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                                                      stop_token_ids=[eos]))[0].outputs[0]
    assert out.token_ids == reference[4][: reference[4].index(eos) + 1] and out.finish_reason == "stop"


def test_min_tokens_keeps_stop_tokens_from_being_sampled(tiny_ckpt, prompts, reference):
    """Before min_tokens outputs, a stop token id cannot be sampled (vLLM semantics), so greedy picks
    the next best token; from then on the same id stops the output again."""
    llm = LLM(model=str(tiny_ckpt))
    first = reference[4][0]  # what greedy decoding emits first
    out = llm.generate(prompt_token_ids=[prompts[4]], sampling_params=SamplingParams(
        temperature=0, max_tokens=8, stop_token_ids=[first]))[0].outputs[0]
    assert out.token_ids == [first] and out.finish_reason == "stop"
    out = llm.generate(prompt_token_ids=[prompts[4]], sampling_params=SamplingParams(
        temperature=0, max_tokens=8, min_tokens=3, stop_token_ids=[first], ignore_eos=True))[0].outputs[0]
    assert first not in out.token_ids[:3] and len(out.token_ids) >= 3
    # only the stop id or max_tokens can end it now
    assert (out.token_ids[-1] == first and out.finish_reason == "stop") or (
        len(out.token_ids) == 8 and out.finish_reason == "length")


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
    ],
)
def test_bad_sampling_params(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        SamplingParams(**kwargs)


def test_prompt_longer_than_context(tiny_ckpt):
    llm = LLM(model=str(tiny_ckpt), max_model_len=64)
    with pytest.raises(ValueError, match="64"):
        llm.generate(prompt_token_ids=[[1] * 100])
    assert not llm.engine.has_unfinished()


def test_bfloat16_engine_runs(tiny_ckpt, prompts):
    llm = LLM(model=str(tiny_ckpt), dtype="bfloat16")
    assert llm.engine.runner.kv_cache.dtype == torch.bfloat16
    out = _greedy(llm, prompts[:4])
    assert all(len(o.outputs[0].token_ids) == MAX_TOKENS for o in out)


@pytest.mark.parametrize("budget", [0, 3, 7])
def test_thinking_budget_closes_reasoning(tiny_ckpt, prompts, budget):
    llm = LLM(model=str(tiny_ckpt))
    vocab = llm.tokenizer.get_vocab()
    think_end, think_start = vocab["</think>"], vocab["<think>"]
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=budget + 6, ignore_eos=True, thinking_budget=budget)
    out = llm.generate(prompt_token_ids=prompts[3:6], sampling_params=params)
    for o in out:
        ids = o.outputs[0].token_ids
        assert think_end in ids, "the budget must close the reasoning"
        reasoning = ids[: ids.index(think_end)]
        if reasoning and reasoning[0] == think_start:
            reasoning = reasoning[1:]
        assert len(reasoning) <= budget
        assert len(ids) == budget + 6 and ids.index(think_end) < len(ids) - 1, "the answer follows </think>"
    free = llm.generate(prompt_token_ids=prompts[3:4], sampling_params=SamplingParams(
        temperature=1.0, seed=3, max_tokens=budget + 6, ignore_eos=True))[0].outputs[0].token_ids
    assert free[:budget] == out[0].outputs[0].token_ids[:budget], "tokens before the budget are untouched"


def test_thinking_budget_counts_reasoning_after_the_opener_and_stops_visiting_closed_requests(tiny_ckpt):
    """The budget's accounting on forced samples: a leading <think> is not reasoning, the budget's
    tokens pass, the next one becomes </think>; a closed request is dropped from the per-step visit."""
    llm = LLM(model=str(tiny_ckpt), kv_cache_memory=4 << 20)
    engine, vocab = llm.engine, llm.tokenizer.get_vocab()
    rid = engine.add_request([5, 6, 7], SamplingParams(max_tokens=10, thinking_budget=2))
    other = engine.add_request([5, 6, 7], SamplingParams(max_tokens=10))
    assert engine._budgeted == {rid}
    request = engine.scheduler.get_request(rid)
    forced = []
    for token in (vocab["<think>"], 11, 12, 13, 14):
        sampled = {rid: (token, None), other: (token, None)}
        engine._apply_thinking_budgets(sampled)
        assert sampled[other] == (token, None)  # no budget: untouched
        forced.append(sampled[rid][0])
        request.output_token_ids.append(sampled[rid][0])
    assert forced == [vocab["<think>"], 11, 12, vocab["</think>"], 14]
    assert engine._budgeted == set()
    engine.abort(rid)
    engine.abort(other)


def test_triton_decode_kernel_path_matches_reference(tiny_ckpt, prompts, reference):
    """kernels.backend='triton' routes decode attention through raymoe_kernels.mla_decode (on CPU via
    TRITON_INTERPRET=1, set by tests/conftest.py); greedy tokens equal the torch path's."""
    pytest.importorskip("triton")
    llm = LLM(model=str(tiny_ckpt), kernels_backend="triton")
    assert llm.engine.runner.attn.use_triton
    outs = llm.generate(prompt_token_ids=prompts[:3],
                        sampling_params=SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    for o, ref in zip(outs, reference[:3]):
        assert o.outputs[0].token_ids == ref[:4]


def test_triton_int4_moe_kernel_path_matches_the_torch_path(tiny_int4_ckpt, prompts):
    """With INT4 experts, kernels.backend='triton' also runs the routed experts through permute →
    fused_moe_w4a16 → unpermute; greedy tokens equal the torch backend's (CPU int4 GEMM per expert)."""
    pytest.importorskip("triton")
    from raymoe.model.moe import RoutedExperts

    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in LLM(model=str(tiny_int4_ckpt), kernels_backend="torch").generate(
        prompt_token_ids=prompts[:3], sampling_params=params)]
    llm = LLM(model=str(tiny_int4_ckpt), kernels_backend="triton")
    layers = [m for m in llm.engine.runner.model.modules() if isinstance(m, RoutedExperts)]
    assert layers and all(m._int4 is not None for m in layers)
    assert [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=prompts[:3], sampling_params=params)] == want
