"""The method contract (``brainuad.methods.base``) by its definitions: stage lookup and the
data each stage reads, the parameters and optimiser of a stage, gradient clipping, copying an
earlier stage's modules in, deterministic scoring in eval mode, the model file, and the
shared reconstruction loss and residual map, each against a hand computation."""

from __future__ import annotations

import pytest
import torch

import brainuad
from brainuad.errors import CorruptFileError, InputError
from brainuad.io.torchfile import load_torch, save_torch
from brainuad.methods import Method, ScoreOutput, build_method
from brainuad.methods.base import (
    CHECKPOINT_FORMAT,
    FINAL_STAGE,
    Stage,
    check_choice,
    load_matching_state,
    read_method_file,
    reconstruction_loss,
    residual_map,
)
from brainuad.methods.registry import _REGISTRY, register


class OneWeight(Method):
    """One stage; map = w · image of the first channel plus noise from the generator;
    records whether it scored in training mode and with gradients."""

    def __init__(
        self, *, optimizer: str = "adam", weight_decay: float = 0.0, score_seed: int = 0
    ) -> None:
        super().__init__(optimizer=optimizer, weight_decay=weight_decay, score_seed=score_seed)
        self.weight = torch.nn.Parameter(torch.tensor(2.0))
        self.frozen = torch.nn.Parameter(torch.tensor(1.0), requires_grad=False)
        self.seen: list[tuple[bool, bool]] = []

    def training_loss(self, batch):
        return (self.weight * batch["image"]).sum()

    def _score(self, images, brainmask, generator):
        self.seen.append((self.training, torch.is_grad_enabled()))
        noise = torch.rand(images.shape[0], *images.shape[2:], generator=generator)
        return ScoreOutput(self.weight * images[:, 0] + noise, images)


class TwoParts(Method):
    """Stages ``first`` (module ``a``, trains on slice labels) and ``model`` (``a`` and
    ``b``, the method's supervision); map shape chosen by ``map_shape``."""

    stages = (
        Stage("first", modules=("a",), supervision="image_labels"),
        Stage(FINAL_STAGE, consumes=("first",), modules=("a", "b")),
    )

    def __init__(self, *, gradient_clip_norm: float | None = None, wrong_map: bool = False):
        super().__init__(gradient_clip_norm=gradient_clip_norm, wrong_map=wrong_map)
        self.a = torch.nn.Linear(2, 2)
        self.b = torch.nn.Linear(2, 1)
        self.c = torch.nn.Linear(1, 1)  # trained by no stage

    def training_loss(self, batch):
        return self.b(self.a(batch["image"])).sum()

    def _score(self, images, brainmask, generator):
        b, _, h, w = images.shape
        return ScoreOutput(torch.zeros(b, h + int(self.hparams["wrong_map"]), w))


@pytest.fixture(autouse=True, scope="module")
def _registered():
    """The two methods in the registry for this module's tests only (a method registered at
    import would join every other module's tests over all registered methods)."""
    methods = {"base_one_weight": OneWeight, "base_two_parts": TwoParts}
    for name, cls in methods.items():
        register(name)(cls)
    yield
    for name in methods:
        del _REGISTRY[name]


def test_stage_lookup_and_the_data_each_stage_reads() -> None:
    assert TwoParts.stage("first") is TwoParts.stages[0]
    assert TwoParts.stage(FINAL_STAGE) is TwoParts.stages[1]
    with pytest.raises(
        InputError, match=r"method 'base_two_parts' has no stage 'x'; stages: \['first', 'model'\]"
    ):
        TwoParts.stage("x")
    assert TwoParts.stage_supervision("first") == "image_labels"
    assert TwoParts.stage_supervision(FINAL_STAGE) == "healthy"  # the method's own
    assert OneWeight.stages == (Stage("model"),) and FINAL_STAGE == "model"
    assert OneWeight.stage_supervision(FINAL_STAGE) == "healthy"
    assert Method.supervision == "healthy" and Method.has_reconstruction
    assert Method.default_learning_rate == 1e-4 and Method.default_batch_size == 32
    assert Method.scoring_hparams == frozenset()


def test_default_stage_loss_is_the_training_loss_of_the_final_stage() -> None:
    method = build_method("base_one_weight")
    batch = {"image": torch.tensor([1.0, 2.0])}
    assert method.stage_loss(FINAL_STAGE, batch).item() == 6.0
    with pytest.raises(InputError, match=r"method 'base_one_weight': no loss for stage 'pre'"):
        method.stage_loss("pre", batch)


