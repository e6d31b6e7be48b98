"""Network factory: shapes for every architecture, local pretrained weights, heads, no downloads."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from models.networks import (
    ARCHITECTURES,
    PretrainedWeightsError,
    backbone_parameters,
    classifier_head,
    classifier_parameters,
    count_parameters,
    create_model,
    load_pretrained,
)

SMALL_ARCHS = ("tiny_cnn", "small_cnn", "mlp", "resnet9")


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a socket (e.g. a hub download) fails the test."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("networks must never touch the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def _logits(model: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(torch.randn(*shape))


def test_architectures_listed() -> None:
    assert set(ARCHITECTURES) == {"tiny_cnn", "small_cnn", "mlp", "resnet9", "resnet18", "resnet34", "resnet50"}


@pytest.mark.parametrize("name", SMALL_ARCHS)
@pytest.mark.parametrize("size", [8, 32])
@pytest.mark.parametrize("channels", [1, 3])
def test_forward_shapes(name: str, size: int, channels: int) -> None:
    model = create_model(name, 7, in_channels=channels)
    assert _logits(model, (2, channels, size, size)).shape == (2, 7)


# Building the deeper ResNets costs seconds of CPU (weight init), hence the slow mark.
@pytest.mark.parametrize("name", ["resnet18", pytest.param("resnet34", marks=pytest.mark.slow),
                                  pytest.param("resnet50", marks=pytest.mark.slow)])
def test_deep_resnets_at_32px(name: str) -> None:
    for channels in (1, 3):
        model = create_model(name, 4, in_channels=channels)
        assert _logits(model, (1, channels, 32, 32)).shape == (1, 4)


def test_tiny_cnn_at_64px_trains_in_train_mode() -> None:
    model = create_model("tiny_cnn", 3)
    loss = model(torch.randn(4, 3, 64, 64)).logsumexp(dim=1).mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_mlp_accepts_any_shape() -> None:
    toy = create_model("mlp", 3)
    assert _logits(toy, (5, 2)).shape == (5, 3)
    digits = create_model("mlp", 10, in_channels=1, input_shape=(1, 8, 8))
    assert count_parameters(digits) > 0  # eager: input size known up front
    assert _logits(digits, (5, 1, 8, 8)).shape == (5, 10)
    assert _logits(digits, (5, 64)).shape == (5, 10)


def test_one_channel_resnet_swaps_stem() -> None:
    model = create_model("resnet18", 10, in_channels=1)
    assert model.state_dict()["conv1.weight"].shape == (64, 1, 7, 7)


def test_unknown_arch_and_bad_sizes() -> None:
    with pytest.raises(ValueError, match="unknown architecture"):
        create_model("vgg16", 3)
    with pytest.raises(ValueError, match="num_classes"):
        create_model("tiny_cnn", 0)
    with pytest.raises(ValueError, match="in_channels"):
        create_model("tiny_cnn", 3, in_channels=0)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_classifier_head_is_last_linear(name: str) -> None:
    with torch.device("meta"):  # structure only: skips the seconds of weight init of deep ResNets
        model = create_model(name, 6, in_channels=3, input_shape=(3, 8, 8))
    head = classifier_head(model)
    assert head.out_features == 6
    head_ids = {id(p) for p in classifier_parameters(model)}
    backbone_ids = {id(p) for p in backbone_parameters(model)}
    assert head_ids and backbone_ids and not head_ids & backbone_ids
    assert head_ids | backbone_ids == {id(p) for p in model.parameters()}


def test_pretrained_from_torch_state_dict_skips_replaced_head(tmp_path: Path) -> None:
    source = create_model("resnet18", 1000)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    model = create_model("resnet18", 5)
    report = load_pretrained(model, path)
    assert report.skipped == ("fc.bias", "fc.weight")
    mine, theirs = model.state_dict(), source.state_dict()
    assert torch.equal(mine["conv1.weight"], theirs["conv1.weight"])
    assert torch.equal(mine["layer4.1.bn2.running_var"], theirs["layer4.1.bn2.running_var"])
    assert mine["fc.weight"].shape == (5, 512)


def test_pretrained_from_safetensors_same_classes_loads_everything(tmp_path: Path) -> None:
    source = create_model("tiny_cnn", 4)
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = create_model("tiny_cnn", 4, pretrained_path=path)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), source.eval()(x))


def test_pretrained_wrapped_and_ddp_prefixed(tmp_path: Path) -> None:
    source = create_model("tiny_cnn", 4)
    path = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}, "epoch": 3}, path)
    report = load_pretrained(create_model("tiny_cnn", 4), path)
    assert not report.skipped and len(report.loaded) == len(source.state_dict())


def test_pretrained_rgb_stem_adapted_to_grey(tmp_path: Path) -> None:
    source = create_model("resnet18", 10)
    path = tmp_path / "rgb.pth"
    torch.save(source.state_dict(), path)
    model = create_model("resnet18", 10, in_channels=1)
    report = load_pretrained(model, path)
    assert report.adapted == ("conv1.weight",)
    rgb = source.state_dict()["conv1.weight"]
    assert torch.allclose(model.state_dict()["conv1.weight"], rgb.sum(dim=1, keepdim=True))


def test_pretrained_mismatch_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save(create_model("tiny_cnn", 4).state_dict(), path)
    with pytest.raises(PretrainedWeightsError, match="missing"):
        create_model("resnet9", 4, pretrained_path=path)
    with pytest.raises(FileNotFoundError):
        create_model("tiny_cnn", 4, pretrained_path=tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    torch.save({k: v[..., :1] if v.dim() == 4 else v for k, v in create_model("tiny_cnn", 4).state_dict().items()},
               bad)
    with pytest.raises(PretrainedWeightsError, match="shape"):
        create_model("tiny_cnn", 4, pretrained_path=bad)


def test_pretrained_file_cannot_run_code(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"weights": create_model("tiny_cnn", 2).state_dict(), "hook": Path("/")}, path)
    with pytest.raises(Exception, match=r"(?i)weights only|unsupported|state dict"):
        load_pretrained(create_model("tiny_cnn", 2), path)
