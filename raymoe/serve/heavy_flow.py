"""Heavy Mode on the ingress: N trajectories spread over the AttentionTier replicas, then one aggregated answer.

    Plan(heavy) -> leaders: trajectory i < R to replica i (routing hint `spread`), R = live replicas
                -> a leader's first token (its replica has the prompt's KV blocks cached)
                -> its followers (j % R == i) pinned to the same replica (hint `replica`): prefix-cache hits
                -> all done -> aggregate: vote | best_logprob (a trajectory's answer) | reflect (one more generation)
                -> JSON, or SSE: `heavy_progress` chunks, then the answer as normal chunks, then [DONE]

Why leaders first: trajectories that start together on one replica all miss its prefix cache (a block is
published only once computed), so each replica would prefill the prompt once per trajectory; waiting for
one token per replica costs one prefill's latency and saves (N - R) prefills. Trajectory i is seeded
seed + i (a seeded request replays exactly); every trajectory asks for chosen-token logprobs (ties in
`vote`, `best_logprob`). Usage sums all of it: N prompts (mostly cached), every trajectory's tokens, and
the reflect pass. The response's `heavy` field lists each trajectory's answer, tokens, mean logprob and
replica. Any trajectory error ends the request with that error (a dead replica is already survived by
`TierClient`'s resubmission). Heavy Mode with n > 1 or with tools is a 400 (`ingress.py`): one aggregated
answer per request, and trajectories must not act on tools independently.

Stream: the role chunk (with `context_management` when set), then progress chunks
`{"object": "chat.completion.chunk", "choices": [], "heavy_progress": {"event": ...}}` with events
`trajectory_started` {index, replica}, `trajectory_finished` {index, answer, num_tokens, mean_logprob, replica,
finish_reason, num_finished, num_trajectories} and `aggregating` {aggregate}; then the answer as normal
chunks of choice 0 (live for reflect, one chunk for vote/best_logprob), the last one carrying `heavy`; then
the usage chunk if asked for, and `[DONE]`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

from fastapi.responses import JSONResponse, Response, StreamingResponse

from raymoe.heavy.aggregate import Candidate, best_logprob, build_reflect_messages, make_candidate, vote
from raymoe.observability import metrics
from raymoe.serve.choices import ChatChoiceState
from raymoe.serve.errors import error_json, record_error
from raymoe.serve.parsers import ParsedOutput
from raymoe.serve.protocol import ErrorResponse, internal_error
from raymoe.serve.respond import Plan, RequestTally, chunk_head, finish, plan_usage, run_choice, sse
from raymoe.serve.routing import replica_hint, spread_hint
from raymoe.serve.tier import TierOutput

if TYPE_CHECKING:
    from raymoe.serve.ingress import OpenAiIngress

logger = logging.getLogger("raymoe.serve")


class HeavyRun:
    """One Heavy Mode request: its trajectories' states, their rollout, and the aggregation."""

    def __init__(self, ingress: OpenAiIngress, plan: Plan):
        assert plan.heavy is not None
        self.ingress, self.plan, self.heavy = ingress, plan, plan.heavy
        n = self.heavy.trajectories
        self.states = [plan.make_state(i) for i in range(n)]
        self.tally = RequestTally(n + 1)  # + the reflect pass
        self.started = [False] * n
        self.logprob_sums = [0.0] * n
        self.logprob_counts = [0] * n
        self.candidates: list[Candidate] = []
        self.aggregate: str = self.heavy.aggregate
        self.winner: int | None = None
        self.vote_tally: dict[str, int] | None = None
        self.final: ChatChoiceState | None = None
        self._queue: asyncio.Queue = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []

    # -- rollout ----------------------------------------------------------------------------------
    async def trajectories(self) -> AsyncIterator[dict[str, Any] | ErrorResponse]:
        """Run every trajectory; yield progress events, or one `ErrorResponse` and stop."""
        n = self.heavy.trajectories
        num_replicas = max(1, min(len(await self.ingress.client.replica_ids()), n))
        followers = {i: [j for j in range(num_replicas, n) if j % num_replicas == i] for i in range(num_replicas)}
        for i in range(num_replicas):
            self._launch(i, spread_hint(self.plan.request_id, i))
        num_done = 0
        try:
            while num_done < n:
                kind, i, payload = await self._queue.get()
                if kind == "error":
                    yield payload
                    return
                if kind == "started":
                    metrics.inc("raymoe_heavy_trajectories_total", replica=payload or "unknown")
                    for j in followers.pop(i, []):
                        self._launch(j, replica_hint(payload) if payload else None)
                    yield {"event": "trajectory_started", "index": i, "replica": payload}
                    continue
                num_done += 1
                for j in followers.pop(i, []):  # a leader that finished without a token
                    self._launch(j, None)
                candidate = self._candidate(i)
                self.candidates.append(candidate)
                yield {"event": "trajectory_finished", **self._describe(candidate), "num_finished": num_done,
                       "num_trajectories": n}
        finally:
            await self.close()

    def _launch(self, i: int, hint: str | None) -> None:
        plan, ingress = self.plan, self.ingress

        def observe(item: TierOutput) -> None:
            self.tally.observe(i, item)
            for tid, lp in zip(item.token_ids, item.logprobs or []):
                value = lp.get(tid)
                if value is not None and math.isfinite(value):
                    self.logprob_sums[i] += value
                    self.logprob_counts[i] += 1
            if not self.started[i]:
                self.started[i] = True
                self._queue.put_nowait(("started", i, item.replica))

        async def pump() -> None:
            try:
                async for chunk in run_choice(ingress.client, ingress.tokenizer, f"{plan.request_id}-t{i}",
                                              plan.prompts[0], plan.params[i], self.states[i], observe, hint=hint):
                    if isinstance(chunk, ErrorResponse):
                        self._queue.put_nowait(("error", i, chunk))
                        return
                self._queue.put_nowait(("done", i, None))
            except Exception as e:  # a bug: report it as a 500 value, never hang the request
                logger.exception("heavy trajectory %s-t%d failed", plan.request_id, i)
                self._queue.put_nowait(("error", i, internal_error(f"trajectory failed: {type(e).__name__}")))

        self._tasks.append(asyncio.create_task(pump()))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    def _candidate(self, i: int) -> Candidate:
        message = self.states[i].message()["message"]
        count = self.logprob_counts[i]
        return make_candidate(i, ParsedOutput(message["reasoning_content"], message["content"]),
                              self.heavy.extractor, self.heavy.extractor_regex,
                              mean_logprob=self.logprob_sums[i] / count if count else None,
                              num_tokens=self.tally.num_tokens[i], replica=self.tally.replicas[i])

    def _describe(self, c: Candidate) -> dict[str, Any]:
        return {"index": c.index, "answer": c.answer, "num_tokens": c.num_tokens,
                "mean_logprob": None if c.mean_logprob is None else round(c.mean_logprob, 6), "replica": c.replica,
                "finish_reason": self.states[c.index].finish_reason}

    # -- aggregation ------------------------------------------------------------------------------
    async def answer(self) -> AsyncIterator[dict[str, Any] | ErrorResponse]:
        """The final answer as stream chunks of choice 0 (the last one has finish_reason), after `trajectories()`."""
        start = time.perf_counter()
        try:
            if self.aggregate == "reflect":
                reflect = await self._reflect_prompt()
                if reflect is not None:
                    async for chunk in self._run_reflect(*reflect):
                        yield chunk
                    return
                self.aggregate = "vote"  # the candidates do not fit in one prompt: vote over them instead
            if self.aggregate == "vote":
                self.winner, self.vote_tally = vote(self.candidates)
            else:
                self.winner = best_logprob(self.candidates)
            self.final = self.states[self.winner]
            yield _whole_answer(self.final)
        finally:
            metrics.observe("raymoe_heavy_aggregation_seconds", time.perf_counter() - start,
                            aggregate=self.aggregate)

    async def _reflect_prompt(self) -> tuple[list[int], int] | None:
        """(prompt ids, max_tokens) of the reflect pass, or None when it cannot fit the context."""
        ingress, base = self.ingress, self.plan.params[0]
        messages = build_reflect_messages(self.plan.messages, self.candidates,
                                          max_candidate_chars=self.heavy.reflect_candidate_max_chars)
        ids, _, _ = await ingress.encode_chat(messages, None)
        limits, context = ingress.config.limits, ingress.info.max_model_len
        room = context - len(ids)
        if len(ids) > min(limits.max_prompt_tokens or context, context - 1) or room < 1:
            logger.info("heavy %s: reflect prompt of %d tokens does not fit; voting", self.plan.request_id, len(ids))
            return None
        return ids, min(self.heavy.reflect_max_tokens or base.max_tokens, room)

    async def _run_reflect(self, ids: list[int], max_tokens: int) -> AsyncIterator[dict[str, Any] | ErrorResponse]:
        base, n = self.plan.params[0], self.heavy.trajectories
        seed = None if base.seed is None else (base.seed + n if base.seed + n < 2**63 else base.seed - n)
        state = self.plan.make_state(0)
        params = dataclasses.replace(base, seed=seed, max_tokens=max_tokens, min_tokens=min(base.min_tokens, max_tokens),
                                     logprobs=state.top_logprobs)
        self.tally.extra_prompt_tokens = len(ids)
        self.final = state
        async for chunk in run_choice(self.ingress.client, self.ingress.tokenizer, f"{self.plan.request_id}-reflect",
                                      ids, params, state, lambda item: self.tally.observe(n, item)):
            yield chunk

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"aggregate": self.aggregate, "winner": self.winner,
                               "trajectories": [self._describe(c) for c in sorted(self.candidates,
                                                                                  key=lambda c: c.index)]}
        if self.vote_tally is not None:
            out["tally"] = self.vote_tally
        return out


