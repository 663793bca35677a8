"""A client generated from the service's own `/openapi.json` by openapi-python-client works:
submit (202, and 200 with `Prefer: wait`), get, the event stream (text, not a JSON object:
it crashed the generated client once), the results file and cancel, against a live service
with the real model."""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import ImageServer, ServiceFactory

PACKAGE = "ics_generated_api"


@pytest.fixture
def generated(tmp_path: Path) -> Iterator[ModuleType]:
    """The generated package, imported from `tmp_path` (and forgotten afterwards)."""
    document = tmp_path / "openapi.json"
    from service.api.appkeys import OPENAPI
    from service.app import create_app
    from tests.conftest import settings_for

    document.write_bytes(create_app(settings_for())[OPENAPI])
    tool = Path(sys.executable).parent / "openapi-python-client"
    environment = {**os.environ, "PATH": f"{tool.parent}{os.pathsep}{os.environ['PATH']}"}  # its ruff hook
    done = subprocess.run(
        [tool, "generate", "--path", str(document), "--meta", "none", "--output-path", str(tmp_path / PACKAGE)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Warning" not in done.stdout, done.stdout  # every part of the document was understood
    sys.path.insert(0, str(tmp_path))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(tmp_path))
        for name in [name for name in sys.modules if name == PACKAGE or name.startswith(PACKAGE + ".")]:
            del sys.modules[name]


async def test_a_generated_client_submits_reads_follows_and_cancels(
    generated: ModuleType, make_real_service: ServiceFactory, image_server: ImageServer
) -> None:
    service = await make_real_service(read_timeout=60.0, download_timeout=60.0)
    tasks = importlib.import_module(f"{PACKAGE}.api.tasks")
    models = importlib.import_module(f"{PACKAGE}.models")
    for operation in ("submit", "get_task", "task_events", "task_results", "cancel_task"):
        importlib.import_module(f"{PACKAGE}.api.tasks.{operation}")
    client = generated.Client(base_url=str(service.make_url("")).rstrip("/"), timeout=60.0)

    async with client:
        accepted = await tasks.submit.asyncio_detailed(
            client=client, body=models.SubmitRequest(urls=[image_server.url("/photos/coffee")], top_k=3)
        )
        assert accepted.status_code == 202
        task_id = accepted.parsed.task_id

        events = await tasks.task_events.asyncio(task_id, client=client)  # the whole stream, as text
        assert isinstance(events, str) and "event: end" in events
        (end,) = [block for block in events.replace("\r\n", "\n").split("\n\n") if block.startswith("event: end")]
        summary = json.loads(end.split("data: ", 1)[1])
        assert summary["task_id"] == task_id and summary["status"] == "completed"

        task = await tasks.get_task.asyncio(task_id, client=client)
        assert isinstance(task, models.TaskDetail)
        assert task.status == models.TaskStatus.COMPLETED and task.items[0].labels[0].label == "espresso"

        rows = await tasks.task_results.asyncio(task_id, client=client, format_=models.ResultsQueryFormat.CSV)
        assert isinstance(rows, str) and rows.splitlines()[1].startswith(f"0,{image_server.url('/photos/coffee')}")

        waited = await tasks.submit.asyncio_detailed(
            client=client, body=models.SubmitRequest(urls=[image_server.url("/photos/chelsea")]), prefer="wait=60"
        )
        assert waited.status_code == 200 and isinstance(waited.parsed, models.TaskDetail)
        assert waited.headers["Preference-Applied"] == "wait=60"

        slow = await tasks.submit.asyncio(
            client=client, body=models.SubmitRequest(urls=[image_server.url("/slow/coffee?delay=30")])
        )
        await asyncio.sleep(0.3)
        cancelled = await tasks.cancel_task.asyncio(slow.task_id, client=client)
        assert isinstance(cancelled, models.TaskDetail) and cancelled.status == models.TaskStatus.CANCELLED

        missing = await tasks.get_task.asyncio("0" * 32, client=client)
        assert isinstance(missing, models.ErrorBody) and missing.error.code == "task_not_found"
