"""The served-model bundle: an immutable (model, metadata, preset, policy, version, device) unit."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from app.errors import DomainError
from app.inference.images import ImageLimits, decode_image
from models.checkpoint import (
    CheckpointError,
    CheckpointMetadata,
    load_checkpoint,
    read_familiarity,
    read_validation_outputs,
)
from models.costs import CostMatrix
from models.decision import Decision, VerdictPolicy, decide, refit_policy, with_accept_ceiling
from models.evaluate import probabilities_from_outputs
from models.ood import Familiarity, FeatureTaps
from models.runtime import autocast_context, channels_last_input, prepare_for_inference
from models.transforms import EvalPreset

logger = logging.getLogger(__name__)

_REFITS_KEPT = 8  # policies refitted for other cost matrices, kept per served model
_UNFAMILIARITY_CAP = 1e9  # reported in place of an infinite or undefined ratio (still unfamiliar)


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
    channels_last: bool = True  # the memory layout `model`'s weights were prepared in (serve_channels_last)
    # Calibrated validation probabilities and labels the policy was fitted on (None for older checkpoints).
    validation: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)
    # The unfamiliar-photo check (models.ood) and the hooks that read `model`'s feature stages for it
    # (None for a checkpoint without one, or one that did not check out: logged at load).
    familiarity: Familiarity | None = field(default=None, repr=False)
    taps: FeatureTaps | None = field(default=None, repr=False)
    _policies: dict[str, tuple[VerdictPolicy, bool]] = field(default_factory=dict, repr=False)
    _policies_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def policy_for(self, cost_matrix: CostMatrix, *, critical_cost: float,
                   max_accept_risk: float | None) -> tuple[VerdictPolicy, bool]:
        """`policy_for_costs` for this model, cached per process for the last 8 cost matrices.

        The stored policy was fitted for the job's cost matrix. When a pharmacist has since activated
        another one, the thresholds and conformal alphas are refitted for it on the stored validation
        outputs, so the risk and its threshold speak of the same costs.
        """
        key = f"{cost_matrix.fingerprint()}:{max_accept_risk!r}"
        with self._policies_lock:
            if key in self._policies:
                return self._policies[key]
            found = policy_for_costs(self.policy, self.validation, cost_matrix, classes=self.classes,
                                     critical_cost=critical_cost, max_accept_risk=max_accept_risk,
                                     label=self.version)
            while len(self._policies) >= _REFITS_KEPT:
                self._policies.pop(next(iter(self._policies)))
            self._policies[key] = found
            return found

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
                             allowed_formats=limits.allowed_formats, draft_size=self.preset.draft_request,
                             min_side=limits.min_side, min_contrast=limits.min_contrast)
        return self.preset(image)


@dataclass(frozen=True, eq=False)
class Prediction:
    """Calibrated probabilities of one request, with the version (and bundle) that produced them."""

    probs: np.ndarray
    model_version: str
    classes: tuple[str, ...]
    served: ServedModel = field(repr=False)
    stage_scores: np.ndarray | None = None  # (L,) the photo's scores at the familiarity check's stages

    def unfamiliarity(self, rate: float) -> float | None:
        """The photo's unfamiliarity for a false-alarm rate (`models.ood`); None when not checked."""
        familiarity = self.served.familiarity
        if familiarity is None or self.stage_scores is None or rate <= 0:
            return None
        if not np.isfinite(familiarity.thresholds(rate)).any():
            # Too few validation photos for this rate: no photo can be flagged, so none was checked (a 0.0
            # here read as "familiar" for pure noise).
            return None
        value = float(familiarity.unfamiliarity(self.stage_scores[None, :], rate)[0])
        return value if value <= _UNFAMILIARITY_CAP else _UNFAMILIARITY_CAP  # JSON has no inf or NaN

    def decide(self, *, prescribed: str, cost_matrix: CostMatrix, critical_cost: float,
               max_accept_risk: float | None = None, unfamiliar_photo_rate: float = 0.0,
               top_k: int = 3) -> tuple[Decision, bool]:
        """The verdict against a prescribed product key, and whether its policy was fitted for these costs.

        The active cost matrix is reindexed to the model's classes when needed (unknown pairs cost the
        default). The policy is this model version's, fitted (or refitted) for that matrix: see
        `ServedModel.policy_for`. A model stored without a fitted policy gets `VerdictPolicy.review_only`,
        whose `critical_cost` is the one given here; a fitted policy keeps the level it was fitted for.
        No fill whose expected accept cost exceeds `max_accept_risk` (RXVERIFY_MAX_ACCEPT_RISK) is accepted,
        and a photo the familiarity check flags at `unfamiliar_photo_rate` goes to review (0: not checked).
        """
        if prescribed not in self.classes:
            raise ProductNotServed(f"model {self.model_version} was not trained on product {prescribed}; "
                                   "a pharmacist must check this bottle", extra={"prescribed_ndc": prescribed})
        costs = cost_matrix if cost_matrix.classes == self.classes else cost_matrix.reindexed(self.classes)
        policy, fitted = self.served.policy_for(costs, critical_cost=critical_cost, max_accept_risk=max_accept_risk)
        decision = decide(self.probs, prescribed_index=self.classes.index(prescribed), cost_matrix=costs,
                          policy=policy, classes=self.classes, top_k=top_k,
                          unfamiliarity=self.unfamiliarity(unfamiliar_photo_rate))
        return decision, fitted


