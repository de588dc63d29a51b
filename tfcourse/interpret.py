"""Interpretability (chapter 15): what attention weights show, and tools to test what they do.

Reading attention

* :func:`attention_modules`, :func:`record_attention`: find every :class:`tfcourse.attention.MultiHeadAttention` of
  a model (BERT, GPT, the Transformer) and record the per-head weights ``(B, n_heads, Tq, Tk)`` of each call, without
  changing the model's code or outputs.
* :func:`attention_entropy`: the entropy of each row, in nats (0 for one-hot, ``log Tk`` for uniform).
* :func:`attention_rollout` and :func:`attention_flow`: Abnar and Zuidema (2020): how much each input token reaches
  each position after several layers, with the residual connection counted, by matrix products (rollout) or as a
  maximum flow in the graph of the layers (flow).
* :func:`prefix_matching_score`: the induction-head score of Olsson et al. (2022).
* :func:`alignment_error`: how often the largest weight of a cross-attention row misses the gold alignment.

Testing what attention does

* :func:`ablate_heads`, :func:`head_ablation`: switch heads off (or scale them by a gate, whose gradient is Michel
  et al.'s (2019) importance score) and measure a metric for each head ablated alone.
* :func:`gradient_x_input`, :func:`integrated_gradients`: gradient-based attributions (Sundararajan et al. 2017) to
  compare with attention, as Jain and Wallace (2019) did.
* :func:`linear_probe`: a logistic-regression probe on hidden states (scikit-learn), with the majority baseline.
* :func:`attention_kl`: the loss of attention supervision and of attention distillation.

Shapes: ``B`` batch, ``H`` heads, ``L`` layers, ``T`` (or ``Tq``, ``Tk``) positions. Attention weights are floating
tensors whose rows (the last dimension) are distributions over the keys, or all zeros for a query that may attend
to no key (what :func:`tfcourse.attention.masked_softmax` gives a fully masked row).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from ._checks import DtypeError, check_floating, check_int as _check_int, check_tensor
from .attention import MultiHeadAttention

__all__ = ["attention_modules", "AttentionRecord", "record_attention", "attention_entropy", "attention_rollout",
           "attention_flow", "ablate_heads", "HeadAblation", "head_ablation", "prefix_matching_score",
           "gradient_x_input", "integrated_gradients", "ProbeResult", "linear_probe", "AlignmentError",
           "alignment_error", "attention_kl"]

_ROW_TOLERANCE = 1e-3  # how far from 1 (or 0) a row of attention weights may sum (float16/bfloat16 rounding)


# --------------------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------------------

def _check_weights(name: str, weights: object, *, ndim: int | None = None, min_ndim: int = 2,
                   hint: str = "(..., Tq, Tk)", square: bool = False) -> torch.Tensor:
    """Attention weights: floating, finite, non-negative, every row summing to 1 or to 0 (a fully masked query)."""
    if ndim is not None:
        check_tensor(name, weights, ndim=ndim, shape_hint=hint)
    else:
        check_tensor(name, weights, min_ndim=min_ndim, shape_hint=hint)
    check_floating(name, weights)
    if square and weights.shape[-1] != weights.shape[-2]:
        raise ValueError(f"{name} must be square in its last two dimensions (T, T) {hint}, got {tuple(weights.shape)}")
    if weights.shape[-1] == 0:
        raise ValueError(f"{name} must have at least one key (Tk >= 1), got shape {tuple(weights.shape)}")
    w = weights.detach()
    if not torch.isfinite(w).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    if (w < 0).any():
        raise ValueError(f"{name} must be non-negative (softmax weights), got a minimum of {w.min().item():.3g}")
    sums = w.sum(dim=-1).double()
    ok = ((sums - 1).abs() <= _ROW_TOLERANCE) | (sums.abs() <= _ROW_TOLERANCE)
    if not ok.all():
        bad = sums[~ok][0].item()
        raise ValueError(f"every row of {name} must sum to 1 (or to 0 for a query that attends to nothing), "
                         f"found a row summing to {bad:.4g}: pass softmax weights, not scores")
    return weights


def _check_fraction(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


# --------------------------------------------------------------------------------------------------------------
# Recording attention
# --------------------------------------------------------------------------------------------------------------

def attention_modules(model: nn.Module) -> list[tuple[str, MultiHeadAttention]]:
    """Every :class:`tfcourse.attention.MultiHeadAttention` inside ``model`` (``model`` itself included), as
    ``(name, module)`` pairs in the order of ``model.named_modules()`` (the order of definition: for
    :class:`tfcourse.models.BERT` and :class:`tfcourse.models.GPT` the layer order; for the Transformer's decoder
    layers ``self_attn`` before ``cross_attn``).

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MultiHeadAttention)]


