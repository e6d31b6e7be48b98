"""Verifications: check the request, decide the verdict, write the audit record (flush; the route commits).

The route drives four steps around the inference engine:
1. `prepare`: the image's SHA-256, the idempotency check (replay or 422), the prescribed NDC against
   the catalog (unknown / ambiguous / malformed / inactive each get their own problem type), and the
   active cost-matrix version.
2. `check_served`: the served model must know the prescribed product (422 `product-not-in-model`).
3. `conclude`: the verdict (`Prediction.decide`: `models.decision.decide` with the serving version's stored
   policy) under the active cost matrix reindexed to the model's classes, the retained image (if
   configured) and the audit row, not yet written.
4. `record`: the audit row's INSERT (a lost Idempotency-Key race answers with the winner's body, or 422).
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import secrets
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from threading import Lock
from typing import Any

import torch
from PIL import Image
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.config import Settings
from app.errors import FieldError, InvalidInput, ServiceUnavailable
from app.inference.images import ImageLimits, sniff_format
from app.inference.served import Prediction, ProductNotServed, ServedModel
from app.ndc import NdcError, resolve_ndc
from app.orm import Product, Verification, json_time, utcnow
from app.services.cost_matrices import active_version_id, cost_matrix_of
from app.services.model_registry import model_version_id_of_label
from app.services.products import ndc_field_error
from app.services.verification_log import FeedbackExample as FeedbackExample  # re-export: labelled feedback
from app.services.verification_log import feedback_examples as feedback_examples  # for the training jobs
from models.costs import CostMatrix
from models.decision import Decision
from models.files import atomic_write

logger = logging.getLogger(__name__)

TOP_K = 5
_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


class IdempotencyKeyReused(InvalidInput):
    """The Idempotency-Key was already used by this API key for a different request (422)."""

    default_slug = "idempotency-key-reused"
    default_title = "Idempotency-Key reused with a different request"


@dataclass(frozen=True, slots=True)
class Prepared:
    """What `prepare` found: a stored answer to replay, or the checked inputs of a new verification."""

    image_sha256: str
    request_sha256: str
    replay: dict[str, Any] | None = None
    prescribed_ndc: str = ""
    cost_matrix_version_id: int = 0


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """What the audit row records about the upload (the pixels themselves only with retain_images)."""

    format: str
    width: int
    height: int


def request_fingerprint(*, image_sha256: str, prescribed_ndc_input: str, client_reference: str | None) -> str:
    """SHA-256 of what makes two requests the same request (for Idempotency-Key)."""
    canonical = json.dumps({"image_sha256": image_sha256, "prescribed_ndc": prescribed_ndc_input,
                            "client_reference": client_reference}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _replay_or_refuse(session: Session, *, api_key_id: int | None, idempotency_key: str,
                      request_sha256: str) -> dict[str, Any] | None:
    row = session.scalars(select(Verification).where(Verification.api_key_id == api_key_id,
                                                     Verification.idempotency_key == idempotency_key)).first()
    if row is None:
        return None
    if row.request_sha256 != request_sha256:
        raise IdempotencyKeyReused(
            "this Idempotency-Key was already used for a different request (image, NDC or client_reference "
            "differ); use a new key for a new request", extra={"verification_id": row.id},
            errors=[FieldError("header.Idempotency-Key", "already used for another request", "reused")])
    return dict(row.response)


def resolve_prescribed(session: Session, text: str) -> str:
    """The prescribed product key: 422 for malformed, ambiguous, unknown or inactive products."""
    products = {ndc: active for ndc, active in session.execute(select(Product.ndc, Product.active))}
    try:
        key = resolve_ndc(text, products).product_key
    except NdcError as exc:
        raise InvalidInput(f"prescribed_ndc: {exc}", slug=exc.slug, title="NDC not usable",
                           errors=[ndc_field_error(exc, "prescribed_ndc")],
                           extra={"ndc": exc.ndc, "candidates": list(exc.candidates)}) from exc
    if not products[key]:
        raise InvalidInput(f"product {key} is inactive in the catalog: it must not be dispensed automatically",
                           slug="product-inactive", title="The prescribed product is inactive",
                           errors=[FieldError("prescribed_ndc", f"{key} is inactive", "product-inactive")],
                           extra={"ndc": key})
    return key


def prepare(session: Session, *, image: bytes, prescribed_ndc_input: str, client_reference: str | None,
            api_key_id: int | None, idempotency_key: str | None) -> Prepared:
    """Step 1 (blocking; run it in a thread): hash, idempotency, NDC, active cost-matrix version."""
    image_sha256 = hashlib.sha256(image).hexdigest()
    request_sha256 = request_fingerprint(image_sha256=image_sha256, prescribed_ndc_input=prescribed_ndc_input,
                                         client_reference=client_reference)
    if idempotency_key is not None:
        replay = _replay_or_refuse(session, api_key_id=api_key_id, idempotency_key=idempotency_key,
                                   request_sha256=request_sha256)
        if replay is not None:
            return Prepared(image_sha256, request_sha256, replay=replay)
    key = resolve_prescribed(session, prescribed_ndc_input)
    version_id = active_version_id(session)
    if version_id is None:
        raise ServiceUnavailable("no cost-matrix version is active, so no verdict can be given",
                                 slug="cost-matrix-unavailable", title="No active cost matrix")
    return Prepared(image_sha256, request_sha256, prescribed_ndc=key, cost_matrix_version_id=version_id)


def check_served(classes: tuple[str, ...], *, prescribed_ndc: str, model_version: str) -> int:
    """Step 2: the index of the prescribed product among the served model's classes, or 422."""
    try:
        return classes.index(prescribed_ndc)
    except ValueError:
        raise ProductNotServed(f"product {prescribed_ndc} is in the catalog, but the served model (version "
                               f"{model_version}) was not trained on it, so it cannot verify this bottle",
                               errors=[FieldError("prescribed_ndc", f"{prescribed_ndc} is not one of the model's "
                                                  "classes", "product-not-in-model")],
                               extra={"ndc": prescribed_ndc, "model_version": model_version}) from None


