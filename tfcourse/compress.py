"""Model compression (chapter 14): knowledge distillation, magnitude and head pruning, and int8 quantization.

Read top to bottom:

* **Distillation** (Hinton et al. 2015): :func:`soft_targets`, :func:`distillation_loss` (the temperature-softened
  KL divergence, scaled by :math:`\\tau^2`) and :func:`distillation_objective` (mixed with the usual
  cross-entropy on the true next tokens).
* **Magnitude pruning** (Han et al. 2015): :func:`prunable_weights`, :func:`magnitude_masks` (layer-wise or
  global), :func:`apply_masks_` and :func:`sparsity`; equal to :mod:`torch.nn.utils.prune`'s ``l1_unstructured``
  and ``global_unstructured``.
* **Head pruning** (Michel et al. 2019; Voita et al. 2019): :func:`mask_heads` (forward hooks that silence heads),
  :func:`head_importance` (:math:`|\\partial L / \\partial \\xi_h|` of a gate on each head) and
  :func:`prune_heads_` (zero the weights of whole heads).
* **Quantization** (Jacob et al. 2018): :func:`quantize_symmetric` / :func:`dequantize` (int8 weights with one
  scale), :func:`int8_linear_reference` (a dynamically quantized linear layer written out: activations
  quantized per batch to unsigned 7-bit integers, products accumulated in integers), :class:`Int8DynamicLinear`
  and :func:`quantize_dynamic_int8` (PyTorch's int8 kernels through ``torch.ao.quantization.quantize_dynamic``),
  and :func:`model_size_bytes`.

``torch.ao.quantization`` is deprecated in favour of the separate ``torchao`` package; it still works in the
pinned torch, and the helpers here silence its deprecation warnings.

Shapes: ``N`` rows (tokens) of ``V`` classes (the vocabulary) for the losses; a GPT of ``L`` blocks with ``nh``
heads of size ``hs`` for the head functions.
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import DtypeError, check_floating, check_tensor

__all__ = ["soft_targets", "distillation_loss", "distillation_objective", "prunable_weights", "magnitude_masks",
           "apply_masks_", "sparsity", "mask_heads", "head_importance", "prune_heads_", "quantize_symmetric",
           "dequantize", "int8_linear_reference", "Int8DynamicLinear", "quantize_dynamic_int8",
           "model_size_bytes"]


def _check_temperature(temperature: object) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    return float(temperature)


def _check_fraction(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


# --------------------------------------------------------------------------------------------------------------
# Knowledge distillation
# --------------------------------------------------------------------------------------------------------------

def soft_targets(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    r"""The softened distribution :math:`q_i = \exp(z_i / \tau) / \sum_j \exp(z_j / \tau)` over the last dimension.

    A higher temperature :math:`\tau` spreads the mass over more classes and shows the "dark knowledge" of which
    wrong answers the teacher finds plausible (Hinton et al. 2015, Sec. 2, Eq. 1).

    Raises:
        ValueError: for a non-positive temperature; :class:`~tfcourse._checks.DtypeError` for integer logits.
    """
    check_tensor("logits", logits, min_ndim=1, shape_hint="(..., V)")
    check_floating("logits", logits)
    return (logits / _check_temperature(temperature)).softmax(dim=-1)


def _check_pair(student_logits: object, teacher_logits: object) -> None:
    check_tensor("student_logits", student_logits, min_ndim=1, shape_hint="(..., V)")
    check_tensor("teacher_logits", teacher_logits, min_ndim=1, shape_hint="(..., V)")
    check_floating("student_logits", student_logits)
    check_floating("teacher_logits", teacher_logits, like=student_logits, like_name="student_logits")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"teacher_logits must have the shape of student_logits {tuple(student_logits.shape)}, got "
                         f"{tuple(teacher_logits.shape)}")


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""The soft-target loss of knowledge distillation: the KL divergence from the teacher's softened distribution
    to the student's, times :math:`\tau^2`, averaged over rows.

    .. math:: \ell_\text{soft} = \tau^2\, \frac{1}{N} \sum_{n=1}^{N} \mathrm{KL}\big(q^{(n)}_\tau \,\big\|\,
              p^{(n)}_\tau\big), \qquad q_\tau = \mathrm{softmax}(v / \tau),\ p_\tau = \mathrm{softmax}(z / \tau)

    for teacher logits :math:`v` and student logits :math:`z`. Its gradient is
    :math:`\partial \ell / \partial z_i = \tau\, (p_{\tau,i} - q_{\tau,i}) / N`: zero when the student matches the
    teacher. Without the :math:`\tau^2` the soft gradients would shrink as :math:`1/\tau^2` for large
    :math:`\tau` (they tend to :math:`\frac{1}{N V}\big((z_i - \bar z) - (v_i - \bar v)\big)`, logit matching), so
    the factor keeps their size comparable to the hard loss's when the temperature changes (Hinton et al.,
    Sec. 2 and 2.1). The KL divergence differs from the cross-entropy :math:`-\sum q \log p` by the teacher's
    entropy, a constant, so both give the same gradients.

    The teacher is not trained: ``teacher_logits`` are detached.

    Args:
        student_logits: ``(..., V)`` floating.
        teacher_logits: ``(..., V)``, same shape and dtype.
        temperature: :math:`\tau > 0` (Hinton et al. use 1 to 20; DistilBERT 2).
        mask: optional ``(...)`` bool, ``True`` = a row that counts (e.g. ``targets != -100``); the mean is over
            the counted rows (0 if there are none).

    Returns:
        A scalar in nats, in the dtype of the logits. Equal to
        ``tau**2 * F.kl_div(log_softmax(z / tau), log_softmax(v / tau), log_target=True, reduction="batchmean")``
        on the rows flattened.

    Raises:
        ValueError: for mismatched shapes or dtypes, a non-positive ``temperature``, or a ``mask`` of the wrong
            shape or dtype.

    Source: Hinton, Vinyals and Dean (2015), Sec. 2 (soft targets at a raised temperature, the :math:`T^2` factor)
    and Sec. 2.1 (the high-temperature limit); Sanh et al. (2019) (DistilBERT, the soft loss at :math:`\tau = 2`).
    """
    _check_pair(student_logits, teacher_logits)
    tau = _check_temperature(temperature)
    log_p = torch.log_softmax(student_logits / tau, dim=-1)                   # (..., V) student
    log_q = torch.log_softmax(teacher_logits.detach() / tau, dim=-1)          # (..., V) teacher
    kl = (log_q.exp() * (log_q - log_p)).sum(dim=-1)                          # (...): KL(q || p) per row
    if mask is None:
        return tau ** 2 * kl.mean()
    check_tensor("mask", mask, shape_hint="(...) bool, True = counts")
    if mask.dtype != torch.bool or mask.shape != kl.shape:
        raise ValueError(f"mask must be a bool tensor of shape {tuple(kl.shape)} (the logits without V), got "
                         f"{mask.dtype} {tuple(mask.shape)}")
    return tau ** 2 * (kl * mask).sum() / mask.sum().clamp_min(1)


