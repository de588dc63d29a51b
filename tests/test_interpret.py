"""tfcourse.interpret (chapter 15): recording attention, entropy, rollout, flow, head ablation, induction scores,
attributions, probes, alignment errors; the gold alignment of the number task; the chapter's figures and widgets."""

from __future__ import annotations

import math
import random

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tfcourse._checks import DtypeError  # noqa: E402
from tfcourse.attention import MultiHeadAttention, split_heads  # noqa: E402
from tfcourse.data.numbers import gold_alignment, number_to_words, tokenize  # noqa: E402
from tfcourse.interpret import (ablate_heads, alignment_error, attention_entropy, attention_flow,  # noqa: E402
                                attention_kl, attention_modules, attention_rollout, gradient_x_input,
                                head_ablation, integrated_gradients, linear_probe, prefix_matching_score,
                                record_attention)
from tfcourse.models import BERT, GPT, BERTConfig, GPTConfig, TranslationTransformer  # noqa: E402
from tfcourse.viz import attention_explorer, plot_attention_heads, plot_head_scores  # noqa: E402


def random_attention(*shape, generator=None, dtype=torch.float64):
    return torch.softmax(torch.randn(*shape, generator=generator, dtype=dtype) * 2, dim=-1)


# --------------------------------------------------------------------------------------------------------------
# Recording attention
# --------------------------------------------------------------------------------------------------------------

def tiny_bert():
    torch.manual_seed(0)
    return BERT(BERTConfig(vocab_size=50, d_model=16, n_layers=3, n_heads=4, d_ff=32, max_len=20, dropout=0.0,
                           attention_dropout=0.0)).eval()


def test_record_attention_on_bert_matches_hugging_face_output_attentions():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=4,
                                     intermediate_size=32, max_position_embeddings=20, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0, attn_implementation="eager")
    torch.manual_seed(0)
    hf = transformers.BertModel(config).eval()
    ours = BERT.from_hf(hf).eval()
    ids = torch.randint(0, 50, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask, output_attentions=True).attentions
        with record_attention(ours) as record:
            ours(ids, key_padding_mask=mask == 0)
    assert record.names == [f"layers.{i}.self_attn" for i in range(3)]
    stacked = record.stack()
    assert stacked.shape == (3, 2, 4, 7, 7)
    for a, b in zip(stacked, theirs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_record_attention_leaves_outputs_and_requested_weights_unchanged_and_removes_hooks():
    model = tiny_bert()
    ids = torch.randint(0, 50, (2, 6))
    with torch.no_grad():
        before = model(ids).last_hidden_state
        with record_attention(model) as record:
            during = model(ids).last_hidden_state
        after = model(ids).last_hidden_state
    torch.testing.assert_close(during, before, rtol=0, atol=0)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert len(record) == 3
    assert all(not m._forward_hooks and not m._forward_pre_hooks for _, m in attention_modules(model))
    # a caller that asks for (averaged) weights still gets them
    mha = MultiHeadAttention(8, 2).eval()
    x = torch.randn(1, 3, 8)
    out, avg = mha(x, x, x, need_weights=True)
    with record_attention(mha) as record:
        out2, avg2 = mha(x, x, x, None, None, False, True)  # positional need_weights=True
        out3, none = mha(x, x, x)
    torch.testing.assert_close(out2, out)
    torch.testing.assert_close(avg2, avg)
    assert none is None and avg2.shape == (1, 3, 3)
    torch.testing.assert_close(record.weights[0].mean(dim=1), avg)


def test_record_attention_cross_attention_of_the_transformer_and_gradients():
    torch.manual_seed(0)
    model = TranslationTransformer(12, 11, d_model=16, n_heads=2, num_encoder_layers=1, num_decoder_layers=2,
                                   d_ff=32, dropout=0.0).eval()
    src, lengths = torch.randint(3, 12, (2, 5)), torch.tensor([5, 3])
    tgt = torch.randint(3, 11, (2, 4))
    cross = [layer.cross_attn for layer in model.transformer.decoder_layers]
    memory, padding = model.encode(src, lengths)
    _, expected = model.decode(tgt, memory, padding, need_weights=True)       # (L, B, H, T, S)
    with record_attention(model, modules=cross, detach=False) as record:
        model.decode(tgt, memory, padding)
    torch.testing.assert_close(record.stack(), expected)
    assert record.weights[0].requires_grad
    assert (record.stack()[:, 1, :, :, 3:] == 0).all()  # padded source keys get no weight
    with pytest.raises(ValueError, match="different shapes"):
        with record_attention(model) as everything:
            model(src, lengths, tgt)
        everything.stack()


def test_record_attention_bad_input():
    with pytest.raises(TypeError, match="model"):
        with record_attention("bert"):
            pass
    with pytest.raises(ValueError, match="no tfcourse.attention.MultiHeadAttention"):
        with record_attention(torch.nn.Linear(2, 2)):
            pass
    with pytest.raises(TypeError, match="modules"):
        with record_attention(tiny_bert(), modules=[torch.nn.Linear(2, 2)]):
            pass
    with record_attention(tiny_bert()) as record:
        pass
    with pytest.raises(ValueError, match="no attention was recorded"):
        record.stack()


# --------------------------------------------------------------------------------------------------------------
# Entropy
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("T", [1, 2, 7, 64])
def test_entropy_bounds_one_hot_zero_uniform_log_t(T):
    one_hot = torch.eye(T, dtype=torch.float64)
    uniform = torch.full((T, T), 1.0 / T, dtype=torch.float64)
    torch.testing.assert_close(attention_entropy(one_hot), torch.zeros(T, dtype=torch.float64))
    torch.testing.assert_close(attention_entropy(uniform), torch.full((T,), math.log(T), dtype=torch.float64))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12), st.integers(0, 2**31 - 1))
