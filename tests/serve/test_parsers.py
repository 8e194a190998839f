"""K2 output parser: named cases with exact expectations, then the central property that every
chunking of the stream concatenates to `parse_output(text)`, over named and generated outputs.

Chunkings are seeded (deterministic, no extra test dependency): whole text, char by char, every
two-way split, token-like (markers atomic, as the tokenizer emits them) and random cuts that bundle
several markers in one delta (speculative decoding, vLLM #38274).
"""

from __future__ import annotations

import json
import random
import re

import pytest

from raymoe.serve.parsers import (
    DeltaMessage,
    K2StreamParser,
    ParsedOutput,
    ToolCall,
    parse_output,
)

SEC_B, SEC_E = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
SEC_B1, SEC_E1 = "<|tool_call_section_begin|>", "<|tool_call_section_end|>"
CALL_B, ARG_B, CALL_E = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"
MARKERS = ("<think>", "</think>", SEC_B, SEC_E, SEC_B1, SEC_E1, CALL_B, ARG_B, CALL_E)
_MARKER_SPLIT = re.compile("(" + "|".join(map(re.escape, MARKERS)) + ")")
NUM_SEEDS = 20


def call(name_or_id: str, args: str) -> str:
    return f"{CALL_B}{name_or_id}{ARG_B}{args}{CALL_E}"


def out(reasoning: str | None, content: str | None, *calls: tuple[str, str, str]) -> ParsedOutput:
    return ParsedOutput(reasoning, content, [ToolCall(i, n, a, k) for k, (i, n, a) in enumerate(calls)])


# chunkers and the streaming oracle


