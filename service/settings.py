"""One typed settings object, from command-line flags and `ICS_*` environment variables.

Built on pydantic-settings: every field is a flag (`--max-urls-per-task`) and an environment
variable with the common prefix (`ICS_MAX_URLS_PER_TASK`); a flag wins over the variable,
the variable over the default. Values are validated once, at start-up, with a usage error
(exit status 2) for anything wrong; the models file is parsed then too, and only then.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn

from pydantic import Field, PrivateAttr, ValidationError, model_validator
from pydantic_settings import BaseSettings, CliApp, CliSettingsSource, SettingsConfigDict, SettingsError

from inference.onnx_cache import default_cache_dir
from inference.specs import (
    DEFAULT_MODEL,
    ONNX_RUNTIMES,
    CatalogError,
    ModelSpec,
    Precision,
    Runtime,
    RuntimeChoice,
    cpu_flags,
    declared_specs,
    resolve_precision,
    resolve_runtime,
)
from service.fetch.fetcher import DownloadTimeouts, FetchLimits
from service.fetch.policy import AddressPolicy
from service.webhooks.signing import standard_key

PROGRAM = "run_service.py"
ENV_PREFIX = "ICS_"

Count = Annotated[int, Field(ge=1)]
NonNegative = Annotated[int, Field(ge=0)]
Seconds = Annotated[float, Field(ge=0)]
PositiveSeconds = Annotated[float, Field(gt=0)]

StoreKind = Literal["redis", "sqlite", "memory"]  # where tasks live (`service.backend` opens it)


# What a standalone worker (`run_worker.py`, `ics-worker`) reads; its `--help` shows only these.
# It accepts the others too, so that web replicas and workers can share one environment.
WORKER_SETTINGS = frozenset(
    {
        "host", "metrics_port", "log_format", "redis", "redis_prefix", "serve_models",
        "workers", "threads_per_worker", "worker_nice", "runtime", "precision", "refine_margin",
        "calibration_dir",
        "model_cache_dir", "default_model", "models", "models_file", "max_loaded_models",
        "batch_size", "batch_wait_ms", "batch_timeout", "max_image_pixels", "claim_idle", "max_deliveries",
    }
)  # fmt: skip


def available_cores() -> int:
    return len(os.sched_getaffinity(0))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        frozen=True,
        extra="forbid",
        cli_prog_name=PROGRAM,
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_show_env_vars=True,
        cli_hide_none_type=True,
        cli_avoid_json=True,
    )

    host: str = Field("0.0.0.0", description="interface to listen on")
    port: Annotated[int, Field(ge=0, le=65535)] = Field(8080, description="TCP port to listen on")
    workers: NonNegative | None = Field(
        None,
        description="inference worker processes (default: one per available core); 0 = none, a web-only replica "
        "(with --redis: workers elsewhere classify)",
    )
    threads_per_worker: NonNegative = Field(0, description="torch threads per worker; 0 = cores / workers (at least 1)")
    worker_nice: Annotated[int, Field(ge=0, le=19)] = Field(
        5, description="niceness added to workers, so the event loop stays responsive under load"
    )
    runtime: RuntimeChoice = Field(
        "auto",
        description="inference engine: auto (openvino where the CPU computes bf16 natively, else onnx), openvino, "
        "onnx (both run a cached ONNX export without torch), or a torch one: eager, channels_last, torchscript, "
        "compile",
    )
    precision: Precision = Field(
        "auto",
        description="inference precision: auto (bf16 where the CPU has avx512_bf16 or AMX and the runtime is "
        "openvino, else fp32), fp32, bf16 or int8 (openvino on a CPU with VNNI; calibrated once per model, see "
        "--calibration-dir); a model in the models file may set its own",
    )
    refine_margin: Annotated[float, Field(ge=0, le=100)] | None = Field(
        None,
        description="with bf16 or int8: an image whose two best logits are closer than this is classified again in "
        "fp32 (0 = never); keeps the top-1 the same as fp32's where fp32 itself is not torn between two labels; "
        "default: 0.2 for bf16, 0.15 for int8 (chosen by measured agreement, see docs/models.md)",
    )
    calibration_dir: Path | None = Field(
        None,
        description="images to calibrate int8 models on (at least 30; every third is held out to measure the "
        "agreement with fp32); default: a diverse set made of the photos the service ships",
    )
    model_cache_dir: Path = Field(
        default_cache_dir(),
        description="directory for the models' ONNX exports, made once per weights file and shared by instances",
    )
    default_model: str = Field(
        DEFAULT_MODEL, description="model used when a request names none (a declared model's name)"
    )
    models: str = Field(
        "", description="comma-separated torchvision models to offer, e.g. resnet50,mobilenet_v3_large:IMAGENET1K_V2"
    )
    models_file: str = Field(
        "", description="TOML file declaring more models (checkpoints, torchvision); see docs/models.md"
    )
    max_loaded_models: Count = Field(
        3, description="models each worker keeps loaded, the default included (least recently used go)"
    )
    prefetch: str = Field("", description="download these torchvision models' weights into $TORCH_HOME, then exit")
    default_top_k: Count = Field(5, description="labels per image when a request gives no top_k")
    max_top_k: Count = Field(20, description="largest top_k a request may ask for")
    max_urls_per_task: Count = Field(1000, description="most URLs one task may hold")
    max_url_length: Count = Field(2048, description="longest accepted URL, in characters")
    max_request_bytes: Count = Field(1_048_576, description="largest accepted request body, in bytes")
    max_active_images: Count = Field(
        20_000, description="unfinished images across all tasks before /submit answers 429"
    )
    max_active_images_per_key: Count | None = Field(
        None,
        description="unfinished images one API key may have (without API keys: all callers together) before its "
        "submits answer 429 key_quota_exceeded; default: no limit but --max-active-images",
    )
    download_concurrency: Count = Field(32, description="downloads in flight across all tasks")
    connect_timeout: Seconds = Field(5.0, description="seconds to connect to an image host (DNS included)")
    read_timeout: Seconds = Field(10.0, description="seconds to wait for any bytes from an image host")
    download_timeout: Seconds = Field(30.0, description="seconds one image download may take in total")
    max_image_bytes: Count = Field(20_971_520, description="largest image body, in bytes")
    max_upload_bytes: Count = Field(
        268_435_456,
        description="uploaded image bytes held at once, across all requests and tasks (beyond it /submit answers 429)",
    )
    max_image_pixels: Count = Field(40_000_000, description="largest image, in pixels (width x height)")
    max_redirects: NonNegative = Field(5, description="redirects followed per image download")
    batch_size: Count | None = Field(
        None,
        description="images per forward pass; default: 8 for openvino and onnx (measured faster per image than 16 "
        "at every precision: the activations stay in cache), 16 for the torch runtimes. A batch handed to a worker "
        "holds up to two passes",
    )
    batch_wait_ms: Seconds = Field(10.0, description="how long a partial batch waits for more images")
    max_queued_images: Count = Field(256, description="downloaded images waiting for the model (bounds memory)")
    log_format: Literal["text", "json"] = Field("text", description="log lines as text or json")
    max_connections: NonNegative = Field(
        0,
        description="client connections open at once (beyond it a new one gets 503 and is closed); 0 = as many as "
        "the descriptor limit allows, keeping descriptors for downloads, the store and the workers, at most 10000",
    )
    header_timeout: PositiveSeconds = Field(
        20.0, description="seconds a client has to send a request's headers, extended while they arrive at --min-rate"
    )
    header_timeout_max: PositiveSeconds = Field(
        40.0, description="seconds a request's headers may take however steadily they arrive"
    )
    body_timeout: PositiveSeconds = Field(
        20.0, description="seconds a client has to send a request's body, extended while it arrives at --min-rate"
    )
    min_rate: Count = Field(
        500, description="bytes per second that earn a slow client one more second (headers and body)"
    )
    keepalive_timeout: PositiveSeconds = Field(
        15.0, description="seconds an idle connection stays open between requests"
    )
    send_timeout: PositiveSeconds = Field(
        30.0, description="seconds a client may leave its response unread (an event stream too) before it is dropped"
    )
    shutdown_timeout: Seconds = Field(10.0, description="seconds to finish open requests on shutdown")
    shutdown_grace: Seconds = Field(
        30.0, description="seconds active tasks may keep running after SIGTERM before they are cancelled"
    )
    allow_private_networks: bool = Field(
        False, description="let downloads reach loopback, private and other non-public addresses"
    )
    allowed_networks: str = Field("", description="comma-separated CIDRs downloads may reach even though not public")
    batch_timeout: Seconds = Field(
        120.0,
        description="seconds a batch may take once handed to the workers (one other batch may run first) "
        "before they are recycled and its images fail",
    )
    store: Literal["sqlite", "memory"] = Field(
        "sqlite", description="where tasks are kept: sqlite (in --data-dir; they survive restarts) or memory"
    )
    redis: str = Field(
        "",
        description="redis://HOST:6379/0: keep tasks in this Redis and queue images there for any worker "
        "(run_worker.py) to classify; web replicas sharing it answer for each other's tasks (instead of --store)",
    )
    redis_prefix: str = Field("ics:", description="prefix of every Redis key the service uses")
    metrics_port: Annotated[int, Field(ge=1, le=65535)] | None = Field(
        None,
        description="run_worker.py: serve /metrics, /healthz and /readyz on this port (on --host); default: off, "
        "so that several workers on one machine need no port each",
    )
    lease: PositiveSeconds = Field(
        10.0, description="seconds a web replica's hold on its tasks lasts unrenewed; then another replica adopts them"
    )
    claim_idle: PositiveSeconds = Field(
        30.0,
        description="seconds images a worker took may go unrenewed (a worker renews them while it works) before "
        "another worker claims them",
    )
    max_deliveries: Count = Field(
        3, description="times an image is handed to workers before it fails as worker_crashed"
    )
    serve_models: str = Field(
        "", description="run_worker.py: comma-separated models this worker classifies (default: every declared one)"
    )
    data_dir: Path = Field(
        Path("data"), description="directory for the task database and uploads waiting to be classified"
    )
    finished_task_ttl: Seconds = Field(3600.0, description="seconds a finished task stays visible")
    max_finished_tasks: NonNegative = Field(10_000, description="finished tasks kept at most (oldest evicted first)")
    api_keys: str = Field(
        "",
        repr=False,
        description="comma-separated API keys; when set, every endpoint but the probes and the API docs needs one "
        "(prefer the variable: flags show in ps)",
    )

    webhook_secret: str = Field(
        "",
        repr=False,
        description="key of the HMAC-SHA256 signatures on completion webhooks (Standard Webhooks: a whsec_ secret "
        "is base64 after the prefix); without it, a submit with a "
        "callback_url is refused (prefer the variable: flags show in ps)",
    )
    webhook_timeout: PositiveSeconds = Field(10.0, description="seconds one webhook delivery attempt may take")
    webhook_retry_for: Seconds = Field(
        3600.0, description="seconds after a task ends that its webhook is retried (backoff 1 s doubling to 5 min)"
    )
    max_wait: Annotated[int, Field(ge=0, le=600)] = Field(
        60,
        description="longest wait, in seconds, a submit's `Prefer: wait=N` header may ask for (the answer is then "
        "the finished task if it ends in time); 0 = never wait",
    )
    idempotency_ttl: PositiveSeconds = Field(
        86_400.0, description="seconds an Idempotency-Key of POST /submit stands for the task it created"
    )

    _model_specs: list[ModelSpec] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _check_together(self) -> Settings:
        """What no single field can check: the declared models, the network list, top_k."""
        try:
            self.address_policy()
        except ValueError as exc:
            raise ValueError(f"--allowed-networks: {exc}") from None
        if self.header_timeout_max < self.header_timeout:
            raise ValueError("--header-timeout-max must not be below --header-timeout")
        if self.default_top_k > self.max_top_k:
            raise ValueError("--default-top-k must not exceed --max-top-k")
        if self.workers == 0 and not self.redis:
            raise ValueError("--workers 0 (a web-only replica) needs --redis, where workers elsewhere take the images")
        try:
            standard_key(self.webhook_secret)
        except ValueError as exc:
            raise ValueError(f"--webhook-secret: {exc}") from None
        if self.redis and not self.redis.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("--redis must be a redis://, rediss:// or unix:// URL")
        if self.calibration_dir is not None and not self.calibration_dir.is_dir():
            raise ValueError(f"--calibration-dir {self.calibration_dir} is not a directory")
        try:
            specs = [self.resolve_precision(spec) for spec in declared_specs(self.models, self.models_file)]
        except CatalogError as exc:
            raise ValueError(f"models: {exc}") from None
        names = [spec.name for spec in specs]
        if self.default_model not in names:
            raise ValueError(f"--default-model {self.default_model!r} is not declared; declared: {', '.join(names)}")
        unknown = set(self.serve_model_list()) - set(names)
        if unknown:
            raise ValueError(f"--serve-models: {', '.join(sorted(unknown))} not declared; declared: {', '.join(names)}")
        self._model_specs = specs
        return self

    def store_kind(self) -> StoreKind:
        return "redis" if self.redis else self.store

    def serve_model_list(self) -> list[str]:
        return _split(self.serve_models)

    def model_specs(self) -> list[ModelSpec]:
        """The declared models (parsed once, when the settings were validated)."""
        return list(self._model_specs)

    def resolve_precision(self, spec: ModelSpec) -> ModelSpec:
        """`spec` with the precision it runs at (see inference.specs.resolve_precision)."""
        flags = cpu_flags()
        return resolve_precision(spec, resolve_runtime(self.runtime, flags), self.precision, flags)

    def resolved_runtime(self) -> Runtime:
        return resolve_runtime(self.runtime, cpu_flags())

    def address_policy(self) -> AddressPolicy:
        """Where downloads and webhooks may connect."""
        return AddressPolicy.from_strings(self.allow_private_networks, self.allowed_network_list())

    def fetch_limits(self) -> FetchLimits:
        return FetchLimits(self.max_image_bytes, self.max_redirects, self.max_url_length)

    def download_timeouts(self) -> DownloadTimeouts:
        return DownloadTimeouts(self.download_timeout, self.connect_timeout, self.read_timeout)

    def allowed_network_list(self) -> list[str]:
        return _split(self.allowed_networks)

    def api_key_list(self) -> list[str]:
        return _split(self.api_keys)

    def resolved_workers(self) -> int:
        return available_cores() if self.workers is None else self.workers

    def resolved_batch_size(self) -> int:
        if self.batch_size is not None:
            return self.batch_size
        return 8 if self.resolved_runtime() in ONNX_RUNTIMES else 16

    def resolved_threads(self) -> int:
        return self.threads_per_worker or max(1, available_cores() // max(1, self.resolved_workers()))


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def load_settings(
    argv: Sequence[str] | None = None, program: str = PROGRAM, shown: Collection[str] | None = None
) -> Settings:
    """Settings from `argv` (default: the process's arguments) and the environment; a bad
    value exits with a usage error (status 2), as argparse does. `shown` narrows what
    `--help` lists to those fields (a worker's); every flag is still accepted."""
    args = list(sys.argv[1:] if argv is None else argv)
    source: CliSettingsSource[Settings] = CliSettingsSource(
        Settings, cli_prog_name=program, add_argument_method=_adder(shown)
    )
    try:
        return CliApp.run(Settings, cli_args=args, cli_settings_source=source)
    except ValidationError as exc:
        problems = [_problem(error["loc"], error["msg"]) for error in exc.errors(include_url=False)]
        usage_error("; ".join(problems), program)
    except SettingsError as exc:
        usage_error(str(exc), program)


def _adder(shown: Collection[str] | None) -> Callable[..., Any]:
    """argparse's `add_argument`, hiding from `--help` the flags of fields not in `shown`."""
    visible = None if shown is None else {f"--{name.replace('_', '-')}" for name in shown}

    def add_argument(parser: Any, *names: str, **options: Any) -> Any:
        if visible is not None and not visible.intersection(names) and "--help" not in names:
            options["help"] = argparse.SUPPRESS
        return parser.add_argument(*names, **options)

    return add_argument


def _problem(loc: tuple[int | str, ...], message: str) -> str:
    message = message.removeprefix("Value error, ")
    if not loc:
        return message
    name = str(loc[0])
    return f"--{name.replace('_', '-')} (env {ENV_PREFIX}{name.upper()}): {message}"


def usage_error(message: str, program: str = PROGRAM) -> NoReturn:
    print(f"usage: {program} [-h] [options]\n{program}: error: {message}", file=sys.stderr)
    raise SystemExit(2)