def test_entropy_lies_between_zero_and_log_t(T, seed):
    w = random_attention(3, T, T, generator=torch.Generator().manual_seed(seed))
    h = attention_entropy(w)
    assert h.shape == (3, T)
    assert (h >= -1e-12).all() and (h <= math.log(T) + 1e-9).all()


def test_entropy_of_masked_rows_and_padding():
    w = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    h = attention_entropy(w)
    torch.testing.assert_close(h, torch.tensor([math.log(2), 0.0]))
    assert torch.isfinite(h).all()


def test_entropy_bad_input():
    with pytest.raises(TypeError, match="weights"):
        attention_entropy([[1.0]])
    with pytest.raises(DtypeError, match="floating"):
        attention_entropy(torch.ones(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="sum to 1"):
        attention_entropy(torch.rand(3, 4) + 0.1)  # scores, not weights
    with pytest.raises(ValueError, match="non-negative"):
        attention_entropy(torch.tensor([[1.5, -0.5]]))
    with pytest.raises(ValueError, match="NaN"):
        attention_entropy(torch.tensor([[float("nan"), 1.0]]))


# --------------------------------------------------------------------------------------------------------------
# Rollout and flow
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("residual_weight", [0.0, 0.5, 1.0])
def test_rollout_of_identity_attention_is_the_identity(residual_weight):
    eye = torch.eye(5).expand(3, 2, 4, 5, 5)  # (L, B, H, T, T)
    rollout = attention_rollout(eye, residual_weight=residual_weight)
    assert rollout.shape == (3, 2, 5, 5)
    torch.testing.assert_close(rollout, torch.eye(5).expand(3, 2, 5, 5))


def test_rollout_equals_the_product_of_residual_mixed_layers_and_rows_sum_to_one():
    g = torch.Generator().manual_seed(0)
    layers = [random_attention(2, 3, 6, 6, generator=g) for _ in range(4)]  # a list of (B, H, T, T)
    rollout = attention_rollout(layers)
    mixed = [0.5 * a.mean(dim=1) + 0.5 * torch.eye(6, dtype=torch.float64) for a in layers]
    expected = mixed[0]
    torch.testing.assert_close(rollout[0], expected)
    for l in range(1, 4):
        expected = mixed[l] @ expected
        torch.testing.assert_close(rollout[l], expected)
    torch.testing.assert_close(rollout.sum(-1), torch.ones(4, 2, 6, dtype=torch.float64))
    # plain product without the residual
    plain = attention_rollout(torch.stack(layers).mean(dim=2), residual_weight=0.0)
    torch.testing.assert_close(plain[-1], layers[3].mean(1) @ layers[2].mean(1) @ layers[1].mean(1) @ layers[0].mean(1))


def test_rollout_bad_input():
    with pytest.raises(ValueError, match="square"):
        attention_rollout(torch.softmax(torch.randn(2, 1, 3, 4), -1))
    with pytest.raises(ValueError, match="residual_weight"):
        attention_rollout(torch.eye(3).expand(1, 1, 3, 3), residual_weight=1.5)
    with pytest.raises(ValueError, match="same"):
        attention_rollout([torch.eye(3).expand(1, 3, 3), torch.eye(4).expand(1, 4, 4)])
    with pytest.raises(ValueError, match="at least one layer"):
        attention_rollout([])
    with pytest.raises(ValueError, match=r"\(L, B, H, T, T\)"):
        attention_rollout(torch.eye(3))
    with pytest.raises(ValueError, match="sum to 1"):
        attention_rollout(torch.ones(1, 1, 3, 3))


HAND_LAYERS = torch.tensor([[[1.0, 0.0], [0.5, 0.5]],     # layer 1: token 0 reads itself, token 1 both
                            [[0.5, 0.5], [0.0, 1.0]]],    # layer 2: token 0 reads both, token 1 itself
                           dtype=torch.float64)[:, None]  # (L = 2, B = 1, T = 2, T = 2)


@pytest.mark.parametrize("backend", ["networkx", "scipy"])
def test_flow_on_a_small_graph_equals_a_hand_computation(backend):
    # Without the residual the edges are the weights. From output 0: 0.5 to each layer-1 node; layer-1 node 0
    # passes all to input 0, node 1 half to each input. To input 0: 0.5 (via node 0) + 0.5 (via node 1) = 1; to
    # input 1: only via node 1, min(0.5, 0.5) = 0.5. From output 1 (all to node 1): 0.5 to each input.
    flow = attention_flow(HAND_LAYERS, residual_weight=0.0, backend=backend)
    torch.testing.assert_close(flow, torch.tensor([[[1.0, 0.5], [0.5, 0.5]]], dtype=torch.float64), atol=1e-6, rtol=0)
    # Rollout multiplies instead: row 0 of A2 A1 = [0.75, 0.25].
    rollout = attention_rollout(HAND_LAYERS, residual_weight=0.0)[-1]
    torch.testing.assert_close(rollout, torch.tensor([[[0.75, 0.25], [0.5, 0.5]]], dtype=torch.float64))


def test_flow_backends_agree_and_flow_is_bounded_by_the_capacities():
    g = torch.Generator().manual_seed(1)
    layers = random_attention(3, 2, 2, 5, 5, generator=g)   # (L, B, H, T, T)
    nx_flow = attention_flow(layers, backend="networkx")
    sp_flow = attention_flow(layers, backend="scipy")
    assert nx_flow.shape == (2, 5, 5)
    torch.testing.assert_close(sp_flow, nx_flow, atol=1e-6, rtol=0)
    assert (nx_flow <= 1 + 1e-9).all() and (nx_flow >= 0).all()  # each output node sends at most its row sum 1
    some = attention_flow(layers, queries=[0, 3])
    torch.testing.assert_close(some, sp_flow[:, [0, 3]])


def test_flow_of_identity_attention_is_the_identity():
    flow = attention_flow(torch.eye(4).expand(2, 1, 4, 4).double())
    torch.testing.assert_close(flow, torch.eye(4, dtype=torch.float64)[None], atol=1e-6, rtol=0)


def test_flow_bad_input():
    with pytest.raises(ValueError, match="backend"):
        attention_flow(HAND_LAYERS, backend="magic")
    with pytest.raises(ValueError, match="queries"):
        attention_flow(HAND_LAYERS, queries=[2])
    with pytest.raises(ValueError, match="queries"):
        attention_flow(HAND_LAYERS, queries=[])


# --------------------------------------------------------------------------------------------------------------
# Head ablation
# --------------------------------------------------------------------------------------------------------------

def head_contributions(mha: MultiHeadAttention, x: torch.Tensor) -> torch.Tensor:
    """(H, B, T, d_model): head h's part of the output, head_h W^O_h, computed by hand (no bias)."""
    q, k, v = (split_heads(f(x), mha.n_heads) for f in (mha.W_q, mha.W_k, mha.W_v))   # (B, H, T, hs)
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(mha.d_head), dim=-1)
    heads = weights @ v                                                                # (B, H, T, hs)
    W = mha.W_o.weight.view(mha.d_model, mha.n_heads, mha.d_head)                       # (d_out, H, hs)
    return torch.einsum("bhtk,ohk->hbto", heads, W)


