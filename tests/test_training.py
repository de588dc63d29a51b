"""tfcourse.training: the label-smoothed loss against F.cross_entropy, the schedules against the paper's formula and
Hugging Face's, the AdamW groups, and the loop (exact resume, gradient accumulation, autocast, bad inputs)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from tfcourse.positional import LearnedPositionalEmbedding
from tfcourse.training import (
    LabelSmoothingLoss,
    TrainHistory,
    accumulate_gradients,
    label_smoothed_cross_entropy,
    load_checkpoint,
    noam_lambda,
    noam_schedule,
    param_groups,
    save_checkpoint,
    shuffled_batches,
    train,
    warmup_cosine_lambda,
    warmup_cosine_schedule,
)

# ------------------------------------------------------------------------------------------------ label smoothing


@settings(max_examples=30, deadline=None)
@given(shape=st.lists(st.integers(1, 5), min_size=0, max_size=2), V=st.integers(2, 9),
       smoothing=st.floats(0.0, 1.0), reduction=st.sampled_from(["mean", "sum", "none"]),
       ignore=st.sampled_from([-100, 0, 3]), seed=st.integers(0, 2**16))
def test_label_smoothing_equals_torch_cross_entropy(shape, V, smoothing, reduction, ignore, seed):
    g = torch.Generator().manual_seed(seed)
    shape = [2, *shape]
    logits = torch.randn(*shape, V, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, V, shape, generator=g)
    target.view(-1)[0] = ignore  # at least one ignored position
    target.view(-1)[-1] = 1  # and at least one that counts
    ours = label_smoothed_cross_entropy(logits, target, smoothing, ignore_index=ignore, reduction=reduction)
    theirs = F.cross_entropy(logits.reshape(-1, V), target.reshape(-1), label_smoothing=smoothing,
                             ignore_index=ignore, reduction=reduction)
    torch.testing.assert_close(ours.reshape(-1), theirs.reshape(-1), atol=1e-12, rtol=1e-12)
    module = LabelSmoothingLoss(smoothing, ignore_index=ignore, reduction=reduction)
    torch.testing.assert_close(module(logits, target), ours, atol=0.0, rtol=0.0)
    g_ours, = torch.autograd.grad(ours.sum(), logits)
    g_theirs, = torch.autograd.grad(theirs.sum(), logits)
    torch.testing.assert_close(g_ours, g_theirs, atol=1e-12, rtol=1e-12)


def test_label_smoothing_by_hand():
    """One row: V = 4, eps = 0.2, target 2; the smoothed distribution puts 0.85 on the target, 0.05 elsewhere."""
    logits = torch.tensor([[1.0, 2.0, 0.5, -1.0]], dtype=torch.float64)
    log_p = logits.log_softmax(-1)[0]
    q = torch.tensor([0.05, 0.05, 0.85, 0.05], dtype=torch.float64)
    expected = -(q * log_p).sum()
    torch.testing.assert_close(label_smoothed_cross_entropy(logits, torch.tensor([2]), 0.2), expected)
    # eps = 0 is the plain cross-entropy
    torch.testing.assert_close(label_smoothed_cross_entropy(logits, torch.tensor([2]), 0.0), -log_p[2])


def test_label_smoothing_when_everything_is_ignored_gives_zero_not_nan():
    logits = torch.randn(3, 5)
    target = torch.zeros(3, dtype=torch.long)
    assert torch.isnan(F.cross_entropy(logits, target, ignore_index=0, label_smoothing=0.1))
    assert label_smoothed_cross_entropy(logits, target, 0.1, ignore_index=0).item() == 0.0


def test_label_smoothing_bad_inputs_raise():
    logits, target = torch.randn(2, 3, 5), torch.randint(0, 5, (2, 3))
    with pytest.raises(ValueError, match="smoothing"):
        label_smoothed_cross_entropy(logits, target, 1.5)
    with pytest.raises(ValueError, match="smoothing"):
        LabelSmoothingLoss(-0.1)
    with pytest.raises(ValueError, match="reduction"):
        label_smoothed_cross_entropy(logits, target, reduction="avg")
    with pytest.raises(ValueError, match="target must have the shape"):
        label_smoothed_cross_entropy(logits, target[:, :2])
    with pytest.raises(TypeError, match="integer class ids"):
        label_smoothed_cross_entropy(logits, target.float())
    with pytest.raises(TypeError, match="floating"):
        label_smoothed_cross_entropy(target, target[:, 0])
    with pytest.raises(ValueError, match=r"lie in \[0, 5\)"):
        label_smoothed_cross_entropy(logits, target + 5)
    with pytest.raises(TypeError, match="torch.Tensor"):
        label_smoothed_cross_entropy(logits, [1, 2])


# ----------------------------------------------------------------------------------------------------- schedules

def test_noam_schedule_is_eq_3():
    d, w = 512, 4000
    for step in (1, 10, 1000, 3999, 4000, 4001, 10_000, 100_000):
        expected = d ** -0.5 * min(step ** -0.5, step * w ** -1.5)
        assert math.isclose(noam_schedule(step, d, w), expected, rel_tol=1e-12)
    assert noam_schedule(0, d, w) == 0.0
    peak = noam_schedule(w, d, w)
    assert math.isclose(peak, (d * w) ** -0.5)
    assert all(noam_schedule(s, d, w) < peak for s in (w - 1, w + 1))
    assert math.isclose(noam_schedule(2 * w, d, w) / noam_schedule(8 * w, d, w), 2.0)  # 1/sqrt decay
    assert math.isclose(noam_schedule(w // 2, d, w) / noam_schedule(w // 4, d, w), 2.0)  # linear warm-up


def test_noam_lambda_drives_lambda_lr_and_its_state_loads_safely(tmp_path):
    param = nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.Adam([param], lr=1.0)
    scheduler = LambdaLR(optimizer, noam_lambda(64, warmup=10, factor=2.0))
    lrs = []
    for _ in range(30):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([2.0 * noam_schedule(i + 1, 64, 10) for i in range(30)], rel=1e-12)
    torch.save(scheduler.state_dict(), tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)  # plain numbers only, no pickled functions
    fresh = LambdaLR(torch.optim.Adam([param], lr=1.0), noam_lambda(64, warmup=10, factor=2.0))
    fresh.load_state_dict(state)
    assert fresh.last_epoch == 30


def test_warmup_cosine_equals_hugging_face():
    transformers = pytest.importorskip("transformers")
    warmup, total, ratio = 7, 50, 0.1
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    hf = transformers.get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup, total, min_lr_rate=ratio)
    for step in range(total + 1):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(warmup_cosine_schedule(step, warmup, total, ratio),
                                                                abs=1e-12)
        optimizer.step()
        hf.step()


@settings(max_examples=50, deadline=None)
@given(warmup=st.integers(0, 20), extra=st.integers(1, 50), ratio=st.floats(0.0, 1.0), step=st.integers(0, 200))
def test_warmup_cosine_properties(warmup, extra, ratio, step):
    total = warmup + extra
    m = warmup_cosine_schedule(step, warmup, total, ratio)
    assert 0.0 <= m <= 1.0 + 1e-12
    assert warmup_cosine_schedule(warmup, warmup, total, ratio) == pytest.approx(1.0)
    if step >= total:
        assert m == pytest.approx(ratio)
    if warmup <= step:
        assert m >= ratio - 1e-12
        assert warmup_cosine_schedule(step + 1, warmup, total, ratio) <= m + 1e-12  # non-increasing after warm-up
    else:
        assert m == pytest.approx(step / warmup)
    assert warmup_cosine_lambda(warmup, total, ratio)(step) == m


def test_schedule_bad_inputs_raise():
    with pytest.raises(ValueError, match="step"):
        noam_schedule(-1, 512, 4000)
    with pytest.raises(ValueError, match="warmup"):
        noam_schedule(1, 512, 0)
    with pytest.raises(ValueError, match="d_model"):
        noam_lambda(0)
    with pytest.raises(ValueError, match="factor"):
        noam_lambda(512, 4000, factor=0.0)
    with pytest.raises(ValueError, match="total must exceed warmup"):
        warmup_cosine_lambda(10, 10)
    with pytest.raises(ValueError, match="min_ratio"):
        warmup_cosine_schedule(0, 1, 10, min_ratio=1.5)


# -------------------------------------------------------------------------------------------------- AdamW groups

class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.pos = LearnedPositionalEmbedding(8, 4)
        self.norm = nn.LayerNorm(4)
        self.hidden = nn.Linear(4, 4)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.out = nn.Linear(4, 10)
        self.out.weight = self.emb.weight  # tied


def test_param_groups_follow_the_rule():
    model = Tiny()
    decay, no_decay = param_groups(model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decay["param_names"] == ["hidden.weight"]
    assert sorted(no_decay["param_names"]) == sorted(["emb.weight", "pos.weight", "norm.weight", "norm.bias",
                                                      "hidden.bias", "out.bias"])
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    grouped = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert sorted(grouped) == sorted(trainable)  # each trainable parameter exactly once
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]


def test_param_groups_bad_inputs_raise():
    with pytest.raises(TypeError, match="nn.Module"):
        param_groups([nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match="weight_decay"):
        param_groups(Tiny(), -0.1)


# ---------------------------------------------------------------------------------------------------- the loop

D_IN, N_DATA = 6, 64


def regression_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_DATA, D_IN, generator=g, dtype=torch.float64)
    return x, (x.sin() @ torch.randn(D_IN, 1, generator=g, dtype=torch.float64)).squeeze(-1)


def make_model(seed=0, dropout=0.2):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 1)).double()


def mse(model, batch):
    x, y = batch
    return F.mse_loss(model(x).squeeze(-1), y)


def batch_fn(data, size=8):
    """Micro-batch i: indices drawn by a generator seeded with i (a deterministic function of i)."""
    x, y = data

    def batches(i):
        idx = torch.randint(0, N_DATA, (size,), generator=torch.Generator().manual_seed(1000 + i))
        return x[idx], y[idx]

    return batches


def setup(seed=0):
    model = make_model(seed)
    optimizer = torch.optim.AdamW(param_groups(model, 0.01), lr=1.0)
    scheduler = LambdaLR(optimizer, noam_lambda(16, warmup=3, factor=0.5))
    return model, optimizer, scheduler


def test_resume_gives_exactly_the_uninterrupted_run(tmp_path):
    """Dropout (the global RNG), AdamW's moments, the schedule and accumulation all survive a checkpoint."""
    data = regression_data()
    kwargs = dict(clip_grad_norm=0.5, grad_accum_steps=2, progress=False)
    model, optimizer, scheduler = setup()
    torch.manual_seed(123)
    full = train(model, batch_fn(data), mse, optimizer, 10, scheduler=scheduler, **kwargs)

    model2, optimizer2, scheduler2 = setup()
    torch.manual_seed(123)
    path = tmp_path / "run.pt"
    first = train(model2, batch_fn(data), mse, optimizer2, 6, scheduler=scheduler2, checkpoint_path=path,
                  checkpoint_every=3, **kwargs)
    assert first.step == 6
    torch.manual_seed(999)  # whatever happens in between, the checkpoint restores the random state
    model3, optimizer3, scheduler3 = setup(seed=7)  # fresh objects, other initial weights
    resumed = train(model3, batch_fn(data), mse, optimizer3, 10, scheduler=scheduler3, checkpoint_path=path,
                    resume=True, **kwargs)
    for p, q in zip(model.parameters(), model3.parameters()):
        assert torch.equal(p, q)
    assert resumed.losses == full.losses and resumed.lrs == full.lrs and resumed.grad_norms == full.grad_norms
    assert resumed.step == 10 and not model3.training


