"""The in-process image queue: both sides of it (`service.tasks.queues`) in a service that
runs its own workers.

Images from every active task share the queue, so many small tasks still fill a batch; a
batch leaves as soon as it is full or `max_wait` has passed since it could have started.
It is fair, not first-come-first-served: a batch takes interactive images before batch ones,
and within a priority one image from each task in turn, so a one-image task queued behind
thousands of a bulk job's images is in the next batch (and the bulk job still fills every
batch when nothing else waits). The capacity bounds memory: a full queue makes `put` wait,
which stalls new downloads; its room is handed out the same way (`FairGate`), with a few
places that only interactive images may take.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, OrderedDict, deque

from service.tasks.fairness import FairGate, interactive_reserve
from service.tasks.queues import Backlog, QueuedImage
from service.tasks.records import Priority

Rings = dict[Priority, OrderedDict[str, deque[QueuedImage]]]  # per priority: task id -> its images, in turn order


class BatchQueue:
    """Consumers wait for `_arrived`, an event set (and replaced) on every change, and test
    the queue themselves: nothing between a test and a take awaits, so no lock is needed,
    and `put` never waits once it has room. Room is a `FairGate` with one permit per free
    place, so a batch taken wakes only as many waiting downloads as it made room for."""

    def __init__(self, capacity: int) -> None:
        self._models: OrderedDict[str, Rings] = OrderedDict()  # in turn order too
        self._per_model: Counter[str] = Counter()
        self._room = FairGate(capacity, reserved=interactive_reserve(capacity))
        self._arrived = asyncio.Event()

    def __len__(self) -> int:
        return self._per_model.total()

    async def backlog(self, models: list[str]) -> list[Backlog]:
        now = time.time()
        backlog = []
        for model in models:
            rings = self._models.get(model)
            for priority in Priority:
                images = list(rings[priority].values()) if rings else []
                oldest = min((queued[0].queued_at for queued in images), default=now)
                backlog.append(Backlog(model, priority, sum(map(len, images)), max(0.0, now - oldest)))
        return backlog

    async def put(self, job: QueuedImage) -> None:
        await self._room.acquire(job.priority, job.task_id)
        rings = self._models.setdefault(job.model, {priority: OrderedDict() for priority in Priority})
        rings[job.priority].setdefault(job.task_id, deque()).append(job)
        self._per_model[job.model] += 1
        self._changed()

    async def next_batch(self, max_size: int, max_wait: float) -> list[QueuedImage]:
        """Up to `max_size` images of one model: interactive ones first, one per task in turn."""
        while True:
            while not len(self):
                await self._arrived.wait()
            model = self._next_model()
            await self._fill(model, max_size, max_wait)
            if self._per_model[model]:  # another consumer or a cancel may have emptied it meanwhile
                return self._take(model, max_size)

    async def finished(self, batch: list[QueuedImage]) -> None:
        """Nothing to confirm: a batch taken from memory is gone from it."""

    async def drop_task(self, task_id: str) -> int:
        """Forget the queued images of a cancelled task; how many were dropped."""
        dropped: list[QueuedImage] = []
        for rings in self._models.values():
            for ring in rings.values():
                dropped.extend(ring.pop(task_id, ()))
        if dropped:
            self._forget(dropped)
            self._changed()  # a consumer filling a batch may have lost its images
        return len(dropped)

    def _next_model(self) -> str:
        """The first model, in turn, with interactive images waiting; else the first with any."""
        with_images = [model for model in self._models if self._per_model[model]]
        for model in with_images:
            if self._models[model][Priority.INTERACTIVE]:
                return model
        return with_images[0]

    async def _fill(self, model: str, max_size: int, max_wait: float) -> None:
        """Wait until `max_size` images of `model` are queued, none are left, or `max_wait` has passed."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max_wait):
                while 0 < self._per_model[model] < max_size:
                    await self._arrived.wait()

    def _changed(self) -> None:
        self._arrived.set()
        self._arrived = asyncio.Event()

    def _take(self, model: str, max_size: int) -> list[QueuedImage]:
        batch: list[QueuedImage] = []
        for ring in self._models[model].values():  # interactive first
            while ring and len(batch) < max_size:
                task_id, images = next(iter(ring.items()))
                batch.append(images.popleft())
                if images:
                    ring.move_to_end(task_id)  # its next image comes after every other task's
                else:
                    del ring[task_id]
        self._models.move_to_end(model)  # other models' turn next, if they have images waiting
        self._forget(batch)
        return batch

    def _forget(self, jobs: list[QueuedImage]) -> None:
        for job in jobs:
            self._per_model[job.model] -= 1
            self._room.release()
