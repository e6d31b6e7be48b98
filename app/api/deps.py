"""Dependencies shared by the routers: settings, the request's session (one transaction), auth by role."""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Iterator
from typing import Annotated, Any

from fastapi import Depends, Request, Response, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader
from pydantic import BaseModel
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import Database
from app.errors import FieldError, Forbidden, InvalidInput
from app.orm import Role
from app.services.api_keys import authenticate
from app.services.audit import Actor

api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False,
                              description="An API key from `rxverify apikey create` or POST /v1/admin/api-keys.")


def get_settings_dep(request: Request) -> Settings:
    """The Settings the app was created with."""
    settings: Settings = request.app.state.settings
    return settings


def get_session(request: Request) -> Iterator[Session]:
    """The request's session: committed when the endpoint returns, rolled back when it raises."""
    database: Database = request.app.state.db
    with database.session() as session:
        yield session


# scope="function": the commit happens before the response is sent, so a 2xx always means committed.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]


def _authenticate_request(request: Request) -> Actor:
    """Look the request's X-API-Key up in a short session of its own (401 when missing, unknown, revoked)."""
    database: Database = request.app.state.db
    with database.session() as session:
        return authenticate(session, request.headers.get(api_key_header.model.name))


class KeyFirstRoute(APIRoute):
    """A route that authenticates X-API-Key before FastAPI reads and parses the request body.

    FastAPI parses a JSON body before it runs any dependency, so a request without a valid key and with a
    malformed JSON body got a 400 instead of a 401, after a body of up to the request limit (12 MB) had
    been parsed for nobody. `require_role` then takes the actor found here and checks only the role. The
    lookup runs in a worker thread with a session of its own, which ends before the body is read, so a
    slow upload holds no pooled connection.

    A query parameter the route does not take is a 422 (`unknown-query-parameter`), not silently ignored:
    a misspelt filter (`?verdit=mismatch`) would otherwise answer with the unfiltered list.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        minimum = _required_role(self.dependant)
        known = _query_parameter_names(self.dependant)

        async def authenticate_first(request: Request) -> Response:
            actor = await run_in_threadpool(_authenticate_request, request)
            if minimum is not None:
                _check_role(actor, minimum)  # 403 before the body, too
            _refuse_unknown_query_parameters(request, known)
            request.state.actor = actor
            return await handler(request)

        return authenticate_first


MAX_REPORTED_PARAMETERS = 10


def _with_dependencies(dependant: Dependant) -> Iterator[Dependant]:
    """The route's dependant and every dependency under it, depth first."""
    stack = [dependant]
    while stack:
        current = stack.pop()
        yield current
        stack.extend(current.dependencies)


def _query_parameter_names(dependant: Dependant) -> frozenset[str]:
    """The query parameters a route takes, its dependencies' included (a query model's fields by alias)."""
    names: set[str] = set()
    for param in (param for current in _with_dependencies(dependant) for param in current.query_params):
        model = param.field_info.annotation
        if isinstance(model, type) and issubclass(model, BaseModel):
            names.update(info.alias or name for name, info in model.model_fields.items())
        else:
            names.add(param.alias)
    return frozenset(names)


def _refuse_unknown_query_parameters(request: Request, known: frozenset[str]) -> None:
    unknown = sorted({name for name in request.query_params if name not in known})
    if not unknown:
        return
    shown = [name[:64] for name in unknown[:MAX_REPORTED_PARAMETERS]]
    takes = ", ".join(sorted(known)) if known else "none"
    raise InvalidInput(f"unknown query parameter(s): {', '.join(shown)}; this endpoint takes: {takes}",
                       slug="unknown-query-parameter",
                       errors=[FieldError(f"query.{name}", "unknown query parameter", "unknown") for name in shown])


def _required_role(dependant: Dependant) -> Role | None:
    """The highest role any `require_role` dependency of the route asks for (None if none does)."""
    roles = (getattr(current.call, "minimum_role", None) for current in _with_dependencies(dependant))
    return max((role for role in roles if isinstance(role, Role)), key=lambda role: role.rank, default=None)


def _check_role(actor: Actor, minimum: Role) -> None:
    if not actor.role.includes(minimum):
        raise Forbidden(f"This needs the {minimum.value} role; the key has the {actor.role.value} role.",
                        extra={"required_role": minimum.value, "role": actor.role.value})


def require_role(minimum: Role) -> Callable[..., Coroutine[Any, Any, Actor]]:
    """A dependency that authenticates X-API-Key (401) and checks the role (403).

    On a `KeyFirstRoute` (every /v1 router) the key was looked up before the body was read; elsewhere it
    is looked up here.
    """

    # async: on a KeyFirstRoute it only reads request.state, which needs no trip to the threadpool.
    async def dependency(request: Request, api_key: Annotated[str | None, Security(api_key_header)]) -> Actor:
        found = getattr(request.state, "actor", None)
        actor = found if isinstance(found, Actor) else await run_in_threadpool(_authenticate_request, request)
        _check_role(actor, minimum)
        return actor

    dependency.__name__ = f"require_{minimum.value}"
    dependency.minimum_role = minimum  # type: ignore[attr-defined]  # read by KeyFirstRoute
    return dependency


ClientActor = Annotated[Actor, Depends(require_role(Role.CLIENT))]
PharmacistActor = Annotated[Actor, Depends(require_role(Role.PHARMACIST))]
AdminActor = Annotated[Actor, Depends(require_role(Role.ADMIN))]
