"""tfcourse.positional against its peers in Hugging Face transformers (random configs, no weights downloaded) and its
own properties: PE(p + k) is a fixed linear map of PE(p); RoPE scores depend on m - n only; biases are Toeplitz."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tfcourse.attention import scaled_dot_product_attention
from tfcourse.positional import (
    LearnedPositionalEmbedding,
    RelativePositionBias,
    RotaryEmbedding,
    SinusoidalPositionalEncoding,
    alibi_bias,
    alibi_slopes,
    relative_position_bucket,
    sinusoidal_encoding,
)

bloom = pytest.importorskip("transformers.models.bloom.modeling_bloom")
gptj = pytest.importorskip("transformers.models.gptj.modeling_gptj")
llama = pytest.importorskip("transformers.models.llama.modeling_llama")
roformer = pytest.importorskip("transformers.models.roformer.modeling_roformer")
t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
xlm = pytest.importorskip("transformers.models.xlm.modeling_xlm")
from transformers import LlamaConfig, T5Config  # noqa: E402


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------------------------------------------- sinusoidal

@pytest.mark.parametrize("n_pos,d_model", [(1, 2), (50, 16), (300, 64), (7, 6)])
def test_sinusoidal_equals_xlm(n_pos, d_model):
    theirs = torch.empty(n_pos, d_model)
    xlm.create_sinusoidal_embeddings(n_pos, d_model, theirs)  # Vaswani's interleaved layout, computed in NumPy
    torch.testing.assert_close(sinusoidal_encoding(n_pos, d_model), theirs, atol=1e-6, rtol=0)
    torch.testing.assert_close(SinusoidalPositionalEncoding(d_model, max_len=n_pos).pe, theirs, atol=1e-6, rtol=0)


def test_sinusoidal_module_adds_the_table_and_extends_past_max_len():
    x = randn(2, 30, 8, dtype=torch.float64)
    short, long = SinusoidalPositionalEncoding(8, max_len=10), SinusoidalPositionalEncoding(8, max_len=100)
    expected = x + sinusoidal_encoding(30, 8, dtype=torch.float64)
    torch.testing.assert_close(long(x), expected, atol=1e-6, rtol=0)  # the float32 buffer, cast
    torch.testing.assert_close(short(x), long(x))  # beyond max_len: computed, not refused
    positions = torch.tensor([[5, 6, 7], [40, 41, 42]])  # (B, T), e.g. after 5 and 40 cached tokens
    got = long(x[:, :3], positions)
    torch.testing.assert_close(got, x[:, :3] + sinusoidal_encoding(positions, 8, dtype=torch.float64), atol=1e-6,
                               rtol=0)
    torch.testing.assert_close(short(x[:, :3], positions), got)
    assert short.state_dict() == {}  # a fixed table, not a parameter


@settings(max_examples=30, deadline=None)
@given(half=st.integers(1, 16), k=st.integers(-50, 50), base=st.sampled_from([100.0, 10000.0]))
def test_sinusoidal_shift_is_a_fixed_linear_map(half, k, base):
    """PE(p + k) = M_k PE(p): fit M_k by least squares on some positions, check it on others, far away."""
    d = 2 * half
    # Spread over 0..40000, so that even the slowest wave (wavelength up to 2 pi base) turns enough to pin M_k down.
    fit_at, check_at = torch.arange(0, 40000, 173), torch.arange(100000, 100100)
    pe = lambda p: sinusoidal_encoding(p, d, base, dtype=torch.float64)  # noqa: E731
    M = torch.linalg.lstsq(pe(fit_at), pe(fit_at + k)).solution.T  # PE(p + k)^T = PE(p)^T M^T
    torch.testing.assert_close(pe(check_at) @ M.T, pe(check_at + k), atol=1e-8, rtol=0)
    # ... and M_k is a rotation of every (sin, cos) pair by k * omega_i: orthogonal, block diagonal.
    torch.testing.assert_close(M @ M.T, torch.eye(d, dtype=torch.float64), atol=1e-8, rtol=0)
    off_block = torch.ones(d, d, dtype=torch.bool)
    for i in range(half):
        off_block[2 * i: 2 * i + 2, 2 * i: 2 * i + 2] = False
    assert (M[off_block].abs() < 1e-8).all()


@settings(max_examples=30, deadline=None)
@given(half=st.integers(1, 16), p=st.integers(0, 500), q=st.integers(0, 500), shift=st.integers(0, 500))
def test_sinusoidal_dot_product_depends_on_the_offset_only(half, p, q, shift):
    pe = sinusoidal_encoding(torch.tensor([p, q, p + shift, q + shift]), 2 * half, dtype=torch.float64)
    torch.testing.assert_close(pe[0] @ pe[1], pe[2] @ pe[3], atol=1e-9, rtol=0)
    torch.testing.assert_close(pe[0] @ pe[0], torch.tensor(float(half), dtype=torch.float64))  # sin^2 + cos^2


# ------------------------------------------------------------------------------------------------------- learned

def test_learned_embedding_equals_an_embedding_lookup_and_learns():
    torch.manual_seed(0)
    module = LearnedPositionalEmbedding(max_len=12, d_model=6).double()
    peer = torch.nn.Embedding(12, 6).double()
    peer.weight.data.copy_(module.weight.data)
    x = randn(3, 9, 6, dtype=torch.float64)
    torch.testing.assert_close(module(x), x + peer(torch.arange(9)))
    positions = torch.randint(0, 12, (3, 9))
    torch.testing.assert_close(module(x, positions), x + peer(positions))
    module(x).sum().backward()
    assert (module.weight.grad[:9] == 3).all() and (module.weight.grad[9:] == 0).all()  # used rows learn
    assert 0.01 < module.weight.std().item() < 0.03  # init_std 0.02


def test_learned_embedding_refuses_positions_beyond_max_len():
    module = LearnedPositionalEmbedding(max_len=8, d_model=4)
    assert module(torch.zeros(1, 8, 4)).shape == (1, 8, 4)
    with pytest.raises(ValueError, match="max_len=8"):
        module(torch.zeros(1, 9, 4))
    with pytest.raises(ValueError, match="max_len=8"):
        module(torch.zeros(1, 2, 4), torch.tensor([3, 8]))
    with pytest.raises(ValueError, match="max_len=8"):
        module(torch.zeros(1, 2, 4), torch.tensor([-1, 0]))
    with pytest.raises(TypeError, match="positions"):
        module(torch.zeros(1, 2, 4), torch.tensor([0.0, 1.0]))


# ----------------------------------------------------------------------------------------------- T5 relative bias

@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 20), (4, 5), (16, 1000), (64, 64), (6, 7)])
def test_buckets_equal_t5(bidirectional, num_buckets, max_distance):
    relative = torch.arange(-3000, 3001)
    ours = relative_position_bucket(relative, bidirectional, num_buckets, max_distance)
    theirs = t5.T5Attention._relative_position_bucket(relative, bidirectional, num_buckets, max_distance)
    assert torch.equal(ours, theirs)
    assert ours.dtype == torch.int64 and ours.min() >= 0 and ours.max() < num_buckets


@pytest.mark.parametrize("is_decoder,past", [(False, 0), (True, 0), (True, 5)])
@pytest.mark.parametrize("t_query,t_key", [(7, 7), (3, 9), (1, 12)])
def test_bias_equals_t5_compute_bias(is_decoder, past, t_query, t_key):
    config = T5Config(d_model=16, d_kv=4, num_heads=4, relative_attention_num_buckets=10,
                      relative_attention_max_distance=12, is_decoder=is_decoder)
    torch.manual_seed(0)
    theirs = t5.T5Attention(config, has_relative_attention_bias=True, layer_idx=0)
    ours = RelativePositionBias(4, num_buckets=10, max_distance=12, bidirectional=not is_decoder)
    ours.load_state_dict({"relative_attention_bias.weight": theirs.relative_attention_bias.weight})
    expected = theirs.compute_bias(t_query, t_key, past_seen_tokens=past)  # (1, n_heads, Tq, Tk)
    got = ours(t_query, t_key, query_offset=past)
    assert got.shape == (1, 4, t_query, t_key)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


@settings(max_examples=25, deadline=None)
@given(t=st.integers(2, 40), bidirectional=st.booleans(), seed=st.integers(0, 1000))
def test_bias_depends_on_the_offset_only(t, bidirectional, seed):
    torch.manual_seed(seed)
    bias = RelativePositionBias(3, num_buckets=12, max_distance=20, bidirectional=bidirectional)(t)[0]
    torch.testing.assert_close(bias[:, 1:, 1:], bias[:, :-1, :-1], atol=0, rtol=0)  # Toeplitz: f(j - i)
    buckets = relative_position_bucket(-torch.arange(200), bidirectional, 12, 20)  # keys before the query
    assert (buckets.diff() >= 0).all()  # farther never means a nearer bucket


def test_bias_gradient_reaches_the_used_buckets_only():
    module = RelativePositionBias(2, num_buckets=8, max_distance=16, bidirectional=False)
    module(3).sum().backward()  # distances 0, 1, 2 (and keys after the query, bucket 0)
    grad = module.relative_attention_bias.weight.grad
    assert (grad[:3] != 0).all() and (grad[3:] == 0).all()


# ----------------------------------------------------------------------------------------------------------- RoPE

def rope_complex(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Independent float64 reference: interleaved pairs as complex numbers times exp(i m theta) (Su et al., Eq. 34)."""
    d = x.shape[-1]
    theta = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    z = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous())  # (..., T, d/2)
    rotated = z * torch.polar(torch.ones_like(theta), positions.double()[:, None] * theta)
    return torch.view_as_real(rotated).flatten(-2)


