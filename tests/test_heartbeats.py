"""Worker heartbeats in a real Redis (`service.broker.fleet`): the fleet view (up, gone,
forgotten), and a gone worker's images claimed at once by another, not after --claim-idle."""

from __future__ import annotations

import asyncio
import time

import pytest

from service.broker import fleet as fleet_module
from service.broker.fleet import RedisFleet
from service.broker.streams import StreamBatches, StreamJobs
from service.stores.redis.registry import RedisRegistry
from service.tasks.fleet import WorkerIdentity, WorkerState, WorkerStats
from service.tasks.queues import QueuedImage
from testing.redis_server import RedisServer

pytestmark = pytest.mark.e2e  # a real Redis

BEAT = 0.2  # seconds between heartbeats here (2 in the service)


@pytest.fixture(autouse=True)
def quick_heartbeats(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fleet_module, "HEARTBEAT_SECONDS", BEAT)


def identity(worker_id: str) -> WorkerIdentity:
    return WorkerIdentity(["m"], "openvino", "bf16", 2, id=worker_id)


async def test_the_fleet_lists_workers_up_then_gone_then_forgets_them(
    redis_server: RedisServer, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = await RedisRegistry.open(redis_server.url, 3600, 100, prefix=redis_prefix)
    fleet = RedisFleet(registry.link, registry.prefix)
    try:
        stats = WorkerStats()
        stats.batch_done(16)
        await fleet.beat(identity("host-a-101").entry(stats))
        await fleet.beat(identity("host-b-202").entry(WorkerStats()))
        listed = {worker.id: worker for worker in await fleet.workers()}
        assert {worker.state for worker in listed.values()} == {WorkerState.UP}
        a = listed["host-a-101"]
        assert (a.host, a.pid, a.batches, a.images, a.processes) == ("host-a", 101, 1, 16, 2)
        assert await fleet.gone_ids() == set()

        await fleet.leave("host-b-202")  # a clean stop: gone at once
        async with asyncio.timeout(5):  # a missed heartbeat: gone after three
            while await fleet.gone_ids() != {"host-a-101", "host-b-202"}:
                await asyncio.sleep(BEAT)
        gone = {worker.id: worker for worker in await fleet.workers()}
        assert {worker.state for worker in gone.values()} == {WorkerState.GONE}
        assert gone["host-a-101"].pid == 101

        monkeypatch.setattr(fleet_module, "FORGET_SECONDS", 0.0)
        assert await fleet.workers() == []
    finally:
        await registry.close()


async def test_a_gone_workers_images_are_claimed_at_once(redis_server: RedisServer, redis_prefix: str) -> None:
    registry = await RedisRegistry.open(redis_server.url, 3600, 100, prefix=redis_prefix)
    fleet = RedisFleet(registry.link, registry.prefix)
    task = await registry.create([f"http://a/{n}" for n in range(4)], "m", 1)
    jobs = StreamJobs(registry.link, registry.prefix, capacity=100)

    def consumer(name: str) -> StreamBatches:
        # claim_idle of an hour: only the heartbeats can hand the images over in this test.
        return StreamBatches(registry.link, registry.prefix, registry, ["m"], name, 3600, 3, fleet)

    dead, alive = consumer("host-dead-1"), consumer("host-alive-2")
    await dead.start()
    await alive.start()
    try:
        for n in range(4):
            await jobs.put(QueuedImage(task.task_id, n, "m", 1, b"x"))
        await fleet.beat(identity("host-dead-1").entry(WorkerStats()))
        held = await dead.next_batch(max_size=4, max_wait=0)
        assert len(held) == 4  # then it dies: no more heartbeats, nothing confirmed
        await dead.close()
        started = time.monotonic()
        taken = await asyncio.wait_for(alive.next_batch(max_size=4, max_wait=0), 10)
        assert sorted(job.index for job in taken) == [0, 1, 2, 3]
        assert time.monotonic() - started < 10 * BEAT * 3
    finally:
        await alive.close()
        await jobs.close()
        await registry.close()
