"""Health, readiness and metrics, watched while real work and a real worker kill happen."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from pathlib import Path

import psutil

from service.api.appkeys import POOL, SETTINGS
from tests.conftest import ImageServer, ServiceFactory, scrape, submit, wait_for_task


async def test_readyz_flips_during_a_worker_kill_and_recovers(
    make_real_service: ServiceFactory, image_server: ImageServer
) -> None:
    client = await make_real_service()
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/readyz")).status == 200
    (victim,) = client.server.app[POOL].worker_pids()
    os.kill(victim, signal.SIGKILL)

    async with asyncio.timeout(30):
        while (response := await client.get("/readyz")).status == 200:
            await asyncio.sleep(0.05)
    assert response.status == 503
    assert (await response.json())["error"]["code"] == "not_ready"
    assert (await client.get("/healthz")).status == 200  # alive all along
    async with asyncio.timeout(120):
        while (await client.get("/readyz")).status != 200:
            await asyncio.sleep(0.1)
    assert victim not in client.server.app[POOL].worker_pids()
    task = await wait_for_task(client, (await submit(client, [image_server.url("/photos/coffee")]))["task_id"])
    assert task["items"][0]["labels"][0]["label"] == "espresso"
    after = await scrape(client)
    assert after[("ics_worker_restarts", ())] == 1
    assert after[("ics_model_loads", ())] == 2  # the default model, in the killed worker and in the new one


async def test_metrics_move_as_tasks_run(make_real_service: ServiceFactory, image_server: ImageServer) -> None:
    client = await make_real_service(batch_size=4)
    before = await scrape(client)
    assert before[("ics_tasks", (("status", "completed"),))] == 0
    assert ("ics_images_total", (("code", ""), ("outcome", "succeeded"))) not in before

    urls = [image_server.url("/photos/coffee")] * 3 + [image_server.url("/status/404"), image_server.url("/text")]
    await wait_for_task(client, (await submit(client, urls))["task_id"])
    after = await scrape(client)

    assert after[("ics_tasks", (("status", "completed"),))] == 1
    assert after[("ics_tasks", (("status", "running"),))] == 0
    assert after[("ics_images_total", (("code", ""), ("outcome", "succeeded")))] == 3
    assert after[("ics_images_total", (("code", "http_error"), ("outcome", "failed")))] == 1
    assert after[("ics_images_total", (("code", "not_an_image"), ("outcome", "failed")))] == 1
    assert after[("ics_download_seconds_count", ())] == 5
    assert after[("ics_batch_size_sum", ())] == 4  # the three photos and the text body
    assert after[("ics_inference_seconds_count", ())] == after[("ics_batch_size_count", ())] >= 1
    for priority in ("interactive", "batch"):
        waiting = (("model", "efficientnet_lite0"), ("priority", priority))
        assert after[("ics_queue_depth", waiting)] == after[("ics_queue_oldest_seconds", waiting)] == 0
    assert after[("ics_queue_wait_seconds_count", (("priority", "interactive"),))] == 4  # every image downloaded
    assert ("ics_queue_wait_seconds_count", (("priority", "batch"),)) not in after
    assert after[("ics_worker_restarts", ())] == 0


async def test_the_default_path_runs_without_torch_at_the_precision_it_shows(
    make_real_service: ServiceFactory, image_server: ImageServer
) -> None:
    """Workers on the default runtime map no torch library, and /models and each task show
    the precision chosen for this CPU."""
    client = await make_real_service()
    settings = client.server.app[SETTINGS]
    expected = settings.resolve_precision(settings.model_specs()[0]).precision
    assert settings.resolved_runtime() in ("openvino", "onnx")
    models = (await (await client.get("/models")).json())["models"]
    assert [(model["name"], model["precision"]) for model in models] == [("efficientnet_lite0", expected)]
    task = await wait_for_task(client, (await submit(client, [image_server.url("/photos/coffee")]))["task_id"])
    assert task["precision"] == expected and task["items"][0]["labels"][0]["label"] == "espresso"
    (worker,) = client.server.app[POOL].worker_pids()
    libraries = Path(f"/proc/{worker}/maps").read_text()
    assert "libtorch" not in libraries and ("openvino" in libraries or "onnxruntime" in libraries)


async def test_every_image_is_counted_once_whichever_way_it_ends(
    make_service: ServiceFactory, image_server: ImageServer
) -> None:
    """`ics_images_total` adds up to the tasks' images: cancelled ones included."""
    client = await make_service(download_concurrency=1)
    done = await wait_for_task(client, (await submit(client, [image_server.url("/photos/coffee")]))["task_id"])
    slow = await submit(client, [image_server.url("/slow/coffee")] + [image_server.url("/photos/coffee")] * 4)
    assert (await client.post(f"/tasks/{slow['task_id']}/cancel")).status == 200
    cancelled = await wait_for_task(client, slow["task_id"])
    images = {labels: value for (name, labels), value in (await scrape(client)).items() if name == "ics_images_total"}
    assert sum(images.values()) == done["progress"]["total"] + cancelled["progress"]["total"] == 6
    assert images[(("code", ""), ("outcome", "cancelled"))] == cancelled["progress"]["cancelled"] >= 4


