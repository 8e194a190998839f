"""AttentionTier: the Serve deployment that runs one engine per replica, and `TierClient`, its caller.

    Ingress --TierClient.stream()--> DeploymentHandle(stream=True) --> AttentionTier.generate()
        --> AsyncEngine (scheduler, KV cache, model; expert shards owned by this replica)

The tier speaks token ids and yields `TierOutput` deltas, or one `ErrorResponse` value for a request
it cannot serve (a 400 such as a prompt over the context limit, a 503 when its engine died); it
never picks a status code. `TierClient` is the one place on the ingress side where Ray's failures
(`RayActorError`, Serve back-pressure) are caught: a request whose replica died is re-submitted to
another replica as prompt + the tokens already produced, with the remaining `max_tokens`, so the
caller's stream continues (DESIGN §2: the attention tier holds the KV cache, losing a replica loses
its caches, not its requests).

Placement: requests carry an optional routing hint (`routing.py`: spread over replicas, or pin to the replica
a previous output reported), which Heavy Mode uses so each replica prefills a shared prompt once. Thinking
budgets survive resubmission: the resumed request gets the budget minus the reasoning tokens already produced
(none when the reasoning already ended).
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.config import RequestRouterConfig
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    RayServeException,
    ReplicaUnavailableError,
)

from raymoe.config import RayMoEConfig
from raymoe.engine.async_engine import EngineDeadError
from raymoe.engine.request import SamplingParams
from raymoe.serve.protocol import ErrorResponse, bad_request, internal_error, unavailable
from raymoe.serve.routing import ReplicaHintRouter

logger = logging.getLogger("raymoe.serve")


@dataclass(slots=True)
class TierRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass(slots=True)
class TierOutput:
    """One engine delta, slimmed for the handle (a `RequestOutput` would re-send the prompt each time)."""

    token_ids: list[int]
    text: str
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None  # "stop" | "length" | "abort" | None
    finished: bool
    num_cached_tokens: int = 0
    replica: str | None = None  # set on a stream's first output: the replica serving it


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the ingress needs to speak for the model: its name, limits and tokenizer."""

    model_name: str
    max_model_len: int
    vocab_size: int
    tokenizer: Any
    created: int


def default_engine_factory(config: RayMoEConfig) -> Any:
    """`AsyncEngine` over `build_engine(config)`, on the replica's GPU when it was given one."""
    import torch

    from raymoe.engine.async_engine import AsyncEngine
    from raymoe.engine.executor import build_engine

    device = "cuda" if config.serve.attention.num_gpus > 0 and torch.cuda.is_available() else "cpu"
    return AsyncEngine(build_engine(config, device=device))


def import_object(path: str) -> Any:
    """`'pkg.module:attr'` -> the attribute (the form Serve's `import_path` uses)."""
    module, sep, attr = path.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"engine_factory {path!r} must look like 'package.module:function'")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import engine_factory {path!r}: {e}") from e


@dataclass(frozen=True, slots=True)
class ReasoningTokens:
    """Token ids of K2's reasoning markers, for thinking-budget accounting across resubmissions."""

    think_start: int | None
    enders: frozenset[int]  # `</think>` and the tool-call openers that also end reasoning

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> ReasoningTokens:
        vocab = tokenizer.get_vocab() if tokenizer is not None else {}
        enders = frozenset(vocab[t] for t in ("</think>", "<|tool_calls_section_begin|>",
                                              "<|tool_call_section_begin|>", "<|tool_call_begin|>") if t in vocab)
        return cls(vocab.get("<think>"), enders)

    def remaining_budget(self, budget: int | None, produced: list[int]) -> int | None:
        """The budget left after `produced` output tokens; None once the reasoning has ended.

        Counts as the engine does: output tokens before the first ender, a leading `<think>` excluded.
        """
        if budget is None:
            return None
        used = 0
        for i, token in enumerate(produced):
            if token in self.enders:
                return None
            if not (i == 0 and token == self.think_start):
                used += 1
        return max(0, budget - used)


@serve.deployment(name="AttentionTier",
                  request_router_config=RequestRouterConfig(request_router_class=ReplicaHintRouter))
