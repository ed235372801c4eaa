"""The intensity baseline (Meissen et al. 2021; cDDPM Table 3, first row), by its definition:
the map is the intensity (``bright``) or one minus it (``dark``), averaged over the channels
read, zero outside the brain; it has no trained stage."""

from __future__ import annotations

import pytest
import torch

from brainuad.errors import InputError
from brainuad.methods import build_method


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(3, 2, 8, 8, generator=generator)
    brainmask = torch.zeros(3, 1, 8, 8)
    brainmask[:, :, 2:6, 1:7] = 1
    return images, brainmask


@pytest.mark.parametrize("polarity", ["bright", "dark"])
def test_map_is_the_brains_mean_intensity_or_its_complement(polarity: str) -> None:
    images, brainmask = inputs()
    method = build_method("intensity", in_channels=2, polarity=polarity)
    anomaly_map = method.score(images, brainmask).anomaly_map
    mean = (images[:, 0] + images[:, 1]) / 2
    expected = mean if polarity == "bright" else 1 - mean
    assert anomaly_map.shape == (3, 8, 8)
    torch.testing.assert_close(anomaly_map, expected * brainmask[:, 0])
    assert (anomaly_map[brainmask[:, 0] == 0] == 0).all()
    assert (anomaly_map[brainmask[:, 0] == 1] > 0).all()


def test_default_is_one_bright_channel_and_nothing_to_train() -> None:
    images, brainmask = inputs()
    method = build_method("intensity")
    assert method.hparams == {"in_channels": 1, "polarity": "bright"}
    assert method.stages == () and method.supervision == "healthy"
    assert not method.has_reconstruction
    torch.testing.assert_close(
        method.score(images[:, :1], brainmask).anomaly_map, images[:, 0] * brainmask[:, 0]
    )
    with pytest.raises(InputError, match=r"^the intensity baseline has no trained stage$"):
        method.training_loss({"image": images[:, :1], "brainmask": brainmask})


def test_bad_hyperparameters_are_named() -> None:
    with pytest.raises(InputError, match=r"\bpolarity\b"):
        build_method("intensity", polarity="up")
    with pytest.raises(InputError, match="in_channels=0"):
        build_method("intensity", in_channels=0)
    assert build_method("intensity", in_channels=1).hparams["in_channels"] == 1
