"""A task as the registry holds it, and the journal that is told every change of one.

`TaskState` is the mutable record behind the immutable snapshots the API serves
(`service.tasks.records`); the in-memory registry changes it, and tells a `Journal` (the
SQLite one in `service.stores.sqlite.journal`, or none) each change in the order it happened.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from inference.specs import RunPrecision
from service.tasks.deliveries import Delivery
from service.tasks.idempotency import Submission
from service.tasks.records import (
    ErrorInfo,
    Item,
    ItemStatus,
    Priority,
    Progress,
    TaskDetail,
    TaskStatus,
    TaskSummary,
    Webhook,
    utcnow,
)


@dataclass
class TaskState:
    """One task as the registry holds it (a journal reads these; nothing else does)."""

    seq: int
    task_id: str
    model: str
    top_k: int
    items: list[Item]  # emptied once the task is final: `frozen` holds them then
    owner: str | None = None
    precision: RunPrecision = "fp32"
    priority: Priority = Priority.INTERACTIVE
    created_at: datetime = field(default_factory=utcnow)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    status: TaskStatus = TaskStatus.QUEUED
    error: ErrorInfo | None = None
    webhook: Webhook | None = None
    finals: Counter[ItemStatus] = field(default_factory=Counter)
    total: int = 0
    frozen: bytes | None = None  # the final snapshot as JSON
    completed: list[int] = field(default_factory=list)  # item indices, in the order they reached a final state
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # set (and replaced) on every result
    item_json: dict[int, bytes] = field(default_factory=dict)  # items serialised since they last changed

    def set_item(self, item: Item) -> None:
        """A final item (with its labels or error) is serialised first: one that cannot be
        changes nothing and raises, so no change leaves the task unreadable. The steps on
        the way change only the status and are serialised when read."""
        if item.status.is_final:
            piece = item.model_dump_json().encode()
            self.items[item.index] = item
            self.item_json[item.index] = piece
        else:
            self.items[item.index] = item
            self.item_json.pop(item.index, None)

    def set_webhook(self, webhook: Webhook) -> None:
        """A final task's snapshot is made again: it carries the webhook's state (this
        happens a few times per task at most: once per delivery attempt)."""
        self.webhook = webhook
        if self.frozen is not None:
            detail = TaskDetail.model_validate_json(self.frozen).model_copy(update={"webhook": webhook})
            self.frozen = detail.model_dump_json().encode()

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
        """What `detail().model_dump_json()` gives, assembled from each item's JSON, which is
        made once per change of that item: a GET of a running 1,000-item task no longer
        serialises 1,000 items."""
        if self.frozen is not None:
            return self.frozen
        pieces = []
        for item in self.items:
            piece = self.item_json.get(item.index)
            if piece is None:
                piece = self.item_json[item.index] = item.model_dump_json().encode()
            pieces.append(piece)
        head = self.summary().model_dump_json().encode()
        return head[:-1] + b',"items":[' + b",".join(pieces) + b"]}"

    def freeze(self) -> None:
        """Keep a final task as one JSON blob instead of thousands of small objects: less
        memory, nothing for the garbage collector to walk (a full collection over 10,000
        live items took 70 ms), and GET serves the bytes as they are."""
        self.frozen = self.detail_json()
        self.items = []
        self.item_json = {}

    def summary(self) -> TaskSummary:
        return TaskSummary(
            task_id=self.task_id,
            status=self.status,
            model=self.model,
            precision=self.precision,
            top_k=self.top_k,
            priority=self.priority,
            created_at=self.created_at,
            started_at=self.started_at,
            finished_at=self.finished_at,
            error=self.error,
            webhook=self.webhook,
            progress=Progress(
                total=self.total,
                done=self.done,
                succeeded=self.finals[ItemStatus.SUCCEEDED],
                failed=self.finals[ItemStatus.FAILED],
                cancelled=self.finals[ItemStatus.CANCELLED],
            ),
        )


class Journal(Protocol):
    """Told every change of a task, in order, right after it happened in memory."""

    def created(self, task: TaskState) -> None: ...

    def started(self, task: TaskState) -> None: ...

    def item_final(self, task: TaskState, index: int) -> None:
        """An item reached a final state while its task goes on."""
        ...

    def finished(self, task: TaskState) -> None:
        """The task reached a final state (`task.frozen` holds its snapshot)."""
        ...

    def forgotten(self, task: TaskState) -> None: ...

    def webhook_changed(self, task: TaskState) -> None:
        """A final task's webhook moved on (`task.frozen` has it too)."""
        ...

    def delivery_saved(self, task: TaskState | None, delivery: Delivery) -> None:
        """A webhook delivery is new, or was tried and will be tried again."""
        ...

    def delivery_done(self, delivery: Delivery) -> None:
        """A webhook was delivered or given up: nothing more to try."""
        ...

    def key_saved(self, task: TaskState, submission: Submission) -> None:
        """An idempotency key now stands for `task` (written with the task's creation)."""
        ...

    def keys_forgotten(self, submissions: list[Submission]) -> None: ...


class NoJournal:
    """Keep nothing: tasks live as long as the process."""

    def created(self, task: TaskState) -> None:
        pass

    def started(self, task: TaskState) -> None:
        pass

    def item_final(self, task: TaskState, index: int) -> None:
        pass

    def finished(self, task: TaskState) -> None:
        pass

    def forgotten(self, task: TaskState) -> None:
        pass

    def webhook_changed(self, task: TaskState) -> None:
        pass

    def delivery_saved(self, task: TaskState | None, delivery: Delivery) -> None:
        pass

    def delivery_done(self, delivery: Delivery) -> None:
        pass

    def key_saved(self, task: TaskState, submission: Submission) -> None:
        pass

    def keys_forgotten(self, submissions: list[Submission]) -> None:
        pass
