"""Where each image's time goes, and the service against the same stack offline and the reference.

    .venv/bin/python -m bench.throughput [--photos diverse] [--images 300] [--rounds 3] [--precisions auto,int8]

On one set of photos (`--photos diverse`: the mix of sixteen scenes of `bench.images`, a
sixth grayscale; `bench`: the crops of the three test photos), in one run:

1. Per-image CPU by stage, one process and one thread, on every photo: decode, resize (with
   the crop), forward (the model at the service's batch size and precision), refine (the
   images the model was unsure of, classified again in fp32; with their share) and
   hand-over (the batch's bytes through /dev/shm, written and read as the pool does).
2. For each precision, and fp32 as the agreement's reference: a fresh service
   (`run_service.py --precision P`), then rounds of: the reference (`bench.reference`, ORT
   fp32 offline), the service's own worker stack offline (`bench.workers_offline`), and one
   task of every photo's URL through the service. Round 1 is the first task after start-up;
   so is, more precisely, the first of two tasks of `--fresh-starts` more fresh services,
   against their second (seconds apart, where rounds are tens of seconds apart and this
   machine's speed drifts by 10-15% within minutes).
   The web process's CPU per image is the download and web stages (the download client's own
   share measured alone by `bench.download_floor`, at the pace the service kept). The
   machine's idle CPU while the task ran tells stalls (workers waiting) from the web
   process's own work, which takes CPU from the workers but leaves none idle.
3. Top-1 agreement of each precision's labels with the fp32 service's, URL by URL; GET
   /tasks/<id> p99 while a task runs (one more task per round); the whole service's peak RSS (web process and workers).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import aiohttp
import numpy as np
import psutil

from bench.download_floor import floor_per_image
from bench.harness import (
    Service,
    client_connector,
    cpu_model,
    cpu_seconds,
    gc_paused,
    percentile,
    submit,
    wait_all_done,
)
from bench.images import make_diverse_images, make_images
from bench.reference import reference_images_per_second
from bench.workers_offline import workers_images_per_second
from inference import onnx_cache
from inference.models import in_passes, load_model
from inference.preprocess import decode_image, to_input
from inference.protocol import WorkerConfig
from inference.specs import PRECISIONS
from service.pool.factory import build_catalog, worker_config
from service.pool.handover import BatchFiles
from service.settings import Settings
from service.tasks.classifier import PASSES_PER_BATCH
from testing.image_server import start_image_server


@dataclass
class Figures:
    """One precision's service: per round, images/s of it, of its stack offline, of the reference."""

    service: list[float] = field(default_factory=list)
    offline: list[float] = field(default_factory=list)
    reference: list[float] = field(default_factory=list)
    web_cpu_ms: list[float] = field(default_factory=list)
    download_ms: list[float] = field(default_factory=list)
    labels: dict[str, int] = field(default_factory=dict)
    get_seconds: list[float] = field(default_factory=list)
    idle: list[float] = field(default_factory=list)  # the machine's idle CPU share while the task ran
    first_tasks: list[float] = field(default_factory=list)  # fresh services: first task / second task
    peak_rss: int = 0


