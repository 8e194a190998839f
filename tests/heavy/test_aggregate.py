"""Heavy Mode: plan resolution from the request field and the model alias, answer extraction, voting,
best-logprob selection, and the reflective-aggregation prompt rendered through ChatEncoder."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from transformers import AutoTokenizer

from raymoe.heavy import (
    Candidate,
    HeavyConfig,
    HeavyRequest,
    best_logprob,
    build_reflect_messages,
    extract_answer,
    make_candidate,
    normalize_answer,
    resolve_heavy,
    vote,
)
from raymoe.serve.parsers import parse_output
from raymoe.tokenizer import ChatEncoder, write_tiny_tokenizer


def cand(index, answer, logprob=None, content=None):
    return Candidate(index=index, content=content if content is not None else f"The answer is {answer}",
                     reasoning=f"secret reasoning {index}", answer=answer, mean_logprob=logprob)


# plan resolution


def test_no_field_and_plain_model_is_not_heavy():
    assert resolve_heavy(None, "kimi", HeavyConfig()) is None
    assert resolve_heavy(False, "kimi", HeavyConfig()) is None


def test_heavy_true_uses_the_configured_defaults():
    plan = resolve_heavy(True, "kimi", HeavyConfig())
    assert (plan.trajectories, plan.aggregate, plan.extractor, plan.model) == (8, "reflect", "boxed", "kimi")


def test_request_field_overrides_defaults():
    plan = resolve_heavy({"trajectories": 4, "aggregate": "vote", "extractor": "last_line"}, "kimi", HeavyConfig())
    assert (plan.trajectories, plan.aggregate, plan.extractor) == (4, "vote", "last_line")
    assert resolve_heavy(HeavyRequest(trajectories=2), "kimi", HeavyConfig()).trajectories == 2


def test_model_alias_alone_turns_heavy_on_with_defaults_and_names_the_served_model():
    plan = resolve_heavy(None, "kimi-k2-heavy", HeavyConfig())
    assert plan.model == "kimi-k2" and plan.trajectories == 8 and plan.aggregate == "reflect"


def test_alias_with_request_field_uses_the_field():
    plan = resolve_heavy({"trajectories": 3}, "kimi-heavy", HeavyConfig(), served_name="kimi")
    assert plan.trajectories == 3 and plan.model == "kimi"


def test_served_name_ending_in_the_suffix_is_not_an_alias_of_itself():
    assert resolve_heavy(None, "tiny-heavy", HeavyConfig(), served_name="tiny-heavy") is None
    assert resolve_heavy(None, "tiny-heavy-heavy", HeavyConfig(), served_name="tiny-heavy").model == "tiny-heavy"


def test_custom_alias_suffix():
    assert resolve_heavy(None, "kimi@max", HeavyConfig(model_alias_suffix="@max")).model == "kimi"
    assert resolve_heavy(None, "kimi-heavy", HeavyConfig(model_alias_suffix="@max")) is None


@pytest.mark.parametrize("field,param", [
    ({"trajectories": 0}, "heavy.trajectories"),
    ({"trajectories": 17}, "heavy.trajectories"),
    ({"trajectories": "8"}, "heavy.trajectories"),
    ({"aggregate": "median"}, "heavy.aggregate"),
    ({"extractor": "first_line"}, "heavy.extractor"),
    ({"extractor": "regex"}, "heavy.extractor_regex"),
    ({"extractor_regex": "("}, "heavy.extractor_regex"),
    ({"extractor_regex": "a" * 300}, "heavy.extractor_regex"),
    ({"extractor": "boxed", "extractor_regex": "x"}, "heavy.extractor_regex"),
    ({"trajectory": 4}, "heavy.trajectory"),
    ("yes", "heavy"),
])
def test_bad_heavy_params_raise_value_error_naming_the_param(field, param):
    with pytest.raises(ValueError, match=param.replace(".", r"\.")):
        resolve_heavy(field, "kimi", HeavyConfig())


def test_request_regex_implies_the_regex_extractor():
    plan = resolve_heavy({"extractor_regex": r"ANSWER: (\d+)"}, "kimi", HeavyConfig())
    assert plan.extractor == "regex" and plan.extractor_regex == r"ANSWER: (\d+)"


def test_request_regex_can_be_forbidden():
    with pytest.raises(ValueError, match="not allowed"):
        resolve_heavy({"extractor_regex": "x"}, "kimi", HeavyConfig(allow_request_regex=False))


def test_disabled_heavy_mode_rejects_field_and_alias():
    config = HeavyConfig(enabled=False)
    for field, model in ((True, "kimi"), ({"trajectories": 2}, "kimi"), (None, "kimi-heavy")):
        with pytest.raises(ValueError, match="heavy mode is disabled"):
            resolve_heavy(field, model, config)
    assert resolve_heavy(None, "kimi", config) is None


def test_heavy_false_contradicting_the_alias_is_an_error():
    with pytest.raises(ValueError, match="alias"):
        resolve_heavy(False, "kimi-heavy", HeavyConfig())


@pytest.mark.parametrize("kwargs", [
    {"default_trajectories": 0}, {"default_trajectories": 20, "max_trajectories": 16},
    {"extractor": "regex"}, {"extractor_regex": "("}, {"default_aggregate": "median"}, {"typo": 1},
])
def test_bad_heavy_config_fails_at_construction(kwargs):
    with pytest.raises(ValidationError):
        HeavyConfig(**kwargs)


def test_heavy_config_is_frozen():
    with pytest.raises(ValidationError):
        HeavyConfig().enabled = False


# extraction


@pytest.mark.parametrize("text,extractor,pattern,expected", [
    (r"so \boxed{1} then \boxed{\frac{1}{2}}.", "boxed", None, r"\frac{1}{2}"),
    (r"\boxed{ {a} \} }", "boxed", None, r"{a} \}"),
    ("\\boxed{42}\nthen \\boxed{4", "boxed", None, "42"),  # a truncated last box is skipped
    ("no box here\n\nfinal: 7\n  \n", "boxed", None, "final: 7"),  # boxed falls back to the last line
    ("one\ntwo  \n\n", "last_line", None, "two"),
    ("   \n", "last_line", None, None),
    ("", "boxed", None, None),
    (None, "boxed", None, None),
    ("ANSWER: 3 ... ANSWER: 5", "regex", r"ANSWER: (\d+)", "5"),
    ("x=1, x=22", "regex", r"x=\d+", "x=22"),  # no group: the whole match
    ("nothing to see", "regex", r"ANSWER: (\d+)", None),  # regex has no fallback
])
def test_extract_answer(text, extractor, pattern, expected):
    assert extract_answer(text, extractor, pattern) == expected


def test_catastrophic_regex_times_out_as_no_answer():
    assert extract_answer("a" * 40 + "!", "regex", r"(a|aa)+$") is None


def test_extract_answer_rejects_unknown_extractor():
    with pytest.raises(ValueError, match="extractor"):
        extract_answer("x", "first_line")


@pytest.mark.parametrize("raw,key", [
    ("1.0", "1"), ("1", "1"), ("+1.00", "1"), ("1e0", "1"), ("1,000", "1000"), ("-0.0", "0"), ("0.50", "0.5"),
    ("  Paris.  ", "Paris"), ("a   b\n c", "a b c"), ("$42$", "42"), ("1e99999", "1e99999"), ("", None), (".", None),
])
def test_normalize_answer(raw, key):
    assert normalize_answer(raw) == key


def test_make_candidate_extracts_from_content_not_reasoning():
    parsed = parse_output(r"<think>maybe \boxed{3}</think>It is \boxed{4}.")
    c = make_candidate(2, parsed, "boxed", mean_logprob=-0.5, num_tokens=12, replica="r1")
    assert (c.index, c.answer, c.reasoning, c.replica) == (2, "4", r"maybe \boxed{3}", "r1")


# vote / best_logprob


def test_vote_majority_wins_with_numeric_normalisation():
    winner, tally = vote([cand(0, "7", -0.1), cand(1, "1.0", -0.9), cand(2, "1", -0.5), cand(3, "1.", -0.7)])
    assert tally == {"1": 3, "7": 1}
    assert winner == 2  # the best-logprob voter of the winning answer


def test_vote_tie_goes_to_higher_mean_logprob():
    winner, tally = vote([cand(0, "A", -2.0), cand(1, "B", -0.2), cand(2, "A", -1.0), cand(3, "B", -0.4)])
    assert tally == {"A": 2, "B": 2} and winner == 1


def test_vote_tie_without_logprobs_goes_to_lowest_index():
    winner, _ = vote([cand(3, "B"), cand(1, "A"), cand(2, "B"), cand(0, "A")])
    assert winner == 0


def test_unparseable_answers_do_not_vote():
    winner, tally = vote([cand(0, None, -0.01), cand(1, None, -0.02), cand(2, None, -0.03), cand(3, "9", -3.0)])
    assert tally == {"9": 1} and winner == 3


def test_all_unparseable_falls_back_to_best_logprob():
    winner, tally = vote([cand(0, None, -1.0), cand(1, None, -0.3), cand(2, None, None)])
    assert (winner, tally) == (1, {})


def test_best_logprob_treats_missing_as_lowest_and_breaks_ties_by_index():
    assert best_logprob([cand(0, "a", None), cand(1, "b", -5.0)]) == 1
    assert best_logprob([cand(2, "a", -1.0), cand(1, "b", -1.0)]) == 1
    assert best_logprob([cand(0, "a"), cand(1, "b")]) == 0
    with pytest.raises(ValueError):
        best_logprob([])
    with pytest.raises(ValueError):
        vote([])


# reflective aggregation


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return ChatEncoder(AutoTokenizer.from_pretrained(str(write_tiny_tokenizer(tmp_path_factory.mktemp("tok")))))


def test_reflect_messages_replace_the_question_with_question_and_numbered_candidates(encoder):
    original = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "What is 6*7?"}]
    candidates = [cand(1, "42", content="It is 42."), cand(0, "41", content="Surely 41."),
                  Candidate(2, None, "thinking only", None)]
    messages = build_reflect_messages(original, candidates)
    assert messages[0] == original[0] and len(messages) == 2 and messages[1]["role"] == "user"
    text = messages[1]["content"]
    assert text.startswith("What is 6*7?")
    assert text.index("### Attempt 1\nSurely 41.") < text.index("### Attempt 2\nIt is 42.")  # in index order
    assert "### Attempt 3\n(this attempt produced no final answer)" in text
    assert "secret reasoning" not in text and "thinking only" not in text  # reasoning never shown
    assert original[1]["content"] == "What is 6*7?"  # input untouched

    ids = encoder.encode_messages(messages)
    assert ids[-2:] == encoder.encode_messages([{"role": "user", "content": "x"}])[-2:]  # ends in the gen prompt
    decoded = encoder.tokenizer.decode(ids)
    for c in candidates:
        if c.content:
            assert c.content in decoded


def test_reflect_after_an_agentic_step_appends_a_user_message(encoder):
    original = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "functions.w:0", "type": "function", "function": {"name": "w", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "functions.w:0", "content": "sunny"}]
    messages = build_reflect_messages(original, [cand(0, "x", content="Sunny."), cand(1, "y", content="Warm.")],
                                      instruction="Pick one.")
    assert messages[:3] == original and messages[3]["role"] == "user"
    assert "conversation above" in messages[3]["content"] and messages[3]["content"].endswith("Pick one.")
    assert "Sunny." in encoder.tokenizer.decode(encoder.encode_messages(messages))


def test_reflect_clips_long_candidates_keeping_head_and_tail():
    long = "HEAD" + "x" * 10_000 + "TAIL"
    text = build_reflect_messages([{"role": "user", "content": "q"}], [cand(0, "a", content=long)],
                                  max_candidate_chars=100)[-1]["content"]
    assert "HEAD" in text and "TAIL" in text and "characters omitted" in text and len(text) < 1000
