"""Runs tasks: downloads their images, batches them through the inference pool, and writes
every outcome back to the registry.

Per task, one pipeline coroutine starts downloads in submission order, each holding one of
the global download slots until its image is downloaded *and* queued, so neither open
connections nor buffered images grow without bound. A fixed set of consumers, one per
worker process, pulls batches from the shared queue so no worker idles while work waits.
Cancelling a task stops its pipeline (no new downloads, in-flight ones aborted), drops its
queued images, and lets the registry refuse results of a batch already in a worker.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures.process import BrokenProcessPool

import aiohttp

from inference.protocol import ModelLoadError, Prediction
from service.batching import BatchQueue, Job
from service.catalog import ModelCatalog
from service.fetcher import FetchError, FetchLimits, fetch
from service.metrics import Metrics
from service.pool import InferencePool, InferenceTimeout
from service.registry import TaskRegistry
from service.schemas import ErrorInfo, ItemStatus, Label, TaskDetail
from service.settings import Settings
from service.uploads import TaskUploads

log = logging.getLogger(__name__)


class Dispatcher:
    def __init__(
        self,
        registry: TaskRegistry,
        pool: InferencePool,
        session: aiohttp.ClientSession,
        settings: Settings,
        consumers: int,
        metrics: Metrics,
        catalog: ModelCatalog,
    ) -> None:
        self._registry = registry
        self._catalog = catalog
        self._metrics = metrics
        self._pool = pool
        self._session = session
        self._limits = FetchLimits.from_settings(settings)
        self._batch_size = settings.batch_size
        self._batch_wait = settings.batch_wait_ms / 1000
        self._queue = BatchQueue(settings.max_queued_images)
        self._download_slots = asyncio.Semaphore(settings.download_concurrency)
        self._pipelines: dict[str, asyncio.Task[None]] = {}
        self._consumers = [asyncio.create_task(self._consume()) for _ in range(consumers)]

    def queue_depth(self) -> int:
        return len(self._queue)

    def submit(self, task: TaskDetail, uploads: TaskUploads | None = None) -> None:
        """Start working on a task the registry has just created; `uploads` holds the bytes
        of the items that were uploaded rather than given as URLs (released when the task ends)."""
        pipeline = asyncio.create_task(self._run(task, uploads))
        self._pipelines[task.task_id] = pipeline
        pipeline.add_done_callback(lambda _: self._pipelines.pop(task.task_id, None))
        if uploads is not None:  # a callback, not `finally`: a task cancelled before it starts skips that
            pipeline.add_done_callback(lambda _: uploads.release())

    async def cancel(self, task_id: str, owner: str | None = None) -> TaskDetail | None:
        """Cancel a task and stop its work; the final snapshot, or None if unknown."""
        snapshot = await self._registry.cancel(task_id, owner)
        if snapshot is not None:
            await self._stop(task_id)
        return snapshot

    async def remove(self, task_id: str, owner: str | None = None) -> TaskDetail | None:
        """Cancel (the registry's remove does it) and forget a task; None if unknown."""
        snapshot = await self._registry.remove(task_id, owner)
        if snapshot is not None:
            await self._stop(task_id)
        return snapshot

    async def close(self) -> None:
        """Cancel whatever is still active and stop all work."""
        cancelled = await self._registry.cancel_active()
        if cancelled:
            log.info("cancelled %d active tasks at shutdown", cancelled)
        tasks = [*self._consumers, *self._pipelines.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _stop(self, task_id: str) -> None:
        pipeline = self._pipelines.get(task_id)
        if pipeline is not None:
            pipeline.cancel()
        await self._queue.drop_task(task_id)

    async def _run(self, task: TaskDetail, uploads: TaskUploads | None) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                for item in task.items:
                    if uploads is not None and item.index in uploads:
                        await self._enqueue(task, item.index, uploads.take(item.index))
                        continue
                    await self._download_slots.acquire()
                    download = group.create_task(self._download(task, item.index, item.url))
                    # Released when the download ends in any way, even cancelled before it ran.
                    download.add_done_callback(lambda _: self._download_slots.release())
        except Exception:
            log.exception("task %s: pipeline failed", task.task_id)
            await self._registry.fail(task.task_id, ErrorInfo(code="internal_error", message="internal error"))

    async def _download(self, task: TaskDetail, index: int, url: str) -> None:
        if not await self._registry.update_item(task.task_id, index, ItemStatus.DOWNLOADING):
            return
        try:
            with self._metrics.download_seconds.time():
                data = await fetch(self._session, url, self._limits)
        except FetchError as exc:
            error = ErrorInfo(code=exc.code, message=exc.message, http_status=exc.http_status)
            await self._fail_item(task.task_id, index, error)
            return
        await self._enqueue(task, index, data)

    async def _enqueue(self, task: TaskDetail, index: int, data: bytes) -> None:
        if await self._registry.update_item(task.task_id, index, ItemStatus.CLASSIFYING):
            await self._queue.put(Job(task.task_id, index, task.model, task.top_k, data))

    async def _consume(self) -> None:
        while True:
            batch = await self._queue.next_batch(self._batch_size, self._batch_wait)
            try:
                await self._classify(batch)
            except Exception:  # a bug must not kill the consumer and stall every task
                log.exception("handling a batch of %d images failed", len(batch))
                await self._fail_jobs(batch, ErrorInfo(code="internal_error", message="internal error"))

    async def _classify(self, batch: list[Job], retried: bool = False) -> None:
        model = batch[0].model
        self._metrics.batch_size.observe(len(batch))
        try:
            with self._metrics.inference_seconds.time():
                outcomes = await self._pool.classify(
                    self._catalog.spec(model), [job.data for job in batch], [job.top_k for job in batch]
                )
        except ModelLoadError as exc:
            log.error("model %s failed to load: %s", model, exc)
            error = ErrorInfo(code="model_load_failed", message=str(exc))
            for task_id in {job.task_id for job in batch}:
                await self._registry.fail(task_id, error)
                await self._stop(task_id)
            return
        except BrokenProcessPool:
            if not retried:
                log.warning("an inference worker died during a batch of %d images; retrying it once", len(batch))
                await self._classify(batch, retried=True)
                return
            log.error("an inference worker died again on a batch of %d images; failing them", len(batch))
            await self._fail_jobs(batch, ErrorInfo(code="worker_crashed", message="the inference worker crashed"))
            return
        except InferenceTimeout as exc:
            log.error("inference timed out for a batch of %d images", len(batch))
            await self._fail_jobs(batch, ErrorInfo(code="inference_timeout", message=str(exc)))
            return
        except Exception:
            log.exception("inference failed for a batch of %d images", len(batch))
            await self._fail_jobs(batch, ErrorInfo(code="inference_error", message="inference failed"))
            return
        for job, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, Prediction):
                labels = [Label(label=top.label, class_index=top.class_index, score=top.score) for top in outcome.labels]
                if await self._registry.update_item(job.task_id, job.index, ItemStatus.SUCCEEDED, labels=labels):
                    self._metrics.image_done(None)
            else:
                await self._fail_item(job.task_id, job.index, ErrorInfo(code=outcome.code, message=outcome.message))

    async def _fail_jobs(self, jobs: list[Job], error: ErrorInfo) -> None:
        for job in jobs:
            await self._fail_item(job.task_id, job.index, error)

    async def _fail_item(self, task_id: str, index: int, error: ErrorInfo) -> None:
        if await self._registry.update_item(task_id, index, ItemStatus.FAILED, error=error):
            self._metrics.image_done(error.code)