def preprocess_upload(served: ServedModel, data: bytes, *, limits: ImageLimits) -> tuple[torch.Tensor, ImageInfo]:
    """Decode + the model's EvalPreset (blocking: run it in a thread), plus the upload's header facts."""
    tensor = served.preprocess(data, limits=limits)  # raises the image problems (413/415/422)
    image_format = sniff_format(data) or "unknown"
    with Image.open(io.BytesIO(data), formats=[image_format]) as image:  # header only: no pixels decoded
        width, height = image.size
    return tensor, ImageInfo(image_format, width, height)


_matrix_cache: OrderedDict[tuple[int, tuple[str, ...]], CostMatrix] = OrderedDict()
_matrix_lock = Lock()


def cost_matrix_for(session: Session, *, version_id: int, classes: tuple[str, ...]) -> CostMatrix:
    """A cost-matrix version over the model's classes (cached: versions are immutable)."""
    key = (version_id, classes)
    with _matrix_lock:
        if key in _matrix_cache:
            _matrix_cache.move_to_end(key)
            return _matrix_cache[key]
    matrix = cost_matrix_of(session, version_id, classes=classes)
    with _matrix_lock:
        _matrix_cache[key] = matrix
        while len(_matrix_cache) > 16:
            _matrix_cache.popitem(last=False)
    return matrix


def retain_image(settings: Settings, *, data: bytes, sha256: str, image_format: str) -> Path:
    """Store the upload under images_dir (temp file + rename, so never half-written) as a file of this
    request's own: `<sha256>-<random>.<ext>`, filed by its hash's first two hex digits.

    Not one file per distinct photo: a request whose audit row fails deletes the file it stored
    (`discard_unrecorded_image`), and a concurrent request with the same photo (a client's retry after a
    timeout) may be about to commit a row pointing at a shared file. A photo sent twice is stored twice.
    """
    target = (settings.images_dir / sha256[:2]
              / f"{sha256}-{secrets.token_hex(6)}.{_EXTENSIONS.get(image_format, 'bin')}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(target, prefix=".upload-") as handle:
            handle.write(data)
    except OSError as error:
        raise _storage_unavailable(error) from error
    return target


def _storage_unavailable(error: OSError) -> ServiceUnavailable:
    """A photo that RXVERIFY_RETAIN_IMAGES says to keep could not be written (a full or read-only disk):
    503 with the reason, so the client retries and the operator's alert on 503s fires (not a bare 500)."""
    logger.error("could not store the verification photo under the data dir: %s", error)
    reason = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
              errno.EROFS: "the disk is read-only"}.get(error.errno or 0, "the photo could not be written")
    return ServiceUnavailable(f"the service keeps every verification photo (RXVERIFY_RETAIN_IMAGES) and {reason}; "
                              "no verdict was given", slug="image-storage-unavailable",
                              title="Photo storage unavailable", headers={"Retry-After": "30"})


def discard_unrecorded_image(concluded: Concluded) -> None:
    """After the audit row failed to commit: delete the image this request stored (no row refers to it:
    each request stores its own file, see `retain_image`)."""
    if concluded.new_image is not None:
        concluded.new_image.unlink(missing_ok=True)


