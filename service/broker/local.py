"""The in-process image queue: both sides of it (`service.tasks.queues`) in a service that
runs its own workers.

Images from every active task share the queue, so many small tasks still fill a batch; a
batch leaves as soon as it is full or `max_wait` has passed since it could have started.
The capacity bounds memory: a full queue makes `put` wait, which stalls new downloads.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter, deque

from service.tasks.queues import QueuedImage


class BatchQueue:
    """Room is a semaphore with one permit per free place, so a batch taken wakes only as
    many waiting downloads as it made room for. Consumers wait for `_arrived`, an event set
    (and replaced) on every change, and test the queue themselves: nothing between a test
    and a take awaits, so no lock is needed, and `put` never waits once it has room. (With
    one condition for both sides, every image put or taken woke every waiting download: with
    256 download slots and the queue full, a benchmark of the queue spent 53-55 us of CPU per
    image instead of 29-32, and 31-38 instead of 26-27 with the default 32; the service's
    web process, 7% more CPU per image.)"""

    def __init__(self, capacity: int) -> None:
        self._jobs: deque[QueuedImage] = deque()
        self._per_model: Counter[str] = Counter()
        self._room = asyncio.Semaphore(capacity)
        self._arrived = asyncio.Event()

    def __len__(self) -> int:
        return len(self._jobs)

    async def put(self, job: QueuedImage) -> None:
        await self._room.acquire()
        self._jobs.append(job)
        self._per_model[job.model] += 1
        self._changed()

    async def next_batch(self, max_size: int, max_wait: float) -> list[QueuedImage]:
        """Up to `max_size` jobs for one model, oldest first."""
        while True:
            while not self._jobs:
                await self._arrived.wait()
            await self._fill(self._jobs[0].model, max_size, max_wait)
            if self._jobs:  # another consumer or a cancel may have emptied it meanwhile
                return self._take(self._jobs[0].model, max_size)

    async def finished(self, batch: list[QueuedImage]) -> None:
        """Nothing to confirm: a batch taken from memory is gone from it."""

    async def drop_task(self, task_id: str) -> int:
        """Forget the queued images of a cancelled task; how many were dropped."""
        dropped = [job for job in self._jobs if job.task_id == task_id]
        if dropped:
            self._jobs = deque(job for job in self._jobs if job.task_id != task_id)
            self._forget(dropped)
            self._changed()  # a consumer filling a batch may have lost its images
        return len(dropped)

    async def _fill(self, model: str, max_size: int, max_wait: float) -> None:
        """Wait until `max_size` images of `model` are queued, the queue is empty, or
        `max_wait` has passed."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max_wait):
                while self._jobs and self._per_model[model] < max_size:
                    await self._arrived.wait()

    def _changed(self) -> None:
        self._arrived.set()
        self._arrived = asyncio.Event()

    def _take(self, model: str, max_size: int) -> list[QueuedImage]:
        batch: list[QueuedImage] = []
        rest: deque[QueuedImage] = deque()
        for job in self._jobs:
            if job.model == model and len(batch) < max_size:
                batch.append(job)
            else:
                rest.append(job)
        self._jobs = rest
        self._forget(batch)
        return batch

    def _forget(self, jobs: list[QueuedImage]) -> None:
        for job in jobs:
            self._per_model[job.model] -= 1
            self._room.release()
