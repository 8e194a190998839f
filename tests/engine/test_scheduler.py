"""Scheduler simulations driven by a fake model: a token is a pure function of the sequence so far."""

import pytest

from raymoe.config import EngineConfig
from raymoe.engine.kv_cache import KVCacheManager
from raymoe.engine.request import Request, RequestStatus, SamplingParams, make_request_output
from raymoe.engine.scheduler import Scheduler, SchedulerOutput


def make_scheduler(
    *,
    max_num_seqs=8,
    max_num_batched_tokens=16,
    block_size=4,
    num_blocks=65,
    chunked=True,
    prefix=True,
    max_model_len=128,
) -> Scheduler:
    cfg = EngineConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        block_size=block_size,
        enable_chunked_prefill=chunked,
        enable_prefix_caching=prefix,
    )
    return Scheduler(cfg, KVCacheManager(num_blocks, block_size, prefix), max_model_len)


def make_request(rid: str, num_prompt: int, max_tokens: int = 4, first: int = 0, **params) -> Request:
    return Request(rid, list(range(first, first + num_prompt)), SamplingParams(max_tokens=max_tokens, **params))


def fake_token(req: Request) -> int:
    return (req.num_tokens * 7 + sum(req.prompt_token_ids)) % 97 + 1000


def step(sched: Scheduler) -> SchedulerOutput:
    """One engine step, checking the per-step invariants every time."""
    out = sched.schedule()
    assert out.num_batched_tokens == sum(s.num_new_tokens for s in out.scheduled)
    assert out.num_batched_tokens <= sched.max_num_batched_tokens
    assert sched.num_running <= sched.max_num_seqs
    assert len({s.request.request_id for s in out.scheduled}) == len(out.scheduled)
    for s in out.scheduled:
        assert s.start_position == s.request.num_computed_tokens
        assert s.request.num_computed_tokens + s.num_new_tokens <= s.request.num_tokens
        assert len(s.request.block_ids) * sched.kv.block_size >= s.start_position + s.num_new_tokens
    sched.update(out, {s.request.request_id: fake_token(s.request) for s in out.scheduled if s.needs_sample})
    return out


def run_to_completion(sched: Scheduler, max_steps: int = 500) -> list[SchedulerOutput]:
    outs = []
    while sched.has_unfinished():
        outs.append(step(sched))
        assert len(outs) < max_steps, "no progress"
    assert sched.kv.num_free_blocks == sched.kv.num_usable_blocks, "blocks leaked"
    return outs


def batch(out: SchedulerOutput) -> list[tuple[str, int]]:
    return [(s.request.request_id, s.num_new_tokens) for s in out.scheduled]


def test_new_request_joins_the_running_batch_at_the_next_step():
    sched = make_scheduler()
    a, b = make_request("a", 5, max_tokens=5), make_request("b", 3, first=50)
    sched.add_request(a)
    assert batch(step(sched)) == [("a", 5)]
    sched.add_request(b)
    assert batch(step(sched)) == [("a", 1), ("b", 3)]
    assert batch(step(sched)) == [("a", 1), ("b", 1)]
    assert a.num_output_tokens == 3 and b.num_output_tokens == 2


def test_chunked_prefill_splits_the_prompt_and_samples_only_on_the_last_chunk():
    sched = make_scheduler(max_num_batched_tokens=16)
    req = make_request("a", 40)
    sched.add_request(req)
    chunks = [step(sched).scheduled[0] for _ in range(3)]
    assert [(c.start_position, c.num_new_tokens, c.needs_sample) for c in chunks] == [
        (0, 16, False),
        (16, 16, False),
        (32, 8, True),
    ]
    assert req.num_output_tokens == 1 and req.num_computed_tokens == 40
    assert batch(step(sched)) == [("a", 1)]


def test_chunk_fills_the_budget_left_after_decodes():
    sched = make_scheduler(max_num_batched_tokens=16)
    sched.add_request(make_request("a", 4, max_tokens=10))
    step(sched)
    sched.add_request(make_request("b", 40, first=100))
    assert batch(step(sched)) == [("a", 1), ("b", 15)]


def test_without_chunking_a_prompt_waits_for_a_step_with_enough_budget():
    sched = make_scheduler(max_num_batched_tokens=16, chunked=False)
    with pytest.raises(ValueError, match="17 tokens > max_num_batched_tokens 16"):
        sched.add_request(make_request("too-long", 17))
    sched.add_request(make_request("a", 10, max_tokens=3))
    sched.add_request(make_request("b", 10, first=100))
    assert batch(step(sched)) == [("a", 10)]  # b does not fit the 6 tokens left and is not chunked
    assert batch(step(sched)) == [("a", 1), ("b", 10)]


