"""Model registry, basic part: register a checkpoint as an immutable model version and activate it.

A model version is addressed by the SHA-256 of its weights file. Registering copies the checkpoint
directory into `settings.checkpoints_dir/<sha256>/` (content-addressed, written to a temp dir and
renamed), so the served file can never change under a version id. Registering the same weights twice
returns the existing version. The engine serves a version under the label `str(model_version.id)`
(`engine_label` / `model_version_id_of_label`), so every verdict names the version that produced it.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import Settings
from app.errors import FieldError, InvalidInput, NotFound
from app.orm import ACTIVE_STATE_ID, ActiveState, ModelPromotion, ModelVersion
from app.services.active_state import move_active
from app.services.audit import Actor, record_change
from app.services.products import catalog_keys
from models.checkpoint import (
    CHECKPOINT_FILES,
    OPTIONAL_FILES,
    VALIDATION_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    read_familiarity,
    read_metadata,
    read_validation_outputs,
    weights_sha256,
)

logger = logging.getLogger(__name__)


def engine_label(model_version: ModelVersion) -> str:
    """The version string the inference engine serves a registered model under."""
    return str(model_version.id)


def model_version_id_of_label(label: str) -> int | None:
    """The ModelVersion id behind an engine label (None for a model that was not registered)."""
    return int(label) if label.isascii() and label.isdigit() else None


def checkpoint_path(settings: Settings, model_version: ModelVersion) -> Path:
    """Where a version's checkpoint lives: its stored path, or `checkpoints_dir/<sha256>` if that moved."""
    stored = Path(model_version.path)
    if (stored / WEIGHTS_FILE).is_file():
        return stored
    return settings.checkpoints_dir / model_version.sha256


def active_model_version(session: Session) -> ModelVersion | None:
    """The model version the service should serve (None before the first activation)."""
    version_id = session.scalar(select(ActiveState.model_version_id).where(ActiveState.id == ACTIVE_STATE_ID))
    return session.get(ModelVersion, version_id) if version_id is not None else None


def find_by_sha256(session: Session, sha256: str) -> ModelVersion | None:
    """The version whose weights have this SHA-256."""
    return session.scalars(select(ModelVersion).where(ModelVersion.sha256 == sha256)).first()


def _invalid(message: str, *, code: str) -> InvalidInput:
    return InvalidInput(message, slug="invalid-checkpoint", title="The checkpoint cannot be served",
                        errors=[FieldError(field="checkpoint", message=message, code=code)])


def check_classes_in_catalog(session: Session, classes: tuple[str, ...]) -> None:
    """Every class of a model must be a catalog product key (InvalidInput naming the others)."""
    unknown = sorted(set(classes) - catalog_keys(session))
    if unknown:
        shown = ", ".join(unknown[:10]) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
        raise _invalid(f"the model's classes {shown} are not catalog products (seed or add them first)",
                       code="classes_not_in_catalog")


