"""tfcourse.layers against its peers: EncoderLayer / DecoderLayer against torch.nn.TransformerEncoderLayer /
TransformerDecoderLayer (both norm placements, relu and gelu, padding, causal and float masks), FeedForward against
the FFN inside torch's layer, RMSNorm against torch.nn.RMSNorm, the GLU variants against their formula; gradients
and bad inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tfcourse.attention import causal_mask, lengths_to_mask
from tfcourse.layers import DecoderLayer, EncoderLayer, FeedForward, GLUFeedForward, RMSNorm

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
B, T, S, D, H, DFF = 3, 6, 5, 20, 4, 24


def assert_close(a, b, dtype):
    torch.testing.assert_close(a, b, atol=TOL[dtype], rtol=TOL[dtype])


def randomise(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights everywhere, biases and LayerNorm gains included (torch initialises those to 0 and 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            gain = 1.0 if "norm" in name and name.endswith("weight") else 0.0  # LayerNorm gains around 1
            p.copy_(gain + 0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def encoder_pair(dtype, norm_first=False, activation="relu", bias=True, seed=0):
    torch.manual_seed(seed)
    theirs = nn.TransformerEncoderLayer(D, H, DFF, dropout=0.0, activation=activation, norm_first=norm_first,
                                        batch_first=True, bias=bias).to(dtype)
    randomise(theirs, seed)
    return theirs.eval(), EncoderLayer.from_torch(theirs).eval()


def decoder_pair(dtype, norm_first=False, activation="relu", bias=True, seed=0):
    torch.manual_seed(seed)
    theirs = nn.TransformerDecoderLayer(D, H, DFF, dropout=0.0, activation=activation, norm_first=norm_first,
                                        batch_first=True, bias=bias).to(dtype)
    randomise(theirs, seed)
    return theirs.eval(), DecoderLayer.from_torch(theirs).eval()


def randn(*shape, dtype=torch.float64, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def padding(t, lengths=(None, 4, 2)):
    """torch's key padding convention: True = padding. No sequence is fully padded (torch would give NaN)."""
    lengths = [t if n is None else n for n in lengths]
    return ~lengths_to_mask(torch.tensor(lengths), max_len=t)


def float_mask(tq, tk, dtype, seed=2):
    """A float mask with random additive biases and a few -inf entries (never a whole row)."""
    m = randn(tq, tk, dtype=dtype, seed=seed)
    m[0, 1:] = float("-inf")
    m[-1, 0] = float("-inf")
    return m


# --------------------------------------------------------------------------------------- the encoder layer

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("masks", ["none", "padding", "causal", "float", "float+padding"])
def test_encoder_layer_equals_torch(dtype, norm_first, activation, masks):
    theirs, ours = encoder_pair(dtype, norm_first, activation)
    x = randn(B, T, D, dtype=dtype)
    kw = {}
    if masks == "padding":
        kw["src_key_padding_mask"] = padding(T)
    if masks == "float+padding":  # a float padding mask too: torch deprecates mixing bool and float masks
        kw["src_key_padding_mask"] = torch.zeros(B, T, dtype=dtype).masked_fill(padding(T), float("-inf"))
    if masks == "causal":
        kw["src_mask"] = nn.Transformer.generate_square_subsequent_mask(T, dtype=dtype)
        kw["is_causal"] = True
    if masks.startswith("float"):
        kw["src_mask"] = float_mask(T, T, dtype)
    assert ours.self_attn.training is False
    got = ours(x, **kw)
    assert got.shape == (B, T, D)
    # with gradients on, torch takes its plain (non-fused) path
    assert_close(got, theirs(x, **kw), dtype)
    if not masks.startswith("float"):  # torch 2.13's fused CPU path returns NaN for any float src_mask
        with torch.no_grad():  # no_grad lets torch take its fused inference path
            assert_close(ours(x, **kw), theirs(x, **kw), dtype)


