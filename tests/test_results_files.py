"""Results as files: `GET /tasks/<id>/results?format=csv|jsonl` (one row per image, the
columns of the client's `--output`, streamed), and the client's `--task ID` with `--output`,
`--cancel`, or alone; with the client's usage errors that say what to do."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from client import __version__
from client.results import FIELDS
from tests.conftest import ImageServer, ServiceFactory, wait_for_task
from tests.fakes import FakePool, image
from tests.test_client import finish, run_client, start_client


async def finished_task(client: TestClient, image_server: ImageServer, count: int = 1) -> dict[str, Any]:
    image_server.files["cat"] = image("cat")
    image_server.files["text"] = b"not an image"
    urls = [image_server.url("/file/cat"), image_server.url("/status/404"), image_server.url("/file/text")] * count
    response = await client.post("/submit", json={"urls": urls})
    assert response.status == 202
    return await wait_for_task(client, (await response.json())["task_id"])


def expected_rows(task: dict[str, Any]) -> list[dict[str, Any]]:
    """The task's items as the client's results files have them."""
    rows = []
    for item in task["items"]:
        labels = [{"label": label["label"], "score": label["score"]} for label in item["labels"] or []]
        error = item["error"] or {}
        rows.append(
            {
                "index": item["index"],
                "input": item["url"],
                "status": item["status"],
                "label": labels[0]["label"] if labels else None,
                "score": labels[0]["score"] if labels else None,
                "labels": labels,
                "error_code": error.get("code"),
                "error_message": error.get("message"),
                "task_id": task["task_id"],
            }
        )
    return rows


def parse_csv(text: str) -> tuple[list[str], list[dict[str, Any]]]:
    reader = csv.DictReader(io.StringIO(text))
    rows = []
    for record in reader:
        rows.append(
            {
                **record,
                "index": int(record["index"]),
                "score": float(record["score"]) if record["score"] else None,
                "labels": json.loads(record["labels"]),
                **{name: record[name] or None for name in ("label", "error_code", "error_message")},
            }
        )
    return list(reader.fieldnames or []), rows


async def test_csv_and_json_lines_are_the_task_row_for_row(
    make_service: ServiceFactory, image_server: ImageServer
) -> None:
    client = await make_service()
    task = await finished_task(client, image_server)
    as_csv = await client.get(f"/tasks/{task['task_id']}/results", params={"format": "csv"})
    assert as_csv.status == 200
    assert as_csv.headers["Content-Type"] == "text/csv; charset=utf-8"
    assert as_csv.headers["Content-Disposition"] == f'attachment; filename="task-{task["task_id"]}.csv"'
    header, rows = parse_csv(await as_csv.text())
    assert header == FIELDS  # the columns of the client's --output
    assert rows == expected_rows(task)
    assert [row["error_code"] for row in rows] == [None, "http_error", "not_an_image"]

    lines = await client.get(f"/tasks/{task['task_id']}/results")  # JSON Lines by default
    assert lines.headers["Content-Type"] == "application/jsonl; charset=utf-8"
    assert lines.headers["Content-Disposition"].endswith('.jsonl"')
    assert [json.loads(line) for line in (await lines.text()).splitlines()] == expected_rows(task)


async def test_a_thousand_images_stream_in_input_order(make_service: ServiceFactory, image_server: ImageServer) -> None:
    client = await make_service(max_urls_per_task=1002)
    task = await finished_task(client, image_server, count=334)
    response = await client.get(f"/tasks/{task['task_id']}/results", params={"format": "csv"})
    assert response.headers.get("Transfer-Encoding") == "chunked" and "Content-Length" not in response.headers
    _, rows = parse_csv(await response.text())
    assert len(rows) == 1002 and rows == expected_rows(task)
    assert [row["index"] for row in rows] == list(range(1002))


async def test_bad_requests_for_results_get_json_errors(make_service: ServiceFactory) -> None:
    client = await make_service(api_keys="key-a,key-b")
    mine = {"Authorization": "Bearer key-a"}
    response = await client.post("/submit", json={"urls": ["http://example.com/a.jpg"]}, headers=mine)
    task_id = (await response.json())["task_id"]
    for params, status, code in (
        ({"format": "xlsx"}, 400, "invalid_format"),
        ({"format": "csv", "sort": "label"}, 400, "unknown_parameter"),
    ):
        refused = await client.get(f"/tasks/{task_id}/results", params=params, headers=mine)
        assert (refused.status, (await refused.json())["error"]["code"]) == (status, code)
    for task, headers in (("0" * 32, mine), (task_id, {"Authorization": "Bearer key-b"})):  # unknown; another key's
        missing = await client.get(f"/tasks/{task}/results", headers=headers)
        assert (missing.status, (await missing.json())["error"]["code"]) == (404, "task_not_found")


async def test_the_client_writes_shows_follows_and_cancels_an_existing_task(
    make_service: ServiceFactory, image_server: ImageServer, tmp_path: Path
) -> None:
    pool = FakePool()
    client = await make_service(pool=pool)
    task = await finished_task(client, image_server)
    task_id = task["task_id"]
    for name in ("results.csv", "results.jsonl"):
        run = await run_client(client, "--task", task_id, "--output", str(tmp_path / name))
        assert run.status == 1, run.stderr  # an image failed
        served = await client.get(f"/tasks/{task_id}/results", params={"format": name.split(".")[1]})
        assert (tmp_path / name).read_bytes() == await served.read()
        assert f"3 rows in {tmp_path / name}" in run.stderr
    assert not list(tmp_path.glob("*.part"))

    shown = await run_client(client, "--task", task_id)
    assert shown.status == 1 and "cat (0.900)" in shown.stdout and "http_error" in shown.stdout
    assert shown.stdout.splitlines()[-1] == f"task {task_id} completed: 1 classified, 2 failed, 0 cancelled"

    pool.hold.clear()  # a task still running: followed to its end, then shown
    response = await client.post("/submit", json={"urls": [image_server.url("/file/cat")]})
    running = (await response.json())["task_id"]
    following = await start_client(client, "--task", running, "--json")
    await asyncio.sleep(1.0)
    assert following.returncode is None
    pool.hold.set()
    run = await finish(following)
    assert run.status == 0 and json.loads(run.stdout)["status"] == "completed"

    pool.hold.clear()
    response = await client.post("/submit", json={"urls": [image_server.url("/file/cat")]})
    held = (await response.json())["task_id"]
    run = await run_client(client, "--task", held, "--cancel")
    assert run.status == 1 and f"task {held} cancelled" in run.stdout
    assert (await (await client.get(f"/tasks/{held}")).json())["status"] == "cancelled"
    pool.hold.set()

    gone = await run_client(client, "--task", "0" * 32)
    assert gone.status == 2 and "task_not_found" in gone.stderr


async def test_usage_errors_say_what_to_do(make_service: ServiceFactory) -> None:
    client = await make_service(api_keys="key-a")
    for args, message in (
        (["--server", "127.0.0.1:8080", "x.jpg"], "ics: error: --server 127.0.0.1:8080: give the service's URL with "
         "its scheme, e.g. http://127.0.0.1:8080"),
        (["--task", "abc", "x.jpg"], "ics: error: --task reads a task submitted earlier: give no IMAGE, --urls-file, "
         "-r or --resume with it"),
        ([], "ics: error: give at least one IMAGE or --urls-file (or --task ID)"),
    ):  # fmt: skip
        run = await run_client(client, *args)  # a later --server wins over the one run_client gives
        assert run.status == 2 and run.stderr.strip().splitlines()[-1] == message, run.stderr
        assert "Traceback" not in run.stderr

    version = await run_client(client, "--version")
    assert (version.status, version.stdout) == (0, f"ics {__version__}\n")

    no_key = await run_client(client, "--task", "0" * 32)
    assert no_key.status == 2
    assert no_key.stderr.strip() == (
        "error: the service refused the request: unauthorized: a valid API key is required: Authorization: Bearer "
        "<key> (set the environment variable ICS_API_KEY to one of the service's API keys)"
    )
