"""Recurrent alternatives to attention (chapter 14): RWKV's time mixing, RetNet's retention and a Mamba-style
selective scan, each in a parallel form (for training) proved equal to its recurrent form (for generation).

Softmax attention compares each query with every earlier key: a sequence of ``T`` tokens costs :math:`O(T^2)`
in training and a key/value cache that grows with ``T`` in generation. The three models here replace it by a
recurrence with a state of fixed size, so that generating a token costs the same at position 10 as at
position 10,000, and each keeps a parallel form so that training still processes a whole sequence at once:

* **RWKV** (Peng et al. 2023): :func:`wkv_recurrent`, :func:`wkv_parallel` and the layer
  :class:`RWKVTimeMixing`. A per-channel weighted average of the values with weights :math:`e^{k_i}` that decay
  exponentially with the distance, and a bonus :math:`u` for the current token.
* **RetNet** (Sun et al. 2023): :func:`retention_parallel`, :func:`retention_recurrent`,
  :func:`retention_chunkwise` and :class:`MultiScaleRetention`. Linear attention (no softmax) with a decay
  :math:`\\gamma^{n-m}`: :math:`(QK^\\top \\odot D)V` in parallel, :math:`S_n = \\gamma S_{n-1} + k_n^\\top v_n`
  as a recurrence, and a chunkwise form between the two.
* **Mamba** (Gu and Dao 2023): :func:`linear_scan` (the recurrence :math:`h_t = a_t h_{t-1} + b_t`, by a loop or by
  a parallel associative scan), :func:`selective_scan` and :class:`MambaBlock`. A state-space model whose
  parameters depend on the input ("selective"), so the recurrence is not a convolution any more and is computed by
  a scan.

Shapes: ``B`` batch, ``T`` length, ``C`` = ``d_model``; ``H`` heads of query/key width ``dk`` and value width
``dv`` (RetNet); ``D`` inner channels with a state of ``N`` numbers each (Mamba).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_floating, check_positive_int as _positive_int, check_same, check_tensor
from .positional import RotaryEmbedding

__all__ = ["wkv_recurrent", "wkv_parallel", "RWKVTimeMixing", "retention_decay_mask", "retention_parallel",
           "retention_recurrent", "retention_chunkwise", "retnet_gammas", "MultiScaleRetention", "linear_scan",
           "selective_scan", "MambaBlock", "MODES"]

#: The ways to compute each layer: ``"parallel"`` (training), ``"recurrent"`` (token by token, with a state),
#: and for retention also ``"chunkwise"``.
MODES = ("parallel", "recurrent", "chunkwise")


def _check_mode(mode: object, allowed: tuple[str, ...]) -> str:
    if mode not in allowed:
        raise ValueError(f"mode must be one of {allowed}, got {mode!r}")
    return mode


# --------------------------------------------------------------------------------------------------------------
# RWKV time mixing
# --------------------------------------------------------------------------------------------------------------

def _check_wkv(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    check_tensor("k", k, ndim=3, shape_hint="(B, T, C)")
    check_tensor("v", v, ndim=3, shape_hint="(B, T, C)")
    check_tensor("w", w, ndim=1, shape_hint="(C,)")
    check_tensor("u", u, ndim=1, shape_hint="(C,)")
    check_floating("k", k)
    for name, t in (("v", v), ("w", w), ("u", u)):
        check_floating(name, t, like=k, like_name="k")
    check_same("v", v.shape, k.shape, "the shape of k (B, T, C)")
    check_same("w", w.shape, k.shape[-1:], "(C,)")
    check_same("u", u.shape, k.shape[-1:], "(C,)")
    if (w < 0).any():
        raise ValueError("w: the decays must be non-negative (e^{-w} <= 1)")


def wkv_recurrent(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  state: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
                  ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    r"""RWKV's WKV operator as a recurrence, one token at a time, with a state of three ``(B, C)`` tensors.

    For every channel (all products elementwise):

    .. math:: \mathit{wkv}_t = \frac{a_{t-1} + e^{u + k_t} v_t}{b_{t-1} + e^{u + k_t}}, \qquad
              a_t = e^{-w} a_{t-1} + e^{k_t} v_t, \qquad b_t = e^{-w} b_{t-1} + e^{k_t}

    with :math:`a_0 = b_0 = 0`. To keep :math:`e^{k}` from overflowing, the state is stored as
    :math:`(a e^{-p}, b e^{-p}, p)` with :math:`p` the largest exponent so far (the trick of the RWKV code).

    Args:
        w: ``(C,)`` non-negative decays (RWKV stores ``time_decay`` with :math:`w = e^{\text{time\_decay}}`).
        u: ``(C,)`` the bonus of the current token (``time_first``).
        k, v: ``(B, T, C)`` keys and values.
        state: ``(a, b, p)`` from an earlier call, to continue a sequence; ``None`` to start one.

    Returns:
        ``wkv`` ``(B, T, C)`` and the state after the last token.

    Raises:
        ValueError: for mismatched shapes or dtypes, or a negative decay.

    Source: Peng et al. (2023), Sec. 4.1, Eq. 14 (the WKV operator) and Eq. 19-22 (its recurrent form), and the
    numerically stable kernel of the RWKV-4 code.
    """
    _check_wkv(w, u, k, v)
    B, T, C = k.shape
    if state is None:
        a, b = k.new_zeros(B, C), k.new_zeros(B, C)
        p = k.new_full((B, C), -math.inf)
    else:
        a, b, p = state
    out = []
    for t in range(T):
        kt, vt = k[:, t], v[:, t]                                    # (B, C)
        ww = u + kt                                                  # the current token, with its bonus
        q = torch.maximum(p, ww)
        e1, e2 = torch.exp(p - q), torch.exp(ww - q)
        out.append((e1 * a + e2 * vt) / (e1 * b + e2))
        ww = p - w                                                   # decay the past by e^{-w}, add this token
        q = torch.maximum(ww, kt)
        e1, e2 = torch.exp(ww - q), torch.exp(kt - q)
        a, b, p = e1 * a + e2 * vt, e1 * b + e2, q
    return torch.stack(out, dim=1), (a, b, p)                        # (B, T, C)


def wkv_parallel(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    r"""RWKV's WKV operator for all positions at once, as a per-channel softmax-weighted average:

    .. math:: \mathit{wkv}_t = \sum_{i \le t} \frac{e^{s_{ti}}}{\sum_{j \le t} e^{s_{tj}}}\, v_i, \qquad
              s_{ti} = \begin{cases} k_i - (t - 1 - i)\, w & i < t \\ u + k_t & i = t \end{cases}

    This is attention whose score does not depend on a query, with a decay bias that grows linearly with the
    distance (like ALiBi), computed separately in every channel: ``(B, T, T, C)`` numbers, :math:`O(T^2 C)` work.
    It equals :func:`wkv_recurrent` (the tests: to ``1e-12`` in float64).

    Args: as :func:`wkv_recurrent`, without a state.

    Returns:
        ``(B, T, C)``.

    Source: Peng et al. (2023), Eq. 14.
    """
    _check_wkv(w, u, k, v)
    T = k.shape[1]
    t = torch.arange(T, device=k.device)
    distance = (t[:, None] - 1 - t[None, :]).to(k.dtype)                    # (T, T): t - 1 - i
    scores = k[:, None, :, :] - distance[None, :, :, None] * w              # (B, T, T, C): query t, key i
    diagonal = (u + k)                                                      # (B, T, C): i = t
    eye = torch.eye(T, dtype=torch.bool, device=k.device)[None, :, :, None]
    scores = torch.where(eye, diagonal[:, :, None, :], scores)
    future = (t[None, :] > t[:, None])[None, :, :, None]                    # i > t
    weights = scores.masked_fill(future, -math.inf).softmax(dim=2)          # over i
    return (weights * v[:, None, :, :]).sum(dim=2)                          # (B, T, C)


class RWKVTimeMixing(nn.Module):
    r"""RWKV-4's time-mixing block: token shift, then the receptance-gated WKV operator.

    .. math:: x'_t = \mu \odot x_t + (1 - \mu) \odot x_{t-1} \ \text{(one } \mu \text{ each for } r, k, v\text{)},
              \qquad o_t = W_o\big(\sigma(r_t) \odot \mathit{wkv}_t\big)

    with :math:`r_t = W_r x'_t`, :math:`k_t = W_k x'_t`, :math:`v_t = W_v x'_t`. ``x_{-1}`` is zero, or the last
    token of the previous call when a state is passed.

    Args:
        d_model: ``C``.

    Parameters: ``time_mix_r``, ``time_mix_k``, ``time_mix_v`` (:math:`\mu`, ``(C,)``), ``time_decay``
    (``(C,)``, :math:`w = e^{\text{time\_decay}}`), ``time_first`` (:math:`u`, ``(C,)``), and the linear maps
    ``receptance``, ``key``, ``value``, ``output`` (``C -> C``, no bias). Initialised so that channels decay at
    rates spread from fast to slow, as RWKV's code does.

    ``forward(x (B, T, C), state=None, mode="parallel") -> (out (B, T, C), state)``: ``mode`` is ``"parallel"``
    (:func:`wkv_parallel`) or ``"recurrent"`` (:func:`wkv_recurrent`); the two give the same output, and the state
    (the last input and the WKV state, four ``(B, C)`` tensors) lets a later call continue the sequence. A state
    can only be continued recurrently; ``"parallel"`` with a state raises.

    Raises:
        ValueError: for a bad size, input, mode or state.

    Source: Peng et al. (2023), Sec. 4.1 and 4.2 (time mixing, token shift), Eq. 11-16 and Fig. 2.
    """

    def __init__(self, d_model: int):
        super().__init__()
        _positive_int("d_model", d_model)
        self.d_model = C = d_model
        ratio = torch.arange(C, dtype=torch.float32) / max(1, C - 1)                 # 0 .. 1 over the channels
        self.time_decay = nn.Parameter(-5.0 + 8.0 * ratio ** 0.7)                      # w from e^-5 to e^3
        self.time_first = nn.Parameter(torch.full((C,), math.log(0.3)) + 0.5 * ((torch.arange(C) + 1) % 3 - 1))
        self.time_mix_k = nn.Parameter(ratio.clone())
        self.time_mix_v = nn.Parameter(ratio.clone() * 0.9 + 0.05)
        self.time_mix_r = nn.Parameter(0.5 * ratio.clone())
        self.receptance, self.key, self.value, self.output = (nn.Linear(C, C, bias=False) for _ in range(4))

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, ...] | None = None, mode: str = "parallel"
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        check_tensor("x", x, ndim=3, shape_hint="(B, T, C)")
        check_floating("x", x, like=self.key.weight, like_name="the module's parameters")
        check_same("x", x.shape[-1:], (self.d_model,), "the feature size d_model")
        _check_mode(mode, MODES[:2])
        if state is not None and mode == "parallel":
            raise ValueError("state: continuing a sequence needs mode='recurrent'")
        previous = x.new_zeros(x.shape[0], 1, self.d_model) if state is None else state[0][:, None]
        shifted = torch.cat([previous, x[:, :-1]], dim=1)                             # (B, T, C): x_{t-1}
        mix = lambda mu: x * mu + shifted * (1 - mu)                                   # noqa: E731
        r = torch.sigmoid(self.receptance(mix(self.time_mix_r)))                       # (B, T, C)
        k, v = self.key(mix(self.time_mix_k)), self.value(mix(self.time_mix_v))        # (B, T, C)
        w = torch.exp(self.time_decay)
        if mode == "parallel":
            wkv, wkv_state = wkv_parallel(w, self.time_first, k, v), self._state_of(w, k, v)
        else:
            wkv, wkv_state = wkv_recurrent(w, self.time_first, k, v, None if state is None else state[1:])
        return self.output(r * wkv), (x[:, -1], *wkv_state)

    def _state_of(self, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The WKV state after the whole sequence in closed form: :math:`a_T = \\sum_i e^{-(T-1-i)w + k_i} v_i`,
        stored as :math:`(a e^{-p}, b e^{-p}, p)` with :math:`p` the largest exponent."""
        T = k.shape[1]
        exponents = k - (T - 1 - torch.arange(T, device=k.device, dtype=k.dtype))[None, :, None] * w  # (B, T, C)
        p = exponents.max(dim=1).values                                                           # (B, C)
        e = torch.exp(exponents - p[:, None])
        return (e * v).sum(dim=1), e.sum(dim=1), p

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}"


