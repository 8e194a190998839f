"""Engine deltas -> OpenAI choices: K2 reasoning/tool-call parsing, logprobs, and tool-call validation.

    TierOutput deltas -> ChatChoiceState.update() -> [K2 parser] -> [validate each finished call] -> choice dicts
                                                                      └─ bad call + attempts left -> rewind_to

With tool validation on (`ToolCheck`), a tool call is held back until it is complete (the next call opens or
the output ends), then checked with `apply_policy`. A valid call is sent whole, as one delta. A bad call never
reaches the client as a `tool_calls` entry: under 'resample' the state asks its driver to rewind (`rewind_to`,
the token position of the call's begin marker) and generate again from there with a new seed; otherwise the
call is rendered into `content` and reported in the choice's `tool_call_errors` extension field. Reasoning
and content before the call stream as usual; content after an open call waits for its verdict, and a rewind
re-derives what belongs before the rewind point from the kept tokens, so the client never sees a retraction.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from raymoe.heavy.config import ToolValidationConfig
from raymoe.heavy.tool_validation import ToolValidator, apply_policy
from raymoe.serve.parsers import CALL_BEGIN, DeltaMessage, K2StreamParser, ParsedOutput, ToolCall

_MIN_LOGPROB = -9999.0  # JSON has no -inf; vLLM clamps the same way
_MARKER_SPLIT = re.compile(r"(?=<\|tool_call)")  # every K2 tool-call marker starts so


class TokenText:
    """Token id -> its text and bytes for logprobs, cached (at most one entry per vocabulary id)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text


def _lp(value: float) -> float:
    return max(float(value), _MIN_LOGPROB)


def _top(logprobs: dict[int, float], num: int) -> list[tuple[int, float]]:
    return sorted(logprobs.items(), key=lambda kv: -kv[1])[:num]


class ReasoningOnlyParser:
    """Splits reasoning from content without parsing tool calls (requests without tools, or tool_choice none).

    Same reasoning rules as `K2StreamParser(expect_reasoning=True)`: an optional leading `<think>`,
    reasoning until `</think>` or a tool-call section; then everything is content, verbatim,
    tool-call markup included (what vLLM returns when no tool parser runs).
    """

    _ENDS = ("</think>", "<|tool_calls_section_begin|>", "<|tool_call_section_begin|>", "<|tool_call_begin|>")
    has_tool_calls = False

    def __init__(self) -> None:
        self._buf = ""
        self._state = "start"

    def feed(self, text: str) -> DeltaMessage | None:
        self._buf += text
        return self._drain(final=False)

    def finish(self) -> DeltaMessage | None:
        return self._drain(final=True)

    def _drain(self, final: bool) -> DeltaMessage | None:
        reasoning, content = "", ""
        if self._state == "start":
            rest = self._buf.lstrip()
            if rest.startswith("<think>"):
                self._buf, self._state = rest[len("<think>"):], "reasoning"
            elif not final and "<think>".startswith(rest):
                return None
            else:
                self._state = "reasoning"
        if self._state == "reasoning":
            hits = [(i, m) for m in self._ENDS if (i := self._buf.find(m)) >= 0]
            if hits:
                i, marker = min(hits)
                reasoning = self._buf[:i]
                self._buf = self._buf[i + len(marker):] if marker == "</think>" else self._buf[i:]
                self._state = "content"
            else:
                keep = 0 if final else _partial_suffix(self._buf, self._ENDS)
                reasoning, self._buf = self._buf[: len(self._buf) - keep], self._buf[len(self._buf) - keep:]
        if self._state == "content":
            content, self._buf = self._buf, ""
        if not (reasoning or content):
            return None
        return DeltaMessage(reasoning or None, content or None, [])