def chunkings(text: str, seeds: int = NUM_SEEDS):
    yield [text]
    yield list(text)
    for k in range(1, len(text)):
        yield [text[:k], text[k:]]
    for seed in range(seeds):
        rng = random.Random(seed)
        tokens: list[str] = []  # token-like: markers whole, other text in 1-4 char pieces
        for part in _MARKER_SPLIT.split(text):
            if part in MARKERS:
                tokens.append(part)
            else:
                while part:
                    n = rng.randint(1, 4)
                    tokens.append(part[:n])
                    part = part[n:]
        yield tokens
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 6)))) if len(text) > 1 else []
        yield [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


def stream(chunks: list[str], expect_reasoning: bool = True) -> ParsedOutput:
    """Feeds `chunks`, checks the OpenAI delta protocol, and concatenates the deltas."""
    parser = K2StreamParser(expect_reasoning=expect_reasoning)
    deltas = [parser.feed(c) for c in chunks] + [parser.finish()]
    parsed = assemble(deltas)
    assert parser.has_tool_calls == bool(parsed.tool_calls)
    return parsed


def assemble(deltas: list[DeltaMessage | None]) -> ParsedOutput:
    """Concatenates deltas as an OpenAI client would, checking the delta protocol on the way."""
    reasoning, content, calls = "", "", []
    for d in deltas:
        if d is None:
            continue
        assert isinstance(d, DeltaMessage)
        assert d.reasoning_content or d.content or d.tool_calls, "empty delta instead of None"
        reasoning += d.reasoning_content or ""
        content += d.content or ""
        for tc in d.tool_calls:
            if tc.index == len(calls):  # first delta of a call: id and name
                assert tc.id and tc.name is not None, tc
                calls.append(ToolCall(tc.id, tc.name, tc.arguments, tc.index))
            else:  # later deltas: only argument fragments, and only for the newest call
                assert tc.index == len(calls) - 1 and tc.id is None and tc.name is None, tc
                assert tc.arguments, "empty argument fragment"
                calls[-1].arguments += tc.arguments
    return ParsedOutput(reasoning or None, content or None, calls)


def assert_streams_like_whole(text: str, expect_reasoning: bool = True, seeds: int = NUM_SEEDS) -> ParsedOutput:
    whole = parse_output(text, expect_reasoning=expect_reasoning)
    for chunks in chunkings(text, seeds):
        assert stream(chunks, expect_reasoning) == whole, f"chunks={chunks!r}"
    return whole


# named cases: (text, expected, expect_reasoning)

WEATHER = call("functions.get_weather:0", '{"city": "Paris"}')
WEATHER_CALL = ("functions.get_weather:0", "get_weather", '{"city": "Paris"}')
PADDED_ID = " functions.get_weather:7 \n"
ARGS_TRICKY = '{\n  "q": "<|tool_call",\n  "note": "</think> and <|tool_calls_section_end and <think>"\n}'

CASES = {
    "reasoning_and_answer": (
        "<think>Let me think.</think>The answer is 4.",
        out("Let me think.", "The answer is 4."),
        True,
    ),
    "leading_whitespace_before_think": (
        " <think> The user says hi.\n</think>\n\nHello!",
        out(" The user says hi.\n", "\n\nHello!"),
        True,
    ),
    "no_think_opener": ("thinking...</think>answer", out("thinking...", "answer"), True),
    "truncated_reasoning": ("<think>still thinking about <|tool_c", out("still thinking about <|tool_c", None), True),
    "no_markers_expect_reasoning": ("Hello there", out("Hello there", None), True),
    "empty_reasoning": ("<think></think>Hi", out(None, "Hi"), True),
    "empty_output": ("", out(None, None), True),
    "section_without_think_end": (
        f"<think>I should call the tool.{SEC_B}{WEATHER}{SEC_E}",
        out("I should call the tool.", None, WEATHER_CALL),
        True,
    ),
    "bare_call_without_think_end": (f"<think>need weather{WEATHER}", out("need weather", None, WEATHER_CALL), True),
    "missing_section_end": (f"<think>r</think>{SEC_B}{WEATHER}", out("r", None, WEATHER_CALL), True),
    "missing_final_call_end_valid_json": (
        f'<think>r</think>{SEC_B}{CALL_B}functions.get_weather:0{ARG_B} {{"city": "Paris"}} ',
        out("r", None, WEATHER_CALL),
        True,
    ),
    # documented choice: the header was streamed, so the cut call is kept with its partial arguments
    "missing_final_call_end_cut_json": (
        f'<think>r</think>{SEC_B}{WEATHER}{CALL_B}functions.search:1{ARG_B}{{"q": "par',
        out("r", None, WEATHER_CALL, ("functions.search:1", "search", '{"q": "par')),
        True,
    ),
    "cut_inside_call_header": (
        f"<think>r</think>{SEC_B}{WEATHER}{CALL_B}functions.sea",
        out("r", None, WEATHER_CALL),
        True,
    ),
    "cut_inside_final_marker": (
        f'<think>r</think>{SEC_B}{CALL_B}functions.f:0{ARG_B}{{"a": 1}}<|tool_call_e',
        out("r", None, ("functions.f:0", "f", '{"a": 1}<|tool_call_e')),
        True,
    ),
    "several_calls": (
        f"<think>r</think>{SEC_B}{WEATHER}\n{call('functions.search:1', '{}')} {call('functions.mcp.fs.read:2', '[1]')}{SEC_E}",
        out(
            "r",
            None,
            WEATHER_CALL,
            ("functions.search:1", "search", "{}"),
            ("functions.mcp.fs.read:2", "mcp.fs.read", "[1]"),
        ),
        True,
    ),
    "ids_normalised": (
        f"<think>r</think>{SEC_B}{call('search:2', '{}')}{call('lookup', '{}')}{call(PADDED_ID, '{}')}{SEC_E}",
        out(
            "r",
            None,
            ("functions.search:0", "search", "{}"),
            ("functions.lookup:1", "lookup", "{}"),
            ("functions.get_weather:7", "get_weather", "{}"),
        ),
        True,
    ),
    "arguments_with_newlines_and_marker_like_text": (
        f"<think>r</think>{SEC_B}{call('functions.f:0', chr(10) + ARGS_TRICKY + chr(10))}{SEC_E}",
        out("r", None, ("functions.f:0", "f", ARGS_TRICKY)),
        True,
    ),
    "think_end_after_reasoning_is_content": (
        "<think>r</think>Close with </think> or <think>.</think>",
        out("r", "Close with </think> or <think>.</think>"),
        True,
    ),
    "singular_section_markers": (
        f"<think>r</think>{SEC_B1}{WEATHER}{SEC_E1}Done.",
        out("r", "Done.", WEATHER_CALL),
        True,
    ),
    "content_before_section_preserved": (
        f"<think>r</think>Let me check the weather.\n\n{SEC_B}{WEATHER}{SEC_E}",
        out("r", "Let me check the weather.", WEATHER_CALL),
        True,
    ),
    "content_after_section_end": (
        f"<think>r</think>Checking.\n{SEC_B}{WEATHER}{SEC_E}\nIt is sunny.\n",
        out("r", "Checking.\n\nIt is sunny.", WEATHER_CALL),
        True,
    ),
    "blank_content_is_none": (f"<think>r</think>\n\n{SEC_B}{WEATHER}{SEC_E}\n", out("r", None, WEATHER_CALL), True),
    "junk_between_calls_dropped": (
        f"<think>r</think>{SEC_B}junk{WEATHER}more junk{SEC_E}",
        out("r", None, WEATHER_CALL),
        True,
    ),
    "missing_call_end_before_next_call": (
        f"<think>r</think>{SEC_B}{CALL_B}functions.a:0{ARG_B}{{}}{CALL_B}functions.b:1{ARG_B}[]{CALL_E}{SEC_E}",
        out("r", None, ("functions.a:0", "a", "{}"), ("functions.b:1", "b", "[]")),
        True,
    ),
    "second_section_continues_indices": (
        f"<think>r</think>{SEC_B}{WEATHER}{SEC_E}{SEC_B}{call('search:0', '{}')}{SEC_E}",
        out("r", None, WEATHER_CALL, ("functions.search:1", "search", "{}")),
        True,
    ),
    "no_reasoning_flag_plain_answer": ("Hello</think> there", out(None, "Hello</think> there"), False),
    "no_reasoning_flag_opened_think": ("  <think>r</think>Hi", out("r", "Hi"), False),
    "no_reasoning_flag_tool_call": (f"Sure.{SEC_B}{WEATHER}{SEC_E}", out(None, "Sure.", WEATHER_CALL), False),
    "no_reasoning_flag_partial_think_at_end": ("<thi", out(None, "<thi"), False),
}


@pytest.mark.parametrize("name", CASES)
def test_named_case_parses_and_streams_identically_under_every_chunking(name):
    text, expected, expect_reasoning = CASES[name]
    assert parse_output(text, expect_reasoning=expect_reasoning) == expected
    assert_streams_like_whole(text, expect_reasoning)


def test_spec_decode_bundled_markers_keep_full_arguments():
    chunks = [
        "<think>r</think>",
        f'{SEC_B}{CALL_B}functions.a:0{ARG_B}{{"x": 1}}',
        f'{CALL_E}{CALL_B}functions.b:1{ARG_B}{{"y": 2}}{CALL_E}{SEC_E}',
    ]
    assert stream(chunks) == out("r", None, ("functions.a:0", "a", '{"x": 1}'), ("functions.b:1", "b", '{"y": 2}'))


def test_first_call_delta_carries_id_and_name_then_argument_fragments():
    p = K2StreamParser()
    assert p.feed("<think>r</think>") == DeltaMessage("r", None, [])
    first = p.feed(f"{SEC_B}{CALL_B}functions.get_weather:0{ARG_B}")
    assert [(d.index, d.id, d.name, d.arguments) for d in first.tool_calls] == [
        (0, "functions.get_weather:0", "get_weather", "")
    ]
    assert p.has_tool_calls
    nxt = p.feed('{"city": ')
    assert [(d.index, d.id, d.name, d.arguments) for d in nxt.tool_calls] == [(0, None, None, '{"city":')]


def test_text_is_emitted_as_soon_as_it_cannot_be_a_marker():
    p = K2StreamParser()
    assert p.feed(" ") is None  # could still be whitespace before <think>
    assert p.feed("<thi") is None
    assert p.feed("nk>abc") == DeltaMessage("abc", None, [])
    assert p.feed("</thi") is None
    assert p.feed("nk>Use </thi") == DeltaMessage(None, "Use </thi", [])  # </think> is no marker in content
    assert p.feed("nk> now <|tool_c") == DeltaMessage(None, "nk> now", [])  # " " and "<|tool_c" wait
    assert p.feed("all") is None  # "<|tool_call" could still become a section marker
    assert p.feed("box") == DeltaMessage(None, " <|tool_callbox", [])
    assert p.finish() is None


def test_interleaved_parsers_are_independent():
    texts = [text for text, _, expect in CASES.values() if expect]
    parsers = [K2StreamParser() for _ in texts]
    pieces = [list(t) for t in texts]
    collected = [[] for _ in texts]
    for step in range(max(map(len, pieces))):
        for i, p in enumerate(parsers):
            if step < len(pieces[i]):
                collected[i].append(p.feed(pieces[i][step]))
    for i, p in enumerate(parsers):
        collected[i].append(p.finish())
        whole = parse_output(texts[i])
        assert assemble(collected[i]) == whole
        assert p.has_tool_calls == bool(whole.tool_calls)


def test_feed_after_finish_is_an_error():
    p = K2StreamParser()
    p.finish()
    with pytest.raises(AssertionError):
        p.feed("x")


# generated outputs: the generator knows the expected parse, so no second parser is needed

PLAIN_ATOMS = ["a", "bc", "Paris", " ", "\n", "é", "{", '"', "<", "|", ">"]
MARKER_LIKE_ATOMS = ["<|", "<|tool_c", "<|tool_call", "</thi", "<think"]  # complete no marker alone
ATOMS = PLAIN_ATOMS + MARKER_LIKE_ATOMS
NAMES = ["get_weather", "search", "mcp.fs.read"]
NEVER_IN_REASONING = ("</think>", SEC_B, SEC_B1, CALL_B)
NEVER_IN_ARGS = (CALL_E, CALL_B, SEC_E, SEC_E1)


def _text(rng: random.Random, extra: tuple[str, ...] = (), forbid: tuple[str, ...] = ()) -> str:
    while True:
        s = "".join(rng.choice(ATOMS + list(extra)) for _ in range(rng.randint(0, 8)))
        if not any(m in s for m in forbid):
            return s


def generate(seed: int) -> tuple[str, ParsedOutput, bool]:
    rng = random.Random(seed)
    expect_reasoning = rng.random() < 0.8
    opener = rng.choice(["", "<think>", " <think>", "\n<think>"])
    reasoning = _text(rng, forbid=NEVER_IN_REASONING)
    if not opener and (reasoning.lstrip().startswith("<think>") or not expect_reasoning):
        reasoning = ""  # no opener and no reasoning expected: the output starts with the answer
    closed = rng.random() < 0.7 or (not opener and not expect_reasoning)
    text = opener + reasoning + ("</think>" if closed and (opener or expect_reasoning) else "")
    content = _text(rng, extra=("</think>", "<think>"), forbid=(SEC_B, SEC_B1, CALL_B)) if closed else ""
    if not opener and not expect_reasoning and content.lstrip().startswith("<think>"):
        content = ""
    text += content
    calls: list[ToolCall] = []
    if rng.random() < 0.6:
        begin, end = rng.choice([(SEC_B, SEC_E), (SEC_B1, SEC_E1), ("", "")])
        text += begin
        for k in range(rng.randint(1, 3)):
            name = rng.choice(NAMES)
            raw_id, want_id = rng.choice(
                [
                    (f"functions.{name}:{k + 5}", f"functions.{name}:{k + 5}"),
                    (f"{name}:{k + 5}", f"functions.{name}:{k}"),
                    (name, f"functions.{name}:{k}"),
                    (f"\nfunctions.{name}:{k}  ", f"functions.{name}:{k}"),
                ]
            )
            args = json.dumps(
                {"q": _text(rng, extra=("</think>",), forbid=NEVER_IN_ARGS)}, indent=rng.choice([None, 2])
            )
            pad = rng.choice(["", " ", "\n"])
            piece = f"{CALL_B}{raw_id}{ARG_B}{pad}{args}{pad}"
            if rng.random() < 0.15:  # truncated inside this call: the stream ends here
                cut = rng.randint(len(CALL_B), len(piece))
                text += piece[:cut]
                arg_at = piece.find(ARG_B)
                if cut >= arg_at + len(ARG_B):
                    calls.append(ToolCall(want_id, name, piece[arg_at + len(ARG_B) : cut].strip(), k))
                return text, ParsedOutput(reasoning or None, content.rstrip() or None, calls), expect_reasoning
            text += piece + CALL_E + rng.choice(["", "\n"])
            calls.append(ToolCall(want_id, name, args, k))
        if end and rng.random() < 0.8:
            tail = _text(rng, extra=("</think>",), forbid=(SEC_B, SEC_B1, CALL_B))
            text += end + tail
            content += tail
    return text, ParsedOutput(reasoning or None, content.rstrip() or None, calls), expect_reasoning


@pytest.mark.parametrize("block", range(4))
def test_generated_outputs_parse_as_built_and_stream_identically(block):
    for seed in range(block * 100, (block + 1) * 100):
        text, expected, expect_reasoning = generate(seed)
        assert parse_output(text, expect_reasoning=expect_reasoning) == expected, f"seed={seed} text={text!r}"
        assert_streams_like_whole(text, expect_reasoning, seeds=4)