def _copy_content_addressed(source: Path, target: Path) -> None:
    """Copy the checkpoint's files into `target` atomically (temp dir beside it, then rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        for name in CHECKPOINT_FILES:
            if name in OPTIONAL_FILES and not (source / name).is_file():
                continue  # e.g. a model without validation outputs keeps the policy it was fitted with
            shutil.copy2(source / name, staging / name)
        if (target / WEIGHTS_FILE).is_file():
            return  # another process registered the same weights first: same bytes by construction
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def register_checkpoint(session: Session, *, source: str | Path, settings: Settings, actor: Actor) -> ModelVersion:
    """Register a checkpoint directory as a model version, or return the version with the same weights."""
    source = Path(source)
    try:
        metadata = read_metadata(source)
        sha256 = weights_sha256(source)
        # Optional, but when present it must be the file the metadata names (else every API replica would
        # find out only when it loads the model).
        if (source / VALIDATION_FILE).is_file():
            expected = metadata.decision.get("validation_sha256")
            if not isinstance(expected, str):
                raise CheckpointError(f"{source / VALIDATION_FILE} is not named in the metadata (no validation_sha256)")
            read_validation_outputs(source, expected_sha256=expected, num_classes=len(metadata.classes))
        read_familiarity(source, weights_sha256=sha256)
    except CheckpointError as error:
        raise _invalid(str(error), code="invalid_checkpoint") from error
    existing = find_by_sha256(session, sha256)
    if existing is not None:
        return existing
    check_classes_in_catalog(session, metadata.classes)
    target = settings.checkpoints_dir / sha256
    if source.resolve() != target.resolve():
        _copy_content_addressed(source, target)
    if weights_sha256(target) != sha256:
        raise _invalid(f"{target} does not hold the weights {sha256} (changed while copying?)",
                       code="checksum_mismatch")
    parent = find_by_sha256(session, metadata.parent_sha256) if metadata.parent_sha256 else None
    version = ModelVersion(
        sha256=sha256, path=str(target), arch=metadata.arch, method=metadata.method,
        output_kind=metadata.output_kind, classes=list(metadata.classes), image_size=metadata.image_size,
        temperature=metadata.temperature, status="candidate", parent_id=parent.id if parent else None,
        dataset_fingerprint=metadata.dataset_fingerprint,
        code_version=metadata.library_versions.get("rxverify"), metrics=dict(metadata.metrics),
        decision=dict(metadata.decision), checkpoint_metadata=metadata.to_dict(), created_by=actor.name)
    session.add(version)
    session.flush()
    record_change(session, actor=actor, action="model.register", entity_type="model_version",
                  entity_id=version.id, details={"sha256": sha256, "source": str(source), "arch": metadata.arch,
                                                 "classes": len(metadata.classes)})
    logger.info("registered model version %s (%s, sha256 %s)", version.id, metadata.arch, sha256[:12])
    return version


def activate_model(session: Session, *, model_version_id: int, actor: Actor, reason: str | None = None,
                   action: str = "activate") -> ModelVersion:
    """Make a version the active one and append it to the promotion history (no gate: see issue 5's promote)."""
    version = session.get(ModelVersion, model_version_id)
    if version is None:
        raise NotFound(f"model version {model_version_id} does not exist", slug="model-version-not-found")
    check_classes_in_catalog(session, tuple(version.classes))
    previous = session.scalar(select(ActiveState.model_version_id).where(ActiveState.id == ACTIVE_STATE_ID))
    if previous == version.id:
        return version
    move_active(session, "model_version_id", previous=previous, new=version.id)
    version.status = "promoted"
    session.add(ModelPromotion(action=action, from_model_version_id=previous, to_model_version_id=version.id,
                               actor=actor.name, actor_key_id=actor.key_id, reason=reason))
    session.flush()
    record_change(session, actor=actor, action=f"model.{action}", entity_type="model_version",
                  entity_id=version.id, reason=reason, details={"from_version": previous, "to_version": version.id})
    return version


def register_and_activate(session: Session, *, source: str | Path, settings: Settings, actor: Actor,
                          reason: str | None = None) -> ModelVersion:
    """`rxverify serve --model`: register the checkpoint if new, then make it the active version."""
    version = register_checkpoint(session, source=source, settings=settings, actor=actor)
    return activate_model(session, model_version_id=version.id, actor=actor, reason=reason)


def policy_under(session: Session, settings: Settings, *, model_version_id: int,
                 cost_matrix_version: int | None) -> dict[str, Any]:
    """A version's verdict policy under a cost-matrix version (default: the active one), as the API serves it.

    Lets a pharmacist see what a cost edit would do to the thresholds and review rates before activating it.
    """
    from app.inference.served import policy_for_costs, validation_outputs
    from app.services.cost_matrices import cost_matrix_of, get_version
    from models.decision import VerdictPolicy

    version = session.get(ModelVersion, model_version_id)
    if version is None:
        raise NotFound(f"model version {model_version_id} does not exist", slug="model-version-not-found")
    matrix_version = get_version(session, "active" if cost_matrix_version is None else cost_matrix_version)
    classes = tuple(version.classes)
    costs = cost_matrix_of(session, matrix_version.id, classes=classes)
    stored = VerdictPolicy.from_dict(version.decision) if version.decision else None
    validation = validation_outputs(checkpoint_path(settings, version), version.decision or {},
                                    num_classes=len(classes), policy=stored)
    policy, fitted = policy_for_costs(stored, validation, costs, classes=classes,
                                      critical_cost=settings.critical_cost_threshold,
                                      max_accept_risk=settings.max_accept_risk, label=str(version.id))
    return {"model_version": version.id, "cost_matrix_version": matrix_version.id, "fitted_for_cost_matrix": fitted,
            "refitted": fitted and policy is not stored, "accept_risk": policy.accept_risk,
            "mismatch_probability": policy.mismatch_probability, "critical_cost": policy.critical_cost,
            "miss_rates": dict(zip(classes, policy.alpha, strict=True)), "report": policy.report}
