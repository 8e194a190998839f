"""Token sampling from the last position's logits of each sequence in a step.

lm_head → logits [B, V] fp32 → `Sampler.sample` → token ids [B] (+ logprobs) → scheduler.update.

Order per row: penalties → (logprobs taken here) → temperature → top-k → top-p → min-p → draw.
- Repetition penalty (HF/vLLM): seen tokens (prompt + output) have positive logits divided and
  negative logits multiplied by it. Presence/frequency (OpenAI): subtract `presence * [count > 0]`
  and `frequency * count`, over output tokens only.
- Logprobs are `log_softmax` of the logits after penalties and before temperature/top-k/top-p/min-p,
  i.e. the model's (penalised) distribution, not the truncated sampling one. (vLLM reports raw
  logprobs by default; penalties are part of what the model "chose" here, so we include them.)
- The draw is an exponential race: argmax(p / q) with q ~ Exp(1) iid is a sample from p. Each
  seeded row draws its own q from its own `torch.Generator`, so a seeded request gets the same tokens
  alone or in any batch; unseeded rows share one draw from the global RNG.
Shapes: B rows (sequences), V vocab, N top logprobs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from raymoe.engine.request import SamplingParams


@dataclass(slots=True)
class TokenLogprobs:
    token_id: int
    logprob: float  # of the sampled token
    top: list[tuple[int, float]]  # the N most likely (token_id, logprob), best first

    def as_dict(self) -> dict[int, float]:
        return {**dict(self.top), self.token_id: self.logprob}


class SamplerOutput(NamedTuple):
    token_ids: torch.Tensor  # [B] int64
    logprobs: list[TokenLogprobs | None]  # per row; None where params.logprobs is None


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """argmax over the last dim: the first maximal index, as `argmax`, whose CPU kernel is ~1.5x slower
    than `max`'s at [16-64, 2048] (measured 2026-11); `max` also returns the first maximal index."""
    return logits.max(dim=-1).indices


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A per-request generator on the logits' device (the engine keeps one per seeded request)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


class Sampler:
    def sample(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        histories: Sequence[tuple[Sequence[int], Sequence[int]]],
        generators: Sequence[torch.Generator | None],
    ) -> SamplerOutput:
        """Pick one token per row.

        Args:
            logits: [B, V] fp32, not modified.
            params: per row.
            histories: per row (prompt_token_ids, output_token_ids); read only for penalties.
            generators: per row; None draws from the global RNG. Unused by greedy rows.

        Returns:
            SamplerOutput(token_ids [B], logprobs per row).
        """
        B, V = logits.shape
        assert len(params) == B and len(histories) == B and len(generators) == B, "one entry per row"
        if all(p.plain_greedy for p in params):
            return SamplerOutput(greedy(logits), [None] * B)  # all-greedy fast path
        want_logprobs = [p.logprobs is not None for p in params]

        logits = logits.to(torch.float32, copy=True)
        penalty_rows = [i for i, p in enumerate(params) if p.has_penalties]
        if penalty_rows:
            idx = torch.tensor(penalty_rows, device=logits.device)
            logits[idx] = apply_penalties(
                logits[idx], [params[i] for i in penalty_rows], [histories[i] for i in penalty_rows]
            )
        logprobs = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None  # [B, V]

        token_ids = greedy(logits)  # [B]; random rows overwritten below
        random_rows = [i for i, p in enumerate(params) if not p.is_greedy]
        if random_rows:
            idx = torch.tensor(random_rows, device=logits.device)
            probs = sampling_probs(logits[idx], [params[i] for i in random_rows])  # [b, V]
            token_ids[idx] = exponential_race(probs, [generators[i] for i in random_rows])
        return SamplerOutput(token_ids, _gather_logprobs(logprobs, token_ids, params))


