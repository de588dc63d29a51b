"""Whole models, one file each, as in the book's chapters.

* :mod:`tfcourse.models.seq2seq`: the GRU encoder-decoder, without attention or with Bahdanau or Luong attention
  (chapter 2), with greedy decoding, training and evaluation helpers.
"""

from .seq2seq import ATTENTION_KINDS, Seq2Seq, Seq2SeqConfig

__all__ = ["ATTENTION_KINDS", "Seq2Seq", "Seq2SeqConfig"]
