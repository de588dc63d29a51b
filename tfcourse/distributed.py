"""Data-parallel training with ``torch.distributed`` on CPUs, and the memory arithmetic of sharded training
(chapter 7, "Training transformers").

**Data parallelism.** Every process (a *rank*) holds a full copy of the model, computes the gradient of its own
shard of the global batch, and the ranks average their gradients with an all-reduce before each optimizer step,
so that every copy takes the same step: the step a single process would take on the whole batch (Li et al.,
2020). This module is both a library and a script that ``torchrun`` starts once per rank::

    python -m torch.distributed.run --nproc_per_node 2 -m tfcourse.distributed --out /tmp/ddp --steps 3

Each rank trains the same tiny model (:class:`TinyTagger`, built from :class:`tfcourse.layers.EncoderLayer`) twice:
once wrapped in :class:`torch.nn.parallel.DistributedDataParallel` (gradients averaged in buckets, overlapped with
the backward pass), once with the all-reduce written out by hand (:func:`average_gradients`), and writes what it
got to ``<out>/rank<r>.pt``. :func:`run_single` trains the same model in one process on the full batch, and
:func:`launch` starts the distributed run from Python (a notebook) and reads the files back.

The ranks talk through the ``gloo`` backend over the loopback interface (127.0.0.1): no GPU, no network.

**Memory arithmetic.** :func:`training_memory_bytes` counts the bytes per parameter of mixed-precision training
with Adam, and :func:`zero_memory_per_device` what each of the three stages of ZeRO (Rajbhandari et al., 2020)
leaves on each device; :func:`pipeline_bubble_fraction` is the idle fraction of a GPipe schedule (Huang et al.,
2019).
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .layers import EncoderLayer

__all__ = [
    "DDPConfig",
    "TinyTagger",
    "make_model",
    "make_batch",
    "shard",
    "loss_fn",
    "average_gradients",
    "run_single",
    "worker",
    "torchrun_command",
    "launch",
    "training_memory_bytes",
    "zero_memory_per_device",
    "pipeline_bubble_fraction",
    "main",
]

MODES = ("ddp", "manual")


# --------------------------------------------------------------------------------------------------------------
# The experiment: a tiny model, a deterministic global batch, its shards
# --------------------------------------------------------------------------------------------------------------

@dataclass
class DDPConfig:
    """The settings of a data-parallel run (all plain numbers, so that they travel as command-line flags).

    Attributes:
        steps: optimizer steps.
        batch_size: the **global** batch size: the sum over the ranks (each rank gets ``batch_size / world_size``).
        seq_len: tokens per sequence.
        vocab: token ids ``0 .. vocab - 1``.
        d_model, n_heads, d_ff: the size of the model's one encoder layer.
        lr, momentum: the settings of the optimizer, SGD with momentum. (Not Adam: it divides each gradient by
            its running root mean square, so a gradient that is zero in exact arithmetic, such as that of the key
            projection's bias, which softmax cannot see, turns its rounding noise, different in one process and in
            two, into full-size steps of random sign. SGD's step is linear in the gradient and keeps the runs
            equal to rounding.)
        seed: the seed of the initial weights (the data have their own seeds, one per step).
    """

    steps: int = 3
    batch_size: int = 16
    seq_len: int = 8
    vocab: int = 16
    d_model: int = 32
    n_heads: int = 4
    d_ff: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    seed: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", int):
                minimum = 0 if f.name == "seed" else 1
                if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                    raise ValueError(f"{f.name} must be an int >= {minimum}, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0:
                raise ValueError(f"{f.name} must be a non-negative number, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")

    def to_args(self) -> list[str]:
        """The settings as command-line flags for :func:`main`, e.g. ``["--steps", "3", ...]``."""
        return [item for f in fields(self) for item in (f"--{f.name.replace('_', '-')}", repr(getattr(self, f.name)))]


class TinyTagger(nn.Module):
    """Token embedding, one :class:`~tfcourse.layers.EncoderLayer` (Pre-LN, no dropout) and a linear read-out:
    ``(B, T)`` int64 tokens -> ``(B, T, vocab)`` logits. Small enough to start, train and compare in seconds; with no
    dropout, its gradient is a deterministic function of the weights and the batch."""

    def __init__(self, vocab: int, d_model: int, n_heads: int, d_ff: int, seq_len: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(0.02 * torch.randn(seq_len, d_model))  # learned positions, (T, d_model)
        self.layer = EncoderLayer(d_model, n_heads, d_ff, dropout=0.0, norm_first=True)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]  # (B, T, d_model)
        return self.head(self.norm(self.layer(x)))           # (B, T, vocab)


def make_model(config: DDPConfig) -> TinyTagger:
    """The model of ``config`` with the initial weights of ``config.seed`` (the same on every rank)."""
    torch.manual_seed(config.seed)
    return TinyTagger(config.vocab, config.d_model, config.n_heads, config.d_ff, config.seq_len)


def make_batch(config: DDPConfig, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of optimizer step ``step``: random tokens ``(batch_size, seq_len)`` and their targets, the
    same tokens sorted (a task that needs attention across positions). Seeded by ``step`` alone, so every rank
    (and the single-process run) sees the same global batch."""
    g = torch.Generator().manual_seed(1_000_003 * (config.seed + 1) + step)
    tokens = torch.randint(0, config.vocab, (config.batch_size, config.seq_len), generator=g)
    return tokens, tokens.sort(dim=1).values


