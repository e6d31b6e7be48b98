"""The inference engine: one served model, a bounded queue, dynamic batching and atomic model swaps.

Request path (`predict_image`): the caller grabs the current `ServedModel` bundle, decodes and
preprocesses the upload with that bundle's `EvalPreset` in a worker thread (never on the event loop),
then `submit`s the tensor. One asyncio task collects up to `max_batch_size` requests, waiting at most
`max_wait_ms` after the first, and runs the forward pass on a dedicated torch thread (`inference_workers`
of them compute batches side by side; one by default). With
`adaptive_wait` (the default) it only waits while some request inside `using_current` has not submitted
yet (it is still being preprocessed and can join); a lone request at low load runs at once instead of
paying `max_wait_ms` for nothing. Routes that preprocess themselves should do it inside `using_current`.

Swaps (`swap_to`): the new checkpoint is loaded in a thread and warmed up on the torch thread, then ONE
reference (`self._current`) is replaced. Every queued request carries the bundle it was preprocessed
for, and the batcher groups by bundle, so a batch never mixes versions, a request is always run by the
model whose preset produced its tensor, and each `Prediction` names that model's version. The old
bundle is dropped once no request holds it any more, and its memory is released.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import math
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from starlette.concurrency import run_in_threadpool

from app.errors import DomainError, ServiceUnavailable
from app.inference.images import ImageLimits
from app.inference.metrics import InferenceMetrics, default_metrics
from app.inference.served import (
    ModelLoadError,
    Prediction,
    Registered,
    ServedModel,
    forward_outputs,
    load_served_model,
)
from models.runtime import select_device, serve_channels_last, set_cpu_threads

logger = logging.getLogger(__name__)


class ModelUnavailable(ServiceUnavailable):
    """No model is loaded (or the engine is stopped): 503 `model-unavailable`."""

    default_slug = "model-unavailable"
    default_title = "No model is being served"


class QueueFull(ServiceUnavailable):
    """The bounded request queue is full: 503 with Retry-After, never an unbounded wait."""

    default_slug = "inference-queue-full"
    default_title = "The inference queue is full"

    def __init__(self, detail: str, *, retry_after_s: int) -> None:
        super().__init__(detail, headers={"Retry-After": str(retry_after_s)}, extra={"retry_after_s": retry_after_s})
        self.retry_after_s = retry_after_s


class InferenceFailed(DomainError):
    """The forward pass itself failed (a server fault): 500 `inference-failed`."""

    status = 500
    default_slug = "inference-failed"
    default_title = "The model failed to run"


@dataclass(frozen=True)
class EngineConfig:
    """Batching and runtime knobs (see `from_settings`)."""

    max_batch_size: int = 16
    max_wait_ms: float = 5.0
    queue_size: int = 256
    device: str = "auto"
    torch_threads: int | None = None
    autocast: bool = False  # bf16 autocast on CUDA (settings.inference_amp); float32 by default
    channels_last: str = "auto"  # settings.inference_channels_last: auto | true | false
    warmup_batch_sizes: tuple[int, ...] = ()  # empty: 1 and max_batch_size
    drain_timeout_s: float = 30.0
    adaptive_wait: bool = True  # wait for partners only while some request is still being preprocessed
    inference_workers: int = 1  # batches computed at once, each on its own torch thread

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.queue_size < 1 or self.max_wait_ms < 0:
            raise ValueError("max_batch_size and queue_size must be >= 1 and max_wait_ms >= 0")
        if self.inference_workers < 1:
            raise ValueError("inference_workers must be >= 1")

    @classmethod
    def from_settings(cls, settings: Any) -> EngineConfig:
        """Read the engine settings from an `app.config.Settings`-like object."""
        return cls(max_batch_size=settings.max_batch_size, max_wait_ms=settings.max_batch_wait_ms,
                   queue_size=settings.inference_queue_size, device=settings.device,
                   torch_threads=settings.torch_threads, inference_workers=settings.inference_workers,
                   autocast=settings.inference_amp,
                   channels_last=settings.inference_channels_last)

    def channels_last_on(self, device: torch.device) -> bool:
        """Whether models served on `device` run channels-last (`models.runtime.serve_channels_last`)."""
        return serve_channels_last(device, autocast=self.autocast, preference=self.channels_last)

    @property
    def warmup_sizes(self) -> tuple[int, ...]:
        """Batch sizes run once before a model becomes current (on CUDA; see warmup_sizes_for)."""
        return self.warmup_batch_sizes or tuple(sorted({1, self.max_batch_size}))

    def warmup_sizes_for(self, device: torch.device) -> tuple[int, ...]:
        """On the CPU only batch 1: a new batch shape costs little there, and a max-size warm-up batch would
        hold up live batches on the one torch thread for a whole forward during a hot swap."""
        if self.warmup_batch_sizes or device.type == "cuda":
            return self.warmup_sizes
        return (1,)


@dataclass(eq=False)
class _Pending:
    tensor: torch.Tensor
    served: ServedModel
    future: asyncio.Future[Prediction]
    enqueued: float


class InferenceEngine:
    """One model in memory, served through a bounded, dynamically batched queue; see the module docstring."""

    def __init__(self, *, config: EngineConfig | None = None, metrics: InferenceMetrics | None = None) -> None:
        self.config = config or EngineConfig()
        self.metrics = metrics or default_metrics()
        self.device = select_device(self.config.device)
        self._current: ServedModel | None = None
        self._holds: dict[int, int] = {}  # id(bundle) -> requests holding it (event-loop thread only)
        self._queue: asyncio.Queue[_Pending] | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._slots: asyncio.Semaphore | None = None  # free torch threads (config.inference_workers)
        self._running: set[asyncio.Task[None]] = set()  # batches being computed
        self._swap_lock: asyncio.Lock | None = None
        self._stopping = False
        self._leases = 0  # requests inside using_current (preprocessing, queued or computing)
        self._outstanding = 0  # submitted requests not answered yet
        self._batch_seconds = 0.05  # running estimate for Retry-After

    # --- state ------------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """True when a warmed-up model is current and the batcher runs."""
        return (self._current is not None and not self._stopping and self._task is not None
                and not self._task.done())

    @property
    def current(self) -> ServedModel:
        """The bundle new requests use; raises ModelUnavailable when none is loaded."""
        served = self._current
        if served is None or self._stopping:
            raise ModelUnavailable("no model is loaded yet; a pharmacist must check this bottle")
        return served

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a batch."""
        return self._queue.qsize() if self._queue is not None else 0

    async def start(self) -> None:
        """Start the batcher and the torch thread (idempotent; needs a running event loop)."""
        if self._task is not None and not self._task.done():
            return
        set_cpu_threads(self.config.torch_threads)
        self._stopping = False
        self._executor = ThreadPoolExecutor(max_workers=self.config.inference_workers,
                                            thread_name_prefix="rxverify-torch")
        self._slots = asyncio.Semaphore(self.config.inference_workers)
        self._queue = asyncio.Queue(maxsize=self.config.queue_size)
        self._swap_lock = asyncio.Lock()
        self._task = asyncio.create_task(self._batch_loop(), name="rxverify-batcher")

    # --- requests ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def using_current(self) -> Iterator[ServedModel]:
        """Hold the current bundle for one request (event-loop thread), so a swap waits for it before freeing."""
        served = self.current
        self._hold(served)
        self._leases += 1
        try:
            yield served
        finally:
            self._leases -= 1
            self._release(served)

    @property
    def _preparing(self) -> int:
        """Requests holding a bundle that have not submitted yet: they may still join the next batch."""
        return max(0, self._leases - self._outstanding)

    async def predict_image(self, data: bytes, *, limits: ImageLimits) -> Prediction:
        """Decode + preprocess in a worker thread for the current model, then run it in a batch."""
        with self.using_current() as served:
            tensor = await run_in_threadpool(served.preprocess, data, limits=limits)
            return await self.submit(tensor, served=served)

    async def submit(self, tensor: torch.Tensor, *, served: ServedModel) -> Prediction:
        """Queue one preprocessed (C, H, W) tensor for `served`; QueueFull at once when the queue is full."""
        if self._queue is None or self._stopping or self._task is None or self._task.done():
            raise ModelUnavailable("the inference engine is not running")
        if tuple(tensor.shape) != served.input_shape:
            raise ValueError(f"tensor shape {tuple(tensor.shape)} does not match the model's {served.input_shape}")
        future: asyncio.Future[Prediction] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Pending(tensor, served, future, time.perf_counter()))
        except asyncio.QueueFull:
            self.metrics.rejected.labels(reason="queue-full").inc()
            waves = math.ceil(self._queue.qsize() / self.config.max_batch_size)
            raise QueueFull(f"{self._queue.qsize()} requests are waiting; retry shortly",
                            retry_after_s=max(1, math.ceil(waves * self._batch_seconds))) from None
        self.metrics.queue_depth.set(self._queue.qsize())
        self._hold(served)
        self._outstanding += 1
        try:
            return await future
        finally:
            self._outstanding -= 1
            self._release(served)

    def _hold(self, served: ServedModel) -> None:
        self._holds[id(served)] = self._holds.get(id(served), 0) + 1

    def _release(self, served: ServedModel) -> None:
        left = self._holds.get(id(served), 1) - 1
        if left > 0:
            self._holds[id(served)] = left
        else:
            self._holds.pop(id(served), None)

    # --- batching ---------------------------------------------------------------------------------
    async def _batch_loop(self) -> None:
        # A batch is collected only once a torch thread is free for it (with one thread: after the previous
        # batch has finished, so requests arriving meanwhile join the next batch), then computed in a task.
        assert self._queue is not None and self._slots is not None
        queue, slots, loop = self._queue, self._slots, asyncio.get_running_loop()
        max_wait = self.config.max_wait_ms / 1000.0
        batch: list[_Pending] = []
        try:
            while True:
                await slots.acquire()
                try:
                    batch = [await queue.get()]
                    deadline = loop.time() + max_wait
                    while len(batch) < self.config.max_batch_size:
                        try:
                            batch.append(queue.get_nowait())
                            continue
                        except asyncio.QueueEmpty:
                            pass
                        remaining = deadline - loop.time()
                        if remaining <= 0 or (self.config.adaptive_wait and self._preparing == 0):
                            break
                        try:
                            batch.append(await asyncio.wait_for(queue.get(), remaining))
                        except TimeoutError:
                            break
                except BaseException:
                    slots.release()
                    raise
                self.metrics.queue_depth.set(queue.qsize())
                task = asyncio.create_task(self._compute(batch), name="rxverify-batch")
                self._running.add(task)
                task.add_done_callback(self._running.discard)
                batch = []  # drop the references, so a retired model can be freed while the queue is idle
        except asyncio.CancelledError:
            _fail(batch, lambda: ModelUnavailable("the inference engine is shutting down"))
            raise

    async def _compute(self, batch: Sequence[_Pending]) -> None:
        """Run one batch on a free torch thread, then give the thread back."""
        assert self._slots is not None
        try:
            await self._run_batch(batch)
        except Exception:  # the batcher must survive anything one batch does
            logger.exception("inference batch failed")
            _fail(batch, lambda: InferenceFailed("the model failed to run on this batch"))
        finally:
            self._slots.release()

    async def _run_batch(self, batch: Sequence[_Pending]) -> None:
        groups: dict[int, list[_Pending]] = {}
        for item in batch:
            if not item.future.done():  # a cancelled request (client gone) costs no compute
                groups.setdefault(id(item.served), []).append(item)
        loop = asyncio.get_running_loop()
        for group in groups.values():
            served = group[0].served  # one bundle per forward: a batch never mixes model versions
            started = time.perf_counter()
            for item in group:
                self.metrics.queue_wait.observe(started - item.enqueued)
            self.metrics.batch_size.observe(len(group))
            try:
                probs, scores = await loop.run_in_executor(self._executor, self._forward, served,
                                                           [item.tensor for item in group])
            except Exception as error:
                logger.exception("forward pass of model %s failed", served.version)
                # The exception text (shapes, device names, paths) stays in the log; the client gets the
                # version and the request id to quote.
                detail = f"model {served.version} failed to run ({type(error).__name__}); the service log has the details"
                _fail(group, functools.partial(InferenceFailed, detail))
                continue
            self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * (time.perf_counter() - started)
            for index, (item, row) in enumerate(zip(group, probs, strict=True)):
                if not item.future.done():
                    item.future.set_result(Prediction(probs=row, model_version=served.version,
                                                      classes=served.classes, served=served,
                                                      stage_scores=None if scores is None else scores[index]))

    def _forward(self, served: ServedModel, tensors: Sequence[torch.Tensor], *, record: bool = True
                 ) -> tuple[np.ndarray, np.ndarray | None]:
        """One batched forward on the torch thread: (B, K) calibrated probabilities as float64, and the
        familiarity check's (B, L) stage scores (None without one)."""
        started = time.perf_counter()
        result = forward_outputs(served, tensors, autocast=self.config.autocast)
        if record:
            self.metrics.inference_seconds.observe(time.perf_counter() - started)
        return result

    # --- loading and swapping -----------------------------------------------------------------------
    async def load_model(self, checkpoint_dir: str | Path, *, version: str,
                         registered: Registered | None = None) -> ServedModel:
        """Load, warm up and serve a checkpoint (the first model, or a swap: same path as swap_to)."""
        return await self.swap_to(checkpoint_dir, version=version, registered=registered)

    async def swap_to(self, checkpoint_dir: str | Path, *, version: str,
                      registered: Registered | None = None) -> ServedModel:
        """Load + warm up off the request path, swap one reference, drain and free the old model.

        Raises ModelLoadError (after counting the failure and raising the alert gauge) when the checkpoint
        fails to load or to warm up, or is not what the registry recorded (`registered`); the previous model
        then keeps serving untouched.
        """
        await self.start()
        assert self._swap_lock is not None
        async with self._swap_lock:
            started = time.perf_counter()
            try:
                served = await asyncio.to_thread(load_served_model, checkpoint_dir, version=version,
                                                 device=self.device,
                                                 channels_last=self.config.channels_last_on(self.device),
                                                 registered=registered)
                await self._warm_up(served)
            except Exception as error:
                self.metrics.swaps.labels(outcome="failure").inc()
                self.metrics.swap_failed.set(1)
                serving = self._current.version if self._current else "none"
                logger.error("loading model %s from %s failed (still serving %s): %s", version, checkpoint_dir,
                             serving, error)
                raise ModelLoadError(f"model {version} from {checkpoint_dir} failed to load or warm up: "
                                     f"{error}") from error
            previous, self._current = self._current, served
            self.metrics.swaps.labels(outcome="success").inc()
            self.metrics.swap_failed.set(0)
            self.metrics.swap_seconds.observe(time.perf_counter() - started)
            self.metrics.model.info({"version": version, "weights_sha256": served.weights_sha256,
                                     "arch": served.metadata.arch, "device": str(served.device),
                                     "channels_last": str(served.channels_last).lower()})
            self.metrics.ready.set(1)
            logger.info("serving model %s (%s) on %s%s", version, served.metadata.arch, served.device,
                        f", replacing {previous.version}" if previous else "")
            if previous is not None:
                # Hand over the only reference this frame holds, so the retired model can really be freed.
                box = [previous]
                del previous
                await self._retire(box)
            return served

    async def _warm_up(self, served: ServedModel) -> None:
        """Run the batch sizes the model will see, one forward per job, interleaved with live batches."""
        loop = asyncio.get_running_loop()
        example = served.preset(Image.new("RGB", (served.preset.image_size,) * 2, (128, 128, 128)))
        for size in self.config.warmup_sizes_for(served.device):
            probs, _scores = await loop.run_in_executor(
                self._executor, functools.partial(self._forward, served, [example] * size, record=False))
            if probs.shape != (size, len(served.classes)) or not np.isfinite(probs).all():
                raise ModelLoadError(f"warm-up at batch {size} gave {probs.shape} outputs"
                                     f"{'' if np.isfinite(probs).all() else ' with non-finite values'}")

    async def _retire(self, box: list[ServedModel]) -> None:
        """Wait (bounded) until no request holds the old bundle, then drop it and release its memory."""
        old = box.pop()
        key, device = id(old), old.device
        deadline = time.monotonic() + self.config.drain_timeout_s
        while self._holds.get(key, 0) > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        if self._holds.get(key, 0) > 0:
            logger.warning("model %s still held by %d requests after %.0f s; they keep their reference",
                           old.version, self._holds[key], self.config.drain_timeout_s)
        # Reference counting frees the model as soon as its last holder lets go (a model has no reference
        # cycles). No gc.collect() here: it holds the GIL for ~180 ms in a serving process (420k tracked
        # objects), stalling the event loop and every batch, and it frees nothing a holder still uses.
        # Cached GPU memory is handed back when the model really goes.
        if device.type == "cuda":
            weakref.finalize(old.model, torch.cuda.empty_cache)
        del old

    # --- shutdown -----------------------------------------------------------------------------------
    async def stop(self, *, drain_timeout_s: float = 10.0) -> None:
        """Refuse new requests, let queued ones finish (bounded), then stop the batcher and the torch thread."""
        self._stopping = True
        self.metrics.ready.set(0)
        task, queue = self._task, self._queue
        if task is not None and queue is not None:
            deadline = time.monotonic() + drain_timeout_s
            while self._holds and time.monotonic() < deadline and not task.done():
                await asyncio.sleep(0.005)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if self._running:  # batches already on a torch thread finish and answer their requests
                await asyncio.gather(*self._running, return_exceptions=True)
            _fail([queue.get_nowait() for _ in range(queue.qsize())],
                  lambda: ModelUnavailable("the inference engine is shutting down"))
        if self._executor is not None:
            await asyncio.to_thread(self._executor.shutdown, wait=True)
        device = self._current.device if self._current else self.device
        self._task = self._queue = self._executor = self._slots = None
        self._current = None
        await asyncio.to_thread(_release_memory, device)


def _fail(items: Sequence[_Pending], error: Callable[[], Exception]) -> None:
    """Resolve every still-pending request of `items` with its own exception from `error()`."""
    for item in items:
        if not item.future.done():
            item.future.set_exception(error())


def _release_memory(device: torch.device) -> None:
    """At shutdown: collect what is left and hand cached GPU memory back."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
