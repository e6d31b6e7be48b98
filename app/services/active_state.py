"""Moving the active pointers (cost-matrix version, model version) as a compare-and-set.

Every change of an active version is read-then-write: read what is active (the audit's and the
promotion history's `from`), decide, then point elsewhere. Two such requests at once must not both
believe they replaced the same version. The pointer is therefore moved only if it still holds the
version that was read: `UPDATE ... WHERE pointer IS NOT DISTINCT FROM :previous`. The UPDATE takes the
row's (PostgreSQL) or the database's (SQLite) write lock and re-reads the row under it, so the check
and the move are one step on both databases, and no lock is held while a request reads or evaluates.
The request that loses gets a 409 and can retry against the new state.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from sqlalchemy import CursorResult, update
from sqlalchemy.orm import Session

from app.errors import Conflict
from app.orm import ACTIVE_STATE_ID, ActiveState

Pointer = Literal["model_version_id", "cost_matrix_version_id"]
_WHAT = {"model_version_id": "model version", "cost_matrix_version_id": "cost-matrix version"}


def move_active(session: Session, pointer: Pointer, *, previous: int | None, new: int,
                unchanged: Mapping[Pointer, int | None] | None = None) -> None:
    """Point `pointer` at `new` if it still holds `previous` and every pointer in `unchanged` still holds
    its value (a promotion gated under one cost-matrix version must not land after another became
    active); else 409 `active-changed`."""
    column = getattr(ActiveState, pointer)
    conditions = [ActiveState.id == ACTIVE_STATE_ID, column.is_not_distinct_from(previous)]
    conditions += [getattr(ActiveState, other).is_not_distinct_from(value)
                   for other, value in (unchanged or {}).items()]
    result = session.execute(update(ActiveState).where(*conditions).values({pointer: new}))
    assert isinstance(result, CursorResult)
    if result.rowcount != 1:
        what = _WHAT[pointer]
        also = "".join(f", or the active {_WHAT[other]} is no longer {value}" for other, value in (unchanged or {}).items())
        raise _changed(pointer, f"the active {what} changed while this request was handled (it was {previous}{also}); "
                       "read the new state and retry",
                       extra={"expected_active": previous,
                              **{f"expected_{other}": value for other, value in (unchanged or {}).items()}})


def require_active(pointer: Pointer, *, expected: int | None, actual: int | None) -> None:
    """409 `active-changed` unless the client's `expected_active` (None: not given) is what is active now.

    The client's precondition, as `If-Match` would be: an activation or rollback decided on what the
    client last saw must not replace a version that someone else made active since.
    """
    if expected is not None and expected != actual:
        what = _WHAT[pointer]
        raise _changed(pointer, f"the active {what} is {actual}, not {expected} as this request expected (another "
                       "request changed it); nothing was changed: read the new state and decide again",
                       extra={"expected_active": expected, "active": actual})


def _changed(pointer: Pointer, detail: str, *, extra: dict[str, int | None]) -> Conflict:
    return Conflict(detail, slug="active-changed", title=f"The active {_WHAT[pointer]} changed concurrently",
                    extra=extra)
