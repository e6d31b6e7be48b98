"""Network factory: torchvision ResNets, the DAWNBench ResNet-9, a tiny CNN and an MLP; local weights only."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision import models as tv_models

logger = logging.getLogger(__name__)

ARCHITECTURES: tuple[str, ...] = ("tiny_cnn", "small_cnn", "mlp", "resnet9", "resnet18", "resnet34", "resnet50")
# Every architecture here names its final linear layer `fc`, as torchvision's ResNets do, so that
# the "train the new head first" recipe and head replacement work the same way for all of them.
HEAD_NAME = "fc"
WEIGHTS_FILE_IN_CHECKPOINT = "model.safetensors"
MLP_HIDDEN = (256, 256)
# Wrapper keys that common training scripts put around a state dict.
_STATE_DICT_WRAPPERS = ("state_dict", "model_state_dict", "model")


class PretrainedWeightsError(ValueError):
    """A local pretrained-weights file does not match the requested architecture."""


@dataclass(frozen=True)
class PretrainedReport:
    """What loading pretrained weights did: keys loaded, skipped (replaced head) and adapted (stem)."""

    path: str
    loaded: tuple[str, ...]
    skipped: tuple[str, ...]
    adapted: tuple[str, ...]


def _conv_bn(in_channels: int, out_channels: int, *, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class _Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv_bn(channels, channels), _conv_bn(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResNet9(nn.Module):
    """The DAWNBench ResNet-9 (Myrtle.ai): prep, three pooled stages, two residual blocks, scaled logits."""

    def __init__(self, num_classes: int, *, in_channels: int = 3, logit_scale: float = 0.125) -> None:
        super().__init__()
        self.prep = _conv_bn(in_channels, 64)
        self.layer1 = nn.Sequential(_conv_bn(64, 128), nn.MaxPool2d(2), _Residual(128))
        self.layer2 = nn.Sequential(_conv_bn(128, 256), nn.MaxPool2d(2))
        self.layer3 = nn.Sequential(_conv_bn(256, 512), nn.MaxPool2d(2), _Residual(512))
        # The original pools 4x4 at 32 px; adaptive pooling keeps every input size from 8 px up valid.
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(512, num_classes, bias=False)
        self.logit_scale = logit_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.prep(x))))
        return self.fc(torch.flatten(self.pool(x), 1)) * self.logit_scale


class TinyCNN(nn.Module):
    """Conv-BN-ReLU stages (width, 2x, 4x, ...; all but the first stride 2) and a linear head.

    The default three stages are for fast tests at 8 to 64 px.
    """

    def __init__(self, num_classes: int, *, in_channels: int = 3, width: int = 16, stages: int = 3) -> None:
        super().__init__()
        layers = [_conv_bn(in_channels, width)]
        layers += [_conv_bn(width << (i - 1), width << i, stride=2) for i in range(1, stages)]
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(width << (stages - 1), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 1))


class SmallCNN(TinyCNN):
    """Four stages of width 32-64-128-256.

    Large enough to interpolate a few thousand 48 px photos in tens of CPU-seconds per epoch, which
    is the over-parameterised regime CSADA is built for (`rxverify experiment synthetic-pills`); the
    3-stage TinyCNN underfits them: its receptive field is 9 px, less than a 10 mm tablet's 12 px there
    (this one's is 17 px).
    """

    def __init__(self, num_classes: int, *, in_channels: int = 3, width: int = 32) -> None:
        super().__init__(num_classes, in_channels=in_channels, width=width, stages=4)


class MLP(nn.Module):
    """A ReLU MLP over the flattened input (2-D toy points, 8x8 digits, any shape)."""

    def __init__(self, num_classes: int, *, in_features: int | None = None,
                 hidden: Sequence[int] = MLP_HIDDEN) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for size in hidden:
            # Without a known input size the first layer is lazy: the first forward pass (or loading
            # a state dict) fixes it, so a checkpoint can rebuild the MLP from metadata alone.
            layers += [nn.Linear(width, size) if width is not None else nn.LazyLinear(size), nn.ReLU(inplace=True)]
            width = size
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(width, num_classes) if width is not None else nn.LazyLinear(num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def _torchvision_resnet(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    def build(num_classes: int, *, in_channels: int) -> nn.Module:
        model = factory(weights=None, num_classes=num_classes)
        if in_channels != 3:
            # Same geometry as the RGB stem, so pretrained stems can be adapted (see _adapt_stem).
            model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
            nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        return model

    return build


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "tiny_cnn": lambda num_classes, *, in_channels: TinyCNN(num_classes, in_channels=in_channels),
    "small_cnn": lambda num_classes, *, in_channels: SmallCNN(num_classes, in_channels=in_channels),
    "resnet9": lambda num_classes, *, in_channels: ResNet9(num_classes, in_channels=in_channels),
    "resnet18": _torchvision_resnet(tv_models.resnet18),
    "resnet34": _torchvision_resnet(tv_models.resnet34),
    "resnet50": _torchvision_resnet(tv_models.resnet50),
}


def create_model(name: str, num_classes: int, *, in_channels: int = 3, pretrained_path: str | Path | None = None,
                 input_shape: Sequence[int] | None = None) -> nn.Module:
    """Build an architecture from ARCHITECTURES (random init; optional weights from a local file only)."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; choose one of {', '.join(ARCHITECTURES)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1 (got {num_classes})")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1 (got {in_channels})")
    if name == "mlp":
        in_features = math.prod(input_shape) if input_shape is not None else None
        with warnings.catch_warnings():
            # torch warns that lazy modules are new; the lazy first layer is deliberate (see MLP).
            warnings.simplefilter("ignore", UserWarning)
            model: nn.Module = MLP(num_classes, in_features=in_features)
    else:
        model = _BUILDERS[name](num_classes, in_channels=in_channels)
    if pretrained_path is not None:
        report = load_pretrained(model, pretrained_path)
        logger.info("loaded %d tensors from %s; skipped %s; adapted %s", len(report.loaded), report.path,
                    list(report.skipped) or "none", list(report.adapted) or "none")
    return model


