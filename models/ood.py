"""Unfamiliar photos: is a photo like the ones the model was trained on?

A classifier spreads a probability over its products for any input, a photo of an empty vial, a sink
or a product it was never trained on included, and far from its training data a softmax is often
confident. The verdict policy cannot see that. This module scores how far a photo's features lie from
the training photos', at every feature stage of the network (`models.networks.feature_stages`: for a
ResNet the outputs of layer1 to layer4), following Lee et al. (2018), "A simple unified framework for
detecting out-of-distribution samples and adversarial attacks", without their input pre-processing
and their learned weighting of the stages:

- each stage's output is averaged over its spatial positions (one value per channel);
- per stage and per class, the mean of the training photos' features, with one covariance shared by
  all classes (Ledoit-Wolf shrinkage, so a few hundred photos suffice for 512 channels);
- a photo's score at a stage is its smallest squared Mahalanobis distance to a class mean. Shallow
  stages see textures and colours (a photo that is not a vial at all), deep ones see the products.

Thresholds are split-conformal quantiles of the **validation** photos' scores (photos the model did not
train on): for a rate `a` over L stages, each stage's threshold is the ceil((n + 1)(1 - a / L))-th
smallest of its n validation scores, and a photo is unfamiliar when any stage's score exceeds its
threshold. For a new photo exchangeable with the validation photos (same cameras, lighting, bottles and
products), the chance that it is flagged is then at most `a` (a union bound over the stages). That bounds
the false alarms, the ordinary photos sent to review. It promises nothing about how many unfamiliar
photos are caught: that depends on the photos, and the README's Results section says what was measured.

The validation scores are stored with the fitted model, so the rate is chosen when serving
(RXVERIFY_UNFAMILIAR_PHOTO_RATE), like the accept-risk ceiling.
"""

from __future__ import annotations

import json
import math
import struct
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from models.networks import feature_stages

FAMILIARITY_FORMAT = "rxverify-familiarity-v1"


def _pooled(output: Any) -> torch.Tensor | None:
    if not isinstance(output, torch.Tensor):
        return None
    output = output.detach().float()
    if output.ndim == 4:
        return output.mean(dim=(2, 3))
    return output.flatten(1) if output.ndim >= 2 else None


class FeatureTaps:
    """Forward hooks that record a model's feature stages, spatially averaged, while `capture` is open.

    The hooks stay on the model and do nothing outside `capture`; what they record is kept per thread,
    so forwards that other threads run on the same model at the same time do not mix.
    """

    def __init__(self, model: nn.Module, stages: Sequence[str]) -> None:
        self.stages = tuple(stages)
        self._local = threading.local()
        self._handles = [model.get_submodule(name).register_forward_hook(self._recorder(name))
                         for name in self.stages]

    def _recorder(self, name: str) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            found = getattr(self._local, "found", None)
            if found is not None:
                pooled = _pooled(output)
                if pooled is not None:
                    found[name] = pooled
        return hook

    @contextmanager
    def capture(self) -> Iterator[dict[str, torch.Tensor]]:
        """A dict that the forwards run in this block (on this thread) fill with {stage: (B, C)}."""
        found: dict[str, torch.Tensor] = {}
        self._local.found = found
        try:
            yield found
        finally:
            self._local.found = None

    def remove(self) -> None:
        """Take the hooks off the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def collect_features(model: nn.Module, loader: Iterable[Any], *, device: torch.device | str
                     ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Every feature stage's pooled outputs {stage: (N, C) float64} and the labels (N,) of a loader."""
    device = torch.device(device)
    stages = feature_stages(model)
    if not stages:
        raise ValueError(f"{type(model).__name__} has no known feature stages")
    taps = FeatureTaps(model, stages)
    was_training = model.training
    model.eval()
    parts: dict[str, list[np.ndarray]] = {name: [] for name in stages}
    labels: list[np.ndarray] = []
    try:
        with torch.inference_mode():
            for batch in loader:
                with taps.capture() as found:
                    model(batch[0].to(device))
                for name in stages:
                    parts[name].append(found[name].cpu().numpy().astype(np.float64))
                labels.append(torch.as_tensor(batch[1]).long().cpu().numpy())
    finally:
        taps.remove()
        model.train(was_training)
    if not labels:
        raise ValueError("no photos to read features from")
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}, np.concatenate(labels)


def conformal_threshold(scores: np.ndarray, rate: float) -> float:
    """The ceil((n + 1)(1 - rate))-th smallest score; +inf when n is too small for `rate` (nothing flagged)."""
    if not 0.0 < rate < 1.0:
        raise ValueError(f"rate must lie in (0, 1) (got {rate})")
    ordered = np.sort(np.asarray(scores, dtype=np.float64))
    rank = math.ceil((len(ordered) + 1) * (1.0 - rate) - 1e-9)
    return float(ordered[rank - 1]) if 1 <= rank <= len(ordered) else math.inf


