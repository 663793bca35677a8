"""Live progress over Server-Sent Events: every item's result once, in completion order,
then the final event, for several watchers at once; a watcher may leave at any time."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp.test_utils import TestClient

from client.api import read_events as parse_events
from service.api.events import EVENT_PING_SECONDS
from tests.conftest import ImageServer, ServiceFactory, metric, submit, wait_for_task


async def read_events(client: TestClient, task_id: str) -> list[tuple[str, dict[str, Any]]]:
    """Every (event, data) of one stream, until the server closes it."""
    async with client.get(f"/tasks/{task_id}/events") as response:
        assert response.status == 200
        assert response.content_type == "text/event-stream"
        return [(name, json.loads(data)) async for name, data in parse_events(response)]


async def test_two_watchers_see_every_result_once_in_completion_order(
    make_service: ServiceFactory, image_server: ImageServer
) -> None:
    client = await make_service()
    urls = [
        image_server.url("/slow/chelsea?delay=1.6"),
        image_server.url("/status/404"),
        image_server.url("/slow/coffee?delay=0.8"),
        image_server.url("/photos/rocket"),
    ]
    task_id = (await submit(client, urls))["task_id"]
    first, second = await asyncio.gather(read_events(client, task_id), read_events(client, task_id))
    task = await wait_for_task(client, task_id)

    for events in (first, second):
        names = [name for name, _ in events]
        assert names[0] == "progress" and names[-1] == "end", events
        items = [data for name, data in events if name == "item"]
        assert sorted(item["index"] for item in items) == [0, 1, 2, 3]  # each exactly once
        assert [item["index"] for item in items][-2:] == [2, 0]  # the slow ones, in the order they finished
        assert {item["index"]: item for item in items} == {item["index"]: item for item in task["items"]}
        end = events[-1][1]
        assert end["status"] == "completed" and end["progress"]["done"] == 4
        progress = [data["done"] for name, data in events if name == "progress"]
        assert progress == sorted(progress) and progress[-1] == 4
    assert [data for name, data in first if name == "item"] == [data for name, data in second if name == "item"]


async def test_progress_events_carry_the_status_and_tell_when_the_task_starts(
    make_service: ServiceFactory, image_server: ImageServer
) -> None:
    client = await make_service(download_concurrency=1)
    # The one download slot is held by another task's image host that never answers in time,
    # so the watched task waits, queued, until that download times out.
    await submit(client, [image_server.url("/hang")])
    task_id = (await submit(client, [image_server.url("/photos/coffee")]))["task_id"]
    events = await read_events(client, task_id)
    assert [name for name, _ in events] == ["progress", "progress", "item", "progress", "end"], events
    statuses = [(data["status"], data["done"]) for name, data in events if name == "progress"]
    assert statuses == [("queued", 0), ("running", 0), ("completed", 1)]
    assert events[0][1] == {"total": 1, "done": 0, "succeeded": 0, "failed": 0, "cancelled": 0, "status": "queued"}
    assert events[-1][1]["status"] == "completed"


async def test_a_long_poll_answers_when_the_task_starts(
    make_service: ServiceFactory, image_server: ImageServer
) -> None:
    client = await make_service(download_concurrency=1)
    await submit(client, [image_server.url("/hang")])
    task_id = (await submit(client, [image_server.url("/slow/coffee?delay=5")]))["task_id"]
    assert (await (await client.get(f"/tasks/{task_id}")).json())["status"] == "queued"
    started = await (await client.get(f"/tasks/{task_id}?wait=20")).json()
    assert started["status"] == "running" and started["progress"]["done"] == 0


async def test_a_late_watcher_gets_the_history_and_unknown_tasks_are_404(
    make_real_service: ServiceFactory, image_server: ImageServer
) -> None:
    client = await make_real_service()
    task_id = (await submit(client, [image_server.url("/photos/coffee")]))["task_id"]
    await wait_for_task(client, task_id)
    events = await read_events(client, task_id)
    assert [name for name, _ in events] == ["progress", "item", "progress", "end"]
    assert events[1][1]["labels"][0]["label"] == "espresso"
    response = await client.get("/tasks/nope/events")
    assert response.status == 404
    assert (await response.json())["error"]["code"] == "task_not_found"


async def test_a_watcher_that_leaves_costs_nothing(make_service: ServiceFactory, image_server: ImageServer) -> None:
    client = await make_service()
    task_id = (await submit(client, [image_server.url("/slow/coffee?delay=30")]))["task_id"]
    response = await client.get(f"/tasks/{task_id}/events")
    assert (await response.content.readline()).startswith(b"event: progress")
    assert await metric(client, "ics_event_streams") == 1
    response.close()  # gone while the task still runs
    async with asyncio.timeout(EVENT_PING_SECONDS * 3):  # noticed at the next ping at the latest
        while await metric(client, "ics_event_streams"):
            await asyncio.sleep(0.1)
    still = await (await client.get(f"/tasks/{task_id}")).json()
    assert still["status"] in ("queued", "running")  # the stream closed on the watcher leaving, not on the task
    cancelled = await (await client.post(f"/tasks/{task_id}/cancel")).json()
    assert cancelled["status"] == "cancelled"


async def test_long_poll_answers_when_the_task_changes_or_the_wait_runs_out(
    make_real_service: ServiceFactory, image_server: ImageServer
) -> None:
    client = await make_real_service(read_timeout=60.0, download_timeout=60.0)
    loop = asyncio.get_running_loop()
    urls = [image_server.url("/slow/coffee?delay=1.5"), image_server.url("/slow/chelsea?delay=30")]
    task_id = (await submit(client, urls))["task_id"]

    started = loop.time()
    changed = await (await client.get(f"/tasks/{task_id}?wait=20")).json()
    assert changed["progress"]["done"] == 1  # answered when the first image finished, not at 20 s
    assert changed["items"][0]["labels"][0]["label"] == "espresso"
    assert 1.0 < loop.time() - started < 10

    started = loop.time()
    again = await (await client.get(f"/tasks/{task_id}?wait=0.5&done=0")).json()  # the client saw done=0
    assert again["progress"]["done"] == 1 and loop.time() - started < 0.4  # more are done: at once

    started = loop.time()
    unchanged = await (await client.get(f"/tasks/{task_id}?wait=0.5")).json()
    assert unchanged["status"] == "running" and loop.time() - started >= 0.5  # nothing changed: the wait ran out

    waiting = asyncio.ensure_future(client.get(f"/tasks/{task_id}?wait=20"))
    await asyncio.sleep(0.2)
    await client.post(f"/tasks/{task_id}/cancel")
    cancelled = await (await waiting).json()  # a cancel is a change too
    assert cancelled["status"] == "cancelled"

    for query, code in [
        ("wait=61", "invalid_wait"),
        ("wait=soon", "invalid_wait"),
        ("done=-1", "invalid_done"),
        ("timeout=5", "unknown_parameter"),
    ]:
        response = await client.get(f"/tasks/{task_id}?{query}")
        assert (response.status, (await response.json())["error"]["code"]) == (400, code), query
    response = await client.get("/tasks/nope?wait=20")
    assert response.status == 404
