"""tfcourse.moe: the top-k router, the load-balancing loss, capacity and dropped tokens, the MoE layer and GPT."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tfcourse._checks import DtypeError
from tfcourse.models import GPT, GPTConfig
from tfcourse.models.gpt import MLP
from tfcourse.moe import (MoEFeedForward, TopKRouter, aux_loss, dispatch, expert_capacity, load_balancing_loss,
                          moe_gpt, moe_layers, parameter_counts, to_moe_)

SMALL = dict(block_size=16, vocab_size=23, n_layer=2, n_head=2, n_embd=8)


def small_gpt(seed=0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**SMALL)).double().eval()


# ----------------------------------------------------------------------------------------------------------------
# The router
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 2, 3])
def test_router_shapes_and_gates(k):
    torch.manual_seed(0)
    router = TopKRouter(12, 5, k).double()
    x = torch.randn(3, 7, 12, dtype=torch.float64)
    out = router(x)
    assert out.logits.shape == out.probs.shape == (21, 5)
    assert out.expert_index.shape == out.gates.shape == (21, k)
    torch.testing.assert_close(out.probs, F.softmax(x.reshape(-1, 12) @ router.gate.weight.T, dim=-1))
    # the chosen experts are the k most probable, the first the most probable
    assert torch.equal(out.expert_index[:, 0], out.probs.argmax(-1))
    chosen = out.probs.gather(1, out.expert_index)
    others = out.probs.masked_fill(F.one_hot(out.expert_index, 5).sum(1).bool(), -1.0)
    assert (chosen.min(-1).values >= others.max(-1).values).all()
    if k == 1:  # Switch: the gate is the probability itself (renormalising would give 1 and no gradient)
        torch.testing.assert_close(out.gates, chosen)
    else:       # renormalised over the chosen experts = softmax over the top-k logits (Shazeer et al.)
        torch.testing.assert_close(out.gates, F.softmax(out.logits.gather(1, out.expert_index), dim=-1))


def test_top1_gate_carries_a_gradient_to_the_router():
    torch.manual_seed(1)
    layer = MoEFeedForward(6, 12, n_experts=3, k=1)
    layer(torch.randn(4, 5, 6)).pow(2).sum().backward()
    assert layer.router.gate.weight.grad is not None and layer.router.gate.weight.grad.abs().sum() > 0


def test_router_bad_inputs():
    with pytest.raises(ValueError, match="k must be at most"):
        TopKRouter(4, 2, k=3)
    with pytest.raises(ValueError, match="n_experts"):
        TopKRouter(4, 0)
    router = TopKRouter(4, 3)
    with pytest.raises(ValueError, match=r"\(\.\.\., d_model\)"):
        router(torch.randn(2, 5))
    with pytest.raises(DtypeError):
        router(torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(TypeError):
        router([[0.0] * 4])


# ----------------------------------------------------------------------------------------------------------------
# The load-balancing loss
# ----------------------------------------------------------------------------------------------------------------

def one_hot_routing(load: list[int], E: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities that are one-hot at each token's expert (a confident router), for the given counts."""
    index = torch.repeat_interleave(torch.arange(E), torch.tensor(load))[:, None]
    return F.one_hot(index[:, 0], E).double(), index


