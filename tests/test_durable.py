"""Durable tasks: the SQLite store in a data dir keeps everything a client was told across a
kill -9 of the whole service and a SIGTERM, resumes interrupted tasks, refuses bad data dirs
with a one-line reason, reports write failures on /readyz, and stays bounded on disk."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from client.api import read_events
from service.metrics import Metrics
from service.stores.sqlite.journal import DATABASE, StoreError
from service.stores.sqlite.loader import page_query
from service.stores.sqlite.registry import SqliteRegistry
from service.stores.sqlite.schema import SCHEMA, SCHEMA_VERSION
from service.tasks.idempotency import IdempotencyKey
from service.tasks.records import ItemStatus, Label, Priority, TaskStatus
from testing.services import ROOT, kill_group, service_command
from tests.conftest import PHOTOS_DIR, ImageServer, ServiceFactory, running_service, scrape, submit

pytestmark = pytest.mark.e2e  # real services killed and restarted

FINAL = ("completed", "failed", "cancelled")


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.get(url) as response:
        return response.status, await response.json()


async def wait_for(http: aiohttp.ClientSession, base: str, task_id: str, done: int | None = None) -> dict[str, Any]:
    """The task once it is final (or once `done` items are)."""
    async with asyncio.timeout(120):
        while True:
            status, task = await get(http, f"{base}/tasks/{task_id}")
            assert status == 200, task
            if task["status"] in FINAL or (done is not None and task["progress"]["done"] >= done):
                return task  # type: ignore[no-any-return]
            await asyncio.sleep(0.1)


async def post(http: aiohttp.ClientSession, base: str, **kwargs: Any) -> str:
    async with http.post(f"{base}/submit", **kwargs) as response:
        assert response.status == 202, await response.text()
        return str((await response.json())["task_id"])


def upload_form(*files: str, urls: list[str]) -> aiohttp.FormData:
    form = aiohttp.FormData()
    for name in files:
        form.add_field("files", (PHOTOS_DIR / name).read_bytes(), filename=name, content_type="image/jpeg")
    for url in urls:
        form.add_field("urls", url)
    return form


def final_items(task: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {item["index"]: item for item in task["items"] if item["status"] in ("succeeded", "failed", "cancelled")}


async def test_a_kill_9_and_a_sigterm_lose_nothing_a_client_was_told(image_server: ImageServer, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    slow = [image_server.url(f"/slow/coffee?delay=0.3&n={n}") for n in range(24)]
    async with aiohttp.ClientSession() as http:
        async with running_service("--data-dir", str(data_dir), "--download-concurrency", "2") as (process, base):
            done_urls = await post(http, base, json={"urls": [image_server.url("/photos/chelsea")]})
            done_upload = await post(http, base, data=upload_form("coffee.jpg", urls=[]))
            finished = {task_id: await wait_for(http, base, task_id) for task_id in (done_urls, done_upload)}
            big = await post(http, base, data=upload_form("rocket.jpg", urls=slow))
            before_crash = final_items(await wait_for(http, base, big, done=6))
            workers = psutil.Process(process.pid).children(recursive=True)
            # A delete and a cancel answered 200, then the kill at once: both were on disk before the 200.
            deleted = await post(http, base, json={"urls": [image_server.url("/slow/rocket?delay=30")]})
            cancelled = await post(http, base, json={"urls": [image_server.url("/slow/rocket?delay=30")]})
            async with http.delete(f"{base}/tasks/{deleted}") as response:
                assert response.status == 200
            async with http.post(f"{base}/tasks/{cancelled}/cancel") as response:
                assert response.status == 200 and (await response.json())["status"] == "cancelled"
            kill_group(process.pid)  # the web process and its workers, all at once
            process.wait()
            psutil.wait_procs(workers, timeout=10)

        async with running_service(
            "--data-dir", str(data_dir), "--download-concurrency", "2", "--shutdown-grace", "0.5"
        ) as (
            process,
            base,
        ):
            for task_id, task in finished.items():
                assert await get(http, f"{base}/tasks/{task_id}") == (200, task)  # unchanged, uploads included
            assert (await get(http, f"{base}/tasks/{deleted}"))[0] == 404  # deleted before the crash: stays so
            assert (await get(http, f"{base}/tasks/{cancelled}"))[1]["status"] == "cancelled"
            resumed = await wait_for(http, base, big)
            assert resumed["status"] == "completed"
            assert resumed["progress"]["succeeded"] == 25, resumed["items"]
            for index, item in before_crash.items():
                assert resumed["items"][index] == item  # results seen before the crash are the same
            assert resumed["items"][0]["labels"][0]["label"] == "missile"  # the spooled upload was classified
            assert not (data_dir / "uploads" / big).exists()
            async with http.get(f"{base}/tasks/{big}/events") as response:  # a late watcher gets the history
                events = [(name, json.loads(data)) async for name, data in read_events(response)]
            assert sorted(data["index"] for name, data in events if name == "item") == list(range(25))
            listing = (await get(http, f"{base}/tasks"))[1]
            assert {task["task_id"] for task in listing["tasks"]} == {done_urls, done_upload, big, cancelled}

            # SIGTERM with a task running: the grace bounds the exit, and the task is kept.
            interrupted = await post(http, base, json={"urls": slow[:12]})
            before_stop = final_items(await wait_for(http, base, interrupted, done=2))
            loop = asyncio.get_running_loop()
            stopped = loop.time()
            process.send_signal(signal.SIGTERM)
            output = (await asyncio.to_thread(process.communicate, timeout=60))[0].decode()
            assert process.returncode == 0, output
            assert loop.time() - stopped < 15
            assert "active tasks are kept and resume at the next start" in output

        async with running_service("--data-dir", str(data_dir)) as (process, base):
            task = await wait_for(http, base, interrupted)
            assert task["status"] == "completed" and task["progress"]["succeeded"] == 12
            for index, item in before_stop.items():
                assert task["items"][index] == item


async def start_on(data_dir: Path) -> subprocess.CompletedProcess[str]:
    """`run_service.py` on `data_dir`, as a user starts it, to its exit (a refused start)."""
    command = service_command(0, "--data-dir", str(data_dir))
    return await asyncio.to_thread(subprocess.run, command, cwd=ROOT, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("prepare", "reason"),
    [
        ("file", "is not usable"),
        ("corrupt", "cannot be used"),
        ("newer", "written by a newer version"),
    ],
)
async def test_a_bad_data_dir_is_refused_with_one_line(tmp_path: Path, prepare: str, reason: str) -> None:
    data_dir = tmp_path / "data"
    if prepare == "file":
        data_dir.write_text("a file where the data dir should be")
    else:
        data_dir.mkdir()
        if prepare == "corrupt":
            (data_dir / DATABASE).write_bytes(b"this is not a database " * 100)
        else:
            with sqlite3.connect(data_dir / DATABASE) as connection:
                connection.execute("PRAGMA user_version = 99")
    with pytest.raises(StoreError, match=reason):
        await SqliteRegistry.open(data_dir, 3600, 100, Metrics())
    # The service as a user runs it: exit status 1, the reason, no traceback, no worker started.
    result = await start_on(data_dir)
    assert result.returncode == 1, result.stderr
    assert reason in result.stderr and "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if "ERROR" in line]) == 1


async def test_a_data_dir_in_use_by_another_instance_is_refused(tmp_path: Path) -> None:
    holder = await SqliteRegistry.open(tmp_path, 3600, 100, Metrics())
    try:
        with pytest.raises(StoreError, match=f"in use by another running instance \\(pid {os.getpid()}\\)"):
            await SqliteRegistry.open(tmp_path, 3600, 100, Metrics())
        result = await start_on(tmp_path)
        assert result.returncode == 1 and "in use by another running instance" in result.stderr
    finally:
        await holder.close()
    await (await SqliteRegistry.open(tmp_path, 3600, 100, Metrics())).close()  # free again once it closed


async def test_a_failing_write_makes_readyz_503_and_submit_503_until_it_works_again(
    make_service: ServiceFactory, image_server: ImageServer, tmp_path: Path
) -> None:
    client = await make_service(data_dir=tmp_path)
    assert (await client.get("/readyz")).status == 200
    blocker = sqlite3.connect(tmp_path / DATABASE)
    blocker.execute("BEGIN EXCLUSIVE")  # another process holds the database: every write waits, then fails
    try:
        response = await client.post("/submit", json={"urls": [image_server.url("/photos/coffee")]})
        assert response.status == 503
        assert (await response.json())["error"]["code"] == "store_unavailable"
        assert response.headers["Retry-After"].isdigit()
        ready = await client.get("/readyz")
        assert ready.status == 503 and (await ready.json())["error"]["code"] == "not_ready"
        assert (await (await client.get("/tasks")).json())["tasks"] == []  # the refused task was not kept
        samples = await scrape(client)
        assert samples[("ics_store_write_errors_total", ())] >= 1
        assert samples[("ics_store_bytes", ())] > 0
    finally:
        blocker.rollback()
        blocker.close()
    async with asyncio.timeout(15):  # the store retries, and readiness comes back by itself
        while (await client.get("/readyz")).status != 200:
            await asyncio.sleep(0.2)
    accepted = await submit(client, [image_server.url("/photos/coffee")])
    assert accepted["status"] == "queued"
    async with asyncio.timeout(5):  # what was queued meanwhile is written within moments
        while (samples := await scrape(client))[("ics_store_pending_changes", ())] != 0:
            await asyncio.sleep(0.05)
    assert samples[("ics_store_write_seconds_count", ())] >= 1


class FakeClock:
    def __init__(self) -> None:
        self.now = 2_000_000_000.0

    def __call__(self) -> float:
        return self.now


async def finish(registry: SqliteRegistry, items: int) -> str:
    task = await registry.create([f"http://example.com/{n}" for n in range(items)], "m", 1)
    for index in range(items):
        labels = [Label(label="espresso " * 8, class_index=967, score=0.5)]
        await registry.update_item(task.task_id, index, ItemStatus.SUCCEEDED, labels=labels)
    return task.task_id


async def test_expired_tasks_leave_the_disk_and_the_file_stops_growing(tmp_path: Path) -> None:
    clock = FakeClock()
    registry = await SqliteRegistry.open(tmp_path, 60, 50, Metrics(), clock=clock)
    sizes = []
    for _ in range(4):  # each round finishes 200 tasks; the last 50 are all that may be kept
        for _ in range(200):
            await finish(registry, 20)
        await registry.journal.flush()
        sizes.append(registry.journal.size_bytes())
    with sqlite3.connect(tmp_path / DATABASE) as connection:
        assert connection.execute("SELECT count(*) FROM tasks").fetchone()[0] == 50
        assert connection.execute("SELECT count(*) FROM items").fetchone()[0] == 0  # final tasks keep a snapshot
    assert sizes[3] <= sizes[1] * 1.1, sizes  # pages are reused or returned: no growth round after round
    kept = await finish(registry, 3)
    clock.now += 61
    await registry.close()

    reopened = await SqliteRegistry.open(tmp_path, 60, 50, Metrics(), clock=clock)
    try:
        assert await reopened.get(kept) is None  # expired while the service was down: deleted at start
        assert (await reopened.page(None, 10, None)).tasks == []
        with sqlite3.connect(tmp_path / DATABASE) as connection:
            assert connection.execute("SELECT count(*) FROM tasks").fetchone()[0] == 0
    finally:
        await reopened.close()


async def test_the_space_of_expired_tasks_and_keys_goes_back_to_the_file_system(tmp_path: Path) -> None:
    """Issue 34, item 5: the incremental vacuum ran through `execute().fetchall()`, which frees
    one page per call: 880 of 1,442 pages stayed free once every task had expired."""
    clock, metrics = FakeClock(), Metrics()
    registry = await SqliteRegistry.open(tmp_path, 60, 10_000, metrics, clock=clock, idempotency_ttl=60)
    try:
        for n in range(300):
            task = await registry.create(
                ["http://example.com/a"] * 20, "m", 1, idempotency=IdempotencyKey(f"k{n}", "f")
            )
            for index in range(20):
                labels = [Label(label="espresso " * 8, class_index=967, score=0.5)]
                await registry.update_item(task.task_id, index, ItemStatus.SUCCEEDED, labels=labels)
        await registry.journal.flush()
        await registry.observe()
        full = metrics.registry.get_sample_value("ics_store_bytes")
        clock.now += 61
        assert (await registry.page(None, 10, None)).tasks == []  # every task and key expired
        await registry.journal.flush()
        await registry.observe()
        with sqlite3.connect(tmp_path / DATABASE) as connection:
            pages = connection.execute("PRAGMA page_count").fetchone()[0]
            free = connection.execute("PRAGMA freelist_count").fetchone()[0]
            assert connection.execute("SELECT count(*) FROM submissions").fetchone()[0] == 0
        assert free < 0.1 * pages, (free, pages)
        assert full is not None
        assert metrics.registry.get_sample_value("ics_store_bytes") < full / 4  # type: ignore[operator]
    finally:
        await registry.close()


async def test_a_reopened_store_has_every_task_as_it_was(tmp_path: Path) -> None:
    registry = await SqliteRegistry.open(tmp_path, 3600, 100, Metrics())
    done = await finish(registry, 3)
    running = await registry.create(["u0", "u1", "u2"], "m", 2, owner="alice")
    await registry.update_item(running.task_id, 2, ItemStatus.SUCCEEDED, labels=[Label("cup", 968, 0.7)])
    await registry.update_item(running.task_id, 0, ItemStatus.CLASSIFYING)
    cancelled = await registry.create(["u"], "m", 1)
    await registry.cancel(cancelled.task_id)
    snapshots = {task_id: await registry.get_json(task_id) for task_id in (done, cancelled.task_id)}
    before = await registry.get(running.task_id, owner="alice")
    await registry.close()  # what close does not flush is flushed within FLUSH_SECONDS anyway

    reopened = await SqliteRegistry.open(tmp_path, 3600, 100, Metrics())
    try:
        for task_id, snapshot in snapshots.items():
            assert await reopened.get_json(task_id) == snapshot
        assert await reopened.get(running.task_id) is None  # still alice's
        task = await reopened.get(running.task_id, owner="alice")
        assert task is not None and before is not None
        assert task.status is TaskStatus.RUNNING and task.started_at == before.started_at
        assert [item.status for item in task.items] == [ItemStatus.PENDING, ItemStatus.PENDING, ItemStatus.SUCCEEDED]
        assert task.items[2] == before.items[2]
        update = await reopened.follow(running.task_id, 0, owner="alice", wait=False)
        assert update is not None and [item.index for item in update.items] == [2]  # completion order kept
        assert await reopened.unfinished_images() == 2
        assert [task.task_id for task, _ in await reopened.active()] == [running.task_id]
        newer = await reopened.create(["x"], "m", 1)
        page = await reopened.page(None, 10, None)
        assert [summary.task_id for summary in page.tasks] == [newer.task_id, cancelled.task_id, done]
    finally:
        await reopened.close()


# The tables as the first durable version (schema 1) wrote them: no tasks.precision.
SCHEMA_V1 = (
    SCHEMA.replace("    precision TEXT NOT NULL DEFAULT 'fp32',\n", "")
    .replace("    priority TEXT NOT NULL DEFAULT 'interactive',\n", "")
    .replace(",\n    webhook TEXT\n", "\n")
)


async def test_a_data_dir_of_the_previous_version_is_upgraded_in_place(tmp_path: Path) -> None:
    assert SCHEMA_V1 != SCHEMA
    registry = await SqliteRegistry.open(tmp_path, 3600, 100, Metrics())
    done = await finish(registry, 2)
    running = await registry.create(["u0", "u1"], "m", 1, precision="bf16")
    await registry.update_item(running.task_id, 1, ItemStatus.SUCCEEDED, labels=[Label("cup", 968, 0.7)])
    await registry.close()
    with sqlite3.connect(tmp_path / DATABASE) as connection:  # rewrite it as schema 1 had it
        old = json.loads(connection.execute("SELECT snapshot FROM tasks WHERE task_id = ?", (done,)).fetchone()[0])
        del old["precision"], old["priority"]
        rows = connection.execute("SELECT * FROM tasks").fetchall()
        columns = [column[1] for column in connection.execute("PRAGMA table_info(tasks)")]
        items = connection.execute("SELECT * FROM items").fetchall()
        connection.executescript(
            "DROP TABLE tasks; DROP TABLE items; DROP TABLE submissions; DROP TABLE deliveries;" + SCHEMA_V1
        )
        for row in rows:
            later = ("precision", "webhook", "priority")  # columns that schema 1 did not have
            values = {name: value for name, value in zip(columns, row, strict=True) if name not in later}
            if values["task_id"] == done:
                values["snapshot"] = json.dumps(old).encode()
            marks = ", ".join("?" * len(values))
            connection.execute(f"INSERT INTO tasks ({', '.join(values)}) VALUES ({marks})", tuple(values.values()))
        connection.executemany("INSERT INTO items VALUES (?, ?, ?, ?, ?, ?, ?)", items)
        connection.execute("PRAGMA user_version = 1")

    upgraded = await SqliteRegistry.open(tmp_path, 3600, 100, Metrics())
    try:
        finished = await upgraded.get(done)
        assert finished is not None and finished.precision == "fp32"  # every task before the upgrade ran fp32
        assert finished.priority is Priority.INTERACTIVE  # and was interactive
        assert json.loads(await upgraded.get_json(done) or b"")["precision"] == "fp32"
        assert json.loads(await upgraded.get_json(done) or b"")["priority"] == "interactive"
        resumed = await upgraded.get(running.task_id)
        assert (
            resumed is not None and resumed.precision == "fp32" and resumed.items[1].labels == [Label("cup", 968, 0.7)]
        )
        assert resumed.priority is Priority.INTERACTIVE
        assert [task.task_id for task, _ in await upgraded.active()] == [running.task_id]
    finally:
        await upgraded.close()
    with sqlite3.connect(tmp_path / DATABASE) as connection:
        assert connection.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"submissions", "deliveries"} <= tables


@pytest.mark.parametrize("status", [None, TaskStatus.RUNNING])
@pytest.mark.parametrize("owner", [None, "alice"])
def test_task_pages_are_read_by_index(tmp_path: Path, status: TaskStatus | None, owner: str | None) -> None:
    with sqlite3.connect(tmp_path / "plan.db") as connection:
        connection.executescript(SCHEMA)
        sql, args = page_query(owner, status, 1000, 51)
        plan = " ".join(row[-1] for row in connection.execute(f"EXPLAIN QUERY PLAN {sql}", args))
    assert "USING" in plan and "INDEX" in plan, plan
    assert "TEMP B-TREE" not in plan, plan  # no sort: the index gives newest first


async def test_sigterm_answers_watchers_at_once_and_the_grace_holds(image_server: ImageServer) -> None:
    """A long poll or an event stream on a running task used to hold the exit up for the whole
    shutdown timeout, and the stream got no last event."""
    slow = [image_server.url("/slow/coffee?delay=30")] * 2
    async with running_service("--shutdown-grace", "3") as (process, base), aiohttp.ClientSession() as http:
        task_id = await post(http, base, json={"urls": slow})

        async def long_poll() -> tuple[int, Any]:
            return await get(http, f"{base}/tasks/{task_id}?wait=60")

        async def stream() -> list[str]:
            async with http.get(f"{base}/tasks/{task_id}/events") as response:
                return [event async for event, _ in read_events(response)]

        watchers = asyncio.gather(long_poll(), stream())
        await asyncio.sleep(1.0)  # both are waiting now
        loop = asyncio.get_running_loop()
        stopped = loop.time()
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(2):
            (status, task), events = await watchers
        assert status == 200 and task["status"] == "running"
        assert events[0] == "progress" and events[-1] == "shutdown"
        await asyncio.to_thread(process.wait, 20)
        assert process.returncode == 0
        assert loop.time() - stopped < 3 + 5  # the grace, then closing down; not the 10 s shutdown timeout
