"""Training: the label-smoothed loss, learning-rate schedules, AdamW parameter groups and a training loop.

Chapter 6 of the book ("The encoder-decoder Transformer") builds the loss and the Noam schedule from scratch and
trains a Transformer with :func:`train`; chapter 7 (training in practice) reuses the loop for its experiments.

* :class:`LabelSmoothingLoss` / :func:`label_smoothed_cross_entropy`: cross-entropy against a smoothed target
  distribution (Szegedy et al., 2016, Sec. 7), equal to ``F.cross_entropy(..., label_smoothing=...)``.
* :func:`noam_schedule` / :func:`noam_lambda`: the warm-up then inverse-square-root schedule of Vaswani et al.
  (2017), Eq. 3; :func:`warmup_cosine_schedule` / :func:`warmup_cosine_lambda`: linear warm-up then cosine decay
  (Loshchilov and Hutter, 2017, without restarts). The ``*_lambda`` functions return multipliers for
  :class:`torch.optim.lr_scheduler.LambdaLR`.
* :func:`param_groups`: the decay / no-decay parameter groups of AdamW (Loshchilov and Hutter, 2019).
* :func:`shuffled_batches`: the indices of batch ``i`` of reshuffled epochs, a pure function of ``i``.
* :func:`train`: a loop with gradient accumulation, clipping, optional autocast, checkpoints that resume exactly
  (:func:`save_checkpoint`, :func:`load_checkpoint`) and a tqdm bar. :func:`accumulate_gradients` is its
  backward pass over the micro-batches of one optimizer step.

The loop's interface is two functions: ``batches``, which gives the data of micro-batch ``i``, and
``loss_fn(model, batch) -> loss``, which turns one batch into a scalar loss. The loop knows nothing else of the
model or the data, so the same loop trains a translation model, a language model or a classifier.
"""

from __future__ import annotations

import math
import os
import random
import tempfile
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._checks import DtypeError, check_floating, check_int as _check_int, check_tensor

__all__ = [
    "label_smoothed_cross_entropy",
    "LabelSmoothingLoss",
    "noam_schedule",
    "noam_lambda",
    "warmup_cosine_schedule",
    "warmup_cosine_lambda",
    "NO_DECAY_MODULES",
    "param_groups",
    "TrainHistory",
    "shuffled_batches",
    "accumulate_gradients",
    "save_checkpoint",
    "load_checkpoint",
    "train",
]

REDUCTIONS = ("mean", "sum", "none")


def _check_number(name: str, value: object, low: float, high: float, *, high_open: bool = False) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and low <= value and (value < high if high_open else value <= high)
    if not ok:
        bracket = ")" if high_open else "]"
        raise ValueError(f"{name} must be a number in [{low}, {high}{bracket}, got {value!r}")


# --------------------------------------------------------------------------------------------------------------
# Label smoothing
# --------------------------------------------------------------------------------------------------------------

