"""AsyncEngine: the streaming face of an `EngineCore` for serving.

    async for out in engine.generate(request_id, prompt_token_ids, params): ...   # delta outputs
    await engine.abort(request_id)

The core runs in one background thread that owns it exclusively: requests and aborts reach it
through an inbox drained between steps, outputs go back to each caller's event loop with
`call_soon_threadsafe`. So the serving event loop never blocks on a forward pass, and a client
that disconnects (the async generator is closed) aborts its request and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from raymoe.engine.core import EngineCore
from raymoe.engine.request import RequestOutput, SamplingParams, merge_outputs
from raymoe.observability.engine_metrics import EngineMetrics


class EngineDeadError(RuntimeError):
    """The engine loop failed; the replica must be restarted.

    `safe_elsewhere`: the request had no part in the failing step (it came after the failure, or was
    still waiting in the queue), so it is safe to run on another replica; False for the requests of
    the failing step, one of which may have caused it.
    """

    def __init__(self, message: str, *, safe_elsewhere: bool = False) -> None:
        super().__init__(message)
        self.safe_elsewhere = safe_elsewhere


@dataclass
class _Sink:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncEngine:
    def __init__(self, core: EngineCore, *, idle_wait_s: float = 0.05):
        self.core = core
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, _Sink] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle_wait_s = idle_wait_s
        self.error: BaseException | None = None
        self.last_step_time = time.monotonic()
        self.metrics = EngineMetrics(core)  # built here: replica_tag() needs the Serve context
        self._thread = threading.Thread(target=self._loop, name="raymoe-engine", daemon=True)
        self._thread.start()

    # -- public ---------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        return self.core.tokenizer

    @property
    def is_healthy(self) -> bool:
        return self.error is None and self._thread.is_alive()

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Yield delta outputs for one request; the last one has `finished=True`."""
        if self.error is not None:
            raise EngineDeadError(f"engine is dead: {self.error}", safe_elsewhere=True)
        loop = asyncio.get_running_loop()
        sink = _Sink(loop, asyncio.Queue())
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._sinks[request_id] = sink
        self._inbox.put(("add", request_id, list(prompt_token_ids), params, fut))
        self._wake.set()
        finished = False
        try:
            await asyncio.wrap_future(fut)  # raises the scheduler's ValueError (too long, bad ids…)
            while True:
                item = await sink.queue.get()
                # Coalesce whatever else is already queued: when the consumer (a Serve stream, one Ray
                # object per item) is slower than the engine, it gets fewer, larger deltas.
                while not isinstance(item, BaseException) and not item.finished and not sink.queue.empty():
                    nxt = sink.queue.get_nowait()
                    item = nxt if isinstance(nxt, BaseException) else merge_outputs(item, nxt)
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    break
        finally:
            self._sinks.pop(request_id, None)
            if not finished:
                self._inbox.put(("abort", request_id, None, None, None))
                self._wake.set()

    async def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id, None, None, None))
        self._wake.set()

    def stats(self) -> dict[str, float]:
        core = self.core
        return {
            "num_running": core.scheduler.num_running,
            "num_waiting": core.scheduler.num_waiting,
            "kv_cache_usage": core.kv.usage,
            "prefix_cache_hit_rate": core.kv.hit_rate,
            "prefix_cache_queried_tokens": core.kv.num_queried_tokens,
            "prefix_cache_hit_tokens": core.kv.num_hit_tokens,
            "num_steps": core.stats.num_steps,
            "num_generated_tokens": core.stats.num_generated_tokens,
            "num_prompt_tokens": core.stats.num_prompt_tokens,
        }

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)
        close = getattr(self.core, "close", None)
        if callable(close):
            close()

    # -- engine thread --------------------------------------------------------------------------
    def _drain_inbox(self) -> None:
        while True:
            try:
                op, rid, ids, params, fut = self._inbox.get_nowait()
            except queue.Empty:
                return
            if op == "add":
                try:
                    self.core.add_request(ids, params, request_id=rid)
                except Exception as e:  # invalid request: report to its caller only
                    fut.set_exception(e)
                else:
                    fut.set_result(None)
            elif op == "abort":
                self.core.abort(rid)

    def _deliver(self, rid: str, item: RequestOutput | BaseException) -> None:
        sink = self._sinks.get(rid)
        if sink is not None:
            try:
                sink.loop.call_soon_threadsafe(sink.queue.put_nowait, item)
            except RuntimeError:  # the caller's loop is closed: drop the request
                self.core.abort(rid)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._drain_inbox()
            if not self.core.has_unfinished():
                self.metrics.on_idle()
                self._wake.wait(self._idle_wait_s)
                self._wake.clear()
                continue
            try:
                start = time.perf_counter()
                outputs = self.core.step()
            except BaseException as e:  # fatal: fail every live stream, never hang them
                self.error = e
                message = f"engine step failed: {type(e).__name__}: {e}"
                in_step = getattr(self.core, "step_request_ids", None)
                for rid in list(self._sinks):
                    self._deliver(rid, EngineDeadError(message, safe_elsewhere=in_step is not None and rid not in in_step))
                return
            self.metrics.on_step(time.perf_counter() - start)
            self.last_step_time = time.monotonic()
            for out in outputs:
                self._deliver(out.request_id, out)
