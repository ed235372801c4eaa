"""cDDPM and its SparK pretraining: what makes them themselves (the shared contract test in
test_methods.py trains both stages through ``train_fold``, scores, saves and loads)."""

from __future__ import annotations

import pytest
import torch
import yaml
from tiny_config import tiny_config_with_seed_methods
from tiny_hparams import TINY_HPARAMS

from brainuad.errors import InputError
from brainuad.methods import build_method, method_class
from brainuad.methods.cddpm import (
    SPARK_STAGE,
    encoder_pyramid,
    expand_cells,
    masked_cell_loss,
    random_active_cells,
    sparse_batch_norm,
    sparse_mode,
)


def tiny(name: str = "cddpm", **overrides):
    torch.manual_seed(0)
    return build_method(name, **{**TINY_HPARAMS[name], **overrides})


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Non-zero weights everywhere: MONAI zero-initialises the UNet's output convolutions,
    so an untrained UNet ignores its inputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=generator))


def test_stages_spark_feeds_model_and_nossl_has_none():
    cddpm, nossl = method_class("cddpm"), method_class("cddpm_nossl")
    assert [s.name for s in cddpm.stages] == ["spark", "model"]
    assert cddpm.stage("model").consumes == ("spark",)
    assert [s.name for s in nossl.stages] == ["model"]
    method = tiny("cddpm_nossl")
    assert not hasattr(method, "spark_head")
    with pytest.raises(InputError, match="no SparK stage"):
        tiny("cddpm_nossl", spark_settings={"mask_ratio": 0.5})


