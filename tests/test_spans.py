"""tfcourse.data.spans: T5 span corruption and BART text infilling."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tfcourse.data.spans import random_spans_noise_mask, span_corrupt, text_infill

SENTINELS = list(range(1000, 1100))  # ids no test sequence uses


def runs(mask: torch.Tensor) -> list[tuple[bool, int]]:
    out = []
    for value in mask.tolist():
        if out and out[-1][0] == value:
            out[-1] = (value, out[-1][1] + 1)
        else:
            out.append((value, 1))
    return out


@settings(max_examples=60, deadline=None)
@given(length=st.integers(2, 300), density=st.floats(0.05, 0.5), mean_span=st.floats(1.0, 6.0),
       seed=st.integers(0, 10_000))
def test_noise_mask_has_exact_counts(length, density, mean_span, seed):
    mask = random_spans_noise_mask(length, density, mean_span, torch.Generator().manual_seed(seed))
    assert mask.shape == (length,) and mask.dtype == torch.bool
    num_noise = min(max(round(length * density), 1), length - 1)
    num_spans = min(max(round(num_noise / mean_span), 1), num_noise, length - num_noise)
    assert int(mask.sum()) == num_noise
    noise_runs = [n for value, n in runs(mask) if value]
    assert len(noise_runs) == num_spans
    assert not mask[0]  # T5: a kept span first


def test_t5_defaults_on_512_tokens():
    mask = random_spans_noise_mask(512, generator=torch.Generator().manual_seed(0))
    assert int(mask.sum()) == 77 and len([1 for v, _ in runs(mask) if v]) == 26  # 15%, 77 / 3 = 25.7 -> 26 spans


def test_span_lengths_are_a_uniform_composition():
    """Every noise span has the same expected length num_noise / num_spans: check the first and the last."""
    first, last = [], []
    for seed in range(2000):
        noise_runs = [n for v, n in runs(random_spans_noise_mask(100, 0.15, 3.0, torch.Generator().manual_seed(seed)))
                      if v]
        first.append(noise_runs[0])
        last.append(noise_runs[-1])
    expected = 15 / 5
    for sample in (torch.tensor(first, dtype=torch.float64), torch.tensor(last, dtype=torch.float64)):
        se = sample.std() / len(sample) ** 0.5
        assert abs(sample.mean() - expected) < 4 * se


def test_mask_is_reproducible_and_random():
    a = random_spans_noise_mask(200, generator=torch.Generator().manual_seed(1))
    b = random_spans_noise_mask(200, generator=torch.Generator().manual_seed(1))
    c = random_spans_noise_mask(200, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_the_paper_example():
    words = "Thank you for inviting me to your party last week .".split()
    tokens = torch.arange(len(words))
    mask = torch.tensor([w in ("for", "inviting", "last") for w in words])
    inputs, targets = span_corrupt(tokens, mask, [100, 101, 102])
    name = dict(enumerate(words)) | {100: "<X>", 101: "<Y>", 102: "<Z>"}
    assert " ".join(name[i] for i in inputs.tolist()) == "Thank you <X> me to your party <Y> week ."
    assert " ".join(name[i] for i in targets.tolist()) == "<X> for inviting <Y> last <Z>"


def reconstruct(inputs: torch.Tensor, targets: torch.Tensor) -> list[int]:
    """Put each span of the targets back in place of its sentinel in the inputs."""
    spans, current = {}, None
    for t in targets.tolist():
        if t in SENTINELS:
            current = t
            spans[current] = []
        else:
            spans[current].append(t)
    out = []
    for t in inputs.tolist():
        out += spans[t] if t in SENTINELS else [t]
    return out


@settings(max_examples=60, deadline=None)
@given(length=st.integers(2, 120), seed=st.integers(0, 10_000))
def test_inputs_and_targets_reconstruct_the_original(length, seed):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 50, (length,), generator=generator)
    mask = random_spans_noise_mask(length, generator=generator)
    inputs, targets = span_corrupt(tokens, mask, SENTINELS)
    assert reconstruct(inputs, targets) == tokens.tolist()
    used = [t for t in inputs.tolist() if t in SENTINELS]
    n_spans = len(used)
    assert used == SENTINELS[:n_spans]                                     # in order, one per span
    assert [t for t in targets.tolist() if t in SENTINELS] == SENTINELS[:n_spans + 1]
    assert len(inputs) + len(targets) == length + 2 * n_spans + 1


def test_span_corrupt_bad_input():
    tokens = torch.arange(6)
    with pytest.raises(TypeError, match="bool"):
        span_corrupt(tokens, torch.zeros(6, dtype=torch.long), SENTINELS)
    with pytest.raises(ValueError, match="shape of tokens"):
        span_corrupt(tokens, torch.zeros(5, dtype=torch.bool), SENTINELS)
    with pytest.raises(ValueError, match="sentinels"):
        span_corrupt(tokens, torch.tensor([0, 1, 0, 1, 0, 0]).bool(), [100, 101])
    with pytest.raises(ValueError, match="noise_density"):
        random_spans_noise_mask(10, noise_density=1.0)
    with pytest.raises(ValueError, match="length"):
        random_spans_noise_mask(1)


@settings(max_examples=60, deadline=None)
@given(length=st.integers(1, 200), seed=st.integers(0, 10_000))
def test_text_infill_removes_the_spans_and_marks_each_with_one_mask(length, seed):
    MASK = 999
    tokens = torch.randint(0, 50, (length,), generator=torch.Generator().manual_seed(seed))
    inputs, targets = text_infill(tokens, MASK, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(targets, tokens)
    kept = [t for t in inputs.tolist() if t != MASK]
    it = iter(tokens.tolist())
    assert all(any(t == u for u in it) for t in kept)                     # a subsequence of the original
    budget = round(0.3 * length)
    assert length - len(kept) <= budget
    n_masks = inputs.tolist().count(MASK)
    assert (n_masks > 0) == (budget > 0)
    assert all(not (a == b == MASK) for a, b in zip(inputs.tolist(), inputs.tolist()[1:]))  # spans do not touch


def test_text_infill_covers_the_ratio_with_poisson_spans():
    removed, masks = 0, 0
    for seed in range(200):
        tokens = torch.arange(100)
        inputs, _ = text_infill(tokens, -1, generator=torch.Generator().manual_seed(seed))
        removed += 100 - int((inputs != -1).sum())
        masks += int((inputs == -1).sum())
    assert 0.27 <= removed / (200 * 100) <= 0.30   # the budget is 30%, short of it only when no span fits
    assert 2.0 < removed / masks < 3.5            # Poisson(3) spans, the last one cut to the budget


def test_text_infill_bad_input():
    with pytest.raises(ValueError, match="mask_ratio"):
        text_infill(torch.arange(5), 9, mask_ratio=1.0)
    with pytest.raises(ValueError, match="tokens"):
        text_infill(torch.arange(6).view(2, 3), 9)
