"""Cost-matrix versions: immutable, linear history, one active version; every change is audited.

A rollback activates an older version; `restore_version` copies an older version's costs into a new
newest version, so that edits (which build on the newest version) continue from them.

A version stores only the pairs whose cost differs from its default (1); unlisted off-diagonal pairs
cost the default and the diagonal is 0. Each version may have at most one successor (a unique index on
`parent_id`), so of two edits made from the same parent exactly one can commit; the other is stale.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from app.errors import Conflict, FieldError, InvalidInput, NotFound
from app.ndc import NdcError, resolve_ndc
from app.orm import ACTIVE_STATE_ID, ActiveState, CostMatrixEntry, CostMatrixVersion
from app.services.active_state import move_active, require_active
from app.services.audit import Actor, record_change
from app.services.products import catalog_keys, ndc_field_error
from models.costs import (
    DEFAULT_OFF_DIAGONAL_COST,
    CostMatrix,
    CostMatrixError,
    check_cost,
    read_cost_pairs,
    write_cost_rows,
)

VersionRef = int | Literal["active"]
Pair = tuple[str, str]
CSV_HEADER = ("true_ndc", "predicted_ndc", "cost")


@dataclass(frozen=True, slots=True)
class CostChange:
    """Set c(true_ndc, predicted_ndc) = cost in the new version (NDCs in any accepted form)."""

    true_ndc: str
    predicted_ndc: str
    cost: float


@dataclass(frozen=True, slots=True)
class CostDifference:
    """One pair whose cost differs between two versions."""

    true_ndc: str
    predicted_ndc: str
    from_cost: float
    to_cost: float


def active_version_id(session: Session) -> int | None:
    """The id of the active version (None before the first activation)."""
    return session.scalar(select(ActiveState.cost_matrix_version_id).where(ActiveState.id == ACTIVE_STATE_ID))


def list_versions(session: Session, *, limit: int | None = None,
                  before_id: int | None = None) -> list[tuple[CostMatrixVersion, int]]:
    """Versions, newest first, a page before `before_id`, each with its entry count (the entries stay unloaded)."""
    counts = (select(CostMatrixEntry.version_id, func.count().label("n")).group_by(CostMatrixEntry.version_id)
              .subquery())
    query = (select(CostMatrixVersion, func.coalesce(counts.c.n, 0))
             .outerjoin(counts, counts.c.version_id == CostMatrixVersion.id)
             .order_by(CostMatrixVersion.id.desc()).limit(limit))
    if before_id is not None:
        query = query.where(CostMatrixVersion.id < before_id)
    return [(version, int(count)) for version, count in session.execute(query)]


def get_version(session: Session, ref: VersionRef) -> CostMatrixVersion:
    """A version by id, or the active one for "active"; NotFound otherwise."""
    version_id = active_version_id(session) if ref == "active" else ref
    version = session.get(CostMatrixVersion, version_id) if version_id is not None else None
    if version is None:
        what = "no cost-matrix version is active" if ref == "active" else f"cost-matrix version {ref} does not exist"
        raise NotFound(what, slug="cost-matrix-not-found")
    return version


def head_version(session: Session) -> CostMatrixVersion | None:
    """The newest version: the one without a successor."""
    child = aliased(CostMatrixVersion)
    query = (select(CostMatrixVersion)
             .where(~select(child.id).where(child.parent_id == CostMatrixVersion.id).exists())
             .order_by(CostMatrixVersion.id.desc()).limit(1))
    return session.scalars(query).first()


def version_costs(version: CostMatrixVersion) -> dict[Pair, float]:
    """The version's non-default costs as {(true, predicted): cost}."""
    return {(e.true_ndc, e.predicted_ndc): e.cost for e in version.entries}


def entries_sha256(costs: dict[Pair, float], *, default: float = DEFAULT_OFF_DIAGONAL_COST) -> str:
    """A content hash over the default and the sorted non-default cells."""
    digest = hashlib.sha256(f"default={float(default)!r}\n".encode())
    for (true, predicted), cost in sorted(costs.items()):
        digest.update(f"{true},{predicted},{float(cost)!r}\n".encode())
    return digest.hexdigest()


