"""Training jobs (pharmacist): start (202 + Location), list, read with progress, cancel, resolved defaults."""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Query, Request, Response
from fastapi.responses import JSONResponse

from app.api.deps import KeyFirstRoute, PharmacistActor, SessionDep, SettingsDep
from app.api.paging import NEXT_LINK_RESPONSE, link_next_page
from app.orm import Role, TrainingJob
from app.schemas.common import NO_CONTROL_PATTERN, IdPath, IdQuery, problem_responses
from app.schemas.training_jobs import (
    HyperparameterDefaults,
    JobStatus,
    Method,
    TrainingJobCreate,
    TrainingJobRead,
    TrainingProgress,
)
from app.services import datasets as dataset_service
from app.services import training_jobs as service
from app.services.audit import Actor

router = APIRouter(route_class=KeyFirstRoute, prefix="/v1/admin/training-jobs", tags=["training jobs"],
                   responses=problem_responses(401, 403, 404, 422))


def celery_of(request: Request) -> Any:
    """The app's Celery client (one per app, built from its settings on first use)."""
    celery = getattr(request.app.state, "celery", None)
    if celery is None:
        from worker.celery_app import create_celery_app

        celery = create_celery_app(request.app.state.settings)
        request.app.state.celery = celery
    return celery


# An absolute path of two or more parts, as exception texts quote them ('/data/datasets/pmi/train/x.jpg').
_SERVER_PATH = re.compile(r"(?<![\w.:/])/(?:[^\s'\"/:,;()\[\]]+/)+[^\s'\"/:,;()\[\]]*")


def redact_server_paths(text: str) -> str:
    """`text` with absolute file paths replaced by `<server path>` (for roles below admin)."""
    return _SERVER_PATH.sub("<server path>", text)


def job_read(job: TrainingJob, actor: Actor, *, deduplicated: bool = False) -> TrainingJobRead:
    """The API form of a job row; file paths on the server (a failed job's traceback, paths quoted in its
    error) are for admins only."""
    progress = {k: v for k, v in (job.progress or {}).items() if k in TrainingProgress.model_fields}
    result = dict(job.result or {})
    error = job.error
    if not actor.role.includes(Role.ADMIN):
        result.pop("traceback", None)
        error = redact_server_paths(error) if error else error
    return TrainingJobRead(
        id=job.id, status=job.status, method=job.method, dataset=job.dataset_name,  # type: ignore[arg-type]
        dataset_id=job.dataset_id, include_feedback=job.include_feedback,
        feedback_through_id=job.feedback_through_id, base_model=job.base_model_version_id,
        cost_matrix_version=job.cost_matrix_version_id, hyperparameters=job.hyperparameters or {}, seed=job.seed,
        auto_promote=job.auto_promote, request_sha256=job.request_sha256, cancel_requested=job.cancel_requested,
        attempts=job.attempts, progress=TrainingProgress(**progress), result=result, error=error,
        result_model_version=job.result_model_version_id, created_by=job.created_by, created_at=job.created_at,
        started_at=job.started_at, finished_at=job.finished_at, updated_at=job.updated_at,
        deduplicated=deduplicated)


@router.post("", response_model=TrainingJobRead, status_code=202,
             responses={200: {"model": TrainingJobRead, "description": "An identical job already exists; it is "
                                                                       "returned (`deduplicated: true`)."},
                        **problem_responses(409)})
def create_job(body: TrainingJobCreate, actor: PharmacistActor, session: SessionDep, settings: SettingsDep,
               request: Request, background: BackgroundTasks) -> Response:
    """Queue a fine-tuning job; 202 with `Location`. An identical request returns the existing job with 200."""
    job_request = service.JobRequest(
        method=body.method, dataset=body.dataset, base_model=body.base_model,
        cost_matrix_version=body.cost_matrix_version, include_feedback=body.include_feedback,
        hyperparameters=body.hyperparameters.model_dump(exclude_none=True), seed=body.seed,
        auto_promote=body.auto_promote)
    job, created = service.create_job(session, request=job_request, actor=actor,
                                      auto_promote_default=settings.auto_promote)
    if created:
        # Background tasks run after the response, i.e. after the request's transaction has committed.
        background.add_task(service.dispatch_job, celery=celery_of(request), database=request.app.state.db,
                            job_id=job.id)
    read = job_read(job, actor, deduplicated=not created)
    return JSONResponse(read.model_dump(mode="json"), status_code=202 if created else 200,
                        headers={"Location": f"{router.prefix}/{job.id}"}, background=background)


@router.get("", response_model=list[TrainingJobRead], responses=NEXT_LINK_RESPONSE)
def list_jobs(actor: PharmacistActor, session: SessionDep, request: Request, response: Response,
              status: JobStatus | None = None, limit: Annotated[int, Query(ge=1, le=200)] = 50,
              before_id: IdQuery = None) -> list[TrainingJobRead]:
    """Jobs, newest first; page with `before_id` (the smallest id of the previous page, or the Link header)."""
    found = service.list_jobs(session, status=status, limit=limit, before_id=before_id)
    link_next_page(request, response, [job.id for job in found], limit=limit)
    return [job_read(job, actor) for job in found]


@router.get("/defaults", response_model=HyperparameterDefaults)
def hyperparameter_defaults(_actor: PharmacistActor, session: SessionDep,
                            dataset: Annotated[str, Query(min_length=1, max_length=100, pattern=NO_CONTROL_PATTERN)],
                            method: Method = "csada") -> HyperparameterDefaults:
    """The hyperparameters a job on this dataset gets when it names none."""
    registered = dataset_service.get_dataset(session, dataset)
    train_images = dataset_service.split_size(registered, "train")
    return HyperparameterDefaults(dataset=registered.name, method=method, train_images=train_images,
                                  hyperparameters=service.default_hyperparameters(method, train_images=train_images))


@router.get("/{job_id}", response_model=TrainingJobRead)
def get_job(job_id: IdPath, actor: PharmacistActor, session: SessionDep) -> TrainingJobRead:
    """One job: status, progress (epoch/step of total, loss, attack success rate, ETA, validation), result."""
    return job_read(service.get_job(session, job_id), actor)


@router.post("/{job_id}/cancel", response_model=TrainingJobRead, status_code=202, responses=problem_responses(409))
def cancel_job(job_id: IdPath, actor: PharmacistActor, session: SessionDep) -> TrainingJobRead:
    """Cancel: a queued job at once; a running job stops at its next step (`cancel_requested` until then)."""
    return job_read(service.request_cancel(session, job_id=job_id, actor=actor), actor)