def test_ablating_a_head_removes_exactly_that_heads_contribution():
    torch.manual_seed(0)
    mha = MultiHeadAttention(12, 3).double().eval()
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    full, _ = mha(x, x, x)
    parts = head_contributions(mha, x)
    torch.testing.assert_close(parts.sum(0) + mha.W_o.bias, full)
    for h in range(3):
        gates = torch.ones(3, dtype=torch.float64)
        gates[h] = 0.0
        with ablate_heads(mha, gates):
            ablated, _ = mha(x, x, x)
        torch.testing.assert_close(full - ablated, parts[h])               # only head h's part is gone
    with ablate_heads(mha, torch.zeros(3, dtype=torch.float64)):
        none, _ = mha(x, x, x)
    torch.testing.assert_close(none, mha.W_o.bias.expand_as(none))          # every head off: the bias is left
    again, _ = mha(x, x, x)
    torch.testing.assert_close(again, full)                                 # the hooks are gone


def test_ablating_a_bert_head_leaves_earlier_layers_alone_and_gates_give_gradients():
    model = tiny_bert()
    ids = torch.randint(0, 50, (2, 6))
    modules = [layer.self_attn for layer in model.layers]
    with torch.no_grad():
        full = model(ids, output_hidden_states=True).hidden_states
        gates = torch.ones(3, 4)
        gates[1, 2] = 0.0
        with ablate_heads(modules, gates):
            ablated = model(ids, output_hidden_states=True).hidden_states
    for i in range(2):                                                      # embeddings and layer 1: unchanged
        torch.testing.assert_close(ablated[i], full[i], rtol=0, atol=0)
    assert (ablated[2] - full[2]).abs().max() > 1e-4                        # layer 2 changed
    gates = torch.ones(3, 4, requires_grad=True)
    with ablate_heads(modules, gates):
        model(ids).last_hidden_state.pow(2).sum().backward()
    assert gates.grad.shape == (3, 4) and (gates.grad != 0).all()           # Michel et al.'s importance


