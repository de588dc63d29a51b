r"""Sparse attention patterns: which keys each query may attend to, as boolean masks, and banded attention.

Every mask here is a ``(T, T)`` bool tensor, ``True`` where query ``i`` (row) **may attend** to key ``j`` (column),
the convention of :func:`torch.nn.functional.scaled_dot_product_attention` and
:func:`tfcourse.attention.scaled_dot_product_attention`, to which they are passed as ``attn_mask``
(:func:`sparse_attention`). Each pattern below states its rule exactly; ``tests/test_efficient_sparse.py`` checks
every entry against it.

* :func:`sliding_window_mask`: local attention, :math:`|i - j| \le w` (Beltagy et al., 2020, Sec. 3.1; causal:
  :math:`0 \le i - j \le w`).
* :func:`strided_mask`, :func:`fixed_mask`: the two factorised patterns of the Sparse Transformer (Child et al.,
  2019, Sec. 4.3), each the union of two heads' patterns.
* :func:`block_sparse_mask`: any pattern given block by block, the layout the Sparse Transformer's kernels use.
* :func:`longformer_mask`: a sliding window plus global tokens (Beltagy et al., 2020, Sec. 3.1).
* :func:`bigbird_mask`: a window, global tokens and random keys (Zaheer et al., 2020, Sec. 2).

**Cost.** With :math:`k` allowed keys per query, :math:`O(T k d)` time and :math:`O(T k)` memory *if* the kernel
skips the masked pairs (:func:`sliding_window_attention` does, for the window, by gathering bands of keys); a dense
kernel with a mask (:func:`sparse_attention`) still costs :math:`O(T^2 d)` and shows only the *pattern*. Strided
and fixed patterns have :math:`k \approx 2\sqrt T` for :math:`\ell \approx \sqrt T`.

**What it gives up.** Direct interaction between the pairs left out: information between two distant tokens must
travel through intermediate tokens over several layers (the window), or through a few hubs (global tokens), or
along random shortcuts. Which pairs matter must be decided in advance, not by the content.
"""

from __future__ import annotations

import torch

from .._checks import check_tensor
from ..attention import scaled_dot_product_attention
from ._common import check_generator, check_positive_int, check_qkv

__all__ = ["sliding_window_mask", "strided_mask", "fixed_mask", "block_sparse_mask", "longformer_mask",
           "bigbird_mask", "sparse_attention", "sliding_window_attention", "mask_density", "reachable"]


