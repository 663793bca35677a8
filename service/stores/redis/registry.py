"""The Redis task registry: tasks shared by every web replica and worker of one deployment.

Each change is one Lua script (`service.stores.redis.scripts`), so it is atomic whoever makes
it, and final states stay sticky: a result that arrives after a cancel, from any worker, is
refused. Watchers wait on the `changed` channel (and look again every second, so a message
lost while Redis was away costs at most that).

Replicas hold their tasks under a lease: each renews its key `replica:<id>` every few seconds;
a task whose replica's key has expired is adopted by another replica (`active`), which
downloads what was not downloaded yet. Requests fail fast with `StoreUnavailable` (503) while
Redis is unreachable; the work in the background (results, status changes) waits for it to
come back and goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any, cast

import pydantic_core
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from inference.specs import RunPrecision
from service.lifetimes import stop_tasks
from service.metrics import Metrics
from service.stores.redis import scripts as redis_scripts
from service.stores.redis.codec import (
    as_bytes,
    idempotency_name,
    item_tail,
    owner_of,
    submission_json,
    submission_of,
    summary_of,
)
from service.stores.redis.link import UNREACHABLE, RedisLink, RedisUnreachable, safe_url
from service.stores.redis.outbox import RedisOutbox
from service.tasks.deliveries import Delivery
from service.tasks.idempotency import IdempotencyKey, Submission, SubmissionExists
from service.tasks.records import (
    ErrorInfo,
    Item,
    ItemStatus,
    Label,
    Priority,
    Progress,
    TaskDetail,
    TaskPage,
    TaskStatus,
    TaskSummary,
    Webhook,
    utcnow,
)
from service.tasks.registry import Admission, ItemChange, NoRoom, TaskUpdate, decode_cursor, encode_cursor

log = logging.getLogger(__name__)

LOOK_AGAIN = 1.0  # seconds a watcher waits for a message before it looks for itself
GROUP_WRITES = 64  # calls of update_items applied by one script call at most
ITEM_ARGS = 7  # UPDATE_ITEMS's arguments per item
OUTCOMES_LEASES = 3  # a gone replica's outcome counts outlive its lease by this many times


class RedisRegistry:
    """The registry in Redis; `open` it, `close` it. `replica` names this process's lease."""

    def __init__(
        self,
        link: RedisLink,
        prefix: str,
        finished_ttl: float,
        max_finished: int,
        lease: float = 10.0,
        clock: Callable[[], float] = time.time,
        idempotency_ttl: float = 86_400.0,
        metrics: Metrics | None = None,
        max_keys: int = 100_000,
    ) -> None:
        self.link = link
        self.patient = link.patient  # background work waits for Redis; requests use `link.fast`
        self.prefix = prefix
        self.replica = uuid.uuid4().hex
        self.lease = lease
        self._finished_ttl = finished_ttl
        self._max_finished = max_finished
        self._clock = clock
        self._idempotency_ttl = idempotency_ttl
        self._max_keys = max_keys  # idempotency keys kept at most
        self._metrics = metrics  # ics_images_total of the tasks this replica runs (`observe`)
        self._expired_at = 0.0
        self._events: dict[str, asyncio.Event] = {}
        self._outbox = RedisOutbox(link, prefix, self.replica, abandoned_after=3 * lease)
        self._background: list[asyncio.Task[None]] = []
        self._writes: list[tuple[list[str | int | float], asyncio.Future[list[bool]]]] = []  # item changes
        self._writing: asyncio.Task[None] | None = None
        self._scripts = {
            name: link.client.register_script(getattr(redis_scripts, name))
            for name in ("CREATE", "UPDATE_ITEMS", "CLOSE", "FORGET", "EXPIRE", "RENEW", "ADOPT")
        }

    @classmethod
    async def open(
        cls,
        url: str,
        finished_ttl: float,
        max_finished: int,
        *,
        prefix: str = "ics:",
        lease: float = 10.0,
        clock: Callable[[], float] = time.time,
        idempotency_ttl: float = 86_400.0,
        metrics: Metrics | None = None,
        max_keys: int = 100_000,
        watch: bool = True,
    ) -> RedisRegistry:
        """Connect, take the lease and start listening for changes (`watch`: a worker that
        only writes results needs neither); raises RedisUnreachable."""
        link = await RedisLink.open(url)
        registry = cls(link, prefix, finished_ttl, max_finished, lease, clock, idempotency_ttl, metrics, max_keys)
        try:
            await registry._renew()
        except (RedisError, OSError) as exc:
            await link.close()
            raise RedisUnreachable(f"cannot reach Redis at {safe_url(url)}: {exc}") from None
        if watch:
            registry._background = [
                asyncio.create_task(registry._listen()),
                asyncio.create_task(registry._keep_lease()),
            ]
        return registry

    async def close(self) -> None:
        """Stop listening and give up the lease at once: another replica adopts what is left."""
        await stop_tasks([*self._background, *([self._writing] if self._writing is not None else [])])
        with contextlib.suppress(RedisError, OSError):  # else it expires by itself
            await self.client.delete(self._key("replica:", self.replica), self._key("outcomes:", self.replica))
        await self.link.close()

    def healthy(self) -> bool:
        return self.link.healthy()

    async def check(self) -> bool:
        """Ask Redis now (readiness probes do)."""
        return await self.link.check()

    async def observe(self) -> None:
        """The outcomes of the images of the tasks this replica runs, whoever classified them
        (the scripts count them in Redis as they become final): summed over the replicas, every
        image once."""
        if self._metrics is None:
            return
        counts = await self.link.fast(self.client.hgetall(self._key("outcomes:", self.replica)))
        totals = {}
        for field, count in counts.items():
            outcome, _, code = as_bytes(field).decode().partition("|")
            totals[outcome, code] = int(count)
        self._metrics.images_final_totals(totals)

    @property
    def client(self) -> aioredis.Redis:
        return self.link.client

    @property
    def adopt_every(self) -> float:
        """Seconds between looks for tasks whose replica is gone (see `TaskEngine`)."""
        return self.lease / 2

    # -- requests: they fail fast while Redis is away --

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
        task_id = task_id or uuid.uuid4().hex
        items = [Item(index=index, url=url) for index, url in enumerate(urls)]  # refuses what JSON cannot carry
        created = utcnow()
        key = submission = ""
        if idempotency is not None:
            key = idempotency_name(owner, idempotency.key)
            submission = submission_json(
                owner, idempotency.key, idempotency.fingerprint, task_id, len(urls), self._clock()
            )
        await self._maybe_expire(always=True)
        result = await self.link.fast(
            self._scripts["CREATE"](
                args=[
                    self.prefix,
                    task_id,
                    model,
                    precision,
                    top_k,
                    owner or "",
                    created.isoformat(),
                    self.replica,
                    callback_url or "",
                    key,
                    submission,
                    int(self._idempotency_ttl * 1000),
                    self._max_keys,
                    priority.value,
                    "" if admission is None else admission.max_images,
                    ""
                    if admission is None or admission.max_images_per_owner is None
                    else admission.max_images_per_owner,
                    *(pydantic_core.to_json(item.url) for item in items),
                ]
            )
        )
        if result[0] == 0:  # another replica took the key a moment ago
            raise SubmissionExists(submission_of(result[1]))
        if result[0] < 0:
            assert admission is not None
            if result[0] == -1:
                raise NoRoom("service", int(result[1]), admission.max_images)
            assert admission.max_images_per_owner is not None
            raise NoRoom("owner", int(result[1]), admission.max_images_per_owner)
        summary = TaskSummary(
            task_id=task_id,
            status=TaskStatus.QUEUED,
            model=model,
            precision=precision,
            priority=priority,
            top_k=top_k,
            created_at=created,
            started_at=None,
            finished_at=None,
            progress=Progress(total=len(urls), done=0, succeeded=0, failed=0, cancelled=0),
            webhook=Webhook(url=callback_url) if callback_url else None,
        )
        log.info(
            "task %s created: %d images, model %s",
            task_id,
            len(urls),
            model,
            extra={"task_id": task_id, "owner": owner},
        )
        return TaskDetail(**dict(summary), items=items)

    async def find_submission(self, owner: str | None, key: str) -> Submission | None:
        stored = await self.link.fast(self.client.get(self._key("idem:", idempotency_name(owner, key))))
        return None if stored is None else submission_of(as_bytes(stored))

    async def get(self, task_id: str, owner: str | None = None) -> TaskDetail | None:
        data = await self.get_json(task_id, owner)
        return None if data is None else TaskDetail.model_validate_json(data)

    async def get_json(self, task_id: str, owner: str | None = None) -> bytes | None:
        await self._maybe_expire()
        return await self.link.fast(self._detail_json(task_id, owner))

    async def page(
        self,
        status: TaskStatus | None,
        limit: int,
        cursor: str | None,
        owner: str | None = None,
        priority: Priority | None = None,
    ) -> TaskPage:
        before = decode_cursor(cursor) if cursor else None
        await self._maybe_expire(always=True)
        return await self.link.fast(self._page(status, priority, limit, before, owner))

    async def cancel(self, task_id: str, owner: str | None = None) -> TaskDetail | None:
        changed = await self.link.fast(
            self._close(task_id, ItemStatus.CANCELLED, TaskStatus.CANCELLED, None, owner or "-")
        )
        return None if changed < 0 else await self.get(task_id, owner)

    async def remove(self, task_id: str, owner: str | None = None) -> TaskDetail | None:
        snapshot = await self.cancel(task_id, owner)
        if snapshot is not None:
            await self.link.fast(self._scripts["FORGET"](args=[self.prefix, task_id]))
        return snapshot

    async def status_counts(self) -> dict[TaskStatus, int]:
        await self._maybe_expire(always=True)
        counts = await self.link.fast(self.client.hgetall(self._key("counts")))
        return {status: int(counts.get(status.value.encode(), 0)) for status in TaskStatus}

    async def unfinished_images(self) -> int:
        return int(await self.link.fast(self.client.get(self._key("unfinished"))) or 0)

    # -- the work: it waits for Redis to come back --

    async def update_item(
        self,
        task_id: str,
        index: int,
        status: ItemStatus,
        labels: list[Label] | None = None,
        error: ErrorInfo | None = None,
    ) -> bool:
        return (await self.update_items([ItemChange(task_id, index, status, labels, error)]))[0]

    async def update_items(self, changes: list[ItemChange]) -> list[bool]:
        """Changes asked for at about the same time (the downloads of many tasks, a batch's
        outcomes) go to Redis together: one script call per turn of the event loop, as a
        database commits a group. A change that cannot be serialised raises here, alone."""
        args: list[str | int | float] = []
        for change in changes:
            tail = item_tail(change.status, change.labels, change.error) if change.status.is_final else ""
            code = change.error.code if change.error is not None else ""
            args += [change.task_id, change.index, change.status.value, int(change.status.is_final), tail, code]
            args.append(uuid.uuid4().hex)  # the id of the webhook delivery, if this change completes the task
        applied: asyncio.Future[list[bool]] = asyncio.get_running_loop().create_future()
        self._writes.append((args, applied))
        if self._writing is None or self._writing.done():
            self._writing = asyncio.create_task(self._write())
        return await applied

    async def _write(self) -> None:
        """Apply the queued item changes, as many as have come, in order, until none is left."""
        await asyncio.sleep(0)  # the other calls of this turn join the group
        while self._writes:
            group, self._writes = self._writes[:GROUP_WRITES], self._writes[GROUP_WRITES:]
            args = [self.prefix, utcnow().isoformat(), self._clock(), *(arg for part, _ in group for arg in part)]
            try:
                results = [bool(result) for result in await self.patient(self._scripts["UPDATE_ITEMS"], args=args)]
            except asyncio.CancelledError:  # the registry closes: nothing more is written
                for _, applied in [*group, *self._writes]:
                    applied.cancel()
                self._writes = []
                raise
            except Exception as exc:  # a bug: these callers hear of it, the next group goes on
                for _, applied in group:
                    if not applied.done():
                        applied.set_exception(exc)
                continue
            for part, applied in group:
                count = len(part) // ITEM_ARGS
                if not applied.done():  # its caller may have been cancelled meanwhile
                    applied.set_result(results[:count])
                results = results[count:]

    async def fail(self, task_id: str, error: ErrorInfo) -> bool:
        return await self.patient(self._close, task_id, ItemStatus.FAILED, TaskStatus.FAILED, error) > 0

    async def final_tasks(self, task_ids: Iterable[str]) -> set[str]:
        """Which of `task_ids` are final or gone (their queued images need no model)."""
        ids = list(set(task_ids))

        async def statuses() -> list[Any]:
            async with self.client.pipeline(transaction=False) as pipe:
                for task_id in ids:
                    pipe.hget(self._key("task:", task_id), "status")
                return list(await pipe.execute())

        found = await self.patient(statuses)
        return {
            task_id
            for task_id, status in zip(ids, found, strict=True)
            if status is None or TaskStatus(status.decode()).is_final
        }

    async def follow(
        self,
        task_id: str,
        seen: int | None,
        owner: str | None = None,
        wait: bool = True,
        status: TaskStatus | None = None,
    ) -> TaskUpdate | None:
        if not wait:  # one look, on a request's behalf: it fails fast while Redis is away
            return await self.link.fast(self._update(task_id, seen, owner))
        while True:
            changed = self._watch(task_id)
            update = await self.patient(self._update, task_id, seen, owner)
            if update is None:
                return None
            done = update.summary.progress.done
            seen = done - len(update.items) if seen is None else seen
            status = update.summary.status if status is None else status
            if not wait or update.items or update.summary.status != status or status.is_final:
                return update
            await _wait(changed, LOOK_AGAIN)

    async def wait_final(self, task_id: str) -> None:
        key = self._key("task:", task_id)
        while True:
            changed = self._watch(task_id)
            status = await self.patient(self.client.hget, key, "status")
            if status is None or TaskStatus(as_bytes(status).decode()).is_final:
                return
            await _wait(changed, LOOK_AGAIN)

    async def active(self) -> list[tuple[TaskDetail, str | None]]:
        """Adopt the active tasks whose replica's lease has lapsed (at start-up, those of a
        replica that stopped; later, those of one that died), with their owners. Items
        that are not final start again from their download: some may be classified twice,
        and the first result wins."""
        if self.link.healthy_for() < self.lease:
            return []  # just (re)connected: give live replicas time to renew their leases
        ids = await self.patient(self._scripts["ADOPT"], args=[self.prefix, self.replica, 100])
        adopted = []
        for raw in ids:
            task_id = raw.decode()
            stored = await self.patient(self.client.hget, self._key("task:", task_id), "owner")
            owner = None if stored is None else as_bytes(stored).decode()
            detail = await self.patient(self._detail_json, task_id, owner)
            if detail is not None:
                adopted.append((TaskDetail.model_validate_json(detail), owner))
                log.warning("task %s adopted: its replica stopped renewing its lease", task_id)
        return adopted

    async def shutdown(self) -> None:
        """Tasks stay in Redis: another replica, or this one restarted, goes on with them."""

    async def pending_deliveries(self) -> int:
        return await self._outbox.pending()

    async def next_delivery(self) -> Delivery:
        """The next completion webhook to try: new ones, and those a replica that died was
        trying (idle for three leases)."""
        return await self._outbox.next()

    async def record_delivery(self, delivery: Delivery, webhook: Webhook, retry: Delivery | None) -> None:
        await self._outbox.record(delivery, webhook, retry)
        await self.patient(self.client.publish, self._key("changed"), delivery.task_id)

    # -- inside --

    def _key(self, kind: str, name: str = "") -> str:
        return f"{self.prefix}{kind}{name}"

    async def _renew(self) -> None:
        """The lease, and the webhook deliveries this replica is trying (so that no other
        replica takes them for abandoned while this one waits to try again)."""
        lease_ms = int(self.lease * 1000)
        await self._scripts["RENEW"](args=[self.prefix, self.replica, lease_ms, OUTCOMES_LEASES * lease_ms])
        await self._outbox.renew()

    async def _keep_lease(self) -> None:
        """Renew the lease three times per lease period (a failure also marks Redis away)."""
        while True:
            try:
                await self.patient(self._renew)
            except Exception:  # a bug here must not let the lease lapse for good
                log.exception("renewing the lease failed")
            await asyncio.sleep(self.lease / 3)

    async def _listen(self) -> None:
        """Wake the watchers of each task named on the `changed` channel; reconnect if Redis
        goes away (watchers look again by themselves meanwhile)."""
        while True:
            try:
                async with self.client.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(self._key("changed"))
                    while True:
                        message = await pubsub.get_message(timeout=LOOK_AGAIN)
                        if message is not None and (event := self._events.pop(message["data"].decode(), None)):
                            event.set()
            except UNREACHABLE:
                await asyncio.sleep(LOOK_AGAIN)
            except Exception:  # a bug: watchers still look every second; listen again
                log.exception("listening for task changes failed")
                await asyncio.sleep(LOOK_AGAIN)

    def _watch(self, task_id: str) -> asyncio.Event:
        """Set at the next message about the task (taken before looking, so none is missed)."""
        return self._events.setdefault(task_id, asyncio.Event())

    async def _maybe_expire(self, always: bool = False) -> None:
        """Forget finished tasks past their TTL or beyond the cap: on every create and list,
        and at most once a second on the reads of one task (the most frequent call)."""
        now = self._clock()
        if not always and now - self._expired_at < 1.0:
            return
        self._expired_at = now
        deadline = now - self._finished_ttl
        await self.link.fast(self._scripts["EXPIRE"](args=[self.prefix, deadline, self._max_finished]))

    async def _close(
        self,
        task_id: str,
        item_status: ItemStatus,
        task_status: TaskStatus,
        error: ErrorInfo | None,
        owner_check: str = "",
    ) -> int:
        """`owner_check`: "" to close whoever owns the task, else its owner ("-": none).
        Returns what the script does (above)."""
        return int(
            await self._scripts["CLOSE"](
                args=[
                    self.prefix,
                    task_id,
                    item_status.value,
                    item_tail(item_status, None, error),
                    task_status.value,
                    error.model_dump_json() if error is not None else "",
                    utcnow().isoformat(),
                    self._clock(),
                    uuid.uuid4().hex,
                    owner_check,
                    error.code if error is not None else "",
                ]
            )
        )

    async def _detail_json(self, task_id: str, owner: str | None) -> bytes | None:
        """The task as GET /tasks/<id> sends it, read in one transaction."""
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hgetall(self._key("task:", task_id))
            pipe.hgetall(self._key("urls:", task_id))
            pipe.hgetall(self._key("items:", task_id))
            pipe.hgetall(self._key("state:", task_id))
            fields, urls, items, states = await pipe.execute()
        if not fields or owner_of(fields) != owner:
            return None
        pieces = []
        for index in range(int(fields[b"total"])):
            name = str(index).encode()
            piece = items.get(name)
            if piece is None:
                state = states.get(name, b"pending")
                piece = b'{"index":%d,"url":%s,"status":"%s","labels":null,"error":null}' % (index, urls[name], state)
            pieces.append(piece)
        head = summary_of(task_id, fields).model_dump_json().encode()
        return head[:-1] + b',"items":[' + b",".join(pieces) + b"]}"

    async def _update(self, task_id: str, seen: int | None, owner: str | None) -> TaskUpdate | None:
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hgetall(self._key("task:", task_id))
            pipe.lrange(self._key("done:", task_id), 0 if seen is None else seen, -1)
            fields, done = await pipe.execute()
        if not fields or owner_of(fields) != owner:
            return None
        summary = summary_of(task_id, fields)
        if seen is None:
            return TaskUpdate(items=[], summary=summary)
        pieces = await self.client.hmget(self._key("items:", task_id), done) if done else []
        items = [Item.model_validate_json(piece) for piece in pieces if piece is not None]
        return TaskUpdate(items=items, summary=summary)

    async def _page(
        self, status: TaskStatus | None, priority: Priority | None, limit: int, before: int | None, owner: str | None
    ) -> TaskPage:
        key = self._key("tasks:", owner or "-")
        top: float | str = "+inf" if before is None else f"({before}"
        found: list[tuple[int, TaskSummary]] = []
        chunk = max(limit + 1, 100)
        while len(found) <= limit:
            ids = cast(
                list[tuple[bytes, float]],
                await self.client.zrevrangebyscore(key, top, "-inf", start=0, num=chunk, withscores=True),
            )
            if not ids:
                break
            async with self.client.pipeline(transaction=False) as pipe:
                for task_id, _ in ids:
                    pipe.hgetall(self._key("task:", task_id.decode()))
                rows = await pipe.execute()
            for (task_id, seq), fields in zip(ids, rows, strict=True):
                if not fields or (status is not None and fields[b"status"].decode() != status.value):
                    continue
                summary = summary_of(task_id.decode(), fields)
                if priority is None or summary.priority is priority:
                    found.append((int(seq), summary))
            top = f"({int(ids[-1][1])}"
            if len(ids) < chunk:
                break
        more = len(found) > limit
        page = found[:limit]
        return TaskPage(
            tasks=[summary for _, summary in page], next_cursor=encode_cursor(page[-1][0]) if more else None
        )


async def _wait(event: asyncio.Event, timeout: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout)