def test_head_ablation_measures_each_head():
    torch.manual_seed(0)
    mha = MultiHeadAttention(8, 2).eval()
    x = torch.randn(1, 4, 8)
    modules = [mha, mha]  # the same module twice: gates multiply

    def evaluate():
        with torch.no_grad():
            return mha(x, x, x)[0].abs().sum()

    result = head_ablation([mha], evaluate)
    assert result.ablated.shape == (1, 2)
    assert result.baseline == pytest.approx(float(evaluate()))
    for h in range(2):
        gates = torch.ones(2)
        gates[h] = 0
        with ablate_heads(mha, gates):
            assert result.ablated[0, h].item() == pytest.approx(float(evaluate()))
    torch.testing.assert_close(result.drop, result.baseline - result.ablated)
    assert head_ablation(modules, evaluate).ablated.shape == (2, 2)


def test_ablation_bad_input():
    mha = MultiHeadAttention(8, 2)
    with pytest.raises(ValueError, match="gates must have shape"):
        with ablate_heads([mha], torch.ones(3)):
            pass
    with pytest.raises(DtypeError, match="floating"):
        with ablate_heads(mha, torch.ones(2, dtype=torch.long)):
            pass
    with pytest.raises(TypeError, match="modules"):
        with ablate_heads([torch.nn.Linear(2, 2)], torch.ones(1, 2)):
            pass
    with pytest.raises(ValueError, match="same number of heads"):
        with ablate_heads([mha, MultiHeadAttention(8, 4)], torch.ones(2, 2)):
            pass
    with pytest.raises(TypeError, match="evaluate"):
        head_ablation([mha], 3.0)
    with pytest.raises(TypeError, match="number"):
        head_ablation([mha], lambda: "high")


# --------------------------------------------------------------------------------------------------------------
# Prefix matching (induction heads)
# --------------------------------------------------------------------------------------------------------------

def repeated_tokens(n=6, seed=0):
    first = torch.randperm(20, generator=torch.Generator().manual_seed(seed))[:n]  # distinct tokens
    return torch.cat([first, first])[None]                                        # (1, 2n)


