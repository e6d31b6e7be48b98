"""Database leases on training jobs: at most one worker runs a job at a time, and orphans are requeued.

A worker claims a job with one conditional UPDATE (queued or running, and no live lease), renews the
lease from a heartbeat thread, and writes progress and the final status only while it still owns the
lease. A redelivered or duplicate message finds the lease taken and does nothing. When a worker dies
(SIGKILL, OOM, a lost node) its lease expires; the reaper, which runs in every worker, puts the job
back to `queued` with one conditional UPDATE and sends a new message, and the next claim resumes from
the job's last epoch checkpoint. Clocks of workers are assumed to agree to well within a lease.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.db import Database
from app.orm import TrainingJob, utcnow
from worker.metrics import REAPER_ACTIONS

logger = logging.getLogger(__name__)

ACTIVE = ("queued", "running")
DEFAULT_MAX_WORKER_LOSSES = 3  # RXVERIFY_TRAINING_MAX_WORKER_LOSSES
UNSENT_GRACE_S = 30.0  # a queued job without a task id this old lost its message (broker down at dispatch)


class LeaseLost(RuntimeError):
    """Another worker took the job over (our lease expired); this attempt must stop without writing."""


@dataclass(frozen=True, slots=True)
class Lease:
    """This worker's hold on one job."""

    job_id: int
    owner: str
    ttl_s: float
    taken_at: float = 0.0  # time.monotonic() just before the claim's UPDATE: the lease lasts ttl_s from then at least


@dataclass(frozen=True, slots=True)
class Claim:
    """The outcome of trying to claim a job: a lease, or why there is none (finished, leased elsewhere...)."""

    lease: Lease | None
    reason: str
    attempt: int = 0


def new_owner() -> str:
    """A name unique to this execution: host, process and a random part (two deliveries never share it)."""
    return f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"


def claim(database: Database, *, job_id: int, ttl_s: float, task_id: str | None) -> Claim:
    """Take the job's lease and mark it running, unless it is finished or another live lease holds it."""
    owner = new_owner()
    asked = time.monotonic()
    now = utcnow()
    with database.session() as session:
        taken = session.execute(
            update(TrainingJob)
            .where(TrainingJob.id == job_id, TrainingJob.status.in_(ACTIVE),
                   (TrainingJob.lease_owner.is_(None)) | (TrainingJob.lease_expires_at < now))
            .values(status="running", lease_owner=owner, lease_expires_at=now + timedelta(seconds=ttl_s),
                    attempts=TrainingJob.attempts + 1, celery_task_id=task_id or TrainingJob.celery_task_id))
        if taken.rowcount == 1:  # type: ignore[attr-defined]
            session.execute(update(TrainingJob).where(TrainingJob.id == job_id, TrainingJob.started_at.is_(None))
                            .values(started_at=now))
            attempt = session.scalar(select(TrainingJob.attempts).where(TrainingJob.id == job_id)) or 1
            return Claim(Lease(job_id, owner, ttl_s, asked), "claimed", attempt)
        job = session.get(TrainingJob, job_id)
        if job is None:
            return Claim(None, "missing")
        if job.status not in ACTIVE:
            return Claim(None, f"already {job.status}")
        return Claim(None, f"leased by {job.lease_owner} until {job.lease_expires_at}")


def _owned(lease: Lease) -> Any:
    return update(TrainingJob).where(TrainingJob.id == lease.job_id, TrainingJob.lease_owner == lease.owner,
                                     TrainingJob.status == "running")


def renew(database: Database, lease: Lease) -> bool:
    """Extend the lease (to at least ttl_s from this call); False when it is no longer ours."""
    with database.session() as session:
        result = session.execute(_owned(lease)
                                 .values(lease_expires_at=utcnow() + timedelta(seconds=lease.ttl_s)))
        return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def update_owned(session: Session, lease: Lease, **values: Any) -> None:
    """Update the job's row in the caller's transaction; LeaseLost when the lease is no longer ours."""
    result = session.execute(_owned(lease).values(**values))
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise LeaseLost(f"training job {lease.job_id} is no longer leased by {lease.owner}")


def write(database: Database, lease: Lease, **values: Any) -> None:
    """Update the job's row in its own short transaction (progress, checkpoint path)."""
    with database.session() as session:
        update_owned(session, lease, **values)


def finish(session: Session, lease: Lease, *, status: str, **values: Any) -> None:
    """Set a final status and drop the lease, in the caller's transaction (LeaseLost if it is not ours)."""
    update_owned(session, lease, status=status, finished_at=utcnow(), lease_owner=None, lease_expires_at=None,
                 **values)