def test_resume_with_an_iterable_of_batches(tmp_path):
    data = regression_data()
    fn = batch_fn(data)
    stream = [fn(i) for i in range(12)]
    model, optimizer, _ = setup()
    train(model, stream, mse, optimizer, 12, progress=False)
    model2, optimizer2, _ = setup()
    train(model2, stream, mse, optimizer2, 5, checkpoint_path=tmp_path / "c.pt", progress=False)
    model3, optimizer3, _ = setup(seed=3)
    train(model3, stream, mse, optimizer3, 12, checkpoint_path=tmp_path / "c.pt", resume=True, progress=False)
    for p, q in zip(model.parameters(), model3.parameters()):
        assert torch.equal(p, q)


def test_accumulated_gradients_equal_one_big_batch():
    data = regression_data()
    x, y = data
    model = make_model(dropout=0.0)
    k, size = 4, 8
    micro = [(x[i * size:(i + 1) * size], y[i * size:(i + 1) * size]) for i in range(k)]
    model.zero_grad()
    loss = accumulate_gradients(model, mse, micro)
    accumulated = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    big = mse(model, (x[: k * size], y[: k * size]))
    big.backward()
    for a, b in zip(accumulated, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    assert loss == pytest.approx(big.item(), rel=1e-12)


def test_training_with_accumulation_equals_training_with_big_batches():
    x, y = regression_data()
    k, size = 4, 8
    small = lambda i: (x[(i % 8) * size:(i % 8 + 1) * size], y[(i % 8) * size:(i % 8 + 1) * size])  # noqa: E731
    big = lambda i: (x[(i % 2) * k * size:(i % 2 + 1) * k * size],  # noqa: E731
                     y[(i % 2) * k * size:(i % 2 + 1) * k * size])
    m1, m2 = make_model(dropout=0.0), make_model(dropout=0.0)
    h1 = train(m1, small, mse, torch.optim.SGD(m1.parameters(), lr=0.1), 6, grad_accum_steps=k, progress=False)
    h2 = train(m2, big, mse, torch.optim.SGD(m2.parameters(), lr=0.1), 6, progress=False)
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, atol=1e-12, rtol=1e-12)
    assert h1.losses == pytest.approx(h2.losses, rel=1e-12)


