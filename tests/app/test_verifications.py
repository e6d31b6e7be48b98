"""POST /v1/verifications end to end on a tiny served model: verdicts, idempotency, the audit record."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from app.db import Database
from app.orm import Role, Verification
from models.costs import CostMatrix
from models.decision import CONFORMAL_GUARANTEE
from tests.app.factories import change, count_rows, edit
from tests.app.model_factory import (
    FAVOURITE,
    cached_checkpoint,
    jpeg_photo,
    post_verification,
    served_settings,
)
from tests.conftest import ApiEnv

GLIP = "00591-0461"


@pytest.fixture(scope="session")
def checkpoint_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("verification-checkpoints")


@pytest.fixture
def served(seeded_sqlite_template: tuple[Path, dict[Role, str]], tmp_path: Path, make_client: Any,
           checkpoint_root: Path) -> ApiEnv:
    template, keys = seeded_sqlite_template
    settings = served_settings(template, tmp_path / "data", checkpoint=cached_checkpoint(checkpoint_root),
                               retain_images=True)
    return ApiEnv(settings, make_client(settings), dict(keys))


@pytest.fixture
def served_uncapped(seeded_sqlite_template: tuple[Path, dict[Role, str]], tmp_path: Path, make_client: Any,
                    checkpoint_root: Path) -> ApiEnv:
    """`served` with RXVERIFY_MAX_ACCEPT_RISK above every fitted threshold (this model's is 0.71, fitted on
    rough simulated outputs), for tests of the thresholds fitted and refitted on validation themselves."""
    template, keys = seeded_sqlite_template
    settings = served_settings(template, tmp_path / "data", checkpoint=cached_checkpoint(checkpoint_root),
                               max_accept_risk=10.0)
    return ApiEnv(settings, make_client(settings), dict(keys))


def rows(settings: Any) -> list[Verification]:
    database = Database(settings)
    try:
        with database.session() as session:
            return list(session.scalars(select(Verification).order_by(Verification.created_at)))
    finally:
        database.dispose()


def test_ready_and_a_match_with_every_field(served: ApiEnv) -> None:
    assert served.client.get("/readyz").json()["model_loaded"] is True
    response = post_verification(served.client, served.keys[Role.CLIENT], image=jpeg_photo(),
                                 ndc="0378-0208-01", client_reference="tx-1")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["verdict"] == "match" and body["reason"] == "accepted"
    assert body["prescribed_ndc"] == FAVOURITE and body["prescribed_ndc_input"] == "0378-0208-01"
    assert body["predicted_ndc"] == FAVOURITE and body["probability_prescribed"] == pytest.approx(0.98, abs=1e-4)
    assert 0 < body["expected_accept_cost"] < 1
    assert body["top"][0] == {"ndc": FAVOURITE, "probability": pytest.approx(0.98, abs=1e-4)} and len(body["top"]) == 5
    assert FAVOURITE in body["conformal_set"]
    assert body["model_version"] == 1 and body["cost_matrix_version"] == 1 and len(body["model_sha256"]) == 64
    assert body["client_reference"] == "tx-1" and body["id"] and body["created_at"]


@pytest.mark.parametrize("ceiling", [None, 0.2])
def test_no_match_is_riskier_than_the_accept_ceiling(seeded_sqlite_template: tuple[Path, dict[Role, str]],
                                                     tmp_path: Path, make_client: Any, checkpoint_root: Path,
                                                     ceiling: float | None) -> None:
    """RXVERIFY_MAX_ACCEPT_RISK caps the threshold fitted on validation. This model's fitted threshold is 0.71
    (its simulated validation outputs are rough), so a fill with a 1 in 10 chance of being another product
    (expected cost 0.15) was a match; under the default ceiling (0.05) it goes to review, unless an
    operator raises the ceiling."""
    template, keys = seeded_sqlite_template
    overrides = {} if ceiling is None else {"max_accept_risk": ceiling}
    settings = served_settings(template, tmp_path / "data", checkpoint=cached_checkpoint(checkpoint_root, confidence=0.9),
                               **overrides)
    client = make_client(settings)
    body = post_verification(client, keys[Role.CLIENT], image=jpeg_photo()).json()
    assert body["probability_prescribed"] == pytest.approx(0.9, abs=1e-4) and body["predicted_ndc"] == FAVOURITE
    # The model serves 19 products: 17 at cost 1 and one critical substitute (cost 10) share the other 0.1.
    assert body["expected_accept_cost"] == pytest.approx(0.1 / 18 * 27, abs=1e-4)
    if ceiling is None:
        assert settings.max_accept_risk == 0.05
        assert (body["verdict"], body["reason"]) == ("review", "accept-risk-too-high")
        assert body["accept_risk_threshold"] == 0.05
    else:
        assert (body["verdict"], body["reason"]) == ("match", "accepted")
        assert body["accept_risk_threshold"] == 0.2
    assert body["policy_fitted_for_cost_matrix"] is True
    # The policy a pharmacist reads for this model is the one the verdict was held to.
    policy = client.get("/v1/admin/models/1/policy", headers={"X-API-Key": keys[Role.PHARMACIST]}).json()
    assert policy["accept_risk"] == body["accept_risk_threshold"]


def test_mismatch_names_the_likely_content(served: ApiEnv) -> None:
    response = post_verification(served.client, served.keys[Role.CLIENT], image=jpeg_photo(), ndc=GLIP)
    body = response.json()
    assert response.status_code == 200 and body["verdict"] == "mismatch"
    assert body["reason"] == "prescribed-implausible" and body["predicted_ndc"] == FAVOURITE
    assert GLIP not in body["conformal_set"]


def test_every_200_has_its_audit_record_with_the_retained_image(served: ApiEnv) -> None:
    photo = jpeg_photo(seed=3)
    answers = [post_verification(served.client, served.keys[Role.CLIENT], image=photo, ndc=ndc).json()
               for ndc in (FAVOURITE, GLIP, "00378020801")]
    stored = {row.id: row for row in rows(served.settings)}
    assert set(stored) == {a["id"] for a in answers}
    for answer in answers:
        row = stored[answer["id"]]
        assert row.response == answer and row.verdict == answer["verdict"]
        assert row.image_sha256 == answer["image_sha256"] and row.image_format == "JPEG"
        assert (row.image_width, row.image_height) == (96, 72) and row.latency_ms and row.latency_ms > 0
        assert row.image_path and Path(row.image_path).read_bytes() == photo
        assert row.model_version_id == 1 and row.cost_matrix_version_id == 1


def test_images_are_not_kept_unless_configured(seeded_sqlite_template: Any, tmp_path: Path, make_client: Any,
                                               checkpoint_root: Path) -> None:
    template, keys = seeded_sqlite_template
    settings = served_settings(template, tmp_path / "data", checkpoint=cached_checkpoint(checkpoint_root))
    client = make_client(settings)
    assert post_verification(client, keys[Role.CLIENT], image=jpeg_photo()).status_code == 200
    (row,) = rows(settings)
    assert row.image_path is None and len(row.image_sha256) == 64
    assert not any(p.is_file() for p in settings.images_dir.rglob("*"))


def test_an_idempotent_retry_returns_the_first_answer(served: ApiEnv) -> None:
    key = served.keys[Role.CLIENT]
    first = post_verification(served.client, key, image=jpeg_photo(), headers={"Idempotency-Key": "tx-42"})
    again = post_verification(served.client, key, image=jpeg_photo(), headers={"Idempotency-Key": "tx-42"})
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json() and again.headers["Idempotent-Replayed"] == "true"
    assert count_rows(served.settings, Verification) == 1
    other = post_verification(served.client, key, image=jpeg_photo(seed=9), headers={"Idempotency-Key": "tx-42"})
    assert other.status_code == 422
    assert other.json()["type"].endswith("/idempotency-key-reused")
    assert other.json()["verification_id"] == first.json()["id"]
    # Keys are scoped to the API key: another client may use the same string.
    third = post_verification(served.client, served.keys[Role.PHARMACIST], image=jpeg_photo(seed=9),
                              headers={"Idempotency-Key": "tx-42"})
    assert third.status_code == 200 and third.json()["id"] != first.json()["id"]
    assert count_rows(served.settings, Verification) == 2


def test_openapi_documents_the_contract(served: ApiEnv) -> None:
    operation = served.client.get("/openapi.json").json()["paths"]["/v1/verifications"]["post"]
    assert "pharmacist must check the bottle" in operation["description"]
    assert CONFORMAL_GUARANTEE[:60] in operation["description"]
    schema = operation["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert schema["required"] == ["image", "prescribed_ndc"]


def test_metrics_count_verdicts_by_model_version(served: ApiEnv) -> None:
    post_verification(served.client, served.keys[Role.CLIENT], image=jpeg_photo())
    text = served.client.get("/metrics").text
    assert 'rxverify_verdicts_total{model_version="1",verdict="match"}' in text
    assert "rxverify_verification_duration_seconds_bucket" in text
    assert "rxverify_inference_batch_size_bucket" in text and "rxverify_inference_queue_wait_seconds" in text


def _activate_edit(env: ApiEnv, *changes: dict[str, Any]) -> int:
    pharmacist = env.as_role("pharmacist")
    created = env.client.post("/v1/admin/cost-matrices", json=edit(1, *changes), headers=pharmacist)
    assert created.status_code == 201, created.text
    version = int(created.json()["version"])
    activated = env.client.post(f"/v1/admin/cost-matrices/{version}/activate", json={"reason": "test"},
                                headers=pharmacist)
    assert activated.status_code == 200, activated.text
    return version


def test_a_cost_change_refits_the_thresholds_for_the_next_verdict(served_uncapped: ApiEnv, checkpoint_root: Path) -> None:
    from models.checkpoint import read_metadata
    from models.decision import VerdictPolicy, refit_policy
    from tests.app.model_factory import SERVED_CLASSES, expert_costs, simulated_validation

    served = served_uncapped
    stored = VerdictPolicy.from_dict(read_metadata(cached_checkpoint(checkpoint_root)).decision)
    first = post_verification(served.client, served.keys[Role.CLIENT], image=jpeg_photo(), ndc=FAVOURITE).json()
    assert first["policy_fitted_for_cost_matrix"] is True
    assert first["accept_risk_threshold"] == pytest.approx(stored.accept_risk)
    # A pharmacist makes "glipizide in a furosemide bottle" critical: the risk of accepting furosemide rises
    # and the thresholds are refitted for the new matrix (on the validation outputs stored with the model).
    version = _activate_edit(served, change(GLIP, FAVOURITE, 40))
    second = post_verification(served.client, served.keys[Role.CLIENT], image=jpeg_photo(), ndc=FAVOURITE).json()
    assert second["cost_matrix_version"] == version and second["policy_fitted_for_cost_matrix"] is True
    new_costs = CostMatrix.from_pairs(SERVED_CLASSES, {**{(t, p): c for t, p, c in expert_costs(SERVED_CLASSES).entries()
                                                         if c != 1.0}, (GLIP, FAVOURITE): 40.0})
    expected = refit_policy(stored, *simulated_validation(SERVED_CLASSES), cost_matrix=new_costs)
    assert expected.accept_risk != stored.accept_risk
    assert second["accept_risk_threshold"] == pytest.approx(expected.accept_risk)
    assert second["expected_accept_cost"] > first["expected_accept_cost"]
    detail = served.client.get(f"/v1/verifications/{second['id']}",
                               headers=served.as_role("pharmacist")).json()
    assert detail["accept_risk_threshold"] == second["accept_risk_threshold"]


def test_a_checkpoint_without_validation_outputs_says_its_thresholds_are_for_other_costs(
        seeded_sqlite_template: Any, tmp_path: Path, make_client: Any, checkpoint_root: Path) -> None:
    template, keys = seeded_sqlite_template
    settings = served_settings(template, tmp_path / "data",
                               checkpoint=cached_checkpoint(checkpoint_root, store_validation=False))
    env = ApiEnv(settings, make_client(settings), dict(keys))
    before = post_verification(env.client, keys[Role.CLIENT], image=jpeg_photo(), ndc=FAVOURITE).json()
    assert before["policy_fitted_for_cost_matrix"] is True
    _activate_edit(env, change(GLIP, FAVOURITE, 40))
    after = post_verification(env.client, keys[Role.CLIENT], image=jpeg_photo(), ndc=FAVOURITE).json()
    assert after["policy_fitted_for_cost_matrix"] is False
    assert after["accept_risk_threshold"] == before["accept_risk_threshold"]


def test_a_pharmacist_reads_the_thresholds_a_cost_edit_would_bring_before_activating_it(
        served_uncapped: ApiEnv, checkpoint_root: Path) -> None:
    from models.checkpoint import read_metadata
    from models.decision import VerdictPolicy, refit_policy
    from tests.app.model_factory import SERVED_CLASSES, expert_costs, simulated_validation

    served = served_uncapped
    stored = VerdictPolicy.from_dict(read_metadata(cached_checkpoint(checkpoint_root)).decision)
    pharmacist = served.as_role("pharmacist")
    now = served.client.get("/v1/admin/models/1/policy", headers=pharmacist)
    assert now.status_code == 200, now.text
    body = now.json()
    assert (body["model_version"], body["cost_matrix_version"]) == (1, 1)
    assert body["fitted_for_cost_matrix"] is True and body["refitted"] is False
    glip = SERVED_CLASSES.index(GLIP)
    assert body["accept_risk"] == stored.accept_risk and body["miss_rates"][GLIP] == stored.alpha[glip]
    created = served.client.post("/v1/admin/cost-matrices", json=edit(1, change(GLIP, FAVOURITE, 40)), headers=pharmacist)
    assert created.status_code == 201
    what_if = served.client.get("/v1/admin/models/1/policy", params={"cost_matrix_version": 2}, headers=pharmacist)
    assert what_if.status_code == 200, what_if.text
    body = what_if.json()
    new_costs = CostMatrix.from_pairs(SERVED_CLASSES, {**{(t, p): c for t, p, c in expert_costs(SERVED_CLASSES).entries()
                                                         if c != 1.0}, (GLIP, FAVOURITE): 40.0})
    expected = refit_policy(stored, *simulated_validation(SERVED_CLASSES), cost_matrix=new_costs)
    assert body["cost_matrix_version"] == 2 and body["refitted"] is True and body["fitted_for_cost_matrix"] is True
    assert body["accept_risk"] == expected.accept_risk != stored.accept_risk
    assert body["miss_rates"] == dict(zip(SERVED_CLASSES, expected.alpha, strict=True))
    assert body["report"]["cost_matrix_sha256"] == new_costs.fingerprint()
    # Nothing was activated: verdicts still use version 1.
    verdict = post_verification(served.client, served.keys[Role.CLIENT], image=jpeg_photo(), ndc=FAVOURITE).json()
    assert verdict["cost_matrix_version"] == 1 and verdict["accept_risk_threshold"] == stored.accept_risk
    for path, params, status in (("/v1/admin/models/1/policy", {"cost_matrix_version": 99}, 404),
                                 ("/v1/admin/models/99/policy", {}, 404),
                                 ("/v1/admin/models/1/policy", {"cost_matrix_version": 0}, 422)):
        answer = served.client.get(path, params=params, headers=pharmacist)
        assert answer.status_code == status and answer.headers["content-type"] == "application/problem+json"
    assert served.client.get("/v1/admin/models/1/policy", headers=served.as_role("client")).status_code == 403


class _QueueProbe:
    """Stands in for the write queue's mutex; runs `on_release` when a transaction lets go of it."""

    def __init__(self, on_release: Any = None, *, engine: Any = None, mutex: Any = None) -> None:
        self.on_release, self.engine, self.mutex, self.acquired, self.released = on_release, engine, mutex, 0, 0
        self.threads: list[tuple[str, int]] = []  # ("acquire" | "release", thread id)
        self.connections_at_acquire: list[int] = []

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        """Record the call; then take `mutex` if one was given (a real queue), else never block."""
        self.acquired += 1
        self.threads.append(("acquire", threading.get_ident()))
        if self.engine is not None:
            self.connections_at_acquire.append(self.engine.pool.checkedout())
        return self.mutex.acquire(blocking, timeout) if self.mutex is not None else True

    def release(self) -> None:
        self.released += 1
        self.threads.append(("release", threading.get_ident()))
        if self.mutex is not None:
            self.mutex.release()
        if self.on_release is not None:
            self.on_release()


