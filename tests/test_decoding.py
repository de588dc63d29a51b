"""tfcourse.decoding: greedy search and beam search against Hugging Face's generate (GPT-2 with random weights),
against an exhaustive search, and their properties (beam width 1 is greedy, <eos> handling, scores, bad inputs)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tfcourse.decoding import Hypotheses, beam_search, expand_for_beams, gnmt_length_penalty, greedy_decode

PAD, BOS, EOS = 0, 1, 2


class ToyDecoder(nn.Module):
    """A small random autoregressive model over V tokens, conditioned on one "memory" vector per source.

    The next-token distribution depends on every token of the prefix (a position-weighted sum of embeddings) and
    on the source's memory, so that different prefixes and sources get different distributions. ``sharpness``
    scales the logits: large values make peaked distributions, in which <eos> is often the argmax.
    """

    def __init__(self, V: int, d: int = 8, seed: int = 0, sharpness: float = 2.0, eos_bias: float = 0.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = nn.Parameter(torch.randn(V, d, generator=g, dtype=torch.float64))
        self.pos = nn.Parameter(torch.randn(16, d, generator=g, dtype=torch.float64))
        self.out = nn.Parameter(torch.randn(d, V, generator=g, dtype=torch.float64) * sharpness)
        self.bias = torch.zeros(V, dtype=torch.float64)
        self.bias[EOS] = eos_bias

    def log_probs(self, prefix: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        t = prefix.shape[1]
        h = (self.emb[prefix] * self.pos[:t]).sum(1) / math.sqrt(t) + memory  # (N, d)
        return (torch.tanh(h) @ self.out + self.bias).log_softmax(-1)  # (N, V)

    def fn(self, memory: torch.Tensor, beam_size: int = 1):
        """The log_probs_fn for a batch of sources, with the memory expanded per beam."""
        expanded = expand_for_beams(memory, beam_size)
        return lambda prefix: self.log_probs(prefix, expanded)


def memories(B: int, d: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(B, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def sequence_log_prob(model: ToyDecoder, memory: torch.Tensor, tokens: list[int]) -> float:
    """log P(tokens | memory) by teacher forcing, one source (memory (d,))."""
    prefix = torch.tensor([[BOS] + tokens[:-1]])
    total = 0.0
    for t, token in enumerate(tokens):
        total += model.log_probs(prefix[:, : t + 1], memory[None])[0, token].item()
    return total


def exhaustive_best(model: ToyDecoder, memory: torch.Tensor, V: int, max_len: int, alpha: float):
    """The best normalised score over every sequence: those ending in <eos> within max_len tokens, and those of
    max_len tokens without <eos> (what a search returns when it runs out of steps)."""
    best, best_seq = -math.inf, None
    for n in range(1, max_len + 1):
        for body in itertools.product([v for v in range(V) if v != EOS], repeat=n - 1):
            ends = [EOS] + ([v for v in range(V) if v != EOS] if n == max_len else [])
            for last in ends:
                seq = list(body) + [last]
                score = sequence_log_prob(model, memory, seq) / gnmt_length_penalty(n, alpha)
                if score > best:
                    best, best_seq = score, seq
    return best, best_seq


def rows(hyp: Hypotheses) -> list[list[int]]:
    return [hyp.tokens[b, : int(hyp.lengths[b])].tolist() for b in range(hyp.tokens.shape[0])]


# --------------------------------------------------------------------------------------------------------- peers

@pytest.fixture(scope="module")
def gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=12, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                     bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # larger weights than GPT-2's init, so that outputs depend on the prompt and vary in length
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
        model.lm_head.weight.normal_(0.0, 1.0)
    return model


PROMPT = torch.tensor([3, 5, 7, 8, 10, 11])  # one different first token per source, so that sources differ


def gpt2_fn(model, B, K=1):
    """Our interface on GPT-2: source b is the prompt token PROMPT[b] before the <bos> that starts our prefix."""
    first = expand_for_beams(PROMPT[:B, None], K)  # (B*K, 1)
    return lambda prefix: model(torch.cat([first, prefix], dim=1)).logits[:, -1].float().log_softmax(-1)


def hf_generate(model, B, **kwargs):
    prompt = torch.stack([PROMPT[:B], torch.full((B,), BOS)], dim=1)  # (B, 2)
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                          return_dict_in_generate=True, output_scores=True, pad_token_id=PAD, eos_token_id=EOS,
                          bos_token_id=BOS, **kwargs)


def hf_rows(sequences: torch.Tensor, max_new: int) -> list[list[int]]:
    """Hugging Face's generated tokens of each row (after the 2-token prompt), cut after the first <eos>."""
    out = []
    for row in sequences[:, 2:].tolist():
        out.append(row[: row.index(EOS) + 1] if EOS in row else row[:max_new])
    return out


