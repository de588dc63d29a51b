"""Draw the benchmark results into the book's appendix, "Performance of the reference implementations" (`make bench`).

Reads every ``benchmarks/results/<host-kind>.json`` (written by ``bench_cpu.py``, ``notebook_times.py`` and, on a
GPU, ``bench_gpu.py``) and ``benchmarks/results/attention_<host-kind>.json`` (``attention_vs_length.py``), and
writes into ``book/figures/performance/``:

* ``ratios.svg``: every side-by-side ratio against its peer, min / median / max per machine, with its target;
* ``attention_<host-kind>.svg``: time and peak memory of attention against the sequence length;
* ``notebooks.svg``: each chapter's time under nbval against the 60 s budget;
* ``flash_gpu.svg``: on a GPU, the Triton kernel's and PyTorch's TFLOP/s against T (only if a GPU was measured);
* ``tables.md``: the same figures as Markdown tables, included by ``book/performance.md``.

Nothing is measured here: run it again after any benchmark (``python benchmarks/report.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
OUT = REPO / "book" / "figures" / "performance"
# SVG files that repeat exactly from the same data (no timestamps or random ids), so that a rerun changes nothing.
plt.rcParams.update({"svg.hashsalt": "tfcourse", "svg.fonttype": "none", "figure.dpi": 100})
SVG_META = {"Date": None, "Creator": None}

CPU_BENCHES = {
    "gpt_train_step": ("GPT training step", "tokens/s of ours / GPT2LMHeadModel"),
    "generation": ("KV-cache generation", "tokens/s with the cache / without"),
    "multihead_attention": ("MultiHeadAttention fwd+bwd", "speed of ours / nn.MultiheadAttention"),
}
METHOD_STYLE = {"naive": ("naive (3 lines)", "o-"), "ours": ("ours (chapter 1)", "s-"),
                "flash": ("flash (PyTorch, tiled)", "^-"), "sdpa": ("torch SDPA", "d-"),
                "triton": ("flash (Triton)", "v-"), "sliding_window": ("sliding window (approx.)", "x:"),
                "linear": ("linear attention (approx.)", "+:")}


def load() -> tuple[dict, dict]:
    machines, attention = {}, {}
    for path in sorted(RESULTS.glob("*.json")):
        data = json.loads(path.read_text())
        if path.stem.startswith("attention_"):
            attention[path.stem.removeprefix("attention_")] = data
        else:
            machines[path.stem] = data
    return machines, attention


def fmt_ratio(r: dict) -> str:
    return f"{r['median']:.2f}x ({r['min']:.2f} to {r['max']:.2f}, {r['n']} trials)"


def verdict(ratio: dict, target: float) -> str:
    return "met" if ratio["median"] >= target else "**missed**"


def save(fig, name: str) -> str:
    OUT.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT / name, bbox_inches="tight", metadata=SVG_META)
    plt.close(fig)
    return name


def plot_ratios(machines: dict) -> str | None:
    rows = [(kind, key, data["cpu"][key]) for kind, data in machines.items() if "cpu" in data
            for key in CPU_BENCHES if key in data["cpu"]]
    if not rows:
        return None
    fig, axes = plt.subplots(1, len(CPU_BENCHES), figsize=(10, 3.2))
    for ax, key in zip(axes, CPU_BENCHES):
        title, ylabel = CPU_BENCHES[key]
        mine = [(kind, r) for kind, k, r in rows if k == key]
        for i, (kind, r) in enumerate(mine):
            ratio = r["ratio"]
            ax.bar(i, ratio["median"], color="tab:blue" if ratio["median"] >= r["target"] else "tab:red", width=0.5)
            ax.errorbar(i, ratio["median"], yerr=[[ratio["median"] - ratio["min"]], [ratio["max"] - ratio["median"]]],
                        color="black", capsize=5)
            ax.text(i, ratio["max"], f" {ratio['median']:.2f}x", ha="center", va="bottom")
        if mine:
            ax.axhline(mine[0][1]["target"], color="gray", ls="--", label=f"target {mine[0][1]['target']}x")
        ax.set_xticks(range(len(mine)), [kind for kind, _ in mine], fontsize=8)
        ax.set(title=title, ylabel=ylabel)
        ax.set_ylim(0, max(r["ratio"]["max"] for _, r in mine) * 1.25 if mine else 1)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle("Side-by-side ratios (median; bars: min to max over the trials)", fontsize=10)
    fig.tight_layout()
    return save(fig, "ratios.svg")


def plot_attention(kind: str, data: dict) -> str:
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    results = data["results"]
    panels = [("forward_backward", "time_s", 1e3, "time, forward + backward (ms)"),
              ("forward", "time_s", 1e3, "time, forward (ms)"),
              ("forward_backward", "peak_bytes", 2.0 ** -20, "peak memory, forward + backward (MiB)")]
    for ax, (mode, field, factor, ylabel) in zip(axes, panels):
        for method, (label, style) in METHOD_STYLE.items():
            points = sorted((r["T"], r[field] * factor) for r in results if r["method"] == method and r["mode"] == mode)
            if points:
                ax.plot(*zip(*points), style, label=label, ms=4)
        ax.set(yscale="log", xlabel="sequence length T", ylabel=ylabel)
        ax.set_xscale("log", base=2)
    axes[0].legend(fontsize=7)
    c = data["config"]
    fig.suptitle(f"Attention against T on {kind} ({data['host']['device']}, {c['dtype']}, batch {c['batch']}, "
                 f"{c['n_heads']} heads, d_head {c['d_head']}, no mask)", fontsize=10)
    fig.tight_layout()
    return save(fig, f"attention_{kind}.svg")


def plot_notebooks(kind: str, nb: dict) -> str:
    names = list(nb["chapters"])
    seconds = [nb["chapters"][n]["seconds"] for n in names]
    fig, ax = plt.subplots(figsize=(9, 3.6))
    ax.barh(range(len(names)), seconds, color=["tab:blue" if s <= nb["target_each_s"] else "tab:red" for s in seconds])
    ax.axvline(nb["target_each_s"], color="gray", ls="--", label=f"budget {nb['target_each_s']} s")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="seconds under nbval",
           title=f"Each chapter's time under nbval on {kind}: {nb['total_s']:.0f} s in all "
           f"(budget {nb['target_all_s']} s)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save(fig, f"notebooks_{kind}.svg")


def plot_flash_gpu(kind: str, gpu: dict) -> str:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, causal in zip(axes, (False, True)):
        rows = sorted((r for r in gpu["flash_forward"] if r["causal"] == causal), key=lambda r: r["T"])
        Ts = [r["T"] for r in rows]
        ax.plot(Ts, [r["ours_tflops"] for r in rows], "v-", label="flash (Triton, ours)")
        ax.plot(Ts, [r["sdpa_tflops"] for r in rows], "d-", label="torch SDPA (FlashAttention backend)")
        ax.axhline(gpu["matmul_bf16_tflops"], color="gray", ls="--", label="measured bf16 matmul rate")
        ax.set(xlabel="sequence length T", ylabel="TFLOP/s", title="causal" if causal else "not causal")
        ax.set_xscale("log", base=2)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Flash attention forward on {kind}, bf16, head dim 64", fontsize=10)
    fig.tight_layout()
    return save(fig, f"flash_{kind}.svg")


def cpu_table(machines: dict) -> list[str]:
    lines = ["| machine | benchmark | ours | peer / baseline | ratio: median (min to max) | target | |",
             "|---|---|---|---|---|---|---|"]
    for kind, data in machines.items():
        cpu = data.get("cpu")
        if not cpu:
            continue
        g = cpu.get("gpt_train_step")
        if g:
            lines.append(f"| {kind} | GPT training step (4 layers, width 128, block 128, batch 32) | "
                         f"{g['ours_tokens_per_s']:,.0f} tokens/s, {g['ours_gflops']:.0f} GFLOP/s "
                         f"({g['ours_gflops'] / g['matmul_gflops']:.0%} of the {g['matmul_gflops']:.0f} GFLOP/s "
                         f"float32 matmul rate) | {g['peer_tokens_per_s']:,.0f} tokens/s (GPT2LMHeadModel) | "
                         f"{fmt_ratio(g['ratio'])} | >= {g['target']}x | {verdict(g['ratio'], g['target'])} |")
        r = cpu.get("generation")
        if r:
            peer = ""
            if "peer_ratio" in r:
                peer = (f"; Hugging Face's GPT-2, same settings: {r['peer_cache_tokens_per_s']:,.0f} vs "
                        f"{r['peer_no_cache_tokens_per_s']:,.0f} tokens/s, {fmt_ratio(r['peer_ratio'])}")
            lines.append(f"| {kind} | generation, 256 tokens, batch 1, KV cache against none | "
                         f"{r['cache_tokens_per_s']:,.0f} tokens/s with the cache | "
                         f"{r['no_cache_tokens_per_s']:,.0f} tokens/s without{peer} | {fmt_ratio(r['ratio'])} | "
                         f">= {r['target']}x | {verdict(r['ratio'], r['target'])} |")
        big = cpu.get("generation_larger")
        if big:
            c = big["config"]
            lines.append(f"| {kind} | the same, {c['n_layer']} layers of width {c['n_embd']} (chapter 9 at full "
                         f"scale; for information) | {big['cache_tokens_per_s']:,.0f} tokens/s with the cache | "
                         f"{big['no_cache_tokens_per_s']:,.0f} tokens/s without | {fmt_ratio(big['ratio'])} | | |")
        m = cpu.get("multihead_attention")
        if m:
            lines.append(f"| {kind} | MultiHeadAttention forward + backward (B 16, T 256, d_model 512, 8 heads) | "
                         f"{m['ours_ms']:.0f} ms | {m['peer_ms']:.0f} ms (nn.MultiheadAttention) | "
                         f"{fmt_ratio(m['ratio'])} | >= {m['target']}x | {verdict(m['ratio'], m['target'])} |")
    return lines


def attention_table(kind: str, data: dict) -> list[str]:
    methods = [m for m in METHOD_STYLE if any(r["method"] == m for r in data["results"])]
    lengths = sorted({r["T"] for r in data["results"]})
    lines = [f"Forward + backward on {kind}: time (ms) / peak memory (MiB)", "",
             "| T | " + " | ".join(METHOD_STYLE[m][0] for m in methods) + " |",
             "|---:|" + "---:|" * len(methods)]
    by = {(r["method"], r["mode"], r["T"]): r for r in data["results"]}
    for T in lengths:
        cells = []
        for m in methods:
            r = by.get((m, "forward_backward", T))
            cells.append("" if r is None else f"{1e3 * r['time_s']:,.1f} / {r['peak_bytes'] / 2**20:,.1f}")
        lines.append(f"| {T} | " + " | ".join(cells) + " |")
    naive = by.get(("naive", "forward_backward", lengths[-1]))
    flash = by.get(("flash", "forward_backward", lengths[-1]))
    if naive and flash:
        share = flash["peak_bytes"] / naive["peak_bytes"]
        lines += ["", f"At T = {lengths[-1]}, flash attention's peak memory is {share:.4f} of naive attention's "
                  f"(target: at most 0.1, {'met' if share <= 0.1 else '**missed**'})."]
    return lines


def notebook_table(kind: str, nb: dict) -> list[str]:
    lines = [f"| chapter | seconds under nbval on {kind} | result |", "|---|---:|---|"]
    for name, r in nb["chapters"].items():
        flag = "" if r["seconds"] <= nb["target_each_s"] else " **over budget**"
        lines.append(f"| {name} | {r['seconds']:.1f}{flag} | {r['summary']} |")
    over = nb["total_s"] > nb["target_all_s"]
    lines.append(f"| **all chapters** | **{nb['total_s']:.0f}** | budget {nb['target_all_s']} s: "
                 f"{'**missed**' if over else 'met'} |")
    return lines


def gpu_tables(kind: str, gpu: dict) -> list[str]:
    lines = [f"Measured bf16 matmul rate of {kind}: {gpu['matmul_bf16_tflops']:.0f} TFLOP/s.", "",
             "| T | causal | ours (Triton) TFLOP/s | SDPA TFLOP/s | ratio SDPA time / ours: median (min to max) | "
             "ours / matmul rate |", "|---:|---|---:|---:|---|---:|"]
    for r in gpu["flash_forward"]:
        lines.append(f"| {r['T']} | {r['causal']} | {r['ours_tflops']:.1f} | {r['sdpa_tflops']:.1f} | "
                     f"{fmt_ratio(r['ratio'])} | {r['ours_fraction_of_matmul']:.0%} |")
    lines += ["", "| model | tokens/s | TFLOP/s | model FLOP utilisation |", "|---|---:|---:|---:|"]
    for r in gpu["gpt_training"]:
        lines.append(f"| {r['model']} | {r['tokens_per_s']:,.0f} | {r['tflops']:.1f} | {r['mfu']:.1%} |")
    return lines


def main() -> None:
    machines, attention = load()
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.glob("*.svg"):
        old.unlink()
    md = ["<!-- Written by benchmarks/report.py from benchmarks/results/*.json: do not edit by hand. -->", ""]
    md += ["(performance-hosts)=", "### The machines", "", "| host kind | processor | CPU cores | torch threads | "
           "torch | GPU | measured |", "|---|---|---:|---:|---|---|---|"]
    for kind, data in {**machines, **{f"attention_{k}": v for k, v in attention.items()}}.items():
        h = data["host"]
        md.append(f"| {kind} | {h['processor']} | {h['cpu_count']} | {h.get('torch_threads')} | {h['torch']} | "
                  f"{h.get('gpu', 'none')} | {h['date']} |")
    md += ["", "(performance-ratios)=", "### Against the peers", ""]
    figure = plot_ratios(machines)
    if figure:
        md += [f"![The side-by-side ratios]({figure})", ""]
    md += cpu_table(machines) + [""]
    md += ["(performance-attention)=", "### Attention against the sequence length", ""]
    for kind, data in attention.items():
        md += [f"![Attention against T on {kind}]({plot_attention(kind, data)})", ""] + attention_table(kind, data)
        md.append("")
    md += ["(performance-notebooks)=", "### The chapters' running time", ""]
    for kind, data in machines.items():
        if "notebooks" in data:
            md += [f"![Chapter times on {kind}]({plot_notebooks(kind, data['notebooks'])})", ""]
            md += notebook_table(kind, data["notebooks"]) + [""]
    md += ["(performance-gpu)=", "### On a GPU", ""]
    gpus = {kind: data["gpu"] for kind, data in machines.items() if "gpu" in data}
    for kind, gpu in gpus.items():
        md += [f"![Flash attention on {kind}]({plot_flash_gpu(kind, gpu)})", ""] + gpu_tables(kind, gpu) + [""]
    if not gpus:
        md += ["No GPU has been measured yet: `make bench-gpu` on a CUDA machine writes its results "
               "(`benchmarks/results/gpu-<card>.json`), and `python benchmarks/report.py` adds them here.", ""]
    (OUT / "tables.md").write_text("\n".join(md).rstrip() + "\n")
    print(f"wrote {OUT.relative_to(REPO)}: " + ", ".join(sorted(p.name for p in OUT.iterdir())))


if __name__ == "__main__":
    main()