def policy_for_costs(policy: VerdictPolicy | None, validation: tuple[np.ndarray, np.ndarray] | None,
                     cost_matrix: CostMatrix, *, classes: tuple[str, ...], critical_cost: float,
                     max_accept_risk: float | None, label: str) -> tuple[VerdictPolicy, bool]:
    """A model's verdict policy for `cost_matrix` (over `classes`), and whether it was fitted for it.

    The stored `policy` when it was fitted for these costs under the ceiling `max_accept_risk` (or under
    none, and the ceiling does not bind); else refitted on the stored `validation` outputs under that
    ceiling, which may raise or lower it; else (none stored, or the refit failed: logged) the stored
    policy with its threshold lowered to the ceiling, marked fitted only if it was fitted for these costs.
    No stored policy, or a review-only one, gives a policy that never auto-accepts.
    """
    if policy is None:
        return VerdictPolicy.review_only(classes, critical_cost=critical_cost), False
    if not policy.accepts:  # stored review-only (validation too small to fit): nothing to refit
        return policy, False
    key = cost_matrix.fingerprint()
    same_costs = policy.report.get("cost_matrix_sha256") == key
    fitted_under = policy.report.get("max_accept_risk")
    if same_costs and (max_accept_risk is None or fitted_under == max_accept_risk
                       or (fitted_under is None and policy.accept_risk <= max_accept_risk)):
        return policy, True  # what a refit would give: fitted under this ceiling, or one that does not bind
    capped = policy if max_accept_risk is None else with_accept_ceiling(policy, max_accept_risk)
    if validation is None:
        if not same_costs:
            logger.warning("model %s: its verdict policy was fitted for another cost matrix and the checkpoint "
                           "holds no usable validation outputs to refit it; thresholds of the old costs are used",
                           label)
        return capped, same_costs
    try:
        refitted = refit_policy(policy, *validation, cost_matrix=cost_matrix, max_accept_risk=max_accept_risk)
    except (ValueError, KeyError, TypeError):
        logger.exception("model %s: refitting the verdict policy for cost matrix %s failed; thresholds of the "
                         "old costs are used", label, key[:12])
        return capped, same_costs
    logger.info("model %s: verdict policy refitted for cost matrix %s under the accept-risk ceiling %s "
                "(accept_risk %.6g -> %.6g)", label, key[:12], max_accept_risk, policy.accept_risk,
                refitted.accept_risk)
    return refitted, True


