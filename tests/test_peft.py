"""tfcourse.peft: LoRA (against Hugging Face peft), adapters and prompt tuning."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tfcourse.models import GPT, GPTConfig
from tfcourse.peft import (Adapter, LoRALinear, PromptTunedGPT, add_adapters, apply_lora, count_parameters,
                           freeze)

V, T_MAX = 37, 20
SMALL = dict(block_size=T_MAX, vocab_size=V, n_layer=2, n_head=4, n_embd=16)


def small_gpt(seed=0, dtype=torch.float64) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**SMALL)).to(dtype).eval()


def random_lora(d_in=12, d_out=7, r=3, alpha=6.0, seed=0, dtype=torch.float64) -> LoRALinear:
    torch.manual_seed(seed)
    layer = LoRALinear(nn.Linear(d_in, d_out).to(dtype), r, alpha)
    with torch.no_grad():
        layer.lora_B.normal_()  # a trained update (B starts at zero)
    return layer.eval()


# ----------------------------------------------------------------------------------------------------------------
# LoRA
# ----------------------------------------------------------------------------------------------------------------

def test_lora_with_b_zero_changes_nothing():
    torch.manual_seed(0)
    base = nn.Linear(12, 7).double()
    reference = copy.deepcopy(base)
    layer = LoRALinear(base, r=4, alpha=16)
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    assert torch.equal(layer(x), reference(x))


@settings(max_examples=25, deadline=None)
@given(d_in=st.integers(2, 20), d_out=st.integers(2, 20), r=st.integers(1, 8), alpha=st.floats(0.5, 32.0),
       seed=st.integers(0, 10_000))
def test_merged_equals_unmerged_and_unmerge_restores(d_in, d_out, r, alpha, seed):
    r = min(r, d_in, d_out)
    layer = random_lora(d_in, d_out, r, alpha, seed)
    original = layer.base.weight.detach().clone()
    x = torch.randn(4, d_in, dtype=torch.float64)
    unmerged = layer(x)
    assert not torch.allclose(unmerged, layer.base(x))  # the update does something
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-12, atol=1e-12)
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, original, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-12, atol=1e-12)


def test_delta_weight_has_rank_r():
    layer = random_lora(16, 10, r=3)
    assert torch.linalg.matrix_rank(layer.delta_weight()).item() == 3


def test_merged_layer_refuses_to_train():
    layer = random_lora().merge().train()
    with pytest.raises(ValueError, match="unmerge"):
        layer(torch.randn(2, 12, dtype=torch.float64))


@pytest.mark.parametrize("r,alpha", [(1, 1.0), (4, 8.0), (6, 3.0)])
def test_lora_equals_hugging_face_peft(r, alpha):
    """Our layer and peft's LoRA layer, on the same base weights and the same A and B: same outputs and gradients."""
    torch.manual_seed(r)
    theirs = nn.Sequential()
    theirs.add_module("proj", nn.Linear(10, 8).double())
    base = copy.deepcopy(theirs.proj)
    theirs = peft.inject_adapter_in_model(
        peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=["proj"]), theirs)
    ours = LoRALinear(base, r, alpha)
    with torch.no_grad():
        theirs.proj.lora_B["default"].weight.normal_()
        ours.lora_A.copy_(theirs.proj.lora_A["default"].weight)
        ours.lora_B.copy_(theirs.proj.lora_B["default"].weight)
    x = torch.randn(5, 10, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    out_ours, out_theirs = ours(x), theirs(x2)
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-6, atol=1e-6)
    grad = torch.randn_like(out_ours)
    out_ours.backward(grad)
    out_theirs.backward(grad)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.lora_A.grad, theirs.proj.lora_A["default"].weight.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.lora_B.grad, theirs.proj.lora_B["default"].weight.grad, rtol=1e-6, atol=1e-6)
    # peft's trainable parameters are exactly A and B, as ours
    assert {n for n, p in theirs.named_parameters() if p.requires_grad} == {
        "proj.lora_A.default.weight", "proj.lora_B.default.weight"}
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]