def test_the_audit_row_is_committed_inside_the_sqlite_write_queue(served: ApiEnv) -> None:
    """In-process SQLite writers queue on a mutex instead of sleeping in SQLite's busy handler, and the
    row is committed before the mutex is let go (no write lock is held across the event loop)."""
    database = served.client.app.state.db
    assert database.queues_writes and isinstance(database._write_lock, type(threading.Lock()))
    committed_at_release: list[int] = []
    probe = _QueueProbe(lambda: committed_at_release.append(len(rows(served.settings))),  # what others see
                        engine=database.engine)
    database._write_lock = probe
    for expected in (1, 2):
        response = post_verification(served.client, served.keys[Role.CLIENT], image=jpeg_photo(seed=expected))
        assert response.status_code == 200, response.text
        assert committed_at_release[-1] == expected
    assert committed_at_release == [1, 2] and probe.acquired == probe.released == 2
    # Taken and let go in one thread call (`_conclude_and_record`), never across a return to the event loop.
    for (taken, taker), (let_go, releaser) in zip(probe.threads[::2], probe.threads[1::2], strict=True):
        assert (taken, let_go) == ("acquire", "release") and taker == releaser
    # The writer holds its pooled connection before it queues (one lock order for every writer).
    assert probe.connections_at_acquire and all(n >= 1 for n in probe.connections_at_acquire)


