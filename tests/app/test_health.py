"""Liveness, readiness (database, broker, model hook), Prometheus metrics, request ids and JSON logs."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import pytest
from fastapi import BackgroundTasks

from app.config import Settings
from app.log import JsonFormatter, RequestIdFilter, bind_request_id, request_id_var
from tests.conftest import ApiEnv


def test_healthz(env: ApiEnv) -> None:
    response = env.client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}
    assert env.client.head("/healthz").status_code == 200  # load balancers that probe with HEAD


def test_readyz_embedded_mode_waits_for_a_model(env: ApiEnv) -> None:
    response = env.client.get("/readyz")
    body = response.json()
    assert response.status_code == 503 and body["ready"] is False
    assert body["database"]["ok"] and body["broker"]["ok"] and body["model_loaded"] is False
    env.client.app.state.model_ready = lambda: True  # the inference engine's hook
    ready = env.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True and ready.json()["model_loaded"] is True
    assert env.client.head("/readyz").status_code == 200


def test_a_failing_model_hook_means_not_loaded(env: ApiEnv) -> None:
    def broken() -> bool:
        raise RuntimeError("engine gone")

    env.client.app.state.model_ready = broken
    assert env.client.get("/readyz").json()["model_loaded"] is False


@pytest.mark.redis
def test_readyz_with_the_real_redis_broker(sqlite_settings: Settings, redis_url: str, make_client: Any) -> None:
    settings = sqlite_settings.model_copy(update={"broker_url": redis_url})
    client = make_client(settings)
    client.app.state.model_ready = True
    body = client.get("/readyz").json()
    assert body["broker"]["ok"] is True and body["ready"] is True


def test_readyz_reports_an_unreachable_broker_but_stays_ready(sqlite_settings: Settings, make_client: Any) -> None:
    """Verifications do not use the broker (a job sent meanwhile waits queued for the reaper): a Redis outage
    must not take every API replica out of its load balancer."""
    settings = sqlite_settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0", "readiness_timeout_s": 1})
    client = make_client(settings)
    client.app.state.model_ready = True
    response = client.get("/readyz")
    assert response.status_code == 200 and response.json()["ready"] is True
    assert response.json()["broker"]["ok"] is False
    error = response.json()["broker"]["error"]
    # /readyz needs no key: it names the kind of failure, never the broker's address (that goes to the log).
    assert error and "127.0.0.1" not in error and ":1" not in error


def test_readyz_waits_its_timeout_not_the_pools_while_every_pooled_connection_is_in_use(
        sqlite_settings: Settings, make_client: Any) -> None:
    """The probe would otherwise queue behind the requests holding them for the pool's 30 s timeout; one that
    frees a connection within the readiness timeout keeps the replica ready (a momentary spike)."""
    import threading

    settings = sqlite_settings.model_copy(update={"db_pool_size": 1, "db_max_overflow": 0, "readiness_timeout_s": 1})
    client = make_client(settings)
    client.app.state.model_ready = True
    engine = client.app.state.db.engine
    assert client.get("/readyz").status_code == 200
    with engine.connect():  # a slow request holds the pool's only connection
        started = time.perf_counter()
        response = client.get("/readyz")
        waited = time.perf_counter() - started
    assert response.status_code == 503 and 0.9 < waited < 5, waited
    assert response.json()["database"]["error"] == "all 1 pooled database connections stayed in use for 1 s"
    held = engine.connect()
    threading.Timer(0.3, held.close).start()  # a short request gives its connection back in time
    assert client.get("/readyz").status_code == 200


def test_a_database_that_accepts_but_never_answers_fails_the_probe_within_its_timeout() -> None:
    """Without the probe's own bound the check waits for the driver's connect timeout (10 s here), or
    without end on a pooled connection; a second probe waits for the same check instead of starting one."""
    import socket
    import threading

    from sqlalchemy import create_engine

    from app.services.readiness import DatabaseProbe

    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(server.accept()[0]), daemon=True).start()
    port = server.getsockname()[1]
    engine = create_engine(f"postgresql+psycopg://rx@127.0.0.1:{port}/rx", connect_args={"connect_timeout": 10})
    probe = DatabaseProbe(engine, pool_capacity=15)
    try:
        for _ in range(2):
            started = time.perf_counter()
            result = probe.check(timeout_s=0.5)
            assert time.perf_counter() - started < 3
            assert result.ok is False and result.error == "no answer from the database within 0.5 s"
        assert [t.name for t in threading.enumerate()].count("readiness-db") == 1
        # A check stuck that long is given up for a new one, up to a bound on the threads left hanging.
        probe.abandon_after_s, probe.max_abandoned = 0.0, 1
        for _ in range(3):
            assert probe.check(timeout_s=0.2).ok is False
        assert [t.name for t in threading.enumerate()].count("readiness-db") == 2
    finally:
        server.close()
        for connection in accepted:
            connection.close()
        engine.dispose()


def test_metrics_count_requests_by_route(env: ApiEnv) -> None:
    env.client.get("/v1/products/00378-0208", headers=env.as_role("client"))
    text = env.client.get("/metrics").text
    assert "rxverify_http_request_duration_seconds_bucket" in text
    assert 'rxverify_http_requests_total{method="GET",route="/v1/products/{ndc}",status="200"}' in text


def test_request_id_is_taken_or_generated(env: ApiEnv, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="rxverify.access"):
        given = env.client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert given.headers["x-request-id"] == "abc-123"
    access = [r for r in caplog.records if r.name == "rxverify.access"]
    assert access and getattr(access[-1], "request_id", None) == "abc-123"
    assert getattr(access[-1], "status", None) == 200 and getattr(access[-1], "route", None) == "/healthz"
    generated = env.client.get("/healthz").headers["x-request-id"]
    assert len(generated) == 32
    unsafe = env.client.get("/healthz", headers={"X-Request-ID": "evil\tvalue" + "x" * 200})
    assert unsafe.headers["x-request-id"] != "evil\tvalue" + "x" * 200


def test_the_logged_duration_ends_with_the_answer_not_the_background_work(
        env: ApiEnv, caplog: pytest.LogCaptureFixture) -> None:
    """A training job's dispatch retries run as a background task after its 202: the access log and the
    latency histogram counted them (19 s for an answer sent in 0.1 s)."""
    def answer_then_work(background: BackgroundTasks) -> dict[str, bool]:
        background.add_task(time.sleep, 0.6)
        return {"queued": True}

    env.client.app.add_api_route("/_test/background", answer_then_work)
    with caplog.at_level(logging.INFO, logger="rxverify.access"):
        assert env.client.get("/_test/background").status_code == 200
    line = [r for r in caplog.records if r.name == "rxverify.access"][-1]
    assert getattr(line, "duration_ms", 1e9) < 400


def test_request_id_lands_in_the_audit_log(env: ApiEnv) -> None:
    headers = {**env.as_role("pharmacist"), "X-Request-ID": "req-audit-1"}
    env.client.post("/v1/admin/cost-matrices/1/activate", headers=headers)
    env.client.patch("/v1/admin/products/00378-0208", json={"active": False}, headers=headers)
    entry = env.client.get("/v1/admin/audit-log", headers=env.as_role("pharmacist")).json()["items"][0]
    assert entry["request_id"] == "req-audit-1"


def test_json_log_lines_carry_the_request_id_and_extras() -> None:
    with bind_request_id("rid-9"):
        record = logging.LogRecord("rxverify.test", logging.WARNING, __file__, 1, "hello %s", ("world",), None)
        record.request_id = None
        record.job_id = 7
        RequestIdFilter().filter(record)
        line = json.loads(JsonFormatter().format(record))
    assert request_id_var.get() is None
    assert line["message"] == "hello world" and line["level"] == "WARNING"
    assert line["request_id"] == "rid-9" and line["job_id"] == 7 and line["time"].endswith("+00:00")


def test_openapi_documents_the_api_key_and_problems(env: ApiEnv) -> None:
    schema = env.client.get("/openapi.json").json()
    assert "APIKeyHeader" in schema["components"]["securitySchemes"]
    responses = schema["paths"]["/v1/admin/cost-matrices"]["post"]["responses"]
    assert "application/problem+json" in responses["409"]["content"]
    assert "text/csv" in schema["paths"]["/v1/admin/cost-matrices/import"]["post"]["requestBody"]["content"]
    assert env.client.get("/docs").status_code == 200


def test_metrics_do_not_take_unknown_methods_as_labels(env: ApiEnv) -> None:
    for method in ("PROPFIND", "FOO1", "FOO2"):  # scanners: each must not become a label value of its own
        assert env.client.request(method, "/healthz").status_code == 405
    text = env.client.get("/metrics").text
    assert 'rxverify_http_requests_total{method="OTHER",route="/healthz",status="405"} 3.0' in text
    assert "PROPFIND" not in text and "FOO1" not in text


def test_a_client_that_leaves_mid_upload_is_a_499_not_a_server_error(
        env: ApiEnv, caplog: pytest.LogCaptureFixture) -> None:
    """A dropped connection while the photo streams in: logged at INFO and counted as 499, no traceback."""
    import asyncio

    messages = iter([{"type": "http.request", "body": b"--b\r\nContent-Disposition: form-data; name=",
                      "more_body": True}, {"type": "http.disconnect"}])
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return next(messages)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    headers = [(b"x-api-key", env.as_role("client")["X-API-Key"].encode()),
               (b"content-type", b"multipart/form-data; boundary=b"), (b"content-length", b"100000")]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/verifications", "raw_path": b"/v1/verifications", "query_string": b"", "root_path": "",
             "headers": headers, "client": ("127.0.0.1", 1), "server": ("testserver", 80), "app": env.client.app}
    with caplog.at_level(logging.INFO):
        asyncio.run(env.client.app(scope, receive, send))
    assert sent[0]["status"] == 499
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
    assert any("client disconnected" in r.getMessage() for r in caplog.records)
    text = env.client.get("/metrics").text
    assert 'rxverify_http_requests_total{method="POST",route="/v1/verifications",status="499"} 1.0' in text



def test_probes_answer_while_every_request_thread_waits_on_the_database(env: ApiEnv) -> None:
    """Sync routes run in a bounded threadpool; when all of its threads wait on a slow database, /healthz
    must still answer (else a liveness probe restarts every replica in a database incident) and /readyz
    within its timeout. Here the pool has one thread and a route holds it."""
    import threading

    import anyio

    release, entered = threading.Event(), threading.Event()

    def hold() -> dict[str, bool]:
        entered.set()
        release.wait(10)
        return {"released": True}

    env.client.app.add_api_route("/_test/hold", hold)
    env.client.app.state.model_ready = True

    async def one_thread() -> float:
        limiter = anyio.to_thread.current_default_thread_limiter()
        total, limiter.total_tokens = limiter.total_tokens, 1
        return total

    tokens = env.client.portal.call(one_thread)
    held = threading.Thread(target=env.client.get, args=("/_test/hold",))
    held.start()
    try:
        assert entered.wait(5)
        started = time.perf_counter()
        assert env.client.get("/healthz").status_code == 200
        ready = env.client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["database"]["ok"] is True
        assert env.client.get("/metrics").status_code == 200
        assert time.perf_counter() - started < env.settings.readiness_timeout_s + 1
    finally:
        release.set()
        held.join(10)

        async def restore() -> None:
            anyio.to_thread.current_default_thread_limiter().total_tokens = tokens

        env.client.portal.call(restore)


def test_readyz_names_a_schema_left_at_an_older_migration(sqlite_settings: Settings, make_client: Any) -> None:
    """A deploy whose `rxverify migrate` did not run would answer some routes and 500 on others."""
    from app import migrate

    migrate.downgrade(sqlite_settings, "0001")
    client = make_client(sqlite_settings)
    client.app.state.model_ready = True
    body = client.get("/readyz").json()
    assert body["ready"] is False and "run `rxverify migrate`" in body["database"]["error"]
    migrate.upgrade(sqlite_settings)
    assert client.get("/readyz").json()["ready"] is True