def cost_matrix_of(session: Session, ref: VersionRef, *, classes: Sequence[str] | None = None) -> CostMatrix:
    """The version as a models.costs.CostMatrix over `classes` (default: the whole catalog, sorted)."""
    version = get_version(session, ref)
    names = tuple(classes) if classes is not None else tuple(sorted(catalog_keys(session)))
    known = set(names)
    pairs = {pair: cost for pair, cost in version_costs(version).items() if pair[0] in known and pair[1] in known}
    return CostMatrix.from_pairs(names, pairs, default=version.default_cost)


def create_version(session: Session, *, parent_version: int | None, reason: str, changes: Sequence[CostChange],
                   actor: Actor, max_cost: float) -> CostMatrixVersion:
    """A new version = parent + changes. 422 points at the bad change; 409 when the parent is stale."""
    catalog = catalog_keys(session)
    errors: list[FieldError] = []
    resolved: dict[Pair, float] = {}
    for index, change in enumerate(changes):
        where = f"changes[{index}]"
        keys: list[str] = []
        for field in ("true_ndc", "predicted_ndc"):
            try:
                keys.append(resolve_ndc(getattr(change, field), catalog).product_key)
            except NdcError as exc:
                errors.append(ndc_field_error(exc, f"{where}.{field}"))
        if len(keys) != 2:
            continue
        pair = (keys[0], keys[1])
        try:
            cost = check_cost(pair[0], pair[1], change.cost, max_cost=max_cost)
        except CostMatrixError as exc:
            errors.append(FieldError(field=f"{where}.cost", message=str(exc), code="invalid_cost"))
            continue
        if pair in resolved:
            errors.append(FieldError(field=where, message=f"pair {pair[0]} -> {pair[1]} is changed twice",
                                     code="duplicate_pair"))
        resolved[pair] = cost
    if errors:
        raise InvalidInput(_summary(errors), slug="invalid-cost-matrix", errors=errors)
    parent = _current_parent(session, parent_version)
    costs = version_costs(parent) if parent is not None else {}
    default = parent.default_cost if parent is not None else DEFAULT_OFF_DIAGONAL_COST
    for (true, predicted), cost in resolved.items():
        if true == predicted:
            continue  # check_cost accepted it, so it is 0: the diagonal is implicit
        if cost == default:
            costs.pop((true, predicted), None)
        else:
            costs[(true, predicted)] = cost
    return _insert_version(session, parent=parent, costs=costs, default=default, reason=reason, actor=actor,
                           action="cost_matrix.create")


def import_csv(session: Session, *, parent_version: int | None, reason: str, text: str, actor: Actor,
               max_cost: float) -> CostMatrixVersion:
    """A new version holding exactly the CSV's costs (header `true_ndc,predicted_ndc,cost`; unlisted = 1).

    NDCs may be written in any form the JSON edits accept (`resolve_ndc` against the catalog). Only the
    listed cells are held in memory, never the catalog squared."""
    catalog = catalog_keys(session)
    try:
        pairs = read_cost_pairs(io.StringIO(text), catalog, max_cost=max_cost,
                                resolve=lambda ndc: resolve_ndc(ndc, catalog).product_key)
    except CostMatrixError as exc:
        field = f"row {exc.row}" if exc.row is not None else "csv"
        pair = f" ({exc.true} -> {exc.predicted})" if exc.true is not None else ""
        error = FieldError(field=field, message=f"{exc}{pair}", code="invalid_csv")
        raise InvalidInput(f"{field}: {exc}{pair}", slug="invalid-cost-matrix", errors=[error]) from exc
    parent = _current_parent(session, parent_version)
    costs = {(t, p): c for (t, p), c in pairs.items() if t != p and c != DEFAULT_OFF_DIAGONAL_COST}
    return _insert_version(session, parent=parent, costs=costs, default=DEFAULT_OFF_DIAGONAL_COST, reason=reason,
                           actor=actor, action="cost_matrix.import_csv")