def test_every_api_write_takes_the_queue_and_commits_before_letting_go(served: ApiEnv) -> None:
    """Not only verifications: a pharmacist's cost edit and its activation (writes in the endpoint, the
    commit in the session dependency's teardown) queue too, one turn per transaction, released only
    after the commit; reads never take it."""
    from app.orm import CostMatrixVersion
    from app.services.cost_matrices import active_version_id

    def what_others_see() -> tuple[int, int | None]:
        other = Database(served.settings)
        try:
            with other.session() as session:
                return count_rows(served.settings, CostMatrixVersion), active_version_id(session)
        finally:
            other.dispose()

    seen_at_release: list[tuple[int, int | None]] = []
    probe = _QueueProbe(lambda: seen_at_release.append(what_others_see()))
    served.client.app.state.db._write_lock = probe
    active_before = what_others_see()[1]
    before = count_rows(served.settings, CostMatrixVersion)
    pharmacist = served.as_role("pharmacist")
    assert served.client.get("/v1/admin/cost-matrices", headers=pharmacist).status_code == 200
    assert served.client.get("/v1/products", headers=served.as_role("client")).status_code == 200
    assert probe.acquired == 0  # reads (and API-key lookups) do not queue
    version = _activate_edit(served, change(FAVOURITE, "50111-0434", 7))
    assert version == before + 1
    assert probe.acquired == probe.released == 2  # the edit, then its activation
    assert seen_at_release == [(before + 1, active_before), (before + 1, version)]  # each committed first


