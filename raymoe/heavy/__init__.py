"""Heavy Mode, thinking budgets, tool-call validation and context management: the pure parts (no Ray, no HTTP).

The ingress resolves a request's plan with `resolve_heavy`, fits its prompt with `fit_messages`, aggregates
trajectories with `vote` / `best_logprob` / `build_reflect_messages`, and checks each choice's tool calls
with `apply_policy`.
"""

from raymoe.heavy.aggregate import (
    Candidate,
    best_logprob,
    build_reflect_messages,
    extract_answer,
    make_candidate,
    normalize_answer,
    vote,
)
from raymoe.heavy.config import (
    ContextConfig,
    HeavyConfig,
    HeavyPlan,
    HeavyRequest,
    ReasoningConfig,
    ToolValidationConfig,
    resolve_heavy,
    resolve_thinking_budget,
)
from raymoe.heavy.context import ContextReport, chat_token_counter, fit_messages
from raymoe.heavy.tool_validation import (
    ToolCallDecision,
    ToolCallIssue,
    ToolValidator,
    apply_policy,
    check_tools,
    partition_tool_calls,
    validate_tool_call,
)

__all__ = [
    "Candidate",
    "ContextConfig",
    "ContextReport",
    "HeavyConfig",
    "HeavyPlan",
    "HeavyRequest",
    "ReasoningConfig",
    "ToolCallDecision",
    "ToolCallIssue",
    "ToolValidationConfig",
    "ToolValidator",
    "apply_policy",
    "best_logprob",
    "build_reflect_messages",
    "chat_token_counter",
    "check_tools",
    "extract_answer",
    "fit_messages",
    "make_candidate",
    "normalize_answer",
    "partition_tool_calls",
    "resolve_heavy",
    "resolve_thinking_budget",
    "validate_tool_call",
    "vote",
]
