"""Worker deaths and hangs do not take the service down; shutdown leaves nothing behind."""

from __future__ import annotations

import asyncio
import io
import os
import signal

import psutil
import pytest
from aiohttp.test_utils import TestClient
from PIL import Image

from service.api.appkeys import POOL
from testing.services import running
from tests.conftest import ImageServer, ServiceFactory, running_service, submit, wait_for_task


def heavy_png(photo: bytes) -> bytes:
    """A large PNG: slow enough to decode that a batch of them is still running when we strike."""
    buffer = io.BytesIO()
    Image.open(io.BytesIO(photo)).resize((2400, 1600)).save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


async def wait_for_item_status(client: TestClient, task_id: str, status: str) -> None:
    async with asyncio.timeout(60):
        while True:
            task = await (await client.get(f"/tasks/{task_id}")).json()
            if any(item["status"] == status for item in task["items"]):
                return
            await asyncio.sleep(0.01)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def wait_gone(pid: int) -> None:
    async with asyncio.timeout(30):
        while not gone(pid):
            await asyncio.sleep(0.05)


async def test_a_killed_worker_is_replaced_and_its_images_retried(
    make_real_service: ServiceFactory, image_server: ImageServer, photos: dict[str, bytes]
) -> None:
    image_server.files["heavy.png"] = heavy_png(photos["coffee"])
    client = await make_real_service(batch_size=4, max_image_bytes=20_000_000)
    pool = client.server.app[POOL]
    (victim,) = pool.worker_pids()
    accepted = await submit(client, [image_server.url("/file/heavy.png")] * 8)
    await wait_for_item_status(client, accepted["task_id"], "classifying")
    await asyncio.sleep(0.3)  # into the first batch's decoding
    os.kill(victim, signal.SIGKILL)

    task = await wait_for_task(client, accepted["task_id"], timeout=120)
    assert task["status"] == "completed"
    assert task["progress"]["succeeded"] == 8, task["items"]
    assert all(item["labels"][0]["label"] == "espresso" for item in task["items"])
    assert pool.restarts == 1
    assert victim not in pool.worker_pids()

    later = await wait_for_task(client, (await submit(client, [image_server.url("/photos/rocket")]))["task_id"])
    assert later["items"][0]["labels"][0]["label"] == "missile"
    assert pool.restarts == 1


async def test_a_hung_batch_fails_and_its_worker_is_recycled(
    make_real_service: ServiceFactory, image_server: ImageServer
) -> None:
    client = await make_real_service(batch_timeout=3.0)
    pool = client.server.app[POOL]
    (hung,) = pool.worker_pids()
    os.kill(hung, signal.SIGSTOP)  # a worker that never answers
    try:
        accepted = await submit(client, [image_server.url("/photos/coffee")] * 2)
        task = await wait_for_task(client, accepted["task_id"], timeout=60)
    finally:
        if not gone(hung):
            os.kill(hung, signal.SIGCONT)
    assert task["status"] == "completed"
    assert [item["error"]["code"] for item in task["items"]] == ["inference_timeout"] * 2
    await wait_gone(hung)  # killed, not left stopped
    assert pool.restarts == 1

    later = await wait_for_task(client, (await submit(client, [image_server.url("/photos/coffee")]))["task_id"])
    assert later["items"][0]["labels"][0]["label"] == "espresso"


@pytest.mark.e2e
async def test_workers_end_with_a_killed_web_process() -> None:
    """kill -9 of the web process used to leave its workers running under PID 1 for good."""
    async with running_service() as (process, _):
        web = psutil.Process(process.pid)
        workers = [child for child in web.children() if "spawn_main" in " ".join(child.cmdline())]
        assert workers
        web.kill()
        process.wait()
        async with asyncio.timeout(5):
            while alive := [worker.pid for worker in workers if running(worker)]:
                await asyncio.sleep(0.1)
        assert alive == []
