"""tfcourse.hybrids: the Conformer block, shortest paths (against scipy and networkx), graph attention with a
spatial bias, and CLIP's contrastive loss."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.sparse.csgraph import shortest_path

from tfcourse._checks import DtypeError
from tfcourse.attention import MultiHeadAttention
from tfcourse.hybrids import (ConformerBlock, ConformerConvModule, GraphAttentionLayer, SpatialBias, clip_loss,
                              shortest_path_distances)

f64 = dict(dtype=torch.float64)


# ----------------------------------------------------------------------------------------------------------------
# Conformer
# ----------------------------------------------------------------------------------------------------------------

def test_conformer_block_shapes_and_structure():
    torch.manual_seed(0)
    block = ConformerBlock(16, 4, kernel_size=7).double().eval()
    x = torch.randn(3, 20, 16, **f64)
    y = block(x)
    assert y.shape == x.shape
    # the block ends in a LayerNorm: every output vector has mean 0 and variance 1 (before its affine map, the
    # identity at initialisation)
    torch.testing.assert_close(y.mean(-1), torch.zeros(3, 20, **f64), atol=1e-12, rtol=0)
    # written out, with the block's own modules (Gulati et al., Eq. 1)
    h = x + 0.5 * block.ff1(x)
    a = block.attn_norm(h)
    h = h + block.attn(a, a, a)[0]
    h = h + block.conv(h)
    torch.testing.assert_close(y, block.final_norm(h + 0.5 * block.ff2(h)))


def test_conformer_conv_module_sees_only_its_window():
    torch.manual_seed(1)
    conv = ConformerConvModule(6, kernel_size=5).double().eval()
    x = torch.randn(1, 30, 6, **f64, requires_grad=True)
    (grad,) = torch.autograd.grad(conv(x)[0, 15].sum(), x)
    touched = grad[0].abs().sum(-1) > 0
    assert touched.nonzero().flatten().tolist() == list(range(13, 18))   # 15 +- kernel_size // 2


def test_conformer_padding_does_not_leak_into_real_frames():
    torch.manual_seed(2)
    block = ConformerBlock(8, 2, kernel_size=5).double().eval()
    x = torch.randn(2, 12, 8, **f64)
    padding = torch.zeros(2, 12, dtype=torch.bool)
    padding[1, 8:] = True
    y = block(x, padding)
    x2 = x.clone()
    x2[1, 8:] = 100 * torch.randn(4, 8, **f64)                          # garbage in the padding
    y2 = block(x2, padding)
    torch.testing.assert_close(y2[1, :8], y[1, :8], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y2[0], y[0], rtol=1e-12, atol=1e-12)
    # the unpadded sequence alone gives the same real frames
    torch.testing.assert_close(block(x[1:, :8])[0], y[1, :8], rtol=1e-10, atol=1e-12)


def test_conformer_bad_inputs():
    with pytest.raises(ValueError, match="odd"):
        ConformerConvModule(4, kernel_size=4)
    block = ConformerBlock(8, 2, kernel_size=3)
    with pytest.raises(ValueError, match="d_model"):
        block(torch.randn(1, 5, 6))
    with pytest.raises(DtypeError):
        block(torch.randn(1, 5, 8), torch.zeros(1, 5))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        block(torch.randn(1, 5, 8), torch.zeros(1, 4, dtype=torch.bool))


# ----------------------------------------------------------------------------------------------------------------
# Shortest paths and graph attention
# ----------------------------------------------------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 14), p=st.floats(0.0, 0.6), seed=st.integers(0, 10_000), directed=st.booleans())
def test_shortest_paths_equal_scipy(n, p, seed, directed):
    rng = np.random.default_rng(seed)
    adjacency = rng.random((n, n)) < p
    if not directed:
        adjacency = adjacency | adjacency.T
    np.fill_diagonal(adjacency, False)
    ours = shortest_path_distances(torch.from_numpy(adjacency))
    theirs = shortest_path(adjacency.astype(float), directed=directed, unweighted=True)
    expected = np.where(np.isinf(theirs), -1, theirs).astype(np.int64)
    assert np.array_equal(ours.numpy(), expected)


def test_shortest_paths_of_the_karate_club_equal_networkx():
    graph = nx.karate_club_graph()
    adjacency = torch.tensor(nx.to_numpy_array(graph, weight=None), dtype=torch.long)   # 0/1
    ours = shortest_path_distances(adjacency)
    lengths = dict(nx.all_pairs_shortest_path_length(graph))
    expected = torch.tensor([[lengths[i][j] for j in graph] for i in graph])
    assert torch.equal(ours, expected) and ours.max() == 5


def test_shortest_paths_bad_inputs():
    with pytest.raises(ValueError, match="square"):
        shortest_path_distances(torch.zeros(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="0/1"):
        shortest_path_distances(torch.full((2, 2), 0.5))


def test_spatial_bias_buckets():
    bias = SpatialBias(n_heads=2, max_distance=3)
    with torch.no_grad():
        bias.table.weight.copy_(torch.arange(10.0).view(5, 2))           # bucket b, head h -> 2 b + h
    d = torch.tensor([[0, 1, 7], [-1, 3, 2], [4, 0, 0]])
    out = bias(d)
    assert out.shape == (1, 2, 3, 3)
    expected_bucket = torch.tensor([[0, 1, 3], [4, 3, 2], [3, 0, 0]])
    assert torch.equal(out[0, 1], 2 * expected_bucket.float() + 1)
    assert bias(d[None].expand(4, 3, 3)).shape == (4, 2, 3, 3)
    with pytest.raises(ValueError, match="-1"):
        bias(torch.tensor([[0, -2], [0, 0]]))
    with pytest.raises(DtypeError):
        bias(torch.zeros(2, 2))


def test_graph_layer_without_bias_equals_plain_attention_and_untrained_bias_changes_nothing():
    torch.manual_seed(3)
    layer = GraphAttentionLayer(8, 2).double()
    plain = GraphAttentionLayer(8, 2, spatial_bias=False).double()
    plain.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("bias.")})
    x = torch.randn(2, 6, 8, **f64)
    d = torch.randint(-1, 5, (6, 6))
    torch.testing.assert_close(layer(x, d), plain(x), rtol=0, atol=1e-14)   # the bias table starts at zero
    h = layer.norm1(x)
    mha = MultiHeadAttention(8, 2).double()
    mha.load_state_dict(layer.attn.state_dict())
    expected = x + mha(h, h, h)[0]
    torch.testing.assert_close(layer(x, d), expected + layer.ff(layer.norm2(expected)))


def test_graph_bias_can_restrict_attention_to_neighbours_and_is_permutation_equivariant():
    torch.manual_seed(4)
    graph = nx.cycle_graph(7)
    adjacency = torch.tensor(nx.to_numpy_array(graph, weight=None)).bool()
    d = shortest_path_distances(adjacency)
    layer = GraphAttentionLayer(8, 2, max_distance=4).double()
    with torch.no_grad():
        layer.bias.table.weight[2:] = -1e4                                 # distance >= 2: (almost) no attention
    x = torch.randn(1, 7, 8, **f64)
    y, weights = layer(x, d, need_weights=True)
    assert weights.shape == (1, 2, 7, 7)
    assert weights[0][:, d >= 2].max() < 1e-12                             # each node sees itself and neighbours
    perm = torch.randperm(7)
    y_perm = layer(x[:, perm], d[perm][:, perm])
    torch.testing.assert_close(y_perm, y[:, perm], rtol=1e-12, atol=1e-12)


def test_graph_layer_bad_inputs():
    layer = GraphAttentionLayer(8, 2)
    with pytest.raises(ValueError, match="needs the"):
        layer(torch.randn(1, 4, 8))
    with pytest.raises(ValueError, match=r"\(N, N\)"):
        layer(torch.randn(1, 4, 8), torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="batch size"):
        layer(torch.randn(2, 4, 8), torch.zeros(3, 4, 4, dtype=torch.long))


# ----------------------------------------------------------------------------------------------------------------
# CLIP
# ----------------------------------------------------------------------------------------------------------------

def clip_pseudocode(image_features, text_features, t):
    """Radford et al. (2021), Fig. 3, line by line (numpy-like pseudocode, in torch)."""
    I_e = image_features / np.linalg.norm(image_features, axis=1, keepdims=True)
    T_e = text_features / np.linalg.norm(text_features, axis=1, keepdims=True)
    logits = I_e @ T_e.T * t
    n = len(logits)
    log_softmax = lambda z, axis: z - np.log(np.exp(z - z.max(axis, keepdims=True)).sum(axis, keepdims=True)) \
        - z.max(axis, keepdims=True)                                                  # noqa: E731
    loss_i = -log_softmax(logits, 1)[np.arange(n), np.arange(n)].mean()
    loss_t = -log_softmax(logits, 0)[np.arange(n), np.arange(n)].mean()
    return (loss_i + loss_t) / 2


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 12), d=st.integers(1, 9), scale=st.floats(0.5, 100.0), seed=st.integers(0, 10_000))
def test_clip_loss_equals_the_papers_pseudocode(n, d, scale, seed):
    rng = np.random.default_rng(seed)
    image, text = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    ours = clip_loss(torch.tensor(image), torch.tensor(text), scale).item()
    assert ours == pytest.approx(clip_pseudocode(image, text, scale), rel=1e-10, abs=1e-12)


def test_clip_loss_properties():
    torch.manual_seed(5)
    n = 8
    x = torch.randn(n, 6, **f64)
    assert clip_loss(torch.ones(n, 6, **f64), torch.ones(n, 6, **f64)).item() == pytest.approx(np.log(n))
    assert clip_loss(x, 3 * x, 100.0).item() < 1e-3                              # aligned: near zero
    assert clip_loss(x, x[torch.roll(torch.arange(n), 1)], 100.0).item() > 10    # every pair wrong
    torch.testing.assert_close(clip_loss(x, 2 * x + 0.0), clip_loss(x, x))       # cosine similarity: scale-free
    swapped = clip_loss(x.flip(0), torch.randn(n, 6, **f64))
    assert np.isfinite(swapped.item())
    y = torch.randn(n, 6, **f64)
    torch.testing.assert_close(clip_loss(x, y), clip_loss(y, x))                 # symmetric in the two towers
    scale = torch.tensor(np.log(1 / 0.07), **f64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, s: clip_loss(a, b, s.exp()),
                                    (x.clone().requires_grad_(), y.clone().requires_grad_(), scale))


def test_clip_loss_bad_inputs():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="shape of image_features"):
        clip_loss(x, torch.randn(5, 3))
    with pytest.raises(ValueError, match="at least 2"):
        clip_loss(x[:1], x[:1])
    with pytest.raises(ValueError, match="positive"):
        clip_loss(x, x, logit_scale=0.0)
    with pytest.raises(DtypeError):
        clip_loss(x, x.double())
