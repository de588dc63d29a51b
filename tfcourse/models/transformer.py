"""The encoder-decoder Transformer (chapter 6): the core stack, equal to :class:`torch.nn.Transformer`, and a
translation model around it.

* :class:`Transformer` maps embedded sequences to decoder states: ``N`` :class:`~tfcourse.layers.EncoderLayer`
  and a final LayerNorm, ``N`` :class:`~tfcourse.layers.DecoderLayer` and a final LayerNorm, exactly as
  :class:`torch.nn.Transformer` (which puts the final LayerNorms there for Post-LN too).
  :meth:`Transformer.from_torch` copies the weights of a batch-first ``nn.Transformer``.
* :class:`TranslationTransformer` adds what a translation model needs: token embeddings scaled by
  :math:`\\sqrt{d_\\text{model}}`, sinusoidal positions (:class:`tfcourse.positional.SinusoidalPositionalEncoding`),
  dropout on their sum, a generator (the pre-softmax linear map, optionally tied to the target embedding), the
  masks built from padded batches (:class:`tfcourse.data.numbers.Seq2SeqBatch`), and decoding with
  :mod:`tfcourse.decoding` (greedy and beam search).

Masks follow :class:`torch.nn.Transformer` (and :mod:`tfcourse.layers`): a **boolean** ``*_mask`` is ``True`` where
a query may **not** attend, a float one is added to the scores; a ``*_key_padding_mask`` is ``True`` at
**padding**. :func:`padding_mask` and :func:`subsequent_mask` build them.

Shapes: ``B`` batch, ``S`` source length, ``T`` target length, ``V`` target vocabulary, ``L`` layers.
Token ids: ``pad_id`` (0), ``bos_id`` (1), ``eos_id`` (2), as in :class:`tfcourse.data.numbers.Vocab`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..attention import causal_mask, lengths_to_mask
from ..decoding import Hypotheses, beam_search, expand_for_beams, greedy_decode
from ..layers import DecoderLayer, EncoderLayer
from ..positional import SinusoidalPositionalEncoding
from .seq2seq import Translation, _check_ids, _check_lengths

if TYPE_CHECKING:
    from ..data.numbers import NumberPair, NumberTranslation, Seq2SeqBatch

__all__ = ["padding_mask", "subsequent_mask", "Transformer", "TranslationTransformer"]


# --------------------------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------------------------

def padding_mask(lengths: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
    """The ``key_padding_mask`` of a right-padded batch: ``(B, max_len)`` bool, **``True`` at padding** (positions
    ``t >= lengths[b]``), the convention of :class:`torch.nn.Transformer`; the negation of
    :func:`tfcourse.attention.lengths_to_mask`.

    Raises:
        ValueError: as :func:`~tfcourse.attention.lengths_to_mask` (not a 1-D integer tensor, lengths outside
            ``[0, max_len]``).
    """
    return ~lengths_to_mask(lengths, max_len)


def subsequent_mask(T: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The decoder's causal ``tgt_mask``: ``(T, T)`` bool, **``True`` where query ``i`` may NOT attend to key
    ``j``**, that is ``j > i`` (the future), in :class:`torch.nn.Transformer`'s convention; the negation of
    :func:`tfcourse.attention.causal_mask`. (``nn.Transformer.generate_square_subsequent_mask`` is the float
    version: ``-inf`` above the diagonal, ``0`` elsewhere.)

    Raises:
        ValueError: if ``T`` is not a positive int.

    Source: Vaswani et al. (2017), Sec. 3.2.3; the name is the Annotated Transformer's.
    """
    return ~causal_mask(T, device=device)


# --------------------------------------------------------------------------------------------------------------
# The core: encoder stack and decoder stack
# --------------------------------------------------------------------------------------------------------------

def _check_layers(**counts: int) -> None:
    for name, n in counts.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be a positive int, got {n!r}")


