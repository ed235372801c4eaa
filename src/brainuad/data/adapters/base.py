"""What every dataset adapter provides: discovered subjects, a label convention, defaults.

An adapter knows one download layout. :func:`Adapter.discover` lists the subjects of a
dataset folder as :class:`SubjectRecord` rows (subject id, one path per available file,
site, metadata) without reading voxels; :func:`brainuad.data.adapters.validate` then reads
each file the study will use and refuses malformed ones. Subject ids are ``sub-<alnum>``
(the workflow's ``subject`` wildcard); the id in the download is kept as ``source_id``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from brainuad.errors import InputError

# Columns of the subject sheet that hold file paths; an empty cell means "not available".
IMAGE_COLUMNS: tuple[str, ...] = ("t1", "t2", "flair", "pd", "t1ce")
LABEL_COLUMNS: tuple[str, ...] = ("seg", "brainmask_truth")
FILE_COLUMNS: tuple[str, ...] = IMAGE_COLUMNS + LABEL_COLUMNS
# Layout options that set the label convention (Adapter.labels_for), not discovery.
LABEL_OPTIONS: tuple[str, ...] = ("lesion_labels", "ignore_labels")


@dataclass(frozen=True)
class LabelConvention:
    """How a dataset's segmentation values map to lesion, ignored and healthy voxels.

    Attributes:
        lesion: label values that are lesion (kept as they are in the slice file's ``seg``,
            so sub-regions such as BraTS's 1/2/4 stay available for per-region metrics).
        ignore: label values that are neither lesion nor healthy: excluded from the lesion
            mask and from scoring (WMH 2017's label 2, "other pathology").
        description: where the convention comes from, quoted in errors.
    """

    lesion: tuple[int, ...]
    ignore: tuple[int, ...] = ()
    description: str = ""

    @property
    def allowed(self) -> tuple[int, ...]:
        return tuple(sorted({0, *self.lesion, *self.ignore}))


@dataclass(frozen=True)
class SubjectRecord:
    """One discovered subject: ``files`` maps a sheet column (``FILE_COLUMNS``) to a path;
    ``release_split`` is the download's own split of the subject, where it ships one
    (``cddpm_release``): one of train/val/test per fold, comma-separated, or one value for
    every fold (see :func:`brainuad.slices.splits.release_splits`)."""

    subject: str
    source_id: str
    files: dict[str, Path]
    site: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    release_split: str = ""


@dataclass
class Discovery:
    """Subjects found in a dataset folder, and the ones skipped with the reason."""

    records: list[SubjectRecord] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Adapter:
    """One download layout.

    Attributes:
        name: the ``source`` value in the config.
        sequences: sequences the layout can provide.
        labels: the segmentation convention, None for a healthy dataset without labels.
        discover: ``(root, sequences) -> Discovery``; ``sequences`` are the ones the study
            uses, so a subject lacking one can be skipped (or refused) here.
        preprocess_defaults: preprocessing settings that fit the download (e.g. BraTS is
            skull-stripped already: ``skullstrip_method: none``); the study's
            ``preprocess`` block is overridden by these, and they by the dataset's own
            ``preprocess`` block.
        skip_incomplete: True when a subject missing a used sequence is skipped and listed
            (IXI), False when that is an error (a lesion cohort whose files belong together).
        mixed: the layout holds healthy and lesion datasets alike (``cddpm_release``,
            ``bids``): ``labels`` apply only to a dataset whose ``lesion`` is not ``none``.
        options: keys the dataset's ``layout:`` block may set, passed to ``discover`` as
            keyword arguments (empty: the layout takes none).
    """

    name: str
    sequences: tuple[str, ...]
    labels: LabelConvention | None
    discover: Callable[..., Discovery]
    preprocess_defaults: dict[str, Any] = field(default_factory=dict)
    skip_incomplete: bool = False
    mixed: bool = False
    options: tuple[str, ...] = ()

    def labels_for(
        self, lesion: str, options: dict[str, Any] | None = None
    ) -> LabelConvention | None:
        """The label convention of a dataset of this layout with cohort kind ``lesion``:
        None for a healthy dataset of a mixed layout; ``layout.lesion_labels`` /
        ``ignore_labels`` where the layout takes them (``bids``)."""
        if self.mixed and lesion == "none":
            return None
        options = options or {}
        if "lesion_labels" in options or "ignore_labels" in options:
            return LabelConvention(
                lesion=tuple(options.get("lesion_labels", self.labels.lesion)),
                ignore=tuple(options.get("ignore_labels", self.labels.ignore)),
                description=f"{self.name}: layout.lesion_labels / layout.ignore_labels",
            )
        return self.labels

    def find(
        self, root: Path, sequences: Sequence[str], options: dict[str, Any] | None = None
    ) -> Discovery:
        """``discover`` with the dataset's ``layout:`` options (refusing unknown keys)."""
        options = dict(options or {})
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise InputError(
                f"layout: {unknown} not understood by source '{self.name}' "
                f"(it takes {list(self.options) or 'no options'})"
            )
        layout = {k: v for k, v in options.items() if k not in LABEL_OPTIONS}
        return self.discover(root, sequences, **layout)


_ID_CHARS = re.compile(r"[^A-Za-z0-9]")


def subject_id(source_id: str) -> str:
    """Workflow subject id ``sub-<alnum>`` of a download's own id (``IXI002`` -> ``sub-IXI002``)."""
    cleaned = _ID_CHARS.sub("", source_id.removeprefix("sub-"))
    if not cleaned:
        raise InputError(f"subject id '{source_id}': no letters or digits to build an id from")
    return f"sub-{cleaned}"


def require_folder(root: Path, adapter: str) -> Path:
    """``root`` as a Path, refusing a missing folder with the adapter's name."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: dataset folder of source '{adapter}' does not exist")
    return root


def first_existing(folder: Path, names: Sequence[str]) -> Path | None:
    """The first of ``names`` that exists in ``folder`` (layouts with alternative names)."""
    for name in names:
        if (folder / name).is_file():
            return folder / name
    return None


def check_unique(records: list[SubjectRecord], root: Path) -> list[SubjectRecord]:
    """Refuse two download ids that map to the same workflow subject id; sort by id."""
    seen: dict[str, str] = {}
    for record in records:
        if record.subject in seen:
            raise InputError(
                f"{root}: subjects '{seen[record.subject]}' and '{record.source_id}' both "
                f"map to the id '{record.subject}'"
            )
        seen[record.subject] = record.source_id
    return sorted(records, key=lambda r: r.subject)