@pytest.mark.parametrize("E,k", [(4, 1), (8, 1), (4, 2)])
def test_loss_is_one_at_uniform_load_and_probabilities(E, k):
    N = 6 * E
    probs = torch.full((N, E), 1.0 / E, dtype=torch.float64)
    # every expert receives exactly kN / E assignments
    index = torch.stack([(torch.arange(N) + j) % E for j in range(k)], dim=1)
    assert torch.equal(torch.bincount(index.flatten(), minlength=E), torch.full((E,), k * N // E))
    assert load_balancing_loss(probs, index).item() == pytest.approx(1.0, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(load=st.lists(st.integers(0, 30), min_size=2, max_size=8).filter(lambda l: sum(l) > 0))
def test_confident_router_loss_is_at_least_its_floor_and_equal_only_at_uniform_load(load):
    E = len(load)
    probs, index = one_hot_routing(load, E)
    loss = load_balancing_loss(probs, index).item()
    f = torch.tensor(load, dtype=torch.float64) / sum(load)
    assert loss == pytest.approx(E * (f ** 2).sum().item(), rel=1e-12)   # P = f: E sum f^2
    if len(set(load)) == 1:
        assert loss == pytest.approx(1.0, abs=1e-12)
    else:
        assert loss > 1.0 + 1e-9


def test_more_imbalance_costs_more():
    E = 4
    losses = [load_balancing_loss(*one_hot_routing(load, E)).item()
              for load in ([10, 10, 10, 10], [13, 9, 9, 9], [20, 10, 5, 5], [40, 0, 0, 0])]
    assert losses == sorted(losses) and losses[0] == pytest.approx(1.0) and losses[-1] == pytest.approx(E)


def test_loss_is_not_a_lower_bound_when_probabilities_disagree_with_the_load():
    """The documented caveat: probabilities that sit on an expert no token is sent to can score below 1."""
    eps = 1e-3
    probs = torch.tensor([[0.5 + eps, 0.0, 0.5 - eps], [0.0, 0.5 + eps, 0.5 - eps]], dtype=torch.float64)
    index = probs.argmax(-1, keepdim=True)
    # f = (1/2, 1/2, 0), P = (1/4 + eps/2, 1/4 + eps/2, 1/2 - eps): 3 (1/4 + eps/2) = 0.75 + 1.5 eps < 1
    loss = load_balancing_loss(probs, index).item()
    assert loss == pytest.approx(0.75 + 1.5 * eps, abs=1e-12) and loss < 1.0


def test_loss_gradient_lowers_the_probability_of_the_overloaded_expert():
    torch.manual_seed(2)
    logits = torch.randn(40, 4, dtype=torch.float64)
    logits[:, 0] += 2.0                                           # expert 0 takes most tokens
    logits.requires_grad_(True)
    probs = logits.softmax(-1)
    index = probs.argmax(-1, keepdim=True)
    loss = load_balancing_loss(probs, index)
    (grad,) = torch.autograd.grad(loss, logits)
    # a small step against the gradient moves probability from expert 0 to the others
    new = (logits - 0.5 * grad).softmax(-1).mean(0)
    assert new[0] < probs.mean(0)[0]
    assert load_balancing_loss(new[None].expand(40, 4), index) < loss


def test_load_balancing_loss_bad_inputs():
    probs = torch.full((3, 2), 0.5)
    with pytest.raises(ValueError, match="rows"):
        load_balancing_loss(probs, torch.zeros(4, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        load_balancing_loss(probs, torch.full((3, 1), 2))
    with pytest.raises(DtypeError):
        load_balancing_loss(probs, torch.zeros(3, 1))
    with pytest.raises(ValueError, match="2 dimensions"):
        load_balancing_loss(probs[0], torch.zeros(3, 1, dtype=torch.long))


# ----------------------------------------------------------------------------------------------------------------
# Capacity and dispatch
# ----------------------------------------------------------------------------------------------------------------

def test_expert_capacity():
    assert expert_capacity(64, 4, 1.0) == 16
    assert expert_capacity(64, 4, 1.25) == 20
    assert expert_capacity(64, 4, 1.0, k=2) == 32
    assert expert_capacity(10, 3, 1.0) == 4                      # ceil(10 / 3)
    for bad in (0, -1.0, True):
        with pytest.raises(ValueError, match="capacity_factor"):
            expert_capacity(8, 2, bad)


def dispatch_loop(index: torch.Tensor, E: int, capacity: int | None) -> torch.Tensor:
    """The first-come, first-served rule written as a loop: choice by choice, token by token."""
    N, k = index.shape
    used, keep = [0] * E, torch.zeros(N, k, dtype=torch.bool)
    for j in range(k):
        for n in range(N):
            e = int(index[n, j])
            keep[n, j] = capacity is None or used[e] < capacity
            used[e] += 1
    return keep


@settings(max_examples=50, deadline=None)
@given(N=st.integers(1, 40), E=st.integers(1, 6), k=st.integers(1, 3), capacity=st.integers(1, 12),
       seed=st.integers(0, 10_000))
def test_capacity_drops_exactly_the_overflow_tokens(N, E, k, capacity, seed):
    k = min(k, E)
    g = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)])  # (N, k), distinct per token
    keep, slot = dispatch(index, E, capacity)
    assert torch.equal(keep, dispatch_loop(index, E, capacity))
    for e in range(E):
        sent = int((index == e).sum())
        kept = int(((index == e) & keep).sum())
        assert kept == min(sent, capacity) and sent - kept == max(0, sent - capacity)
        # the kept ones fill slots 0 .. kept - 1, once each
        assert sorted(slot[(index == e) & keep].tolist()) == list(range(kept))
    no_limit, _ = dispatch(index, E, None)
    assert no_limit.all()


def test_dispatch_bad_inputs():
    with pytest.raises(ValueError, match="capacity"):
        dispatch(torch.zeros(3, 1, dtype=torch.long), 2, 0)
    with pytest.raises(ValueError, match=r"\(N, k\)"):
        dispatch(torch.zeros(3, dtype=torch.long), 2, 1)


# ----------------------------------------------------------------------------------------------------------------
# The layer
# ----------------------------------------------------------------------------------------------------------------

def test_one_expert_top1_equals_the_dense_ffn():
    torch.manual_seed(3)
    dense = MLP(10, 24).double()
    moe = MoEFeedForward(10, 24, n_experts=1, k=1).double()
    moe.experts[0].load_state_dict(dense.state_dict())
    x = torch.randn(3, 7, 10, dtype=torch.float64)
    torch.testing.assert_close(moe(x), dense(x), rtol=0, atol=1e-14)
    assert moe.last_stats.dropped == 0.0 and moe.last_stats.aux_loss.item() == pytest.approx(1.0)


def moe_reference(layer: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """Token by token: the sum over its kept experts of gate x expert output."""
    route = layer.router(x)
    tokens = x.reshape(-1, layer.d_model)
    cap = None if layer.capacity_factor is None else expert_capacity(len(tokens), layer.n_experts,
                                                                     layer.capacity_factor, layer.k)
    keep = dispatch_loop(route.expert_index, layer.n_experts, cap)
    rows = []
    for n, token in enumerate(tokens):
        y = torch.zeros_like(token)
        for j in range(layer.k):
            if keep[n, j]:
                y = y + route.gates[n, j] * layer.experts[int(route.expert_index[n, j])](token[None])[0]
        rows.append(y)
    return torch.stack(rows).view_as(x)


@pytest.mark.parametrize("k,capacity_factor", [(1, None), (1, 1.0), (2, None), (2, 0.75), (3, 1.25)])
def test_moe_layer_equals_a_token_by_token_loop(k, capacity_factor):
    torch.manual_seed(4)
    layer = MoEFeedForward(8, 16, n_experts=4, k=k, capacity_factor=capacity_factor).double()
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    out = layer(x)
    torch.testing.assert_close(out, moe_reference(layer, x), rtol=1e-12, atol=1e-12)
    stats = layer.last_stats
    assert stats.load.shape == (4,) and stats.load.sum().item() == pytest.approx(1.0)
    if capacity_factor is None:
        assert stats.dropped == 0.0 and stats.capacity is None
    else:
        assert stats.capacity == expert_capacity(18, 4, capacity_factor, k)


def test_dropped_tokens_get_zero_output():
    torch.manual_seed(5)
    layer = MoEFeedForward(6, 12, n_experts=2, k=1, capacity_factor=0.5).double()
    x = torch.randn(1, 20, 6, dtype=torch.float64)
    out = layer(x).reshape(-1, 6)
    route = layer.router(x)
    keep, _ = dispatch(route.expert_index, 2, expert_capacity(20, 2, 0.5))
    assert (~keep).any() and layer.last_stats.dropped == pytest.approx((~keep).float().mean().item())
    assert torch.equal(out[~keep[:, 0]], torch.zeros_like(out[~keep[:, 0]]))
    assert (out[keep[:, 0]].abs().sum(-1) > 0).all()


def test_moe_layer_gradcheck():
    torch.manual_seed(6)
    layer = MoEFeedForward(4, 6, n_experts=3, k=2).double()
    x = torch.randn(1, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: layer(t), (x,))


# ----------------------------------------------------------------------------------------------------------------
# The MoE GPT
# ----------------------------------------------------------------------------------------------------------------

def test_upcycled_one_expert_gpt_equals_the_dense_gpt():
    dense = small_gpt()
    moe = to_moe_(copy.deepcopy(dense), n_experts=1, k=1, upcycle=True)
    idx = torch.randint(0, SMALL["vocab_size"], (3, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(moe(idx)[0], dense(idx)[0], rtol=0, atol=1e-13)
    assert all(isinstance(b.mlp, MoEFeedForward) for b in moe.h) and len(moe_layers(moe)) == 2


def test_upcycled_top1_gpt_with_many_experts_equals_the_dense_gpt_times_its_gates():
    """Every expert a copy of the dense MLP: the output of each block's FFN is p_i(x) MLP(x)."""
    dense = small_gpt(1)
    moe = to_moe_(copy.deepcopy(dense), n_experts=4, k=1, upcycle=True)
    x = torch.randn(2, 6, SMALL["n_embd"], dtype=torch.float64)
    layer = moe.h[0].mlp
    gates = layer.router(x).gates.view(2, 6, 1)
    torch.testing.assert_close(layer(x), gates * dense.h[0].mlp(x), rtol=1e-12, atol=1e-14)


def test_moe_gpt_trains_with_the_auxiliary_loss_and_counts_parameters():
    torch.manual_seed(7)
    config = GPTConfig(**SMALL)
    model = moe_gpt(config, n_experts=4, k=1, capacity_factor=1.25)
    with pytest.raises(ValueError, match="forward pass"):
        aux_loss(model)
    total, active = parameter_counts(model)
    C, F_, L = config.n_embd, config.hidden, config.n_layer
    per_expert = 2 * C * F_ + F_ + C
    assert total == config.num_parameters() + L * (3 * per_expert + 4 * C)   # 3 more experts and a router per block
    assert active == config.num_parameters() + L * 4 * C                      # the dense count, plus the routers
    assert parameter_counts(GPT(config)) == (config.num_parameters(),) * 2
    idx = torch.randint(0, config.vocab_size, (4, 16))
    _, loss = model(idx[:, :-1], idx[:, 1:])
    total_loss = loss + 0.01 * aux_loss(model)
    total_loss.backward()
    assert all(layer.router.gate.weight.grad is not None for layer in moe_layers(model))
    assert aux_loss(model).item() == pytest.approx(sum(l.last_stats.aux_loss.item() for l in moe_layers(model)))


def test_to_moe_bad_inputs():
    with pytest.raises(TypeError, match="GPT"):
        to_moe_(torch.nn.Linear(2, 2), 2)
    with pytest.raises(ValueError, match="no MoEFeedForward"):
        aux_loss(small_gpt())
    with pytest.raises(ValueError, match="capacity_factor"):
        MoEFeedForward(4, 8, 2, capacity_factor=0.0)
    with pytest.raises(ValueError, match="d_ff"):
        MoEFeedForward(4, 0, 2)


def test_expert_capacity_formula_matches_the_switch_paper():
    # Fedus et al., Eq. 3: capacity = tokens per batch / experts x capacity factor (here rounded up)
    assert expert_capacity(1024, 8, 1.0) == 128 == math.ceil(1024 / 8)


def test_fine_grained_experts_keep_the_active_parameters():
    config = GPTConfig(**SMALL)
    dense_total = config.num_parameters()
    model = moe_gpt(config, n_experts=8, k=2, d_ff=config.hidden // 2)
    total, active = parameter_counts(model)
    C, L, half = config.n_embd, config.n_layer, config.hidden // 2
    per_expert = 2 * C * half + half + C
    dense_mlp = 2 * C * config.hidden + config.hidden + C
    assert active == dense_total + L * (2 * per_expert - dense_mlp + 8 * C)   # two half-width experts + router
    assert total == dense_total + L * (8 * per_expert - dense_mlp + 8 * C)
    with pytest.raises(ValueError, match="upcycling"):
        to_moe_(small_gpt(), 4, d_ff=3, upcycle=True)
