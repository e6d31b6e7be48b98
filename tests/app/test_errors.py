"""Every error is RFC 9457 problem+json: 404, 405, 413, malformed bodies, 500 and a lost database."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Request

from app.config import Settings
from app.main import create_app
from app.orm import CostMatrixVersion
from tests.app.factories import FURO, GLIP, change, count_rows, edit
from tests.conftest import ApiEnv

PROBLEM = "application/problem+json"


def _problem(response: Any, status: int, slug: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body: dict[str, Any] = response.json()
    assert body["type"] == f"https://rxverify.dev/problems/{slug}"
    assert body["status"] == status and body["title"] and body["detail"]
    assert body["request_id"] == response.headers["x-request-id"]
    return body


def test_unknown_route_is_404(env: ApiEnv) -> None:
    body = _problem(env.client.get("/v1/nothing-here"), 404, "not-found")
    assert body["instance"] == "/v1/nothing-here"


def test_wrong_method_is_405_with_allow(env: ApiEnv) -> None:
    response = env.client.delete("/v1/products", headers=env.as_role("admin"))
    _problem(response, 405, "method-not-allowed")
    assert response.headers["allow"] == "GET"


def test_an_unknown_query_parameter_is_422_not_ignored(env: ApiEnv) -> None:
    pharmacist = env.as_role("pharmacist")
    # A misspelt filter would otherwise answer with the whole, unfiltered log.
    response = env.client.get("/v1/verifications", params={"verdit": "mismatch", "limit": 5}, headers=pharmacist)
    body = _problem(response, 422, "unknown-query-parameter")
    assert body["errors"] == [{"field": "query.verdit", "message": "unknown query parameter", "code": "unknown"}]
    assert "verdict" in body["detail"] and "limit" in body["detail"]
    body = _problem(env.client.get(f"/v1/products/{FURO}?x=1&a=2", headers=pharmacist), 422, "unknown-query-parameter")
    assert [error["field"] for error in body["errors"]] == ["query.a", "query.x"] and "takes: none" in body["detail"]
    # Authentication still comes first, and the known parameters still work.
    assert env.client.get("/v1/verifications?verdit=mismatch").status_code == 401
    assert env.client.get("/v1/verifications?verdict=mismatch&limit=5", headers=pharmacist).status_code == 200
    assert env.client.get("/v1/admin/cost-matrices/diff?from=1&to=active", headers=pharmacist).status_code == 200


def test_empty_and_non_json_bodies(env: ApiEnv) -> None:
    pharmacist = env.as_role("pharmacist")
    empty = env.client.post("/v1/admin/cost-matrices", headers={**pharmacist, "Content-Type": "application/json"})
    assert _problem(empty, 422, "validation-error")["errors"][0]["field"] == "body"
    as_text = env.client.post("/v1/admin/cost-matrices", content="parent=1", headers={**pharmacist,
                                                                                      "Content-Type": "text/plain"})
    _problem(as_text, 415, "unsupported-media-type")
    # Valid JSON under another media type is refused for its media type, not as "not a dictionary".
    json_as_text = env.client.post("/v1/admin/cost-matrices", content='{"parent_version": 1}',
                                   headers={**pharmacist, "Content-Type": "text/plain; charset=utf-8"})
    assert "application/json" in _problem(json_as_text, 415, "unsupported-media-type")["detail"]
    array = env.client.post("/v1/admin/cost-matrices", json=[1, 2], headers=pharmacist)
    _problem(array, 422, "validation-error")


def test_streamed_body_over_the_limit_is_413(sqlite_settings: Settings, make_client: Any, api_key: Any) -> None:
    settings = sqlite_settings.model_copy(update={"max_request_body_bytes": 4096, "max_upload_bytes": 1024})
    client = make_client(settings)

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while reading
        yield b'{"parent_version": 1, "reason": "'
        for _ in range(20):
            yield b"x" * 500
        yield b'", "changes": []}'

    response = client.post("/v1/admin/cost-matrices", content=chunks(),
                           headers={"X-API-Key": api_key(settings, "pharmacist"), "Content-Type": "application/json"})
    _problem(response, 413, "payload-too-large")
    declared = client.post("/v1/admin/cost-matrices", content=b"x" * 5000,
                           headers={"Content-Type": "application/json"})
    _problem(declared, 413, "payload-too-large")
    assert count_rows(settings, CostMatrixVersion) == 0


def test_a_json_body_is_held_to_the_small_limit_and_its_errors_are_bounded(env: ApiEnv, make_client: Any) -> None:
    """One pharmacist request of a million unknown keys made a 92 MB answer and stalled the API for
    seconds: JSON routes take max_small_body_bytes, and a problem lists at most 20 field errors."""
    pharmacist = env.as_role("pharmacist")
    many = {"parent_version": 1, "reason": "x", "changes": [], **{f"k{i}": 1 for i in range(500)}}
    body = _problem(env.client.post("/v1/admin/cost-matrices", json=many, headers=pharmacist), 422, "validation-error")
    assert len(body["errors"]) == 20 and body["error_count"] == 501 and "(and 498 more)" in body["detail"]
    few = _problem(env.client.post("/v1/admin/cost-matrices", json={"parent_version": 1, "reason": "x"},
                                   headers=pharmacist), 422, "validation-error")
    assert "error_count" not in few

    small = env.settings.model_copy(update={"max_small_body_bytes": 4096})
    client = make_client(small)
    padded = {"parent_version": 1, "reason": "x" * 1500, "changes": [change(FURO, GLIP, 2)] * 40}
    refused = _problem(client.post("/v1/admin/cost-matrices", json=padded, headers=pharmacist), 413,
                       "payload-too-large")
    assert "4096 bytes" in refused["detail"]
    # The photo upload keeps the large limit: its body is refused for what it is, not for its size.
    photo = client.post("/v1/verifications", files={"image": ("a.jpg", b"x" * 6000, "image/jpeg")},
                        data={"prescribed_ndc": FURO}, headers=env.as_role("client"))
    assert photo.status_code != 413, photo.text


def test_bodies_that_cannot_be_read_say_why(env: ApiEnv) -> None:
    pharmacist = env.as_role("pharmacist")
    unlabelled = env.client.post("/v1/admin/cost-matrices", content=b'{"parent_version": 1}',
                                 headers={**pharmacist, "Content-Type": ""})
    assert "no Content-Type" in _problem(unlabelled, 415, "unsupported-media-type")["detail"]
    json_headers = {**pharmacist, "Content-Type": "application/json"}
    latin1 = env.client.post("/v1/admin/cost-matrices", content='{"reason": "caf\u00e9"}'.encode("latin-1"),
                             headers=json_headers)
    assert "not UTF-8" in _problem(latin1, 400, "malformed-body")["detail"]
    huge_number = env.client.post("/v1/admin/cost-matrices", content=b'{"parent_version": ' + b"9" * 5000 + b"}",
                                  headers=json_headers)
    assert "digits" in _problem(huge_number, 400, "malformed-body")["detail"]


def test_a_trailing_slash_is_404_not_a_redirect(env: ApiEnv) -> None:
    response = env.client.get("/v1/products/", headers={"Host": "evil.example"}, follow_redirects=False)
    _problem(response, 404, "not-found")
    assert "location" not in response.headers


def test_the_http_server_bounds_request_headers(sqlite_settings: Settings, monkeypatch: Any) -> None:
    """httptools held a 200 MB header in memory and answered it; `rxverify serve` runs h11 with a bound."""
    import uvicorn

    from app.commands.runtime import run_api

    seen: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: seen.update(kwargs))
    run_api(sqlite_settings.model_copy(update={"max_request_header_bytes": 32768}), host="127.0.0.1", port=1,
            worker=False)
    assert seen["http"] == "h11" and seen["h11_max_incomplete_event_size"] == 32768


def _client_with_a_route_that_raises(settings: Settings, make_client: Any, path: str, error: Exception) -> Any:
    """A client of the real app plus one GET `path` whose handler raises `error`."""
    app = create_app(settings)
    router = APIRouter()

    @router.get(path)
    def raises() -> None:
        raise error

    app.include_router(router)
    return make_client(settings, app=app, raise_server_exceptions=False)


def test_unhandled_error_is_a_500_problem_without_internals(sqlite_settings: Settings, make_client: Any) -> None:
    client = _client_with_a_route_that_raises(sqlite_settings, make_client, "/boom",
                                              RuntimeError("secret internal detail"))
    response = client.get("/boom", headers={"X-Request-ID": "trace-me-123"})
    body = _problem(response, 500, "internal-error")
    assert "secret" not in response.text and body["request_id"] == "trace-me-123"


def test_lost_database_is_503_and_not_ready(tmp_path: Any, make_client: Any) -> None:
    settings = Settings(data_dir=tmp_path, database_url="postgresql+psycopg://nobody@127.0.0.1:1/none",
                        readiness_timeout_s=1)
    client = make_client(settings, raise_server_exceptions=False)
    response = client.get("/v1/products", headers={"X-API-Key": "rxv_abc_def"})
    assert _problem(response, 503, "database-unavailable") and response.headers["retry-after"] == "1"
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["database"]["ok"] is False
    assert client.get("/healthz").status_code == 200  # liveness does not depend on the database


def test_problem_details_name_the_fields(env: ApiEnv) -> None:
    response = env.client.post("/v1/admin/cost-matrices", json=edit(1, change(FURO, GLIP, 2), change(GLIP, FURO, "x")),
                               headers=env.as_role("pharmacist"))
    body = _problem(response, 422, "validation-error")
    assert body["errors"] == [{"field": "changes[1].cost", "message": "Input should be a valid number",
                               "code": "float_type"}]
    assert body["detail"].startswith("changes[1].cost:")


def test_an_exhausted_connection_pool_is_503(sqlite_settings: Settings, make_client: Any) -> None:
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    client = _client_with_a_route_that_raises(sqlite_settings, make_client, "/pool-empty",
                                              PoolTimeout("QueuePool limit of size 5 overflow 10 reached"))
    response = client.get("/pool-empty")
    assert _problem(response, 503, "database-unavailable") and response.headers["retry-after"] == "1"


def test_no_connection_is_held_while_an_upload_is_read(env: ApiEnv, monkeypatch: Any) -> None:
    """Auth reads the key, then gives the connection back: a slow upload must not hold one (a pool of
    15 would otherwise cap the uploads in flight, and starve every other request)."""
    from app.api import deps
    from app.api import verifications as route

    sessions: list[Any] = []
    held: list[bool] = []
    real_session, real_reader = deps.get_session, route.read_verification_form

    def recording_session(request: Request) -> Iterator[Any]:
        for session in real_session(request):
            sessions.append(session)
            yield session

    async def reader(request: Any, **kwargs: Any) -> Any:
        held.append(sessions[-1].in_transaction())  # a transaction holds its pooled connection
        return await real_reader(request, **kwargs)

    env.client.app.dependency_overrides[real_session] = recording_session
    monkeypatch.setattr(route, "read_verification_form", reader)
    response = env.client.post("/v1/verifications", headers=env.as_role("client"), data={"prescribed_ndc": FURO},
                               files={"image": ("bottle.jpg", b"not a photo", "image/jpeg")})
    assert response.status_code in (422, 503) and held == [False]  # no model here: the form is what counts