@dataclass(frozen=True, slots=True)
class Registered:
    """What the registry recorded of a model version when it was registered: the weights' SHA-256, the verdict
    policy and the temperature. A checkpoint on disk that no longer matches is refused (`load_served_model`)."""

    sha256: str
    decision: dict[str, Any]
    temperature: float | None


def check_registered(checkpoint_dir: str | Path, *, weights_sha256: str, metadata: CheckpointMetadata,
                     registered: Registered) -> None:
    """ModelLoadError unless the loaded checkpoint is the one registered: its weights (a flipped bit, a file
    replaced) and the parts of its metadata.json that set verdicts (the policy's thresholds, the temperature)
    must not have changed on disk since, for no audit entry would record such a change."""
    if weights_sha256 != registered.sha256:
        raise ModelLoadError(f"{checkpoint_dir}: the weights' SHA-256 is {weights_sha256}, not the registered "
                             f"{registered.sha256}: the file changed on disk after registration")
    changed = [name for name, stored, found in (
        ("decision", _canonical(registered.decision), _canonical(metadata.decision)),
        ("temperature", registered.temperature, metadata.temperature)) if stored is not None and stored != found]
    if changed:
        raise ModelLoadError(f"{checkpoint_dir}: metadata.json's {' and '.join(changed)} differ from what was "
                             "registered: the file changed on disk after registration")


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def load_served_model(checkpoint_dir: str | Path, *, version: str, device: torch.device,
                      channels_last: bool = True, registered: Registered | None = None) -> ServedModel:
    """Load a checkpoint into a bundle (blocking: run it in a thread); with `registered`, refuse one that is
    not what the registry recorded (`check_registered`).

    The model is served as `prepare_for_inference` makes it: BatchNorm folded into the convolutions, with
    channels-last weights when `channels_last` (same outputs up to float rounding; see
    `models.runtime.serve_channels_last` for which layout is faster where).
    """
    loaded = load_checkpoint(checkpoint_dir, device=device)
    metadata = loaded.metadata
    if registered is not None:
        check_registered(checkpoint_dir, weights_sha256=loaded.weights_sha256, metadata=metadata,
                         registered=registered)
    policy = VerdictPolicy.from_dict(metadata.decision) if metadata.decision else None
    if policy is not None and policy.classes != metadata.classes:
        raise ModelLoadError(f"{checkpoint_dir}: the stored verdict policy names other classes than the model")
    validation = validation_outputs(checkpoint_dir, metadata.decision, num_classes=metadata.num_classes,
                                    policy=policy)
    preset = EvalPreset.from_metadata(metadata)
    preset(Image.new("RGB", (preset.image_size + 7, preset.image_size), (128, 128, 128)))  # first-call costs
    example = torch.zeros(1, metadata.in_channels, preset.image_size, preset.image_size, device=device)
    model = prepare_for_inference(loaded.model, example, channels_last=channels_last)
    familiarity, taps = familiarity_check(checkpoint_dir, model, example, weights_sha256=loaded.weights_sha256)
    return ServedModel(model=model, metadata=metadata, preset=preset, version=version, device=device,
                       weights_sha256=loaded.weights_sha256, policy=policy, channels_last=channels_last,
                       validation=validation, familiarity=familiarity, taps=taps)