def test_a_writer_queued_past_the_busy_timeout_gets_a_503_and_the_service_recovers(
        seeded_sqlite_template: tuple[Path, dict[Role, str]], tmp_path: Path, make_client: Any,
        checkpoint_root: Path) -> None:
    template, keys = seeded_sqlite_template
    settings = served_settings(template, tmp_path / "data", checkpoint=cached_checkpoint(checkpoint_root),
                               db_busy_timeout_ms=200, retain_images=True)
    env = ApiEnv(settings, make_client(settings), dict(keys))
    queue = env.client.app.state.db._write_lock

    def refused(image: bytes) -> None:
        assert queue.acquire()  # another in-process writer holds it
        try:
            response = post_verification(env.client, env.keys[Role.CLIENT], image=image)
            assert response.status_code == 503, response.text
            assert response.headers["content-type"] == "application/problem+json"
            assert response.json()["type"].endswith("database-unavailable")
        finally:
            queue.release()

    from prometheus_client import REGISTRY

    def counted() -> float:
        return REGISTRY.get_sample_value("rxverify_verification_rejected_total",
                                         {"reason": "database-unavailable"}) or 0.0

    before = counted()
    refused(jpeg_photo(seed=3))
    assert counted() == before + 1  # an operator's alert on refused verifications sees it (it did not)
    assert rows(settings) == []  # nothing half-written
    assert list(settings.images_dir.rglob("*.*")) == []  # nor the retained photo
    answered = post_verification(env.client, env.keys[Role.CLIENT], image=jpeg_photo(seed=3))
    assert answered.status_code == 200, answered.text
    [row] = rows(settings)
    assert row.id == answered.json()["id"] and row.image_path and Path(row.image_path).is_file()
    refused(jpeg_photo(seed=3))  # the same photo again: the stored file belongs to the committed row
    assert Path(row.image_path).is_file() and list(settings.images_dir.rglob("*.*")) == [Path(row.image_path)]


