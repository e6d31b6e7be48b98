"""Catalog routes: anyone with a key reads it; pharmacists and admins change it."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from app.api.deps import ClientActor, KeyFirstRoute, PharmacistActor, SessionDep
from app.api.paging import NEXT_LINK_AFTER_NDC_RESPONSE, link_next_page_after
from app.orm.catalog import NDC_KEY_LENGTH
from app.schemas.common import NO_CONTROL_PATTERN, problem_responses
from app.schemas.products import ProductCreate, ProductRead, ProductUpdate
from app.services import products as service

router = APIRouter(route_class=KeyFirstRoute, tags=["catalog"], responses=problem_responses(401, 403, 422))


@router.get("/v1/products", response_model=list[ProductRead], responses=NEXT_LINK_AFTER_NDC_RESPONSE)
def list_products(_actor: ClientActor, session: SessionDep, request: Request, response: Response,
                  active: bool | None = None, limit: Annotated[int, Query(ge=1, le=1000)] = 500,
                  after_ndc: Annotated[str | None, Query(max_length=NDC_KEY_LENGTH, pattern=NO_CONTROL_PATTERN)] = None,
                  ) -> list[ProductRead]:
    """The catalog in NDC order; `?active=true` lists only products that can be verified.

    A full page has a `Link: rel="next"` header whose URL continues after its last NDC (`after_ndc`).
    """
    products = service.list_products(session, active=active, limit=limit, after_ndc=after_ndc)
    link_next_page_after(request, response, [p.ndc for p in products], limit=limit, param="after_ndc")
    return [ProductRead.model_validate(p) for p in products]


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
