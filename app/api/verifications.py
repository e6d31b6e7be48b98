"""POST /v1/verifications (the verdict), the verification log and resolutions."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar
from urllib.parse import urlencode

from fastapi import APIRouter, Header, Path, Query, Request
from fastapi.responses import JSONResponse
from prometheus_client import Counter, Histogram
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.api.deps import ClientActor, KeyFirstRoute, PharmacistActor, SessionDep, SettingsDep
from app.api.verification_form import read_verification_form
from app.errors import DomainError, FieldError, InvalidInput
from app.inference.engine import ModelUnavailable
from app.inference.images import ImageLimits
from app.inference.served import ServedModel
from app.orm import Resolution, Verification
from app.problems import DATABASE_UNAVAILABLE
from app.schemas.common import IdQuery, problem_responses
from app.schemas.verifications import (
    ResolutionCreate,
    ResolutionRead,
    Verdict,
    VerificationDetail,
    VerificationPage,
    VerificationRead,
)
from app.services import serving
from app.services import verification_log as log
from app.services import verifications as service
from models.decision import CONFORMAL_GUARANTEE

UPLOAD_PATH = "/v1/verifications"  # POST: the one route whose body may be as large as max_request_body_bytes
router = APIRouter(route_class=KeyFirstRoute, prefix=UPLOAD_PATH, tags=["verifications"])
T = TypeVar("T")

VERIFICATION_SECONDS = Histogram(
    "rxverify_verification_duration_seconds", "POST /v1/verifications wall time, by outcome (verdict, replay, "
    "rejected).", ["outcome"], buckets=(0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))
VERDICTS = Counter("rxverify_verdicts_total", "Verdicts given, by verdict and model version.",
                   ["verdict", "model_version"])
UNFAMILIAR = Counter("rxverify_unfamiliar_photos_total", "Verdicts sent to review because the photo is unlike the "
                     "model's training photos (reason photo-unfamiliar), by model version: a jump after a camera, "
                     "lighting or supplier change means the model needs photos from the new conditions.",
                     ["model_version"])
REJECTED = Counter("rxverify_verification_rejected_total",
                   "Verification requests answered with a problem, by problem type.", ["reason"])

CREATE_DESCRIPTION = f"""
Send a top-down photo of the filled bottle and the prescribed NDC; get a cost-aware verdict.

**Contract: only a 200 answer with `verdict: match` lets a fill go without a pharmacist. Any non-200
answer, for whatever reason, means the pharmacist must check the bottle.** A `mismatch` names the
product the photo most likely shows (`predicted_ndc`); `review` sends the bottle to a pharmacist.

The verdict uses temperature-calibrated probabilities and the active cost matrix: the expected cost of
accepting is `sum over y != prescribed of p(y) * cost(y, prescribed)`. Thresholds are fitted per model
version on its validation split (no critical accept there, at the lowest review rate), never above
`RXVERIFY_MAX_ACCEPT_RISK` (default 0.05), and refitted for the active cost matrix when a pharmacist
changes it (`accept_risk_threshold`, `policy_fitted_for_cost_matrix`).

**Conformal guarantee** (`conformal_set`): {CONFORMAL_GUARANTEE}

Send `Idempotency-Key` (up to 200 characters) to retry safely: a retry with the same key returns the first
answer (header `Idempotent-Replayed: true`); the same key with another image, NDC or client_reference
gets 422 `idempotency-key-reused`. `client_reference` is an opaque transaction id: never a patient
identifier.

Problem types (`application/problem+json`, `type` = `https://rxverify.dev/problems/<slug>`):

