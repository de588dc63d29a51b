"""Figures and widgets used across the book: attention heatmaps and interactive explorers.

* :func:`plot_attention`: one attention matrix; :func:`temperature_figure`, :func:`temperature_explorer`: the softmax
  temperature (chapter 1).
* :func:`plot_attention_heads`: every head of one layer; :func:`plot_head_scores`: one number per (layer, head);
  :func:`attention_explorer`: layers, heads and attention rollout of a model, interactively (chapter 15).
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch

__all__ = ["plot_attention", "temperature_figure", "temperature_explorer", "plot_attention_heads", "plot_head_scores",
           "attention_explorer"]


def _as_numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=float)


def plot_attention(weights: torch.Tensor | np.ndarray, ax: plt.Axes | None = None, *,
                   x_labels: Sequence[str] | None = None, y_labels: Sequence[str] | None = None,
                   title: str = "", xlabel: str = "keys", ylabel: str = "queries", cmap: str = "viridis",
                   vmin: float | None = 0.0, vmax: float | None = None, colorbar: bool = True) -> plt.Axes:
    """Draw a ``(Tq, Tk)`` matrix of attention weights as a heatmap (queries down, keys across).

    Args:
        weights: 2-D array or tensor ``(Tq, Tk)``.
        ax: axes to draw on (a new figure if ``None``).
        x_labels, y_labels: tick labels for keys and queries.
        cmap: a perceptually uniform colormap that reads in greyscale (viridis, cividis, magma, gray); not jet,
            rainbow or a diverging map such as RdBu, whose two ends look alike in greyscale.

    Returns:
        The axes.

    Raises:
        ValueError: if ``weights`` is not 2-D.
    """
    w = _as_numpy(weights)
    if w.ndim != 2:
        raise ValueError(f"weights must be 2-D (Tq, Tk), got shape {w.shape}")
    if ax is None:
        _, ax = plt.subplots(figsize=(0.5 + 0.35 * w.shape[1], 0.5 + 0.35 * w.shape[0]))
    image = ax.imshow(w, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.grid(False)  # a style's grid (axes.grid) would draw lines across the cells
    if x_labels is not None:
        ax.set_xticks(range(len(x_labels)), x_labels, rotation=90)
    if y_labels is not None:
        ax.set_yticks(range(len(y_labels)), y_labels)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if colorbar:
        ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    return ax


def _softmax(scores: np.ndarray, temperature: float) -> np.ndarray:
    z = scores / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _draw_temperature(ax: plt.Axes, scores: np.ndarray, temperature: float, labels: Sequence[str]) -> None:
    weights = _softmax(scores, temperature)
    entropy = float(-(weights * np.log(np.clip(weights, 1e-30, None))).sum())
    ax.bar(range(len(weights)), weights, color="tab:blue")
    ax.set_xticks(range(len(weights)), labels)
    ax.set(ylim=(0, 1), xlabel="key", ylabel="attention weight",
           title=f"temperature {temperature:g}: entropy {entropy:.2f} nats (max {np.log(len(weights)):.2f})")


def temperature_figure(scores: torch.Tensor | np.ndarray, temperatures: Sequence[float] = (0.1, 0.5, 1.0, 5.0),
                       labels: Sequence[str] | None = None) -> plt.Figure:
    """Static figure: the softmax of one row of ``scores`` at several temperatures, one panel each.

    Args:
        scores: 1-D scores ``(Tk,)`` of one query against ``Tk`` keys.
        temperatures: positive temperatures ``tau``; the weights are ``softmax(scores / tau)``.
        labels: names of the keys.

    Raises:
        ValueError: if ``scores`` is not 1-D or a temperature is not positive.
    """
    s = _check_scores_1d(scores)
    if any(t <= 0 for t in temperatures):
        raise ValueError(f"temperatures must be positive, got {list(temperatures)}")
    labels = list(labels) if labels is not None else [f"k{j}" for j in range(len(s))]
    n_cols = min(2, len(temperatures))
    n_rows = -(-len(temperatures) // n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(5.5 * n_cols, 2.8 * n_rows), sharey=True, squeeze=False)
    for ax, t in zip(axes.flat, temperatures):
        _draw_temperature(ax, s, t, labels)
        ax.title.set_fontsize(10)
    for ax in axes.flat[len(temperatures):]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def temperature_explorer(scores: torch.Tensor | np.ndarray, labels: Sequence[str] | None = None):
    """An ipywidgets explorer: a log-scale temperature slider over the softmax of one row of ``scores``.

    Args:
        scores: 1-D scores ``(Tk,)``.
        labels: names of the keys.

    Returns:
        An :func:`ipywidgets.interactive` widget (display it as the last expression of a cell).
    """
    import ipywidgets as widgets

    s = _check_scores_1d(scores)
    labels = list(labels) if labels is not None else [f"k{j}" for j in range(len(s))]

    def show(temperature: float) -> None:
        fig, ax = plt.subplots(figsize=(6, 3))
        _draw_temperature(ax, s, temperature, labels)
        plt.show()

    slider = widgets.FloatLogSlider(value=1.0, base=10, min=-2, max=1.5, step=0.05, description="temperature",
                                    continuous_update=True, style={"description_width": "initial"})
    return widgets.interactive(show, temperature=slider)


def _check_scores_1d(scores: torch.Tensor | np.ndarray) -> np.ndarray:
    s = _as_numpy(scores)
    if s.ndim != 1:
        raise ValueError(f"scores must be 1-D (Tk,), got shape {s.shape}")
    return s


# --------------------------------------------------------------------------------------------------------------
# Attention heads and layers (chapter 15, for every chapter that shows a model's attention)
# --------------------------------------------------------------------------------------------------------------

def _check_tokens(tokens: Sequence[str], T: int, name: str = "tokens") -> list[str]:
    tokens = [str(t) for t in tokens]
    if len(tokens) != T:
        raise ValueError(f"{name} must hold one label per position ({T}), got {len(tokens)}")
    return tokens


def plot_attention_heads(weights: torch.Tensor | np.ndarray, tokens: Sequence[str], ncols: int = 4, *,
                         title: str = "", cmap: str = "viridis", vmax: float | None = 1.0,
                         panel_size: float = 2.6) -> plt.Figure:
    """Static figure: the attention map of every head of one layer, one panel per head (queries down, keys across).

    Args:
        weights: ``(H, T, T)`` attention weights of one layer and one sequence.
        tokens: the ``T`` token labels (keys on the bottom row of panels, queries on the left column).
        ncols: panels per row.
        title: the figure's title.
        cmap, vmax: as :func:`plot_attention` (one colour scale for every panel, so that heads compare).

    Returns:
        The figure; panel ``h`` is titled ``"head h+1"``.

    Raises:
        ValueError: if ``weights`` is not ``(H, T, T)`` or ``tokens`` does not hold ``T`` labels.
    """
    w = _as_numpy(weights)
    if w.ndim != 3 or w.shape[1] != w.shape[2]:
        raise ValueError(f"weights must be (H, T, T), one layer of one sequence, got shape {w.shape}")
    H, T, _ = w.shape
    tokens = _check_tokens(tokens, T)
    ncols = max(1, min(ncols, H))
    nrows = -(-H // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel_size * ncols, panel_size * nrows + 0.4), squeeze=False)
    fontsize = 7 if T <= 16 else 5
    for h, ax in enumerate(axes.flat):
        if h >= H:
            ax.set_visible(False)
            continue
        ax.imshow(w[h], cmap=cmap, vmin=0.0, vmax=vmax, aspect="auto")
        ax.grid(False)
        ax.set_title(f"head {h + 1}", fontsize=9)
        row, col = divmod(h, ncols)
        last_row = h + ncols >= H
        ax.set_xticks(range(T), tokens if last_row else [], rotation=90, fontsize=fontsize)
        ax.set_yticks(range(T), tokens if col == 0 else [], fontsize=fontsize)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_head_scores(scores: torch.Tensor | np.ndarray, ax: plt.Axes | None = None, *, title: str = "",
                     fmt: str = ".2f", cmap: str = "viridis", vmin: float | None = None, vmax: float | None = None,
                     xlabel: str = "head", ylabel: str = "layer", colorbar_label: str = "") -> plt.Axes:
    """A ``(L, H)`` table of one number per head (entropy, ablation drop, induction score ...) as an annotated
    heatmap: layers down (layer 1 on top), heads across, both numbered from 1.

    Args:
        scores: ``(L, H)`` numbers.
        ax: axes to draw on (a new figure if ``None``).
        fmt: the format of the number written in each cell (``""``: none).
        cmap, vmin, vmax: the colour scale (a sequential map readable in greyscale).
        colorbar_label: the colour bar's label (``None``: no colour bar; ``""``: a colour bar without a label).

    Returns:
        The axes.

    Raises:
        ValueError: if ``scores`` is not 2-D.
    """
    s = _as_numpy(scores)
    if s.ndim != 2:
        raise ValueError(f"scores must be 2-D (L, H), got shape {s.shape}")
    L, H = s.shape
    if ax is None:
        _, ax = plt.subplots(figsize=(1.0 + 0.55 * H, 0.8 + 0.45 * L))
    image = ax.imshow(s, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.grid(False)
    lo, hi = image.get_clim()
    if fmt:
        for i in range(L):
            for j in range(H):
                shade = (s[i, j] - lo) / (hi - lo) if hi > lo else 0.0
                ax.text(j, i, format(s[i, j], fmt), ha="center", va="center", fontsize=7,
                        color="white" if shade < 0.55 else "black")
    ax.set_xticks(range(H), [str(j + 1) for j in range(H)])
    ax.set_yticks(range(L), [str(i + 1) for i in range(L)])
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if colorbar_label is not None:
        ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label=colorbar_label)
    return ax


def _check_example(name: str, example: object) -> tuple[np.ndarray, list[str]]:
    if not isinstance(example, tuple) or len(example) != 2:
        raise ValueError(f"{name} must be a pair (weights (L, H, T, T), tokens), got {type(example).__name__}")
    w = _as_numpy(example[0])
    if w.ndim != 4 or w.shape[2] != w.shape[3]:
        raise ValueError(f"{name}: weights must be (L, H, T, T), got shape {w.shape}")
    return w, _check_tokens(example[1], w.shape[-1], f"{name}: tokens")


def attention_explorer(examples, *, cmap: str = "viridis"):
    """An ipywidgets explorer of a model's attention: pick the sentence, the layer, the head (or the mean of the
    heads) and the view: the raw weights of that layer, or the attention rollout up to it (Abnar and Zuidema 2020,
    :func:`tfcourse.interpret.attention_rollout`, which combines the heads). The title gives the mean entropy of
    the rows shown. Everything is drawn with matplotlib in the kernel: no JavaScript is fetched.

    Args:
        examples: a pair ``(weights (L, H, T, T), tokens)`` for one sentence, or a mapping ``{label: (weights,
            tokens)}`` for several (the same ``L`` and ``H``; ``T`` may differ).

    Returns:
        An :func:`ipywidgets.interactive` widget (display it as the last expression of a cell): its controls are
        ``sentence`` (for a mapping), ``layer``, ``head`` and ``view``.

    Raises:
        ValueError: for weights that are not ``(L, H, T, T)``, tokens of the wrong length, an empty mapping, or
            sentences with different numbers of layers or heads.
    """
    import ipywidgets as widgets

    from .interpret import attention_entropy, attention_rollout

    if isinstance(examples, tuple):
        items, several = {"": _check_example("examples", examples)}, False
    else:
        items = {str(k): _check_example(f"examples[{k!r}]", v) for k, v in dict(examples).items()}
        several = True
        if not items:
            raise ValueError("examples must hold at least one sentence")
    sizes = {w.shape[:2] for w, _ in items.values()}
    if len(sizes) > 1:
        raise ValueError(f"every sentence must have the same (layers, heads), got {sorted(sizes)}")
    L, H = next(iter(sizes))
    head_options = ["mean of heads"] + [f"head {h + 1}" for h in range(H)]

    def show(sentence: str, layer: int, head: str, view: str) -> None:
        w, tokens = items[sentence]
        if view == "rollout":
            shown = attention_rollout(torch.from_numpy(w[:, None]).double())[layer - 1, 0].numpy()
            what = f"rollout through layers 1-{layer} (all heads)"
        elif head == "mean of heads":
            shown, what = w[layer - 1].mean(axis=0), f"layer {layer}, mean of the {H} heads"
        else:
            h = head_options.index(head) - 1
            shown, what = w[layer - 1, h], f"layer {layer}, head {h + 1}"
        entropy = attention_entropy(torch.from_numpy(np.ascontiguousarray(shown)).double()).mean().item()
        T = len(tokens)
        fig, ax = plt.subplots(figsize=(1.5 + 0.36 * T, 1.2 + 0.32 * T))
        plot_attention(shown, ax, x_labels=tokens, y_labels=tokens, cmap=cmap, vmax=1.0,
                       title=f"{what}\nmean row entropy {entropy:.2f} nats (uniform: {np.log(T):.2f})")
        ax.title.set_fontsize(9)
        fig.tight_layout()
        plt.show()

    controls = {"sentence": widgets.Dropdown(options=list(items), description="sentence") if several
                else widgets.fixed("")}
    controls["layer"] = widgets.IntSlider(value=1, min=1, max=L, step=1, description="layer", continuous_update=False)
    controls["head"] = widgets.Dropdown(options=head_options, value="mean of heads", description="head")
    controls["view"] = widgets.ToggleButtons(options=["attention", "rollout"], value="attention", description="view")
    return widgets.interactive(show, **controls)
