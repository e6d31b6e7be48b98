"""Cost-matrix versions over HTTP: create from a parent, read, activate, CSV, diff, audit (both databases)."""

from __future__ import annotations

from app.db import Database
from app.services.cost_matrices import cost_matrix_of
from models.costs import CostMatrix
from models.pmi import PMI_EXPERT_COSTS, PMI_NDCS
from tests.app.factories import FURO, GLIP, TRAZ, change, edit
from tests.conftest import ApiEnv

BASE = "/v1/admin/cost-matrices"


def test_seeded_version_is_the_pmi_expert_matrix(any_env: ApiEnv) -> None:
    active = any_env.client.get(f"{BASE}/active", headers=any_env.as_role("pharmacist")).json()
    assert active["version"] == 1 and active["active"] and active["parent_version"] is None
    assert {(e["true_ndc"], e["predicted_ndc"]): e["cost"] for e in active["entries"]} == PMI_EXPERT_COSTS
    database = Database(any_env.settings)
    try:
        with database.session() as session:
            matrix = cost_matrix_of(session, "active", classes=PMI_NDCS)
    finally:
        database.dispose()
    assert matrix == CostMatrix.from_pairs(PMI_NDCS, PMI_EXPERT_COSTS)


def test_pharmacist_creates_diffs_exports_and_activates(any_env: ApiEnv) -> None:
    client, pharmacist = any_env.client, any_env.as_role("pharmacist")
    body = edit(1, change("0378-0208-01", GLIP, 7.5), change(TRAZ, GLIP, 1), reason="glipizide risk")
    created = client.post(BASE, json=body, headers=pharmacist)
    assert created.status_code == 201, created.text
    version = created.json()
    assert created.headers["location"] == f"{BASE}/{version['version']}"
    assert (version["version"], version["parent_version"], version["active"]) == (2, 1, False)
    assert version["author"] == "test pharmacist" and version["reason"] == "glipizide risk"
    cells = {(e["true_ndc"], e["predicted_ndc"]): e["cost"] for e in version["entries"]}
    assert cells[(FURO, GLIP)] == 7.5 and (TRAZ, GLIP) not in cells  # cost 1 is the default: no entry

    diff = client.get(f"{BASE}/diff", params={"from": 1, "to": 2}, headers=pharmacist).json()
    assert diff == {"from_version": 1, "to_version": 2, "changes": [
        {"true_ndc": FURO, "predicted_ndc": GLIP, "from_cost": 1.0, "to_cost": 7.5},
        {"true_ndc": TRAZ, "predicted_ndc": GLIP, "from_cost": 10.0, "to_cost": 1.0}]}

    exported = client.get(f"{BASE}/2/csv", headers=pharmacist)
    assert exported.status_code == 200 and exported.headers["content-type"].startswith("text/csv")
    lines = exported.text.strip().splitlines()
    assert lines[0] == "true_ndc,predicted_ndc,cost" and f"{FURO},{GLIP},7.5" in lines and len(lines) == 5

    activated = client.post(f"{BASE}/2/activate", json={"reason": "reviewed"}, headers=pharmacist)
    assert activated.status_code == 200 and activated.json()["active"]
    assert activated.json()["previous_active"] == 1 and activated.json()["changes"] == diff["changes"]
    assert client.get(f"{BASE}/active", headers=pharmacist).json()["version"] == 2
    listing = client.get(BASE, headers=pharmacist)
    assert [(v["version"], v["active"], v["entry_count"]) for v in listing.json()] == [(2, True, 4), (1, False, 4)]
    assert "link" not in listing.headers
    newest = client.get(BASE, headers=pharmacist, params={"limit": 1})
    assert [v["version"] for v in newest.json()] == [2]
    assert newest.headers["link"] == f'<{BASE}?before_id=2&limit=1>; rel="next"'
    assert [v["version"] for v in client.get(newest.links["next"]["url"], headers=pharmacist).json()] == [1]
    assert client.get(BASE, headers=pharmacist, params={"limit": 0}).status_code == 422

    audit = client.get("/v1/admin/audit-log", headers=pharmacist).json()["items"]
    assert [e["action"] for e in audit[:2]] == ["cost_matrix.activate", "cost_matrix.create"]
    assert audit[0]["actor"] == "test pharmacist" and audit[0]["reason"] == "reviewed"
    assert audit[0]["details"] == {"from_version": 1, "to_version": 2, "changes": [
        {"true_ndc": FURO, "predicted_ndc": GLIP, "from": 1.0, "to": 7.5},
        {"true_ndc": TRAZ, "predicted_ndc": GLIP, "from": 10.0, "to": 1.0}]}
    assert audit[1]["reason"] == "glipizide risk" and len(audit[1]["details"]["changes"]) == 2


def test_client_cannot_touch_cost_matrices(any_env: ApiEnv) -> None:
    client, key = any_env.client, any_env.as_role("client")
    assert client.get(f"{BASE}/active", headers=key).status_code == 403
    assert client.post(BASE, json=edit(1, change(FURO, GLIP, 2)), headers=key).status_code == 403
    assert client.post(f"{BASE}/1/activate", headers=key).status_code == 403