def test_stage_parameters_are_the_stage_modules_or_all_trainable_ones() -> None:
    method = build_method("base_two_parts")
    by_id = {id(p) for p in method.stage_parameters("first")}
    assert by_id == {id(p) for p in method.a.parameters()}
    final = method.stage_parameters(FINAL_STAGE)
    assert [id(p) for p in final] == [
        id(p) for p in [*method.a.parameters(), *method.b.parameters()]
    ]
    single = build_method("base_one_weight")
    assert [id(p) for p in single.stage_parameters(FINAL_STAGE)] == [id(single.weight)]


def test_optimizer_of_a_stage() -> None:
    method = build_method("base_one_weight", optimizer="adamw", weight_decay=0.25)
    optimizer = method.configure_optimizer(0.5)
    assert type(optimizer) is torch.optim.AdamW
    (group,) = optimizer.param_groups
    assert group["lr"] == 0.5 and group["weight_decay"] == 0.25
    assert [id(p) for p in group["params"]] == [id(method.weight)]
    adam = build_method("base_one_weight").configure_optimizer(0.1)
    assert type(adam) is torch.optim.Adam
    assert adam.param_groups[0]["weight_decay"] == 0.0 and adam.param_groups[0]["lr"] == 0.1
    decayed = build_method("base_one_weight", weight_decay=0.125).configure_optimizer(0.1)
    assert type(decayed) is torch.optim.Adam
    assert decayed.param_groups[0]["weight_decay"] == 0.125
    staged = build_method("base_two_parts")  # no optimizer hyperparameter: Adam, no decay
    first = staged.configure_optimizer(0.01, stage="first")
    assert type(first) is torch.optim.Adam
    assert {id(p) for p in first.param_groups[0]["params"]} == {
        id(p) for p in staged.a.parameters()
    }
    assert first.param_groups[0]["weight_decay"] == 0.0
    with pytest.raises(
        InputError, match=r"method 'base_one_weight': optimizer 'sgd', expected 'adam' or 'adamw'"
    ):
        build_method("base_one_weight", optimizer="sgd").configure_optimizer(0.1)
    assert method.configure_lr_scheduler(optimizer, 100) is None


def test_gradient_clipping_scales_the_stage_gradients_to_the_norm() -> None:
    method = build_method("base_two_parts", gradient_clip_norm=0.5)
    for p in method.parameters():
        p.grad = torch.ones_like(p)
    norm_a = sum(p.numel() for p in method.a.parameters()) ** 0.5  # 6 ones: √6
    method.before_optimizer_step("first")
    for p in method.a.parameters():
        torch.testing.assert_close(p.grad, torch.full_like(p, 0.5 / norm_a), rtol=1e-5, atol=0)
    for p in [*method.b.parameters(), *method.c.parameters()]:  # not the stage's
        assert torch.equal(p.grad, torch.ones_like(p))
    for clip in (None, 0.0):
        unclipped = build_method("base_two_parts", gradient_clip_norm=clip)
        for p in unclipped.parameters():
            p.grad = torch.full_like(p, 3.0)
        unclipped.before_optimizer_step(FINAL_STAGE)
        assert all(torch.equal(p.grad, torch.full_like(p, 3.0)) for p in unclipped.parameters())
    build_method("base_one_weight").after_optimizer_step()  # default: nothing, no error


