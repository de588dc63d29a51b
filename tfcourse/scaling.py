"""Scaling laws (chapter 13): counting a GPT's parameters, FLOPs and training memory, and fitting power laws.

Read top to bottom: what a model costs (:func:`count_params`, :func:`forward_flops_per_token`,
:func:`training_flops`, :func:`training_memory`), then the laws fitted to measured losses (:func:`fit_power_law`
for one variable, :func:`fit_chinchilla` for parameters and data together) and the allocation they imply for a
compute budget (:func:`compute_optimal`). The published coefficients of Hoffmann et al. (2022) are in
:data:`CHINCHILLA`, clearly theirs.

Units: parameters and tokens are plain counts; FLOPs count one multiply and one add as two operations (a
multiply-accumulate is 2 FLOPs), as :mod:`torch.utils.flop_counter` does; memory is in bytes; losses are in nats per
token.

Sources: Kaplan et al. (2020), *Scaling laws for neural language models* (Sec. 2.1 and Table 1: :math:`N`
without embeddings, :math:`C \\approx 6ND`; Eqs. 1.1-1.2: :math:`L(N) = (N_c/N)^{\\alpha_N}`, :math:`L(D) =
(D_c/D)^{\\alpha_D}`); Hoffmann et al. (2022), *Training compute-optimal large language models* (Sec. 3.3, Eq. 2:
:math:`\\hat L(N, D) = E + A/N^\\alpha + B/D^\\beta`, fitted with a Huber loss on log losses by L-BFGS from a grid
of starts; Eq. 4: the compute-optimal :math:`N_{opt}(C)`, :math:`D_{opt}(C)`; Eq. 10: their coefficients);
Korthikanti et al. (2022), *Reducing activation recomputation in large transformer models* (Sec. 4.1: activation
memory per layer).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:  # the config is only read, never built, here
    from .models.gpt import GPTConfig

__all__ = ["ParamCount", "count_params", "forward_flops_per_token", "training_flops", "training_memory",
           "PowerLaw", "fit_power_law", "ChinchillaFit", "CHINCHILLA", "fit_chinchilla", "compute_optimal"]


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_positive_number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not value > 0 \
            or not math.isfinite(value):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def _check_config(config: object) -> None:
    from .models.gpt import GPTConfig  # a local import: tfcourse.models.gpt uses this module for its counts

    if not isinstance(config, GPTConfig):
        raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")


# --------------------------------------------------------------------------------------------------------------
# Counting: parameters, FLOPs, memory
# --------------------------------------------------------------------------------------------------------------

class ParamCount(NamedTuple):
    """The parameters of a GPT by where they sit (counts of numbers).

    ``attention``, ``feed_forward`` and ``norms`` are summed over the blocks (``norms`` includes the final
    LayerNorm); ``embedding`` is the token table :math:`VC`, ``positions`` the position table; ``output`` is the
    output layer's :math:`VC` when it is not tied to the embedding (else 0).
    """

    attention: int
    feed_forward: int
    norms: int
    embedding: int
    positions: int
    output: int

    @property
    def non_embedding(self) -> int:
        """Kaplan et al.'s :math:`N`: every parameter but the token and position tables. A tied output layer is the
        token table and is left out with it; an untied one is a matrix product like any other and is counted."""
        return self.attention + self.feed_forward + self.norms + self.output

    @property
    def total(self) -> int:
        """Every parameter of ``GPT(config)`` (a tied output layer counted once)."""
        return self.non_embedding + self.embedding + self.positions


def count_params(config: GPTConfig) -> ParamCount:
    r"""The parameters of ``GPT(config)``, counted from the sizes alone (no model is built).

    Per block, with :math:`C` = ``n_embd``, :math:`C_{kv} = h_{kv} \cdot` ``d_head`` and :math:`F` = ``d_ff``:
    attention weights :math:`2C^2 + 2C\,C_{kv}` (:math:`W^Q, W^O` are :math:`C \times C`, :math:`W^K, W^V` are
    :math:`C_{kv} \times C`), feed-forward weights :math:`2CF`, and with ``bias`` their biases
    :math:`2C + 2C_{kv}` and :math:`F + C`; two LayerNorms of :math:`2C` (:math:`C` without bias) each. For
    GPT-2 small (the default config) the total is 124,439,808, of which :math:`N` = 85,056,000.

    Args:
        config: a :class:`~tfcourse.models.gpt.GPTConfig`.

    Returns:
        A :class:`ParamCount`; ``.non_embedding`` is Kaplan et al.'s :math:`N` (2020, Sec. 2.1), ``.total``
        equals the number of parameters of the model.

    Raises:
        TypeError: if ``config`` is not a ``GPTConfig``.
    """
    _check_config(config)
    C, F, L, kv = config.n_embd, config.hidden, config.n_layer, config.kv_heads * config.d_head
    norm = C * (2 if config.bias else 1)
    attn = 2 * C * C + 2 * C * kv + ((2 * C + 2 * kv) if config.bias else 0)
    mlp = 2 * C * F + ((F + C) if config.bias else 0)
    V = config.vocab_size
    return ParamCount(attention=L * attn, feed_forward=L * mlp, norms=(2 * L + 1) * norm, embedding=V * C,
                      positions=config.block_size * C, output=0 if config.tie_weights else V * C)


def forward_flops_per_token(config: GPTConfig, seq_len: int | None = None) -> int:
    r"""The matrix-multiplication FLOPs of one forward pass of ``GPT(config)``, per token, at context ``seq_len``.

    Every weight matrix of the blocks costs 2 FLOPs per weight and token (a multiply and an add); the output
    layer :math:`2VC`; attention's two products :math:`QK^\top` and :math:`AV` cost :math:`2 \cdot 2\,T\,C` per
    token and layer, since our implementation computes the full :math:`T \times T` score matrix and masks it
    (Kaplan et al.'s Table 1 writes :math:`2\,n_\text{layer} n_\text{ctx} d_\text{attn}`, the causal half).
    Biases, LayerNorms, the softmax and the activation are left out: they are :math:`O(C)` per token, not
    :math:`O(C^2)`, and :mod:`torch.utils.flop_counter` does not count them either.

    .. math::
        C_\text{forward} = 2\,(2C^2 + 2C\,C_{kv} + 2CF)\,L + 2VC + 4\,L\,T\,C .

    Args:
        config: a :class:`~tfcourse.models.gpt.GPTConfig`.
        seq_len: the context length :math:`T` (default ``config.block_size``).

    Raises:
        TypeError: if ``config`` is not a ``GPTConfig``; ValueError: if ``seq_len`` is not a positive int or is
            longer than ``config.block_size``.
    """
    _check_config(config)
    T = config.block_size if seq_len is None else seq_len
    _check_positive_int("seq_len", T)
    if T > config.block_size:
        raise ValueError(f"seq_len must be at most block_size={config.block_size}, got {T}")
    C, F, L, kv = config.n_embd, config.hidden, config.n_layer, config.kv_heads * config.d_head
    weights = L * (2 * C * C + 2 * C * kv + 2 * C * F)
    return 2 * weights + 2 * config.vocab_size * C + 4 * L * T * C


def training_flops(config: GPTConfig, tokens: int | float, seq_len: int | None = None, *,
                   approximation: bool = False) -> float:
    r"""The FLOPs of training ``GPT(config)`` on ``tokens`` tokens (forward and backward passes).

    The backward pass of a matrix product costs twice its forward pass (one product for the gradient of the input,
    one for the gradient of the weight), so a training step costs three forward passes:
    :math:`3\,C_\text{forward}` per token (:func:`forward_flops_per_token`). With ``approximation=True`` this is
    Kaplan et al.'s :math:`C \approx 6ND` (2020, Sec. 2.1), with :math:`N` the non-embedding parameters: it
    leaves out the output layer and attention's :math:`T`-dependent products, a good approximation when
    :math:`C \gg T` and :math:`C \gg V`, as in large models, and an underestimate for small ones.

    Args:
        config: a :class:`~tfcourse.models.gpt.GPTConfig`.
        tokens: the training tokens :math:`D` (a positive number).
        seq_len: the context length (default ``config.block_size``).
        approximation: use :math:`6ND` instead of the count of every product.

    Returns:
        FLOPs, as a float.

    Raises:
        TypeError: if ``config`` is not a ``GPTConfig``; ValueError: for non-positive ``tokens`` or a bad
            ``seq_len``.
    """
    _check_positive_number("tokens", tokens)
    if approximation:
        _check_config(config)
        return 6.0 * count_params(config).non_embedding * tokens
    return 3.0 * forward_flops_per_token(config, seq_len) * tokens


def training_memory(config: GPTConfig, batch_size: int, seq_len: int | None = None, *, bytes_per_number: int = 4,
                    optimizer_states: int = 2) -> dict[str, int]:
    r"""Bytes of memory to train ``GPT(config)``: weights, gradients, optimizer state and activations.

    Weights and gradients hold one number per parameter each, Adam(W) two more (``optimizer_states``: its first
    and second moments). Activations, the tensors saved by the forward pass for the backward pass, follow
    Korthikanti et al. (2022), Sec. 4.1, for one layer without recomputation:
    :math:`T B C\,(34 + 5\,n_h T / C)` bytes in 16-bit numbers, i.e. :math:`T B C\,(17 + 2.5\,n_h T / C)`
    numbers; they counted dropout masks (:math:`\approx 2.5\,TBC` numbers per layer at one byte each) that a
    model without dropout does not keep. We scale by ``bytes_per_number`` and add the logits and their softmax,
    :math:`2\,T B V` numbers. It is an estimate of what the backward pass needs, not of what an allocator
    reserves; the chapter compares it with the saved tensors measured on our model.

    Args:
        config: a :class:`~tfcourse.models.gpt.GPTConfig`.
        batch_size: sequences per step :math:`B`.
        seq_len: tokens per sequence :math:`T` (default ``config.block_size``).
        bytes_per_number: 4 for float32, 2 for bfloat16 or float16.
        optimizer_states: numbers of optimizer state per parameter (Adam: 2, SGD with momentum: 1, SGD: 0).

    Returns:
        ``{"weights", "gradients", "optimizer", "activations", "total"}`` in bytes.

    Raises:
        TypeError: if ``config`` is not a ``GPTConfig``; ValueError: for non-positive sizes or a negative
            ``optimizer_states``.
    """
    _check_config(config)
    T = config.block_size if seq_len is None else seq_len
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("seq_len", T)
    _check_positive_int("bytes_per_number", bytes_per_number)
    if isinstance(optimizer_states, bool) or not isinstance(optimizer_states, int) or optimizer_states < 0:
        raise ValueError(f"optimizer_states must be a non-negative int, got {optimizer_states!r}")
    P = count_params(config).total
    C, L, h = config.n_embd, config.n_layer, config.n_head
    per_layer = T * batch_size * C * (17 + 2.5 * h * T / C)
    activations = int(round((L * per_layer + 2 * T * batch_size * config.vocab_size) * bytes_per_number))
    memory = dict(weights=P * bytes_per_number, gradients=P * bytes_per_number,
                  optimizer=optimizer_states * P * bytes_per_number, activations=activations)
    memory["total"] = sum(memory.values())
    return memory


# --------------------------------------------------------------------------------------------------------------
# Fitting laws
# --------------------------------------------------------------------------------------------------------------

def _as_positive_1d(name: str, values: object, length: int | None = None) -> np.ndarray:
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a sequence of numbers, got {type(values).__name__}") from None
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D (n,), got shape {array.shape}")
    if length is not None and len(array) != length:
        raise ValueError(f"{name} must have the length of the first argument, {length}, got {len(array)}")
    if not np.all(np.isfinite(array)) or not np.all(array > 0):
        raise ValueError(f"{name} must hold positive finite numbers")
    return array


class PowerLaw(NamedTuple):
    r"""A fitted :math:`y = a\,x^{-b} + c`: ``coef`` :math:`a`, ``exponent`` :math:`b`, ``offset`` :math:`c`.

    With ``offset = 0`` it is Kaplan et al.'s form, :math:`L(N) = (N_c / N)^{\alpha_N}`, i.e.
    :math:`a = N_c^{\alpha_N}`, :math:`b = \alpha_N`.
    """

    coef: float
    exponent: float
    offset: float = 0.0

    def __call__(self, x: float | np.ndarray) -> float | np.ndarray:
        return self.coef * np.asarray(x, dtype=np.float64) ** (-self.exponent) + self.offset

    @property
    def scale(self) -> float:
        r"""Kaplan et al.'s :math:`x_c = a^{1/b}` (so that :math:`a x^{-b} = (x_c/x)^b`)."""
        return self.coef ** (1.0 / self.exponent)


def fit_power_law(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray, *,
                  offset: bool = False) -> PowerLaw:
    r"""Fit :math:`y = a\,x^{-b}` (or :math:`a\,x^{-b} + c` with ``offset=True``) by least squares on
    :math:`\log y`.

    Without an offset the law is a line in log-log axes, :math:`\log y = \log a - b \log x`, and the fit is linear
    regression (exact, no start needed). With an offset (an irreducible loss :math:`c \ge 0`), the residuals
    :math:`\log(a x^{-b} + c) - \log y` are minimised by :func:`scipy.optimize.least_squares` from the offset-free
    fit and a grid of offsets below :math:`\min y`.

    Args:
        x: positive values (for example parameters :math:`N` or tokens :math:`D`), shape ``(n,)``.
        y: positive values of the same length (for example losses), shape ``(n,)``.
        offset: fit the constant :math:`c` too.

    Returns:
        A :class:`PowerLaw`.

    Raises:
        TypeError: if ``x`` or ``y`` is not a sequence of numbers; ValueError: if they are not 1-D of one length,
            hold a value that is not positive and finite, or have fewer than 2 points (4 with ``offset``), or if
            ``x`` has fewer than 2 distinct values.
    """
    x = _as_positive_1d("x", x)
    y = _as_positive_1d("y", y, len(x))
    needed = 4 if offset else 2
    if len(x) < needed:
        raise ValueError(f"fitting {'a x^-b + c' if offset else 'a x^-b'} needs at least {needed} points, "
                         f"got {len(x)}")
    if len(np.unique(x)) < 2:
        raise ValueError("x must hold at least 2 distinct values")
    slope, intercept = np.polyfit(np.log(x), np.log(y), 1)
    plain = PowerLaw(coef=float(np.exp(intercept)), exponent=float(-slope))
    if not offset:
        return plain

    from scipy.optimize import least_squares

    log_x, log_y = np.log(x), np.log(y)

    def residuals(p: np.ndarray) -> np.ndarray:  # p = (log a, b, log c)
        return np.logaddexp(p[0] - p[1] * log_x, p[2]) - log_y

    best = None
    for fraction in (0.01, 0.3, 0.6, 0.9):
        start = np.array([np.log(plain.coef), max(plain.exponent, 1e-3), np.log(fraction * y.min())])
        result = least_squares(residuals, start, method="lm" if len(x) > 3 else "trf")
        if best is None or result.cost < best.cost:
            best = result
    log_a, b, log_c = best.x
    return PowerLaw(coef=float(np.exp(log_a)), exponent=float(b), offset=float(np.exp(log_c)))


class ChinchillaFit(NamedTuple):
    r"""The parametric loss of Hoffmann et al. (2022), Eq. 2: :math:`\hat L(N, D) = E + A/N^\alpha + B/D^\beta`.

    :math:`E` is the irreducible loss of the data, :math:`A/N^\alpha` what a model of :math:`N` parameters falls
    short of a perfect one, :math:`B/D^\beta` what training on :math:`D` tokens falls short of training to
    convergence.
    """

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def __call__(self, N: float | np.ndarray, D: float | np.ndarray) -> float | np.ndarray:
        N, D = np.asarray(N, dtype=np.float64), np.asarray(D, dtype=np.float64)
        return self.E + self.A / N ** self.alpha + self.B / D ** self.beta


#: Hoffmann et al.'s own fit (2022, Eq. 10, Approach 3), for MassiveText, in nats per token: theirs, not ours.
CHINCHILLA = ChinchillaFit(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


def _huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    # the Huber loss of the residuals r and its derivative
    small = np.abs(r) <= delta
    loss = np.where(small, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta))
    return loss, np.where(small, r, delta * np.sign(r))


def fit_chinchilla(N: Sequence[float] | np.ndarray, D: Sequence[float] | np.ndarray,
                   L: Sequence[float] | np.ndarray, *, huber_delta: float = 1e-3,
                   exponent_grid: Sequence[float] | None = None, n_starts: int = 4) -> ChinchillaFit:
    r"""Fit :math:`\hat L(N, D) = E + A/N^\alpha + B/D^\beta` to measured losses, as Hoffmann et al. (2022) did.

    Their Sec. 3.3 and Appendix D.2: with :math:`a = \log A`, :math:`b = \log B`, :math:`e = \log E`, minimise

    .. math::
        \sum_i \operatorname{Huber}_\delta\!\Big(\operatorname{LSE}\big(a - \alpha \log N_i,\;
        b - \beta \log D_i,\; e\big) - \log L_i\Big)

    by L-BFGS and keep the best of several starts. The Huber loss (:math:`\delta = 10^{-3}`) makes the fit robust to
    outliers; working with :math:`\log L` weighs every run alike. The gradient is exact (the softmax of the three
    log-terms times the Huber derivative).

    The starts: Hoffmann et al. ran L-BFGS from every point of a grid of all five coefficients. We use that for
    fixed exponents the law is *linear* in :math:`(E, A, B)`: for every pair :math:`(\alpha, \beta)` of
    ``exponent_grid`` a non-negative least-squares fit (:func:`scipy.optimize.nnls`, relative residuals) gives the
    best :math:`(E, A, B)`, and the ``n_starts`` best pairs start L-BFGS. This finds the same minimum from far
    fewer starts.

    Args:
        N: parameters of each run, shape ``(n,)``.
        D: training tokens of each run, shape ``(n,)``.
        L: the measured loss of each run (nats per token), shape ``(n,)``.
        huber_delta: :math:`\delta` of the Huber loss.
        exponent_grid: the values of :math:`\alpha` and of :math:`\beta` tried for the starts (default 30 values
            from 0.05 to 1.5).
        n_starts: how many of the best grid points start L-BFGS.

    Returns:
        A :class:`ChinchillaFit`.

    Raises:
        TypeError: if an input is not a sequence of numbers; ValueError: if ``N``, ``D``, ``L`` are not 1-D of
            one length with positive finite values, there are fewer than 5 runs, fewer than 2 distinct ``N`` or
            ``D``, a non-positive ``huber_delta`` or ``n_starts``, or an ``exponent_grid`` that is empty or
            holds a non-positive value.
    """
    from scipy.optimize import minimize, nnls

    N = _as_positive_1d("N", N)
    D = _as_positive_1d("D", D, len(N))
    L = _as_positive_1d("L", L, len(N))
    if len(N) < 5:
        raise ValueError(f"fitting 5 coefficients needs at least 5 runs, got {len(N)}")
    if len(np.unique(N)) < 2 or len(np.unique(D)) < 2:
        raise ValueError("N and D must each hold at least 2 distinct values")
    _check_positive_number("huber_delta", huber_delta)
    _check_positive_int("n_starts", n_starts)
    grid = np.linspace(0.05, 1.5, 30) if exponent_grid is None else _as_positive_1d("exponent_grid", exponent_grid)
    log_N, log_D, log_L = np.log(N), np.log(D), np.log(L)

    def objective(p: np.ndarray) -> tuple[float, np.ndarray]:  # p = (a, b, e, alpha, beta)
        a, b, e, alpha, beta = p
        terms = np.stack([a - alpha * log_N, b - beta * log_D, np.full_like(log_N, e)])  # (3, n)
        top = terms.max(axis=0)
        weights = np.exp(terms - top)
        total = weights.sum(axis=0)
        lse = top + np.log(total)
        soft = weights / total                                                            # (3, n): d lse / d term
        loss, dloss = _huber(lse - log_L, huber_delta)
        grad = np.array([(dloss * soft[0]).sum(), (dloss * soft[1]).sum(), (dloss * soft[2]).sum(),
                         -(dloss * soft[0] * log_N).sum(), -(dloss * soft[1] * log_D).sum()])
        return float(loss.sum()), grad

    candidates = []
    for alpha, beta in itertools.product(grid, grid):
        design = np.stack([np.ones_like(N), N ** -alpha, D ** -beta], axis=1) / L[:, None]   # relative residuals
        (E, A, B), residual = nnls(design, np.ones_like(L))
        candidates.append((residual, alpha, beta, max(E, 1e-6), max(A, 1e-6), max(B, 1e-6)))
    candidates.sort(key=lambda c: c[0])
    best = None
    for _, alpha, beta, E, A, B in candidates[:n_starts]:
        start = np.array([math.log(A), math.log(B), math.log(E), alpha, beta])
        result = minimize(objective, start, jac=True, method="L-BFGS-B")
        if best is None or result.fun < best.fun:
            best = result
    a, b, e, alpha, beta = best.x
    return ChinchillaFit(E=float(np.exp(e)), A=float(np.exp(a)), B=float(np.exp(b)), alpha=float(alpha),
                         beta=float(beta))


def compute_optimal(compute: float | np.ndarray, fit: ChinchillaFit = CHINCHILLA) -> tuple[np.ndarray, np.ndarray]:
    r"""The parameters and tokens that minimise :math:`\hat L(N, D)` for a compute budget :math:`C = 6ND`.

    Hoffmann et al. (2022), Eq. 4: substituting :math:`D = C / (6N)` and setting the derivative in :math:`N` to zero,

    .. math::
        N_{opt}(C) = G \left(\frac{C}{6}\right)^{\frac{\beta}{\alpha + \beta}}, \quad
        D_{opt}(C) = G^{-1} \left(\frac{C}{6}\right)^{\frac{\alpha}{\alpha + \beta}}, \quad
        G = \left(\frac{\alpha A}{\beta B}\right)^{\frac{1}{\alpha + \beta}} .

    The exponents sum to 1: when the budget grows, parameters and tokens grow together, each by a power near
    :math:`1/2` when :math:`\alpha \approx \beta`.

    Args:
        compute: FLOPs, a positive number or array.
        fit: the law (default :data:`CHINCHILLA`, Hoffmann et al.'s coefficients).

    Returns:
        ``(N_opt, D_opt)``, arrays of the shape of ``compute`` (0-d for a number).

    Raises:
        TypeError: if ``fit`` is not a :class:`ChinchillaFit`; ValueError: if ``compute`` holds a value that is
            not positive and finite, or the fit has a non-positive ``A``, ``B``, ``alpha`` or ``beta``.
    """
    if not isinstance(fit, ChinchillaFit):
        raise TypeError(f"fit must be a ChinchillaFit, got {type(fit).__name__}")
    if not all(v > 0 for v in (fit.A, fit.B, fit.alpha, fit.beta)):
        raise ValueError(f"fit must have positive A, B, alpha and beta, got {fit}")
    C = np.asarray(compute, dtype=np.float64)
    if not np.all(np.isfinite(C)) or not np.all(C > 0):
        raise ValueError("compute must hold positive finite numbers (FLOPs)")
    s = fit.alpha + fit.beta
    G = (fit.alpha * fit.A / (fit.beta * fit.B)) ** (1.0 / s)
    return G * (C / 6.0) ** (fit.beta / s), (C / 6.0) ** (fit.alpha / s) / G
