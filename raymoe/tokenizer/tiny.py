"""Tiny K2-shaped tokenizer for test checkpoints, generated locally and deterministically.

K2 ships a tiktoken BPE of 163584 base tokens plus 256 reserved control tokens (K2_FACTS §3.1). The tiny
tokenizer keeps that shape at toy scale: a byte-level BPE of `num_base_tokens` tokens (all 256 bytes plus
merges trained here on a built-in corpus), K2's pre-tokenisation regex, then the reserved block laid out at
K2's offsets, so `base + 2` is `<|im_end|>` in both. The output is a plain Hugging Face folder that
`AutoTokenizer.from_pretrained` loads without remote code; the serving path never knows it is tiny.

Determinism: the corpus comes from a fixed 64-bit LCG, and the trainer is our own (ties broken by the pair's
text), so two writes on any machine give byte-identical `tokenizer.json`.
"""

from __future__ import annotations

import heapq
import json
from collections import Counter, defaultdict
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from raymoe.model.args import TINY_NUM_BASE_TOKENS, TINY_VOCAB
from raymoe.tokenizer.chat import read_chat_template

# K2's tiktoken pat_str (K2_FACTS §3.1); oniguruma supports the `&&` class intersections it needs.
_K2_PAT_PARTS = (
    r"[\p{Han}]+",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
)
K2_PAT_STR = "|".join(_K2_PAT_PARTS)

# offset from num_base_tokens -> (content, special). K2: 163584 + offset (K2_FACTS §3.1). Tool-call markers and
# <think>/</think> are `special: false`, so they survive decode(skip_special_tokens=True) like K2's.
_NAMED_RESERVED: dict[int, tuple[str, bool]] = {
    0: ("[BOS]", True), 1: ("[EOS]", True), 2: ("<|im_end|>", True), 3: ("<|im_user|>", True),
    4: ("<|im_assistant|>", True), 6: ("<|start_header_id|>", True), 7: ("<|end_header_id|>", True),
    9: ("[EOT]", True), 10: ("<|im_system|>", True),
    11: ("<|tool_calls_section_begin|>", False), 12: ("<|tool_calls_section_end|>", False),
    13: ("<|tool_call_begin|>", False), 14: ("<|tool_call_argument_begin|>", False), 15: ("<|tool_call_end|>", False),
    17: ("<|im_middle|>", True),
    18: ("<|media_begin|>", True), 19: ("<|media_content|>", True), 20: ("<|media_end|>", True),
    21: ("<|media_pad|>", True),
    22: ("<think>", False), 23: ("</think>", False),
}
_MIN_RESERVED = 26  # offsets 0..23 plus [UNK], [PAD] in the last two slots (K2: 254, 255 of 256)
ADDITIONAL_SPECIAL_TOKENS = (
    "<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|start_header_id|>", "<|end_header_id|>", "[EOT]",
    "<|im_system|>", "<|im_middle|>", "<|media_begin|>", "<|media_content|>", "<|media_end|>", "<|media_pad|>",
)


def reserved_tokens(num_base_tokens: int = TINY_NUM_BASE_TOKENS,
                    num_reserved: int = TINY_VOCAB - TINY_NUM_BASE_TOKENS) -> list[tuple[int, str, bool]]:
    """The reserved control block as `(token_id, content, special)`, in id order.

    Unnamed slots are `<|reserved_token_{token_id}|>` with the absolute id, as K2's tokenizer names them.
    """
    if num_reserved < _MIN_RESERVED:
        raise ValueError(f"num_reserved ({num_reserved}) must be >= {_MIN_RESERVED} to hold K2's control tokens")
    named = dict(_NAMED_RESERVED)
    named[num_reserved - 2] = ("[UNK]", True)
    named[num_reserved - 1] = ("[PAD]", True)
    out = []
    for offset in range(num_reserved):
        token_id = num_base_tokens + offset
        content, special = named.get(offset, (f"<|reserved_token_{token_id}|>", True))
        out.append((token_id, content, special))
    return out