class AttentionTier:
    """One replica = one engine (DESIGN §2). Its expert shards, if any, are actors it owns.

    Args:
        config: the validated tree; the engine reads `model`, `engine`, `parallel`, `kernels`.
        engine_factory: import path of `f(config) -> engine` replacing `default_engine_factory`
            (tests inject a scripted engine this way). The engine needs `generate`, `abort`,
            `stats`, `is_healthy`, `shutdown`, `tokenizer` and `core` (`max_model_len`,
            `model_name`, `args.vocab_size`), as `AsyncEngine` has.
    """

    def __init__(self, config: RayMoEConfig, engine_factory: str | None = None):
        import torch

        # One intra-op thread per reserved CPU: on the 2-core dev box two replicas with torch's
        # default 2 threads each ran the tiny model ~10x slower per step than with 1 (2026-11).
        torch.set_num_threads(max(1, int(config.serve.attention.num_cpus or 1)))
        factory: Callable[[RayMoEConfig], Any] = (
            import_object(engine_factory) if engine_factory else default_engine_factory)
        self.engine = factory(config)
        core = self.engine.core
        name = config.model.served_model_name or core.model_name
        self.info = ModelInfo(name, core.max_model_len, core.args.vocab_size, self.engine.tokenizer, int(time.time()))
        self.retry_after_s = config.serve.attention.retry_after_s
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except RayServeException:  # constructed outside a Serve replica
            self.replica_id = f"pid{os.getpid()}"

    async def generate(self, request: TierRequest) -> AsyncIterator[TierOutput | ErrorResponse]:
        """Stream one request's deltas; a refused request yields a single `ErrorResponse`."""
        first = True
        try:
            async for out in self.engine.generate(request.request_id, request.prompt_token_ids, request.params):
                completion = out.outputs[0]
                yield TierOutput(completion.token_ids, completion.text, completion.logprobs,
                                 completion.finish_reason, out.finished,
                                 out.metrics.num_cached_tokens if first else 0, self.replica_id if first else None)
                first = False
        except ValueError as e:  # the engine refused the request (too long, bad token id)
            yield bad_request(str(e), param="prompt")
        except EngineDeadError as e:
            logger.error("engine of replica %s is dead: %s", self.replica_id, e)
            err = unavailable(f"the engine failed; retry: {e}", retry_after_s=self.retry_after_s)
            # a request with no part in the failing step (it came later, or was waiting) is resubmitted
            # elsewhere by the client; one of the failing step is not (it may be what broke the engine)
            yield dataclasses.replace(err, code=ENGINE_DEAD) if e.safe_elsewhere else err

    def model_info(self) -> ModelInfo:
        return self.info

    def replica(self) -> str:
        return self.replica_id

    def stats(self) -> dict[str, Any]:
        return {"replica": self.replica_id, "healthy": bool(self.engine.is_healthy), **self.engine.stats()}

    def is_healthy(self) -> bool:
        return bool(self.engine.is_healthy)

    def check_health(self) -> None:
        """Serve's probe: raising makes Serve replace this replica."""
        if not self.engine.is_healthy:
            raise RuntimeError(f"engine of AttentionTier replica {self.replica_id} is dead")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


ENGINE_DEAD = "engine_dead"  # ErrorResponse.code: this replica's engine was already dead (Serve replaces it)


class _EngineDead(Exception):
    """The replica answered, but its engine is dead: resubmit elsewhere like a lost replica."""


# Exceptions meaning "the replica serving this request is gone": re-submit elsewhere.
_REPLICA_LOST = (RayActorError, ReplicaUnavailableError, _EngineDead)


