"""The task engine on its own: the task service with the in-memory registry and a fake
inference pool (no worker processes), downloading from a real image server on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from inference.protocol import ModelLoadError
from inference.specs import EMBEDDED, ModelSpec
from service.fetch.fetcher import FetchLimits, make_session
from service.metrics import Metrics
from service.pool import InferenceTimeout, WorkerCrashed
from service.pool.catalog import ModelCatalog
from service.tasks.memory import InMemoryRegistry
from service.tasks.records import ItemStatus, TaskDetail, TaskStatus
from service.tasks.service import TaskService
from service.tasks.uploads import TaskUploads, Upload, UploadBudget
from tests.conftest import settings_for
from tests.fakes import FakePool, image

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


@asynccontextmanager
async def engine(pool: FakePool, **overrides: Any) -> AsyncIterator[tuple[TaskService, InMemoryRegistry, Metrics]]:
    settings = settings_for(**overrides)
    registry, metrics = InMemoryRegistry(), Metrics()
    catalog = ModelCatalog(await pool.model_infos([EMBEDDED, OTHER]), EMBEDDED.name)
    async with (
        make_session(settings) as session,
        TaskService(
            registry,
            pool,
            catalog,
            session,
            FetchLimits.from_settings(settings),
            metrics,
            consumers=1,
            download_concurrency=settings.download_concurrency,
            max_queued_images=settings.max_queued_images,
            batch_size=settings.batch_size,
            batch_wait=0.005,
        ) as service,
    ):
        yield service, registry, metrics


async def final(registry: InMemoryRegistry, task_id: str) -> TaskDetail:
    async with asyncio.timeout(10):
        await registry.wait_final(task_id)
    task = await registry.get(task_id)
    assert task is not None
    return task


def labels(task: TaskDetail) -> list[str | None]:
    return [item.labels[0].label if item.labels else (item.error.code if item.error else None) for item in task.items]


async def test_urls_and_uploads_are_classified_in_submission_order(images: Images) -> None:
    pool, budget = FakePool(), UploadBudget(1000)
    async with engine(pool, batch_size=4) as (service, registry, metrics):
        sources: list[str | Upload] = [images.urls("cat")[0], Upload("a.jpg", image("espresso")), images.urls("dog")[0]]
        assert budget.reserve(len(image("espresso")))
        uploads = TaskUploads(sources, budget)
        urls = [source.url if isinstance(source, Upload) else source for source in sources]
        task = await service.create([*urls, *images.urls("rocket")], EMBEDDED.name, 2, None, uploads)
        done = await final(registry, task.task_id)
    assert done.status is TaskStatus.COMPLETED
    assert labels(done) == ["cat", "espresso", "dog", "rocket"]
    assert [len(item.labels or []) for item in done.items] == [2] * 4
    assert images.hits == 3  # the upload was not downloaded
    assert budget.used == 0
    assert metrics.images.labels(outcome="succeeded", code="")._value.get() == 4


async def test_cancel_stops_downloads_drops_queued_images_and_refuses_late_results(images: Images) -> None:
    pool = FakePool()
    pool.hold.clear()  # the first batch stays in the "worker"
    async with engine(pool, download_concurrency=2, batch_size=1) as (service, registry, _):
        images.delay = 0.3
        task = await service.create(images.urls(*(f"img{n}" for n in range(20))), EMBEDDED.name, 1, None)
        async with asyncio.timeout(10):
            while not pool.batches:
                await asyncio.sleep(0.01)
        images.delay = 1.0  # the downloads in flight now are still running at the cancel
        await asyncio.sleep(0.4)
        cancelled = await service.cancel(task.task_id)
        assert cancelled is not None and cancelled.status is TaskStatus.CANCELLED
        hits = images.hits
        await asyncio.sleep(1.2)
        assert images.hits == hits < 20  # nothing new was fetched
        assert images.aborted == 2  # and both downloads in flight were cut off
        assert service.queue_depth() == 0
        pool.hold.set()  # the batch in the worker comes back now: refused
        await asyncio.sleep(0.1)
        assert await registry.get(task.task_id) == cancelled


async def test_a_model_that_cannot_load_fails_its_task_and_stops_its_downloads(images: Images) -> None:
    pool = FakePool()
    pool.failures = [ModelLoadError("no weights")]
    async with engine(pool, download_concurrency=1, batch_size=1) as (service, registry, _):
        images.delay = 0.2
        doomed = await service.create(images.urls(*(f"img{n}" for n in range(10))), OTHER.name, 1, None)
        failed = await final(registry, doomed.task_id)
        await asyncio.sleep(0.5)
        fine = await final(registry, (await service.create(images.urls("cat"), EMBEDDED.name, 1, None)).task_id)
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
    async with engine(pool, batch_size=2) as (service, registry, _):
        first = await final(registry, (await service.create(images.urls("cat", "dog"), EMBEDDED.name, 1, None)).task_id)
        after = await final(registry, (await service.create(images.urls("owl"), EMBEDDED.name, 1, None)).task_id)
    assert first.status is TaskStatus.COMPLETED
    assert labels(first) == expected
    assert labels(after) == ["owl"]  # the consumer carried on


async def test_drain_waits_for_tasks_that_finish_in_time_and_cancels_the_rest(images: Images) -> None:
    pool = FakePool()
    budget = UploadBudget(1000)
    async with engine(pool, download_concurrency=1) as (service, registry, _):
        images.delay = 0.2
        quick = await service.create(images.urls("cat"), EMBEDDED.name, 1, None)
        assert budget.reserve(5)
        sources: list[str | Upload] = [*images.urls(*(f"img{n}" for n in range(30))), Upload("x.jpg", b"12345")]
        slow_uploads = TaskUploads(sources, budget)
        urls = [source.url if isinstance(source, Upload) else source for source in sources]
        slow = await service.create(urls, EMBEDDED.name, 1, None, slow_uploads)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await service.drain(grace=1.0)
        assert 0.9 < loop.time() - started < 5
    assert (await registry.get(quick.task_id)).status is TaskStatus.COMPLETED  # type: ignore[union-attr]
    left = await registry.get(slow.task_id)
    assert left is not None and left.status is TaskStatus.CANCELLED
    assert ItemStatus.CANCELLED in {item.status for item in left.items}
    assert budget.used == 0  # the upload that never got queued was given back


async def test_remove_forgets_the_task_and_stops_it(images: Images) -> None:
    pool = FakePool()
    async with engine(pool, download_concurrency=1) as (service, registry, _):
        images.delay = 0.3
        task = await service.create(images.urls(*(f"img{n}" for n in range(10))), EMBEDDED.name, 1, None)
        await asyncio.sleep(0.1)
        removed = await service.remove(task.task_id)
        assert removed is not None and removed.status is TaskStatus.CANCELLED
        assert await registry.get(task.task_id) is None
        hits = images.hits
        await asyncio.sleep(0.8)
        assert images.hits == hits
        assert await registry.unfinished_images() == 0
