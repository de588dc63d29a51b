"""The Transformer block: position-wise feed-forward networks (ReLU, GELU and GLU variants), RMSNorm, and the
encoder and decoder layers with residual connections and Post-LN or Pre-LN placement of the normalisation.

Chapter 5 of the book ("The Transformer block") builds each piece from scratch; :class:`EncoderLayer` and
:class:`DecoderLayer` are then stacked into whole models in :mod:`tfcourse.models.transformer`.

Notation: ``B`` batch size, ``T`` target (or source) length, ``S`` memory (source) length, ``d_model`` the width of
the residual stream, ``d_ff`` the hidden width of the feed-forward network, ``n_heads`` the number of heads.

Masks of the layers follow :class:`torch.nn.TransformerEncoderLayer` and :class:`torch.nn.TransformerDecoderLayer`
(and :class:`tfcourse.attention.MultiHeadAttention`, which uses the same convention): a **boolean** ``*_mask`` is
``True`` where a query may **not** attend; a **float** mask is **added** to the scores (``-inf`` blocks); a
``*_key_padding_mask`` is ``True`` at **padding** (keys to ignore). This is the opposite of the boolean mask of
:func:`tfcourse.attention.scaled_dot_product_attention` and :func:`tfcourse.attention.causal_mask` (``True`` = may
attend): pass ``~causal_mask(T)`` as a boolean ``tgt_mask``, or simply ``tgt_is_causal=True``. A query that may
attend to no key gets a zero attention output, never NaN.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_floating, check_same, check_tensor
from .attention import MultiHeadAttention

__all__ = ["ACTIVATIONS", "GLU_VARIANTS", "FeedForward", "GLUFeedForward", "RMSNorm", "EncoderLayer",
           "DecoderLayer"]

#: Activations of :class:`FeedForward` (``"gelu"`` is the exact, erf-based GELU, as torch's default).
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}

#: Gate activations of :class:`GLUFeedForward`, Shazeer (2020), Sec. 2: sigmoid (GLU, Dauphin et al.
#: 2017), identity (bilinear), ReLU (ReGLU), GELU (GEGLU) and Swish with beta = 1, that is SiLU (SwiGLU).
GLU_VARIANTS = {"glu": torch.sigmoid, "bilinear": lambda x: x, "reglu": F.relu, "geglu": F.gelu, "swiglu": F.silu}


def _check_positive(**sizes: int) -> None:
    for name, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"{name} must be a positive int, got {size!r}")


def _check_dropout(dropout: float) -> None:
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout <= 1.0:
        raise ValueError(f"dropout must lie in [0, 1], got {dropout!r}")


def _check_input(name: str, x: object, d_model: int, like: torch.Tensor, hint: str) -> None:
    check_tensor(name, x, ndim=3, shape_hint=hint)
    check_floating(name, x, like=like, like_name="the module's parameters")
    check_same(name, x.shape[-1:], (d_model,), f"the feature size d_model [{hint}]")


def _activation_name(activation: object) -> str:
    """The name in :data:`ACTIVATIONS` of a torch layer's activation (a function or a module)."""
    if activation is F.relu or isinstance(activation, nn.ReLU):
        return "relu"
    if activation is F.gelu or (isinstance(activation, nn.GELU) and activation.approximate == "none"):
        return "gelu"
    raise ValueError(f"module: only the relu and (exact) gelu activations are supported, got {activation!r}")


# --------------------------------------------------------------------------------------------------------------
# Feed-forward networks
# --------------------------------------------------------------------------------------------------------------

