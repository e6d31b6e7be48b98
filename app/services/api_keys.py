"""API keys: `rxv_<prefix>_<secret>`; the prefix finds the row, a SHA-256 of the whole token proves it."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.errors import Conflict, NotFound, Unauthorized
from app.orm import ApiKey, Role, utcnow
from app.services.audit import Actor, record_change

TOKEN_SCHEME = "rxv"
_AUTH_HEADERS = {"WWW-Authenticate": 'ApiKey header="X-API-Key"'}


def hash_token(token: str) -> str:
    """SHA-256 (hex) of a token. The secret part has 256 bits of entropy, so no slow KDF is needed."""
    return hashlib.sha256(token.encode()).hexdigest()


def generate_token() -> tuple[str, str]:
    """A new (prefix, token) pair."""
    prefix = secrets.token_hex(6)
    return prefix, f"{TOKEN_SCHEME}_{prefix}_{secrets.token_urlsafe(32)}"


def create_api_key(session: Session, *, role: Role, name: str, actor: Actor) -> tuple[ApiKey, str]:
    """Create a key and return it with its token, which is shown once and never stored."""
    prefix, token = generate_token()
    key = ApiKey(prefix=prefix, key_sha256=hash_token(token), name=name, role=role.value,
                 created_by=actor.name)
    session.add(key)
    session.flush()
    record_change(session, actor=actor, action="api_key.create", entity_type="api_key", entity_id=key.id,
                  details={"name": name, "role": role.value, "prefix": prefix})
    return key, token


def list_api_keys(session: Session, *, include_revoked: bool = True, limit: int | None = None,
                  before_id: int | None = None) -> list[ApiKey]:
    """Keys, newest first, a page before `before_id` (hashes are never returned by the API)."""
    query = select(ApiKey).order_by(ApiKey.id.desc()).limit(limit)
    if not include_revoked:
        query = query.where(ApiKey.revoked_at.is_(None))
    if before_id is not None:
        query = query.where(ApiKey.id < before_id)
    return list(session.scalars(query))


def get_api_key(session: Session, key_id: int) -> ApiKey:
    """One key by id (404 `api-key-not-found`)."""
    key = session.get(ApiKey, key_id)
    if key is None:
        raise NotFound(f"API key {key_id} does not exist", slug="api-key-not-found")
    return key


def revoke_api_key(session: Session, *, key_id: int, actor: Actor, reason: str | None = None) -> ApiKey:
    """Revoke a key; it then answers 401. Revoking twice is a conflict, also when both requests come at once
    (the write is conditional, so exactly one of them revokes and is audited)."""
    key = get_api_key(session, key_id)
    revoked = session.execute(update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
                              .values(revoked_at=utcnow()).execution_options(synchronize_session=False))
    if revoked.rowcount != 1:  # type: ignore[attr-defined]
        raise Conflict(f"API key {key_id} is already revoked", slug="api-key-revoked")
    session.refresh(key)
    record_change(session, actor=actor, action="api_key.revoke", entity_type="api_key", entity_id=key.id,
                  reason=reason, details={"name": key.name, "role": key.role})
    return key


def authenticate(session: Session, token: str | None) -> Actor:
    """The Actor behind a token, or Unauthorized (missing, unknown or revoked)."""
    if not token:
        raise Unauthorized("Send an API key in the X-API-Key header.", slug="missing-api-key",
                           headers=_AUTH_HEADERS)
    parts = token.strip().split("_", 2)
    key = None
    if len(parts) == 3 and parts[0] == TOKEN_SCHEME:
        key = session.scalars(select(ApiKey).where(ApiKey.prefix == parts[1])).one_or_none()
    # Compare even when the prefix is unknown, so timing does not tell which prefixes exist.
    expected = key.key_sha256 if key is not None else "0" * 64
    if not hmac.compare_digest(expected, hash_token(token.strip())) or key is None:
        raise Unauthorized("The API key is not valid.", slug="invalid-api-key", headers=_AUTH_HEADERS)
    if key.revoked_at is not None:
        raise Unauthorized("The API key has been revoked.", slug="revoked-api-key", headers=_AUTH_HEADERS)
    return Actor(name=key.name, role=Role(key.role), key_id=key.id)