def induction_pattern(tokens):
    """Causal weights that attend, from each query of the second copy, to the token after the earlier occurrence;
    elsewhere to the first token."""
    T = tokens.shape[1]
    n = T // 2
    w = torch.zeros(1, T, T, dtype=torch.float64)
    w[0, :, 0] = 1.0
    for i in range(n, T):
        w[0, i] = 0.0
        w[0, i, i - n + 1] = 1.0
    return w


def test_prefix_matching_score_of_a_hand_built_induction_pattern_is_one():
    tokens = repeated_tokens()
    w = induction_pattern(tokens)
    assert prefix_matching_score(w, tokens).item() == pytest.approx(1.0)
    previous = torch.zeros_like(w)                    # a previous-token head: i -> i - 1
    previous[0, 0, 0] = 1.0
    for i in range(1, w.shape[-1]):
        previous[0, i, i - 1] = 1.0
    assert prefix_matching_score(previous, tokens).item() == pytest.approx(0.0)
    heads = torch.stack([w[0], previous[0], 0.5 * (w[0] + previous[0])])[None]   # (1, H = 3, T, T)
    torch.testing.assert_close(prefix_matching_score(heads, tokens),
                               torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64))


def test_prefix_matching_score_counts_only_queries_with_a_match():
    tokens = torch.tensor([[5, 6, 7, 5, 9]])             # only query 3 (token 5) has a match: key 1 (after the 5)
    w = torch.full((1, 5, 5), 0.2)
    assert prefix_matching_score(w, tokens).item() == pytest.approx(0.2)
    with pytest.raises(ValueError, match="no query has a matching key"):
        prefix_matching_score(torch.full((1, 3, 3), 1 / 3), torch.tensor([[1, 2, 3]]))
    with pytest.raises(ValueError, match="match weights"):
        prefix_matching_score(w, torch.tensor([[1, 2, 3]]))
    with pytest.raises(DtypeError, match="integer"):
        prefix_matching_score(w, tokens.float())
    with pytest.raises(ValueError, match="square"):
        prefix_matching_score(torch.full((1, 5, 4), 0.25), tokens)


# --------------------------------------------------------------------------------------------------------------
# Attributions
# --------------------------------------------------------------------------------------------------------------

def test_gradient_x_input_of_a_linear_function_is_exact():
    w = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    x = torch.randn(4, 3, dtype=torch.float64)
    attr = gradient_x_input(lambda z: z @ w, x)
    torch.testing.assert_close(attr, x * w)
    assert not x.requires_grad


def test_integrated_gradients_completeness_and_linear_case():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    f = lambda z: net(z.flatten(1))[:, 0]  # noqa: E731
    x = torch.randn(3, 2, 3, dtype=torch.float64)
    baseline = torch.randn(3, 2, 3, dtype=torch.float64) * 0.1
    gaps = []
    for steps in (4, 64):
        ig = integrated_gradients(f, x, baseline, steps=steps)
        assert ig.shape == x.shape
        gaps.append((ig.flatten(1).sum(1) - (f(x) - f(baseline))).abs().max().item())
    assert gaps[1] < 1e-4 and gaps[1] < gaps[0]                       # completeness, better with more steps
    w = torch.randn(6, dtype=torch.float64)
    ig = integrated_gradients(lambda z: z.flatten(1) @ w, x, steps=1)  # linear: exact, = gradient x input
    torch.testing.assert_close(ig, gradient_x_input(lambda z: z.flatten(1) @ w, x))


def test_attribution_bad_input():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="one number per example"):
        gradient_x_input(lambda z: z.sum(), x)
    with pytest.raises(ValueError, match="steps"):
        integrated_gradients(lambda z: z.sum(1), x, steps=0)
    with pytest.raises(ValueError, match="baseline"):
        integrated_gradients(lambda z: z.sum(1), x, baseline=torch.zeros(3))
    with pytest.raises(DtypeError, match="floating"):
        gradient_x_input(lambda z: z.sum(1), torch.ones(2, 3, dtype=torch.long))


# --------------------------------------------------------------------------------------------------------------
# Probes
# --------------------------------------------------------------------------------------------------------------

