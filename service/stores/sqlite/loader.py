"""Reading the task database back: one page of a listing, and at start-up every task,
idempotency key and webhook delivery.

Both run on the journal's database thread (`service.stores.sqlite.journal.SqliteJournal`), which
also writes; these functions only turn rows into what the registry holds.
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import TypeAdapter

from service.stores.memory.task_state import TaskState
from service.tasks.deliveries import Delivery
from service.tasks.idempotency import Submission
from service.tasks.records import ErrorInfo, Item, ItemStatus, Label, Priority, TaskStatus, Webhook

LABELS = TypeAdapter(list[Label])  # how an item's labels are stored (JSON)


def page_seqs(
    connection: sqlite3.Connection,
    owner: str | None,
    status: TaskStatus | None,
    before: int | None,
    limit: int,
    priority: Priority | None = None,
) -> list[int]:
    sql, args = page_query(owner, status, before, limit, priority)
    return [row[0] for row in connection.execute(sql, args)]


def page_query(
    owner: str | None, status: TaskStatus | None, before: int | None, limit: int, priority: Priority | None = None
) -> tuple[str, tuple[Any, ...]]:
    """The SQL for one page: an index range scan on (owner, [status,] seq), newest first (the
    priority, if asked for, filters the rows the scan meets)."""
    conditions: list[str] = ["owner IS ?"]
    args: list[object] = [owner]
    if status is not None:
        conditions.append("status = ?")
        args.append(status.value)
    if priority is not None:
        conditions.append("priority = ?")
        args.append(priority.value)
    if before is not None:
        conditions.append("seq < ?")
        args.append(before)
    where = " AND ".join(conditions)
    return f"SELECT seq FROM tasks WHERE {where} ORDER BY seq DESC LIMIT ?", (*args, limit)


@dataclass(frozen=True)
class Stored:
    tasks: list[TaskState]  # oldest first
    submissions: list[Submission]
    deliveries: list[Delivery]


def load_stored(
    connection: sqlite3.Connection, finished_ttl: float, max_finished: int, idempotency_ttl: float, now: float
) -> Stored:
    tasks = load_tasks(connection, finished_ttl, max_finished, now)
    with connection:
        connection.execute("DELETE FROM submissions WHERE created_epoch <= ?", (now - idempotency_ttl,))
    give_back_space(connection)
    submissions = [
        Submission(owner or None, key, fingerprint, task_id, total, created)
        for owner, key, fingerprint, task_id, total, created in connection.execute(
            "SELECT owner, key, fingerprint, task_id, total, created_epoch FROM submissions ORDER BY created_epoch"
        )
    ]
    deliveries = [
        Delivery(delivery_id, task_id, url, bytes(body), finished, attempts, next_attempt)
        for delivery_id, task_id, url, body, finished, attempts, next_attempt in connection.execute(
            "SELECT delivery_id, task_id, url, body, finished_epoch, attempts, next_epoch FROM deliveries "
            "ORDER BY next_epoch"
        )
    ]
    return Stored(tasks, submissions, deliveries)


def give_back_space(connection: sqlite3.Connection) -> None:
    """Return every free page to the file system (the database is `auto_vacuum = INCREMENTAL`).
    `executescript` runs the pragma to its end: `execute` steps it
    once, which frees one page. The file shrinks at the next checkpoint, which comes at once
    and truncates the WAL the moved pages went through."""
    free = int(connection.execute("PRAGMA freelist_count").fetchone()[0])
    if free:
        connection.executescript("PRAGMA incremental_vacuum;")
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()


def load_tasks(connection: sqlite3.Connection, finished_ttl: float, max_finished: int, now: float) -> list[TaskState]:
    with connection:
        connection.execute("DELETE FROM tasks WHERE finished_epoch <= ?", (now - finished_ttl,))
        connection.execute(
            "DELETE FROM tasks WHERE seq IN (SELECT seq FROM tasks WHERE finished_epoch IS NOT NULL "
            "ORDER BY finished_epoch DESC LIMIT -1 OFFSET ?)",
            (max_finished,),
        )
        connection.execute("DELETE FROM items WHERE task_seq NOT IN (SELECT seq FROM tasks)")
    items: dict[int, list[Item]] = {}
    orders: dict[int, list[tuple[int, int]]] = {}
    for seq, index, url, status, labels, error, done_order in connection.execute(
        "SELECT task_seq, idx, url, status, labels, error, done_order FROM items ORDER BY task_seq, idx"
    ):
        items.setdefault(seq, []).append(
            Item(
                index=index,
                url=url,
                status=ItemStatus(status),
                labels=LABELS.validate_json(labels) if labels else None,
                error=ErrorInfo.model_validate_json(error) if error else None,
            )
        )
        if done_order is not None:
            orders.setdefault(seq, []).append((done_order, index))
    tasks = []
    for row in connection.execute(
        "SELECT seq, task_id, owner, model, precision, priority, top_k, status, created_at, started_at, finished_at, "
        "error, total, succeeded, failed, cancelled, completed, snapshot, webhook FROM tasks ORDER BY seq"
    ):
        tasks.append(_task_state(row, items.get(row[0], []), [index for _, index in sorted(orders.get(row[0], []))]))
    return tasks


def _task_state(row: Sequence[Any], items: list[Item], completed: list[int]) -> TaskState:
    (
        seq,
        task_id,
        owner,
        model,
        precision,
        priority,
        top_k,
        status,
        created_at,
        started_at,
        finished_at,
        error,
        total,
        succeeded,
        failed,
        cancelled,
        completed_json,
        snapshot,
        webhook,
    ) = row
    state = TaskState(
        seq=seq,
        task_id=task_id,
        model=model,
        precision=precision,
        priority=Priority(priority),
        top_k=top_k,
        items=items,
        owner=owner,
        created_at=datetime.fromisoformat(created_at),
        started_at=datetime.fromisoformat(started_at) if started_at else None,
        finished_at=datetime.fromisoformat(finished_at) if finished_at else None,
        status=TaskStatus(status),
        error=ErrorInfo.model_validate_json(error) if error else None,
        webhook=Webhook.model_validate_json(webhook) if webhook else None,
        total=total,
    )
    if state.status.is_final:
        state.items = []
        state.frozen = bytes(snapshot)
        state.completed = json.loads(completed_json)
        state.finals = Counter(
            {ItemStatus.SUCCEEDED: succeeded, ItemStatus.FAILED: failed, ItemStatus.CANCELLED: cancelled}
        )
    else:
        state.completed = completed
        state.finals = Counter(item.status for item in items if item.status.is_final)
    return state
