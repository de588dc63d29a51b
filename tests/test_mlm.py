"""tfcourse.data.mlm: the 15% / 80-10-10 masking rule (statistically, with tolerances from the binomial standard
error), what it must never touch, determinism; next-sentence pairs; packing and padding against Hugging Face
``tokenizers`` (pair encodings with longest-first truncation and padding); bad inputs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tfcourse.data.mlm import (
    IGNORE_INDEX,
    KEPT,
    MASKED,
    NOT_SELECTED,
    RANDOM,
    BERTBatch,
    encode_batch,
    mask_tokens,
    nsp_pairs,
    pack_batch,
    special_tokens_mask,
)

PAD, UNK, CLS, SEP, MASK = range(5)
SPECIALS = (PAD, UNK, CLS, SEP, MASK)
Z = 5.0  # tolerance in standard errors: a correct implementation fails a 5-sigma check with probability < 1e-6


def binomial_tolerance(p: float, n: int) -> float:
    """``Z`` standard errors of a proportion ``p`` estimated from ``n`` independent draws."""
    return Z * math.sqrt(p * (1 - p) / n)


def random_batch(B=400, T=500, V=1000, seed=0):
    """Ids with [CLS] ... [SEP] [PAD]* rows (random lengths), and the padding mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(len(SPECIALS), V, (B, T), generator=g)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    padding = torch.arange(T) >= lengths[:, None]
    ids[:, 0] = CLS
    ids[torch.arange(B), lengths - 1] = SEP
    ids[padding] = PAD
    ids[:, 7] = UNK  # a special id inside the text too
    return ids, padding


# --------------------------------------------------------------------------------------------------------------
# The 80/10/10 rule, measured
# --------------------------------------------------------------------------------------------------------------

def test_masking_proportions_within_five_standard_errors():
    V = 1000
    ids, padding = random_batch(V=V)
    out = mask_tokens(ids, vocab_size=V, mask_id=MASK, special_ids=SPECIALS, generator=torch.Generator().manual_seed(1))
    candidates = ~special_tokens_mask(ids, SPECIALS) & ~padding
    n = int(candidates.sum())
    assert n > 140_000  # enough tokens for tight tolerances (about +-0.5 percentage points at 5 sigma)
    selected = out.labels != IGNORE_INDEX
    # 15% of the candidates are selected.
    assert abs(selected.sum().item() / n - 0.15) < binomial_tolerance(0.15, n)
    n_sel = int(selected.sum())
    # Of the selected, 80% [MASK], 10% random, 10% unchanged; checked on the ids themselves, not only on `kind`.
    now_mask = (out.input_ids == MASK) & selected
    unchanged = (out.input_ids == ids) & selected
    other = selected & ~now_mask & ~unchanged
    p_kept_or_same = 0.1 + 0.1 / (V - len(SPECIALS))  # a random token equals the original with prob 1/(V - 5)
    assert abs(now_mask.sum().item() / n_sel - 0.8) < binomial_tolerance(0.8, n_sel)
    assert abs(unchanged.sum().item() / n_sel - p_kept_or_same) < binomial_tolerance(p_kept_or_same, n_sel)
    assert abs(other.sum().item() / n_sel - (0.1 - 0.1 / (V - 5))) < binomial_tolerance(0.1, n_sel)
    # `kind` tells the same story.
    assert torch.equal(out.kind == MASKED, now_mask)
    assert torch.equal(out.kind != NOT_SELECTED, selected)
    assert torch.equal((out.kind == RANDOM) & (out.input_ids != ids), other)
    assert torch.equal(out.input_ids[out.kind == KEPT], ids[out.kind == KEPT])
    assert abs((out.kind == RANDOM).sum().item() / n_sel - 0.1) < binomial_tolerance(0.1, n_sel)


