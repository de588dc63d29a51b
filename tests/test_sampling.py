"""The sampling functions of tfcourse.decoding (temperature, top-k, top-p, next_token_probs, sample_next_token)
against their peers, the logits warpers of Hugging Face transformers, and their defining properties (hypothesis):
top-k keeps exactly k tokens unless ties, the largest ones; top-p keeps a mass >= p with a minimal set of the most
probable tokens; sampling draws from the filtered distribution only; and bad inputs raise."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from tfcourse.decoding import apply_temperature, next_token_probs, sample_next_token, top_k_filter, top_p_filter

# Rows of logits: a few to a hundred tokens, from sharply peaked to nearly flat.
rows = st.integers(1, 60).flatmap(lambda V: st.tuples(st.just(V), st.integers(0, 2**16), st.floats(0.1, 8.0)))


def random_logits(V, seed, spread, B=1, dtype=torch.float64):
    return spread * torch.randn(B, V, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --------------------------------------------------------------------------------- peers

@pytest.mark.parametrize("k", [1, 5, 40, 100, 1000])
def test_top_k_equals_transformers(k):
    logits = random_logits(100, 0, 3.0, B=4)
    assert torch.equal(top_k_filter(logits, k), TopKLogitsWarper(k)(None, logits))


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.95, 0.999])
def test_top_p_equals_transformers(p):
    logits = random_logits(200, 1, 2.0, B=8)
    assert torch.equal(top_p_filter(logits, p), TopPLogitsWarper(p)(None, logits))


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
def test_temperature_equals_transformers(temperature):
    logits = random_logits(30, 2, 2.0, B=3)
    expected = TemperatureLogitsWarper(temperature)(None, logits)
    torch.testing.assert_close(apply_temperature(logits, temperature), expected)


# --------------------------------------------------------------------------------- properties of top-k

@settings(max_examples=80, deadline=None)
@given(row=rows, k=st.integers(1, 70))
def test_top_k_keeps_exactly_the_k_largest(row, k):
    V, seed, spread = row
    logits = random_logits(V, seed, spread)[0]  # continuous values: no ties
    kept = torch.isfinite(top_k_filter(logits, k))
    assert kept.sum() == min(k, V)
    assert logits[kept].min() >= logits[~kept].max() if (~kept).any() else True
    assert torch.equal(top_k_filter(logits, k)[kept], logits[kept])  # kept logits are unchanged


@settings(max_examples=50, deadline=None)
@given(values=st.lists(st.integers(-3, 3), min_size=1, max_size=12), k=st.integers(1, 12))
def test_top_k_keeps_ties_with_the_kth(values, k):
    logits = torch.tensor(values, dtype=torch.float64)
    kept = torch.isfinite(top_k_filter(logits, k))
    kth = torch.sort(logits, descending=True).values[min(k, len(values)) - 1]
    assert torch.equal(kept, logits >= kth)
    assert kept.sum() >= min(k, len(values))


# --------------------------------------------------------------------------------- properties of top-p

@settings(max_examples=100, deadline=None)
@given(row=rows, p=st.floats(0.01, 0.99))
def test_top_p_keeps_a_minimal_set_of_mass_at_least_p(row, p):
    V, seed, spread = row
    logits = random_logits(V, seed, spread)[0]
    probs = logits.softmax(-1)
    kept = torch.isfinite(top_p_filter(logits, p))
    assert kept.any()
    mass = probs[kept].sum().item()
    assert mass >= p - 1e-12, "the nucleus must hold at least mass p"
    assert mass - probs[kept].min().item() < p + 1e-12, "without its least probable token it must hold less than p"
    if (~kept).any():
        assert probs[kept].min() >= probs[~kept].max(), "the nucleus holds the most probable tokens"


@settings(max_examples=60, deadline=None)
@given(row=rows, p=st.floats(0.05, 0.95), t1=st.floats(0.2, 3.0), t2=st.floats(0.2, 3.0))
def test_the_nucleus_grows_with_the_temperature(row, p, t1, t2):
    V, seed, spread = row
    low, high = sorted((t1, t2))
    logits = random_logits(V, seed, spread)[0]
    size = {t: torch.isfinite(top_p_filter(apply_temperature(logits, t), p)).sum().item() for t in (low, high)}
    # the top-r mass of softmax(z / t) decreases with t, so at the higher temperature more tokens are needed;
    # skip draws where the mass at the boundary is within rounding of p
    cumulative = torch.sort(apply_temperature(logits, low).softmax(-1), descending=True).values.cumsum(-1)
    assume(((cumulative - p).abs() > 1e-9).all())
    assert size[high] >= size[low]


def test_top_p_edge_cases():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    assert torch.equal(top_p_filter(logits, 1.0), logits)
    assert torch.isfinite(top_p_filter(logits, 1e-6)).sum() == 1  # the most probable token always stays
    probs = logits.softmax(-1)[0]
    just_two = (probs[0] + probs[1]).item()
    assert torch.isfinite(top_p_filter(logits, just_two - 1e-4)).sum() == 2
    assert torch.isfinite(top_p_filter(logits, just_two + 1e-4)).sum() == 3
    # ties on the boundary: the minimal set keeps one of two equal tokens (the lower index)
    tied = torch.log(torch.tensor([0.5, 0.25, 0.25]))
    assert torch.isfinite(top_p_filter(tied, 0.7)).tolist() == [True, True, False]
    # -inf (already removed) tokens stay removed; half precision works
    masked = torch.tensor([0.0, -math.inf, 1.0])
    assert torch.isfinite(top_p_filter(masked, 0.99)).tolist() == [True, False, True]
    assert top_p_filter(logits.half(), 0.9).dtype == torch.float16


# --------------------------------------------------------------------------------- the distribution and sampling

def test_next_token_probs():
    logits = random_logits(50, 3, 2.0, B=4)
    for kwargs in (dict(), dict(temperature=0.5, top_k=10), dict(temperature=2.0, top_p=0.8),
                   dict(temperature=1.0, top_k=5, top_p=0.5)):
        probs = next_token_probs(logits, **kwargs)
        torch.testing.assert_close(probs.sum(-1), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(next_token_probs(logits), logits.softmax(-1))
    greedy = next_token_probs(logits, temperature=0.0, top_p=0.3)
    assert torch.equal(greedy.argmax(-1), logits.argmax(-1)) and torch.equal(greedy.max(-1).values, torch.ones(4,
                                                                                 dtype=torch.float64))
    # a small temperature is close to greedy
    torch.testing.assert_close(next_token_probs(logits, temperature=1e-6), greedy)
    # the order: temperature before top-p changes the nucleus, top-k keeps the same tokens at any temperature
    k_cold = next_token_probs(logits, temperature=0.5, top_k=10) > 0
    k_hot = next_token_probs(logits, temperature=2.0, top_k=10) > 0
    assert torch.equal(k_cold, k_hot)
    assert ((next_token_probs(logits, temperature=2.0, top_p=0.8) > 0).sum()
            > (next_token_probs(logits, temperature=0.5, top_p=0.8) > 0).sum())


def test_samples_follow_the_filtered_distribution():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.5, 0.0, -1.0]]).expand(20000, 6)
    g = torch.Generator().manual_seed(0)
    draws = sample_next_token(logits, temperature=1.0, top_k=3, generator=g)
    assert draws.shape == (20000,) and draws.dtype == torch.long
    assert set(draws.unique().tolist()) <= {0, 1, 2}
    freq = torch.bincount(draws, minlength=6).double() / len(draws)
    expected = next_token_probs(logits[:1].double(), top_k=3)[0]
    assert (freq - expected).abs().max() < 0.015
    nucleus = sample_next_token(logits, top_p=0.5, generator=g)
    assert set(nucleus.unique().tolist()) <= set(torch.nonzero(next_token_probs(logits[:1], top_p=0.5)[0]).flatten()
                                                 .tolist())


def test_sampling_shapes_greedy_and_reproducibility():
    logits = random_logits(20, 4, 2.0, B=6).view(2, 3, 20)
    assert sample_next_token(logits).shape == (2, 3)
    assert torch.equal(sample_next_token(logits, temperature=0.0), logits.argmax(-1))
    a = sample_next_token(logits, generator=torch.Generator().manual_seed(7))
    b = sample_next_token(logits, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


# --------------------------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("call,error,match", [
    (lambda: top_k_filter([1.0, 2.0], 1), TypeError, "logits"),
    (lambda: top_k_filter(torch.tensor([1, 2]), 1), ValueError, "floating"),
    (lambda: top_k_filter(torch.tensor([1.0, float("nan")]), 1), ValueError, "NaN"),
    (lambda: top_k_filter(torch.tensor([-math.inf, -math.inf]), 1), ValueError, "-inf everywhere"),
    (lambda: top_k_filter(torch.tensor(1.0), 1), ValueError, "vocabulary"),
    (lambda: top_k_filter(torch.zeros(3), 0), ValueError, "k must"),
    (lambda: top_k_filter(torch.zeros(3), 1.5), ValueError, "k must"),
    (lambda: top_p_filter(torch.zeros(3), 0.0), ValueError, "top_p"),
    (lambda: top_p_filter(torch.zeros(3), 1.5), ValueError, "top_p"),
    (lambda: top_p_filter(torch.zeros(3), True), ValueError, "top_p"),
    (lambda: apply_temperature(torch.zeros(3), 0.0), ValueError, "temperature"),
    (lambda: apply_temperature(torch.zeros(3), math.inf), ValueError, "temperature"),
    (lambda: next_token_probs(torch.zeros(3), temperature=-1.0), ValueError, "temperature"),
    (lambda: next_token_probs(torch.zeros(3), top_k=0), ValueError, "top_k"),
    (lambda: sample_next_token(torch.zeros(3), top_p=2.0), ValueError, "top_p"),
    # greedy decoding takes the argmax without the one-hot distribution, but checks the same
    (lambda: sample_next_token(torch.tensor([[0.0, 1.0], [5.0, float("nan")]]), temperature=0), ValueError, "NaN"),
    (lambda: sample_next_token(torch.tensor([0.0, math.inf]), temperature=0), ValueError, r"\+inf"),
    (lambda: sample_next_token(torch.tensor([[0.0, 1.0], [-math.inf, -math.inf]]), temperature=0), ValueError,
     "-inf everywhere"),
    (lambda: sample_next_token(torch.zeros(3), temperature=0, top_k=0), ValueError, "top_k"),
    (lambda: sample_next_token(torch.zeros(3), temperature=-0.5), ValueError, "temperature"),
])
def test_bad_inputs_raise(call, error, match):
    with pytest.raises(error, match=match):
        call()
