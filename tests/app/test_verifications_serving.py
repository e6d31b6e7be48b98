"""Serving: no model (503 + /readyz false), queue full (503 + Retry-After), the registry and `serve --model`."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy import select

from app.cli import main as cli_main
from app.config import Settings
from app.db import Database
from app.errors import InvalidInput
from app.orm import ActiveState, ModelPromotion, ModelVersion, Role
from app.services.audit import Actor
from app.services.model_registry import active_model_version, register_checkpoint
from tests.app.model_factory import (
    SERVED_CLASSES,
    cached_checkpoint,
    jpeg_photo,
    make_checkpoint,
    post_verification,
    served_settings,
)
from tests.conftest import ApiEnv
from tests.worker.factories import wait_for


def posters(client: Any, key: str, count: int) -> tuple[list[threading.Thread], list[Any]]:
    """`count` threads (not started) that each post a verification; their responses go to the list."""
    answers: list[Any] = []
    threads = [threading.Thread(target=lambda: answers.append(post_verification(client, key, image=jpeg_photo())))
               for _ in range(count)]
    return threads, answers


@pytest.fixture(scope="session")
def checkpoint_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("serving-checkpoints")


def test_no_model_means_not_ready_and_503_model_unavailable(env: ApiEnv) -> None:
    readiness = env.client.get("/readyz")
    assert readiness.status_code == 503 and readiness.json()["model_loaded"] is False
    response = post_verification(env.client, env.keys[Role.CLIENT], image=jpeg_photo())
    assert response.status_code == 503
    assert response.json()["type"] == "https://rxverify.dev/problems/model-unavailable"


def test_a_full_queue_answers_503_with_retry_after(seeded_sqlite_template: Any, tmp_path: Path, make_client: Any,
                                                   checkpoint_root: Path) -> None:
    template, keys = seeded_sqlite_template
    settings = served_settings(template, tmp_path / "data", checkpoint=cached_checkpoint(checkpoint_root),
                               inference_queue_size=1, max_batch_size=1, max_batch_wait_ms=0)
    client = make_client(settings)
    engine = client.app.state.engine
    entered, gate = threading.Event(), threading.Event()

    def hold(_module: Any, _inputs: Any) -> None:
        entered.set()
        gate.wait(10)

    handle = engine.current.model.register_forward_pre_hook(hold)
    workers, answers = posters(client, keys[Role.CLIENT], 2)
    try:
        workers[0].start()
        assert entered.wait(10)  # request 1 is in the forward pass
        workers[1].start()
        deadline = time.monotonic() + 10
        while engine.queue_depth < 1 and time.monotonic() < deadline:
            time.sleep(0.01)  # request 2 waits in the (full) queue
        refused = post_verification(client, keys[Role.CLIENT], image=jpeg_photo())
    finally:
        gate.set()
        for worker in workers:
            worker.join(10)
        handle.remove()
    assert refused.status_code == 503, refused.text
    assert refused.json()["type"].endswith("/inference-queue-full") and int(refused.headers["Retry-After"]) >= 1
    assert [a.status_code for a in answers] == [200, 200]
    assert client.get("/readyz").status_code == 200


def test_verifications_beyond_the_in_flight_limit_get_503_at_once(
        seeded_sqlite_template: Any, tmp_path: Path, make_client: Any, checkpoint_root: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With decoding the bottleneck, the engine's queue (checked after the decode) never fills; the in-flight
    limit, counted from before the upload is read, answers the surplus with a quick 503 instead of a long wait."""
    from app.services import verifications as service

    template, keys = seeded_sqlite_template
    settings = served_settings(template, tmp_path / "data", checkpoint=cached_checkpoint(checkpoint_root),
                               max_verifications_in_flight=2, max_concurrent_decodes=1)
    client = make_client(settings)
    real, release = service.preprocess_upload, threading.Event()

    def stuck_decode(*args: Any, **kwargs: Any) -> Any:
        assert release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(service, "preprocess_upload", stuck_decode)
    held, answers = posters(client, keys[Role.CLIENT], 2)
    for worker in held:
        worker.start()
    try:
        wait_for(lambda: client.app.state.verifications_in_flight == 2, timeout=10, what="two verifications in flight")
        started = time.monotonic()
        refused = post_verification(client, keys[Role.CLIENT], image=jpeg_photo())
        waited = time.monotonic() - started
    finally:
        release.set()
        for worker in held:
            worker.join(30)
    assert waited < 5 and refused.status_code == 503, refused.text
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.json()["type"].endswith("/inference-queue-full") and refused.headers["Retry-After"] == "1"
    assert "RXVERIFY_MAX_VERIFICATIONS_IN_FLIGHT" in refused.json()["detail"]
    assert [a.status_code for a in answers] == [200, 200] and client.app.state.verifications_in_flight == 0
    assert post_verification(client, keys[Role.CLIENT], image=jpeg_photo()).status_code == 200  # room again


