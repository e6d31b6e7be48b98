"""The inference engine inside the API process: created from settings, started in the app lifespan.

At startup the engine starts, Pillow is configured for uploads, and the active model version (if any)
is loaded and warmed up before `app.state.model_ready` can turn true. A model that fails to load leaves
the service up but not ready, and verifications answer 503 `model-unavailable`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI

from app.config import Settings
from app.db import Database
from app.inference.engine import EngineConfig, InferenceEngine, ModelUnavailable, QueueFull
from app.inference.images import ImageLimits, configure_pillow
from app.inference.served import ModelLoadError, Registered, ServedModel
from app.services.model_registry import active_model_version, checkpoint_path, engine_label

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ModelRef:
    """Where a registered version's checkpoint is and the label the engine serves it under."""

    label: str
    path: Path
    registered: Registered  # what the checkpoint on disk must still be (weights, policy, temperature)


def create_engine(settings: Settings) -> InferenceEngine:
    """An engine configured from settings (batch size, wait, queue size, device, torch threads)."""
    return InferenceEngine(config=EngineConfig.from_settings(settings))


def engine_of(app: FastAPI) -> InferenceEngine:
    """The app's engine; ModelUnavailable when the lifespan has not started one."""
    engine: InferenceEngine | None = getattr(app.state, "engine", None)
    if engine is None:
        raise ModelUnavailable("the inference engine is not running; a pharmacist must check this bottle")
    return engine


def limits_of(app: FastAPI) -> ImageLimits:
    """The upload limits of this app's settings."""
    limits: ImageLimits | None = getattr(app.state, "image_limits", None)
    return limits if limits is not None else ImageLimits.from_settings(app.state.settings)


@contextlib.contextmanager
def admitted(app: FastAPI) -> Iterator[None]:
    """Count one verification in flight for its whole request, or refuse it at once (QueueFull: 503 with
    Retry-After) when settings.max_verifications_in_flight are already: the engine's queue bound alone is
    checked only after the upload was read and decoded, so under load requests would pile up before it,
    each holding its upload, with ever-growing latency and no 503. Runs on the event loop (no lock needed)."""
    limit = app.state.settings.max_verifications_in_flight
    in_flight: int = app.state.verifications_in_flight
    if in_flight >= limit:
        raise QueueFull(f"{in_flight} verifications are already in progress in this API process "
                        "(RXVERIFY_MAX_VERIFICATIONS_IN_FLIGHT); try again shortly", retry_after_s=1)
    app.state.verifications_in_flight = in_flight + 1
    try:
        yield
    finally:
        app.state.verifications_in_flight -= 1


def decode_slots_of(app: FastAPI) -> asyncio.Semaphore:
    """The app's bound on concurrent upload decodes (settings.max_concurrent_decodes), made on first use on the
    event loop: decode memory stays bounded."""
    slots: asyncio.Semaphore | None = getattr(app.state, "decode_slots", None)
    if slots is None:
        slots = app.state.decode_slots = asyncio.Semaphore(app.state.settings.max_concurrent_decodes)
    return slots


def active_model_ref(database: Database) -> ModelRef | None:
    """The active version's checkpoint and engine label, read from the database (blocking)."""
    with database.session() as session:
        version = active_model_version(session)
        if version is None:
            return None
        return ModelRef(label=engine_label(version), path=checkpoint_path(database.settings, version),
                        registered=Registered(sha256=version.sha256, decision=dict(version.decision or {}),
                                              temperature=version.temperature))


async def load_active_model(engine: InferenceEngine, database: Database) -> ServedModel | None:
    """Load and warm up the active version unless it is already served; None when there is none."""
    ref = await asyncio.to_thread(active_model_ref, database)
    if ref is None:
        logger.warning("no active model version: /readyz stays false until one is activated")
        return None
    try:
        current = engine.current
    except ModelUnavailable:
        current = None
    if current is not None and current.version == ref.label:
        return current
    return await engine.load_model(ref.path, version=ref.label, registered=ref.registered)


@asynccontextmanager
async def serving_lifespan(app: FastAPI, *, settings: Settings, database: Database) -> AsyncIterator[None]:
    """Start the engine, load + warm up the active model, publish the readiness hook; stop on exit."""
    configure_pillow(max_pixels=settings.max_image_pixels)
    engine = create_engine(settings)
    await engine.start()
    app.state.engine = engine
    app.state.image_limits = ImageLimits.from_settings(settings)
    app.state.model_ready = lambda: engine.ready
    try:
        await load_active_model(engine, database)
    except ModelLoadError:
        logger.exception("the active model failed to load; serving nothing until a model is activated")
    except Exception:  # e.g. the database is unreachable: start anyway, /readyz says what is wrong
        logger.exception("could not look up the active model version; serving nothing for now")
    try:
        yield
    finally:
        await engine.stop()


def install_checkpoint(settings: Settings, source: str | Path, *, actor_name: str = "cli:serve --model") -> int:
    """`rxverify serve --model DIR`: register DIR (if new, classes checked against the catalog) and activate it."""
    from app.services.audit import Actor
    from app.services.model_registry import register_and_activate

    database = Database(settings)
    try:
        with database.session() as session:
            version = register_and_activate(session, source=source, settings=settings, actor=Actor.cli(actor_name),
                                            # Not the path: reasons are shown to pharmacists, server paths
                                            # only to admins (the model.register audit entry's `source`).
                                            reason="served with `rxverify serve --model`")
            return version.id
    finally:
        database.dispose()