def test_clipping_records_the_norm_and_bounds_the_update():
    x, y = regression_data()
    model = make_model(dropout=0.0)
    before = [p.detach().clone() for p in model.parameters()]
    history = train(model, lambda i: (x, 100 * y), mse, torch.optim.SGD(model.parameters(), lr=1.0), 1,
                    clip_grad_norm=0.25, progress=False)
    assert history.grad_norms[0] > 0.25
    step = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    assert step.norm().item() == pytest.approx(0.25, rel=1e-6)


def test_bfloat16_autocast_trains():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, 16), nn.ReLU(), nn.Linear(16, 1))
    x, y = (t.float() for t in regression_data())
    seen = []

    def loss_fn(model, batch):
        out = model(batch[0])
        seen.append(out.dtype)
        return F.mse_loss(out.squeeze(-1).float(), batch[1])

    history = train(model, lambda i: (x, y), loss_fn, torch.optim.Adam(model.parameters(), 1e-2), 30,
                    autocast_dtype=torch.bfloat16, progress=True, desc="autocast")
    assert set(seen) == {torch.bfloat16}
    assert history.losses[-1] < 0.5 * history.losses[0]
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_non_finite_losses_raise_or_stop():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    nan_at_3 = lambda m, i: torch.tensor(float("nan")) if i >= 3 else mse(m, regression_data())  # noqa: E731

    def loss_fn(m, i):
        return nan_at_3(m, i) + 0.0 * sum(p.sum() for p in m.parameters())

    with pytest.raises(FloatingPointError, match="step 4"):
        train(model, lambda i: i, loss_fn, optimizer, 10, progress=False)
    history = train(model, lambda i: i, loss_fn, optimizer, 10, progress=False, on_nonfinite="stop")
    assert history.step == 4 and math.isnan(history.losses[-1])


