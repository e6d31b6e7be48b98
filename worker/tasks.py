"""Celery tasks. `rxverify.training.run_job(job_id)` runs one training job; `JobTask` owns its status.

Delivery guarantees come from the Celery settings (acks_late, prefetch 1, reject on worker lost, a
visibility timeout above the hard limit) plus the job's database lease (worker/leases.py): a redelivered
or duplicate message for a job that is finished or leased elsewhere returns at once. The soft time limit
is enforced twice: by Celery (SoftTimeLimitExceeded, prefork pool) and by the task itself (the solo pool
that GPU workers use has no time limits); either way the job keeps its last epoch checkpoint, goes back
to `queued` and is retried, and the retry resumes from that checkpoint. The hard limit is Celery's on
the prefork pool and the lease heartbeat's elsewhere (`leases.Heartbeat`): the job is marked failed and
the stuck worker process is killed, to be restarted by its supervisor.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from typing import Any

from celery import Task
from celery.exceptions import Reject, Retry, SoftTimeLimitExceeded
from celery.signals import worker_ready, worker_shutdown, worker_shutting_down
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from app.config import Settings
from app.db import Database
from app.log import bind_request_id
from worker import leases, liveness
from worker import metrics as worker_metrics
from worker.celery_app import celery_app

logger = logging.getLogger(__name__)

RUN_JOB = "rxverify.training.run_job"
HARD_LIMIT_GRACE_S = 30.0
MAX_TIME_LIMIT_RETRIES = 100  # each retry must have advanced by an epoch (checked), so this only caps
MAX_DATABASE_ERRORS = 5  # attempts of one job that a database error (unreachable, locked) may end and requeue
CLAIM_RETRY_MAX_S = 60.0


class JobTask(Task):  # type: ignore[misc]
    """Base of job tasks: claims the lease, and owns every status transition (running -> final or queued)."""

    abstract = True
    # Celery reads `retry(max_retries=None)` as "the task's default": None here makes that "no limit". Each
    # path that retries bounds itself (soft time limit: MAX_TIME_LIMIT_RETRIES; database errors in an
    # attempt: MAX_DATABASE_ERRORS); a claim the database refuses ran nothing and is retried until it answers.
    max_retries = None
    acks_late = True
    reject_on_worker_lost = True
    _database: Database | None = None
    _database_pid: int | None = None
    _database_lock = threading.Lock()

    @classmethod
    def process_database(cls, settings: Settings) -> Database:
        """The worker process's one Database, made lazily and made again in a forked child (which must not
        use its parent's pooled connections). The job threads and the reaper share it, so that on SQLite
        their writes queue on one write mutex (app.db) instead of meeting as SQLITE_BUSY."""
        with cls._database_lock:
            if JobTask._database is None or JobTask._database_pid != os.getpid():
                JobTask._database, JobTask._database_pid = Database(settings), os.getpid()
            return JobTask._database

    @property
    def settings(self) -> Settings:
        """The Settings the Celery app was built from."""
        settings: Settings = self.app.conf.rxverify_settings
        return settings

    @property
    def database(self) -> Database:
        """The worker process's Database (`process_database`)."""
        return JobTask.process_database(self.settings)

    def run_job(self, job_id: int) -> dict[str, Any]:
        """Claim the job, run one attempt under a heartbeat, and record how it ended."""
        try:
            claim = leases.claim(self.database, job_id=job_id, ttl_s=self.settings.training_lease_s,
                                 task_id=self.request.id)
        except SQLAlchemyError as error:
            # Nothing ran. Acknowledged as done, this message would be gone while the job stays queued under
            # its task id, which the reaper takes for sent: so the message comes back, for as long as it takes.
            retries = int(self.request.retries or 0)
            logger.warning("training job %s: the database refused the claim (%s); trying again", job_id,
                           type(error).__name__)
            return self._retry(job_id, countdown=min(CLAIM_RETRY_MAX_S, 2.0 ** retries), max_retries=None)
        if claim.lease is None:
            logger.info("training job %s not run by this delivery: %s", job_id, claim.reason)
            return {"job_id": job_id, "skipped": claim.reason}
        lease = claim.lease
        logger.info("training job %s claimed by %s (attempt %d)", job_id, lease.owner, claim.attempt)
        start_epoch, _ = leases.checkpoint_epoch(self.database, job_id)
        started = time.monotonic()
        deadline = started + self.settings.task_soft_time_limit_s
        # The heartbeat's hard limit fires a little after Celery's own (prefork), so it only acts where
        # the pool enforces none (solo, threads).
        hard_limit_s = self.settings.task_time_limit_s + HARD_LIMIT_GRACE_S
        with leases.Heartbeat(self.database, lease, hard_deadline=started + hard_limit_s,
                              hard_limit_s=hard_limit_s) as heartbeat:
            try:
                return self._attempt(job_id, lease=lease, heartbeat=heartbeat, started=started, deadline=deadline)
            except leases.LeaseLost:
                logger.warning("training job %s: lease lost; another attempt owns it now", job_id)
                return {"job_id": job_id, "skipped": "lease lost"}
            except SoftTimeLimitExceeded:
                # Celery's own soft limit (prefork pool) interrupts wherever training was: judge progress
                # by the epoch checkpoints the database recorded during this attempt, and keep its progress.
                now_epoch, progress = leases.checkpoint_epoch(self.database, job_id)
                return self._time_limited(job_id, lease=lease, progress=progress, progressed=now_epoch > start_epoch)
            except Retry:
                raise
            except OperationalError as error:
                return self._database_error(job_id, lease=lease, error=error)
            except Exception as error:
                logger.exception("training job %s failed", job_id)
                self._fail(lease, error)
                return {"job_id": job_id, "status": "failed", "error": str(error)}

    def _attempt(self, job_id: int, *, lease: leases.Lease, heartbeat: leases.Heartbeat, started: float,
                 deadline: float) -> dict[str, Any]:
        from worker import registration, training

        spec = training.load_spec(self.database, self.settings, job_id)
        outcome, hooks, data_root, workdir = training.run(database=self.database, settings=self.settings,
                                                          spec=spec, lease=lease, heartbeat=heartbeat,
                                                          deadline=deadline)
        # Training returned: scoring and registration get a hard limit of their own (a scoring pass stuck in
        # a C call would otherwise hold the lease, renewed by the heartbeat, and the worker, for ever).
        heartbeat.rearm("scoring and registration", limit_s=self.settings.task_time_limit_s + HARD_LIMIT_GRACE_S)
        if heartbeat.lost.is_set():
            raise leases.LeaseLost(f"training job {job_id} lost its lease")
        if outcome.stopped:
            if hooks.stop_reason == "cancelled":
                registration.end_cancelled(self.database, lease, hooks=hooks, workdir=workdir,
                                           epochs=outcome.fit.epochs_completed)
                return {"job_id": job_id, "status": "cancelled"}
            if hooks.stop_reason == "worker-shutdown":
                return self._handed_back(job_id, lease=lease, progress=hooks.progress)
            progressed = (hooks.progress.get("checkpoint_epoch") or 0) > hooks.start_epoch
            return self._time_limited(job_id, lease=lease, progress=hooks.progress, progressed=progressed)
        result = registration.register_and_finish(database=self.database, settings=self.settings, spec=spec,
                                                  lease=lease, hooks=hooks, outcome=outcome, data_root=data_root,
                                                  workdir=workdir, started=started)
        if result.get("cancelled"):
            return {"job_id": job_id, "status": "cancelled"}
        return {"job_id": job_id, "status": "succeeded", "model_version_id": result["model_version_id"]}

    def _time_limited(self, job_id: int, *, lease: leases.Lease, progress: dict[str, Any],
                      progressed: bool) -> dict[str, Any]:
        """Back to queued with the last epoch checkpoint kept, then retried (it resumes from the checkpoint)."""
        retries = int(self.request.retries or 0)
        if not progressed:
            # Another attempt would stop at the same place: fail now instead of looping.
            self._fail(lease, RuntimeError("the soft time limit was reached before one epoch finished; raise "
                                           "RXVERIFY_TASK_SOFT_TIME_LIMIT_S or shorten the epochs"))
            return {"job_id": job_id, "status": "failed"}
        if retries >= MAX_TIME_LIMIT_RETRIES:
            self._fail(lease, RuntimeError(f"the soft time limit was reached {retries + 1} times"))
            return {"job_id": job_id, "status": "failed"}
        leases.release(self.database, lease, progress={**progress, "phase": "requeued", "requeued_because":
                                                       "soft time limit"})
        logger.warning("training job %s reached the soft time limit; retrying from its checkpoint", job_id)
        return self._retry(job_id, countdown=1, max_retries=MAX_TIME_LIMIT_RETRIES)

    def _handed_back(self, job_id: int, *, lease: leases.Lease, progress: dict[str, Any]) -> dict[str, Any]:
        """The worker is shutting down: the job goes back to queued (its last epoch checkpoint kept) and its
        message to the broker, for the next worker. Not a failure and not a lost worker: nothing is counted
        against the job, however often its workers are stopped."""
        leases.release(self.database, lease, progress={**progress, "phase": "requeued",
                                                       "requeued_because": "worker shutdown"})
        logger.warning("training job %s: this worker is shutting down; the job is requeued and resumes from its "
                       "last epoch checkpoint (epoch %s) on the next worker", job_id,
                       progress.get("checkpoint_epoch") or 0)
        return self._retry(job_id, countdown=1, max_retries=None)

    def _database_error(self, job_id: int, *, lease: leases.Lease, error: OperationalError) -> dict[str, Any]:
        """The database went away or stayed locked mid-attempt: requeue from the epoch checkpoint, which is kept.

        Failing the job would throw its training away over a blip. After MAX_DATABASE_ERRORS such attempts the
        error is taken as lasting (a schema the code does not match, a full disk), and the job fails. While the
        database stays unreachable nothing can be recorded: the lease then expires and the reaper requeues it.
        """
        logger.warning("training job %s: database error (%s); requeueing it from its checkpoint", job_id,
                       type(error).__name__)
        try:
            _, progress = leases.checkpoint_epoch(self.database, job_id)
            errors = int(progress.get("database_errors") or 0) + 1
            if errors > MAX_DATABASE_ERRORS:
                self._fail(lease, error)
                return {"job_id": job_id, "status": "failed", "error": str(error)}
            leases.release(self.database, lease, progress={
                **progress, "phase": "requeued", "database_errors": errors,
                "requeued_because": f"database error ({type(error).__name__})"})
        except leases.LeaseLost:
            return {"job_id": job_id, "skipped": "lease lost"}
        except SQLAlchemyError:
            logger.warning("training job %s: the database is still unreachable; the job keeps its checkpoint, "
                           "and the reaper requeues it when its lease expires", job_id)
            return {"job_id": job_id, "status": "error", "error": "database unreachable; left to the reaper"}
        # Bounded by `database_errors`, not by Celery's count, which the soft time limit's retries share.
        return self._retry(job_id, countdown=min(CLAIM_RETRY_MAX_S, 5.0 * 2 ** errors), max_retries=None)

    def _retry(self, job_id: int, *, countdown: float, max_retries: int | None) -> dict[str, Any]:
        """Send this job's message again (same task id) after `countdown`; the job must be queued by now."""
        try:
            raise self.retry(countdown=countdown, max_retries=max_retries)
        except Reject:
            # The broker refused the retry's message (Celery turns that into a Reject). The job is queued
            # under this delivery's task id, which the reaper would take for sent: forget it, so that the
            # reaper's next pass sends the job again.
            logger.warning("training job %s: the broker refused its retry; the reaper will send it again", job_id)
            try:
                leases.forget_task_id(self.database, job_id, self.request.id)
            except Exception:  # not _fail: the lease is released, and the job is fine, only unsent
                logger.exception("training job %s stays queued under task id %s, which never reached the broker, "
                                 "and the database refused to record that; the reaper will not resend it: "
                                 "cancel it and submit it again", job_id, self.request.id)
                return {"job_id": job_id, "status": "queued", "resend": "by hand"}
            return {"job_id": job_id, "status": "queued", "resend": "by the reaper"}

    def _fail(self, lease: leases.Lease, error: BaseException) -> None:
        from worker.registration import discard_work_files
        from worker.training import Workdir

        message = f"{type(error).__name__}: {error}"
        try:
            with self.database.session() as session:
                leases.finish(session, lease, status="failed", error=message,
                              result={"traceback": traceback.format_exception(error)[-3:]})
        except leases.LeaseLost:
            logger.warning("training job %s failed after its lease was lost; not recorded", lease.job_id)
            return  # another attempt owns the job and its files
        # A failed job is never resumed (the same request makes a new job), so its files are dead weight.
        discard_work_files(Workdir.of(self.settings, lease.job_id))


