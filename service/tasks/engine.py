"""The task engine: every change of a task's state goes through here (create, start, cancel,
remove, shutdown), and it owns the lifetimes of the work behind each task.

Each task runs as one job of an aiojobs scheduler, from creation until the task reaches a
final state: the job feeds the task's images into the batch queue (`Pipeline`) and watches
the registry; whatever makes the task final (its last result, a cancel, a delete, a model
that cannot load) stops its downloads and drops its queued images, in one place. A fixed
set of consumers (`Classifier`) classifies the batches: from the in-process queue, or, with
Redis, from the stream that every web replica puts into (a web-only replica has none).
Shutdown gives running tasks a grace period (`drain`), then stops their jobs; the registry
decides what becomes of them (a durable one keeps them, and the next start resumes them
here; a shared one lets another replica adopt them, which it also looks for every few
seconds while it runs).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from types import TracebackType

import aiohttp
import aiojobs

from service.fetch.fetcher import FetchLimits
from service.lifetimes import stop_tasks
from service.metrics import Metrics
from service.pool import InferencePool
from service.pool.catalog import ModelCatalog
from service.tasks.classifier import INTERNAL_ERROR, Classifier
from service.tasks.fleet import WorkerEntry, WorkerIdentity
from service.tasks.idempotency import IdempotencyKey
from service.tasks.pipeline import Pipeline
from service.tasks.queues import Backlog, BatchSource, ImageQueue
from service.tasks.records import Priority, TaskDetail
from service.tasks.registry import Admission, StoreUnavailable, TaskRegistry
from service.tasks.uploads import UPLOAD_PREFIX, HeldUploads, TaskUploads, UploadBudget, UploadSpool

log = logging.getLogger(__name__)

STOP_TIMEOUT = 10.0  # seconds a task's job may take to stop once cancelled


class TaskEngine:
    def __init__(
        self,
        registry: TaskRegistry,
        queue: ImageQueue,
        catalog: ModelCatalog,
        session: aiohttp.ClientSession,
        limits: FetchLimits,
        metrics: Metrics,
        budget: UploadBudget,
        spool: UploadSpool | None = None,
        *,
        download_concurrency: int,
        batch_size: int,
        batch_wait: float,
        consumers: int = 0,
        pool: InferencePool | None = None,
        source: BatchSource | None = None,
        adopt_every: float | None = None,
        identity: WorkerIdentity | None = None,
    ) -> None:
        """`consumers` classify batches from `source` with `pool` (`identity`: what that pool
        is, for the fleet view); `adopt_every`: seconds between looks for tasks a shared
        registry has for this replica to take over."""
        self._registry = registry
        self._budget = budget
        self._spool = spool  # None: uploads are held in memory
        self._queue = queue
        self._pipeline = Pipeline(registry, session, limits, download_concurrency, queue, metrics)
        self._catalog = catalog
        self._classifier = (
            Classifier(registry, pool, catalog, source, metrics, batch_size, batch_wait)
            if pool is not None and source is not None
            else None
        )
        self._consumer_count = consumers if self._classifier is not None else 0
        self._identity = identity
        self._consumers: list[asyncio.Task[None]] = []
        self._adopt_every = adopt_every
        self._jobs = aiojobs.Scheduler(limit=None, close_timeout=STOP_TIMEOUT, wait_timeout=None)

    async def __aenter__(self) -> TaskEngine:
        if self._classifier is not None:
            self._consumers = [asyncio.create_task(self._classifier.consume()) for _ in range(self._consumer_count)]
        await self._resume()
        if self._adopt_every is not None:
            self._consumers.append(asyncio.create_task(self._adopt()))
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self.close()

    def own_worker(self) -> WorkerEntry | None:
        """This process's own inference pool as the fleet view lists it (None: it has none)."""
        if self._classifier is None or self._identity is None:
            return None
        return self._identity.entry(self._classifier.stats)

    async def backlog(self) -> list[Backlog]:
        """Images waiting for the model, by model and priority (with Redis, fleet-wide)."""
        return await self._queue.backlog([info.name for info in self._catalog.infos()])

    async def create(
        self,
        urls: list[str],
        model: str,
        top_k: int,
        owner: str | None,
        files: dict[int, bytes] | None = None,
        *,
        callback_url: str | None = None,
        idempotency: IdempotencyKey | None = None,
        priority: Priority = Priority.INTERACTIVE,
        admission: Admission | None = None,
    ) -> TaskDetail:
        """Store a new task and start working on it. `files` are the bytes of the items that
        were uploaded rather than given as URLs, by item index; their bytes are reserved in
        the upload budget, and the task owns that reservation from now on, whatever happens.
        `callback_url` gets the completion webhook; `idempotency` will stand for the task;
        `admission`: the limits it must fit in (else the registry raises `NoRoom`)."""
        task_id = uuid.uuid4().hex
        uploads: TaskUploads | None = None
        if files:
            uploads = HeldUploads(files, self._budget) if self._spool is None else await self._save(task_id, files)
        try:
            precision = self._catalog.info(model).precision
            task = await self._registry.create(
                urls,
                model,
                top_k,
                owner,
                task_id,
                precision,
                callback_url=callback_url,
                idempotency=idempotency,
                priority=priority,
                admission=admission,
            )
        except BaseException:
            if uploads is not None:
                uploads.release()
            raise
        await self._jobs.spawn(self._run(task, owner, uploads), name=task.task_id)
        return task

    async def _save(self, task_id: str, files: dict[int, bytes]) -> TaskUploads:
        assert self._spool is not None
        try:
            return await self._spool.save(task_id, files)
        except BaseException:
            self._budget.release(sum(len(data) for data in files.values()))
            raise

    async def _resume(self) -> None:
        """Start again the tasks a durable registry kept (none for the in-memory one)."""
        active = await self._registry.active()
        if self._spool is not None:
            self._spool.sweep({task.task_id for task, _ in active})
        for task, owner in active:
            uploads = None
            if self._spool is not None:
                waiting = [
                    item.index for item in task.items if item.url.startswith(UPLOAD_PREFIX) and not item.status.is_final
                ]
                uploads = self._spool.resume(task.task_id, waiting)
            await self._jobs.spawn(self._run(task, owner, uploads), name=task.task_id)
        if active:
            log.info("resumed %d tasks", len(active))

    async def _adopt(self) -> None:
        """With a shared registry: take over, every few seconds, the tasks of replicas gone."""
        assert self._adopt_every is not None
        while True:
            await asyncio.sleep(self._adopt_every)
            try:
                await self._resume()
            except Exception:  # a bug here must not stop the next look
                log.exception("looking for tasks to adopt failed")

    async def cancel(self, task_id: str, owner: str | None = None) -> TaskDetail | None:
        """Cancel a task (its job stops its work); the final snapshot, or None if unknown."""
        return await self._registry.cancel(task_id, owner)

    async def remove(self, task_id: str, owner: str | None = None) -> TaskDetail | None:
        """Cancel and forget a task; its last snapshot, or None if unknown."""
        return await self._registry.remove(task_id, owner)

    async def drain(self, grace: float) -> None:
        """At shutdown: give active tasks `grace` seconds to finish, then stop every job."""
        try:
            unfinished = await self._registry.unfinished_images()
        except StoreUnavailable:  # the count is for the log only: the grace holds all the same
            log.info("shutting down: waiting up to %gs for the unfinished images", grace)
        else:
            if unfinished:
                log.info("shutting down: waiting up to %gs for %d unfinished images", grace, unfinished)
        await self._jobs.wait_and_close(grace)

    async def close(self) -> None:
        """Stop all work; the registry decides what becomes of tasks still active."""
        await self._jobs.close()
        await self._registry.shutdown()
        await stop_tasks(self._consumers)

    async def _run(self, task: TaskDetail, owner: str | None, uploads: TaskUploads | None) -> None:
        """The task's job: feed its images until it is final; then stop feeding."""
        final = False
        try:
            async with asyncio.TaskGroup() as group:
                feeding = group.create_task(self._pipeline.run(task, uploads))
                if uploads is None:
                    await self._registry.wait_final(task.task_id)
                else:
                    await self._discard_final_uploads(task.task_id, owner, uploads)
                final = True
                feeding.cancel()
        except Exception:
            log.exception("task %s: pipeline failed", task.task_id)
            await self._registry.fail(task.task_id, INTERNAL_ERROR)
        except asyncio.CancelledError:  # the service stops: a durable task resumes at the next start
            if uploads is not None:
                # One that ended just before (its feeding being stopped) keeps nothing.
                uploads.release() if final else uploads.close()
            raise
        finally:
            await self._queue.drop_task(task.task_id)
        if uploads is not None:
            uploads.release()

    async def _discard_final_uploads(self, task_id: str, owner: str | None, uploads: TaskUploads) -> None:
        """Until the task is final: let go of each upload once its item is final."""
        seen = 0
        while (update := await self._registry.follow(task_id, seen, owner)) is not None:
            uploads.discard(item.index for item in update.items)
            seen += len(update.items)
            if update.summary.status.is_final:
                return
