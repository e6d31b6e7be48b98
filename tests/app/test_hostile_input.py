"""Input no client should send still gets a 4xx problem, the same on SQLite and PostgreSQL: control
characters in text, ids beyond the database's integer range, dates beyond the calendar, forged cursors,
unreadable CSV. And concurrent activations record each change once, from the version really replaced."""

from __future__ import annotations

import base64
import itertools
import threading
from typing import Any

import pytest
from sqlalchemy import select

from app.db import Database
from app.errors import Conflict
from app.orm import ACTIVE_STATE_ID, ActiveState, AdminAuditEntry
from app.services.active_state import move_active
from tests.app.factories import FURO, GLIP
from tests.conftest import ApiEnv

PROBLEM = "application/problem+json"
TOO_BIG = [2**31, 10**20]


def _problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body: dict[str, Any] = response.json()
    assert body["status"] == status and body["detail"]
    return body


def _edit(reason: str, cost: float = 5.0, parent: Any = 1) -> dict[str, Any]:
    return {"parent_version": parent, "reason": reason,
            "changes": [{"true_ndc": FURO, "predicted_ndc": GLIP, "cost": cost}]}


@pytest.mark.parametrize("text", ["ab\x00cd", "esc\x1b[31m", "bell\x07"])
def test_control_characters_in_text_are_422(any_env: ApiEnv, text: str) -> None:
    admin, pharmacist = any_env.as_role("admin"), any_env.as_role("pharmacist")
    requests = [
        any_env.client.post("/v1/admin/api-keys", headers=admin, json={"role": "client", "name": text}),
        any_env.client.post("/v1/admin/cost-matrices", headers=pharmacist, json=_edit(text)),
        any_env.client.post("/v1/admin/cost-matrices/1/activate", headers=pharmacist, json={"reason": text}),
    ]
    for response in requests:
        body = _problem(response, 422)
        assert any("control characters" in error["message"] for error in body["errors"]), body
    # Tabs and line breaks are ordinary text in a reason.
    assert any_env.client.post("/v1/admin/cost-matrices", headers=pharmacist,
                               json=_edit("line one\n\tline two")).status_code == 201


def test_control_characters_in_query_and_path_are_422(any_env: ApiEnv) -> None:
    pharmacist = any_env.as_role("pharmacist")
    for url in ("/v1/admin/audit-log?entity_id=a%00", "/v1/admin/audit-log?action=%1b",
                "/v1/verifications/a%00b", "/v1/admin/cost-matrices/1%00"):
        _problem(any_env.client.get(url, headers=pharmacist), 422)


@pytest.mark.parametrize("number", TOO_BIG)
def test_ids_beyond_the_integer_range_are_422(any_env: ApiEnv, number: int) -> None:
    admin = any_env.as_role("admin")
    for method, url in (("get", f"/v1/admin/cost-matrices/{number}"),
                        ("post", f"/v1/admin/api-keys/{number}/revoke"),
                        ("get", f"/v1/admin/models/{number}"),
                        ("get", f"/v1/admin/models/{number}/policy"),
                        ("get", f"/v1/admin/training-jobs/{number}"),
                        ("get", f"/v1/verifications?model_version={number}"),
                        ("get", f"/v1/admin/audit-log?before_id={number}"),
                        ("get", f"/v1/admin/models/promotions?before_id={number}"),
                        ("get", f"/v1/admin/training-jobs?before_id={number}"),
                        ("get", f"/v1/admin/api-keys/{number}")):
        body = _problem(getattr(any_env.client, method)(url, headers=admin), 422)
        assert body["type"].endswith("/validation-error"), (url, body["type"])  # one problem type for a bad id
    _problem(any_env.client.post("/v1/admin/cost-matrices", headers=admin, json=_edit("x", parent=number)), 422)
    _problem(any_env.client.post("/v1/admin/training-jobs", headers=admin,
                                 json={"dataset": "any", "base_model": number}), 422)
    # A 4,000-digit version number is refused before Python's int() limit turns it into a 500.
    _problem(any_env.client.get("/v1/admin/cost-matrices/" + "9" * 5000, headers=admin), 422)


def test_dates_beyond_the_calendar_in_utc_are_422(any_env: ApiEnv) -> None:
    pharmacist = any_env.as_role("pharmacist")
    for query in ("created_from=0001-01-01T00:00:00%2B01:00", "created_before=9999-12-31T23:59:59-01:00"):
        body = _problem(any_env.client.get(f"/v1/verifications?{query}", headers=pharmacist), 422)
        assert body["errors"][0]["code"] == "date_range"
    ok = any_env.client.get("/v1/verifications?created_from=0001-01-01T00:00:00", headers=pharmacist)
    assert ok.status_code == 200 and ok.json()["items"] == []


