"""tfcourse.recurrent: RWKV's WKV, RetNet's retention and the selective scan, parallel forms equal to recurrent ones."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tfcourse._checks import DtypeError
from tfcourse.recurrent import (MODES, MambaBlock, MultiScaleRetention, RWKVTimeMixing, linear_scan,
                                retention_chunkwise, retention_decay_mask, retention_parallel, retention_recurrent,
                                retnet_gammas, selective_scan, wkv_parallel, wkv_recurrent)

f64 = dict(dtype=torch.float64)


def wkv_inputs(B=2, T=11, C=5, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    k = scale * torch.randn(B, T, C, generator=g, **f64)
    v = torch.randn(B, T, C, generator=g, **f64)
    w = torch.rand(C, generator=g, **f64) * 2
    u = torch.randn(C, generator=g, **f64)
    return w, u, k, v


def wkv_naive(w, u, k, v):
    """Eq. 14 of Peng et al. written as sums, without any stabilisation."""
    B, T, C = k.shape
    out = torch.zeros_like(v)
    for t in range(T):
        num = torch.exp(u + k[:, t]) * v[:, t]
        den = torch.exp(u + k[:, t])
        for i in range(t):
            weight = torch.exp(-(t - 1 - i) * w + k[:, i])
            num, den = num + weight * v[:, i], den + weight
        out[:, t] = num / den
    return out


# ----------------------------------------------------------------------------------------------------------------
# RWKV
# ----------------------------------------------------------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(T=st.integers(1, 24), C=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_wkv_parallel_equals_recurrent_equals_the_sums(T, C, seed):
    w, u, k, v = wkv_inputs(2, T, C, seed)
    recurrent, _ = wkv_recurrent(w, u, k, v)
    torch.testing.assert_close(wkv_parallel(w, u, k, v), recurrent, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(recurrent, wkv_naive(w, u, k, v), rtol=1e-12, atol=1e-12)


def test_wkv_recurrent_is_stable_where_the_naive_sums_overflow():
    w, u, k, v = wkv_inputs(scale=400.0, seed=1)
    assert not torch.isfinite(wkv_naive(w, u, k, v)).all()              # e^{400 + ...} overflows float64
    recurrent, _ = wkv_recurrent(w, u, k, v)
    assert torch.isfinite(recurrent).all()
    torch.testing.assert_close(wkv_parallel(w, u, k, v), recurrent, rtol=1e-10, atol=1e-10)


def test_wkv_output_is_a_convex_combination_of_values():
    w, u, k, v = wkv_inputs(seed=2)
    out, _ = wkv_recurrent(w, u, k, v)
    running_max = torch.cummax(v, dim=1).values
    running_min = torch.cummin(v, dim=1).values
    assert (out <= running_max + 1e-12).all() and (out >= running_min - 1e-12).all()


def test_rwkv_layer_modes_and_states_agree():
    torch.manual_seed(3)
    layer = RWKVTimeMixing(12).double()
    x = torch.randn(3, 17, 12, **f64)
    parallel, state_p = layer(x)
    recurrent, state_r = layer(x, mode="recurrent")
    torch.testing.assert_close(parallel, recurrent, rtol=1e-12, atol=1e-12)
    for a, b in zip(state_p, state_r):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # continue from the parallel prefix's state, one token at a time
    prefix, state = layer(x[:, :6])
    outs = [prefix]
    for t in range(6, 17):
        y, state = layer(x[:, t:t + 1], state=state, mode="recurrent")
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs, dim=1), parallel, rtol=1e-12, atol=1e-12)


def test_rwkv_is_causal():
    torch.manual_seed(4)
    layer = RWKVTimeMixing(6).double()
    x = torch.randn(1, 10, 6, **f64)
    x2 = x.clone()
    x2[:, 7:] += 1.0
    torch.testing.assert_close(layer(x)[0][:, :7], layer(x2)[0][:, :7], rtol=0, atol=0)


def test_rwkv_bad_inputs():
    w, u, k, v = wkv_inputs()
    with pytest.raises(ValueError, match="non-negative"):
        wkv_recurrent(-w - 1, u, k, v)
    with pytest.raises(ValueError, match=r"\(C,\)"):
        wkv_parallel(w[:-1], u, k, v)
    with pytest.raises(ValueError, match="shape of k"):
        wkv_parallel(w, u, k, v[:, :-1])
    layer = RWKVTimeMixing(5).double()
    with pytest.raises(ValueError, match="mode"):
        layer(v, mode="chunkwise")
    with pytest.raises(ValueError, match="recurrent"):
        layer(v, state=layer(v)[1])
    with pytest.raises(DtypeError):
        layer(v.float())


# ----------------------------------------------------------------------------------------------------------------
# RetNet
# ----------------------------------------------------------------------------------------------------------------

def retention_inputs(B=2, H=3, T=13, dk=4, dv=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, T, dk, generator=g, **f64) for _ in range(2))
    v = torch.randn(B, H, T, dv, generator=g, **f64)
    return q, k, v, retnet_gammas(H, torch.float64)


def test_gammas_and_decay_mask():
    gamma = retnet_gammas(4, torch.float64)
    torch.testing.assert_close(gamma, torch.tensor([1 - 1 / 32, 1 - 1 / 64, 1 - 1 / 128, 1 - 1 / 256], **f64))
    D = retention_decay_mask(5, gamma)
    assert D.shape == (4, 5, 5)
    assert D[1, 4, 1].item() == pytest.approx(gamma[1].item() ** 3) and D[1, 1, 4] == 0


@settings(max_examples=25, deadline=None)
@given(T=st.integers(1, 30), chunk=st.integers(1, 9), seed=st.integers(0, 10_000))
def test_retention_parallel_equals_recurrent_equals_chunkwise(T, chunk, seed):
    q, k, v, gamma = retention_inputs(T=T, seed=seed)
    parallel = retention_parallel(q, k, v, gamma)
    recurrent, S = retention_recurrent(q, k, v, gamma)
    chunked, R = retention_chunkwise(q, k, v, gamma, chunk)
    torch.testing.assert_close(recurrent, parallel, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(chunked, parallel, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(R, S, rtol=1e-12, atol=1e-12)


def test_retention_equals_its_sum_definition():
    q, k, v, gamma = retention_inputs(B=1, H=2, T=6)
    out = retention_parallel(q, k, v, gamma)
    n, h = 4, 1
    expected = sum(gamma[h] ** (n - m) * (q[0, h, n] @ k[0, h, m]) * v[0, h, m] for m in range(n + 1))
    torch.testing.assert_close(out[0, h, n], expected)


def test_retention_state_continues_a_sequence():
    q, k, v, gamma = retention_inputs(T=20)
    full, _ = retention_recurrent(q, k, v, gamma)
    first, S = retention_chunkwise(q[:, :, :7], k[:, :, :7], v[:, :, :7], gamma, 3)
    second, _ = retention_recurrent(q[:, :, 7:], k[:, :, 7:], v[:, :, 7:], gamma, S)
    torch.testing.assert_close(torch.cat([first, second], dim=2), full, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["recurrent", "chunkwise"])
def test_multiscale_retention_modes_agree(mode):
    torch.manual_seed(5)
    layer = MultiScaleRetention(24, 3).double()
    x = torch.randn(2, 19, 24, **f64)
    parallel, _ = layer(x)
    other, _ = layer(x, mode=mode, chunk_size=5)
    torch.testing.assert_close(other, parallel, rtol=1e-10, atol=1e-12)
    # in two pieces, with the state and the position offset
    y1, state = layer(x[:, :8], mode="recurrent")
    y2, _ = layer(x[:, 8:], mode=mode, state=state, offset=8, chunk_size=4)
    torch.testing.assert_close(torch.cat([y1, y2], dim=1), parallel, rtol=1e-10, atol=1e-12)


def test_retention_state_has_a_fixed_size():
    layer = MultiScaleRetention(16, 2).double()
    sizes = {layer(torch.randn(1, T, 16, **f64), mode="recurrent")[1].shape for T in (1, 10, 100)}
    assert sizes == {(1, 2, 8, 8)}


def test_retention_bad_inputs():
    q, k, v, gamma = retention_inputs()
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        retention_parallel(q, k, v, gamma + 1)
    with pytest.raises(ValueError, match=r"\(H,\)"):
        retention_recurrent(q, k, v, gamma[:2])
    with pytest.raises(ValueError, match="shape of q"):
        retention_chunkwise(q, k[..., :3], v, gamma)
    with pytest.raises(ValueError, match="chunk_size"):
        retention_chunkwise(q, k, v, gamma, 0)
    with pytest.raises(ValueError, match="even d_head"):
        MultiScaleRetention(12, 4)
    layer = MultiScaleRetention(8, 2).double()
    with pytest.raises(ValueError, match="mode must be one of"):
        layer(torch.randn(1, 3, 8, **f64), mode="loop")
    with pytest.raises(ValueError, match="continuing"):
        layer(torch.randn(1, 3, 8, **f64), offset=3)


# ----------------------------------------------------------------------------------------------------------------
# The scan and the selective SSM
# ----------------------------------------------------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(T=st.integers(1, 70), seed=st.integers(0, 10_000))
def test_parallel_scan_equals_the_loop(T, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(2, T, 3, 4, generator=g, **f64) * 1.2           # some |a| > 1: the scan must still be exact
    b = torch.randn(2, T, 3, 4, generator=g, **f64)
    h0 = torch.randn(2, 3, 4, generator=g, **f64)
    torch.testing.assert_close(linear_scan(a, b), linear_scan(a, b, mode="recurrent"), rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(linear_scan(a, b, h0=h0), linear_scan(a, b, "recurrent", h0), rtol=1e-11, atol=1e-11)


def test_scan_of_a_constant_coefficient_is_a_discounted_sum():
    b = torch.randn(1, 9, 1, **f64)
    h = linear_scan(torch.full_like(b, 0.5), b)
    expected = sum(0.5 ** (8 - s) * b[0, s, 0] for s in range(9))
    assert h[0, -1, 0].item() == pytest.approx(expected.item())


def selective_scan_loop(u, delta, A, B, C, D):
    """The selective SSM as an explicit loop over time, channels and states (the Mamba code's reference)."""
    Bsz, T, Dch = u.shape
    y = torch.zeros_like(u)
    for bi in range(Bsz):
        for d in range(Dch):
            h = torch.zeros(A.shape[1], **f64)
            for t in range(T):
                h = torch.exp(delta[bi, t, d] * A[d]) * h + delta[bi, t, d] * B[bi, t] * u[bi, t, d]
                y[bi, t, d] = (C[bi, t] * h).sum() + D[d] * u[bi, t, d]
    return y


def test_selective_scan_parallel_equals_sequential_and_the_triple_loop():
    g = torch.Generator().manual_seed(6)
    Bsz, T, Dch, N = 2, 12, 3, 4
    u = torch.randn(Bsz, T, Dch, generator=g, **f64)
    delta = torch.nn.functional.softplus(torch.randn(Bsz, T, Dch, generator=g, **f64))
    A = -torch.rand(Dch, N, generator=g, **f64) * 3
    B, C = (torch.randn(Bsz, T, N, generator=g, **f64) for _ in range(2))
    D = torch.randn(Dch, generator=g, **f64)
    parallel = selective_scan(u, delta, A, B, C, D)
    sequential = selective_scan(u, delta, A, B, C, D, mode="recurrent")
    torch.testing.assert_close(parallel, sequential, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sequential, selective_scan_loop(u, delta, A, B, C, D), rtol=1e-12, atol=1e-12)


def test_selectivity_large_step_resets_small_step_keeps():
    """Delta large: exp(Delta A) ~ 0, the state forgets the past; Delta tiny: the state barely changes."""
    u = torch.zeros(1, 3, 1, **f64)
    u[0, 0, 0] = 1.0
    A, B, C = -torch.ones(1, 1, **f64), torch.ones(1, 3, 1, **f64), torch.ones(1, 3, 1, **f64)
    keep = selective_scan(u, torch.tensor([[[1.0], [1e-6], [1e-6]]], **f64), A, B, C)
    forget = selective_scan(u, torch.tensor([[[1.0], [50.0], [50.0]]], **f64), A, B, C)
    assert keep[0, 2, 0].item() == pytest.approx(keep[0, 0, 0].item(), rel=1e-5)
    assert abs(forget[0, 2, 0].item()) < 1e-20


def test_mamba_block_modes_agree_and_it_is_causal():
    torch.manual_seed(7)
    block = MambaBlock(8, d_state=4).double()
    x = torch.randn(2, 23, 8, **f64)
    torch.testing.assert_close(block(x), block(x, mode="recurrent"), rtol=1e-12, atol=1e-12)
    x2 = x.clone()
    x2[:, 15:] = torch.randn(2, 8, 8, **f64)
    assert torch.equal(block(x)[:, :15], block(x2)[:, :15])
    A = -torch.exp(block.A_log)
    torch.testing.assert_close(A[0], -torch.arange(1.0, 5.0, **f64))   # S4D-real initialisation
    dt = torch.nn.functional.softplus(block.dt_proj.bias)
    assert dt.min() >= 0.001 - 1e-9 and dt.max() <= 0.1 + 1e-9


def test_scan_bad_inputs():
    a = torch.rand(1, 5, 2)
    with pytest.raises(ValueError, match="shape of a"):
        linear_scan(a, torch.rand(1, 4, 2))
    with pytest.raises(ValueError, match="mode"):
        linear_scan(a, a, mode="chunkwise")
    with pytest.raises(ValueError, match="without T"):
        linear_scan(a, a, h0=torch.zeros(1, 5, 2))
    u = torch.randn(1, 5, 3)
    with pytest.raises(ValueError, match=r"\(D,\) of u"):
        selective_scan(u, u, torch.randn(2, 4), torch.randn(1, 5, 4), torch.randn(1, 5, 4))
    with pytest.raises(ValueError, match=r"\(B, T, N\)"):
        selective_scan(u, u, torch.randn(3, 4), torch.randn(1, 5, 3), torch.randn(1, 5, 3))
    with pytest.raises(ValueError, match="d_state"):
        MambaBlock(8, d_state=0)
    assert MODES == ("parallel", "recurrent", "chunkwise")