@dataclass(frozen=True, eq=False)
class StageDensity:
    """One stage: class means and a whitening W of the shared covariance (W W^T is its inverse)."""

    means: np.ndarray  # (K, D)
    whitening: np.ndarray  # (D, D)
    valid_scores: np.ndarray  # (N,) the validation photos' scores, for the threshold
    _white_means: np.ndarray = field(init=False, repr=False)
    _white_norms: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        means, whitening, valid = (np.asarray(a, dtype=np.float64) for a in
                                   (self.means, self.whitening, self.valid_scores))
        if means.ndim != 2 or whitening.shape != (means.shape[1],) * 2 or valid.ndim != 1:
            raise ValueError(f"a stage needs (K, D) means, a (D, D) whitening and (N,) validation scores "
                             f"(got {means.shape}, {whitening.shape}, {valid.shape})")
        if not all(np.isfinite(a).all() for a in (means, whitening, valid)):
            raise ValueError("a stage density must be finite")
        white_means = means @ whitening
        for name, value in (("means", means), ("whitening", whitening), ("valid_scores", valid),
                            ("_white_means", white_means), ("_white_norms", (white_means ** 2).sum(1))):
            object.__setattr__(self, name, value)

    @property
    def dim(self) -> int:
        """The number of channels D."""
        return int(self.means.shape[1])

    def scores(self, features: Any) -> np.ndarray:
        """(N,) smallest squared Mahalanobis distance of each row to a class mean (an array, or a tensor on
        any device, as `FeatureTaps.capture` records them)."""
        if isinstance(features, torch.Tensor):
            features = features.detach().cpu().numpy()
        array = np.asarray(features, dtype=np.float64)
        if array.ndim != 2 or array.shape[1] != self.dim:
            raise ValueError(f"features must have shape (N, {self.dim}) (got {array.shape})")
        white = array @ self.whitening
        # ||z - m||^2 = ||z||^2 - 2 z.m + ||m||^2 per class, clipped at 0 against rounding.
        distances = (white * white).sum(1)[:, None] - 2.0 * white @ self._white_means.T + self._white_norms[None, :]
        return np.maximum(distances.min(axis=1), 0.0)


def fit_stage(train_features: np.ndarray, train_labels: np.ndarray, valid_features: np.ndarray, *,
              num_classes: int) -> tuple[StageDensity, float]:
    """A stage's density (class means, Ledoit-Wolf shared covariance) and the shrinkage it used."""
    from sklearn.covariance import LedoitWolf

    means = np.stack([train_features[train_labels == k].mean(axis=0) for k in range(num_classes)])
    estimator = LedoitWolf(assume_centered=True).fit(train_features - means[train_labels])
    eigenvalues, eigenvectors = np.linalg.eigh(estimator.covariance_)
    floor = max(float(eigenvalues.max()), 1e-12) * 1e-9  # dead channels (zero variance) stay invertible
    whitening = eigenvectors / np.sqrt(np.maximum(eigenvalues, floor))[None, :]
    partial = StageDensity(means=means, whitening=whitening, valid_scores=np.zeros(0))
    return (StageDensity(means=means, whitening=whitening, valid_scores=partial.scores(valid_features)),
            float(estimator.shrinkage_))


