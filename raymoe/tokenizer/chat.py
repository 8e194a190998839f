"""OpenAI-style chat messages -> K2 Thinking prompt token ids, without letting user text become control tokens.

    messages, tools -> [validate] -> [normalise tool-call ids] -> [mask user strings] -> chat template
        -> [split at the template's markers] -> marker ids + plain byte-BPE ids for everything else

The guard: every string a client supplied (contents, names, reasoning, tool ids/arguments, tool schemas) reaches
the template as an opaque placeholder, so each control-token string left in the render was written by the template
itself. Those become their single ids; the runs between them get their placeholders filled back in and are
encoded by a copy of the backend with no added vocabulary, so a typed `<|im_end|>` or `<think>` is just bytes.
`split_special_tokens=True` is not enough: the backend still matches non-special added tokens (`<think>`, the
tool-call markers). For benign input the ids equal `tokenizer.apply_chat_template(..., tokenize=True)`.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

CHAT_TEMPLATE_PATH = Path(__file__).with_name("chat_template.jinja")
DEFAULT_SYSTEM_PROMPT = "You are Kimi, an AI assistant created by Moonshot AI."
ROLES = ("system", "user", "assistant", "tool")
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # transformers' alias order

# Private-use code points: json.dumps(ensure_ascii=False) leaves them as they are, so a placeholder inside a
# tool schema survives `tojson` unchanged.
_OPEN, _CLOSE = "\ue000", "\ue001"
_PLACEHOLDER_RE = re.compile(f"{_OPEN}(\\d+){_CLOSE}")


def read_chat_template() -> str:
    """The K2 Thinking chat template shipped with raymoe (`chat_template.jinja`)."""
    return CHAT_TEMPLATE_PATH.read_text(encoding="utf-8")


def _is_k2_call_id(call_id: Any, name: str) -> bool:
    return isinstance(call_id, str) and re.fullmatch(rf"functions\.{re.escape(name)}:\d+", call_id) is not None


def normalize_tool_call_ids(messages: list[dict]) -> list[dict]:
    """Rewrite foreign tool-call ids (`search:2`, `call_abc`) to K2's `functions.{name}:{idx}`.

    K2's parsers split ids as `functions.NAME:IDX`; Moonshot's API rewrites historical ids this way before
    inference (K2_FACTS §4.3). `idx` is the call's position among all calls in the conversation, bumped past ids
    already taken. Conforming ids are kept. A tool result follows the most recent call that carried its id, so
    clients that reuse `call_0` every turn still pair up.

    Args:
        messages: messages that passed `validate_messages`.

    Returns:
        New message dicts; the input is not modified.
    """
    out = copy.deepcopy(messages)
    calls = [c for m in out if m.get("role") == "assistant" for c in (m.get("tool_calls") or [])]
    taken = {c.get("id") for c in calls if _is_k2_call_id(c.get("id"), c["function"]["name"])}
    renamed: dict[Any, str] = {}
    position = 0
    for message in out:
        if message.get("role") == "assistant":
            for call in message.get("tool_calls") or []:
                old, name = call.get("id"), call["function"]["name"]
                if not _is_k2_call_id(old, name):
                    idx = position
                    while f"functions.{name}:{idx}" in taken:
                        idx += 1
                    call["id"] = f"functions.{name}:{idx}"
                    taken.add(call["id"])
                if old is not None:
                    renamed[old] = call["id"]
                position += 1
        elif message.get("role") == "tool" and message.get("tool_call_id") in renamed:
            message["tool_call_id"] = renamed[message["tool_call_id"]]
    return out


def _check_str(value: Any, field: str, *, optional: bool = True) -> None:
    if (value is None and optional) or isinstance(value, str):
        return
    raise ValueError(f"{field} must be a string, got {type(value).__name__}")


def _check_json(value: Any, field: str) -> None:
    try:
        json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{field} is not JSON-serialisable: {e}") from e


def validate_messages(messages: Any, tools: Any = None) -> None:
    """Check messages (and tools) against what the K2 template renders.

    Raises:
        ValueError: naming the offending field, e.g. `messages[2].role 'bot' is not one of ...`.
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ValueError(f"{where} must be an object, got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"{where}.role {role!r} is not one of {', '.join(ROLES)}")
        _check_str(message.get("name"), f"{where}.name")
        content = message.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if isinstance(part, str):
                    continue
                if not isinstance(part, dict) or part.get("type", "text") != "text":
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise ValueError(f"{where}.content[{j}] of type {kind!r} is not supported (text parts only)")
                _check_str(part.get("text"), f"{where}.content[{j}].text")
        elif content is not None and not isinstance(content, str):
            raise ValueError(f"{where}.content must be a string, a list of text parts or null")
        for key in REASONING_FIELDS:
            _check_str(message.get(key), f"{where}.{key}")
        if role == "tool":
            if not isinstance(message.get("tool_call_id"), str) or not message["tool_call_id"]:
                raise ValueError(f"{where}.tool_call_id is required for role 'tool' (a non-empty string)")
        if message.get("tool_calls") is not None:
            if role != "assistant":
                raise ValueError(f"{where}.tool_calls is only allowed on assistant messages, not {role!r}")
            _validate_tool_calls(message["tool_calls"], f"{where}.tool_calls")
    if tools is not None:
        if not isinstance(tools, list):
            raise ValueError("tools must be a list")
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict):
                raise ValueError(f"tools[{i}] must be an object, got {type(tool).__name__}")
            _check_json(tool, f"tools[{i}]")


