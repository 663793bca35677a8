"""Sharing the service: the fair gate (slots and queue room by priority, then task by task),
the fair batch queue, and the task engine on a fake pool with tasks of very different sizes
and priorities (small ones are not stuck behind a bulk job; batch work waits for interactive
work and uses every batch when alone). The Redis side: workers read interactive streams first."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import FormData

from inference.protocol import Outcome
from inference.specs import EMBEDDED, ModelInfo
from service.broker.local import BatchQueue
from service.broker.streams import StreamBatches, StreamJobs, stream_of
from service.stores.redis.registry import RedisRegistry
from service.tasks.classifier import PASSES_PER_BATCH
from service.tasks.engine import TaskEngine
from service.tasks.fairness import FairGate
from service.tasks.queues import ImageQueue, QueuedImage
from service.tasks.records import Priority, TaskStatus
from testing.redis_server import RedisServer
from tests.conftest import ImageServer, ServiceFactory, submit, wait_for_task
from tests.fakes import FakePool, image
from tests.test_task_service import Images, engine, final

INTERACTIVE, BATCH = Priority.INTERACTIVE, Priority.BATCH


@pytest.fixture
async def images(aiohttp_server: Callable[..., Any]) -> Images:
    served = Images()
    served.server = await aiohttp_server(served.app, host="127.0.0.1")
    return served


def job(task: str, index: int, priority: Priority = INTERACTIVE, model: str = "m") -> QueuedImage:
    return QueuedImage(task_id=task, index=index, model=model, top_k=1, data=b"", priority=priority)


async def waiters(gate: FairGate, *wanted: tuple[Priority, str]) -> list[asyncio.Task[None]]:
    """One acquire per `wanted`, started in this order, each left waiting."""
    started = []
    for priority, task_id in wanted:
        started.append(asyncio.create_task(gate.acquire(priority, task_id)))
        await asyncio.sleep(0)
    return started


async def granted_order(gate: FairGate, started: list[asyncio.Task[None]], names: list[str]) -> list[str]:
    """Release permits one at a time and tell whose acquire each went to."""
    order: list[str] = []
    for _ in started:
        gate.release()
        await asyncio.sleep(0)
        order += [name for name, task in zip(names, started, strict=True) if task.done() and name not in order]
    return order


async def test_the_gate_serves_interactive_first_then_tasks_in_turn() -> None:
    gate = FairGate(1)
    await gate.acquire(BATCH, "bulk")
    wanted = [(BATCH, "bulk"), (BATCH, "bulk"), (BATCH, "bulk"), (BATCH, "other"), (INTERACTIVE, "photo")]
    started = await waiters(gate, *wanted)
    names = ["bulk1", "bulk2", "bulk3", "other", "photo"]
    assert await granted_order(gate, started, names) == ["photo", "bulk1", "other", "bulk2", "bulk3"]


async def test_the_gate_keeps_its_reserve_for_interactive_work() -> None:
    gate = FairGate(4, reserved=1)
    for n in range(3):
        await gate.acquire(BATCH, f"bulk{n}")
    blocked = asyncio.create_task(gate.acquire(BATCH, "bulk"))
    await asyncio.sleep(0.01)
    assert not blocked.done()  # the last permit is interactive work's
    await asyncio.wait_for(gate.acquire(INTERACTIVE, "photo"), 1)
    gate.release()
    gate.release()
    await asyncio.wait_for(blocked, 1)
    with pytest.raises(ValueError, match="fewer than the permits"):
        FairGate(2, reserved=2)


async def test_a_waiter_cancelled_passes_its_turn_on() -> None:
    gate = FairGate(1)
    await gate.acquire(INTERACTIVE, "a")
    cancelled, waiting = await waiters(gate, (INTERACTIVE, "b"), (BATCH, "c"))
    cancelled.cancel()
    await asyncio.sleep(0)
    gate.release()
    await asyncio.wait_for(waiting, 1)
    # Granted, then cancelled before it ran: the permit is given back, not lost.
    lost = asyncio.create_task(gate.acquire(INTERACTIVE, "d"))
    await asyncio.sleep(0)
    gate.release()
    lost.cancel()
    await asyncio.gather(lost, return_exceptions=True)
    await asyncio.wait_for(gate.acquire(INTERACTIVE, "e"), 1)


async def test_a_batch_takes_interactive_images_first_then_one_per_task_in_turn() -> None:
    queue = BatchQueue(capacity=100)
    for n in range(6):
        await queue.put(job("bulk", n, BATCH))
    for n in range(3):
        await queue.put(job("big", n))
    await queue.put(job("photo", 0))
    assert await depths(queue) == {INTERACTIVE: 4, BATCH: 6}
    batch = await queue.next_batch(max_size=6, max_wait=0)
    assert [(j.task_id, j.index) for j in batch] == [
        ("big", 0),
        ("photo", 0),
        ("big", 1),
        ("big", 2),
        ("bulk", 0),
        ("bulk", 1),
    ]
    assert await depths(queue) == {INTERACTIVE: 0, BATCH: 4}


async def test_the_backlog_is_counted_by_model_and_priority_with_the_oldest_age() -> None:
    queue = BatchQueue(capacity=100)
    now = time.time()
    await queue.put(QueuedImage("bulk", 0, "m", 1, b"", priority=BATCH, queued_at=now - 7))
    await queue.put(QueuedImage("bulk", 1, "m", 1, b"", priority=BATCH, queued_at=now - 1))
    await queue.put(QueuedImage("other", 0, "m", 1, b"", priority=BATCH, queued_at=now - 3))
    await queue.put(QueuedImage("photo", 0, "m", 1, b"", queued_at=now - 2))
    waiting = {(b.model, b.priority): b for b in await queue.backlog(["m", "x"])}
    assert {which: b.images for which, b in waiting.items()} == {
        ("m", INTERACTIVE): 1,
        ("m", BATCH): 3,
        ("x", INTERACTIVE): 0,
        ("x", BATCH): 0,
    }
    assert waiting[("m", BATCH)].oldest_seconds == pytest.approx(7, abs=0.5)
    assert waiting[("m", INTERACTIVE)].oldest_seconds == pytest.approx(2, abs=0.5)
    assert waiting[("x", BATCH)].oldest_seconds == 0


async def test_models_with_interactive_images_go_first_then_models_take_turns() -> None:
    queue = BatchQueue(capacity=100)
    for n in range(4):
        await queue.put(job("bulk", n, BATCH, model="x"))
    await queue.put(job("photo", 0, model="y"))
    await queue.put(job("other", 0, BATCH, model="z"))
    models = [(await queue.next_batch(max_size=2, max_wait=0))[0].model for _ in range(4)]
    assert models == ["y", "x", "z", "x"]


async def test_queue_room_goes_to_interactive_images_first() -> None:
    queue = BatchQueue(capacity=8)  # one place kept for interactive images
    for n in range(7):
        await queue.put(job("bulk", n, BATCH))
    blocked = asyncio.create_task(queue.put(job("bulk", 7, BATCH)))
    await asyncio.wait_for(queue.put(job("photo", 0)), 1)
    await asyncio.sleep(0.01)
    assert not blocked.done()
    await queue.next_batch(max_size=2, max_wait=0)
    await asyncio.wait_for(blocked, 1)


async def depths(queue: ImageQueue, model: str = "m") -> dict[Priority, int]:
    """Images of `model` waiting, by priority."""
    return {backlog.priority: backlog.images for backlog in await queue.backlog([model])}


async def waiting(engine: TaskEngine, priority: Priority) -> int:
    return sum(backlog.images for backlog in await engine.backlog() if backlog.priority is priority)


class SlowPool(FakePool):
    """A fake pool that takes `seconds` per batch (so images queue up, as behind a real model)."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    async def classify(self, model: ModelInfo, images: list[bytes], top_k: list[int]) -> list[Outcome]:
        await asyncio.sleep(self.seconds)
        return await super().classify(model, images, top_k)


