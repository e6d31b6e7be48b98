"""Job internals in one process: the soft time limit requeues and resumes (Celery's own retry, applied
eagerly here because the path under test is the task's, not the broker's); feedback images join the
train split up to the request's cut-off."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import update
from sqlalchemy.exc import OperationalError

from app.config import Settings
from app.db import Database
from app.orm import ModelPromotion, ModelVersion, Resolution, TrainingJob, Verification, utcnow
from app.services.audit import Actor
from app.services.training_jobs import JobRequest, create_job, request_cancel
from tests.app.factories import count_rows
from tests.worker.factories import CLASSES, job_row, seeded_sqlite_settings, tiny_assets
from worker import leases, registration, training
from worker.celery_app import create_celery_app
from worker.tasks import RUN_JOB, JobTask, run_training_job
from worker.training import Workdir, load_spec, prepare_data


@pytest.fixture
def assets_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's tiny assets folder."""
    root = tmp_path_factory.getbasetemp()
    tiny_assets(root / "tiny-assets")
    return root


def _job(settings: Settings, request: JobRequest) -> int:
    database = Database(settings)
    try:
        with database.session() as session:
            job, created = create_job(session, request=request, actor=Actor.cli("tests"), auto_promote_default=False)
            assert created
            return job.id
    finally:
        database.dispose()


@pytest.fixture
def task_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Restore the task's process-wide database after the test."""
    yield
    if JobTask._database is not None:
        JobTask._database.dispose()
    JobTask._database = None


@pytest.mark.slow
def test_the_soft_time_limit_keeps_the_checkpoint_requeues_and_resumes(
        tmp_path: Path, assets_root: Path, task_settings: None) -> None:
    settings, _seeded = seeded_sqlite_settings(
        assets_root, tiny_assets(assets_root / "tiny-assets"), tmp_path / "data", task_soft_time_limit_s=2,
        task_time_limit_s=3, broker_visibility_timeout_s=4, torch_threads=1, training_lease_s=30)
    job_id = _job(settings, JobRequest(method="baseline", dataset="tiny", hyperparameters={"epochs": 120, "batch_size": 4}))
    app = create_celery_app(settings.model_copy(update={"result_backend": "cache+memory://"}))
    task = app.task(bind=True, base=JobTask, name=RUN_JOB)(run_training_job)
    JobTask._database = None
    result = task.apply(args=[job_id]).get()  # each retry runs at once, in this process
    row = job_row(settings, job_id)
    assert result["status"] == "succeeded" and row["status"] == "succeeded", row
    # 30 epochs fitted inside one 2 s attempt on a quiet machine (a flaky test); 120 leave the soft limit room.
    assert row["attempts"] >= 2, "120 epochs of 9 steps do not fit in one 2 s attempt"
    assert row["progress"]["resumed_from_epoch"] > 0 and row["result"]["epochs_completed"] == 120