def test_csv_import_replaces_the_whole_matrix(any_env: ApiEnv) -> None:
    client, pharmacist = any_env.client, any_env.as_role("pharmacist")
    csv_headers = {**pharmacist, "Content-Type": "text/csv"}
    exported = client.get(f"{BASE}/1/csv", headers=pharmacist).text
    same = client.post(f"{BASE}/import", params={"parent_version": 1, "reason": "same"}, content=exported,
                       headers=csv_headers)
    assert same.status_code == 422 and same.json()["type"].endswith("/no-change")
    for bad_reason in ("\x00", "near miss\x1b[2J", "   "):  # free text anywhere else refuses these too
        refused = client.post(f"{BASE}/import", params={"parent_version": 1, "reason": bad_reason}, content=exported,
                              headers=csv_headers)
        assert refused.status_code == 422 and refused.json()["errors"][0]["field"] == "query.reason", refused.text
    edited = "\ufefftrue_ndc,predicted_ndc,cost\n" + f"{FURO},{GLIP},3\n{GLIP},{FURO},2.5\n"
    imported = client.post(f"{BASE}/import", params={"parent_version": 1, "reason": "from excel"},
                           content=edited.encode(), headers=csv_headers)
    assert imported.status_code == 201, imported.text
    cells = {(e["true_ndc"], e["predicted_ndc"]): e["cost"] for e in imported.json()["entries"]}
    assert cells == {(FURO, GLIP): 3.0, (GLIP, FURO): 2.5}  # unlisted pairs, the old critical ones too, cost 1
    diff = client.get(f"{BASE}/diff", params={"from": "active", "to": 2}, headers=pharmacist).json()["changes"]
    assert len(diff) == 6
    audit = client.get("/v1/admin/audit-log", params={"action": "cost_matrix.import_csv"}, headers=pharmacist)
    assert audit.json()["items"][0]["entity_id"] == "2"


def test_csv_import_takes_every_ndc_form_the_json_edits_take(any_env: ApiEnv) -> None:
    client, pharmacist = any_env.client, any_env.as_role("pharmacist")
    csv_headers = {**pharmacist, "Content-Type": "text/csv"}
    # Trazodone -> glipizide written as 5-4-2 and 11 digits, amiodarone -> allopurinol as 4-4-2 and 5-3-2.
    text = ("true_ndc,predicted_ndc,cost\n50111-0434-01,00591046101,12\n"
            "68382-0227-06,53489-156-01,9\n")
    imported = client.post(f"{BASE}/import", params={"parent_version": 1, "reason": "pharmacy system export"},
                           content=text, headers=csv_headers)
    assert imported.status_code == 201, imported.text
    cells = {(e["true_ndc"], e["predicted_ndc"]): e["cost"] for e in imported.json()["entries"]}
    assert cells == {("50111-0434", "00591-0461"): 12.0, ("68382-0227", "53489-0156"): 9.0}
    for body, message in (("true_ndc,predicted_ndc,cost\n99999-0001-01,00591-0461,3\n", "not in the catalog"),
                          ("true_ndc,predicted_ndc,cost\n50111-0434,00591-0461,3\n50111-0434-01,00591-0461,4\n",
                           "pair listed twice")):
        refused = client.post(f"{BASE}/import", params={"parent_version": 2, "reason": "x"}, content=body,
                              headers=csv_headers)
        assert refused.status_code == 422 and message in refused.json()["detail"], refused.text


def test_versions_can_be_rolled_back_by_activation(any_env: ApiEnv) -> None:
    client, pharmacist = any_env.client, any_env.as_role("pharmacist")
    assert client.post(BASE, json=edit(1, change(FURO, GLIP, 2)), headers=pharmacist).status_code == 201
    assert client.post(f"{BASE}/2/activate", headers=pharmacist).status_code == 200
    again = client.post(f"{BASE}/1/activate", headers=pharmacist)
    assert again.status_code == 200 and again.json()["version"] == 1 and again.json()["active"]
    next_edit = client.post(BASE, json=edit(2, change(FURO, GLIP, 4)), headers=pharmacist)
    assert next_edit.status_code == 201 and next_edit.json()["parent_version"] == 2


