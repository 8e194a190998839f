"""Continuous-batching scheduler: which requests run this step, and how many tokens each.

Pure Python (DESIGN §2 step 1): `schedule()` → `SchedulerOutput` (no tensors) → model runner →
sampled token ids → `update()`. One step is in flight at a time; `update()` advances
`num_computed_tokens`, publishes full blocks to the prefix cache and applies token-level stops.

Policy (one token budget per step, `max_num_batched_tokens`):
1. Running requests first, oldest first: a decode takes 1 token, an unfinished prefill its next chunk.
   When a request cannot get a KV block, the most recently arrived running request is preempted by
   recompute (blocks freed, back to the FRONT of waiting, generated tokens kept), possibly itself.
2. Then waiting requests strictly FCFS (the head blocks the queue) while `max_num_seqs`, the token
   budget and free blocks allow; none are admitted in a step that preempted.
Chunked prefill splits a prompt over steps; only the step that computes the last known token
samples. With chunking off a prompt waits for a step whose remaining budget holds it whole — except a
resumed request longer than the whole budget (prompt + output), which is chunked so it can't starve.

Length limits are checked at `add_request`: like vLLM's OpenAI server we reject (ValueError) a prompt
with no room for output and a `prompt + max_tokens` beyond `max_model_len` instead of truncating
`max_tokens`; the caller may clamp `max_tokens` itself before adding.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from dataclasses import dataclass, field

from raymoe.config import EngineConfig
from raymoe.engine.kv_cache import KVCacheManager
from raymoe.engine.request import Request, RequestStatus


@dataclass(slots=True)
class ScheduledSeq:
    """One request's slice of a step: positions `[start_position, start_position + num_new_tokens)`."""

    request: Request
    num_new_tokens: int
    start_position: int
    needs_sample: bool  # this slice ends at the request's last known token: the runner samples a token


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)  # running (oldest first), then admitted
    preempted_ids: list[str] = field(default_factory=list)
    finished_ids: list[str] = field(default_factory=list)  # finished/aborted since the last step: drop state
    num_batched_tokens: int = 0

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    """FCFS continuous batching with chunked prefill and preemption by recompute.

    Args:
        engine_config: batch limits (`max_num_seqs`, `max_num_batched_tokens`, chunking switch).
        kv: the block manager; its `block_size` must equal `engine_config.block_size`.
        max_model_len: context limit (prompt + output) per request.
    """

    def __init__(self, engine_config: EngineConfig, kv: KVCacheManager, max_model_len: int) -> None:
        if kv.block_size != engine_config.block_size:
            raise ValueError(f"kv.block_size ({kv.block_size}) != engine block_size ({engine_config.block_size})")
        if max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {max_model_len}")
        self.max_num_seqs = engine_config.max_num_seqs
        self.max_num_batched_tokens = engine_config.max_num_batched_tokens
        self.enable_chunked_prefill = engine_config.enable_chunked_prefill
        self.max_model_len = max_model_len
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # sorted by arrival order
        self._requests: dict[str, Request] = {}  # every unfinished request
        self._order: dict[str, int] = {}  # arrival rank, the FCFS / preemption key
        self._next_rank = 0
        self._finished_ids: list[str] = []

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def get_request(self, request_id: str) -> Request | None:
        return self._requests.get(request_id)

    def add_request(self, request: Request) -> None:
        """Queue a new request at the back of waiting.

        Raises:
            ValueError: duplicate id, empty prompt, or a prompt / prompt + max_tokens that cannot fit
                `max_model_len`, the step budget (chunking off) or the whole KV cache.
        """
        rid, num_prompt, max_tokens = request.request_id, request.num_prompt_tokens, request.params.max_tokens
        if rid in self._requests:
            raise ValueError(f"request_id {rid!r} is already in the scheduler")
        if num_prompt == 0:
            raise ValueError(f"request {rid!r} has an empty prompt")
        if num_prompt >= self.max_model_len:
            raise ValueError(
                f"prompt has {num_prompt} tokens; max_model_len is {self.max_model_len} (no room for output)"
            )
        if num_prompt + max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({num_prompt} tokens) + max_tokens ({max_tokens}) = {num_prompt + max_tokens} "
                f"exceeds max_model_len {self.max_model_len}"
            )
        if not self.enable_chunked_prefill and num_prompt > self.max_num_batched_tokens:
            raise ValueError(
                f"prompt has {num_prompt} tokens > max_num_batched_tokens {self.max_num_batched_tokens} "
                "and chunked prefill is disabled"
            )
        num_blocks = self.kv.num_blocks_for(num_prompt + max_tokens)
        if num_blocks > self.kv.num_usable_blocks:
            raise ValueError(
                f"request needs up to {num_blocks} KV blocks (prompt {num_prompt} + max_tokens {max_tokens}) "
                f"but the cache has {self.kv.num_usable_blocks}"
            )
        request.status = RequestStatus.WAITING
        self._requests[rid] = request
        self._order[rid] = self._next_rank
        self._next_rank += 1
        self.waiting.append(request)

    def abort(self, request_id: str) -> bool:
        """Abort a waiting or running request; False if unknown or already finished."""
        return self.finish(request_id, RequestStatus.FINISHED_ABORTED)

    def finish(self, request_id: str, status: RequestStatus, stop_reason: int | str | None = None) -> bool:
        """Finish a request from outside (a stop string matched by the detokenizer, or an abort)."""
        if not status.is_finished:
            raise ValueError(f"status must be a FINISHED_* status, got {status.name}")
        request = self._requests.get(request_id)
        if request is None:
            return False
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self._finish(request, status, stop_reason)
        return True

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_ids=self._finished_ids)
        self._finished_ids = []
        budget = self.max_num_batched_tokens

        # running: decodes and unfinished prefills, oldest first
        block_size = self.kv.block_size
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            computed = request.num_computed_tokens
            if (len(request.prompt_token_ids) + len(request.output_token_ids) == computed + 1
                    and computed < len(request.block_ids) * block_size):
                # a decode whose token fits its last block: what allocate_slots would do is nothing
                out.scheduled.append(ScheduledSeq(request, 1, computed, True))
                budget -= 1
                i += 1
                continue
            num_new = self._num_new_tokens(request, computed, budget)
            if num_new == 0:
                i += 1
                continue
            while not self.kv.allocate_slots(request, num_new):
                victim = self.running.pop()  # most recently arrived; never one scheduled already
                self._preempt(victim)
                out.preempted_ids.append(victim.request_id)
                if victim is request:
                    break
            else:
                out.scheduled.append(self._scheduled(request, num_new))
                budget -= num_new
                i += 1

        # waiting: strict FCFS admission
        now = time.monotonic()
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted_ids:
            request = self.waiting[0]
            computed_blocks, num_cached = self.kv.get_computed_blocks(request)
            num_new = self._num_new_tokens(request, num_cached, budget)
            if num_new == 0 or not self.kv.allocate_slots(request, num_new, computed_blocks):
                break
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_cached
            if request.num_preemptions == 0:
                request.num_cached_tokens = num_cached
            if request.first_scheduled_time is None:
                request.first_scheduled_time = now
            bisect.insort(self.running, request, key=self._rank)
            out.scheduled.append(self._scheduled(request, num_new))
            budget -= num_new

        out.num_batched_tokens = self.max_num_batched_tokens - budget
        return out

    def update(self, output: SchedulerOutput, sampled: dict[str, list[int] | int]) -> list[Request]:
        """Apply one step's results.

        Args:
            output: the `schedule()` result that was run.
            sampled: token(s) per request id for every slice with `needs_sample`; other entries
                (e.g. a partial prefill chunk) are ignored.

        Returns:
            The requests that received tokens this step, in scheduled order (finished ones included).
        """
        now = time.monotonic()
        updated = []
        running = RequestStatus.RUNNING
        cache_blocks = self.kv.cache_blocks if self.kv.enable_prefix_caching else None
        for seq in output.scheduled:
            request = seq.request
            if request.status is not running:  # aborted/finished after schedule()
                continue
            request.num_computed_tokens += seq.num_new_tokens
            if cache_blocks is not None:
                cache_blocks(request)
            if request.num_computed_tokens < len(request.prompt_token_ids) + len(request.output_token_ids):
                continue  # partial prefill chunk
            tokens = sampled.get(request.request_id)
            assert tokens is not None, f"no sampled token for {request.request_id}"
            for token_id in [tokens] if isinstance(tokens, int) else tokens:
                request.append_token(token_id, now)
                status = self._check_stop(request, token_id)
                if status is not None:
                    self.running.remove(request)
                    self._finish(request, status, request.stop_reason)
                    break
            updated.append(request)
        return updated

    def _check_stop(self, request: Request, token_id: int) -> RequestStatus | None:
        params = request.params
        num_output = len(request.output_token_ids)
        if num_output >= params.min_tokens:
            if not params.ignore_eos and token_id == request.eos_token_id:
                return RequestStatus.FINISHED_STOPPED
            if params.stop_token_ids and token_id in params.stop_token_ids:
                request.stop_reason = token_id
                return RequestStatus.FINISHED_STOPPED
        if num_output >= params.max_tokens or num_output + len(request.prompt_token_ids) >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _num_new_tokens(self, request: Request, num_computed: int, budget: int) -> int:
        """Tokens to run for `request` within `budget`; 0 when it must wait for a later step."""
        num_new = request.num_tokens - num_computed
        assert num_new >= 1, f"{request.request_id} has nothing to compute"
        if num_new <= budget:
            return num_new
        can_chunk = self.enable_chunked_prefill or request.num_tokens > self.max_num_batched_tokens
        return budget if can_chunk else 0

    def _scheduled(self, request: Request, num_new: int) -> ScheduledSeq:
        start = request.num_computed_tokens
        return ScheduledSeq(request, num_new, start, needs_sample=start + num_new >= request.num_tokens)

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.waiting.appendleft(request)

    def _finish(self, request: Request, status: RequestStatus, stop_reason: int | str | None) -> None:
        self.kv.free(request)
        request.status = status
        request.stop_reason = stop_reason
        request.finished_time = time.monotonic()
        del self._requests[request.request_id]
        del self._order[request.request_id]
        self._finished_ids.append(request.request_id)

    def _rank(self, request: Request) -> int:
        return self._order[request.request_id]