def test_a_failed_request_never_deletes_the_photo_of_a_concurrent_one(tmp_path: Path) -> None:
    """Two requests with the same photo (a client's retry after a timeout): the first one's audit write fails
    while the second is about to commit. The first deletes only the file it stored itself."""
    from app.config import Settings
    from app.inference.images import sha256_hex
    from app.services import verifications as service

    settings = Settings(data_dir=tmp_path / "data")
    photo = jpeg_photo(seed=4)
    sha = sha256_hex(photo)
    first, second = (service.retain_image(settings, data=photo, sha256=sha, image_format="JPEG") for _ in range(2))
    assert first != second and first.read_bytes() == second.read_bytes() == photo
    assert first.parent == second.parent == settings.images_dir / sha[:2] and first.name.startswith(sha)
    failed = service.Concluded(row=None, body={}, decision=None, request_sha256="", new_image=first)  # type: ignore[arg-type]
    service.discard_unrecorded_image(failed)
    assert not first.exists() and second.read_bytes() == photo


def test_a_queued_writer_goes_on_as_soon_as_the_other_commits(served: ApiEnv) -> None:
    """A second in-process writer waits on the mutex (not in SQLite's busy handler) and proceeds once
    the first transaction ends."""
    from app.orm import Product

    database = served.client.app.state.db
    mutex = threading.Lock()
    probe = database._write_lock = _QueueProbe(mutex=mutex)
    turns = probe.threads
    started, done = threading.Event(), threading.Event()

    def second_writer() -> None:
        with database.session() as session:
            started.set()
            session.execute(update(Product).values(active=Product.active))
        done.set()

    with database.session() as first:
        first.execute(update(Product).values(active=Product.active))  # holds the queue from here
        thread = threading.Thread(target=second_writer, name="second-writer")
        thread.start()
        assert started.wait(5)
        deadline = time.monotonic() + 10
        while len(turns) < 2 and time.monotonic() < deadline:  # until the second writer asks for its turn
            time.sleep(0.01)
        assert turns == [("acquire", threading.get_ident()), ("acquire", thread.ident)]  # on the mutex, not in SQLite
        assert not done.wait(0.2)  # and waits there behind the open transaction
    assert done.wait(5)  # the first committed: the second went on
    thread.join()
    assert not mutex.locked() and probe.acquired == probe.released == 2


