"""Locust workload for OpenAI-compatible chat servers: raymoe, and peers such as `transformers serve`.

    [Workload: lengths from a distribution or a JSONL file] -> user task -> POST /v1/chat/completions
        -> SSE chunks timed on arrival -> locust events (ttft/tpot/itl/e2el) + one JSONL record per request

Users: `ChatStreamUser` (SSE, gives TTFT/ITL/TPOT), `ChatUser` (one JSON answer: E2EL only) and
`HeavyUser` (Heavy Mode: the `heavy` field or the `<model>-heavy` alias). Name them on the command
line (`locust ... ChatStreamUser ChatUser`); with none named, all three run in the 3:1:1 weights below. Run locust as its own process
(`raymoe loadtest`, `loadtest/run.sh`): it monkey-patches ssl, which breaks once Ray is imported.

Exact percentiles and goodput come from the JSONL records (`loadtest/summary.py`); locust's own
table rounds response times to whole milliseconds and buckets them above 100 ms.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

import requests
from locust import User, events, task
from locust.env import Environment
from locust.runners import WorkerRunner

CHAT_PATH = "/v1/chat/completions"
_WORDS = (
    "time year people way day man thing woman life child world school state family student group country "
    "problem hand part place case week company system program question work government number night point "
    "home water room mother area money story fact month lot right study book eye job word business issue "
    "side kind head house service friend father power hour game line end member law car city community name "
    "president team minute idea kid body information back parent face others level office door health person "
    "art war history party result change morning reason research girl guy moment air teacher force education"
).split()


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    g = parser  # locust's own parser: an argument group would lose its web-UI options
    g.add_argument("--model", default="auto", help="model id to send; 'auto' = first of /v1/models; 'none' = omit")
    g.add_argument("--prompt-tokens", type=int, default=128, help="mean prompt length in tokens (user text only)")
    g.add_argument("--output-tokens", type=int, default=128, help="mean output length (max_tokens, forced)")
    g.add_argument("--dist", default="fixed", choices=["fixed", "uniform", "normal", "exponential"],
                   help="length distribution of prompt and output tokens around their means")
    g.add_argument("--dist-spread", type=float, default=0.5,
                   help="uniform: +-spread*mean; normal: stddev = spread*mean")
    g.add_argument("--prompts-file", default="",
                   help="JSONL of real prompts: {prompt|text|messages|conversations, [output_tokens]} per line")
    g.add_argument("--tokenizer", default="", help="folder or tokenizer.json for exact prompt lengths")
    g.add_argument("--api-flavor", default="raymoe", choices=["raymoe", "vllm", "transformers", "openai"],
                   help="how output length is forced: ignore_eos+min_tokens (raymoe, vllm), "
                        "generation_config.min_new_tokens (transformers), max_tokens only (openai)")
    g.add_argument("--temperature", type=float, default=-1.0, help="sent when >= 0 (0 = greedy)")
    g.add_argument("--api-key", default=os.environ.get("RAYMOE_API_KEY", ""), is_secret=True)
    g.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    g.add_argument("--qps", type=float, default=0.0,
                   help="fixed total request rate shared by all users (0 = closed loop, no waiting)")
    g.add_argument("--qps-dist", default="poisson", choices=["poisson", "constant"])
    g.add_argument("--heavy-trajectories", type=int, default=8)
    g.add_argument("--heavy-aggregate", default="vote", choices=["vote", "reflect", "best_logprob"])
    g.add_argument("--heavy-via", default="field", choices=["field", "alias"],
                   help="select Heavy Mode with the `heavy` request field or the `<model>-heavy` alias")
    g.add_argument("--heavy-stream", action="store_true", help="stream Heavy Mode answers")
    g.add_argument("--request-log", default="",
                   help="JSONL file of per-request records (default: <--csv prefix>_requests.jsonl)")
    g.add_argument("--seed", type=int, default=0)


# -- workload -------------------------------------------------------------------------------------
def sample_length(rng: random.Random, mean: int, dist: str, spread: float) -> int:
    if dist == "uniform":
        n = rng.uniform(mean * (1 - spread), mean * (1 + spread))
    elif dist == "normal":
        n = rng.gauss(mean, mean * spread)
    elif dist == "exponential":
        n = rng.expovariate(1.0 / mean)
    else:
        n = mean
    return max(1, round(n))


def _load_prompts(path: str) -> list[tuple[list[dict[str, Any]], int | None]]:
    """(messages, output_tokens or None) per JSONL line."""
    items = []
    with open(path, encoding="utf-8") as f:
        for num, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "messages" in row:
                messages = row["messages"]
            elif "conversations" in row:  # ShareGPT: the first human turn
                turn = next(t for t in row["conversations"] if t.get("from") in ("human", "user"))
                messages = [{"role": "user", "content": turn["value"]}]
            elif "prompt" in row or "text" in row:
                messages = [{"role": "user", "content": row.get("prompt", row.get("text"))}]
            else:
                raise ValueError(f"{path}:{num}: expected one of prompt, text, messages, conversations")
            out = row.get("output_tokens", row.get("max_tokens"))
            items.append((messages, int(out) if out else None))
    if not items:
        raise ValueError(f"{path}: no prompts")
    return items


def _load_tokenizer(path: str) -> Any:
    if not path:
        return None
    from tokenizers import Tokenizer

    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    return Tokenizer.from_file(file)


@dataclass
class Workload:
    """Everything a user needs to build requests; made once per locust process at test start."""

    opts: Any
    host: str
    model: str | None
    headers: dict[str, str]
    prompts: list[tuple[list[dict[str, Any]], int | None]] = field(default_factory=list)
    tokenizer: Any = None
    log: Any = None  # open JSONL file, or None
    num_aborted: int = 0  # requests cut off when the run stopped: no record, not counted anywhere

    def messages(self, rng: random.Random) -> tuple[list[dict[str, Any]], int]:
        """A prompt and the output length to force."""
        o = self.opts
        out = sample_length(rng, o.output_tokens, o.dist, o.dist_spread)
        if self.prompts:
            messages, file_out = rng.choice(self.prompts)
            return messages, file_out or out
        n = sample_length(rng, o.prompt_tokens, o.dist, o.dist_spread)
        if self.tokenizer is None:  # ~1.3 tokens per English word (no tokenizer given: approximate)
            text = " ".join(rng.choice(_WORDS) for _ in range(max(1, round(n / 1.3))))
        else:
            words = " ".join(rng.choice(_WORDS) for _ in range(n))  # >= n tokens: every word is >= 1 token
            text = self.tokenizer.decode(self.tokenizer.encode(words, add_special_tokens=False).ids[:n])
        return [{"role": "user", "content": text}], out

    def body(self, messages: list[dict[str, Any]], max_tokens: int, stream: bool, model: str | None) -> dict:
        o = self.opts
        body: dict[str, Any] = {"messages": messages, "max_tokens": max_tokens, "stream": stream}
        if model:
            body["model"] = model
        if stream and o.api_flavor != "transformers":  # transformers serve sends usage anyway
            body["stream_options"] = {"include_usage": True}
        if o.api_flavor in ("raymoe", "vllm"):  # unknown fields are ignored by raymoe (extra="ignore")
            body.update(ignore_eos=True, min_tokens=max_tokens)
        elif o.api_flavor == "transformers":  # it rejects unknown fields (422): force through generation_config
            body["generation_config"] = json.dumps({"max_new_tokens": max_tokens, "min_new_tokens": max_tokens,
                                                    "do_sample": o.temperature != 0})
        if o.temperature >= 0:
            body["temperature"] = o.temperature
        return body

    def record(self, rec: dict[str, Any]) -> None:
        if self.log is not None:
            self.log.write(json.dumps(rec, separators=(",", ":")) + "\n")


@events.test_start.add_listener
def _on_start(environment: Environment, **_: Any) -> None:
    o = environment.parsed_options
    host = (environment.host or "").rstrip("/")
    headers = {"Content-Type": "application/json"}
    if o.api_key:
        headers["Authorization"] = f"Bearer {o.api_key}"
    model: str | None = o.model
    if model == "none":
        model = None
    elif model == "auto":
        resp = requests.get(f"{host}/v1/models", headers=headers, timeout=30)
        resp.raise_for_status()
        model = resp.json()["data"][0]["id"]
    log_path = o.request_log or (f"{o.csv_prefix}_requests.jsonl" if getattr(o, "csv_prefix", None) else "")
    if log_path and isinstance(environment.runner, WorkerRunner):
        log_path = f"{log_path}.{os.getpid()}"  # one file per worker process; summary.py reads them all
    wl = Workload(opts=o, host=host, model=model, headers=headers,
                  prompts=_load_prompts(o.prompts_file) if o.prompts_file else [],
                  tokenizer=_load_tokenizer(o.tokenizer),
                  log=open(log_path, "w", encoding="utf-8", buffering=1 << 16) if log_path else None)
    wl.record({"event": "start", "t": time.time(), "model": model, "host": host,
               "options": {k: getattr(o, k) for k in ("prompt_tokens", "output_tokens", "dist", "prompts_file",
                                                      "api_flavor", "qps", "num_users", "run_time")}})
    environment.llm_workload = wl  # type: ignore[attr-defined]


@events.test_stop.add_listener
def _on_stop(environment: Environment, **_: Any) -> None:
    wl: Workload | None = getattr(environment, "llm_workload", None)
    if wl is not None and wl.log is not None:
        wl.record({"event": "stop", "t": time.time(), "num_aborted": wl.num_aborted})
        wl.log.close()
        wl.log = None


# -- users ----------------------------------------------------------------------------------------
class _LLMUser(User):
    """One simulated client: one connection, one request at a time (closed loop) unless --qps paces it."""

    abstract = True
    kind = "chat"
    stream = False
    _ids = itertools.count()

    def on_start(self) -> None:
        self.session = requests.Session()
        self.rng = random.Random(f"{self.environment.parsed_options.seed}-{self.kind}-{next(self._ids)}")
        self.next_at = time.monotonic()

    def on_stop(self) -> None:
        self.session.close()

    def wait_time(self) -> float:
        o = self.environment.parsed_options
        if o.qps <= 0:
            return 0.0
        rate = o.qps / max(1, self.environment.runner.user_count)  # this user's share of the total rate
        self.next_at += self.rng.expovariate(rate) if o.qps_dist == "poisson" else 1.0 / rate
        return max(0.0, self.next_at - time.monotonic())  # behind schedule: fire at once

    @property
    def wl(self) -> Workload:
        return self.environment.llm_workload  # type: ignore[attr-defined]

    def model_and_extra(self) -> tuple[str | None, dict[str, Any]]:
        return self.wl.model, {}

    @task
    def chat(self) -> None:
        messages, max_tokens = self.wl.messages(self.rng)
        model, extra = self.model_and_extra()
        body = self.wl.body(messages, max_tokens, self.stream, model) | extra
        self.run_request(body, max_tokens)

    def run_request(self, body: dict[str, Any], max_tokens: int) -> None:
        try:
            self._run_request(body, max_tokens)
        except BaseException:  # GreenletExit: locust stopped this user mid-request (--stop-timeout ran out)
            self.wl.num_aborted += 1
            raise

    def _run_request(self, body: dict[str, Any], max_tokens: int) -> None:
        name = f"{self.kind}{' stream' if self.stream else ''}"
        rec: dict[str, Any] = {"kind": self.kind, "stream": self.stream, "max_tokens": max_tokens, "ok": False,
                               "t_start": time.time()}
        start = time.perf_counter()
        chunk_times: list[float] = []
        nbytes, error = 0, None
        try:
            with self.session.post(f"{self.wl.host}{CHAT_PATH}", json=body, headers=self.wl.headers,
                                   stream=self.stream, timeout=self.environment.parsed_options.request_timeout) as r:
                rec["status"] = r.status_code
                if r.status_code != 200:
                    error = self.http_error(r)
                elif self.stream:
                    nbytes, error = self.read_sse(r, start, chunk_times, rec)
                else:
                    nbytes, error = self.read_json(r, rec)
        except requests.RequestException as e:
            error = f"{type(e).__name__}: {str(e)[:200]}"
        end = time.perf_counter()
        rec["t_end"] = time.time()
        rec["e2el"] = end - start
        fire = self.environment.events.request.fire
        if error is None and not rec.get("output_tokens"):
            error = "EmptyAnswer: no output tokens"
        if error is not None:
            rec["error"] = error
            fire(request_type="POST", name=name, response_time=rec["e2el"] * 1000, response_length=nbytes,
                 exception=RuntimeError(error), context={})
            self.wl.record(rec)
            return
        rec["ok"] = True
        out = rec["output_tokens"]
        if self.stream and chunk_times:
            rec["ttft"] = chunk_times[0] - start
            rec["itl"] = [round(b - a, 6) for a, b in zip(chunk_times, chunk_times[1:])]
            rec["tpot"] = (end - chunk_times[0]) / (out - 1) if out > 1 else None
        fire(request_type="POST", name=name, response_time=rec["e2el"] * 1000, response_length=nbytes,
             exception=None, context={})
        for metric in ("ttft", "tpot", "e2el"):
            if rec.get(metric) is not None:
                fire(request_type="LLM", name=f"{name} {metric}", response_time=rec[metric] * 1000,
                     response_length=out, exception=None, context={})
        for gap in rec.get("itl", ()):
            fire(request_type="LLM", name=f"{name} itl", response_time=gap * 1000, response_length=1,
                 exception=None, context={})
        self.wl.record(rec)

    def http_error(self, r: requests.Response) -> str:
        try:
            message = r.json().get("error", {}).get("message") or r.text
        except ValueError:
            message = r.text
        return f"HTTP {r.status_code}: {str(message)[:200]}"

    @staticmethod
    def read_json(r: requests.Response, rec: dict[str, Any]) -> tuple[int, str | None]:
        data = r.json()
        usage = data.get("usage") or {}
        rec["prompt_tokens"] = usage.get("prompt_tokens")
        rec["output_tokens"] = usage.get("completion_tokens") or 0
        rec["finish_reason"] = (data.get("choices") or [{}])[0].get("finish_reason")
        return len(r.content), None

    @staticmethod
    def read_sse(r: requests.Response, start: float, chunk_times: list[float],
                 rec: dict[str, Any]) -> tuple[int, str | None]:
        """Time each chunk that carries generated text; usage (if sent) gives the token counts."""
        nbytes, usage = 0, None
        for line in r.iter_lines(chunk_size=None):  # None: yield each HTTP chunk as it arrives
            now = time.perf_counter()
            nbytes += len(line)
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                break
            data = json.loads(payload)
            if "error" in data:
                return nbytes, f"StreamError: {str(data['error'])[:200]}"
            usage = data.get("usage") or usage
            for choice in data.get("choices") or ():
                rec["finish_reason"] = choice.get("finish_reason") or rec.get("finish_reason")
                delta = choice.get("delta") or {}
                if delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls"):
                    chunk_times.append(now)
                    break
        rec["prompt_tokens"] = (usage or {}).get("prompt_tokens")
        rec["output_tokens"] = (usage or {}).get("completion_tokens") or len(chunk_times)
        rec["num_chunks"] = len(chunk_times)
        return nbytes, None


class ChatStreamUser(_LLMUser):
    """Streaming chat: measures TTFT, ITL, TPOT and E2EL."""

    weight = 3
    kind = "chat"
    stream = True


class ChatUser(_LLMUser):
    """Non-streaming chat: only E2EL is visible to the client (its TTFT is the whole answer)."""

    weight = 1
    kind = "chat"
    stream = False


class HeavyUser(_LLMUser):
    """Heavy Mode: N trajectories plus aggregation per request; a server without it fails the request
    with a `HeavyUnsupported` error (counted as a failure, named so in the failures table)."""

    weight = 1
    kind = "heavy"
    stream = False

    def on_start(self) -> None:
        super().on_start()
        self.stream = self.environment.parsed_options.heavy_stream

    def model_and_extra(self) -> tuple[str | None, dict[str, Any]]:
        o = self.environment.parsed_options
        if o.heavy_via == "alias":
            return f"{self.wl.model}-heavy", {}
        return self.wl.model, {"heavy": {"trajectories": o.heavy_trajectories, "aggregate": o.heavy_aggregate}}

    def http_error(self, r: requests.Response) -> str:
        error = super().http_error(r)
        if r.status_code in (400, 404, 422) and "heavy" in error.lower():
            return f"HeavyUnsupported: {error}"
        return error
