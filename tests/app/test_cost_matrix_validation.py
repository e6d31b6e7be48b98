"""Rejected cost-matrix edits: the right 4xx problem+json, pointing at the bad cell, and nothing written."""

from __future__ import annotations

from typing import Any

import pytest

from app.orm import AdminAuditEntry, CostMatrixEntry, CostMatrixVersion
from tests.app.factories import FURO, GLIP, change, count_rows, edit
from tests.conftest import ApiEnv

BASE = "/v1/admin/cost-matrices"
PROBLEM = "application/problem+json"


def _state(env: ApiEnv) -> tuple[int, int, int]:
    return (count_rows(env.settings, CostMatrixVersion), count_rows(env.settings, CostMatrixEntry),
            count_rows(env.settings, AdminAuditEntry))


def _assert_problem(response: Any, status: int, slug: str, field: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body: dict[str, Any] = response.json()
    assert body["type"] == f"https://rxverify.dev/problems/{slug}"
    assert body["status"] == status and body["title"] and body["detail"] and body["instance"] == BASE
    if field is not None:
        assert field in [e["field"] for e in body["errors"]], body
    return body


OK = change(FURO, GLIP, 2)
# (id, JSON body, status, problem slug, field the problem must point at)
BAD_BODIES = [
    ("string cost", edit(1, OK, change(FURO, GLIP, "5")), 422, "validation-error", "changes[1].cost"),
    ("null cost", edit(1, change(FURO, GLIP, None)), 422, "validation-error", "changes[0].cost"),
    ("changes not a list", {"parent_version": 1, "reason": "x", "changes": {"a": 1}}, 422, "validation-error", "changes"),
    ("string parent", {"parent_version": "1", "reason": "x", "changes": [OK]}, 422, "validation-error", "parent_version"),
    ("missing reason", {"parent_version": 1, "changes": [OK]}, 422, "validation-error", "reason"),
    ("blank reason", edit(1, OK, reason="   "), 422, "validation-error", "reason"),
    ("unknown field", {**edit(1, OK), "force": True}, 422, "validation-error", "force"),
    ("no changes", edit(1), 422, "validation-error", "changes"),
    ("unknown true NDC", edit(1, OK, change("99999-0001", GLIP, 2)), 422, "invalid-cost-matrix", "changes[1].true_ndc"),
    ("unknown predicted NDC", edit(1, change(FURO, "12345-6789-01", 2)), 422, "invalid-cost-matrix",
     "changes[0].predicted_ndc"),
    ("malformed NDC", edit(1, change("not-an-ndc", GLIP, 2)), 422, "invalid-cost-matrix", "changes[0].true_ndc"),
    ("negative cost", edit(1, OK, OK | {"predicted_ndc": "00378-3855", "cost": -1}), 422, "invalid-cost-matrix",
     "changes[1].cost"),
    ("huge cost", edit(1, OK, change(GLIP, FURO, 1e6)), 422, "invalid-cost-matrix", "changes[1].cost"),
    ("nonzero diagonal", edit(1, change(FURO, FURO, 3)), 422, "invalid-cost-matrix", "changes[0].cost"),
    ("pair twice", edit(1, OK, change("0378-0208-01", GLIP, 3)), 422, "invalid-cost-matrix", "changes[1]"),
    ("parent missing", edit(42, OK), 422, "cost-matrix-not-found", "parent_version"),
    ("no change", edit(1, change("50111-0434", GLIP, 10)), 422, "no-change", "changes"),
    ("null parent when versions exist", edit(None, OK), 409, "stale-parent", None),
]


@pytest.mark.parametrize(("body", "status", "slug", "field"), [b[1:] for b in BAD_BODIES],
                         ids=[b[0] for b in BAD_BODIES])
def test_bad_edits_are_refused_and_write_nothing(any_env: ApiEnv, body: dict[str, Any], status: int, slug: str,
                                                 field: str | None) -> None:
    before = _state(any_env)
    response = any_env.client.post(BASE, json=body, headers=any_env.as_role("pharmacist"))
    _assert_problem(response, status, slug, field)
    assert _state(any_env) == before


@pytest.mark.parametrize(("raw", "what"), [("NaN", "nan"), ("Infinity", "inf"), ("-Infinity", "inf"),
                                          ("1e999", "inf")])
def test_non_finite_costs_point_at_the_cell(any_env: ApiEnv, raw: str, what: str) -> None:
    before = _state(any_env)
    # Python's json module reads NaN and Infinity literals, so they reach validation as floats.
    payload = (f'{{"parent_version": 1, "reason": "x", "changes": [{{"true_ndc": "{FURO}", "predicted_ndc": "{GLIP}", '
               f'"cost": 2}}, {{"true_ndc": "{GLIP}", "predicted_ndc": "{FURO}", "cost": {raw}}}]}}')
    response = any_env.client.post(BASE, content=payload, headers={**any_env.as_role("pharmacist"),
                                                                   "Content-Type": "application/json"})
    body = _assert_problem(response, 422, "invalid-cost-matrix", "changes[1].cost")
    assert what in body["detail"]
    assert _state(any_env) == before


@pytest.mark.parametrize("payload", ['{"parent_version": 1, "reason": ', "not json at all", '{"a": 1,}', "\x00\x01"])
def test_malformed_json_is_400(any_env: ApiEnv, payload: str) -> None:
    before = _state(any_env)
    response = any_env.client.post(BASE, content=payload, headers={**any_env.as_role("pharmacist"),
                                                                   "Content-Type": "application/json"})
    _assert_problem(response, 400, "malformed-json")
    assert _state(any_env) == before


def test_stale_parent_is_409(any_env: ApiEnv) -> None:
    pharmacist = any_env.as_role("pharmacist")
    assert any_env.client.post(BASE, json=edit(1, change(FURO, GLIP, 2)), headers=pharmacist).status_code == 201
    before = _state(any_env)
    body = _assert_problem(any_env.client.post(BASE, json=edit(1, change(FURO, GLIP, 3)), headers=pharmacist),
                           409, "stale-parent")
    assert body["parent_version"] == 1 and body["head_version"] == 2
    assert _state(any_env) == before


def test_oversized_body_is_413_and_writes_nothing(env: ApiEnv, make_client: Any) -> None:
    small = env.settings.model_copy(update={"max_request_body_bytes": 2048, "max_upload_bytes": 1024})
    client = make_client(small)
    before = _state(env)
    changes = [change(FURO, GLIP, 2)] * 60
    response = client.post(BASE, json=edit(1, *changes), headers=env.as_role("pharmacist"))
    assert response.status_code == 413 and response.headers["content-type"] == PROBLEM
    assert response.json()["type"].endswith("/payload-too-large") and "x-request-id" in response.headers
    assert _state(env) == before


CSV_CASES = [
    ("bad header", "true,pred,cost\n", "row 1"),
    ("unknown NDC", f"true_ndc,predicted_ndc,cost\n{FURO},{GLIP},2\n{FURO},99999-0001,2\n", "row 3"),
    ("negative", f"true_ndc,predicted_ndc,cost\n{FURO},{GLIP},-2\n", "row 2"),
    ("not a number", f"true_ndc,predicted_ndc,cost\n{FURO},{GLIP},lots\n", "row 2"),
    ("NaN", f"true_ndc,predicted_ndc,cost\n{FURO},{GLIP},nan\n", "row 2"),
    ("too big", f"true_ndc,predicted_ndc,cost\n{FURO},{GLIP},5000\n", "row 2"),
    ("pair twice", f"true_ndc,predicted_ndc,cost\n{FURO},{GLIP},2\n{FURO},{GLIP},3\n", "row 3"),
    ("diagonal", f"true_ndc,predicted_ndc,cost\n{FURO},{FURO},2\n", "row 2"),
]


@pytest.mark.parametrize(("text", "field"), [c[1:] for c in CSV_CASES], ids=[c[0] for c in CSV_CASES])
def test_bad_csv_imports_point_at_the_row(env: ApiEnv, text: str, field: str) -> None:
    before = _state(env)
    response = env.client.post(f"{BASE}/import", params={"parent_version": 1, "reason": "csv"}, content=text,
                               headers={**env.as_role("pharmacist"), "Content-Type": "text/csv"})
    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["field"] == field
    assert _state(env) == before


def test_csv_import_needs_csv_text(env: ApiEnv) -> None:
    pharmacist = env.as_role("pharmacist")
    params = {"parent_version": 1, "reason": "csv"}
    as_json = env.client.post(f"{BASE}/import", params=params, json={"a": 1}, headers=pharmacist)
    assert as_json.status_code == 415 and as_json.json()["type"].endswith("/unsupported-media-type")
    latin1 = env.client.post(f"{BASE}/import", params=params, content="true_ndc,predicted_ndc,cost\n\xe9".encode("latin-1"),
                             headers={**pharmacist, "Content-Type": "text/csv"})
    assert latin1.status_code == 422
    stale = env.client.post(f"{BASE}/import", params={"reason": "csv"},
                            content=f"true_ndc,predicted_ndc,cost\n{FURO},{GLIP},2\n",
                            headers={**pharmacist, "Content-Type": "text/csv"})
    assert stale.status_code == 409
