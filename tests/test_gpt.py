"""tfcourse.models.gpt against its peer, Hugging Face's GPT2LMHeadModel (random small configurations built locally,
no download), and its own properties: generation with and without the KV cache, causality (a gradient test),
grouped-query attention, the prefix-LM mask, the parameter count, and bad inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model

from tfcourse.attention import causal_mask, kv_cache_bytes
from tfcourse.models import GPT, GPTConfig
from tfcourse.models.gpt import prefix_lm_mask

V, T_MAX = 53, 24
SMALL = dict(block_size=T_MAX, vocab_size=V, n_layer=2, n_head=4, n_embd=16)


def hf_model(dtype=torch.float64, seed=0, **overrides) -> GPT2LMHeadModel:
    """A random GPT-2 with random LayerNorm parameters and biases too (Hugging Face initialises those to 1 and 0)."""
    torch.manual_seed(seed)
    kwargs = dict(vocab_size=V, n_positions=T_MAX, n_embd=16, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    kwargs.update(overrides)
    model = GPT2LMHeadModel(GPT2Config(**kwargs)).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(0.0, 0.5 if "bias" in name else 1.0)
    return model.eval()


def small_gpt(seed=0, dtype=torch.float64, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**SMALL, **overrides})).to(dtype).eval()


def tokens(B=3, T=10, seed=1, vocab=V) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------- equality with Hugging Face

@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("overrides", [{}, {"activation_function": "gelu", "n_inner": 40},
                                       {"activation_function": "relu", "tie_word_embeddings": False}])
def test_from_hf_logits_equal_gpt2(dtype, tol, overrides):
    theirs = hf_model(dtype, **overrides)
    ours = GPT.from_hf(theirs)
    assert next(ours.parameters()).dtype == dtype and not ours.training
    assert (ours.lm_head.weight is ours.wte.weight) == overrides.get("tie_word_embeddings", True)
    idx = tokens(T=T_MAX)
    logits, _ = ours(idx)
    torch.testing.assert_close(logits, theirs(idx).logits, atol=tol, rtol=tol)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    assert ours.config.num_parameters() == sum(p.numel() for p in theirs.parameters())


def test_from_hf_loss_equals_gpt2_loss():
    theirs = hf_model(torch.float32)  # Hugging Face computes the loss in float32
    ours = GPT.from_hf(theirs)
    idx = tokens(T=12)
    _, loss = ours(idx[:, :-1], idx[:, 1:])  # ours takes the shifted targets; Hugging Face shifts the labels itself
    torch.testing.assert_close(loss, theirs(idx, labels=idx).loss)
    targets = idx[:, 1:].clone()
    targets[0, :4] = -100  # ignored positions
    labels = idx.clone()
    labels[0, 1:5] = -100
    torch.testing.assert_close(ours(idx[:, :-1], targets)[1], theirs(idx, labels=labels).loss)


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_tokens_equal_gpt2_generate(use_cache):
    theirs = hf_model(torch.float32, seed=3)
    ours = GPT.from_hf(theirs)
    prompt = tokens(B=2, T=4, seed=5)
    n_new = T_MAX - prompt.shape[1]  # Hugging Face cannot go beyond n_positions
    expected = theirs.generate(prompt, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                               pad_token_id=0, attention_mask=torch.ones_like(prompt))
    got = ours.generate(prompt, n_new, temperature=0.0, use_cache=use_cache)
    assert torch.equal(got, expected)
    # and greedy decoding is the argmax of our own logits at every step
    logits, _ = ours(got[:, :-1])
    assert torch.equal(logits[:, prompt.shape[1] - 1:].argmax(-1), got[:, prompt.shape[1]:])


def test_from_hf_copies_training_mode_and_dropout():
    theirs = hf_model(resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1).train()
    ours = GPT.from_hf(theirs)
    assert ours.training and ours.config.dropout == 0.1 and ours.h[0].attn.dropout == 0.1


def test_from_hf_rejects_what_it_does_not_implement():
    with pytest.raises(TypeError, match="GPT2LMHeadModel"):
        GPT.from_hf(GPT2Model(GPT2Config(vocab_size=V, n_positions=8, n_embd=8, n_layer=1, n_head=2)))
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        GPT.from_hf(hf_model(scale_attn_by_inverse_layer_idx=True))
    with pytest.raises(ValueError, match="activation_function"):
        GPT.from_hf(hf_model(activation_function="silu"))
    with pytest.raises(ValueError, match="pdrop"):
        GPT.from_hf(hf_model(resid_pdrop=0.1, attn_pdrop=0.0, embd_pdrop=0.1))


# --------------------------------------------------------------------------------- generation and the KV cache

@pytest.mark.parametrize("n_kv_heads", [None, 2, 1])
@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=1.3, top_k=7),
                                      dict(temperature=0.8, top_p=0.9)])
def test_generation_with_and_without_cache_gives_the_same_tokens(n_kv_heads, sampling):
    model = small_gpt(n_kv_heads=n_kv_heads)
    prompt = tokens(B=2, T=5)
    # 22 new tokens: the context grows past block_size = 24, so the window slides and the cache is rebuilt
    with_cache = model.generate(prompt, 22, use_cache=True, generator=torch.Generator().manual_seed(0), **sampling)
    without = model.generate(prompt, 22, use_cache=False, generator=torch.Generator().manual_seed(0), **sampling)
    assert with_cache.shape == (2, 27) and torch.equal(with_cache[:, :5], prompt)
    assert torch.equal(with_cache, without)


def test_generated_tokens_are_an_ordinary_tensor_that_training_code_may_use():
    # generate runs in inference mode; what it returns must still be usable as the input of a training step.
    model = small_gpt()
    out = model.generate(tokens(B=2, T=3), 4, temperature=0.0)
    assert not out.is_inference()
    model.train()
    loss = model(out[:, :-1], out[:, 1:])[1]
    loss.backward()
    assert model.wte.weight.grad is not None


def test_cached_forward_equals_full_forward():
    model = small_gpt()
    idx = tokens(T=12)
    full, _ = model(idx)
    caches = model.new_kv_caches()
    first, _ = model(idx[:, :7], kv_caches=caches)  # a prompt of 7, then one token at a time
    steps = [first] + [model(idx[:, t:t + 1], kv_caches=caches)[0] for t in range(7, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-12, rtol=1e-12)
    assert all(len(c) == 12 for c in caches)


def test_sampling_is_reproducible_and_varies_with_the_seed():
    model = small_gpt()
    prompt = tokens(B=1, T=3)
    a = model.generate(prompt, 15, generator=torch.Generator().manual_seed(1))
    b = model.generate(prompt, 15, generator=torch.Generator().manual_seed(1))
    c = model.generate(prompt, 15, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(model.generate(prompt, 0), prompt)


# --------------------------------------------------------------------------------- causality

def embedding_gradients(model: GPT, idx: torch.Tensor, **kwargs) -> torch.Tensor:
    """(T, T) matrix: entry (t, s) is the norm of d logits_t / d (token embedding at s), summed over the batch."""
    emb = model.wte(idx).detach().requires_grad_()  # (B, T, C), a leaf: the input of everything after wte
    handle = model.wte.register_forward_hook(lambda module, args, output: emb)
    try:
        logits, _ = model(idx, **kwargs)
        T = idx.shape[1]
        rows = []
        for t in range(T):
            (grad,) = torch.autograd.grad(logits[:, t].sum(), emb, retain_graph=True)  # (B, T, C)
            rows.append(grad.norm(dim=(0, 2)))
        return torch.stack(rows)  # (T, T)
    finally:
        handle.remove()


def test_no_position_attends_to_a_later_one():
    model = small_gpt()
    grads = embedding_gradients(model, tokens(B=2, T=9))
    future = torch.ones(9, 9, dtype=torch.bool).triu(1)
    assert (grads[future] == 0).all(), "a logit depends on a later token"
    assert (grads[~future] > 0).all(), "a logit does not depend on an earlier token or itself"


@pytest.mark.parametrize("P", [0, 1, 4, 9])
def test_prefix_lm_dependence(P):
    model = small_gpt(seed=2)
    grads = embedding_gradients(model, tokens(B=2, T=9), prefix_lengths=P)
    allowed = prefix_lm_mask(9, P)[0]  # (T, T): True = may attend
    assert (grads[~allowed] == 0).all()
    assert (grads[allowed] > 0).all()


# --------------------------------------------------------------------------------- the prefix-LM mask

def test_prefix_lm_mask_examples():
    assert torch.equal(prefix_lm_mask(5, 0)[0], causal_mask(5))
    assert prefix_lm_mask(5, 5).all() and prefix_lm_mask(5, 9).all()
    expected = torch.tensor([[1, 1, 0, 0],
                             [1, 1, 0, 0],
                             [1, 1, 1, 0],
                             [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(prefix_lm_mask(4, 2)[0], expected)
    batch = prefix_lm_mask(4, torch.tensor([0, 2, 4]))
    assert batch.shape == (3, 4, 4)
    assert torch.equal(batch[0], causal_mask(4)) and torch.equal(batch[1], expected) and batch[2].all()
    # with cached keys: the last query rows of the full mask
    assert torch.equal(prefix_lm_mask(2, 3, offset=4), prefix_lm_mask(6, 3)[:, 4:])


@settings(max_examples=50, deadline=None)
@given(T=st.integers(1, 12), P=st.integers(0, 14))
def test_prefix_lm_mask_property(T, P):
    mask = prefix_lm_mask(T, P)[0]
    for i in range(T):
        for j in range(T):
            assert mask[i, j] == (j <= i or (i < P and j < P) or j < P)
    # each row sees at least the causal keys, and the prefix block is all True
    assert (mask | ~causal_mask(T)).all() and mask[:P, :P].all()


def test_prefix_generation_with_and_without_cache():
    model = small_gpt(seed=4)
    prompt = tokens(B=2, T=6)
    a = model.generate(prompt, 10, temperature=0.0, prefix_lengths=torch.tensor([6, 3]), use_cache=True)
    b = model.generate(prompt, 10, temperature=0.0, prefix_lengths=torch.tensor([6, 3]), use_cache=False)
    assert torch.equal(a, b)
    # the prefix changes what the model predicts (unless by chance): compare with causal generation
    logits_prefix, _ = model(prompt, prefix_lengths=6)
    logits_causal, _ = model(prompt)
    assert not torch.allclose(logits_prefix[:, :5], logits_causal[:, :5])


# --------------------------------------------------------------------------------- grouped-query attention

def test_gqa_variant_runs_and_its_cache_is_smaller():
    prompt = tokens(B=2, T=10)
    sizes = {}
    for kv in (4, 2, 1):
        model = small_gpt(n_kv_heads=kv)
        assert model.h[0].attn.W_k.weight.shape == (kv * 4, 16)
        caches = model.new_kv_caches()
        logits, _ = model(prompt, kv_caches=caches)
        assert logits.shape == (2, 10, V) and torch.isfinite(logits).all()
        sizes[kv] = sum(c.nbytes for c in caches)
        assert sizes[kv] == kv_cache_bytes(2, kv, 4, 10, batch_size=2, bytes_per_element=8)  # float64
        assert sum(p.numel() for p in model.parameters()) == model.config.num_parameters()
    assert sizes[4] == 2 * sizes[2] == 4 * sizes[1]


# --------------------------------------------------------------------------------- configuration, parameters

def test_default_config_is_gpt2_small():
    config = GPTConfig()
    assert (config.n_layer, config.n_head, config.n_embd, config.block_size, config.vocab_size) == \
        (12, 12, 768, 1024, 50257)
    assert config.num_parameters() == 124_439_808  # the released gpt2 checkpoint's count
    assert config.num_parameters(non_embedding=True) == 124_439_808 - 50257 * 768 - 1024 * 768


@pytest.mark.parametrize("overrides", [{}, {"bias": False}, {"tie_weights": False}, {"n_kv_heads": 2},
                                       {"d_ff": 24, "n_kv_heads": 1, "bias": False, "tie_weights": False}])
def test_num_parameters_counts_the_model(overrides):
    model = small_gpt(**overrides)
    assert sum(p.numel() for p in model.parameters()) == model.config.num_parameters()


def test_weight_tying_and_initialisation():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=500, n_layer=4, n_head=4, n_embd=128))
    assert model.lm_head.weight is model.wte.weight
    idx = tokens(T=8, vocab=500)
    model(idx[:, :-1], idx[:, 1:])[1].backward()
    assert model.wte.weight.grad is not None
    std = 0.02 / (2 * 4) ** 0.5
    assert abs(model.h[0].attn.W_o.weight.std().item() - std) < 0.1 * std
    assert abs(model.h[1].mlp.linear1.weight.std().item() - 0.02) < 0.002
    assert (model.h[0].attn.W_q.bias == 0).all()


def test_loss_is_the_mean_cross_entropy():
    model = small_gpt()
    idx = tokens(T=9)
    logits, loss = model(idx[:, :-1], idx[:, 1:])
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, V), idx[:, 1:].reshape(-1)))
    assert model(idx)[1] is None


# --------------------------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("kwargs,match", [
    (dict(n_embd=10, n_head=4), "divisible by n_head"),
    (dict(n_kv_heads=3), "divisible by n_kv_heads"),
    (dict(n_layer=0), "n_layer"),
    (dict(block_size=2.5), "block_size"),
    (dict(dropout=1.0), "dropout"),
    (dict(activation="swish"), "activation"),
    (dict(d_ff=0), "d_ff"),
])
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**{**SMALL, **kwargs})


def test_bad_inputs_raise():
    model = small_gpt()
    with pytest.raises(TypeError, match="GPTConfig"):
        GPT(dict(SMALL))
    with pytest.raises(TypeError, match="idx"):
        model([[1, 2]])
    with pytest.raises(ValueError, match="integer"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="2 dimensions"):
        model(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="vocab_size"):
        model(torch.tensor([[0, V]]))
    with pytest.raises(ValueError, match="block_size"):
        model(tokens(T=T_MAX + 1))
    with pytest.raises(ValueError, match="targets"):
        model(tokens(T=5), tokens(T=4))
    with pytest.raises(ValueError, match="kv_caches"):
        model(tokens(T=5), kv_caches=model.new_kv_caches()[:1])
    caches = model.new_kv_caches()
    model(tokens(T=20), kv_caches=caches)
    with pytest.raises(ValueError, match="block_size"):
        model(tokens(T=5), kv_caches=caches)
    with pytest.raises(ValueError, match="prefix_lengths"):
        model(tokens(B=3, T=5), prefix_lengths=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(tokens(T=3), -1)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(tokens(T=3), 2, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(tokens(T=3), 2, top_p=0.0)
    with pytest.raises(ValueError, match="longer than the prompt"):
        model.generate(tokens(T=3), 2, prefix_lengths=4)
    with pytest.raises(ValueError, match="block_size"):
        model.generate(tokens(T=3), T_MAX, prefix_lengths=2)
    with pytest.raises(ValueError, match="non-negative"):
        prefix_lm_mask(3, -1)
    with pytest.raises(TypeError, match="prefix_lengths"):
        prefix_lm_mask(3, 1.5)
    with pytest.raises(ValueError, match="integer"):
        prefix_lm_mask(3, torch.tensor([1.0]))
