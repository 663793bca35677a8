"""The task engine on its own: the task service with a registry (memory, SQLite in a
temporary data dir, or a real Redis with its job streams) and a fake inference pool (no
worker processes), downloading from a real image server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from redis.exceptions import ResponseError

from inference.protocol import ModelLoadError
from inference.specs import EMBEDDED, ModelSpec
from service.app import download_session
from service.broker.local import BatchQueue
from service.broker.streams import StreamBatches, StreamJobs
from service.metrics import Metrics
from service.pool import InferenceTimeout, WorkerCrashed
from service.pool.catalog import ModelCatalog
from service.stores.memory.registry import InMemoryRegistry
from service.stores.redis.registry import RedisRegistry
from service.stores.sqlite.registry import SqliteRegistry
from service.tasks.classifier import PASSES_PER_BATCH, Classifier
from service.tasks.engine import TaskEngine
from service.tasks.queues import BatchSource, ImageQueue, QueuedImage
from service.tasks.records import ItemStatus, TaskDetail, TaskStatus
from service.tasks.registry import TaskRegistry
from service.tasks.uploads import UploadBudget, UploadSpool
from testing.redis_server import RedisServer
from tests.conftest import settings_for
from tests.fakes import FakePool, image, infos

OTHER = ModelSpec(name="other", source="torchvision", architecture="resnet18", weights="DEFAULT")


class Images:
    """An image server whose `/img/<label>` answers `image(label)`, after `delay` seconds;
    `aborted` counts requests whose client hung up during the delay."""

    def __init__(self) -> None:
        self.hits = 0
        self.aborted = 0
        self.delay = 0.0
        self.app = web.Application()
        self.app.router.add_get("/img/{label}", self._image)
        self.server: TestServer | None = None

    async def _image(self, request: web.Request) -> web.Response:
        self.hits += 1
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:  # the test server cancels the handler of a client that hung up
            self.aborted += 1
            raise
        if request.transport is None:  # a server that lets the handler run on
            self.aborted += 1
        return web.Response(body=image(request.match_info["label"]))

    def urls(self, *labels: str) -> list[str]:
        assert self.server is not None
        return [str(self.server.make_url(f"/img/{label}")) for label in labels]


@pytest.fixture
async def images(aiohttp_server: Callable[..., Any]) -> Images:
    served = Images()
    served.server = await aiohttp_server(served.app, host="127.0.0.1")
    return served


@dataclass
class Engine:
    service: TaskEngine
    registry: TaskRegistry
    metrics: Metrics
    budget: UploadBudget


@asynccontextmanager
async def engine(
    pool: FakePool, store: str = "memory", redis: RedisServer | None = None, **overrides: Any
) -> AsyncIterator[Engine]:
    """A task service (with consumers running) on `store`; `data_dir` in `overrides` reopens
    one; "redis" needs the server."""
    settings = settings_for(store="memory" if store == "redis" else store, **overrides)
    metrics, budget = Metrics(), UploadBudget(10_000)
    registry: TaskRegistry
    spool = None
    queue: ImageQueue
    source: BatchSource
    batches: StreamBatches | None = None
    catalog = ModelCatalog(infos([EMBEDDED, OTHER]), EMBEDDED.name)
    if store == "memory":
        registry = InMemoryRegistry(metrics=metrics)
    elif store == "sqlite":
        registry = await SqliteRegistry.open(settings.data_dir, 3600, 100, metrics)
        spool = UploadSpool(settings.data_dir / "uploads", budget)
    else:
        assert redis is not None
        registry = await RedisRegistry.open(redis.url, 3600, 100, prefix=f"t{uuid.uuid4().hex[:12]}:", metrics=metrics)
        queue = StreamJobs(registry.link, registry.prefix, settings.max_queued_images)
        batches = StreamBatches(
            registry.link,
            registry.prefix,
            registry,
            [EMBEDDED.name, OTHER.name],
            "tests",
            claim_idle=30,
            max_deliveries=3,
        )
        await batches.start()
        source = batches
    if batches is None:
        queue = source = BatchQueue(settings.max_queued_images)
    async with (
        download_session(settings) as session,
        TaskEngine(
            registry,
            queue,
            catalog,
            session,
            settings.fetch_limits(),
            metrics,
            budget,
            spool,
            download_concurrency=settings.download_concurrency,
            batch_size=settings.resolved_batch_size(),
            batch_wait=0.005,
            consumers=1,
            pool=pool,
            source=source,
        ) as service,
    ):
        yield Engine(service, registry, metrics, budget)
    if batches is not None:
        await batches.close()
    if isinstance(registry, SqliteRegistry | RedisRegistry):
        await registry.close()


def with_uploads(urls_before: list[str], upload: bytes, urls_after: list[str]) -> tuple[list[str], dict[int, bytes]]:
    """Item URLs and the uploaded files' bytes by index, for one upload between URLs."""
    return [*urls_before, "upload:a.jpg", *urls_after], {len(urls_before): upload}


