"""Keyset paging of the lists that answer a bare JSON array: an RFC 8288 `Link: <...>; rel="next"` header
when the page is full, so a client need not build the next URL itself. Lists of records are newest first and
page by `before_id`; the catalog is in NDC order and pages by `after_ndc`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import Request, Response


def next_link_response(page: str) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI description of the `Link` header, for `responses=`."""
    return {200: {"headers": {"Link": {"description": f'The next page, when this one is full: {page}.',
                                       "schema": {"type": "string"}}}}}


NEXT_LINK_RESPONSE = next_link_response('`<path?...&before_id=N>; rel="next"`, older entries')
NEXT_LINK_AFTER_NDC_RESPONSE = next_link_response('`<path?...&after_ndc=NDC>; rel="next"`, the NDCs that follow')


def link_next_page(request: Request, response: Response, ids: Sequence[int], *, limit: int) -> None:
    """Set `Link: rel="next"` to this request's URL with `before_id` the page's smallest id, if it is full."""
    if ids and len(ids) >= limit:
        _link_next(request, response, before_id=min(ids), limit=limit)


def link_next_page_after(request: Request, response: Response, keys: Sequence[str], *, limit: int,
                         param: str) -> None:
    """Set `Link: rel="next"` with `param` the page's last key, if the page is full.

    The last row, not Python's largest string: the database orders (and compares `after_ndc`) by its own
    collation, which may differ from code-point order (en_US ignores the hyphen: `100001-0000` sorts before
    `10000-9999`), and both the order and the comparison must use the same one.
    """
    if keys and len(keys) >= limit:
        _link_next(request, response, **{param: keys[-1]}, limit=limit)


def _link_next(request: Request, response: Response, **params: str | int) -> None:
    url = request.url.include_query_params(**params)
    response.headers["Link"] = f'<{url.path}?{url.query}>; rel="next"'