def restore_version(session: Session, *, ref: VersionRef, parent_version: int | None, reason: str,
                    actor: Actor) -> CostMatrixVersion:
    """A new newest version holding exactly version `ref`'s costs (its child is `parent_version`, the newest).

    How to go back to an older matrix for good: activating an old version rolls verdicts back at once,
    but edits build on the newest version, so after such a rollback the next edit would carry the
    rolled-back costs forward. Restoring the old version as the newest one first makes later edits start
    from its costs. Not activated, like any new version."""
    source = get_version(session, ref)
    parent = _current_parent(session, parent_version)
    return _insert_version(session, parent=parent, costs=version_costs(source), default=source.default_cost,
                           reason=reason, actor=actor, action="cost_matrix.restore",
                           details={"restored_from": source.id})


def export_csv(session: Session, ref: VersionRef) -> str:
    """The version's non-default pairs as CSV with the header `true_ndc,predicted_ndc,cost`, sorted by pair."""
    version = get_version(session, ref)
    return write_cost_rows(((t, p, c) for (t, p), c in sorted(version_costs(version).items())), header=CSV_HEADER)


def diff_versions(session: Session, from_ref: VersionRef, to_ref: VersionRef) -> list[CostDifference]:
    """Every pair whose effective cost differs from one version to the other."""
    return _differences(get_version(session, from_ref), get_version(session, to_ref))


def _differences(old: CostMatrixVersion, new: CostMatrixVersion) -> list[CostDifference]:
    return _cost_differences(version_costs(old), old.default_cost, version_costs(new), new.default_cost)


def _cost_differences(old: dict[Pair, float], old_default: float, new: dict[Pair, float],
                      new_default: float) -> list[CostDifference]:
    """The pairs listed in either whose effective cost differs (an unlisted pair costs its matrix's default)."""
    differences = []
    for pair in sorted(set(old) | set(new)):
        before, after = old.get(pair, old_default), new.get(pair, new_default)
        if before != after:
            differences.append(CostDifference(pair[0], pair[1], before, after))
    return differences


@dataclass(frozen=True, slots=True)
class Activation:
    """What an activation did: the version now active, the one it replaced, and every cost that changed."""

    version: CostMatrixVersion
    previous: int | None
    changes: list[CostDifference]


def activate_version(session: Session, *, ref: VersionRef, actor: Actor, reason: str | None = None,
                     expected_active: int | None = None) -> Activation:
    """Make a version the active one (any version, so a rollback is an activation too).

    `expected_active`: the version the caller saw active; 409 `active-changed` if another is active now.
    The audit entry and the answer list every pair whose effective cost changes, against the version
    replaced, so that no cost changes without being shown: activating a version made on a newer parent
    than the active one (after a rollback) shows what it brings back.
    """
    version = get_version(session, ref)
    previous = active_version_id(session)
    require_active("cost_matrix_version_id", expected=expected_active, actual=previous)
    if previous == version.id:
        return Activation(version, previous, [])
    replaced = session.get(CostMatrixVersion, previous) if previous is not None else None
    changes = (_differences(replaced, version) if replaced is not None else
               _cost_differences({}, version.default_cost, version_costs(version), version.default_cost))
    move_active(session, "cost_matrix_version_id", previous=previous, new=version.id)
    session.flush()
    record_change(session, actor=actor, action="cost_matrix.activate", entity_type="cost_matrix",
                  entity_id=version.id, reason=reason,
                  details={"from_version": previous, "to_version": version.id,
                           "changes": [_change_detail(d) for d in changes]})
    return Activation(version, previous, changes)


def _change_detail(difference: CostDifference) -> dict[str, str | float]:
    return {"true_ndc": difference.true_ndc, "predicted_ndc": difference.predicted_ndc,
            "from": difference.from_cost, "to": difference.to_cost}


