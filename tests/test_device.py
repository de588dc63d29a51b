"""tfcourse.device: device choice, seeding and the TFCOURSE_SCALE knob."""

import random

import numpy as np
import pytest
import torch

from tfcourse.device import autocast, bf16_supported, by_scale, device, scale, seed_everything


def test_device_is_a_usable_torch_device():
    d = device()
    assert isinstance(d, torch.device)
    assert torch.ones(2, device=d).sum().item() == 2.0


def test_device_can_be_forced(monkeypatch):
    monkeypatch.setenv("TFCOURSE_DEVICE", "cpu")
    assert device() == torch.device("cpu")


def test_seed_everything_repeats_every_generator():
    def draw():
        return random.random(), np.random.rand(), torch.rand(3)

    seed_everything(123)
    first = draw()
    seed_everything(123)
    second = draw()
    assert first[0] == second[0] and first[1] == second[1] and torch.equal(first[2], second[2])
    g = seed_everything(5)
    assert torch.equal(torch.rand(2, generator=g), torch.rand(2, generator=torch.Generator().manual_seed(5)))


@pytest.mark.parametrize("bad", [-1, 1.5, "3", True])
def test_seed_everything_rejects_bad_seeds(bad):
    with pytest.raises(ValueError, match="seed"):
        seed_everything(bad)


def test_scale_knob(monkeypatch):
    monkeypatch.delenv("TFCOURSE_SCALE", raising=False)
    assert scale() == "small" and by_scale(1, 2) == 1
    monkeypatch.setenv("TFCOURSE_SCALE", "FULL")
    assert scale() == "full" and by_scale(1, 2) == 2
    monkeypatch.setenv("TFCOURSE_SCALE", "huge")
    with pytest.raises(ValueError, match="TFCOURSE_SCALE"):
        scale()


def test_autocast_changes_nothing_where_bf16_does_not_pay():
    assert not bf16_supported("cpu")
    x, w = torch.randn(4, 8), torch.randn(8, 3)
    with autocast("cpu"):
        y = x @ w
    assert y.dtype == torch.float32 and torch.equal(y, x @ w)


def test_autocast_can_be_forced_on_and_then_computes_in_bf16():
    x, w = torch.randn(4, 8), torch.randn(8, 3)
    with autocast("cpu", enabled=True):
        y = x @ w
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), x @ w, atol=0.1, rtol=0.02)   # bf16 keeps about 3 significant digits
    with autocast("cpu", enabled=False):
        assert (x @ w).dtype == torch.float32


@pytest.mark.parametrize("bad", [dict(where=3), dict(where="cpu", enabled="yes")])
def test_autocast_rejects_bad_arguments(bad):
    with pytest.raises(TypeError):
        autocast(**bad)