def test_linear_probe_decodes_a_linear_property_and_not_noise():
    g = np.random.default_rng(0)
    X = g.normal(size=(400, 5))
    y = (X[:, 0] + 0.1 * g.normal(size=400) > 0).astype(int)
    result = linear_probe(torch.tensor(X[:300]), y[:300], X[300:], y[300:])
    assert result.test_accuracy > 0.9 and result.train_accuracy > 0.9
    assert result.majority_accuracy == pytest.approx(np.mean(y[300:] == np.bincount(y[:300]).argmax()))
    noise = linear_probe(X[:300], g.integers(0, 2, 300), X[300:], g.integers(0, 2, 100))
    assert noise.test_accuracy < 0.65


def test_linear_probe_bad_input():
    X = np.zeros((4, 2))
    with pytest.raises(ValueError, match="two classes"):
        linear_probe(X, [1, 1, 1, 1], X, [1, 1, 1, 1])
    with pytest.raises(ValueError, match="one label per row"):
        linear_probe(X, [0, 1], X, [0, 1, 0, 1])
    with pytest.raises(ValueError, match="same width"):
        linear_probe(X, [0, 1, 0, 1], np.zeros((4, 3)), [0, 1, 0, 1])
    with pytest.raises(ValueError, match="2-D"):
        linear_probe(np.zeros(4), [0, 1, 0, 1], X, [0, 1, 0, 1])
    with pytest.raises(ValueError, match="C must be"):
        linear_probe(X, [0, 1, 0, 1], X, [0, 1, 0, 1], C=0)


# --------------------------------------------------------------------------------------------------------------
# Alignments and attention losses
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, expected", [
    (54, [("vier", "four"), ("und", "-"), ("fünfzig", "fifty")]),
    (313, [("drei", "three"), ("hundert", "hundred"), ("dreizehn", "thirteen")]),
    (1100, [("ein", "one"), ("tausend", "thousand"), ("ein", "one"), ("hundert", "hundred")]),
])
def test_gold_alignment_examples(n, expected):
    en, de = tokenize(number_to_words(n, "en"), "en"), tokenize(number_to_words(n, "de"), "de")
    links = gold_alignment(en, de)
    assert [(d, en[j]) for d, j in zip(de, links)] == expected


def test_gold_alignment_crosses_and_links_the_right_copy():
    en = tokenize(number_to_words(333, "en"), "en")   # three hundred and thirty - three
    de = tokenize(number_to_words(333, "de"), "de")   # drei hundert drei und dreißig
    assert gold_alignment(en, de) == [0, 1, 5, 4, 3]
    en = tokenize(number_to_words(21021, "en"), "en")  # twenty - one thousand and twenty - one
    de = tokenize(number_to_words(21021, "de"), "de")  # ein und zwanzig tausend ein und zwanzig
    assert gold_alignment(en, de) == [2, 1, 0, 3, 7, 6, 5]


def test_gold_alignment_is_a_bijection_onto_the_english_content_tokens():
    rng = random.Random(0)
    for n in list(range(0, 1200)) + rng.sample(range(1200, 1_000_000), 800):
        en, de = tokenize(number_to_words(n, "en"), "en"), tokenize(number_to_words(n, "de"), "de")
        links = gold_alignment(en, de)
        assert sorted(links) == [j for j, t in enumerate(en) if t not in ("and", ",")], n
        assert all((en[j] == "-") == (t == "und") for t, j in zip(de, links)), n


def test_gold_alignment_bad_input():
    with pytest.raises(ValueError, match="only 'de'"):
        gold_alignment(["one"], ["un"], lang="fr")
    with pytest.raises(ValueError, match="cannot align"):
        gold_alignment(["one"], ["zwei"])
    with pytest.raises(ValueError, match="not a number word"):
        gold_alignment(["banana"], ["eins"])


