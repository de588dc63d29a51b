"""Every model and main layer of tfcourse on a CUDA GPU: the same results as on the CPU, within float32 rounding;
bfloat16 autocast; and the Triton FlashAttention kernels compiled for real, against PyTorch's SDPA.

Run with ``pytest -m gpu`` (or ``pytest tests/test_gpu.py``) on a machine with a CUDA device. Elsewhere (a laptop,
CI) every test here is skipped with the reason "needs a CUDA device", and importing this file needs no GPU.

Each model test builds a tiny model on the CPU in float32 with a fixed seed (its parameters perturbed, so that no
LayerNorm is the identity and no zero-initialised layer hides a gradient), copies it to the GPU with
``copy.deepcopy(model).to(device)``, runs the same inputs on both, and compares the outputs and then the gradients
of every parameter after ``backward`` of one scalar (the model's own loss, or a fixed random projection of its
outputs: a plain ``.sum()`` would give zero gradients through softmaxes and LayerNorms). Greedy decoding must give
the same tokens on both devices.

A developer's dry run of the test code on the CPU: ``TFCOURSE_GPU_TEST_DEVICE=cpu pytest tests/test_gpu.py`` runs
the model tests with the "GPU" side on the CPU too, so it compares the CPU with itself and proves nothing about a
GPU; it only checks that the tests call the package correctly. The Triton tests still skip then (they need CUDA).
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F

from tfcourse.attention import KVCache, MultiHeadAttention
from tfcourse.device import autocast, bf16_supported
from tfcourse.efficient.flash import flash_attention
from tfcourse.efficient.linear import linear_attention, orthogonal_gaussian, performer_attention
from tfcourse.efficient.lowrank import LinformerSelfAttention, linformer_attention, random_projection
from tfcourse.efficient.lsh import lsh_attention, lsh_attention_chunked, lsh_buckets, random_rotations
from tfcourse.efficient.memory import RelativeMultiHeadAttention, TransformerXL, TransformerXLLayer
from tfcourse.efficient.sparse import bigbird_mask, sliding_window_attention, sliding_window_mask, sparse_attention
from tfcourse.hybrids import ConformerBlock, GraphAttentionLayer, clip_loss, shortest_path_distances
from tfcourse.layers import DecoderLayer, EncoderLayer, LayerStack
from tfcourse.models import BERT, BERTConfig, BERTForPreTraining, BERTForSequenceClassification
from tfcourse.models.bert import BERTForTokenClassification
from tfcourse.models.gpt import GPT, GPTConfig
from tfcourse.models.seq2seq import ATTENTION_KINDS, Seq2Seq, Seq2SeqConfig
from tfcourse.models.transformer import Transformer, TranslationTransformer
from tfcourse.models.vit import ViT, ViTConfig, WindowAttention
from tfcourse.moe import aux_loss, moe_gpt, moe_layers
from tfcourse.peft import PromptTunedGPT, add_adapters, apply_lora
from tfcourse.recurrent import MambaBlock, MultiScaleRetention, RWKVTimeMixing

# The device the "GPU" side runs on: CUDA, or the CPU for a developer's dry run (see the module docstring).
DEVICE = torch.device(os.environ.get("TFCOURSE_GPU_TEST_DEVICE", "cuda"))
DRY_RUN = DEVICE.type == "cpu"
ON_CUDA = DEVICE.type == "cuda" and torch.cuda.is_available()

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not (torch.cuda.is_available() or DRY_RUN),
                                                  reason="needs a CUDA device")]

# float32 on both devices, TF32 off (fixture below): the CPU and the GPU add the same products in other orders
# (blocked matrix products, tree reductions, atomic adds), each operation exact to a few float32 ulps (1.2e-7), and
# a few layers grow that to about 2e-6 of a tensor's scale. So: rtol 1e-4, and atol 1e-5 times the largest
# magnitude of the reference tensor (a gradient of a mean loss is small, and must be compared at its own scale),
# at least 1e-7. Measured on the CPU, float32 against float64 uses at most 8% of this tolerance in every test here,
# and the CPU-GPU difference is at most the sum of two such errors. With TF32 on (10-bit mantissa) the errors would
# be about 1e-3 instead.
RTOL, ATOL, ATOL_FLOOR = 1e-4, 1e-5, 1e-7


@pytest.fixture(autouse=True)
def full_float32_precision():
    """Turn TF32 off for matrix products and cuDNN (convolutions, RNNs) during a test, then restore the flags."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)  # every model is built from the same seed
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# --------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------

def to_device(obj, device):
    """``obj`` with every tensor in it (nested in tuples, named tuples, lists and dicts) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(to_device(o, device) for o in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def tensors_in(obj) -> list[torch.Tensor]:
    """The tensors of a (nested) output, in a fixed order; ``None`` entries are skipped."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in tensors_in(o)]
    if isinstance(obj, dict):
        return [t for k in sorted(obj) for t in tensors_in(obj[k])]
    return []


def assert_same(actual: torch.Tensor | None, expected: torch.Tensor | None, what: str, scale: float = 0.0) -> None:
    """``actual`` (from the GPU) equals ``expected`` (from the CPU): exactly for integer and bool tensors, within
    float32 rounding for floating ones, at the scale of ``expected`` or ``scale`` if that is larger."""
    assert (actual is None) == (expected is None), f"{what}: present on one device only"
    if expected is None:
        return
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    if not expected.is_floating_point():
        assert torch.equal(actual, expected), f"{what}: integer results differ"
        return
    scale = max(scale, expected.abs().max().item() if expected.numel() else 0.0)
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=max(ATOL * scale, ATOL_FLOOR),
                               msg=lambda m: f"{what}: {m}")