def test_encoder_causal_flag_needs_no_mask():
    theirs, ours = encoder_pair(torch.float64)
    x = randn(B, T, D)
    mask = ~causal_mask(T)  # torch's bool convention: True = may NOT attend
    assert_close(ours(x, is_causal=True), theirs(x, src_mask=mask, is_causal=True), torch.float64)
    assert_close(ours(x, src_mask=mask), theirs(x, src_mask=mask), torch.float64)


def test_encoder_causal_outputs_ignore_the_future():
    _, ours = encoder_pair(torch.float64, norm_first=True)
    x = randn(B, T, D)
    y = x.clone()
    y[:, 3:] = randn(B, T - 3, D, seed=7)
    assert_close(ours(x, is_causal=True)[:, :3], ours(y, is_causal=True)[:, :3], torch.float64)
    assert not torch.allclose(ours(x)[:, :3], ours(y)[:, :3])


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_without_bias_equals_torch(norm_first):
    theirs, ours = encoder_pair(torch.float64, norm_first, bias=False)
    assert ours.ff.linear1.bias is None and ours.norm1.bias is None
    x = randn(B, T, D)
    assert_close(ours(x, src_key_padding_mask=padding(T)), theirs(x, src_key_padding_mask=padding(T)),
                 torch.float64)


def test_encoder_training_mode_dropout_and_copy():
    theirs = nn.TransformerEncoderLayer(D, H, DFF, dropout=0.3, batch_first=True)
    ours = EncoderLayer.from_torch(theirs)
    assert ours.training and ours.dropout1.p == 0.3 and ours.ff.dropout.p == 0.3 and ours.self_attn.dropout == 0.3
    with torch.no_grad():  # the weights are copies, not shared
        theirs.linear1.weight.zero_()
    assert ours.ff.linear1.weight.abs().sum() > 0
    x = randn(B, T, D, dtype=torch.float32)
    assert not torch.equal(ours(x), ours(x))  # dropout is active in training mode
    ours.eval()
    assert torch.equal(ours(x), ours(x))


def test_encoder_fully_padded_sequence_is_finite():
    _, ours = encoder_pair(torch.float64, norm_first=True)
    x = randn(B, T, D)
    kpm = padding(T, lengths=(None, 0, 3))  # the second sequence is all padding
    out = ours(x, src_key_padding_mask=kpm, is_causal=True)
    assert torch.isfinite(out).all()


def test_encoder_layer_parameter_count():
    ours = EncoderLayer(D, H, DFF, bias=True)
    n_attn = 4 * D * D + 4 * D
    n_ff = 2 * D * DFF + DFF + D
    n_norm = 2 * 2 * D
    assert sum(p.numel() for p in ours.parameters()) == n_attn + n_ff + n_norm
    assert sum(p.numel() for p in ours.parameters()) == sum(
        p.numel() for p in nn.TransformerEncoderLayer(D, H, DFF, batch_first=True).parameters())


# --------------------------------------------------------------------------------------- the decoder layer

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("masks", ["none", "causal+padding", "float"])
def test_decoder_layer_equals_torch(dtype, norm_first, activation, masks):
    theirs, ours = decoder_pair(dtype, norm_first, activation)
    tgt, memory = randn(B, T, D, dtype=dtype), randn(B, S, D, dtype=dtype, seed=3)
    kw = {}
    if masks == "causal+padding":
        kw = dict(tgt_mask=~causal_mask(T), tgt_is_causal=True,
                  tgt_key_padding_mask=padding(T), memory_key_padding_mask=padding(S, (None, 1, 3)))
    if masks == "float":
        kw = dict(tgt_mask=float_mask(T, T, dtype), memory_mask=float_mask(T, S, dtype, seed=4))
    got = ours(tgt, memory, **kw)
    assert got.shape == (B, T, D)
    assert_close(got, theirs(tgt, memory, **kw), dtype)


