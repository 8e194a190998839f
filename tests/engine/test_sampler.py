"""Sampler: greedy, seeded reproducibility across batches, truncation, penalties, logprobs; param checks."""

import pytest
import torch

from raymoe.engine.request import SamplingParams
from raymoe.engine.sampler import Sampler, apply_penalties, make_generator, sampling_probs

B, V = 4, 50


def sample(logits, params, histories=None, generators=None):
    n = logits.shape[0]
    return Sampler().sample(logits, params, histories or [([], [])] * n, generators or [None] * n)


def test_all_greedy_is_argmax():
    logits = torch.randn(B, V)
    out = sample(logits, [SamplingParams(temperature=0.0)] * B)
    assert torch.equal(out.token_ids, logits.argmax(-1)) and out.logprobs == [None] * B


def test_greedy_rows_in_a_mixed_batch_are_argmax():
    logits = torch.randn(B, V)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0)] * 2
    out = sample(logits, params)
    assert out.token_ids[0] == logits[0].argmax() and out.token_ids[2] == logits[2].argmax()


def test_seeded_request_gets_the_same_tokens_alone_or_batched():
    logits = torch.randn(B, V)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, top_k=20, seed=1234)
    gen = make_generator(1234)
    alone = [sample(logits[2:3], [seeded], generators=[gen]).token_ids.item() for _ in range(20)]

    params = [SamplingParams(temperature=0.7), SamplingParams(temperature=0.0), seeded, SamplingParams(seed=9)]
    gens = [None, None, make_generator(1234), make_generator(9)]
    batched = [sample(logits, params, generators=gens).token_ids[2].item() for _ in range(20)]
    assert batched == alone
    assert len(set(alone)) > 1  # it really samples


def test_different_seeds_give_different_tokens():
    logits = torch.zeros(1, V)  # uniform: 20 draws from two seeds agreeing would be a 50**-20 event
    params = [SamplingParams(seed=1)]
    draws = {}
    for seed in (1, 2):
        gen = make_generator(seed)
        draws[seed] = [sample(logits, params, generators=[gen]).token_ids.item() for _ in range(20)]
    assert draws[1] != draws[2]


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.1, 0.2, 0.7])
    logits = probs.log().expand(4000, 3).contiguous()
    tokens = sample(logits, [SamplingParams()] * 4000).token_ids
    freq = torch.bincount(tokens, minlength=3).float() / 4000
    torch.testing.assert_close(freq, probs, atol=0.03, rtol=0)


@pytest.mark.parametrize("params", [SamplingParams(top_k=1), SamplingParams(top_p=1e-6), SamplingParams(min_p=1.0)])
def test_truncation_to_one_token_is_greedy(params):
    logits = torch.randn(B, V)
    for _ in range(5):
        assert torch.equal(sample(logits, [params] * B).token_ids, logits.argmax(-1))


def test_top_k_top_p_min_p_keep_the_expected_sets():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).log_softmax(-1)  # probs ~ .64 .23 .09 .03 .01

    def kept(**kw):
        return sampling_probs(logits, [SamplingParams(**kw)])[0].nonzero().flatten().tolist()

    assert kept(top_k=2) == [0, 1]
    assert kept(top_p=0.8) == [0, 1]  # mass before token 1 is .64 <= .8; before token 2 is .87 > .8
    assert kept(min_p=0.1) == [0, 1, 2]  # .09 >= .064, .03 < .064
    assert kept(top_k=-1) == [0, 1, 2, 3, 4]


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0, 1.0]])
    out = apply_penalties(logits, [SamplingParams(repetition_penalty=2.0)], [([0], [1])])
    torch.testing.assert_close(out, torch.tensor([[1.0, -4.0, 2.0, -2.0, 1.0]]))


def test_presence_and_frequency_penalties_count_output_tokens_only():
    logits = torch.zeros(1, 5)
    params = [SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)]
    out = apply_penalties(logits, params, [([4, 4], [1, 1, 1, 2])])
    torch.testing.assert_close(out, torch.tensor([[0.0, -1.25, -0.75, 0.0, 0.0]]))


def test_penalties_steer_greedy_choice_without_touching_other_rows():
    logits = torch.tensor([[3.0, 2.9, 0.0], [3.0, 2.9, 0.0]])
    params = [SamplingParams(temperature=0.0, repetition_penalty=1.5), SamplingParams(temperature=0.0)]
    out = sample(logits.clone(), params, histories=[([0], []), ([0], [])])
    assert out.token_ids.tolist() == [1, 0]


def test_logprobs_report_the_penalised_distribution_and_the_chosen_token():
    logits = torch.randn(2, V)
    params = [SamplingParams(temperature=0.0, logprobs=3, frequency_penalty=1.0), SamplingParams(temperature=0.0)]
    out = sample(logits, params, histories=[([], [0, 0]), ([], [])])
    expect = apply_penalties(logits[:1], params[:1], [([], [0, 0])]).log_softmax(-1)[0]
    info = out.logprobs[0]
    assert info.token_id == out.token_ids[0].item() == expect.argmax().item()
    assert info.logprob == pytest.approx(expect[info.token_id].item())
    assert [t for t, _ in info.top] == expect.topk(3).indices.tolist()
    assert out.logprobs[1] is None and info.token_id in info.as_dict()


def test_logits_are_not_modified():
    logits = torch.randn(B, V)
    before = logits.clone()
    sample(logits, [SamplingParams(repetition_penalty=1.3, top_k=5, logprobs=2)] * B, histories=[([1, 2], [3])] * B)
    assert torch.equal(logits, before)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=-0.5), "temperature must be >= 0, got -0.5"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
        (dict(top_p=1.5), "got 1.5"),
        (dict(top_k=-2), "top_k .* got -2"),
        (dict(min_p=1.1), "min_p .* got 1.1"),
        (dict(max_tokens=0), "max_tokens must be >= 1, got 0"),
        (dict(min_tokens=5, max_tokens=4), "min_tokens .* got 5"),
        (dict(logprobs=21), "logprobs .* got 21"),
        (dict(repetition_penalty=0.0), "repetition_penalty must be > 0, got 0.0"),
        (dict(presence_penalty=2.5), "presence_penalty must be in \\[-2, 2\\], got 2.5"),
        (dict(frequency_penalty=-3), "frequency_penalty .* got -3"),
        (dict(stop=[""]), "stop must be non-empty"),
        (dict(stop_token_ids=[-1]), r"stop_token_ids .* \[-1\]"),
        (dict(thinking_budget=-1), "thinking_budget .* got -1"),
        (dict(temperature=float("nan")), "temperature .* got nan"),
    ],
)
def test_bad_sampling_params_raise_value_error_naming_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_stop_accepts_a_single_string():
    assert SamplingParams(stop="###").stop == ["###"]
