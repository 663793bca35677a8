"""The in-memory task registry: tasks in a dict, in creation order.

Every state change is a method that never awaits in the middle, so on one event loop each
call is atomic; final states are sticky (see `service.tasks.registry`). Each change is also
told to a `Journal`, in the order it happens: the durable registry
(`service.stores.sqlite.registry`) keeps this registry as its cache and writes the journal to disk.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable

from inference.specs import RunPrecision
from service.metrics import Metrics
from service.stores.memory.task_state import Journal, NoJournal, TaskState
from service.tasks.deliveries import Delivery, payload
from service.tasks.idempotency import IdempotencyKey, Submission, SubmissionKeys
from service.tasks.records import (
    ErrorInfo,
    Item,
    ItemStatus,
    Label,
    Priority,
    TaskDetail,
    TaskPage,
    TaskStatus,
    Webhook,
    utcnow,
)
from service.tasks.registry import Admission, ItemChange, TaskUpdate, decode_cursor, encode_cursor

log = logging.getLogger(__name__)

EVICTIONS_LOGGED = 10_000  # one warning line per this many idempotency keys forgotten early


class InMemoryRegistry:
    """Keeps tasks in a dict, in creation order.

    Memory stays bounded: a finished task is forgotten `finished_ttl` seconds after it
    finished, and at most `max_finished` finished tasks are kept (oldest finished go
    first). Expiry is checked on every call, so no background task is needed. `clock` is
    wall-clock seconds (finish times outlive the process in a durable registry). Idempotency
    keys live `idempotency_ttl` seconds, at most `max_keys` of them.
    """

    def __init__(
        self,
        finished_ttl: float = 3600.0,
        max_finished: int = 10_000,
        clock: Callable[[], float] = time.time,
        journal: Journal | None = None,
        metrics: Metrics | None = None,
        idempotency_ttl: float = 86_400.0,
        max_keys: int = 100_000,
    ) -> None:
        self._tasks: dict[str, TaskState] = {}
        self._ids: dict[int, str] = {}  # seq -> task id
        self._finished: dict[str, float] = {}  # task id -> when it finished, oldest first
        self._finished_ttl = finished_ttl
        self._max_finished = max_finished
        self._clock = clock
        self._journal: Journal = journal or NoJournal()
        self._metrics = metrics
        self._next_seq = 1
        self._unfinished = 0
        self._owner_unfinished: Counter[str | None] = Counter()  # the same, per owner
        self._keys = SubmissionKeys(idempotency_ttl, max_keys, clock)
        self._outbox: asyncio.Queue[Delivery] = asyncio.Queue()  # webhooks to deliver, as tasks end

    def healthy(self) -> bool:
        return True

    async def check(self) -> bool:
        return self.healthy()

    async def observe(self) -> None:
        """Nothing of its own to report: its tasks are counted by status like every store's."""

    async def create(
        self,
        urls: list[str],
        model: str,
        top_k: int,
        owner: str | None = None,
        task_id: str | None = None,
        precision: RunPrecision = "fp32",
        *,
        callback_url: str | None = None,
        idempotency: IdempotencyKey | None = None,
        priority: Priority = Priority.INTERACTIVE,
        admission: Admission | None = None,
    ) -> TaskDetail:
        self._expire()
        if admission is not None:
            admission.check(len(urls), self._unfinished, self._owner_unfinished[owner])
        record = TaskState(
            seq=self._next_seq,
            task_id=task_id or uuid.uuid4().hex,
            model=model,
            precision=precision,
            priority=priority,
            top_k=top_k,
            items=[Item(index=index, url=url) for index, url in enumerate(urls)],
            owner=owner,
            total=len(urls),
            webhook=Webhook(url=callback_url) if callback_url else None,
        )
        snapshot = record.detail()  # what cannot be read is refused (raises) before it is kept
        self._next_seq += 1
        self._tasks[record.task_id] = record
        self._ids[record.seq] = record.task_id
        self._count_unfinished(record, len(urls))
        self._journal.created(record)
        if idempotency is not None:
            submission, forgotten = self._keys.add(owner, idempotency, record.task_id, record.total)
            self._journal.key_saved(record, submission)
            if forgotten:
                self._journal.keys_forgotten(forgotten)
                if self._keys.evicted % EVICTIONS_LOGGED == 1:  # the first, then one line per so many
                    log.warning(
                        "%d idempotency keys forgotten before their TTL so far: more than %d in use",
                        self._keys.evicted,
                        len(self._keys),
                    )
        log.info("task %s created: %d images, model %s", record.task_id, len(urls), model, extra=_ids(record))
        return snapshot

    async def find_submission(self, owner: str | None, key: str) -> Submission | None:
        self._expire()
        return self._keys.get(owner, key)

    async def get(self, task_id: str, owner: str | None = None) -> TaskDetail | None:
        self._expire()
        record = self._owned(task_id, owner)
        return record.detail() if record else None

    async def get_json(self, task_id: str, owner: str | None = None) -> bytes | None:
        self._expire()
        record = self._owned(task_id, owner)
        return record.detail_json() if record else None

    async def page(
        self,
        status: TaskStatus | None,
        limit: int,
        cursor: str | None,
        owner: str | None = None,
        priority: Priority | None = None,
    ) -> TaskPage:
        """Newest first. The cursor is the sequence number of the last task already seen."""
        self._expire()
        before = decode_cursor(cursor) if cursor else None
        page: list[TaskState] = []
        more = False
        for record in reversed(self._tasks.values()):
            if before is not None and record.seq >= before:
                continue
            if record.owner != owner or (status is not None and record.status != status):
                continue
            if priority is not None and record.priority != priority:
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
        record.set_item(record.items[index].model_copy(update={"status": status, "labels": labels, "error": error}))
        if record.status is TaskStatus.QUEUED:
            record.status = TaskStatus.RUNNING
            record.started_at = utcnow()
            self._journal.started(record)
            record.notify()  # watchers are told it runs
            log.info("task %s running", task_id, extra=_ids(record))
        if status.is_final:
            self._count_final(record, index, status)
            if record.done == record.total:
                self._finish(record, TaskStatus.COMPLETED)
            else:
                self._journal.item_final(record, index)
            record.notify()
        return True

    async def update_items(self, changes: list[ItemChange]) -> list[bool]:
        return [
            await self.update_item(change.task_id, change.index, change.status, change.labels, change.error)
            for change in changes
        ]

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
        self,
        task_id: str,
        seen: int | None,
        owner: str | None = None,
        wait: bool = True,
        status: TaskStatus | None = None,
    ) -> TaskUpdate | None:
        """The items that reached a final state after the first `seen` ones (in completion
        order; None: as many as have now), with the task's summary; with `wait`, waits until
        there is one, or the task's status is no longer `status` (None: the status it has now).
        None if the task is unknown or was forgotten meanwhile."""
        record = self._owned(task_id, owner)
        if record is None:
            return None
        seen = len(record.completed) if seen is None else seen
        status = record.status if status is None else status
        while wait and len(record.completed) <= seen and record.status == status and not record.status.is_final:
            await record.changed.wait()
            if (record := self._owned(task_id, owner)) is None:
                return None
        items = record.detail().items if record.frozen is not None else record.items
        return TaskUpdate(items=[items[index] for index in record.completed[seen:]], summary=record.summary())

    async def wait_final(self, task_id: str) -> None:
        record = self._tasks.get(task_id)
        while record is not None and not record.status.is_final:
            await record.changed.wait()
            record = self._tasks.get(task_id)

    async def active(self) -> list[tuple[TaskDetail, str | None]]:
        """Tasks not yet final with their owners, oldest first (what a restart resumes)."""
        return [(record.detail(), record.owner) for record in self._tasks.values() if not record.status.is_final]

    async def shutdown(self) -> None:
        """Tasks live as long as the process: cancel every task still active."""
        active = [task_id for task_id, record in self._tasks.items() if not record.status.is_final]
        for task_id in active:
            await self.cancel(task_id, self._tasks[task_id].owner)
        if active:
            log.info("cancelled %d active tasks at shutdown", len(active))

    async def pending_deliveries(self) -> int:
        return self._outbox.qsize()

    async def next_delivery(self) -> Delivery:
        return await self._outbox.get()

    async def record_delivery(self, delivery: Delivery, webhook: Webhook, retry: Delivery | None) -> None:
        record = self._tasks.get(delivery.task_id)
        if record is not None:
            record.set_webhook(webhook)
            self._journal.webhook_changed(record)
        if retry is not None:
            self._journal.delivery_saved(record, retry)
        else:
            self._journal.delivery_done(delivery)

    def restore(
        self, tasks: Iterable[TaskState], submissions: Iterable[Submission] = (), deliveries: Iterable[Delivery] = ()
    ) -> None:
        """Take back tasks, idempotency keys and webhook deliveries kept elsewhere (tasks in
        creation order), as they were; items of an active task that had not reached a final
        state start again from pending."""
        self._keys.restore(list(submissions))
        for delivery in deliveries:
            self._outbox.put_nowait(delivery)
        finished: list[TaskState] = []
        for record in tasks:
            for item in list(record.items):
                if not item.status.is_final and item.status is not ItemStatus.PENDING:
                    record.set_item(item.model_copy(update={"status": ItemStatus.PENDING}))
            self._tasks[record.task_id] = record
            self._ids[record.seq] = record.task_id
            self._next_seq = max(self._next_seq, record.seq + 1)
            self._count_unfinished(record, record.total - record.done)
            if record.status.is_final:
                finished.append(record)
        for record in sorted(finished, key=lambda record: record.finished_at or record.created_at):
            self._finished[record.task_id] = (record.finished_at or record.created_at).timestamp()
        self._expire()

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

    def _owned(self, task_id: str, owner: str | None) -> TaskState | None:
        record = self._tasks.get(task_id)
        return record if record is not None and record.owner == owner else None

    def _close_items(self, record: TaskState, status: ItemStatus, error: ErrorInfo | None) -> None:
        for index, item in enumerate(record.items):
            if not item.status.is_final:
                record.set_item(item.model_copy(update={"status": status, "error": error}))
                self._count_final(record, index, status)

    def _count_final(self, record: TaskState, index: int, status: ItemStatus) -> None:
        """The one place an item becomes final, however it got there: counted here."""
        record.finals[status] += 1
        record.completed.append(index)
        self._count_unfinished(record, -1)
        if self._metrics is not None:
            error = record.items[index].error
            self._metrics.image_final(status.value, error.code if error is not None else "")

    def _finish(self, record: TaskState, status: TaskStatus) -> None:
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
        self._journal.finished(record)
        if record.webhook is not None:  # the delivery is kept with the final state, in the same step
            delivery = Delivery(
                uuid.uuid4().hex, record.task_id, record.webhook.url, payload(record.summary()), self._clock()
            )
            self._journal.delivery_saved(record, delivery)
            self._outbox.put_nowait(delivery)
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
        if forgotten := self._keys.expire():
            self._journal.keys_forgotten(forgotten)

    def _forget(self, task_id: str) -> None:
        record = self._tasks.pop(task_id, None)
        self._finished.pop(task_id, None)
        if record is not None:
            del self._ids[record.seq]
            self._journal.forgotten(record)
            record.notify()  # its watchers find it gone

    def _drop(self, task_id: str) -> int:
        """Undo the creation of a task nobody was told about; its sequence number."""
        record = self._tasks.pop(task_id)
        del self._ids[record.seq]
        self._keys.drop_task(task_id)
        self._count_unfinished(record, record.done - record.total)
        return record.seq

    def _count_unfinished(self, record: TaskState, images: int) -> None:
        self._unfinished += images
        self._owner_unfinished[record.owner] += images
        if not self._owner_unfinished[record.owner]:
            del self._owner_unfinished[record.owner]  # no entry kept per owner without work

    def _by_seq(self, seqs: Iterable[int]) -> list[TaskState]:
        return [self._tasks[self._ids[seq]] for seq in seqs if seq in self._ids]


def _ids(record: TaskState) -> dict[str, object]:
    """Structured fields for a task's log lines (the owner is a key hash, never the key)."""
    return {"task_id": record.task_id, "owner": record.owner}
