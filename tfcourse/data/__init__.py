"""Data for the book's experiments, generated or read offline (no download at run time).

* :mod:`tfcourse.data.numbers`: English number words to German or French (chapters 2, 6 and 15), with a
  tokenizer, a vocabulary and padded seq2seq batches.
"""

from .numbers import (
    GERMAN_MORPHEMES,
    LANGUAGES,
    MAX_NUMBER,
    NumberPair,
    NumberSplit,
    NumberTranslation,
    Seq2SeqBatch,
    Vocab,
    detokenize,
    make_number_pairs,
    number_to_words,
    sample_numbers,
    segment_german,
    split_numbers,
    tokenize,
)

__all__ = [
    "GERMAN_MORPHEMES",
    "LANGUAGES",
    "MAX_NUMBER",
    "NumberPair",
    "NumberSplit",
    "NumberTranslation",
    "Seq2SeqBatch",
    "Vocab",
    "detokenize",
    "make_number_pairs",
    "number_to_words",
    "sample_numbers",
    "segment_german",
    "split_numbers",
    "tokenize",
]
