"""Run figures: what they draw, and that they render to PNG without pyplot."""

from __future__ import annotations

import gc
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline_lib.training.plots import allocation_histogram, calibration_plot, training_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_allocation_histogram_has_one_bar_per_integer_and_marks_the_uniform_mean() -> None:
    rollouts = np.array([2, 2, 2, 4, 8, 8, 10, 12, 24])  # mean 8

    fig = allocation_histogram(rollouts, "epoch 0")
    ax = fig.axes[0]

    assert len(ax.patches) == 24 - 2 + 1
    assert sum(p.get_height() for p in ax.patches) == rollouts.size
    (mean_line,) = ax.get_lines()
    assert mean_line.get_xdata()[0] == pytest.approx(8.0)
    assert ax.get_title() == "epoch 0"


def test_allocation_histogram_widens_bars_when_the_range_is_large() -> None:
    rollouts = np.array([2, 2, 3, 128])

    ax = allocation_histogram(rollouts, "wide", max_bars=64).axes[0]

    assert len(ax.patches) == 64
    assert sum(p.get_height() for p in ax.patches) == 4


def test_calibration_plot_has_a_point_per_filled_bin_and_a_count_bar_per_bin() -> None:
    predicted = np.array([0.05, 0.05, 0.15, 0.95, 1.0, np.nan])
    realised = np.array([0.0, 0.1, 0.2, 1.0, 1.0, 0.5])  # the NaN-predicted prompt is left out

    fig = calibration_plot(predicted, realised, bins=10)
    reliability, counts = fig.axes
    diagonal, per_bin = reliability.get_lines()

    assert list(diagonal.get_xdata()) == [0, 1]
    np.testing.assert_allclose(per_bin.get_xdata(), [0.05, 0.15, 0.975])
    np.testing.assert_allclose(per_bin.get_ydata(), [0.05, 0.2, 1.0])
    assert len(counts.patches) == 10
    assert [p.get_height() for p in counts.patches] == [2, 1, 0, 0, 0, 0, 0, 0, 0, 2]
    assert "ECE 0.020" in reliability.get_legend().get_texts()[1].get_text()


def test_calibration_plot_rejects_probabilities_outside_unit_interval() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        calibration_plot(np.array([1.5]), np.array([1.0]))


def _steps_table() -> pd.DataFrame:
    rows = []
    for strategy, gain in (("uniform", 0.30), ("knapsack", 0.70)):
        for seed in (0, 1):
            for step in range(0, 50, 10):
                rows.append(
                    {
                        "strategy": strategy,
                        "seed": seed,
                        "step": step,
                        "effective_gradient_ratio": gain + 0.01 * seed,
                        # evaluated every 20 steps only: NaN in between
                        "accuracy": 0.42 + 0.002 * step + 0.01 * seed if step % 20 == 0 else np.nan,
                    }
                )
    return pd.DataFrame(rows)


def test_training_curves_draw_one_line_per_strategy_with_a_seed_band() -> None:
    fig = training_curves(_steps_table())
    accuracy_ax, ratio_ax = fig.axes

    assert [line.get_label() for line in accuracy_ax.get_lines()] == ["knapsack", "uniform"]
    knapsack_accuracy = accuracy_ax.get_lines()[0]
    np.testing.assert_allclose(knapsack_accuracy.get_xdata(), [0, 20, 40])
    np.testing.assert_allclose(knapsack_accuracy.get_ydata(), [0.425, 0.465, 0.505])
    np.testing.assert_allclose(ratio_ax.get_lines()[1].get_ydata(), [0.305] * 5)
    assert len(ratio_ax.collections) == 2  # a min-max band per strategy (two seeds)
    assert ratio_ax.get_title() == "effective_gradient_ratio"


def test_training_curves_name_missing_columns() -> None:
    with pytest.raises(ValueError, match="wall_s"):
        training_curves(_steps_table(), x="wall_s")


def test_figures_render_to_png_and_are_freed_without_pyplot(tmp_path: Path) -> None:
    figures = {
        "allocation": allocation_histogram(np.array([2, 2, 5, 8, 8, 8, 13, 24, 40]), "epoch 3"),
        "calibration": calibration_plot(np.linspace(0, 1, 50), np.linspace(0, 1, 50) ** 2),
        "curves": training_curves(_steps_table()),
    }
    for name, fig in figures.items():
        fig.savefig(tmp_path / f"{name}.png", dpi=80)
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == PNG_MAGIC

    del fig  # the loop variable holds the last figure
    freed = weakref.ref(figures.pop("curves"))
    gc.collect()
    assert freed() is None


def test_making_figures_leaves_pyplot_and_its_global_state_unloaded() -> None:
    script = (
        "import sys, numpy as np; from pipeline_lib.training.plots import allocation_histogram; "
        "allocation_histogram(np.array([2, 8])).savefig(__import__('io').BytesIO()); "
        "assert 'matplotlib.pyplot' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=Path(__file__).parents[1])
