"""Heavy Mode aggregation: N trajectories -> one answer (K2_FACTS §4.4: "rolls out eight trajectories
simultaneously, then reflectively aggregates all outputs").

    trajectory text -> parse_output -> [extract_answer] -> Candidate -> vote | best_logprob | reflect pass

Pure functions, no Ray: the ingress generates the trajectories and, for 'reflect', one more generation on the
conversation `build_reflect_messages` returns. Answers are extracted from each trajectory's final content only;
reasoning is private scratch work and never voted on or shown to the reflect pass.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

import regex

from raymoe.heavy.config import Extractor, compile_answer_regex
from raymoe.serve.parsers import ParsedOutput

REGEX_TIMEOUT_S = 0.05  # per extraction; a request-supplied pattern must not stall the ingress event loop
_BOXED = regex.compile(r"\\boxed\s*\{")
_NUMBER = regex.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_GROUPED = regex.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")  # 1,234,567.5
_WS = regex.compile(r"\s+")


def _balanced(text: str, start: int) -> str | None:
    """The text up to the `}` matching the `{` just before `start`, or None when it never closes."""
    depth, i = 1, start
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2  # `\{` and `\}` are literal braces in LaTeX
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
        i += 1
    return None


def _last_line(text: str) -> str | None:
    for line in reversed(text.splitlines()):
        if line.strip():
            return line.strip()
    return None


def extract_answer(text: str | None, extractor: Extractor, regex_pattern: str | None = None) -> str | None:
    """The final answer in a trajectory's content, or None when it has none (it then does not vote).

    Args:
        text: the trajectory's content (not its reasoning).
        extractor: 'boxed' = the last complete `\\boxed{...}` (balanced braces), else the last non-empty line;
            'last_line' = the last non-empty line; 'regex' = group 1 (group 0 when the pattern has no group or
            group 1 did not take part) of the last match, no fallback; a match taking longer than
            REGEX_TIMEOUT_S counts as no answer.
        regex_pattern: the pattern for 'regex'.

    Raises:
        ValueError: an unknown extractor, or 'regex' without a valid pattern.
    """
    if extractor not in ("boxed", "last_line", "regex"):
        raise ValueError(f"extractor {extractor!r} is not one of last_line, boxed, regex")
    if extractor == "regex" and not regex_pattern:
        raise ValueError("extractor 'regex' needs a pattern")
    if not text:
        return None
    if extractor == "boxed":
        for m in reversed(list(_BOXED.finditer(text))):
            inner = _balanced(text, m.end())
            if inner is not None:
                return inner.strip()
        return _last_line(text)
    if extractor == "last_line":
        return _last_line(text)
    pattern = compile_answer_regex(regex_pattern, "extractor_regex")
    try:
        matches = list(pattern.finditer(text, timeout=REGEX_TIMEOUT_S))
    except TimeoutError:
        return None
    if not matches:
        return None
    last = matches[-1]
    answer = last.group(1) if pattern.groups and last.group(1) is not None else last.group(0)
    return answer.strip() or None


def normalize_answer(answer: str | None) -> str | None:
    """The voting key: whitespace collapsed, `$...$` and a trailing period removed, numbers canonical
    ("1.0", "1", "+1.00" and "1e0" are one vote; "1,000" equals "1000"). Case is kept (code, symbols)."""
    if answer is None:
        return None
    key = _WS.sub(" ", answer).strip()
    if len(key) >= 2 and key[0] == key[-1] == "$":
        key = key.strip("$").strip()
    key = key.rstrip(".").rstrip()
    if _GROUPED.fullmatch(key):
        key = key.replace(",", "")
    if _NUMBER.fullmatch(key):
        try:
            value = Decimal(key)
        except InvalidOperation:
            return key or None
        if value.is_finite() and abs(value.adjusted()) <= 64:  # "1e999999" must not expand to a huge string
            key = "0" if value == 0 else format(value.normalize(), "f")
    return key or None


@dataclass(slots=True)
class Candidate:
    """One Heavy Mode trajectory. `index` is its position in the rollout; `answer` the extracted answer."""

    index: int
    content: str | None
    reasoning: str | None
    answer: str | None
    mean_logprob: float | None = None
    num_tokens: int = 0
    replica: str | None = None


def make_candidate(index: int, parsed: ParsedOutput, extractor: Extractor, regex_pattern: str | None = None, *,
                   mean_logprob: float | None = None, num_tokens: int = 0, replica: str | None = None) -> Candidate:
    """A `Candidate` from a parsed trajectory, its answer extracted from the content."""
    return Candidate(index, parsed.content, parsed.reasoning_content,
                     extract_answer(parsed.content, extractor, regex_pattern), mean_logprob, num_tokens, replica)


def _logprob(c: Candidate) -> float:
    return -math.inf if c.mean_logprob is None or math.isnan(c.mean_logprob) else c.mean_logprob


def best_logprob(candidates: list[Candidate]) -> int:
    """`index` of the candidate with the highest mean token logprob (None counts lowest); ties: lowest index.

    Raises:
        ValueError: no candidates.
    """
    if not candidates:
        raise ValueError("no candidates to aggregate")
    return min(candidates, key=lambda c: (-_logprob(c), c.index)).index


def vote(candidates: list[Candidate]) -> tuple[int, dict[str, int]]:
    """Majority vote over normalised answers.

    Candidates without an answer do not vote. A tie between answers goes to the answer whose voters have the
    higher average mean logprob, then to the one given by the lowest index. Within the winning answer the
    voter with the best mean logprob (then lowest index) is returned, so its full content can be sent. With
    no answers at all this is `best_logprob`.

    Returns:
        (winning candidate's `index`, {normalised answer: votes}, most votes first).

    Raises:
        ValueError: no candidates.
    """
    if not candidates:
        raise ValueError("no candidates to aggregate")
    groups: dict[str, list[Candidate]] = {}
    for c in sorted(candidates, key=lambda c: c.index):
        key = normalize_answer(c.answer)
        if key is not None:
            groups.setdefault(key, []).append(c)
    if not groups:
        return best_logprob(candidates), {}

    def group_rank(item: tuple[str, list[Candidate]]) -> tuple[int, float, int]:
        members = item[1]
        scores = [_logprob(c) for c in members if math.isfinite(_logprob(c))]
        mean = sum(scores) / len(scores) if scores else -math.inf
        return (-len(members), -mean, members[0].index)

    ranked = sorted(groups.items(), key=group_rank)
    tally = dict(Counter({key: len(members) for key, members in ranked}).most_common())
    return best_logprob(ranked[0][1]), tally


DEFAULT_REFLECT_INSTRUCTION = (
    "Check each attempt critically against the task: some may be wrong, and the majority is not always right. "
    "Then write the single best final response yourself, complete and self-contained, as if replying directly; "
    "do not mention the attempts.")
_NO_ANSWER = "(this attempt produced no final answer)"


def _text_of(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p if isinstance(p, str) else (p.get("text") or "") for p in content if isinstance(p, (str, dict)))
    return ""


def _clip(text: str, max_chars: int) -> str:
    """Keeps the head and tail (the final answer is usually last) of an over-long candidate."""
    if len(text) <= max_chars:
        return text
    head = max_chars // 2
    tail = max_chars - head
    return f"{text[:head]}\n[… {len(text) - max_chars:,} characters omitted …]\n{text[-tail:]}"


def build_reflect_messages(original_messages: list[dict], candidates: list[Candidate], instruction: str | None = None,
                           max_candidate_chars: int = 16384) -> list[dict]:
    """The conversation for K2's reflective aggregation pass: the model reads the candidates and answers.

    When the conversation ends with a user message, that message is replaced by one holding the question, the
    numbered candidates (final content only, never reasoning) and the instruction. When it ends otherwise (an
    agentic step in progress, e.g. after tool results), the conversation is kept and that user message is
    appended, referring to "the conversation above". Earlier messages are kept unchanged.

    Args:
        original_messages: the request's messages.
        candidates: the trajectories, shown in `index` order as Attempt 1..N.
        instruction: replaces DEFAULT_REFLECT_INSTRUCTION.
        max_candidate_chars: each candidate's content is clipped to this (head and tail kept).

    Raises:
        ValueError: no candidates or no messages.
    """
    if not candidates:
        raise ValueError("no candidates to aggregate")
    if not original_messages:
        raise ValueError("messages must be a non-empty list")
    ordered = sorted(candidates, key=lambda c: c.index)
    attempts = "\n\n".join(
        f"### Attempt {n}\n{_clip(c.content, max_candidate_chars) if c.content and c.content.strip() else _NO_ANSWER}"
        for n, c in enumerate(ordered, 1))
    last = original_messages[-1]
    ends_with_user = last.get("role") == "user"
    if ends_with_user:
        intro = f"{_text_of(last.get('content'))}\n\n---\n{len(ordered)} independent attempts at the task above:"
    else:
        intro = f"{len(ordered)} independent attempts at continuing the conversation above:"
    text = f"{intro}\n\n{attempts}\n\n---\n{instruction or DEFAULT_REFLECT_INSTRUCTION}"
    if ends_with_user:
        kept = {k: v for k, v in last.items() if k in ("role", "name")}
        return [*original_messages[:-1], {**kept, "content": text}]
    return [*original_messages, {"role": "user", "content": text}]
