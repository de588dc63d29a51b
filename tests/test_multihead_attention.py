"""tfcourse.attention.MultiHeadAttention against its peers, torch.nn.MultiheadAttention and
F.scaled_dot_product_attention(..., enable_gqa=True), and its own properties: masks, grouped-query attention, the
KV cache, the parameter count, gradients and bad inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tfcourse.attention import (
    KVCache,
    MultiHeadAttention,
    causal_mask,
    kv_cache_bytes,
    lengths_to_mask,
    merge_heads,
    repeat_kv,
    split_heads,
)

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
B, TQ, TK, D, H = 3, 5, 7, 20, 4  # d_head = 5: the scale 1/sqrt(5) is not exact, so rounding differs a little


def torch_pair(dtype=torch.float64, seed=0, **kwargs):
    """A random torch.nn.MultiheadAttention (batch-first, random biases too) and ours with the same weights."""
    torch.manual_seed(seed)
    theirs = nn.MultiheadAttention(D, H, batch_first=True, **kwargs).to(dtype)
    with torch.no_grad():  # torch initialises the biases to zero: make them random so that they are tested
        for name, p in theirs.named_parameters():
            if "bias" in name:
                p.normal_()
    return theirs, MultiHeadAttention.from_torch(theirs)


def inputs(dtype=torch.float64, kdim=D, vdim=D, Tq=TQ, Tk=TK, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Tq, D, generator=g, dtype=dtype), torch.randn(B, Tk, kdim, generator=g, dtype=dtype),
            torch.randn(B, Tk, vdim, generator=g, dtype=dtype))


def padding(Tk=TK):
    """Key padding for torch's convention: True = padding. Sequence lengths 7, 4 and 1."""
    return ~lengths_to_mask(torch.tensor([Tk, 4, 1]), max_len=Tk)


def assert_close(a, b, dtype):
    torch.testing.assert_close(a, b, atol=TOL[dtype], rtol=TOL[dtype])


