"""tfcourse.efficient.sparse: every mask has exactly the pattern its docstring states (checked entry by entry
against the rule written out with Python loops), and banded sliding-window attention equals masked attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tfcourse.efficient.sparse import (bigbird_mask, block_sparse_mask, fixed_mask, longformer_mask, mask_density,
                                       reachable, sliding_window_mask, sparse_attention, sliding_window_attention,
                                       strided_mask)


def from_rule(T, rule):
    return torch.tensor([[bool(rule(i, j)) for j in range(T)] for i in range(T)])


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 40), window=st.integers(0, 45), causal=st.booleans())
def test_sliding_window_pattern(T, window, causal):
    expected = from_rule(T, lambda i, j: abs(i - j) <= window and (j <= i or not causal))
    assert torch.equal(sliding_window_mask(T, window, causal), expected)


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 40), stride=st.integers(1, 12), causal=st.booleans())
def test_strided_pattern(T, stride, causal):
    expected = from_rule(T, lambda i, j: (abs(i - j) < stride or (i - j) % stride == 0) and (j <= i or not causal))
    assert torch.equal(strided_mask(T, stride, causal), expected)


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 40), stride=st.integers(1, 12), c=st.integers(1, 12), causal=st.booleans())
def test_fixed_pattern(T, stride, c, causal):
    c = min(c, stride)
    expected = from_rule(T, lambda i, j: (i // stride == j // stride or j % stride >= stride - c)
                         and (j <= i or not causal))
    assert torch.equal(fixed_mask(T, stride, c, causal), expected)


def test_strided_with_sqrt_stride_reaches_every_earlier_token_in_two_layers():
    T, stride = 64, 8
    mask = strided_mask(T, stride)
    assert mask.sum(1).max() <= 2 * stride  # about 2 sqrt(T) keys per query
    assert torch.equal(reachable(mask, 2), torch.ones(T, T, dtype=torch.bool).tril())
    assert not torch.equal(reachable(mask, 1), torch.ones(T, T, dtype=torch.bool).tril())


def test_block_sparse_pattern_and_cut_last_block():
    layout = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 1]], dtype=torch.bool)
    for T in (12, 10):
        expected = from_rule(T, lambda i, j: bool(layout[i // 4, j // 4]))
        assert torch.equal(block_sparse_mask(layout, 4, T), expected)
    with pytest.raises(ValueError, match="T must lie"):
        block_sparse_mask(layout, 4, 8)
    with pytest.raises(ValueError, match="square bool"):
        block_sparse_mask(layout.int(), 4)


@settings(max_examples=30, deadline=None)
@given(T=st.integers(2, 40), window=st.integers(0, 6), data=st.data())
def test_longformer_pattern(T, window, data):
    globals_ = data.draw(st.lists(st.integers(0, T - 1), max_size=3, unique=True))
    expected = from_rule(T, lambda i, j: abs(i - j) <= window or i in globals_ or j in globals_)
    assert torch.equal(longformer_mask(T, window, globals_), expected)


@settings(max_examples=30, deadline=None)
@given(T=st.integers(2, 40), window=st.integers(0, 4), n_random=st.integers(0, 5), seed=st.integers(0, 99))
def test_bigbird_pattern(T, window, n_random, seed):
    globals_ = [0, T - 1] if T > 2 else [0]
    mask = bigbird_mask(T, window, globals_, n_random, torch.Generator().manual_seed(seed))
    base = longformer_mask(T, window, globals_)
    assert torch.equal(mask & base, base), "window and global tokens are all kept"
    extra = mask & ~base
    for i in range(T):
        if i in globals_:
            assert not extra[i].any()
        else:  # exactly n_random keys beyond the window and the globals (all there are, if fewer)
            assert int(extra[i].sum()) == min(n_random, int((~base[i]).sum()))
    again = bigbird_mask(T, window, globals_, n_random, torch.Generator().manual_seed(seed))
    assert torch.equal(mask, again), "the generator fixes the random keys"


def test_bigbird_random_keys_shorten_paths():
    T = 128
    window_only = sliding_window_mask(T, 2)
    bigbird = bigbird_mask(T, 2, [], 2, torch.Generator().manual_seed(0))
    assert reachable(window_only, 3).float().mean() < 0.11
    assert reachable(bigbird, 3).float().mean() > 0.3
    assert mask_density(bigbird) == pytest.approx(mask_density(window_only) + 2 / T, abs=1e-6)


def test_sparse_attention_equals_sdpa_with_the_mask():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 33, 8, generator=g) for _ in range(3))
    for mask in (strided_mask(33, 6), longformer_mask(33, 2, [0, 5]), fixed_mask(33, 8, 2)):
        torch.testing.assert_close(sparse_attention(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                                   atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [0, 1, 5, 40])
def test_banded_sliding_window_attention_equals_masked(causal, window):
    g = torch.Generator().manual_seed(window)
    q, k, v = (torch.randn(2, 2, 31, 8, generator=g, dtype=torch.float64) for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=sliding_window_mask(31, window, causal))
    torch.testing.assert_close(sliding_window_attention(q, k, v, window, causal), expected, atol=1e-12, rtol=1e-12)


def test_banded_attention_memory_is_linear_in_T():
    from tfcourse.efficient.measure import peak_memory_bytes

    peaks = []
    for T in (512, 1024):
        q = torch.randn(1, 1, T, 16)
        peaks.append(peak_memory_bytes(lambda: sliding_window_attention(q, q, q, 8)))
    assert 1.6 < peaks[1] / peaks[0] < 2.4  # doubles with T (dense attention would quadruple)


def test_bad_inputs():
    with pytest.raises(ValueError, match="window"):
        sliding_window_mask(8, -1)
    with pytest.raises(ValueError, match="stride"):
        strided_mask(8, 0)
    with pytest.raises(ValueError, match="n_summary"):
        fixed_mask(8, 4, 5)
    with pytest.raises(ValueError, match="global_tokens"):
        longformer_mask(8, 1, [8])
    with pytest.raises(TypeError, match="generator"):
        bigbird_mask(8, 1, [0], 1, generator=3)
    with pytest.raises(ValueError, match="mask must be a bool"):
        q = torch.randn(4, 3)
        sparse_attention(q, q, q, torch.ones(4, 4))
    with pytest.raises(ValueError, match="self-attention"):
        sliding_window_attention(torch.randn(5, 3), torch.randn(6, 3), torch.randn(6, 3), 1)
