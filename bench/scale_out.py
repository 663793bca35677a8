"""Scale-out: the same two inference processes fed through Redis (a web-only replica and
`run_worker.py --workers 2`) against the embedded pool (`run_service.py --workers 2`), on
this machine, in one run, rounds alternating; and what the broker costs per batch.

    .venv/bin/python -m bench.scale_out [--rounds 2]   # ~4 minutes on 2 cores

Each round times a 300-URL and a 1,000-URL task on each deployment (submit to final state,
a polling client's view). The target: Redis / embedded >= 0.85 on both sizes. The broker's
cost per batch of 16 is measured apart, in this process against the same Redis, on the
benchmark's real image bytes: the CPU of the web side's calls (two status changes and an
XADD per image), of a worker's (XREADGROUP, one script for the outcomes, XACK + XDEL), and
Redis's own CPU for them (INFO commandstats).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from bench.bulk import direct_task
from bench.harness import cpu_model
from bench.images import make_images
from service.broker.streams import StreamBatches, StreamJobs
from service.stores.redis.registry import RedisRegistry
from service.tasks.queues import QueuedImage
from service.tasks.records import ItemStatus, Label
from service.tasks.registry import ItemChange
from testing.image_server import start_image_server
from testing.ports import free_port
from testing.redis_server import RedisServer
from testing.services import ROOT, wait_ready

BATCH = 16


def start(command: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as sink:
        return subprocess.Popen(command, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT)


def worker_ready(log: Path) -> None:
    deadline = time.monotonic() + 180
    while "processes classify" not in log.read_text():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the worker did not start: {log.read_text()}")
        time.sleep(0.2)


async def broker_cost(url: str, images: list[bytes], batches: int) -> dict[str, float]:
    """Milliseconds per batch of 16, on a prefix of its own: the CPU of the web side's calls
    (each image moved to downloading, then to classifying and added to the stream: sixteen of
    each at once, as concurrent downloads make them), of a worker's calls (read the batch,
    write its outcomes, confirm it), and of Redis itself (commandstats)."""
    registry = await RedisRegistry.open(url, 3600, 100_000, prefix="bench-broker:")
    jobs = StreamJobs(registry.link, registry.prefix, 100_000)
    source = StreamBatches(registry.link, registry.prefix, registry, ["m"], "bench", claim_idle=30, max_deliveries=3)
    await source.start()
    labels = [Label(label="espresso", class_index=967, score=0.9)] * 5
    task = await registry.create([f"http://images.example/{n}.jpg" for n in range(batches * BATCH)], "m", 5)
    stats = redis.Redis.from_url(url)
    stats.config_resetstat()
    web = worker = 0.0
    for number in range(batches):
        indices = range(number * BATCH, (number + 1) * BATCH)
        started = time.process_time()
        for status in (ItemStatus.DOWNLOADING, ItemStatus.CLASSIFYING):
            await asyncio.gather(*(registry.update_item(task.task_id, index, status) for index in indices))
        await asyncio.gather(
            *(jobs.put(QueuedImage(task.task_id, index, "m", 5, images[index % len(images)])) for index in indices)
        )
        middle = time.process_time()
        batch = await source.next_batch(BATCH, 0)
        await registry.update_items(
            [ItemChange(job.task_id, job.index, ItemStatus.SUCCEEDED, labels=labels) for job in batch]
        )
        await source.finished(batch)
        web += middle - started
        worker += time.process_time() - middle
    commands = stats.info("commandstats")
    redis_ms = sum(entry["usec"] for entry in commands.values()) / 1000 / batches
    await source.close()
    await jobs.close()
    await registry.close()
    return {"web": web * 1000 / batches, "worker": worker * 1000 / batches, "redis": redis_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        logs = Path(directory)
        images_dir = Path(directory, "img")
        images_dir.mkdir()
        images = make_images(1000)
        for number, data in enumerate(images):
            (images_dir / f"{number}.jpg").write_bytes(data)
        image_server, image_port = start_image_server(str(images_dir))
        redis_server = RedisServer(Path(directory), appendfsync="everysec")
        redis_server.start()
        redis_url = redis_server.url
        common = [sys.executable, "run_service.py", "--host", "127.0.0.1", "--allowed-networks", "127.0.0.1/32"]
        embedded_port, replica_port = free_port(), free_port()
        processes = [
            start(
                [*common, "--port", str(embedded_port), "--workers", "2", "--data-dir", f"{directory}/data"],
                logs / "embedded.log",
            ),
            start([*common, "--port", str(replica_port), "--redis", redis_url, "--workers", "0"], logs / "replica.log"),
            start(
                [sys.executable, "run_worker.py", "--redis", redis_url, "--workers", "2", "--threads-per-worker", "1"],
                logs / "worker.log",
            ),
        ]
        bases = {"embedded": f"http://127.0.0.1:{embedded_port}", "redis": f"http://127.0.0.1:{replica_port}"}
        rates: dict[tuple[str, int], list[float]] = {}
        try:
            asyncio.run(wait_ready(bases["embedded"]))
            asyncio.run(wait_ready(bases["redis"]))
            worker_ready(logs / "worker.log")
            url = f"http://127.0.0.1:{image_port}/img/{{}}.jpg?run={{}}"
            for name, base in bases.items():  # warm both
                asyncio.run(direct_task(base, [url.format(n, f"warm-{name}") for n in range(100)]))
            for round_number in range(args.rounds):
                order = ["embedded", "redis"] if round_number % 2 == 0 else ["redis", "embedded"]
                for size in (300, 1000):
                    for name in order:
                        urls = [url.format(n, f"{name}-{size}-{round_number}") for n in range(size)]
                        rate = asyncio.run(direct_task(bases[name], urls))
                        rates.setdefault((name, size), []).append(rate)
                        print(f"round {round_number + 1}: {name:8} {size:5}-URL task {rate:6.1f} images/s", flush=True)
            cost = asyncio.run(broker_cost(redis_url, images, 200))
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                process.wait(timeout=60)
            redis_server.stop()
            image_server.terminate()
    print(f"CPU: {cpu_model()}")
    for size in (300, 1000):
        embedded = statistics.median(rates[("embedded", size)])
        through_redis = statistics.median(rates[("redis", size)])
        print(
            f"{size:5}-URL task, median of {args.rounds}: embedded {embedded:.1f} images/s, "
            f"through Redis {through_redis:.1f} images/s = {through_redis / embedded:.0%} (target >= 85%)"
        )
    print(
        f"broker per batch of {BATCH}: web side {cost['web']:.2f} ms CPU, worker side {cost['worker']:.2f} ms CPU, "
        f"Redis {cost['redis']:.2f} ms CPU"
    )


if __name__ == "__main__":
    main()
