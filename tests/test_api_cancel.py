"""Cancelling really stops work: no new downloads, remaining items end cancelled."""

from __future__ import annotations

import asyncio

from aiohttp.test_utils import TestClient

from tests.conftest import ImageServer, ServiceFactory, submit

SLOW_IMAGES = 20


async def _start_slow_task(client: TestClient, image_server: ImageServer) -> str:
    urls = [image_server.url(f"/slow/coffee?delay=0.4&n={n}") for n in range(SLOW_IMAGES)]
    accepted = await submit(client, urls)
    async with asyncio.timeout(30):
        while image_server.total_hits("/slow") < 2:
            await asyncio.sleep(0.02)
    return accepted["task_id"]


async def _assert_downloads_stopped(image_server: ImageServer) -> int:
    await asyncio.sleep(0.2)  # a request sent just before the cancel may still be on its way in
    hits = image_server.total_hits("/slow")
    await asyncio.sleep(1.5)  # several download slots' worth of the server's delay
    assert image_server.total_hits("/slow") == hits
    assert hits < SLOW_IMAGES
    return hits


def _assert_cancelled_snapshot(task: dict, hits: int) -> None:
    assert task["status"] == "cancelled"
    assert task["finished_at"] is not None
    statuses = [item["status"] for item in task["items"]]
    assert set(statuses) <= {"succeeded", "cancelled"}
    assert statuses.count("cancelled") >= SLOW_IMAGES - hits
    progress = task["progress"]
    assert progress["done"] == progress["total"] == SLOW_IMAGES
    assert progress["cancelled"] == statuses.count("cancelled")
    for item in task["items"]:
        if item["status"] == "cancelled":
            assert item["labels"] is None


async def test_delete_stops_downloads_and_removes_the_task(
    make_service: ServiceFactory, image_server: ImageServer
) -> None:
    client = await make_service(download_concurrency=2)
    task_id = await _start_slow_task(client, image_server)

    response = await client.delete(f"/tasks/{task_id}")
    assert response.status == 200
    snapshot = await response.json()

    hits = await _assert_downloads_stopped(image_server)
    _assert_cancelled_snapshot(snapshot, hits)
    assert (await client.get(f"/tasks/{task_id}")).status == 404
    assert (await client.delete(f"/tasks/{task_id}")).status == 404
    listing = await (await client.get("/tasks")).json()
    assert task_id not in [task["task_id"] for task in listing["tasks"]]


async def test_cancel_keeps_the_task_visible_and_frozen(
    make_service: ServiceFactory, image_server: ImageServer
) -> None:
    client = await make_service(download_concurrency=2)
    task_id = await _start_slow_task(client, image_server)

    response = await client.post(f"/tasks/{task_id}/cancel")
    assert response.status == 200
    snapshot = await response.json()

    hits = await _assert_downloads_stopped(image_server)
    _assert_cancelled_snapshot(snapshot, hits)
    later = await (await client.get(f"/tasks/{task_id}")).json()
    assert later == snapshot  # nothing that was in flight changed it afterwards
    again = await client.post(f"/tasks/{task_id}/cancel")
    assert again.status == 200
    assert (await again.json()) == snapshot


async def test_cancel_leaves_other_tasks_running(make_real_service: ServiceFactory, image_server: ImageServer) -> None:
    client = await make_real_service(download_concurrency=2)
    doomed = await _start_slow_task(client, image_server)
    survivor = await submit(client, [image_server.url("/photos/coffee"), image_server.url("/photos/rocket")])
    await client.post(f"/tasks/{doomed}/cancel")
    async with asyncio.timeout(60):
        while True:
            task = await (await client.get(f"/tasks/{survivor['task_id']}")).json()
            if task["status"] == "completed":
                break
            await asyncio.sleep(0.05)
    assert [item["labels"][0]["label"] for item in task["items"]] == ["espresso", "missile"]


async def test_deleting_a_finished_task_returns_its_results(
    make_service: ServiceFactory, image_server: ImageServer
) -> None:
    client = await make_service()
    accepted = await submit(client, [image_server.url("/photos/coffee")])
    async with asyncio.timeout(60):
        while (task := await (await client.get(f"/tasks/{accepted['task_id']}")).json())["status"] != "completed":
            await asyncio.sleep(0.05)
    response = await client.delete(f"/tasks/{accepted['task_id']}")
    assert response.status == 200
    deleted = await response.json()
    assert deleted["status"] == "completed"
    assert deleted["items"] == task["items"]
