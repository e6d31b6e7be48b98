"""Dependencies shared by the routers: settings, the request's session (one transaction), auth by role."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import Database
from app.errors import Forbidden
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


def require_role(minimum: Role) -> Callable[..., Actor]:
    """A dependency that authenticates X-API-Key (401) and checks the role (403)."""

    def dependency(session: SessionDep, api_key: Annotated[str | None, Security(api_key_header)]) -> Actor:
        actor = authenticate(session, api_key)
        # End the lookup's read transaction: the session gives its pooled connection back and takes one
        # again at its next statement. Otherwise a route that reads a large body after auth (an image
        # upload, a cost CSV) would hold a connection for the whole transfer, and slow uploads would use
        # up the pool.
        session.commit()
        if not actor.role.includes(minimum):
            raise Forbidden(f"This needs the {minimum.value} role; the key has the {actor.role.value} role.",
                            extra={"required_role": minimum.value, "role": actor.role.value})
        return actor

    dependency.__name__ = f"require_{minimum.value}"
    return dependency


ClientActor = Annotated[Actor, Depends(require_role(Role.CLIENT))]
PharmacistActor = Annotated[Actor, Depends(require_role(Role.PHARMACIST))]
AdminActor = Annotated[Actor, Depends(require_role(Role.ADMIN))]
