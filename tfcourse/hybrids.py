"""Hybrids and other domains (chapter 14): a Conformer block (attention with convolution), graph attention with a
Graphormer-style shortest-path bias, and CLIP's contrastive loss.

* :class:`ConformerBlock`: a macaron of two half feed-forward networks around self-attention and a convolution
  module (Gulati et al. 2020): attention for the global context, a depthwise convolution for local patterns.
* :func:`shortest_path_distances`, :class:`SpatialBias`, :class:`GraphAttentionLayer`: a Transformer over the
  nodes of a graph, which knows the graph only through a learned bias :math:`b_{\\phi(i, j)}` added to the
  attention scores, one per shortest-path distance and head (Ying et al. 2021).
* :func:`clip_loss`: the symmetric contrastive loss that trains an image encoder and a text encoder to put
  matching pairs close together (Radford et al. 2021).

Shapes: ``B`` batch, ``T`` frames, ``C`` = ``d_model``; ``N`` nodes of a graph; ``H`` heads.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from ._checks import DtypeError, check_floating, check_same, check_tensor
from .attention import MultiHeadAttention

__all__ = ["ConformerFeedForward", "ConformerConvModule", "ConformerBlock", "shortest_path_distances",
           "SpatialBias", "GraphAttentionLayer", "clip_loss"]


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_dropout(dropout: object) -> None:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must lie in [0, 1), got {dropout!r}")


def _check_padding(mask: object, B: int, T: int) -> torch.Tensor | None:
    if mask is None:
        return None
    check_tensor("key_padding_mask", mask, ndim=2, shape_hint="(B, T) bool, True = padding")
    if mask.dtype != torch.bool:
        raise DtypeError(f"key_padding_mask must be bool (True = padding), got {mask.dtype}")
    check_same("key_padding_mask", mask.shape, (B, T), "the shape (B, T)")
    return mask


# --------------------------------------------------------------------------------------------------------------
# The Conformer block
# --------------------------------------------------------------------------------------------------------------

class ConformerFeedForward(nn.Module):
    """The Conformer's feed-forward module: ``LayerNorm -> Linear(C, 4C) -> Swish -> Dropout -> Linear(4C, C) ->
    Dropout`` (Gulati et al. 2020, Sec. 2.3 and Fig. 4). ``forward(x (B, T, C)) -> (B, T, C)`` (no residual)."""

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0):
        super().__init__()
        _positive_int("d_model", d_model)
        _positive_int("d_ff", d_ff)
        _check_dropout(dropout)
        self.net = nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, d_ff), nn.SiLU(), nn.Dropout(dropout),
                                 nn.Linear(d_ff, d_model), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConformerConvModule(nn.Module):
    r"""The Conformer's convolution module (Gulati et al. 2020, Sec. 2.2 and Fig. 2):

    ``LayerNorm -> pointwise conv (C -> 2C) -> GLU -> depthwise conv (kernel K) -> BatchNorm -> Swish ->
    pointwise conv (C -> C) -> Dropout``.

    The depthwise convolution mixes each channel over the ``K`` neighbouring frames (``K // 2`` on each side; ``K``
    odd), so an output frame depends on the inputs within ``K // 2`` frames of it only. Padded frames
    (``key_padding_mask`` ``True``) are set to zero before it, so that they do not leak into real frames (in
    training mode BatchNorm's batch statistics still count them).

    ``forward(x (B, T, C), key_padding_mask=None) -> (B, T, C)`` (no residual).

    Raises:
        ValueError: for an even or non-positive ``kernel_size``, or a bad mask.
    """

    def __init__(self, d_model: int, kernel_size: int = 31, dropout: float = 0.0):
        super().__init__()
        _positive_int("d_model", d_model)
        _positive_int("kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (a centred window), got {kernel_size}")
        _check_dropout(dropout)
        self.norm = nn.LayerNorm(d_model)
        self.pointwise1 = nn.Conv1d(d_model, 2 * d_model, 1)
        self.depthwise = nn.Conv1d(d_model, d_model, kernel_size, padding=kernel_size // 2, groups=d_model)
        self.batch_norm = nn.BatchNorm1d(d_model)
        self.pointwise2 = nn.Conv1d(d_model, d_model, 1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = _check_padding(key_padding_mask, x.shape[0], x.shape[1])
        y = self.pointwise1(self.norm(x).transpose(1, 2))                  # (B, 2C, T)
        y = F.glu(y, dim=1)                                                 # (B, C, T)
        if mask is not None:
            y = y.masked_fill(mask[:, None, :], 0.0)
        y = F.silu(self.batch_norm(self.depthwise(y)))                      # (B, C, T)
        return self.dropout(self.pointwise2(y).transpose(1, 2))             # (B, T, C)


class ConformerBlock(nn.Module):
    r"""One Conformer block: two half-step feed-forward modules around multi-head self-attention and a
    convolution module, then a LayerNorm.

    .. math:: \tilde x = x + \tfrac12 \mathrm{FFN}(x), \quad x' = \tilde x + \mathrm{MHSA}(\tilde x), \quad
              x'' = x' + \mathrm{Conv}(x'), \quad y = \mathrm{LayerNorm}\big(x'' + \tfrac12 \mathrm{FFN}(x'')\big)

    The two half feed-forward networks follow the "macaron" structure of Lu et al. (2019); Gulati et al. found
    them better than one full FFN (their Table 3). Attention sees the whole sequence, the convolution a window of
    ``kernel_size`` frames: the hybrid was made for speech, whose spectrogram frames have both local structure
    (phonemes) and long-range structure (words, speakers).

    Args:
        d_model: ``C``.
        n_heads: attention heads (must divide ``C``).
        d_ff: hidden width of each feed-forward module (the paper: ``4 C``).
        kernel_size: of the depthwise convolution (odd; the paper: 32, here odd for a centred window; 31 in
            most implementations).
        dropout: on every module's output and the attention weights.

    Submodules: ``ff1``, ``ff2`` (:class:`ConformerFeedForward`), ``attn_norm``, ``attn``
    (:class:`tfcourse.attention.MultiHeadAttention`), ``conv`` (:class:`ConformerConvModule`), ``final_norm``.

    ``forward(x (B, T, C), key_padding_mask=None) -> (B, T, C)``; ``key_padding_mask`` ``(B, T)`` bool, **True at
    padding**. The paper's self-attention uses Transformer-XL's relative positions; this block has none of its
    own (the caller adds positions, as for chapter 5's layers).

    Raises:
        ValueError: for bad sizes or inputs.

    Source: Gulati et al. (2020), Sec. 2 and Fig. 1, Eq. 1.
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int | None = None, kernel_size: int = 31,
                 dropout: float = 0.0):
        super().__init__()
        d_ff = 4 * d_model if d_ff is None else d_ff
        self.d_model = d_model
        self.ff1 = ConformerFeedForward(d_model, d_ff, dropout)
        self.attn_norm = nn.LayerNorm(d_model)
        self.attn = MultiHeadAttention(d_model, n_heads, dropout=dropout)
        self.attn_dropout = nn.Dropout(dropout)
        self.conv = ConformerConvModule(d_model, kernel_size, dropout)
        self.ff2 = ConformerFeedForward(d_model, d_ff, dropout)
        self.final_norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        check_tensor("x", x, ndim=3, shape_hint="(B, T, C)")
        check_floating("x", x, like=self.attn_norm.weight, like_name="the module's parameters")
        check_same("x", x.shape[-1:], (self.d_model,), "the feature size d_model")
        _check_padding(key_padding_mask, x.shape[0], x.shape[1])
        x = x + 0.5 * self.ff1(x)
        h = self.attn_norm(x)
        a, _ = self.attn(h, h, h, key_padding_mask=key_padding_mask)
        x = x + self.attn_dropout(a)
        x = x + self.conv(x, key_padding_mask)
        return self.final_norm(x + 0.5 * self.ff2(x))                       # (B, T, C)


