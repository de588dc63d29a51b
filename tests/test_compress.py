"""tfcourse.compress: distillation (against F.kl_div), magnitude pruning (against torch.nn.utils.prune), head
pruning, and int8 quantization (against torch.ao's dynamically quantized Linear)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import prune

from tfcourse._checks import DtypeError
from tfcourse.attention import split_heads
from tfcourse.compress import (Int8DynamicLinear, apply_masks_, dequantize, distillation_loss,
                               distillation_objective, head_importance, int8_linear_reference, magnitude_masks,
                               mask_heads, model_size_bytes, prunable_weights, prune_heads_, quantize_dynamic_int8,
                               quantize_symmetric, soft_targets, sparsity)
from tfcourse.models import GPT, GPTConfig

SMALL = dict(block_size=16, vocab_size=29, n_layer=2, n_head=4, n_embd=16)


def small_gpt(seed=0, dtype=torch.float64) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**SMALL)).to(dtype).eval()


def batch(seed=0, B=3, T=12):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, SMALL["vocab_size"], (B, T + 1), generator=g)
    return idx[:, :-1], idx[:, 1:]


# ----------------------------------------------------------------------------------------------------------------
# Distillation
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tau", [1.0, 2.0, 5.0])
def test_distillation_loss_equals_kl_div_times_tau_squared(tau):
    torch.manual_seed(0)
    z, v = torch.randn(4, 6, 11, dtype=torch.float64), torch.randn(4, 6, 11, dtype=torch.float64)
    log_p, log_q = F.log_softmax(z.reshape(-1, 11) / tau, -1), F.log_softmax(v.reshape(-1, 11) / tau, -1)
    expected = tau ** 2 * F.kl_div(log_p, log_q, log_target=True, reduction="batchmean")
    torch.testing.assert_close(distillation_loss(z, v, tau), expected, rtol=1e-12, atol=1e-14)
    # the KL divergence and the soft cross-entropy differ by the teacher's entropy, a constant
    q = soft_targets(v, tau)
    cross_entropy = -(q * F.log_softmax(z / tau, -1)).sum(-1).mean()
    entropy = -(q * q.log()).sum(-1).mean()
    torch.testing.assert_close(distillation_loss(z, v, tau), tau ** 2 * (cross_entropy - entropy))


def test_zero_loss_and_zero_gradient_when_the_student_equals_the_teacher():
    torch.manual_seed(1)
    v = torch.randn(5, 9, dtype=torch.float64)
    z = v.clone().requires_grad_(True)
    loss = distillation_loss(z, v, temperature=3.0)
    loss.backward()
    assert abs(loss.item()) < 1e-14
    assert z.grad.abs().max().item() < 1e-14


@settings(max_examples=20, deadline=None)
@given(tau=st.floats(0.5, 8.0), seed=st.integers(0, 1000))
def test_distillation_gradient_is_tau_times_the_probability_difference(tau, seed):
    torch.manual_seed(seed)
    z = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    v = torch.randn(3, 7, dtype=torch.float64)
    (grad,) = torch.autograd.grad(distillation_loss(z, v, tau), z)
    expected = tau * (soft_targets(z.detach(), tau) - soft_targets(v, tau)) / 3
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


def test_high_temperature_limit_is_logit_matching():
    """Hinton et al., Sec. 2.1: for large tau the tau^2-scaled gradient tends to ((z - z.mean) - (v - v.mean)) / NV."""
    torch.manual_seed(2)
    N, V = 4, 10
    z = torch.randn(N, V, dtype=torch.float64, requires_grad=True)
    v = torch.randn(N, V, dtype=torch.float64)
    (grad,) = torch.autograd.grad(distillation_loss(z, v, temperature=1000.0), z)
    limit = ((z.detach() - z.detach().mean(-1, keepdim=True)) - (v - v.mean(-1, keepdim=True))) / (N * V)
    torch.testing.assert_close(grad, limit, rtol=1e-2, atol=1e-6)


def test_teacher_gets_no_gradient_and_mask_averages_over_counted_rows():
    torch.manual_seed(3)
    z = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    distillation_loss(z, v).backward()
    assert v.grad is None
    mask = torch.tensor([[True, False, True, True, False], [False] * 5])
    expected = distillation_loss(z[mask], v[mask])
    torch.testing.assert_close(distillation_loss(z, v, mask=mask), expected)
    assert distillation_loss(z, v, mask=torch.zeros(2, 5, dtype=torch.bool)).item() == 0.0


def test_distillation_objective_mixes_soft_and_hard_losses():
    torch.manual_seed(4)
    z, v = torch.randn(3, 4, 9, dtype=torch.float64), torch.randn(3, 4, 9, dtype=torch.float64)
    y = torch.randint(0, 9, (3, 4))
    y[0, 0] = -100
    keep = y != -100
    hard = F.cross_entropy(z.reshape(-1, 9), y.reshape(-1), ignore_index=-100)
    soft = distillation_loss(z, v, 2.0, mask=keep)
    torch.testing.assert_close(distillation_objective(z, v, y, 2.0, alpha=0.3), 0.3 * soft + 0.7 * hard)
    torch.testing.assert_close(distillation_objective(z, v, y, 2.0, alpha=0.0), hard)


def test_distillation_bad_inputs():
    z = torch.randn(3, 5)
    with pytest.raises(ValueError, match="shape of student_logits"):
        distillation_loss(z, torch.randn(3, 6))
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(z, z, temperature=0)
    with pytest.raises(DtypeError):
        distillation_loss(z, z.double())
    with pytest.raises(ValueError, match="mask"):
        distillation_loss(z, z, mask=torch.ones(3))
    with pytest.raises(ValueError, match="alpha"):
        distillation_objective(z, z, torch.zeros(3, dtype=torch.long), alpha=1.5)
    with pytest.raises(ValueError, match="targets"):
        distillation_objective(z, z, torch.zeros(4, dtype=torch.long))
    with pytest.raises(DtypeError):
        distillation_objective(z, z, torch.zeros(3))


# ----------------------------------------------------------------------------------------------------------------
# Magnitude pruning
# ----------------------------------------------------------------------------------------------------------------

def test_prunable_weights_of_a_gpt_leave_out_the_tied_output_layer():
    model = small_gpt()
    names = list(prunable_weights(model))
    assert "lm_head.weight" not in names and "wte.weight" not in names
    assert names == [f"h.{l}.{m}.weight" for l in range(2)
                     for m in ("attn.W_q", "attn.W_k", "attn.W_v", "attn.W_o", "mlp.linear1", "mlp.linear2")]


@pytest.mark.parametrize("amount", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_layer_masks_equal_torch_l1_unstructured(amount):
    torch.manual_seed(5)
    layers = [nn.Linear(13, 7), nn.Linear(7, 5)]
    ours = magnitude_masks({str(i): l.weight for i, l in enumerate(layers)}, amount, scope="layer")
    for i, layer in enumerate(layers):
        prune.l1_unstructured(layer, "weight", amount=amount)
        assert torch.equal(ours[str(i)], layer.weight_mask.bool())


@pytest.mark.parametrize("amount", [0.2, 0.6, 0.95])
def test_global_masks_equal_torch_global_unstructured(amount):
    model = small_gpt(dtype=torch.float32)
    weights = prunable_weights(model)
    ours = magnitude_masks(weights, amount, scope="global")
    twin = copy.deepcopy(model)
    modules = [(twin.get_submodule(name.rsplit(".", 1)[0]), "weight") for name in weights]
    prune.global_unstructured(modules, pruning_method=prune.L1Unstructured, amount=amount)
    for (module, _), name in zip(modules, weights):
        assert torch.equal(ours[name], module.weight_mask.bool()), name
    total = sum(w.numel() for w in weights.values())
    assert sum(int((~m).sum()) for m in ours.values()) == round(amount * total)


def test_apply_masks_zeroes_the_smallest_weights_and_sparsity_counts_them():
    model = small_gpt()
    weights = prunable_weights(model)
    largest_before = max(w.abs().max().item() for w in weights.values())
    masks = magnitude_masks(weights, 0.7, scope="global")
    apply_masks_(model, masks)
    weights = prunable_weights(model)
    assert sparsity(weights) == pytest.approx(0.7, abs=1e-3)
    kept = torch.cat([w[m].abs() for w, m in zip(weights.values(), masks.values())])
    assert kept.min() > 0 and kept.max().item() == largest_before    # the largest weights survive
    with pytest.raises(ValueError, match="not a parameter"):
        apply_masks_(model, {"nope": torch.ones(1, dtype=torch.bool)})
    with pytest.raises(ValueError, match="bool tensor of shape"):
        apply_masks_(model, {"h.0.attn.W_q.weight": torch.ones(3, dtype=torch.bool)})


def test_magnitude_masks_bad_inputs():
    with pytest.raises(ValueError, match="non-empty"):
        magnitude_masks({}, 0.5)
    with pytest.raises(ValueError, match="sparsity"):
        magnitude_masks({"w": torch.randn(3)}, 1.5)
    with pytest.raises(ValueError, match="scope"):
        magnitude_masks({"w": torch.randn(3)}, 0.5, scope="row")
    with pytest.raises(DtypeError):
        magnitude_masks({"w": torch.ones(3, dtype=torch.long)}, 0.5)


# ----------------------------------------------------------------------------------------------------------------
# Head pruning
# ----------------------------------------------------------------------------------------------------------------

def attention_without_heads(attn, x, removed):
    """An independent computation of a causal attention layer's output with some heads left out: the per-head
    outputs by F.scaled_dot_product_attention, and W_o applied to the kept heads' columns only."""
    q, k, v = (split_heads(lin(x), attn.n_heads) for lin in (attn.W_q, attn.W_k, attn.W_v))
    heads = F.scaled_dot_product_attention(q, k, v, is_causal=True)              # (B, nh, T, hs)
    out = attn.W_o.bias.expand(x.shape[0], x.shape[1], -1).clone()
    for h in range(attn.n_heads):
        if h not in removed:
            cols = slice(h * attn.d_head, (h + 1) * attn.d_head)
            out = out + heads[:, h] @ attn.W_o.weight[:, cols].T
    return out