def test_max_num_seqs_caps_the_batch_and_later_requests_wait_in_fcfs_order():
    sched = make_scheduler(max_num_seqs=2, max_num_batched_tokens=64)
    for i in range(5):
        sched.add_request(make_request(f"r{i}", 3, max_tokens=2, first=10 * i))
    finished = []
    for out in run_to_completion(sched):
        finished += out.finished_ids
        assert len(out.scheduled) <= 2
    finished += sched.schedule().finished_ids  # the last finish is reported to the next step
    assert finished == [f"r{i}" for i in range(5)]


def test_fcfs_head_of_line_is_not_overtaken_by_a_smaller_request():
    sched = make_scheduler(max_num_batched_tokens=16, chunked=False, num_blocks=7)  # 6 usable blocks
    sched.add_request(make_request("a", 12, max_tokens=8))  # 3 blocks, then a 4th while decoding
    step(sched)
    sched.add_request(make_request("big", 12, max_tokens=1, first=100))  # needs 3 blocks, 3 free
    sched.add_request(make_request("small", 2, first=200))
    out = step(sched)
    assert batch(out) == [("a", 1)]  # big could not get its blocks; small must not jump the queue
    assert [r.request_id for r in sched.waiting] == ["big", "small"]


def test_preemption_by_recompute_keeps_tokens_and_resumes():
    # 8 usable blocks of 4 tokens; three requests of 8-token prompts grow to 16 tokens each
    reqs = [make_request(f"r{i}", 8, max_tokens=8, first=10 * i) for i in range(3)]
    sched = make_scheduler(num_blocks=9, max_num_batched_tokens=32)
    for r in reqs:
        sched.add_request(r)
    outs = run_to_completion(sched)
    preempted = [rid for out in outs for rid in out.preempted_ids]
    assert preempted and preempted[0] == "r2"  # the most recently arrived goes first
    victim = reqs[2]
    assert victim.num_preemptions >= 1 and victim.status == RequestStatus.FINISHED_LENGTH
    # the resumed request recomputes prompt + output in one prefill, then samples
    resumed = next(s for out in outs[1:] for s in out.scheduled if s.request is victim and s.num_new_tokens > 1)
    assert resumed.start_position == 0 and resumed.num_new_tokens > 8 and resumed.needs_sample

    # same tokens as a run with plenty of blocks
    ref = [make_request(f"r{i}", 8, max_tokens=8, first=10 * i) for i in range(3)]
    big = make_scheduler(max_num_batched_tokens=32)
    for r in ref:
        big.add_request(r)
    run_to_completion(big)
    assert [r.output_token_ids for r in reqs] == [r.output_token_ids for r in ref]
    assert all(r.num_output_tokens == 8 for r in reqs)


def test_preempted_request_goes_to_the_front_of_waiting_and_nothing_is_admitted_that_step():
    sched = make_scheduler(num_blocks=5, max_num_batched_tokens=32)  # 4 usable blocks
    a, b = make_request("a", 8, max_tokens=8), make_request("b", 7, max_tokens=8, first=50)
    sched.add_request(a)
    sched.add_request(b)
    step(sched)  # a: 2 blocks, b: 2 blocks, pool full
    sched.add_request(make_request("c", 2, first=90))
    out = step(sched)  # a's 10th token needs a 3rd block → b is preempted
    assert out.preempted_ids == ["b"] and batch(out) == [("a", 1)]
    assert [r.request_id for r in sched.waiting] == ["b", "c"]
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0 and b.block_ids == []
    assert b.num_output_tokens == 1  # generated tokens are kept for the recompute


def test_a_request_alone_that_cannot_fit_the_cache_is_rejected_at_add():
    sched = make_scheduler(num_blocks=5)  # 4 usable blocks = 16 tokens
    with pytest.raises(ValueError, match="needs up to 5 KV blocks"):
        sched.add_request(make_request("a", 10, max_tokens=8))


def test_abort_frees_blocks_of_running_and_waiting_requests():
    sched = make_scheduler(max_num_seqs=1)
    a, b = make_request("a", 9, max_tokens=50), make_request("b", 5)
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule()
    assert a.block_ids and sched.kv.num_free_blocks < sched.kv.num_usable_blocks
    assert sched.abort("a") and sched.abort("b") and not sched.abort("a") and not sched.abort("nope")
    assert a.status == b.status == RequestStatus.FINISHED_ABORTED and a.status.finish_reason == "abort"
    assert sched.kv.num_free_blocks == sched.kv.num_usable_blocks and not sched.has_unfinished()
    sched.update(out, {"a": 1})  # a step in flight for an aborted request is ignored
    assert a.num_output_tokens == 0
    assert step(sched).finished_ids == ["a", "b"]


