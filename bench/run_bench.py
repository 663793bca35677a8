"""Throughput and latency benchmark: a fixed reference pipeline vs the real service end to end.

    .venv/bin/python -m bench.run_bench            # ~8 minutes on 2 cores

In one run it (1) makes >= 1,000 realistic JPEGs and serves them from a loopback image
server in its own process; (2) measures the reference: `bench.reference`, a fixed offline
pipeline (Pillow draft decode, ONNX Runtime fp32, one process per core, batches of 16) on
the same bytes, no HTTP; (3) starts `run_service.py` as a subprocess, times it to
`/readyz` 200 and runs consecutive 300-URL tasks at once, the first after start-up
included; (4) times one 1,000-URL task and 100 concurrent 10-URL tasks from the first POST
to the last item done, in rounds interleaved with (2) so each ratio compares figures taken
minutes apart; (5) measures GET /tasks/<id> and POST /submit latency while the service is
saturated; (6) reports peak memory of the service and its workers, and the web process's
CPU per image next to its floor, `bench.download_floor` (the download client alone, at the
pace the service kept, and a bare client that any HTTP client would cost at least). It
does (3)-(6) for each task store (`--stores`, default both: one service each, rounds
interleaved) and prints a table with the ratios, sqlite / memory included.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from bench.download_floor import floor_per_image
from bench.harness import (
    MemoryWatch,
    Service,
    client_connector,
    cpu_model,
    cpu_seconds,
    latency_under_load,
    percentile,
    submit,
    wait_all_done,
)
from bench.images import make_images
from bench.reference import reference_images_per_second
from inference import onnx_cache
from inference.specs import EMBEDDED, local_info
from service.settings import Settings
from testing.image_server import start_image_server

# --- (2) the reference ---


def reference_limit(images: list[bytes], settings: Settings) -> float:
    """Images/s of the fixed reference pipeline (bench.reference): ONNX Runtime fp32, no HTTP."""
    entry = onnx_cache.ensure(local_info(EMBEDDED), settings.model_cache_dir)
    return reference_images_per_second(images, entry.onnx, settings.resolved_workers())


# --- (3)-(5) the service end to end ---


# Throughput is timed from just before the first POST to the service's `finished_at` of the
# last task, both read off this machine's clock: the time between polls (`POLL_SECONDS`)
# would otherwise add to a task's time at random (at 0.1 s, up to 5% of a 2-second task:
# seen as one task in three running slower).


async def one_big_task(http: aiohttp.ClientSession, base: str, urls: list[str]) -> float:
    started = time.time()
    task_id = await submit(http, base, urls)
    return len(urls) / (await wait_all_done(http, base, {task_id}) - started)


async def many_small_tasks(http: aiohttp.ClientSession, base: str, urls: list[str], tasks: int) -> float:
    size = len(urls) // tasks
    started = time.time()
    task_ids = await asyncio.gather(*(submit(http, base, urls[n * size : (n + 1) * size]) for n in range(tasks)))
    return size * tasks / (await wait_all_done(http, base, set(task_ids)) - started)


async def service_run(
    args: argparse.Namespace, settings: Settings, images: list[bytes], image_server_pid: int, image_port: int
) -> dict[str, Any]:
    """Start-up and the first tasks; then rounds of the reference, then for each store one
    1,000-URL task and many small tasks, interleaved so that a slow spell of this shared
    machine hits both sides of each ratio; then latency, per store."""
    urls = [f"http://127.0.0.1:{image_port}/img/{n}.jpg" for n in range(len(images))]
    result: dict[str, Any] = {"reference": [], "stores": {}}
    with tempfile.TemporaryDirectory() as data_root:
        services: list[Service] = []
        samplers = []
        try:
            async with aiohttp.ClientSession(connector=client_connector()) as http:
                for store in args.stores.split(","):  # one at a time, so neither start slows the other
                    service = Service(args, store, f"{data_root}/{store}")
                    services.append(service)
                    samplers.append(asyncio.create_task(service.memory.run()))
                    figures: dict[str, Any] = {
                        "big": [],
                        "small": [],
                        "latency": {"get": [], "submit": []},
                        "web_cpu": [],
                        "worker_busy": [],
                        "image_server_cpu": [],
                        "download_floor": [],
                        "bare_floor": [],
                    }
                    result["stores"][store] = figures
                    figures["ready_s"] = await service.ready()
                    # No warm-up: the first task after start-up is measured too. The same 300
                    # URLs each time, so that only the service can make one task slower.
                    figures["first_tasks"], figures["first_tasks_worker_ms"] = [], []
                    first_urls = urls[:300]
                    for _ in range(args.first_tasks):
                        workers = service.workers()
                        before_task = cpu_seconds(workers)
                        figures["first_tasks"].append(await one_big_task(http, service.base, first_urls))
                        # The same images each time: a task whose workers needed more CPU per
                        # image was slowed by the machine, not by the service.
                        worker_ms = (cpu_seconds(workers) - before_task) / len(first_urls) * 1000
                        figures["first_tasks_worker_ms"].append(worker_ms)
                image_server = psutil.Process(image_server_pid)
                for round_number in range(args.repeat):
                    print(
                        f"round {round_number + 1}/{args.repeat}: reference; per store 1 big task, "
                        f"{args.small_tasks} small tasks",
                        flush=True,
                    )
                    result["reference"].append(await asyncio.to_thread(reference_limit, images, settings))
                    # Each round changes which store goes first, so neither always runs
                    # right after the reference.
                    order = services if round_number % 2 == 0 else services[::-1]
                    for service in order:
                        figures = result["stores"][service.store]
                        workers = service.workers()
                        processes = [service.memory.process]
                        before = [cpu_seconds(processes), cpu_seconds(workers), cpu_seconds([image_server])]
                        started = time.perf_counter()
                        figures["big"].append(await one_big_task(http, service.base, urls))
                        # Where the CPU goes during the 1,000-URL task: every round, as one
                        # round's figure varies by a fifth on this shared machine.
                        elapsed = time.perf_counter() - started
                        figures["web_cpu"].append((cpu_seconds(processes) - before[0]) / len(urls))
                        figures["worker_busy"].append((cpu_seconds(workers) - before[1]) / elapsed / len(workers))
                        figures["image_server_cpu"].append((cpu_seconds([image_server]) - before[2]) / len(urls))
                        # The part of that web CPU which is the download client's own, at the
                        # pace the service just kept (bench.download_floor, its own process).
                        pace = figures["big"][-1]
                        floor = await asyncio.to_thread(floor_per_image, image_port, len(urls), pace)
                        figures["download_floor"].append(floor)
                        bare = await asyncio.to_thread(floor_per_image, image_port, len(urls), pace, "bare")
                        figures["bare_floor"].append(bare)
                        figures["small"].append(await many_small_tasks(http, service.base, urls, args.small_tasks))
                    for service in order:  # every round, so p99 stands on a few hundred requests
                        latency = result["stores"][service.store]["latency"]
                        for kind, timings in (await latency_under_load(http, service.base, urls)).items():
                            latency[kind] += timings
            for service in services:
                result["stores"][service.store]["memory"] = service.memory
            return result
        finally:
            for sampler in samplers:
                sampler.cancel()
            for service in services:
                service.stop()


def median(values: list[float]) -> float:
    return statistics.median(values)


def runs(values: list[float]) -> str:
    return f" (median of {', '.join(f'{value:.1f}' for value in values)})" if len(values) > 1 else ""


def ratios(values: list[float]) -> str:
    return f"{median(values):.0%}" + (
        f" (median of {', '.join(f'{v:.0%}' for v in values)})" if len(values) > 1 else ""
    )


def milliseconds(seconds: list[float]) -> str:
    """The median of per-round figures, and each round's."""
    return f"{median(seconds) * 1000:.2f} ms ({', '.join(f'{value * 1000:.2f}' for value in seconds)})"


