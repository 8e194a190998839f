"""OpenAiIngress: the FastAPI deployment in front of the AttentionTier (DESIGN §2, §4).

    HTTP -> [gate: API key 401, body size 413, request metrics] -> route -> validate (protocol.py, 400)
         -> chat template / tokenize -> plan (limits, SamplingParams per choice)
         -> TierClient.stream() per choice -> ChatChoiceState (K2 reasoning/tool parsing) -> JSON or SSE

This layer (with its HTTP boundary in `errors.py`) is where status codes are decided: `ErrorResponse`
values from planning and from the tier, FastAPI validation errors (400 instead of 422), unknown
routes (404) and the gate's 401/413 all leave as OpenAI error JSON. The FastAPI app is built per
replica (`__serve_build_asgi_app__`), so routes and gate close over this replica's config instead of
module globals.

Tool calls: with `tools` and tool_choice "auto" (the default then) the tools are declared in the
prompt and K2 tool-call markup is parsed into `tool_calls`. Without tools, or with tool_choice
"none", no tools are declared (K2 Thinking has no "don't call" switch) and nothing is parsed as a
tool call: any markup the model still emits stays in `content` verbatim, as vLLM does when no tool
parser runs. Reasoning is split into `reasoning_content` in both cases.

Auth and overload: with API keys configured (config list or the env var `api_keys_env` names, read
when the replica starts), every route except `serve.public_paths` (default `/health`, for probes)
needs `Authorization: Bearer <key>`. A full AttentionTier queue (`max_queued_requests`) is answered
here as 503 or 429 with Retry-After in OpenAI JSON; a full *ingress* queue is answered by Serve's
proxy before this code runs (same status and Retry-After, plain-text body).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import jinja2
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from ray import serve

from raymoe.config import ServeConfig
from raymoe.engine.request import SamplingParams
from raymoe.serve.errors import error_json, install_http_boundary, resolve_api_keys
from raymoe.serve.protocol import (
    ChatChoiceState,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    CompletionRequest,
    CompletionResponse,
    ErrorBody,
    ErrorResponse,
    ModelList,
    TextChoiceState,
    TokenText,
    bad_request,
    usage,
)
from raymoe.serve.tier import TierClient, TierOutput
from raymoe.tokenizer.chat import ChatEncoder

_ERROR_DOCS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text} for code, text in (
        (400, "Invalid request"), (401, "Missing or invalid API key"), (404, "Unknown model or route"),
        (413, "Body too large"), (429, "Overloaded (when configured)"), (503, "Overloaded or engine down"),
        (500, "Server error"))}
_SSE_DOC = {"text/event-stream": {"schema": {"type": "string", "description": "`data:` chunks, then `[DONE]`"}}}


# -- metrics ------------------------------------------------------------------------------------------
class IngressMetrics:
    """This ingress replica's request metrics, in a private registry (no process-global state)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("raymoe_http_requests", "HTTP requests by route, method and status.",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("raymoe_http_request_duration_seconds", "Request latency to the last byte.",
                                 ["route"], registry=r,
                                 buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        self.ttft = Histogram("raymoe_time_to_first_token_seconds", "Ingress arrival to first generated token.",
                              registry=r, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.prompt_tokens = Counter("raymoe_prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = Counter("raymoe_generation_tokens", "Generated tokens.", registry=r)
        self.resubmissions = Counter("raymoe_resubmissions", "Requests re-submitted after a tier replica died.",
                                     registry=r)
        self.in_flight = Gauge("raymoe_requests_in_flight", "Generation requests being served.", registry=r)


_ENGINE_GAUGES = {"num_running": "Sequences in the running batch.", "num_waiting": "Sequences waiting.",
                  "kv_cache_usage": "Fraction of KV-cache blocks in use.",
                  "prefix_cache_hit_rate": "Prefix-cache hit rate.", "healthy": "1 while the engine loop runs."}
_ENGINE_COUNTERS = {"num_steps": "Engine steps.", "num_generated_tokens": "Tokens generated by the engine.",
                    "num_prompt_tokens": "Prompt tokens prefilled.",
                    "prefix_cache_queried_tokens": "Tokens looked up in the prefix cache.",
                    "prefix_cache_hit_tokens": "Tokens found in the prefix cache."}


class _Families:
    def __init__(self, families: list[Any]):
        self.families = families

    def collect(self) -> list[Any]:
        return self.families


def render_metrics(metrics: IngressMetrics, tier_stats: list[dict[str, Any]]) -> bytes:
    """The /metrics body (Prometheus text): this ingress's request metrics, then every tier replica's engine.

    One function on purpose: later metrics (per-shard dispatch latency, expert load, Heavy Mode
    fan-out) are added here.
    """
    families: list[Any] = [GaugeMetricFamily("raymoe_engine_replicas", "AttentionTier replicas that answered.",
                                             value=len(tier_stats))]
    for table, kind in ((_ENGINE_GAUGES, GaugeMetricFamily), (_ENGINE_COUNTERS, CounterMetricFamily)):
        for key, doc in table.items():
            family = kind(f"raymoe_engine_{key}", doc, labels=["replica"])
            for stats in tier_stats:
                if key in stats:
                    family.add_metric([str(stats.get("replica", "?"))], float(stats[key]))
            families.append(family)
    return generate_latest(metrics.registry) + generate_latest(_Families(families))  # type: ignore[arg-type]


# -- planning -----------------------------------------------------------------------------------------
@dataclass
class _Plan:
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


def _message_dict(message: ChatMessage) -> dict[str, Any]:
    out = message.model_dump(exclude_none=True)
    if out["role"] == "developer":  # OpenAI's newer name for system
        out["role"] = "system"
    return out


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


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


@serve.deployment(name="OpenAiIngress")
@serve.ingress()
class OpenAiIngress:
    """OpenAI-compatible HTTP front; CPU only, autoscaled separately from the tier.

    Args:
        tier: handle of the `AttentionTier` deployment.
        config: the `serve` subtree (limits, API keys, resubmission policy).
    """

    async def __init__(self, tier: Any, config: ServeConfig):
        self.config = config
        self.metrics = IngressMetrics()
        attention = config.attention
        self.client = TierClient(tier, max_resubmits=config.max_resubmits, retry_after_s=attention.retry_after_s,
                                 backpressure_status_code=attention.backpressure_status_code,
                                 on_resubmit=self.metrics.resubmissions.inc)
        self.info = await self.client.model_info()  # waits for the first tier replica: ready = model loaded
        self.tokenizer = self.info.tokenizer
        self.encoder = ChatEncoder(self.tokenizer)
        self.token_text = TokenText(self.tokenizer)
        self.api_keys = resolve_api_keys(config)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self)

    # -- endpoints ------------------------------------------------------------------------------------
    async def chat(self, body: ChatCompletionRequest) -> Response:
        plan = self._plan_chat(body)
        return error_json(plan) if isinstance(plan, ErrorResponse) else await self._respond(plan)

    async def completions(self, body: CompletionRequest) -> Response:
        plan = self._plan_text(body)
        return error_json(plan) if isinstance(plan, ErrorResponse) else await self._respond(plan)

    def models(self) -> dict[str, Any]:
        card = {"id": self.info.model_name, "object": "model", "created": self.info.created, "owned_by": "raymoe",
                "max_model_len": self.info.max_model_len}
        return {"object": "list", "data": [card]}

    async def health(self) -> Response:
        if await self.client.is_healthy():
            return JSONResponse({"status": "ok"})
        return error_json(ErrorResponse("the engine is not healthy", "service_unavailable_error", 503,
                                        retry_after_s=self.config.attention.retry_after_s))

    async def metrics_text(self) -> Response:
        body = render_metrics(self.metrics, await self.client.stats())
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    # -- planning -------------------------------------------------------------------------------------
    def _check_model(self, model: str | None) -> ErrorResponse | None:
        if model is None or model == self.info.model_name:
            return None
        return ErrorResponse(f"model {model!r} does not exist; this server serves {self.info.model_name!r}",
                             "not_found_error", 404, "model", "model_not_found")

    def _plan_chat(self, body: ChatCompletionRequest) -> _Plan | ErrorResponse:
        if err := self._check_model(body.model):
            return err
        if body.tool_choice is not None and body.tool_choice not in ("none", "auto"):
            return bad_request("tool_choice must be 'auto' or 'none' (required/named choices are not supported)",
                               "tool_choice")
        if body.top_logprobs is not None and not body.logprobs:
            return bad_request("top_logprobs needs logprobs=true", "top_logprobs")
        parse_tools = bool(body.tools) and body.tool_choice != "none"
        tools = [t.model_dump(exclude_none=True) for t in body.tools or []] if parse_tools else None
        try:
            ids = self.encoder.encode_messages([_message_dict(m) for m in body.messages], tools)
        except (ValueError, jinja2.TemplateError) as e:
            return bad_request(str(e), "messages")
        max_tokens, param = ((body.max_completion_tokens, "max_completion_tokens") if body.max_completion_tokens
                             else (body.max_tokens, "max_tokens"))
        top = (body.top_logprobs or 0) if body.logprobs else None
        params = self._params(body, len(ids), max_tokens, param, "messages", top, self.encoder.stop_token_ids,
                              body.n)
        if isinstance(params, ErrorResponse):
            return params

        def make_state(i: int) -> ChatChoiceState:
            return ChatChoiceState(i, parse_tools, top, self.token_text, body.return_token_ids)

        return _Plan("chat", f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), [ids], params, [0] * body.n,
                     body.stream, bool(body.stream_options and body.stream_options.include_usage),
                     body.return_token_ids, make_state)

    def _plan_text(self, body: CompletionRequest) -> _Plan | ErrorResponse:
        if err := self._check_model(body.model):
            return err
        for name, unsupported in (("echo", body.echo), ("suffix", body.suffix)):
            if unsupported:
                return bad_request(f"{name} is not supported", name)
        if body.best_of is not None and body.best_of != body.n:
            return bad_request(f"best_of ({body.best_of}) must equal n ({body.n}): no server-side ranking", "best_of")
        prompts = self._prompt_ids(body.prompt)
        if isinstance(prompts, ErrorResponse):
            return prompts
        if len(prompts) * body.n > self.config.limits.max_n:
            return bad_request(f"{len(prompts)} prompts x n={body.n} choices exceed the limit of "
                               f"{self.config.limits.max_n}", "n")
        params: list[SamplingParams] = []
        for ids in prompts:
            p = self._params(body, len(ids), body.max_tokens, "max_tokens", "prompt", body.logprobs, [], body.n)
            if isinstance(p, ErrorResponse):
                return p
            params += p

        def make_state(i: int) -> TextChoiceState:
            return TextChoiceState(i, body.logprobs, self.token_text, body.return_token_ids)

        return _Plan("text", f"cmpl-{uuid.uuid4().hex}", int(time.time()), prompts, params,
                     [i // body.n for i in range(len(params))], body.stream,
                     bool(body.stream_options and body.stream_options.include_usage), body.return_token_ids,
                     make_state)

    def _prompt_ids(self, prompt: str | list) -> list[list[int]] | ErrorResponse:
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            return bad_request("prompt must not be empty", "prompt")
        if isinstance(prompt[0], int):
            prompt = [prompt]
        prompts = [list(self.tokenizer.encode(p, add_special_tokens=False)) if isinstance(p, str) else list(p)
                   for p in prompt]
        vocab = self.info.vocab_size
        for ids in prompts:
            if not ids:
                return bad_request("prompt must not be empty", "prompt")
            if (bad := next((t for t in ids if not 0 <= t < vocab), None)) is not None:
                return bad_request(f"prompt token id {bad} is outside the vocabulary [0, {vocab})", "prompt")
        return prompts

    def _params(self, body: Any, prompt_len: int, max_tokens: int | None, max_param: str, prompt_param: str,
                logprobs: int | None, stop_token_ids: list[int], n: int) -> list[SamplingParams] | ErrorResponse:
        limits, context = self.config.limits, self.info.max_model_len
        if n > limits.max_n:
            return bad_request(f"n ({n}) exceeds the limit of {limits.max_n}", "n")
        max_prompt = min(limits.max_prompt_tokens or context, context - 1)
        if prompt_len > max_prompt:
            return bad_request(f"the prompt has {prompt_len} tokens, more than the limit of {max_prompt}",
                               prompt_param, "context_length_exceeded")
        room = context - prompt_len
        if max_tokens is None:
            max_tokens = min(limits.default_max_tokens, room)
        elif max_tokens > limits.max_tokens:
            return bad_request(f"{max_param} ({max_tokens}) exceeds the limit of {limits.max_tokens}", max_param)
        elif max_tokens > room:
            return bad_request(f"this model's context is {context} tokens: the prompt has {prompt_len} and "
                               f"{max_param} asks for {max_tokens}", max_param, "context_length_exceeded")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        temperature = self.config.default_temperature if body.temperature is None else body.temperature
        try:
            return [SamplingParams(
                temperature=temperature, top_p=1.0 if body.top_p is None else body.top_p,
                top_k=body.top_k or 0, min_p=body.min_p or 0.0, seed=_choice_seed(body.seed, i),
                max_tokens=max_tokens, stop=stop, stop_token_ids=list(stop_token_ids), ignore_eos=body.ignore_eos,
                logprobs=logprobs, repetition_penalty=body.repetition_penalty or 1.0,
                presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
                skip_special_tokens=body.skip_special_tokens) for i in range(n)]
        except ValueError as e:
            return bad_request(str(e))

    # -- answering ------------------------------------------------------------------------------------
    async def _respond(self, plan: _Plan) -> Response:
        states = [plan.make_state(i) for i in range(len(plan.params))]
        events = merge_streams([
            self.client.stream(f"{plan.request_id}-{i}", plan.prompts[plan.prompt_of[i]], p, self.tokenizer)
            for i, p in enumerate(plan.params)])
        tally = _Tally(time.perf_counter(), len(plan.params))
        self.metrics.in_flight.inc()
        if plan.stream:
            # Wait for the first item before answering, so a refused request still gets its status code.
            try:
                first = await anext(events, None)
            except BaseException:  # the client left while we waited
                await self._finish(events, plan, tally)
                raise
            if first is not None and isinstance(first[1], ErrorResponse):
                await self._finish(events, plan, tally)
                return error_json(first[1])
            return StreamingResponse(self._stream(plan, states, first, events, tally), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            async for index, item in events:
                if isinstance(item, ErrorResponse):
                    return error_json(item)
                tally.observe(self.metrics, index, item)
                states[index].update(item.token_ids, item.text, item.logprobs, item.finished, item.finish_reason)
        finally:
            await self._finish(events, plan, tally)
        body: dict[str, Any] = {
            "id": plan.request_id, "object": "chat.completion" if plan.kind == "chat" else "text_completion",
            "created": plan.created, "model": self.info.model_name,
            "choices": [s.message() if isinstance(s, ChatChoiceState) else s.final() for s in states],
            "usage": self._usage(plan, states, tally)}
        if plan.return_token_ids:
            body["prompt_token_ids"] = plan.prompts[0] if plan.kind == "chat" else plan.prompts
        return JSONResponse(body)

    async def _stream(self, plan: _Plan, states: list, first: tuple[int, Any] | None,
                      events: AsyncIterator[tuple[int, Any]], tally: _Tally) -> AsyncIterator[bytes]:
        chat = plan.kind == "chat"
        head = {"id": plan.request_id, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": plan.created, "model": self.info.model_name}
        tail = {"usage": None} if plan.include_usage else {}
        try:
            if chat:
                for s in states:
                    choice = {"index": s.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}
                    extra = {"prompt_token_ids": plan.prompts[0]} if plan.return_token_ids and s.index == 0 else {}
                    yield _sse({**head, "choices": [choice], **tail, **extra})
            pending = [first] if first is not None else []
            failed = False
            while True:
                item_pair = pending.pop() if pending else await anext(events, None)
                if item_pair is None:
                    break
                index, item = item_pair
                if isinstance(item, ErrorResponse):  # mid-stream: the status is sent already
                    yield _sse(item.to_dict())
                    failed = True
                    break
                tally.observe(self.metrics, index, item)
                choice = states[index].update(item.token_ids, item.text, item.logprobs, item.finished,
                                              item.finish_reason)
                if choice is not None:
                    yield _sse({**head, "choices": [choice], **tail})
            if plan.include_usage and not failed:
                yield _sse({**head, "choices": [], "usage": self._usage(plan, states, tally)})
            yield b"data: [DONE]\n\n"
        finally:
            await self._finish(events, plan, tally)

    async def _finish(self, events: Any, plan: _Plan, tally: _Tally) -> None:
        await events.aclose()
        if not tally.closed:
            tally.closed = True
            self.metrics.in_flight.dec()
            self.metrics.prompt_tokens.inc(sum(len(p) for p in plan.prompts))
            self.metrics.generation_tokens.inc(sum(tally.num_tokens))

    def _usage(self, plan: _Plan, states: list, tally: _Tally) -> dict[str, Any]:
        # n choices share one prompt: it is counted once, as OpenAI does.
        prompt_tokens = sum(len(p) for p in plan.prompts)
        cached = sum(tally.cached[i] for i in range(len(states)) if i == 0 or plan.prompt_of[i] != plan.prompt_of[i - 1])
        return usage(prompt_tokens, sum(len(s.token_ids) for s in states), cached)


@dataclass
class _Tally:
    start: float
    num_choices: int
    closed: bool = False
    first_token: bool = False

    def __post_init__(self) -> None:
        self.cached = [0] * self.num_choices
        self.num_tokens = [0] * self.num_choices

    def observe(self, metrics: IngressMetrics, index: int, item: TierOutput) -> None:
        self.cached[index] = max(self.cached[index], item.num_cached_tokens)
        self.num_tokens[index] += len(item.token_ids)
        if item.token_ids and not self.first_token:
            self.first_token = True
            metrics.ttft.observe(time.perf_counter() - self.start)


def _choice_seed(seed: int | None, index: int) -> int | None:
    """Choice i of a seeded request uses seed + i, so n > 1 choices differ yet replay exactly."""
    if seed is None:
        return None
    return seed + index if seed + index < 2**63 else seed - index


def _openapi_with_model(app: FastAPI, model_name: str) -> Callable[[], dict[str, Any]]:
    """The generated schema, with `model` pinned to the served id (so fuzzers reach the engine)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            for name in ("ChatCompletionRequest", "CompletionRequest"):
                props = schema.get("components", {}).get("schemas", {}).get(name, {}).get("properties", {})
                if "model" in props:
                    props["model"] = {"anyOf": [{"type": "string", "enum": [model_name]}, {"type": "null"}],
                                      "title": "Model", "description": props["model"].get("description", "")}
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi


def create_app(ingress: OpenAiIngress) -> FastAPI:
    """The FastAPI app of one ingress replica."""
    from raymoe import __version__

    app = FastAPI(title="raymoe", version=__version__, redoc_url=None,
                  description="OpenAI-compatible API for Kimi K2 Thinking / DeepSeek-V3 MoE models.")

    @app.post("/v1/chat/completions", response_model=None, tags=["openai"],
              responses={200: {"model": ChatCompletionResponse, "content": _SSE_DOC}, **_ERROR_DOCS})
    async def chat_completions(body: ChatCompletionRequest) -> Response:
        return await ingress.chat(body)

    @app.post("/v1/completions", response_model=None, tags=["openai"],
              responses={200: {"model": CompletionResponse, "content": _SSE_DOC}, **_ERROR_DOCS})
    async def completions(body: CompletionRequest) -> Response:
        return await ingress.completions(body)

    @app.get("/v1/models", response_model=ModelList, tags=["openai"], responses={401: _ERROR_DOCS[401]})
    async def models() -> dict[str, Any]:
        return ingress.models()

    @app.get("/health", tags=["ops"], responses={200: {"description": "The tier answered healthy"},
                                                 503: _ERROR_DOCS[503]})
    async def health() -> Response:
        return await ingress.health()

    @app.get("/metrics", tags=["ops"], response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}, 401: _ERROR_DOCS[401]})
    async def metrics() -> Response:
        return await ingress.metrics_text()

    install_http_boundary(app, ingress)
    app.openapi = _openapi_with_model(app, ingress.info.model_name)  # type: ignore[method-assign]
    return app