def test_callback_sees_every_step():
    model, optimizer, scheduler = setup()
    steps = []
    train(model, batch_fn(regression_data()), mse, optimizer, 5, scheduler=scheduler, progress=False,
          callback=lambda step, history: steps.append((step, history.step)))
    assert steps == [(i, i) for i in range(1, 6)]


def test_save_and_load_checkpoint(tmp_path):
    model, optimizer, scheduler = setup()
    history = TrainHistory([1.0, 0.5], [0.1, 0.2], [3.0, 2.0])
    save_checkpoint(tmp_path / "sub" / "c.pt", model, optimizer, 2, scheduler, history=history)
    other, optimizer2, scheduler2 = setup(seed=5)
    step, loaded = load_checkpoint(tmp_path / "sub" / "c.pt", other, optimizer2, scheduler2)
    assert step == 2 and loaded == history
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), other.parameters()))
    with pytest.raises(ValueError, match="scheduler"):
        load_checkpoint(tmp_path / "sub" / "c.pt", other, optimizer2)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt", other)


def test_train_bad_inputs_raise(tmp_path):
    model, optimizer, _ = setup()
    fn = batch_fn(regression_data())
    with pytest.raises(ValueError, match="steps"):
        train(model, fn, mse, optimizer, 0)
    with pytest.raises(ValueError, match="grad_accum_steps"):
        train(model, fn, mse, optimizer, 2, grad_accum_steps=0)
    with pytest.raises(ValueError, match="clip_grad_norm"):
        train(model, fn, mse, optimizer, 2, clip_grad_norm=-1.0)
    with pytest.raises(ValueError, match="checkpoint_path"):
        train(model, fn, mse, optimizer, 2, resume=True)
    with pytest.raises(ValueError, match="autocast_dtype"):
        train(model, fn, mse, optimizer, 2, autocast_dtype=torch.float64)
    with pytest.raises(ValueError, match="on_nonfinite"):
        train(model, fn, mse, optimizer, 2, on_nonfinite="ignore")
    with pytest.raises(FileNotFoundError):
        train(model, fn, mse, optimizer, 2, checkpoint_path=tmp_path / "none.pt", resume=True, progress=False)
    with pytest.raises(ValueError, match="scalar"):
        train(model, fn, lambda m, b: m(b[0]), optimizer, 2, progress=False)


def test_shuffled_batches_are_epochs_of_permutations():
    fn = shuffled_batches(10, 3, seed=4)
    assert len(fn) == 3  # the tenth example waits for another epoch
    for epoch in range(3):
        seen = torch.cat([fn(epoch * 3 + k) for k in range(3)])
        assert len(set(seen.tolist())) == 9 and seen.min() >= 0 and seen.max() < 10
    assert not torch.equal(fn(0), fn(3))  # reshuffled
    again = shuffled_batches(10, 3, seed=4)
    assert all(torch.equal(fn(i), again(i)) for i in (7, 0, 5))  # a pure function of i, in any order
    assert not torch.equal(fn(0), shuffled_batches(10, 3, seed=5)(0))
    assert sorted(shuffled_batches(4, 8)(2).tolist()) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="batch_size"):
        shuffled_batches(10, 0)
    with pytest.raises(ValueError, match="i must"):
        fn(-1)
