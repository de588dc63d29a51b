"""Input checks shared by the modules of :mod:`tfcourse.efficient`: the query/key/value check of
:func:`tfcourse.attention.scaled_dot_product_attention` (:func:`~tfcourse.attention.check_qkv`) and the package's int
check, re-exported, and a generator check."""

from __future__ import annotations

import torch

from .._checks import check_int as check_positive_int
from ..attention import check_qkv


def check_generator(generator: object) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
