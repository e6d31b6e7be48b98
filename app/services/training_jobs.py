"""Training jobs: validated requests, deduplication, listing and cooperative cancellation.

A request is resolved before it is stored: the base model and cost-matrix version default to the active
ones, the hyperparameters to the documented defaults for the dataset's size. The SHA-256 of that
resolved request identifies it, and a partial unique index lets at most one queued, running or succeeded
job hold it, so identical requests get the existing job back. The Celery task is sent by the caller AFTER
the commit (`dispatch_job`), carrying only the job id.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.errors import Conflict, FieldError, Forbidden, InvalidInput, NotFound
from app.orm import CostMatrixVersion, ModelVersion, Resolution, Role, TrainingJob, utcnow
from app.services import datasets as dataset_service
from app.services.audit import Actor, record_change
from app.services.cost_matrices import active_version_id
from app.services.model_registry import active_model_version

logger = logging.getLogger(__name__)

TRAIN_TASK = "rxverify.training.run_job"
LIVE_STATUSES = ("queued", "running", "succeeded")
FINISHED_STATUSES = ("succeeded", "failed", "cancelled")
CSADA_OPTIONS = ("lam", "eps", "steps", "step_size", "tau", "norm", "sign")
METHOD_OPTIONS = {"csada": CSADA_OPTIONS, "ap": ("alpha",)}
TRAIN_OPTIONS = ("epochs", "batch_size", "lr", "optimizer", "weight_decay", "scheduler", "freeze_bn")
LARGE_DATASET = 2000  # train images from which the paper's PMI recipe is the default


@dataclass(frozen=True, slots=True)
class JobRequest:
    """A training request as received (None: take the default)."""

    method: str
    dataset: str
    base_model: int | None = None
    cost_matrix_version: int | None = None
    include_feedback: bool = False
    hyperparameters: dict[str, Any] | None = None
    seed: int = 0
    auto_promote: bool | None = None


def default_hyperparameters(method: str, *, train_images: int) -> dict[str, Any]:
    """The documented defaults for a method and a train split of this size (see HYPERPARAMETER_DOC)."""
    large = train_images >= LARGE_DATASET
    values: dict[str, Any] = {"optimizer": "adam", "weight_decay": 0.0, "freeze_bn": True,
                              "batch_size": 32 if large else 16}
    if method == "csada":
        # The paper's PMI run: 10 epochs at lr 1e-7, eps 1, K 50, eta_2 1e-4, lambda 2, tau 3.
        values.update(epochs=10 if large else 5, lr=1e-7 if large else 1e-4, scheduler="none",
                      lam=2.0, eps=1.0, steps=50 if large else 10, step_size=1e-4 if large else 1e-3,
                      tau=3.0, norm="linf", sign=False)
    else:
        values.update(epochs=50 if large else 10, lr=1e-5 if large else 1e-4,
                      scheduler="step" if large else "none")
    if method == "ap":
        values["alpha"] = 5.0
    return values


def resolve_hyperparameters(method: str, given: dict[str, Any], *, train_images: int) -> dict[str, Any]:
    """Defaults overlaid with the given values; 422 for options of another method."""
    allowed = set(TRAIN_OPTIONS) | set(METHOD_OPTIONS.get(method, ()))
    wrong = sorted(name for name, value in given.items() if value is not None and name not in allowed)
    if wrong:
        raise InvalidInput(f"hyperparameters {', '.join(wrong)} do not apply to method {method}",
                           errors=[FieldError(f"hyperparameters.{name}", f"not an option of method {method}",
                                              "not_applicable") for name in wrong])
    values = default_hyperparameters(method, train_images=train_images)
    values.update({name: value for name, value in given.items() if value is not None})
    return values


def request_sha256(payload: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of a resolved request."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _invalid(field: str, message: str, *, code: str = "invalid", slug: str = "invalid-training-request") -> InvalidInput:
    return InvalidInput(message, slug=slug, errors=[FieldError(field, message, code)])


def _base_model(session: Session, requested: int | None) -> ModelVersion:
    if requested is None:
        active = active_model_version(session)
        if active is None:
            raise _invalid("base_model", "no model is active; name a registered model version as base_model",
                           code="required")
        return active
    version = session.get(ModelVersion, requested)
    if version is None:
        raise _invalid("base_model", f"model version {requested} does not exist", code="not_found")
    return version


def _cost_matrix_version(session: Session, requested: int | None) -> int:
    version_id = requested if requested is not None else active_version_id(session)
    if version_id is None:
        raise _invalid("cost_matrix_version", "no cost-matrix version is active; name one", code="required")
    if session.get(CostMatrixVersion, version_id) is None:
        raise _invalid("cost_matrix_version", f"cost-matrix version {version_id} does not exist", code="not_found")
    return version_id


def live_job(session: Session, request_sha256: str) -> TrainingJob | None:
    """The queued or running job made from an identical request, if any."""
    return session.scalars(select(TrainingJob).where(TrainingJob.request_sha256 == request_sha256,
                                                     TrainingJob.status.in_(LIVE_STATUSES))).first()


def create_job(session: Session, *, request: JobRequest, actor: Actor,
               auto_promote_default: bool) -> tuple[TrainingJob, bool]:
    """Validate and store a job; returns (job, created). An identical live job is returned instead."""
    if request.auto_promote and not actor.role.includes(Role.ADMIN):
        # Promotion is an admin's decision; a job that promotes itself is one taken in advance.
        raise Forbidden("auto_promote: true needs the admin role (promotion is admin-only); leave it out and "
                        "ask an admin to promote the finished job's model", extra={"required_role": "admin",
                                                                                  "role": actor.role.value})
    try:
        dataset = dataset_service.get_dataset(session, request.dataset)
    except NotFound as error:
        raise _invalid("dataset", error.detail, code="not_found") from None
    base = _base_model(session, request.base_model)
    classes = sorted((dataset.counts or {}).get("train", {}))
    if sorted(base.classes) != classes:
        raise _invalid("dataset", f"dataset {dataset.name!r} has classes {classes} but base model {base.id} "
                       f"has {sorted(base.classes)}; they must be the same products", code="classes_mismatch")
    if base.output_kind == "costs" and request.method != "sosr":
        raise _invalid("method", f"base model {base.id} regresses costs (SOSR); method {request.method} needs a "
                       "logits model", code="incompatible_base")
    cost_matrix_version = _cost_matrix_version(session, request.cost_matrix_version)
    train_images = dataset_service.split_size(dataset, "train")
    hyperparameters = resolve_hyperparameters(request.method, dict(request.hyperparameters or {}),
                                              train_images=train_images)
    if hyperparameters["batch_size"] > max(train_images, 1):
        raise _invalid("hyperparameters.batch_size", f"batch_size {hyperparameters['batch_size']} exceeds the "
                       f"{train_images} training images")
    feedback_through = None
    if request.include_feedback:
        feedback_through = session.scalar(select(func.max(Resolution.id))) or 0
    auto_promote = auto_promote_default if request.auto_promote is None else request.auto_promote
    # auto_promote is part of the identity: an admin's self-promoting job is not the same request as an
    # otherwise identical one that waits for a human, and must not be answered with it.
    digest = request_sha256({
        "base_model": base.id, "cost_matrix_version": cost_matrix_version, "method": request.method,
        "dataset": {"id": dataset.id, "fingerprint": dataset.fingerprint}, "hyperparameters": hyperparameters,
        "seed": request.seed, "include_feedback": request.include_feedback, "feedback_through": feedback_through,
        "auto_promote": auto_promote})
    existing = live_job(session, digest)
    if existing is not None:
        return existing, False
    job = TrainingJob(status="queued", method=request.method, dataset_id=dataset.id, dataset_name=dataset.name,
                      include_feedback=request.include_feedback, feedback_through_id=feedback_through,
                      base_model_version_id=base.id, cost_matrix_version_id=cost_matrix_version,
                      hyperparameters=hyperparameters, seed=request.seed, auto_promote=auto_promote,
                      request_sha256=digest, progress={"phase": "queued"}, result={}, created_by=actor.name)
    try:
        with session.begin_nested():  # a savepoint: losing the race below must not end the transaction
            session.add(job)
            session.flush()
    except IntegrityError as error:
        if "request_sha256" not in str(error.orig):
            raise
        # The partial unique index: an identical request committed between our check and this insert.
        # Answer it as the check above would have, with the job that won.
        winner = live_job(session, digest)
        if winner is not None:
            return winner, False
        raise Conflict("an identical training job was created at the same moment; repeat the request to get it",
                       slug="duplicate-training-job", extra={"request_sha256": digest}) from error
    record_change(session, actor=actor, action="training_job.create", entity_type="training_job", entity_id=job.id,
                  details={"method": job.method, "dataset": dataset.name, "base_model": base.id,
                           "cost_matrix_version": cost_matrix_version, "seed": job.seed,
                           "auto_promote": auto_promote, "request_sha256": digest})
    return job, True


def get_job(session: Session, job_id: int) -> TrainingJob:
    """A job by id (404 otherwise)."""
    job = session.get(TrainingJob, job_id)
    if job is None:
        raise NotFound(f"training job {job_id} does not exist", slug="training-job-not-found")
    return job


def list_jobs(session: Session, *, status: str | None = None, limit: int = 50,
              before_id: int | None = None) -> list[TrainingJob]:
    """Newest first, keyset-paginated by id."""
    query = select(TrainingJob).order_by(TrainingJob.id.desc()).limit(limit)
    if status:
        query = query.where(TrainingJob.status == status)
    if before_id is not None:
        query = query.where(TrainingJob.id < before_id)
    return list(session.scalars(query))


def request_cancel(session: Session, *, job_id: int, actor: Actor) -> TrainingJob:
    """Cancel a queued job now, or ask a running one to stop at its next step (409 once it has finished)."""
    job = get_job(session, job_id)
    now = utcnow()
    # Conditional updates: the worker may claim the job between our read and our write.
    queued = session.execute(update(TrainingJob).where(TrainingJob.id == job_id, TrainingJob.status == "queued")
                             .values(status="cancelled", cancel_requested=True, finished_at=now,
                                     progress={**(job.progress or {}), "phase": "cancelled"}))
    if queued.rowcount == 0:  # type: ignore[attr-defined]
        running = session.execute(update(TrainingJob)
                                  .where(TrainingJob.id == job_id, TrainingJob.status == "running")
                                  .values(cancel_requested=True))
        if running.rowcount == 0:  # type: ignore[attr-defined]
            session.refresh(job)
            raise Conflict(f"training job {job_id} has already {job.status}; there is nothing to cancel",
                           slug="training-job-finished", extra={"status": job.status})
    session.flush()
    session.refresh(job)
    record_change(session, actor=actor, action="training_job.cancel", entity_type="training_job", entity_id=job_id,
                  details={"status": job.status})
    return job


def mark_dispatched(session: Session, *, job_id: int, task_id: str) -> None:
    """Remember the Celery task id of a job's first message (unless the worker already wrote its own)."""
    session.execute(update(TrainingJob).where(TrainingJob.id == job_id, TrainingJob.celery_task_id.is_(None))
                    .values(celery_task_id=task_id))


def dispatch_job(*, celery: Any, database: Any, job_id: int) -> str | None:
    """Send the job's task (call AFTER the commit) and record its id; None when the broker refused it.

    A job whose message never left stays queued without a task id; the workers' lease reaper sends it.
    """
    try:
        result = celery.send_task(TRAIN_TASK, args=[job_id])
    except Exception:
        logger.exception("could not send training job %s to the broker; the reaper will retry", job_id)
        return None
    with database.session() as session:
        mark_dispatched(session, job_id=job_id, task_id=str(result.id))
    return str(result.id)