def test_masked_heads_equal_an_independent_computation_and_pruning_equals_masking():
    model = small_gpt(6)
    x = torch.randn(2, 10, SMALL["n_embd"], dtype=torch.float64)
    mask = torch.ones(2, 4, dtype=torch.float64)
    mask[0, 1] = mask[0, 3] = mask[1, 0] = 0
    attn = model.h[0].attn
    handles = mask_heads(model, mask)
    got, _ = attn(x, x, x, is_causal=True)
    torch.testing.assert_close(got, attention_without_heads(attn, x, {1, 3}), rtol=1e-12, atol=1e-12)
    idx, _ = batch(1)
    masked_logits = model(idx)[0]
    for handle in handles:
        handle.remove()
    assert not torch.allclose(model(idx)[0], masked_logits)                  # the hooks are gone
    removed = prune_heads_(model, {0: [1, 3], 1: [0]})
    torch.testing.assert_close(model(idx)[0], masked_logits, rtol=1e-12, atol=1e-12)
    hs, C = 4, 16
    assert removed == 3 * (3 * (hs * C + hs) + C * hs)                       # W_q, W_k, W_v rows and W_o columns


def test_head_importance_is_the_gradient_of_a_gate_and_leaves_the_model_alone():
    model = small_gpt(7)
    batches = [batch(s) for s in range(3)]
    before = copy.deepcopy(model.state_dict())
    raw = head_importance(model, batches, normalize=False)
    assert raw.shape == (2, 4) and (raw >= 0).all() and raw.sum() > 0
    # finite differences of the mean loss in one gate (the score averages |grad| per batch: check one batch)
    one = head_importance(model, batches[:1], normalize=False)
    eps, (l, h) = 1e-6, (1, 2)
    gates = torch.ones(2, 4, dtype=torch.float64)
    losses = []
    for sign in (1, -1):
        gates[l, h] = 1 + sign * eps
        handles = mask_heads(model, gates)
        losses.append(model(*batches[0])[1].item())
        for handle in handles:
            handle.remove()
    assert one[l, h].item() == pytest.approx(abs(losses[0] - losses[1]) / (2 * eps), rel=1e-5)
    normalized = head_importance(model, batches)
    torch.testing.assert_close(normalized.norm(dim=-1), torch.ones(2, dtype=torch.float32))
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name])
    assert all(p.grad is None for p in model.parameters())