async def final(registry: TaskRegistry, task_id: str, timeout: float = 10) -> TaskDetail:
    async with asyncio.timeout(timeout):
        await registry.wait_final(task_id)
    task = await registry.get(task_id)
    assert task is not None
    return task


def labels(task: TaskDetail) -> list[str | None]:
    return [item.labels[0].label if item.labels else (item.error.code if item.error else None) for item in task.items]


@pytest.mark.parametrize("store", ["memory", "sqlite", pytest.param("redis", marks=pytest.mark.e2e)])
async def test_urls_and_uploads_are_classified_in_submission_order(
    images: Images, store: str, request: pytest.FixtureRequest
) -> None:
    redis = request.getfixturevalue("redis_server") if store == "redis" else None
    async with engine(FakePool(), store, redis, batch_size=4) as running:
        urls, files = with_uploads(images.urls("cat"), image("espresso"), images.urls("dog", "rocket"))
        assert running.budget.reserve(len(image("espresso")))
        task = await running.service.create(urls, EMBEDDED.name, 2, None, files)
        done = await final(running.registry, task.task_id)
        assert running.budget.used == 0
        await running.registry.observe()  # as a scrape does (Redis counts outcomes where they are written)
        metrics = running.metrics
    assert done.status is TaskStatus.COMPLETED
    assert labels(done) == ["cat", "espresso", "dog", "rocket"]
    assert [len(item.labels or []) for item in done.items] == [2] * 4
    assert images.hits == 3  # the upload was not downloaded
    assert metrics.registry.get_sample_value("ics_images_total", {"outcome": "succeeded", "code": ""}) == 4


async def test_cancel_stops_downloads_drops_queued_images_and_refuses_late_results(images: Images) -> None:
    pool = FakePool()
    pool.hold.clear()  # the first batch stays in the "worker"
    async with engine(pool, download_concurrency=2, batch_size=1) as running:
        images.delay = 0.3
        task = await running.service.create(images.urls(*(f"img{n}" for n in range(20))), EMBEDDED.name, 1, None)
        async with asyncio.timeout(10):
            while not pool.batches:
                await asyncio.sleep(0.01)
        images.delay = 1.0  # the downloads in flight now are still running at the cancel
        await asyncio.sleep(0.4)
        cancelled = await running.service.cancel(task.task_id)
        assert cancelled is not None and cancelled.status is TaskStatus.CANCELLED
        hits = images.hits
        await asyncio.sleep(1.2)
        assert images.hits == hits < 20  # nothing new was fetched
        assert images.aborted == 2  # and both downloads in flight were cut off
        assert sum(backlog.images for backlog in await running.service.backlog()) == 0
        pool.hold.set()  # the batch in the worker comes back now: refused
        await asyncio.sleep(0.1)
        assert await running.registry.get(task.task_id) == cancelled


async def test_a_model_that_cannot_load_fails_its_task_and_stops_its_downloads(images: Images) -> None:
    pool = FakePool()
    pool.failures = [ModelLoadError("no weights")]
    async with engine(pool, download_concurrency=1, batch_size=1) as running:
        images.delay = 0.2
        doomed = await running.service.create(images.urls(*(f"img{n}" for n in range(10))), OTHER.name, 1, None)
        failed = await final(running.registry, doomed.task_id)
        await asyncio.sleep(0.5)
        fine_task = await running.service.create(images.urls("cat"), EMBEDDED.name, 1, None)
        fine = await final(running.registry, fine_task.task_id)
    assert failed.status is TaskStatus.FAILED and failed.error is not None
    assert failed.error.code == "model_load_failed"
    assert images.hits < 10
    assert labels(fine) == ["cat"]


