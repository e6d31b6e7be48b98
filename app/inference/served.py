"""The served-model bundle: an immutable (model, metadata, preset, policy, version, device) unit."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from app.errors import DomainError
from app.inference.images import ImageLimits, decode_image
from models.checkpoint import CheckpointMetadata, load_checkpoint
from models.costs import CostMatrix
from models.decision import Decision, VerdictPolicy, decide
from models.evaluate import probabilities_from_outputs
from models.runtime import autocast_context
from models.transforms import EvalPreset


class ModelLoadError(RuntimeError):
    """A checkpoint failed to load or to warm up; the previous model (if any) keeps serving."""


class ProductNotServed(DomainError):
    """The prescribed product is valid but not one of the served model's classes (422)."""

    status = 422
    default_slug = "product-not-in-model"
    default_title = "The served model cannot recognise this product"


@dataclass(frozen=True, eq=False)
class ServedModel:
    """An immutable bundle: a model in eval mode with everything needed to preprocess for it and read it."""

    model: nn.Module = field(repr=False)
    metadata: CheckpointMetadata = field(repr=False)
    preset: EvalPreset
    version: str
    device: torch.device
    weights_sha256: str
    policy: VerdictPolicy | None = field(repr=False)

    @property
    def classes(self) -> tuple[str, ...]:
        """The model's output classes (product NDCs), in output order."""
        return self.metadata.classes

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """The (C, H, W) shape the preset produces and the model expects."""
        size = self.preset.image_size
        return (self.metadata.in_channels, size, size)

    def preprocess(self, data: bytes, *, limits: ImageLimits) -> torch.Tensor:
        """Decode an upload (JPEG draft sized for this preset) and apply this model's EvalPreset."""
        image = decode_image(data, max_bytes=limits.max_bytes, max_pixels=limits.max_pixels,
                             allowed_formats=limits.allowed_formats, draft_size=self.preset.draft_request)
        return self.preset(image)


@dataclass(frozen=True, eq=False)
class Prediction:
    """Calibrated probabilities of one request, with the version (and bundle) that produced them."""

    probs: np.ndarray
    model_version: str
    classes: tuple[str, ...]
    served: ServedModel = field(repr=False)

    def decide(self, *, prescribed: str, cost_matrix: CostMatrix, critical_cost: float, top_k: int = 3) -> Decision:
        """The verdict against a prescribed product key, with the policy fitted for this model version.

        The active cost matrix is reindexed to the model's classes when needed (unknown pairs cost the
        default). A model stored without a fitted policy gets `VerdictPolicy.review_only`, whose
        `critical_cost` is the one given here; a fitted policy keeps the level it was fitted for.
        """
        if prescribed not in self.classes:
            raise ProductNotServed(f"model {self.model_version} was not trained on product {prescribed}; "
                                   "a pharmacist must check this bottle", extra={"prescribed_ndc": prescribed})
        costs = cost_matrix if cost_matrix.classes == self.classes else cost_matrix.reindexed(self.classes)
        policy = self.served.policy or VerdictPolicy.review_only(self.classes, critical_cost=critical_cost)
        return decide(self.probs, prescribed_index=self.classes.index(prescribed), cost_matrix=costs, policy=policy,
                      classes=self.classes, top_k=top_k)


def load_served_model(checkpoint_dir: str | Path, *, version: str, device: torch.device) -> ServedModel:
    """Load a checkpoint into a bundle (blocking: run it in a thread)."""
    loaded = load_checkpoint(checkpoint_dir, device=device)
    metadata = loaded.metadata
    policy = VerdictPolicy.from_dict(metadata.decision) if metadata.decision else None
    if policy is not None and policy.classes != metadata.classes:
        raise ModelLoadError(f"{checkpoint_dir}: the stored verdict policy names other classes than the model")
    preset = EvalPreset.from_metadata(metadata)
    preset(Image.new("RGB", (preset.image_size + 7, preset.image_size), (128, 128, 128)))  # first-call costs
    return ServedModel(model=loaded.model, metadata=metadata, preset=preset, version=version, device=device,
                       weights_sha256=loaded.weights_sha256, policy=policy)


def forward_probabilities(served: ServedModel, tensors: Sequence[torch.Tensor], *, autocast: bool = True
                          ) -> np.ndarray:
    """One batched forward (inference mode, autocast on CUDA): (B, K) temperature-calibrated probabilities."""
    inputs = torch.stack(list(tensors))
    if served.device.type == "cuda":
        inputs = inputs.pin_memory()
    with torch.inference_mode(), autocast_context(served.device, enabled=autocast):
        outputs = served.model(inputs.to(served.device, non_blocking=True))
    probs = probabilities_from_outputs(outputs.float(), served.metadata.output_kind,
                                       temperature=served.metadata.temperature)
    return probs.cpu().numpy().astype(np.float64)
