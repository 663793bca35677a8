"""Downloaded images through Redis Streams: web replicas put, workers anywhere take batches.

One stream per model and priority (`<prefix>jobs:<model>` for interactive images, the name
streams had before priorities, and `<prefix>jobs:<model>:batch`); workers read the interactive
ones first, so a bulk job's backlog never stands in front of a one-photo task, and fill a short
interactive batch with batch images. One consumer group (`workers`) over each stream: an
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
import time
from collections import deque
from collections.abc import Iterable
from typing import Any, Protocol, cast

from redis.exceptions import ResponseError

from service.broker.fleet import HEARTBEAT_SECONDS, RedisFleet
from service.lifetimes import stop_tasks
from service.metrics import Metrics
from service.stores.redis.link import RedisLink, ensure_group, forget_idle_consumers, group_gone
from service.tasks.fleet import process_id
from service.tasks.queues import Backlog, QueuedImage
from service.tasks.records import ErrorInfo, ItemStatus, Priority
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
# An entry to add: its model and priority (which make its stream), its fields, told when added.
Add = tuple[tuple[str, Priority], Fields, asyncio.Future[None]]


def consumer_name() -> str:
    """This process's name in the consumer groups: a worker that dies leaves its entries
    under it, for others to claim (the same as its id in the fleet's heartbeats)."""
    return process_id()


def stream_of(prefix: str, model: str, priority: Priority = Priority.INTERACTIVE) -> str:
    name = f"{prefix}jobs:{model}"
    return name if priority is Priority.INTERACTIVE else f"{name}:{priority.value}"


class TaskOutcomes(Protocol):
    """What the workers' side needs of the task store (the Redis registry is one)."""

    async def final_tasks(self, task_ids: Iterable[str]) -> set[str]:
        """Those of `task_ids` whose tasks are final (or gone): their images are skipped."""
        ...

    async def update_items(self, changes: list[ItemChange]) -> list[bool]: ...


class StreamJobs:
    """The web side: `put` waits while the image's stream (its model's, of its priority)
    holds `capacity` images or more (backpressure reaches the downloads, then `POST /submit`
    through the 429 of `--max-active-images`). Images put at about the same time go in one
    round trip."""

    def __init__(self, link: RedisLink, prefix: str, capacity: int) -> None:
        self._link = link
        self._prefix = prefix
        self._capacity = capacity
        self._lengths: dict[tuple[str, Priority], int] = {}  # the last length seen, by model and priority
        self._adds: list[Add] = []
        self._adding: asyncio.Task[None] | None = None

    async def backlog(self, models: list[str]) -> list[Backlog]:
        """Fleet-wide, from Redis: each stream's entries (waiting, or held by a worker: an entry
        is deleted once its outcome is in), and the age of the oldest, from its id (the time
        Redis added it, in ms)."""
        which = [(model, priority) for model in models for priority in Priority]
        client = self._link.client

        async def ask() -> tuple[list[int], list[Any], int]:
            async with client.pipeline(transaction=False) as pipe:
                for model, priority in which:
                    pipe.xlen(stream_of(self._prefix, model, priority))
                for model, priority in which:
                    pipe.xrange(stream_of(self._prefix, model, priority), count=1)
                pipe.time()
                results = await pipe.execute()
            seconds, micros = results[-1]
            return results[: len(which)], results[len(which) : -1], int(seconds) * 1000 + int(micros) // 1000

        lengths, heads, now_ms = await self._link.fast(ask())
        backlog = []
        for (model, priority), length, head in zip(which, lengths, heads, strict=True):
            oldest = (now_ms - int(head[0][0].split(b"-")[0])) / 1000 if head else 0.0
            backlog.append(Backlog(model, priority, int(length), max(0.0, oldest)))
        return backlog

    async def put(self, job: QueuedImage) -> None:
        stream = stream_of(self._prefix, job.model, job.priority)
        which = (job.model, job.priority)
        while self._lengths.get(which, 0) >= self._capacity:
            self._lengths[which] = await self._link.patient(self._link.client.xlen, stream)
            if self._lengths[which] >= self._capacity:
                await asyncio.sleep(FULL_POLL)
        added: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fields: Fields = {
            "task": job.task_id,
            "index": job.index,
            "top_k": job.top_k,
            "data": job.data,
            "queued": repr(job.queued_at),
        }
        self._adds.append((which, fields, added))
        if self._adding is None or self._adding.done():
            self._adding = asyncio.create_task(self._add())
        await added

    async def drop_task(self, task_id: str) -> int:
        """Nothing to do here: workers skip the images of tasks that are final."""
        return 0

    async def close(self) -> None:
        if self._adding is not None:
            await stop_tasks([self._adding])

    async def _send(self, group: list[Add]) -> None:
        """One pipeline: the entries, then the lengths of the streams they went to."""
        streams = sorted({which for which, _, _ in group})
        async with self._link.client.pipeline(transaction=False) as pipe:
            for (model, priority), fields, _ in group:
                pipe.xadd(stream_of(self._prefix, model, priority), fields)  # type: ignore[arg-type]  # redis-py's type leaves out ints
            for model, priority in streams:
                pipe.xlen(stream_of(self._prefix, model, priority))
            results = await pipe.execute()
        for which, length in zip(streams, results[len(group) :], strict=True):
            self._lengths[which] = int(length)

    async def _add(self) -> None:
        """XADD what has been put, in order, one pipeline per turn of the event loop."""
        await asyncio.sleep(0)  # the other puts of this turn join
        while self._adds:
            group, self._adds = self._adds[:GROUP_ADDS], self._adds[GROUP_ADDS:]
            try:
                await self._link.patient(self._send, group)
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
        fleet: RedisFleet | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        """`fleet`: the workers' heartbeats, to claim at once what a gone worker held;
        `metrics`: where claims and images given up are counted."""
        self._link = link
        self._metrics = metrics
        self._fleet = fleet
        self._looked_at = 0.0  # when the heartbeats were last looked at
        self._prefix = prefix
        self._store = store
        # Every stream, interactive ones first (the order reads go in).
        self._streams = {
            stream_of(prefix, model, priority): (model, priority) for priority in Priority for model in models
        }
        self._urgent = [stream for stream, (_, priority) in self._streams.items() if priority is Priority.INTERACTIVE]
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
                if self._fleet is not None and time.monotonic() - self._looked_at >= HEARTBEAT_SECONDS:
                    self._looked_at = time.monotonic()
                    batch = await self._claim_from_gone(max_size) or await self._read(max_size, max_wait)
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
        by_stream: dict[str, list[bytes]] = {}
        for job in batch:
            by_stream.setdefault(stream_of(self._prefix, job.model, job.priority), []).append(job.receipt)
        if not by_stream:
            return
        client = self._link.client

        async def confirm() -> None:
            async with client.pipeline(transaction=True) as pipe:
                for stream, receipts in by_stream.items():
                    pipe.xack(stream, GROUP, *receipts)
                    pipe.xdel(stream, *receipts)
                await pipe.execute()

        await self._link.patient(confirm)
        for stream, receipts in by_stream.items():
            self._working[stream].difference_update(receipts)

    async def _read(self, max_size: int, max_wait: float) -> list[QueuedImage]:
        """New entries, interactive ones first: the first model's make the batch (topped up
        for `max_wait` if it is short, interactive images first); other models' wait in
        `_held`, behind interactive images that arrive meanwhile."""
        batches = await self._batches(dict.fromkeys(self._urgent, ">"), max_size, None)
        if not batches and self._held:
            return await self._skip_final(self._held.popleft())
        if not batches:
            batches = await self._batches(dict.fromkeys(self._streams, ">"), max_size, READ_BLOCK_MS)
        if not batches:
            return []
        first, rest = batches[0], batches[1:]
        if len(first) < max_size and max_wait > 0:
            await asyncio.sleep(max_wait)
            model = first[0].model
            for priority in Priority:
                if len(first) < max_size:
                    streams = {stream_of(self._prefix, model, priority): ">"}
                    for more in await self._batches(streams, max_size - len(first), None):
                        first += more
        self._held.extend(rest)
        return await self._skip_final(first)

    async def _batches(self, streams: dict[str, str], count: int, block: int | None) -> list[list[QueuedImage]]:
        """What XREADGROUP gives of `streams`, one list per stream, interactive ones first."""
        read = await self._xreadgroup(streams, count, block)
        batches = [jobs for stream, entries in read or [] if (jobs := self._jobs(stream, entries))]
        return sorted(batches, key=lambda jobs: list(Priority).index(jobs[0].priority))

    async def _xreadgroup(self, streams: dict[str, str], count: int, block: int | None) -> Any:
        client = self._link.client
        return await self._link.patient(client.xreadgroup, GROUP, self._consumer, streams, count, block)  # type: ignore[arg-type]

    def _jobs(self, stream: str | bytes, entries: Any) -> list[QueuedImage]:
        """Jobs from stream entries as XREADGROUP and XCLAIM give them: (id, fields) pairs."""
        name = stream.decode() if isinstance(stream, bytes) else stream
        model, priority = self._streams[name]
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
                    priority=priority,
                    queued_at=float(fields.get(b"queued", 0)),  # 0: put by a version before priorities
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
            batch = await self._take_over(stream, pending, self._claim_idle_ms, reason="idle")
            if batch:
                return batch
        return []

    async def _claim_from_gone(self, max_size: int) -> list[QueuedImage]:
        """Entries held by workers whose heartbeat expired (`service.broker.fleet`): claimed at
        once, not after `claim_idle`. The claim asks for a heartbeat's idle time, so of two
        workers claiming together one gets them, and the other takes none back from it."""
        assert self._fleet is not None
        gone = await self._link.patient(self._fleet.gone_ids) - {self._consumer}
        client = self._link.client
        for worker_id in sorted(gone):
            for stream in self._streams:
                pending = await self._link.patient(
                    client.xpending_range, stream, GROUP, min="-", max="+", count=max_size, consumername=worker_id
                )
                batch = await self._take_over(stream, pending, int(HEARTBEAT_SECONDS * 1000), reason="gone")
                if batch:
                    log.warning("took over %d images of worker %s: its heartbeat stopped", len(batch), worker_id)
                    return batch
        return []

    async def _take_over(self, stream: str, pending: Any, min_idle_ms: int, reason: str) -> list[QueuedImage]:
        """Claim `pending` entries (as XPENDING lists them) still idle `min_idle_ms`; those
        delivered `max_deliveries` times already fail; the rest are the next batch. `reason`:
        why they are claimed, for the metrics (gone, idle)."""
        if not pending:
            return []
        client = self._link.client
        deliveries = {cast(bytes, entry["message_id"]): int(entry["times_delivered"]) for entry in pending}
        claimed = await self._link.patient(client.xclaim, stream, GROUP, self._consumer, min_idle_ms, list(deliveries))
        jobs = self._jobs(stream, claimed)
        if not jobs:
            return []
        log.warning("claimed %d images that a worker took and never finished", len(jobs))
        if self._metrics is not None:
            self._metrics.claimed.labels(reason=reason).inc(len(jobs))
        given_up = [job for job in jobs if deliveries[job.receipt] >= self._max_deliveries]
        for job in given_up:
            log.error("task %s item %d: given up after %d deliveries", job.task_id, job.index, self._max_deliveries)
        if given_up:
            if self._metrics is not None:
                self._metrics.inference_failures.labels(code=WORKER_CRASHED.code).inc(len(given_up))
            await self._store.update_items(
                [ItemChange(job.task_id, job.index, ItemStatus.FAILED, error=WORKER_CRASHED) for job in given_up]
            )
            await self.finished(given_up)
        return await self._skip_final([job for job in jobs if job not in given_up])

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
