"""Mixture of experts (chapter 14): a top-k router, the load-balancing loss, expert capacity with dropped tokens,
a feed-forward layer of experts, and a GPT whose feed-forward networks are mixtures of experts.

A mixture-of-experts (MoE) layer holds ``E`` feed-forward networks, the experts, and a router that sends each token
to ``k`` of them (``k = 1`` in the Switch Transformer, ``k = 2`` in GShard and Mixtral). The layer's parameters
grow with ``E``; the computation per token grows only with ``k``. Read top to bottom:

* :class:`TopKRouter` and :class:`RouterOutput`: the gate :math:`p(x) = \\mathrm{softmax}(W_g x)` and each
  token's ``k`` experts with their gate values (Shazeer et al. 2017, Eq. 3-5; Fedus et al. 2022, Eq. 1-2);
* :func:`load_balancing_loss`: the Switch Transformer's auxiliary loss :math:`E \\sum_i f_i P_i` (Fedus et al.,
  Eq. 4-6), which pushes router probability away from overloaded experts;
* :func:`expert_capacity` and :func:`dispatch`: each expert takes at most ``capacity`` tokens per batch; the
  assignments beyond it are **dropped** (the token skips the layer, and the residual connection carries it on);
* :class:`MoEFeedForward`: the layer, a drop-in replacement for :class:`tfcourse.models.gpt.MLP`;
* :func:`to_moe_`, :func:`moe_gpt`, :func:`moe_layers`, :func:`aux_loss`, :func:`parameter_counts`: an MoE GPT
  (every block's MLP replaced), its auxiliary loss after a forward pass, and its total and active parameters.

Shapes: ``N`` tokens (a batch ``(B, T, C)`` is flattened to ``N = B T`` tokens), ``C`` = ``d_model``, ``E`` experts,
``k`` experts per token.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import DtypeError, check_floating, check_positive_int as _positive_int, check_tensor
from .models.gpt import GPT, GPTConfig, MLP

__all__ = ["RouterOutput", "TopKRouter", "load_balancing_loss", "expert_capacity", "dispatch", "RoutingStats",
           "MoEFeedForward", "to_moe_", "moe_gpt", "moe_layers", "aux_loss", "parameter_counts"]


def _check_index(name: str, index: object, n_experts: int) -> torch.Tensor:
    check_tensor(name, index, ndim=2, shape_hint="(N, k) expert ids")
    if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        raise DtypeError(f"{name} must hold integer expert ids, got {index.dtype}")
    if index.numel() and (index.min() < 0 or index.max() >= n_experts):
        raise ValueError(f"{name}: expert ids must lie in [0, {n_experts}), got values from {int(index.min())} to "
                         f"{int(index.max())}")
    return index


# --------------------------------------------------------------------------------------------------------------
# The router
# --------------------------------------------------------------------------------------------------------------

class RouterOutput(NamedTuple):
    """What :class:`TopKRouter` computes for ``N`` tokens.

    Attributes:
        logits: ``(N, E)`` the router's scores :math:`W_g x`.
        probs: ``(N, E)`` :math:`p(x) = \\mathrm{softmax}(W_g x)` over **all** experts (what the balancing loss
            reads).
        expert_index: ``(N, k)`` int64, each token's experts, the most probable first.
        gates: ``(N, k)`` the weights of the experts' outputs: the probabilities themselves, or renormalised to
            sum to one over the ``k`` chosen experts.
    """

    logits: torch.Tensor
    probs: torch.Tensor
    expert_index: torch.Tensor
    gates: torch.Tensor


class TopKRouter(nn.Module):
    r"""A linear router that sends each token to its ``k`` most probable experts.

    .. math:: p(x) = \mathrm{softmax}(W_g x) \in \mathbb R^E, \qquad
              \mathcal T(x) = \text{the } k \text{ largest entries of } p(x), \qquad
              y = \sum_{i \in \mathcal T(x)} g_i(x)\, E_i(x)

    The gate values :math:`g_i` are either the probabilities :math:`p_i(x)` (the Switch Transformer, ``k = 1``:
    renormalising one probability would give the constant 1, and the router would get no gradient from the
    task loss), or the probabilities renormalised over the chosen experts,
    :math:`g_i = p_i / \sum_{j \in \mathcal T} p_j`, which equals Shazeer et al.'s softmax over the top-k logits
    (GShard and Mixtral do this with ``k = 2``).

    Args:
        d_model: the token width ``C``.
        n_experts: the number of experts ``E``.
        k: experts per token, ``1 <= k <= E``.
        renormalize: renormalise the gates over the ``k`` chosen experts; ``None`` (default): only if ``k > 1``.

    Parameters: ``gate`` (``nn.Linear(C, E, bias=False)``, :math:`W_g`), initialised normal with std 0.02 (a
    small initialisation keeps the first routing decisions near uniform; Fedus et al., Sec. 2.4).

    ``forward(x (..., C)) -> RouterOutput`` for the ``N`` tokens of ``x`` flattened. Ties go to the lower expert id
    (``torch.topk``). Shazeer et al. also add trained Gaussian noise to the logits ("noisy top-k gating") and the
    Switch Transformer multiplies the inputs by uniform noise in training; neither is used here.

    Raises:
        ValueError: for non-positive sizes, ``k > n_experts``, or an input whose last dimension is not ``C``;
            :class:`~tfcourse._checks.DtypeError` for a non-floating input.

    Sources: Shazeer et al. (2017), Sec. 2.1, Eq. 3-5 (the sparsely-gated MoE layer, top-k gating); Fedus et al.
    (2022), Sec. 2.1, Eq. 1-2 (the Switch Transformer's top-1 routing, gate value :math:`p_i(x)`); Lepikhin et al.
    (2021) (GShard, top-2).
    """

    def __init__(self, d_model: int, n_experts: int, k: int = 1, renormalize: bool | None = None):
        super().__init__()
        _positive_int("d_model", d_model)
        _positive_int("n_experts", n_experts)
        _positive_int("k", k)
        if k > n_experts:
            raise ValueError(f"k must be at most n_experts={n_experts}, got {k}")
        self.d_model, self.n_experts, self.k = d_model, n_experts, k
        self.renormalize = k > 1 if renormalize is None else bool(renormalize)
        self.gate = nn.Linear(d_model, n_experts, bias=False)
        nn.init.normal_(self.gate.weight, mean=0.0, std=0.02)

    def forward(self, x: torch.Tensor) -> RouterOutput:
        check_tensor("x", x, min_ndim=1, shape_hint="(..., d_model)")
        check_floating("x", x)
        if x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape (..., d_model) = (..., {self.d_model}), got {tuple(x.shape)}")
        logits = self.gate(x.reshape(-1, self.d_model))                     # (N, E)
        probs = logits.softmax(dim=-1)                                      # (N, E)
        top_probs, expert_index = probs.topk(self.k, dim=-1)                # (N, k), (N, k)
        gates = top_probs / top_probs.sum(-1, keepdim=True) if self.renormalize else top_probs
        return RouterOutput(logits, probs, expert_index, gates)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, n_experts={self.n_experts}, k={self.k}, renormalize={self.renormalize}"


# --------------------------------------------------------------------------------------------------------------
# The load-balancing loss
# --------------------------------------------------------------------------------------------------------------

def load_balancing_loss(probs: torch.Tensor, expert_index: torch.Tensor) -> torch.Tensor:
    r"""The auxiliary load-balancing loss of the Switch Transformer, without its weight :math:`\alpha`:

    .. math:: \ell_\text{aux} = E \sum_{i=1}^{E} f_i\, P_i, \qquad
              f_i = \frac{1}{kN} \sum_{x} \#\{\, i \in \mathcal T(x) \,\}, \qquad
              P_i = \frac{1}{N} \sum_x p_i(x)

    :math:`f_i` is the fraction of the ``kN`` assignments sent to expert ``i`` (counted before any capacity drops
    them; a count, so it has no gradient), :math:`P_i` the mean router probability of expert ``i`` (differentiable).
    Its gradient :math:`\partial \ell / \partial P_i = E f_i` lowers the probability of the experts that receive
    the most tokens. Train with ``task_loss + alpha * load_balancing_loss(...)``, ``alpha = 0.01`` (Fedus et al.).

    **Its value.** It is ``1`` when both the load and the probabilities are uniform (:math:`f_i = P_i = 1/E`).
    When the probabilities agree with the load (:math:`P = f`, as for a confident router whose probabilities are
    close to one-hot) it is :math:`E \sum_i f_i^2 \ge 1`, with equality only at the uniform load (Cauchy-Schwarz):
    then any imbalance costs. It is **not** a lower bound in general: a router whose probabilities sit on an expert
    it does not choose can score below 1 (the tests show one); what makes it work in training is the direction of
    its gradient.

    Args:
        probs: ``(N, E)`` router probabilities (rows sum to one).
        expert_index: ``(N, k)`` the chosen experts.

    Returns:
        A scalar with the dtype of ``probs``.

    Raises:
        ValueError: for tensors of the wrong rank or mismatched ``N``, expert ids outside ``[0, E)``, or no tokens.

    Source: Fedus et al. (2022), Sec. 2.2, Eq. 4-6 (there for ``k = 1``; for ``k > 1`` the fractions count all ``kN``
    assignments, as in GShard's and Mixtral's implementations).
    """
    check_tensor("probs", probs, ndim=2, shape_hint="(N, E)")
    check_floating("probs", probs)
    N, E = probs.shape
    _check_index("expert_index", expert_index, E)
    if expert_index.shape[0] != N:
        raise ValueError(f"expert_index must have N={N} rows like probs, got shape {tuple(expert_index.shape)}")
    if N == 0:
        raise ValueError("probs: need at least one token")
    k = expert_index.shape[1]
    f = torch.bincount(expert_index.flatten(), minlength=E).to(probs.dtype) / (k * N)   # (E,): no gradient
    P = probs.mean(dim=0)                                                                 # (E,)
    return E * (f * P).sum()


# --------------------------------------------------------------------------------------------------------------
# Capacity and dispatch
# --------------------------------------------------------------------------------------------------------------

def expert_capacity(n_tokens: int, n_experts: int, capacity_factor: float, k: int = 1) -> int:
    r"""The number of token slots of each expert: :math:`\lceil \text{capacity factor} \cdot kN / E \rceil`.

    With a capacity factor of 1 an expert can take exactly its share of the ``kN`` assignments if routing were
    perfectly even; 1.25 leaves 25% slack (Fedus et al., Sec. 2.2 and Table 1, use 1.0 to 2.0). Capacity keeps
    the experts' tensors of a fixed shape, which accelerators need; a token routed to a full expert is dropped.

    Raises:
        ValueError: for non-positive ``n_tokens``, ``n_experts``, ``k`` or ``capacity_factor``.

    Source: Fedus et al. (2022), Sec. 2.2, Eq. 3 (expert capacity = tokens per batch / experts x capacity factor).
    """
    _positive_int("n_tokens", n_tokens)
    _positive_int("n_experts", n_experts)
    _positive_int("k", k)
    if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, (int, float)) or not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be a positive number, got {capacity_factor!r}")
    return max(1, math.ceil(capacity_factor * k * n_tokens / n_experts))


def dispatch(expert_index: torch.Tensor, n_experts: int, capacity: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Which assignments fit in their expert's ``capacity`` slots, and the slot each one takes.

    Assignments are served first come, first served: every token's first choice, in token order, then every
    token's second choice, and so on (GShard's priority of the first expert over the second). Assignment
    ``(n, j)`` takes slot ``s`` = the number of earlier assignments to the same expert, and is kept if
    ``s < capacity``; so for each expert exactly ``max(0, count - capacity)`` assignments, the last to arrive,
    are dropped.

    Args:
        expert_index: ``(N, k)`` int64 expert ids in ``[0, n_experts)``.
        n_experts: ``E``.
        capacity: slots per expert (:func:`expert_capacity`), or ``None`` for no limit (nothing dropped).

    Returns:
        ``keep`` ``(N, k)`` bool (``True`` = the expert processes this token) and ``slot`` ``(N, k)`` int64.

    Raises:
        ValueError: for a bad ``expert_index`` or a non-positive ``capacity``.

    Sources: Fedus et al. (2022), Sec. 2.2 and Fig. 3 (capacity and dropped tokens); Lepikhin et al. (2021),
    Algorithm 1 (the position of a token in its expert's buffer by a cumulative sum).
    """
    _positive_int("n_experts", n_experts)
    _check_index("expert_index", expert_index, n_experts)
    if capacity is not None:
        _positive_int("capacity", capacity)
    N, k = expert_index.shape
    one_hot = F.one_hot(expert_index.T.reshape(-1), n_experts)            # (k N, E): choice-major order
    slot = ((one_hot.cumsum(dim=0) - 1) * one_hot).sum(dim=-1)           # (k N,): earlier arrivals at the expert
    slot = slot.view(k, N).T                                              # (N, k)
    keep = torch.ones_like(slot, dtype=torch.bool) if capacity is None else slot < capacity
    return keep, slot


# --------------------------------------------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------------------------------------------

class RoutingStats(NamedTuple):
    """What one forward pass of :class:`MoEFeedForward` routed (kept on the layer as ``last_stats``).

    Attributes:
        aux_loss: the scalar :func:`load_balancing_loss` (with its gradient, for the training loss).
        load: ``(E,)`` the fraction of the ``kN`` assignments each expert was sent (before capacity), detached.
        dropped: the fraction of assignments dropped by the capacity limit (a float).
        capacity: the slots per expert, or ``None`` without a limit.
    """

    aux_loss: torch.Tensor
    load: torch.Tensor
    dropped: float
    capacity: int | None


class MoEFeedForward(nn.Module):
    r"""A mixture-of-experts feed-forward layer: ``E`` copies of GPT's MLP and a top-k router.

    .. math:: y(x) = \sum_{i \in \mathcal T(x),\ \text{kept}} g_i(x)\, \mathrm{MLP}_i(x)

    Each token is processed by its ``k`` experts only; an assignment dropped for lack of capacity contributes
    nothing (with ``k = 1`` a dropped token's output is zero, and the block's residual connection passes it on
    unchanged, as in the Switch Transformer). With one expert and ``k = 1`` the gate is exactly 1 and the layer is
    its expert, the dense MLP.

    Args:
        d_model: token width ``C``.
        d_ff: hidden width of each expert.
        n_experts: ``E``.
        k: experts per token.
        capacity_factor: ``None`` (default): no capacity limit; else each expert takes
            :func:`expert_capacity` ``(N, E, capacity_factor, k)`` tokens of a forward pass of ``N`` tokens.
        activation, bias: of the experts (:class:`tfcourse.models.gpt.MLP`).
        renormalize: of the router (:class:`TopKRouter`).

    Submodules: ``router`` (:class:`TopKRouter`), ``experts`` (``nn.ModuleList`` of :class:`~tfcourse.models.gpt.MLP`).

    ``forward(x (..., C)) -> (..., C)``, the same dtype. After each call ``last_stats`` holds the
    :class:`RoutingStats` of that call (its ``aux_loss`` keeps the graph, for the training loss).

    Raises:
        ValueError: as :class:`TopKRouter` and :func:`expert_capacity`, and for a bad input.

    Sources: Shazeer et al. (2017), Sec. 2 and Fig. 1; Fedus et al. (2022), Sec. 2 and Fig. 2 (the Switch layer
    replacing the dense FFN of every other block; here every block's, as in Mixtral, Jiang et al. 2024).
    """

    def __init__(self, d_model: int, d_ff: int, n_experts: int, k: int = 1, capacity_factor: float | None = None,
                 activation: str = "gelu_tanh", bias: bool = True, renormalize: bool | None = None):
        super().__init__()
        _positive_int("d_ff", d_ff)
        if capacity_factor is not None:
            expert_capacity(1, 1, capacity_factor)  # checks it
        self.d_model, self.d_ff, self.n_experts, self.k = d_model, d_ff, n_experts, k
        self.capacity_factor = capacity_factor
        self.router = TopKRouter(d_model, n_experts, k, renormalize)
        self.experts = nn.ModuleList(MLP(d_model, d_ff, activation, bias) for _ in range(n_experts))
        self.last_stats: RoutingStats | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        route = self.router(x)                                              # checks x
        tokens = x.reshape(-1, self.d_model)                                # (N, C)
        N = tokens.shape[0]
        capacity = None if self.capacity_factor is None or N == 0 else \
            expert_capacity(N, self.n_experts, self.capacity_factor, self.k)
        keep, _ = dispatch(route.expert_index, self.n_experts, capacity)  # (N, k)
        out = torch.zeros_like(tokens)                                      # (N, C)
        for e, expert in enumerate(self.experts):
            token, choice = ((route.expert_index == e) & keep).nonzero(as_tuple=True)  # (n_e,), (n_e,)
            if token.numel():
                y = expert(tokens[token])                                   # (n_e, C)
                out.index_add_(0, token, y * route.gates[token, choice, None])
        load = torch.bincount(route.expert_index.flatten(), minlength=self.n_experts).float() / max(1, keep.numel())
        self.last_stats = RoutingStats(
            aux_loss=load_balancing_loss(route.probs, route.expert_index) if N else tokens.new_zeros(()),
            load=load, dropped=float((~keep).float().mean()) if N else 0.0, capacity=capacity)
        return out.view_as(x)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_ff={self.d_ff}, n_experts={self.n_experts}, k={self.k}, "
                f"capacity_factor={self.capacity_factor}")


