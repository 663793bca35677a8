"""The API's data shapes: request validation, task/item records and response bodies.

The registry stores these records and the handlers serialise them as they are, so the
JSON a client sees and the Python objects the service keeps cannot drift apart.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from service.netpolicy import url_problem


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


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True)


class Label(_Record):
    label: str
    class_index: int
    score: float


class ErrorInfo(_Record):
    code: str
    message: str
    http_status: int | None = None


class Item(_Record):
    index: int
    url: str
    status: ItemStatus = ItemStatus.PENDING
    labels: list[Label] | None = None
    error: ErrorInfo | None = None


class Progress(_Record):
    total: int
    done: int
    succeeded: int
    failed: int
    cancelled: int


class TaskSummary(_Record):
    task_id: str
    status: TaskStatus
    model: str
    top_k: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    progress: Progress
    error: ErrorInfo | None = None


class TaskDetail(TaskSummary):
    items: list[Item]


class TaskPage(_Record):
    tasks: list[TaskSummary]
    next_cursor: str | None


class SubmitResponse(_Record):
    task_id: str
    status: TaskStatus
    total: int


class ErrorDetail(_Record):
    code: str
    message: str
    details: object | None = None


class ErrorBody(_Record):
    error: ErrorDetail


class SubmitRequest(BaseModel):
    """Body of POST /submit. Limits that depend on settings come in the validation context."""

    model_config = ConfigDict(extra="forbid")

    urls: Annotated[list[StrictStr], Field(min_length=1)]
    top_k: StrictInt | None = None
    model: StrictStr | None = None

    @field_validator("urls")
    @classmethod
    def _check_urls(cls, urls: list[str], info: ValidationInfo) -> list[str]:
        limits: SubmitLimits = info.context["limits"]
        if len(urls) > limits.max_urls:
            raise PydanticCustomError(
                "too_many_urls",
                "a task holds at most {max_urls} URLs, got {count}",
                {"max_urls": limits.max_urls, "count": len(urls)},
            )
        for position, url in enumerate(urls):
            problem = url_problem(url, limits.max_url_length)
            if problem:
                raise PydanticCustomError(
                    "invalid_url", "urls[{position}]: {problem}", {"position": position, "problem": problem}
                )
        return urls

    @field_validator("top_k")
    @classmethod
    def _check_top_k(cls, top_k: int | None, info: ValidationInfo) -> int | None:
        limits: SubmitLimits = info.context["limits"]
        if top_k is not None and not 1 <= top_k <= limits.max_top_k:
            raise PydanticCustomError(
                "top_k_out_of_range",
                "top_k must be between 1 and {max_top_k}",
                {"max_top_k": limits.max_top_k},
            )
        return top_k


class SubmitLimits(BaseModel):
    max_urls: int
    max_url_length: int
    max_top_k: int