def run_training_job(self: JobTask, job_id: int) -> dict[str, Any]:
    """Run training job `job_id` (the message carries the id only; everything else is read from the DB).

    Each delivery is counted in the worker's metrics by how it ended (`worker.metrics`).
    """
    started, outcome = time.monotonic(), "error"
    worker_metrics.JOBS_IN_PROGRESS.inc()
    try:
        with bind_request_id(f"job-{job_id}"):
            result = self.run_job(job_id)
        outcome = worker_metrics.outcome_of(result)
        return result
    except Retry:
        outcome = "requeued"
        raise
    finally:
        worker_metrics.JOBS_IN_PROGRESS.dec()
        worker_metrics.clear_progress(job_id)
        worker_metrics.record_attempt(outcome, time.monotonic() - started)


run_job = celery_app.task(bind=True, base=JobTask, name=RUN_JOB)(run_training_job)


_reaper: leases.Reaper | None = None
_alive_file: liveness.AliveFile | None = None


@worker_ready.connect
def _start_reaper(sender: Any = None, **_kwargs: Any) -> None:
    """Every worker requeues jobs whose worker died (expired lease) and jobs whose message never left."""
    global _reaper
    app = getattr(sender, "app", None) or celery_app
    settings: Settings = app.conf.rxverify_settings

    def send(job_id: int, task_id: str | None) -> None:
        app.send_task(RUN_JOB, args=[job_id], task_id=task_id)

    database = JobTask.process_database(settings)

    def sweep() -> None:
        from worker.registration import sweep_ended_work_files

        sweep_ended_work_files(database, settings)

    _reaper = leases.Reaper(database, send=send, interval_s=max(settings.training_lease_s, 1.0), sweep=sweep,
                            max_worker_losses=settings.training_max_worker_losses)
    _reaper.start()


