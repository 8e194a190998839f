"""Answering a planned request: per-choice tier streams -> choice states -> JSON or SSE, and request metrics.

    Plan -> run_choice() per choice (TierClient.stream; rewinds for re-sampled tool calls) -> merge_streams
         -> JSON body | SSE chunks ... [usage] [DONE];  RequestTally -> raymoe.observability.metrics

`run_choice` is the one driver of a choice's generation, shared by normal requests and Heavy Mode
(`heavy_flow.py`): it feeds tier deltas into the choice state and, when the state rejects a tool call under
the 'resample' policy, re-submits from the call's begin marker with a new seed (the kept tokens join the
prompt, so the replica's prefix cache serves them). Only the ingress (`ingress.py`) turns `ErrorResponse`
values into status codes; here they become an error JSON before streaming starts, or an error event after.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi.responses import JSONResponse, Response, StreamingResponse

from raymoe.engine.request import SamplingParams
from raymoe.heavy.config import HeavyPlan
from raymoe.heavy.context import ContextReport
from raymoe.observability import metrics
from raymoe.serve.choices import ChatChoiceState, TextChoiceState, usage
from raymoe.serve.errors import error_json, record_error
from raymoe.serve.protocol import ErrorResponse
from raymoe.serve.tier import TierClient, TierOutput

if TYPE_CHECKING:
    from raymoe.serve.ingress import OpenAiIngress

_RESAMPLE_SEED_STRIDE = 1_000_003  # attempt k of a seeded choice uses seed + k * stride: replayable, distinct


@dataclass
class Plan:
    """A validated request: prompt ids, one SamplingParams per choice, and how to answer."""

    kind: str  # "chat" | "text"
    request_id: str
    created: int
    prompts: list[list[int]]
    params: list[SamplingParams]
    prompt_of: list[int]  # choice index -> prompt index
    stream: bool
    include_usage: bool
    return_token_ids: bool
    make_state: Callable[[int], ChatChoiceState | TextChoiceState]
    heavy: HeavyPlan | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)  # chat: for Heavy Mode's reflect pass
    context: ContextReport | None = None  # set when context management changed the prompt
    context_strategy: str = "truncate"

    def extensions(self) -> dict[str, Any]:
        """Top-level extension fields of the response (and of a stream's first chunk)."""
        if self.context is None:
            return {}
        return {"context_management": {"strategy": self.context_strategy, **self.context}}


class RequestTally:
    """One request's token counts and timings; feeds the latency histograms as tokens arrive."""

    def __init__(self, num_choices: int):
        self.start = time.perf_counter()
        self.closed = False
        self.first_token: float | None = None
        self.cached = [0] * num_choices
        self.num_tokens = [0] * num_choices
        self.replicas: list[str | None] = [None] * num_choices
        self._last = [0.0] * num_choices
        self.extra_prompt_tokens = 0  # Heavy Mode's reflect prompt

    def observe(self, index: int, item: TierOutput) -> None:
        if item.replica is not None and self.replicas[index] is None:
            self.replicas[index] = item.replica
        self.cached[index] = max(self.cached[index], item.num_cached_tokens)
        if not item.token_ids:
            return
        now = time.perf_counter()
        if self.first_token is None:
            self.first_token = now
            metrics.observe("raymoe_time_to_first_token_seconds", now - self.start)
        elif self._last[index]:  # per token: a coalesced delta spreads its wait over its tokens
            metrics.observe("raymoe_inter_token_latency_seconds", (now - self._last[index]) / len(item.token_ids))
        self._last[index] = now
        self.num_tokens[index] += len(item.token_ids)


def _resample_seed(seed: int | None, attempt: int) -> int | None:
    if seed is None:
        return None
    value = seed + (attempt - 1) * _RESAMPLE_SEED_STRIDE
    return value if -(2**63) <= value < 2**63 else seed - (attempt - 1) * _RESAMPLE_SEED_STRIDE


async def run_choice(client: TierClient, tokenizer: Any, request_id: str, prompt: list[int], params: SamplingParams,
                     state: ChatChoiceState | TextChoiceState, observe: Callable[[TierOutput], None], *,
                     hint: str | None = None) -> AsyncIterator[dict[str, Any] | ErrorResponse]:
    """Yield one choice's stream chunks (choice dicts), or a final `ErrorResponse`.

    When the state asks for a rewind (a rejected tool call, attempts left), the current attempt is cancelled
    and generation restarts from the kept tokens with a new seed and the remaining budgets.
    """
    sub_prompt, sub_params, sub_id = prompt, params, request_id
    while True:
        stream = client.stream(sub_id, sub_prompt, sub_params, tokenizer, hint)
        try:
            async for item in stream:
                if isinstance(item, ErrorResponse):
                    yield item
                    return
                observe(item)
                chunk = state.update(item.token_ids, item.text, item.logprobs, item.finished, item.finish_reason)
                if chunk is not None:
                    yield chunk
                if getattr(state, "rewind_to", None) is not None:
                    break
            else:
                return
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
        assert isinstance(state, ChatChoiceState)
        chunk = state.rewind(lambda ids: tokenizer.decode(ids, skip_special_tokens=params.skip_special_tokens))
        if chunk is not None:
            yield chunk
        kept = state.token_ids
        sub_prompt, sub_id, hint = list(prompt) + kept, f"{request_id}.a{state.attempt}", None
        sub_params = dataclasses.replace(
            params, max_tokens=params.max_tokens - len(kept), min_tokens=max(0, params.min_tokens - len(kept)),
            seed=_resample_seed(params.seed, state.attempt),
            thinking_budget=client.remaining_budget(params.thinking_budget, kept))


async def merge_streams(streams: list[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
    """Interleave several choices' streams as (choice index, item); closing this closes them all."""
    if len(streams) == 1:
        try:
            async for item in streams[0]:
                yield 0, item
        finally:
            await streams[0].aclose()  # type: ignore[attr-defined]
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, stream: AsyncIterator[Any]) -> None:
        try:
            async for item in stream:
                await queue.put((index, item))
        except Exception as e:  # surfaced to the consumer, raised there
            await queue.put((index, e))
        finally:
            await queue.put((index, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def chunk_head(ingress: OpenAiIngress, plan: Plan) -> dict[str, Any]:
    return {"id": plan.request_id, "object": "chat.completion.chunk" if plan.kind == "chat" else "text_completion",
            "created": plan.created, "model": ingress.info.model_name}


async def respond(ingress: OpenAiIngress, plan: Plan) -> Response:
    """Answer a normal (not Heavy) request: JSON, or SSE once the first item proves the request was accepted."""
    states = [plan.make_state(i) for i in range(len(plan.params))]
    tally = RequestTally(len(plan.params))
    client, tokenizer = ingress.client, ingress.tokenizer
    events = merge_streams([
        run_choice(client, tokenizer, f"{plan.request_id}-{i}", plan.prompts[plan.prompt_of[i]], p, states[i],
                   lambda item, i=i: tally.observe(i, item))
        for i, p in enumerate(plan.params)])
    ingress.request_started()
    if plan.stream:
        # Wait for the first item before answering, so a refused request still gets its status code.
        try:
            first = await anext(events, None)
        except BaseException:  # the client left while we waited
            await finish(ingress, events, plan, tally)
            raise
        if first is not None and isinstance(first[1], ErrorResponse):
            await finish(ingress, events, plan, tally)
            return error_json(first[1])
        return StreamingResponse(_stream(ingress, plan, states, first, events, tally), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    try:
        async for _, item in events:
            if isinstance(item, ErrorResponse):
                return error_json(item)
    finally:
        await finish(ingress, events, plan, tally)
    body: dict[str, Any] = {
        "id": plan.request_id, "object": "chat.completion" if plan.kind == "chat" else "text_completion",
        "created": plan.created, "model": ingress.info.model_name,
        "choices": [s.message() if isinstance(s, ChatChoiceState) else s.final() for s in states],
        "usage": plan_usage(plan, tally), **plan.extensions()}
    if plan.return_token_ids:
        body["prompt_token_ids"] = plan.prompts[0] if plan.kind == "chat" else plan.prompts
    return JSONResponse(body)


async def _stream(ingress: OpenAiIngress, plan: Plan, states: list, first: tuple[int, Any] | None,
                  events: AsyncIterator[tuple[int, Any]], tally: RequestTally) -> AsyncIterator[bytes]:
    head = chunk_head(ingress, plan)
    tail = {"usage": None} if plan.include_usage else {}
    try:
        if plan.kind == "chat":
            for s in states:
                choice = {"index": s.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}
                extra = {"prompt_token_ids": plan.prompts[0]} if plan.return_token_ids and s.index == 0 else {}
                if s.index == 0:
                    extra.update(plan.extensions())
                yield sse({**head, "choices": [choice], **tail, **extra})
        pending = [first] if first is not None else []
        failed = False
        while True:
            pair = pending.pop() if pending else await anext(events, None)
            if pair is None:
                break
            _, item = pair
            if isinstance(item, ErrorResponse):  # mid-stream: the status is sent already
                record_error(item)
                yield sse(item.to_dict())
                failed = True
                break
            yield sse({**head, "choices": [item], **tail})
        if plan.include_usage and not failed:
            yield sse({**head, "choices": [], "usage": plan_usage(plan, tally)})
        yield b"data: [DONE]\n\n"
    finally:
        await finish(ingress, events, plan, tally)


async def finish(ingress: OpenAiIngress, events: Any, plan: Plan, tally: RequestTally) -> None:
    """Close the request's streams and record its totals (once)."""
    await events.aclose()
    if tally.closed:
        return
    tally.closed = True
    ingress.request_finished()
    metrics.observe("raymoe_e2e_request_latency_seconds", time.perf_counter() - tally.start)
    metrics.inc("raymoe_prompt_tokens_total", _prompt_tokens(plan, tally))
    metrics.inc("raymoe_generation_tokens_total", sum(tally.num_tokens))


def _prompt_tokens(plan: Plan, tally: RequestTally) -> int:
    if plan.heavy is not None:  # every trajectory prefills (most of it from the prefix cache)
        return len(plan.prompts[0]) * len(plan.params) + tally.extra_prompt_tokens
    return sum(len(p) for p in plan.prompts)


def plan_usage(plan: Plan, tally: RequestTally) -> dict[str, Any]:
    """OpenAI usage. n choices share one prompt: counted once, as OpenAI does. Completion tokens count every
    generated token, including those of re-sampled tool calls and (Heavy Mode) every trajectory."""
    if plan.heavy is not None:
        return usage(_prompt_tokens(plan, tally), sum(tally.num_tokens), sum(tally.cached))
    cached = sum(tally.cached[i] for i in range(len(plan.params))
                 if i == 0 or plan.prompt_of[i] != plan.prompt_of[i - 1])
    return usage(_prompt_tokens(plan, tally), sum(tally.num_tokens), cached)
