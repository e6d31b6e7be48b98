"""docker-compose.yml and Dockerfile, checked by parsing (no Docker engine runs here)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.config import Settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


# Compose's variable syntax as far as docker-compose.yml uses it: ${NAME}, ${NAME:-default}, ${NAME:?error}.
_VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:[-?])(?P<arg>[^}]*))?\}")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Substitute compose variables in every string of `value`, raising where compose would refuse to start."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        name, op, arg = match.group("name", "op", "arg")
        if env.get(name):
            return env[name]
        if op == ":?":
            raise LookupError(f"{name}: {arg}")
        return arg if op == ":-" else ""

    return _VARIABLE.sub(substitute, value)


def _command(service: dict[str, Any]) -> str:
    command = service["command"]
    return " ".join(command) if isinstance(command, list) else str(command)


def test_services_and_dependencies(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"postgres", "redis", "migrate", "api", "worker"}
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert services["migrate"]["restart"] == "no"
    for name in ("api", "worker"):
        assert services[name]["depends_on"] == {"migrate": {"condition": "service_completed_successfully"},
                                                "postgres": {"condition": "service_healthy"},
                                                "redis": {"condition": "service_healthy"}}


def test_healthchecks(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert "/healthz" in " ".join(services["api"]["healthcheck"]["test"])
    # A solo-pool worker answers no `celery inspect ping` while it trains: the check reads the file a
    # thread of the worker keeps fresh instead (tests/worker/test_liveness.py runs that command).
    worker = services["worker"]
    assert worker["healthcheck"]["test"] == ["CMD", "python", "-m", "worker.liveness", "--max-age-s", "60"]
    assert worker["environment"]["RXVERIFY_WORKER_ALIVE_FILE"].startswith("/tmp/")
    assert "inspect ping" not in str(worker["healthcheck"])
    # Its metrics listen on the compose network, on the port it declares, and are not published on the host.
    port = worker["environment"]["RXVERIFY_WORKER_METRICS_PORT"]
    assert worker["expose"] == [port] and worker["environment"]["RXVERIFY_WORKER_METRICS_HOST"] == "0.0.0.0"
    assert "ports" not in worker


def test_rxverify_processes_are_not_pid_1(compose: dict[str, Any]) -> None:
    """PID 1 cannot end itself with a signal: the worker's hard time limit needs an init process."""
    for name in ("migrate", "api", "worker"):
        assert compose["services"][name]["init"] is True


def test_commands(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert "rxverify migrate" in _command(services["migrate"])
    assert "rxverify catalog seed-pmi" in _command(services["migrate"])
    assert services["api"]["command"] == ["rxverify", "serve", "--host", "0.0.0.0", "--port", "8000"]
    assert interpolate(services["api"]["ports"], {}) == ["127.0.0.1:8000:8000"]
    assert interpolate(services["api"]["ports"], {"API_BIND": "0.0.0.0"}) == ["0.0.0.0:8000:8000"]
    worker = _command(services["worker"])
    assert worker.startswith("rxverify worker") and "--pool solo" in worker and "training" in worker


def test_worker_reserves_a_gpu(compose: dict[str, Any]) -> None:
    devices = compose["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert compose["services"]["worker"]["environment"]["RXVERIFY_DEVICE"] == "cuda"


def test_database_password_is_required_not_written_down(compose: dict[str, Any]) -> None:
    """No password lives in the file: compose refuses to start until POSTGRES_PASSWORD is set."""
    for name in ("postgres", "migrate", "api", "worker"):
        with pytest.raises(LookupError, match="POSTGRES_PASSWORD"):
            interpolate(compose["services"][name]["environment"], {})
    example = (ROOT / "deploy.env.example").read_text()
    assert re.search(r"^POSTGRES_PASSWORD=$", example, re.MULTILINE)
    for ignore_file in (".gitignore", ".dockerignore"):
        assert ".env" in (ROOT / ignore_file).read_text().splitlines()


def test_environment_wiring(compose: dict[str, Any], tmp_path: Path) -> None:
    services = interpolate(compose["services"], {"POSTGRES_PASSWORD": "0123abcd"})
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == "0123abcd"
    postgres = services["postgres"]["environment"]
    expected_db = (f"postgresql+psycopg://{postgres['POSTGRES_USER']}:{postgres['POSTGRES_PASSWORD']}"
                   f"@postgres:5432/{postgres['POSTGRES_DB']}")
    for name in ("migrate", "api", "worker"):
        env = services[name]["environment"]
        assert env["RXVERIFY_DATABASE_URL"] == expected_db
        assert env["RXVERIFY_BROKER_URL"].startswith("redis://redis:6379/")
        assert env["RXVERIFY_DATA_DIR"] == "/data" and env["RXVERIFY_LOG_FORMAT"] == "json"
        assert "rxverify-data:/data" in services[name]["volumes"]
        # Every variable is a real setting, and together they validate.
        fields = {f"RXVERIFY_{name.upper()}" for name in Settings.model_fields}
        assert set(env) <= fields
        values = {key.removeprefix("RXVERIFY_").lower(): value for key, value in env.items()}
        values["data_dir"] = tmp_path
        Settings(**values)
    assert {"rxverify-data", "postgres-data", "redis-data"} <= set(compose["volumes"])


def test_dockerfile() -> None:
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()
             if line.strip() and not line.strip().startswith("#")]
    assert lines[0] == "FROM python:3.11-slim"
    text = "\n".join(lines)
    assert "pip install -c constraints.txt" in text and "pip install --no-deps ." in text
    users = [line for line in lines if line.startswith("USER ")]
    assert users and users[-1] != "USER root"
    assert "EXPOSE 8000" in lines and "HEALTHCHECK" in text and "/healthz" in text
    assert lines[-1] == 'CMD ["rxverify", "serve", "--host", "0.0.0.0", "--port", "8000"]'
    for path in ("app", "worker", "models", "migrations"):
        assert f"COPY {path} ./{path}" in lines


def test_the_build_context_leaves_out_keys_and_the_local_environment() -> None:
    """Without .dockerignore every build sent the 5.9 GB .venv and var/ (the demo API keys) to the daemon."""
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".venv", "var", ".git"} <= ignored
    copied = {line.split()[1] for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("COPY ")}
    assert not copied & ignored  # nothing the image copies is left out of the context
