"""tfcourse.attention against its peer, torch.nn.functional.scaled_dot_product_attention, and its own properties."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tfcourse.attention import (
    AdditiveScore,
    Attention,
    DotProductScore,
    MultiplicativeScore,
    ScaledDotProductScore,
    causal_mask,
    lengths_to_mask,
    masked_softmax,
    scaled_dot_product_attention,
)

TOL = {torch.float32: 1e-6, torch.float64: 1e-12}


def qkv(B=2, H=3, Tq=5, Tk=7, E=8, Ev=6, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, Tq, E, generator=g, dtype=dtype),
            torch.randn(B, H, Tk, E, generator=g, dtype=dtype),
            torch.randn(B, H, Tk, Ev, generator=g, dtype=dtype))


def random_bool_mask(shape, seed=1, p=0.3):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) > p


# ---------------------------------------------------------------------------------------------- equality with SDPA

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_equals_torch_sdpa_without_mask(dtype, scale):
    q, k, v = qkv(dtype=dtype)
    ours = scaled_dot_product_attention(q, k, v, scale=scale)
    theirs = F.scaled_dot_product_attention(q, k, v, scale=scale)
    torch.testing.assert_close(ours, theirs, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mask_shape", [(2, 3, 5, 7), (5, 7), (2, 1, 1, 7), (1, 3, 5, 1)])
def test_equals_torch_sdpa_bool_mask(dtype, mask_shape):
    q, k, v = qkv(dtype=dtype)
    mask = random_bool_mask(mask_shape)
    ours = scaled_dot_product_attention(q, k, v, attn_mask=mask)
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(ours, theirs, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equals_torch_sdpa_float_mask(dtype):
    q, k, v = qkv(dtype=dtype)
    g = torch.Generator().manual_seed(3)
    mask = torch.randn(2, 3, 5, 7, generator=g, dtype=dtype)
    mask[random_bool_mask(mask.shape, seed=4, p=0.7)] = float("-inf")  # some blocked keys
    ours = scaled_dot_product_attention(q, k, v, attn_mask=mask)
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(ours, theirs, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("Tq,Tk", [(6, 6), (4, 7), (7, 4)])
def test_equals_torch_sdpa_causal(dtype, Tq, Tk):
    q, k, v = qkv(Tq=Tq, Tk=Tk, dtype=dtype)
    ours = scaled_dot_product_attention(q, k, v, is_causal=True)
    theirs = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(ours, theirs, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fully_masked_rows_give_zeros_like_torch(dtype):
    q, k, v = qkv(dtype=dtype)
    mask = random_bool_mask((2, 3, 5, 7))
    mask[0, 1, 2] = False  # one query may attend to nothing
    mask[1, :, 4] = False
    out, w = scaled_dot_product_attention(q, k, v, attn_mask=mask, return_weights=True)
    assert torch.isfinite(out).all() and torch.isfinite(w).all()
    assert (w[0, 1, 2] == 0).all() and (out[0, 1, 2] == 0).all() and (out[1, :, 4] == 0).all()
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, theirs, atol=TOL[dtype], rtol=TOL[dtype])


def test_float_mask_fully_blocked_row_gives_zeros():
    q, k, v = qkv()
    mask = torch.zeros(5, 7)
    mask[3] = float("-inf")
    out, w = scaled_dot_product_attention(q, k, v, attn_mask=mask, return_weights=True)
    assert (out[..., 3, :] == 0).all() and (w[..., 3, :] == 0).all()
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=1e-6, rtol=1e-6)


def test_dropout_matches_torch_under_the_same_seed():
    # Both draw one Bernoulli mask of shape (..., Tq, Tk) on the weights, scaled by 1/(1-p): same seed, same result.
    q, k, v = qkv(dtype=torch.float64)
    torch.manual_seed(7)
    ours = scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(7)
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
    expected = F.dropout(weights, p=0.5) @ v
    torch.testing.assert_close(ours, expected, atol=1e-12, rtol=1e-12)
    assert not torch.allclose(ours, F.scaled_dot_product_attention(q, k, v))


def test_return_weights_are_the_softmax_of_scaled_scores():
    q, k, v = qkv(dtype=torch.float64)
    out, w = scaled_dot_product_attention(q, k, v, return_weights=True)
    expected = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(8), dim=-1)
    torch.testing.assert_close(w, expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(out, w @ v, atol=1e-12, rtol=1e-12)


def test_three_dimensional_inputs():
    q, k, v = (x[:, 0] for x in qkv())  # (B, T, E)
    torch.testing.assert_close(scaled_dot_product_attention(q, k, v), F.scaled_dot_product_attention(q, k, v),
                               atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------------------------ gradients

def test_gradcheck_float64():
    q, k, v = (x.requires_grad_() for x in qkv(B=1, H=2, Tq=3, Tk=4, E=5, Ev=2, dtype=torch.float64))
    mask = random_bool_mask((3, 4))
    mask[1] = False  # include a fully masked row: its gradient must be finite (zero)
    assert torch.autograd.gradcheck(lambda q, k, v: scaled_dot_product_attention(q, k, v, attn_mask=mask),
                                    (q, k, v))
    assert torch.autograd.gradcheck(lambda q, k, v: scaled_dot_product_attention(q, k, v, is_causal=True),
                                    (q, k, v))


def test_gradients_equal_torch_sdpa():
    q, k, v = qkv(dtype=torch.float64)
    mask = random_bool_mask((2, 3, 5, 7))
    grads = []
    for fn in (scaled_dot_product_attention, F.scaled_dot_product_attention):
        inputs = [x.clone().requires_grad_() for x in (q, k, v)]
        fn(*inputs, attn_mask=mask).pow(2).sum().backward()
        grads.append([x.grad for x in inputs])
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=1e-10)


def test_masked_softmax_gradcheck_with_fully_masked_row():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    mask = random_bool_mask((2, 4, 5))
    mask[0, 0] = False
    assert torch.autograd.gradcheck(lambda s: masked_softmax(s, mask), (scores,))


# ----------------------------------------------------------------------------------------------------- properties

shapes = st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(1, 6), st.integers(1, 8))


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16), p=st.floats(0.0, 0.9))
def test_masked_softmax_rows_sum_to_one_or_zero(shape, seed, p):
    B, Tq, Tk, _ = shape
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, Tq, Tk, generator=g, dtype=torch.float64) * 10
    mask = torch.rand(B, Tq, Tk, generator=g) > p
    w = masked_softmax(scores, mask)
    assert torch.isfinite(w).all() and (w >= 0).all()
    assert (w[~mask] == 0).all()
    sums = w.sum(-1)
    has_key = mask.any(-1)
    torch.testing.assert_close(sums[has_key], torch.ones_like(sums[has_key]), atol=1e-12, rtol=0)
    assert (sums[~has_key] == 0).all()


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16))
def test_output_is_a_convex_combination_of_values(shape, seed):
    B, Tq, Tk, E = shape
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, E, generator=g, dtype=torch.float64) for T in (Tq, Tk, Tk))
    out = scaled_dot_product_attention(q, k, v)
    assert (out <= v.amax(dim=1, keepdim=True) + 1e-12).all()
    assert (out >= v.amin(dim=1, keepdim=True) - 1e-12).all()


@settings(max_examples=30, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16))
def test_permuting_keys_and_values_together_changes_nothing(shape, seed):
    B, Tq, Tk, E = shape
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, E, generator=g, dtype=torch.float64) for T in (Tq, Tk, Tk))
    perm = torch.randperm(Tk, generator=g)
    torch.testing.assert_close(scaled_dot_product_attention(q, k, v),
                               scaled_dot_product_attention(q, k[:, perm], v[:, perm]), atol=1e-12, rtol=1e-12)


@settings(max_examples=30, deadline=None)
@given(T=st.integers(2, 8), seed=st.integers(0, 2**16))
def test_causal_output_does_not_depend_on_the_future(T, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, T, 4, generator=g, dtype=torch.float64) for _ in range(3))
    t = int(torch.randint(0, T - 1, (1,), generator=g))
    k2, v2 = k.clone(), v.clone()
    k2[:, t + 1:] += 5.0
    v2[:, t + 1:] -= 3.0
    a = scaled_dot_product_attention(q, k, v, is_causal=True)
    b = scaled_dot_product_attention(q, k2, v2, is_causal=True)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], atol=1e-12, rtol=1e-12)


def test_padding_does_not_change_unpadded_queries():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 6, generator=g) for _ in range(3))
    padded_k = torch.cat([k, torch.randn(1, 3, 6, generator=g)], dim=1)
    padded_v = torch.cat([v, torch.randn(1, 3, 6, generator=g)], dim=1)
    mask = lengths_to_mask(torch.tensor([4]), max_len=7)[:, None, :]  # (B, 1, Tk)
    torch.testing.assert_close(scaled_dot_product_attention(q, padded_k, padded_v, attn_mask=mask),
                               scaled_dot_product_attention(q, k, v), atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------------------ scoring modules

def test_score_modules_shapes_and_formulas():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    k = torch.randn(2, 5, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(DotProductScore()(q, k), torch.einsum("bqd,bkd->bqk", q, k))
    torch.testing.assert_close(ScaledDotProductScore()(q, k), torch.einsum("bqd,bkd->bqk", q, k) / 2.0)

    k6 = torch.randn(2, 5, 6, generator=g, dtype=torch.float64)
    add = AdditiveScore(4, 6, 7).double()
    expected = torch.einsum(
        "bqkh,h->bqk",
        torch.tanh((q @ add.W_q.weight.T)[:, :, None] + (k6 @ add.W_k.weight.T)[:, None]),
        add.w_v.weight[0],
    )
    torch.testing.assert_close(add(q, k6), expected)
    mul = MultiplicativeScore(4, 6).double()
    torch.testing.assert_close(mul(q, k6), torch.einsum("bqd,de,bke->bqk", q, mul.W.weight, k6))
    for score in (DotProductScore(), ScaledDotProductScore(), add, mul):
        keys = k if isinstance(score, (DotProductScore, ScaledDotProductScore)) else k6
        assert score(q, keys).shape == (2, 3, 5)


def test_attention_module_with_scaled_dot_score_equals_sdpa():
    q, k, v = qkv(dtype=torch.float64)
    mask = random_bool_mask((2, 3, 5, 7))
    out, w = Attention(ScaledDotProductScore())(q, k, v, mask)
    ref_out, ref_w = scaled_dot_product_attention(q, k, v, attn_mask=mask, return_weights=True)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(w, ref_w)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def test_additive_score_gradcheck():
    torch.manual_seed(0)
    score = AdditiveScore(3, 4, 5).double()
    q = torch.randn(1, 2, 3, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(score, (q, k))


def test_causal_mask_and_lengths_to_mask():
    assert torch.equal(causal_mask(3), torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool))
    assert causal_mask(2, 4).shape == (2, 4)
    assert torch.equal(lengths_to_mask(torch.tensor([1, 3]), 4),
                       torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool))


# ----------------------------------------------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("bad,match", [
    (lambda q, k, v: (q[0, 0, 0], k, v), "query"),                       # 1-D query
    (lambda q, k, v: (q, k[:, :2], v), "key"),                           # head dims differ
    (lambda q, k, v: (q, k[:1], v), "key"),                              # batch dims differ
    (lambda q, k, v: (q, k[..., :4], v), "key"),                         # feature size differs
    (lambda q, k, v: (q, k, v[..., :3, :]), "value"),                    # Tk differs
    (lambda q, k, v: (q, k, v[0]), "value"),                             # ndim differs
    (lambda q, k, v: (q, k.double(), v), "key"),                         # dtype differs
    (lambda q, k, v: (q.long(), k, v), "query"),                         # not floating
    (lambda q, k, v: (q.numpy(), k, v), "query"),                        # not a tensor
])
def test_bad_inputs_raise_naming_the_argument(bad, match):
    q, k, v = qkv()
    with pytest.raises((ValueError, TypeError), match=match):
        scaled_dot_product_attention(*bad(q, k, v))


def test_wrong_dtype_is_a_value_error():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="key"):
        scaled_dot_product_attention(q, k.double(), v)
    with pytest.raises(ValueError, match="attn_mask"):
        scaled_dot_product_attention(q, k, v, attn_mask=torch.zeros(5, 7, dtype=torch.float64))


@pytest.mark.parametrize("shape", [(5, 6), (2, 3, 7, 7), (2, 5, 7), (7,) * 5])
def test_wrong_mask_shape_raises(shape):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="attn_mask"):
        scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(shape, dtype=torch.bool))


def test_other_bad_arguments():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="is_causal"):
        scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(5, 7, dtype=torch.bool), is_causal=True)
    with pytest.raises(ValueError, match="dropout_p"):
        scaled_dot_product_attention(q, k, v, dropout_p=1.5)
    with pytest.raises(ValueError, match="mask"):
        masked_softmax(torch.randn(2, 3), torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        masked_softmax(torch.randn(2, 3), torch.ones(2, 3))  # float mask: use attn_mask of SDPA
    with pytest.raises(ValueError, match="keys"):
        DotProductScore()(torch.randn(2, 3, 4), torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="keys"):
        AdditiveScore(4, 5, 6)(torch.randn(2, 3, 4), torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="queries"):
        MultiplicativeScore(4, 5)(torch.randn(2, 3, 3), torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="d_hidden"):
        AdditiveScore(4, 5, 0)
    with pytest.raises(ValueError, match="lengths"):
        lengths_to_mask(torch.tensor([1, 5]), max_len=3)
    with pytest.raises(ValueError, match="t_key"):
        causal_mask(3, 0)