def shard(batch: tuple[torch.Tensor, ...], rank: int, world_size: int) -> tuple[torch.Tensor, ...]:
    """Rank ``rank``'s contiguous slice of every tensor of ``batch`` (what a ``DistributedSampler`` does with
    indices, without the shuffle).

    Raises:
        ValueError: if the batch does not split evenly over ``world_size`` ranks (unequal shards would weigh
            the examples of the smaller shards more in the averaged gradient), or ``rank`` is out of range.
    """
    n = batch[0].shape[0]
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size), got rank={rank}, world_size={world_size}")
    if n % world_size:
        raise ValueError(f"the batch of {n} examples does not split evenly over {world_size} ranks")
    size = n // world_size
    return tuple(t[rank * size:(rank + 1) * size] for t in batch)


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The mean cross-entropy over every position of the (local) batch."""
    tokens, targets = batch
    logits = model(tokens)  # (B, T, vocab)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def average_gradients(model: nn.Module) -> None:
    r"""Data parallelism by hand: replace every gradient by its mean over the ranks, with one all-reduce per
    parameter, :math:`g \leftarrow \frac1N \sum_{r=1}^{N} g_r`.

    :class:`~torch.nn.parallel.DistributedDataParallel` computes the same mean, but groups the gradients into
    buckets of about 25 MB and starts each bucket's all-reduce as soon as its gradients are ready, while the
    backward pass goes on (Li et al., 2020, Sec. 3.2). Needs an initialised process group.
    """
    world_size = torch.distributed.get_world_size()
    for p in model.parameters():
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.SUM)
            p.grad /= world_size


def _optimizer(model: nn.Module, config: DDPConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)


def _train(model: nn.Module, net: nn.Module, config: DDPConfig, rank: int, world_size: int,
           manual: bool) -> dict[str, Any]:
    optimizer = _optimizer(model, config)
    losses, first_grads = [], None
    for step in range(config.steps):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(net, shard(make_batch(config, step), rank, world_size))
        loss.backward()
        if manual:
            average_gradients(model)
        if first_grads is None:
            first_grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
        optimizer.step()
        losses.append(loss.item())
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    return {"first_grads": first_grads, "params": params, "losses": losses}


def run_single(config: DDPConfig) -> dict[str, Any]:
    """Train :func:`make_model` in this process on the **full** global batches, for comparison with the ranks.

    Returns:
        ``{"first_grads": {name: tensor}, "params": {name: tensor}, "losses": [float]}``: the gradients of the
        first step, the parameters after ``config.steps`` steps and the loss of every step.
    """
    model = make_model(config)
    return _train(model, model, config, rank=0, world_size=1, manual=False)


# --------------------------------------------------------------------------------------------------------------
# The worker (one per rank, started by torchrun) and the launcher
# --------------------------------------------------------------------------------------------------------------

def worker(config: DDPConfig, out: str | os.PathLike) -> None:
    """What each rank runs: join the process group (``gloo``; rank, world size and the rendezvous address come
    from the environment torchrun sets), train with DDP and with :func:`average_gradients`, and save
    ``{"rank", "world_size", "ddp": {...}, "manual": {...}}`` (each as :func:`run_single` returns) to
    ``<out>/rank<r>.pt``.

    Raises:
        RuntimeError: if it is not started by torchrun (no ``RANK``/``WORLD_SIZE`` in the environment).
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError("worker() must run under torchrun (python -m torch.distributed.run ...), which sets "
                           "RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT")
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    try:
        rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        result: dict[str, Any] = {"rank": rank, "world_size": world_size}
        for mode in MODES:
            model = make_model(config)  # the same seed everywhere; DDP also broadcasts rank 0's weights
            if mode == "ddp":
                net = nn.parallel.DistributedDataParallel(model)
                result[mode] = _train(model, net, config, rank, world_size, manual=False)
            else:
                result[mode] = _train(model, model, config, rank, world_size, manual=True)
        torch.save(result, Path(out) / f"rank{rank}.pt")
        torch.distributed.barrier()  # nobody leaves before every file is written
    finally:
        torch.distributed.destroy_process_group()


