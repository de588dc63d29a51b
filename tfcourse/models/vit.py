"""The Vision Transformer (chapter 11): an image as a sequence of patches, read by a Pre-LN Transformer encoder;
and the two ideas that brought back some of a CNN's locality, Swin's (shifted) windows and convolutional stems.

One file, read top to bottom:

* :func:`patchify` and :func:`unpatchify`: ``(B, C, H, W)`` images to ``(B, N, C p^2)`` flattened patches and back.
* :class:`PatchEmbedding`: the linear patch projection as a strided ``Conv2d`` (kernel = stride = ``p``), equal to
  a linear map of :func:`patchify`'s patches (:meth:`PatchEmbedding.linear_weight`).
* :class:`ConvStem`: the convolutional stem of the hybrids (CvT's overlapping convolutional token embedding,
  LeViT's and Xiao et al.'s stack of stride-2 3x3 convolutions), a drop-in replacement of the patch embedding.
* :class:`ViTConfig` (defaults: ViT-B/16 on ImageNet-1k), :class:`ViT` (patch embedding, ``[CLS]`` token or mean
  pooling, learned position embeddings, Pre-LN :class:`tfcourse.layers.EncoderLayer` blocks, a final LayerNorm and
  a linear head) and :meth:`ViT.from_hf`, which copies a Hugging Face ``ViTModel`` or ``ViTForImageClassification``.
* Swin's windows: :func:`window_partition`, :func:`window_reverse`, :func:`shifted_window_regions`,
  :func:`shifted_window_mask` and :class:`WindowAttention` (multi-head attention inside windows, optionally shifted,
  with the mask that keeps the pieces of a cyclically shifted window apart).

Shapes: ``B`` batch, ``C`` image channels, ``H, W`` image (or feature map) height and width, ``p`` the patch size,
``N = (H / p)(W / p)`` the number of patches, ``T = N + 1`` the sequence length with the ``[CLS]`` token (``N``
without it), ``d_model`` the width (Hugging Face's ``hidden_size``), ``M`` the window size, ``n_W`` the number of
windows and ``M^2`` the tokens of one window. Patches are numbered row by row (``n = row * (W / p) + column``), as
Hugging Face and the paper do.

Masks follow :func:`tfcourse.attention.causal_mask`: :func:`shifted_window_mask` is **``True`` where a query may
attend**; :class:`~tfcourse.attention.MultiHeadAttention` takes the opposite (``True`` = may NOT attend), so
:class:`WindowAttention` passes ``~mask``.

Sources: Dosovitskiy et al. (2021), "An image is worth 16x16 words", Sec. 3.1, Eq. 1-4 (ViT) and Appendix D.3
(class token against global average pooling); Liu et al. (2021), "Swin Transformer", Sec. 3.2 and Fig. 2 and 4
(shifted windows, cyclic shift and the attention mask); Wu et al. (2021), "CvT", Sec. 3.1 (convolutional token
embedding); Graham et al. (2021), "LeViT", Sec. 4.1 (a stem of four 3x3 stride-2 convolutions); Xiao et al.
(2021), "Early convolutions help transformers see better" (a convolutional stem in place of the patchify stem).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

from .._checks import check_floating, check_int as _check_int, check_probability as _check_probability, check_tensor
from ..attention import MultiHeadAttention
from ..layers import EncoderLayer
from ..positional import LearnedPositionalEmbedding

if TYPE_CHECKING:  # transformers is imported only by ViT.from_hf
    from transformers import ViTModel

__all__ = ["POOLINGS", "STEMS", "patchify", "unpatchify", "PatchEmbedding", "default_stem_channels", "ConvStem",
           "ViTConfig", "ViTOutput",
           "ViT", "window_partition", "window_reverse", "shifted_window_regions", "shifted_window_mask",
           "WindowAttention"]

#: How :class:`ViT` turns the sequence into one vector: the ``[CLS]`` token's final state, or the mean of the patches'.
POOLINGS = ("cls", "mean")
#: How :class:`ViT` turns the image into tokens: the strided convolution (:class:`PatchEmbedding`) or a
#: convolutional stem (:class:`ConvStem`).
STEMS = ("patch", "conv")


def _check_images(name: str, images: object, patch_size: int | None = None, channels: int | None = None,
                  like: torch.Tensor | None = None) -> torch.Tensor:
    check_tensor(name, images, ndim=4, shape_hint="(B, C, H, W)")
    check_floating(name, images, like=like, like_name="the module's parameters")
    if channels is not None and images.shape[1] != channels:
        raise ValueError(f"{name} must have C = {channels} channels (B, C, H, W), got shape {tuple(images.shape)}")
    if patch_size is not None and (images.shape[2] % patch_size or images.shape[3] % patch_size):
        raise ValueError(f"{name}: H and W must be multiples of the patch size {patch_size}, got "
                         f"{tuple(images.shape[2:])}")
    return images


# --------------------------------------------------------------------------------------------------------------
# Images as sequences of patches
# --------------------------------------------------------------------------------------------------------------

def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    r"""Cut images into non-overlapping ``p x p`` patches and flatten each: ``(B, C, H, W) -> (B, N, C p^2)``.

    .. math:: \mathbf x \in \mathbb R^{H \times W \times C} \;\mapsto\;
              \mathbf x_p \in \mathbb R^{N \times (P^2 \cdot C)}, \qquad N = HW / P^2

    Patches are numbered row by row, ``n = i (W / p) + j`` for the patch in patch-row ``i`` and patch-column ``j``;
    inside a patch the features are ordered channel first, then row, then column (``c p^2 + r p + s``), the order
    of a ``Conv2d`` weight ``(d_model, C, p, p)`` flattened, so that :class:`PatchEmbedding` is a matrix product
    with these vectors (the paper flattens channel last; any fixed order gives the same model class).

    Args:
        images: ``(B, C, H, W)``, floating; ``H`` and ``W`` multiples of ``patch_size``.
        patch_size: ``p``, a positive int.

    Returns:
        ``(B, N, C p^2)``, a copy (the patches of a view are not contiguous in memory).

    Raises:
        ValueError: (including :class:`~tfcourse._checks.DtypeError`) for a non-4-D or non-floating tensor, a bad
            ``patch_size``, or ``H, W`` not multiples of it.

    Source: Dosovitskiy et al. (2021), Sec. 3.1 ("we reshape the image ... into a sequence of flattened 2D patches").
    """
    _check_int("patch_size", patch_size)
    _check_images("images", images, patch_size)
    B, C, H, W = images.shape
    p = patch_size
    x = images.reshape(B, C, H // p, p, W // p, p)          # (B, C, H/p, p, W/p, p)
    x = x.permute(0, 2, 4, 1, 3, 5)                         # (B, H/p, W/p, C, p, p)
    return x.reshape(B, (H // p) * (W // p), C * p * p)     # (B, N, C p^2)


def unpatchify(patches: torch.Tensor, patch_size: int, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`patchify`: ``(B, N, C p^2) -> (B, C, H, W)`` with ``N = (H / p)(W / p)``.

    Raises:
        ValueError: for a non-3-D tensor, ``H`` or ``W`` not multiples of ``p``, or a shape that does not fit.
    """
    _check_int("patch_size", patch_size)
    _check_int("height", height)
    _check_int("width", width)
    check_tensor("patches", patches, ndim=3, shape_hint="(B, N, C p^2)")
    p = patch_size
    if height % p or width % p:
        raise ValueError(f"height and width must be multiples of patch_size={p}, got {(height, width)}")
    B, N, F_ = patches.shape
    if N != (height // p) * (width // p) or F_ % (p * p):
        raise ValueError(f"patches of shape {tuple(patches.shape)} do not fit {height}x{width} images cut into "
                         f"{p}x{p} patches: expected N = {(height // p) * (width // p)} and C p^2 a multiple of {p * p}")
    C = F_ // (p * p)
    x = patches.reshape(B, height // p, width // p, C, p, p)  # (B, H/p, W/p, C, p, p)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(B, C, height, width)


class PatchEmbedding(nn.Module):
    r"""The linear projection of flattened patches, computed as a convolution whose kernel and stride are ``p``.

    .. math:: \mathbf z_n = \mathbf E\, \mathbf x_p^{(n)} + \mathbf b, \qquad \mathbf E \in
              \mathbb R^{d_\text{model} \times C p^2}

    A ``Conv2d(C, d_model, kernel_size=p, stride=p)`` slides its ``(C, p, p)`` kernels over non-overlapping
    windows: output pixel ``(i, j)`` is exactly :math:`\mathbf E \mathbf x_p^{(n)} + \mathbf b` for patch
    ``n = i (W/p) + j``, with :math:`\mathbf E` the weight reshaped to ``(d_model, C p^2)``
    (:meth:`linear_weight`). Hugging Face's ``ViTPatchEmbeddings.projection`` is this layer.

    Args:
        in_channels: ``C``.
        d_model: the token width.
        patch_size: ``p``.

    Submodule: ``proj`` (the ``nn.Conv2d``). ``forward(images (B, C, H, W)) -> (B, N, d_model)``.

    Raises:
        ValueError: for non-positive sizes; in ``forward`` for images that are not ``(B, C, H, W)`` with ``H, W``
            multiples of ``p``, or of another dtype than the weights.

    Source: Dosovitskiy et al. (2021), Sec. 3.1, Eq. 1 (the matrix :math:`\mathbf E`).
    """

    def __init__(self, in_channels: int, d_model: int, patch_size: int):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("d_model", d_model), ("patch_size", patch_size)):
            _check_int(name, value)
        self.in_channels, self.d_model, self.patch_size = in_channels, d_model, patch_size
        self.proj = nn.Conv2d(in_channels, d_model, kernel_size=patch_size, stride=patch_size)

    def linear_weight(self) -> torch.Tensor:
        """:math:`\\mathbf E`, the kernel as a matrix ``(d_model, C p^2)`` acting on :func:`patchify`'s vectors."""
        return self.proj.weight.reshape(self.d_model, -1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _check_images("images", images, self.patch_size, self.in_channels, like=self.proj.weight)
        return self.proj(images).flatten(2).transpose(1, 2)  # (B, d, H/p, W/p) -> (B, N, d), row by row

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, d_model={self.d_model}, patch_size={self.patch_size}"


def default_stem_channels(d_model: int, patch_size: int, strides: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """The widths of :class:`ConvStem`'s 3x3 convolutions when none are given: doubling up to ``d_model / 2``, one
    per stride (default ``log2(p)`` strides of 2; for ``p = 16`` and ``d_model = 256``: 16, 32, 64, 128, where
    LeViT's stem has 32, 64, 128, 256)."""
    k = len(_stem_strides(patch_size, strides))
    return tuple(max(1, d_model // 2 ** (k - i)) for i in range(k))


def _stem_strides(patch_size: int, strides: tuple[int, ...] | None) -> tuple[int, ...]:
    """The strides of the stem's convolutions, checked: 1s and 2s whose product is ``patch_size``."""
    _check_int("patch_size", patch_size)
    if strides is None:
        k = patch_size.bit_length() - 1
        if patch_size < 2 or 2 ** k != patch_size:
            raise ValueError(f"a convolutional stem needs a patch size that is a power of 2 (>= 2), got {patch_size}")
        return (2,) * k
    strides = tuple(strides)
    if not strides or any(s not in (1, 2) or isinstance(s, bool) for s in strides) or math.prod(strides) != patch_size:
        raise ValueError(f"strides must be 1s and 2s whose product is patch_size={patch_size}, got {strides!r}")
    return strides


class ConvStem(nn.Module):
    r"""A convolutional stem: 3x3 convolutions (padding 1, stride 1 or 2, the product of the strides ``p``), each
    with BatchNorm and ReLU, then a 1x1 convolution to ``d_model``. It maps ``(B, C, H, W)`` to the same
    ``N = (H/p)(W/p)`` tokens as :class:`PatchEmbedding`, so it replaces it without changing anything else.

    Unlike the patch embedding, neighbouring tokens see overlapping pixels (each 3x3 kernel reaches over the
    border of its stride), and the nonlinear layers build local features before attention starts: the
    locality and translation equivariance a CNN has by construction. CvT's convolutional token embedding is one
    overlapping strided convolution (Wu et al. 2021, Sec. 3.1); LeViT's stem four 3x3 stride-2 convolutions for
    16x16 patches (Graham et al. 2021, Sec. 4.1); Xiao et al. (2021) stack 3x3 convolutions of stride 2 (and 1)
    with BatchNorm and ReLU and end with a 1x1 convolution, as here.

    Args:
        in_channels: ``C``.
        d_model: the token width.
        patch_size: ``p``, the product of the strides.
        channels: the widths of the 3x3 convolutions (default :func:`default_stem_channels`).
        strides: their strides, 1s and 2s (default ``log2(p)`` 2s, which needs ``p`` a power of 2).

    Submodule: ``layers`` (an ``nn.Sequential``). ``forward(images (B, C, H, W)) -> (B, N, d_model)``.

    Raises:
        ValueError: for strides that are not 1s and 2s multiplying to ``patch_size``, ``channels`` of another
            length, or bad images.
    """

    def __init__(self, in_channels: int, d_model: int, patch_size: int, channels: tuple[int, ...] | None = None,
                 strides: tuple[int, ...] | None = None):
        super().__init__()
        _check_int("in_channels", in_channels)
        _check_int("d_model", d_model)
        strides = _stem_strides(patch_size, strides)
        channels = default_stem_channels(d_model, patch_size, strides) if channels is None else tuple(channels)
        if len(channels) != len(strides):
            raise ValueError(f"channels must hold one width per convolution ({len(strides)}), got {channels!r}")
        for c in channels:
            _check_int("channels[i]", c)
        layers: list[nn.Module] = []
        c_in = in_channels
        for c, stride in zip(channels, strides):
            layers += [nn.Conv2d(c_in, c, kernel_size=3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c),
                       nn.ReLU()]
            c_in = c
        layers.append(nn.Conv2d(c_in, d_model, kernel_size=1))
        self.layers = nn.Sequential(*layers)
        self.in_channels, self.d_model, self.patch_size = in_channels, d_model, patch_size
        self.channels, self.strides = channels, strides

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _check_images("images", images, self.patch_size, self.in_channels, like=self.layers[0].weight)
        return self.layers(images).flatten(2).transpose(1, 2)  # (B, d, H/p, W/p) -> (B, N, d)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, d_model={self.d_model}, patch_size={self.patch_size}, "
                f"strides={self.strides}")


# --------------------------------------------------------------------------------------------------------------
# The configuration
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ViTConfig:
    """The sizes of a :class:`ViT`. The defaults are ViT-B/16 for ImageNet-1k (86 M parameters).

    Attributes:
        image_size: the side of the (square) input images, in pixels.
        patch_size: ``p``, the side of a patch; must divide ``image_size``.
        in_channels: ``C`` (3 for RGB, 1 for grey).
        d_model: the width ``D`` (Hugging Face: ``hidden_size``).
        n_layers: encoder layers ``L``.
        n_heads: attention heads (must divide ``d_model``).
        d_ff: the MLP's hidden size (``4 D`` in ViT; Hugging Face: ``intermediate_size``).
        n_classes: the classes of the linear head; 0 for no head (Hugging Face's ``ViTModel``).
        pooling: ``"cls"``: prepend a learned ``[CLS]`` token and classify its final state (the paper);
            ``"mean"``: no ``[CLS]`` token, classify the mean of the patches' final states (global average pooling,
            the paper's Appendix D.3).
        stem: ``"patch"`` (:class:`PatchEmbedding`) or ``"conv"`` (:class:`ConvStem`).
        stem_channels: the widths of the convolutional stem's 3x3 convolutions (``None``:
            :func:`default_stem_channels`).
        stem_strides: their strides, 1s and 2s multiplying to ``patch_size`` (``None``: ``log2(p)`` 2s).
        dropout: dropout on the embeddings and on each sublayer's output (``hidden_dropout_prob``).
        attention_dropout: dropout on the attention weights (``attention_probs_dropout_prob``).
        layer_norm_eps: the LayerNorms' epsilon (1e-6 in the original code and timm; Hugging Face's ``ViTConfig``
            default is 1e-12; :meth:`from_hf` copies it).
        init_std: the standard deviation of the truncated-normal initial weights (``initializer_range``, 0.02).

    Raises:
        ValueError: for non-positive sizes, ``patch_size`` not dividing ``image_size``, ``d_model % n_heads``, an
            unknown ``pooling`` or ``stem``, probabilities outside ``[0, 1]`` or a non-positive eps or std.

    Source: Dosovitskiy et al. (2021), Table 1 (ViT-Base: L = 12, D = 768, MLP 3072, 12 heads).
    """

    image_size: int = 224
    patch_size: int = 16
    in_channels: int = 3
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    d_ff: int = 3072
    n_classes: int = 1000
    pooling: str = "cls"
    stem: str = "patch"
    stem_channels: tuple[int, ...] | None = None
    stem_strides: tuple[int, ...] | None = None
    dropout: float = 0.0
    attention_dropout: float = 0.0
    layer_norm_eps: float = 1e-6
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "in_channels", "d_model", "n_layers", "n_heads", "d_ff"):
            _check_int(name, getattr(self, name))
        _check_int("n_classes", self.n_classes, minimum=0)
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size={self.patch_size} must divide image_size={self.image_size}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {self.stem!r}")
        for name in ("stem_channels", "stem_strides"):
            if getattr(self, name) is not None:
                if self.stem != "conv":
                    raise ValueError(f"{name} is only for stem='conv'")
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.stem == "conv":
            strides = _stem_strides(self.patch_size, self.stem_strides)
            if self.stem_channels is not None and len(self.stem_channels) != len(strides):
                raise ValueError(f"stem_channels must hold one width per stride ({len(strides)}), got "
                                 f"{self.stem_channels!r}")
        _check_probability("dropout", self.dropout)
        _check_probability("attention_dropout", self.attention_dropout)
        for name in ("layer_norm_eps", "init_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")

    @property
    def grid(self) -> int:
        """The patches along one side, ``image_size / patch_size``."""
        return self.image_size // self.patch_size

    @property
    def n_patches(self) -> int:
        """``N = (image_size / patch_size)^2``."""
        return self.grid ** 2

    @property
    def seq_len(self) -> int:
        """``T``: ``N + 1`` with the ``[CLS]`` token, ``N`` with mean pooling."""
        return self.n_patches + (self.pooling == "cls")

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    def replace(self, **changes) -> ViTConfig:
        """A copy with some fields changed (checked again)."""
        return ViTConfig(**{**asdict(self), **changes})

    def num_parameters(self, pooler: bool = False) -> int:
        r"""The number of parameters of :class:`ViT` with this configuration, from the sizes alone (plain patch
        stem only).

        With :math:`D` = ``d_model``, :math:`F` = ``d_ff``, :math:`K` = ``n_classes``: the patch embedding
        :math:`D(Cp^2 + 1)`; the ``[CLS]`` token :math:`D` (if ``pooling="cls"``); positions :math:`TD`; per layer
        :math:`4D^2 + 4D` (attention) :math:`+ 2DF + F + D` (MLP) :math:`+ 4D` (two LayerNorms); the final
        LayerNorm :math:`2D`; the head :math:`K(D + 1)`; the pooler :math:`D^2 + D`. ViT-B/16 (ImageNet-1k):
        86,567,656.

        Raises:
            ValueError: for ``stem="conv"`` (count it with ``sum(p.numel() for p in model.parameters())``).
        """
        if self.stem != "patch":
            raise ValueError("num_parameters counts the plain patch stem only")
        D, F_, K = self.d_model, self.d_ff, self.n_classes
        embed = D * (self.in_channels * self.patch_size ** 2 + 1) + D * (self.pooling == "cls") + self.seq_len * D
        layer = (4 * D * D + 4 * D) + (2 * D * F_ + F_ + D) + 4 * D
        head = K * (D + 1) if K else 0
        return embed + self.n_layers * layer + 2 * D + head + (D * D + D if pooler else 0)

    @classmethod
    def from_hf(cls, config, n_classes: int = 0) -> ViTConfig:
        """The configuration of a Hugging Face ``ViTConfig`` (with ``n_classes`` classes in the head).

        Raises:
            ValueError: for another model type, an activation other than exact ``"gelu"``, ``qkv_bias=False``,
                non-square images or patches, a ``head_dim`` other than ``hidden_size / num_attention_heads``.
        """
        if getattr(config, "model_type", None) != "vit":
            raise ValueError(f"config must be a ViTConfig, got model_type={getattr(config, 'model_type', None)!r}")
        if config.hidden_act != "gelu":
            raise ValueError(f"config: only the exact 'gelu' activation is supported, got {config.hidden_act!r}")
        if not config.qkv_bias:
            raise ValueError("config: qkv_bias=False is not supported (our attention has biases on all or none of "
                             "its four projections)")
        sizes = {}
        for name in ("image_size", "patch_size"):
            value = getattr(config, name)
            if isinstance(value, (list, tuple)):
                if len(value) != 2 or value[0] != value[1]:
                    raise ValueError(f"config: only square {name} is supported, got {value!r}")
                value = value[0]
            sizes[name] = int(value)
        head_dim = getattr(config, "head_dim", None)
        if head_dim is not None and head_dim * config.num_attention_heads != config.hidden_size:
            raise ValueError(f"config: head_dim={head_dim} must be hidden_size / num_attention_heads")
        return cls(image_size=sizes["image_size"], patch_size=sizes["patch_size"], in_channels=config.num_channels,
                   d_model=config.hidden_size, n_layers=config.num_hidden_layers,
                   n_heads=config.num_attention_heads, d_ff=config.intermediate_size, n_classes=n_classes,
                   pooling="cls", stem="patch", dropout=float(config.hidden_dropout_prob),
                   attention_dropout=float(config.attention_probs_dropout_prob),
                   layer_norm_eps=config.layer_norm_eps, init_std=config.initializer_range)


# --------------------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------------------

class ViTOutput(NamedTuple):
    """What :class:`ViT` returns.

    * ``logits``: ``(B, n_classes)``, or ``None`` for a model without head (``n_classes = 0``);
    * ``last_hidden_state``: ``(B, T, d_model)``, the last layer's output after the final LayerNorm (Hugging Face's
      ``last_hidden_state``);
    * ``pooled``: ``(B, d_model)``, what the head reads: the ``[CLS]`` token's final state, or the patches' mean;
    * ``pooler_output``: ``(B, d_model)``, Hugging Face's ``tanh(W h_[CLS] + b)``, or ``None`` without pooler;
    * ``hidden_states``: with ``output_hidden_states=True``, the ``n_layers + 1`` tensors ``(B, T, d_model)`` that
      enter layer 1, ..., layer L and leave layer L (before the final LayerNorm), as Hugging Face's
      ``hidden_states``; else ``None``;
    * ``attentions``: with ``output_attentions=True``, the ``n_layers`` attention weights ``(B, n_heads, T, T)``
      (before dropout; rows sum to 1); else ``None``.
    """

    logits: torch.Tensor | None
    last_hidden_state: torch.Tensor
    pooled: torch.Tensor
    pooler_output: torch.Tensor | None
    hidden_states: tuple[torch.Tensor, ...] | None
    attentions: tuple[torch.Tensor, ...] | None


def _vit_layer(config: ViTConfig) -> EncoderLayer:
    """One ViT block: the Pre-LN :class:`~tfcourse.layers.EncoderLayer` with GELU, no dropout inside the MLP (ViT,
    like BERT, drops out only the sublayers' outputs) and ``attention_dropout`` on the attention weights."""
    layer = EncoderLayer(config.d_model, config.n_heads, config.d_ff, dropout=config.dropout, activation="gelu",
                         norm_first=True, layer_norm_eps=config.layer_norm_eps)
    layer.self_attn.dropout = config.attention_dropout
    layer.ff.dropout = nn.Identity()
    return layer


class ViT(nn.Module):
    r"""The Vision Transformer: patches, a ``[CLS]`` token, learned positions, a Pre-LN encoder and a linear head.

    .. math::
        \mathbf z_0 &= [\mathbf x_\text{class};\, \mathbf E \mathbf x_p^1;\, \dots;\, \mathbf E \mathbf x_p^N]
                      + \mathbf E_\text{pos}, \quad \mathbf E_\text{pos} \in \mathbb R^{(N + 1) \times D}
                      \qquad &\text{(Eq. 1)} \\
        \mathbf z'_\ell &= \mathrm{MSA}(\mathrm{LN}(\mathbf z_{\ell - 1})) + \mathbf z_{\ell - 1},
        \quad \mathbf z_\ell = \mathrm{MLP}(\mathrm{LN}(\mathbf z'_\ell)) + \mathbf z'_\ell \qquad &\text{(Eq. 2, 3)} \\
        \mathbf y &= \mathrm{LN}(\mathbf z_L^0), \quad \text{logits} = W_\text{head}\, \mathbf y + \mathbf b
        \qquad &\text{(Eq. 4)}

    Each block is a :class:`tfcourse.layers.EncoderLayer` with ``norm_first=True`` (Pre-LN) and exact GELU. The
    position embeddings are a :class:`tfcourse.positional.LearnedPositionalEmbedding` of ``T`` vectors: a 1-D
    table over the patch index, as in the paper, which found no gain from 2-D-aware variants (its Appendix D.4);
    the 2-D structure is *learned* (chapter 11 plots it). With ``pooling="mean"`` there is no ``[CLS]`` token
    and :math:`\mathbf y` is the mean of the LayerNormed patch states. The head is initialised to zero, as the paper
    does for fine-tuning (Sec. 3.2); the other weights are truncated-normal with ``init_std``, biases zero, as
    Hugging Face's.

    Args:
        config: a :class:`ViTConfig`.
        pooler: build Hugging Face's pooler ``tanh(W h_[CLS] + b)`` (``ViTModel``'s ``add_pooling_layer``; only
            :meth:`from_hf` needs it, the head reads ``pooled``). Needs ``pooling="cls"``.

    Submodules: ``patch_embed`` (:class:`PatchEmbedding` or :class:`ConvStem`), ``cls_token`` (``(1, 1, D)``
    parameter, or ``None``), ``position_embeddings``, ``dropout``, ``layers`` (``nn.ModuleList`` of
    :class:`~tfcourse.layers.EncoderLayer`), ``norm`` (the final LayerNorm), ``pooler`` and ``head``
    (``nn.Linear`` or ``None``).

    ``forward(images (B, C, H, W), output_hidden_states=False, output_attentions=False) -> ViTOutput``. The
    attention weights are computed by running each layer's attention once more on its normalised input, so asking
    for them costs one more attention per layer and changes nothing else.

    Raises:
        ValueError: (including :class:`~tfcourse._checks.DtypeError`) for images that are not floating
            ``(B, C, image_size, image_size)`` of the model's dtype.

    Source: Dosovitskiy et al. (2021), Sec. 3.1, Eq. 1-4; Pre-LN: Xiong et al. (2020); mean pooling: Appendix D.3.
    """

    def __init__(self, config: ViTConfig, pooler: bool = False):
        super().__init__()
        if not isinstance(config, ViTConfig):
            raise TypeError(f"config must be a ViTConfig, got {type(config).__name__}")
        if pooler and config.pooling != "cls":
            raise ValueError("pooler=True needs pooling='cls' (it reads the [CLS] token)")
        self.config = config
        D = config.d_model
        if config.stem == "patch":
            self.patch_embed: nn.Module = PatchEmbedding(config.in_channels, D, config.patch_size)
        else:
            self.patch_embed = ConvStem(config.in_channels, D, config.patch_size, config.stem_channels,
                                        config.stem_strides)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if config.pooling == "cls" else None
        self.position_embeddings = LearnedPositionalEmbedding(config.seq_len, D, init_std=config.init_std)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(_vit_layer(config) for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.pooler = nn.Linear(D, D) if pooler else None
        self.head = nn.Linear(D, config.n_classes) if config.n_classes else None
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(module.weight, std=std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
        nn.init.trunc_normal_(self.position_embeddings.weight, std=std)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=std)
        if self.head is not None:
            self.head.weight.zero_()
            self.head.bias.zero_()

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """:math:`\\mathbf z_0` of Eq. 1: ``(B, C, H, W) -> (B, T, D)``, patches (after the ``[CLS]`` token) plus
        positions, dropped out."""
        c = self.config
        _check_images("images", images, channels=c.in_channels)
        if tuple(images.shape[2:]) != (c.image_size, c.image_size):
            raise ValueError(f"images must be (B, {c.in_channels}, {c.image_size}, {c.image_size}), got "
                             f"{tuple(images.shape)}")
        x = self.patch_embed(images)                                           # (B, N, D)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, N + 1, D)
        return self.dropout(self.position_embeddings(x))                     # + E_pos

    def pool(self, last_hidden_state: torch.Tensor) -> torch.Tensor:
        """The vector the head reads, ``(B, T, D) -> (B, D)``: the ``[CLS]`` state or the mean over patches."""
        if self.config.pooling == "cls":
            return last_hidden_state[:, 0]
        return last_hidden_state.mean(dim=1)

    def forward(self, images: torch.Tensor, output_hidden_states: bool = False,
                output_attentions: bool = False) -> ViTOutput:
        x = self.embed(images)                                                 # (B, T, D)
        states = [x] if output_hidden_states else None
        weights = [] if output_attentions else None
        for layer in self.layers:
            if weights is not None:
                h = layer.norm1(x)
                _, w = layer.self_attn(h, h, h, need_weights=True, average_attn_weights=False)
                weights.append(w)                                              # (B, nh, T, T)
            x = layer(x)                                                       # (B, T, D)
            if states is not None:
                states.append(x)
        last = self.norm(x)                                                    # (B, T, D)
        pooled = self.pool(last)                                               # (B, D)
        logits = self.head(pooled) if self.head is not None else None          # (B, n_classes)
        pooler_output = torch.tanh(self.pooler(last[:, 0])) if self.pooler is not None else None
        return ViTOutput(logits, last, pooled, pooler_output, tuple(states) if states is not None else None,
                         tuple(weights) if weights is not None else None)

    def position_similarity(self) -> torch.Tensor:
        """The cosine similarity of every patch's position embedding with every other's, ``(g, g, g, g)`` for a
        ``g x g`` grid of patches: entry ``[i, j, k, l]`` compares patch ``(i, j)`` with patch ``(k, l)`` (the
        ``[CLS]`` position left out). Dosovitskiy et al. (2021), Fig. 7 (centre)."""
        g = self.config.grid
        pos = self.position_embeddings.weight[-self.config.n_patches:].detach()  # (N, D), patches only
        pos = torch.nn.functional.normalize(pos, dim=-1)
        return (pos @ pos.T).reshape(g, g, g, g)

    # ---------------------------------------------------------------------------------------------- from HF

    @classmethod
    def from_hf(cls, module: ViTModel) -> ViT:
        """A :class:`ViT` with the weights (copies), configuration, dtype, device and training mode of a Hugging
        Face ``transformers.ViTModel`` (with or without pooler; no head) or ``ViTForImageClassification`` (its
        ``classifier`` becomes ``head``; no pooler).

        The mapping: ``embeddings.cls_token`` to ``cls_token``, ``embeddings.position_embeddings`` ``(1, T, D)`` to
        ``position_embeddings.weight`` ``(T, D)``, ``embeddings.patch_embeddings.projection`` to
        ``patch_embed.proj``; per layer ``attention.{q,k,v,o}_proj`` to ``self_attn.W_q, W_k, W_v, W_o``,
        ``layernorm_before`` to ``norm1``, ``mlp.fc1`` and ``mlp.fc2`` to ``ff.linear1`` and ``ff.linear2``,
        ``layernorm_after`` to ``norm2``; ``layernorm`` to ``norm``; ``pooler.dense`` to ``pooler``. A mask token
        (``use_mask_token=True``, for masked image modelling) is not copied.

        Raises:
            TypeError: if ``module`` is neither.
            ValueError: as :meth:`ViTConfig.from_hf`, or for a pooler other than ``tanh`` of width ``hidden_size``.
        """
        import transformers

        if isinstance(module, transformers.ViTForImageClassification):
            vit, classifier = module.vit, module.classifier
            if not isinstance(classifier, nn.Linear):
                raise ValueError("module: a ViTForImageClassification with num_labels = 0 has no classifier; "
                                 "pass its .vit")
        elif isinstance(module, transformers.ViTModel):
            vit, classifier = module, None
        else:
            raise TypeError(f"module must be a transformers.ViTModel or ViTForImageClassification, got "
                            f"{type(module).__name__}")
        hf = vit.config
        config = ViTConfig.from_hf(hf, n_classes=classifier.out_features if classifier is not None else 0)
        pooler = vit.pooler is not None
        if pooler and (hf.pooler_act != "tanh" or hf.pooler_output_size != hf.hidden_size):
            raise ValueError("module: only a tanh pooler of width hidden_size is supported")
        weight = vit.embeddings.patch_embeddings.projection.weight
        ours = cls(config, pooler=pooler).to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            emb = vit.embeddings
            ours.cls_token.copy_(emb.cls_token)
            ours.position_embeddings.weight.copy_(emb.position_embeddings[0])
            _copy(ours.patch_embed.proj, emb.patch_embeddings.projection)
            for layer, theirs in zip(ours.layers, vit.layers):
                attn = theirs.attention
                for mine, hf_linear in ((layer.self_attn.W_q, attn.q_proj), (layer.self_attn.W_k, attn.k_proj),
                                        (layer.self_attn.W_v, attn.v_proj), (layer.self_attn.W_o, attn.o_proj),
                                        (layer.norm1, theirs.layernorm_before), (layer.ff.linear1, theirs.mlp.fc1),
                                        (layer.ff.linear2, theirs.mlp.fc2), (layer.norm2, theirs.layernorm_after)):
                    _copy(mine, hf_linear)
            _copy(ours.norm, vit.layernorm)
            if pooler:
                _copy(ours.pooler, vit.pooler.dense)
            if classifier is not None:
                _copy(ours.head, classifier)
        return ours.train(module.training)

    def extra_repr(self) -> str:
        c = self.config
        return (f"image_size={c.image_size}, patch_size={c.patch_size}, n_layers={c.n_layers}, d_model={c.d_model}, "
                f"n_heads={c.n_heads}, pooling={c.pooling!r}, stem={c.stem!r}")


def _copy(ours: nn.Module, theirs: nn.Module) -> None:
    """Copy the weight and bias of a Linear, Conv2d or LayerNorm."""
    ours.weight.copy_(theirs.weight)
    if getattr(ours, "bias", None) is not None:
        ours.bias.copy_(theirs.bias)


# --------------------------------------------------------------------------------------------------------------
# Swin: window attention and shifted windows
# --------------------------------------------------------------------------------------------------------------

def _check_window(height: int, width: int, window_size: int, shift_size: int = 0) -> None:
    _check_int("height", height)
    _check_int("width", width)
    _check_int("window_size", window_size)
    if height % window_size or width % window_size:
        raise ValueError(f"window_size={window_size} must divide the height and width, got {(height, width)} "
                         "(Swin pads the feature map first)")
    _check_int("shift_size", shift_size, minimum=0)
    if shift_size >= window_size:
        raise ValueError(f"shift_size must lie in [0, window_size={window_size}), got {shift_size}")


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """Cut a feature map into non-overlapping ``M x M`` windows: ``(B, H, W, C) -> (B * n_W, M, M, C)``.

    Windows are ordered batch first, then row by row (window ``b * n_W + i (W / M) + j``), with
    ``n_W = (H / M)(W / M)``; :func:`window_reverse` undoes it. The layout and names are Swin's.

    Raises:
        ValueError: for a non-4-D tensor or ``M`` not dividing ``H`` and ``W``.

    Source: Liu et al. (2021), Sec. 3.2 and the reference code's ``window_partition``.
    """
    check_tensor("x", x, ndim=4, shape_hint="(B, H, W, C)")
    B, H, W, C = x.shape
    _check_window(H, W, window_size)
    M = window_size
    x = x.reshape(B, H // M, M, W // M, M, C)                   # (B, H/M, M, W/M, M, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, M, M, C)     # (B * n_W, M, M, C)


def window_reverse(windows: torch.Tensor, window_size: int, height: int, width: int) -> torch.Tensor:
    """Put windows back together: ``(B * n_W, M, M, C) -> (B, H, W, C)``, the inverse of :func:`window_partition`.

    Raises:
        ValueError: for a tensor that is not ``(B * n_W, M, M, C)`` with ``n_W = (H / M)(W / M)``.
    """
    check_tensor("windows", windows, ndim=4, shape_hint="(B * n_W, M, M, C)")
    _check_window(height, width, window_size)
    M = window_size
    n_windows = (height // M) * (width // M)
    if tuple(windows.shape[1:3]) != (M, M) or windows.shape[0] % n_windows:
        raise ValueError(f"windows must be (B * {n_windows}, {M}, {M}, C) for {height}x{width} maps, got "
                         f"{tuple(windows.shape)}")
    B = windows.shape[0] // n_windows
    x = windows.reshape(B, height // M, width // M, M, M, -1)   # (B, H/M, W/M, M, M, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(B, height, width, -1)


def shifted_window_regions(height: int, width: int, window_size: int, shift_size: int,
                           device: torch.device | str | None = None) -> torch.Tensor:
    """Swin's labels of the cyclically shifted map: ``(H, W)`` int64, equal where two positions were neighbours
    before the shift, so that they may attend to each other within a window.

    The shifted windows of Swin are the regular ``M x M`` windows moved by ``s`` = ``shift_size`` down and right;
    at the border they are cut into smaller pieces. Rather than pad, Swin rolls the map by ``-s`` along both axes
    (``torch.roll``), which brings the pieces together into full ``M x M`` windows, and then must stop pieces from
    opposite borders from attending to each other. Along each axis the rolled map has three stretches,
    ``[0, L - M)``, ``[L - M, L - s)`` and ``[L - s, L)`` (the last one wrapped around from the start); the
    ``3 x 3`` products are the regions, labelled ``0..8`` row by row. With ``s = 0`` everything is region 0.

    Raises:
        ValueError: for ``M`` not dividing ``H`` and ``W`` or ``s`` outside ``[0, M)``.

    Source: Liu et al. (2021), Sec. 3.2 ("efficient batch computation for shifted configuration", Fig. 4) and the
    reference code's ``img_mask``.
    """
    _check_window(height, width, window_size, shift_size)
    labels = torch.zeros(height, width, dtype=torch.long, device=device)
    if shift_size == 0:
        return labels
    M, s = window_size, shift_size
    label = 0
    for rows in (slice(0, -M), slice(-M, -s), slice(-s, None)):
        for cols in (slice(0, -M), slice(-M, -s), slice(-s, None)):
            labels[rows, cols] = label
            label += 1
    return labels


def shifted_window_mask(height: int, width: int, window_size: int, shift_size: int,
                        device: torch.device | str | None = None) -> torch.Tensor:
    """The attention mask of (shifted) window attention: ``(n_W, M^2, M^2)`` bool, **``True`` where query ``i`` of
    window ``w`` may attend to key ``j`` of the same window** (the convention of
    :func:`tfcourse.attention.causal_mask`; pass ``~mask`` to :class:`~tfcourse.attention.MultiHeadAttention`).

    Within each window of the rolled map (:func:`shifted_window_regions`) a pair may attend exactly when both
    positions carry the same region label, that is, when they come from the same shifted window of the original
    map. Swin adds -100 to the blocked scores; here they are blocked exactly. Every query may attend at least to
    itself, so no row is fully masked. With ``shift_size = 0`` the mask is all ``True``.

    Args:
        height, width: ``H`` and ``W`` of the feature map, in tokens.
        window_size: ``M``, dividing ``H`` and ``W``.
        shift_size: ``s`` in ``[0, M)`` (Swin uses ``M // 2``).
        device: where to build the mask.

    Raises:
        ValueError: as :func:`shifted_window_regions`.

    Source: Liu et al. (2021), Sec. 3.2 and Fig. 4 ("masked MSA").
    """
    labels = shifted_window_regions(height, width, window_size, shift_size, device)     # (H, W)
    windows = window_partition(labels[None, :, :, None], window_size)                    # (n_W, M, M, 1)
    windows = windows.reshape(-1, window_size * window_size)                             # (n_W, M^2)
    return windows[:, :, None] == windows[:, None, :]                                    # (n_W, M^2, M^2)


class WindowAttention(nn.Module):
    r"""Multi-head self-attention inside non-overlapping ``M x M`` windows of a feature map, optionally shifted.

    With ``shift_size = 0`` each window attends within itself (W-MSA): the cost is linear in the number of
    tokens, :math:`4hwC^2 + 2M^2hwC` against :math:`4hwC^2 + 2(hw)^2C` for global attention (Liu et al., Eq. 1-2).
    With ``shift_size = s > 0`` (SW-MSA) the windows are displaced by ``s``: the map is rolled by ``-s``, cut into
    windows, attended within each under :func:`shifted_window_mask`, put back and rolled by ``+s``. Alternating
    the two in consecutive blocks connects neighbouring windows. The output equals full attention over all
    ``H W`` tokens with a mask that allows only pairs in the same (shifted) window (``tests/test_vit.py`` checks
    it).

    Args:
        d_model: ``C``, the token width.
        n_heads: attention heads.
        window_size: ``M``.
        shift_size: ``s`` in ``[0, M)``.
        dropout: dropout on the attention weights (training only).
        bias: biases in the projections.

    Submodule: ``attn`` (:class:`~tfcourse.attention.MultiHeadAttention`). Swin's relative position bias is left
    out.

    ``forward(x (B, H, W, C), need_weights=False) -> (B, H, W, C)``, or ``(output, weights)`` with the weights per
    window and head ``(B * n_W, n_heads, M^2, M^2)`` (in the rolled map's windows).

    Raises:
        ValueError: for bad sizes; in ``forward`` for ``x`` that is not ``(B, H, W, d_model)`` with ``M`` dividing
            ``H`` and ``W``.

    Source: Liu et al. (2021), Sec. 3.2 (W-MSA, SW-MSA, cyclic shift, masked MSA).
    """

    def __init__(self, d_model: int, n_heads: int, window_size: int, shift_size: int = 0, dropout: float = 0.0,
                 bias: bool = True):
        super().__init__()
        _check_int("window_size", window_size)
        _check_int("shift_size", shift_size, minimum=0)
        if shift_size >= window_size:
            raise ValueError(f"shift_size must lie in [0, window_size={window_size}), got {shift_size}")
        self.d_model, self.n_heads, self.window_size, self.shift_size = d_model, n_heads, window_size, shift_size
        self.attn = MultiHeadAttention(d_model, n_heads, dropout=dropout, bias=bias)

    def forward(self, x: torch.Tensor, need_weights: bool = False):
        check_tensor("x", x, ndim=4, shape_hint="(B, H, W, d_model)")
        check_floating("x", x, like=self.attn.W_q.weight, like_name="the module's parameters")
        B, H, W, C = x.shape
        if C != self.d_model:
            raise ValueError(f"x must be (B, H, W, d_model={self.d_model}), got {tuple(x.shape)}")
        _check_window(H, W, self.window_size, self.shift_size)
        M, s = self.window_size, self.shift_size
        if s:
            x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))                      # cyclic shift, up and left
        windows = window_partition(x, M).reshape(-1, M * M, C)                   # (B * n_W, M^2, C)
        mask = None
        if s:
            allowed = shifted_window_mask(H, W, M, s, device=x.device)           # (n_W, M^2, M^2)
            mask = (~allowed).repeat(B, 1, 1)[:, None]                           # (B * n_W, 1, M^2, M^2), True = blocked
        out, weights = self.attn(windows, windows, windows, attn_mask=mask, need_weights=need_weights,
                                 average_attn_weights=False)                     # (B * n_W, M^2, C)
        out = window_reverse(out.reshape(-1, M, M, C), M, H, W)                  # (B, H, W, C)
        if s:
            out = torch.roll(out, shifts=(s, s), dims=(1, 2))                    # undo the shift
        return (out, weights) if need_weights else out

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, window_size={self.window_size}, "
                f"shift_size={self.shift_size}")
