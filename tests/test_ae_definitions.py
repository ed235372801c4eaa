"""The convolutional autoencoder baseline against its definition: the network is MONAI's
AutoEncoder built from the hyperparameters; the loss is L1 (or L2) between the reconstruction
and the input, over the brain (or the image); the anomaly map is |x − x̂| averaged over
channels. A recording stand-in for the network keeps each test to milliseconds."""

from __future__ import annotations

import pytest
import torch

from brainuad.methods.ae import ConvAutoencoder

TINY = {"channels": (4, 8), "strides": (2, 2), "num_res_units": 0}


class _Affine(torch.nn.Module):
    """Stands in for the network: x̂ = 0.5 x + 0.1, recording its inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[torch.Tensor] = []

    def forward(self, images):
        self.calls.append(images.clone())
        return 0.5 * images + 0.1


def _batch(b=2, c=2, size=8):
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(b, c, size, size, generator=generator)
    mask = (torch.rand(b, 1, size, size, generator=generator) > 0.4).float()
    return {"image": image, "brainmask": mask}


def test_defaults_and_recorded_hyperparameters():
    assert ConvAutoencoder().hparams == {
        "in_channels": 1,
        "channels": (32, 64, 128, 256),
        "strides": (2, 2, 2, 2),
        "num_res_units": 1,
        "norm": "INSTANCE",
        "act": "PRELU",
        "loss": "l1",
        "loss_region": "brain",
        "optimizer": "adam",
        "weight_decay": 0.0,
    }
    assert (ConvAutoencoder.default_learning_rate, ConvAutoencoder.default_batch_size) == (
        1e-4,
        32,
    )
    assert ConvAutoencoder.supervision == "healthy" and ConvAutoencoder.has_reconstruction
    method = ConvAutoencoder(
        in_channels=2, channels=[4, 8], strides=[2, 1], num_res_units=1, weight_decay=1
    )
    assert method.hparams == {
        "in_channels": 2,
        "channels": (4, 8),
        "strides": (2, 1),
        "num_res_units": 1,
        "norm": "INSTANCE",
        "act": "PRELU",
        "loss": "l1",
        "loss_region": "brain",
        "optimizer": "adam",
        "weight_decay": 1.0,
    }
    assert isinstance(method.hparams["weight_decay"], float)
    network = method.network
    assert (network.dimensions, network.in_channels, network.out_channels) == (2, 2, 2)
    assert (network.channels, network.strides, network.num_res_units) == ([4, 8], [2, 1], 1)
    assert (network.norm, network.act) == ("INSTANCE", "PRELU")
    adamw = ConvAutoencoder(**TINY, optimizer="adamw", weight_decay=0.5)
    optimizer = adamw.configure_optimizer(1e-3)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.param_groups[0]["weight_decay"] == 0.5
    other = ConvAutoencoder(**TINY, norm="BATCH", act="RELU").network
    assert (other.norm, other.act, other.num_res_units) == ("BATCH", "RELU", 0)


def test_bad_hyperparameters_are_refused():
    from brainuad.errors import InputError

    for bad, match in [
        ({"loss": "l3"}, "hyperparameter loss='l3'"),
        ({"loss_region": "skull"}, "hyperparameter loss_region='skull'"),
        ({"optimizer": "sgd"}, "hyperparameter optimizer='sgd'"),
    ]:
        with pytest.raises(InputError, match=match):
            ConvAutoencoder(**{**TINY, **bad})
    with pytest.raises(ValueError, match=r"channels \(4, 8\) and strides \(2,\) must have"):
        ConvAutoencoder(channels=(4, 8), strides=(2,))


def test_network_reconstructs_at_the_input_size():
    method = ConvAutoencoder(**TINY, in_channels=2)
    images = _batch()["image"]
    out = method(images)
    assert out.shape == images.shape
    assert torch.equal(out, method.network(images))


@pytest.mark.parametrize(
    ("loss", "region"), [("l1", "brain"), ("l2", "brain"), ("l1", "image"), ("l2", "image")]
)
def test_training_loss_is_the_reconstruction_error(loss, region):
    method = ConvAutoencoder(**TINY, in_channels=2, loss=loss, loss_region=region)
    method.network = _Affine()
    batch = _batch()
    value = method.training_loss(batch)
    assert torch.equal(method.network.calls[0], batch["image"])
    error = (0.5 * batch["image"] + 0.1) - batch["image"]
    error = error.abs() if loss == "l1" else error.square()
    if region == "image":
        expected = error.mean()
    else:  # the mean over brain pixels of both channels
        mask = batch["brainmask"].expand_as(error)
        expected = (error * mask).sum() / mask.sum()
    assert float(value) == pytest.approx(float(expected), rel=1e-6)


def test_score_is_the_channel_mean_residual():
    method = ConvAutoencoder(**TINY, in_channels=2)
    method.network = _Affine()
    images = _batch()["image"]
    out = method.score(images, torch.ones(2, 1, 8, 8))
    reconstruction = 0.5 * images + 0.1
    torch.testing.assert_close(out.reconstruction, reconstruction)
    torch.testing.assert_close(out.anomaly_map, (images - reconstruction).abs().mean(dim=1))