def test_load_stage_copies_the_stage_modules_only(tmp_path) -> None:
    torch.manual_seed(0)
    trained = build_method("base_two_parts")
    trained.save(tmp_path / "first.pt")
    torch.manual_seed(1)
    fresh = build_method("base_two_parts")
    b_before = {k: v.clone() for k, v in fresh.b.state_dict().items()}
    fresh.load_stage("first", tmp_path / "first.pt")
    for key, value in trained.a.state_dict().items():
        assert torch.equal(fresh.a.state_dict()[key], value)
    for key, value in b_before.items():
        assert torch.equal(fresh.b.state_dict()[key], value)

    whole = build_method("base_one_weight")
    with torch.no_grad():
        whole.weight.fill_(7.0)
    whole.save(tmp_path / "whole.pt")
    target = build_method("base_one_weight")
    target.load_stage(FINAL_STAGE, tmp_path / "whole.pt")
    assert target.weight.item() == 7.0

    with pytest.raises(
        InputError, match=r"whole\.pt: stage file of method 'base_one_weight', expected 'base_two"
    ):
        fresh.load_stage("first", tmp_path / "whole.pt")
    payload = load_torch(tmp_path / "first.pt", "test")
    payload["state_dict"] = {k: v for k, v in payload["state_dict"].items() if k[0] != "a"}
    save_torch(payload, tmp_path / "no_a.pt")
    with pytest.raises(InputError, match=r"no_a\.pt: no weights of module 'a' \(stage 'first'\)"):
        fresh.load_stage("first", tmp_path / "no_a.pt")
    payload = load_torch(tmp_path / "first.pt", "test")
    payload["state_dict"]["a.weight"] = torch.zeros(3, 2)  # a Linear(2, 3): another width
    save_torch(payload, tmp_path / "wider.pt")
    a_before = fresh.a.weight.clone()
    with pytest.raises(
        InputError,
        match=r"wider\.pt: weights do not match module 'a' \(missing \[\], unexpected \[\], "
        r"other shapes \['weight'\]\)",
    ):
        fresh.load_stage("first", tmp_path / "wider.pt")
    assert torch.equal(fresh.a.weight, a_before)  # nothing copied
    payload = load_torch(tmp_path / "whole.pt", "test")
    payload["state_dict"]["extra"] = torch.zeros(1)
    save_torch(payload, tmp_path / "extra.pt")
    with pytest.raises(InputError, match=r"extra\.pt: .* this method .*unexpected \['extra'\]"):
        target.load_stage(FINAL_STAGE, tmp_path / "extra.pt")


def test_matching_state_may_leave_out_a_prefix(tmp_path) -> None:
    """cDDPM loads a SparK encoder without its ``fc``: the keys under ``skip_prefix`` are
    neither required nor loaded; every other key must be there, with its shape."""
    layer = torch.nn.Linear(2, 3)
    bias = layer.bias.detach().clone()
    weight = torch.arange(6.0).view(3, 2)
    load_matching_state(layer, {"weight": weight}, tmp_path / "f.pt", "x", skip_prefix="bias")
    assert torch.equal(layer.weight.detach(), weight) and torch.equal(layer.bias.detach(), bias)
    with pytest.raises(InputError, match=r"f\.pt: weights do not match x \(missing \['weight'\]"):
        load_matching_state(layer, {}, tmp_path / "f.pt", "x", skip_prefix="bias")
    with pytest.raises(InputError, match=r"missing \['bias'\]"):
        load_matching_state(layer, {"weight": weight}, tmp_path / "f.pt", "x")


