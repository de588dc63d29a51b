"""tfcourse.data.batching: the padding count against real padded tensors of the number-word task, batchings that
partition the data, sorted batches as the least padding possible, token budgets, the competence schedule and the
length curriculum (properties with hypothesis), bad inputs."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tfcourse.data.batching import (
    LengthCurriculum,
    bucket_batches,
    competence,
    padding_stats,
    random_batches,
    token_batches,
)
from tfcourse.data.numbers import NumberTranslation, sample_numbers

lengths_st = st.lists(st.integers(1, 40), min_size=1, max_size=120)


def is_partition(batches, n):
    flat = [i for b in batches for i in b]
    return sorted(flat) == list(range(n))


# ------------------------------------------------------------------------------------------------------ padding

def test_padding_stats_by_hand():
    stats = padding_stats([1, 3, 2, 2], [[0, 1], [2, 3]])  # [1, 3] pads to 2 x 3, [2, 2] to 2 x 2
    assert stats == (8, 10, pytest.approx(0.2))
    assert padding_stats([5], [[0]]).pad_fraction == 0.0


def test_padding_stats_counts_the_pad_ids_of_real_batches():
    """On the number-word task, the count equals the <pad> ids in the tensors NumberTranslation.batch makes."""
    task = NumberTranslation.from_numbers("de", sample_numbers(200, high=9999, seed=0), seed=0)
    pairs = task.train
    src_lengths = [task.source_length(p) + 1 for p in pairs]  # + <eos>
    tgt_lengths = [len(task.target_tokens(p)) + 1 for p in pairs]
    for batches in (random_batches(len(pairs), 16, seed=3), bucket_batches(src_lengths, 16, seed=3)):
        src_pads = tgt_pads = total_src = total_tgt = 0
        for batch in batches:
            tensors = task.batch([pairs[i] for i in batch])
            src_pads += int((tensors.src == task.src_vocab.pad_id).sum())
            tgt_pads += int((tensors.tgt_out == task.tgt_vocab.pad_id).sum())
            total_src, total_tgt = total_src + tensors.src.numel(), total_tgt + tensors.tgt_out.numel()
        src, tgt = padding_stats(src_lengths, batches), padding_stats(tgt_lengths, batches)
        assert (src.total, src.total - src.real) == (total_src, src_pads)
        assert (tgt.total, tgt.total - tgt.real) == (total_tgt, tgt_pads)


@pytest.mark.parametrize("lengths, batches", [([], [[0]]), ([0, 1], [[0]]), ([1, 2], []), ([1, 2], [[]]),
                                              ([1, 2], [[2]]), ([1, 2], [[True]]), ([1.5], [[0]])])
def test_padding_stats_rejects_bad_input(lengths, batches):
    with pytest.raises(ValueError):
        padding_stats(lengths, batches)
    with pytest.raises(TypeError):
        padding_stats("abc", [[0]])


# ------------------------------------------------------------------------------------------------------ batchings

@settings(max_examples=40, deadline=None)
@given(lengths=lengths_st, batch_size=st.integers(1, 17), seed=st.integers(0, 1000),
       pool=st.sampled_from([None, 1, 4]))
def test_batchings_partition_the_data(lengths, batch_size, seed, pool):
    n = len(lengths)
    random = random_batches(n, batch_size, seed)
    bucketed = bucket_batches(lengths, batch_size, seed, pool_size=None if pool is None else pool * batch_size)
    for batches in (random, bucketed):
        assert is_partition(batches, n)
        assert all(1 <= len(b) <= batch_size for b in batches)
    assert random == random_batches(n, batch_size, seed)  # deterministic
    assert random_batches(n, batch_size, seed, drop_last=True) == [b for b in random if len(b) == batch_size]


@settings(max_examples=60, deadline=None)
@given(n_batches=st.integers(1, 8), batch_size=st.integers(1, 8), data=st.data())
def test_sorting_the_whole_epoch_gives_the_least_padding(n_batches, batch_size, data):
    """With equal batch sizes, cutting the sorted lengths into batches minimises the padded positions: the j-th
    largest batch maximum can never be smaller than the ((j - 1) B + 1)-th largest length. Any other batching,
    random or pooled, pads at least as much."""
    lengths = data.draw(st.lists(st.integers(1, 30), min_size=n_batches * batch_size,
                                 max_size=n_batches * batch_size))
    seed = data.draw(st.integers(0, 1000))
    best = padding_stats(lengths, bucket_batches(lengths, batch_size, seed)).total
    descending = sorted(lengths, reverse=True)
    assert best == batch_size * sum(descending[j * batch_size] for j in range(n_batches))
    for other in (random_batches(len(lengths), batch_size, seed),
                  bucket_batches(lengths, batch_size, seed, pool_size=2 * batch_size)):
        assert padding_stats(lengths, other).total >= best


def test_bucketing_saves_padding_on_the_number_task():
    task = NumberTranslation.from_numbers("de", sample_numbers(600, high=999_999, seed=0), seed=0)
    lengths = [task.source_length(p) + 1 for p in task.train]
    random = padding_stats(lengths, random_batches(len(lengths), 32, seed=0)).pad_fraction
    pooled = padding_stats(lengths, bucket_batches(lengths, 32, seed=0, pool_size=32 * 8)).pad_fraction
    sorted_ = padding_stats(lengths, bucket_batches(lengths, 32, seed=0)).pad_fraction
    assert sorted_ < pooled < random
    assert random > 0.2 and sorted_ < 0.05


def test_bucket_batches_mixes_the_order_of_batches():
    lengths = list(range(1, 65))
    batches = bucket_batches(lengths, 8, seed=0)
    maxima = [max(lengths[i] for i in b) for b in batches]
    assert sorted(maxima) == [8 * k for k in range(1, 9)] and maxima != sorted(maxima)


@settings(max_examples=40, deadline=None)
@given(lengths=lengths_st, extra=st.integers(0, 60), seed=st.integers(0, 100), shuffle=st.booleans())
def test_token_batches_respect_the_budget(lengths, extra, seed, shuffle):
    max_tokens = max(lengths) + extra
    batches = token_batches(lengths, max_tokens, seed, shuffle)
    assert is_partition(batches, len(lengths))
    assert all(len(b) * max(lengths[i] for i in b) <= max_tokens for b in batches)
    # Greedy filling: a batch could not have taken the next example of the sorted order as well.
    if not shuffle:
        for b, nxt in zip(batches, batches[1:]):
            assert (len(b) + 1) * max(lengths[i] for i in b + nxt[:1]) > max_tokens


def test_token_batches_put_short_sequences_in_large_batches():
    lengths = [2] * 40 + [10] * 40
    batches = token_batches(lengths, 40, seed=0)
    sizes = {max(lengths[i] for i in b): len(b) for b in batches}
    assert sizes == {2: 20, 10: 4}
    with pytest.raises(ValueError, match="max_tokens"):
        token_batches(lengths, 9)


@pytest.mark.parametrize("call", [
    lambda: random_batches(0, 2), lambda: random_batches(3, 0), lambda: bucket_batches([1, 2], 0),
    lambda: bucket_batches([1, 2, 3], 2, pool_size=1), lambda: token_batches([1, 2], 0),
])
def test_batchings_reject_bad_sizes(call):
    with pytest.raises(ValueError):
        call()


# ------------------------------------------------------------------------------------------------ the curriculum

@settings(max_examples=60, deadline=None)
@given(total=st.integers(1, 500), c0=st.floats(0.01, 1.0), kind=st.sampled_from(["sqrt", "linear"]))
def test_competence_grows_from_c0_to_one(total, c0, kind):
    values = [competence(t, total, c0, kind) for t in range(0, total + 3)]
    assert values[0] == pytest.approx(c0) and values[total] == pytest.approx(1.0) and values[-1] == 1.0
    assert all(a <= b + 1e-12 for a, b in zip(values, values[1:]))
    # The square root schedule is concave: it lies above the straight line between the same end points.
    assert all(competence(t, total, c0, "sqrt") >= competence(t, total, c0, "linear") - 1e-12 for t in range(total))


def test_competence_formula():
    assert competence(25, 100, 0.2, "linear") == pytest.approx(0.2 + 0.8 * 0.25)
    assert competence(25, 100, 0.2, "sqrt") == pytest.approx(math.sqrt(0.04 + 0.96 * 0.25))
    for bad in (dict(step=-1), dict(total=0), dict(c0=0.0), dict(c0=1.5), dict(kind="cubic")):
        with pytest.raises(ValueError):
            competence(**{**dict(step=1, total=10, c0=0.1, kind="sqrt"), **bad})


def test_length_curriculum_starts_short_and_ends_uniform():
    lengths = [1 + (7 * i) % 20 for i in range(200)]  # every length 1..20, ten times each
    curriculum = LengthCurriculum(lengths, batch_size=10, total=50, c0=0.1, seed=0)
    first = curriculum(0)
    assert len(set(first)) == 10 and max(lengths[i] for i in first) <= 2  # the 20 shortest: lengths 1 and 2
    assert curriculum.pool_size(0) == 20 and curriculum.pool_size(50) == curriculum.pool_size(999) == 200
    assert curriculum(7) == curriculum(7)  # a function of the step: resumes exactly
    late = [lengths[i] for step in range(50, 90) for i in curriculum(step)]
    assert max(late) == 20 and abs(sum(late) / len(late) - 10.5) < 1.0  # uniform over the data again
    uniform = LengthCurriculum(lengths, batch_size=10, total=50, c0=1.0)
    assert all(uniform.pool_size(t) == 200 for t in (0, 10, 100))
    mean_first_steps = sum(lengths[i] for t in range(10) for i in curriculum(t)) / 100
    assert mean_first_steps < sum(lengths[i] for t in range(10) for i in uniform(t)) / 100


def test_length_curriculum_pool_holds_a_batch_and_checks_input():
    curriculum = LengthCurriculum([3, 1, 2, 5, 4], batch_size=4, total=10, c0=0.01)
    assert curriculum.pool_size(0) == 4 and sorted(curriculum(0)) == [0, 1, 2, 4]
    with pytest.raises(ValueError, match="batch_size"):
        LengthCurriculum([1, 2], batch_size=3, total=10)
    with pytest.raises(ValueError):
        LengthCurriculum([1, 2], batch_size=1, total=0)
    with pytest.raises(TypeError):
        LengthCurriculum(5, batch_size=1, total=3)