def half_to_interleaved(d: int) -> torch.Tensor:
    """Feature order that takes the half-split layout (i, i + d/2) to the interleaved one (2i, 2i + 1)."""
    return torch.stack([torch.arange(d // 2), torch.arange(d // 2) + d // 2], dim=-1).flatten()


@pytest.mark.parametrize("d_head,base", [(16, 10000.0), (8, 500000.0), (2, 10.0)])
def test_rope_equals_llama(d_head, base):
    config = LlamaConfig(hidden_size=4 * d_head, num_attention_heads=4, head_dim=d_head, rope_theta=base)
    theirs = llama.LlamaRotaryEmbedding(config)
    q, k = randn(2, 4, 9, d_head, seed=1), randn(2, 4, 9, d_head, seed=2)  # (B, n_heads, T, d_head)
    position_ids = torch.tensor([list(range(9)), [3, 4, 5, 6, 7, 8, 20, 21, 700]])  # (B, T), not just 0..T-1
    cos, sin = theirs(q, position_ids)
    expected_q, expected_k = llama.apply_rotary_pos_emb(q, k, cos, sin)
    got_q, got_k = RotaryEmbedding(d_head, base).apply_rotary(q, k, position_ids)
    # Llama computes the angles in float32 (position 700 loses digits); ours in float64.
    torch.testing.assert_close(got_q, expected_q, atol=2e-4, rtol=0)
    torch.testing.assert_close(got_k, expected_k, atol=2e-4, rtol=0)
    got_q0, _ = RotaryEmbedding(d_head, base).apply_rotary(q, k)  # default positions 0..T-1
    torch.testing.assert_close(got_q0[0], expected_q[0], atol=1e-5, rtol=0)


def test_rope_interleaved_equals_roformer_and_gptj():
    d_head, T = 12, 10
    rope = RotaryEmbedding(d_head, interleaved=True)
    q, k = randn(2, 3, T, d_head, seed=3), randn(2, 3, T, d_head, seed=4)  # (B, n_heads, T, d_head)
    table = roformer.RoFormerSinusoidalPositionalEmbedding(T, d_head).create_weight()  # (T, d_head): sin | cos
    expected_q, expected_k = roformer.RoFormerSelfAttention.apply_rotary_position_embeddings(table[None, None], q, k)
    got_q, got_k = rope.apply_rotary(q, k)
    torch.testing.assert_close(got_q, expected_q, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_k, expected_k, atol=1e-5, rtol=0)
    # GPT-J: (B, T, n_heads, d_head) and its own sin | cos table, indexed by position ids.
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]])
    sincos = gptj.create_sinusoidal_positions(16, d_head)[position_ids]  # (B, T, d_head)
    sin, cos = torch.split(sincos, d_head // 2, dim=-1)
    expected = gptj.apply_rotary_pos_emb(q.transpose(1, 2), sin, cos).transpose(1, 2)
    torch.testing.assert_close(rope.rotate(q, position_ids), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_equals_complex_rotation_in_float64(interleaved):
    d, T = 10, 7
    x = randn(3, T, d, dtype=torch.float64)
    positions = torch.tensor([0, 1, 5, 17, 100, 1000, 12345])
    perm = half_to_interleaved(d)
    got = RotaryEmbedding(d, interleaved=interleaved).rotate(x, positions)
    if interleaved:
        torch.testing.assert_close(got, rope_complex(x, positions), atol=1e-12, rtol=0)
    else:  # the half-split layout is the interleaved one, with the features permuted
        torch.testing.assert_close(got[..., perm], rope_complex(x[..., perm], positions), atol=1e-12, rtol=0)


@settings(max_examples=40, deadline=None)
@given(half=st.integers(1, 8), m=st.integers(0, 2000), n=st.integers(0, 2000), shift=st.integers(-2000, 2000),
       interleaved=st.booleans(), seed=st.integers(0, 2**16))
def test_rope_scores_depend_on_m_minus_n_only(half, m, n, shift, interleaved, seed):
    d = 2 * half
    rope = RotaryEmbedding(d, interleaved=interleaved)
    q, k = randn(1, d, dtype=torch.float64, seed=seed), randn(1, d, dtype=torch.float64, seed=seed + 1)
    score = lambda a, b: (rope.rotate(q, torch.tensor([a])) @ rope.rotate(k, torch.tensor([b])).T).item()  # noqa
    assert score(m, n) == pytest.approx(score(m + shift, n + shift), abs=1e-9)
    assert score(m, m) == pytest.approx((q @ k.T).item(), abs=1e-9)  # same position: no rotation left
    rotated = rope.rotate(q, torch.tensor([m]))
    assert rotated.norm().item() == pytest.approx(q.norm().item(), rel=1e-12)  # a rotation keeps the norm


def test_rope_gradcheck_and_shapes():
    rope = RotaryEmbedding(6)
    q = randn(2, 2, 4, 6, dtype=torch.float64).requires_grad_()
    k = randn(2, 2, 5, 6, dtype=torch.float64, seed=1).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: rope.apply_rotary(a, b, torch.arange(4), torch.arange(3, 8)),
                                    (q, k))
    q3 = randn(2, 4, 6)  # (B, T, d_head), positions (B, T)
    assert rope.rotate(q3, torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])).shape == (2, 4, 6)
    torch.testing.assert_close(rope.rotate(q3, torch.zeros(4, dtype=torch.long)), q3)  # position 0: identity


