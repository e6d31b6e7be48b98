"""The verification log (filters, pagination, one record), resolutions and labelled feedback examples."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from app.db import Database
from app.orm import Role
from app.services.verification_log import feedback_examples
from tests.app.factories import create_key, seed_catalog
from tests.app.model_factory import FAVOURITE, cached_checkpoint, install_model, jpeg_photo, post_verification
from tests.conftest import ApiEnv

GLIP = "00591-0461"


@pytest.fixture(scope="session")
def checkpoint_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("log-checkpoints")


@pytest.fixture
def served_any(db_settings: Any, make_client: Any, checkpoint_root: Path) -> ApiEnv:
    """A served app on SQLite and on PostgreSQL, retaining images."""
    settings = db_settings.model_copy(update={"retain_images": True})
    seed_catalog(settings)
    keys = {role: create_key(settings, role) for role in Role}
    install_model(settings, cached_checkpoint(checkpoint_root))
    return ApiEnv(settings, make_client(settings), keys)


def verify(env: ApiEnv, ndc: str, *, seed: int = 0) -> dict[str, Any]:
    response = post_verification(env.client, env.keys[Role.CLIENT], image=jpeg_photo(seed=seed), ndc=ndc)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_log_filters_and_keyset_pagination(served_any: ApiEnv) -> None:
    made = [verify(served_any, FAVOURITE if i % 2 == 0 else GLIP, seed=i) for i in range(5)]
    headers = served_any.as_role("pharmacist")
    seen: list[str] = []
    url: str | None = "/v1/verifications?limit=2"
    while url:
        page = served_any.client.get(url, headers=headers)
        assert page.status_code == 200, page.text
        seen += [item["id"] for item in page.json()["items"]]
        url = page.json()["next"]
    assert seen == [m["id"] for m in reversed(made)]  # newest first, no gaps, no repeats
    matches = served_any.client.get("/v1/verifications?verdict=match", headers=headers).json()["items"]
    assert {m["id"] for m in matches} == {m["id"] for m in made if m["verdict"] == "match"} and len(matches) == 3
    by_ndc = served_any.client.get("/v1/verifications", params={"ndc": "00591046101"}, headers=headers).json()
    assert len(by_ndc["items"]) == 2 and all(i["prescribed_ndc"] == GLIP for i in by_ndc["items"])
    by_model = served_any.client.get("/v1/verifications?model_version=1&verdict=mismatch", headers=headers).json()
    assert len(by_model["items"]) == 2
    assert served_any.client.get("/v1/verifications?model_version=99", headers=headers).json()["items"] == []
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    later = served_any.client.get("/v1/verifications", params={"created_from": future}, headers=headers).json()
    assert later["items"] == [] and later["next"] is None
    before = served_any.client.get("/v1/verifications", params={"created_before": future, "limit": 500},
                                   headers=headers).json()
    assert len(before["items"]) == 5
    bad = served_any.client.get("/v1/verifications?ndc=nonsense", headers=headers)
    assert bad.status_code == 422 and bad.json()["type"].endswith("/malformed-ndc")
    assert served_any.client.get("/v1/verifications?cursor=%%%", headers=headers).status_code == 422


def test_one_record_and_its_resolution_become_a_labelled_example(served_any: ApiEnv) -> None:
    made = verify(served_any, GLIP)
    headers = served_any.as_role("pharmacist")
    record = served_any.client.get(f"/v1/verifications/{made['id']}", headers=headers).json()
    assert record["verdict"] == "mismatch" and record["image_retained"] is True and record["resolution"] is None
    response = served_any.client.post(f"/v1/verifications/{made['id']}/resolution", headers=headers,
                                      json={"actual_ndc": "0378-0208-01", "checked_by": "R. Ph. Lee",
                                            "note": "furosemide, as the model said"})
    assert response.status_code == 201, response.text
    resolution = response.json()
    assert resolution["actual_ndc"] == FAVOURITE and resolution["checked_by"] == "R. Ph. Lee"
    assert resolution["matches_prescription"] is False and resolution["labelled_example"] is True
    again = served_any.client.get(f"/v1/verifications/{made['id']}", headers=headers).json()
    assert again["resolution"]["id"] == resolution["id"]
    database = Database(served_any.settings)
    try:
        with database.session() as session:
            examples = feedback_examples(session)
    finally:
        database.dispose()
    assert [(e.ndc, e.verification_id) for e in examples] == [(FAVOURITE, made["id"])]
    assert examples[0].image_path.read_bytes() == jpeg_photo(seed=0)
    image_path, ndc = examples[0][:2]
    assert ndc == FAVOURITE and image_path.is_file()


def test_resolution_errors(served_any: ApiEnv) -> None:
    made = verify(served_any, FAVOURITE)
    headers = served_any.as_role("pharmacist")
    missing = served_any.client.post("/v1/verifications/nope/resolution", headers=headers, json={"actual_ndc": GLIP})
    assert missing.status_code == 404 and missing.json()["type"].endswith("/verification-not-found")
    unknown = served_any.client.post(f"/v1/verifications/{made['id']}/resolution", headers=headers,
                                     json={"actual_ndc": "12345-6789"})
    assert unknown.status_code == 422 and unknown.json()["type"].endswith("/unknown-ndc")
    no_note = served_any.client.post(f"/v1/verifications/{made['id']}/resolution", headers=headers,
                                     json={"actual_ndc": None})
    assert no_note.status_code == 422
    other = served_any.client.post(f"/v1/verifications/{made['id']}/resolution", headers=headers,
                                   json={"actual_ndc": None, "note": "a product we do not stock"})
    assert other.status_code == 201 and other.json()["labelled_example"] is False
    assert other.json()["checked_by"].startswith("test pharmacist")
    # Each resolution is an admin audit entry, in the same transaction: the refused ones left none.
    audit = served_any.client.get("/v1/admin/audit-log", headers=headers,
                                  params={"action": "verification.resolve", "entity_id": made["id"]}).json()
    assert [entry["details"]["resolution_id"] for entry in audit["items"]] == [other.json()["id"]]
    entry = audit["items"][0]
    assert entry["entity_type"] == "verification" and entry["reason"] == "a product we do not stock"
    assert entry["details"]["actual_ndc"] is None and entry["details"]["supersedes"] is None
    relabel = served_any.client.post(f"/v1/verifications/{made['id']}/resolution", headers=headers,
                                     json={"actual_ndc": FAVOURITE, "checked_by": "R. Ph. Lee"})
    assert relabel.status_code == 201, relabel.text
    newest = served_any.client.get("/v1/admin/audit-log", headers=headers,
                                   params={"action": "verification.resolve", "entity_id": made["id"]}).json()["items"][0]
    assert newest["details"] == {"resolution_id": relabel.json()["id"], "actual_ndc": FAVOURITE,
                                 "prescribed_ndc": FAVOURITE, "checked_by": "R. Ph. Lee", "labelled_example": True,
                                 "supersedes": {"resolution_id": other.json()["id"], "actual_ndc": None}}
    assert newest["actor"].startswith("test pharmacist") and newest["reason"] is None
    assert served_any.client.get("/v1/verifications/nope", headers=headers).status_code == 404


def test_an_inactive_product_is_refused(served_any: ApiEnv) -> None:
    update = served_any.client.patch(f"/v1/admin/products/{GLIP}", headers=served_any.as_role("pharmacist"),
                                     json={"active": False, "reason": "recalled"})
    assert update.status_code == 200, update.text
    response = post_verification(served_any.client, served_any.keys[Role.CLIENT], image=jpeg_photo(), ndc=GLIP)
    assert response.status_code == 422 and response.json()["type"].endswith("/product-inactive")
    assert served_any.client.get("/readyz").status_code == 200


def test_concurrent_retries_with_one_idempotency_key_store_one_record(served_any: ApiEnv) -> None:
    import threading

    from app.orm import Verification
    from tests.app.factories import count_rows

    answers: list[Any] = []
    barrier = threading.Barrier(4)

    def retry() -> None:
        barrier.wait(5)
        answers.append(post_verification(served_any.client, served_any.keys[Role.CLIENT], image=jpeg_photo(),
                                         headers={"Idempotency-Key": "same-fill"}))

    threads = [threading.Thread(target=retry) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert [a.status_code for a in answers] == [200] * 4, [a.text for a in answers]
    assert len({a.json()["id"] for a in answers}) == 1
    assert count_rows(served_any.settings, Verification) == 1
