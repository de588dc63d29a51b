"""Chapter 7's additions to the package: tfcourse.layers.LayerStack (LayerDrop, activation checkpointing, pruning),
tfcourse.training.xavier_init_ against torch.nn.Transformer's initialisation, and
tfcourse.training.TensorMemoryTracker against exact byte counts and PyTorch's own MemTracker."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tfcourse.layers import EncoderLayer, LayerStack
from tfcourse.training import TensorMemoryTracker, xavier_init_

D, H, DFF = 16, 2, 32


def encoder_stack(n_layers=4, dropout=0.0, seed=0, **kwargs):
    torch.manual_seed(seed)
    return LayerStack([EncoderLayer(D, H, DFF, dropout=dropout, norm_first=True) for _ in range(n_layers)], **kwargs)


class AddOne(nn.Module):
    """A layer whose effect is visible: x + 1 (with a parameter, so that gradients can be checked)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x + self.w


# ---------------------------------------------------------------------------------------------------- LayerDrop

def test_stack_without_layerdrop_is_the_plain_loop():
    stack = encoder_stack().double()
    x = torch.randn(3, 5, D, dtype=torch.float64)
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] + [True] * 4])
    expected = x
    for layer in stack.layers:
        expected = layer(expected, src_key_padding_mask=padding)
    for mode in (stack.train, stack.eval):
        mode()
        torch.testing.assert_close(stack(x, src_key_padding_mask=padding), expected, atol=1e-12, rtol=0)


def test_layerdrop_skips_layers_in_training_only():
    stack = LayerStack([AddOne() for _ in range(5)], layerdrop=0.3)
    x = torch.zeros(())
    torch.manual_seed(0)
    stack.train()
    with torch.no_grad():
        counts = torch.tensor([stack(x).item() for _ in range(4000)])  # how many layers ran, each time
    # Each of 5 layers runs with probability 0.7: Binomial(5, 0.7), mean 3.5, variance 1.05.
    assert abs(counts.mean().item() - 3.5) < 5 * math.sqrt(1.05 / 4000)
    assert abs(counts.var().item() - 1.05) < 0.1
    assert set(counts.unique().tolist()) == {0.0, 1.0, 2.0, 3.0, 4.0, 5.0}
    stack.eval()
    with torch.no_grad():
        assert all(stack(x).item() == 5.0 for _ in range(50))


def test_layerdrop_is_reproducible_and_skipped_layers_get_no_gradient():
    stack = LayerStack([AddOne() for _ in range(6)], layerdrop=0.5)
    torch.manual_seed(1)
    out = stack(torch.zeros(()))
    torch.manual_seed(1)
    keep = torch.rand(6) >= 0.5  # the draw the stack made
    assert out.item() == keep.sum().item()
    out.backward()
    for layer, kept in zip(stack.layers, keep.tolist()):
        assert (layer.w.grad is not None) == kept


@settings(max_examples=6, deadline=None)
@given(keep=st.lists(st.integers(0, 5), min_size=1, max_size=6, unique=True), seed=st.integers(0, 100))
def test_pruned_stack_shares_weights_and_runs_only_the_kept_layers(keep, seed):
    keep = sorted(keep)
    stack = encoder_stack(n_layers=6, seed=seed, layerdrop=0.2).eval()
    small = stack.pruned(keep)
    assert len(small) == len(keep) and small.layerdrop == 0.0
    assert all(small.layers[j] is stack.layers[i] for j, i in enumerate(keep))
    x = torch.randn(2, 4, D)
    expected = x
    for i in keep:
        expected = stack.layers[i](expected)
    torch.testing.assert_close(small(x), expected)


def test_layerstack_rejects_bad_input():
    for bad in (dict(layers=[]), dict(layers=[nn.Linear(2, 2), "relu"]), dict(layers=[AddOne()], layerdrop=1.0),
                dict(layers=[AddOne()], layerdrop=-0.1), dict(layers=[AddOne()], layerdrop=True)):
        with pytest.raises(ValueError):
            LayerStack(**bad)
    stack = LayerStack([AddOne(), AddOne()])
    for keep in ([], [1, 0], [0, 0], [2], [True]):
        with pytest.raises(ValueError):
            stack.pruned(keep)


# ------------------------------------------------------------------------------------------------- checkpointing