# ---------------------------------------------------------------------------------------------------------- ALiBi

def test_alibi_slopes_equal_bloom_and_the_paper():
    for n in range(1, 65):
        torch.testing.assert_close(alibi_slopes(n), bloom._get_alibi_slopes(n, "cpu"), rtol=1e-6, atol=0)
    # The paper's example (Sec. 3): 8 heads have slopes 1/2, 1/4, ..., 1/256.
    torch.testing.assert_close(alibi_slopes(8, dtype=torch.float64), 0.5 ** torch.arange(1.0, 9.0, dtype=torch.float64))


@pytest.mark.parametrize("n_heads", [1, 4, 6, 12])
def test_alibi_gives_blooms_attention_weights(n_heads):
    """Bloom adds m_h * j; ALiBi's -m_h * (i - j) differs by -m_h * i, constant along each row: same softmax."""
    T = 9
    theirs = bloom.build_alibi_tensor(torch.ones(2, T), n_heads, torch.float64).view(2, n_heads, 1, T)
    ours = alibi_bias(n_heads, T, causal=True, dtype=torch.float64)  # (1, n_heads, T, T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    difference = (ours - theirs)[..., causal]  # (2, n_heads, number of causal pairs)
    query_index = torch.arange(T, dtype=torch.float64)[:, None].expand(T, T)[causal]  # i of every causal (i, j)
    row_constant = -alibi_slopes(n_heads, dtype=torch.float64)[:, None] * query_index  # (n_heads, pairs): -m_h i
    torch.testing.assert_close(difference, row_constant.expand_as(difference), atol=1e-6, rtol=0)
    scores = randn(2, n_heads, T, T, dtype=torch.float64)
    ours_w = torch.softmax(scores + ours, dim=-1)
    theirs_w = torch.softmax((scores + theirs).masked_fill(~causal, float("-inf")), dim=-1)
    torch.testing.assert_close(ours_w, theirs_w, atol=1e-6, rtol=0)