@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_causal_flag_and_bool_masks(norm_first):
    theirs, ours = decoder_pair(torch.float64, norm_first)
    tgt, memory = randn(B, T, D), randn(B, S, D, seed=3)
    mem_mask = torch.zeros(T, S, dtype=torch.bool)
    mem_mask[:, 0] = True  # bool, torch convention: no query may attend to memory position 0
    expected = theirs(tgt, memory, tgt_mask=~causal_mask(T), memory_mask=mem_mask, tgt_is_causal=True)
    assert_close(ours(tgt, memory, memory_mask=mem_mask, tgt_is_causal=True), expected, torch.float64)
    assert_close(ours(tgt, memory, tgt_mask=~causal_mask(T), memory_mask=mem_mask), expected, torch.float64)


@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_cross_attention_weights(norm_first):
    theirs, ours = decoder_pair(torch.float64, norm_first)
    tgt, memory = randn(B, T, D), randn(B, S, D, seed=3)
    mkpm = padding(S, (None, 1, 3))
    out, weights = ours(tgt, memory, memory_key_padding_mask=mkpm, tgt_is_causal=True, need_weights=True)
    assert_close(out, ours(tgt, memory, memory_key_padding_mask=mkpm, tgt_is_causal=True), torch.float64)
    assert weights.shape == (B, H, T, S)
    assert_close(weights.sum(-1), torch.ones(B, H, T, dtype=torch.float64), torch.float64)
    assert (weights[mkpm[:, None, None, :].expand_as(weights)] == 0).all()
    # the same weights as torch's cross-attention module, fed with what reaches it inside the layer
    x = tgt
    sa = ours.self_attn(*(3 * (ours.norm1(x) if norm_first else x,)), is_causal=True)[0]
    x = x + sa if norm_first else ours.norm1(x + sa)
    q = ours.norm2(x) if norm_first else x
    _, ref = theirs.multihead_attn(q, memory, memory, key_padding_mask=mkpm, average_attn_weights=False)
    assert_close(weights, ref, torch.float64)


def test_decoder_fully_masked_rows_are_finite():
    _, ours = decoder_pair(torch.float64, norm_first=True)
    tgt, memory = randn(B, T, D), randn(B, S, D, seed=3)
    out, w = ours(tgt, memory, tgt_key_padding_mask=padding(T, (None, 0, 2)),
                  memory_key_padding_mask=padding(S, (None, 0, 2)), tgt_is_causal=True, need_weights=True)
    assert torch.isfinite(out).all() and torch.isfinite(w).all()
    assert (w[1] == 0).all()


def test_decoder_from_torch_copies_everything():
    theirs = nn.TransformerDecoderLayer(D, H, DFF, dropout=0.2, activation="gelu", norm_first=True,
                                        layer_norm_eps=1e-6, batch_first=True)
    ours = DecoderLayer.from_torch(theirs)
    assert ours.norm_first and ours.norm3.eps == 1e-6 and ours.ff.activation == "gelu"
    assert ours.cross_attn.dropout == 0.2 and ours.dropout3.p == 0.2 and ours.training
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())


# --------------------------------------------------------------------------------------- feed-forward networks

@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_feedforward_equals_torch_layer_ffn(activation, dtype):
    theirs, ours = encoder_pair(dtype, activation=activation)
    x = randn(B, T, D, dtype=dtype)
    expected = theirs.linear2(theirs.dropout(theirs.activation(theirs.linear1(x))))  # torch's _ff_block
    assert_close(ours.ff(x), expected, dtype)
    assert_close(ours.ff(x), theirs._ff_block(x), dtype)


def test_feedforward_is_position_wise():
    ff = randomise(FeedForward(D, DFF, activation="gelu")).double()
    x = randn(B, T, D)
    perm = torch.randperm(T, generator=torch.Generator().manual_seed(0))
    assert_close(ff(x[:, perm]), ff(x)[:, perm], torch.float64)
    assert_close(ff(x[:, 2]), ff(x)[:, 2], torch.float64)


def test_feedforward_dropout_sits_on_the_hidden_layer():
    ff = FeedForward(D, DFF, dropout=1.0).double()  # everything dropped: only linear2's bias remains
    x = randn(B, T, D)
    assert_close(ff(x), ff.linear2.bias.expand(B, T, D), torch.float64)


