"""The command-line client, run as a user runs it (`python -m client`) against a live
service: labels in its table or JSON, exit codes, and Ctrl-C with and without `--cancel`; and
its results file on its own."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from client.inputs import Source, sources
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


def test_a_urls_file_with_a_byte_order_mark_and_an_undecodable_line_reads_every_other_line(tmp_path: Path) -> None:
    """Issue 34, item 4: a BOM made the first URL invalid_input and hid a CSV's first column;
    one byte that was not UTF-8 anywhere was a traceback, with no row (and `--resume` failed alike)."""
    text = tmp_path / "urls.txt"
    text.write_bytes(
        b"\xef\xbb\xbfhttp://a.example/1.jpg\nhttp://a.example/caf\xe9.jpg\n# note\nhttp://a.example/3.jpg\n"
    )
    listed = list(sources([], str(text), None, False))
    assert [(source.value, source.kind) for source in listed] == [
        ("http://a.example/1.jpg", "url"),
        ("http://a.example/caf\ufffd.jpg", "invalid"),
        ("http://a.example/3.jpg", "url"),
    ]
    assert listed[1].problem == "line 2 is not valid utf-8 (see --encoding)"
    latin = list(sources([], str(text), None, False, encoding="latin-1"))
    assert latin[1].value == "http://a.example/caf\xe9.jpg" and latin[1].kind == "url"

    table = tmp_path / "urls.csv"
    table.write_bytes(b"\xef\xbb\xbfurl,note\nhttp://a.example/1.jpg,a\nhttp://a.example/\xff.jpg,b\n")
    listed = list(sources([], str(table), None, False))
    assert [source.kind for source in listed] == ["url", "invalid"]
    assert listed[1].problem == "line 3 is not valid utf-8 (see --encoding)"
    # The row of an undecodable line can be written, in either format.
    for name in ("rows.jsonl", "rows.csv"):
        results = ResultsFile(tmp_path / name, resume=False)
        results.write(listed[1], {"status": "failed", "error": {"code": "invalid_input", "message": "x"}}, "")
        results.close()
        written = (tmp_path / name).read_text(encoding="utf-8")
        assert "\ufffd" in (json.loads(written)["input"] if name.endswith(".jsonl") else written)


@pytest.mark.parametrize("name", ["rows.jsonl", "rows.csv"])
def test_a_row_that_cannot_be_written_leaves_the_file_ending_with_a_whole_row(tmp_path: Path, name: str) -> None:
    """A full disk while writing a row: one ClientError naming the file and the errno, and
    the file cut back to its last whole row (it was a traceback and a row cut mid-line)."""
    path = tmp_path / name
    results = ResultsFile(path, resume=False)
    labels = [{"label": "espresso", "class_index": 967, "score": 0.9}]
    results.write(Source(0, "https://images.example/a.jpg"), {"status": "succeeded", "labels": labels}, "t1")
    whole = path.read_bytes()
    limit = len(whole) + 40  # room for part of the next row only
    script = (
        "import resource, signal, sys\n"
        "from pathlib import Path\n"
        "from client.api import ClientError\n"
        "from client.inputs import Source\n"
        "from client.results import ResultsFile\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
        f"results = ResultsFile(Path({str(path)!r}), resume=True)\n"
        "try:\n"
        "    results.write(Source(1, 'https://images.example/' + 'b' * 200 + '.jpg'), {'status': 'failed'}, 't1')\n"
        "except ClientError as exc:\n"
        "    print(exc)\n"
        "    sys.exit(2)\n"
    )
    finished = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert finished.returncode == 2, finished.stderr
    assert finished.stdout.strip() == f"{path}: cannot write: File too large (EFBIG)"
    assert path.read_bytes() == whole  # the partial row is gone