async def test_small_tasks_finish_before_a_large_one_submitted_first(images: Images) -> None:
    """How far the large task got while each small one ran: a one-image task is in one of the
    next batches (first come, first served, it waited behind the queue's 64 images), and a
    50-image task shares the model with the large one image for image."""
    # Batches of 16 images: two forward passes of 8.
    async with engine(SlowPool(0.004), batch_size=16 // PASSES_PER_BATCH, max_queued_images=64) as running:
        large = await running.service.create(images.urls(*["cat"] * 1000), EMBEDDED.name, 1, None)

        async def large_done() -> int:
            task = await running.registry.get(large.task_id)
            assert task is not None
            return task.progress.done

        async with asyncio.timeout(10):
            while await large_done() < 100:  # its downloads hold every slot and its images fill the queue
                await asyncio.sleep(0.01)
        finished: list[str] = []
        progress: dict[str, int] = {}

        async def run(urls: list[str], name: str) -> None:
            before = await large_done()
            task = await running.service.create(urls, EMBEDDED.name, 1, None)
            await final(running.registry, task.task_id, timeout=60)
            progress[name] = await large_done() - before
            finished.append(name)

        async def run_large() -> None:
            await final(running.registry, large.task_id, timeout=60)
            finished.append("1000")

        async with asyncio.TaskGroup() as group:
            group.create_task(run(images.urls(*["dog"] * 50), "50"))
            group.create_task(run(images.urls("rocket"), "1"))
            group.create_task(run_large())
        assert finished == ["1", "50", "1000"]
        # First come, first served, the one image would have waited behind the queue's 64 images
        # and the batch at the pool: 80 or more. Fair, it waits for a slot, room and a batch.
        assert progress["1"] <= 64, progress
        assert progress["50"] <= 130, progress
        done = await running.registry.get(large.task_id)
        assert done is not None and done.status is TaskStatus.COMPLETED and done.progress.succeeded == 1000


async def test_batch_work_waits_while_interactive_work_is_queued(images: Images) -> None:
    pool = FakePool()
    pool.hold.clear()
    async with engine(pool, batch_size=4, max_queued_images=64) as running:
        bulk = await running.service.create(images.urls(*["cat"] * 40), EMBEDDED.name, 1, None, priority=BATCH)
        async with asyncio.timeout(10):
            while await waiting(running.service, BATCH) < 30:
                await asyncio.sleep(0.01)
        photos = await running.service.create(images.urls("dog", "rocket", "dog"), EMBEDDED.name, 1, None)
        async with asyncio.timeout(10):
            while await waiting(running.service, INTERACTIVE) < 3:
                await asyncio.sleep(0.01)
        held = len(pool.batches)  # taken before the photos arrived
        pool.hold.set()
        await final(running.registry, photos.task_id)
        await final(running.registry, bulk.task_id)
    after = pool.batches[held]
    assert after[:3] == [b"label:dog", b"label:rocket", b"label:dog"]  # the next batch, first
    assert after[3] == b"label:cat"  # topped up with batch work


async def test_batch_work_alone_fills_every_batch(images: Images) -> None:
    pool = FakePool()
    pool.hold.clear()
    async with engine(pool, batch_size=8, max_queued_images=64) as running:
        bulk = await running.service.create(images.urls(*["cat"] * 64), EMBEDDED.name, 1, None, priority=BATCH)
        async with asyncio.timeout(10):
            while await waiting(running.service, BATCH) < 40:  # the queue fills while the pool holds
                await asyncio.sleep(0.01)
        pool.hold.set()
        done = await final(running.registry, bulk.task_id)
    assert done.progress.succeeded == 64
    sizes = [len(batch) for batch in pool.batches]
    assert sum(sizes) == 64
    full = 8 * PASSES_PER_BATCH  # two forward passes
    assert sizes[1:-1] == [full] * (len(sizes) - 2), sizes  # full, but for the first (taken at once) and the last


@pytest.mark.e2e
async def test_workers_read_interactive_streams_first(redis_server: RedisServer, redis_prefix: str) -> None:
    registry = await RedisRegistry.open(redis_server.url, 3600, 100, prefix=redis_prefix)
    bulk = await registry.create(["http://a/1"] * 20, "m", 1, priority=BATCH)
    photo = await registry.create(["http://a/2"] * 3, "m", 1)
    jobs = StreamJobs(registry.link, registry.prefix, capacity=100)
    batches = StreamBatches(registry.link, registry.prefix, registry, ["m"], "tests", claim_idle=30, max_deliveries=3)
    await batches.start()
    try:
        now = time.time()
        for n in range(20):
            await jobs.put(QueuedImage(bulk.task_id, n, "m", 1, b"x", priority=BATCH, queued_at=now))
        for n in range(3):
            await jobs.put(QueuedImage(photo.task_id, n, "m", 1, b"y", queued_at=now))
        assert await depths(jobs) == {INTERACTIVE: 3, BATCH: 20}
        await asyncio.sleep(0.05)
        waiting = {(b.model, b.priority): b for b in await jobs.backlog(["m", "other"])}
        assert {which: b.images for which, b in waiting.items()} == {
            ("m", INTERACTIVE): 3,
            ("m", BATCH): 20,
            ("other", INTERACTIVE): 0,
            ("other", BATCH): 0,
        }
        assert 0.04 <= waiting[("m", BATCH)].oldest_seconds < 5
        assert waiting[("other", BATCH)].oldest_seconds == 0
        batch = await batches.next_batch(max_size=8, max_wait=0.01)
        assert [(j.task_id, j.priority) for j in batch] == [(photo.task_id, INTERACTIVE)] * 3 + [
            (bulk.task_id, BATCH)
        ] * 5
        assert all(j.queued_at == pytest.approx(now) for j in batch)
        await batches.finished(batch)  # confirmed in both streams
        client = registry.link.client
        assert await client.xlen(stream_of(registry.prefix, "m")) == 0
        assert await client.xlen(stream_of(registry.prefix, "m", BATCH)) == 15
        rest = await batches.next_batch(max_size=16, max_wait=0)
        assert {j.priority for j in rest} == {BATCH} and len(rest) == 15
    finally:
        await batches.close()
        await jobs.close()
        await registry.close()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize("store", ["memory", "sqlite", pytest.param("redis", marks=pytest.mark.e2e)])
async def test_a_key_over_its_quota_gets_429_while_other_keys_are_admitted(
    make_service: ServiceFactory, image_server: ImageServer, store: str, request: pytest.FixtureRequest
) -> None:
    pool = FakePool()
    pool.hold.clear()  # nothing finishes: every image submitted stays unfinished
    backend: dict[str, Any] = {"store": store}
    if store == "redis":
        backend = {"redis": request.getfixturevalue("redis_server").url, "redis_prefix": str(uuid.uuid4())}
    client = await make_service(pool=pool, api_keys="alice,bob", max_active_images_per_key=3, **backend)
    photo = image_server.url("/photos/coffee")
    first = await client.post("/submit", json={"urls": [photo] * 2}, headers=auth("alice"))
    assert first.status == 202
    over = await client.post("/submit", json={"urls": [photo] * 2}, headers=auth("alice"))
    assert over.status == 429
    assert int(over.headers["Retry-After"]) >= 1
    error = (await over.json())["error"]
    assert error["code"] == "key_quota_exceeded"
    assert "--max-active-images-per-key" in error["message"] and "cancel" in error["message"]
    assert error["details"] == {"unfinished": 2, "limit": 3, "images": 2}
    form = FormData()  # a form is refused the same way
    form.add_field("urls", photo)
    form.add_field("files", image("cat"), filename="cat.jpg")
    refused_form = await client.post("/submit", data=form, headers=auth("alice"))
    assert (refused_form.status, (await refused_form.json())["error"]["code"]) == (429, "key_quota_exceeded")
    assert (await client.post("/submit", json={"urls": [photo] * 3}, headers=auth("bob"))).status == 202
    assert (await client.post("/submit", json={"urls": [photo]}, headers=auth("alice"))).status == 202  # room for 1
    await client.post(f"/tasks/{(await first.json())['task_id']}/cancel", headers=auth("alice"))
    assert (await client.post("/submit", json={"urls": [photo] * 2}, headers=auth("alice"))).status == 202
    pool.hold.set()


async def test_the_service_wide_limit_is_still_too_busy(
    make_service: ServiceFactory, image_server: ImageServer
) -> None:
    pool = FakePool()
    pool.hold.clear()
    client = await make_service(pool=pool, max_active_images=3)
    photo = image_server.url("/photos/coffee")
    assert (await client.post("/submit", json={"urls": [photo] * 3})).status == 202
    busy = await client.post("/submit", json={"urls": [photo]})
    assert busy.status == 429 and "Retry-After" in busy.headers
    assert (await busy.json())["error"]["code"] == "too_busy"
    pool.hold.set()


async def test_the_priority_is_shown_and_filters_the_list(
    make_service: ServiceFactory, image_server: ImageServer
) -> None:
    client = await make_service()
    photo = image_server.url("/photos/coffee")
    bulk = await submit(client, [photo], priority="batch")
    form = FormData()
    form.add_field("files", image("cat"), filename="cat.jpg")
    form.add_field("priority", "batch")
    uploaded = await client.post("/submit", data=form)
    assert uploaded.status == 202
    interactive = await submit(client, [photo])
    for task_id, priority in [
        (bulk["task_id"], "batch"),
        ((await uploaded.json())["task_id"], "batch"),
        (interactive["task_id"], "interactive"),
    ]:
        assert (await wait_for_task(client, task_id))["priority"] == priority
    listed = await (await client.get("/tasks", params={"priority": "interactive"})).json()
    assert [task["task_id"] for task in listed["tasks"]] == [interactive["task_id"]]
    assert {task["priority"] for task in (await (await client.get("/tasks")).json())["tasks"]} == {
        "batch",
        "interactive",
    }
    wrong = await client.get("/tasks", params={"priority": "urgent"})
    assert wrong.status == 400
    error = (await wrong.json())["error"]
    assert error["code"] == "invalid_priority" and "'interactive' or 'batch'" in error["message"]