@settings(max_examples=25, deadline=None)
@given(n_heads=st.integers(1, 20), T=st.integers(1, 30))
def test_alibi_bias_shape_symmetry_and_causality(n_heads, T):
    bias = alibi_bias(n_heads, T, dtype=torch.float64)
    assert bias.shape == (1, n_heads, T, T)
    torch.testing.assert_close(bias, bias.transpose(-2, -1))  # -m |i - j|
    assert (bias.diagonal(dim1=-2, dim2=-1) == 0).all() and (bias <= 0).all()
    torch.testing.assert_close(bias[..., 1:, 1:], bias[..., :-1, :-1])  # Toeplitz
    causal = alibi_bias(n_heads, T, causal=True, dtype=torch.float64)
    upper = torch.ones(T, T, dtype=torch.bool).triu(1)
    assert torch.isneginf(causal[..., upper]).all()
    torch.testing.assert_close(causal[..., ~upper], bias[..., ~upper])


# ---------------------------------------------------------------------- biases as attn_mask of scaled dot-product

def test_biases_plug_into_scaled_dot_product_attention():
    q, k, v = randn(2, 4, 6, 8), randn(2, 4, 6, 8, seed=1), randn(2, 4, 6, 5, seed=2)  # (B, n_heads, T, d)
    torch.manual_seed(0)
    for mask in (alibi_bias(4, 6), alibi_bias(4, 6, causal=True),
                 RelativePositionBias(4, 8, 16, bidirectional=False)(6).detach()):
        torch.testing.assert_close(scaled_dot_product_attention(q, k, v, attn_mask=mask),
                                   F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=1e-6, rtol=1e-6)


