"""tfcourse.scaling: counts equal to the model and to torch's FLOP counter; fits that recover known laws."""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar
from torch.utils.flop_counter import FlopCounterMode

from tfcourse.models import GPT, GPTConfig
from tfcourse.scaling import (CHINCHILLA, ChinchillaFit, PowerLaw, compute_optimal, count_params, fit_chinchilla,
                              fit_power_law, forward_flops_per_token, training_flops, training_memory)

CONFIGS = [
    GPTConfig(block_size=32, vocab_size=65, n_layer=2, n_head=4, n_embd=32),
    GPTConfig(block_size=16, vocab_size=50, n_layer=3, n_head=4, n_embd=24, n_kv_heads=2, bias=False),
    GPTConfig(block_size=24, vocab_size=100, n_layer=1, n_head=2, n_embd=16, d_ff=40, tie_weights=False),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_count_params_equals_the_model(config):
    model = GPT(config)
    counts = count_params(config)
    assert counts.total == sum(p.numel() for p in model.parameters()) == config.num_parameters()
    embedding = model.wte.weight.numel() + sum(p.numel() for p in model.wpe.parameters())
    assert counts.non_embedding == counts.total - embedding == config.num_parameters(non_embedding=True)
    attention = sum(p.numel() for b in model.h for p in b.attn.parameters())
    assert counts.attention == attention
    assert counts.feed_forward == sum(p.numel() for b in model.h for p in b.mlp.parameters())


def test_count_params_of_gpt2_small():
    counts = count_params(GPTConfig())
    assert counts.total == 124_439_808
    assert counts.non_embedding == 85_056_000           # 12 layers x 12 C^2 (+ biases and norms), C = 768
    assert abs(counts.non_embedding - 12 * 12 * 768 ** 2) / counts.non_embedding < 0.002


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("seq_len", [None, 7])
def test_training_flops_equal_torch_flop_counter(config, seq_len):
    torch.manual_seed(0)
    model = GPT(config)
    T = config.block_size if seq_len is None else seq_len
    idx = torch.randint(0, config.vocab_size, (3, T))
    with FlopCounterMode(display=False) as forward_counter:
        model(idx)
    assert forward_counter.get_total_flops() == 3 * T * forward_flops_per_token(config, T)
    with FlopCounterMode(display=False) as step_counter:
        _, loss = model(idx, idx)
        loss.backward()
    measured = step_counter.get_total_flops()
    ours = training_flops(config, 3 * T, seq_len=T)
    assert abs(ours - measured) / measured < 0.05
    assert ours == measured              # in fact exact: backward = 2 x forward for every product


def test_six_n_d_is_the_large_model_limit():
    small = GPTConfig(block_size=64, vocab_size=65, n_layer=2, n_head=4, n_embd=32)
    gpt2 = GPTConfig()                                                                          # GPT-2 small
    large = GPTConfig(block_size=2048, vocab_size=50257, n_layer=96, n_head=96, n_embd=12288)   # GPT-3 175B
    ratios = [training_flops(c, 1e6, approximation=True) / training_flops(c, 1e6) for c in (small, gpt2, large)]
    # 6ND misses the output layer (2VC per token) and attention's 4LTC: a lot for small models (GPT-2 small's big
    # vocabulary costs it 40%), 3% for GPT-3
    assert 0.7 < ratios[0] < 0.75 and 0.55 < ratios[1] < 0.65 and 0.96 < ratios[2] < 1.0
    assert training_flops(large, 1e6, approximation=True) == 6 * count_params(large).non_embedding * 1e6


def test_training_memory_of_weights_gradients_and_adam():
    config = CONFIGS[0]
    P = count_params(config).total
    memory = training_memory(config, batch_size=8)
    assert memory["weights"] == memory["gradients"] == 4 * P and memory["optimizer"] == 8 * P
    assert memory["total"] == sum(v for k, v in memory.items() if k != "total")
    half = training_memory(config, batch_size=8, bytes_per_number=2, optimizer_states=0)
    assert half["weights"] == 2 * P and half["optimizer"] == 0
    assert half["activations"] * 2 == pytest.approx(memory["activations"], rel=1e-6)
    assert training_memory(config, batch_size=16)["activations"] == pytest.approx(2 * memory["activations"], rel=1e-6)


def test_power_law_without_offset_is_recovered_exactly():
    x = np.logspace(3, 7, 9)
    law = PowerLaw(coef=12.0, exponent=0.076)
    fit = fit_power_law(x, law(x))
    assert fit.coef == pytest.approx(12.0, rel=1e-9) and fit.exponent == pytest.approx(0.076, rel=1e-9)
    assert fit.offset == 0.0
    assert fit.scale == pytest.approx(12.0 ** (1 / 0.076), rel=1e-6)     # Kaplan's N_c


def test_power_law_with_offset_is_recovered_from_noisy_data():
    rng = np.random.default_rng(0)
    x = np.logspace(2, 6, 20)
    law = PowerLaw(coef=40.0, exponent=0.45, offset=1.7)
    y = law(x) * np.exp(rng.normal(0, 0.002, len(x)))
    fit = fit_power_law(x, y, offset=True)
    assert fit.exponent == pytest.approx(0.45, rel=0.05)
    assert fit.offset == pytest.approx(1.7, rel=0.02)
    assert fit.coef == pytest.approx(40.0, rel=0.2)
    plain = fit_power_law(x, y)                         # without the offset the exponent comes out far too small
    assert plain.exponent < 0.5 * fit.exponent


def _grid_of_runs(law, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    N, D = np.meshgrid(np.logspace(4, 8, 6), np.logspace(6, 10, 6))
    N, D = N.ravel(), D.ravel()
    return N, D, law(N, D) * np.exp(rng.normal(0, noise, N.shape)) if noise else law(N, D)


def test_fit_chinchilla_recovers_the_published_coefficients():
    N, D, L = _grid_of_runs(CHINCHILLA)
    fit = fit_chinchilla(N, D, L)
    for got, expected in zip(fit, CHINCHILLA):
        assert got == pytest.approx(expected, rel=0.01)


def test_fit_chinchilla_recovers_other_coefficients_from_noisy_runs():
    law = ChinchillaFit(E=0.9, A=60.0, B=900.0, alpha=0.5, beta=0.35)
    N, D, L = _grid_of_runs(law, noise=0.003, seed=1)
    fit = fit_chinchilla(N, D, L)
    assert fit.E == pytest.approx(0.9, rel=0.05)
    assert fit.alpha == pytest.approx(0.5, rel=0.1) and fit.beta == pytest.approx(0.35, rel=0.1)
    predicted = fit(N, D)
    assert np.max(np.abs(np.log(predicted / law(N, D)))) < 0.01


@pytest.mark.parametrize("fit", [CHINCHILLA, ChinchillaFit(E=1.0, A=50.0, B=2000.0, alpha=0.6, beta=0.3)])
def test_compute_optimal_minimises_the_loss_at_fixed_compute(fit):
    for C in (1e18, 5.76e23, 1e26):
        N_opt, D_opt = compute_optimal(C, fit)
        assert 6 * N_opt * D_opt == pytest.approx(C, rel=1e-9)
        numeric = minimize_scalar(lambda log_n: fit(math.exp(log_n), C / (6 * math.exp(log_n))),
                                  bounds=(math.log(1e3), math.log(1e15)), method="bounded",
                                  options={"xatol": 1e-10})
        assert math.exp(numeric.x) == pytest.approx(float(N_opt), rel=1e-4)


def test_chinchilla_allocation_grows_n_and_d_about_equally():
    # the published fit: N_opt ~ C^0.45, D_opt ~ C^0.55, so D_opt ~ N_opt^1.2, not N_opt^2
    C = np.logspace(20, 26, 7)
    N_opt, D_opt = compute_optimal(C)
    a = np.polyfit(np.log(C), np.log(N_opt), 1)[0]
    b = np.polyfit(np.log(C), np.log(D_opt), 1)[0]
    assert a == pytest.approx(0.28 / 0.62, abs=1e-9) and b == pytest.approx(0.34 / 0.62, abs=1e-9)
    assert a + b == pytest.approx(1.0)


def test_bad_inputs_raise_clear_errors():
    config = CONFIGS[0]
    with pytest.raises(TypeError, match="config must be a GPTConfig"):
        count_params({"n_layer": 2})
    with pytest.raises(ValueError, match="seq_len must be at most block_size"):
        forward_flops_per_token(config, 33)
    with pytest.raises(ValueError, match="tokens must be a positive"):
        training_flops(config, 0)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        training_memory(config, batch_size=0)
    with pytest.raises(ValueError, match="optimizer_states"):
        training_memory(config, batch_size=1, optimizer_states=-1)
    with pytest.raises(ValueError, match="y must have the length"):
        fit_power_law([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="positive finite"):
        fit_power_law([1, 2, 3], [1, -2, 3])
    with pytest.raises(ValueError, match="at least 4 points"):
        fit_power_law([1, 2, 3], [3, 2, 1], offset=True)
    with pytest.raises(ValueError, match="x must be 1-D"):
        fit_power_law([[1, 2], [3, 4]], [1, 2])
    with pytest.raises(TypeError, match="x must be a sequence of numbers"):
        fit_power_law(["a", "b"], [1, 2])
    with pytest.raises(ValueError, match="at least 5 runs"):
        fit_chinchilla([1, 2, 3], [1, 2, 3], [3, 2, 1])
    with pytest.raises(ValueError, match="exponent_grid must hold positive"):
        fit_chinchilla(*_grid_of_runs(CHINCHILLA), exponent_grid=(0.0, 0.5))
    with pytest.raises(ValueError, match="compute must hold positive"):
        compute_optimal(-1.0)
    with pytest.raises(TypeError, match="fit must be a ChinchillaFit"):
        compute_optimal(1e20, (1.69, 406.4, 410.7, 0.34, 0.28))
