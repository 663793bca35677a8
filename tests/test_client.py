"""The command-line client, run as a user runs it (`python -m client`) against a live
service: labels in its table or JSON, exit codes, and Ctrl-C with and without `--cancel`; and
its results file on its own."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from client.inputs import Source
from client.results import ResultsFile
from testing.services import ROOT
from tests.conftest import PHOTOS_DIR, ImageServer, ServiceFactory, metric


@dataclass
class Run:
    status: int
    stdout: str
    stderr: str


async def start_client(client: TestClient, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "client",
        "--server",
        str(client.make_url("/")),
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def finish(process: asyncio.subprocess.Process) -> Run:
    async with asyncio.timeout(60):
        stdout, stderr = await process.communicate()
    assert process.returncode is not None
    return Run(process.returncode, stdout.decode(), stderr.decode())


async def run_client(client: TestClient, *args: str) -> Run:
    return await finish(await start_client(client, *args))


async def only_task(client: TestClient) -> dict[str, Any]:
    (summary,) = (await (await client.get("/tasks")).json())["tasks"]
    return await (await client.get(f"/tasks/{summary['task_id']}")).json()


async def test_files_and_urls_print_their_labels_and_exit_0_refusals_exit_2(
    make_real_service: ServiceFactory, image_server: ImageServer
) -> None:
    client = await make_real_service()
    run = await run_client(client, "--model", "resnet9000", image_server.url("/photos/coffee"))
    assert run.status == 2 and "unknown_model" in run.stderr
    run = await run_client(client, str(PHOTOS_DIR / "no-such-photo.jpg"))
    assert run.status == 2 and "no such file" in run.stderr
    assert (await (await client.get("/tasks")).json())["tasks"] == []

    run = await run_client(client, str(PHOTOS_DIR / "coffee.jpg"), image_server.url("/photos/chelsea"))
    assert run.status == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].split() == ["#", "image", "status", "labels"]
    assert "upload:coffee.jpg" in lines[1] and "succeeded" in lines[1]
    espresso = re.search(r"espresso \((0\.\d+)\)", lines[1])
    assert espresso and float(espresso[1]) == pytest.approx(0.95, abs=0.01)  # fp32 0.951; bf16 0.949
    assert "/photos/chelsea" in lines[2] and "Egyptian cat" in lines[2]
    assert lines[3].endswith("completed: 2 classified, 0 failed, 0 cancelled")
    assert "2/2" in run.stderr  # the progress bar reached the end


async def test_json_output_and_exit_1_when_an_image_fails(
    make_real_service: ServiceFactory, image_server: ImageServer
) -> None:
    client = await make_real_service()
    run = await run_client(client, "--json", "--top-k", "2", str(PHOTOS_DIR), image_server.url("/status/404"))
    assert run.status == 1, run.stderr
    task = json.loads(run.stdout)
    assert task == await only_task(client)
    assert [item["url"] for item in task["items"]][:3] == [
        "upload:chelsea.jpg",
        "upload:coffee.jpg",
        "upload:rocket.jpg",
    ]
    assert [item["labels"][0]["label"] for item in task["items"][:3]] == ["Egyptian cat", "espresso", "missile"]
    assert all(len(item["labels"]) == 2 for item in task["items"][:3])
    assert task["items"][3]["error"]["code"] == "http_error"


async def interrupt_while_watching(client: TestClient, image_server: ImageServer, *args: str) -> Run:
    process = await start_client(client, *args, image_server.url("/slow/coffee?delay=10"))
    async with asyncio.timeout(30):
        while await metric(client, "ics_event_streams") < 1:  # submitted, and watching
            await asyncio.sleep(0.1)
    process.send_signal(signal.SIGINT)
    return await finish(process)


async def test_ctrl_c_cancels_the_task_with_cancel_and_leaves_it_running_without(
    make_service: ServiceFactory, image_server: ImageServer
) -> None:
    client = await make_service(read_timeout=60.0, download_timeout=60.0)
    for args, expected_status in ((["--cancel"], "cancelled"), ([], "running")):
        run = await interrupt_while_watching(client, image_server, *args)
        assert run.status == 130, run.stderr
        (task_id,) = set(re.findall(r"\b[0-9a-f]{32}\b", run.stderr))  # the client names the task it leaves
        task = await (await client.get(f"/tasks/{task_id}")).json()
        assert task["status"] == expected_status, args


async def test_a_busy_service_is_asked_again_after_its_retry_after(
    make_real_service: ServiceFactory, image_server: ImageServer
) -> None:
    client = await make_real_service(max_active_images=1)
    blocking = await client.post("/submit", json={"urls": [image_server.url("/slow/chelsea?delay=1.5")]})
    assert blocking.status == 202
    run = await run_client(client, image_server.url("/photos/coffee"))
    assert run.status == 0, run.stderr
    assert "the service is busy (429); retrying in 5 s (attempt 2)" in run.stderr  # as its Retry-After said
    assert "espresso" in run.stdout
    assert len((await (await client.get("/tasks")).json())["tasks"]) == 2  # the blocking one, and one more


@pytest.mark.e2e
async def test_a_submit_whose_answer_was_lost_is_retried_without_a_second_task(
    make_real_service: ServiceFactory, image_server: ImageServer, aiohttp_server: Any
) -> None:
    """A proxy hands the first submit to the service, then drops the connection instead of
    answering: the client asks again with the same idempotency key and gets the same task."""
    client = await make_real_service(webhook_secret="s")
    keys: list[str] = []

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {name: value for name, value in request.headers.items() if name.lower() not in ("host",)}
        upstream = await client.session.request(
            request.method, client.make_url(request.path_qs), data=body, headers=headers
        )
        if request.path == "/submit":
            keys.append(request.headers["Idempotency-Key"])
            if len(keys) == 1:
                await upstream.read()
                assert request.transport is not None
                request.transport.close()  # the task exists; its answer is lost
                raise web.HTTPInternalServerError()  # never sent: the connection is gone
        response = web.StreamResponse(status=upstream.status, headers={"Content-Type": upstream.content_type})
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response

    proxy = web.Application()
    proxy.router.add_route("*", "/{path:.*}", forward)
    server = await aiohttp_server(proxy, host="127.0.0.1")
    callback = image_server.url("/hook")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "client",
        "--server",
        str(server.make_url("/")),
        "--callback-url",
        callback,
        image_server.url("/photos/coffee"),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    run = await finish(process)
    assert run.status == 0, run.stderr
    assert "the submit was interrupted" in run.stderr and "retrying in 1 s (attempt 2)" in run.stderr
    assert len(keys) == 2 and keys[0] == keys[1]  # one key for both attempts
    task = await only_task(client)  # one task, not two
    assert task["webhook"]["url"] == callback


@pytest.mark.parametrize("name", ["rows.jsonl", "rows.csv"])
def test_a_results_row_is_in_the_file_as_soon_as_it_is_written(tmp_path: Path, name: str) -> None:
    """Whoever reads the file meanwhile (`tail -f`, a killed run's `--resume`) sees every row
    reported so far."""
    path = tmp_path / name
    results = ResultsFile(path, resume=False)
    labels = [{"label": "espresso", "class_index": 967, "score": 0.9}]
    results.write(Source(0, "https://images.example/a.jpg"), {"status": "succeeded", "labels": labels}, "t1")
    rows = path.read_text().splitlines()
    assert len(rows) == (2 if name.endswith(".csv") else 1) and "espresso" in rows[-1]
    results.close()