class FeedForward(nn.Module):
    r"""The position-wise feed-forward network, applied to every position separately and identically.

    .. math:: \mathrm{FFN}(x) = \phi(x W_1 + b_1)\, W_2 + b_2

    with :math:`\phi` ReLU (the paper) or GELU (BERT, GPT-2).

    Args:
        d_model: input and output feature size.
        d_ff: hidden feature size (the paper: 2048 for ``d_model = 512``, a factor of 4).
        dropout: dropout probability on the hidden activations (training only), where
            :class:`torch.nn.TransformerEncoderLayer` puts it (its ``self.dropout``).
        activation: ``"relu"`` or ``"gelu"`` (exact GELU, Hendrycks & Gimpel 2016).
        bias: whether the two linear maps have biases.

    Submodules: ``linear1`` (``d_model -> d_ff``), ``linear2`` (``d_ff -> d_model``), ``dropout``; the names of
    :class:`torch.nn.TransformerEncoderLayer`. ``2 d_model d_ff (+ d_ff + d_model)`` parameters.

    ``forward(x (B, T, d_model)) -> (B, T, d_model)``, ``linear2(dropout(activation(linear1(x))))`` (any number of
    leading dimensions works; the last must be ``d_model``).

    Raises:
        ValueError: for non-positive sizes, an unknown ``activation``, ``dropout`` outside ``[0, 1]``, or an input
            whose last dimension is not ``d_model`` (naming the argument).

    Source: Vaswani et al. (2017), Sec. 3.3, Eq. 2; GELU: Hendrycks & Gimpel (2016).
    """

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0, activation: str = "relu", bias: bool = True):
        super().__init__()
        _check_positive(d_model=d_model, d_ff=d_ff)
        _check_dropout(dropout)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.d_model, self.d_ff, self.activation = d_model, d_ff, activation
        self.linear1 = nn.Linear(d_model, d_ff, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, min_ndim=1, shape_hint="(B, T, d_model)")
        check_same("x", x.shape[-1:], (self.d_model,), "the feature size d_model")
        hidden = ACTIVATIONS[self.activation](self.linear1(x))  # (B, T, d_ff)
        return self.linear2(self.dropout(hidden))                # (B, T, d_model)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_ff={self.d_ff}, activation={self.activation!r}"


class GLUFeedForward(nn.Module):
    r"""A feed-forward network with a gated linear unit: the hidden layer is the elementwise product of a gate
    and a linear map.

    .. math:: \mathrm{FFN}_\mathrm{GLU}(x) = \big(\sigma(x W) \otimes x V\big)\, W_2

    with :math:`\sigma` replaced by the identity (bilinear), ReLU (ReGLU), GELU (GEGLU) or Swish (SwiGLU,
    :math:`\mathrm{Swish}_1(z) = z\,\mathrm{sigmoid}(z)`, torch's SiLU).

    Args:
        d_model: input and output feature size.
        d_ff: hidden feature size. The GLU has three weight matrices where the plain FFN has two: to match the
            parameter count of a plain FFN of hidden size ``h``, use ``d_ff = GLUFeedForward.matched_d_ff(d_model,
            h)``, about ``2 h / 3`` (Shazeer: ``d_ff = 3072`` for the plain FFN, ``2048`` for the GLU variants).
        variant: ``"glu"``, ``"bilinear"``, ``"reglu"``, ``"geglu"`` or ``"swiglu"`` (see :data:`GLU_VARIANTS`).
        dropout: dropout probability on the gated hidden activations (training only).
        bias: whether the three linear maps have biases (Shazeer's, and Llama's, have none).

    Submodules: ``w_gate`` (:math:`W`, ``d_model -> d_ff``, through the activation), ``w1`` (:math:`V`,
    ``d_model -> d_ff``, linear), ``w2`` (:math:`W_2`, ``d_ff -> d_model``), ``dropout``. In Hugging Face's Llama
    these are ``gate_proj``, ``up_proj`` and ``down_proj``. ``3 d_model d_ff`` weights.

    ``forward(x (B, T, d_model)) -> (B, T, d_model)``, ``w2(dropout(act(w_gate(x)) * w1(x)))``.

    Raises:
        ValueError: for non-positive sizes, an unknown ``variant``, ``dropout`` outside ``[0, 1]``, or an input
            whose last dimension is not ``d_model``.

    Source: Shazeer (2020), "GLU Variants Improve Transformer", Sec. 2; the GLU: Dauphin et al. (2017).
    """

    def __init__(self, d_model: int, d_ff: int, variant: str = "swiglu", dropout: float = 0.0, bias: bool = False):
        super().__init__()
        _check_positive(d_model=d_model, d_ff=d_ff)
        _check_dropout(dropout)
        if variant not in GLU_VARIANTS:
            raise ValueError(f"variant must be one of {sorted(GLU_VARIANTS)}, got {variant!r}")
        self.d_model, self.d_ff, self.variant = d_model, d_ff, variant
        self.w_gate = nn.Linear(d_model, d_ff, bias=bias)
        self.w1 = nn.Linear(d_model, d_ff, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.w2 = nn.Linear(d_ff, d_model, bias=bias)

    @staticmethod
    def matched_d_ff(d_model: int, d_ff: int, multiple_of: int = 1) -> int:
        """The hidden size of a GLU feed-forward with (about) the parameter count of a plain one of hidden size
        ``d_ff``: ``3 d_model h = 2 d_model d_ff`` gives ``h = 2 d_ff / 3``, here ``round(2 * d_ff / 3)``, then
        rounded up to a multiple of ``multiple_of`` (Llama uses 256, for fast matrix multiplies).

        Without biases the parameter counts are then equal when ``3`` divides ``2 d_ff`` (and ``multiple_of = 1``),
        and within ``d_model * 3 * multiple_of / 2`` otherwise. ``d_model`` does not enter the formula; it is
        checked, and kept in the signature so that calls read like the constructor's.

        Raises:
            ValueError: if an argument is not a positive int.

        Source: Shazeer (2020), Sec. 2: with three matrices instead of two, the hidden size is reduced by a factor
        of 2/3 to keep the number of parameters and the computation constant.
        """
        _check_positive(d_model=d_model, d_ff=d_ff, multiple_of=multiple_of)
        hidden = max(1, round(2 * d_ff / 3))
        return multiple_of * math.ceil(hidden / multiple_of)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, min_ndim=1, shape_hint="(B, T, d_model)")
        check_same("x", x.shape[-1:], (self.d_model,), "the feature size d_model")
        hidden = GLU_VARIANTS[self.variant](self.w_gate(x)) * self.w1(x)  # (B, T, d_ff)
        return self.w2(self.dropout(hidden))                               # (B, T, d_model)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_ff={self.d_ff}, variant={self.variant!r}"


