"""The product catalog: the NDC product keys the classifier knows, with what pharmacists look at."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.errors import Conflict, FieldError, InvalidInput, NotFound
from app.ndc import NdcError, UnknownNdc, parse_ndc, resolve_ndc
from app.orm import Product
from app.services.audit import Actor, record_change

UPDATABLE_FIELDS = ("name", "shape", "colour", "imprint", "size_mm", "active")


def ndc_field_error(exc: NdcError, field: str) -> FieldError:
    """An NDC problem located at `field` of the request."""
    return FieldError(field=field, message=str(exc), code=exc.slug)


def catalog_keys(session: Session) -> set[str]:
    """Every product key in the catalog, active or not."""
    return set(session.scalars(select(Product.ndc)))


def list_products(session: Session, *, active: bool | None = None, limit: int | None = None,
                  after_ndc: str | None = None) -> list[Product]:
    """Products ordered by NDC, optionally only the active (or inactive) ones, a page after `after_ndc`."""
    query = select(Product).order_by(Product.ndc).limit(limit)
    if active is not None:
        query = query.where(Product.active.is_(active))
    if after_ndc is not None:
        query = query.where(Product.ndc > after_ndc)
    return list(session.scalars(query))


def find_product(session: Session, ndc: str) -> Product:
    """The product an NDC in any form refers to; NotFound when the catalog has none."""
    try:
        key = resolve_ndc(ndc, catalog_keys(session)).product_key
    except UnknownNdc as exc:
        raise NotFound(str(exc), slug="product-not-found") from exc
    product = session.get(Product, key)
    assert product is not None  # resolve_ndc only returns catalog keys
    return product


def create_product(session: Session, *, ndc: str, name: str, shape: str, colour: str, imprint: list[str],
                   size_mm: float | None, active: bool, actor: Actor, reason: str | None = None) -> Product:
    """Add a product; its key is the normalised NDC, so `0378-0208-01` and `00378-0208` are the same."""
    try:
        key = parse_ndc(ndc).product_key
    except NdcError as exc:
        raise InvalidInput(f"ndc: {exc}", slug=exc.slug, errors=[ndc_field_error(exc, "ndc")]) from exc
    if session.get(Product, key) is not None:
        raise Conflict(f"product {key} already exists", slug="product-exists", extra={"ndc": key})
    product = Product(ndc=key, name=name, shape=shape, colour=colour, imprint=list(imprint), size_mm=size_mm,
                      active=active)
    session.add(product)
    session.flush()
    record_change(session, actor=actor, action="product.create", entity_type="product", entity_id=key,
                  reason=reason, details={"ndc_input": ndc, **_snapshot(product)})
    return product


def update_product(session: Session, *, ndc: str, changes: dict[str, Any], actor: Actor,
                   reason: str | None = None) -> Product:
    """Change some fields (including `active`); the audit entry lists each field's old and new value."""
    product = find_product(session, ndc)
    unknown = sorted(set(changes) - set(UPDATABLE_FIELDS))
    if unknown:
        raise InvalidInput(f"fields {unknown} cannot be changed",
                           errors=[FieldError(field=name, message="not updatable", code="read_only")
                                   for name in unknown])
    diff: dict[str, list[Any]] = {}
    for field, value in changes.items():
        old = getattr(product, field)
        new = list(value) if field == "imprint" else value
        if old != new:
            diff[field] = [old, new]
            setattr(product, field, new)
    if diff:
        session.flush()
        record_change(session, actor=actor, action="product.update", entity_type="product",
                      entity_id=product.ndc, reason=reason, details={"changes": diff})
    return product


def _snapshot(product: Product) -> dict[str, Any]:
    return {field: getattr(product, field) for field in UPDATABLE_FIELDS}
