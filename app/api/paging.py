"""Keyset paging of the lists that answer a bare JSON array (newest first, `before_id`): an RFC 8288
`Link: <...>; rel="next"` header when the page is full, so a client need not build the next URL itself."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import Request, Response

NEXT_LINK_RESPONSE: dict[int | str, dict[str, Any]] = {200: {"headers": {"Link": {
    "description": 'The next (older) page, when this one is full: `<path?...&before_id=N>; rel="next"`.',
    "schema": {"type": "string"}}}}}


def link_next_page(request: Request, response: Response, ids: Sequence[int], *, limit: int) -> None:
    """Set `Link: rel="next"` to this request's URL with `before_id` the page's smallest id, if it is full."""
    if ids and len(ids) >= limit:
        url = request.url.include_query_params(before_id=min(ids), limit=limit)
        response.headers["Link"] = f'<{url.path}?{url.query}>; rel="next"'
