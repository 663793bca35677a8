"""Task records to and from what Redis holds (see `service.stores.redis.scripts` for the keys):
a summary from its hash, an item's JSON after its URL, idempotency keys, stream entries.
The client never decodes replies: values are bytes."""

from __future__ import annotations

import json
from typing import Any

from service.tasks.idempotency import Submission
from service.tasks.records import ErrorInfo, Item, ItemStatus, Label, TaskSummary


def item_tail(status: ItemStatus, labels: list[Label] | None, error: ErrorInfo | None) -> str:
    """An item's JSON after its URL (the scripts put the URL before it), made by pydantic;
    raises if the labels or the error cannot be serialised, before anything changes."""
    text = Item(index=0, url="", status=status, labels=labels, error=error).model_dump_json()
    head = '{"index":0,"url":""'
    assert text.startswith(head)
    return text[len(head) :]


def summary_of(task_id: str, fields: dict[bytes, bytes]) -> TaskSummary:
    """The summary of a task from its hash."""

    def text(name: str) -> str | None:
        raw = fields.get(name.encode())
        return None if raw is None else raw.decode()

    counts = {status: int(fields.get(status.value.encode(), 0)) for status in ItemStatus if status.is_final}
    error = text("error")
    webhook = text("webhook")
    callback = text("callback")
    return TaskSummary.model_validate(
        {
            "task_id": task_id,
            "status": text("status"),
            "model": text("model"),
            "precision": text("precision"),
            "priority": text("priority") or "interactive",  # tasks made before priorities were
            "top_k": int(fields[b"top_k"]),
            "created_at": text("created_at"),
            "started_at": text("started_at"),
            "finished_at": text("finished_at"),
            "progress": {
                "total": int(fields[b"total"]),
                "done": sum(counts.values()),
                "succeeded": counts[ItemStatus.SUCCEEDED],
                "failed": counts[ItemStatus.FAILED],
                "cancelled": counts[ItemStatus.CANCELLED],
            },
            "error": json.loads(error) if error else None,
            "webhook": json.loads(webhook) if webhook else ({"url": callback} if callback else None),
        }
    )


def owner_of(fields: dict[bytes, bytes]) -> str | None:
    """The owner (an API key's hash) in a task's hash; None without API keys."""
    raw = fields.get(b"owner")
    return None if raw is None else raw.decode()


def idempotency_name(owner: str | None, key: str) -> str:
    return json.dumps([owner, key])


def submission_json(owner: str | None, key: str, fingerprint: str, task_id: str, total: int, created: float) -> str:
    return json.dumps([owner, key, fingerprint, task_id, total, created])


def submission_of(raw: bytes) -> Submission:
    owner, key, fingerprint, task_id, total, created = json.loads(raw)
    return Submission(owner, key, fingerprint, task_id, total, created)


def as_bytes(value: object) -> bytes:
    """A reply as the client gives it (it never decodes; redis-py's types allow for both)."""
    assert isinstance(value, bytes), value
    return value


def entries_of(raw: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """Stream entries, as XREADGROUP and XCLAIM give them: (id, fields) pairs."""
    return [(entry_id, fields) for entry_id, fields in raw]