def response_body(row: Verification, *, decision: Decision, model_sha256: str,
                  policy_fitted: bool) -> dict[str, Any]:
    """The 200 body (also stored in the row, so an idempotent retry gets exactly the same answer)."""
    return {"id": row.id, "verdict": decision.verdict, "reason": decision.reason,
            "prescribed_ndc": decision.prescribed, "prescribed_ndc_input": row.prescribed_ndc_input,
            "predicted_ndc": decision.predicted, "probability_prescribed": decision.probability_prescribed,
            "expected_accept_cost": decision.expected_accept_cost,
            "accept_risk_threshold": decision.accept_risk_threshold,
            "policy_fitted_for_cost_matrix": policy_fitted, "unfamiliarity": decision.unfamiliarity,
            "top": [{"ndc": ndc, "probability": p} for ndc, p in decision.top],
            "conformal_set": list(decision.conformal_set), "model_version": row.model_version_id,
            "model_sha256": model_sha256, "cost_matrix_version": row.cost_matrix_version_id,
            "client_reference": row.client_reference, "image_sha256": row.image_sha256,
            "created_at": json_time(row.created_at)}


@dataclass(frozen=True, slots=True)
class Outcome:
    """What `record` stored: the body to send, and whether it is a replay of a concurrent twin."""

    body: dict[str, Any]
    decision: Decision | None
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class Concluded:
    """The verdict and its audit row, not yet written (`conclude`'s result, `record`'s input)."""

    row: Verification
    body: dict[str, Any]
    decision: Decision
    request_sha256: str  # the row's, typed (the Idempotency-Key check compares it)
    new_image: Path | None = None  # the image file this request stored (retain_images), to undo on failure


def conclude(session: Session, *, settings: Settings, prepared: Prepared, prediction: Prediction, image: bytes,
             image_info: ImageInfo, prescribed_ndc_input: str, client_reference: str | None,
             api_key_id: int | None, idempotency_key: str | None, latency_ms: float) -> Concluded:
    """Step 3 (blocking; run it in a thread): decide, retain the image if configured, build the audit row.

    It writes nothing to the database (it may read a cost-matrix version once, then it is cached), so
    that `record` alone needs the write lock.
    """
    matrix = cost_matrix_for(session, version_id=prepared.cost_matrix_version_id, classes=prediction.classes)
    # The serving version's own policy, refitted for this cost matrix if it was fitted for another one;
    # a model without one never auto-accepts (review_only).
    decision, policy_fitted = prediction.decide(prescribed=prepared.prescribed_ndc, cost_matrix=matrix,
                                                critical_cost=settings.critical_cost_threshold,
                                                max_accept_risk=settings.max_accept_risk,
                                                unfamiliar_photo_rate=settings.unfamiliar_photo_rate, top_k=TOP_K)
    image_path = (retain_image(settings, data=image, sha256=prepared.image_sha256, image_format=image_info.format)
                  if settings.retain_images else None)
    row = Verification(
        id=str(uuid.uuid4()), created_at=utcnow(), api_key_id=api_key_id, client_reference=client_reference,
        idempotency_key=idempotency_key, request_sha256=prepared.request_sha256,
        prescribed_ndc_input=prescribed_ndc_input, prescribed_ndc=decision.prescribed, verdict=decision.verdict,
        reason=decision.reason, predicted_ndc=decision.predicted,
        probability_prescribed=decision.probability_prescribed,
        expected_accept_cost=decision.expected_accept_cost, top=[], conformal_set=list(decision.conformal_set),
        model_version_id=model_version_id_of_label(prediction.model_version),
        cost_matrix_version_id=prepared.cost_matrix_version_id, image_sha256=prepared.image_sha256,
        image_path=str(image_path) if image_path else None, image_format=image_info.format,
        image_width=image_info.width, image_height=image_info.height, latency_ms=round(latency_ms, 3))
    body = response_body(row, decision=decision, model_sha256=prediction.served.weights_sha256,
                         policy_fitted=policy_fitted)
    row.top, row.response = body["top"], body
    return Concluded(row=row, body=body, decision=decision, request_sha256=prepared.request_sha256,
                     new_image=image_path)


def record(session: Session, concluded: Concluded) -> Outcome:
    """Step 4 (blocking): flush the audit row; a lost Idempotency-Key race answers with the winner's body."""
    row = concluded.row
    if row.idempotency_key is None:
        session.add(row)
        session.flush()
        return Outcome(body=concluded.body, decision=concluded.decision)
    try:
        # A savepoint, so that losing a race for the same Idempotency-Key leaves a usable transaction.
        with session.begin_nested():
            session.add(row)
    except IntegrityError:
        replay = _replay_or_refuse(session, api_key_id=row.api_key_id, idempotency_key=row.idempotency_key,
                                   request_sha256=concluded.request_sha256)
        if replay is None:
            raise
        return Outcome(body=replay, decision=None, replayed=True)
    return Outcome(body=concluded.body, decision=concluded.decision)
