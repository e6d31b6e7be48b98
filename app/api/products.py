"""Catalog routes: anyone with a key reads it; pharmacists and admins change it."""

from __future__ import annotations

from fastapi import APIRouter, Response

from app.api.deps import ClientActor, KeyFirstRoute, PharmacistActor, SessionDep
from app.schemas.common import problem_responses
from app.schemas.products import ProductCreate, ProductRead, ProductUpdate
from app.services import products as service

router = APIRouter(route_class=KeyFirstRoute, tags=["catalog"], responses=problem_responses(401, 403, 422))


@router.get("/v1/products", response_model=list[ProductRead])
def list_products(_actor: ClientActor, session: SessionDep, active: bool | None = None) -> list[ProductRead]:
    """The catalog; `?active=true` lists only products that can be verified."""
    return [ProductRead.model_validate(p) for p in service.list_products(session, active=active)]


@router.get("/v1/products/{ndc}", response_model=ProductRead, responses=problem_responses(404))
def get_product(ndc: str, _actor: ClientActor, session: SessionDep) -> ProductRead:
    """One product, addressed by an NDC in any form (a bare 10-digit code is resolved against the catalog)."""
    return ProductRead.model_validate(service.find_product(session, ndc))


@router.post("/v1/admin/products", response_model=ProductRead, status_code=201, responses=problem_responses(409))
def create_product(body: ProductCreate, actor: PharmacistActor, session: SessionDep, response: Response) -> ProductRead:
    """Add a product to the catalog."""
    product = service.create_product(session, ndc=body.ndc, name=body.name, shape=body.shape, colour=body.colour,
                                     imprint=body.imprint, size_mm=body.size_mm, active=body.active, actor=actor,
                                     reason=body.reason)
    response.headers["Location"] = f"/v1/products/{product.ndc}"
    return ProductRead.model_validate(product)


@router.patch("/v1/admin/products/{ndc}", response_model=ProductRead, responses=problem_responses(404))
def update_product(ndc: str, body: ProductUpdate, actor: PharmacistActor, session: SessionDep) -> ProductRead:
    """Change a product's description or its `active` flag."""
    product = service.update_product(session, ndc=ndc, changes=body.changes(), actor=actor, reason=body.reason)
    return ProductRead.model_validate(product)