def _whole_answer(state: ChatChoiceState) -> dict[str, Any]:
    """A finished trajectory as one stream chunk of choice 0."""
    choice = state.message()
    message = choice.pop("message")
    delta = {k: message[k] for k in ("reasoning_content", "content") if message.get(k)}
    logprobs = choice["logprobs"]
    return {**choice, "index": 0, "delta": delta, "logprobs": logprobs if logprobs and logprobs["content"] else None}


async def respond_heavy(ingress: OpenAiIngress, plan: Plan) -> Response:
    """Answer a Heavy Mode chat request (see the module docstring)."""
    assert plan.heavy is not None
    run = HeavyRun(ingress, plan)
    metrics.inc("raymoe_heavy_requests_total", aggregate=plan.heavy.aggregate)
    events = run.trajectories()
    ingress.request_started()
    if plan.stream:
        try:  # the first event (a token, or a refusal) decides the status code, as for normal requests
            first = await anext(events)
        except BaseException:
            await finish(ingress, events, plan, run.tally)
            raise
        if isinstance(first, ErrorResponse):
            await finish(ingress, events, plan, run.tally)
            return error_json(first)
        return StreamingResponse(_stream(ingress, run, first, events), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    try:
        async for event in events:
            if isinstance(event, ErrorResponse):
                return error_json(event)
        async with aclosing(run.answer()) as answer:
            async for chunk in answer:
                if isinstance(chunk, ErrorResponse):
                    return error_json(chunk)
    finally:
        await finish(ingress, events, plan, run.tally)
    assert run.final is not None
    choice = run.final.message()
    choice["index"] = 0
    body: dict[str, Any] = {"id": plan.request_id, "object": "chat.completion", "created": plan.created,
                            "model": ingress.info.model_name, "choices": [choice], "usage": plan_usage(plan, run.tally),
                            "heavy": run.summary(), **plan.extensions()}
    if plan.return_token_ids:
        body["prompt_token_ids"] = plan.prompts[0]
    return JSONResponse(body)


async def _stream(ingress: OpenAiIngress, run: HeavyRun, first: dict[str, Any],
                  events: AsyncIterator[dict[str, Any] | ErrorResponse]) -> AsyncIterator[bytes]:
    plan = run.plan
    head = chunk_head(ingress, plan)
    tail = {"usage": None} if plan.include_usage else {}
    try:
        role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        extra = {"prompt_token_ids": plan.prompts[0]} if plan.return_token_ids else {}
        yield sse({**head, "choices": [role], **tail, **extra, **plan.extensions()})
        yield sse({**head, "choices": [], **tail, "heavy_progress": first})
        async for event in events:
            if isinstance(event, ErrorResponse):
                record_error(event)
                yield sse(event.to_dict())
                return
            yield sse({**head, "choices": [], **tail, "heavy_progress": event})
        yield sse({**head, "choices": [], **tail,
                   "heavy_progress": {"event": "aggregating", "aggregate": run.aggregate}})
        async with aclosing(run.answer()) as answer:
            async for chunk in answer:
                if isinstance(chunk, ErrorResponse):
                    record_error(chunk)
                    yield sse(chunk.to_dict())
                    return
                extra = {"heavy": run.summary()} if chunk.get("finish_reason") else {}
                yield sse({**head, "choices": [chunk], **tail, **extra})
        if plan.include_usage:
            yield sse({**head, "choices": [], "usage": plan_usage(plan, run.tally)})
        yield b"data: [DONE]\n\n"
    finally:
        await finish(ingress, events, plan, run.tally)