def test_uploads_are_decoded_at_most_max_concurrent_decodes_at_once(
        seeded_sqlite_template: Any, tmp_path: Path, make_client: Any, checkpoint_root: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode memory is bounded: with a limit of 2, four simultaneous uploads never decode more than 2 at once."""
    from app.services import verifications as service

    template, keys = seeded_sqlite_template
    settings = served_settings(template, tmp_path / "data", checkpoint=cached_checkpoint(checkpoint_root),
                               max_concurrent_decodes=2)
    client = make_client(settings)
    real, lock, state = service.preprocess_upload, threading.Lock(), {"now": 0, "peak": 0}

    def slow_preprocess(*args: Any, **kwargs: Any) -> Any:
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
        try:
            time.sleep(0.3)
            return real(*args, **kwargs)
        finally:
            with lock:
                state["now"] -= 1

    monkeypatch.setattr(service, "preprocess_upload", slow_preprocess)
    workers, answers = posters(client, keys[Role.CLIENT], 4)
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
    assert [a.status_code for a in answers] == [200] * 4
    assert state["peak"] == 2


def _register(settings: Settings, source: Path) -> ModelVersion:
    database = Database(settings)
    try:
        with database.session() as session:
            return register_checkpoint(session, source=source, settings=settings, actor=Actor.cli("test"))
    finally:
        database.dispose()


def test_register_is_content_addressed_and_idempotent(seeded_sqlite_template: Any, tmp_path: Path,
                                                      checkpoint_root: Path) -> None:
    template, _keys = seeded_sqlite_template
    settings = served_settings(template, tmp_path / "data", checkpoint=None)
    source = cached_checkpoint(checkpoint_root)
    first, second = _register(settings, source), _register(settings, source)
    assert first.id == second.id and first.status == "candidate"
    stored = Path(first.path)
    assert stored == settings.checkpoints_dir / first.sha256 and (stored / "model.safetensors").is_file()
    assert first.classes == list(SERVED_CLASSES) and first.decision["format_version"] == 1


def test_register_refuses_classes_outside_the_catalog(seeded_sqlite_template: Any, tmp_path: Path) -> None:
    template, _keys = seeded_sqlite_template
    settings = served_settings(template, tmp_path / "data", checkpoint=None)
    foreign = make_checkpoint(tmp_path / "foreign", classes=("00378-0208", "99999-0001"), favourite="00378-0208",
                              fitted=False)
    with pytest.raises(InvalidInput) as caught:
        _register(settings, foreign)
    assert caught.value.slug == "invalid-checkpoint" and "99999-0001" in caught.value.detail
    broken = tmp_path / "broken"
    broken.mkdir()
    with pytest.raises(InvalidInput):
        _register(settings, broken)


def test_serve_with_model_registers_activates_then_runs_uvicorn(
        seeded_sqlite_template: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, checkpoint_root: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    import uvicorn

    template, _keys = seeded_sqlite_template
    settings = served_settings(template, tmp_path / "data", checkpoint=None)
    monkeypatch.setenv("RXVERIFY_DATA_DIR", str(settings.data_dir))
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append({"app": app, **kwargs}))
    source = cached_checkpoint(checkpoint_root)
    serve = ["serve", "--no-worker", "--port", "8123", "--model", str(source)]
    assert cli_main(serve) == 0
    assert cli_main(serve) == 0  # the second run changes nothing
    assert [c["port"] for c in calls] == [8123, 8123] and "model version 1" in capsys.readouterr().out
    database = Database(settings)
    try:
        with database.session() as session:
            active = active_model_version(session)
            assert active is not None and active.status == "promoted"
            assert session.scalars(select(ActiveState)).one().model_version_id == active.id
            history = list(session.scalars(select(ModelPromotion)))
            assert [(h.action, h.to_model_version_id) for h in history] == [("activate", active.id)]
    finally:
        database.dispose()
    foreign = make_checkpoint(tmp_path / "foreign", classes=("00378-0208", "99999-0001"), favourite="00378-0208",
                              fitted=False)
    assert cli_main(["serve", "--no-worker", "--model", str(foreign)]) == 2 and "99999-0001" in capsys.readouterr().out
    assert len(calls) == 2


def test_a_model_without_a_policy_sends_everything_to_review(seeded_sqlite_template: Any, tmp_path: Path,
                                                             make_client: Any, checkpoint_root: Path) -> None:
    template, keys = seeded_sqlite_template
    settings = served_settings(template, tmp_path / "data",
                               checkpoint=cached_checkpoint(checkpoint_root, fitted=False))
    client = make_client(settings)
    body = post_verification(client, keys[Role.CLIENT], image=jpeg_photo()).json()
    assert body["verdict"] == "review" and body["predicted_ndc"] == "00378-0208"


def test_a_checkpoint_that_fails_to_load_leaves_the_service_up_but_not_ready(
        seeded_sqlite_template: Any, tmp_path: Path, make_client: Any, checkpoint_root: Path) -> None:
    template, keys = seeded_sqlite_template
    settings = served_settings(template, tmp_path / "data", checkpoint=cached_checkpoint(checkpoint_root))
    for path in settings.checkpoints_dir.glob("*/model.safetensors"):
        path.write_bytes(b"not safetensors")
    client = make_client(settings)
    assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 503
    response = post_verification(client, keys[Role.CLIENT], image=jpeg_photo())
    assert response.status_code == 503 and response.json()["type"].endswith("/model-unavailable")


@pytest.mark.parametrize("tampered", ["weights", "policy", "temperature"])
def test_a_checkpoint_changed_on_disk_after_registration_is_not_served(
        seeded_sqlite_template: Any, tmp_path: Path, make_client: Any, checkpoint_root: Path,
        caplog: pytest.LogCaptureFixture, tampered: str) -> None:
    """A flipped bit in the weights, or an edited threshold or temperature in metadata.json, loads fine as a
    file; served under the registered version id it would give verdicts that no audit entry explains."""
    import json

    template, keys = seeded_sqlite_template
    settings = served_settings(template, tmp_path / "data", checkpoint=cached_checkpoint(checkpoint_root))
    [directory] = [p.parent for p in settings.checkpoints_dir.glob("*/model.safetensors")]
    if tampered == "weights":
        weights = bytearray((directory / "model.safetensors").read_bytes())
        weights[-1] ^= 0x01  # the last byte of the last tensor: still a valid safetensors file
        (directory / "model.safetensors").write_bytes(bytes(weights))
    else:
        metadata = json.loads((directory / "metadata.json").read_text())
        if tampered == "policy":
            metadata["decision"]["accept_risk"] = 0.5  # would auto-accept far riskier fills
        else:
            metadata["temperature"] = metadata["temperature"] * 3
        (directory / "metadata.json").write_text(json.dumps(metadata))
    client = make_client(settings)
    assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 503
    response = post_verification(client, keys[Role.CLIENT], image=jpeg_photo())
    assert response.status_code == 503 and response.json()["type"].endswith("/model-unavailable")
    assert "changed on disk after registration" in caplog.text


def test_an_idempotent_retry_is_replayed_even_without_a_model(seeded_sqlite_template: Any, tmp_path: Path,
                                                              make_client: Any, checkpoint_root: Path) -> None:
    template, keys = seeded_sqlite_template
    settings = served_settings(template, tmp_path / "data", checkpoint=cached_checkpoint(checkpoint_root))
    first = post_verification(make_client(settings), keys[Role.CLIENT], image=jpeg_photo(),
                              headers={"Idempotency-Key": "retry-1"})
    for path in settings.checkpoints_dir.glob("*/model.safetensors"):
        path.write_bytes(b"gone")  # the next process cannot load a model
    client = make_client(settings)
    retry = post_verification(client, keys[Role.CLIENT], image=jpeg_photo(), headers={"Idempotency-Key": "retry-1"})
    assert retry.status_code == 200 and retry.json() == first.json()
    fresh = post_verification(client, keys[Role.CLIENT], image=jpeg_photo(), headers={"Idempotency-Key": "retry-2"})
    assert fresh.status_code == 503 and fresh.json()["type"].endswith("/model-unavailable")


def test_validation_outputs_are_checked_at_registration_and_a_bad_file_never_blocks_serving(
        seeded_sqlite_template: Any, tmp_path: Path) -> None:
    import shutil

    from app.inference.served import load_served_model
    from models.checkpoint import VALIDATION_FILE, with_updated_metadata

    template, _keys = seeded_sqlite_template
    settings = served_settings(template, tmp_path / "data", checkpoint=None)
    source = make_checkpoint(tmp_path / "good", seed=7)
    assert _register(settings, source).id  # its file matches the recorded hash
    good = load_served_model(source, version="good", device=torch.device("cpu"))
    assert good.validation is not None
    # Served as prepare_for_inference makes it: no BatchNorm left, the checkpoint's outputs.
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in good.model.modules())
    bad = tmp_path / "bad"
    shutil.copytree(source, bad)
    (bad / VALIDATION_FILE).write_bytes(b"garbage")
    with pytest.raises(InvalidInput, match="SHA-256"):
        _register(settings, bad)
    unnamed = tmp_path / "unnamed"  # a validation file the metadata does not name is refused as well
    with_updated_metadata(source, unnamed, decision={})
    shutil.copy2(source / VALIDATION_FILE, unnamed / VALIDATION_FILE)
    with pytest.raises(InvalidInput, match="not named in the metadata"):
        _register(settings, unnamed)
    # Already on disk (say, damaged after registration): the model still serves, with its stored policy.
    served = load_served_model(bad, version="bad", device=torch.device("cpu"))
    assert served.validation is None and served.policy is not None and served.policy.accepts


def test_a_photo_unlike_the_training_photos_goes_to_review_and_the_check_can_be_turned_off(
        seeded_sqlite_template: Any, tmp_path: Path, make_client: Any, checkpoint_root: Path) -> None:
    from tests.app.model_factory import image_bytes

    template, keys = seeded_sqlite_template
    # The rigged model always answers the favourite at 0.98; its check was fitted on noise photos.
    checkpoint = cached_checkpoint(checkpoint_root, familiar_photos=60)
    settings = served_settings(template, tmp_path / "data", checkpoint=checkpoint, unfamiliar_photo_rate=0.1)
    client = make_client(settings)
    familiar = post_verification(client, keys[Role.CLIENT], image=jpeg_photo(seed=5)).json()
    assert (familiar["verdict"], familiar["reason"]) == ("match", "accepted")
    assert 0 < familiar["unfamiliarity"] <= 1
    # A smooth gradient is nothing like noise: same probabilities, but it is not trusted.
    odd = post_verification(client, keys[Role.CLIENT], image=image_bytes("PNG")).json()
    assert (odd["verdict"], odd["reason"], odd["predicted_ndc"]) == ("review", "photo-unfamiliar", "00378-0208")
    assert odd["unfamiliarity"] > 1 and odd["probability_prescribed"] == familiar["probability_prescribed"]
    stored = client.get(f"/v1/verifications/{odd['id']}", headers={"X-API-Key": keys[Role.PHARMACIST]}).json()
    assert stored["reason"] == "photo-unfamiliar" and stored["unfamiliarity"] == odd["unfamiliarity"]
    metrics = client.get("/metrics").text
    assert f'rxverify_unfamiliar_photos_total{{model_version="{odd["model_version"]}"}}' in metrics

    off = make_client(served_settings(template, tmp_path / "off", checkpoint=checkpoint, unfamiliar_photo_rate=0))
    unchecked = post_verification(off, keys[Role.CLIENT], image=image_bytes("PNG")).json()
    assert (unchecked["verdict"], unchecked["unfamiliarity"]) == ("match", None)
    # A rate too small for the validation photos the check was fitted on: nothing can be flagged, and the
    # verdict says the photo was not checked (null), not that it looked familiar (it said 0.0).
    tiny_rate = make_client(served_settings(template, tmp_path / "tiny-rate", checkpoint=checkpoint,
                                            unfamiliar_photo_rate=0.0001))
    unflaggable = post_verification(tiny_rate, keys[Role.CLIENT], image=image_bytes("PNG")).json()
    assert (unflaggable["verdict"], unflaggable["unfamiliarity"]) == ("match", None)


def test_a_familiarity_file_for_other_weights_is_refused_at_registration_and_skipped_when_serving(
        seeded_sqlite_template: Any, tmp_path: Path, checkpoint_root: Path) -> None:
    import shutil

    from app.inference.served import load_served_model
    from models.checkpoint import FAMILIARITY_FILE

    template, _keys = seeded_sqlite_template
    settings = served_settings(template, tmp_path / "data", checkpoint=None)
    other = cached_checkpoint(checkpoint_root, familiar_photos=60, seed=3)
    mixed = tmp_path / "mixed"
    shutil.copytree(cached_checkpoint(checkpoint_root, familiar_photos=60), mixed)
    shutil.copy2(other / FAMILIARITY_FILE, mixed / FAMILIARITY_FILE)
    with pytest.raises(InvalidInput, match="other weights"):
        _register(settings, mixed)
    served = load_served_model(mixed, version="mixed", device=torch.device("cpu"))  # damaged on disk: no check
    assert served.familiarity is None and served.taps is None and served.policy is not None
    good = load_served_model(other, version="other", device=torch.device("cpu"))
    assert good.familiarity is not None and good.taps is not None
    # Named after these weights but for stages the model does not have: served without the check too.
    from models.checkpoint import read_familiarity
    from models.ood import Familiarity

    fitted = read_familiarity(other, weights_sha256=good.weights_sha256)
    assert fitted is not None
    renamed = tmp_path / "renamed"
    shutil.copytree(other, renamed)
    (renamed / FAMILIARITY_FILE).write_bytes(Familiarity(
        stages={f"missing.{name}": stage for name, stage in fitted.stages.items()},
        weights_sha256=good.weights_sha256).to_bytes())
    served = load_served_model(renamed, version="renamed", device=torch.device("cpu"))
    assert served.familiarity is None and served.taps is None
