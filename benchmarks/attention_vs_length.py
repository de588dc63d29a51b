"""Time and peak memory of attention against the sequence length T, for chapter 12 (efficient attention).

Methods (one self-attention call, ``(B, n_heads, T, d_head)`` float32 inputs, no mask):

* ``naive``: ``softmax(Q K^T / sqrt(d)) V`` in three lines of PyTorch;
* ``ours``: :func:`tfcourse.attention.scaled_dot_product_attention` (chapter 1, with its checks and masked softmax);
* ``flash``: :func:`tfcourse.efficient.flash.flash_attention`, FlashAttention in PyTorch (tiles of ``--block``);
* ``sdpa``: :func:`torch.nn.functional.scaled_dot_product_attention` (PyTorch's fused kernels);
* ``triton`` (CUDA only): :func:`tfcourse.efficient.triton_flash.flash_attention_triton`;
* two approximations for comparison, ``sliding_window`` (banded, half-width 64) and ``linear`` (elu+1).

Each is measured in two modes, ``forward`` and ``forward_backward`` (forward, then backward of the sum of the output
times a fixed random tensor). Time: the median of ``--repeats`` runs after one warm-up run. Peak memory: the largest
number of bytes PyTorch's allocator held during the call beyond what it held before (inputs excluded, output
included), from the profiler's allocation events on the CPU and ``torch.cuda.max_memory_allocated`` on a GPU (see
:mod:`tfcourse.efficient.measure`).

Usage (from the repository root)::

    python benchmarks/attention_vs_length.py                 # CPU, one thread, T = 256 ... 8192
    python benchmarks/attention_vs_length.py --device cuda   # a GPU (adds the Triton kernel)

writes ``benchmarks/results/attention_<host-kind>.json`` (the host kind of ``benchmarks/common.py``, e.g.
``cpu-x86_64-2cores`` or ``gpu-nvidia-h200``), which chapter 12 plots. On one
core of the course's 2-core build machine, shared with other jobs, the CPU run took about three minutes
(``wall_time_s`` in the JSON; 71 s with ``--repeats 3`` on a quieter moment) and at most about 2 GB of memory
(naive attention's forward and backward passes at T = 8192). Peak memory is exact and repeatable; times on a
shared machine vary by tens of percent from run to run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import host_info, host_kind  # noqa: E402  (benchmarks/common.py, next to this script)
from tfcourse.attention import scaled_dot_product_attention  # noqa: E402
from tfcourse.efficient.flash import flash_attention  # noqa: E402
from tfcourse.efficient.linear import linear_attention  # noqa: E402
from tfcourse.efficient.measure import peak_memory_bytes, time_call  # noqa: E402
from tfcourse.efficient.sparse import sliding_window_attention  # noqa: E402

MEMORY_METHOD = {
    "cpu": "torch.profiler (profile_memory=True): the maximum over time of the running sum of the CPU allocator's "
           "allocation and release events during the call (bytes requested from PyTorch's allocator, inputs "
           "excluded, output included)",
    "cuda": "torch.cuda.max_memory_allocated during the call minus torch.cuda.memory_allocated before it",
}


def naive_attention(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1) @ v


def methods(device: str, block: int) -> dict:
    found = {
        "naive": (naive_attention, True),
        "ours": (scaled_dot_product_attention, True),
        "flash": (lambda q, k, v: flash_attention(q, k, v, block_size=block), True),
        "sdpa": (F.scaled_dot_product_attention, True),
        "sliding_window": (lambda q, k, v: sliding_window_attention(q, k, v, 64), False),
        "linear": (linear_attention, False),
    }
    if device == "cuda":
        from tfcourse.efficient.triton_flash import flash_attention_triton

        found["triton"] = (flash_attention_triton, True)
    return found


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--d-head", type=int, default=64)
    parser.add_argument("--block", type=int, default=256, help="tile size of the PyTorch flash attention")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--modes", nargs="+", default=["forward", "forward_backward"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = args.device
    kind = host_kind() if device == "cuda" else f"cpu-{platform.machine()}-{os.cpu_count()}cores"
    out_path = args.out or ROOT / "benchmarks" / "results" / f"attention_{kind}.json"
    start = time.perf_counter()
    results = []
    for T in args.lengths:
        shape = (args.batch, args.heads, T, args.d_head)
        q, k, v = (torch.randn(shape, device=device) for _ in range(3))
        grad = torch.randn(shape, device=device)
        for name, (fn, exact) in methods(device, args.block).items():
            for mode in args.modes:
                if mode == "forward":
                    def call(fn=fn):
                        with torch.no_grad():
                            return fn(q, k, v)
                else:
                    leaves = [t.detach().requires_grad_() for t in (q, k, v)]

                    def call(fn=fn, leaves=leaves):
                        for t in leaves:
                            t.grad = None
                        (fn(*leaves) * grad).sum().backward()
                peak = peak_memory_bytes(call, device)
                seconds = time_call(call, repeats=args.repeats, warmup=1, device=device)
                results.append(dict(method=name, exact=exact, mode=mode, T=T, time_s=seconds, peak_bytes=peak))
                print(f"T={T:5d} {name:15s} {mode:16s} {seconds * 1e3:10.2f} ms {peak / 2**20:10.2f} MiB", flush=True)
            torch.cuda.empty_cache() if device == "cuda" else None
    data = dict(
        host={**host_info(), "host_kind": kind, "device": device,
              "torch_threads": args.threads if device == "cpu" else None},
        config=dict(batch=args.batch, n_heads=args.heads, d_head=args.d_head, dtype="float32", causal=False,
                    flash_block_size=args.block, sliding_window=64, repeats=args.repeats),
        memory_method=MEMORY_METHOD[device],
        results=results,
        wall_time_s=round(time.perf_counter() - start, 1),
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {out_path.relative_to(ROOT) if out_path.is_relative_to(ROOT) else out_path.name} "
          f"in {data['wall_time_s']} s")
    return data


if __name__ == "__main__":
    main()
