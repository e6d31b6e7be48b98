"""Settings: the one object that reads the environment (prefix `RXVERIFY_`); app/ and worker/ both use it."""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

LogFormat = Literal["json", "text"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
DemoArch = Literal["tiny_cnn", "resnet9", "resnet18", "resnet34", "resnet50"]


class Settings(BaseSettings):
    """Every tunable of rxverify; URLs left unset are derived from `data_dir` (the embedded default)."""

    model_config = SettingsConfigDict(env_prefix="RXVERIFY_", frozen=True, extra="ignore")

    # --- storage: everything stateful lives under data_dir unless a URL says otherwise ----------
    data_dir: Path = Field(default=Path("./var"), description="Holds the embedded DB, broker, checkpoints, images.")
    database_url: str = Field(default="", description="SQLAlchemy URL; default sqlite:///<data_dir>/rxverify.db.")
    broker_url: str = Field(default="", description="Celery broker; default sqla+sqlite:///<data_dir>/broker.sqlite.")
    result_backend: str = Field(default="", description="Celery results; default db+sqlite:///<data_dir>/results.sqlite.")
    redis_url: str | None = Field(default=None, description="Redis for 'model promoted' pub/sub; unset = poll only.")
    notification_channel: str = "rxverify:model-promoted"
    redis_key_prefix: str = Field(default="", description="Prefix for every Celery key in Redis (shared Redis).")
    db_pool_size: int = Field(default=5, ge=1)
    db_max_overflow: int = Field(default=10, ge=0)
    db_connect_timeout_s: int = Field(default=10, ge=1, description="PostgreSQL connect timeout.")
    db_statement_timeout_ms: int = Field(default=30_000, ge=0, description="PostgreSQL: a statement still running (waits for locks included) after this long is cancelled, and its request answers 503 database-unavailable instead of holding a request thread; 0 turns it off. Migrations run without it.")
    db_busy_timeout_ms: int = Field(default=5000, ge=0, description=(
        "How long a SQLite writer waits, first for the in-process write queue and then for SQLite's own lock, "
        "before a 503 ('database is locked')."))

    # --- HTTP service -------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    max_request_body_bytes: int = Field(default=12 * 1024 * 1024, ge=1024, description="The body of a verification (POST /v1/verifications: the photo and its form); 413 above.")
    max_small_body_bytes: int = Field(default=2 * 1024 * 1024, ge=1024, description="The body of every other request (JSON, a cost-matrix CSV); 413 above. Their largest legitimate bodies, a cost-matrix edit of 10,000 changes, are about 1 MB; a larger limit only lets a key holder make the API parse and validate more.")
    max_request_header_bytes: int = Field(default=64 * 1024, ge=4096, le=16 * 1024 * 1024, description="The request line and headers together; a longer one is refused with 400 before it is held in memory (uvicorn's h11 parser).")
    readiness_timeout_s: float = Field(default=2.0, gt=0, description="Per-dependency timeout of /readyz checks.")

    # --- logging ------------------------------------------------------------------------------
    log_format: LogFormat = "json"
    log_level: LogLevel = "INFO"

    # --- images and verification -------------------------------------------------------------
    max_upload_bytes: int = Field(default=10 * 1024 * 1024, ge=1, description="Largest accepted image file.")
    max_image_pixels: int = Field(default=40_000_000, ge=1, description="Decompression-bomb guard (width*height).")
    min_image_side: int = Field(default=32, ge=1, le=4096, description="Photos with a shorter side (in pixels, as stored) are refused with 422 image-too-small instead of being verified.")
    min_image_contrast: float = Field(default=2.0, ge=0, le=128, description="Photos whose grey levels vary less than this (standard deviation, 0-255 scale) are refused with 422 image-blank: a covered lens or a white frame has no bottle to verify, and the model would still name a product. 0 turns the check off.")
    max_concurrent_decodes: int = Field(default=4, ge=1, description="Uploads decoded at once per API process; the others wait their turn (a decode holds about max_image_pixels x 4 bytes for an RGB photo, x 8 for a PNG or WebP with an alpha channel: 153 and 305 MiB measured for 6320x6320 PNGs).")
    allowed_image_formats: Annotated[tuple[str, ...], NoDecode] = ("JPEG", "PNG", "WEBP")
    retain_images: bool = Field(default=False, description="Also store verification images (not only their SHA-256).")

    # --- inference engine -----------------------------------------------------------------------
    max_batch_size: int = Field(default=16, ge=1)
    max_batch_wait_ms: float = Field(default=5.0, ge=0)
    inference_queue_size: int = Field(default=256, ge=1, description="Bounded queue; full = 503 Retry-After.")
    max_verifications_in_flight: int = Field(default=64, ge=1, description="Verification requests one API process takes on at once, counted from before the upload is read; one more gets 503 inference-queue-full with Retry-After at once, instead of waiting behind the others with its upload in memory (up to max_upload_bytes each).")
    torch_threads: int | None = Field(default=None, ge=1, description="CPU threads for torch; unset = torch default.")
    inference_workers: int = Field(default=1, ge=1, description="Batches computed at once, each on its own torch thread: 1 for a GPU; on a CPU host with spare cores, more (with torch_threads x inference_workers <= cores).")
    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N")
    inference_amp: bool = Field(default=False, description="Serve under bf16 autocast on CUDA (no effect on a CPU). Off: the verdict thresholds were fitted on float32 outputs, and on an H100 bf16 moved probabilities by up to 0.04 and was not faster for these models at batch 16.")
    inference_channels_last: Literal["auto", "true", "false"] = Field(default="auto", description="Memory layout of the served model's weights and inputs: auto = channels-last on a CPU (faster there) and on CUDA only with RXVERIFY_INFERENCE_AMP; true or false forces it. `rxverify bench service` times both forms on the device.")
    model_poll_seconds: float = Field(default=2.0, gt=0, description="Fallback poll for the active model version "
                                      "(the only signal in embedded mode: promotion to serving within 5 s).")

    # --- costs and promotion ----------------------------------------------------------------
    max_cost: float = Field(default=1000.0, gt=0, description="Largest cost a pharmacist may enter.")
    critical_cost_threshold: float = Field(default=5.0, gt=0, description="A pair at least this costly is critical.")
    max_accept_risk: float = Field(default=0.05, gt=0, description="Ceiling on the expected cost of auto-accepting a fill (sum over y != r of p(y) c(y, r)): a riskier fill goes to review, whatever threshold was fitted on validation. With every error costing 1 it is the largest chance of a wrong product a `match` may carry; a critical substitute (cost 10) may carry a tenth of it.")
    unfamiliar_photo_rate: float = Field(default=0.01, ge=0, lt=0.5, description="Share of ordinary photos (exchangeable with the model's validation photos) that the unfamiliar-photo check may send to review (`photo-unfamiliar`); the thresholds on the model's feature stages are conformal quantiles for it. Larger catches more photos unlike the training photos (empty vials, other objects, untrained products). 0 turns the check off.")
    promotion_max_accuracy_drop: float = Field(default=0.5, ge=0, description="Percentage points the gate allows.")
    auto_promote: bool = Field(default=False, description="Default of a training job's auto_promote.")

    # --- Celery --------------------------------------------------------------------------------
    default_queue: str = "default"
    training_queue: str = "training"
    task_soft_time_limit_s: int = Field(default=6 * 3600, ge=1, description="Soft limit: the task checkpoints.")
    task_time_limit_s: int = Field(default=6 * 3600 + 600, ge=1, description="Hard limit: the task is killed.")
    broker_visibility_timeout_s: int = Field(default=8 * 3600, ge=1, description="Must exceed the hard limit.")
    worker_max_tasks_per_child: int = Field(default=20, ge=1, description="Recycle prefork children.")
    training_lease_s: float = Field(default=60.0, ge=1, description="DB lease of a running training job; renewed "
                                    "every third of it, and an expired lease lets the reaper requeue the job.")
    training_max_worker_losses: int = Field(default=3, ge=1, description="A job whose worker dies (killed, out of "
                                            "memory) this many times in a row without a new epoch checkpoint is "
                                            "failed instead of requeued.")
    worker_alive_file: Path | None = Field(default=None, description="When set, a worker rewrites this file every "
                                           "10 s, training or not; `python -m worker.liveness` exits 0 while it "
                                           "is under 60 s old (the compose worker's health check).")
    worker_metrics_port: int | None = Field(default=None, ge=1, le=65535, description="When set, a worker serves "
                                            "its Prometheus metrics (job outcomes and durations, the running "
                                            "job's progress, loss and attack success, reaper actions) on this "
                                            "port at /metrics. Off by default.")
    worker_metrics_host: str = Field(default="127.0.0.1", min_length=1, description="Address the worker's "
                                     "metrics listen on (0.0.0.0 in a container).")

    # --- first run (`rxverify up`, `make run`): the synthetic demo dataset and baseline model --------
    demo_per_class: int = Field(default=200, ge=6, description="Synthetic photos of the largest class, all "
                                "splits together (others scale by the paper's Table 8).")
    demo_photo_size: int = Field(default=64, ge=16, le=1024, description="Height in px of the synthetic photos.")
    demo_arch: DemoArch = Field(default="resnet18", description="Architecture of the demo baseline.")
    demo_image_size: int = Field(default=64, ge=8, le=512, description="Input size in px of the demo baseline.")
    demo_epochs: int = Field(default=15, ge=1, le=1000, description="Training epochs of the demo baseline.")

    @field_validator("allowed_image_formats", mode="before")
    @classmethod
    def _split_formats(cls, value: Any) -> Any:
        # Operators write `JPEG,PNG`; JSON lists work too.
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return tuple(json.loads(text))
            return tuple(part for part in (p.strip() for p in text.split(",")) if part)
        return value

    @field_validator("allowed_image_formats", mode="after")
    @classmethod
    def _upper_formats(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one image format must be allowed")
        return tuple(fmt.upper() for fmt in value)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="before")
    @classmethod
    def _derive_from_data_dir(cls, data: Any) -> Any:
        # Derived defaults are filled here, so each field holds its final value and the object stays frozen.
        if not isinstance(data, dict):
            return data
        values = dict(data)
        data_dir = Path(values.get("data_dir") or "./var").expanduser().resolve()
        values["data_dir"] = data_dir
        defaults = {
            "database_url": f"sqlite:///{data_dir / 'rxverify.db'}",
            "broker_url": f"sqla+sqlite:///{data_dir / 'broker.sqlite'}",
            "result_backend": f"db+sqlite:///{data_dir / 'results.sqlite'}",
        }
        for key, default in defaults.items():
            if not values.get(key):
                values[key] = default
        if values.get("redis_url") == "":
            values["redis_url"] = None
        return values

    @model_validator(mode="after")
    def _check_limits(self) -> Settings:
        if self.task_time_limit_s <= self.task_soft_time_limit_s:
            raise ValueError("task_time_limit_s must exceed task_soft_time_limit_s (the soft limit checkpoints)")
        if self.broker_visibility_timeout_s <= self.task_time_limit_s:
            raise ValueError("broker_visibility_timeout_s must exceed task_time_limit_s, or long jobs are redelivered")
        if self.max_request_body_bytes < self.max_upload_bytes:
            raise ValueError("max_request_body_bytes must be at least max_upload_bytes")
        if self.default_queue == self.training_queue:
            raise ValueError("training_queue must differ from default_queue")
        return self

    # --- derived paths -------------------------------------------------------------------------
    @property
    def checkpoints_dir(self) -> Path:
        """Model checkpoints, addressed by SHA-256."""
        return self.data_dir / "checkpoints"

    @property
    def datasets_dir(self) -> Path:
        """Registered and generated datasets."""
        return self.data_dir / "datasets"

    @property
    def images_dir(self) -> Path:
        """Retained verification images."""
        return self.data_dir / "images"

    @property
    def keys_dir(self) -> Path:
        """Demo API keys written by `rxverify up` / `make run` (owner-only permissions)."""
        return self.data_dir / "keys"

    @property
    def is_sqlite(self) -> bool:
        """True for the embedded SQLite database."""
        return self.database_url.startswith("sqlite")

    def ensure_dirs(self) -> None:
        """Create data_dir and its sub-directories (idempotent)."""
        for path in (self.data_dir, self.checkpoints_dir, self.datasets_dir, self.images_dir, self.keys_dir):
            path.mkdir(parents=True, exist_ok=True)
        self.keys_dir.chmod(0o700)  # API keys written there are readable by the owner only


def redacted_url(url: str) -> str:
    """A database or broker URL with its password hidden, for logs."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url.split("@")[-1] if "@" in url else url


# RXVERIFY_ variables that are not settings: read by one tool each (the naive server of `bench service`).
_OTHER_VARIABLES = frozenset({"RXVERIFY_BENCH_CHECKPOINT"})


def unknown_environment(environ: Mapping[str, str] | None = None) -> list[str]:
    """`RXVERIFY_` variables that no setting reads, each with the closest setting's name when one is near.

    Settings ignore unknown variables, so a typo (RXVERIFY_DATABSE_URL) would silently leave the default in
    place: the embedded SQLite database instead of PostgreSQL. The entry points log these as warnings.
    """
    prefix = Settings.model_config.get("env_prefix", "")
    known = {prefix + name.upper() for name in Settings.model_fields} | _OTHER_VARIABLES
    found = []
    for name in sorted(os.environ if environ is None else environ):
        if name.upper().startswith(prefix) and name.upper() not in known:
            near = difflib.get_close_matches(name.upper(), sorted(known), n=1, cutoff=0.8)
            found.append(f"{name} (did you mean {near[0]}?)" if near else name)
    return found


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment once (tests pass their own Settings)."""
    return Settings()
