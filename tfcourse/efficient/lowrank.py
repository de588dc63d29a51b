r"""Low-rank attention: Linformer's projection of the keys and values along the sequence.

Wang et al. (2020), *Linformer: Self-attention with linear complexity*. The keys and values of length :math:`T`
are projected to :math:`k \ll T` rows by learned matrices :math:`E, F \in \mathbb R^{k \times T}` before
attention (their Eq. 7):

.. math:: \operatorname{head} = \operatorname{softmax}\!\left(\frac{Q (E K)^\top}{\sqrt{d}}\right) F V ,

motivated by the observation that trained attention matrices have a quickly decaying spectrum (their Fig. 1) and
by a Johnson-Lindenstrauss argument (Theorem 1: a random :math:`E` keeps the attention to within
:math:`\varepsilon` with :math:`k = O(\log T / \varepsilon^2)`).

**Cost.** :math:`O(T k d)` time and :math:`O(T k)` memory.

**What it gives up.** A fixed sequence length (:math:`E` and :math:`F` are :math:`k \times T`), and causality: every
projected key mixes all positions, future ones included, so Linformer cannot be used for autoregressive
decoding. The attention is only as good as its rank-:math:`k` approximation.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .._checks import check_tensor
from ..attention import merge_heads, scaled_dot_product_attention, split_heads
from ._common import check_generator, check_positive_int, check_qkv

__all__ = ["random_projection", "linformer_attention", "LinformerSelfAttention"]


def random_projection(k: int, T: int, generator: torch.Generator | None = None,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    r"""A Johnson-Lindenstrauss projection ``(k, T)`` with entries :math:`N(0, 1/k)` (Wang et al., 2020, Theorem
    1): it keeps squared norms of vectors of length ``T`` in expectation."""
    check_positive_int("k", k)
    check_positive_int("T", T)
    check_generator(generator)
    return torch.randn(k, T, generator=generator, dtype=dtype) / math.sqrt(k)


def linformer_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, proj_k: torch.Tensor,
                        proj_v: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    r"""Attention over ``k`` projected keys and values: ``scaled_dot_product_attention(Q, E K, F V)``.

    Args:
        query: ``(..., Tq, d)``; key: ``(..., T, d)``; value: ``(..., T, dv)``.
        proj_k: :math:`E`, ``(k, T)``. proj_v: :math:`F`, ``(k, T)`` (default: ``proj_k``, the paper's
            "key-value sharing").
        scale: default :math:`1/\sqrt d`.

    Returns:
        ``(..., Tq, dv)``. With ``k = T`` and :math:`E = F = I` it is ordinary attention.

    Source: Wang et al. (2020), Eq. 7.
    """
    check_qkv(query, key, value)
    proj_v = proj_k if proj_v is None else proj_v
    T = key.shape[-2]
    for name, p in (("proj_k", proj_k), ("proj_v", proj_v)):
        check_tensor(name, p, ndim=2, shape_hint="(k, T)")
        if p.shape[1] != T or p.dtype != key.dtype:
            raise ValueError(f"{name} must be a (k, T={T}) tensor of dtype {key.dtype}, got {tuple(p.shape)} {p.dtype}")
    if proj_v.shape != proj_k.shape:
        raise ValueError(f"proj_v must have proj_k's shape {tuple(proj_k.shape)}, got {tuple(proj_v.shape)}")
    return scaled_dot_product_attention(query, proj_k @ key, proj_v @ value, scale=scale)  # (..., Tq, dv)


class LinformerSelfAttention(nn.Module):
    r"""Multi-head self-attention with Linformer's learned projections :math:`E, F \in \mathbb R^{k \times T}`,
    shared by the heads (the paper's "headwise sharing").

    Args:
        d_model, n_heads: as in :class:`tfcourse.attention.MultiHeadAttention` (``d_head = d_model // n_heads``).
        seq_len: :math:`T`, the only length the layer accepts (shorter inputs are padded by the caller).
        k: projected length.
        share_kv: one matrix for keys and values (:math:`E = F`).

    ``forward(x (B, T, d_model)) -> (B, T, d_model)``. Parameters: ``W_q, W_k, W_v, W_o`` (``nn.Linear``) and ``E``
    (and ``F``), ``(k, T)``, initialised with :func:`random_projection`'s distribution.

    Source: Wang et al. (2020), Sec. 4 and Eq. 7.
    """

    def __init__(self, d_model: int, n_heads: int, seq_len: int, k: int, share_kv: bool = False):
        super().__init__()
        for name, value in (("d_model", d_model), ("n_heads", n_heads), ("seq_len", seq_len), ("k", k)):
            check_positive_int(name, value)
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be a multiple of n_heads={n_heads}")
        self.d_model, self.n_heads, self.seq_len, self.k = d_model, n_heads, seq_len, k
        self.W_q, self.W_k, self.W_v, self.W_o = (nn.Linear(d_model, d_model) for _ in range(4))
        self.E = nn.Parameter(torch.randn(k, seq_len) / math.sqrt(k))
        self.F = self.E if share_kv else nn.Parameter(torch.randn(k, seq_len) / math.sqrt(k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, ndim=3, shape_hint="(B, T, d_model)")
        if x.shape[1:] != (self.seq_len, self.d_model):
            raise ValueError(f"x must be (B, {self.seq_len}, {self.d_model}), got {tuple(x.shape)}")
        q = split_heads(self.W_q(x), self.n_heads)                  # (B, nh, T, hs)
        k = split_heads(self.W_k(x), self.n_heads)
        v = split_heads(self.W_v(x), self.n_heads)
        out = linformer_attention(q, k, v, self.E, self.F)           # (B, nh, T, hs)
        return self.W_o(merge_heads(out))                            # (B, T, d_model)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, n_heads={self.n_heads}, seq_len={self.seq_len}, k={self.k}"
