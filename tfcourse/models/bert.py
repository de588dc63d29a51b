"""BERT, the encoder-only Transformer (chapter 8): embeddings, a Post-LN encoder, the pooler, and the heads of
pre-training (masked language modelling, next-sentence prediction) and fine-tuning (sequence and token
classification), with ALBERT's two parameter savings as options.

* :class:`BERTConfig`: the sizes; the defaults are BERT-base (Devlin et al. 2019, Sec. 3: L = 12, H = 768, A = 12).
  ``share_layers`` (one layer applied ``n_layers`` times) and ``d_embedding`` (embeddings of a smaller width
  ``E``, projected to ``d_model``) are ALBERT's cross-layer sharing and factorised embeddings (Lan et al. 2020,
  Sec. 3.1). :meth:`BERTConfig.num_parameters` counts the parameters from the sizes alone.
* :class:`BERT`: ``LayerNorm(word + position + token type)`` embeddings, ``n_layers`` Post-LN
  :class:`tfcourse.layers.EncoderLayer` (GELU, LayerNorm eps 1e-12, as BERT's) and the pooler
  ``tanh(W h_[CLS] + b)``. :meth:`BERT.from_hf` copies the weights of a Hugging Face ``BertModel`` (or of an
  ``AlbertModel``), for example the real all-MiniLM-L6-v2.
* :func:`cls_pool`, :func:`mean_pool`: one vector per sequence, from the ``[CLS]`` position or the mean over the
  real (non-padding) tokens.
* Heads: :class:`MLMHead` (tied to the word embeddings), :class:`BERTForPreTraining` (MLM + NSP),
  :class:`BERTForSequenceClassification` (``[CLS]`` or mean pooling), :class:`BERTForTokenClassification`; each
  has a ``from_hf`` for its Hugging Face counterpart.

Masks: ``key_padding_mask`` is ``(B, T)`` bool, **``True`` at padding** (torch's convention, as in
:mod:`tfcourse.layers`); Hugging Face's ``attention_mask`` is the opposite (1 = real token): pass
``key_padding_mask = attention_mask == 0``. A sequence that is all padding gives finite outputs, never NaN.

Shapes: ``B`` batch, ``T`` length, ``V`` vocabulary, ``d_model`` the hidden size (Hugging Face's ``hidden_size``),
``E`` the embedding width (``d_embedding``, ALBERT's ``embedding_size``). Token ids are ``torch.long``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import DtypeError, check_floating, check_tensor
from ..layers import EncoderLayer
from ..positional import LearnedPositionalEmbedding
from ..training import label_smoothed_cross_entropy
from .._checks import check_int as _check_int, check_probability as _check_probability

__all__ = ["BERTConfig", "BERTEmbeddings", "BERTOutput", "BERT", "cls_pool", "mean_pool", "MLMHead",
           "PreTrainingOutput", "BERTForPreTraining", "BERTForSequenceClassification", "BERTForTokenClassification",
           "POOLINGS"]

#: The pooling methods of :class:`BERTForSequenceClassification`.
POOLINGS = ("cls", "mean")


# --------------------------------------------------------------------------------------------------------------
# The configuration
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BERTConfig:
    """The sizes of a BERT (or ALBERT) model. The defaults are BERT-base, uncased (110 M parameters).

    Attributes:
        vocab_size: ``V``, the number of token ids (30522 for BERT's uncased WordPiece vocabulary).
        d_model: the hidden size ``H`` (Hugging Face: ``hidden_size``).
        n_layers: the number of encoder layers ``L``.
        n_heads: the number of attention heads ``A`` (must divide ``d_model``).
        d_ff: the feed-forward hidden size (``4 H`` in BERT; Hugging Face: ``intermediate_size``).
        max_len: the number of learned positions (Hugging Face: ``max_position_embeddings``).
        type_vocab_size: the number of segment (token type) ids: 2, sentence A and sentence B.
        dropout: dropout on the embeddings and on each sublayer's output (``hidden_dropout_prob``).
        attention_dropout: dropout on the attention weights (``attention_probs_dropout_prob``).
        layer_norm_eps: the LayerNorm epsilon (1e-12 in BERT, where torch's default is 1e-5).
        pad_id: the id of ``[PAD]`` (its embedding row starts at zero and gets no gradient).
        d_embedding: ``None`` for BERT (embeddings of width ``d_model``); an int ``E`` for ALBERT's factorised
            embeddings: the embeddings have width ``E`` and a linear map ``E -> d_model`` follows them (even if
            ``E == d_model``, as in ALBERT). ``V x E + E x H`` instead of ``V x H`` weights.
        share_layers: ALBERT's cross-layer parameter sharing: one layer's weights, applied ``n_layers`` times.
        init_std: the standard deviation of the initial weights (``initializer_range``, 0.02).

    Raises:
        ValueError: for non-positive sizes, ``d_model % n_heads != 0``, probabilities outside ``[0, 1]``, a
            non-positive ``layer_norm_eps`` or ``init_std``, or ``pad_id`` outside ``[0, vocab_size)``.

    Source: Devlin et al. (2019), Sec. 3 and Appendix A.2; Lan et al. (2020), Sec. 3.1 (ALBERT).
    """

    vocab_size: int = 30522
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    d_ff: int = 3072
    max_len: int = 512
    type_vocab_size: int = 2
    dropout: float = 0.1
    attention_dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    pad_id: int = 0
    d_embedding: int | None = None
    share_layers: bool = False
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_len", "type_vocab_size"):
            _check_int(name, getattr(self, name))
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.d_embedding is not None:
            _check_int("d_embedding", self.d_embedding)
        _check_probability("dropout", self.dropout)
        _check_probability("attention_dropout", self.attention_dropout)
        for name in ("layer_norm_eps", "init_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        _check_int("pad_id", self.pad_id, minimum=0)
        if self.pad_id >= self.vocab_size:
            raise ValueError(f"pad_id={self.pad_id} must lie in [0, vocab_size={self.vocab_size})")
        if not isinstance(self.share_layers, bool):
            raise ValueError(f"share_layers must be a bool, got {self.share_layers!r}")

    @property
    def d_head(self) -> int:
        """The size of one head, ``d_model // n_heads``."""
        return self.d_model // self.n_heads

    @property
    def embedding_width(self) -> int:
        """``E``: ``d_embedding`` if set (ALBERT), else ``d_model`` (BERT)."""
        return self.d_model if self.d_embedding is None else self.d_embedding

    def replace(self, **changes) -> BERTConfig:
        """A copy with some fields changed (checked again)."""
        return BERTConfig(**{**asdict(self), **changes})

    def num_parameters(self, pooler: bool = True) -> int:
        r"""The number of parameters of :class:`BERT` with this configuration, from the sizes alone.

        With :math:`E` the embedding width, :math:`H` = ``d_model``, :math:`F` = ``d_ff``:

        * embeddings :math:`(V + \text{max\_len} + \text{type\_vocab\_size})\,E + 2E` (LayerNorm), plus the
          projection :math:`EH + H` if ``d_embedding`` is set;
        * one layer: attention :math:`4H^2 + 4H`, feed-forward :math:`2HF + F + H`, two LayerNorms :math:`4H`;
          times ``n_layers``, or once with ``share_layers``;
        * the pooler :math:`H^2 + H` (if ``pooler``).

        BERT-base gives 109,482,240 (the "110M" of the paper), ALBERT-base (E = 128, shared) 11,683,584.
        """
        E, H, F_ = self.embedding_width, self.d_model, self.d_ff
        embeddings = (self.vocab_size + self.max_len + self.type_vocab_size) * E + 2 * E
        if self.d_embedding is not None:
            embeddings += E * H + H
        layer = (4 * H * H + 4 * H) + (2 * H * F_ + F_ + H) + 4 * H
        layers = layer * (1 if self.share_layers else self.n_layers)
        return embeddings + layers + (H * H + H if pooler else 0)

    @classmethod
    def from_hf(cls, config) -> BERTConfig:
        """The configuration of a Hugging Face ``BertConfig`` (or ``AlbertConfig``, with one group of one shared
        layer).

        Raises:
            ValueError: for an activation other than exact ``"gelu"``, relative position embeddings, a decoder
                configuration, or ALBERT with several layer groups or inner layers.
        """
        kind = getattr(config, "model_type", None)
        if kind not in ("bert", "albert"):
            raise ValueError(f"config must be a BertConfig or an AlbertConfig, got model_type={kind!r}")
        if config.hidden_act != "gelu":
            raise ValueError(f"config: only the exact 'gelu' activation is supported, got {config.hidden_act!r} "
                             "(ALBERT's default 'gelu_new' is the tanh approximation: build it with hidden_act='gelu')")
        if getattr(config, "position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"config: only absolute positions are supported, got {config.position_embedding_type!r}")
        if getattr(config, "is_decoder", False):
            raise ValueError("config: a BERT decoder (is_decoder=True) is not supported")
        extra = {}
        if kind == "albert":
            if config.num_hidden_groups != 1 or config.inner_group_num != 1:
                raise ValueError("config: only ALBERT with num_hidden_groups = inner_group_num = 1 is supported")
            extra = dict(d_embedding=config.embedding_size, share_layers=True)
        return cls(vocab_size=config.vocab_size, d_model=config.hidden_size, n_layers=config.num_hidden_layers,
                   n_heads=config.num_attention_heads, d_ff=config.intermediate_size,
                   max_len=config.max_position_embeddings, type_vocab_size=config.type_vocab_size,
                   dropout=config.hidden_dropout_prob, attention_dropout=config.attention_probs_dropout_prob,
                   layer_norm_eps=config.layer_norm_eps,
                   pad_id=config.pad_token_id if config.pad_token_id is not None else 0,
                   init_std=config.initializer_range, **extra)


# --------------------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------------------

def _check_ids(name: str, ids: object, high: int, shape: tuple[int, ...] | None = None,
               hint: str = "(B, T)") -> torch.Tensor:
    check_tensor(name, ids, ndim=2, shape_hint=hint)
    if ids.dtype != torch.long:
        raise DtypeError(f"{name} must be int64 (torch.long) ids {hint}, got {ids.dtype}")
    if shape is not None and tuple(ids.shape) != tuple(shape):
        raise ValueError(f"{name} must have the shape of input_ids {tuple(shape)}, got {tuple(ids.shape)}")
    if ids.numel() and (ids.min() < 0 or ids.max() >= high):
        raise ValueError(f"{name}: ids must lie in [0, {high}), got values in [{int(ids.min())}, {int(ids.max())}]")
    return ids


def _check_padding(key_padding_mask: object, shape: tuple[int, ...]) -> torch.Tensor | None:
    if key_padding_mask is None:
        return None
    check_tensor("key_padding_mask", key_padding_mask, ndim=2, shape_hint="(B, T), True = padding")
    if key_padding_mask.dtype != torch.bool:
        raise DtypeError(f"key_padding_mask must be a bool tensor (B, T), True = padding (Hugging Face's "
                         f"attention_mask is the opposite: pass attention_mask == 0), got {key_padding_mask.dtype}")
    if tuple(key_padding_mask.shape) != tuple(shape):
        raise ValueError(f"key_padding_mask must have the shape of input_ids {tuple(shape)}, got "
                         f"{tuple(key_padding_mask.shape)}")
    return key_padding_mask


# --------------------------------------------------------------------------------------------------------------
# Pooling
# --------------------------------------------------------------------------------------------------------------

def cls_pool(hidden: torch.Tensor) -> torch.Tensor:
    """The hidden state of the first token, ``[CLS]``: ``(B, T, d) -> (B, d)``.

    Raises:
        ValueError: if ``hidden`` is not a 3-D floating tensor with ``T >= 1``.

    Source: Devlin et al. (2019), Sec. 3 ("The final hidden state corresponding to this token is used as the
    aggregate sequence representation for classification tasks").
    """
    check_tensor("hidden", hidden, ndim=3, shape_hint="(B, T, d)")
    check_floating("hidden", hidden)
    if hidden.shape[1] == 0:
        raise ValueError("hidden must hold at least one position (T >= 1)")
    return hidden[:, 0]


def mean_pool(hidden: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""The mean of the hidden states over the real (non-padding) tokens: ``(B, T, d) -> (B, d)``.

    .. math:: \bar{\mathbf h}_b = \frac{\sum_t m_{bt}\, \mathbf h_{bt}}{\max(1, \sum_t m_{bt})}, \qquad
              m_{bt} = 1 - \text{key\_padding\_mask}_{bt}

    ``[CLS]`` and ``[SEP]`` count as real tokens (Sentence-BERT and all-MiniLM-L6-v2 average them too). A
    sequence that is all padding gives zeros, not NaN.

    Args:
        hidden: ``(B, T, d)`` floating.
        key_padding_mask: ``(B, T)`` bool, ``True`` at padding (``None``: every position is real).

    Raises:
        ValueError: (including :class:`~tfcourse._checks.DtypeError`) for a ``hidden`` that is not 3-D floating, or
            a ``key_padding_mask`` that is not bool ``(B, T)``.

    Source: Reimers and Gurevych (2019), Sec. 3 (the MEAN strategy).
    """
    check_tensor("hidden", hidden, ndim=3, shape_hint="(B, T, d)")
    check_floating("hidden", hidden)
    if key_padding_mask is None:
        return hidden.mean(dim=1)
    _check_padding(key_padding_mask, hidden.shape[:2])
    keep = (~key_padding_mask).to(hidden.dtype)[..., None]                # (B, T, 1)
    return (hidden * keep).sum(dim=1) / keep.sum(dim=1).clamp_min(1.0)   # (B, d)


# --------------------------------------------------------------------------------------------------------------
# The encoder
# --------------------------------------------------------------------------------------------------------------

class BERTEmbeddings(nn.Module):
    r"""BERT's input representation: the sum of a token, a position and a segment (token type) embedding,
    normalised and dropped out.

    .. math:: \mathbf x_t = \mathrm{Dropout}\big(\mathrm{LN}(E_\text{tok}[w_t] + P[t] + E_\text{seg}[s_t])\big)

    Args:
        config: a :class:`BERTConfig`; the width is ``config.embedding_width`` (``E``).

    Submodules: ``word_embeddings`` (``nn.Embedding(V, E)``, ``padding_idx=pad_id``), ``position_embeddings``
    (:class:`tfcourse.positional.LearnedPositionalEmbedding`, ``(max_len, E)``), ``token_type_embeddings``
    (``nn.Embedding(type_vocab_size, E)``), ``norm`` (``nn.LayerNorm(E, eps=layer_norm_eps)``), ``dropout``.

    ``forward(input_ids (B, T), token_type_ids=None (B, T), position_ids=None (T,) or (B, T)) -> (B, T, E)``;
    ``token_type_ids`` default to 0 (sentence A), positions to ``0 .. T - 1``.

    Raises:
        ValueError: (including :class:`~tfcourse._checks.DtypeError`) for ids that are not ``torch.long``
            ``(B, T)`` or lie outside their vocabularies, or ``T > max_len``.

    Source: Devlin et al. (2019), Sec. 3 and Fig. 2.
    """

    def __init__(self, config: BERTConfig):
        super().__init__()
        E = config.embedding_width
        self.vocab_size, self.type_vocab_size = config.vocab_size, config.type_vocab_size
        self.word_embeddings = nn.Embedding(config.vocab_size, E, padding_idx=config.pad_id)
        self.position_embeddings = LearnedPositionalEmbedding(config.max_len, E, init_std=config.init_std)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, E)
        self.norm = nn.LayerNorm(E, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        _check_ids("input_ids", input_ids, self.vocab_size)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        _check_ids("token_type_ids", token_type_ids, self.type_vocab_size, tuple(input_ids.shape))
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)  # (B, T, E)
        x = self.position_embeddings(x, position_ids)                                     # + P[t]
        return self.dropout(self.norm(x))


class BERTOutput(NamedTuple):
    """What :class:`BERT` returns.

    * ``last_hidden_state``: ``(B, T, d_model)``, the output of the last layer;
    * ``pooler_output``: ``(B, d_model)``, ``tanh(W h_[CLS] + b)``, or ``None`` for a model built without pooler;
    * ``hidden_states``: with ``output_hidden_states=True``, the ``n_layers + 1`` tensors ``(B, T, d_model)``
      that enter layer 1, ..., layer L and leave layer L (the first one is the embeddings, after ALBERT's
      projection), as Hugging Face's ``hidden_states``; else ``None``.
    """

    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor | None
    hidden_states: tuple[torch.Tensor, ...] | None


def _bert_layer(config: BERTConfig) -> EncoderLayer:
    """One BERT layer: the Post-LN :class:`~tfcourse.layers.EncoderLayer` with GELU and BERT's dropouts."""
    layer = EncoderLayer(config.d_model, config.n_heads, config.d_ff, dropout=config.dropout, activation="gelu",
                         norm_first=False, layer_norm_eps=config.layer_norm_eps)
    layer.self_attn.dropout = config.attention_dropout  # BERT's attention_probs_dropout_prob (a float there)
    layer.ff.dropout = nn.Identity()  # BERT has no dropout inside the FFN, only on its output (dropout2)
    return layer


class BERT(nn.Module):
    r"""The BERT encoder: embeddings, ``L`` Post-LN Transformer encoder layers and a pooler.

    .. math:: \mathbf h^{(0)} = \mathrm{Emb}(w, s), \quad \mathbf h^{(l)} = \mathrm{EncoderLayer}_l(\mathbf h^{(l-1)}),
              \quad \text{pooler} = \tanh(W_p\, \mathbf h^{(L)}_{[CLS]} + \mathbf b_p)

    Each layer is a :class:`tfcourse.layers.EncoderLayer` in BERT's layout: Post-LN
    (:math:`\mathbf x \leftarrow \mathrm{LN}(\mathbf x + \mathrm{Sublayer}(\mathbf x))`), exact GELU, LayerNorm
    epsilon ``config.layer_norm_eps`` (1e-12); dropout ``config.attention_dropout`` on the attention weights and
    ``config.dropout`` on each sublayer's output, none inside the feed-forward network (BERT has none there; the
    layer's ``ff.dropout`` is an ``nn.Identity``). With ``config.share_layers`` (ALBERT) ``layers`` holds one layer,
    applied ``n_layers`` times; with ``config.d_embedding`` (ALBERT) ``embedding_projection`` maps the
    ``E``-wide embeddings to ``d_model``.

    Args:
        config: a :class:`BERTConfig`.
        pooler: build the pooler (Hugging Face's ``add_pooling_layer``; a masked language model needs none).

    Submodules: ``embeddings`` (:class:`BERTEmbeddings`), ``embedding_projection`` (``nn.Linear(E, d_model)`` or
    ``None``), ``layers`` (``nn.ModuleList`` of :class:`~tfcourse.layers.EncoderLayer`), ``pooler``
    (``nn.Linear(d_model, d_model)`` or ``None``). Weights are initialised :math:`\mathcal N(0, 0.02^2)`, biases 0,
    LayerNorms 1 and 0, the ``[PAD]`` row 0, as BERT's.

    ``forward(input_ids (B, T), token_type_ids=None, key_padding_mask=None, position_ids=None,
    output_hidden_states=False) -> BERTOutput``:

    * ``token_type_ids``: ``(B, T)`` segment ids (0 for sentence A, 1 for B; default all 0);
    * ``key_padding_mask``: ``(B, T)`` bool, **``True`` at padding** (no query attends to those keys; their own
      outputs are computed but meaningless). ``None``: no padding. Hugging Face's ``attention_mask`` is the
      opposite: ``key_padding_mask = attention_mask == 0``;
    * ``position_ids``: ``(T,)`` or ``(B, T)`` (default ``0 .. T - 1``).

    Raises:
        ValueError: (including :class:`~tfcourse._checks.DtypeError`) for ids that are not ``torch.long`` ``(B, T)``
            or lie outside the vocabularies, ``T > max_len``, or a ``key_padding_mask`` that is not bool ``(B, T)``.

    Source: Devlin et al. (2019), Sec. 3; the Transformer encoder: Vaswani et al. (2017); ALBERT: Lan et al. (2020),
    Sec. 3.1.
    """

    def __init__(self, config: BERTConfig, pooler: bool = True):
        super().__init__()
        if not isinstance(config, BERTConfig):
            raise TypeError(f"config must be a BERTConfig, got {type(config).__name__}")
        self.config = config
        self.embeddings = BERTEmbeddings(config)
        self.embedding_projection = (nn.Linear(config.d_embedding, config.d_model)
                                     if config.d_embedding is not None else None)
        n_unique = 1 if config.share_layers else config.n_layers
        self.layers = nn.ModuleList(_bert_layer(config) for _ in range(n_unique))
        self.pooler = nn.Linear(config.d_model, config.d_model) if pooler else None
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """BERT's initialisation (Hugging Face's ``BertPreTrainedModel._init_weights``)."""
        std = self.config.init_std
        with torch.no_grad():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, std)
                if module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
            elif isinstance(module, LearnedPositionalEmbedding):
                module.weight.normal_(0.0, std)
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()

    @property
    def n_layers(self) -> int:
        return self.config.n_layers

    def layer(self, i: int) -> EncoderLayer:
        """The layer applied at depth ``i`` (``0 <= i < n_layers``): ``layers[i]``, or ``layers[0]`` when shared."""
        if not 0 <= i < self.config.n_layers:
            raise ValueError(f"i must lie in [0, {self.config.n_layers}), got {i}")
        return self.layers[0 if self.config.share_layers else i]

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                output_hidden_states: bool = False) -> BERTOutput:
        x = self.embeddings(input_ids, token_type_ids, position_ids)         # (B, T, E)
        key_padding_mask = _check_padding(key_padding_mask, input_ids.shape)
        if self.embedding_projection is not None:
            x = self.embedding_projection(x)                                  # (B, T, d_model)
        states = [x] if output_hidden_states else None
        for i in range(self.config.n_layers):
            x = self.layer(i)(x, src_key_padding_mask=key_padding_mask)     # (B, T, d_model)
            if states is not None:
                states.append(x)
        pooled = torch.tanh(self.pooler(x[:, 0])) if self.pooler is not None else None  # (B, d_model)
        return BERTOutput(x, pooled, tuple(states) if states is not None else None)

    # ---------------------------------------------------------------------------------------------- from HF

    @classmethod
    def from_hf(cls, module) -> BERT:
        """A :class:`BERT` with the weights (copies), configuration, dtype, device and training mode of a Hugging
        Face ``transformers.BertModel``, or of an ``AlbertModel`` (one group of one shared layer).

        The mapping: ``embeddings.{word,position,token_type}_embeddings`` and ``embeddings.LayerNorm`` to
        :class:`BERTEmbeddings`; per layer ``attention.self.{query,key,value}`` to ``self_attn.W_q, W_k, W_v``,
        ``attention.output.dense`` to ``W_o``, ``attention.output.LayerNorm`` to ``norm1``,
        ``intermediate.dense`` to ``ff.linear1``, ``output.dense`` to ``ff.linear2``, ``output.LayerNorm`` to
        ``norm2``; ``pooler.dense`` to ``pooler`` (ALBERT: ``attention.{query,key,value,dense,LayerNorm}``,
        ``ffn``, ``ffn_output``, ``full_layer_layer_norm``, ``encoder.embedding_hidden_mapping_in``, ``pooler``).

        Raises:
            TypeError: if ``module`` is not a ``BertModel`` or an ``AlbertModel``.
            ValueError: as :meth:`BERTConfig.from_hf` (activation, position embedding type, layer groups).
        """
        import transformers

        if isinstance(module, transformers.BertModel):
            kind = "bert"
        elif isinstance(module, transformers.AlbertModel):
            kind = "albert"
        else:
            raise TypeError(f"module must be a transformers.BertModel or AlbertModel, got {type(module).__name__}")
        config = BERTConfig.from_hf(module.config)
        weight = module.embeddings.word_embeddings.weight
        ours = cls(config, pooler=module.pooler is not None).to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            hf_emb = module.embeddings
            ours.embeddings.word_embeddings.weight.copy_(hf_emb.word_embeddings.weight)
            ours.embeddings.position_embeddings.weight.copy_(hf_emb.position_embeddings.weight)
            ours.embeddings.token_type_embeddings.weight.copy_(hf_emb.token_type_embeddings.weight)
            _copy(ours.embeddings.norm, hf_emb.LayerNorm)
            if kind == "bert":
                for layer, hf in zip(ours.layers, module.encoder.layer):
                    attn = hf.attention
                    _copy_layer(layer, attn.self.query, attn.self.key, attn.self.value, attn.output.dense,
                                attn.output.LayerNorm, hf.intermediate.dense, hf.output.dense, hf.output.LayerNorm)
                if module.pooler is not None:
                    _copy(ours.pooler, module.pooler.dense)
            else:
                _copy(ours.embedding_projection, module.encoder.embedding_hidden_mapping_in)
                hf = module.encoder.albert_layer_groups[0].albert_layers[0]
                attn = hf.attention
                _copy_layer(ours.layers[0], attn.query, attn.key, attn.value, attn.dense, attn.LayerNorm, hf.ffn,
                            hf.ffn_output, hf.full_layer_layer_norm)
                if module.pooler is not None:
                    _copy(ours.pooler, module.pooler)
        return ours.train(module.training)

    def extra_repr(self) -> str:
        c = self.config
        extra = f"n_layers={c.n_layers}, d_model={c.d_model}, n_heads={c.n_heads}, d_ff={c.d_ff}"
        if c.d_embedding is not None:
            extra += f", d_embedding={c.d_embedding}"
        return extra + (", share_layers=True" if c.share_layers else "")


def _copy(ours: nn.Module, theirs: nn.Module) -> None:
    """Copy the weight and bias of a Linear or LayerNorm."""
    ours.weight.copy_(theirs.weight)
    if getattr(ours, "bias", None) is not None:
        ours.bias.copy_(theirs.bias)


def _copy_layer(layer: EncoderLayer, query, key, value, out, norm1, ff1, ff2, norm2) -> None:
    for mine, theirs in ((layer.self_attn.W_q, query), (layer.self_attn.W_k, key), (layer.self_attn.W_v, value),
                         (layer.self_attn.W_o, out), (layer.norm1, norm1), (layer.ff.linear1, ff1),
                         (layer.ff.linear2, ff2), (layer.norm2, norm2)):
        _copy(mine, theirs)


# --------------------------------------------------------------------------------------------------------------
# Heads
# --------------------------------------------------------------------------------------------------------------

class MLMHead(nn.Module):
    r"""The masked-language-model head: a transform, then scores over the vocabulary with the (tied) word
    embeddings.

    .. math:: \mathrm{logits} = \mathrm{LN}(\mathrm{GELU}(\mathbf h W_t + \mathbf b_t))\, E_\text{tok}^\top
              + \mathbf b_\text{out}

    Args:
        config: a :class:`BERTConfig`; the transform maps ``d_model -> E`` (ALBERT) or ``d_model -> d_model``.
        word_embeddings: the ``nn.Embedding(V, E)`` whose weight the output layer shares (Press and Wolf 2017);
            ``None`` for an untied output layer.

    Submodules: ``dense`` (``nn.Linear(d_model, E)``), ``norm`` (``nn.LayerNorm(E)``), ``decoder``
    (``nn.Linear(E, V)``, its weight the embedding matrix when tied, with its own bias).

    ``forward(hidden (..., d_model)) -> logits (..., V)``. Apply it to the masked positions only
    (``hidden[labels != -100]``): the other ~85% of the positions have no target, and the output layer is the
    largest matrix product of a small model.

    Source: Devlin et al. (2019), Sec. 3.1 (Task #1) and the reference code (``cls/predictions``).
    """

    def __init__(self, config: BERTConfig, word_embeddings: nn.Embedding | None = None):
        super().__init__()
        E = config.embedding_width
        self.dense = nn.Linear(config.d_model, E)
        self.norm = nn.LayerNorm(E, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(E, config.vocab_size)
        with torch.no_grad():
            for linear in (self.dense, self.decoder):
                linear.weight.normal_(0.0, config.init_std)
                linear.bias.zero_()
        if word_embeddings is not None:
            if tuple(word_embeddings.weight.shape) != (config.vocab_size, E):
                raise ValueError(f"word_embeddings must be ({config.vocab_size}, {E}), got "
                                 f"{tuple(word_embeddings.weight.shape)}")
            self.decoder.weight = word_embeddings.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        check_tensor("hidden", hidden, min_ndim=1, shape_hint="(..., d_model)")
        return self.decoder(self.norm(F.gelu(self.dense(hidden))))  # (..., V)


class PreTrainingOutput(NamedTuple):
    """What :class:`BERTForPreTraining` returns: ``mlm_logits`` ``(B, T, V)`` (or ``(N, V)`` at the ``N``
    positions of ``mlm_positions``), ``nsp_logits`` ``(B, 2)`` (or ``None`` without an NSP head) and the encoder's
    :class:`BERTOutput`."""

    mlm_logits: torch.Tensor
    nsp_logits: torch.Tensor | None
    encoder: BERTOutput


class BERTForPreTraining(nn.Module):
    r"""BERT with its two pre-training heads: masked language modelling and next-sentence prediction.

    .. math:: \mathcal L = \underbrace{-\frac1{|M|}\sum_{t \in M} \log p(w_t \mid \tilde{\mathbf w})}_{\text{MLM}}
              \;+\; \underbrace{-\log p(\text{IsNext} \mid \tilde{\mathbf w})}_{\text{NSP}}

    with :math:`M` the masked positions (:func:`tfcourse.data.mlm.mask_tokens`) and :math:`\tilde{\mathbf w}` the
    corrupted input. NSP labels follow Hugging Face: **0 = B follows A** (IsNext), **1 = B is random** (NotNext).

    Args:
        config: a :class:`BERTConfig`.
        nsp: build the NSP head (RoBERTa drops it: ``nsp=False`` gives Hugging Face's ``BertForMaskedLM``).
        tie_embeddings: share the MLM output matrix with the word embeddings (BERT does).

    Submodules: ``bert`` (:class:`BERT`, with a pooler only if ``nsp``), ``mlm`` (:class:`MLMHead`), ``nsp``
    (``nn.Linear(d_model, 2)`` on the pooled output, or ``None``).

    ``forward(input_ids, token_type_ids=None, key_padding_mask=None, mlm_positions=None) -> PreTrainingOutput``;
    ``mlm_positions`` ``(B, T)`` bool picks where to score the vocabulary (the logits are then ``(N, V)``, in the
    order of ``hidden[mlm_positions]``). ``loss(input_ids, labels, token_type_ids=None, key_padding_mask=None,
    next_sentence_label=None) -> (loss, mlm_loss, nsp_loss)`` with ``labels`` ``(B, T)`` the original ids at masked
    positions and ``-100`` elsewhere (as :func:`tfcourse.data.mlm.mask_tokens` returns them).

    Source: Devlin et al. (2019), Sec. 3.1 and Appendix A.2 (the loss is "the sum of the mean masked LM likelihood
    and the mean next sentence prediction likelihood").
    """

    def __init__(self, config: BERTConfig, nsp: bool = True, tie_embeddings: bool = True):
        super().__init__()
        self.bert = BERT(config, pooler=nsp)
        self.mlm = MLMHead(config, self.bert.embeddings.word_embeddings if tie_embeddings else None)
        self.nsp = nn.Linear(config.d_model, 2) if nsp else None
        if self.nsp is not None:
            with torch.no_grad():
                self.nsp.weight.normal_(0.0, config.init_std)
                self.nsp.bias.zero_()

    @property
    def config(self) -> BERTConfig:
        return self.bert.config

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None,
                mlm_positions: torch.Tensor | None = None) -> PreTrainingOutput:
        out = self.bert(input_ids, token_type_ids, key_padding_mask)
        hidden = out.last_hidden_state                                       # (B, T, d_model)
        if mlm_positions is not None:
            check_tensor("mlm_positions", mlm_positions, ndim=2, shape_hint="(B, T) bool")
            if mlm_positions.dtype != torch.bool or mlm_positions.shape != input_ids.shape:
                raise ValueError(f"mlm_positions must be a bool tensor of the shape of input_ids "
                                 f"{tuple(input_ids.shape)}, got {mlm_positions.dtype} {tuple(mlm_positions.shape)}")
            hidden = hidden[mlm_positions]                                   # (N, d_model)
        nsp_logits = self.nsp(out.pooler_output) if self.nsp is not None else None  # (B, 2)
        return PreTrainingOutput(self.mlm(hidden), nsp_logits, out)

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor, token_type_ids: torch.Tensor | None = None,
             key_padding_mask: torch.Tensor | None = None,
             next_sentence_label: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The pre-training loss ``mlm + nsp`` and its two parts (``nsp`` is 0 without labels or head).

        The MLM part is the cross-entropy at the positions whose label is not ``-100``, averaged over them (0 if
        there are none); the vocabulary is scored at those positions only.

        Raises:
            ValueError: if ``labels`` is not a ``torch.long`` tensor of the shape of ``input_ids``, or
                ``next_sentence_label`` is given without an NSP head or is not ``(B,)`` ids in ``{0, 1}``.
        """
        check_tensor("labels", labels, ndim=2, shape_hint="(B, T), -100 = not masked")
        if labels.dtype != torch.long or labels.shape != input_ids.shape:
            raise ValueError(f"labels must be int64 of the shape of input_ids {tuple(input_ids.shape)}, got "
                             f"{labels.dtype} {tuple(labels.shape)}")
        positions = labels != -100                                            # (B, T)
        out = self(input_ids, token_type_ids, key_padding_mask, mlm_positions=positions)
        mlm = label_smoothed_cross_entropy(out.mlm_logits, labels[positions], smoothing=0.0)
        nsp = mlm.new_zeros(())
        if next_sentence_label is not None:
            if out.nsp_logits is None:
                raise ValueError("next_sentence_label given, but the model has no NSP head (nsp=False)")
            check_tensor("next_sentence_label", next_sentence_label, ndim=1, shape_hint="(B,)")
            if (next_sentence_label.dtype != torch.long or next_sentence_label.shape[0] != input_ids.shape[0]
                    or not ((next_sentence_label == 0) | (next_sentence_label == 1)).all()):
                raise ValueError("next_sentence_label must be int64 (B,) with 0 = IsNext, 1 = NotNext")
            nsp = F.cross_entropy(out.nsp_logits, next_sentence_label)
        return mlm + nsp, mlm, nsp

    @classmethod
    def from_hf(cls, module) -> BERTForPreTraining:
        """A copy of a Hugging Face ``BertForPreTraining`` (MLM + NSP) or ``BertForMaskedLM`` (MLM only).

        Raises:
            TypeError: for another module.
        """
        import transformers

        if isinstance(module, transformers.BertForPreTraining):
            nsp = True
        elif isinstance(module, transformers.BertForMaskedLM):
            nsp = False
        else:
            raise TypeError(f"module must be a BertForPreTraining or BertForMaskedLM, got {type(module).__name__}")
        predictions = module.cls.predictions
        tied = predictions.decoder.weight.data_ptr() == module.bert.embeddings.word_embeddings.weight.data_ptr()
        weight = predictions.decoder.weight
        ours = cls(BERTConfig.from_hf(module.config), nsp=nsp, tie_embeddings=tied).to(weight.device, weight.dtype)
        ours.bert = BERT.from_hf(module.bert)
        with torch.no_grad():
            if tied:
                ours.mlm.decoder.weight = ours.bert.embeddings.word_embeddings.weight
            else:
                ours.mlm.decoder.weight.copy_(predictions.decoder.weight)
            ours.mlm.decoder.bias.copy_(predictions.bias)
            _copy(ours.mlm.dense, predictions.transform.dense)
            _copy(ours.mlm.norm, predictions.transform.LayerNorm)
            if nsp:
                _copy(ours.nsp, module.cls.seq_relationship)
        return ours.train(module.training)


class BERTForSequenceClassification(nn.Module):
    r"""BERT with a linear classifier on one vector per sequence: ``logits = W\, \mathrm{Dropout}(\mathbf z) +
    \mathbf b``, ``(B, n_classes)``.

    Args:
        config: a :class:`BERTConfig`.
        n_classes: the number of classes (1: regression, as Hugging Face; the model does not care).
        pooling: ``"cls"``: :math:`\mathbf z` is the pooler output :math:`\tanh(W_p \mathbf h_{[CLS]} + \mathbf b_p)`
            (BERT, Hugging Face's ``BertForSequenceClassification``); ``"mean"``: the mean of the last hidden
            states over the real tokens (:func:`mean_pool`, Sentence-BERT), with no pooler.
        classifier_dropout: dropout before the classifier (default ``config.dropout``).

    ``forward(input_ids, token_type_ids=None, key_padding_mask=None) -> logits (B, n_classes)``.

    Raises:
        ValueError: for an unknown ``pooling`` or a non-positive ``n_classes``; in ``forward`` as :class:`BERT`.

    Source: Devlin et al. (2019), Sec. 3.2 and Fig. 4 (a, b); mean pooling: Reimers and Gurevych (2019).
    """

    def __init__(self, config: BERTConfig, n_classes: int, pooling: str = "cls",
                 classifier_dropout: float | None = None):
        super().__init__()
        _check_int("n_classes", n_classes)
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        p = config.dropout if classifier_dropout is None else classifier_dropout
        _check_probability("classifier_dropout", p)
        self.pooling, self.n_classes = pooling, n_classes
        self.bert = BERT(config, pooler=pooling == "cls")
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(config.d_model, n_classes)
        with torch.no_grad():
            self.classifier.weight.normal_(0.0, config.init_std)
            self.classifier.bias.zero_()

    @property
    def config(self) -> BERTConfig:
        return self.bert.config

    def pool(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
             key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The sequence vectors :math:`\\mathbf z` ``(B, d_model)`` the classifier reads."""
        out = self.bert(input_ids, token_type_ids, key_padding_mask)
        if self.pooling == "cls":
            return out.pooler_output
        return mean_pool(out.last_hidden_state, key_padding_mask)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.classifier(self.dropout(self.pool(input_ids, token_type_ids, key_padding_mask)))

    @classmethod
    def from_hf(cls, module) -> BERTForSequenceClassification:
        """A copy of a Hugging Face ``BertForSequenceClassification`` (``[CLS]`` pooling).

        Raises:
            TypeError: for another module.
        """
        import transformers

        if not isinstance(module, transformers.BertForSequenceClassification):
            raise TypeError(f"module must be a BertForSequenceClassification, got {type(module).__name__}")
        p = module.dropout.p
        ours = cls(BERTConfig.from_hf(module.config), module.num_labels, "cls", classifier_dropout=p)
        ours.bert = BERT.from_hf(module.bert)
        ours.classifier = nn.Linear(module.classifier.in_features, module.classifier.out_features).to(
            module.classifier.weight.device, module.classifier.weight.dtype)
        with torch.no_grad():
            _copy(ours.classifier, module.classifier)
        return ours.train(module.training)


class BERTForTokenClassification(nn.Module):
    r"""BERT with a linear classifier on every token: ``logits = W\, \mathrm{Dropout}(\mathbf h_t) + \mathbf b``,
    ``(B, T, n_labels)`` (named-entity tagging, part-of-speech tagging, truecasing ...).

    Args:
        config: a :class:`BERTConfig`.
        n_labels: the number of tags.
        classifier_dropout: dropout before the classifier (default ``config.dropout``).

    ``forward(input_ids, token_type_ids=None, key_padding_mask=None) -> logits (B, T, n_labels)``; train it with
    the cross-entropy over the positions whose label is not ``-100`` (padding, special tokens, and whatever the
    task leaves out).

    Source: Devlin et al. (2019), Sec. 5.3 and Fig. 4 (d).
    """

    def __init__(self, config: BERTConfig, n_labels: int, classifier_dropout: float | None = None):
        super().__init__()
        _check_int("n_labels", n_labels)
        p = config.dropout if classifier_dropout is None else classifier_dropout
        _check_probability("classifier_dropout", p)
        self.n_labels = n_labels
        self.bert = BERT(config, pooler=False)
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(config.d_model, n_labels)
        with torch.no_grad():
            self.classifier.weight.normal_(0.0, config.init_std)
            self.classifier.bias.zero_()

    @property
    def config(self) -> BERTConfig:
        return self.bert.config

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.bert(input_ids, token_type_ids, key_padding_mask).last_hidden_state  # (B, T, d_model)
        return self.classifier(self.dropout(hidden))                                     # (B, T, n_labels)

    @classmethod
    def from_hf(cls, module) -> BERTForTokenClassification:
        """A copy of a Hugging Face ``BertForTokenClassification``.

        Raises:
            TypeError: for another module.
        """
        import transformers

        if not isinstance(module, transformers.BertForTokenClassification):
            raise TypeError(f"module must be a BertForTokenClassification, got {type(module).__name__}")
        ours = cls(BERTConfig.from_hf(module.config), module.num_labels, classifier_dropout=module.dropout.p)
        ours.bert = BERT.from_hf(module.bert)
        ours.classifier = nn.Linear(module.classifier.in_features, module.classifier.out_features).to(
            module.classifier.weight.device, module.classifier.weight.dtype)
        with torch.no_grad():
            _copy(ours.classifier, module.classifier)
        return ours.train(module.training)