def distillation_objective(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                           temperature: float = 2.0, alpha: float = 0.5,
                           ignore_index: int = -100) -> torch.Tensor:
    r"""Hinton et al.'s objective: a weighted average of the soft-target loss and the cross-entropy with the true
    labels, :math:`\alpha\, \ell_\text{soft} + (1 - \alpha)\, \ell_\text{hard}`.

    Args:
        student_logits, teacher_logits: ``(..., V)``.
        targets: ``(...)`` int64 class ids (the next tokens); ``ignore_index`` marks rows that count in neither
            loss.
        temperature: :math:`\tau` of :func:`distillation_loss`; the hard loss uses :math:`\tau = 1`.
        alpha: the weight of the soft loss in ``[0, 1]`` (``1``: soft targets only; ``0``: plain training).
        ignore_index: see ``targets``.

    Returns:
        A scalar (nats).

    Raises:
        ValueError: as :func:`distillation_loss`, for ``alpha`` outside ``[0, 1]``, or for ``targets`` of another
            shape or a floating dtype.

    Source: Hinton et al. (2015), Sec. 2 ("a weighted average of two different objective functions").
    """
    _check_pair(student_logits, teacher_logits)
    alpha = _check_fraction("alpha", alpha)
    check_tensor("targets", targets, shape_hint="(...) class ids")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise DtypeError(f"targets must hold integer class ids, got {targets.dtype}")
    if targets.shape != student_logits.shape[:-1]:
        raise ValueError(f"targets must have shape {tuple(student_logits.shape[:-1])} (the logits without V), got "
                         f"{tuple(targets.shape)}")
    keep = targets != ignore_index
    soft = distillation_loss(student_logits, teacher_logits, temperature, mask=keep)
    V = student_logits.shape[-1]
    hard = F.cross_entropy(student_logits.reshape(-1, V), targets.reshape(-1), ignore_index=ignore_index,
                           reduction="sum") / keep.sum().clamp_min(1)
    return alpha * soft + (1.0 - alpha) * hard