def test_checkpointing_changes_memory_not_results():
    """With dropout on, the checkpointed stack draws the same masks (it saves and restores the random state to
    recompute): outputs and gradients are equal to the plain stack's; the peak tensor memory is smaller."""
    plain = encoder_stack(n_layers=4, dropout=0.1, seed=3)
    ckpt = copy.deepcopy(plain)
    ckpt.checkpoint = True
    x = torch.randn(4, 24, D)
    peaks, results = [], []
    for stack in (plain, ckpt):
        stack.train()
        torch.manual_seed(7)
        with TensorMemoryTracker() as memory:
            out = stack(x)
            out.pow(2).mean().backward()
        peaks.append(memory.peak_bytes)
        results.append((out.detach(), [p.grad for p in stack.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], atol=0, rtol=0)
    for g_plain, g_ckpt in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(g_plain, g_ckpt, atol=1e-7, rtol=1e-6)
    assert peaks[1] < 0.6 * peaks[0]


def test_checkpointing_is_off_in_eval_and_without_grad():
    stack = encoder_stack(n_layers=2, checkpoint=True).eval()
    x = torch.randn(2, 3, D)
    with torch.no_grad():
        torch.testing.assert_close(stack(x), stack.layers[1](stack.layers[0](x)))


# ---------------------------------------------------------------------------------------------------- Xavier

def test_xavier_init_equals_torch_transformer_reset():
    theirs = nn.Transformer(d_model=16, nhead=2, num_encoder_layers=2, num_decoder_layers=1, dim_feedforward=24,
                            batch_first=True)
    ours = copy.deepcopy(theirs)
    with torch.no_grad():
        for p in ours.parameters():
            p.fill_(0.5)  # start from something else, so that equality is not inherited
    torch.manual_seed(11)
    theirs._reset_parameters()
    torch.manual_seed(11)
    assert xavier_init_(ours) is ours
    for (name, a), b in zip(theirs.named_parameters(), ours.parameters()):
        if a.dim() > 1:
            assert torch.equal(a, b), name
        else:
            assert torch.all(b == 0.5), f"{name}: 1-D parameters must be left alone"


@pytest.mark.parametrize("fan_in, fan_out, gain", [(400, 100, 1.0), (64, 256, 5 / 3)])
def test_xavier_variance(fan_in, fan_out, gain):
    torch.manual_seed(0)
    layer = xavier_init_(nn.Linear(fan_in, fan_out), gain=gain)
    w = layer.weight
    bound = gain * math.sqrt(6 / (fan_in + fan_out))
    assert w.abs().max() <= bound and w.abs().max() > 0.99 * bound
    assert w.var().item() == pytest.approx(gain**2 * 2 / (fan_in + fan_out), rel=0.05)


def test_xavier_rejects_bad_input():
    with pytest.raises(TypeError):
        xavier_init_(torch.zeros(3, 3))
    for gain in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError):
            xavier_init_(nn.Linear(2, 2), gain=gain)


# ----------------------------------------------------------------------------------------------- memory tracker

def test_tracker_counts_exact_bytes_and_frees():
    x, w = torch.randn(100, 50), torch.randn(50, 20)
    with TensorMemoryTracker() as memory:
        y = x @ w                     # 100 x 20 float32: 8000 bytes
        view = y.t()[:5]              # a view: no new memory
        y.mul_(2)                     # in place: none either
        z = x[:10].double()           # 10 x 50 float64: 4000
        del z                         # freed
    assert memory.peak_bytes == 12_000 and memory.allocated_bytes == 12_000 and memory.current_bytes == 8000
    del y, view
    assert memory.current_bytes == 0
    with TensorMemoryTracker() as memory:
        pass
    assert memory.peak_bytes == 0


def test_tracker_sees_backward():
    w = torch.randn(50, 20, requires_grad=True)
    x = torch.randn(100, 50)
    with TensorMemoryTracker() as memory:
        (x @ w).relu().sum().backward()
    assert memory.current_bytes == w.grad.nbytes == 4000  # the gradient outlives the block
    assert memory.peak_bytes >= 8000 + 4000  # the product and the gradient at least, at once


@pytest.mark.parametrize("checkpoint", [False, True])
@pytest.mark.parametrize("norm_first", [True, False])
def test_tracker_equals_pytorchs_memtracker(checkpoint, norm_first):
    """PyTorch's MemTracker also counts tensors that existed before: the module's parameters (and their
    gradients), and the input as soon as an operation views it (a Post-LN layer's first linear map reshapes its
    input; a Pre-LN layer normalises it first, into a new tensor). With those added, the peaks agree to the byte."""
    mem_tracker = pytest.importorskip("torch.distributed._tools.mem_tracker")
    torch.manual_seed(5)
    layers = [EncoderLayer(D, H, DFF, dropout=0.0, norm_first=norm_first) for _ in range(3)]
    stack = LayerStack(layers, checkpoint=checkpoint).train()
    x = torch.randn(4, 16, D)

    def step():
        stack.zero_grad(set_to_none=True)
        stack(x).pow(2).mean().backward()

    with TensorMemoryTracker() as ours:
        step()
    stack.zero_grad(set_to_none=True)
    theirs = mem_tracker.MemTracker()
    theirs.track_external(stack)
    with theirs:
        step()
    peak = theirs.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    params = sum(p.nbytes for p in stack.parameters())
    viewed_input = 0 if norm_first else x.nbytes
    assert ours.peak_bytes + params + viewed_input == peak
