"""EngineCore: scheduler + model runner + detokenizer, one `step()` at a time.

[Scheduler] → [ModelRunner: forward + sample] → [Scheduler.update: stop checks] → [detokenize, stop strings]

One engine is what one attention-tier replica runs. `step()` returns a delta `RequestOutput` per
request that produced tokens (new token ids, new text), finished ones included. Offline
(`LLM.generate`) and streaming (`AsyncEngine`) both drive this class.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from raymoe.config import RayMoEConfig
from raymoe.engine.kv_cache import KVCacheManager
from raymoe.engine.model_runner import KVCacheSpec, ModelRunner, kv_cache_spec
from raymoe.engine.request import Request, RequestOutput, RequestStatus, SamplingParams, make_request_output
from raymoe.engine.scheduler import Scheduler
from raymoe.model.args import ModelArgs
from raymoe.model.layers import RotaryEmbedding


@dataclass(slots=True)
class _Stream:
    """Per-request detokenization state."""

    text: str = ""
    prefix_offset: int = 0  # incremental detokenization window over output ids
    read_offset: int = 0
    sent_text: int = 0
    sent_tokens: int = 0
    stop_hold: int = 0  # chars held back while a stop string could still be forming
    reasoning_tokens: int = 0  # thinking-budget accounting (tokens before </think>)
    reasoning_closed: bool = False
    final_only: bool = False  # one output at the end, detokenized once (offline LLM.generate)


BATCH_HISTORY = 4096


def _decoder(tokenizer: Any | None) -> Any:
    """decode(ids, skip_special_tokens) -> str, straight to the Rust tokenizer when that is equivalent.

    A fast HF tokenizer's `decode` wraps `tokenizers.Tokenizer.decode` with argument conversion
    (~4x the cost on the short windows streaming decodes twice per token) and, if configured, a
    clean-up of spaces; without that clean-up both give the same text.
    """
    if tokenizer is None:
        return None
    raw = getattr(tokenizer, "_tokenizer", None)
    if raw is not None and hasattr(raw, "decode") and not getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return lambda ids, skip: raw.decode(ids, skip_special_tokens=skip)
    return lambda ids, skip: tokenizer.decode(ids, skip_special_tokens=skip)


@dataclass
class EngineStats:
    num_steps: int = 0
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    # sequences per step, the most recent BATCH_HISTORY steps (bounded: a server runs for months)
    batch_sizes: deque[int] = field(default_factory=lambda: deque(maxlen=BATCH_HISTORY))


class EngineCore:
    def __init__(self, model: torch.nn.Module, args: ModelArgs, config: RayMoEConfig, tokenizer: Any | None = None,
                 *, device: str | torch.device = "cpu", model_path: str | None = None):
        self.args = args
        self.config = config
        self.tokenizer = tokenizer
        self._decode = _decoder(tokenizer)
        self.model_path = model_path
        ecfg = config.engine
        self.max_model_len = min(ecfg.max_model_len or args.max_position_embeddings, args.max_position_embeddings)
        dtype = next(model.parameters()).dtype
        self.spec: KVCacheSpec = kv_cache_spec(args, ecfg, dtype)
        self.kv = KVCacheManager(self.spec.num_blocks, self.spec.block_size, ecfg.enable_prefix_caching)
        self.scheduler = Scheduler(ecfg, self.kv, self.max_model_len)
        self.runner = ModelRunner(model, args, self.spec, device, kernels_backend=config.kernels.backend)
        for module in model.modules():  # rope rows of every position this engine can reach, once
            if isinstance(module, RotaryEmbedding):
                module.prepare(self.max_model_len, device, dtype)
        self.eos_token_id = args.eos_token_id
        self._streams: dict[str, _Stream] = {}
        self._budgeted: set[str] = set()  # requests whose thinking budget is still open
        self._ids = itertools.count()
        self.stats = EngineStats()
        self.step_request_ids: frozenset[str] = frozenset()  # requests of the running (or last) step
        self._think_start, self._think_end, self._reasoning_enders = self._reasoning_token_ids(tokenizer)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: RayMoEConfig, *, device: str | torch.device = "cpu") -> EngineCore:
        from raymoe.engine.loading import load_engine_parts

        model, args, tokenizer, path = load_engine_parts(config, device=device)
        return cls(model, args, config, tokenizer, device=device, model_path=path)

    # -- requests -------------------------------------------------------------------------------
    def add_request(self, prompt_token_ids: list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, arrival_time: float | None = None, *,
                    final_only: bool = False) -> str:
        """Queue a request; `step()` then returns its deltas, or with `final_only` one output when it
        finishes (vLLM's FINAL_ONLY: no per-token text work, for offline generation)."""
        params = params or SamplingParams()
        if not prompt_token_ids:
            raise ValueError("prompt_token_ids must not be empty")
        bad = [t for t in prompt_token_ids if not 0 <= t < self.args.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.args.vocab_size})")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        req = Request(rid, list(prompt_token_ids), params, eos_token_id=self.eos_token_id,
                      arrival_time=arrival_time if arrival_time is not None else time.monotonic())
        self.scheduler.add_request(req)
        self._streams[rid] = _Stream(stop_hold=max((len(s) for s in params.stop), default=1) - 1,
                                     final_only=final_only)
        if params.thinking_budget is not None:
            self._budgeted.add(rid)
        return rid

    def abort(self, request_id: str) -> bool:
        self._streams.pop(request_id, None)
        self._budgeted.discard(request_id)
        return self.scheduler.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- the step -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        self.step_request_ids = frozenset(s.request.request_id for s in out.scheduled)
        sampled = self.runner.execute(out)
        if out.is_empty:
            return []
        stats = self.stats
        stats.num_steps += 1
        stats.batch_sizes.append(len(out.scheduled))
        stats.num_prompt_tokens += sum(s.num_new_tokens for s in out.scheduled if not s.request.output_token_ids
                                       or s.start_position < s.request.num_prompt_tokens)
        if self._budgeted:
            self._apply_thinking_budgets(sampled)
        updated = self.scheduler.update(out, {rid: tok for rid, (tok, _) in sampled.items()})
        stats.num_generated_tokens += len(updated)
        outputs = []
        for req in updated:
            lp = sampled.get(req.request_id, (0, None))[1]
            if lp is not None and len(req.output_logprobs) < len(req.output_token_ids):
                req.output_logprobs.append(lp.as_dict())
            o = self._emit(req)
            if o is not None:
                outputs.append(o)
        return outputs

    def _emit(self, req: Request) -> RequestOutput | None:
        st = self._streams.get(req.request_id)
        if st is None:
            return None
        if st.final_only and not req.params.stop:  # no stop string to watch: decode once at the end
            if not req.is_finished:
                return None
            if self.tokenizer is not None:
                st.text = self._decode(req.output_token_ids, req.params.skip_special_tokens)
            self._streams.pop(req.request_id, None)
            self._budgeted.discard(req.request_id)
            return make_request_output(req, st.text)
        if self.tokenizer is not None:
            self._detokenize(req, st)
            if req.params.stop and not req.is_finished:
                self._check_stop_strings(req, st)
        finished = req.is_finished
        end = len(st.text)
        if not finished:
            end -= st.stop_hold
        end = max(end, st.sent_text)
        delta_text = st.text[st.sent_text:end]
        st.sent_text = end
        if st.final_only and not finished:
            return None
        o = make_request_output(req, delta_text if not st.final_only else st.text[:end], start=st.sent_tokens)
        st.sent_tokens = len(req.output_token_ids)
        if finished:
            self._streams.pop(req.request_id, None)
            self._budgeted.discard(req.request_id)
        return o

    def _detokenize(self, req: Request, st: _Stream) -> None:
        """Append the text of new output tokens, decoding only a small window of ids per step.

        Byte-level BPE can split a character over tokens, so the window starts a few tokens back
        (`prefix_offset`) and new text is released only once it no longer ends in U+FFFD.
        """
        ids = req.output_token_ids
        skip = req.params.skip_special_tokens
        prefix = self._decode(ids[st.prefix_offset:st.read_offset], skip)
        full = self._decode(ids[st.prefix_offset:], skip)
        if len(full) > len(prefix) and (not full.endswith("\ufffd") or req.is_finished):
            st.text += full[len(prefix):]
            st.prefix_offset, st.read_offset = st.read_offset, len(ids)

    def _check_stop_strings(self, req: Request, st: _Stream) -> None:
        search_from = max(0, st.sent_text - st.stop_hold)
        best = None
        for s in req.params.stop:
            i = st.text.find(s, search_from)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is not None:
            st.text = st.text[: best[0]]
            self.scheduler.finish(req.request_id, RequestStatus.FINISHED_STOPPED, best[1])

    # -- thinking budget (test-time scaling) ------------------------------------------------------
    @staticmethod
    def _reasoning_token_ids(tokenizer: Any | None) -> tuple[int | None, int | None, frozenset[int]]:
        if tokenizer is None:
            return None, None, frozenset()
        vocab = tokenizer.get_vocab()
        start, end = vocab.get("<think>"), vocab.get("</think>")
        enders = {vocab[t] for t in ("</think>", "<|tool_calls_section_begin|>", "<|tool_call_section_begin|>",
                                      "<|tool_call_begin|>") if t in vocab}
        return start, end, frozenset(enders)

    def _apply_thinking_budgets(self, sampled: dict[str, tuple[int, Any]]) -> None:
        """Close the reasoning with `</think>` when a request's thinking budget is spent.

        Reasoning tokens are the output tokens before `</think>` (or before a tool-call section,
        which also ends K2's reasoning), not counting a leading `<think>`. The forced token replaces
        the sampled one, so the answer follows and `max_tokens` still bounds the whole output.
        """
        for rid in [r for r in self._budgeted if r in sampled]:  # only requests with an open budget
            token = sampled[rid][0]
            req = self.scheduler.get_request(rid)
            st = self._streams.get(rid)
            if req is None or st is None or st.reasoning_closed:
                self._budgeted.discard(rid)
                continue
            if self._think_end is None:
                raise ValueError("thinking_budget needs a tokenizer with a </think> token")
            if token in self._reasoning_enders:
                st.reasoning_closed = True
            elif token == self._think_start and not req.output_token_ids:
                pass  # the opener is not reasoning
            elif st.reasoning_tokens >= req.params.thinking_budget:
                sampled[rid] = (self._think_end, None)
                st.reasoning_closed = True
            else:
                st.reasoning_tokens += 1
            if st.reasoning_closed:
                self._budgeted.discard(rid)

    # -- helpers ----------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this engine has no tokenizer: pass prompt_token_ids")
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    @property
    def model_name(self) -> str:
        return Path(self.model_path).name if self.model_path else "raymoe"
