"""tfcourse.viz: figures and widgets draw what they claim and reject bad input."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from tfcourse.viz import plot_attention, temperature_explorer, temperature_figure  # noqa: E402


def test_plot_attention_draws_the_matrix():
    w = torch.softmax(torch.randn(3, 4), dim=-1)
    ax = plot_attention(w, x_labels=list("abcd"), y_labels=list("xyz"), title="t")
    np.testing.assert_allclose(ax.images[0].get_array(), w.numpy(), rtol=1e-6)
    assert [t.get_text() for t in ax.get_xticklabels()] == list("abcd")
    plt.close("all")


def test_plot_attention_rejects_non_matrices():
    with pytest.raises(ValueError, match="weights"):
        plot_attention(torch.rand(2, 3, 4))


def test_temperature_figure_one_panel_per_temperature_and_entropy_in_titles():
    scores = torch.tensor([2.0, 0.0, -1.0])
    fig = temperature_figure(scores, temperatures=(0.5, 1.0, 5.0))
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 3
    p = torch.softmax(scores / 5.0, dim=0)
    entropy = float(-(p * p.log()).sum())
    assert f"entropy {entropy:.2f}" in visible[2].get_title()
    heights = [bar.get_height() for bar in visible[0].patches]
    np.testing.assert_allclose(heights, torch.softmax(scores / 0.5, dim=0).numpy(), rtol=1e-6)
    plt.close("all")
    with pytest.raises(ValueError, match="temperatures"):
        temperature_figure(scores, temperatures=(0.0,))
    with pytest.raises(ValueError, match="scores"):
        temperature_figure(torch.zeros(2, 2))


def test_temperature_explorer_is_a_widget_with_a_slider():
    widget = temperature_explorer(torch.tensor([1.0, 0.0]))
    slider = widget.children[0]
    assert slider.description == "temperature" and slider.value == 1.0
    plt.close("all")
