"""Kimi K2 output parser: splits generated text into reasoning, content and OpenAI tool calls.

Sits between detokenization and the OpenAI response builder. K2's `<think>`, `</think>` and tool-call
markers are non-special added tokens, so they survive `skip_special_tokens` and appear in the text:

    <think>reasoning</think>answer<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0
    <|tool_call_argument_begin|>{"a": 1}<|tool_call_end|><|tool_calls_section_end|>

One state machine (`K2StreamParser`) serves both paths; `parse_output` is that machine fed the whole
text at once, so streamed deltas and the non-streamed result cannot disagree. vLLM's K2 parsers had
one regex path and one streaming path, and the streaming one alone leaked markers, cut arguments on
bundled spec-decode deltas and lost content (#37184, #38274, #38353; K2_FACTS §4.3).

Rules (K2_FACTS §3.2, §4.2-§4.3):
- `<think>` is optional at the start (leading whitespace tolerated). Reasoning ends at `</think>` or
  implicitly at a tool-call section (`<|tool_calls_section_begin|>`, the singular
  `<|tool_call_section_begin|>`, or a bare `<|tool_call_begin|>`). After reasoning ends, `</think>`
  is plain text.
- `expect_reasoning=True` (K2 Thinking, which cannot turn thinking off): text before `</think>` is
  reasoning even without `<think>`, the DeepSeek-R1 convention vLLM's `kimi_k2` reasoning parser
  inherits; it also covers templates that prefill `<think>` in the prompt (K2.5+). Output truncated
  before `</think>` is all reasoning. `expect_reasoning=False` (K2 Instruct): reasoning only when the
  output opens with `<think>`; otherwise everything is content.
- Reasoning is passed through verbatim. Content loses only its trailing whitespace (the separator
  K2 puts before a tool-call section, or a final newline), so blank content is None; whitespace
  between content before and after a section is kept. Arguments are stripped.
- Text between call markers inside a section is dropped (the marker leakage of Kimi-K2#89). Text
  after the section end is content again. A call whose `<|tool_call_end|>` is missing ends at the
  next `<|tool_call_begin|>` or section end.
- Truncation: a call whose header (id) is complete is returned with whatever arguments arrived,
  even when they are not valid JSON. The streaming path has already sent its id and argument
  fragments and cannot take them back, and parse_output must agree with it; the engine reports
  finish_reason "length" for such output, which tells the client the arguments are cut. A call cut
  before `<|tool_call_argument_begin|>` sent nothing and is dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

THINK_START = "<think>"
THINK_END = "</think>"
SECTION_BEGINS = ("<|tool_calls_section_begin|>", "<|tool_call_section_begin|>")
SECTION_ENDS = ("<|tool_calls_section_end|>", "<|tool_call_section_end|>")
CALL_BEGIN = "<|tool_call_begin|>"
ARG_BEGIN = "<|tool_call_argument_begin|>"
CALL_END = "<|tool_call_end|>"

_OPENAI_ID = re.compile(r"functions\.(.+):(\d+)", re.DOTALL)
_INDEXED_NAME = re.compile(r"(.*):\d+", re.DOTALL)

# states
_START, _REASONING, _CONTENT, _SECTION, _CALL_ID, _CALL_ARGS = range(6)

# Markers recognised in each state; anything else is text of that state. Keeping the sets small
# means e.g. `</think>` in content or `<|tool_call` inside a JSON string is never held back.
_MARKERS: dict[int, tuple[str, ...]] = {
    _REASONING: (THINK_END, *SECTION_BEGINS, CALL_BEGIN),
    _CONTENT: (*SECTION_BEGINS, CALL_BEGIN),
    _SECTION: (CALL_BEGIN, *SECTION_ENDS),
    _CALL_ID: (ARG_BEGIN, CALL_END, CALL_BEGIN, *SECTION_ENDS),
    _CALL_ARGS: (CALL_END, CALL_BEGIN, *SECTION_ENDS),
}
# one alternation per state finds the earliest marker in a single pass (no marker prefixes another)
_MARKER_RE = {state: re.compile("|".join(map(re.escape, ms))) for state, ms in _MARKERS.items()}


@dataclass(slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str
    index: int


@dataclass(slots=True)
class ToolCallDelta:
    """One streamed piece of a call: the first carries id and name, later ones only arguments."""

    index: int
    id: str | None
    name: str | None
    arguments: str


@dataclass(slots=True)
class ParsedOutput:
    reasoning_content: str | None
    content: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)


@dataclass(slots=True)
class DeltaMessage:
    reasoning_content: str | None
    content: str | None
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


def split_tool_call_id(raw_id: str, index: int) -> tuple[str, str]:
    """Maps the model's call id to (OpenAI id, function name).

    Args:
        raw_id: text between `<|tool_call_begin|>` and `<|tool_call_argument_begin|>`.
        index: the call's position in this response, used when the id must be rebuilt.

    Returns:
        `functions.{name}:{idx}` ids are kept; anything else (`search:2`, `search`) is rebuilt as
        `functions.{name}:{index}`, as Moonshot's API normalises ids (vLLM blog, K2_FACTS §4.3).
        The name only loses a `functions.` prefix and `:idx` suffix, so dotted names survive.
    """
    raw_id = raw_id.strip()
    if m := _OPENAI_ID.fullmatch(raw_id):
        return raw_id, m.group(1)
    name = raw_id.removeprefix("functions.")
    if m := _INDEXED_NAME.fullmatch(name):
        name = m.group(1)
    return f"functions.{name}:{index}", name


def _partial_marker_len(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `markers`."""
    start = max(0, len(text) - max(map(len, markers)) + 1)
    for i in range(start, len(text)):
        if text[i] == "<":
            tail = text[i:]
            if any(m.startswith(tail) for m in markers):
                return len(text) - i
    return 0