def label_smoothed_cross_entropy(logits: torch.Tensor, target: torch.Tensor, smoothing: float = 0.1,
                                 ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    r"""Cross-entropy against the smoothed target distribution :math:`q' = (1 - \varepsilon)\,\delta_y +
    \varepsilon / V`.

    .. math:: \ell = -\sum_{k=1}^{V} q'_k \log p_k
                   = (1 - \varepsilon)\,(-\log p_y) + \varepsilon \cdot \frac{1}{V}\sum_{k=1}^{V} (-\log p_k),
              \qquad p = \mathrm{softmax}(z)

    The uniform part is spread over **all** ``V`` classes, the correct one included, as in
    :func:`torch.nn.functional.cross_entropy` with ``label_smoothing`` (and in Szegedy et al.); some code spreads
    it over the ``V - 1`` wrong classes instead, or also leaves out the padding class: those give other numbers.

    Args:
        logits: ``(..., V)`` floating tensor of unnormalised scores :math:`z` (classes in the **last**
            dimension; :func:`torch.nn.functional.cross_entropy` wants them in dimension 1 instead, and
            ``(N, V)`` is the same for both).
        target: ``(...)`` int64 class ids in ``[0, V)``, or ``ignore_index`` (for example padding) where a
            position does not count.
        smoothing: :math:`\varepsilon` in ``[0, 1]``; ``0`` is the plain cross-entropy.
        ignore_index: the target id that marks positions to ignore (``-100`` as in PyTorch; pass the padding id).
        reduction: ``"mean"`` (over the positions that are not ignored), ``"sum"`` or ``"none"`` (a loss of shape
            ``(...)``, zero at ignored positions).

    Returns:
        A scalar, or ``(...)`` with ``reduction="none"``, in the dtype of ``logits``. When **every** position is
        ignored, ``"mean"`` gives ``0`` (PyTorch gives NaN: there is nothing to average, and the loop should not
        stop on it).

    Raises:
        TypeError: if an argument is not a tensor.
        ValueError: (including :class:`~tfcourse._checks.DtypeError`) for mismatched shapes, a non-floating
            ``logits``, a non-integer ``target``, ids outside ``[0, V)`` other than ``ignore_index``, a
            ``smoothing`` outside ``[0, 1]`` or an unknown ``reduction``.

    Sources: Szegedy et al. (2016), Sec. 7 ("label-smoothing regularization"); Vaswani et al. (2017), Sec. 5.4
    (:math:`\varepsilon_{ls} = 0.1`); Müller et al. (2019) on what it does to the learned representations.
    """
    check_tensor("logits", logits, min_ndim=1, shape_hint="(..., V)")
    check_tensor("target", target, shape_hint="(...)")
    check_floating("logits", logits)
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise DtypeError(f"target must hold integer class ids (...), got {target.dtype} (soft targets are not "
                         f"supported: the smoothing builds the soft distribution)")
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"target must have the shape of logits without the class dimension, "
                         f"{tuple(logits.shape[:-1])}, got {tuple(target.shape)}")
    _check_number("smoothing", smoothing, 0.0, 1.0)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    V = logits.shape[-1]
    keep = target != ignore_index  # (...)
    if target[keep].numel() and (target[keep].min() < 0 or target[keep].max() >= V):
        raise ValueError(f"target ids must lie in [0, {V}) or equal ignore_index={ignore_index}, got values in "
                         f"[{int(target[keep].min())}, {int(target[keep].max())}]")
    log_p = torch.log_softmax(logits, dim=-1)  # (..., V)
    safe_target = torch.where(keep, target, torch.zeros_like(target))  # any valid id; zeroed below
    nll = -log_p.gather(-1, safe_target.long()[..., None])[..., 0]  # (...): -log p_y
    uniform = -log_p.mean(dim=-1)  # (...): (1/V) sum_k -log p_k
    loss = ((1.0 - smoothing) * nll + smoothing * uniform).masked_fill(~keep, 0.0)  # (...)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / keep.sum().clamp_min(1)


class LabelSmoothingLoss(nn.Module):
    r"""The label-smoothed cross-entropy of :func:`label_smoothed_cross_entropy` as a module.

    Args:
        smoothing: :math:`\varepsilon` in ``[0, 1]`` (0.1 in Vaswani et al. 2017).
        ignore_index: the target id not to count (``-100`` as in PyTorch; pass the padding id).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    ``forward(logits (..., V), target (...)) -> loss``; equal to
    ``F.cross_entropy(logits.reshape(-1, V), target.reshape(-1), label_smoothing=smoothing,
    ignore_index=ignore_index, reduction=reduction)`` (reshaped back for ``"none"``), except that a batch in which
    every target is ignored gives ``0`` rather than NaN with ``"mean"``.

    Raises:
        ValueError: at construction for a ``smoothing`` outside ``[0, 1]`` or an unknown ``reduction``; in
            ``forward`` as :func:`label_smoothed_cross_entropy`.

    Source: Szegedy et al. (2016), Sec. 7.
    """

    def __init__(self, smoothing: float = 0.1, ignore_index: int = -100, reduction: str = "mean"):
        super().__init__()
        _check_number("smoothing", smoothing, 0.0, 1.0)
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
        self.smoothing, self.ignore_index, self.reduction = float(smoothing), ignore_index, reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return label_smoothed_cross_entropy(logits, target, self.smoothing, self.ignore_index, self.reduction)

    def extra_repr(self) -> str:
        return f"smoothing={self.smoothing}, ignore_index={self.ignore_index}, reduction={self.reduction!r}"


# --------------------------------------------------------------------------------------------------------------
# Learning-rate schedules
# --------------------------------------------------------------------------------------------------------------

