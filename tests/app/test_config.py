"""Settings: embedded defaults under data_dir, environment overrides, validation."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.config import Settings, get_settings


def test_embedded_defaults_live_under_data_dir(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert settings.data_dir == tmp_path.resolve()
    assert settings.database_url == f"sqlite:///{tmp_path}/rxverify.db"
    assert settings.broker_url == f"sqla+sqlite:///{tmp_path}/broker.sqlite"
    assert settings.result_backend == f"db+sqlite:///{tmp_path}/results.sqlite"
    assert settings.redis_url is None
    assert (settings.checkpoints_dir, settings.datasets_dir, settings.images_dir, settings.keys_dir) == (
        tmp_path / "checkpoints", tmp_path / "datasets", tmp_path / "images", tmp_path / "keys")
    assert settings.is_sqlite


def test_ensure_dirs_keeps_keys_private(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    settings.ensure_dirs()
    assert all(p.is_dir() for p in (settings.checkpoints_dir, settings.datasets_dir, settings.images_dir))
    assert settings.keys_dir.stat().st_mode & 0o777 == 0o700


def test_two_data_dirs_share_nothing(tmp_path: Path) -> None:
    first, second = Settings(data_dir=tmp_path / "a"), Settings(data_dir=tmp_path / "b")
    for name in ("database_url", "broker_url", "result_backend", "checkpoints_dir", "images_dir"):
        assert getattr(first, name) != getattr(second, name)


def test_relative_data_dir_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert Settings(data_dir=Path("var")).data_dir == tmp_path / "var"


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RXVERIFY_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("RXVERIFY_DATABASE_URL", "postgresql+psycopg://u:p@db:5432/rx")
    monkeypatch.setenv("RXVERIFY_BROKER_URL", "redis://redis:6379/0")
    monkeypatch.setenv("RXVERIFY_ALLOWED_IMAGE_FORMATS", "jpeg, png")
    monkeypatch.setenv("RXVERIFY_LOG_LEVEL", "debug")
    monkeypatch.setenv("RXVERIFY_MAX_COST", "50")
    get_settings.cache_clear()
    settings = get_settings()
    assert settings.database_url == "postgresql+psycopg://u:p@db:5432/rx"
    assert settings.broker_url == "redis://redis:6379/0"
    assert settings.result_backend == f"db+sqlite:///{tmp_path}/results.sqlite"
    assert settings.allowed_image_formats == ("JPEG", "PNG")
    assert settings.log_level == "DEBUG"
    assert settings.max_cost == 50.0
    assert not settings.is_sqlite


def test_documented_defaults() -> None:
    settings = Settings()
    assert settings.log_format == "json"
    assert settings.promotion_max_accuracy_drop == 0.5
    assert settings.auto_promote is False
    assert settings.training_queue == "training"
    assert settings.broker_visibility_timeout_s > settings.task_time_limit_s > settings.task_soft_time_limit_s
    assert settings.max_request_body_bytes >= settings.max_upload_bytes


@pytest.mark.parametrize("overrides", [
    {"task_soft_time_limit_s": 100, "task_time_limit_s": 50},
    {"task_time_limit_s": 100, "task_soft_time_limit_s": 50, "broker_visibility_timeout_s": 60},
    {"max_upload_bytes": 10_000_000, "max_request_body_bytes": 1_000_000},
    {"training_queue": "default"},
    {"log_format": "xml"},
    {"max_cost": -1},
    {"allowed_image_formats": ""},
])
def test_invalid_settings_are_refused(overrides: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        Settings(**overrides)  # type: ignore[arg-type]


def test_settings_are_immutable() -> None:
    settings = Settings()
    with pytest.raises(ValidationError):
        settings.max_cost = 5  # type: ignore[misc]


def test_a_misspelt_variable_is_named_with_the_setting_it_was_meant_for(monkeypatch: pytest.MonkeyPatch,
                                                                          tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    """Settings ignore unknown variables; a typo would quietly keep the embedded SQLite database."""
    from app.config import unknown_environment
    from app.log import configure_logging

    environ = {"RXVERIFY_DATABSE_URL": "postgresql+psycopg://rx:secret@db/rx", "RXVERIFY_PORT": "8000",
               "RXVERIFY_BENCH_CHECKPOINT": "/x", "RXVERIFY_NOTHING_LIKE_IT": "1", "PATH": "/bin"}
    assert unknown_environment(environ) == ["RXVERIFY_DATABSE_URL (did you mean RXVERIFY_DATABASE_URL?)",
                                            "RXVERIFY_NOTHING_LIKE_IT"]
    monkeypatch.setenv("RXVERIFY_DATABSE_URL", "postgresql+psycopg://rx:secret@db/rx")
    with caplog.at_level(logging.WARNING, logger="app.config"):
        configure_logging(Settings(data_dir=tmp_path))
    assert ("RXVERIFY_DATABSE_URL (did you mean RXVERIFY_DATABASE_URL?) is not an rxverify setting and is ignored"
            in caplog.messages)
    assert not any("secret" in message for message in caplog.messages)


def test_urls_are_logged_without_their_passwords() -> None:
    from app.config import redacted_url

    assert redacted_url("postgresql+psycopg://rx:secret@db:5432/rx") == "postgresql+psycopg://rx:***@db:5432/rx"
    assert redacted_url("redis://:pw@redis:6379/0") == "redis://:***@redis:6379/0"
    assert redacted_url("sqla+sqlite:////data/broker.sqlite") == "sqla+sqlite:////data/broker.sqlite"