def test_score_is_deterministic_in_eval_mode_without_gradients() -> None:
    method = build_method("base_one_weight", score_seed=5)
    method.train()
    images = torch.rand(2, 3, 4, 5)
    out = method.score(images, torch.ones(2, 1, 4, 5))
    assert method.seen == [(False, False)] and method.training  # eval inside, restored
    noise = torch.rand(2, 4, 5, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(out.anomaly_map, 2 * images[:, 0] + noise)
    assert torch.equal(method.score(images, torch.ones(2, 1, 4, 5)).anomaly_map, out.anomaly_map)
    method.eval()
    method.score(images, torch.ones(2, 1, 4, 5))
    assert not method.training
    assert build_method("base_one_weight").score_seed == 0
    assert method.score_seed == 5

    for bad_images, bad_mask in (
        (torch.rand(3, 4, 5), torch.ones(1, 1, 4, 5)),
        (torch.rand(1, 3, 4, 5), torch.ones(1, 4, 5)),
        (torch.rand(1, 3, 4, 5), torch.ones(1, 2, 4, 5)),
    ):
        with pytest.raises(ValueError, match=r"base_one_weight: expected images \[B, C, H, W\]"):
            method.score(bad_images, bad_mask)
    with pytest.raises(ValueError, match=r"got \(1, 3, 4, 5\) and \(1, 2, 4, 5\)"):
        method.score(torch.rand(1, 3, 4, 5), torch.ones(1, 2, 4, 5))
    wrong = build_method("base_two_parts", wrong_map=True)
    with pytest.raises(
        RuntimeError, match=r"base_two_parts: anomaly map shape \(2, 5, 5\), expected \(2, 4, 5\)"
    ):
        wrong.score(torch.rand(2, 1, 4, 5), torch.ones(2, 1, 4, 5))
    wrong.train()
    with pytest.raises(RuntimeError):
        wrong.score(torch.rand(2, 1, 4, 5), torch.ones(2, 1, 4, 5))
    assert wrong.training  # restored even when scoring fails


def test_model_file_holds_name_hparams_version_and_weights(tmp_path) -> None:
    method = build_method("base_one_weight", optimizer="adamw", weight_decay=0.5)
    with torch.no_grad():
        method.weight.fill_(3.0)
    method.save(tmp_path / "m.pt")
    payload = read_method_file(tmp_path / "m.pt")
    assert payload["format"] == CHECKPOINT_FORMAT == "brainuad.method/1"
    assert payload["name"] == "base_one_weight"
    assert payload["hparams"] == {"optimizer": "adamw", "weight_decay": 0.5, "score_seed": 0}
    assert payload["brainuad_version"] == brainuad.__version__
    assert set(payload["state_dict"]) == {"weight", "frozen"}
    method.save(tmp_path / "again.pt")
    assert (tmp_path / "again.pt").read_bytes() == (tmp_path / "m.pt").read_bytes()
    assert ScoreOutput(torch.zeros(1, 2, 2)).reconstruction is None
    loaded = Method.load(tmp_path / "m.pt")
    assert type(loaded) is OneWeight and loaded.weight.item() == 3.0
    assert loaded.hparams == method.hparams
    assert OneWeight.load(tmp_path / "m.pt").weight.item() == 3.0
    locations: list[str] = []

    def to_cpu(storage, location):  # map_location reaches torch.load
        locations.append(location)
        return storage

    assert Method.load(tmp_path / "m.pt", map_location=to_cpu).weight.item() == 3.0
    assert locations and set(locations) == {"cpu"}
    with pytest.raises(
        InputError, match=r"m\.pt: holds method 'base_one_weight', expected 'base_two"
    ):
        TwoParts.load(tmp_path / "m.pt")
    (tmp_path / "bytes.pt").write_bytes(b"truncated")  # neither zip nor pickle
    with pytest.raises(CorruptFileError, match=r"bytes\.pt: not a readable brainuad model file"):
        Method.load(tmp_path / "bytes.pt")
    save_torch({"format": "other/1", "name": "x"}, tmp_path / "other.pt")
    save_torch([1, 2], tmp_path / "list.pt")
    for name in ("other.pt", "list.pt"):
        with pytest.raises(
            InputError, match=rf"{name}: not a brainuad model file \(format brainuad"
        ):
            Method.load(tmp_path / name)


def test_reconstruction_loss_and_residual_map_by_hand() -> None:
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])  # [2, 1, 2, 2]
    y = torch.tensor([[[[0.0, 4.0], [3.0, 1.0]]], [[[1.0, 0.0], [0.0, -2.0]]]])
    mask = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]], [[[0.0, 0.0], [0.0, 1.0]]]])
    # errors: [1, 2, 0, 3] and [1, 0, 0, 2]
    assert reconstruction_loss(x, y, mask, loss="l1", region="image").item() == 9 / 8
    assert reconstruction_loss(x, y, mask, loss="l2", region="image").item() == 19 / 8
    assert reconstruction_loss(x, y, mask, loss="l1", region="brain").item() == pytest.approx(
        (1 + 2 + 2) / 3
    )
    assert reconstruction_loss(x, y, mask, loss="l2", region="brain").item() == pytest.approx(
        (1 + 4 + 4) / 3
    )
    two = torch.cat([x, 2 * x], dim=1)  # the mask is shared by the channels
    loss = reconstruction_loss(two, torch.zeros_like(two), mask, loss="l1", region="brain")
    assert loss.item() == pytest.approx((1 + 2 + 0 + 2 + 4 + 0) / 6)
    empty = reconstruction_loss(x, y, torch.zeros_like(mask), loss="l1", region="brain")
    assert empty.item() == 0.0  # no brain pixel: 0, not NaN
    half = reconstruction_loss(x, y, 0.5 * mask, loss="l1", region="brain")
    assert half.item() == pytest.approx(0.5 * 5 / 1.5)  # weights summing to 1.5
    residual = residual_map(torch.cat([x, y], 1), torch.cat([y, y], 1))
    torch.testing.assert_close(
        residual, torch.tensor([[[0.5, 1.0], [0.0, 1.5]], [[0.5, 0.0], [0.0, 1.0]]])
    )
    with pytest.raises(InputError, match=r"hyperparameter loss='l3', expected one of \['l1'"):
        check_choice("loss", "l3", ("l1", "l2"))
    check_choice("loss", "l2", ("l1", "l2"))