def noam_schedule(step: int, d_model: int, warmup: int = 4000) -> float:
    r"""The learning rate of the Transformer paper at optimizer step ``step`` (counted from 1).

    .. math:: \mathit{lrate} = d_\text{model}^{-0.5} \cdot
              \min\big(\mathit{step}^{-0.5},\ \mathit{step} \cdot \mathit{warmup}^{-1.5}\big)

    It grows linearly for ``warmup`` steps, peaks at :math:`(d_\text{model} \cdot \mathit{warmup})^{-0.5}` at
    ``step = warmup`` and then decays as :math:`1/\sqrt{\mathit{step}}`. ``step = 0`` gives ``0``.

    Args:
        step: a non-negative int (the paper counts from 1).
        d_model: the model width (512 in the paper's base model).
        warmup: the warm-up steps (4000 in the paper).

    Raises:
        ValueError: for a negative ``step`` or non-positive ``d_model``, ``warmup``.

    Source: Vaswani et al. (2017), Sec. 5.3, Eq. 3.
    """
    _check_int("step", step, minimum=0)
    _check_int("d_model", d_model)
    _check_int("warmup", warmup)
    if step == 0:
        return 0.0
    return d_model ** -0.5 * min(step ** -0.5, step * warmup ** -1.5)


class _NoamMultiplier:
    """The Noam multiplier for LambdaLR: a small class rather than a closure, so that it pickles and its settings
    (plain numbers only) are saved in the scheduler's ``state_dict`` and load with ``weights_only=True``."""

    def __init__(self, d_model: int, warmup: int, factor: float):
        self.d_model, self.warmup, self.factor = d_model, warmup, factor

    def __call__(self, step: int) -> float:
        return self.factor * noam_schedule(step + 1, self.d_model, self.warmup)  # LambdaLR counts from 0, Eq. 3 from 1

    def __repr__(self) -> str:
        return f"noam_lambda(d_model={self.d_model}, warmup={self.warmup}, factor={self.factor})"


class _WarmupCosineMultiplier:
    """The warm-up + cosine multiplier for LambdaLR (see :class:`_NoamMultiplier` for why a class)."""

    def __init__(self, warmup: int, total: int, min_ratio: float):
        self.warmup, self.total, self.min_ratio = warmup, total, min_ratio

    def __call__(self, step: int) -> float:
        return warmup_cosine_schedule(step, self.warmup, self.total, self.min_ratio)

    def __repr__(self) -> str:
        return f"warmup_cosine_lambda(warmup={self.warmup}, total={self.total}, min_ratio={self.min_ratio})"


def noam_lambda(d_model: int, warmup: int = 4000, factor: float = 1.0) -> Callable[[int], float]:
    """The Noam schedule as a multiplier for :class:`torch.optim.lr_scheduler.LambdaLR`.

    ``LambdaLR`` multiplies the optimizer's base learning rate by ``f(i)``, where ``i`` counts the scheduler's
    ``step()`` calls from 0, so the ``i``-th optimizer step (from 0) gets ``factor * noam_schedule(i + 1, d_model,
    warmup)``. Give the optimizer ``lr=1.0`` to get the paper's rates (``factor`` scales them, as in the Annotated
    Transformer)::

        optimizer = torch.optim.Adam(model.parameters(), lr=1.0, betas=(0.9, 0.98), eps=1e-9)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, noam_lambda(512, 4000))

    Raises:
        ValueError: for non-positive ``d_model``, ``warmup`` or ``factor``.

    Source: Vaswani et al. (2017), Eq. 3.
    """
    _check_int("d_model", d_model)
    _check_int("warmup", warmup)
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0 or not math.isfinite(factor):
        raise ValueError(f"factor must be a positive number, got {factor!r}")
    return _NoamMultiplier(d_model, warmup, float(factor))


