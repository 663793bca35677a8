"""The Redis task registry: tasks shared by every web replica and worker of one deployment.

Each change is one Lua script (`service.tasks.redis_scripts`), so it is atomic whoever makes
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
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, ParamSpec, TypeVar, cast

import pydantic_core
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, ReadOnlyError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import StreamIdT

from inference.specs import RunPrecision
from service.lifetimes import stop_tasks
from service.metrics import Metrics
from service.tasks import redis_scripts
from service.tasks.deliveries import Delivery, payload
from service.tasks.idempotency import IdempotencyKey, Submission, SubmissionExists
from service.tasks.records import (
    ErrorInfo,
    Item,
    ItemStatus,
    Label,
    Progress,
    TaskDetail,
    TaskPage,
    TaskStatus,
    TaskSummary,
    Webhook,
)
from service.tasks.registry import ItemChange, StoreUnavailable, TaskUpdate, decode_cursor, encode_cursor
from service.tasks.state import utcnow

log = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")
# Redis away, loading its data, full (noeviction) or a read-only replica after a failover:
# requests answer 503, background work waits for it.
UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError, OutOfMemoryError, ReadOnlyError)
LOOK_AGAIN = 1.0  # seconds a watcher waits for a message before it looks for itself
WEBHOOK_GROUP = "senders"
GROUP_WRITES = 64  # calls of update_items applied by one script call at most


class RedisUnreachable(Exception):
    """Redis did not answer at start-up (the message says where and why)."""


def connect(url: str) -> aioredis.Redis:
    """A client that gives up on an unreachable Redis within seconds (callers decide whether
    to wait for it); `socket_timeout` bounds a Redis that stopped answering."""
    return aioredis.Redis.from_url(
        url,
        socket_connect_timeout=2.0,
        socket_timeout=10.0,
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), 2),
        health_check_interval=15,
    )


class RedisRegistry:
    """The registry in Redis; `open` it, `close` it. `replica` names this process's lease."""

    def __init__(
        self,
        client: aioredis.Redis,
        prefix: str,
        finished_ttl: float,
        max_finished: int,
        lease: float = 10.0,
        clock: Callable[[], float] = time.time,
        idempotency_ttl: float = 86_400.0,
        metrics: Metrics | None = None,
        max_keys: int = 100_000,
    ) -> None:
        self.client = client
        self._max_keys = max_keys  # idempotency keys kept at most
        self._metrics = metrics  # counts the images this process made final
        self.prefix = prefix
        self.replica = uuid.uuid4().hex
        self.lease = lease
        self._finished_ttl = finished_ttl
        self._max_finished = max_finished
        self._clock = clock
        self._idempotency_ttl = idempotency_ttl
        self._healthy = True
        self._healthy_since = time.monotonic() - lease  # a new replica adopts at once
        self._expired_at = 0.0
        self._events: dict[str, asyncio.Event] = {}
        self._receipts: dict[str, bytes] = {}  # webhook delivery id -> its stream entry
        self._background: list[asyncio.Task[None]] = []
        self._writes: list[tuple[list[str | int | float], asyncio.Future[list[bool]]]] = []  # item changes
        self._writing: asyncio.Task[None] | None = None
        self._scripts = {
            name: client.register_script(getattr(redis_scripts, name))
            for name in ("CREATE", "UPDATE_ITEMS", "CLOSE", "FORGET", "EXPIRE", "ADOPT")
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
        client = connect(url)
        registry = cls(client, prefix, finished_ttl, max_finished, lease, clock, idempotency_ttl, metrics, max_keys)
        try:
            await client.ping()
            await registry._renew()
        except (RedisError, OSError) as exc:
            await client.aclose()
            raise RedisUnreachable(f"cannot reach Redis at {_safe(url)}: {exc}") from None
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
            await self.client.delete(self._key("replica:", self.replica))
        await self.client.aclose()

    def healthy(self) -> bool:
        """As of the last call to Redis (`check` makes one)."""
        return self._healthy

    async def check(self) -> bool:
        """Ask Redis now (readiness probes do): it answers, or it is away."""
        with contextlib.suppress(StoreUnavailable):
            await self._fast(self.client.ping())
        return self._healthy

    @property
    def adopt_every(self) -> float:
        """Seconds between looks for tasks whose replica is gone (see `TaskService`)."""
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
    ) -> TaskDetail:
        task_id = task_id or uuid.uuid4().hex
        items = [Item(index=index, url=url) for index, url in enumerate(urls)]  # refuses what JSON cannot carry
        created = utcnow()
        key = submission = ""
        if idempotency is not None:
            key = _idempotency_key(owner, idempotency.key)
            submission = json.dumps(
                [owner, idempotency.key, idempotency.fingerprint, task_id, len(urls), self._clock()]
            )
        await self._maybe_expire(always=True)
        result = await self._fast(
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
                    *(pydantic_core.to_json(item.url) for item in items),
                ]
            )
        )
        if result[0] == 0:  # another replica took the key a moment ago
            raise SubmissionExists(_submission(result[1]))
        summary = TaskSummary(
            task_id=task_id,
            status=TaskStatus.QUEUED,
            model=model,
            precision=precision,
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
        stored = await self._fast(self.client.get(self._key("idem:", _idempotency_key(owner, key))))
        return None if stored is None else _submission(_bytes(stored))

    async def get(self, task_id: str, owner: str | None = None) -> TaskDetail | None:
        data = await self.get_json(task_id, owner)
        return None if data is None else TaskDetail.model_validate_json(data)

    async def get_json(self, task_id: str, owner: str | None = None) -> bytes | None:
        await self._maybe_expire()
        return await self._fast(self._detail_json(task_id, owner))

    async def page(
        self, status: TaskStatus | None, limit: int, cursor: str | None, owner: str | None = None
    ) -> TaskPage:
        before = decode_cursor(cursor) if cursor else None
        await self._maybe_expire(always=True)
        return await self._fast(self._page(status, limit, before, owner))

    async def cancel(self, task_id: str, owner: str | None = None) -> TaskDetail | None:
        changed = await self._fast(self._close(task_id, ItemStatus.CANCELLED, TaskStatus.CANCELLED, None, owner or "-"))
        return None if changed < 0 else await self.get(task_id, owner)

    async def remove(self, task_id: str, owner: str | None = None) -> TaskDetail | None:
        snapshot = await self.cancel(task_id, owner)
        if snapshot is not None:
            await self._fast(self._scripts["FORGET"](args=[self.prefix, task_id]))
        return snapshot

    async def status_counts(self) -> dict[TaskStatus, int]:
        await self._maybe_expire(always=True)
        counts = await self._fast(self.client.hgetall(self._key("counts")))
        return {status: int(counts.get(status.value.encode(), 0)) for status in TaskStatus}

    async def unfinished_images(self) -> int:
        return int(await self._fast(self.client.get(self._key("unfinished"))) or 0)

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
            tail = _tail(change.status, change.labels, change.error) if change.status.is_final else ""
            # The last: the id of the webhook delivery, if this change completes the task.
            args += [change.task_id, change.index, change.status.value, int(change.status.is_final), tail]
            args.append(uuid.uuid4().hex)
        applied: asyncio.Future[list[bool]] = asyncio.get_running_loop().create_future()
        self._writes.append((args, applied))
        if self._writing is None or self._writing.done():
            self._writing = asyncio.create_task(self._write())
        results = await applied
        if self._metrics is not None:
            for change, done in zip(changes, results, strict=True):
                if done and change.status.is_final:
                    self._metrics.image_final(change.status.value, change.error.code if change.error else "")
        return results

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
                count = len(part) // 6
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
            if status is None or TaskStatus(_bytes(status).decode()).is_final:
                return
            await _wait(changed, LOOK_AGAIN)

    async def active(self) -> list[tuple[TaskDetail, str | None]]:
        """Adopt the active tasks whose replica's lease has lapsed (at start-up, those of a
        replica that stopped; later, those of one that died), with their owners. Items
        that are not final start again from their download: some may be classified twice,
        and the first result wins."""
        if time.monotonic() - self._healthy_since < self.lease:
            return []  # just (re)connected: give live replicas time to renew their leases
        ids = await self.patient(self._scripts["ADOPT"], args=[self.prefix, self.replica, 100])
        adopted = []
        for raw in ids:
            task_id = raw.decode()
            stored = await self.patient(self.client.hget, self._key("task:", task_id), "owner")
            owner = None if stored is None else _bytes(stored).decode()
            detail = await self.patient(self._detail_json, task_id, owner)
            if detail is not None:
                adopted.append((TaskDetail.model_validate_json(detail), owner))
                log.warning("task %s adopted: its replica stopped renewing its lease", task_id)
        return adopted

    async def shutdown(self) -> None:
        """Tasks stay in Redis: another replica, or this one restarted, goes on with them."""

    async def next_delivery(self) -> Delivery:
        """The next completion webhook to try: new ones, and those a replica that died was
        trying (idle longer than the lease)."""
        stream = self._key("webhooks")
        await self.patient(ensure_group, self.client, stream, WEBHOOK_GROUP)
        while True:
            found = await self.patient(
                self.client.xautoclaim, stream, WEBHOOK_GROUP, self.replica, int(self.lease * 3000), count=10
            )
            claimed = _entries(found[1]) if found else []
            if not claimed:
                read = await self.patient(
                    self.client.xreadgroup, WEBHOOK_GROUP, self.replica, {stream: ">"}, count=1, block=1000
                )
                claimed = [entry for _, messages in cast(Any, read) or [] for entry in _entries(messages)]
            for entry_id, fields in claimed:
                delivery = await self._delivery(entry_id, fields)
                if delivery is not None:
                    return delivery

    async def record_delivery(self, delivery: Delivery, webhook: Webhook, retry: Delivery | None) -> None:
        key = self._key("task:", delivery.task_id)
        entry = self._receipts.get(delivery.delivery_id)

        async def record() -> None:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.eval(_SET_IF_EXISTS, 1, key, "webhook", webhook.model_dump_json())
                if entry is not None and retry is None:
                    pipe.xack(self._key("webhooks"), WEBHOOK_GROUP, entry)
                    pipe.xdel(self._key("webhooks"), entry)
                await pipe.execute()

        await self.patient(record)
        if retry is None:
            self._receipts.pop(delivery.delivery_id, None)
        await self.patient(self.client.publish, self._key("changed"), delivery.task_id)

    # -- inside --

    def _key(self, kind: str, name: str = "") -> str:
        return f"{self.prefix}{kind}{name}"

    async def _fast(self, call: Awaitable[T]) -> T:
        """A request's call: StoreUnavailable (503) if Redis is away."""
        try:
            result = await call
        except UNREACHABLE as exc:
            self._set_healthy(False, exc)
            raise StoreUnavailable(f"Redis is unreachable: {exc}") from None
        self._set_healthy(True)
        return result

    async def patient(self, call: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
        """Background work's call, `call(*args, **kwargs)`: tried until Redis answers (or the
        caller is cancelled). A script that ran but whose answer was lost runs again: every
        script is safe to repeat."""
        backoff = ExponentialWithJitterBackoff(base=0.1, cap=2.0)
        failures = 0
        while True:
            try:
                result = await call(*args, **kwargs)
            except UNREACHABLE as exc:
                self._set_healthy(False, exc)
                failures += 1
                await asyncio.sleep(backoff.compute(failures))
                continue
            self._set_healthy(True)
            return result

    def _set_healthy(self, healthy: bool, exc: BaseException | None = None) -> None:
        if healthy and not self._healthy:
            log.warning("Redis is reachable again")
            self._healthy_since = time.monotonic()
        elif not healthy and self._healthy:
            log.error("Redis is unreachable: %s", exc)
        self._healthy = healthy

    async def _renew(self) -> None:
        """The lease, and the webhook deliveries this replica is trying (so that no other
        replica takes them for abandoned while this one waits to try again)."""
        await self.client.set(self._key("replica:", self.replica), b"1", px=int(self.lease * 1000))
        if self._receipts:
            entries: list[StreamIdT] = list(self._receipts.values())
            await self.client.xclaim(self._key("webhooks"), WEBHOOK_GROUP, self.replica, 0, entries, justid=True)

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
        await self._fast(self._scripts["EXPIRE"](args=[self.prefix, deadline, self._max_finished]))

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
        changed = int(
            await self._scripts["CLOSE"](
                args=[
                    self.prefix,
                    task_id,
                    item_status.value,
                    _tail(item_status, None, error),
                    task_status.value,
                    error.model_dump_json() if error is not None else "",
                    utcnow().isoformat(),
                    self._clock(),
                    uuid.uuid4().hex,
                    owner_check,
                ]
            )
        )
        if changed > 1 and self._metrics is not None:
            self._metrics.image_final(item_status.value, error.code if error is not None else "", changed - 1)
        return changed

    async def _detail_json(self, task_id: str, owner: str | None) -> bytes | None:
        """The task as GET /tasks/<id> sends it, read in one transaction."""
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hgetall(self._key("task:", task_id))
            pipe.hgetall(self._key("urls:", task_id))
            pipe.hgetall(self._key("items:", task_id))
            pipe.hgetall(self._key("state:", task_id))
            fields, urls, items, states = await pipe.execute()
        if not fields or _owner(fields.get(b"owner")) != owner:
            return None
        pieces = []
        for index in range(int(fields[b"total"])):
            name = str(index).encode()
            piece = items.get(name)
            if piece is None:
                state = states.get(name, b"pending")
                piece = b'{"index":%d,"url":%s,"status":"%s","labels":null,"error":null}' % (index, urls[name], state)
            pieces.append(piece)
        head = _summary(task_id, fields).model_dump_json().encode()
        return head[:-1] + b',"items":[' + b",".join(pieces) + b"]}"

    async def _update(self, task_id: str, seen: int | None, owner: str | None) -> TaskUpdate | None:
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hgetall(self._key("task:", task_id))
            pipe.lrange(self._key("done:", task_id), 0 if seen is None else seen, -1)
            fields, done = await pipe.execute()
        if not fields or _owner(fields.get(b"owner")) != owner:
            return None
        summary = _summary(task_id, fields)
        if seen is None:
            return TaskUpdate(items=[], summary=summary)
        pieces = await self.client.hmget(self._key("items:", task_id), done) if done else []
        items = [Item.model_validate_json(piece) for piece in pieces if piece is not None]
        return TaskUpdate(items=items, summary=summary)

    async def _page(self, status: TaskStatus | None, limit: int, before: int | None, owner: str | None) -> TaskPage:
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
                if fields and (status is None or fields[b"status"].decode() == status.value):
                    found.append((int(seq), _summary(task_id.decode(), fields)))
            top = f"({int(ids[-1][1])}"
            if len(ids) < chunk:
                break
        more = len(found) > limit
        page = found[:limit]
        return TaskPage(
            tasks=[summary for _, summary in page], next_cursor=encode_cursor(page[-1][0]) if more else None
        )

    async def _delivery(self, entry_id: bytes, fields: dict[bytes, bytes]) -> Delivery | None:
        """The delivery an entry of the webhook stream stands for; None (and the entry gone)
        if its task was forgotten meanwhile."""
        task_id = fields[b"task"].decode()
        task = cast(dict[bytes, bytes], await self.patient(self.client.hgetall, self._key("task:", task_id)))
        if not task:
            stream = self._key("webhooks")

            async def drop() -> None:
                async with self.client.pipeline(transaction=True) as pipe:
                    pipe.xack(stream, WEBHOOK_GROUP, entry_id)
                    pipe.xdel(stream, entry_id)
                    await pipe.execute()

            await self.patient(drop)
            return None
        webhook = _summary(task_id, task).webhook
        delivery = Delivery(
            delivery_id=fields[b"delivery"].decode(),
            task_id=task_id,
            url=fields[b"url"].decode(),
            body=payload(_summary(task_id, task)),
            finished=float(fields[b"finished"]),
            attempts=webhook.attempts if webhook is not None else 0,
        )
        self._receipts[delivery.delivery_id] = entry_id
        return delivery


# Set a hash field only if the hash still exists (a forgotten task stays forgotten).
_SET_IF_EXISTS = """
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
"""


async def ensure_group(client: aioredis.Redis, stream: str, group: str) -> None:
    """The consumer group, made with the stream if need be (existing entries included)."""
    try:
        await client.xgroup_create(stream, group, id="0", mkstream=True)
    except RedisError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


async def _wait(event: asyncio.Event, timeout: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout)


def _tail(status: ItemStatus, labels: list[Label] | None, error: ErrorInfo | None) -> str:
    """An item's JSON after its URL (see `redis_scripts`), made by pydantic; raises if the
    labels or the error cannot be serialised, before anything changes."""
    text = Item(index=0, url="", status=status, labels=labels, error=error).model_dump_json()
    head = '{"index":0,"url":""'
    assert text.startswith(head)
    return text[len(head) :]


def _bytes(value: object) -> bytes:
    """A reply as the client gives it (it never decodes; redis-py's types allow for both)."""
    assert isinstance(value, bytes), value
    return value


def _entries(raw: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """Stream entries, as XREADGROUP and XCLAIM give them."""
    return [(entry_id, fields) for entry_id, fields in raw]


def _owner(raw: bytes | None) -> str | None:
    return None if raw is None else raw.decode()


def _idempotency_key(owner: str | None, key: str) -> str:
    return json.dumps([owner, key])


def _submission(raw: bytes) -> Submission:
    owner, key, fingerprint, task_id, total, created = json.loads(raw)
    return Submission(owner, key, fingerprint, task_id, total, created)


def _summary(task_id: str, fields: dict[bytes, bytes]) -> TaskSummary:
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


def _safe(url: str) -> str:
    """A Redis URL without its password, for messages."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return f"{scheme}{sep}{rest}"