def test_condition_is_concatenated_changes_output_and_receives_gradients():
    method = tiny()
    randomise(method, seed=1)
    unet, width = method.unet, 4 * TINY_HPARAMS["cddpm"]["channels"][0]
    t_emb, condition = torch.randn(3, width // 4), torch.randn(3, width)
    # The two embedding paths sum to [time embedding; condition MLP]: a concatenation.
    summed = unet.time_embed(t_emb) + unet.class_embedding(condition)
    expected = torch.cat([unet.time_embed.inner(t_emb), unet.class_embedding.inner(condition)], 1)
    assert torch.allclose(summed, expected)
    projections = [m.time_emb_proj for m in unet.modules() if hasattr(m, "time_emb_proj")]
    assert projections and all(p.in_features == 2 * width for p in projections)

    images = torch.rand(3, 1, 32, 32)
    noisy, t = torch.randn(3, 1, 32, 32), torch.full((3,), 400)
    encoded = method.encoder(images)
    out = method(noisy, t, encoded)
    other = method(noisy, t, encoded + 1.0)
    assert (out - other).abs().max() > 1e-3
    method.zero_grad()
    method.training_loss({"image": images, "brainmask": torch.ones(3, 1, 32, 32)}).backward()
    assert method.encoder.conv1.weight.grad.abs().sum() > 0
    assert method.unet.class_embedding.inner[0].weight.grad.abs().sum() > 0


def test_encoder_loads_spark_weights_but_not_fc_or_head(tmp_path):
    pretrained = tiny()
    randomise(pretrained, seed=2)
    pretrained.save(tmp_path / "spark.pt")
    torch.manual_seed(5)
    fresh = build_method("cddpm", **TINY_HPARAMS["cddpm"])
    fc_before = {k: v.clone() for k, v in fresh.encoder.fc.state_dict().items()}
    head_before = {k: v.clone() for k, v in fresh.spark_head.state_dict().items()}
    unet_before = {k: v.clone() for k, v in fresh.unet.state_dict().items()}
    fresh.load_stage(SPARK_STAGE, tmp_path / "spark.pt")
    loaded, source = fresh.encoder.state_dict(), pretrained.encoder.state_dict()
    for key, value in source.items():
        if key.startswith("fc."):
            assert torch.equal(loaded[key], fc_before[key[3:]]), key
        else:
            assert torch.equal(loaded[key], value), key  # weights and BN running statistics
    pretrained_head = dict(pretrained.spark_head.named_parameters())
    for key, value in fresh.spark_head.state_dict().items():
        assert torch.equal(value, head_before[key]), key
        if key in pretrained_head:  # the (randomised) parameters, not the BN buffers
            assert not torch.equal(value, pretrained_head[key]), key
    for key, value in fresh.unet.state_dict().items():
        assert torch.equal(value, unet_before[key]), key


def test_stage_parameters_and_optimisers():
    method = tiny()
    ids = {name: {id(p) for p in method.stage_parameters(name)} for name in ("spark", "model")}
    head = {id(p) for p in method.spark_head.parameters()}
    unet = {id(p) for p in method.unet.parameters()}
    encoder = {id(p) for p in method.encoder.parameters()}
    assert ids["spark"] == encoder | head
    assert ids["model"] == encoder | unet
    spark = method.configure_optimizer(1e-4, "spark")
    assert isinstance(spark, torch.optim.AdamW)
    assert spark.defaults["weight_decay"] == 0.05 and spark.defaults["betas"] == (0.9, 0.95)
    model = method.configure_optimizer(1e-4, "model")
    assert type(model) is torch.optim.Adam and model.defaults["weight_decay"] == 0.0


def test_masked_cell_loss_ignores_visible_cells():
    """The loss is the mean over masked cells of each cell's mean squared error: a target
    that differs only inside visible cells gives the same loss, one that differs in a masked
    cell does not."""
    active = torch.tensor([[True, False, False], [False, True, False], [False, False, True]])
    active = active.view(1, 1, 3, 3)
    reconstruction = torch.zeros(1, 1, 96, 96)
    cell_values = torch.arange(1.0, 10.0).view(1, 1, 3, 3)
    target = cell_values.repeat_interleave(32, 2).repeat_interleave(32, 3)
    loss = masked_cell_loss(reconstruction, target, active)
    assert loss.item() == pytest.approx(cell_values[~active].square().mean().item())
    visible = expand_cells(active, target)
    changed_visible = torch.where(visible, torch.rand_like(target) * 50, target)
    assert masked_cell_loss(reconstruction, changed_visible, active).item() == loss.item()
    changed_masked = target.clone()
    changed_masked[..., 0:32, 32:64] += 1.0  # cell (0, 1): masked
    assert masked_cell_loss(reconstruction, changed_masked, active) > loss


def test_random_active_cells_keep_35_percent():
    active = random_active_cells(64, (3, 3), 0.65)
    assert active.shape == (64, 1, 3, 3) and active.dtype == torch.bool
    assert (active.flatten(1).sum(1) == 3).all()  # round(9 × 0.35)
    assert len({tuple(a.flatten().tolist()) for a in active}) > 10
    assert (random_active_cells(8, (4, 4), 0.65).flatten(1).sum(1) == 6).all()
    with pytest.raises(InputError, match="1 × 1 grid"):
        random_active_cells(2, (1, 1), 0.65)


def test_sparse_batch_norm_uses_visible_positions_only():
    norm = torch.nn.BatchNorm2d(2, momentum=1.0)
    x = torch.randn(2, 2, 4, 4)
    active = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    active[:, :, :2] = True
    x_masked_junk = torch.where(active, x, torch.full_like(x, 1e3))
    out = sparse_batch_norm(norm, x_masked_junk, active)
    visible = x.permute(0, 2, 3, 1)[active[:, 0]]  # [N, C]
    expected = (visible - visible.mean(0)) / torch.sqrt(visible.var(0, unbiased=False) + 1e-5)
    assert torch.allclose(out.permute(0, 2, 3, 1)[active[:, 0]], expected, atol=1e-5)
    assert (out.permute(0, 2, 3, 1)[~active[:, 0]] == 0).all()
    assert torch.allclose(norm.running_mean, visible.mean(0))


def test_sparse_mode_zeroes_masked_positions_and_restores_the_dense_encoder():
    method = tiny()
    encoder = method.encoder.eval()
    images = torch.rand(2, 1, 32, 32)
    dense = [f.clone() for f in encoder_pyramid(encoder, images)]
    active = random_active_cells(2, (2, 2), 0.65)
    with sparse_mode(encoder, active):
        sparse = encoder_pyramid(encoder, images * expand_cells(active, images))
    for feature in sparse:
        assert (feature * ~expand_cells(active, feature)).abs().max() == 0
        assert feature.abs().max() > 0
    after = encoder_pyramid(encoder, images)
    assert all(torch.equal(a, b) for a, b in zip(after, dense, strict=True))


def test_spark_loss_trains_the_encoder():
    method = tiny()
    images = torch.rand(4, 1, 32, 32)
    loss = method.stage_loss("spark", {"image": images, "brainmask": torch.ones(4, 1, 32, 32)})
    loss.backward()
    assert method.encoder.layer1[0].conv1.weight.grad.abs().sum() > 0
    assert all(t.grad is not None for t in method.spark_head.mask_tokens)
    assert all(p.grad is None for p in method.unet.parameters())


def test_spark_refuses_sizes_off_the_cell_grid():
    method = tiny()
    with pytest.raises(InputError, match="multiple of the encoder stride 16"):
        method.spark_loss(torch.rand(2, 1, 40, 40))


def test_ensemble_is_one_batch_with_the_encoding_computed_once():
    method = tiny(noise="simplex")
    randomise(method, seed=3)
    b = 2
    images, mask = torch.rand(b, 1, 32, 32), torch.ones(b, 1, 32, 32)
    encoder_batches, unet_calls, noise_calls = [], [], []
    method.encoder.register_forward_hook(lambda m, i, o: encoder_batches.append(i[0].shape[0]))
    method.unet.register_forward_hook(
        lambda m, i, o: unet_calls.append((i[0].shape[0], i[1].tolist()))
    )
    draw = method.noise

    def counting_noise(shape, *args, **kwargs):
        noise_calls.append(tuple(shape))
        return draw(shape, *args, **kwargs)

    method.noise = counting_noise
    out = method.score(images, mask)
    assert encoder_batches == [b]
    assert unet_calls == [(3 * b, [249] * b + [499] * b + [749] * b)]
    assert noise_calls == [(b, 1, 32, 32)] * 3  # a fresh draw per noise level

    # The map is |x − mean of the three reconstructions| (reconstructions averaged), and
    # the batched ensemble equals three separate one-step predictions with the same noise.
    method.eval()
    generator = torch.Generator().manual_seed(method.score_seed)
    with torch.no_grad():
        condition = method.encoder(images)
        x0 = images * 2 - 1
        recs = []
        for step in (250, 500, 750):
            t = torch.full((b,), step - 1)
            noise = draw((b, 1, 32, 32), t, generator=generator)
            noisy = method.scheduler.add_noise(x0, noise, t)
            recs.append((method(noisy, t, condition) + 1) / 2)
    mean = torch.stack(recs).mean(0)
    assert torch.allclose(out.reconstruction, mean, atol=1e-5)
    assert torch.allclose(out.anomaly_map, (images - mean).abs()[:, 0], atol=1e-5)
    assert not torch.allclose(recs[0], recs[2], atol=1e-3)
    # The benchmark's one-evaluation-at-a-time loop gives the same map for one slice.
    single, looped = (
        method.score(images[:1], mask[:1]),
        method.unbatched_score(images[:1], mask[:1]),
    )
    assert torch.allclose(single.anomaly_map, looped.anomaly_map, atol=1e-5)


def test_invalid_hparams_are_named():
    with pytest.raises(InputError, match="test_timesteps"):
        tiny(test_timesteps=[0, 500])
    with pytest.raises(InputError, match="encoder"):
        tiny(encoder="resnet7")
    with pytest.raises(InputError, match="unknown"):
        tiny(spark_settings={"mask": 0.5})
    with pytest.raises(InputError, match="decoder_width"):
        tiny(spark_settings={"decoder_width": 24})


def test_benchmarks_time_the_spark_stage_and_the_per_evaluation_loop(capsys, tmp_path):
    from brainuad.bench import scoring, steps

    config = tmp_path / "tiny_seed.yaml"
    config.write_text(yaml.safe_dump(tiny_config_with_seed_methods()))
    steps.main(["--config", str(config), "--methods", "cddpm", "--batch", "2", "--repeats", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| cddpm")]
    assert [row.split("|")[1].strip() for row in rows] == [
        "cddpm (stage `spark`)",
        "cddpm (stage `model`)",
    ]
    method = tiny()
    images, mask = torch.rand(2, 1, 32, 32), torch.ones(2, 1, 32, 32)
    batched, looped = scoring.scoring_seconds(method, images, mask, 1)
    per_evaluation = scoring.unbatched_seconds(method, images, mask, 1)
    assert batched > 0 and looped > 0 and per_evaluation > 0
    assert (
        scoring.unbatched_seconds(build_method("ddpm", **TINY_HPARAMS["ddpm"]), images, mask)
        is None
    )