def warmup_cosine_schedule(step: int, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    r"""Linear warm-up, then a half cosine from 1 down to ``min_ratio``: a multiplier in ``[0, 1]``.

    .. math:: m(s) = \begin{cases} s / \mathit{warmup} & s < \mathit{warmup} \\
              r + (1 - r)\,\tfrac12\big(1 + \cos(\pi\, \min(1, \tfrac{s - \mathit{warmup}}
              {\mathit{total} - \mathit{warmup}}))\big) & s \ge \mathit{warmup} \end{cases}

    with :math:`r` = ``min_ratio``. Steps ``s`` count from 0, as :class:`~torch.optim.lr_scheduler.LambdaLR`
    counts them; ``m(warmup) = 1`` and ``m(s) = r`` from ``s = total`` on (Hugging Face's
    ``get_cosine_with_min_lr_schedule_with_warmup`` gives the same numbers up to ``total``, then rises again).

    Args:
        step: a non-negative int.
        warmup: the warm-up steps (``0``: none).
        total: the step at which the decay ends, ``> warmup``.
        min_ratio: the final multiplier :math:`r` in ``[0, 1]``.

    Raises:
        ValueError: for a negative ``step`` or ``warmup``, ``total <= warmup`` or ``min_ratio`` outside ``[0, 1]``.

    Source: Loshchilov and Hutter (2017) (SGDR; one cycle, no restarts), with the linear warm-up of Goyal et al.
    (2017).
    """
    _check_int("step", step, minimum=0)
    _check_int("warmup", warmup, minimum=0)
    _check_int("total", total, minimum=1)
    if total <= warmup:
        raise ValueError(f"total must exceed warmup, got total={total}, warmup={warmup}")
    _check_number("min_ratio", min_ratio, 0.0, 1.0)
    if step < warmup:
        return step / warmup
    progress = min(1.0, (step - warmup) / (total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_lambda(warmup: int, total: int, min_ratio: float = 0.0) -> Callable[[int], float]:
    """:func:`warmup_cosine_schedule` as a multiplier for :class:`torch.optim.lr_scheduler.LambdaLR` (the
    optimizer's ``lr`` is then the peak rate).

    Raises:
        ValueError: as :func:`warmup_cosine_schedule`.
    """
    warmup_cosine_schedule(0, warmup, total, min_ratio)  # checks the arguments now rather than at the first step
    return _WarmupCosineMultiplier(warmup, total, float(min_ratio))


# --------------------------------------------------------------------------------------------------------------
# AdamW parameter groups
# --------------------------------------------------------------------------------------------------------------

def _no_decay_modules() -> tuple[type[nn.Module], ...]:
    from .positional import LearnedPositionalEmbedding

    norms = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d,
             nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LocalResponseNorm)
    extra = (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
    return (nn.Embedding, nn.EmbeddingBag, LearnedPositionalEmbedding, *norms, *extra)


NO_DECAY_MODULES = _no_decay_modules()
"""Module types whose parameters :func:`param_groups` never decays: embeddings (``nn.Embedding``,
``nn.EmbeddingBag``, :class:`tfcourse.positional.LearnedPositionalEmbedding`) and normalisation layers."""


def param_groups(model: nn.Module, weight_decay: float = 0.01,
                 no_decay_modules: Iterable[type[nn.Module]] = ()) -> list[dict[str, Any]]:
    """Split a model's trainable parameters into a decayed and a non-decayed group for AdamW.

    **The rule**: a parameter is decayed if and only if it has at least 2 dimensions (a weight *matrix* of a
    linear or convolutional layer) and no module that holds it is an embedding or a normalisation layer
    (:data:`NO_DECAY_MODULES`, plus ``no_decay_modules``). Biases, LayerNorm/RMSNorm gains (1-D) and
    embedding tables (2-D, but rows are looked up, not multiplied) are not decayed. Biases and norm gains are
    exempt in BERT's, GPT-2's and nanoGPT's recipes alike; the embeddings are exempt as in minGPT (BERT's
    optimizer and nanoGPT's ``configure_optimizers`` do decay them).
    A parameter shared by two modules (an embedding tied to the output layer) counts as an embedding, so it is not
    decayed. Frozen parameters (``requires_grad=False``) are left out of both groups.

    Args:
        model: any module.
        weight_decay: the decay of the first group (AdamW's decoupled :math:`\\lambda`), ``>= 0``.
        no_decay_modules: more module types whose parameters are not to be decayed (for example a custom norm
            whose gain is 2-D).

    Returns:
        ``[{"params": [...], "param_names": [...], "weight_decay": weight_decay},
        {"params": [...], "param_names": [...], "weight_decay": 0.0}]``, in the order of
        ``model.named_parameters()``, ready for ``torch.optim.AdamW(param_groups(model, 0.1), lr=...)``.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``.
        ValueError: for a negative ``weight_decay``.

    Source: Loshchilov and Hutter (2019) (decoupled weight decay, AdamW).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not weight_decay >= 0:
        raise ValueError(f"weight_decay must be a non-negative number, got {weight_decay!r}")
    kinds = NO_DECAY_MODULES + tuple(no_decay_modules)
    exempt = set()
    for module in model.modules():
        if isinstance(module, kinds):
            exempt.update(id(p) for p in module.parameters(recurse=False))
    decay = {"params": [], "param_names": [], "weight_decay": float(weight_decay)}
    no_decay = {"params": [], "param_names": [], "weight_decay": 0.0}
    for name, p in model.named_parameters():  # shared parameters appear once
        if not p.requires_grad:
            continue
        group = decay if p.dim() >= 2 and id(p) not in exempt else no_decay
        group["params"].append(p)
        group["param_names"].append(name)
    return [decay, no_decay]


# --------------------------------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------------------------------

@dataclass
class TrainHistory:
    """What :func:`train` records at each optimizer step ``1..step``: the loss (mean over the micro-batches),
    the learning rate of the first parameter group used by that step, and the gradient norm before clipping."""

    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)

    @property
    def step(self) -> int:
        """The number of optimizer steps recorded."""
        return len(self.losses)

    def state_dict(self) -> dict[str, list[float]]:
        return {"losses": list(self.losses), "lrs": list(self.lrs), "grad_norms": list(self.grad_norms)}


class _ShuffledBatches:
    """Batch ``i`` of reshuffled epochs (see :func:`shuffled_batches`); the last permutation is cached."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.per_epoch = max(1, n // batch_size)
        self._epoch, self._order = -1, None

    def __len__(self) -> int:
        return self.per_epoch

    def __call__(self, i: int) -> torch.Tensor:
        _check_int("i", i, minimum=0)
        epoch, k = divmod(i, self.per_epoch)
        if epoch != self._epoch:
            entropy = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0])
            self._order = torch.randperm(self.n, generator=torch.Generator().manual_seed(entropy))
            self._epoch = epoch
        return self._order[k * self.batch_size:(k + 1) * self.batch_size]

    def __repr__(self) -> str:
        return f"shuffled_batches(n={self.n}, batch_size={self.batch_size}, seed={self.seed})"


def shuffled_batches(n: int, batch_size: int, seed: int = 0) -> Callable[[int], torch.Tensor]:
    """The example indices of batch ``i`` when ``n`` examples are reshuffled at every epoch: a function
    ``i -> (batch_size,) int64`` for the ``batches`` argument of :func:`train`.

    Epoch ``e = i // (n // batch_size)`` is a permutation of ``range(n)`` drawn from ``(seed, e)``, cut into
    ``n // batch_size`` batches (the incomplete last one is dropped, unless ``n < batch_size``: then every batch
    is all ``n`` examples, shuffled). As batch ``i`` depends on nothing but ``i``, a resumed run draws exactly the
    batches the interrupted one would have drawn. ``len(fn)`` is the number of batches per epoch.

    Raises:
        ValueError: if ``n`` or ``batch_size`` is not a positive int (and, when called, ``i`` is negative).
    """
    _check_int("n", n)
    _check_int("batch_size", batch_size)
    _check_int("seed", seed, minimum=0)
    return _ShuffledBatches(n, batch_size, seed)


def _autocast(model: nn.Module, dtype: torch.dtype | None):
    if dtype is None:
        return nullcontext()
    device = next(model.parameters()).device
    return torch.autocast(device_type=device.type, dtype=dtype)


def accumulate_gradients(model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor],
                         micro_batches: Iterable[Any], autocast_dtype: torch.dtype | None = None,
                         scaler: torch.amp.GradScaler | None = None) -> float:
    r"""Backpropagate the mean loss of ``k`` micro-batches, adding ``\nabla (\ell_i / k)`` to each ``.grad``.

    If ``loss_fn`` returns a **mean** over equally many items in each micro-batch, the accumulated gradient
    equals that of one batch made of all of them: :math:`\nabla \frac1k\sum_i \ell_i`. (With a token-level mean
    and micro-batches of unequal token counts, it weighs each micro-batch equally instead of each token.)

    Args:
        model: the model (its ``.grad`` are added to, not reset: call ``optimizer.zero_grad()`` first).
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        micro_batches: the ``k >= 1`` batches of one optimizer step.
        autocast_dtype: run ``loss_fn`` under :func:`torch.autocast` with this dtype (``None``: no autocast).
        scaler: an optional :class:`torch.amp.GradScaler` (for float16): the losses are scaled before backward.

    Returns:
        The mean of the ``k`` losses, a float.

    Raises:
        ValueError: if there are no micro-batches, or a loss is not a scalar floating tensor.
    """
    batches = list(micro_batches)
    if not batches:
        raise ValueError("micro_batches must hold at least one batch")
    total = 0.0
    for batch in batches:
        with _autocast(model, autocast_dtype):
            loss = loss_fn(model, batch)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0 or not loss.is_floating_point():
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"loss_fn must return a scalar floating tensor, got {shape}")
        scaled = loss / len(batches)
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        total += loss.item()
    return total / len(batches)