def release(database: Database, lease: Lease, *, progress: dict[str, Any]) -> None:
    """Put the job back to queued (time limit reached: a retry continues from its checkpoint)."""
    with database.session() as session:
        update_owned(session, lease, status="queued", lease_owner=None, lease_expires_at=None, progress=progress)


def cancel_requested(database: Database, job_id: int) -> bool:
    """Whether someone asked the job to stop."""
    with database.session() as session:
        return _cancel_flag(session, job_id)


def _cancel_flag(session: Session, job_id: int) -> bool:
    return bool(session.scalar(select(TrainingJob.cancel_requested).where(TrainingJob.id == job_id)))


def cancelled_under_lock(session: Session, lease: Lease) -> bool:
    """In the caller's final transaction: take the job row's write lock first (renewing the lease; LeaseLost
    if it is not ours), then read `cancel_requested`. A cancel that committed before is seen; one that
    comes later waits for this transaction and then finds the job finished (409)."""
    update_owned(session, lease, lease_expires_at=utcnow() + timedelta(seconds=lease.ttl_s))
    return _cancel_flag(session, lease.job_id)


def checkpoint_epoch(database: Database, job_id: int) -> tuple[int, dict[str, Any]]:
    """The epochs held by the job's recorded epoch checkpoint (0 if none), and its stored progress."""
    with database.session() as session:
        progress = dict(session.scalar(select(TrainingJob.progress).where(TrainingJob.id == job_id)) or {})
    return int(progress.get("checkpoint_epoch") or 0), progress


HARD_LIMIT_EXIT_STATUS = 137  # what a shell reports for a SIGKILLed process, so tooling treats the two alike


def kill_this_process() -> None:
    """End this worker process at once, every thread of it, without cleanup (its supervisor, `rxverify serve`
    or the container runtime, restarts it).

    `os._exit`, not a SIGKILL to itself: a worker that is PID 1 in its container (no init process) cannot
    signal itself, as the kernel drops signals PID 1 has no handler for, SIGKILL included, so the stuck
    worker would stay up for ever.
    """
    for stream in (sys.stderr, sys.stdout):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(HARD_LIMIT_EXIT_STATUS)


