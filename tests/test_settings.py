"""Settings come from flags, then ICS_* environment variables, then defaults."""

from __future__ import annotations

from dataclasses import fields

import pytest

from service.settings import Settings, build_parser, load_settings


def test_defaults() -> None:
    settings = load_settings([], {})
    assert settings == Settings()
    assert (settings.host, settings.port) == ("0.0.0.0", 8080)


def test_environment_then_flags() -> None:
    env = {"ICS_PORT": "9000", "ICS_DOWNLOAD_TIMEOUT": "12.5", "ICS_MAX_URLS_PER_TASK": "7"}
    settings = load_settings(["--port", "9100"], env)
    assert settings.port == 9100
    assert settings.download_timeout == 12.5
    assert settings.max_urls_per_task == 7


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (["--port", "eighty"], {}),
        ([], {"ICS_BATCH_SIZE": "many"}),
        (["--batch-size", "0"], {}),
        (["--read-timeout", "-1"], {}),
        (["--default-top-k", "30", "--max-top-k", "20"], {}),
        (["--no-such-flag"], {}),
    ],
)
def test_bad_values_exit_with_a_usage_error(argv: list[str], env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        load_settings(argv, env)
    assert exited.value.code == 2
    assert "error" in capsys.readouterr().err


def test_help_documents_every_setting_and_its_variable() -> None:
    text = build_parser({}).format_help()
    for spec in fields(Settings):
        assert "--" + spec.name.replace("_", "-") in text
        assert "ICS_" + spec.name.upper() in text


def test_the_web_process_does_not_import_torch() -> None:
    """Only workers load torch (~900 MiB RSS); the service side must stay light."""
    import subprocess
    import sys

    code = "import sys, run_service, service.app; print(sorted({'torch', 'torchvision', 'onnxruntime'} & set(sys.modules)))"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "[]"


def test_workers_and_threads_follow_the_usable_cores() -> None:
    import os

    cores = len(os.sched_getaffinity(0))
    settings = Settings()
    assert settings.resolved_workers() == cores
    assert settings.resolved_workers() * settings.resolved_threads() <= max(cores, 1)
    assert Settings(workers=1).resolved_threads() == cores
    assert Settings(workers=3, threads_per_worker=2).resolved_threads() == 2