def _rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (name, keys.tolist(), int(pos), int(has_gauss), float(cached))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
                    scheduler: Any | None = None, scaler: torch.amp.GradScaler | None = None,
                    history: TrainHistory | None = None) -> None:
    """Write everything needed to continue training exactly: the ``state_dict`` of the model, the optimizer, the
    scheduler and the grad scaler, the step, the history and the random states (PyTorch CPU and CUDA, Python,
    NumPy). The file is written to a temporary name and renamed, so an interrupted save never leaves a broken
    checkpoint behind. It loads with ``torch.load(..., weights_only=True)``.

    Raises:
        ValueError: for a negative ``step``.
    """
    _check_int("step", step, minimum=0)
    checkpoint = {
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "history": (history or TrainHistory()).state_dict(),
        "rng": _rng_state(),
    }
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".checkpoint-", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any | None = None, scaler: torch.amp.GradScaler | None = None,
                    restore_rng: bool = True) -> tuple[int, TrainHistory]:
    """Load a checkpoint of :func:`save_checkpoint` into ``model`` (and the optimizer, scheduler and scaler when
    given), restore the random states (unless ``restore_rng=False``) and return ``(step, history)``.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the checkpoint holds no scheduler (or scaler) state but one is given, or the other way round.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {os.fspath(path)!r}")
    device = next(model.parameters()).device
    checkpoint = torch.load(path, map_location=device, weights_only=True)
    model.load_state_dict(checkpoint["model"])
    if optimizer is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
    for name, obj in (("scheduler", scheduler), ("scaler", scaler)):
        saved = checkpoint[name]
        if (obj is None) != (saved is None) and not (name == "scaler" and obj is not None and not obj.is_enabled()):
            raise ValueError(f"{name}: the checkpoint {'has no' if saved is None else 'has a'} {name} state, but "
                             f"{'one' if obj is not None else 'none'} was given")
        if obj is not None and saved is not None:
            obj.load_state_dict(saved)
    if restore_rng:
        _set_rng_state(checkpoint["rng"])
    return checkpoint["step"], TrainHistory(**checkpoint["history"])


def train(model: nn.Module, batches: Callable[[int], Any] | Iterable[Any],
          loss_fn: Callable[[nn.Module, Any], torch.Tensor], optimizer: torch.optim.Optimizer, steps: int, *,
          scheduler: Any | None = None, clip_grad_norm: float | None = None, grad_accum_steps: int = 1,
          autocast_dtype: torch.dtype | None = None, checkpoint_path: str | os.PathLike | None = None,
          checkpoint_every: int | None = None, resume: bool = False, progress: bool = True,
          desc: str = "training", callback: Callable[[int, TrainHistory], None] | None = None,
          on_nonfinite: str = "raise") -> TrainHistory:
    """Train ``model`` for ``steps`` optimizer steps and return what happened at each.

    One optimizer step: zero the gradients; for each of ``grad_accum_steps`` micro-batches, compute
    ``loss_fn(model, batch)`` (under autocast if asked) and backpropagate ``loss / grad_accum_steps``
    (:func:`accumulate_gradients`); clip the gradient norm (if asked); ``optimizer.step()``; ``scheduler.step()``.

    **The data**: ``batches`` is either a function ``batches(i) -> batch`` of the micro-batch index
    ``i = step * grad_accum_steps + k`` (``step`` from 0, ``k < grad_accum_steps``), which resumes exactly for
    free if it is a deterministic function of ``i`` (for example indices drawn by a generator seeded with ``i``,
    or epoch ``i // n_batches`` of a seeded shuffle); or an iterable of batches, from which a resumed run first
    draws and discards the micro-batches already used (exact if the iterable repeats itself, for example a list or
    a seeded generator). A batch is anything ``loss_fn`` understands.

    **The model** is put in training mode (dropout on) and left in evaluation mode at the end, as
    :func:`tfcourse.models.seq2seq.fit` does.

    Args:
        model: the model; its parameters must be in ``optimizer``.
        batches: a function of the micro-batch index, or an iterable of batches (see above).
        loss_fn: ``loss_fn(model, batch) -> scalar loss tensor`` (a mean, so that accumulation matches one big
            batch: see :func:`accumulate_gradients`).
        optimizer: any :class:`torch.optim.Optimizer`.
        steps: the total number of optimizer steps (a resumed run counts the steps already done).
        scheduler: an optional learning-rate scheduler, stepped after every optimizer step (for example a
            :class:`~torch.optim.lr_scheduler.LambdaLR` with :func:`noam_lambda`).
        clip_grad_norm: clip the global gradient norm to this value (``None``: no clipping); the norm before
            clipping is recorded either way.
        grad_accum_steps: micro-batches per optimizer step.
        autocast_dtype: ``torch.bfloat16`` or ``torch.float16`` to run the forward pass under
            :func:`torch.autocast` on the model's device (float16 also uses a :class:`torch.amp.GradScaler`);
            ``None``: full precision.
        checkpoint_path: where to save checkpoints (:func:`save_checkpoint`): every ``checkpoint_every`` steps
            and at the end. ``None``: no checkpoints.
        checkpoint_every: the checkpoint period in steps (``None``: only at the end).
        resume: continue from ``checkpoint_path`` (model, optimizer, scheduler, scaler, step, history, random
            states): a run interrupted and resumed ends with the same parameters as an uninterrupted one.
        progress: show a tqdm progress bar with the running loss; desc: its label.
        callback: ``callback(step, history)`` after each optimizer step (``step`` counted from 1), for example to
            evaluate on validation data (it should restore ``model.train()`` if it switches to eval).
        on_nonfinite: what to do when a loss is NaN or infinite: ``"raise"`` a :class:`FloatingPointError`
            (default) or ``"stop"`` training and return the history with that loss as its last entry.

    Returns:
        A :class:`TrainHistory` of every step ``1..steps`` (the resumed ones included).

    Raises:
        ValueError: for non-positive ``steps``, ``grad_accum_steps``, ``checkpoint_every`` or
            ``clip_grad_norm``, ``resume`` or ``checkpoint_every`` without ``checkpoint_path``, an
            ``autocast_dtype`` other than float16/bfloat16, a model without parameters or a bad ``on_nonfinite``.
        FileNotFoundError: if ``resume`` is set and there is no checkpoint at ``checkpoint_path``.
        FloatingPointError: for a non-finite loss with ``on_nonfinite="raise"``.
        StopIteration: if an iterable ``batches`` runs out.
    """
    _check_int("steps", steps)
    _check_int("grad_accum_steps", grad_accum_steps)
    if checkpoint_every is not None:
        _check_int("checkpoint_every", checkpoint_every)
    if clip_grad_norm is not None and (isinstance(clip_grad_norm, bool) or not isinstance(clip_grad_norm, (int, float))
                                       or not clip_grad_norm > 0):
        raise ValueError(f"clip_grad_norm must be a positive number or None, got {clip_grad_norm!r}")
    if checkpoint_path is None and (resume or checkpoint_every is not None):
        raise ValueError("resume and checkpoint_every need a checkpoint_path")
    if autocast_dtype not in (None, torch.float16, torch.bfloat16):
        raise DtypeError(f"autocast_dtype must be None, torch.float16 or torch.bfloat16, got {autocast_dtype}")
    if on_nonfinite not in ("raise", "stop"):
        raise ValueError(f"on_nonfinite must be 'raise' or 'stop', got {on_nonfinite!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    device = params[0].device
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype is torch.float16)

    start, history = 0, TrainHistory()
    if resume:
        start, history = load_checkpoint(checkpoint_path, model, optimizer, scheduler, scaler)
    if callable(batches):
        get_batch = batches
    else:
        iterator = iter(batches)
        for _ in range(min(start, steps) * grad_accum_steps):  # skip what the checkpointed run has used
            next(iterator)
        get_batch = lambda i: next(iterator)  # noqa: E731

    bar = None
    if progress and start < steps:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=start, desc=desc, leave=False)
    model.train()
    try:
        for step in range(start, steps):
            optimizer.zero_grad(set_to_none=True)
            micro = (get_batch(step * grad_accum_steps + k) for k in range(grad_accum_steps))
            loss = accumulate_gradients(model, loss_fn, micro, autocast_dtype, scaler if scaler.is_enabled() else None)
            history.lrs.append(float(optimizer.param_groups[0]["lr"]))
            history.losses.append(loss)
            if not math.isfinite(loss):
                history.grad_norms.append(float("nan"))
                if on_nonfinite == "raise":
                    raise FloatingPointError(f"the loss is {loss} at step {step + 1}")
                break
            scaler.unscale_(optimizer)
            norm = nn.utils.clip_grad_norm_(params, clip_grad_norm if clip_grad_norm is not None else float("inf"))
            history.grad_norms.append(float(norm))
            scaler.step(optimizer)
            scaler.update()
            if scheduler is not None:
                scheduler.step()
            done = step + 1
            if callback is not None:
                callback(done, history)
            if checkpoint_path is not None and ((checkpoint_every and done % checkpoint_every == 0) or done == steps):
                # after the callback, so that the saved random states are those the next step starts from
                save_checkpoint(checkpoint_path, model, optimizer, done, scheduler,
                                scaler if scaler.is_enabled() else None, history)
            if bar is not None:
                bar.update(1)
                if done % 10 == 0 or done == steps:
                    bar.set_postfix(loss=f"{loss:.3f}")
    finally:
        if bar is not None:
            bar.close()
        model.eval()
    return history


# --------------------------------------------------------------------------------------------------------------
# Initialisation and memory accounting (chapter 7)
# --------------------------------------------------------------------------------------------------------------

def xavier_init_(module: nn.Module, gain: float = 1.0) -> nn.Module:
    r"""Re-initialise every parameter with at least 2 dimensions of ``module`` by Glorot and Bengio's uniform
    rule, in place, and return the module.

    .. math:: W_{ij} \sim \mathcal U\Big(-a, a\Big), \qquad a = \text{gain} \cdot \sqrt{\frac{6}{n_\text{in} +
              n_\text{out}}}, \qquad \operatorname{Var}(W_{ij}) = \text{gain}^2\,\frac{2}{n_\text{in} + n_\text{out}}

    (:func:`torch.nn.init.xavier_uniform_`; for an ``nn.Linear`` weight ``(out, in)``, :math:`n_\text{in}` = in).
    The variance keeps the scale of activations (forward, :math:`n_\text{in} \operatorname{Var}(W) \approx 1`)
    and of gradients (backward, :math:`n_\text{out} \operatorname{Var}(W) \approx 1`) about constant through
    depth, a compromise between the two. Biases and LayerNorm gains (1-D) keep their values. Embedding tables are
    2-D and are re-initialised too, as in the Annotated Transformer and :meth:`torch.nn.Transformer._reset_parameters`,
    which this function equals (same parameters, same order, hence the same random numbers).

    Args:
        module: any module.
        gain: the scale factor (``nn.init.calculate_gain("tanh")`` = 5/3 for tanh layers; 1 for linear ones).

    Raises:
        TypeError: if ``module`` is not an ``nn.Module``.
        ValueError: for a non-positive ``gain``.

    Source: Glorot and Bengio (2010), Eq. 16 ("normalized initialization").
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    _check_number("gain", gain, 0.0, math.inf, high_open=True)
    if gain == 0:
        raise ValueError("gain must be positive, got 0")
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p, gain=gain)
    return module


