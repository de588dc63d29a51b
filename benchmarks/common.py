"""Shared helpers of the benchmarks: the host's name, paired timing, ratio summaries, the JSON results file.

Every figure the benchmarks report is a **ratio measured side by side**: in each trial the two contenders run one
after the other (their order alternating from trial to trial, so that a drift of the machine's speed favours
neither), and the ratio of that trial is computed from those two timings. The summary gives the minimum, median
and maximum of the ratios over the trials, and the median of each contender's own time. These machines are shared
and noisy; a ratio of two timings taken seconds apart is far more stable than either timing.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def host_kind() -> str:
    """A short name of the machine kind, used for the results file: ``cpu-x86_64-2cores`` or ``gpu-nvidia-h100``."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        return "gpu-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return f"cpu-{platform.machine()}-{os.cpu_count()}cores"


def host_info() -> dict:
    """What the results were measured on."""
    info = {"host_kind": host_kind(), "machine": platform.machine(), "processor": _cpu_name(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], repeats: int) -> float:
    """Seconds per call of ``fn``, averaged over ``repeats`` calls (after the caller's warm-up)."""
    synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize()
    return (time.perf_counter() - start) / repeats


def paired(a: Callable[[], object], b: Callable[[], object], *, trials: int, repeats: int,
           warmup: int = 2) -> dict:
    """Time ``a`` and ``b`` side by side: ``trials`` trials of ``repeats`` calls each, alternating which runs first.

    Returns ``{"a_s", "b_s"}`` (the median seconds per call of each) and ``"ratio"``, the summary of the per-trial
    ratios ``b_time / a_time`` (> 1: ``a`` is faster), as :func:`summary` gives it.
    """
    for _ in range(warmup):
        a()
        b()
    times_a, times_b, ratios = [], [], []
    for trial in range(trials):
        if trial % 2 == 0:
            ta, tb = time_call(a, repeats), time_call(b, repeats)
        else:
            tb, ta = time_call(b, repeats), time_call(a, repeats)
        times_a.append(ta)
        times_b.append(tb)
        ratios.append(tb / ta)
    return {"a_s": statistics.median(times_a), "b_s": statistics.median(times_b), "ratio": summary(ratios)}


def matmul_flops_per_s(n: int, repeats: int, dtype: torch.dtype = torch.float32,
                       device: torch.device | str = "cpu") -> float:
    """The machine's matrix-multiply rate in FLOP/s: the best of five timings of ``repeats`` n x n products."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    best = min(time_call(lambda: a @ b, repeats) for _ in range(5))
    return 2 * n ** 3 / best


def summary(values: list[float]) -> dict:
    """``{"min", "median", "max", "n"}`` of a list of numbers."""
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "n": len(values)}


def write_results(section: str, data: dict, kind: str | None = None) -> Path:
    """Merge ``{section: data}`` into ``benchmarks/results/<host-kind>.json`` (creating it) and return its path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{kind or host_kind()}.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results["host"] = host_info()
    results[section] = data
    path.write_text(json.dumps(results, indent=1) + "\n")
    return path
