"""Model registry: list and compare versions (pharmacist); promote with the gate, and roll back (admin)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Query, Request, Response
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.api.deps import AdminActor, KeyFirstRoute, PharmacistActor, SessionDep, SettingsDep
from app.api.paging import NEXT_LINK_RESPONSE, link_next_page
from app.config import Settings
from app.errors import NotFound
from app.orm import Dataset, ModelPromotion, ModelVersion, Role, TrainingJob
from app.schemas.common import MAX_ID, IdPath, IdQuery, problem_responses
from app.schemas.models import (
    ActiveModel,
    Lineage,
    ModelVersionDetail,
    ModelVersionSummary,
    PromoteRequest,
    PromotionRead,
    RollbackRequest,
    VerdictPolicyRead,
)
from app.services import evaluation, model_registry, promotion
from app.services.model_follower import follower_of
from app.services.model_registry import active_model_version, checkpoint_path

router = APIRouter(route_class=KeyFirstRoute, prefix="/v1/admin/models", tags=["models"], responses=problem_responses(401, 403, 404, 422))


def _jobs_by_version(session: Session, ids: list[int]) -> dict[int, int]:
    """Each version's producing job: the first one, when later jobs produced identical weights (the same
    version, found by its SHA-256)."""
    rows = session.execute(select(TrainingJob.result_model_version_id, func.min(TrainingJob.id))
                           .where(TrainingJob.result_model_version_id.in_(ids))
                           .group_by(TrainingJob.result_model_version_id))
    return {version_id: job_id for version_id, job_id in rows if version_id is not None}


def _summary(session: Session, version: ModelVersion, *, active_id: int | None,
             job_id: int | None) -> dict[str, object]:
    metrics = version.metrics or {}
    dataset = session.get(Dataset, version.dataset_id) if version.dataset_id else None
    parent = session.get(ModelVersion, version.parent_id) if version.parent_id else None
    lineage = Lineage(parent=version.parent_id, parent_sha256=parent.sha256 if parent else None, training_job=job_id,
                      cost_matrix_version=version.cost_matrix_version_id, dataset=dataset.name if dataset else None,
                      dataset_id=version.dataset_id, dataset_fingerprint=version.dataset_fingerprint,
                      code_version=version.code_version)
    valid, test = metrics.get("valid"), metrics.get("test")
    return {"id": version.id, "sha256": version.sha256, "status": version.status, "active": version.id == active_id,
            "arch": version.arch, "method": version.method, "classes": len(version.classes),
            "image_size": version.image_size, "temperature": version.temperature, "lineage": lineage,
            "valid": evaluation.summary(valid) if isinstance(valid, dict) else None,
            "test": evaluation.summary(test) if isinstance(test, dict) else None,
            "comparison": metrics.get("comparison"), "created_by": version.created_by,
            "created_at": version.created_at}


def promotion_read(entry: ModelPromotion) -> PromotionRead:
    """The API form of a history entry."""
    return PromotionRead(id=entry.id, action=entry.action, outcome=entry.outcome,
                         from_model_version=entry.from_model_version_id, to_model_version=entry.to_model_version_id,
                         actor=entry.actor, reason=entry.reason, forced=entry.forced, gate=entry.gate or {},
                         created_at=entry.created_at)


def _announce(request: Request, settings: Settings, model_version_id: int, action: str) -> None:
    """After the commit: wake this process's follower and tell the other processes (Redis)."""
    follower = follower_of(request.app)
    if follower is not None:
        follower.poke()
    promotion.publish_active_change(settings, model_version_id=model_version_id, action=action)


@router.get("", response_model=list[ModelVersionSummary], responses=NEXT_LINK_RESPONSE)
def list_models(_actor: PharmacistActor, session: SessionDep, request: Request, response: Response,
                limit: Annotated[int, Query(ge=1, le=200)] = 50,
                before_id: IdQuery = None) -> list[ModelVersionSummary]:
    """Model versions, newest first, each with headline metrics and the comparison with its parent."""
    query = select(ModelVersion).order_by(ModelVersion.id.desc()).limit(limit)
    if before_id is not None:
        query = query.where(ModelVersion.id < before_id)
    versions = list(session.scalars(query))
    link_next_page(request, response, [v.id for v in versions], limit=limit)
    active = active_model_version(session)
    jobs = _jobs_by_version(session, [v.id for v in versions])
    return [ModelVersionSummary.model_validate(_summary(session, v, active_id=active.id if active else None,
                                                        job_id=jobs.get(v.id))) for v in versions]


