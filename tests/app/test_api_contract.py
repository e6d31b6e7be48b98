"""The API contract an integrator generates a client from: /openapi.json describes the answers really sent.

Errors are application/problem+json with the Problem schema on every route (FastAPI's own 422 schema and
the application/json media type it puts `responses=` models under are never sent), the answers any route
can give are listed, timestamps have one format, and the Location of a new key can be read back.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from app.orm import Role
from models.decision import REASONS
from tests.app.model_factory import cached_checkpoint, jpeg_photo, post_verification, served_settings
from tests.conftest import ApiEnv

METHODS = ("get", "post", "put", "patch", "delete")


def operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(path, method, item[method]) for path, item in document["paths"].items()
            for method in METHODS if method in item]


def test_every_error_is_documented_as_the_problem_json_it_is(env: ApiEnv) -> None:
    document = env.client.get("/openapi.json").json()
    schemas = document["components"]["schemas"]
    assert "Problem" in schemas and "HTTPValidationError" not in schemas and "ValidationError" not in schemas
    checked = 0
    for path, method, operation in operations(document):
        responses = operation["responses"]
        for status, response in responses.items():
            assert "X-Request-ID" in response.get("headers", {}), (path, method, status)
            if int(status) >= 400 and path != "/readyz":
                checked += 1
                assert response["content"] == {"application/problem+json": {
                    "schema": {"$ref": "#/components/schemas/Problem"}}}, (path, method, status)
                assert response["description"]
        if path.startswith("/v1/"):
            assert {"413", "500", "503"} <= set(responses), (path, method)
            assert "Retry-After" in responses["503"]["headers"]
            if "requestBody" in operation:
                assert {"400", "415"} <= set(responses), (path, method)
    assert checked > 100
    # /readyz's 503 is its Readiness body, not a problem.
    ready = document["paths"]["/readyz"]["get"]["responses"]["503"]["content"]
    assert ready == {"application/json": {"schema": {"$ref": "#/components/schemas/Readiness"}}}
    verify = document["paths"]["/v1/verifications"]["post"]["responses"]
    assert {"400", "401", "403", "413", "415", "422", "503"} <= set(verify)
    # Two activations at once: the loser is told so (409 active-changed), which the description now says.
    assert "409" in document["paths"]["/v1/admin/cost-matrices/{version}/activate"]["post"]["responses"]
    # Closed sets a generated client can switch on; the lists paged by before_id declare their Link header.
    assert schemas["VerificationRead"]["properties"]["reason"]["enum"] == list(REASONS)
    assert schemas["ModelVersionSummary"]["properties"]["status"]["enum"] == ["candidate", "promoted", "retired"]
    for path in ("/v1/admin/models", "/v1/admin/models/promotions", "/v1/admin/training-jobs"):
        assert "Link" in document["paths"][path]["get"]["responses"]["200"]["headers"]


def test_a_null_parent_after_the_first_version_says_so(env: ApiEnv) -> None:
    answer = env.client.post("/v1/admin/cost-matrices", headers=env.as_role("pharmacist"), json={
        "parent_version": None, "reason": "x",
        "changes": [{"true_ndc": "00378-0208", "predicted_ndc": "00591-0461", "cost": 3}]})
    assert answer.status_code == 409 and answer.json()["type"].endswith("/stale-parent")
    assert "null is only for the first version" in answer.json()["detail"] and "None" not in answer.json()["detail"]


def test_a_new_keys_location_can_be_read_back(env: ApiEnv) -> None:
    admin = env.as_role("admin")
    created = env.client.post("/v1/admin/api-keys", json={"role": "client", "name": "till 3"}, headers=admin)
    assert created.status_code == 201, created.text
    read = env.client.get(created.headers["Location"], headers=admin)
    assert read.status_code == 200
    assert read.json() == {k: v for k, v in created.json().items() if k != "key"}
    assert "key" not in read.json()  # the secret is shown once, at creation
    missing = env.client.get("/v1/admin/api-keys/999999", headers=admin)
    assert missing.status_code == 404 and missing.json()["type"].endswith("/api-key-not-found")
    assert env.client.get(created.headers["Location"], headers=env.as_role("pharmacist")).status_code == 403


@pytest.fixture
def served(seeded_sqlite_template: Any, tmp_path: Any, make_client: Any, tmp_path_factory: Any) -> ApiEnv:
    template, keys = seeded_sqlite_template
    checkpoint = cached_checkpoint(tmp_path_factory.mktemp("contract-checkpoints"))
    settings = served_settings(template, tmp_path / "data", checkpoint=checkpoint)
    return ApiEnv(settings, make_client(settings), dict(keys))


def test_a_verification_reads_back_the_same_under_any_id_case(served: ApiEnv) -> None:
    posted = post_verification(served.client, served.keys[Role.CLIENT], image=jpeg_photo())
    assert posted.status_code == 200, posted.text
    body = posted.json()
    # One timestamp format everywhere: UTC with a Z, as the GET (a pydantic schema) writes it.
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", body["created_at"]), body["created_at"]
    pharmacist = served.as_role("pharmacist")
    for verification_id in (body["id"], body["id"].upper()):
        read = served.client.get(f"/v1/verifications/{verification_id}", headers=pharmacist)
        assert read.status_code == 200, read.text
        assert read.json()["id"] == body["id"] and read.json()["created_at"] == body["created_at"]
    resolved = served.client.post(f"/v1/verifications/{body['id'].upper()}/resolution", headers=pharmacist,
                                  json={"actual_ndc": body["prescribed_ndc"], "checked_by": "RPh 12"})
    assert resolved.status_code == 201, resolved.text
    assert resolved.json()["verification_id"] == body["id"]
    # Who recorded it, beyond the free-text checked_by: the pharmacist's API key, which can be looked up.
    key_id = resolved.json()["recorded_by_key_id"]
    key = served.client.get(f"/v1/admin/api-keys/{key_id}", headers=served.as_role("admin")).json()
    assert key["role"] == "pharmacist"
