"""A shared service: one key's bulk load beside another key's one-photo tasks.

    .venv/bin/python -m bench.fairness [--images 4000]   # about a minute on 2 cores

For each deployment, embedded (`run_service.py --workers 2`) and through Redis (a web-only
replica and `run_worker.py --workers 2`), in one run: the latency of one-image interactive
tasks of one key on the idle service (submit to final state, a long-polling client's view);
the bulk load alone, as the CLI's bulk mode submits it (`--images` URLs in tasks of 1,000,
four in flight, `batch` priority, another key); then the same load again while the first
key submits one-image tasks one after another (a pause of `--gap` seconds between them).
Targets: loaded median <= 0.5 s, worst <= 1.5 s, bulk rate shared / alone >= 0.8 (the issue
asks >= 0.95 of the bulk rate with small tasks arriving in the scheduler's own benchmark:
here every small task's image also takes its share of the model).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from bench.harness import cpu_model
from bench.images import make_images
from bench.scale_out import start, worker_ready
from testing.image_server import start_image_server
from testing.ports import free_port
from testing.redis_server import RedisServer
from testing.services import wait_ready

TASK_SIZE = 1000
IN_FLIGHT = 4  # the CLI's bulk mode: --concurrency 4
BULK, PHOTO = "bulk-key", "photo-key"


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def one_photo(http: aiohttp.ClientSession, base: str, url: str) -> float:
    """Seconds from POST /submit to the task's final state (GET with `wait`, a long poll)."""
    started = time.perf_counter()
    async with http.post(f"{base}/submit", json={"urls": [url]}, headers=auth(PHOTO)) as response:
        assert response.status == 202, await response.text()
        task_id = (await response.json())["task_id"]
    while True:
        async with http.get(f"{base}/tasks/{task_id}", params={"wait": "30"}, headers=auth(PHOTO)) as response:
            task = await response.json()
        if task["status"] in ("completed", "failed", "cancelled"):
            assert task["progress"]["succeeded"] == 1, task
            return time.perf_counter() - started


async def bulk_load(http: aiohttp.ClientSession, base: str, urls: list[str]) -> float:
    """Images/s of the whole load, in tasks of 1,000 with four in flight, at batch priority."""
    started = time.perf_counter()
    slots = asyncio.Semaphore(IN_FLIGHT)

    async def one_task(chunk: list[str]) -> None:
        async with slots:
            body = {"urls": chunk, "priority": "batch"}
            async with http.post(f"{base}/submit", json=body, headers=auth(BULK)) as response:
                assert response.status == 202, await response.text()
                task_id = (await response.json())["task_id"]
            while True:
                async with http.get(f"{base}/tasks/{task_id}", params={"wait": "30"}, headers=auth(BULK)) as response:
                    task = await response.json()
                if task["status"] in ("completed", "failed", "cancelled"):
                    assert task["progress"]["succeeded"] == len(chunk), task["progress"]
                    return

    await asyncio.gather(*(one_task(urls[n : n + TASK_SIZE]) for n in range(0, len(urls), TASK_SIZE)))
    return len(urls) / (time.perf_counter() - started)


def image_url(images: str, label: str) -> str:
    """One of the 1,000 served images (picked by the label), at a URL of its own."""
    return f"{images}/img/{zlib.crc32(label.encode()) % 1000}.jpg?run={label}"


async def photos_meanwhile(
    http: aiohttp.ClientSession, base: str, images: str, name: str, gap: float, until: asyncio.Future[float]
) -> list[float]:
    latencies: list[float] = []
    await asyncio.sleep(1)  # the load is under way, its queues full
    while not until.done():
        latencies.append(await one_photo(http, base, image_url(images, f"photo-{name}-{len(latencies)}")))
        await asyncio.sleep(gap)
    return latencies


@dataclass
class Figures:
    idle: list[float]  # one-photo latencies, seconds
    loaded: list[float]
    alone: float  # bulk images/s
    shared: float


async def measure(base: str, images: str, count: int, gap: float, name: str) -> Figures:
    def urls(run: str, how_many: int) -> list[str]:
        return [image_url(images, f"{run}-{name}-{n}") for n in range(how_many)]

    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=50)) as http:
        await bulk_load(http, base, urls("warm", 200))  # the workers' first batches
        idle = [await one_photo(http, base, image_url(images, f"idle-{name}-{n}")) for n in range(10)]
        alone = await bulk_load(http, base, urls("alone", count))
        print(f"{name}: bulk alone {alone:.1f} images/s", flush=True)
        load = asyncio.ensure_future(bulk_load(http, base, urls("shared", count)))
        loaded = await photos_meanwhile(http, base, images, name, gap, load)
        shared = await load
    return Figures(idle, loaded, alone, shared)


def milliseconds(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.0f} / {max(values) * 1000:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4000, help="the bulk load (default: %(default)s)")
    parser.add_argument("--gap", type=float, default=0.25, help="seconds between one-photo tasks")
    parser.add_argument("--modes", default="embedded,redis")
    args = parser.parse_args()
    modes = args.modes.split(",")
    with tempfile.TemporaryDirectory() as directory:
        logs = Path(directory)
        images_dir = Path(directory, "img")
        images_dir.mkdir()
        for number, data in enumerate(make_images(1000)):
            (images_dir / f"{number}.jpg").write_bytes(data)
        image_server, image_port = start_image_server(str(images_dir))
        redis_server = RedisServer(Path(directory), appendfsync="everysec")
        common = [
            sys.executable,
            "run_service.py",
            "--host",
            "127.0.0.1",
            "--allowed-networks",
            "127.0.0.1/32",
            "--api-keys",
            f"{BULK},{PHOTO}",
        ]
        processes: list[subprocess.Popen[bytes]] = []
        results: dict[str, Figures] = {}
        try:
            for mode in modes:
                port = free_port()
                base = f"http://127.0.0.1:{port}"
                if mode == "embedded":
                    command = [*common, "--port", str(port), "--workers", "2", "--data-dir", f"{directory}/data"]
                    processes.append(start(command, logs / "embedded.log"))
                    asyncio.run(wait_ready(base))
                else:
                    redis_server.start()
                    command = [*common, "--port", str(port), "--redis", redis_server.url, "--workers", "0"]
                    processes.append(start(command, logs / "replica.log"))
                    worker = [sys.executable, "run_worker.py", "--redis", redis_server.url, "--workers", "2"]
                    processes.append(start([*worker, "--threads-per-worker", "1"], logs / "worker.log"))
                    asyncio.run(wait_ready(base))
                    worker_ready(logs / "worker.log")
                images = f"http://127.0.0.1:{image_port}"
                results[mode] = asyncio.run(measure(base, images, args.images, args.gap, mode))
                for process in processes:
                    process.terminate()
                    process.wait(timeout=60)
                processes.clear()
        finally:
            for process in processes:
                process.kill()
            redis_server.stop()
            image_server.terminate()
    print(f"\nCPU: {cpu_model()}; bulk load {args.images} images (tasks of {TASK_SIZE}, {IN_FLIGHT} in flight)")
    print(
        "| deployment | idle median / worst (ms) | loaded median / worst (ms) | one-photo tasks | bulk alone | "
        "bulk shared | shared / alone |"
    )
    print("|---|---|---|---|---|---|---|")
    for mode, got in results.items():
        print(
            f"| {mode} | {milliseconds(got.idle)} | {milliseconds(got.loaded)} | {len(got.loaded)} | "
            f"{got.alone:.1f}/s | {got.shared:.1f}/s | {got.shared / got.alone:.2f} |"
        )


if __name__ == "__main__":
    main()
