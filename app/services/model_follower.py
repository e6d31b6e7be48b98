"""Each API process follows the active model version and hot-swaps to it.

Two triggers wake the follower: a Redis pub/sub message on the "model promoted" channel (sent after the
promotion's commit, by the API or the worker), and a poll of the database every `model_poll_seconds`
as the fallback for lost messages and for embedded mode, which has no Redis and polls alone. A
promotion made by this very process also pokes its follower directly. On each wake the follower reads
the active version and, when it differs from the served one, calls `engine.swap_to` (load and warm-up
off the request path, one atomic reference swap, old model freed after its in-flight batches).
A checkpoint that fails to load leaves the old model serving (the engine raises its alert metric); the
follower does not retry that same version until it changes or `retry_failed_after_s` has passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from app.config import Settings
from app.db import Database
from app.inference.engine import InferenceEngine, ModelUnavailable
from app.inference.served import ModelLoadError
from app.services.promotion import notification_channel
from app.services.serving import active_model_ref

logger = logging.getLogger(__name__)


class ModelFollower:
    """Keeps one engine on the active model version (see the module docstring)."""

    def __init__(self, *, engine: InferenceEngine, database: Database, settings: Settings,
                 retry_failed_after_s: float = 60.0) -> None:
        self.engine, self.database, self.settings = engine, database, settings
        self.retry_failed_after_s = retry_failed_after_s
        self.swaps = 0
        self.last_swap_s: float | None = None
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._failed: tuple[str, float] | None = None  # (label, monotonic time) of the last failed load

    async def start(self) -> None:
        """Start the poll loop and, with Redis configured, the subscriber."""
        self._loop = asyncio.get_running_loop()
        self._tasks.append(asyncio.create_task(self._poll_loop(), name="model-follower-poll"))
        if self.settings.redis_url:
            self._tasks.append(asyncio.create_task(self._subscribe_loop(), name="model-follower-pubsub"))

    async def stop(self) -> None:
        """Cancel the loops (a swap in progress finishes or is cancelled with them)."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()

    def poke(self) -> None:
        """Wake the follower now (thread-safe; used right after this process commits a promotion)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake.set)

    def _served_label(self) -> str | None:
        try:
            return self.engine.current.version
        except ModelUnavailable:
            return None

    async def sync(self) -> bool:
        """Serve the active version if it is not served yet; True when a swap happened."""
        ref = await asyncio.to_thread(active_model_ref, self.database)
        if ref is None or ref.label == self._served_label():
            return False
        if self._failed is not None and self._failed[0] == ref.label \
                and time.monotonic() - self._failed[1] < self.retry_failed_after_s:
            return False
        started = time.perf_counter()
        try:
            await self.engine.swap_to(ref.path, version=ref.label, registered=ref.registered)
        except ModelLoadError:
            # The engine logged it, counted it and raised the alert gauge; the old model keeps serving.
            self._failed = (ref.label, time.monotonic())
            return False
        self._failed = None
        # swap_to has dropped the old model; hand the freed heap back to the OS so RSS returns to one model.
        await asyncio.to_thread(release_heap)
        self.swaps += 1
        self.last_swap_s = time.perf_counter() - started
        logger.info("now serving model version %s (swap took %.2f s)", ref.label, self.last_swap_s)
        return True

    async def _poll_loop(self) -> None:
        failing_since: float | None = None  # while the database is down: one traceback, then a line a minute
        last_report = 0.0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.settings.model_poll_seconds)
            self._wake.clear()
            try:
                await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # e.g. the database is briefly unreachable: try again next time
                now = time.monotonic()
                if failing_since is None:
                    failing_since = last_report = now
                    logger.exception("could not follow the active model version")
                elif now - last_report >= 60:
                    last_report = now
                    logger.error("still cannot follow the active model version after %.0f s: %s: %s",
                                 now - failing_since, type(error).__name__, error)
            else:
                if failing_since is not None:
                    logger.info("following the active model version again after %.0f s",
                                time.monotonic() - failing_since)
                    failing_since = None

    async def _subscribe_loop(self) -> None:
        import redis.asyncio as aioredis

        channel = notification_channel(self.settings)
        backoff = 1.0
        while True:
            client: Any = aioredis.Redis.from_url(self.settings.redis_url or "", socket_connect_timeout=3)
            try:
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(channel)
                    backoff = 1.0
                    self._wake.set()  # messages may have been missed while (re)connecting
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            logger.info("model change announced: %s", message.get("data"))
                            self._wake.set()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                logger.warning("model-change subscription lost (%s); polling every %.0f s until it is back",
                               error, self.settings.model_poll_seconds)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
            finally:
                with contextlib.suppress(Exception):
                    await client.aclose()


def release_heap() -> bool:
    """glibc's malloc_trim(0): return free heap pages of every arena to the OS (False where unavailable).

    A retired model's tensors are freed into malloc arenas (loading runs in worker threads, each with its
    own arena); without trimming, resident memory keeps a model's worth of free pages after each swap.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        return bool(ctypes.CDLL(name).malloc_trim(0))
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return False


def follower_of(app: FastAPI) -> ModelFollower | None:
    """The app's follower (None before the lifespan started it)."""
    follower: ModelFollower | None = getattr(app.state, "model_follower", None)
    return follower


@asynccontextmanager
async def follower_lifespan(app: FastAPI, *, settings: Settings, database: Database) -> AsyncIterator[None]:
    """Follow the active model for the app's engine (started by serving_lifespan) until shutdown."""
    engine: InferenceEngine | None = getattr(app.state, "engine", None)
    if engine is None:
        yield
        return
    follower = ModelFollower(engine=engine, database=database, settings=settings)
    await follower.start()
    app.state.model_follower = follower
    try:
        yield
    finally:
        await follower.stop()