def _partial_suffix(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that starts one of `markers` (held back until decided)."""
    for i in range(max(0, len(text) - max(map(len, markers)) + 1), len(text)):
        if text[i] == "<" and any(m.startswith(text[i:]) for m in markers):
            return len(text) - i
    return 0


def finish_reason(engine_reason: str | None, has_tool_calls: bool = False) -> str:
    """Engine finish reason -> OpenAI's ("abort" only reaches a client that has gone)."""
    if engine_reason == "length":
        return "length"
    return "tool_calls" if has_tool_calls else "stop"


@dataclass(frozen=True, slots=True)
class ToolCheck:
    """Tool-call validation for one request: its tools compiled once, the policy, and how to rewind.

    `call_begin_id` is the `<|tool_call_begin|>` token id (rewinds cut the output there; None: no rewinds).
    """

    validator: ToolValidator
    config: ToolValidationConfig
    call_begin_id: int | None
    max_tokens: int  # a rewind needs room left for the new attempt


class ChatChoiceState:
    """One chat choice: feeds engine deltas through the K2 parser, builds stream deltas and the final message.

    Args:
        index: the choice index.
        parse_tools: parse K2 tool calls into `tool_calls` (else `ReasoningOnlyParser`).
        top_logprobs: None = no logprobs; N = chosen token plus the N most likely.
        token_text: id -> text for logprobs.
        return_token_ids: add `token_ids` to each delta / the final choice.
        check: validate tool calls (see the module docstring); None sends them as they are parsed.
    """

    def __init__(self, index: int, parse_tools: bool, top_logprobs: int | None, token_text: TokenText,
                 return_token_ids: bool = False, check: ToolCheck | None = None):
        self.index = index
        self.parser: Any = K2StreamParser() if parse_tools else ReasoningOnlyParser()
        self.top_logprobs = top_logprobs
        self.token_text = token_text
        self.return_token_ids = return_token_ids
        self.check = check if parse_tools else None
        # what the client has been sent (or will be, in message())
        self.reasoning: list[str] = []
        self.content: list[str] = []
        self.tool_calls: list[dict[str, Any]] = []
        self.tool_call_errors: list[dict[str, Any]] = []
        self.logprobs: list[dict[str, Any]] = []
        self.token_ids: list[int] = []  # the output so far (a rewind cuts it back)
        self.finish_reason: str | None = None
        # tool-call validation
        self.attempt = 1
        self.rewind_to: int | None = None  # set: the driver must regenerate from this token position
        self._lps: list[dict[str, Any]] = []  # logprob entries of token_ids not yet sent
        self._num_sent = 0  # token_ids[:num_sent] are sent (with their logprobs)
        self._calls: dict[int, dict[str, Any]] = {}  # parser index -> call being read
        self._starts: dict[int, int | None] = {}  # parser index -> token position of its begin marker
        self._open: int | None = None  # parser index of the call not yet validated
        self._held = ""  # content that arrived while a call was open

    # -- feeding --------------------------------------------------------------------------------
    def update(self, token_ids: list[int], text: str, logprobs: list[dict[int, float]] | None,
               finished: bool, engine_reason: str | None) -> dict[str, Any] | None:
        """Consume one engine delta; return its stream choice (`{"index", "delta", ...}`) or None.

        After a call with `rewind_to` set, stop feeding this attempt and call `rewind()`.
        """
        self.token_ids += token_ids
        self._lps += self._entries(token_ids, logprobs)
        delta: dict[str, Any] = {}
        # Validated: feed tool markup one marker at a time, so text in a parsed delta is never on both sides
        # of a call (it is sent at once before an open call, held after it).
        pieces = _MARKER_SPLIT.split(text) if self.check is not None else [text]
        parsed = [self.parser.feed(piece) for piece in pieces if piece]
        if finished:
            parsed.append(self.parser.finish())
        for part in parsed:
            if part is not None and self.rewind_to is None:
                self._apply(part, delta)
        if finished and self.rewind_to is None:
            if self._open is not None:
                self._close_call(delta)
            if self.rewind_to is None:
                self._flush_held(delta)
                has_calls = self.parser.has_tool_calls if self.check is None else bool(self.tool_calls)
                self.finish_reason = finish_reason(engine_reason, has_calls)
        return self._chunk(delta, finished and self.rewind_to is None)

    def rewind(self, decode: Any) -> dict[str, Any] | None:
        """Cut the output back to `rewind_to` for a new attempt; return the catch-up chunk, if any.

        The kept tokens are re-parsed by a fresh parser: whatever of their reasoning/content was held back
        (it arrived in one delta with the bad call) is sent now, and the fresh parser continues the output.

        Args:
            decode: `f(token_ids) -> text`, as the engine detokenizes the output.
        """
        cut, self.rewind_to = self.rewind_to, None
        assert cut is not None, "rewind() without rewind_to"
        self.attempt += 1
        kept = self.token_ids[:cut]
        parser = K2StreamParser()
        fresh = parser.feed(decode(kept)) or DeltaMessage(None, None, [])
        delta: dict[str, Any] = {}
        for sent, new, key in ((self.reasoning, fresh.reasoning_content, "reasoning_content"),
                               (self.content, fresh.content, "content")):
            done = "".join(sent)
            if new and new.startswith(done) and len(new) > len(done):
                sent.append(new[len(done):])
                delta[key] = new[len(done):]
        num_kept_calls = sum(1 for d in fresh.tool_calls if d.id is not None)
        self._calls = {i: c for i, c in self._calls.items() if i < num_kept_calls}
        self._starts = {i: s for i, s in self._starts.items() if i < num_kept_calls}
        self.parser, self._open, self._held, self.finish_reason = parser, None, "", None
        self._lps = self._lps[: max(0, cut - self._num_sent)]
        self.token_ids = kept
        return self._chunk(delta, False)

    # -- results --------------------------------------------------------------------------------
    def message(self) -> dict[str, Any]:
        """The non-streamed choice, after the finished delta."""
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.content) or None,
                                   "reasoning_content": "".join(self.reasoning) or None}
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        choice: dict[str, Any] = {"index": self.index, "message": message,
                                  "logprobs": {"content": self.logprobs} if self.top_logprobs is not None else None,
                                  "finish_reason": self.finish_reason}
        if self.tool_call_errors:
            choice["tool_call_errors"] = self.tool_call_errors
        if self.return_token_ids:
            choice["token_ids"] = self.token_ids
        return choice

    # -- internals ------------------------------------------------------------------------------
    def _chunk(self, delta: dict[str, Any], finished: bool) -> dict[str, Any] | None:
        safe = len(self.token_ids)
        if self._open is not None:  # tokens from the open call's begin marker on may still be rewound
            start = self._starts.get(self._open)
            safe = self._num_sent if start is None else max(self._num_sent, min(start, safe))
        new_ids = self.token_ids[self._num_sent:safe]
        lps = self._lps[: len(new_ids)] if self.top_logprobs is not None else []
        self._lps = self._lps[len(new_ids):]
        self._num_sent = safe
        self.logprobs += lps
        if not (delta or lps or finished or (self.return_token_ids and new_ids)):
            return None
        choice: dict[str, Any] = {"index": self.index, "delta": delta,
                                  "logprobs": {"content": lps} if lps else None,
                                  "finish_reason": self.finish_reason if finished else None}
        if finished and self.tool_call_errors:
            choice["tool_call_errors"] = self.tool_call_errors
        if self.return_token_ids:
            choice["token_ids"] = new_ids
        return choice

    def _apply(self, parsed: DeltaMessage, delta: dict[str, Any]) -> None:
        if parsed.reasoning_content:
            self._send(delta, "reasoning_content", parsed.reasoning_content)
        if self.check is None:
            if parsed.content:
                self._send(delta, "content", parsed.content)
            self._stream_calls(parsed, delta)
            return
        for call in parsed.tool_calls:
            if call.id is None:
                self._calls[call.index]["arguments"] += call.arguments
                continue
            if self._open is not None:  # a new call opens: the previous one is complete
                self._close_call(delta)
                if self.rewind_to is not None:
                    return
            self._calls[call.index] = {"id": call.id, "name": call.name or "", "arguments": call.arguments}
            self._starts[call.index] = self._next_begin()
            self._open = call.index
        if parsed.content:
            if self._open is None:
                self._send(delta, "content", parsed.content)
            else:
                self._held += parsed.content

    def _send(self, delta: dict[str, Any], key: str, text: str) -> None:
        (self.reasoning if key == "reasoning_content" else self.content).append(text)
        delta[key] = delta.get(key, "") + text

    def _stream_calls(self, parsed: DeltaMessage, delta: dict[str, Any]) -> None:
        """Unvalidated: each call's id and name first, then its argument fragments, as they are parsed."""
        for call in parsed.tool_calls:
            calls = delta.setdefault("tool_calls", [])
            if call.id is not None:
                self.tool_calls.append({"id": call.id, "type": "function",
                                        "function": {"name": call.name or "", "arguments": call.arguments}})
                calls.append({"index": call.index, "id": call.id, "type": "function",
                              "function": {"name": call.name or "", "arguments": call.arguments}})
                continue
            self.tool_calls[call.index]["function"]["arguments"] += call.arguments
            if calls and calls[-1]["index"] == call.index:
                calls[-1]["function"]["arguments"] += call.arguments
            else:
                calls.append({"index": call.index, "function": {"arguments": call.arguments}})

    def _next_begin(self) -> int | None:
        """Token position of the newest call's begin marker: the first one after the previous call's."""
        check = self.check
        assert check is not None
        if check.call_begin_id is None:
            return None
        after = max((s for s in self._starts.values() if s is not None), default=-1) + 1
        for pos in range(after, len(self.token_ids)):
            if self.token_ids[pos] == check.call_begin_id:
                return pos
        return None  # markup spelled in plain tokens: cannot be cut at a token boundary

    def _close_call(self, delta: dict[str, Any]) -> None:
        check = self.check
        assert check is not None and self._open is not None
        index, self._open = self._open, None
        raw = self._calls[index]
        call = ToolCall(raw["id"], raw["name"], raw["arguments"].strip(), index)
        start = self._starts.get(index)
        can_rewind = start is not None and start < check.max_tokens - 1
        attempt = self.attempt if can_rewind else check.config.max_attempts
        decision = apply_policy(ParsedOutput(None, None, [call]), check.validator, check.config, attempt)
        if decision.action == "resample":
            self.rewind_to = start
            self._open = index  # tokens from its begin marker on stay unsent
            return
        if decision.action == "accept":
            out = {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
            delta.setdefault("tool_calls", []).append({"index": len(self.tool_calls), **out})
            self.tool_calls.append(out)
        else:  # "content": the call as readable text, and why
            text = decision.content or ""
            self._send(delta, "content", f"\n\n{text}" if self.content else text)
            self.tool_call_errors += decision.tool_call_errors
        self._flush_held(delta)

    def _flush_held(self, delta: dict[str, Any]) -> None:
        if self._held:
            self._send(delta, "content", self._held)
            self._held = ""

    def _entries(self, token_ids: list[int], logprobs: list[dict[int, float]] | None) -> list[dict[str, Any]]:
        if self.top_logprobs is None or not logprobs:
            return []
        out = []
        for tid, lp in zip(token_ids, logprobs):
            text = self.token_text(tid)
            top = [{"token": (t := self.token_text(k)), "logprob": _lp(v), "bytes": list(t.encode())}
                   for k, v in _top(lp, self.top_logprobs)]
            out.append({"token": text, "logprob": _lp(lp.get(tid, _MIN_LOGPROB)), "bytes": list(text.encode()),
                        "top_logprobs": top})
        return out


class TextChoiceState:
    """One /v1/completions choice: raw text (no parsing), OpenAI legacy logprobs."""

    def __init__(self, index: int, logprobs: int | None, token_text: TokenText, return_token_ids: bool = False):
        self.index = index
        self.num_logprobs = logprobs
        self.token_text = token_text
        self.return_token_ids = return_token_ids
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.offset = 0
        self.logprobs: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        self.finish_reason: str | None = None

    def update(self, token_ids: list[int], text: str, logprobs: list[dict[int, float]] | None,
               finished: bool, engine_reason: str | None) -> dict[str, Any] | None:
        self.token_ids += token_ids
        self.text.append(text)
        if finished:
            self.finish_reason = finish_reason(engine_reason)
        lps = self._logprobs(token_ids, logprobs)
        if not (text or lps or finished or (self.return_token_ids and token_ids)):
            return None
        choice: dict[str, Any] = {"index": self.index, "text": text, "logprobs": lps,
                                  "finish_reason": self.finish_reason if finished else None}
        if self.return_token_ids:
            choice["token_ids"] = token_ids
        return choice

    def final(self) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": self.index, "text": "".join(self.text),
                                  "logprobs": self.logprobs if self.num_logprobs is not None else None,
                                  "finish_reason": self.finish_reason}
        if self.return_token_ids:
            choice["token_ids"] = self.token_ids
        return choice

    def _logprobs(self, token_ids: list[int], logprobs: list[dict[int, float]] | None) -> dict[str, list] | None:
        if self.num_logprobs is None or not logprobs:
            return None
        part: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for tid, lp in zip(token_ids, logprobs):
            text = self.token_text(tid)
            part["tokens"].append(text)
            part["token_logprobs"].append(_lp(lp.get(tid, _MIN_LOGPROB)))
            part["top_logprobs"].append({self.token_text(k): _lp(v) for k, v in _top(lp, self.num_logprobs)})
            part["text_offset"].append(self.offset)
            self.offset += len(text)
        for key, values in part.items():
            self.logprobs[key] += values
        return part


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def call_begin_id(tokenizer: Any) -> int | None:
    """The `<|tool_call_begin|>` token id, when the tokenizer has it as one token."""
    return tokenizer.get_vocab().get(CALL_BEGIN) if tokenizer is not None else None
