"""Tasks and their items as the registry stores them and the API serves them.

The registry keeps these records and the handlers serialise them as they are, so the JSON a
client sees and the objects the service keeps cannot drift apart. `Label` is the very type the
workers return (`inference.protocol.Label`): one type crosses the process boundary.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict

from inference.protocol import Label
from inference.specs import RunPrecision

__all__ = [
    "ErrorInfo",
    "Item",
    "ItemStatus",
    "Label",
    "Priority",
    "Progress",
    "TaskDetail",
    "TaskPage",
    "TaskStatus",
    "TaskSummary",
    "Webhook",
    "WebhookStatus",
    "utcnow",
]


def utcnow() -> datetime:
    """Now, as every record's times are kept: aware, in UTC."""
    return datetime.now(UTC)


class TaskStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in (TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED)


class ItemStatus(StrEnum):
    PENDING = "pending"
    DOWNLOADING = "downloading"
    CLASSIFYING = "classifying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in (ItemStatus.SUCCEEDED, ItemStatus.FAILED, ItemStatus.CANCELLED)


class Priority(StrEnum):
    """How a task's images share the service: `interactive` work goes first, `batch` work runs
    in the capacity interactive work leaves (bulk jobs submit `batch`)."""

    INTERACTIVE = "interactive"
    BATCH = "batch"


def encodable(text: str) -> str:
    """`text` with what UTF-8 cannot encode (lone surrogates, as from a file name that was not
    UTF-8) replaced by U+FFFD: a record that holds text JSON cannot carry could never be read."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


Text = Annotated[str, AfterValidator(encodable)]


class Record(BaseModel):
    """Immutable: a snapshot handed out stays as it was when taken."""

    model_config = ConfigDict(frozen=True)


class ErrorInfo(Record):
    code: str
    message: Text
    http_status: int | None = None


class Item(Record):
    index: int
    url: Text  # the image URL, or `upload:<file name>` for an uploaded file
    status: ItemStatus = ItemStatus.PENDING
    labels: list[Label] | None = None
    error: ErrorInfo | None = None


class WebhookStatus(StrEnum):
    PENDING = "pending"  # the task is not final yet, or a delivery is being tried
    DELIVERED = "delivered"
    FAILED = "failed"  # given up: see `last_error`


class Webhook(Record):
    """The completion callback of a task (`callback_url` at submit) and how its delivery went."""

    url: Text
    status: WebhookStatus = WebhookStatus.PENDING
    attempts: int = 0
    last_error: Text | None = None  # why the last attempt failed
    delivered_at: datetime | None = None


class Progress(Record):
    total: int
    done: int
    succeeded: int
    failed: int
    cancelled: int


class TaskSummary(Record):
    task_id: str
    status: TaskStatus
    model: str
    precision: RunPrecision  # what the model ran at (bf16: on CPUs that compute it natively)
    top_k: int
    priority: Priority = Priority.INTERACTIVE
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    progress: Progress
    error: ErrorInfo | None = None
    webhook: Webhook | None = None  # only for tasks submitted with a `callback_url`


class TaskDetail(TaskSummary):
    items: list[Item]


class TaskPage(Record):
    tasks: list[TaskSummary]
    next_cursor: str | None
