r"""FlashAttention in PyTorch: exact attention, one tile at a time, in memory linear in the sequence length.

Dao et al. (2022), *FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness*, Algorithm 1
(forward) and Algorithm 2 / Appendix B (backward); the loop order (queries outside, keys inside) and the single
saved statistic, the logsumexp of each row, are those of Dao (2024), *FlashAttention-2*, Algorithms 1 and 2. The
online softmax comes from Milakov and Gimelshein (2018), *Online normalizer calculation for softmax*.

**Cost.** The same :math:`O(T_q T_k d)` arithmetic as ordinary attention (the backward pass recomputes the scores,
about a third more work), but only :math:`O(T_q + T_k)` extra memory besides the output: a tile of
``block_q x block_k`` scores at a time and, per query, a running maximum, a running sum and (saved for the backward
pass) its logsumexp, instead of the :math:`T_q \times T_k` matrices of scores and weights.

**What it gives up.** Nothing in the result: it is *exact* attention, equal to
:func:`torch.nn.functional.scaled_dot_product_attention` up to floating-point rounding. What it gives up is the
weight matrix itself (it is never stored, so it cannot be returned), arbitrary masks (causal and key padding
only) and attention dropout. Written in PyTorch it also gives up the speed: its point on a GPU is to keep each tile
in fast on-chip memory, which only a fused kernel does (:mod:`tfcourse.efficient.triton_flash`); here the Python
loop over tiles makes it slower than the one large matrix product of the naive version, while it needs a fraction
of the memory.

Masks: ``is_causal`` as in :func:`torch.nn.functional.scaled_dot_product_attention` (top-left aligned: query ``i``
may attend to key ``j <= i``); ``key_padding_mask`` as in :class:`torch.nn.MultiheadAttention`, **``True`` at
padding** (ignored keys). A query that may attend to no key gets a zero output and zero gradients, never NaN.
"""

from __future__ import annotations

import math

import torch

from .._checks import check_same, check_tensor
from ._common import check_positive_int, check_qkv

__all__ = ["online_softmax", "flash_attention", "flash_attention_forward", "flash_attention_backward",
           "FlashAttentionFunction"]


# --------------------------------------------------------------------------------------------------------------
# The online softmax
# --------------------------------------------------------------------------------------------------------------