# --------------------------------------------------------------------------------------------------------------
# Magnitude pruning
# --------------------------------------------------------------------------------------------------------------

def prunable_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weight matrices of the ``nn.Linear`` layers of ``model``, by dotted parameter name, leaving out any that
    is also an embedding's weight (a GPT's tied output layer is its token embedding, which is not pruned here).

    Biases, LayerNorms and embeddings hold few parameters (or, for the embedding, one row per token that must stay
    usable) and are left dense, as is usual.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return {f"{name}.weight" if name else "weight": m.weight for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and id(m.weight) not in embeddings}


def _n_to_prune(sparsity: float, numel: int) -> int:
    return round(sparsity * numel)  # torch.nn.utils.prune's rule for a float amount


def _smallest_mask(scores: torch.Tensor, n_prune: int) -> torch.Tensor:
    keep = torch.ones_like(scores, dtype=torch.bool)
    if n_prune:
        keep.view(-1)[torch.topk(scores.reshape(-1), n_prune, largest=False).indices] = False
    return keep


def magnitude_masks(weights: dict[str, torch.Tensor], sparsity: float,
                    scope: str = "global") -> dict[str, torch.Tensor]:
    r"""Masks that remove the weights of smallest magnitude :math:`|w|`.

    ``scope="layer"`` removes ``round(sparsity * numel)`` entries of **each** tensor; ``scope="global"`` ranks all
    the entries of all the tensors together and removes ``round(sparsity * total)`` of them, so layers with many
    small weights lose more. Ties are broken as ``torch.topk`` breaks them, as in :mod:`torch.nn.utils.prune`.

    Args:
        weights: ``{name: tensor}``, e.g. :func:`prunable_weights` of a model.
        sparsity: the fraction to remove, in ``[0, 1]``.
        scope: ``"global"`` or ``"layer"``.

    Returns:
        ``{name: mask}``, bool tensors of the weights' shapes, **``True`` = keep**.

    Raises:
        ValueError: for an empty ``weights``, a ``sparsity`` outside ``[0, 1]``, an unknown ``scope``, or a value that
            is not a floating tensor.

    Equal to ``torch.nn.utils.prune.l1_unstructured(module, "weight", amount=sparsity)`` for each layer
    (``"layer"``) and to ``prune.global_unstructured(..., pruning_method=prune.L1Unstructured, amount=sparsity)``
    (``"global"``). Source: Han et al. (2015), Sec. 3 (prune the connections whose weights are below a threshold,
    then retrain); Zhu and Gupta (2018) (layer-wise magnitude pruning with a gradual schedule).
    """
    if not isinstance(weights, dict) or not weights:
        raise ValueError("weights must be a non-empty dict {name: tensor}")
    for name, w in weights.items():
        check_tensor(f"weights[{name!r}]", w)
        check_floating(f"weights[{name!r}]", w)
    sparsity = _check_fraction("sparsity", sparsity)
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    with torch.no_grad():
        if scope == "layer":
            return {name: _smallest_mask(w.abs(), _n_to_prune(sparsity, w.numel())) for name, w in weights.items()}
        flat = torch.cat([w.abs().reshape(-1) for w in weights.values()])     # (total,)
        keep = _smallest_mask(flat, _n_to_prune(sparsity, flat.numel()))
        masks, start = {}, 0
        for name, w in weights.items():
            masks[name] = keep[start:start + w.numel()].view_as(w)
            start += w.numel()
        return masks


