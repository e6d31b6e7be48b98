"""Auth: 401 for a missing, unknown or revoked key; 403 for the wrong role; every role on every endpoint."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from app.orm import AdminAuditEntry, Role
from tests.app.factories import FURO, GLIP, change, count_rows, create_key, edit
from tests.conftest import ApiEnv

PROBLEM = "application/problem+json"


@dataclass(frozen=True)
class Endpoint:
    """One route, the least role allowed on it, and a request that succeeds for that role."""

    method: str
    path: str
    minimum: Role
    json: Any = None
    content: str | None = None
    content_type: str | None = None

    def __str__(self) -> str:
        return f"{self.method} {self.path.split('?')[0]}"


ENDPOINTS = [
    Endpoint("GET", "/v1/products", Role.CLIENT),
    Endpoint("GET", "/v1/products/0378-0208-01", Role.CLIENT),
    Endpoint("POST", "/v1/admin/products", Role.PHARMACIST,
             json={"ndc": "12345-6789", "name": "Test 1 MG", "shape": "Round", "colour": "White", "imprint": ["T"]}),
    Endpoint("PATCH", f"/v1/admin/products/{FURO}", Role.PHARMACIST, json={"active": False, "reason": "test"}),
    Endpoint("GET", "/v1/admin/cost-matrices", Role.PHARMACIST),
    Endpoint("GET", "/v1/admin/cost-matrices/active", Role.PHARMACIST),
    Endpoint("GET", "/v1/admin/cost-matrices/1", Role.PHARMACIST),
    Endpoint("POST", "/v1/admin/cost-matrices", Role.PHARMACIST, json=edit(1, change(FURO, GLIP, 3))),
    Endpoint("POST", "/v1/admin/cost-matrices/import?parent_version=1&reason=csv", Role.PHARMACIST,
             content=f"true_ndc,predicted_ndc,cost\n{FURO},{GLIP},4\n", content_type="text/csv"),
    Endpoint("GET", "/v1/admin/cost-matrices/diff?from=1&to=active", Role.PHARMACIST),
    Endpoint("GET", "/v1/admin/cost-matrices/1/csv", Role.PHARMACIST),
    Endpoint("POST", "/v1/admin/cost-matrices/1/activate", Role.PHARMACIST, json={"reason": "test"}),
    Endpoint("GET", "/v1/admin/audit-log", Role.PHARMACIST),
    Endpoint("GET", "/v1/admin/api-keys", Role.ADMIN),
    Endpoint("POST", "/v1/admin/api-keys", Role.ADMIN, json={"name": "new client", "role": "client"}),
    Endpoint("POST", "/v1/admin/api-keys/{spare}/revoke", Role.ADMIN, json={"reason": "test"}),
]


def call(env: ApiEnv, endpoint: Endpoint, headers: dict[str, str]) -> Any:
    """Send the endpoint's request (the spare key id is filled in for the revoke route)."""
    path = endpoint.path.replace("{spare}", str(len(Role) + 1))
    if endpoint.content_type:
        headers = {**headers, "Content-Type": endpoint.content_type}
    return env.client.request(endpoint.method, path, json=endpoint.json, content=endpoint.content,
                              headers=headers)