def _current_parent(session: Session, parent_version: int | None) -> CostMatrixVersion | None:
    head = head_version(session)
    if parent_version is None:
        if head is None:
            return None
        raise _stale(None, head)
    parent = session.get(CostMatrixVersion, parent_version)
    if parent is None:
        raise InvalidInput(f"parent_version {parent_version} does not exist", slug="cost-matrix-not-found",
                           errors=[FieldError("parent_version", "no such version", "not_found")])
    if head is not None and head.id != parent.id:
        if parent.id == active_version_id(session):
            raise Conflict(f"parent_version {parent.id} is the active version but not the newest ({head.id} is, "
                           "after a rollback by activation): edits build on the newest version. To continue from "
                           f"the active costs, first make them the newest: POST .../{parent.id}/restore with "
                           f"parent_version {head.id}; or edit version {head.id}, knowing its costs differ",
                           slug="stale-parent", title="Stale parent version",
                           extra={"parent_version": parent.id, "head_version": head.id, "active_version": parent.id})
        raise _stale(parent.id, head)
    return parent


def _stale(parent_id: int | None, head: CostMatrixVersion) -> Conflict:
    stale = (f"parent_version {parent_id} is stale" if parent_id is not None else
             "parent_version null is only for the first version")
    return Conflict(f"{stale}: the newest version is {head.id}; re-read it and apply your changes to it",
                    slug="stale-parent", title="Stale parent version",
                    extra={"parent_version": parent_id, "head_version": head.id})


def _insert_version(session: Session, *, parent: CostMatrixVersion | None, costs: dict[Pair, float],
                    default: float, reason: str, actor: Actor, action: str,
                    details: dict[str, int] | None = None) -> CostMatrixVersion:
    parent_costs = version_costs(parent) if parent is not None else {}
    if parent is not None and costs == parent_costs and default == parent.default_cost:
        raise InvalidInput("the changes leave the matrix identical to its parent", slug="no-change",
                           errors=[FieldError("changes", "no cost differs from the parent", "no_change")])
    parent_id = parent.id if parent is not None else None  # read now: a failed flush expires the instance
    version = CostMatrixVersion(parent_id=parent_id, author=actor.name, author_key_id=actor.key_id,
                                reason=reason, default_cost=default, entries_sha256=entries_sha256(costs, default=default))
    version.entries = [CostMatrixEntry(true_ndc=t, predicted_ndc=p, cost=c) for (t, p), c in sorted(costs.items())]
    session.add(version)
    try:
        session.flush()
    except IntegrityError as exc:
        # The unique index on parent_id is the arbiter when two edits of one parent race.
        if "parent_id" in str(exc.orig):
            raise Conflict(f"parent_version {parent_id} is stale: another edit of it "
                           "committed first; re-read the newest version", slug="stale-parent", title="Stale parent version",
                           extra={"parent_version": parent_id}) from exc
        raise
    if parent_id is None:
        # SQLite's unique index treats NULLs as distinct (PostgreSQL's does not), so it cannot stop two
        # racing first versions. After the flush this transaction holds SQLite's write lock and sees every
        # committed row: a second root means another first version won, and this one is rolled back.
        roots = session.scalar(select(func.count()).select_from(CostMatrixVersion)
                               .where(CostMatrixVersion.parent_id.is_(None)))
        if roots and roots > 1:
            raise Conflict("parent_version null is stale: another first version committed first; re-read the "
                           "newest version", slug="stale-parent", title="Stale parent version",
                           extra={"parent_version": None})
    changed = [_change_detail(d) for d in _cost_differences(
        parent_costs, parent.default_cost if parent is not None else default, costs, default)]
    record_change(session, actor=actor, action=action, entity_type="cost_matrix", entity_id=version.id, reason=reason,
                  details={"parent_version": version.parent_id, "changes": changed,
                           "entries_sha256": version.entries_sha256, "active_version": active_version_id(session),
                           **(details or {})})
    return version


def _summary(errors: list[FieldError]) -> str:
    head = "; ".join(f"{e.field}: {e.message}" for e in errors[:3])
    return head + (f" (and {len(errors) - 3} more)" if len(errors) > 3 else "")
