"""`python run_service.py` as a user starts it: serves /submit, classifies a real photo, and
on SIGTERM/SIGINT stops accepting, cancels what outlives the grace period, exits 0 and
leaves no worker process behind."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
from typing import Any

import aiohttp
import psutil

from tests.conftest import ImageServer, running_service


async def submit(http: aiohttp.ClientSession, base: str, urls: list[str]) -> str:
    async with http.post(f"{base}/submit", json={"urls": urls}) as response:
        assert response.status == 202
        return (await response.json())["task_id"]


async def get_task(http: aiohttp.ClientSession, base: str, task_id: str) -> dict[str, Any]:
    async with http.get(f"{base}/tasks/{task_id}") as response:
        return await response.json()


async def test_run_service_classifies_a_photo_and_stops_on_sigint(image_server: ImageServer) -> None:
    async with running_service("--log-format", "json") as (process, base):
        async with aiohttp.ClientSession() as http, asyncio.timeout(60):
            task_id = await submit(http, base, [image_server.url("/photos/coffee")])
            while (task := await get_task(http, base, task_id))["status"] != "completed":
                await asyncio.sleep(0.1)
        assert task["items"][0]["labels"][0]["label"] == "espresso"
        process.send_signal(signal.SIGINT)
        output = process.communicate(timeout=60)[0].decode()
        assert process.returncode == 0, output

    lines = [json.loads(line) for line in output.splitlines() if line.strip()]  # every line is JSON
    lifecycle = [line["message"] for line in lines if line.get("task_id") == task_id]
    assert [message.split()[2].rstrip(":") for message in lifecycle] == ["created", "running", "completed"]
    assert any("POST /submit" in line["message"] for line in lines if line["logger"] == "aiohttp.access")


async def test_sigterm_with_the_memory_store_cancels_after_the_grace_period_and_leaves_no_workers(
    image_server: ImageServer,
) -> None:
    async with running_service("--store", "memory", "--shutdown-grace", "1.5", "--download-concurrency", "1") as (
        process,
        base,
    ):
        workers = psutil.Process(process.pid).children(recursive=True)
        assert workers
        async with aiohttp.ClientSession() as http:
            await submit(http, base, [image_server.url(f"/slow/coffee?delay=1&n={n}") for n in range(30)])
            await asyncio.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        with socket.socket() as sock:  # no longer accepting
            assert sock.connect_ex(("127.0.0.1", int(base.rsplit(":", 1)[1]))) != 0
        output = await asyncio.to_thread(lambda: process.communicate(timeout=60)[0].decode())
        assert process.returncode == 0, output
        assert "cancelled 1 active tasks" in output, output
        hits = image_server.total_hits("/slow")
        assert hits < 10  # the rest of the 30 slow downloads never started
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"orphaned worker processes: {alive}"
