"""Attention: scoring functions, the masked softmax, scaled dot-product attention and multi-head attention.

Chapter 1 of the book ("Attention as a soft dictionary lookup") builds the scores, the masked softmax and scaled
dot-product attention from scratch; chapter 3 ("Self-attention and multi-head attention") builds
:class:`MultiHeadAttention` (with cross-attention, grouped-query and multi-query attention) and :class:`KVCache`.

Notation (used in every docstring of this module):

* ``B`` batch size, ``Tq`` number of queries, ``Tk`` number of keys (= number of values),
* ``dq``, ``dk``, ``dv`` feature sizes of queries, keys and values,
* ``...`` any number of leading batch dimensions (for example ``(B, n_heads)``), which must be equal between
  arguments: nothing is broadcast silently.

Masks of the functions follow :func:`torch.nn.functional.scaled_dot_product_attention`: a **boolean** mask is
``True`` where a query **may attend** to a key; a **float** mask is **added** to the scores (``-inf`` blocks a key). A
query that may attend to no key at all (a fully masked row) gets all-zero weights and an all-zero output, never NaN.

:class:`MultiHeadAttention` instead follows :class:`torch.nn.MultiheadAttention`, whose boolean masks mean the
**opposite**: ``key_padding_mask`` is ``True`` at **padding** (ignored keys) and a boolean ``attn_mask`` is ``True``
where a query may **not** attend. Each API keeps the convention its PyTorch counterpart's users know.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import DtypeError, check_broadcastable_to, check_floating, check_same, check_tensor

__all__ = [
    "check_qkv",
    "DotProductScore",
    "ScaledDotProductScore",
    "AdditiveScore",
    "MultiplicativeScore",
    "Attention",
    "masked_softmax",
    "scaled_dot_product_attention",
    "causal_mask",
    "lengths_to_mask",
    "split_heads",
    "merge_heads",
    "repeat_kv",
    "MultiHeadAttention",
    "KVCache",
    "kv_cache_bytes",
]


# --------------------------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------------------------

def causal_mask(t_query: int, t_key: int | None = None, device: torch.device | str | None = None, *,
                offset: int = 0) -> torch.Tensor:
    """Boolean causal mask, ``True`` where query ``i`` may attend to key ``j``, that is ``j <= i + offset``.

    Args:
        t_query: number of queries ``Tq``.
        t_key: number of keys ``Tk`` (default ``Tq``). The mask is aligned top-left, as in
            :func:`torch.nn.functional.scaled_dot_product_attention` with ``is_causal=True``.
        device: where to create the mask.
        offset: number of keys that come before the first query (for example tokens already in a
            :class:`KVCache`): query ``i`` is token ``offset + i`` and may attend to keys ``j <= offset + i``.

    Returns:
        ``(Tq, Tk)`` bool tensor, lower triangular (shifted right by ``offset``).

    Raises:
        ValueError: if a length is not a positive integer or ``offset`` is negative.

    Source: Vaswani et al. (2017), Sec. 3.2.3 (masking out "illegal connections" in the decoder).
    """
    t_key = t_query if t_key is None else t_key
    for name, t in (("t_query", t_query), ("t_key", t_key)):
        if not isinstance(t, int) or t < 1:
            raise ValueError(f"{name} must be a positive int, got {t!r}")
    if not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be a non-negative int, got {offset!r}")
    return torch.ones(t_query, t_key, dtype=torch.bool, device=device).tril(diagonal=offset)


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
    return _masked_softmax(scores, mask)


def _masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """:func:`masked_softmax` of checked arguments (a bool ``mask`` that broadcasts to ``scores``)."""
    # A large finite negative number, not -inf: a fully masked row then stays finite (uniform), and is zeroed below.
    blocked = ~mask
    filled = scores.masked_fill(blocked, torch.finfo(scores.dtype).min)
    return torch.softmax(filled, dim=-1).masked_fill(blocked, 0.0)


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

def check_qkv(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, same_length: bool = False) -> None:
    """Check ``query (..., Tq, dk)``, ``key (..., Tk, dk)``, ``value (..., Tk, dv)``: tensors of one floating dtype,
    equal leading dimensions (nothing is broadcast), equal feature sizes of queries and keys, and as many values as
    keys; with ``same_length`` also ``Tq == Tk`` (self-attention).

    Raises:
        TypeError: if an argument is not a tensor.
        ValueError: (including :class:`~tfcourse._checks.DtypeError`) on any mismatch, naming the argument.
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
    if same_length and key.shape[-2] != query.shape[-2]:
        raise ValueError(f"key: self-attention needs Tk equal to query's Tq={query.shape[-2]}, got {key.shape[-2]}")


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
    check_qkv(query, key, value)
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must lie in [0, 1], got {dropout_p}")
    if is_causal and attn_mask is not None:
        raise ValueError("attn_mask must be None when is_causal=True (pass one or the other)")

    t_q, t_k = query.shape[-2], key.shape[-2]
    if is_causal:
        attn_mask = causal_mask(t_q, t_k, device=query.device)
    elif attn_mask is not None:
        check_tensor("attn_mask", attn_mask)
        check_broadcastable_to("attn_mask", attn_mask, (*query.shape[:-1], t_k), "(..., Tq, Tk)")
        if attn_mask.dtype != torch.bool:
            check_floating("attn_mask", attn_mask, like=query, like_name="query (or use a bool mask)")
    output, weights = _attend(query, key, value, attn_mask, dropout_p, scale)
    return (output, weights) if return_weights else output


