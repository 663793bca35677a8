"""Where downloaded images wait for the model: the two sides of the queue.

`ImageQueue` is what a task's pipeline puts images into and `BatchSource` what the consumers
take batches from. One in-process queue (`service.broker.local`) is both in a service that runs
its own workers; with Redis, the web replicas put into a stream that workers anywhere take from
(`service.broker.streams`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from service.tasks.records import Priority


@dataclass(frozen=True)
class QueuedImage:
    task_id: str
    index: int
    model: str
    top_k: int
    data: bytes
    receipt: bytes = b""  # what the source needs to confirm it (a stream entry's id)
    priority: Priority = Priority.INTERACTIVE
    queued_at: float = 0.0  # when it was downloaded and queued (epoch seconds: it may cross machines)


@dataclass(frozen=True)
class Backlog:
    """The images of one model and priority waiting for the model (or being classified):
    what a gauge shows and what an autoscaler scales workers on."""

    model: str
    priority: Priority
    images: int
    oldest_seconds: float  # how long the oldest of them has waited; 0 when there are none


class ImageQueue(Protocol):
    async def backlog(self, models: list[str]) -> list[Backlog]:
        """What waits for `models`, by model and priority: with a shared queue, fleet-wide."""
        ...

    async def put(self, job: QueuedImage) -> None:
        """Queue one image; waits while the queue is full."""
        ...

    async def drop_task(self, task_id: str) -> int:
        """Forget the queued images of a task that is final; how many were dropped."""
        ...


class BatchSource(Protocol):
    async def next_batch(self, max_size: int, max_wait: float) -> list[QueuedImage]:
        """Up to `max_size` images of one model, interactive ones first."""
        ...

    async def finished(self, batch: list[QueuedImage]) -> None:
        """The outcomes of `batch` are in the registry: it need not be handed out again."""
        ...
