"""Attention: scoring functions, the masked softmax and scaled dot-product attention.

Chapter 1 of the book ("Attention as a soft dictionary lookup") builds everything here from scratch.

Notation (used in every docstring of this module):

* ``B`` batch size, ``Tq`` number of queries, ``Tk`` number of keys (= number of values),
* ``dq``, ``dk``, ``dv`` feature sizes of queries, keys and values,
* ``...`` any number of leading batch dimensions (for example ``(B, n_heads)``), which must be equal between
  arguments: nothing is broadcast silently.

Masks follow :func:`torch.nn.functional.scaled_dot_product_attention`: a **boolean** mask is ``True`` where a query
**may attend** to a key; a **float** mask is **added** to the scores (``-inf`` blocks a key). A query that may attend
to no key at all (a fully masked row) gets all-zero weights and an all-zero output, never NaN.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import DtypeError, check_broadcastable_to, check_floating, check_same, check_tensor

__all__ = [
    "DotProductScore",
    "ScaledDotProductScore",
    "AdditiveScore",
    "MultiplicativeScore",
    "Attention",
    "masked_softmax",
    "scaled_dot_product_attention",
    "causal_mask",
    "lengths_to_mask",
]


# --------------------------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------------------------

def causal_mask(t_query: int, t_key: int | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean causal mask, ``True`` where query ``i`` may attend to key ``j``, that is ``j <= i``.

    Args:
        t_query: number of queries ``Tq``.
        t_key: number of keys ``Tk`` (default ``Tq``). The mask is aligned top-left, as in
            :func:`torch.nn.functional.scaled_dot_product_attention` with ``is_causal=True``.
        device: where to create the mask.

    Returns:
        ``(Tq, Tk)`` bool tensor, lower triangular.

    Raises:
        ValueError: if a length is not a positive integer.

    Source: Vaswani et al. (2017), Sec. 3.2.3 (masking out "illegal connections" in the decoder).
    """
    t_key = t_query if t_key is None else t_key
    for name, t in (("t_query", t_query), ("t_key", t_key)):
        if not isinstance(t, int) or t < 1:
            raise ValueError(f"{name} must be a positive int, got {t!r}")
    return torch.ones(t_query, t_key, dtype=torch.bool, device=device).tril()