class Transformer(nn.Module):
    r"""The encoder-decoder Transformer on embedded sequences, the mapping of :class:`torch.nn.Transformer`.

    .. math:: \mathbf m = \mathrm{LN}(\mathrm{Enc}_N \circ \dots \circ \mathrm{Enc}_1(\mathbf x)), \qquad
              \mathbf y = \mathrm{LN}(\mathrm{Dec}_N(\dots \mathrm{Dec}_1(\mathbf z, \mathbf m) \dots, \mathbf m))

    Every decoder layer attends to the same memory :math:`\mathbf m`, the output of the whole encoder stack.

    Args:
        d_model, n_heads, d_ff, dropout, activation, norm_first, layer_norm_eps, bias: as
            :class:`tfcourse.layers.EncoderLayer` (defaults: the paper's base model, Table 3).
        num_encoder_layers, num_decoder_layers: ``N`` of each stack (6 in the paper).

    Submodules: ``encoder_layers`` and ``decoder_layers`` (:class:`torch.nn.ModuleList`), ``encoder_norm`` and
    ``decoder_norm`` (:class:`torch.nn.LayerNorm`, after the last layer of each stack, whether Post-LN or Pre-LN,
    as in torch). Matrices are initialised Xavier-uniform, as ``nn.Transformer._reset_parameters`` does.

    Methods (masks in torch's convention, see the module docstring):

    * ``encode(src (B, S, d_model), src_mask=None, src_key_padding_mask=None, src_is_causal=False)
      -> memory (B, S, d_model)``;
    * ``decode(tgt (B, T, d_model), memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
      memory_key_padding_mask=None, tgt_is_causal=False, need_weights=False) -> (B, T, d_model)``, or with
      ``need_weights`` ``(output, cross_weights)``, the cross-attention weights of every layer and head
      ``(L, B, n_heads, T, S)``;
    * ``forward(src, tgt, src_mask=None, tgt_mask=None, memory_mask=None, src_key_padding_mask=None,
      tgt_key_padding_mask=None, memory_key_padding_mask=None, src_is_causal=False, tgt_is_causal=False)
      -> (B, T, d_model)``, ``decode(tgt, encode(src))``.

    Differences from :class:`torch.nn.Transformer`: always batch-first; ``tgt_is_causal=True`` builds the causal
    mask itself (torch reads it only as a hint about ``tgt_mask``); no custom encoder or decoder; no nested-tensor
    fast path (torch's, in evaluation mode with a ``src_key_padding_mask``, returns zeros at the padded positions
    of the memory, which no decoder output depends on).

    Raises:
        ValueError: for non-positive sizes or layer counts, ``d_model % n_heads != 0``, an unknown activation, or
            inputs and masks of the wrong shape or dtype (from the layers, naming the argument).

    Source: Vaswani et al. (2017), Sec. 3.1 and Fig. 1; Pre-LN: Xiong et al. (2020).
    """

    def __init__(self, d_model: int = 512, n_heads: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, d_ff: int = 2048, dropout: float = 0.1, activation: str = "relu",
                 norm_first: bool = False, layer_norm_eps: float = 1e-5, bias: bool = True):
        super().__init__()
        _check_layers(num_encoder_layers=num_encoder_layers, num_decoder_layers=num_decoder_layers)
        layer_args = dict(d_model=d_model, n_heads=n_heads, d_ff=d_ff, dropout=dropout, activation=activation,
                          norm_first=norm_first, layer_norm_eps=layer_norm_eps, bias=bias)
        self.d_model, self.n_heads, self.norm_first = d_model, n_heads, norm_first
        self.encoder_layers = nn.ModuleList(EncoderLayer(**layer_args) for _ in range(num_encoder_layers))
        self.encoder_norm = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias)
        self.decoder_layers = nn.ModuleList(DecoderLayer(**layer_args) for _ in range(num_decoder_layers))
        self.decoder_norm = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias)
        for p in self.parameters():  # as torch.nn.Transformer._reset_parameters
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    @classmethod
    def from_torch(cls, module: nn.Transformer) -> Transformer:
        """A :class:`Transformer` with the weights (copies), sizes, dtype, device and training mode of a
        :class:`torch.nn.Transformer`.

        Raises:
            TypeError: if ``module`` is not a :class:`torch.nn.Transformer`, or has a custom encoder or decoder
                (anything but ``nn.TransformerEncoder``/``nn.TransformerDecoder`` with a final LayerNorm).
            ValueError: if it was built with ``batch_first=False`` (our model is batch-first), or with an
                activation other than relu/gelu.
        """
        if not isinstance(module, nn.Transformer):
            raise TypeError(f"module must be a torch.nn.Transformer, got {type(module).__name__}")
        enc, dec = module.encoder, module.decoder
        if not (isinstance(enc, nn.TransformerEncoder) and isinstance(dec, nn.TransformerDecoder)
                and isinstance(enc.norm, nn.LayerNorm) and isinstance(dec.norm, nn.LayerNorm)):
            raise TypeError("module: only the standard encoder and decoder (with their final LayerNorms) are "
                            "supported, not a custom_encoder or custom_decoder")
        if not module.batch_first:
            raise ValueError("module: batch_first must be True (our model is batch-first: (B, T, d_model)); "
                             "build it with nn.Transformer(..., batch_first=True)")
        layer = enc.layers[0]
        weight = layer.linear1.weight
        ours = cls(d_model=module.d_model, n_heads=module.nhead, num_encoder_layers=len(enc.layers),
                   num_decoder_layers=len(dec.layers), d_ff=layer.linear1.out_features, dropout=layer.dropout.p,
                   norm_first=layer.norm_first, layer_norm_eps=enc.norm.eps,
                   bias=layer.linear1.bias is not None).to(device=weight.device, dtype=weight.dtype)
        ours.encoder_layers = nn.ModuleList(EncoderLayer.from_torch(t) for t in enc.layers)
        ours.decoder_layers = nn.ModuleList(DecoderLayer.from_torch(t) for t in dec.layers)
        with torch.no_grad():
            for mine, theirs in ((ours.encoder_norm, enc.norm), (ours.decoder_norm, dec.norm)):
                mine.weight.copy_(theirs.weight)
                if mine.bias is not None:
                    mine.bias.copy_(theirs.bias)
        return ours.train(module.training)

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor | None = None,
               src_key_padding_mask: torch.Tensor | None = None, src_is_causal: bool = False) -> torch.Tensor:
        x = src
        for layer in self.encoder_layers:
            x = layer(x, src_mask=src_mask, src_key_padding_mask=src_key_padding_mask, is_causal=src_is_causal)
        return self.encoder_norm(x)  # (B, S, d_model)

    def decode(self, tgt: torch.Tensor, memory: torch.Tensor, tgt_mask: torch.Tensor | None = None,
               memory_mask: torch.Tensor | None = None, tgt_key_padding_mask: torch.Tensor | None = None,
               memory_key_padding_mask: torch.Tensor | None = None, tgt_is_causal: bool = False,
               need_weights: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x, weights = tgt, []
        for layer in self.decoder_layers:
            out = layer(x, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                        tgt_key_padding_mask=tgt_key_padding_mask, memory_key_padding_mask=memory_key_padding_mask,
                        tgt_is_causal=tgt_is_causal, need_weights=need_weights)
            if need_weights:
                x, w = out
                weights.append(w)  # (B, n_heads, T, S)
            else:
                x = out
        x = self.decoder_norm(x)  # (B, T, d_model)
        return (x, torch.stack(weights)) if need_weights else x  # (L, B, n_heads, T, S)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, src_mask: torch.Tensor | None = None,
                tgt_mask: torch.Tensor | None = None, memory_mask: torch.Tensor | None = None,
                src_key_padding_mask: torch.Tensor | None = None, tgt_key_padding_mask: torch.Tensor | None = None,
                memory_key_padding_mask: torch.Tensor | None = None, src_is_causal: bool = False,
                tgt_is_causal: bool = False) -> torch.Tensor:
        memory = self.encode(src, src_mask, src_key_padding_mask, src_is_causal)
        return self.decode(tgt, memory, tgt_mask, memory_mask, tgt_key_padding_mask, memory_key_padding_mask,
                           tgt_is_causal)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, num_encoder_layers={len(self.encoder_layers)}, "
                f"num_decoder_layers={len(self.decoder_layers)}, norm_first={self.norm_first}")