class AttentionRecord:
    """What :func:`record_attention` collects: one entry per call of a recorded attention module, in call order.

    Attributes:
        names: the module name of each call (a shared layer, as in ALBERT, appears once per use).
        weights: the per-head weights of each call, ``(B, n_heads, Tq, Tk)``, before dropout.
    """

    def __init__(self) -> None:
        self.names: list[str] = []
        self.weights: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self.weights)

    def __repr__(self) -> str:
        shapes = sorted({tuple(w.shape) for w in self.weights})
        return f"AttentionRecord({len(self)} calls, shapes {shapes})"

    def stack(self) -> torch.Tensor:
        """All calls stacked: ``(n_calls, B, n_heads, Tq, Tk)`` (for a BERT or a GPT, ``(L, B, H, T, T)``).

        Raises:
            ValueError: if nothing was recorded or the calls' shapes differ (record fewer modules).
        """
        if not self.weights:
            raise ValueError("no attention was recorded: run the model inside `with record_attention(model)`")
        shapes = {tuple(w.shape) for w in self.weights}
        if len(shapes) > 1:
            raise ValueError(f"the recorded weights have different shapes {sorted(shapes)}: pass `modules=` to "
                             "record_attention to record one kind of attention (e.g. only the cross-attention)")
        return torch.stack(self.weights)

    def clear(self) -> None:
        """Forget everything recorded so far (to reuse the record for another batch)."""
        self.names.clear()
        self.weights.clear()


_MHA_ARGS = ("query", "key", "value", "key_padding_mask", "attn_mask", "is_causal", "need_weights",
             "average_attn_weights", "kv_cache")


@contextmanager
def record_attention(model: nn.Module, modules: Iterable[nn.Module] | None = None,
                     detach: bool = True) -> Iterator[AttentionRecord]:
    """Record the per-head attention weights of every call of the attention modules of ``model``.

    Inside the ``with`` block, each :class:`~tfcourse.attention.MultiHeadAttention` computes its weights as usual and
    also appends them, per head, ``(B, n_heads, Tq, Tk)`` (before dropout), to the :class:`AttentionRecord` the
    block yields. The model's outputs are unchanged (a caller that asked for weights still gets them in the form it
    asked for), and the hooks are removed on exit, also after an error. This is how this package reads the
    attention of :class:`~tfcourse.models.BERT` (Hugging Face's ``output_attentions``), of
    :class:`~tfcourse.models.GPT` and of the Transformer's self- and cross-attention.

    Args:
        model: any module.
        modules: the attention modules to record (default: all of :func:`attention_modules`), e.g.
            ``[layer.cross_attn for layer in model.transformer.decoder_layers]``.
        detach: store detached weights (default). ``False`` keeps them in the autograd graph, for a loss on the
            attention (:func:`attention_kl`).

    Example::

        with record_attention(bert) as record:
            bert(input_ids)
        weights = record.stack()    # (L, B, H, T, T)

    Raises:
        TypeError: if ``model`` is not a module, or ``modules`` holds something other than ``MultiHeadAttention``.
        ValueError: if there is no attention module to record.
    """
    named = attention_modules(model)
    if modules is not None:
        modules = list(modules)
        for m in modules:
            if not isinstance(m, MultiHeadAttention):
                raise TypeError(f"modules must hold tfcourse.attention.MultiHeadAttention modules, got "
                                f"{type(m).__name__}")
        names = {id(m): name for name, m in named}
        named = [(names.get(id(m), f"modules[{i}]"), m) for i, m in enumerate(modules)]
    if not named:
        raise ValueError(f"{type(model).__name__} has no tfcourse.attention.MultiHeadAttention to record")
    record = AttentionRecord()
    handles = []
    for name, module in named:
        requested: list[tuple[bool, bool]] = []  # what each pending call asked for (calls may nest: a stack)

        def before(mod, args, kwargs, requested=requested):
            kwargs = dict(kwargs)
            for arg_name, value in zip(_MHA_ARGS[3:], args[3:]):  # arguments after query, key, value, by name
                kwargs[arg_name] = value
            requested.append((bool(kwargs.get("need_weights", False)), bool(kwargs.get("average_attn_weights", True))))
            kwargs.update(need_weights=True, average_attn_weights=False)
            return args[:3], kwargs

        def after(mod, args, kwargs, output, name=name, requested=requested):
            need, average = requested.pop()
            out, weights = output                                   # weights (B, nh, Tq, Tk)
            record.names.append(name)
            record.weights.append(weights.detach() if detach else weights)
            if not need:
                return out, None
            return out, (weights.mean(dim=1) if average else weights)

        handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(module.register_forward_hook(after, with_kwargs=True))
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()


# --------------------------------------------------------------------------------------------------------------
# Entropy, rollout and flow
# --------------------------------------------------------------------------------------------------------------

