"""Requests as the engine sees them: sampling parameters, per-request state, and step outputs.

Dataflow: the ingress builds `SamplingParams` + prompt token ids → `Request` enters the `Scheduler`
(WAITING → RUNNING ⇄ PREEMPTED → FINISHED_*) → each step's tokens come back to the caller as a
vLLM-shaped `RequestOutput`. Pure Python, no tensors: the scheduler and block manager read these.
Times are `time.monotonic()` seconds.
"""

from __future__ import annotations

import enum
import functools
import math
import time
from dataclasses import dataclass, field

_MAX_LOGPROBS = 20  # OpenAI's top_logprobs limit


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop (vLLM-compatible names and defaults).

    `temperature == 0` is greedy. `top_k` 0 or -1 turns top-k off. `stop` strings are matched by the
    caller on detokenized text (it then calls `Scheduler.finish`); token-level stops are checked by
    the scheduler. `thinking_budget` is stored for the ingress/engine and not interpreted here.

    Raises:
        ValueError: naming the offending value, for anything out of range.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    skip_special_tokens: bool = True
    thinking_budget: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        _check(
            _is_real(self.temperature) and self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"
        )
        _check(_is_real(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        _check(_is_int(self.top_k) and self.top_k >= -1, f"top_k must be -1, 0 (off) or >= 1, got {self.top_k}")
        _check(_is_real(self.min_p) and 0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}")
        _check(self.seed is None or _is_int(self.seed), f"seed must be an int or None, got {self.seed!r}")
        _check(_is_int(self.max_tokens) and self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}")
        _check(
            _is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens,
            f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}",
        )
        _check(all(isinstance(s, str) and s for s in self.stop), f"stop must be non-empty strings, got {self.stop!r}")
        _check(
            all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
            f"stop_token_ids must be token ids >= 0, got {self.stop_token_ids!r}",
        )
        _check(
            self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= _MAX_LOGPROBS),
            f"logprobs must be None or in [0, {_MAX_LOGPROBS}], got {self.logprobs}",
        )
        _check(
            _is_real(self.repetition_penalty) and self.repetition_penalty > 0,
            f"repetition_penalty must be > 0, got {self.repetition_penalty}",
        )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_is_real(value) and -2 <= value <= 2, f"{name} must be in [-2, 2], got {value}")
        _check(
            self.thinking_budget is None or (_is_int(self.thinking_budget) and self.thinking_budget >= 0),
            f"thinking_budget must be None or >= 0, got {self.thinking_budget}",
        )

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @functools.cached_property
    def plain_greedy(self) -> bool:
        """Greedy, no penalties, no logprobs: the row needs nothing but the argmax of its logits. Read once per
        step and request, so cached at first use (parameters are not changed after a request is added)."""
        return self.is_greedy and not self.has_penalties and self.logprobs is None


# Temperatures below this are treated as greedy (as vLLM does): dividing logits by ~0 overflows.
GREEDY_TEMPERATURE = 1e-5


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class RequestStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()

    @property
    def is_finished(self) -> bool:
        return self in _FINISH_REASONS

    @property
    def finish_reason(self) -> str | None:
        """OpenAI `finish_reason`: "stop", "length", "abort", or None while unfinished."""
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


