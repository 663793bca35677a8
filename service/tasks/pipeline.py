"""A task's pipeline: its images, in submission order, from their sources into the batch queue.

Each download holds one of the global download slots until its image is downloaded *and*
queued, so neither open connections nor buffered images grow without bound; uploaded
images skip the download. The slots go to tasks fairly (`FairGate`): interactive tasks
first, then one slot per task in turn, and batch tasks leave a few for interactive ones.
Every step first moves the item on in the registry, which refuses once the task is final,
so a cancelled task starts nothing new.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp

from service.fetch.fetcher import FetchError, FetchLimits, fetch
from service.metrics import Metrics
from service.tasks.fairness import FairGate, interactive_reserve
from service.tasks.queues import ImageQueue, QueuedImage
from service.tasks.records import ErrorInfo, ItemStatus, TaskDetail
from service.tasks.registry import TaskRegistry
from service.tasks.uploads import UPLOAD_PREFIX, TaskUploads

# An uploaded file that is gone: its task was resumed after a restart and the spooled file was
# missing from the data dir.
UPLOAD_LOST = ErrorInfo(code="upload_lost", message="the uploaded file was lost before it could be classified")


class Pipeline:
    """Shared by every task: the download session, its limits and slots, and the queue."""

    def __init__(
        self,
        registry: TaskRegistry,
        session: aiohttp.ClientSession,
        limits: FetchLimits,
        download_concurrency: int,
        queue: ImageQueue,
        metrics: Metrics,
    ) -> None:
        self._registry = registry
        self._session = session
        self._limits = limits
        self._slots = FairGate(download_concurrency, reserved=interactive_reserve(download_concurrency))
        self._queue = queue
        self._metrics = metrics

    async def run(self, task: TaskDetail, uploads: TaskUploads | None) -> None:
        async with asyncio.TaskGroup() as group:
            for item in task.items:
                if item.status.is_final:
                    continue  # a resumed task: this one was done before the restart
                if item.url.startswith(UPLOAD_PREFIX):
                    if uploads is not None and item.index in uploads:
                        await self._enqueue(task, item.index, await uploads.take(item.index))
                    else:
                        await self._fail(task.task_id, item.index, UPLOAD_LOST)
                    continue
                await self._slots.acquire(task.priority, task.task_id)
                download = group.create_task(self._download(task, item.index, item.url))
                # Released when the download ends in any way, even cancelled before it ran.
                download.add_done_callback(lambda _: self._slots.release())
                # Slots freed together (a batch taken makes room for 16 images) are taken
                # one per task in turn, not all by the task whose loop runs first.
                await asyncio.sleep(0)

    async def _download(self, task: TaskDetail, index: int, url: str) -> None:
        if not await self._registry.update_item(task.task_id, index, ItemStatus.DOWNLOADING):
            return
        try:
            with self._metrics.download_seconds.time():
                data = await fetch(self._session, url, self._limits)
        except FetchError as exc:
            await self._fail(
                task.task_id, index, ErrorInfo(code=exc.code, message=exc.message, http_status=exc.http_status)
            )
            return
        await self._enqueue(task, index, data)

    async def _fail(self, task_id: str, index: int, error: ErrorInfo) -> None:
        await self._registry.update_item(task_id, index, ItemStatus.FAILED, error=error)

    async def _enqueue(self, task: TaskDetail, index: int, data: bytes) -> None:
        if await self._registry.update_item(task.task_id, index, ItemStatus.CLASSIFYING):
            queued = QueuedImage(
                task.task_id, index, task.model, task.top_k, data, priority=task.priority, queued_at=time.time()
            )
            await self._queue.put(queued)
