"""API key administration (admin only)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from app.api.deps import AdminActor, KeyFirstRoute, SessionDep
from app.api.paging import NEXT_LINK_RESPONSE, link_next_page
from app.orm import ApiKey
from app.schemas.api_keys import ApiKeyCreate, ApiKeyCreated, ApiKeyRead, ApiKeyRevoke
from app.schemas.common import IdPath, IdQuery, problem_responses
from app.services import api_keys as service

router = APIRouter(route_class=KeyFirstRoute, prefix="/v1/admin/api-keys", tags=["api keys"], responses=problem_responses(401, 403, 422))


@router.get("", response_model=list[ApiKeyRead], responses=NEXT_LINK_RESPONSE)
def list_keys(_actor: AdminActor, session: SessionDep, request: Request, response: Response,
              include_revoked: bool = True, limit: Annotated[int, Query(ge=1, le=200)] = 50,
              before_id: IdQuery = None) -> list[ApiKeyRead]:
    """Keys, newest first, without secrets."""
    keys = service.list_api_keys(session, include_revoked=include_revoked, limit=limit, before_id=before_id)
    link_next_page(request, response, [k.id for k in keys], limit=limit)
    return [ApiKeyRead.model_validate(k) for k in keys]


@router.post("", response_model=ApiKeyCreated, status_code=201)
def create_key(body: ApiKeyCreate, actor: AdminActor, session: SessionDep, response: Response) -> ApiKeyCreated:
    """Create a key; the `key` in this response is the only time it is shown."""
    key, token = service.create_api_key(session, role=body.role, name=body.name, actor=actor)
    response.headers["Location"] = f"/v1/admin/api-keys/{key.id}"
    return ApiKeyCreated(**_read(key).model_dump(), key=token)


@router.get("/{key_id}", response_model=ApiKeyRead, responses=problem_responses(404))
def get_key(key_id: IdPath, _actor: AdminActor, session: SessionDep) -> ApiKeyRead:
    """One key, without its secret (where a new key's Location header points)."""
    return _read(service.get_api_key(session, key_id))


@router.post("/{key_id}/revoke", response_model=ApiKeyRead, responses=problem_responses(404, 409))
def revoke_key(key_id: IdPath, actor: AdminActor, session: SessionDep, body: ApiKeyRevoke | None = None) -> ApiKeyRead:
    """Revoke a key: from now on it gets 401."""
    key = service.revoke_api_key(session, key_id=key_id, actor=actor, reason=body.reason if body else None)
    return _read(key)


def _read(key: ApiKey) -> ApiKeyRead:
    return ApiKeyRead.model_validate(key)