@pytest.fixture
def role_env(env: ApiEnv) -> ApiEnv:
    """The env plus a spare key (id = number of roles + 1) for the revoke route."""
    create_key(env.settings, Role.CLIENT, "spare")
    return env


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=str)
@pytest.mark.parametrize("role", list(Role), ids=lambda r: r.value)
def test_each_role_on_each_endpoint(role_env: ApiEnv, endpoint: Endpoint, role: Role) -> None:
    audit_before = count_rows(role_env.settings, AdminAuditEntry)
    response = call(role_env, endpoint, role_env.as_role(role))
    if role.includes(endpoint.minimum):
        assert response.status_code in (200, 201), response.text
    else:
        assert response.status_code == 403, response.text
        assert response.headers["content-type"] == PROBLEM
        body = response.json()
        assert body["type"].endswith("/forbidden") and body["required_role"] == endpoint.minimum.value
        assert count_rows(role_env.settings, AdminAuditEntry) == audit_before


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=str)
@pytest.mark.parametrize("credential", ["missing", "unknown", "malformed", "revoked"])
def test_unauthenticated_requests_get_401(role_env: ApiEnv, endpoint: Endpoint, credential: str) -> None:
    if credential == "missing":
        headers: dict[str, str] = {}
    elif credential == "unknown":
        token = role_env.keys[Role.ADMIN]
        headers = {"X-API-Key": token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")}
    elif credential == "malformed":
        headers = {"X-API-Key": "not-a-key"}
    else:
        token = create_key(role_env.settings, Role.ADMIN, "to revoke")
        revoked = role_env.client.get("/v1/admin/api-keys", headers=role_env.as_role(Role.ADMIN)).json()[0]
        assert role_env.client.post(f"/v1/admin/api-keys/{revoked['id']}/revoke",
                                    headers=role_env.as_role(Role.ADMIN)).status_code == 200
        headers = {"X-API-Key": token}
    response = call(role_env, endpoint, headers)
    assert response.status_code == 401, response.text
    assert response.headers["content-type"] == PROBLEM
    assert response.headers["www-authenticate"].startswith("ApiKey")
    body = response.json()
    assert body["status"] == 401 and body["title"] and body["detail"]
    expected = {"missing": "missing-api-key", "unknown": "invalid-api-key", "malformed": "invalid-api-key",
                "revoked": "revoked-api-key"}[credential]
    assert body["type"].endswith("/" + expected)


def test_keys_are_stored_only_as_hashes(env: ApiEnv) -> None:
    from sqlalchemy import select

    from app.db import Database
    from app.orm import ApiKey
    from app.services.api_keys import hash_token

    database = Database(env.settings)
    try:
        with database.session() as session:
            stored = {k.key_sha256: k for k in session.scalars(select(ApiKey))}
    finally:
        database.dispose()
    for token in env.keys.values():
        assert hash_token(token) in stored
        assert all(token not in (k.key_sha256, k.prefix, k.name) for k in stored.values())


def test_admin_key_api_creates_lists_and_revokes(env: ApiEnv) -> None:
    admin = env.as_role(Role.ADMIN)
    created = env.client.post("/v1/admin/api-keys", json={"name": "pharmacy 7", "role": "client"}, headers=admin)
    assert created.status_code == 201 and created.headers["location"].endswith(f"/{created.json()['id']}")
    token = created.json()["key"]
    assert env.client.get("/v1/products", headers={"X-API-Key": token}).status_code == 200
    listed = env.client.get("/v1/admin/api-keys", headers=admin).json()
    assert all("key" not in item and "key_sha256" not in item for item in listed)
    assert listed[0]["id"] == created.json()["id"]  # newest first
    first = env.client.get("/v1/admin/api-keys", headers=admin, params={"limit": 1})
    assert [item["id"] for item in first.json()] == [listed[0]["id"]]
    older = env.client.get(first.links["next"]["url"], headers=admin)
    assert older.status_code == 200 and [item["id"] for item in older.json()] == [listed[1]["id"]]
    revoked = env.client.post(f"/v1/admin/api-keys/{created.json()['id']}/revoke", headers=admin)
    assert revoked.status_code == 200 and revoked.json()["revoked_at"]
    assert env.client.get("/v1/products", headers={"X-API-Key": token}).status_code == 401
    again = env.client.post(f"/v1/admin/api-keys/{created.json()['id']}/revoke", headers=admin)
    assert again.status_code == 409 and again.json()["type"].endswith("/api-key-revoked")
    assert env.client.post("/v1/admin/api-keys/999/revoke", headers=admin).status_code == 404
    bad_role = env.client.post("/v1/admin/api-keys", json={"name": "x", "role": "root"}, headers=admin)
    assert bad_role.status_code == 422 and bad_role.json()["errors"][0]["field"] == "role"
    for operator_name in ("cli:apikey create (root)", " CLI:up"):  # would pass for the server's operator
        impostor = env.client.post("/v1/admin/api-keys", json={"name": operator_name, "role": "admin"}, headers=admin)
        assert impostor.status_code == 422 and impostor.json()["errors"][0]["field"] == "name", impostor.text
    actions = [e["action"] for e in env.client.get("/v1/admin/audit-log", headers=admin).json()["items"]]
    assert actions[:2] == ["api_key.revoke", "api_key.create"]


def test_two_revocations_of_one_key_at_once_revoke_and_audit_it_once(any_env: ApiEnv) -> None:
    """Both requests read the key as live; the conditional write lets exactly one of them revoke it."""
    from app.db import Database
    from app.errors import Conflict
    from app.orm import ApiKey
    from app.services.api_keys import revoke_api_key
    from app.services.audit import Actor

    key_id = any_env.client.post("/v1/admin/api-keys", json={"name": "twice", "role": "client"},
                             headers=any_env.as_role(Role.ADMIN)).json()["id"]
    database = Database(any_env.settings)
    try:
        with database.session() as first, database.session() as second:
            assert first.get(ApiKey, key_id).revoked_at is None and second.get(ApiKey, key_id).revoked_at is None
            revoke_api_key(first, key_id=key_id, actor=Actor.cli("tests"))
            first.commit()
            with pytest.raises(Conflict):
                revoke_api_key(second, key_id=key_id, actor=Actor.cli("tests"))
    finally:
        database.dispose()
    entries = any_env.client.get("/v1/admin/audit-log", params={"action": "api_key.revoke", "entity_id": str(key_id)},
                             headers=any_env.as_role(Role.ADMIN)).json()["items"]
    assert len(entries) == 1


def test_server_paths_in_the_audit_log_are_for_admins_only(env: ApiEnv) -> None:
    """Where an import came from on the server's disks is shown to admins; pharmacists get the rest."""
    from app.db import Database
    from app.services.audit import Actor, record_change

    database = Database(env.settings)
    try:
        with database.session() as session:
            record_change(session, actor=Actor.cli("tests"), action="dataset.import", entity_type="dataset",
                          entity_id=7, details={"name": "pmi", "source": "/srv/pmi", "path": "/data/datasets/pmi"})
    finally:
        database.dispose()
    entries = {role: env.client.get("/v1/admin/audit-log?action=dataset.import", headers=env.as_role(role)).json()
               for role in ("pharmacist", "admin")}
    assert entries["pharmacist"]["items"][0]["details"] == {"name": "pmi"}
    assert entries["admin"]["items"][0]["details"]["source"] == "/srv/pmi"


@pytest.mark.parametrize(("headers", "status", "slug"), [
    ({}, 401, "missing-api-key"),
    ({"X-API-Key": "rxv_nope_nope"}, 401, "invalid-api-key"),
    ("client", 403, "forbidden"),  # a key of too low a role is refused before the body, too
    ("pharmacist", 400, "malformed-json"),
])
def test_the_key_is_checked_before_the_body_is_read(env: ApiEnv, headers: Any, status: int, slug: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """FastAPI parses a JSON body before any dependency runs: without KeyFirstRoute a request with no key and
    a malformed body got 400, after the whole body (up to 12 MB) was parsed for nobody."""
    from starlette.requests import Request

    reads: list[int] = []
    real_body = Request.body

    async def counted_body(self: Request) -> bytes:
        reads.append(1)
        return await real_body(self)

    monkeypatch.setattr(Request, "body", counted_body)
    sent = env.as_role(headers) if isinstance(headers, str) else headers
    response = env.client.post("/v1/admin/cost-matrices", content=b'{"parent_version": 1, "changes": [',
                               headers={**sent, "Content-Type": "application/json"})
    assert response.status_code == status and response.json()["type"].endswith(slug), response.text
    assert bool(reads) is (status == 400)  # the body is read only for a key that may use the route


def test_every_v1_route_checks_the_key_before_the_body(env: ApiEnv) -> None:
    from app.api import api_keys, audit, cost_matrices, health, models, products, training_jobs, verifications
    from app.api.deps import KeyFirstRoute

    served = {path for path in env.client.app.openapi()["paths"] if path.startswith("/v1/")}
    routers = (api_keys, audit, cost_matrices, health, models, products, training_jobs, verifications)
    key_first = {route.path for module in routers for route in module.router.routes if isinstance(route, KeyFirstRoute)}
    assert served and served <= key_first, served - key_first
