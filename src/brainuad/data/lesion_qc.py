"""QC of a synthetic cohort's lesion volumes against the published statistics it imitates.

For one cohort, :func:`lesion_volume_records` collects each subject's lesion volume from the
generator's metadata, :func:`volume_comparison` sets the cohort's quartiles beside the
target ones (the config's, by default the published ones of
:data:`brainuad.data.lesion_volumes.PUBLISHED_VOLUMES`), and :func:`plot_lesion_volumes`
draws them. ``python -m brainuad.data.lesion_qc`` regenerates the comparison figure of
``docs/synthetic.md`` from freshly generated subjects.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from brainuad.data.lesion_volumes import PUBLISHED_VOLUMES, VolumeSummary, check_quartiles
from brainuad.errors import InputError
from brainuad.io.atomic import atomic_path

RECORD_COLUMNS = (
    "subject", "lesion", "lesion_volume_ml", "drawn_volume_ml", "brain_volume_ml",
    "prevalence_percent", "lesion_components",
)  # fmt: skip


def lesion_volume_records(metadata: Mapping[str, Mapping]) -> pd.DataFrame:
    """One row per subject from the generator's metadata (subject -> metadata dict).

    Returns:
        Columns ``RECORD_COLUMNS``; ``prevalence_percent`` is the lesion share of the brain.

    Raises:
        InputError: when a record lacks the lesion fields (a generator older than v3).
    """
    rows = []
    for subject, meta in metadata.items():
        try:
            rows.append({
                "subject": subject,
                "lesion": meta["lesion"],
                "lesion_volume_ml": float(meta["lesion_volume_ml"]),
                "drawn_volume_ml": float(meta["lesion_parameters"]["drawn_volume_ml"]),
                "brain_volume_ml": float(meta["brain_volume_ml"]),
                "lesion_components": int(meta["lesion_components"]),
            })  # fmt: skip
        except KeyError as error:
            raise InputError(
                f"metadata of {subject}: no {error} field; expected the record of a lesion "
                "subject from brainuad.data.synthetic generator version 3 or later"
            ) from error
    frame = pd.DataFrame(rows, columns=[c for c in RECORD_COLUMNS if c != "prevalence_percent"])
    frame.insert(
        5, "prevalence_percent", 100.0 * frame["lesion_volume_ml"] / frame["brain_volume_ml"]
    )
    return frame


def target_quartiles(lesion: str, settings: Mapping | None) -> tuple[float, float, float]:
    """The quartiles a cohort was generated to match: the config's or the published ones."""
    volume = (settings or {}).get("volume_ml")
    if volume is None:
        return PUBLISHED_VOLUMES[lesion].quartiles
    return check_quartiles(
        (volume["q1"], volume["median"], volume["q3"]), f"synthetic.lesions.{lesion}.volume_ml"
    )


def volume_comparison(
    volumes_ml: Sequence[float], target: tuple[float, float, float], published: VolumeSummary
) -> pd.DataFrame:
    """Quartiles (rows q1, median, q3) of the generated, target and published volumes (ml)."""
    if len(volumes_ml) == 0:
        raise InputError("volume_comparison: no subjects")
    generated = np.percentile(np.asarray(volumes_ml, dtype=float), [25, 50, 75])
    return pd.DataFrame(
        {"generated": generated, "target": target, "published": published.quartiles},
        index=pd.Index(["q1", "median", "q3"], name="statistic"),
    )