@worker_ready.connect
def _start_metrics(sender: Any = None, **_kwargs: Any) -> None:
    """With RXVERIFY_WORKER_METRICS_PORT, serve this process's Prometheus metrics (`worker.metrics`)."""
    app = getattr(sender, "app", None) or celery_app
    settings: Settings = app.conf.rxverify_settings
    if settings.worker_metrics_port is not None:
        worker_metrics.serve(settings.worker_metrics_port, settings.worker_metrics_host)


@worker_ready.connect
def _start_alive_file(sender: Any = None, **_kwargs: Any) -> None:
    """With RXVERIFY_WORKER_ALIVE_FILE, keep that file fresh for the container's health check."""
    global _alive_file
    app = getattr(sender, "app", None) or celery_app
    path = app.conf.rxverify_settings.worker_alive_file
    if path is not None and _alive_file is None:
        alive = liveness.AliveFile(path)
        try:
            alive.start()
        except OSError:  # the worker still works; its health check will say why it looks dead
            logger.exception("cannot write the worker's liveness file %s (RXVERIFY_WORKER_ALIVE_FILE); the "
                             "health check will report this worker as not alive", path)
            return
        _alive_file = alive


@worker_shutting_down.connect
def _hand_back_running_jobs(**_kwargs: Any) -> None:
    """Warm or cold, a shutdown stops every job of this process at its next step (worker.training.
    WORKER_SHUTTING_DOWN), which hands it back: before, a job trained on until the supervisor's (or the
    container's) grace period ran out and killed the worker, and each such kill counted as a lost worker,
    so three stops of `make run` during one job failed it as if it ran out of memory. Runs in the signal
    handler: it only sets an event."""
    from worker.training import WORKER_SHUTTING_DOWN

    WORKER_SHUTTING_DOWN.set()


@worker_shutdown.connect
def _stop_background_threads(**_kwargs: Any) -> None:
    """Stop the reaper, and remove the liveness file (a stopped worker is not alive)."""
    global _alive_file
    if _reaper is not None:
        _reaper.stop()
    if _alive_file is not None:
        _alive_file.stop()
        _alive_file = None
