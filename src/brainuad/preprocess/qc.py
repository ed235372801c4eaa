"""Step 8: quality control of a preprocessed subject: the slice picture.

The overlap numbers of the QC record use :func:`brainuad.evaluation.metrics.dice`, the one
Dice of the project (NaN when both masks are empty; preprocessing never gets there, as it
stops on an empty brain mask).
"""

from __future__ import annotations

import os

import numpy as np
from matplotlib.figure import Figure

from brainuad.io.atomic import atomic_path


def qc_slice_indices(brainmask: np.ndarray, seg: np.ndarray) -> tuple[int, int, int]:
    """Slices to show: through the lesion's centre of mass if there is one, else the middle
    of the brain's bounding box, else the middle of the volume."""
    for mask in (seg > 0, brainmask > 0):
        if mask.any():
            return tuple(round(float(c)) for c in np.argwhere(mask).mean(axis=0))
    return tuple(s // 2 for s in brainmask.shape)


def write_qc_png(
    path: str | os.PathLike,
    images: dict[str, np.ndarray],
    brainmask: np.ndarray,
    seg: np.ndarray,
    title: str = "",
) -> None:
    """Write a PNG: one column per sequence, rows axial/coronal/sagittal, with the brain-mask
    contour (cyan) and the lesion contour (red). Volumes are RAS; images are shown in
    neurological convention (subject's right on the right)."""
    centre = qc_slice_indices(brainmask, seg)
    views = [
        ("axial", lambda v: v[:, :, centre[2]]),
        ("coronal", lambda v: v[:, centre[1], :]),
        ("sagittal", lambda v: v[centre[0], :, :]),
    ]
    figure = Figure(figsize=(2.6 * len(images), 2.6 * len(views)), dpi=100)
    axes = figure.subplots(len(views), len(images), squeeze=False)
    for column, (sequence, volume) in enumerate(images.items()):
        for row, (view, cut) in enumerate(views):
            ax = axes[row, column]
            ax.imshow(cut(volume).T, origin="lower", cmap="gray", vmin=0.0, vmax=1.0)
            for mask, colour in ((brainmask, "cyan"), (seg > 0, "red")):
                plane = cut(np.asarray(mask, dtype=np.float32)).T
                if plane.min() < 0.5 < plane.max():
                    ax.contour(plane, levels=[0.5], colors=colour, linewidths=0.7)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(sequence, fontsize=9)
            if column == 0:
                ax.set_ylabel(f"{view} {centre[2 - row]}", fontsize=8)
    if title:
        figure.suptitle(title, fontsize=8)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
