"""Scale-out on the real parts: web replicas (`run_service.py --redis ... --workers 0`) and
workers (`run_worker.py`) as users start them, sharing a real `redis-server` that each test
starts for itself. Every failure semantic of docs/scale-out.md is here: a
worker or a replica killed mid-task, a cancel through another replica, Redis restarted."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from testing.ports import free_port
from testing.redis_server import RedisServer
from testing.services import ROOT, kill_group
from tests.conftest import ImageServer, running_service

pytestmark = pytest.mark.e2e  # real Redis, replicas and workers

PHOTOS = {"chelsea": "Egyptian cat", "coffee": "espresso", "rocket": "missile"}
LEASE = "2"  # seconds: a killed replica's tasks are adopted within a few
CLAIM_IDLE = "2"  # seconds: a killed worker's batch is claimed within a few


def replica(server: RedisServer, *flags: str, log: Path) -> contextlib.AbstractAsyncContextManager[Any]:
    """A web-only replica (its downloads, no workers) on `server`."""
    return running_service("--redis", server.url, "--workers", "0", "--lease", LEASE, *flags, log=log)


@asynccontextmanager
async def running_worker(server: RedisServer, log: Path, *flags: str) -> AsyncIterator[subprocess.Popen[bytes]]:
    """`run_worker.py` with one inference process, until it says it classifies; killed (its
    whole process group) at the end."""
    command = [
        sys.executable, "run_worker.py", "--redis", server.url, "--workers", "1", "--threads-per-worker", "1",
        "--claim-idle", CLAIM_IDLE, "--batch-size", "4", *flags,
    ]  # fmt: skip
    with log.open("ab") as sink:
        process = subprocess.Popen(command, cwd=ROOT, start_new_session=True, stdout=sink, stderr=subprocess.STDOUT)
    try:
        async with asyncio.timeout(120):
            while "processes classify" not in log.read_text():
                assert process.poll() is None, log.read_text()
                await asyncio.sleep(0.2)
        yield process
    finally:
        kill(process)


@asynccontextmanager
async def together(*contexts: contextlib.AbstractAsyncContextManager[Any]) -> AsyncIterator[list[Any]]:
    """Enter `contexts` side by side (their processes start at once), exit them all."""
    async with contextlib.AsyncExitStack() as stack:
        async with asyncio.TaskGroup() as group:
            entering = [group.create_task(stack.enter_async_context(context)) for context in contexts]
        yield [entered.result() for entered in entering]


def kill(process: subprocess.Popen[bytes]) -> None:
    """kill -9 of the process and its children (its process group)."""
    kill_group(process.pid)
    process.wait()


async def submit(http: aiohttp.ClientSession, base: str, urls: list[str], **headers: str) -> str:
    async with http.post(f"{base}/submit", json={"urls": urls, "top_k": 1}, headers=headers) as response:
        assert response.status == 202, await response.text()
        return str((await response.json())["task_id"])


async def task_on(
    http: aiohttp.ClientSession, base: str, task_id: str, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    async with http.get(f"{base}/tasks/{task_id}", headers=headers) as response:
        assert response.status == 200, await response.text()
        return dict(await response.json())


async def wait_final(http: aiohttp.ClientSession, base: str, task_id: str, timeout: float = 60) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while (task := await task_on(http, base, task_id))["status"] in ("queued", "running"):
            await asyncio.sleep(0.1)
    return task


def top_labels(task: dict[str, Any]) -> list[str | None]:
    return [item["labels"][0]["label"] if item["labels"] else None for item in task["items"]]


async def test_a_task_submitted_on_one_replica_is_watched_and_read_on_the_other(
    redis: RedisServer, image_server: ImageServer, tmp_path: Path
) -> None:
    names = list(PHOTOS) * 4
    urls = [image_server.url(f"/slow/{name}?delay=0.1") for name in names]
    keys = ("--api-keys", "key-a,key-b")
    alice, bob = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}
    async with (
        together(
            replica(redis, *keys, log=tmp_path / "a.log"),
            replica(redis, *keys, log=tmp_path / "b.log"),
            running_worker(redis, tmp_path / "w1.log"),
            running_worker(redis, tmp_path / "w2.log"),
        ) as ((_, a), (_, b), _, _),
        aiohttp.ClientSession() as http,
    ):
        task_id = await submit(http, a, urls, **alice, **{"Idempotency-Key": "batch-1"})
        events: list[tuple[str, Any]] = []
        async with http.get(f"{b}/tasks/{task_id}/events", headers=alice) as stream:  # watched through B
            assert stream.status == 200
            event = ""
            async for raw in stream.content:
                line = raw.decode().rstrip("\r\n")
                if line.startswith("event:"):
                    event = line.removeprefix("event:").strip()
                elif line.startswith("data:"):
                    events.append((event, json.loads(line.removeprefix("data:"))))
                    if event == "end":
                        break
        assert sorted(data["index"] for kind, data in events if kind == "item") == list(range(len(urls)))
        assert events[-1][1]["status"] == "completed"
        on_a, on_b = await task_on(http, a, task_id, alice), await task_on(http, b, task_id, alice)
        assert on_a == on_b
        assert top_labels(on_b) == [PHOTOS[name] for name in names]
        async with http.get(f"{b}/tasks", headers=alice) as listing:  # and listed on B
            assert task_id in [task["task_id"] for task in (await listing.json())["tasks"]]
        async with http.get(f"{b}/tasks/{task_id}", headers=bob) as foreign:  # another key's: not there
            assert foreign.status == 404
        # The same submit again, on the other replica: the key stands for the same task.
        async with http.post(
            f"{b}/submit", json={"urls": urls, "top_k": 1}, headers={**alice, "Idempotency-Key": "batch-1"}
        ) as again:
            assert again.status == 202 and (await again.json())["task_id"] == task_id
        async with http.get(f"{a}/readyz") as ready, http.get(f"{a}/metrics", headers=alice) as metrics:
            assert ready.status == 200 and metrics.status == 200


async def test_a_cancel_through_another_replica_stops_the_owners_downloads(
    redis: RedisServer, image_server: ImageServer, tmp_path: Path
) -> None:
    urls = [image_server.url(f"/slow/coffee?delay=1&n={n}") for n in range(40)]
    async with (
        together(
            replica(redis, "--download-concurrency", "2", log=tmp_path / "a.log"),
            replica(redis, log=tmp_path / "b.log"),
            running_worker(redis, tmp_path / "w.log"),
        ) as ((_, a), (_, b), _),
        aiohttp.ClientSession() as http,
    ):
        task_id = await submit(http, a, urls)
        async with asyncio.timeout(10):  # a round or two of downloads on A
            while image_server.total_hits("/slow/") < 3:
                await asyncio.sleep(0.05)
        async with http.delete(f"{b}/tasks/{task_id}") as response:
            assert response.status == 200, await response.text()
        await asyncio.sleep(1.5)  # A hears of it within about a second, and stops
        hits = image_server.total_hits("/slow/")
        await asyncio.sleep(2.0)  # two more rounds of downloads, had they gone on
        assert image_server.total_hits("/slow/") == hits < 10
        async with http.get(f"{a}/tasks/{task_id}") as gone:
            assert gone.status == 404


async def test_a_worker_killed_mid_task_leaves_its_batch_to_another(
    redis: RedisServer, image_server: ImageServer, tmp_path: Path
) -> None:
    names = list(PHOTOS) * 20
    urls = [image_server.url(f"/photos/{name}") for name in names]
    client = aioredis.Redis.from_url(redis.url)
    async with (
        together(replica(redis, log=tmp_path / "a.log"), running_worker(redis, tmp_path / "w1.log")) as (
            (_, a),
            first,
        ),
        aiohttp.ClientSession() as http,
    ):
        # The first worker is stopped (SIGSTOP) while it holds a batch, then killed.
        task_id = await submit(http, a, urls)
        async with asyncio.timeout(30):
            while not (await client.xpending("ics:jobs:efficientnet_lite0", "workers"))["pending"]:
                await asyncio.sleep(0.01)
        os.killpg(first.pid, signal.SIGSTOP)
        pending = await client.xpending("ics:jobs:efficientnet_lite0", "workers")
        kill(first)
        assert pending["pending"] > 0
        async with running_worker(redis, tmp_path / "w2.log"):
            task = await wait_final(http, a, task_id)
    await client.aclose()
    assert task["status"] == "completed"
    assert top_labels(task) == [PHOTOS[name] for name in names]
    assert "claimed" in (tmp_path / "w2.log").read_text()


async def test_a_replica_killed_mid_task_has_its_task_adopted(
    redis: RedisServer, image_server: ImageServer, tmp_path: Path
) -> None:
    names = list(PHOTOS) * 5
    urls = [image_server.url(f"/slow/{name}?delay=0.4") for name in names]
    async with (
        together(
            replica(redis, "--download-concurrency", "1", log=tmp_path / "b.log"),
            replica(redis, "--download-concurrency", "1", log=tmp_path / "a.log"),
            running_worker(redis, tmp_path / "w.log"),
        ) as ((_, b), (doomed, a), _),
        aiohttp.ClientSession() as http,
    ):
        task_id = await submit(http, a, urls)
        async with asyncio.timeout(30):
            while (await task_on(http, a, task_id))["progress"]["done"] < 3:
                await asyncio.sleep(0.05)
        kill(doomed)  # A dies mid-task
        before = await task_on(http, b, task_id)
        done_before = {item["index"]: item for item in before["items"] if item["status"] == "succeeded"}
        assert 3 <= len(done_before) < len(urls)
        task = await wait_final(http, b, task_id, timeout=60)
    assert task["status"] == "completed"
    assert top_labels(task) == [PHOTOS[name] for name in names]
    for index, item in done_before.items():  # results already in were kept as they were
        assert task["items"][index] == item
    assert "adopted" in (tmp_path / "b.log").read_text()


async def test_redis_restarted_mid_task_loses_nothing_accepted(
    redis: RedisServer, image_server: ImageServer, tmp_path: Path
) -> None:
    names = list(PHOTOS) * 4
    urls = [image_server.url(f"/slow/{name}?delay=0.3") for name in names]
    async with (
        together(
            replica(redis, "--download-concurrency", "2", log=tmp_path / "a.log"),
            running_worker(redis, tmp_path / "w.log"),
        ) as ((_, a), _),
        aiohttp.ClientSession() as http,
    ):
        task_id = await submit(http, a, urls)
        await asyncio.sleep(1.0)
        redis.stop()
        async with http.get(f"{a}/readyz") as ready:
            assert ready.status == 503
        async with http.post(f"{a}/submit", json={"urls": urls[:1]}) as refused:
            assert refused.status == 503
            assert (await refused.json())["error"]["code"] == "store_unavailable"
        await asyncio.sleep(2.0)
        redis.start()
        async with asyncio.timeout(20):
            while True:
                async with http.get(f"{a}/readyz") as ready:
                    if ready.status == 200:
                        break
                await asyncio.sleep(0.2)
        task = await wait_final(http, a, task_id)
        assert task["status"] == "completed"
        assert top_labels(task) == [PHOTOS[name] for name in names]
        again = await submit(http, a, urls[:3])  # and new work goes on
        assert (await wait_final(http, a, again))["status"] == "completed"


def test_an_unreachable_redis_stops_start_up_with_one_line(tmp_path: Path) -> None:
    port = free_port()
    for program in ("run_service.py", "run_worker.py"):
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, program, "--redis", f"redis://127.0.0.1:{port}/0", "--port", str(free_port())],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 1, result.stderr
        errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
        assert len(errors) == 1 and f"cannot reach Redis at redis://127.0.0.1:{port}/0" in errors[0], result.stderr
        assert "Traceback" not in result.stderr
        assert time.monotonic() - started < 30
