"""Positional encodings: sinusoidal, learned, relative (T5 bias), rotary (RoPE) and linear biases (ALiBi).

Chapter 4 of the book ("Positional encodings") builds everything here from scratch.

Attention is permutation equivariant: shuffle the tokens and the outputs are shuffled the same way. Word order
must therefore be *injected*. The encodings here do it in three places:

* **added to the input** (absolute positions): :class:`SinusoidalPositionalEncoding`,
  :class:`LearnedPositionalEmbedding`;
* **added to the attention scores** (relative positions, a bias ``(1, n_heads, Tq, Tk)`` passed as a float
  ``attn_mask`` to :func:`tfcourse.attention.scaled_dot_product_attention`): :class:`RelativePositionBias`
  (T5), :func:`alibi_bias` (ALiBi);
* **applied to queries and keys** (a rotation, so that ``q_m . k_n`` depends on ``m - n`` only):
  :class:`RotaryEmbedding` (RoPE).

Notation: ``B`` batch size, ``T`` sequence length (``Tq`` queries, ``Tk`` keys), ``d_model`` model width,
``n_heads`` attention heads of width ``d_head``, ``...`` any leading dimensions. Positions count from 0.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ._checks import DtypeError, check_int as _check_int, check_tensor

__all__ = [
    "sinusoidal_encoding",
    "SinusoidalPositionalEncoding",
    "LearnedPositionalEmbedding",
    "relative_position_bucket",
    "RelativePositionBias",
    "RotaryEmbedding",
    "alibi_slopes",
    "alibi_bias",
]


def _check_positive_float(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def _check_even(name: str, value: int) -> None:
    _check_int(name, value, minimum=2)
    if value % 2:
        raise ValueError(f"{name} must be even (the features come in (sin, cos) or rotation pairs), got {value}")


def _check_features(x: torch.Tensor, size_name: str, size: int, shape_hint: str) -> int:
    """Check a floating input ``x`` ``(..., T, size)`` and return its length ``T``."""
    check_tensor("x", x, min_ndim=2, shape_hint=shape_hint)
    if not x.is_floating_point():
        raise DtypeError(f"x must have a floating dtype (vectors, not token ids), got {x.dtype}")
    if x.shape[-1] != size:
        raise ValueError(f"x: the last dimension must be {size_name}={size}, got shape {tuple(x.shape)}")
    return x.shape[-2]


def _check_positions(name: str, positions: torch.Tensor, shape_hint: str) -> None:
    check_tensor(name, positions, shape_hint=shape_hint)
    if positions.dtype == torch.bool or positions.is_complex():
        raise DtypeError(f"{name} must hold integer (or real) positions, got {positions.dtype}")


# --------------------------------------------------------------------------------------------------------------
# Absolute positions, added to the input: sinusoidal and learned
# --------------------------------------------------------------------------------------------------------------

def sinusoidal_encoding(positions: torch.Tensor | int, d_model: int, base: float = 10000.0,
                        dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    r"""The sinusoidal position encodings of the Transformer, for any positions.

    .. math:: \mathrm{PE}(p, 2i) = \sin(p\, \omega_i), \quad \mathrm{PE}(p, 2i+1) = \cos(p\, \omega_i),
              \quad \omega_i = \mathrm{base}^{-2i/d_\text{model}}, \quad i = 0, \dots, d_\text{model}/2 - 1.

    Sines at even features, cosines at odd ones (interleaved), as in the paper, XLM and DistilBERT. (Marian and
    RoFormer put all sines first, then all cosines: the same numbers, permuted.)

    Args:
        positions: an int ``T`` (positions ``0..T-1``) or a tensor of positions of any shape ``P`` (integer or
            real; real positions are allowed, e.g. for interpolation).
        d_model: the (even) number of features.
        base: the wavelength scale (10000 in the paper): wavelengths run from :math:`2\pi` to
            :math:`2\pi\cdot\mathrm{base}`.
        dtype: floating dtype of the result (computed in float64, then cast).
        device: where to create it (default: that of ``positions`` if a tensor, else the CPU).

    Returns:
        ``(T, d_model)`` or ``(*P, d_model)`` tensor, values in ``[-1, 1]``.

    Raises:
        ValueError: if ``d_model`` is not a positive even int, ``base`` not positive, ``T`` not a non-negative int,
            or ``dtype`` not floating.

    Source: Vaswani et al. (2017), Sec. 3.5.
    """
    _check_even("d_model", d_model)
    _check_positive_float("base", base)
    if not dtype.is_floating_point:
        raise DtypeError(f"dtype must be a floating dtype, got {dtype}")
    if isinstance(positions, torch.Tensor):
        _check_positions("positions", positions, "(...)")
        device = positions.device if device is None else device
        pos = positions.to(device=device, dtype=torch.float64)
    else:
        _check_int("positions", positions, minimum=0)
        pos = torch.arange(positions, dtype=torch.float64, device=device)
    omega = base ** (-torch.arange(0, d_model, 2, dtype=torch.float64, device=device) / d_model)  # (d_model/2,)
    angles = pos[..., None] * omega  # (..., d_model/2)
    pe = torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)  # (..., d_model): sin, cos, sin, cos, ...
    return pe.to(dtype)


class SinusoidalPositionalEncoding(nn.Module):
    r"""Adds the fixed sinusoidal encodings of :func:`sinusoidal_encoding` to a batch of embeddings.

    Args:
        d_model: the (even) width of the embeddings.
        max_len: how many positions to precompute (a cache, not a limit: the formula holds for every position,
            and longer inputs are encoded on the fly).
        base: the wavelength scale (10000 in the paper).

    ``forward(x (B, T, d_model) or (T, d_model), positions=None) -> x + PE``, where ``positions`` (default
    ``0..T-1``) is an integer tensor ``(T,)`` or ``(B, T)``. No parameters; the table is a non-persistent buffer
    ``pe`` ``(max_len, d_model)`` (not saved in the ``state_dict``).

    Raises:
        ValueError: for a non-even ``d_model``, a bad ``max_len``, or inputs whose last dimension is not
            ``d_model``, whose dtype is not floating, or positions whose shape does not match ``x``.

    Source: Vaswani et al. (2017), Sec. 3.5.
    """

    def __init__(self, d_model: int, max_len: int = 5000, base: float = 10000.0):
        super().__init__()
        _check_even("d_model", d_model)
        _check_int("max_len", max_len)
        self.d_model, self.max_len, self.base = d_model, max_len, float(base)
        self.register_buffer("pe", sinusoidal_encoding(max_len, d_model, base), persistent=False)

    def encoding(self, positions: torch.Tensor | int) -> torch.Tensor:
        """``PE`` for an int ``T`` (``(T, d_model)``) or a tensor of positions (``(*P, d_model)``), in the buffer's
        dtype and device; positions beyond ``max_len`` are computed from the formula."""
        if isinstance(positions, int) and not isinstance(positions, bool) and 0 <= positions <= self.max_len:
            return self.pe[:positions]
        if isinstance(positions, torch.Tensor):
            _check_positions("positions", positions, "(T,) or (B, T)")
            if not positions.is_floating_point() and positions.numel() and 0 <= positions.min() \
                    and positions.max() < self.max_len:
                return self.pe[positions]
        return sinusoidal_encoding(positions, self.d_model, self.base, dtype=self.pe.dtype, device=self.pe.device)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        pe = _absolute_positions(self, x, positions)
        return x + pe.to(x.dtype)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, max_len={self.max_len}, base={self.base:g}"


class LearnedPositionalEmbedding(nn.Module):
    r"""Adds a learned vector per position (a lookup table, as in BERT and GPT-2) to a batch of embeddings.

    Args:
        max_len: the number of positions that have a vector. A learned table has **no** vector for a position it
            was not built with: inputs longer than ``max_len`` raise a ``ValueError`` (there is nothing sensible
            to return; see chapter 4 on length extrapolation).
        d_model: the width of the embeddings.
        init_std: the standard deviation of the initial vectors (0.02, as in BERT and GPT-2).

    ``forward(x (B, T, d_model) or (T, d_model), positions=None) -> x + P[positions]`` with ``positions`` (default
    ``0..T-1``) an integer tensor ``(T,)`` or ``(B, T)``. Parameter: ``weight`` ``(max_len, d_model)``.

    Raises:
        ValueError: if ``T > max_len`` or a position lies outside ``[0, max_len)``, or for inputs whose last
            dimension is not ``d_model``.

    Source: Gehring et al. (2017); Devlin et al. (2019) (BERT, ``max_position_embeddings = 512``); Radford et
    al. (2019) (GPT-2, ``n_positions = 1024``).
    """

    def __init__(self, max_len: int, d_model: int, init_std: float = 0.02):
        super().__init__()
        _check_int("max_len", max_len)
        _check_int("d_model", d_model)
        self.max_len, self.d_model = max_len, d_model
        self.weight = nn.Parameter(torch.randn(max_len, d_model) * init_std)

    def encoding(self, positions: torch.Tensor | int) -> torch.Tensor:
        """The vectors of an int ``T`` (``(T, d_model)``) or of integer positions (``(*P, d_model)``)."""
        if isinstance(positions, torch.Tensor):
            _check_positions("positions", positions, "(T,) or (B, T)")
            if positions.is_floating_point():
                raise DtypeError(f"positions must be integers for a lookup table, got {positions.dtype}")
            lo, hi = (int(v) for v in torch.aminmax(positions)) if positions.numel() else (0, 0)
            if lo < 0 or hi >= self.max_len:
                raise ValueError(
                    f"positions must lie in [0, max_len={self.max_len}), got values from {lo} to {hi}: a learned "
                    f"table has no vector for an unseen position"
                )
            return self.weight[positions]
        _check_int("positions", positions, minimum=0)
        if positions > self.max_len:
            raise ValueError(
                f"sequence length T={positions} exceeds max_len={self.max_len}: a learned position table has no "
                f"vector for positions {self.max_len}..{positions - 1}"
            )
        return self.weight[:positions]

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        pe = _absolute_positions(self, x, positions)
        return x + pe.to(x.dtype)

    def extra_repr(self) -> str:
        return f"max_len={self.max_len}, d_model={self.d_model}"


def _absolute_positions(module, x: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """The encoding to add to ``x`` ``(B, T, d_model)`` or ``(T, d_model)``, shaped to broadcast against it."""
    T = _check_features(x, "d_model", module.d_model, "(B, T, d_model) or (T, d_model)")
    if positions is None:
        return module.encoding(T)  # (T, d_model), broadcasts over the batch
    _check_positions("positions", positions, "(T,) or (B, T)")
    ok = (positions.dim() == 1 and positions.shape[0] == T) or (
        positions.dim() == 2 and x.dim() == 3 and tuple(positions.shape) == tuple(x.shape[:2]))
    if not ok:
        raise ValueError(f"positions must have shape (T,) = ({T},) or (B, T) = {tuple(x.shape[:-1])}, "
                         f"got {tuple(positions.shape)}")
    return module.encoding(positions)  # (T, d_model) or (B, T, d_model)


# --------------------------------------------------------------------------------------------------------------
# Relative positions, added to the scores: the T5 bucketed bias
# --------------------------------------------------------------------------------------------------------------

def relative_position_bucket(relative_position: torch.Tensor, bidirectional: bool = True, num_buckets: int = 32,
                             max_distance: int = 128) -> torch.Tensor:
    r"""T5's bucket of each relative position ``j - i`` (key position minus query position).

    Half of the buckets (per direction) hold one distance each (``0, 1, ..., max_exact - 1``, with
    ``max_exact = n / 2`` and ``n`` the buckets per direction); the other half cover the distances from
    ``max_exact`` to ``max_distance`` in logarithmically growing bins; every distance ``>= max_distance`` shares
    the last bucket. With ``bidirectional`` the buckets are split between keys before and after the query
    (``n = num_buckets / 2``; keys after the query get ``n`` added); without it (a causal decoder) every key after
    the query falls in bucket 0, with the query itself.

    Args:
        relative_position: integer tensor of any shape, ``key position - query position``.
        bidirectional: split the buckets between the two directions (T5's encoder) or not (its decoder).
        num_buckets: the number of buckets (32 in T5).
        max_distance: the distance from which all keys share a bucket (128 in T5).

    Returns:
        ``int64`` tensor of the shape of ``relative_position``, values in ``[0, num_buckets)``.

    Raises:
        ValueError: if the buckets per direction are fewer than 2, ``max_distance`` is not larger than the
            number of exact buckets, or ``relative_position`` is not an integer tensor.

    Source: Raffel et al. (2020), Sec. 2.1; the code of Mesh TensorFlow's ``_relative_position_bucket``, computed
    in float32 as there (the bin edges then agree with T5 to the last integer).
    """
    check_tensor("relative_position", relative_position, shape_hint="(...)")
    if relative_position.is_floating_point() or relative_position.dtype == torch.bool:
        raise DtypeError(f"relative_position must be an integer tensor, got {relative_position.dtype}")
    n, max_exact = _bucket_sizes(num_buckets, max_distance, bidirectional)
    relative_position = relative_position.long()
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        buckets = buckets + (relative_position > 0).long() * n  # keys after the query: the upper half
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp_min(0)  # keys after the query count as distance 0
    # log-spaced bins from max_exact to max_distance (the clamp only keeps log() away from 0 where unused)
    scaled = torch.log(distance.clamp_min(max_exact).float() / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (scaled * (n - max_exact)).long()).clamp_max(n - 1)
    return buckets + torch.where(distance < max_exact, distance, large)


def _bucket_sizes(num_buckets: int, max_distance: int, bidirectional: bool) -> tuple[int, int]:
    _check_int("num_buckets", num_buckets, minimum=4 if bidirectional else 2)
    _check_int("max_distance", max_distance)
    n = num_buckets // 2 if bidirectional else num_buckets
    max_exact = n // 2
    if max_distance <= max_exact:
        raise ValueError(f"max_distance must exceed the {max_exact} exact buckets (num_buckets={num_buckets}, "
                         f"bidirectional={bidirectional}), got {max_distance}")
    return n, max_exact


class RelativePositionBias(nn.Module):
    r"""T5's learned relative position bias: one scalar per (bucket of ``j - i``, head), added to the scores.

    .. math:: s_{ij}^{(h)} = \mathbf q_i^{(h)\top} \mathbf k_j^{(h)} + b^{(h)}_{\mathrm{bucket}(j - i)}

    Args:
        n_heads: the number of attention heads (each head has its own bias per bucket).
        num_buckets: the number of buckets (32 in T5).
        max_distance: the distance from which all keys share a bucket (128 in T5).
        bidirectional: ``True`` for an encoder (keys on both sides), ``False`` for a causal decoder.

    ``forward(t_query, t_key=None, query_offset=0) -> (1, n_heads, Tq, Tk)`` float bias, the query at row ``i``
    sitting at position ``query_offset + i`` and the key at column ``j`` at position ``j`` (``query_offset`` is the
    number of cached tokens when decoding step by step). Pass it as the float ``attn_mask`` of
    :func:`tfcourse.attention.scaled_dot_product_attention` (add ``-inf`` where keys must be blocked). Note that
    T5 itself does not divide ``q.k`` by :math:`\sqrt{d}`; with the bias learned, either way works.

    Parameter: ``relative_attention_bias``, an ``nn.Embedding(num_buckets, n_heads)`` (T5's name and layout, so
    that weights load from a Hugging Face T5 layer as they are).

    Raises:
        ValueError: for bad sizes (see :func:`relative_position_bucket`) or lengths.

    Source: Raffel et al. (2020), Sec. 2.1; simplifies Shaw et al. (2018) from a vector to a scalar per distance.
    """

    def __init__(self, n_heads: int, num_buckets: int = 32, max_distance: int = 128, bidirectional: bool = True):
        super().__init__()
        _check_int("n_heads", n_heads)
        _bucket_sizes(num_buckets, max_distance, bidirectional)
        self.n_heads, self.num_buckets, self.max_distance = n_heads, num_buckets, max_distance
        self.bidirectional = bool(bidirectional)
        self.relative_attention_bias = nn.Embedding(num_buckets, n_heads)

    def buckets(self, t_query: int, t_key: int | None = None, query_offset: int = 0) -> torch.Tensor:
        """The ``(Tq, Tk)`` int64 bucket of every (query, key) pair."""
        t_key = t_query if t_key is None else t_key
        _check_int("t_query", t_query)
        _check_int("t_key", t_key)
        _check_int("query_offset", query_offset, minimum=0)
        device = self.relative_attention_bias.weight.device
        query_pos = torch.arange(t_query, device=device)[:, None] + query_offset  # (Tq, 1)
        key_pos = torch.arange(t_key, device=device)[None, :]  # (1, Tk)
        return relative_position_bucket(key_pos - query_pos, self.bidirectional, self.num_buckets, self.max_distance)

    def forward(self, t_query: int, t_key: int | None = None, query_offset: int = 0) -> torch.Tensor:
        bias = self.relative_attention_bias(self.buckets(t_query, t_key, query_offset))  # (Tq, Tk, n_heads)
        return bias.permute(2, 0, 1).unsqueeze(0)  # (1, n_heads, Tq, Tk)

    def extra_repr(self) -> str:
        return (f"n_heads={self.n_heads}, num_buckets={self.num_buckets}, max_distance={self.max_distance}, "
                f"bidirectional={self.bidirectional}")


# --------------------------------------------------------------------------------------------------------------
# Rotary position embedding (RoPE), applied to queries and keys
# --------------------------------------------------------------------------------------------------------------

class RotaryEmbedding(nn.Module):
    r"""Rotary position embedding: rotate each pair of query/key features by an angle proportional to the position.

    Pair :math:`i` of a vector at position :math:`m` is rotated by :math:`m\theta_i`, with
    :math:`\theta_i = \mathrm{base}^{-2i/d_\text{head}}`:

    .. math:: \begin{pmatrix} x'_{a} \\ x'_{b} \end{pmatrix} =
              \begin{pmatrix} \cos m\theta_i & -\sin m\theta_i \\ \sin m\theta_i & \cos m\theta_i \end{pmatrix}
              \begin{pmatrix} x_{a} \\ x_{b} \end{pmatrix}

    so that :math:`(R_m \mathbf q)^\top (R_n \mathbf k) = \mathbf q^\top R_{n-m} \mathbf k` depends on the
    positions only through :math:`n - m`.

    Args:
        d_head: the (even) feature size of the queries and keys of one head.
        base: the wavelength scale (10000 in RoFormer and Llama 2; 500000 in Llama 3).
        interleaved: which features form a pair. ``False`` (default): feature ``i`` with feature
            ``i + d_head/2`` ("rotate half": GPT-NeoX, Llama and Hugging Face's ``apply_rotary_pos_emb``).
            ``True``: features ``2i`` and ``2i + 1`` (the RoFormer paper, GPT-J). The two differ by a fixed
            permutation of the features, which learned projections absorb; weights trained with one do not work
            with the other.

    Methods:
        ``cos_sin(positions)``: the ``(..., d_head)`` cosines and sines of every feature (in the chosen layout).
        ``rotate(x, positions=None)``: ``x`` ``(..., T, d_head)`` rotated, positions ``(T,)`` or ``(B, T)``
        (default ``0..T-1``); ``(B, T)`` positions need ``x`` of shape ``(B, T, d_head)`` or
        ``(B, n_heads, T, d_head)``.
        ``apply_rotary(q, k, positions=None, key_positions=None)``: both rotated (``key_positions`` defaults to
        ``positions``).

    Buffers: ``inv_freq`` ``(d_head/2,)`` float64 (non-persistent). The angles are computed in float64 and the
    result cast to the input's dtype.

    Raises:
        ValueError: for an odd or non-positive ``d_head``, a non-positive ``base``, inputs whose last dimension is
            not ``d_head``, or positions whose shape does not match the input.

    Source: Su et al. (2024) (RoFormer), Sec. 3.2 to 3.4, Eq. 34.
    """

    def __init__(self, d_head: int, base: float = 10000.0, interleaved: bool = False):
        super().__init__()
        _check_even("d_head", d_head)
        _check_positive_float("base", base)
        self.d_head, self.base, self.interleaved = d_head, float(base), bool(interleaved)
        inv_freq = self.base ** (-torch.arange(0, d_head, 2, dtype=torch.float64) / d_head)  # (d_head/2,)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)``, each ``(*positions.shape, d_head)`` float64: the angle of each feature's pair."""
        _check_positions("positions", positions, "(T,) or (B, T)")
        angles = positions.to(self.inv_freq.device, torch.float64)[..., None] * self.inv_freq  # (..., d_head/2)
        if self.interleaved:
            angles = angles.repeat_interleave(2, dim=-1)  # (..., d_head): a0 a0 a1 a1 ...
        else:
            angles = torch.cat([angles, angles], dim=-1)  # (..., d_head): a0 a1 ... a0 a1 ...
        return angles.cos(), angles.sin()

    def _rotate_pairs(self, x: torch.Tensor) -> torch.Tensor:
        """The partner of every feature, with the sign of a 90-degree rotation: (x_a, x_b) -> (-x_b, x_a)."""
        if self.interleaved:
            pairs = x.unflatten(-1, (-1, 2))  # (..., d_head/2, 2)
            return torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
        first, second = x.chunk(2, dim=-1)
        return torch.cat([-second, first], dim=-1)

    def rotate(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        T = _check_features(x, "d_head", self.d_head, "(..., T, d_head)")
        if positions is None:
            positions = torch.arange(T, device=x.device)
        _check_positions("positions", positions, "(T,) or (B, T)")
        cos, sin = self.cos_sin(positions)  # (T, d_head) or (B, T, d_head)
        if positions.dim() == 1 and positions.shape[0] == T:
            pass  # broadcasts over every leading dimension
        elif positions.dim() == 2 and x.dim() in (3, 4) and positions.shape == (x.shape[0], T):
            if x.dim() == 4:  # (B, n_heads, T, d_head): the same positions for every head
                cos, sin = cos[:, None], sin[:, None]
        else:
            raise ValueError(f"positions must have shape (T,) = ({T},), or (B, T) for x of shape (B, T, d_head) or "
                             f"(B, n_heads, T, d_head); got {tuple(positions.shape)} for x {tuple(x.shape)}")
        cos, sin = cos.to(x.device, x.dtype), sin.to(x.device, x.dtype)
        return x * cos + self._rotate_pairs(x) * sin

    def apply_rotary(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor | None = None,
                     key_positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate queries ``(..., Tq, d_head)`` and keys ``(..., Tk, d_head)``; returns ``(q', k')`` of the same
        shapes. ``key_positions`` defaults to ``positions`` (which default to ``0..T-1``)."""
        key_positions = positions if key_positions is None else key_positions
        return self.rotate(q, positions), self.rotate(k, key_positions)

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor | None = None,
                key_positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.apply_rotary(q, k, positions, key_positions)

    def extra_repr(self) -> str:
        return f"d_head={self.d_head}, base={self.base:g}, interleaved={self.interleaved}"


# --------------------------------------------------------------------------------------------------------------
# ALiBi: a fixed linear bias on the scores
# --------------------------------------------------------------------------------------------------------------

def alibi_slopes(n_heads: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> torch.Tensor:
    r"""The head-specific slopes of ALiBi: a geometric sequence.

    For ``n`` a power of two the slopes are :math:`2^{-8/n}, 2^{-16/n}, \dots, 2^{-8}` (for 8 heads:
    1/2, 1/4, ..., 1/256). Otherwise, with ``c`` the largest power of two below ``n``, the ``c`` slopes of ``c``
    heads come first, followed by the first ``n - c`` of the odd-numbered slopes of ``2c`` heads (every other one,
    interleaving between the others), as in the paper's code and in Bloom.

    Args:
        n_heads: the number of heads.
        dtype, device: of the result (computed in float64, then cast).

    Returns:
        ``(n_heads,)`` positive slopes, decreasing within each of the two groups.

    Raises:
        ValueError: if ``n_heads`` is not a positive int.

    Source: Press et al. (2022), Sec. 3 and the authors' ``get_slopes``.
    """
    _check_int("n_heads", n_heads)

    def power_of_two(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    closest = 2 ** math.floor(math.log2(n_heads))
    slopes = power_of_two(closest) + power_of_two(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes, dtype=torch.float64, device=device).to(dtype)


def alibi_bias(n_heads: int, T: int, causal: bool = False, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None) -> torch.Tensor:
    r"""ALiBi's bias for ``T`` queries and keys: :math:`-m_h\,|i - j|`, a penalty linear in the distance.

    Args:
        n_heads: the number of heads; head ``h`` has slope :math:`m_h` from :func:`alibi_slopes`.
        T: the sequence length (queries and keys at positions ``0..T-1``).
        causal: also block the keys after each query (``-inf`` where ``j > i``), for a decoder. Without it the
            bias is symmetric, :math:`-m_h|i-j|`; for ``j <= i`` both equal the paper's :math:`-m_h(i - j)`.
        dtype, device: of the result.

    Returns:
        ``(1, n_heads, T, T)`` float bias: the float ``attn_mask`` of
        :func:`tfcourse.attention.scaled_dot_product_attention`. Added to the scaled scores (no parameters, no
        position added to the input).

    Raises:
        ValueError: if ``n_heads`` or ``T`` is not a positive int.

    Source: Press et al. (2022), Sec. 3, Fig. 3. (Bloom adds :math:`m_h\,j` instead, equal up to the constant
    :math:`-m_h i` of each row, which the softmax ignores.)
    """
    _check_int("T", T)
    if not dtype.is_floating_point:
        raise DtypeError(f"dtype must be a floating dtype, got {dtype}")
    slopes = alibi_slopes(n_heads, dtype=torch.float64, device=device)  # (n_heads,)
    pos = torch.arange(T, device=device)
    minus_distance = (-(pos[:, None] - pos[None, :]).abs()).to(torch.float64)  # (T, T): -|i - j| (0, not -0.0)
    bias = slopes[:, None, None] * minus_distance  # (n_heads, T, T)
    if causal:
        bias = bias.masked_fill(pos[None, :] > pos[:, None], float("-inf"))
    return bias.unsqueeze(0).to(dtype)  # (1, n_heads, T, T)
