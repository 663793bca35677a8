"""The floor under the web process's CPU: the service's download client alone, per image.

    .venv/bin/python -m bench.download_floor --port PORT [--count 1000] [--rate 170]

The service's own `fetch`, on the session the service makes (aiodns, the address policy,
every timeout), with its download slots (`download_concurrency`), each download holding its
slot until the image is queued, and its `BatchQueue` (`max_queued_images`) emptied
`batch_size` images at a time at `--rate` images/s, as the workers empty it. So the event
loop sees the downloads in the rhythm it sees them in the service (flat out they cost less
per image: more sockets are ready at each wake-up). Nothing else runs in the process: no
registry, no journal, no pool, no API. `bench.run_bench` runs it each round at the rate the
service just reached; the service's web CPU per image less this floor is what the service
itself adds. Only CPU is measured: the images come from the bench's loopback image server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from pathlib import Path

import uvloop

from bench.harness import own_cpu_seconds
from service.fetch.fetcher import FetchLimits, fetch, make_session
from service.settings import Settings
from service.tasks.batching import BatchQueue, Job

WARM_UP = 100  # downloads before the clock starts: the connections are opened then


async def paced_downloads(urls: list[str], rate: float, settings: Settings) -> float:
    """CPU seconds per image of downloading `urls` (after a warm-up) at `rate` images/s."""
    limits = FetchLimits.from_settings(settings)
    slots = asyncio.Semaphore(settings.download_concurrency)
    queue = BatchQueue(settings.max_queued_images)

    async def workers() -> None:
        while True:
            await asyncio.sleep(settings.batch_size / rate)
            await queue.next_batch(settings.batch_size, 0)

    async with make_session(settings) as session:

        async def download(index: int, url: str) -> None:
            async with slots:
                data = await fetch(session, url, limits)
                await queue.put(Job("floor", index, "model", 1, data))

        emptying = asyncio.create_task(workers())
        try:
            await asyncio.gather(*(download(index, url) for index, url in enumerate(urls[:WARM_UP])))
            before = own_cpu_seconds()
            await asyncio.gather(*(download(index, url) for index, url in enumerate(urls)))
            return (own_cpu_seconds() - before) / len(urls)
        finally:
            emptying.cancel()


def floor_per_image(port: int, count: int, rate: float) -> float:
    """CPU seconds per image of the download client alone, measured in its own process."""
    command = [sys.executable, "-m", "bench.download_floor", "--port", str(port), "--count", str(count)]
    root = Path(__file__).resolve().parent.parent
    finished = subprocess.run([*command, "--rate", str(rate)], cwd=root, capture_output=True, text=True, check=True)
    return float(json.loads(finished.stdout.splitlines()[-1])["cpu_s_per_image"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True, help="the bench's image server on 127.0.0.1")
    parser.add_argument("--count", type=int, default=1000, help="images /img/0.jpg .. /img/<count-1>.jpg")
    parser.add_argument("--rate", type=float, default=170.0, help="images/s the workers would take")
    args = parser.parse_args()
    settings = Settings(allowed_networks="127.0.0.1/32")
    urls = [f"http://127.0.0.1:{args.port}/img/{n}.jpg" for n in range(args.count)]
    per_image = uvloop.run(paced_downloads(urls, args.rate, settings))
    print(json.dumps({"cpu_s_per_image": per_image, "rate": args.rate, "images": len(urls)}))


if __name__ == "__main__":
    main()