| status | slug | meaning |
| --- | --- | --- |
| 400 | `malformed-multipart` | the multipart body cannot be parsed |
| 413 | `image-too-large` | the image is larger than the configured limit (refused while it streams in) |
| 415 | `unsupported-media-type` | the body is not multipart/form-data |
| 415 | `unsupported-image-format` | the file is not a JPEG, PNG or WebP (sniffed from its bytes, not its name) |
| 422 | `missing-part` | `image` or `prescribed_ndc` is missing |
| 422 | `validation-error` | a part is empty, too long, unexpected or duplicated; a bad header |
| 422 | `image-empty` | the image file has no bytes |
| 422 | `image-too-many-pixels` | the image declares more pixels than allowed (decompression bomb) |
| 422 | `corrupt-image` | the image is truncated or corrupt |
| 422 | `image-too-small` | a side of the image is shorter than `RXVERIFY_MIN_IMAGE_SIDE` pixels |
| 422 | `image-blank` | the photo has next to no contrast (covered lens, white or black frame): retake it |
| 422 | `animated-image` | an animated WebP or PNG: send one still photo |
| 422 | `malformed-ndc` | `prescribed_ndc` is not an NDC in any accepted form |
| 422 | `ambiguous-ndc` | a bare 10-digit NDC that matches several catalog products |
| 422 | `unknown-ndc` | a well-formed NDC whose product is not in the catalog |
| 422 | `product-inactive` | the prescribed product is inactive in the catalog |
| 422 | `product-not-in-model` | the product is in the catalog but the served model was not trained on it |
| 422 | `idempotency-key-reused` | the key was used for a different request |
| 503 | `model-unavailable` | no model is loaded (see `/readyz`) |
| 503 | `inference-queue-full` | too many requests in flight; retry after `Retry-After` seconds |
| 503 | `cost-matrix-unavailable` | no cost-matrix version is active |
| 503 | `database-unavailable` | the database is busy or unreachable; retry after `Retry-After` seconds |
| 503 | `image-storage-unavailable` | `RXVERIFY_RETAIN_IMAGES` is on and the photo could not be stored (disk full or read-only) |
"""

_FORM_SCHEMA: dict[str, Any] = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["image", "prescribed_ndc"],
    "properties": {
        "image": {"type": "string", "format": "binary", "description": "JPEG, PNG or WebP photo of the bottle."},
        "prescribed_ndc": {"type": "string", "maxLength": 64, "examples": ["0378-0208-01"],
                           "description": "Any NDC form (4-4-2, 5-3-2, 5-4-1, 5-4-2, 11 or 12 digits, 6-4-2)."},
        "client_reference": {"type": "string", "maxLength": 200,
                             "description": "Opaque transaction id (never a patient identifier)."},
    }}}}}}


@router.post("", response_model=VerificationRead, summary="Verify a filled bottle", description=CREATE_DESCRIPTION,
             openapi_extra=_FORM_SCHEMA, responses=problem_responses(400, 401, 403, 413, 415, 422, 503))
async def create_verification(
        request: Request, actor: ClientActor, session: SessionDep, settings: SettingsDep,
        idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", min_length=1, max_length=200,
                                                      pattern=r"^[\x21-\x7e]+$")] = None) -> JSONResponse:
    """Thin route: stream the form, check it, run the model in the engine, decide, write the audit row."""
    started = time.perf_counter()
    try:
        with serving.admitted(request.app):
            response, outcome = await _verify(request, actor_key_id=actor.key_id, session=session,
                                              idempotency_key=idempotency_key, started=started, settings=settings)
    except (DomainError, OperationalError, PoolTimeout) as error:  # the database errors: 503 by the handlers
        REJECTED.labels(reason=error.slug if isinstance(error, DomainError) else DATABASE_UNAVAILABLE).inc()
        VERIFICATION_SECONDS.labels(outcome="rejected").observe(time.perf_counter() - started)
        raise
    VERIFICATION_SECONDS.labels(outcome=outcome).observe(time.perf_counter() - started)
    return response


async def _verify(request: Request, *, actor_key_id: int | None, session: Session, idempotency_key: str | None,
                  started: float, settings: Any) -> tuple[JSONResponse, str]:
    limits = serving.limits_of(request.app)
    form = await read_verification_form(request, max_image_bytes=limits.max_bytes)
    engine = serving.engine_of(request.app)
    prepare = functools.partial(service.prepare, session, image=form.image, prescribed_ndc_input=form.prescribed_ndc,
                                client_reference=form.client_reference, api_key_id=actor_key_id,
                                idempotency_key=idempotency_key)
    with contextlib.ExitStack() as lease:
        try:
            served: ServedModel | None = lease.enter_context(engine.using_current())
        except ModelUnavailable:
            served = None  # an idempotent retry still gets its first answer
        # The database checks and the decode run side by side (two cores); their errors are reported in
        # that order: request problems (NDC, Idempotency-Key), the model, then the image.
        jobs: list[Awaitable[Any]] = [run_in_threadpool(prepare)]
        if served is not None:
            jobs.append(_decode(request, served, form.image, limits=limits))
        results = await asyncio.gather(*jobs, return_exceptions=True)
        prepared = _result(results[0], service.Prepared)
        # `prepare` only reads: end its transaction so the pooled connection is not held through the
        # queue wait and the forward pass (the pool must never be what bounds concurrency).
        await run_in_threadpool(session.commit)
        if prepared.replay is not None:
            return JSONResponse(prepared.replay, headers={"Idempotent-Replayed": "true"}), "replay"
        if served is None:
            raise ModelUnavailable("no model is loaded yet; a pharmacist must check this bottle")
        service.check_served(served.classes, prescribed_ndc=prepared.prescribed_ndc, model_version=served.version)
        tensor, image_info = _result(results[1], tuple)
        prediction = await engine.submit(tensor, served=served)
    conclude = functools.partial(
        service.conclude, session, settings=settings, prepared=prepared, prediction=prediction, image=form.image,
        image_info=image_info, prescribed_ndc_input=form.prescribed_ndc, client_reference=form.client_reference,
        api_key_id=actor_key_id, idempotency_key=idempotency_key, latency_ms=(time.perf_counter() - started) * 1000)
    outcome = await run_in_threadpool(_conclude_and_record, session, conclude)
    if outcome.replayed:
        return JSONResponse(outcome.body, headers={"Idempotent-Replayed": "true"}), "replay"
    assert outcome.decision is not None
    VERDICTS.labels(verdict=outcome.decision.verdict, model_version=prediction.model_version).inc()
    if outcome.decision.reason == "photo-unfamiliar":
        UNFAMILIAR.labels(model_version=prediction.model_version).inc()
    return JSONResponse(outcome.body), "verdict"


def _conclude_and_record(session: Session, conclude: Callable[[], service.Concluded]) -> service.Outcome:
    """Decide, then write and commit the audit row in the same thread call.

    Only the write and its commit hold the database's write queue (SQLite; taken at the INSERT and let
    go at COMMIT or ROLLBACK, see app.db._queue_sqlite_writes), so the write lock is never held across a
    return to the event loop, nor while an image is retained or a verdict policy refitted. Whatever
    `conclude` read is committed first, so that the write is a transaction of its own: were reads
    transactional on SQLite, one that read before another connection's commit could not write after it
    ("database is locked" at once, whatever the busy timeout).
    """
    concluded = conclude()
    session.commit()
    try:
        outcome = service.record(session, concluded)
        session.commit()
    except BaseException:
        session.rollback()  # a failed write (a lost Idempotency-Key race: 422) still holds SQLite's lock
        service.discard_unrecorded_image(concluded)
        raise
    return outcome


async def _decode(request: Request, served: ServedModel, image: bytes, *, limits: ImageLimits) -> Any:
    """Decode + preprocess in the thread pool, at most `max_concurrent_decodes` at once (the rest wait)."""
    async with serving.decode_slots_of(request.app):
        return await run_in_threadpool(service.preprocess_upload, served, image, limits=limits)


def _result(value: object, kind: type[T]) -> T:
    """A gathered result, or its exception re-raised."""
    if isinstance(value, BaseException):
        raise value
    assert isinstance(value, kind)
    return value


# Ids are UUIDs; anything else of this shape is a 404, anything else at all a 422.
VerificationId = Annotated[str, Path(pattern=r"^[A-Za-z0-9-]{1,36}$", description="The verification's `id`.")]


def _utc(value: datetime | None, field: str) -> datetime | None:
    # A time without a zone is read as UTC (the audit log stores UTC).
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00+01:00 is before year 1 in UTC
        raise InvalidInput(f"{field}: outside the range of dates", slug="validation-error",
                           errors=[FieldError(field, "outside the range of dates", "date_range")]) from None


def _resolution_read(resolution: Resolution, row: Verification) -> ResolutionRead:
    matches = None if resolution.actual_ndc is None else resolution.actual_ndc == row.prescribed_ndc
    return ResolutionRead(id=resolution.id, verification_id=row.id, actual_ndc=resolution.actual_ndc,
                          checked_by=resolution.resolved_by, recorded_by_key_id=resolution.resolved_by_key_id,
                          note=resolution.note, created_at=resolution.created_at,
                          matches_prescription=matches,
                          labelled_example=row.image_path is not None and resolution.actual_ndc is not None)


def _detail(row: Verification, resolution: Resolution | None) -> VerificationDetail:
    return VerificationDetail(**row.response, latency_ms=row.latency_ms, image_retained=row.image_path is not None,
                              resolution=_resolution_read(resolution, row) if resolution else None)


@router.get("", response_model=VerificationPage, responses=problem_responses(401, 403, 422))
def list_verifications(
        request: Request, _actor: PharmacistActor, session: SessionDep,
        created_from: Annotated[datetime | None, Query(description="Inclusive lower bound (ISO 8601; UTC if no "
                                                                   "zone).")] = None,
        created_before: Annotated[datetime | None, Query(description="Exclusive upper bound.")] = None,
        verdict: Verdict | None = None,
        ndc: Annotated[str | None, Query(max_length=32, description="Prescribed NDC (any form).")] = None,
        predicted_ndc: Annotated[str | None, Query(max_length=32, description="Predicted NDC (any form).")] = None,
        model_version: IdQuery = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        cursor: Annotated[str | None, Query(max_length=200, description="From a `next` link.")] = None,
) -> VerificationPage:
    """The verification log, newest first, with filters and keyset pagination (follow `next`)."""
    filters = log.LogFilter(created_from=_utc(created_from, "query.created_from"),
                            created_before=_utc(created_before, "query.created_before"), verdict=verdict,
                            ndc=ndc, predicted_ndc=predicted_ndc, model_version=model_version)
    rows, next_cursor = log.list_verifications(session, filters=filters, limit=limit, cursor=cursor)
    resolutions = log.latest_resolutions(session, [row.id for row in rows])
    next_link = None
    if next_cursor is not None:
        params = [(k, v) for k, v in request.query_params.multi_items() if k != "cursor"] + [("cursor", next_cursor)]
        next_link = f"{request.url.path}?{urlencode(params)}"
    return VerificationPage(items=[_detail(row, resolutions.get(row.id)) for row in rows], next=next_link)


@router.get("/{verification_id}", response_model=VerificationDetail, responses=problem_responses(401, 403, 404))
def get_verification(verification_id: VerificationId, _actor: PharmacistActor, session: SessionDep) -> VerificationDetail:
    """One audit record, with its newest resolution."""
    row = log.get_verification(session, verification_id)
    return _detail(row, log.latest_resolutions(session, [row.id]).get(row.id))


@router.post("/{verification_id}/resolution", response_model=ResolutionRead, status_code=201,
             responses=problem_responses(401, 403, 404, 422))
def create_resolution(verification_id: VerificationId, body: ResolutionCreate, actor: PharmacistActor,
                      session: SessionDep) -> ResolutionRead:
    """Record what was really in the bottle; with a retained image it becomes a labelled training example."""
    resolution, row = log.add_resolution(session, verification_id=verification_id, actual_ndc=body.actual_ndc,
                                         checked_by=body.checked_by, note=body.note, actor=actor)
    return _resolution_read(resolution, row)