def test_positions_break_permutation_equivariance():
    """Without positions, permuting the tokens permutes the outputs; with any encoding here, it does not."""
    x, perm = randn(1, 6, 8, dtype=torch.float64), torch.tensor([3, 0, 5, 1, 4, 2])
    attend = lambda h, mask=None: scaled_dot_product_attention(h, h, h, attn_mask=mask)  # noqa: E731
    torch.testing.assert_close(attend(x)[:, perm], attend(x[:, perm]))
    rope = RotaryEmbedding(8)
    outputs = {
        "sinusoidal": lambda h: attend(SinusoidalPositionalEncoding(8)(h)),
        "alibi": lambda h: attend(h, alibi_bias(1, 6, dtype=torch.float64)[0]),
        "rope": lambda h: scaled_dot_product_attention(*rope.apply_rotary(h, h), h),
    }
    for name, f in outputs.items():
        assert not torch.allclose(f(x)[:, perm], f(x[:, perm]), atol=1e-6), name


# ----------------------------------------------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("make,match", [
    (lambda: SinusoidalPositionalEncoding(7), "d_model"),
    (lambda: SinusoidalPositionalEncoding(8, max_len=0), "max_len"),
    (lambda: sinusoidal_encoding(5, 8, base=-1.0), "base"),
    (lambda: sinusoidal_encoding(5, 8, dtype=torch.int64), "dtype"),
    (lambda: LearnedPositionalEmbedding(0, 8), "max_len"),
    (lambda: RotaryEmbedding(7), "d_head"),
    (lambda: RotaryEmbedding(0), "d_head"),
    (lambda: RotaryEmbedding(8, base=0), "base"),
    (lambda: RelativePositionBias(0), "n_heads"),
    (lambda: RelativePositionBias(2, num_buckets=2, bidirectional=True), "num_buckets"),
    (lambda: RelativePositionBias(2, num_buckets=16, max_distance=4), "max_distance"),
    (lambda: relative_position_bucket(torch.tensor([1.0])), "relative_position"),
    (lambda: alibi_slopes(0), "n_heads"),
    (lambda: alibi_bias(4, 0), "T"),
    (lambda: alibi_bias(4.0, 3), "n_heads"),
])
def test_bad_arguments_raise_naming_them(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_bad_inputs_raise_naming_them():
    rope = RotaryEmbedding(8)
    with pytest.raises(ValueError, match="d_head=8"):
        rope.rotate(torch.zeros(2, 5, 6))
    with pytest.raises(ValueError, match="positions"):
        rope.rotate(torch.zeros(2, 5, 8), torch.arange(4))
    with pytest.raises(ValueError, match="positions"):
        rope.rotate(torch.zeros(5, 8), torch.zeros(3, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="x"):
        rope.rotate(torch.zeros(2, 5, 8, dtype=torch.long))
    with pytest.raises(TypeError, match="positions"):
        rope.rotate(torch.zeros(2, 5, 8), torch.ones(5, dtype=torch.bool))
    sinusoidal = SinusoidalPositionalEncoding(8)
    with pytest.raises(ValueError, match="d_model=8"):
        sinusoidal(torch.zeros(2, 5, 6))
    with pytest.raises(TypeError, match="x"):
        sinusoidal(torch.zeros(2, 5, dtype=torch.long))  # token ids instead of embeddings
    with pytest.raises(ValueError, match="positions"):
        sinusoidal(torch.zeros(2, 5, 8), torch.arange(6))
    with pytest.raises(ValueError, match="t_key"):
        RelativePositionBias(2)(3, 0)


# ------------------------------------------------------------------------------------------------------------ GPU

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    cuda = torch.device("cuda")
    x = randn(2, 5, 8)
    for module in (SinusoidalPositionalEncoding(8, max_len=3), LearnedPositionalEmbedding(8, 8)):
        expected = module(x)
        torch.testing.assert_close(module.to(cuda)(x.to(cuda)).cpu(), expected)
    rope = RotaryEmbedding(8)
    expected = rope.rotate(x, torch.tensor([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]]))
    got = rope.to(cuda).rotate(x.to(cuda), torch.tensor([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]], device=cuda))
    torch.testing.assert_close(got.cpu(), expected)
    torch.manual_seed(0)
    bias = RelativePositionBias(2, 8, 16)
    torch.testing.assert_close(bias.to(cuda)(5, 7).cpu(), bias.cpu()(5, 7))
    torch.testing.assert_close(alibi_bias(4, 5, causal=True, device=cuda).cpu(), alibi_bias(4, 5, causal=True))