# --------------------------------------------------------------------------------------------------------------
# RetNet retention
# --------------------------------------------------------------------------------------------------------------

def _check_retention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gamma: torch.Tensor) -> None:
    check_tensor("q", q, ndim=4, shape_hint="(B, H, T, dk)")
    check_tensor("k", k, ndim=4, shape_hint="(B, H, T, dk)")
    check_tensor("v", v, ndim=4, shape_hint="(B, H, T, dv)")
    check_tensor("gamma", gamma, ndim=1, shape_hint="(H,)")
    check_floating("q", q)
    for name, t in (("k", k), ("v", v), ("gamma", gamma)):
        check_floating(name, t, like=q, like_name="q")
    check_same("k", k.shape, q.shape, "the shape of q (B, H, T, dk)")
    check_same("v", v.shape[:3], q.shape[:3], "(B, H, T) of q")
    check_same("gamma", gamma.shape, q.shape[1:2], "(H,)")
    if not ((gamma > 0) & (gamma <= 1)).all():
        raise ValueError("gamma: every decay must lie in (0, 1]")


def retnet_gammas(n_heads: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """RetNet's decays :math:`\\gamma_h = 1 - 2^{-5-h}`, ``h = 0 .. n_heads - 1`` (Sun et al. 2023, Sec. 2.2): head 0
    forgets over about 32 tokens, each further head over twice as many."""
    _positive_int("n_heads", n_heads)
    return 1 - 2.0 ** (-5 - torch.arange(n_heads, dtype=torch.float64)).to(dtype)


def retention_decay_mask(T: int, gamma: torch.Tensor) -> torch.Tensor:
    r"""The causal decay matrix :math:`D_{nm} = \gamma^{n-m}` for :math:`n \ge m`, else 0: ``(H, T, T)`` for
    decays ``gamma`` ``(H,)`` (Sun et al. 2023, Eq. 5)."""
    _positive_int("T", T)
    n = torch.arange(T, device=gamma.device)
    distance = (n[:, None] - n[None, :]).to(gamma.dtype)                               # (T, T)
    D = torch.exp(distance[None] * torch.log(gamma)[:, None, None])                    # (H, T, T)
    return D.masked_fill(distance[None] < 0, 0.0)


def retention_parallel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    r"""Retention in parallel: :math:`\mathrm{Retention}(X) = (Q K^\top \odot D)\, V`, one decay per head.

    No softmax: the scores are used as they are, so the product can be regrouped into a recurrence
    (:func:`retention_recurrent`) and chunks (:func:`retention_chunkwise`), all three equal.

    Args:
        q, k: ``(B, H, T, dk)`` (already rotated by position and scaled, as :class:`MultiScaleRetention` does).
        v: ``(B, H, T, dv)``.
        gamma: ``(H,)`` decays in ``(0, 1]``.

    Returns:
        ``(B, H, T, dv)``.

    Raises:
        ValueError: for mismatched shapes or dtypes, or a decay outside ``(0, 1]``.

    Source: Sun et al. (2023), Sec. 2.1, Eq. 5 (the parallel representation).
    """
    _check_retention(q, k, v, gamma)
    D = retention_decay_mask(q.shape[2], gamma)                                        # (H, T, T)
    return ((q @ k.transpose(-2, -1)) * D) @ v                                         # (B, H, T, dv)


def retention_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gamma: torch.Tensor,
                        state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Retention as a recurrence over a state :math:`S_n \in \mathbb R^{d_k \times d_v}` per head:

    .. math:: S_n = \gamma\, S_{n-1} + k_n^\top v_n, \qquad o_n = q_n S_n

    Unrolled, :math:`o_n = \sum_{m \le n} \gamma^{n-m} (q_n \cdot k_m)\, v_m`: the parallel form's row ``n``.
    Each token costs :math:`O(d_k d_v)` whatever its position, and the state never grows.

    Args: as :func:`retention_parallel`; ``state`` ``(B, H, dk, dv)`` from an earlier call to continue.

    Returns:
        ``(out (B, H, T, dv), state (B, H, dk, dv))``.

    Source: Sun et al. (2023), Sec. 2.1, Eq. 6 (the recurrent representation).
    """
    _check_retention(q, k, v, gamma)
    B, H, T, dk = q.shape
    S = q.new_zeros(B, H, dk, v.shape[-1]) if state is None else state
    g = gamma[None, :, None, None]
    out = []
    for n in range(T):
        S = g * S + k[:, :, n, :, None] * v[:, :, n, None, :]                       # (B, H, dk, dv)
        out.append((q[:, :, n, None, :] @ S)[:, :, 0])                              # (B, H, dv)
    return torch.stack(out, dim=2), S


def retention_chunkwise(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gamma: torch.Tensor,
                        chunk_size: int = 16, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Retention by chunks of ``c`` tokens: parallel inside each chunk, recurrent across chunks.

    .. math:: \mathrm{out}_{[i]} = (Q_{[i]} K_{[i]}^\top \odot D) V_{[i]} + (Q_{[i]} R_{i-1}) \odot \xi,
              \qquad R_i = K_{[i]}^\top (V_{[i]} \odot \zeta) + \gamma^{c} R_{i-1}

    with :math:`\xi_j = \gamma^{j+1}` (how far row ``j`` of the chunk is from the previous chunk's end) and
    :math:`\zeta_j = \gamma^{c-1-j}` (how far it is from this chunk's end). The work is :math:`O(T c)` rather than
    :math:`O(T^2)`, in ``T / c`` sequential steps rather than ``T``: how RetNet trains on long sequences. A last
    chunk shorter than ``c`` is allowed.

    Args: as :func:`retention_recurrent`, and ``chunk_size`` ``c``.

    Returns:
        ``(out (B, H, T, dv), state (B, H, dk, dv))``, the state :math:`R` after the last chunk (the same as
        :func:`retention_recurrent`'s).

    Source: Sun et al. (2023), Sec. 2.1, Eq. 7 (the chunkwise recurrent representation).
    """
    _check_retention(q, k, v, gamma)
    _positive_int("chunk_size", chunk_size)
    B, H, T, dk = q.shape
    R = q.new_zeros(B, H, dk, v.shape[-1]) if state is None else state
    log_g = torch.log(gamma)[:, None]                                                 # (H, 1)
    out = []
    for start in range(0, T, chunk_size):
        qc, kc, vc = (t[:, :, start:start + chunk_size] for t in (q, k, v))          # (B, H, c, .)
        c = qc.shape[2]
        j = torch.arange(c, device=q.device, dtype=q.dtype)[None]                     # (1, c)
        xi = torch.exp((j + 1) * log_g)[None, :, :, None]                             # (1, H, c, 1)
        zeta = torch.exp((c - 1 - j) * log_g)[None, :, :, None]                       # (1, H, c, 1)
        inner = ((qc @ kc.transpose(-2, -1)) * retention_decay_mask(c, gamma)) @ vc  # (B, H, c, dv)
        out.append(inner + (qc @ R) * xi)
        R = kc.transpose(-2, -1) @ (vc * zeta) + torch.exp(c * log_g)[None, :, :, None] * R
    return torch.cat(out, dim=2), R


class MultiScaleRetention(nn.Module):
    r"""RetNet's multi-scale retention: ``H`` retention heads with decays :math:`\gamma_h = 1 - 2^{-5-h}`,
    a group norm per head and a swish gate.

    .. math:: Q = R_\Theta(X W_Q) / \sqrt{d_k}, \quad K = R_\Theta(X W_K), \quad V = X W_V, \qquad
              Y = \mathrm{GroupNorm}_H\big(\mathrm{Concat}_h\, \mathrm{Retention}_{\gamma_h}(Q_h, K_h, V_h)\big),
              \qquad \mathrm{MSR}(X) = \big(\mathrm{swish}(X W_G) \odot Y\big) W_O

    :math:`R_\Theta` rotates queries and keys by their positions (RetNet's :math:`e^{in\theta}`, the rotary
    embedding of :class:`tfcourse.positional.RotaryEmbedding`), so that scores depend on relative positions. The
    group norm makes each head's output scale-free, which is why the paper's normalisations of :math:`D` and of
    the scores (for numerical range) can be left out here without changing the result by more than rounding.

    Args:
        d_model: ``C``; must be divisible by ``n_heads``.
        n_heads: ``H``; the head width is ``d_head = C / H`` for queries, keys and values (the paper doubles the
            value width, to match a Transformer's parameter count; here all are ``d_head``).

    ``forward(x (B, T, C), mode="parallel", chunk_size=16, state=None, offset=0) -> (out (B, T, C), state)``:
    ``mode`` is ``"parallel"``, ``"recurrent"`` or ``"chunkwise"``; all three give the same output. ``state``
    ``(B, H, d_head, d_head)`` and ``offset`` (the number of tokens already processed) continue a sequence
    (recurrent and chunkwise modes only).

    Raises:
        ValueError: for bad sizes, inputs, modes or states.

    Source: Sun et al. (2023), Sec. 2.2, Eq. 8-9 and Fig. 3 (gated multi-scale retention).
    """

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        _positive_int("d_model", d_model)
        _positive_int("n_heads", n_heads)
        if d_model % n_heads or (d_model // n_heads) % 2:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads} into an even d_head")
        self.d_model, self.n_heads, self.d_head = d_model, n_heads, d_model // n_heads
        self.W_q, self.W_k, self.W_v, self.W_g, self.W_o = (nn.Linear(d_model, d_model, bias=False) for _ in range(5))
        self.rotary = RotaryEmbedding(self.d_head)
        self.register_buffer("gamma", retnet_gammas(n_heads), persistent=False)

    def forward(self, x: torch.Tensor, mode: str = "parallel", chunk_size: int = 16,
                state: torch.Tensor | None = None, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        check_tensor("x", x, ndim=3, shape_hint="(B, T, C)")
        check_floating("x", x, like=self.W_q.weight, like_name="the module's parameters")
        check_same("x", x.shape[-1:], (self.d_model,), "the feature size d_model")
        _check_mode(mode, MODES)
        if (state is not None or offset) and mode == "parallel":
            raise ValueError("state, offset: continuing a sequence needs mode='recurrent' or 'chunkwise'")
        B, T, _ = x.shape
        heads = lambda t: t.view(B, T, self.n_heads, self.d_head).transpose(1, 2)   # noqa: E731 (B, H, T, hs)
        positions = torch.arange(offset, offset + T, device=x.device)
        q, k = self.rotary.apply_rotary(heads(self.W_q(x)), heads(self.W_k(x)), positions)
        q, v = q / math.sqrt(self.d_head), heads(self.W_v(x))
        gamma = self.gamma.to(x.dtype)
        if mode == "parallel":
            y, state = retention_parallel(q, k, v, gamma), None
        elif mode == "recurrent":
            y, state = retention_recurrent(q, k, v, gamma, state)
        else:
            y, state = retention_chunkwise(q, k, v, gamma, chunk_size, state)
        y = y.transpose(1, 2).reshape(B * T, self.d_model)                               # (B T, C)
        y = F.group_norm(y, self.n_heads).view(B, T, self.d_model)                       # per head and token
        return self.W_o(F.silu(self.W_g(x)) * y), state

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, n_heads={self.n_heads}, d_head={self.d_head}"


# --------------------------------------------------------------------------------------------------------------
# Mamba-style selective scan
# --------------------------------------------------------------------------------------------------------------

def linear_scan(a: torch.Tensor, b: torch.Tensor, mode: str = "parallel", h0: torch.Tensor | None = None
                ) -> torch.Tensor:
    r"""All the states of the linear recurrence :math:`h_t = a_t \odot h_{t-1} + b_t` along dimension 1.

    ``mode="recurrent"`` runs the loop, ``T`` sequential steps. ``mode="parallel"`` uses that the recurrence is a
    scan with an **associative** operator on pairs,

    .. math:: (a_1, b_1) \bullet (a_2, b_2) = (a_1 a_2,\ a_2 b_1 + b_2),

    (applying step 1 then step 2 is one step with these coefficients), so prefixes can be combined in any
    grouping: the Hillis-Steele scan combines every position with the one :math:`2^j` before it, for
    :math:`j = 0, 1, \dots`, and is done after :math:`\lceil \log_2 T \rceil` rounds of elementwise work on the
    whole sequence (:math:`O(T \log T)` work; Blelloch's scan, which Mamba's kernel is closer to, needs
    :math:`O(T)`).

    Args:
        a, b: ``(B, T, ...)`` floating, the same shape.
        mode: ``"parallel"`` or ``"recurrent"``.
        h0: optional initial state ``(B, ...)`` (default zero).

    Returns:
        ``h`` ``(B, T, ...)``.

    Raises:
        ValueError: for mismatched shapes or dtypes or an unknown mode.

    Sources: Blelloch (1990) (prefix sums and their applications, linear recurrences among them); Martin and
    Cundy (2018) (parallelising linear recurrent networks by a scan); Gu and Dao (2023), Sec. 3.3.2.
    """
    check_tensor("a", a, min_ndim=2, shape_hint="(B, T, ...)")
    check_tensor("b", b, min_ndim=2, shape_hint="(B, T, ...)")
    check_floating("a", a)
    check_floating("b", b, like=a, like_name="a")
    check_same("b", b.shape, a.shape, "the shape of a")
    _check_mode(mode, MODES[:2])
    if h0 is not None:
        check_tensor("h0", h0)
        check_same("h0", h0.shape, a.shape[:1] + a.shape[2:], "(B, ...) of a without T")
        b = torch.cat([(a[:, 0] * h0 + b[:, 0])[:, None], b[:, 1:]], dim=1)      # fold h0 into the first step
    T = a.shape[1]
    if mode == "recurrent":
        h, out = torch.zeros_like(b[:, 0]), []
        for t in range(T):
            h = a[:, t] * h + b[:, t]
            out.append(h)
        return torch.stack(out, dim=1)
    offset = 1
    while offset < T:  # after the round with offset d, position t holds the combination of steps t-2d+1 .. t
        a_prev, b_prev = a[:, :-offset], b[:, :-offset]                           # the pairs d positions earlier
        b = torch.cat([b[:, :offset], a[:, offset:] * b_prev + b[:, offset:]], dim=1)
        a = torch.cat([a[:, :offset], a[:, offset:] * a_prev], dim=1)
        offset *= 2
    return b


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor | None = None, mode: str = "parallel") -> torch.Tensor:
    r"""Mamba's selective state-space scan, for ``D`` channels with ``N`` states each.

    .. math:: h_t = \exp(\Delta_t A) \odot h_{t-1} + \Delta_t B_t\, u_t, \qquad y_t = C_t\, h_t + D\, u_t

    per channel :math:`d` (:math:`h_t \in \mathbb R^N`): the zero-order-hold discretisation
    :math:`\bar A = \exp(\Delta A)` of a continuous system :math:`h' = Ah + Bu`, with the simpler
    :math:`\bar B = \Delta B` of Mamba's code. What makes it **selective** is that the step :math:`\Delta_t` and
    the matrices :math:`B_t, C_t` are computed from the input, so the model chooses, token by token, what to
    write into its state and what to forget (a large :math:`\Delta_t` resets the state to the current input, a small
    one keeps it). The recurrence is then no longer a convolution with a fixed kernel (as in S4), and is computed
    by :func:`linear_scan`, in a loop (``mode="recurrent"``) or in parallel (``"parallel"``): the two are equal.

    Args:
        u: ``(B, T, D)`` input.
        delta: ``(B, T, D)`` positive steps :math:`\Delta_t`.
        A: ``(D, N)``, negative entries for a stable system (Mamba: :math:`-\exp(A_\log)`).
        B, C: ``(B, T, N)`` input and output matrices (shared by the channels).
        D: optional ``(D,)`` skip connection.
        mode: ``"parallel"`` or ``"recurrent"``.

    Returns:
        ``y`` ``(B, T, D)``.

    Raises:
        ValueError: for mismatched shapes or dtypes or an unknown mode.

    Source: Gu and Dao (2023), Sec. 2 (Eq. 1-4, discretisation) and Sec. 3.2, Algorithm 2 (the selective SSM);
    the reference ``selective_scan_ref`` of the Mamba code.
    """
    check_tensor("u", u, ndim=3, shape_hint="(B, T, D)")
    check_tensor("delta", delta, ndim=3, shape_hint="(B, T, D)")
    check_tensor("A", A, ndim=2, shape_hint="(D, N)")
    check_tensor("B", B, ndim=3, shape_hint="(B, T, N)")
    check_tensor("C", C, ndim=3, shape_hint="(B, T, N)")
    check_floating("u", u)
    for name, t in (("delta", delta), ("A", A), ("B", B), ("C", C)):
        check_floating(name, t, like=u, like_name="u")
    check_same("delta", delta.shape, u.shape, "the shape of u (B, T, D)")
    check_same("A", A.shape[:1], u.shape[2:], "(D,) of u")
    check_same("B", B.shape, u.shape[:2] + A.shape[1:], "(B, T, N)")
    check_same("C", C.shape, B.shape, "the shape of B (B, T, N)")
    if D is not None:
        check_tensor("D", D, ndim=1, shape_hint="(D,)")
        check_same("D", D.shape, u.shape[2:], "(D,)")
    a = torch.exp(delta[..., None] * A)                                       # (B, T, D, N): exp(Delta A)
    b = delta[..., None] * B[:, :, None, :] * u[..., None]                    # (B, T, D, N): Delta B u
    h = linear_scan(a, b, mode)                                               # (B, T, D, N)
    y = (h * C[:, :, None, :]).sum(dim=-1)                                    # (B, T, D)
    return y if D is None else y + D * u


class MambaBlock(nn.Module):
    r"""A Mamba block: a gated branch around a short causal convolution and the selective scan.

    .. math:: (x, z) = W_\text{in}\, h, \quad x \leftarrow \mathrm{SiLU}(\mathrm{conv}(x)), \quad
              (\Delta, B, C) = \big(\mathrm{softplus}(W_\Delta W_r x + b_\Delta),\ W_B x,\ W_C x\big), \quad
              y = W_\text{out}\big(\mathrm{SSM}_{\Delta, A, B, C}(x) \odot \mathrm{SiLU}(z)\big)

    The block replaces both the attention and the MLP of a Transformer block (Mamba stacks it with residual
    connections and norms).

    Args:
        d_model: ``C``.
        d_state: ``N``, states per channel (16 in Mamba).
        d_conv: the causal depthwise convolution's width (4).
        expand: the inner width ``D = expand * C`` (2).
        dt_rank: the rank of the projection that makes :math:`\Delta` (default ``ceil(C / 16)``).

    Parameters: ``in_proj`` (``C -> 2D``), ``conv1d`` (depthwise, ``D`` channels), ``x_proj``
    (``D -> dt_rank + 2N``), ``dt_proj`` (``dt_rank -> D``, with a bias initialised so that
    :math:`\mathrm{softplus}(b_\Delta)` lies in ``[0.001, 0.1]``), ``A_log`` (``(D, N)``, :math:`A = -\exp(A_\log)`,
    initialised to :math:`A_{dn} = -(n + 1)`, S4D-real), ``D`` (``(D,)`` ones), ``out_proj`` (``D -> C``).

    ``forward(h (B, T, C), mode="parallel") -> (B, T, C)``; ``mode`` as :func:`selective_scan` (equal results).

    Raises:
        ValueError: for bad sizes, inputs or modes.

    Source: Gu and Dao (2023), Sec. 3.4 and Fig. 3 (the Mamba block), Sec. 3.6 and the reference code (the
    initialisation of :math:`A` and :math:`\Delta`).
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_rank: int | None = None):
        super().__init__()
        for name, value in (("d_model", d_model), ("d_state", d_state), ("d_conv", d_conv), ("expand", expand)):
            _positive_int(name, value)
        dt_rank = math.ceil(d_model / 16) if dt_rank is None else dt_rank
        _positive_int("dt_rank", dt_rank)
        self.d_model, self.d_state, self.d_conv, self.dt_rank = d_model, d_state, d_conv, dt_rank
        self.d_inner = D = expand * d_model
        self.in_proj = nn.Linear(d_model, 2 * D, bias=False)
        self.conv1d = nn.Conv1d(D, D, d_conv, groups=D, padding=d_conv - 1)
        self.x_proj = nn.Linear(D, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, D)
        dt = torch.exp(torch.rand(D) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))   # in [0.001, 0.1]
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))                       # softplus^-1(dt)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(D, 1))
        self.D = nn.Parameter(torch.ones(D))
        self.out_proj = nn.Linear(D, d_model, bias=False)

    def forward(self, h: torch.Tensor, mode: str = "parallel") -> torch.Tensor:
        check_tensor("h", h, ndim=3, shape_hint="(B, T, C)")
        check_floating("h", h, like=self.in_proj.weight, like_name="the module's parameters")
        check_same("h", h.shape[-1:], (self.d_model,), "the feature size d_model")
        _check_mode(mode, MODES[:2])
        T = h.shape[1]
        x, z = self.in_proj(h).chunk(2, dim=-1)                                   # (B, T, D) each
        x = F.silu(self.conv1d(x.transpose(1, 2))[..., :T].transpose(1, 2))      # causal: the first T outputs
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(self.dt_proj(dt))                                      # (B, T, D), positive
        y = selective_scan(x, delta, -torch.exp(self.A_log), B, C, self.D, mode)  # (B, T, D)
        return self.out_proj(y * F.silu(z))                                       # (B, T, C)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_inner={self.d_inner}, d_state={self.d_state}, d_conv={self.d_conv}"