# --------------------------------------------------------------------------------------------------------------
# An MoE GPT
# --------------------------------------------------------------------------------------------------------------

def _check_gpt(gpt: object) -> GPT:
    if not isinstance(gpt, GPT):
        raise TypeError(f"gpt must be a tfcourse GPT, got {type(gpt).__name__}")
    return gpt


@torch.no_grad()
def to_moe_(gpt: GPT, n_experts: int, k: int = 1, capacity_factor: float | None = None, *, d_ff: int | None = None,
            upcycle: bool = False, renormalize: bool | None = None) -> GPT:
    """Replace the MLP of every block of ``gpt`` by a :class:`MoEFeedForward` of ``n_experts`` experts (in place;
    returns ``gpt``).

    Each expert has hidden width ``d_ff`` (default: the dense MLP's, ``config.hidden``). With ``k`` experts of width
    ``config.hidden / k`` per token ("fine-grained" experts, as in DeepSeekMoE, Dai et al. 2024) the MoE GPT has the
    active parameters of the dense one for any ``k``.

    With ``upcycle=False`` the experts get GPT-2's initialisation (normal, std 0.02; the output projection
    ``0.02 / sqrt(2 L)``), like a freshly built GPT. With ``upcycle=True`` every expert starts as a copy of the
    block's trained MLP ("sparse upcycling", Komatsuzaki et al. 2023; it needs ``d_ff == config.hidden``): the
    model then computes what the dense model computes, up to the gate values. The per-token computation of the FFN
    is that of ``k`` experts: with ``k = 1`` and the default width the MoE GPT has the **active** parameters of the
    dense one (plus the tiny routers, ``C E`` weights per block).

    Raises:
        TypeError: if ``gpt`` is not a :class:`~tfcourse.models.gpt.GPT`.
        ValueError: as :class:`MoEFeedForward`, and for ``upcycle`` with another ``d_ff``.
    """
    _check_gpt(gpt)
    config = gpt.config
    d_ff = config.hidden if d_ff is None else d_ff
    if upcycle and d_ff != config.hidden:
        raise ValueError(f"d_ff: upcycling copies the dense MLP, so d_ff must be config.hidden={config.hidden}, "
                         f"got {d_ff}")
    weight = gpt.wte.weight
    for block in gpt.h:
        dense = block.mlp
        moe = MoEFeedForward(config.n_embd, d_ff, n_experts, k, capacity_factor, config.activation,
                             config.bias, renormalize).to(weight.device, weight.dtype)
        for expert in moe.experts:
            if upcycle:
                expert.load_state_dict(dense.state_dict())
                continue
            nn.init.normal_(expert.linear1.weight, mean=0.0, std=0.02)
            nn.init.normal_(expert.linear2.weight, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
            for linear in (expert.linear1, expert.linear2):
                if linear.bias is not None:
                    nn.init.zeros_(linear.bias)
        block.mlp = moe
    return gpt


def moe_gpt(config: GPTConfig, n_experts: int, k: int = 1, capacity_factor: float | None = None, *,
            d_ff: int | None = None, renormalize: bool | None = None) -> GPT:
    """A new :class:`~tfcourse.models.gpt.GPT` of ``config`` whose blocks have :class:`MoEFeedForward` layers
    (:func:`to_moe_` with GPT-2's initialisation). Train it with ``lm_loss + alpha * aux_loss(model)``.

    Raises:
        TypeError, ValueError: as :class:`~tfcourse.models.gpt.GPT` and :func:`to_moe_`.
    """
    return to_moe_(GPT(config), n_experts, k, capacity_factor, d_ff=d_ff, renormalize=renormalize)


def moe_layers(model: nn.Module) -> list[MoEFeedForward]:
    """The :class:`MoEFeedForward` layers of ``model``, in the order of ``model.modules()``."""
    return [m for m in model.modules() if isinstance(m, MoEFeedForward)]


def aux_loss(model: nn.Module) -> torch.Tensor:
    """The sum over the MoE layers of ``model`` of the load-balancing loss of their last forward pass (with its
    gradient); divide by ``len(moe_layers(model))`` for the mean.

    Raises:
        ValueError: if ``model`` has no MoE layer, or one has not run a forward pass yet.
    """
    layers = moe_layers(model)
    if not layers:
        raise ValueError("model has no MoEFeedForward layer")
    if any(layer.last_stats is None for layer in layers):
        raise ValueError("run a forward pass first: an MoE layer has no routing statistics yet")
    return torch.stack([layer.last_stats.aux_loss for layer in layers]).sum()


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """``(total, active)`` parameters of ``model``: every parameter (shared ones once), and those one token uses,
    that is, all of them except, in each MoE layer, the ``E - k`` experts it does not visit.

    A dense model has ``active == total``. The router's ``C E`` weights per layer count as active.
    """
    total = sum(p.numel() for p in model.parameters())
    unused = 0
    for layer in moe_layers(model):
        per_expert = sum(p.numel() for p in layer.experts[0].parameters())
        unused += (layer.n_experts - layer.k) * per_expert
    return total, total - unused