_WORDS = (
    "the of and to in is that it for was on are as with his they be at one have this from or had by not word but "
    "what some we can out other were all there when up use your how said an each she which do their time if will "
    "way about many then them write would like so these her long make thing see him two has look more day could go "
    "come did number sound no most people my over know water than call first who may down side been now find any "
    "new work part take get place made live where after back little only round man year came show every good me "
    "give our under name very through just form sentence great think say help low line differ turn cause much mean "
    "before move right boy old too same tell does set three want air well also play small end put home read hand "
    "port large spell add even land here must big high such follow act why ask men change went light kind off need "
    "house picture try us again animal point mother world near build self earth father head stand own page should "
    "country found answer school grow study still learn plant cover food sun four between state keep eye never last "
    "let thought city tree cross farm hard start might story saw far sea draw left late run while press close night "
    "real life few north open seem together next white children begin got walk example ease paper group always "
    "music those both mark often letter until mile river car feet care second book carry took science eat room "
    "friend began idea fish mountain stop once base hear horse cut sure watch color face wood main enough plain "
    "model server request token expert layer cache batch router weather search result function value query"
).split()
_NAMES = ("Kimi", "Moonshot", "Paris", "London", "Tokyo", "Alice", "Bob", "Python", "JSON", "Ray", "GPU", "HTTP")
_PUNCT = (".", ".", ".", ",", "?", "!", ";", ":", " -", "...")
_IDENTS = ("x", "y", "i", "n", "data", "items", "result", "value", "key", "config", "tokens", "self", "path", "args")
_SNIPPETS = (
    "def {a}({b}, {c}=None):\n    return {b} + {n}\n",
    "for {a} in range({n}):\n    {b}.append({a} * {m})\n",
    "if {a} is not None and {b} > {n}:\n    raise ValueError(f\"bad {a}: {{{a}}}\")\n",
    "class {A}:\n    def __init__(self, {a}):\n        self.{a} = {a}\n",
    "import json\n{a} = json.loads({b})\nprint({a}[\"{c}\"])\n",
    "{a} = [{n}, {m}, {n}]  # {w} {w2}\n",
    "    {a}: int = {n}\n    {b}: str = \"{w}\"\n",
)
_EXTRAS = (
    "你好，世界。今天天气很好。", "我们一起学习中文和数学。", "こんにちは、元気ですか？", "안녕하세요 세계",
    "Привет, мир! Как дела?", "Ünïcödé façade naïve café", "😀 👍 🚀 ✨ 🎉", "α β γ δ → ∑ ∫ ≤ ≥ ∞",
    "## Heading\n\n- item one\n- item **bold** and `code`\n", "| a | b |\n|---|---|\n| 1 | 2 |\n",
)


class _Lcg:
    """64-bit LCG (Knuth MMIX constants): fixed output on every Python version and machine."""

    def __init__(self, seed: int) -> None:
        self.state = seed

    def pick(self, seq):
        self.state = (self.state * 6364136223846793005 + 1442695040888963407) % (1 << 64)
        return seq[(self.state >> 33) % len(seq)]