# ---------------------------------------------------------------------------------- equality with torch's module

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("use_padding", [False, True])
@pytest.mark.parametrize("average", [True, False])
def test_self_attention_equals_torch(dtype, use_padding, average):
    theirs, ours = torch_pair(dtype)
    x, _, _ = inputs(dtype, Tq=TK)
    kpm = padding() if use_padding else None
    out, w = ours(x, x, x, key_padding_mask=kpm, need_weights=True, average_attn_weights=average)
    ref_out, ref_w = theirs(x, x, x, key_padding_mask=kpm, average_attn_weights=average)
    assert w.shape == ((B, TK, TK) if average else (B, H, TK, TK))
    assert_close(out, ref_out, dtype)
    assert_close(w, ref_w, dtype)
    # Without the weights torch takes another path (SDPA); the output is the same.
    out_only, none = ours(x, x, x, key_padding_mask=kpm)
    assert none is None
    assert_close(out_only, theirs(x, x, x, key_padding_mask=kpm, need_weights=False)[0], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("use_padding", [False, True])
def test_causal_self_attention_equals_torch(dtype, use_padding):
    theirs, ours = torch_pair(dtype)
    x, _, _ = inputs(dtype, Tq=TK)
    kpm = padding() if use_padding else None
    # torch needs the mask itself (is_causal is only a hint there); ours builds it from is_causal.
    torch_mask = nn.Transformer.generate_square_subsequent_mask(TK, dtype=dtype)  # float, -inf above the diagonal
    torch_kpm = None if kpm is None else torch.zeros(B, TK, dtype=dtype).masked_fill(kpm, float("-inf"))
    out, w = ours(x, x, x, key_padding_mask=kpm, is_causal=True, need_weights=True)
    ref_out, ref_w = theirs(x, x, x, key_padding_mask=torch_kpm, attn_mask=torch_mask, is_causal=True)
    assert_close(out, ref_out, dtype)
    assert_close(w, ref_w, dtype)
    assert (w.triu(diagonal=1) == 0).all()
    # The same causal mask as torch's bool attn_mask: True = may NOT attend, i.e. ~causal_mask.
    out_bool, _ = ours(x, x, x, key_padding_mask=kpm, attn_mask=~causal_mask(TK))
    assert_close(out_bool, ref_out, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kdim,vdim", [(D, D), (6, 9), (11, D)])
def test_cross_attention_equals_torch(dtype, kdim, vdim):
    kwargs = {} if (kdim, vdim) == (D, D) else dict(kdim=kdim, vdim=vdim)
    theirs, ours = torch_pair(dtype, **kwargs)
    assert (ours.kdim, ours.vdim) == (kdim, vdim)
    q, k, v = inputs(dtype, kdim, vdim)  # Tq = 5 queries, Tk = 7 keys
    out, w = ours(q, k, v, key_padding_mask=padding(), need_weights=True)
    ref_out, ref_w = theirs(q, k, v, key_padding_mask=padding())
    assert out.shape == (B, TQ, D) and w.shape == (B, TQ, TK)
    assert_close(out, ref_out, dtype)
    assert_close(w, ref_w, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(TQ, TK), (B * H, TQ, TK)])
def test_bool_attn_mask_true_means_blocked_like_torch(dtype, shape):
    theirs, ours = torch_pair(dtype)
    q, k, v = inputs(dtype)
    blocked = torch.rand(shape, generator=torch.Generator().manual_seed(5)) < 0.4
    blocked[..., 0] = False  # every query keeps one key
    out, w = ours(q, k, v, attn_mask=blocked, need_weights=True, average_attn_weights=False)
    ref_out, ref_w = theirs(q, k, v, attn_mask=blocked, average_attn_weights=False)
    assert_close(out, ref_out, dtype)
    assert_close(w, ref_w, dtype)
    assert (w[blocked.expand(B * H, TQ, TK).reshape(B, H, TQ, TK)] == 0).all(), "True in a bool attn_mask must block"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float_masks_are_added_like_torch(dtype):
    theirs, ours = torch_pair(dtype)
    q, k, v = inputs(dtype)
    g = torch.Generator().manual_seed(6)
    attn_mask = torch.randn(TQ, TK, generator=g, dtype=dtype)
    attn_mask[1, 3:] = float("-inf")
    kpm = torch.zeros(B, TK, dtype=dtype).masked_fill(padding(), float("-inf"))
    out, w = ours(q, k, v, key_padding_mask=kpm, attn_mask=attn_mask, need_weights=True)
    ref_out, ref_w = theirs(q, k, v, key_padding_mask=kpm, attn_mask=attn_mask)
    assert_close(out, ref_out, dtype)
    assert_close(w, ref_w, dtype)
    # A float key padding mask with a bool attn_mask (torch converts bool to float; we combine them).
    blocked = torch.rand(TQ, TK, generator=g) < 0.3
    blocked[:, 0] = False
    out, _ = ours(q, k, v, key_padding_mask=kpm, attn_mask=blocked)
    torch_blocked = torch.zeros(TQ, TK, dtype=dtype).masked_fill(blocked, float("-inf"))
    assert_close(out, theirs(q, k, v, key_padding_mask=kpm, attn_mask=torch_blocked)[0], dtype)


def test_four_dimensional_attn_mask_equals_the_three_dimensional_one():
    _, ours = torch_pair()
    q, k, v = inputs()
    blocked = torch.rand(B, H, TQ, TK, generator=torch.Generator().manual_seed(8)) < 0.4
    a, _ = ours(q, k, v, attn_mask=blocked)
    b, _ = ours(q, k, v, attn_mask=blocked.reshape(B * H, TQ, TK))
    torch.testing.assert_close(a, b)
    per_batch = blocked[:, :1]  # (B, 1, Tq, Tk) broadcasts over the heads
    c, _ = ours(q, k, v, attn_mask=per_batch)
    d, _ = ours(q, k, v, attn_mask=per_batch.expand(B, H, TQ, TK).reshape(B * H, TQ, TK))
    torch.testing.assert_close(c, d)


def test_the_two_bool_conventions_are_opposite():
    """MultiHeadAttention (like torch's module): True = ignore. scaled_dot_product_attention (like SDPA): True =
    attend. Passing lengths_to_mask (True = real token) as key_padding_mask attends to the padding only."""
    _, ours = torch_pair()
    x, _, _ = inputs(Tq=TK)
    real = lengths_to_mask(torch.tensor([TK, 4, 1]), max_len=TK)  # True = real token
    _, right = ours(x, x, x, key_padding_mask=~real, need_weights=True)
    _, wrong = ours(x, x, x, key_padding_mask=real, need_weights=True)
    assert (right[~real[:, None, :].expand_as(right)] == 0).all()
    assert (wrong[real[:, None, :].expand_as(wrong)] == 0).all()
    assert (right[:, :, 0] > 0).all() and (wrong[:, :, 0] == 0).all()


@pytest.mark.parametrize("bias", [True, False])
def test_from_torch_copies_weights_dtype_and_mode(bias):
    theirs, ours = torch_pair(torch.float64, bias=bias, dropout=0.25)
    assert ours.W_q.weight.dtype == torch.float64 and ours.dropout == 0.25 and ours.training
    w_q, w_k, w_v = theirs.in_proj_weight.chunk(3)
    for mine, ref in ((ours.W_q, w_q), (ours.W_k, w_k), (ours.W_v, w_v), (ours.W_o, theirs.out_proj.weight)):
        assert torch.equal(mine.weight, ref) and mine.weight.data_ptr() != ref.data_ptr()  # a copy
        assert (mine.bias is None) == (not bias)
    assert not MultiHeadAttention.from_torch(theirs.eval()).training
    with pytest.raises(TypeError, match="module"):
        MultiHeadAttention.from_torch(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="add_bias_kv"):
        MultiHeadAttention.from_torch(nn.MultiheadAttention(8, 2, add_bias_kv=True))
    with pytest.raises(ValueError, match="add_zero_attn"):
        MultiHeadAttention.from_torch(nn.MultiheadAttention(8, 2, add_zero_attn=True))


def test_gradients_equal_torch():
    theirs, ours = torch_pair()
    q, k, v = inputs()
    ours(q, k, v, key_padding_mask=padding())[0].pow(2).sum().backward()
    theirs(q, k, v, key_padding_mask=padding())[0].pow(2).sum().backward()
    w_q, w_k, w_v = theirs.in_proj_weight.grad.chunk(3)
    for mine, ref in ((ours.W_q, w_q), (ours.W_k, w_k), (ours.W_v, w_v), (ours.W_o, theirs.out_proj.weight.grad)):
        torch.testing.assert_close(mine.weight.grad, ref, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(ours.W_q.bias.grad, theirs.in_proj_bias.grad[:D], atol=1e-12, rtol=1e-10)


def test_gradcheck_float64():
    torch.manual_seed(0)
    mha = MultiHeadAttention(6, 2, n_kv_heads=1, kdim=4).double()
    q = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 4, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    kpm = torch.tensor([[False, False, True, True], [True] * 4])  # the second sequence is all padding
    assert torch.autograd.gradcheck(lambda q, k, v: mha(q, k, v, key_padding_mask=kpm)[0], (q, k, v))


# ------------------------------------------------------------------------------ fully padded sequences and dropout

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fully_padded_sequence_gives_no_nan(dtype):
    """torch.nn.MultiheadAttention gives NaN here when need_weights=True (its own softmax over all -inf) and on its
    inference fast path; ours gives zero weights, so the output is W_o's bias, and finite gradients."""
    theirs, ours = torch_pair(dtype)
    x, _, _ = inputs(dtype, Tq=TK)
    x.requires_grad_()
    kpm = padding()
    kpm[1] = True  # sequence 1 is all padding
    out, w = ours(x, x, x, key_padding_mask=kpm, need_weights=True)
    assert torch.isfinite(out).all() and torch.isfinite(w).all()
    assert (w[1] == 0).all()
    assert_close(out[1], ours.W_o.bias.expand(TK, D), dtype)
    ref_out, _ = theirs(x, x, x, key_padding_mask=kpm)  # the other sequences agree with torch
    assert_close(out[[0, 2]], ref_out[[0, 2]], dtype)
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_dropout_acts_in_training_only_and_weights_are_before_dropout():
    torch.manual_seed(0)
    mha = MultiHeadAttention(D, H, dropout=0.5)
    x, _, _ = inputs(torch.float32)
    out_a, w_a = mha(x, x, x, need_weights=True)
    out_b, w_b = mha(x, x, x, need_weights=True)
    assert not torch.allclose(out_a, out_b), "dropout must act in training mode"
    torch.testing.assert_close(w_a, w_b)  # the returned weights are those before dropout
    torch.testing.assert_close(w_a.sum(-1), torch.ones(B, TQ))
    mha.eval()
    torch.testing.assert_close(mha(x, x, x)[0], mha(x, x, x)[0])


# ---------------------------------------------------------------------------------- grouped- and multi-query

def gqa_by_hand(mha, q_in, k_in, v_in, **sdpa_kwargs):
    """The same layer computed with PyTorch's SDPA and enable_gqa=True, from our module's projections."""
    q = mha.W_q(q_in).unflatten(-1, (mha.n_heads, mha.d_head)).transpose(1, 2)       # (B, nh, Tq, hs)
    k = mha.W_k(k_in).unflatten(-1, (mha.n_kv_heads, mha.d_head)).transpose(1, 2)    # (B, n_kv, Tk, hs)
    v = mha.W_v(v_in).unflatten(-1, (mha.n_kv_heads, mha.d_head)).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **sdpa_kwargs)  # (B, nh, Tq, hs)
    return mha.W_o(out.transpose(1, 2).flatten(2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_grouped_query_attention_equals_torch_sdpa_enable_gqa(dtype, n_kv_heads):
    torch.manual_seed(0)
    mha = MultiHeadAttention(D, H, n_kv_heads=n_kv_heads, kdim=6, vdim=9).to(dtype)
    assert mha.W_k.weight.shape == (n_kv_heads * 5, 6) and mha.W_v.weight.shape == (n_kv_heads * 5, 9)
    q, k, v = inputs(dtype, kdim=6, vdim=9)
    assert_close(mha(q, k, v)[0], gqa_by_hand(mha, q, k, v), dtype)
    # With key padding: SDPA's bool mask is True = may attend, ours (torch's MHA) True = padding.
    kpm = padding()
    assert_close(mha(q, k, v, key_padding_mask=kpm)[0], gqa_by_hand(mha, q, k, v, attn_mask=~kpm[:, None, None, :]),
                 dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grouped_query_causal_self_attention_equals_torch_sdpa(dtype):
    torch.manual_seed(1)
    mha = MultiHeadAttention(D, H, n_kv_heads=2).to(dtype)
    x, _, _ = inputs(dtype, Tq=TK)
    assert_close(mha(x, x, x, is_causal=True)[0], gqa_by_hand(mha, x, x, x, is_causal=True), dtype)


def test_gqa_with_repeated_kv_weights_equals_standard_mha():
    """GQA is MHA whose key/value heads within a group are tied: copy the weights and the outputs agree."""
    torch.manual_seed(2)
    gqa = MultiHeadAttention(D, H, n_kv_heads=2).double()
    mha = MultiHeadAttention(D, H).double()
    with torch.no_grad():
        mha.W_q.load_state_dict(gqa.W_q.state_dict())
        mha.W_o.load_state_dict(gqa.W_o.state_dict())
        for full, grouped in ((mha.W_k, gqa.W_k), (mha.W_v, gqa.W_v)):
            # rows of head j of the grouped projection -> rows of query heads 2j and 2j+1
            full.weight.copy_(grouped.weight.unflatten(0, (2, 5)).repeat_interleave(2, dim=0).flatten(0, 1))
            full.bias.copy_(grouped.bias.unflatten(0, (2, 5)).repeat_interleave(2, dim=0).flatten())
    x, _, _ = inputs(Tq=TK)
    torch.testing.assert_close(gqa(x, x, x, need_weights=True, average_attn_weights=False)[1],
                               mha(x, x, x, need_weights=True, average_attn_weights=False)[1])
    torch.testing.assert_close(gqa(x, x, x)[0], mha(x, x, x)[0])


@pytest.mark.parametrize("n_kv_heads,d_model,n_heads", [(None, 512, 8), (2, 512, 8), (1, 64, 4), (8, 64, 8)])
@pytest.mark.parametrize("bias", [True, False])
def test_parameter_count(n_kv_heads, d_model, n_heads, bias):
    mha = MultiHeadAttention(d_model, n_heads, bias=bias, n_kv_heads=n_kv_heads)
    kv = (n_kv_heads or n_heads) * (d_model // n_heads)
    expected = 2 * d_model * d_model + 2 * d_model * kv + (2 * d_model + 2 * kv if bias else 0)
    assert sum(p.numel() for p in mha.parameters()) == expected
    if n_kv_heads is None:  # 4 d^2 + 4 d, equal to torch's, and independent of n_heads
        assert expected == 4 * d_model**2 + (4 * d_model if bias else 0)
        torch_count = sum(p.numel() for p in nn.MultiheadAttention(d_model, n_heads, bias=bias).parameters())
        assert expected == torch_count


# ------------------------------------------------------------------------------------------------------ KV cache

@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_incremental_decoding_with_a_kv_cache_equals_the_full_causal_pass(n_kv_heads):
    torch.manual_seed(3)
    mha = MultiHeadAttention(D, H, n_kv_heads=n_kv_heads).double().eval()
    x, _, _ = inputs(Tq=TK)
    full, full_w = mha(x, x, x, is_causal=True, need_weights=True)
    cache = KVCache()
    # A prompt of 3 tokens at once (a causal block), then one token at a time, then the last 2 together.
    pieces = [x[:, :3], x[:, 3:4], x[:, 4:5], x[:, 5:]]
    outs = []
    for piece in pieces:
        out, w = mha(piece, piece, piece, is_causal=True, need_weights=True, kv_cache=cache)
        assert w.shape == (B, piece.shape[1], len(cache))
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(w, full_w[:, 5:], atol=1e-12, rtol=1e-12)
    assert len(cache) == TK and cache.key.shape == (B, n_kv_heads, TK, D // H)
    assert cache.nbytes == kv_cache_bytes(1, n_kv_heads, D // H, TK, batch_size=B, bytes_per_element=8)


def test_kv_cache_grows_by_doubling_and_holds_exactly_what_was_appended():
    cache = KVCache()
    torch.manual_seed(0)
    keys, values = torch.randn(2, 3, 9, 4), torch.randn(2, 3, 9, 4)
    pieces = [(0, 2), (2, 3), (3, 4), (4, 5), (5, 9)]
    capacities = []
    for start, stop in pieces:
        k, v = cache.update(keys[:, :, start:stop], values[:, :, start:stop])
        # What a concatenating cache would return, and views of the buffers (no copy of the whole cache).
        torch.testing.assert_close(k, keys[:, :, :stop], rtol=0, atol=0)
        torch.testing.assert_close(v, values[:, :, :stop], rtol=0, atol=0)
        assert len(cache) == stop and cache.capacity >= stop
        capacities.append(cache.capacity)
    assert capacities == [2, 4, 4, 8, 16]   # doubled when full, or grown to what one update needs
    assert cache.nbytes == 2 * 2 * 3 * 9 * 4 * 4   # the cached tokens only, not the reserve
    # The appended tensors are copied: changing them afterwards does not change the cache.
    new_key = torch.ones(2, 3, 1, 4)
    cache.update(new_key, new_key.clone())
    new_key.zero_()
    assert torch.equal(cache.key[:, :, -1], torch.ones(2, 3, 4))


def test_kv_cache_memory_scales_with_n_kv_heads_and_checks_shapes():
    assert kv_cache_bytes(32, 32, 128, 4096) == 2 * 1024**3  # a 7B-class model: 2 GiB per sequence in fp16
    assert kv_cache_bytes(32, 8, 128, 4096) == 512 * 1024**2
    assert kv_cache_bytes(32, 1, 128, 4096, bytes_per_element=4) == 128 * 1024**2
    cache = KVCache()
    assert len(cache) == 0 and cache.nbytes == 0
    cache.update(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))
    assert cache.nbytes == 2 * 2 * 3 * 4 * 4
    with pytest.raises(ValueError, match="key"):
        cache.update(torch.zeros(1, 3, 1, 4), torch.zeros(1, 3, 1, 4))  # another number of heads
    with pytest.raises(ValueError, match="value"):
        cache.update(torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 2, 4))
    cache.reset()
    assert len(cache) == 0
    with pytest.raises(ValueError, match="seq_len"):
        kv_cache_bytes(1, 1, 1, 0)


# --------------------------------------------------------------------------------------------------- properties

@settings(max_examples=25, deadline=None)
@given(T=st.integers(1, 8), n_heads=st.sampled_from([1, 2, 4]), seed=st.integers(0, 2**16))
def test_self_attention_is_permutation_equivariant(T, n_heads, seed):
    torch.manual_seed(seed)
    mha = MultiHeadAttention(8, n_heads).double()
    x = torch.randn(2, T, 8, dtype=torch.float64)
    perm = torch.randperm(T)
    torch.testing.assert_close(mha(x[:, perm], x[:, perm], x[:, perm])[0], mha(x, x, x)[0][:, perm],
                               atol=1e-12, rtol=1e-12)


@settings(max_examples=25, deadline=None)
@given(T=st.integers(2, 8), n_kv_heads=st.sampled_from([1, 2, 4]), seed=st.integers(0, 2**16))
def test_causal_output_does_not_depend_on_the_future(T, n_kv_heads, seed):
    torch.manual_seed(seed)
    mha = MultiHeadAttention(8, 4, n_kv_heads=n_kv_heads).double()
    x = torch.randn(1, T, 8, dtype=torch.float64)
    t = int(torch.randint(0, T - 1, (1,)))
    y = x.clone()
    y[:, t + 1:] = torch.randn(1, T - t - 1, 8, dtype=torch.float64)
    torch.testing.assert_close(mha(x, x, x, is_causal=True)[0][:, : t + 1],
                               mha(y, y, y, is_causal=True)[0][:, : t + 1], atol=1e-12, rtol=1e-12)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), p=st.floats(0.0, 0.9))
def test_weights_rows_sum_to_one_or_zero(seed, p):
    torch.manual_seed(seed)
    mha = MultiHeadAttention(8, 2).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    blocked = torch.rand(2 * 2, 5, 5) < p  # (B * n_heads, Tq, Tk), True = blocked
    _, w = mha(x, x, x, attn_mask=blocked, need_weights=True, average_attn_weights=False)
    sums = w.sum(-1).flatten()
    has_key = (~blocked).any(-1).flatten()
    torch.testing.assert_close(sums[has_key], torch.ones_like(sums[has_key]), atol=1e-12, rtol=0)
    assert (sums[~has_key] == 0).all()


def test_split_merge_and_repeat_kv():
    x = torch.arange(2 * 3 * 12.0).view(2, 3, 12)  # (B, T, C)
    heads = split_heads(x, 4)
    assert heads.shape == (2, 4, 3, 3)
    assert torch.equal(heads[1, 2, 0], x[1, 0, 6:9])  # head 2 holds features 6..8
    assert torch.equal(merge_heads(heads), x)
    kv = torch.randn(2, 2, 3, 5)
    rep = repeat_kv(kv, 3)
    assert rep.shape == (2, 6, 3, 5)
    assert all(torch.equal(rep[:, h], kv[:, h // 3]) for h in range(6))  # query head h uses kv head h // 3
    assert repeat_kv(kv, 1) is kv
    with pytest.raises(ValueError, match="n_heads"):
        split_heads(x, 5)
    with pytest.raises(ValueError, match="x"):
        merge_heads(x)
    with pytest.raises(ValueError, match="n_rep"):
        repeat_kv(kv, 0)


# ----------------------------------------------------------------------------------------------------- bad inputs

def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="d_model=10 must be divisible by n_heads=4"):
        MultiHeadAttention(10, 4)
    with pytest.raises(ValueError, match="n_heads=4 must be divisible by n_kv_heads=3"):
        MultiHeadAttention(12, 4, n_kv_heads=3)
    with pytest.raises(ValueError, match="n_kv_heads"):
        MultiHeadAttention(12, 4, n_kv_heads=0)
    with pytest.raises(ValueError, match="kdim"):
        MultiHeadAttention(12, 4, kdim=-1)
    with pytest.raises(ValueError, match="dropout"):
        MultiHeadAttention(12, 4, dropout=1.5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(key_padding_mask=torch.zeros(B, TK + 1, dtype=torch.bool)), "key_padding_mask"),
    (dict(key_padding_mask=torch.zeros(TK, dtype=torch.bool)), "key_padding_mask"),
    (dict(key_padding_mask=torch.zeros(B, TK, dtype=torch.long)), "key_padding_mask"),
    (dict(attn_mask=torch.zeros(TQ, TK + 1, dtype=torch.bool)), "attn_mask"),
    (dict(attn_mask=torch.zeros(TK, TQ, dtype=torch.bool)), "attn_mask"),
    (dict(attn_mask=torch.zeros(B, TQ, TK, dtype=torch.bool)), r"attn_mask.*\(B \* n_heads, Tq, Tk\)"),
    (dict(attn_mask=torch.zeros(B, 2, TQ, TK, dtype=torch.bool)), "attn_mask"),
    (dict(attn_mask=torch.zeros(1, B, H, TQ, TK, dtype=torch.bool)), "attn_mask"),
    (dict(attn_mask=torch.zeros(TQ, TK, dtype=torch.float32)), "attn_mask"),  # dtype differs from float64 inputs
])
def test_bad_masks_raise_naming_the_mask(kwargs, match):
    _, ours = torch_pair()
    q, k, v = inputs()
    with pytest.raises(ValueError, match=match):
        ours(q, k, v, **kwargs)


@pytest.mark.parametrize("bad,match", [
    (lambda q, k, v: (q[0], k, v), "query"),                     # unbatched
    (lambda q, k, v: (q[..., :-1], k, v), "query"),              # wrong d_model
    (lambda q, k, v: (q, k[..., :-1], v), "key"),                # wrong kdim
    (lambda q, k, v: (q, k, v[:, :-1]), "value"),                # Tk differs from key's
    (lambda q, k, v: (q, k[:1], v[:1]), "key"),                  # batch differs from query's
    (lambda q, k, v: (q.float(), k.float(), v.float()), "query"),  # dtype differs from the module's
    (lambda q, k, v: (q, k.float(), v), "key"),
    (lambda q, k, v: (q.numpy(), k, v), "query"),
])
def test_bad_inputs_raise_naming_the_argument(bad, match):
    _, ours = torch_pair()
    with pytest.raises((ValueError, TypeError), match=match):
        ours(*bad(*inputs()))


def test_causal_mask_offset_for_cached_keys():
    assert torch.equal(causal_mask(2, 4, offset=2), torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool))
    assert torch.equal(causal_mask(3, 5, offset=0), causal_mask(3, 5))
    with pytest.raises(ValueError, match="offset"):
        causal_mask(2, 2, offset=-1)


# ---------------------------------------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_cuda_equals_cpu_and_torch(n_kv_heads):
    torch.manual_seed(0)
    mha = MultiHeadAttention(D, H, n_kv_heads=n_kv_heads)
    cuda = MultiHeadAttention(D, H, n_kv_heads=n_kv_heads).cuda()
    cuda.load_state_dict(mha.state_dict())
    q, k, v = inputs(torch.float32)
    kpm = padding()
    out, w = mha(q, k, v, key_padding_mask=kpm, need_weights=True)
    out_cuda, w_cuda = cuda(q.cuda(), k.cuda(), v.cuda(), key_padding_mask=kpm.cuda(), need_weights=True)
    torch.testing.assert_close(out_cuda.cpu(), out, atol=1e-4, rtol=1e-4)  # TF32 and other kernels on the GPU
    torch.testing.assert_close(w_cuda.cpu(), w, atol=1e-4, rtol=1e-4)
    if n_kv_heads is None:
        theirs = nn.MultiheadAttention(D, H, batch_first=True).cuda()
        ours = MultiHeadAttention.from_torch(theirs)
        assert ours.W_q.weight.is_cuda
        x = q.cuda()
        torch.testing.assert_close(ours(x, x, x, is_causal=True)[0],
                                   theirs(x, x, x, attn_mask=~causal_mask(TQ, device="cuda"), need_weights=False)[0],
                                   atol=1e-4, rtol=1e-4)