class TierClient:
    """The ingress's only way to the tier; converts Ray failures into resubmissions or `ErrorResponse`s.

    Args:
        handle: DeploymentHandle of `AttentionTier`.
        max_resubmits: how many losses of a replica that was streaming the request it survives. A
            submission that fails before any token (the router still lists a replica that is already
            gone, until Serve notices) does not count; those are retried for `dead_replica_window_s`.
        retry_after_s: Retry-After sent with the back-pressure 503/429.
        backpressure_status_code: 503 or 429, as configured for the tier.
        on_resubmit: called once per resubmission (metrics).
        reasoning_tokens: marker ids for thinking-budget accounting on resubmission (None: budgets are
            passed on unchanged).
    """

    _REPLICAS_TTL_S = 5.0  # replica ids are a broadcast: refreshed at most this often

    def __init__(self, handle: Any, *, max_resubmits: int = 3, retry_after_s: float = 1.0,
                 backpressure_status_code: int = 503, on_resubmit: Callable[[], None] | None = None,
                 resubmit_delay_s: float = 0.2, reasoning_tokens: ReasoningTokens | None = None,
                 dead_replica_window_s: float = 30.0):
        self.handle = handle
        self.max_resubmits = max_resubmits
        self.dead_replica_window_s = dead_replica_window_s
        self.retry_after_s = retry_after_s
        self.backpressure_status_code = backpressure_status_code
        self.on_resubmit = on_resubmit
        self.resubmit_delay_s = resubmit_delay_s
        self.reasoning_tokens = reasoning_tokens
        self._replicas: tuple[float, list[str]] = (-1e9, [])

    async def model_info(self) -> ModelInfo:
        return await self.handle.model_info.remote()

    async def is_healthy(self, timeout_s: float = 5.0) -> bool:
        try:
            return bool(await asyncio.wait_for(self.handle.is_healthy.remote(), timeout_s))
        except (asyncio.TimeoutError, RayActorError, RayTaskError, BackPressureError, DeploymentUnavailableError,
                ReplicaUnavailableError):
            return False

    async def stats(self, timeout_s: float = 2.0) -> list[dict[str, Any]]:
        """Engine stats of every live replica (a broadcast: for /metrics, not the request path)."""
        try:
            results = await self.handle.broadcast("stats").results_async(timeout_s=timeout_s, return_exceptions=True)
        except (TimeoutError, RuntimeError) as e:
            logger.warning("tier stats broadcast failed: %s", e)
            return []
        return [r for r in results if isinstance(r, dict)]

    async def replica_ids(self, timeout_s: float = 2.0) -> list[str]:
        """Ids of the live replicas, cached for a few seconds (placement of Heavy Mode trajectories)."""
        at, ids = self._replicas
        if time.monotonic() - at < self._REPLICAS_TTL_S and ids:
            return ids
        try:
            results = await self.handle.broadcast("replica").results_async(timeout_s=timeout_s,
                                                                           return_exceptions=True)
        except (TimeoutError, RuntimeError) as e:
            logger.warning("tier replica broadcast failed: %s", e)
            return ids
        ids = sorted(r for r in results if isinstance(r, str))
        self._replicas = (time.monotonic(), ids)
        return ids

    async def stream(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                     tokenizer: Any, hint: str | None = None) -> AsyncIterator[TierOutput | ErrorResponse]:
        """Yield the request's deltas; after an `ErrorResponse` nothing follows.

        `hint` is a `routing.py` placement hint for the first submission; a resubmission goes anywhere.

        Resumption keeps greedy output identical: the new replica prefills prompt + produced tokens
        and continues. Its text covers only the new tokens, so after a resubmission the text is
        re-derived here by decoding all produced tokens, exactly as the engine does (an O(n) decode
        per delta, paid only by resumed requests), holding back incomplete UTF-8 and stop-string
        prefixes, and applying stop strings across the seam.
        """
        produced: list[int] = []
        sent_text = ""
        resumed = False
        attempt = 0  # losses of a replica that had started streaming this request
        tries = 0  # submissions after the first
        gone_since: float | None = None  # first of the current run of submissions that got no token
        while True:
            remaining = params.max_tokens - len(produced)
            if remaining <= 0:  # the last token arrived but its "finished" delta did not
                yield TierOutput([], "", None, "length", True)
                return
            sub_params = params if tries == 0 else dataclasses.replace(
                params, max_tokens=remaining, min_tokens=max(0, params.min_tokens - len(produced)),
                thinking_budget=self.remaining_budget(params.thinking_budget, produced))
            request = TierRequest(request_id if tries == 0 else f"{request_id}.r{tries}",
                                  list(prompt_token_ids) + produced, sub_params)
            responses = None
            live = False  # the replica may still be working on it: cancel if we leave early
            assigned = False
            try:
                handle = self.handle.options(stream=True, session_id=hint) if hint and tries == 0 else (
                    self.handle.options(stream=True))
                responses = handle.generate.remote(request)
                live = True
                async for item in responses:
                    assigned = True
                    if isinstance(item, ErrorResponse):
                        live = False
                        if item.code == ENGINE_DEAD:  # until Serve replaces that replica (health check)
                            assigned = False  # like an already-gone replica: bounded by the time window
                            raise _EngineDead(item.message)
                        yield item
                        return
                    produced += item.token_ids
                    live = not item.finished
                    if resumed:
                        item = _retext(item, produced, sent_text, params, tokenizer)
                    sent_text += item.text
                    yield item
                    if item.finished:
                        return
            except _REPLICA_LOST as e:
                live = False
                tries += 1
                now = time.monotonic()
                if assigned:
                    attempt += 1
                    gone_since = None
                else:
                    gone_since = now if gone_since is None else gone_since
                if attempt > self.max_resubmits or (
                        gone_since is not None and now - gone_since > self.dead_replica_window_s):
                    yield unavailable(f"AttentionTier replicas kept failing ({tries - 1} resubmissions): "
                                      f"{type(e).__name__}", retry_after_s=self.retry_after_s)
                    return
                logger.warning("request %s lost its AttentionTier replica after %d tokens (%s); resubmitting",
                               request_id, len(produced), type(e).__name__)
                if self.on_resubmit is not None:
                    self.on_resubmit()
                resumed = True
                await asyncio.sleep(self.resubmit_delay_s * min(tries, 5))  # let Serve drop the dead replica
                continue
            except BackPressureError as e:
                live = False
                # Serve carries the tier's configured status (503/429) and Retry-After on the error.
                retry_after = e.retry_after_s if e.retry_after_s is not None else self.retry_after_s
                yield unavailable(f"the model is overloaded; retry later ({e})", retry_after,
                                  e.status_code or self.backpressure_status_code)
                return
            except DeploymentUnavailableError as e:
                live = False
                yield unavailable(f"the model is unavailable: {e.message}", self.retry_after_s)
                return
            except RayTaskError as e:  # a bug in the tier: report, do not retry
                live = False
                logger.error("AttentionTier failed on %s: %s", request_id, e)
                yield internal_error(f"the model server failed: {type(e).__name__}")
                return
            finally:
                if live and responses is not None:  # our caller left, or a stop string: free the engine slot
                    _cancel(responses, assigned)
            # the stream ended without a finished delta: the replica is going away; resume elsewhere
            attempt += 1
            tries += 1
            if attempt > self.max_resubmits:
                yield unavailable("AttentionTier streams kept ending early", retry_after_s=self.retry_after_s)
                return
            resumed = True

    def remaining_budget(self, budget: int | None, produced: list[int]) -> int | None:
        """A thinking budget for a request resumed after `produced` output tokens (see `ReasoningTokens`)."""
        if budget is None or self.reasoning_tokens is None:
            return budget
        return self.reasoning_tokens.remaining_budget(budget, produced)


