"""Decoding: greedy search and beam search with the GNMT length penalty, batched and model-agnostic.

Chapter 6 of the book ("The encoder-decoder Transformer") decodes its translation model with both.

**The model interface.** A decoder is seen through one function, ``log_probs_fn(prefix) -> log_probs``:

* ``prefix`` ``(N, t)`` int64: ``N`` partial target sequences, each starting with ``<bos>``;
* ``log_probs`` ``(N, V)`` floating: :math:`\\log p(y_{t} \\mid y_{<t}, x)` of every next token (a
  ``log_softmax``, rows that sum to 1 in probability).

Decoding ``B`` sources with ``K`` hypotheses each (``K = 1`` for greedy search) uses ``N = B * K`` rows, and row
``n`` **always belongs to source** ``n // K``: rows ``b*K .. b*K + K - 1`` are the hypotheses of source ``b``.
Beam search only reorders rows *within* a source's block, so an encoder-decoder expands its encoder output once,
before decoding, with :func:`expand_for_beams` (``memory.repeat_interleave(K, dim=0)``), and closes over it::

    memory = expand_for_beams(model.encode(src), K)            # (B*K, S, d_model)
    def log_probs_fn(prefix):                                   # prefix (B*K, t)
        return model.decode(prefix, memory)[:, -1].log_softmax(-1)   # (B*K, V)

A function that keeps state between calls (a key/value cache) can pass ``reorder_fn`` to :func:`beam_search`: it
is called after every step with the rows the new hypotheses continue, to reorder that state.

**The outputs** (:class:`Hypotheses`) hold the generated tokens without ``<bos>``: each row ends with
``<eos>`` (unless it ran out of ``max_len`` steps) and is padded with ``pad_id``, as
:meth:`tfcourse.models.seq2seq.Seq2Seq.greedy_decode` returns them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from ._checks import DtypeError, check_int as _check_int

__all__ = ["Hypotheses", "gnmt_length_penalty", "expand_for_beams", "greedy_decode", "beam_search"]

LogProbsFn = Callable[[torch.Tensor], torch.Tensor]


class Hypotheses(NamedTuple):
    """The decoded sequence of each source.

    Attributes:
        tokens: ``(B, T')`` int64, the generated tokens (no ``<bos>``), ``<eos>``-terminated unless the sequence
            ran out of steps, then ``pad_id``; ``T' <= max_len``.
        lengths: ``(B,)`` int64, the number of generated tokens (``<eos>`` included).
        log_probs: ``(B,)`` the model's log-probability of each sequence, :math:`\\sum_t \\log p(y_t \\mid y_{<t},
            x)` (``<eos>`` included), in the dtype of ``log_probs_fn``'s output.
        scores: ``(B,)`` what the search maximised: ``log_probs / gnmt_length_penalty(lengths, alpha)``
            (equal to ``log_probs`` for greedy search and for ``alpha = 0``).
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    log_probs: torch.Tensor
    scores: torch.Tensor


def gnmt_length_penalty(length: torch.Tensor | int, alpha: float) -> torch.Tensor | float:
    r"""The length normalisation of Google's NMT system,
    :math:`lp(Y) = \frac{(5 + |Y|)^\alpha}{(5 + 1)^\alpha}`.

    Beam search ranks finished hypotheses by :math:`\log P(Y \mid X) / lp(Y)`. As log-probabilities are negative
    and shrink with every token, unnormalised scores favour short outputs; :math:`\alpha > 0` divides longer
    hypotheses by more, :math:`\alpha = 0` turns the penalty off (:math:`lp = 1`) and :math:`\alpha = 1` is close to
    dividing by the length. Wu et al. tuned :math:`\alpha \in [0.6, 0.7]`; :math:`|Y|` counts ``<eos>`` here.

    Args:
        length: :math:`|Y| \ge 1`, an int or a tensor of them.
        alpha: :math:`\alpha \ge 0`.

    Returns:
        A float, or a float tensor of the shape of ``length``.

    Raises:
        ValueError: for a negative ``alpha`` or a length below 1.

    Source: Wu et al. (2016), Sec. 7, Eq. 14.
    """
    _check_alpha(alpha)
    if isinstance(length, torch.Tensor):
        if length.numel() and length.min() < 1:
            raise ValueError(f"length must be >= 1, got a minimum of {length.min().item()}")
        return ((5.0 + length.double()) / 6.0).pow(alpha)
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be an int >= 1, got {length!r}")
    return ((5.0 + length) / 6.0) ** alpha


def expand_for_beams(x: torch.Tensor, beam_size: int) -> torch.Tensor:
    """Repeat each source's tensor ``beam_size`` times along the batch: ``(B, ...) -> (B * beam_size, ...)``,
    with rows ``b*K .. b*K + K - 1`` copies of row ``b``, the row layout that :func:`beam_search` uses.

    Raises:
        TypeError: if ``x`` is not a tensor; ValueError: if it is 0-D or ``beam_size`` is not a positive int.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor (B, ...), got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError("x must have a batch dimension (B, ...), got a 0-D tensor")
    _check_int("beam_size", beam_size)
    return x.repeat_interleave(beam_size, dim=0)


# --------------------------------------------------------------------------------------------------------------
# Greedy search
# --------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def greedy_decode(log_probs_fn: LogProbsFn, batch_size: int, max_len: int, bos_id: int, eos_id: int,
                  pad_id: int = 0, device: torch.device | str | None = None) -> Hypotheses:
    r"""Write each sequence one token at a time, always taking the most probable next token,
    :math:`y_t = \arg\max_v \log p(v \mid y_{<t}, x)`, until ``<eos>`` or ``max_len`` tokens.

    Args:
        log_probs_fn: ``prefix (batch_size, t) int64 -> (batch_size, V)`` next-token log-probabilities (see the
            module docstring).
        batch_size: the number of sequences ``B``.
        max_len: the most tokens to generate per sequence (``<eos>`` included).
        bos_id, eos_id: the ids that start and end a sequence (they may be equal, as in GPT-2).
        pad_id: what fills a row after its ``<eos>`` (also what such rows show ``log_probs_fn``).
        device: where to create the prefixes (default: the CPU).

    Returns:
        :class:`Hypotheses` (``scores`` equal to ``log_probs``). Decoding stops as soon as every row has written
        ``<eos>``.

    Raises:
        TypeError: if ``log_probs_fn`` is not callable.
        ValueError: for non-positive ``batch_size`` or ``max_len``, negative ids, or a ``log_probs_fn`` output
            of the wrong shape or dtype, with NaN, or whose rows are not log-probabilities (``logsumexp`` not 0).
    """
    _check_common(log_probs_fn, batch_size, max_len, bos_id, eos_id, pad_id)
    prefix = torch.full((batch_size, 1), bos_id, dtype=torch.long, device=device)  # (B, 1)
    done = torch.zeros(batch_size, dtype=torch.bool, device=prefix.device)
    lengths = torch.zeros(batch_size, dtype=torch.long, device=prefix.device)
    total, vocab_size = None, None
    for _ in range(max_len):
        log_p = log_probs_fn(prefix)
        vocab_size = _check_log_probs(log_p, batch_size, vocab_size, (bos_id, eos_id, pad_id))
        best_lp, token = log_p.max(dim=-1)  # (B,), (B,): the first maximum on ties, as torch.argmax
        total = torch.zeros_like(best_lp) if total is None else total
        total = total + best_lp.masked_fill(done, 0.0)
        lengths = lengths + (~done).long()
        token = token.masked_fill(done, pad_id)
        prefix = torch.cat([prefix, token[:, None]], dim=1)  # (B, t + 1)
        done = done | (token == eos_id)
        if done.all():
            break
    return Hypotheses(prefix[:, 1:], lengths, total, total.clone())


# --------------------------------------------------------------------------------------------------------------
# Beam search
# --------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def beam_search(log_probs_fn: LogProbsFn, batch_size: int, beam_size: int, max_len: int, bos_id: int, eos_id: int,
                pad_id: int = 0, length_penalty: float = 0.0, device: torch.device | str | None = None,
                reorder_fn: Callable[[torch.Tensor], None] | None = None) -> Hypotheses:
    r"""Beam search: keep the ``K`` most probable partial sequences of each source, extend each by every token,
    keep the ``K`` best extensions, and return the best finished sequence under the length-normalised score
    :math:`\log P(Y \mid X) / lp(Y)` (:func:`gnmt_length_penalty` with :math:`\alpha` = ``length_penalty``).

    At step ``t`` the ``K * V`` extensions of the ``K`` live hypotheses are ranked by their log-probability and
    the best ``2K`` are taken (as Hugging Face and fairseq do): an extension ending in ``<eos>`` and ranked among
    the first ``K`` becomes a **finished** hypothesis (one ranked lower is dropped), and the ``K`` best of the
    others stay live. A source is done when its best finished score is at least the best score any live
    hypothesis could still reach: log-probabilities only decrease, so that bound is
    :math:`\max_k s_k / lp(\mathit{max\_len})` (exact, not a heuristic). At ``max_len`` the ``K`` best live
    extensions count as (unfinished) hypotheses, as greedy search returns a sequence without ``<eos>``.

    ``beam_size=1`` with ``length_penalty=0`` is exactly :func:`greedy_decode`. A beam wider than the number of
    sequences of ``max_len`` tokens or fewer is an exhaustive search, which finds the most probable sequence. In
    between, beam search usually scores at least as well as greedy search but **need not**: the greedy path can
    be pruned early in favour of prefixes that end badly (the tests build such a model).

    Args:
        log_probs_fn: ``prefix (batch_size * beam_size, t) int64 -> (batch_size * beam_size, V)`` next-token
            log-probabilities; row ``n`` belongs to source ``n // beam_size`` (see the module docstring).
        batch_size: the number of sources ``B``.
        beam_size: hypotheses kept per source ``K``.
        max_len: the most tokens to generate (``<eos>`` included).
        bos_id, eos_id, pad_id: as in :func:`greedy_decode`.
        length_penalty: :math:`\alpha \ge 0` of the GNMT length penalty (0: rank by log-probability).
        device: where to create the prefixes (default: the CPU).
        reorder_fn: optional ``reorder_fn(rows (B*K,) int64)``, called after each step: new row ``n`` continues old
            row ``rows[n]`` (always in the same source block), for a ``log_probs_fn`` that caches state.

    Returns:
        :class:`Hypotheses` with the best sequence of each source.

    Raises:
        TypeError: if ``log_probs_fn`` (or ``reorder_fn``) is not callable.
        ValueError: as :func:`greedy_decode`, and for a non-positive ``beam_size`` or a negative
            ``length_penalty``.

    Sources: Graves (2012) and Sutskever et al. (2014) (beam search for sequence models); Wu et al. (2016),
    Sec. 7 (the length penalty).
    """
    _check_common(log_probs_fn, batch_size, max_len, bos_id, eos_id, pad_id)
    _check_int("beam_size", beam_size)
    _check_alpha(length_penalty)
    if reorder_fn is not None and not callable(reorder_fn):
        raise TypeError(f"reorder_fn must be callable or None, got {type(reorder_fn).__name__}")
    B, K = batch_size, beam_size
    N = B * K
    seqs = torch.full((B, K, 1), bos_id, dtype=torch.long, device=device)  # (B, K, t), <bos> first
    dev = seqs.device
    scores = None  # (B, K) log-probabilities of the live hypotheses
    best_score = torch.full((B,), -math.inf, dtype=torch.float64, device=dev)  # normalised
    best_lp = torch.full((B,), -math.inf, dtype=torch.float64, device=dev)
    best_len = torch.ones(B, dtype=torch.long, device=dev)
    best_tokens = torch.full((B, max_len), pad_id, dtype=torch.long, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    rank = torch.arange(2 * K, device=dev)
    vocab_size, out_dtype = None, None
    max_lp = gnmt_length_penalty(max_len, length_penalty)
    rows_base = (torch.arange(B, device=dev) * K)[:, None]  # (B, 1): the first row of each source block

    for t in range(1, max_len + 1):
        log_p = log_probs_fn(seqs.view(N, t))
        vocab_size = _check_log_probs(log_p, N, vocab_size, (bos_id, eos_id, pad_id))
        out_dtype = log_p.dtype
        log_p = log_p.double().view(B, K, vocab_size)  # scores are summed in float64
        if scores is None:  # only the first beam is live at the start: K copies would give K equal hypotheses
            scores = torch.full((B, K), -math.inf, dtype=torch.float64, device=dev)
            scores[:, 0] = 0.0
        candidates = (scores[:, :, None] + log_p).view(B, K * vocab_size)  # (B, K*V)
        n_cand = min(2 * K, K * vocab_size)
        top_scores, top_idx = candidates.topk(n_cand, dim=-1)  # (B, 2K), sorted best first
        beam, token = top_idx // vocab_size, top_idx % vocab_size  # (B, 2K)
        live = torch.isfinite(top_scores)
        is_eos = token == eos_id
        # Finished at this step: <eos> among the K best; at the last step every one of the K best.
        last = t == max_len
        finishing = (rank[:n_cand] < K) & live & ~done[:, None] & (True if last else is_eos)
        normalised = (top_scores / gnmt_length_penalty(t, length_penalty)).masked_fill(~finishing, -math.inf)
        step_best, step_arg = normalised.max(dim=-1)  # (B,): the first maximum on ties (the better ranked)
        improved = step_best > best_score
        if improved.any():
            b = improved.nonzero()[:, 0]
            arg = step_arg[b]
            best_score[b] = step_best[b]
            best_lp[b] = top_scores[b, arg]
            best_len[b] = t
            best_tokens[b, : t - 1] = seqs[b, beam[b, arg], 1:]
            best_tokens[b, t - 1] = token[b, arg]
        if last:
            break
        # The K best extensions that do not end in <eos> stay live (there are K of them among the 2K: at most one
        # <eos> extension per live hypothesis). A stable sort keeps them in rank order.
        order = torch.sort(is_eos.int(), dim=-1, stable=True).indices[:, :K]  # (B, K)
        new_beam, new_token = beam.gather(1, order), token.gather(1, order)
        scores = top_scores.gather(1, order).masked_fill(is_eos.gather(1, order), -math.inf)  # (B, K)
        seqs = torch.cat([seqs.gather(1, new_beam[:, :, None].expand(B, K, t)), new_token[:, :, None]], dim=2)
        if reorder_fn is not None:
            reorder_fn((rows_base + new_beam).view(N))
        bound = scores.max(dim=-1).values / max_lp  # (B,): the best normalised score still reachable
        done = done | (best_score >= bound)
        if done.all():
            break

    T = int(best_len.max())
    return Hypotheses(best_tokens[:, :T], best_len, best_lp.to(out_dtype), best_score.to(out_dtype))


# --------------------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------------------

def _check_alpha(alpha: object) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"length_penalty (alpha) must be a finite number >= 0, got {alpha!r}")


def _check_common(log_probs_fn: object, batch_size: int, max_len: int, bos_id: int, eos_id: int,
                  pad_id: int) -> None:
    if not callable(log_probs_fn):
        raise TypeError(f"log_probs_fn must be callable, prefix (N, t) -> log-probabilities (N, V), got "
                        f"{type(log_probs_fn).__name__}")
    _check_int("batch_size", batch_size)
    _check_int("max_len", max_len)
    for name, value in (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id)):
        _check_int(name, value, minimum=0)


def _check_log_probs(log_p: object, n_rows: int, vocab_size: int | None, ids: tuple[int, int, int]) -> int:
    """Check one output of ``log_probs_fn`` and return its vocabulary size."""
    if not isinstance(log_p, torch.Tensor):
        raise TypeError(f"log_probs_fn must return a torch.Tensor (N, V), got {type(log_p).__name__}")
    if log_p.dim() != 2 or log_p.shape[0] != n_rows:
        raise ValueError(f"log_probs_fn must return shape (N, V) with N = {n_rows} rows (one per prefix), got "
                         f"{tuple(log_p.shape)}")
    if not log_p.is_floating_point():
        raise DtypeError(f"log_probs_fn must return floating log-probabilities, got {log_p.dtype}")
    if vocab_size is not None and log_p.shape[1] != vocab_size:
        raise ValueError(f"log_probs_fn changed its vocabulary size from {vocab_size} to {log_p.shape[1]}")
    V = log_p.shape[1]
    if max(ids) >= V:
        raise ValueError(f"bos_id, eos_id and pad_id must lie in the vocabulary [0, {V}), got {ids}")
    if torch.isnan(log_p).any():
        raise ValueError("log_probs_fn returned NaN")
    tol = 1e-3 if log_p.dtype in (torch.float32, torch.float64) else 2e-2
    total = torch.logsumexp(log_p.float(), dim=-1)
    if (total - 0.0).abs().max() > tol:
        raise ValueError(f"log_probs_fn must return log-probabilities (apply log_softmax to logits): its rows' "
                         f"logsumexp should be 0, got values up to {total.abs().max().item():.3g}")
    return V


# --------------------------------------------------------------------------------------------------------------
# Sampling: temperature, top-k and top-p (nucleus) filtering (chapter 9)
# --------------------------------------------------------------------------------------------------------------

def _check_logits(logits: object) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor (..., V), got {type(logits).__name__}")
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty vocabulary dimension (..., V), got {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise DtypeError(f"logits must be floating, got {logits.dtype}")
    # One reduction in the common case (this runs at every step of generation): a row's maximum is NaN if the row
    # holds a NaN, +inf if it holds +inf, and -inf only if the row is -inf everywhere.
    if bool(torch.isfinite(logits.amax(dim=-1)).all()):
        return
    if torch.isnan(logits).any() or torch.isposinf(logits).any():
        raise ValueError("logits must not hold NaN or +inf")
    raise ValueError("logits: a row is -inf everywhere, so no token can be drawn")


def _check_temperature(temperature: object, allow_zero: bool) -> None:
    ok = not isinstance(temperature, bool) and isinstance(temperature, (int, float)) and math.isfinite(temperature)
    if not ok or temperature < 0 or (temperature == 0 and not allow_zero):
        bound = ">= 0 (0: greedy)" if allow_zero else "> 0"
        raise ValueError(f"temperature must be a finite number {bound}, got {temperature!r}")


def _check_top_p(p: object) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
        raise ValueError(f"top_p must be a number in (0, 1], got {p!r}")


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    r"""Divide the logits by the temperature :math:`\tau`: :math:`p_\tau(v) = \mathrm{softmax}(z / \tau)_v`.

    :math:`\tau = 1` leaves the model's distribution as it is; :math:`\tau < 1` sharpens it (towards greedy
    decoding as :math:`\tau \to 0`); :math:`\tau > 1` flattens it (towards the uniform distribution).

    Args:
        logits: ``(..., V)`` floating scores :math:`z` (``-inf`` marks a token already excluded).
        temperature: :math:`\tau > 0`, finite (for greedy decoding use ``sample_next_token(..., temperature=0)``).

    Returns:
        ``(..., V)``, a new tensor of the dtype of ``logits``.

    Raises:
        TypeError: if ``logits`` is not a tensor; ValueError: (including
        :class:`~tfcourse._checks.DtypeError`) for non-floating logits, NaN or ``+inf``, a row that is ``-inf``
        everywhere, or a temperature that is not positive and finite.

    Source: Ackley, Hinton and Sejnowski (1985) (the Boltzmann distribution's temperature); as a decoding knob,
    Holtzman et al. (2020), Sec. 3.2.
    """
    _check_logits(logits)
    _check_temperature(temperature, allow_zero=False)
    return logits / temperature


def top_k_filter(logits: torch.Tensor, k: int, fill_value: float = -math.inf) -> torch.Tensor:
    """Keep the ``k`` largest logits of each row and set the others to ``fill_value`` (top-k sampling).

    A token is kept if its logit is at least the ``k``-th largest of its row, so exactly ``k`` are kept unless
    other tokens **tie** with the ``k``-th, which are all kept (Hugging Face's ``TopKLogitsWarper`` does the
    same); ``k >= V`` keeps everything. Equal to ``TopKLogitsWarper(k)`` of ``transformers``.

    Args:
        logits: ``(..., V)`` floating.
        k: an int ``>= 1``.
        fill_value: what removed tokens get (``-inf``: probability 0 after the softmax).

    Returns:
        ``(..., V)``, a new tensor.

    Raises:
        TypeError / ValueError: as :func:`apply_temperature`, and for a ``k`` that is not an int ``>= 1``.

    Source: Fan, Lewis and Dauphin (2018), Sec. 5.4 ("at each timestep, the model ... randomly samples from the
    k most likely candidates"); Radford et al. (2019) used ``k = 40`` for GPT-2's samples.
    """
    _check_logits(logits)
    _check_int("k", k)
    kth = logits.topk(min(k, logits.shape[-1]), dim=-1).values[..., -1:]  # (..., 1): the k-th largest logit
    return logits.masked_fill(logits < kth, fill_value)


def top_p_filter(logits: torch.Tensor, p: float, fill_value: float = -math.inf) -> torch.Tensor:
    r"""Keep the **nucleus** of each row, the smallest set of most probable tokens whose probability mass is at
    least ``p``, and set the others to ``fill_value`` (top-p or nucleus sampling).

    .. math:: V^{(p)} = \text{the smallest } V' \subseteq V \text{ such that } \sum_{v \in V'} P(v) \ge p

    Sort the probabilities in decreasing order; token number :math:`r` (from 0) is kept if the mass of the tokens
    before it is below ``p``, :math:`\sum_{r' < r} P_{(r')} < p`. The most probable token is always kept, so at
    least one token survives; ``p = 1`` keeps every token. Among tokens of **equal** probability on the
    boundary, the minimal set keeps only as many as it needs: those with the lower indices (a stable sort). Equal
    to ``TopPLogitsWarper(p)`` of ``transformers`` (which writes the same rule from the other end of the sort)
    up to rounding on the boundary.

    Args:
        logits: ``(..., V)`` floating (the probabilities are their softmax; apply the temperature first).
        p: the mass, in ``(0, 1]``.
        fill_value: what removed tokens get.

    Returns:
        ``(..., V)``, a new tensor.

    Raises:
        TypeError / ValueError: as :func:`apply_temperature`, and for ``p`` outside ``(0, 1]``.

    Source: Holtzman et al. (2020), "The curious case of neural text degeneration", Sec. 3.1, Eq. 2.
    """
    _check_logits(logits)
    _check_top_p(p)
    if p == 1:
        return logits.clone()
    compute = torch.promote_types(logits.dtype, torch.float32)  # half-precision cumulative sums drift
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)  # (..., V)
    probs = sorted_logits.to(compute).softmax(dim=-1)                         # (..., V), decreasing
    mass_before = probs.cumsum(dim=-1) - probs                                # (..., V): mass of the tokens before
    remove_sorted = mass_before >= p
    remove_sorted[..., 0] = False                                             # the most probable token stays
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)  # back to vocabulary order
    return logits.masked_fill(remove, fill_value)


def _check_sampling(logits: object, temperature: object, top_k: object, top_p: object) -> None:
    _check_logits(logits)
    _check_temperature(temperature, allow_zero=True)
    if top_k is not None:
        _check_int("top_k", top_k)
    if top_p is not None:
        _check_top_p(top_p)


def next_token_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                     top_p: float | None = None) -> torch.Tensor:
    """The distribution a sampler draws the next token from: temperature first, then top-k, then top-p (the order
    of Hugging Face's ``generate``), then the softmax. ``temperature = 0`` gives greedy decoding: all the mass on
    the first maximum of each row (the filters cannot change the argmax, which they always keep).

    Note the order: top-k does not depend on the temperature (it keeps the same tokens), top-p does (a higher
    temperature flattens the distribution, so the nucleus grows).

    Args:
        logits: ``(..., V)`` floating.
        temperature: ``>= 0``; top_k: ``None`` or an int ``>= 1``; top_p: ``None`` or a number in ``(0, 1]``.

    Returns:
        ``(..., V)`` probabilities (rows sum to 1) in the dtype of ``logits`` (float32 for half precision).

    Raises:
        TypeError / ValueError: as :func:`apply_temperature`, :func:`top_k_filter` and :func:`top_p_filter`.
    """
    _check_sampling(logits, temperature, top_k, top_p)
    compute = torch.promote_types(logits.dtype, torch.float32)
    if temperature == 0:
        return torch.zeros_like(logits, dtype=compute).scatter(-1, logits.argmax(dim=-1, keepdim=True), 1.0)
    z = apply_temperature(logits.to(compute), temperature)
    if top_k is not None:
        z = top_k_filter(z, top_k)
    if top_p is not None:
        z = top_p_filter(z, top_p)
    return z.softmax(dim=-1)


def sample_next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per row from :func:`next_token_probs` (greedy argmax when ``temperature = 0``).

    Args:
        logits: ``(..., V)`` floating next-token scores, for example ``model(idx)[0][:, -1]`` ``(B, V)``.
        temperature, top_k, top_p: as :func:`next_token_probs`.
        generator: a ``torch.Generator`` on the device of ``logits``, for reproducible draws.

    Returns:
        ``(...)`` int64 token ids (``(B,)`` for ``(B, V)`` logits).

    Raises:
        TypeError / ValueError: as :func:`next_token_probs`.

    Sources: Holtzman et al. (2020) (top-p); Fan et al. (2018) (top-k).
    """
    if temperature == 0:  # all of next_token_probs' mass on the argmax: take it without building the one-hot
        _check_sampling(logits, temperature, top_k, top_p)
        return logits.argmax(dim=-1)
    probs = next_token_probs(logits, temperature, top_k, top_p)  # (..., V)
    flat = probs.reshape(-1, probs.shape[-1])                    # (N, V)
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


__all__ += ["apply_temperature", "top_k_filter", "top_p_filter", "next_token_probs", "sample_next_token"]