def test_random_replacements_are_uniform_over_the_non_special_ids():
    V = 15  # 10 non-special ids: a chi-square test over them
    ids = torch.randint(5, V, (200, 400), generator=torch.Generator().manual_seed(2))
    out = mask_tokens(ids, vocab_size=V, mask_id=MASK, special_ids=SPECIALS, mlm_probability=1.0,
                      mask_fraction=0.0, random_fraction=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.all(out.kind == RANDOM)
    counts = torch.bincount(out.input_ids.flatten(), minlength=V).double()
    assert counts[:5].sum() == 0, "a special token was drawn as a random replacement"
    expected = counts[5:].sum() / 10
    chi2 = ((counts[5:] - expected) ** 2 / expected).sum().item()
    assert chi2 < 40.0  # chi-square with 9 degrees of freedom: P(> 40) ~ 8e-6


def test_never_selects_specials_or_padding_and_labels_the_rest():
    ids, padding = random_batch(B=50, T=60, V=300, seed=4)
    ids[padding] = 17  # padding that is not the [PAD] id: only key_padding_mask protects it
    out = mask_tokens(ids, vocab_size=300, mask_id=MASK, special_ids=(UNK, CLS, SEP), key_padding_mask=padding,
                      mlm_probability=0.9, generator=torch.Generator().manual_seed(5))
    protected = special_tokens_mask(ids, (UNK, CLS, SEP, MASK)) | padding
    assert torch.all(out.labels[protected] == IGNORE_INDEX)
    assert torch.equal(out.input_ids[protected], ids[protected])
    assert torch.all(out.kind[protected] == NOT_SELECTED)
    selected = out.labels != IGNORE_INDEX
    assert torch.equal(out.labels[selected], ids[selected]), "labels must be the original ids"
    assert torch.equal(out.input_ids[~selected], ids[~selected]), "unselected positions must be left alone"
    assert out.input_ids.dtype == torch.long and out.labels.dtype == torch.long and out.kind.dtype == torch.uint8


def test_the_input_is_not_modified_and_the_mask_id_is_never_selected():
    ids, _ = random_batch(B=20, T=30, V=100, seed=6)
    ids[:, 3] = MASK  # an input that already holds [MASK]
    before = ids.clone()
    out = mask_tokens(ids, vocab_size=100, mask_id=MASK, mlm_probability=1.0)  # MASK not in special_ids
    assert torch.equal(ids, before)
    assert torch.all(out.labels[:, 3] == IGNORE_INDEX)


def test_deterministic_given_a_seed():
    ids, padding = random_batch(B=30, T=40, V=200, seed=7)

    def run(seed):
        return mask_tokens(ids, vocab_size=200, mask_id=MASK, special_ids=SPECIALS,
                           generator=torch.Generator().manual_seed(seed))

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a.labels, c.labels)


@settings(max_examples=30, deadline=None)
@given(p=st.floats(0.05, 1.0), f_mask=st.floats(0.0, 1.0), f_random=st.floats(0.0, 1.0), seed=st.integers(0, 1000))
def test_fractions_partition_the_selected_positions(p, f_mask, f_random, seed):
    f_random = min(f_random, 1.0 - f_mask)
    ids, padding = random_batch(B=8, T=20, V=50, seed=seed)
    out = mask_tokens(ids, vocab_size=50, mask_id=MASK, special_ids=SPECIALS, mlm_probability=p,
                      mask_fraction=f_mask, random_fraction=f_random, generator=torch.Generator().manual_seed(seed))
    selected = out.labels != IGNORE_INDEX
    assert torch.equal(out.kind != NOT_SELECTED, selected)
    assert torch.all(out.input_ids[out.kind == MASKED] == MASK)
    assert torch.all(out.input_ids[out.kind == RANDOM] >= len(SPECIALS))
    if f_mask == 1.0:
        assert torch.all(out.kind[selected] == MASKED)
    if f_mask == 0.0 and f_random == 0.0:
        assert torch.equal(out.input_ids, ids)


