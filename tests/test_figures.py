"""Tests of brainuad.evaluation.figures: every figure is written as PNG and PDF."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest

from brainuad.errors import InputError
from brainuad.evaluation.figures import (
    plot_precision_recall,
    plot_qualitative_grid,
    plot_subject_dice_boxplots,
    plot_training_curves,
    pr_curve_from_arrays,
)

METRIC = "dice@healthy_fpr_5"


def _outputs(tmp_path, name):
    return tmp_path / f"{name}.png", tmp_path / f"{name}.pdf"


def _assert_written(png, pdf):
    assert png.read_bytes().startswith(b"\x89PNG")
    assert pdf.read_bytes().startswith(b"%PDF")
    assert not list(png.parent.glob(".*"))  # temporary files renamed or removed


@pytest.fixture
def long_df():
    rng = np.random.default_rng(0)
    rows = []
    for method in ("cddpm", "vae"):
        for fold in (0, 1):
            for dataset in ("brats", "atlas"):
                for subject in range(4):
                    healthy = subject == 3
                    value = np.nan if healthy else rng.random()
                    rows.append((method, fold, dataset, f"s{subject}", not healthy, METRIC, value))
    columns = ["method", "fold", "dataset", "subject", "has_lesion", "metric", "value"]
    return pd.DataFrame(rows, columns=columns)


def test_subject_boxplots(long_df, tmp_path):
    png, pdf = _outputs(tmp_path, "box")
    fig = plot_subject_dice_boxplots(long_df, METRIC, png, pdf, ylabel="Dice")
    _assert_written(png, pdf)
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["brats", "atlas"]
    # one point per lesion subject, averaged over folds: 2 methods × 2 datasets × 3
    n_points = sum(len(c.get_offsets()) for c in ax.collections)
    assert n_points == 12


def test_subject_boxplots_reject_empty(long_df, tmp_path):
    with pytest.raises(InputError, match="auprc"):
        plot_subject_dice_boxplots(long_df, "auprc", *_outputs(tmp_path, "box"))
    healthy_only = long_df.assign(value=np.nan)
    with pytest.raises(InputError, match="no non-NaN"):
        plot_subject_dice_boxplots(healthy_only, METRIC, *_outputs(tmp_path, "box"))


def test_pr_curve_is_downsampled_and_sane():
    rng = np.random.default_rng(1)
    labels = rng.random(5000) < 0.1
    scores = rng.random(5000) + labels
    precision, recall = pr_curve_from_arrays(scores, labels, max_points=50)
    assert precision.shape == recall.shape
    assert 2 <= precision.size <= 50
    assert recall[0] == 1.0 and recall[-1] == 0.0  # both ends kept
    assert np.all(np.diff(recall) <= 0)


def test_pr_curve_rejects_bad_input():
    with pytest.raises(InputError, match="empty"):
        pr_curve_from_arrays(np.array([]), np.array([]))
    with pytest.raises(InputError, match="no positive"):
        pr_curve_from_arrays(np.ones(4), np.zeros(4))
    with pytest.raises(InputError, match="labels 3"):
        pr_curve_from_arrays(np.ones(4), np.ones(3))


def test_precision_recall_figure(tmp_path):
    rng = np.random.default_rng(2)
    labels = rng.random(2000) < 0.2
    curves = {
        (method, dataset): pr_curve_from_arrays(rng.random(2000) + labels * shift, labels)
        for method, shift in (("cddpm", 0.8), ("vae", 0.3))
        for dataset in ("brats", "atlas", "msls")
    }
    png, pdf = _outputs(tmp_path, "pr")
    fig = plot_precision_recall(curves, png, pdf)
    _assert_written(png, pdf)
    assert len(fig.axes) == 3
    assert all(len(ax.lines) == 2 for ax in fig.axes)
    with pytest.raises(InputError, match="no curves"):
        plot_precision_recall({}, png, pdf)


def _example(dataset, method, with_reconstruction=True):
    rng = np.random.default_rng(3)
    image = rng.random((16, 16))
    mask = image > 0.8
    return {
        "dataset": dataset,
        "method": method,
        "input": image,
        "reconstruction": image * 0.9 if with_reconstruction else None,
        "anomaly_map": image * mask,
        "thresholded": mask,
        "ground_truth": mask,
    }


def test_qualitative_grid(tmp_path):
    examples = [_example("brats", "cddpm"), _example("brats", "fanogan", False)]
    png, pdf = _outputs(tmp_path, "grid")
    fig = plot_qualitative_grid(examples, png, pdf, anomaly_range=(0.0, 1.0))
    _assert_written(png, pdf)
    assert len(fig.axes) == 2 * 5 + 1  # panels + colour bar
    anomaly_panels = [fig.axes[2], fig.axes[7]]
    assert all(ax.images[0].get_clim() == (0.0, 1.0) for ax in anomaly_panels)
    assert all(not ax.axison for ax in fig.axes[:10])


def test_qualitative_grid_rejects_bad_input(tmp_path):
    png, pdf = _outputs(tmp_path, "grid")
    with pytest.raises(InputError, match="no examples"):
        plot_qualitative_grid([], png, pdf)
    bad = _example("brats", "cddpm")
    bad["ground_truth"] = np.zeros((8, 8))
    with pytest.raises(InputError, match="ground_truth"):
        plot_qualitative_grid([bad], png, pdf)


def test_training_curves(tmp_path):
    steps = np.arange(0, 50)
    logs = {
        (method, fold): pd.DataFrame(
            {
                "step": steps,
                "train_loss": np.exp(-steps / 20) + 0.01 * fold,
                "val_loss": np.where(steps % 10 == 0, np.exp(-steps / 20) + 0.05, np.nan),
            }
        )
        for method in ("cddpm", "vae")
        for fold in (0, 1, 2)
    }
    png, pdf = _outputs(tmp_path, "loss")
    fig = plot_training_curves(logs, png, pdf)
    _assert_written(png, pdf)
    assert len(fig.axes) == 2
    assert all(ax.get_yscale() == "log" for ax in fig.axes)
    with pytest.raises(InputError, match="no training logs"):
        plot_training_curves({}, png, pdf)
    with pytest.raises(InputError, match="train_loss"):
        plot_training_curves({("vae", 0): pd.DataFrame({"step": [0]})}, png, pdf)