def test_greedy_equals_hugging_face_generate(gpt2):
    B, max_new = 6, 9
    ours = greedy_decode(gpt2_fn(gpt2, B), B, max_new, BOS, EOS, PAD)
    theirs = hf_generate(gpt2, B, num_beams=1, max_new_tokens=max_new, min_new_tokens=0)
    assert rows(ours) == hf_rows(theirs.sequences, max_new)
    assert {len(r) for r in rows(ours)} != {max_new}, "the test should contain sequences that end with <eos>"


@pytest.mark.parametrize("beam_size", [2, 3, 5])
def test_beam_search_equals_hugging_face_generate(gpt2, beam_size):
    """Hugging Face's canonical beam search (early_stopping="never", length_penalty=0) finds the same sequences
    with the same log-probabilities."""
    B, max_new = 4, 8
    ours = beam_search(gpt2_fn(gpt2, B, beam_size), B, beam_size, max_new, BOS, EOS, PAD, length_penalty=0.0)
    theirs = hf_generate(gpt2, B, num_beams=beam_size, max_new_tokens=max_new, early_stopping="never",
                         length_penalty=0.0)
    assert rows(ours) == hf_rows(theirs.sequences, max_new)
    torch.testing.assert_close(ours.log_probs, theirs.sequences_scores, atol=1e-5, rtol=1e-5)
    assert len(set(ours.lengths.tolist())) > 1, "the test should contain sequences of different lengths"


# ---------------------------------------------------------------------------------------------------- properties

@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), V=st.integers(3, 9), B=st.integers(1, 4), max_len=st.integers(1, 7),
       sharpness=st.floats(0.5, 6.0))
def test_beam_width_one_is_greedy(seed, V, B, max_len, sharpness):
    model = ToyDecoder(V, seed=seed, sharpness=sharpness)
    memory = memories(B, seed=seed + 1)
    greedy = greedy_decode(model.fn(memory), B, max_len, BOS, EOS, PAD)
    beam = beam_search(model.fn(memory, 1), B, 1, max_len, BOS, EOS, PAD, length_penalty=0.0)
    assert torch.equal(beam.tokens, greedy.tokens)
    assert torch.equal(beam.lengths, greedy.lengths)
    torch.testing.assert_close(beam.log_probs, greedy.log_probs)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), alpha=st.sampled_from([0.0, 0.6, 2.0]), sharpness=st.floats(0.5, 4.0))
def test_a_wide_enough_beam_is_an_exhaustive_search(seed, alpha, sharpness):
    """With every prefix in the beam, beam search returns the best sequence of all, so it never scores below
    greedy search; its scores are the model's log-probabilities of its tokens, divided by the length penalty."""
    V, max_len, B = 4, 4, 2
    K = V ** max_len  # more than the (V - 1)^(max_len - 1) * V extensions of the last step
    model = ToyDecoder(V, seed=seed, sharpness=sharpness, eos_bias=-1.0)
    memory = memories(B, seed=seed + 1)
    beam = beam_search(model.fn(memory, K), B, K, max_len, BOS, EOS, PAD, length_penalty=alpha)
    greedy = greedy_decode(model.fn(memory), B, max_len, BOS, EOS, PAD)
    for b, tokens in enumerate(rows(beam)):
        best, best_seq = exhaustive_best(model, memory[b], V, max_len, alpha)
        assert math.isclose(beam.scores[b].item(), best, rel_tol=1e-9, abs_tol=1e-9)
        assert tokens == best_seq
        log_p = sequence_log_prob(model, memory[b], tokens)
        assert math.isclose(beam.log_probs[b].item(), log_p, rel_tol=1e-9, abs_tol=1e-9)
        g_len = int(greedy.lengths[b])
        assert beam.scores[b] >= greedy.log_probs[b] / gnmt_length_penalty(g_len, alpha) - 1e-12


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), K=st.integers(1, 6), alpha=st.sampled_from([0.0, 0.7]),
       max_len=st.integers(1, 8))
