"""The task journal on disk: SQLite in the data dir, written on one dedicated thread.

The in-memory registry tells the journal every change (`service.stores.memory.task_state.Journal`); the
journal queues them on the event loop and writes them in batches, one transaction at most
every `FLUSH_SECONDS`, so the hot path never waits for a commit; `flush()` is for what a
client must not be told before it is on disk. At start-up it checks the data dir (one
instance at a time, integrity, schema version), deletes what expired meanwhile and loads
the rest (rows back into tasks: `service.stores.sqlite.loader`; the schema and its upgrades:
`service.stores.sqlite.schema`). Freed pages go back to the file system (incremental vacuum).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import itertools
import json
import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TextIO, TypeVar

from service.metrics import Metrics
from service.stores.memory.task_state import TaskState
from service.stores.sqlite.loader import LABELS, Stored, give_back_space, load_stored, page_seqs
from service.stores.sqlite.schema import SCHEMA_VERSION, create, upgrade
from service.tasks.deliveries import Delivery
from service.tasks.idempotency import Submission
from service.tasks.records import ItemStatus, Priority, TaskStatus
from service.tasks.registry import StoreOpenError, StoreUnavailable

log = logging.getLogger(__name__)

DATABASE = "tasks.db"
LOCK = "lock"
FLUSH_SECONDS = 0.02  # results reach the database within this (plus the write itself)
RETRY_SECONDS = 1.0  # after a failed write, the next try
BUSY_SECONDS = 1.0  # how long a write waits for a lock held by another process before it fails
WAL_LIMIT_BYTES = 4 << 20  # the WAL file is truncated to this at each checkpoint
FULL_BYTES = 1 << 20  # a file system with less free is called full in error messages

T = TypeVar("T")


class StoreError(StoreOpenError):
    """The data dir cannot be used; the message is the one-line reason."""


Op = tuple[int, str, list[tuple[Any, ...]]]  # (task seq, SQL, rows for executemany)


class SqliteJournal:
    """The database: one connection on its own thread; changes queued on the event loop and
    written in batches, one transaction each."""

    def __init__(self, path: Path, lock: TextIO, metrics: Metrics) -> None:
        self.path = path
        self._lock = lock
        self._metrics = metrics
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
        self._connection: sqlite3.Connection | None = None
        self._pending: list[Op] = []
        self._writing = asyncio.Lock()
        self._timer: asyncio.TimerHandle | None = None
        self._background: set[asyncio.Task[None]] = set()
        self.healthy = True

    @classmethod
    async def open(cls, data_dir: Path, metrics: Metrics) -> SqliteJournal:
        """Raises StoreError when the data dir cannot be used."""
        lock = await asyncio.to_thread(_open_lock, data_dir)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip()
            lock.close()
            raise StoreError(f"data dir {data_dir} is in use by another running instance (pid {holder})") from None
        try:
            lock.seek(0)
            lock.truncate()
            lock.write(f"{os.getpid()}\n")
            lock.flush()
        except OSError as exc:  # a full disk, say
            with contextlib.suppress(OSError):  # closing flushes what could not be written: it fails again
                lock.close()
            raise StoreError(f"data dir {data_dir} is not usable: cannot write {data_dir / LOCK}: {why(exc)}") from None
        journal = cls(data_dir / DATABASE, lock, metrics)
        try:
            await journal._call(journal._connect)
        except BaseException:
            await journal.close()
            raise
        return journal

    def _connect(self) -> None:
        try:
            connection = sqlite3.connect(self.path)
            connection.execute(f"PRAGMA busy_timeout = {round(BUSY_SECONDS * 1000)}")
            version = connection.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"database {self.path} was written by a newer version of the service (schema {version}; this "
                    f"version reads schema {SCHEMA_VERSION})"
                )
            check = connection.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise StoreError(f"database {self.path} is corrupt: {check}")
            if version == 0:
                create(connection)
            elif version < SCHEMA_VERSION:
                upgrade(connection, version)
            if connection.execute("PRAGMA journal_mode = WAL").fetchone()[0] != "wal":
                raise StoreError(f"database {self.path}: cannot switch to WAL mode")
            connection.execute("PRAGMA synchronous = NORMAL")
            connection.execute(f"PRAGMA journal_size_limit = {WAL_LIMIT_BYTES}")  # the WAL is cut back to this
        except sqlite3.DatabaseError as exc:
            reason = f"{exc} ({exc.sqlite_errorname}){space_left(self.path.parent)}"
            raise StoreError(f"database {self.path} cannot be used: {reason}") from None
        self._connection = connection

    # --- changes, queued on the loop (see service.stores.memory.task_state.Journal) ---

    def created(self, task: TaskState) -> None:
        self._queue(
            task.seq,
            "INSERT INTO tasks (seq, task_id, owner, model, precision, priority, top_k, status, created_at, total, "
            "webhook) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    task.seq,
                    task.task_id,
                    task.owner,
                    task.model,
                    task.precision,
                    task.priority.value,
                    task.top_k,
                    task.status.value,
                    task.created_at.isoformat(),
                    task.total,
                    task.webhook.model_dump_json() if task.webhook else None,
                )
            ],
        )
        self._queue(
            task.seq,
            "INSERT INTO items (task_seq, idx, url, status) VALUES (?, ?, ?, ?)",
            [(task.seq, item.index, item.url, item.status.value) for item in task.items],
        )

    def started(self, task: TaskState) -> None:
        assert task.started_at is not None
        self._queue(
            task.seq,
            "UPDATE tasks SET status = ?, started_at = ? WHERE seq = ?",
            [(task.status.value, task.started_at.isoformat(), task.seq)],
        )

    def item_final(self, task: TaskState, index: int) -> None:
        item = task.items[index]
        labels = LABELS.dump_json(item.labels).decode() if item.labels is not None else None
        error = item.error.model_dump_json() if item.error is not None else None
        self._queue(
            task.seq,
            "UPDATE items SET status = ?, labels = ?, error = ?, done_order = ? WHERE task_seq = ? AND idx = ?",
            [(item.status.value, labels, error, len(task.completed) - 1, task.seq, index)],
        )

    def finished(self, task: TaskState) -> None:
        assert task.finished_at is not None
        self._queue(
            task.seq,
            "UPDATE tasks SET status = ?, started_at = ?, finished_at = ?, finished_epoch = ?, error = ?, "
            "succeeded = ?, failed = ?, cancelled = ?, completed = ?, snapshot = ? WHERE seq = ?",
            [
                (
                    task.status.value,
                    task.started_at.isoformat() if task.started_at else None,
                    task.finished_at.isoformat(),
                    task.finished_at.timestamp(),
                    task.error.model_dump_json() if task.error else None,
                    task.finals[ItemStatus.SUCCEEDED],
                    task.finals[ItemStatus.FAILED],
                    task.finals[ItemStatus.CANCELLED],
                    json.dumps(task.completed),
                    task.frozen,
                    task.seq,
                )
            ],
        )
        self._queue(task.seq, "DELETE FROM items WHERE task_seq = ?", [(task.seq,)])  # the snapshot has them

    def forgotten(self, task: TaskState) -> None:
        # Only final tasks are forgotten, and `finished` already deleted their item rows.
        self._queue(task.seq, "DELETE FROM tasks WHERE seq = ?", [(task.seq,)])

    def webhook_changed(self, task: TaskState) -> None:
        assert task.webhook is not None
        self._queue(
            task.seq,
            "UPDATE tasks SET webhook = ?, snapshot = ? WHERE seq = ?",
            [(task.webhook.model_dump_json(), task.frozen, task.seq)],
        )

    def delivery_saved(self, task: TaskState | None, delivery: Delivery) -> None:
        self._queue(
            task.seq if task else 0,
            "INSERT OR REPLACE INTO deliveries (delivery_id, task_id, url, body, finished_epoch, attempts, next_epoch) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    delivery.delivery_id,
                    delivery.task_id,
                    delivery.url,
                    delivery.body,
                    delivery.finished,
                    delivery.attempts,
                    delivery.next_attempt,
                )
            ],
        )

    def delivery_done(self, delivery: Delivery) -> None:
        self._queue(0, "DELETE FROM deliveries WHERE delivery_id = ?", [(delivery.delivery_id,)])

    def key_saved(self, task: TaskState, submission: Submission) -> None:
        self._queue(
            task.seq,
            "INSERT OR REPLACE INTO submissions (owner, key, fingerprint, task_id, total, created_epoch) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [
                (
                    submission.owner or "",
                    submission.key,
                    submission.fingerprint,
                    submission.task_id,
                    submission.total,
                    submission.created,
                )
            ],
        )

    def keys_forgotten(self, submissions: list[Submission]) -> None:
        self._queue(
            0,
            "DELETE FROM submissions WHERE owner = ? AND key = ? AND created_epoch = ?",
            [(submission.owner or "", submission.key, submission.created) for submission in submissions],
        )

    def discard(self, seq: int) -> None:
        """Drop the changes of a task not yet written (its creation could not be committed)."""
        self._pending = [op for op in self._pending if op[0] != seq]

    def pending(self) -> int:
        return len(self._pending)

    def _queue(self, seq: int, sql: str, rows: list[tuple[Any, ...]]) -> None:
        self._pending.append((seq, sql, rows))
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(FLUSH_SECONDS, self._flush_soon)

    def _flush_soon(self) -> None:
        self._timer = None
        task = asyncio.ensure_future(self._flush_quietly())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _flush_quietly(self) -> None:
        with contextlib.suppress(StoreUnavailable):  # logged, and tried again
            await self.flush()

    async def flush(self) -> None:
        """Write everything queued so far, in one transaction; raises StoreUnavailable if
        it could not be written (it stays queued and is tried again)."""
        async with self._writing:
            ops, self._pending = self._pending, []
            if not ops and self.healthy:
                return
            try:  # with nothing queued after a failure, an empty write tells whether it works again
                seconds = await self._call(self._write, ops)
            except sqlite3.Error as exc:
                self._pending[:0] = ops  # first in line for the next try, in order
                self._metrics.store_write_errors.inc()
                if self.healthy:
                    log.error("writing tasks to %s failed: %s; retrying every %gs", self.path, exc, RETRY_SECONDS)
                self.healthy = False
                if self._timer is None:
                    self._timer = asyncio.get_running_loop().call_later(RETRY_SECONDS, self._flush_soon)
                raise StoreUnavailable(f"the task store cannot write: {exc}") from None
            if not self.healthy:
                log.info("writing tasks to %s works again", self.path)
            self.healthy = True
            self._metrics.store_write_seconds.observe(seconds)

    def _write(self, ops: list[Op]) -> float:
        started = time.perf_counter()
        connection = self._db()
        with connection:  # one transaction: commit, or roll back on error
            connection.execute("BEGIN IMMEDIATE")  # take the write lock now, not at the first change
            # Consecutive changes of one kind (a batch of finished items) as one statement.
            for sql, group in itertools.groupby(ops, key=lambda op: op[1]):
                connection.executemany(sql, [row for _, _, rows in group for row in rows])
        if any(sql.startswith("DELETE") for _, sql, _ in ops):
            give_back_space(connection)
        return time.perf_counter() - started

    # --- reads, on the database thread ---

    async def page_seqs(
        self,
        owner: str | None,
        status: TaskStatus | None,
        before: int | None,
        limit: int,
        priority: Priority | None = None,
    ) -> list[int]:
        """Sequence numbers of one page of tasks, newest first (by the owner/status indexes)."""
        with contextlib.suppress(StoreUnavailable):  # reads go on while writes fail (statuses may lag)
            await self.flush()
        return await self._call(page_seqs, self._db(), owner, status, before, limit, priority)

    async def load(self, finished_ttl: float, max_finished: int, idempotency_ttl: float, now: float) -> Stored:
        """Delete what expired while the service was down; every other task (oldest first),
        idempotency key and webhook delivery."""
        return await self._call(load_stored, self._db(), finished_ttl, max_finished, idempotency_ttl, now)

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        try:
            await self.flush()
        except StoreUnavailable:
            log.error("%d task changes could not be written before shutdown", len(self._pending))
        finally:
            if self._connection is not None:
                await self._call(self._connection.close)
            await asyncio.to_thread(self._thread.shutdown)
            self._lock.close()  # releases the data dir

    def size_bytes(self) -> int:
        return sum(path.stat().st_size for path in (self.path, Path(f"{self.path}-wal")) if path.exists())

    def _db(self) -> sqlite3.Connection:
        if self._connection is None:
            raise RuntimeError("the database is not open")
        return self._connection

    async def _call(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, function, *args)


def _open_lock(data_dir: Path) -> TextIO:
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        return (data_dir / LOCK).open("a+")
    except OSError as exc:
        raise StoreError(f"data dir {data_dir} is not usable: {why(exc)}") from None


def space_left(directory: Path) -> str:
    """ "; no space left on its file system" when that is so (SQLite's errors do not say)."""
    with contextlib.suppress(OSError):
        if shutil.disk_usage(directory).free < FULL_BYTES:
            return "; no space left on its file system (ENOSPC)"
    return ""


def why(exc: OSError) -> str:
    """An OS error in a line: its text and errno name ("No space left on device (ENOSPC)")."""
    name = errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno is not None else ""
    return f"{exc.strerror or exc} ({name})" if name else str(exc.strerror or exc)