def test_head_functions_bad_inputs():
    model = small_gpt()
    with pytest.raises(ValueError, match=r"\(n_layer, n_head\) = \(2, 4\)"):
        mask_heads(model, torch.ones(2, 3))
    with pytest.raises(TypeError, match="GPT"):
        mask_heads(nn.Linear(2, 2), torch.ones(1, 1))
    with pytest.raises(ValueError, match="head must be"):
        prune_heads_(model, {0: [4]})
    with pytest.raises(ValueError, match="layer must be"):
        prune_heads_(model, {2: [0]})
    with pytest.raises(ValueError, match="empty"):
        head_importance(model, [])


# ----------------------------------------------------------------------------------------------------------------
# Quantization
# ----------------------------------------------------------------------------------------------------------------

def torch_dynamic_linear(linear: nn.Linear) -> nn.Module:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear
    from torch.ao.quantization import default_dynamic_qconfig

    twin = copy.deepcopy(linear)
    twin.qconfig = default_dynamic_qconfig
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DynamicQuantizedLinear.from_float(twin)


def test_quantize_symmetric_equals_torch_per_tensor_symmetric():
    torch.manual_seed(8)
    linear = nn.Linear(40, 24)
    q, scale = quantize_symmetric(linear.weight)
    theirs = torch_dynamic_linear(linear).weight()
    assert scale == pytest.approx(theirs.q_scale(), rel=1e-6) and theirs.q_zero_point() == 0
    assert torch.equal(q, theirs.int_repr())
    error = (dequantize(q, scale) - linear.weight).abs().max().item()
    assert error <= scale  # half a step, plus at most half a step of clipping of the largest weight


