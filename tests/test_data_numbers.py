"""tfcourse.data.numbers: number words from num2words, splits, the tokenizer, the vocabulary and the batches."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from num2words import num2words

from tfcourse.data.numbers import (
    GERMAN_MORPHEMES,
    MAX_NUMBER,
    NumberPair,
    NumberSplit,
    NumberTranslation,
    Vocab,
    detokenize,
    make_number_pairs,
    number_to_words,
    sample_numbers,
    segment_german,
    split_numbers,
    tokenize,
)

# All numbers below 2000 and a seeded sample of the rest: every construction that num2words uses below a million.
COVERAGE = list(range(2000)) + random.Random(0).sample(range(2000, MAX_NUMBER + 1), 1500)


# ------------------------------------------------------------------------------------------------ number words

def test_number_to_words_is_num2words():
    for n in (0, 7, 21, 80, 97, 354, 1999, 21021, MAX_NUMBER):
        for lang in ("en", "de", "fr"):
            assert number_to_words(n, lang) == num2words(n, lang=lang)
    assert number_to_words(21, "de") == "einundzwanzig"
    assert number_to_words(97, "fr") == "quatre-vingt-dix-sept"


@pytest.mark.parametrize("n", [-1, MAX_NUMBER + 1, 3.0, True, "7", None])
def test_number_to_words_rejects_bad_numbers(n):
    with pytest.raises(ValueError, match="n must be an int"):
        number_to_words(n, "de")


def test_number_to_words_rejects_bad_languages():
    with pytest.raises(ValueError, match="lang must be one of"):
        number_to_words(3, "es")


def test_make_number_pairs_keeps_the_order_and_checks_its_arguments():
    pairs = make_number_pairs("de", [354, 21, 7])
    assert pairs == [NumberPair(354, "three hundred and fifty-four", "dreihundertvierundfünfzig"),
                     NumberPair(21, "twenty-one", "einundzwanzig"), NumberPair(7, "seven", "sieben")]
    assert make_number_pairs("en", [80], src_lang="fr") == [NumberPair(80, "quatre-vingts", "eighty")]
    with pytest.raises(ValueError, match="must differ"):
        make_number_pairs("en", [1])
    with pytest.raises(ValueError, match="numbers"):
        make_number_pairs("de", [1, -5])


# ----------------------------------------------------------------------------------------------------- samples

def test_sample_numbers_is_reproducible_distinct_sorted_and_in_range():
    a = sample_numbers(500, high=99_999, low=10, seed=3)
    assert a == sample_numbers(500, high=99_999, low=10, seed=3)
    assert a != sample_numbers(500, high=99_999, low=10, seed=4)
    assert len(a) == len(set(a)) == 500 and a == sorted(a) and min(a) >= 10 and max(a) <= 99_999


def test_sample_numbers_gives_each_number_of_digits_its_share():
    numbers = sample_numbers(4000, high=MAX_NUMBER, seed=0)
    counts = [sum(len(str(n)) == d for n in numbers) for d in range(1, 7)]
    # the bands of 1, 2 and 3 digits are too small for a sixth of 4000: all their numbers are taken, and the
    # three larger bands share the rest equally
    assert counts[:3] == [9, 90, 900]
    assert max(counts[3:]) - min(counts[3:]) <= 1 and sum(counts) == 4000
    uniform = sample_numbers(4000, high=MAX_NUMBER, seed=0, by_digits=False)
    assert sum(n < 1000 for n in uniform) < 20  # why by_digits is the default


def test_sample_numbers_can_take_everything():
    assert sample_numbers(100, high=99, low=0) == list(range(100))


@pytest.mark.parametrize("kwargs", [dict(count=11, high=10, low=1), dict(count=-1), dict(count=5, high=3, low=4),
                                    dict(count=5, high=MAX_NUMBER + 1), dict(count=2.0)])
def test_sample_numbers_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        sample_numbers(**kwargs)


# ------------------------------------------------------------------------------------------------------ splits

def test_split_numbers_is_a_seeded_partition():
    numbers = list(range(1, 1001))
    split = split_numbers(numbers, (0.7, 0.1, 0.2), seed=1)
    assert isinstance(split, NumberSplit)
    assert (len(split.train), len(split.valid), len(split.test)) == (700, 100, 200)
    assert sorted(split.train + split.valid + split.test) == numbers
    assert not set(split.train) & set(split.test) and not set(split.valid) & set(split.test)
    assert split == split_numbers(reversed(numbers), (0.7, 0.1, 0.2), seed=1), "must not depend on the input order"
    assert split != split_numbers(numbers, (0.7, 0.1, 0.2), seed=2)
    assert all(part == sorted(part) for part in split)


@pytest.mark.parametrize("numbers,fractions,match", [
    ([1, 2, 2], (0.8, 0.1, 0.1), "distinct"),
    ([1, 2, 3], (0.8, 0.3, 0.1), "sum to 1"),
    ([1, 2, 3], (0.5, 0.5), "three"),
    ([1, 2, 3], (1.2, -0.1, -0.1), "non-negative"),
    ([1, -2], (0.8, 0.1, 0.1), "numbers"),
])
def test_split_numbers_rejects_bad_arguments(numbers, fractions, match):
    with pytest.raises(ValueError, match=match):
        split_numbers(numbers, fractions)


# ------------------------------------------------------------------------------------------------ tokenization

def test_german_morphemes_are_the_words_num2words_uses():
    # the inventory is derived from num2words: the numbers 0-19 and the tens are single morphemes ...
    for n in [*range(20), *range(20, 100, 10)]:
        assert num2words(n, lang="de") in GERMAN_MORPHEMES
    assert len(set(GERMAN_MORPHEMES)) == len(GERMAN_MORPHEMES) == 32
    # ... and every morpheme is used by some number (the inventory has nothing extra).
    used = {m for n in COVERAGE for m in segment_german(num2words(n, lang="de"))}
    assert used == set(GERMAN_MORPHEMES)


def test_every_german_number_word_segments_completely():
    for n in COVERAGE:
        word = num2words(n, lang="de")
        pieces = segment_german(word)
        assert "".join(pieces) == word and all(p in GERMAN_MORPHEMES for p in pieces)


def test_german_segmentation_examples():
    assert segment_german("einundzwanzig") == ["ein", "und", "zwanzig"]
    assert segment_german("dreihundertvierundfünfzig") == ["drei", "hundert", "vier", "und", "fünfzig"]
    assert segment_german("siebzehntausendsiebenundsiebzig") == ["siebzehn", "tausend", "sieben", "und", "siebzig"]
    assert segment_german("einhunderteins") == ["ein", "hundert", "eins"]
    # the teens are one morpheme, as they are one English word
    assert segment_german("sechzehn") == ["sechzehn"] and segment_german("sechsundsechzig") == ["sechs", "und",
                                                                                                 "sechzig"]


@pytest.mark.parametrize("word", ["Million", "zweiundzwanzigste", "hallo", ""])
def test_german_segmentation_rejects_other_words(word):
    with pytest.raises(ValueError, match="cannot segment"):
        segment_german(word)


def test_tokenize_examples():
    assert tokenize("twenty-one", "en") == ["twenty", "-", "one"]
    assert tokenize("one thousand, two hundred", "en") == ["one", "thousand", ",", "two", "hundred"]
    assert tokenize("quatre-vingt-dix-sept", "fr") == ["quatre", "-", "vingt", "-", "dix", "-", "sept"]
    assert tokenize("vingt et un", "fr") == ["vingt", "et", "un"]
    assert tokenize("einundzwanzig", "de") == ["ein", "und", "zwanzig"]


@settings(max_examples=150, deadline=None)
@given(n=st.integers(0, MAX_NUMBER), lang=st.sampled_from(["en", "de", "fr"]))
def test_detokenize_inverts_tokenize(n, lang):
    text = number_to_words(n, lang)
    tokens = tokenize(text, lang)
    assert detokenize(tokens, lang) == text
    assert all(t and " " not in t for t in tokens)


def test_tokenize_rejects_bad_input():
    with pytest.raises(ValueError, match="empty"):
        tokenize("  ", "en")
    with pytest.raises(TypeError):
        tokenize(21, "en")
    with pytest.raises(ValueError, match="lang"):
        tokenize("one", "xx")


# ------------------------------------------------------------------------------------------------------- Vocab

def test_vocab_encode_decode_and_specials():
    vocab = Vocab(["drei", "hundert", "und"])
    assert (vocab.pad_id, vocab.bos_id, vocab.eos_id) == (0, 1, 2) and len(vocab) == 6
    assert vocab.itos[:3] == ["<pad>", "<bos>", "<eos>"]
    ids = vocab.encode(["drei", "hundert"], bos=True)
    assert ids == [1, 3, 4, 2]
    assert vocab.decode(ids) == ["drei", "hundert"]
    assert vocab.decode([3, 2, 5, 5]) == ["drei"], "decoding stops at the first <eos>"
    assert vocab.decode(torch.tensor([1, 5, 0, 0])) == ["und"], "<bos> and <pad> are skipped"
    assert "und" in vocab and "vier" not in vocab


def test_vocab_build_is_sorted_and_independent_of_order():
    a = Vocab.build([["b", "a"], ["c", "a"]])
    assert a.itos[3:] == ["a", "b", "c"]
    assert Vocab.build([["c", "a"], ["b", "a"]]).itos == a.itos


def test_vocab_pad():
    vocab = Vocab(["x", "y"])
    ids, lengths = vocab.pad([[3, 4, 2], [4, 2]])
    assert ids.tolist() == [[3, 4, 2], [4, 2, 0]] and lengths.tolist() == [3, 2]
    assert ids.dtype == lengths.dtype == torch.long
    assert vocab.pad([[3]], length=4)[0].tolist() == [[3, 0, 0, 0]]


@pytest.mark.parametrize("call,match", [
    (lambda v: v.encode(["z"]), "not in the vocabulary"),
    (lambda v: v.encode(["<eos>"]), "not in the vocabulary"),
    (lambda v: v.decode([7]), "outside the vocabulary"),
    (lambda v: v.decode(torch.zeros(2, 2, dtype=torch.long)), "1-D"),
    (lambda v: v.pad([]), "must not be empty"),
    (lambda v: v.pad([[3], []]), "at least one"),
    (lambda v: v.pad([[3, 4, 2]], length=2), "does not fit"),
    (lambda v: Vocab(["x", "x"]), "distinct"),
    (lambda v: Vocab(["<pad>"]), "other than"),
])
def test_vocab_rejects_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call(Vocab(["x", "y"]))


# ------------------------------------------------------------------------------------------- NumberTranslation

@pytest.fixture(scope="module")
def task():
    return NumberTranslation.from_numbers("de", sample_numbers(600, high=99_999, seed=0), (0.8, 0.1, 0.1), seed=0)


def test_task_splits_and_vocabularies(task):
    assert (len(task.train), len(task.valid), len(task.test)) == (480, 60, 60)
    numbers = [{p.number for p in s} for s in (task.train, task.valid, task.test)]
    assert not numbers[0] & numbers[2] and not numbers[0] & numbers[1]
    assert all(p.target == num2words(p.number, lang="de") for p in task.test)
    # the vocabularies come from the training pairs
    assert set(task.tgt_vocab.itos[3:]) == {t for p in task.train for t in tokenize(p.target, "de")}
    assert set(task.src_vocab.itos[3:]) == {t for p in task.train for t in tokenize(p.source, "en")}
    assert "NumberTranslation(en->de" in repr(task)


def test_task_batch_is_teacher_forcing_ready(task):
    pairs = task.test[:7]
    batch = task.batch(pairs)
    B = len(pairs)
    assert batch.src.shape[0] == batch.tgt_in.shape[0] == B and batch.tgt_in.shape == batch.tgt_out.shape
    for i, p in enumerate(pairs):
        n_src, n_tgt = task.source_length(p), len(tokenize(p.target, "de"))
        assert batch.src_lengths[i] == n_src + 1 and batch.tgt_lengths[i] == n_tgt + 1  # + <eos>
        assert batch.src[i, n_src] == task.src_vocab.eos_id and (batch.src[i, n_src + 1:] == 0).all()
        assert batch.tgt_in[i, 0] == task.tgt_vocab.bos_id
        # the decoder input is the target shifted right by one
        assert torch.equal(batch.tgt_in[i, 1:n_tgt + 1], batch.tgt_out[i, :n_tgt])
        assert batch.tgt_out[i, n_tgt] == task.tgt_vocab.eos_id
        assert task.decode_target(batch.tgt_out[i]) == p.target
        assert detokenize(batch.src_tokens[i], "en") == p.source
    assert batch.to("cpu").src.data_ptr() == batch.src.data_ptr() and len(batch) == B


def test_task_rejects_overlap_and_unseen_tokens():
    with pytest.raises(ValueError, match="disjoint"):
        NumberTranslation("de", NumberSplit([1, 2, 3], [3], [4]))
    with pytest.raises(ValueError, match="no training pair has"):
        NumberTranslation("de", NumberSplit([1, 2, 3], [], [90]))  # "neunzig" is never seen in training
    with pytest.raises(ValueError, match="must not be empty"):
        NumberTranslation("de", NumberSplit([], [1], [2]))
    with pytest.raises(ValueError, match="must not be empty"):
        NumberTranslation("de", NumberSplit([1, 2], [], [])).batch([])
