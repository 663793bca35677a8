"""A completion webhook waiting to be delivered: made by the registry in the same step that
makes its task final (a durable registry writes both in one transaction), tried by
`service.webhooks.sender` until it is delivered or given up."""

from __future__ import annotations

from dataclasses import dataclass

from service.tasks.records import TaskSummary


@dataclass(frozen=True)
class Delivery:
    delivery_id: str  # the same on every attempt: receivers drop a delivery they already have
    task_id: str
    url: str
    body: bytes  # the exact bytes signed and sent, the same on every attempt
    finished: float  # epoch seconds the task ended: retries stop `--webhook-retry-for` after it
    attempts: int = 0
    next_attempt: float = 0.0  # epoch seconds


def payload(summary: TaskSummary) -> bytes:
    """The body of a task's completion webhook: its summary as `GET /tasks` lists it, without
    the `webhook` field, which this very delivery is about to change."""
    return summary.model_dump_json(exclude={"webhook"}).encode()