@dataclass(frozen=True, eq=False)
class Familiarity:
    """Per-stage densities of one model's features; `weights_sha256` names the weights they belong to."""

    stages: Mapping[str, StageDensity]
    weights_sha256: str
    report: dict[str, Any] = field(default_factory=dict)
    _thresholds: dict[float, np.ndarray] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("a familiarity model needs at least one stage")
        sizes = {len(stage.valid_scores) for stage in self.stages.values()}
        if len(sizes) != 1:
            raise ValueError("every stage must hold the same validation photos' scores")

    @property
    def n_valid(self) -> int:
        """How many validation photos the thresholds come from."""
        return len(next(iter(self.stages.values())).valid_scores)

    def scores(self, features: Mapping[str, Any]) -> np.ndarray:
        """(N, L) scores of N photos at the L stages, from {stage: (N, C) features} (arrays or tensors)."""
        return np.stack([stage.scores(features[name]) for name, stage in self.stages.items()], axis=1)

    def thresholds(self, rate: float) -> np.ndarray:
        """(L,) per-stage thresholds for a false-alarm rate `rate` in all (see the module doc); cached per rate."""
        found = self._thresholds.get(rate)
        if found is None:
            share = rate / len(self.stages)
            found = np.array([conformal_threshold(stage.valid_scores, share) for stage in self.stages.values()])
            if len(self._thresholds) < 8:  # a service uses one rate; a bound against callers that vary it
                self._thresholds[rate] = found
        return found

    def unfamiliarity(self, scores: np.ndarray, rate: float) -> np.ndarray:
        """(N,) the largest score / threshold ratio over the stages: above 1, the photo is unfamiliar.

        0 where every threshold is infinite (too few validation photos for `rate`: nothing is flagged).
        """
        thresholds = self.thresholds(rate)
        with np.errstate(divide="ignore"):
            ratios = np.where(np.isfinite(thresholds)[None, :], np.asarray(scores) / thresholds[None, :], 0.0)
        return ratios.max(axis=1)

    def to_bytes(self) -> bytes:
        """safetensors bytes: float64 arrays per stage; stages, weights' SHA-256 and report in the header."""
        from safetensors.numpy import save

        arrays: dict[str, np.ndarray] = {}
        for name, stage in self.stages.items():
            for key in ("means", "whitening", "valid_scores"):
                arrays[f"{name}/{key}"] = np.ascontiguousarray(getattr(stage, key), dtype=np.float64)
        header = {"format": FAMILIARITY_FORMAT, "weights_sha256": self.weights_sha256,
                  "stages": json.dumps(list(self.stages)), "report": json.dumps(self.report, allow_nan=False)}
        return save(arrays, metadata=header)

    @classmethod
    def from_bytes(cls, data: bytes) -> Familiarity:
        """Parse bytes written by `to_bytes`; ValueError on anything else."""
        from safetensors import SafetensorError
        from safetensors.numpy import load

        try:
            header = _header_metadata(data)
            if header.get("format") != FAMILIARITY_FORMAT:
                raise ValueError(f"not a familiarity file (format {header.get('format')!r})")
            arrays = load(data)
            names = json.loads(header["stages"])
            stages = {name: StageDensity(means=arrays[f"{name}/means"], whitening=arrays[f"{name}/whitening"],
                                         valid_scores=arrays[f"{name}/valid_scores"]) for name in names}
            return cls(stages=stages, weights_sha256=str(header["weights_sha256"]),
                       report=json.loads(header.get("report", "{}")))
        except (SafetensorError, KeyError, TypeError, ValueError, struct.error) as error:
            raise ValueError(f"corrupt familiarity file: {error!r}") from None


def _header_metadata(data: bytes) -> dict[str, str]:
    """The string metadata in a safetensors header (ValueError, or struct.error, when there is none)."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    if not isinstance(header, dict):
        raise ValueError("safetensors header is not an object")
    return dict(header.get("__metadata__") or {})


def fit_familiarity(train: tuple[Mapping[str, np.ndarray], np.ndarray], valid: Mapping[str, np.ndarray], *,
                    num_classes: int, weights_sha256: str) -> Familiarity:
    """Fit every stage on training features (`collect_features`' output) and score the validation ones.

    ValueError when a class has no training photo, a stage's features are not finite, or there are fewer
    training photos than classes + 2.
    """
    features, labels = train
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(labels) < num_classes + 2:
        raise ValueError(f"{len(labels)} training photos are too few for {num_classes} classes")
    counts = np.bincount(labels, minlength=num_classes)
    if len(counts) != num_classes or (counts == 0).any():
        raise ValueError(f"classes {np.flatnonzero(counts[:num_classes] == 0).tolist()} have no training photo "
                         "(or a label is out of range)")
    stages: dict[str, StageDensity] = {}
    shrinkage: dict[str, float] = {}
    for name, train_features in features.items():
        array, valid_array = (np.asarray(a, dtype=np.float64) for a in (train_features, valid[name]))
        if array.shape[0] != len(labels) or valid_array.ndim != 2 or valid_array.shape[1] != array.shape[1]:
            raise ValueError(f"stage {name}: features of shape {array.shape} and {valid_array.shape} for "
                             f"{len(labels)} labels")
        if not (np.isfinite(array).all() and np.isfinite(valid_array).all()):
            raise ValueError(f"stage {name}: features are not finite")
        stages[name], shrinkage[name] = fit_stage(array, labels, valid_array, num_classes=num_classes)
    report = {"n_train": len(labels), "n_valid": int(next(iter(valid.values())).shape[0]),
              "dims": {name: stage.dim for name, stage in stages.items()}, "shrinkage": shrinkage}
    return Familiarity(stages=stages, weights_sha256=weights_sha256, report=report)
