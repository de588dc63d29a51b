"""How long each chapter takes under nbval, the way `make test` runs it (`make bench`).

Runs ``pytest <notebook> --nbval`` for every notebook in ``notebooks/``, one at a time, and writes the section
``"notebooks"`` of ``benchmarks/results/<host-kind>.json``: the wall-clock seconds and the result of each, and the
total. Targets: at most 60 s per chapter and 12 minutes for all of them, on the 2-core CPU.
Usage: ``python benchmarks/notebook_times.py [notebooks/NN_name.ipynb ...]``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from common import write_results

REPO = Path(__file__).resolve().parents[1]
TARGET_EACH_S, TARGET_ALL_S = 60, 12 * 60


def time_notebook(path: Path) -> dict:
    command = [sys.executable, "-m", "pytest", str(path.relative_to(REPO)), "--nbval", "--nbval-current-env",
               "--nbval-sanitize-with", "tests/nbval_sanitize.cfg", "-p", "no:cacheprovider", "-q"]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 1), "passed": done.returncode == 0,
            "summary": (done.stdout.strip().splitlines() or [""])[-1]}


def main() -> None:
    paths = [Path(p).resolve() for p in sys.argv[1:]] or sorted((REPO / "notebooks").glob("*.ipynb"))
    chapters = {}
    for path in paths:
        chapters[path.stem] = result = time_notebook(path)
        flag = "" if result["seconds"] <= TARGET_EACH_S else f"  (over {TARGET_EACH_S} s)"
        print(f"{path.stem:45} {result['seconds']:6.1f} s  {result['summary']}{flag}", flush=True)
    total = sum(r["seconds"] for r in chapters.values())
    print(f"{'all chapters':45} {total:6.1f} s  (target: {TARGET_EACH_S} s each, {TARGET_ALL_S} s in all)")
    path = write_results("notebooks", {"chapters": chapters, "total_s": round(total, 1),
                                       "target_each_s": TARGET_EACH_S, "target_all_s": TARGET_ALL_S})
    print(f"wrote {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
