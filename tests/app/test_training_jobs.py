"""Training-job API without a worker: validation, defaults, deduplication, listing, cancelling queued jobs."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import update

from app.config import Settings
from app.db import Database
from app.orm import Role, TrainingJob
from app.services.training_jobs import LARGE_DATASET, default_hyperparameters
from tests.worker.factories import Seeded, seed_training, seeded_sqlite_settings, tiny_assets

URL = "/v1/admin/training-jobs"
FAST = {"epochs": 2, "batch_size": 8, "steps": 3}


@dataclass
class JobEnv:
    """A client on a database holding the tiny dataset and an active base model."""

    settings: Settings
    client: Any
    seeded: Seeded

    def headers(self, role: str = "pharmacist") -> dict[str, str]:
        """Auth headers for a role."""
        return {"X-API-Key": self.seeded.keys[Role(role)]}

    def post(self, body: dict[str, Any], role: str = "pharmacist") -> Any:
        """POST a job request."""
        return self.client.post(URL, json=body, headers=self.headers(role))


@pytest.fixture
def jobs(db_settings: Settings, make_client: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory) -> JobEnv:
    """A JobEnv on SQLite and on PostgreSQL."""
    assets = tiny_assets(tmp_path_factory.getbasetemp() / "tiny-assets")
    if db_settings.is_sqlite:  # a copy of a database seeded once per session (faster)
        settings, seeded = seeded_sqlite_settings(tmp_path_factory.getbasetemp(), assets, db_settings.data_dir / "s")
        return JobEnv(settings, make_client(settings), seeded)
    seeded = seed_training(db_settings, assets, other_model=True)
    return JobEnv(db_settings, make_client(db_settings), seeded)


def _set_status(settings: Settings, job_id: int, status: str) -> None:
    database = Database(settings)
    try:
        with database.session() as session:
            session.execute(update(TrainingJob).where(TrainingJob.id == job_id).values(status=status))
    finally:
        database.dispose()


def test_create_answers_202_with_location_defaults_and_a_dispatched_task(jobs: JobEnv) -> None:
    response = jobs.post({"dataset": "tiny", "hyperparameters": FAST})
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["Location"] == f"{URL}/{job['id']}"
    assert job["status"] == "queued" and job["method"] == "csada" and not job["deduplicated"]
    assert job["base_model"] == jobs.seeded.base_model and job["cost_matrix_version"] == jobs.seeded.cost_matrix_version
    assert job["auto_promote"] is False  # the setting's default
    expected = {**default_hyperparameters("csada", train_images=36), **FAST}
    assert job["hyperparameters"] == expected and expected["lr"] == 1e-4 and expected["freeze_bn"] is True
    assert job["progress"]["phase"] == "queued"
    read = jobs.client.get(response.headers["Location"], headers=jobs.headers())
    assert read.status_code == 200 and read.json()["id"] == job["id"]
    # The task went to the broker after the commit (a background task), carrying the id only.
    assert read.json()["progress"]["phase"] == "queued"
    from tests.worker.factories import job_row

    assert job_row(jobs.settings, job["id"])["celery_task_id"]


def test_identical_requests_are_deduplicated_until_the_job_fails(jobs: JobEnv) -> None:
    body = {"dataset": "tiny", "method": "baseline", "hyperparameters": {"epochs": 1}, "seed": 3}
    first = jobs.post(body)
    promoting = jobs.post({**body, "auto_promote": True}, role="admin")  # part of the identity: not the same job
    assert promoting.status_code == 202 and promoting.json()["auto_promote"] is True
    assert promoting.json()["id"] != first.json()["id"]
    assert jobs.post({**body, "auto_promote": True}, role="admin").json()["id"] == promoting.json()["id"]
    again = jobs.post({**body, "auto_promote": False}, role="admin")  # the default, spelt out
    assert first.status_code == 202 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"] and again.json()["deduplicated"] is True
    assert again.headers["Location"] == f"{URL}/{first.json()['id']}"
    explicit = jobs.post({**body, "base_model": jobs.seeded.base_model,
                          "cost_matrix_version": jobs.seeded.cost_matrix_version,
                          "hyperparameters": {"epochs": 1, "batch_size": 16}})  # the defaults, spelt out
    assert explicit.status_code == 200 and explicit.json()["id"] == first.json()["id"]
    other_seed = jobs.post({**body, "seed": 4})
    assert other_seed.status_code == 202 and other_seed.json()["id"] != first.json()["id"]
    _set_status(jobs.settings, first.json()["id"], "failed")
    retry = jobs.post(body)
    assert retry.status_code == 202 and retry.json()["id"] not in (first.json()["id"], other_seed.json()["id"],
                                                                   promoting.json()["id"])


INVALID: list[tuple[dict[str, Any], str]] = [
    ({"dataset": "nope"}, "dataset"),
    ({"dataset": "tiny", "method": "baseline", "hyperparameters": {"lam": 1.0}}, "hyperparameters.lam"),
    ({"dataset": "tiny", "method": "csada", "hyperparameters": {"alpha": 2.0}}, "hyperparameters.alpha"),
    ({"dataset": "tiny", "hyperparameters": {"batch_size": 500}}, "hyperparameters.batch_size"),
    ({"dataset": "tiny", "base_model": 999}, "base_model"),
    ({"dataset": "tiny", "cost_matrix_version": 999}, "cost_matrix_version"),
]
SCHEMA_VIOLATIONS: list[dict[str, Any]] = [
    {"dataset": "tiny", "hyperparameters": {"epochs": "5"}},
    {"dataset": "tiny", "hyperparameters": {"learning_rate": 0.1}},
    {"dataset": "tiny", "method": "magic"},
    {"dataset": "tiny", "seed": -1},
    {"dataset": "tiny", "hyperparameters": {"lr": 0}},
    # Booleans and strings are not numbers (true would read as lr 1.0, false as lambda 0).
    {"dataset": "tiny", "hyperparameters": {"lr": True}},
    {"dataset": "tiny", "hyperparameters": {"lam": False}},
    {"dataset": "tiny", "hyperparameters": {"eps": "0.5"}},
    {"dataset": "tiny", "hyperparameters": {"weight_decay": False}},
    {"dataset": "tiny", "method": "ap", "hyperparameters": {"alpha": True}},
    {"dataset": "tiny", "surprise": True},
]


def test_invalid_requests_get_422_naming_the_field(jobs: JobEnv) -> None:
    for body, field in INVALID:
        response = jobs.post(body)
        assert response.status_code == 422, (body, response.text)
        assert response.headers["content-type"].startswith("application/problem+json")
        assert field in [error["field"] for error in response.json()["errors"]], body
    for body in SCHEMA_VIOLATIONS:
        assert jobs.post(body).status_code == 422, body
    assert jobs.client.get(URL, headers=jobs.headers()).json() == []  # nothing was stored


def test_roles_list_get_and_not_found(jobs: JobEnv) -> None:
    assert jobs.post({"dataset": "tiny"}, role="client").status_code == 403
    ids = [jobs.post({"dataset": "tiny", "seed": seed, "hyperparameters": FAST}).json()["id"] for seed in range(3)]
    listed = jobs.client.get(URL, headers=jobs.headers()).json()
    assert [job["id"] for job in listed] == sorted(ids, reverse=True)
    page = jobs.client.get(URL, params={"limit": 1, "before_id": ids[-1]}, headers=jobs.headers())
    assert [job["id"] for job in page.json()] == [ids[-2]]
    # A full page links the next one (RFC 8288), keeping the filters; the last, short page links none.
    assert page.headers["Link"] == f'<{URL}?before_id={ids[-2]}&limit=1>; rel="next"'
    pages, url = [], f"{URL}?limit=2"
    while url:
        answer = jobs.client.get(url, headers=jobs.headers())
        pages.append([job["id"] for job in answer.json()])
        link = answer.headers.get("Link")
        url = link[1:link.index(">")] if link else ""
    assert pages == [sorted(ids, reverse=True)[:2], sorted(ids, reverse=True)[2:]]
    assert jobs.client.get(URL, params={"status": "running"}, headers=jobs.headers()).json() == []
    missing = jobs.client.get(f"{URL}/999", headers=jobs.headers())
    assert missing.status_code == 404 and missing.json()["type"].endswith("/training-job-not-found")


def test_cancel_a_queued_job_at_once_and_refuse_a_finished_one(jobs: JobEnv) -> None:
    job = jobs.post({"dataset": "tiny", "hyperparameters": FAST}).json()
    cancelled = jobs.client.post(f"{URL}/{job['id']}/cancel", headers=jobs.headers())
    assert cancelled.status_code == 202
    body = cancelled.json()
    assert body["status"] == "cancelled" and body["cancel_requested"] and body["finished_at"]
    again = jobs.client.post(f"{URL}/{job['id']}/cancel", headers=jobs.headers())
    assert again.status_code == 409 and again.json()["type"].endswith("/training-job-finished")
    # A cancelled job does not absorb a new identical request.
    assert jobs.post({"dataset": "tiny", "hyperparameters": FAST}).status_code == 202


def test_cancel_a_running_job_asks_it_to_stop(jobs: JobEnv) -> None:
    job = jobs.post({"dataset": "tiny", "hyperparameters": FAST}).json()
    _set_status(jobs.settings, job["id"], "running")
    body = jobs.client.post(f"{URL}/{job['id']}/cancel", headers=jobs.headers()).json()
    assert body["status"] == "running" and body["cancel_requested"] is True


def test_defaults_endpoint_and_the_large_dataset_recipe(jobs: JobEnv) -> None:
    small = jobs.client.get(f"{URL}/defaults", params={"dataset": "tiny", "method": "ap"}, headers=jobs.headers())
    assert small.status_code == 200
    assert small.json()["train_images"] == 36 and small.json()["hyperparameters"]["alpha"] == 5.0
    for bad in ("", "x" * 101, "tiny\x00"):  # bounded like the job's own `dataset` field
        refused = jobs.client.get(f"{URL}/defaults", params={"dataset": bad}, headers=jobs.headers())
        assert refused.status_code == 422 and refused.json()["errors"][0]["field"] == "query.dataset"
    pmi = default_hyperparameters("csada", train_images=LARGE_DATASET)
    assert (pmi["epochs"], pmi["batch_size"], pmi["lr"], pmi["steps"], pmi["step_size"], pmi["lam"], pmi["tau"]) == \
        (10, 32, 1e-7, 50, 1e-4, 2.0, 3.0)  # the paper's PMI run
    assert default_hyperparameters("penalty", train_images=LARGE_DATASET)["scheduler"] == "step"


def test_a_failed_jobs_traceback_is_for_admins_only(jobs: JobEnv) -> None:
    """Its frames name files on the server; pharmacists still read the error message."""
    job_id = jobs.post({"dataset": "tiny", "hyperparameters": FAST}).json()["id"]
    database = Database(jobs.settings)
    try:
        with database.session() as session:
            session.execute(update(TrainingJob).where(TrainingJob.id == job_id).values(
                status="failed", error="FileNotFoundError: [Errno 2] No such file or directory: '/data/ds/x.jpg'",
                result={"traceback": ['  File "/opt/rxverify/worker/training.py", line 1\n']}))
    finally:
        database.dispose()
    for role, shown in (("pharmacist", False), ("admin", True)):
        for read in (jobs.client.get(f"{URL}/{job_id}", headers=jobs.headers(role)).json(),
                     jobs.client.get(URL, headers=jobs.headers(role)).json()[0]):
            path = "/data/ds/x.jpg" if shown else "<server path>"
            assert read["error"] == f"FileNotFoundError: [Errno 2] No such file or directory: '{path}'"
            assert ("traceback" in read["result"]) is shown


def test_redacting_server_paths_keeps_the_rest_of_the_message() -> None:
    from app.api.training_jobs import redact_server_paths

    assert redact_server_paths("CheckpointError: /data/checkpoints/ab is not a checkpoint") == (
        "CheckpointError: <server path> is not a checkpoint")
    for kept in ("the soft time limit was reached 3 times", "lr 1/2, shape (3, 64) vs 1/8",
                 "see https://example.org/a/b"):
        assert redact_server_paths(kept) == kept


def test_identical_requests_racing_past_the_check_all_get_the_one_job(jobs: JobEnv,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Every request looks for a live identical job before any inserts; the partial unique index lets one
    insert, and the others answer 200 with that job (as a retry after a timeout expects), not a 409."""
    from app.services import training_jobs

    racers = 4
    all_checked = threading.Barrier(racers, timeout=30)
    first_look = threading.local()
    real_live_job = training_jobs.live_job

    def look_then_wait(session: Any, digest: str) -> Any:
        found = real_live_job(session, digest)
        if not getattr(first_look, "done", False):
            first_look.done = True
            all_checked.wait()  # nobody inserts before everybody has looked
        return found

    monkeypatch.setattr(training_jobs, "live_job", look_then_wait)
    with ThreadPoolExecutor(max_workers=racers) as pool:
        answers = list(pool.map(lambda _: jobs.post({"dataset": "tiny", "hyperparameters": FAST, "seed": 11}),
                                range(racers)))
    assert sorted(a.status_code for a in answers) == [200] * (racers - 1) + [202], [a.text for a in answers]
    assert len({a.json()["id"] for a in answers}) == 1
    assert sum(a.json()["deduplicated"] for a in answers) == racers - 1
