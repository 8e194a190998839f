"""`raymoe bench engine`: raymoe's engine vs transformers' `generate` on the same checkpoint.

Prefill throughput = prompt tokens / time to the first token; decode throughput = generated tokens
after the first / the remaining time. Both systems run greedy with EOS ignored, one after the other
in this process, on the same weights (fp32), at batch 1, 16 and 64 with 128-token prompts and 128
output tokens. Then the time to first token of a repeated 1,024-token prompt with and without
prefix caching. Timings are wall-clock on a shared machine: read the ratios, not the absolutes.

Both systems run with torch's default intra-op threads and with 1 thread, and each keeps its faster
count per column (small models can run faster single-threaded, and on a VM whose second core is
intermittently busy every multi-threaded op waits for it); the winning counts are printed. Each
measurement is repeated `repeats` times, the two systems taking turns, and each side keeps its best
time: on a shared VM a neighbour's burst then slows a run of either side, not the ratio.
"""

from __future__ import annotations

import random
import time

import torch


def _prompts(batch: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, 1700) for _ in range(length)] for _ in range(batch)]


def _time_raymoe(llm, prompts: list[list[int]], max_tokens: int) -> float:
    from raymoe import SamplingParams

    t = time.perf_counter()
    outs = llm.generate(prompt_token_ids=prompts,
                        sampling_params=SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
    assert all(len(o.outputs[0].token_ids) == max_tokens for o in outs)
    return time.perf_counter() - t


@torch.inference_mode()
def _time_hf(model, prompts: list[list[int]], max_tokens: int) -> float:
    ids = torch.tensor(prompts, dtype=torch.long)
    mask = torch.ones_like(ids)
    t = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                         do_sample=False, pad_token_id=0)
    assert out.shape[1] == ids.shape[1] + max_tokens
    return time.perf_counter() - t


def _keeper(best: dict[str, tuple[float, int]]):
    """keep(key, rate, threads): record a rate (and its thread count) in `best` if it beats the one there."""
    def keep(key: str, rate: float, n: int) -> None:
        if rate > best[key][0]:
            best[key] = (rate, n)
    return keep


def bench_engine(model: str | None = None, quick: bool = False, repeats: int = 3) -> int:
    if repeats < 1:
        raise ValueError(f"repeats ({repeats}) must be >= 1")
    from transformers import AutoModelForCausalLM

    from raymoe import LLM
    from raymoe.model.hf_compat import register_kimi_k2
    from raymoe.model.tiny import cached_tiny

    path = model or str(cached_tiny("tiny"))
    register_kimi_k2()
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    batches = (1, 4) if quick else (1, 16, 64)
    prompt_len, out_len = (32, 16) if quick else (128, 128)
    llm = LLM(model=path, dtype="float32", max_num_seqs=64, max_num_batched_tokens=8192,
              enable_prefix_caching=False, kv_cache_memory=512 << 20)
    _time_raymoe(llm, _prompts(2, 16, 99), 4)  # warm up both
    _time_hf(hf, _prompts(2, 16, 99), 4)
    threads = torch.get_num_threads()
    counts = sorted({threads, 1})
    print(f"model: {path}\nprompt {prompt_len} tokens, output {out_len} tokens, greedy, fp32, best of {repeats} "
          f"alternating runs\nboth systems: best of {' and '.join(map(str, counts))} thread(s), "
          f"the winning counts in brackets (raymoe/transformers, prefill decode)\n")
    print(f"{'batch':>5} | {'raymoe prefill tok/s':>20} {'hf prefill tok/s':>17} {'ratio':>6} | "
          f"{'raymoe decode tok/s':>19} {'hf decode tok/s':>16} {'ratio':>6}")
    for b in batches:
        prompts = _prompts(b, prompt_len, seed=b)
        best = {key: (0.0, 0) for key in ("r_pre", "r_dec", "h_pre", "h_dec")}  # (tok/s, threads)
        keep = _keeper(best)
        for _ in range(repeats):
            for n in counts:
                torch.set_num_threads(n)
                try:
                    r1 = _time_raymoe(llm, prompts, 1)
                    rn = _time_raymoe(llm, prompts, out_len)
                    h1 = _time_hf(hf, prompts, 1)
                    hn = _time_hf(hf, prompts, out_len)
                finally:
                    torch.set_num_threads(threads)
                keep("r_pre", b * prompt_len / r1, n)
                keep("r_dec", b * (out_len - 1) / max(rn - r1, 1e-9), n)
                keep("h_pre", b * prompt_len / h1, n)
                keep("h_dec", b * (out_len - 1) / max(hn - h1, 1e-9), n)
        (r_pre, rp_n), (r_dec, rd_n), (h_pre, hp_n), (h_dec, hd_n) = (best[k] for k in ("r_pre", "r_dec", "h_pre", "h_dec"))
        print(f"{b:>5} | {r_pre:>20.0f} {h_pre:>17.0f} {r_pre / h_pre:>5.2f}x | "
              f"{r_dec:>19.0f} {h_dec:>16.0f} {r_dec / h_dec:>5.2f}x   [{rp_n}/{hp_n} {rd_n}/{hd_n}]")

    long_len = 256 if quick else 1024
    prompt = _prompts(1, long_len, seed=7)
    print(f"\ntime to first token, repeated {long_len}-token prompt:")
    engines = {caching: LLM(model=path, dtype="float32", enable_prefix_caching=caching, max_num_batched_tokens=4096)
               for caching in (False, True)}
    for llm in engines.values():
        _time_raymoe(llm, prompt, 1)  # first request fills the cache (when enabled)
    res = {False: float("inf"), True: float("inf")}
    for _ in range(3 * repeats):  # taking turns, as above
        for caching, llm in engines.items():
            res[caching] = min(res[caching], _time_raymoe(llm, prompt, 1))
    for caching in (False, True):
        print(f"  prefix caching {'on ' if caching else 'off'}: {res[caching] * 1e3:8.1f} ms")
    print(f"  speed-up: {res[False] / res[True]:.1f}x")
    return 0
