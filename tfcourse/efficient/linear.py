r"""Kernel (linear) attention: replace :math:`\exp(\mathbf q^\top \mathbf k)` by a dot product of feature maps.

With a feature map :math:`\phi` the attention output of query :math:`i` is

.. math:: \mathbf o_i = \frac{\sum_j \phi(\mathbf q_i)^\top \phi(\mathbf k_j)\, \mathbf v_j}
                             {\sum_j \phi(\mathbf q_i)^\top \phi(\mathbf k_j)}
                      = \frac{\phi(\mathbf q_i)^\top \big(\sum_j \phi(\mathbf k_j) \mathbf v_j^\top\big)}
                             {\phi(\mathbf q_i)^\top \sum_j \phi(\mathbf k_j)} ,

and the parentheses can be computed once for all queries: :math:`O(T d_\phi d_v)` instead of :math:`O(T^2 d)`.
Causal attention keeps prefix sums :math:`S_i = \sum_{j \le i} \phi(\mathbf k_j) \mathbf v_j^\top` and
:math:`\mathbf z_i = \sum_{j \le i} \phi(\mathbf k_j)`, a recurrence with a state of fixed size: a Transformer that
decodes like an RNN.

* :func:`linear_attention` with :func:`elu_feature_map`, :math:`\phi(x) = \operatorname{elu}(x) + 1`:
  Katharopoulos et al. (2020), *Transformers are RNNs*, Eq. 4-7 (non-causal), Eq. 8-12 (causal) and Eq. 18-20
  (:func:`linear_attention_recurrent`).
* :func:`performer_attention` with :func:`favor_features`: Performer's FAVOR+ positive orthogonal random features,
  an unbiased estimate of the softmax kernel :math:`\exp(\mathbf q^\top \mathbf k / \sqrt d)`: Choromanski et al.
  (2021), *Rethinking attention with Performers*, Lemma 1 and Sec. 2.4.

**Cost.** :math:`O(T d_\phi d_v)` time, :math:`O(T d_\phi + d_\phi d_v)` memory (the causal prefix-sum form here
materialises :math:`S_i` for every position, :math:`O(T d_\phi d_v)`; the recurrent form keeps one state).

**What it gives up.** The elu+1 kernel is a *different* attention, not an approximation of the softmax: its
weights are smoother, with no sharp peaks on one key, and models must be trained with it. FAVOR+ approximates the
softmax, but with a variance that grows with the size of the scores and shrinks only as :math:`1/m` in the number of
features :math:`m`; peaked attention needs many features. Neither has an attention matrix to mask arbitrarily.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from .._checks import check_tensor
from ..attention import causal_mask
from ._common import check_generator, check_positive_int, check_qkv

__all__ = ["elu_feature_map", "linear_attention", "linear_attention_quadratic", "linear_attention_recurrent",
           "orthogonal_gaussian", "favor_features", "performer_attention", "performer_weights"]

FeatureMap = Callable[[torch.Tensor], torch.Tensor]


def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    r""":math:`\phi(x) = \operatorname{elu}(x) + 1`, elementwise: positive (:math:`e^x` for :math:`x < 0`, which
    rounds to 0 below about -17 in float32), so no weight is negative (Katharopoulos et al., 2020, Eq. 7).
    ``(..., d) -> (..., d)``."""
    return F.elu(x) + 1.0


def _features(query, key, feature_map):
    if feature_map is None:
        return query, key
    if not callable(feature_map):
        raise TypeError(f"feature_map must be callable or None, got {type(feature_map).__name__}")
    return feature_map(query), feature_map(key)


def linear_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, causal: bool = False,
                     feature_map: FeatureMap | None = elu_feature_map, eps: float = 1e-6) -> torch.Tensor:
    r"""Linear attention in :math:`O(T)`: :math:`\phi(Q)\,(\phi(K)^\top V)` normalised by
    :math:`\phi(Q)\,\phi(K)^\top \mathbf 1`, or its causal form with prefix sums.

    Args:
        query: ``(..., Tq, dk)``; key: ``(..., Tk, dk)``; value: ``(..., Tk, dv)``; causal needs ``Tq == Tk``.
        causal: query ``i`` uses keys ``j <= i``: the prefix sums
            :math:`S_i = \sum_{j \le i} \phi(\mathbf k_j) \mathbf v_j^\top` (``(..., T, dφ, dv)``, computed with
            ``cumsum``) and :math:`\mathbf z_i = \sum_{j \le i} \phi(\mathbf k_j)`.
        feature_map: :math:`\phi`, applied to queries and keys (default elu+1); ``None`` if ``query`` and ``key``
            already hold the features (as :func:`performer_attention` passes them).
        eps: added to the denominator.

    Returns:
        ``(..., Tq, dv)``, equal to :func:`linear_attention_quadratic` up to rounding.

    Source: Katharopoulos et al. (2020), Eq. 6 (non-causal) and Eq. 9-12 (causal).
    """
    check_qkv(query, key, value, same_length=causal)
    phi_q, phi_k = _features(query, key, feature_map)
    if not causal:
        kv = phi_k.transpose(-2, -1) @ value                                 # (..., dφ, dv)
        z = phi_k.sum(dim=-2)                                                # (..., dφ)
        return (phi_q @ kv) / ((phi_q * z[..., None, :]).sum(-1, keepdim=True) + eps)
    s = torch.cumsum(phi_k[..., :, None] * value[..., None, :], dim=-3)     # S_i: (..., T, dφ, dv)
    z = torch.cumsum(phi_k, dim=-2)                                          # z_i: (..., T, dφ)
    numerator = (phi_q[..., None, :] @ s).squeeze(-2)                        # (..., T, dv)
    return numerator / ((phi_q * z).sum(-1, keepdim=True) + eps)


def linear_attention_quadratic(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, causal: bool = False,
                               feature_map: FeatureMap | None = elu_feature_map, eps: float = 1e-6) -> torch.Tensor:
    r"""The same attention in its quadratic form, :math:`A = \phi(Q)\phi(K)^\top` (masked to :math:`j \le i` if
    ``causal``), rows normalised: :math:`O(T^2)`. The reference that :func:`linear_attention` must equal.

    Returns:
        ``(..., Tq, dv)``.
    """
    check_qkv(query, key, value, same_length=causal)
    phi_q, phi_k = _features(query, key, feature_map)
    a = phi_q @ phi_k.transpose(-2, -1)                                      # (..., Tq, Tk)
    if causal:
        a = a * causal_mask(a.shape[-2], a.shape[-1], device=a.device)
    return (a @ value) / (a.sum(-1, keepdim=True) + eps)


def linear_attention_recurrent(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               feature_map: FeatureMap | None = elu_feature_map, eps: float = 1e-6) -> torch.Tensor:
    r"""Causal linear attention as an RNN: one step per token, with a state
    :math:`(S, \mathbf z)` of size :math:`d_\phi (d_v + 1)` whatever the position.

    .. math:: S_i = S_{i-1} + \phi(\mathbf k_i)\mathbf v_i^\top, \quad \mathbf z_i = \mathbf z_{i-1} +
              \phi(\mathbf k_i), \quad \mathbf o_i = \frac{\phi(\mathbf q_i)^\top S_i}{\phi(\mathbf q_i)^\top
              \mathbf z_i}

    Returns:
        ``(..., T, dv)``, equal to ``linear_attention(..., causal=True)``.

    Source: Katharopoulos et al. (2020), Eq. 18-20.
    """
    check_qkv(query, key, value, same_length=True)
    phi_q, phi_k = _features(query, key, feature_map)
    s = phi_q.new_zeros(*phi_q.shape[:-2], phi_q.shape[-1], value.shape[-1])  # (..., dφ, dv)
    z = phi_q.new_zeros(*phi_q.shape[:-2], phi_q.shape[-1])                   # (..., dφ)
    outputs = []
    for i in range(query.shape[-2]):
        s = s + phi_k[..., i, :, None] * value[..., i, None, :]
        z = z + phi_k[..., i, :]
        q_i = phi_q[..., i, :]
        outputs.append((q_i[..., None, :] @ s).squeeze(-2) / ((q_i * z).sum(-1, keepdim=True) + eps))
    return torch.stack(outputs, dim=-2)


# --------------------------------------------------------------------------------------------------------------
# Performer: FAVOR+
# --------------------------------------------------------------------------------------------------------------

def orthogonal_gaussian(n_features: int, d: int, generator: torch.Generator | None = None,
                        orthogonal: bool = True, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    r"""Random projection :math:`W \in \mathbb R^{m \times d}` whose rows are distributed as :math:`N(0, I_d)`;
    with ``orthogonal`` the rows are orthogonal within each block of ``d`` (Gram-Schmidt by QR), and rescaled to
    the norms of independent Gaussian vectors, which keeps each row's distribution and lowers the variance of the
    kernel estimate (Choromanski et al., 2021, Sec. 2.4, Theorem 2).

    Returns:
        ``(n_features, d)``.
    """
    check_positive_int("n_features", n_features)
    check_positive_int("d", d)
    check_generator(generator)
    if not orthogonal:
        return torch.randn(n_features, d, generator=generator, dtype=dtype)
    blocks = []
    for _ in range(math.ceil(n_features / d)):
        g = torch.randn(d, d, generator=generator, dtype=torch.float64)
        q, _ = torch.linalg.qr(g)                                            # orthonormal columns
        blocks.append(q.T)
    w = torch.cat(blocks)[:n_features]
    norms = torch.randn(n_features, d, generator=generator, dtype=torch.float64).norm(dim=1)
    return (w * norms[:, None]).to(dtype)


def favor_features(x: torch.Tensor, projection: torch.Tensor, is_query: bool, eps: float = 0.0) -> torch.Tensor:
    r"""FAVOR+ positive random features of the softmax kernel:

    .. math:: \phi(\mathbf x) = \frac{1}{\sqrt m} \exp\!\big(W \mathbf x - \tfrac12 \|\mathbf x\|^2\big),
              \qquad \mathbb E\big[\phi(\mathbf x)^\top \phi(\mathbf y)\big] = \exp(\mathbf x^\top \mathbf y).

    For numerical safety a constant is subtracted inside the exponential (the maximum over the features of each
    query, or over all the keys' features), which cancels exactly between numerator and denominator of the
    attention. The Performer's code also adds a small ``eps`` to every feature; that breaks the cancellation (in a
    causal model it would even let future keys, through the keys' maximum, change past outputs slightly), so
    :func:`performer_attention` uses ``eps=0``.

    Args:
        x: ``(..., T, d)``, queries or keys already scaled by :math:`d^{-1/4}`.
        projection: ``(m, d)`` from :func:`orthogonal_gaussian`.
        is_query: which stabiliser to subtract (per row for queries, global for keys).

    Returns:
        ``(..., T, m)``, positive.

    Source: Choromanski et al. (2021), Lemma 1, Eq. 7 (positive random features).
    """
    check_tensor("x", x, min_ndim=2, shape_hint="(..., T, d)")
    check_tensor("projection", projection, ndim=2, shape_hint="(m, d)")
    if projection.shape[1] != x.shape[-1]:
        raise ValueError(f"projection must be (m, {x.shape[-1]}), got {tuple(projection.shape)}")
    wx = x @ projection.to(x.dtype).T                                        # (..., T, m)
    sq = 0.5 * (x * x).sum(-1, keepdim=True)                                 # (..., T, 1)
    if is_query:
        stabiliser = wx.amax(dim=-1, keepdim=True)
    else:
        stabiliser = wx.amax(dim=(-2, -1), keepdim=True)
    return (torch.exp(wx - sq - stabiliser) + eps) / math.sqrt(projection.shape[0])


def _performer_features(query, key, n_features, generator, orthogonal, projection):
    d = query.shape[-1]
    if projection is None:
        projection = orthogonal_gaussian(n_features, d, generator, orthogonal=orthogonal)
    projection = projection.to(query.device)
    scale = d ** -0.25                                                       # q^T k / sqrt(d) = (q d^-1/4)^T (k d^-1/4)
    return (favor_features(query * scale, projection, is_query=True),
            favor_features(key * scale, projection, is_query=False))


def performer_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, n_features: int = 256,
                        causal: bool = False, generator: torch.Generator | None = None, orthogonal: bool = True,
                        projection: torch.Tensor | None = None) -> torch.Tensor:
    r"""Performer attention (FAVOR+): softmax attention :math:`\operatorname{softmax}(QK^\top/\sqrt d)V`
    approximated in linear time with ``n_features`` positive orthogonal random features.

    Args:
        query, key, value: ``(..., T, d)`` tensors (``Tq == Tk`` if ``causal``).
        n_features: :math:`m`, the number of random features (ignored if ``projection`` is given).
        causal: prefix-sum form, as in :func:`linear_attention`.
        generator: for the random projection. orthogonal: orthogonal blocks (FAVOR+) or i.i.d. rows.
        projection: an ``(m, d)`` projection to reuse (e.g. to compare with a fixed draw).

    Returns:
        ``(..., Tq, dv)``; its expectation over the projection is close to (not exactly) softmax attention, since
        the estimate of the denominator is divided into that of the numerator.

    Source: Choromanski et al. (2021), Sec. 2.2-2.4 and Fig. 1.
    """
    check_qkv(query, key, value, same_length=causal)
    check_generator(generator)
    phi_q, phi_k = _performer_features(query, key, n_features, generator, orthogonal, projection)
    return linear_attention(phi_q, phi_k, value, causal=causal, feature_map=None, eps=0.0)


def performer_weights(query: torch.Tensor, key: torch.Tensor, n_features: int = 256,
                      generator: torch.Generator | None = None, orthogonal: bool = True,
                      projection: torch.Tensor | None = None) -> torch.Tensor:
    """The attention matrix that :func:`performer_attention` implies, :math:`\\phi(Q)\\phi(K)^\\top` with rows
    normalised, ``(..., Tq, Tk)``: to compare with the softmax weights (quadratic; for analysis only)."""
    check_tensor("query", query, min_ndim=2)
    check_tensor("key", key, min_ndim=2)
    phi_q, phi_k = _performer_features(query, key, n_features, generator, orthogonal, projection)
    a = phi_q @ phi_k.transpose(-2, -1)
    return a / a.sum(-1, keepdim=True)
