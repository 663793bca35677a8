"""Where downloaded images wait for the model: the two sides, and the in-process queue.

`JobQueue` is what a task's pipeline puts images into and `BatchSource` what the consumers
take batches from. One `BatchQueue` is both in a service that runs its own workers; with
Redis, the web replicas put into a stream that workers anywhere take from
(`service.broker.jobs`).

Images from every active task share the queue, so many small tasks still fill a batch; a
batch leaves as soon as it is full or `max_wait` has passed since it could have started.
The capacity bounds memory: a full queue makes `put` wait, which stalls new downloads.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Job:
    task_id: str
    index: int
    model: str
    top_k: int
    data: bytes
    receipt: bytes = b""  # what the source needs to confirm it (a stream entry's id)


class JobQueue(Protocol):
    def __len__(self) -> int:
        """Images waiting, as far as this process knows."""
        ...

    async def put(self, job: Job) -> None:
        """Queue one image; waits while the queue is full."""
        ...

    async def drop_task(self, task_id: str) -> int:
        """Forget the queued images of a task that is final; how many were dropped."""
        ...


class BatchSource(Protocol):
    async def next_batch(self, max_size: int, max_wait: float) -> list[Job]:
        """Up to `max_size` images of one model, oldest first."""
        ...

    async def finished(self, batch: list[Job]) -> None:
        """The outcomes of `batch` are in the registry: it need not be handed out again."""
        ...


class BatchQueue:
    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._jobs: deque[Job] = deque()
        self._changed = asyncio.Condition()

    def __len__(self) -> int:
        return len(self._jobs)

    async def put(self, job: Job) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: len(self._jobs) < self._capacity)
            self._jobs.append(job)
            self._changed.notify_all()

    async def next_batch(self, max_size: int, max_wait: float) -> list[Job]:
        """Up to `max_size` jobs for one model, oldest first."""
        loop = asyncio.get_running_loop()
        async with self._changed:
            while True:
                await self._changed.wait_for(lambda: bool(self._jobs))
                model = self._jobs[0].model
                deadline = loop.time() + max_wait
                while self._jobs and self._count(model) < max_size:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        await asyncio.wait_for(self._changed.wait(), remaining)
                    except TimeoutError:
                        break
                if self._jobs:  # another consumer or a cancel may have emptied it meanwhile
                    batch = self._take(self._jobs[0].model, max_size)
                    self._changed.notify_all()
                    return batch

    async def finished(self, batch: list[Job]) -> None:
        """Nothing to confirm: a batch taken from memory is gone from it."""

    async def drop_task(self, task_id: str) -> int:
        """Forget the queued images of a cancelled task; how many were dropped."""
        async with self._changed:
            kept = deque(job for job in self._jobs if job.task_id != task_id)
            dropped = len(self._jobs) - len(kept)
            self._jobs = kept
            self._changed.notify_all()
            return dropped

    def _count(self, model: str) -> int:
        return sum(1 for job in self._jobs if job.model == model)

    def _take(self, model: str, max_size: int) -> list[Job]:
        batch: list[Job] = []
        rest: deque[Job] = deque()
        for job in self._jobs:
            if job.model == model and len(batch) < max_size:
                batch.append(job)
            else:
                rest.append(job)
        self._jobs = rest
        return batch