def classifier_head(model: nn.Module) -> nn.Linear:
    """The final linear layer (`fc`) of a model from create_model."""
    head = getattr(model, HEAD_NAME, None)
    if not isinstance(head, nn.Linear):
        raise ValueError(f"{type(model).__name__} has no linear `{HEAD_NAME}` head")
    return head


def feature_stages(model: nn.Module) -> tuple[str, ...]:
    """Names of the submodules whose outputs are a model's feature stages, shallow to deep.

    torchvision ResNets: layer1-4. ResNet-9: prep and layer1-3. TinyCNN and SmallCNN: each conv stage.
    MLP: each hidden layer's ReLU. Anything else: none (`models.ood` then has nothing to read).
    """
    if isinstance(model, tv_models.ResNet):
        return ("layer1", "layer2", "layer3", "layer4")
    if isinstance(model, ResNet9):
        return ("prep", "layer1", "layer2", "layer3")
    if isinstance(model, TinyCNN):
        return tuple(f"features.{i}" for i, m in enumerate(model.features) if isinstance(m, nn.Sequential))
    if isinstance(model, MLP):
        return tuple(f"body.{i}" for i, m in enumerate(model.body) if isinstance(m, nn.ReLU))
    return ()


def classifier_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The classifier head's parameters (for the PMI recipe: train the new head first, then unfreeze)."""
    return list(classifier_head(model).parameters())


def backbone_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter that is not in the classifier head."""
    head = {id(p) for p in classifier_parameters(model)}
    return [p for p in model.parameters() if id(p) not in head]


def count_parameters(model: nn.Module) -> int:
    """Number of materialised parameters (lazy MLP layers count once they have a shape)."""
    return sum(p.numel() for p in model.parameters() if not isinstance(p, nn.parameter.UninitializedParameter))


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a local safetensors file, torch file, or rxverify checkpoint directory."""
    source = Path(path)
    if source.is_dir():
        source = source / WEIGHTS_FILE_IN_CHECKPOINT
    if not source.is_file():
        raise FileNotFoundError(f"pretrained weights file {source} does not exist")
    if source.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(source), device="cpu"))
    # weights_only: a weights file must never be able to run code when it is read.
    loaded = torch.load(source, map_location="cpu", weights_only=True)
    for key in _STATE_DICT_WRAPPERS:
        if isinstance(loaded, Mapping) and isinstance(loaded.get(key), Mapping):
            loaded = loaded[key]
            break
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise PretrainedWeightsError(f"{source} does not hold a state dict of tensors")
    # Checkpoints saved from DistributedDataParallel prefix every key with `module.`.
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in loaded.items()}


def load_pretrained(model: nn.Module, path: str | Path) -> PretrainedReport:
    """Load local weights strictly; only a head of another class count is skipped, an RGB stem is adapted."""
    state = read_state_dict(path)
    own = model.state_dict()
    head_keys = {f"{HEAD_NAME}.{name}" for name in ("weight", "bias")}
    unexpected = sorted(set(state) - set(own))
    # Old torchvision files predate BatchNorm's num_batches_tracked buffer; BN fills it in itself.
    missing = sorted(k for k in set(own) - set(state) if not k.endswith("num_batches_tracked"))
    if unexpected or missing:
        raise PretrainedWeightsError(
            f"{path} does not match {type(model).__name__}: missing {missing[:8]}, unexpected {unexpected[:8]}")
    to_load: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    adapted: list[str] = []
    for key, tensor in state.items():
        target = own[key]
        if isinstance(target, nn.parameter.UninitializedParameter) or target.shape == tensor.shape:
            to_load[key] = tensor
        elif key in head_keys:
            skipped.append(key)
        elif _is_adaptable_stem(key, tensor, target):
            to_load[key] = _adapt_stem(tensor, target.shape[1])
            adapted.append(key)
        else:
            raise PretrainedWeightsError(
                f"{path}: {key} has shape {tuple(tensor.shape)}, the model needs {tuple(target.shape)}")
    model.load_state_dict(to_load, strict=False)
    return PretrainedReport(path=str(path), loaded=tuple(sorted(to_load)), skipped=tuple(sorted(skipped)),
                            adapted=tuple(sorted(adapted)))


def _is_adaptable_stem(key: str, tensor: torch.Tensor, target: torch.Tensor) -> bool:
    return (key in ("conv1.weight", "prep.0.weight") and tensor.dim() == 4
            and tensor.shape[0] == target.shape[0] and tensor.shape[2:] == target.shape[2:])


def _adapt_stem(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    # timm's adapt_input_conv: grey input sums the RGB filters; other counts tile them and rescale,
    # so that the stem's response to a constant image keeps its scale.
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = math.ceil(in_channels / weight.shape[1])
    tiled = weight.repeat(1, repeats, 1, 1)[:, :in_channels]
    return tiled * (weight.shape[1] / in_channels)