# --------------------------------------------------------------------------------------------------------------
# Graph attention with a shortest-path bias
# --------------------------------------------------------------------------------------------------------------

def shortest_path_distances(adjacency: torch.Tensor) -> torch.Tensor:
    r"""The number of edges on a shortest path between every pair of nodes of an unweighted graph, by
    breadth-first search from all nodes at once: the nodes within :math:`d + 1` steps are those within :math:`d`
    steps and their neighbours (a Boolean matrix product per step, at most ``N - 1`` steps).

    Args:
        adjacency: ``(N, N)`` bool (or 0/1), ``adjacency[i, j]`` = an edge from ``i`` to ``j``. For an undirected
            graph pass a symmetric matrix. The diagonal is ignored.

    Returns:
        ``(N, N)`` int64: 0 on the diagonal, ``-1`` where ``j`` cannot be reached from ``i``.

    Raises:
        ValueError: for a matrix that is not square, or not 0/1.

    Source: Ying et al. (2021), Sec. 3.1.2 (the spatial encoding :math:`\phi(v_i, v_j)`, the shortest-path
    distance, computed there with Floyd-Warshall).
    """
    check_tensor("adjacency", adjacency, ndim=2, shape_hint="(N, N)")
    N = adjacency.shape[0]
    if adjacency.shape[1] != N:
        raise ValueError(f"adjacency must be square (N, N), got {tuple(adjacency.shape)}")
    if adjacency.dtype != torch.bool:
        if not ((adjacency == 0) | (adjacency == 1)).all():
            raise ValueError("adjacency must hold 0/1 (or bool) entries")
        adjacency = adjacency != 0
    step = adjacency.float()
    distance = torch.full((N, N), -1, dtype=torch.long, device=adjacency.device)
    reached = torch.eye(N, dtype=torch.bool, device=adjacency.device)
    distance[reached] = 0
    for d in range(1, N):
        new = ((reached.float() @ step) > 0) & ~reached                    # one more edge
        if not new.any():
            break
        distance[new] = d
        reached |= new
    return distance