@router.get("/promotions", response_model=list[PromotionRead], responses=NEXT_LINK_RESPONSE)
def list_promotions(_actor: PharmacistActor, session: SessionDep, request: Request, response: Response,
                    limit: Annotated[int, Query(ge=1, le=200)] = 50, before_id: IdQuery = None,
                    model_version: IdQuery = None) -> list[PromotionRead]:
    """The append-only history of promotions and rollbacks (refused automatic promotions included), newest first."""
    entries = promotion.history(session, limit=limit, before_id=before_id, model_version_id=model_version)
    link_next_page(request, response, [entry.id for entry in entries], limit=limit)
    return [promotion_read(entry) for entry in entries]


@router.post("/rollback", response_model=ActiveModel, responses=problem_responses(409))
def rollback(body: RollbackRequest, actor: AdminActor, session: SessionDep, settings: SettingsDep,
             request: Request, background: BackgroundTasks) -> ActiveModel:
    """Return to the version that was active before the latest promotion still in force (no gate)."""
    entry = promotion.rollback(session, settings, actor=actor, reason=body.reason, expected_active=body.expected_active)
    background.add_task(_announce, request, settings, entry.to_model_version_id, "rollback")
    return ActiveModel(active_model_version=entry.to_model_version_id, promotion=promotion_read(entry))


@router.get("/{model_version_id}", response_model=ModelVersionDetail)
def get_model(model_version_id: IdPath, actor: PharmacistActor, session: SessionDep,
              settings: SettingsDep) -> ModelVersionDetail:
    """One version: lineage, metrics with confusion matrices, verdict policy, Tables 5-6 vs its parent.

    The checkpoint's path on the server is shown to admins only.
    """
    version = session.get(ModelVersion, model_version_id)
    if version is None:
        raise NotFound(f"model version {model_version_id} does not exist", slug="model-version-not-found")
    active = active_model_version(session)
    summary = _summary(session, version, active_id=active.id if active else None,
                       job_id=_jobs_by_version(session, [version.id]).get(version.id))
    entries = promotion.history(session, limit=200, model_version_id=version.id)
    return ModelVersionDetail.model_validate({
        **summary, "metrics": version.metrics or {}, "decision": version.decision or {},
        "checkpoint_path": str(checkpoint_path(settings, version)) if actor.role.includes(Role.ADMIN) else None,
        "promotions": [promotion_read(entry) for entry in entries]})


@router.get("/{model_version_id}/policy", response_model=VerdictPolicyRead)
def get_policy(model_version_id: IdPath, _actor: PharmacistActor, session: SessionDep, settings: SettingsDep,
               cost_matrix_version: Annotated[int | None, Query(ge=1, le=MAX_ID, description="Default: the active one.")] = None,
               ) -> VerdictPolicyRead:
    """The version's verdict thresholds under a cost-matrix version, refitted if it was fitted for another.

    What verdicts from this model use under those costs: a pharmacist can read what an edited (not yet
    activated) cost-matrix version would do to the accept threshold, the per-product miss rates and the
    review rates on validation before activating it.
    """
    return VerdictPolicyRead.model_validate(model_registry.policy_under(
        session, settings, model_version_id=model_version_id, cost_matrix_version=cost_matrix_version))


@router.post("/{model_version_id}/promote", response_model=ActiveModel, responses=problem_responses(409))
def promote(model_version_id: IdPath, body: PromoteRequest, actor: AdminActor, session: SessionDep,
            settings: SettingsDep, request: Request, background: BackgroundTasks) -> ActiveModel:
    """Apply the gate under the active cost matrix on validation; 409 lists each failed check and its numbers.

    `force: true` with a `reason` overrides a failed gate; the override is recorded in the history and the
    audit log. Every API process then serves the new version (pub/sub, or its poll).
    """
    # A slow step (scoring the active model on the candidate's validation split) runs first, outside the
    # transaction that locks the active state.
    ahead = promotion.evaluate_ahead_of_promote(request.app.state.db, settings, model_version_id=model_version_id)
    entry = promotion.promote(session, settings, model_version_id=model_version_id, actor=actor,
                              reason=body.reason, force=body.force, ahead=ahead,
                              expected_active=body.expected_active)
    background.add_task(_announce, request, settings, entry.to_model_version_id, "promote")
    return ActiveModel(active_model_version=entry.to_model_version_id, promotion=promotion_read(entry))
