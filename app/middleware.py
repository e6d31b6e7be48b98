"""Pure-ASGI middleware: request ids, access log and metrics, and the request-body size limit."""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.log import request_id_var
from app.metrics import HTTP_LATENCY, HTTP_REQUESTS
from app.problems import internal_error_response, problem_response

logger = logging.getLogger("rxverify.access")
REQUEST_ID_HEADER = "X-Request-ID"
# A caller's id is reused only when it is short and safe to put in logs and headers.
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
# Metric labels take the method only from this set (anything else, PROPFIND or a made-up verb from a
# scanner, is "OTHER"), so that requests cannot grow the label set without bound.
_METHOD_LABELS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class PayloadTooLarge(HTTPException):
    """The request body is larger than max_request_body_bytes (413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(status_code=413, detail=f"The request body exceeds the limit of {limit} bytes.")


class ObservabilityMiddleware:
    """Takes or makes X-Request-ID, echoes it, logs one access line and records metrics per request.

    It also turns an exception that escaped every handler into a 500 problem, so even that answer
    carries the request id (Starlette's own last-resort handler sits outside user middleware).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        supplied = Headers(scope=scope).get(REQUEST_ID_HEADER)
        request_id = supplied if supplied and _VALID_REQUEST_ID.fullmatch(supplied) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status = {"code": 500, "sent": False}
        answered: list[float] = []  # when the last body chunk went out: background tasks run after it

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                status["sent"] = True
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                answered.append(time.perf_counter())

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            logger.exception("unhandled error")
            if status["sent"]:
                raise
            await internal_error_response(scope.get("path"))(scope, receive, send_with_id)
        finally:
            # The client's wait: up to the answer's last byte, not the background work after it.
            elapsed = (answered[0] if answered else time.perf_counter()) - started
            route = _route_template(scope)
            method = scope["method"] if scope["method"] in _METHOD_LABELS else "OTHER"
            HTTP_REQUESTS.labels(method, route, str(status["code"])).inc()
            HTTP_LATENCY.labels(method, route).observe(elapsed)
            logger.info("%s %s %s", scope["method"], scope.get("path"), status["code"],
                        extra={"method": scope["method"], "path": scope.get("path"), "route": route,
                               "status": status["code"], "duration_ms": round(elapsed * 1000, 2)})
            request_id_var.reset(token)


def _route_template(scope: Scope) -> str:
    # The template, not the raw path, keeps the metric's label set bounded.
    route: Any = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "<unmatched>"


class BodySizeLimitMiddleware:
    """Refuses request bodies above the limit with 413, by Content-Length up front or while streaming.

    Uploads (`large_paths`, POST) may send `max_bytes`; every other request `max_small_bytes`: a JSON body
    is parsed and validated whole, so its size bounds that work (and the number of validation errors).
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int, max_small_bytes: int | None = None,
                 large_paths: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_small_bytes = max_bytes if max_small_bytes is None else min(max_small_bytes, max_bytes)
        self.large_paths = large_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        large = scope["method"] == "POST" and scope.get("path") in self.large_paths
        limit = self.max_bytes if large else self.max_small_bytes
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._refuse(scope, receive, send, limit)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # An HTTPException, so FastAPI's body parsing passes it on to the problem handler.
                    raise PayloadTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except PayloadTooLarge:
            if started:
                raise
            await self._refuse(scope, receive, send, limit)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        response = problem_response(status=413, slug="payload-too-large", title="Payload too large",
                                    detail=f"The request body exceeds the limit of {limit} bytes.",
                                    instance=scope.get("path"), headers={"Connection": "close"})
        await response(scope, receive, send)
