"""One typed settings object, built from CLI flags with environment-variable defaults.

Every field is a flag (`--max-urls-per-task`) and an environment variable with the common
prefix (`ICS_MAX_URLS_PER_TASK`); a flag wins over the variable, the variable over the default.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields

from inference.catalog import DEFAULT_MODEL, DEFAULT_RUNTIME, RUNTIMES, CatalogError, declared_specs
from service.netpolicy import AddressPolicy

ENV_PREFIX = "ICS_"


def available_cores() -> int:
    return len(os.sched_getaffinity(0))


def _opt(default: object, help: str, secret: bool = False) -> object:
    return field(default=default, repr=not secret, metadata={"help": help})


@dataclass(frozen=True)
class Settings:
    host: str = _opt("0.0.0.0", "interface to listen on")
    port: int = _opt(8080, "TCP port to listen on")
    workers: int = _opt(0, "inference worker processes; 0 = one per available core")
    threads_per_worker: int = _opt(0, "torch threads per worker; 0 = cores / workers (at least 1)")
    worker_nice: int = _opt(5, "niceness added to workers, so the event loop stays responsive under load")
    runtime: str = _opt(DEFAULT_RUNTIME, f"inference engine: {', '.join(RUNTIMES)}")
    default_model: str = _opt(DEFAULT_MODEL, "model used when a request names none (a declared model's name)")
    models: str = _opt("", "comma-separated torchvision models to offer, e.g. resnet50,mobilenet_v3_large:IMAGENET1K_V2")
    models_file: str = _opt("", "TOML file declaring more models (checkpoints, torchvision); see the README")
    max_loaded_models: int = _opt(3, "models each worker keeps loaded, the default included (least recently used go)")
    prefetch: str = _opt("", "download these torchvision models' weights into $TORCH_HOME, then exit")
    default_top_k: int = _opt(5, "labels per image when a request gives no top_k")
    max_top_k: int = _opt(20, "largest top_k a request may ask for")
    max_urls_per_task: int = _opt(1000, "most URLs one task may hold")
    max_url_length: int = _opt(2048, "longest accepted URL, in characters")
    max_request_bytes: int = _opt(1_048_576, "largest accepted request body, in bytes")
    max_active_images: int = _opt(20_000, "unfinished images across all tasks before /submit answers 429")
    download_concurrency: int = _opt(32, "downloads in flight across all tasks")
    connect_timeout: float = _opt(5.0, "seconds to connect to an image host (DNS included)")
    read_timeout: float = _opt(10.0, "seconds to wait for any bytes from an image host")
    download_timeout: float = _opt(30.0, "seconds one image download may take in total")
    max_image_bytes: int = _opt(20_971_520, "largest image body, in bytes")
    max_upload_bytes: int = _opt(
        268_435_456, "uploaded image bytes held at once, across all requests and tasks (beyond it /submit answers 429)"
    )
    max_image_pixels: int = _opt(40_000_000, "largest image, in pixels (width x height)")
    max_redirects: int = _opt(5, "redirects followed per image download")
    batch_size: int = _opt(16, "images per forward pass")
    batch_wait_ms: float = _opt(10.0, "how long a partial batch waits for more images")
    max_queued_images: int = _opt(256, "downloaded images waiting for the model (bounds memory)")
    log_format: str = _opt("text", "log lines as text or json")
    shutdown_timeout: float = _opt(10.0, "seconds to finish open requests on shutdown")
    shutdown_grace: float = _opt(30.0, "seconds active tasks may keep running after SIGTERM before they are cancelled")
    allow_private_networks: bool = _opt(False, "let downloads reach loopback, private and other non-public addresses")
    allowed_networks: str = _opt("", "comma-separated CIDRs downloads may reach even though not public")
    batch_timeout: float = _opt(120.0, "seconds a batch may run before its worker is recycled and its images fail")
    finished_task_ttl: float = _opt(3600.0, "seconds a finished task stays visible")
    max_finished_tasks: int = _opt(10_000, "finished tasks kept at most (oldest evicted first)")
    api_keys: str = _opt(
        "", "comma-separated API keys; when set, every endpoint but /healthz and /readyz needs one", secret=True
    )

    def allowed_network_list(self) -> list[str]:
        return _split(self.allowed_networks)

    def api_key_list(self) -> list[str]:
        return _split(self.api_keys)

    def resolved_workers(self) -> int:
        return self.workers or available_cores()

    def resolved_threads(self) -> int:
        return self.threads_per_worker or max(1, available_cores() // self.resolved_workers())


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Async image-classification task service.",
        epilog=f"Every option can also be set by an environment variable: {ENV_PREFIX}<OPTION_NAME>.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for spec in fields(Settings):
        kind = type(spec.default)
        default = env.get(_env_name(spec.name), spec.default)
        help = f"{spec.metadata['help']} [env {_env_name(spec.name)}]"
        if kind is bool:
            # A string from the environment is checked in load_settings.
            parser.add_argument(
                _flag(spec.name), dest=spec.name, action=argparse.BooleanOptionalAction, default=default, help=help
            )
            continue
        parser.add_argument(
            _flag(spec.name),
            dest=spec.name,
            type=kind,
            default=default,  # argparse converts a string default with `type`, and reports errors
            # A secret's default (maybe from the environment) must not show in --help.
            help=help if spec.repr else f"{help}; prefer the variable: flags show in ps %(default).0s",
        )
    return parser


def load_settings(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> Settings:
    environ = os.environ if env is None else env
    parser = build_parser(environ)
    values = vars(parser.parse_args(argv))
    for spec in fields(Settings):
        value = values[spec.name]
        if type(spec.default) is bool and isinstance(value, str):
            if value.strip().lower() not in _TRUE | _FALSE:
                parser.error(f"{_env_name(spec.name)} must be true or false, not {value!r}")
            values[spec.name] = value.strip().lower() in _TRUE
    settings = Settings(**values)
    problems = validate(settings)
    if problems:
        parser.error("; ".join(problems))
    return settings


def validate(settings: Settings) -> list[str]:
    problems = []
    for spec in fields(Settings):
        value = getattr(settings, spec.name)
        if isinstance(value, (int, float)) and value < 0:
            problems.append(f"{_flag(spec.name)} must not be negative")
    for name in ("max_loaded_models", "default_top_k", "max_top_k", "max_urls_per_task", "download_concurrency",
                 "batch_size", "max_queued_images", "max_image_bytes", "max_upload_bytes", "max_image_pixels"):
        if getattr(settings, name) < 1:
            problems.append(f"{_flag(name)} must be at least 1")
    if settings.worker_nice > 19:
        problems.append("--worker-nice must be at most 19")
    try:
        AddressPolicy.from_strings(settings.allow_private_networks, settings.allowed_network_list())
    except ValueError as exc:
        problems.append(f"--allowed-networks: {exc}")
    if settings.log_format not in ("text", "json"):
        problems.append("--log-format must be text or json")
    if settings.runtime not in RUNTIMES:
        problems.append(f"--runtime must be one of: {', '.join(RUNTIMES)}")
    try:
        names = [spec.name for spec in declared_specs(settings.models, settings.models_file)]
        if settings.default_model not in names:
            problems.append(f"--default-model {settings.default_model!r} is not declared; declared: {', '.join(names)}")
    except CatalogError as exc:
        problems.append(f"models: {exc}")
    if settings.default_top_k > settings.max_top_k:
        problems.append("--default-top-k must not exceed --max-top-k")
    return problems
