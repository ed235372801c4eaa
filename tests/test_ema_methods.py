"""The weakly supervised diffusion methods score with EMA weights, as their references do."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_hparams import TINY_HPARAMS

from brainuad.methods import build_method, default_hparams
from brainuad.methods.base import FINAL_STAGE
from brainuad.provenance import seed_everything

EMA_METHODS = ("wolleb", "anofpdm", "ddib")


@pytest.mark.parametrize("name", EMA_METHODS)
def test_reference_decay_is_the_default(name):
    assert default_hparams(name)["ema_decay"] == 0.9999


@pytest.mark.parametrize("name", EMA_METHODS)
def test_ema_follows_the_model_stage_and_is_what_scores(name):
    """One optimiser step of the model stage with decay 0.5: EMA = (initial + trained) / 2;
    the maps change with the EMA weights and not with the trained UNet."""
    seed_everything(3)
    method = build_method(name, **{**TINY_HPARAMS[name], "ema_decay": 0.5})
    initial = copy.deepcopy(method.unet.state_dict())
    assert not any(p.requires_grad for p in method.ema.parameters())
    trained = {id(p) for p in method.stage_parameters(FINAL_STAGE)}
    assert trained.isdisjoint(id(p) for p in method.ema.parameters())

    batch = {"image": torch.rand(4, 1, 32, 32), "label": torch.tensor([0, 1, 0, 1])}
    optimizer = method.configure_optimizer(1e-2, FINAL_STAGE)
    method.train()
    method.stage_loss(FINAL_STAGE, batch).backward()
    optimizer.step()
    method.after_optimizer_step(FINAL_STAGE)
    changed = 0
    for key, value in method.unet.state_dict().items():
        torch.testing.assert_close(method.ema.module.state_dict()[key], (initial[key] + value) / 2)
        changed += not torch.equal(value, initial[key])
    assert changed > 0
    assert any(key.startswith("ema.module.") for key in method.state_dict())  # saved with it

    method.eval()
    images, mask = torch.rand(2, 1, 32, 32), torch.ones(2, 1, 32, 32)
    before = method.score(images, mask).anomaly_map
    with torch.no_grad():
        for p in method.unet.parameters():
            p.add_(0.1 * torch.randn_like(p))
        assert torch.equal(method.score(images, mask).anomaly_map, before)
        for p in method.ema.parameters():
            p.add_(0.1 * torch.randn_like(p))
    assert not torch.equal(method.score(images, mask).anomaly_map, before)


def test_wolleb_classifier_stage_leaves_the_ema_alone():
    method = build_method("wolleb", **{**TINY_HPARAMS["wolleb"], "ema_decay": 0.5})
    before = copy.deepcopy(method.ema.state_dict())
    with torch.no_grad():
        for p in method.unet.parameters():
            p.add_(1.0)
    method.after_optimizer_step("classifier")
    for key, value in method.ema.state_dict().items():
        assert torch.equal(value, before[key])
