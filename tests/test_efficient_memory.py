"""tfcourse.efficient.memory: Transformer-XL's relative attention and segment recurrence, the Compressive memory."""

from __future__ import annotations

import math

import pytest
import torch

from tfcourse.efficient.memory import (RelativeMultiHeadAttention, TransformerXL, compress_memory, rel_shift,
                                       update_memory)
from tfcourse.positional import sinusoidal_encoding


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("T, K", [(4, 4), (3, 7), (5, 9), (1, 6)])
def test_rel_shift_moves_distance_columns_to_key_columns(T, K):
    x = randn(2, T, K)
    y = rel_shift(x)
    M = K - T
    for i in range(T):
        for j in range(K):
            if j <= M + i:  # a non-negative distance M + i - j: column K - 1 - (M + i - j) of x
                assert y[0, i, j] == x[0, i, K - 1 - (M + i - j)] and y[1, i, j] == x[1, i, j + T - 1 - i]


def test_relative_attention_equals_the_four_terms_written_out():
    torch.manual_seed(0)
    attn = RelativeMultiHeadAttention(8, 2).double()
    x, mem = randn(2, 5, 8, seed=1), randn(2, 3, 8, seed=2)
    out = attn(x, mem)
    context = torch.cat([mem, x], dim=1)
    M, hs = 3, 4
    q = attn.W_q(x).view(2, 5, 2, hs)
    k = attn.W_k(context).view(2, 8, 2, hs)
    v = attn.W_v(context).view(2, 8, 2, hs)
    heads = torch.zeros(2, 5, 2, hs, dtype=torch.float64)
    for b in range(2):
        for h in range(2):
            for i in range(5):
                scores = []
                for j in range(M + i + 1):  # causal over memory and segment
                    r = attn.W_r(sinusoidal_encoding(torch.tensor([M + i - j]), 8, dtype=torch.float64))[0]
                    r = r.view(2, hs)[h]
                    a = q[b, i, h] @ k[b, j, h] + q[b, i, h] @ r + attn.u[h] @ k[b, j, h] + attn.v[h] @ r
                    scores.append(a / math.sqrt(hs))
                w = torch.softmax(torch.stack(scores), 0)
                heads[b, i, h] = w @ v[b, :M + i + 1, h]
    expected = attn.W_o(heads.reshape(2, 5, 8))
    torch.testing.assert_close(out, expected)


def small_xl(mem_len, cmem_len=0, rate=2, seed=0):
    torch.manual_seed(seed)
    return TransformerXL(vocab_size=11, d_model=16, n_heads=2, n_layers=2, d_ff=32, mem_len=mem_len,
                         cmem_len=cmem_len, rate=rate).double().eval()


def run_segments(model, idx, T):
    state, outs = None, []
    for start in range(0, idx.shape[1], T):
        logits, state = model(idx[:, start:start + T], state)
        outs.append(logits)
    return torch.cat(outs, dim=1), state


def test_segments_with_a_long_memory_equal_the_whole_sequence_at_once():
    model = small_xl(mem_len=64)
    idx = torch.randint(0, 11, (3, 32), generator=torch.Generator().manual_seed(0))
    segmented, (memories, _) = run_segments(model, idx, 8)
    whole, _ = model(idx)
    torch.testing.assert_close(segmented, whole)
    assert all(m.shape == (3, 32, 16) and not m.requires_grad for m in memories)


def test_memory_reach_is_layers_times_memory():
    idx = torch.randint(0, 11, (1, 32), generator=torch.Generator().manual_seed(1))
    changed = idx.clone()
    changed[0, 0] = (idx[0, 0] + 1) % 11
    model = small_xl(mem_len=8)
    a, _ = run_segments(model, idx, 8)
    b, _ = run_segments(model, changed, 8)
    diff = (a - b).abs().amax(dim=-1)[0]
    # token 0 reaches segment 2 (positions 16-23) through two layers of 8-token memories, not segment 3
    assert diff[16:24].min() > 0 and torch.equal(diff[24:], torch.zeros(8, dtype=torch.float64))
    # with a compressed memory of 4 slots (rate 2) token 0 is still seen by segment 3
    compressive = small_xl(mem_len=8, cmem_len=4, rate=2)
    a, (_, cmems) = run_segments(compressive, idx, 8)
    b, _ = run_segments(compressive, changed, 8)
    assert (a - b).abs()[0, 24:].amax() > 0 and all(c.shape == (1, 4, 16) for c in cmems)


def test_update_memory_is_a_fifo_and_compression_averages_the_evicted():
    h1, h2 = randn(1, 4, 3, seed=1), randn(1, 4, 3, seed=2)
    mem, cmem = update_memory(None, h1, mem_len=6, cmem_len=2, rate=2)
    assert torch.equal(mem, h1) and cmem is None
    mem, cmem = update_memory(mem, h2, mem_len=6, cmem_len=2, rate=2)
    assert torch.equal(mem, torch.cat([h1, h2], 1)[:, 2:])
    torch.testing.assert_close(cmem, h1[:, :2].mean(1, keepdim=True))
    mem, cmem = update_memory(mem, h1, mem_len=6, cmem_len=2, rate=2)
    evicted = torch.cat([h1, h2], 1)[:, 2:6]
    torch.testing.assert_close(cmem, compress_memory(evicted, 2))  # kept the last 2 of 3 slots
    assert cmem.shape == (1, 2, 3)
    no_memory, _ = update_memory(mem, h2, mem_len=0)
    assert no_memory.shape == (1, 0, 3)


def test_bad_inputs():
    with pytest.raises(ValueError, match="multiple of rate"):
        compress_memory(torch.randn(1, 5, 2), 2)
    attn = RelativeMultiHeadAttention(8, 2)
    with pytest.raises(ValueError, match="memory"):
        attn(torch.randn(2, 3, 8), torch.randn(1, 3, 8))
    with pytest.raises(ValueError, match="multiple of n_heads"):
        RelativeMultiHeadAttention(9, 2)
