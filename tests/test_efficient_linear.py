"""tfcourse.efficient.linear: linear attention (elu+1), its causal prefix-sum and recurrent forms equal to the masked
quadratic form; Performer's FAVOR+ features estimate the softmax kernel without bias, and its attention approaches
softmax attention as the number of features grows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tfcourse.efficient.linear import (elu_feature_map, favor_features, linear_attention, linear_attention_quadratic,
                                       linear_attention_recurrent, orthogonal_gaussian, performer_attention,
                                       performer_weights)


def qkv(B=2, H=2, T=23, d=8, dv=6, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, T, d, generator=g, dtype=dtype), torch.randn(B, H, T, d, generator=g, dtype=dtype),
            torch.randn(B, H, T, dv, generator=g, dtype=dtype))


@settings(max_examples=25, deadline=None)
@given(T=st.integers(1, 30), d=st.integers(1, 9), dv=st.integers(1, 7), causal=st.booleans(), seed=st.integers(0, 999))
def test_linear_form_equals_quadratic_form(T, d, dv, causal, seed):
    q, k, v = qkv(T=T, d=d, dv=dv, seed=seed)
    torch.testing.assert_close(linear_attention(q, k, v, causal=causal),
                               linear_attention_quadratic(q, k, v, causal=causal), atol=1e-12, rtol=1e-12)


def test_causal_forms_in_float32():
    q, k, v = qkv(T=200, d=16, dv=16, dtype=torch.float32)
    torch.testing.assert_close(linear_attention(q, k, v, causal=True), linear_attention_quadratic(q, k, v, causal=True),
                               atol=1e-5, rtol=1e-5)


def test_recurrent_form_equals_causal_form():
    q, k, v = qkv(T=17)
    torch.testing.assert_close(linear_attention_recurrent(q, k, v), linear_attention(q, k, v, causal=True),
                               atol=1e-12, rtol=1e-12)


def test_quadratic_form_is_attention_with_kernel_weights():
    q, k, v = qkv(T=11)
    a = elu_feature_map(q) @ elu_feature_map(k).transpose(-2, -1)
    mask = torch.ones(11, 11, dtype=torch.bool).tril()
    weights = (a * mask) / (a * mask).sum(-1, keepdim=True)
    torch.testing.assert_close(linear_attention_quadratic(q, k, v, causal=True, eps=0.0), weights @ v)
    assert (elu_feature_map(torch.tensor([-10.0, 0.0, 2.0])) > 0).all()
    assert elu_feature_map(torch.tensor(-50.0)) >= 0  # exp(-50) - 1 + 1 rounds to 0 in float32


def test_causal_output_ignores_the_future():
    q, k, v = qkv(T=20)
    out = linear_attention(q, k, v, causal=True)
    k2, v2 = k.clone(), v.clone()
    k2[..., 12:, :] = 3.0
    v2[..., 12:, :] = -7.0
    torch.testing.assert_close(linear_attention(q, k2, v2, causal=True)[..., :12, :], out[..., :12, :])


def test_cross_attention_lengths_non_causal():
    g = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(3, 7, 4, generator=g), torch.randn(3, 19, 4, generator=g), torch.randn(3, 19, 2, generator=g)
    torch.testing.assert_close(linear_attention(q, k, v), linear_attention_quadratic(q, k, v), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="self-attention"):
        linear_attention(q, k, v, causal=True)


# ----------------------------------------------------------------------------------------------------- Performer

def test_orthogonal_projection_blocks_are_orthogonal_with_gaussian_norms():
    w = orthogonal_gaussian(20, 8, torch.Generator().manual_seed(0), dtype=torch.float64)
    assert w.shape == (20, 8)
    for block in (w[:8], w[8:16]):
        gram = block @ block.T
        off = gram - torch.diag(torch.diag(gram))
        assert off.abs().max() < 1e-10
    many = orthogonal_gaussian(4000, 8, torch.Generator().manual_seed(1), dtype=torch.float64)
    assert abs(many.norm(dim=1).pow(2).mean().item() - 8) < 0.3  # E|w|^2 = d, as for N(0, I)


def test_favor_features_estimate_the_softmax_kernel_without_bias():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 4, generator=g, dtype=torch.float64) * 0.4, torch.randn(6, 4, generator=g, dtype=torch.float64) * 0.4
    exact = torch.exp(x @ y.T)
    w = orthogonal_gaussian(400_000, 4, torch.Generator().manual_seed(1), orthogonal=False, dtype=torch.float64)
    # without the stabilisers (which cancel in attention): phi(x) = exp(Wx - |x|^2 / 2) / sqrt(m)
    phi = lambda z: torch.exp(z @ w.T - 0.5 * (z * z).sum(-1, keepdim=True)) / w.shape[0] ** 0.5  # noqa: E731
    relative = (phi(x) @ phi(y).T / exact - 1).abs()
    assert relative.mean() < 0.005 and relative.max() < 0.02, relative
    feats = favor_features(x, w[:64], is_query=True)
    assert (feats > 0).all() and feats.shape == (5, 64)


def test_performer_approaches_softmax_attention_as_features_grow():
    q, k, v = qkv(B=1, H=1, T=64, d=16, dv=16, dtype=torch.float64)
    q, k = q * 0.5, k * 0.5
    exact = F.scaled_dot_product_attention(q, k, v)
    errors = []
    for m in (16, 256, 4096):
        err = [(performer_attention(q, k, v, m, generator=torch.Generator().manual_seed(s)) - exact).abs().mean().item()
               for s in range(3)]
        errors.append(sum(err) / 3)
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.2 * errors[0]


def test_performer_causal_form_and_weights():
    q, k, v = qkv(B=1, H=2, T=30, d=8, dv=4)
    w = orthogonal_gaussian(64, 8, torch.Generator().manual_seed(2), dtype=torch.float64)
    causal = performer_attention(q, k, v, causal=True, projection=w)
    k2 = k.clone()
    k2[..., 20:, :] += 1.0
    torch.testing.assert_close(performer_attention(q, k2, v, causal=True, projection=w)[..., :20, :], causal[..., :20, :],
                               atol=1e-12, rtol=1e-12)
    weights = performer_weights(q, k, projection=w)
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 2, 30, dtype=torch.float64))
    torch.testing.assert_close(weights @ v, performer_attention(q, k, v, projection=w), atol=1e-10, rtol=1e-10)


def test_bad_inputs():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="feature_map"):
        linear_attention(q, k, v, feature_map=3)
    with pytest.raises(ValueError, match="projection"):
        favor_features(q, torch.randn(4, 5), is_query=True)
    with pytest.raises(ValueError, match="n_features"):
        orthogonal_gaussian(0, 4)
