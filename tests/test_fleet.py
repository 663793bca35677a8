"""Operating a fleet on the real parts: a web-only replica and `run_worker.py` processes with
their metrics ports, sharing a real `redis-server`. A worker's own /metrics, /healthz and
/readyz (503 while Redis is frozen), and a metrics port in use."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from testing.ports import free_port
from testing.redis_server import RedisServer
from testing.services import ROOT
from tests.conftest import ImageServer
from tests.test_deploy import dashboard_metrics
from tests.test_scale_out import kill, replica, running_worker, submit, together, wait_final

pytestmark = pytest.mark.e2e  # real Redis, replicas and workers

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(http: aiohttp.ClientSession, base: str) -> Samples:
    async with http.get(f"{base}/metrics") as response:
        assert response.status == 200
        text = await response.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def families(http: aiohttp.ClientSession, base: str) -> set[str]:
    """The metric families a /metrics declares (those without samples yet included)."""
    async with http.get(f"{base}/metrics") as response:
        return {family.name for family in text_string_to_metric_families(await response.text())}


async def status_of(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(url) as response:
        return response.status


async def test_a_worker_serves_its_metrics_and_probes(
    redis: RedisServer, image_server: ImageServer, tmp_path: Path
) -> None:
    port = free_port()
    probes = f"http://127.0.0.1:{port}"
    flags = ("--host", "127.0.0.1", "--metrics-port", str(port))
    async with (
        replica(redis, log=tmp_path / "replica.log") as (_, base),
        running_worker(redis, tmp_path / "worker.log", *flags) as worker,
        aiohttp.ClientSession() as http,
    ):
        assert await status_of(http, f"{probes}/healthz") == 200
        assert await status_of(http, f"{probes}/readyz") == 200
        urls = [image_server.url(f"/photos/{name}") for name in ("coffee", "chelsea", "rocket")] * 2
        task = await wait_final(http, base, await submit(http, base, urls))
        assert task["progress"]["succeeded"] == 6
        samples = await scrape(http, probes)
        assert samples[("ics_batch_size_sum", ())] == 6  # real images per batch, every one of them
        assert samples[("ics_inference_seconds_count", ())] == samples[("ics_batch_size_count", ())] >= 2
        assert samples[("ics_worker_restarts", ())] == 0
        assert samples[("ics_model_loads", ())] == 1  # its one process's default model
        assert not images_total(samples)  # the replica running the task counts its outcomes
        assert images_total(await scrape(http, base)) == {("succeeded", ""): 6}
        assert samples[("ics_queue_wait_seconds_count", (("priority", "interactive"),))] == 6
        # Every metric the Grafana dashboard queries is on a replica's or a worker's /metrics.
        missing = dashboard_metrics() - await families(http, base) - await families(http, probes)
        assert not missing

        # The worker stopped: the replica's gauge is the backlog in Redis, for an autoscaler.
        os.killpg(worker.pid, signal.SIGSTOP)
        try:
            waiting = await submit(http, base, urls)
            labels = (("model", "efficientnet_lite0"), ("priority", "interactive"))
            async with asyncio.timeout(15):
                while (await scrape(http, base)).get(("ics_queue_depth", labels)) != 6:
                    await asyncio.sleep(0.2)
            await asyncio.sleep(1.1)
            assert (await scrape(http, base))[("ics_queue_oldest_seconds", labels)] >= 1
        finally:
            os.killpg(worker.pid, signal.SIGCONT)
        assert (await wait_final(http, base, waiting))["progress"]["succeeded"] == 6
        assert (await scrape(http, base))[("ics_queue_depth", labels)] == 0

        assert redis.process is not None
        os.kill(redis.process.pid, signal.SIGSTOP)  # Redis frozen: it holds connections, answers nothing
        try:
            async with asyncio.timeout(15):
                while await status_of(http, f"{probes}/readyz") != 503:
                    await asyncio.sleep(0.5)
            async with http.get(f"{probes}/readyz") as response:
                assert "Redis does not answer" in (await response.json())["error"]["message"]
            assert await status_of(http, f"{probes}/healthz") == 200  # alive all the same
        finally:
            os.kill(redis.process.pid, signal.SIGCONT)
        async with asyncio.timeout(15):
            while await status_of(http, f"{probes}/readyz") != 200:
                await asyncio.sleep(0.5)


async def test_a_metrics_port_in_use_is_one_line_and_a_failed_exit(redis: RedisServer, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [sys.executable, "run_worker.py", "--redis", redis.url, "--workers", "1"]
        command += ["--host", "127.0.0.1", "--metrics-port", str(port)]
        finished = await asyncio.to_thread(subprocess.run, command, cwd=ROOT, capture_output=True, timeout=120)
    assert finished.returncode == 1
    errors = finished.stderr.decode()
    # One line, before any inference process started (they log their model's load).
    (line,) = errors.strip().splitlines()
    assert line.endswith(
        f" ERROR service.worker: cannot listen on 127.0.0.1:{port}: the port is in use (another service running?); "
        "choose another with --metrics-port"
    ), line


async def test_the_fleet_view_and_a_killed_workers_batch_taken_over_within_a_few_heartbeats(
    redis: RedisServer, image_server: ImageServer, tmp_path: Path
) -> None:
    ports = free_port(), free_port()
    flags = [("--host", "127.0.0.1", "--metrics-port", str(port), "--claim-idle", "60") for port in ports]
    urls = [image_server.url(f"/photos/{name}") for name in ("coffee", "chelsea", "rocket")] * 10
    client = aioredis.Redis.from_url(redis.url)
    async with (
        together(
            replica(redis, log=tmp_path / "replica.log"),
            replica(redis, log=tmp_path / "replica2.log"),
            running_worker(redis, tmp_path / "w1.log", *flags[0]),
            running_worker(redis, tmp_path / "w2.log", *flags[1]),
        ) as ((_, base), (_, other), first, second),
        aiohttp.ClientSession() as http,
    ):
        ids = {f"{socket.gethostname()}-{worker.pid}" for worker in (first, second)}
        async with asyncio.timeout(10):
            while {worker["id"] for worker in await workers_of(http, base) if worker["state"] == "up"} != ids:
                await asyncio.sleep(0.2)
        assert (await scrape(http, base))[("ics_workers", (("state", "up"),))] == 2
        task = await wait_final(http, base, await submit(http, base, urls))
        assert task["progress"]["succeeded"] == 30
        per_worker = [await scrape(http, f"http://127.0.0.1:{port}") for port in ports]
        assert sum(samples[("ics_batch_size_sum", ())] for samples in per_worker) == 30  # every image, once
        async with asyncio.timeout(10):  # the heartbeats after those batches tell the same
            while sum(worker["images"] for worker in await workers_of(http, base)) != 30:
                await asyncio.sleep(0.2)

        # The first worker dies holding a batch: the second takes it over within a few
        # heartbeats, long before --claim-idle (60 s) would hand it over.
        task_id = await submit(http, base, urls * 2)
        victim = f"{socket.gethostname()}-{first.pid}"
        async with asyncio.timeout(30):
            while not await holds(client, victim):
                await asyncio.sleep(0.01)
        os.killpg(first.pid, signal.SIGSTOP)
        kill(first)
        killed = asyncio.get_running_loop().time()
        task = await wait_final(http, base, task_id, timeout=30)
        assert task["progress"]["succeeded"] == 60
        assert asyncio.get_running_loop().time() - killed < 20
        assert "heartbeat stopped" in (tmp_path / "w2.log").read_text()
        states = {worker["id"]: worker["state"] for worker in await workers_of(http, base)}
        assert states[victim] == "gone"
        assert (await scrape(http, base))[("ics_workers", (("state", "gone"),))] == 1
        survivor = await scrape(http, f"http://127.0.0.1:{ports[1]}")
        assert survivor[("ics_claimed_images_total", (("reason", "gone"),))] >= 1
        assert ("ics_claimed_images_total", (("reason", "idle"),)) not in survivor

        # The other replica's task, with downloads that fail: the replicas' counts of outcomes
        # add up to the tasks' progress, each image once, whoever classified it.
        failing = [image_server.url("/status/404"), image_server.url("/text")]
        last = await wait_final(http, other, await submit(http, other, urls[:3] + failing))
        assert last["progress"] == {**last["progress"], "succeeded": 3, "failed": 2}
        counted: Counter[tuple[str, str]] = Counter()
        for replica_base in (base, other):
            counted.update(images_total(await scrape(http, replica_base)))
        assert counted == {("succeeded", ""): 30 + 60 + 3, ("failed", "http_error"): 1, ("failed", "not_an_image"): 1}
    await client.aclose()


def images_total(samples: Samples) -> dict[tuple[str, str], float]:
    """`ics_images_total` by (outcome, code)."""
    return {
        (dict(labels)["outcome"], dict(labels)["code"]): value
        for (name, labels), value in samples.items()
        if name == "ics_images_total"
    }


async def workers_of(http: aiohttp.ClientSession, base: str) -> list[dict[str, Any]]:
    async with http.get(f"{base}/workers") as response:
        assert response.status == 200
        return list((await response.json())["workers"])


async def holds(client: aioredis.Redis, consumer: str) -> bool:
    """Whether `consumer` holds entries of the default model's stream (taken, not confirmed)."""
    summary = await client.xpending("ics:jobs:efficientnet_lite0", "workers")
    return any(entry["name"].decode() == consumer for entry in summary["consumers"] or [])