def build_corpus(num_lines: int = 3000, seed: int = 0) -> str:
    """Deterministic training text: English-ish prose, numbers, code, JSON, markdown and a little non-Latin text."""
    rng = _Lcg(seed)
    lines = []
    for i in range(num_lines):
        kind = i % 6
        if kind in (0, 1, 2):  # prose
            words = [rng.pick(_WORDS) for _ in range(4 + i % 11)]
            if i % 4 == 0:
                words[len(words) // 2] = rng.pick(_NAMES)
            words[0] = words[0].capitalize()
            lines.append(" ".join(words) + rng.pick(_PUNCT))
        elif kind == 3:  # numbers
            n, m = rng.pick(range(10000)), rng.pick(range(1000))
            lines.append(f"In {1900 + n % 130} there were {n} {rng.pick(_WORDS)}s, about {m}.{n % 100}% "
                         f"on 20{n % 30:02d}-{1 + m % 12:02d}-{1 + n % 28:02d} at {m % 24}:{n % 60:02d}.")
        elif kind == 4:  # code
            lines.append(rng.pick(_SNIPPETS).format(
                a=rng.pick(_IDENTS), b=rng.pick(_IDENTS), c=rng.pick(_IDENTS), A=rng.pick(_NAMES),
                n=rng.pick(range(100)), m=rng.pick(range(10)), w=rng.pick(_WORDS), w2=rng.pick(_WORDS)))
        else:  # JSON tool calls / results, and the odd non-Latin line
            lines.append(json.dumps({"name": f"get_{rng.pick(_WORDS)}", "arguments": {
                "location": rng.pick(_NAMES), "unit": rng.pick(("celsius", "fahrenheit")), "limit": i % 50,
                "query": f"{rng.pick(_WORDS)} {rng.pick(_WORDS)}", "ok": i % 3 == 0, "extra": None}}))
            if i % 5 == 0:
                lines.append(rng.pick(_EXTRAS))
    return "\n".join(lines) + "\n"



def _byte_alphabet() -> list[str]:
    """GPT-2's byte -> printable char map, in byte order, so byte `b` gets token id `b`."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _merge_word(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and symbols[i] == pair[0] and symbols[i + 1] == pair[1]:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def train_byte_bpe(word_counts: dict[str, int], num_tokens: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Greedy BPE over pre-tokenised byte-level words until the vocab holds `num_tokens` tokens.

    The most frequent adjacent pair is merged each round; ties go to the smaller pair text, which makes the
    result a pure function of `word_counts`. Pair counts are updated incrementally (a lazy max-heap), so the
    1536 merges of the tiny vocab take well under a second.
    """
    vocab = {ch: i for i, ch in enumerate(_byte_alphabet())}
    merges: list[tuple[str, str]] = []
    keys = sorted(word_counts)
    words, counts = [list(w) for w in keys], [word_counts[w] for w in keys]
    pair_counts: dict[tuple[str, str], int] = defaultdict(int)
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, symbols in enumerate(words):
        for pair in zip(symbols, symbols[1:]):
            pair_counts[pair] += counts[i]
            where[pair].add(i)
    heap = [(-c, pair) for pair, c in pair_counts.items()]
    heapq.heapify(heap)
    while len(vocab) < num_tokens:
        if not heap:
            raise ValueError(f"corpus supports only {len(vocab)} tokens, {num_tokens} requested")
        neg_count, pair = heapq.heappop(heap)
        if -neg_count != pair_counts[pair]:
            continue  # stale entry; the current count was pushed when it changed
        merges.append(pair)
        vocab.setdefault(pair[0] + pair[1], len(vocab))  # two merges can spell the same token
        touched = set()
        for i in sorted(where.pop(pair)):
            old, new = words[i], _merge_word(words[i], pair)
            for p in zip(old, old[1:]):
                pair_counts[p] -= counts[i]
                touched.add(p)
            for p in zip(new, new[1:]):
                pair_counts[p] += counts[i]
                where[p].add(i)
                touched.add(p)
            words[i] = new
        for p in sorted(touched):
            if pair_counts[p] > 0 and p != pair:
                heapq.heappush(heap, (-pair_counts[p], p))
    return vocab, merges



def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # K2's regex split, then byte-level mapping without its GPT-2 regex: how transformers converts tiktoken BPEs.
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(K2_PAT_STR), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def build_tiny_tokenizer(num_base_tokens: int = TINY_NUM_BASE_TOKENS,
                         num_reserved: int = TINY_VOCAB - TINY_NUM_BASE_TOKENS) -> Tokenizer:
    """A `tokenizers.Tokenizer`: byte-level BPE of `num_base_tokens`, then K2's reserved block as added tokens."""
    if num_base_tokens < 256:
        raise ValueError(f"num_base_tokens ({num_base_tokens}) must be >= 256 (one token per byte)")
    reserved = reserved_tokens(num_base_tokens, num_reserved)
    pre = _pre_tokenizer()
    word_counts = Counter(piece for line in build_corpus().splitlines(keepends=True)
                          for piece, _ in pre.pre_tokenize_str(line))
    vocab, merges = train_byte_bpe(word_counts, num_base_tokens)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    for token_id, content, special in reserved:  # one at a time so ids follow the K2 offsets exactly
        added = AddedToken(content, special=special, normalized=False)
        num_added = tok.add_special_tokens([added]) if special else tok.add_tokens([added])
        assert num_added == 1 and tok.token_to_id(content) == token_id, f"{content} not at id {token_id}"
    return tok


def write_tiny_tokenizer(out_dir: str | Path, num_base_tokens: int = TINY_NUM_BASE_TOKENS,
                         num_reserved: int = TINY_VOCAB - TINY_NUM_BASE_TOKENS) -> Path:
    """Write a K2-Thinking-shaped Hugging Face tokenizer folder for tiny checkpoints.

    Writes `tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json` and `chat_template.jinja`.
    `eos_token` is `<|im_end|>` (id `num_base_tokens + 2`), the Thinking model's stop token.

    Args:
        out_dir: folder to write into (created if missing).
        num_base_tokens: byte-level BPE size, ids `[0, num_base_tokens)`.
        num_reserved: control-token block size, ids `num_base_tokens + i`.

    Returns:
        `out_dir` as a `Path`.

    Raises:
        ValueError: sizes too small for 256 bytes or K2's control-token layout, or too large for the corpus.

    Examples:
        >>> tok = AutoTokenizer.from_pretrained(write_tiny_tokenizer(tmp_path))
        >>> tok.eos_token_id
        1794
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tiny_tokenizer(num_base_tokens, num_reserved)
    reserved = reserved_tokens(num_base_tokens, num_reserved)
    named = {"bos_token": "[BOS]", "eos_token": "<|im_end|>", "pad_token": "[PAD]", "unk_token": "[UNK]"}
    special_map = {**named, "additional_special_tokens": list(ADDITIONAL_SPECIAL_TOKENS)}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **named,
        "additional_special_tokens": list(ADDITIONAL_SPECIAL_TOKENS),
        "added_tokens_decoder": {
            str(token_id): {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                            "single_word": False, "special": special}
            for token_id, content, special in reserved
        },
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # byte-level: decode must round-trip exactly
        "model_max_length": 1 << 20,
    }
    tok.save(str(out / "tokenizer.json"), pretty=True)
    _write_json(out / "tokenizer_config.json", config)
    _write_json(out / "special_tokens_map.json", special_map)
    (out / "chat_template.jinja").write_text(read_chat_template(), encoding="utf-8")
    return out


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
