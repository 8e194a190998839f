"""Tokenizer side of serving K2 Thinking: the chat template, a safe chat encoder and tiny test tokenizers.

`ChatEncoder` turns OpenAI-style messages into prompt ids (engine input); `write_tiny_tokenizer` writes the
K2-shaped Hugging Face tokenizer folder that tiny checkpoints ship with.
"""

from raymoe.tokenizer.chat import (
    DEFAULT_SYSTEM_PROMPT,
    ChatEncoder,
    normalize_tool_call_ids,
    read_chat_template,
    validate_messages,
)
from raymoe.tokenizer.tiny import build_tiny_tokenizer, reserved_tokens, write_tiny_tokenizer

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "ChatEncoder",
    "build_tiny_tokenizer",
    "normalize_tool_call_ids",
    "read_chat_template",
    "reserved_tokens",
    "validate_messages",
    "write_tiny_tokenizer",
]