@pytest.mark.parametrize("variant, act", [("glu", torch.sigmoid), ("bilinear", lambda z: z), ("reglu", F.relu),
                                          ("geglu", F.gelu), ("swiglu", lambda z: z * torch.sigmoid(z))])
@pytest.mark.parametrize("bias", [False, True])
def test_glu_variants_formula(variant, act, bias):
    ff = randomise(GLUFeedForward(D, DFF, variant=variant, bias=bias)).double()
    x = randn(B, T, D)
    W, V, W2 = ff.w_gate.weight, ff.w1.weight, ff.w2.weight
    gate, lin = x @ W.T, x @ V.T
    if bias:
        gate, lin = gate + ff.w_gate.bias, lin + ff.w1.bias
    expected = (act(gate) * lin) @ W2.T + (ff.w2.bias if bias else 0)
    assert_close(ff(x), expected, torch.float64)
    if variant == "glu":  # torch's own GLU: first half * sigmoid(second half)
        assert_close(ff(x), ff.w2(F.glu(torch.cat([lin, gate], -1), dim=-1)), torch.float64)


@pytest.mark.parametrize("d_model, d_ff", [(512, 2048), (768, 3072), (64, 256), (20, 24), (16, 100)])
def test_glu_matched_parameter_count(d_model, d_ff):
    plain = sum(p.numel() for p in FeedForward(d_model, d_ff, bias=False).parameters())
    h = GLUFeedForward.matched_d_ff(d_model, d_ff)
    assert h == round(2 * d_ff / 3)
    glu = sum(p.numel() for p in GLUFeedForward(d_model, h).parameters())
    assert glu == 3 * d_model * h
    assert abs(glu - plain) <= 3 * d_model / 2  # within half a hidden unit's worth of weights
    if 2 * d_ff % 3 == 0:
        assert glu == plain
    assert GLUFeedForward.matched_d_ff(768, 3072) == 2048  # Shazeer (2020): 3072 -> 2048 for T5-base
    assert GLUFeedForward.matched_d_ff(4096, 4 * 4096, multiple_of=256) == 11008  # Llama-7B's hidden size


def test_rmsnorm_gradcheck():
    x = randn(2, 3, 7).requires_grad_()
    norm = RMSNorm(7).double()
    with torch.no_grad():
        norm.weight.copy_(randn(7, seed=5))
    # gradients with respect to the input and to the gain (a parameter: gradcheck checks it through the module)
    assert torch.autograd.gradcheck(norm, (x,))
    gain = norm.weight.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, g: RMSNorm(7, elementwise_affine=False).double()(x) * g, (x, gain))
    assert torch.autograd.gradcheck(RMSNorm(7, eps=1e-3, elementwise_affine=False).double(), (x,))


@pytest.mark.parametrize("variant", ["glu", "reglu", "geglu", "swiglu"])
def test_glu_gradcheck(variant):
    x = randn(2, 3, 7).requires_grad_()
    ff = randomise(GLUFeedForward(7, 5, variant=variant, bias=True)).double()
    assert torch.autograd.gradcheck(ff, (x,))
    # and through the weights: backward on the module equals the finite differences of the loss
    out = ff(x).pow(2).sum()
    out.backward()
    w = ff.w_gate.weight
    delta, (i, j) = 1e-6, (1, 2)
    with torch.no_grad():
        w[i, j] += delta
        up = ff(x).pow(2).sum()
        w[i, j] -= 2 * delta
        down = ff(x).pow(2).sum()
        w[i, j] += delta
    torch.testing.assert_close(w.grad[i, j], (up - down) / (2 * delta), atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------------------- RMSNorm

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eps", [None, 1e-6, 0.1])
@pytest.mark.parametrize("affine", [True, False])
def test_rmsnorm_equals_torch(dtype, eps, affine):
    theirs = nn.RMSNorm(D, eps=eps, elementwise_affine=affine).to(dtype)
    ours = RMSNorm(D, eps=eps, elementwise_affine=affine).to(dtype)
    if affine:
        with torch.no_grad():
            theirs.weight.copy_(randn(D, dtype=dtype, seed=9))
            ours.weight.copy_(theirs.weight)
    else:
        assert ours.weight is None and len(list(ours.parameters())) == 0
    x = randn(B, T, D, dtype=dtype) * 3
    assert_close(ours(x), theirs(x), dtype)
    tiny = randn(B, T, D, dtype=dtype) * 1e-4  # here eps matters
    assert_close(ours(tiny), theirs(tiny), dtype)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 16), st.floats(1e-3, 1e3), st.integers(0, 1000))