def test_beam_outputs_are_consistent(seed, K, alpha, max_len):
    """Every returned row is <eos>-terminated (or max_len long), padded after; log_probs are the model's and the
    scores are log_probs / lp(length)."""
    V, B = 7, 3
    model = ToyDecoder(V, seed=seed, sharpness=3.0)
    memory = memories(B, seed=seed + 1)
    hyp = beam_search(model.fn(memory, K), B, K, max_len, BOS, EOS, PAD, length_penalty=alpha)
    assert hyp.tokens.shape[1] == int(hyp.lengths.max()) <= max_len
    for b, tokens in enumerate(rows(hyp)):
        assert tokens[-1] == EOS or len(tokens) == max_len
        assert EOS not in tokens[:-1]
        assert (hyp.tokens[b, len(tokens):] == PAD).all()
        log_p = sequence_log_prob(model, memory[b], tokens)
        assert math.isclose(hyp.log_probs[b].item(), log_p, rel_tol=1e-9, abs_tol=1e-9)
        expected = log_p / gnmt_length_penalty(len(tokens), alpha)
        assert math.isclose(hyp.scores[b].item(), expected, rel_tol=1e-9, abs_tol=1e-9)


def test_beam_search_pruning_counterexample():
    """Beam search is not guaranteed to score at least as well as greedy search: here (K=2) the greedy path
    "A y" is pruned at step 2 by two extensions of "B" that score higher then, but whose continuations are all
    improbable, so the beam ends with P = 0.1575 * 0.2 < 0.12 = P(greedy)."""
    V = 7  # pad, bos, eos, A=3, B=4, y=5, z=6
    A, Bt, y, z = 3, 4, 5, 6
    uniform = {EOS: 0.2, A: 0.2, Bt: 0.2, y: 0.2, z: 0.2}
    table = {
        (): {A: 0.40, Bt: 0.35, z: 0.25},
        (A,): {y: 0.30, z: 0.25, Bt: 0.25, EOS: 0.20},   # greedy: A y (0.40 * 0.30 = 0.12) ...
        (A, y): {EOS: 1.0},                               # ... <eos>: P = 0.12
        (Bt,): {y: 0.45, z: 0.45, EOS: 0.10},             # B y and B z (0.1575 each) beat A y at step 2 ...
    }                                                     # ... but every continuation of them is improbable

    def fn(prefix):
        out = torch.full((prefix.shape[0], V), 1e-12, dtype=torch.float64)
        for n, row in enumerate(prefix.tolist()):
            probs = table.get(tuple(row[1:]), uniform)
            for token, p in probs.items():
                out[n, token] = p
        return (out / out.sum(-1, keepdim=True)).log()

    greedy = greedy_decode(fn, 1, 3, BOS, EOS, PAD)
    beam = beam_search(fn, 1, 2, 3, BOS, EOS, PAD)
    assert rows(greedy) == [[A, y, EOS]]
    assert math.isclose(greedy.log_probs.item(), math.log(0.12), rel_tol=1e-6)
    assert rows(beam)[0][:1] == [Bt]
    assert beam.log_probs.item() < greedy.log_probs.item()


# ------------------------------------------------------------------------------------------------ <eos> handling

def constant_fn(V, favourite, batch=None):
    """A model that always puts most of its mass on ``favourite``."""
    def fn(prefix):
        logits = torch.zeros(prefix.shape[0], V, dtype=torch.float64)
        logits[:, favourite] = 5.0
        return logits.log_softmax(-1)
    return fn


@pytest.mark.parametrize("search", ["greedy", "beam"])
def test_immediate_eos_gives_one_token(search):
    fn = constant_fn(6, EOS)
    hyp = greedy_decode(fn, 3, 5, BOS, EOS, PAD) if search == "greedy" else beam_search(fn, 3, 3, 5, BOS, EOS, PAD)
    assert hyp.tokens.tolist() == [[EOS]] * 3 and hyp.lengths.tolist() == [1, 1, 1]


@pytest.mark.parametrize("search", ["greedy", "beam"])
def test_no_eos_runs_to_max_len(search):
    fn = constant_fn(6, 4)
    hyp = greedy_decode(fn, 2, 5, BOS, EOS, PAD) if search == "greedy" else beam_search(fn, 2, 2, 5, BOS, EOS, PAD)
    assert hyp.tokens.tolist() == [[4] * 5] * 2 and hyp.lengths.tolist() == [5, 5]