def _hold_trailing_ws(text: str) -> tuple[str, str]:
    """Splits `text` into (emit now, trailing whitespace to hold)."""
    kept = text.rstrip()
    return kept, text[len(kept) :]


class _Delta:
    """Collects one feed()'s output; merges consecutive pieces of the same call."""

    def __init__(self) -> None:
        self.reasoning: list[str] = []
        self.content: list[str] = []
        self.tool_calls: list[ToolCallDelta] = []

    def add_args(self, index: int, text: str) -> None:
        if self.tool_calls and self.tool_calls[-1].index == index:
            self.tool_calls[-1].arguments += text
        else:
            self.tool_calls.append(ToolCallDelta(index, None, None, text))

    def build(self) -> DeltaMessage | None:
        if not (self.reasoning or self.content or self.tool_calls):
            return None
        return DeltaMessage("".join(self.reasoning) or None, "".join(self.content) or None, self.tool_calls)


class K2StreamParser:
    """Incremental K2 output parser; one instance per response, no shared state.

    Text that could be the start of a marker (`<|tool_c`, `</thi`) is held back until the next
    delta decides it, so no partial marker is ever emitted. Markers are single tokens, so text still
    held at `finish()` is literal text and is flushed as such.

    Examples:
        >>> p = K2StreamParser()
        >>> p.feed("<think>hm</thi")
        DeltaMessage(reasoning_content='hm', content=None, tool_calls=[])
        >>> p.feed("nk>Hi")
        DeltaMessage(reasoning_content=None, content='Hi', tool_calls=[])
    """

    def __init__(self, expect_reasoning: bool = True) -> None:
        self.expect_reasoning = expect_reasoning
        self._state = _START
        self._buf = ""  # undecided text: a possible partial marker
        self._call_id = ""  # raw id text of the call being read
        self._num_calls = 0
        self._args_started = False  # current call saw non-whitespace arguments
        # trailing whitespace, emitted only if more text of the same kind follows; content's survives
        # a tool-call section in between, arguments' ends with the call
        self._content_ws = ""
        self._args_ws = ""
        self._finished = False

    @property
    def has_tool_calls(self) -> bool:
        """True once a call's id and name were emitted: the finish_reason is then "tool_calls"."""
        return self._num_calls > 0

    def feed(self, delta_text: str) -> DeltaMessage | None:
        """Consumes the next decoded text and returns what it decided, or None if nothing yet."""
        assert not self._finished, "feed() after finish()"
        self._buf += delta_text
        out = _Delta()
        self._drain(out, final=False)
        return out.build()

    def finish(self) -> DeltaMessage | None:
        """Flushes held-back text at end of stream and closes a truncated call."""
        assert not self._finished, "finish() called twice"
        self._finished = True
        out = _Delta()
        self._drain(out, final=True)
        return out.build()

    def _drain(self, out: _Delta, final: bool) -> None:
        while True:
            if self._state == _START:
                rest = self._buf.lstrip()
                if rest.startswith(THINK_START):
                    self._buf = rest[len(THINK_START) :]
                    self._state = _REASONING
                elif not final and THINK_START.startswith(rest):  # also "": only whitespace so far
                    return
                else:
                    self._state = _REASONING if self.expect_reasoning else _CONTENT
                continue
            m = _MARKER_RE[self._state].search(self._buf)
            if m is None:
                keep = 0 if final else _partial_marker_len(self._buf, _MARKERS[self._state])
                self._text(out, self._buf[: len(self._buf) - keep])
                self._buf = self._buf[len(self._buf) - keep :]
                return
            self._text(out, self._buf[: m.start()])
            self._buf = self._buf[m.end() :]
            self._marker(out, m.group())

    def _text(self, out: _Delta, text: str) -> None:
        if not text:
            return
        state = self._state
        if state == _REASONING:
            out.reasoning.append(text)
        elif state == _CONTENT:
            text, self._content_ws = _hold_trailing_ws(self._content_ws + text)
            if text:
                out.content.append(text)
        elif state == _CALL_ID:
            self._call_id += text
        elif state == _CALL_ARGS:
            if not self._args_started:
                text = text.lstrip()
                self._args_started = bool(text)
            text, self._args_ws = _hold_trailing_ws(self._args_ws + text)
            if text:
                out.add_args(self._num_calls - 1, text)
        # _SECTION: text between call markers is dropped

    def _marker(self, out: _Delta, marker: str) -> None:
        state = self._state
        self._args_ws = ""
        if state == _CALL_ID and marker in (ARG_BEGIN, CALL_END):
            self._open_call(out)
        if marker == CALL_BEGIN:
            self._state, self._call_id = _CALL_ID, ""
        elif marker == ARG_BEGIN:
            self._state = _CALL_ARGS
        elif marker in SECTION_BEGINS or marker == CALL_END:
            self._state = _SECTION
        else:  # THINK_END or a section end
            self._state = _CONTENT

    def _open_call(self, out: _Delta) -> None:
        index = self._num_calls
        call_id, name = split_tool_call_id(self._call_id, index)
        out.tool_calls.append(ToolCallDelta(index, call_id, name, ""))
        self._num_calls += 1
        self._args_started = False


def parse_output(text: str, *, expect_reasoning: bool = True) -> ParsedOutput:
    """Parses a whole response; equal by construction to concatenating the streamed deltas.

    Examples:
        >>> parse_output("<think>r</think>Hi")
        ParsedOutput(reasoning_content='r', content='Hi', tool_calls=[])
    """
    parser = K2StreamParser(expect_reasoning=expect_reasoning)
    deltas = [parser.feed(text), parser.finish()]
    reasoning: list[str] = []
    content: list[str] = []
    calls: list[ToolCall] = []
    for delta in deltas:
        if delta is None:
            continue
        reasoning.append(delta.reasoning_content or "")
        content.append(delta.content or "")
        for d in delta.tool_calls:
            if d.id is not None:
                calls.append(ToolCall(d.id, d.name or "", d.arguments, d.index))
            else:
                calls[d.index].arguments += d.arguments
    return ParsedOutput("".join(reasoning) or None, "".join(content) or None, calls)
