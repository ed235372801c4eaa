"""Step 5: registration to the template with ANTs, transforms kept in a private temp folder.

``ants.registration`` writes its transforms to files named by ``outprefix`` (a bare
``mktemp()`` name in the system temp folder when none is given, never removed). Here they go
to a ``TemporaryDirectory`` that lives exactly as long as the ``with`` block.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import ants

# Names accepted by ants.apply_transforms.
TransformInterpolation = Literal["linear", "bSpline", "nearestNeighbor", "genericLabel"]


@dataclass(frozen=True)
class Registration:
    """Transforms found by one registration; valid only inside :func:`register`'s block."""

    fixed: ants.ANTsImage
    moving: ants.ANTsImage
    forward: list[str]
    inverse: list[str]

    def to_fixed(
        self,
        image: ants.ANTsImage,
        interpolation: TransformInterpolation,
        reference: ants.ANTsImage | None = None,
    ) -> ants.ANTsImage:
        """Bring ``image`` onto ``reference`` (default: fixed).

        ``image`` may be on any grid of the moving image's physical space (the transforms
        map world points), not only on the grid that was registered.
        """
        return ants.apply_transforms(
            fixed=self.fixed if reference is None else reference,
            moving=image,
            transformlist=self.forward,
            interpolator=interpolation,
        )

    def to_moving(
        self, image: ants.ANTsImage, interpolation: TransformInterpolation
    ) -> ants.ANTsImage:
        """Bring ``image`` (in fixed space) onto the moving image's grid."""
        return ants.apply_transforms(
            fixed=self.moving,
            moving=image,
            transformlist=self.inverse,
            # ANTs convention: affine matrices are inverted on the fly, inverse warps are
            # already written as separate files.
            whichtoinvert=[path.endswith(".mat") for path in self.inverse],
            interpolator=interpolation,
        )


def ants_random_seed(seed: int) -> int:
    """A valid ANTs seed derived from the study ``seed``: in 1 … 2³¹ − 2 (ANTs takes 32-bit
    signed seeds ≥ 1), never 0, which ANTs replaces by the clock."""
    return 1 + int(seed) % (2**31 - 2)


@contextlib.contextmanager
def register(
    fixed: ants.ANTsImage,
    moving: ants.ANTsImage,
    *,
    type_of_transform: str = "Affine",
    random_seed: int = 1,
) -> Iterator[Registration]:
    """Register ``moving`` onto ``fixed``; yield the transforms, then delete their files.

    Args:
        fixed: target image (the template brain).
        moving: image to align (the subject's stripped brain).
        type_of_transform: any ``ants.registration`` type: "Rigid", "Affine", "SyN", ...
        random_seed: seed of the metric's random sampling, for repeatable transforms; must be
            ≥ 1 (ANTs seeds 0 from the clock). Bit-identical transforms also need one ITK
            thread (``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1`` before ITK is first used, as
            :func:`brainuad.workflow.rule_logging` sets for single-threaded rules).

    Raises:
        ValueError: ``random_seed`` below 1.
    """
    if not isinstance(random_seed, int) or random_seed < 1:
        raise ValueError(
            f"random_seed={random_seed!r}: expected an integer ≥ 1 (ANTs seeds 0 from the clock)"
        )
    with tempfile.TemporaryDirectory(prefix="brainuad_ants_") as folder:
        result = ants.registration(
            fixed=fixed,
            moving=moving,
            type_of_transform=type_of_transform,
            outprefix=str(Path(folder) / "reg_"),
            random_seed=random_seed,
        )
        forward = result["fwdtransforms"]
        inverse = result["invtransforms"]
        yield Registration(
            fixed=fixed,
            moving=moving,
            forward=[forward] if isinstance(forward, str) else list(forward),
            inverse=[inverse] if isinstance(inverse, str) else list(inverse),
        )


@contextlib.contextmanager
def identity(fixed: ants.ANTsImage, moving: ants.ANTsImage) -> Iterator[Registration]:
    """The identity transform as a :class:`Registration`, for images already in ``fixed``'s
    space (ATLAS in MNI152): volumes are only resampled onto the requested grid."""
    with tempfile.TemporaryDirectory(prefix="brainuad_ants_") as folder:
        path = str(Path(folder) / "identity.mat")
        ants.write_transform(
            ants.create_ants_transform(transform_type="AffineTransform", dimension=3), path
        )
        yield Registration(fixed=fixed, moving=moving, forward=[path], inverse=[path])
