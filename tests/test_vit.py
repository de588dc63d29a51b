"""tfcourse.models.vit: ViT against Hugging Face's ViTModel and ViTForImageClassification (random configuration and
weights, float64 and float32, every layer's hidden states, the attention weights, the pooler and the head); the
patch embedding as a linear map of flattened patches; Swin's window partition and its inverse; the shifted-window
mask against a brute-force labelling of the shifted windows; window attention against masked global attention;
parameter counts; bad inputs."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tfcourse.attention import MultiHeadAttention
from tfcourse.models.vit import (ConvStem, PatchEmbedding, ViT, ViTConfig, WindowAttention, patchify,
                                 shifted_window_mask, shifted_window_regions, unpatchify, window_partition,
                                 window_reverse)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download: every model here is built from a config
transformers = pytest.importorskip("transformers")

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
IMAGE, PATCH, CHANNELS, D, H, L, FF = 16, 4, 3, 24, 4, 3, 40
B = 3


def hf_config(attn_implementation="sdpa", **changes):
    config = dict(image_size=IMAGE, patch_size=PATCH, num_channels=CHANNELS, hidden_size=D, num_hidden_layers=L,
                  num_attention_heads=H, intermediate_size=FF, hidden_act="gelu", hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0, layer_norm_eps=1e-12)
    # Hugging Face's SDPA path does not return attention weights, and its eager path computes the softmax in
    # float32 even for float64 inputs: SDPA for the hidden states, eager for the weights
    return transformers.ViTConfig(**{**config, **changes}, attn_implementation=attn_implementation)


def randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere: HF initialises biases to 0, LayerNorms to 1 and the [CLS] token small, which
    would hide mistakes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            centre = 1.0 if "layernorm" in name and name.endswith("weight") else 0.0
            p.copy_(centre + 0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def hf_model(cls=None, dtype=torch.float64, seed=0, **config):
    cls = cls or transformers.ViTModel
    torch.manual_seed(seed)
    model = cls(hf_config(**config))
    return randomise(model.to(dtype), seed).eval()


def images(dtype=torch.float64, seed=1, n=B):
    return torch.randn(n, CHANNELS, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def assert_close(a, b, dtype):
    torch.testing.assert_close(a, b, atol=TOL[dtype], rtol=TOL[dtype])


# --------------------------------------------------------------------------------------------------------------
# ViT against Hugging Face
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_from_hf_equals_vit_model_at_every_layer(dtype):
    theirs = hf_model(dtype=dtype)
    ours = ViT.from_hf(theirs)
    assert not ours.training and ours.patch_embed.proj.weight.dtype == dtype
    x = images(dtype)
    with torch.no_grad():
        expected = theirs(x, output_hidden_states=True)
        got = ours(x, output_hidden_states=True)
    assert got.logits is None and len(got.hidden_states) == L + 1
    for mine, hf in zip(got.hidden_states, expected.hidden_states):
        assert_close(mine, hf, dtype)
    assert_close(got.last_hidden_state, expected.last_hidden_state, dtype)
    assert_close(got.pooler_output, expected.pooler_output, dtype)
    assert_close(got.pooled, expected.last_hidden_state[:, 0], dtype)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-6)])
def test_attention_weights_equal_hf_eager_attention(dtype, tol):
    # tol: Hugging Face's eager attention takes the softmax in float32 whatever the input's dtype
    theirs = hf_model(dtype=dtype, attn_implementation="eager")
    ours = ViT.from_hf(theirs)
    x = images(dtype, seed=2)
    with torch.no_grad():
        expected = theirs(x, output_attentions=True)
        got = ours(x, output_attentions=True)
    assert len(got.attentions) == len(expected.attentions) == L
    T = (IMAGE // PATCH) ** 2 + 1
    for mine, hf in zip(got.attentions, expected.attentions):
        assert mine.shape == hf.shape == (B, H, T, T)
        torch.testing.assert_close(mine, hf, atol=tol, rtol=tol)


def test_from_hf_without_pooler_and_with_other_sizes():
    torch.manual_seed(0)
    config = hf_config(image_size=12, patch_size=2, num_channels=1, hidden_size=16, num_attention_heads=2,
                       num_hidden_layers=2, intermediate_size=20, layer_norm_eps=1e-6)
    theirs = randomise(transformers.ViTModel(config, add_pooling_layer=False).double(), seed=5).eval()
    ours = ViT.from_hf(theirs)
    assert ours.pooler is None and ours.config.layer_norm_eps == 1e-6 and ours.config.seq_len == 37
    x = torch.randn(2, 1, 12, 12, dtype=torch.float64)
    with torch.no_grad():
        expected, got = theirs(x), ours(x)
    assert expected.pooler_output is None and got.pooler_output is None
    assert_close(got.last_hidden_state, expected.last_hidden_state, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_from_hf_image_classification_logits(dtype):
    theirs = hf_model(transformers.ViTForImageClassification, dtype, num_labels=7)
    ours = ViT.from_hf(theirs)
    assert ours.config.n_classes == 7 and ours.pooler is None
    x = images(dtype, seed=4)
    with torch.no_grad():
        assert_close(ours(x).logits, theirs(x).logits, dtype)


def test_from_hf_copies_config_every_parameter_and_training_mode():
    theirs = hf_model()
    ours = ViT.from_hf(theirs)
    assert ours.config == ViTConfig(image_size=IMAGE, patch_size=PATCH, in_channels=CHANNELS, d_model=D, n_layers=L,
                                    n_heads=H, d_ff=FF, n_classes=0, layer_norm_eps=1e-12)
    n_ours, n_theirs = (sum(p.numel() for p in m.parameters()) for m in (ours, theirs))
    assert n_ours == n_theirs == ours.config.num_parameters(pooler=True)
    with torch.no_grad():  # a copy, not a view
        ours.layers[0].self_attn.W_q.weight.zero_()
    assert theirs.layers[0].attention.q_proj.weight.abs().sum() > 0
    training = hf_model(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.2).train()
    copied = ViT.from_hf(training)
    assert copied.training and copied.config.dropout == 0.1 and copied.config.attention_dropout == 0.2
    assert copied.layers[0].self_attn.dropout == 0.2 and copied.layers[0].dropout1.p == 0.1


def test_from_hf_rejects_what_it_does_not_implement():
    with pytest.raises(TypeError, match="ViTModel"):
        ViT.from_hf(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="gelu"):
        ViT.from_hf(transformers.ViTModel(hf_config(hidden_act="gelu_new")))
    with pytest.raises(ValueError, match="qkv_bias"):
        ViT.from_hf(transformers.ViTModel(hf_config(qkv_bias=False)))
    with pytest.raises(ValueError, match="square"):
        ViT.from_hf(transformers.ViTModel(hf_config(image_size=(16, 8))))
    with pytest.raises(ValueError, match="pooler"):
        ViT.from_hf(transformers.ViTModel(hf_config(pooler_act="relu")))


# --------------------------------------------------------------------------------------------------------------
# The configuration and the model
# --------------------------------------------------------------------------------------------------------------

def test_default_config_is_vit_base_16():
    c = ViTConfig()
    assert (c.image_size, c.patch_size, c.d_model, c.n_layers, c.n_heads, c.d_ff) == (224, 16, 768, 12, 12, 3072)
    assert c.n_patches == 196 and c.seq_len == 197 and c.d_head == 64
    assert c.num_parameters() == 86_567_656  # ViT-B/16 with a 1000-class head: "86M" (Table 1)


@pytest.mark.parametrize("changes", [dict(), dict(pooling="mean"), dict(n_classes=0), dict(in_channels=1)])
def test_num_parameters_counts_the_model(changes):
    config = ViTConfig(image_size=16, patch_size=4, d_model=32, n_layers=2, n_heads=4, d_ff=48, n_classes=10,
                       **{k: v for k, v in changes.items() if k != "n_classes"}).replace(
        **({"n_classes": changes["n_classes"]} if "n_classes" in changes else {}))
    for pooler in ((False, True) if config.pooling == "cls" else (False,)):
        model = ViT(config, pooler=pooler)
        assert sum(p.numel() for p in model.parameters()) == config.num_parameters(pooler=pooler)


def test_mean_pooling_has_no_cls_token_and_averages_the_patches():
    torch.manual_seed(0)
    model = ViT(ViTConfig(image_size=8, patch_size=2, in_channels=1, d_model=16, n_layers=2, n_heads=2, d_ff=32,
                          n_classes=10, pooling="mean")).double().eval()
    assert model.cls_token is None and model.position_embeddings.weight.shape == (16, 16)
    out = model(torch.randn(4, 1, 8, 8, dtype=torch.float64))
    assert out.last_hidden_state.shape == (4, 16, 16)
    assert_close(out.pooled, out.last_hidden_state.mean(dim=1), torch.float64)


def test_without_positions_vit_ignores_the_order_of_the_patches():
    """Self-attention is permutation-equivariant, so without position embeddings a mean-pooled ViT sees a bag of
    patches: shuffling them does not change its output. The position embeddings are what tell it where they are."""
    torch.manual_seed(0)
    model = ViT(ViTConfig(image_size=8, patch_size=2, in_channels=1, d_model=16, n_layers=2, n_heads=2, d_ff=32,
                          n_classes=5, pooling="mean")).double().eval()
    with torch.no_grad():
        model.head.weight.normal_()
        x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
        perm = torch.randperm(16, generator=torch.Generator().manual_seed(1))
        shuffled = unpatchify(patchify(x, 2)[:, perm], 2, 8, 8)
        assert not torch.allclose(model(x).logits, model(shuffled).logits)  # the positions see the difference
        model.position_embeddings.weight.zero_()
        assert_close(model(x).logits, model(shuffled).logits, torch.float64)


def test_attention_weights_are_rows_of_probabilities_and_do_not_change_the_output():
    torch.manual_seed(0)
    model = ViT(ViTConfig(image_size=8, patch_size=2, in_channels=1, d_model=16, n_layers=2, n_heads=4, d_ff=32,
                          n_classes=3)).eval()
    x = torch.randn(2, 1, 8, 8)
    plain, full = model(x), model(x, output_attentions=True, output_hidden_states=True)
    assert plain.attentions is None and plain.hidden_states is None
    assert torch.equal(plain.last_hidden_state, full.last_hidden_state)
    for w in full.attentions:
        assert w.shape == (2, 4, 17, 17) and torch.allclose(w.sum(-1), torch.ones(2, 4, 17))


def test_head_starts_at_zero_and_the_model_trains():
    torch.manual_seed(0)
    model = ViT(ViTConfig(image_size=8, patch_size=2, in_channels=1, d_model=16, n_layers=1, n_heads=2, d_ff=32,
                          n_classes=3))
    x, y = torch.randn(12, 1, 8, 8), torch.randint(0, 3, (12,))
    assert torch.count_nonzero(model(x).logits) == 0
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        loss = F.cross_entropy(model(x).logits, y)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_position_similarity_is_a_cosine_map():
    torch.manual_seed(0)
    model = ViT(ViTConfig(image_size=8, patch_size=2, in_channels=1, d_model=16, n_layers=1, n_heads=2, d_ff=32))
    sim = model.position_similarity()
    assert sim.shape == (4, 4, 4, 4)
    pos = model.position_embeddings.weight[1:].detach()
    assert torch.allclose(sim[1, 2, 3, 0], F.cosine_similarity(pos[1 * 4 + 2], pos[3 * 4 + 0], dim=0), atol=1e-6)
    assert torch.allclose(sim.reshape(16, 16).diagonal(), torch.ones(16), atol=1e-6)


def test_conv_stem_gives_the_same_tokens_as_the_patch_embedding():
    torch.manual_seed(0)
    config = ViTConfig(image_size=16, patch_size=4, in_channels=3, d_model=32, n_layers=1, n_heads=2, d_ff=32,
                       n_classes=4, stem="conv")
    model = ViT(config).eval()
    assert isinstance(model.patch_embed, ConvStem) and model.patch_embed.channels == (8, 16)
    x = torch.randn(2, 3, 16, 16)
    assert model.patch_embed(x).shape == (2, 16, 32) and model(x).logits.shape == (2, 4)
    # its tokens see overlapping pixels: a 3x3 stride-2 kernel of token (i, j) covers rows 2i - 1 .. 2i + 1, so
    # the last pixel of patch (1, 1) is seen by tokens (1, 1), (1, 2), (2, 1) and (2, 2); a patch embedding's by one
    stem = ConvStem(1, 8, 2, channels=(4,)).double().eval()
    img = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    bumped = img.clone()
    bumped[0, 0, 3, 3] += 1.0
    changed = (stem(img) - stem(bumped)).abs().sum(-1)[0] > 0          # (16,) tokens of a 4 x 4 grid
    assert changed.nonzero().flatten().tolist() == [5, 6, 9, 10]
    plain = PatchEmbedding(1, 8, 2).double()
    assert ((plain(img) - plain(bumped)).abs().sum(-1)[0] > 0).sum() == 1
    # strides 1 then 2 (the hybrid of chapter 11): the same 16 tokens, each reading a 5x5 neighbourhood
    assert ConvStem(1, 8, 2, strides=(1, 2)).channels == (2, 4)   # the default widths
    torch.manual_seed(1)
    stem = ConvStem(1, 8, 2, channels=(8, 16), strides=(1, 2)).double().eval()  # wide enough that ReLUs keep paths
    assert stem(img).shape == (1, 16, 8)
    bumped = img.clone()
    bumped[0, 0, 4, 4] += 1.0                      # rows/columns 2i - 2 .. 2i + 2 of token (i, j) include 4 for i in 1..3
    changed = (stem(img) - stem(bumped)).abs().sum(-1)[0].reshape(4, 4) > 0
    assert changed[1:4, 1:4].all() and changed.sum() == 9
    with pytest.raises(ValueError, match="product"):
        ConvStem(1, 8, 4, strides=(2, 1))
    with pytest.raises(ValueError, match="one width per convolution"):
        ConvStem(1, 8, 2, channels=(4, 4))


# --------------------------------------------------------------------------------------------------------------
# Patches and the patch embedding
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("C, H_, W_, p", [(3, 16, 16, 4), (1, 8, 8, 2), (2, 12, 6, 3), (1, 5, 5, 5)])
def test_strided_convolution_equals_a_linear_map_of_flattened_patches(C, H_, W_, p):
    torch.manual_seed(0)
    embed = PatchEmbedding(C, 10, p).double()
    x = torch.randn(2, C, H_, W_, dtype=torch.float64)
    patches = patchify(x, p)                                      # (B, N, C p^2)
    assert patches.shape == (2, (H_ // p) * (W_ // p), C * p * p)
    linear = patches @ embed.linear_weight().T + embed.proj.bias  # E x_p + b
    torch.testing.assert_close(embed(x), linear, atol=1e-12, rtol=1e-12)
    # and an nn.Linear holding that matrix computes the same
    lin = torch.nn.Linear(C * p * p, 10).double()
    with torch.no_grad():
        lin.weight.copy_(embed.linear_weight())
        lin.bias.copy_(embed.proj.bias)
    torch.testing.assert_close(embed(x), lin(patches), atol=1e-12, rtol=1e-12)


def test_patches_are_numbered_row_by_row_and_unpatchify_inverts():
    x = torch.arange(2 * 1 * 4 * 6, dtype=torch.float32).reshape(2, 1, 4, 6)
    patches = patchify(x, 2)                                      # 2 x 3 grid of patches
    assert torch.equal(patches[0, 1], x[0, 0, 0:2, 2:4].flatten())  # patch (0, 1)
    assert torch.equal(patches[1, 3], x[1, 0, 2:4, 0:2].flatten())  # patch (1, 0) = 1 * 3 + 0
    assert torch.equal(unpatchify(patches, 2, 4, 6), x)
    rgb = torch.randn(3, 3, 8, 8)
    assert torch.equal(unpatchify(patchify(rgb, 4), 4, 8, 8), rgb)
    assert torch.equal(patchify(rgb, 4)[0, 0, :16], rgb[0, 0, :4, :4].flatten())  # channel first inside a patch


# --------------------------------------------------------------------------------------------------------------
# Swin's windows
# --------------------------------------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(B_=st.integers(1, 3), rows=st.integers(1, 4), cols=st.integers(1, 4), M=st.integers(1, 4),
       C=st.integers(1, 3))
def test_window_partition_and_reverse_are_inverses(B_, rows, cols, M, C):
    H_, W_ = rows * M, cols * M
    x = torch.randn(B_, H_, W_, C)
    windows = window_partition(x, M)
    assert windows.shape == (B_ * rows * cols, M, M, C)
    assert torch.equal(window_reverse(windows, M, H_, W_), x)
    other = torch.randn_like(windows)
    assert torch.equal(window_partition(window_reverse(other, M, H_, W_), M), other)
    b, i, j = B_ - 1, rows - 1, cols // 2   # window b * n_W + i * cols + j holds that block of the map
    assert torch.equal(windows[b * rows * cols + i * cols + j], x[b, i * M:(i + 1) * M, j * M:(j + 1) * M])


def shifted_window_id(H_, W_, M, s):
    """Brute force, from the definition: Swin's shifted windows are the regular M x M windows moved by s down and
    right, cut at the border (no wrap-around). Label each pixel of the ORIGINAL map with its shifted window,
    (floor((r - s) / M), floor((c - s) / M)), then read the labels in the order of the rolled map, whose position
    (i, j) holds original pixel ((i + s) mod H, (j + s) mod W)."""
    ids = torch.empty(H_, W_, dtype=torch.long)
    for i in range(H_):
        for j in range(W_):
            r, c = (i + s) % H_, (j + s) % W_
            ids[i, j] = ((r - s) // M) * (W_ + 1) + (c - s) // M   # Python floors: r < s gives row -1
    return ids


@pytest.mark.parametrize("H_, W_, M, s", [(8, 8, 4, 2), (4, 4, 2, 1), (6, 9, 3, 1), (6, 9, 3, 2), (8, 4, 4, 3),
                                          (4, 4, 4, 2), (12, 12, 4, 1), (8, 8, 4, 0), (2, 2, 1, 0)])
def test_shifted_window_mask_blocks_exactly_the_pairs_from_different_windows(H_, W_, M, s):
    mask = shifted_window_mask(H_, W_, M, s)
    n_windows = (H_ // M) * (W_ // M)
    assert mask.shape == (n_windows, M * M, M * M) and mask.dtype == torch.bool
    ids = window_partition(shifted_window_id(H_, W_, M, s)[None, :, :, None], M).reshape(n_windows, M * M)
    expected = ids[:, :, None] == ids[:, None, :]
    assert torch.equal(mask, expected)
    assert mask.diagonal(dim1=1, dim2=2).all(), "every query may attend to itself: no fully masked row"
    if s == 0:
        assert mask.all()
    elif H_ > M and W_ > M:
        assert mask[0].all() and not mask[-1].all()  # an inner window is whole, the corner one is four pieces
        assert len(torch.unique(ids[-1])) == 4


def test_shifted_window_regions_are_swins_nine_regions():
    regions = shifted_window_regions(8, 8, 4, 2)
    assert regions.unique().tolist() == list(range(9))
    assert regions[:4, :4].eq(0).all() and regions[4:6, 6:].eq(5).all() and regions[6:, 6:].eq(8).all()
    assert shifted_window_regions(8, 8, 4, 0).eq(0).all()


def global_window_mask(H_, W_, M, s):
    """(HW, HW) bool over the ORIGINAL map, True where two positions share a (shifted) window: brute force."""
    rows, cols = torch.arange(H_).repeat_interleave(W_), torch.arange(W_).repeat(H_)
    win = ((rows - s) // M) * (W_ + 1) + (cols - s) // M     # torch floors negative numbers too
    return win[:, None] == win[None, :]


@pytest.mark.parametrize("H_, W_, M, s", [(8, 8, 4, 0), (8, 8, 4, 2), (6, 9, 3, 1), (4, 4, 2, 1)])
def test_window_attention_equals_masked_global_attention(H_, W_, M, s):
    torch.manual_seed(0)
    layer = WindowAttention(8, 2, M, s).double().eval()
    x = torch.randn(2, H_, W_, 8, dtype=torch.float64)
    out, weights = layer(x, need_weights=True)
    assert out.shape == x.shape and weights.shape == (2 * (H_ // M) * (W_ // M), 2, M * M, M * M)
    torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights.sum(-1)))
    flat = x.reshape(2, H_ * W_, 8)
    blocked = ~global_window_mask(H_, W_, M, s)                 # MultiHeadAttention: True = may NOT attend
    expected, _ = layer.attn(flat, flat, flat, attn_mask=blocked)
    torch.testing.assert_close(out, expected.reshape(2, H_, W_, 8), atol=1e-12, rtol=1e-12)


def test_window_attention_gradients():
    torch.manual_seed(0)
    layer = WindowAttention(4, 2, 2, 1).double()
    x = torch.randn(1, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: layer(t), (x,))


# --------------------------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(image_size=10, patch_size=4), "divide image_size"),
    (dict(d_model=30, n_heads=4), "divisible by n_heads"),
    (dict(pooling="max"), "pooling"),
    (dict(stem="resnet"), "stem"),
    (dict(stem="conv", patch_size=14, image_size=224), "power of 2"),
    (dict(stem_channels=(8,)), "stem_channels"),
    (dict(stem="conv", stem_channels=(8,)), "one width per stride"),
    (dict(stem="conv", patch_size=4, image_size=8, stem_strides=(2, 1)), "product"),
    (dict(dropout=1.5), "dropout"),
    (dict(n_layers=0), "n_layers"),
    (dict(layer_norm_eps=0.0), "layer_norm_eps"),
    (dict(n_classes=-1), "n_classes"),
])
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ViT(ViTConfig(**kwargs))


def test_bad_inputs_raise():
    model = ViT(ViTConfig(image_size=8, patch_size=2, in_channels=1, d_model=16, n_layers=1, n_heads=2, d_ff=32,
                          n_classes=3))
    with pytest.raises(TypeError, match="images must be a torch.Tensor"):
        model([[0.0]])
    with pytest.raises(ValueError, match="4 dimensions"):
        model(torch.randn(1, 8, 8))
    with pytest.raises(ValueError, match="C = 1 channels"):
        model(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\(B, 1, 8, 8\)"):
        model(torch.randn(2, 1, 6, 6))
    with pytest.raises(TypeError, match="dtype"):
        model(torch.randn(2, 1, 8, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating"):
        model(torch.zeros(2, 1, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="multiples of the patch size 3"):
        patchify(torch.randn(1, 1, 8, 8), 3)
    with pytest.raises(ValueError, match="patch_size"):
        patchify(torch.randn(1, 1, 8, 8), 0)
    with pytest.raises(ValueError, match="do not fit"):
        unpatchify(torch.randn(1, 15, 4), 2, 8, 8)
    with pytest.raises(ValueError, match="must divide"):
        window_partition(torch.randn(1, 6, 8, 2), 4)
    with pytest.raises(ValueError, match="4 dimensions"):
        window_partition(torch.randn(6, 8, 2), 2)
    with pytest.raises(ValueError, match="windows must be"):
        window_reverse(torch.randn(3, 2, 2, 1), 2, 4, 4)
    with pytest.raises(ValueError, match="shift_size"):
        shifted_window_mask(8, 8, 4, 4)
    with pytest.raises(ValueError, match="shift_size"):
        WindowAttention(8, 2, 4, shift_size=5)
    with pytest.raises(ValueError, match="d_model=8"):
        WindowAttention(8, 2, 4)(torch.randn(1, 8, 8, 6))
    with pytest.raises(ValueError, match="must divide"):
        WindowAttention(8, 2, 4)(torch.randn(1, 6, 8, 8))
    with pytest.raises(ValueError, match="pooler=True needs"):
        ViT(ViTConfig(pooling="mean", image_size=8, patch_size=2, d_model=8, n_heads=2, n_layers=1), pooler=True)
    with pytest.raises(TypeError, match="ViTConfig"):
        ViT(dict(image_size=8))
