"""Input checks shared by the modules of :mod:`tfcourse.efficient` (queries, keys and values of attention)."""

from __future__ import annotations

import torch

from .._checks import check_floating, check_same, check_tensor


def check_qkv(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, same_length: bool = False) -> None:
    """Check ``query (..., Tq, dk)``, ``key (..., Tk, dk)``, ``value (..., Tk, dv)``: tensors of one floating dtype,
    equal leading dimensions (nothing is broadcast), equal feature sizes of queries and keys, and as many values as
    keys; with ``same_length`` also ``Tq == Tk`` (self-attention).

    Raises:
        TypeError: if an argument is not a tensor.
        ValueError: (including :class:`~tfcourse._checks.DtypeError`) on any mismatch, naming the argument.
    """
    check_tensor("query", query, min_ndim=2, shape_hint="(..., Tq, dk)")
    check_tensor("key", key, min_ndim=2, shape_hint="(..., Tk, dk)")
    check_tensor("value", value, min_ndim=2, shape_hint="(..., Tk, dv)")
    check_floating("query", query)
    check_floating("key", key, like=query, like_name="query")
    check_floating("value", value, like=query, like_name="query")
    for name, x in (("key", key), ("value", value)):
        if x.dim() != query.dim():
            raise ValueError(f"{name} must have as many dimensions as query ({query.dim()}), got {tuple(x.shape)}")
        check_same(name, x.shape[:-2], query.shape[:-2], "the batch/head dimensions (equal to query's)")
    if key.shape[-1] != query.shape[-1]:
        raise ValueError(f"key: the feature size dk must equal query's ({query.shape[-1]}), got {key.shape[-1]}")
    if value.shape[-2] != key.shape[-2]:
        raise ValueError(f"value: the length Tk must equal key's ({key.shape[-2]}), got {value.shape[-2]}")
    if same_length and key.shape[-2] != query.shape[-2]:
        raise ValueError(f"key: self-attention needs Tk equal to query's Tq={query.shape[-2]}, got {key.shape[-2]}")


def check_positive_int(name: str, value: object, minimum: int = 1) -> int:
    """Check that ``value`` is an int (not a bool) of at least ``minimum`` and return it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_generator(generator: object) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
