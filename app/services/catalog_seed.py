"""Seed the PMI catalog (paper, Table 8) and the PMI expert cost matrix (Table 6); idempotent."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.orm import CostMatrixVersion, Product
from app.services.audit import Actor, record_change
from app.services.cost_matrices import CostChange, activate_version, active_version_id, create_version
from models.pmi import PMI_EXPERT_COSTS, PMI_PRODUCTS

SEED_REASON = "PMI expert cost matrix (paper, Table 6): four critical pairs, every other pair costs 1"


@dataclass(frozen=True, slots=True)
class SeedResult:
    """What one seeding run changed."""

    products_added: int
    cost_matrix_version: int | None
    cost_matrix_created: bool
    cost_matrix_activated: bool


def seed_pmi(session: Session, *, actor: Actor, max_cost: float) -> SeedResult:
    """Add missing PMI products and, on an empty history, the expert costs as the first active version."""
    existing = set(session.scalars(select(Product.ndc)))
    added = 0
    for item in PMI_PRODUCTS:
        if item.ndc in existing:
            continue  # never overwrite what a pharmacist may have edited since
        session.add(Product(ndc=item.ndc, name=item.name, shape=item.shape, colour=item.colour,
                            imprint=list(item.imprint), size_mm=item.size_mm, active=True))
        added += 1
    session.flush()
    if added:
        record_change(session, actor=actor, action="catalog.seed_pmi", entity_type="product", entity_id="pmi",
                      details={"products_added": added})
    created = activated = False
    version_id = active_version_id(session)
    if not session.scalar(select(func.count()).select_from(CostMatrixVersion)):
        changes = [CostChange(true, predicted, cost) for (true, predicted), cost in PMI_EXPERT_COSTS.items()]
        version = create_version(session, parent_version=None, reason=SEED_REASON, changes=changes, actor=actor,
                                 max_cost=max_cost)
        version_id, created = version.id, True
    if active_version_id(session) is None and version_id is not None:
        activate_version(session, ref=version_id, actor=actor, reason="first cost-matrix version")
        activated = True
    return SeedResult(products_added=added, cost_matrix_version=version_id, cost_matrix_created=created,
                      cost_matrix_activated=activated)