class IdleWatch:
    """The machine's CPU times every 50 ms, to tell its idle share over a span afterwards:
    idle CPU while a task runs is what stalls cost (a worker waiting for a batch), whereas the
    web process's own work (downloads, the registry) takes CPU from the workers but idles none."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float, float]] = []  # (time, idle seconds, all seconds)

    async def run(self) -> None:
        while True:
            times = psutil.cpu_times()
            self.samples.append((time.time(), times.idle + getattr(times, "iowait", 0.0), sum(times)))
            await asyncio.sleep(0.05)

    def idle_share(self, start: float, end: float) -> float:
        inside = [sample for sample in self.samples if start <= sample[0] <= end]
        if len(inside) < 2:
            return float("nan")
        (_, idle_before, all_before), (_, idle_after, all_after) = inside[0], inside[-1]
        return (idle_after - idle_before) / max(1e-9, all_after - all_before)


def settings_for(precision: str) -> Settings:
    if precision not in PRECISIONS:
        raise SystemExit(f"--precisions: {precision!r} is not one of {', '.join(PRECISIONS)}")
    return Settings(precision=precision)


def stage_costs(images: list[bytes], config: WorkerConfig) -> dict[str, float]:
    """CPU ms per image of each worker stage, in this process, one thread."""
    info = config.default_model
    model = load_model(
        info, config.runtime, 1, config.model_cache_dir, config.batch_size, config.refine_margin, config.calibration_dir
    )
    size = config.batch_size
    decode = resize = forward = refine = 0.0
    refined = 0
    pixels = []
    for data in images:
        started = time.process_time()
        image = decode_image(data, info.preprocessing.resize_size, config.max_pixels)
        decoded = time.process_time()
        pixels.append(to_input(image, info.preprocessing))
        resize += time.process_time() - decoded
        decode += decoded - started
    per_call = size * PASSES_PER_BATCH  # what the pool hands a worker at once
    for start in range(0, len(pixels), per_call):
        batch = np.stack(pixels[start : start + per_call])
        started = time.process_time()  # LoadedModel.forward, its two steps timed apart
        logits = in_passes(model.fast, batch, model.pass_size)
        forwarded = time.process_time()
        refined += len(model.refine(logits, batch))
        refine += time.process_time() - forwarded
        forward += forwarded - started
    files = BatchFiles.on_shared_memory()
    handover = 0.0
    if files is not None:
        started = time.process_time()
        for start in range(0, len(images), per_call):
            shared = files.put(images[start : start + per_call])
            if shared is not None:
                shared.read()
                files.release(shared, reuse=True)
        handover = time.process_time() - started
        files.close()
    count = len(images)
    return {
        "decode": decode / count * 1000,
        "resize": resize / count * 1000,
        "forward": forward / count * 1000,
        "refine": refine / count * 1000,
        "refined_share": refined / count,
        "handover": handover / count * 1000,
    }


async def run_precision(
    args: argparse.Namespace, precision: str, images: list[bytes], urls: list[str], data_dir: str
) -> Figures:
    settings = settings_for(precision)
    catalog = await build_catalog(settings)
    config = replace(worker_config(settings, catalog), parent_pid=0, nice=0)
    export = onnx_cache.ensure(config.default_model, settings.model_cache_dir)
    figures = Figures()
    service = Service(args, "sqlite", data_dir, ("--precision", precision))
    sampler = asyncio.create_task(service.memory.run())
    idle = IdleWatch()
    idle_sampler = asyncio.create_task(idle.run())
    try:
        async with aiohttp.ClientSession(connector=client_connector()) as http:
            await service.ready()
            await settle(idle, service)
            for round_number in range(args.rounds):
                web, workers = [service.memory.process], service.workers()
                before, workers_before = cpu_seconds(web), cpu_seconds(workers)
                started = time.time()
                task_id = await submit(http, service.base, urls)
                finished = await wait_all_done(http, service.base, {task_id})
                figures.service.append(len(urls) / (finished - started))
                figures.idle.append(idle.idle_share(started, finished))
                figures.web_cpu_ms.append((cpu_seconds(web) - before) / len(urls) * 1000)
                workers_ms = (cpu_seconds(workers) - workers_before) / len(urls) * 1000
                if round_number == 0:
                    async with http.get(f"{service.base}/tasks/{task_id}") as response:
                        items = (await response.json())["items"]
                    figures.labels = {item["url"]: item["labels"][0]["class_index"] for item in items}
                figures.get_seconds += await get_latency(http, service.base, urls)  # p99 of every round's
                pace = figures.service[-1]
                floor = await asyncio.to_thread(floor_per_image, args.image_port, len(urls), pace)
                figures.download_ms.append(floor * 1000)
                # Three passes over the photos: a second or so of one pass is too short a
                # window for the offline figures (pool start-up skew).
                processes, passes = settings.resolved_workers(), images * 3
                figures.offline.append(await asyncio.to_thread(workers_images_per_second, passes, config, processes))
                figures.reference.append(
                    await asyncio.to_thread(reference_images_per_second, passes, export.onnx, processes)
                )
                print(
                    f"  {precision} round {round_number + 1}: service {figures.service[-1]:.1f}, offline "
                    f"{figures.offline[-1]:.1f}, reference {figures.reference[-1]:.1f} images/s; CPU per image: "
                    f"workers {workers_ms:.2f} ms, web {figures.web_cpu_ms[-1]:.2f} ms",
                    flush=True,
                )
    finally:
        sampler.cancel()
        idle_sampler.cancel()
        service.stop()
    figures.peak_rss = service.memory.peak["total_rss"]
    return figures


async def settle(idle: IdleWatch, service: Service) -> None:
    """Wait until the machine is idle (90% over half a second) once the service is ready, at
    most 15 s: round 1 is the first task after start-up, and should not share the CPU with
    processes of the previous service or offline run still exiting. Prints how long that took
    and the service's own CPU meanwhile (a service still busy after /readyz would show there)."""
    processes = [service.memory.process, *service.workers()]
    before, started = cpu_seconds(processes), time.time()
    while time.time() - started < 15:
        await asyncio.sleep(0.5)
        if idle.idle_share(time.time() - 0.5, time.time()) >= 0.9:
            break
    print(
        f"  settled {time.time() - started:.1f} s after /readyz; the service's CPU meanwhile "
        f"{cpu_seconds(processes) - before:.2f} s",
        flush=True,
    )


async def first_task_ratios(args: argparse.Namespace, precision: str, urls: list[str], data_dir: str) -> list[float]:
    """For `args.fresh_starts` fresh services: the first task's images/s over the second's,
    two tasks seconds apart. Rounds of the main comparison are tens of seconds apart, and
    this machine's speed drifts by 10-15% within minutes (the workers' CPU per image of the
    same photos too), so round 1 against the best of rounds also measures that drift; this
    measures what start-up itself costs the first task."""
    ratios = []
    async with aiohttp.ClientSession(connector=client_connector()) as http:
        for start in range(args.fresh_starts):
            service = Service(args, "sqlite", f"{data_dir}/fresh-{start}", ("--precision", precision))
            try:
                await service.ready()
                rates = []
                for _ in range(2):
                    started = time.time()
                    task_id = await submit(http, service.base, urls)
                    rates.append(len(urls) / (await wait_all_done(http, service.base, {task_id}) - started))
                ratios.append(rates[0] / rates[1])
            finally:
                service.stop()
    return ratios


