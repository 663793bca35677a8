"""Two live replicas on one Redis: a Redis that stalls (SIGSTOP, then SIGCONT; issue 34,
item 2), a replica that stops cleanly, the deployment-wide limit.

The stall used to make a live replica adopt the other's tasks when Redis resumed (every lease
had run out by Redis's clock meanwhile) and download their images a second time; a request
waited 30-40 s for an answer. Now no task is adopted for a lease after Redis was silent, a
replica whose own lease ran out adopts nothing, and requests answer 503 within ~2 s."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from service.api.appkeys import REGISTRY
from service.stores.redis.registry import RedisRegistry
from testing.redis_server import RedisServer
from tests.conftest import ImageServer, ServiceFactory, submit, wait_for_task

pytestmark = pytest.mark.e2e  # a real redis-server, stopped and continued

LEASE = 1.0  # seconds
STALL = 3.5  # seconds: several leases


async def test_a_stall_makes_no_live_replica_adopt_and_requests_fail_fast(
    make_service: ServiceFactory, image_server: ImageServer, redis: RedisServer
) -> None:
    settings = {"redis": redis.url, "lease": LEASE, "download_concurrency": 2}
    first, second = await make_service(**settings), await make_service(**settings)
    urls = [image_server.url(f"/slow/coffee?delay=0.1&n={n}") for n in range(20)]
    tasks = [(await submit(client, urls))["task_id"] for client in (first, second)]
    await asyncio.sleep(0.3)  # both replicas are downloading

    assert redis.process is not None
    os.kill(redis.process.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        response = await first.get(f"/tasks/{tasks[0]}")
        assert response.status == 503 and (await response.json())["error"]["code"] == "store_unavailable"
        ready = await first.get("/readyz")
        assert ready.status == 503
        assert time.monotonic() - started < 6  # two requests, ~2 s each at most (it was 30-40 s)
        await asyncio.sleep(max(0.0, STALL - (time.monotonic() - started)))
    finally:
        os.kill(redis.process.pid, signal.SIGCONT)

    done = [
        await wait_for_task(client, task_id, timeout=60) for client, task_id in zip((first, second), tasks, strict=True)
    ]
    assert [task["progress"]["done"] for task in done] == [20, 20]  # (the fake pool calls photos not_an_image)
    await asyncio.sleep(3 * LEASE)  # time for any adoption to have happened
    assert image_server.hits["/slow/coffee"] == 40  # every image downloaded once: no task adopted


async def test_a_replica_that_stops_cleanly_hands_its_tasks_over_at_once(
    make_service: ServiceFactory, image_server: ImageServer, redis: RedisServer
) -> None:
    """Its lease is given back as it stops: the other replica adopts at its next look (every
    half lease), not after the lease has run out."""
    settings = {"redis": redis.url, "lease": 8.0, "download_concurrency": 1, "shutdown_grace": 0}
    leaving, staying = await make_service(**settings), await make_service(**settings)
    task_id = (await submit(leaving, [image_server.url(f"/slow/coffee?delay=0.3&n={n}") for n in range(12)]))["task_id"]
    await asyncio.sleep(0.5)
    await leaving.close()
    stopped = time.monotonic()
    registry = staying.server.app[REGISTRY]
    assert isinstance(registry, RedisRegistry)
    async with asyncio.timeout(15):
        while (await registry.client.hget(f"ics:task:{task_id}", "replica")) != registry.replica.encode():
            await asyncio.sleep(0.1)
    assert time.monotonic() - stopped < 6  # a look every 4 s; the lease alone would take 8 s and more
    assert (await wait_for_task(staying, task_id))["progress"]["done"] == 12


async def test_the_limit_of_unfinished_images_holds_across_replicas(
    make_service: ServiceFactory, image_server: ImageServer, redis: RedisServer
) -> None:
    settings = {"redis": redis.url, "max_active_images": 4, "download_concurrency": 1}
    first, second = await make_service(**settings), await make_service(**settings)
    await submit(first, [image_server.url(f"/slow/coffee?delay=2&n={n}") for n in range(3)])
    response = await second.post("/submit", json={"urls": [image_server.url("/photos/coffee")] * 2})
    assert response.status == 429 and (await response.json())["error"]["code"] == "too_busy"
    await submit(second, [image_server.url("/photos/coffee")])  # one fits


async def test_a_dead_replicas_upload_fails_upload_lost_and_its_urls_go_on(
    make_service: ServiceFactory, image_server: ImageServer, redis: RedisServer
) -> None:
    """An uploaded file lives in the replica that took it until it is queued: a replica that
    dies first leaves its item to fail `upload_lost`, and the adopter downloads the rest."""
    dead = await RedisRegistry.open(redis.url, 3600, 100, lease=0.5, watch=False)  # never renews: it "dies"
    task = await dead.create(["upload:cat.jpg", image_server.url("/photos/coffee")], "efficientnet_lite0", 1)
    await dead.link.close()
    adopter = await make_service(redis=redis.url, lease=1.0)
    done = await wait_for_task(adopter, task.task_id, timeout=30)
    assert [item["status"] for item in done["items"]] == ["failed", "failed"]  # (the fake pool: not_an_image)
    assert [item["error"]["code"] for item in done["items"]] == ["upload_lost", "not_an_image"]


async def test_a_dead_replicas_webhook_delivery_is_taken_over(redis: RedisServer) -> None:
    """A delivery a replica was trying when it died goes to another after three leases."""
    first = await RedisRegistry.open(redis.url, 3600, 100, lease=0.5, watch=False)  # renews nothing: it "dies"
    task = await first.create(["http://203.0.113.9/a.jpg"], "m", 1, callback_url="http://203.0.113.9/hook")
    await first.cancel(task.task_id)
    taken = await asyncio.wait_for(first.next_delivery(), 5)  # held by the first replica, never finished
    await first.link.close()
    second = await RedisRegistry.open(redis.url, 3600, 100, lease=0.5)
    try:
        again = await asyncio.wait_for(second.next_delivery(), 10)
        assert again.delivery_id == taken.delivery_id and again.task_id == task.task_id
    finally:
        await second.close()