def test_stop_conditions_eos_stop_token_min_tokens_and_length():
    sched = make_scheduler()
    eos = make_request("eos", 3, max_tokens=10)
    eos.eos_token_id = 7
    ignore = make_request("ignore", 3, max_tokens=3, first=10, ignore_eos=True)
    ignore.eos_token_id = 7
    stop = make_request("stop", 3, max_tokens=10, first=20, stop_token_ids=[5])
    early = make_request("min", 3, max_tokens=10, first=30, stop_token_ids=[5], min_tokens=2)
    for r in (eos, ignore, stop, early):
        sched.add_request(r)
    out = sched.schedule()
    sched.update(out, {"eos": 7, "ignore": 7, "stop": 5, "min": 5})
    assert (eos.status, eos.stop_reason) == (RequestStatus.FINISHED_STOPPED, None)
    assert (stop.status, stop.stop_reason) == (RequestStatus.FINISHED_STOPPED, 5)
    assert ignore.status == early.status == RequestStatus.RUNNING
    out = sched.schedule()
    sched.update(out, {"ignore": [7, 7, 9], "min": 5})  # several tokens: stop at max_tokens, drop the rest
    assert ignore.output_token_ids == [7, 7, 7] and ignore.status == RequestStatus.FINISHED_LENGTH
    assert early.status == RequestStatus.FINISHED_STOPPED and early.output_token_ids == [5, 5]
    assert eos.status.finish_reason == "stop" and ignore.status.finish_reason == "length"


def test_finish_from_a_stop_string_frees_the_request():
    sched = make_scheduler()
    req = make_request("a", 3, max_tokens=10)
    sched.add_request(req)
    step(sched)
    assert sched.finish("a", RequestStatus.FINISHED_STOPPED, stop_reason="</s>")
    assert req.stop_reason == "</s>" and req.block_ids == [] and not sched.has_unfinished()
    with pytest.raises(ValueError, match="FINISHED_"):
        sched.finish("a", RequestStatus.RUNNING)


def test_repeated_prompt_starts_after_the_cached_prefix():
    sched = make_scheduler()
    a = make_request("a", 10, max_tokens=1)
    sched.add_request(a)
    run_to_completion(sched)
    b = make_request("b", 10, max_tokens=1)
    sched.add_request(b)
    out = step(sched)
    assert [(s.start_position, s.num_new_tokens) for s in out.scheduled] == [(8, 2)]
    assert b.num_cached_tokens == 8 and b.output_token_ids == a.output_token_ids


@pytest.mark.parametrize(
    "num_prompt, max_tokens, match",
    [(32, 1, "prompt has 32 tokens; max_model_len is 32"), (30, 3, r"\(30 tokens\) \+ max_tokens \(3\) = 33")],
)
def test_length_limits_are_rejected_at_add(num_prompt, max_tokens, match):
    sched = make_scheduler(max_model_len=32)
    with pytest.raises(ValueError, match=match):
        sched.add_request(make_request("a", num_prompt, max_tokens=max_tokens))


def test_bad_requests_are_rejected_at_add():
    sched = make_scheduler()
    sched.add_request(make_request("a", 3))
    with pytest.raises(ValueError, match="'a' is already"):
        sched.add_request(make_request("a", 3))
    with pytest.raises(ValueError, match="empty prompt"):
        sched.add_request(make_request("b", 0))


def test_mixed_load_respects_budget_and_leaks_nothing():
    sched = make_scheduler(max_num_seqs=3, max_num_batched_tokens=12, num_blocks=13, max_model_len=64)
    sizes = [(5, 6), (20, 3), (9, 9), (3, 12), (14, 4), (7, 7)]
    for i, (num_prompt, max_tokens) in enumerate(sizes):
        sched.add_request(make_request(f"r{i}", num_prompt, max_tokens=max_tokens, first=i * 3))
    reqs = [sched.get_request(f"r{i}") for i in range(len(sizes))]
    run_to_completion(sched)
    assert [r.num_output_tokens for r in reqs] == [m for _, m in sizes]


def test_request_output_reports_tokens_finish_reason_and_metrics():
    sched = make_scheduler()
    req = make_request("a", 3, max_tokens=3)
    sched.add_request(req)
    run_to_completion(sched)
    out = make_request_output(req, text="xyz")
    (completion,) = out.outputs
    assert out.finished and completion.finish_reason == "length" and completion.token_ids == req.output_token_ids
    assert completion.logprobs is None and completion.text == "xyz"
    m = out.metrics
    assert 0 <= m.queue_time <= m.first_token_latency and len(m.inter_token_latencies) == 2
    assert make_request_output(req, start=2).outputs[0].token_ids == req.output_token_ids[2:]
