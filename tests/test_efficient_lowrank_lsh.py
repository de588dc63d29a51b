"""tfcourse.efficient.lowrank (Linformer) and tfcourse.efficient.lsh (Reformer's LSH attention)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tfcourse.efficient.lowrank import LinformerSelfAttention, linformer_attention, random_projection
from tfcourse.efficient.lsh import (lsh_attention, lsh_attention_chunked, lsh_buckets, lsh_mask, random_rotations,
                                    top_key_recall)


def randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ------------------------------------------------------------------------------------------------------ Linformer

def test_linformer_with_identity_projection_is_attention():
    q, k, v = randn(2, 3, 16, 8, seed=1), randn(2, 3, 16, 8, seed=2), randn(2, 3, 16, 5, seed=3)
    eye = torch.eye(16, dtype=torch.float64)
    torch.testing.assert_close(linformer_attention(q, k, v, eye), F.scaled_dot_product_attention(q, k, v))


def test_linformer_equals_attention_over_projected_keys_and_values():
    q, k, v = randn(2, 12, 4, seed=1), randn(2, 40, 4, seed=2), randn(2, 40, 3, seed=3)
    E, Fp = random_projection(6, 40, torch.Generator().manual_seed(0), torch.float64), randn(6, 40, seed=9)
    expected = F.scaled_dot_product_attention(q, E @ k, Fp @ v)
    torch.testing.assert_close(linformer_attention(q, k, v, E, Fp), expected)
    assert linformer_attention(q, k, v, E).shape == (2, 12, 3)


def test_random_projection_keeps_norms_on_average():
    P = random_projection(256, 1000, torch.Generator().manual_seed(0), torch.float64)
    x = randn(1000, 20, seed=4)
    ratio = (P @ x).norm(dim=0) / x.norm(dim=0)
    assert (ratio - 1).abs().max() < 0.2 and abs(ratio.pow(2).mean().item() - 1) < 0.05


def test_linformer_layer_with_identity_projections_equals_torch_multihead_attention():
    torch.manual_seed(0)
    ours = LinformerSelfAttention(16, 4, seq_len=10, k=10).double()
    theirs = nn.MultiheadAttention(16, 4, batch_first=True).double()
    with torch.no_grad():
        for ours_linear, weight, bias in zip((ours.W_q, ours.W_k, ours.W_v), theirs.in_proj_weight.chunk(3),
                                             theirs.in_proj_bias.chunk(3)):
            ours_linear.weight.copy_(weight)
            ours_linear.bias.copy_(bias)
        ours.W_o.load_state_dict(theirs.out_proj.state_dict())
        ours.E.copy_(torch.eye(10))
        ours.F.copy_(torch.eye(10))
    x = randn(3, 10, 16, seed=5)
    torch.testing.assert_close(ours(x), theirs(x, x, x, need_weights=False)[0])
    shared = LinformerSelfAttention(16, 4, seq_len=10, k=3, share_kv=True)
    assert shared.E is shared.F and sum(p.numel() for p in shared.parameters()) == 4 * (16 * 16 + 16) + 3 * 10


def test_linformer_bad_inputs():
    layer = LinformerSelfAttention(8, 2, seq_len=6, k=2)
    with pytest.raises(ValueError, match=r"x must be \(B, 6, 8\)"):
        layer(torch.randn(1, 7, 8))
    with pytest.raises(ValueError, match="proj_k"):
        q = torch.randn(2, 6, 4)
        linformer_attention(q, q, q, torch.randn(3, 5))
    with pytest.raises(ValueError, match="multiple of n_heads"):
        LinformerSelfAttention(10, 3, 4, 2)


# ------------------------------------------------------------------------------------------------------ Reformer

def test_buckets_are_argmax_of_rotation_and_its_negation():
    x = randn(2, 9, 6, seed=1)
    R = random_rotations(6, 8, 3, torch.Generator().manual_seed(0), torch.float64)
    b = lsh_buckets(x, R)
    assert b.shape == (3, 2, 9) and b.min() >= 0 and b.max() < 8
    for r in range(3):
        for i in range(2):
            for t in range(9):
                proj = x[i, t] @ R[r]
                assert b[r, i, t] == torch.cat([proj, -proj]).argmax()
    # a vector and a positive multiple of it always share a bucket; a vector and its negation never do
    assert torch.equal(lsh_buckets(3.0 * x, R), b)
    assert not (lsh_buckets(-x, R) == b).any()


def test_lsh_mask_rule():
    buckets = torch.tensor([[[0, 1, 0, 2, 1]], [[3, 3, 0, 0, 1]]])  # two rounds, one sequence of 5
    mask = lsh_mask(buckets)[0]
    # same bucket in some round, never itself, unless alone (token 3: bucket 2 alone in round 0, shares 0 with 2)
    expected = torch.tensor([[0, 1, 1, 0, 0], [1, 0, 0, 0, 1], [1, 0, 0, 1, 0], [0, 0, 1, 0, 0], [0, 1, 0, 0, 0]],
                            dtype=torch.bool)
    assert torch.equal(mask, expected)
    causal = lsh_mask(buckets, causal=True)[0]
    assert torch.equal(causal, (expected & torch.ones(5, 5, dtype=torch.bool).tril()) | torch.tensor(
        [[1, 0, 0, 0, 0]] + [[0] * 5] * 4, dtype=torch.bool))  # token 0 has no past: itself only


def test_lsh_attention_with_one_bucket_is_shared_qk_attention_without_self():
    qk, v = randn(2, 12, 8, seed=1), randn(2, 12, 4, seed=2)
    ours = lsh_attention(qk, v, n_buckets=2, rotations=torch.zeros(1, 8, 1, dtype=torch.float64))  # one bucket
    keys = F.normalize(qk, dim=-1)
    expected = F.scaled_dot_product_attention(qk, keys, v, attn_mask=~torch.eye(12, dtype=torch.bool))
    torch.testing.assert_close(ours, expected)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n_rounds", [1, 3])
def test_chunked_with_one_chunk_equals_dense_lsh_attention(causal, n_rounds):
    qk, v = randn(2, 2, 16, 8, seed=3), randn(2, 2, 16, 4, seed=4)
    R = random_rotations(8, 4, n_rounds, torch.Generator().manual_seed(1), torch.float64)
    chunked = lsh_attention_chunked(qk, v, 4, chunk_size=16, causal=causal, rotations=R)
    if n_rounds == 1:
        torch.testing.assert_close(chunked, lsh_attention(qk, v, 4, causal=causal, rotations=R))
    else:  # rounds combined by their logsumexp: equal to one softmax over each round's keys, duplicates counted
        b = lsh_buckets(qk, R)
        masks = [lsh_mask(b[r:r + 1], causal) for r in range(n_rounds)]
        scores = (qk @ F.normalize(qk, dim=-1).transpose(-2, -1)) / 8 ** 0.5
        weights = sum(m * scores.exp() for m in masks)
        torch.testing.assert_close(chunked, (weights @ v) / weights.sum(-1, keepdim=True))


def test_chunked_attends_within_bucket_in_own_and_previous_chunk():
    T, c = 24, 4
    qk, v = randn(1, T, 6, seed=5), randn(1, T, 3, seed=6)
    R = random_rotations(6, 4, 1, torch.Generator().manual_seed(2), torch.float64)
    b = lsh_buckets(qk, R)[0, 0]
    order = (b * T + torch.arange(T)).argsort()
    chunk_of = torch.empty(T, dtype=torch.long)
    chunk_of[order] = torch.arange(T) // c
    n = T // c
    near = (chunk_of[:, None] == chunk_of[None, :]) | (chunk_of[:, None] == (chunk_of[None, :] + 1) % n)
    allowed = (b[:, None] == b[None, :]) & near
    others = allowed & ~torch.eye(T, dtype=torch.bool)
    allowed = others | (torch.eye(T, dtype=torch.bool) & ~others.any(-1, keepdim=True))
    expected = F.scaled_dot_product_attention(qk, F.normalize(qk, dim=-1), v, attn_mask=allowed)
    torch.testing.assert_close(lsh_attention_chunked(qk, v, 4, chunk_size=c, rotations=R), expected)


def test_more_rounds_find_more_of_the_true_top_keys():
    qk = randn(4, 128, 16, seed=7)
    recalls = []
    for n_rounds in (1, 2, 4, 8):
        R = random_rotations(16, 8, n_rounds, torch.Generator().manual_seed(0), torch.float64)
        recalls.append(top_key_recall(qk, lsh_mask(lsh_buckets(qk, R)), top=8))
    assert all(a < b for a, b in zip(recalls, recalls[1:])) and recalls[0] < 0.6 < recalls[-1] <= 1
    assert top_key_recall(qk, torch.ones(4, 128, 128, dtype=torch.bool)) == 1.0


def test_lsh_bad_inputs():
    with pytest.raises(ValueError, match="even"):
        random_rotations(4, 5)
    with pytest.raises(ValueError, match="multiple of chunk_size"):
        lsh_attention_chunked(torch.randn(10, 4), torch.randn(10, 4), 4, chunk_size=4)
    with pytest.raises(ValueError, match="rotations"):
        lsh_buckets(torch.randn(5, 4), torch.randn(1, 3, 2))