def comparison_markdown(
    dataset: str, lesion: str, records: pd.DataFrame, comparison: pd.DataFrame
) -> str:
    """Markdown QC table of one cohort, with a verdict on the median and the source."""
    published = PUBLISHED_VOLUMES[lesion]
    median = comparison.loc["median", "generated"]
    q1, q3 = comparison.loc["q1", "target"], comparison.loc["q3", "target"]
    verdict = "inside" if q1 <= median <= q3 else "**outside**"
    lines = [
        f"### {dataset}: lesion volumes ({lesion}, {len(records)} subjects)",
        "",
        "| statistic | generated (ml) | target (ml) | published (ml) |",
        "|---|---|---|---|",
        *(
            f"| {name} | {row.generated:.2f} | {row.target:.2f} | {row.published:.2f} |"
            for name, row in comparison.iterrows()
        ),
        "",
        f"Generated median {median:.2f} ml: {verdict} the target interquartile range "
        f"[{q1:.2f}, {q3:.2f}] ml. Median lesion prevalence "
        f"{records['prevalence_percent'].median():.2f} % of the brain "
        f"(range {records['prevalence_percent'].min():.2f}-"
        f"{records['prevalence_percent'].max():.2f} %).",
        "",
        f"Published: {published.dataset}; {published.source}"
        + (" (approximate, see docs/synthetic.md)." if published.approximate else "."),
        "",
    ]
    return "\n".join(lines)


@dataclass(frozen=True)
class Panel:
    """One cohort in the figure: its generated volumes and the quartiles it should match."""

    title: str
    volumes_ml: Sequence[float]
    target: tuple[float, float, float]


def plot_lesion_volumes(panels: Sequence[Panel]) -> Figure:
    """Generated lesion volumes (points, box of their quartiles) over the target quartiles.

    One row per cohort, log-scaled volume axis. The shaded band is the target interquartile
    range and the vertical line its median.
    """
    fig = Figure(figsize=(6.4, 0.9 + 1.1 * len(panels)), layout="constrained")
    axes = np.atleast_1d(fig.subplots(len(panels), 1, squeeze=False)[:, 0])
    rng = np.random.default_rng(0)  # jitter only
    for ax, panel in zip(axes, panels, strict=True):
        q1, median, q3 = panel.target
        ax.axvspan(q1, q3, color="tab:orange", alpha=0.25, label="target IQR")
        ax.axvline(median, color="tab:orange", lw=2, label="target median")
        volumes = np.asarray(panel.volumes_ml, dtype=float)
        ax.boxplot(
            volumes, orientation="horizontal", widths=0.5, showfliers=False,
            medianprops={"color": "tab:blue", "lw": 2}, positions=[0],
        )  # fmt: skip
        ax.scatter(volumes, rng.uniform(-0.15, 0.15, volumes.size), s=14, color="tab:blue",
                   alpha=0.7, zorder=3, label="generated subjects")  # fmt: skip
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10.0, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_yticks([])
        ax.set_ylim(-0.6, 0.6)
        ax.set_title(panel.title, fontsize=9, loc="left")
    axes[-1].set_xlabel("total lesion volume per subject (ml, log scale)")
    axes[0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def save_png(fig: Figure, path: str | os.PathLike) -> None:
    """Write ``fig`` as PNG atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=150)


def _docs_figure(n_subjects: int, voxel_size_range: tuple[float, float], out: str) -> None:
    from brainuad.data.lesion_volumes import cohort_quantiles
    from brainuad.data.synthetic import generate_subject, subject_seed

    panels = []
    for kind, published in PUBLISHED_VOLUMES.items():
        dataset = f"synth_{kind}"
        quantiles = cohort_quantiles(3141, dataset, n_subjects)
        volumes = [
            generate_subject(
                seed=subject_seed(3141, dataset, f"sub-{i:03d}"), lesion=kind,
                sequences=("flair",), voxel_size_range=voxel_size_range,
                lesion_volume_quantile=float(quantiles[i]),
            ).metadata["lesion_volume_ml"]
            for i in range(n_subjects)
        ]  # fmt: skip
        comparison = volume_comparison(volumes, published.quartiles, published)
        print(kind, comparison.round(2).to_dict())
        panels.append(Panel(f"{kind}: {published.dataset}", volumes, published.quartiles))
    save_png(plot_lesion_volumes(panels), out)


if __name__ == "__main__":  # pragma: no cover - regenerates the docs figure
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=20)
    parser.add_argument("--voxel-size", type=float, nargs=2, default=(2.0, 2.5))
    parser.add_argument("--out", default="docs/synthetic_lesion_volumes.png")
    args = parser.parse_args()
    _docs_figure(args.subjects, tuple(args.voxel_size), args.out)