@pytest.mark.parametrize("forged", ["2024-01-01T00:00:00|abc", "0001-01-01T00:00:00+05:00|x",
                                    "2024-01-01T00:00:00+00:00|a\x00b", "not a cursor"])
def test_forged_cursors_are_422(any_env: ApiEnv, forged: str) -> None:
    cursor = base64.urlsafe_b64encode(forged.encode()).decode().rstrip("=")
    body = _problem(any_env.client.get(f"/v1/verifications?cursor={cursor}", headers=any_env.as_role("pharmacist")),
                    422)
    assert body["errors"][0]["code"] == "invalid_cursor"


@pytest.mark.parametrize("csv_text", [
    f'true_ndc,predicted_ndc,cost\n"{"a" * 200_000}",{GLIP},1\n',  # over the csv module's field limit
    f"true_ndc,predicted_ndc,cost\n{FURO},{GLIP},4,surplus\n",  # more fields than the header
])
def test_unreadable_csv_imports_are_422(any_env: ApiEnv, csv_text: str) -> None:
    response = any_env.client.post("/v1/admin/cost-matrices/import?reason=x&parent_version=1",
                                   content=csv_text.encode(),
                                   headers={**any_env.as_role("pharmacist"), "Content-Type": "text/csv"})
    assert len(response.text) < 2000  # the offending field is not echoed back whole
    _problem(response, 422)


def test_only_an_admin_may_start_a_job_that_promotes_itself(any_env: ApiEnv) -> None:
    body = {"dataset": "none-registered", "auto_promote": True}
    refused = _problem(any_env.client.post("/v1/admin/training-jobs", headers=any_env.as_role("pharmacist"),
                                           json=body), 403)
    assert refused["required_role"] == "admin"
    # An admin gets past the role check (to the next one: no such dataset).
    assert any_env.client.post("/v1/admin/training-jobs", headers=any_env.as_role("admin"),
                               json=body).status_code == 422


def _new_versions(env: ApiEnv, count: int) -> None:
    """Versions 2 .. count + 1, each on the one before (version 1, the seeded matrix, stays active)."""
    for parent in range(1, count + 1):
        response = env.client.post("/v1/admin/cost-matrices", headers=env.as_role("pharmacist"),
                                   json=_edit(f"version {parent + 1}", cost=float(parent + 1), parent=parent))
        assert response.status_code == 201 and response.json()["version"] == parent + 1, response.text


def test_a_stale_read_cannot_move_the_active_pointer(any_env: ApiEnv) -> None:
    """Compare-and-set: the request that read version 1 as active may not record '1 -> 3' after another
    request has already moved the pointer to 2."""
    _new_versions(any_env, 2)
    database = Database(any_env.settings)
    try:
        with database.session() as session:
            move_active(session, "cost_matrix_version_id", previous=1, new=2)
        with database.session() as session, pytest.raises(Conflict) as raised:
            move_active(session, "cost_matrix_version_id", previous=1, new=3)
        assert raised.value.slug == "active-changed"
        with database.session() as session:
            active = session.scalar(select(ActiveState.cost_matrix_version_id)
                                    .where(ActiveState.id == ACTIVE_STATE_ID))
        assert active == 2
    finally:
        database.dispose()


def test_concurrent_activations_each_record_the_version_they_replaced(any_env: ApiEnv) -> None:
    pharmacist = any_env.as_role("pharmacist")
    _new_versions(any_env, 2)
    statuses: list[int] = []
    barrier = threading.Barrier(6)

    def activate(version: int) -> None:
        barrier.wait()
        statuses.append(any_env.client.post(f"/v1/admin/cost-matrices/{version}/activate", headers=pharmacist,
                                            json={"reason": "race"}).status_code)

    threads = [threading.Thread(target=activate, args=(v,)) for v in (1, 2, 3, 1, 2, 3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert set(statuses) <= {200, 409}
    database = Database(any_env.settings)
    try:
        with database.session() as session:
            entries = list(session.scalars(select(AdminAuditEntry)
                                           .where(AdminAuditEntry.action == "cost_matrix.activate")
                                           .order_by(AdminAuditEntry.id)))
            chain = [(e.details["from_version"], e.details["to_version"]) for e in entries]
            active = session.scalar(select(ActiveState.cost_matrix_version_id)
                                    .where(ActiveState.id == ACTIVE_STATE_ID))
    finally:
        database.dispose()
    # Each recorded change starts where the previous one ended, and the last one ends at what is active.
    for (_, before), (after, _) in itertools.pairwise(chain):
        assert before == after, chain
    assert chain[-1][1] == active, (chain, active)
