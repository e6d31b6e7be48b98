"""Prometheus metrics of a worker process, served over HTTP when RXVERIFY_WORKER_METRICS_PORT is set.

The API's `/metrics` sees only the API process. These say what the training side is doing: how job
attempts end and how long they take, the running job's progress, loss and attack success rate, and what
the reaper had to requeue. They are process-local, so they describe the jobs of the process that serves
them: the solo pool (the default, and the one GPU workers use) and the threads pool run jobs in that
process; under the prefork pool the jobs run in children, whose figures this process never sees.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Mapping
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, start_http_server

logger = logging.getLogger(__name__)

JOB_ATTEMPTS = Counter(
    "rxverify_training_job_attempts_total",
    "Training-job deliveries this worker handled, by how they ended: succeeded, failed, cancelled, requeued "
    "(soft time limit: resumes from its checkpoint), skipped (finished, or leased by another worker), error.",
    ["outcome"])
JOB_ATTEMPT_SECONDS = Histogram(
    "rxverify_training_job_attempt_seconds", "Wall time of a training-job delivery, by how it ended.", ["outcome"],
    buckets=(1, 10, 60, 300, 900, 1800, 3600, 2 * 3600, 4 * 3600, 8 * 3600, 24 * 3600))
JOBS_IN_PROGRESS = Gauge("rxverify_training_jobs_in_progress", "Training-job deliveries running in this process.")
TRAINING_STEPS = Counter("rxverify_training_steps_total", "Optimiser steps taken by this process's training jobs.")
# The running jobs' figures carry a job_id label: a threads pool runs several jobs in one process. A job's
# series exist while its delivery runs and are removed when it ends, so the label stays bounded.
TRAINING_PROGRESS = Gauge("rxverify_training_progress_ratio", "Fraction of the running job's steps done.", ["job_id"])
TRAINING_LOSS = Gauge("rxverify_training_loss", "The running job's last training loss.", ["job_id"])
ATTACK_SUCCESS = Gauge("rxverify_training_attack_success_ratio",
                       "The running job's last CSADA attack success rate (NaN when it has no attack).", ["job_id"])
TRAINING_ETA = Gauge("rxverify_training_eta_seconds", "The running job's estimated time left (NaN while unknown).",
                     ["job_id"])
REAPER_ACTIONS = Counter(
    "rxverify_reaper_actions_total",
    "Jobs this worker's reaper moved on: requeued (their worker died), failed (it died too often at the same "
    "point), cancelled (it died after a cancel was asked for), resent (their message never reached the broker).",
    ["action"])

_RUNNING_GAUGES = (TRAINING_PROGRESS, TRAINING_LOSS, ATTACK_SUCCESS, TRAINING_ETA)
OUTCOMES = ("succeeded", "failed", "cancelled", "requeued", "skipped", "error")
REAPER_ACTION_NAMES = ("requeued", "failed", "cancelled", "resent")


def _initialise() -> None:
    """Every labelled series exists from the start (at 0), so a rate() over it needs no first event."""
    for outcome in OUTCOMES:
        JOB_ATTEMPTS.labels(outcome)
        JOB_ATTEMPT_SECONDS.labels(outcome)
    for action in REAPER_ACTION_NAMES:
        REAPER_ACTIONS.labels(action)


def outcome_of(result: Mapping[str, Any]) -> str:
    """The outcome label of a job task's return value (`worker.tasks.JobTask.run_job`)."""
    if "skipped" in result:
        return "skipped"
    status = result.get("status")
    if status == "queued":
        return "requeued"
    return status if status in OUTCOMES else "error"


def record_attempt(outcome: str, seconds: float) -> None:
    """Count one finished delivery and its wall time."""
    JOB_ATTEMPTS.labels(outcome).inc()
    JOB_ATTEMPT_SECONDS.labels(outcome).observe(seconds)


def record_step(job_id: int, *, fraction: float, loss: float, attack_success_rate: float | None,
                eta_s: float | None) -> None:
    """One optimiser step of running job `job_id`."""
    TRAINING_STEPS.inc()
    job = str(job_id)
    TRAINING_PROGRESS.labels(job).set(fraction)
    TRAINING_LOSS.labels(job).set(loss)
    ATTACK_SUCCESS.labels(job).set(math.nan if attack_success_rate is None else attack_success_rate)
    TRAINING_ETA.labels(job).set(math.nan if eta_s is None else eta_s)


def clear_progress(job_id: int) -> None:
    """Job `job_id`'s delivery ended: drop its series (the other running jobs' stay)."""
    for gauge in _RUNNING_GAUGES:
        with contextlib.suppress(KeyError):  # it ended before its first step
            gauge.remove(str(job_id))


def serve(port: int, host: str) -> bool:
    """Serve this process's metrics on host:port; False (logged) when the port cannot be bound."""
    try:
        start_http_server(port, addr=host)
    except OSError:
        logger.exception("cannot serve the worker's metrics on %s:%d (RXVERIFY_WORKER_METRICS_PORT); the worker "
                         "runs without them", host, port)
        return False
    logger.info("worker metrics on http://%s:%d/metrics", host, port)
    return True


_initialise()