def test_lora_dropout_acts_on_the_low_rank_path_only():
    torch.manual_seed(0)
    base = nn.Linear(12, 7).double()
    layer = LoRALinear(copy.deepcopy(base), r=3, dropout=0.5).train()
    x = torch.randn(64, 12, dtype=torch.float64)
    assert torch.equal(layer(x), base(x))  # B = 0: whatever the dropout drops, the output is the base's
    with torch.no_grad():
        layer.lora_B.normal_()
    assert not torch.equal(layer(x), layer(x))  # train mode: random
    layer.eval()
    assert torch.equal(layer(x), layer(x))


def test_frozen_base_parameters_receive_no_update():
    gpt = small_gpt()
    before = {n: p.detach().clone() for n, p in gpt.named_parameters()}
    replaced = apply_lora(gpt, ("W_q", "W_v"), r=2, alpha=4)
    assert replaced == ["h.0.attn.W_q", "h.0.attn.W_v", "h.1.attn.W_q", "h.1.attn.W_v"]
    trainable = [n for n, p in gpt.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    optimizer = torch.optim.AdamW([p for p in gpt.parameters() if p.requires_grad], lr=0.1, weight_decay=0.1)
    gpt.train()
    idx = torch.randint(V, (4, 12))
    for _ in range(3):
        _, loss = gpt(idx[:, :-1], idx[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = dict(gpt.named_parameters())
    for name, value in before.items():
        new_name = name.replace("attn.W_q.", "attn.W_q.base.").replace("attn.W_v.", "attn.W_v.base.")
        assert after[new_name].grad is None, f"{new_name} got a gradient"
        assert torch.equal(after[new_name], value), f"{new_name} changed"
    assert any(not torch.equal(after[n], torch.zeros_like(after[n])) for n in trainable if n.endswith("lora_B"))


def test_count_parameters_of_lora_on_gpt():
    gpt = small_gpt()
    total_before = count_parameters(gpt)[1]
    apply_lora(gpt, ("W_q", "W_v"), r=2)
    trainable, total = count_parameters(gpt)
    assert trainable == 2 * 2 * (2 * 16 + 2 * 16)  # layers x projections x (A: r x 16, B: 16 x r)
    assert total == total_before + trainable


def test_lora_bad_arguments():
    with pytest.raises(TypeError, match="base"):
        LoRALinear(nn.Conv1d(3, 3, 1), r=1)
    with pytest.raises(ValueError, match="r must be positive"):
        LoRALinear(nn.Linear(4, 4), r=0)
    with pytest.raises(TypeError, match="r must be an int"):
        LoRALinear(nn.Linear(4, 4), r=2.0)
    with pytest.raises(ValueError, match="at most"):
        LoRALinear(nn.Linear(4, 3), r=4)
    with pytest.raises(ValueError, match="alpha"):
        LoRALinear(nn.Linear(4, 4), r=2, alpha=0)
    with pytest.raises(ValueError, match="dropout"):
        LoRALinear(nn.Linear(4, 4), r=2, dropout=1.0)
    with pytest.raises(ValueError, match=r"\(\.\.\., d_in\)"):
        LoRALinear(nn.Linear(4, 4), r=2)(torch.randn(2, 5))
    with pytest.raises(ValueError, match="match no nn.Linear"):
        apply_lora(small_gpt(), ("c_attn",))


# ----------------------------------------------------------------------------------------------------------------
# Adapters
# ----------------------------------------------------------------------------------------------------------------

def test_adapters_start_as_the_identity_and_only_they_train():
    gpt = small_gpt()
    reference = copy.deepcopy(gpt)
    adapters = add_adapters(gpt, bottleneck=4)
    assert len(adapters) == 2 * SMALL["n_layer"]
    idx = torch.randint(V, (3, 10))
    torch.testing.assert_close(gpt(idx)[0], reference(idx)[0], rtol=0, atol=0)
    trainable = {id(p) for p in gpt.parameters() if p.requires_grad}
    assert trainable == {id(p) for a in adapters for p in a.parameters()}
    assert count_parameters(gpt)[0] == len(adapters) * (16 * 4 + 4 + 4 * 16 + 16)
    with torch.no_grad():
        adapters[0].up.weight.normal_()
    assert not torch.allclose(gpt(idx)[0], reference(idx)[0])


def test_adapter_formula_and_bad_input():
    torch.manual_seed(0)
    adapter = Adapter(6, 2).double()
    with torch.no_grad():
        adapter.up.weight.normal_()
        adapter.up.bias.normal_()
    h = torch.randn(3, 6, dtype=torch.float64)
    expected = h + nn.functional.gelu(h @ adapter.down.weight.T + adapter.down.bias) @ adapter.up.weight.T \
        + adapter.up.bias
    torch.testing.assert_close(adapter(h), expected)
    with pytest.raises(ValueError, match="d_model"):
        adapter(torch.randn(3, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="bottleneck"):
        Adapter(6, 0)
    with pytest.raises(TypeError, match="GPT"):
        add_adapters(nn.Linear(3, 3), 2)


# ----------------------------------------------------------------------------------------------------------------
# Prompt tuning
# ----------------------------------------------------------------------------------------------------------------

def test_a_prompt_of_token_embeddings_equals_prepending_those_tokens():
    """With the prompt set to the embeddings of tokens p, the prompt-tuned model's logits are the GPT's on [p; x]."""
    gpt = small_gpt()
    prompt_ids = torch.tensor([3, 1, 4, 1, 5])
    tuned = PromptTunedGPT(gpt, 5, init_ids=prompt_ids).eval()
    idx = torch.randint(V, (2, 9))
    logits, _ = tuned(idx)
    full, _ = gpt(torch.cat([prompt_ids.expand(2, -1), idx], dim=1))
    torch.testing.assert_close(logits, full[:, 5:], rtol=1e-10, atol=1e-10)


def test_prompt_tuning_trains_only_the_prompt():
    gpt = small_gpt()
    frozen = {n: p.detach().clone() for n, p in gpt.named_parameters()}
    tuned = PromptTunedGPT(gpt, 4, generator=torch.Generator().manual_seed(0)).train()
    assert count_parameters(tuned)[0] == 4 * 16
    start = tuned.prompt.detach().clone()
    optimizer = torch.optim.Adam([tuned.prompt], lr=0.05)
    idx = torch.randint(V, (4, 12))
    losses = []
    for _ in range(20):
        _, loss = tuned(idx[:, :-1], idx[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert not torch.equal(tuned.prompt, start)
    for name, p in gpt.named_parameters():
        assert p.grad is None and torch.equal(p, frozen[name]), name


def test_prompt_tuning_bad_arguments():
    gpt = small_gpt()
    with pytest.raises(ValueError, match="n_virtual"):
        PromptTunedGPT(gpt, 0)
    with pytest.raises(ValueError, match="block_size"):
        PromptTunedGPT(gpt, T_MAX)
    with pytest.raises(ValueError, match=r"\(n_virtual,\)"):
        PromptTunedGPT(gpt, 3, init_ids=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="exceed block_size"):
        PromptTunedGPT(gpt, 5)(torch.randint(V, (1, T_MAX - 4)))
    with pytest.raises(TypeError, match="GPT"):
        PromptTunedGPT(nn.Linear(2, 2), 2)


def test_freeze_and_count_shared_weights_once():
    gpt = small_gpt()  # lm_head.weight is wte.weight
    trainable, total = count_parameters(gpt)
    assert trainable == total == gpt.config.num_parameters()
    freeze(gpt)
    assert count_parameters(gpt) == (0, total)
