"""Time and peak memory of a call, on the CPU or a CUDA device, for the benchmarks of chapter 12.

**Peak memory** is the largest number of bytes that PyTorch's allocator holds *during* the call beyond what it held
before, that is the working memory of the call plus its output; the inputs are not counted.

* CUDA: :func:`torch.cuda.reset_peak_memory_stats` and :func:`torch.cuda.max_memory_allocated`.
* CPU: ``tracemalloc`` does not see PyTorch's allocations and the process's resident size is blurred by the C
  allocator's caching, so the CPU figure comes from PyTorch's own profiler: with ``profile_memory=True`` every
  allocation and release of the CPU allocator is recorded as a ``[memory]`` event with its size; summing them in
  time order gives the bytes held at each moment, and the maximum of that running sum is the peak. These are the
  tensor bytes requested from the allocator, exact and repeatable, not the pages the operating system reports.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Callable, Iterator

import torch

__all__ = ["peak_memory_bytes", "time_call"]


def peak_memory_bytes(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Peak bytes allocated by PyTorch while ``fn()`` runs, beyond those allocated before (see the module).

    Args:
        fn: a function of no arguments (its result is dropped after the measurement).
        device: ``"cpu"`` or a CUDA device, where the tensors of ``fn`` live.

    Returns:
        The peak, in bytes (``int``).
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del result
        return int(peak)
    if device.type != "cpu":
        raise ValueError(f"device must be 'cpu' or a CUDA device, got {device}")
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():  # the profiler's C++ library logs its start and stop on stderr
        prof.start()
    try:
        result = fn()
        del result
    finally:
        with _quiet_stderr():
            prof.stop()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return int(peak)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Send what C++ code writes on file descriptor 2 to the null device for the duration of the block."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no file descriptor 2 (some embedded interpreters): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def time_call(fn: Callable[[], object], repeats: int = 3, warmup: int = 1,
              device: torch.device | str = "cpu") -> float:
    """The median wall-clock time of ``fn()`` over ``repeats`` runs after ``warmup`` runs, in seconds
    (synchronising a CUDA device around each run)."""
    device = torch.device(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]
