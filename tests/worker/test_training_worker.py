"""A real Celery worker process (`celery -A worker.celery_app worker`, two threads) on Redis and PostgreSQL:
a CSADA job end to end, cooperative cancel, and duplicate deliveries that never run a job twice, each seen
in the worker's own Prometheus metrics too."""

from __future__ import annotations

import hashlib
import socket
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.config import Settings
from tests.worker.conftest import FAST, Fleet, wait_ready
from tests.worker.factories import Workers, wait_for, worker_env
from worker.celery_app import create_celery_app
from worker.tasks import RUN_JOB

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]
MODELS = "/v1/admin/models"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


METRICS_PORT = _free_port()


def worker_metrics() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The module's worker's metrics, scraped over HTTP: {(sample name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def attempts(scrape: dict[tuple[str, tuple[tuple[str, str], ...]], float], outcome: str) -> float:
    return scrape[("rxverify_training_job_attempts_total", (("outcome", outcome),))]


RUNNING_GAUGES = ("rxverify_training_progress_ratio", "rxverify_training_loss",
                  "rxverify_training_attack_success_ratio", "rxverify_training_eta_seconds")


def running_series(scrape: dict[tuple[str, tuple[tuple[str, str], ...]], float]
                   ) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The running jobs' gauges in a scrape."""
    return {key: value for key, value in scrape.items() if key[0] in RUNNING_GAUGES}


@pytest.fixture(scope="module", autouse=True)
def shared_worker(fleet_settings: Settings, workers: Workers,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One worker for the module; two threads, so two deliveries of one job can really run at once."""
    log = tmp_path_factory.mktemp("logs") / "worker.log"
    workers.start(worker_env(fleet_settings, RXVERIFY_WORKER_METRICS_PORT=str(METRICS_PORT)), log, pool="threads",
                  concurrency=2, celery_cli=True)
    wait_ready(log)
    yield


def test_a_csada_job_succeeds_and_registers_a_model_with_metrics(fleet: Fleet) -> None:
    before = worker_metrics()
    assert not running_series(before)  # no job trains yet
    job_id = fleet.start_job(method="csada", hyperparameters=FAST, auto_promote=True)
    job = fleet.wait_status(job_id, "succeeded")
    # The job's row says succeeded a moment before its task returns and counts itself.
    counted = attempts(before, "succeeded") + 1
    wait_for(lambda: attempts(worker_metrics(), "succeeded") == counted, timeout=10, what="the attempt counted")
    after = worker_metrics()
    steps = after[("rxverify_training_steps_total", ())] - before[("rxverify_training_steps_total", ())]
    assert steps == 10  # 2 epochs of 5 steps
    assert after[("rxverify_training_jobs_in_progress", ())] == 0
    assert not running_series(after)  # the job's series went when its attempt ended
    assert after[("rxverify_training_job_attempt_seconds_count", (("outcome", "succeeded"),))] == attempts(after, "succeeded")
    assert job["attempts"] == 1 and job["error"] is None
    progress = job["progress"]
    assert progress["phase"] == "done" and progress["fraction"] == 1.0 and progress["epoch"] == 2
    assert progress["epochs"] == 2 and progress["steps_per_epoch"] == 5 and progress["loss"] is not None
    assert progress["attack_success_rate"] is not None and progress["validation"]["epoch"] == 2
    result = job["result"]
    version = result["model_version_id"]
    assert job["result_model_version"] == version and result["epochs_completed"] == 2
    assert {"valid", "test", "parent_valid", "parent_test", "decision", "promotion"} <= set(result)

    model = fleet.client.get(f"{MODELS}/{version}", headers=fleet.headers()).json()
    assert model["method"] == "csada" and model["status"] in ("candidate", "promoted")
    lineage = model["lineage"]
    assert lineage["parent"] == fleet.seeded.base_model and lineage["training_job"] == job_id
    assert lineage["cost_matrix_version"] == fleet.seeded.cost_matrix_version and lineage["dataset"] == "tiny"
    assert lineage["dataset_fingerprint"] and lineage["code_version"]
    for split in ("valid", "test"):
        report = model["metrics"][split]
        assert report["n"] == 12 and len(report["confusion"]) == 4 and sum(map(sum, report["confusion"])) == 12
        assert {"total_cost", "wer", "accuracy", "pair_errors"} <= set(report)
        tables = model["comparison"][split]
        assert {row["metric"] for row in tables["table5"]} >= {"Total cost", "Overall accuracy (%)"}
        assert all({"parent", "candidate"} <= set(row) for row in tables["table5"] + tables["table6"])
    assert model["decision"]["classes"] and model["temperature"] > 0
    # Fitted under RXVERIFY_MAX_ACCEPT_RISK (default 0.05); the job's summary names the rates it gives.
    assert model["decision"]["accept_risk"] <= fleet.settings.max_accept_risk == 0.05
    assert model["decision"]["report"]["max_accept_risk"] == 0.05
    assert {"review_rate_correct_fills", "wrong_accepts", "critical_accepts", "max_accept_risk"} <= set(result["decision"])
    # The validation outputs the policy was fitted on are stored beside the weights, to refit it for new costs.
    stored = fleet.settings.checkpoints_dir / model["sha256"] / "validation.safetensors"
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == model["decision"]["validation_sha256"]
    assert model["sha256"] == result["weights_sha256"]
    # So is the unfamiliar-photo check, fitted on the job's train split and named after these weights.
    from models.checkpoint import read_familiarity

    familiarity = read_familiarity(stored.parent, weights_sha256=model["sha256"])
    assert familiarity is not None and familiarity.n_valid == 12
    assert model["metrics"]["familiarity"]["fitted"] and model["metrics"]["familiarity"]["n_valid"] == 12

    promotion = result["promotion"]
    history = fleet.client.get(f"{MODELS}/promotions", headers=fleet.headers()).json()
    auto = [h for h in history if h["action"] == "auto_promote"]
    assert len(auto) == 1 and auto[0]["to_model_version"] == version
    assert auto[0]["outcome"] == ("applied" if promotion["promoted"] else "refused")
    assert {c["name"] for c in auto[0]["gate"]["checks"]} == {"total_cost", "accuracy_drop", "critical_pair_errors"}
    active = next(m["id"] for m in fleet.client.get(MODELS, headers=fleet.headers()).json() if m["active"])
    assert active == (version if promotion["promoted"] else fleet.seeded.base_model)


def test_cancel_stops_a_running_job_at_its_next_step(fleet: Fleet) -> None:
    job_id = fleet.start_job(method="baseline", hyperparameters={"epochs": 500, "batch_size": 4})
    fleet.wait_status(job_id, "running")
    wait_for(lambda: fleet.job(job_id)["progress"].get("phase") == "training", timeout=60, what="training steps")
    during = running_series(worker_metrics())  # labelled by job: a threads pool runs several in one process
    assert {name for name, _ in during} == set(RUNNING_GAUGES) and {labels for _, labels in during} == {
        (("job_id", str(job_id)),)}
    assert 0 < during[("rxverify_training_progress_ratio", (("job_id", str(job_id)),))] < 1
    response = fleet.client.post(f"/v1/admin/training-jobs/{job_id}/cancel", headers=fleet.headers())
    assert response.status_code == 202 and response.json()["cancel_requested"] is True
    job = fleet.wait_status(job_id, "cancelled", timeout=30)
    wait_for(lambda: attempts(worker_metrics(), "cancelled") == 1, timeout=10, what="the cancelled attempt counted")
    assert job["progress"]["phase"] == "cancelled" and job["result_model_version"] is None
    assert not running_series(worker_metrics())
    assert job["result"]["cancelled_after_epochs"] < 500
    assert len(fleet.client.get(MODELS, headers=fleet.headers()).json()) == 1  # nothing registered


def test_a_duplicate_delivery_does_not_run_the_job_twice(fleet: Fleet) -> None:
    celery = create_celery_app(fleet.settings)
    job_id = fleet.start_job(method="csada", hyperparameters={"epochs": 3, "batch_size": 4, "steps": 10})
    duplicate = celery.send_task(RUN_JOB, args=[job_id])  # delivered while the first one runs
    job = fleet.wait_status(job_id, "succeeded")
    skipped: dict[str, Any] = duplicate.get(timeout=60)
    assert skipped["job_id"] == job_id and skipped["skipped"].startswith("leased by"), skipped
    assert job["attempts"] == 1 and fleet.row(job_id)["lease_owner"] is None
    skipped_before = attempts(worker_metrics(), "skipped")
    late = celery.send_task(RUN_JOB, args=[job_id]).get(timeout=60)  # redelivered after it finished
    assert late == {"job_id": job_id, "skipped": "already succeeded"}
    assert attempts(worker_metrics(), "skipped") == skipped_before + 1
    assert fleet.job(job_id)["attempts"] == 1
    assert len(fleet.client.get(MODELS, headers=fleet.headers()).json()) == 2  # model A and the one result