def online_softmax(scores: torch.Tensor, block_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Softmax over the last dimension computed in one pass over blocks of it, with a running maximum and sum.

    After each block :math:`B` the running maximum and sum are updated as

    .. math:: m' = \max(m, \max_{j \in B} s_j), \qquad
              \ell' = \ell\, e^{m - m'} + \sum_{j \in B} e^{s_j - m'},

    so that at the end :math:`\ell = \sum_j e^{s_j - m}` with :math:`m = \max_j s_j`, without a second pass to find
    the maximum first (Milakov and Gimelshein, 2018, Algorithm 3). The weights are then :math:`e^{s_j - m}/\ell`.

    Args:
        scores: ``(..., N)`` floating tensor.
        block_size: number of entries read per step.

    Returns:
        ``(weights, logsumexp)``: the softmax ``(..., N)``, equal to ``torch.softmax(scores, -1)``, and
        :math:`m + \log \ell` ``(..., )``, equal to ``torch.logsumexp(scores, -1)``. A row of ``-inf`` only gets
        zero weights and a logsumexp of ``-inf``.

    Raises:
        TypeError, ValueError: if ``scores`` is not a floating tensor or ``block_size`` not a positive int.
    """
    check_tensor("scores", scores, min_ndim=1, shape_hint="(..., N)")
    if not scores.is_floating_point():
        raise ValueError(f"scores must have a floating dtype, got {scores.dtype}")
    check_positive_int("block_size", block_size)
    m = torch.full(scores.shape[:-1], float("-inf"), dtype=scores.dtype, device=scores.device)
    l = torch.zeros_like(m)
    for start in range(0, scores.shape[-1], block_size):
        block = scores[..., start:start + block_size]
        m_new = torch.maximum(m, block.amax(dim=-1))
        m_safe = _finite_or_zero(m_new)
        l = l * torch.exp(m - m_safe) + torch.exp(block - m_safe[..., None]).sum(dim=-1)
        m = m_new
    m_safe = _finite_or_zero(m)
    weights = torch.exp(scores - m_safe[..., None]) / torch.where(l > 0, l, 1.0)[..., None]
    return weights, m_safe + torch.log(l)


def _finite_or_zero(m: torch.Tensor) -> torch.Tensor:
    """A running maximum with ``-inf`` (a row with no key seen yet) replaced by 0, so that ``exp(s - m)`` of a
    ``-inf`` score is ``exp(-inf) = 0`` and not ``exp(nan)``."""
    return m.masked_fill(m == float("-inf"), 0.0)


# --------------------------------------------------------------------------------------------------------------
# Forward and backward passes, tile by tile
# --------------------------------------------------------------------------------------------------------------

def _blocks(block_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(block_size, tuple):
        if len(block_size) != 2:
            raise ValueError(f"block_size must be an int or a pair (block_q, block_k), got {block_size!r}")
        return check_positive_int("block_size[0]", block_size[0]), check_positive_int("block_size[1]", block_size[1])
    check_positive_int("block_size", block_size)
    return block_size, block_size


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _tile_mask(allowed_keys: torch.Tensor | None, is_causal: bool, q0: int, q1: int, k0: int, k1: int,
               device: torch.device) -> torch.Tensor | None:
    """``True`` where query ``q0..q1-1`` may attend to key ``k0..k1-1``: causal (``j <= i``) and not padding;
    ``None`` if every pair of the tile may attend."""
    mask = None
    if is_causal and k1 - 1 > q0:  # a tile that the diagonal crosses
        rows = torch.arange(q0, q1, device=device)[:, None]
        mask = torch.arange(k0, k1, device=device)[None, :] <= rows  # (bq, bk)
    if allowed_keys is not None:
        keys = allowed_keys[..., k0:k1]  # (B, 1, ..., 1, bk): broadcasts over heads and queries
        mask = keys if mask is None else mask & keys
    return mask


def _allowed_keys(key_padding_mask: torch.Tensor | None, query: torch.Tensor, t_key: int) -> torch.Tensor | None:
    """``key_padding_mask`` ``(B, Tk)``, ``True`` = padding, as a mask ``True`` = may attend, shaped
    ``(B, 1, ..., 1, Tk)`` to broadcast over the other leading dimensions and the queries."""
    if key_padding_mask is None:
        return None
    check_tensor("key_padding_mask", key_padding_mask, ndim=2, shape_hint="(B, Tk), True = padding")
    if key_padding_mask.dtype != torch.bool:
        raise ValueError(f"key_padding_mask must be a bool tensor (True = padding), got {key_padding_mask.dtype}")
    if query.dim() < 3:
        raise ValueError("key_padding_mask needs a batch dimension: query must be (B, ..., Tq, dk)")
    check_same("key_padding_mask", key_padding_mask.shape, (query.shape[0], t_key), "the shape (B, Tk)")
    allowed = ~key_padding_mask.to(query.device)
    return allowed.reshape(allowed.shape[0], *([1] * (query.dim() - 2)), t_key)


def flash_attention_forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, is_causal: bool = False,
                            block_size: int | tuple[int, int] = 128, scale: float | None = None,
                            key_padding_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The forward pass of FlashAttention, without autograd: the output and the logsumexp of each row of scores.

    For each block of ``block_q`` queries, the keys and values are read ``block_k`` at a time; a running maximum
    :math:`m`, sum :math:`\ell` and unnormalised output :math:`\tilde O` are rescaled by :math:`e^{m - m'}` whenever
    the maximum grows (Dao, 2024, Algorithm 1):

    .. math:: S = Q_i K_j^\top / \sqrt{d}, \quad m' = \max(m, \operatorname{rowmax} S), \quad
              P = e^{S - m'}, \quad \ell' = e^{m - m'} \ell + \operatorname{rowsum} P, \quad
              \tilde O' = e^{m - m'} \tilde O + P V_j,

    and finally :math:`O_i = \tilde O / \ell` and :math:`L_i = m + \log \ell`. With ``is_causal`` the tiles above the
    diagonal are skipped altogether.

    Args:
        query: ``(..., Tq, dk)``; key: ``(..., Tk, dk)``; value: ``(..., Tk, dv)``, one floating dtype.
        is_causal: query ``i`` attends to keys ``j <= i`` only.
        block_size: ``block_q = block_k``, or a pair ``(block_q, block_k)``.
        scale: factor on :math:`QK^\top` (default :math:`1/\sqrt{d_k}`).
        key_padding_mask: ``(B, Tk)`` bool, ``True`` at padding, broadcast over the other leading dimensions.

    Returns:
        ``output`` ``(..., Tq, dv)`` in the dtype of ``query``, and ``logsumexp`` ``(..., Tq)`` (float32 for
        half-precision inputs, else their dtype), ``-inf`` for a query that may attend to no key.
    """
    check_qkv(query, key, value)
    block_q, block_k = _blocks(block_size)
    t_q, t_k = query.shape[-2], key.shape[-2]
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    allowed = _allowed_keys(key_padding_mask, query, t_k)
    acc_dtype = _accumulator_dtype(query.dtype)
    lead = query.shape[:-2]
    out = torch.empty(*lead, t_q, value.shape[-1], dtype=query.dtype, device=query.device)
    lse = torch.empty(*lead, t_q, dtype=acc_dtype, device=query.device)
    for q0 in range(0, t_q, block_q):
        q1 = min(q0 + block_q, t_q)
        q_i = query[..., q0:q1, :].to(acc_dtype) * scale                    # (..., bq, dk)
        m = torch.full((*lead, q1 - q0), float("-inf"), dtype=acc_dtype, device=query.device)
        l = torch.zeros_like(m)                                              # (..., bq)
        acc = torch.zeros(*lead, q1 - q0, value.shape[-1], dtype=acc_dtype, device=query.device)
        k_end = min(t_k, q1) if is_causal else t_k                           # causal: no tile above the diagonal
        for k0 in range(0, k_end, block_k):
            k1 = min(k0 + block_k, k_end)
            s = q_i @ key[..., k0:k1, :].to(acc_dtype).transpose(-2, -1)     # (..., bq, bk)
            mask = _tile_mask(allowed, is_causal, q0, q1, k0, k1, query.device)
            if mask is not None:
                s = s.masked_fill(~mask, float("-inf"))
            m_new = torch.maximum(m, s.amax(dim=-1))
            m_safe = _finite_or_zero(m_new)
            p = torch.exp(s - m_safe[..., None])                             # (..., bq, bk)
            rescale = torch.exp(m - m_safe)                                  # e^{m - m'}, 0 while m = -inf
            l = l * rescale + p.sum(dim=-1)
            acc = acc * rescale[..., None] + p @ value[..., k0:k1, :].to(acc_dtype)
            m = m_new
        out[..., q0:q1, :] = (acc / torch.where(l > 0, l, 1.0)[..., None]).to(query.dtype)
        lse[..., q0:q1] = _finite_or_zero(m) + torch.log(l)                 # log 0 = -inf: no key to attend to
    return out, lse


def flash_attention_backward(grad_output: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                             value: torch.Tensor, output: torch.Tensor, lse: torch.Tensor, is_causal: bool = False,
                             block_size: int | tuple[int, int] = 128, scale: float | None = None,
                             key_padding_mask: torch.Tensor | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""The backward pass of FlashAttention: gradients of query, key and value from the saved logsumexp, tile by tile.

    Nothing of size :math:`T_q \times T_k` was saved; each tile of weights is *recomputed* from the scores and the
    logsumexp :math:`L`, :math:`P = e^{S - L}`. With :math:`D_i = \sum_c dO_{ic} O_{ic}` (which equals
    :math:`\sum_j P_{ij} dP_{ij}`), the gradients are (Dao et al., 2022, Appendix B.2; Dao, 2024, Algorithm 2)

    .. math:: dV_j \mathrel{+}= P^\top dO_i, \quad dP = dO_i V_j^\top, \quad dS = P \circ (dP - D_i), \quad
              dQ_i \mathrel{+}= \tau\, dS K_j, \quad dK_j \mathrel{+}= \tau\, dS^\top Q_i,

    with :math:`\tau` the scale. The outer loop runs over blocks of keys, the inner over blocks of queries.

    Args:
        grad_output: ``(..., Tq, dv)``, the gradient of the loss with respect to ``output``.
        query, key, value, is_causal, block_size, scale, key_padding_mask: as given to
            :func:`flash_attention_forward`; output, lse: what it returned.

    Returns:
        ``(grad_query, grad_key, grad_value)`` in the shapes and dtype of the inputs.
    """
    block_q, block_k = _blocks(block_size)
    t_q, t_k = query.shape[-2], key.shape[-2]
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    allowed = _allowed_keys(key_padding_mask, query, t_k)
    acc_dtype = _accumulator_dtype(query.dtype)
    q, k, v = query.to(acc_dtype), key.to(acc_dtype), value.to(acc_dtype)
    do = grad_output.to(acc_dtype)
    delta = (do * output.to(acc_dtype)).sum(dim=-1)                         # D_i, (..., Tq)
    # A query with no key to attend to has L = -inf: +inf makes its recomputed weights exp(s - inf) = 0.
    lse = lse.masked_fill(lse == float("-inf"), float("inf"))
    dq = torch.zeros_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    for k0 in range(0, t_k, block_k):
        k1 = min(k0 + block_k, t_k)
        k_j, v_j = k[..., k0:k1, :], v[..., k0:k1, :]                        # (..., bk, dk), (..., bk, dv)
        dk_j, dv_j = torch.zeros_like(k_j), torch.zeros_like(v_j)
        q_start = (k0 // block_q) * block_q if is_causal else 0              # causal: queries i >= k0 only
        for q0 in range(q_start, t_q, block_q):
            q1 = min(q0 + block_q, t_q)
            s = (q[..., q0:q1, :] @ k_j.transpose(-2, -1)) * scale           # (..., bq, bk)
            mask = _tile_mask(allowed, is_causal, q0, q1, k0, k1, query.device)
            if mask is not None:
                s = s.masked_fill(~mask, float("-inf"))
            p = torch.exp(s - lse[..., q0:q1, None])                         # recomputed weights
            do_i = do[..., q0:q1, :]
            dv_j += p.transpose(-2, -1) @ do_i
            ds = p * (do_i @ v_j.transpose(-2, -1) - delta[..., q0:q1, None])
            dq[..., q0:q1, :] += (ds @ k_j) * scale
            dk_j += (ds.transpose(-2, -1) @ q[..., q0:q1, :]) * scale
        dk[..., k0:k1, :], dv[..., k0:k1, :] = dk_j, dv_j
    return dq.to(query.dtype), dk.to(key.dtype), dv.to(value.dtype)


class FlashAttentionFunction(torch.autograd.Function):
    """:func:`flash_attention` as a :class:`torch.autograd.Function`: its forward saves the inputs, the output and
    the logsumexp ``(..., Tq)``, never the weights; its backward is :func:`flash_attention_backward`.

    ``FlashAttentionFunction.apply(query, key, value, is_causal, block_size, scale, key_padding_mask)``. Not twice
    differentiable.
    """

    @staticmethod
    def forward(ctx, query, key, value, is_causal, block_size, scale, key_padding_mask):
        out, lse = flash_attention_forward(query, key, value, is_causal, block_size, scale, key_padding_mask)
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.is_causal, ctx.block_size, ctx.scale, ctx.key_padding_mask = is_causal, block_size, scale, key_padding_mask
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        query, key, value, out, lse = ctx.saved_tensors
        dq, dk, dv = flash_attention_backward(grad_output, query, key, value, out, lse, ctx.is_causal,
                                              ctx.block_size, ctx.scale, ctx.key_padding_mask)
        return dq, dk, dv, None, None, None, None


def flash_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, is_causal: bool = False,
                    block_size: int | tuple[int, int] = 128, scale: float | None = None,
                    key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""Exact scaled dot-product attention computed tile by tile (FlashAttention), differentiable with its own
    memory-saving backward pass.

    .. math:: \operatorname{softmax}\!\left(\frac{Q K^\top}{\sqrt{d_k}} + M\right) V

    Equal to :func:`torch.nn.functional.scaled_dot_product_attention` (``is_causal`` and ``scale`` mean the same)
    and to :func:`tfcourse.attention.scaled_dot_product_attention`, outputs and gradients, up to rounding; any
    ``Tq``, ``Tk`` (not necessarily multiples of the blocks) and ``dv``.

    Args:
        query: ``(..., Tq, dk)`` floating tensor, e.g. ``(B, n_heads, Tq, d_head)``.
        key: ``(..., Tk, dk)``, same dtype and leading dimensions.
        value: ``(..., Tk, dv)``, same dtype and leading dimensions.
        is_causal: query ``i`` attends to keys ``j <= i`` only (top-left aligned, as in PyTorch).
        block_size: tile size, ``block_q = block_k`` or a pair ``(block_q, block_k)``. Extra memory is
            about ``block_q * block_k`` scores at a time per leading index, plus a few numbers per query.
        scale: factor on :math:`QK^\top` (default :math:`1/\sqrt{d_k}`).
        key_padding_mask: optional ``(B, Tk)`` bool tensor, ``True`` at **padding** (as in
            :class:`torch.nn.MultiheadAttention`), broadcast over the other leading dimensions.

    Returns:
        ``(..., Tq, dv)`` in the dtype of ``query``. A query that may attend to no key (all its keys padding) gets a
        zero output.

    Raises:
        TypeError: if an argument is not a tensor.
        ValueError: (including :class:`~tfcourse._checks.DtypeError`) on mismatched shapes or dtypes, a bad
            ``block_size`` or a ``key_padding_mask`` that is not a ``(B, Tk)`` bool tensor.

    Source: Dao et al. (2022), Algorithm 1 and Theorem 1 (exactness, :math:`O(N)` extra memory); Dao (2024),
    Algorithms 1 and 2.
    """
    check_qkv(query, key, value)
    _blocks(block_size)
    _allowed_keys(key_padding_mask, query, key.shape[-2])
    return FlashAttentionFunction.apply(query, key, value, bool(is_causal), block_size, scale, key_padding_mask)