class SpatialBias(nn.Module):
    r"""Graphormer's spatial encoding: a learned scalar per head for each shortest-path distance, added to the
    attention scores, :math:`A_{ij} = \frac{q_i \cdot k_j}{\sqrt{d}} + b_{\phi(i, j)}`.

    Distances above ``max_distance`` share the last bucket; unreachable pairs (distance ``-1``) get a bucket of
    their own. The table starts at zero, so an untrained bias changes nothing.

    Args:
        n_heads: ``H``.
        max_distance: the largest distance with its own bias.

    ``forward(distances (N, N) or (B, N, N) int64) -> (B or 1, H, N, N)`` float bias.

    Raises:
        ValueError: for bad sizes, or distances that are not an integer tensor of values ``>= -1``.

    Source: Ying et al. (2021), Sec. 3.1.2, Eq. 6.
    """

    def __init__(self, n_heads: int, max_distance: int = 8):
        super().__init__()
        _positive_int("n_heads", n_heads)
        _positive_int("max_distance", max_distance)
        self.n_heads, self.max_distance = n_heads, max_distance
        self.table = nn.Embedding(max_distance + 2, n_heads)               # 0..max_distance, then unreachable
        nn.init.zeros_(self.table.weight)

    def forward(self, distances: torch.Tensor) -> torch.Tensor:
        check_tensor("distances", distances, shape_hint="(N, N) or (B, N, N) int64")
        if distances.dim() not in (2, 3) or distances.shape[-1] != distances.shape[-2]:
            raise ValueError(f"distances must have shape (N, N) or (B, N, N), got {tuple(distances.shape)}")
        if distances.is_floating_point() or distances.dtype == torch.bool:
            raise DtypeError(f"distances must be an integer tensor, got {distances.dtype}")
        if distances.numel() and distances.min() < -1:
            raise ValueError("distances must be >= 0, or -1 for unreachable pairs")
        bucket = torch.where(distances < 0, self.max_distance + 1, distances.clamp(max=self.max_distance))
        bias = self.table(bucket)                                          # (..., N, N, H)
        bias = bias.movedim(-1, -3)                                        # (..., H, N, N)
        return bias if bias.dim() == 4 else bias[None]                     # (B or 1, H, N, N)

    def extra_repr(self) -> str:
        return f"n_heads={self.n_heads}, max_distance={self.max_distance}"