def attention_entropy(weights: torch.Tensor) -> torch.Tensor:
    r"""The entropy of each row of attention weights, in nats:

    .. math:: H(\boldsymbol\alpha_i) = -\sum_j \alpha_{ij} \log \alpha_{ij}, \qquad 0 \log 0 = 0 .

    It is 0 for a row that puts all its weight on one key and :math:`\log T_k` for the uniform row over
    :math:`T_k` keys (:math:`\log n` if only :math:`n` keys are allowed, e.g. with padding); an all-zero row (a
    query that may attend to nothing) gets 0, never NaN. Divide by :math:`\log n` for a value in :math:`[0, 1]`.

    Args:
        weights: ``(..., Tq, Tk)`` or ``(..., Tk)`` floating, rows of softmax weights.

    Returns:
        ``weights.shape[:-1]``, the entropy of each row, in the dtype of ``weights``.

    Raises:
        ValueError: (including :class:`~tfcourse._checks.DtypeError`) if ``weights`` is not floating, is negative,
            holds NaN, or has a row that sums to neither 1 nor 0.

    Source: Shannon (1948); used on attention heads by Clark et al. (2019), Sec. 3 and Fig. 4.
    """
    _check_weights("weights", weights, min_ndim=1, hint="(..., Tk)")
    terms = torch.where(weights > 0, weights * torch.log(weights.clamp_min(torch.finfo(weights.dtype).tiny)),
                        torch.zeros((), dtype=weights.dtype, device=weights.device))
    return -terms.sum(dim=-1)


def _as_layers(attentions: object, name: str = "attentions") -> torch.Tensor:
    """``(L, B, T, T)``, the head-averaged weights of each layer, from a stacked tensor or a sequence of layers."""
    if isinstance(attentions, torch.Tensor):
        if attentions.dim() == 5:
            layers = attentions.mean(dim=2)             # (L, B, H, T, T) -> (L, B, T, T)
        elif attentions.dim() == 4:
            layers = attentions
        else:
            raise ValueError(f"{name} as one tensor must be (L, B, H, T, T) or (L, B, T, T), got shape "
                             f"{tuple(attentions.shape)}")
    elif isinstance(attentions, Sequence) and not isinstance(attentions, str):
        if len(attentions) == 0:
            raise ValueError(f"{name} must hold at least one layer")
        fused = []
        for i, a in enumerate(attentions):
            check_tensor(f"{name}[{i}]", a, shape_hint="(B, H, T, T) or (B, T, T)")
            if a.dim() not in (3, 4):
                raise ValueError(f"{name}[{i}] must be (B, H, T, T) or (B, T, T), got shape {tuple(a.shape)}")
            fused.append(a.mean(dim=1) if a.dim() == 4 else a)
        shapes = {tuple(a.shape) for a in fused}
        if len(shapes) > 1:
            raise ValueError(f"the layers of {name} must have the same (B, T, T), got {sorted(shapes)}")
        layers = torch.stack(fused)
    else:
        raise TypeError(f"{name} must be a tensor (L, B, H, T, T) or a sequence of (B, H, T, T) tensors, got "
                        f"{type(attentions).__name__}")
    _check_weights(name, layers, ndim=4, hint="(L, B, T, T) after averaging the heads", square=True)
    return layers


def _with_residual(layers: torch.Tensor, residual_weight: float) -> torch.Tensor:
    r"""Abnar and Zuidema's :math:`\tilde A = (1 - r) A + r I`, rows renormalised (an all-zero row becomes the
    identity row)."""
    T = layers.shape[-1]
    eye = torch.eye(T, dtype=layers.dtype, device=layers.device)
    mixed = (1 - residual_weight) * layers + residual_weight * eye
    sums = mixed.sum(dim=-1, keepdim=True)
    return torch.where(sums > 0, mixed / sums.clamp_min(torch.finfo(layers.dtype).tiny), eye.expand_as(mixed))


def attention_rollout(attentions: torch.Tensor | Sequence[torch.Tensor],
                      residual_weight: float = 0.5) -> torch.Tensor:
    r"""Attention rollout (Abnar and Zuidema 2020, Eq. 1): how much of each input token reaches each position.

    Each layer's weights are averaged over the heads, the residual connection is added as an identity,
    :math:`\tilde A_l = (1 - r)\,A_l + r\,I` (rows renormalised), and the layers are multiplied:

    .. math:: \tilde{A}(l) = \tilde A_l\, \tilde A_{l-1} \cdots \tilde A_1 .

    Row ``i`` of :math:`\tilde{A}(l)` is a distribution over the input tokens: the share of each in position
    ``i`` after layer ``l``, if information mixed only linearly, in the proportions of the attention weights.
    (It ignores the values, the feed-forward networks and the norms: a model of the model, not a measurement.)

    Args:
        attentions: ``(L, B, H, T, T)`` or ``(L, B, T, T)`` (heads already combined), or a sequence of ``L``
            tensors ``(B, H, T, T)`` or ``(B, T, T)`` (Hugging Face's ``output_attentions``, or
            :meth:`AttentionRecord.stack`), layer 1 first.
        residual_weight: ``r`` in ``[0, 1]``; 0.5 as in the paper, 0 for the plain product of the weights.

    Returns:
        ``(L, B, T, T)``: entry ``[l]`` is the rollout through layers ``1 .. l + 1``; ``[-1]`` through all.

    Raises:
        ValueError: (or ``TypeError``) for weights that are not square rows of softmax weights, layers of different
            shapes, or a ``residual_weight`` outside ``[0, 1]``.

    Source: Abnar and Zuidema (2020), "Quantifying Attention Flow in Transformers", Sec. 3 (attention rollout).
    """
    r = _check_fraction("residual_weight", residual_weight)
    layers = _with_residual(_as_layers(attentions), r)    # (L, B, T, T)
    out, current = [], None
    for a in layers:
        current = a if current is None else a @ current   # (B, T, T)
        out.append(current)
    return torch.stack(out)