@pytest.mark.parametrize("n_bits", [2, 4, 8])
def test_quantize_symmetric_levels(n_bits):
    w = torch.linspace(-1, 1, 1001)
    q, scale = quantize_symmetric(w, n_bits)
    assert q.min() >= -(2 ** (n_bits - 1)) and q.max() <= 2 ** (n_bits - 1) - 1
    assert len(torch.unique(q)) <= 2 ** n_bits
    assert dequantize(q, scale)[500].item() == 0.0                      # zero is exact


@pytest.mark.parametrize("shape", [(5, 64), (2, 7, 33)])
def test_int8_reference_equals_torch_dynamic_quantized_linear(shape):
    torch.manual_seed(9)
    linear = nn.Linear(shape[-1], 19)
    x = torch.randn(*shape) * 3
    theirs = torch_dynamic_linear(linear)(x)
    q, scale = quantize_symmetric(linear.weight)
    ours = int8_linear_reference(x, q, scale, linear.bias)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    ours_module = Int8DynamicLinear.from_float(linear)
    assert torch.equal(ours_module(x), theirs)
    # the float layer is close, within what int8 resolution allows
    assert (ours - linear(x)).abs().max() < 0.05 * linear(x).abs().max()


def test_quantize_dynamic_int8_equals_torch_quantize_dynamic_and_keeps_the_gpt_working():
    from torch.ao.quantization import quantize_dynamic

    torch.manual_seed(10)
    mlp = nn.Sequential(nn.Linear(12, 30), nn.GELU(), nn.Linear(30, 4))
    x = torch.randn(6, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = quantize_dynamic(copy.deepcopy(mlp), {nn.Linear}, dtype=torch.qint8)
    ours = quantize_dynamic_int8(mlp)
    assert torch.equal(ours(x), theirs(x))
    assert isinstance(mlp[0], nn.Linear)                                # the original is untouched

    model = small_gpt(dtype=torch.float32)
    quantized = quantize_dynamic_int8(model)
    assert all(isinstance(m, Int8DynamicLinear) for m in (quantized.h[0].attn.W_q, quantized.h[1].mlp.linear2,
                                                             quantized.lm_head))
    idx, targets = batch(2)
    with torch.no_grad():
        logits_q, loss_q = quantized(idx, targets)
        logits, loss = model(idx, targets)
    assert (logits_q - logits).abs().max() < 0.05 and abs(loss_q.item() - loss.item()) < 0.01
    with pytest.raises(ValueError, match="float32 on the CPU"):
        quantize_dynamic_int8(small_gpt())                              # float64


def test_model_size_bytes_counts_int8_as_a_quarter():
    torch.manual_seed(11)
    big = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256))
    n = sum(p.numel() for p in big.parameters())
    float_size, int8_size = model_size_bytes(big), model_size_bytes(quantize_dynamic_int8(big))
    assert 4 * n <= float_size < 4 * n + 4096
    weights = 2 * 256 * 256
    assert weights <= int8_size < weights + 4 * (n - weights) + 8192       # int8 weights, float32 biases, overhead
    # a tied weight is stored once
    model = small_gpt(dtype=torch.float32)
    assert model_size_bytes(model) < 4 * sum(p.numel() for p in model.parameters()) + 20_000
    with pytest.raises(TypeError):
        model_size_bytes({"w": torch.ones(1)})