def _attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
            dropout_p: float, scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The arithmetic of :func:`scaled_dot_product_attention`, on arguments already checked (by it, or by
    :class:`MultiHeadAttention`, which checks its own inputs once): ``mask`` is ``None``, bool (``True`` = may
    attend) or float (added). Returns ``(output, weights)``."""
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    # In place on the fresh product (its backward needs only query and key): one pass over the scores, no copy
    scores = (query @ key.transpose(-2, -1)).mul_(scale)  # (..., Tq, Tk)
    if mask is not None and mask.dtype != torch.bool:
        scores = scores.add_(mask)
        mask = scores != float("-inf")  # keys blocked by -inf; all of a row blocked -> zero output
    weights = torch.softmax(scores, dim=-1) if mask is None else _masked_softmax(scores, mask)
    attended = F.dropout(weights, p=dropout_p) if dropout_p > 0 else weights
    return attended @ value, weights  # (..., Tq, dv), (..., Tq, Tk)


# --------------------------------------------------------------------------------------------------------------
# Multi-head attention: heads, grouped-query attention and the KV cache (chapter 3)
# --------------------------------------------------------------------------------------------------------------

def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Split the features of a batch of sequences into heads: ``(B, T, n_heads * d_head) -> (B, n_heads, T, d_head)``.

    Head ``i`` gets the features ``i * d_head`` to ``(i + 1) * d_head - 1``, the slice of the projection that
    Vaswani et al. (2017), Sec. 3.2.2, write as :math:`W_i^Q`.

    Raises:
        ValueError: if ``x`` is not 3-D or its last dimension is not a multiple of ``n_heads``.
    """
    check_tensor("x", x, ndim=3, shape_hint="(B, T, n_heads * d_head)")
    _check_sizes(n_heads=n_heads)
    if x.shape[-1] % n_heads:
        raise ValueError(f"x: the feature size {x.shape[-1]} is not a multiple of n_heads={n_heads}")
    return _split_heads(x, n_heads)