class GraphAttentionLayer(nn.Module):
    r"""A Pre-LN Transformer layer over the nodes of a graph, with Graphormer's shortest-path bias:

    .. math:: x \leftarrow x + \mathrm{MHA}\big(\mathrm{LN}(x);\ \text{scores} + b_{\phi(i,j)}\big), \qquad
              x \leftarrow x + \mathrm{FFN}(\mathrm{LN}(x))

    Without the bias the layer sees a set of nodes, not a graph: self-attention is permutation-equivariant and has
    no notion of which nodes are connected. The bias is how the graph enters (Graphormer also adds a degree
    embedding to the inputs, the "centrality encoding", and an edge encoding; those are the caller's here).

    Args:
        d_model: ``C``.
        n_heads: ``H``.
        max_distance: as :class:`SpatialBias`.
        d_ff: hidden width of the FFN (default ``4 C``).
        dropout: on the attention weights and each branch.
        spatial_bias: ``False`` for plain self-attention (the comparison of chapter 14).

    ``forward(x (B, N, C), distances (N, N) or (B, N, N), key_padding_mask=None, need_weights=False)`` ->
    ``(B, N, C)``, or ``(output, weights (B, H, N, N))`` with ``need_weights``.

    Raises:
        ValueError: for bad sizes or inputs.

    Source: Ying et al. (2021), Sec. 3.1 (Graphormer's encodings) and 3.2 (its Pre-LN layer, Eq. 8-9).
    """

    def __init__(self, d_model: int, n_heads: int, max_distance: int = 8, d_ff: int | None = None,
                 dropout: float = 0.0, spatial_bias: bool = True):
        super().__init__()
        _check_dropout(dropout)
        d_ff = 4 * d_model if d_ff is None else d_ff
        self.d_model, self.n_heads = d_model, n_heads
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = MultiHeadAttention(d_model, n_heads, dropout=dropout)
        self.bias = SpatialBias(n_heads, max_distance) if spatial_bias else None
        self.ff = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, distances: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = False):
        check_tensor("x", x, ndim=3, shape_hint="(B, N, C)")
        check_floating("x", x, like=self.norm1.weight, like_name="the module's parameters")
        check_same("x", x.shape[-1:], (self.d_model,), "the feature size d_model")
        B, N, _ = x.shape
        mask = None
        if self.bias is not None:
            if distances is None:
                raise ValueError("distances: a layer with a spatial bias needs the (N, N) shortest-path distances")
            check_same("distances", distances.shape[-2:], (N, N), "(N, N), N the number of nodes of x")
            if distances.dim() == 3:
                check_same("distances", distances.shape[:1], (B,), "the batch size B of x")
            mask = self.bias(distances).to(x.dtype)                             # (B or 1, H, N, N), added
        h = self.norm1(x)
        a, weights = self.attn(h, h, h, key_padding_mask=key_padding_mask, attn_mask=mask,
                               need_weights=need_weights, average_attn_weights=False)
        x = x + self.dropout(a)
        x = x + self.dropout(self.ff(self.norm2(x)))
        return (x, weights) if need_weights else x


# --------------------------------------------------------------------------------------------------------------
# CLIP's contrastive loss
# --------------------------------------------------------------------------------------------------------------

def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor,
              logit_scale: torch.Tensor | float = 1 / 0.07) -> torch.Tensor:
    r"""CLIP's symmetric contrastive loss for a batch of ``n`` matching (image, text) pairs.

    .. math:: S_{ij} = s\, \frac{\mathbf u_i \cdot \mathbf w_j}{\|\mathbf u_i\| \|\mathbf w_j\|}, \qquad
              \ell = \tfrac12 \Big( \frac1n \sum_i -\log \mathrm{softmax}_j(S_{ij})_{j=i}
              + \frac1n \sum_j -\log \mathrm{softmax}_i(S_{ij})_{i=j} \Big)

    Image ``i`` must pick out its own text among the ``n`` texts of the batch (cross-entropy over the rows of
    :math:`S`), and text ``j`` its own image (over the columns): the other ``n - 1`` items of the batch are the
    negatives. :math:`s = 1/\tau` is the inverse temperature; CLIP learns it as :math:`s = e^t`, starting at
    :math:`1/0.07` and clipped at 100.

    Args:
        image_features: ``(n, d)`` floating.
        text_features: ``(n, d)``, same dtype; row ``i`` matches image ``i``.
        logit_scale: :math:`s > 0`, a number or a scalar tensor (learnable).

    Returns:
        A scalar (nats); :math:`\ln n` when all similarities are equal.

    Raises:
        ValueError: for mismatched shapes or dtypes, fewer than two pairs, or a non-positive scale.

    Source: Radford et al. (2021), Sec. 2.3 and Fig. 3 (the numpy-like pseudocode); the symmetric InfoNCE loss
    of Oord et al. (2018) and Zhang et al. (2022).
    """
    check_tensor("image_features", image_features, ndim=2, shape_hint="(n, d)")
    check_tensor("text_features", text_features, ndim=2, shape_hint="(n, d)")
    check_floating("image_features", image_features)
    check_floating("text_features", text_features, like=image_features, like_name="image_features")
    check_same("text_features", text_features.shape, image_features.shape, "the shape of image_features (n, d)")
    n = image_features.shape[0]
    if n < 2:
        raise ValueError(f"image_features: need at least 2 pairs (the others are the negatives), got {n}")
    scale = logit_scale if isinstance(logit_scale, torch.Tensor) else \
        torch.tensor(float(logit_scale), dtype=torch.float64)
    if scale.numel() != 1 or not bool(scale.detach() > 0):
        raise ValueError(f"logit_scale must be a positive scalar, got {logit_scale!r}")
    u, w = F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1)
    logits = scale.to(u.dtype).reshape(()) * u @ w.T                      # (n, n): image i, text j
    labels = torch.arange(n, device=u.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