# --------------------------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    r"""Root-mean-square layer normalisation: LayerNorm without the mean subtraction and without the bias.

    .. math:: \mathrm{RMSNorm}(x) = \frac{x}{\sqrt{\frac{1}{d}\sum_{i=1}^{d} x_i^2 + \epsilon}} \odot g

    Args:
        d_model: size ``d`` of the last dimension, over which the mean square is taken.
        eps: added to the mean square; ``None`` (the default, as :class:`torch.nn.RMSNorm`) uses
            ``torch.finfo(x.dtype).eps`` of the input's dtype.
        elementwise_affine: learn the gain ``g`` (``weight``, ``(d_model,)``, initialised to ones).

    ``forward(x (..., d_model)) -> (..., d_model)``, same dtype. Equal to ``torch.nn.RMSNorm(d_model, eps,
    elementwise_affine)``.

    Raises:
        ValueError: for a non-positive ``d_model`` or ``eps``, or an input whose last dimension is not ``d_model``
            or whose dtype is not floating.

    Source: Zhang & Sennrich (2019), "Root Mean Square Layer Normalization".
    """

    def __init__(self, d_model: int, eps: float | None = None, elementwise_affine: bool = True):
        super().__init__()
        _check_positive(d_model=d_model)
        if eps is not None and not (isinstance(eps, (int, float)) and eps > 0):
            raise ValueError(f"eps must be a positive float or None, got {eps!r}")
        self.d_model, self.eps, self.elementwise_affine = d_model, eps, elementwise_affine
        self.weight = nn.Parameter(torch.ones(d_model)) if elementwise_affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, min_ndim=1, shape_hint="(..., d_model)")
        check_floating("x", x)
        check_same("x", x.shape[-1:], (self.d_model,), "the feature size d_model")
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
        y = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)  # (..., d_model), unit root mean square
        return y if self.weight is None else y * self.weight

    def extra_repr(self) -> str:
        return f"{self.d_model}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"


# --------------------------------------------------------------------------------------------------------------
# Encoder and decoder layers
# --------------------------------------------------------------------------------------------------------------

def _copy_linear(ours: nn.Linear, theirs: nn.Linear) -> None:
    ours.weight.copy_(theirs.weight)
    if ours.bias is not None:
        ours.bias.copy_(theirs.bias)


def _copy_layer_norm(ours: nn.LayerNorm, theirs: nn.LayerNorm) -> None:
    if theirs.weight is not None:
        ours.weight.copy_(theirs.weight)
    if theirs.bias is not None:
        ours.bias.copy_(theirs.bias)


def _check_torch_layer(module: nn.Module, expected: type) -> dict:
    """The constructor arguments of our layer equivalent to a torch encoder or decoder layer."""
    if not isinstance(module, expected):
        raise TypeError(f"module must be a torch.nn.{expected.__name__}, got {type(module).__name__}")
    if not module.self_attn.batch_first:
        raise ValueError("module: batch_first must be True (our layers are batch-first: (B, T, d_model)); "
                         f"build the torch layer with {expected.__name__}(..., batch_first=True)")
    if module.norm1.eps != module.norm2.eps or not module.norm1.elementwise_affine:
        raise ValueError("module: the layer norms must share one eps and have elementwise_affine=True")
    return dict(d_model=module.self_attn.embed_dim, n_heads=module.self_attn.num_heads,
                d_ff=module.linear1.out_features, dropout=module.dropout.p,
                activation=_activation_name(module.activation), norm_first=module.norm_first,
                layer_norm_eps=module.norm1.eps, bias=module.linear1.bias is not None)


class EncoderLayer(nn.Module):
    r"""One Transformer encoder layer: self-attention and a feed-forward network, each wrapped in a residual
    connection, with the layer normalisation after (Post-LN, the original) or before (Pre-LN) each sublayer.

    .. math::
        \text{Post-LN:}\quad x \leftarrow \mathrm{LN}(x + \mathrm{Sublayer}(x)) \qquad
        \text{Pre-LN:}\quad x \leftarrow x + \mathrm{Sublayer}(\mathrm{LN}(x))

    Args:
        d_model: width of the residual stream.
        n_heads: number of attention heads (must divide ``d_model``).
        d_ff: hidden size of the feed-forward network.
        dropout: dropout probability on the attention weights, the FFN's hidden layer and each sublayer's output
            before the residual addition (training only), as in torch.
        activation: ``"relu"`` or ``"gelu"``.
        norm_first: ``False`` for Post-LN (Vaswani et al. 2017), ``True`` for Pre-LN (Xiong et al. 2020). A stack
            of Pre-LN layers needs one more LayerNorm after the last layer (:mod:`tfcourse.models.transformer`).
        layer_norm_eps: the ``eps`` of the two LayerNorms.
        bias: biases in the linear maps and the LayerNorms.

    Submodules (torch's names, but ``self_attn`` is a :class:`~tfcourse.attention.MultiHeadAttention` and the FFN
    sits in ``ff``): ``self_attn``, ``ff`` (:class:`FeedForward`), ``norm1``, ``norm2`` (:class:`torch.nn.LayerNorm`),
    ``dropout1``, ``dropout2``.

    ``forward(src, src_mask=None, src_key_padding_mask=None, is_causal=False) -> (B, T, d_model)``:

    * ``src``: ``(B, T, d_model)``, the module's dtype.
    * ``src_mask``: ``(T, T)`` or ``(B * n_heads, T, T)``, torch's convention: **bool ``True`` = may NOT attend**,
      float = added to the scores.
    * ``src_key_padding_mask``: ``(B, T)``, **``True`` = padding**.
    * ``is_causal``: apply the causal mask (position ``i`` attends to ``j <= i``); unlike torch, it need not come
      with ``src_mask`` (if both are given, both apply).

    Raises:
        ValueError: for bad sizes (including ``d_model % n_heads != 0``), an unknown ``activation``, or inputs and
            masks of the wrong shape or dtype, naming the argument.

    Source: Vaswani et al. (2017), Sec. 3.1 ("LayerNorm(x + Sublayer(x))") and Fig. 1; residual connections:
    He et al. (2016); layer normalisation: Ba et al. (2016); Pre-LN: Xiong et al. (2020), Fig. 1.
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int = 2048, dropout: float = 0.1,
                 activation: str = "relu", norm_first: bool = False, layer_norm_eps: float = 1e-5,
                 bias: bool = True):
        super().__init__()
        _check_positive(d_model=d_model, n_heads=n_heads, d_ff=d_ff)
        _check_dropout(dropout)
        self.d_model, self.n_heads, self.norm_first = d_model, n_heads, norm_first
        self.self_attn = MultiHeadAttention(d_model, n_heads, dropout=dropout, bias=bias)
        self.ff = FeedForward(d_model, d_ff, dropout=dropout, activation=activation, bias=bias)
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    @classmethod
    def from_torch(cls, module: nn.TransformerEncoderLayer) -> "EncoderLayer":
        """An :class:`EncoderLayer` with the weights (copies), sizes, dropout, dtype, device and training mode of a
        :class:`torch.nn.TransformerEncoderLayer`.

        Raises:
            TypeError: if ``module`` is not a :class:`torch.nn.TransformerEncoderLayer`.
            ValueError: if it was built with ``batch_first=False``, or uses an activation other than relu/gelu.
        """
        kwargs = _check_torch_layer(module, nn.TransformerEncoderLayer)
        weight = module.linear1.weight
        ours = cls(**kwargs).to(device=weight.device, dtype=weight.dtype)
        ours.self_attn = MultiHeadAttention.from_torch(module.self_attn)
        with torch.no_grad():
            _copy_linear(ours.ff.linear1, module.linear1)
            _copy_linear(ours.ff.linear2, module.linear2)
            _copy_layer_norm(ours.norm1, module.norm1)
            _copy_layer_norm(ours.norm2, module.norm2)
        return ours.train(module.training)

    def forward(self, src: torch.Tensor, src_mask: torch.Tensor | None = None,
                src_key_padding_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        _check_input("src", src, self.d_model, self.norm1.weight, "(B, T, d_model)")
        x = src
        if self.norm_first:  # Pre-LN: x + Sublayer(LN(x))
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            x = x + self._ff_block(self.norm2(x))
        else:                # Post-LN: LN(x + Sublayer(x))
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal))
            x = self.norm2(x + self._ff_block(x))
        return x  # (B, T, d_model)

    def _sa_block(self, x, attn_mask, key_padding_mask, is_causal) -> torch.Tensor:
        out, _ = self.self_attn(x, x, x, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                                is_causal=is_causal)
        return self.dropout1(out)

    def _ff_block(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout2(self.ff(x))

    def extra_repr(self) -> str:
        return f"norm_first={self.norm_first}"


class DecoderLayer(nn.Module):
    r"""One Transformer decoder layer: masked self-attention, cross-attention to the encoder's output (the memory)
    and a feed-forward network, each in a residual connection with Post-LN or Pre-LN placement.

    Args: as :class:`EncoderLayer`.

    Submodules: ``self_attn``, ``cross_attn`` (:class:`~tfcourse.attention.MultiHeadAttention`; torch calls it
    ``multihead_attn``), ``ff`` (:class:`FeedForward`), ``norm1``, ``norm2``, ``norm3``, ``dropout1``, ``dropout2``,
    ``dropout3``.

    ``forward(tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
    memory_key_padding_mask=None, tgt_is_causal=False, need_weights=False)``:

    * ``tgt``: ``(B, T, d_model)``; ``memory``: ``(B, S, d_model)``, the same dtype.
    * ``tgt_mask`` ``(T, T)`` and ``memory_mask`` ``(T, S)`` (or with a leading ``B * n_heads``), torch's
      convention: **bool ``True`` = may NOT attend**, float = added.
    * ``tgt_key_padding_mask`` ``(B, T)``, ``memory_key_padding_mask`` ``(B, S)``: **``True`` = padding**.
    * ``tgt_is_causal``: masked self-attention, position ``i`` attends to ``j <= i`` (combined with ``tgt_mask``
      if that is given too; torch needs ``tgt_mask`` and reads the flag only as a hint).
    * Returns ``tgt`` ``(B, T, d_model)``, or ``(tgt, cross_weights)`` with the cross-attention weights **per
      head** ``(B, n_heads, T, S)`` (before dropout) when ``need_weights=True``.

    Raises:
        ValueError: as :class:`EncoderLayer`.

    Source: Vaswani et al. (2017), Sec. 3.1 (decoder: "a third sub-layer, which performs multi-head attention over
    the output of the encoder stack") and Sec. 3.2.3; Pre-LN: Xiong et al. (2020).
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int = 2048, dropout: float = 0.1,
                 activation: str = "relu", norm_first: bool = False, layer_norm_eps: float = 1e-5,
                 bias: bool = True):
        super().__init__()
        _check_positive(d_model=d_model, n_heads=n_heads, d_ff=d_ff)
        _check_dropout(dropout)
        self.d_model, self.n_heads, self.norm_first = d_model, n_heads, norm_first
        self.self_attn = MultiHeadAttention(d_model, n_heads, dropout=dropout, bias=bias)
        self.cross_attn = MultiHeadAttention(d_model, n_heads, dropout=dropout, bias=bias)
        self.ff = FeedForward(d_model, d_ff, dropout=dropout, activation=activation, bias=bias)
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias)
        self.norm3 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    @classmethod
    def from_torch(cls, module: nn.TransformerDecoderLayer) -> "DecoderLayer":
        """A :class:`DecoderLayer` with the weights (copies), sizes, dropout, dtype, device and training mode of a
        :class:`torch.nn.TransformerDecoderLayer` (its ``multihead_attn`` becomes ``cross_attn``).

        Raises:
            TypeError: if ``module`` is not a :class:`torch.nn.TransformerDecoderLayer`.
            ValueError: if it was built with ``batch_first=False``, or uses an activation other than relu/gelu.
        """
        kwargs = _check_torch_layer(module, nn.TransformerDecoderLayer)
        weight = module.linear1.weight
        ours = cls(**kwargs).to(device=weight.device, dtype=weight.dtype)
        ours.self_attn = MultiHeadAttention.from_torch(module.self_attn)
        ours.cross_attn = MultiHeadAttention.from_torch(module.multihead_attn)
        with torch.no_grad():
            _copy_linear(ours.ff.linear1, module.linear1)
            _copy_linear(ours.ff.linear2, module.linear2)
            for mine, theirs in ((ours.norm1, module.norm1), (ours.norm2, module.norm2),
                                 (ours.norm3, module.norm3)):
                _copy_layer_norm(mine, theirs)
        return ours.train(module.training)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, tgt_mask: torch.Tensor | None = None,
                memory_mask: torch.Tensor | None = None, tgt_key_padding_mask: torch.Tensor | None = None,
                memory_key_padding_mask: torch.Tensor | None = None, tgt_is_causal: bool = False,
                need_weights: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        _check_input("tgt", tgt, self.d_model, self.norm1.weight, "(B, T, d_model)")
        _check_input("memory", memory, self.d_model, self.norm1.weight, "(B, S, d_model)")
        check_same("memory", memory.shape[:1], tgt.shape[:1], "the batch size B (tgt's)")
        x = tgt
        if self.norm_first:  # Pre-LN
            x = x + self._sa_block(self.norm1(x), tgt_mask, tgt_key_padding_mask, tgt_is_causal)
            cross, weights = self._mha_block(self.norm2(x), memory, memory_mask, memory_key_padding_mask,
                                             need_weights)
            x = x + cross
            x = x + self._ff_block(self.norm3(x))
        else:                # Post-LN
            x = self.norm1(x + self._sa_block(x, tgt_mask, tgt_key_padding_mask, tgt_is_causal))
            cross, weights = self._mha_block(x, memory, memory_mask, memory_key_padding_mask, need_weights)
            x = self.norm2(x + cross)
            x = self.norm3(x + self._ff_block(x))
        return (x, weights) if need_weights else x  # (B, T, d_model), (B, n_heads, T, S)

    def _sa_block(self, x, attn_mask, key_padding_mask, is_causal) -> torch.Tensor:
        out, _ = self.self_attn(x, x, x, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                                is_causal=is_causal)
        return self.dropout1(out)

    def _mha_block(self, x, memory, attn_mask, key_padding_mask, need_weights):
        out, weights = self.cross_attn(x, memory, memory, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                                       need_weights=need_weights, average_attn_weights=False)
        return self.dropout2(out), weights

    def _ff_block(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout3(self.ff(x))

    def extra_repr(self) -> str:
        return f"norm_first={self.norm_first}"


# --------------------------------------------------------------------------------------------------------------
# A stack of layers with LayerDrop and activation checkpointing (chapter 7)
# --------------------------------------------------------------------------------------------------------------

class LayerStack(nn.Module):
    r"""Layers applied one after another, :math:`x_{l+1} = f_l(x_l)`, with two training options: **LayerDrop**
    (skip each layer at random) and **activation checkpointing** (store less, recompute in backward).

    **LayerDrop** (Fan et al. 2020): in training mode, each layer is skipped with probability ``layerdrop``,
    independently at every forward pass, :math:`x_{l+1} = x_l` (one uniform draw per layer, kept if it exceeds
    ``layerdrop``, as fairseq's ``LayerDropModuleList``). A layer of a Transformer *contains* its residual
    connections, so skipping it leaves the residual stream as it is; in evaluation mode every layer runs, with no
    rescaling. Trained so, the network tolerates missing layers: :meth:`pruned` keeps a subset of them (for
    example every other one) for a shallower, faster model without retraining. The draws use PyTorch's global
    generator (seed it with :func:`tfcourse.device.seed_everything`). Under
    :class:`~torch.nn.parallel.DistributedDataParallel`, a skipped layer's parameters get no gradient: pass
    ``find_unused_parameters=True``.

    **Checkpointing** (Chen et al. 2016): with ``checkpoint=True``, in training mode with gradients enabled, each
    layer runs under :func:`torch.utils.checkpoint.checkpoint` (non-reentrant): its forward pass keeps only its
    input, and backward runs the layer again to rebuild what it needs. Memory for activations drops from one set
    per layer to the layers' inputs plus one layer's set; the price is a second forward pass. The random state is
    saved and restored, so dropout draws the same masks when it recomputes, and gradients equal those without
    checkpointing.

    Args:
        layers: the layers, modules called as ``layer(x, *args, **kwargs) -> x`` with an output of the input's
            shape (for example :class:`EncoderLayer`; extra arguments such as masks go to every layer).
        layerdrop: the probability :math:`p` in ``[0, 1)`` of skipping a layer in training (0: never).
        checkpoint: recompute each layer's activations in backward instead of storing them.

    ``forward(x, *args, **kwargs) -> x`` (the input itself if every layer is skipped).

    Raises:
        ValueError: for an empty ``layers``, a non-module among them, or ``layerdrop`` outside ``[0, 1)``.

    Sources: Fan, Grave and Joulin (2020), "Reducing Transformer depth on demand with structured dropout", Sec. 3
    (LayerDrop; "every other" pruning, Sec. 3.2); Chen et al. (2016), "Training deep nets with sublinear memory
    cost".
    """

    def __init__(self, layers, layerdrop: float = 0.0, checkpoint: bool = False):
        super().__init__()
        layers = list(layers)
        if not layers:
            raise ValueError("layers must hold at least one module")
        for i, layer in enumerate(layers):
            if not isinstance(layer, nn.Module):
                raise ValueError(f"layers[{i}] must be an nn.Module, got {type(layer).__name__}")
        if isinstance(layerdrop, bool) or not isinstance(layerdrop, (int, float)) or not 0.0 <= layerdrop < 1.0:
            raise ValueError(f"layerdrop must lie in [0, 1), got {layerdrop!r}")
        self.layers = nn.ModuleList(layers)
        self.layerdrop, self.checkpoint = float(layerdrop), bool(checkpoint)

    def __len__(self) -> int:
        return len(self.layers)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        keep = torch.ones(len(self.layers), dtype=torch.bool)
        if self.training and self.layerdrop > 0:
            keep = torch.rand(len(self.layers)) >= self.layerdrop  # (L,): True = run the layer this time
        recompute = self.checkpoint and self.training and torch.is_grad_enabled()
        if recompute:
            from torch.utils.checkpoint import checkpoint
        for layer, run in zip(self.layers, keep.tolist()):
            if not run:
                continue  # LayerDrop: x_{l+1} = x_l
            if recompute:
                x = checkpoint(layer, x, *args, use_reentrant=False, **kwargs)
            else:
                x = layer(x, *args, **kwargs)
        return x

    def pruned(self, keep) -> "LayerStack":
        """A stack of the layers at the indices ``keep`` (in their order), **sharing** their parameters with this
        one, with no LayerDrop: ``stack.pruned(range(0, len(stack), 2))`` keeps every other layer.

        Raises:
            ValueError: for no indices, or an index that is repeated, unsorted or out of range.
        """
        keep = list(keep)
        if not keep or any(isinstance(i, bool) or not isinstance(i, int) for i in keep):
            raise ValueError(f"keep must be a non-empty sequence of layer indices, got {keep!r}")
        if keep != sorted(set(keep)) or not 0 <= keep[0] <= keep[-1] < len(self.layers):
            raise ValueError(f"keep must hold increasing indices in [0, {len(self.layers)}), got {keep}")
        return LayerStack([self.layers[i] for i in keep], layerdrop=0.0, checkpoint=self.checkpoint)

    def extra_repr(self) -> str:
        return f"layerdrop={self.layerdrop}, checkpoint={self.checkpoint}"


__all__ += ["LayerStack"]