@pytest.mark.parametrize("kwargs, match", [
    (dict(input_ids=torch.zeros(2, 3)), "int64"),
    (dict(input_ids=torch.full((2, 3), 10)), "vocab_size"),
    (dict(input_ids=torch.full((2, 3), -1)), "vocab_size"),
    (dict(mask_id=10), "mask_id"),
    (dict(mlm_probability=0.0), "mlm_probability"),
    (dict(mlm_probability=1.5), "mlm_probability"),
    (dict(mask_fraction=0.8, random_fraction=0.3), "at most 1"),
    (dict(random_fraction=-0.1), "random_fraction"),
    (dict(key_padding_mask=torch.zeros(2, 4, dtype=torch.bool)), "key_padding_mask"),
    (dict(key_padding_mask=torch.zeros(2, 3)), "key_padding_mask"),
    (dict(special_ids=range(10)), "non-special"),
    (dict(vocab_size=1), "vocab_size"),
])
def test_bad_inputs_raise(kwargs, match):
    args = dict(input_ids=torch.full((2, 3), 5), vocab_size=10, mask_id=MASK, special_ids=SPECIALS)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        mask_tokens(args.pop("input_ids"), **args)


def test_not_a_tensor_raises_type_error():
    with pytest.raises(TypeError, match="input_ids"):
        mask_tokens([[5, 6]], vocab_size=10, mask_id=MASK)


# --------------------------------------------------------------------------------------------------------------
# Next-sentence pairs
# --------------------------------------------------------------------------------------------------------------

def documents():
    """Three documents whose segments name their document and position."""
    return [[(d, i) for i in range(n)] for d, n in enumerate((300, 500, 200))]


def test_nsp_pairs_follow_or_come_from_another_document():
    pairs = nsp_pairs(documents(), generator=torch.Generator().manual_seed(0))
    assert len(pairs) == 299 + 499 + 199
    for a, b, label in pairs:
        if label == 0:
            assert b == (a[0], a[1] + 1), "an IsNext pair must be consecutive"
        else:
            assert label == 1 and b[0] != a[0], "a NotNext B must come from another document"
    n = len(pairs)
    share = sum(p.label for p in pairs) / n
    assert abs(share - 0.5) < binomial_tolerance(0.5, n)


def test_nsp_random_segments_are_drawn_in_proportion_to_document_size():
    pairs = nsp_pairs(documents(), random_probability=1.0, generator=torch.Generator().manual_seed(1))
    from_doc1 = [p for p in pairs if p.a[0] == 0]  # A from document 0: B from document 1 (500) or 2 (200)
    share = sum(p.b[0] == 1 for p in from_doc1) / len(from_doc1)
    assert abs(share - 5 / 7) < binomial_tolerance(5 / 7, len(from_doc1))


def test_nsp_pairs_deterministic_and_bad_inputs():
    a = nsp_pairs(documents(), generator=torch.Generator().manual_seed(2))
    b = nsp_pairs(documents(), generator=torch.Generator().manual_seed(2))
    assert a == b
    assert all(p.label == 0 for p in nsp_pairs(documents(), random_probability=0.0))
    with pytest.raises(ValueError, match="two non-empty"):
        nsp_pairs([[1, 2, 3], []])
    with pytest.raises(ValueError, match="random_probability"):
        nsp_pairs(documents(), random_probability=1.2)


# --------------------------------------------------------------------------------------------------------------
# Packing and padding, against Hugging Face tokenizers
# --------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def wordpiece():
    from tfcourse.data.shakespeare import speeches, train_wordpiece

    lines = [line for s in speeches("macbeth") for line in s.text.split("\n")]
    return train_wordpiece(lines, vocab_size=800), lines


