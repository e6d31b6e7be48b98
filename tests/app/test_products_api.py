"""The product catalog over HTTP: read with any role, change as a pharmacist, every change audited."""

from __future__ import annotations

import pytest

from app.orm import AdminAuditEntry, Product
from tests.app.factories import FURO, count_rows
from tests.conftest import ApiEnv

NEW = {"ndc": "1234-5678-90", "name": "Testamine 5 MG Oral Tablet", "shape": "Oval", "colour": "Blue",
       "imprint": ["T", "5"], "size_mm": 7}


def test_catalog_holds_the_twenty_pmi_products(env: ApiEnv) -> None:
    products = env.client.get("/v1/products", headers=env.as_role("client")).json()
    assert len(products) == 20 and products[0]["ndc"] == FURO
    assert products[0]["imprint"] == ["M2"] and products[0]["size_mm"] == 6.0 and products[0]["active"]


def test_catalog_pages_in_ndc_order(env: ApiEnv) -> None:
    client = env.as_role("client")
    everything = [p["ndc"] for p in env.client.get("/v1/products", headers=client).json()]
    assert everything == sorted(everything)
    seen: list[str] = []
    url: str | None = "/v1/products?limit=7"
    while url:
        page = env.client.get(url, headers=client)
        assert page.status_code == 200 and len(page.json()) <= 7
        seen += [p["ndc"] for p in page.json()]
        url = page.links.get("next", {}).get("url")
    assert seen == everything  # 7 + 7 + 6: the last page is not full, so it has no Link
    assert env.client.get("/v1/products", headers=client, params={"after_ndc": everything[-1]}).json() == []
    for bad in ({"limit": 0}, {"limit": 1001}, {"after_ndc": "x" * 17}, {"after_ndc": "0378\x00"}):
        response = env.client.get("/v1/products", headers=client, params=bad)
        assert response.status_code == 422 and response.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize("spelling", [FURO, "0378-0208-01", "00378-208-01", "00378020801", "0378020801",
                                      "000378-0208-01"])
def test_products_are_found_by_any_ndc_spelling(env: ApiEnv, spelling: str) -> None:
    response = env.client.get(f"/v1/products/{spelling}", headers=env.as_role("client"))
    assert response.status_code == 200 and response.json()["ndc"] == FURO


def test_unknown_and_malformed_ndcs(env: ApiEnv) -> None:
    client = env.as_role("client")
    unknown = env.client.get("/v1/products/99999-0001", headers=client)
    assert unknown.status_code == 404 and unknown.json()["type"].endswith("/product-not-found")
    malformed = env.client.get("/v1/products/abc", headers=client)
    assert malformed.status_code == 422 and malformed.json()["type"].endswith("/malformed-ndc")
    assert malformed.headers["content-type"] == "application/problem+json"


def test_create_normalises_the_ndc_and_audits(any_env: ApiEnv) -> None:
    pharmacist = any_env.as_role("pharmacist")
    created = any_env.client.post("/v1/admin/products", json={**NEW, "reason": "new generic"}, headers=pharmacist)
    assert created.status_code == 201, created.text
    assert created.json()["ndc"] == "01234-5678" and created.headers["location"] == "/v1/products/01234-5678"
    duplicate = any_env.client.post("/v1/admin/products", json={**NEW, "ndc": "01234-5678"}, headers=pharmacist)
    assert duplicate.status_code == 409 and duplicate.json()["type"].endswith("/product-exists")
    entry = any_env.client.get("/v1/admin/audit-log", params={"action": "product.create"},
                               headers=pharmacist).json()["items"][0]
    assert entry["entity_id"] == "01234-5678" and entry["reason"] == "new generic"
    assert entry["details"]["ndc_input"] == "1234-5678-90"


@pytest.mark.parametrize(("body", "field"), [
    ({**NEW, "ndc": "1234567890"}, "ndc"),        # bare 10 digits: never guessed
    ({**NEW, "ndc": "12-34"}, "ndc"),
    ({**NEW, "size_mm": "7"}, "size_mm"),
    ({**NEW, "size_mm": -1}, "size_mm"),
    ({**NEW, "imprint": "T5"}, "imprint"),
    ({**NEW, "active": "yes"}, "active"),
    ({**NEW, "colour": ""}, "colour"),
    ({**NEW, "barcode": "x"}, "barcode"),
    ({k: v for k, v in NEW.items() if k != "name"}, "name"),
])
def test_create_rejects_bad_input_and_writes_nothing(env: ApiEnv, body: dict[str, object], field: str) -> None:
    before = (count_rows(env.settings, Product), count_rows(env.settings, AdminAuditEntry))
    response = env.client.post("/v1/admin/products", json=body, headers=env.as_role("pharmacist"))
    assert response.status_code == 422, response.text
    assert field in [e["field"] for e in response.json()["errors"]]
    assert (count_rows(env.settings, Product), count_rows(env.settings, AdminAuditEntry)) == before


def test_patch_changes_fields_and_the_active_flag(any_env: ApiEnv) -> None:
    pharmacist = any_env.as_role("pharmacist")
    patched = any_env.client.patch("/v1/admin/products/0378-0208-01",
                                   json={"active": False, "colour": "Off-white", "reason": "recalled"},
                                   headers=pharmacist)
    assert patched.status_code == 200, patched.text
    assert patched.json()["active"] is False and patched.json()["colour"] == "Off-white"
    active = any_env.client.get("/v1/products", params={"active": "true"}, headers=pharmacist).json()
    assert FURO not in [p["ndc"] for p in active] and len(active) == 19
    entry = any_env.client.get("/v1/admin/audit-log", params={"entity_id": FURO}, headers=pharmacist).json()["items"][0]
    assert entry["action"] == "product.update" and entry["reason"] == "recalled"
    assert entry["details"]["changes"] == {"active": [True, False], "colour": ["White", "Off-white"]}


def test_patch_errors(env: ApiEnv) -> None:
    pharmacist = env.as_role("pharmacist")
    assert env.client.patch("/v1/admin/products/99999-0001", json={"active": False},
                            headers=pharmacist).status_code == 404
    null_name = env.client.patch(f"/v1/admin/products/{FURO}", json={"name": None}, headers=pharmacist)
    assert null_name.status_code == 422 and null_name.json()["errors"][0]["field"] == "name"
    # ... and the schema says so: such a field may be left out, but it is not nullable.
    schema = env.client.get("/openapi.json").json()["components"]["schemas"]["ProductUpdate"]["properties"]
    assert schema["name"]["type"] == "string" and "anyOf" not in schema["name"] and "default" not in schema["name"]
    assert any(v.get("type") == "null" for v in schema["size_mm"]["anyOf"])  # size_mm may be cleared
    read_only = env.client.patch(f"/v1/admin/products/{FURO}", json={"ndc": "00000-0000"}, headers=pharmacist)
    assert read_only.status_code == 422 and read_only.json()["errors"][0]["field"] == "ndc"
    # Each imprint side is bounded (it is stored, audited and sent with every catalog page).
    for side in ("x" * 41, ""):
        long_side = env.client.patch(f"/v1/admin/products/{FURO}", json={"imprint": ["M2", side]}, headers=pharmacist)
        assert long_side.status_code == 422 and long_side.json()["errors"][0]["field"] == "imprint[1]"
