"""The project as a package: pins in one place, `pip install .` with its console scripts, and
the service's own requirements free of test tools."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

from testing.services import ROOT

pytestmark = pytest.mark.e2e  # pip installs the project


def test_requirements_files_are_generated_from_pyproject() -> None:
    result = subprocess.run(
        [sys.executable, "tools/requirements.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for requirement in [
        *project["dependencies"],
        *(r for extra in project["optional-dependencies"].values() for r in extra),
    ]:
        assert "==" in requirement, f"{requirement} is not pinned"
    runtime = (ROOT / "requirements.txt").read_text()
    for tool in ("pytest", "playwright", "schemathesis", "mypy", "ruff"):
        assert tool not in runtime  # the README's run command installs only what the service needs


def test_pip_install_gives_the_console_scripts(tmp_path: Path) -> None:
    """A wheel built from the tree installs into a fresh virtualenv with `ics` and `ics-service`
    (its dependencies are lent from this virtualenv, to spare a 5 GB download)."""
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info/ beside the sources
    for package in ("service", "inference", "client"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), "."],
        cwd=source,
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "service/api/static/index.html" in names and "client/cli.py" in names and "inference/worker.py" in names
    assert not any(name.startswith(("tests/", "bench/")) for name in names)

    fresh = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(fresh)], check=True)
    subprocess.run([fresh / "bin" / "pip", "install", "-q", "--no-deps", str(wheel)], check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": sysconfig.get_paths()["purelib"]}  # the dependencies, not the project
    elsewhere = tmp_path  # not the checkout: the installed packages must be the ones imported
    client = subprocess.run([fresh / "bin" / "ics", "--help"], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert client.returncode == 0, client.stderr
    assert "Exit status" in client.stdout
    service = subprocess.run(
        [fresh / "bin" / "ics-service", "--help"], cwd=elsewhere, env=env, capture_output=True, text=True
    )
    assert service.returncode == 0, service.stderr
    assert "--max-urls-per-task" in service.stdout
    for script in ("ics-service", "ics-worker"):  # as spawn runs it in a worker: see service.entry
        check = (
            f"import runpy, sys; runpy.run_path({str(fresh / 'bin' / script)!r}, run_name='__mp_main__'); "
            "print('aiohttp' in sys.modules)"
        )
        result = subprocess.run(
            [fresh / "bin" / "python", "-c", check], cwd=elsewhere, env=env, capture_output=True, text=True
        )
        assert result.stdout.strip() == "False", (script, result.stdout, result.stderr)
    where = subprocess.run(
        [fresh / "bin" / "python", "-c", "import service; print(service.__file__)"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert where.stdout.startswith(str(fresh))


def test_pip_install_alone_gives_a_working_client_without_the_service_stack(tmp_path: Path) -> None:
    """`pip install .` in a fresh virtualenv, dependencies from the package index: the
    client runs (its progress bar is a dependency), nothing of the service's stack comes
    with it, and the service's programs say which extra to install."""
    source = tmp_path / "source"
    for package in ("service", "inference", "client"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    fresh = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(fresh)], check=True)
    installed = subprocess.run(
        [fresh / "bin" / "pip", "install", "-q", "--disable-pip-version-check", str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stderr
    listed = subprocess.run([fresh / "bin" / "pip", "list", "--format=freeze"], capture_output=True, text=True)
    names = {line.split("==")[0].lower() for line in listed.stdout.splitlines()}
    assert {"aiohttp", "tqdm", "image-classification-service"} <= names
    assert not names & {"torch", "openvino", "numpy", "pillow", "uvloop", "pydantic", "redis"}, names

    from client import __version__

    def run(*command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([fresh / "bin" / command[0], *command[1:]], cwd=tmp_path, capture_output=True, text=True)

    shown = run("ics", "--help")
    assert shown.returncode == 0 and shown.stdout.startswith("usage: ics "), shown.stderr
    assert run("ics", "--version").stdout == f"ics {__version__}\n"
    assert run("ics-service", "--version").stdout == f"ics-service {__version__}\n"
    for program in ("ics-service", "ics-worker"):
        refused = run(program, "--help")
        assert refused.returncode == 1 and "Traceback" not in refused.stderr
        assert refused.stderr.startswith(f"{program}: the service's dependencies are not installed (")
        assert "pip install 'image-classification-service[server]'" in refused.stderr
    unreachable = run("ics", "--server", "http://127.0.0.1:9", "http://example.com/x.jpg")  # as far as the network
    assert unreachable.returncode == 2 and "could not reach the service" in unreachable.stderr


def test_the_console_scripts_name_themselves_and_a_worker_lists_what_it_reads() -> None:
    worker = subprocess.run(
        [sys.executable, "-c", "import sys; sys.argv[0] = 'ics-worker'; from service.entry import worker; worker()",
         "--help"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert worker.returncode == 0, worker.stderr
    assert worker.stdout.startswith("usage: ics-worker ")
    for flag in ("--redis ", "--claim-idle", "--serve-models", "--metrics-port", "--batch-size", "--precision"):
        assert flag in worker.stdout, flag
    for flag in ("--port", "--max-urls-per-task", "--webhook-secret", "--api-keys", "--store ", "--max-wait"):
        assert flag not in worker.stdout, flag
