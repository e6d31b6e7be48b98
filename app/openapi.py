"""The OpenAPI description as the service really answers: every error is application/problem+json.

FastAPI documents a `responses=` model under application/json and adds its own 422 schema
(HTTPValidationError) to every route with parameters; neither is what a client receives. `install_openapi`
rewrites the generated document once: each 4xx/5xx answer carries the `Problem` schema under
application/problem+json, and the answers every route can give are listed on every route (413 for any
body over RXVERIFY_MAX_REQUEST_BODY_BYTES; 400 malformed JSON and 415 for routes that take a body; 503 with
Retry-After when the database or the model is unavailable; 500), with the X-Request-ID header on each.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from app.schemas.common import Problem

PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
_REQUEST_ID = {"description": "The request's id (the client's own X-Request-ID when it sent one); problem "
                              "bodies repeat it as request_id, and every log line of the request carries it.",
               "schema": {"type": "string"}}
_RETRY_AFTER = {"description": "Seconds to wait before trying again.", "schema": {"type": "integer"}}
_ANY_ROUTE = {413: "The request body is larger than the service accepts (payload-too-large).",
              500: "An unexpected server fault (internal-error); the log line has the request id.",
              503: "The database, the broker or the model is unavailable for now (database-unavailable, "
                   "model-unavailable, inference-queue-full); try again after Retry-After."}
_BODY_ROUTE = {400: "The body could not be parsed (malformed-json, bad-request).",
               415: "The body's media type is not one this route takes (unsupported-media-type)."}
_METHODS = ("get", "post", "put", "patch", "delete")


def install_openapi(app: FastAPI) -> None:
    """Serve the rewritten document at /openapi.json (built on first request, then cached)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = problem_json_document(get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def problem_json_document(document: dict[str, Any]) -> dict[str, Any]:
    """Rewrite a generated OpenAPI document in place (see the module docstring) and return it."""
    components = document.setdefault("components", {}).setdefault("schemas", {})
    components.setdefault("Problem", Problem.model_json_schema(ref_template="#/components/schemas/{model}"))
    for path, item in document.get("paths", {}).items():
        for method in _METHODS:
            operation = item.get(method)
            if operation is None:
                continue
            responses = operation.setdefault("responses", {})
            if path.startswith("/v1/"):
                extra = {**_ANY_ROUTE, **(_BODY_ROUTE if "requestBody" in operation else {})}
                for status, description in extra.items():
                    responses.setdefault(str(status), {"description": description})
            for status, response in responses.items():
                if status.isdigit() and int(status) >= 400 and _is_problem(response):
                    response["content"] = {"application/problem+json": {"schema": PROBLEM_REF}}
                    if response.get("description") in (None, "", "Validation Error"):
                        response["description"] = "The request is invalid (validation-error; `errors` lists each field)."
                    if status == "503":
                        response.setdefault("headers", {})["Retry-After"] = _RETRY_AFTER
                response.setdefault("headers", {})["X-Request-ID"] = _REQUEST_ID
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    return document


def _is_problem(response: dict[str, Any]) -> bool:
    """An error answer documented with no schema, the Problem schema or FastAPI's validation error (not,
    say, /readyz's 503, which answers its Readiness body)."""
    refs = {media.get("schema", {}).get("$ref", "") for media in response.get("content", {}).values()}
    return refs <= {"", PROBLEM_REF["$ref"], "#/components/schemas/HTTPValidationError"}