def test_rows_that_finish_early_are_padded_and_no_longer_scored():
    model = ToyDecoder(8, seed=3, sharpness=4.0)
    memory = memories(6, seed=4)
    hyp = greedy_decode(model.fn(memory), 6, 10, BOS, EOS, PAD)
    lengths = hyp.lengths.tolist()
    assert len(set(lengths)) > 1, "the test needs rows of different lengths"
    for b, tokens in enumerate(rows(hyp)):
        assert (hyp.tokens[b, len(tokens):] == PAD).all()
        assert math.isclose(hyp.log_probs[b].item(), sequence_log_prob(model, memory[b], tokens), rel_tol=1e-9)


def test_greedy_stops_once_every_row_is_done():
    calls = []
    fn0 = constant_fn(6, EOS)

    def fn(prefix):
        calls.append(prefix.shape[1])
        return fn0(prefix)

    greedy_decode(fn, 2, 10, BOS, EOS, PAD)
    beam_search(fn, 2, 3, 10, BOS, EOS, PAD)
    assert calls == [1, 1]


def test_reorder_fn_gets_rows_within_each_source_block():
    model = ToyDecoder(7, seed=5, sharpness=2.0)
    B, K = 3, 4
    seen = []
    beam_search(model.fn(memories(B), K), B, K, 5, BOS, EOS, PAD, reorder_fn=seen.append)
    assert seen
    for rows_ in seen:
        assert rows_.shape == (B * K,)
        assert torch.equal(rows_ // K, torch.arange(B * K) // K)


def test_gnmt_length_penalty():
    assert gnmt_length_penalty(1, 0.6) == 1.0
    assert math.isclose(gnmt_length_penalty(10, 0.6), (15 / 6) ** 0.6)
    assert gnmt_length_penalty(7, 0.0) == 1.0
    torch.testing.assert_close(gnmt_length_penalty(torch.tensor([1, 3]), 1.0),
                               torch.tensor([1.0, 8 / 6], dtype=torch.float64))


# -------------------------------------------------------------------------------------------------- bad inputs

def test_bad_inputs_raise():
    fn = constant_fn(6, 4)
    with pytest.raises(TypeError, match="log_probs_fn"):
        greedy_decode("model", 2, 5, BOS, EOS)
    with pytest.raises(ValueError, match="batch_size"):
        greedy_decode(fn, 0, 5, BOS, EOS)
    with pytest.raises(ValueError, match="max_len"):
        beam_search(fn, 2, 2, 0, BOS, EOS)
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(fn, 2, 0, 5, BOS, EOS)
    with pytest.raises(ValueError, match="length_penalty"):
        beam_search(fn, 2, 2, 5, BOS, EOS, length_penalty=-0.5)
    with pytest.raises(ValueError, match="eos_id"):
        greedy_decode(fn, 2, 5, BOS, -1)
    with pytest.raises(ValueError, match="vocabulary"):
        greedy_decode(fn, 2, 5, BOS, 6)
    with pytest.raises(TypeError, match="reorder_fn"):
        beam_search(fn, 2, 2, 5, BOS, EOS, reorder_fn=3)
    with pytest.raises(ValueError, match="length"):
        gnmt_length_penalty(0, 0.6)


def test_bad_model_outputs_raise():
    with pytest.raises(ValueError, match="log-probabilities"):  # logits, not log_softmax
        greedy_decode(lambda p: torch.randn(p.shape[0], 6), 2, 5, BOS, EOS)
    with pytest.raises(ValueError, match="N = 6 rows"):  # the memory was not expanded per beam
        beam_search(lambda p: torch.zeros(2, 6).log_softmax(-1), 2, 3, 5, BOS, EOS)
    with pytest.raises(ValueError, match="NaN"):
        greedy_decode(lambda p: torch.full((p.shape[0], 6), float("nan")), 2, 5, BOS, EOS)
    with pytest.raises(TypeError, match="torch.Tensor"):
        greedy_decode(lambda p: [0.0] * 6, 1, 5, BOS, EOS)
    with pytest.raises(ValueError, match="floating"):
        greedy_decode(lambda p: torch.zeros(p.shape[0], 6, dtype=torch.long), 1, 5, BOS, EOS)
    with pytest.raises(ValueError, match="expand|batch dimension"):
        expand_for_beams(torch.tensor(1.0), 2)