def test_feedback_images_join_the_train_split_up_to_the_cutoff(tmp_path: Path, assets_root: Path) -> None:
    settings, _seeded = seeded_sqlite_settings(assets_root, tiny_assets(assets_root / "tiny-assets"),
                                               tmp_path / "data")
    photo = next((assets_root / "tiny-assets" / "tiny-dataset" / "test" / CLASSES[2]).glob("*.jpg"))
    database = Database(settings)
    ids = []
    try:
        with database.session() as session:
            for actual in (CLASSES[2], CLASSES[3], None):  # the last one: not a catalog product
                verification = Verification(id=str(uuid.uuid4()), prescribed_ndc_input=CLASSES[0],
                                            prescribed_ndc=CLASSES[0], verdict="review", reason="prescribed-not-top",
                                            image_sha256="0" * 64, image_path=str(photo), image_format="JPEG")
                session.add(verification)
                session.flush()
                session.add(Resolution(verification_id=verification.id, actual_ndc=actual, resolved_by="tests"))
                ids.append(verification.id)
    finally:
        database.dispose()
    job_id = _job(settings, JobRequest(method="csada", dataset="tiny", include_feedback=True,
                                       hyperparameters={"epochs": 1}))
    assert job_row(settings, job_id)["feedback_through_id"] == 3
    database = Database(settings)
    try:
        with database.session() as session:  # resolved after the request: not used by this job
            session.add(Resolution(verification_id=ids[0], actual_ndc=CLASSES[1], resolved_by="later"))
        spec = load_spec(database, settings, job_id)
    finally:
        database.dispose()
    assert [(f.ndc, f.verification_id) for f in spec.feedback] == [(CLASSES[2], ids[0]), (CLASSES[3], ids[1])]
    root = prepare_data(spec, Workdir(tmp_path / "job"))
    added = sorted(p.relative_to(root).as_posix() for p in root.rglob("feedback-*"))
    assert added == [f"train/{CLASSES[2]}/feedback-{ids[0]}.jpg", f"train/{CLASSES[3]}/feedback-{ids[1]}.jpg"]
    assert len(list((root / "train").rglob("*.jpg"))) == 36 + 2
    assert len(list((root / "valid").rglob("*.jpg"))) == 12  # valid and test are the registered dataset's


