"""The task registry interface: where tasks and their per-image results live.

The task service writes through it and the HTTP handlers read through it; a durable backend
can replace the in-memory one (`service.stores.memory.registry`) without touching either. Final states
are sticky: a result that arrives after a cancel is refused, not applied.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Literal, Protocol

from inference.specs import RunPrecision
from service.tasks.deliveries import Delivery
from service.tasks.idempotency import IdempotencyKey, Submission
from service.tasks.records import (
    ErrorInfo,
    Item,
    ItemStatus,
    Label,
    Priority,
    TaskDetail,
    TaskPage,
    TaskStatus,
    TaskSummary,
    Webhook,
)


class InvalidCursor(ValueError):
    """A pagination cursor this registry did not issue."""


class StoreUnavailable(Exception):
    """A durable registry cannot write a change now (it keeps trying; readiness fails)."""


class StoreOpenError(Exception):
    """A store cannot be opened at start-up (a data dir that cannot be used, a Redis that does
    not answer): every backend's start-up error is one, and its message the one-line reason."""


@dataclass(frozen=True)
class Admission:
    """The room a new task must fit in, checked by the store in the same step that creates it,
    so submits racing on several replicas cannot together go past a limit."""

    max_images: int  # unfinished images across every task of the service
    max_images_per_owner: int | None = None  # unfinished images of one API key (or of all anonymous callers)

    def check(self, images: int, unfinished: int, owner_unfinished: int) -> None:
        """Raise `NoRoom` if `images` more do not fit beside those already unfinished."""
        if unfinished + images > self.max_images:
            raise NoRoom("service", unfinished, self.max_images)
        if self.max_images_per_owner is not None and owner_unfinished + images > self.max_images_per_owner:
            raise NoRoom("owner", owner_unfinished, self.max_images_per_owner)


class NoRoom(Exception):
    """A task refused at creation: its images would take the service (`scope` "service") or
    its owner ("owner") past a limit of `Admission`."""

    def __init__(self, scope: Literal["service", "owner"], unfinished: int, limit: int) -> None:
        super().__init__(f"{unfinished} unfinished images of {limit} ({scope})")
        self.scope = scope
        self.unfinished = unfinished
        self.limit = limit


@dataclass(frozen=True)
class TaskUpdate:
    """What a watcher has not seen yet: newly final items, and the task as it is now."""

    items: list[Item]
    summary: TaskSummary


@dataclass(frozen=True)
class ItemChange:
    """One item moved on (see `TaskRegistry.update_item`)."""

    task_id: str
    index: int
    status: ItemStatus
    labels: list[Label] | None = None
    error: ErrorInfo | None = None


class TaskRegistry(Protocol):
    # `owner` identifies the API key that created a task (None without keys); a task is
    # invisible, as if it did not exist, to every other owner.
    def healthy(self) -> bool:
        """False while changes cannot be kept (a durable store failing to write)."""
        ...

    async def check(self) -> bool:
        """`healthy`, after asking the store now if it is elsewhere (what readiness probes call)."""
        ...

    async def observe(self) -> None:
        """Bring the store's own figures in the metrics up to date (at scrape time): its gauges,
        and the image outcomes it counts itself where others write them (Redis)."""
        ...

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
        """A new queued task (`task_id`: an id made for it beforehand, else a new one;
        `precision`: what its model runs at; `callback_url`: where its completion webhook
        goes; `idempotency`: the key that will stand for it; `admission`: the limits it must
        fit in, else `NoRoom` is raised and nothing is kept). A durable registry has it on
        disk when this returns."""
        ...

    async def find_submission(self, owner: str | None, key: str) -> Submission | None:
        """What the idempotency key `key` of `owner` stands for, unless it expired."""
        ...

    async def get(self, task_id: str, owner: str | None = None) -> TaskDetail | None: ...

    async def get_json(self, task_id: str, owner: str | None = None) -> bytes | None:
        """The same snapshot as `get`, serialised (what GET /tasks/<id> sends)."""
        ...

    async def page(
        self,
        status: TaskStatus | None,
        limit: int,
        cursor: str | None,
        owner: str | None = None,
        priority: Priority | None = None,
    ) -> TaskPage:
        """Task summaries, newest first (only those in `status` and of `priority`, if given);
        raises InvalidCursor for a cursor it did not issue."""
        ...

    async def update_item(
        self,
        task_id: str,
        index: int,
        status: ItemStatus,
        labels: list[Label] | None = None,
        error: ErrorInfo | None = None,
    ) -> bool:
        """Move one item on; False (and no change) if the task or the item is already final."""
        ...

    async def update_items(self, changes: list[ItemChange]) -> list[bool]:
        """`update_item` for each change, in order (a batch's outcomes: one write where the
        store is elsewhere)."""
        ...

    async def fail(self, task_id: str, error: ErrorInfo) -> bool:
        """The task cannot run at all: its unfinished items fail with the task's error."""
        ...

    async def cancel(self, task_id: str, owner: str | None = None) -> TaskDetail | None:
        """Cancel an active task (a final one is left as it is); its snapshot, or None if unknown."""
        ...

    async def remove(self, task_id: str, owner: str | None = None) -> TaskDetail | None:
        """Cancel, then forget, a task; its last snapshot, or None if unknown."""
        ...

    async def active(self) -> list[tuple[TaskDetail, str | None]]:
        """Tasks not yet final with their owners, oldest first: at start-up, what a durable
        registry resumes."""
        ...

    async def shutdown(self) -> None:
        """The service stops: an in-memory registry cancels the tasks still active; a durable
        one keeps them to resume at the next start."""
        ...

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
        there is one, or the task's status is no longer `status` (None: the status it has
        when called: it starts running, or reaches a final state). None if the task is
        unknown or was forgotten."""
        ...

    async def wait_final(self, task_id: str) -> None:
        """Return once the task is in a final state, or gone (whoever owns it)."""
        ...

    async def pending_deliveries(self) -> int:
        """Webhook deliveries waiting to be delivered or given up (what a start without a
        webhook secret leaves waiting)."""
        ...

    async def next_delivery(self) -> Delivery:
        """Wait for the next webhook delivery to try: made when a task with a callback
        reaches a final state (a durable registry also hands back, after a restart, those
        not yet delivered or given up)."""
        ...

    async def record_delivery(self, delivery: Delivery, webhook: Webhook, retry: Delivery | None) -> None:
        """A delivery attempt's outcome: the task's webhook is now `webhook`; `retry` is
        the delivery to try again later, or None when it is delivered or given up."""
        ...

    async def status_counts(self) -> dict[TaskStatus, int]:
        """Tasks held now, by status (every status present, zeros included)."""
        ...

    async def unfinished_images(self) -> int: ...


def encode_cursor(seq: int) -> str:
    """An opaque page cursor: the sequence number of the last task already seen."""
    return base64.urlsafe_b64encode(f"seq:{seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        prefix, _, number = text.partition(":")
        if prefix != "seq" or not number.isdigit():
            raise ValueError(text)
        return int(number)
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise InvalidCursor(f"invalid cursor {cursor!r}") from exc