import weakref  # noqa: E402 (this section's imports: the tracker below only)

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402


class TensorMemoryTracker(TorchDispatchMode):
    """Measure the tensor memory that the code inside a ``with`` block allocates: how much is alive at the end,
    and the **peak**, the most that was alive at once.

    ::

        with TensorMemoryTracker() as memory:
            model(x).sum().backward()
        memory.peak_bytes   # activations kept for backward + gradients + temporaries, at their worst moment

    **How.** Every tensor operation passes through ``__torch_dispatch__`` (PyTorch's hook below autograd: the
    operations of backward and of checkpointed recomputation pass too). An output whose storage is new (not the
    storage of one of the operation's inputs, which makes it a view or an in-place result, and not counted
    before) is an allocation: its storage's bytes are added to :attr:`current_bytes`, and a weak reference with a
    callback subtracts them when the storage is freed. :attr:`peak_bytes` is the maximum of
    :attr:`current_bytes` after each operation. This is the count of bytes in live tensors that
    ``torch.cuda.max_memory_allocated`` reports on a GPU, without the caching allocator's rounding of each block
    to a multiple of 512 bytes, and it works on any device; the CPU has no such counter (the process's resident
    memory also holds Python, libraries, and memory the C allocator keeps after ``free``, so it measures something
    else).

    **Not counted**: tensors that existed before the block (parameters, inputs; add them yourself), scratch memory
    an operation frees before it returns, and storages resized in place (``Tensor.resize_``, used by ``out=``
    arguments).

    Attributes:
        current_bytes: bytes of the storages allocated inside the block and still alive.
        peak_bytes: the largest ``current_bytes`` seen.
        allocated_bytes: all the bytes allocated inside the block, freed or not.

    Peer: ``torch.distributed._tools.mem_tracker.MemTracker`` (a private tool of PyTorch's, which also tracks
    the module's parameters and inputs) reports the same peak plus those (``tests/test_training_scale.py``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.current_bytes = self.peak_bytes = self.allocated_bytes = 0
        self._counted: dict[int, Any] = {}  # id(storage) -> weak reference (its callback un-counts the storage)

    def _free(self, key: int, nbytes: int) -> None:
        self._counted.pop(key, None)
        self.current_bytes -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()  # the same Python object for as long as the storage lives
            key = id(storage)
            if key in inputs or key in self._counted:
                continue  # a view, an in-place result, or already counted
            nbytes = storage.nbytes()
            self._counted[key] = weakref.ref(storage, lambda _, key=key, n=nbytes: self._free(key, n))
            self.current_bytes += nbytes
            self.allocated_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        return out


__all__ += ["xavier_init_", "TensorMemoryTracker"]