# --------------------------------------------------------------------------------------------------------------
# A translation model
# --------------------------------------------------------------------------------------------------------------

class TranslationTransformer(nn.Module):
    r"""A Transformer for translation: token ids in, next-token logits out.

    .. math:: \mathbf x = \mathrm{Dropout}(\sqrt{d_\text{model}}\, E_\text{src}[\text{src}] + \mathrm{PE}), \quad
              \mathbf z = \mathrm{Dropout}(\sqrt{d_\text{model}}\, E_\text{tgt}[\text{tgt\_in}] + \mathrm{PE}),
              \quad \text{logits} = W_\text{gen}\, \mathrm{Transformer}(\mathbf x, \mathbf z) + b_\text{gen}

    Args:
        src_vocab_size, tgt_vocab_size: vocabulary sizes (special tokens included).
        d_model, n_heads, num_encoder_layers, num_decoder_layers, d_ff, dropout, activation, norm_first,
            layer_norm_eps: as :class:`Transformer`. ``dropout`` also applies to the embedded inputs (Sec. 5.4).
        max_len: positions precomputed for the sinusoidal encoding (longer inputs are computed on the fly).
        pad_id, bos_id, eos_id: the special ids (those of :class:`tfcourse.data.numbers.Vocab` by default).
        tie_embeddings: share the target embedding matrix with the generator's weight (Press and Wolf, 2017; the
            paper also shares the source embedding, which needs a joint vocabulary: not here).

    Parameters: ``src_embedding``, ``tgt_embedding`` (``nn.Embedding``, initialised :math:`\mathcal N(0,
    d_\text{model}^{-1})` so that the scaled embeddings have unit variance, like the encodings they are added to;
    the ``pad_id`` row is zero), ``positional`` (no parameters), ``transformer`` (:class:`Transformer`),
    ``generator`` (``nn.Linear(d_model, V)``).

    Main methods:

    * ``forward(src (B, S), src_lengths (B,), tgt_in (B, T), tgt_lengths=None) -> logits (B, T, V)`` (teacher
      forcing: the decoder reads ``tgt_in = <bos> y_1 ... y_{T-1}`` and row ``t`` predicts ``tgt_out[:, t]``);
      ``forward_batch(batch)`` does the same on a :class:`tfcourse.data.numbers.Seq2SeqBatch`;
    * ``encode(src, src_lengths) -> (memory (B, S, d_model), src_key_padding_mask (B, S))``;
    * ``decode(tgt_in, memory, src_key_padding_mask, tgt_lengths=None, need_weights=False) -> logits`` (and the
      cross-attention weights ``(L, B, n_heads, T, S)`` with ``need_weights``);
    * ``log_probs_fn(src, src_lengths, beam_size=1)``: the function :mod:`tfcourse.decoding` calls;
    * ``generate(src, src_lengths, max_len=50, beam_size=1, length_penalty=0.0) -> Hypotheses``: greedy search
      (``beam_size=1``) or beam search;
    * ``translate(task, pairs, ...) -> Translation``: decode and detokenize pairs of a number task.

    The decoder is causal: position ``t`` of the output never depends on the target tokens after ``t``, which is
    what makes training on whole shifted sequences (teacher forcing) equal to decoding one token at a time.

    Raises:
        ValueError: for bad sizes or clashing special ids, and in the methods for ids outside the vocabularies,
            lengths outside ``[1, S]`` and mismatched batch sizes.

    Sources: Vaswani et al. (2017), Secs. 3.4 (embeddings scaled by :math:`\sqrt{d_\text{model}}`, shared
    weights), 3.5 (positional encoding), 5.4 (dropout on the embedded sums).
    """

    def __init__(self, src_vocab_size: int, tgt_vocab_size: int, d_model: int = 512, n_heads: int = 8,
                 num_encoder_layers: int = 6, num_decoder_layers: int = 6, d_ff: int = 2048, dropout: float = 0.1,
                 activation: str = "relu", norm_first: bool = False, layer_norm_eps: float = 1e-5,
                 max_len: int = 512, pad_id: int = 0, bos_id: int = 1, eos_id: int = 2,
                 tie_embeddings: bool = True):
        super().__init__()
        _check_layers(src_vocab_size=src_vocab_size, tgt_vocab_size=tgt_vocab_size)
        specials = (pad_id, bos_id, eos_id)
        if len(set(specials)) != 3 or min(specials) < 0 or max(specials) >= min(src_vocab_size, tgt_vocab_size):
            raise ValueError(f"pad_id, bos_id, eos_id must be distinct ids inside both vocabularies, got {specials}")
        self.src_vocab_size, self.tgt_vocab_size, self.d_model = src_vocab_size, tgt_vocab_size, d_model
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
        self.tie_embeddings = tie_embeddings
        self.transformer = Transformer(d_model, n_heads, num_encoder_layers, num_decoder_layers, d_ff, dropout,
                                       activation, norm_first, layer_norm_eps)
        self.src_embedding = nn.Embedding(src_vocab_size, d_model, padding_idx=pad_id)
        self.tgt_embedding = nn.Embedding(tgt_vocab_size, d_model, padding_idx=pad_id)
        self.positional = SinusoidalPositionalEncoding(d_model, max_len)
        self.dropout = nn.Dropout(dropout)
        self.generator = nn.Linear(d_model, tgt_vocab_size)
        with torch.no_grad():
            for embedding in (self.src_embedding, self.tgt_embedding):
                nn.init.normal_(embedding.weight, std=d_model ** -0.5)
                embedding.weight[pad_id].zero_()
            nn.init.zeros_(self.generator.bias)
        if tie_embeddings:
            self.generator.weight = self.tgt_embedding.weight

    # ------------------------------------------------------------------------------------------------ the pieces

    def embed(self, ids: torch.Tensor, embedding: nn.Embedding) -> torch.Tensor:
        """``(B, L)`` ids -> ``Dropout(sqrt(d_model) * E[ids] + PE)`` ``(B, L, d_model)``."""
        x = embedding(ids) * math.sqrt(self.d_model)  # (B, L, d_model)
        return self.dropout(self.positional(x))

    def encode(self, src: torch.Tensor, src_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder: ``src`` ``(B, S)`` int64, ``src_lengths`` ``(B,)`` -> ``memory`` ``(B, S, d_model)`` and
        ``src_key_padding_mask`` ``(B, S)`` (``True`` at padding), which every cross-attention must use."""
        _check_ids("src", src, self.src_vocab_size, "(B, S)")
        _check_lengths("src_lengths", src_lengths, src)
        key_padding = padding_mask(src_lengths, src.shape[1])  # (B, S), True = padding
        memory = self.transformer.encode(self.embed(src, self.src_embedding), src_key_padding_mask=key_padding)
        return memory, key_padding

    def decode(self, tgt_in: torch.Tensor, memory: torch.Tensor, src_key_padding_mask: torch.Tensor,
               tgt_lengths: torch.Tensor | None = None,
               need_weights: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The causal decoder and the generator: ``tgt_in`` ``(B, T)`` int64 -> logits ``(B, T, V)`` (and the
        cross-attention weights ``(L, B, n_heads, T, S)`` with ``need_weights``).

        ``tgt_lengths`` ``(B,)`` masks the padded target positions as keys; with right padding and the causal mask
        it changes no output at a real position (those never see later keys), so it may be left out.
        """
        _check_ids("tgt_in", tgt_in, self.tgt_vocab_size, "(B, T)")
        if memory.shape[0] != tgt_in.shape[0]:
            raise ValueError(f"tgt_in must have the batch size of memory ({memory.shape[0]}), got shape "
                             f"{tuple(tgt_in.shape)}")
        tgt_padding = None
        if tgt_lengths is not None:
            _check_lengths("tgt_lengths", tgt_lengths, tgt_in)
            tgt_padding = padding_mask(tgt_lengths, tgt_in.shape[1])
        out = self.transformer.decode(self.embed(tgt_in, self.tgt_embedding), memory, tgt_is_causal=True,
                                      tgt_key_padding_mask=tgt_padding,
                                      memory_key_padding_mask=src_key_padding_mask, need_weights=need_weights)
        if need_weights:
            hidden, weights = out
            return self.generator(hidden), weights  # (B, T, V), (L, B, n_heads, T, S)
        return self.generator(out)  # (B, T, V)

    def forward(self, src: torch.Tensor, src_lengths: torch.Tensor, tgt_in: torch.Tensor,
                tgt_lengths: torch.Tensor | None = None) -> torch.Tensor:
        memory, key_padding = self.encode(src, src_lengths)
        return self.decode(tgt_in, memory, key_padding, tgt_lengths)

    def forward_batch(self, batch: Seq2SeqBatch) -> torch.Tensor:
        """``forward`` on a :class:`tfcourse.data.numbers.Seq2SeqBatch`: logits ``(B, T, V)`` for ``batch.tgt_out``."""
        return self(batch.src, batch.src_lengths, batch.tgt_in, batch.tgt_lengths)

    # ------------------------------------------------------------------------------------------------- decoding

    def log_probs_fn(self, src: torch.Tensor, src_lengths: torch.Tensor, beam_size: int = 1):
        """Encode ``src`` once and return ``fn(prefix (B * beam_size, t)) -> (B * beam_size, V)``, the
        next-token log-probabilities that :func:`tfcourse.decoding.greedy_decode` and
        :func:`~tfcourse.decoding.beam_search` call: the memory and its padding mask are repeated ``beam_size``
        times (:func:`~tfcourse.decoding.expand_for_beams`), so row ``n`` reads source ``n // beam_size``.
        Each call decodes the whole prefix again (no key/value cache: simple, and cheap for short outputs). Call
        ``model.eval()`` first (as :meth:`generate` does), or dropout will be on."""
        with torch.no_grad():
            memory, key_padding = self.encode(src, src_lengths)
        memory, key_padding = expand_for_beams(memory, beam_size), expand_for_beams(key_padding, beam_size)

        @torch.no_grad()
        def fn(prefix: torch.Tensor) -> torch.Tensor:
            return torch.log_softmax(self.decode(prefix, memory, key_padding)[:, -1].float(), dim=-1)  # (N, V)

        return fn

    @torch.no_grad()
    def generate(self, src: torch.Tensor, src_lengths: torch.Tensor, max_len: int = 50, beam_size: int = 1,
                 length_penalty: float = 0.0) -> Hypotheses:
        """Translate a batch: greedy search for ``beam_size=1`` (and ``length_penalty=0``), beam search otherwise.

        Returns:
            :class:`tfcourse.decoding.Hypotheses`: ``tokens`` ``(B, T')`` ending with ``<eos>`` then ``pad_id``,
            their lengths, log-probabilities and scores.

        Raises:
            ValueError: as :meth:`encode` and :func:`tfcourse.decoding.beam_search`.
        """
        was_training = self.training
        self.eval()
        try:
            ids = dict(bos_id=self.bos_id, eos_id=self.eos_id, pad_id=self.pad_id, device=src.device)
            if beam_size == 1 and length_penalty == 0.0:
                return greedy_decode(self.log_probs_fn(src, src_lengths), src.shape[0], max_len, **ids)
            return beam_search(self.log_probs_fn(src, src_lengths, beam_size), src.shape[0], beam_size, max_len,
                               length_penalty=length_penalty, **ids)
        finally:
            self.train(was_training)

    def translate(self, task: NumberTranslation, pairs: Sequence[NumberPair], beam_size: int = 1,
                  length_penalty: float = 0.0, max_len: int = 40, batch_size: int = 500) -> Translation:
        """Decode the sources of ``pairs`` (in batches) and detokenize them, like
        :func:`tfcourse.models.seq2seq.translate` does for the RNN (whose ``Translation`` it returns, with
        ``attention=None``: see :meth:`decode` with ``need_weights`` for the cross-attention).

        Raises:
            ValueError: if a token of a pair is not in the task's vocabularies.
        """
        device = next(self.parameters()).device
        predictions, tokens = [], []
        for start in range(0, len(pairs), batch_size):
            batch = task.batch(pairs[start:start + batch_size]).to(device)
            hyp = self.generate(batch.src, batch.src_lengths, max_len, beam_size, length_penalty)
            for row in hyp.tokens:
                tokens.append(task.tgt_vocab.decode(row))
                predictions.append(task.decode_target(row))
        return Translation(predictions, tokens, None)

    def extra_repr(self) -> str:
        return (f"src_vocab_size={self.src_vocab_size}, tgt_vocab_size={self.tgt_vocab_size}, "
                f"tie_embeddings={self.tie_embeddings}")