def _max_flow_networkx(capacity: np.ndarray, L: int, T: int, queries: Sequence[int]) -> np.ndarray:
    import networkx as nx

    graph = nx.DiGraph()
    for l in range(L):                                    # layer l + 1 reads the nodes of layer l
        for i in range(T):
            for j in range(T):
                if capacity[l, i, j] > 0:
                    graph.add_edge((l + 1, i), (l, j), capacity=float(capacity[l, i, j]))
    flows = np.zeros((len(queries), T))
    for a, i in enumerate(queries):
        for j in range(T):
            if (L, i) in graph and (0, j) in graph:
                flows[a, j] = nx.maximum_flow_value(graph, (L, i), (0, j))
    return flows


_SCIPY_UNITS = 2**24  # scipy's max-flow needs integer capacities: the weights in units of 2^-24


def _max_flow_scipy(capacity: np.ndarray, L: int, T: int, queries: Sequence[int]) -> np.ndarray:
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import maximum_flow

    rows, cols, caps = [], [], []
    for l in range(L):
        units = np.rint(capacity[l] * _SCIPY_UNITS).astype(np.int64)
        i, j = np.nonzero(units)
        rows.append((l + 1) * T + i)                      # node of (layer, token) = layer * T + token
        cols.append(l * T + j)
        caps.append(units[i, j])
    n = (L + 1) * T
    graph = csr_matrix((np.concatenate(caps).astype(np.int32), (np.concatenate(rows), np.concatenate(cols))),
                       shape=(n, n))
    flows = np.zeros((len(queries), T))
    for a, i in enumerate(queries):
        for j in range(T):
            flows[a, j] = maximum_flow(graph, L * T + i, j).flow_value / _SCIPY_UNITS
    return flows


def attention_flow(attentions: torch.Tensor | Sequence[torch.Tensor], residual_weight: float = 0.5,
                   queries: Sequence[int] | None = None, backend: str = "scipy") -> torch.Tensor:
    r"""Attention flow (Abnar and Zuidema 2020): the maximum flow from each output position to each input token.

    The layers form a directed graph with a node per (layer, position), ``L + 1`` rows of ``T`` nodes; node
    ``(l, i)`` has an edge to ``(l - 1, j)`` of capacity :math:`\tilde A_l[i, j]`, the head-averaged weights with the
    residual identity added as in :func:`attention_rollout`. The attention flow from output ``i`` to input ``j`` is
    the value of a maximum flow from ``(L, i)`` to ``(0, j)``. Unlike rollout, which multiplies weights along every
    path and adds the paths, flow is limited by each path's narrowest edge and by edges that paths share. The values
    are not a distribution (a row may sum to more than 1).

    Args:
        attentions: as :func:`attention_rollout`.
        residual_weight: ``r`` in ``[0, 1]`` (0.5 as in the paper).
        queries: the output positions to compute (default all ``T``): each costs ``T`` maximum-flow problems.
        backend: ``"scipy"`` (default: ``scipy.sparse.csgraph.maximum_flow``, compiled; it needs integer
            capacities, so the weights are rounded to multiples of :math:`2^{-24}` and the flows agree with exact
            ones to about :math:`L T \cdot 2^{-25}`) or ``"networkx"`` (``nx.maximum_flow_value``, preflow-push on
            floating-point capacities, pure Python: about 30 times slower, over a second for one 13-token sentence
            through 6 layers; the tests use it as the reference).

    Returns:
        ``(B, len(queries), T)`` float64: entry ``[b, a, j]`` is the flow from output ``queries[a]`` to input ``j``.

    Raises:
        ValueError: as :func:`attention_rollout`; for queries outside ``[0, T)`` or an unknown backend.

    Source: Abnar and Zuidema (2020), Sec. 3 (attention flow, Fig. 2).
    """
    r = _check_fraction("residual_weight", residual_weight)
    layers = _with_residual(_as_layers(attentions), r)    # (L, B, T, T)
    L, B, T, _ = layers.shape
    if queries is None:
        queries = list(range(T))
    queries = list(queries)
    if not queries or any(isinstance(q, bool) or not isinstance(q, (int, np.integer)) or not 0 <= q < T
                          for q in queries):
        raise ValueError(f"queries must be a non-empty sequence of positions in [0, {T}), got {queries}")
    solvers = {"networkx": _max_flow_networkx, "scipy": _max_flow_scipy}
    if backend not in solvers:
        raise ValueError(f"backend must be 'scipy' or 'networkx', got {backend!r}")
    capacity = layers.detach().double().cpu().numpy()
    flows = [solvers[backend](capacity[:, b], L, T, queries) for b in range(B)]
    return torch.from_numpy(np.stack(flows))


# --------------------------------------------------------------------------------------------------------------
# Head ablation
# --------------------------------------------------------------------------------------------------------------