def familiarity_check(checkpoint_dir: str | Path, model: nn.Module, example: torch.Tensor, *,
                      weights_sha256: str) -> tuple[Familiarity | None, FeatureTaps | None]:
    """The checkpoint's familiarity check with hooks on `model`'s stages, once one forward shows they fit.

    A checkpoint without one is served without the check (logged); so is one whose file is corrupt, names
    other weights or does not fit the model's stages (logged as an error): like a missing verdict policy,
    that is the operator's to fix, and the other checks still hold.
    """
    try:
        familiarity = read_familiarity(checkpoint_dir, weights_sha256=weights_sha256)
    except CheckpointError as error:
        logger.error("%s: unfamiliar-photo check unusable, serving without it: %s", checkpoint_dir, error)
        return None, None
    if familiarity is None:
        logger.warning("%s: no unfamiliar-photo check fitted; photos unlike the training photos get verdicts "
                       "like any other", checkpoint_dir)
        return None, None
    taps: FeatureTaps | None = None
    try:
        taps = FeatureTaps(model, tuple(familiarity.stages))  # AttributeError: no such submodule
        with torch.inference_mode(), taps.capture() as found:
            model(example)
        familiarity.scores(found)
    except (KeyError, ValueError, AttributeError) as error:
        if taps is not None:
            taps.remove()
        logger.error("%s: the unfamiliar-photo check does not fit the model (%r), serving without it",
                     checkpoint_dir, error)
        return None, None
    return familiarity, taps


def validation_outputs(checkpoint_dir: str | Path, decision: Mapping[str, Any], *, num_classes: int,
                       policy: VerdictPolicy | None) -> tuple[np.ndarray, np.ndarray] | None:
    """The validation outputs the stored policy was fitted on, when they are there and check out.

    Only the file whose SHA-256 the metadata records, with one row per validation image the policy
    counted and labels among the model's classes, is used. Anything else is logged and ignored: the
    model then serves with its stored policy, which is not refitted when the cost matrix changes.
    """
    expected = decision.get("validation_sha256")
    if policy is None or not policy.accepts or not isinstance(expected, str):
        return None
    try:
        validation = read_validation_outputs(checkpoint_dir, expected_sha256=expected, num_classes=num_classes)
    except CheckpointError as error:
        logger.error("%s: validation outputs unusable, the verdict policy will not be refitted: %s",
                     checkpoint_dir, error)
        return None
    if validation is None:
        logger.warning("%s: validation outputs missing; the verdict policy will not be refitted", checkpoint_dir)
        return None
    probs, labels = validation
    if probs.shape[0] != policy.report.get("n"):
        logger.error("%s: validation outputs do not match the images the policy counted; the verdict policy "
                     "will not be refitted", checkpoint_dir)
        return None
    return probs, labels


def forward_probabilities(served: ServedModel, tensors: Sequence[torch.Tensor], *, autocast: bool = False
                          ) -> np.ndarray:
    """`forward_outputs`' probabilities alone."""
    return forward_outputs(served, tensors, autocast=autocast)[0]


def forward_outputs(served: ServedModel, tensors: Sequence[torch.Tensor], *, autocast: bool = False
                    ) -> tuple[np.ndarray, np.ndarray | None]:
    """One batched forward (inference mode): (B, K) temperature-calibrated probabilities, and the (B, L)
    scores of the familiarity check's stages (None without one).

    Float32 unless `autocast` (bf16 autocast on CUDA, RXVERIFY_INFERENCE_AMP): the temperature and the
    verdict policy were fitted on float32 validation outputs. On an H100 (a trained 48 px `small_cnn`,
    1396 photos), bf16 moved probabilities by up to 0.040 against the CPU's float32 and changed 13
    expected-cost decisions; float32 on the GPU (TF32 convolutions) moved them by up to 0.003, 1 decision.
    """
    inputs = torch.stack(list(tensors)).to(served.device)
    if served.channels_last:  # the layout the weights were prepared in; converted on the device it runs on
        inputs = channels_last_input(inputs)
    capture = served.taps.capture() if served.taps is not None else contextlib.nullcontext(None)
    with capture as found, torch.inference_mode(), autocast_context(served.device, enabled=autocast):
        outputs = served.model(inputs)
    probs = probabilities_from_outputs(outputs.float(), served.metadata.output_kind,
                                       temperature=served.metadata.temperature)
    scores = None
    if found is not None and served.familiarity is not None:
        scores = served.familiarity.scores(found)
    return probs.cpu().numpy().astype(np.float64), scores