def torchrun_command(config: DDPConfig, out: str | os.PathLike, nproc: int = 2) -> list[str]:
    """The command line that starts ``nproc`` ranks of :func:`worker` on this machine: ``python -m
    torch.distributed.run`` (torchrun) with a c10d rendezvous on 127.0.0.1 and a free port the launcher picks
    (port 0), so that two runs never collide."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
            "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", "--local-addr=127.0.0.1",
            "--monitor-interval=0.1", "-m", "tfcourse.distributed", "--out", os.fspath(out), *config.to_args()]


def launch(config: DDPConfig, nproc: int = 2, timeout: float = 120.0) -> list[dict[str, Any]]:
    """Run :func:`worker` on ``nproc`` CPU processes with torchrun and return what each rank saved.

    The ranks run with one thread each (``OMP_NUM_THREADS=1``) and talk over the loopback interface.

    Returns:
        One dict per rank, in rank order (see :func:`worker`).

    Raises:
        ValueError: if ``nproc < 1`` or the global batch does not split evenly over ``nproc`` ranks.
        RuntimeError: if torchrun fails (with the end of its output) or a rank wrote nothing.
        subprocess.TimeoutExpired: if it runs longer than ``timeout`` seconds.
    """
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be a positive int, got {nproc!r}")
    if config.batch_size % nproc:
        raise ValueError(f"batch_size={config.batch_size} does not split evenly over nproc={nproc} ranks")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if sys.platform.startswith("linux") and os.path.exists("/sys/class/net/lo"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with tempfile.TemporaryDirectory(prefix="tfcourse-ddp-") as out:
        proc = subprocess.run(torchrun_command(config, out, nproc), env=env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
        log = (proc.stdout + proc.stderr)[-4000:]
        if proc.returncode != 0:
            raise RuntimeError(f"torchrun failed with exit code {proc.returncode}:\n{log}")
        results = []
        for rank in range(nproc):
            path = Path(out) / f"rank{rank}.pt"
            if not path.exists():
                raise RuntimeError(f"rank {rank} wrote no result:\n{log}")
            results.append(torch.load(path, weights_only=True))
    return results


# --------------------------------------------------------------------------------------------------------------
# Memory arithmetic
# --------------------------------------------------------------------------------------------------------------

def training_memory_bytes(n_params: int, weight_bytes: int = 2, grad_bytes: int = 2,
                          optimizer_bytes: int = 12) -> dict[str, int]:
    r"""The model-state memory of training ``n_params`` parameters, without activations: the weights the model
    computes with, their gradients, and the optimizer's states.

    The defaults are mixed-precision Adam (Rajbhandari et al., 2020, Sec. 3.1): 16-bit weights and gradients
    (2 + 2 bytes) and, for the optimizer, an fp32 master copy of the weights, Adam's first and second moments
    (:math:`K = 4 + 4 + 4 = 12` bytes): :math:`16\Psi` bytes for :math:`\Psi` parameters. Plain fp32 Adam is
    ``weight_bytes=4, grad_bytes=4, optimizer_bytes=8`` (no master copy), also :math:`16\Psi`.

    Returns:
        ``{"weights", "grads", "optimizer", "total"}`` in bytes.

    Raises:
        ValueError: for a negative count.
    """
    for name, value in (("n_params", n_params), ("weight_bytes", weight_bytes), ("grad_bytes", grad_bytes),
                        ("optimizer_bytes", optimizer_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    out = {"weights": weight_bytes * n_params, "grads": grad_bytes * n_params, "optimizer": optimizer_bytes * n_params}
    out["total"] = sum(out.values())
    return out


def zero_memory_per_device(n_params: int, n_devices: int, stage: int, weight_bytes: int = 2, grad_bytes: int = 2,
                           optimizer_bytes: int = 12) -> float:
    r"""The model-state bytes per device of data-parallel training with ZeRO stage 0 (none) to 3.

    .. math::
        \text{stage 0: } (2 + 2 + K)\Psi \qquad
        \text{1 } (P_{os})\text{: } (2 + 2)\Psi + \frac{K\Psi}{N_d} \qquad
        \text{2 } (P_{os+g})\text{: } 2\Psi + \frac{(2 + K)\Psi}{N_d} \qquad
        \text{3 } (P_{os+g+p})\text{: } \frac{(2 + 2 + K)\Psi}{N_d}

    Stage 1 shards the optimizer states over the :math:`N_d` devices, stage 2 the gradients too, stage 3 the
    weights too (what FSDP does): each device keeps only its :math:`1/N_d` and gathers the rest when needed.

    Args:
        n_params: :math:`\Psi`; n_devices: :math:`N_d`; stage: 0, 1, 2 or 3.
        weight_bytes, grad_bytes, optimizer_bytes: as :func:`training_memory_bytes` (:math:`K` = ``optimizer_bytes``).

    Raises:
        ValueError: for a non-positive count or an unknown stage.

    Source: Rajbhandari et al. (2020), Sec. 5 and Fig. 1 (7.5 B parameters on 64 devices: 120, 31.4, 16.6 and 1.9 GB).
    """
    if isinstance(n_devices, bool) or not isinstance(n_devices, int) or n_devices < 1:
        raise ValueError(f"n_devices must be a positive int, got {n_devices!r}")
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"stage must be 0, 1, 2 or 3, got {stage!r}")
    b = training_memory_bytes(n_params, weight_bytes, grad_bytes, optimizer_bytes)
    sharded = {0: (), 1: ("optimizer",), 2: ("optimizer", "grads"), 3: ("optimizer", "grads", "weights")}[stage]
    return sum(b[k] / n_devices if k in sharded else b[k] for k in ("weights", "grads", "optimizer"))


def pipeline_bubble_fraction(n_stages: int, n_micro_batches: int) -> float:
    r"""The idle fraction of a GPipe pipeline schedule: with :math:`K` stages and :math:`M` micro-batches, a
    forward (or backward) sweep takes :math:`M + K - 1` slots, of which each device works :math:`M`:

    .. math:: \text{bubble} = \frac{K - 1}{M + K - 1}

    Raises:
        ValueError: for non-positive counts.

    Source: Huang et al. (2019), Sec. 2.2 (the bubble overhead, negligible when :math:`M \ge 4K`).
    """
    for name, value in (("n_stages", n_stages), ("n_micro_batches", n_micro_batches)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    return (n_stages - 1) / (n_micro_batches + n_stages - 1)


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tfcourse.distributed",
                                     description="One rank of the data-parallel demo of chapter 7 (run it under "
                                                 "torchrun).")
    parser.add_argument("--out", required=True, help="folder for rank<r>.pt")
    for f in fields(DDPConfig):
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=float if f.type in ("float", float)
                            else int, default=f.default)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Parse ``--out`` and the :class:`DDPConfig` flags, and run :func:`worker`."""
    args = vars(_parser().parse_args(argv))
    out = args.pop("out")
    worker(DDPConfig(**args), out)


if __name__ == "__main__":
    main()
