"""Context management for long agentic loops: make a conversation fit the prompt budget before encoding.

    messages, tools -> [count] -> fits? done : [shrink oldest tool results] -> [drop oldest turns] -> messages

K2 Thinking is stable over 200-300 sequential tool calls, and Moonshot's agentic evals "hide all previous tool
outputs" once the context passes 256k (K2_FACTS §4.4); tool results are the bulk of such a conversation, so
they go first. Kept always: system messages, the tool declarations, the last user message and the last
`keep_last_turns` turns. A turn is one message, except that an assistant message with tool calls and the tool
results right after it are one turn and are dropped together (a result without its call, or the reverse,
confuses the model and breaks clients that pair them up).

Cost: reductions are applied in one fixed order (truncate result 1..T, then drop turn 1..U), so "apply the first
k" is a monotone family searched over k, never counted step by step (~600 counts for 300 calls). The search
interpolates on characters removed, calibrated by the exact counts it has made, and returns the least k that fits
by exact count: typically 4-6 counts in all, at worst log2(T+U) + 6.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, TypedDict

from raymoe.heavy.config import ContextConfig

if TYPE_CHECKING:
    from raymoe.tokenizer.chat import ChatEncoder

_MAX_SECANT_PROBES = 4
CountTokens = Callable[[list[dict], "list[dict] | None"], int]


class ContextReport(TypedDict):
    truncated_tool_results: int  # tool results in the returned messages that were shrunk
    dropped_messages: int
    original_tokens: int
    final_tokens: int


def chat_token_counter(encoder: ChatEncoder) -> CountTokens:
    """`count_tokens` for `fit_messages`: the exact prompt length, generation prompt included."""
    return lambda messages, tools: len(encoder.encode_messages(messages, tools, add_generation_prompt=True))


def _text_of(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p if isinstance(p, str) else (p.get("text") or "") for p in content if isinstance(p, (str, dict)))
    return ""


def _turns(messages: list[dict]) -> list[list[int]]:
    """Non-system messages grouped into turns (message indices), oldest first."""
    turns: list[list[int]] = []
    for i, message in enumerate(messages):
        role = message.get("role")
        if role == "system":
            continue
        if role == "tool" and turns and turns[-1][-1] == i - 1 and messages[turns[-1][0]].get("tool_calls"):
            turns[-1].append(i)  # a result right after its call (or after a sibling result)
        else:
            turns.append([i])
    return turns


def _shrink(message: dict, config: ContextConfig) -> dict:
    text = _text_of(message.get("content"))
    head = text[: config.tool_result_keep_chars]
    marker = config.truncation_marker.format(omitted=len(text) - len(head))
    return {**message, "content": f"{head}\n{marker}" if head else marker}


def fit_messages(messages: list[dict], tools: list[dict] | None, count_tokens: CountTokens, max_prompt_tokens: int,
                 config: ContextConfig) -> tuple[list[dict], ContextReport]:
    """Returns messages whose prompt has at most `max_prompt_tokens` tokens, and what was done to get there.

    First the oldest tool results outside the protected turns are cut to `tool_result_keep_chars` characters
    plus `truncation_marker`; if all of them are cut and it still does not fit, the oldest unprotected turns are
    dropped. The least reduction that fits is returned. The input list and its dicts are never modified.

    Args:
        messages: validated OpenAI-style messages.
        tools: the request's tool declarations (always kept; they count against the budget).
        count_tokens: exact prompt length of (messages, tools), e.g. `chat_token_counter(encoder)`.
        max_prompt_tokens: the budget, e.g. the context length minus the completion's max_tokens.
        config: `serve.context`.

    Returns:
        (messages, report); unchanged messages and zero counts when the prompt already fits.

    Raises:
        ValueError: with the token counts, when strategy is "error" and the prompt is over the budget, or
            when even the protected minimum (system messages, tools, last user message, last turns) is over it.
    """
    original = count_tokens(messages, tools)
    if original <= max_prompt_tokens:
        return messages, ContextReport(truncated_tool_results=0, dropped_messages=0, original_tokens=original,
                                       final_tokens=original)
    if config.strategy == "error":
        raise ValueError(f"prompt is {original} tokens, more than the {max_prompt_tokens} allowed "
                         f"(context.strategy is 'error'; shorten the conversation or lower max_tokens)")

    turns = _turns(messages)
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    protected = {id(t) for t in turns[-config.keep_last_turns:]}
    droppable = [t for t in turns if id(t) not in protected and last_user not in t]
    min_shrink_chars = config.tool_result_keep_chars + len(config.truncation_marker.format(omitted=10**9))
    shrinkable = [i for t in droppable for i in t
                  if messages[i].get("role") == "tool" and len(_text_of(messages[i].get("content"))) > min_shrink_chars]

    def build(k: int) -> tuple[list[dict], int]:
        """The first k reductions applied: returns (messages, number of shrunk results kept)."""
        shrunk = set(shrinkable[:k])
        dropped = {i for t in droppable[: max(0, k - len(shrinkable))] for i in t}
        out = [_shrink(m, config) if i in shrunk else m for i, m in enumerate(messages) if i not in dropped]
        return out, len(shrunk - dropped)

    k_max = len(shrinkable) + len(droppable)
    counts = {0: original}

    def fits(k: int) -> bool:
        counts[k] = count_tokens(build(k)[0], tools)
        return counts[k] <= max_prompt_tokens

    if not fits(k_max):
        raise ValueError(f"prompt is {original} tokens and at least {counts[k_max]} after context management "
                         f"(system messages, tools, the last user message and the last {config.keep_last_turns} "
                         f"turns are kept), more than the {max_prompt_tokens} allowed")
    # Search on the characters-removed scale, where token counts fall about linearly: a probe is the secant
    # through the last two exact counts when that lands inside the bracket (local slope: fast near the answer),
    # else the chord across the bracket. After _MAX_SECANT_PROBES it bisects, so at worst 2 + 4 + log2(k_max)
    # counts; typically the first probes land next to the answer and 4-6 counts are all it takes.
    removed = _removed_chars(messages, shrinkable, droppable, config)
    lo, hi = 0, k_max  # invariant: k=lo is over the budget, k=hi fits
    recent = [0, k_max]
    while hi - lo > 1:
        probe = (lo + hi) // 2
        if len(recent) - 2 < _MAX_SECANT_PROBES:
            for a, b in ((recent[-2], recent[-1]), (lo, hi)):
                if counts[a] != counts[b] and removed[a] != removed[b]:
                    per_char = (counts[a] - counts[b]) / (removed[b] - removed[a])
                    target = removed[a] + (counts[a] - max_prompt_tokens) / per_char
                    if removed[lo] < target < removed[hi]:
                        probe = min(max(bisect.bisect_left(removed, target), lo + 1), hi - 1)
                        break
        lo, hi = (lo, probe) if fits(probe) else (probe, hi)
        recent.append(probe)
    fitted, num_shrunk = build(hi)
    return fitted, ContextReport(truncated_tool_results=num_shrunk, dropped_messages=len(messages) - len(fitted),
                                 original_tokens=original, final_tokens=counts[hi])


def _removed_chars(messages: list[dict], shrinkable: list[int], droppable: list[list[int]],
                   config: ContextConfig) -> list[int]:
    """removed[k]: characters gone after the first k reductions (a proxy for tokens, nondecreasing in k)."""
    sizes = {i: len(json.dumps(m, ensure_ascii=False, default=str)) for i, m in enumerate(messages)}
    removed = [0]
    for i in shrinkable:
        cut = len(_text_of(messages[i].get("content"))) - len(_shrink(messages[i], config)["content"])
        sizes[i] -= cut
        removed.append(removed[-1] + cut)
    for turn in droppable:
        removed.append(removed[-1] + sum(sizes[i] for i in turn))
    return removed