def test_rmsnorm_properties(d, c, seed):
    x = randn(4, d, seed=seed)
    norm = RMSNorm(d, eps=1e-200, elementwise_affine=False).double()
    y = norm(x)
    torch.testing.assert_close(y.pow(2).mean(-1), torch.ones(4, dtype=torch.float64), atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(norm(c * x), y, atol=1e-8, rtol=1e-8)  # invariant to rescaling the input


# --------------------------------------------------------------------------------------- bad inputs

def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="d_model"):
        EncoderLayer(D, 3)  # 20 % 3 != 0
    with pytest.raises(ValueError, match="d_model"):
        DecoderLayer(10, 4)
    with pytest.raises(ValueError, match="activation"):
        FeedForward(D, DFF, activation="tanh")
    with pytest.raises(ValueError, match="activation"):
        EncoderLayer(D, H, activation="swish")
    with pytest.raises(ValueError, match="variant"):
        GLUFeedForward(D, DFF, variant="swishglu")
    with pytest.raises(ValueError, match="d_ff"):
        FeedForward(D, 0)
    with pytest.raises(ValueError, match="dropout"):
        EncoderLayer(D, H, dropout=1.5)
    with pytest.raises(ValueError, match="eps"):
        RMSNorm(D, eps=-1.0)
    with pytest.raises(ValueError, match="d_ff"):
        GLUFeedForward.matched_d_ff(D, -3)
    enc, dec = EncoderLayer(D, H, DFF), DecoderLayer(D, H, DFF)
    with pytest.raises(ValueError, match="src.*d_model"):
        enc(torch.randn(B, T, D + 1))
    with pytest.raises(ValueError, match="src"):
        enc(torch.randn(T, D))
    with pytest.raises(ValueError, match="src"):
        enc(torch.randn(B, T, D, dtype=torch.float64))
    with pytest.raises(ValueError, match="memory.*d_model"):
        dec(torch.randn(B, T, D), torch.randn(B, S, D - 1))
    with pytest.raises(ValueError, match="memory.*batch"):
        dec(torch.randn(B, T, D), torch.randn(B + 1, S, D))
    with pytest.raises(ValueError, match="key_padding_mask"):
        enc(torch.randn(B, T, D), src_key_padding_mask=torch.zeros(B, T + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask"):
        dec(torch.randn(B, T, D), torch.randn(B, S, D), memory_mask=torch.zeros(T, T, dtype=torch.bool))
    for module in (FeedForward(D, DFF), GLUFeedForward(D, DFF), RMSNorm(D)):
        with pytest.raises(ValueError, match="x.*d_model"):
            module(torch.randn(B, T, D + 2))
    with pytest.raises(ValueError, match="batch_first"):
        EncoderLayer.from_torch(nn.TransformerEncoderLayer(D, H, DFF))
    with pytest.raises(ValueError, match="batch_first"):
        DecoderLayer.from_torch(nn.TransformerDecoderLayer(D, H, DFF))
    with pytest.raises(TypeError, match="module"):
        EncoderLayer.from_torch(nn.TransformerDecoderLayer(D, H, DFF, batch_first=True))
    with pytest.raises(ValueError, match="activation"):
        EncoderLayer.from_torch(nn.TransformerEncoderLayer(D, H, DFF, batch_first=True, activation=torch.tanh))
