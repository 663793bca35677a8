"""How tasks share what the service has little of (download slots, room in the queue for the
model): interactive work first, then in turn between tasks.

A shared service must not be first-come-first-served: one bulk job would take every slot and
every place in the queue, and a one-photo task submitted after it would wait for all of it.
So a `FairGate` hands out its permits to waiters by priority, and within a priority to their
tasks in turn (one permit per task per round, as a round-robin scheduler shares a CPU between
flows), whatever order they came in. Batch work also leaves a few permits free for
interactive work: an interactive image never waits for a slot that bulk work holds while
bulk work waits for the model.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque

from service.tasks.records import Priority

Waiters = OrderedDict[str, deque[asyncio.Future[None]]]  # task id -> its waiters, in turn order


def interactive_reserve(permits: int) -> int:
    """Permits (download slots, places in the queue) that only interactive work may take: one
    in eight, so bulk work keeps most of them."""
    return permits // 8


class FairGate:
    """A semaphore whose waiters are served by priority, then round robin between tasks."""

    def __init__(self, permits: int, reserved: int = 0) -> None:
        """`reserved`: permits only interactive work may take (fewer than `permits`)."""
        if not 0 <= reserved < permits:
            raise ValueError(f"reserved permits ({reserved}) must be fewer than the permits ({permits})")
        self._free = permits
        self._reserved = reserved
        self._waiting: dict[Priority, Waiters] = {priority: OrderedDict() for priority in Priority}

    async def acquire(self, priority: Priority, task_id: str) -> None:
        if self._may_take(priority) and not self._queued_before(priority):
            self._free -= 1
            return
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[priority].setdefault(task_id, deque()).append(granted)
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self.release()  # granted, then cancelled before it could use the permit
            else:
                self._forget(priority, task_id, granted)
            raise

    def release(self) -> None:
        self._free += 1
        self._grant()

    def _may_take(self, priority: Priority) -> bool:
        return self._free > (0 if priority is Priority.INTERACTIVE else self._reserved)

    def _queued_before(self, priority: Priority) -> bool:
        """Whether someone of this priority or a higher one already waits (they go first)."""
        for level in Priority:  # highest first
            if self._waiting[level]:
                return True
            if level is priority:
                return False
        return False

    def _grant(self) -> None:
        for priority in Priority:
            waiters = self._waiting[priority]
            while waiters and self._may_take(priority):
                task_id, futures = next(iter(waiters.items()))
                granted = futures.popleft()
                if futures:
                    waiters.move_to_end(task_id)  # its next waiter comes after every other task's
                else:
                    del waiters[task_id]
                if not granted.done():
                    self._free -= 1
                    granted.set_result(None)
            if waiters:
                return  # a higher priority still waits: lower ones wait behind it

    def _forget(self, priority: Priority, task_id: str, granted: asyncio.Future[None]) -> None:
        futures = self._waiting[priority].get(task_id)
        if futures is not None and granted in futures:
            futures.remove(granted)
            if not futures:
                del self._waiting[priority][task_id]
        self._grant()  # a batch waiter behind it may fit now
