"""Figures and widgets used across the book: attention heatmaps and interactive explorers."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch

__all__ = ["plot_attention", "temperature_figure", "temperature_explorer"]


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
