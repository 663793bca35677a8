"""The in-memory task registry: tasks in a dict, in creation order, gone with the process.

Every state change is a method that never awaits in the middle, so on one event loop each
call is atomic; final states are sticky (see `service.tasks.registry`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from service.tasks.records import (
    ErrorInfo,
    Item,
    ItemStatus,
    Label,
    Progress,
    TaskDetail,
    TaskPage,
    TaskStatus,
    TaskSummary,
)
from service.tasks.registry import TaskUpdate, decode_cursor, encode_cursor

log = logging.getLogger(__name__)


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class _TaskRecord:
    seq: int
    task_id: str
    model: str
    top_k: int
    items: list[Item]  # emptied once the task is final: `frozen` holds them then
    owner: str | None = None
    created_at: datetime = field(default_factory=utcnow)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    status: TaskStatus = TaskStatus.QUEUED
    error: ErrorInfo | None = None
    finals: Counter[ItemStatus] = field(default_factory=Counter)
    total: int = 0
    frozen: bytes | None = None  # the final snapshot as JSON
    completed: list[int] = field(default_factory=list)  # item indices, in the order they reached a final state
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # set (and replaced) on every result

    def notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    @property
    def done(self) -> int:
        return sum(self.finals.values())

    def detail(self) -> TaskDetail:
        if self.frozen is not None:
            return TaskDetail.model_validate_json(self.frozen)
        # Items are frozen models, so a shallow copy of the list is a consistent snapshot.
        return TaskDetail(**dict(self.summary()), items=list(self.items))

    def detail_json(self) -> bytes:
        return self.frozen if self.frozen is not None else self.detail().model_dump_json().encode()

    def freeze(self) -> None:
        """Keep a final task as one JSON blob instead of thousands of small objects: less
        memory, nothing for the garbage collector to walk (a full collection over 10,000
        live items took 70 ms), and GET serves the bytes as they are."""
        self.frozen = self.detail_json()
        self.items = []

    def summary(self) -> TaskSummary:
        return TaskSummary(
            task_id=self.task_id,
            status=self.status,
            model=self.model,
            top_k=self.top_k,
            created_at=self.created_at,
            started_at=self.started_at,
            finished_at=self.finished_at,
            error=self.error,
            progress=Progress(
                total=self.total,
                done=self.done,
                succeeded=self.finals[ItemStatus.SUCCEEDED],
                failed=self.finals[ItemStatus.FAILED],
                cancelled=self.finals[ItemStatus.CANCELLED],
            ),
        )


class InMemoryRegistry:
    """Keeps tasks in a dict, in creation order.

    Memory stays bounded: a finished task is forgotten `finished_ttl` seconds after it
    finished, and at most `max_finished` finished tasks are kept (oldest finished go
    first). Expiry is checked on every call, so no background task is needed.
    """

    def __init__(
        self,
        finished_ttl: float = 3600.0,
        max_finished: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._tasks: dict[str, _TaskRecord] = {}
        self._finished: dict[str, float] = {}  # task id -> when it finished, oldest first
        self._finished_ttl = finished_ttl
        self._max_finished = max_finished
        self._clock = clock
        self._next_seq = 1
        self._unfinished = 0

    async def create(self, urls: list[str], model: str, top_k: int, owner: str | None = None) -> TaskDetail:
        self._expire()
        record = _TaskRecord(
            seq=self._next_seq,
            task_id=uuid.uuid4().hex,
            model=model,
            top_k=top_k,
            items=[Item(index=index, url=url) for index, url in enumerate(urls)],
            owner=owner,
            total=len(urls),
        )
        self._next_seq += 1
        self._tasks[record.task_id] = record
        self._unfinished += len(urls)
        log.info("task %s created: %d images, model %s", record.task_id, len(urls), model, extra=_ids(record))
        return record.detail()

    async def get(self, task_id: str, owner: str | None = None) -> TaskDetail | None:
        self._expire()
        record = self._owned(task_id, owner)
        return record.detail() if record else None

    async def get_json(self, task_id: str, owner: str | None = None) -> bytes | None:
        self._expire()
        record = self._owned(task_id, owner)
        return record.detail_json() if record else None

    async def page(
        self, status: TaskStatus | None, limit: int, cursor: str | None, owner: str | None = None
    ) -> TaskPage:
        """Newest first. The cursor is the sequence number of the last task already seen."""
        self._expire()
        before = decode_cursor(cursor) if cursor else None
        page: list[_TaskRecord] = []
        more = False
        for record in reversed(self._tasks.values()):
            if before is not None and record.seq >= before:
                continue
            if record.owner != owner or (status is not None and record.status != status):
                continue
            if len(page) == limit:
                more = True
                break
            page.append(record)
        next_cursor = encode_cursor(page[-1].seq) if more else None
        return TaskPage(tasks=[record.summary() for record in page], next_cursor=next_cursor)

    async def update_item(
        self,
        task_id: str,
        index: int,
        status: ItemStatus,
        labels: list[Label] | None = None,
        error: ErrorInfo | None = None,
    ) -> bool:
        """Move one item on; False (and no change) if the task or the item is already final."""
        record = self._tasks.get(task_id)
        if record is None or record.status.is_final or record.items[index].status.is_final:
            return False
        record.items[index] = record.items[index].model_copy(
            update={"status": status, "labels": labels, "error": error}
        )
        if record.status is TaskStatus.QUEUED:
            record.status = TaskStatus.RUNNING
            record.started_at = utcnow()
            log.info("task %s running", task_id, extra=_ids(record))
        if status.is_final:
            self._count_final(record, index, status)
            if record.done == record.total:
                self._finish(record, TaskStatus.COMPLETED)
            record.notify()
        return True

    async def fail(self, task_id: str, error: ErrorInfo) -> bool:
        """The task cannot run at all: its unfinished items fail with the task's error."""
        record = self._tasks.get(task_id)
        if record is None or record.status.is_final:
            return False
        self._close_items(record, ItemStatus.FAILED, error)
        record.error = error
        self._finish(record, TaskStatus.FAILED)
        return True

    async def cancel(self, task_id: str, owner: str | None = None) -> TaskDetail | None:
        """Cancel an active task (a finished one is left as it is); None if unknown."""
        record = self._owned(task_id, owner)
        if record is None:
            return None
        if not record.status.is_final:
            self._close_items(record, ItemStatus.CANCELLED, None)
            self._finish(record, TaskStatus.CANCELLED)
        return record.detail()

    async def follow(
        self, task_id: str, seen: int | None, owner: str | None = None, wait: bool = True
    ) -> TaskUpdate | None:
        """The items that reached a final state after the first `seen` ones (in completion
        order; None: as many as have now), with the task's summary; with `wait`, waits until
        there is one or the task is final. None if the task is unknown or was forgotten meanwhile."""
        record = self._owned(task_id, owner)
        if seen is None:
            seen = len(record.completed) if record is not None else 0
        while wait and record is not None and len(record.completed) <= seen and not record.status.is_final:
            await record.changed.wait()
            record = self._owned(task_id, owner)
        if record is None:
            return None
        items = record.detail().items if record.frozen is not None else record.items
        return TaskUpdate(items=[items[index] for index in record.completed[seen:]], summary=record.summary())

    async def wait_final(self, task_id: str) -> None:
        record = self._tasks.get(task_id)
        while record is not None and not record.status.is_final:
            await record.changed.wait()
            record = self._tasks.get(task_id)

    async def cancel_active(self) -> int:
        """Cancel every task still active (at shutdown); how many there were."""
        active = [task_id for task_id, record in self._tasks.items() if not record.status.is_final]
        for task_id in active:
            await self.cancel(task_id, self._tasks[task_id].owner)
        return len(active)

    async def status_counts(self) -> dict[TaskStatus, int]:
        """Tasks held now, by status (every status present, zeros included)."""
        self._expire()
        counts = Counter(record.status for record in self._tasks.values())
        return {status: counts[status] for status in TaskStatus}

    async def remove(self, task_id: str, owner: str | None = None) -> TaskDetail | None:
        snapshot = await self.cancel(task_id, owner)
        if snapshot is not None:
            self._forget(task_id)
        return snapshot

    async def unfinished_images(self) -> int:
        return self._unfinished

    def _owned(self, task_id: str, owner: str | None) -> _TaskRecord | None:
        record = self._tasks.get(task_id)
        return record if record is not None and record.owner == owner else None

    def _close_items(self, record: _TaskRecord, status: ItemStatus, error: ErrorInfo | None) -> None:
        for index, item in enumerate(record.items):
            if not item.status.is_final:
                record.items[index] = item.model_copy(update={"status": status, "error": error})
                self._count_final(record, index, status)

    def _count_final(self, record: _TaskRecord, index: int, status: ItemStatus) -> None:
        record.finals[status] += 1
        record.completed.append(index)
        self._unfinished -= 1

    def _finish(self, record: _TaskRecord, status: TaskStatus) -> None:
        record.status = status
        record.finished_at = utcnow()
        log.info(
            "task %s %s: %d succeeded, %d failed, %d cancelled",
            record.task_id,
            status.value,
            record.finals[ItemStatus.SUCCEEDED],
            record.finals[ItemStatus.FAILED],
            record.finals[ItemStatus.CANCELLED],
            extra=_ids(record),
        )
        record.freeze()
        record.notify()
        self._finished[record.task_id] = self._clock()
        while len(self._finished) > self._max_finished:
            self._forget(next(iter(self._finished)))

    def _expire(self) -> None:
        deadline = self._clock() - self._finished_ttl
        while self._finished:
            task_id, finished = next(iter(self._finished.items()))
            if finished > deadline:
                break
            self._forget(task_id)

    def _forget(self, task_id: str) -> None:
        record = self._tasks.pop(task_id, None)
        self._finished.pop(task_id, None)
        if record is not None:
            record.notify()  # its watchers find it gone


def _ids(record: _TaskRecord) -> dict[str, object]:
    """Structured fields for a task's log lines (the owner is a key hash, never the key)."""
    return {"task_id": record.task_id, "owner": record.owner}
