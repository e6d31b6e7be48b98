"""Concurrent edits of one parent: exactly one wins, on PostgreSQL (real connections) and on SQLite."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import select

from app.config import Settings
from app.db import Database
from app.errors import Conflict
from app.orm import AdminAuditEntry, CostMatrixVersion, Product
from app.services import cost_matrices
from app.services.audit import Actor
from models.pmi import PMI_PRODUCTS
from tests.app.factories import FURO, GLIP, change, count_rows, edit, seed_catalog
from tests.conftest import ApiEnv

WRITERS = 6


def _race(settings: Settings, monkeypatch: pytest.MonkeyPatch, *, parent: int | None) -> list[str]:
    """WRITERS threads edit `parent` at once; each has seen the same head before any of them inserts."""
    all_checked = threading.Barrier(WRITERS, timeout=20)
    real_head = cost_matrices.head_version

    def head_then_wait(session: Any) -> Any:
        head = real_head(session)
        all_checked.wait()  # nobody inserts before everybody has seen the same head
        return head

    monkeypatch.setattr(cost_matrices, "head_version", head_then_wait)
    database = Database(settings)

    def write(i: int) -> str:
        try:
            with database.session() as session:
                cost_matrices.create_version(session, parent_version=parent, reason=f"writer {i}",
                                             changes=[cost_matrices.CostChange(FURO, GLIP, float(i + 2))],
                                             actor=Actor.cli(f"writer {i}"), max_cost=1000.0)
            return "won"
        except Conflict as exc:
            assert exc.slug == "stale-parent"
            return "stale"

    try:
        with ThreadPoolExecutor(max_workers=WRITERS) as pool:
            return list(pool.map(write, range(WRITERS)))
    finally:
        database.dispose()


def test_racing_edits_of_one_parent_exactly_one_commits(db_settings: Settings,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Every writer passes the "is the parent the newest?" check first; only the unique index can decide."""
    seed_catalog(db_settings)
    outcomes = _race(db_settings, monkeypatch, parent=1)
    assert sorted(outcomes) == ["stale"] * (WRITERS - 1) + ["won"]
    database = Database(db_settings)
    try:
        with database.session() as session:
            children = session.scalars(select(CostMatrixVersion).where(CostMatrixVersion.parent_id == 1)).all()
            creations = session.scalars(select(AdminAuditEntry)
                                        .where(AdminAuditEntry.action == "cost_matrix.create")).all()
        assert len(children) == 1
        assert len(creations) == 2  # the seed's and the winner's: losers left no audit entry behind
        assert creations[-1].reason == children[0].reason
    finally:
        database.dispose()


def test_racing_first_versions_leave_one_root(db_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only one first version can exist. On PostgreSQL the parent index treats NULLs as equal; SQLite's
    treats them as distinct, so there the service counts the roots after its insert (holding the write
    lock) and rolls back a second one."""
    database = Database(db_settings)
    try:
        with database.session() as session:
            session.add_all([Product(ndc=p.ndc, name=p.name, shape=p.shape, colour=p.colour, imprint=list(p.imprint),
                                     size_mm=p.size_mm) for p in PMI_PRODUCTS])
    finally:
        database.dispose()
    outcomes = _race(db_settings, monkeypatch, parent=None)
    assert sorted(outcomes) == ["stale"] * (WRITERS - 1) + ["won"]
    assert count_rows(db_settings, CostMatrixVersion) == 1


def test_concurrent_http_edits_one_201_the_rest_409(any_env: ApiEnv) -> None:
    headers = any_env.as_role("pharmacist")
    start = threading.Barrier(WRITERS, timeout=20)

    def post(i: int) -> Any:
        start.wait()
        return any_env.client.post("/v1/admin/cost-matrices", json=edit(1, change(FURO, GLIP, i + 2)),
                                   headers=headers)

    with ThreadPoolExecutor(max_workers=WRITERS) as pool:
        responses = list(pool.map(post, range(WRITERS)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [201] + [409] * (WRITERS - 1), [r.text for r in responses]
    assert all(r.json()["type"].endswith("/stale-parent") for r in responses if r.status_code == 409)
    listing = any_env.client.get("/v1/admin/cost-matrices", headers=headers).json()
    assert [v["parent_version"] for v in listing] == [1, None]  # newest first
