"""tfcourse.models.seq2seq against torch.nn.GRU, hand computations of Bahdanau and Luong steps, and its properties."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tfcourse.data.numbers import NumberTranslation, sample_numbers
from tfcourse.models.seq2seq import (
    ATTENTION_KINDS,
    DecoderState,
    Seq2Seq,
    Seq2SeqConfig,
    by_length,
    corpus_bleu,
    exact_match,
    fit,
    translate,
)

V_SRC, V_TGT = 11, 13
ATTENDING = [k for k in ATTENTION_KINDS if k is not None]


def make_model(attention="bahdanau", seed=0, **kwargs) -> Seq2Seq:
    torch.manual_seed(seed)
    config = Seq2SeqConfig(V_SRC, V_TGT, **{"d_emb": 6, "d_hidden": 8, "d_attn": 5, "attention": attention,
                                            **kwargs})
    return Seq2Seq(config).double().eval()


def make_batch(lengths=(5, 2, 4), t_tgt=4, seed=1, pad_to=None):
    """Random ids: source rows of the given lengths (padded with 0), target inputs starting with <bos>."""
    g = torch.Generator().manual_seed(seed)
    S = pad_to or max(lengths)
    src = torch.zeros(len(lengths), S, dtype=torch.long)
    for b, n in enumerate(lengths):
        src[b, :n] = torch.randint(3, V_SRC, (n,), generator=g)
    tgt_in = torch.randint(3, V_TGT, (len(lengths), t_tgt), generator=g)
    tgt_in[:, 0] = 1
    return src, torch.tensor(lengths), tgt_in


def gru_cell_by_hand(cell: nn.GRUCell, x, h):
    """torch.nn.GRUCell's equations (Cho et al. 2014, PyTorch's gate order r, z, n), written out."""
    W_ir, W_iz, W_in = cell.weight_ih.chunk(3)
    W_hr, W_hz, W_hn = cell.weight_hh.chunk(3)
    b_ir, b_iz, b_in = cell.bias_ih.chunk(3)
    b_hr, b_hz, b_hn = cell.bias_hh.chunk(3)
    r = torch.sigmoid(x @ W_ir.T + b_ir + h @ W_hr.T + b_hr)
    z = torch.sigmoid(x @ W_iz.T + b_iz + h @ W_hz.T + b_hz)
    n = torch.tanh(x @ W_in.T + b_in + r * (h @ W_hn.T + b_hn))
    return (1 - z) * n + z * h


def random_state(model, B, seed=2):
    g = torch.Generator().manual_seed(seed)
    d = model.config.d_hidden
    return DecoderState(torch.randn(B, d, generator=g, dtype=torch.float64).tanh(),
                        torch.randn(B, d, generator=g, dtype=torch.float64).tanh())


# --------------------------------------------------------------------------------------------------- the encoder

@pytest.mark.parametrize("bidirectional", [True, False])
def test_encoder_equals_torch_gru_on_each_unpadded_sequence(bidirectional):
    model = make_model(bidirectional=bidirectional)
    src, lengths, _ = make_batch(lengths=(5, 2, 4, 1), pad_to=7)
    memory = model.encode(src, lengths)
    d = model.config.d_hidden
    assert memory.states.shape == (4, 7, d) and memory.summary.shape == (4, d)

    peer = nn.GRU(6, d // 2 if bidirectional else d, batch_first=True, bidirectional=bidirectional).double()
    peer.load_state_dict(model.encoder.rnn.state_dict())
    for b, n in enumerate(lengths.tolist()):
        out, h_n = peer(model.encoder.embedding(src[b:b + 1, :n]))  # one sequence, no padding at all
        torch.testing.assert_close(memory.states[b, :n], out[0], atol=1e-12, rtol=0)
        torch.testing.assert_close(memory.summary[b], torch.cat(list(h_n[:, 0])), atol=1e-12, rtol=0)
        assert (memory.states[b, n:] == 0).all(), "states at padding are zero"
    assert memory.mask.tolist() == [[t < n for t in range(7)] for n in lengths.tolist()]


# ------------------------------------------------------------------------------------- one decoder step by hand

def test_bahdanau_step_equals_hand_computation():
    model = make_model("bahdanau")
    src, lengths, tgt_in = make_batch()
    memory = model.encode(src, lengths)
    state = random_state(model, 3)
    prev = tgt_in[:, 2]
    logits, new_state, weights = model.step(prev, state, memory)

    score = model.attention.score
    H, s = memory.states, state.hidden  # (B, S, d), (B, d)
    # Bahdanau et al. (2015), App. A.1.2: e_ij = v_a^T tanh(W_a s_{i-1} + U_a h_j); Eq. 6 softmax; Eq. 5 context
    e = torch.tanh((s @ score.W_q.weight.T)[:, None, :] + H @ score.W_k.weight.T) @ score.w_v.weight[0]  # (B, S)
    e = e.masked_fill(~memory.mask, -math.inf)
    alpha = torch.softmax(e, dim=-1)
    c = torch.einsum("bs,bsd->bd", alpha, H)
    s_new = gru_cell_by_hand(model.cell, torch.cat([model.tgt_embedding(prev), c], -1), s)  # s_i = f(s_{i-1}, y, c_i)
    h_tilde = torch.tanh(torch.cat([c, s_new], -1) @ model.combine.weight.T)
    expected_logits = h_tilde @ model.out.weight.T + model.out.bias

    torch.testing.assert_close(weights, alpha, atol=1e-12, rtol=0)
    torch.testing.assert_close(new_state.hidden, s_new, atol=1e-12, rtol=0)
    torch.testing.assert_close(new_state.attentional, h_tilde, atol=1e-12, rtol=0)
    torch.testing.assert_close(logits, expected_logits, atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind", ["dot", "general", "concat"])
def test_luong_step_equals_hand_computation(kind):
    model = make_model(kind)
    src, lengths, tgt_in = make_batch()
    memory = model.encode(src, lengths)
    state = random_state(model, 3)
    prev = tgt_in[:, 1]
    logits, new_state, weights = model.step(prev, state, memory)

    H = memory.states
    # Luong et al. (2015): input feeding (Sec. 3.3), then the *current* state h_t is the query
    h_t = gru_cell_by_hand(model.cell, torch.cat([model.tgt_embedding(prev), state.attentional], -1), state.hidden)
    score = model.attention.score
    if kind == "dot":  # Eq. 8: h_t^T h_s
        scores = torch.einsum("bd,bsd->bs", h_t, H)
    elif kind == "general":  # Eq. 8: h_t^T W_a h_s
        scores = torch.einsum("bd,de,bse->bs", h_t, score.W.weight, H)
    else:  # Eq. 8: v_a^T tanh(W_a [h_t; h_s]), W_a split into the blocks that multiply h_t and h_s
        scores = torch.tanh((h_t @ score.W_q.weight.T)[:, None] + H @ score.W_k.weight.T) @ score.w_v.weight[0]
    alpha = torch.softmax(scores.masked_fill(~memory.mask, -math.inf), dim=-1)  # Eq. 7
    c = torch.einsum("bs,bsd->bd", alpha, H)
    h_tilde = torch.tanh(torch.cat([c, h_t], -1) @ model.combine.weight.T)  # Eq. 5
    torch.testing.assert_close(weights, alpha, atol=1e-12, rtol=0)
    torch.testing.assert_close(new_state.hidden, h_t, atol=1e-12, rtol=0)
    torch.testing.assert_close(logits, h_tilde @ model.out.weight.T + model.out.bias, atol=1e-12, rtol=0)  # Eq. 6


def test_luong_dot_context_equals_torch_sdpa():
    model = make_model("dot")
    src, lengths, tgt_in = make_batch()
    memory = model.encode(src, lengths)
    query = random_state(model, 3).hidden
    context, weights = model.attend(query, memory)
    peer = F.scaled_dot_product_attention(query[:, None], memory.states, memory.states,
                                          attn_mask=memory.mask[:, None, :], scale=1.0)  # unscaled: Luong's "dot"
    torch.testing.assert_close(context, peer[:, 0], atol=1e-12, rtol=0)
    assert (weights[~memory.mask] == 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, dtype=torch.float64), atol=1e-12, rtol=0)


def test_without_attention_only_the_summary_reaches_the_decoder():
    model = make_model(None)
    assert model.attention is None
    src, lengths, tgt_in = make_batch()
    memory = model.encode(src, lengths)
    state = model.init_state(memory)
    logits, new_state, weights = model.step(tgt_in[:, 0], state, memory)
    scrambled = memory._replace(states=torch.randn_like(memory.states))
    assert weights is None
    torch.testing.assert_close(model.step(tgt_in[:, 0], state, scrambled)[0], logits, atol=0, rtol=0)
    # ... whereas an attention model reads the states themselves
    attending = make_model("bahdanau")
    memory = attending.encode(src, lengths)
    state = attending.init_state(memory)
    assert not torch.allclose(attending.step(tgt_in[:, 0], state, memory._replace(states=torch.randn_like(
        memory.states)))[0], attending.step(tgt_in[:, 0], state, memory)[0])


def test_bahdanau_attends_before_reading_the_token_luong_after():
    """Bahdanau's query is s_{i-1}, so the weights of step i do not depend on the token read at step i; Luong's
    query h_t has read it."""
    src, lengths, tgt_in = make_batch(t_tgt=5)
    changed = tgt_in.clone()
    changed[:, 3] = (changed[:, 3] - 3 + 1) % (V_TGT - 3) + 3
    for kind in ATTENDING:
        model = make_model(kind)
        a, b = model(src, lengths, tgt_in).attention, model(src, lengths, changed).attention
        torch.testing.assert_close(a[:, :3], b[:, :3], atol=0, rtol=0)  # the past never depends on the future
        if kind == "bahdanau":
            torch.testing.assert_close(a[:, 3], b[:, 3], atol=0, rtol=0)
            assert not torch.allclose(a[:, 4], b[:, 4])
        else:
            assert not torch.allclose(a[:, 3], b[:, 3])


def test_step_gradcheck_float64():
    model = make_model("bahdanau", d_emb=3, d_hidden=4, d_attn=3)
    src, lengths, tgt_in = make_batch(lengths=(3, 2))
    memory = model.encode(src, lengths)
    states = memory.states.detach().clone().requires_grad_()
    hidden = random_state(model, 2).hidden.requires_grad_()

    def f(states, hidden):
        logits, _, weights = model.step(tgt_in[:, 1], DecoderState(hidden, torch.zeros_like(hidden)),
                                        memory._replace(states=states))
        return logits, weights

    assert torch.autograd.gradcheck(f, (states, hidden))


# --------------------------------------------------------------------------------------------- whole sequences

@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_padding_does_not_change_the_outputs(kind):
    """A sequence decoded in a padded batch gives the logits and weights it gets alone, without padding."""
    model = make_model(kind)
    src, lengths, tgt_in = make_batch(lengths=(5, 2, 4), pad_to=8)
    out = model(src, lengths, tgt_in)
    assert out.logits.shape == (3, 4, V_TGT)
    for b, n in enumerate(lengths.tolist()):
        alone = model(src[b:b + 1, :n], lengths[b:b + 1], tgt_in[b:b + 1])
        torch.testing.assert_close(out.logits[b], alone.logits[0], atol=1e-12, rtol=0)
        if kind is None:
            assert out.attention is None
        else:
            assert out.attention.shape == (3, 4, 8)
            torch.testing.assert_close(out.attention[b, :, :n], alone.attention[0], atol=1e-12, rtol=0)
            assert (out.attention[b, :, n:] == 0).all()


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_teacher_forcing_feeds_the_reference_and_free_running_the_argmax(kind):
    model = make_model(kind)
    src, lengths, tgt_in = make_batch(t_tgt=6)
    memory = model.encode(src, lengths)
    # teacher forcing = the step function fed the reference tokens
    state, expected = model.init_state(memory), []
    for t in range(6):
        logits, state, _ = model.step(tgt_in[:, t], state, memory)
        expected.append(logits)
    torch.testing.assert_close(model(src, lengths, tgt_in).logits, torch.stack(expected, 1), atol=1e-12, rtol=0)
    # free running = greedy decoding (up to each row's first <eos>)
    free = model(src, lengths, tgt_in, teacher_forcing=0.0).logits.argmax(-1)
    greedy, _ = model.greedy_decode(src, lengths, max_len=6)
    for b in range(3):
        n = greedy.shape[1] if not (greedy[b] == 2).any() else int((greedy[b] == 2).nonzero()[0]) + 1
        assert torch.equal(free[b, :n], greedy[b, :n])


def test_mixed_teacher_forcing_is_reproducible_and_between_the_two():
    model = make_model("bahdanau")
    src, lengths, tgt_in = make_batch(lengths=(5, 2, 4, 3, 5, 1), t_tgt=6)
    runs = [model(src, lengths, tgt_in, 0.5, torch.Generator().manual_seed(s)).logits for s in (0, 0, 1)]
    torch.testing.assert_close(runs[0], runs[1], atol=0, rtol=0)
    assert not torch.allclose(runs[0], runs[2])
    gold, free = model(src, lengths, tgt_in).logits, model(src, lengths, tgt_in, 0.0).logits
    assert not torch.allclose(runs[0], gold) and not torch.allclose(runs[0], free)
    torch.testing.assert_close(runs[0][:, 0], gold[:, 0], atol=0, rtol=0)  # step 0 always reads <bos>


def test_greedy_decode_shapes_padding_and_max_len():
    model = make_model("general")
    with torch.no_grad():
        model.out.bias[2] = -100.0  # never <eos>: every row runs to max_len
    src, lengths, _ = make_batch()
    tokens, weights = model.greedy_decode(src, lengths, max_len=7)
    assert tokens.shape == (3, 7) and weights.shape == (3, 7, 5) and tokens.dtype == torch.long
    with torch.no_grad():
        model.out.bias[2] = 100.0  # always <eos> at once: decoding stops after one step
    tokens, weights = model.greedy_decode(src, lengths, max_len=7)
    assert tokens.tolist() == [[2], [2], [2]] and weights.shape == (3, 1, 5)
    assert make_model(None).greedy_decode(src, lengths, max_len=3)[1] is None


def test_greedy_decode_pads_after_eos():
    model = make_model("dot", seed=3)
    src, lengths, _ = make_batch(lengths=(5, 2, 4, 3, 5, 1, 2, 4))
    with torch.no_grad():
        model.out.bias[2] = 2.0  # <eos> likely, but not at once for every row
    tokens, weights = model.greedy_decode(src, lengths, max_len=12)
    for row, w in zip(tokens, weights):
        ends = (row == 2).nonzero()
        if len(ends):
            end = int(ends[0])
            assert (row[end + 1:] == 0).all() and (w[end + 1:] == 0).all()
            torch.testing.assert_close(w[: end + 1].sum(-1), torch.ones(end + 1, dtype=torch.float64))


# --------------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs,match", [
    (dict(attention="luong"), "attention must be one of"),
    (dict(d_hidden=7), "even"),
    (dict(d_emb=0), "d_emb"),
    (dict(d_attn=-1), "d_attn"),
    (dict(bos_id=0), "distinct"),
    (dict(eos_id=V_SRC), "inside both vocabularies"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Seq2SeqConfig(V_SRC, V_TGT, **kwargs)


@pytest.mark.parametrize("change,error,match", [
    (lambda s, n, t: (s.double(), n, t), TypeError, "int64"),
    (lambda s, n, t: (s[0], n, t), ValueError, "src must have 2 dimensions"),
    (lambda s, n, t: (s, n + 1, t), ValueError, "src_lengths must lie in"),
    (lambda s, n, t: (s, n * 0, t), ValueError, "src_lengths must lie in"),
    (lambda s, n, t: (s, n[:2], t), ValueError, "one length per sequence"),
    (lambda s, n, t: (s, n.double(), t), TypeError, "integer"),
    (lambda s, n, t: (s + V_SRC, n, t), ValueError, r"ids must lie in \[0, 11\)"),
    (lambda s, n, t: (s, n, t[:2]), ValueError, "batch size of src"),
    (lambda s, n, t: (s, n, t + V_TGT), ValueError, r"ids must lie in \[0, 13\)"),
    (lambda s, n, t: (s, n, [[1, 2]]), TypeError, "tgt_in must be a torch.Tensor"),
])
def test_forward_rejects_bad_input(change, error, match):
    model = make_model()
    with pytest.raises(error, match=match):
        model(*change(*make_batch()))


def test_forward_and_decode_reject_bad_options():
    model = make_model()
    src, lengths, tgt_in = make_batch()
    for bad in (-0.1, 1.5, True):
        with pytest.raises(ValueError, match="teacher_forcing"):
            model(src, lengths, tgt_in, teacher_forcing=bad)
    with pytest.raises(ValueError, match="max_len"):
        model.greedy_decode(src, lengths, max_len=0)


# ------------------------------------------------------------------------------------ training and translation

@pytest.fixture(scope="module")
def tiny_task():
    return NumberTranslation.from_numbers("de", sample_numbers(300, high=999, seed=0), (0.8, 0.0, 0.2), seed=0)


def test_fit_lowers_the_loss_and_translate_returns_aligned_outputs(tiny_task):
    torch.manual_seed(0)
    model = Seq2Seq(Seq2SeqConfig(len(tiny_task.src_vocab), len(tiny_task.tgt_vocab), d_emb=16, d_hidden=16))
    losses = fit(model, tiny_task, steps=40, batch_size=64, lr=1e-2)
    assert len(losses) == 40 and sum(losses[-5:]) < 0.5 * sum(losses[:5])
    assert not model.training
    pairs = tiny_task.test[:9]
    out = translate(model, tiny_task, pairs, batch_size=4)
    assert len(out.predictions) == len(out.tokens) == len(out.attention) == 9
    for pair, tokens, weights in zip(pairs, out.tokens, out.attention):
        assert weights.shape[1] == tiny_task.source_length(pair) + 1  # the source tokens and <eos>
        assert weights.shape[0] in (len(tokens) + 1, 40)  # the tokens and <eos>, or max_len without <eos>


def test_fit_is_reproducible_and_checks_its_arguments(tiny_task):
    def run():
        torch.manual_seed(0)
        model = Seq2Seq(Seq2SeqConfig(len(tiny_task.src_vocab), len(tiny_task.tgt_vocab), d_emb=8, d_hidden=8))
        return fit(model, tiny_task, steps=3, batch_size=16, teacher_forcing=lambda step: 0.5)

    assert run() == run()
    wrong = Seq2Seq(Seq2SeqConfig(len(tiny_task.src_vocab) + 1, len(tiny_task.tgt_vocab)))
    with pytest.raises(ValueError, match="vocabulary sizes"):
        fit(wrong, tiny_task, steps=1)
    with pytest.raises(ValueError, match="steps"):
        fit(wrong, tiny_task, steps=0)


# ----------------------------------------------------------------------------------------------------- metrics

def test_exact_match_and_by_length():
    preds, refs = ["a", "b", "c", "d"], ["a", "x", "c", "d"]
    assert exact_match(preds, refs) == 0.75
    assert by_length(exact_match, preds, refs, [2, 1, 2, 1]) == {1: 0.5, 2: 1.0}
    assert list(by_length(exact_match, preds, refs, [9, 3, 5, 1])) == [1, 3, 5, 9]
    with pytest.raises(ValueError, match="equal lengths"):
        exact_match(preds, refs[:2])
    with pytest.raises(ValueError, match="equal lengths"):
        by_length(exact_match, preds, refs, [1, 2])
    with pytest.raises(ValueError, match="empty"):
        exact_match([], [])


def test_corpus_bleu_equals_the_formula():
    # precisions 4/5, 3/4, 2/3, 1/2 and no brevity penalty: BLEU = 100 (4/5 * 3/4 * 2/3 * 1/2)^(1/4)
    hyp, ref = ["a", "b", "c", "d", "e"], ["a", "b", "c", "d", "f"]
    assert corpus_bleu([hyp], [ref]) == pytest.approx(100 * 0.2**0.25, abs=1e-9)
    assert corpus_bleu([hyp, ref], [hyp, ref]) == pytest.approx(100.0)
    # a hypothesis half as long as its reference: brevity penalty exp(1 - 2) on perfect precisions
    assert corpus_bleu([["a", "b", "c", "d"]], [["a", "b", "c", "d"] * 2]) == pytest.approx(100 * math.exp(-1))
    # short sentences are scored on the n-gram orders they have (1- to 3-grams here): perfect precisions, and the
    # brevity penalty exp(1 - 4/3)
    assert corpus_bleu([["a", "b", "c"]], [["a", "b", "c", "d"]]) == pytest.approx(100 * math.exp(-1 / 3))
    # a precision of 0 is smoothed as in sacrebleu's default ("exp": 1 / (2 total) for the first such order)
    assert corpus_bleu([["a", "b", "c"]], [["a", "b", "d"]]) == pytest.approx(100 * (2 / 3 * 1 / 2 * 1 / 2) ** (1 / 3))
    assert corpus_bleu([["a"]], [["a"]]) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="equal lengths"):
        corpus_bleu([hyp], [])