def _validate_tool_calls(calls: Any, where: str) -> None:
    if not isinstance(calls, list):
        raise ValueError(f"{where} must be a list")
    for k, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict):
            raise ValueError(f"{where}[{k}].function must be an object with name and arguments")
        _check_str(call.get("id"), f"{where}[{k}].id")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"{where}[{k}].function.name must be a non-empty string")
        args = fn.get("arguments")
        if not isinstance(args, (str, dict)):
            raise ValueError(f"{where}[{k}].function.arguments must be a string or an object")
        _check_json(args, f"{where}[{k}].function.arguments")


def _prepare(messages: list[dict]) -> list[dict]:
    """Keep the fields the template reads, with reasoning under `reasoning_content` (aliases resolved)."""
    out = []
    for message in normalize_tool_call_ids(messages):
        kept = {k: message[k] for k in ("role", "content", "name", "tool_calls", "tool_call_id") if k in message}
        reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            kept["reasoning_content"] = reasoning
        out.append(kept)
    return out


class _Masker:
    """Swaps user strings for placeholders and remembers what each one stands for in the rendered text."""

    def __init__(self) -> None:
        self.values: list[str] = []

    def text(self, value: Any) -> Any:
        if not isinstance(value, str) or not value:
            return value  # '' stays falsy for `name or role`; None and numbers carry no text
        self.values.append(value)
        return f"{_OPEN}{len(self.values) - 1}{_CLOSE}"

    def json(self, value: Any) -> Any:
        """Mask strings inside a structure the template will `tojson`; each one renders JSON-escaped."""
        if isinstance(value, str):
            return self.text(json.dumps(value, ensure_ascii=False)[1:-1]) if value else value
        if isinstance(value, dict):
            return {self.json(k): self.json(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.json(v) for v in value]
        return value

    def message(self, message: dict) -> dict:
        out = {"role": message["role"]}
        for key in ("name", "tool_call_id", "reasoning_content"):
            if key in message:
                out[key] = self.text(message[key])
        content = message.get("content")
        if isinstance(content, list):
            content = [self.text(p) if isinstance(p, str) else {**p, "text": self.text(p.get("text"))}
                       for p in content]
        out["content"] = self.text(content)
        if message.get("tool_calls"):
            out["tool_calls"] = [self._call(c) for c in message["tool_calls"]]
        return out

    def _call(self, call: dict) -> dict:
        fn, args = call["function"], call["function"]["arguments"]
        return {"id": self.text(call["id"]), "type": "function", "function": {
            "name": self.text(fn["name"]), "arguments": self.text(args) if isinstance(args, str) else self.json(args)}}


class ChatEncoder:
    """Render and tokenize K2 Thinking chats through a Hugging Face fast tokenizer's chat template.

    Args:
        tokenizer: a transformers fast tokenizer (`backend_tokenizer` present) with a chat template.

    Raises:
        ValueError: the tokenizer is not a fast tokenizer or has no chat template.
    """

    def __init__(self, tokenizer: Any) -> None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if not isinstance(backend, Tokenizer):
            raise ValueError(f"ChatEncoder needs a fast (tokenizers-backed) tokenizer, got {type(tokenizer).__name__}")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("tokenizer has no chat_template")
        self.tokenizer = tokenizer
        self.marker_ids: dict[str, int] = dict(tokenizer.get_added_vocab())
        longest_first = sorted(self.marker_ids, key=len, reverse=True)
        self._marker_re = re.compile("|".join(map(re.escape, longest_first)))
        # The same model/pre-tokenizer with the added vocabulary removed: it cannot emit a control id.
        spec = json.loads(backend.to_str())
        spec.update(added_tokens=[], post_processor=None, truncation=None, padding=None)
        self._plain = Tokenizer.from_str(json.dumps(spec))

    @property
    def stop_token_ids(self) -> list[int]:
        """Ids that end a K2 Thinking turn: `<|im_end|>`, then `[EOS]` (K2_FACTS §3.1)."""
        return [self.marker_ids[t] for t in ("<|im_end|>", "[EOS]") if t in self.marker_ids]

    def encode_plain(self, text: str) -> list[int]:
        """Byte-BPE ids of `text` with no added-token matching: control-token strings stay text."""
        return self._plain.encode(text, add_special_tokens=False).ids

    def render(self, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True) -> str:
        """The prompt string (ids normalised, reasoning aliases resolved); see `encode_messages`."""
        validate_messages(messages, tools)
        return self._apply(_prepare(messages), tools, add_generation_prompt)

    def encode_messages(self, messages: list[dict], tools: list[dict] | None = None,
                        add_generation_prompt: bool = True) -> list[int]:
        """Prompt token ids in which only the template's own markers are control tokens.

        Args:
            messages: OpenAI-style messages (`role`, `content`, `name`, `tool_calls`, `tool_call_id`,
                `reasoning_content`).
            tools: OpenAI-style tool declarations, rendered as JSON in the `tool_declare` block.
            add_generation_prompt: end with `<|im_assistant|>assistant<|im_middle|>`.

        Raises:
            ValueError: a malformed message or tool, naming the field.
        """
        validate_messages(messages, tools)
        prepared = _prepare(messages)
        masker = _Masker()
        masked = self._apply([masker.message(m) for m in prepared], masker.json(tools), add_generation_prompt)
        ids, text = [], []
        pos = 0
        for match in [*self._marker_re.finditer(masked), None]:
            run = masked[pos:match.start() if match else len(masked)]
            run = _PLACEHOLDER_RE.sub(lambda m: masker.values[int(m.group(1))], run)
            if run:
                ids.extend(self.encode_plain(run))
                text.append(run)
            if match:
                ids.append(self.marker_ids[match.group()])
                text.append(match.group())
                pos = match.end()
        # A template that edits strings (slicing, sort_keys) would break placeholders; refuse rather than guess.
        if "".join(text) != self._apply(prepared, tools, add_generation_prompt):
            raise RuntimeError("chat template altered user text; cannot separate it from template markers")
        return ids

    def _apply(self, messages: list[dict], tools: list[dict] | None, add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tools=tools or None, tokenize=False, add_generation_prompt=add_generation_prompt)