@pytest.mark.parametrize(
    ("failures", "expected"),
    [
        ([WorkerCrashed()], ["cat", "dog"]),  # retried once, then fine
        ([WorkerCrashed(), WorkerCrashed()], ["worker_crashed"] * 2),
        ([InferenceTimeout("slow")], ["inference_timeout"] * 2),
        ([RuntimeError("bug")], ["inference_error"] * 2),
    ],
)
async def test_inference_failures_become_item_error_codes(
    images: Images, failures: list[Exception], expected: list[str]
) -> None:
    pool = FakePool()
    pool.failures = list(failures)
    async with engine(pool, batch_size=2) as running:
        first_task = await running.service.create(images.urls("cat", "dog"), EMBEDDED.name, 1, None)
        first = await final(running.registry, first_task.task_id)
        after_task = await running.service.create(images.urls("owl"), EMBEDDED.name, 1, None)
        after = await final(running.registry, after_task.task_id)
    assert first.status is TaskStatus.COMPLETED
    assert labels(first) == expected
    assert labels(after) == ["owl"]  # the consumer carried on
    failed = {code: 2.0 for code in expected if code not in ("cat", "dog")}
    assert {
        sample.labels["code"]: sample.value
        for family in running.metrics.registry.collect()
        for sample in family.samples
        if sample.name == "ics_inference_failures_total"
    } == failed


async def test_drain_waits_for_tasks_that_finish_in_time_and_cancels_the_rest(images: Images) -> None:
    async with engine(FakePool(), download_concurrency=1) as running:
        images.delay = 0.2
        quick = await running.service.create(images.urls("cat"), EMBEDDED.name, 1, None)
        urls, files = with_uploads(images.urls(*(f"img{n}" for n in range(30))), b"12345", [])
        assert running.budget.reserve(5)
        slow = await running.service.create(urls, EMBEDDED.name, 1, None, files)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await running.service.drain(grace=1.0)
        assert 0.9 < loop.time() - started < 5
        budget = running.budget
    assert (await running.registry.get(quick.task_id)).status is TaskStatus.COMPLETED  # type: ignore[union-attr]
    left = await running.registry.get(slow.task_id)
    assert left is not None and left.status is TaskStatus.CANCELLED
    assert ItemStatus.CANCELLED in {item.status for item in left.items}
    assert budget.used == 0  # the upload that never got queued was given back