class Heartbeat:
    """A daemon thread renewing a lease every third of its TTL; `lost` is set once the lease is gone.

    It is also the hard time limit of the training phase where Celery enforces none (the solo pool GPU
    workers use, and the threads pool). Training stops by itself at the soft limit; one still running at
    `hard_deadline` (time.monotonic()) has stopped answering that cooperative stop, e.g. stuck in a C
    call, and its heartbeat would keep the lease alive forever while the worker takes no other job. The
    heartbeat then records the job as failed (if it still owns the lease) and calls `on_hard_limit`, by
    default `kill_this_process` (`os._exit`: with the threads pool that also ends the process's other jobs,
    which are redelivered and resume from their checkpoints). The broker's redelivery of the killed
    job's unacknowledged message finds it finished and does nothing. A lost lease does not end the
    watch: a stuck attempt must still go. `rearm()` gives the phase after training (scoring and
    registration) a limit of its own, and an attempt that ends (`__exit__`) is never killed.

    A renewal that fails (the database unreachable) is tried again at the next beat, but once a whole TTL
    has passed since the last renewal that succeeded began, the lease has expired for everyone else: the
    reaper may have requeued the job and another worker taken it. The heartbeat then sets `lost` itself
    (fencing), so that this attempt stops writing the job's files (its epoch checkpoint) under the new one.
    """

    def __init__(self, database: Database, lease: Lease, *, hard_deadline: float | None = None,
                 hard_limit_s: float | None = None,
                 on_hard_limit: Callable[[], None] | None = None) -> None:
        self.database, self.lease = database, lease
        self.hard_deadline, self.hard_limit_s, self.on_hard_limit = hard_deadline, hard_limit_s, on_hard_limit
        self.lost = threading.Event()
        self.phase = "training"
        self._valid_until = (lease.taken_at or time.monotonic()) + lease.ttl_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{lease.job_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def rearm(self, phase: str, *, limit_s: float) -> None:
        """A new hard limit of `limit_s` from now, for the attempt's next `phase` (named in the failure)."""
        self.phase, self.hard_limit_s = phase, limit_s
        self.hard_deadline = time.monotonic() + limit_s

    def _run(self) -> None:
        interval = self.lease.ttl_s / 3
        while True:
            deadline = self.hard_deadline
            if self.lost.is_set() and deadline is None:
                return  # no lease to renew and no limit to watch
            wait = interval if deadline is None else max(0.0, min(interval, deadline - time.monotonic()))
            if self._stop.wait(wait):
                return
            deadline = self.hard_deadline
            if deadline is not None and time.monotonic() >= deadline:
                self._hard_limit()
                return
            if self.lost.is_set():
                continue
            asked = time.monotonic()
            try:
                if not renew(self.database, self.lease):
                    logger.error("lost the lease on training job %s; stopping this attempt", self.lease.job_id)
                    self.lost.set()
                    continue
                self._valid_until = asked + self.lease.ttl_s
            except Exception:  # a database blip: try again next beat (the lease outlives two misses)
                logger.exception("could not renew the lease on training job %s", self.lease.job_id)
                if time.monotonic() >= self._valid_until:
                    logger.error("training job %s: no renewal of its lease for %g s, so it has expired and another "
                                 "worker may run the job now; stopping this attempt", self.lease.job_id,
                                 self.lease.ttl_s)
                    self.lost.set()

    def _hard_limit(self) -> None:
        limit = f"{self.hard_limit_s:g} s" if self.hard_limit_s is not None else "its hard limit"
        if self.phase == "training":
            message = (f"hard time limit: the training was still running after {limit} (RXVERIFY_TASK_TIME_LIMIT_S "
                       "plus a grace) without stopping at its soft limit, so its worker process was killed")
        else:
            message = (f"hard time limit: {self.phase} after training was still running after {limit} "
                       "(RXVERIFY_TASK_TIME_LIMIT_S plus a grace), so its worker process was killed")
        logger.critical("training job %s: %s", self.lease.job_id, message)
        if not self.lost.is_set():
            try:
                with self.database.session() as session:
                    finish(session, self.lease, status="failed", error=message, result={"hard_time_limit": True})
            except LeaseLost:
                logger.warning("training job %s: the lease was lost meanwhile; nothing recorded", self.lease.job_id)
            except Exception:  # the kill must happen anyway: the lease then expires and the reaper requeues
                logger.exception("training job %s: could not record the hard time limit", self.lease.job_id)
        self.lost.set()
        deadline = self.hard_deadline
        if self._stop.is_set() or (deadline is not None and time.monotonic() < deadline):
            logger.warning("training job %s: the attempt ended or moved on to its next phase meanwhile; not killed",
                           self.lease.job_id)
            return
        (self.on_hard_limit or kill_this_process)()


# Progress keys a new attempt carries over from the stored progress (see worker.training.run).
OUTLIVES_AN_ATTEMPT = ("checkpoint_epoch", "worker_losses", "worker_losses_at_epoch", "database_errors")


def _count_worker_loss(progress: dict[str, Any]) -> int:
    """Record one more lost worker in `progress`; return how many in a row the job lost without a new epoch
    checkpoint between them (a job that kills its worker at the same place each time: out of memory...)."""
    epoch = int(progress.get("checkpoint_epoch") or 0)
    previous = int(progress.get("worker_losses") or 0) if progress.get("worker_losses_at_epoch") == epoch else 0
    progress.update(worker_losses=previous + 1, worker_losses_at_epoch=epoch)
    return previous + 1


def requeue_orphans(database: Database, *, send: Callable[[int, str | None], Any],
                    unsent_grace_s: float = UNSENT_GRACE_S,
                    max_worker_losses: int = DEFAULT_MAX_WORKER_LOSSES) -> list[int]:
    """Requeue running jobs whose lease expired and resend queued jobs whose message never left; returns ids.

    A job whose worker died `max_worker_losses` times in a row without a new epoch checkpoint is failed
    instead: requeued again, it would most likely take the next worker down at the same place, for ever.
    One whose cancel was asked for ends cancelled: running it again only to stop it at its first step
    would load its data and models for nothing, and a crash on the way would end it failed instead.
    """
    now = utcnow()
    requeued: list[int] = []
    with database.session() as session:
        expired = list(session.scalars(select(TrainingJob.id).where(TrainingJob.status == "running",
                                                                    TrainingJob.lease_expires_at < now)))
        unsent = list(session.scalars(select(TrainingJob.id).where(
            TrainingJob.status == "queued", TrainingJob.celery_task_id.is_(None),
            TrainingJob.created_at < now - timedelta(seconds=unsent_grace_s))))
    for job_id in expired:
        with database.session() as session:
            job = session.get(TrainingJob, job_id)
            progress = dict(job.progress or {}) if job is not None else {}
            losses = _count_worker_loss(progress)
            # Conditional: of several reapers, exactly one moves the job on (queued, cancelled or failed).
            where = update(TrainingJob).where(TrainingJob.id == job_id, TrainingJob.status == "running",
                                              TrainingJob.lease_expires_at < now)
            if job is not None and job.cancel_requested:
                progress.update(phase="cancelled", eta_s=None)
                if _end_orphan(session, where, now=now, status="cancelled", progress=progress,
                               result={"cancelled_after_epochs": progress.get("checkpoint_epoch") or 0}):
                    logger.info("training job %s lost its worker after a cancel was asked for; cancelled", job_id)
                continue
            if losses >= max_worker_losses:
                progress["phase"] = "failed"
                error = (f"the worker running this job died {losses} times in a row at the same point (no new "
                         "epoch checkpoint between); it was not requeued again. Look in the worker's log and the "
                         "system log for the cause (out of memory: a smaller batch_size)")
                if _end_orphan(session, where, now=now, status="failed", progress=progress,
                               result={"worker_losses": losses}, error=error):
                    logger.error("training job %s: %s", job_id, error)
                continue
            progress["phase"] = "requeued"
            task_id = str(uuid.uuid4())
            result = session.execute(where.values(status="queued", lease_owner=None, lease_expires_at=None,
                                                  progress=progress, celery_task_id=task_id))
            won = result.rowcount == 1  # type: ignore[attr-defined]
        if won:
            logger.warning("training job %s lost its worker (lease expired); requeued", job_id)
            REAPER_ACTIONS.labels("requeued").inc()
            if _send(database, send, job_id, task_id):
                requeued.append(job_id)
    for job_id in unsent:
        task_id = str(uuid.uuid4())
        with database.session() as session:
            result = session.execute(update(TrainingJob).where(
                TrainingJob.id == job_id, TrainingJob.status == "queued", TrainingJob.celery_task_id.is_(None))
                .values(celery_task_id=task_id))
            won = result.rowcount == 1  # type: ignore[attr-defined]
        if won:
            logger.warning("training job %s was never sent to the broker; sending it now", job_id)
            REAPER_ACTIONS.labels("resent").inc()
            if _send(database, send, job_id, task_id):
                requeued.append(job_id)
    return requeued


def _end_orphan(session: Session, where: Any, *, now: Any, status: str, progress: dict[str, Any],
                result: dict[str, Any], error: str | None = None) -> bool:
    """End an orphaned job (`failed` or `cancelled`) through the conditional update `where`; True when this
    reaper's write is the one that did it (and counted in the reaper's metrics)."""
    values: dict[str, Any] = {"status": status, "finished_at": now, "lease_owner": None, "lease_expires_at": None,
                              "progress": progress, "result": result}
    if error is not None:
        values["error"] = error
    won = session.execute(where.values(**values)).rowcount == 1  # type: ignore[attr-defined]
    if won:
        REAPER_ACTIONS.labels(status).inc()
    return won


def _send(database: Database, send: Callable[[int, str | None], Any], job_id: int, task_id: str) -> bool:
    """Send the job's message; if the broker refuses, forget the task id so that the next pass sends again
    (a queued job with a task id counts as sent, and nothing else would ever resend it)."""
    try:
        send(job_id, task_id)
        return True
    except Exception:
        logger.exception("training job %s could not be sent; the next reaper pass tries again", job_id)
        forget_task_id(database, job_id, task_id)
        return False


def forget_task_id(database: Database, job_id: int, task_id: str | None) -> None:
    """A queued job's message did not reach the broker: drop its task id, so that it counts as never sent
    and the reaper's next pass sends it (a queued job with a task id counts as sent)."""
    with database.session() as session:
        session.execute(update(TrainingJob).where(TrainingJob.id == job_id, TrainingJob.status == "queued",
                                                  TrainingJob.celery_task_id == task_id)
                        .values(celery_task_id=None))


class Reaper:
    """Runs `requeue_orphans` at start and then every lease TTL, on a daemon thread of the worker, then
    `sweep` (if given: the ended jobs' leftover work files, `registration.sweep_ended_work_files`)."""

    def __init__(self, database: Database, *, send: Callable[[int, str | None], Any], interval_s: float,
                 max_worker_losses: int = DEFAULT_MAX_WORKER_LOSSES, sweep: Callable[[], Any] | None = None) -> None:
        self.database, self.send, self.interval_s = database, send, interval_s
        self.max_worker_losses = max_worker_losses
        self.sweep = sweep
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="training-reaper", daemon=True)

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop after the current pass."""
        self._stop.set()

    def _run(self) -> None:
        while True:
            try:
                requeue_orphans(self.database, send=self.send, max_worker_losses=self.max_worker_losses)
                if self.sweep is not None:
                    self.sweep()
            except Exception:
                logger.exception("the training-job reaper failed; retrying")
            if self._stop.wait(self.interval_s):
                return