def _check_modules(modules: object) -> list[MultiHeadAttention]:
    if isinstance(modules, MultiHeadAttention):
        modules = [modules]
    if not isinstance(modules, Iterable):
        raise TypeError(f"modules must be a sequence of MultiHeadAttention modules, got {type(modules).__name__}")
    modules = list(modules)
    if not modules:
        raise ValueError("modules must hold at least one MultiHeadAttention")
    for i, m in enumerate(modules):
        if not isinstance(m, MultiHeadAttention):
            raise TypeError(f"modules[{i}] must be a tfcourse.attention.MultiHeadAttention, got {type(m).__name__}")
    if len({m.n_heads for m in modules}) > 1:
        raise ValueError(f"the modules must have the same number of heads, got {[m.n_heads for m in modules]}")
    return modules


@contextmanager
def ablate_heads(modules: MultiHeadAttention | Sequence[MultiHeadAttention],
                 gates: torch.Tensor) -> Iterator[None]:
    r"""Scale the output of each attention head by a gate :math:`\xi_h` inside the ``with`` block.

    Multi-head attention is :math:`\sum_h \xi_h\, \mathrm{head}_h W^O_h + \mathbf b^O`, with :math:`W^O_h` the
    rows of :math:`W^O` that read head ``h`` (Michel et al. 2019, Eq. 2). A gate of 0 **ablates** the head (its
    contribution is removed; the output bias and the other heads are untouched), 1 keeps it. With gates that
    require grad, :math:`|\partial \mathcal L / \partial \xi_h|` at :math:`\xi = 1` is Michel et al.'s importance
    score (their Eq. 3). Implemented as a forward pre-hook on each module's ``W_o``, removed on exit.

    Args:
        modules: ``L`` attention modules with the same ``n_heads`` (e.g. ``[layer.self_attn for layer in
            bert.layers]``), or one module.
        gates: ``(L, n_heads)`` floating (or ``(n_heads,)`` for one module).

    Raises:
        TypeError: for modules that are not :class:`~tfcourse.attention.MultiHeadAttention`, or gates that are not a
            tensor.
        ValueError: (including :class:`~tfcourse._checks.DtypeError`) for gates of the wrong shape or dtype, or
            modules with different numbers of heads.

    Source: Michel, Levy and Neubig (2019), "Are Sixteen Heads Really Better than One?", Sec. 2 and 4.
    """
    single = isinstance(modules, MultiHeadAttention)
    modules = _check_modules(modules)
    H = modules[0].n_heads
    check_tensor("gates", gates, shape_hint=f"({len(modules)}, {H})")
    check_floating("gates", gates)
    expected = (H,) if single else (len(modules), H)
    if tuple(gates.shape) != expected:
        raise ValueError(f"gates must have shape {expected} (modules x n_heads), got {tuple(gates.shape)}")
    gates = gates.reshape(len(modules), H)
    handles = []

    for l, module in enumerate(modules):
        def scale(mod, args, l=l, d_head=module.d_head):
            (x,) = args                                   # (B, Tq, n_heads * d_head): the heads, concatenated
            g = gates[l].to(x.dtype).repeat_interleave(d_head)
            return (x * g,)

        handles.append(module.W_o.register_forward_pre_hook(scale))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class HeadAblation(NamedTuple):
    """What :func:`head_ablation` measures: ``baseline`` (the metric with every head) and ``ablated``
    ``(L, n_heads)`` (with that one head ablated); ``drop`` is ``baseline - ablated``."""

    baseline: float
    ablated: torch.Tensor

    @property
    def drop(self) -> torch.Tensor:
        return self.baseline - self.ablated


def head_ablation(modules: Sequence[MultiHeadAttention], evaluate: Callable[[], float]) -> HeadAblation:
    """Ablate each head alone and measure ``evaluate()``: Michel et al.'s (2019) per-head ablation (their Table 1).

    Args:
        modules: ``L`` attention modules with the same ``n_heads``.
        evaluate: a function of no arguments that runs the model and returns a number (an accuracy, a loss); it is
            called ``1 + L * n_heads`` times, first with every head, then with one head ablated at a time.

    Returns:
        :class:`HeadAblation` with the baseline and the ``(L, n_heads)`` float64 results.

    Raises:
        TypeError: as :func:`ablate_heads`, or if ``evaluate`` is not callable or returns something that is not a
            real number.

    Source: Michel, Levy and Neubig (2019), Sec. 3.1 ("Ablating one head").
    """
    modules = _check_modules(modules)
    if not callable(evaluate):
        raise TypeError(f"evaluate must be a function of no arguments, got {type(evaluate).__name__}")

    def run() -> float:
        value = evaluate()
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
            raise TypeError(f"evaluate() must return a number, got {type(value).__name__}")
        return float(value)

    L, H = len(modules), modules[0].n_heads
    baseline = run()
    ablated = torch.zeros(L, H, dtype=torch.float64)
    for l in range(L):
        for h in range(H):
            gates = torch.ones(L, H)
            gates[l, h] = 0.0
            with ablate_heads(modules, gates):
                ablated[l, h] = run()
    return HeadAblation(baseline, ablated)