@pytest.mark.parametrize("max_len", [5, 6, 9, 16, 64])
def test_encode_batch_equals_tokenizers_with_truncation_and_padding(wordpiece, max_len):
    from tokenizers import Tokenizer

    tokenizer, lines = wordpiece
    g = torch.Generator().manual_seed(max_len)
    first = [lines[i] for i in torch.randint(len(lines), (150,), generator=g)]
    second = [lines[i] for i in torch.randint(len(lines), (150,), generator=g)]
    peer = Tokenizer.from_str(tokenizer.to_str())  # a copy: ours must not change the tokenizer's settings
    peer.enable_truncation(max_len, strategy="longest_first")
    peer.enable_padding(pad_id=PAD, pad_token="[PAD]")
    for b in (second, None):
        ours = encode_batch(tokenizer, first, b, max_len=max_len)
        theirs = peer.encode_batch(list(zip(first, b)) if b is not None else first)
        assert isinstance(ours, BERTBatch)
        assert torch.equal(ours.input_ids, torch.tensor([e.ids for e in theirs]))
        assert torch.equal(ours.token_type_ids, torch.tensor([e.type_ids for e in theirs]))
        assert torch.equal(ours.key_padding_mask, torch.tensor([e.attention_mask for e in theirs]) == 0)
    assert tokenizer.truncation is None and tokenizer.padding is None


def test_pack_batch_layout_and_errors():
    batch = pack_batch([[10, 11, 12], [13]], [[20], [21, 22]], cls_id=CLS, sep_id=SEP, pad_id=PAD, max_len=16)
    assert batch.input_ids.tolist() == [[CLS, 10, 11, 12, SEP, 20, SEP], [CLS, 13, SEP, 21, 22, SEP, PAD]]
    assert batch.token_type_ids.tolist() == [[0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1, 0]]
    assert batch.key_padding_mask.tolist() == [[False] * 7, [False] * 6 + [True]]
    single = pack_batch([[10, 11, 12, 13]], cls_id=CLS, sep_id=SEP, pad_id=PAD, max_len=4)
    assert single.input_ids.tolist() == [[CLS, 10, 11, SEP]]
    with pytest.raises(ValueError, match="max_len"):
        pack_batch([[1]], [[2]], cls_id=CLS, sep_id=SEP, pad_id=PAD, max_len=4)
    with pytest.raises(ValueError, match="one segment per"):
        pack_batch([[1]], [[2], [3]], cls_id=CLS, sep_id=SEP, pad_id=PAD)
    with pytest.raises(ValueError, match="at least one"):
        pack_batch([], cls_id=CLS, sep_id=SEP, pad_id=PAD)
    with pytest.raises(ValueError, match="int token ids"):
        pack_batch([["a", "b"]], cls_id=CLS, sep_id=SEP, pad_id=PAD)


def test_encode_batch_bad_inputs(wordpiece):
    tokenizer, _ = wordpiece
    with pytest.raises(ValueError, match="non-empty"):
        encode_batch(tokenizer, [])
    with pytest.raises(ValueError, match="one str per text"):
        encode_batch(tokenizer, ["a", "b"], ["c"])
    from tfcourse.data.shakespeare import train_bpe

    with pytest.raises(ValueError, match=r"\[CLS\]"):
        encode_batch(train_bpe(["some text here"] * 10, vocab_size=300), ["a"])


def test_wordpiece_training_is_deterministic_across_processes():
    """Hugging Face's WordPiece trainer numbers the '##' pieces in hash-map order, which changes with the process
    (huggingface/tokenizers#1794); train_wordpiece pre-registers them so that every process learns the same
    vocabulary, which the notebooks' stored outputs depend on."""
    import subprocess
    import sys

    script = ("import hashlib, json; from tfcourse.data.shakespeare import load_text, train_wordpiece; "
              "v = train_wordpiece([load_text('macbeth'), load_text('tempest')], vocab_size=700).get_vocab(); "
              "print(hashlib.sha256(json.dumps(sorted(v.items())).encode()).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
               for _ in range(3)}
    assert len(digests) == 1, "train_wordpiece learned different vocabularies in different processes"
