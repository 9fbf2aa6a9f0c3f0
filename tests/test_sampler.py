"""The token sampler: greedy, seeding, each filter's distribution, log-probs, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from magnetar.runtime.errors import MagnetarError, UsageError
from magnetar.runtime.sampler import Sampler, SamplerSettings, _filtered, log_softmax, top_logprobs

# A hand-built 9-token distribution (sums to 1), best first.
P = np.array([0.30, 0.20, 0.15, 0.12, 0.10, 0.06, 0.04, 0.02, 0.01])
LOGITS = np.log(P).astype(np.float32) + 7.0  # a shift changes nothing


def reference(logits: np.ndarray, s: SamplerSettings) -> np.ndarray:
    """The expected distribution, written the slow obvious way (float64, full stable sort)."""
    x = np.asarray(logits, dtype=np.float64)
    out = np.zeros(x.size)
    if s.temperature == 0:
        out[np.argmax(x)] = 1.0
        return out
    order = np.argsort(-x, kind="stable")
    p = np.exp((x[order] - x.max()) / s.temperature)
    p = p / p.sum()
    if s.top_k:
        p = p[: s.top_k] / p[: s.top_k].sum()
    if s.top_p < 1:
        n = int(np.argmax(np.cumsum(p) >= s.top_p)) + 1 if np.cumsum(p)[-1] >= s.top_p else p.size
        p = p[:n]
    p = p[p >= s.min_p * p.max()]
    out[order[: p.size]] = p  # min-p keeps a prefix of the ranking too
    return out / out.sum()


def frequencies(logits: np.ndarray, n: int = 8_000, **settings) -> np.ndarray:
    sampler = Sampler(SamplerSettings(seed=1234, **settings))
    draws = [sampler.sample(logits) for _ in range(n)]
    return np.bincount(draws, minlength=len(logits)) / n


def assert_matches(freq: np.ndarray, expected: np.ndarray, n: int = 8_000) -> None:
    assert np.all(freq[expected == 0] == 0), "a filtered-out token was sampled"
    sigma = np.sqrt(expected * (1 - expected) / n)
    assert np.all(np.abs(freq - expected) <= 5 * sigma + 1e-12), (freq, expected)


def test_greedy_is_argmax_with_ties_to_lowest_id_and_uses_no_randomness():
    sampler = Sampler(SamplerSettings(temperature=0, top_k=1, top_p=0.1, seed=0))
    state = sampler.rng.bit_generator.state
    assert sampler.sample(np.array([1.0, 5.0, 5.0, 2.0, 5.0], np.float32)) == 1
    x = (np.random.default_rng(0).standard_normal(129_280) * 3).astype(np.float32)
    assert sampler.sample(x) == int(np.argmax(x))
    assert sampler.rng.bit_generator.state == state


def test_same_seed_same_sequence_different_seed_different_sequence():
    x = (np.random.default_rng(1).standard_normal(1000) * 0.1).astype(np.float32)

    def draws(seed):
        sampler = Sampler(SamplerSettings(seed=seed, min_p=0))
        return [sampler.sample(x) for _ in range(50)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)
    assert len(set(draws(None))) > 1


@pytest.mark.parametrize(
    "settings, expected",
    [
        (dict(min_p=0), P),
        (dict(top_k=3, min_p=0), np.r_[P[:3], [0] * 6] / P[:3].sum()),
        (dict(top_p=0.7, min_p=0), np.r_[P[:4], [0] * 5] / P[:4].sum()),  # cum .77 is the first >= .7
        (dict(min_p=0.25), np.r_[P[:5], [0] * 4] / P[:5].sum()),  # keeps p >= .075
        (dict(temperature=2.0, min_p=0), np.sqrt(P) / np.sqrt(P).sum()),
        (dict(temperature=0.5, min_p=0), P**2 / (P**2).sum()),
    ],
    ids=["plain", "top_k", "top_p", "min_p", "hot", "cold"],
)
def test_each_filter_samples_its_hand_computed_distribution(settings, expected):
    assert np.allclose(reference(LOGITS, SamplerSettings(**settings)), expected, atol=1e-6)
    assert_matches(frequencies(LOGITS, **settings), expected)


@pytest.mark.parametrize(
    "settings",
    [
        dict(temperature=0.5, top_k=6, top_p=0.9, min_p=0.1),
        dict(temperature=1.7, top_k=7, top_p=0.8, min_p=0.05),
        dict(temperature=1.3, top_p=0.95, min_p=0.02),
    ],
)
def test_combined_filters_sample_the_reference_distribution(settings):
    expected = reference(LOGITS, SamplerSettings(**settings))
    assert 1 < np.count_nonzero(expected) < len(P)  # each case really filters
    assert_matches(frequencies(LOGITS, **settings), expected)


def test_filtered_set_equals_reference_on_random_cases_with_ties():
    rng = np.random.default_rng(5)
    for case in range(400):
        vocab = int(rng.choice([2, 9, 50, 3000]))  # 3000 exercises the top-p probe
        x = (np.round(rng.standard_normal(vocab) * 4) / 2).astype(np.float32)  # many ties
        s = SamplerSettings(
            temperature=float(rng.choice([0.3, 1.0, 2.5])),
            top_k=int(rng.choice([0, 1, 3, 40])),
            top_p=float(rng.choice([1.0, 0.95, 0.6, 1e-9])),
            min_p=float(rng.choice([0.0, 0.05, 0.3])),
        )
        ids, p = _filtered(x, float(x.max()), s)
        expected = reference(x, s)
        got = np.zeros(vocab)
        got[ids] = p / p.sum(dtype=np.float64)
        assert set(ids) == set(np.flatnonzero(expected)), (case, s)
        assert np.allclose(got, expected, rtol=1e-6, atol=1e-9), (case, s)


def test_top_p_on_a_flat_full_vocabulary_ranks_beyond_the_probe():
    x = (np.random.default_rng(2).standard_normal(129_280) * 0.01).astype(np.float32)
    s = SamplerSettings(top_p=0.5, min_p=0)
    ids, _ = _filtered(x, float(x.max()), s)
    assert np.count_nonzero(reference(x, s)) == len(ids) > 60_000


def test_tiny_top_p_keeps_exactly_the_argmax():
    x = (np.random.default_rng(3).standard_normal(129_280) * 3).astype(np.float32)
    x[[10, 20]] = x.max() + 1  # a tie at the top: the lower id wins
    sampler = Sampler(SamplerSettings(top_p=1e-9, min_p=0, seed=0))
    assert {sampler.sample(x) for _ in range(20)} == {10}


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_extreme_temperatures_stay_well_defined(dtype):
    x = np.array([0.0, 3.0, 1.0, 2.5], dtype)
    assert frequencies(x, n=500, temperature=1e-30)[1] == 1.0  # acts greedy
    assert_matches(frequencies(x, n=4000, temperature=1e30), np.full(4, 0.25), n=4000)  # uniform


def test_top_p_stops_where_the_cumulative_mass_reaches_it_and_ties_keep_lower_ids():
    x = np.zeros(4, np.float32)  # cumulative mass .25, .50: exactly top_p after two tokens
    assert_matches(frequencies(x, n=4000, top_p=0.5, min_p=0), np.array([0.5, 0.5, 0, 0]), n=4000)


def test_masked_tokens_are_never_sampled():
    x = np.array([0.0, -np.inf, 0.5, -np.inf], np.float32)
    assert set(frequencies(x, n=2000, min_p=0).nonzero()[0]) == {0, 2}


def test_log_softmax_matches_a_float64_reference():
    x = (1000 + np.random.default_rng(4).standard_normal((3, 129_280)) * 5).astype(np.float32)
    lp = log_softmax(x)
    assert lp.dtype == np.float64 and lp.shape == x.shape
    xs = x.astype(np.float64)
    ref = xs - np.logaddexp.reduce(xs, axis=-1, keepdims=True)
    assert np.allclose(lp, ref, rtol=0, atol=1e-9)
    row = xs[0, :50]
    assert np.allclose(log_softmax(row), [v - math.log(math.fsum(np.exp(row - row.max()))) - row.max() for v in row])
    assert np.allclose(np.exp(lp).sum(axis=-1), 1.0)


def test_top_logprobs_are_best_first_with_ties_to_lower_id():
    x = np.array([0.0, 2.0, 2.0, 1.0, 2.0], np.float32)
    lp = log_softmax(x)
    assert top_logprobs(x, 3) == [(1, lp[1]), (2, lp[2]), (4, lp[4])]
    assert [i for i, _ in top_logprobs(x, 10)] == [1, 2, 4, 3, 0]
    assert top_logprobs(x, 0) == []
    big = (np.random.default_rng(6).standard_normal(129_280) * 3).astype(np.float32)
    assert [i for i, _ in top_logprobs(big, 5)] == list(np.argsort(-big, kind="stable")[:5])


@pytest.mark.parametrize(
    "settings, words",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(top_k=True), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(min_p=1.0), "min_p"),
        (dict(min_p=-0.1), "min_p"),
        (dict(seed=-3), "seed"),
        (dict(topk=40), "unknown sampler setting 'topk'"),
    ],
)
def test_invalid_settings_raise_one_line_usage_errors(settings, words):
    with pytest.raises(UsageError) as err:
        SamplerSettings(**settings)
    assert words in str(err.value) and "\n" not in str(err.value) and err.value.fix


def test_settings_are_frozen():
    with pytest.raises(Exception):
        SamplerSettings().top_k = 5


@pytest.mark.parametrize(
    "bad, words",
    [([0.0, np.nan, 1.0], "NaN"), ([0.0, np.inf], "inf"), ([-np.inf, -np.inf], "-inf")],
)
def test_unsamplable_logits_raise_clear_errors(bad, words):
    x = np.array(bad, np.float32)
    for temperature in (0.0, 1.0):
        with pytest.raises(MagnetarError, match=words):
            Sampler(SamplerSettings(temperature=temperature)).sample(x)
    with pytest.raises(MagnetarError):
        log_softmax(x)


def test_logits_must_be_one_vector():
    with pytest.raises(UsageError, match="shape"):
        Sampler(SamplerSettings()).sample(np.zeros((2, 3), np.float32))
