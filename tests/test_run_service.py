"""`python run_service.py` as a user starts it: serves /submit, classifies a real photo, and
on SIGTERM/SIGINT stops accepting, cancels what outlives the grace period, exits 0 and
leaves no worker process behind."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from testing.services import ROOT
from tests.conftest import ImageServer, running_service

pytestmark = pytest.mark.e2e  # run_service.py as a user starts it


async def submit(http: aiohttp.ClientSession, base: str, urls: list[str]) -> str:
    async with http.post(f"{base}/submit", json={"urls": urls}) as response:
        assert response.status == 202
        return (await response.json())["task_id"]


async def get_task(http: aiohttp.ClientSession, base: str, task_id: str) -> dict[str, Any]:
    async with http.get(f"{base}/tasks/{task_id}") as response:
        return await response.json()


async def test_run_service_classifies_a_photo_and_stops_on_sigint(image_server: ImageServer) -> None:
    async with running_service("--log-format", "json") as (process, base):
        async with aiohttp.ClientSession() as http, asyncio.timeout(60):
            task_id = await submit(http, base, [image_server.url("/photos/coffee")])
            while (task := await get_task(http, base, task_id))["status"] != "completed":
                await asyncio.sleep(0.1)
        assert task["items"][0]["labels"][0]["label"] == "espresso"
        workers = [child for child in psutil.Process(process.pid).children() if "spawn_main" in child.cmdline()[-2]]
        assert workers
        for worker in workers:  # the web stack's compiled modules are not loaded in a worker
            libraries = Path(f"/proc/{worker.pid}/maps").read_text()
            assert "openvino" in libraries and "aiohttp" not in libraries and "pydantic_core" not in libraries
        process.send_signal(signal.SIGINT)
        output = process.communicate(timeout=60)[0].decode()
        assert process.returncode == 0, output

    lines = [json.loads(line) for line in output.splitlines() if line.strip()]  # every line is JSON
    lifecycle = [line["message"] for line in lines if line.get("task_id") == task_id]
    assert [message.split()[2].rstrip(":") for message in lifecycle] == ["created", "running", "completed"]
    assert any("POST /submit" in line["message"] for line in lines if line["logger"] == "aiohttp.access")


async def test_sigterm_with_the_memory_store_cancels_after_the_grace_period_and_leaves_no_workers(
    image_server: ImageServer,
) -> None:
    async with running_service("--store", "memory", "--shutdown-grace", "1.5", "--download-concurrency", "1") as (
        process,
        base,
    ):
        workers = psutil.Process(process.pid).children(recursive=True)
        assert workers
        async with aiohttp.ClientSession() as http:
            await submit(http, base, [image_server.url(f"/slow/coffee?delay=1&n={n}") for n in range(30)])
            await asyncio.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        with socket.socket() as sock:  # no longer accepting
            assert sock.connect_ex(("127.0.0.1", int(base.rsplit(":", 1)[1]))) != 0
        output = await asyncio.to_thread(lambda: process.communicate(timeout=60)[0].decode())
        assert process.returncode == 0, output
        assert "cancelled 1 active tasks" in output, output
        hits = image_server.total_hits("/slow")
        assert hits < 10  # the rest of the 30 slow downloads never started
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"orphaned worker processes: {alive}"


def test_worker_processes_do_not_import_the_web_stack_through_the_launchers() -> None:
    """multiprocessing's spawn runs the launching script again in each worker, as
    `__mp_main__`: a launcher that imports the service at its top made every worker import
    aiohttp, pydantic and the rest (0.7 s and ~40 MiB each). The console scripts call
    `service.entry` too (`tests/test_packaging.py` runs the installed ones)."""
    for script in ("run_service.py", "run_worker.py"):
        web_stack = {"aiohttp", "pydantic", "redis", "service.main", "service.worker"}
        check = (
            f"import runpy, sys; runpy.run_path({script!r}, run_name='__mp_main__'); "
            f"print(sorted({web_stack!r} & set(sys.modules)))"
        )
        result = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, check=True)
        assert result.stdout.strip() == "[]", (script, result.stdout)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", "cannot listen on 127.0.0.1:{port}: the port is in use (another service running?); choose "
         "another with --port"),
        ("192.0.2.1", "cannot listen on 192.0.2.1:{port}: 192.0.2.1 is not an address of this machine; choose another "
         "with --host"),
    ],
    ids=["busy-port", "not-this-machine"],
)  # fmt: skip
def test_an_address_that_cannot_be_listened_on_is_one_line_before_the_workers_start(host: str, expected: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        finished = subprocess.run(
            [sys.executable, "run_service.py", "--host", host, "--port", str(port), "--store", "memory"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert finished.returncode == 1
    # One line and nothing else: no model loaded, no worker started, no traceback.
    (line,) = finished.stderr.strip().splitlines()
    assert line.endswith(" ERROR service: " + expected.format(port=port)), line


def test_the_programs_say_their_version() -> None:
    from client import __version__

    for script in ("run_service.py", "run_worker.py"):
        shown = subprocess.run([sys.executable, script, "--version"], cwd=ROOT, capture_output=True, text=True)
        assert (shown.returncode, shown.stdout) == (0, f"{script} {__version__}\n")


async def test_the_first_start_says_it_exports_the_model_and_ctrl_c_stops_without_tracebacks(tmp_path: Path) -> None:
    """A new model cache: the export's seconds are logged, before the workers start. Ctrl-C
    in a terminal signals the whole process group: the workers leave the stopping to the
    web process, so the output has no traceback."""
    async with running_service("--model-cache-dir", str(tmp_path / "models")) as (process, _):
        os.killpg(process.pid, signal.SIGINT)
        output = process.communicate(timeout=60)[0].decode()
    assert process.returncode == 0, output
    lines = output.splitlines()
    exporting = next(
        i for i, line in enumerate(lines) if "exporting efficientnet_lite0 to ONNX (once per machine)" in line
    )
    assert re.search(r"exported efficientnet_lite0 in \d+\.\d s$", lines[exporting + 1]), output
    assert "inference workers ready" in output.split("exported efficientnet_lite0")[1]
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output
    assert list((tmp_path / "models").glob("efficientnet_lite0-*.onnx"))
