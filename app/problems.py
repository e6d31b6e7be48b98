"""RFC 9457 problem details: the one place that turns every error into application/problem+json."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import DataError, IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from app.errors import DomainError
from app.log import current_request_id
from app.ndc import NdcError

logger = logging.getLogger(__name__)

PROBLEM_BASE = "https://rxverify.dev/problems/"
PROBLEM_MEDIA_TYPE = "application/problem+json"
DATABASE_UNAVAILABLE = "database-unavailable"  # the slug of every database error's 503
CLIENT_CLOSED_REQUEST = 499  # the status recorded (metrics, access log) when the client left mid-request
MAX_REPORTED_ERRORS = 20  # a problem lists at most this many field errors, and `error_count` says how many there were
_HTTP_SLUGS = {400: "bad-request", 404: "not-found", 405: "method-not-allowed", 406: "not-acceptable",
               413: "payload-too-large", 415: "unsupported-media-type", 429: "too-many-requests"}


def problem_type(slug: str) -> str:
    """The type URI of a problem slug."""
    return PROBLEM_BASE + slug


def problem_response(*, status: int, slug: str, detail: str, title: str | None = None,
                     instance: str | None = None, errors: Sequence[dict[str, Any]] | None = None,
                     extra: dict[str, Any] | None = None, headers: dict[str, str] | None = None,
                     error_count: int | None = None) -> JSONResponse:
    """Build a problem+json response; the request id is included so operators can find the log line.

    `error_count`: how many errors there were in all, when `errors` holds only the first of them.
    """
    body: dict[str, Any] = {
        "type": problem_type(slug),
        "title": title or HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
    }
    if instance:
        body["instance"] = instance
    if errors:
        # Bounded: one body of many bad fields (a million unknown keys) must not become a response of
        # tens of megabytes built on the event loop.
        body["errors"] = list(errors[:MAX_REPORTED_ERRORS])
        total = max(len(errors), error_count or 0)
        if total > MAX_REPORTED_ERRORS:
            body["error_count"] = total
    request_id = current_request_id()
    if request_id:
        body["request_id"] = request_id
    for key, value in (extra or {}).items():
        body.setdefault(key, value)
    return JSONResponse(body, status_code=status, media_type=PROBLEM_MEDIA_TYPE, headers=headers)


def field_pointer(loc: Sequence[Any]) -> str:
    """`("body", "changes", 2, "cost")` -> `changes[2].cost`; query/path/header locations keep a prefix."""
    parts = list(loc)
    prefix = ""
    if parts and parts[0] in ("body", "query", "path", "header", "cookie"):
        source = parts.pop(0)
        prefix = "" if source == "body" else f"{source}."
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + str(part)
    return prefix + text if (prefix + text) else "body"


async def _domain_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DomainError)
    return problem_response(status=exc.status, slug=exc.slug, title=exc.title, detail=exc.detail,
                            instance=request.url.path, errors=[e.to_dict() for e in exc.errors],
                            extra=exc.extra, headers=exc.headers or None)


async def _ndc_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, NdcError)
    return problem_response(status=422, slug=exc.slug, title="NDC not usable", detail=str(exc),
                            instance=request.url.path,
                            extra={"ndc": exc.ndc, "candidates": list(exc.candidates)})


def _is_json(media_type: str) -> bool:
    return media_type == "application/json" or media_type.endswith("+json")


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    raw = list(exc.errors())
    json_errors = [e for e in raw if e.get("type") == "json_invalid"]
    if json_errors:
        reason = (json_errors[0].get("ctx") or {}).get("error", "syntax error")
        return problem_response(status=400, slug="malformed-json", title="Malformed JSON",
                                detail=f"The request body is not valid JSON: {reason}",
                                instance=request.url.path)
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    # FastAPI reads a body it does not take for JSON (another media type, or none) as bytes and reports
    # "not a valid dictionary"; the real mistake is the media type. (A missing body is a plain 422.)
    body_sent = any(tuple(e.get("loc", ()))[:1] == ("body",) and e.get("type") != "missing" for e in raw)
    if not _is_json(media_type) and body_sent:
        said = f"the request says {media_type[:100]}" if media_type else "the request has no Content-Type"
        return problem_response(status=415, slug="unsupported-media-type", title="Unsupported media type",
                                detail=f"This endpoint takes application/json; {said}",
                                instance=request.url.path)
    errors = [{"field": field_pointer(e.get("loc", ())), "message": str(e.get("msg", "invalid")),
               "code": str(e.get("type", "invalid"))} for e in raw[:MAX_REPORTED_ERRORS]]
    summary = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:3])
    more = f" (and {len(raw) - 3} more)" if len(raw) > 3 else ""
    return problem_response(status=422, slug="validation-error", title="Request validation failed",
                            detail=f"{summary}{more}", instance=request.url.path, errors=errors,
                            error_count=len(raw))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    slug = _HTTP_SLUGS.get(status, f"http-{status}")
    detail = str(exc.detail)
    if status == 404 and detail == "Not Found":
        detail = f"No resource at {request.method} {request.url.path}"
    elif status == 405:
        detail = f"Method {request.method} is not allowed on {request.url.path}"
    elif status == 400 and detail == "There was an error parsing the body":
        slug = "malformed-body"
        cause = exc.__cause__  # FastAPI raises this from the parser's own error, which says what was wrong
        if isinstance(cause, UnicodeDecodeError):
            detail = f"The request body is not UTF-8 text: {cause.reason} at byte {cause.start}"
        elif isinstance(cause, ValueError):
            detail = f"The request body could not be parsed: {str(cause)[:200]}"
    return problem_response(status=status, slug=slug, detail=detail, instance=request.url.path,
                            headers=dict(exc.headers) if exc.headers else None)


async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    logger.warning("database operational error", exc_info=exc)
    return problem_response(status=503, slug=DATABASE_UNAVAILABLE, title="Database unavailable",
                            detail="The database is busy or unreachable; retry shortly.",
                            instance=request.url.path, headers={"Retry-After": "1"})


async def _client_disconnected(request: Request, exc: Exception) -> Response:
    # The client went away mid-upload (a dropped pharmacy link): nobody reads this answer, and it is
    # not a server error. 499 (nginx's "client closed request") keeps it out of 5xx alerting.
    logger.info("client disconnected before its request was read: %s %s", request.method, request.url.path)
    return Response(status_code=CLIENT_CLOSED_REQUEST)


async def _integrity_error(request: Request, exc: Exception) -> JSONResponse:
    logger.info("integrity error mapped to 409", exc_info=exc)
    return problem_response(status=409, slug="conflict", title="Conflict with the current state",
                            detail="The change conflicts with data that already exists.",
                            instance=request.url.path)


async def _data_error(request: Request, exc: Exception) -> JSONResponse:
    # A value the database cannot hold (out of range, not text): the request validators should have
    # refused it first, so this is a backstop, logged so that the missing check can be added.
    logger.warning("database refused a value; mapped to 422", exc_info=exc)
    return problem_response(status=422, slug="validation-error", title="Invalid input",
                            detail="A value in the request cannot be stored or compared (out of range or not text).",
                            instance=request.url.path)


async def unhandled_error(request: Request, exc: Exception) -> JSONResponse:
    """Last resort (500): log with the traceback, answer without internals."""
    logger.error("unhandled error", exc_info=exc)
    return internal_error_response(request.url.path)


def internal_error_response(path: str | None) -> JSONResponse:
    """The 500 problem; the request id lets an operator find the traceback in the logs."""
    return problem_response(status=500, slug="internal-error", title="Internal server error",
                            detail="An unexpected error occurred. It has been logged with this request id.",
                            instance=path)


def install_problem_handlers(app: FastAPI) -> None:
    """Register every exception handler on `app`."""
    app.add_exception_handler(DomainError, _domain_error)
    app.add_exception_handler(NdcError, _ndc_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(OperationalError, _database_unavailable)
    app.add_exception_handler(PoolTimeout, _database_unavailable)  # every pooled connection in use
    app.add_exception_handler(ClientDisconnect, _client_disconnected)
    app.add_exception_handler(IntegrityError, _integrity_error)
    app.add_exception_handler(DataError, _data_error)
    app.add_exception_handler(Exception, unhandled_error)
