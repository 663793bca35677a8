"""Downloaded images through Redis Streams: web replicas put, workers anywhere take batches.

One stream per model (`<prefix>jobs:<model>`), one consumer group (`workers`) over each: an
entry goes to one worker, stays pending until that worker confirms it (XACK), and is then
deleted with its image bytes (XDEL). A worker renews what it holds while it works on it
(XCLAIM ... JUSTID, which resets the idle time without counting a delivery), so an entry
idle longer than `claim_idle` belongs to a worker that is gone: another claims it, and an
image delivered `max_deliveries` times without an outcome (it keeps killing its workers)
fails with `worker_crashed` instead of going round forever. Images of tasks that are final
by then (cancelled) are confirmed without classifying them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Iterable
from typing import Any, Protocol, cast

from redis.exceptions import ResponseError

from service.lifetimes import stop_tasks
from service.stores.redis.link import RedisLink, ensure_group, forget_idle_consumers, group_gone
from service.tasks.queues import QueuedImage
from service.tasks.records import ErrorInfo, ItemStatus
from service.tasks.registry import ItemChange

log = logging.getLogger(__name__)

GROUP = "workers"
FORGET_AFTER_CLAIMS = 10  # a consumer holding nothing is forgotten after this many claim periods idle
FULL_POLL = 0.05  # seconds between looks at a full queue
READ_BLOCK_MS = 1000  # a worker's wait for new entries, between looks for abandoned ones
GROUP_ADDS = 64  # images added by one pipeline at most
WORKER_CRASHED = ErrorInfo(
    code="worker_crashed", message="the image was handed to workers several times and none of them finished it"
)


Fields = dict[str, str | int | bytes]
Add = tuple[str, Fields, asyncio.Future[None]]  # an entry to add: its stream, its fields, told when added


def consumer_name() -> str:
    """This process's name in the consumer groups: a worker that dies leaves its entries
    under it, for others to claim."""
    return f"{socket.gethostname()}-{os.getpid()}"


def stream_of(prefix: str, model: str) -> str:
    return f"{prefix}jobs:{model}"


class TaskOutcomes(Protocol):
    """What the workers' side needs of the task store (the Redis registry is one)."""

    async def final_tasks(self, task_ids: Iterable[str]) -> set[str]:
        """Those of `task_ids` whose tasks are final (or gone): their images are skipped."""
        ...

    async def update_items(self, changes: list[ItemChange]) -> list[bool]: ...


class StreamJobs:
    """The web side: `put` waits while the model's stream holds `capacity` images or more
    (backpressure reaches the downloads, then `POST /submit` through the 429 of
    `--max-active-images`). Images put at about the same time go in one round trip."""

    def __init__(self, link: RedisLink, prefix: str, capacity: int) -> None:
        self._link = link
        self._prefix = prefix
        self._capacity = capacity
        self._length = 0  # the last length seen
        self._adds: list[Add] = []
        self._adding: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return self._length

    async def put(self, job: QueuedImage) -> None:
        stream = stream_of(self._prefix, job.model)
        while self._length >= self._capacity:
            self._length = await self._link.patient(self._link.client.xlen, stream)
            if self._length >= self._capacity:
                await asyncio.sleep(FULL_POLL)
        added: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fields: Fields = {"task": job.task_id, "index": job.index, "top_k": job.top_k, "data": job.data}
        self._adds.append((stream, fields, added))
        if self._adding is None or self._adding.done():
            self._adding = asyncio.create_task(self._add())
        await added

    async def drop_task(self, task_id: str) -> int:
        """Nothing to do here: workers skip the images of tasks that are final."""
        return 0

    async def close(self) -> None:
        if self._adding is not None:
            await stop_tasks([self._adding])

    async def _send(self, group: list[Add]) -> int:
        """One pipeline: the entries, then the length of the streams they went to (the longest)."""
        streams = sorted({stream for stream, _, _ in group})
        async with self._link.client.pipeline(transaction=False) as pipe:
            for stream, fields, _ in group:
                pipe.xadd(stream, fields)  # type: ignore[arg-type]  # redis-py's type leaves out ints
            for stream in streams:
                pipe.xlen(stream)
            results = await pipe.execute()
        return max(int(length) for length in results[len(group) :])

    async def _add(self) -> None:
        """XADD what has been put, in order, one pipeline per turn of the event loop."""
        await asyncio.sleep(0)  # the other puts of this turn join
        while self._adds:
            group, self._adds = self._adds[:GROUP_ADDS], self._adds[GROUP_ADDS:]
            try:
                self._length = await self._link.patient(self._send, group)
            except asyncio.CancelledError:  # closing: nothing more is added
                for _, _, added in [*group, *self._adds]:
                    added.cancel()
                self._adds = []
                raise
            except Exception as exc:  # a bug: these callers hear of it, the next group goes on
                for _, _, added in group:
                    if not added.done():
                        added.set_exception(exc)
                continue
            for _, _, added in group:
                if not added.done():
                    added.set_result(None)


