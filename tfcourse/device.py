"""Device, seeding and the size knob shared by every chapter.

* :func:`device` picks the best available accelerator (CUDA, then Apple's MPS, then the CPU); every model and layer
  of the package runs on it unchanged (``model.to(device())``, inputs created on the same device).
* :func:`autocast` is bfloat16 mixed precision where it pays (a CUDA GPU that computes in bf16), and changes nothing
  elsewhere; :func:`bf16_supported` says which.
* :func:`seed_everything` seeds Python, NumPy and PyTorch so that a notebook's printed results repeat.
* :func:`scale` reads the environment variable ``TFCOURSE_SCALE``: ``small`` (the default, every notebook runs in
  about a minute on a laptop CPU) or ``full`` (the real-size runs, meant for a GPU). :func:`by_scale` picks a
  setting from it.
"""

from __future__ import annotations

import contextlib
import os
import random
from typing import TypeVar

import numpy as np
import torch

__all__ = ["device", "autocast", "bf16_supported", "seed_everything", "scale", "by_scale", "SCALES"]

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


def _as_device(where: torch.device | str | None) -> torch.device:
    if where is None:
        return device()
    if not isinstance(where, (torch.device, str)):
        raise TypeError(f"device must be a torch.device, a string such as 'cuda' or None, got {type(where).__name__}")
    return torch.device(where)


def bf16_supported(where: torch.device | str | None = None) -> bool:
    """Whether bfloat16 autocast pays on ``where`` (default :func:`device`): a CUDA GPU with bf16 tensor cores
    (compute capability 8.0 or more: A100, H100, RTX 30xx and later). On a CPU bf16 matrix products are emulated or
    slower than float32 on most machines, so the answer there is ``False``.

    Raises:
        TypeError: if ``where`` is not a device, a string or ``None``.
    """
    where = _as_device(where)
    if where.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(where)[0] >= 8 and torch.cuda.is_bf16_supported()


def autocast(where: torch.device | str | None = None, enabled: bool | None = None) -> contextlib.AbstractContextManager:
    """Mixed precision for a forward pass (and the loss), where it pays.

    ``with autocast(): loss = model(x, y)[1]`` then ``loss.backward()`` outside the block: on a GPU for which
    :func:`bf16_supported` holds, matrix products and attention run in bfloat16 (:func:`torch.autocast`), while
    the weights, their gradients and the optimiser state stay float32, and precision-sensitive operations (softmax,
    layer norm, the loss) are kept in float32 by autocast's own lists. bfloat16 has float32's exponent range, so no
    loss scaling is needed (unlike float16). Elsewhere the context does nothing and results are float32.

    Args:
        where: the device the model runs on (default :func:`device`).
        enabled: force autocast on (``True``, bf16 on that device type even where it does not pay, for example a
            CPU) or off (``False``); ``None`` (default) decides by :func:`bf16_supported`.

    Returns:
        A context manager.

    Raises:
        TypeError: if ``where`` is not a device, a string or ``None``, or ``enabled`` is not a bool or ``None``.

    Source: Micikevicius et al. (2018), "Mixed precision training"; Kalamkar et al. (2019), "A study of BFLOAT16
    for deep learning training".
    """
    where = _as_device(where)
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool or None, got {type(enabled).__name__}")
    on = bf16_supported(where) if enabled is None else enabled
    if not on:
        return contextlib.nullcontext()
    return torch.autocast(device_type=where.type, dtype=torch.bfloat16)


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