def lengths_to_mask(lengths: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
    """Boolean mask of the real (non-padding) positions of a padded batch.

    Args:
        lengths: ``(B,)`` integer tensor, the number of real tokens of each sequence.
        max_len: padded length ``T`` (default ``lengths.max()``).

    Returns:
        ``(B, T)`` bool tensor, ``True`` at positions ``t < lengths[b]`` (the keys a query **may attend** to).
        Note that ``torch.nn.MultiheadAttention``'s ``key_padding_mask`` uses the opposite convention
        (``True`` = padding): pass ``~lengths_to_mask(...)`` there.

    Raises:
        ValueError: if ``lengths`` is not a 1-D integer tensor, holds negative values or values above ``max_len``.
    """
    check_tensor("lengths", lengths, ndim=1, shape_hint="(B,)")
    if lengths.is_floating_point() or lengths.dtype == torch.bool:
        raise DtypeError(f"lengths must have an integer dtype, got {lengths.dtype}")
    max_len = int(lengths.max()) if max_len is None else max_len
    if (lengths < 0).any() or (lengths > max_len).any():
        raise ValueError(f"lengths must lie in [0, max_len={max_len}], got {lengths.tolist()}")
    return torch.arange(max_len, device=lengths.device) < lengths[:, None]


# --------------------------------------------------------------------------------------------------------------
# The masked softmax
# --------------------------------------------------------------------------------------------------------------

def masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""Softmax over the last dimension that gives zero weight to masked keys.

    .. math:: \alpha_{ij} = \frac{m_{ij}\exp(s_{ij})}{\sum_{j'} m_{ij'}\exp(s_{ij'})}

    Args:
        scores: ``(..., Tq, Tk)`` floating tensor of attention scores.
        mask: optional boolean tensor broadcastable to ``scores`` (for example ``(B, 1, Tk)`` for key padding or
            ``(Tq, Tk)`` for a causal mask), ``True`` where a query may attend to a key.

    Returns:
        Weights with the shape and dtype of ``scores``; every row sums to 1, except a fully masked row, which is
        all zeros (not NaN: there is nothing to attend to, so nothing is averaged).

    Raises:
        TypeError: if ``scores`` or ``mask`` is not a tensor.
        ValueError: if ``scores`` is not floating, ``mask`` is not boolean (use
            :func:`scaled_dot_product_attention` for additive float masks), or ``mask`` does not broadcast to
            ``scores``'s shape.

    Source: Bahdanau et al. (2015), Eq. 6 (the softmax over alignment scores); the masking as in D2L Sec. 11.3.
    """
    check_tensor("scores", scores, min_ndim=1, shape_hint="(..., Tq, Tk)")
    check_floating("scores", scores)
    if mask is None:
        return torch.softmax(scores, dim=-1)
    check_tensor("mask", mask)
    if mask.dtype != torch.bool:
        raise DtypeError(f"mask must be a bool tensor (True = may attend), got {mask.dtype}")
    check_broadcastable_to("mask", mask, scores.shape, "(..., Tq, Tk)")
    # A large finite negative number, not -inf: a fully masked row then stays finite (uniform), and is zeroed below.
    filled = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.softmax(filled, dim=-1).masked_fill(~mask, 0.0)


# --------------------------------------------------------------------------------------------------------------
# Scoring functions: queries (..., Tq, dq), keys (..., Tk, dk) -> scores (..., Tq, Tk)
# --------------------------------------------------------------------------------------------------------------

def _check_queries_keys(queries: torch.Tensor, keys: torch.Tensor, same_dim: bool) -> None:
    check_tensor("queries", queries, min_ndim=2, shape_hint="(B, Tq, dq)")
    check_tensor("keys", keys, min_ndim=2, shape_hint="(B, Tk, dk)")
    check_floating("queries", queries)
    check_floating("keys", keys, like=queries, like_name="queries")
    if keys.dim() != queries.dim():
        raise ValueError(
            f"keys must have as many dimensions as queries ({queries.dim()}), got shape {tuple(keys.shape)}"
        )
    check_same("keys", keys.shape[:-2], queries.shape[:-2], "the batch dimensions (equal to queries')")
    if same_dim and keys.shape[-1] != queries.shape[-1]:
        raise ValueError(
            f"keys: the feature size dk must equal the queries' dq={queries.shape[-1]} for a dot-product score, "
            f"got {keys.shape[-1]}"
        )


class DotProductScore(nn.Module):
    r"""Dot-product score :math:`a(\mathbf q, \mathbf k) = \mathbf q^\top \mathbf k`.

    ``forward(queries (..., Tq, d), keys (..., Tk, d)) -> (..., Tq, Tk)``. No parameters.

    Source: Luong et al. (2015), Eq. 8 ("dot").
    """

    def forward(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        _check_queries_keys(queries, keys, same_dim=True)
        return queries @ keys.transpose(-2, -1)  # (..., Tq, Tk)


class ScaledDotProductScore(nn.Module):
    r"""Scaled dot-product score :math:`a(\mathbf q, \mathbf k) = \mathbf q^\top \mathbf k / \sqrt{d}`.

    ``forward(queries (..., Tq, d), keys (..., Tk, d)) -> (..., Tq, Tk)``. No parameters. Dividing by
    :math:`\sqrt d` keeps the scores' variance at 1 for unit-variance inputs, so the softmax does not saturate as
    ``d`` grows.

    Source: Vaswani et al. (2017), Eq. 1 and footnote 4.
    """

    def forward(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        _check_queries_keys(queries, keys, same_dim=True)
        return queries @ keys.transpose(-2, -1) / math.sqrt(queries.shape[-1])  # (..., Tq, Tk)


class AdditiveScore(nn.Module):
    r"""Additive (Bahdanau, or Luong "concat") score
    :math:`a(\mathbf q, \mathbf k) = \mathbf w_v^\top \tanh(\mathbf W_q \mathbf q + \mathbf W_k \mathbf k)`.

    Args:
        d_query: query feature size ``dq``.
        d_key: key feature size ``dk`` (may differ from ``dq``).
        d_hidden: size of the hidden layer.
        bias: add a bias inside the ``tanh`` (the papers have none; default ``False``).

    ``forward(queries (..., Tq, dq), keys (..., Tk, dk)) -> (..., Tq, Tk)``. Parameters:
    ``W_q`` ``(d_hidden, dq)``, ``W_k`` ``(d_hidden, dk)``, ``w_v`` ``(1, d_hidden)``. Memory is
    ``O(Tq * Tk * d_hidden)``, the price of scoring every pair through a hidden layer.

    Raises:
        ValueError: for non-positive sizes, or inputs whose shapes do not match the sizes.

    Source: Bahdanau et al. (2015), Appendix A.1.2, Eq. for :math:`a(s_{i-1}, h_j)`; Luong et al. (2015), Eq. 8
    ("concat").
    """

    def __init__(self, d_query: int, d_key: int, d_hidden: int, bias: bool = False):
        super().__init__()
        _check_sizes(d_query=d_query, d_key=d_key, d_hidden=d_hidden)
        self.d_query, self.d_key, self.d_hidden = d_query, d_key, d_hidden
        self.W_q = nn.Linear(d_query, d_hidden, bias=bias)
        self.W_k = nn.Linear(d_key, d_hidden, bias=False)
        self.w_v = nn.Linear(d_hidden, 1, bias=False)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        _check_queries_keys(queries, keys, same_dim=False)
        _check_last_dim("queries", queries, self.d_query, "dq")
        _check_last_dim("keys", keys, self.d_key, "dk")
        features = self.W_q(queries).unsqueeze(-2) + self.W_k(keys).unsqueeze(-3)  # (..., Tq, Tk, d_hidden)
        return self.w_v(torch.tanh(features)).squeeze(-1)  # (..., Tq, Tk)

    def extra_repr(self) -> str:
        return f"d_query={self.d_query}, d_key={self.d_key}, d_hidden={self.d_hidden}"


class MultiplicativeScore(nn.Module):
    r"""Multiplicative (Luong "general") score :math:`a(\mathbf q, \mathbf k) = \mathbf q^\top \mathbf W \mathbf k`.

    Args:
        d_query: query feature size ``dq``.
        d_key: key feature size ``dk`` (may differ from ``dq``).

    ``forward(queries (..., Tq, dq), keys (..., Tk, dk)) -> (..., Tq, Tk)``. One parameter ``W`` of shape
    ``(dq, dk)``, stored as ``self.W.weight``.

    Raises:
        ValueError: for non-positive sizes, or inputs whose shapes do not match the sizes.

    Source: Luong et al. (2015), Eq. 8 ("general").
    """

    def __init__(self, d_query: int, d_key: int):
        super().__init__()
        _check_sizes(d_query=d_query, d_key=d_key)
        self.d_query, self.d_key = d_query, d_key
        self.W = nn.Linear(d_key, d_query, bias=False)  # maps a key into query space: W k

    def forward(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        _check_queries_keys(queries, keys, same_dim=False)
        _check_last_dim("queries", queries, self.d_query, "dq")
        _check_last_dim("keys", keys, self.d_key, "dk")
        return queries @ self.W(keys).transpose(-2, -1)  # (..., Tq, Tk)

    def extra_repr(self) -> str:
        return f"d_query={self.d_query}, d_key={self.d_key}"


def _check_sizes(**sizes: int) -> None:
    for name, size in sizes.items():
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"{name} must be a positive int, got {size!r}")


def _check_last_dim(name: str, x: torch.Tensor, expected: int, symbol: str) -> None:
    if x.shape[-1] != expected:
        raise ValueError(f"{name}: the feature size {symbol} must be {expected}, got shape {tuple(x.shape)}")


class Attention(nn.Module):
    r"""Attention pooling with any scoring function: scores, masked softmax, then a weighted average of values.

    .. math:: \mathrm{attention}(\mathbf q, \{(\mathbf k_j, \mathbf v_j)\}) =
              \sum_j \mathrm{softmax}_j\big(a(\mathbf q, \mathbf k_j)\big)\, \mathbf v_j

    Args:
        score: a module mapping ``(queries (..., Tq, dq), keys (..., Tk, dk))`` to scores ``(..., Tq, Tk)``, e.g.
            :class:`AdditiveScore` or :class:`ScaledDotProductScore`.
        dropout: dropout probability on the attention weights (training only).

    ``forward(queries, keys, values (..., Tk, dv), mask=None) -> (output (..., Tq, dv), weights (..., Tq, Tk))``,
    with ``mask`` a boolean tensor broadcastable to the scores, ``True`` = may attend (see :func:`masked_softmax`).
    """

    def __init__(self, score: nn.Module, dropout: float = 0.0):
        super().__init__()
        self.score = score
        self.dropout = nn.Dropout(dropout)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.score(queries, keys)  # (..., Tq, Tk)
        check_tensor("values", values, ndim=keys.dim(), shape_hint="(..., Tk, dv)")
        check_floating("values", values, like=queries, like_name="queries")
        check_same("values", values.shape[:-1], keys.shape[:-1], "the shape but for the last dimension (keys')")
        weights = masked_softmax(scores, mask)
        return self.dropout(weights) @ values, weights  # (..., Tq, dv), (..., Tq, Tk)


# --------------------------------------------------------------------------------------------------------------
# Scaled dot-product attention
# --------------------------------------------------------------------------------------------------------------

def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    return_weights: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""Scaled dot-product attention, written out: a drop-in for
    :func:`torch.nn.functional.scaled_dot_product_attention`.

    .. math:: \mathrm{Attention}(Q, K, V) = \mathrm{softmax}\!\left(\frac{Q K^\top}{\sqrt{d_k}} + M\right) V

    Args:
        query: ``(..., Tq, dk)`` floating tensor (``...`` is for example ``(B,)`` or ``(B, n_heads)``).
        key: ``(..., Tk, dk)``, same dtype and leading dimensions as ``query``.
        value: ``(..., Tk, dv)``, same dtype and leading dimensions as ``query``.
        attn_mask: optional mask broadcastable to ``(..., Tq, Tk)``. **bool**: ``True`` = may attend;
            **float** (the dtype of ``query``): added to the scores, ``-inf`` blocks.
        dropout_p: dropout probability on the weights. As in PyTorch, it is applied whenever ``dropout_p > 0``
            (pass ``0.0`` at evaluation time).
        is_causal: apply :func:`causal_mask` (top-left aligned). Not allowed together with ``attn_mask``.
        scale: the factor on :math:`QK^\top` (default :math:`1/\sqrt{d_k}`).
        return_weights: also return the attention weights (PyTorch's function cannot).

    Returns:
        ``output`` ``(..., Tq, dv)``, or ``(output, weights)`` with weights ``(..., Tq, Tk)`` when
        ``return_weights``. A fully masked row has zero weights and a zero output (PyTorch 2.5+ agrees).

    Raises:
        TypeError: if an argument is not a tensor.
        ValueError: (including :class:`~tfcourse._checks.DtypeError`, also a ``TypeError``) on mismatched
            dimensions, batch or head sizes, feature sizes, dtypes, mask shapes or an invalid ``dropout_p``.

    Source: Vaswani et al. (2017), Sec. 3.2.1, Eq. 1.
    """
    check_tensor("query", query, min_ndim=2, shape_hint="(..., Tq, dk)")
    check_tensor("key", key, min_ndim=2, shape_hint="(..., Tk, dk)")
    check_tensor("value", value, min_ndim=2, shape_hint="(..., Tk, dv)")
    check_floating("query", query)
    check_floating("key", key, like=query, like_name="query")
    check_floating("value", value, like=query, like_name="query")
    for name, x in (("key", key), ("value", value)):
        if x.dim() != query.dim():
            raise ValueError(f"{name} must have as many dimensions as query ({query.dim()}), got {tuple(x.shape)}")
        check_same(name, x.shape[:-2], query.shape[:-2], "the batch/head dimensions (equal to query's)")
    if key.shape[-1] != query.shape[-1]:
        raise ValueError(f"key: the feature size dk must equal query's ({query.shape[-1]}), got {key.shape[-1]}")
    if value.shape[-2] != key.shape[-2]:
        raise ValueError(f"value: the length Tk must equal key's ({key.shape[-2]}), got {value.shape[-2]}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must lie in [0, 1], got {dropout_p}")
    if is_causal and attn_mask is not None:
        raise ValueError("attn_mask must be None when is_causal=True (pass one or the other)")

    t_q, t_k = query.shape[-2], key.shape[-2]
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = (query @ key.transpose(-2, -1)) * scale  # (..., Tq, Tk)

    if is_causal:
        mask = causal_mask(t_q, t_k, device=query.device)
    elif attn_mask is None:
        mask = None
    else:
        check_tensor("attn_mask", attn_mask)
        check_broadcastable_to("attn_mask", attn_mask, scores.shape, "(..., Tq, Tk)")
        if attn_mask.dtype == torch.bool:
            mask = attn_mask
        else:
            check_floating("attn_mask", attn_mask, like=query, like_name="query (or use a bool mask)")
            scores = scores + attn_mask
            mask = scores != float("-inf")  # keys blocked by -inf; all of a row blocked -> zero output

    weights = masked_softmax(scores, mask)
    attended = F.dropout(weights, p=dropout_p) if dropout_p > 0 else weights
    output = attended @ value  # (..., Tq, dv)
    return (output, weights) if return_weights else output
