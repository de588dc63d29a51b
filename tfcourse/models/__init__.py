"""Whole models, one file each, as in the book's chapters.

* :mod:`tfcourse.models.seq2seq`: the GRU encoder-decoder, without attention or with Bahdanau or Luong attention
  (chapter 2), with greedy decoding, training and evaluation helpers.
* :mod:`tfcourse.models.transformer`: the encoder-decoder Transformer, equal to :class:`torch.nn.Transformer`, and
  a translation model around it (chapter 6).
* :mod:`tfcourse.models.bert`: the encoder-only BERT, equal to Hugging Face's (the real all-MiniLM-L6-v2 weights
  included), with MLM, NSP and classification heads and ALBERT's sharing (chapter 8).
* :mod:`tfcourse.models.gpt`: the decoder-only GPT, equal to Hugging Face's GPT-2, with a KV cache, sampling,
  grouped-query attention and the prefix-LM mask (chapter 9).
* :mod:`tfcourse.models.vit`: the Vision Transformer, equal to Hugging Face's ViT, with the patch embedding, mean
  pooling, a convolutional stem, and Swin's (shifted) window attention (chapter 11).
"""

from .bert import (BERT, BERTConfig, BERTForPreTraining, BERTForSequenceClassification, BERTForTokenClassification,
                   cls_pool, mean_pool)
from .gpt import GPT, GPTConfig
from .seq2seq import ATTENTION_KINDS, Seq2Seq, Seq2SeqConfig
from .transformer import Transformer, TranslationTransformer
from .vit import ViT, ViTConfig

__all__ = ["ATTENTION_KINDS", "BERT", "BERTConfig", "BERTForPreTraining", "BERTForSequenceClassification",
           "BERTForTokenClassification", "GPT", "GPTConfig", "Seq2Seq", "Seq2SeqConfig", "Transformer",
           "TranslationTransformer", "ViT", "ViTConfig", "cls_pool", "mean_pool"]
