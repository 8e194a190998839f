"""OpenAiIngress: the FastAPI deployment in front of the AttentionTier (DESIGN §2, §4).

    HTTP -> [gate: API key 401, body size 413, request counts] -> route -> validate (protocol.py, 400)
         -> plan: Heavy Mode? thinking budget, tools check, chat template (+ context management, in a thread),
            limits, SamplingParams per choice
         -> respond.py (choices: run_choice -> ChatChoiceState) | heavy_flow.py (trajectories -> aggregate)
         -> JSON or SSE

This layer (with its HTTP boundary in `errors.py`) is where status codes are decided: `ErrorResponse`
values from planning and from the tier, FastAPI validation errors (400 instead of 422), unknown
routes (404) and the gate's 401/413 all leave as OpenAI error JSON. The FastAPI app is built per
replica (`__serve_build_asgi_app__`), so routes and gate close over this replica's config instead of
module globals.

Tool calls: with `tools` and tool_choice "auto" (the default then) the tools are declared in the
prompt, K2 tool-call markup is parsed into `tool_calls`, and each call is validated against the
declarations (`serve.tool_validation`; see `choices.py`). Without tools, or with tool_choice "none", no
tools are declared (K2 Thinking has no "don't call" switch) and nothing is parsed as a tool call: any
markup the model still emits stays in `content` verbatim, as vLLM does when no tool parser runs.
Reasoning is split into `reasoning_content` in both cases.

Context management: a chat prompt over the limit (the prompt limit, or the context minus an explicit
max_tokens) is fitted with `heavy.context.fit_messages` (`serve.context`), off the event loop; the
response reports it in `context_management`. Metrics go to Ray's metrics agent (`observability.metrics`);
`/metrics` returns every node's `ray_raymoe_*`/`ray_serve_*` series plus a live snapshot of each tier
engine (`raymoe_engine_*{replica}`, read now rather than through Ray's few-second export delay).

Auth and overload: with API keys configured (config list or the env var `api_keys_env` names, read
when the replica starts), every route except `serve.public_paths` (default `/health`, for probes)
needs `Authorization: Bearer <key>`. A full AttentionTier queue (`max_queued_requests`) is answered
here as 503 or 429 with Retry-After in OpenAI JSON; a full *ingress* queue is answered by Serve's
proxy before this code runs (same status and Retry-After, plain-text body).
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import jinja2
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.exceptions import RayServeException

from raymoe.config import ServeConfig
from raymoe.engine.request import SamplingParams
from raymoe.heavy.config import HeavyPlan, resolve_heavy, resolve_thinking_budget
from raymoe.heavy.context import ContextReport, chat_token_counter, fit_messages
from raymoe.heavy.tool_validation import ToolValidator
from raymoe.observability import metrics
from raymoe.serve.choices import ChatChoiceState, TextChoiceState, TokenText, ToolCheck, call_begin_id
from raymoe.serve.errors import error_json, install_http_boundary, resolve_api_keys
from raymoe.serve.heavy_flow import respond_heavy
from raymoe.serve.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    CompletionRequest,
    CompletionResponse,
    ErrorBody,
    ErrorResponse,
    HeavyOptions,
    ModelList,
    bad_request,
)
from raymoe.serve.respond import Plan, respond
from raymoe.serve.tier import ReasoningTokens, TierClient
from raymoe.tokenizer.chat import ChatEncoder

_ERROR_DOCS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text} for code, text in (
        (400, "Invalid request"), (401, "Missing or invalid API key"), (404, "Unknown model or route"),
        (413, "Body too large"), (429, "Overloaded (when configured)"), (503, "Overloaded or engine down"),
        (500, "Server error"))}
_SSE_DOC = {"text/event-stream": {"schema": {"type": "string", "description": "`data:` chunks, then `[DONE]`"}}}
_HEAVY_PARAM = re.compile(r"heavy\.\w+")
_TOOLS_PARAM = re.compile(r"tools\[\d+\](?:\.function(?:\.\w+)?)?")

# name -> (kind, help): the live engine snapshot in /metrics, one series per tier replica
_ENGINE_SERIES = {
    "num_running": ("gauge", "Sequences in the running batch."), "num_waiting": ("gauge", "Sequences waiting."),
    "kv_cache_usage": ("gauge", "Fraction of KV-cache blocks in use."),
    "prefix_cache_hit_rate": ("gauge", "Prefix-cache hit rate."), "healthy": ("gauge", "1 while the engine runs."),
    "num_steps": ("counter", "Engine steps."), "num_generated_tokens": ("counter", "Tokens generated."),
    "num_prompt_tokens": ("counter", "Prompt tokens prefilled (prefix-cache hits excluded)."),
    "prefix_cache_queried_tokens": ("counter", "Tokens looked up in the prefix cache."),
    "prefix_cache_hit_tokens": ("counter", "Tokens found in the prefix cache."),
}


def render_engine_stats(tier_stats: list[dict[str, Any]]) -> str:
    """Prometheus text of each tier replica's engine stats, as read now (`raymoe_engine_*{replica}`)."""
    lines = ["# HELP raymoe_engine_replicas AttentionTier replicas that answered.",
             "# TYPE raymoe_engine_replicas gauge", f"raymoe_engine_replicas {float(len(tier_stats))}"]
    for key, (kind, doc) in _ENGINE_SERIES.items():
        name = f"raymoe_engine_{key}" + ("_total" if kind == "counter" else "")
        lines += [f"# HELP {name} {doc}", f"# TYPE {name} {kind}"]
        lines += [f'{name}{{replica="{stats.get("replica", "?")}"}} {float(stats[key])}'
                  for stats in tier_stats if key in stats]
    return "\n".join(lines) + "\n"