def largest(tensors) -> float:
    return max([t.abs().max().item() for t in tensors if t is not None and t.numel()], default=0.0)


def projection_loss(outputs) -> torch.Tensor:
    """A scalar from every floating output: ``sum(out * W)`` with fixed random ``W`` (the same on both devices)."""
    g = torch.Generator().manual_seed(1234)
    total = 0.0
    for out in tensors_in(outputs):
        if out.is_floating_point() and out.requires_grad:
            total = total + (out * torch.randn(out.shape, generator=g).to(out.device, out.dtype)).sum()
    return total


def perturb_(module: torch.nn.Module, std: float = 0.02, seed: int = 1) -> torch.nn.Module:
    """Add N(0, std^2) noise to every parameter (in place): LayerNorms away from (1, 0), zero-initialised heads,
    LoRA ``B`` and adapter ``up`` matrices away from zero, so that every gradient is non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.device, p.dtype) * std)
    return module


def compare_devices(model, call, *inputs, loss=projection_loss, grad_inputs=False):
    """Run ``call(model, *inputs)`` on the CPU and a deep copy on :data:`DEVICE`; compare the outputs, the scalar
    ``loss(outputs)`` and, after its backward, every parameter's gradient (and the floating inputs' ones with
    ``grad_inputs``). ``model`` may be ``None`` for a function. Returns ``(cpu_outputs, device_outputs)``."""
    models = [model, None if model is None else copy.deepcopy(model).to(DEVICE)]
    results = []
    for m, device in zip(models, (torch.device("cpu"), DEVICE), strict=True):
        args = to_device(inputs, device)
        leaves = []
        if grad_inputs:
            args = tuple(a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                         for a in args)
            leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        if m is not None:
            m.zero_grad(set_to_none=True)
        out = call(m, *args)
        value = loss(out)
        value.backward()
        grads = {} if m is None else {name: p.grad for name, p in m.named_parameters()}
        results.append((out, value, grads, [a.grad for a in leaves]))
    (out_cpu, loss_cpu, grads_cpu, in_cpu), (out_dev, loss_dev, grads_dev, in_dev) = results
    cpu_tensors, dev_tensors = tensors_in(out_cpu), tensors_in(out_dev)
    assert len(cpu_tensors) == len(dev_tensors)
    for i, (a, b) in enumerate(zip(dev_tensors, cpu_tensors, strict=True)):
        assert a.device.type == DEVICE.type, f"output {i} is on {a.device}, not on {DEVICE}"
        assert_same(a, b, f"output {i}")
    assert_same(loss_dev, loss_cpu, "loss")
    assert grads_cpu.keys() == grads_dev.keys()
    assert any(g is not None for g in grads_cpu.values()) or model is None, "no parameter got a gradient"
    # Gradients at the scale of the largest one: some are zero but for rounding (a key bias, since softmax ignores
    # a shift of all of a query's scores; a bias before a BatchNorm), noise of the size of the others' rounding.
    scale = largest([*grads_cpu.values(), *in_cpu])
    for name in grads_cpu:
        assert_same(grads_dev[name], grads_cpu[name], f"gradient of {name}", scale)
    for i, (a, b) in enumerate(zip(in_dev, in_cpu, strict=True)):
        assert_same(a, b, f"gradient of input {i}", scale)
    return out_cpu, out_dev


def generator_for(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def run_recording_margin(module: torch.nn.Module, run):
    """Return ``run()`` (on the CPU), after checking, from every output of ``module`` (a model's last linear layer),
    that the best and second-best logits at the last position were never within 1e-4 of each other: greedy
    decoding is only comparable across devices if no choice is a near-tie (a precondition of the test, not a
    property of the model)."""
    gaps = []

    def hook(_module, _inputs, output):
        last = output if output.dim() == 2 else output[:, -1]                # (B, V)
        top = last.float().topk(2, dim=-1).values
        gaps.append((top[:, 0] - top[:, 1]).min().item())

    handle = module.register_forward_hook(hook)
    try:
        result = run()
    finally:
        handle.remove()
    margin = min(gaps)
    assert margin > 1e-4, f"near-tie in greedy decoding (margin {margin}): choose another seed"
    return result


# --------------------------------------------------------------------------------------------------------------
# GPT
# --------------------------------------------------------------------------------------------------------------

V, T_MAX = 53, 24
GPT_SMALL = {"block_size": T_MAX, "vocab_size": V, "n_layer": 2, "n_head": 4, "n_embd": 16}


def small_gpt(**overrides) -> GPT:
    torch.manual_seed(0)
    return perturb_(GPT(GPTConfig(**{**GPT_SMALL, **overrides}))).eval()


def tokens(B=3, T=10, seed=1, vocab=V) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=generator_for(seed))


@pytest.mark.parametrize("overrides", [{}, {"n_kv_heads": 2}, {"n_kv_heads": 1, "bias": False},
                                       {"activation": "relu", "d_ff": 24, "tie_weights": False}],
                         ids=["gpt2", "gqa", "mqa-nobias", "relu-untied"])
def test_gpt_loss_logits_and_gradients(overrides):
    model = small_gpt(**overrides)
    idx = tokens(T=12)
    targets = idx[:, 1:].clone()
    targets[0, :3] = -100                                   # ignored positions
    compare_devices(model, lambda m, x, y: m(x, y), idx[:, :-1], targets, loss=lambda out: out[1])


def test_gpt_prefix_lm_mask():
    model = small_gpt()
    idx = tokens(T=10)
    prefix = torch.tensor([0, 4, 10])
    compare_devices(model, lambda m, x, p: m(x, prefix_lengths=p)[0], idx, prefix)


def test_gpt_kv_cache_forward():
    def cached(m, idx):
        caches = m.new_kv_caches()
        first, _ = m(idx[:, :7], kv_caches=caches)          # a prompt, then one token at a time
        steps = [first] + [m(idx[:, t:t + 1], kv_caches=caches)[0] for t in range(7, idx.shape[1])]
        return torch.cat(steps, dim=1)

    compare_devices(small_gpt(n_kv_heads=2), cached, tokens(T=12))


@pytest.mark.parametrize("use_cache", [True, False])
def test_gpt_greedy_generation_gives_the_same_tokens(use_cache):
    model = small_gpt()
    prompt = tokens(B=2, T=4, seed=5)
    n_new = 22  # past block_size = 24: the window slides and the cache is rebuilt
    expected = run_recording_margin(model.lm_head, lambda: model.generate(prompt, n_new, temperature=0.0,
                                                                          use_cache=use_cache))
    got = copy.deepcopy(model).to(DEVICE).generate(prompt.to(DEVICE), n_new, temperature=0.0, use_cache=use_cache)
    assert got.device.type == DEVICE.type
    # the same tokens; with the CPU's cache and no-cache tokens equal (tests/test_gpt.py), so are the device's
    assert torch.equal(got.cpu(), expected)


# --------------------------------------------------------------------------------------------------------------
# bfloat16 autocast
# --------------------------------------------------------------------------------------------------------------

def test_bf16_autocast_gpt_loss_close_to_float32_and_gradients_finite():
    if not DRY_RUN and not bf16_supported(DEVICE):
        pytest.skip("bfloat16 autocast needs a CUDA GPU with bf16 (compute capability 8.0 or more)")
    model = small_gpt(n_embd=64, n_head=4).to(DEVICE)
    idx = tokens(B=4, T=T_MAX + 1, seed=3).to(DEVICE)
    x, y = idx[:, :-1], idx[:, 1:]
    loss32 = model(x, y)[1]
    grads32 = torch.autograd.grad(loss32, list(model.parameters()))
    # On the dry run bf16 autocast is forced on the CPU, only to exercise this code.
    with autocast(DEVICE, enabled=True if DRY_RUN else None):
        logits, loss16 = model(x, y)
    assert logits.dtype == torch.bfloat16, "autocast did not run the matrix products in bfloat16"
    assert loss16.dtype == torch.float32                    # the loss stays float32 (autocast's float32 list)
    # bfloat16 keeps 8 bits of mantissa (relative rounding 4e-3 per product): the loss moves by about 1e-3
    torch.testing.assert_close(loss16, loss32, rtol=2e-2, atol=0.0)
    grads16 = torch.autograd.grad(loss16, list(model.parameters()))
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads16)
    # the bf16 gradient points where the float32 one does
    flat16, flat32 = torch.cat([g.flatten() for g in grads16]), torch.cat([g.flatten() for g in grads32])
    assert F.cosine_similarity(flat16, flat32, dim=0) > 0.99


# --------------------------------------------------------------------------------------------------------------
# BERT
# --------------------------------------------------------------------------------------------------------------

BERT_SMALL = {"vocab_size": 40, "d_model": 16, "n_layers": 2, "n_heads": 4, "d_ff": 32, "max_len": 16,
              "dropout": 0.0, "attention_dropout": 0.0}


def bert_inputs(B=3, T=9, seed=2):
    g = generator_for(seed)
    ids = torch.randint(1, BERT_SMALL["vocab_size"], (B, T), generator=g)
    token_types = (torch.arange(T) >= T // 2).long().expand(B, T).clone()
    lengths = torch.tensor([T, 5, 2])[:B]
    padding = torch.arange(T)[None, :] >= lengths[:, None]  # True at padding
    return ids.masked_fill(padding, 0), token_types, padding


@pytest.mark.parametrize("albert", [False, True], ids=["bert", "albert"])
def test_bert_encoder(albert):
    extra = {"share_layers": True, "d_embedding": 8} if albert else {}
    model = perturb_(BERT(BERTConfig(**BERT_SMALL, **extra))).eval()
    ids, types, padding = bert_inputs()
    compare_devices(model, lambda m, i, t, p: m(i, t, p, output_hidden_states=True), ids, types, padding)


def test_bert_pretraining_loss():
    model = perturb_(BERTForPreTraining(BERTConfig(**BERT_SMALL))).eval()
    ids, types, padding = bert_inputs()
    labels = torch.full_like(ids, -100)
    labels[0, 1], labels[1, 3], labels[2, 0] = 7, 11, 13    # the masked positions
    nsp = torch.tensor([0, 1, 0])
    compare_devices(model, lambda m, i, lab, t, p, n: m.loss(i, lab, t, p, n), ids, labels, types, padding, nsp,
                    loss=lambda out: out[0])


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_bert_sequence_classification(pooling):
    model = perturb_(BERTForSequenceClassification(BERTConfig(**BERT_SMALL), n_classes=3, pooling=pooling)).eval()
    ids, types, padding = bert_inputs()
    compare_devices(model, lambda m, i, t, p: m(i, t, p), ids, types, padding,
                    loss=lambda logits: F.cross_entropy(logits, torch.tensor([0, 2, 1], device=logits.device)))


def test_bert_token_classification():
    model = perturb_(BERTForTokenClassification(BERTConfig(**BERT_SMALL), n_labels=5)).eval()
    ids, types, padding = bert_inputs()
    compare_devices(model, lambda m, i, t, p: m(i, t, p), ids, types, padding)


# --------------------------------------------------------------------------------------------------------------
# ViT
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [{}, {"pooling": "mean"}, {"stem": "conv"}], ids=["cls", "mean", "conv-stem"])
def test_vit(overrides):
    config = ViTConfig(image_size=8, patch_size=2, in_channels=3, d_model=16, n_layers=2, n_heads=4, d_ff=32,
                       n_classes=5, **overrides)
    model = perturb_(ViT(config, pooler=overrides.get("pooling", "cls") == "cls")).eval()
    images = torch.randn(2, 3, 8, 8, generator=generator_for(3))
    compare_devices(model, lambda m, x: m(x, output_hidden_states=True, output_attentions=True), images)


@pytest.mark.parametrize("shift_size", [0, 2])
def test_swin_window_attention(shift_size):
    model = perturb_(WindowAttention(16, 4, window_size=4, shift_size=shift_size)).eval()
    x = torch.randn(2, 8, 8, 16, generator=generator_for(4))
    compare_devices(model, lambda m, x: m(x, need_weights=True), x)


# --------------------------------------------------------------------------------------------------------------
# The Transformer and the layers
# --------------------------------------------------------------------------------------------------------------

D_MODEL, N_HEADS, D_FF = 16, 4, 32


def padding_of(lengths, T) -> torch.Tensor:
    return torch.arange(T)[None, :] >= torch.as_tensor(lengths)[:, None]  # (B, T), True at padding


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-ln", "pre-ln"])
def test_transformer_on_embedded_sequences(norm_first):
    model = perturb_(Transformer(D_MODEL, N_HEADS, 2, 2, D_FF, dropout=0.0, norm_first=norm_first)).eval()
    g = generator_for(5)
    src, tgt = torch.randn(3, 7, D_MODEL, generator=g), torch.randn(3, 5, D_MODEL, generator=g)
    src_padding, tgt_padding = padding_of([7, 4, 1], 7), padding_of([5, 5, 3], 5)
    compare_devices(model, lambda m, s, t, sp, tp: m(s, t, src_key_padding_mask=sp, tgt_key_padding_mask=tp,
                                                     memory_key_padding_mask=sp, tgt_is_causal=True),
                    src, tgt, src_padding, tgt_padding, grad_inputs=True)


def translation_model(**kwargs) -> TranslationTransformer:
    torch.manual_seed(0)
    args = {"d_model": D_MODEL, "n_heads": N_HEADS, "num_encoder_layers": 2, "num_decoder_layers": 2, "d_ff": D_FF,
            "dropout": 0.0}
    return perturb_(TranslationTransformer(11, 13, **{**args, **kwargs})).eval()


def translation_batch(lengths=(5, 2, 4), T=4, seed=1):
    g = generator_for(seed)
    S = max(lengths)
    src = torch.randint(3, 11, (len(lengths), S), generator=g).masked_fill(padding_of(lengths, S), 0)
    tgt_in = torch.randint(3, 13, (len(lengths), T), generator=g)
    tgt_in[:, 0] = 1                                        # <bos>
    return src, torch.tensor(lengths), tgt_in


@pytest.mark.parametrize("kwargs", [{}, {"norm_first": True, "activation": "gelu", "tie_embeddings": False}],
                         ids=["post-ln-tied", "pre-ln-gelu"])
def test_translation_transformer(kwargs):
    src, src_lengths, tgt_in = translation_batch()
    targets = torch.randint(0, 13, tgt_in.shape, generator=generator_for(9))
    compare_devices(translation_model(**kwargs), lambda m, s, sl, t: m(s, sl, t), src, src_lengths, tgt_in,
                    loss=lambda logits: F.cross_entropy(logits.flatten(0, 1), targets.flatten().to(logits.device)))


def test_translation_transformer_greedy_decoding_gives_the_same_tokens():
    model = translation_model()
    with torch.no_grad():  # a confident generator, so that greedy choices are far from ties
        model.generator.weight.mul_(8.0)
    src, src_lengths, _ = translation_batch()
    expected = run_recording_margin(model.generator, lambda: model.generate(src, src_lengths, max_len=8))
    got = copy.deepcopy(model).to(DEVICE).generate(src.to(DEVICE), src_lengths.to(DEVICE), max_len=8)
    assert torch.equal(got.tokens.cpu(), expected.tokens) and torch.equal(got.lengths.cpu(), expected.lengths)
    assert_same(got.log_probs, expected.log_probs, "log_probs")


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-ln", "pre-ln"])
def test_encoder_layer(norm_first):
    layer = perturb_(EncoderLayer(D_MODEL, N_HEADS, D_FF, dropout=0.0, activation="gelu",
                                  norm_first=norm_first)).eval()
    x = torch.randn(3, 6, D_MODEL, generator=generator_for(6))
    padding = padding_of([6, 3, 1], 6)
    compare_devices(layer, lambda m, x, p: m(x, src_key_padding_mask=p, is_causal=True), x, padding,
                    grad_inputs=True)


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-ln", "pre-ln"])
def test_decoder_layer(norm_first):
    layer = perturb_(DecoderLayer(D_MODEL, N_HEADS, D_FF, dropout=0.0, norm_first=norm_first)).eval()
    g = generator_for(7)
    tgt, memory = torch.randn(3, 5, D_MODEL, generator=g), torch.randn(3, 7, D_MODEL, generator=g)
    compare_devices(layer, lambda m, t, mem, mp: m(t, mem, memory_key_padding_mask=mp, tgt_is_causal=True,
                                                   need_weights=True),
                    tgt, memory, padding_of([7, 2, 5], 7), grad_inputs=True)


def test_layer_stack_with_activation_checkpointing():
    # training mode with dropout 0: checkpointing recomputes each layer in backward, on the device too
    layers = [EncoderLayer(D_MODEL, N_HEADS, D_FF, dropout=0.0, norm_first=True) for _ in range(3)]
    stack = perturb_(LayerStack(layers, checkpoint=True)).train()
    x = torch.randn(2, 6, D_MODEL, generator=generator_for(8))
    compare_devices(stack, lambda m, x: m(x, is_causal=True), x, grad_inputs=True)


# --------------------------------------------------------------------------------------------------------------
# Multi-head attention
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_kv_heads", [None, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_multi_head_self_attention_with_padding(n_kv_heads, is_causal):
    attn = perturb_(MultiHeadAttention(D_MODEL, N_HEADS, n_kv_heads=n_kv_heads)).eval()
    x = torch.randn(3, 6, D_MODEL, generator=generator_for(9))
    # the last sequence is all padding: its queries attend to no key (zero weights, never NaN)
    padding = padding_of([6, 2, 0], 6)
    _, out_dev = compare_devices(
        attn, lambda m, x, p: m(x, x, x, key_padding_mask=p, is_causal=is_causal, need_weights=True,
                                average_attn_weights=False), x, padding, grad_inputs=True)
    assert torch.isfinite(out_dev[0]).all()


def test_multi_head_cross_attention_of_other_widths():
    attn = perturb_(MultiHeadAttention(D_MODEL, N_HEADS, kdim=10, vdim=12, n_kv_heads=2)).eval()
    g = generator_for(10)
    query, key, value = torch.randn(2, 5, D_MODEL, generator=g), torch.randn(2, 7, 10, generator=g), \
        torch.randn(2, 7, 12, generator=g)
    mask = torch.rand(5, 7, generator=g) < 0.3             # bool, True = may NOT attend
    mask[:, 0] = False
    compare_devices(attn, lambda m, q, k, v, am: m(q, k, v, attn_mask=am, need_weights=True), query, key, value,
                    mask, grad_inputs=True)


def test_multi_head_attention_kv_cache():
    attn = perturb_(MultiHeadAttention(D_MODEL, N_HEADS, n_kv_heads=2)).eval()
    x = torch.randn(2, 9, D_MODEL, generator=generator_for(11))

    def incremental(m, x):
        cache = KVCache()
        outs = [m(x[:, :4], x[:, :4], x[:, :4], is_causal=True, kv_cache=cache)[0]]
        outs += [m(x[:, t:t + 1], x[:, t:t + 1], x[:, t:t + 1], is_causal=True, kv_cache=cache)[0]
                 for t in range(4, 9)]
        assert len(cache) == 9 and cache.key.device.type == x.device.type
        return torch.cat(outs, dim=1)

    out_cpu, _ = compare_devices(attn, incremental, x, grad_inputs=True)
    full, _ = attn(x, x, x, is_causal=True)
    assert_same(out_cpu, full, "cached against full attention")


# --------------------------------------------------------------------------------------------------------------
# The RNN encoder-decoder
# --------------------------------------------------------------------------------------------------------------

def seq2seq_model(attention) -> Seq2Seq:
    torch.manual_seed(0)
    config = Seq2SeqConfig(11, 13, d_emb=6, d_hidden=8, d_attn=5, attention=attention)
    return perturb_(Seq2Seq(config)).eval()


@pytest.mark.parametrize("attention", ATTENTION_KINDS, ids=[str(k) for k in ATTENTION_KINDS])
def test_seq2seq_teacher_forcing(attention):
    src, src_lengths, tgt_in = translation_batch(lengths=(5, 2, 4), T=4)
    targets = torch.randint(0, 13, tgt_in.shape, generator=generator_for(12))

    def loss(out):
        return F.cross_entropy(out.logits.flatten(0, 1), targets.flatten().to(out.logits.device))

    # training mode: cuDNN's GRU backward refuses evaluation mode; the model has no dropout, so nothing changes
    compare_devices(seq2seq_model(attention).train(), lambda m, s, sl, t: m(s, sl, t), src, src_lengths, tgt_in,
                    loss=loss)


@pytest.mark.parametrize("attention", ATTENTION_KINDS, ids=[str(k) for k in ATTENTION_KINDS])
def test_seq2seq_greedy_decoding_gives_the_same_tokens(attention):
    model = seq2seq_model(attention)
    with torch.no_grad():  # a confident output layer, so that greedy choices are far from ties
        model.out.weight.mul_(8.0)
    src, src_lengths, _ = translation_batch(lengths=(5, 2, 4))
    expected, weights = run_recording_margin(model.out, lambda: model.greedy_decode(src, src_lengths, max_len=6))
    got, got_weights = copy.deepcopy(model).to(DEVICE).greedy_decode(src.to(DEVICE), src_lengths.to(DEVICE), 6)
    assert torch.equal(got.cpu(), expected)
    assert_same(got_weights, weights, "attention weights")


# --------------------------------------------------------------------------------------------------------------
# Mixture of experts
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k,capacity_factor", [(1, None), (2, None), (1, 0.5)], ids=["top1", "top2", "capacity"])
def test_moe_gpt_loss_aux_loss_and_gradients(k, capacity_factor):
    torch.manual_seed(0)
    model = perturb_(moe_gpt(GPTConfig(**GPT_SMALL), n_experts=4, k=k, capacity_factor=capacity_factor)).eval()
    idx = tokens(T=12, seed=4)

    def run(m, x, y):
        _, loss = m(x, y)
        return loss, aux_loss(m), [layer.last_stats.load for layer in moe_layers(m)]

    compare_devices(model, run, idx[:, :-1], idx[:, 1:], loss=lambda out: out[0] + 0.01 * out[1])


# --------------------------------------------------------------------------------------------------------------
# Recurrent alternatives: RWKV, RetNet, Mamba
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["parallel", "recurrent"])
def test_rwkv_time_mixing(mode):
    layer = perturb_(RWKVTimeMixing(12)).eval()
    x = torch.randn(2, 7, 12, generator=generator_for(13))
    compare_devices(layer, lambda m, x: m(x, mode=mode), x, grad_inputs=True)


def test_rwkv_time_mixing_continued_from_a_state():
    layer = perturb_(RWKVTimeMixing(12)).eval()
    x = torch.randn(2, 9, 12, generator=generator_for(14))

    def two_calls(m, x):
        first, state = m(x[:, :5], mode="recurrent")
        second, state = m(x[:, 5:], state=state, mode="recurrent")
        return first, second, state

    compare_devices(layer, two_calls, x, grad_inputs=True)


@pytest.mark.parametrize("mode", ["parallel", "recurrent", "chunkwise"])
def test_multi_scale_retention(mode):
    layer = perturb_(MultiScaleRetention(16, 2)).eval()
    x = torch.randn(2, 11, 16, generator=generator_for(15))
    compare_devices(layer, lambda m, x: m(x, mode=mode, chunk_size=4), x, grad_inputs=True)


@pytest.mark.parametrize("mode", ["parallel", "recurrent"])
def test_mamba_block(mode):
    torch.manual_seed(0)
    block = perturb_(MambaBlock(8, d_state=4)).eval()
    h = torch.randn(2, 9, 8, generator=generator_for(16))
    compare_devices(block, lambda m, h: m(h, mode=mode), h, grad_inputs=True)


# --------------------------------------------------------------------------------------------------------------
# Hybrids: Conformer, graph attention, CLIP's loss
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("training", [False, True], ids=["eval", "train-batchnorm"])
def test_conformer_block(training):
    # dropout is 0: training mode only switches BatchNorm to the batch's statistics
    block = perturb_(ConformerBlock(16, 4, kernel_size=5)).train(training)
    x = torch.randn(3, 8, 16, generator=generator_for(17))
    compare_devices(block, lambda m, x, p: m(x, key_padding_mask=p), x, padding_of([8, 5, 2], 8), grad_inputs=True)


def test_graph_attention_layer_and_shortest_paths():
    g = generator_for(18)
    adjacency = torch.rand(6, 6, generator=g) < 0.35
    adjacency = adjacency | adjacency.T
    adjacency[5, :] = adjacency[:, 5] = False              # an unreachable node
    distances = shortest_path_distances(adjacency)
    assert torch.equal(shortest_path_distances(adjacency.to(DEVICE)).cpu(), distances)
    layer = perturb_(GraphAttentionLayer(8, 2, max_distance=3)).eval()
    x = torch.randn(2, 6, 8, generator=g)
    compare_devices(layer, lambda m, x, d: m(x, d, need_weights=True), x, distances, grad_inputs=True)


def test_clip_loss():
    g = generator_for(19)
    images, texts = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    compare_devices(None, lambda _, i, t, s: clip_loss(i, t, s.exp()), images, texts, torch.tensor(math.log(1 / 0.07)),
                    loss=lambda out: out, grad_inputs=True)


# --------------------------------------------------------------------------------------------------------------
# Parameter-efficient fine-tuning
# --------------------------------------------------------------------------------------------------------------

def gpt_loss(m, x, y):
    return m(x, y)[1]


def test_lora_gpt():
    model = small_gpt()
    apply_lora(model, ("W_q", "W_v", "linear1"), r=2, alpha=4.0)
    perturb_(model, std=0.1, seed=2)                         # B starts at zero: move it, so A gets a gradient
    idx = tokens(T=11, seed=6)
    compare_devices(model, gpt_loss, idx[:, :-1], idx[:, 1:], loss=lambda loss: loss)


def test_lora_merged_equals_unmerged_on_the_device():
    model = small_gpt()
    apply_lora(model, ("W_q", "W_v"), r=2)
    perturb_(model, std=0.1, seed=2)
    model = model.to(DEVICE)
    idx = tokens(T=10, seed=7).to(DEVICE)
    with torch.no_grad():
        unmerged, _ = model(idx)
        for layer in model.modules():
            if hasattr(layer, "merge"):
                layer.merge()
        merged, _ = model(idx)
    assert_same(merged, unmerged, "merged LoRA logits")


def test_adapters_gpt():
    model = small_gpt()
    add_adapters(model, bottleneck=4)
    perturb_(model, std=0.1, seed=3)                         # the adapters' up projections start at zero
    idx = tokens(T=11, seed=8)
    compare_devices(model, gpt_loss, idx[:, :-1], idx[:, 1:], loss=lambda loss: loss)


def test_prompt_tuned_gpt():
    model = PromptTunedGPT(small_gpt(), n_virtual=3, init_ids=torch.tensor([1, 2, 3])).eval()
    idx = tokens(T=11, seed=9)
    compare_devices(model, gpt_loss, idx[:, :-1], idx[:, 1:], loss=lambda loss: loss)


# --------------------------------------------------------------------------------------------------------------
# Efficient attention (PyTorch implementations; the Triton kernels are below)
# --------------------------------------------------------------------------------------------------------------

def qkv(B=2, H=2, T=13, d=8, seed=20, Tk=None):
    g = generator_for(seed)
    Tk = T if Tk is None else Tk
    return torch.randn(B, H, T, d, generator=g), torch.randn(B, H, Tk, d, generator=g), \
        torch.randn(B, H, Tk, d, generator=g)


@pytest.mark.parametrize("is_causal", [False, True])
def test_flash_attention_pytorch_with_padding(is_causal):
    q, k, v = qkv(T=13, Tk=13)
    padding = padding_of([13, 6], 13)
    compare_devices(None, lambda _, q, k, v, p: flash_attention(q, k, v, is_causal=is_causal, block_size=(4, 8),
                                                               key_padding_mask=p), q, k, v, padding,
                    grad_inputs=True)


def test_sparse_attention_patterns():
    q, k, v = qkv(T=16)
    T = 16
    for mask in (sliding_window_mask(T, 2, causal=True), bigbird_mask(T, 2, n_random=2, generator=generator_for(1))):
        compare_devices(None, lambda _, q, k, v, m: sparse_attention(q, k, v, m), q, k, v, mask, grad_inputs=True)
    assert torch.equal(sliding_window_mask(T, 3, device=DEVICE).cpu(), sliding_window_mask(T, 3))


@pytest.mark.parametrize("causal", [False, True])
def test_sliding_window_attention(causal):
    q, k, v = qkv(T=17)
    compare_devices(None, lambda _, q, k, v: sliding_window_attention(q, k, v, window=3, causal=causal), q, k, v,
                    grad_inputs=True)


@pytest.mark.parametrize("causal", [False, True])
def test_linear_and_performer_attention(causal):
    q, k, v = qkv(T=12)
    projection = orthogonal_gaussian(16, 8, generator=generator_for(2))  # drawn once, on the CPU
    compare_devices(None, lambda _, q, k, v: linear_attention(q, k, v, causal=causal), q, k, v, grad_inputs=True)
    compare_devices(None, lambda _, q, k, v, p: performer_attention(q, k, v, causal=causal, projection=p),
                    q * 0.5, k * 0.5, v, projection, grad_inputs=True)


def test_lsh_attention():
    qk, _, v = qkv(T=16)
    rotations = random_rotations(8, n_buckets=4, n_rounds=2, generator=generator_for(3))
    # the hash is an argmax: the buckets must agree exactly before the outputs can
    assert torch.equal(lsh_buckets(qk.to(DEVICE), rotations.to(DEVICE)).cpu(), lsh_buckets(qk, rotations))
    compare_devices(None, lambda _, qk, v, r: lsh_attention(qk, v, 4, n_rounds=2, causal=True, rotations=r),
                    qk, v, rotations, grad_inputs=True)
    compare_devices(None, lambda _, qk, v, r: lsh_attention_chunked(qk, v, 4, chunk_size=4, n_rounds=2, rotations=r),
                    qk, v, rotations, grad_inputs=True)


def test_linformer():
    q, k, v = qkv(T=10)
    proj = random_projection(4, 10, generator=generator_for(4))
    compare_devices(None, lambda _, q, k, v, e: linformer_attention(q, k, v, e), q, k, v, proj, grad_inputs=True)
    layer = perturb_(LinformerSelfAttention(16, 4, seq_len=10, k=4)).eval()
    compare_devices(layer, lambda m, x: m(x), torch.randn(2, 10, 16, generator=generator_for(5)), grad_inputs=True)


def test_transformer_xl_layers_with_memory():
    g = generator_for(21)
    x, memory = torch.randn(2, 5, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    compare_devices(perturb_(RelativeMultiHeadAttention(8, 2)).eval(), lambda m, x, mem: m(x, mem), x, memory,
                    grad_inputs=True)
    compare_devices(perturb_(TransformerXLLayer(8, 2, 16)).eval(), lambda m, x, mem: m(x, mem), x, memory,
                    grad_inputs=True)


@pytest.mark.parametrize("cmem_len", [0, 4], ids=["xl", "compressive"])
def test_transformer_xl_over_segments(cmem_len):
    torch.manual_seed(0)
    model = perturb_(TransformerXL(vocab_size=11, d_model=16, n_heads=2, n_layers=2, d_ff=32, mem_len=6,
                                   cmem_len=cmem_len, rate=2)).eval()
    idx = torch.randint(0, 11, (2, 18), generator=generator_for(22))

    def segments(m, idx):
        state, outs = None, []
        for start in range(0, idx.shape[1], 6):
            logits, state = m(idx[:, start:start + 6], state)
            outs.append(logits)
        return torch.cat(outs, dim=1), state

    compare_devices(model, segments, idx)


# --------------------------------------------------------------------------------------------------------------
# The Triton FlashAttention kernels, compiled (not interpreted), against PyTorch's SDPA in half precision
# --------------------------------------------------------------------------------------------------------------

needs_compiled_triton = pytest.mark.skipif(
    not ON_CUDA or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs a CUDA device, and the compiled Triton kernels (TRITON_INTERPRET=1 runs the interpreter)")


@pytest.fixture(scope="module")
def triton_flash():
    try:
        from tfcourse.efficient import triton_flash as module
    except ImportError as error:  # triton is pinned in requirements.txt, but has wheels for Linux only
        pytest.skip(f"triton is not installed: {error}")
    assert not module.interpreter_enabled(), "the Triton kernels run in the interpreter, not compiled"
    return module


# (Tq, Tk): one token, exactly one block of 64, lengths that are not multiples of the blocks, a long one, and
# cross-attention with more keys than queries.
TRITON_LENGTHS = [(1, 1), (64, 64), (100, 100), (257, 257), (1000, 1000), (100, 300)]
# SDPA's own half-precision error, times this, bounds ours (plus one rounding unit at the tensor's scale). Both
# compute the same thing (float32 accumulators, probabilities rounded to half before the products with V, the
# output rounded once), so their errors against a float64 reference are of one size; a bug is far larger.
ERROR_FACTOR = 3.0


def half_precision_errors(ours: torch.Tensor, sdpa: torch.Tensor, reference: torch.Tensor, dtype) -> tuple:
    reference = reference.double()
    ours_error = (ours.double() - reference).abs().max().item()
    sdpa_error = (sdpa.double() - reference).abs().max().item()
    allowed = ERROR_FACTOR * sdpa_error + torch.finfo(dtype).eps * max(1.0, reference.abs().max().item())
    return ours_error, sdpa_error, allowed


@needs_compiled_triton
@pytest.mark.parametrize("lengths", TRITON_LENGTHS, ids=[f"{tq}x{tk}" for tq, tk in TRITON_LENGTHS])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_triton_kernels_in_half_precision_match_sdpa(triton_flash, dtype, is_causal, lengths):
    Tq, Tk = lengths
    B, H, d = 2, 3, 64
    g = generator_for(Tq * 7 + Tk + is_causal)
    q, k, v = (torch.randn(B, H, t, d, generator=g).to("cuda", dtype) for t in (Tq, Tk, Tk))
    grad_out = torch.randn(B, H, Tq, d, generator=g).to("cuda", dtype)
    # the reference: the same (half-precision) inputs, attended in float64
    ref_inputs = [t.double().requires_grad_() for t in (q, k, v)]
    reference = F.scaled_dot_product_attention(*ref_inputs, is_causal=is_causal)
    ref_grads = torch.autograd.grad(reference, ref_inputs, grad_out.double())

    ours_inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    ours = triton_flash.flash_attention_triton(*ours_inputs, is_causal=is_causal)
    sdpa_inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    sdpa = F.scaled_dot_product_attention(*sdpa_inputs, is_causal=is_causal)
    assert ours.dtype == dtype and ours.shape == sdpa.shape

    ours_error, sdpa_error, allowed = half_precision_errors(ours, sdpa, reference, dtype)
    assert ours_error <= allowed, f"output: error {ours_error:.3g}, SDPA's {sdpa_error:.3g}"
    # the module implements the backward pass too (two more kernels): dq, dk, dv
    ours_grads = torch.autograd.grad(ours, ours_inputs, grad_out)
    sdpa_grads = torch.autograd.grad(sdpa, sdpa_inputs, grad_out)
    for name, a, b, ref in zip(("dq", "dk", "dv"), ours_grads, sdpa_grads, ref_grads, strict=True):
        assert a.dtype == dtype and torch.isfinite(a).all()
        ours_error, sdpa_error, allowed = half_precision_errors(a, b, ref, dtype)
        assert ours_error <= allowed, f"{name}: error {ours_error:.3g}, SDPA's {sdpa_error:.3g}"


@needs_compiled_triton
def test_triton_kernels_accept_other_layouts_and_scales(triton_flash):
    # non-contiguous inputs (a transposed (B, T, H, d) layout) and an explicit scale, in float16
    g = generator_for(99)
    q, k, v = (torch.randn(2, 77, 4, 64, generator=g).to("cuda", torch.float16).transpose(1, 2) for _ in range(3))
    ours = triton_flash.flash_attention_triton(q, k, v, is_causal=True, scale=0.2)
    reference = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True, scale=0.2)
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.2)
    ours_error, sdpa_error, allowed = half_precision_errors(ours, sdpa, reference, torch.float16)
    assert ours_error <= allowed, f"output: error {ours_error:.3g}, SDPA's {sdpa_error:.3g}"