def apply_penalties(
    logits: torch.Tensor, params: Sequence[SamplingParams], histories: Sequence[tuple[Sequence[int], Sequence[int]]]
) -> torch.Tensor:
    """Repetition (prompt + output), presence and frequency (output) penalties on [b, V] logits."""
    b, V = logits.shape
    device = logits.device
    output_counts = _token_counts([out for _, out in histories], V, device)  # [b, V]
    seen = output_counts > 0
    rep = torch.tensor([p.repetition_penalty for p in params], device=device).unsqueeze(1)  # [b, 1]
    if bool((rep != 1.0).any()):
        seen_any = seen | (_token_counts([prompt for prompt, _ in histories], V, device) > 0)
        penalised = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen_any, penalised, logits)
    freq = torch.tensor([p.frequency_penalty for p in params], device=device).unsqueeze(1)
    pres = torch.tensor([p.presence_penalty for p in params], device=device).unsqueeze(1)
    return logits - freq * output_counts - pres * seen.float()


def sampling_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p truncation → probs [b, V] (not renormalised after min-p:
    the exponential race only needs them up to a per-row scale)."""
    b, V = logits.shape
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], device=device).unsqueeze(1)
    logits = logits / temperature
    top_k = [p.top_k if p.top_k > 0 else V for p in params]
    top_p = [p.top_p for p in params]
    if any(k < V for k in top_k) or any(p < 1.0 for p in top_p):
        # stable sort: ties keep the lower token id first, as argmax does
        sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)  # [b, V]
        ranks = torch.arange(V, device=device).unsqueeze(0)  # [1, V]
        drop = ranks >= torch.tensor(top_k, device=device).unsqueeze(1)
        sorted_probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop |= mass_before > torch.tensor(top_p, device=device).unsqueeze(1)  # the top token always stays
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    min_p = torch.tensor([p.min_p for p in params], device=device).unsqueeze(1)
    if bool((min_p > 0).any()):
        probs = probs.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0)
    return probs


def exponential_race(probs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """Sample one index per row of `probs` [b, V]; each seeded row uses only its own generator."""
    q = torch.empty_like(probs)
    shared = [i for i, g in enumerate(generators) if g is None]
    if shared:
        q[shared] = torch.empty(len(shared), probs.shape[1], device=probs.device).exponential_()
    for i, gen in enumerate(generators):
        if gen is not None:
            q[i].exponential_(generator=gen)
    # q can round to 0 in fp32; 0/0 would be NaN and argmax picks NaN.
    return (probs / q.clamp_min_(torch.finfo(q.dtype).tiny)).argmax(dim=-1)


def _token_counts(seqs: Sequence[Sequence[int]], V: int, device: torch.device) -> torch.Tensor:
    """[b, V] occurrence counts of each row's tokens."""
    counts = torch.zeros(len(seqs), V + 1, device=device)  # column V absorbs padding
    width = max((len(s) for s in seqs), default=0)
    if width:
        ids = torch.full((len(seqs), width), V, dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        ids = ids.to(device)
        counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=counts.dtype))
    return counts[:, :V]


def _gather_logprobs(
    logprobs: torch.Tensor | None, token_ids: torch.Tensor, params: Sequence[SamplingParams]
) -> list[TokenLogprobs | None]:
    if logprobs is None:
        return [None] * len(params)
    num_top = min(max(p.logprobs or 0 for p in params), logprobs.shape[1])
    chosen = logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1).tolist()  # [B]
    top_vals, top_ids = logprobs.topk(num_top, dim=-1) if num_top else (None, None)  # [B, N]
    top_vals = top_vals.tolist() if top_vals is not None else None
    top_ids = top_ids.tolist() if top_ids is not None else None
    ids = token_ids.tolist()
    out: list[TokenLogprobs | None] = []
    for row, p in enumerate(params):
        if p.logprobs is None:
            out.append(None)
            continue
        top = list(zip(top_ids[row][: p.logprobs], top_vals[row][: p.logprobs])) if p.logprobs else []
        out.append(TokenLogprobs(ids[row], chosen[row], top))
    return out
