"""`GET /tasks/<id>` and `POST /submit` latency while the service is saturated, alone.

    .venv/bin/python -m bench.latency [--rounds 3] [--stores sqlite,memory]   # ~3 minutes

Step (5) of `bench.run_bench` without the throughput rounds around it: per round and store,
one 1,000-URL task runs while its detail is fetched every 50 ms and a 1-URL task is
submitted every fourth fetch. Stores take turns, so a slow spell of the machine hits both.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

import aiohttp

from bench.harness import Service, client_connector, cpu_model, latency_under_load, percentile
from bench.images import make_images
from service.settings import Settings
from testing.image_server import start_image_server


async def measure(args: argparse.Namespace, urls: list[str]) -> dict[str, dict[str, list[float]]]:
    timings: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as data_root:
        services = [Service(args, store, f"{data_root}/{store}") for store in args.stores.split(",")]
        try:
            async with aiohttp.ClientSession(connector=client_connector()) as http:
                for service in services:
                    await service.ready()
                    timings[service.store] = {"get": [], "submit": []}
                for round_number in range(args.rounds):
                    print(f"round {round_number + 1}/{args.rounds}", flush=True)
                    for service in services if round_number % 2 == 0 else services[::-1]:
                        for kind, values in (await latency_under_load(http, service.base, urls)).items():
                            timings[service.store][kind] += values
        finally:
            for service in services:
                service.stop()
    return timings


def main() -> None:
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--stores", default="sqlite,memory")
    parser.add_argument("--runtime", default=defaults.runtime)
    parser.add_argument("--workers", type=int, default=defaults.resolved_workers())
    parser.add_argument("--threads", type=int, default=defaults.resolved_threads())
    args = parser.parse_args()
    images = make_images(1000)
    with tempfile.TemporaryDirectory() as directory:
        for number, data in enumerate(images):
            Path(directory, f"{number}.jpg").write_bytes(data)
        server, port = start_image_server(directory)
        try:
            urls = [f"http://127.0.0.1:{port}/img/{n}.jpg" for n in range(len(images))]
            timings = asyncio.run(measure(args, urls))
        finally:
            server.terminate()
    print(f"\n{cpu_model()}; {args.workers} workers x {args.threads} threads")
    for store, kinds in timings.items():
        for kind, values in kinds.items():
            print(
                f"| {store} | {'GET /tasks/<id>' if kind == 'get' else 'POST /submit'} | "
                f"p50 {percentile(values, 0.5) * 1000:.1f} ms | p99 {percentile(values, 0.99) * 1000:.1f} ms | "
                f"n={len(values)} |"
            )


if __name__ == "__main__":
    main()