def _cancel(responses: Any, assigned: bool) -> None:
    """Best-effort cancel of a handle stream that never blocks the event loop.

    `cancel()` resolves the replica assignment synchronously: instant once an item arrived, but it
    would wait for a request still queued at the router, so that case goes to a thread.
    """

    def cancel() -> None:
        try:
            responses.cancel()
        except Exception as e:  # the request already failed or finished: nothing left to cancel
            logger.debug("cancel after the request ended: %s", e)

    if assigned:
        cancel()
    else:
        asyncio.get_running_loop().run_in_executor(None, cancel)


def _retext(item: TierOutput, produced: list[int], sent_text: str, params: SamplingParams,
            tokenizer: Any) -> TierOutput:
    """The delta's text as the original engine would have produced it (see `TierClient.stream`)."""
    full = tokenizer.decode(produced, skip_special_tokens=params.skip_special_tokens) if tokenizer else ""
    finish_reason, finished = item.finish_reason, item.finished
    hold = max((len(s) for s in params.stop), default=1) - 1
    if params.stop:
        start = max(0, len(sent_text) - hold)
        hits = [(i, s) for s in params.stop if (i := full.find(s, start)) >= 0]
        if hits:
            full = full[: min(hits)[0]]
            finish_reason, finished = "stop", True
    if not finished:
        end = len(full) - hold
        while end > len(sent_text) and full[end - 1] == "\ufffd":  # incomplete UTF-8 sequence
            end -= 1
        full = full[: max(end, len(sent_text))]
    text = full[len(sent_text):] if full.startswith(sent_text) else ""
    return dataclasses.replace(item, text=text, finish_reason=finish_reason, finished=finished)