def test_a_stuck_attempt_hits_the_heartbeats_hard_limit(tmp_path: Path, assets_root: Path, task_settings: None,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The solo pool enforces no time limit: a training stuck past task_time_limit_s (here: one that ignores
    its soft limit) is marked failed by its heartbeat, which then kills the worker process (faked here)."""
    import threading
    import time

    from worker import leases, tasks, training

    settings, _seeded = seeded_sqlite_settings(
        assets_root, tiny_assets(assets_root / "tiny-assets"), tmp_path / "data", task_soft_time_limit_s=1,
        task_time_limit_s=2, broker_visibility_timeout_s=3, training_lease_s=30)
    job_id = _job(settings, JobRequest(method="baseline", dataset="tiny", hyperparameters={"epochs": 1}))
    killed = threading.Event()
    monkeypatch.setattr(leases, "kill_this_process", killed.set)
    monkeypatch.setattr(tasks, "HARD_LIMIT_GRACE_S", 0.0)

    def stuck(*, heartbeat: leases.Heartbeat, **_: object) -> None:
        assert heartbeat.lost.wait(20), "the hard limit never fired"
        raise leases.LeaseLost("killed")  # what the process would never get to do

    monkeypatch.setattr(training, "run", stuck)
    app = create_celery_app(settings.model_copy(update={"result_backend": "cache+memory://"}))
    task = app.task(bind=True, base=JobTask, name=RUN_JOB)(run_training_job)
    JobTask._database = None
    started = time.monotonic()
    result = task.apply(args=[job_id]).get()
    assert killed.is_set() and 1.9 <= time.monotonic() - started < 15
    assert result == {"job_id": job_id, "skipped": "lease lost"}
    row = job_row(settings, job_id)
    assert row["status"] == "failed" and "hard time limit" in row["error"] and row["lease_owner"] is None
    # A redelivery of the same message (the broker's, after the kill) finds the job finished.
    assert task.apply(args=[job_id]).get()["skipped"]


def test_the_hard_limit_survives_a_lost_lease_and_spares_a_rearmed_or_finished_attempt(
        tmp_path: Path, assets_root: Path) -> None:
    import threading
    import time

    from worker import leases

    settings, _seeded = seeded_sqlite_settings(assets_root, tiny_assets(assets_root / "tiny-assets"), tmp_path / "data")
    database = Database(settings)

    def attempt(index: int) -> tuple[leases.Heartbeat, threading.Event]:
        job_id = _job(settings, JobRequest(method="baseline", dataset="tiny", seed=index,
                                           hyperparameters={"epochs": 1}))
        lease = leases.claim(database, job_id=job_id, ttl_s=0.6, task_id=f"t{index}").lease
        assert lease is not None
        killed = threading.Event()
        return leases.Heartbeat(database, lease, hard_deadline=time.monotonic() + 1.0, hard_limit_s=1.0,
                                on_hard_limit=killed.set), killed

    try:
        # Another worker took the lease over: nothing is recorded, but the stuck attempt is still killed.
        beat, killed = attempt(1)
        with beat:
            with database.session() as session:
                leases.update_owned(session, beat.lease, lease_owner="someone-else")
            assert beat.lost.wait(5) and killed.wait(5)
        row = job_row(settings, beat.lease.job_id)
        assert row["status"] == "running" and row["lease_owner"] == "someone-else" and row["error"] is None
        # Training returned (the next phase has a limit of its own) or the attempt ended: no kill, and the
        # job is not marked failed.
        beat, killed = attempt(2)
        with beat:
            beat.rearm("scoring and registration", limit_s=60.0)
            assert not killed.wait(1.5) and not beat.lost.is_set()
        assert job_row(settings, beat.lease.job_id)["status"] == "running"
        beat, killed = attempt(3)
        with beat:
            pass
        assert not killed.wait(1.5)
    finally:
        database.dispose()


def test_a_heartbeat_that_cannot_renew_for_a_whole_ttl_fences_its_attempt_off(
        tmp_path: Path, assets_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A database outage longer than the lease: the reaper elsewhere may have requeued the job by then and
    another worker taken it, so this attempt must stop writing its files (it sets `lost` itself)."""
    import time

    settings, _seeded = seeded_sqlite_settings(assets_root, tiny_assets(assets_root / "tiny-assets"), tmp_path / "data")
    database = Database(settings)
    try:
        job_id = _job(settings, JobRequest(method="baseline", dataset="tiny", hyperparameters={"epochs": 1}))
        lease = leases.claim(database, job_id=job_id, ttl_s=1.5, task_id="t1").lease
        assert lease is not None
        renew, calls = leases.renew, []

        def unreachable(*args: Any) -> bool:
            calls.append(time.monotonic())
            if len(calls) > 1:  # the first renewal goes through, then the database is gone
                raise _locked()
            return renew(*args)

        monkeypatch.setattr(leases, "renew", unreachable)
        with leases.Heartbeat(database, lease) as beat:
            assert beat.lost.wait(10), "an attempt out of touch for a whole TTL kept going"
            fenced = time.monotonic()
        # Not before a TTL from the start of the last renewal that went through, and not much later.
        assert len(calls) >= 3 and 1.5 <= fenced - calls[0] < 1.5 + 2 * 0.5 + 1.0
    finally:
        database.dispose()


def test_scoring_and_registration_have_a_hard_limit_of_their_own(
        tmp_path: Path, assets_root: Path, task_settings: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Training returned, then the scoring hangs (a C call that never comes back): the heartbeat, rearmed for
    that phase, marks the job failed and kills the process (faked here) instead of renewing the lease for ever."""
    import threading

    from worker import tasks

    settings, task, job_id = _task_and_job(tmp_path, assets_root, hyperparameters={"epochs": 1, "batch_size": 8})
    killed = threading.Event()
    monkeypatch.setattr(leases, "kill_this_process", killed.set)
    rearm, phases = leases.Heartbeat.rearm, []

    def short(self: leases.Heartbeat, phase: str, *, limit_s: float) -> None:
        phases.append((phase, limit_s))
        rearm(self, phase, limit_s=1.0)

    monkeypatch.setattr(leases.Heartbeat, "rearm", short)

    def hangs(*args: Any, **kwargs: Any) -> Any:
        assert killed.wait(20), "the post-training hard limit never fired"
        raise leases.LeaseLost("killed")  # what the process would never get to do

    monkeypatch.setattr(registration, "finalise_checkpoint", hangs)
    assert task.apply(args=[job_id]).get() == {"job_id": job_id, "skipped": "lease lost"}
    assert phases == [("scoring and registration", settings.task_time_limit_s + tasks.HARD_LIMIT_GRACE_S)]
    row = job_row(settings, job_id)
    assert row["status"] == "failed" and row["lease_owner"] is None
    assert "scoring and registration after training was still running after 1 s" in row["error"]


def _task_and_job(tmp_path: Path, assets_root: Path, **request: Any) -> tuple[Settings, Any, int]:
    settings, _seeded = seeded_sqlite_settings(assets_root, tiny_assets(assets_root / "tiny-assets"),
                                               tmp_path / "data", torch_threads=1, task_soft_time_limit_s=600,
                                               task_time_limit_s=660)
    job_id = _job(settings, JobRequest(method="baseline", dataset="tiny", **request))
    app = create_celery_app(settings.model_copy(update={"result_backend": "cache+memory://"}))
    return settings, app.task(bind=True, base=JobTask, name=RUN_JOB)(run_training_job), job_id


def test_a_cancel_while_the_model_is_evaluated_registers_and_promotes_nothing(
        tmp_path: Path, assets_root: Path, task_settings: None, monkeypatch: pytest.MonkeyPatch) -> None:
    settings, task, job_id = _task_and_job(tmp_path, assets_root, auto_promote=True,
                                           hyperparameters={"epochs": 1, "batch_size": 8})
    finalise = registration.finalise_checkpoint

    def cancel_then_finalise(*args: Any, **kwargs: Any) -> Any:  # the pharmacist presses cancel meanwhile
        database = Database(settings)
        try:
            with database.session() as session:
                assert request_cancel(session, job_id=job_id, actor=Actor.cli("tests")).cancel_requested
        finally:
            database.dispose()
        return finalise(*args, **kwargs)

    monkeypatch.setattr(registration, "finalise_checkpoint", cancel_then_finalise)
    evaluated: list[Path] = []
    evaluate = registration.evaluation.evaluate_checkpoint

    def counted(checkpoint: Path, **kwargs: Any) -> Any:
        evaluated.append(checkpoint)
        return evaluate(checkpoint, **kwargs)

    monkeypatch.setattr(registration.evaluation, "evaluate_checkpoint", counted)
    assert task.apply(args=[job_id]).get() == {"job_id": job_id, "status": "cancelled"}
    row = job_row(settings, job_id)
    assert row["status"] == "cancelled" and row["result_model_version_id"] is None
    # Seen between the stages: the candidate was scored, the parent no longer.
    assert len(evaluated) == 1 and row["progress"]["phase"] == "cancelled"
    assert count_rows(settings, ModelVersion) == 2 and count_rows(settings, ModelPromotion) == 1  # the seeded ones
    # A job that ended is never resumed: only its cost matrix stays on disk.
    assert sorted(p.name for p in Workdir.of(settings, job_id).root.iterdir()) == ["costs.csv"]


def test_a_database_blip_on_a_progress_write_does_not_fail_training(
        tmp_path: Path, assets_root: Path, task_settings: None, monkeypatch: pytest.MonkeyPatch) -> None:
    settings, task, job_id = _task_and_job(tmp_path, assets_root, hyperparameters={"epochs": 3, "batch_size": 8})
    write, calls = leases.write, []

    def busy_once(database: Database, lease: leases.Lease, **values: Any) -> None:
        calls.append(sorted(values))
        if len(calls) == 3:
            raise OperationalError("UPDATE training_jobs", {}, Exception("database is locked"))
        write(database, lease, **values)

    monkeypatch.setattr(leases, "write", busy_once)
    assert task.apply(args=[job_id]).get()["status"] == "succeeded"
    assert len(calls) > 3 and job_row(settings, job_id)["status"] == "succeeded"


def _locked() -> OperationalError:
    return OperationalError("UPDATE training_jobs", {}, Exception("database is locked"))


def test_a_claim_the_database_refuses_is_retried_not_dropped(
        tmp_path: Path, assets_root: Path, task_settings: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Acknowledged after a failed claim, the message would be gone and the job queued for ever (its task id
    reads as sent to the reaper); the delivery is retried instead, until the database answers."""
    settings, task, job_id = _task_and_job(tmp_path, assets_root, hyperparameters={"epochs": 1, "batch_size": 8})
    claim, calls = leases.claim, []

    def locked_twice(*args: Any, **kwargs: Any) -> leases.Claim:
        calls.append(1)
        if len(calls) <= 2:
            raise _locked()
        return claim(*args, **kwargs)

    monkeypatch.setattr(leases, "claim", locked_twice)
    assert task.apply(args=[job_id]).get()["status"] == "succeeded"
    row = job_row(settings, job_id)
    assert len(calls) == 3 and row["status"] == "succeeded" and row["attempts"] == 1


def test_a_database_error_mid_job_requeues_it_with_its_checkpoint(
        tmp_path: Path, assets_root: Path, task_settings: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A blip while the trained model is registered does not fail the job or discard its training: the retry
    resumes from the last epoch checkpoint and registers."""
    settings, task, job_id = _task_and_job(tmp_path, assets_root, hyperparameters={"epochs": 2, "batch_size": 8})
    register, calls = registration.register_and_finish, []

    def locked_once(**kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            assert Workdir.of(settings, job_id).state.is_file()
            raise _locked()
        return register(**kwargs)

    monkeypatch.setattr(registration, "register_and_finish", locked_once)
    assert task.apply(args=[job_id]).get()["status"] == "succeeded"
    row = job_row(settings, job_id)
    assert len(calls) == 2 and row["status"] == "succeeded" and row["attempts"] == 2, row
    assert row["progress"]["resumed_from_epoch"] == 2 and row["progress"]["database_errors"] == 1
    assert row["result"]["epochs_completed"] == 2


def test_a_lasting_database_error_fails_the_job_after_a_few_attempts(
        tmp_path: Path, assets_root: Path, task_settings: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.tasks import MAX_DATABASE_ERRORS

    settings, task, job_id = _task_and_job(tmp_path, assets_root, hyperparameters={"epochs": 1, "batch_size": 8})
    calls: list[int] = []

    def always_locked(*_args: Any, **_kwargs: Any) -> Any:
        calls.append(1)
        raise _locked()

    monkeypatch.setattr(training, "load_spec", always_locked)
    assert task.apply(args=[job_id]).get()["status"] == "failed"
    row = job_row(settings, job_id)
    assert len(calls) == MAX_DATABASE_ERRORS + 1 and row["status"] == "failed"
    assert row["error"].startswith("OperationalError") and row["progress"]["database_errors"] == MAX_DATABASE_ERRORS


def test_celerys_soft_limit_before_any_epoch_fails_once_and_keeps_the_progress(
        tmp_path: Path, assets_root: Path, task_settings: None, monkeypatch: pytest.MonkeyPatch) -> None:
    settings, task, job_id = _task_and_job(tmp_path, assets_root, hyperparameters={"epochs": 1, "batch_size": 8})
    attempts: list[int] = []

    def interrupted(**_kwargs: Any) -> Any:  # what the prefork pool raises when an epoch outlasts the limit
        attempts.append(1)
        raise SoftTimeLimitExceeded()

    monkeypatch.setattr(training, "run", interrupted)
    assert task.apply(args=[job_id]).get()["status"] == "failed"
    row = job_row(settings, job_id)
    assert len(attempts) == 1 and row["status"] == "failed" and "before one epoch finished" in row["error"]
    assert row["progress"].get("phase") == "queued"  # what it was, not wiped


def test_a_failed_resend_is_sent_again_by_the_next_reaper_pass(tmp_path: Path, assets_root: Path) -> None:
    settings, _task, job_id = _task_and_job(tmp_path, assets_root, hyperparameters={"epochs": 1, "batch_size": 8})
    database = Database(settings)
    try:
        with database.session() as session:  # its worker died: the lease expired long ago
            session.execute(update(TrainingJob).where(TrainingJob.id == job_id).values(
                status="running", lease_owner="gone/1/x", lease_expires_at=utcnow() - timedelta(seconds=5),
                celery_task_id="first-message"))

        def broker_down(_job: int, _task_id: str | None) -> None:
            raise ConnectionError("broker unreachable")

        assert leases.requeue_orphans(database, send=broker_down) == []
        assert job_row(settings, job_id)["celery_task_id"] is None  # so that it counts as never sent
        sent: list[tuple[int, str | None]] = []
        assert leases.requeue_orphans(database, send=lambda j, t: sent.append((j, t)), unsent_grace_s=0) == [job_id]
        assert sent == [(job_id, job_row(settings, job_id)["celery_task_id"])] and sent[0][1]
    finally:
        database.dispose()


def test_a_job_that_keeps_killing_its_worker_fails_instead_of_looping(tmp_path: Path, assets_root: Path) -> None:
    """Three lost workers in a row at the same checkpoint: failed, with the reason; one that moved on between
    losses (a new epoch checkpoint) starts the count again."""
    settings, _task, job_id = _task_and_job(tmp_path, assets_root, hyperparameters={"epochs": 1, "batch_size": 8})
    database = Database(settings)
    sent: list[tuple[int, str | None]] = []

    def worker_dies(checkpoint_epoch: int) -> None:  # claimed, ran, then its worker was killed
        row = job_row(settings, job_id)
        with database.session() as session:
            session.execute(update(TrainingJob).where(TrainingJob.id == job_id).values(
                status="running", lease_owner="gone/1/x", lease_expires_at=utcnow() - timedelta(seconds=5),
                progress={**row["progress"], "checkpoint_epoch": checkpoint_epoch}))

    try:
        for epoch, expected in ((0, [job_id]), (0, [job_id]), (1, [job_id]), (1, [job_id]), (1, [])):
            worker_dies(epoch)
            assert leases.requeue_orphans(database, send=lambda j, t: sent.append((j, t))) == expected
        row = job_row(settings, job_id)
        assert len(sent) == 4 and row["status"] == "failed" and row["finished_at"] is not None
        assert "died 3 times in a row" in row["error"] and row["result"] == {"worker_losses": 3}
        assert row["progress"]["phase"] == "failed" and row["lease_owner"] is None
    finally:
        database.dispose()


def test_an_orphan_whose_cancel_was_asked_for_ends_cancelled_and_its_files_go(tmp_path: Path,
                                                                             assets_root: Path) -> None:
    """The reaper does not send a job back to a worker only to stop it; the sweep then drops the files that
    the dead worker left, as it does for any ended job, and keeps a running job's."""
    settings, _task, job_id = _task_and_job(tmp_path, assets_root, hyperparameters={"epochs": 1, "batch_size": 8})
    other = _job(settings, JobRequest(method="baseline", dataset="tiny", hyperparameters={"epochs": 2, "batch_size": 8}))
    database = Database(settings)
    try:
        with database.session() as session:  # both claimed; both workers died; one was asked to cancel
            for job, cancel in ((job_id, True), (other, False)):
                session.execute(update(TrainingJob).where(TrainingJob.id == job).values(
                    status="running", lease_owner="gone/1/x", lease_expires_at=utcnow() - timedelta(seconds=5),
                    cancel_requested=cancel, progress={"checkpoint_epoch": 1}))
        workdirs = {job: Workdir.of(settings, job) for job in (job_id, other)}
        for workdir in workdirs.values():
            workdir.state.write_bytes(b"epoch checkpoint")
            (workdir.root / ".state.pt.tmp-7-0123456789ab").write_bytes(b"half a checkpoint (writer killed)")
            workdir.final.mkdir()
        sent: list[tuple[int, str | None]] = []
        assert leases.requeue_orphans(database, send=lambda j, t: sent.append((j, t))) == [other]
        row = job_row(settings, job_id)
        assert row["status"] == "cancelled" and row["finished_at"] is not None and row["lease_owner"] is None
        assert row["result"] == {"cancelled_after_epochs": 1} and row["progress"]["phase"] == "cancelled"
        assert [job for job, _ in sent] == [other] and job_row(settings, other)["status"] == "queued"

        assert registration.sweep_ended_work_files(database, settings) == [job_id]
        assert list(workdirs[job_id].root.iterdir()) == []  # (this job never ran: it has no costs.csv)
        assert workdirs[other].state.is_file() and workdirs[other].final.is_dir()  # queued: it resumes from it
        assert registration.sweep_ended_work_files(database, settings) == []
    finally:
        database.dispose()


class _DiskFull(OSError):
    pass


class _Unwritable:
    def __reduce__(self) -> Any:
        raise _DiskFull("no space left on device")


def test_an_epoch_checkpoint_write_that_fails_leaves_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "state.pt"
    training.save_state(path, {"epoch": 1})  # type: ignore[typeddict-item]
    with pytest.raises(_DiskFull):
        training.save_state(path, {"epoch": 2, "fails": _Unwritable()})  # type: ignore[typeddict-item]
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]
    import torch

    assert torch.load(path, weights_only=True) == {"epoch": 1}  # the last good one stays


class _WorkerKilled(BaseException):
    """Stands in for SIGKILL / the OOM killer: nothing of the attempt's own clean-up runs."""


def test_attempts_that_die_mid_epoch_are_counted_across_attempts(
        tmp_path: Path, assets_root: Path, task_settings: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Real attempts: each claims the job, writes its own progress, and dies inside training; the lease then
    expires. The count must survive each attempt's progress write, or the job is requeued for ever."""
    import models.commands.train as train_module

    settings, task, job_id = _task_and_job(tmp_path, assets_root, hyperparameters={"epochs": 1, "batch_size": 8})

    def killed(*_args: Any, **_kwargs: Any) -> Any:
        raise _WorkerKilled()

    monkeypatch.setattr(train_module, "run_training", killed)
    database = Database(settings)
    requeued: list[list[int]] = []
    try:
        for _ in range(3):
            with pytest.raises(_WorkerKilled):
                task.apply(args=[job_id], throw=True).get()
            assert job_row(settings, job_id)["status"] == "running"  # the dead worker's lease, until it expires
            with database.session() as session:
                session.execute(update(TrainingJob).where(TrainingJob.id == job_id)
                                .values(lease_expires_at=utcnow() - timedelta(seconds=5)))
            requeued.append(leases.requeue_orphans(database, send=lambda _j, _t: None))
    finally:
        database.dispose()
    row = job_row(settings, job_id)
    assert requeued == [[job_id], [job_id], []] and row["status"] == "failed", (requeued, row["progress"])
    assert row["attempts"] == 3 and "died 3 times in a row" in row["error"]


def test_a_retry_the_broker_refuses_is_sent_again_by_the_reaper(
        tmp_path: Path, assets_root: Path, task_settings: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """At the soft limit the job goes back to queued and Celery sends a retry; if the broker refuses that
    message, the job must not stay queued under a task id that the reaper takes for sent."""
    from celery.exceptions import Reject

    settings, task, job_id = _task_and_job(tmp_path, assets_root, hyperparameters={"epochs": 1, "batch_size": 8})
    calls: list[int] = []

    def one_epoch_then_soft_limit(**_kwargs: Any) -> Any:
        calls.append(1)
        database = Database(settings)
        try:
            with database.session() as session:
                progress = dict(session.get(TrainingJob, job_id).progress or {})  # type: ignore[union-attr]
                session.execute(update(TrainingJob).where(TrainingJob.id == job_id)
                                .values(progress={**progress, "checkpoint_epoch": 1}))
        finally:
            database.dispose()
        raise SoftTimeLimitExceeded()

    def broker_refuses(*_args: Any, **_kwargs: Any) -> Any:
        raise Reject(ConnectionError("broker unreachable"), requeue=False)

    monkeypatch.setattr(training, "run", one_epoch_then_soft_limit)
    monkeypatch.setattr(JobTask, "retry", broker_refuses)
    result = task.apply(args=[job_id]).get()
    row = job_row(settings, job_id)
    assert result["status"] == "queued" and row["status"] == "queued" and row["celery_task_id"] is None, row
    database = Database(settings)
    try:
        sent: list[tuple[int, str | None]] = []
        assert leases.requeue_orphans(database, send=lambda j, t: sent.append((j, t)), unsent_grace_s=0) == [job_id]
        assert sent and len(calls) == 1
    finally:
        database.dispose()


def test_the_reaper_and_the_job_threads_share_one_database_per_process(
        tmp_path: Path, assets_root: Path, task_settings: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """On SQLite the write mutex is per Database: a reaper with its own would meet the jobs' heartbeats as
    SQLITE_BUSY instead of queueing with them. A forked child (another pid) makes its own."""
    from types import SimpleNamespace

    from worker import tasks

    _settings, task, _job_id = _task_and_job(tmp_path, assets_root)
    JobTask._database = None
    monkeypatch.setattr(tasks, "_reaper", None)
    monkeypatch.setattr(leases.Reaper, "start", lambda self: None)  # its pass is tested above
    tasks._start_reaper(sender=SimpleNamespace(app=task.app))
    assert tasks._reaper is not None
    parent = task.database
    assert tasks._reaper.database is parent and parent.queues_writes and task.database is parent
    monkeypatch.setattr(tasks.os, "getpid", lambda: -1)
    child = task.database
    try:
        assert child is not parent and task.database is child
    finally:
        parent.dispose()


def test_a_worker_shutting_down_hands_its_job_back_without_counting_a_loss(
        tmp_path: Path, assets_root: Path, task_settings: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C of `make run` (SIGTERM to the local worker) during a job: the attempt stops at its next step,
    the job goes back to queued with its message resent, and the next attempt resumes from the checkpoint.
    Before, training went on until the worker was killed, and three such stops failed the job."""
    from worker import tasks

    settings, _seeded = seeded_sqlite_settings(assets_root, tiny_assets(assets_root / "tiny-assets"),
                                               tmp_path / "data", torch_threads=1, training_lease_s=30)
    job_id = _job(settings, JobRequest(method="baseline", dataset="tiny",
                                       hyperparameters={"epochs": 3, "batch_size": 4}))
    handed_back: list[dict[str, Any]] = []
    real_on_epoch_end, real_release = training.Hooks.on_epoch_end, leases.release

    def shut_down_after_the_first_epoch(self: training.Hooks, state: Any) -> None:
        real_on_epoch_end(self, state)
        if not handed_back:
            tasks._hand_back_running_jobs(sig="SIGTERM", how="Warm")  # what Celery's signal handler sends

    def release(database: Database, lease: leases.Lease, *, progress: dict[str, Any]) -> None:
        handed_back.append(progress)
        training.WORKER_SHUTTING_DOWN.clear()  # the next attempt runs in a worker that is not stopping
        real_release(database, lease, progress=progress)

    monkeypatch.setattr(training.Hooks, "on_epoch_end", shut_down_after_the_first_epoch)
    monkeypatch.setattr(leases, "release", release)
    app = create_celery_app(settings.model_copy(update={"result_backend": "cache+memory://"}))
    task = app.task(bind=True, base=JobTask, name=RUN_JOB)(run_training_job)
    JobTask._database = None
    try:
        result = task.apply(args=[job_id]).get()  # the resent message runs at once, in this process
    finally:
        training.WORKER_SHUTTING_DOWN.clear()
    row = job_row(settings, job_id)
    assert result["status"] == "succeeded" and row["status"] == "succeeded", row
    assert len(handed_back) == 1 and handed_back[0]["requeued_because"] == "worker shutdown"
    assert handed_back[0]["checkpoint_epoch"] == 1  # stopped at the first step of epoch 2
    assert row["attempts"] == 2 and not row["progress"].get("worker_losses")
    assert row["progress"]["resumed_from_epoch"] == 1 and row["result"]["epochs_completed"] == 3