class StreamBatches:
    """The worker side, shared by the consumers of one process (one Redis consumer name)."""

    def __init__(
        self,
        link: RedisLink,
        prefix: str,
        store: TaskOutcomes,
        models: list[str],
        consumer: str,
        claim_idle: float,
        max_deliveries: int,
    ) -> None:
        self._link = link
        self._prefix = prefix
        self._store = store
        self._streams = {stream_of(prefix, model): model for model in models}
        self._consumer = consumer
        self._claim_idle_ms = int(claim_idle * 1000)
        self._max_deliveries = max_deliveries
        self._held: deque[list[QueuedImage]] = deque()  # read along with a batch of another model
        self._working: dict[str, set[bytes]] = {stream: set() for stream in self._streams}
        self._claimed_at = 0.0
        self._renewing: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._ensure_groups()
        self._renewing = asyncio.create_task(self._renew())

    async def _ensure_groups(self) -> None:
        for stream in self._streams:
            await self._link.patient(ensure_group, self._link.client, stream, GROUP)

    async def close(self) -> None:
        if self._renewing is not None:
            self._renewing.cancel()
            await asyncio.gather(self._renewing, return_exceptions=True)

    async def next_batch(self, max_size: int, max_wait: float) -> list[QueuedImage]:
        while True:
            try:
                if self._held:
                    batch = await self._skip_final(self._held.popleft())
                elif time.monotonic() - self._claimed_at >= self._claim_idle_ms / 2000:
                    self._claimed_at = time.monotonic()
                    batch = await self._claim(max_size)
                else:
                    batch = await self._read(max_size, max_wait)
            except ResponseError as exc:
                if not group_gone(exc):
                    raise
                log.warning("the job streams' consumer group is gone (Redis lost its data?); making it again")
                await self._ensure_groups()
                continue
            if batch:
                return batch

    async def finished(self, batch: list[QueuedImage]) -> None:
        """Confirm the batch and delete its entries, image bytes and all."""
        if not batch:
            return
        stream = stream_of(self._prefix, batch[0].model)
        receipts = [job.receipt for job in batch]
        client = self._link.client

        async def confirm() -> None:
            async with client.pipeline(transaction=True) as pipe:
                pipe.xack(stream, GROUP, *receipts)
                pipe.xdel(stream, *receipts)
                await pipe.execute()

        await self._link.patient(confirm)
        self._working[stream].difference_update(receipts)

    async def _read(self, max_size: int, max_wait: float) -> list[QueuedImage]:
        """New entries: the first model's make the batch (topped up for `max_wait` if it is
        short); other models' wait in `_held`."""
        read = await self._xreadgroup(dict.fromkeys(self._streams, ">"), max_size, READ_BLOCK_MS)
        if not read:
            return []
        batches = [jobs for stream, entries in read if (jobs := self._jobs(stream, entries))]
        if not batches:
            return []
        first, rest = batches[0], batches[1:]
        if len(first) < max_size and max_wait > 0:
            await asyncio.sleep(max_wait)
            stream = stream_of(self._prefix, first[0].model)
            more = await self._xreadgroup({stream: ">"}, max_size - len(first), None)
            first += [job for _, entries in more or [] for job in self._jobs(stream, entries)]
        self._held.extend(rest)
        return await self._skip_final(first)

    async def _xreadgroup(self, streams: dict[str, str], count: int, block: int | None) -> Any:
        client = self._link.client
        return await self._link.patient(client.xreadgroup, GROUP, self._consumer, streams, count, block)  # type: ignore[arg-type]

    def _jobs(self, stream: str | bytes, entries: Any) -> list[QueuedImage]:
        """Jobs from stream entries as XREADGROUP and XCLAIM give them: (id, fields) pairs."""
        name = stream.decode() if isinstance(stream, bytes) else stream
        model = self._streams[name]
        jobs = []
        for entry_id, fields in entries:
            if b"data" not in fields:  # deleted while it was pending (Redis 7 no longer hands those out)
                continue
            self._working[name].add(entry_id)
            jobs.append(
                QueuedImage(
                    task_id=fields[b"task"].decode(),
                    index=int(fields[b"index"]),
                    model=model,
                    top_k=int(fields[b"top_k"]),
                    data=fields[b"data"],
                    receipt=entry_id,
                )
            )
        return jobs

    async def _skip_final(self, batch: list[QueuedImage]) -> list[QueuedImage]:
        """Confirm at once the images of tasks that are final (cancelled, say)."""
        final = await self._store.final_tasks(job.task_id for job in batch)
        if final:
            skipped = [job for job in batch if job.task_id in final]
            await self.finished(skipped)
            batch = [job for job in batch if job.task_id not in final]
        return batch

    async def _claim(self, max_size: int) -> list[QueuedImage]:
        """Entries a gone worker held longer than `claim_idle`: the next batch, but those
        delivered `max_deliveries` times already fail. Idle consumers that hold nothing are forgotten."""
        client = self._link.client
        for stream in self._streams:
            forgotten = await self._link.patient(
                forget_idle_consumers, client, stream, GROUP, FORGET_AFTER_CLAIMS * self._claim_idle_ms / 1000
            )
            if forgotten:
                log.info("forgot the consumers %s of %s: idle, holding nothing", ", ".join(forgotten), stream)
            pending = await self._link.patient(
                client.xpending_range, stream, GROUP, min="-", max="+", count=max_size, idle=self._claim_idle_ms
            )
            if not pending:
                continue
            deliveries = {cast(bytes, entry["message_id"]): int(entry["times_delivered"]) for entry in pending}
            claimed = await self._link.patient(
                client.xclaim, stream, GROUP, self._consumer, self._claim_idle_ms, list(deliveries)
            )
            jobs = self._jobs(stream, claimed)
            log.warning("claimed %d images that a worker took and never finished", len(jobs))
            given_up = [job for job in jobs if deliveries[job.receipt] >= self._max_deliveries]
            for job in given_up:
                log.error("task %s item %d: given up after %d deliveries", job.task_id, job.index, self._max_deliveries)
            if given_up:
                await self._store.update_items(
                    [ItemChange(job.task_id, job.index, ItemStatus.FAILED, error=WORKER_CRASHED) for job in given_up]
                )
                await self.finished(given_up)
            batch = await self._skip_final([job for job in jobs if job not in given_up])
            if batch:
                return batch
        return []

    async def _renew(self) -> None:
        """Keep what this process holds from looking abandoned: reset its idle time three
        times per `claim_idle`."""
        client = self._link.client
        while True:
            await asyncio.sleep(self._claim_idle_ms / 3000)
            for stream, receipts in self._working.items():
                if not receipts:
                    continue
                try:
                    await self._link.patient(
                        client.xclaim, stream, GROUP, self._consumer, 0, list(receipts), justid=True
                    )
                except Exception:  # a bug here must not end the renewals
                    log.exception("renewing %d entries of %s failed", len(receipts), stream)
