"""The consumer groups on a real Redis, without processes: workers that take images and
vanish (stop renewing, never confirm), and what the next workers make of that; consumers
that are gone for good; a Redis that lost its streams (the job streams', the webhooks')."""

from __future__ import annotations

import asyncio

import pytest

from inference.protocol import Label
from service.broker.streams import GROUP, StreamBatches, StreamJobs, stream_of
from service.metrics import Metrics
from service.stores.redis.registry import RedisRegistry
from service.tasks.queues import QueuedImage
from service.tasks.records import ItemStatus
from testing.redis_server import RedisServer


async def vanishing_worker(
    registry: RedisRegistry, name: str, timeout: float = 5.0, metrics: Metrics | None = None
) -> list[int]:
    """A worker that takes the next batch (within `timeout`) and dies with it; the indices it took."""
    worker = StreamBatches(
        registry.link, registry.prefix, registry, ["m"], name, claim_idle=0.2, max_deliveries=3, metrics=metrics
    )
    await worker.start()
    batch = await asyncio.wait_for(worker.next_batch(4, 0), timeout)
    await worker.close()
    return [job.index for job in batch]


async def test_an_abandoned_batch_is_claimed_and_an_image_that_keeps_killing_workers_fails(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    registry = await RedisRegistry.open(redis_server.url, 3600, 100, prefix=redis_prefix)
    task = await registry.create(["u0"], "m", 1)
    await registry.update_item(task.task_id, 0, ItemStatus.CLASSIFYING)
    await StreamJobs(registry.link, registry.prefix, 10).put(QueuedImage(task.task_id, 0, "m", 1, b"poison"))

    # Three workers in turn take it and die: each next one claims it once it has been idle.
    metrics = Metrics()
    for name in ("w0", "w1", "w2"):
        assert await vanishing_worker(registry, name, metrics=metrics) == [0]
        await asyncio.sleep(0.3)
    # A fourth delivery would be one too many: the image fails instead, and leaves the stream.
    with pytest.raises(TimeoutError):
        await vanishing_worker(registry, "w3", timeout=1.5, metrics=metrics)
    assert metrics.registry.get_sample_value("ics_claimed_images_total", {"reason": "idle"}) == 3
    assert metrics.registry.get_sample_value("ics_inference_failures_total", {"code": "worker_crashed"}) == 1
    failed = await registry.get(task.task_id)
    assert failed is not None and failed.status.value == "completed"
    assert failed.items[0].status is ItemStatus.FAILED
    assert failed.items[0].error is not None and failed.items[0].error.code == "worker_crashed"
    assert await registry.client.xlen(stream_of(registry.prefix, "m")) == 0
    await registry.close()


async def test_a_worker_renews_what_it_holds_so_nobody_claims_it_while_it_works(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    registry = await RedisRegistry.open(redis_server.url, 3600, 100, prefix=redis_prefix)
    task = await registry.create(["u0"], "m", 1)
    await StreamJobs(registry.link, registry.prefix, 10).put(QueuedImage(task.task_id, 0, "m", 1, b"slow"))
    busy = StreamBatches(registry.link, registry.prefix, registry, ["m"], "busy", claim_idle=0.2, max_deliveries=3)
    other = StreamBatches(registry.link, registry.prefix, registry, ["m"], "other", claim_idle=0.2, max_deliveries=3)
    await busy.start()
    await other.start()
    batch = await busy.next_batch(4, 0)
    with pytest.raises(TimeoutError):  # a batch that takes five claim periods is still busy's
        await asyncio.wait_for(other.next_batch(4, 0), 1.0)
    await busy.finished(batch)
    assert await registry.client.xlen(stream_of(registry.prefix, "m")) == 0
    await busy.close()
    await other.close()
    await registry.close()


async def test_a_full_stream_holds_puts_back_until_workers_take_images_off(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    registry = await RedisRegistry.open(redis_server.url, 3600, 100, prefix=redis_prefix)
    task = await registry.create(["u0", "u1", "u2"], "m", 1)
    jobs = StreamJobs(registry.link, registry.prefix, capacity=2)
    for index in (0, 1):
        await jobs.put(QueuedImage(task.task_id, index, "m", 1, b"image"))
    third = asyncio.create_task(jobs.put(QueuedImage(task.task_id, 2, "m", 1, b"image")))
    await asyncio.sleep(0.5)
    assert not third.done() and await registry.client.xlen(stream_of(registry.prefix, "m")) == 2
    worker = StreamBatches(registry.link, registry.prefix, registry, ["m"], "w", claim_idle=30, max_deliveries=3)
    await worker.start()
    await worker.finished(await worker.next_batch(1, 0))  # one classified: its entry and bytes go
    await asyncio.wait_for(third, 2)
    assert await registry.client.xlen(stream_of(registry.prefix, "m")) == 2
    await worker.close()
    await jobs.close()
    await registry.close()


async def consumer_names(registry: RedisRegistry, stream: str, group: str = GROUP) -> set[str]:
    return {consumer["name"].decode() for consumer in await registry.client.xinfo_consumers(stream, group)}


async def test_consumers_gone_for_good_are_forgotten_once_they_hold_nothing(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    registry = await RedisRegistry.open(redis_server.url, 3600, 100, prefix=redis_prefix)
    task = await registry.create(["u0", "u1"], "m", 1)
    jobs, stream, client = (
        StreamJobs(registry.link, registry.prefix, 10),
        stream_of(registry.prefix, "m"),
        registry.client,
    )
    sweeper = StreamBatches(
        registry.link, registry.prefix, registry, ["m"], "sweeper", claim_idle=0.2, max_deliveries=3
    )  # forgets after 2 s
    await sweeper.start()
    # Two workers killed with -9, as Redis sees them: one had confirmed its image, one holds its image.
    await jobs.put(QueuedImage(task.task_id, 0, "m", 1, b"image"))
    [[_, [(confirmed, _)]]] = await client.xreadgroup(GROUP, "gone-idle", {stream: ">"}, count=1)
    await client.xack(stream, GROUP, confirmed)
    await jobs.put(QueuedImage(task.task_id, 1, "m", 1, b"image"))
    await client.xreadgroup(GROUP, "gone-holding", {stream: ">"}, count=1)
    await asyncio.sleep(2.2)

    # The sweeper's first look forgets the one that holds nothing and claims the other's image.
    batch = await asyncio.wait_for(sweeper.next_batch(4, 0), 5)
    assert [job.index for job in batch] == [1]
    assert await consumer_names(registry, stream) == {"gone-holding", "sweeper"}
    await sweeper.finished(batch)
    # Now that one holds nothing either: the next look forgets it; the sweeper, live, stays.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(sweeper.next_batch(4, 0), 1.5)
    assert await consumer_names(registry, stream) == {"sweeper"}
    await sweeper.close()
    await jobs.close()
    await registry.close()


async def test_a_worker_makes_its_group_again_when_redis_lost_the_stream(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    registry = await RedisRegistry.open(redis_server.url, 3600, 100, prefix=redis_prefix)
    task = await registry.create(["u0"], "m", 1)
    stream = stream_of(registry.prefix, "m")
    worker = StreamBatches(registry.link, registry.prefix, registry, ["m"], "w", claim_idle=0.2, max_deliveries=3)
    await worker.start()
    await registry.client.delete(stream)  # what a Redis restarted without its append-only file lost
    taking = asyncio.create_task(worker.next_batch(4, 0))  # its first look for abandoned images: NOGROUP
    await asyncio.sleep(0.5)
    await registry.client.delete(stream)  # lost again while the worker waits on it: UNBLOCKED
    await asyncio.sleep(0.5)
    await StreamJobs(registry.link, registry.prefix, 10).put(QueuedImage(task.task_id, 0, "m", 1, b"image"))
    batch = await asyncio.wait_for(taking, 5)
    assert [job.index for job in batch] == [0]
    await worker.close()
    await registry.close()


async def test_the_webhook_outbox_makes_its_group_again_when_redis_lost_the_stream(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    registry = await RedisRegistry.open(redis_server.url, 3600, 100, prefix=redis_prefix)
    waiting = asyncio.create_task(registry.next_delivery())
    await asyncio.sleep(0.5)
    await registry.client.delete(f"{redis_prefix}webhooks")  # lost while the sender waits on it
    task = await registry.create(["u0"], "m", 1, callback_url="http://hooks.example/done")
    await registry.update_item(task.task_id, 0, ItemStatus.SUCCEEDED, labels=[Label("cat", 281, 0.9)])
    delivery = await asyncio.wait_for(waiting, 5)
    assert delivery.task_id == task.task_id
    await registry.close()