def mib(size: int) -> str:
    return f"{size / 2**20:.0f} MiB"


def main() -> None:
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--small-tasks", type=int, default=100)
    parser.add_argument("--runtime", default=defaults.runtime)
    parser.add_argument("--workers", type=int, default=defaults.resolved_workers())
    parser.add_argument("--threads", type=int, default=defaults.resolved_threads())
    parser.add_argument("--repeat", type=int, default=3, help="runs per throughput figure; the median is reported")
    parser.add_argument("--first-tasks", type=int, default=3, help="300-URL tasks run right after start-up")
    parser.add_argument("--stores", default="sqlite,memory", help="task stores to compare, one service each")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    settings = Settings(runtime=args.runtime, workers=args.workers, threads_per_worker=args.threads)

    # The export a first start on this machine would make (about 7 s) is not start-up time.
    onnx_cache.ensure(local_info(EMBEDDED), settings.model_cache_dir)
    print(f"making {args.images} JPEGs ...", flush=True)
    images = make_images(args.images)
    with tempfile.TemporaryDirectory() as directory:
        for number, data in enumerate(images):
            Path(directory, f"{number}.jpg").write_bytes(data)
        server, image_port = start_image_server(directory)
        try:
            assert server.pid is not None  # started
            result = asyncio.run(service_run(args, settings, images, server.pid, image_port))
        finally:
            server.terminate()

    reference = result["reference"]
    sizes = sorted(len(data) for data in images)
    rows = [
        (
            "machine",
            f"{cpu_model()}; {os.cpu_count()} CPUs, {len(os.sched_getaffinity(0))} usable; "
            f"{args.workers} workers x {args.threads} threads; runtime {settings.resolved_runtime()}, precision "
            f"{settings.resolve_precision(EMBEDDED).precision}",
        ),
        ("images", f"{len(images)} JPEGs, 640x480..1600x1200, median {sizes[len(sizes) // 2] // 1024} KiB"),
        ("reference (ORT fp32, offline)", f"{median(reference):.1f} images/s" + runs(reference)),
    ]
    report: dict[str, Any] = {"reference_images_per_s": reference, "mean_image_bytes": statistics.mean(sizes)}
    for store, figures in result["stores"].items():
        memory: MemoryWatch = figures["memory"]
        get, post = figures["latency"]["get"], figures["latency"]["submit"]
        big_ratios = [b / o for b, o in zip(figures["big"], reference, strict=True)]
        small_ratios = [s / o for s, o in zip(figures["small"], reference, strict=True)]
        first = figures["first_tasks"]
        rows += [
            (f"[{store}] ready (start to /readyz 200)", f"{figures['ready_s']:.1f} s"),
            (
                f"[{store}] 300-URL tasks right after start-up",
                f"{', '.join(f'{value:.1f}' for value in first)} images/s; worst / best {min(first) / max(first):.0%}",
            ),
            (
                f"[{store}] their workers' CPU per image",
                ", ".join(f"{value:.2f}" for value in figures["first_tasks_worker_ms"]) + " ms",
            ),
            (f"[{store}] 1 task x 1,000 URLs", f"{median(figures['big']):.1f} images/s" + runs(figures["big"])),
            (
                f"[{store}] {args.small_tasks} tasks x {len(images) // args.small_tasks} URLs",
                f"{median(figures['small']):.1f} images/s" + runs(figures["small"]),
            ),
            (f"[{store}] 1,000-URL task / reference, same round", ratios(big_ratios)),
            (f"[{store}] small tasks / reference, same round", ratios(small_ratios)),
            (
                f"[{store}] GET /tasks/<id> (1,000 items), saturated",
                f"p50 {percentile(get, 0.5) * 1000:.1f} ms, p99 {percentile(get, 0.99) * 1000:.1f} ms (n={len(get)})",
            ),
            (
                f"[{store}] POST /submit, saturated",
                f"p50 {percentile(post, 0.5) * 1000:.1f} ms, p99 {percentile(post, 0.99) * 1000:.1f} ms "
                f"(n={len(post)})",
            ),
            (f"[{store}] web process CPU per image, 1,000-URL task", milliseconds(figures["web_cpu"])),
            (
                f"[{store}] of which the download client alone (same pace)",
                milliseconds(figures["download_floor"]),
            ),
            (
                f"[{store}] a bare client instead (keep-alive GETs, nothing else; same pace)",
                milliseconds(figures["bare_floor"]),
            ),
            (
                f"[{store}] web CPU less the download client, same round",
                milliseconds(
                    [web - floor for web, floor in zip(figures["web_cpu"], figures["download_floor"], strict=True)]
                ),
            ),
            (
                f"[{store}] worker CPU busy, 1,000-URL task",
                f"{median(figures['worker_busy']):.0%} of each worker's wall time"
                + f" ({', '.join(f'{value:.0%}' for value in figures['worker_busy'])})",
            ),
            (f"[{store}] the bench's image server, CPU per image", milliseconds(figures["image_server_cpu"])),
            (
                f"[{store}] peak memory",
                f"RSS total {mib(memory.peak['total_rss'])} (service {mib(memory.peak['main_rss'])}, workers "
                f"{mib(memory.peak['workers_rss'])}); PSS total {mib(memory.peak['total_pss'])}",
            ),
        ]
        report[store] = {
            "ready_s": figures["ready_s"],
            "first_tasks_images_per_s": first,
            "first_tasks_worker_cpu_ms_per_image": figures["first_tasks_worker_ms"],
            "big_task_images_per_s": figures["big"],
            "small_tasks_images_per_s": figures["small"],
            "get_p99_s": percentile(get, 0.99),
            "submit_p99_s": percentile(post, 0.99),
            "web_cpu_s_per_image": figures["web_cpu"],
            "download_client_cpu_s_per_image": figures["download_floor"],
            "bare_client_cpu_s_per_image": figures["bare_floor"],
            "peak_memory_bytes": memory.peak,
        }
    stores = result["stores"]
    if {"sqlite", "memory"} <= set(stores):
        for kind, label in (("big", "1,000-URL task"), ("small", "small tasks")):
            pairs = [s / m for s, m in zip(stores["sqlite"][kind], stores["memory"][kind], strict=True)]
            rows.append((f"sqlite / memory, {label}, same round", ratios(pairs)))
            report[f"sqlite_over_memory_{kind}"] = pairs
    width = max(len(name) for name, _ in rows)
    print()
    for name, value in rows:
        print(f"| {name.ljust(width)} | {value} |")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
