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
from app.orm import AdminAuditEntry, CostMatrixVersion
from app.services import cost_matrices
from app.services.audit import Actor
from tests.app.factories import FURO, GLIP, change, edit, seed_catalog
from tests.conftest import ApiEnv

WRITERS = 6


def test_racing_edits_of_one_parent_exactly_one_commits(db_settings: Settings,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Every writer passes the "is the parent the newest?" check first; only the unique index can decide."""
    seed_catalog(db_settings)
    all_checked = threading.Barrier(WRITERS, timeout=20)
    real_head = cost_matrices.head_version

    def head_then_wait(session: Any) -> Any:
        head = real_head(session)
        all_checked.wait()  # nobody inserts before everybody has seen version 1 as the head
        return head

    monkeypatch.setattr(cost_matrices, "head_version", head_then_wait)
    database = Database(db_settings)

    def write(i: int) -> str:
        try:
            with database.session() as session:
                cost_matrices.create_version(session, parent_version=1, reason=f"writer {i}",
                                             changes=[cost_matrices.CostChange(FURO, GLIP, float(i + 2))],
                                             actor=Actor.cli(f"writer {i}"), max_cost=1000.0)
            return "won"
        except Conflict as exc:
            assert exc.slug == "stale-parent"
            return "stale"

    try:
        with ThreadPoolExecutor(max_workers=WRITERS) as pool:
            outcomes = list(pool.map(write, range(WRITERS)))
        assert sorted(outcomes) == ["stale"] * (WRITERS - 1) + ["won"]
        with database.session() as session:
            children = session.scalars(select(CostMatrixVersion).where(CostMatrixVersion.parent_id == 1)).all()
            creations = session.scalars(select(AdminAuditEntry)
                                        .where(AdminAuditEntry.action == "cost_matrix.create")).all()
        assert len(children) == 1
        assert len(creations) == 2  # the seed's and the winner's: losers left no audit entry behind
        assert creations[-1].reason == children[0].reason
    finally:
        database.dispose()


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
    assert [v["parent_version"] for v in listing] == [None, 1]