def _grid(T: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    i = torch.arange(T, device=device)[:, None]   # queries (rows)
    j = torch.arange(T, device=device)[None, :]   # keys (columns)
    return i, j


def sliding_window_mask(T: int, window: int, causal: bool = False, device=None) -> torch.Tensor:
    r"""Local attention: query ``i`` may attend to key ``j`` iff :math:`|i - j| \le` ``window`` (causal:
    :math:`0 \le i - j \le` ``window``).

    Each query sees ``2 * window + 1`` keys (causal: ``window + 1``), fewer at the edges. Stacking :math:`L` layers
    widens the receptive field to :math:`L \cdot` ``window`` on each side (Beltagy et al., 2020, Sec. 3.1; a
    Longformer window of size :math:`w` is ``window = w / 2`` here).

    Args:
        T: sequence length. window: half-width, a non-negative int (0: each token sees only itself).
        causal: keep only ``j <= i``.

    Returns:
        ``(T, T)`` bool, ``True`` = may attend.
    """
    check_positive_int("T", T)
    check_positive_int("window", window, minimum=0)
    i, j = _grid(T, device)
    mask = (i - j).abs() <= window
    return mask & (j <= i) if causal else mask


def strided_mask(T: int, stride: int, causal: bool = True, device=None) -> torch.Tensor:
    r"""The Sparse Transformer's *strided* pattern (Child et al., 2019, Sec. 4.3, Fig. 3b), both heads' sets united:

    .. math:: A^{(1)}_i = \{j : |i - j| < \ell\}, \qquad A^{(2)}_i = \{j : (i - j) \bmod \ell = 0\},

    intersected with :math:`j \le i` when ``causal`` (the paper's setting; ``causal=False`` is the symmetric
    version). With :math:`\ell \approx \sqrt T` each query sees about :math:`2\sqrt T` keys, and any key reaches any
    later query in two steps: a hop along :math:`A^{(2)}` to the stride, then one within :math:`A^{(1)}`.

    Args:
        T: sequence length. stride: :math:`\ell \ge 1`. causal: keep only ``j <= i``.

    Returns:
        ``(T, T)`` bool, ``True`` = may attend.
    """
    check_positive_int("T", T)
    check_positive_int("stride", stride)
    i, j = _grid(T, device)
    mask = ((i - j).abs() < stride) | ((i - j) % stride == 0)
    return mask & (j <= i) if causal else mask


def fixed_mask(T: int, stride: int, n_summary: int = 1, causal: bool = True, device=None) -> torch.Tensor:
    r"""The Sparse Transformer's *fixed* pattern (Child et al., 2019, Sec. 4.3, Fig. 3c), both heads' sets united:

    .. math:: A^{(1)}_i = \{j : \lfloor j/\ell \rfloor = \lfloor i/\ell \rfloor\}, \qquad
              A^{(2)}_i = \{j : j \bmod \ell \ge \ell - c\},

    (:math:`c` = ``n_summary``: the last :math:`c` positions of every block are "summary" cells that every later
    query reads), intersected with :math:`j \le i` when ``causal``.

    Args:
        T: sequence length. stride: block length :math:`\ell`. n_summary: :math:`c`, between 1 and :math:`\ell`.
        causal: keep only ``j <= i``.

    Returns:
        ``(T, T)`` bool, ``True`` = may attend.
    """
    check_positive_int("T", T)
    check_positive_int("stride", stride)
    check_positive_int("n_summary", n_summary)
    if n_summary > stride:
        raise ValueError(f"n_summary must be at most stride={stride}, got {n_summary}")
    i, j = _grid(T, device)
    mask = (i // stride == j // stride) | (j % stride >= stride - n_summary)
    return mask & (j <= i) if causal else mask


def block_sparse_mask(layout: torch.Tensor, block_size: int, T: int | None = None) -> torch.Tensor:
    """Expand a block layout into a token mask: query ``i`` may attend to key ``j`` iff
    ``layout[i // block_size, j // block_size]``.

    Block-sparse kernels (the Sparse Transformer's, Child et al., 2019, Sec. 5.5) compute only the tiles whose
    layout entry is ``True``: the cost is proportional to the number of such tiles.

    Args:
        layout: ``(n_blocks, n_blocks)`` bool tensor.
        block_size: tokens per block.
        T: sequence length (default ``n_blocks * block_size``); at most that, the last block may be cut short.

    Returns:
        ``(T, T)`` bool, ``True`` = may attend.
    """
    check_tensor("layout", layout, ndim=2, shape_hint="(n_blocks, n_blocks)")
    if layout.dtype != torch.bool or layout.shape[0] != layout.shape[1]:
        raise ValueError(f"layout must be a square bool tensor, got {layout.dtype} {tuple(layout.shape)}")
    check_positive_int("block_size", block_size)
    n = layout.shape[0] * block_size
    T = n if T is None else check_positive_int("T", T)
    if not n - block_size < T <= n:
        raise ValueError(f"T must lie in ({n - block_size}, {n}] for {layout.shape[0]} blocks of {block_size}, got {T}")
    blocks = torch.arange(T, device=layout.device) // block_size
    return layout[blocks[:, None], blocks[None, :]]


def _global_indices(global_tokens, T: int, device) -> torch.Tensor:
    idx = torch.as_tensor(global_tokens, dtype=torch.long, device=device).flatten()
    if idx.numel() and (idx.min() < 0 or idx.max() >= T):
        raise ValueError(f"global_tokens must be positions in [0, {T}), got {idx.tolist()}")
    return idx


def longformer_mask(T: int, window: int, global_tokens=(0,), device=None) -> torch.Tensor:
    r"""Longformer's pattern: a sliding window plus symmetric global attention (Beltagy et al., 2020, Sec. 3.1).

    Query ``i`` may attend to key ``j`` iff :math:`|i - j| \le` ``window``, or ``i`` is a global token (it attends
    to every key), or ``j`` is a global token (every query attends to it). Global tokens are task-specific, e.g.
    the ``[CLS]`` token for classification or the question's tokens for question answering.

    Args:
        T: sequence length. window: half-width of the window. global_tokens: positions of the global tokens.

    Returns:
        ``(T, T)`` bool, ``True`` = may attend.
    """
    mask = sliding_window_mask(T, window, device=device)
    idx = _global_indices(global_tokens, T, device)
    mask[idx, :] = True
    mask[:, idx] = True
    return mask


def bigbird_mask(T: int, window: int, global_tokens=(0,), n_random: int = 2,
                 generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    r"""BigBird's pattern: window, global tokens and random keys (Zaheer et al., 2020, Sec. 2, Fig. 1).

    The mask of :func:`longformer_mask` (window ``|i - j| <= window`` and global rows and columns), plus, for every
    non-global query, ``n_random`` keys drawn uniformly without replacement from those it does not already see
    (all of them if there are fewer). The paper's implementation draws random *blocks* of keys; here they are
    single tokens. The random edges give the graph a short path between any two tokens (about :math:`\log T`
    steps), which BigBird's universality and Turing-completeness results rely on.

    Args:
        T: sequence length. window: half-width of the window. global_tokens: positions of the global tokens.
        n_random: random keys per query. generator: for the random keys.

    Returns:
        ``(T, T)`` bool, ``True`` = may attend.
    """
    check_positive_int("n_random", n_random, minimum=0)
    check_generator(generator)
    mask = longformer_mask(T, window, global_tokens, device=device)
    if n_random:
        is_global = torch.zeros(T, dtype=torch.bool)
        is_global[_global_indices(global_tokens, T, "cpu")] = True
        scores = torch.rand(T, T, generator=generator)               # a random order of each row's keys
        scores = scores.masked_fill(mask.cpu(), float("inf"))       # keys already seen are never drawn
        k = min(n_random, T)
        chosen = scores.topk(k, dim=1, largest=False).indices       # (T, k): the first k keys of the order
        drawn = torch.zeros(T, T, dtype=torch.bool).scatter_(1, chosen, True)
        drawn &= scores < float("inf")                              # fewer than k unseen keys: all of them
        drawn[is_global] = False                                    # global rows see everything already
        mask |= drawn.to(mask.device)
    return mask


def mask_density(mask: torch.Tensor) -> float:
    """Share of the ``(T, T)`` query-key pairs a mask allows: the cost of a kernel that skips the others, relative
    to dense attention."""
    check_tensor("mask", mask, ndim=2, shape_hint="(T, T)")
    return mask.float().mean().item()


def reachable(mask: torch.Tensor, n_layers: int) -> torch.Tensor:
    r"""Which keys can influence which queries after ``n_layers`` layers with the same pattern: the boolean matrix
    power :math:`A^L` of the mask plus the identity (the residual path).

    Returns:
        ``(T, T)`` bool, ``True`` where token ``j`` can reach query ``i`` in at most ``n_layers`` layers.
    """
    check_tensor("mask", mask, ndim=2, shape_hint="(T, T)")
    check_positive_int("n_layers", n_layers)
    step = (mask | torch.eye(mask.shape[0], dtype=torch.bool, device=mask.device)).float()
    reach = step.clone()
    for _ in range(n_layers - 1):
        reach = ((reach @ step) > 0).float()
    return reach > 0


def sparse_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                     scale: float | None = None) -> torch.Tensor:
    """Attention restricted to a pattern: :func:`tfcourse.attention.scaled_dot_product_attention` with the mask.

    A dense reference: it computes all :math:`T^2` scores and throws the masked ones away, so it shows what a
    pattern computes, not what it saves.

    Args:
        query, key, value: ``(..., T, d)``; mask: ``(T, T)`` bool, ``True`` = may attend.

    Returns:
        ``(..., T, dv)``.
    """
    check_tensor("mask", mask, ndim=2, shape_hint="(Tq, Tk), True = may attend")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (True = may attend), got {mask.dtype}")
    return scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)


def sliding_window_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, window: int,
                             causal: bool = False, scale: float | None = None) -> torch.Tensor:
    r"""Sliding-window self-attention in :math:`O(T w d)` time and :math:`O(T w)` memory, by blocks.

    The sequence is cut into blocks of ``b = max(window, 1)`` queries; each block is scored against the three
    blocks of keys around it (the previous, its own and the next), :math:`3b` keys instead of :math:`T`, and the pairs
    with :math:`|i - j| >` ``window`` (causal: :math:`j > i` too) or outside the sequence are masked. Equal to
    ``sparse_attention(query, key, value, sliding_window_mask(T, window, causal))``.

    Args:
        query, key: ``(..., T, dk)``; value: ``(..., T, dv)`` (self-attention: one length ``T``).
        window: half-width :math:`w`. causal: keys ``j <= i`` only. scale: default :math:`1/\sqrt{d_k}`.

    Returns:
        ``(..., T, dv)``.

    Source: Beltagy et al. (2020), Sec. 3.1 and 3.2 (their blocked "sliding chunks" implementation).
    """
    check_qkv(query, key, value, same_length=True)
    check_positive_int("window", window, minimum=0)
    T, d = query.shape[-2], query.shape[-1]
    scale = d ** -0.5 if scale is None else scale
    b = max(window, 1)
    n = -(-T // b)                                                       # blocks, the last one padded
    pad = n * b - T

    def blocks(x: torch.Tensor, before: int, after: int) -> torch.Tensor:  # (..., T, e) -> (..., n', b, e)
        x = torch.nn.functional.pad(x, (0, 0, before, after))
        return x.reshape(*x.shape[:-2], x.shape[-2] // b, b, x.shape[-1])

    def around(x: torch.Tensor) -> torch.Tensor:                         # keys of blocks m - 1, m, m + 1
        padded = blocks(x, b, pad + b)                                   # (..., n + 2, b, e)
        return torch.cat([padded[..., :-2, :, :], padded[..., 1:-1, :, :], padded[..., 2:, :, :]], dim=-2)

    q = blocks(query, 0, pad)                                            # (..., n, b, dk)
    k, v = around(key), around(value)                                    # (..., n, 3b, dk), (..., n, 3b, dv)
    scores = (q @ k.transpose(-2, -1)) * scale                          # (..., n, b, 3b)
    r = torch.arange(b, device=query.device)[:, None]                   # query i = m b + r
    c = torch.arange(3 * b, device=query.device)[None, :]               # key j = (m - 1) b + c
    offset = c - b - r                                                   # j - i, the same in every block
    allowed = offset.abs() <= window
    if causal:
        allowed = allowed & (offset <= 0)
    j = (torch.arange(n, device=query.device)[:, None] - 1) * b + c     # (n, 3b)
    allowed = allowed & ((j >= 0) & (j < T))[:, None, :]                 # (n, b, 3b)
    weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    out = weights @ v                                                    # (..., n, b, dv)
    return out.reshape(*out.shape[:-3], n * b, out.shape[-1])[..., :T, :]
