"""Batching by length and a length curriculum (chapter 7, "Training transformers").

A batch of sequences of different lengths is padded to its longest member, and every pad position is computed
and thrown away. How much is wasted depends on which sequences share a batch:

* :func:`random_batches`: a shuffled split into batches of ``batch_size`` (the baseline);
* :func:`bucket_batches`: shuffle, cut into *pools* of examples, sort each pool by length, cut the pools into
  batches, shuffle the batches (the "bucket iterator" of torchtext and the length-sorted batching of fairseq and
  tensor2tensor): sequences of similar lengths share a batch, the order of the batches stays random;
* :func:`token_batches`: *dynamic* batching, batches of a token budget rather than a fixed number of sequences
  (fairseq's ``--max-tokens``): many short sequences or few long ones, so that every batch costs about the same;
* :func:`padding_stats` measures the fraction of pad tokens of any of them.

A **curriculum** orders training from easy to hard (Bengio et al., 2009); with length as the difficulty,
:class:`LengthCurriculum` samples each step's batch from the shortest fraction :func:`competence` of the data,
a fraction that grows to 1 (Platanios et al., 2019).

Every function works on plain lengths (a sequence of ints, one per example) and returns lists of example
indices, so that it serves any dataset: ``[task.source_length(p) for p in task.train]`` for the number-word task
of :mod:`tfcourse.data.numbers`. All of them are deterministic given their ``seed``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import NamedTuple

__all__ = [
    "PaddingStats",
    "padding_stats",
    "random_batches",
    "bucket_batches",
    "token_batches",
    "COMPETENCE_KINDS",
    "competence",
    "LengthCurriculum",
]


def _check_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_lengths(lengths: object) -> list[int]:
    if isinstance(lengths, (str, bytes)) or not isinstance(lengths, Sequence):
        raise TypeError(f"lengths must be a sequence of ints (one per example), got {type(lengths).__name__}")
    out = list(lengths)
    if not out:
        raise ValueError("lengths must not be empty")
    for i, n in enumerate(out):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"lengths[{i}] must be a positive int, got {n!r}")
    return out


def _check_batches(batches: object, n: int) -> list[list[int]]:
    if isinstance(batches, (str, bytes)) or not isinstance(batches, Sequence) or not batches:
        raise ValueError("batches must be a non-empty sequence of non-empty lists of example indices")
    out = []
    for b, batch in enumerate(batches):
        batch = list(batch)
        if not batch:
            raise ValueError(f"batches[{b}] is empty")
        for i in batch:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
                raise ValueError(f"batches[{b}] holds {i!r}, not an index in [0, {n})")
        out.append(batch)
    return out


# --------------------------------------------------------------------------------------------------------------
# Measuring padding
# --------------------------------------------------------------------------------------------------------------

class PaddingStats(NamedTuple):
    """Token counts of a batching: ``real`` tokens, ``total`` positions computed (real + padding) and the
    fraction ``pad_fraction = 1 - real / total`` of positions that are padding."""

    real: int
    total: int
    pad_fraction: float


def padding_stats(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> PaddingStats:
    r"""The padding of a batching: each batch :math:`b` is padded to its longest sequence, so it computes
    :math:`|b| \cdot \max_{i \in b} \ell_i` positions, of which :math:`\sum_{i \in b} \ell_i` are real.

    .. math:: \text{pad fraction} = 1 - \frac{\sum_b \sum_{i \in b} \ell_i}{\sum_b |b| \max_{i \in b} \ell_i}

    Args:
        lengths: the length :math:`\ell_i \ge 1` of every example (in tokens, including any ``<eos>``).
        batches: lists of indices into ``lengths`` (an example may appear in several batches, or in none).

    Returns:
        A :class:`PaddingStats`.

    Raises:
        TypeError: if ``lengths`` is not a sequence.
        ValueError: for an empty ``lengths`` or ``batches``, a non-positive length, an empty batch or an index out
            of range.
    """
    lengths = _check_lengths(lengths)
    batches = _check_batches(batches, len(lengths))
    real = sum(lengths[i] for batch in batches for i in batch)
    total = sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)
    return PaddingStats(real, total, 1.0 - real / total)


# --------------------------------------------------------------------------------------------------------------
# Batchings
# --------------------------------------------------------------------------------------------------------------

def _chunks(order: list[int], batch_size: int, drop_last: bool) -> list[list[int]]:
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def random_batches(n: int, batch_size: int, seed: int = 0, drop_last: bool = False) -> list[list[int]]:
    """One epoch of ``n`` examples in a random order, cut into batches of ``batch_size`` (the last one smaller
    unless ``drop_last``).

    Raises:
        ValueError: for a non-positive ``n`` or ``batch_size``.
    """
    _check_int("n", n)
    _check_int("batch_size", batch_size)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return _chunks(order, batch_size, drop_last)


def bucket_batches(lengths: Sequence[int], batch_size: int, seed: int = 0, pool_size: int | None = None,
                   drop_last: bool = False) -> list[list[int]]:
    """One epoch in batches of similar lengths: shuffle the examples, cut them into pools of ``pool_size``,
    sort each pool by length (a stable sort: equal lengths keep their random order), cut each pool into batches
    of ``batch_size`` and shuffle the order of all the batches.

    ``pool_size=None`` sorts the whole epoch at once (the least padding; the batches still come in a random
    order, but a batch always holds the same few lengths); a pool of ``k * batch_size`` examples keeps more
    randomness in which examples meet, at the cost of some padding, as torchtext's ``BucketIterator`` (pools of
    100 batches) does. ``pool_size = batch_size`` is :func:`random_batches` again (up to the order of the draws).

    Args:
        lengths: the length of every example.
        batch_size: examples per batch.
        seed: the seed of the shuffles.
        pool_size: examples per sorting pool (``None``: all), ``>= batch_size``.
        drop_last: drop a pool's last batch when it is smaller than ``batch_size``.

    Returns:
        Lists of example indices; every index appears once (unless dropped).

    Raises:
        TypeError, ValueError: for bad lengths, a non-positive ``batch_size`` or a ``pool_size`` below it.
    """
    lengths = _check_lengths(lengths)
    _check_int("batch_size", batch_size)
    if pool_size is not None:
        _check_int("pool_size", pool_size, minimum=batch_size)
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    pool_size = len(order) if pool_size is None else pool_size
    batches = []
    for start in range(0, len(order), pool_size):
        pool = sorted(order[start:start + pool_size], key=lengths.__getitem__)  # stable: ties stay shuffled
        batches.extend(_chunks(pool, batch_size, drop_last))
    rng.shuffle(batches)
    return batches


def token_batches(lengths: Sequence[int], max_tokens: int, seed: int = 0, shuffle: bool = True) -> list[list[int]]:
    """Dynamic batching: batches of at most ``max_tokens`` positions **padding included** (``len(batch) *
    longest <= max_tokens``), from the examples sorted by length, as fairseq's ``--max-tokens``.

    Short sequences travel in large batches and long ones in small batches, so that every batch costs about the
    same memory and time; the number of sequences per batch varies (so a loss averaged per sequence weighs the
    examples of small batches more: average per token instead).

    Args:
        lengths: the length of every example.
        max_tokens: the token budget of a batch; at least the longest length (every example must fit alone).
        seed: the seed of the shuffles (examples of equal length, and the order of the batches).
        shuffle: shuffle the order of the batches (the examples inside stay sorted).

    Returns:
        Lists of example indices; every index appears exactly once.

    Raises:
        TypeError, ValueError: for bad lengths, or a ``max_tokens`` below the longest length.
    """
    lengths = _check_lengths(lengths)
    _check_int("max_tokens", max_tokens)
    if max(lengths) > max_tokens:
        raise ValueError(f"max_tokens={max_tokens} is below the longest length {max(lengths)}: that example fits "
                         f"in no batch")
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    order.sort(key=lengths.__getitem__)  # stable: equal lengths in a random order
    batches, batch, longest = [], [], 0
    for i in order:
        longest_with_i = max(longest, lengths[i])
        if batch and (len(batch) + 1) * longest_with_i > max_tokens:
            batches.append(batch)
            batch, longest_with_i = [], lengths[i]
        batch.append(i)
        longest = longest_with_i
    batches.append(batch)
    if shuffle:
        rng.shuffle(batches)
    return batches


# --------------------------------------------------------------------------------------------------------------
# Curriculum by length
# --------------------------------------------------------------------------------------------------------------

COMPETENCE_KINDS = ("linear", "sqrt")


def competence(step: int, total: int, c0: float = 0.1, kind: str = "sqrt") -> float:
    r"""The fraction of the data, easiest first, that a curriculum allows at ``step``: from ``c0`` at step 0 to
    1 at step ``total`` and after.

    .. math:: c_\text{linear}(t) = \min\Big(1,\ c_0 + (1 - c_0)\frac{t}{T}\Big), \qquad
              c_\text{sqrt}(t) = \min\Big(1,\ \sqrt{c_0^2 + (1 - c_0^2)\frac{t}{T}}\Big)

    The square root gives each new example as much training time as the ones before it (the new examples are
    fewer and fewer per step; Platanios et al. 2019, Sec. 3).

    Args:
        step: a non-negative int :math:`t`.
        total: :math:`T`, the step at which the whole data set is in, ``>= 1``.
        c0: the initial fraction, in ``(0, 1]`` (``1``: no curriculum).
        kind: ``"sqrt"`` or ``"linear"``.

    Raises:
        ValueError: for a negative ``step``, a non-positive ``total``, ``c0`` outside ``(0, 1]`` or an unknown
            ``kind``.

    Source: Platanios et al. (2019), "Competence-based curriculum learning for neural machine translation".
    """
    _check_int("step", step, minimum=0)
    _check_int("total", total)
    if isinstance(c0, bool) or not isinstance(c0, (int, float)) or not 0.0 < c0 <= 1.0:
        raise ValueError(f"c0 must be a number in (0, 1], got {c0!r}")
    if kind not in COMPETENCE_KINDS:
        raise ValueError(f"kind must be one of {COMPETENCE_KINDS}, got {kind!r}")
    progress = min(1.0, step / total)
    if kind == "linear":
        return min(1.0, c0 + (1.0 - c0) * progress)
    return min(1.0, math.sqrt(c0**2 + (1.0 - c0**2) * progress))


class LengthCurriculum:
    """Batches for a curriculum by length: at step ``t``, ``batch_size`` examples drawn uniformly (without
    replacement) from the ``ceil(c(t) n)`` shortest ones, with :math:`c(t)` = :func:`competence`.

    The examples are ranked once by length, ties broken at random (with ``seed``), so that the pool grows
    smoothly. ``c0=1`` is no curriculum: uniform batches from the whole data set, by the same code, which makes it
    the right baseline. A call is a deterministic function of ``step``, so it plugs into
    :func:`tfcourse.training.train` as its ``batches`` and resumes exactly::

        curriculum = LengthCurriculum(lengths, batch_size=32, total=200)
        train(model, lambda i: make_batch(curriculum(i)), loss_fn, optimizer, steps=400)

    Args:
        lengths: the length (difficulty) of every example.
        batch_size: examples per batch.
        total: the step from which the whole data set is in.
        c0: the initial fraction, in ``(0, 1]``; the pool always holds at least ``batch_size`` examples.
        kind: ``"sqrt"`` (default) or ``"linear"``, see :func:`competence`.
        seed: the seed of the tie-breaking and of the draws.

    Raises:
        TypeError, ValueError: for bad lengths, a ``batch_size`` above the number of examples, or bad curriculum
            settings (see :func:`competence`).

    Sources: Bengio et al. (2009) (curriculum learning); Platanios et al. (2019) (competence; sentence length as
    the difficulty of a translation example).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, total: int, c0: float = 0.1, kind: str = "sqrt",
                 seed: int = 0):
        lengths = _check_lengths(lengths)
        _check_int("batch_size", batch_size)
        if batch_size > len(lengths):
            raise ValueError(f"batch_size={batch_size} exceeds the number of examples {len(lengths)}")
        competence(0, total, c0, kind)  # checks total, c0 and kind now rather than at the first step
        self.batch_size, self.total, self.c0, self.kind, self.seed = batch_size, total, c0, kind, seed
        ties = random.Random(seed).sample(range(len(lengths)), len(lengths))  # a random rank among equals
        self.order = sorted(range(len(lengths)), key=lambda i: (lengths[i], ties[i]))  # shortest first
        self.lengths = lengths

    def pool_size(self, step: int) -> int:
        """How many of the shortest examples batch ``step`` is drawn from."""
        c = competence(step, self.total, self.c0, self.kind)
        return min(len(self.order), max(self.batch_size, math.ceil(c * len(self.order))))

    def __call__(self, step: int) -> list[int]:
        """The example indices of batch ``step`` (``step >= 0``)."""
        pool = self.pool_size(step)
        rng = random.Random(f"{self.seed}/{step}")  # a str seed is hashed deterministically (not by hash())
        return [self.order[j] for j in rng.sample(range(pool), self.batch_size)]

    def __repr__(self) -> str:
        return (f"LengthCurriculum({len(self.order)} examples, batch_size={self.batch_size}, total={self.total}, "
                f"c0={self.c0}, kind={self.kind!r})")