def test_after_a_rollback_no_cost_comes_back_unseen(any_env: ApiEnv) -> None:
    """Version 2 lowers trazodone -> glipizide from 10 to 1 and is rolled back by activating 1. An edit must
    build on the newest version (2), so it would carry the 1 forward: the answer to editing the active
    version says how to restore it, restoring makes its costs the newest, and an activation that would
    bring the 1 back lists it."""
    client, pharmacist = any_env.client, any_env.as_role("pharmacist")
    assert client.post(BASE, json=edit(1, change(TRAZ, GLIP, 1)), headers=pharmacist).status_code == 201
    assert client.post(f"{BASE}/2/activate", headers=pharmacist).status_code == 200
    rolled_back = client.post(f"{BASE}/1/activate", headers=pharmacist).json()
    assert rolled_back["changes"] == [{"true_ndc": TRAZ, "predicted_ndc": GLIP, "from_cost": 1.0, "to_cost": 10.0}]

    on_active = client.post(BASE, json=edit(1, change(FURO, GLIP, 6)), headers=pharmacist)
    assert on_active.status_code == 409 and on_active.json()["active_version"] == 1
    assert "/1/restore" in on_active.json()["detail"] and on_active.json()["head_version"] == 2

    # Editing the newest version anyway: its activation shows the rolled-back cost coming back.
    carried = client.post(BASE, json=edit(2, change(FURO, GLIP, 6)), headers=pharmacist).json()
    shown = client.post(f"{BASE}/{carried['version']}/activate", headers=pharmacist).json()["changes"]
    assert {"true_ndc": TRAZ, "predicted_ndc": GLIP, "from_cost": 10.0, "to_cost": 1.0} in shown
    assert client.post(f"{BASE}/1/activate", headers=pharmacist).status_code == 200

    stale = client.post(f"{BASE}/1/restore", json={"parent_version": 2, "reason": "back to the expert costs"},
                        headers=pharmacist)
    assert stale.status_code == 409 and stale.json()["type"].endswith("/stale-parent")
    restored = client.post(f"{BASE}/1/restore", json={"parent_version": 3, "reason": "back to the expert costs"},
                           headers=pharmacist)
    assert restored.status_code == 201, restored.text
    assert (restored.json()["version"], restored.json()["parent_version"], restored.json()["active"]) == (4, 3, False)
    assert client.get(f"{BASE}/diff", params={"from": 1, "to": 4}, headers=pharmacist).json()["changes"] == []
    following = client.post(BASE, json=edit(4, change(FURO, GLIP, 6)), headers=pharmacist).json()
    assert {(e["true_ndc"], e["predicted_ndc"]): e["cost"] for e in following["entries"]}[(TRAZ, GLIP)] == 10.0
    audit = client.get("/v1/admin/audit-log", params={"action": "cost_matrix.restore"}, headers=pharmacist).json()
    assert audit["items"][0]["details"]["restored_from"] == 1 and audit["items"][0]["entity_id"] == "4"
    same = client.post(f"{BASE}/5/restore", json={"parent_version": 5, "reason": "x"}, headers=pharmacist)
    assert same.status_code == 422 and same.json()["type"].endswith("/no-change")
    assert client.post(f"{BASE}/99/restore", json={"parent_version": 5, "reason": "x"},
                       headers=pharmacist).status_code == 404


def test_activation_can_require_the_version_the_pharmacist_saw(any_env: ApiEnv) -> None:
    client, pharmacist = any_env.client, any_env.as_role("pharmacist")
    for cost in (2, 3):
        parent = client.get(BASE, headers=pharmacist).json()[0]["version"]
        assert client.post(BASE, json=edit(parent, change(FURO, GLIP, cost)), headers=pharmacist).status_code == 201
    # A sees 1 active and decides on 2; meanwhile B activates 3.
    assert client.post(f"{BASE}/3/activate", json={"expected_active": 1}, headers=pharmacist).status_code == 200
    late = client.post(f"{BASE}/2/activate", json={"expected_active": 1}, headers=pharmacist)
    assert late.status_code == 409 and late.json()["type"].endswith("/active-changed")
    assert (late.json()["expected_active"], late.json()["active"]) == (1, 3)
    assert client.get(f"{BASE}/active", headers=pharmacist).json()["version"] == 3
    bad = client.post(f"{BASE}/2/activate", json={"expected_active": "3"}, headers=pharmacist)
    assert bad.status_code == 422


def test_reading_unknown_or_bad_versions(any_env: ApiEnv) -> None:
    client, pharmacist = any_env.client, any_env.as_role("pharmacist")
    missing = client.get(f"{BASE}/99", headers=pharmacist)
    assert missing.status_code == 404 and missing.json()["type"].endswith("/cost-matrix-not-found")
    bad = client.get(f"{BASE}/latest", headers=pharmacist)
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "path.version"
    assert client.post(f"{BASE}/99/activate", headers=pharmacist).status_code == 404
    assert client.get(f"{BASE}/99/csv", headers=pharmacist).status_code == 404
    assert client.get(f"{BASE}/diff", params={"from": 1, "to": 99}, headers=pharmacist).status_code == 404


def test_bare_ten_digit_ndcs_are_resolved_in_changes(env: ApiEnv) -> None:
    created = env.client.post(BASE, json=edit(1, change("0378020801", "00591046101", 6)),
                              headers=env.as_role("pharmacist"))
    assert created.status_code == 201, created.text
    assert {"true_ndc": FURO, "predicted_ndc": GLIP, "cost": 6.0} in created.json()["entries"]