async def test_a_durable_task_outlives_a_shutdown_and_resumes_with_its_upload(images: Images, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    async with engine(FakePool(), "sqlite", download_concurrency=1, data_dir=data_dir) as running:
        images.delay = 0.2
        urls, files = with_uploads(images.urls(*(f"img{n}" for n in range(8))), image("espresso"), images.urls("cat"))
        assert running.budget.reserve(len(image("espresso")))
        task = await running.service.create(urls, EMBEDDED.name, 1, None, files)
        async with asyncio.timeout(10):
            while (await running.registry.get(task.task_id)).progress.done < 2:  # type: ignore[union-attr]
                await asyncio.sleep(0.05)
        await running.service.drain(grace=0)
        kept = await running.registry.get(task.task_id)
    assert kept is not None and kept.status is TaskStatus.RUNNING  # not cancelled: kept for the next start
    assert (data_dir / "uploads" / task.task_id / "8").is_file()  # the upload waits on disk
    before = {item.index: item for item in kept.items if item.status.is_final}

    images.delay = 0
    async with engine(FakePool(), "sqlite", data_dir=data_dir) as running:
        done = await final(running.registry, task.task_id)
    assert done.status is TaskStatus.COMPLETED
    assert labels(done) == [f"img{n}" for n in range(8)] + ["espresso", "cat"]
    assert all(done.items[index] == item for index, item in before.items())  # results from before, unchanged
    assert not (data_dir / "uploads" / task.task_id).exists()  # spooled files go once their items are final


async def test_remove_forgets_the_task_and_stops_it(images: Images) -> None:
    pool = FakePool()
    async with engine(pool, download_concurrency=1) as running:
        images.delay = 0.3
        task = await running.service.create(images.urls(*(f"img{n}" for n in range(10))), EMBEDDED.name, 1, None)
        await asyncio.sleep(0.1)
        removed = await running.service.remove(task.task_id)
        assert removed is not None and removed.status is TaskStatus.CANCELLED
        assert await running.registry.get(task.task_id) is None
        hits = images.hits
        await asyncio.sleep(0.8)
        assert images.hits == hits
        assert await running.registry.unfinished_images() == 0


async def test_a_resumed_upload_whose_file_is_gone_fails_upload_lost(images: Images, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    async with engine(FakePool(), "sqlite", download_concurrency=1, data_dir=data_dir) as running:
        images.delay = 0.3
        urls, files = with_uploads(images.urls(*(f"img{n}" for n in range(4))), image("espresso"), [])
        assert running.budget.reserve(len(image("espresso")))
        task = await running.service.create(urls, EMBEDDED.name, 1, None, files)
        await running.service.drain(grace=0)
    (data_dir / "uploads" / task.task_id / "4").unlink()  # lost while the service was down

    images.delay = 0
    async with engine(FakePool(), "sqlite", data_dir=data_dir) as running:
        done = await final(running.registry, task.task_id)
    assert done.status is TaskStatus.COMPLETED
    assert labels(done) == ["img0", "img1", "img2", "img3", "upload_lost"]


async def test_with_redis_workers_skip_the_queued_images_of_a_cancelled_task(
    images: Images, redis_server: RedisServer
) -> None:
    """Queued images stay in the stream after a cancel (any worker may hold the next ones);
    the worker that takes them confirms and deletes them without classifying them."""
    pool = FakePool()
    pool.hold.clear()  # the first batch stays in the "worker"
    async with engine(pool, "redis", redis_server, download_concurrency=4, batch_size=1) as running:
        registry = running.registry
        assert isinstance(registry, RedisRegistry)
        stream = f"{registry.prefix}jobs:{EMBEDDED.name}"
        task = await running.service.create(images.urls(*(f"img{n}" for n in range(8))), EMBEDDED.name, 1, None)
        async with asyncio.timeout(10):
            while not pool.batches or await registry.client.xlen(stream) < 8:
                await asyncio.sleep(0.01)
        cancelled = await running.service.cancel(task.task_id)
        assert cancelled is not None and cancelled.status is TaskStatus.CANCELLED
        pool.hold.set()  # the batch in the worker comes back now: refused
        async with asyncio.timeout(10):
            while await registry.client.xlen(stream):  # the other 7 are skipped, and deleted
                await asyncio.sleep(0.01)
        assert len(pool.batches) == 1
        assert await registry.get(task.task_id) == cancelled


class RefusingQueue(BatchQueue):
    """A batch source that fails its first `refusals` calls, as a Redis that refuses a write
    (out of disk for its snapshots, say) fails the worker's."""

    refusals = 1

    async def next_batch(self, max_size: int, max_wait: float) -> list[QueuedImage]:
        if self.refusals:
            self.refusals -= 1
            raise ResponseError("MISCONF Redis is unable to persist to disk")
        return await super().next_batch(max_size, max_wait)


async def test_a_consumer_whose_source_fails_goes_on_with_the_next_batch() -> None:
    registry = InMemoryRegistry(metrics=Metrics())
    queue = RefusingQueue(16)
    catalog = ModelCatalog(infos([EMBEDDED]), EMBEDDED.name)
    classifier = Classifier(registry, FakePool(), catalog, queue, Metrics(), batch_size=16, batch_wait=0.0)
    consuming = asyncio.create_task(classifier.consume())
    task = await registry.create(["u0"], EMBEDDED.name, 1)
    await registry.update_item(task.task_id, 0, ItemStatus.CLASSIFYING)
    await queue.put(QueuedImage(task.task_id, 0, EMBEDDED.name, 1, image("cat")))
    await asyncio.wait_for(registry.wait_final(task.task_id), 5)
    done = await registry.get(task.task_id)
    assert done is not None and labels(done) == ["cat"] and queue.refusals == 0
    consuming.cancel()
    await asyncio.gather(consuming, return_exceptions=True)


async def test_a_consumer_hands_a_worker_two_forward_passes_at_once() -> None:
    """20 images waiting, passes of 4: batches of 8, 8 and the 4 left (the web process's
    cost per batch spread over more images; the worker runs the passes)."""
    registry = InMemoryRegistry(metrics=Metrics())
    queue, pool = BatchQueue(32), FakePool()
    catalog = ModelCatalog(infos([EMBEDDED]), EMBEDDED.name)
    classifier = Classifier(registry, pool, catalog, queue, Metrics(), batch_size=4, batch_wait=0.0)
    task = await registry.create([f"u{n}" for n in range(20)], EMBEDDED.name, 1)
    for index in range(20):
        await registry.update_item(task.task_id, index, ItemStatus.CLASSIFYING)
        await queue.put(QueuedImage(task.task_id, index, EMBEDDED.name, 1, image("cat")))
    consuming = asyncio.create_task(classifier.consume())
    await asyncio.wait_for(registry.wait_final(task.task_id), 5)
    assert [len(batch) for batch in pool.batches] == [4 * PASSES_PER_BATCH] * 2 + [4] == [8, 8, 4]
    consuming.cancel()
    await asyncio.gather(consuming, return_exceptions=True)
