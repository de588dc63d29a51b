r"""Reformer's LSH attention: hash queries into buckets by random rotations, attend within a bucket.

Kitaev et al. (2020), *Reformer: The efficient Transformer*, Sec. 3. The softmax is dominated by the few keys with
the largest dot products, and with *shared* queries and keys (:math:`\mathbf k_j = \mathbf q_j/\|\mathbf q_j\|`)
those are the keys nearest to the query in angle. Angular locality-sensitive hashing (Andoni et al., 2015) puts
near vectors in the same bucket with high probability: for a random rotation :math:`R \in \mathbb R^{d \times b/2}`,

.. math:: h(\mathbf x) = \arg\max\big([\mathbf x^\top R\,;\, -\mathbf x^\top R]\big) \in \{0, \dots, b - 1\},

and each query attends only to the keys of its own bucket, in any of ``n_rounds`` independent hashings.
:func:`lsh_attention` is that attention written with a mask (dense, to show *what* it computes);
:func:`lsh_attention_chunked` is the Reformer's algorithm (sort by bucket, cut into chunks of ``chunk_size``,
attend within a chunk and to the previous one), whose cost is :math:`O(T c)` per round.

**Cost.** :math:`O(n_r T \log T)` for the sort, :math:`O(n_r T c d)` for the chunks (:math:`c` the chunk size).

**What it gives up.** Exactness: a key in another bucket gets zero weight however large its score, so some of the
true top keys are missed (the share found grows with the rounds, :func:`top_key_recall`); keys must equal the
(normalised) queries; a token may not attend to itself (its own score would always be the largest) unless it has
nothing else to attend to; and buckets of uneven size overflow the chunks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._checks import check_tensor
from ..attention import scaled_dot_product_attention
from ._common import check_generator, check_positive_int

__all__ = ["random_rotations", "lsh_buckets", "lsh_mask", "lsh_attention", "lsh_attention_chunked", "top_key_recall"]


def random_rotations(d: int, n_buckets: int, n_rounds: int = 1, generator: torch.Generator | None = None,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Random Gaussian projections for the hash, ``(n_rounds, d, n_buckets // 2)``; ``n_buckets`` must be even.

    Source: Kitaev et al. (2020), Sec. 3, "Locality sensitive hashing" (random rotations of Andoni et al., 2015).
    """
    check_positive_int("d", d)
    check_positive_int("n_buckets", n_buckets, minimum=2)
    check_positive_int("n_rounds", n_rounds)
    check_generator(generator)
    if n_buckets % 2:
        raise ValueError(f"n_buckets must be even, got {n_buckets}")
    return torch.randn(n_rounds, d, n_buckets // 2, generator=generator, dtype=dtype)


def lsh_buckets(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    r"""Bucket of each vector in each round: :math:`\arg\max([xR; -xR])`.

    Args:
        x: ``(..., T, d)``. rotations: ``(n_rounds, d, n_buckets // 2)`` from :func:`random_rotations`.

    Returns:
        ``(n_rounds, ..., T)`` int64 buckets in ``[0, n_buckets)``.
    """
    check_tensor("x", x, min_ndim=2, shape_hint="(..., T, d)")
    check_tensor("rotations", rotations, ndim=3, shape_hint="(n_rounds, d, n_buckets // 2)")
    if rotations.shape[1] != x.shape[-1]:
        raise ValueError(f"rotations must be (n_rounds, {x.shape[-1]}, n_buckets // 2), got {tuple(rotations.shape)}")
    rotated = torch.einsum("...td,rdb->r...tb", x, rotations.to(x.dtype))   # (n_rounds, ..., T, b/2)
    return torch.cat([rotated, -rotated], dim=-1).argmax(dim=-1)


def _shared_keys(qk: torch.Tensor) -> torch.Tensor:
    return F.normalize(qk, dim=-1)                                          # k_j = q_j / |q_j|


def lsh_mask(buckets: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """Which keys each query may attend to: same bucket in at least one round, ``j <= i`` if causal, and not itself
    unless that leaves it nothing (then itself only).

    Args:
        buckets: ``(n_rounds, ..., T)`` from :func:`lsh_buckets`.

    Returns:
        ``(..., T, T)`` bool, ``True`` = may attend.
    """
    check_tensor("buckets", buckets, min_ndim=2, shape_hint="(n_rounds, ..., T)")
    same = (buckets[..., :, None] == buckets[..., None, :]).any(dim=0)      # (..., T, T)
    T = same.shape[-1]
    eye = torch.eye(T, dtype=torch.bool, device=same.device)
    if causal:
        same = same & torch.ones(T, T, dtype=torch.bool, device=same.device).tril()
    others = same & ~eye
    alone = ~others.any(dim=-1, keepdim=True)                               # nothing but itself
    return others | (alone & eye)


def lsh_attention(qk: torch.Tensor, value: torch.Tensor, n_buckets: int, n_rounds: int = 1, causal: bool = False,
                  generator: torch.Generator | None = None, rotations: torch.Tensor | None = None) -> torch.Tensor:
    r"""Shared-QK attention restricted to each query's LSH buckets (dense, with :func:`lsh_mask`).

    Args:
        qk: ``(..., T, d)`` shared queries and keys (keys are the normalised queries). value: ``(..., T, dv)``.
        n_buckets, n_rounds, generator: for :func:`random_rotations` (or pass ``rotations``).
        causal: keys ``j <= i`` only.

    Returns:
        ``(..., T, dv)``.

    Source: Kitaev et al. (2020), Sec. 3 (Eq. 3-4, shared QK, no attention to oneself).
    """
    check_tensor("qk", qk, min_ndim=2, shape_hint="(..., T, d)")
    if rotations is None:
        rotations = random_rotations(qk.shape[-1], n_buckets, n_rounds, generator, dtype=qk.dtype)
    mask = lsh_mask(lsh_buckets(qk, rotations.to(qk.device)), causal=causal)
    return scaled_dot_product_attention(qk, _shared_keys(qk), value, attn_mask=mask)


def lsh_attention_chunked(qk: torch.Tensor, value: torch.Tensor, n_buckets: int, chunk_size: int,
                          n_rounds: int = 1, causal: bool = False, generator: torch.Generator | None = None,
                          rotations: torch.Tensor | None = None) -> torch.Tensor:
    r"""The Reformer's LSH attention with sorting and chunking, :math:`O(T c)` memory per round.

    In each round: sort the positions by (bucket, position); cut the sorted sequence into chunks of
    ``chunk_size``; each query attends to the keys of its own chunk and of the previous chunk that share its bucket
    (and are not in its future, if causal; itself only if nothing else); the rounds' outputs are combined with
    weights :math:`\operatorname{softmax}_r(L_r)` of their logsumexps, so that all rounds' keys share one softmax
    (a pair found in several rounds counts several times). With one chunk of length ``T`` it equals
    :func:`lsh_attention`.

    Args:
        qk: ``(..., T, d)``; value: ``(..., T, dv)``; ``T`` a multiple of ``chunk_size``.
        n_buckets, chunk_size, n_rounds, causal, generator, rotations: as above.

    Returns:
        ``(..., T, dv)``.

    Source: Kitaev et al. (2020), Sec. 3, Fig. 2 and "Multi-round LSH attention".
    """
    check_tensor("qk", qk, min_ndim=2, shape_hint="(..., T, d)")
    check_tensor("value", value, ndim=qk.dim(), shape_hint="(..., T, dv)")
    check_positive_int("chunk_size", chunk_size)
    T, d = qk.shape[-2], qk.shape[-1]
    if T % chunk_size:
        raise ValueError(f"T={T} must be a multiple of chunk_size={chunk_size}")
    if rotations is None:
        rotations = random_rotations(d, n_buckets, n_rounds, generator, dtype=qk.dtype)
    buckets = lsh_buckets(qk, rotations.to(qk.device))                      # (n_rounds, ..., T)
    keys = _shared_keys(qk)
    n_chunks, c = T // chunk_size, chunk_size
    positions = torch.arange(T, device=qk.device)
    outs, lses = [], []
    for b in buckets:                                                       # one round: b is (..., T)
        order = (b * T + positions).argsort(dim=-1)                         # sort by bucket, then position
        undo = order.argsort(dim=-1)

        def take(x, idx=order):
            return x.gather(-2, idx[..., None].expand(*idx.shape, x.shape[-1]))

        def chunks(x):                                                      # (..., T, e) -> (..., n, c, e)
            return x.reshape(*x.shape[:-2], n_chunks, c, x.shape[-1])

        def with_previous(x):                                               # (..., n, c, e) -> (..., n, 2c, e)
            return x if n_chunks == 1 else torch.cat([x.roll(1, dims=-3), x], dim=-2)

        sq, sk, sv = chunks(take(qk)), with_previous(chunks(take(keys))), with_previous(chunks(take(value)))
        sb = chunks(b.gather(-1, order)[..., None])                         # buckets, (..., n, c, 1)
        sp = chunks(order[..., None])                                       # positions, (..., n, c, 1)
        kb, kp = with_previous(sb).transpose(-2, -1), with_previous(sp).transpose(-2, -1)   # (..., n, 1, 2c)
        allowed = sb == kb                                                  # same bucket, (..., n, c, 2c)
        if causal:
            allowed = allowed & (kp <= sp)
        self_pair = kp == sp
        others = allowed & ~self_pair
        allowed = others | (self_pair & ~others.any(dim=-1, keepdim=True))
        scores = (sq @ sk.transpose(-2, -1)) * d ** -0.5                    # (..., n, c, 2c)
        scores = scores.masked_fill(~allowed, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)                 # (..., n, c, 1)
        out = torch.exp(scores - lse) @ sv                                  # (..., n, c, dv)
        flat = lambda x: x.reshape(*x.shape[:-3], T, x.shape[-1])           # noqa: E731
        outs.append(take(flat(out), undo))
        lses.append(take(flat(lse), undo))
    weights = torch.softmax(torch.stack(lses), dim=0)                       # (n_rounds, ..., T, 1)
    return (weights * torch.stack(outs)).sum(dim=0)


def top_key_recall(qk: torch.Tensor, mask: torch.Tensor, top: int = 8, causal: bool = False) -> float:
    """Share of each query's ``top`` highest-scoring keys (shared QK, not itself) that a mask keeps.

    Args:
        qk: ``(..., T, d)``; mask: ``(..., T, T)`` bool from :func:`lsh_mask` (or any pattern).
        causal: rank only keys ``j < i`` (queries with fewer than ``top`` such keys use all they have).

    Returns:
        The mean over queries of (top keys kept / top keys), in ``[0, 1]``.
    """
    check_tensor("qk", qk, min_ndim=2, shape_hint="(..., T, d)")
    check_positive_int("top", top)
    T = qk.shape[-2]
    scores = qk @ _shared_keys(qk).transpose(-2, -1)                        # (..., T, T)
    excluded = torch.eye(T, dtype=torch.bool, device=qk.device)
    if causal:
        excluded = excluded | torch.ones(T, T, dtype=torch.bool, device=qk.device).triu(1)
    scores = scores.masked_fill(excluded, float("-inf"))
    n_top = min(top, T - 1)
    idx = scores.topk(n_top, dim=-1).indices                                # (..., T, top)
    real = scores.gather(-1, idx) > float("-inf")                           # causal: early queries have fewer
    kept = mask.gather(-1, idx) & real
    return (kept.sum() / real.sum().clamp_min(1)).item()
