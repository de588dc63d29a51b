"""Input checks shared by the package: clear errors that name the argument and the expected shape."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class DtypeError(TypeError, ValueError):
    """A tensor has the wrong dtype.

    It derives from both :class:`TypeError` (the Python convention for a wrong type) and :class:`ValueError` (what
    the course's docs promise for any bad argument), so either ``except`` clause catches it.
    """


def check_tensor(name: str, x: object, *, ndim: int | None = None, min_ndim: int | None = None,
                 shape_hint: str = "") -> torch.Tensor:
    """Check that ``x`` is a tensor with ``ndim`` dimensions (or at least ``min_ndim``) and return it."""
    hint = f" {shape_hint}" if shape_hint else ""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor{hint}, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions{hint}, got shape {tuple(x.shape)}")
    if min_ndim is not None and x.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimensions{hint}, got shape {tuple(x.shape)}")
    return x


def check_floating(name: str, x: torch.Tensor, like: torch.Tensor | None = None, like_name: str = "") -> None:
    """Check that ``x`` has a floating dtype, equal to ``like``'s when given."""
    if not x.is_floating_point():
        raise DtypeError(f"{name} must have a floating dtype, got {x.dtype}")
    if like is not None and x.dtype != like.dtype:
        raise DtypeError(f"{name} must have the same dtype as {like_name} ({like.dtype}), got {x.dtype}")


def check_same(name: str, got: Sequence[int], expected: Sequence[int], what: str) -> None:
    """Check that a part of a shape equals what another argument fixes."""
    if tuple(got) != tuple(expected):
        raise ValueError(f"{name}: {what} must be {tuple(expected)}, got {tuple(got)}")


def check_broadcastable_to(name: str, mask: torch.Tensor, target: Sequence[int], target_hint: str) -> None:
    """Check that ``mask`` broadcasts to ``target`` without changing ``target`` (no silent expansion of the scores)."""
    target = tuple(target)
    ok = mask.dim() <= len(target) and all(
        m == 1 or m == t for m, t in zip(reversed(mask.shape), reversed(target))
    )
    if not ok:
        raise ValueError(
            f"{name} of shape {tuple(mask.shape)} does not broadcast to the scores' shape {target} {target_hint}"
        )


def check_int(name: str, value: object, minimum: int = 1) -> int:
    """Check that ``value`` is an int (not a bool) of at least ``minimum`` and return it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_positive_int(name: str, value: object) -> int:
    """Check that ``value`` is a positive int (not a bool) and return it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_probability(name: str, value: object) -> None:
    """Check that ``value`` is a number (not a bool) in ``[0, 1]``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
