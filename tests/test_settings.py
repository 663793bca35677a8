"""Settings come from flags, then ICS_* environment variables, then defaults."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from inference.specs import (
    EMBEDDED,
    INT8_CPU_FLAGS,
    CatalogError,
    ModelSpec,
    Precision,
    Runtime,
    cpu_flags,
    margin_for,
    resolve_precision,
    resolve_runtime,
)
from service.settings import Settings, load_settings
from testing.services import ROOT


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ICS_* variable of the machine running the tests leaks into these."""
    for name in list(os.environ):
        if name.startswith("ICS_"):
            monkeypatch.delenv(name)


def test_defaults() -> None:
    settings = load_settings([])
    assert settings == Settings()
    assert (settings.host, settings.port) == ("0.0.0.0", 8080)
    assert [spec.name for spec in settings.model_specs()] == ["efficientnet_lite0"]


def test_environment_then_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ICS_PORT", "9000")
    monkeypatch.setenv("ICS_DOWNLOAD_TIMEOUT", "12.5")
    monkeypatch.setenv("ICS_MAX_URLS_PER_TASK", "7")
    monkeypatch.setenv("ICS_ALLOW_PRIVATE_NETWORKS", "yes")
    settings = load_settings(["--port", "9100"])
    assert settings.port == 9100
    assert settings.download_timeout == 12.5
    assert settings.max_urls_per_task == 7
    assert settings.allow_private_networks is True
    assert load_settings(["--no-allow-private-networks"]).allow_private_networks is False


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (["--port", "eighty"], {}),
        ([], {"ICS_BATCH_SIZE": "many"}),
        ([], {"ICS_ALLOW_PRIVATE_NETWORKS": "perhaps"}),
        (["--batch-size", "0"], {}),
        (["--read-timeout", "-1"], {}),
        (["--default-top-k", "30", "--max-top-k", "20"], {}),
        (["--worker-nice", "20"], {}),
        (["--runtime", "tensorflow"], {}),
        (["--precision", "fp16"], {}),
        (["--refine-margin", "101"], {}),  # a logit gap; 100 already refines every image
        ([], {"ICS_REFINE_MARGIN": "-0.1"}),
        (["--precision", "bf16", "--runtime", "onnx"], {}),
        ([], {"ICS_PRECISION": "bf16", "ICS_RUNTIME": "eager"}),
        (["--log-format", "xml"], {}),
        (["--allowed-networks", "10.0.0.0/33"], {}),
        (["--no-such-flag"], {}),
        (["--workers", "0"], {}),  # a web-only replica needs Redis, where workers take the images
        (["--redis", "localhost:6379"], {}),
        (["--serve-models", "nope"], {}),
        (["--lease", "0"], {}),
        (["--max-active-images-per-key", "0"], {}),
        ([], {"ICS_MAX_ACTIVE_IMAGES_PER_KEY": "-5"}),
    ],
)
def test_bad_values_exit_with_a_usage_error(
    argv: list[str], env: dict[str, str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exited:
        load_settings(argv)
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "error" in error
    assert "Traceback" not in error


def test_help_documents_every_setting_and_its_variable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        load_settings(["--help"])
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # help wraps lines anywhere
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in text
        assert "ICS_" + name.upper() in text


def test_an_api_key_from_the_environment_never_shows(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ICS_API_KEYS", "secret-key-123")
    settings = load_settings([])
    assert settings.api_key_list() == ["secret-key-123"]
    assert "secret-key-123" not in repr(settings)
    with pytest.raises(SystemExit):
        load_settings(["--help"])
    assert "secret-key-123" not in capsys.readouterr().out


@pytest.mark.e2e
def test_the_web_process_does_not_import_torch() -> None:
    """Only workers load torch (~900 MiB RSS); the service side must stay light."""
    code = (
        "import sys, run_service, service.app, service.main; "
        "print(sorted({'torch', 'torchvision', 'onnxruntime', 'openvino'} & set(sys.modules)))"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert output.strip() == "[]"


def test_workers_and_threads_follow_the_usable_cores() -> None:
    cores = len(os.sched_getaffinity(0))
    settings = Settings()
    assert settings.resolved_workers() == cores
    assert settings.resolved_workers() * settings.resolved_threads() <= max(cores, 1)
    assert Settings(workers=1).resolved_threads() == cores
    assert Settings(workers=3, threads_per_worker=2).resolved_threads() == 2


BF16_CPU = {"avx2", "avx512f", "avx512_bf16", "avx512_vnni"}
AMX_CPU = {"avx2", "amx_tile", "amx_bf16", "amx_int8"}
VNNI_CPU = {"avx2", "avx_vnni"}  # int8, but no bf16
AVX2_CPU = {"avx2", "fma"}


@pytest.mark.parametrize(
    ("flags", "runtime", "asked", "expected"),
    [
        (BF16_CPU, "openvino", "auto", "bf16"),
        (AMX_CPU, "openvino", "auto", "bf16"),
        (AVX2_CPU, "openvino", "auto", "fp32"),
        (BF16_CPU, "onnx", "auto", "fp32"),  # ONNX Runtime runs fp32 here
        (BF16_CPU, "eager", "auto", "fp32"),
        (BF16_CPU, "openvino", "fp32", "fp32"),
        (BF16_CPU, "openvino", "bf16", "bf16"),
        (BF16_CPU, "openvino", "int8", "int8"),
        (AMX_CPU, "openvino", "int8", "int8"),
        (VNNI_CPU, "openvino", "int8", "int8"),
        (VNNI_CPU, "openvino", "auto", "fp32"),  # never int8 by itself
    ],
)
def test_precision_is_resolved_explicitly(flags: set[str], runtime: Runtime, asked: Precision, expected: str) -> None:
    assert resolve_precision(EMBEDDED, runtime, asked, flags).precision == expected
    # A model's own precision (models file) wins over the service's.
    assert resolve_precision(replace(EMBEDDED, precision="fp32"), runtime, asked, flags).precision == "fp32"


@pytest.mark.parametrize(
    ("precision", "flags", "runtime", "problem"),
    [
        ("bf16", AVX2_CPU, "openvino", "precision bf16 needs a CPU with avx512_bf16 or amx_bf16"),
        ("bf16", BF16_CPU, "onnx", "precision bf16 needs runtime openvino, not runtime onnx"),
        ("bf16", BF16_CPU, "compile", "precision bf16 needs runtime openvino"),
        ("int8", AVX2_CPU, "openvino", "precision int8 needs a CPU with avx512_vnni, avx_vnni, amx_int8"),
        ("int8", BF16_CPU, "onnx", "precision int8 needs runtime openvino, not runtime onnx"),
        ("int8", BF16_CPU, "eager", "precision int8 needs runtime openvino"),
    ],
)
def test_bf16_or_int8_where_it_cannot_run_is_refused(
    precision: Precision, flags: set[str], runtime: Runtime, problem: str
) -> None:
    with pytest.raises(CatalogError, match=problem):
        resolve_precision(EMBEDDED, runtime, precision, flags)
    graph = ModelSpec(name="g", source="checkpoint", format="torchscript", precision=precision)
    with pytest.raises(CatalogError, match=f"precision {precision} needs runtime openvino, not a TorchScript"):
        resolve_precision(graph, "openvino", "auto", BF16_CPU)


def test_int8_on_this_cpu_starts_or_is_a_usage_error_naming_the_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    if cpu_flags() & set(INT8_CPU_FLAGS):
        assert [spec.precision for spec in load_settings(["--precision", "int8"]).model_specs()] == ["int8"]
        return
    with pytest.raises(SystemExit) as exited:
        load_settings(["--precision", "int8"])
    assert exited.value.code == 2
    assert (
        "precision int8 needs a CPU with avx512_vnni, avx_vnni, amx_int8 (this one has none" in capsys.readouterr().err
    )


def test_batch_size_and_refine_margin_follow_the_runtime_and_precision_unless_set(tmp_path: Path) -> None:
    assert Settings(runtime="openvino").resolved_batch_size() == Settings(runtime="onnx").resolved_batch_size() == 8
    assert Settings(runtime="eager").resolved_batch_size() == 16
    assert Settings(runtime="openvino", batch_size=32).resolved_batch_size() == 32
    assert (margin_for("fp32", None), margin_for("bf16", None), margin_for("int8", None)) == (0.0, 0.2, 0.15)
    assert (margin_for("fp32", 0.3), margin_for("bf16", 0.3), margin_for("int8", 0.0)) == (0.0, 0.3, 0.0)


def test_the_calibration_dir_must_be_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        load_settings(["--calibration-dir", str(tmp_path / "absent")])
    assert exited.value.code == 2
    assert f"--calibration-dir {tmp_path / 'absent'} is not a directory" in capsys.readouterr().err
    assert load_settings(["--calibration-dir", str(tmp_path)]).calibration_dir == tmp_path


def test_the_runtime_follows_the_cpu_unless_named() -> None:
    assert resolve_runtime("auto", BF16_CPU) == resolve_runtime("auto", AMX_CPU) == "openvino"
    assert resolve_runtime("auto", AVX2_CPU) == "onnx"
    assert resolve_runtime("openvino", AVX2_CPU) == "openvino"
    settings = Settings(runtime="openvino", precision="fp32")
    assert settings.resolved_runtime() == "openvino"
    assert [spec.precision for spec in settings.model_specs()] == ["fp32"]


def test_a_models_file_may_set_a_precision(tmp_path: Path) -> None:
    (tmp_path / "labels.txt").write_text("a\nb\n")
    models = tmp_path / "models.toml"
    models.write_text('[models.a]\nformat = "torchscript"\npath = "a.pt"\nlabels = "labels.txt"\nprecision = "fp16"\n')
    with pytest.raises(SystemExit) as exited:
        load_settings(["--models-file", str(models)])
    assert exited.value.code == 2
    models.write_text('[models.a]\nformat = "torchscript"\npath = "a.pt"\nlabels = "labels.txt"\nprecision = "fp32"\n')
    assert load_settings(["--models-file", str(models)]).model_specs()[1].precision == "fp32"


@pytest.mark.e2e
def test_the_worker_names_itself_and_needs_redis() -> None:
    shown = subprocess.run([sys.executable, "run_worker.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert shown.returncode == 0 and shown.stdout.startswith("usage: run_worker.py"), shown.stdout[:200]
    refused = subprocess.run([sys.executable, "run_worker.py"], cwd=ROOT, capture_output=True, text=True)
    assert refused.returncode == 2
    assert "run_worker.py: error: --redis is required" in refused.stderr and "Traceback" not in refused.stderr


def test_every_setting_is_in_the_settings_page_with_its_variable() -> None:
    """docs/settings.md (linked from the README) documents every flag and its variable."""
    page = (ROOT / "docs" / "settings.md").read_text()
    for name in Settings.model_fields:
        flag, variable = "--" + name.replace("_", "-"), "ICS_" + name.upper()
        assert f"| `{flag}` | `{variable}` |" in page, flag
