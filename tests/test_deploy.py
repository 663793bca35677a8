"""The deployment files: both compose files valid against the Compose Specification's JSON
schema (a copy in tests/data), health-checked the way each process answers; the build
context kept small; the Kubernetes manifests valid (`kubernetes-validate --strict`, the
API's own schemas) and wired to the names the service uses; the Grafana dashboard's
queries (checked against live /metrics in tests/test_fleet.py)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from inference.specs import DEFAULT_MODEL
from service.broker.streams import GROUP, stream_of
from service.settings import Settings
from service.tasks.records import Priority
from testing.services import ROOT

COMPOSE_FILES = ("docker-compose.yml", "docker-compose.scale-out.yml")
KUBERNETES = ROOT / "deploy" / "kubernetes"
DASHBOARD = ROOT / "deploy" / "grafana" / "ics.json"


def compose_validator() -> jsonschema.Draft7Validator:
    schema = json.loads((ROOT / "tests" / "data" / "compose-spec.json").read_text())
    return jsonschema.Draft7Validator(schema)


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_the_compose_files_are_valid_compose_documents(name: str) -> None:
    errors = [error.message for error in compose_validator().iter_errors(yaml.safe_load((ROOT / name).read_text()))]
    assert errors == []


def test_the_schema_refuses_what_the_old_compose_file_had() -> None:
    """An `environment:` of comments only is null, which Compose refuses (the file had that)."""
    broken = {"services": {"web": {"build": ".", "environment": None}}}
    assert list(compose_validator().iter_errors(broken))


def test_scale_out_waits_for_a_healthy_redis_and_checks_each_process_where_it_answers() -> None:
    services = yaml.safe_load((ROOT / "docker-compose.scale-out.yml").read_text())["services"]
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    for name in ("web", "worker"):
        assert services[name]["depends_on"] == {"redis": {"condition": "service_healthy"}}
    worker = services["worker"]
    port = Settings(metrics_port=worker["environment"]["ICS_METRICS_PORT"]).metrics_port
    assert f"http://127.0.0.1:{port}/readyz" in " ".join(worker["healthcheck"]["test"])


def test_the_build_context_leaves_out_the_environment_and_data_but_not_what_the_image_copies() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".venv", "data", ".git", "**/__pycache__", ".mypy_cache"} <= ignored
    copied = re.findall(r"^COPY (.+) \S+$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    for sources in copied:
        for source in sources.split():
            assert source.rstrip("/") not in ignored, source


def documents() -> list[tuple[Path, dict[str, Any]]]:
    return [
        (path, document)
        for path in sorted(KUBERNETES.glob("*.yaml"))
        for document in yaml.safe_load_all(path.read_text())
        if document
    ]


def validate(*paths: Path) -> subprocess.CompletedProcess[str]:
    command = [str(Path(sys.executable).with_name("kubernetes-validate")), "--strict", "--quiet"]
    return subprocess.run([*command, *map(str, paths)], capture_output=True, text=True, timeout=120)


def test_the_kubernetes_manifests_are_valid_for_the_built_in_kinds() -> None:
    built_in = sorted({path for path, document in documents() if "keda.sh" not in document["apiVersion"]})
    assert {path.name for path in built_in} == {"prometheus.yaml", "redis.yaml", "web.yaml", "worker.yaml"}
    checked = validate(*built_in)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_strict_validation_refuses_a_field_the_api_does_not_have(tmp_path: Path) -> None:
    web = (KUBERNETES / "web.yaml").read_text().replace("terminationGracePeriodSeconds", "terminationGraceSeconds")
    (tmp_path / "web.yaml").write_text(web)
    assert validate(tmp_path / "web.yaml").returncode != 0


def test_the_manifests_wire_probes_ports_and_streams_as_the_service_names_them() -> None:
    kinds = {(document["kind"], document["metadata"]["name"]): document for _, document in documents()}
    web = kinds[("Deployment", "ics-web")]["spec"]["template"]["spec"]["containers"][0]
    assert web["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert web["readinessProbe"]["httpGet"]["path"] == "/readyz"
    worker = kinds[("Deployment", "ics-worker")]["spec"]["template"]["spec"]["containers"][0]
    environment = {variable["name"]: variable["value"] for variable in worker["env"]}
    assert worker["command"] == ["python", "run_worker.py"]
    assert int(environment["ICS_METRICS_PORT"]) == worker["ports"][0]["containerPort"]
    assert worker["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    for container in (web, worker):  # every variable is a setting, as the service validates it
        variables = {variable["name"]: variable["value"] for variable in container["env"] if "value" in variable}
        Settings(**{name.removeprefix("ICS_").lower(): value for name, value in variables.items()})
    redis = kinds[("StatefulSet", "redis")]["spec"]["template"]["spec"]["containers"][0]
    assert "--appendonly" in redis["args"] and "noeviction" in redis["args"]
    scaled = kinds[("ScaledObject", "ics-worker")]["spec"]
    assert scaled["scaleTargetRef"]["name"] == "ics-worker"
    streams = {trigger["metadata"]["stream"] for trigger in scaled["triggers"]}
    assert streams == {stream_of("ics:", DEFAULT_MODEL, priority) for priority in Priority}
    assert {trigger["metadata"]["consumerGroup"] for trigger in scaled["triggers"]} == {GROUP}


def dashboard_metrics() -> set[str]:
    """The metric families the dashboard queries (suffixes of counters and histograms off)."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    names = {name for expr in exprs for name in re.findall(r"\bics_[a-z_]+", expr)}
    return {re.sub(r"_(bucket|sum|count|total)$", "", name) for name in names}


def test_the_dashboard_queries_throughput_latency_backlog_workers_errors_and_webhooks() -> None:
    assert {
        "ics_images",
        "ics_queue_depth",
        "ics_queue_wait_seconds",
        "ics_download_seconds",
        "ics_inference_seconds",
        "ics_batch_size",
        "ics_webhook_deliveries",
    } <= dashboard_metrics()
    panels = json.loads(DASHBOARD.read_text())["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
