"""The data layer: one scope commits, services only flush, immutable rows stay immutable, UTC timestamps."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import Database
from app.orm import AdminAuditEntry, CostMatrixEntry, CostMatrixVersion, Product, Role
from app.orm.guards import ImmutableRowError
from app.services.api_keys import create_api_key
from app.services.audit import Actor
from tests.app.factories import count_rows, seed_catalog

ACTOR = Actor.cli("test")


def _product(ndc: str = "12345-6789") -> Product:
    return Product(ndc=ndc, name="Test", shape="Round", colour="White", imprint=["T"], size_mm=5.0)


def test_session_scope_commits_or_rolls_back(db_settings: Settings) -> None:
    database = Database(db_settings)
    try:
        with database.session() as session:
            session.add(_product("11111-1111"))
        with pytest.raises(RuntimeError), database.session() as session:
            session.add(_product("22222-2222"))
            session.flush()
            raise RuntimeError("after the flush")
        with database.session() as session:
            assert set(session.scalars(select(Product.ndc))) == {"11111-1111"}
    finally:
        database.dispose()


def test_services_flush_but_never_commit(db_settings: Settings) -> None:
    database = Database(db_settings)
    try:
        with pytest.raises(RuntimeError), database.session() as session:
            key, _token = create_api_key(session, role=Role.CLIENT, name="x", actor=ACTOR)
            assert key.id is not None  # flushed: the id exists inside the transaction
            raise RuntimeError("the request failed later")
    finally:
        database.dispose()
    assert count_rows(db_settings, AdminAuditEntry) == 0


def test_cost_matrix_versions_and_audit_entries_are_immutable(db_settings: Settings) -> None:
    seed_catalog(db_settings)
    database = Database(db_settings)
    try:
        with pytest.raises(ImmutableRowError), database.session() as session:
            session.get_one(CostMatrixVersion, 1).reason = "rewritten history"
        with pytest.raises(ImmutableRowError), database.session() as session:
            session.scalars(select(CostMatrixEntry)).first().cost = 99.0  # type: ignore[union-attr]
        with pytest.raises(ImmutableRowError), database.session() as session:
            session.delete(session.scalars(select(AdminAuditEntry)).first())
        with database.session() as session:
            assert session.get_one(CostMatrixVersion, 1).reason.startswith("PMI expert")
    finally:
        database.dispose()


def test_foreign_keys_and_checks_are_enforced(db_settings: Settings) -> None:
    seed_catalog(db_settings)
    database = Database(db_settings)
    try:
        with pytest.raises(IntegrityError), database.session() as session:
            session.add(CostMatrixEntry(version_id=1, true_ndc="99999-9999", predicted_ndc="00378-0208", cost=2.0))
            session.flush()
        with pytest.raises(IntegrityError), database.session() as session:
            session.add(CostMatrixVersion(parent_id=None, author="x", reason="x", entries_sha256="0" * 64,
                                          entries=[CostMatrixEntry(true_ndc="00378-0208", predicted_ndc="00378-0208",
                                                                   cost=0.0)]))
            session.flush()
    finally:
        database.dispose()


def test_timestamps_come_back_in_utc(db_settings: Settings) -> None:
    database = Database(db_settings)
    local = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=-5)))
    try:
        with database.session() as session:
            product = _product()
            product.created_at = local
            session.add(product)
        with database.session() as session:
            stored = session.get_one(Product, "12345-6789").created_at
        assert stored == local and stored.tzinfo is not None and stored.utcoffset() == timedelta(0)
        with pytest.raises(Exception, match="naive"), database.session() as session:
            naive = _product("22222-2222")
            naive.created_at = datetime(2030, 1, 1)
            session.add(naive)
    finally:
        database.dispose()
    assert datetime.now(UTC).tzinfo is UTC


@pytest.mark.postgres
def test_pg_session_rolls_back_after_each_test(pg_session: Session) -> None:
    pg_session.add(_product("33333-3333"))
    pg_session.commit()  # a savepoint inside the fixture's outer transaction
    assert pg_session.get(Product, "33333-3333") is not None


@pytest.mark.postgres
def test_nothing_leaked_from_the_previous_test(pg_settings: Settings) -> None:
    assert count_rows(pg_settings, Product) == 0


def test_seed_is_idempotent(db_settings: Settings) -> None:
    first = seed_catalog(db_settings)
    counts: dict[str, Any] = {m.__name__: count_rows(db_settings, m)
                              for m in (Product, CostMatrixVersion, CostMatrixEntry, AdminAuditEntry)}
    second = seed_catalog(db_settings)
    assert (first.products_added, first.cost_matrix_created, first.cost_matrix_activated) == (20, True, True)
    assert (second.products_added, second.cost_matrix_created, second.cost_matrix_activated) == (0, False, False)
    assert counts == {m.__name__: count_rows(db_settings, m)
                      for m in (Product, CostMatrixVersion, CostMatrixEntry, AdminAuditEntry)}
    assert counts["Product"] == 20 and counts["CostMatrixEntry"] == 4


@pytest.mark.postgres
def test_a_statement_blocked_by_a_lock_is_cancelled_after_the_statement_timeout(
        pg_settings: Settings, make_client: Any, api_key: Any) -> None:
    """A request waiting on a lock held elsewhere (a long migration, a stuck transaction) held its request
    thread until the lock went, 49 s in a review; with RXVERIFY_DB_STATEMENT_TIMEOUT_MS it answers 503."""
    import time

    from sqlalchemy import create_engine, text

    settings = pg_settings.model_copy(update={"db_statement_timeout_ms": 300})
    client = make_client(settings)
    key = api_key(settings, Role.PHARMACIST)
    other = create_engine(settings.database_url)
    try:
        with other.begin() as connection:
            connection.execute(text("LOCK TABLE products IN ACCESS EXCLUSIVE MODE"))
            started = time.perf_counter()
            answer = client.get("/v1/products", headers={"X-API-Key": key})
            waited = time.perf_counter() - started
        assert answer.status_code == 503 and answer.json()["type"].endswith("/database-unavailable"), answer.text
        assert waited < 5, waited
        assert client.get("/v1/products", headers={"X-API-Key": key}).status_code == 200  # the lock is gone
    finally:
        other.dispose()