def test_postgresql_writers_do_not_queue_in_process(pg_settings: Any) -> None:
    postgres = Database(pg_settings)
    try:
        assert not postgres.queues_writes  # concurrent inserts are fine there
    finally:
        postgres.dispose()


def test_a_commit_elsewhere_between_the_cost_matrix_read_and_the_audit_write(
        served: ApiEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first verdict for a cost-matrix version reads it, and the worker may commit (a job's progress)
    right then. On SQLite a transaction that read before another connection's commit cannot write after
    it ("database is locked" at once): the audit write must not share a transaction with that read.
    pysqlite opens no transaction for a read by default, so the app's engine is made to here (as the
    migrations' engine is), which is what makes the route's own commit after `conclude` matter."""
    from sqlalchemy import update

    from app.db import _make_sqlite_ddl_transactional
    from app.orm import Product
    from app.services import verifications as service_module

    engine = served.client.app.state.db.engine
    _make_sqlite_ddl_transactional(engine)  # BEGIN before reads too
    engine.dispose()  # pooled connections were made without it

    read_version = service_module.cost_matrix_of
    other = Database(served.settings)  # another connection, as the worker process would have

    def read_then_another_connection_commits(*args: Any, **kwargs: Any) -> Any:
        matrix = read_version(*args, **kwargs)
        with other.session() as session:
            session.execute(update(Product).values(active=Product.active))
        return matrix

    monkeypatch.setattr(service_module, "cost_matrix_of", read_then_another_connection_commits)
    monkeypatch.setattr(service_module, "_matrix_cache", type(service_module._matrix_cache)())
    try:
        response = post_verification(served.client, served.keys[Role.CLIENT], image=jpeg_photo(seed=5))
    finally:
        other.dispose()
    assert response.status_code == 200, response.text
    assert [row.id for row in rows(served.settings)] == [response.json()["id"]]


def test_a_refused_idempotency_twin_lets_go_of_sqlite_before_the_queue(
        served: ApiEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two requests race with one Idempotency-Key and different photos: the loser's INSERT fails inside
    the write queue and it gets a 422. Its transaction must be rolled back before the queue is let go,
    or the next writer would find SQLite's lock taken and sleep in the busy handler."""
    import sqlite3

    from app.services import verifications as service_module

    key = {"Idempotency-Key": "twin-1"}
    first = post_verification(served.client, served.keys[Role.CLIENT], image=jpeg_photo(seed=1), headers=key)
    assert first.status_code == 200, first.text
    real = service_module._replay_or_refuse
    calls: list[int] = []

    def miss_the_twin_once(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return None if len(calls) == 1 else real(*args, **kwargs)  # `prepare` misses it, as in a race

    monkeypatch.setattr(service_module, "_replay_or_refuse", miss_the_twin_once)
    database_file = served.settings.database_url.removeprefix("sqlite:///")
    free_at_release: list[bool] = []

    def sqlite_is_free() -> None:
        probe = sqlite3.connect(database_file, timeout=0, isolation_level=None)
        try:
            probe.execute("BEGIN IMMEDIATE")
            probe.execute("ROLLBACK")
            free_at_release.append(True)
        except sqlite3.OperationalError:
            free_at_release.append(False)
        finally:
            probe.close()

    served.client.app.state.db._write_lock = _QueueProbe(sqlite_is_free)
    second = post_verification(served.client, served.keys[Role.CLIENT], image=jpeg_photo(seed=2), headers=key)
    assert second.status_code == 422 and second.json()["type"].endswith("idempotency-key-reused"), second.text
    assert len(calls) == 2 and free_at_release == [True]


def test_a_full_disk_for_retained_photos_is_a_503_naming_it(served: ApiEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    """With RXVERIFY_RETAIN_IMAGES a photo that cannot be written was a 500 internal-error."""
    import errno

    from models import files

    def full(_fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    before = len(rows(served.settings))
    monkeypatch.setattr(files.os, "fsync", full)
    response = post_verification(served.client, served.keys[Role.CLIENT], image=jpeg_photo(seed=7))
    assert response.status_code == 503 and response.headers["Retry-After"] == "30"
    assert response.json()["type"].endswith("/image-storage-unavailable") and "disk is full" in response.json()["detail"]
    assert len(rows(served.settings)) == before  # no verdict was given, so none is recorded
    assert not [p for p in served.settings.images_dir.rglob("*") if p.is_file()]  # nor half a photo left
    monkeypatch.undo()  # the disk has room again
    assert post_verification(served.client, served.keys[Role.CLIENT], image=jpeg_photo(seed=7)).status_code == 200
