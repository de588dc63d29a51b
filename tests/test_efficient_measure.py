"""tfcourse.efficient.measure: the peak-memory measurement, and the memory claim of chapter 12 at a small size."""

from __future__ import annotations

import pytest
import torch

from tfcourse.efficient.flash import flash_attention
from tfcourse.efficient.measure import peak_memory_bytes, time_call


def test_peak_counts_what_is_held_at_once_not_what_is_allocated_in_total():
    def two_at_once():
        a = torch.empty(1_000_000, dtype=torch.uint8)
        b = torch.empty(3_000_000, dtype=torch.uint8)
        return a, b

    def one_after_another():
        for _ in range(4):
            torch.empty(1_000_000, dtype=torch.uint8)

    assert 4_000_000 <= peak_memory_bytes(two_at_once) < 4_100_000
    assert 1_000_000 <= peak_memory_bytes(one_after_another) < 1_100_000
    x = torch.empty(2_000_000, dtype=torch.uint8)  # allocated before: not counted
    assert peak_memory_bytes(lambda: x + 1) < 2_100_000


def test_flash_memory_is_linear_and_a_small_share_of_naive_attention():
    def naive(q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) / 4.0, dim=-1) @ v

    peaks = {}
    for T in (512, 2048):
        q = torch.randn(1, 2, T, 16)
        peaks["naive", T] = peak_memory_bytes(lambda: naive(q, q, q))
        peaks["flash", T] = peak_memory_bytes(lambda: flash_attention(q, q, q, block_size=128))
    assert peaks["naive", 2048] >= 2 * 2 * 2048 * 2048 * 4  # scores and weights, (1, 2, T, T) float32 each
    assert peaks["naive", 2048] / peaks["naive", 512] > 12  # quadratic: x16
    assert peaks["flash", 2048] / peaks["flash", 512] < 4.5  # linear: x4
    assert peaks["flash", 2048] < peaks["naive", 2048] / 10


def test_time_call_is_positive_and_checks_the_device():
    assert time_call(lambda: torch.ones(10).sum(), repeats=3) > 0
    with pytest.raises(ValueError, match="device"):
        peak_memory_bytes(lambda: None, device="meta")