# --------------------------------------------------------------------------------------------------------------
# Induction heads
# --------------------------------------------------------------------------------------------------------------

def prefix_matching_score(weights: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    r"""The prefix-matching score of Olsson et al. (2022): the attention a head pays to the token that *followed*
    an earlier occurrence of the current token.

    For query ``i``, the matching keys are the positions ``j < i`` with :math:`x_{j-1} = x_i` (the token before
    key ``j`` equals the current token). An induction head, reading "... A B ... A", attends from the second "A" to
    "B", to predict "B" next. The score of a head is the weight it puts on matching keys, summed per query and
    averaged over the queries that have at least one (on a random sequence repeated twice, the queries of the
    second copy). A head that does exactly this scores 1; a head that attends elsewhere scores 0.

    Args:
        weights: ``(B, H, T, T)`` or ``(B, T, T)`` attention weights (causal or not).
        tokens: ``(B, T)`` int64 token ids of the same sequences.

    Returns:
        ``(H,)`` (or a 0-d tensor for 3-D weights), float64, in ``[0, 1]``.

    Raises:
        ValueError: (or ``TypeError``) for weights that are not rows of softmax weights, tokens that are not
            ``(B, T)`` integers matching them, or sequences in which no query has a matching key.

    Source: Olsson et al. (2022), "In-context Learning and Induction Heads", Sec. 2 and the appendix on measuring
    prefix matching on repeated random tokens.
    """
    check_tensor("weights", weights, shape_hint="(B, H, T, T) or (B, T, T)")
    if weights.dim() not in (3, 4):
        raise ValueError(f"weights must be (B, H, T, T) or (B, T, T), got shape {tuple(weights.shape)}")
    _check_weights("weights", weights, hint="(B, H, T, T) or (B, T, T)", square=True)
    check_tensor("tokens", tokens, ndim=2, shape_hint="(B, T)")
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise DtypeError(f"tokens must be integer ids (B, T), got {tokens.dtype}")
    B, T = weights.shape[0], weights.shape[-1]
    if tuple(tokens.shape) != (B, T):
        raise ValueError(f"tokens must be (B, T) = {(B, T)} to match weights, got {tuple(tokens.shape)}")
    previous = torch.cat([tokens.new_full((B, 1), -1), tokens[:, :-1]], dim=1)      # x_{j-1}; none before j = 0
    match = (previous[:, None, :] == tokens[:, :, None])                            # (B, Tq, Tk): x_{j-1} = x_i
    match &= torch.ones(T, T, dtype=torch.bool, device=tokens.device).tril(-1)      # j < i
    match[:, :, 0] = False
    has = match.any(dim=-1)                                                         # (B, Tq)
    if not has.any():
        raise ValueError("no query has a matching key (x_{j-1} = x_i, j < i): use sequences with repeated tokens, "
                         "e.g. a random sequence repeated twice")
    w = weights.double() if weights.dim() == 4 else weights.double()[:, None]      # (B, H, Tq, Tk)
    mass = (w * match[:, None].double()).sum(dim=-1)                                # (B, H, Tq)
    score = (mass * has[:, None]).sum(dim=(0, 2)) / has.sum()                       # (H,)
    return score if weights.dim() == 4 else score[0]


# --------------------------------------------------------------------------------------------------------------
# Gradient-based attributions
# --------------------------------------------------------------------------------------------------------------

def _scalar_outputs(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    y = f(x)
    if not isinstance(y, torch.Tensor) or tuple(y.shape) != (x.shape[0],):
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"f must return one number per example, a tensor of shape ({x.shape[0]},), got {shape}")
    return y


def gradient_x_input(f: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
    r"""Gradient times input: :math:`x \odot \partial f(x) / \partial x`, the first-order share of each input
    element in :math:`f(x)`.

    Args:
        f: maps ``inputs`` ``(B, ...)`` to one number per example ``(B,)`` (e.g. the logit of the predicted class,
            from the input embeddings). Examples must not interact (no batch norm in training mode).
        inputs: ``(B, ...)`` floating, e.g. embeddings ``(B, T, d)``; not modified.

    Returns:
        A tensor of the shape of ``inputs``; sum over the last dimension for one score per token ``(B, T)``.

    Raises:
        ValueError: (or ``TypeError``) if ``inputs`` is not a floating tensor or ``f`` does not return ``(B,)``.

    Source: Shrikumar et al. (2017); Simonyan et al. (2014) for the gradient (saliency) itself. Compared with
    attention by Jain and Wallace (2019), Sec. 4.1.
    """
    check_tensor("inputs", inputs, min_ndim=1, shape_hint="(B, ...)")
    check_floating("inputs", inputs)
    x = inputs.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(_scalar_outputs(f, x).sum(), x)
    return (grad * inputs.detach()).detach()


def integrated_gradients(f: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor,
                         baseline: torch.Tensor | None = None, steps: int = 32) -> torch.Tensor:
    r"""Integrated gradients (Sundararajan et al. 2017, Eq. 1), by the trapezoidal rule with ``steps`` intervals:

    .. math:: \mathrm{IG}_k(x) = (x_k - x'_k) \int_0^1 \frac{\partial f(x' + \alpha (x - x'))}{\partial x_k}\,d\alpha .

    The attributions satisfy **completeness**: :math:`\sum_k \mathrm{IG}_k(x) = f(x) - f(x')`, up to the error of
    the quadrature (check it: the gap shrinks as ``steps`` grows).

    Args:
        f: as :func:`gradient_x_input`, one number per example.
        inputs: ``(B, ...)`` floating.
        baseline: ``x'`` of the shape of ``inputs`` (default zeros: for text, the all-zero embedding, as in the
            paper, Sec. 6.3).
        steps: the number of intervals ``m >= 1`` (``m + 1`` gradient evaluations).

    Returns:
        A tensor of the shape of ``inputs``; sum over the last dimension for one score per token.

    Raises:
        ValueError: (or ``TypeError``) for a bad ``inputs``, a ``baseline`` of another shape or dtype, ``steps < 1``,
            or an ``f`` that does not return ``(B,)``.

    Source: Sundararajan, Taly and Yan (2017), "Axiomatic Attribution for Deep Networks", Eq. 1-3 (they use a
    Riemann sum; the trapezoidal rule is more accurate for the same number of steps).
    """
    check_tensor("inputs", inputs, min_ndim=1, shape_hint="(B, ...)")
    check_floating("inputs", inputs)
    _check_int("steps", steps, 1)
    x = inputs.detach()
    if baseline is None:
        x0 = torch.zeros_like(x)
    else:
        check_tensor("baseline", baseline, shape_hint="the shape of inputs")
        check_floating("baseline", baseline, like=x, like_name="inputs")
        if baseline.shape != x.shape:
            raise ValueError(f"baseline must have the shape of inputs {tuple(x.shape)}, got {tuple(baseline.shape)}")
        x0 = baseline.detach()
    total = torch.zeros_like(x)
    for k in range(steps + 1):
        point = (x0 + (k / steps) * (x - x0)).requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(_scalar_outputs(f, point).sum(), point)
        total += grad * (0.5 if k in (0, steps) else 1.0)
    return ((x - x0) * total / steps).detach()


# --------------------------------------------------------------------------------------------------------------
# Probes
# --------------------------------------------------------------------------------------------------------------

class ProbeResult(NamedTuple):
    """A fitted probe: train and test accuracy, the accuracy of always predicting the most frequent training
    label (on the test set), and the fitted scikit-learn pipeline (``StandardScaler`` + ``LogisticRegression``)."""

    train_accuracy: float
    test_accuracy: float
    majority_accuracy: float
    classifier: object


def _as_2d(name: str, x: object) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    x = np.asarray(x, dtype=float)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D array (N, d) of features, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return x


def _as_labels(name: str, y: object, n: int) -> np.ndarray:
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().numpy()
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n:
        raise ValueError(f"{name} must be 1-D with one label per row of the features ({n}), got shape {y.shape}")
    return y


def linear_probe(train_features: torch.Tensor | np.ndarray, train_labels: torch.Tensor | np.ndarray | Sequence,
                 test_features: torch.Tensor | np.ndarray, test_labels: torch.Tensor | np.ndarray | Sequence,
                 C: float = 1.0, max_iter: int = 2000) -> ProbeResult:
    r"""Fit a linear probe, a multinomial logistic regression on standardised features, and score it.

    A probe asks whether a property is *linearly decodable* from a representation (Alain and Bengio 2017;
    Belinkov 2022). High accuracy says the information is there in a linear form, not that the model uses it; a
    probe can also learn the task itself from rich features, so compare with the majority baseline and with the
    same probe on a control (e.g. the input embeddings, or random labels: Hewitt and Liang 2019).

    Args:
        train_features, test_features: ``(N, d)`` and ``(M, d)`` real features (tensors or arrays).
        train_labels, test_labels: ``(N,)`` and ``(M,)`` labels (any hashable values), at least two classes in
            training.
        C: the inverse strength of the L2 penalty (scikit-learn's ``C``), positive.
        max_iter: the most iterations of the solver (lbfgs).

    Returns:
        :class:`ProbeResult`.

    Raises:
        ValueError: for features that are not finite 2-D arrays, feature widths that differ, labels of the wrong
            length, a single training class, or a non-positive ``C``.

    Source: Alain and Bengio (2017), "Understanding intermediate layers using linear classifier probes"; scikit-learn
    ``LogisticRegression``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    Xtr, Xte = _as_2d("train_features", train_features), _as_2d("test_features", test_features)
    if Xtr.shape[1] != Xte.shape[1]:
        raise ValueError(f"train_features and test_features must have the same width, got {Xtr.shape[1]} and "
                         f"{Xte.shape[1]}")
    ytr, yte = _as_labels("train_labels", train_labels, len(Xtr)), _as_labels("test_labels", test_labels, len(Xte))
    classes, counts = np.unique(ytr, return_counts=True)
    if len(classes) < 2:
        raise ValueError(f"train_labels must hold at least two classes, got only {classes.tolist()}")
    if isinstance(C, bool) or not isinstance(C, (int, float)) or not C > 0:
        raise ValueError(f"C must be a positive number, got {C!r}")
    _check_int("max_iter", max_iter, 1)
    classifier = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
    classifier.fit(Xtr, ytr)
    majority = classes[np.argmax(counts)]
    return ProbeResult(float(classifier.score(Xtr, ytr)), float(classifier.score(Xte, yte)),
                       float(np.mean(yte == majority)), classifier)


# --------------------------------------------------------------------------------------------------------------
# Cross-attention against a gold alignment, and attention as a training target
# --------------------------------------------------------------------------------------------------------------

class AlignmentError(NamedTuple):
    """``error``: the share of rows whose largest weight misses the gold alignment (equal to the alignment error
    rate of Och and Ney (2003) when every row has exactly one gold link); ``mass_off``: the mean attention weight
    outside the gold links; ``n_rows``: the number of rows counted."""

    error: float
    mass_off: float
    n_rows: int


def alignment_error(weights: torch.Tensor, gold: torch.Tensor) -> AlignmentError:
    r"""Compare attention rows with a gold alignment.

    Each row is a target token and its weights over the source tokens; ``gold`` marks the source tokens the target
    token translates. The **argmax alignment** links each target token to its most attended source token; the
    error is the share of rows where that link is not gold. Rows with no gold link (padding, ``<eos>``, a token
    with no counterpart) are left out.

    With one gold link per row (:math:`|S| = |A| = N`) the alignment error rate
    :math:`1 - \frac{2|A \cap S|}{|A| + |S|}` of Och and Ney (2003) equals this error.

    Args:
        weights: ``(..., S)`` attention rows (e.g. ``(B, T, S)``).
        gold: ``(..., S)`` bool, the same shape, ``True`` at the gold source tokens of each row.

    Returns:
        :class:`AlignmentError`.

    Raises:
        ValueError: (or ``TypeError``) for weights that are not rows of softmax weights, a ``gold`` of another
            shape or dtype, or no row with a gold link.

    Source: Och and Ney (2003), Sec. 6 (AER); applied to attention by Ghader and Monz (2017).
    """
    _check_weights("weights", weights, min_ndim=1, hint="(..., S)")
    check_tensor("gold", gold, shape_hint="(..., S) bool")
    if gold.dtype != torch.bool:
        raise DtypeError(f"gold must be a bool tensor (..., S), True at the gold links, got {gold.dtype}")
    if gold.shape != weights.shape:
        raise ValueError(f"gold must have the shape of weights {tuple(weights.shape)}, got {tuple(gold.shape)}")
    w, g = weights.detach().reshape(-1, weights.shape[-1]), gold.reshape(-1, gold.shape[-1])
    rows = g.any(dim=-1)
    if not rows.any():
        raise ValueError("gold has no row with a gold link: nothing to compare")
    w, g = w[rows], g[rows]
    hit = g.gather(1, w.argmax(dim=-1, keepdim=True))[:, 0]
    mass = (w.double() * g).sum(dim=-1)
    return AlignmentError(1.0 - hit.double().mean().item(), 1.0 - mass.mean().item(), int(rows.sum()))


def attention_kl(weights: torch.Tensor, target: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    r"""The mean KL divergence :math:`\mathrm{KL}(q_i \,\|\, \alpha_i) = \sum_j q_{ij} \log (q_{ij} / \alpha_{ij})` of
    attention rows :math:`\alpha_i` from target rows :math:`q_i`: the extra loss of **attention supervision** (the
    target is a gold alignment, normalised: Liu et al. 2016, Mi et al. 2016) and of **attention distillation** (the
    target is a teacher's attention: MiniLM, Wang et al. 2020, Eq. 4 for the last layer).

    Rows whose target is all zeros (padding, tokens with no gold link) are left out of the mean. ``eps`` keeps the
    log finite where the attention is exactly 0. Differentiable in ``weights``.

    Args:
        weights: ``(..., Tk)`` attention rows (softmax weights, e.g. recorded with ``detach=False``).
        target: ``(..., Tk)`` non-negative, each row summing to 1 or 0; of the shape of ``weights``.
        eps: a small positive number.

    Returns:
        A 0-d tensor (nats per row).

    Raises:
        ValueError: (or ``TypeError``) for rows that are not distributions, shapes that differ, or no row with a
            target.
    """
    _check_weights("weights", weights, min_ndim=1, hint="(..., Tk)")
    _check_weights("target", target, min_ndim=1, hint="(..., Tk)")
    if target.shape != weights.shape:
        raise ValueError(f"target must have the shape of weights {tuple(weights.shape)}, got {tuple(target.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    target = target.to(weights.dtype)
    rows = target.sum(dim=-1) > 0.5
    if not rows.any():
        raise ValueError("target has no row with a distribution: nothing to compare")
    q = target[rows]
    kl = (q * (torch.log(q.clamp_min(eps)) - torch.log(weights[rows].clamp_min(eps)))).sum(dim=-1)
    return kl.mean()
