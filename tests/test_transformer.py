"""tfcourse.models.transformer against torch.nn.Transformer (Post-LN and Pre-LN, padding and causal masks), and
the translation model's properties: causality, padding invariance, weight tying, decoding, bad inputs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tfcourse.attention import causal_mask, lengths_to_mask
from tfcourse.data.numbers import NumberTranslation, sample_numbers
from tfcourse.decoding import beam_search, greedy_decode
from tfcourse.models.transformer import Transformer, TranslationTransformer, padding_mask, subsequent_mask
from tfcourse.training import LabelSmoothingLoss, train

# torch warns that a Pre-LN encoder cannot use its nested-tensor fast path: irrelevant here
pytestmark = [pytest.mark.filterwarnings("ignore:enable_nested_tensor is True:UserWarning"),
              pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")]

D, H, FF = 16, 4, 24
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def torch_pair(norm_first=False, dtype=torch.float64, activation="relu", n_enc=2, n_dec=3, seed=0):
    """A random nn.Transformer (batch-first, random biases and norms too) and ours with its weights."""
    torch.manual_seed(seed)
    theirs = nn.Transformer(D, H, n_enc, n_dec, FF, dropout=0.0, activation=activation, batch_first=True,
                            norm_first=norm_first).to(dtype)
    with torch.no_grad():  # torch initialises biases to 0 and norms to 1: randomise them so that they are tested
        for name, p in theirs.named_parameters():
            if p.dim() == 1:
                p.normal_(0.0 if "bias" in name else 1.0, 0.5)
    return theirs, Transformer.from_torch(theirs)


def inputs(dtype, B=3, S=6, T=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, S, D, generator=g, dtype=dtype), torch.randn(B, T, D, generator=g, dtype=dtype)


SRC_LENGTHS = torch.tensor([6, 4, 1])
TGT_LENGTHS = torch.tensor([5, 2, 3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_equals_torch_transformer_with_padding_and_causal_masks(dtype, norm_first, mask_kind):
    theirs, ours = torch_pair(norm_first, dtype)
    src, tgt = inputs(dtype)
    src_pad = padding_mask(SRC_LENGTHS, 6)
    tgt_pad = padding_mask(TGT_LENGTHS, 5)
    if mask_kind == "bool":
        tgt_mask = subsequent_mask(5)
    else:  # float masks, added to the scores: -inf blocks
        tgt_mask = nn.Transformer.generate_square_subsequent_mask(5, dtype=dtype)
        src_pad, tgt_pad = (torch.zeros(m.shape, dtype=dtype).masked_fill(m, float("-inf")) for m in (src_pad, tgt_pad))
    kwargs = dict(src_key_padding_mask=src_pad, tgt_key_padding_mask=tgt_pad, memory_key_padding_mask=src_pad)
    expected = theirs(src, tgt, tgt_mask=tgt_mask, tgt_is_causal=True, **kwargs)
    got_mask = ours(src, tgt, tgt_mask=tgt_mask, **kwargs)
    got_flag = ours(src, tgt, tgt_is_causal=True, **kwargs)  # our flag builds the mask itself
    for got in (got_mask, got_flag):
        torch.testing.assert_close(got, expected, atol=TOL[dtype], rtol=TOL[dtype])
    memory = ours.encode(src, src_key_padding_mask=src_pad)
    torch.testing.assert_close(memory, theirs.encoder(src, src_key_padding_mask=src_pad), atol=TOL[dtype],
                               rtol=TOL[dtype])


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_equals_torch_with_every_mask(activation):
    """src_mask, memory_mask and both padding masks at once, float64."""
    theirs, ours = torch_pair(activation=activation)
    src, tgt = inputs(torch.float64)
    g = torch.Generator().manual_seed(5)
    src_mask = torch.rand(6, 6, generator=g) < 0.3
    src_mask.fill_diagonal_(False)  # every query keeps itself
    memory_mask = torch.rand(5, 6, generator=g) < 0.3
    memory_mask[:, 0] = False
    kwargs = dict(src_mask=src_mask, tgt_mask=subsequent_mask(5), memory_mask=memory_mask,
                  src_key_padding_mask=padding_mask(SRC_LENGTHS, 6),
                  memory_key_padding_mask=padding_mask(SRC_LENGTHS, 6),
                  tgt_key_padding_mask=padding_mask(TGT_LENGTHS, 5))
    torch.testing.assert_close(ours(src, tgt, **kwargs), theirs(src, tgt, **kwargs), atol=1e-12, rtol=1e-12)


def test_equals_torch_fast_path_in_evaluation_mode():
    """torch's inference fast path (nested tensors) zeroes the memory at padding; the decoder output agrees."""
    theirs, ours = torch_pair(dtype=torch.float32)
    theirs.eval(), ours.eval()
    src, tgt = inputs(torch.float32)
    src_pad = padding_mask(SRC_LENGTHS, 6)
    with torch.no_grad():
        memory_theirs = theirs.encoder(src, src_key_padding_mask=src_pad)
        memory_ours = ours.encode(src, src_key_padding_mask=src_pad)
        real = ~src_pad
        torch.testing.assert_close(memory_ours[real], memory_theirs[real], atol=1e-5, rtol=1e-5)
        expected = theirs(src, tgt, tgt_mask=subsequent_mask(5), src_key_padding_mask=src_pad,
                          memory_key_padding_mask=src_pad)
        got = ours(src, tgt, tgt_is_causal=True, src_key_padding_mask=src_pad, memory_key_padding_mask=src_pad)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_gradients_equal_torch():
    theirs, ours = torch_pair(norm_first=True)
    src, tgt = inputs(torch.float64)
    pad = padding_mask(SRC_LENGTHS, 6)
    kwargs = dict(src_key_padding_mask=pad, memory_key_padding_mask=pad)
    theirs(src, tgt, tgt_mask=subsequent_mask(5), **kwargs).square().sum().backward()
    ours(src, tgt, tgt_is_causal=True, **kwargs).square().sum().backward()
    grads_theirs = {n: p.grad for n, p in theirs.named_parameters()}
    # the same parameter under our names: encoder layer 0's first linear map, the final decoder norm
    torch.testing.assert_close(ours.encoder_layers[0].ff.linear1.weight.grad,
                               grads_theirs["encoder.layers.0.linear1.weight"], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(ours.decoder_norm.weight.grad, grads_theirs["decoder.norm.weight"],
                               atol=1e-10, rtol=1e-10)
    w_q, w_k, w_v = grads_theirs["decoder.layers.1.multihead_attn.in_proj_weight"].chunk(3)
    torch.testing.assert_close(ours.decoder_layers[1].cross_attn.W_k.weight.grad, w_k, atol=1e-10, rtol=1e-10)


def test_gradcheck_small():
    torch.manual_seed(0)
    model = Transformer(4, 2, 1, 1, 6, dropout=0.0).double()
    src = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    tgt = torch.randn(2, 2, 4, dtype=torch.float64, requires_grad=True)
    pad = padding_mask(torch.tensor([3, 2]), 3)
    assert torch.autograd.gradcheck(
        lambda s, t: model(s, t, tgt_is_causal=True, src_key_padding_mask=pad, memory_key_padding_mask=pad),
        (src, tgt), fast_mode=True)


def test_cross_attention_weights():
    _, ours = torch_pair()
    src, tgt = inputs(torch.float64)
    pad = padding_mask(SRC_LENGTHS, 6)
    memory = ours.encode(src, src_key_padding_mask=pad)
    out, weights = ours.decode(tgt, memory, tgt_is_causal=True, memory_key_padding_mask=pad, need_weights=True)
    assert weights.shape == (3, 3, H, 5, 6)  # (L, B, n_heads, T, S)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 3, H, 5, dtype=torch.float64))
    assert (weights.masked_select(pad[None, :, None, None, :]) == 0).all()
    torch.testing.assert_close(out, ours.decode(tgt, memory, tgt_is_causal=True, memory_key_padding_mask=pad))


def test_masks():
    assert torch.equal(padding_mask(torch.tensor([2, 3]), 4), torch.tensor([[0, 0, 1, 1], [0, 0, 0, 1]]).bool())
    assert torch.equal(subsequent_mask(3), torch.tensor([[0, 1, 1], [0, 0, 1], [0, 0, 0]]).bool())
    float_mask = nn.Transformer.generate_square_subsequent_mask(4)
    assert torch.equal(subsequent_mask(4), float_mask == float("-inf"))
    assert torch.equal(padding_mask(torch.tensor([1, 4]), 4), ~lengths_to_mask(torch.tensor([1, 4]), 4))


def test_from_torch_bad_inputs():
    with pytest.raises(TypeError, match="nn.Transformer"):
        Transformer.from_torch(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="batch_first"):
        Transformer.from_torch(nn.Transformer(D, H, 1, 1, FF))
    custom = nn.TransformerEncoder(nn.TransformerEncoderLayer(D, H, FF, batch_first=True), 1)  # no final norm
    with pytest.raises(TypeError, match="custom"):
        Transformer.from_torch(nn.Transformer(D, H, 1, 1, FF, batch_first=True, custom_encoder=custom))
    with pytest.raises(ValueError, match="num_encoder_layers"):
        Transformer(D, H, 0, 1)
    with pytest.raises(ValueError, match="divisible"):
        Transformer(10, 3)


# ------------------------------------------------------------------------------------------- translation model

V_SRC, V_TGT = 11, 13


def make_model(seed=0, **kwargs):
    torch.manual_seed(seed)
    args = dict(d_model=D, n_heads=H, num_encoder_layers=2, num_decoder_layers=2, d_ff=FF, dropout=0.0)
    return TranslationTransformer(V_SRC, V_TGT, **{**args, **kwargs}).double().eval()


def make_batch(lengths=(5, 2, 4), T=4, seed=1, pad_to=None):
    g = torch.Generator().manual_seed(seed)
    S = pad_to or max(lengths)
    src = torch.zeros(len(lengths), S, dtype=torch.long)
    for b, n in enumerate(lengths):
        src[b, :n] = torch.randint(3, V_SRC, (n,), generator=g)
    tgt_in = torch.randint(3, V_TGT, (len(lengths), T), generator=g)
    tgt_in[:, 0] = 1
    return src, torch.tensor(lengths), tgt_in


@settings(max_examples=10, deadline=None)
@given(t=st.integers(0, 5), seed=st.integers(0, 2**16), norm_first=st.booleans())
def test_decoder_is_causal(t, seed, norm_first):
    """Changing the target tokens after position t changes no logit at positions <= t."""
    model = make_model(norm_first=norm_first)
    src, lengths, tgt_in = make_batch(T=6, seed=seed)
    logits = model(src, lengths, tgt_in)
    changed = tgt_in.clone()
    g = torch.Generator().manual_seed(seed + 1)
    changed[:, t + 1:] = torch.randint(3, V_TGT, changed[:, t + 1:].shape, generator=g)
    logits2 = model(src, lengths, changed)
    torch.testing.assert_close(logits2[:, : t + 1], logits[:, : t + 1], atol=1e-12, rtol=1e-12)
    if t + 1 < 6:
        assert not torch.allclose(logits2[:, t + 1:], logits[:, t + 1:])


def test_source_padding_and_batch_mates_change_nothing():
    model = make_model()
    src, lengths, tgt_in = make_batch()
    logits = model(src, lengths, tgt_in)
    padded = model(*make_batch(pad_to=9)[:2], tgt_in)  # the same sequences with more padding
    torch.testing.assert_close(padded, logits, atol=1e-12, rtol=1e-12)
    for b in range(3):  # each sequence alone, without padding
        n = int(lengths[b])
        alone = model(src[b:b + 1, :n], lengths[b:b + 1], tgt_in[b:b + 1])
        torch.testing.assert_close(alone, logits[b:b + 1], atol=1e-12, rtol=1e-12)


def test_target_padding_mask_changes_no_real_position():
    model = make_model()
    src, lengths, tgt_in = make_batch(T=5)
    tgt_lengths = torch.tensor([5, 2, 3])
    with_mask = model(src, lengths, tgt_in, tgt_lengths)
    without = model(src, lengths, tgt_in)
    real = lengths_to_mask(tgt_lengths, 5)
    torch.testing.assert_close(with_mask[real], without[real], atol=1e-12, rtol=1e-12)


def test_embeddings_are_scaled_and_tied():
    model = make_model()
    assert model.generator.weight is model.tgt_embedding.weight
    assert make_model(tie_embeddings=False).generator.weight is not make_model().tgt_embedding.weight
    ids = torch.tensor([[3, 4, 0]])
    x = model.embed(ids, model.src_embedding)
    expected = model.src_embedding.weight[ids] * D ** 0.5 + model.positional.encoding(3)
    torch.testing.assert_close(x, expected)
    assert (model.src_embedding.weight[0] == 0).all() and (model.tgt_embedding.weight[0] == 0).all()
    big = TranslationTransformer(50, 60, d_model=256, n_heads=4, num_encoder_layers=1, num_decoder_layers=1)
    scaled_std = (big.src_embedding.weight[3:] * 16).std().item()  # sqrt(256) = 16: unit variance
    assert 0.9 < scaled_std < 1.1


def test_greedy_generate_equals_a_loop_over_forward():
    model = make_model(seed=3)
    src, lengths, _ = make_batch()
    hyp = model.generate(src, lengths, max_len=6)
    prefix = torch.full((3, 1), 1)
    for _ in range(6):  # teacher-forced forward on the growing prefix, argmax of the last position
        next_token = model(src, lengths, prefix)[:, -1].argmax(-1)
        prefix = torch.cat([prefix, next_token[:, None]], dim=1)
    for b in range(3):
        n = int(hyp.lengths[b])
        assert hyp.tokens[b, :n].tolist() == prefix[b, 1:n + 1].tolist()


def test_generate_with_beams():
    model = make_model(seed=4)
    src, lengths, _ = make_batch()
    greedy = model.generate(src, lengths, max_len=6)
    beam1 = model.generate(src, lengths, max_len=6, beam_size=1, length_penalty=0.0)
    assert torch.equal(greedy.tokens, beam1.tokens)
    via_decoding = beam_search(model.log_probs_fn(src, lengths, 3), 3, 3, 6, 1, 2, 0, length_penalty=0.6)
    beam3 = model.generate(src, lengths, max_len=6, beam_size=3, length_penalty=0.6)
    assert torch.equal(via_decoding.tokens, beam3.tokens)
    direct = greedy_decode(model.log_probs_fn(src, lengths), 3, 6, 1, 2, 0)
    assert torch.equal(direct.tokens, greedy.tokens)
    assert model.training is False


def test_log_probs_fn_expands_the_memory_per_beam():
    model = make_model(seed=2)
    src, lengths, tgt_in = make_batch()
    one, three = model.log_probs_fn(src, lengths, 1), model.log_probs_fn(src, lengths, 3)
    prefix = tgt_in[:, :2]
    torch.testing.assert_close(three(prefix.repeat_interleave(3, 0)), one(prefix).float().repeat_interleave(3, 0))
    torch.testing.assert_close(one(prefix).exp().sum(-1), torch.ones(3))


def test_a_few_training_steps_reduce_the_loss():
    """The pieces fit together: TranslationTransformer, LabelSmoothingLoss and train (a copy task)."""
    torch.manual_seed(0)
    model = TranslationTransformer(V_SRC, V_SRC, d_model=32, n_heads=4, num_encoder_layers=1, num_decoder_layers=1,
                                   d_ff=64, dropout=0.0)
    loss_fn = LabelSmoothingLoss(0.1, ignore_index=0)
    g = torch.Generator().manual_seed(0)
    src = torch.randint(3, V_SRC, (32, 5), generator=g)
    tgt_in = torch.cat([torch.ones(32, 1, dtype=torch.long), src], dim=1)
    tgt_out = torch.cat([src, torch.full((32, 1), 2)], dim=1)
    lengths = torch.full((32,), 5)

    def step_loss(m, batch):
        return loss_fn(m(src, lengths, tgt_in), tgt_out)

    history = train(model, lambda i: None, step_loss, torch.optim.Adam(model.parameters(), 3e-3), 15,
                    progress=False)
    assert history.losses[-1] < 0.6 * history.losses[0]


def test_translate_on_a_number_task():
    task = NumberTranslation.from_numbers("de", sample_numbers(300, high=999, seed=0), seed=0)
    torch.manual_seed(0)
    model = TranslationTransformer(len(task.src_vocab), len(task.tgt_vocab), d_model=16, n_heads=2,
                                   num_encoder_layers=1, num_decoder_layers=1, d_ff=32)
    batch = task.batch(task.train[:8])
    assert model.forward_batch(batch).shape == (*batch.tgt_out.shape, len(task.tgt_vocab))
    out = model.translate(task, task.test[:7], beam_size=2, max_len=5, batch_size=3)
    assert len(out.predictions) == len(out.tokens) == 7 and out.attention is None
    assert all(len(tokens) <= 5 for tokens in out.tokens)


def test_translation_model_bad_inputs():
    model = make_model()
    src, lengths, tgt_in = make_batch()
    with pytest.raises(ValueError, match="ids must lie"):
        model(src + 20, lengths, tgt_in)
    with pytest.raises(ValueError, match="src_lengths"):
        model(src, torch.tensor([6, 2, 4]), tgt_in)
    with pytest.raises(ValueError, match="batch size"):
        model(src, lengths, tgt_in[:2])
    with pytest.raises(TypeError, match="int64"):
        model(src.float(), lengths, tgt_in)
    with pytest.raises(ValueError, match="distinct"):
        TranslationTransformer(V_SRC, V_TGT, d_model=D, n_heads=H, pad_id=1)
    with pytest.raises(ValueError, match="tgt_vocab_size"):
        TranslationTransformer(V_SRC, 0)


def test_causal_mask_is_the_negation_of_the_attention_convention():
    assert torch.equal(subsequent_mask(4), ~causal_mask(4))