@dataclass(slots=True)
class Request:
    """One sequence's mutable state, owned by the scheduler once added.

    `num_computed_tokens` counts tokens whose KV is in the cache; tokens in
    `all_token_ids[num_computed_tokens:]` still have to run through the model. After a preemption it
    drops to 0 while `output_token_ids` is kept, so the recompute covers prompt + output.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    eos_token_id: int | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    # Filled by the engine core from the sampler, one {token_id: logprob} per output token.
    output_logprobs: list[dict[int, float]] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    # Prefix-cache hash chain of this request's full blocks (owned by KVCacheManager).
    block_hashes: list[bytes] = field(default_factory=list)
    num_cached_tokens: int = 0  # prefix-cache hit at first admission (OpenAI usage.cached_tokens)
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    finished_time: float | None = None
    # What stopped it: a stop token id, a stop string, or None (EOS, length, abort).
    stop_reason: int | str | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def token_ids_slice(self, start: int, end: int) -> list[int]:
        """`all_token_ids[start:end]` without concatenating the whole sequence."""
        num_prompt = len(self.prompt_token_ids)
        if end <= num_prompt:
            return self.prompt_token_ids[start:end]
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt : end - num_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - num_prompt]

    def append_token(self, token_id: int, now: float) -> None:
        self.output_token_ids.append(token_id)
        self.token_times.append(now)
        if self.first_token_time is None:
            self.first_token_time = now


@dataclass(slots=True)
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None
    first_token_time: float | None
    last_token_time: float | None
    finished_time: float | None
    queue_time: float | None  # arrival → first scheduled
    first_token_latency: float | None  # arrival → first token (TTFT)
    inter_token_latencies: list[float]  # gaps between consecutive output tokens (TPOT samples)
    num_cached_tokens: int
    num_preemptions: int


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None
    stop_reason: int | str | None = None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics


def make_request_output(request: Request, text: str = "", start: int = 0) -> RequestOutput:
    """Snapshot `request` as a `RequestOutput`.

    Args:
        request: the request after `Scheduler.update`.
        text: the caller's detokenization of the same tokens.
        start: first output token to include; streaming passes the count already sent so each
            output carries only the delta (keeps a long stream O(n), not O(n^2)).
    """
    times = request.token_times
    lo = max(start - 1, 0)
    completion = CompletionOutput(
        index=0,
        text=text,
        token_ids=request.output_token_ids[start:],
        logprobs=request.output_logprobs[start:] if request.params.logprobs is not None else None,
        finish_reason=request.status.finish_reason,
        stop_reason=request.stop_reason,
    )
    arrival = request.arrival_time
    metrics = RequestMetrics(
        arrival_time=arrival,
        first_scheduled_time=request.first_scheduled_time,
        first_token_time=request.first_token_time,
        last_token_time=times[-1] if times else None,
        finished_time=request.finished_time,
        queue_time=None if request.first_scheduled_time is None else request.first_scheduled_time - arrival,
        first_token_latency=None if request.first_token_time is None else request.first_token_time - arrival,
        inter_token_latencies=[b - a for a, b in zip(times[lo:], times[lo + 1:])],  # this delta's gaps only
        num_cached_tokens=request.num_cached_tokens,
        num_preemptions=request.num_preemptions,
    )
    return RequestOutput(
        request_id=request.request_id,
        prompt_token_ids=request.prompt_token_ids,
        outputs=[completion],
        finished=request.is_finished,
        metrics=metrics,
    )


def merge_outputs(prev: RequestOutput, new: RequestOutput) -> RequestOutput:
    """Concatenate two consecutive delta outputs of one request (text, tokens, logprobs, latencies)."""
    a, b = prev.outputs[0], new.outputs[0]
    logprobs = None if a.logprobs is None and b.logprobs is None else (a.logprobs or []) + (b.logprobs or [])
    merged = CompletionOutput(index=a.index, text=a.text + b.text, token_ids=a.token_ids + b.token_ids,
                              logprobs=logprobs, finish_reason=b.finish_reason, stop_reason=b.stop_reason)
    m = new.metrics
    metrics = RequestMetrics(
        arrival_time=m.arrival_time, first_scheduled_time=m.first_scheduled_time,
        first_token_time=m.first_token_time, last_token_time=m.last_token_time, finished_time=m.finished_time,
        queue_time=m.queue_time, first_token_latency=m.first_token_latency,
        inter_token_latencies=prev.metrics.inter_token_latencies + m.inter_token_latencies,
        num_cached_tokens=m.num_cached_tokens, num_preemptions=m.num_preemptions,
    )
    return RequestOutput(request_id=new.request_id, prompt_token_ids=new.prompt_token_ids, outputs=[merged],
                         finished=new.finished, metrics=metrics)
