"""The workers that classify, as operators see them (`GET /workers`, `ics_workers{state}`).

A worker is one inference pool: a `run_worker.py` process with its inference processes, or a
service's own pool. `WorkerStats` is what its consumers count as they go; with Redis the
entries of the other workers come from their heartbeats (`service.broker.fleet`).
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum

from service.tasks.records import Record


class WorkerState(StrEnum):
    UP = "up"  # its heartbeat is fresh (or it is this process's own pool)
    GONE = "gone"  # it missed its heartbeats: killed, frozen, or cut off from Redis


class WorkerEntry(Record):
    id: str  # host-pid: its consumer name in the job streams
    host: str
    pid: int
    state: WorkerState
    models: list[str]
    runtime: str
    precision: str  # of the default model
    processes: int  # inference processes
    batches: int  # batches classified since it started
    images: int
    last_batch_at: datetime | None
    started_at: datetime
    last_seen: datetime

    @classmethod
    def gone(cls, worker_id: str, last_seen: datetime) -> WorkerEntry:
        """A worker whose heartbeat expired: what it said is no longer kept, only when it said it."""
        host, pid = host_and_pid(worker_id)
        return cls(
            id=worker_id,
            host=host,
            pid=pid,
            state=WorkerState.GONE,
            models=[],
            runtime="",
            precision="",
            processes=0,
            batches=0,
            images=0,
            last_batch_at=None,
            started_at=last_seen,
            last_seen=last_seen,
        )


@dataclass
class WorkerStats:
    """Counted by a worker's consumers, one batch at a time."""

    batches: int = 0
    images: int = 0
    last_batch_at: float | None = None  # epoch seconds

    def batch_done(self, images: int) -> None:
        self.batches += 1
        self.images += images
        self.last_batch_at = time.time()


def process_id() -> str:
    """This process's name in the fleet and in the job streams' consumer groups (host-pid)."""
    return f"{socket.gethostname()}-{os.getpid()}"


def host_and_pid(worker_id: str) -> tuple[str, int]:
    """What a `process_id` is made of (pid 0 for a name that is not one)."""
    host, _, pid = worker_id.rpartition("-")
    return host, int(pid) if pid.isdigit() else 0


@dataclass(frozen=True)
class WorkerIdentity:
    """What a worker is, from its start to its end."""

    models: list[str]
    runtime: str
    precision: str
    processes: int
    id: str = field(default_factory=process_id)
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def entry(self, stats: WorkerStats) -> WorkerEntry:
        """It, as it is now: up, with what it has done."""
        host, pid = host_and_pid(self.id)
        last = stats.last_batch_at
        return WorkerEntry(
            id=self.id,
            host=host,
            pid=pid,
            state=WorkerState.UP,
            models=self.models,
            runtime=self.runtime,
            precision=self.precision,
            processes=self.processes,
            batches=stats.batches,
            images=stats.images,
            last_batch_at=None if last is None else datetime.fromtimestamp(last, UTC),
            started_at=self.started_at,
            last_seen=datetime.now(UTC),
        )
