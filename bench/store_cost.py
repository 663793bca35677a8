"""CPU the task store costs per image, SQLite against the in-memory store, in one run.

    .venv/bin/python -m bench.store_cost [--tasks 5] [--rounds 3]

Drives the registry alone the way the task engine does (a 1,000-URL task created, every
item downloading, classifying, then succeeded with 5 labels, in batches of 16 a few ms
apart) and reports process CPU (the event loop and the SQLite writer thread) per image. The
end-to-end figures are in `bench.run_bench`; this isolates the store from the machine's noise.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from pathlib import Path

from bench.harness import own_cpu_seconds
from inference.protocol import Label
from service.metrics import Metrics
from service.stores.memory.registry import InMemoryRegistry
from service.stores.sqlite.registry import SqliteRegistry
from service.tasks.records import ItemStatus

IMAGES = 1000
BATCH = 16


async def cost_per_image(store: str, tasks: int) -> float:
    with tempfile.TemporaryDirectory() as data_dir:
        registry = (
            InMemoryRegistry()
            if store == "memory"
            else await SqliteRegistry.open(Path(data_dir), 3600, 10_000, Metrics())
        )
        labels = [Label(label=f"label {n}", class_index=n, score=0.1) for n in range(5)]
        started = own_cpu_seconds()
        for _ in range(tasks):
            task = await registry.create([f"http://example.com/{n}.jpg" for n in range(IMAGES)], "m", 5)
            for first in range(0, IMAGES, BATCH):
                batch = range(first, min(first + BATCH, IMAGES))
                for index in batch:
                    await registry.update_item(task.task_id, index, ItemStatus.DOWNLOADING)
                    await registry.update_item(task.task_id, index, ItemStatus.CLASSIFYING)
                for index in batch:
                    await registry.update_item(task.task_id, index, ItemStatus.SUCCEEDED, labels=labels)
                await asyncio.sleep(0.003)
        if isinstance(registry, SqliteRegistry):
            await registry.journal.flush()
        spent = own_cpu_seconds() - started
        if isinstance(registry, SqliteRegistry):
            await registry.close()
    return spent / (tasks * IMAGES)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    costs: dict[str, list[float]] = {"memory": [], "sqlite": []}
    for _ in range(args.rounds):  # interleaved, so a slow spell hits both
        for store in costs:
            costs[store].append(asyncio.run(cost_per_image(store, args.tasks)))
    for store, values in costs.items():
        print(
            f"| {store} store CPU per image | {statistics.median(values) * 1000:.3f} ms "
            f"(rounds: {', '.join(f'{value * 1000:.3f}' for value in values)}) |"
        )
    extra = statistics.median(s - m for s, m in zip(costs["sqlite"], costs["memory"], strict=True))
    print(f"| SQLite journal, extra CPU per image | {extra * 1000:.3f} ms |")


if __name__ == "__main__":
    main()
