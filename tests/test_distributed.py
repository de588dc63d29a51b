"""tfcourse.distributed: two CPU ranks started by torchrun (gloo) take the same steps as one process on the full
batch, with DistributedDataParallel and with the all-reduce written by hand; the shards, the configuration and its
command line; the memory arithmetic against the ZeRO paper's worked example; bad inputs."""

from __future__ import annotations

import pytest
import torch

from tfcourse.distributed import (
    DDPConfig,
    _parser,
    launch,
    make_batch,
    make_model,
    pipeline_bubble_fraction,
    run_single,
    shard,
    torchrun_command,
    training_memory_bytes,
    worker,
    zero_memory_per_device,
)

CONFIG = DDPConfig(steps=3, batch_size=8, seq_len=6, d_model=16, n_heads=2, d_ff=32)


@pytest.fixture(scope="module")
def ranks():
    return launch(CONFIG, nproc=2, timeout=180)


@pytest.mark.slow
def test_two_ranks_take_the_single_process_steps(ranks):
    """One torchrun launch (a few seconds: three Python processes import torch), compared with one process."""
    single = run_single(CONFIG)
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    for r in ranks:
        for mode in ("ddp", "manual"):
            got = r[mode]
            assert got["first_grads"].keys() == single["first_grads"].keys()
            for name in single["first_grads"]:
                # The mean of the two shard means is the mean over the whole batch: equal up to rounding.
                torch.testing.assert_close(got["first_grads"][name], single["first_grads"][name], atol=1e-6, rtol=1e-5)
                torch.testing.assert_close(got["params"][name], single["params"][name], atol=1e-6, rtol=1e-5)
    # Every rank ends with the same weights (the all-reduce gives every rank the same sum), by both methods.
    for name in single["params"]:
        for mode in ("ddp", "manual"):
            assert torch.equal(ranks[0][mode]["params"][name], ranks[1][mode]["params"][name])
        torch.testing.assert_close(ranks[0]["ddp"]["params"][name], ranks[0]["manual"]["params"][name],
                                   atol=1e-6, rtol=1e-5)
    # Each rank's loss is its shard's; their mean is the full batch's.
    mean_loss = [(a + b) / 2 for a, b in zip(ranks[0]["ddp"]["losses"], ranks[1]["ddp"]["losses"])]
    assert mean_loss == pytest.approx(single["losses"], abs=1e-5)
    assert ranks[0]["ddp"]["losses"] != ranks[1]["ddp"]["losses"]  # the shards differ


def test_the_comparison_can_fail():
    """The single-process run on half the batch (one shard) differs from the full batch: the test above compares
    things that would differ if the ranks did not average."""
    full = run_single(CONFIG)
    model = make_model(CONFIG)
    from tfcourse.distributed import loss_fn

    loss_fn(model, shard(make_batch(CONFIG, 0), 0, 2)).backward()
    diffs = [(p.grad - full["first_grads"][n]).abs().max().item() for n, p in model.named_parameters()]
    assert max(diffs) > 1e-3


def test_make_batch_and_model_are_deterministic():
    a, b = make_batch(CONFIG, 1), make_batch(CONFIG, 1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], a[0].sort(dim=1).values)
    assert not torch.equal(make_batch(CONFIG, 2)[0], a[0])
    m1, m2 = make_model(CONFIG), make_model(CONFIG)
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
    assert m1(a[0]).shape == (CONFIG.batch_size, CONFIG.seq_len, CONFIG.vocab)


def test_shard():
    x, y = torch.arange(12).view(6, 2), torch.arange(6)
    parts = [shard((x, y), r, 3) for r in range(3)]
    assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(parts[1][1], torch.tensor([2, 3]))
    with pytest.raises(ValueError, match="evenly"):
        shard((x, y), 0, 4)
    with pytest.raises(ValueError, match="rank"):
        shard((x, y), 3, 3)


def test_config_round_trips_through_the_command_line():
    config = DDPConfig(steps=5, lr=0.05, seed=3)
    args = vars(_parser().parse_args(["--out", "/tmp/x", *config.to_args()]))
    assert args.pop("out") == "/tmp/x" and DDPConfig(**args) == config
    command = torchrun_command(config, "/tmp/x", nproc=2)
    assert "--nproc_per_node=2" in command and "--rdzv-endpoint=127.0.0.1:0" in command
    assert command[command.index("-m", 3) + 1] == "tfcourse.distributed"


@pytest.mark.parametrize("bad", [dict(steps=0), dict(batch_size=-1), dict(lr=-0.1), dict(seed=-1),
                                 dict(d_model=10, n_heads=3), dict(steps=2.5), dict(lr=float("nan"))])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        DDPConfig(**bad)


def test_launch_and_worker_check_their_input(monkeypatch):
    with pytest.raises(ValueError, match="evenly"):
        launch(DDPConfig(batch_size=5), nproc=2)
    with pytest.raises(ValueError, match="nproc"):
        launch(CONFIG, nproc=0)
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        worker(CONFIG, "/tmp")


# ------------------------------------------------------------------------------------------- memory arithmetic

def test_mixed_precision_adam_costs_16_bytes_per_parameter():
    assert training_memory_bytes(10) == {"weights": 20, "grads": 20, "optimizer": 120, "total": 160}
    fp32 = training_memory_bytes(10, weight_bytes=4, grad_bytes=4, optimizer_bytes=8)
    assert fp32["total"] == 160 and fp32["optimizer"] == 80
    with pytest.raises(ValueError):
        training_memory_bytes(-1)


def test_zero_matches_the_papers_worked_example():
    """Rajbhandari et al. (2020), Fig. 1: 7.5 B parameters, 64 devices, K = 12: 120, 31.4, 16.6, 1.9 GB."""
    gb = [zero_memory_per_device(7_500_000_000, 64, stage) / 1e9 for stage in range(4)]
    assert [round(x, 1) for x in gb] == [120.0, 31.4, 16.6, 1.9]
    assert zero_memory_per_device(1000, 1, 3) == zero_memory_per_device(1000, 1, 0) == 16_000
    with pytest.raises(ValueError):
        zero_memory_per_device(10, 2, 4)
    with pytest.raises(ValueError):
        zero_memory_per_device(10, 0, 1)


def test_pipeline_bubble():
    assert pipeline_bubble_fraction(1, 8) == 0.0
    assert pipeline_bubble_fraction(4, 1) == pytest.approx(3 / 4)
    assert pipeline_bubble_fraction(4, 16) == pytest.approx(3 / 19)
    with pytest.raises(ValueError):
        pipeline_bubble_fraction(0, 4)