def _split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """:func:`split_heads` of checked arguments (a generation step calls it three times per layer)."""
    return x.unflatten(-1, (n_heads, x.shape[-1] // n_heads)).transpose(1, 2)  # (B, nh, T, hs)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """Concatenate the heads again: ``(B, n_heads, T, d_head) -> (B, T, n_heads * d_head)``, the inverse of
    :func:`split_heads` (the "Concat" of Vaswani et al. (2017), Sec. 3.2.2).

    Raises:
        ValueError: if ``x`` is not 4-D.
    """
    check_tensor("x", x, ndim=4, shape_hint="(B, n_heads, T, d_head)")
    return _merge_heads(x)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """:func:`merge_heads` of a checked argument."""
    return x.transpose(1, 2).flatten(2)  # (B, T, nh * hs)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Repeat each key/value head ``n_rep`` times for grouped-query attention:
    ``(B, n_kv_heads, T, d_head) -> (B, n_kv_heads * n_rep, T, d_head)``.

    Query head ``i`` is then paired with key/value head ``i // n_rep`` (consecutive query heads form a group), as in
    :func:`torch.nn.functional.scaled_dot_product_attention` with ``enable_gqa=True`` and Hugging Face's Llama.

    Raises:
        ValueError: if ``x`` is not 4-D or ``n_rep`` is not a positive int.

    Source: Ainslie et al. (2023), Sec. 2.2 (grouped-query attention).
    """
    check_tensor("x", x, ndim=4, shape_hint="(B, n_kv_heads, T, d_head)")
    _check_sizes(n_rep=n_rep)
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def kv_cache_bytes(n_layers: int, n_kv_heads: int, d_head: int, seq_len: int, batch_size: int = 1,
                   bytes_per_element: int = 2) -> int:
    """Bytes of the key/value cache of a decoder: ``2 * n_layers * n_kv_heads * d_head * seq_len * batch_size *
    bytes_per_element`` (the 2 counts keys and values; ``bytes_per_element`` is 2 for float16/bfloat16, 4 for
    float32).

    Every layer keeps, for every cached token, one key and one value vector of size ``d_head`` per key/value head.
    Multi-query (``n_kv_heads=1``) and grouped-query attention shrink the cache by ``n_heads / n_kv_heads``.

    Raises:
        ValueError: if an argument is not a positive int.

    Source: Shazeer (2019), Sec. 3; Ainslie et al. (2023), Sec. 1.
    """
    _check_sizes(n_layers=n_layers, n_kv_heads=n_kv_heads, d_head=d_head, seq_len=seq_len, batch_size=batch_size,
                 bytes_per_element=bytes_per_element)
    return 2 * n_layers * n_kv_heads * d_head * seq_len * batch_size * bytes_per_element


class KVCache:
    """The keys and values one attention layer has already projected, kept for incremental (autoregressive) decoding.

    A decoder writes one token at a time. Without a cache, every step would project the keys and values of all the
    earlier tokens again; with it, a step projects only the new token's, appends them here, and attends over all.
    Pass the same cache to successive calls of :meth:`MultiHeadAttention.forward` (``kv_cache=cache``); use one
    cache per layer and per batch of sequences.

    Attributes:
        key, value: ``(B, n_kv_heads, T_cached, d_head)`` tensors (views of the cache's buffers), or ``None`` while
            the cache is empty.

    ``len(cache)`` is ``T_cached``; :attr:`nbytes` is the memory of the cached keys and values, ``2 * B *
    n_kv_heads * T_cached * d_head * element_size`` (compare :func:`kv_cache_bytes`).

    **Storage.** Appending by concatenation would copy the whole cache at every step, a cost that grows with the
    length (quadratic over a generation) and that, at batch 1 on a CPU, dominates a small model's step. So the
    cache writes into preallocated buffers of :attr:`capacity` positions, doubled when full (as a Python list
    grows): each token is copied a constant number of times on average. Production servers preallocate the
    maximum length once, or page the cache in fixed blocks (Kwon et al. 2023, "PagedAttention").
    """

    def __init__(self) -> None:
        self._key: torch.Tensor | None = None      # (B, n_kv_heads, capacity, d_head) buffers
        self._value: torch.Tensor | None = None
        self._length = 0

    @property
    def key(self) -> torch.Tensor | None:
        """The cached keys ``(B, n_kv_heads, T_cached, d_head)``, or ``None`` while empty."""
        return None if self._key is None else self._key[:, :, :self._length]

    @property
    def value(self) -> torch.Tensor | None:
        """The cached values ``(B, n_kv_heads, T_cached, d_head)``, or ``None`` while empty."""
        return None if self._value is None else self._value[:, :, :self._length]

    def __len__(self) -> int:
        return self._length

    @property
    def capacity(self) -> int:
        """Positions the buffers can hold before they are doubled (``>= len(cache)``)."""
        return 0 if self._key is None else self._key.shape[-2]

    @property
    def nbytes(self) -> int:
        """Bytes of the cached keys and values (the buffers reserve ``capacity / len(cache)`` times as much)."""
        if self._key is None:
            return 0
        return self.key.numel() * self.key.element_size() + self.value.numel() * self.value.element_size()

    def reset(self) -> None:
        """Empty the cache (before decoding a new batch)."""
        self._key = self._value = None
        self._length = 0

    def update(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new keys and values ``(B, n_kv_heads, T_new, d_head)`` and return all of them
        ``(B, n_kv_heads, T_cached + T_new, d_head)``.

        Raises:
            ValueError: if the shapes or dtypes differ from each other or from what the cache holds.
        """
        check_tensor("key", key, ndim=4, shape_hint="(B, n_kv_heads, T_new, d_head)")
        check_tensor("value", value, ndim=4, shape_hint="(B, n_kv_heads, T_new, d_head)")
        check_floating("value", value, like=key, like_name="key")
        check_same("value", value.shape[:-1], key.shape[:-1], "the shape but for the last dimension (key's)")
        return self._update(key, value)

    def _update(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`update` of keys and values already checked against each other (by :class:`MultiHeadAttention`,
        which made them); they are still checked against what the cache holds."""
        t_new = key.shape[-2]
        if self._key is None:
            self._key, self._value = key.contiguous(), value.contiguous()
        else:
            check_floating("key", key, like=self._key, like_name="the cached keys")
            check_same("key", (key.shape[0], key.shape[1], key.shape[3]),
                       (self._key.shape[0], self._key.shape[1], self._key.shape[3]),
                       "(B, n_kv_heads, d_head) (the cached keys')")
            check_same("value", value.shape[-1:], self._value.shape[-1:], "d_head (the cached values')")
            if key.device != self._key.device:
                raise ValueError(f"key: on {key.device}, the cached keys on {self._key.device}")
            needed = self._length + t_new
            if needed > self.capacity:                                 # double the buffers (amortised O(1))
                capacity = max(needed, 2 * self.capacity)
                self._key = self._grow(self._key, capacity)
                self._value = self._grow(self._value, capacity)
            self._key[:, :, self._length:needed] = key
            self._value[:, :, self._length:needed] = value
        self._length += t_new
        return self.key, self.value

    def _grow(self, buffer: torch.Tensor, capacity: int) -> torch.Tensor:
        grown = buffer.new_empty(*buffer.shape[:2], capacity, buffer.shape[3])
        grown[:, :, :self._length] = buffer[:, :, :self._length]
        return grown

    def __repr__(self) -> str:
        shape = None if self._key is None else tuple(self.key.shape)
        return f"KVCache(key shape {shape}, {self.nbytes} bytes)"


class MultiHeadAttention(nn.Module):
    r"""Multi-head attention, batch-first, with cross-attention (``kdim``, ``vdim``), grouped-query and multi-query
    attention (``n_kv_heads``) and an optional :class:`KVCache`.

    .. math:: \mathrm{MultiHead}(Q, K, V) = \mathrm{Concat}(\mathrm{head}_1, \dots, \mathrm{head}_h)\, W^O, \qquad
              \mathrm{head}_i = \mathrm{Attention}(Q W_i^Q, K W_i^K, V W_i^V)

    with :math:`d_\text{head} = d_\text{model} / h` and ``Attention`` the scaled dot-product attention of
    :func:`scaled_dot_product_attention`. The per-head matrices :math:`W_i^Q` are the column blocks of one
    ``(d_model, d_model)`` projection ``W_q``, so the layer holds :math:`4 d_\text{model}^2 + 4 d_\text{model}`
    parameters whatever ``n_heads`` is (``kdim = vdim = d_model``, ``n_kv_heads = n_heads``, with biases).

    Args:
        d_model: feature size of the queries and of the output.
        n_heads: number of (query) heads ``h``; must divide ``d_model``.
        dropout: dropout probability on the attention weights, in training mode only.
        bias: whether the four projections have biases.
        kdim, vdim: feature sizes of the ``key`` and ``value`` inputs (default ``d_model``), for cross-attention to
            a memory of another width. Queries and keys are projected to the same size, so any ``kdim`` works.
        n_kv_heads: number of key/value heads: ``n_heads`` (default, standard multi-head attention), ``1``
            (multi-query attention, Shazeer 2019) or a divisor of ``n_heads`` (grouped-query attention, Ainslie et
            al. 2023): query head ``i`` shares key/value head ``i // (n_heads // n_kv_heads)``.

    Parameters: ``W_q`` (``d_model -> d_model``), ``W_k`` (``kdim -> n_kv_heads * d_head``), ``W_v``
    (``vdim -> n_kv_heads * d_head``), ``W_o`` (``d_model -> d_model``), all :class:`torch.nn.Linear`.

    ``forward(query, key, value, key_padding_mask=None, attn_mask=None, is_causal=False, need_weights=False,
    average_attn_weights=True, kv_cache=None) -> (output, weights or None)``:

    * ``query`` ``(B, Tq, d_model)``, ``key`` ``(B, Tk, kdim)``, ``value`` ``(B, Tk, vdim)``, floating, with the
      module's dtype. For self-attention pass the same tensor three times.
    * ``key_padding_mask``: ``(B, Tk)``. **bool: ``True`` marks padding, a key to ignore**, as in
      :class:`torch.nn.MultiheadAttention` (the **opposite** of :func:`lengths_to_mask`: pass
      ``~lengths_to_mask(lengths)``); float: added to the scores.
    * ``attn_mask``: ``(Tq, Tk)``, ``(B * n_heads, Tq, Tk)`` (PyTorch's layout, batch-major) or
      ``(B or 1, n_heads or 1, Tq, Tk)``. **bool: ``True`` = may NOT attend**, as in
      :class:`torch.nn.MultiheadAttention`, and the **opposite** of the bool ``attn_mask`` of
      :func:`scaled_dot_product_attention` and of PyTorch's ``F.scaled_dot_product_attention`` (``True`` = may
      attend); float: added to the scores (``-inf`` blocks).
    * ``is_causal``: query ``i`` may attend to key ``j`` only if ``j <= i + T_cached`` (top-left aligned without a
      cache, as in :func:`causal_mask`). Combined with ``attn_mask`` and ``key_padding_mask`` when those are given.
    * ``need_weights``: also return the attention weights, **averaged over the heads** ``(B, Tq, Tk)`` as PyTorch
      does, or per head ``(B, n_heads, Tq, Tk)`` when ``average_attn_weights=False``.
    * ``kv_cache``: a :class:`KVCache`; ``key`` and ``value`` are then the new tokens only, their projections are
      appended to the cache, and the queries attend over everything cached. Masks then refer to the total length
      ``Tk = T_cached + T_new``.
    * ``output`` is ``(B, Tq, d_model)``. A query that may attend to no key (for example in a fully padded
      sequence) gets zero weights, so its output is ``W_o``'s bias: never NaN.

    Differences from :class:`torch.nn.MultiheadAttention`: always batch-first and batched (3-D inputs);
    ``need_weights`` defaults to ``False`` (PyTorch: ``True``); ``is_causal=True`` builds the causal mask (PyTorch
    treats it only as a hint that ``attn_mask`` is causal and requires ``attn_mask``); the returned weights are
    those *before* dropout (PyTorch returns them after); a fully masked query gives zeros, where PyTorch gives NaN
    when ``need_weights=True`` or on its inference fast path; separate ``W_q, W_k, W_v`` (PyTorch packs them into
    ``in_proj_weight`` when ``kdim = vdim = d_model``); no ``add_bias_kv`` or ``add_zero_attn``; ``n_kv_heads`` and
    ``kv_cache`` have no PyTorch counterpart. :meth:`from_torch` copies the weights of a PyTorch module.

    Raises:
        ValueError: at construction, for non-positive sizes, ``d_model % n_heads != 0``,
            ``n_heads % n_kv_heads != 0`` or ``dropout`` outside ``[0, 1]``; in ``forward`` (including
            :class:`~tfcourse._checks.DtypeError`, also a ``TypeError``), for inputs or masks of the wrong shape
            or dtype, naming the argument.
        TypeError: if an input is not a tensor.

    Source: Vaswani et al. (2017), Sec. 3.2.2 (multi-head attention) and 3.2.3 (its three uses: encoder
    self-attention, masked decoder self-attention, encoder-decoder cross-attention); Shazeer (2019) (multi-query);
    Ainslie et al. (2023) (grouped-query).
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, bias: bool = True, kdim: int | None = None,
                 vdim: int | None = None, n_kv_heads: int | None = None):
        super().__init__()
        kdim = d_model if kdim is None else kdim
        vdim = d_model if vdim is None else vdim
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        _check_sizes(d_model=d_model, n_heads=n_heads, kdim=kdim, vdim=vdim, n_kv_heads=n_kv_heads)
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads} (d_head = d_model / n_heads)")
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads={n_heads} must be divisible by n_kv_heads={n_kv_heads} (each key/value head "
                             f"serves a group of n_heads / n_kv_heads query heads)")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must lie in [0, 1], got {dropout}")
        self.d_model, self.n_heads, self.n_kv_heads = d_model, n_heads, n_kv_heads
        self.d_head = d_model // n_heads
        self.kdim, self.vdim, self.dropout = kdim, vdim, dropout
        self.W_q = nn.Linear(d_model, d_model, bias=bias)
        self.W_k = nn.Linear(kdim, n_kv_heads * self.d_head, bias=bias)
        self.W_v = nn.Linear(vdim, n_kv_heads * self.d_head, bias=bias)
        self.W_o = nn.Linear(d_model, d_model, bias=bias)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # As torch.nn.MultiheadAttention: Xavier-uniform input projections, the output projection's default
        # initialisation, zero biases.
        for linear in (self.W_q, self.W_k, self.W_v):
            nn.init.xavier_uniform_(linear.weight)
        for linear in (self.W_q, self.W_k, self.W_v, self.W_o):
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)

    @classmethod
    def from_torch(cls, module: nn.MultiheadAttention) -> "MultiHeadAttention":
        """A :class:`MultiHeadAttention` with the weights (copies), dtype, device, dropout and training mode of
        a :class:`torch.nn.MultiheadAttention`.

        ``in_proj_weight`` (or ``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight`` when ``kdim`` or ``vdim``
        differs from ``embed_dim``) and ``in_proj_bias`` are split into ``W_q, W_k, W_v``; ``out_proj`` becomes
        ``W_o``. The result is batch-first whatever ``module.batch_first`` is (the weights do not depend on it).

        Raises:
            TypeError: if ``module`` is not a :class:`torch.nn.MultiheadAttention`.
            ValueError: if it uses ``add_bias_kv`` or ``add_zero_attn``, which this class does not implement.
        """
        if not isinstance(module, nn.MultiheadAttention):
            raise TypeError(f"module must be a torch.nn.MultiheadAttention, got {type(module).__name__}")
        if module.bias_k is not None or module.bias_v is not None:
            raise ValueError("module: add_bias_kv=True is not supported by MultiHeadAttention")
        if module.add_zero_attn:
            raise ValueError("module: add_zero_attn=True is not supported by MultiHeadAttention")
        if module._qkv_same_embed_dim:
            w_q, w_k, w_v = module.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = module.q_proj_weight, module.k_proj_weight, module.v_proj_weight
        has_bias = module.in_proj_bias is not None
        ours = cls(module.embed_dim, module.num_heads, dropout=module.dropout, bias=has_bias, kdim=module.kdim,
                   vdim=module.vdim).to(device=w_q.device, dtype=w_q.dtype)
        with torch.no_grad():
            for linear, weight in ((ours.W_q, w_q), (ours.W_k, w_k), (ours.W_v, w_v),
                                   (ours.W_o, module.out_proj.weight)):
                linear.weight.copy_(weight)
            if has_bias:
                for linear, b in zip((ours.W_q, ours.W_k, ours.W_v), module.in_proj_bias.chunk(3)):
                    linear.bias.copy_(b)
                ours.W_o.bias.copy_(module.out_proj.bias)
        return ours.train(module.training)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False, need_weights: bool = False, average_attn_weights: bool = True,
                kv_cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        self._check_inputs(query, key, value)
        B, Tq, _ = query.shape
        # The unchecked helpers (_split_heads: split_heads without its checks): _check_inputs checked the inputs
        q = _split_heads(self.W_q(query), self.n_heads)      # (B, nh, Tq, hs)
        k = _split_heads(self.W_k(key), self.n_kv_heads)     # (B, n_kv, Tk, hs)
        v = _split_heads(self.W_v(value), self.n_kv_heads)   # (B, n_kv, Tk, hs)
        n_cached = 0
        if kv_cache is not None:
            if not isinstance(kv_cache, KVCache):
                raise TypeError(f"kv_cache must be a KVCache, got {type(kv_cache).__name__}")
            n_cached = len(kv_cache)
            k, v = kv_cache._update(k, v)                    # (B, n_kv, T_cached + Tk, hs)
        Tk = k.shape[-2]
        mask = self._merge_masks(key_padding_mask, attn_mask, is_causal, B, Tq, Tk, n_cached, query)
        n_rep = self.n_heads // self.n_kv_heads
        if n_rep > 1:                                        # grouped-query: query head i uses kv head i // n_rep
            k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)  # (B, nh, Tk, hs)
        # scaled_dot_product_attention's arithmetic, without checking again what _check_inputs and _merge_masks did
        out, weights = _attend(q, k, v, mask, self.dropout if self.training else 0.0,
                               None)  # (B, nh, Tq, hs), (B, nh, Tq, Tk)
        out = self.W_o(_merge_heads(out))                    # (B, Tq, d_model)
        if not need_weights:
            return out, None
        return out, (weights.mean(dim=1) if average_attn_weights else weights)

    def _check_inputs(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        check_tensor("query", query, ndim=3, shape_hint="(B, Tq, d_model)")
        check_tensor("key", key, ndim=3, shape_hint="(B, Tk, kdim)")
        check_tensor("value", value, ndim=3, shape_hint="(B, Tk, vdim)")
        check_floating("query", query, like=self.W_q.weight, like_name="the module's parameters")
        check_floating("key", key, like=query, like_name="query")
        check_floating("value", value, like=query, like_name="query")
        _check_last_dim("query", query, self.d_model, "d_model")
        _check_last_dim("key", key, self.kdim, "kdim")
        _check_last_dim("value", value, self.vdim, "vdim")
        check_same("key", key.shape[:1], query.shape[:1], "the batch size B (query's)")
        check_same("value", value.shape[:2], key.shape[:2], "(B, Tk) (key's)")

    def _merge_masks(self, key_padding_mask: torch.Tensor | None, attn_mask: torch.Tensor | None, is_causal: bool,
                     B: int, Tq: int, Tk: int, n_cached: int, query: torch.Tensor) -> torch.Tensor | None:
        """One mask for :func:`scaled_dot_product_attention`, broadcastable to ``(B, n_heads, Tq, Tk)``: bool with
        ``True`` = may attend (that function's convention), or float (added) if a float mask was given."""
        H = self.n_heads
        allowed: torch.Tensor | None = None   # bool, True = may attend
        added: torch.Tensor | None = None     # float, added to the scores

        def combine(mask: torch.Tensor, name: str) -> None:
            nonlocal allowed, added
            if mask.dtype == torch.bool:
                allowed = ~mask if allowed is None else allowed & ~mask  # PyTorch MHA: True = blocked
            else:
                check_floating(name, mask, like=query, like_name="query (or use a bool mask)")
                added = mask if added is None else added + mask

        if key_padding_mask is not None:
            check_tensor("key_padding_mask", key_padding_mask, ndim=2, shape_hint="(B, Tk), True = padding")
            check_same("key_padding_mask", key_padding_mask.shape, (B, Tk), "the shape (B, Tk)")
            combine(key_padding_mask[:, None, None, :], "key_padding_mask")  # (B, 1, 1, Tk)
        if attn_mask is not None:
            check_tensor("attn_mask", attn_mask)
            hint = "(Tq, Tk), (B * n_heads, Tq, Tk) or (B or 1, n_heads or 1, Tq, Tk); bool True = may NOT attend"
            if attn_mask.dim() == 2:
                check_same("attn_mask", attn_mask.shape, (Tq, Tk), f"the shape (Tq, Tk) [{hint}]")
            elif attn_mask.dim() == 3:
                check_same("attn_mask", attn_mask.shape, (B * H, Tq, Tk), f"the shape (B * n_heads, Tq, Tk) [{hint}]")
                attn_mask = attn_mask.view(B, H, Tq, Tk)
            elif attn_mask.dim() == 4:
                ok = attn_mask.shape[0] in (1, B) and attn_mask.shape[1] in (1, H) and attn_mask.shape[2:] == (Tq, Tk)
                if not ok:
                    raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not fit B={B}, "
                                     f"n_heads={H}, Tq={Tq}, Tk={Tk} [{hint}]")
            else:
                raise ValueError(f"attn_mask must have 2, 3 or 4 dimensions [{hint}], got {tuple(attn_mask.shape)}")
            combine(attn_mask, "attn_mask")
        if is_causal and n_cached < Tk - 1:  # otherwise (one new token after the cache) the mask blocks nothing
            causal = causal_mask(Tq, Tk, device=query.device, offset=n_cached)  # (Tq, Tk), True = may attend
            allowed = causal if allowed is None else allowed & causal
        if added is None:
            return allowed
        if allowed is None:
            return added
        return torch.where(allowed, added, torch.full((), float("-inf"), dtype=added.dtype, device=added.device))

    def extra_repr(self) -> str:
        extra = f"d_model={self.d_model}, n_heads={self.n_heads}, d_head={self.d_head}"
        if self.n_kv_heads != self.n_heads:
            extra += f", n_kv_heads={self.n_kv_heads}"
        if (self.kdim, self.vdim) != (self.d_model, self.d_model):
            extra += f", kdim={self.kdim}, vdim={self.vdim}"
        return extra + (f", dropout={self.dropout}" if self.dropout else "")
