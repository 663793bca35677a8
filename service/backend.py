"""The one place that chooses and opens a backend: the task store, the image queue and the
rest that differ from one store to another.

`open_backend(settings, metrics, budget)` yields a `Backend`; the web app (`service.app`) and the
standalone worker (`service.worker`) use what it holds and never ask which store it is. A new
store is a folder under `service/stores/`, an opener here, and one line in `OPENERS`.
Whatever cannot be opened raises `service.tasks.registry.StoreOpenError` (one line to print).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass

from service.broker.fleet import RedisFleet
from service.broker.local import BatchQueue
from service.broker.streams import StreamBatches, StreamJobs, consumer_name
from service.metrics import Metrics
from service.settings import Settings, StoreKind
from service.stores.memory.registry import InMemoryRegistry
from service.stores.redis.registry import RedisRegistry
from service.stores.sqlite.registry import SqliteRegistry
from service.tasks.queues import BatchSource, ImageQueue
from service.tasks.registry import TaskRegistry
from service.tasks.uploads import UploadBudget, UploadSpool

# Where this process's own workers take batches from, for the models they serve.
BatchSourceOpener = Callable[[list[str]], AbstractAsyncContextManager[BatchSource]]


@dataclass(frozen=True)
class Backend:
    registry: TaskRegistry
    queue: ImageQueue  # where a task's pipeline puts its downloaded images
    batches: BatchSourceOpener
    spool: UploadSpool | None = None  # where uploads wait on disk for their task (a durable store)
    adopt_every: float | None = None  # seconds between looks for tasks a gone replica left
    fleet: RedisFleet | None = None  # the workers' heartbeats: where they beat, what lists them


Opener = Callable[[Settings, Metrics, UploadBudget, bool], AbstractAsyncContextManager[Backend]]


@asynccontextmanager
async def open_memory(settings: Settings, metrics: Metrics, budget: UploadBudget, web: bool) -> AsyncIterator[Backend]:
    """Tasks in this process only, and the in-process queue."""
    registry = InMemoryRegistry(
        settings.finished_task_ttl,
        settings.max_finished_tasks,
        metrics=metrics,
        idempotency_ttl=settings.idempotency_ttl,
    )
    yield _in_process(registry, settings)


@asynccontextmanager
async def open_sqlite(settings: Settings, metrics: Metrics, budget: UploadBudget, web: bool) -> AsyncIterator[Backend]:
    """Tasks journaled to SQLite in the data dir, uploads spooled beside them, and the
    in-process queue. A data dir that cannot be used stops start-up here, before any worker."""
    registry = await SqliteRegistry.open(
        settings.data_dir,
        settings.finished_task_ttl,
        settings.max_finished_tasks,
        metrics,
        idempotency_ttl=settings.idempotency_ttl,
    )
    try:
        yield _in_process(registry, settings, UploadSpool(settings.data_dir / "uploads", budget))
    finally:
        await registry.close()


@asynccontextmanager
async def open_redis(settings: Settings, metrics: Metrics, budget: UploadBudget, web: bool) -> AsyncIterator[Backend]:
    """Tasks shared through Redis and the job streams (a Redis that cannot be reached stops
    start-up here). A worker (`web` false) only writes outcomes: it neither watches tasks nor
    keeps its lease alive (it owns no tasks)."""
    registry = await RedisRegistry.open(
        settings.redis,
        settings.finished_task_ttl,
        settings.max_finished_tasks,
        prefix=settings.redis_prefix,
        lease=settings.lease,
        idempotency_ttl=settings.idempotency_ttl,
        metrics=metrics,
        watch=web,
    )

    fleet = RedisFleet(registry.link, registry.prefix)

    @asynccontextmanager
    async def batches(models: list[str]) -> AsyncIterator[BatchSource]:
        source = StreamBatches(
            registry.link,
            registry.prefix,
            registry,
            models,
            consumer_name(),
            settings.claim_idle,
            settings.max_deliveries,
            fleet,
            metrics,
        )
        await source.start()
        try:
            yield source
        finally:
            await source.close()

    jobs = StreamJobs(registry.link, registry.prefix, settings.max_queued_images)
    try:
        yield Backend(registry, jobs, batches, adopt_every=registry.adopt_every, fleet=fleet)
    finally:
        await jobs.close()
        await registry.close()


OPENERS: dict[StoreKind, Opener] = {
    "memory": open_memory,
    "sqlite": open_sqlite,
    "redis": open_redis,
}


def open_backend(
    settings: Settings, metrics: Metrics, budget: UploadBudget, *, web: bool = True
) -> AbstractAsyncContextManager[Backend]:
    """The backend the settings ask for (`--store`, `--redis`), open until the block ends;
    `web` false for a standalone worker, which takes batches and writes outcomes only."""
    return OPENERS[settings.store_kind()](settings, metrics, budget, web)


def _in_process(registry: TaskRegistry, settings: Settings, spool: UploadSpool | None = None) -> Backend:
    queue = BatchQueue(settings.max_queued_images)
    return Backend(registry, queue, lambda models: contextlib.nullcontext(queue), spool)
