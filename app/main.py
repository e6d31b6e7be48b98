"""The FastAPI application factory: routers, problem handlers, middleware, lifespan."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import metadata

from fastapi import FastAPI

from app.api import api_keys, audit, cost_matrices, health, models, products, training_jobs, verifications
from app.config import Settings, get_settings, redacted_url
from app.db import Database
from app.log import configure_logging
from app.middleware import BodySizeLimitMiddleware, ObservabilityMiddleware
from app.migrate import head_revision
from app.openapi import install_openapi
from app.problems import install_problem_handlers
from app.services.model_follower import follower_lifespan
from app.services.readiness import DatabaseProbe
from app.services.serving import serving_lifespan

logger = logging.getLogger(__name__)

API_DESCRIPTION = """
Dispensing verification for pharmacies, with cost-sensitive image classification (CSADA).

Authenticate with an API key in the `X-API-Key` header. Roles: `client` (verifications),
`pharmacist` (catalog, cost matrices, resolutions, training, logs) and `admin` (everything, including
keys and promotion).

Every error is RFC 9457 `application/problem+json` with `type`, `title`, `status` and `detail`
(plus `errors` pointing at bad fields, and `request_id`). **Any non-200 answer to a verification means
a pharmacist must check the bottle.**
"""


def _no_model() -> bool:
    return False


def _version() -> str:
    try:
        return metadata.version("rxverify")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API for `settings` (default: from the environment). Uvicorn calls this as a factory."""
    settings = settings or get_settings()
    configure_logging(settings)
    settings.ensure_dirs()
    database = Database(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        logger.info("rxverify API starting", extra={"data_dir": str(settings.data_dir),
                                                    "database": redacted_url(settings.database_url),
                                                    "broker": redacted_url(settings.broker_url)})
        try:
            # The engine and the active model, then the follower that hot-swaps it on promotion.
            async with serving_lifespan(_app, settings=settings, database=database), \
                    follower_lifespan(_app, settings=settings, database=database):
                yield
        finally:
            database.dispose()
            logger.info("rxverify API stopped")

    # No redirect from `/path/` to `/path`: it was an empty 307 (not a problem), answered before the key
    # check, whose Location was built from the request's own Host header.
    app = FastAPI(title="rxverify", version=_version(), description=API_DESCRIPTION, lifespan=lifespan,
                  redirect_slashes=False)
    app.state.settings = settings
    app.state.db = database
    app.state.db_probe = DatabaseProbe(  # /readyz's database check, bounded by RXVERIFY_READINESS_TIMEOUT_S
        database.engine, pool_capacity=settings.db_pool_size + settings.db_max_overflow,
        expected_revision=head_revision())  # and the schema must be the one this code was written for
    # The inference engine sets this to a callable that says whether a model is loaded and warm.
    app.state.model_ready = _no_model
    app.state.verifications_in_flight = 0  # app.services.serving.admitted
    install_problem_handlers(app)
    install_openapi(app)  # errors documented as application/problem+json, as they are sent
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_body_bytes,
                       max_small_bytes=settings.max_small_body_bytes, large_paths=frozenset({verifications.UPLOAD_PATH}))
    app.add_middleware(ObservabilityMiddleware)  # added last = outermost: it sees every answer
    for router in (health.router, products.router, cost_matrices.router, api_keys.router, audit.router,
                   verifications.router, training_jobs.router, models.router):
        app.include_router(router)
    return app
