"""Domain errors: services raise these; app.problems turns each into RFC 9457 problem+json."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar


@dataclass(frozen=True, slots=True)
class FieldError:
    """One bad input, located by a JSON-path-like pointer such as `changes[2].cost` or `row 3`."""

    field: str
    message: str
    code: str = "invalid"

    def to_dict(self) -> dict[str, str]:
        """The JSON form used in a problem's `errors` member."""
        return asdict(self)


class DomainError(Exception):
    """Base of every expected failure; `slug` becomes the problem type URI."""

    status: ClassVar[int] = 400
    default_slug: ClassVar[str] = "bad-request"
    default_title: ClassVar[str] = "Bad request"

    def __init__(self, detail: str, *, slug: str | None = None, title: str | None = None,
                 errors: list[FieldError] | None = None, extra: dict[str, Any] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.slug = slug or self.default_slug
        self.title = title or self.default_title
        self.errors = list(errors or [])
        self.extra = dict(extra or {})
        self.headers = dict(headers or {})


class Unauthorized(DomainError):
    """No usable credentials (401)."""

    status = 401
    default_slug = "unauthorized"
    default_title = "Authentication required"


class Forbidden(DomainError):
    """Authenticated, but the role may not do this (403)."""

    status = 403
    default_slug = "forbidden"
    default_title = "Not allowed for this role"


class NotFound(DomainError):
    """The addressed thing does not exist (404)."""

    status = 404
    default_slug = "not-found"
    default_title = "Not found"


class Conflict(DomainError):
    """The request collides with the current state, e.g. a stale parent (409)."""

    status = 409
    default_slug = "conflict"
    default_title = "Conflict with the current state"


class InvalidInput(DomainError):
    """Well-formed but semantically wrong input; `errors` points at the bad fields (422)."""

    status = 422
    default_slug = "invalid-input"
    default_title = "Invalid input"


class ServiceUnavailable(DomainError):
    """A dependency (database, broker, model) is not available right now (503)."""

    status = 503
    default_slug = "service-unavailable"
    default_title = "Service unavailable"
