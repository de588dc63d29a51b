"""tfcourse.efficient.flash: FlashAttention in PyTorch against torch's SDPA (outputs and gradients) and its own
online softmax."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tfcourse.attention import scaled_dot_product_attention
from tfcourse.efficient.flash import FlashAttentionFunction, flash_attention, flash_attention_forward, online_softmax

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def qkv(B=2, H=3, Tq=37, Tk=37, d=16, dv=16, dtype=torch.float32, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    tensors = (torch.randn(B, H, Tq, d, generator=g, dtype=dtype), torch.randn(B, H, Tk, d, generator=g, dtype=dtype),
               torch.randn(B, H, Tk, dv, generator=g, dtype=dtype))
    return tuple(t.requires_grad_(requires_grad) for t in tensors)


def grads(out, inputs, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, inputs, g)


def assert_close(a, b, dtype):
    torch.testing.assert_close(a, b, atol=TOL[dtype], rtol=TOL[dtype])


# ------------------------------------------------------------------------------------------------ online softmax

@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 80), block=st.integers(1, 33), seed=st.integers(0, 1000), spread=st.floats(0.1, 50.0))
def test_online_softmax_equals_softmax_and_logsumexp(n, block, seed, spread):
    x = torch.randn(3, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * spread
    weights, lse = online_softmax(x, block)
    assert_close(weights, torch.softmax(x, -1), torch.float64)
    assert_close(lse, torch.logsumexp(x, -1), torch.float64)


def test_online_softmax_of_masked_row_is_zero_not_nan():
    x = torch.tensor([[1.0, float("-inf"), 2.0], [float("-inf")] * 3])
    weights, lse = online_softmax(x, 2)
    assert torch.equal(weights[1], torch.zeros(3)) and lse[1] == float("-inf")
    assert_close(weights[0], torch.softmax(x[0], -1), torch.float32)


# ------------------------------------------------------------------------------------------------ equality with SDPA

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("shape", [(37, 37, 16, 16), (50, 23, 8, 12), (23, 50, 8, 8), (64, 64, 16, 16), (1, 1, 4, 4)])
@pytest.mark.parametrize("block_size", [16, (8, 32)])
def test_outputs_and_gradients_equal_sdpa(dtype, is_causal, shape, block_size):
    Tq, Tk, d, dv = shape  # 37, 50, 23 are no multiples of the blocks
    q, k, v = qkv(Tq=Tq, Tk=Tk, d=d, dv=dv, dtype=dtype)
    ours = flash_attention(q, k, v, is_causal=is_causal, block_size=block_size)
    theirs = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    assert ours.shape == theirs.shape and ours.dtype == dtype
    assert_close(ours, theirs, dtype)
    for a, b in zip(grads(ours, (q, k, v)), grads(theirs, (q, k, v))):
        assert_close(a, b, dtype)


@pytest.mark.parametrize("is_causal", [False, True])
def test_equals_the_package_attention_and_a_scale(is_causal):
    q, k, v = qkv(B=1, H=2, Tq=29, Tk=29, dtype=torch.float64)
    ours = flash_attention(q, k, v, is_causal=is_causal, block_size=7, scale=0.3)
    reference = scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=0.3)
    assert_close(ours, reference, torch.float64)
    for a, b in zip(grads(ours, (q, k, v)), grads(reference, (q, k, v))):
        assert_close(a, b, torch.float64)


@pytest.mark.parametrize("lead", [(), (5,), (2, 2, 3)])
def test_any_leading_dimensions(lead):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(*lead, 19, 8, generator=g, dtype=torch.float64) for _ in range(3))
    assert_close(flash_attention(q, k, v, block_size=5), F.scaled_dot_product_attention(q, k, v), torch.float64)


def test_gradcheck_float64():
    q, k, v = qkv(B=1, H=2, Tq=9, Tk=11, d=4, dv=3, dtype=torch.float64)
    for is_causal in (False, True):
        assert torch.autograd.gradcheck(lambda a, b, c: flash_attention(a, b, c, is_causal=is_causal, block_size=4),
                                        (q, k, v))


def test_key_padding_mask_equals_sdpa_and_fully_padded_rows_are_zero():
    q, k, v = qkv(B=3, H=2, Tq=21, Tk=26, dtype=torch.float64)
    lengths = torch.tensor([26, 9, 0])  # the last sequence is all padding
    padding = torch.arange(26)[None, :] >= lengths[:, None]  # (B, Tk), True = padding
    ours = flash_attention(q, k, v, key_padding_mask=padding, block_size=8)
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=~padding[:, None, None, :])
    assert_close(ours[:2], theirs[:2], torch.float64)
    assert torch.equal(ours[2], torch.zeros_like(ours[2])) and not ours.isnan().any()
    gq, gk, gv = grads(ours, (q, k, v))
    tq, tk, tv = grads(theirs, (q, k, v))
    assert_close(gq[:2], tq[:2], torch.float64)
    assert_close(gk[:2], tk[:2], torch.float64)
    assert_close(gv[:2], tv[:2], torch.float64)
    assert not any(g.isnan().any() for g in (gq, gk, gv))
    assert torch.equal(gq[2], torch.zeros_like(gq[2])) and torch.equal(gk[1, :, 9:], torch.zeros_like(gk[1, :, 9:]))


def test_key_padding_mask_with_causal():
    q, k, v = qkv(B=2, H=1, Tq=17, Tk=17, dtype=torch.float64)
    padding = torch.zeros(2, 17, dtype=torch.bool)
    padding[1, :3] = True  # left padding: the first three queries of sequence 1 see nothing
    ours = flash_attention(q, k, v, is_causal=True, key_padding_mask=padding, block_size=4)
    allowed = ~padding[:, None, None, :] & torch.ones(17, 17, dtype=torch.bool).tril()
    reference = scaled_dot_product_attention(q, k, v, attn_mask=allowed)  # zero output for empty rows
    assert_close(ours, reference, torch.float64)
    for a, b in zip(grads(ours, (q, k, v)), grads(reference, (q, k, v))):
        assert_close(a, b, torch.float64)


def test_half_precision_accumulates_in_float32():
    q, k, v = qkv(B=1, H=2, Tq=40, Tk=40, dtype=torch.float32, requires_grad=False)
    out, lse = flash_attention_forward(q.bfloat16(), k.bfloat16(), v.bfloat16(), block_size=16)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    reference = F.scaled_dot_product_attention(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float())
    assert (out.float() - reference).abs().max() < 2e-2


def test_saves_the_logsumexp_not_the_weights():
    q, k, v = qkv(B=1, H=2, Tq=64, Tk=64)
    out = flash_attention(q, k, v, block_size=16)
    saved = out.grad_fn.saved_tensors
    assert max(t.numel() for t in saved) == q.numel()  # nothing of size T x T
    lse = [t for t in saved if t.shape == (1, 2, 64)]
    assert lse, "the logsumexp (B, H, T) is saved"
    scores = (q @ k.transpose(-2, -1)) / 4
    torch.testing.assert_close(lse[0], torch.logsumexp(scores, -1), atol=1e-5, rtol=1e-5)
    assert out.grad_fn.name().startswith("FlashAttentionFunction")
    assert FlashAttentionFunction.apply(q, k, v, False, 16, None, None).shape == out.shape


def test_causal_output_does_not_depend_on_future_keys():
    q, k, v = qkv(B=1, H=1, Tq=30, Tk=30, requires_grad=False)
    out = flash_attention(q, k, v, is_causal=True, block_size=8)
    k2, v2 = k.clone(), v.clone()
    k2[..., 20:, :] += 5.0
    v2[..., 20:, :] -= 3.0
    out2 = flash_attention(q, k2, v2, is_causal=True, block_size=8)
    assert torch.equal(out[..., :20, :], out2[..., :20, :])


# ---------------------------------------------------------------------------------------------------- bad inputs

def test_bad_inputs_raise_clear_errors():
    q, k, v = qkv(requires_grad=False)
    with pytest.raises(ValueError, match="key: the feature size"):
        flash_attention(q, k[..., :8], v)
    with pytest.raises(ValueError, match="value: the length"):
        flash_attention(q, k, v[..., :5, :])
    with pytest.raises(ValueError, match="dtype"):
        flash_attention(q, k.double(), v)
    with pytest.raises(ValueError, match="batch/head"):
        flash_attention(q, k[:1], v[:1])
    with pytest.raises(TypeError, match="query must be a torch.Tensor"):
        flash_attention(q.numpy(), k, v)
    with pytest.raises(ValueError, match="block_size"):
        flash_attention(q, k, v, block_size=0)
    with pytest.raises(ValueError, match="block_size"):
        flash_attention(q, k, v, block_size=(4, 4, 4))
    with pytest.raises(ValueError, match="key_padding_mask"):
        flash_attention(q, k, v, key_padding_mask=torch.zeros(2, 36, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_padding_mask must be a bool"):
        flash_attention(q, k, v, key_padding_mask=torch.zeros(2, 37))