def _message_dict(message: ChatMessage) -> dict[str, Any]:
    out = message.model_dump(exclude_none=True)
    if out["role"] == "developer":  # OpenAI's newer name for system
        out["role"] = "system"
    return out


class _PromptTooLong(ValueError):
    pass


def _choice_seed(seed: int | None, index: int) -> int | None:
    """Choice i of a seeded request uses seed + i, so n > 1 choices differ yet replay exactly."""
    if seed is None:
        return None
    return seed + index if seed + index < 2**63 else seed - index


@serve.deployment(name="OpenAiIngress")
@serve.ingress()
class OpenAiIngress:
    """OpenAI-compatible HTTP front; CPU only, autoscaled separately from the tier.

    Args:
        tier: handle of the `AttentionTier` deployment.
        config: the `serve` subtree (limits, API keys, resubmission policy, Heavy Mode, budgets, ...).
    """

    async def __init__(self, tier: Any, config: ServeConfig):
        self.config = config
        attention = config.attention
        self.client = TierClient(tier, max_resubmits=config.max_resubmits, retry_after_s=attention.retry_after_s,
                                 backpressure_status_code=attention.backpressure_status_code,
                                 on_resubmit=lambda: metrics.inc("raymoe_resubmissions_total"))
        self.info = await self.client.model_info()  # waits for the first tier replica: ready = model loaded
        self.tokenizer = self.info.tokenizer
        self.client.reasoning_tokens = ReasoningTokens.from_tokenizer(self.tokenizer)
        self.encoder = ChatEncoder(self.tokenizer)
        self.encode_lock = threading.Lock()  # the encoder runs in worker threads; one at a time
        self.token_text = TokenText(self.tokenizer)
        self.call_begin_id = call_begin_id(self.tokenizer)
        self.api_keys = resolve_api_keys(config)
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except RayServeException:  # constructed outside a Serve replica
            self.replica_id = "local"
        self.num_in_flight = 0

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self)

    # -- endpoints ------------------------------------------------------------------------------------
    async def chat(self, body: ChatCompletionRequest) -> Response:
        plan = await self._plan_chat(body)
        if isinstance(plan, ErrorResponse):
            return error_json(plan)
        return await (respond_heavy(self, plan) if plan.heavy is not None else respond(self, plan))

    async def completions(self, body: CompletionRequest) -> Response:
        plan = self._plan_text(body)
        return error_json(plan) if isinstance(plan, ErrorResponse) else await respond(self, plan)

    def models(self) -> dict[str, Any]:
        card = {"id": self.info.model_name, "object": "model", "created": self.info.created, "owned_by": "raymoe",
                "max_model_len": self.info.max_model_len}
        cards = [card]
        if self.config.heavy.enabled:
            cards.append({**card, "id": self.info.model_name + self.config.heavy.model_alias_suffix})
        return {"object": "list", "data": cards}

    async def health(self) -> Response:
        if await self.client.is_healthy():
            return JSONResponse({"status": "ok"})
        return error_json(ErrorResponse("the engine is not healthy", "service_unavailable_error", 503,
                                        retry_after_s=self.config.attention.retry_after_s))

    async def metrics_text(self) -> Response:
        cluster, stats = await asyncio.gather(asyncio.to_thread(metrics.scrape_cluster), self.client.stats())
        return Response(cluster + render_engine_stats(stats), media_type="text/plain; version=0.0.4; charset=utf-8")

    # -- request accounting (respond.py, heavy_flow.py) -----------------------------------------------
    def request_started(self) -> None:
        self.num_in_flight += 1
        metrics.set_gauge("raymoe_requests_in_flight", self.num_in_flight, replica=self.replica_id)

    def request_finished(self) -> None:
        self.num_in_flight -= 1
        metrics.set_gauge("raymoe_requests_in_flight", self.num_in_flight, replica=self.replica_id)

    async def encode_chat(self, messages: list[dict], tools: list[dict] | None,
                          max_prompt_tokens: int | None = None) -> tuple[list[int], list[dict], ContextReport | None]:
        """Prompt ids in a worker thread (a 300-turn render takes tens of ms): fitted to `max_prompt_tokens`
        by context management when given and the strategy is 'truncate'.

        Raises:
            ValueError: malformed messages; `_PromptTooLong` when context management cannot fit the prompt.
        """
        def work() -> tuple[list[int], list[dict], ContextReport | None]:
            with self.encode_lock:
                ids = self.encoder.encode_messages(messages, tools)
                if max_prompt_tokens is None or len(ids) <= max_prompt_tokens or \
                        self.config.context.strategy == "error":  # 'error': the limit checks answer 400
                    return ids, messages, None
                try:
                    fitted, report = fit_messages(messages, tools, chat_token_counter(self.encoder),
                                                  max_prompt_tokens, self.config.context)
                except ValueError as e:
                    raise _PromptTooLong(str(e)) from None
                return self.encoder.encode_messages(fitted, tools), fitted, report

        return await asyncio.to_thread(work)

    # -- planning -------------------------------------------------------------------------------------
    def _check_model(self, model: str | None) -> ErrorResponse | None:
        if model is None or model == self.info.model_name:
            return None
        return ErrorResponse(f"model {model!r} does not exist; this server serves {self.info.model_name!r}",
                             "not_found_error", 404, "model", "model_not_found")

    def _resolve_heavy(self, body: ChatCompletionRequest) -> HeavyPlan | None | ErrorResponse:
        served = self.info.model_name
        field = body.heavy.model_dump(exclude_none=True) if isinstance(body.heavy, HeavyOptions) else None
        try:
            heavy = resolve_heavy(field, body.model or served, self.config.heavy, served)
        except ValueError as e:
            m = _HEAVY_PARAM.match(str(e))
            return bad_request(str(e), m.group() if m else ("heavy" if body.heavy is not None else "model"))
        if heavy is not None and body.n > 1:
            return bad_request(f"Heavy Mode returns one aggregated answer: n must be 1, not {body.n}", "n")
        if heavy is not None and body.tools:
            return bad_request("Heavy Mode does not support tools (trajectories would act on them independently)",
                               "tools")
        return heavy

    async def _plan_chat(self, body: ChatCompletionRequest) -> Plan | ErrorResponse:
        heavy = self._resolve_heavy(body)
        if isinstance(heavy, ErrorResponse):
            return heavy
        if err := self._check_model(heavy.model if heavy else body.model):
            return err
        if body.tool_choice is not None and body.tool_choice not in ("none", "auto"):
            return bad_request("tool_choice must be 'auto' or 'none' (required/named choices are not supported)",
                               "tool_choice")
        if body.top_logprobs is not None and not body.logprobs:
            return bad_request("top_logprobs needs logprobs=true", "top_logprobs")
        declared = [t.model_dump(exclude_none=True) for t in body.tools or []]
        try:
            validator = ToolValidator(declared) if declared else None
        except ValueError as e:
            m = _TOOLS_PARAM.match(str(e))
            return bad_request(str(e), m.group() if m else "tools")
        parse_tools = bool(declared) and body.tool_choice != "none"
        tools = declared if parse_tools else None
        budget = self._thinking_budget(body)
        if isinstance(budget, ErrorResponse):
            return budget
        max_tokens, param = ((body.max_completion_tokens, "max_completion_tokens") if body.max_completion_tokens
                             else (body.max_tokens, "max_tokens"))
        try:
            ids, messages, report = await self.encode_chat([_message_dict(m) for m in body.messages], tools,
                                                           self._prompt_budget(max_tokens))
        except _PromptTooLong as e:
            return bad_request(str(e), "messages", "context_length_exceeded")
        except (ValueError, jinja2.TemplateError) as e:
            return bad_request(str(e), "messages")
        top = (body.top_logprobs or 0) if body.logprobs else None
        n = heavy.trajectories if heavy else body.n
        logprobs = top if heavy is None else (top or 0)  # Heavy: chosen-token logprobs for ties and best_logprob
        params = self._params(body, len(ids), max_tokens, param, "messages", logprobs, self.encoder.stop_token_ids,
                              n, budget, check_n=heavy is None)
        if isinstance(params, ErrorResponse):
            return params
        check = None
        if validator is not None and parse_tools and self.config.tool_validation.enabled:
            check = ToolCheck(validator, self.config.tool_validation, self.call_begin_id, params[0].max_tokens)

        def make_state(i: int) -> ChatChoiceState:
            return ChatChoiceState(i, parse_tools, top, self.token_text, body.return_token_ids, check)

        return Plan("chat", f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), [ids], params, [0] * n,
                    body.stream, bool(body.stream_options and body.stream_options.include_usage),
                    body.return_token_ids, make_state, heavy, messages, report, self.config.context.strategy)

    def _thinking_budget(self, body: Any) -> int | None | ErrorResponse:
        try:
            return resolve_thinking_budget(body.reasoning_effort, body.thinking_budget, self.config.reasoning)
        except ValueError as e:
            return bad_request(str(e), "thinking_budget" if body.thinking_budget is not None else "reasoning_effort")

    def _prompt_budget(self, max_tokens: int | None) -> int:
        """Most prompt tokens: the prompt limit, and room for an explicit (valid) max_tokens."""
        limits, context = self.config.limits, self.info.max_model_len
        budget = min(limits.max_prompt_tokens or context, context - 1)
        if max_tokens is not None and max_tokens <= limits.max_tokens and context - max_tokens >= 1:
            budget = min(budget, context - max_tokens)
        return budget

    def _plan_text(self, body: CompletionRequest) -> Plan | ErrorResponse:
        if err := self._check_model(body.model):
            return err
        for name, unsupported in (("echo", body.echo), ("suffix", body.suffix)):
            if unsupported:
                return bad_request(f"{name} is not supported", name)
        if body.best_of is not None and body.best_of != body.n:
            return bad_request(f"best_of ({body.best_of}) must equal n ({body.n}): no server-side ranking", "best_of")
        budget = self._thinking_budget(body)
        if isinstance(budget, ErrorResponse):
            return budget
        prompts = self._prompt_ids(body.prompt)
        if isinstance(prompts, ErrorResponse):
            return prompts
        if len(prompts) * body.n > self.config.limits.max_n:
            return bad_request(f"{len(prompts)} prompts x n={body.n} choices exceed the limit of "
                               f"{self.config.limits.max_n}", "n")
        params: list[SamplingParams] = []
        for ids in prompts:
            p = self._params(body, len(ids), body.max_tokens, "max_tokens", "prompt", body.logprobs, [], body.n,
                             budget)
            if isinstance(p, ErrorResponse):
                return p
            params += p

        def make_state(i: int) -> TextChoiceState:
            return TextChoiceState(i, body.logprobs, self.token_text, body.return_token_ids)

        return Plan("text", f"cmpl-{uuid.uuid4().hex}", int(time.time()), prompts, params,
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
                logprobs: int | None, stop_token_ids: list[int], n: int, thinking_budget: int | None = None,
                check_n: bool = True) -> list[SamplingParams] | ErrorResponse:
        limits, context = self.config.limits, self.info.max_model_len
        if check_n and n > limits.max_n:
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
                max_tokens=max_tokens, min_tokens=body.min_tokens, stop=stop, ignore_eos=body.ignore_eos,
                # ignore_eos means every end-of-turn id (vLLM treats generation_config's eos list alike)
                stop_token_ids=[] if body.ignore_eos else list(stop_token_ids),
                logprobs=logprobs, repetition_penalty=body.repetition_penalty or 1.0,
                presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
                skip_special_tokens=body.skip_special_tokens, thinking_budget=thinking_budget) for i in range(n)]
        except ValueError as e:
            return bad_request(str(e))


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
    async def metrics_route() -> Response:
        return await ingress.metrics_text()

    install_http_boundary(app, ingress)
    app.openapi = _openapi_with_model(app, ingress.info.model_name)  # type: ignore[method-assign]
    return app