@torch.no_grad()
def apply_masks_(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """Zero, in place, the entries of ``model``'s parameters where ``masks[name]`` is ``False``; returns ``model``.
    Call it again after every optimizer step to keep pruned weights at zero while fine-tuning.

    Raises:
        ValueError: for a name that is not a parameter of ``model``, or a mask of another shape or not bool.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, mask in masks.items():
        if name not in params:
            raise ValueError(f"masks: {name!r} is not a parameter of the model")
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != params[name].shape:
            raise ValueError(f"masks[{name!r}] must be a bool tensor of shape {tuple(params[name].shape)}")
        params[name].mul_(mask.to(params[name].device))
    return model


def sparsity(tensors: dict[str, torch.Tensor] | Iterable[torch.Tensor]) -> float:
    """The fraction of entries that are exactly zero, over all the given tensors together."""
    values = list(tensors.values()) if isinstance(tensors, dict) else list(tensors)
    total = sum(t.numel() for t in values)
    if total == 0:
        raise ValueError("tensors: nothing to count")
    return sum(int((t == 0).sum()) for t in values) / total


# --------------------------------------------------------------------------------------------------------------
# Head pruning
# --------------------------------------------------------------------------------------------------------------

def _gpt_blocks(gpt: nn.Module) -> nn.ModuleList:
    blocks = getattr(gpt, "h", None)
    if not isinstance(blocks, nn.ModuleList) or not all(hasattr(b, "attn") for b in blocks):
        raise TypeError(f"gpt must be a tfcourse GPT (blocks in gpt.h), got {type(gpt).__name__}")
    return blocks


def _check_head_mask(gpt: nn.Module, mask: torch.Tensor, name: str = "mask") -> torch.Tensor:
    blocks = _gpt_blocks(gpt)
    L, nh = len(blocks), blocks[0].attn.n_heads
    check_tensor(name, mask, ndim=2, shape_hint="(L, n_heads)")
    if tuple(mask.shape) != (L, nh):
        raise ValueError(f"{name} must have shape (n_layer, n_head) = ({L}, {nh}), got {tuple(mask.shape)}")
    return mask


def mask_heads(gpt: nn.Module, mask: torch.Tensor) -> list[torch.utils.hooks.RemovableHandle]:
    r"""Multiply the output of head :math:`h` of block :math:`l` by ``mask[l, h]``, with forward pre-hooks on
    each attention's output projection ``W_o`` (whose input is the heads' outputs side by side,
    ``(B, T, nh * hs)``):

    .. math:: \mathrm{MHA}(x) = \sum_h \xi_h\, \mathrm{head}_h(x)\, W^O_h

    ``mask`` of zeros and ones removes heads; a float ``mask`` that requires grad turns the :math:`\xi_h` into
    gates whose gradients measure importance (:func:`head_importance`).

    Args:
        gpt: a :class:`~tfcourse.models.gpt.GPT`.
        mask: ``(L, nh)`` float (or bool, taken as 0/1).

    Returns:
        The hook handles: call ``handle.remove()`` on each to restore the model.

    Raises:
        TypeError: if ``gpt`` is not a GPT. ValueError: for a mask of another shape.

    Source: Michel et al. (2019), Sec. 2.1, Eq. 1-2 (the mask variables :math:`\xi_h`).
    """
    _check_head_mask(gpt, mask)
    handles = []
    for layer, block in enumerate(_gpt_blocks(gpt)):
        nh = block.attn.n_heads

        def hook(module, args, layer=layer, nh=nh):
            (x,) = args                                                      # (B, T, nh * hs)
            gates = mask[layer].to(x.dtype)                                  # (nh,)
            return (x.unflatten(-1, (nh, -1)) * gates[:, None]).flatten(-2),  # (B, T, nh * hs)

        handles.append(block.attn.W_o.register_forward_pre_hook(hook))
    return handles


def head_importance(gpt: nn.Module, batches: Iterable[Any], loss_fn: Callable[[nn.Module, Any], torch.Tensor]
                    | None = None, normalize: bool = True) -> torch.Tensor:
    r"""The importance of every head, :math:`I_h = \frac{1}{n}\sum_{b=1}^{n}
    \big|\partial \mathcal L_b / \partial \xi_h\big|` at :math:`\xi = 1`: how much the loss of batch ``b`` would
    change if the head's output were scaled down (a first-order estimate of the cost of removing it).

    Args:
        gpt: a :class:`~tfcourse.models.gpt.GPT` (its parameters are not changed; their ``.grad`` is left as it was).
        batches: an iterable of batches; by default each is ``(idx, targets)``.
        loss_fn: ``loss_fn(model, batch) -> scalar``; default ``model(*batch)[1]``.
        normalize: divide each layer's scores by their L2 norm (Michel et al. found this helps when pruning across
            layers).

    Returns:
        ``(L, nh)`` float32, non-negative.

    Raises:
        TypeError: if ``gpt`` is not a GPT. ValueError: if ``batches`` is empty.

    Source: Michel et al. (2019), Sec. 4.1, Eq. 3 (importance score; there the expectation is over examples,
    here over batches) and the layer-wise normalisation of Sec. 4.2.
    """
    blocks = _gpt_blocks(gpt)
    weight = next(gpt.parameters())
    gates = torch.ones(len(blocks), blocks[0].attn.n_heads, dtype=weight.dtype, device=weight.device,
                       requires_grad=True)
    loss_fn = loss_fn or (lambda model, batch: model(*batch)[1])
    handles = mask_heads(gpt, gates)
    total, n = torch.zeros_like(gates), 0
    try:
        for batch in batches:
            (grad,) = torch.autograd.grad(loss_fn(gpt, batch), gates)
            total += grad.abs()
            n += 1
    finally:
        for handle in handles:
            handle.remove()
    if n == 0:
        raise ValueError("batches is empty")
    importance = (total / n).detach().float()
    if normalize:
        importance = importance / importance.norm(dim=-1, keepdim=True).clamp_min(1e-20)
    return importance


@torch.no_grad()
def prune_heads_(gpt: nn.Module, heads: dict[int, Iterable[int]]) -> int:
    """Remove heads of a GPT by zeroing their weights in place: for head ``h`` of block ``l``, the rows of the head
    in ``W_q`` (and in ``W_k``, ``W_v`` when every head has its own keys and values) and its columns in ``W_o``.

    The model then computes what :func:`mask_heads` with zeros at those heads computes. A real deployment would
    slice the matrices to fewer heads instead (the saving in memory and time); this function returns how many
    weights that would remove.

    Args:
        gpt: a :class:`~tfcourse.models.gpt.GPT`.
        heads: ``{layer: [head, ...]}``.

    Returns:
        The number of weights (matrix entries and biases of ``W_q``, ``W_k``, ``W_v`` rows and ``W_o`` columns)
        zeroed.

    Raises:
        TypeError: if ``gpt`` is not a GPT. ValueError: for a layer or head out of range.

    Source: Michel et al. (2019), Sec. 4 (pruning heads by importance); Voita et al. (2019), Sec. 6.
    """
    blocks = _gpt_blocks(gpt)
    removed = 0
    for layer, layer_heads in heads.items():
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < len(blocks):
            raise ValueError(f"heads: layer must be an int in [0, {len(blocks)}), got {layer!r}")
        attn = blocks[layer].attn
        hs, own_kv = attn.d_head, attn.n_kv_heads == attn.n_heads
        for h in layer_heads:
            if isinstance(h, bool) or not isinstance(h, int) or not 0 <= h < attn.n_heads:
                raise ValueError(f"heads[{layer}]: head must be an int in [0, {attn.n_heads}), got {h!r}")
            rows = slice(h * hs, (h + 1) * hs)
            for linear in (attn.W_q, attn.W_k, attn.W_v) if own_kv else (attn.W_q,):
                linear.weight[rows] = 0
                removed += linear.weight[rows].numel()
                if linear.bias is not None:
                    linear.bias[rows] = 0
                    removed += hs
            attn.W_o.weight[:, rows] = 0
            removed += attn.W_o.weight[:, rows].numel()
    return removed


# --------------------------------------------------------------------------------------------------------------
# Quantization
# --------------------------------------------------------------------------------------------------------------

def quantize_symmetric(w: torch.Tensor, n_bits: int = 8) -> tuple[torch.Tensor, float]:
    r"""Symmetric per-tensor quantization of a weight to signed ``n_bits`` integers:

    .. math:: s = \frac{\max |w|}{(q_\max - q_\min) / 2}, \qquad q = \mathrm{clamp}(\mathrm{round}(w / s),
              q_\min, q_\max), \qquad \hat w = s\, q

    with :math:`q_\min = -2^{b-1}`, :math:`q_\max = 2^{b-1} - 1` (for int8 :math:`s = \max|w| / 127.5`, the rule
    of PyTorch's ``MinMaxObserver`` with ``per_tensor_symmetric``; zero maps to zero exactly). Each entry's error is
    at most :math:`s/2`, except that the largest positive weights may clip by up to :math:`s/2` more.

    Args:
        w: floating tensor.
        n_bits: 2 to 8.

    Returns:
        ``(q, scale)``: ``q`` int8 of ``w``'s shape, ``scale`` a Python float.

    Raises:
        ValueError: for ``n_bits`` outside 2..8; :class:`~tfcourse._checks.DtypeError` for a non-floating ``w``.

    Source: Jacob et al. (2018), Sec. 2.1 (the affine map :math:`r = S(q - Z)`, here with :math:`Z = 0`).
    """
    check_tensor("w", w)
    check_floating("w", w)
    if isinstance(n_bits, bool) or not isinstance(n_bits, int) or not 2 <= n_bits <= 8:
        raise ValueError(f"n_bits must be an int in [2, 8], got {n_bits!r}")
    q_min, q_max = -(2 ** (n_bits - 1)), 2 ** (n_bits - 1) - 1
    w = w.detach().float()
    scale = max(float(w.abs().max()) / ((q_max - q_min) / 2), torch.finfo(torch.float32).eps)
    q = torch.clamp(torch.round(w / scale), q_min, q_max).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * q`` as float32: the weights a quantized model effectively uses."""
    check_tensor("q", q)
    return q.float() * scale


def int8_linear_reference(x: torch.Tensor, q_weight: torch.Tensor, weight_scale: float,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    r"""A dynamically quantized linear layer, written out: what PyTorch's int8 ``DynamicQuantizedLinear`` computes
    on an x86 CPU (the fbgemm engine).

    1. The activations are quantized afresh for every call ("dynamic"), with one affine map for the whole
       tensor, over a range that includes zero: :math:`s_x = (\max(x, 0) - \min(x, 0)) / 127`,
       :math:`z_x = \mathrm{round}(-\min(x, 0) / s_x)`, :math:`q_x = \mathrm{clamp}(\mathrm{round}(x / s_x) + z_x,
       0, 127)` (7-bit, fbgemm's ``reduce_range``, which keeps its 16-bit intermediate sums from overflowing).
    2. The products are accumulated in integers: :math:`A = (q_x - z_x)\, q_W^\top` (int32 on the hardware).
    3. Back to floating point: :math:`y = s_x s_W A + b`.

    Args:
        x: ``(..., d_in)`` float32.
        q_weight: ``(d_out, d_in)`` int8, from :func:`quantize_symmetric`.
        weight_scale: its scale :math:`s_W`.
        bias: ``(d_out,)`` float32 or ``None``.

    Returns:
        ``(..., d_out)`` float32, without gradient (a model of inference); the tests find it within ``1e-6`` of
        PyTorch's kernel.

    Raises:
        ValueError: for shapes that do not fit or a ``q_weight`` that is not int8.

    Source: Jacob et al. (2018), Sec. 2.2-2.4 (integer-arithmetic matrix multiplication with zero points); the
    7-bit activation range is fbgemm's (PyTorch's ``reduce_range=True`` on x86).
    """
    check_tensor("x", x, min_ndim=1, shape_hint="(..., d_in)")
    check_floating("x", x)
    check_tensor("q_weight", q_weight, ndim=2, shape_hint="(d_out, d_in) int8")
    if q_weight.dtype != torch.int8:
        raise DtypeError(f"q_weight must be int8, got {q_weight.dtype}")
    if x.shape[-1] != q_weight.shape[1]:
        raise ValueError(f"x must have shape (..., d_in) = (..., {q_weight.shape[1]}), got {tuple(x.shape)}")
    x = x.detach().float()                                                             # inference only
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    q_max = 127
    s_x = (hi - lo) / q_max if hi > lo else 1.0
    z_x = int(min(q_max, max(0, round(-lo / s_x))))
    q_x = torch.clamp(torch.round(x / s_x) + z_x, 0, q_max).to(torch.int64)           # (..., d_in)
    acc = (q_x - z_x) @ q_weight.to(torch.int64).T                                     # (..., d_out) integers
    y = acc.to(torch.float64) * (s_x * weight_scale)
    if bias is not None:
        y = y + bias.double()
    return y.float()


@contextlib.contextmanager
def _quiet_torch_ao():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated.*")
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*")
        warnings.filterwarnings("ignore", message=r".*quantize_per_tensor.*deprecated.*")
        yield


class Int8DynamicLinear(nn.Module):
    """An ``nn.Linear`` with int8 weights, run by PyTorch's dynamically quantized kernel
    (``torch.ao.nn.quantized.dynamic.Linear``, kept as ``self.qlinear``), computing what
    :func:`int8_linear_reference` computes.

    It differs from PyTorch's module only in its ``weight``: an attribute holding the **dequantized** float32
    weight, not a method, so that code which reads a linear layer's weight (the course's attention layers read
    ``W_q.weight.dtype``) works unchanged. That copy costs memory at run time but is not part of the
    ``state_dict``, so :func:`model_size_bytes` counts the int8 weights only.

    Build it with :meth:`from_float` (``torch.ao.quantization.quantize_dynamic`` calls it through
    :func:`quantize_dynamic_int8`).

    ``forward(x (..., d_in) float32) -> (..., d_out) float32``.
    """

    def __init__(self, qlinear: nn.Module):
        super().__init__()
        self.qlinear = qlinear
        self.in_features, self.out_features = qlinear.in_features, qlinear.out_features
        self.weight = qlinear.weight().dequantize()   # a plain tensor attribute: not saved, not trained

    @classmethod
    def from_float(cls, mod: nn.Linear, use_precomputed_fake_quant: bool = False) -> Int8DynamicLinear:
        """Quantize ``mod`` (an ``nn.Linear``, float32) with PyTorch's default dynamic int8 configuration:
        symmetric per-tensor weights (:func:`quantize_symmetric`)."""
        from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear
        from torch.ao.quantization import default_dynamic_qconfig

        if not isinstance(mod, nn.Linear):
            raise TypeError(f"mod must be an nn.Linear, got {type(mod).__name__}")
        float_mod = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
        float_mod.load_state_dict({k: v.detach().float().cpu() for k, v in mod.state_dict().items()})
        float_mod.qconfig = getattr(mod, "qconfig", None) or default_dynamic_qconfig
        with _quiet_torch_ao():
            return cls(DynamicQuantizedLinear.from_float(float_mod))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.qlinear(x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype=torch.qint8"


def quantize_dynamic_int8(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (float32, on the CPU) with every ``nn.Linear`` replaced by an :class:`Int8DynamicLinear`:
    post-training dynamic quantization, by ``torch.ao.quantization.quantize_dynamic`` with PyTorch's default
    int8 configuration. Weights are stored in int8 (a quarter of float32's bytes); activations are quantized on
    the fly. Embeddings and LayerNorms stay float32. ``model`` itself is not changed.

    A GPT's output layer shares its weight with the token embedding; after quantization the embedding stays
    float32 and the output layer gets its own int8 copy.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``.
        ValueError: if it has parameters that are not float32 on the CPU (PyTorch's int8 kernels are CPU-only).

    Sources: Jacob et al. (2018); PyTorch's ``torch.ao.quantization.quantize_dynamic``.
    """
    from torch.ao.quantization import quantize_dynamic

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    for name, p in model.named_parameters():
        if p.dtype != torch.float32 or p.device.type != "cpu":
            raise ValueError(f"model: parameter {name} is {p.dtype} on {p.device}; dynamic int8 quantization needs "
                             f"float32 on the CPU (call model.float().cpu() first)")
    with _quiet_torch_ao():
        return quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8,
                                mapping={nn.Linear: Int8DynamicLinear})


def model_size_bytes(model: nn.Module) -> int:
    """The size in bytes of ``model``'s ``state_dict`` serialized by ``torch.save`` (what a checkpoint on disk takes):
    float32 parameters 4 bytes each, int8 weights 1 byte each plus their scales, shared tensors once, plus a few
    hundred bytes of pickle overhead per tensor."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    buffer = io.BytesIO()
    with _quiet_torch_ao():
        torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes
