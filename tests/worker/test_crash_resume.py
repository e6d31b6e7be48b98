"""SIGKILL a worker (`rxverify worker`, solo pool) in the middle of a job; a restarted worker finishes it
from the last epoch checkpoint, with weights identical to an uninterrupted run."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from app.db import Database
from tests.worker.conftest import Fleet, wait_ready
from tests.worker.factories import Workers, wait_for, worker_env

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]
HYPER = {"epochs": 5, "batch_size": 4, "steps": 25}


def _uninterrupted_sha256(fleet: Fleet, job_id: int, out: Path) -> str:
    """The same request trained in one go in this process (CPU, one thread: bit-for-bit reproducible)."""
    from models.commands.train import run_training
    from worker.training import Workdir, load_spec, prepare_data, train_request

    database = Database(fleet.settings)
    try:
        spec = load_spec(database, fleet.settings, job_id)
    finally:
        database.dispose()
    workdir = Workdir(out)
    out.mkdir(parents=True)
    request = train_request(spec, data_root=prepare_data(spec, workdir), workdir=workdir, settings=fleet.settings)
    outcome = run_training(request)
    assert outcome.weights_sha256 is not None
    return outcome.weights_sha256


def test_sigkill_mid_job_then_restart_resumes_from_the_checkpoint(fleet: Fleet, workers: Workers,
                                                                   tmp_path: Path) -> None:
    job_id = fleet.start_job(method="csada", hyperparameters=HYPER)
    env = worker_env(fleet.settings)
    first = workers.start(env, tmp_path / "worker-1.log")
    # Kill right after the second epoch's checkpoint is recorded: the third epoch is under way.
    wait_for(lambda: (fleet.row(job_id)["progress"] or {}).get("checkpoint_epoch", 0) >= 2, timeout=120,
             interval=0.05, what="two epoch checkpoints")
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    killed = fleet.job(job_id)
    assert killed["status"] == "running" and killed["attempts"] == 1
    assert killed["progress"]["checkpoint_epoch"] in (2, 3)  # (3: the kill landed just after another epoch)

    second_log = tmp_path / "worker-2.log"
    workers.start(env, second_log)
    wait_ready(second_log)
    job = fleet.wait_status(job_id, "succeeded", timeout=150)
    # The new worker's reaper found the expired lease, requeued the job, and the next attempt resumed.
    assert job["attempts"] == 2
    assert job["progress"]["resumed_from_epoch"] == killed["progress"]["checkpoint_epoch"]
    assert job["result"]["epochs_completed"] == HYPER["epochs"]
    assert "lost its worker (lease expired); requeued" in second_log.read_text()
    assert job["result"]["weights_sha256"] == _uninterrupted_sha256(fleet, job_id, tmp_path / "reference")


def test_sigterm_mid_job_hands_it_back_and_the_next_worker_finishes_it(fleet: Fleet, workers: Workers,
                                                                       tmp_path: Path) -> None:
    """What Ctrl-C of `make run` or `docker stop` does to a worker: a warm shutdown. The attempt stops at its
    next step and requeues the job at once (before, it trained on until it was killed, and each kill
    counted as a lost worker); the worker exits; the next worker resumes from the checkpoint."""
    workers.stop_all()  # the module's earlier workers would take the job too (the fixture is per module)
    epochs = 40
    job_id = fleet.start_job(method="baseline", hyperparameters={"epochs": epochs, "batch_size": 4})
    env = worker_env(fleet.settings)
    first = workers.start(env, tmp_path / "worker-1.log")
    wait_for(lambda: (fleet.row(job_id)["progress"] or {}).get("checkpoint_epoch", 0) >= 1, timeout=120,
             interval=0.05, what="an epoch checkpoint")
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=30) == 0
    handed_back = fleet.row(job_id)  # the row: the API's progress shows only the documented fields
    assert handed_back["status"] == "queued", handed_back
    assert handed_back["progress"]["requeued_because"] == "worker shutdown"
    assert 1 <= handed_back["progress"]["checkpoint_epoch"] < epochs
    assert "is shutting down; the job is requeued" in (tmp_path / "worker-1.log").read_text()

    second_log = tmp_path / "worker-2.log"
    workers.start(env, second_log)
    wait_ready(second_log)
    job = fleet.wait_status(job_id, "succeeded", timeout=150)
    assert job["attempts"] == 2 and not job["progress"].get("worker_losses")
    assert job["progress"]["resumed_from_epoch"] == handed_back["progress"]["checkpoint_epoch"]
    assert job["result"]["epochs_completed"] == epochs
