"""The service's worker code alone against the fixed reference: the ceiling of `run_bench`.

    .venv/bin/python -m bench.workers_offline [--images 640] [--rounds 2] [--diverse] [--batch 8,16]

One process per core runs `inference.worker` exactly as the service's pool does (started
with the settings' worker configuration, fed batches of image files as bytes, as many per
call as the service hands over: decode, preprocessing, the model's forward passes), next
to `bench.reference` on the same bytes, in the same rounds. No HTTP, no registry, no web
process: what is left between this ratio and the end-to-end one of `bench.run_bench` is
the service's own cost and the image server's. Also run with `--refine-margin 0` (pure
bf16), so the price of refining is measured in the same run, and at each `--batch` size
(the service's batch size and model shapes), so they can be compared.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace

from bench.harness import cpu_model
from bench.images import make_diverse_images, make_images
from bench.reference import reference_images_per_second
from inference import onnx_cache, worker
from inference.protocol import WorkerConfig
from service.pool.factory import build_catalog, worker_config
from service.settings import Settings
from service.tasks.classifier import PASSES_PER_BATCH


def workers_images_per_second(images: list[bytes], config: WorkerConfig, processes: int) -> float:
    """Images/s of `processes` workers, all busy (after a warm-up), fed batches as the
    service feeds them: `PASSES_PER_BATCH` forward passes of the configuration's batch size."""
    size = config.batch_size * PASSES_PER_BATCH
    batches = [images[start : start + size] for start in range(0, len(images), size)]
    context = multiprocessing.get_context("spawn")
    info = config.default_model
    with ProcessPoolExecutor(processes, context, worker.init_worker, (config,)) as pool:
        every_worker_ready(pool, processes)
        warm = [pool.submit(worker.classify_batch, info, batches[0], [5] * len(batches[0])) for _ in range(processes)]
        for future in warm:
            future.result()
        started = time.perf_counter()
        futures = [pool.submit(worker.classify_batch, info, batch, [5] * len(batch)) for batch in batches]
        done = sum(len(future.result()) for future in futures)
        return done / (time.perf_counter() - started)


def every_worker_ready(pool: ProcessPoolExecutor, processes: int) -> None:
    """Return once every worker has loaded its model: a worker still loading when the clock
    starts leaves its share to the others (the first-ready one would take every warm-up
    batch), which on a run of a second or two measured up to a third too slow."""
    seen: set[int] = set()
    while len(seen) < processes:
        seen |= {future.result() for future in [pool.submit(_pid_after_a_pause) for _ in range(processes)]}


def _pid_after_a_pause() -> int:
    time.sleep(0.2)  # long enough for a second ready worker to take the next one
    return os.getpid()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=640)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--diverse", action="store_true", help="the diverse mix (bench.images) instead")
    parser.add_argument("--batch", default="", help="batch sizes to compare, e.g. 8,16 (default: the service's)")
    parser.add_argument("--precision", default="auto", help="as the service's --precision")
    args = parser.parse_args()
    settings = Settings(precision=args.precision)
    catalog = asyncio.run(build_catalog(settings))
    config = replace(worker_config(settings, catalog), parent_pid=0, nice=0)
    processes = settings.resolved_workers()
    entry = onnx_cache.ensure(config.default_model, settings.model_cache_dir)
    images = make_diverse_images(args.images) if args.diverse else make_images(args.images)
    sizes = [int(size) for size in args.batch.split(",")] if args.batch else [config.batch_size]
    print(f"{cpu_model()}; {processes} processes; {config.runtime} {config.default_model.precision}", flush=True)
    print("| round | batch | reference (ORT fp32) | workers | ratio | workers, --refine-margin 0 | ratio |")
    print("|---|---|---|---|---|---|---|")
    for round_number in range(args.rounds):
        reference = reference_images_per_second(images, entry.onnx, processes)
        for size in sizes:
            sized = replace(config, batch_size=size)
            refined = workers_images_per_second(images, sized, processes)
            pure = workers_images_per_second(images, replace(sized, refine_margin=0.0), processes)
            print(
                f"| {round_number + 1} | {size} | {reference:.1f} | {refined:.1f} | {refined / reference:.2f}x "
                f"| {pure:.1f} | {pure / reference:.2f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