def test_alignment_error_counts_argmax_misses_and_mass_off_gold():
    weights = torch.tensor([[[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [1 / 3, 1 / 3, 1 / 3]]])
    gold = torch.tensor([[[True, False, False], [False, True, False], [False, False, False]]])
    result = alignment_error(weights, gold)
    assert result.n_rows == 2                       # the third row has no gold link
    assert result.error == pytest.approx(0.5)       # row 0 hit, row 1 missed
    assert result.mass_off == pytest.approx(1 - (0.7 + 0.3) / 2)
    with pytest.raises(DtypeError, match="bool"):
        alignment_error(weights, gold.float())
    with pytest.raises(ValueError, match="shape"):
        alignment_error(weights, gold[..., :2])
    with pytest.raises(ValueError, match="no row"):
        alignment_error(weights, torch.zeros_like(gold))


def test_attention_kl_is_zero_for_equal_rows_and_the_cross_entropy_for_one_hot_targets():
    w = random_attention(2, 4, 5, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    assert attention_kl(w, w.detach()).item() == pytest.approx(0.0, abs=1e-12)
    target = torch.zeros(2, 4, 5, dtype=torch.float64)
    target[:, :3, 1] = 1.0                          # the last row has no target: left out
    loss = attention_kl(w, target)
    torch.testing.assert_close(loss, -torch.log(w[:, :3, 1]).mean())
    loss.backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()
    with pytest.raises(ValueError, match="shape"):
        attention_kl(w, target[..., :4] / 1)
    with pytest.raises(ValueError, match="no row"):
        attention_kl(w, torch.zeros_like(target))


# --------------------------------------------------------------------------------------------------------------
# A GPT: recording and ablating inside the real model classes
# --------------------------------------------------------------------------------------------------------------

def test_gpt_attention_is_causal_and_ablating_every_head_of_a_layer_changes_its_output():
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(block_size=8, vocab_size=11, n_layer=2, n_head=2, n_embd=8)).eval()
    idx = torch.randint(0, 11, (2, 8))
    with torch.no_grad(), record_attention(gpt) as record:
        logits, _ = gpt(idx)
    weights = record.stack()                                   # (L, B, H, T, T)
    assert (weights.triu(1) == 0).all()
    modules = [block.attn for block in gpt.h]
    with torch.no_grad(), ablate_heads(modules, torch.tensor([[1.0, 1.0], [0.0, 0.0]])):
        ablated, _ = gpt(idx)
    assert (ablated - logits).abs().max() > 1e-4


# --------------------------------------------------------------------------------------------------------------
# Figures and widgets (tfcourse.viz)
# --------------------------------------------------------------------------------------------------------------

def test_plot_attention_heads_draws_one_panel_per_head():
    w = random_attention(5, 4, 4, generator=torch.Generator().manual_seed(0))
    fig = plot_attention_heads(w, list("abcd"), ncols=3, title="layer 1")
    drawn = [ax for ax in fig.axes if ax.images]
    assert len(drawn) == 5
    np.testing.assert_allclose(drawn[2].images[0].get_array(), w[2].numpy(), rtol=1e-6)
    assert "head 3" in drawn[2].get_title()
    plt.close("all")
    with pytest.raises(ValueError, match="tokens"):
        plot_attention_heads(w, list("abc"))
    with pytest.raises(ValueError, match=r"\(H, T, T\)"):
        plot_attention_heads(w[0], list("abcd"))


def test_plot_head_scores_writes_each_value():
    scores = torch.tensor([[0.1, 0.25], [0.5, 1.0]])
    ax = plot_head_scores(scores, title="t", fmt=".2f")
    np.testing.assert_allclose(ax.images[0].get_array(), scores.numpy())
    texts = sorted(t.get_text() for t in ax.texts)
    assert texts == ["0.10", "0.25", "0.50", "1.00"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2"]
    plt.close("all")
    with pytest.raises(ValueError, match="2-D"):
        plot_head_scores(torch.zeros(3))


def test_attention_explorer_has_controls_and_draws():
    w = random_attention(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))   # (L, H, T, T)
    short = w[:, :, :3, :3] / w[:, :, :3, :3].sum(-1, keepdim=True)
    widget = attention_explorer({"s1": (w, list("abcd")), "s2": (short, list("xyz"))})
    descriptions = [c.description for c in widget.children[:-1]]
    assert descriptions == ["sentence", "layer", "head", "view"]
    layer = widget.children[1]
    assert (layer.min, layer.max) == (1, 2)
    assert widget.children[2].options[0] == "mean of heads" and len(widget.children[2].options) == 4
    widget.update()  # draws without error
    plt.close("all")
    single = attention_explorer((w, list("abcd")))
    assert [c.description for c in single.children[:-1]] == ["layer", "head", "view"]
    plt.close("all")
    with pytest.raises(ValueError, match="tokens"):
        attention_explorer((w, list("abc")))