async def test_a_frozen_worker_fails_readiness_and_is_replaced(
    make_real_service: ServiceFactory, image_server: ImageServer
) -> None:
    """A worker stopped with SIGSTOP used to keep /readyz at 200 for good."""
    client = await make_real_service()
    (frozen,) = client.server.app[POOL].worker_pids()
    os.kill(frozen, signal.SIGSTOP)
    try:
        async with asyncio.timeout(15):  # silent for 5 s, noticed within 1 s more
            while (await client.get("/readyz")).status == 200:
                await asyncio.sleep(0.1)
        async with asyncio.timeout(120):
            while (await client.get("/readyz")).status != 200:
                await asyncio.sleep(0.1)
        assert frozen not in client.server.app[POOL].worker_pids()
        assert not psutil.pid_exists(frozen) or psutil.Process(frozen).status() == psutil.STATUS_ZOMBIE
        task = await wait_for_task(client, (await submit(client, [image_server.url("/photos/coffee")]))["task_id"])
        assert task["items"][0]["labels"][0]["label"] == "espresso"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(frozen, signal.SIGKILL)


async def test_the_workers_list_shows_this_services_own_pool(
    make_service: ServiceFactory, image_server: ImageServer
) -> None:
    client = await make_service()
    urls = [image_server.url("/photos/coffee")] * 3
    await wait_for_task(client, (await submit(client, urls))["task_id"])
    response = await client.get("/workers")
    assert response.status == 200
    (worker,) = (await response.json())["workers"]
    assert worker["id"] == f"{socket.gethostname()}-{os.getpid()}" and worker["pid"] == os.getpid()
    assert (worker["state"], worker["processes"], worker["images"]) == ("up", 1, 3)
    assert worker["models"] == ["efficientnet_lite0"] and worker["batches"] >= 1
    assert worker["last_batch_at"] is not None
    samples = await scrape(client)
    assert samples[("ics_workers", (("state", "up"),))] == 1
    assert samples[("ics_workers", (("state", "gone"),))] == 0


async def test_a_cancel_aborts_the_downloads_in_flight_on_the_real_service(
    make_real_service: ServiceFactory, image_server: ImageServer
) -> None:
    """With the real pool and fetcher (the fake-pool test checks the engine alone): the
    connections of the downloads in flight are closed within a second or so of the cancel."""
    client = await make_real_service(download_concurrency=2)
    task = await submit(client, [image_server.url("/drip")] * 4)
    async with asyncio.timeout(10):
        while image_server.hits["/drip"] < 2:
            await asyncio.sleep(0.05)
    cancelled = await client.post(f"/tasks/{task['task_id']}/cancel")
    assert cancelled.status == 200
    async with asyncio.timeout(3):  # the server notices at its next byte (every 0.2 s)
        while image_server.dropped < 2:
            await asyncio.sleep(0.05)
    assert image_server.hits["/drip"] == 2  # the queued two never started
