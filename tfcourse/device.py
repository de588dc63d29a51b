"""Device, seeding and the size knob shared by every chapter.

* :func:`device` picks the best available accelerator (CUDA, then Apple's MPS, then the CPU).
* :func:`seed_everything` seeds Python, NumPy and PyTorch so that a notebook's printed results repeat.
* :func:`scale` reads the environment variable ``TFCOURSE_SCALE``: ``small`` (the default, every notebook runs in
  about a minute on a laptop CPU) or ``full`` (the real-size runs, meant for a GPU). :func:`by_scale` picks a
  setting from it.
"""

from __future__ import annotations

import os
import random
from typing import TypeVar

import numpy as np
import torch

__all__ = ["device", "seed_everything", "scale", "by_scale", "SCALES"]

SCALES = ("small", "full")
T = TypeVar("T")


def device() -> torch.device:
    """The best available device: ``cuda`` if a CUDA GPU is visible, else ``mps`` (Apple silicon), else ``cpu``.

    Set ``TFCOURSE_DEVICE`` (for example ``cpu``) to override the choice.
    """
    forced = os.environ.get("TFCOURSE_DEVICE")
    if forced:
        return torch.device(forced)
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int = 0) -> torch.Generator:
    """Seed Python's ``random``, NumPy's global generator and PyTorch (CPU and every CUDA device).

    Args:
        seed: a non-negative int.

    Returns:
        A fresh CPU :class:`torch.Generator` seeded with ``seed``, for code that prefers an explicit generator.

    Raises:
        ValueError: if ``seed`` is not a non-negative int.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds CUDA too
    return torch.Generator().manual_seed(seed)


def scale() -> str:
    """The run size from the environment variable ``TFCOURSE_SCALE``: ``"small"`` (default) or ``"full"``.

    Raises:
        ValueError: if ``TFCOURSE_SCALE`` holds any other value.
    """
    value = os.environ.get("TFCOURSE_SCALE", "small").strip().lower() or "small"
    if value not in SCALES:
        raise ValueError(f"TFCOURSE_SCALE must be one of {SCALES}, got {value!r}")
    return value


def by_scale(small: T, full: T) -> T:
    """Return ``small`` or ``full`` according to :func:`scale`, e.g. ``n_steps = by_scale(300, 5000)``."""
    return full if scale() == "full" else small