async def get_latency(http: aiohttp.ClientSession, base: str, urls: list[str]) -> list[float]:
    """GET /tasks/<id> of a running task of every URL, timed to its whole body (parsed after the
    clock stops), until it ends."""
    task_id = await submit(http, base, urls)
    timings = []
    with gc_paused():
        while True:
            started = time.perf_counter()
            async with http.get(f"{base}/tasks/{task_id}") as response:
                body = await response.read()
            timings.append(time.perf_counter() - started)
            if json.loads(body)["status"] not in ("queued", "running"):
                return timings
            await asyncio.sleep(0.05)


async def run(args: argparse.Namespace, images: list[bytes]) -> dict[str, Figures]:
    urls = [f"http://127.0.0.1:{args.image_port}/img/{number}.jpg" for number in range(len(images))]
    results = {}
    with tempfile.TemporaryDirectory() as data_root:
        for precision in ["fp32", *args.precisions.split(",")]:
            print(f"service --precision {precision} ...", flush=True)
            results[precision] = await run_precision(args, precision, images, urls, f"{data_root}/{precision}")
            results[precision].first_tasks = await first_task_ratios(args, precision, urls, f"{data_root}/{precision}")
            ratios = ", ".join(f"{ratio:.0%}" for ratio in results[precision].first_tasks)
            print(f"  {precision}: first task / second of {args.fresh_starts} fresh services: {ratios}", flush=True)
    return results


def main() -> None:
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", choices=("diverse", "bench"), default="diverse")
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precisions", default="auto", help="besides fp32, comma-separated")
    parser.add_argument("--fresh-starts", type=int, default=3, help="services started for the first-task figure")
    parser.add_argument("--runtime", default=defaults.runtime)
    parser.add_argument("--workers", type=int, default=defaults.resolved_workers())
    parser.add_argument("--threads", type=int, default=defaults.resolved_threads())
    args = parser.parse_args()
    images = make_diverse_images(args.images) if args.photos == "diverse" else make_images(args.images)
    print(f"{cpu_model()}; {args.workers} workers; {len(images)} {args.photos} photos", flush=True)

    print("| precision | decode | resize | forward | refine (share) | hand-over | ms per image, 1 thread |")
    print("|---|---|---|---|---|---|---|")
    for precision in ["fp32", *args.precisions.split(",")]:
        settings = settings_for(precision)
        config = worker_config(settings, asyncio.run(build_catalog(settings)))
        costs = stage_costs(images, config)
        print(
            f"| {config.default_model.precision} (batch {config.batch_size}) | {costs['decode']:.2f} | "
            f"{costs['resize']:.2f} | {costs['forward']:.2f} | {costs['refine']:.2f} "
            f"({costs['refined_share']:.0%}) | {costs['handover']:.3f} | "
            f"{sum(value for key, value in costs.items() if key != 'refined_share'):.2f} |",
            flush=True,
        )

    with tempfile.TemporaryDirectory() as directory:
        for number, data in enumerate(images):
            Path(directory, f"{number}.jpg").write_bytes(data)
        server, args.image_port = start_image_server(directory)
        try:
            results = asyncio.run(run(args, images))
        finally:
            server.terminate()

    reference_labels = results["fp32"].labels
    print()
    print(
        "| precision | service / reference, best of rounds | first round / best | "
        "first task / second, fresh services | service / offline stack | "
        "CPU idle during the task | agreement with fp32 | web CPU (download) ms/image | GET p99 | peak RSS |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for precision, figures in results.items():
        ratios = [service / reference for service, reference in zip(figures.service, figures.reference, strict=True)]
        offline = [service / offline for service, offline in zip(figures.service, figures.offline, strict=True)]
        agreement = statistics.mean(figures.labels.get(url) == label for url, label in reference_labels.items())
        idle = ", ".join(f"{value:.1%}" for value in figures.idle)
        first_tasks = ", ".join(f"{value:.0%}" for value in figures.first_tasks) or "-"
        print(
            f"| {precision} | {max(ratios):.2f}x ({', '.join(f'{ratio:.2f}' for ratio in ratios)}) | "
            f"{figures.service[0] / max(figures.service):.0%} | {first_tasks} | "
            f"{statistics.median(offline):.0%} ({', '.join(f'{value:.0%}' for value in offline)}) | "
            f"{idle} | {agreement:.1%} | {statistics.median(figures.web_cpu_ms):.2f} "
            f"({statistics.median(figures.download_ms):.2f}) | {percentile(figures.get_seconds, 0.99) * 1000:.1f} ms | "
            f"{figures.peak_rss / 2**20:.0f} MiB |",
            flush=True,
        )


if __name__ == "__main__":
    main()
