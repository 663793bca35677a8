"""The durable task registry: the in-memory registry, journaled to SQLite in the data dir
(`service.stores.sqlite.journal`) and restored from it at start-up.

Reads are served from memory, where every change happens first. What a client was promised
waits for its commit: a task is on disk before `POST /submit` answers 202, a cancel or delete
before it answers 200, and a final state before its webhook is sent. Tasks that were queued
or running when the service stopped are resumed by the task service.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from inference.specs import RunPrecision
from service.metrics import Metrics
from service.stores.memory.registry import InMemoryRegistry
from service.stores.sqlite.journal import RETRY_SECONDS, SqliteJournal, StoreError
from service.tasks.deliveries import Delivery
from service.tasks.idempotency import IdempotencyKey
from service.tasks.records import Priority, TaskDetail, TaskPage, TaskStatus
from service.tasks.registry import Admission, StoreUnavailable, decode_cursor, encode_cursor

log = logging.getLogger(__name__)


class SqliteRegistry(InMemoryRegistry):
    """The in-memory registry, journaled to SQLite and restored from it at start-up."""

    def __init__(
        self,
        journal: SqliteJournal,
        finished_ttl: float,
        max_finished: int,
        clock: Callable[[], float] = time.time,
        metrics: Metrics | None = None,
        idempotency_ttl: float = 86_400.0,
    ) -> None:
        super().__init__(finished_ttl, max_finished, clock, journal, metrics, idempotency_ttl)
        self._store = journal

    @classmethod
    async def open(
        cls,
        data_dir: Path,
        finished_ttl: float,
        max_finished: int,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
        idempotency_ttl: float = 86_400.0,
    ) -> SqliteRegistry:
        """The registry of `data_dir`, with everything it kept; raises StoreError."""
        journal = await SqliteJournal.open(data_dir, metrics)
        try:
            stored = await journal.load(finished_ttl, max_finished, idempotency_ttl, clock())
        except (sqlite3.Error, ValueError) as exc:
            await journal.close()
            raise StoreError(f"database {journal.path} cannot be read: {exc}") from None
        registry = cls(journal, finished_ttl, max_finished, clock, metrics, idempotency_ttl)
        registry.restore(stored.tasks, stored.submissions, stored.deliveries)
        active = sum(1 for task in stored.tasks if not task.status.is_final)
        log.info(
            "task store %s: %d tasks, %d to resume, %d webhooks to deliver",
            journal.path,
            len(stored.tasks),
            active,
            len(stored.deliveries),
        )
        return registry

    @property
    def journal(self) -> SqliteJournal:
        return self._store

    def healthy(self) -> bool:
        return self._store.healthy

    async def observe(self) -> None:
        if self._metrics is not None:
            self._metrics.store_pending.set(self._store.pending())
            self._metrics.store_bytes.set(self._store.size_bytes())

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
        task = await super().create(
            urls,
            model,
            top_k,
            owner,
            task_id,
            precision,
            callback_url=callback_url,
            idempotency=idempotency,
            priority=priority,
            admission=admission,
        )
        try:
            await self._store.flush()
        except StoreUnavailable:
            seq = self._drop(task.task_id)
            self._store.discard(seq)
            raise
        return task

    async def cancel(self, task_id: str, owner: str | None = None) -> TaskDetail | None:
        """Answered once the cancel is on disk; a task final already needs no write, so its
        answer comes even while the disk refuses writes."""
        record = self._owned(task_id, owner)
        was_final = record is not None and record.status.is_final
        task = await super().cancel(task_id, owner)
        if task is not None and not was_final:
            await self._store.flush()
        return task

    async def remove(self, task_id: str, owner: str | None = None) -> TaskDetail | None:
        task = await super().remove(task_id, owner)
        if task is not None:
            await self._store.flush()
        return task

    async def next_delivery(self) -> Delivery:
        """A webhook tells of a final state that is on disk: one told before a crash could
        otherwise describe a task that resumes after it."""
        delivery = await super().next_delivery()
        while True:
            try:
                await self._store.flush()
                return delivery
            except StoreUnavailable:
                await asyncio.sleep(RETRY_SECONDS)  # the journal logs it and keeps trying

    async def page(
        self,
        status: TaskStatus | None,
        limit: int,
        cursor: str | None,
        owner: str | None = None,
        priority: Priority | None = None,
    ) -> TaskPage:
        self._expire()
        before = decode_cursor(cursor) if cursor else None
        seqs = await self._store.page_seqs(owner, status, before, limit + 1, priority)
        summaries = [record.summary() for record in self._by_seq(seqs[:limit])]
        next_cursor = encode_cursor(seqs[limit - 1]) if len(seqs) > limit else None
        return TaskPage(tasks=summaries, next_cursor=next_cursor)

    async def shutdown(self) -> None:
        """Keep active tasks: they resume at the next start."""
        active = sum(1 for record in self._tasks.values() if not record.status.is_final)
        if active:
            log.info("%d active tasks are kept and resume at the next start", active)

    async def close(self) -> None:
        await self._store.close()
